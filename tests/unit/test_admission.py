"""The leader's admission limit (``master.api.ClientLoad``): a client's pending tasks are bounded.

Driven through the master core with the ``Harness`` of test_master_core (no sockets, no Raft
library, no sleeps); the clock is the harness's ``now``.
"""

from __future__ import annotations

from cluster.node.events import MessageReceived, Peer
from master.api import LOAD_RECOUNT_S, TOO_MANY_PENDING, ClientLoad, held_tasks, submit_cost
from master.commands import SubmitJob
from master.core import API
from master.ledger import Ledger, spec_digest
from proto import AppReason
from proto.messages import CancelJob, Error, Submit, SubmitAck

from .test_master_core import Harness, submit


def as_client(h: Harness, m, name: str, route: bytes = b"r"):
    h.stimuli += 1
    return h.event(MessageReceived(API, route + name.encode(), 7, m, f"msg-{h.stimuli}", Peer(name, "client")))


def tasks(n: int) -> dict:
    return {"tasks": [{"i": i} for i in range(n)]}


def refused(h: Harness) -> list[Error]:
    return [e for e in h.take(Error) if e.detail.get("code") == TOO_MANY_PENDING]


def committed(h: Harness, m, name: str = "ann") -> SubmitAck:
    as_client(h, m, name)
    h.flush()
    h.commit_all()
    (ack,) = h.take(SubmitAck)
    return ack


def test_a_submit_past_the_clients_limit_is_refused_before_it_costs_a_raft_round():
    h = Harness()
    h.core.api.load.limit = 10
    committed(h, submit(1, kind="list", spec=tasks(6)))
    as_client(h, submit(2, kind="list", spec=tasks(5)), "ann")
    (err,) = refused(h)
    assert err.request_id == 2 and err.reason == AppReason.REFUSED
    assert not h.proposed, "a refused submit proposes nothing"
    assert h.core.standing.counters["refused_too_many_pending"] == 1
    as_client(h, submit(3, kind="list", spec=tasks(4)), "ann")  # 6 + 4 fits
    h.flush()
    h.commit_all()
    assert not refused(h) and len(h.take(SubmitAck)) == 1


def test_the_limit_is_per_client():
    h = Harness()
    h.core.api.load.limit = 10
    committed(h, submit(1, kind="list", spec=tasks(10)), "ann")
    committed(h, submit(2, kind="list", spec=tasks(10)), "bob")
    as_client(h, submit(3, kind="list", spec=tasks(1)), "ann")
    assert len(refused(h)) == 1


def test_a_client_is_admitted_again_once_its_tasks_have_ended():
    h = Harness()
    h.core.api.load.limit = 10
    ack = committed(h, submit(1, kind="list", spec=tasks(8)))
    as_client(h, submit(2, kind="list", spec=tasks(8)), "ann")
    assert len(refused(h)) == 1
    as_client(h, CancelJob(3, ack.job_uuid_upper, ack.job_uuid_lower, "make room"), "ann")
    h.flush()
    h.commit_all()
    as_client(h, submit(4, kind="list", spec=tasks(8)), "ann")
    assert len(refused(h)) == 1, "the count is at most LOAD_RECOUNT_S old: the cancel is not seen yet"
    h.now += LOAD_RECOUNT_S
    as_client(h, submit(5, kind="list", spec=tasks(8)), "ann")
    assert not refused(h)


def test_submits_queued_and_not_yet_committed_count():
    h = Harness()
    h.core.api.load.limit = 10
    as_client(h, submit(1, kind="list", spec=tasks(6)), "ann")
    as_client(h, submit(2, kind="list", spec=tasks(6)), "ann")  # the first is only queued
    assert [e.request_id for e in refused(h)] == [2]
    h.flush()
    h.commit_all()
    assert h.core.api.load.in_flight == {}, "an answered submit is no longer in flight"


def test_a_single_job_over_the_limit_runs_when_nothing_else_is_pending():
    h = Harness()
    h.core.api.load.limit = 10
    committed(h, submit(1, kind="list", spec=tasks(25)))


def test_a_retried_submit_that_committed_is_answered_from_the_ledger_even_over_the_limit():
    h = Harness()
    h.core.api.load.limit = 10
    first = submit(1, key=42, kind="list", spec=tasks(10))
    ack = committed(h, first)
    as_client(h, Submit(2, first.idempotency_key_upper, first.idempotency_key_lower, "list", tasks(10)), "ann")
    (again,) = h.take(SubmitAck)
    assert (again.job_uuid_upper, again.job_uuid_lower) == (ack.job_uuid_upper, ack.job_uuid_lower)
    assert not refused(h)


def test_range_and_grid_jobs_cost_their_window_not_their_size():
    assert submit_cost("range", {"count": 10**9}) == 1024
    assert submit_cost("grid", {"rows": 400, "cols": 400}) == 1024
    assert submit_cost("range", {"count": 3}) == 3
    assert submit_cost("list", tasks(7)) == 7
    h = Harness()
    committed(h, submit(1, kind="range", spec={"count": 10**9}))
    (job,) = h.ledger.state.jobs.values()
    assert held_tasks(job) == 1024


def test_a_restored_ledger_is_indexed_anew():
    load = ClientLoad(limit=10)
    ledger = Ledger()
    spec = tasks(8)
    ledger.apply(SubmitJob(b"j" * 16, b"k" * 16, spec_digest("list", spec), "list", spec, "ann", 0.0))
    assert load.refusal(ledger.state, "ann", 5, 0.0) is not None
    restored = Ledger.restore(ledger.snapshot())
    assert load.pending(restored.state, "ann", 0.0) == 8, "the new state object is counted at once"
    assert load.pending(Ledger().state, "ann", 0.0) == 0
