"""worker.slotpool: the worker's slots driven from its loop. A stand-in loop (a poll over the
descriptors the pool hands it) plays the node loop; the slots' children are real processes.
What is checked: the core's events come out in order (OutputRead while a task prints,
TaskTimed for a task with a time limit, TaskEnded once its result is made), a plain task costs
no thread at all, a task that stores files finishes off the loop's thread, and a slot is free
again only when its task has ended."""

from __future__ import annotations

import select
import sys
import threading
import time

import cloudpickle
import pytest

from proto.ids import split128
from proto.messages import WorkerRequest
from worker.core import OutputRead, RunTask, StopTask, TaskEnded, TaskTimed
from worker.slotpool import SlotPool
from tests.unit.test_executor import exits_soon
from worker.tasks import DONE, FAILED, TaskRunner

JOB = bytes(range(16))


class Loop:
    """The part of ``NodeLoop`` the pool uses, and a poll over the readers it was given."""

    def __init__(self) -> None:
        self.readers: dict = {}
        self.stimuli = 0

    def add_reader(self, fd: int, on_readable) -> None:
        self.readers[fd] = on_readable

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def stimulus(self, kind: str) -> str:
        self.stimuli += 1
        return f"{kind}-{self.stimuli}"

    def until(self, done, timeout: float = 30.0) -> list:
        """Poll and hand out readable descriptors, as the loop does, until ``done(events)``."""
        events: list = []
        deadline = time.monotonic() + timeout
        while not done(events):
            wait = deadline - time.monotonic()
            assert wait > 0, f"nothing came within {timeout} s; so far {events}"
            poller = select.poll()
            for fd in self.readers:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(int(wait * 1000) + 1):
                reader = self.readers.get(fd)  # a reader removed by an earlier one is not called
                if reader is not None:
                    events += reader() or []
        return events


def ended(events: list) -> list[TaskEnded]:
    return [e for e in events if isinstance(e, TaskEnded)]


def call(task: int, fn, *args, **task_args) -> RunTask:
    up, lo = split128(JOB)
    program = cloudpickle.dumps(fn)
    arguments = {"run": {}, "task": {"args": cloudpickle.dumps((args, {})), **task_args}}
    return RunTask(WorkerRequest(up, lo, task, 5, task + 1, len(program), 0, "call", program, [], arguments))


def command(task: int, argv: list[str], **run) -> RunTask:
    up, lo = split128(JOB)
    return RunTask(WorkerRequest(up, lo, task, 5, task + 1, 0, 0, "command", b"", [], {"run": {"argv": argv, **run},
                                                                                    "task": {}}))


@pytest.fixture()
def pool(tmp_path):
    loop = Loop()
    p = SlotPool(2, TaskRunner("w1", tmp_path / "scratch"), loop)
    p.test_loop = loop
    yield p
    p.close()
    assert not loop.readers  # every descriptor given back


def test_callables_and_commands_run_from_the_loop_with_no_thread(pool, tmp_path):
    threads = threading.active_count()
    assert pool.run(call(0, lambda x: x * 2, 21)) == []  # begun: the end comes through the readers
    assert pool.run(command(1, ["true"])) == []
    assert pool.free == []
    done = {e.task: e for e in ended(pool.test_loop.until(lambda ev: len(ended(ev)) == 2))}
    assert done[0].outcome == DONE and cloudpickle.loads(done[0].summary["value"]) == 42
    assert done[1].outcome == DONE and done[1].summary["exit_code"] == 0 and done[1].fence == (5, 2)
    assert threading.active_count() == threads and pool.offload._threads == []
    assert sorted(pool.free) == [0, 1] and not pool.jobs
    assert [p.name for p in (tmp_path / "scratch").iterdir()] and \
        all(not any(p.iterdir()) for p in (tmp_path / "scratch").iterdir())  # scratch emptied


def test_a_tasks_output_comes_as_it_prints_before_its_end(pool):
    def talk():
        import time as t
        print("one", flush=True)
        t.sleep(0.3)
        print("two", file=sys.stderr, flush=True)
        return 7

    pool.run(call(0, talk))
    events = pool.test_loop.until(lambda ev: ended(ev))
    heard = [e for e in events if isinstance(e, OutputRead)]  # in the chunks the pipes gave
    assert [b"".join(e.data for e in heard if e.stream == n) for n in (1, 2)] == [b"one\n", b"two\n"]
    assert isinstance(events[-1], TaskEnded) and events[-1].summary["stdout"] == b"one\n"
    first = {n: min(e.at for e in heard if e.stream == n) for n in (1, 2)}
    assert first[2] - first[1] > 0.2  # each stamped when it was read, as it was written


def test_a_task_with_a_time_limit_is_timed_and_stopped_when_the_core_says(pool):
    events = pool.run(call(0, time.sleep, 60, timeout_s=30))
    (timed,) = [e for e in events if isinstance(e, TaskTimed)]
    assert (timed.task, timed.term_after, timed.kill_after) == (0, 30, 32)
    pool.stop(StopTask(JOB, 0, False))  # the core's timer fired
    (end,) = ended(pool.test_loop.until(ended))
    assert end.outcome == FAILED and end.error == "timed out after 30 s" and end.summary["failure"] == "timeout"
    # a command is started by its slot's child (the loop never waits for a spawn), which enforces
    # the timeout itself: the core's timer is only a backstop, for a child that no longer answers
    for task, memory in ((1, {}), (2, {"memory_mb": 512})):
        (timed,) = [e for e in pool.run(command(task, ["sleep", "60"], timeout_s=0.3, **memory))
                    if isinstance(e, TaskTimed)]
        assert timed.term_after is None and timed.kill_after > 2.3
        (end,) = ended(pool.test_loop.until(ended))
        assert end.error == "killed after 0.3 s timeout" and end.summary["failure"] == "timeout"


def test_a_task_that_stores_files_finishes_off_the_loop_and_frees_its_slot_only_then(pool):
    # no storage here: storing the declared output fails, on an offload thread, and says so
    pool.run(command(0, ["sh", "-c", "echo made > out.txt"], outputs=["out.txt"]))
    (end,) = ended(pool.test_loop.until(ended))
    assert end.outcome == FAILED and "no storage nodes configured" in end.error
    assert len(pool.offload._threads) == 1 and sorted(pool.free) == [0, 1]


def test_an_order_that_cannot_run_ends_at_once(pool):
    up, lo = split128(JOB)
    (end,) = pool.run(RunTask(WorkerRequest(up, lo, 0, 5, 1, 0, 0, "dance", b"", [], {})))
    assert end.outcome == FAILED and "unknown task kind 'dance'" in end.error
    assert sorted(pool.free) == [0, 1]


def test_a_slot_that_fails_is_replaced_and_its_task_fails(pool, monkeypatch):
    pool.run(call(0, time.sleep, 60))
    broken = pool.slots[0] if pool.jobs.get(0) else pool.slots[1]
    index = broken.index
    monkeypatch.setattr(broken, "readable", lambda fd: 1 / 0)  # a bug in the slot
    child = broken.pid
    fd = broken.watched[0]
    (end,) = ended(pool.test_loop.readers[fd]())
    assert end.outcome == FAILED and "ZeroDivisionError" in end.error
    assert pool.slots[index] is not broken and child is not None and exits_soon(child)
    pool.run(call(1, lambda: "again"))
    assert [e.outcome for e in ended(pool.test_loop.until(ended))] == [DONE]
