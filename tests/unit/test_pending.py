"""Why assigned tasks are not running yet (issue 21): the balancer tells the leader which tasks
wait and why (TASK_WAITING), and job views say "waiting" with the reason, not "running"."""

from __future__ import annotations

from master.pending import STALE_S, WaitingBoard
from proto.ids import join128
from cluster.node.events import Refuse
from proto.messages import Heartbeat, JobList, JobQuery, QueryReply, TaskWaiting

from .test_balancer_core import JOB, active
from .test_master_core import BALANCER, Harness, attach, submit


def test_a_balancer_tells_the_master_what_waits_and_why_once_a_second_and_once_more_when_done():
    h = active()
    h.register("w1", cores=2)
    h.request(0, (5, 1), need={"cores": 64})
    h.tick(1.0)
    (told,) = h.sent(TaskWaiting)
    assert told.message.total == 1 and told.message.jobs == [[JOB, 1, "no worker has 64 cores (the most is 2)"]]
    h.out.clear()
    h.tick(0.25)
    assert not h.sent(TaskWaiting), "at most once a second"
    h.register("w2", cores=64)  # a big enough worker comes: the task goes to it
    h.msg("m0", Heartbeat(5, 1, 1))  # the master is alive
    h.tick(1.0)
    (told,) = h.sent(TaskWaiting)
    assert (told.message.total, told.message.jobs) == (0, [])  # once, to clear the master's view
    h.out.clear()
    h.msg("m0", Heartbeat(5, 2, 1))
    h.tick(1.0)
    assert not h.sent(TaskWaiting)


def test_no_worker_registered_is_a_reason_too():
    h = active()
    h.request(0, (5, 1))
    h.tick(1.0)
    (told,) = h.sent(TaskWaiting)
    assert told.message.jobs == [[JOB, 1, "no worker registered"]]


def _job_with_assigned_tasks(h: Harness, n: int = 3) -> bytes:
    h.message(submit(1, spec={"count": n}))
    h.flush()
    h.commit_all()
    attach(h, n)
    h.commit_all()
    return next(iter(h.ledger.state.jobs))


def test_the_leader_shows_waiting_tasks_with_their_reason_and_forgets_a_silent_balancers_word():
    h = Harness()
    job = _job_with_assigned_tasks(h)
    h.message(TaskWaiting(2, [[job, 2, "no worker has 64 cores (the most is 2)"]]), BALANCER)
    up, lo = int.from_bytes(job[:8], "big"), int.from_bytes(job[8:], "big")
    assert join128(up, lo) == job
    h.message(JobQuery(5, up, lo))
    (view,) = [r.value for r in h.take(QueryReply) if r.request_id == 5]
    assert (view["assigned"], view["waiting"], view["running"]) == (3, 2, 1)
    assert view["waiting_reasons"] == [{"tasks": 2, "reason": "no worker has 64 cores (the most is 2)"}]
    h.message(JobList(6, 10, None))
    (listed,) = [r.value for r in h.take(QueryReply) if r.request_id == 6]
    assert listed[0]["waiting"] == 2
    h.now += STALE_S + 1  # the balancer fell silent: its word no longer stands
    h.message(JobQuery(7, up, lo))
    (view,) = [r.value for r in h.take(QueryReply) if r.request_id == 7]
    assert (view["waiting"], view["running"], view["waiting_reasons"]) == (0, 3, [])


def test_only_the_attached_balancer_is_heard_and_a_malformed_report_changes_nothing():
    h = Harness()
    job = _job_with_assigned_tasks(h)
    for route, rows in ((b"another-route", [[job, 1, "x"]]), (BALANCER, [[b"short", 1, "x"]])):
        effects = h.message(TaskWaiting(1, rows), route)
        assert [type(e) for e in effects] == [Refuse], effects  # the loop answers ERROR, logs and counts it
    assert h.core.waiting.by_job == {}


def test_a_board_caps_waiting_at_what_is_assigned_and_an_ended_job_waits_for_nothing():
    board = WaitingBoard()
    job = bytes(range(16))
    assert board.update(9, [[job, 9, "r"]], 0.0) is None
    view = {"job": job.hex(), "state": "active", "assigned": 4}
    assert board.annotate(view, 1.0)["waiting"] == 4 and board.annotate(view, 1.0)["running"] == 0
    assert board.annotate({**view, "state": "cancelled"}, 1.0)["waiting"] == 0
