"""worker.executor: commands and callables in real child processes, under limits.

Every failure here must come back as an ``Outcome`` with ``ok=False``; none may raise.
"""

from __future__ import annotations

import os
import select
import signal
import sys

import pytest

from worker.executor import Limits, Outcome, TaskFailed, pack_call, run_callable, run_command, unpack_result

PY = sys.executable
MiB = 1 << 20


def exits_soon(pid: int) -> bool:
    """True if ``pid`` has exited or exits within 5 s (waits on its pidfd, an event, not a sleep).

    The executor returns once the task's processes have closed its pipes, that is once they are
    in exit; the last steps of exit can still be running, hence the wait.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(5000))
    finally:
        os.close(pidfd)


def failed(outcome: Outcome) -> str:
    assert isinstance(outcome, Outcome)
    assert not outcome.ok and outcome.result is None
    return outcome.error


# -- commands ----------------------------------------------------------------------------------


def test_command_ok_captures_stdout_stderr_and_usage(tmp_path):
    out = run_command(["sh", "-c", "echo hello; echo oops >&2"], env=None, scratch=tmp_path)
    assert out.ok and out.kind == "command" and out.error is None
    assert (out.exit_code, out.stdout, out.stderr) == (0, b"hello\n", b"oops\n")
    assert out.wall_s > 0 and out.max_rss_bytes > 0 and not out.timed_out and out.killed_by_signal is None


def test_command_sees_its_env_and_runs_in_scratch(tmp_path):
    scratch = tmp_path / "s"
    out = run_command(["/bin/sh", "-c", 'echo "$GREETING"; pwd'], env={"GREETING": "hi"}, scratch=scratch)
    assert out.ok
    assert out.stdout.decode().splitlines() == ["hi", str(scratch.resolve())]


def test_inputs_are_visible_by_name(tmp_path):
    source = tmp_path / "data" / "reads.fa"
    source.parent.mkdir()
    source.write_text(">r1\nACGT\n")
    out = run_command(["cat", "in.fa"], env=None, scratch=tmp_path / "s", inputs={"in.fa": source})
    assert out.ok and out.stdout == b">r1\nACGT\n"


def test_missing_input_fails_without_running(tmp_path):
    error = failed(run_command(["true"], env=None, scratch=tmp_path, inputs={"x": tmp_path / "nope"}))
    assert "input 'x'" in error and "does not exist" in error


def test_declared_outputs_are_collected(tmp_path):
    out = run_command(["sh", "-c", "mkdir sub; echo 1 > a.txt; echo 2 > sub/b.txt"],
                      env=None, scratch=tmp_path, outputs=["a.txt", "sub/b.txt"])
    assert out.ok
    assert out.outputs == {"a.txt": tmp_path / "a.txt", "sub/b.txt": tmp_path / "sub" / "b.txt"}
    assert out.outputs["sub/b.txt"].read_text() == "2\n"


def test_missing_output_is_a_clear_error(tmp_path):
    out = run_command(["sh", "-c", "echo 1 > a.txt"], env=None, scratch=tmp_path, outputs=["a.txt", "b.txt"])
    assert failed(out) == "missing output: b.txt"
    assert out.exit_code == 0 and out.outputs == {"a.txt": tmp_path / "a.txt"}


def test_nonzero_exit(tmp_path):
    out = run_command(["sh", "-c", "echo bad >&2; exit 3"], env=None, scratch=tmp_path)
    assert failed(out) == "exit status 3"
    assert out.exit_code == 3 and out.stderr == b"bad\n"


def test_command_not_found(tmp_path):
    out = run_command(["no-such-command-here"], env=None, scratch=tmp_path)
    assert failed(out) == "command not found: no-such-command-here"
    assert out.exit_code is None


def test_timeout_kills_the_whole_process_group(tmp_path):
    # The shell starts a grandchild that would sleep for a minute and prints its pid.
    out = run_command(["sh", "-c", "sleep 60 & echo $!; wait"], env=None, scratch=tmp_path,
                      limits=Limits(timeout_s=0.3))
    assert failed(out) == "killed after 0.3 s timeout"
    assert out.timed_out and out.killed_by_signal == signal.SIGTERM and out.exit_code is None
    assert exits_soon(int(out.stdout))
    assert out.wall_s < 5


def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    out = run_command(["sh", "-c", "trap '' TERM; echo ready; while :; do :; done"], env=None,
                      scratch=tmp_path, limits=Limits(timeout_s=0.2, grace_s=0.2))
    assert failed(out) == "killed after 0.2 s timeout"
    assert out.killed_by_signal == signal.SIGKILL and out.stdout == b"ready\n"
    assert out.cpu_s > 0


def test_background_processes_do_not_outlive_a_finished_command(tmp_path):
    out = run_command(["sh", "-c", "sleep 60 & echo $!"], env=None, scratch=tmp_path)
    assert out.ok and exits_soon(int(out.stdout))


def test_memory_limit_fails_the_command_clearly(tmp_path):
    out = run_command([PY, "-c", "b = bytearray(1 << 30)"], env=None, scratch=tmp_path,
                      limits=Limits(memory_bytes=256 * MiB))
    assert failed(out) == "exit status 1"
    assert b"MemoryError" in out.stderr


def test_signal_death_under_a_memory_limit_names_the_limit(tmp_path):
    out = run_command(["sh", "-c", "kill -KILL $$"], env=None, scratch=tmp_path, limits=Limits(memory_bytes=256 * MiB))
    assert failed(out) == "killed by signal 9 (SIGKILL) — over its 256 MiB memory limit?"
    assert out.killed_by_signal == signal.SIGKILL and out.exit_code is None


def test_output_is_truncated_to_the_cap_keeping_head_and_tail(tmp_path):
    script = "import sys; sys.stdout.write('H' * 600 + 'x' * 100_000 + 'T' * 600)"
    out = run_command([PY, "-c", script], env=None, scratch=tmp_path, output_cap_bytes=1000)
    assert out.ok
    assert out.stdout.startswith(b"H" * 500) and out.stdout.endswith(b"T" * 500)
    assert b"[... 100200 bytes truncated: output over the 1000 byte cap ...]" in out.stdout
    assert len(out.stdout) < 1100


# -- callables ---------------------------------------------------------------------------------


def test_callable_closure_result_comes_back(tmp_path):
    base = 40  # a local captured by the closure: only cloudpickle can ship this

    def add(x, *, y):
        print("working")
        return {"sum": base + x + y}

    out = run_callable(pack_call(add, 1, y=1), scratch=tmp_path)
    assert out.ok and out.kind == "callable" and out.exit_code == 0
    assert unpack_result(out) == {"sum": 42}
    assert out.stdout == b"working\n"


def test_callable_runs_in_scratch(tmp_path):
    out = run_callable(pack_call(lambda: __import__("os").getcwd()), scratch=tmp_path)
    assert unpack_result(out) == str(tmp_path.resolve())


def test_callable_raising_reports_the_exception(tmp_path):
    def bad():
        raise ValueError("bad input")

    out = run_callable(pack_call(bad), scratch=tmp_path)
    assert failed(out) == "ValueError: bad input"
    assert b"Traceback" in out.stderr and b"in bad" in out.stderr
    with pytest.raises(TaskFailed, match="ValueError: bad input"):
        unpack_result(out)


def test_callable_returning_an_unpicklable_object(tmp_path):
    out = run_callable(pack_call(lambda: __import__("threading").Lock()), scratch=tmp_path)
    error = failed(out)
    assert error.startswith("result cannot be pickled: TypeError") and "lock" in error


def test_callable_calling_os_exit(tmp_path):
    out = run_callable(pack_call(lambda: __import__("os")._exit(3)), scratch=tmp_path)
    assert failed(out) == "exit status 3 before the callable returned"
    assert out.exit_code == 3


def test_callable_segfault(tmp_path):
    out = run_callable(pack_call(lambda: __import__("ctypes").string_at(0)), scratch=tmp_path)
    assert failed(out) == "killed by signal 11 (SIGSEGV)"
    assert out.killed_by_signal == signal.SIGSEGV


def test_callable_timeout(tmp_path):
    out = run_callable(pack_call(lambda: __import__("time").sleep(60)), scratch=tmp_path,
                       limits=Limits(timeout_s=0.5))
    assert failed(out) == "killed after 0.5 s timeout"
    assert out.timed_out and out.wall_s < 5


def test_callable_over_the_memory_limit(tmp_path):
    out = run_callable(pack_call(lambda: len(bytearray(1 << 30))), scratch=tmp_path,
                       limits=Limits(memory_bytes=256 * MiB))
    assert failed(out) == "MemoryError (memory limit 256 MiB)"
    assert b"MemoryError" in out.stderr


def test_payload_that_cannot_be_loaded(tmp_path):
    error = failed(run_callable(b"not a pickle", scratch=tmp_path))
    assert error.startswith("cannot load the callable: ")
