#!/usr/bin/env python3
"""Alignment benchmark (issue 8): the H. pylori pair through the whole local cluster against the
raw single-machine kernel on the same cores, and against parasail on one core, in one run.

Run from the repository root (compiled kernels are cached under $CLUSTER_SW_CACHE, else
~/.cache/cluster/sw; a cold cache costs each process ~35 s before anything is timed)::

    .venv/bin/python bench/align.py                  # whole genomes, ~10 min; writes bench/results/align.json
    .venv/bin/python bench/align.py --tile 0 --tile 65536 --tile 131072   # three tile sizes (0: default), ~17 min
    .venv/bin/python bench/align.py --quick          # 200 kbp prefixes, under a minute
    .venv/bin/python bench/align.py --prefix 500000 --tile 65536 --tile 131072 --json /tmp/a.json

What runs, all on this machine:

* **The cluster**: 3 masters, 2 storage nodes, the balancer pair and ONE worker of 2 slots
  (``cluster.local``, ``--no-mount``), on 127.0.0.1. A warm-up job (pseudocat x pseudopig2, not
  timed) lets each slot process load the kernels first, as ``python -m worker.sw`` loads them
  before its clock starts. Then ``cluster.align.submit_alignment(client, read_pair(A, B),
  slots=2)`` (its default tile, or each ``--tile``) and ``wait``: the seconds are the job's
  ``submitted_at`` -> ``finished_at`` (the upload of both sequences comes before and is not
  counted). Cells are the job's reduced sum (the whole matrix: pruned tiles count, as in
  CUDAlign's GCUPS). A watch on the job's endings records every tile's summary (``pruned``,
  ``cells``, ``wall_s``, ``cpu_s`` in its slot) and when it ended; a sample of task views gives
  the attempts' ``assigned_at``/``ended_at``. (The last tile is folded away as it ends: its
  summary is the job's reduced best when it holds the best cell, else its time is bounded by
  its inputs' endings and the job's end, ``last_tile_time_estimated``.)
* **The raw kernel**: ``python -m worker.sw A.fa B.fa --threads 2 --json`` (a subprocess, on the
  same 2 cores, while the cluster idles); its ``seconds`` exclude the kernel load.
  Efficiency = cluster GCUPS / raw GCUPS on the same pair. Both answers (score, end_a, end_b)
  must be identical; the run fails (exit 1, after writing the JSON) if they are not.
* **parasail** ``sw_striped_32`` (match 2, mismatch -3, open 5, extend 2; the ACGTN matrix of
  bench/kernel.py; the whole call timed, profile build included) on the first 200 kbp of each
  genome, pinned to one CPU. Speed-up = our cluster's GCUPS / parasail's on that pair; its answer
  must be ours too.

Pairs: the first ``--parasail-prefix`` (200,000) letters of each genome, and the efficiency pair:
the whole genomes (1,578,824 x 1,709,911), or the first ``--prefix`` letters of each (``--quick``:
the 200 kbp pair does both). Repeats: ``--reps`` (default 3 on pairs under 1e11 cells, 1 above;
``--quick`` 1), cluster and raw interleaved (their order swapped every other repeat); medians.

The traceback (issue 9; bench/traceback_figures.py): after the default tile's score pass,
``cluster.trace.traceback`` runs stages 2-5 on the cluster (crosspoints, boxes, join and
re-scoring); its seconds are reported as a fraction of that score pass (goal <= 25%), with the
special rows' disk. Every score pass keeps special rows (``--rows-budget``, the CLI's default);
one more run of the default tile without them (``cluster (no rows)``) shows what keeping them
costs the score pass.

Where the cluster's time goes (per cluster run, ``losses``): the slots' busy share
(sum of the tiles' ``wall_s`` / (2 x seconds)); the wavefront's own bound, a list-scheduling
replay of the measured tile times on 2 slots with zero overhead (ramp-up, ramp-down, uneven
tiles); the rest is the cluster's per-task cost (dispatch, fetching inputs and storing each
boundary with 2 replicas, commits) and the CPU its other processes take from the 2 cores
(``cpu_by_role``, from /proc). This VM is shared: every run records the share of the CPUs
that processes not ours used meanwhile (``others_cpu_share``), and the efficiency is also given
per CPU second of all our processes (``cpu_efficiency``), which that noise blurs less (and
which idle slots do not lower). The 5 Mbp estimate divides 5e6 x 5e6 cells (and CUDAlign 2.1's
pair, 5,227,293 x 5,228,663) by the measured whole-genome GCUPS; its pruning rate is that pair's,
not this one's.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
# first, even when an editable install lists ROOT already: run as `python bench/X.py`, sys.path
# starts with bench/, where storage.py would shadow the storage package
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bench import machine  # noqa: E402
from bench import traceback_figures as trace_bench  # noqa: E402
from bench.data import ensure_data, read_fasta  # noqa: E402
from cluster import __version__  # noqa: E402
from cluster.align import ROWS_BUDGET, answer, read_pair, submit_alignment, tile_size, wait  # noqa: E402
from cluster.client import Client  # noqa: E402
from cluster.node.config import load_cluster_config  # noqa: E402
from cluster.local import balancer_nodes, master_nodes, start_all, stop_all, storage_nodes, worker_nodes  # noqa: E402
from cluster.node.status import query_status  # noqa: E402
from proto import Codec, new_node_id  # noqa: E402
from proto.messages import NotLeader, QueryReply, Watch  # noqa: E402

SLOTS = 2
SCORING = {"match": 2, "mismatch": -3, "gap_open": 5, "gap_extend": 2}
PARASAIL_PREFIX = 200_000
QUICK_PREFIX = 200_000
TASK_VIEW_SAMPLE = 400  # task views asked for per cluster run (attempts' timestamps), at most
FIVE_MBP = 5_000_000
# CUDAlign 2.1 (block pruning, TPDS 2013), 1x GTX 560 Ti, from the README of
# github.com/edanssandes/MASA-CUDAlign.
CUDALIGN = {"system": "CUDAlign 2.1 (block pruning, TPDS 2013)", "hardware": "1x NVIDIA GTX 560 Ti",
            "pair": "AE016879.1 x AE017225.1 (B. anthracis Ames x Sterne)", "len_a": 5_227_293,
            "len_b": 5_228_663, "seconds": 9 * 60 + 18, "gcups": 49.0}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- pairs -----------------------------------------------------------------------------------------


def make_pairs(work: Path, prefix: int | None, parasail_prefix: int, quick: bool) -> list[dict]:
    """The pairs to run, each written as two FASTA files under ``work``: the parasail prefix pair
    and the efficiency pair (whole genomes, or ``prefix`` letters of each)."""
    paths = ensure_data()
    (name_a, a), (name_b, b) = read_fasta(paths["hpylori_a"]), read_fasta(paths["hpylori_b"])
    a, b = a.upper(), b.upper()
    eff = QUICK_PREFIX if quick and prefix is None else prefix
    wanted = [(parasail_prefix, True)]
    if eff != parasail_prefix:
        wanted.append((eff, False))
    pairs = []
    for n, with_parasail in wanted:
        whole = n is None or n >= max(len(a), len(b))
        label = "hpylori" if whole else f"hpylori{n // 1000}k"
        sa, sb = (a, b) if whole else (a[:n], b[:n])
        if whole:  # the genomes' own files
            fa, fb = paths["hpylori_a"], paths["hpylori_b"]
        else:
            fa, fb = work / f"{label}_a.fa", work / f"{label}_b.fa"
            fa.write_text(f">{name_a.split()[0]}\n{sa}\n")
            fb.write_text(f">{name_b.split()[0]}\n{sb}\n")
        pairs.append({"pair": label, "len_a": len(sa), "len_b": len(sb), "fasta_a": fa, "fasta_b": fb,
                      "a": sa, "b": sb, "parasail": with_parasail, "efficiency": n == eff or quick})
    return pairs


# ---- the cluster -----------------------------------------------------------------------------------


def plan_cluster(work: Path) -> tuple[list, dict[str, list], Path]:
    """The nodes (not started): 3 masters, 2 storage nodes, the balancer pair, one worker of 2
    slots; their roles; and the cluster config they share."""
    masters = master_nodes(work, 3)
    _, storage = storage_nodes(work, 2, masters=masters)
    config_path, balancers = balancer_nodes(work, 2)
    workers = worker_nodes(work, config_path, 1, slots=SLOTS, mount=False)
    roles = {"masters": masters, "storage": storage, "balancers": balancers, "worker": workers}
    return masters + storage + balancers + workers, roles, config_path


def connect(config_path: Path, balancers: list, timeout: float = 60.0) -> Client:
    """A client, once the active balancer lists the worker and a master leader serves."""
    config = load_cluster_config(config_path)
    client = Client(list(config.masters.values()), storage=config.storage_nodes,
                    replicas=config.storage.replicas, timeout=60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _worker_registered(balancers) and not client.lookup_files([]).stale:
            return client
        time.sleep(0.05)  # polling other processes' status: nothing to wait on
    client.close()
    raise TimeoutError(f"the cluster did not come up within {timeout:g} s (logs in {config_path.parent})")


def _worker_registered(balancers: list) -> bool:
    for b in balancers:
        if b.process is None or b.process.poll() is not None:
            continue
        r = query_status([b.address], timeout=0.5)[0].reply
        if r is not None and r.detail.get("state") == "active" and r.detail.get("registry", {}).get("workers", 0) >= 1:
            return True
    return False


def _cpu_s(pid: int) -> float:
    """utime + stime of one process (seconds), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def cpu_by_role(roles: dict[str, list]) -> dict[str, dict[int, float]]:
    """CPU seconds so far of every node process by role; the worker's slot processes apart."""
    out: dict[str, dict[int, float]] = {}
    for role, nodes in roles.items():
        out[role] = {n.pid: _cpu_s(n.pid) for n in nodes if n.pid}
    out["slots"] = {c: _cpu_s(c) for w in roles["worker"] if w.pid for c in _children(w.pid)}
    return out


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far, all CPUs (idle, iowait and steal left out)."""
    t = machine.cpu_times() or [0] * 8
    return (sum(t[:8]) - t[3] - t[4] - t[7]) / os.sysconf("SC_CLK_TCK")


def others_share(busy_before: float, ours_s: float, wall_s: float) -> float:
    """The share of the machine's CPUs that processes not ours used over ``wall_s`` (other
    sessions' work on this shared VM: a run with a large share was slowed by them)."""
    return max(0.0, machine_busy_s() - busy_before - ours_s) / ((os.cpu_count() or 1) * wall_s)


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    return {role: round(sum(v - before.get(role, {}).get(pid, 0.0) for pid, v in after[role].items()), 3)
            for role in after}


# ---- watching the tiles ----------------------------------------------------------------------------


class TileWatch(threading.Thread):
    """Records each tile's ending (summary, and when this process heard of it) from the masters'
    WATCH long poll on one job, and asks for a sample of task views (attempts' timestamps) while
    the tiles are still in the ledger (a consumed tile is folded away)."""

    def __init__(self, masters: list[str], job: str, total: int, sample: int = TASK_VIEW_SAMPLE) -> None:
        super().__init__(name="tile-watch", daemon=True)
        self.masters, self.job, self.key = masters, job, bytes.fromhex(job)
        self.every = max(1, math.ceil(total / sample))
        self.tiles: dict[int, dict] = {}
        self.views: dict[int, dict] = {}
        self.skipped = 0
        self.error: str | None = None
        self._halt = threading.Event()

    def seen_at(self, task: int, near: float) -> float:
        """When this process heard of the tile's ending, on the ledger's clock: wall-clock seconds
        (the leader's monotonic clock plus an offset), or CLOCK_MONOTONIC in older masters; the one
        ``near`` (a ledger time of the same job) is."""
        mono, wall = self.tiles[task]["heard"]
        return wall if abs(wall - near) < abs(mono - near) else mono

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        ctx = zmq.Context()
        codec = Codec(new_node_id())
        socks = [ctx.socket(zmq.DEALER) for _ in self.masters]
        for s, address in zip(socks, self.masters):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
        views = Client(self.masters, timeout=10)
        try:
            self._loop(codec, socks, views)
        except Exception as exc:  # noqa: BLE001 - the report says the watch broke; timing stands
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            views.close()
            for s in socks:
                s.close(0)
            ctx.term()

    def _loop(self, codec: Codec, socks: list, views: Client) -> None:
        leader, cursor, rid = 0, 0, 0
        while not self._halt.is_set():
            rid += 1
            codec.send(socks[leader], Watch(rid, 500, {self.key: cursor}))
            reply = None
            deadline = time.monotonic() + 2.0
            while reply is None and time.monotonic() < deadline and not self._halt.is_set():
                if socks[leader].poll(100):
                    _, _, msg = codec.recv(socks[leader])
                    if getattr(msg, "request_id", None) == rid:
                        reply = msg
            if isinstance(reply, NotLeader) and reply.leader in self.masters:
                leader = self.masters.index(reply.leader)
                continue
            if not isinstance(reply, QueryReply):
                leader = (leader + 1) % len(socks)
                continue
            entry = (reply.value or {}).get("jobs", {}).get(self.job)
            if entry is None:
                continue
            now = (time.monotonic(), time.time())  # see seen_at
            cursor, self.skipped = entry["cursor"], self.skipped + entry.get("skipped", 0)
            for t in entry.get("tasks", []):
                self.tiles[t["task"]] = {"summary": t.get("summary"), "heard": now, "state": t.get("state")}
                if t["task"] % self.every == 0:
                    v = views.task(self.job, t["task"]).value
                    if v.get("attempts"):
                        self.views[t["task"]] = v
            if entry.get("state") != "active" and not entry.get("more"):
                return


# ---- one cluster run -------------------------------------------------------------------------------


def run_cluster(client: Client, roles: dict, pair: dict, tile: int | None, *, rows: bool = True,
                trace: bool = False) -> dict:
    """Submit the pair as one alignment job, wait, and return its answer, tiles and losses;
    ``rows``: keep special rows; ``trace``: then run the traceback (bench/traceback_figures.py)."""
    fa, fb = pair["fasta_a"], pair["fasta_b"]
    aligned = read_pair(fa, fb)
    size = (tile, tile) if tile else tile_size(pair["len_a"], pair["len_b"], SLOTS)
    cpu0, busy0, t0 = cpu_by_role(roles), machine_busy_s(), time.perf_counter()
    hooked = _WatchOnSubmit(client)
    job = submit_alignment(hooked, aligned, slots=SLOTS, tile=(tile, tile) if tile else None,
                           rows_budget=ROWS_BUDGET if rows else None)
    watch = hooked.watch
    try:
        result = wait(client, job["job"], slots=SLOTS, timeout=3600)
    finally:
        watch.join(5)
        watch.stop()
    view = client.job(job["job"]).value
    cpu = cpu_delta(cpu0, cpu_by_role(roles))
    others = others_share(busy0, sum(cpu.values()), time.perf_counter() - t0)
    assert answer(view, SLOTS)["seconds"] == result["seconds"]
    out = {"system": "cluster" if rows else "cluster (no rows)", "tile_rows": size[0], "tile_cols": size[1],
           "tile_arg": tile or "default", "special_rows_bytes": result.get("special_rows_bytes", 0),
           "grid": [job["rows"], job["cols"]], "tiles": result["tiles"], **_answer_fields(result),
           "failed_attempts": result["failed_attempts"], "cpu_by_role_s": cpu,
           "ours_cpu_s": round(sum(cpu.values()), 3),
           "others_cpu_share": round(others, 3),
           "submitted_at": view["submitted_at"], "finished_at": view["finished_at"]}
    out.update(tile_figures(job, view, watch, cpu))
    if trace:
        out["traceback"] = trace_bench.measure(client, job["job"], aligned.seq_a, aligned.seq_b, out,
                                               job["special_stride"], client.replicas)
    return out


class _WatchOnSubmit:
    """The client as ``submit_alignment`` sees it, except that the tile watch starts the moment
    the job is submitted (before the sequences' pins are moved to the job), so that it hears of
    the first tiles before they are folded away."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.watch: TileWatch | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def submit_job(self, kind: str, spec: dict[str, Any], **kw: Any):
        ref = self._client.submit_job(kind, spec, **kw)
        self.watch = TileWatch(self._client.masters, ref.job, spec["rows"] * spec["cols"])
        self.watch.start()
        return ref


def _answer_fields(r: dict) -> dict:
    return {"score": r["score"], "end_a": r["end_a"], "end_b": r["end_b"], "cells": r["cells"],
            "seconds": r["seconds"], "gcups": r["cells"] / r["seconds"] / 1e9}


def tile_figures(job: dict, view: dict, watch: TileWatch, cpu: dict) -> dict:
    """Pruning and where the time went, from the tiles the watch heard of."""
    rows, cols, total = job["rows"], job["cols"], job["rows"] * job["cols"]
    summaries = {t: x["summary"] for t, x in watch.tiles.items() if x.get("summary")}
    best = view["reduced"].get("max", {})
    if best.get("task") is not None and best["task"] not in summaries:
        summaries[best["task"]] = best["summary"]  # the last tile is folded as it ends: seen only here
    last, estimated, t0 = total - 1, False, view["submitted_at"]
    preds = [t for t in (last - cols, last - 1) if t >= 0 and t in watch.tiles]
    if last not in summaries and len(summaries) == total - 1 and preds:
        # not the best tile: its time is bounded by its inputs' endings and the job's end
        summaries[last] = {"wall_s": view["finished_at"] - max(watch.seen_at(t, t0) for t in preds),
                           "pruned": False}
        estimated = True
    seconds = view["finished_at"] - view["submitted_at"]
    pruned = [t for t, s in summaries.items() if s.get("pruned")]
    wall = {t: float(s.get("wall_s", 0.0)) for t, s in summaries.items()}
    busy = sum(wall.values())
    seen = sorted(watch.seen_at(t, t0) for t in watch.tiles)
    out: dict[str, Any] = {
        "tiles_seen": len(summaries), "tiles_missed_by_watch": total - len(summaries) + watch.skipped,
        "tiles_pruned": len(pruned), "cells_pruned_seen": sum(int(summaries[t].get("cells", 0)) for t in pruned),
        "fallback_steps": sum(int(s.get("fallback_steps", 0)) for s in summaries.values()),
        "watch_error": watch.error,
        "tiles_unseen": sorted(set(range(total)) - set(summaries))[:20],
        "last_tile_time_estimated": estimated,
    }
    if len(summaries) < total:
        return out  # a partial picture: pruning counted on what was seen, no replay
    sim = replay(rows, cols, wall, SLOTS)
    compute_busy = sum(wall[t] for t in wall if t not in pruned)
    other_cpu = sum(v for k, v in cpu.items() if k != "slots")
    out["losses"] = {
        "slot_busy_share": busy / (SLOTS * seconds),
        "tiles_wall_s": round(busy, 3), "tiles_cpu_s": round(sum(float(s.get("cpu_s", 0)) for s in summaries.values()), 3),
        "unpruned_tiles_wall_s": round(compute_busy, 3),
        "ideal_s": round(busy / SLOTS, 3), "wavefront_replay_s": round(sim, 3),
        "ramp_and_imbalance_s": round(sim - busy / SLOTS, 3), "overhead_s": round(seconds - sim, 3),
        "per_tile_idle_ms": round(1000 * (SLOTS * seconds - busy) / total, 2),
        "first_tile_seen_after_s": round(seen[0] - view["submitted_at"], 3),
        "finished_after_last_tile_s": round(view["finished_at"] - seen[-1], 3),
        "other_processes_cpu_s": round(other_cpu, 3),
        "other_processes_cpu_share": other_cpu / (SLOTS * seconds),
    }
    out["losses"].update(attempt_figures(watch, rows, cols, wall, t0))
    return out


def attempt_figures(watch: TileWatch, rows: int, cols: int, wall: dict[int, float], t0: float) -> dict:
    """From the sampled task views: when a tile was assigned after its inputs ended
    (``assigned_at`` - the later neighbour's ending as this process heard of it: negative when the
    commit that readied it assigned it before the watch's answer arrived), and its attempt's time
    outside the slot's run (``ended_at - assigned_at - wall_s``: waiting at the worker for a free
    slot, fetching the neighbours' boundaries, storing its own with 2 replicas, the commit)."""
    waits, outside = [], []
    for t, v in watch.views.items():
        a = next((x for x in v["attempts"] if x.get("outcome") == "done"), None)
        if a is None or a.get("ended_at") is None:
            continue
        outside.append(a["ended_at"] - a["assigned_at"] - wall.get(t, 0.0))
        r, c = divmod(t, cols)
        preds = [p for p in ((r - 1) * cols + c if r else None, t - 1 if c else None) if p is not None]
        if preds and all(p in watch.tiles for p in preds):
            waits.append(a["assigned_at"] - max(watch.seen_at(p, t0) for p in preds))
    med = (lambda xs: round(1000 * statistics.median(xs), 2) if xs else None)
    return {"task_views_sampled": len(watch.views), "assigned_after_inputs_ms_median": med(waits),
            "outside_slot_ms_median": med(outside)}


def replay(rows: int, cols: int, durations: dict[int, float], slots: int) -> float:
    """Makespan of the wavefront grid on ``slots`` slots with the measured tile times and no
    overhead: greedy list scheduling, ready tiles oldest first (the ledger's order)."""
    left = {t: (1 if t // cols else 0) + (1 if t % cols else 0) for t in range(rows * cols)}
    ready: list[tuple[float, int]] = [(0.0, 0)]
    running: list[tuple[float, int]] = []
    now, idle = 0.0, slots
    while ready or running:
        while idle and ready:
            _, t = heapq.heappop(ready)
            heapq.heappush(running, (now + durations.get(t, 0.0), t))
            idle -= 1
        now, t = heapq.heappop(running)
        idle += 1
        r, c = divmod(t, cols)
        for n in ((t + cols) if r + 1 < rows else None, (t + 1) if c + 1 < cols else None):
            if n is not None:
                left[n] -= 1
                if left[n] == 0:
                    heapq.heappush(ready, (now, n))
    return now


# ---- the raw kernel and parasail -------------------------------------------------------------------


def run_raw(pair: dict, roles: dict) -> dict:
    """``python -m worker.sw A B --threads 2 --json`` on the same 2 cores (the cluster idles)."""
    import json
    import resource

    cmd = [sys.executable, "-m", "worker.sw", str(pair["fasta_a"]), str(pair["fasta_b"]),
           "--threads", str(SLOTS), "--json"]
    kids0, idle0 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_by_role(roles)
    busy0, t0 = machine_busy_s(), time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - t0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"worker.sw failed ({p.returncode}): {p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    cpu = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    idle = sum(cpu_delta(idle0, cpu_by_role(roles)).values())
    return {"system": "raw", "threads": r["threads"], **_answer_fields(r), "process_s": round(wall, 3),
            "ours_cpu_s": round(cpu, 3), "idle_cluster_cpu_s": round(idle, 3),
            "others_cpu_share": round(others_share(busy0, cpu + idle, wall), 3)}


def run_parasail(pair: dict, cpu: int) -> dict:
    """parasail ``sw_striped_32`` on one CPU, the whole call timed (bench/kernel.py's matrix)."""
    import parasail

    from bench.kernel import parasail_matrix
    from worker.sw import Scoring

    scoring = Scoring(**SCORING)
    matrix = parasail_matrix(scoring)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        busy0, t0 = machine_busy_s(), time.perf_counter()
        r = parasail.sw_striped_32(pair["a"], pair["b"], scoring.gap_open, scoring.gap_extend, matrix)
        seconds = time.perf_counter() - t0
        others = others_share(busy0, seconds, seconds)  # ours: one CPU, busy throughout
    finally:
        os.sched_setaffinity(0, before)
    cells = pair["len_a"] * pair["len_b"]
    return {"system": "parasail sw_striped_32", "threads": 1, "cpus": [cpu], "score": int(r.score),
            "end_a": int(r.end_query), "end_b": int(r.end_ref), "cells": cells, "seconds": seconds,
            "gcups": cells / seconds / 1e9, "others_cpu_share": round(others, 3),
            "version": getattr(parasail, "__version__", "?")}


# ---- measuring -------------------------------------------------------------------------------------


def warm_up(client: Client) -> dict:
    """One small alignment job (pseudocat x pseudopig2, 4 x 4 tiles) so each slot process loads
    the kernels before anything is timed; its seconds say what a cold slot costs."""
    paths = ensure_data()
    job = submit_alignment(client, read_pair(paths["pseudocat"], paths["pseudopig2"]), slots=SLOTS)
    r = wait(client, job["job"], slots=SLOTS, timeout=600)
    return {"pair": "pseudocat x pseudopig2", "tiles": r["tiles"], "seconds": r["seconds"]}


def measure_pair(client: Client, roles: dict, pair: dict, tiles: list[int | None], reps: int) -> list[dict]:
    """Cluster (each tile size) and raw, ``reps`` times interleaved; parasail once per repeat
    on the parasail pair. Returns one row per system with the median and every trial."""
    trials: dict[str, list[dict]] = {}
    for rep in range(reps):
        order = ("cluster", "raw") if rep % 2 == 0 else ("raw", "cluster")
        for what in order:
            if what == "raw":
                r = run_raw(pair, roles)
                trials.setdefault("raw", []).append(r)
                log(f"  {pair['pair']} raw: {r['seconds']:.2f} s, {r['gcups']:.2f} GCUPS, score {r['score']}; "
                    f"others used {r['others_cpu_share']:.0%} of the CPUs")
                continue
            # the traceback after the default tile's score pass; and the default tile once without
            # special rows, for what keeping them costs the score pass
            for tile, rows in [(t, True) for t in tiles] + [(None, False)]:
                r = run_cluster(client, roles, pair, tile, rows=rows, trace=rows and tile is None)
                trials.setdefault(f"{r['system']} {r['tile_arg']}", []).append(r)
                log(f"  {pair['pair']} {r['system']} tile {r['tile_rows']} ({r['tiles']} tiles, {r['tiles_pruned']} "
                    f"pruned): {r['seconds']:.2f} s, {r['gcups']:.2f} GCUPS, score {r['score']}; others used "
                    f"{r['others_cpu_share']:.0%} of the CPUs")
                if r.get("traceback"):
                    trace_bench.report(lambda line: log("  " + line), [r])
        if pair["parasail"]:
            r = run_parasail(pair, min(os.sched_getaffinity(0)))
            trials.setdefault("parasail", []).append(r)
            log(f"  {pair['pair']} parasail sw_striped_32: {r['seconds']:.2f} s, {r['gcups']:.2f} GCUPS; others used "
                f"{r['others_cpu_share']:.0%} of the CPUs")
        log(f"  {pair['pair']}: repeat {rep + 1}/{reps} done")
    return [median_row(pair, ts) for ts in trials.values()]


def median_row(pair: dict, ts: list[dict]) -> dict:
    """The trial with the median seconds (its tile figures), with every trial's seconds."""
    ordered = sorted(ts, key=lambda t: t["seconds"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    secs = [t["seconds"] for t in ts]
    row.update(pair=pair["pair"], len_a=pair["len_a"], len_b=pair["len_b"], seconds=statistics.median(secs),
               seconds_trials=[round(s, 4) for s in secs],
               others_cpu_share_trials=[t["others_cpu_share"] for t in ts])
    row["gcups"] = row["cells"] / row["seconds"] / 1e9
    row["answers"] = sorted({(t["score"], t["end_a"], t["end_b"]) for t in ts})
    return row


def compare(rows: list[dict]) -> tuple[list[dict], list[dict], list[str]]:
    """Efficiency (cluster / raw GCUPS, same pair), speed-up (ours / parasail on its pair), and
    the disagreements (every answer of a pair must be the raw kernel's)."""
    eff, speed, bad = [], [], []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        mine = [r for r in rows if r["pair"] == pair]
        raw = next(r for r in mine if r["system"] == "raw")
        ref = raw["answers"]
        for r in mine:
            r["agrees_with_raw"] = len(ref) == 1 and r["answers"] == ref
            if not r["agrees_with_raw"]:
                bad.append(f"{pair}/{r['system']} {r.get('tile_arg', '')}: {r['answers']} vs raw {ref}")
        para = next((r for r in mine if r["system"].startswith("parasail")), None)
        for r in mine:
            if r["system"] == "cluster" and r.get("losses"):
                # cluster - raw seconds = (tiles' work / slots - raw) + ramp and imbalance + overhead
                r["losses"]["gap_to_raw_s"] = round(r["seconds"] - raw["seconds"], 3)
                r["losses"]["tile_work_minus_raw_s"] = round(r["losses"]["ideal_s"] - raw["seconds"], 3)
            if r["system"] == "cluster":
                eff.append({"pair": pair, "tile": r["tile_rows"], "tile_arg": r["tile_arg"],
                            "cluster_gcups": r["gcups"], "raw_gcups": raw["gcups"], "efficiency": r["gcups"] / raw["gcups"],
                            # cells per CPU second of all our processes (the masters' and storage's too):
                            # what the other sessions on this VM cannot blur, and what no idle slot costs
                            "cpu_efficiency": raw["ours_cpu_s"] / r["ours_cpu_s"]})
            if para is not None and r is not para:
                speed.append({"pair": pair, "ours": f"{r['system']} {r.get('tile_arg', '')}".strip(), "ours_gcups": r["gcups"],
                              "parasail_gcups": para["gcups"], "speedup": r["gcups"] / para["gcups"]})
    return eff, speed, bad


def rows_cost(rows: list[dict]) -> list[dict]:
    """The default tile's score pass with special rows against without, per pair (medians)."""
    out = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        mine = {r["system"]: r for r in rows if r["pair"] == pair and r.get("tile_arg") == "default"}
        if "cluster" in mine and "cluster (no rows)" in mine:
            w, wo = mine["cluster"]["seconds"], mine["cluster (no rows)"]["seconds"]
            out.append({"pair": pair, "with_rows_s": w, "without_rows_s": wo, "ratio": w / wo})
    return out


def best_tile(eff: list[dict]) -> dict | None:
    """On the last (largest) pair: the tile with the best efficiency, beside the default one."""
    if not eff:
        return None
    mine = [e for e in eff if e["pair"] == eff[-1]["pair"]]
    best = max(mine, key=lambda e: e["efficiency"])
    default = next((e for e in mine if e["tile_arg"] == "default"), best)
    return {"pair": best["pair"], "tile": best["tile"], "efficiency": best["efficiency"],
            "default_tile": default["tile"], "default_efficiency": default["efficiency"]}


def estimate(rows: list[dict]) -> list[dict]:
    """Seconds for 5 Mbp x 5 Mbp (and for CUDAlign 2.1's pair) at the GCUPS measured on the
    largest pair, beside CUDAlign 2.1's 9 min 18 s."""
    biggest = max(r["cells"] for r in rows)
    out = []
    for r in rows:
        if r["cells"] != biggest or r["system"].startswith("parasail"):
            continue
        rate = r["gcups"] * 1e9
        five, cud = FIVE_MBP * FIVE_MBP / rate, CUDALIGN["len_a"] * CUDALIGN["len_b"] / rate
        out.append({"from": f"{r['system']} {r.get('tile_arg', '')}".strip(), "pair": r["pair"], "gcups": r["gcups"],
                    "five_mbp_s": round(five, 1), "cudalign_pair_s": round(cud, 1),
                    "vs_cudalign": cud / CUDALIGN["seconds"]})
    return out


# ---- report ----------------------------------------------------------------------------------------

COLUMNS = ("pair", "len_a", "len_b", "system", "tile", "tiles", "pruned", "seconds", "GCUPS", "score",
           "end_a", "end_b", "agrees", "others' CPU")


def row_cells(r: dict) -> list[str]:
    cluster = r["system"] == "cluster"
    return [r["pair"], f"{r['len_a']:,}", f"{r['len_b']:,}", r["system"], str(r["tile_rows"]) if cluster else "-",
            f"{r['tiles']:,}" if cluster else "-", f"{r['tiles_pruned']:,}" if cluster else "-",
            f"{r['seconds']:.2f}", f"{r['gcups']:.2f}", str(r["score"]), str(r["end_a"]), str(r["end_b"]),
            "yes" if r["agrees_with_raw"] else "NO", f"{r['others_cpu_share']:.0%}"]


def mmss(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:02.0f} s"


def print_report(res: dict) -> None:
    m, cfg = res["machine"], res["config"]
    head = (f"Alignment benchmark {m['date']}  {m['nproc']} cpus ({m['cpu']}), Python {m['python']}; cluster "
            f"3 masters + 2 storage + 2 balancers + 1 worker x {SLOTS} slots; {cfg['reps']} rep(s)"
            f"{' (quick)' if cfg['quick'] else ''}")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    cells = [row_cells(r) for r in res["rows"]]
    if Console is not None:
        out = Console(width=max(150, Console().width)).print
        out(head)
        t = Table(title="Smith-Waterman, match 2 / mismatch -3 / open 5 / extend 2; median seconds; "
                        "GCUPS over the whole matrix")
        for c in COLUMNS:
            t.add_column(c, justify="left" if c in ("pair", "system") else "right")
        for c in cells:
            t.add_row(*c)
        out(t)
    else:
        out = print
        out(head)
        w = [max(len(x[i]) for x in [list(COLUMNS)] + cells) for i in range(len(COLUMNS))]
        for c in [list(COLUMNS)] + cells:
            out("  ".join(x.ljust(w[i]) if i in (0, 3) else x.rjust(w[i]) for i, x in enumerate(c)))
    for e in res["efficiency"]:
        out(f"efficiency {e['pair']} tile {e['tile']}: cluster {e['cluster_gcups']:.2f} / raw {e['raw_gcups']:.2f} GCUPS "
            f"= {e['efficiency']:.1%} (per CPU second of all our processes: {e['cpu_efficiency']:.1%})")
    best = res.get("best_tile")
    if best:
        out(f"best tile on {best['pair']}: {best['tile']} ({best['efficiency']:.1%}); default tile {best['default_tile']} "
            f"({best['default_efficiency']:.1%}); acceptance (>= 85%): "
            f"{'met' if best['default_efficiency'] >= 0.85 else 'NOT met'} with the default tile, "
            f"{'met' if best['efficiency'] >= 0.85 else 'NOT met'} with the best")
    for s in res["speedup"]:
        out(f"speed-up {s['pair']} {s['ours']}: {s['ours_gcups']:.2f} / parasail sw_striped_32 1 core "
            f"{s['parasail_gcups']:.2f} GCUPS = {s['speedup']:.2f}x")
    for e in res["estimate"]:
        out(f"estimate from {e['from']} on {e['pair']} ({e['gcups']:.2f} GCUPS): 5 Mbp x 5 Mbp {mmss(e['five_mbp_s'])}; "
            f"CUDAlign 2.1's pair {mmss(e['cudalign_pair_s'])} vs its 9 min 18 s ({e['vs_cudalign']:.1f}x)")
    trace_bench.report(out, res["rows"])
    for cost in res.get("rows_cost", []):
        out(f"keeping special rows cost the score pass on {cost['pair']}: {cost['with_rows_s']:.2f} s with vs "
            f"{cost['without_rows_s']:.2f} s without ({cost['ratio']:.3f}x)")
    for r in res["rows"]:
        if r["system"] == "cluster":
            print_losses(out, r)
    out(f"warm-up job: {res['warmup']['seconds']:.2f} s ({res['warmup']['tiles']} tiles, slot processes load kernels); "
        f"cluster up in {res['cluster_start_s']:.1f} s")
    sh = m.get("cpu_shares_during_run") or {}
    out(f"CPU during the run: busy {sh.get('busy', 0):.0%}, steal {sh.get('steal', 0):.0%}; load "
        f"{m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}")
    bad = res["disagreements"]
    out("answers: " + ("all identical to the raw kernel's" if not bad else "DISAGREE: " + "; ".join(bad)))
    out(f"total {res['elapsed_s']:.1f} s; results in {res['json_path']}")


def print_losses(out: Callable[[str], None], r: dict) -> None:
    x = r.get("losses")
    head = (f"{r['pair']} tile {r['tile_rows']}: {r['tiles']} tiles ({r['grid'][0]} x {r['grid'][1]}), "
            f"{r['tiles_pruned']} pruned ({r['cells_pruned_seen'] / r['cells']:.0%} of cells)")
    if not x:
        out(f"{head}; the watch saw {r['tiles_seen']} tiles, no breakdown")
        return
    cpu = r["cpu_by_role_s"]
    out(f"{head}; slots busy {x['slot_busy_share']:.0%}; ideal {x['ideal_s']:.2f} s, wavefront replay "
        f"{x['wavefront_replay_s']:.2f} s (ramp/imbalance {x['ramp_and_imbalance_s']:.2f} s), measured {r['seconds']:.2f} s "
        f"(overhead {x['overhead_s']:.2f} s, {x['per_tile_idle_ms']:.1f} ms idle slot time per tile); vs raw "
        f"{x.get('gap_to_raw_s', 0):+.2f} s = tile work {x.get('tile_work_minus_raw_s', 0):+.2f} s + ramp "
        f"{x['ramp_and_imbalance_s']:+.2f} s + overhead {x['overhead_s']:+.2f} s; first tile after "
        f"{x['first_tile_seen_after_s']:.2f} s; assigned {x['assigned_after_inputs_ms_median']} ms after its inputs ended "
        f"(median); CPU s: slots {cpu.get('slots', 0):.1f}, worker {cpu['worker']:.1f}, "
        f"masters {cpu['masters']:.1f}, storage {cpu['storage']:.1f}, balancers {cpu['balancers']:.1f} "
        f"({x['other_processes_cpu_share']:.0%} of the 2 cores)")


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 200 kbp pair only, one repeat (< 60 s)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "align.json"), help="where to write the results")
    ap.add_argument("--prefix", type=int, default=None,
                    help="efficiency pair: the first N letters of each genome (default: the whole genomes)")
    ap.add_argument("--parasail-prefix", type=int, default=PARASAIL_PREFIX,
                    help="parasail's pair: the first N letters of each genome")
    ap.add_argument("--tile", type=int, action="append", default=None,
                    help="square tile side for the efficiency pair (repeatable; 0: the default tile_size)")
    ap.add_argument("--reps", type=int, default=None, help="repeats (default 3 below 1e11 cells, else 1; --quick 1)")
    ap.add_argument("--keep", action="store_true", help="keep the cluster's work directory (logs, blobs)")
    args = ap.parse_args(argv)
    tiles = [t or None for t in (args.tile or [0])]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops the nodes

    import numba
    import parasail

    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine.machine_info(numba=numba.__version__, cluster=__version__,
                                                           parasail=getattr(parasail, "__version__", "?"))}
    cpu0 = machine.cpu_times()
    work = Path(tempfile.mkdtemp(prefix="bench-align-"))
    pairs = make_pairs(work, args.prefix, args.parasail_prefix, args.quick)
    res["config"] = {"quick": args.quick, "reps": args.reps or ("1" if args.quick else "3 below 1e11 cells, else 1"),
                     "slots": SLOTS, "scoring": SCORING, "kernel": "int16", "tiles": [t or "default" for t in tiles],
                     "pairs": {p["pair"]: [p["len_a"], p["len_b"]] for p in pairs}, "cudalign": CUDALIGN,
                     "cluster": "3 masters, 2 storage (2 replicas), 2 balancers, 1 worker x 2 slots, --no-mount, 127.0.0.1",
                     "raw": f"python -m worker.sw A B --threads {SLOTS} --json", "parasail": "sw_striped_32, 1 CPU, whole call"}
    nodes, roles, config_path = plan_cluster(work)
    client = None
    rows: list[dict] = []
    try:
        t0 = time.perf_counter()
        start_all(nodes, timeout=30)
        client = connect(config_path, roles["balancers"])
        res["cluster_start_s"] = time.perf_counter() - t0
        log(f"cluster up in {res['cluster_start_s']:.1f} s; warm-up job …")
        res["warmup"] = warm_up(client)
        for pair in pairs:
            cells = pair["len_a"] * pair["len_b"]
            reps = args.reps or (1 if args.quick or cells >= 1e11 else 3)
            log(f"{pair['pair']}: {pair['len_a']:,} x {pair['len_b']:,} = {cells:.3g} cells, {reps} repeat(s) …")
            rows += measure_pair(client, roles, pair, tiles if pair["efficiency"] else [None], reps)
    finally:
        if client is not None:
            client.close()
        stop_all(nodes[::-1])
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["rows"] = rows
    res["efficiency"], res["speedup"], res["disagreements"] = compare(rows)
    res["estimate"] = estimate(rows)
    res["traceback"] = [{"pair": r["pair"], "tile": r["tile_rows"], **r["traceback"]} for r in rows if r.get("traceback")]
    res["rows_cost"] = rows_cost(rows)
    res["best_tile"] = best_tile(res["efficiency"])
    res["all_agree"] = not res["disagreements"]
    machine.finish(res, cpu0, started, args.json)
    print_report(res)
    return 0 if res["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
