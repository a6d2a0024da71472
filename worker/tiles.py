"""The tile task: one tile of a whole-genome alignment's DP matrix, borders in and out as files.

Theory of operation
-------------------
A whole-genome alignment cuts the DP matrix into a grid of tiles (CUDAlign's stage 1 blocks):
rows are reference letters (``b``), columns query letters (``a``), and tile (row, col) covers
reference letters ``row * tile_rows ..`` and query letters ``col * tile_cols ..``; the last row
and column of tiles may be smaller. A tile needs the bottom border of the tile above and the
right border of the tile to its left, so the grid is computed in wavefront order (anti-diagonal
by anti-diagonal) and every tile writes its own borders to a boundary file for its neighbours.

``run_tile`` follows ``worker.sw.align._wavefront`` exactly, so a grid of tiles is bit-identical
to ``worker.sw.align``: the top borders are the above tile's ``bottom_h``/``bottom_f`` (whose
``bottom_h[0]`` is the corner above-left of this tile), or ``edge_top`` on the first row; the
left borders are the left tile's ``right_h``/``right_e``, or ``edge_left`` on the first column.
The whole pair's best cell is the best of the tiles' (highest score, then smallest ``end_b``,
then smallest ``end_a``). With ``best_so_far`` a tile that cannot reach it is pruned (tile.py).

A tile reads only its slices of the sequence files (seek and read), so a task costs memory in
the tile's size, not the genome's.

Boundary file (little-endian): a 68-byte header (magic ``b"SWB1"``, version u32, then row,
col, T, W, score, end_a, end_b as i64, then flags u32, bit 0 = pruned), then ``bottom_h``
(W + 1 int32), ``bottom_f`` (W), ``right_h`` (T), ``right_e`` (T). It is written under a temporary name and renamed, so a reader
never sees half of one.

With ``special_stride`` the tile also keeps the traceback's special rows (every reference row
``r`` with ``(r + 1) % special_stride == 0``) in ``rows.swr`` beside the boundary file
(``worker.sw.special_rows``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from worker.sw import kernels
from worker.sw.scoring import Scoring, ScoringError, SequenceError, encode
from worker.sw.special_rows import write_rows
from worker.sw.tile import edge_left, edge_top, sw_tile

MAGIC = b"SWB1"
VERSION = 1
FLAG_PRUNED = 1
_HEADER = struct.Struct("<4sIqqqqqqqI")
_INT32 = np.dtype("<i4")
_REQUIRED = ("a", "b", "row", "col", "tile_rows", "tile_cols", "boundaries")
_OPTIONAL = ("scoring", "kernel", "best_so_far", "special_stride")
REQUEST_KEYS = frozenset(_REQUIRED + _OPTIONAL)  # what run_tile takes, and nothing else


class TileError(ValueError):
    """A tile request that cannot be computed; the message says what was wrong, in one sentence."""


class BoundaryError(TileError):
    """A boundary file that is not one, is cut short, or belongs to another tile."""


@dataclass(frozen=True, slots=True)
class Boundary:
    """A tile's outgoing borders and best cell, as read from its boundary file."""

    row: int
    col: int
    height: int  # T: reference letters in the tile
    width: int  # W: query letters in the tile
    score: int
    end_a: int
    end_b: int
    pruned: bool
    bottom_h: np.ndarray  # W + 1 values, [0] the corner of the tile below
    bottom_f: np.ndarray  # W
    right_h: np.ndarray  # T
    right_e: np.ndarray  # T


def boundary_size(height: int, width: int) -> int:
    """Bytes in the boundary file of a ``height`` x ``width`` tile."""
    return _HEADER.size + _INT32.itemsize * (2 * width + 1 + 2 * height)


def read_boundary(path: str | Path) -> Boundary:
    """Read and check a boundary file; ``BoundaryError`` if it is not a whole, valid one."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BoundaryError(f"cannot read boundary file {path}: {exc.strerror or exc}") from None
    if len(data) < _HEADER.size:
        raise BoundaryError(f"boundary file {path} holds {len(data)} bytes, fewer than its "
                            f"{_HEADER.size}-byte header")
    magic, version, row, col, T, W, score, end_a, end_b, flags = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BoundaryError(f"{path} is not a boundary file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise BoundaryError(f"boundary file {path} has version {version}; this worker reads "
                            f"version {VERSION}")
    if min(row, col, T, W) < 0 or len(data) != boundary_size(T, W):
        raise BoundaryError(f"boundary file {path} holds {len(data)} bytes; a {T} x {W} tile's "
                            f"file holds {boundary_size(max(T, 0), max(W, 0))}")
    values = np.frombuffer(data, _INT32, offset=_HEADER.size)
    cuts = np.cumsum([W + 1, W, T])
    bottom_h, bottom_f, right_h, right_e = np.split(values, cuts)
    return Boundary(row, col, T, W, score, end_a, end_b, bool(flags & FLAG_PRUNED),
                    bottom_h, bottom_f, right_h, right_e)


def write_boundary(path: str | Path, row: int, col: int, result) -> None:
    """Write a ``TileResult``'s borders and best cell to ``path`` (temporary name, rename)."""
    path = Path(path)
    T, W = len(result.right_h), len(result.bottom_f)
    header = _HEADER.pack(MAGIC, VERSION, row, col, T, W, result.score, result.end_a,
                          result.end_b, FLAG_PRUNED if result.pruned else 0)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for values in (result.bottom_h, result.bottom_f, result.right_h, result.right_e):
            f.write(np.ascontiguousarray(values, _INT32).tobytes())
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class _Grid:
    """Where a tile lies: its first reference row and query column and its size."""

    row: int
    col: int
    row0: int
    col0: int
    height: int
    width: int
    len_a: int
    len_b: int


def run_tile(request: dict, out_path: str | Path) -> dict:
    """Compute the tile ``request`` names, write its boundary file to ``out_path``, and return
    its summary: ``score``, ``end_a``, ``end_b`` (global coordinates), ``cells``, ``pruned``,
    ``fallback_steps``. A bad request raises ``TileError`` (see the module docstring)."""
    _check_keys(request)
    scoring = parse_scoring(request.get("scoring"))
    kernel = request.get("kernel", "int16")
    if kernel not in kernels.BUILDS:
        raise TileError(f"kernel must be one of {sorted(kernels.BUILDS)}, got {kernel!r}")
    best_so_far = request.get("best_so_far")
    if best_so_far is not None and not _is_int(best_so_far):
        raise TileError(f"best_so_far must be an integer, got {best_so_far!r}")
    stride = request.get("special_stride")
    if stride is not None and (not _is_int(stride) or stride < 1):
        raise TileError(f"special_stride must be a positive integer, got {stride!r}")
    grid = _locate(request)
    try:
        scoring.check_lengths(grid.len_a, grid.len_b)
    except ScoringError as exc:
        raise TileError(str(exc)) from None
    a = read_letters(request["a"], "query (a)", grid.col0, grid.width)
    b = read_letters(request["b"], "reference (b)", grid.row0, grid.height)
    top_h, top_f, left_h, left_e = _borders(request["boundaries"], grid)
    try:
        result = sw_tile(a, b, top_h, top_f, left_h, left_e, grid.row0, grid.col0, scoring,
                         kernel=kernel, best_so_far=best_so_far,
                         rows_to_end=grid.len_b - grid.row0, cols_to_end=grid.len_a - grid.col0,
                         special_stride=stride)
    except ValueError as exc:  # sw_tile checks the borders' values (lengths were checked above)
        raise BoundaryError(f"the neighbours' borders are unusable: {exc}") from None
    write_boundary(out_path, grid.row, grid.col, result)
    if stride:
        write_rows(rows_path(out_path), grid.row, grid.col, grid.row0, grid.col0, grid.width, stride,
                   result.special, pruned=result.pruned)
    return {"score": result.score, "end_a": result.end_a, "end_b": result.end_b,
            "cells": grid.height * grid.width, "pruned": result.pruned,
            "fallback_steps": result.fallback_steps}


def rows_path(out_path: str | Path) -> Path:
    """Where ``run_tile`` writes the tile's special rows (with ``special_stride``): next to its
    boundary file."""
    return Path(out_path).with_name("rows.swr")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_keys(request) -> None:
    if not isinstance(request, dict):
        raise TileError(f"a tile request must be a dict, got {type(request).__name__}")
    missing = [k for k in _REQUIRED if k not in request]
    if missing:
        raise TileError(f"tile request is missing {', '.join(missing)}")
    unknown = sorted(str(k) for k in request if k not in _REQUIRED + _OPTIONAL)
    if unknown:
        raise TileError(f"tile request has unknown keys {', '.join(unknown)}; it takes "
                        f"{', '.join(_REQUIRED + _OPTIONAL)}")
    for key in ("row", "col", "tile_rows", "tile_cols"):
        if not _is_int(request[key]):
            raise TileError(f"{key} must be an integer, got {request[key]!r}")
    for key in ("tile_rows", "tile_cols"):
        if request[key] < 1:
            raise TileError(f"{key} must be at least 1, got {request[key]}")
    for key in ("a", "b"):
        if not isinstance(request[key], (str, Path)):
            raise TileError(f"{key} must be the path of a sequence file, got {request[key]!r}")
    boundaries = request["boundaries"]
    if not isinstance(boundaries, (list, tuple)) or \
            not all(isinstance(p, (str, Path)) for p in boundaries):
        raise TileError(f"boundaries must be a list of paths, got {boundaries!r}")


def parse_scoring(given) -> Scoring:
    """A request's ``scoring`` dict (None: the defaults) as a Scoring; TileError if it is bad."""
    if given is None:
        return Scoring()
    if not isinstance(given, dict):
        raise TileError(f"scoring must be a dict of Scoring's fields, got {given!r}")
    known = [f.name for f in fields(Scoring)]
    unknown = sorted(str(k) for k in given if k not in known)
    if unknown:
        raise TileError(f"scoring has unknown fields {', '.join(unknown)}; it takes "
                        f"{', '.join(known)}")
    try:
        return Scoring(**given)
    except ScoringError as exc:
        raise TileError(f"bad scoring: {exc}") from None


def sequence_length(path, name: str) -> int:
    """Letters in a sequence file (its size); TileError naming ``name`` if it cannot be read."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise TileError(f"cannot read the {name} sequence file {path}: "
                        f"{exc.strerror or exc}") from None


def _locate(request: dict) -> _Grid:
    len_a = sequence_length(request["a"], "query (a)")
    len_b = sequence_length(request["b"], "reference (b)")
    row, col = request["row"], request["col"]
    T_full, W_full = request["tile_rows"], request["tile_cols"]
    rows, cols = -(-len_b // T_full), -(-len_a // W_full)
    if not 0 <= row < rows:
        raise TileError(f"row {row} is outside the grid: the reference (b) file holds {len_b} "
                        f"letters, {rows} rows of tiles of {T_full}")
    if not 0 <= col < cols:
        raise TileError(f"col {col} is outside the grid: the query (a) file holds {len_a} "
                        f"letters, {cols} columns of tiles of {W_full}")
    row0, col0 = row * T_full, col * W_full
    return _Grid(row, col, row0, col0, min(T_full, len_b - row0), min(W_full, len_a - col0),
                 len_a, len_b)


def read_letters(path, name: str, start: int, length: int) -> np.ndarray:
    """Letters ``start .. start + length - 1`` of a sequence file, encoded; TileError (naming
    ``name``) if the file cannot be read, is too short or holds a bad letter."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(length)
    except OSError as exc:
        raise TileError(f"cannot read the {name} sequence file {path}: "
                        f"{exc.strerror or exc}") from None
    if len(raw) != length:
        raise TileError(f"the {name} sequence file {path} is too short: letters {start}.."
                        f"{start + length - 1} asked for, {start + len(raw)} there")
    try:
        return encode(raw, f"{name} file {path}, from letter {start},")
    except SequenceError as exc:
        raise TileError(str(exc)) from None


def _borders(paths, grid: _Grid):
    """(top_h, top_f, left_h, left_e) from the neighbours' boundary files or the matrix edges."""
    wanted = ([("above", grid.row - 1, grid.col)] if grid.row > 0 else []) + \
             ([("left", grid.row, grid.col - 1)] if grid.col > 0 else [])
    if len(paths) != len(wanted):
        names = " then ".join(f"the tile {side}'s" for side, _, _ in wanted) or "none"
        raise TileError(f"tile ({grid.row}, {grid.col}) takes {len(wanted)} boundary files "
                        f"({names}), got {len(paths)}")
    top_h, top_f = edge_top(grid.width)
    left_h, left_e = edge_left(grid.height)
    for (side, row, col), path in zip(wanted, paths):
        found = read_boundary(path)
        if (found.row, found.col) != (row, col):
            raise BoundaryError(f"boundary file {path} is tile ({found.row}, {found.col})'s, "
                                f"not tile ({row}, {col})'s, the tile {side}")
        if side == "above":
            if found.width != grid.width:
                raise BoundaryError(f"boundary file {path} is {found.width} wide; tile "
                                    f"({grid.row}, {grid.col}) is {grid.width} wide")
            # bottom_h[0] is the H above-left of this tile: the corner sw_tile wants in top_h[0].
            top_h, top_f = found.bottom_h, found.bottom_f
        else:
            if found.height != grid.height:
                raise BoundaryError(f"boundary file {path} is {found.height} high; tile "
                                    f"({grid.row}, {grid.col}) is {grid.height} high")
            left_h, left_e = found.right_h, found.right_e
    return top_h, top_f, left_h, left_e
