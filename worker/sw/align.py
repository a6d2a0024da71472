"""Whole-pair local alignment on this machine: the reference the cluster is measured against.

One thread computes the matrix as a single rectangle (one ramp, bands rolling through the
lanes). With several threads the matrix is cut into a grid of tiles computed in wavefront
order by a thread pool; the driver releases the GIL, so tiles on one anti-diagonal run on
separate cores. Tiles that provably cannot reach the best score found so far are pruned
(tile.py). The answer follows parasail's sw: A is the query (s1), B the reference (s2), and the
best cell is the highest score, then the smallest end in B, then in A.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import kernels
from .scoring import Scoring, encode, query_codes
from .tile import compute_rectangle, edge_left, edge_top, prunable, pruned_borders


@dataclass(frozen=True, slots=True)
class Alignment:
    """Best local score and its end cell (0-based positions of the last aligned letters)."""

    score: int
    end_a: int
    end_b: int
    cells: int
    seconds: float
    threads: int
    kernel: str
    fallback_steps: int = 0
    tiles_pruned: int = 0

    @property
    def gcups(self) -> float:
        return self.cells / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"score": self.score, "end_a": self.end_a, "end_b": self.end_b,
                "cells": self.cells, "seconds": round(self.seconds, 6),
                "gcups": round(self.gcups, 4), "threads": self.threads, "kernel": self.kernel,
                "fallback_steps": self.fallback_steps, "tiles_pruned": self.tiles_pruned}


def _codes(seq, name: str) -> np.ndarray:
    if isinstance(seq, np.ndarray):
        return np.ascontiguousarray(seq, dtype=np.uint8)
    return encode(seq, name)


def align(a, b, scoring: Scoring = Scoring(), *, threads: int = 1, kernel: str = "int16",
          tile: int | None = None) -> Alignment:
    """Align query ``a`` against reference ``b`` (strings, bytes or encoded codes).

    ``kernel`` is "int16" (exact: int16 lanes where the bounds allow, int32 elsewhere) or
    "int32". The kernels are compiled (or loaded) before the clock starts.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    a_codes = _codes(a, "query (A)")
    b_codes = _codes(b, "reference (B)")
    n, m = len(a_codes), len(b_codes)
    scoring.check_lengths(n, m)
    build = kernels.load(kernel)
    a_q = query_codes(a_codes)
    t0 = time.perf_counter()
    if threads == 1 or n == 0 or m == 0:
        best = np.array([0, 0, 0], np.int64)
        top_h, top_f = edge_top(n)
        left_h, left_e = edge_left(m)
        fallbacks = compute_rectangle(build, a_q, b_codes, top_h, top_f, left_h, left_e,
                                      scoring, 0, 0, best)
        pruned = 0
    else:
        best, fallbacks, pruned = _wavefront(build, a_q, b_codes, scoring, threads, tile)
    seconds = time.perf_counter() - t0
    return Alignment(int(best[0]), int(best[2]), int(best[1]), n * m, seconds, threads,
                     kernel, fallbacks, pruned)


def _wavefront(build, a_q, b, scoring, threads, tile):
    """Tiles in anti-diagonal order on a thread pool, with block pruning between diagonals."""
    n, m = len(a_q), len(b)
    size = tile or max(2048, -(-max(n, m) // (3 * threads)))
    rows = [(i, min(i + size, m)) for i in range(0, m, size)]
    cols = [(j, min(j + size, n)) for j in range(0, n, size)]
    bottoms = {}  # column index -> (h, f) bottom borders of the latest tile in that column
    rights = {}   # row index -> (h, e)
    for cj, (j0, j1) in enumerate(cols):
        bottoms[cj] = edge_top(j1 - j0)
    for ri, (i0, i1) in enumerate(rows):
        rights[ri] = edge_left(i1 - i0)
    best = np.array([0, 0, 0], np.int64)
    fallbacks = 0
    pruned = 0

    def run(ri, cj, floor_best):
        i0, i1 = rows[ri]
        j0, j1 = cols[cj]
        top_h, top_f = bottoms[cj]
        left_h, left_e = rights[ri]
        tile_best = np.array([0, i0, j0], np.int64)
        if prunable(top_h, top_f, left_h, left_e, scoring, m - i0, n - j0, floor_best):
            return (ri, cj, *pruned_borders(j1 - j0, i1 - i0, int(left_h[-1])), tile_best, 0,
                    True)
        top_h = top_h.copy()  # top_h[0], the corner, is left_h[-1] of the tile above
        top_f = top_f.copy()
        left_h = left_h.copy()
        left_e = left_e.copy()
        fb = compute_rectangle(build, a_q[j0:j1], b[i0:i1], top_h, top_f, left_h, left_e,
                               scoring, i0, j0, tile_best)
        return ri, cj, top_h, top_f, left_h, left_e, tile_best, fb, False

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for d in range(len(rows) + len(cols) - 1):
            cells = [(ri, d - ri) for ri in range(len(rows)) if 0 <= d - ri < len(cols)]
            floor_best = int(best[0])
            for ri, cj, bh, bf, rh, re_, tb, fb, was_pruned in pool.map(
                    lambda rc: run(rc[0], rc[1], floor_best), cells):
                bottoms[cj] = (bh, bf)
                rights[ri] = (rh, re_)
                fallbacks += fb
                pruned += was_pruned
                # highest score, then smallest reference row, then query column
                if tb[0] > 0 and (-tb[0], tb[1], tb[2]) < (-best[0], best[1], best[2]):
                    best[:] = tb
    return best, fallbacks, pruned
