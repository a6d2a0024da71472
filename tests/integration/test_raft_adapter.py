"""master/raft.py, the one adapter between the master and pysyncobj, driven directly: three
``RaftAdapter``s in this process, each with its own ``Ledger``, journal and snapshot file,
talking Raft over TCP on 127.0.0.1.

What the masters rely on: one leader that every adapter names; a proposal committed on every
ledger, its result and log index handed to ``on_result``; a proposal with no leader refused
through ``on_failure`` (never dropped); and a master whose disk is empty given the leader's
snapshot (our own format: the ledger's snapshot beside pysyncobj's bookkeeping) once the
leader's log was compacted. And what keeps strangers out: with the masters' secret, a pickle
sent to a Raft port is never unpickled, a 2 GiB length prefix is not buffered, and the port
listens on exactly the configured address. Every adapter is closed at the end (its Raft thread
joined); conditions are polled with deadlines.
"""

from __future__ import annotations

import pickle
import queue
import shutil
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster.local import free_port
from master.commands import AddUnits, AddWorkSpec, SubmitJob
from master.ledger import Ledger, spec_digest
from master.raft import FAILURES, UNAUTHENTICATED_MAX, RaftAdapter, _BoundedConnection

from .conftest import wait_for

pytestmark = pytest.mark.integration

NOW = 1_000.0
SECRET = "a-test-secret-of-the-three-masters"


def submit(n: int) -> SubmitJob:
    spec = {"count": 2}
    return SubmitJob(n.to_bytes(16, "big"), (10_000 + n).to_bytes(16, "big"), spec_digest("range", spec), "range",
                     spec, "test", NOW)


@dataclass
class Master:
    """One adapter and what its callbacks reported (they run on pysyncobj's thread)."""

    address: str
    data_dir: Path
    partners: list[str]
    adapter: RaftAdapter | None = None
    results: queue.Queue = field(default_factory=queue.Queue)
    failures: queue.Queue = field(default_factory=queue.Queue)

    def start(self) -> "Master":
        self.adapter = RaftAdapter(Ledger(), self.address, self.partners, self.data_dir, password=SECRET,
                                   on_result=lambda token, result, index: self.results.put((token, result, index)),
                                   on_failure=lambda token, reason: self.failures.put((token, reason)))
        return self

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()
            self.adapter = None

    def has_job(self, n: int) -> bool:
        with self.adapter.lock:
            return n.to_bytes(16, "big") in self.adapter.ledger.state.jobs


@pytest.fixture
def masters(tmp_path):
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    group = [Master(a, tmp_path / f"m{i}", [p for p in addresses if p != a]) for i, a in enumerate(addresses, 1)]
    try:
        for m in group:
            m.start()
        yield group
    finally:
        for m in group:
            m.close()


def leader_of(group: list[Master]) -> Master | None:
    """The one adapter that leads, if every running adapter names it and it has a quorum."""
    running = [m for m in group if m.adapter is not None]
    views = {m.address: m.adapter.view() for m in running}
    leaders = [m for m in running if views[m.address].role == "leader"]
    if len(leaders) != 1 or not views[leaders[0].address].has_quorum:
        return None
    named = {v.leader for v in views.values()}
    return leaders[0] if named == {leaders[0].address} else None


def test_one_leader_commits_a_proposal_on_every_ledger_and_no_quorum_means_a_refusal(masters):
    leader = wait_for(lambda: leader_of(masters), 20, "one leader that every adapter names")
    followers = [m for m in masters if m is not leader]

    leader.adapter.propose(submit(1), token=7)
    token, result, index = leader.results.get(timeout=10)
    assert token == 7 and result.ok and result.value["created"] is True and index > 0, result
    wait_for(lambda: all(m.has_job(1) for m in masters), 10, "the job on every ledger")
    view = leader.adapter.view()
    assert view.commit_index >= index and view.last_applied >= index

    detail = leader.adapter.detail()
    assert detail["raft_address"] == leader.address and detail["apply_errors"] == 0
    assert sorted(detail["peers"]) == sorted(m.address for m in followers)
    wait_for(lambda: all(p["connected"] for p in leader.adapter.detail()["peers"].values()), 10, "both peers connected")

    # the same command again: the ledger answers with the job it made (idempotent by key)
    leader.adapter.propose(submit(1), token=8)
    token, again, _ = leader.results.get(timeout=10)
    assert token == 8 and again.ok and again.value["created"] is False, again
    assert leader.failures.empty() and all(m.adapter.apply_errors == 0 for m in masters)

    # left alone, the leader steps down (leaderFallbackTimeout) and refuses through on_failure
    # what it is asked. (A follower left alone keeps naming its dead leader: pysyncobj starts an
    # election only while connected to a peer. The master core proposes only as a serving leader.)
    for m in followers:
        m.close()
    wait_for(lambda: (v := leader.adapter.view()).role != "leader" and v.leader is None and not v.has_quorum, 20,
             "the lone leader to step down")
    leader.adapter.propose(submit(2), token=9)
    token, reason = leader.failures.get(timeout=10)
    assert (token, reason) == (9, "missing_leader") and reason in FAILURES.values()
    assert leader.results.empty() and not leader.has_job(2)


def test_a_master_with_an_empty_disk_is_given_the_leaders_snapshot(masters):
    leader = wait_for(lambda: leader_of(masters), 20, "one leader that every adapter names")
    for n in (1, 2, 3):
        leader.adapter.propose(submit(n), token=n)
        assert leader.results.get(timeout=10)[0] == n
    wait_for(lambda: all(m.has_job(3) for m in masters), 10, "the jobs on every ledger")
    # work specs and units live beside the ledger's state: the snapshot must carry them too
    leader.adapter.propose(AddWorkSpec({"name": "fetch", "run": {"kind": "command", "argv": ["true"]}}, NOW), token=5)
    leader.adapter.propose(AddUnits("fetch", [[f"u{i}", b"x"] for i in range(50)], NOW), token=6)
    assert [leader.results.get(timeout=10)[0] for _ in range(2)] == [5, 6]

    leader.adapter.replica.forceLogCompaction()  # pysyncobj's public call; else after 300 s
    snapshot = wait_for(lambda: leader.adapter.last_snapshot, 20, "the leader's snapshot")
    assert snapshot["bytes"] > 0 and snapshot["commands_applied"] >= 3
    assert (leader.data_dir / "ledger.snapshot").read_bytes().startswith(b"CZLEDGER1")

    # a follower loses its disk and comes back at the same address: the leader's log no longer
    # reaches back to the start, so the follower gets the snapshot, then the newer entries
    assert leader_of(masters) is leader
    lost = next(m for m in masters if m is not leader)
    lost.close()
    shutil.rmtree(lost.data_dir)
    lost.start()
    leader.adapter.propose(submit(4), token=4)
    assert leader.results.get(timeout=10)[0] == 4
    wait_for(lambda: all(lost.has_job(n) for n in (1, 2, 3, 4)), 30, "the restored follower to hold every job")
    restored = lost.adapter.last_snapshot
    assert restored is not None and restored.get("restored") is True, restored
    with leader.adapter.lock, lost.adapter.lock:
        assert lost.adapter.ledger.snapshot() == leader.adapter.ledger.snapshot()
        assert lost.adapter.ledger.work.summary() == leader.adapter.ledger.work.summary()
        assert "fetch" in lost.adapter.ledger.work.specs


class _Planted:
    """Unpickling this creates ``path``: the proof that a stranger's pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _frame(data: bytes) -> bytes:
    return struct.pack("i", len(data)) + data  # pysyncobj's framing


def _closed_by_peer(sock: socket.socket, deadline_s: float = 10.0) -> bool:
    sock.settimeout(deadline_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_strangers_pickle_on_the_raft_port_is_never_unpickled(masters, tmp_path):
    leader = wait_for(lambda: leader_of(masters), 20, "one leader that every adapter names")
    planted = tmp_path / "ran"
    host, port = leader.address.rsplit(":", 1)
    for payload in (zlib.compress(pickle.dumps(_Planted(planted))), pickle.dumps(_Planted(planted))):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(_frame(payload))
            assert _closed_by_peer(s), "the master kept a connection whose message did not authenticate"
    assert not planted.exists()
    leader.adapter.propose(submit(1), token=1)  # and the masters go on serving
    assert leader.results.get(timeout=10)[0] == 1


def test_a_huge_length_prefix_is_dropped_not_buffered(masters):
    leader = wait_for(lambda: leader_of(masters), 20, "one leader that every adapter names")
    before = _BoundedConnection.refused
    host, port = leader.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(struct.pack("i", 2**31 - 1) + b"\0" * 1024)  # announces 2 GiB
        assert _closed_by_peer(s), "the master waited for 2 GiB from a stranger"
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(struct.pack("i", UNAUTHENTICATED_MAX + 1))  # just over the bound
        assert _closed_by_peer(s)
    assert _BoundedConnection.refused == before + 2
    assert leader.adapter.detail()["connections_refused"] == before + 2  # what the status shows
    leader.adapter.propose(submit(1), token=1)
    assert leader.results.get(timeout=10)[0] == 1


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            out.add(address)
    return out


def test_the_raft_port_listens_on_exactly_the_configured_address(masters):
    for m in masters:
        port = int(m.address.rsplit(":", 1)[1])
        wait_for(lambda port=port: _listening(port), 10, "the Raft port to listen")
        assert _listening(port) == {"0100007F"}, "not 127.0.0.1 only (00000000 is every interface)"
