"""The master core driven directly: no sockets, no Raft library, no sleeps.

``Harness`` stands in for the loop and for Raft: it feeds events to the core, collects effects,
and "commits" a ``Propose`` when told to by applying the entry to the ledger (as every master's
Raft thread would) and posting ``Committed``.
"""

from __future__ import annotations

import os
import random

import pytest

from cluster.node.events import Log, MessageReceived, Refuse, Send, Started, StartTimer, TimerFired
from master import views
from master.core import API, Committed, MasterCore, ProposalFailed, Propose, RaftView
from proto.ids import join128, split128
from master.commands import AssignTasks, Batch, CompleteTask, SubmitJob
from master.jobs import MAX_SPEC_BYTES
from master.ledger import Ledger, spec_digest
from master.stream import TaskLog
from master.watches import MAX_WATCH_JOBS, MAX_WATCH_TASKS, MAX_WATCH_WAIT
from proto import AppReason, Codec
from proto.messages import (
    FileList,
    FileLookup,
    FileRegister,
    FileRelease,
    Attach,
    Attached,
    CancelJob,
    Credit,
    Error,
    Heartbeat,
    JobQuery,
    NotLeader,
    QueryReply,
    ResultAck,
    Submit,
    SubmitAck,
    TaskQuery,
    TaskResult,
    Watch,
    WorkerRequest,
)

CLIENT = b"client-route"
BALANCER = b"balancer-route"


def jid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Harness:
    def __init__(self, role: str = "leader", term: int = 3, ledger: Ledger | None = None) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self.raft = RaftView(role, term, "10.0.0.1:6000" if role == "leader" else "10.0.0.2:6000", True)
        self.core = MasterCore(self.ledger, "m1", lambda: self.raft, {"10.0.0.1:6000": "tcp://m1:5000", "10.0.0.2:6000": "tcp://m2:5000"})
        self.now = 100.0
        self.proposed: list[Propose] = []
        self.sent: list[Send] = []
        self.stimuli = 0
        self.index = 0
        self.flush_armed = False  # a zero-delay flush timer the loop would fire after draining
        self.event(Started("s0"))
        self.event(TimerFired("raft", "t0"))  # sees the role; a leader proposes its Barrier
        if role == "leader":
            self.commit_all()

    def event(self, ev) -> list:
        effects = self.core.handle(ev, self.now)
        self.core.validate_state()
        for e in effects:
            if isinstance(e, Propose):
                self.proposed.append(e)
            elif isinstance(e, Send):
                self.sent.append(e)
            elif isinstance(e, StartTimer) and e.name == "flush" and e.delay == 0:
                self.flush_armed = True  # the test fires it with flush(), or commit_all does
        return effects

    def message(self, m, route: bytes = CLIENT):
        self.stimuli += 1
        return self.event(MessageReceived(API, route, 7, m, f"msg-{self.stimuli}"))

    def flush(self):
        self.flush_armed = False
        return self.event(TimerFired("flush", "flush"))

    def commit_all(self):
        """Commit every proposal, firing the flush timers the loop would fire in between (group
        commit queues what arrives while a proposal is in flight)."""
        while self.proposed or self.flush_armed:
            if not self.proposed:
                self.flush()
                continue
            p = self.proposed.pop(0)
            self.index += 1
            self.raft = RaftView(self.raft.role, self.raft.term, self.raft.leader, True, self.index, self.index)
            result = self.ledger.apply(p.entry)
            self.event(Committed(p.token, result, self.index, f"c-{p.token}"))

    def take(self, kind):
        out = [s.message for s in self.sent if isinstance(s.message, kind)]
        self.sent = [s for s in self.sent if not isinstance(s.message, kind)]
        return out


def submit(rid: int, key: int = None, kind: str = "range", spec=None) -> Submit:
    key = key if key is not None else int.from_bytes(os.urandom(16), "big")
    return Submit(rid, key >> 64, key & (2**64 - 1), kind, spec if spec is not None else {"count": 3})


def test_a_burst_of_submits_is_one_proposal_and_acked_only_after_commit():
    h = Harness()
    for rid in range(1, 51):
        h.message(submit(rid))
    assert not h.take(SubmitAck), "nothing is acknowledged before it commits"
    h.flush()
    assert len(h.proposed) == 1 and isinstance(h.proposed[0].entry, Batch)
    assert len(h.proposed[0].entry.commands) == 50
    h.commit_all()
    acks = h.take(SubmitAck)
    assert sorted(a.request_id for a in acks) == list(range(1, 51))
    assert len(h.ledger.state.jobs) == 50


def test_follower_redirects_writes_to_the_leader_client_address():
    h = Harness(role="follower")
    h.message(submit(9))
    (reply,) = h.take(NotLeader)
    assert reply.request_id == 9 and reply.leader == "tcp://m2:5000"
    assert not h.proposed


def test_leader_without_quorum_refuses_writes_as_unavailable():
    h = Harness()
    h.raft = RaftView("leader", 3, "10.0.0.1:6000", False)
    h.event(TimerFired("raft", "t"))
    h.message(submit(4))
    (err,) = h.take(Error)
    assert err.reason == AppReason.UNAVAILABLE and "majority" in err.text


def test_failed_proposal_is_answered_outcome_unknown_and_a_retry_lands_once():
    h = Harness()
    key = 12345
    h.message(submit(1, key))
    h.flush()
    p = h.proposed.pop()
    # The leader lost the entry's fate: the client must hear "unknown", not "failed".
    h.event(ProposalFailed(p.token, "leader_changed", "f"))
    (err,) = h.take(Error)
    assert err.reason == AppReason.OUTCOME_UNKNOWN
    # ... but the entry did commit elsewhere; the retry with the same key finds the job.
    h.ledger.apply(p.entry)
    h.message(submit(2, key))
    (ack,) = h.take(SubmitAck)
    assert join128(ack.job_uuid_upper, ack.job_uuid_lower) == p.entry.job_id
    assert not h.proposed, "a committed key is answered from the ledger, not proposed again"
    assert len(h.ledger.state.jobs) == 1


def test_same_key_other_body_is_refused_before_any_proposal():
    h = Harness()
    h.message(submit(1, 77, spec={"count": 3}))
    h.flush()
    h.commit_all()
    h.take(SubmitAck)
    h.message(submit(2, 77, spec={"count": 4}))
    (err,) = h.take(Error)
    assert err.reason == AppReason.REFUSED and err.detail["code"] == "idempotency_conflict"
    assert not h.proposed


@pytest.mark.parametrize(
    "kind, spec, code",
    [
        ("nope", {"count": 1}, "unknown_kind"),
        ("range", {"count": -1}, "bad_spec"),
        ("grid", {"rows": 2}, "bad_spec"),
        ("list", {"tasks": [{"x": "y" * MAX_SPEC_BYTES}]}, "spec_too_large"),
    ],
)
def test_bad_specs_are_refused_and_nothing_is_proposed(kind, spec, code):
    h = Harness()
    before = h.ledger.snapshot()
    h.message(submit(3, kind=kind, spec=spec))
    (err,) = h.take(Error)
    assert err.detail["code"] == code and err.text
    assert not h.proposed and h.ledger.snapshot() == before


def attach(h: Harness, credit: int, epoch: int = 1, route: bytes = BALANCER):
    h.message(Attach(1, epoch, credit, "b1"), route)
    h.commit_all()


def test_dispatch_sends_as_it_proposes_under_the_entrys_tokens_and_respects_credit():
    h = Harness()
    h.message(submit(1, spec={"count": 10}))
    h.flush()
    h.commit_all()
    h.message(Attach(1, 1, 4, "b1"), BALANCER)
    (attached,) = h.take(Attached)
    assert attached.term == 3
    assert not h.proposed, "assignments queue with the completions (group commit) until the flush"
    requests = h.take(WorkerRequest)  # pipelined: sent while the entry commits
    assert [(r.fence_term, r.fence_sequence) for r in requests] == [(3, 1), (3, 2), (3, 3), (3, 4)]
    h.flush()
    (proposal,) = h.proposed
    assert isinstance(proposal.entry, AssignTasks)
    assert (proposal.entry.term, proposal.entry.first_sequence) == (3, 1)
    assert [t for _, t in proposal.entry.tasks] == [r.task_id for r in requests]
    h.commit_all()
    assert not h.take(WorkerRequest), "nothing is sent twice once it commits"
    job = h.ledger.state.jobs[join128(requests[0].job_uuid_upper, requests[0].job_uuid_lower)]
    assert [(a.fence_term, a.fence_sequence) for r in requests for a in job.tasks[r.task_id].attempts] == \
        [(r.fence_term, r.fence_sequence) for r in requests], "the ledger records exactly the tokens sent"
    assert not h.proposed, "no credit left: nothing more is proposed"
    h.message(Credit(1, 2, 0), BALANCER)
    assert len(h.take(WorkerRequest)) == 2
    h.commit_all()


def test_a_result_of_an_assignment_that_never_committed_is_refused_and_the_task_stays_ready():
    """Pipelining's one risk: the leader is deposed before its assignment commits. The worker
    may have run the task; the next leader's ledger holds no attempt with that token, so the
    result is refused, not recorded, and the task is handed out again."""
    h = Harness()
    h.message(submit(1, spec={"count": 1}))
    h.flush()
    h.commit_all()
    h.message(Attach(1, 1, 1, "b1"), BALANCER)
    (r,) = h.take(WorkerRequest)
    h.flush()
    h.proposed.clear()  # the entry is lost with this leader: never applied anywhere
    h2 = Harness(term=4, ledger=Ledger.restore(h.ledger.snapshot()))  # another master's replica
    attach(h2, 1)
    (again,) = h2.take(WorkerRequest)
    assert (again.task_id, again.fence_term) == (r.task_id, 4)
    late = TaskResult(r.job_uuid_upper, r.job_uuid_lower, r.task_id, r.fence_term, r.fence_sequence,
                      0, 0, {}, None, None, "w1")
    h2.message(late, BALANCER)
    h2.commit_all()
    assert not h2.take(ResultAck)
    (err,) = h2.take(Error)
    assert err.reason == AppReason.STALE_FENCE and err.detail["code"] == "stale_fence"
    job = h2.ledger.state.jobs[join128(r.job_uuid_upper, r.job_uuid_lower)]
    assert job.tasks[r.task_id].state.name == "ASSIGNED" and len(job.tasks[r.task_id].attempts) == 1


def test_results_are_acked_after_commit_and_duplicates_are_acked_but_not_recorded():
    h = Harness()
    h.message(submit(1, spec={"count": 2}))
    h.flush()
    h.commit_all()
    attach(h, 2)
    r1, r2 = h.take(WorkerRequest)
    result = TaskResult(r1.job_uuid_upper, r1.job_uuid_lower, r1.task_id, r1.fence_term, r1.fence_sequence,
                        0, 0, {"v": 1}, None, None, "w1")
    h.message(result, BALANCER)
    h.message(result, BALANCER)  # at-least-once delivery: the same result twice
    assert not h.take(ResultAck)
    h.flush()
    h.commit_all()
    acks = h.take(ResultAck)
    assert len(acks) == 1 and len(acks[0].acks()) == 2  # one message acknowledges the whole commit
    job = h.ledger.state.jobs[join128(r1.job_uuid_upper, r1.job_uuid_lower)]
    assert job.done == 1 and job.duplicates == 1


def test_a_result_with_a_token_never_handed_out_is_refused_as_stale():
    h = Harness()
    h.message(submit(1, spec={"count": 2}))
    h.flush()
    h.commit_all()
    attach(h, 1)
    (r,) = h.take(WorkerRequest)
    forged = TaskResult(r.job_uuid_upper, r.job_uuid_lower, r.task_id, r.fence_term, r.fence_sequence + 40,
                        0, 0, {}, None, None, "w1")
    h.message(forged, BALANCER)
    h.flush()
    h.commit_all()
    (err,) = h.take(Error)
    assert err.reason == AppReason.STALE_FENCE


def test_an_older_balancer_epoch_is_refused_and_a_newer_one_gets_open_assignments_again():
    h = Harness()
    h.message(submit(1, spec={"count": 3}))
    h.flush()
    h.commit_all()
    attach(h, 3, epoch=5)
    first = h.take(WorkerRequest)
    assert len(first) == 3
    h.message(Attach(2, 4, 3, "old"), b"old-route")
    (err,) = h.take(Error)
    assert err.reason == AppReason.STALE_FENCE and "epoch 4" in err.text
    h.message(Attach(3, 6, 3, "new"), b"new-route")
    resent = h.take(WorkerRequest)
    assert {(r.task_id, r.fence_sequence) for r in resent} == {(r.task_id, r.fence_sequence) for r in first}


def test_stepping_down_answers_queued_writes_not_leader():
    h = Harness()
    h.message(submit(5))
    h.raft = RaftView("follower", 4, "10.0.0.2:6000", True)
    h.event(TimerFired("raft", "t"))
    (nl,) = h.take(NotLeader)
    assert nl.request_id == 5 and nl.leader == "tcp://m2:5000"
    h.flush()
    assert not h.proposed


def test_reads_say_stale_unless_a_serving_leader_answers():
    h = Harness()
    h.message(submit(1))
    h.flush()
    h.commit_all()
    (ack,) = h.take(SubmitAck)
    h.message(JobQuery(2, ack.job_uuid_upper, ack.job_uuid_lower))
    (fresh,) = h.take(QueryReply)
    assert fresh.stale == 0 and fresh.value["total"] == 3
    f = Harness(role="follower")
    f.ledger.state = h.ledger.state
    f.message(JobQuery(3, ack.job_uuid_upper, ack.job_uuid_lower))
    (old,) = f.take(QueryReply)
    assert old.stale == 1 and old.leader == "tcp://m2:5000"
    f.message(TaskQuery(4, 1, 2, 0))
    (err,) = f.take(Error)
    assert err.reason == AppReason.NOT_FOUND and "behind" in err.text
    assert err.detail["leader"] == "tcp://m2:5000"  # the client asks the leader before it believes it


def test_cancel_is_committed_then_answered_with_the_job_view():
    h = Harness()
    h.message(submit(1))
    h.flush()
    h.commit_all()
    (ack,) = h.take(SubmitAck)
    h.message(CancelJob(2, ack.job_uuid_upper, ack.job_uuid_lower, "not needed"))
    h.flush()
    h.commit_all()
    (reply,) = h.take(QueryReply)
    assert reply.value["state"] == "cancelled" and reply.value["error"] == "not needed"


def test_files_are_registered_looked_up_listed_and_released_through_the_leader():
    h = Harness()
    h.message(submit(1))
    h.flush()
    h.commit_all()
    (ack,) = h.take(SubmitAck)
    job = join128(ack.job_uuid_upper, ack.job_uuid_lower)
    fid = bytes(range(16))
    h.message(FileRegister(2, *split128(fid), 300, 0, ["s2", "s1"], job, "genome.fa"))
    h.message(FileRegister(3, *split128(b"\xff" * 16), 5, 0, ["s1"], job, "genome.fa"))  # the name is taken
    h.flush()
    assert not h.take(QueryReply)  # nothing answered before the commit
    h.commit_all()
    (reply,) = h.take(QueryReply)
    assert reply.request_id == 2 and reply.value == {"file": fid, "replicas": ["s1", "s2"]}
    (err,) = h.take(Error)
    assert err.request_id == 3 and err.detail["code"] == "name_taken" and "genome.fa" in err.text
    h.message(FileLookup(4, [fid, b"\x00" * 16]))
    (reply,) = h.take(QueryReply)
    assert reply.value[fid.hex()]["refs"] == {job.hex(): "genome.fa"} and reply.value["00" * 16] is None
    h.message(FileList(5, 10, job, None))
    (reply,) = h.take(QueryReply)
    assert [f["name"] for f in reply.value["files"]] == ["genome.fa"]
    h.message(FileList(6, 10, b"\x01" * 16, None))
    (err,) = h.take(Error)
    assert err.reason == AppReason.NOT_FOUND
    h.message(FileLookup(7, [fid] * 10_001))
    (err,) = h.take(Error)
    assert err.detail["code"] == "too_many_ids"
    h.message(FileRelease(8, None, job))
    h.flush()
    h.commit_all()
    (reply,) = h.take(QueryReply)
    assert reply.value == {"released": 1, "dropped": [fid]}
    assert views.file_view(h.core.ledger.state, fid) is None


def test_unanswered_proposals_expire_as_outcome_unknown():
    h = Harness()
    h.message(submit(1))
    h.flush()
    h.now += 10
    h.event(TimerFired("expire", "e"))
    (err,) = h.take(Error)
    assert err.reason == AppReason.OUTCOME_UNKNOWN
    assert any(isinstance(e, Log) for e in h.core.handle(ProposalFailed(999, "x", "y"), h.now)) is False


def test_ids_split_and_join():
    value = os.urandom(16)
    assert join128(*split128(value)) == value


def test_an_assignment_committing_across_a_balancer_change_goes_to_the_new_balancer():
    h = Harness()
    h.message(submit(1, spec={"count": 2}))
    h.flush()
    h.commit_all()
    h.message(Attach(1, 1, 2, "b1"), BALANCER)
    h.flush()
    assert len(h.proposed) == 1  # AssignTasks in flight for balancer epoch 1
    h.message(Attach(2, 2, 2, "b2"), b"b2-route")  # before it commits: not an open assignment yet
    h.sent.clear()
    h.commit_all()
    routes = {s.route for s in h.sent if isinstance(s.message, WorkerRequest)}
    assert routes == {b"b2-route"}


# ---- heartbeats ---------------------------------------------------------------------------------


def test_the_leader_a_balancer_is_attached_to_answers_its_heartbeat_with_its_term():
    h = Harness(term=6)
    attach(h, 1)
    h.message(Heartbeat(2, 41, 0), BALANCER)
    (hb,) = h.take(Heartbeat)
    assert (hb.epoch, hb.sequence, hb.reply) == (6, 41, 1)
    assert not any(isinstance(e, (Send, Refuse)) for e in h.message(Heartbeat(2, 41, 1), BALANCER)), "an answer is not answered"


def test_a_balancer_heartbeating_a_master_that_came_back_as_someone_else_is_told_so():
    """A master restarted at once keeps its address: the balancer's link reconnects and its
    heartbeats would be answered as ever, so it stayed attached to a follower, or to a leader
    that no longer knew it, and the cluster never served again. Now each says so."""
    follower = Harness(role="follower", term=6)
    follower.message(Heartbeat(2, 41, 0), BALANCER)
    (told,) = follower.take(NotLeader)
    assert told.leader == "tcp://m2:5000" and not follower.take(Heartbeat)
    leader = Harness(term=6)  # leads, but nobody attached since it started
    leader.message(Heartbeat(2, 42, 0), BALANCER)
    (err,) = leader.take(Error)
    assert err.detail["code"] == "not_attached" and not leader.take(Heartbeat)


# ---- watches ------------------------------------------------------------------------------------


def timers(effects) -> list[tuple[str, float]]:
    return [(e.name, e.delay) for e in effects if isinstance(e, StartTimer)]


def running_job(h: Harness, count: int, spec=None) -> tuple[bytes, list[WorkerRequest]]:
    """Submit a range job, attach a balancer with room for all of it; the job id and its requests."""
    h.message(submit(1, spec={"count": count, **(spec or {})}))
    h.flush()
    h.commit_all()
    (ack,) = h.take(SubmitAck)
    attach(h, count)
    return join128(ack.job_uuid_upper, ack.job_uuid_lower), h.take(WorkerRequest)


def result(r: WorkerRequest, outcome: int = 0, summary=None, error=None, files=()) -> TaskResult:
    return TaskResult(r.job_uuid_upper, r.job_uuid_lower, r.task_id, r.fence_term, r.fence_sequence,
                      outcome, 0, summary or {}, None, error, "w1", list(files))


def finish(h: Harness, *results: TaskResult) -> None:
    for m in results:
        h.message(m, BALANCER)
    h.flush()
    h.commit_all()
    h.take(ResultAck)


def test_a_watch_with_news_is_answered_at_once_with_the_endings_past_its_cursor():
    h = Harness()
    job, reqs = running_job(h, 3, {"retry_failed": False, "fail_fast": False})
    finish(h, result(reqs[2], summary={"v": 2}), result(reqs[0], outcome=1, summary={"type": "ValueError"}, error="ValueError: x"))
    effects = h.message(Watch(5, 30_000, {job: 0, b"\x07" * 16: 0}))
    assert not timers(effects), "nothing parked"
    (reply,) = h.take(QueryReply)
    assert reply.request_id == 5 and reply.stale == 0
    assert reply.value == {
        "jobs": {job.hex(): {
            "state": "active", "cursor": 2, "more": False, "skipped": 0, "error": None, "done": 1, "failed": 1, "total": 3,
            "tasks": [
                {"task": 2, "state": "done", "summary": {"v": 2}, "result_file": None, "error": None, "attempts": 1},
                {"task": 0, "state": "failed", "summary": {"type": "ValueError"}, "result_file": None, "error": "ValueError: x",
                 "attempts": 1},
            ],
        }},
        "unknown": [("\x07" * 16).encode().hex()],
    }
    h.message(Watch(6, 0, {job: 2}))  # nothing new and no wait: answered empty at once
    (reply,) = h.take(QueryReply)
    assert reply.value == {"jobs": {}, "unknown": []} and not h.core.watches.watchers


def test_a_parked_watch_is_woken_by_the_commit_that_brings_news():
    h = Harness()
    job, reqs = running_job(h, 2)
    effects = h.message(Watch(7, 10_000, {job: 0}))
    assert timers(effects) == [("watch", 10.0)] and not h.take(QueryReply)
    h.message(result(reqs[1], summary={"v": 1}), BALANCER)
    h.flush()
    assert not h.take(QueryReply), "the news is told once it commits"
    h.commit_all()
    (reply,) = h.take(QueryReply)
    assert reply.request_id == 7 and [t["task"] for t in reply.value["jobs"][job.hex()]["tasks"]] == [1]
    assert not h.core.watches.watchers and not h.core.watches.watching
    h.message(Watch(8, 10_000, {job: 1}))  # the client's next cursor
    finish(h, result(reqs[0]))
    (reply,) = h.take(QueryReply)
    view = reply.value["jobs"][job.hex()]
    assert view["state"] == "done" and view["cursor"] == 2 and [t["task"] for t in view["tasks"]] == [0]
    h.message(Watch(9, 10_000, {job: 2}))  # a job that is over is news by itself
    (reply,) = h.take(QueryReply)
    assert reply.value["jobs"][job.hex()]["tasks"] == [] and reply.value["jobs"][job.hex()]["state"] == "done"


def test_a_commit_without_news_for_the_watch_leaves_it_parked():
    h = Harness()
    job, reqs = running_job(h, 2, {"max_attempts": 3})
    h.message(Watch(7, 10_000, {job: 0}))
    finish(h, result(reqs[0], outcome=3))  # lost: retried, not an ending
    assert not h.take(QueryReply) and h.core.watches.watchers


def test_a_cancel_wakes_the_watchers_of_the_job():
    h = Harness()
    job, _ = running_job(h, 2)
    h.message(Watch(7, 10_000, {job: 0}), b"watcher")
    h.message(CancelJob(8, *split128(job), "enough"))
    h.flush()
    h.commit_all()
    replies = {r.request_id: r for r in h.take(QueryReply)}
    assert replies[7].value["jobs"][job.hex()]["state"] == "cancelled"
    assert replies[7].value["jobs"][job.hex()]["error"] == "enough"


def test_an_unanswered_watch_expires_at_its_deadline_with_no_news():
    h = Harness()
    job, _ = running_job(h, 2)
    effects = h.message(Watch(3, 500_000, {job: 0}), b"a")  # capped at 60 s
    assert timers(effects) == [("watch", MAX_WATCH_WAIT)]
    effects = h.message(Watch(4, 2_000, {job: 0}), b"b")
    assert timers(effects) == [("watch", 2.0)], "an earlier deadline moves the timer"
    assert not timers(h.message(Watch(5, 3_000, {job: 0}), b"c"))
    h.now += 2.0
    effects = h.event(TimerFired("watch", "w1"))
    (reply,) = h.take(QueryReply)
    assert reply.request_id == 4 and reply.value == {"jobs": {}, "unknown": []}
    assert timers(effects) == [("watch", 1.0)], "the timer moves on to the next deadline"
    h.now += 58.0
    h.event(TimerFired("watch", "w2"))
    assert sorted(r.request_id for r in h.take(QueryReply)) == [3, 5] and not h.core.watches.watchers


def test_a_newer_watch_from_the_same_connection_replaces_the_parked_one():
    h = Harness()
    job, reqs = running_job(h, 2)
    h.message(Watch(1, 10_000, {job: 0}))
    h.message(Watch(2, 10_000, {job: 0}))
    (old,) = h.take(QueryReply)
    assert old.request_id == 1 and old.value == {"jobs": {}, "unknown": []}
    assert list(h.core.watches.watchers) == [CLIENT] and h.core.watches.watchers[CLIENT].request_id == 2
    finish(h, result(reqs[0]))
    (reply,) = h.take(QueryReply)
    assert reply.request_id == 2
    h.now += 20
    h.event(TimerFired("watch", "w"))  # the replaced watch's deadline passes: nothing more
    assert not h.take(QueryReply)


def test_parked_watches_are_answered_not_leader_when_the_leader_steps_down():
    h = Harness()
    job, _ = running_job(h, 2)
    h.message(Watch(1, 10_000, {job: 0}), b"a")
    h.message(Watch(2, 10_000, {job: 0}), b"b")
    h.raft = RaftView("follower", 4, "10.0.0.2:6000", True)
    h.event(TimerFired("raft", "t"))
    answers = {s.route: s.message for s in h.sent if isinstance(s.message, NotLeader) and s.route in (b"a", b"b")}
    assert {m.request_id for m in answers.values()} == {1, 2} and answers[b"a"].leader == "tcp://m2:5000"
    assert not h.core.watches.watchers and not h.core.watches.watching and not h.core.watches.deadlines
    h.message(Watch(3, 10_000, {job: 0}), b"a")  # a follower sends watches to the leader
    assert [m.request_id for m in h.take(NotLeader) if m.request_id == 3] == [3]


def test_a_new_leader_answers_watches_from_its_ledger_before_it_serves_and_wakes_them_at_its_barrier():
    h = Harness()
    job, reqs = running_job(h, 2)
    h.raft = RaftView("leader", 4, "10.0.0.1:6000", True)
    h.event(TimerFired("raft", "t"))  # a new term: its Barrier is proposed, not yet committed
    assert h.core.standing.serving_term != 4
    h.message(Watch(1, 10_000, {job: 0}))
    assert not h.take(QueryReply) and h.core.watches.watchers
    # an entry of the old term commits (the Raft thread applies it; this core proposed none of it)
    r = reqs[0]
    h.ledger.apply(CompleteTask(job, r.task_id, r.fence_term, r.fence_sequence, 0, "w", {}, None, None, h.now))
    h.commit_all()  # the Barrier
    (reply,) = h.take(QueryReply)
    assert [t["task"] for t in reply.value["jobs"][job.hex()]["tasks"]] == [r.task_id]


def test_watch_bounds_are_refused_with_clear_errors():
    h = Harness()
    job, _ = running_job(h, 1)
    h.message(Watch(1, 100, {i.to_bytes(16, "big"): 0 for i in range(MAX_WATCH_JOBS + 1)}))
    (err,) = h.take(Error)
    assert err.detail["code"] == "too_many_jobs" and str(MAX_WATCH_JOBS) in err.text
    h.message(Watch(2, 100, {job: -1}))
    (err,) = h.take(Error)
    assert err.detail["code"] == "bad_cursor" and job.hex() in err.text and not h.core.watches.watchers


def test_a_watch_reply_holds_at_most_max_watch_tasks_endings_and_the_cursor_says_where_it_stopped():
    h = Harness()
    n = 6_000
    for j, count in ((1, n), (2, n), (4, 1)):  # finished jobs, made in the ledger directly
        spec = {"count": count}
        h.ledger.apply(SubmitJob(jid(j), jid(j), spec_digest("range", spec), "range", spec, "c", h.now))
        while h.ledger.state.jobs[jid(j)].state == "active":  # a window at a time
            _, s0 = h.ledger.state.fence
            r = h.ledger.apply(AssignTasks(3, s0 + 1, "b", views.ready_tasks(h.ledger.state, h.ledger.work, n), h.now))
            h.ledger.apply(Batch([CompleteTask(jid(j), t, *f, 0, "w", {}, None, None, h.now) for _, t, f in r.value["assigned"]]))
    h.message(Watch(1, 100, {jid(1): 0, jid(2): 0}))
    (reply,) = h.take(QueryReply)
    told = reply.value["jobs"]
    assert len(told[jid(1).hex()]["tasks"]) == n and len(told[jid(2).hex()]["tasks"]) == MAX_WATCH_TASKS - n
    assert told[jid(2).hex()]["cursor"] == MAX_WATCH_TASKS - n and told[jid(2).hex()]["state"] == "done"
    assert told[jid(2).hex()]["more"] is True and told[jid(1).hex()]["more"] is False, "done, but not all told"
    h.message(Watch(2, 100, {jid(1): n, jid(2): MAX_WATCH_TASKS - n}))
    (reply,) = h.take(QueryReply)
    assert reply.value["jobs"][jid(2).hex()]["cursor"] == n and reply.value["jobs"][jid(1).hex()]["tasks"] == []
    h.message(Watch(3, 100, {jid(1): 0, jid(2): 0, jid(3): 0}))
    (reply,) = h.take(QueryReply)
    assert list(reply.value["jobs"]) == [jid(1).hex(), jid(2).hex()] and reply.value["unknown"] == [jid(3).hex()]
    h.message(Watch(4, 100, {jid(1): 0, jid(2): n}))  # a job whose endings do not fit waits for the next watch
    (reply,) = h.take(QueryReply)
    assert reply.value["jobs"][jid(1).hex()]["cursor"] == n and jid(2).hex() in reply.value["jobs"]
    h.message(Watch(5, 100, {jid(2): 0, jid(1): 2_000, jid(4): 0}))
    (reply,) = h.take(QueryReply)
    assert list(reply.value["jobs"]) == [jid(2).hex(), jid(1).hex()], "no room left for job 4's ending: next time"


# ---- files with results -------------------------------------------------------------------------


def test_task_files_travel_with_the_result_and_malformed_ones_are_refused_before_raft():
    h = Harness()
    job, (r0, r1) = running_job(h, 2)
    fid = bytes(range(16))
    h.message(result(r0, files=[[fid, 12, ["s1"], "stdout"]]), BALANCER)
    h.flush()
    (proposal,) = h.proposed
    assert proposal.entry.files == [[fid, 12, ["s1"], "stdout"]]
    h.commit_all()
    assert h.take(ResultAck) and h.ledger.state.named[job] == {f"task-{r0.task_id}.stdout": fid}
    h.message(result(r1, files=[[fid, 12, [], "x"]]), BALANCER)
    (err,) = h.take(Error)
    assert err.reason == AppReason.REFUSED and err.detail == {"code": "bad_files", "task_id": r1.task_id, "job": job.hex()}
    assert "storage node names" in err.text and err.refers_to == TaskResult.code
    assert not h.proposed and not h.core.batcher.queue


def test_work_specs_and_units_are_committed_then_answered_and_read_anywhere():
    from proto.messages import Work

    h = Harness()
    h.message(Work(1, "add_spec", "", {"name": "fetch", "run": {"kind": "call"}, "weight": 2}))
    h.message(Work(2, "add_units", "fetch", [["a", b"1"], ["b", b"2"]], b"k" * 16))
    h.message(Work(3, "add_units", "fetch", [["a", b"dup"]], b"j" * 16))
    assert not h.take(QueryReply), "nothing is answered before it commits"
    h.flush()
    h.commit_all()
    replies = {r.request_id: r.value for r in h.take(QueryReply)}
    assert replies == {1: {"spec": "fetch"}, 2: {"added": 2, "total": 2}}
    (err,) = h.take(Error)
    assert err.request_id == 3 and err.detail["code"] == "duplicate_key"
    h.message(Work(4, "add_units", "fetch", [["a", b"1"], ["b", b"2"]], b"k" * 16))  # a resent batch
    h.flush()
    h.commit_all()
    (again,) = h.take(QueryReply)
    assert again.value == {"added": 2, "total": 2, "again": True}
    follower = Harness(role="follower", ledger=h.ledger)  # a master that holds the same log
    follower.message(Work(5, "summary"))
    (read,) = follower.take(QueryReply)
    assert read.stale == 1 and read.value[0]["spec"] == "fetch" and read.value[0]["total"] == 2
    follower.message(Work(6, "add_spec", "", {"name": "x", "run": {"kind": "call"}}))
    assert follower.take(NotLeader) and not follower.proposed


@pytest.mark.parametrize("op,body,code", [("explode", None, "bad_op"), ("add_units", {"a": 1}, "bad_units"),
                                          ("add_spec", ["x"], "bad_spec"), ("control", "pause", "bad_spec")])
def test_malformed_work_requests_are_refused_before_any_proposal(op, body, code):
    from proto.messages import Work

    h = Harness()
    h.message(Work(7, op, "s", body))
    h.flush()
    (err,) = h.take(Error)
    assert err.request_id == 7 and err.detail["code"] == code and not h.proposed


def test_a_serving_leader_proposes_the_end_of_expired_leases_once_a_second():
    from master.commands import AddUnits, AddWorkSpec, AssignTasks, ExpireLeases

    h = Harness()
    h.ledger.apply(AddWorkSpec({"name": "s", "run": {"kind": "call"}, "lease_s": 5}, 0.0))
    h.ledger.apply(AddUnits("s", [["a", b""]], 0.0))
    wall = h.core.standing.wall(h.now)
    h.ledger.apply(AssignTasks(3, 100, "b1", views.ready_tasks(h.ledger.state, h.ledger.work, 1), wall))
    h.event(TimerFired("expire", "e1"))
    h.flush()
    assert not h.proposed  # the lease has 5 s to go
    h.now += 6.0
    h.event(TimerFired("expire", "e2"))
    h.flush()
    assert len(h.proposed) == 1 and isinstance(h.proposed[0].entry, ExpireLeases)
    h.commit_all()
    assert h.ledger.work.summary()[0]["available"] == 1
    follower = Harness(role="follower")
    follower.ledger.apply(AddWorkSpec({"name": "s", "run": {"kind": "call"}, "lease_s": 5}, 0.0))
    follower.now += 60
    follower.event(TimerFired("expire", "e3"))
    assert not follower.proposed


def test_a_serving_leader_makes_the_units_of_continuous_specs_when_due():
    from master.commands import AddWorkSpec, MakeUnits

    h = Harness()
    h.ledger.apply(AddWorkSpec({"name": "poll", "run": {"kind": "call"}, "continuous": True, "interval": 30}, 0.0))
    h.event(TimerFired("expire", "e1"))
    h.flush()
    assert len(h.proposed) == 1 and isinstance(h.proposed[0].entry, MakeUnits)
    h.commit_all()
    assert h.ledger.work.summary()[0]["available"] == 1
    h.event(TimerFired("expire", "e2"))
    h.flush()
    assert not h.proposed  # its unit waits: nothing more is made
    follower = Harness(role="follower")
    follower.ledger.apply(AddWorkSpec({"name": "poll", "run": {"kind": "call"}, "continuous": True}, 0.0))
    follower.event(TimerFired("expire", "e3"))
    assert not follower.proposed  # only the serving leader's clock makes units


def test_a_units_order_carries_its_specs_need_and_its_replicas_avoid_list_to_the_balancer():
    from balancer.core import _need_of
    from master.commands import AddUnits, AddWorkSpec, AssignTasks, CompleteTask, DONE
    from master.workspec import spec_id

    h = Harness()
    run = {"kind": "command", "argv": ["gpu-job"], "need": {"gpus": 1, "labels": ["cuda"]}}
    h.ledger.apply(AddWorkSpec({"name": "s", "run": run, "replicas": 2}, 0.0))
    h.ledger.apply(AddUnits("s", [["a", b""]], 0.0))
    sid = spec_id("s")
    h.ledger.apply(AssignTasks(3, 100, "b1", [(sid, 0)], 1.0))
    h.ledger.apply(CompleteTask(sid, 0, 3, 100, DONE, "w7", {"digest": b"x" * 16}, None, None, 2.0))
    need, _, why = _need_of(h.core.stream.worker_request(sid, 0, (3, 101)))
    assert why is None and (need.gpus, need.labels, need.avoid) == (1, frozenset({"cuda"}), frozenset({"w7"}))


# ---- a task's story -------------------------------------------------------------------------------


def test_a_tasks_story_tells_each_attempt_in_order_with_its_fence_worker_and_commit_index():
    h = Harness()
    job, (r1,) = running_job(h, 1, {"max_attempts": 2})
    sent_at = h.index  # the assignment's commit
    h.now += 1
    h.message(TaskResult(*split128(job), 0, *(r1.fence_term, r1.fence_sequence), 1, 1, {}, None, "boom", "w1", []),
              BALANCER)
    h.flush()
    h.commit_all()
    failed_at = h.index  # no credit left: the retry waits for it
    h.message(Credit(1, 1, 0), BALANCER)
    h.commit_all()
    (r2,) = h.take(WorkerRequest)
    retried_at = h.index
    h.now += 1
    finish(h, TaskResult(*split128(job), 0, r2.fence_term, r2.fence_sequence, 0, 0, {"v": 1}, None, None, "w2", []))
    story = h.core.story(job, 0)
    first, second = [r1.fence_term, r1.fence_sequence], [r2.fence_term, r2.fence_sequence]
    assert first < second
    assert [(s["step"], s.get("fence"), s["source"]) for s in story] == [
        ("submitted", None, "ledger"),
        ("assigned", first, "ledger"), ("sent", first, "leader"),
        ("result", first, "leader"), ("ended", first, "ledger"), ("recorded", first, "leader"),
        ("assigned", second, "ledger"), ("sent", second, "leader"),
        ("result", second, "leader"), ("ended", second, "ledger"), ("recorded", second, "leader"),
    ]
    by = {(s["step"], tuple(s.get("fence") or ())): s for s in story}
    assert by["ended", tuple(first)]["worker"] == "w1" and by["ended", tuple(first)]["outcome"] == "failed"
    assert by["ended", tuple(first)]["error"] == "boom"
    assert by["ended", tuple(second)]["worker"] == "w2" and by["ended", tuple(second)]["outcome"] == "done"
    assert by["sent", tuple(first)]["log_index"] == sent_at and by["sent", tuple(second)]["log_index"] == retried_at
    assert by["recorded", tuple(first)]["log_index"] == failed_at and by["recorded", tuple(first)]["code"] == "retry"
    assert by["recorded", tuple(second)]["log_index"] == h.index and by["recorded", tuple(second)]["code"] == "recorded"
    assert by["assigned", tuple(first)]["balancer"] == "b1" and by["result", tuple(second)]["worker"] == "w2"
    assert all(s["stimulus_id"] for s in story if s["source"] == "leader")
    assert [s["at"] for s in story] == sorted(s["at"] for s in story)

    h.message(TaskQuery(9, *split128(job), 0))  # what `cluster jobs JOB --task 0` reads
    (reply,) = h.take(QueryReply)
    assert reply.value["story"] == story and reply.value["state"] == "done"
    f = Harness(role="follower")  # another master: the ledger's part only
    f.ledger.state = h.ledger.state
    assert [s["source"] for s in f.core.story(job, 0)] == ["ledger"] * 5


def test_the_leaders_task_log_is_bounded_and_a_story_keeps_the_ledgers_record():
    h = Harness()
    h.core.stream.log = TaskLog(kept=4)
    job, (r,) = running_job(h, 1)
    finish(h, result(r))
    assert [s["step"] for s in h.core.story(job, 0) if s["source"] == "leader"] == ["sent", "result", "recorded"]
    assert [s["step"] for s in h.core.story(job, 0) if s["source"] == "ledger"] == ["submitted", "assigned", "ended"]
    for k in range(10):  # other tasks' steps push the oldest out
        h.core.stream.log.add(jid(k), 0, "sent", h.now, "x")
    assert len(h.core.stream.log) == 4
    assert [s["source"] for s in h.core.story(job, 0)] == ["ledger"] * 3


def test_a_folded_tasks_story_ends_folded_and_a_waiting_ones_says_submitted():
    h = Harness()
    job, (r0, _r1) = running_job(h, 2, {"keep_results": False})
    finish(h, result(r0))
    assert 0 not in h.ledger.state.jobs[job].tasks  # folded away: the ledger keeps only that it is done
    story = h.core.story(job, 0)
    assert story[0]["step"] == "submitted" and story[-1]["step"] == "folded"
    assert [s["step"] for s in story if s["source"] == "leader"] == ["sent", "result", "recorded"]
    assert h.core.story(jid(99), 0) == []


def test_the_task_log_index_drops_exactly_the_oldest_events():
    """The log is indexed by task (a story reads one task's events, not the whole log): the
    index must forget what the bounded order forgets, event for event."""
    log = TaskLog(kept=50)
    rng = random.Random(3)
    every: list[tuple[bytes, int, int]] = []
    for n in range(500):
        key = (jid(rng.randrange(5)), rng.randrange(4))
        log.add(*key, "proposed", float(n), f"s{n}")
        every.append((*key, n))
        kept = every[-50:]
        assert len(log) == len(kept) == sum(len(v) for v in log.by_task.values())
    for job in {j for j, _, _ in every}:
        for task in range(4):
            want = [n for j, t, n in kept if (j, t) == (job, task)]
            assert [int(e["at"]) for e in log.of(job, task)] == want


def test_an_older_balancers_attach_is_refused_naming_the_epoch_it_must_outbid():
    h = Harness()
    attach(h, 1, epoch=10)
    h.message(Attach(1, 7, 1, "b2"), b"other-balancer")
    (err,) = h.take(Error)
    assert (err.refers_to, err.detail) == (Attach.code, {"code": "stale_balancer", "epoch": 10})
    assert h.core.stream.balancer.epoch == 10  # the attached stream stays as it was


def test_a_barrier_that_does_not_commit_in_time_is_proposed_again_and_the_leader_serves():
    """Chaos soak (seed 5): a new leader's Barrier waited on followers catching up from a
    snapshot for longer than PROPOSAL_TIMEOUT; its proposal expired, its late commit answered
    nothing, and the leader never served in its term (every write refused, for good)."""
    h = Harness()
    h.raft = RaftView("leader", 4, "10.0.0.1:6000", True)
    h.event(TimerFired("raft", "t"))
    (barrier,) = h.proposed
    h.now += 6.0
    h.event(TimerFired("expire", "x"))  # unanswered: the followers are far behind
    h.event(TimerFired("raft", "t"))
    assert len(h.proposed) == 2 and h.core.standing.serving_term != 4
    h.commit_all()  # the first commits late (answering nothing), then the second
    assert h.core.standing.serving() and h.core.standing.serving_term == 4
    h.event(TimerFired("raft", "t"))
    assert not h.proposed  # serving: no more Barriers


def test_group_commit_queues_what_arrives_while_a_proposal_is_in_flight_and_sends_it_as_one_entry():
    """At most one proposal in flight: completions and the assignments they make room for wait
    for it and then go together, one Raft entry (master.batching); an idle leader waits for no one."""
    h = Harness()
    h.message(submit(1, spec={"count": 20}))
    h.flush()
    h.commit_all()
    attach(h, 4)
    requests = h.take(WorkerRequest)
    assert len(requests) == 4
    results = [TaskResult(r.job_uuid_upper, r.job_uuid_lower, r.task_id, r.fence_term, r.fence_sequence,
                          0, 0, {}, None, None, "w1") for r in requests]
    h.message(results[0], BALANCER)
    h.flush()
    assert len(h.proposed) == 1, "an idle leader proposes a lone completion at once"
    for r in results[1:]:  # arrive while the first completion is in flight
        h.message(r, BALANCER)
    h.flush()
    assert len(h.proposed) == 1, "nothing more is proposed while one proposal is in flight"
    first = h.proposed.pop(0)
    h.index += 1
    h.event(Committed(first.token, h.ledger.apply(first.entry), h.index, "c-first"))
    assert h.flush_armed, "once it commits, what queued goes at the next flush"
    h.flush()
    (entry,) = [p.entry for p in h.proposed]
    assert isinstance(entry, Batch) and [type(c) for c in entry.commands] == [CompleteTask] * 3
    h.commit_all()
    assert sum(len(m.acks()) for m in h.take(ResultAck)) == 4


def test_a_batch_of_results_good_stale_duplicate_and_unknown_is_answered_one_by_one():
    """A MESSAGE_BATCH from the balancer, unpacked as the node loop does (``Codec.unbatch``):
    every result keeps its own fence and is recorded, acknowledged or refused on its own, and
    one commit records the good ones (issue 23)."""
    h = Harness()
    h.message(submit(1, spec={"count": 4}))
    h.flush()
    h.commit_all()
    attach(h, 4)
    r = h.take(WorkerRequest)

    def result(req, sequence=None, upper=None):
        return TaskResult(req.job_uuid_upper if upper is None else upper, req.job_uuid_lower, req.task_id,
                          req.fence_term, req.fence_sequence if sequence is None else sequence, 0, 0,
                          {"v": req.task_id}, None, None, "w1")

    mix = [result(r[0]), result(r[1], sequence=r[1].fence_sequence + 99), result(r[0]),
           result(r[2], upper=r[2].job_uuid_upper ^ 1), result(r[3])]
    codec = Codec(5)
    batch = codec.decode(codec.encode(codec.batch(mix)))[1]
    for _, message in codec.unbatch(batch):
        h.message(message, BALANCER)
    h.flush()
    assert len(h.proposed) == 1 and len(h.proposed[0].entry.commands) == 5, "one entry for the batch"
    h.commit_all()
    acked = {a[2] for m in h.take(ResultAck) for a in m.acks()}
    refused = {e.detail["task_id"]: e.detail["code"] for e in h.take(Error)}
    assert acked == {r[0].task_id, r[3].task_id}
    assert refused == {r[1].task_id: "stale_fence", r[2].task_id: "unknown_job"}
    job = h.ledger.state.jobs[join128(r[0].job_uuid_upper, r[0].job_uuid_lower)]
    assert [job.tasks[x.task_id].state.name for x in r] == ["DONE", "ASSIGNED", "ASSIGNED", "DONE"]
    assert len(job.tasks[r[0].task_id].attempts) == 1, "the duplicate is acknowledged, not recorded twice"


def test_an_entry_is_cut_before_its_encoding_passes_the_byte_bound(monkeypatch):
    """Group commit makes large entries; each stays under ENTRY_MAX_BYTES (far below the size at
    which pysyncobj sends an entry in pieces), and every command is proposed exactly once."""
    from master import batching
    from master.commands import encode

    monkeypatch.setattr(batching, "ENTRY_MAX_BYTES", 4096)
    h = Harness()
    for rid in range(1, 41):
        h.message(submit(rid, spec={"count": 1, "note": "x" * 300}))
    h.flush()
    sizes = [len(encode(p.entry)) for p in h.proposed]
    assert len(sizes) > 1 and all(n <= 4096 for n in sizes)
    assert all(p.data == encode(p.entry) for p in h.proposed), "encoded once, by the batcher"
    assert sum(len(p.entry.commands) if isinstance(p.entry, Batch) else 1 for p in h.proposed) == 40
    h.commit_all()
    assert len(h.take(SubmitAck)) == 40


def test_a_balancer_attaching_again_while_assignments_commit_gets_them_once_and_nothing_is_proposed_twice():
    """Pipelined assignments went to the old connection; a balancer that attaches again (same
    epoch, new route: it reconnected) gets them when they commit, and the tasks in flight are not
    proposed a second time under new tokens (bench/ledger.py's echo found it)."""
    h = Harness()
    h.message(submit(1, spec={"count": 3}))
    h.flush()
    h.commit_all()
    h.message(Attach(1, 1, 3, "b1"), BALANCER)
    first = h.take(WorkerRequest)
    assert len(first) == 3
    h.flush()
    assert len(h.proposed) == 1
    h.message(Attach(2, 1, 3, "b1"), b"b1-again")  # before the entry commits
    h.flush()
    assert len(h.proposed) == 1, "nothing proposed twice"
    h.sent.clear()
    h.commit_all()
    again = [s for s in h.sent if isinstance(s.message, WorkerRequest)]
    assert {s.route for s in again} == {b"b1-again"}
    assert sorted((s.message.task_id, s.message.fence_sequence) for s in again) == \
        sorted((r.task_id, r.fence_sequence) for r in first), "the same tokens, to the new connection"


def assignment_in_doubt() -> tuple[Harness, WorkerRequest, Propose]:
    """One task sent under its first token, whose entry was answered "failed" by timeout (it may
    still commit), and credit for it again: what the next two tests start from."""
    h = Harness()
    h.message(submit(1, spec={"count": 1}))
    h.flush()
    h.commit_all()
    h.message(Attach(1, 1, 1, "b1"), BALANCER)
    (first,) = h.take(WorkerRequest)
    h.flush()
    (proposal,) = h.proposed
    h.proposed.clear()
    h.event(ProposalFailed(proposal.token, "no commit within 5 s", "f"))  # outcome unknown
    h.message(Credit(1, 1, 0), BALANCER)
    assert not h.take(WorkerRequest), "a task whose assignment is in doubt is not sent again before it commits"
    return h, first, proposal


def test_an_assignment_whose_outcome_was_unknown_and_that_commits_late_is_the_one_the_worker_runs():
    """A proposal answered 'failed' may still commit (a timeout: outcome unknown). Its tasks go
    back to the ready set and may be proposed again; the new tokens must not go out before they
    commit, or the worker runs the task under a token the ledger skips while the first entry's
    attempt, committed after all, has no one running it (seen as tasks never ending after
    leader moves, issue 23)."""
    h, first, late = assignment_in_doubt()
    h.flush()
    (again,) = h.proposed
    h.proposed.clear()
    h.index += 1
    h.ledger.apply(late.entry)  # the first entry commits after all ...
    h.index += 1
    h.event(Committed(again.token, h.ledger.apply(again.entry), h.index, "c-again"))  # ... and the second skips it
    assert not h.take(WorkerRequest), "the skipped tokens never go out"
    job = h.ledger.state.jobs[join128(first.job_uuid_upper, first.job_uuid_lower)]
    (attempt,) = job.tasks[first.task_id].attempts
    assert (attempt.fence_term, attempt.fence_sequence) == (first.fence_term, first.fence_sequence), \
        "the worker's token is the committed attempt's"


def test_a_task_in_doubt_proposed_again_goes_out_once_its_new_assignment_commits():
    h, first, _lost = assignment_in_doubt()  # and it never commits
    h.commit_all()
    (sent,) = h.take(WorkerRequest)
    assert (sent.task_id, sent.fence_sequence) == (first.task_id, first.fence_sequence + 1)
    job = h.ledger.state.jobs[join128(sent.job_uuid_upper, sent.job_uuid_lower)]
    (attempt,) = job.tasks[sent.task_id].attempts
    assert (attempt.fence_term, attempt.fence_sequence) == (sent.fence_term, sent.fence_sequence)
