"""How fast a master that was away catches up with the leader, through master/raft.py: three
``RaftAdapter``s in this process on 127.0.0.1 (``test_raft_adapter.Master``), each with its own
ledger, journal and snapshot file.

Theory of operation. A master comes back in one of two states. Its log may be a prefix of the
leader's, or the leader may have compacted past it: then it is sent entries or the leader's
snapshot, and either takes well under a second for a ledger of megabytes. Or its log ends in
entries the leader never had: it led a term alone, and what it appended then never committed (the
chaos soak: masters killed and restarted while leading without a quorum). pysyncobj's leader
streams every batch of a tick and obeys its follower's last answer; its follower answers the
first batch "from my conflicting entry" and the later ones "from my end + 1", so the leader went
back and forth between those two for good, and the master caught up only when the leader next
compacted its log and sent a snapshot (every 300 s). With a second master down, nothing committed
meanwhile. ``_RaftTransport`` now points the leader past the whole conflicting tail at once.

Conditions are polled with deadlines; the figures are printed.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from cluster.local import free_port
from master.commands import SubmitJob
from master.ledger import spec_digest
from master.raft import _RaftTransport

from .conftest import wait_for
from .test_raft_adapter import Master, leader_of

pytestmark = pytest.mark.integration

SPEC = {"count": 2, "note": "x" * 500}  # an entry of about 600 bytes: a 64 KiB batch holds ~100


def job(n: int) -> SubmitJob:
    return SubmitJob(n.to_bytes(16, "big"), (10**6 + n).to_bytes(16, "big"), spec_digest("range", SPEC), "range",
                     SPEC, "test", 1_000.0)


def commit(leader: Master, numbers: range | list[int]) -> None:
    for n in numbers:
        leader.adapter.propose(job(n), token=n)
    for _ in numbers:
        token, result, _ = leader.results.get(timeout=30)
        assert result.ok, (token, result)


def same_ledger(a: Master, b: Master) -> bool:
    with a.adapter.lock, b.adapter.lock:
        return a.adapter.ledger.snapshot() == b.adapter.ledger.snapshot()


@pytest.fixture
def group(tmp_path):
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    masters = [Master(a, tmp_path / f"m{i}", [p for p in addresses if p != a]) for i, a in enumerate(addresses, 1)]
    try:
        for m in masters:
            m.start()
        yield masters
    finally:
        for m in masters:
            m.close()


def test_a_master_back_with_entries_the_leader_never_had_catches_up(group):
    old = wait_for(lambda: leader_of(group), 20, "one leader that every adapter names")
    commit(old, range(100))
    wait_for(lambda: all(m.has_job(99) for m in group), 10, "the jobs on every ledger")

    # the leader loses both followers and appends what can never commit, then is killed
    others = [m for m in group if m is not old]
    for m in others:
        m.close()
    size = old.adapter.view().log_size
    for n in range(1000, 1100):
        old.adapter.propose(job(n), token=n)
    wait_for(lambda: old.adapter.view().log_size >= size + 100, 10, "the uncommitted tail in the old leader's log")
    old.close()

    # the others go on: 300 entries (several batches) past the end of the old leader's log
    for m in others:
        m.start()
    commit(wait_for(lambda: leader_of(group), 20, "a leader of the two"), range(100, 400))
    # and elect again, so the leader's next index for the absent master is the end of its log
    restarted = next(m for m in others if m.adapter.view().role == "leader")
    restarted.close()
    restarted.start()
    leader = wait_for(lambda: leader_of(group), 20, "a leader in a newer term")
    commit(leader, [400])

    started = time.monotonic()
    old.start()
    wait_for(lambda: same_ledger(old, leader), 30, "the old leader to hold the leader's ledger")
    took = time.monotonic() - started
    print(f"\n[raft catchup] a master back with 100 entries the leader never had, 300 behind: "
          f"caught up in {took:.2f} s (by entries: {old.adapter.last_snapshot is None})")
    assert not any(old.has_job(n) for n in range(1000, 1100)), "the uncommitted tail was applied"
    assert old.adapter.view().commit_index == leader.adapter.view().commit_index


def test_a_restarted_follower_catches_up_from_a_snapshot(group):
    leader = wait_for(lambda: leader_of(group), 20, "one leader that every adapter names")
    commit(leader, range(1500))
    away = next(m for m in group if m is not leader)
    away.close()
    commit(leader, range(1500, 2000))
    leader.adapter.replica.forceLogCompaction()  # pysyncobj's public call; else after 300 s
    snapshot = wait_for(lambda: leader.adapter.last_snapshot, 30, "the leader's snapshot")
    assert snapshot["bytes"] > 1_000_000, snapshot

    started = time.monotonic()
    away.start()
    wait_for(lambda: same_ledger(away, leader), 30, "the follower to hold the leader's ledger")
    took = time.monotonic() - started
    restored = away.adapter.last_snapshot
    assert restored is not None and restored.get("restored") is True, restored
    print(f"\n[raft catchup] a follower restarted with its journal, the leader compacted past it: "
          f"caught up from a {snapshot['bytes'] / 1e6:.1f} MB snapshot in {took:.2f} s")


def _follower(terms: list[int], commit_index: int) -> SimpleNamespace:
    """What ``_note_conflict`` reads of a follower: a log from index 1 with these terms."""
    raft = SimpleNamespace(_SyncObj__raftLog=[(b"", i, t) for i, t in enumerate(terms, 1)],
                           _getTerm=lambda: max(terms), raftCommitIndex=commit_index)
    return SimpleNamespace(_syncObj=raft, _resend_from={})


@pytest.mark.parametrize("terms, commit_index, prev, prev_term, hint", [
    # the follower's tail is an older term than the leader's entry: back to where that term began
    ([0, 1, 1, 1, 2, 2, 2, 2], 3, 7, 3, 5),
    # ...but never to or below its commit index
    ([0, 1, 1, 1, 1, 1, 1, 1], 4, 7, 2, 5),
    # the follower's tail is a newer term than the leader's entry: every entry of a newer term
    ([0, 1, 1, 3, 3, 4, 4, 4], 2, 7, 2, 4),
    # the entries agree: nothing to remember
    ([0, 1, 1, 2, 2, 2], 2, 5, 2, None),
])
def test_the_hint_is_the_first_entry_that_cannot_be_the_leaders(terms, commit_index, prev, prev_term, hint):
    follower, node = _follower(terms, commit_index), object()
    message = {"type": "append_entries", "term": max(terms) + 1, "prevLogIdx": prev, "prevLogTerm": prev_term}
    _RaftTransport._note_conflict(follower, node, message)
    assert follower._resend_from.get(node) == hint
    if hint is not None:  # every refusal names it until an append fits
        refusal = {"type": "next_node_idx", "next_node_idx": len(terms) + 1, "reset": True, "success": False}
        assert _RaftTransport._steer(follower, node, refusal)["next_node_idx"] == hint
        _RaftTransport._steer(follower, node, {**refusal, "reset": False, "success": True})
        assert node not in follower._resend_from
