"""`cluster up` / `status` / `down` and `Client()` finding the cluster: the contracts other tools use.

One local cluster (3 masters, the balancer pair, 2 storage nodes, 1 worker) is started with the
real command in a subprocess, under a CLUSTER_HOME in a temporary directory (nothing touches
~/.cluster). Whatever happens, every pid it started is stopped: `cluster down`, then SIGKILL by
pid for anything of ours still there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.client import Client, ClusterError
from cluster.up import NodeRecord, UpError, assess, is_ours, read_nodes, up

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).parent / "cluster"
CLUSTER = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "cluster"]


def run(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTER_HOME", "CLUSTER_CONFIG")}
    env["CLUSTER_HOME"] = str(home)
    return subprocess.run([*CLUSTER, *args], capture_output=True, text=True, timeout=timeout, env=env)


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


def alive(pid: int) -> bool:
    """In the process table (a zombie counts: `os.kill(pid, 0)` would find it)."""
    return os.path.exists(f"/proc/{pid}")


def pids_of(home: Path) -> list[int]:
    """Every pid the cluster in ``home`` recorded: the nodes and the workers' mount children."""
    pids = [r.pid for r in read_nodes(home) or [] if r.pid]
    for f in home.glob("*/mount.pid"):
        pids.append(int(f.read_text().split()[0]))
    return pids


def kill_ours(home: Path, pids: list[int]) -> None:
    """The last resort of a failed test: SIGKILL by pid what is still one of ``home``'s nodes."""
    for pid in pids:
        if is_ours(pid, home):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A CLUSTER_HOME of our own (for `Client()` in this process too); its cluster is stopped at
    the end whatever happened."""
    d = tmp_path / "home"
    monkeypatch.setenv("CLUSTER_HOME", str(d))
    monkeypatch.delenv("CLUSTER_CONFIG", raising=False)
    seen: list[int] = []
    yield d, seen
    seen += pids_of(d)
    run(d, "down", timeout=60)
    kill_ours(d, seen)


def test_up_status_client_down(home, tmp_path):
    d, seen = home
    started = run(d, "up", "--workers", "1", "--slots", "1")
    seen += pids_of(d)
    assert started.returncode == 0, started.stderr
    assert str(d / "cluster.toml") in started.stdout

    st = run(d, "status", "--json", timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    nodes = json.loads(st.stdout)["nodes"]
    by_role = {role: [n for n in nodes if n["role"] == role] for role in ("master", "balancer", "storage", "worker")}
    assert [len(v) for v in by_role.values()] == [3, 2, 2, 1], nodes
    assert all(isinstance(n["pid"], int) and n["health"] == "up" and n["version"] and n["address"] for n in nodes)
    assert sorted(n["state"] for n in by_role["master"]) == ["follower", "follower", "leader"]
    assert sorted(n["state"] for n in by_role["balancer"]) == ["active", "passive"]
    assert [n["state"] for n in by_role["storage"]] == ["up", "up"]
    assert by_role["worker"][0]["state"] == "registered" and by_role["worker"][0]["slots"] == 1
    assert {n["pid"] for n in nodes} == {r.pid for r in read_nodes(d)}

    with Client() as client:  # CLUSTER_HOME → d/cluster.toml
        assert client.submit(pow, 2, 5).result(timeout=60) == 32
        assert len(client.storage) == 2 and client.replicas == 2

    # A rack's config (no nodes.json beside it): the workers are those the active balancer lists.
    rack = tmp_path / "rack.toml"
    rack.write_text((d / "cluster.toml").read_text() + f'\n[security]\nkeys = "{d}/keys.toml"\nsecrets = "{d}/keys"\n')
    st = run(d, "status", "--config", str(rack), "--json", timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    workers = [n for n in json.loads(st.stdout)["nodes"] if n["role"] == "worker"]
    assert [(w["name"], w["state"], w["address"], w["pid"]) for w in workers] == [("w1", "registered", None, None)]

    again = run(d, "up")
    assert again.returncode != 0 and "cluster down" in one_line(again.stderr)
    assert "Traceback" not in again.stderr

    pids = pids_of(d)
    assert len(pids) >= 8
    stopped = run(d, "down", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped 8 node processes" in stopped.stdout
    assert [p for p in pids if alive(p)] == []
    assert not (d / "nodes.json").exists() and not (d / "cluster.toml").exists()
    assert str(d) not in Path("/proc/self/mountinfo").read_text()

    twice = run(d, "down")
    assert twice.returncode == 0 and "no cluster" in one_line(twice.stdout)
    st = run(d, "status")
    assert st.returncode != 0 and "cluster up" in one_line(st.stderr)
    with pytest.raises(ClusterError, match="no cluster config found"):
        Client()


def test_down_after_a_worker_was_sigkilled(home):
    """A SIGKILLed worker leaves its FUSE mount child (pid in mount.pid) and the mount: `down`
    stops the child by that pid and unmounts."""
    d, seen = home
    started = run(d, "up", "--workers", "1", "--slots", "1")
    seen += pids_of(d)
    assert started.returncode == 0, started.stderr
    worker = next(r for r in read_nodes(d) if r.role == "worker")
    mount_pids = pids_of(d)[len(read_nodes(d)):]
    os.kill(worker.pid, signal.SIGKILL)
    stopped = run(d, "down", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped 7 node processes" in stopped.stdout
    assert [p for p in seen if alive(p)] == []
    assert not list(d.glob("*/mount.pid")) and str(d) not in Path("/proc/self/mountinfo").read_text()
    if mount_pids:  # FUSE was available: the child was there and is gone
        assert not alive(mount_pids[0])


def test_no_cluster(home, tmp_path, monkeypatch):
    d, _ = home
    st = run(d, "status", "--json")
    assert st.returncode == 1 and "no cluster config found" in one_line(st.stderr)
    dn = run(d, "down")
    assert dn.returncode == 0 and "no cluster running" in one_line(dn.stdout)
    with pytest.raises(ClusterError, match=r"no cluster config found .*cluster up.*masters=\[\.\.\.\]"):
        Client()
    monkeypatch.setenv("CLUSTER_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ClusterError, match="CLUSTER_CONFIG"):
        Client()


def test_down_spares_a_pid_that_is_not_ours(home):
    """nodes.json naming a pid now used by another program: `down` leaves that process alone."""
    d, _ = home
    d.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        record = {"name": "w1", "role": "worker", "address": "tcp://127.0.0.1:1", "pid": other.pid,
                  "log": str(d / "w1.log"), "data_dir": str(d / "w1")}
        (d / "nodes.json").write_text(json.dumps({"nodes": [record]}))
        dn = run(d, "down")
        assert dn.returncode == 0 and "no cluster running" in dn.stdout
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(10)


def test_up_names_the_node_that_exits(home, monkeypatch):
    """A node that dies while starting: `up` says which, with its log, and stops the others by pid."""
    import cluster.up as upmod

    d, _ = home
    plans = []

    def plan_with_a_broken_worker(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plan[-1][1].argv.append("--no-such-option")
        plans.append(plan)
        return plan

    real_plan = upmod._plan
    monkeypatch.setattr(upmod, "_plan", plan_with_a_broken_worker)
    try:
        with pytest.raises(UpError, match=r"(?i)w1 exited with status 2 while starting: .*no such option.*w1\.log") as err:
            up(d, 1, 1, timeout=30)
        assert "\n" not in str(err.value)
        assert not (d / "nodes.json").exists() and not (d / "cluster.toml").exists()
        assert [n.name for _, n in plans[0] if n.process.poll() is None] == []
    finally:
        for _, node in plans[0] if plans else []:
            node.stop()  # by pid; a no-op for those already stopped


def rec(name: str, role: str, address: str = "") -> NodeRecord:
    return NodeRecord(name, role, address or f"tcp://{name}", 1, f"{name}.log")


def test_assess_reads_one_round_of_replies():
    nodes = [rec("m1", "master"), rec("m2", "master"), rec("b1", "balancer"), rec("s1", "storage"), rec("w1", "worker")]
    leader = {"state": "leader", "serving": True}
    balancer = {"state": "active", "master": {"attached": True, "address": "tcp://m2"}, "workers": [{"name": "w1"}]}
    details = {"m1": {"state": "follower"}, "m2": leader, "b1": balancer, "s1": {}, "w1": {"state": "registered"}}
    assert assess(nodes, details).ready
    assert assess(nodes, {**details, "s1": None}).missing == (("s1", "not answering yet"),)
    assert assess(nodes, {**details, "m2": {"state": "leader", "serving": False}}).missing[0][0] == "m1"
    detached = {**balancer, "master": {"attached": True, "address": "tcp://m1"}}
    assert assess(nodes, {**details, "b1": detached}).missing == (("b1", "not attached to the master leader yet"),)
    assert assess(nodes, {**details, "w1": {"state": "registering"}}).missing == (
        ("w1", "not registered with the active balancer yet"),)
    assert [n for n, _ in assess(nodes, {**details, "b1": {"state": "passive"}}).missing] == ["b1", "w1"]
