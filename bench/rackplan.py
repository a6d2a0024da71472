#!/usr/bin/env python3
"""A 64-node rack plan (issue 22): what one alignment at chromosome scale asks of the leader, the
balancer and the storage tier, from costs measured here, and where it breaks first.

Run from the repository root::

    .venv/bin/python bench/rackplan.py            # measures (~1-2 min), then the plan; writes bench/results/rackplan.json
    .venv/bin/python bench/rackplan.py --quick    # smaller measurements (~40 s)
    .venv/bin/python bench/rackplan.py --model-only   # the plan again from bench/results/rackplan.json's measurements
    .venv/bin/python bench/rackplan.py --nodes 64 --cores 16 --len-a 180e6 --len-b 183e6 --tile 65536

Measured here (each part in its own processes, stopped by pid at the end):

1. **leader** — 3 masters (``cluster.local.master_nodes``, journal msynced as in production) and a
   grid job shaped like ``cluster align``'s (``depends: wavefront``, a ``tile`` run section,
   ``keep_files: ["rows"]``), ``ROWS`` x ``COLS`` tiles. A stand-in balancer (``TileEcho``, the
   echo balancer's protocol) answers every tile at once with what a worker sends for a tile: its
   summary and two stored files (``boundary``, ``rows``). So the ledger materialises the
   wavefront, records each tile with its files, folds done tiles and releases their boundaries,
   as in a real alignment, without running a kernel. Per master: CPU seconds from
   ``/proc/PID/stat`` (every thread) over the run; the leader's core counters give commands per
   Raft entry. The bytes of the tile's log commands are those of ``master.commands.encode``.
2. **balancer** — the real ``BalancerCore`` in this process, active and attached, ``W`` workers
   registered; every message through ``proto.Codec`` encode and decode as the loop does. CPU per
   worker heartbeat (one in, one out) and per task (WORKER_REQUEST in, out to the worker, its
   TASK_RESULT in, out to the leader, RESULT_ACK in, out to the worker). No sockets: a lower bound
   on the balancer's loop (``bench/batch.py`` measured the same with real processes).
3. **storage** — 2 storage nodes (``cluster.local.storage_nodes``, CURVE as in production, blobs
   on this machine's disk), one client storing boundary-sized files (the SWB1 size of the tile)
   with 2 copies through ``upload_ranked`` as a worker does, then reading each back in the 1 MiB
   requests the FUSE view makes. Files/s, and CPU per file of each node and of the client.

Recorded elsewhere and read from their JSON: the kernel's rate per slot through the cluster
(``bench/results/align.json``), storage and FUSE throughput (``storage.json``,
``storage-curve.json``), the balancer with 1,000 simulated workers (``batch.json``), the no-op
task path (``dispatch.json``).

The plan: for N nodes x C cores at the measured rate per core, the tiles a second the grid
needs, and what that costs each tier at the measured prices; the wavefront's own schedule
(``wavefront_makespan``: every tile the same time, greedy by anti-diagonal, simulated step by
step) gives the time with the ramp; then the same for the changes the plan proposes. Every
figure printed says whether it was measured (and where) or derived.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first: bench/storage.py must not shadow the storage package

from bench import machine  # noqa: E402
from bench.rackmodel import plan, print_plan  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TICK = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process, every thread (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError, TypeError):
        return 0.0


# ---- 1. the leader: a tile grid through three masters ---------------------------------------


def _tile_echo(addresses: list[str], credentials: Any, tile: int, n_tiles: int, timeout: float):
    """The echo balancer, answering each tile as a worker would: summary, boundary and rows."""
    from master.echo_balancer import EchoBalancer
    from proto.messages import TaskResult, WorkerRequest
    from worker.tiles import boundary_size

    size = boundary_size(tile, tile)
    rows_size = 30_000  # ~one packed special row of a 65,536-letter tile (154 MB / 464 tiles, align.json)

    class TileEcho(EchoBalancer):
        def _on(self, m) -> None:
            if not isinstance(m, WorkerRequest):
                return super()._on(m)
            self.stats.received += 1
            key = (m.job_uuid_upper, m.job_uuid_lower, m.task_id)
            fid, rid = os.urandom(16), os.urandom(16)
            summary = {"score": 1000 + m.task_id, "end_a": m.task_id, "end_b": m.task_id,
                       "cells": tile * tile, "pruned": False, "rows_bytes": rows_size}
            files = [[fid, size, ["s1", "s2"], "boundary"], [rid, rows_size, ["s1", "s2"], "rows"]]
            result = TaskResult(m.job_uuid_upper, m.job_uuid_lower, m.task_id, m.fence_term, m.fence_sequence,
                                0, 0, summary, fid, None, self.name, files)
            self.unacked[key] = result
            self.sent_at[key] = time.monotonic()
            self.codec.send(self.sock, result)

    echo = TileEcho(addresses, credit=2048, epoch=1, name="echo", credentials=credentials)
    try:
        t0 = time.perf_counter()
        p0 = time.process_time()
        stats = echo.run(time.monotonic() + timeout, stop_after=n_tiles)
        return stats, time.perf_counter() - t0, time.process_time() - p0
    finally:
        echo.close()


def grid_spec(rows: int, cols: int, tile: int) -> dict:
    """A grid job as ``cluster.align.submit_grid`` makes it (stand-in sequence ids)."""
    a, b = os.urandom(16).hex(), os.urandom(16).hex()
    scoring = {"match": 2, "mismatch": -3, "gap_open": 5, "gap_extend": 2}
    return {"name": "rackplan", "rows": rows, "cols": cols, "depends": "wavefront",
            "run": {"kind": "tile", "a": a, "b": b, "tile_rows": tile, "tile_cols": tile, "scoring": scoring,
                    "kernel": "int16", "share_best": True, "special_stride": tile},
            "reduce": {"max": "score", "ties": ["end_b", "end_a"], "sum": ["cells", "rows_bytes"]},
            "max_attempts": 5, "keep_files": ["rows"]}


def tile_log_bytes(tile: int, per_entry: float) -> dict:
    """Bytes of one tile's commands in the Raft log (msgpack, as ``master.commands.encode``)."""
    from master.commands import AssignTasks, Batch, CompleteTask, encode
    from worker.tiles import boundary_size

    job = os.urandom(16)
    n = max(1, round(per_entry / 2))  # an entry holds ~per_entry commands: assignments and completions
    assign = len(encode(AssignTasks(7, 1_000_000, "b1", [(job, 123_456 + i) for i in range(n)], time.time()))) / n
    files = [[os.urandom(16), boundary_size(tile, tile), ["s1", "s2"], "boundary"],
             [os.urandom(16), 30_000, ["s1", "s2"], "rows"]]
    summary = {"score": 123_456_789, "end_a": 123_456_789, "end_b": 123_456_789, "cells": tile * tile,
               "pruned": False, "rows_bytes": 30_000}
    done = CompleteTask(job, 123_456, 7, 1_000_123, 0, "worker-17", summary, files[0][0], None, time.time(), files)
    one = len(encode(done))
    batch = len(encode(Batch([done] * 100))) / 100
    return {"assign_bytes_per_task": round(assign, 1), "complete_bytes": one, "complete_bytes_in_batch": round(batch, 1),
            "bytes_per_tile": round(assign + batch, 1)}


def measure_leader(root: Path, side: int, tile: int) -> dict:
    from bench.ledger import Masters
    from cluster.client import Client

    n = side * side
    with Masters(root, "leader") as ms:
        leader, status = ms.wait_leader()
        pids = [node.pid for node in ms.nodes]
        with Client(ms.addresses, timeout=60) as c:
            ref = c.submit_job("grid", grid_spec(side, side, tile))
            before = [cpu_s(p) for p in pids]
            stats, wall, echo_cpu = _tile_echo(ms.addresses, ms.balancer_key, tile, n, 300)
            after = [cpu_s(p) for p in pids]
            view = c.job(ref.job).value
        leader_now, status = ms.wait_leader()
        core = status.get("core") or {}
    if stats.acked < n or view.get("state") != "done":
        raise RuntimeError(f"leader part: {stats.acked} of {n} tiles acknowledged; job {view.get('state')}")
    used = [b - a for a, b in zip(before, after)]
    per_entry = core["commands_proposed"] / core["proposals"] if core.get("proposals") else None
    out = {"tiles": n, "grid": [side, side], "tile": tile, "seconds": round(wall, 3), "tiles_per_s": round(n / wall, 1),
           "leader": ms.nodes[leader].name, "leader_changed": leader_now != leader,
           "cpu_s": {node.name: round(u, 2) for node, u in zip(ms.nodes, used)},
           "leader_cpu_ms_per_tile": round(1000 * used[leader] / n, 3),
           "follower_cpu_ms_per_tile": round(1000 * max(u for i, u in enumerate(used) if i != leader) / n, 3),
           "leader_busy_share": round(used[leader] / wall, 3), "echo_cpu_ms_per_tile": round(1000 * echo_cpu / n, 3),
           "commands_per_entry": round(per_entry, 1) if per_entry else None,
           "job_state": view.get("state"), "resent": stats.resent}
    out.update(tile_log_bytes(tile, per_entry or 120))
    return out


# ---- 2. the balancer core, in process --------------------------------------------------------


def measure_balancer(workers: int, slots: int, rounds: int, tasks: int) -> dict:
    from balancer.binary_star import State
    from balancer.core import WORKERS, BalancerCore, BalancerOptions
    from cluster.node.events import MessageReceived, Send, Started, StartTimer, TimerFired
    from proto import Codec, new_node_id
    from proto.ids import split128
    from proto.messages import Attached, Heartbeat, PeerState, ResultAck, TaskResult, WorkerRequest, WorkerStatus

    codec = Codec(new_node_id())
    core = BalancerCore("b1", primary=True, masters=["tcp://m1:1"], workers_endpoint="tcp://b:1",
                        peer_workers="tcp://peer:1", epoch_base=1000, options=BalancerOptions(), now=0.0)
    clock = [0.0]
    seq = [0]

    def feed(socket: str, message, route: bytes | None = None) -> list:
        """One message in as the loop takes it (decoded from its frames); the messages it sends,
        encoded. The zero-delay timers (placement after a burst) fire at once, as the loop's do
        once it has drained its sockets."""
        seq[0] += 1
        _, m = codec.decode(codec.encode(message))
        todo = core.handle(MessageReceived(socket, route, 1, m, f"m{seq[0]}"), clock[0])
        sent = []
        while todo:
            more = []
            for e in todo:
                if isinstance(e, Send):
                    codec.encode(e.message)
                    sent.append(e)
                elif isinstance(e, StartTimer) and e.delay == 0:
                    more += core.handle(TimerFired(e.name, "p"), clock[0])
            todo = more
        return sent

    core.handle(Started("s"), 0.0)
    feed("peer_in", PeerState(int(State.BACKUP), 0, 1, "peer", "tcp://peer:1"))
    feed("m0", Attached(1, 5, 0, "m1"))
    names = [f"w{i}" for i in range(workers)]
    caps = {"cores": slots, "memory_mb": 65536}
    for name in names:
        feed(WORKERS, WorkerStatus(slots, slots, 0, 0, [], caps, name, True, 0, [], [], []), name.encode())

    # heartbeats: each worker's in, and the balancer's own beats out (its tick and beat timers)
    t0 = time.process_time()
    beats_out = 0
    for _ in range(rounds):
        clock[0] += core.options.interval
        # the master and the peer stay alive (one message each a round, next to the workers' N)
        feed("m0", Heartbeat(5, seq[0], 1))
        feed("peer_in", PeerState(int(State.BACKUP), 0, 1, "peer", "tcp://peer:1"))
        for name in names:
            feed(WORKERS, WorkerStatus(slots, slots, 0, 0, [], {}, name, False, 0, [], [], []), name.encode())
        todo = core.handle(TimerFired("tick", "t"), clock[0])
        while todo:
            more = []
            for e in todo:
                if isinstance(e, Send):
                    codec.encode(e.message)
                    beats_out += 1
                elif isinstance(e, StartTimer) and e.name in ("beat", "place"):
                    more += core.handle(TimerFired(e.name, "b"), clock[0])
            todo = more
    hb_cpu = time.process_time() - t0
    heartbeats = rounds * workers

    # tasks: request in, placed on a worker, its result in and out, the ack in and out
    job = os.urandom(16)
    up, lo = split128(job)
    t0 = time.process_time()
    for i in range(tasks):
        sent = feed("m0", WorkerRequest(up, lo, i, 5, 1 + i, 0, 0, "tile", b"", [],
                                        {"run": {"kind": "tile"}, "task": {"row": 1, "col": i}}))
        route = next((e.route for e in sent if e.socket == WORKERS and isinstance(e.message, WorkerRequest)), None)
        if route is None:
            raise RuntimeError(f"balancer part: task {i} was not placed")
        feed(WORKERS, TaskResult(up, lo, i, 5, 1 + i, 0, 0, {"score": i}, os.urandom(16), None, "", []), route)
        feed("m0", ResultAck(up, lo, i, 5, 1 + i, []))
    task_cpu = time.process_time() - t0
    return {"workers": workers, "slots_per_worker": slots, "heartbeats": heartbeats, "beats_out": beats_out,
            "cpu_us_per_heartbeat": round(1e6 * hb_cpu / heartbeats, 2), "tasks": tasks,
            "cpu_us_per_task": round(1e6 * task_cpu / tasks, 1),
            "note": "in process: codec and core, no sockets (a lower bound on the loop)"}


# ---- 3. storage: boundary-sized files, 2 copies ------------------------------------------------


def measure_storage(root: Path, files: int, tile: int) -> dict:
    from cluster.local import credentials_as, start_all, stop_all, storage_nodes
    from cluster.node.storagelink import LinkPool, upload_ranked
    from proto.fileids import file_id as content_id
    from worker.tiles import boundary_size

    size = boundary_size(tile, tile)
    config, nodes = storage_nodes(root / "storage", 2)
    start_all(nodes, 30)
    try:
        creds = credentials_as(config, "rackplan", "worker")
        links = LinkPool({n.name: n.address for n in nodes}, timeout=30, credentials=creds)
        blobs = [os.urandom(size) for _ in range(files)]
        ids = [content_id(b) for b in blobs]
        pids = [n.pid for n in nodes]
        c0, n0, t0 = time.process_time(), [cpu_s(p) for p in pids], time.perf_counter()
        for fid, blob in zip(ids, blobs):
            upload_ranked(links, fid, size, lambda off, k, b=blob: memoryview(b)[off:off + k], copies=2, origin="rackplan")
        up_wall, up_client = time.perf_counter() - t0, time.process_time() - c0
        n1 = [cpu_s(p) for p in pids]
        c0, t0 = time.process_time(), time.perf_counter()
        for i, fid in enumerate(ids):
            link = links.get(nodes[i % 2].name)
            for off in range(0, size, 1 << 20):  # the FUSE view's 1 MiB block fetches
                link.read(fid, off, 1 << 20)
        rd_wall, rd_client = time.perf_counter() - t0, time.process_time() - c0
        n2 = [cpu_s(p) for p in pids]
        links.close()
    finally:
        stop_all(nodes)
    mb = files * size / 1e6
    return {"files": files, "file_bytes": size, "copies": 2, "security": "CURVE",
            "upload_files_per_s": round(files / up_wall, 1), "upload_mb_s": round(mb / up_wall, 1),
            "upload_nodes_cpu_ms_per_file": round(1000 * (sum(n1) - sum(n0)) / files, 2),
            "upload_client_cpu_ms_per_file": round(1000 * up_client / files, 2),
            "read_files_per_s": round(files / rd_wall, 1), "read_mb_s": round(mb / rd_wall, 1),
            "read_nodes_cpu_ms_per_file": round(1000 * (sum(n2) - sum(n1)) / files, 2),
            "read_client_cpu_ms_per_file": round(1000 * rd_client / files, 2)}


# ---- what other benches recorded ----------------------------------------------------------------


def recorded() -> dict:
    """The figures of earlier runs this plan uses, each with its file."""
    out: dict[str, Any] = {}

    def load(name: str) -> dict | None:
        p = RESULTS / name
        return json.loads(p.read_text()) if p.exists() else None

    al = load("align.json")
    if al:
        row = next((r for r in al["rows"] if r.get("system") == "cluster" and r.get("tile_rows") == 65536), None)
        if row:
            slots = al["config"]["slots"]
            out["kernel"] = {"source": "align.json", "date": al["machine"]["date"], "pair": row["pair"],
                             "gcups_per_slot": round(row["gcups"] / slots, 2),
                             "idle_ms_per_tile": row["losses"]["per_tile_idle_ms"], "tiles": row["tiles"],
                             "tiles_pruned": row["tiles_pruned"], "rows_bytes": row["special_rows_bytes"],
                             "rows_tiles": row["tiles"] - row["tiles_pruned"]}
        lengths = {r["pair"]: (r["len_a"], r["len_b"]) for r in al["rows"] if "len_a" in r}
        out["traceback_rows"] = [{**t, "len_a": lengths[t["pair"]][0], "len_b": lengths[t["pair"]][1], "source": "align.json"}
                                 for t in al.get("traceback", []) if t.get("pair") in lengths]
    st = load("storage-curve.json")
    if st:
        out["storage_curve"] = {"source": "storage-curve.json", "date": st["machine"]["date"]}
    ba = load("batch.json")
    if ba and "dispatch" in ba and "dispatch_heartbeat_1s" in ba:
        a, b = ba["dispatch"], ba["dispatch_heartbeat_1s"]
        # two runs, 1,000 workers, the same task rate: 0.25 s and 1 s heartbeats. Solve
        # cpu = heartbeats/s x h + tasks/s x t for h (one heartbeat in and one out) and t
        ha = 2 * a["config"]["workers"] / a["config"]["heartbeat"]["interval_s"] / 2
        hb = 2 * b["config"]["workers"] / b["config"]["heartbeat"]["interval_s"] / 2
        ca, cb = a["cpu_cores_in_window"][a["active_balancer"]], b["cpu_cores_in_window"][b["active_balancer"]]
        ta, tb_ = a["achieved_tasks_per_s"], b["achieved_tasks_per_s"]
        h = (ca - cb * ta / tb_) / (ha - hb * ta / tb_)
        t = (cb - hb * h) / tb_
        out["balancer_processes"] = {"source": "batch.json (1,000 simulated workers, real processes)",
                                     "cores": [ca, cb], "heartbeats_per_s": [ha, hb], "tasks_per_s": [ta, tb_],
                                     "cpu_us_per_heartbeat": round(1e6 * h, 1), "cpu_ms_per_task": round(1e3 * t, 3)}
    return out


# ---- main -------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict:
    q = args.quick
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rackplan-") as tmp:
        root = Path(tmp)
        side = args.grid or (40 if q else 80)
        log(f"1. leader: a {side} x {side} tile grid through 3 masters and a tile echo")
        out["leader"] = measure_leader(root, side, args.tile)
        log(f"   {out['leader']['tiles_per_s']:,} tiles/s, leader {out['leader']['leader_cpu_ms_per_tile']} ms CPU a tile")
        log("2. balancer core in process")
        out["balancer"] = measure_balancer(64, 16, 20 if q else 100, 2000 if q else 10_000)
        out["balancer_1024"] = measure_balancer(1024, 1, 5 if q else 20, 2000 if q else 10_000)
        log(f"   {out['balancer']['cpu_us_per_heartbeat']} us a heartbeat, {out['balancer']['cpu_us_per_task']} us a task")
        log("3. storage: boundary-sized files, 2 copies, CURVE")
        out["storage"] = measure_storage(root, 60 if q else 200, args.tile)
        log(f"   {out['storage']['upload_files_per_s']} files/s stored, {out['storage']['read_files_per_s']} read")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller measurements (~40 s)")
    ap.add_argument("--json", default=str(RESULTS / "rackplan.json"), help="where to write the results")
    ap.add_argument("--model-only", action="store_true", help="no measuring: the plan from --json's measurements")
    ap.add_argument("--grid", type=int, default=None, help="tiles a side of the leader's grid (default 80, --quick 40)")
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--cores", type=int, default=16, help="task slots per node")
    ap.add_argument("--len-a", type=float, default=180e6, help="letters of A (columns)")
    ap.add_argument("--len-b", type=float, default=183e6, help="letters of B (rows)")
    ap.add_argument("--tile", type=int, default=65536)
    ap.add_argument("--gcups", type=float, default=None, help="GCUPS per core (default: align.json's per slot)")
    ap.add_argument("--storage-nodes", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    args = ap.parse_args(argv)

    started = time.perf_counter()
    if args.model_only:
        res = json.loads(Path(args.json).read_text())
    else:
        res = {"machine": machine.machine_info(), "config": {"quick": args.quick, "tile": args.tile}}
        cpu0 = machine.cpu_times()
        res["measured"] = measure(args)
        res["machine"]["cpu_shares_during_run"] = machine.cpu_shares(cpu0, machine.cpu_times())
    res["recorded"] = recorded()
    rack = {"nodes": args.nodes, "cores": args.cores, "len_a": args.len_a, "len_b": args.len_b, "tile": args.tile,
            "storage_nodes": args.storage_nodes, "replicas": args.replicas,
            "gcups": args.gcups or res["recorded"].get("kernel", {}).get("gcups_per_slot", 8.0)}
    res["rack"] = rack
    res["plan"] = plan(rack, res["measured"], res["recorded"])
    res["elapsed_s"] = round(time.perf_counter() - started, 1)
    res["json_path"] = args.json
    Path(args.json).write_text(json.dumps(res, indent=1, default=float) + "\n")
    print_plan(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
