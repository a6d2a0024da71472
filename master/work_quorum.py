"""Redundant execution: a unit's replicas vote, and a quorum of workers decides (pure).

Theory of operation
-------------------
BOINC-style replication with a quorum (doc/workspecs.md, "Redundant execution"). A spec with
``replicas`` r runs each unit on r distinct workers, one replica after another; each finished
replica is a **ballot** (worker, digest of its whole output). The ``BallotBox`` of a unit table
keeps, for every undecided unit, its ballots and one output per distinct digest (the winner's
goes to the ``then`` spec). Once r distinct workers have voted, ``decide`` counts them: the
digest at least ``quorum`` workers agree on wins; with none, the unit fails. A decision whose
ballots disagreed is kept as a **dispute** (the winner or None, and every ballot) until a later
decision of the same unit agrees.

Workers are indices into the unit table's worker list. The unit table owns the ``votes``
column (ballots that counted, per unit) and the unit states; the box only keeps the ballots.
``to_state`` gives the snapshot's ``ballots``, ``outputs`` and ``disputes`` entries, in that
order (a persisted format).
"""

from __future__ import annotations

from typing import Any

Ballot = tuple[int, bytes]  # (worker index, digest)


class BallotBox:
    """The ballots, kept outputs and disputes of one spec's units."""

    def __init__(self) -> None:
        self.ballots: dict[int, list[Ballot]] = {}  # undecided unit -> its ballots, in order
        self.outputs: dict[int, dict[bytes, bytes]] = {}  # undecided unit -> digest -> output (for ``then``)
        # decided units whose ballots disagreed: unit -> (the winning digest or None: no quorum; every ballot)
        self.disputes: dict[int, tuple[bytes | None, list[Ballot]]] = {}

    def has_voted(self, uid: int, worker: int) -> bool:
        """Whether ``worker`` already cast a ballot on undecided ``uid``."""
        return any(w == worker for w, _ in self.ballots.get(uid, ()))

    def cast(self, uid: int, worker: int, digest: bytes, output: bytes) -> int:
        """``worker`` (who has not voted on ``uid`` yet) votes ``digest``; the first output of
        each digest is kept. Returns how many ballots ``uid`` has now."""
        ballots = self.ballots.setdefault(uid, [])
        ballots.append((worker, bytes(digest)))
        self.outputs.setdefault(uid, {}).setdefault(bytes(digest), bytes(output))
        return len(ballots)

    def decide(self, uid: int, quorum: int) -> tuple[bool, bytes | None]:
        """Count ``uid``'s ballots and forget them: (whether a digest has ``quorum`` votes, its
        output or None). Disagreeing ballots are kept as a dispute; an agreement (or a single
        ballot) ends a dispute of an earlier round, before a retry."""
        ballots = self.ballots.pop(uid, [])
        outputs = self.outputs.pop(uid, {})
        tally: dict[bytes, int] = {}
        for _, d in ballots:
            tally[d] = tally.get(d, 0) + 1
        best = max(tally, key=tally.__getitem__) if tally else None
        won = best is not None and tally[best] >= quorum
        if len(tally) > 1:
            self.disputes[uid] = (best if won else None, ballots)
        else:
            self.disputes.pop(uid, None)
        return won, (outputs.get(best, b"") if won else None)

    def forget(self, uid: int) -> None:
        """Drop ``uid``'s ballots and outputs (a retry: every replica runs again); its dispute,
        if any, stays until it is decided again."""
        self.ballots.pop(uid, None)
        self.outputs.pop(uid, None)

    def voters(self, uid: int) -> list[int]:
        """The workers that voted on undecided ``uid``, in order."""
        return [w for w, _ in self.ballots.get(uid, ())]

    def view(self, uid: int, workers: list[str]) -> dict[str, Any] | None:
        """``uid``'s votes, in words: each worker's digest (hex), and the decision; None for a
        unit with neither ballots nor a dispute."""
        if uid in self.disputes:
            winner, ballots = self.disputes[uid]
            return {"votes": [[workers[w], d.hex()] for w, d in ballots],
                    "winner": winner.hex() if winner is not None else None, "disputed": True}
        if uid in self.ballots:
            return {"votes": [[workers[w], d.hex()] for w, d in self.ballots[uid]], "winner": None,
                    "disputed": False}
        return None

    # ---- snapshots ----------------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """The snapshot's ``ballots``, ``outputs`` and ``disputes``, as plain lists."""
        return {"ballots": [[u, [[w, d] for w, d in b]] for u, b in self.ballots.items()],
                "outputs": [[u, [[d, o] for d, o in outs.items()]] for u, outs in self.outputs.items()],
                "disputes": [[u, win, [[w, d] for w, d in b]] for u, (win, b) in self.disputes.items()]}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "BallotBox":
        """From a snapshot (one from before redundant execution has none of the entries)."""
        box = cls()
        box.ballots = {int(u): [(int(w), bytes(d)) for w, d in b] for u, b in s.get("ballots", [])}
        box.outputs = {int(u): {bytes(d): bytes(o) for d, o in outs} for u, outs in s.get("outputs", [])}
        box.disputes = {int(u): (bytes(win) if win is not None else None, [(int(w), bytes(d)) for w, d in b])
                        for u, win, b in s.get("disputes", [])}
        return box

    def validate_state(self, n_workers: int, replicas: int | None = None, quorum: int | None = None) -> None:
        """Raise AssertionError if an invariant of the box does not hold: every undecided unit
        has ballots, from distinct known workers, and a kept output for each of its digests and
        no other; with the spec's ``replicas`` and ``quorum``, an undecided unit has fewer than
        ``replicas`` ballots and a dispute's winner has its quorum."""
        assert set(self.outputs) == set(self.ballots), "outputs kept for units without ballots, or none kept"
        for uid, ballots in self.ballots.items():
            voters = [w for w, _ in ballots]
            assert ballots and len(set(voters)) == len(voters), f"unit {uid}: no ballot, or a worker voted twice"
            assert all(0 <= w < n_workers for w in voters), f"unit {uid}: a ballot of an unknown worker"
            assert set(self.outputs[uid]) == {d for _, d in ballots}, f"unit {uid}: outputs and digests differ"
            assert replicas is None or len(ballots) < replicas, f"unit {uid}: all replicas voted, undecided"
        for uid, (winner, ballots) in self.disputes.items():
            assert len({d for _, d in ballots}) > 1, f"unit {uid}: a dispute without disagreement"
            assert winner is None or quorum is None or sum(d == winner for _, d in ballots) >= quorum, \
                f"unit {uid}: the winner of a dispute has no quorum"
