"""Work specs and work units: the Coordinate model's state and scheduling, as a pure core.

Theory of operation
-------------------
A **work spec** names what to run (``run``: a callable, a command template or a tile kind, as a
job's ``run``) and how it is scheduled: ``priority`` (absolute: a spec runs only when every spec
of higher priority can take no more), ``weight`` (among specs of equal priority, running slots
are shared in proportion to weight), ``max_running``, ``max_attempts``, ``lease_s`` and
``then`` (the spec fed each finished unit's output). Its **work units** are ``(key, data)``
pairs added in batches; a unit is available, pending (leased to a worker until ``lease_s``
after it was handed out), finished, or failed; a lost or failed attempt makes it available
again until its attempts run out. Every attempt is recorded (worker, start, end, outcome).

Units are kept column by column (``UnitTable``): one numpy array per field (state, priority,
attempts, lease end, holder) and plain lists for keys and data, so that a million units cost
tens of bytes each, a snapshot is a handful of array copies, and "which leases have expired" is
one vectorised comparison. The available units wait in one FIFO per unit priority.

A spec with ``replicas`` r runs each unit on r distinct workers, one replica after another
(each names the workers that voted before it, and the balancer avoids them); the digests of
their outputs are votes, and the one ``quorum`` workers agree on wins (``UnitTable.vote``).
Disagreements are kept (``disputes``). A ``continuous`` spec gets a unit every ``interval``
while none of its units waits or runs (``WorkState.due``/``make_units``).

``allocate`` decides how many units each spec gets when the balancers ask for ``n``: strict
priority between tiers, then, within a tier, one slot at a time to the spec whose running
count is lowest relative to its weight (stride scheduling: the shares converge to the weights),
never past ``max_running`` or a spec's available units.

Nothing here reads a clock, a socket or a disk: ``now`` is an argument, as everywhere in the
ledger, so that every master applying the same commands reaches the same state.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import pickle
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

import numpy as np

AVAILABLE, PENDING, FINISHED, FAILED = 0, 1, 2, 3
STATE_NAMES = ("available", "pending", "finished", "failed")
DONE, LOST, FAILED_OUTCOME = 0, 1, 2  # how an attempt ended
OUTCOME_NAMES = ("done", "lost", "failed")
MAX_KEY = 1024  # bytes of a unit key
MAX_DATA = 64 << 10  # bytes of a unit's data; bigger inputs belong in storage files
SPEC_KEYS = frozenset(("name", "run", "priority", "weight", "max_running", "max_attempts", "lease_s", "then",
                       "paused", "replicas", "quorum", "compare", "continuous", "interval"))
MAX_REPLICAS = 15
COMPARE_MODES = ("bytes", "text", "json")  # how a worker digests an output for the quorum (worker.tasks)


class WorkSpecError(ValueError):
    """A spec or a batch of units the ledger refuses; ``code`` is stable, ``text`` says why."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class WorkSpec:
    """A validated work spec (see the module docstring)."""

    name: str
    run: dict[str, Any]
    priority: int = 0
    weight: float = 1.0
    max_running: int | None = None
    max_attempts: int = 3
    lease_s: float = 300.0
    then: str | None = None
    paused: bool = False
    replicas: int = 1  # distinct workers each unit runs on
    quorum: int = 1  # of those, how many must agree
    compare: str = "bytes"
    continuous: bool = False  # a unit is made every ``interval`` s while the spec has none waiting or running
    interval: float = 60.0
    last_made: float = -math.inf  # when the last continuous unit was made (ledger time)


def validate_spec(spec: Any, known: Iterable[str] = ()) -> WorkSpec:
    """Check a submitted spec; ``known`` are the specs already there (for ``then``).
    Raises WorkSpecError naming the field."""
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise WorkSpecError("bad_spec", "a work spec is a map with string keys")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise WorkSpecError("bad_spec", f"a work spec has no {', '.join(repr(k) for k in unknown)}; "
                                        f"it takes {', '.join(sorted(SPEC_KEYS))}")
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 200 or "/" in name:
        raise WorkSpecError("bad_spec", f"'name' must be 1-200 characters without '/', not {name!r}")
    run = spec.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("kind"), str):
        raise WorkSpecError("bad_spec", "'run' must be a map with a 'kind' (call, command, tile...)")
    priority = spec.get("priority", 0)
    if not _is_int(priority) or not -(2**31) <= priority < 2**31:
        raise WorkSpecError("bad_spec", f"'priority' must be an integer, not {priority!r}")
    weight = spec.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise WorkSpecError("bad_weight", f"'weight' must be a positive number (a share of the running slots), "
                                          f"not {weight!r}")
    max_running = spec.get("max_running")
    if max_running is not None and (not _is_int(max_running) or max_running < 0):
        raise WorkSpecError("bad_spec", f"'max_running' must be a non-negative integer or absent, not {max_running!r}")
    max_attempts = spec.get("max_attempts", 3)
    if not _is_int(max_attempts) or not 1 <= max_attempts <= 100:
        raise WorkSpecError("bad_spec", f"'max_attempts' must be an integer from 1 to 100, not {max_attempts!r}")
    lease_s = spec.get("lease_s", 300)
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not 0 < lease_s <= 7 * 86400:
        raise WorkSpecError("bad_spec", f"'lease_s' must be seconds from 0 to a week, not {lease_s!r}")
    then = spec.get("then")
    if then is not None:
        if not isinstance(then, str):
            raise WorkSpecError("bad_spec", f"'then' names another work spec, not {then!r}")
        if then == name:
            raise WorkSpecError("then_cycle", f"spec {name!r} cannot feed itself ('then' is its own name)")
        if then not in set(known):
            raise WorkSpecError("unknown_spec", f"'then' names {then!r}, which is not a work spec; add it first")
    paused = spec.get("paused", False)
    if not isinstance(paused, bool):
        raise WorkSpecError("bad_spec", f"'paused' must be true or false, not {paused!r}")
    replicas = spec.get("replicas", 1)
    if not _is_int(replicas) or not 1 <= replicas <= MAX_REPLICAS:
        raise WorkSpecError("bad_replicas", f"'replicas' must be an integer from 1 to {MAX_REPLICAS}, not {replicas!r}")
    quorum = spec.get("quorum", replicas // 2 + 1)
    if not _is_int(quorum) or not replicas // 2 < quorum <= replicas:
        # a majority, so that at most one result can win
        raise WorkSpecError("bad_replicas", f"'quorum' must be a majority of the {replicas} replicas "
                                            f"(from {replicas // 2 + 1} to {replicas}), not {quorum!r}")
    compare = spec.get("compare", "bytes")
    if compare not in COMPARE_MODES:
        raise WorkSpecError("bad_spec", f"'compare' must be one of {', '.join(COMPARE_MODES)}, not {compare!r}")
    continuous = spec.get("continuous", False)
    if not isinstance(continuous, bool):
        raise WorkSpecError("bad_spec", f"'continuous' must be true or false, not {continuous!r}")
    interval = spec.get("interval", 60)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 1 <= interval <= 365 * 86400:
        raise WorkSpecError("bad_spec", f"'interval' must be seconds from 1 to a year, not {interval!r}")
    return WorkSpec(name, run, priority, float(weight), max_running, max_attempts, float(lease_s), then, paused,
                    replicas, quorum, compare, continuous, float(interval))


def check_chain(specs: dict[str, WorkSpec], name: str, then: str | None) -> None:
    """Refuse a ``then`` that closes a cycle through existing specs."""
    path = [name]
    while then is not None:
        path.append(then)
        if then in path[:-1]:
            raise WorkSpecError("then_cycle", f"'then' makes a cycle: {' -> '.join(path)}")
        then = specs[then].then if then in specs else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Column:
    """A growable numpy column (amortised doubling)."""

    def __init__(self, dtype: Any, fill: Any = 0) -> None:
        self.fill = fill
        self.data = np.full(16, fill, dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.data):
            grown = np.full(max(need, 2 * len(self.data)), self.fill, self.data.dtype)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.data[self.n:need] = values
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self.data[:self.n]


@dataclass
class Attempt:
    """One attempt of a unit, as the history keeps it."""

    unit: int
    worker: str
    start: float
    end: float | None
    outcome: str | None


class UnitTable:
    """The work units of one spec, column by column (see the module docstring)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.data: list[bytes] = []
        self.index: dict[str, int] = {}
        self.state = _Column(np.uint8)
        self.priority = _Column(np.int32)
        self.attempts = _Column(np.uint8)
        self.lease_until = _Column(np.float64, np.inf)
        self.holder = _Column(np.int32, -1)
        self.fence_term = _Column(np.int64)  # the fencing token of the unit's newest lease
        self.fence_seq = _Column(np.int64)
        self.workers: list[str] = []  # holder index -> worker name
        self._worker_ix: dict[str, int] = {}
        self.available: dict[int, deque[int]] = {}  # unit priority -> FIFO of unit ids
        self.counts = [0, 0, 0, 0]  # per state
        # the attempt history, one row per attempt (unit, worker, start, end, outcome; end NaN: open)
        self.h_unit = _Column(np.int64)
        self.h_worker = _Column(np.int32)
        self.h_start = _Column(np.float64)
        self.h_end = _Column(np.float64, np.nan)
        self.h_outcome = _Column(np.int8, -1)
        self.open_attempt: dict[int, int] = {}  # unit -> its open history row
        # redundant execution: results that count towards a unit's quorum (one per distinct worker)
        self.votes = _Column(np.uint8)
        self.ballots: dict[int, list[tuple[int, bytes]]] = {}  # undecided unit -> (worker, digest) per vote
        self.outputs: dict[int, dict[bytes, bytes]] = {}  # undecided unit -> digest -> output (for ``then``)
        # decided units whose votes disagreed: unit -> (the winning digest or None: no quorum; every vote)
        self.disputes: dict[int, tuple[bytes | None, list[tuple[int, bytes]]]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    # ---- adding ---------------------------------------------------------------------------------

    def add(self, units: list, priority: int = 0) -> int:
        """Add ``units``, each ``[key, data]`` (str, bytes) or ``[key, data, priority]``, all or
        nothing: a malformed unit or a key already there (or twice in the batch) refuses the
        whole batch. Returns how many were added."""
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
            if not _is_int(p) or not -(2**31) <= p < 2**31:
                raise WorkSpecError("bad_units", f"unit {k} ({key!r}): priority must be an int32, not {p!r}")
            if key in self.index or key in seen:
                raise WorkSpecError("duplicate_key", f"unit {k}: key {key!r} is already a unit of this spec; "
                                                     "nothing of the batch was added")
            seen.add(key)
            keys.append(key)
            datas.append(bytes(data))
            prios.append(p)
        first = len(self.keys)
        n = len(keys)
        self.keys.extend(keys)
        self.data.extend(datas)
        self.index.update(zip(keys, range(first, first + n)))
        self.state.extend(np.zeros(n, np.uint8))
        self.priority.extend(np.array(prios, np.int32))
        self.attempts.extend(np.zeros(n, np.uint8))
        self.lease_until.extend(np.full(n, np.inf))
        self.holder.extend(np.full(n, -1, np.int32))
        self.fence_term.extend(np.zeros(n, np.int64))
        self.fence_seq.extend(np.zeros(n, np.int64))
        self.votes.extend(np.zeros(n, np.uint8))
        for uid, p in zip(range(first, first + n), prios):
            self.available.setdefault(p, deque()).append(uid)
        self.counts[AVAILABLE] += n
        return n

    # ---- leasing ----------------------------------------------------------------------------------

    def lease(self, n: int, worker: str, now: float, lease_s: float) -> list[int]:
        """Hand out up to ``n`` available units (highest unit priority first, FIFO within one)
        to ``worker`` until ``now + lease_s``; each starts an attempt."""
        out: list[int] = []
        for p in sorted(self.available, reverse=True):
            q = self.available[p]
            while q and len(out) < n:
                out.append(q.popleft())
            if not q:
                del self.available[p]
            if len(out) >= n:
                break
        if out:
            self._start(np.array(out, np.int64), worker, now, lease_s)
        return out

    def _start(self, ids: np.ndarray, worker: str, now: float, lease_s: float) -> None:
        """Units ``ids`` (available, out of their queues) start an attempt held by ``worker``."""
        w = self._worker(worker)
        self.state.data[ids] = PENDING
        self.lease_until.data[ids] = now + lease_s
        self.holder.data[ids] = w
        self.attempts.data[ids] += 1
        first = self.h_unit.n
        self.h_unit.extend(ids)
        self.h_worker.extend(np.full(len(ids), w, np.int32))
        self.h_start.extend(np.full(len(ids), now))
        self.h_end.extend(np.full(len(ids), np.nan))
        self.h_outcome.extend(np.full(len(ids), -1, np.int8))
        self.open_attempt.update(zip(ids.tolist(), range(first, first + len(ids))))
        self.counts[AVAILABLE] -= len(ids)
        self.counts[PENDING] += len(ids)

    def peek(self, n: int, exclude: set[int] | frozenset = frozenset()) -> list[int]:
        """The next ``n`` available units that ``lease`` would hand out, skipping ``exclude``
        (units already proposed for assignment), without taking them."""
        out: list[int] = []
        for p in sorted(self.available, reverse=True):
            for uid in self.available[p]:
                if uid not in exclude:
                    out.append(uid)
                    if len(out) >= n:
                        return out
        return out

    def lease_ids(self, uids: list[int], holder: str, now: float, lease_s: float,
                  fences: list[tuple[int, int]]) -> list[int]:
        """Lease exactly ``uids`` (those still available; returns them) under their fencing
        tokens: what a committed assignment does. They sit at the front of their queues (``peek``
        took them from there), so taking them out is cheap."""
        taken, tokens = [], []
        for uid, fence in zip(uids, fences):
            if not 0 <= uid < len(self.keys) or self.state.data[uid] != AVAILABLE:
                continue
            p = int(self.priority.data[uid])
            q = self.available[p]
            if q[0] == uid:
                q.popleft()
            else:
                q.remove(uid)
            if not q:
                del self.available[p]
            taken.append(uid)
            tokens.append(fence)
        if taken:
            ids = np.array(taken, np.int64)
            self._start(ids, holder, now, lease_s)
            self.fence_term.data[ids] = [f[0] for f in tokens]
            self.fence_seq.data[ids] = [f[1] for f in tokens]
        return taken

    def end(self, uid: int, outcome: int, now: float, max_attempts: int, worker: str | None = None) -> int:
        """End ``uid``'s open attempt with ``outcome`` (DONE, LOST or FAILED_OUTCOME); returns
        the unit's new state (FINISHED, AVAILABLE again, or FAILED once its attempts ran out).
        ``worker``: who ran it, when known (the lease names who handed it out). A unit that is
        not pending (a late or duplicate report) is left as it is."""
        if not 0 <= uid < len(self.keys) or self.state.data[uid] != PENDING:
            return int(self.state.data[uid]) if 0 <= uid < len(self.keys) else -1
        self._close(uid, outcome, now, worker)
        if outcome == DONE:
            return self._settle(uid, FINISHED)
        # the attempts that gave a vote do not count against the budget
        if int(self.attempts.data[uid]) - int(self.votes.data[uid]) >= max_attempts:
            return self._settle(uid, FAILED)
        return self._settle(uid, AVAILABLE)

    def vote(self, uid: int, worker: str, digest: bytes, output: bytes, now: float, spec: WorkSpec
             ) -> tuple[int, bytes | None]:
        """A replica of a redundant unit finished on ``worker`` with an output whose digest is
        ``digest``. Until ``spec.replicas`` distinct workers have voted, the unit is available
        again (first in its queue, so that a unit's replicas follow each other); then the
        quorum decides: FINISHED with the winning output, or FAILED when no result has a
        quorum. Returns (new state, the winning output or None). A second result from a worker
        that already voted does not count (the attempt is recorded; the unit runs again)."""
        if not 0 <= uid < len(self.keys) or self.state.data[uid] != PENDING:
            return (int(self.state.data[uid]) if 0 <= uid < len(self.keys) else -1), None
        self._close(uid, DONE, now, worker)
        w = self._worker(worker)
        ballots = self.ballots.setdefault(uid, [])
        if any(bw == w for bw, _ in ballots):
            if int(self.attempts.data[uid]) - int(self.votes.data[uid]) >= spec.max_attempts:
                return self._decide(uid, spec.quorum)
            return self._settle(uid, AVAILABLE, first=True), None
        ballots.append((w, bytes(digest)))
        self.outputs.setdefault(uid, {}).setdefault(bytes(digest), bytes(output))
        self.votes.data[uid] += 1
        if len(ballots) < spec.replicas:
            return self._settle(uid, AVAILABLE, first=True), None
        return self._decide(uid, spec.quorum)

    def _decide(self, uid: int, quorum: int) -> tuple[int, bytes | None]:
        """Count the unit's votes: the result at least ``quorum`` workers agree on wins.
        Returns (FINISHED or FAILED, the winning output or None)."""
        ballots = self.ballots.pop(uid, [])
        outputs = self.outputs.pop(uid, {})
        tally: dict[bytes, int] = {}
        for _, d in ballots:
            tally[d] = tally.get(d, 0) + 1
        best = max(tally, key=tally.__getitem__) if tally else None
        won = best is not None and tally[best] >= quorum
        if len(tally) > 1:
            self.disputes[uid] = (best if won else None, ballots)
        else:  # agreement (or a single vote): a dispute of an earlier round, before a retry, is over
            self.disputes.pop(uid, None)
        if won:
            return self._settle(uid, FINISHED), outputs.get(best, b"")
        return self._settle(uid, FAILED), None

    def _close(self, uid: int, outcome: int, now: float, worker: str | None) -> None:
        """End the open attempt of pending ``uid``."""
        row = self.open_attempt.pop(uid)
        if worker:
            self.h_worker.data[row] = self._worker(worker)
        self.h_end.data[row] = now
        self.h_outcome.data[row] = outcome
        self.counts[PENDING] -= 1
        self.lease_until.data[uid] = np.inf
        self.holder.data[uid] = -1

    def _settle(self, uid: int, new: int, first: bool = False) -> int:
        """A unit just out of PENDING takes state ``new`` (queued again when AVAILABLE)."""
        if new == AVAILABLE:
            q = self.available.setdefault(int(self.priority.data[uid]), deque())
            q.appendleft(uid) if first else q.append(uid)
        self.state.data[uid] = new
        self.counts[new] += 1
        return new

    def expired(self, now: float) -> np.ndarray:
        """Pending units whose lease ended before ``now`` (one vectorised pass)."""
        return np.flatnonzero((self.state.view == PENDING) & (self.lease_until.view < now))

    def held_by(self, worker: str) -> np.ndarray:
        """Pending units leased to ``worker``."""
        w = self._worker_ix.get(worker)
        if w is None:
            return np.zeros(0, np.int64)
        return np.flatnonzero((self.state.view == PENDING) & (self.holder.view == w))

    def retry(self, uids: Iterable[int]) -> int:
        """Make failed units available again with a fresh attempt budget; returns how many."""
        n = 0
        for uid in uids:
            if 0 <= uid < len(self.keys) and self.state.data[uid] == FAILED:
                self.state.data[uid] = AVAILABLE
                self.attempts.data[uid] = 0
                self.votes.data[uid] = 0  # a redundant unit starts over: every replica runs again
                self.ballots.pop(uid, None)
                self.outputs.pop(uid, None)
                self.available.setdefault(int(self.priority.data[uid]), deque()).append(uid)
                self.counts[FAILED] -= 1
                self.counts[AVAILABLE] += 1
                n += 1
        return n

    def attempts_of(self, uid: int) -> list[Attempt]:
        """The attempt history of one unit, oldest first."""
        rows = np.flatnonzero(self.h_unit.view == uid)
        return [Attempt(uid, self.workers[int(self.h_worker.data[r])], float(self.h_start.data[r]),
                        None if math.isnan(self.h_end.data[r]) else float(self.h_end.data[r]),
                        None if self.h_outcome.data[r] < 0 else OUTCOME_NAMES[int(self.h_outcome.data[r])])
                for r in rows]

    def summary(self) -> dict[str, int]:
        """Units per state and in total (Coordinate's ``summary`` row)."""
        return {**dict(zip(STATE_NAMES, self.counts)), "total": len(self.keys)}

    def avoid(self, uid: int) -> list[str]:
        """The workers that already voted on ``uid``: its next replica must run elsewhere."""
        return [self.workers[w] for w, _ in self.ballots.get(uid, ())]

    def ballots_view(self, uid: int) -> dict[str, Any] | None:
        """A redundant unit's votes, in words: each worker's digest (hex), and the decision."""
        if uid in self.disputes:
            winner, ballots = self.disputes[uid]
            return {"votes": [[self.workers[w], d.hex()] for w, d in ballots],
                    "winner": winner.hex() if winner is not None else None, "disputed": True}
        if uid in self.ballots:
            return {"votes": [[self.workers[w], d.hex()] for w, d in self.ballots[uid]], "winner": None,
                    "disputed": False}
        return None

    def _worker(self, name: str) -> int:
        ix = self._worker_ix.get(name)
        if ix is None:
            ix = self._worker_ix[name] = len(self.workers)
            self.workers.append(name)
        return ix

    # ---- snapshots ----------------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything, as plain values and bytes (for the ledger's msgspec snapshot)."""
        cols = {name: getattr(self, name).view.tobytes() for name in _COLUMNS}
        return {"keys": self.keys, "data": self.data, "workers": self.workers,
                "available": [[p, list(q)] for p, q in self.available.items()],
                "open": [[u, r] for u, r in self.open_attempt.items()],
                "ballots": [[u, [[w, d] for w, d in b]] for u, b in self.ballots.items()],
                "outputs": [[u, [[d, o] for d, o in outs.items()]] for u, outs in self.outputs.items()],
                "disputes": [[u, win, [[w, d] for w, d in b]] for u, (win, b) in self.disputes.items()], **cols}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "UnitTable":
        t = cls()
        t.keys, t.data, t.workers = list(s["keys"]), list(s["data"]), list(s["workers"])
        t.index = dict(zip(t.keys, range(len(t.keys))))
        t._worker_ix = {w: i for i, w in enumerate(t.workers)}
        for name in _COLUMNS:
            col = getattr(t, name)
            if name in s:
                col.data = np.frombuffer(s[name], col.data.dtype).copy()
            else:  # a snapshot from before the column: its default for every unit
                col.data = np.full(len(t.keys), col.fill, col.data.dtype)
            col.n = len(col.data)
        t.available = {int(p): deque(q) for p, q in s["available"]}
        t.open_attempt = {int(u): int(r) for u, r in s["open"]}
        t.ballots = {int(u): [(int(w), bytes(d)) for w, d in b] for u, b in s.get("ballots", [])}
        t.outputs = {int(u): {bytes(d): bytes(o) for d, o in outs} for u, outs in s.get("outputs", [])}
        t.disputes = {int(u): (bytes(win) if win is not None else None, [(int(w), bytes(d)) for w, d in b])
                      for u, win, b in s.get("disputes", [])}
        t.counts = [int(np.count_nonzero(t.state.view == k)) for k in range(4)]
        return t


_COLUMNS = ("state", "priority", "attempts", "lease_until", "holder", "h_unit", "h_worker", "h_start", "h_end",
            "h_outcome", "fence_term", "fence_seq", "votes")


# ---- scheduling across specs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    """What ``allocate`` needs to know of a spec right now."""

    name: str
    priority: int
    weight: float
    running: int
    available: int
    max_running: int | None = None
    paused: bool = False


def allocate(specs: Iterable[Demand], n: int) -> dict[str, int]:
    """How many of ``n`` free slots each spec gets: strict priority between tiers (a lower tier
    gets slots only when the higher ones can take no more), then stride scheduling within a tier
    (each slot to the spec with the lowest (running + given) / weight, ties by name), never past
    ``max_running`` or what a spec has available. Paused specs get nothing."""
    out: dict[str, int] = {}
    tiers: dict[int, list[Demand]] = {}
    for d in specs:
        if not d.paused and d.available > 0:
            tiers.setdefault(d.priority, []).append(d)
    left = n
    for p in sorted(tiers, reverse=True):
        if left <= 0:
            break
        heap = []
        for d in tiers[p]:
            room = d.available if d.max_running is None else min(d.available, d.max_running - d.running)
            if room > 0:
                heap.append((d.running / d.weight, d.name, d, room))
        heapq.heapify(heap)
        while heap and left > 0:
            _, name, d, room = heapq.heappop(heap)
            got = out.get(name, 0) + 1
            out[name] = got
            left -= 1
            if got < room:
                heapq.heappush(heap, ((d.running + got) / d.weight, name, d, room))
    return out


# ---- the ledger's work state -----------------------------------------------------------------------


CONTROL_ACTIONS = ("pause", "resume", "prioritize", "weight", "retry")


def spec_id(name: str) -> bytes:
    """The 16-byte id a spec's units travel under as tasks (WORKER_REQUEST, TASK_RESULT carry
    it where a job's id would be)."""
    return hashlib.blake2b(b"workspec\0" + name.encode(), digest_size=16).digest()


class WorkState:
    """Every work spec and its units, as the ledger keeps them (``Ledger.work``). Each method
    applies one command: it checks everything first and changes nothing when it refuses."""

    def __init__(self) -> None:
        self.specs: dict[str, WorkSpec] = {}
        self.tables: dict[str, UnitTable] = {}
        self.batches: dict[str, dict[bytes, int]] = {}  # spec -> batch key -> units it added
        self.ids: dict[bytes, str] = {}  # spec_id -> name

    def add_spec(self, spec: Any) -> WorkSpec:
        got = validate_spec(spec, known=self.specs)
        if got.name in self.specs:
            raise WorkSpecError("duplicate_spec", f"a work spec named {got.name!r} exists already")
        check_chain(self.specs, got.name, got.then)
        self.specs[got.name] = got
        self.tables[got.name] = UnitTable()
        self.ids[spec_id(got.name)] = got.name
        return got

    # ---- dispatch: units as tasks ---------------------------------------------------------------

    def is_spec(self, job_id: bytes) -> bool:
        return job_id in self.ids

    def ready(self, limit: int, exclude: Any = frozenset()) -> list[tuple[bytes, int]]:
        """Up to ``limit`` units to hand out, shared among the specs by ``allocate``; units in
        ``exclude`` (``(spec id, unit)`` pairs proposed and not yet committed) count as running."""
        if limit <= 0 or not self.specs:
            return []
        proposed: dict[str, set[int]] = {}
        for job_id, task_id in exclude:
            name = self.ids.get(job_id)
            if name is not None:
                proposed.setdefault(name, set()).add(task_id)
        demands = []
        for name, spec in self.specs.items():
            counts = self.tables[name].counts
            k = len(proposed.get(name, ()))
            demands.append(Demand(name, spec.priority, spec.weight, counts[PENDING] + k, counts[AVAILABLE] - k,
                                  spec.max_running, spec.paused))
        out: list[tuple[bytes, int]] = []
        for name, n in sorted(allocate(demands, limit).items()):
            sid = spec_id(name)
            out += [(sid, uid) for uid in self.tables[name].peek(n, proposed.get(name, frozenset()))]
        return out

    def assign(self, units: list[tuple[bytes, int, tuple[int, int]]], holder: str,
               now: float) -> tuple[list[tuple[bytes, int, tuple[int, int]]], list[tuple[bytes, int]]]:
        """Lease ``units`` (spec id, unit, fencing token) to ``holder``: (assigned, skipped)."""
        groups: dict[bytes, list[tuple[int, tuple[int, int]]]] = {}
        for sid, uid, fence in units:
            groups.setdefault(sid, []).append((uid, fence))
        assigned, skipped = [], []
        for sid, rows in groups.items():
            name = self.ids[sid]
            spec = self.specs[name]
            taken = set(self.tables[name].lease_ids([u for u, _ in rows], holder, now, spec.lease_s,
                                                    [f for _, f in rows]))
            for uid, fence in rows:
                (assigned.append((sid, uid, fence)) if uid in taken else skipped.append((sid, uid)))
        return assigned, skipped

    def complete(self, sid: bytes, uid: int, fence: tuple[int, int], outcome: int, worker: str,
                 output: bytes | None, now: float, digest: bytes | None = None) -> str:
        """A unit's attempt ended (``outcome``: DONE, LOST or FAILED_OUTCOME here). Returns
        "recorded", or "duplicate" for a unit already finished; raises WorkSpecError for a unit
        that does not exist or a token that is not its newest lease. A finished unit of a spec
        with ``then`` adds ``[key, output]`` to that spec (once: the key makes it idempotent).
        A redundant spec's replica votes with ``digest`` (the worker's digest of its whole
        output; of ``output`` when absent) and the unit finishes once the quorum decides."""
        name = self.ids[sid]
        spec, table = self.specs[name], self.tables[name]
        if not 0 <= uid < len(table):
            raise WorkSpecError("unknown_task", f"work spec {name!r} has no unit {uid}")
        state = int(table.state.data[uid])
        if (int(table.fence_term.data[uid]), int(table.fence_seq.data[uid])) != tuple(fence) or state != PENDING:
            if state == FINISHED:
                return "duplicate"
            raise WorkSpecError("stale_fence", f"token {tuple(fence)} is not the newest lease of unit {uid} of "
                                               f"work spec {name!r}")
        output = bytes(output or b"")
        if spec.replicas > 1 and outcome == DONE:
            if not digest:
                digest = hashlib.blake2b(output, digest_size=16).digest()
            new, output = table.vote(uid, worker, digest, output, now, spec)
        else:
            new = table.end(uid, outcome, now, spec.max_attempts, worker)
        if new == FINISHED and spec.then is not None and spec.then in self.tables:
            following = self.tables[spec.then]
            key = table.keys[uid]
            if key not in following.index:
                following.add([[key, (output or b"")[:MAX_DATA]]])
        return "recorded"

    def order(self, sid: bytes, uid: int) -> dict[str, Any]:
        """What a worker gets for a unit (as ``Ledger.task_order``): the spec's ``run``; a
        command sees the unit as ``WORK_KEY``/``WORK_DATA`` in its environment, a callable gets
        ``(key, data)`` as its arguments."""
        name = self.ids[sid]
        run, table = self.specs[name].run, self.tables[name]
        key, data = table.keys[uid], table.data[uid]
        spec = self.specs[name]
        if run.get("kind") == "call":
            arguments: dict[str, Any] = {"args": pickle.dumps(((key, data), {}))}
        else:
            text = data.decode("utf-8", "replace").replace("\0", "")  # no NUL in an environment
            arguments = {"env": {"WORK_KEY": key, "WORK_DATA": text, "WORK_SPEC": name}}
        order: dict[str, Any] = {"run": run, "arguments": {**arguments, "key": key}, "inputs": []}
        if spec.replicas > 1:
            # the worker digests its whole output this way; the balancer places the replica on a
            # worker that has not voted on this unit yet
            order["arguments"]["compare"] = spec.compare
            order["avoid"] = table.avoid(uid)
        return order

    def due(self, now: float) -> list[str]:
        """Continuous specs that should get a unit at ``now``: not paused, none of their units
        available or running, and ``interval`` passed since their last one (Coordinate's
        continuous work specs)."""
        return [name for name, spec in self.specs.items()
                if spec.continuous and not spec.paused and now >= spec.last_made + spec.interval
                and not self.tables[name].counts[AVAILABLE] and not self.tables[name].counts[PENDING]]

    def make_units(self, names: list[str], now: float) -> list[str]:
        """Give each due spec of ``names`` a unit keyed by the time (UTC, ms), with empty data;
        returns ``spec/key`` of each unit made. A spec no longer due (or gone) is passed over."""
        due = set(self.due(now))
        made = []
        stamp = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for name in names:
            table = self.tables.get(name)
            if name not in due or table is None or stamp in table.index:
                continue
            table.add([[stamp, b""]])
            self.specs[name].last_made = now
            made.append(f"{name}/{stamp}")
        return made

    def has_expired(self, now: float) -> bool:
        """Whether some pending unit's lease ended before ``now`` (one vectorised pass a spec)."""
        return any(t.counts[PENDING] and t.expired(now).size for t in self.tables.values())

    def expire(self, now: float) -> int:
        """End every lease that ended before ``now`` as LOST; returns how many."""
        n = 0
        for name, table in self.tables.items():
            if not table.counts[PENDING]:
                continue
            for uid in table.expired(now).tolist():
                table.end(uid, LOST, now, self.specs[name].max_attempts)
                n += 1
        return n

    def units_view(self, name: str, state: str | None = None, limit: int = 100, min_attempts: int = 0,
                   after: int = -1, disputed: bool = False) -> dict[str, Any]:
        """Units of spec ``name`` (in ``state``, with at least ``min_attempts`` attempts, only
        those whose replicas disagreed when ``disputed``), in unit order after ``after``, each
        with its attempts and, for a redundant spec, its votes; ``next`` pages on."""
        table = self._table(name)
        if state is not None and state not in STATE_NAMES:
            raise WorkSpecError("bad_query", f"state must be one of {', '.join(STATE_NAMES)}, not {state!r}")
        mask = np.ones(len(table), bool)
        if state is not None:
            mask &= table.state.view == STATE_NAMES.index(state)
        if min_attempts:
            mask &= table.attempts.view >= min_attempts
        if disputed:
            only = np.zeros(len(table), bool)
            only[list(table.disputes)] = True
            mask &= only
        mask[:max(after + 1, 0)] = False
        ids = np.flatnonzero(mask)[:limit + 1]
        rows = []
        for u in ids[:limit].tolist():
            row = {"unit": u, "key": table.keys[u], "state": STATE_NAMES[int(table.state.data[u])],
                   "attempts": [a.__dict__ for a in table.attempts_of(u)]}
            ballots = table.ballots_view(u)
            if ballots is not None:
                row["ballots"] = ballots
            rows.append(row)
        return {"units": rows, "next": int(ids[limit - 1]) if len(ids) > limit else None}

    def open(self) -> Iterator[tuple[bytes, int, int, int, str, float]]:
        """Every pending unit: (spec id, unit, fence term, fence sequence, holder, started)."""
        for name, table in self.tables.items():
            sid = spec_id(name)
            for uid, row in table.open_attempt.items():
                yield (sid, uid, int(table.fence_term.data[uid]), int(table.fence_seq.data[uid]),
                       table.workers[int(table.h_worker.data[row])], float(table.h_start.data[row]))

    def add_units(self, name: str, units: Any, key: bytes | None = None) -> dict[str, Any]:
        """Add a batch; a ``key`` seen before for this spec answers again without adding (a
        client resending a batch whose commit it did not hear of)."""
        table = self._table(name)
        done = self.batches.get(name, {})
        if key is not None and key in done:
            return {"added": done[key], "total": len(table), "again": True}
        if not isinstance(units, list) or not units:
            raise WorkSpecError("bad_units", "units must be a non-empty list of [key, data] pairs")
        added = table.add(units)
        if key is not None:
            self.batches.setdefault(name, {})[key] = added
        return {"added": added, "total": len(table)}

    def control(self, name: str, action: str, value: Any = None) -> dict[str, Any]:
        spec, table = self._spec(name), self._table(name)
        if action == "pause":
            spec.paused = True
        elif action == "resume":
            spec.paused = False
        elif action == "prioritize":
            if not _is_int(value) or not -(2**31) <= value < 2**31:
                raise WorkSpecError("bad_control", f"prioritize takes an integer priority, not {value!r}")
            spec.priority = value
        elif action == "weight":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise WorkSpecError("bad_weight", f"'weight' must be a positive number, not {value!r}")
            spec.weight = float(value)
        elif action == "retry":
            return {"retried": table.retry(np.flatnonzero(table.state.view == FAILED).tolist())}
        else:
            raise WorkSpecError("bad_control", f"unknown action {action!r}; the actions are {', '.join(CONTROL_ACTIONS)}")
        return {"spec": name, "action": action}

    def summary(self) -> list[dict[str, Any]]:
        """One row per spec, highest priority first: Coordinate's ``summary`` table."""
        rows = []
        for name, spec in sorted(self.specs.items(), key=lambda kv: (-kv[1].priority, kv[0])):
            rows.append({"spec": name, "priority": spec.priority, "weight": spec.weight, "paused": spec.paused,
                         "max_running": spec.max_running, "replicas": spec.replicas, "quorum": spec.quorum,
                         "continuous": spec.interval if spec.continuous else None, **self.tables[name].summary(),
                         "disputed": len(self.tables[name].disputes)})
        return rows

    def _spec(self, name: str) -> WorkSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise WorkSpecError("unknown_spec", f"no work spec named {name!r}"
                                + (f"; the specs are {', '.join(sorted(self.specs)[:10])}" if self.specs else ""))
        return spec

    def _table(self, name: str) -> UnitTable:
        self._spec(name)
        return self.tables[name]

    def to_state(self) -> dict[str, Any]:
        return {"specs": [[s.name, s.run, s.priority, s.weight, s.max_running, s.max_attempts, s.lease_s, s.then,
                           s.paused, s.replicas, s.quorum, s.compare, s.continuous, s.interval, s.last_made]
                          for s in self.specs.values()],
                "tables": {name: t.to_state() for name, t in self.tables.items()},
                "batches": {name: [[k, n] for k, n in keys.items()] for name, keys in self.batches.items()}}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "WorkState":
        w = cls()
        for row in s["specs"]:
            spec = WorkSpec(*row)
            w.specs[spec.name] = spec
            w.tables[spec.name] = UnitTable.from_state(s["tables"][spec.name])
            w.ids[spec_id(spec.name)] = spec.name
        w.batches = {name: {bytes(k): n for k, n in rows} for name, rows in s.get("batches", {}).items()}
        return w

