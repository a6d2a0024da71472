"""worker.sw.trace: the traceback in linear space, from the special rows to a CIGAR.

Every alignment traced here is checked the way a user can check it: the CIGAR re-scores to the
score pass's S* exactly and ends at its end cell. Where the optimal path is unique (identical
sequences, a planted copy in random flanks) the start must also be parasail's; elsewhere ties
allow several optimal paths and any of them is right.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import parasail
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.sw import boxdp, cigar, kernels, trace
from worker.sw.align import align
from worker.sw.scoring import Scoring, encode, query_codes
from worker.sw.special_rows import (RowStore, SpecialRowsError, pack, read_rows, unpack,
                                    write_rows)
from worker.sw.tile import edge_left, edge_top, sw_tile

NEG_INF = -(10**12)


@pytest.fixture(scope="module", autouse=True)
def compiled():
    return kernels.load("int16")


# ---- helpers -----------------------------------------------------------------------------------

def traceback(A: str, B: str, scoring: Scoring, tile: int, stride: int, directory: Path, **knobs):
    """Stages 1-5 in-process (``trace.trace_local``); checks what must hold and returns
    (score, start_a, start_b, ops)."""
    a, b = encode(A), encode(B)
    got = trace.trace_local(a, b, scoring, directory, tile=tile, stride=stride, **knobs)
    whole = align(a, b, scoring)
    assert (got.score, got.end_a, got.end_b) == (whole.score, whole.end_a, whole.end_b)
    assert got.points[0] == trace.Point(got.end_b, got.end_a, trace.H, got.score)
    assert got.points[-1].remaining == 0 and got.points[-1].state == trace.H
    assert cigar.rescore(got.ops, a, b, got.start_a, got.start_b, scoring) == got.score
    in_a, in_b = cigar.consumed(got.ops)
    assert (got.start_a + int(in_a.sum()) - 1, got.start_b + int(in_b.sum()) - 1) == (got.end_a, got.end_b)
    return got.score, got.start_a, got.start_b, got.ops


def score_pass(a, b, scoring, tile, stride, directory: Path):
    """The score pass's special rows as a RowStore (and its best: score, end_b, end_a)."""
    got = trace.trace_local(a, b, scoring, directory, tile=tile, stride=stride)
    return (got.score, got.end_b, got.end_a), RowStore([read_rows(p) for p in sorted(directory.glob("*.swr"))], len(a))



def parasail_start(A: str, B: str, scoring: Scoring) -> tuple[int, int, int]:
    matrix = parasail.matrix_create("ACGT", scoring.match, scoring.mismatch)
    r = parasail.sw_trace_striped_32(A, B, scoring.gap_open, scoring.gap_extend, matrix)
    tb = r.get_traceback()
    return (r.score, r.end_query - sum(c != "-" for c in tb.query) + 1,
            r.end_ref - sum(c != "-" for c in tb.ref) + 1)


def random_dna(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ACGT") for _ in range(n))


def mutate(rng: random.Random, s: str, rate: float) -> str:
    out = []
    for ch in s:
        x = rng.random()
        if x < rate / 3:
            continue
        if x < 2 * rate / 3:
            out.append(rng.choice("ACGT"))
        elif x < rate:
            out += [ch, rng.choice("ACGT")]
        else:
            out.append(ch)
    return "".join(out)


def naive_anchored(a, b, sc, lead, first):
    """The anchored DP's last row, plain Python: what trace.anchored_rows must return."""
    go, ge = sc.gap_open, sc.gap_extend
    M, N = len(b), len(a)
    H = [[NEG_INF] * (N + 1) for _ in range(M + 1)]
    E = [[NEG_INF] * (N + 1) for _ in range(M + 1)]
    F = [[NEG_INF] * (N + 1) for _ in range(M + 1)]
    if lead == trace.H:
        H[0][0] = 0
        for q in range(N):
            H[0][q + 1] = -(go + ge * q)
        for p in range(M):
            H[p + 1][0] = -(go + ge * p)
    else:
        for p in range(M):
            H[p + 1][0] = -(first + ge * p)
    for p in range(1, M + 1):
        for q in range(1, N + 1):
            E[p][q] = max(H[p][q - 1] - go, E[p][q - 1] - ge)
            F[p][q] = max(H[p - 1][q] - go, F[p - 1][q] - ge)
            s = sc.match if (a[q - 1] == b[p - 1] and b[p - 1] < 4) else sc.mismatch
            H[p][q] = max(H[p - 1][q - 1] + s, E[p][q], F[p][q])
    return H[M], [H[M][0]] + F[M][1:]


# ---- the anchored DP on the local kernel ---------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_anchored_rows_equal_the_plain_anchored_dp(seed):
    rng = random.Random(seed)
    M, N = rng.randint(1, 40), rng.randint(1, 40)
    A = "".join(rng.choice("ACGTN") for _ in range(N))
    B = "".join(rng.choice("ACGTN") for _ in range(M))
    ge = rng.randint(0, 3)
    sc = Scoring(rng.randint(1, 4), rng.randint(-4, 0), rng.randint(ge, 7), ge)
    lead = rng.choice([trace.H, trace.F])
    first = rng.choice([sc.gap_open, sc.gap_extend])
    a, b = query_codes(encode(A)), encode(B)
    want_h, want_f = naive_anchored(a, b, sc, lead, first)
    h, f, _, _ = trace.anchored_rows(a, b, sc, lead, first)
    assert list(h) == want_h
    assert all(x == y or (x < -(10**8) and y < -(10**8)) for x, y in zip(f, want_f))
    # the same DP in chunks of columns, each from the previous one's right border
    width, left, got, q0 = rng.randint(1, N), None, [], 0
    while q0 < N:
        w = min(width, N - q0)
        h2, _, left, _ = trace.anchored_rows(a[q0:q0 + w], b, sc, lead, first, left=left, q0=q0)
        got += list(h2[1:]) if q0 else list(h2)
        q0 += w
    assert got == want_h


# ---- Myers-Miller against the direct traceback ----------------------------------------------------

@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from([4, 16, 64]))
def test_myers_miller_finds_the_direct_optimum_with_gap_states(seed, leaf):
    rng = random.Random(seed)
    A = random_dna(rng, rng.randint(2, 200))
    B = mutate(rng, A, rng.choice([0.05, 0.2, 0.6])) or "A"
    ge = rng.randint(0, 3)
    sc = Scoring(rng.randint(1, 4), rng.randint(-4, 0), rng.randint(ge, 7), ge)
    start, end = rng.choice([trace.H, trace.F]), rng.choice([trace.H, trace.F])
    a, b = encode(A), encode(B)
    want, _ = boxdp.global_traceback(query_codes(a), b, sc, start, end)
    got, ops = trace.solve_box(a, b, sc, start, end, leaf_cells=leaf)
    assert got == want
    in_a, in_b = cigar.consumed(ops)
    assert (int(in_a.sum()), int(in_b.sum())) == (len(a), len(b))
    if start == trace.F:
        assert ops[0] == cigar.DEL
    if end == trace.F:
        assert ops[-1] == cigar.DEL
    rescored = cigar.rescore(ops, a, b, 0, 0, sc) if len(ops) else 0
    # a leading F run continues a gap opened outside the box: its open is not the box's
    assert rescored + (sc.gap_open - sc.gap_extend if start == trace.F else 0) == got


def test_a_box_that_cannot_score_what_its_ends_promise_is_refused():
    a, b = encode("ACGTACGTAC"), encode("ACGTACGTAC")
    with pytest.raises(trace.TraceError, match="not the 21 its ends promise"):
        trace.solve_box(a, b, Scoring(), score=21)


def test_gap_open_below_extend_is_refused_with_the_reason():
    with pytest.raises(trace.TraceError, match="gap_open >= gap_extend"):
        trace.solve_box(encode("ACGT"), encode("ACGT"), Scoring(gap_open=1, gap_extend=2))


# ---- stages 1-5 in-process -------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_traceback_rescores_to_the_optimum_on_mutated_pairs(tmp_path_factory, seed):
    rng = random.Random(seed)
    core = random_dna(rng, rng.randint(50, 1500))
    A = random_dna(rng, rng.randint(0, 300)) + core + random_dna(rng, rng.randint(0, 300))
    B = random_dna(rng, rng.randint(0, 300)) + mutate(rng, core, rng.choice([0.02, 0.1, 0.25])) + \
        random_dna(rng, rng.randint(0, 300))
    ge = rng.randint(1, 3)
    sc = Scoring(rng.randint(1, 3), rng.randint(-4, -1), rng.randint(ge, 7), ge)
    tile = rng.choice([128, 256, 512])
    stride = rng.choice([1, 7, 32, tile])
    a, b = encode(A), encode(B)
    if align(a, b, sc).score == 0:
        return
    # chunks narrower than the strip's crossing distance exercise the chunked search; small
    # leaves, Myers-Miller's recursion
    traceback(A, B, sc, tile, stride, tmp_path_factory.mktemp("rows"), chunk=rng.choice([16, 100, 4096]),
              leaf_cells=rng.choice([64, 4096, trace.LEAF_CELLS]))


def boundary_cases():
    rng = random.Random(11)
    x = random_dna(rng, 900)
    gap = random_dna(rng, 400)
    yield "identical: the diagonal crosses every tile corner", x, x, 128
    yield "insertion in A along a tile row boundary, spanning 3 tiles", x[:255] + gap + x[255:], x, 128
    yield "deletion from A down a tile column boundary", x, x[:383] + gap + x[383:], 128
    yield "starts in the first row and column, ends in the last", x, x[:600] + "T" + x[601:], 256
    core = random_dna(rng, 700)
    yield "N runs in both sequences", (random_dna(rng, 50) + core[:300] + "N" * 40 + core[340:]),\
        (random_dna(rng, 70) + core[:500] + "NNNNN" + core[505:] + random_dna(rng, 30)), 128
    yield "planted copy, unique path", random_dna(rng, 333) + core + random_dna(rng, 200),\
        random_dna(rng, 129) + mutate(rng, core, 0.05) + random_dna(rng, 400), 128


@pytest.mark.parametrize("what,A,B,tile", list(boundary_cases()), ids=lambda v: v if isinstance(v, str) and " " in v else "")
@pytest.mark.parametrize("stride", [1, 64, None])
def test_tile_boundary_cases_match_parasail(tmp_path, what, A, B, tile, stride):
    sc = Scoring()
    score, start_a, start_b, ops = traceback(A, B, sc, tile, stride or tile, tmp_path)
    if "N runs" in what:
        return  # parasail's ACGT matrix does not score N as a mismatch against N; traceback() checked S*
    assert (score, start_a, start_b) == parasail_start(A, B, sc), "a unique optimal path starts where parasail's does"


def test_real_pair_starts_where_parasail_does(tmp_path):
    data = Path(__file__).resolve().parents[2] / "data"
    if not (data / "pseudocat.fa").exists():
        pytest.skip("make demo fetches data/pseudocat.fa")
    from worker.sw.fasta import read_fasta

    A = read_fasta(data / "pseudocat.fa", None)[1][:8000]
    B = read_fasta(data / "pseudopig2.fa", None)[1][:8000]
    score, start_a, start_b, _ = traceback(A, B, Scoring(), 1024, 256, tmp_path)
    assert (score, start_a, start_b) == parasail_start(A, B, Scoring())


# ---- what the traceback refuses ------------------------------------------------------------------

def test_rows_of_another_pair_are_a_clear_error(tmp_path):
    rng = random.Random(3)
    A = random_dna(rng, 600)
    B = mutate(rng, A, 0.1)
    (score, end_b, end_a), store = score_pass(encode(A), encode(B), Scoring(), 128, 32, tmp_path)
    other = encode(random_dna(rng, len(A)))
    with pytest.raises(trace.TraceError, match="do not belong to this alignment"):
        trace.crosspoints(other, encode(B), Scoring(), store, end_a, end_b, score)


def test_a_missing_tile_file_is_named(tmp_path):
    rng = random.Random(4)
    A = random_dna(rng, 500)
    _, store = score_pass(encode(A), encode(A), Scoring(), 128, 32, tmp_path)
    tiles = [read_rows(p) for p in sorted(tmp_path.glob("*.swr")) if p.name != "tile-1-2.swr"]
    with pytest.raises(SpecialRowsError, match="tile row 1's special rows cover 372 of 500 columns"):
        RowStore(tiles, 500)


def test_a_cut_file_is_refused(tmp_path):
    path = tmp_path / "t.swr"
    write_rows(path, 0, 0, 0, 0, 4, 2, [(1, np.arange(5, dtype=np.int32), np.arange(4, dtype=np.int32))])
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SpecialRowsError, match="its index describes"):
        read_rows(path)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**28), 2**30), min_size=1, max_size=300))
def test_packed_rows_round_trip(values):
    arr = np.array(values, np.int32)
    assert np.array_equal(unpack(pack(arr), len(arr)), arr)


def test_special_stride_leaves_the_tile_bit_identical():
    rng = random.Random(5)
    a, b = encode(random_dna(rng, 700)), encode(mutate(rng, random_dna(rng, 900), 0.1))
    top_h, top_f = edge_top(len(a))
    left_h, left_e = edge_left(len(b))
    whole = sw_tile(a, b, top_h, top_f, left_h, left_e, 300, 40)
    cut = sw_tile(a, b, top_h, top_f, left_h, left_e, 300, 40, special_stride=64)
    for name in ("bottom_h", "bottom_f", "right_h", "right_e"):
        assert np.array_equal(getattr(whole, name), getattr(cut, name))
    assert (whole.score, whole.end_a, whole.end_b) == (cut.score, cut.end_a, cut.end_b)
    assert [r for r, _, _ in cut.special] == [r for r in range(300, 1200) if (r + 1) % 64 == 0]
    r, h, f = cut.special[2]  # the rows themselves: the tile computed down to that row alone
    upto = sw_tile(a, b[:r - 300 + 1], top_h, top_f, left_h[:r - 300 + 1], left_e[:r - 300 + 1], 300, 40)
    assert np.array_equal(h, upto.bottom_h) and np.array_equal(f, upto.bottom_f)


@pytest.mark.parametrize("order,message", [
    ("not a dict", "must be a dict"),
    ({"op": "box", "colour": 1}, "unknown keys colour"),
    ({"op": "undo"}, "op must be 'crosspoints' or 'box'"),
    ({"op": "box", "b0": 5, "b1": 2, "a0": 0, "a1": 1, "start": 0, "end": 0, "score": 1}, "are not a box"),
    ({"op": "box", "b0": 0, "b1": 2, "a0": 0, "a1": 1, "start": 2, "end": 0, "score": 1}, "are not a box"),
    ({"op": "box", "b0": "x", "b1": 2, "a0": 0, "a1": 1, "start": 0, "end": 0, "score": 1}, "b0 must be an integer"),
    ({"op": "crosspoints", "end_a": 0, "end_b": 0, "score": 1, "rows": "all"}, "rows must be the list"),
    ({"op": "crosspoints", "end_a": 99, "end_b": 0, "score": 1, "rows": []}, "outside the"),
    ({"op": "box", "b0": 0, "b1": 50, "a0": 0, "a1": 1, "start": 0, "end": 0, "score": 1}, "too short"),
    ({"op": "box", "scoring": {"match": 0}, "b0": 0, "b1": 1, "a0": 0, "a1": 1, "start": 0, "end": 0, "score": 1},
     "bad scoring"),
])
def test_a_bad_trace_order_is_one_clear_line(tmp_path, order, message):
    from worker.trace_tasks import TraceTaskError, run_trace

    (tmp_path / "a").write_text("ACGTACGTAC")
    (tmp_path / "b").write_text("ACGTACGTAC")
    if isinstance(order, dict):
        order = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), **order}
    with pytest.raises(TraceTaskError, match=message):
        run_trace(order, tmp_path)


def test_a_box_task_writes_a_long_cigar_to_a_file(tmp_path, monkeypatch):
    from worker import trace_tasks

    rng = random.Random(8)
    A = random_dna(rng, 400)
    (tmp_path / "a").write_text(A)
    (tmp_path / "b").write_text(A)
    monkeypatch.setattr(trace_tasks, "CIGAR_INLINE", 3)
    order = {"op": "box", "a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "b0": 0, "b1": 400, "a0": 0,
             "a1": 400, "start": 0, "end": 0, "score": 800}
    summary = trace_tasks.run_trace(order, tmp_path)
    assert "cigar" not in summary and (tmp_path / trace_tasks.CIGAR_FILE).read_text() == "400="
