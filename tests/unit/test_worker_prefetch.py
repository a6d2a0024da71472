"""The worker's prefetch queue (worker.prefetch) driven through the core: it grows for short tasks
behind a slow dispatch round trip, stays small for long tasks (even a burst after short ones), is
bounded, announced at once when it grew, and stays put when fixed. No sockets, no sleeps: time is
the harness's ``now``. Also the core's time limits (TaskTimed, StopTask)."""

from __future__ import annotations

import heapq

from cluster.node.events import CancelTimer, MessageReceived, Started, StartTimer, TimerFired
from proto.ids import split128
from proto.messages import Heartbeat, TaskResult, WorkerRequest, WorkerStatus
from worker.core import RunTask, StopTask, TaskEnded, TaskTimed, WorkerCore, WorkerIdentity, WorkerOptions
from worker.prefetch import PREFETCH_SAFETY, Prefetch

JOB = bytes(range(16))


class Worker:
    """A registered worker core with ``slots`` slots and a queue of ``floor``..``ceiling``."""

    def __init__(self, slots: int = 2, floor: int = 2, ceiling: int = 128) -> None:
        self.core = WorkerCore(WorkerIdentity("w1", slots, 2, 1024, prefetch=floor, prefetch_max=ceiling), 2,
                               WorkerOptions(interval=0.25, liveness=1.0, result_retry=2.0))
        self.now = 0.0
        self.out: list = []
        self.next_task = 0
        self.event(Started("s"))
        self.event(MessageReceived("b0", None, 1, Heartbeat(42, 0, 1), "m"))
        assert self.core.registered

    def event(self, ev) -> list:
        effects = self.core.handle(ev, self.now)
        self.out += effects
        self.core.validate_state()
        return effects

    def request(self, task: int | None = None) -> list:
        if task is None:
            task, self.next_task = self.next_task, self.next_task + 1
        up, lo = split128(JOB)
        return self.event(MessageReceived("b0", None, 1, WorkerRequest(up, lo, task, 5, task + 1, 0, 0, "call", b"", [],
                                                                         {}), "m"))

    def end(self, task: int) -> list:
        return self.event(TaskEnded(JOB, task, (5, task + 1), 0, 0, {}, None, None, [], (), "e"))

    def running(self) -> list[int]:
        return sorted(k[1] for k in self.core.running)

    def heartbeats(self) -> list[WorkerStatus]:
        return [e.message for e in self.out if isinstance(getattr(e, "message", None), WorkerStatus)]

    def drain(self, seconds: float, task_s: float, round_trip_s: float) -> int:
        """Simulate ``seconds``: each task runs ``task_s`` on its slot; a balancer with work always
        waiting keeps the worker's tasks (held or on the way) up to the credit its last heartbeat
        stated, a result or heartbeat reaching it half a round trip after it was sent and a task
        the worker the other half later (as balancer.registry does). Tasks done."""
        events: list = []  # (time, seq, kind, value), a heap
        seq = iter(range(1 << 30))
        balancer = {"credit": self.core._credit(), "outstanding": 0}

        def top_up(at: float) -> None:
            while balancer["outstanding"] < balancer["credit"]:
                balancer["outstanding"] += 1
                heapq.heappush(events, (at + round_trip_s / 2, next(seq), "request", None))

        def handle(effects: list) -> None:
            for e in effects:
                message = getattr(e, "message", None)
                if isinstance(e, RunTask):
                    heapq.heappush(events, (self.now + task_s, next(seq), "end", e.request.task_id))
                elif isinstance(message, (TaskResult, WorkerStatus)):
                    heapq.heappush(events, (self.now + round_trip_s / 2, next(seq), "at_balancer", message))
                elif isinstance(e, StartTimer):
                    heapq.heappush(events, (self.now + e.delay, next(seq), "timer", e.name))

        done = 0
        balancer["outstanding"] = len(self.core.running) + len(self.core.queued)
        top_up(self.now - round_trip_s / 2)
        heapq.heappush(events, (self.now + self.core.options.interval, next(seq), "timer", "tick"))
        end_at = self.now + seconds
        while events and events[0][0] <= end_at:
            self.now, _, kind, value = heapq.heappop(events)
            if kind == "request":
                handle(self.request())
            elif kind == "end":
                done += 1
                handle(self.end(value))
            elif kind == "at_balancer":
                if isinstance(value, TaskResult):
                    balancer["outstanding"] -= 1
                else:  # a heartbeat: the credit now, and the balancer's heartbeat back (it lives)
                    balancer["credit"] = value.slots_total
                    heapq.heappush(events, (self.now + round_trip_s / 2, next(seq), "alive", None))
                top_up(self.now)
            elif kind == "alive":
                handle(self.event(MessageReceived("b0", None, 1, Heartbeat(42, 1, 0), "m")))
            elif value == "tick" or value == "status":
                handle(self.event(TimerFired(value, "t")))
        return done


def test_short_tasks_behind_a_slow_round_trip_get_a_deep_queue_and_keep_the_slots_busy():
    # 2 slots, 0.5 ms tasks, 5 ms round trip: a fixed queue of 2 (credit 4) lets 4 tasks through
    # per round trip, ~730/s of the 4,000/s the slots could run
    fixed = Worker(slots=2, floor=2, ceiling=0)
    assert fixed.drain(0.5, task_s=0.0005, round_trip_s=0.005) < 0.2 * 2000
    w = Worker(slots=2, floor=2, ceiling=128)
    done = w.drain(0.5, task_s=0.0005, round_trip_s=0.005)
    depth = w.core.prefetch.depth
    # Little's law: 2 slots x 5 ms / 0.5 ms = 20 tasks to cover one round trip, times the safety
    assert 20 <= depth <= PREFETCH_SAFETY * 20 + 1
    assert done > 0.85 * 2000  # the slots were busy 85% of the half second, ramp-up included
    assert not w.core.counters.get("queued_beyond_credit")  # no task came beyond the credit
    assert any(isinstance(e, StartTimer) and e.name == "status" and e.delay == 0 for e in w.out)  # told at once
    assert w.heartbeats()[-1].slots_total == 2 + depth  # the credit it takes now
    status = w.core.status(w.now)
    assert status["prefetch"] == depth and status["prefetch_range"] == [2, 128]
    # the lower quartile of the round trips (some pair a heartbeat's top-up with an older result)
    assert 0.002 < status["round_trip_s"] <= 0.005 and 0.0004 < status["task_s"] < 0.0006


def test_long_tasks_keep_the_small_queue():
    w = Worker(slots=2, floor=2, ceiling=128)
    assert w.drain(100.0, task_s=10.0, round_trip_s=0.005) == 20  # 2 slots x 100 s / 10 s: the slots never waited
    assert w.core.prefetch.depth == 2
    assert {hb.slots_total for hb in w.heartbeats()} == {4}


def test_the_queue_never_passes_its_ceiling():
    w = Worker(slots=2, floor=2, ceiling=16)
    w.drain(0.5, task_s=0.0001, round_trip_s=0.05)
    assert w.core.prefetch.depth == 16 and max(hb.slots_total for hb in w.heartbeats()) == 18


def test_a_burst_of_long_tasks_after_short_ones_shrinks_the_queue_before_the_first_ends():
    w = Worker(slots=2, floor=2, ceiling=128)
    w.drain(0.3, task_s=0.0005, round_trip_s=0.005)
    assert w.core.prefetch.depth > 10 and w.core.queued
    w.now += 2.0  # the tasks running now turned out long: 2 s old, far past the 0.5 ms expected
    w.event(MessageReceived("b0", None, 1, Heartbeat(42, 1, 0), "m"))  # the balancer lives
    w.event(TimerFired("tick", "t"))  # the next heartbeat (every 0.25 s) says so
    assert w.core.prefetch.depth == 2 and w.running()
    assert w.heartbeats()[-1].slots_total == 4


def test_waits_for_work_that_was_not_there_do_not_count_as_round_trips():
    p = Prefetch(slots=2, floor=2, ceiling=128)
    t = 0.0
    for i in range(32):
        p.credit_returned(t)
        t += 30.0 if i % 4 == 0 else 0.004  # one in four requests came only when new work did
        p.task_received(t)
    assert abs(p.round_trip_s - 0.004) < 1e-9


def test_a_fixed_prefetch_never_moves():
    w = Worker(slots=2, floor=3, ceiling=0)
    w.drain(0.5, task_s=0.0001, round_trip_s=0.05)
    assert w.core.prefetch.depth == 3 and not w.core.prefetch.adaptive
    assert {hb.slots_total for hb in w.heartbeats()} == {5}


def test_a_task_with_a_time_limit_is_stopped_then_killed_and_its_timers_go_with_it():
    w = Worker(slots=1, floor=1, ceiling=0)
    w.request(0)
    assert [e.request.task_id for e in w.out if isinstance(e, RunTask)] == [0]
    effects = w.event(TaskTimed(JOB, 0, 2.0, 4.0))
    timers = {e.name: e.delay for e in effects if isinstance(e, StartTimer)}
    assert set(timers.values()) == {2.0, 4.0}
    term = next(n for n, d in timers.items() if d == 2.0)
    kill = next(n for n, d in timers.items() if d == 4.0)
    assert w.event(TimerFired(term, "t")) == [StopTask(JOB, 0, False, "t")]
    assert w.event(TimerFired(kill, "t2")) == [StopTask(JOB, 0, True, "t2")]
    ended = w.end(0)
    assert {e.name for e in ended if isinstance(e, CancelTimer)} == {term, kill}
    assert w.event(TimerFired(kill, "late")) == []  # a timer of a task that ended stops nothing
    assert [s["step"] for s in w.core.story(JOB, 0)][2:4] == ["stopped", "killed"]
    assert w.core.counters["tasks_stopped"] == w.core.counters["tasks_killed"] == 1


def test_a_command_is_only_killed_late_its_slot_enforces_its_timeout():
    w = Worker(slots=1, floor=1, ceiling=0)
    w.request(0)
    effects = w.event(TaskTimed(JOB, 0, None, 9.0))
    assert [e.delay for e in effects if isinstance(e, StartTimer)] == [9.0]
    assert not any(isinstance(e, StartTimer) for e in w.event(TaskTimed(JOB, 7, 1.0, 2.0)))  # not running here
    assert len([m for m in (e.message for e in w.end(0) if hasattr(e, "message")) if isinstance(m, TaskResult)]) == 1


def test_the_queue_does_not_wobble_with_its_estimates():
    """Round trips and durations vary from task to task; a queue that followed each wobble would
    change the credit every heartbeat and leave tasks in flight beyond it."""
    p = Prefetch(slots=2, floor=2, ceiling=128)
    p.task_ended(0.001)
    p.round_trip_s = 0.005
    p.update(0.0)
    settled = p.depth
    assert settled == int(PREFETCH_SAFETY * 2 * 0.005 / 0.001) + 1
    for factor in (0.9, 1.0, 0.8, 1.0, 0.95):  # a little less wanted: kept
        p.round_trip_s = 0.005 * factor
        p.update(0.0)
        assert p.depth == settled
    p.round_trip_s = 0.005 * 0.5  # half as much: it shrinks
    p.update(0.0)
    assert p.depth < settled
