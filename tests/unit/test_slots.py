"""worker.slots: one persistent child per slot runs task after task, and is replaced when a task
kills it, times out or breaks its memory limit. Every failure is an ``Outcome``, never a raise.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

import cloudpickle
import pytest

from worker.executor import Limits, unpack_result
from worker.slots import Slot
from tests.unit.test_executor import exits_soon, failed  # the same checks as the one-shot executor

MiB = 1 << 20
NO_ARGS = cloudpickle.dumps(((), {}))


def fn(f) -> bytes:
    return cloudpickle.dumps(f)


def args(*a, **kw) -> bytes:
    return cloudpickle.dumps((a, kw))


@pytest.fixture()
def slot():
    s = Slot(0)
    yield s
    pid = s.pid
    s.close()
    assert pid is None or exits_soon(pid)


def test_a_callable_returns_its_value_and_the_child_is_reused(slot, tmp_path):
    base = 40  # captured by the closure: only cloudpickle ships this
    add = fn(lambda x, *, y: {"sum": base + x + y})
    first = slot.run_callable(add, args(1, y=1), tmp_path)
    assert first.ok and first.kind == "callable" and first.exit_code == 0 and first.error is None
    assert unpack_result(first) == {"sum": 42}
    assert first.wall_s > 0 and first.max_rss_bytes > 0
    pid = slot.pid
    assert pid is not None
    for i in range(5):
        assert unpack_result(slot.run_callable(add, args(i, y=0), tmp_path)) == {"sum": 40 + i}
    assert slot.pid == pid
    assert slot.counters["spawns"] == 1 and slot.counters["tasks"] == 6


def test_print_output_is_captured_per_task(slot, tmp_path):
    def talk(word):
        print("out", word)
        print("err", word, file=sys.stderr)
        os.write(1, b"raw\n")  # C-level writes to fd 1 land there too
        return word

    first = slot.run_callable(fn(talk), args("one"), tmp_path / "1")
    second = slot.run_callable(fn(talk), args("two"), tmp_path / "2")
    assert (first.stdout, first.stderr) == (b"out one\nraw\n", b"err one\n")
    assert (second.stdout, second.stderr) == (b"out two\nraw\n", b"err two\n")
    quiet = slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path / "1")
    assert (quiet.stdout, quiet.stderr) == (b"", b"")


def test_large_output_is_capped_head_and_tail(tmp_path):
    with Slot(0, output_cap_bytes=1000) as slot:
        out = slot.run_callable(fn(lambda: print("H" * 600 + "x" * 100_000 + "T" * 600, end="")),
                                NO_ARGS, tmp_path)
    assert out.ok
    assert out.stdout.startswith(b"H" * 500) and out.stdout.endswith(b"T" * 500)
    assert b"[... 100200 bytes truncated: output over the 1000 byte cap ...]" in out.stdout


def test_the_callable_runs_in_scratch(slot, tmp_path):
    out = slot.run_callable(fn(os.getcwd), NO_ARGS, tmp_path / "here")
    assert unpack_result(out) == str((tmp_path / "here").resolve())


def test_raising_fails_the_task_and_keeps_the_child(slot, tmp_path):
    assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok
    pid = slot.pid
    out = slot.run_callable(fn(lambda x: 1 / x), args(0), tmp_path)
    assert failed(out) == "ZeroDivisionError: division by zero"
    assert out.exit_code == 1 and b"Traceback" in out.stderr
    assert failed(slot.run_callable(fn(sys.exit), args(4), tmp_path)) == "SystemExit: 4"
    assert slot.pid == pid and slot.run_callable(fn(lambda: 2), NO_ARGS, tmp_path).ok


def test_os_exit_fails_the_task_and_the_next_gets_a_new_child(slot, tmp_path):
    assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok
    pid = slot.pid
    out = slot.run_callable(fn(lambda: os._exit(3)), NO_ARGS, tmp_path)
    assert failed(out) == "exit status 3 before the callable returned"
    assert out.exit_code == 3 and exits_soon(pid)
    assert slot.pid is None
    assert unpack_result(slot.run_callable(fn(lambda: 5), NO_ARGS, tmp_path)) == 5
    assert slot.pid not in (None, pid)
    assert slot.counters["deaths"] == 1 and slot.counters["restarts"] == 1


def test_a_child_killed_between_tasks_is_replaced(slot, tmp_path):
    assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok
    pid = slot.pid
    os.kill(pid, signal.SIGKILL)
    assert exits_soon(pid)
    assert unpack_result(slot.run_callable(fn(lambda: 2), NO_ARGS, tmp_path)) == 2
    assert slot.pid != pid and slot.counters["idle_deaths"] == 1


def test_a_segfault_names_the_signal(slot, tmp_path):
    out = slot.run_callable(fn(lambda: __import__("ctypes").string_at(0)), NO_ARGS, tmp_path)
    assert failed(out) == "killed by signal 11 (SIGSEGV) before the callable returned"
    assert out.killed_by_signal == signal.SIGSEGV
    assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok


def test_timeout_kills_the_child_and_the_next_task_runs(slot, tmp_path):
    assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok
    pid = slot.pid
    out = slot.run_callable(fn(time.sleep), args(60), tmp_path, Limits(timeout_s=0.5))
    assert failed(out) == "timed out after 0.5 s"
    assert out.timed_out and out.wall_s < 5 and exits_soon(pid)
    assert unpack_result(slot.run_callable(fn(lambda: "next"), NO_ARGS, tmp_path)) == "next"
    assert slot.counters["timeouts"] == 1


def test_timeout_escalates_to_sigkill(slot, tmp_path):
    # One task leaves SIGTERM ignored in the child (state outlives a task), so that the next
    # one is deaf to it from its first instruction.
    assert slot.run_callable(fn(signal.signal), args(signal.SIGTERM, signal.SIG_IGN), tmp_path).ok
    out = slot.run_callable(fn(time.sleep), args(60), tmp_path, Limits(timeout_s=0.3, grace_s=0.3))
    assert failed(out) == "timed out after 0.3 s"
    assert out.killed_by_signal == signal.SIGKILL and out.wall_s < 5


def test_memory_limit_fails_the_task_and_the_slot_recovers(tmp_path):
    with Slot(0, memory_bytes=256 * MiB) as slot:
        assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok
        pid = slot.pid
        out = slot.run_callable(fn(lambda: len(bytearray(1 << 30))), NO_ARGS, tmp_path)
        assert failed(out) == "MemoryError (memory limit 256 MiB)"
        assert b"MemoryError" in out.stderr
        # Caught inside the child: a failed task, and the same child serves the next one.
        assert unpack_result(slot.run_callable(fn(lambda: len(bytearray(MiB))), NO_ARGS,
                                               tmp_path)) == MiB
        assert slot.pid == pid


def test_a_task_asking_for_another_memory_limit_gets_a_child_started_under_it(tmp_path):
    with Slot(0, memory_bytes=512 * MiB) as slot:
        big = fn(lambda n: len(bytearray(n)))
        assert slot.run_callable(big, args(300 * MiB), tmp_path).ok
        pid = slot.pid
        low = slot.run_callable(big, args(300 * MiB), tmp_path, Limits(memory_bytes=256 * MiB))
        assert failed(low) == "MemoryError (memory limit 256 MiB)"
        assert slot.pid != pid and slot.counters["limit_restarts"] == 1
        # The slot's cap holds even when a task asks for more.
        over = slot.run_callable(big, args(600 * MiB), tmp_path, Limits(memory_bytes=1 << 40))
        assert failed(over) == "MemoryError (memory limit 512 MiB)"
        assert failed(slot.run_callable(big, args(1), tmp_path, Limits(memory_bytes=0))) == \
            "memory limit must be a positive number of bytes, got 0"


def test_payloads_that_cannot_be_loaded(slot, tmp_path):
    error = failed(slot.run_callable(b"not a pickle", NO_ARGS, tmp_path))
    assert error.startswith("cannot load the callable: _pickle.UnpicklingError")
    error = failed(slot.run_callable(fn(lambda: 1), b"junk", tmp_path))
    assert error.startswith("cannot load the arguments: _pickle.UnpicklingError")
    error = failed(slot.run_callable(cloudpickle.dumps(3), NO_ARGS, tmp_path))
    assert error == "cannot load the callable: got a int, which is not callable"
    error = failed(slot.run_callable(fn(lambda: 1), cloudpickle.dumps(5), tmp_path))
    assert error.startswith("cannot load the arguments: TypeError")
    assert failed(slot.run_callable("text", NO_ARGS, tmp_path)) == \
        "function must be cloudpickle bytes, got a str"
    assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok


def test_a_task_writing_into_the_slots_pipe_costs_only_itself(slot, tmp_path):
    def meddle():
        os.write(int(sys.argv[2]), b"\x05" + bytes(7) + b"junk!")  # a frame of our protocol
        time.sleep(60)

    out = slot.run_callable(fn(meddle), NO_ARGS, tmp_path, Limits(timeout_s=30))
    assert failed(out).startswith("the slot process sent a reply that cannot be read")
    assert out.wall_s < 10 and slot.pid is None
    assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok


def test_a_result_that_cannot_be_pickled(slot, tmp_path):
    out = slot.run_callable(fn(lambda: __import__("threading").Lock()), NO_ARGS, tmp_path)
    error = failed(out)
    assert error.startswith("result cannot be pickled: TypeError") and "lock" in error
    assert out.exit_code == 2


def test_close_leaves_no_process(tmp_path):
    slot = Slot(0)
    assert slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path).ok
    pid = slot.pid
    slot.close()
    assert slot.pid is None and exits_soon(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    slot.close()  # idempotent


def test_close_from_another_thread_fails_the_running_task(tmp_path):
    started = tmp_path / "started"
    os.mkfifo(started)  # the task says it runs through a FIFO: an event to wait on, not a sleep
    reader = os.open(started, os.O_RDONLY | os.O_NONBLOCK)

    def task(path):
        with open(path, "wb") as f:
            f.write(b"x")
        time.sleep(60)

    slot, ended = Slot(0), []
    thread = threading.Thread(
        target=lambda: ended.append(slot.run_callable(fn(task), args(str(started)), tmp_path / "s")))
    thread.start()
    try:
        poller = select.poll()
        poller.register(reader, select.POLLIN)
        assert poller.poll(30_000), "the task never started"
    finally:
        os.close(reader)
    pid = slot.pid
    slot.close()
    thread.join(30)
    assert not thread.is_alive()
    assert failed(ended[0]) == "slot 0 was closed while the task ran"
    assert exits_soon(pid)
    assert failed(slot.run_callable(fn(lambda: 1), NO_ARGS, tmp_path)) == "slot 0 is closed"


def test_close_kills_what_a_callable_left_running(tmp_path):
    slot = Slot(0)
    spawn = fn(lambda: __import__("subprocess").Popen(["sleep", "60"]).pid)
    orphan = unpack_result(slot.run_callable(spawn, NO_ARGS, tmp_path))
    slot.close()
    assert exits_soon(orphan)


def test_a_command_runs_in_its_own_process(slot, tmp_path):
    # started by the worker (posix_spawn: no slot child needed), as the leader of a process group
    # of its own: its pid and group id, as the kernel says them, in a file it leaves
    out = slot.run_command(["sh", "-c", "echo hello; echo oops >&2; cut -d' ' -f1,5 /proc/$$/stat > ids"],
                           None, tmp_path)
    assert out.ok and out.kind == "command"
    assert (out.stdout, out.stderr) == (b"hello\n", b"oops\n")
    pid, group = (int(x) for x in (tmp_path / "ids").read_text().split())
    assert pid == group and pid != os.getpid()
    assert slot.pid is None and slot.counters["commands"] == 1


def test_a_large_argument_and_result_travel_through_the_pipes(slot, tmp_path):
    blob = os.urandom(5 * MiB)
    out = slot.run_callable(fn(lambda b: b[::-1]), args(blob), tmp_path)
    assert unpack_result(out) == blob[::-1]


def test_one_child_serves_task_after_task(slot, tmp_path):
    """The slot's child is started once and reused: 200 no-op tasks, one spawn, one pid. What
    that buys in tasks per second is bench/dispatch.py's ("one slot")."""
    noop = fn(lambda: None)
    outcomes = []
    pids = set()
    for _ in range(200):
        outcomes.append(slot.run_callable(noop, NO_ARGS, tmp_path))
        pids.add(slot.pid)
    assert all(out.ok for out in outcomes)
    assert len(pids) == 1 and None not in pids
    assert slot.counters["tasks"] == slot.counters["callables"] == 200
    assert (slot.counters["spawns"], slot.counters["restarts"], slot.counters["failed"]) == (1, 0, 0)
