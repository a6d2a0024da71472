"""The tile contract: one block of the DP matrix with its borders in and out.

Rows are reference letters (parasail's s2), columns query letters (its s1). A tile covers
reference letters ``row0 .. row0 + T - 1`` and query letters ``col0 .. col0 + W - 1``.

In: ``top_h`` (W + 1 values: H of the row above, ``top_h[0]`` being the corner above-left),
``top_f`` (W: F of the row above), ``left_h`` and ``left_e`` (T: H and E of the column to the
left). Out: ``bottom_h`` (W + 1; ``bottom_h[0]`` is ``left_h[T - 1]``, the corner of the tile
below), ``bottom_f``, ``right_h``, ``right_e``, and the best cell: the highest H, first in
row-major order, in global coordinates (``end_b`` = reference row, ``end_a`` = query column).
A tile whose best is 0 reports its first cell. Tiles stitched together are bit-exact against
the whole matrix. The matrix edges are ``edge_top``/``edge_left`` (H = 0, E/F = NEG).

Block pruning: given ``best_so_far`` and the distances to the matrix end, a tile that provably
cannot reach ``best_so_far`` (max H or E/F in + match * min(rows, cols to the end) <
best_so_far, strict) is skipped: its outputs are H = 0 and E/F = NEG, and ``pruned`` is set.
Such outputs are lower bounds that cannot change any cell scoring ``best_so_far`` or more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .scoring import Scoring, query_codes

NEG = -(2**28)
# Band height and block width: 64-128 wide blocks keep the per-row overhead small; about 300
# rows per band let a lane roll from band to band (the ramp is paid once per rectangle) and
# keep the int16 range of a sub-tile far below 32,767 (doc/kernels.md).
BLOCK = 128
BAND = 320


@dataclass(frozen=True, slots=True)
class TileResult:
    """A computed tile: its outgoing borders and its best cell (global coordinates)."""

    bottom_h: np.ndarray
    bottom_f: np.ndarray
    right_h: np.ndarray
    right_e: np.ndarray
    score: int
    end_a: int
    end_b: int
    pruned: bool = False
    fallback_steps: int = 0
    special: list = field(default_factory=list)  # (row, h, f): see sw_tile's special_stride


def edge_top(width: int) -> tuple[np.ndarray, np.ndarray]:
    """The borders above the first row of the matrix: H = 0, F = NEG."""
    return np.zeros(width + 1, np.int32), np.full(width, NEG, np.int32)


def edge_left(height: int) -> tuple[np.ndarray, np.ndarray]:
    """The borders left of the first column of the matrix: H = 0, E = NEG."""
    return np.zeros(height, np.int32), np.full(height, NEG, np.int32)


def _params(scoring: Scoring, row0: int, col0: int) -> np.ndarray:
    return np.array([scoring.gap_open, scoring.gap_extend, scoring.match, scoring.mismatch,
                     row0, col0], np.int64)


def compute_rectangle(build: kernels.Build, a_q: np.ndarray, b: np.ndarray,
                      bnd_h: np.ndarray, bnd_f: np.ndarray, col_h: np.ndarray,
                      col_e: np.ndarray, scoring: Scoring, row0: int, col0: int,
                      best: np.ndarray) -> int:
    """Compute a rectangle in place (borders top -> bottom, left -> right), raising ``best``.

    The driver wants whole bands and whole blocks; the remainders become a right strip and a
    bottom strip, computed the same way. Returns the number of int32 fallback steps.
    """
    T, W = len(b), len(a_q)
    if T == 0 or W == 0:
        if W == 0 and T > 0:
            bnd_h[0] = col_h[T - 1]
        return 0
    L = build.lanes
    wb = min(BLOCK, W)
    nblocks = W // wb
    wmain = nblocks * wb
    hb = _band_height(T, L)
    nbands = T // hb
    tmain = nbands * hb
    right_top = bnd_h[wmain:].copy()  # the right strip's top row, corner included
    starts = _schedule(nbands, nblocks, L)
    fallbacks = build.drive(a_q[:wmain], b[:tmain], bnd_h[:wmain + 1], bnd_f[:wmain],
                            col_h[:tmain], col_e[:tmain], nbands, hb, nblocks, wb, starts,
                            _params(scoring, row0, col0), best)
    if wmain < W:
        fallbacks += compute_rectangle(build, a_q[wmain:], b[:tmain], right_top,
                                       bnd_f[wmain:], col_h[:tmain], col_e[:tmain], scoring,
                                       row0, col0 + wmain, best)
        bnd_h[wmain + 1:] = right_top[1:]
    if tmain < T:
        fallbacks += compute_rectangle(build, a_q, b[tmain:], bnd_h, bnd_f, col_h[tmain:],
                                       col_e[tmain:], scoring, row0 + tmain, col0, best)
    return fallbacks


def _band_height(T: int, L: int) -> int:
    """Rows per band: whole rounds of L bands. Where T splits exactly into rounds of bands of
    BAND/2..BAND rows, that split (53,248 rows: 13 rounds of 256); else as many rounds as
    BAND-row bands need, the rows spread evenly over them (8,000 rows: 2 rounds of 250, not 25
    bands of 320, whose second round keeps 9 of 16 lanes busy). The rows left over run as a
    strip of short bands, a whole sweep of the width for a few rows: worth avoiding."""
    if T % L == 0:
        per_lane = T // L
        exact = [per_lane // r for r in range(max(1, per_lane // BAND), per_lane // (BAND // 2) + 1)
                 if per_lane % r == 0 and BAND // 2 <= per_lane // r <= BAND]
        if exact:
            return max(exact)
    rounds = max(1, -(-T // (L * BAND)))
    return max(1, min(BAND, T // (L * rounds)))


def _schedule(nbands: int, nblocks: int, lanes: int) -> np.ndarray:
    """Start step of every band: one after the band above, and not before its lane is free."""
    starts = np.zeros(max(nbands, 1), np.int64)
    for k in range(1, nbands):
        s = starts[k - 1] + 1
        if k >= lanes:
            s = max(s, starts[k - lanes] + nblocks)
        starts[k] = s
    return starts


def prunable(top_h: np.ndarray, top_f: np.ndarray, left_h: np.ndarray, left_e: np.ndarray,
             scoring: Scoring, rows_to_end: int, cols_to_end: int, best_so_far: int) -> bool:
    """Whether no path through the tile can reach ``best_so_far``: the highest value in
    (H or E/F) plus a match on every diagonal step left to the matrix end stays below it
    (strict, so a tie with ``best_so_far`` is never lost)."""
    inputs = max(int(top_h.max()), int(left_h.max()), int(top_f.max()), int(left_e.max()))
    return inputs + scoring.match * min(rows_to_end, cols_to_end) < best_so_far


def pruned_borders(width: int, height: int, corner: int):
    """The documented outputs of a pruned tile: H = 0 and E/F = NEG (bottom_h[0] stays the
    corner, ``left_h[-1]``). Returns (bottom_h, bottom_f, right_h, right_e)."""
    bottom_h = np.zeros(width + 1, np.int32)
    bottom_h[0] = corner
    return (bottom_h, np.full(width, NEG, np.int32), np.zeros(height, np.int32),
            np.full(height, NEG, np.int32))


def _as_border(values, length: int, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(values, dtype=np.int64)
    if arr.shape != (length,):
        raise ValueError(f"{name} must hold {length} values, got shape {arr.shape}")
    if arr.size and (arr.max() > 2**30 or arr.min() < NEG):
        raise ValueError(f"{name} holds values outside [{NEG}, 2^30]")
    return arr.astype(np.int32)


def sw_tile(a: np.ndarray, b: np.ndarray, top_h, top_f, left_h, left_e, row0: int = 0,
            col0: int = 0, scoring: Scoring = Scoring(), *, kernel: str = "int16",
            best_so_far: int | None = None, rows_to_end: int | None = None,
            cols_to_end: int | None = None, special_stride: int | None = None) -> TileResult:
    """Compute one tile (see the module docstring for the contract).

    ``a``/``b`` are codes from ``scoring.encode`` (query and reference segments). ``kernel``
    picks the build: "int16" (int16 lanes, exact int32 fallback per step) or "int32". Pruning
    applies when ``best_so_far`` is given; ``rows_to_end``/``cols_to_end`` default to the
    tile's own size (a tile at the matrix end).

    ``special_stride`` keeps the traceback's special rows: the H and F rows of every global
    reference row ``r`` of the tile with ``(r + 1) % special_stride == 0`` land in
    ``TileResult.special`` as ``(r, h, f)`` (``h`` with the corner in front, as ``bottom_h``).
    The tile is then computed as a stack of rectangles cut at those rows; a pruned tile keeps
    none (its rows are H = 0, F = NEG by definition).
    """
    a = np.ascontiguousarray(a, dtype=np.uint8)
    b = np.ascontiguousarray(b, dtype=np.uint8)
    T, W = len(b), len(a)
    bnd_h = _as_border(top_h, W + 1, "top_h")
    bnd_f = _as_border(top_f, W, "top_f")
    col_h = _as_border(left_h, T, "left_h")
    col_e = _as_border(left_e, T, "left_e")
    if (bnd_h.size and bnd_h.min() < 0) or (col_h.size and col_h.min() < 0):
        raise ValueError("H borders must be >= 0 in a local alignment")
    scoring.check_lengths(W, T)
    if best_so_far is not None and T and W and prunable(
            bnd_h, bnd_f, col_h, col_e, scoring,
            rows_to_end if rows_to_end is not None else T,
            cols_to_end if cols_to_end is not None else W, best_so_far):
        return TileResult(*pruned_borders(W, T, int(col_h[-1])), 0, col0, row0, pruned=True)
    best = np.array([0, row0, col0], np.int64)
    build = kernels.load(kernel)
    a_q = query_codes(a)
    special = []
    cuts = [T]
    if special_stride:
        if special_stride < 1:
            raise ValueError(f"special_stride must be at least 1, got {special_stride}")
        first = (-(row0 + 1)) % special_stride  # the first local row r with (row0+r+1) % stride == 0
        cuts = list(range(first + 1, T + 1, special_stride))
        if not cuts or cuts[-1] != T:
            cuts.append(T)
    fallbacks = 0
    start = 0
    for stop in cuts:
        fallbacks += compute_rectangle(build, a_q, b[start:stop], bnd_h, bnd_f,
                                       col_h[start:stop], col_e[start:stop], scoring,
                                       row0 + start, col0, best)
        if special_stride and (row0 + stop) % special_stride == 0:
            special.append((row0 + stop - 1, bnd_h.copy(), bnd_f.copy()))
        start = stop
    return TileResult(bnd_h, bnd_f, col_h, col_e, int(best[0]), int(best[2]), int(best[1]),
                      fallback_steps=fallbacks, special=special)
