"""The naive Smith-Waterman oracle (tests/naive.py) against parasail, and its tiles against itself.

parasail is the independent reference: score AND end cell must agree. Its matrix is built on
"ACGTN" with the N row/column and the catch-all '*' row/column set to the mismatch score, since
parasail's stock matrix scores N/N as a match and anything against '*' as 0 (checked below, so a
parasail upgrade that changes this is noticed).

Which parasail function: ``parasail.sw`` (the serial reference) agrees with the oracle on every
scoring we allow. The vectorised ``sw_striped_32`` agrees only when gap_open > gap_extend (on
gap_open <= gap_extend it returns wrong scores, parasail issue #64, "wontfix"), so it is checked
only there. ``sw_diag_32`` is not used: in parasail 1.3.4 here it returns score 0 on some
ordinary inputs (e.g. gap_open=6, gap_extend=4).
"""

from __future__ import annotations

import random

import parasail
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.naive import (
    NEG,
    TileOut,
    better,
    best_cell,
    edge_left,
    edge_top,
    naive_align,
    naive_matrices,
    naive_tile,
    naive_tiled,
)
from worker.sw.scoring import Scoring, encode, query_codes

DEFAULT = Scoring()
LETTERS = "ACGTN"


# --- helpers ----------------------------------------------------------------------------------

_MATRICES: dict[tuple[int, int], object] = {}


def parasail_matrix(scoring: Scoring):
    """ACGTN matrix where N and '*' (index 4 and 5) score as a mismatch against everything."""
    key = (scoring.match, scoring.mismatch)
    if key not in _MATRICES:
        matrix = parasail.matrix_create(LETTERS, scoring.match, scoring.mismatch)
        size = matrix.size  # 6: A C G T N and parasail's catch-all '*'
        for other in (4, 5):
            for k in range(size):
                matrix.set_value(other, k, scoring.mismatch)
                matrix.set_value(k, other, scoring.mismatch)
        _MATRICES[key] = matrix
    return _MATRICES[key]


def parasail_sw(query: str, ref: str, scoring: Scoring, function: str = "sw") -> tuple[int, int, int]:
    """(score, end_a, end_b) from parasail: s1 = query (columns), s2 = reference (rows)."""
    result = getattr(parasail, function)(query, ref, scoring.gap_open, scoring.gap_extend,
                                         parasail_matrix(scoring))
    return result.score, result.end_query, result.end_ref


def oracle(query: str, ref: str, scoring: Scoring) -> tuple[int, int, int]:
    return naive_align(encode(query), encode(ref), scoring)


def random_seq(rng: random.Random, n: int, alphabet: str = "ACGT") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def mutate(rng: random.Random, seq: str, sub: float = 0.1, indel: float = 0.03,
           alphabet: str = "ACGT") -> str:
    """A related sequence: substitutions, and indels of length 1-4."""
    out = []
    i = 0
    while i < len(seq):
        r = rng.random()
        if r < indel / 2:
            i += rng.randint(1, 4)  # deletion
            continue
        if r < indel:
            out.append(random_seq(rng, rng.randint(1, 4), alphabet))  # insertion
        out.append(rng.choice(alphabet) if rng.random() < sub else seq[i])
        i += 1
    return "".join(out)


def random_scoring(rng: random.Random) -> Scoring:
    return Scoring(match=rng.randint(1, 5), mismatch=-rng.randint(0, 5),
                   gap_open=rng.randint(0, 8), gap_extend=rng.randint(0, 4))


def random_case(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["random", "related", "binary", "with_n", "n_heavy"])
    if kind == "random":
        return random_seq(rng, rng.randint(1, 40)), random_seq(rng, rng.randint(1, 40))
    if kind == "related":
        a = random_seq(rng, rng.randint(5, 40))
        return a, mutate(rng, a)
    if kind == "binary":
        return random_seq(rng, rng.randint(1, 30), "AC"), random_seq(rng, rng.randint(1, 30), "AC")
    if kind == "with_n":
        a = random_seq(rng, rng.randint(5, 40), "ACGTN")
        return a, mutate(rng, a, alphabet="ACGTN")
    return random_seq(rng, rng.randint(1, 30), "AN"), random_seq(rng, rng.randint(1, 30), "AN")


# --- the parasail set-up itself ---------------------------------------------------------------

def test_parasail_stock_matrix_needs_the_fix():
    """Why parasail_matrix patches the matrix: stock N/N is a match and '*' scores 0."""
    stock = parasail.matrix_create(LETTERS, 2, -3)
    assert stock.size == 6
    assert stock.matrix[4][4] == 2  # N vs N would score as a match
    assert all(stock.matrix[5][k] == 0 for k in range(6))  # the catch-all '*'
    fixed = parasail_matrix(DEFAULT)
    assert all(fixed.matrix[4][k] == -3 and fixed.matrix[k][4] == -3 for k in range(6))
    assert all(fixed.matrix[5][k] == -3 and fixed.matrix[k][5] == -3 for k in range(6))
    assert [fixed.matrix[k][k] for k in range(4)] == [2, 2, 2, 2]


# --- random pairs against parasail ------------------------------------------------------------

def test_random_pairs_agree_with_parasail_serial():
    """Score and end cell, on every scoring we allow (including gap_open <= gap_extend)."""
    rng = random.Random(20240611)
    for case in range(1500):
        scoring = random_scoring(rng)
        query, ref = random_case(rng)
        expected = parasail_sw(query, ref, scoring)
        assert oracle(query, ref, scoring) == expected, (case, query, ref, scoring)


def test_random_pairs_agree_with_parasail_striped():
    """sw_striped_32 (the fast one used on genome pairs) where its precondition holds."""
    rng = random.Random(77)
    checked = 0
    while checked < 600:
        scoring = random_scoring(rng)
        if scoring.gap_open <= scoring.gap_extend:
            continue
        query, ref = random_case(rng)
        expected = parasail_sw(query, ref, scoring, "sw_striped_32")
        assert oracle(query, ref, scoring) == expected, (checked, query, ref, scoring)
        checked += 1


def test_longer_related_pair_agrees_with_parasail():
    rng = random.Random(5)
    query = random_seq(rng, 300)
    ref = random_seq(rng, 40) + mutate(rng, query) + random_seq(rng, 40)
    expected = parasail_sw(query, ref, DEFAULT, "sw_striped_32")
    assert expected[0] > 300  # a real alignment, not noise
    assert oracle(query, ref, DEFAULT) == expected
    assert parasail_sw(query, ref, DEFAULT) == expected


# --- hand cases -------------------------------------------------------------------------------

GAP_SCORINGS = [DEFAULT, Scoring(match=1, mismatch=-1, gap_open=3, gap_extend=1),
                Scoring(match=2, mismatch=-3, gap_open=4, gap_extend=0)]


@pytest.mark.parametrize("scoring", GAP_SCORINGS, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("gap_in", ["query", "reference"])
def test_single_gap_of_length_k_costs_open_plus_k_minus_1_extend(scoring, k, gap_in):
    rng = random.Random(1000 + k)
    left, right, inserted = random_seq(rng, 20), random_seq(rng, 20), random_seq(rng, k)
    short, long_ = left + right, left + inserted + right
    query, ref = (short, long_) if gap_in == "query" else (long_, short)
    expected_score = 40 * scoring.match - (scoring.gap_open + (k - 1) * scoring.gap_extend)
    assert expected_score > 20 * scoring.match  # the gapped alignment beats either half
    # The alignment ends on the last letters of both sequences.
    expected = (expected_score, len(query) - 1, len(ref) - 1)
    assert oracle(query, ref, scoring) == expected
    assert parasail_sw(query, ref, scoring) == expected
    if scoring.gap_open > scoring.gap_extend:
        assert parasail_sw(query, ref, scoring, "sw_striped_32") == expected


def test_parasail_gap_convention_from_design_notes():
    """open + (k-1)*extend with 5/2: 40 - 5, 40 - 7, 40 - 9 on 20 + 20 matching letters."""
    rng = random.Random(3)
    left, right = random_seq(rng, 10), random_seq(rng, 10)
    scores = [oracle(left + right, left + "G" * k + right, DEFAULT)[0] for k in (1, 2, 3)]
    assert scores == [35, 33, 31]


def test_n_never_matches_not_even_n():
    assert oracle("NNNN", "NNNN", DEFAULT) == (0, 0, 0)
    assert parasail_sw("NNNN", "NNNN", DEFAULT) == (0, 0, 0)
    cheap = Scoring(match=2, mismatch=-1, gap_open=5, gap_extend=2)
    # AANAA / AANAA: 4 - 1 + 4 = 7 (10 if N matched N).
    assert oracle("AANAA", "AANAA", cheap) == (7, 4, 4)
    assert parasail_sw("AANAA", "AANAA", cheap) == (7, 4, 4)
    # Other IUPAC codes are "other" too: R never matches R, nor A.
    assert oracle("ARA", "ARA", cheap) == oracle("ANA", "ANA", cheap) == (3, 2, 2)


def test_query_side_codes_score_the_same():
    """Code 5 (query_codes' "other") behaves as 4: the oracle accepts either."""
    rng = random.Random(9)
    for _ in range(30):
        query, ref = random_seq(rng, 20, "ACGTN"), random_seq(rng, 20, "ACGTN")
        a = encode(query)
        assert naive_align(query_codes(a), encode(ref), DEFAULT) == naive_align(a, encode(ref), DEFAULT)


def test_lowercase_equals_uppercase():
    rng = random.Random(11)
    for _ in range(20):
        query, ref = random_case(rng)
        upper = oracle(query, ref, DEFAULT)
        assert oracle(query.lower(), ref.lower(), DEFAULT) == upper
        assert oracle(query.lower(), ref, DEFAULT) == upper
        assert parasail_sw(query.lower(), ref.lower(), DEFAULT) == upper


def test_ties_go_to_smallest_reference_then_smallest_query():
    # One T in the query (column 3), all-T reference: four equal cells in column 3.
    assert oracle("ACGT", "TTTT", DEFAULT) == (2, 3, 0)
    assert parasail_sw("ACGT", "TTTT", DEFAULT) == (2, 3, 0)
    # Transposed: four equal cells in row 3; the first is column 0.
    assert oracle("TTTT", "ACGT", DEFAULT) == (2, 0, 3)
    assert parasail_sw("TTTT", "ACGT", DEFAULT) == (2, 0, 3)
    # Two equal runs: "AC" occurs at query 0-1 and 4-5, ref 0-1 and 4-5; row 1 wins, column 1.
    assert oracle("ACGGAC", "ACTTAC", DEFAULT) == (4, 1, 1)
    assert parasail_sw("ACGGAC", "ACTTAC", DEFAULT) == (4, 1, 1)


def test_ties_on_binary_alphabet_agree_with_parasail():
    rng = random.Random(123)
    scorings = [DEFAULT, Scoring(1, -1, 2, 1), Scoring(1, -1, 1, 1), Scoring(3, 0, 4, 1)]
    for case in range(300):
        scoring = scorings[case % len(scorings)]
        query = random_seq(rng, rng.randint(1, 25), "AC")
        ref = random_seq(rng, rng.randint(1, 25), "AC")
        expected = parasail_sw(query, ref, scoring)
        assert oracle(query, ref, scoring) == expected, (query, ref, scoring)
        if scoring.gap_open > scoring.gap_extend:
            assert parasail_sw(query, ref, scoring, "sw_striped_32") == expected


@pytest.mark.parametrize("query, ref", [("AAAA", "CCCC"), ("ACAC", "GTGT"), ("NNN", "ACGTN"),
                                        ("A", "C")])
def test_all_mismatch_scores_0_at_first_cell(query, ref):
    assert oracle(query, ref, DEFAULT) == (0, 0, 0)
    assert parasail_sw(query, ref, DEFAULT) == (0, 0, 0)
    assert parasail_sw(query, ref, DEFAULT, "sw_striped_32") == (0, 0, 0)


def test_score_0_tile_reports_its_first_cell():
    a, b = encode("AAAA"), encode("CCC")
    out = naive_tile(a, b, *edge_top(4), *edge_left(3), row0=100, col0=40, scoring=DEFAULT)
    assert (out.score, out.end_a, out.end_b) == (0, 40, 100)


def test_empty_sequences():
    assert naive_align([], encode("ACGT"), DEFAULT) == (0, 0, 0)
    assert naive_align(encode("ACGT"), [], DEFAULT) == (0, 0, 0)
    assert naive_tiled([], encode("ACGT"), DEFAULT, 2, 2)[:3] == (0, 0, 0)


# --- tiles ------------------------------------------------------------------------------------

def check_tiles_against_matrices(a, b, scoring, tile_rows, tile_cols):
    """Every tile's borders and best equal the whole-matrix values at the same cells."""
    H, E, F = naive_matrices(a, b, scoring)
    result = naive_tiled(a, b, scoring, tile_rows, tile_cols)
    assert result[:3] == best_cell(H) == naive_align(a, b, scoring)
    row_starts = range(0, len(b), tile_rows)
    col_starts = range(0, len(a), tile_cols)
    assert len(result.tiles) == len(row_starts)
    for r, r0 in enumerate(row_starts):
        r1 = min(r0 + tile_rows, len(b))
        assert len(result.tiles[r]) == len(col_starts)
        for c, c0 in enumerate(col_starts):
            c1 = min(c0 + tile_cols, len(a))
            out: TileOut = result.tiles[r][c]
            last = r1 - 1
            corner = H[last][c0 - 1] if c0 > 0 else 0
            assert out.bottom_h == [corner] + H[last][c0:c1], (r, c)
            assert out.bottom_f == F[last][c0:c1], (r, c)
            assert out.right_h == [H[i][c1 - 1] for i in range(r0, r1)], (r, c)
            assert out.right_e == [E[i][c1 - 1] for i in range(r0, r1)], (r, c)
            block = [row[c0:c1] for row in H[r0:r1]]
            score, j, i = best_cell(block)
            if score == 0:
                j, i = 0, 0
            assert (out.score, out.end_a, out.end_b) == (score, c0 + j, r0 + i), (r, c)
    return result


def test_tiled_equals_whole_matrix_random_shapes():
    rng = random.Random(2024)
    for _ in range(60):
        query, ref = random_case(rng)
        scoring = random_scoring(rng)
        check_tiles_against_matrices(encode(query), encode(ref), scoring,
                                     rng.randint(1, 9), rng.randint(1, 9))


@pytest.mark.parametrize("tile_rows, tile_cols", [(1, 1), (1, 50), (50, 1), (7, 5), (64, 64)])
def test_tiled_equals_whole_matrix_fixed_shapes(tile_rows, tile_cols):
    rng = random.Random(tile_rows * 100 + tile_cols)
    query = random_seq(rng, 37)
    ref = mutate(rng, query)
    check_tiles_against_matrices(encode(query), encode(ref), DEFAULT, tile_rows, tile_cols)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(a=st.lists(st.integers(0, 4), max_size=18), b=st.lists(st.integers(0, 4), max_size=18),
       tile_rows=st.integers(1, 6), tile_cols=st.integers(1, 6),
       match=st.integers(1, 4), mismatch=st.integers(-4, 0),
       gap_open=st.integers(0, 6), gap_extend=st.integers(0, 3))
def test_tiled_equals_whole_matrix_property(a, b, tile_rows, tile_cols, match, mismatch,
                                            gap_open, gap_extend):
    """Hypothesis shrinks a failure to the smallest sequences and tile shape."""
    scoring = Scoring(match, mismatch, gap_open, gap_extend)
    check_tiles_against_matrices(a, b, scoring, tile_rows, tile_cols)


def test_tile_corner_comes_from_left_border():
    """bottom_h[0] is left_h[T-1]; with no rows it is top_h[0]; with no columns the left
    border passes through."""
    a, b = encode("ACG"), encode("TT")
    out = naive_tile(a, b, [7, 0, 0, 0], [NEG] * 3, [11, 13], [NEG, NEG], 0, 0, DEFAULT)
    assert out.bottom_h[0] == 13
    empty_rows = naive_tile(a, [], [7, 1, 2, 3], [NEG] * 3, [], [], 0, 0, DEFAULT)
    assert empty_rows.bottom_h == [7, 1, 2, 3] and empty_rows.right_h == []
    empty_cols = naive_tile([], b, [7], [], [11, 13], [4, 5], 0, 0, DEFAULT)
    assert empty_cols.bottom_h == [13] and empty_cols.bottom_f == []
    assert (empty_cols.right_h, empty_cols.right_e) == ([11, 13], [4, 5])


def test_tile_rejects_wrong_border_lengths():
    a, b = encode("ACG"), encode("TT")
    with pytest.raises(ValueError, match="top_h needs 4"):
        naive_tile(a, b, [0] * 3, [NEG] * 3, *edge_left(2), 0, 0, DEFAULT)
    with pytest.raises(ValueError, match="left_h and left_e need 2"):
        naive_tile(a, b, *edge_top(3), [0] * 3, [NEG] * 2, 0, 0, DEFAULT)
    with pytest.raises(ValueError, match="tile sizes must be positive"):
        naive_tiled(a, b, DEFAULT, 0, 4)


def test_edges():
    assert edge_top(3) == ([0, 0, 0, 0], [NEG, NEG, NEG])
    assert edge_left(2) == ([0, 0], [NEG, NEG])
    assert NEG == -(2**28)


def test_better_uses_the_global_tie_break():
    assert better((5, 9, 9), (4, 0, 0)) == (5, 9, 9)
    assert better((5, 0, 3), (5, 9, 2)) == (5, 9, 2)  # smaller reference row wins
    assert better((5, 1, 2), (5, 0, 2)) == (5, 0, 2)  # then smaller query column


def test_results_are_plain_ints():
    """numpy inputs must not leak numpy scalars (which could wrap around) into results."""
    out = naive_tile(encode("ACGT"), encode("ACGT"), *edge_top(4), *edge_left(4), 0, 0, DEFAULT)
    values = [*out.bottom_h, *out.bottom_f, *out.right_h, *out.right_e, out.score]
    assert all(type(v) is int for v in values)
