"""Traceback in linear space: the optimal local alignment itself, from the score pass's rows.

Theory of operation
-------------------
CUDAlign's stages (Sandes et al., "CUDAlign 4.0", IEEE TPDS 2016; doc/align.md), with the
score pass's own lane kernels doing every DP:

1. The score pass (``worker.tiles``) found the best score S* and its end cell, and kept the
   forward H and F rows of every ``stride``-th reference row (``special_rows``).
2. ``crosspoints``: from the end cell, strip by strip upwards, an *anchored* DP runs on the
   reversed strip (the reference rows below the special row above, the query columns left of
   the anchor) in chunks of columns going left. Where forward H (or F, joining two halves of
   one vertical gap) on the special row plus the reverse score equals the score still to be
   explained, the optimal path crosses that row: that cell is the next anchor. A reverse cell
   worth exactly that score is the start. A chunk's values depend only on the chunks right of
   it, so the search stops at the first chunk holding the crossing (about one strip-height of
   columns for a near-diagonal path), not at the matrix's left edge.
3. ``solve_box``: each box between consecutive crosspoints is a global alignment with known
   score and gap states at its ends, solved by Myers-Miller (forward to the middle row, reverse
   to it, split where the two sum to the box's score, recurse) and, below ``LEAF_CELLS``, a
   direct traceback (``boxdp``). Boxes are independent: the cluster runs them as tasks.
4. ``join`` concatenates the boxes' operations; ``cigar.rescore`` re-verifies S*.

Anchored DP on a local kernel. The lane kernels compute local alignment (H floored at 0). A
DP anchored at a corner is the same kernel with every border value raised by ``BIG``: values
reachable from the anchor are BIG + (their anchored score) and stay far above the floor, while
a local restart (0) or a ``FORBID`` border (0) yields at most S* < BIG - S*, too little to ever
equal an anchored target. With BIG = 2^30 and S* < 2^29 every value fits int32. Neighbouring
anchored values differ by at most gap_open + match, so the int16 lanes run rebased on them.

Gap states at an anchor: "H" (the path may end there in any state) or "F" (it ends with a
vertical gap, consuming reference letters, that goes on past the anchor). On the far side of an
"F" crossing the gap continues: its open is not charged again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import boxdp, kernels
from .cigar import to_string
from .scoring import Scoring, query_codes
from .special_rows import RowStore, read_rows, write_rows
from .tile import NEG, compute_rectangle, edge_left, edge_top, sw_tile

BIG = 1 << 30
FORBID = 0
MAX_SCORE = (1 << 29) - 1
H, F = 0, 1  # gap states at an anchor (boxdp's start/end constraints use the same codes)
LEAF_CELLS = 1 << 20  # boxes up to this many cells are traced back directly (1 MB of bits)
CHUNK = 4096  # columns per step of the crosspoint search


class TraceError(ValueError):
    """The traceback cannot go on: the inputs do not belong together, or a row is missing."""


def check_scoring(scoring: Scoring) -> None:
    """Refuse a scoring whose optimum no CIGAR can spell: with gap_open < gap_extend, two
    adjacent gaps score better than one run of the same letters, which a CIGAR cannot tell apart."""
    if scoring.gap_open < scoring.gap_extend:
        raise TraceError(f"a traceback needs gap_open >= gap_extend (got {scoring.gap_open} < "
                         f"{scoring.gap_extend}): a cheaper open makes two adjacent gaps beat one, "
                         "and a CIGAR cannot write them apart")


@dataclass(frozen=True, slots=True)
class Point:
    """A crosspoint: the optimal path has consumed reference letters ..b and query letters ..a
    here (0-based, inclusive; -1: none), in gap state ``state``, scoring ``remaining`` so far.
    The first point is the end cell (remaining = S*); the last has remaining 0 and state H:
    the path starts at (b + 1, a + 1)."""

    b: int
    a: int
    state: int
    remaining: int

    def as_list(self) -> list[int]:
        return [self.b, self.a, self.state, self.remaining]


def _build(kernel: str):
    return kernels.load(kernel)


def anchored_rows(a_q: np.ndarray, b: np.ndarray, scoring: Scoring, lead: int, lead_first: int,
                  *, kernel: str = "int16", left: tuple | None = None, q0: int = 0,
                  target: int | None = None):
    """Anchored DP over ``b`` (rows) x ``a_q`` (columns, query codes) from the top-left corner.

    ``lead`` H: the path starts at the corner (a leading gap costs gap_open + ...); F: it starts
    with a vertical gap whose first letter costs ``lead_first`` (gap_open, or gap_extend where
    the gap was opened before the corner).
    For a chunk further right of the same DP pass ``q0`` (its first column) and ``left``, the
    previous chunk's right border. Returns ``(h, f, right, hit)``: ``h[k]``/``f[k]`` the anchored
    score (BIG removed) of the last row after k columns of this chunk (k = 0: the column left of
    it), ``right`` the border for the next chunk, and ``hit`` the (row, col) of a cell scoring
    ``target`` (local coordinates; col counts from q0), or None.
    """
    go, ge = scoring.gap_open, scoring.gap_extend
    T, W = len(b), len(a_q)
    cols = np.arange(q0, q0 + W, dtype=np.int64)
    if lead == H:
        top_h = np.empty(W + 1, np.int64)
        top_h[0] = BIG if q0 == 0 else BIG - go - ge * (q0 - 1)
        top_h[1:] = BIG - go - ge * cols
    else:
        top_h = np.full(W + 1, FORBID, np.int64)
    top_f = np.full(W, NEG, np.int32)
    if left is None:
        first = go if lead == H else lead_first
        left_h = (BIG - first - ge * np.arange(T, dtype=np.int64)).astype(np.int32)
        left_e = np.full(T, NEG, np.int32)
    else:
        left_h, left_e = left[0].copy(), left[1].copy()
    bnd_h = top_h.astype(np.int32)
    best = np.array([(BIG + target - 1) if target is not None else 1 << 40, -1, -1], np.int64)
    compute_rectangle(_build(kernel), a_q, b, bnd_h, top_f, left_h, left_e, scoring, 0, 0, best)
    h = bnd_h.astype(np.int64) - BIG
    f = np.empty(W + 1, np.int64)
    f[0] = h[0]  # no column consumed: the path came straight down, a vertical gap
    f[1:] = top_f.astype(np.int64) - BIG
    hit = None
    if target is not None and best[1] >= 0 and best[0] == BIG + target:
        hit = (int(best[1]), int(best[2]))
    return h, f, (left_h, left_e), hit


def crosspoints(a: np.ndarray, b: np.ndarray, scoring: Scoring, store, end_a: int, end_b: int,
                score: int, *, kernel: str = "int16", chunk: int = CHUNK,
                progress=None) -> list[Point]:
    """Stage 2: the crosspoints of an optimal path with the special rows, end to start.

    ``a``/``b`` are the whole sequences' codes (``encode``), ``store`` a ``RowStore`` (or any
    object with ``rows``, ``h(r, lo, hi)``, ``f(r, lo, hi)``). ``progress(points)`` is called
    after each strip.
    """
    check_scoring(scoring)
    if not 0 < score <= MAX_SCORE:
        raise TraceError(f"a traceback needs a best score from 1 to {MAX_SCORE}, got {score}")
    a_q = query_codes(a)
    go, ge = scoring.gap_open, scoring.gap_extend
    points = [Point(end_b, end_a, H, score)]
    rows = sorted(store.rows)
    while points[-1].remaining > 0 or points[-1].state != H:
        p = points[-1]
        above = [r for r in rows if r < p.b]
        r = above[-1] if above else -1
        brev = np.ascontiguousarray(b[r + 1:p.b + 1][::-1])
        left = None
        found = None
        q0 = 0
        while found is None and q0 <= p.a:
            w = min(chunk, p.a + 1 - q0)
            arev = np.ascontiguousarray(a_q[p.a - q0 - w + 1:p.a - q0 + 1][::-1])
            h, f, left, hit = anchored_rows(arev, brev, scoring, p.state, go, kernel=kernel,
                                            left=left, q0=q0, target=p.remaining)
            if hit is not None:  # the start: a cell explaining all that remains on its own
                found = Point(p.b - hit[0] - 1, p.a - q0 - hit[1] - 1, H, 0)
            elif r >= 0:
                found = _crossing(store, r, p, q0, w, h, f, go, ge)
            q0 += w
        if found is None:
            if r < 0 or not above:
                raise TraceError(f"no start found for the path from ({p.b}, {p.a}) scoring "
                                 f"{p.remaining}: the special rows do not belong to this alignment")
            raise TraceError(f"the path from ({p.b}, {p.a}) scoring {p.remaining} does not cross "
                             f"special row {r}: the special rows do not belong to this alignment")
        points.append(found)
        if progress is not None:
            progress(points)
    return points


def _crossing(store, r: int, p: Point, q0: int, w: int, h, f, go: int, ge: int) -> Point | None:
    """The crossing of special row ``r`` within this chunk, nearest the anchor, or None.

    The chunk's reverse columns q0 .. q0+w-1 are the suffix starting at query column
    c = p.a - q; the prefix then ends at e = c - 1 on row r. Also, for the first chunk, the
    suffix that consumes no query letter (e = p.a)."""
    hi_e = p.a - q0 - 1
    lo_e = p.a - q0 - w
    # candidates in scan order: e = p.a (first chunk only), then e descending
    es = np.arange(hi_e, lo_e - 1, -1, dtype=np.int64)
    rh = h[1:w + 1]  # q = q0 .. q0+w-1  <->  e = hi_e .. lo_e
    rf = f[1:w + 1]
    if q0 == 0:
        es = np.concatenate(([p.a], es))
        rh = np.concatenate(([h[0]], rh))
        rf = np.concatenate(([f[0]], rf))
    lo, hi = int(es[-1]), int(es[0])
    hf = store.h(r, lo + 1, hi)  # H[r][lo .. hi]
    ff = np.full(hi - lo + 1, NEG, np.int64)
    if hi >= 0:
        ff[max(lo, 0) - lo:] = store.f(r, max(lo, 0), hi)
    hf = hf[::-1][:len(es)]  # e descending, as es
    ff = ff[::-1][:len(es)]
    tot_h = hf + rh
    tot_f = ff + rf + (go - ge)
    ok_h = tot_h == p.remaining
    ok_f = (tot_f == p.remaining) & (ff > NEG // 2)
    for k in np.flatnonzero(ok_h | ok_f)[:1]:
        e = int(es[k])
        if ok_h[k]:
            return Point(r, e, H, int(hf[k]))
        return Point(r, e, F, int(ff[k]))
    return None


@dataclass(frozen=True, slots=True)
class Box:
    """One independent piece of the path: reference letters b0..b1-1 against query letters
    a0..a1-1 (half-open), a global alignment scoring ``score`` with gap states at its ends."""

    b0: int
    b1: int
    a0: int
    a1: int
    start: int
    end: int
    score: int

    def as_dict(self) -> dict:
        return {"b0": self.b0, "b1": self.b1, "a0": self.a0, "a1": self.a1,
                "start": self.start, "end": self.end, "score": self.score}


def boxes(points: list[Point]) -> list[Box]:
    """The boxes between consecutive crosspoints, from the start to the end."""
    out = []
    for lower, upper in zip(points[:-1], points[1:]):
        out.append(Box(upper.b + 1, lower.b + 1, upper.a + 1, lower.a + 1, upper.state,
                       lower.state, lower.remaining - upper.remaining))
    return out[::-1]


def solve_box(a: np.ndarray, b: np.ndarray, scoring: Scoring, start: int = H, end: int = H,
              score: int | None = None, *, kernel: str = "int16",
              leaf_cells: int = LEAF_CELLS) -> tuple[int, np.ndarray]:
    """Stages 3-4 on one box: the optimal global alignment of query codes ``a`` (``encode``)
    against reference codes ``b`` under the gap states ``start``/``end`` (see ``boxdp``).
    Returns (score, ops); with ``score`` given, a different optimum raises TraceError."""
    check_scoring(scoring)
    pieces: list[np.ndarray] = []
    got = _solve(query_codes(a), np.ascontiguousarray(b), scoring, start, end, score, kernel,
                 leaf_cells, pieces)
    ops = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return got, ops


def _solve(a_q, b, scoring, start, end, expected, kernel, leaf_cells, out) -> int:
    M, N = len(b), len(a_q)
    if M <= 1 or N <= 1 or M * N <= leaf_cells:
        got, ops = boxdp.global_traceback(a_q, b, scoring, start, end)
        if expected is not None and got != expected:
            raise TraceError(f"a {M} x {N} box scores {got}, not the {expected} its ends promise")
        out.append(ops)
        return got
    go, ge = scoring.gap_open, scoring.gap_extend
    mid = M // 2
    hu, fu, _, _ = anchored_rows(a_q, b[:mid], scoring, start, ge, kernel=kernel)
    rh, rf, _, _ = anchored_rows(np.ascontiguousarray(a_q[::-1]), np.ascontiguousarray(b[mid:][::-1]),
                                 scoring, end, go, kernel=kernel)
    # split after query column e (e = -1 .. N-1): upper index e + 1, lower index N - 1 - e
    tot_h = hu + rh[::-1]
    tot_f = fu + rf[::-1] + (go - ge)
    k_h, k_f = int(np.argmax(tot_h)), int(np.argmax(tot_f))
    best = max(int(tot_h[k_h]), int(tot_f[k_f]))
    if expected is not None and best != expected:
        raise TraceError(f"a {M} x {N} box scores {best}, not the {expected} its ends promise")
    if tot_h[k_h] == best:
        e, join, upper = k_h - 1, H, int(hu[k_h])
    else:
        e, join, upper = k_f - 1, F, int(fu[k_f])
    _solve(a_q[:e + 1], b[:mid], scoring, start, join, upper, kernel, leaf_cells, out)
    _solve(a_q[e + 1:], b[mid:], scoring, join, end, best - upper, kernel, leaf_cells, out)
    return best


@dataclass(frozen=True)
class TracedAlignment:
    """A traced local alignment: its score, where it starts and ends (0-based, inclusive) and
    its operations (``worker.sw.cigar`` codes)."""

    score: int
    start_a: int
    start_b: int
    end_a: int
    end_b: int
    ops: np.ndarray

    @property
    def cigar(self) -> str:
        return to_string(self.ops)


@dataclass(frozen=True)
class Traced(TracedAlignment):
    """An alignment traced on one machine (``trace_local``), with its crosspoints and the
    seconds each stage took."""

    points: list
    seconds: dict


def trace_local(a: np.ndarray, b: np.ndarray, scoring: Scoring, directory, *, tile: int = 4096,
                stride: int = 1024, kernel: str = "int16", chunk: int = CHUNK,
                leaf_cells: int = LEAF_CELLS) -> Traced:
    """Stages 1-5 on this machine, as the cluster runs them: the score pass tile by tile in
    wavefront order (block pruning on, special rows written to ``directory``), the crosspoints,
    the boxes, the join. The oracle of the cluster's traceback (which is deterministic: the same
    pair gives the same crosspoints and the same CIGAR) and a reference for its timings."""
    check_scoring(scoring)
    n, m = len(a), len(b)
    t0 = time.perf_counter()
    rows = [(i, min(i + tile, m)) for i in range(0, m, tile)]
    cols = [(j, min(j + tile, n)) for j in range(0, n, tile)]
    bottoms = {cj: edge_top(j1 - j0) for cj, (j0, j1) in enumerate(cols)}
    best = (0, 0, 0)
    files = []
    for ri, (i0, i1) in enumerate(rows):
        left_h, left_e = edge_left(i1 - i0)
        for cj, (j0, j1) in enumerate(cols):
            top_h, top_f = bottoms[cj]
            r = sw_tile(a[j0:j1], b[i0:i1], top_h, top_f, left_h, left_e, i0, j0, scoring,
                        kernel=kernel, special_stride=stride, best_so_far=best[0] or None,
                        rows_to_end=m - i0, cols_to_end=n - j0)
            bottoms[cj] = (r.bottom_h, r.bottom_f)
            left_h, left_e = r.right_h, r.right_e
            if r.score > 0 and (-r.score, r.end_b, r.end_a) < (-best[0], best[1], best[2]):
                best = (r.score, r.end_b, r.end_a)
            path = Path(directory) / f"tile-{ri}-{cj}.swr"
            write_rows(path, ri, cj, i0, j0, j1 - j0, stride, r.special, r.pruned)
            files.append(read_rows(path))
    score, end_b, end_a = best
    t1 = time.perf_counter()
    points = crosspoints(a, b, scoring, RowStore(files, n), end_a, end_b, score, kernel=kernel,
                         chunk=chunk)
    t2 = time.perf_counter()
    ops = [solve_box(a[x.a0:x.a1], b[x.b0:x.b1], scoring, x.start, x.end, x.score, kernel=kernel,
                     leaf_cells=leaf_cells)[1] for x in boxes(points)]
    t3 = time.perf_counter()
    return Traced(score, points[-1].a + 1, points[-1].b + 1, end_a, end_b,
                  np.concatenate(ops) if ops else np.zeros(0, np.uint8), points,
                  {"score_pass": t1 - t0, "crosspoints": t2 - t1, "boxes": t3 - t2})
