#!/usr/bin/env python3
"""``Client.map`` over many items (issue 23, the client): time, memory and WATCH replies.

Run from the repository root::

    .venv/bin/python bench/map_window.py                  # 100,000 no-ops, once
    .venv/bin/python bench/map_window.py --items 20000 --reps 3 --json /tmp/m.json

The cluster is ``bench/dispatch.py``'s (``measure_ours``): 3 masters, the balancer pair, one
worker of 2 slots, on 127.0.0.1 with CURVE. One client maps ``noop`` over ``range(items)`` and
waits for every result, checking each value. Reported per rep: wall time (from the call to
the last result), the time ``map`` took to return, the client's peak RSS (its high-water mark,
``VmHWM``, read before and after: the first rep's includes the import of everything), the
masters' RSS after the rep (``VmRSS``, and their ``VmHWM``), the WATCH requests the client
sent, the replies and those that carried endings (the watcher's counters; the leader's
``watches_*`` counters say how it answered them: at once, woken by a commit, replaced by a newer
watch, expired), and the most tasks that were outstanding at once (the client's own count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def noop(i):
    return i


def proc_kib(pid: int | str, field: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def wait_registered(balancers: list, query_status, timeout: float = 30.0) -> None:
    """Until an active balancer, attached to the leader, lists a worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for b in balancers:
            r = query_status([b.address], timeout=0.5)[0].reply
            d = r.detail if r is not None else {}
            if d.get("state") == "active" and d.get("master", {}).get("attached") and d["registry"]["workers"]:
                return
        time.sleep(0.05)  # polling other processes' status: nothing to wait on
    raise TimeoutError(f"no worker registered with an active balancer within {timeout:g} s")


def leader_counters(masters: list, query_status) -> dict:
    """The serving leader's core counters (its WATCH answers among them)."""
    for result in query_status([m.address for m in masters], timeout=2.0):
        detail = result.reply.detail if result.reply is not None else {}
        if detail.get("state") == "leader":
            return dict(detail.get("core", {}))
    return {}


def run(args: argparse.Namespace) -> dict:
    import cloudpickle

    from cluster.client import Client
    from cluster.local import balancer_nodes, master_nodes, start_all, stop_all, worker_nodes
    from cluster.node.status import query_status

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    work = Path(tempfile.mkdtemp(prefix="map-window-"))
    masters = master_nodes(work, 3)
    config, balancers = balancer_nodes(work, 2)
    workers = worker_nodes(work, config, 1, slots=args.slots)
    nodes = masters + balancers + workers
    reps = []
    client = None
    try:
        start_all(nodes)
        sizes = {k: v for k, v in (("map_window", args.window), ("map_chunk", args.chunk)) if v}
        client = Client([m.address for m in masters], timeout=60, **sizes)
        wait_registered(balancers, query_status)
        [f.result(timeout=60) for f in client.map(noop, range(100))]  # warm up: the watcher, the slots
        for rep in range(args.reps):
            watcher = client._watcher
            before = dict(watcher.counters) if watcher is not None else {}
            hwm0 = proc_kib("self", "VmHWM")
            led0 = leader_counters(masters, query_status)
            t0 = time.perf_counter()
            futures = client.map(noop, range(args.items))
            returned = time.perf_counter() - t0
            wrong = sum(f.result(timeout=args.timeout) != i for i, f in enumerate(futures))
            wall = time.perf_counter() - t0
            watcher = client._watcher
            counters = {k: v - before.get(k, 0) for k, v in watcher.counters.items()}
            del futures
            led1 = leader_counters(masters, query_status)
            watch_keys = [k for k in led1 if k.startswith("watches_") or k.startswith("refused_")]
            out = {
                "items": args.items, "wall_s": round(wall, 2), "tasks_per_s": round(args.items / wall),
                "map_returned_s": round(returned, 3), "wrong": wrong,
                "client_hwm_mib": round(proc_kib("self", "VmHWM") / 1024, 1),
                "client_hwm_before_mib": round(hwm0 / 1024, 1),
                "masters_rss_mib": [round(proc_kib(m.pid, "VmRSS") / 1024, 1) for m in masters],
                "masters_hwm_mib": [round(proc_kib(m.pid, "VmHWM") / 1024, 1) for m in masters],
                "watcher": counters,
                "leader_watches": {k: led1.get(k, 0) - led0.get(k, 0) for k in sorted(watch_keys)},
                "window": getattr(client, "map_window", None), "chunk": args.chunk or None,
                "most_outstanding": getattr(client, "most_outstanding", None),
            }
            print(json.dumps(out), flush=True)
            reps.append(out)
        return {"reps": reps, "tasks_per_s_median": statistics.median(r["tasks_per_s"] for r in reps)}
    finally:
        if client is not None:
            client.close()
        stop_all(nodes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each result")
    ap.add_argument("--window", type=int, default=0, help="the client's map_window (default: the client's)")
    ap.add_argument("--chunk", type=int, default=0, help="the client's map_chunk (default: the client's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({"tasks_per_s_median": result["tasks_per_s_median"]}))


if __name__ == "__main__":
    main()
