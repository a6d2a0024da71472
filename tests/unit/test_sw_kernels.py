"""The compiled kernels against the naive oracle (tests/naive.py) and parasail.

Every kernel build (int32; int16 with its int32 fallback) must equal the oracle in score, end
cell and all four outgoing borders, for random, similar, binary-alphabet (tie-heavy) and
N-rich sequences, tiny and ragged tiles, matrix-edge and arbitrary borders, and borders high
enough to force the rebased int16 path and the int32 fallback. The builds are compiled once
per session (and cached on disk across sessions).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import parasail
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.naive import naive_align, naive_tile
from worker.sw import Scoring, align, edge_left, edge_top, encode, kernels, sw_tile
from worker.sw.tile import NEG

BUILDS = ("int32", "int16")
SCORINGS = [Scoring(), Scoring(1, -1, 2, 1), Scoring(3, -2, 1, 3), Scoring(5, 0, 0, 0),
            Scoring(1, -4, 6, 1)]


@pytest.fixture(scope="module", autouse=True)
def compiled():
    return {name: kernels.load(name) for name in BUILDS}


def check_tile(a, b, top_h, top_f, left_h, left_e, row0, col0, scoring, build):
    exp = naive_tile(list(a), list(b), list(top_h), list(top_f), list(left_h), list(left_e),
                     row0, col0, scoring)
    got = sw_tile(np.array(a, np.uint8), np.array(b, np.uint8), top_h, top_f, left_h, left_e,
                  row0, col0, scoring, kernel=build)
    assert (got.score, got.end_a, got.end_b) == (exp.score, exp.end_a, exp.end_b)
    assert got.bottom_h.tolist() == list(exp.bottom_h)
    assert got.bottom_f.tolist() == list(exp.bottom_f)
    assert got.right_h.tolist() == list(exp.right_h)
    assert got.right_e.tolist() == list(exp.right_e)
    return got


alphabets = st.sampled_from([(0, 1, 2, 3), (0, 1), (0, 1, 2, 3, 4), (4,)])


@st.composite
def tiles(draw, high=False):
    T = draw(st.integers(1, 48))
    W = draw(st.integers(1, 160))
    alphabet = draw(alphabets)
    a = draw(st.lists(st.sampled_from(alphabet), min_size=W, max_size=W))
    if draw(st.booleans()) and T <= W:
        b = list(a[:T])
        for i in draw(st.lists(st.integers(0, T - 1), max_size=T // 4)):
            b[i] = draw(st.sampled_from(alphabet))
    else:
        b = draw(st.lists(st.sampled_from(alphabet), min_size=T, max_size=T))
    scoring = draw(st.sampled_from(SCORINGS))
    if not high and draw(st.booleans()):
        top_h, top_f = edge_top(W)
        left_h, left_e = edge_left(T)
    else:
        level = draw(st.sampled_from([30_000, 60_000, 300_000])) if high else \
            draw(st.integers(0, 200))
        steps = st.integers(-scoring.gap_open - scoring.gap_extend, scoring.match)
        top_h = np.maximum(0, level + np.cumsum(draw(st.lists(steps, min_size=W + 1,
                                                              max_size=W + 1))))
        left_h = np.maximum(0, top_h[0] + np.cumsum(draw(st.lists(steps, min_size=T,
                                                                  max_size=T))))
        top_f = top_h[1:] - draw(st.integers(0, 30))
        left_e = left_h - draw(st.integers(0, 30))
        if draw(st.booleans()):
            top_f[:] = NEG
    row0 = draw(st.integers(0, 10**6))
    col0 = draw(st.integers(0, 10**6))
    return a, b, top_h, top_f, left_h, left_e, row0, col0, scoring


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tiles())
def test_tile_equals_oracle(build, case):
    check_tile(*case, build)


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tiles(high=True))
def test_tile_with_high_borders_equals_oracle(build, case):
    """Borders far above 32,767: the int16 build must rebase or fall back, and stay exact."""
    check_tile(*case, build)


def test_int16_rebases_instead_of_falling_back():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 4, 300).tolist()
    b = a[:200]
    top_h = 50_000 + np.arange(301)
    left_h = 50_000 + np.arange(200)
    got = check_tile(a, b, top_h, top_h[1:] - 5, left_h, left_h - 5, 0, 0, Scoring(),
                     "int16")
    assert got.fallback_steps == 0 and got.score > 32_767


def test_int16_falls_back_to_int32_when_bounds_fail():
    """match 1000: neither plain nor rebased int16 can hold a sub-tile, so int32 runs."""
    rng = np.random.default_rng(6)
    a = rng.integers(0, 4, 200).tolist()
    b = a[:150]
    top_h, top_f = edge_top(200)
    left_h, left_e = edge_left(150)
    got = check_tile(a, b, top_h, top_f, left_h, left_e, 0, 0, Scoring(1000, -1000, 1000, 1),
                     "int16")
    assert got.fallback_steps > 0 and got.score == 150_000


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 300), m=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       similar=st.booleans(), threads=st.sampled_from([1, 2]))
def test_align_equals_oracle(build, n, m, seed, similar, threads):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, n).astype(np.uint8)
    b = a[:m].copy() if similar and m <= n else rng.integers(0, 5, m).astype(np.uint8)
    scoring = SCORINGS[seed % len(SCORINGS)]
    got = align(a, b, scoring, threads=threads, kernel=build, tile=64)
    assert (got.score, got.end_a, got.end_b) == naive_align(list(a), list(b), scoring)


def test_pruned_tile_outputs_and_strict_bound():
    a = np.zeros(10, np.uint8)
    b = np.zeros(10, np.uint8)
    top_h, top_f = edge_top(10)
    left_h, left_e = edge_left(10)
    left_h[-1] = 3
    # bound = max input (3) + match * min(10, 10) = 23
    pruned = sw_tile(a, b, top_h, top_f, left_h, left_e, best_so_far=24)
    assert pruned.pruned and pruned.score == 0
    assert pruned.bottom_h.tolist() == [3] + [0] * 10
    assert set(pruned.bottom_f.tolist()) == {NEG} and set(pruned.right_e.tolist()) == {NEG}
    assert pruned.right_h.tolist() == [0] * 10
    kept = sw_tile(a, b, top_h, top_f, left_h, left_e, best_so_far=23)
    assert not kept.pruned and kept.score == 20


def test_bad_borders_are_clear_errors():
    a = np.zeros(4, np.uint8)
    with pytest.raises(ValueError, match="top_h must hold 5 values"):
        sw_tile(a, a, np.zeros(4), np.zeros(4), np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match=">= 0"):
        sw_tile(a, a, -np.ones(5), np.zeros(4), np.zeros(4), np.zeros(4))



def parasail_matrix(scoring: Scoring):
    matrix = parasail.matrix_create("ACGTN", scoring.match, scoring.mismatch)
    for other in (4, 5):
        for k in range(6):
            matrix.set_value(other, k, scoring.mismatch)
            matrix.set_value(k, other, scoring.mismatch)
    return matrix


@pytest.mark.parametrize("seed", range(4))
def test_larger_pairs_agree_with_parasail(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1500, 3000))
    a = "".join(rng.choice(list("ACGT"), n))
    b = list(a[: n - 200])
    for i in rng.choice(len(b), len(b) // 8, replace=False):
        b[i] = "ACGTN"[rng.integers(0, 5)]
    b = "".join(b) if seed % 2 else "".join(rng.choice(list("ACGTN"), n - 100))
    scoring = Scoring()
    ref = parasail.sw_striped_32(a, b, scoring.gap_open, scoring.gap_extend,
                                 parasail_matrix(scoring))
    for build in BUILDS:
        for threads in (1, 2):
            got = align(a, b, scoring, threads=threads, kernel=build, tile=700)
            assert (got.score, got.end_a, got.end_b) == (ref.score, ref.end_query,
                                                         ref.end_ref)


@pytest.mark.skipif(not kernels.has_avx2(), reason="needs AVX2 (x86-64 with 256-bit ints)")
@pytest.mark.parametrize("build,instruction", [("int32", "vpmaxsd"), ("int16", "vpmaxsw")])
def test_inner_loop_is_vectorised(tmp_path, build, instruction):
    """SLP is fragile (a changed row end once split the int16 loop into xmm halves): the
    hot loop must be AVX2 maxima on ymm registers, six per step, 2x unrolled."""
    asm = kernels.kernel_asm(build, tmp_path)
    assert asm.count(f"{instruction}\t%ymm") >= 6, f"{build} kernel lost its vectorisation"


def test_build_id_depends_on_cpu_and_source():
    source = kernels.module_source("int32")
    bid = kernels.build_id("int32", source)
    assert bid.startswith("int32-") and bid != kernels.build_id("int32", source + "#")
    assert kernels.build_id("int16", kernels.module_source("int16")) != bid


def test_loaded_builds_live_under_their_build_id(compiled):
    """Each build is the cached file of its own build id, and its self-check ran. Its speed is
    not asserted here (a busy test machine is not a slow kernel): test_inner_loop_is_vectorised
    counts the vector instructions, and bench/kernel.py reports the self-check's GCUPS against
    kernels.SELF_CHECK_GCUPS."""
    for name, build in compiled.items():
        assert build.name == name and build.lanes == build.module.LANES
        assert build.path.exists() and build.build_id in str(build.path)
        assert build.self_check_gcups > 0


def test_entry_point_json(tmp_path):
    fa = tmp_path / "a.fa"
    fb = tmp_path / "b.fa"
    fa.write_text(">qa first\nACGTACGTNNacgtacgt\nACGTAAAA\n")
    fb.write_text(">other\nTTTT\n>rb\nGGACGTACGTACGTACGTCC\n")
    out = subprocess.run([sys.executable, "-m", "worker.sw", str(fa), str(fb), "--record-b",
                          "rb", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    exp = naive_align(*[list(encode(s)) for s in ("ACGTACGTNNacgtacgtACGTAAAA",
                                                 "GGACGTACGTACGTACGTCC")], Scoring())
    assert (got["score"], got["end_a"], got["end_b"]) == exp
    assert got["cells"] == 26 * 20 and got["threads"] == 1 and got["seconds"] >= 0
    assert set(got) == {"score", "end_a", "end_b", "cells", "seconds", "gcups", "threads"}


@pytest.mark.parametrize("args,message", [
    (["--match", "0"], "match must be between 1"),
    (["--record-a", "nope"], "no record named 'nope'"),
])
def test_entry_point_errors(tmp_path, args, message):
    fa = tmp_path / "a.fa"
    fa.write_text(">x\nACGT\n")
    out = subprocess.run([sys.executable, "-m", "worker.sw", str(fa), str(fa), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_entry_point_bad_letter(tmp_path):
    fa = tmp_path / "a.fa"
    fa.write_text(">x\nACGT*A\n")
    out = subprocess.run([sys.executable, "-m", "worker.sw", str(fa), str(fa)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "invalid character '*' at position 4" in out.stderr
