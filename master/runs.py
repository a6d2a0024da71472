"""What a job's or a work spec's ``run`` may say, checked at submit (pure).

A worker refuses an order it cannot run, but only when it gets one: a misspelt kind used to be
accepted, handed out, and failed ``max_attempts`` times per unit with the reason on the worker
alone. So the masters check ``run`` when a job or a spec arrives and refuse it with the reason.
What is checked is what the workers' order parsing (``worker.tasks``) would refuse for every
task alike: the kind, and the types of the keys that the run holds for all tasks. What a single
task's arguments add (a list job's per-task ``argv``) is still the worker's to check.

An empty ``run`` is let through: it names no kind, and its tasks are for whoever takes them
(tests, and later outside workers; ``worker.tasks`` fails them with the reason if a cluster
worker does).
"""

from __future__ import annotations

from typing import Any

# the kinds worker.tasks.TaskRunner runs, in the words its error uses
TASK_KINDS = ("call", "command", "tile", "trace")


def problem(run: dict[str, Any]) -> str | None:
    """Why ``run`` cannot run on any worker, or None."""
    if not run:
        return None
    kind = run.get("kind")
    if kind not in TASK_KINDS:
        return f"run kind {kind!r} is not one the workers run: {', '.join(TASK_KINDS)}"
    for key, check in _CHECKS.items():
        if key in run and (why := check(run[key])):
            return f"run {key!r} {why}"
    return None


def _strings(value: Any) -> str | None:
    ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    return None if ok else "must be a non-empty list of strings"


def _names(value: Any) -> str | None:
    # paths in the task's scratch directory, e.g. "d/out.txt"; the worker checks where they lead
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    return None if ok else "must be a list of file names"


def _string_map(value: Any) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    return None if ok else "must map names to strings"


def _positive(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return None if ok else "must be a positive number"


def _positive_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value > 0 else "must be a positive integer"


_CHECKS = {"argv": _strings, "outputs": _names, "env": _string_map, "inputs": _string_map,
           "timeout_s": _positive, "memory_mb": _positive_int}
