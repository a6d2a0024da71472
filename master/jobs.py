"""Jobs and how their tasks arise: specs, validation, and the lazy task sources.

Theory of operation
-------------------
A job declares *how* its tasks arise instead of listing task records: a ``list`` of argument
dicts, a ``range`` of ``count`` indices, or a ``grid`` of ``rows`` × ``cols`` tiles with a
dependency rule. The ledger materialises a task record only when the task becomes ready and
drops what it no longer needs, so it holds the frontier, not the universe:

- list/range: at most ``WINDOW`` unfinished records at a time; the next ones are materialised
  as earlier ones end. Finished records stay (they hold the results users look up). A task
  that fails for good in a job that goes on (``fail_fast: false``) has *ended* too: the sources
  count done and such failed tasks alike, so the window keeps refilling past failures.
- grid with ``depends: wavefront`` (tile (i, j) needs (i-1, j) and (i, j-1), the
  Smith-Waterman dependency): the done tiles of each row form a prefix whose length never grows
  down the rows, so the done set is ``full_rows`` plus the prefix lengths of the partial rows.
  A done tile's result is kept only until the tiles that read it are done; then it is folded
  into the job's reduced result. A 400×400 grid thus holds O(400) records, never 160,000.

Everything here is plain data (msgspec Structs), so the ledger's snapshot is exact.
"""

from __future__ import annotations

from typing import Any

import msgspec

from master import runs

KINDS = ("list", "range", "grid")
WINDOW = 1024  # unfinished task records a list/range job keeps materialised
MAX_SPEC_BYTES = 1 << 20  # an encoded spec; bigger inputs belong in storage files
MAX_TASKS = 1 << 40
MAX_ATTEMPTS = 100
MAX_LOST = 100
DEFAULT_MAX_LOST = 10  # attempts lost to dead workers before a task fails (they do not use max_attempts)
DEPENDS = ("wavefront", "none")


class SpecError(ValueError):
    """A job spec the ledger refuses; ``code`` is stable (it travels in ERROR messages)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def _int(spec: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int:
    value = spec.get(name, default)
    if value is None:
        raise SpecError("bad_spec", f"the spec needs '{name}' (an integer from {low} to {high})")
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SpecError("bad_spec", f"'{name}' must be an integer from {low} to {high}, not {value!r}")
    return value


def validate_spec(kind: str, spec: Any, encoded_size: int) -> dict[str, Any]:
    """Check a submitted spec; return it with defaults filled in. Raises SpecError."""
    if kind not in KINDS:
        raise SpecError("unknown_kind", f"unknown job kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise SpecError("bad_spec", "the spec must be a map with string keys")
    if encoded_size > MAX_SPEC_BYTES:
        raise SpecError(
            "spec_too_large",
            f"the spec is {encoded_size} bytes, over the {MAX_SPEC_BYTES}-byte limit; "
            "upload large inputs to storage and refer to them by file id",
        )
    out = dict(spec)
    out["priority"] = _int(spec, "priority", 0, -(2**31), 2**31 - 1)
    out["max_attempts"] = _int(spec, "max_attempts", 3, 1, MAX_ATTEMPTS)
    out["max_lost"] = _int(spec, "max_lost", DEFAULT_MAX_LOST, 1, MAX_LOST)
    run = spec.get("run", {})
    if not isinstance(run, dict):
        raise SpecError("bad_spec", "'run' (what workers execute) must be a map")
    if (why := runs.problem(run)) is not None:
        raise SpecError("bad_run", why)
    out["run"] = run
    if kind == "list":
        tasks = spec.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise SpecError("bad_spec", "a list job needs 'tasks': a non-empty list of argument maps")
    elif kind == "range":
        out["count"] = _int(spec, "count", None, 1, MAX_TASKS)
    else:
        out["rows"] = _int(spec, "rows", None, 1, 2**31)
        out["cols"] = _int(spec, "cols", None, 1, 2**31)
        if out["rows"] * out["cols"] > MAX_TASKS:
            raise SpecError("bad_spec", f"a grid of {out['rows']}×{out['cols']} is over {MAX_TASKS} tasks")
        depends = spec.get("depends", "wavefront")
        if depends not in DEPENDS:
            raise SpecError("bad_spec", f"'depends' must be one of {', '.join(DEPENDS)}, not {depends!r}")
        out["depends"] = depends
    out["reduce"] = _reduce_rule(spec.get("reduce", {}))
    keep = spec.get("keep_results", kind != "grid")
    if not isinstance(keep, bool):
        raise SpecError("bad_spec", "'keep_results' must be true or false")
    out["keep_results"] = keep
    # Output names a task keeps when it is folded away (e.g. a tile's special rows, which the
    # traceback reads after the score pass): the job owns them until it is released.
    keep_files = spec.get("keep_files", [])
    if not isinstance(keep_files, list) or not all(isinstance(n, str) and n for n in keep_files):
        raise SpecError("bad_spec", "'keep_files' must be a list of output names (e.g. [\"rows\"])")
    out["keep_files"] = keep_files
    # jobs this one waits for (DAGs): it starts when every one of them is done
    after = spec.get("after", [])
    if not isinstance(after, list) or not all(isinstance(h, str) and len(h) == 32 and _is_hex(h) for h in after):
        raise SpecError("bad_spec", "'after' must be a list of job ids (32 hex digits each)")
    out["after"] = after
    _failure_rules(kind, spec, out)
    return out


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _failure_rules(kind: str, spec: dict[str, Any], out: dict[str, Any]) -> None:
    """``retry_failed`` (default true): false ends a task at its first FAILED attempt (the task's
    own failure: it raised, exited non-zero, timed out); LOST attempts are retried either way, up
    to ``max_lost`` (they never use ``max_attempts``, which counts the task's own failures: a dead
    worker says nothing about the task, as HTCondor and Slurm requeue without charging the job; the
    bound stops a task that kills its workers). ``fail_fast`` (default true): a task failing for good fails the job and
    cancels the rest; false (independent tasks only) records the failure and lets the job go on."""
    for name in ("retry_failed", "fail_fast"):
        value = spec.get(name, True)
        if not isinstance(value, bool):
            raise SpecError("bad_spec", f"'{name}' must be true or false, not {value!r}")
        out[name] = value
    if not out["fail_fast"] and kind == "grid" and out["depends"] == "wavefront":
        raise SpecError(
            "bad_spec",
            "'fail_fast': false needs independent tasks (a list, a range, or a grid with depends: none); "
            "in a wavefront grid a failed tile leaves every tile below and right of it unable to run",
        )


def _reduce_rule(rule: Any) -> dict[str, Any]:
    """``{"max": field}`` keeps the summary with the largest ``field``; among equal ones, the
    smallest values of the ``ties`` fields in order (e.g. ``["end_b", "end_a"]``: parasail's
    first cell in row-major order), then the lowest task id. ``{"sum": [fields]}`` adds those
    fields up. Both may be given."""
    if not isinstance(rule, dict) or set(rule) - {"max", "sum", "ties"}:
        raise SpecError("bad_spec", "'reduce' is a map with 'max' (a field name), 'ties' (field names) "
                                    "and/or 'sum' (field names)")
    if "max" in rule and not isinstance(rule["max"], str):
        raise SpecError("bad_spec", "reduce 'max' names one summary field")
    if "ties" in rule and ("max" not in rule or not isinstance(rule["ties"], list)
                           or not all(isinstance(f, str) for f in rule["ties"])):
        raise SpecError("bad_spec", "reduce 'ties' is a list of summary field names, used with 'max'")
    if "sum" in rule and (not isinstance(rule["sum"], list) or not all(isinstance(f, str) for f in rule["sum"])):
        raise SpecError("bad_spec", "reduce 'sum' is a list of summary field names")
    return dict(rule)


# ---- task sources ---------------------------------------------------------------------------


class ListSource(msgspec.Struct, tag="list", array_like=True):
    """Tasks are the spec's argument maps, materialised in order."""

    count: int
    cursor: int = 0  # next index to materialise
    done_below: int = 0  # every task id below this has ended (done, or failed in a job that goes on)
    # ended ids at or above done_below (a sparse tail, like TCP SACK). A dict used as an ordered
    # set: a set would encode in hash-table order, which depends on its history, and masters
    # that restored a snapshot would then serialise differently from those that replayed.
    done_above: dict[int, None] = {}

    def take(self, n: int) -> list[int]:
        first, self.cursor = self.cursor, min(self.count, self.cursor + n)
        return list(range(first, self.cursor))

    def on_done(self, task_id: int) -> list[int]:
        _mark_done(self, task_id)
        return []  # list/range refill through take()

    def on_failed(self, task_id: int) -> None:
        """A task failed for good and its job goes on: it has ended, like a done one."""
        _mark_done(self, task_id)

    def is_done(self, task_id: int) -> bool:
        """Whether the task has ended (done, or failed in a job that goes on)."""
        return task_id < self.done_below or task_id in self.done_above

    def exists(self, task_id: int) -> bool:
        return 0 <= task_id < self.count

    def inputs(self, task_id: int) -> list[int]:
        return []

    def consumers(self, task_id: int) -> int:
        return 0

    def frontier(self) -> int:
        return len(self.done_above)


def _mark_done(source: Any, task_id: int) -> None:
    source.done_above[task_id] = None
    while source.done_below in source.done_above:
        del source.done_above[source.done_below]
        source.done_below += 1


class RangeSource(ListSource, tag="range", array_like=True):
    """Task ``i`` of ``count`` gets ``{"index": i}``: a generator with nothing stored per task."""


class GridSource(msgspec.Struct, tag="grid", array_like=True):
    """Tiles (i, j), task id ``i * cols + j``; ``wavefront`` tiles wait for (i-1, j) and (i, j-1)."""

    rows: int
    cols: int
    wavefront: bool
    full_rows: int = 0  # rows 0 .. full_rows-1 are done
    partial: dict[int, int] = {}  # row → length of its done prefix, for rows begun but unfinished
    cursor: int = 0  # depends=none: next task id to materialise (wavefront: 1 once started)
    done_below: int = 0  # depends=none: as in ListSource
    done_above: dict[int, None] = {}

    def take(self, n: int) -> list[int]:
        if not self.wavefront:
            first, self.cursor = self.cursor, min(self.rows * self.cols, self.cursor + n)
            return list(range(first, self.cursor))
        if self.cursor == 0:  # the corner tile starts the wavefront
            self.cursor = 1
            return [0]
        return []

    def _prefix(self, row: int) -> int:
        if row < self.full_rows:
            return self.cols
        return self.partial.get(row, 0)

    def is_done(self, task_id: int) -> bool:
        if not self.wavefront:
            return task_id < self.done_below or task_id in self.done_above
        row, col = divmod(task_id, self.cols)
        return col < self._prefix(row)

    def exists(self, task_id: int) -> bool:
        return 0 <= task_id < self.rows * self.cols

    def on_failed(self, task_id: int) -> None:
        """As ListSource.on_failed; only independent tiles go on past a failure (see validate_spec)."""
        assert not self.wavefront, "a wavefront job stops at its first failed tile"
        _mark_done(self, task_id)

    def on_done(self, task_id: int) -> list[int]:
        """Record (i, j) done; return the tiles it makes ready."""
        if not self.wavefront:
            _mark_done(self, task_id)
            return []
        row, col = divmod(task_id, self.cols)
        assert self._prefix(row) == col, "a wavefront tile finished before its left neighbour"
        done = col + 1
        if done == self.cols:
            self.partial.pop(row, None)
            # rows finish in order: row r can only finish after row r-1 has
            self.full_rows = row + 1
        else:
            self.partial[row] = done
        ready = []
        if col + 1 < self.cols and (row == 0 or self._prefix(row - 1) > col + 1):
            ready.append(row * self.cols + col + 1)
        if row + 1 < self.rows and self._prefix(row + 1) == col:
            ready.append((row + 1) * self.cols + col)
        return ready

    def inputs(self, task_id: int) -> list[int]:
        """The tiles whose results (boundaries) this tile reads: above, then left."""
        if not self.wavefront:
            return []
        row, col = divmod(task_id, self.cols)
        out = []
        if row > 0:
            out.append(task_id - self.cols)
        if col > 0:
            out.append(task_id - 1)
        return out

    def consumers(self, task_id: int) -> int:
        """How many tiles read this tile's result."""
        if not self.wavefront:
            return 0
        row, col = divmod(task_id, self.cols)
        return (row + 1 < self.rows) + (col + 1 < self.cols)

    def frontier(self) -> int:
        return len(self.partial) + len(self.done_above)


Source = ListSource | RangeSource | GridSource


def make_source(kind: str, spec: dict[str, Any]) -> Source:
    """The task source a validated spec declares."""
    if kind == "list":
        return ListSource(count=len(spec["tasks"]))
    if kind == "range":
        return RangeSource(count=spec["count"])
    return GridSource(rows=spec["rows"], cols=spec["cols"], wavefront=spec["depends"] == "wavefront")


def total_tasks(source: Source) -> int:
    if isinstance(source, GridSource):
        return source.rows * source.cols
    return source.count


def task_arguments(kind: str, spec: dict[str, Any], task_id: int) -> dict[str, Any]:
    """What a worker gets as this task's arguments (besides the job's ``run``)."""
    if kind == "list":
        return spec["tasks"][task_id]
    if kind == "range":
        return {"index": task_id}
    row, col = divmod(task_id, spec["cols"])
    return {"row": row, "col": col}
