"""Work specs: what a spec says and the checks a submitted one must pass (pure).

Theory of operation
-------------------
A **work spec** names what to run (``run``: a callable, a command template or a tile kind, as a
job's ``run``) and how it is scheduled: ``priority`` (absolute: a spec runs only when every spec
of higher priority can take no more), ``weight`` (among specs of equal priority, running slots
are shared in proportion to weight), ``max_running``, ``max_attempts`` (failures of the unit's
own), ``max_lost`` (attempts lost to dead workers or expired leases), ``lease_s`` and
``then`` (the spec fed each finished unit's output). ``replicas``/``quorum``/``compare`` ask
for redundant execution (``master.work_quorum``), ``continuous``/``interval`` for a unit made
every ``interval`` while none waits or runs (Coordinate's continuous work specs).

``validate_spec`` checks a submitted spec field by field, in a fixed order, and raises
``WorkSpecError`` naming the first bad field; ``check_chain`` refuses a ``then`` that closes a
cycle. The ledger keeps the accepted ``WorkSpec`` rows in its snapshots as positional lists
(``master.workspec.WorkState.to_state``): the field order of ``WorkSpec`` is a persisted format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from master import runs
from master.jobs import DEFAULT_MAX_LOST, MAX_LOST

MAX_KEY = 1024  # bytes of a unit key
MAX_DATA = 64 << 10  # bytes of a unit's data; bigger inputs belong in storage files
SPEC_KEYS = frozenset(("name", "run", "priority", "weight", "max_running", "max_attempts", "lease_s", "then",
                       "paused", "replicas", "quorum", "compare", "continuous", "interval", "max_lost"))
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
    """A validated work spec (see the module docstring). The field order is persisted (the
    ledger's snapshot stores each spec as a list of these fields): append new fields last."""

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
    max_lost: int = DEFAULT_MAX_LOST  # attempts lost (not failed) before a unit fails: apart from max_attempts


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_int32(value: Any) -> bool:
    """An int (not a bool) that fits a signed 32-bit column (spec and unit priorities)."""
    return is_int(value) and -(2**31) <= value < 2**31


def is_weight(value: Any) -> bool:
    """A finite, positive number (not a bool): a share of the running slots."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


def _is_seconds(value: Any, low: float, high: float, low_open: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (low < value if low_open else low <= value) and value <= high


def validate_spec(spec: Any, known: Iterable[str] = ()) -> WorkSpec:
    """Check a submitted spec; ``known`` are the specs already there (for ``then``).
    Raises WorkSpecError naming the field (the first bad one, in the order of ``WorkSpec``)."""
    _check_keys(spec)
    name, run = _check_identity(spec)
    priority, weight, max_running, max_attempts, lease_s = _check_scheduling(spec)
    then = _check_then(spec.get("then"), name, known)
    paused = spec.get("paused", False)
    if not isinstance(paused, bool):
        raise WorkSpecError("bad_spec", f"'paused' must be true or false, not {paused!r}")
    replicas, quorum, compare = _check_replicas(spec)
    continuous, interval = _check_continuous(spec)
    max_lost = spec.get("max_lost", DEFAULT_MAX_LOST)
    if not is_int(max_lost) or not 1 <= max_lost <= MAX_LOST:
        raise WorkSpecError("bad_spec", f"'max_lost' must be an integer from 1 to {MAX_LOST}, not {max_lost!r}")
    return WorkSpec(name, run, priority, float(weight), max_running, max_attempts, float(lease_s), then, paused,
                    replicas, quorum, compare, continuous, float(interval), max_lost=max_lost)


def _check_keys(spec: Any) -> None:
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise WorkSpecError("bad_spec", "a work spec is a map with string keys")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise WorkSpecError("bad_spec", f"a work spec has no {', '.join(repr(k) for k in unknown)}; "
                                        f"it takes {', '.join(sorted(SPEC_KEYS))}")


def _check_identity(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``name`` and ``run``."""
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 200 or "/" in name:
        raise WorkSpecError("bad_spec", f"'name' must be 1-200 characters without '/', not {name!r}")
    run = spec.get("run", {})
    # No run: its units are for outside workers (a Coordinate gateway's), not the cluster's.
    if not isinstance(run, dict) or (run and not isinstance(run.get("kind"), str)):
        raise WorkSpecError("bad_spec", "'run' must be a map with a 'kind' (call, command, tile...)")
    if (why := runs.problem(run)) is not None:
        raise WorkSpecError("bad_run", why)
    return name, run


def _check_scheduling(spec: dict[str, Any]) -> tuple[int, int | float, int | None, int, int | float]:
    """``priority``, ``weight``, ``max_running``, ``max_attempts`` and ``lease_s``."""
    priority = spec.get("priority", 0)
    if not is_int32(priority):
        raise WorkSpecError("bad_spec", f"'priority' must be an integer, not {priority!r}")
    weight = spec.get("weight", 1)
    if not is_weight(weight):
        raise WorkSpecError("bad_weight", f"'weight' must be a positive number (a share of the running slots), "
                                          f"not {weight!r}")
    max_running = spec.get("max_running")
    if max_running is not None and (not is_int(max_running) or max_running < 0):
        raise WorkSpecError("bad_spec", f"'max_running' must be a non-negative integer or absent, not {max_running!r}")
    max_attempts = spec.get("max_attempts", 3)
    if not is_int(max_attempts) or not 1 <= max_attempts <= 100:
        raise WorkSpecError("bad_spec", f"'max_attempts' must be an integer from 1 to 100, not {max_attempts!r}")
    lease_s = spec.get("lease_s", 300)
    if not _is_seconds(lease_s, 0, 7 * 86400, low_open=True):
        raise WorkSpecError("bad_spec", f"'lease_s' must be seconds from 0 to a week, not {lease_s!r}")
    return priority, weight, max_running, max_attempts, lease_s


def _check_then(then: Any, name: str, known: Iterable[str]) -> str | None:
    """``then``: another spec, already there, not this one."""
    if then is None:
        return None
    if not isinstance(then, str):
        raise WorkSpecError("bad_spec", f"'then' names another work spec, not {then!r}")
    if then == name:
        raise WorkSpecError("then_cycle", f"spec {name!r} cannot feed itself ('then' is its own name)")
    if then not in set(known):
        raise WorkSpecError("unknown_spec", f"'then' names {then!r}, which is not a work spec; add it first")
    return then


def _check_replicas(spec: dict[str, Any]) -> tuple[int, int, str]:
    """``replicas``, ``quorum`` (a majority, so that at most one result can win) and ``compare``."""
    replicas = spec.get("replicas", 1)
    if not is_int(replicas) or not 1 <= replicas <= MAX_REPLICAS:
        raise WorkSpecError("bad_replicas", f"'replicas' must be an integer from 1 to {MAX_REPLICAS}, not {replicas!r}")
    quorum = spec.get("quorum", replicas // 2 + 1)
    if not is_int(quorum) or not replicas // 2 < quorum <= replicas:
        raise WorkSpecError("bad_replicas", f"'quorum' must be a majority of the {replicas} replicas "
                                            f"(from {replicas // 2 + 1} to {replicas}), not {quorum!r}")
    compare = spec.get("compare", "bytes")
    if compare not in COMPARE_MODES:
        raise WorkSpecError("bad_spec", f"'compare' must be one of {', '.join(COMPARE_MODES)}, not {compare!r}")
    return replicas, quorum, compare


def _check_continuous(spec: dict[str, Any]) -> tuple[bool, int | float]:
    """``continuous`` and ``interval``."""
    continuous = spec.get("continuous", False)
    if not isinstance(continuous, bool):
        raise WorkSpecError("bad_spec", f"'continuous' must be true or false, not {continuous!r}")
    interval = spec.get("interval", 60)
    if not _is_seconds(interval, 1, 365 * 86400, low_open=False):
        raise WorkSpecError("bad_spec", f"'interval' must be seconds from 1 to a year, not {interval!r}")
    return continuous, interval


def check_chain(specs: dict[str, WorkSpec], name: str, then: str | None) -> None:
    """Refuse a ``then`` that closes a cycle through existing specs."""
    path = [name]
    while then is not None:
        path.append(then)
        if then in path[:-1]:
            raise WorkSpecError("then_cycle", f"'then' makes a cycle: {' -> '.join(path)}")
        then = specs[then].then if then in specs else None
