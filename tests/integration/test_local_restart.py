"""A local cluster that keeps its history: `cluster down` then `cluster up` restarts the same cluster,
`cluster restart NODE` brings back a dead node, and a worker's FUSE mount ends with its worker.

Real processes on 127.0.0.1 under a CLUSTER_HOME in a temporary directory, driven with the real
command (as test_cli_cluster does); every pid they ever had is stopped at the end, by pid.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cluster.up import alive, read_nodes
from tests.integration.conftest import wait_for
from tests.integration.test_cli_cluster import home, one_line, pids_of, run  # noqa: F401 (home: a fixture)

pytestmark = pytest.mark.integration


def up(d: Path, seen: list[int], *args: str) -> str:
    """`cluster up ARGS` that must succeed; returns its stderr (what it said it did)."""
    started = run(d, "up", *args)
    seen += pids_of(d)
    assert started.returncode == 0, started.stderr
    return started.stderr


def out(d: Path, *args: str) -> str:
    done = run(d, *args, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_down_then_up_keeps_the_ledger_files_and_logs(home, tmp_path):
    d, seen = home
    up(d, seen, "--workers", "1", "--slots", "1")
    addresses = {r.name: r.address for r in read_nodes(d)}
    kept = tmp_path / "kept.txt"
    kept.write_text("kept across a restart\n")
    file_id = out(d, "upload", str(kept)).split()[-1]
    job = out(d, "submit", "--no-wait", "--", "true").split()[-1]
    out(d, "add-spec", "kept", "--run", json.dumps({"kind": "command", "argv": ["true"]}), "--paused")
    units = tmp_path / "units.tsv"
    units.write_text("k1\td1\nk2\td2\n")
    out(d, "load", "kept", str(units))
    before = (d / "m1.log").read_text()

    assert "stopped 8 node processes" in out(d, "down")
    said = up(d, seen)
    assert "restarting the cluster recorded in" in said
    assert {r.name: r.address for r in read_nodes(d)} == addresses  # the same ports: the same Raft peers
    assert job in out(d, "jobs", "--json")
    assert [(s["spec"], s["total"]) for s in json.loads(out(d, "summary", "--json"))] == [("kept", 2)]
    assert file_id in out(d, "files", "--json")
    out(d, "download", file_id, str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == kept.read_text()
    after = (d / "m1.log").read_text()
    assert after.startswith(before) and len(after) > len(before)  # appended, not replaced

    # On the running cluster: one more worker is added; fewer, or other masters, are refused.
    up(d, seen, "--workers", "2")
    assert sorted(w["name"] for w in json.loads(out(d, "workers", "--json"))["workers"]) == ["w1", "w2"]
    fewer = run(d, "up", "--workers", "1")
    assert fewer.returncode == 1 and "cluster down" in one_line(fewer.stderr)
    masters = run(d, "up", "--masters", "5")
    assert masters.returncode == 1 and "Raft membership" in one_line(masters.stderr)

    assert "stopped 9 node processes" in out(d, "down")
    said = up(d, seen, "--fresh")
    assert "--fresh: removing the ledger (m1, m2, m3), the stored files (s1, s2)" in said
    assert json.loads(out(d, "jobs", "--json")) == [] and json.loads(out(d, "summary", "--json")) == []
    assert json.loads(out(d, "files", "--json"))["files"] == []
    assert before not in (d / "m1.log").read_text()
    assert [r.name for r in read_nodes(d) if r.role == "worker"] == ["w1"]  # the new cluster's own default


def test_a_sigkilled_worker_restarts_and_its_mount_ends(home):
    d, seen = home
    up(d, seen, "--workers", "1", "--slots", "1")
    worker = next(r for r in read_nodes(d) if r.name == "w1")
    mount_pid = int((d / "w1" / "mount.pid").read_text()) if (d / "w1" / "mount.pid").exists() else None
    os.kill(worker.pid, signal.SIGKILL)
    if mount_pid is not None:  # FUSE is there: the mount follows its worker, unmounted
        mnt = str(d / "w1" / "mnt")
        wait_for(lambda: not alive(mount_pid), 10, "the dead worker's mount process to end")
        wait_for(lambda: mnt not in Path("/proc/mounts").read_text(), 10, "the dead worker's mount to go")

    restarted = run(d, "restart", "w1")
    seen += pids_of(d)
    assert restarted.returncode == 0, restarted.stderr
    again = next(r for r in read_nodes(d) if r.name == "w1")
    assert again.pid != worker.pid and alive(again.pid) and f"pid {again.pid}" in restarted.stdout
    assert "w1" in [w["name"] for w in json.loads(out(d, "workers", "--json"))["workers"]]
    twice = run(d, "restart", "w1")
    assert twice.returncode == 1 and "is running" in one_line(twice.stderr)

    assert "stopped 8 node processes" in out(d, "down")
    assert not alive(again.pid)
    assert str(d) not in Path("/proc/mounts").read_text()


def test_the_leader_sigkilled_and_restarted_at_once_serves_again(home):
    """A master restarted at its old address within the balancer's 1.5 s liveness came back as a
    follower (or a leader that no longer knew the stream) while the balancer stayed attached to
    it, and the cluster never served again. The master now says NOT_LEADER or not_attached to the
    balancer's heartbeats, and the balancer attaches to the leader."""
    d, seen = home
    up(d, seen, "--workers", "1", "--slots", "1")
    statuses = json.loads(out(d, "status", "--json"))
    leader = next(n for n in statuses["nodes"] if n["role"] == "master" and n.get("state") == "leader")
    record = next(r for r in read_nodes(d) if r.name == leader["name"])
    os.kill(record.pid, signal.SIGKILL)
    wait_for(lambda: not alive(record.pid), 10, "the leader to die")
    restarted = run(d, "restart", record.name)
    seen += pids_of(d)
    assert restarted.returncode == 0, restarted.stderr
    done = run(d, "submit", "--", "echo", "served", timeout=60)
    assert done.returncode == 0 and done.stdout == "served\n", done.stdout + done.stderr
