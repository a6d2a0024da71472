"""The worker core driven directly: registration and failover between the two balancers,
credit, fencing, results kept until acknowledged. No sockets, no sleeps."""

from __future__ import annotations

from cluster.node.events import MessageReceived, Send, Started, TimerFired
from proto.ids import split128
from proto.messages import Error, Heartbeat, NotLeader, ResultAck, TaskResult, WorkerRequest, WorkerStatus
from worker.core import RunTask, TaskEnded, WorkerCore, WorkerIdentity, WorkerOptions

JOB = bytes(range(16))


class Harness:
    def __init__(self, slots: int = 1, prefetch: int = 1) -> None:
        self.core = WorkerCore(WorkerIdentity("w1", slots, 2, 1024, prefetch=prefetch), 2,
                               WorkerOptions(interval=0.25, liveness=1.0, result_retry=2.0))
        self.now = 0.0
        self.out: list = []
        self.event(Started("s"))

    def event(self, ev) -> list:
        effects = self.core.handle(ev, self.now)
        self.out += effects
        self.core.validate_state()
        return effects

    def msg(self, socket: str, m) -> list:
        return self.event(MessageReceived(socket, None, 1, m, "m"))

    def tick(self, dt: float = 0.25) -> list:
        self.now += dt
        return self.event(TimerFired("tick", "t"))

    def accepted(self, socket: str = "b0") -> list:
        return self.msg(socket, Heartbeat(42, 0, 1))

    def request(self, task: int, fence=(5, 1), socket: str = "b0") -> list:
        up, lo = split128(JOB)
        return self.msg(socket, WorkerRequest(up, lo, task, fence[0], fence[1], 0, 0, "call", b"", [], {}))

    def end(self, task: int, fence=(5, 1), outcome: int = 0) -> list:
        return self.event(TaskEnded(JOB, task, fence, outcome, 0, {"v": task}, None, None, [], (), "e"))

    def sent(self, kind, socket=None) -> list:
        return [e.message for e in self.out if isinstance(e, Send) and isinstance(e.message, kind)
                and (socket is None or e.socket == socket)]

    def runs(self) -> list:
        return [e.request.task_id for e in self.out if isinstance(e, RunTask)]


def registered(slots: int = 1, prefetch: int = 1) -> Harness:
    h = Harness(slots, prefetch)
    h.accepted()
    assert h.core.registered
    return h


def test_it_registers_with_the_primary_first_with_its_capabilities():
    h = Harness()
    reg = h.sent(WorkerStatus, "b0")
    assert reg and reg[0].register and reg[0].name == "w1" and reg[0].capabilities["cores"] == 2
    assert reg[0].slots_total == 2  # 1 slot + 1 prefetched


def test_a_passive_balancer_sends_it_to_the_other_one():
    h = Harness()
    h.msg("b0", NotLeader(0, 0, "tcp://b2"))
    h.tick()
    assert h.sent(WorkerStatus, "b1")[-1].register


def test_a_silent_balancer_makes_it_turn_to_the_other_and_register_there():
    h = registered()
    for _ in range(5):
        h.tick()
    assert h.core.current == 1 and not h.core.registered
    assert h.sent(WorkerStatus, "b1")[-1].register


def test_tasks_run_up_to_the_slots_and_the_prefetched_wait_in_line():
    h = registered(slots=1, prefetch=1)
    h.request(0, (5, 1))
    h.request(1, (5, 2))
    assert h.runs() == [0]
    h.end(0, (5, 1))
    assert h.runs() == [0, 1]
    assert h.sent(TaskResult, "b0")[0].task_id == 0


def test_a_stale_token_is_refused_and_a_duplicate_not_run_twice():
    h = registered(slots=2)
    h.request(0, (5, 3))
    h.request(0, (5, 3))  # the same assignment again
    h.request(0, (4, 9))  # an older leader's
    assert h.runs() == [0]
    assert h.core.counters["duplicate_requests"] == 1 and h.core.counters["stale_requests"] == 1


def test_results_are_kept_until_acknowledged_and_resent_meanwhile():
    h = registered()
    h.request(0)
    h.end(0)
    assert len(h.sent(TaskResult)) == 1
    for _ in range(9):
        h.tick()
        h.msg("b0", Heartbeat(42, 1, 0))
    assert len(h.sent(TaskResult)) >= 2  # resent after result_retry
    up, lo = split128(JOB)
    h.msg("b0", ResultAck(up, lo, 0, 5, 1))
    assert not h.core.held


def test_a_request_for_a_task_it_already_finished_resends_the_result_not_the_work():
    h = registered()
    h.request(0)
    h.end(0)
    h.request(0)  # a new balancer, told by the master, asks again before the ack came
    assert h.runs() == [0]
    assert len(h.sent(TaskResult)) == 2


def test_after_failover_it_reports_what_it_runs_and_resends_unacknowledged_results():
    h = registered(slots=2)
    h.request(0, (5, 1))
    h.request(1, (5, 2))
    h.end(0, (5, 1))
    for _ in range(5):  # b0 dies
        h.tick()
    reg = h.sent(WorkerStatus, "b1")[-1]
    assert sorted(t[1] for t in reg.tasks) == [0, 1]
    h.accepted("b1")
    assert [m.task_id for m in h.sent(TaskResult, "b1")] == [0]


def test_a_final_refusal_of_a_result_drops_it():
    h = registered()
    h.request(0)
    h.end(0)
    h.msg("b0", Error(0, 1003, TaskResult.code, "stale", {"code": "stale_fence", "job": JOB.hex(), "task_id": 0}))
    assert not h.core.held


def test_an_unknown_worker_error_makes_it_register_again():
    h = registered()
    n = len(h.sent(WorkerStatus))
    h.msg("b0", Error(0, 1000, WorkerStatus.code, "who?", {"code": "not_registered"}))
    assert h.sent(WorkerStatus)[n:][0].register


def test_the_result_is_the_credit_and_the_next_heartbeat_restates_it():
    h = registered()
    h.request(0)
    effects = h.end(0)
    assert [type(e.message).__name__ for e in effects if isinstance(e, Send)] == ["TaskResult"]  # one message
    h.tick()
    hb = h.sent(WorkerStatus, "b0")[-1]
    assert not hb.register and hb.slots_free == 2 and hb.received == 1


def test_a_tasks_story_tells_what_the_worker_did_with_it_in_order():
    h = registered(slots=1, prefetch=1)
    h.request(0, (5, 1))
    h.request(1, (5, 2))  # waits for the slot
    h.request(1, (4, 9))  # an older leader's token for it
    h.now += 1.5
    h.end(0, (5, 1))
    h.end(1, (5, 2), outcome=1)
    up, lo = split128(JOB)
    h.msg("b0", ResultAck(up, lo, 0, 5, 1))
    zero = h.core.story(JOB, 0)
    assert [s["step"] for s in zero] == ["received", "started", "ended", "result_sent", "acked"]
    assert all(s.get("fence", [5, 1]) == [5, 1] for s in zero) and all(s["stimulus_id"] for s in zero)
    assert zero[1]["running"] == 1 and zero[2]["outcome"] == 0 and zero[2]["seconds"] == 1.5
    assert zero[3]["balancer"] == 0 and zero[-1]["at"] == 1.5
    one = h.core.story(JOB, 1)
    assert [s["step"] for s in one] == ["received", "queued", "received", "refused", "started", "ended", "result_sent"]
    assert one[3]["code"] == "stale_fence" and one[3]["newest"] == [5, 2] and one[5]["outcome"] == 1
    assert h.core.story(JOB, 2) == []


def test_a_result_held_while_unregistered_is_told_as_held_then_resent():
    h = registered()
    h.request(0)
    h.msg("b0", NotLeader(0, 0, "tcp://b2"))  # b0 turned passive while the task ran
    h.end(0)
    h.tick()
    h.accepted("b1")
    assert [s["step"] for s in h.core.story(JOB, 0)][-2:] == ["result_held", "result_resent"]
    assert h.core.story(JOB, 0)[-1]["balancer"] == 1


def test_free_counts_task_slots_and_never_passes_them():
    """`cluster status` read a worker's free credit (slots + prefetch) as its free slots: 2 slots
    showed free 4. Free is task slots now; the credit left is beside it."""
    h = registered(slots=2, prefetch=2)
    status = h.core.status(h.now)
    assert (status["slots"], status["free"], status["credit_free"]) == (2, 2, 4)
    h.request(1, fence=(5, 1))
    status = h.core.status(h.now)
    assert status["free"] == 2 - len(h.core.running) and status["free"] <= status["slots"]
    assert status["credit_free"] == 3


def test_a_newer_token_for_a_task_whose_result_is_held_runs_it_again_and_drops_the_stale_result():
    """Seen in the chaos soak (seed 2): a worker cut off from the balancers held a result; the
    masters recorded that attempt lost and gave the task a newer token, and the balancer sent it
    to the same worker, which resent the old result (refused as stale, then dropped) and ran
    nothing: the unit stayed pending until its lease ran out."""
    h = registered()
    h.request(0, (5, 1))
    h.end(0, (5, 1))
    h.request(0, (6, 1))
    assert h.runs() == [0, 0] and h.core.counters["held_superseded"] == 1
    assert not h.core.held and [s["step"] for s in h.core.story(JOB, 0)][-3:] == ["received", "superseded", "started"]
    h.end(0, (6, 1))
    assert [(m.fence_term, m.fence_sequence) for m in h.sent(TaskResult)] == [(5, 1), (6, 1)]


def test_a_newer_token_for_a_task_it_runs_or_queues_makes_that_run_the_new_attempt():
    h = registered(slots=1, prefetch=1)
    h.request(0, (5, 1))
    h.request(1, (5, 2))  # waits in line
    h.request(0, (6, 1))  # the masters recorded (5, 1) lost and sent the task here again
    h.request(1, (6, 2))
    assert h.runs() == [0] and h.core.counters["duplicate_requests"] == 2
    h.end(0, (5, 1))
    h.end(1, (5, 2))
    assert [(m.task_id, m.fence_term, m.fence_sequence) for m in h.sent(TaskResult)] == [(0, 6, 1), (1, 6, 2)]
