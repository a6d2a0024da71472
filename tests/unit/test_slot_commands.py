"""worker.slots: a slot's commands, as ``executor.run_command`` runs them, by every way a slot
starts one: from the worker itself (posix_spawn, worker.spawn), from the slot's child (posix_spawn
there: how the worker's loop runs them), and forked by the child under a memory limit (a limit
far above what the command uses takes that way here). The same checks as
tests/unit/test_executor.py's, so the wording and the guarantees stay the same."""

from __future__ import annotations

import os
import signal
import sys

import cloudpickle
import pytest

from tests.unit.test_executor import exits_soon, failed
from worker.executor import Limits
from worker.slots import Slot

MiB = 1 << 20
PY = sys.executable
# (spawn_here, memory limit): the worker spawns; the child spawns (as the worker's slots do);
# the child forks under a (lax) memory limit
WAYS = {"spawned": (True, None), "by_child": (False, None), "forked_by_child": (True, 64 << 30)}


@pytest.fixture(params=sorted(WAYS))
def run(request, tmp_path):
    """``run(argv, **kw)``: Slot.run_command the chosen way, checking it went that way."""
    here, limit = WAYS[request.param]
    slot = Slot(0, spawn_here=here)

    def go(argv, *, env=None, inputs=None, outputs=None, limits=Limits()):
        if limit is not None and limits.memory_bytes is None:
            limits = Limits(timeout_s=limits.timeout_s, memory_bytes=limit, grace_s=limits.grace_s)
        first = slot.pid is None
        out = slot.run_command(argv, env, tmp_path / "s", inputs, outputs, limits)
        by_child = not here or limits.memory_bytes is not None
        assert not first or (slot.pid is not None) == by_child  # by its child, or not
        return out

    go.slot, go.scratch = slot, tmp_path / "s"
    yield go
    slot.close()


def test_command_ok_captures_stdout_stderr_and_its_environment(run):
    out = run(["sh", "-c", 'echo "$GREETING"; pwd; echo oops >&2'], env={"GREETING": "hi", "PATH": "/usr/bin:/bin"})
    assert out.ok and out.kind == "command" and out.error is None and out.exit_code == 0
    assert out.stdout == f"hi\n{run.scratch}\n".encode() and out.stderr == b"oops\n"
    assert out.wall_s > 0


def test_inputs_by_name_outputs_collected_and_a_missing_one_named(run, tmp_path):
    source = tmp_path / "reads.fa"
    source.write_text(">r1\nACGT\n")
    out = run(["sh", "-c", "cat data/in.fa > a.txt"], inputs={"data/in.fa": source}, outputs=["a.txt", "b.txt"])
    assert failed(out) == "missing output: b.txt"
    assert out.exit_code == 0 and out.outputs == {"a.txt": run.scratch / "a.txt"}
    assert (run.scratch / "a.txt").read_text() == ">r1\nACGT\n"
    assert "does not exist" in failed(run(["true"], inputs={"x": tmp_path / "nope"}))


def test_exit_status_and_a_command_not_found(run):
    out = run(["sh", "-c", "echo bad >&2; exit 3"])
    assert failed(out) == "exit status 3" and out.exit_code == 3 and out.stderr == b"bad\n"
    out = run(["no-such-command-here"])
    assert failed(out) == "command not found: no-such-command-here" and out.exit_code is None
    assert run(["true"]).ok  # the slot serves on


def test_timeout_kills_the_whole_process_group(run):
    out = run(["sh", "-c", "sleep 60 & echo $!; wait"], limits=Limits(timeout_s=0.3))
    assert failed(out) == "killed after 0.3 s timeout"
    assert out.timed_out and out.killed_by_signal == signal.SIGTERM and out.exit_code is None
    assert exits_soon(int(out.stdout)) and out.wall_s < 5


def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored(run):
    out = run(["sh", "-c", "trap '' TERM; echo ready; while :; do :; done"], limits=Limits(timeout_s=0.2, grace_s=0.2))
    assert failed(out) == "killed after 0.2 s timeout"
    assert out.killed_by_signal == signal.SIGKILL and out.stdout == b"ready\n" and out.cpu_s > 0


def test_background_processes_do_not_outlive_a_finished_command(run):
    out = run(["sh", "-c", "sleep 60 & echo $!"])
    assert out.ok and exits_soon(int(out.stdout))


def test_a_signal_ignored_by_an_earlier_callable_is_not_the_commands(run, tmp_path):
    # state a callable leaves in the slot's child must not reach the commands it starts
    ignore = run.slot.run_callable(cloudpickle.dumps(signal.signal), cloudpickle.dumps(((signal.SIGTERM, signal.SIG_IGN), {})),
                                   tmp_path / "c", Limits(memory_bytes=64 << 30))
    assert ignore.ok
    out = run(["sh", "-c", "echo $$; sleep 60"], limits=Limits(timeout_s=0.3, grace_s=30))
    assert failed(out) == "killed after 0.3 s timeout" and out.killed_by_signal == signal.SIGTERM


def test_memory_limit_fails_the_command_clearly():
    with Slot(0) as slot:
        out = slot.run_command([PY, "-c", "b = bytearray(1 << 30)"], None, os.getcwd(),
                               limits=Limits(memory_bytes=256 * MiB))
        assert failed(out) == "exit status 1" and b"MemoryError" in out.stderr
        out = slot.run_command(["sh", "-c", "kill -KILL $$"], None, os.getcwd(), limits=Limits(memory_bytes=256 * MiB))
        assert failed(out) == "killed by signal 9 (SIGKILL) — over its 256 MiB memory limit?"


def test_output_is_truncated_to_the_cap_keeping_head_and_tail(tmp_path):
    with Slot(0, output_cap_bytes=1000) as slot:
        script = "import sys; sys.stdout.write('H' * 600 + 'x' * 100_000 + 'T' * 600)"
        out = slot.run_command([PY, "-c", script], None, tmp_path)
    assert out.ok and out.stdout.startswith(b"H" * 500) and out.stdout.endswith(b"T" * 500)
    assert b"[... 100200 bytes truncated: output over the 1000 byte cap ...]" in out.stdout


def test_a_command_is_heard_as_it_writes(tmp_path):
    heard = []
    with Slot(0) as slot:
        out = slot.run_command(["sh", "-c", "echo one; echo two >&2"], None, tmp_path,
                               listen=lambda stream, chunk: heard.append((stream, chunk)))
    assert out.ok and sorted(heard) == [(1, b"one\n"), (2, b"two\n")]
