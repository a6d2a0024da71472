"""The attempt history of a spec's work units, column by column (pure).

Theory of operation
-------------------
Every lease of a unit opens an attempt (unit, worker, start); its end closes it (end, outcome).
A million units make millions of attempts, so the history is kept as numpy columns (``Column``:
amortised doubling), one row per attempt, with ``open`` mapping each pending unit to its open
row. Workers are stored as indices into the unit table's worker list (``UnitTable.workers``).

The columns are written into the ledger's snapshots as raw bytes (``UnitTable.to_state``), so
their dtypes and the numbers of ``AttemptOutcome`` are a persisted format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from master.commands import Outcome
from master.reasons import KEPT_PER_SPEC


class AttemptOutcome(IntEnum):
    """How one attempt of a work unit ended, as the history's ``outcome`` column (int8) stores
    it; -1 in that column is an attempt still open.

    This is not ``master.commands.Outcome`` (the task outcome of TASK_RESULT and CompleteTask:
    DONE 0, FAILED 1, CANCELLED 2, LOST 3), and cannot be made the same without re-coding a
    persisted form: these numbers (DONE 0, LOST 1, FAILED 2) are in every snapshot's history
    column, those are in the Raft log and on the wire, and FAILED and LOST are swapped between
    the two. A unit's attempt also has no CANCELLED: a cancelled or failed task attempt ends the
    unit's attempt FAILED (``of_task``). Never renumber either."""

    DONE = 0
    LOST = 1
    FAILED = 2

    @classmethod
    def of_task(cls, outcome: int) -> "AttemptOutcome":
        """A unit attempt's outcome from a task outcome (``master.commands.Outcome``)."""
        if outcome == Outcome.DONE:
            return cls.DONE
        if outcome == Outcome.LOST:
            return cls.LOST
        return cls.FAILED


# FAILED alone is a unit *state* (master.work_units), hence FAILED_OUTCOME
DONE, LOST, FAILED_OUTCOME = AttemptOutcome
OUTCOME_NAMES = tuple(o.name.lower() for o in AttemptOutcome)  # ("done", "lost", "failed")
OPEN = -1  # the outcome column of an attempt not ended yet


class Column:
    """A growable numpy column (amortised doubling): ``view`` is the used part, ``data`` the
    whole buffer (index it directly for one row)."""

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

    def restore(self, raw: bytes | None, n: int) -> None:
        """Take the column from a snapshot's bytes, or, for a snapshot from before the column
        (``raw`` None), its fill for each of ``n`` rows."""
        if raw is not None:
            self.data = np.frombuffer(raw, self.data.dtype).copy()
        else:
            self.data = np.full(n, self.fill, self.data.dtype)
        self.n = len(self.data)

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
    reason: str | None = None  # why a failed or lost attempt failed (master.reasons)
    tail: str = ""


class AttemptLog:
    """Every attempt of one spec's units: one row each (unit, worker, start, end, outcome; end
    NaN and outcome -1 while open)."""

    # snapshot names of the columns, as ``UnitTable.to_state`` writes them
    COLUMNS = ("h_unit", "h_worker", "h_start", "h_end", "h_outcome")

    def __init__(self) -> None:
        self.unit = Column(np.int64)
        self.worker = Column(np.int32)
        self.start = Column(np.float64)
        self.end = Column(np.float64, np.nan)
        self.outcome = Column(np.int8, OPEN)
        self.open: dict[int, int] = {}  # pending unit -> its open row
        # row -> (line, tail) of a failed or lost attempt, the newest KEPT_PER_SPEC (master.reasons)
        self.reasons: dict[int, tuple[str, str]] = {}

    def columns(self) -> dict[str, Column]:
        """The columns by snapshot name, in ``COLUMNS`` order."""
        return dict(zip(self.COLUMNS, (self.unit, self.worker, self.start, self.end, self.outcome)))

    def begin(self, ids: np.ndarray, worker: int, now: float) -> None:
        """Units ``ids`` each open an attempt on ``worker`` at ``now``."""
        first = self.unit.n
        n = len(ids)
        self.unit.extend(ids)
        self.worker.extend(np.full(n, worker, np.int32))
        self.start.extend(np.full(n, now))
        self.end.extend(np.full(n, np.nan))
        self.outcome.extend(np.full(n, OPEN, np.int8))
        self.open.update(zip(ids.tolist(), range(first, first + n)))

    def close(self, uid: int, outcome: int, now: float, worker: int | None,
              reason: tuple[str, str] | None = None) -> None:
        """End the open attempt of ``uid``; ``worker``, when known, is who ran it; ``reason``
        (line, tail), why it failed."""
        row = self.open.pop(uid)
        if worker is not None:
            self.worker.data[row] = worker
        self.end.data[row] = now
        self.outcome.data[row] = outcome
        if reason is not None:
            self.reasons[row] = reason
            if len(self.reasons) > KEPT_PER_SPEC:  # rows only grow: the first is the oldest
                del self.reasons[next(iter(self.reasons))]

    def opened(self, uid: int) -> tuple[int, float]:
        """(worker, start) of pending ``uid``'s open attempt."""
        row = self.open[uid]
        return int(self.worker.data[row]), float(self.start.data[row])

    def of(self, uid: int, workers: list[str]) -> list[Attempt]:
        """The attempts of one unit, oldest first; ``workers`` names the worker indices."""
        rows = np.flatnonzero(self.unit.view == uid)
        return [Attempt(uid, workers[int(self.worker.data[r])], float(self.start.data[r]),
                        None if math.isnan(self.end.data[r]) else float(self.end.data[r]),
                        None if self.outcome.data[r] < 0 else OUTCOME_NAMES[int(self.outcome.data[r])],
                        *self.reasons.get(int(r), (None, "")))
                for r in rows]

    def validate_state(self, n_units: int, n_workers: int) -> None:
        """Raise AssertionError if an invariant of the history does not hold: the columns have
        one row per attempt; exactly the rows in ``open`` are open, each of its own unit; every
        closed row has a known outcome; units and workers are in range."""
        rows = self.unit.n
        assert rows == self.worker.n == self.start.n == self.end.n == self.outcome.n, "history columns differ in length"
        is_open = self.outcome.view == OPEN
        assert np.array_equal(is_open, np.isnan(self.end.view)), "an attempt is open by its end but not its outcome"
        assert int(np.count_nonzero(is_open)) == len(self.open), "open rows and the open index differ"
        for uid, row in self.open.items():
            assert 0 <= row < rows and is_open[row] and int(self.unit.data[row]) == uid, (uid, row)
        assert np.all(self.outcome.view[~is_open] <= max(AttemptOutcome)), "an attempt ended with an unknown outcome"
        assert rows == 0 or (0 <= self.unit.view.min() and self.unit.view.max() < n_units), "an attempt of no unit"
        assert rows == 0 or (0 <= self.worker.view.min() and self.worker.view.max() < n_workers), "an unknown worker"
        assert len(self.reasons) <= KEPT_PER_SPEC, "more reasons kept than the bound"
        for row in self.reasons:
            assert 0 <= row < rows and self.outcome.data[row] in (LOST, FAILED_OUTCOME), f"a reason for row {row}, not a failure"
