"""The work units of one spec: states, queues, leases and fencing, column by column (pure).

Theory of operation
-------------------
A spec's **work units** are ``(key, data)`` pairs added in batches, all or nothing. A unit is
available (waiting in a queue), pending (leased to a worker until ``lease_s`` after it was
handed out), finished, or failed; ``TRANSITIONS`` is the whole state machine:

    AVAILABLE --lease--> PENDING --done / quorum--> FINISHED
                         PENDING --lost, failed, a replica's vote--> AVAILABLE (attempts left)
                         PENDING --lost, failed, no quorum--> FAILED --retry--> AVAILABLE

A unit fails once it has failed ``max_attempts`` times of its own or been lost ``max_lost``
times (its worker died or its lease ran out): the two budgets are apart, as for tasks
(``master.attempts``), so that dead workers never use up the attempts of a sound unit.

Units are kept column by column (``UnitTable``): one numpy array per field (state, priority,
attempts, lease end, holder, fencing token, votes) and plain lists for keys and data, so that a
million units cost tens of bytes each, a snapshot is a handful of array copies, and "which
leases have expired" is one vectorised comparison. The available units wait in one FIFO per
unit priority. Composed into the table: the attempt history (``master.work_history``) and, for
redundant specs, the ballots (``master.work_quorum``). Workers are interned once per table
(``workers``) and referred to by index everywhere.

Nothing here reads a clock: ``now`` is an argument. ``to_state`` is the snapshot's form, and
its keys, their order, the columns' dtypes and ``UnitState``'s numbers are a persisted format.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum
from typing import Any, Collection, Iterable, Iterator

import numpy as np

from master import reasons
from master.work_history import DONE, LOST, Attempt, AttemptLog, Column
from master.work_offer import UnitOffer
from master.work_quorum import BallotBox
from master.work_specs import DEFAULT_MAX_LOST, MAX_DATA, MAX_KEY, WorkSpec, WorkSpecError, is_int32


class UnitState(IntEnum):
    """A unit's state, as the ``state`` column (uint8) stores it: never renumber."""

    AVAILABLE = 0
    PENDING = 1
    FINISHED = 2
    FAILED = 3


AVAILABLE, PENDING, FINISHED, FAILED = UnitState
STATE_NAMES = tuple(s.name.lower() for s in UnitState)  # ("available", "pending", "finished", "failed")

# the state machine of a unit (see the module docstring): state -> the states it may go to
TRANSITIONS: dict[UnitState, frozenset[UnitState]] = {
    AVAILABLE: frozenset({PENDING}),
    PENDING: frozenset({AVAILABLE, FINISHED, FAILED}),
    FINISHED: frozenset(),
    FAILED: frozenset({AVAILABLE}),
}


_OUT_OF_PENDING = TRANSITIONS[PENDING]  # where an ended attempt may leave its unit (``_settle``)


class IllegalTransition(RuntimeError):
    """The table was about to move a unit along no edge of ``TRANSITIONS``: a bug here, never
    a refusal of a command."""


# snapshot names of the table's columns, in the order ``to_state`` writes them (a persisted order)
_COLUMNS = ("state", "priority", "attempts", "lease_until", "holder", *AttemptLog.COLUMNS, "fence_term",
            "fence_seq", "votes", "lost")


class UnitTable:
    """The work units of one spec, column by column (see the module docstring)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.data: list[bytes] = []
        self.index: dict[str, int] = {}
        self.state = Column(np.uint8)
        self.priority = Column(np.int32)
        self.attempts = Column(np.uint8)
        self.lease_until = Column(np.float64, np.inf)
        self.holder = Column(np.int32, -1)
        self.fence_term = Column(np.int64)  # the fencing token of the unit's newest lease
        self.fence_seq = Column(np.int64)
        self.votes = Column(np.uint8)  # ballots that counted towards the unit's quorum
        # attempts lost (their worker died, their lease ran out): max_lost, not max_attempts, bounds them;
        # at most 100 + 100 + MAX_REPLICAS attempts in all, so uint8 holds them
        self.lost = Column(np.uint8)
        self.workers: list[str] = []  # worker index -> worker name
        self._worker_ix: dict[str, int] = {}
        self.available: dict[int, deque[int]] = {}  # unit priority -> FIFO of unit ids
        self.offer = UnitOffer()  # derived, not in the snapshot: the queues less the units in flight
        self.counts = [0, 0, 0, 0]  # per state
        self.history = AttemptLog()
        self.quorum = BallotBox()

    def __len__(self) -> int:
        return len(self.keys)

    # ---- adding ---------------------------------------------------------------------------------

    def add(self, units: list, priority: int = 0) -> int:
        """Add ``units``, each ``[key, data]`` (str, bytes) or ``[key, data, priority]``, all or
        nothing: a malformed unit or a key already there (or twice in the batch) refuses the
        whole batch. Returns how many were added."""
        keys, datas, prios = self._check_batch(units, priority)
        first = len(self.keys)
        n = len(keys)
        self.keys.extend(keys)
        self.data.extend(datas)
        self.index.update(zip(keys, range(first, first + n)))
        self.state.extend(np.full(n, AVAILABLE, np.uint8))
        self.priority.extend(np.array(prios, np.int32))
        self.attempts.extend(np.zeros(n, np.uint8))
        self.lease_until.extend(np.full(n, np.inf))
        self.holder.extend(np.full(n, -1, np.int32))
        self.fence_term.extend(np.zeros(n, np.int64))
        self.fence_seq.extend(np.zeros(n, np.int64))
        self.votes.extend(np.zeros(n, np.uint8))
        self.lost.extend(np.zeros(n, np.uint8))
        for uid, p in zip(range(first, first + n), prios):
            self.available.setdefault(p, deque()).append(uid)
            self.offer.queued(p, uid)
        self.counts[AVAILABLE] += n
        return n

    def _check_batch(self, units: list, priority: int) -> tuple[list[str], list[bytes], list[int]]:
        """The keys, data and priorities of a batch; raises WorkSpecError for the first bad unit."""
        keys, datas, prios = [], [], []
        seen: set[str] = set()
        for k, unit in enumerate(units):
            if not isinstance(unit, (list, tuple)) or len(unit) not in (2, 3):
                raise WorkSpecError("bad_units", f"unit {k} must be [key, data] or [key, data, priority], not {unit!r:.80}")
            key, data = unit[0], unit[1]
            if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY:
                raise WorkSpecError("bad_units", f"unit {k}: the key must be a non-empty string of at most {MAX_KEY} bytes")
            if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_DATA:
                raise WorkSpecError("bad_units", f"unit {k} ({key!r}): data must be bytes, at most {MAX_DATA}")
            p = unit[2] if len(unit) == 3 else priority
            if not is_int32(p):
                raise WorkSpecError("bad_units", f"unit {k} ({key!r}): priority must be an int32, not {p!r}")
            if key in self.index or key in seen:
                raise WorkSpecError("duplicate_key", f"unit {k}: key {key!r} is already a unit of this spec; "
                                                     "nothing of the batch was added")
            seen.add(key)
            keys.append(key)
            datas.append(bytes(data))
            prios.append(p)
        return keys, datas, prios

    # ---- leasing ----------------------------------------------------------------------------------

    def lease(self, n: int, worker: str, now: float, lease_s: float) -> list[int]:
        """Hand out up to ``n`` available units (highest unit priority first, FIFO within one)
        to ``worker`` until ``now + lease_s``; each starts an attempt."""
        out: list[int] = []
        for p in sorted(self.available, reverse=True):
            q = self.available[p]
            while q and len(out) < n:
                out.append(q.popleft())
                self.offer.left(p, out[-1])
            if not q:
                del self.available[p]
            if len(out) >= n:
                break
        if out:
            self._start(np.array(out, np.int64), worker, now, lease_s)
        return out

    def _start(self, ids: np.ndarray, worker: str, now: float, lease_s: float) -> None:
        """Units ``ids`` (available, out of their queues) start an attempt held by ``worker``."""
        if not np.all(self.state.data[ids] == AVAILABLE):  # TRANSITIONS: only AVAILABLE -> PENDING
            bad = ids[self.state.data[ids] != AVAILABLE].tolist()
            raise IllegalTransition(f"units {bad} leased while not available")
        w = self._worker(worker)
        self.state.data[ids] = PENDING
        self.lease_until.data[ids] = now + lease_s
        self.holder.data[ids] = w
        self.attempts.data[ids] += 1
        self.history.begin(ids, w, now)
        self.counts[AVAILABLE] -= len(ids)
        self.counts[PENDING] += len(ids)

    def peek(self, n: int, exclude: Collection[int] = frozenset()) -> list[int]:
        """The next ``n`` available units that ``lease`` would hand out, less those taken
        (``take``: proposed for assignment) and those in ``exclude``, without taking them.
        O(n + len(exclude)) at most: units taken are never skipped one by one."""
        return self.offer.peek(n, exclude)

    def take(self, uids: Iterable[int]) -> None:
        """``uids`` were proposed for assignment: ``peek`` passes them over until their lease
        commits or ``release`` (the leader's soft state: ``master.work_offer``)."""
        n, state, priority = len(self.keys), self.state.data, self.priority.data
        self.offer.take((u, priority.item(u)) for u in uids if 0 <= u < n and state.item(u) == AVAILABLE)

    def release(self, uids: Iterable[int]) -> None:
        """The proposal of ``uids`` is answered: those still available are offered again."""
        self.offer.release(uids, self.available)

    def release_all(self) -> None:
        """Nothing is in flight any more."""
        self.offer.release_all(self.available)

    def lease_ids(self, uids: list[int], holder: str, now: float, lease_s: float,
                  fences: list[tuple[int, int]]) -> list[int]:
        """Lease exactly ``uids`` (those still available; returns them) under their fencing
        tokens: what a committed assignment does. They sit at the front of their queues (``peek``
        took them from there), so taking them out is cheap."""
        taken, tokens = [], []
        seen: set[int] = set()
        for uid, fence in zip(uids, fences):
            # a unit named twice is leased once: its state changes only after the loop, and a
            # second pop would find its queue gone (a KeyError halfway, queues half-popped)
            if not 0 <= uid < len(self.keys) or uid in seen or self.state.data.item(uid) != AVAILABLE:
                continue
            seen.add(uid)
            p = self.priority.data.item(uid)
            q = self.available[p]
            if q[0] == uid:
                q.popleft()
            else:
                q.remove(uid)
            if not q:
                del self.available[p]
            self.offer.left(p, uid)
            taken.append(uid)
            tokens.append(fence)
        if taken:
            ids = np.array(taken, np.int64)
            self._start(ids, holder, now, lease_s)
            self.fence_term.data[ids] = [f[0] for f in tokens]
            self.fence_seq.data[ids] = [f[1] for f in tokens]
        return taken

    # ---- ending attempts ----------------------------------------------------------------------------

    def end(self, uid: int, outcome: int, now: float, max_attempts: int, worker: str | None = None,
            reason: tuple[str, str] | None = None, max_lost: int = DEFAULT_MAX_LOST) -> int:
        """End ``uid``'s open attempt with ``outcome`` (an ``AttemptOutcome``: DONE, LOST or
        FAILED_OUTCOME); returns the unit's new state (FINISHED, AVAILABLE again, or FAILED once
        it failed ``max_attempts`` times or was lost ``max_lost`` times; -1 for no such unit).
        ``worker``: who ran it, when known (the lease names who handed it out). A unit that is
        not pending (a late or duplicate report) is left as it is."""
        # .item() reads a plain int: numpy compares its own scalars with an IntEnum very slowly
        if not 0 <= uid < len(self.keys) or self.state.data.item(uid) != PENDING:
            return self.state.data.item(uid) if 0 <= uid < len(self.keys) else -1
        lost_out = False
        if outcome == LOST:
            self.lost.data[uid] += 1
            lost_out = self.lost.data.item(uid) >= max_lost
            if lost_out and reason is not None:  # the unit's last reason says why it failed for good
                reason = (reasons.line(reasons.lost_out(self.lost.data.item(uid), reason[0]), "lost"), reason[1])
        self._close(uid, outcome, now, worker, reason)
        if outcome == DONE:
            return self._settle(uid, FINISHED)
        return self._settle(uid, FAILED if lost_out or self._spent(uid, max_attempts) else AVAILABLE)

    def vote(self, uid: int, worker: str, digest: bytes, output: bytes, now: float, spec: WorkSpec
             ) -> tuple[int, bytes | None]:
        """A replica of a redundant unit finished on ``worker`` with an output whose digest is
        ``digest``. Until ``spec.replicas`` distinct workers have voted, the unit is available
        again (first in its queue, so that a unit's replicas follow each other); then the
        quorum decides: FINISHED with the winning output, or FAILED when no result has a
        quorum. Returns (new state, the winning output or None). A second result from a worker
        that already voted does not count (the attempt is recorded; the unit runs again)."""
        if not 0 <= uid < len(self.keys) or self.state.data.item(uid) != PENDING:
            return (self.state.data.item(uid) if 0 <= uid < len(self.keys) else -1), None
        self._close(uid, DONE, now, worker)
        w = self._worker(worker)
        if self.quorum.has_voted(uid, w):
            if self._spent(uid, spec.max_attempts):
                return self._decide(uid, spec.quorum)
            return self._settle(uid, AVAILABLE, first=True), None
        cast = self.quorum.cast(uid, w, digest, output)
        self.votes.data[uid] += 1
        if cast < spec.replicas:
            return self._settle(uid, AVAILABLE, first=True), None
        return self._decide(uid, spec.quorum)

    def _spent(self, uid: int, max_attempts: int) -> bool:
        """Whether ``uid`` used up its attempts: those that gave a vote, and those lost (their
        own budget, ``max_lost``), do not count."""
        own = self.attempts.data.item(uid) - self.votes.data.item(uid) - self.lost.data.item(uid)
        return own >= max_attempts

    def _decide(self, uid: int, quorum: int) -> tuple[int, bytes | None]:
        """Count the unit's votes (``BallotBox.decide``): (FINISHED, the winning output) or
        (FAILED, None)."""
        won, output = self.quorum.decide(uid, quorum)
        return self._settle(uid, FINISHED if won else FAILED), output

    def _close(self, uid: int, outcome: int, now: float, worker: str | None,
               reason: tuple[str, str] | None = None) -> None:
        """End the open attempt of pending ``uid``."""
        self.history.close(uid, outcome, now, self._worker(worker) if worker else None,
                           None if outcome == DONE else reason)
        self.counts[PENDING] -= 1
        self.lease_until.data[uid] = np.inf
        self.holder.data[uid] = -1

    def _settle(self, uid: int, new: UnitState, first: bool = False) -> UnitState:
        """A unit just out of PENDING (its callers checked that it was pending) takes state
        ``new`` (queued again when AVAILABLE)."""
        if new not in _OUT_OF_PENDING:
            raise IllegalTransition(f"unit {uid} cannot go from PENDING to {UnitState(new).name}")
        if new == AVAILABLE:
            p = self.priority.data.item(uid)
            q = self.available.setdefault(p, deque())
            q.appendleft(uid) if first else q.append(uid)
            self.offer.queued(p, uid, first)
        self.state.data[uid] = new
        self.counts[new] += 1
        return new

    def retry(self, uids: Iterable[int]) -> int:
        """Make failed units available again with a fresh attempt budget; returns how many."""
        n = 0
        for uid in uids:
            if 0 <= uid < len(self.keys) and self.state.data.item(uid) == FAILED:  # TRANSITIONS: FAILED -> AVAILABLE
                self.state.data[uid] = AVAILABLE
                self.attempts.data[uid] = 0
                self.votes.data[uid] = 0  # a redundant unit starts over: every replica runs again
                self.lost.data[uid] = 0
                self.quorum.forget(uid)
                p = self.priority.data.item(uid)
                self.available.setdefault(p, deque()).append(uid)
                self.offer.queued(p, uid)
                self.counts[FAILED] -= 1
                self.counts[AVAILABLE] += 1
                n += 1
        return n

    # ---- reading ------------------------------------------------------------------------------------

    def expired(self, now: float) -> np.ndarray:
        """Pending units whose lease ended before ``now`` (one vectorised pass)."""
        return np.flatnonzero((self.state.view == PENDING) & (self.lease_until.view < now))

    def held_by(self, worker: str) -> np.ndarray:
        """Pending units leased to ``worker``."""
        w = self._worker_ix.get(worker)
        if w is None:
            return np.zeros(0, np.int64)
        return np.flatnonzero((self.state.view == PENDING) & (self.holder.view == w))

    def leases(self) -> Iterator[tuple[int, int, int, str, float]]:
        """Every pending unit: (unit, fence term, fence sequence, holder, started)."""
        for uid in self.history.open:
            w, started = self.history.opened(uid)
            yield uid, self.fence_term.data.item(uid), self.fence_seq.data.item(uid), self.workers[w], started

    def attempts_of(self, uid: int) -> list[Attempt]:
        """The attempt history of one unit, oldest first."""
        return self.history.of(uid, self.workers)

    def summary(self) -> dict[str, int]:
        """Units per state and in total (Coordinate's ``summary`` row)."""
        return {**dict(zip(STATE_NAMES, self.counts)), "total": len(self.keys)}

    @property
    def disputes(self) -> dict[int, tuple[bytes | None, list[tuple[int, bytes]]]]:
        """Decided units whose votes disagreed (``BallotBox.disputes``)."""
        return self.quorum.disputes

    def avoid(self, uid: int) -> list[str]:
        """The workers that already voted on ``uid``: its next replica must run elsewhere."""
        return [self.workers[w] for w in self.quorum.voters(uid)]

    def ballots_view(self, uid: int) -> dict[str, Any] | None:
        """A redundant unit's votes, in words: each worker's digest (hex), and the decision."""
        return self.quorum.view(uid, self.workers)

    def _worker(self, name: str) -> int:
        ix = self._worker_ix.get(name)
        if ix is None:
            ix = self._worker_ix[name] = len(self.workers)
            self.workers.append(name)
        return ix

    # ---- snapshots ----------------------------------------------------------------------------------

    def _columns(self) -> dict[str, Column]:
        """Every column by its snapshot name, in ``_COLUMNS`` order."""
        history = self.history.columns()
        return {name: history[name] if name in history else getattr(self, name) for name in _COLUMNS}

    def to_state(self) -> dict[str, Any]:
        """Everything, as plain values and bytes (for the ledger's msgspec snapshot)."""
        # "lost" came later: a table that never lost an attempt keeps its older form
        cols = {name: col.view.tobytes() for name, col in self._columns().items()
                if name != "lost" or col.view.any()}
        out = {"keys": self.keys, "data": self.data, "workers": self.workers,
               "available": [[p, list(q)] for p, q in self.available.items()],
               "open": [[u, r] for u, r in self.history.open.items()], **self.quorum.to_state(), **cols}
        if self.history.reasons:  # only then: a table without failures keeps its older form
            out["reasons"] = [[r, line, tail] for r, (line, tail) in self.history.reasons.items()]
        return out

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "UnitTable":
        t = cls()
        t.keys, t.data, t.workers = list(s["keys"]), list(s["data"]), list(s["workers"])
        t.index = dict(zip(t.keys, range(len(t.keys))))
        t._worker_ix = {w: i for i, w in enumerate(t.workers)}
        for name, col in t._columns().items():
            col.restore(s.get(name), len(t.keys))  # a snapshot from before the column: its fill for every unit
        t.available = {int(p): deque(q) for p, q in s["available"]}
        t.offer = UnitOffer.of(t.available)
        t.history.open = {int(u): int(r) for u, r in s["open"]}
        t.history.reasons = {int(r): (line, tail) for r, line, tail in s.get("reasons", ())}  # none before reasons
        t.quorum = BallotBox.from_state(s)
        t.counts = [int(np.count_nonzero(t.state.view == k)) for k in UnitState]
        return t

    # ---- invariants ---------------------------------------------------------------------------------

    def validate_state(self, spec: WorkSpec | None = None) -> None:
        """Raise AssertionError if an invariant does not hold (tests call this after every
        operation). ``spec``, when given, adds the checks that need its replicas and quorum."""
        n = len(self.keys)
        assert n == len(self.data) == len(self.index), "keys, data and the key index differ in length"
        assert all(col.n == n for name, col in self._columns().items() if name not in AttemptLog.COLUMNS), \
            "a unit column differs in length"
        assert all(self.index[k] == u for u, k in enumerate(self.keys)), "the key index is stale"
        assert self._worker_ix == {w: i for i, w in enumerate(self.workers)}, "the worker index is stale"
        state = self.state.view
        assert np.all(state <= max(UnitState)), "a unit in an unknown state"
        assert self.counts == [int(np.count_nonzero(state == s)) for s in UnitState], "stale state counts"
        self._validate_queues()
        self._validate_leases()
        self.history.validate_state(n, len(self.workers))
        assert sorted(self.history.open) == np.flatnonzero(state == PENDING).tolist(), \
            "the open attempts are not exactly the pending units"
        self._validate_votes(spec)

    def _validate_queues(self) -> None:
        """Exactly the available units are queued, once, under their own priority; no queue is
        empty."""
        queued = 0
        for p, q in self.available.items():
            assert q, f"an empty queue for priority {p}"
            ids = np.fromiter(q, np.int64, len(q))
            assert np.all(self.priority.data[ids] == p), f"a unit queued under another priority than {p}"
            assert np.all(self.state.data[ids] == AVAILABLE), f"a unit queued under priority {p} is not available"
            queued += len(q)
        assert queued == self.counts[AVAILABLE], "an available unit is not queued, or one is queued twice"
        self.offer.validate(self.available)

    def _validate_leases(self) -> None:
        """Exactly the pending units hold a lease: a lease end and a known holder; a unit not
        pending has neither."""
        pending = self.state.view == PENDING
        holder, until = self.holder.view, self.lease_until.view
        assert np.all(holder[~pending] == -1) and np.all(until[~pending] == np.inf), "a lease on a unit not pending"
        assert np.all((holder[pending] >= 0) & (holder[pending] < len(self.workers))), "a pending unit without holder"
        assert not np.any(np.isnan(until[pending])) and np.all(until[pending] < np.inf), "a lease without an end"
        assert np.all(self.attempts.view >= pending), "a pending unit without an attempt"

    def _validate_votes(self, spec: WorkSpec | None) -> None:
        """Votes never exceed attempts; an undecided unit's votes are its ballots; a unit whose
        votes still count (available or pending) has its ballots kept."""
        votes, state = self.votes.view, self.state.view
        assert np.all(votes <= self.attempts.view), "more votes than attempts"
        assert np.all(votes.astype(np.int32) + self.lost.view <= self.attempts.view), "more votes and losses than attempts"
        for uid in self.quorum.ballots:
            assert int(state[uid]) in (AVAILABLE, PENDING, FAILED), f"unit {uid}: decided, but its ballots are kept"
            assert len(self.quorum.ballots[uid]) == votes[uid], f"unit {uid}: votes and ballots differ"
        waiting = np.flatnonzero((votes > 0) & ((state == AVAILABLE) | (state == PENDING)))
        assert all(int(u) in self.quorum.ballots for u in waiting), "an undecided unit lost its ballots"
        replicas, quorum = (spec.replicas, spec.quorum) if spec is not None else (None, None)
        self.quorum.validate_state(len(self.workers), replicas, quorum)
