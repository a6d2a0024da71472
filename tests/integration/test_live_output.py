"""Output as it comes (issue 21): `cluster submit` prints a command's lines while it runs, a
callable's print() reaches ``future.stream()``, `cluster logs --task JOB/N` follows a task, and
none of it passes through masters or balancers (the worker serves it on its own port).

One local cluster (`cluster up --workers 1 --slots 2`) of its own, stopped at the end whatever
happened (`cluster down`, then SIGKILL by pid for anything of ours left)."""

from __future__ import annotations

import subprocess
import time

import pytest

from cluster.client import Client, ClusterError
from cluster.local import make_keys
from cluster.node import keys

from .test_cli_commands import CLUSTER, JOB_ID, env_for, local_cluster, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with local_cluster(tmp_path_factory, "live", "--workers", "1", "--slots", "2") as d:
        yield d


def timed_lines(proc: subprocess.Popen) -> list[tuple[float, str]]:
    """Each line of ``proc``'s stdout with the moment it arrived here."""
    out = []
    for line in proc.stdout:
        out.append((time.monotonic(), line.rstrip("\n")))
    return out


def test_submit_prints_each_line_as_the_command_writes_it(home):
    script = "for i in 1 2 3; do echo line $i; sleep 1; done; echo done >&2"
    proc = subprocess.Popen([*CLUSTER, "submit", "--", "sh", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for(home))
    try:
        lines = timed_lines(proc)
        proc.wait(60)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()
    assert [text for _, text in lines] == ["line 1", "line 2", "line 3"]  # each once: not printed again at the end
    # each a second apart, the last a second before the command ends: each well before the end
    assert [round(ended - at, 1) > 0.5 for at, _ in lines] == [True] * 3, [ended - at for at, _ in lines]
    assert ended - lines[0][0] > 1.5, "line 1 came only at the end"
    err = proc.stderr.read()
    assert "done" in err and JOB_ID.search(err)


def test_a_callables_print_reaches_future_stream_as_it_runs(home):
    def stream_and_print(n: int) -> int:  # nested: shipped by value (the workers cannot import tests/)
        import sys
        import time

        for i in range(n):
            print(f"step {i}", flush=True)
            time.sleep(0.6)
        print("warned", file=sys.stderr, flush=True)
        return n

    with Client(config=home / "cluster.toml") as client:
        future = client.submit(stream_and_print, 4)
        seen = []
        for line in future.stream():
            seen.append((line.stream, line.text, line.at, future.done()))
        assert future.result(timeout=30) == 4
    assert [(s, t) for s, t, _, _ in seen] == [("stdout", f"step {i}") for i in range(4)] + [("stderr", "warned")]
    assert not seen[0][3], "the first line came only once the task had ended"
    assert seen[1][2] - seen[0][2] > 0.3  # each line carries the time the worker read it


def test_logs_task_follows_a_running_task_and_prints_an_ended_ones_output(home):
    with Client(config=home / "cluster.toml") as client:
        future = client.run(["sh", "-c", "echo one; sleep 2; echo two"])
        job = future.job
        followed = run(home, "logs", "--task", f"{job}/0", "-f", timeout=60)
        assert followed.returncode == 0, followed.stderr
        texts = [ln.split(" ", 1)[1] for ln in followed.stdout.splitlines()]
        assert texts == ["one", "two"], followed.stdout  # each line after its time, HH:MM:SS.mmm
        future.result(timeout=30)
    ended = run(home, "logs", "--task", f"{job}/0")
    assert ended.returncode == 0 and ended.stdout == "one\ntwo\n", ended.stdout
    assert "JOB/N" in run(home, "logs", "--task", "nonsense").stderr


def test_only_the_owner_may_follow_a_tasks_output(home):
    make_keys(home, {"mallory": "client"})
    with Client(config=home / "cluster.toml") as client:
        future = client.run(["sh", "-c", "echo secret; sleep 3"])
        wait = [line.text for line in future.stream()]
        assert wait == ["secret"]
        mallory = Client(config=home / "cluster.toml", key=keys.secret_path(home / "keys", "mallory"))
        try:
            with pytest.raises(ClusterError) as caught:  # the worker keeps the task's output for a while after
                list(mallory.follow(future.job, 0))
            assert "only its owner" in str(caught.value)
        finally:
            mallory.close()
