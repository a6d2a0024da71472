"""The slow, obvious Smith-Waterman oracle that the fast kernels are checked against.

Pure Python loops over plain Python ints (no overflow, no numba), written to be read rather
than to be fast: a 100 x 100 matrix takes a few milliseconds.

Conventions (the kernels in ``worker/sw`` follow the same ones):

* Inputs are the codes of ``worker.sw.scoring.encode`` (A C G T = 0..3, anything else 4; the
  query-side code 5 of ``query_codes`` works too). Two letters score ``match`` when their
  codes are equal AND below 4, otherwise ``mismatch``: N never matches, not even N.
* The DP rows are the reference ``b`` (parasail's s2), the columns the query ``a``
  (parasail's s1). Cell (i, j) is reference letter i against query letter j, 0-based.
* Gaps follow parasail: a gap of length k costs ``gap_open + (k - 1) * gap_extend``.
  Gotoh's recurrences::

      E[i][j] = max(H[i][j-1] - gap_open, E[i][j-1] - gap_extend)    # horizontal gap
      F[i][j] = max(H[i-1][j] - gap_open, F[i-1][j] - gap_extend)    # vertical gap
      H[i][j] = max(0, H[i-1][j-1] + s(b[i], a[j]), E[i][j], F[i][j])

  Outside the matrix H is 0 and E/F are ``NEG`` ("no gap can be open here").
* The best cell is the highest H; ties go to the first cell in row-major order (smallest
  reference row, then smallest query column). That is parasail's rule (smallest end_ref,
  then smallest end_query), so parasail can be the oracle of positions too. A matrix whose
  best is 0 reports the first cell, (end_a, end_b) = (0, 0).

A tile is a rectangle of the matrix computed from its borders alone: the H/F row above it
(``top_h`` with the above-left corner in front, ``top_f``) and the H/E column left of it
(``left_h``, ``left_e``). It returns the same borders for the tiles below and to the right,
so a grid of tiles computed in any order that respects up/left dependencies reproduces the
whole matrix exactly (``naive_tiled``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from worker.sw.scoring import Scoring

NEG = -(2**28)
"""E/F on the matrix edges: low enough that an edge gap is never chosen, far from overflow."""

_ACGT_LIMIT = 4  # codes below this are real nucleotides that can match


class TileOut(NamedTuple):
    """What one tile hands on, plus its best cell in global coordinates.

    bottom_h: W+1 H values of the tile's last row, with the corner for the tile below in front
      (``bottom_h[0]`` = H left of the last row = ``left_h[T-1]``; ``top_h[0]`` if T == 0).
    bottom_f: W F values of the tile's last row.
    right_h, right_e: T H and E values of the tile's last column.
    score, end_a, end_b: the highest H in the tile and the first cell (row-major) holding it,
      as global 0-based (query, reference) indices; the tile's first cell if the best is 0.
    """

    bottom_h: list[int]
    bottom_f: list[int]
    right_h: list[int]
    right_e: list[int]
    score: int
    end_a: int
    end_b: int


class TiledResult(NamedTuple):
    """Best cell of a whole matrix computed tile by tile, and every tile's output.

    ``tiles[r][c]`` is the tile covering reference rows ``r*tile_rows ...`` and query columns
    ``c*tile_cols ...``.
    """

    score: int
    end_a: int
    end_b: int
    tiles: list[list[TileOut]]


def substitution(x: int, y: int, scoring: Scoring) -> int:
    """Score of code x against code y: match only for equal real nucleotides (A C G T)."""
    return scoring.match if x == y and x < _ACGT_LIMIT else scoring.mismatch


def edge_top(width: int) -> tuple[list[int], list[int]]:
    """Borders above the matrix's first row: (top_h = [0] * (W+1), top_f = [NEG] * W)."""
    return [0] * (width + 1), [NEG] * width


def edge_left(height: int) -> tuple[list[int], list[int]]:
    """Borders left of the matrix's first column: (left_h = [0] * T, left_e = [NEG] * T)."""
    return [0] * height, [NEG] * height


def _ints(values: Sequence[int]) -> list[int]:
    """Plain Python ints (numpy scalars would wrap around)."""
    return [int(v) for v in values]


def naive_tile(
    a: Sequence[int],
    b: Sequence[int],
    top_h: Sequence[int],
    top_f: Sequence[int],
    left_h: Sequence[int],
    left_e: Sequence[int],
    row0: int,
    col0: int,
    scoring: Scoring,
) -> TileOut:
    """Compute one T x W tile (T = len(b) reference rows, W = len(a) query columns).

    top_h: W+1 H values of the row above, ``top_h[0]`` the above-left corner; top_f: W F values
    of the row above; left_h / left_e: T H / E values of the column to the left. row0 / col0
    are the global indices of the tile's first reference / query letter (they only place the
    best cell).
    """
    a, b = _ints(a), _ints(b)
    width, height = len(a), len(b)
    top_h, top_f, left_h, left_e = _ints(top_h), _ints(top_f), _ints(left_h), _ints(left_e)
    if len(top_h) != width + 1 or len(top_f) != width:
        raise ValueError(
            f"top_h needs {width + 1} values and top_f {width} for a {width}-column tile, "
            f"got {len(top_h)} and {len(top_f)}")
    if len(left_h) != height or len(left_e) != height:
        raise ValueError(
            f"left_h and left_e need {height} values for a {height}-row tile, "
            f"got {len(left_h)} and {len(left_e)}")
    go, ge = scoring.gap_open, scoring.gap_extend

    best, end_a, end_b = 0, col0, row0
    h_above = top_h  # H of the row above, corner first: h_above[j + 1] is above column j
    f_above = top_f
    right_h: list[int] = []
    right_e: list[int] = []
    for i in range(height):
        h_row = [left_h[i]]  # H of this row, the left border first: h_row[j + 1] is column j
        f_row = []
        e = left_e[i]  # E of the cell to the left
        for j in range(width):
            e = max(h_row[j] - go, e - ge)
            f = max(h_above[j + 1] - go, f_above[j] - ge)
            h = max(0, h_above[j] + substitution(b[i], a[j], scoring), e, f)
            h_row.append(h)
            f_row.append(f)
            if h > best:  # strict: the first cell holding the best keeps it
                best, end_a, end_b = h, col0 + j, row0 + i
        if width:
            right_h.append(h_row[width])
            right_e.append(e)
        h_above, f_above = h_row, f_row
    if width == 0:  # no last column of its own: hand the left border on unchanged
        right_h, right_e = list(left_h), list(left_e)
    bottom_h = [left_h[height - 1] if height else top_h[0]] + list(h_above[1:])
    return TileOut(bottom_h, list(f_above), right_h, right_e, best, end_a, end_b)


def naive_matrices(
    a: Sequence[int], b: Sequence[int], scoring: Scoring
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The whole H, E and F matrices, ``X[i][j]`` for reference row i and query column j.

    Written independently of ``naive_tile`` (explicit boundary tests instead of borders) so
    that each checks the other.
    """
    a, b = _ints(a), _ints(b)
    go, ge = scoring.gap_open, scoring.gap_extend
    H = [[0] * len(a) for _ in b]
    E = [[NEG] * len(a) for _ in b]
    F = [[NEG] * len(a) for _ in b]
    for i in range(len(b)):
        for j in range(len(a)):
            h_left = H[i][j - 1] if j > 0 else 0
            e_left = E[i][j - 1] if j > 0 else NEG
            h_up = H[i - 1][j] if i > 0 else 0
            f_up = F[i - 1][j] if i > 0 else NEG
            h_diag = H[i - 1][j - 1] if i > 0 and j > 0 else 0
            E[i][j] = max(h_left - go, e_left - ge)
            F[i][j] = max(h_up - go, f_up - ge)
            H[i][j] = max(0, h_diag + substitution(b[i], a[j], scoring), E[i][j], F[i][j])
    return H, E, F


def best_cell(H: list[list[int]]) -> tuple[int, int, int]:
    """(score, end_a, end_b) of an H matrix: the highest value, first in row-major order."""
    best, end_a, end_b = 0, 0, 0
    for i, row in enumerate(H):
        for j, h in enumerate(row):
            if h > best:
                best, end_a, end_b = h, j, i
    return best, end_a, end_b


def naive_align(a: Sequence[int], b: Sequence[int], scoring: Scoring) -> tuple[int, int, int]:
    """Local alignment score of query a against reference b: (score, end_a, end_b), 0-based."""
    return best_cell(naive_matrices(a, b, scoring)[0])


def better(x: tuple[int, int, int], y: tuple[int, int, int]) -> tuple[int, int, int]:
    """The better of two (score, end_a, end_b): higher score, then smaller end_b, then end_a."""
    kx, ky = (-x[0], x[2], x[1]), (-y[0], y[2], y[1])
    return x if kx <= ky else y


def naive_tiled(
    a: Sequence[int], b: Sequence[int], scoring: Scoring, tile_rows: int, tile_cols: int
) -> TiledResult:
    """The whole matrix as a grid of ``naive_tile`` calls, borders passed between neighbours.

    Tiles are tile_rows x tile_cols; the last row/column of tiles may be smaller. The best
    cells of the tiles are reduced with the global rule (``better``).
    """
    if tile_rows < 1 or tile_cols < 1:
        raise ValueError(f"tile sizes must be positive, got {tile_rows} x {tile_cols}")
    a, b = _ints(a), _ints(b)
    row_starts = list(range(0, len(b), tile_rows))
    col_starts = list(range(0, len(a), tile_cols))
    best = (0, 0, 0)
    tiles: list[list[TileOut]] = []
    # The bottom borders of the tile row above, one (top_h, top_f) per tile column.
    above = [edge_top(len(a[c0:c0 + tile_cols])) for c0 in col_starts]
    for r0 in row_starts:
        seg_b = b[r0:r0 + tile_rows]
        left_h, left_e = edge_left(len(seg_b))
        row: list[TileOut] = []
        for c, c0 in enumerate(col_starts):
            # top_h[0] (H above-left) is already right: the tile above got it as the last
            # entry of its left border and put it in front of its bottom_h.
            top_h, top_f = above[c]
            out = naive_tile(a[c0:c0 + tile_cols], seg_b, top_h, top_f, left_h, left_e, r0, c0,
                             scoring)
            row.append(out)
            best = better(best, (out.score, out.end_a, out.end_b))
            left_h, left_e = out.right_h, out.right_e
        above = [(out.bottom_h, out.bottom_f) for out in row]
        tiles.append(row)
    return TiledResult(*best, tiles)
