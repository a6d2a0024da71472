"""Masters replicating the ledger with Raft, as real processes on 127.0.0.1, under faults.

Each test starts its own masters (``master_nodes``); every started process is stopped by pid at
teardown (SIGTERM, then SIGKILL). Conditions are polled with deadlines (``wait_for``), never
slept for. A failure message carries the tail of every master's log.
"""

from __future__ import annotations

import os
import random
import signal
import shutil
import threading
import time

import pytest
import zmq

from cluster.client import Client, NoQuorum, Refused
from cluster.local import LocalNode, credentials_as, master_nodes
from cluster.node.status import query_status
from master.echo_balancer import EchoBalancer
from proto import Reason
from proto.errors import AppReason
from proto.messages import Error, NotLeader, Submit

from .conftest import Client as RawClient
from .conftest import wait_for

pytestmark = pytest.mark.integration


# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def masters(tmp_path):
    """``start(n, **kw)``: n masters started and answering; all stopped by pid at teardown."""
    started: list[LocalNode] = []

    def start(count: int, **kw) -> list[LocalNode]:
        nodes = master_nodes(tmp_path, count, **kw)
        for node in nodes:
            started.append(node.start())
        for node in nodes:
            node.wait_ready()
        return nodes

    yield start
    for node in started:
        node.stop(timeout=5)


@pytest.fixture
def clients():
    """``make(addresses, **kw)``: a Client closed at teardown."""
    made: list[Client] = []

    def make(addresses: list[str], **kw) -> Client:
        c = Client(addresses, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def alive(node: LocalNode) -> bool:
    return node.process is not None and node.process.poll() is None


def detail(node: LocalNode, timeout: float = 1.0) -> dict | None:
    """The master's status detail, or None if it does not answer."""
    if not alive(node):
        return None
    reply = query_status([node.address], timeout=timeout)[0].reply
    return reply.detail if reply is not None else None


def logs(nodes: list[LocalNode], tail: int = 1500) -> str:
    return "\n".join(f"--- {n.name} ---\n{n.log_text()[-tail:]}" for n in nodes)


def serving_leader(nodes: list[LocalNode], timeout: float = 15.0) -> LocalNode:
    """The live master that leads with a quorum and has committed its term's barrier."""

    def find():
        for node in nodes:
            d = detail(node)
            if d and d["state"] == "leader" and d["has_quorum"] and d["serving"]:
                return node
        return None

    return wait_for(find, timeout, "a serving leader")


def wait_converged(node: LocalNode, leader: LocalNode, timeout: float = 20.0, what: str = "") -> dict:
    """Wait until ``node`` shows the leader's commit index, last applied and ledger jobs."""

    def same():
        a, b = detail(node), detail(leader)
        if a is None or b is None:
            return None
        keys = (a["commit_index"], a["last_applied"], a["ledger"]["jobs"], a["ledger"]["commands_applied"])
        if keys == (b["commit_index"], b["last_applied"], b["ledger"]["jobs"], b["ledger"]["commands_applied"]):
            return a
        return None

    return wait_for(same, timeout, what or f"{node.name} to converge with the leader {leader.name}")


def list_spec(i: int) -> tuple[str, dict]:
    return "list", {"tasks": [{"i": i}], "name": f"job-{i}"}


# ---- 1: acknowledged submits survive the leader's death ---------------------------------------


def test_submits_survive_leader_kill(masters, clients):
    nodes = masters(3)
    leader = serving_leader(nodes)
    client = clients([n.address for n in nodes], timeout=30)

    total, chunk, kill_at = 1000, 50, 300
    specs = [list_spec(i) for i in range(total)]
    keys = [os.urandom(16) for _ in range(total)]
    acked = []
    killed_at = {}

    for start in range(0, total, chunk):
        def progress(done, start=start):  # called as each submit of this chunk is acknowledged
            if not killed_at and start + done >= kill_at:
                killed_at["acked"] = start + done
                leader.kill()  # mid-chunk: the rest of this chunk is in flight

        acked += client.submit_many(specs[start:start + chunk], keys=keys[start:start + chunk], progress=progress)

    assert killed_at and killed_at["acked"] < total, "the leader was not killed partway"
    leader.process.wait(30)
    assert not alive(leader)
    assert len(acked) == total
    assert [bytes.fromhex(r.key) for r in acked] == keys

    survivors = [n for n in nodes if n is not leader]
    new_leader = serving_leader(survivors)
    listed = client.jobs(limit=5000)
    assert listed.stale is False
    ids = [j["job"] for j in listed.value]
    assert len(ids) == len(set(ids)), "a job id is listed twice"
    assert len(ids) == total, f"{len(ids)} jobs listed, {total} acknowledged\n{logs(nodes)}"
    assert {r.job for r in acked} <= set(ids)
    assert len({r.job for r in acked}) == total
    assert detail(new_leader)["ledger"]["jobs"] == total

    # A retried submit with the same key lands on the same job: no duplicates.
    for i in random.Random(1).sample(range(total), 20):
        again = client.submit_job(*specs[i], key=keys[i])
        assert again.job == acked[i].job
    assert detail(new_leader)["ledger"]["jobs"] == total

    # The killed master restarts from its disk and catches up.
    leader.start()
    leader.wait_ready()
    d = wait_converged(leader, new_leader, what=f"the restarted {leader.name} to converge")
    assert d["ledger"]["jobs"] == total


# ---- 2: five masters tolerate two failures -----------------------------------------------------


def test_five_masters_two_kills_still_writable(masters, clients):
    nodes = masters(5)
    leader = serving_leader(nodes)
    follower = next(n for n in nodes if n is not leader)
    leader.kill()
    follower.kill()

    client = clients([n.address for n in nodes], timeout=30)
    ref = client.submit_job(*list_spec(1))
    answer = client.job(ref.job)
    assert answer.stale is False
    assert answer.value["job"] == ref.job
    assert answer.value["state"] == "active"
    new_leader = serving_leader([n for n in nodes if alive(n)])
    assert answer.leader == new_leader.address


# ---- 3: a minority refuses writes but serves stale reads ---------------------------------------


def test_minority_refuses_writes_reads_stale(masters, clients):
    nodes = masters(3)
    leader = serving_leader(nodes)
    client = clients([n.address for n in nodes], timeout=3)
    ref = client.submit_job(*list_spec(1))
    survivor = next(n for n in nodes if n is not leader)
    wait_for(lambda: (d := detail(survivor)) and d["ledger"]["jobs"] == 1, 10, "the survivor to apply the job")

    for node in nodes:
        if node is not survivor:
            node.kill()

    started = time.monotonic()
    with pytest.raises(NoQuorum) as caught:
        client.submit_job(*list_spec(2))
    # a guard against a client that waits on and on, not a speed: 10x its 3 s timeout
    assert time.monotonic() - started < 30, "the client did not give up at its timeout"
    assert "majority" in str(caught.value)

    answer = client.job(ref.job)
    assert answer.stale is True
    assert answer.value["job"] == ref.job
    assert detail(survivor)["ledger"]["jobs"] == 1


# ---- 4: a follower redirects writes to the leader -----------------------------------------------


def test_follower_redirects(masters, clients):
    nodes = masters(3)
    leader = serving_leader(nodes)
    follower = next(n for n in nodes if n is not leader)
    wait_for(lambda: (d := detail(follower)) and d["leader"] == leader.address, 10, "the follower to know the leader")

    raw = RawClient(follower.address)
    try:
        raw.send(Submit(77, 1, 2, "list", {"tasks": [{"i": 1}]}))
        reply = raw.recv()
    finally:
        raw.close()
    assert isinstance(reply, NotLeader), reply
    assert reply.request_id == 77
    assert reply.leader == leader.address

    redirected = detail(follower)["core"].get("redirected", 0)
    client = clients([follower.address, leader.address], timeout=10)
    # With ZMQ_IMMEDIATE the client skips a master it is not yet connected to: wait until the
    # follower's connection is up, so that the submit really goes to the follower first.
    wait_for(lambda: client.link._sockets[0].poll(0, zmq.POLLOUT), 5, "the client to connect to the follower")
    assert client.link.leader == 0
    ref = client.submit_job(*list_spec(1))
    assert client.link.leader == 1  # the redirect was followed
    # at least once: a client that is not yet connected to the leader (ZMQ_IMMEDIATE) asks the
    # follower again, so the exact count depends on connection timing
    assert detail(follower)["core"].get("redirected", 0) >= redirected + 1
    assert client.job(ref.job).stale is False
    assert detail(leader)["ledger"]["jobs"] == 1


# ---- 5: task results survive the leader's death -------------------------------------------------


def test_results_survive_leader_kill(masters, clients, tmp_path):
    nodes = masters(3)
    leader = serving_leader(nodes)
    addresses = [n.address for n in nodes]
    client = clients(addresses, timeout=30)
    total, kill_at = 3000, 1000
    ref = client.submit_job("range", {"count": total, "keep_results": True})

    echo = EchoBalancer(addresses, credit=256, credentials=credentials_as(tmp_path / "masters.toml", "echo", "balancer"))
    killed_at = {}
    original_on = echo._on

    def on_message(m):  # kill the leader from the echo's own thread at exactly kill_at acks
        original_on(m)
        if not killed_at and echo.stats.acked >= kill_at:
            killed_at["acked"] = echo.stats.acked
            # a dead leader says nothing: the echo must notice the silence. SIGKILL without
            # waiting here: reaping a master stuck in an msync can take seconds on a loaded disk,
            # and the echo's thread must go on meanwhile (the main thread reaps it below)
            os.kill(leader.pid, signal.SIGKILL)

    echo._on = on_message
    outcome = {}

    def serve():
        try:
            # 90 s guards against a hang (it takes a few seconds); a tighter deadline was a
            # throughput claim that a loaded machine missed before the kill point
            outcome["stats"] = echo.run(time.monotonic() + 90, stop_after=total)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            outcome["error"] = exc

    thread = threading.Thread(target=serve, name="echo-balancer", daemon=True)
    thread.start()
    try:
        thread.join(100)
        assert not thread.is_alive(), "the echo balancer did not stop by its deadline"
    finally:
        if not thread.is_alive():
            echo.close()
    assert "error" not in outcome, outcome.get("error")
    stats = outcome["stats"]
    assert killed_at and killed_at["acked"] < total, "the leader was not killed partway"
    leader.process.wait(30)
    assert not alive(leader)

    survivors = [n for n in nodes if n is not leader]
    new_leader = serving_leader(survivors)
    assert stats.acked == total, (
        f"echo acked {stats.acked} of {total} (attaches {stats.attaches}, resent {stats.resent}, "
        f"refused {stats.refused}); new leader {new_leader.name}\n{logs(nodes)}"
    )

    job = wait_for(lambda: (v := client.job(ref.job).value)["state"] == "done" and v, 15, "the job to be done")
    assert job["done"] == job["total"] == total
    print(f"duplicates counted by the ledger: {job['duplicates']}, echo resent {stats.resent}, attaches {stats.attaches}")

    sample = sorted({0, kill_at - 1, kill_at, kill_at + 1, total - 1, *random.Random(5).sample(range(total), 10)})
    for task_id in sample:
        view = client.task(ref.job, task_id).value
        assert view["state"] == "done", view
        outcomes = [a["outcome"] for a in view["attempts"]]
        assert outcomes.count("done") == 1, view
        assert all(o is not None for o in outcomes), view

    # Every (job, task) the echo saw acknowledged is done: the acked keys are exactly this job's
    # tasks 0..total-1, all of which the job counts done; a sample is also read one by one
    # (reading all 3,000 takes a minute on a loaded 2-core machine).
    job_id = bytes.fromhex(ref.job)
    acked_tasks = set()
    for upper, lower, task_id in stats.acked_keys:
        assert ((upper << 64) | lower).to_bytes(16, "big") == job_id
        acked_tasks.add(task_id)
    assert acked_tasks == set(range(total))
    for task_id in random.Random(7).sample(sorted(acked_tasks), 50):
        assert client.task(ref.job, task_id).value["state"] == "done", task_id

    other = next(n for n in survivors if n is not new_leader)
    wait_converged(other, new_leader)


# ---- 6: restart from disk, and rejoin after losing the disk ------------------------------------


def test_restart_from_disk_and_lost_disk_rejoin(masters, clients, tmp_path):
    nodes = masters(3, snapshot_every=50)
    leader = serving_leader(nodes)
    client = clients([n.address for n in nodes], timeout=30)
    # a small window: about one Raft entry per submit or two, so the log passes snapshot_every
    # several times
    client.submit_many([list_spec(i) for i in range(300)], window=2)
    wait_for(lambda: (d := detail(leader)) and d["last_snapshot"], 20, "the leader to take a snapshot")

    follower = next(n for n in nodes if n is not leader)
    follower.kill()
    client.submit_many([list_spec(i) for i in range(300, 360)], window=2)
    follower.start()
    follower.wait_ready()
    d = wait_converged(follower, leader, what=f"{follower.name} to catch up from its disk")
    assert d["ledger"]["jobs"] == 360

    follower.kill()
    shutil.rmtree(tmp_path / follower.name)
    client.submit_many([list_spec(i) for i in range(360, 420)], window=2)
    follower.start()
    follower.wait_ready()
    d = wait_converged(follower, leader, what=f"{follower.name} to rejoin with an empty disk")
    assert d["ledger"]["jobs"] == 420
    print(f"{follower.name} after losing its disk: last_snapshot={d['last_snapshot']}")
    # The leader's log was compacted before the follower came back empty: Raft sent it a snapshot.
    assert d["last_snapshot"] and d["last_snapshot"].get("restored") is True, d["last_snapshot"]
    assert d["last_snapshot"]["commands_applied"] <= d["ledger"]["commands_applied"]
    assert detail(leader)["ledger"]["jobs"] == 420


# ---- 7: bad input changes nothing --------------------------------------------------------------


def test_bad_input_leaves_ledger_unchanged(masters, clients):
    nodes = masters(3)
    leader = serving_leader(nodes)
    client = clients([n.address for n in nodes], timeout=10)
    key = os.urandom(16)
    ref = client.submit_job("list", {"tasks": [{"i": 1}]}, key=key)
    for node in nodes:
        wait_converged(node, leader)
    before = {n.name: detail(n)["ledger"] for n in nodes}

    def refused(kind, spec, key=None) -> str:
        with pytest.raises(Refused) as caught:
            client.submit_job(kind, spec, key=key)
        return caught.value.code

    assert refused("nonsense", {"tasks": [{"i": 1}]}) == "unknown_kind"
    assert refused("list", {"tasks": [{"blob": "x" * ((1 << 20) + 100)}]}) == "spec_too_large"
    assert refused("list", {"tasks": [{"i": 2}]}, key=key) == "idempotency_conflict"
    assert refused("range", {"count": -1}) == "bad_spec"
    assert refused("list", {"tasks": []}) == "bad_spec"
    assert client.submit_job("list", {"tasks": [{"i": 1}]}, key=key).job == ref.job  # same body: same job

    raw = RawClient(leader.address)
    try:
        raw.send_frames([b"GET / HTTP/1.1\r\n\r\n"])
        reply = raw.recv()
        assert isinstance(reply, Error) and reply.reason == Reason.BAD_MAGIC, reply
        raw.send(Submit(5, 1, 2, "nonsense", {}))
        reply = raw.recv()
        assert isinstance(reply, Error) and reply.reason == AppReason.REFUSED, reply
        assert reply.detail.get("code") == "unknown_kind"
    finally:
        raw.close()
    assert detail(leader) is not None, "the leader stopped answering status after a malformed frame"

    for node in nodes:
        wait_converged(node, leader)
    after = {n.name: detail(n)["ledger"] for n in nodes}
    for name in before:
        assert after[name]["jobs"] == before[name]["jobs"] == 1, (name, before[name], after[name])
        assert after[name]["commands_applied"] == before[name]["commands_applied"], (name, before[name], after[name])
    assert client.jobs(limit=10).value == [client.job(ref.job).value]
