"""The box DP of a Myers-Miller traceback (worker/sw/boxdp.py) against oracles written here.

Three independent checks of every returned alignment:

* ``dp_oracle``: the same Gotoh recurrences and border values over plain Python ints (-inf a
  float), so the optimum is the one the recurrences define;
* ``enumerate_best``: every op string that consumes the box (M, N <= 4), filtered by the
  start/end rules and scored by ``rescore``: the optimum over alignments, with no DP at all;
* ``check_ops``: the returned ops consume exactly the letters, '=' / 'X' agree with the
  letters, the start/end rules hold, and ``rescore`` gives back the returned score.

How ``rescore`` charges gaps. A run of k gap letters costs go + (k-1)*ge, except:

* under start F, a leading 'D' run continues a gap opened outside the box: ge per letter;
* when ge > go, Gotoh's recurrence never extends a gap inside the box: E(p,q-1) <= H(p,q-1), so
  H - go beats E - ge and a run is a chain of adjacent gaps, go per letter. A leading run sits
  on the border, whose values fix its cost (go + (k-1)*ge, or ge*k under start F), so the
  leading run keeps ge. Hence a run that is not the leading one costs go + (k-1)*min(go, ge),
  which is the plain affine rule whenever ge <= go.
"""

from __future__ import annotations

import itertools

import numpy as np
import parasail
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.sw.boxdp import (
    OP_CHARS,
    global_traceback,
    ops_string,
    score_only,
)
from worker.sw.scoring import Scoring, encode, query_codes

LETTERS = "ACGTN"
INF = float("-inf")
SCORINGS = [Scoring(), Scoring(1, -1, 2, 1), Scoring(3, -2, 1, 3), Scoring(5, 0, 0, 0),
            Scoring(1, -4, 6, 1), Scoring(2, -1, 0, 2), Scoring(1, 0, 3, 3), Scoring(4, -5, 8, 0)]
CONSTRAINTS = [(0, 0), (0, 1), (1, 0), (1, 1)]


# --- oracles ----------------------------------------------------------------------------------

def sub(x: str, y: str, scoring: Scoring) -> int:
    """Letter x of A against letter y of B: a match only for equal A C G T (never N)."""
    return scoring.match if x == y and x != "N" else scoring.mismatch


def feasible(m: int, n: int, start: int, end: int) -> bool:
    """Whether any alignment of an M x N box meets the start/end rules."""
    if m == 0:
        return start == 0 and end == 0
    if start == 1 and end == 1 and m == 1:
        return n == 0  # one D must be both the first and the last op
    return True


def dp_oracle(A: str, B: str, scoring: Scoring, start: int, end: int) -> float:
    """The recurrences of the brief over Python ints (rows B, columns A); -inf if infeasible."""
    go, ge = scoring.gap_open, scoring.gap_extend
    m, n = len(B), len(A)
    if n == 0:  # the border column itself
        if m == 0:
            return 0 if start == 0 and end == 0 else INF
        return -(go + ge * (m - 1)) if start == 0 else -ge * m
    if m == 0:
        return -(go + ge * (n - 1)) if start == 0 and end == 0 else INF

    # index 0 is the border (row -1 / column -1), index i+1 is row/column i
    H = [[INF] * (n + 1) for _ in range(m + 1)]
    E = [[INF] * (n + 1) for _ in range(m + 1)]
    F = [[INF] * (n + 1) for _ in range(m + 1)]
    if start == 0:
        H[0][0] = 0
        for q in range(n):
            H[0][q + 1] = E[0][q + 1] = -(go + ge * q)
        for p in range(m):
            H[p + 1][0] = F[p + 1][0] = -(go + ge * p)
    else:
        for p in range(m):
            H[p + 1][0] = F[p + 1][0] = -ge * (p + 1)
    for p in range(1, m + 1):
        for q in range(1, n + 1):
            E[p][q] = max(H[p][q - 1] - go, E[p][q - 1] - ge)
            F[p][q] = max(H[p - 1][q] - go, F[p - 1][q] - ge)
            H[p][q] = max(H[p - 1][q - 1] + sub(A[q - 1], B[p - 1], scoring), E[p][q], F[p][q])
    return F[m][n] if end == 1 else H[m][n]


def rescore(A: str, B: str, ops: str, scoring: Scoring, start: int) -> int:
    """Score of an op string over A (columns) and B (rows); see the module docstring for the
    gap charges. Asserts that '=' / 'X' agree with the letters and that the ops consume
    exactly A and B."""
    go, ge = scoring.gap_open, scoring.gap_extend
    interior_ext = min(go, ge)
    i = j = 0  # next letter of A, of B
    score = 0
    k = 0
    while k < len(ops):
        op = ops[k]
        if op in "=X":
            assert i < len(A) and j < len(B), f"{ops!r} runs past the letters"
            s = sub(A[i], B[j], scoring)
            is_match = A[i] == B[j] and A[i] != "N"
            assert (op == "=") == is_match, f"op {op!r} on {A[i]}/{B[j]} in {ops!r}"
            score += s
            i += 1
            j += 1
            k += 1
            continue
        assert op in "ID", f"unknown op {op!r}"
        run = 1
        while k + run < len(ops) and ops[k + run] == op:
            run += 1
        if op == "I":
            i += run
        else:
            j += run
        if k == 0 and start == 1:
            assert op == "D", "start F must begin with D"
            score -= ge * run
        elif k == 0:
            score -= go + ge * (run - 1)
        else:
            score -= go + interior_ext * (run - 1)
        k += run
    assert (i, j) == (len(A), len(B)), f"{ops!r} consumes {i}/{len(A)} of A, {j}/{len(B)} of B"
    return score


def all_alignments(n: int, m: int):
    """Every op string over 'M' (a diagonal step), 'I', 'D' consuming n letters of A, m of B."""
    if n == 0 and m == 0:
        yield ""
        return
    if n and m:
        for rest in all_alignments(n - 1, m - 1):
            yield "M" + rest
    if n:
        for rest in all_alignments(n - 1, m):
            yield "I" + rest
    if m:
        for rest in all_alignments(n, m - 1):
            yield "D" + rest


def resolve(A: str, B: str, shape: str) -> str:
    """Turn the diagonal steps 'M' into '=' / 'X' by the letters they pair."""
    out, i, j = [], 0, 0
    for op in shape:
        if op == "M":
            out.append("=" if A[i] == B[j] and A[i] != "N" else "X")
            i += 1
            j += 1
        else:
            out.append(op)
            i += op == "I"
            j += op == "D"
    return "".join(out)


def enumerate_best(A: str, B: str, scoring: Scoring, start: int, end: int) -> float:
    """The best score over every alignment that meets the start/end rules (-inf if none)."""
    best = INF
    for shape in all_alignments(len(A), len(B)):
        if start == 1 and not shape.startswith("D"):
            continue
        if end == 1 and not shape.endswith("D"):
            continue
        best = max(best, rescore(A, B, resolve(A, B, shape), scoring, start))
    return best


# --- helpers ----------------------------------------------------------------------------------

def run_box(A: str, B: str, scoring: Scoring, start: int, end: int) -> tuple[int, str]:
    """global_traceback on letters; also checks score_only and the ops (check_ops)."""
    a, b = query_codes(encode(A)), encode(B)
    score, ops = global_traceback(a, b, scoring, start, end)
    assert isinstance(score, int)
    assert ops.dtype == np.uint8 and ops.ndim == 1
    assert score_only(a, b, scoring, start, end) == score
    text = ops_string(ops)
    check_ops(A, B, text, score, scoring, start, end)
    return score, text


def check_ops(A: str, B: str, ops: str, score: int, scoring: Scoring, start: int, end: int):
    assert len(ops) <= len(A) + len(B)
    if start == 1:
        assert ops[:1] == "D", f"start F but ops {ops!r}"
    if end == 1:
        assert ops[-1:] == "D", f"end F but ops {ops!r}"
    assert rescore(A, B, ops, scoring, start) == score, f"{ops!r} does not re-score to {score}"


def check_against_oracles(A: str, B: str, scoring: Scoring, start: int, end: int,
                          exhaustive: bool) -> None:
    expected = dp_oracle(A, B, scoring, start, end)
    if exhaustive:
        assert enumerate_best(A, B, scoring, start, end) == expected
    if not feasible(len(B), len(A), start, end):
        assert expected == INF
        with pytest.raises(ValueError):
            global_traceback(query_codes(encode(A)), encode(B), scoring, start, end)
        with pytest.raises(ValueError):
            score_only(query_codes(encode(A)), encode(B), scoring, start, end)
        return
    score, _ = run_box(A, B, scoring, start, end)
    assert score == expected


# --- the oracles themselves -------------------------------------------------------------------

def test_rescore_plain_affine():
    sc = Scoring(2, -3, 5, 2)
    assert rescore("ACGT", "ACGT", "====", sc, 0) == 8
    assert rescore("ACGT", "AGT", "=I==", sc, 0) == 6 - 5
    assert rescore("AT", "ACCGT", "=DDD=", sc, 0) == 4 - (5 + 2 + 2)
    assert rescore("A", "CCA", "DD=", sc, 1) == 2 - 2 * 2  # leading D run under start F
    assert rescore("NA", "NA", "X=", sc, 0) == -3 + 2
    with pytest.raises(AssertionError):
        rescore("NA", "NA", "==", sc, 0)  # N never matches N
    with pytest.raises(AssertionError):
        rescore("AC", "AC", "=", sc, 0)  # leaves letters


def test_rescore_reopens_when_extend_exceeds_open():
    sc = Scoring(2, -3, 1, 3)  # ge > go: interior gap letters cost go each
    assert rescore("AGGT", "AT", "=II=", sc, 0) == 4 - 2
    assert rescore("GGAT", "AT", "II==", sc, 0) == 4 - (1 + 3)  # the border run keeps ge


def test_enumeration_counts():
    # Delannoy numbers count the alignments of an n x m box
    assert sum(1 for _ in all_alignments(4, 4)) == 321
    assert sum(1 for _ in all_alignments(3, 2)) == 25
    assert list(all_alignments(0, 0)) == [""]


@pytest.mark.parametrize("scoring", SCORINGS, ids=str)
def test_dp_oracle_equals_enumeration(scoring):
    rng = np.random.default_rng(7)
    for m in range(4):
        for n in range(4):
            for _ in range(3):
                A = "".join(rng.choice(list(LETTERS), n))
                B = "".join(rng.choice(list(LETTERS), m))
                for start, end in CONSTRAINTS:
                    assert dp_oracle(A, B, scoring, start, end) == \
                        enumerate_best(A, B, scoring, start, end), (A, B, start, end)


# --- the box DP against the oracles -----------------------------------------------------------

@pytest.mark.parametrize("scoring", SCORINGS, ids=str)
def test_every_small_box_against_enumeration(scoring):
    rng = np.random.default_rng(11)
    for m in range(5):
        for n in range(5):
            for _ in range(4):
                A = "".join(rng.choice(list(LETTERS), n))
                B = "".join(rng.choice(list(LETTERS), m))
                for start, end in CONSTRAINTS:
                    check_against_oracles(A, B, scoring, start, end, exhaustive=True)


@pytest.mark.parametrize("start,end", CONSTRAINTS)
def test_binary_alphabet_ties(start, end):
    """Two letters and zero-ish penalties: many optimal alignments, all must re-score."""
    rng = np.random.default_rng(3)
    for scoring in (Scoring(1, 0, 0, 0), Scoring(1, -1, 1, 1), Scoring(2, -2, 2, 2),
                    Scoring(1, -1, 0, 1)):
        for _ in range(30):
            A = "".join(rng.choice(list("AC"), int(rng.integers(0, 5))))
            B = "".join(rng.choice(list("AC"), int(rng.integers(0, 5))))
            check_against_oracles(A, B, scoring, start, end, exhaustive=True)


@st.composite
def boxes(draw, max_len=40):
    A = draw(st.text(LETTERS, max_size=max_len))
    B = draw(st.text(LETTERS, max_size=max_len))
    scoring = Scoring(draw(st.integers(1, 5)), draw(st.integers(-5, 0)),
                      draw(st.integers(0, 8)), draw(st.integers(0, 4)))
    return A, B, scoring


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boxes())
def test_random_boxes_against_dp_oracle(box):
    A, B, scoring = box
    for start, end in CONSTRAINTS:
        check_against_oracles(A, B, scoring, start, end, exhaustive=False)


@settings(max_examples=200, deadline=None)
@given(boxes(max_len=4))
def test_random_tiny_boxes_against_enumeration(box):
    A, B, scoring = box
    for start, end in CONSTRAINTS:
        check_against_oracles(A, B, scoring, start, end, exhaustive=True)


def test_related_sequences_mostly_match():
    rng = np.random.default_rng(5)
    B = "".join(rng.choice(list("ACGT"), 300))
    A = B[:100] + B[110:250] + "GATTACA" + B[250:]
    for start, end in CONSTRAINTS:
        check_against_oracles(A, B, Scoring(), start, end, exhaustive=False)
    _, ops = run_box(A, B, Scoring(), 0, 0)
    assert ops.count("=") > 280


# --- degenerate shapes ------------------------------------------------------------------------

def test_empty_box():
    score, ops = global_traceback(np.zeros(0, np.uint8), np.zeros(0, np.uint8), Scoring())
    assert score == 0 and ops.size == 0 and ops.dtype == np.uint8
    assert score_only(np.zeros(0, np.uint8), np.zeros(0, np.uint8), Scoring()) == 0
    for start, end in CONSTRAINTS[1:]:
        with pytest.raises(ValueError):
            global_traceback(np.zeros(0, np.uint8), np.zeros(0, np.uint8), Scoring(), start, end)


def test_no_query_letters_is_all_deletions():
    sc = Scoring(2, -3, 5, 2)
    b = encode("ACGTN")
    for start, end in CONSTRAINTS:
        score, ops = global_traceback(np.zeros(0, np.uint8), b, sc, start, end)
        assert ops_string(ops) == "DDDDD"
        assert score == (-(5 + 2 * 4) if start == 0 else -2 * 5)


def test_no_reference_letters_is_all_insertions():
    sc = Scoring(2, -3, 5, 2)
    a = query_codes(encode("ACGN"))
    score, ops = global_traceback(a, np.zeros(0, np.uint8), sc)
    assert (score, ops_string(ops)) == (-(5 + 2 * 3), "IIII")
    for start, end in ((1, 0), (0, 1), (1, 1)):
        with pytest.raises(ValueError, match="M >= 1"):
            global_traceback(a, np.zeros(0, np.uint8), sc, start, end)
        with pytest.raises(ValueError, match="M >= 1"):
            score_only(a, np.zeros(0, np.uint8), sc, start, end)


def test_one_by_one():
    sc = Scoring(2, -3, 5, 2)
    assert run_box("A", "A", sc, 0, 0) == (2, "=")
    assert run_box("A", "C", sc, 0, 0) == (-3, "X")
    assert run_box("N", "N", sc, 0, 0) == (-3, "X")
    assert run_box("A", "A", sc, 1, 0) == (-2 - 5, "DI")  # forced D first, at ge
    assert run_box("A", "A", sc, 0, 1) == (-5 - 5, "ID")  # forced D last, opened
    with pytest.raises(ValueError, match="no such alignment"):
        global_traceback(query_codes(encode("A")), encode("A"), sc, 1, 1)
    # a cheap extension makes a gap pair beat a mismatch
    assert run_box("A", "C", Scoring(1, -5, 1, 0), 0, 0)[0] == -2


def test_one_row_and_one_column():
    sc = Scoring(2, -3, 5, 2)
    score, ops = run_box("ACGTAC", "G", sc, 0, 0)
    assert score == 2 - (5 + 2 * 1) - (5 + 2 * 2) and ops == "II=III"
    score, ops = run_box("G", "ACGTAC", sc, 0, 0)
    assert score == 2 - (5 + 2 * 1) - (5 + 2 * 2) and ops == "DD=DDD"
    score, ops = run_box("G", "ACGTAC", sc, 1, 0)
    assert score == 2 - 2 * 2 - (5 + 2 * 2) and ops == "DD=DDD"
    score, ops = run_box("G", "ACGTAC", sc, 1, 1)
    assert score == 2 - 2 * 2 - (5 + 2 * 2) and ops == "DD=DDD"
    score, ops = run_box("ACGTAC", "G", sc, 1, 0)  # D first, then all of A as I
    assert score == -2 - (5 + 2 * 5) and ops == "DIIIIII"
    for A, B in (("ACGTAC", "G"), ("G", "ACGTAC"), ("ACGT", "C"), ("C", "ACGT")):
        for start, end in CONSTRAINTS:
            for scoring in SCORINGS:
                check_against_oracles(A, B, scoring, start, end, exhaustive=True)


def test_start_f_is_cheaper_than_opening():
    """The leading D run of start F pays no open; start H pays it."""
    sc = Scoring(2, -3, 5, 2)
    A, B = "ACGT", "TTACGT"
    h, ops_h = run_box(A, B, sc, 0, 0)
    f, ops_f = run_box(A, B, sc, 1, 0)
    assert (h, ops_h) == (8 - (5 + 2), "DD====")
    assert (f, ops_f) == (8 - 2 * 2, "DD====")


def test_end_f_ends_with_a_deletion():
    sc = Scoring(2, -3, 5, 2)
    score, ops = run_box("ACGT", "ACGTA", sc, 0, 1)
    assert (score, ops) == (8 - 5, "====D")
    score, ops = run_box("ACGT", "ACGT", sc, 0, 1)
    assert ops.endswith("D") and score == dp_oracle("ACGT", "ACGT", sc, 0, 1)


# --- API details ------------------------------------------------------------------------------

def test_op_codes():
    assert OP_CHARS == "=XID"
    _, ops = global_traceback(query_codes(encode("ACGTN")), encode("ACTN"), Scoring(2, -3, 5, 2))
    assert set(ops.tolist()) <= {0, 1, 2, 3}


def test_refuses_a_box_over_max_cells():
    a, b = query_codes(encode("ACGT" * 10)), encode("ACGT" * 10)
    with pytest.raises(ValueError, match="max_cells"):
        global_traceback(a, b, Scoring(), max_cells=1599)
    score, _ = global_traceback(a, b, Scoring(), max_cells=1600)
    assert score == 80


def test_refuses_bad_arguments():
    a, b = query_codes(encode("ACGT")), encode("ACGT")
    for bad in (2, -1, "H"):
        with pytest.raises(ValueError, match="start"):
            global_traceback(a, b, Scoring(), start=bad)
        with pytest.raises(ValueError, match="end"):
            global_traceback(a, b, Scoring(), end=bad)
    with pytest.raises(ValueError, match="code"):
        global_traceback(np.array([0, 9], np.uint8), b, Scoring())
    with pytest.raises(ValueError, match="code"):
        global_traceback(a, np.array([0, -1], np.int64), Scoring())  # no silent wrap to 255
    with pytest.raises(ValueError, match="code"):
        global_traceback(np.array([0, 260], np.int64), b, Scoring())  # nor to 4
    with pytest.raises(ValueError, match="1-D"):
        global_traceback(np.zeros((2, 2), np.uint8), b, Scoring())


def test_accepts_other_integer_arrays():
    a = np.array([0, 1, 2, 3], np.int64)
    b = np.array([0, 1, 2, 3], np.int32)
    assert global_traceback(a, b, Scoring())[0] == 8


def test_long_gaps_do_not_overflow():
    sc = Scoring(1000, -1000, 1000, 1000)
    A, B = "A" * 3, "C" * 3000
    for start, end in CONSTRAINTS:
        check_against_oracles(A, B, sc, start, end, exhaustive=False)


def test_parasail_global_score_agrees():
    rng = np.random.default_rng(9)
    for scoring in SCORINGS:
        matrix = parasail.matrix_create(LETTERS, scoring.match, scoring.mismatch)
        for other in (4, 5):  # N and parasail's catch-all '*' never match
            for k in range(matrix.size):
                matrix.set_value(other, k, scoring.mismatch)
                matrix.set_value(k, other, scoring.mismatch)
        for _ in range(20):
            A = "".join(rng.choice(list(LETTERS), int(rng.integers(1, 60))))
            B = "".join(rng.choice(list(LETTERS), int(rng.integers(1, 60))))
            expected = parasail.nw(A, B, scoring.gap_open, scoring.gap_extend, matrix).score
            assert run_box(A, B, scoring, 0, 0)[0] == expected, (A, B, scoring)


def test_a_2048_box_agrees_with_parasail():
    """A box the size a traceback splits the matrix into: its ops re-score to its score, which
    is parasail's global optimum. Its speed is bench/kernel.py's ("traceback pieces")."""
    rng = np.random.default_rng(1)
    A = "".join(rng.choice(list("ACGT"), 2048))
    B = "".join(rng.choice(list("ACGT"), 2048))
    scoring = Scoring()
    score, _ = run_box(A, B, scoring, 0, 0)
    matrix = parasail.matrix_create("ACGT", scoring.match, scoring.mismatch)
    assert score == parasail.nw(A, B, scoring.gap_open, scoring.gap_extend, matrix).score


def test_itertools_sanity():  # the enumerator agrees with a brute product over op strings
    for n, m in ((2, 1), (1, 2), (2, 2)):
        brute = {"".join(p) for length in range(max(n, m), n + m + 1)
                 for p in itertools.product("MID", repeat=length)
                 if p.count("M") + p.count("I") == n and p.count("M") + p.count("D") == m}
        assert brute == set(all_alignments(n, m))
