"""Global alignment of a small box with full traceback: the base case of a Myers-Miller split.

A box is M reference letters (rows p = 0..M-1, ``b`` = ``encode(B)``) by N query letters
(columns q = 0..N-1, ``a`` = ``query_codes(encode(A))``). Two letters score ``match`` when
their codes are equal (N never equals N: 4 on the reference side, 5 on the query side), else
``mismatch``. Gotoh's recurrences in parasail's convention (a gap of length k costs
``go + (k - 1) * ge``), global, so with no zero floor::

    E(p,q) = max(H(p,q-1) - go, E(p,q-1) - ge)     horizontal, consumes a_q:  'I'
    F(p,q) = max(H(p-1,q) - go, F(p-1,q) - ge)     vertical,   consumes b_p:  'D'
    H(p,q) = max(H(p-1,q-1) + s(a_q, b_p), E(p,q), F(p,q))

Gap-state constraints at the two ends (what a Myers-Miller split hands its halves):

* ``start`` = START_H (0): an ordinary global start, H(-1,-1) = 0, the top border
  H = E = -(go + ge*q), the left border H = F = -(go + ge*p), E/F off the borders = -inf.
* ``start`` = START_F (1): the alignment begins with a vertical gap that continues one opened
  outside the box, so its letters cost ``ge`` each and no open: the left border is
  H = F = -ge*(p+1), the corner and the whole top border are -inf (no diagonal or horizontal
  first step).
* ``end`` = END_H (0): the score is H(M-1,N-1); ``end`` = END_F (1): the alignment must end in
  a vertical gap (open charged normally), the score is F(M-1,N-1).

Degenerate boxes: N == 0 is a run of M 'D's (M == N == 0 is empty, score 0); M == 0 is a run
of N 'I's, which admits neither a start nor an end in F. Start F with end F on a single row
(M == 1, N >= 1) is impossible too. Impossible combinations raise ValueError.

Memory: one direction byte per cell and rolling int64 rows for the values, so a box costs M*N
bytes (refused above ``max_cells``). The byte's bits: 1 = H took E; 2 = F beat the diagonal
(so H took F when bit 1 is clear; the diagonal when both are clear); 4 = E extended E rather
than opening from H; 8 = F extended F rather than opening from H. Values are int64 with
``NEG`` = -2**60 for -inf: every value is a predecessor minus at most 1000 per step, so no
path of a box that fits in memory gets anywhere near overflow, and -inf-derived values stay far
below every finite score.

The traceback starts at (M-1, N-1) in state H or F (the end constraint), follows the stored
bits, and finishes at the border with its run: 'I's along the top row, 'D's down the left
column, which is exactly what the border values above charge. The ops re-score to the returned
score under the start/end rules (a leading 'D' run under start F costs ``ge`` per letter).

When ge > go the recurrences never extend a gap inside the box (E(p,q-1) <= H(p,q-1), so
H - go beats E - ge): an interior run of k gap letters is charged as k adjacent one-letter
gaps, k*go, while a leading run lies on the border and keeps the border's charge. A rescorer
that checks these ops must charge a non-leading run go + (k-1)*min(go, ge), which is the plain
affine rule whenever ge <= go (tests/unit/test_boxdp.py does exactly this).

Speed: the fill runs at about 0.3-0.4 G cells/s on the 2-core AMD EPYC development VM (M*N
bytes of directions, traceback O(M+N)).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cigar import DEL as OP_DEL  # 'D': a reference letter against a gap (vertical)
from .cigar import EQ as OP_MATCH  # '='
from .cigar import INS as OP_INS  # 'I': a query letter against a gap (horizontal)
from .cigar import OPS as OP_CHARS
from .cigar import X as OP_MISMATCH  # 'X'
from .scoring import Scoring

START_H = 0
START_F = 1
END_H = 0
END_F = 1

NEG = -(2**60)
"""-inf of the int64 DP."""

DEFAULT_MAX_CELLS = 1 << 26

MAX_CODE = 5
"""Codes above this (the query side's "other") are refused."""


# --- kernels ----------------------------------------------------------------------------------
#
# The fill is a plain row-by-row scalar loop, written in the form that LLVM compiles to a
# branch-free inner loop (measured: variants with a compare-and-select substitution, nested
# conditional expressions or numba's max() got branches or spills and ran at half the speed):
# the substitution comes from a per-code profile row, maxima are ``x if c else y`` on a
# comparison that is kept for the direction bits, the bits are summed from the comparisons, and
# the H row holds H - go so that the next row's F opening is a plain load.


@njit(cache=True, nogil=True)
def _profile(a, match, mismatch, go):
    """prof[c, q] = s(a_q, c) + go for the codes c = 0..5 (the row's H is stored minus go)."""
    n = a.shape[0]
    prof = np.empty((6, n), np.int64)
    for c in range(6):
        for q in range(n):
            prof[c, q] = (match if a[q] == c else mismatch) + go
    return prof


@njit(cache=True, nogil=True)
def _top(n, go, ge, start):
    """Row -1 as the fill keeps it: hrow[0] = H(-1,-1) - go, hrow[q+1] = H(-1,q) - go;
    frow[q] = F(-1,q) = -inf."""
    hrow = np.empty(n + 1, np.int64)
    frow = np.empty(n, np.int64)
    if start == 0:
        hrow[0] = -go
        for q in range(n):
            hrow[q + 1] = -(go + ge * q) - go
    else:
        for q in range(n + 1):
            hrow[q] = NEG
    for q in range(n):
        frow[q] = NEG
    return hrow, frow


@njit(cache=True, nogil=True)
def _left(p, go, ge, start):
    """H(p,-1) = F(p,-1): the left border."""
    if start == 0:
        return -(go + ge * p)
    return -ge * (p + 1)


@njit(cache=True, nogil=True)
def _fill(a, b, match, mismatch, go, ge, start, dirs):
    """Fill the direction bytes (row-major, p*N + q) of the box; return (H, F) at its last
    cell. Bits: 1 H took E, 2 F beat the diagonal (H took F unless bit 1), 4 E extended E,
    8 F extended F. An empty ``dirs`` keeps none: the score alone, in linear memory."""
    m = b.shape[0]
    n = a.shape[0]
    keep = dirs.shape[0] > 0
    prof = _profile(a, match, mismatch, go)
    hrow, frow = _top(n, go, ge, start)
    for p in range(m):
        pr = prof[b[p]]
        diag = hrow[0]
        hg = _left(p, go, ge, start) - go  # H(p,q-1) - go, carried along the row
        hrow[0] = hg
        e = NEG
        drow = dirs[p * n:(p + 1) * n]
        for q in range(n):
            ee = e - ge
            eb = ee > hg
            e = ee if eb else hg
            up = hrow[q + 1]  # H(p-1,q) - go
            fe = frow[q] - ge
            fb = fe > up
            f = fe if fb else up
            frow[q] = f
            hd = diag + pr[q]
            fw = f > hd
            t = f if fw else hd
            ew = e > t
            h = e if ew else t
            if keep:
                drow[q] = ew * 1 + fw * 2 + eb * 4 + fb * 8
            hg = h - go
            hrow[q + 1] = hg
            diag = up
    return hrow[n] + go, frow[n - 1]


@njit(cache=True, nogil=True)
def _trace(a, b, dirs, end, out):
    """Walk back from (M-1, N-1); write the ops backwards into ``out``; return their count."""
    m = b.shape[0]
    n = a.shape[0]
    p = m - 1
    q = n - 1
    state = 2 if end == 1 else 0  # 0 H, 1 E, 2 F
    k = 0
    while p >= 0 and q >= 0:
        d = dirs[p * n + q]
        if state == 0:
            if d & 1:
                state = 1
            elif d & 2:
                state = 2
            else:
                out[k] = OP_MATCH if a[q] == b[p] else OP_MISMATCH
                k += 1
                p -= 1
                q -= 1
        elif state == 1:
            out[k] = OP_INS
            k += 1
            if (d & 4) == 0:
                state = 0
            q -= 1
        else:
            out[k] = OP_DEL
            k += 1
            if (d & 8) == 0:
                state = 0
            p -= 1
    while q >= 0:  # on the top border: the run of I's it charges
        out[k] = OP_INS
        k += 1
        q -= 1
    while p >= 0:  # on the left border: the run of D's
        out[k] = OP_DEL
        k += 1
        p -= 1
    return k


# --- API --------------------------------------------------------------------------------------

def _prepare(a, b, scoring: Scoring, start: int, end: int):
    if start not in (START_H, START_F):
        raise ValueError(f"start must be 0 (H) or 1 (F), got {start!r}")
    if end not in (END_H, END_F):
        raise ValueError(f"end must be 0 (H) or 1 (F), got {end!r}")
    a, b = np.asarray(a), np.asarray(b)
    for name, codes in (("a", a), ("b", b)):
        if codes.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array of codes, got shape {codes.shape}")
        if codes.size and (int(codes.min()) < 0 or int(codes.max()) > MAX_CODE):
            raise ValueError(f"{name} holds codes {int(codes.min())}..{int(codes.max())}: "
                             f"expected the codes of encode / query_codes (0..{MAX_CODE})")
    a = np.ascontiguousarray(a, dtype=np.uint8)
    b = np.ascontiguousarray(b, dtype=np.uint8)
    m, n = b.shape[0], a.shape[0]
    if m == 0 and start == START_F:
        raise ValueError("start F needs at least one reference letter (M >= 1): got M == 0")
    if m == 0 and end == END_F:
        raise ValueError("end F needs at least one reference letter (M >= 1): got M == 0")
    if start == START_F and end == END_F and m == 1 and n >= 1:
        raise ValueError("start F and end F on a single reference letter leave no room for "
                         f"the {n} query letters: no such alignment")
    return a, b, m, n


def _degenerate(m: int, n: int, go: int, ge: int, start: int) -> int:
    """Score of a box with M == 0 or N == 0 (a single gap run, or nothing)."""
    if n == 0:
        if m == 0:
            return 0
        return -ge * m if start == START_F else -(go + ge * (m - 1))
    return -(go + ge * (n - 1))  # m == 0: all I (start H only)


def score_only(a: np.ndarray, b: np.ndarray, scoring: Scoring, start: int = START_H,
               end: int = END_H) -> int:
    """The optimal global score of the box under the start/end constraints (linear memory)."""
    a, b, m, n = _prepare(a, b, scoring, start, end)
    go, ge = int(scoring.gap_open), int(scoring.gap_extend)
    if m == 0 or n == 0:
        return _degenerate(m, n, go, ge, start)
    h, f = _fill(a, b, int(scoring.match), int(scoring.mismatch), go, ge, start, np.empty(0, np.uint8))
    score = int(f if end == END_F else h)
    assert score > NEG // 2, "an infeasible box got past _prepare"
    return score


def global_traceback(a: np.ndarray, b: np.ndarray, scoring: Scoring, start: int = START_H,
                     end: int = END_H, max_cells: int = DEFAULT_MAX_CELLS
                     ) -> tuple[int, np.ndarray]:
    """Optimal global alignment of query codes ``a`` (columns) against reference codes ``b``
    (rows) under the start/end gap-state constraints: (score, ops), ops a uint8 array in
    forward order (0 '=', 1 'X', 2 'I', 3 'D'). Uses len(a)*len(b) bytes; refuses more than
    ``max_cells`` cells."""
    a, b, m, n = _prepare(a, b, scoring, start, end)
    go, ge = int(scoring.gap_open), int(scoring.gap_extend)
    if m == 0 or n == 0:
        ops = np.full(m + n, OP_DEL if n == 0 else OP_INS, dtype=np.uint8)
        return _degenerate(m, n, go, ge, start), ops
    cells = m * n
    if cells > max_cells:
        raise ValueError(
            f"a {m} x {n} box has {cells} cells, more than max_cells={max_cells} "
            f"({cells} bytes of traceback): split it further first")
    dirs = np.empty(cells, dtype=np.uint8)
    h, f = _fill(a, b, int(scoring.match), int(scoring.mismatch), go, ge, start, dirs)
    score = int(f if end == END_F else h)
    assert score > NEG // 2, "an infeasible box got past _prepare"
    out = np.empty(m + n, dtype=np.uint8)
    k = _trace(a, b, dirs, end, out)
    return score, out[:k][::-1].copy()


def ops_string(ops: np.ndarray) -> str:
    """The ops as text, e.g. '==XI=DD'."""
    return "".join(OP_CHARS[int(o)] for o in ops)
