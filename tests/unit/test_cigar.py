"""worker/sw/cigar.py: CIGAR round trips, refused strings, re-scoring against a plain-Python
oracle and against parasail's own traceback."""

from __future__ import annotations

import random
import sys

import numpy as np
import parasail
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.sw import cigar
from worker.sw.cigar import DEL, EQ, INS, OPS, X
from worker.sw.scoring import Scoring, encode, query_codes

DEFAULT = Scoring()

ops_arrays = st.lists(st.integers(0, 3), max_size=300).map(lambda v: np.array(v, dtype=np.uint8))
run_lists = st.lists(st.tuples(st.integers(1, 10_000), st.sampled_from(OPS)), max_size=40)
scorings = st.builds(Scoring, match=st.integers(1, 6), mismatch=st.integers(-6, 0),
                     gap_open=st.integers(0, 9), gap_extend=st.integers(0, 5))


# --- helpers ----------------------------------------------------------------------------------

def sequences_for(ops: np.ndarray, rng: random.Random, start_a: int = 0,
                  start_b: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Encoded A and B that the ops describe truthfully, after random flanks of the given
    lengths (and a random tail). X columns use N on one side now and then."""
    a = [rng.randrange(5) for _ in range(start_a)]
    b = [rng.randrange(5) for _ in range(start_b)]
    for op in ops.tolist():
        if op == EQ:
            letter = rng.randrange(4)
            a.append(letter)
            b.append(letter)
        elif op == X:
            x = rng.randrange(5)
            y = rng.choice([c for c in range(5) if c != x or c == 4])  # N/N is a mismatch too
            a.append(x)
            b.append(y)
        elif op == INS:
            a.append(rng.randrange(5))
        else:
            b.append(rng.randrange(5))
    a += [rng.randrange(5) for _ in range(rng.randrange(3))]
    b += [rng.randrange(5) for _ in range(rng.randrange(3))]
    return np.array(a, dtype=np.uint8), np.array(b, dtype=np.uint8)


def plain_rescore(ops: list[int], a: list[int], b: list[int], start_a: int, start_b: int,
                  s: Scoring) -> int:
    """Column by column, a gap state carried along: the obvious reading of the conventions."""
    score, i, j, prev = 0, start_a, start_b, None
    for op in ops:
        if op in (EQ, X):
            hit = a[i] == b[j] and a[i] < 4
            assert hit == (op == EQ)
            score += s.match if hit else s.mismatch
            i, j = i + 1, j + 1
        else:
            score -= s.gap_extend if op == prev else s.gap_open
            if op == INS:
                i += 1
            else:
                j += 1
        prev = op
    return score


# --- runs, to_string, parse -------------------------------------------------------------------

def test_constants_and_simple_cases():
    assert (OPS, EQ, X, INS, DEL) == ("=XID", 0, 1, 2, 3)
    ops = np.array([0, 0, 0, 1, 2, 2, 3, 0], dtype=np.uint8)
    assert cigar.runs(ops) == [(3, "="), (1, "X"), (2, "I"), (1, "D"), (1, "=")]
    assert cigar.to_string(ops) == "3=1X2I1D1="
    assert cigar.to_string(np.zeros(0, dtype=np.uint8)) == ""
    assert cigar.parse("").size == 0
    assert cigar.parse("2=3=").tolist() == [0] * 5  # adjacent equal runs merge


@settings(max_examples=300, deadline=None)
@given(ops_arrays)
def test_ops_round_trip(ops):
    pairs = cigar.runs(ops)
    assert all(n > 0 for n, _ in pairs)
    assert all(p[1] != q[1] for p, q in zip(pairs, pairs[1:]))
    assert np.array_equal(cigar.from_runs(pairs), ops)
    text = cigar.to_string(ops)
    parsed = cigar.parse(text)
    assert parsed.dtype == np.uint8 and np.array_equal(parsed, ops)


@settings(max_examples=300, deadline=None)
@given(run_lists)
def test_string_round_trip(pairs):
    text = "".join(f"{n}{op}" for n, op in pairs)
    ops = cigar.parse(text)
    assert ops.size == sum(n for n, _ in pairs)
    assert np.array_equal(cigar.parse(cigar.to_string(ops)), ops)
    assert np.array_equal(cigar.from_runs(pairs), ops)


@pytest.mark.parametrize("text, message", [
    ("10M", r"unknown op 'M' at position 2"),
    ("3=x", r"unknown op 'x' at position 2"),
    ("3= 4X", r"unknown op ' ' at position 2"),
    ("-3=", r"unknown op '-' at position 0"),
    ("=", r"missing count before '=' at position 0"),
    ("4=X", r"missing count before 'X' at position 2"),
    ("0=", r"zero count before '=' at position 0"),
    ("5=00X", r"zero count before 'X' at position 2"),
    ("10", r"count 10 at position 0 has no op"),
    ("5=7", r"count 7 at position 2 has no op"),
])
def test_malformed_strings_are_refused(text, message):
    with pytest.raises(ValueError, match=message) as info:
        cigar.parse(text)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"malformed CIGAR {text!r}")


def test_bad_runs_and_codes_are_refused():
    with pytest.raises(ValueError, match=r"run 1: unknown op 'M'"):
        cigar.from_runs([(2, "="), (3, "M")])
    with pytest.raises(ValueError, match=r"run 0: count must be a positive integer, got 0"):
        cigar.from_runs([(0, "=")])
    with pytest.raises(ValueError, match=r"op code 7 at column 1 is not one of 0..3"):
        cigar.runs(np.array([0, 7], dtype=np.uint8))


def python_lines(fn, *args) -> tuple[object, int]:
    """``fn(*args)`` and the number of Python lines it ran in worker/sw/cigar.py (sys.settrace):
    a count, not a clock, so a busy test machine cannot change it."""
    count = 0

    def in_cigar(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return in_cigar

    def tracer(frame, event, arg):
        return in_cigar if frame.f_code.co_filename == cigar.__file__ else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        result = fn(*args)
    finally:
        sys.settrace(previous)
    return result, count


def long_alignment(columns: int):
    """Seeded ops of ``columns`` columns and sequences they describe truthfully."""
    rng = np.random.default_rng(7)
    ops = rng.choice(4, size=columns, p=[0.85, 0.1, 0.025, 0.025]).astype(np.uint8)
    in_a, in_b = cigar.consumed(ops)
    a = rng.integers(0, 4, int(in_a.sum()), dtype=np.uint8)
    b = rng.integers(0, 4, int(in_b.sum()), dtype=np.uint8)
    pa, pb = np.cumsum(in_a) - 1, np.cumsum(in_b) - 1
    b[pb[ops == EQ]] = a[pa[ops == EQ]]
    b[pb[ops == X]] = (a[pa[ops == X]] + 1) % 4
    return ops, a, b


def test_long_alignment_stays_numpy():
    """A whole-genome alignment has millions of columns: rescore and stats run as many Python
    lines for 2,000,000 columns as for 2,000 (the columns are numpy's), and their results are
    right at that size. Their speed is bench/kernel.py's ("traceback pieces")."""
    small, big = long_alignment(2_000), long_alignment(2_000_000)
    for fn in (lambda o, a, b: cigar.rescore(o, a, b, 0, 0, DEFAULT), lambda o, a, b: cigar.stats(o)):
        (_, lines_small), (_, lines_big) = python_lines(fn, *small), python_lines(fn, *big)
        assert 0 < lines_small == lines_big, (lines_small, lines_big)
    ops, a, b = big
    counts = cigar.stats(ops)
    gaps = sum(DEFAULT.gap_open + (n - 1) * DEFAULT.gap_extend
               for n, op in cigar.runs(ops) if op in "ID")
    assert cigar.rescore(ops, a, b, 0, 0, DEFAULT) == (
        counts["matches"] * DEFAULT.match + counts["mismatches"] * DEFAULT.mismatch - gaps)
    assert np.array_equal(cigar.parse(cigar.to_string(ops)), ops)


# --- rescore and stats ------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(ops_arrays, scorings, st.integers(0, 5), st.integers(0, 5),
       st.randoms(use_true_random=False))
def test_rescore_matches_plain_python(ops, scoring, start_a, start_b, rng):
    a, b = sequences_for(ops, rng, start_a, start_b)
    expected = plain_rescore(ops.tolist(), a.tolist(), b.tolist(), start_a, start_b, scoring)
    assert cigar.rescore(ops, a, b, start_a, start_b, scoring) == expected
    # The query-side code 5 for "other" (query_codes) scores the same.
    assert cigar.rescore(ops, query_codes(a), b, start_a, start_b, scoring) == expected


def test_gap_runs_are_scored_as_runs():
    a, b = encode("ACG" "TTT" "ACGT"), encode("ACG" "AA" "ACGT")
    ops = cigar.parse("3=3I2D4=")  # an I-run then a D-run: two gaps, each opened
    s = Scoring(match=2, mismatch=-3, gap_open=5, gap_extend=2)
    assert cigar.rescore(ops, a, b, 0, 0, s) == 7 * 2 - (5 + 2 * 2) - (5 + 2)


@pytest.mark.parametrize("op, a, b, message", [
    ("1=", "A", "C", r"column 0 is '=' but A\[0\]=A against B\[0\]=C is a mismatch"),
    ("1X", "G", "G", r"column 0 is 'X' but A\[0\]=G against B\[0\]=G is a match"),
    ("1=", "N", "N", r"column 0 is '=' but A\[0\]=N against B\[0\]=N is a mismatch"),
])
def test_rescore_refuses_untrue_columns(op, a, b, message):
    with pytest.raises(ValueError, match=message):
        cigar.rescore(cigar.parse(op), encode(a), encode(b), 0, 0, DEFAULT)


def test_rescore_names_the_column_and_positions():
    ops = cigar.parse("2=1I2=")
    with pytest.raises(ValueError, match=r"column 4 is '=' but A\[6\]=T against B\[5\]=G"):
        cigar.rescore(ops, encode("GGACAATG"), encode("CCACAG"), 2, 2, DEFAULT)


def test_rescore_refuses_ranges_outside_the_sequences():
    with pytest.raises(ValueError, match=r"covers A\[2\.\.4\], outside A's 4 letters"):
        cigar.rescore(cigar.parse("3="), encode("ACGT"), encode("ACGTACGT"), 2, 0, DEFAULT)
    with pytest.raises(ValueError, match=r"covers B\[-1\.\.1\]"):
        cigar.rescore(cigar.parse("3="), encode("ACGT"), encode("ACGT"), 0, -1, DEFAULT)


def test_stats():
    got = cigar.stats(cigar.parse("5=1X2I3=1D1I2D4="))
    assert got == {"columns": 19, "matches": 12, "mismatches": 1, "insertions": 3,
                   "deletions": 3, "gap_opens": 4, "identity": 12 / 19,
                   "span_a": 16, "span_b": 16}
    assert cigar.stats(np.zeros(0, dtype=np.uint8))["identity"] == 0.0


def test_ops_from_strings():
    ops = cigar.ops_from_strings("ACG-TNAa", "ACGTT-NA")
    assert cigar.to_string(ops) == "3=1D1=1I1X1="  # N/N is a mismatch, case is ignored
    with pytest.raises(ValueError, match="differ in length"):
        cigar.ops_from_strings("AC", "A")
    with pytest.raises(ValueError, match="column 1 is a gap in both lines"):
        cigar.ops_from_strings("A-", "A-")


# --- parasail's traceback as the oracle -------------------------------------------------------

def random_seq(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ACGT") for _ in range(n))


def mutate(rng: random.Random, seq: str, sub: float = 0.08, indel: float = 0.03) -> str:
    """A related sequence: substitutions, and insertions and deletions of 1-6 letters."""
    out, i = [], 0
    while i < len(seq):
        r = rng.random()
        if r < indel / 2:
            i += rng.randint(1, 6)
            continue
        if r < indel:
            out.append(random_seq(rng, rng.randint(1, 6)))
        out.append(rng.choice("ACGT") if rng.random() < sub else seq[i])
        i += 1
    return "".join(out)


def parasail_case(seed: int):
    """A seeded pair (related core between random flanks) and parasail's traced alignment.

    ACGT only: parasail's stock matrix scores N/N as a match (see test_sw_naive.py).
    """
    rng = random.Random(seed)
    core = random_seq(rng, rng.randint(200, 2000))
    a = random_seq(rng, rng.randint(0, 100)) + core + random_seq(rng, rng.randint(0, 100))
    b = (random_seq(rng, rng.randint(0, 100)) + mutate(rng, core)
         + random_seq(rng, rng.randint(0, 100)))
    matrix = parasail.matrix_create("ACGT", DEFAULT.match, DEFAULT.mismatch)
    result = parasail.sw_trace_striped_32(a, b, DEFAULT.gap_open, DEFAULT.gap_extend, matrix)
    return a, b, result


@pytest.mark.parametrize("seed", range(12))
def test_rescore_equals_parasail_score(seed):
    a, b, result = parasail_case(seed)
    trace = result.get_traceback()
    ops = cigar.ops_from_strings(trace.query, trace.ref)
    counts = cigar.stats(ops)
    start_a = result.end_query - counts["span_a"] + 1
    start_b = result.end_ref - counts["span_b"] + 1
    assert (start_a, start_b) == (result.cigar.beg_query, result.cigar.beg_ref)
    assert cigar.to_string(ops) == result.cigar.decode.decode()  # parasail's own =XID CIGAR
    assert cigar.rescore(ops, encode(a), encode(b), start_a, start_b, DEFAULT) == result.score
    assert counts["matches"] == trace.comp.count("|")
