"""The rack plan's arithmetic (``bench/rackplan.py``): from measured prices to what each tier
must do for one alignment on N nodes, and the wavefront's schedule.

Everything here is derived: the inputs are measurements (``measured``: this run's, ``recorded``:
other benches' JSON) and the rack's shape; no figure is typed in except where a comment says
so. Each row of the plan carries its demand, the capacity it is held against, and where both
came from, so the table says what breaks first and by how much.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MiB = 1 << 20
# One Python process (the leader, the active balancer, a storage node's loop) does its protocol
# work under one GIL: one core is its ceiling whatever the machine has.
PROCESS_CORES = 1.0
FERNET_EXPANSION = 4 / 3  # pysyncobj seals each Raft message with Fernet: base64 of the ciphertext


def wavefront_makespan(rows: int, cols: int, slots: int) -> int:
    """Steps to finish a ``rows`` x ``cols`` wavefront grid on ``slots`` slots, every tile one
    step: tile (r, c) needs (r-1, c) and (r, c-1); each step runs up to ``slots`` ready tiles,
    the lowest anti-diagonals first (greedy list scheduling; with equal tile times it is exact
    for that policy). ``done[r]`` is the prefix of row r done."""
    done = np.zeros(rows, dtype=np.int64)
    steps = 0
    idx = np.arange(rows)
    while done[-1] < cols:
        above = np.concatenate(([cols + 1], done[:-1]))
        ready = (done < cols) & (above > done)
        cand = idx[ready]
        if len(cand) > slots:
            diag = cand + done[cand]
            cand = cand[np.argpartition(diag, slots - 1)[:slots]]
        done[cand] += 1
        steps += 1
    return steps


def _row(tier: str, what: str, demand: float, capacity: float | None, unit: str, source: str) -> dict:
    use = demand / capacity if capacity else None
    return {"tier": tier, "what": what, "demand": demand, "capacity": capacity, "unit": unit,
            "use": use, "source": source}


def grid_case(rack: dict, measured: dict, recorded: dict, tile: int, *, sim: bool = True) -> dict:
    """One task per tile, boundaries through storage: what the rack must sustain."""
    slots = rack["nodes"] * rack["cores"]
    rate = rack["gcups"] * 1e9
    kern = recorded.get("kernel", {})
    idle = kern.get("idle_ms_per_tile", 0.0) / 1000
    rows, cols = math.ceil(rack["len_b"] / tile), math.ceil(rack["len_a"] / tile)
    t_tile = tile * tile / rate + idle
    tiles_per_s = slots / t_tile
    lead = measured["leader"]
    cap_leader = PROCESS_CORES / (lead["leader_cpu_ms_per_tile"] / 1000)
    steps = wavefront_makespan(rows, cols, slots) if sim else None
    # the leader commits at most cap_leader tiles/s: by Little's law that keeps cap x t_tile slots busy
    busy = min(slots, int(cap_leader * t_tile))
    steps_capped = wavefront_makespan(rows, cols, busy) if sim and busy < slots else steps
    ideal = rack["len_a"] * rack["len_b"] / (slots * rate)
    return {"tile": tile, "grid": [rows, cols], "tiles": rows * cols, "tile_s": t_tile, "tiles_per_s": tiles_per_s,
            "ideal_s": ideal, "critical_path_s": (rows + cols - 1) * t_tile,
            "makespan_s": steps * t_tile if steps else None,
            "makespan_leader_bound_s": steps_capped * t_tile if steps_capped else None,
            "slots_kept_busy_by_leader": busy}


def tier_rows(rack: dict, measured: dict, recorded: dict, case: dict) -> list[dict]:
    """Demand against capacity, tier by tier, for one grid case."""
    d = case["tiles_per_s"]
    lead, bal, sto = measured["leader"], measured["balancer"], measured["storage"]
    proc = recorded.get("balancer_processes", {})
    k = rack["replicas"]
    m = rack["storage_nodes"]
    size = sto["file_bytes"] * (case["tile"] / measured["leader"]["tile"]) if case["tile"] != lead["tile"] else sto["file_bytes"]
    workers = rack["nodes"]
    out = [
        _row("leader", "CPU for tile commits", d * lead["leader_cpu_ms_per_tile"] / 1000, PROCESS_CORES, "cores",
             f"measured: {lead['leader_cpu_ms_per_tile']} ms a tile (rackplan.json leader)"),
        _row("follower", "CPU to apply them", d * lead["follower_cpu_ms_per_tile"] / 1000, PROCESS_CORES, "cores",
             f"measured: {lead['follower_cpu_ms_per_tile']} ms a tile"),
        _row("raft", "log to each follower", d * lead["bytes_per_tile"] * FERNET_EXPANSION / 1e6, None, "MB/s",
             f"encoded: {lead['bytes_per_tile']} B a tile, x4/3 Fernet (derived)"),
        _row("balancer", "CPU per task (real processes)", d * proc.get("cpu_ms_per_task", 0) / 1000, PROCESS_CORES, "cores",
             f"fit of batch.json's two runs: {proc.get('cpu_ms_per_task')} ms a task"),
        _row("balancer", "CPU per task (core + codec only)", d * bal["cpu_us_per_task"] / 1e6, PROCESS_CORES, "cores",
             f"measured in process: {bal['cpu_us_per_task']} us a task"),
        _row("balancer", f"heartbeats, {workers} workers at 0.25 s", workers / 0.25 * proc.get("cpu_us_per_heartbeat", 0) / 1e6,
             PROCESS_CORES, "cores", f"fit of batch.json: {proc.get('cpu_us_per_heartbeat')} us a heartbeat"),
        _row("balancer", f"heartbeats, {workers * rack['cores']} one-slot workers", workers * rack["cores"] / 0.25
             * proc.get("cpu_us_per_heartbeat", 0) / 1e6, PROCESS_CORES, "cores", "the same price"),
        _row("storage", f"boundary files stored ({k} copies), per node of {m}", d * k / m, None, "files/s",
             f"one serial client got {sto['upload_files_per_s']} files/s of {sto['file_bytes']:,} B (latency, not a ceiling)"),
    ]
    per_tile = (sto["upload_nodes_cpu_ms_per_file"] * k / 2 + 2 * sto["read_nodes_cpu_ms_per_file"]) / 1000
    for nodes in sorted({m, rack["nodes"]}):
        out.append(_row("storage", f"node CPU, store {k} + read 2 per tile, per node of {nodes}", d * per_tile / nodes,
                        PROCESS_CORES, "cores", f"measured: {sto['upload_nodes_cpu_ms_per_file']} ms a file stored "
                        f"(2 copies, both nodes), {sto['read_nodes_cpu_ms_per_file']} ms read"))
    out += [
        _row("storage", f"bytes in and out, per node of {m}", d * size * (k + 2) / 1e6 / m, None, "MB/s",
             "derived: a tile writes its boundary k times and reads two"),
        _row("worker", "FUSE first reads, per worker host", d / workers * 2 * size / 1e6, 280, "MB/s",
             "capacity: FUSE first read ~280 MB/s (doc/benchmarks.md, storage)"),
        _row("worker", "store + fetch CPU, per worker host",
             d / workers * (sto["upload_client_cpu_ms_per_file"] + 2 * sto["read_client_cpu_ms_per_file"]) / 1000,
             rack["cores"], "cores", "measured: client CPU a file stored / read"),
    ]
    return out


def stripes_case(rack: dict, recorded: dict, handoff_rows: int, segment_rows: int) -> dict:
    """The proposal: one column stripe per slot, each streaming its right border to the next
    slot's worker every ``handoff_rows``; the ledger records a stripe's progress every
    ``segment_rows`` (a checkpoint: the stripe's bottom row stored). A pipeline: stripe s
    starts block b once stripe s-1 finished it, so the fill costs (S - 1) blocks."""
    slots = rack["nodes"] * rack["cores"]
    rate = rack["gcups"] * 1e9
    width = rack["len_a"] / slots
    block_s = handoff_rows * width / rate
    blocks = math.ceil(rack["len_b"] / handoff_rows)
    makespan = (blocks + slots - 1) * block_s
    segment_s = segment_rows * width / rate
    commits = slots / segment_s
    return {"handoff_rows": handoff_rows, "segment_rows": segment_rows, "stripe_width": width,
            "makespan_s": makespan, "ideal_s": rack["len_a"] * rack["len_b"] / (slots * rate),
            "commits_per_s": commits, "handoffs_per_s": slots / block_s,
            "handoff_bytes": handoff_rows * 8, "cross_node_handoffs_per_s": rack["nodes"] / block_s,
            "checkpoint_bytes": width * 8, "checkpoint_mb_s": commits * width * 8 * rack["replicas"] / 1e6}


def rows_case(rack: dict, recorded: dict, tile: int) -> dict:
    """The traceback's special rows at this scale and its serial stage 2 (crosspoints)."""
    from cluster.align import ROWS_BUDGET, special_stride

    tb = next((t for t in recorded.get("traceback_rows", []) if t.get("pair") == "hpylori"), None)
    out: dict[str, Any] = {}
    stride = special_stride(int(rack["len_a"]), int(rack["len_b"]), tile, ROWS_BUDGET)
    n_rows = int(rack["len_b"]) // stride
    out.update(stride=stride, rows=n_rows, raw_bytes=n_rows * 8 * rack["len_a"], budget=ROWS_BUDGET)
    if tb:
        per_letter = tb["special_rows_bytes"] / (tb["special_rows"] * tb["len_a"])
        gcups = tb["special_stride"] * tb["len_b"] / tb["crosspoints_task_s"] / 1e9
        out.update(packed_bytes=n_rows * rack["len_a"] * per_letter, packed_bytes_per_letter=per_letter,
                   crosspoints_gcups=gcups, crosspoints_s=stride * rack["len_b"] / (gcups * 1e9),
                   source=f"align.json traceback ({tb['pair']}): {tb['special_rows_bytes']:,} B for "
                          f"{tb['special_rows']} rows, crosspoints {tb['crosspoints_task_s']:.2f} s at stride {tb['special_stride']}")
        for s in (8192, 16384, 32768):
            r = int(rack["len_b"]) // s
            out.setdefault("alternatives", []).append(
                {"stride": s, "packed_bytes": r * rack["len_a"] * per_letter, "raw_bytes": r * 8 * rack["len_a"],
                 "crosspoints_s": s * rack["len_b"] / (gcups * 1e9)})
    return out


def plan(rack: dict, measured: dict, recorded: dict) -> dict:
    cases = [grid_case(rack, measured, recorded, t) for t in (rack["tile"], rack["tile"] // 2, rack["tile"] * 2)]
    return {"slots": rack["nodes"] * rack["cores"], "cells": rack["len_a"] * rack["len_b"],
            "cases": cases, "tiers": tier_rows(rack, measured, recorded, cases[0]),
            "stripes": [stripes_case(rack, recorded, h, seg) for h, seg in ((4096, 1 << 20), (8192, 1 << 20), (4096, 1 << 22))],
            "rows": rows_case(rack, recorded, rack["tile"])}


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) < 10:
        return f"{x:.3g}{unit}"
    return f"{x:,.0f}{unit}"


def print_plan(res: dict) -> None:
    r, p, meas = res["rack"], res["plan"], res["measured"]
    m = res["machine"]
    print(f"Rack plan {m['date']} (measured on {m['nproc']} cpus, {m['cpu']}; busy "
          f"{(m.get('cpu_shares_during_run') or {}).get('busy', 0):.0%})")
    print(f"{r['nodes']} nodes x {r['cores']} slots = {p['slots']:,} slots at {r['gcups']:.2f} GCUPS each; "
          f"{r['len_a'] / 1e6:.0f} x {r['len_b'] / 1e6:.0f} Mbp = {p['cells']:.3g} cells; "
          f"{r['storage_nodes']} storage nodes, {r['replicas']} copies")
    lead, bal, sto = meas["leader"], meas["balancer"], meas["storage"]
    print(f"\nMeasured here: leader {lead['leader_cpu_ms_per_tile']} ms CPU a tile ({lead['tiles_per_s']:,} tiles/s on "
          f"this machine, {lead['commands_per_entry']} commands a Raft entry, {lead['bytes_per_tile']} B a tile); "
          f"balancer core {bal['cpu_us_per_heartbeat']} us a heartbeat, {bal['cpu_us_per_task']} us a task; storage "
          f"{sto['upload_files_per_s']} boundary files/s stored (2 copies), {sto['read_files_per_s']} read")
    print("\nOne task per tile (wavefront simulated, every tile the same time):")
    print(f"  {'tile':>8} {'grid':>12} {'tiles':>11} {'s/tile':>7} {'tiles/s':>8} {'ideal':>8} {'critical':>9} "
          f"{'makespan':>9} {'leader-bound':>13}")
    for c in p["cases"]:
        print(f"  {c['tile']:>8,} {c['grid'][0]:>5,}x{c['grid'][1]:<6,} {c['tiles']:>11,} {c['tile_s']:>7.3f} "
              f"{c['tiles_per_s']:>8,.0f} {c['ideal_s'] / 60:>7.1f}m {c['critical_path_s'] / 60:>8.1f}m "
              f"{_fmt(c['makespan_s'] and c['makespan_s'] / 60)}m {_fmt(c['makespan_leader_bound_s'] and c['makespan_leader_bound_s'] / 60):>11}m")
    print(f"\nTier by tier at tile {p['cases'][0]['tile']:,} ({p['cases'][0]['tiles_per_s']:,.0f} tiles/s):")
    print(f"  {'tier':<9} {'what':<52} {'demand':>10} {'capacity':>10} {'unit':<8} {'use':>7}  source")
    for t in sorted(p["tiers"], key=lambda t: -(t["use"] or 0)):
        print(f"  {t['tier']:<9} {t['what']:<52} {_fmt(t['demand']):>10} {_fmt(t['capacity']):>10} {t['unit']:<8} "
              f"{_fmt(t['use'] and 100 * t['use'], '%'):>7}  {t['source']}")
    print("\nStripes handed worker to worker (a model of the proposal, not measured):")
    for s in p["stripes"]:
        print(f"  hand-off every {s['handoff_rows']:,} rows, checkpoint every {s['segment_rows']:,}: makespan "
              f"{s['makespan_s'] / 60:.1f} min (ideal {s['ideal_s'] / 60:.1f}), {s['commits_per_s']:.1f} commits/s, "
              f"{s['handoffs_per_s']:,.0f} hand-offs/s of {s['handoff_bytes']:,} B ({s['cross_node_handoffs_per_s']:,.0f} "
              f"across nodes), checkpoints {s['checkpoint_mb_s']:.0f} MB/s")
    rows = p["rows"]
    if rows.get("packed_bytes"):
        print(f"\nTraceback: special rows every {rows['stride']:,} rows ({rows['rows']:,} rows; the 4 GiB budget would "
              f"need {rows['raw_bytes'] / 1e12:.1f} TB raw): {rows['packed_bytes'] / 1e9:,.0f} GB packed; stage 2, one "
              f"task at {rows['crosspoints_gcups']:.2f} GCUPS: {rows['crosspoints_s'] / 60:.0f} min")
        for a in rows.get("alternatives", []):
            print(f"  stride {a['stride']:>6,}: {a['packed_bytes'] / 1e9:,.0f} GB packed, stage 2 {a['crosspoints_s'] / 60:.0f} min")
    print(f"\nresults in {res['json_path']}")
