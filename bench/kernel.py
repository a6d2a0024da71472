#!/usr/bin/env python3
"""Smith-Waterman kernel benchmark: our int16 / int32 kernels against parasail.

Run from the repository root (compiled kernels are cached under $CLUSTER_SW_CACHE; the first
compile takes ~35 s and is not timed)::

    CLUSTER_SW_CACHE=/tmp/swcache .venv/bin/python bench/kernel.py            # full run, writes bench/results/kernel.json
    CLUSTER_SW_CACHE=/tmp/swcache .venv/bin/python bench/kernel.py --quick    # under a minute
    .venv/bin/python bench/kernel.py --json /tmp/k.json --reps 5

Pairs (A = query = parasail s1, B = reference = parasail s2):

* ``random20k``: 20,000 seeded random bases (seed 12345); B is A with 10% substitutions and
  indels at 0.5% per base (lengths 1-6). ``--quick``: ``random8k``, 8,000 bases.
* ``lastz``: pseudocat x pseudopig2, whole sequences (18,803 x 22,929).
* ``hpylori100k``: the first 100,000 bases of each H. pylori genome (1e10 cells); not in ``--quick``.

Variants, measured side by side in one run: ours int32 and int16 on 1 and 2 threads
(``worker.sw.align``; its seconds exclude the JIT compile, the kernels are loaded first), and
parasail ``sw_striped_32``, ``sw_striped_16`` and ``sw_scan_32`` (the whole call timed, profile
build included). Scoring: match 2, mismatch -3, gap open 5, gap extend 2; parasail's matrix is
built on "ACGTN" with the N and '*' rows/columns set to the mismatch score, so that it scores
exactly like ours. Sequences are upper-cased once and the same strings go to both.

One-thread variants run with the process pinned to CPU 0 (``sched_setaffinity``, inherited by
the threads ``align`` starts); two-thread variants with the affinity the process started with.
Each timing is the median of R repeats (default 3, ``--quick`` 1), the variants interleaved per
repeat, after one unrecorded warm-up call of every variant on a 2,000 x 2,000 pair. Every row is checked against parasail ``sw_striped_32`` (score and both end positions);
a parasail 16-bit row whose ``result.saturated`` is set is marked ``saturated`` and not counted
as a disagreement (parasail 1.3.4's sw_striped_16 is biased: it returns exact scores up to 65534
and saturates at 65535, not at 32767). The exit code is 1 if any of our variants disagrees.

Also measured, once per run (best of 3, wall and CPU seconds): each build's self-check (the
GCUPS ``kernels.load`` measures, against its floor ``kernels.SELF_CHECK_GCUPS``, below which a
build with AVX2 is taken to be de-vectorized), and the traceback's pieces: ``boxdp.global_traceback``
of a 2,048 x 2,048 box, and ``cigar.rescore`` / ``cigar.stats`` of a 2,000,000-column alignment
(tests/unit/test_boxdp.py and test_cigar.py check these for correctness, not speed).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
# first, even when an editable install lists ROOT already: run as `python bench/X.py`, sys.path
# starts with bench/, where storage.py would shadow the storage package
sys.path.insert(0, str(ROOT))

import parasail  # noqa: E402

from bench import machine  # noqa: E402
from bench.data import ensure_data, read_fasta  # noqa: E402
from worker.sw import Scoring, align, encode  # noqa: E402
from worker.sw import kernels  # noqa: E402

SEED = 12345
SCORING = Scoring(match=2, mismatch=-3, gap_open=5, gap_extend=2)
REFERENCE = "parasail sw_striped_32"
LETTERS = "ACGTN"

# (name, kind, kernel or parasail function, threads)
VARIANTS = (
    ("ours int32 1T", "ours", "int32", 1),
    ("ours int16 1T", "ours", "int16", 1),
    ("ours int16 2T", "ours", "int16", 2),
    ("ours int32 2T", "ours", "int32", 2),
    ("parasail sw_striped_32", "parasail", "sw_striped_32", 1),
    ("parasail sw_striped_16", "parasail", "sw_striped_16", 1),
    ("parasail sw_scan_32", "parasail", "sw_scan_32", 1),
)


# ---- data ------------------------------------------------------------------------------------


def make_pair(n: int, seed: int = SEED, sub: float = 0.10, indel: float = 0.005,
              max_indel: int = 6) -> tuple[str, str]:
    """A: ``n`` random bases; B: A with ``sub`` substitutions (always to another base) and,
    per base, an indel with probability ``indel`` (insertion or deletion, length 1..max_indel)."""
    rng = random.Random(seed)
    a = "".join(rng.choice("ACGT") for _ in range(n))
    out: list[str] = []
    i = 0
    while i < n:
        if rng.random() < indel:
            k = rng.randint(1, max_indel)
            if rng.random() < 0.5:  # insertion before a[i]
                out.append("".join(rng.choice("ACGT") for _ in range(k)))
            else:  # deletion of a[i:i+k]
                i += k
                continue
        c = a[i]
        if rng.random() < sub:
            c = rng.choice([x for x in "ACGT" if x != c])
        out.append(c)
        i += 1
    return a, "".join(out)


def load_pairs(quick: bool) -> list[tuple[str, str, str]]:
    n = 8_000 if quick else 20_000
    a, b = make_pair(n)
    pairs = [(f"random{n // 1000}k", a, b)]
    paths = ensure_data()
    pairs.append(("lastz", read_fasta(paths["pseudocat"])[1].upper(),
                   read_fasta(paths["pseudopig2"])[1].upper()))
    if not quick:
        pairs.append(("hpylori100k", read_fasta(paths["hpylori_a"])[1][:100_000].upper(),
                      read_fasta(paths["hpylori_b"])[1][:100_000].upper()))
    return pairs


# ---- parasail --------------------------------------------------------------------------------


def parasail_matrix(scoring: Scoring):
    """ACGTN matrix where N and '*' (index 4 and 5) score as a mismatch against everything
    (parasail's stock matrix scores N/N as a match and '*' as 0): the same idea as
    tests/unit/test_sw_naive.py."""
    matrix = parasail.matrix_create(LETTERS, scoring.match, scoring.mismatch)
    for other in (4, 5):
        for k in range(matrix.size):
            matrix.set_value(other, k, scoring.mismatch)
            matrix.set_value(k, other, scoring.mismatch)
    return matrix


# ---- measuring -------------------------------------------------------------------------------


def make_runner(kind: str, what: str, threads: int, a: str, b: str, a_codes, b_codes,
                matrix) -> Callable[[], dict]:
    if kind == "ours":
        def run() -> dict:
            r = align(a_codes, b_codes, SCORING, threads=threads, kernel=what)
            return {"score": r.score, "end_a": r.end_a, "end_b": r.end_b, "seconds": r.seconds,
                    "fallback_steps": r.fallback_steps, "tiles_pruned": r.tiles_pruned,
                    "threads_reported": r.threads, "kernel_reported": r.kernel}
        return run

    fn = getattr(parasail, what)

    def run() -> dict:
        t0 = time.perf_counter()
        r = fn(a, b, SCORING.gap_open, SCORING.gap_extend, matrix)
        seconds = time.perf_counter() - t0
        sat = getattr(r, "saturated", None)
        if sat is None:
            sat = what.endswith("_16") and r.score >= 65535  # biased 16-bit: saturates here
        return {"score": int(r.score), "end_a": int(r.end_query), "end_b": int(r.end_ref),
                "seconds": seconds, "saturated": bool(sat)}
    return run


def pin(threads: int, all_cpus: set[int]) -> set[int]:
    """One thread: CPU 0 only (the lowest usable CPU); more: the starting affinity."""
    cpus = {min(all_cpus)} if threads == 1 else set(all_cpus)
    os.sched_setaffinity(0, cpus)
    return cpus


def bench_pair(name: str, a: str, b: str, reps: int, matrix, all_cpus: set[int],
               log: Callable[[str], None]) -> list[dict]:
    a_codes, b_codes = encode(a, "query (A)"), encode(b, "reference (B)")
    runners = {v[0]: make_runner(v[1], v[2], v[3], a, b, a_codes, b_codes, matrix)
               for v in VARIANTS}
    trials: dict[str, list[dict]] = {v[0]: [] for v in VARIANTS}
    cpus_used: dict[str, list[int]] = {}
    try:
        for rep in range(reps):
            for vname, _, _, threads in VARIANTS:
                cpus_used[vname] = sorted(pin(threads, all_cpus))
                trials[vname].append(runners[vname]())
            log(f"  {name}: repeat {rep + 1}/{reps} done")
    finally:
        os.sched_setaffinity(0, all_cpus)

    cells = len(a) * len(b)
    rows = []
    for vname, kind, what, threads in VARIANTS:
        ts = trials[vname]
        results = {(t["score"], t["end_a"], t["end_b"]) for t in ts}
        secs = [t["seconds"] for t in ts]
        med = statistics.median(secs)
        first = ts[0]
        row: dict[str, Any] = {
            "pair": name, "len_a": len(a), "len_b": len(b), "variant": vname, "kind": kind,
            "function": what, "threads": threads, "cpus": cpus_used[vname], "cells": cells,
            "seconds": med, "seconds_trials": secs, "gcups": cells / med / 1e9,
            "score": first["score"], "end_a": first["end_a"], "end_b": first["end_b"],
            "stable_across_repeats": len(results) == 1,
        }
        if kind == "ours":
            row["fallback_steps"] = first["fallback_steps"]
            row["tiles_pruned"] = first["tiles_pruned"]
        else:
            row["saturated"] = any(t["saturated"] for t in ts)
        rows.append(row)

    ref = next(r for r in rows if r["variant"] == REFERENCE)
    for r in rows:
        if r.get("saturated"):
            r["agrees_with_parasail_sw_striped_32"] = None  # saturated: not comparable
        else:
            r["agrees_with_parasail_sw_striped_32"] = (
                r["stable_across_repeats"]
                and (r["score"], r["end_a"], r["end_b"]) == (ref["score"], ref["end_a"], ref["end_b"]))
    for r in rows:
        agree = r["agrees_with_parasail_sw_striped_32"]
        log(f"    {r['variant']:24s} {r['seconds']:9.4f} s {r['gcups']:7.2f} GCUPS  score "
            f"{r['score']} end ({r['end_a']}, {r['end_b']})  "
            f"{'saturated' if agree is None else ('agrees' if agree else 'DISAGREES')}")
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Speed ratios per pair (GCUPS of the first over GCUPS of the second, >1: first faster)."""
    out = []
    by = {(r["pair"], r["variant"]): r for r in rows}
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    specs = (
        ("ours int32 1T / parasail striped_32", "ours int32 1T", "parasail sw_striped_32"),
        ("ours int16 1T / parasail striped_16", "ours int16 1T", "parasail sw_striped_16"),
        ("ours int16 2T / 1T", "ours int16 2T", "ours int16 1T"),
        ("ours int32 2T / 1T", "ours int32 2T", "ours int32 1T"),
    )
    for pair in pairs:
        for label, num, den in specs:
            n, d = by[(pair, num)], by[(pair, den)]
            entry = {"pair": pair, "ratio": label, "value": n["gcups"] / d["gcups"]}
            if d.get("saturated"):
                entry["note"] = "parasail 16-bit saturated"
            out.append(entry)
    return out


def best_of(reps: int, fn: Callable[[], Any]) -> dict:
    """Best wall and CPU (this thread's) seconds of ``reps`` calls of ``fn``."""
    wall = cpu = float("inf")
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.thread_time() - c0)
    return {"wall_s": wall, "cpu_s": cpu}


def bench_pieces(reps: int = 3) -> dict:
    """The traceback's pieces on one thread: a 2,048 x 2,048 box of ``boxdp.global_traceback``
    (G cells/s) and ``cigar.rescore`` + ``cigar.stats`` of 2,000,000 columns (M columns/s)."""
    import numpy as np

    from worker.sw import boxdp, cigar

    rng = np.random.default_rng(1)
    n = 2048
    a, b = (rng.integers(0, 4, n).astype(np.uint8) for _ in range(2))
    boxdp.global_traceback(a[:16], b[:16], SCORING)  # compiled or loaded from the cache
    box = best_of(reps, lambda: boxdp.global_traceback(a, b, SCORING))
    box.update(cells=n * n, gcells_per_s=n * n / box["wall_s"] / 1e9)

    columns = 2_000_000
    ops = rng.choice(4, size=columns, p=[0.85, 0.1, 0.025, 0.025]).astype(np.uint8)
    in_a, in_b = cigar.consumed(ops)
    qa = rng.integers(0, 4, int(in_a.sum()), dtype=np.uint8)
    qb = rng.integers(0, 4, int(in_b.sum()), dtype=np.uint8)
    pa, pb = np.cumsum(in_a) - 1, np.cumsum(in_b) - 1
    qb[pb[ops == 0]] = qa[pa[ops == 0]]  # '=' columns match, 'X' columns do not
    qb[pb[ops == 1]] = (qa[pa[ops == 1]] + 1) % 4
    rescore = best_of(reps, lambda: (cigar.rescore(ops, qa, qb, 0, 0, SCORING), cigar.stats(ops)))
    rescore.update(columns=columns, mcolumns_per_s=columns / rescore["wall_s"] / 1e6)
    return {"boxdp_global_traceback": box, "cigar_rescore_and_stats": rescore}


# ---- report ----------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return [f for f in line.split(":", 1)[1].split()
                        if f.startswith(("avx", "sse4", "fma"))]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    import numba

    info = machine.machine_info(numba=numba.__version__,
                                parasail=getattr(parasail, "__version__", "?"))
    info["cpu_simd_flags"] = cpu_flags()
    return info


def fmt_agree(r: dict) -> str:
    a = r["agrees_with_parasail_sw_striped_32"]
    return "saturated" if a is None else ("yes" if a else "NO")


COLUMNS = ("pair", "len_a", "len_b", "variant", "thr", "cells", "seconds", "GCUPS", "score",
           "end_a", "end_b", "agrees s32", "fallback")


def row_cells(r: dict) -> list[str]:
    return [r["pair"], f"{r['len_a']:,}", f"{r['len_b']:,}", r["variant"], str(r["threads"]),
            f"{r['cells']:.3g}", f"{r['seconds']:.4f}", f"{r['gcups']:.2f}", str(r["score"]),
            str(r["end_a"]), str(r["end_b"]), fmt_agree(r),
            str(r["fallback_steps"]) if "fallback_steps" in r else "-"]


def print_report(res: dict) -> None:
    m = res["machine"]
    head = (f"SW kernel benchmark {m['date']}  {m['nproc']} cpus ({m['cpu']}), Python "
            f"{m['python']}, numba {m['numba']}, parasail {m['parasail']}, reps "
            f"{res['config']['reps']}{' (quick)' if res['config']['quick'] else ''}")
    title = "Smith-Waterman, match 2 / mismatch -3 / gap open 5 / extend 2 (median seconds)"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        con = Console(width=max(160, Console().width))
        out = con.print
        out(head)
        t = Table(title=title)
        for c in COLUMNS:
            t.add_column(c, justify="left" if c in ("pair", "variant") else "right")
        prev = None
        for r in res["rows"]:
            if prev is not None and r["pair"] != prev:
                t.add_section()
            prev = r["pair"]
            t.add_row(*row_cells(r))
        out(t)
    else:
        out = print
        out(head)
        out(title)
        cells = [list(COLUMNS)] + [row_cells(r) for r in res["rows"]]
        w = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        for c in cells:
            out("  ".join(x.ljust(w[i]) if i in (0, 3) else x.rjust(w[i]) for i, x in enumerate(c)))
    out("Speed ratios (GCUPS / GCUPS, > 1: the first is faster):")
    for e in res["ratios"]:
        note = f"  ({e['note']})" if "note" in e else ""
        out(f"  {e['pair']:12s} {e['ratio']:38s} {e['value']:6.2f}x{note}")
    k = res["kernels"]
    out("kernel builds: " + ", ".join(
        f"{n} (load {b['compile_seconds']:.1f} s, self-check {b['self_check_gcups']:.1f} GCUPS, "
        f"floor {b['self_check_floor_gcups']:.1f}{'' if b['self_check_passed'] else ': BELOW THE FLOOR'})"
        for n, b in k.items()))
    pc = res["pieces"]
    box, rs = pc["boxdp_global_traceback"], pc["cigar_rescore_and_stats"]
    out(f"traceback pieces: boxdp 2,048 x 2,048 {box['wall_s'] * 1e3:.1f} ms ({box['gcells_per_s']:.3f} G cells/s, "
        f"CPU {box['cpu_s'] * 1e3:.1f} ms); cigar rescore + stats of {rs['columns']:,} columns "
        f"{rs['wall_s'] * 1e3:.0f} ms ({rs['mcolumns_per_s']:.1f} M columns/s)")
    shares = m.get("cpu_shares_during_run")
    if shares:
        out(f"CPU during the run: busy {shares['busy']:.0%}, idle {shares['idle']:.0%}, "
            f"steal {shares['steal']:.0%}")
    bad = res["disagreements"]
    out(f"agreement with {REFERENCE}: " + ("all of ours agree" if not bad else
                                           "DISAGREE: " + ", ".join(bad)))
    out(f"total {res['elapsed_s']:.1f} s; results in {res['json_path']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="random 8k instead of 20k, no hpylori100k, one repeat (whole run < 60 s)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "kernel.json"),
                    help="where to write the results")
    ap.add_argument("--reps", type=int, default=None, help="repeats per variant (default 3, --quick 1)")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.perf_counter()
    all_cpus = set(os.sched_getaffinity(0))
    res: dict[str, Any] = {"machine": machine_info()}
    cpu_before = machine.cpu_times()
    log("loading kernels (compile or cache) …")
    res["kernels"] = {}
    for name in ("int32", "int16"):
        b = kernels.load(name)
        floor = kernels.SELF_CHECK_GCUPS[name]
        res["kernels"][name] = {"build_id": b.build_id, "lanes": b.lanes,
                                "compile_seconds": b.compile_seconds,
                                "self_check_gcups": b.self_check_gcups,
                                "self_check_floor_gcups": floor,
                                "self_check_passed": b.self_check_gcups >= floor or not kernels.has_avx2()}
    log("the traceback's pieces (boxdp 2,048 x 2,048; cigar rescore of 2M columns) …")
    res["pieces"] = bench_pieces()
    res["machine"]["avx2"] = kernels.has_avx2()
    res["machine"]["sw_cache"] = str(kernels.cache_root())
    pairs = load_pairs(args.quick)
    res["config"] = {
        "quick": args.quick, "reps": reps, "seed": SEED,
        "scoring": {"match": SCORING.match, "mismatch": SCORING.mismatch,
                    "gap_open": SCORING.gap_open, "gap_extend": SCORING.gap_extend},
        "random_pair": {"substitutions": 0.10, "indel_per_base": 0.005, "indel_lengths": "1-6"},
        "pairs": {n: [len(a), len(b)] for n, a, b in pairs},
        "variants": [{"variant": v[0], "kind": v[1], "function": v[2], "threads": v[3]}
                     for v in VARIANTS],
        "pinning": "1 thread: sched_setaffinity to the lowest usable CPU; 2 threads: all usable CPUs",
        "parasail_matrix": "ACGTN, N and '*' rows/columns = mismatch",
        "parasail_timing": "whole call (profile build included)",
        "ours_timing": "Alignment.seconds (compile excluded)",
        "reference": REFERENCE,
    }
    matrix = parasail_matrix(SCORING)
    log("warm-up: every variant once on a 2,000 x 2,000 pair (not recorded) …")
    wa, wb = make_pair(2_000, seed=SEED + 1)
    bench_pair("warmup", wa, wb, 1, matrix, all_cpus, lambda _text: None)
    rows: list[dict] = []
    for name, a, b in pairs:
        log(f"{name}: {len(a):,} x {len(b):,} = {len(a) * len(b):.3g} cells, {reps} repeat(s) …")
        rows.extend(bench_pair(name, a, b, reps, matrix, all_cpus, log))
    res["rows"] = rows
    res["ratios"] = ratios(rows)
    res["disagreements"] = [f"{r['pair']}/{r['variant']}" for r in rows
                            if r["kind"] == "ours" and not r["agrees_with_parasail_sw_striped_32"]]
    res["parasail_disagreements"] = [
        f"{r['pair']}/{r['variant']}" for r in rows
        if r["kind"] == "parasail" and r["agrees_with_parasail_sw_striped_32"] is False]
    res["all_ours_agree"] = not res["disagreements"]
    machine.finish(res, cpu_before, started, args.json)
    print_report(res)
    return 0 if res["all_ours_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
