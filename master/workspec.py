"""Work specs and work units: the Coordinate model's state and scheduling, as a pure core.

Theory of operation
-------------------
A **work spec** says what to run and how it is scheduled; its **work units** are ``(key,
data)`` pairs added in batches, each available, pending (leased), finished or failed, every
attempt recorded (doc/workspecs.md). This module is the ledger's view of them: ``WorkState``
holds every spec and its unit table, and each of its methods applies one command of the Raft
log (``master.commands``) or answers one read. It checks everything first and changes nothing
when it refuses (``WorkSpecError``), and it never reads a clock, a socket or a disk: ``now`` is
an argument, so that every master applying the same commands reaches the same state.

The concerns live in their own modules, composed here:

- ``master.work_specs``: ``WorkSpec`` and ``validate_spec``/``check_chain`` (the checks of a
  submitted spec);
- ``master.work_units``: ``UnitTable``, one spec's units column by column (``UnitState`` and its
  ``TRANSITIONS``, queues, leases and fencing tokens, ``validate_state``, the snapshot form);
- ``master.work_history``: each table's attempt history (``AttemptLog``, ``AttemptOutcome``);
- ``master.work_quorum``: redundant execution (``BallotBox``: a unit's replicas vote and a quorum
  of workers decides; disagreements are kept as disputes);
- ``master.work_share``: ``allocate``, the share of free slots among specs (strict priority
  between tiers, stride scheduling by weight within one).

A ``continuous`` spec gets a unit every ``interval`` while none of its units waits or runs
(``WorkState.due``/``make_units``). The names other modules have imported from here (the state
and outcome constants, ``UnitTable``, ``Demand``, ``allocate``, ``validate_spec``...) are
re-exported below.
"""

from __future__ import annotations

import hashlib
import pickle
from datetime import datetime, timezone
from typing import Any, Collection, Iterable, Iterator, Mapping

import numpy as np

from master.work_history import DONE, FAILED_OUTCOME, LOST, OUTCOME_NAMES, Attempt, AttemptOutcome
from master import reasons
from master.work_share import Demand, allocate
from master.work_specs import (COMPARE_MODES, DEFAULT_MAX_LOST, MAX_DATA, MAX_KEY, MAX_REPLICAS, SPEC_KEYS, WorkSpec,
                               WorkSpecError, check_chain, is_int32, is_weight, validate_spec)
from master.work_units import AVAILABLE, FAILED, FINISHED, PENDING, STATE_NAMES, UnitState, UnitTable

# the names importable from here before the split (the facade's re-exports), and this module's own.
# DONE, LOST and FAILED_OUTCOME are how a unit's attempt ends (AttemptOutcome: not the numbers of
# master.commands.Outcome); FAILED is a unit *state* (UnitState).
__all__ = ["AVAILABLE", "PENDING", "FINISHED", "FAILED", "STATE_NAMES", "UnitState", "DONE", "LOST",
           "FAILED_OUTCOME", "OUTCOME_NAMES", "AttemptOutcome", "Attempt", "MAX_KEY", "MAX_DATA", "SPEC_KEYS",
           "MAX_REPLICAS", "COMPARE_MODES", "WorkSpec", "WorkSpecError", "validate_spec", "check_chain",
           "UnitTable", "Demand", "allocate", "CONTROL_ACTIONS", "spec_id", "WorkState"]


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

    def ready(self, limit: int, in_flight: Mapping[bytes, Collection[int]] | None = None) -> list[tuple[bytes, int]]:
        """Up to ``limit`` units to hand out, shared among the specs by ``allocate``; the units in
        ``in_flight`` (spec id → units proposed and not yet committed) count as running and are
        not handed out again. O(specs + limit) when they were taken (``take``: an ``InFlight``
        does), else the units in flight of the specs that get some are skipped one by one."""
        if limit <= 0 or not self.specs:
            return []
        proposed = {self.ids[sid]: units for sid, units in (in_flight or {}).items() if sid in self.ids}
        demands = []
        for name, spec in self.specs.items():
            if not spec.run:  # units for outside workers: the cluster's do not take them
                continue
            counts = self.tables[name].counts
            k = len(proposed.get(name, ()))
            demands.append(Demand(name, spec.priority, spec.weight, counts[PENDING] + k, counts[AVAILABLE] - k,
                                  spec.max_running, spec.paused))
        out: list[tuple[bytes, int]] = []
        for name, n in sorted(allocate(demands, limit).items()):
            sid = spec_id(name)
            out += [(sid, uid) for uid in self.tables[name].peek(n, proposed.get(name, frozenset()))]
        return out

    def take(self, sid: bytes, uids: Iterable[int]) -> None:
        """Units of spec ``sid`` were proposed for assignment (``master.ready.InFlight``): ``ready``
        passes them over without skipping them one by one, until their lease commits or ``release``."""
        name = self.ids.get(sid)
        if name is not None:
            self.tables[name].take(uids)

    def release(self, sid: bytes, uids: Iterable[int]) -> None:
        """The proposal of these units of spec ``sid`` is answered: those still available are offered again."""
        name = self.ids.get(sid)
        if name is not None:
            self.tables[name].release(uids)

    def release_all(self) -> None:
        """Nothing is in flight any more (a new balancer, or this master stopped leading)."""
        for table in self.tables.values():
            table.release_all()

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
                 output: bytes | None, now: float, digest: bytes | None = None,
                 reason: tuple[str, str] | None = None) -> str:
        """A unit's attempt ended (``outcome``: DONE, LOST or FAILED_OUTCOME here). Returns
        "recorded", or "duplicate" for a unit already finished; raises WorkSpecError for a unit
        that does not exist or a token that is not its newest lease. A finished unit of a spec
        with ``then`` adds ``[key, output]`` to that spec (once: the key makes it idempotent).
        A redundant spec's replica votes with ``digest`` (the worker's digest of its whole
        output; of ``output`` when absent) and the unit finishes once the quorum decides.
        ``reason``: why a failed or lost attempt failed (line, tail: ``master.reasons``)."""
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
            new = table.end(uid, outcome, now, spec.max_attempts, worker, reason, spec.max_lost)
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
                holder = int(table.holder.data[uid])
                who = table.workers[holder] if 0 <= holder < len(table.workers) else ""
                spec = self.specs[name]
                table.end(uid, LOST, now, spec.max_attempts, reason=(reasons.expired(who), ""),
                          max_lost=spec.max_lost)
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
            for uid, term, seq, holder, started in table.leases():
                yield sid, uid, term, seq, holder, started

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
            if not is_int32(value):
                raise WorkSpecError("bad_control", f"prioritize takes an integer priority, not {value!r}")
            spec.priority = value
        elif action == "weight":
            if not is_weight(value):
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

    def validate_state(self) -> None:
        """Raise AssertionError if an invariant does not hold: one table and one id per spec,
        every ``then`` names a spec, batch keys only for specs, and each table's own invariants
        (``UnitTable.validate_state``, with the spec's replicas and quorum)."""
        assert set(self.tables) == set(self.specs), "a spec without a table, or a table without a spec"
        assert self.ids == {spec_id(name): name for name in self.specs}, "the spec ids are stale"
        assert set(self.batches) <= set(self.specs), "batch keys of a spec that does not exist"
        for name, spec in self.specs.items():
            assert spec.name == name, (name, spec.name)
            assert spec.then is None or spec.then in self.specs, f"spec {name!r} feeds a spec that does not exist"
            self.tables[name].validate_state(spec)

    def to_state(self) -> dict[str, Any]:
        return {"specs": [[s.name, s.run, s.priority, s.weight, s.max_running, s.max_attempts, s.lease_s, s.then,
                           s.paused, s.replicas, s.quorum, s.compare, s.continuous, s.interval, s.last_made]
                          # max_lost came later: a spec with the default keeps its older form
                          + ([s.max_lost] if s.max_lost != DEFAULT_MAX_LOST else [])
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

