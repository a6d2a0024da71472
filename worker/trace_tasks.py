"""The traceback's tasks: stage 2 (crosspoints) and stages 3-4 (one box), run in a slot's child.

A ``trace`` task's order (``run`` merged with the task's own arguments) names the two sequence
files (``a``, ``b``: local paths by the time it gets here), ``scoring``, ``kernel`` and ``op``:

- ``crosspoints``: ``end_a``, ``end_b``, ``score`` (the score pass's answer) and ``rows``, the
  paths of every tile's special-rows file. Returns ``{"points": [[b, a, state, remaining],
  ...]}``, end first (``worker.sw.trace.crosspoints``).
- ``box``: ``b0``, ``b1``, ``a0``, ``a1`` (half-open), ``start``, ``end`` (gap states) and
  ``score``. Returns the box's CIGAR (``=``/``X``/``I``/``D``) in ``cigar``, or, when it is
  longer than ``CIGAR_INLINE``, writes it to ``cigar.txt`` in the output directory.

Both read only what they need of the sequence files (a box: its slices).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from worker import tiles
from worker.sw import cigar, trace
from worker.sw.special_rows import RowStore, SpecialRowsError, read_rows

CIGAR_INLINE = 48 << 10
REQUEST_KEYS = frozenset(("a", "b", "scoring", "kernel", "op", "end_a", "end_b", "score", "rows",
                          "b0", "b1", "a0", "a1", "start", "end"))
CIGAR_FILE = "cigar.txt"


class TraceTaskError(ValueError):
    """A trace order that cannot run; the message says what was wrong, in one sentence."""


def run_trace(request: dict, out_dir: str | Path) -> dict:
    """Run one trace task (see the module docstring); returns its summary."""
    if not isinstance(request, dict):
        raise TraceTaskError(f"a trace order must be a dict, got {type(request).__name__}")
    unknown = sorted(str(k) for k in request if k not in REQUEST_KEYS)
    if unknown:
        raise TraceTaskError(f"trace order has unknown keys {', '.join(unknown)}")
    try:
        scoring = tiles.parse_scoring(request.get("scoring"))
    except tiles.TileError as exc:
        raise TraceTaskError(str(exc)) from None
    kernel = request.get("kernel", "int16")
    op = request.get("op")
    t0 = time.perf_counter()
    try:
        if op == "crosspoints":
            summary = _crosspoints(request, scoring, kernel)
        elif op == "box":
            summary = _box(request, scoring, kernel, Path(out_dir))
        else:
            raise TraceTaskError(f"op must be 'crosspoints' or 'box', got {op!r}")
    except (trace.TraceError, SpecialRowsError) as exc:
        raise TraceTaskError(str(exc)) from None
    summary["seconds"] = round(time.perf_counter() - t0, 6)
    return summary


def _ints(request: dict, *names: str) -> list[int]:
    out = []
    for name in names:
        value = request.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TraceTaskError(f"{name} must be an integer, got {value!r}")
        out.append(value)
    return out


def _read(path, name: str, start: int = 0, length: int | None = None) -> np.ndarray:
    """Letters ``start ..`` (``length`` of them, or to the end) of a sequence file, encoded."""
    if not isinstance(path, (str, Path)):
        raise TraceTaskError(f"{name} must be the path of a sequence file, got {path!r}")
    try:
        if length is None:
            length = tiles.sequence_length(path, name) - start
        return tiles.read_letters(path, name, start, length)
    except tiles.TileError as exc:
        raise TraceTaskError(str(exc)) from None


def _crosspoints(request: dict, scoring, kernel: str) -> dict:
    end_a, end_b, score = _ints(request, "end_a", "end_b", "score")
    paths = request.get("rows")
    if not isinstance(paths, list) or not all(isinstance(p, (str, Path)) for p in paths):
        raise TraceTaskError("rows must be the list of the tiles' special-rows files")
    a = _read(request.get("a"), "query (a)")
    b = _read(request.get("b"), "reference (b)")
    if not (0 <= end_a < len(a) and 0 <= end_b < len(b)):
        raise TraceTaskError(f"the end cell ({end_b}, {end_a}) is outside the {len(b)} x {len(a)} matrix")
    t0 = time.perf_counter()
    store = RowStore([read_rows(p) for p in paths], len(a))
    load_s = time.perf_counter() - t0
    points = trace.crosspoints(a, b, scoring, store, end_a, end_b, score, kernel=kernel)
    return {"points": [p.as_list() for p in points], "special_rows": len(store.rows),
            "stride": store.stride, "load_s": round(load_s, 6)}


def _box(request: dict, scoring, kernel: str, out_dir: Path) -> dict:
    b0, b1, a0, a1, start, end, score = _ints(request, "b0", "b1", "a0", "a1", "start", "end", "score")
    if not (0 <= b0 <= b1 and 0 <= a0 <= a1) or start not in (0, 1) or end not in (0, 1):
        raise TraceTaskError(f"box rows {b0}..{b1}, columns {a0}..{a1}, states {start}/{end} "
                             "are not a box (half-open ranges, states 0 = H or 1 = F)")
    a = _read(request.get("a"), "query (a)", a0, a1 - a0)
    b = _read(request.get("b"), "reference (b)", b0, b1 - b0)
    got, ops = trace.solve_box(a, b, scoring, start, end, score, kernel=kernel)
    text = cigar.to_string(ops)
    summary = {"score": got, "columns": int(len(ops)), "cells": (b1 - b0) * (a1 - a0)}
    if len(text) <= CIGAR_INLINE:
        summary["cigar"] = text
    else:
        (out_dir / CIGAR_FILE).write_text(text)
        summary["cigar_bytes"] = len(text)
    return summary
