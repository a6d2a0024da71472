#!/usr/bin/env python3
"""Batch-work benchmark (issue 10), first part: work units in the core and in the ledger.

What it measures on this machine, each part in a fresh process of its own (so that the memory
it reports is its own):

* loading 10^6 units (``--units``) into one spec's ``UnitTable`` in batches of 10,000 (the size
  one ledger command would carry): seconds, units/s, and the resident memory it added (RSS read
  from /proc before and after, the Python objects, lists and numpy columns together);
* a snapshot: ``to_state`` + MessagePack (msgspec) encode, its bytes and seconds; then decode +
  ``from_state`` (the restore), and a check that the restored table is the same;
* leasing and ending every unit in batches of 1,000 (what dispatch would do, without the
  network): units/s; and one vectorised lease-expiry scan of the whole table;
* the same 10^6 units through the ledger (``master.ledger.Ledger``), as the masters apply them:
  one ``AddWorkSpec`` and batches of ``AddUnits`` commands, each encoded and decoded as the Raft
  log carries it; the process's RSS at the end (what one master's state machine holds, without
  pysyncobj's log), the ledger snapshot's bytes and seconds, and ``Ledger.restore``'s seconds.

* draining no-op units (``true``) through a local cluster (3 masters, the balancer pair, one
  worker of 2 slots): 100,000 units (``--quick``: 5,000), seconds from the load to the last unit
  finished, units/s.

NOT measured yet (not written yet): a running master's RSS with its Raft log, 1,000 simulated
workers' dispatch latency. The JSON says so (``not_measured``).

    .venv/bin/python bench/batch.py [--quick] [--units N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from bench import machine  # noqa: E402
from cluster import __version__  # noqa: E402
from master.workspec import DONE, UnitTable  # noqa: E402

BATCH = 10_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(n: int) -> dict:
    t = UnitTable()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        t.add([[f"unit-{k:08d}", b"s3://bucket/input-%08d" % k] for k in range(start, min(n, start + BATCH))])
    load_s = time.perf_counter() - t0
    rss1 = rss_bytes()
    t0 = time.perf_counter()
    blob = msgspec.msgpack.encode(t.to_state())
    snap_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = UnitTable.from_state(msgspec.msgpack.decode(blob))
    restore_s = time.perf_counter() - t0
    assert again.summary() == t.summary() and again.keys[-1] == t.keys[-1]
    del again
    t0 = time.perf_counter()
    now = 0.0
    while True:
        got = t.lease(1000, f"w{int(now) % 1000}", now, 300.0)
        if not got:
            break
        for uid in got:
            t.end(uid, DONE, now + 1, 3)
        now += 1
    drain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    t.expired(now)
    scan_s = time.perf_counter() - t0
    assert t.summary()["finished"] == n
    return {"units": n, "load_s": round(load_s, 3), "load_units_per_s": round(n / load_s),
            "rss_added_bytes": rss1 - rss0, "rss_bytes_per_unit": round((rss1 - rss0) / n, 1),
            "snapshot_bytes": len(blob), "snapshot_s": round(snap_s, 3), "restore_s": round(restore_s, 3),
            "snapshot_plus_restore_s": round(snap_s + restore_s, 3),
            "lease_and_end_units_per_s": round(n / drain_s), "expiry_scan_s": round(scan_s, 4)}


def measure_ledger(n: int) -> dict:
    from master import commands
    from master.ledger import Ledger

    rss0 = rss_bytes()
    ledger = Ledger()
    t0 = time.perf_counter()
    ledger.apply(commands.decode(commands.encode(commands.AddWorkSpec({"name": "bench", "run": {"kind": "call"}}, 0.0))))
    for start in range(0, n, BATCH):
        batch = [[f"unit-{k:08d}", b"s3://bucket/input-%08d" % k] for k in range(start, min(n, start + BATCH))]
        entry = commands.encode(commands.AddUnits("bench", batch, 0.0))
        assert ledger.apply(commands.decode(entry)).ok
    load_s = time.perf_counter() - t0
    rss = rss_bytes()
    t0 = time.perf_counter()
    blob = ledger.snapshot()
    snap_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = Ledger.restore(blob)
    restore_s = time.perf_counter() - t0
    assert again.work_summary() == ledger.work_summary()
    return {"units": n, "load_s": round(load_s, 3), "load_units_per_s": round(n / load_s),
            "rss_bytes": rss, "rss_added_bytes": rss - rss0, "snapshot_bytes": len(blob),
            "snapshot_s": round(snap_s, 3), "restore_s": round(restore_s, 3),
            "snapshot_plus_restore_s": round(snap_s + restore_s, 3)}


def measure_drain(n: int) -> dict:
    """``n`` no-op command units (``true``) through a local cluster: 3 masters, the balancer
    pair, one worker of 2 slots, 127.0.0.1. Seconds from the load's end to the last unit
    finished, as the ledger's summary says (polled every 0.2 s)."""
    import tempfile

    from cluster.client import Client
    from cluster.local import balancer_nodes, master_nodes, start_all, stop_all, worker_nodes
    from cluster.work import Work

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as d:
        work_dir = Path(d)
        masters = master_nodes(work_dir, 3, log_level="WARNING")
        config, balancers = balancer_nodes(work_dir, 2, log_level="WARNING")
        workers = worker_nodes(work_dir, config, 1, slots=2, log_level="WARNING")
        nodes = masters + balancers + workers
        try:
            start_all(nodes, timeout=30)
            with Client([m.address for m in masters], timeout=30) as client:
                work = Work(client)
                work.add_spec("noop", {"kind": "command", "argv": ["true"]}, paused=True)
                t0 = time.perf_counter()
                work.add_units("noop", ((f"u{k:07d}", b"") for k in range(n)))
                load_s = time.perf_counter() - t0
                work.resume("noop")
                t0 = time.perf_counter()
                deadline = t0 + 3600
                while time.perf_counter() < deadline:
                    row = work.summary()[0]
                    if row["finished"] + row["failed"] == n:
                        break
                    time.sleep(0.2)  # polling the ledger's summary: the units end inside the cluster
                drain_s = time.perf_counter() - t0
        finally:
            stop_all(nodes[::-1])
    return {"units": n, "load_s": round(load_s, 3), "drain_s": round(drain_s, 3),
            "units_per_s": round(n / drain_s, 1), "finished": row["finished"], "failed": row["failed"],
            "cluster": "3 masters, 2 balancers, 1 worker x 2 slots, 127.0.0.1; each unit runs `true`"}


def part(name: str, n: int) -> dict:
    """Run one part in a fresh interpreter and return its figures."""
    import json
    import subprocess

    code = f"import json, bench.batch as b; print(json.dumps(b.{name}({n})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^5 units (a few seconds)")
    ap.add_argument("--units", type=int, default=None, help="units to load (default 10^6; --quick 10^5)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "batch.json"))
    args = ap.parse_args(argv)
    n = args.units or (100_000 if args.quick else 1_000_000)
    started, cpu0 = time.perf_counter(), machine.cpu_times()
    res = {"machine": machine.machine_info(cluster=__version__, msgspec=msgspec.__version__),
           "config": {"units": n, "batch": BATCH, "what": "master.workspec.UnitTable in one process"},
           "core": part("measure", n), "ledger": part("measure_ledger", n),
           "drain": part("measure_drain", 5_000 if args.quick else 100_000),
           "not_measured": ["a running master's RSS with its Raft log", "1,000 simulated workers: dispatch p50/p99"]}
    machine.finish(res, cpu0, started, args.json)
    c = res["core"]
    rows = [("units", f"{c['units']:,}"), ("load", f"{c['load_s']:.2f} s ({c['load_units_per_s']:,} units/s)"),
            ("memory added", f"{c['rss_added_bytes'] / 2**20:.0f} MiB ({c['rss_bytes_per_unit']:.0f} B/unit)"),
            ("snapshot", f"{c['snapshot_bytes'] / 2**20:.0f} MiB in {c['snapshot_s']:.2f} s"),
            ("restore", f"{c['restore_s']:.2f} s (snapshot + restore {c['snapshot_plus_restore_s']:.2f} s)"),
            ("lease + end", f"{c['lease_and_end_units_per_s']:,} units/s"),
            ("expiry scan", f"{c['expiry_scan_s'] * 1e3:.1f} ms over all units")]
    print("work units, master.workspec core alone (one process):")
    for k, v in rows:
        print(f"  {k:<14} {v}")
    g = res["ledger"]
    print(f"through the ledger (AddUnits commands of {BATCH:,}, encoded and decoded as the log carries them):")
    for k, v in [("load", f"{g['load_s']:.2f} s ({g['load_units_per_s']:,} units/s)"),
                 ("process RSS", f"{g['rss_bytes'] / 2**20:.0f} MiB (the ledger added {g['rss_added_bytes'] / 2**20:.0f} MiB)"),
                 ("snapshot", f"{g['snapshot_bytes'] / 2**20:.0f} MiB in {g['snapshot_s']:.2f} s"),
                 ("restore", f"{g['restore_s']:.2f} s (snapshot + restore {g['snapshot_plus_restore_s']:.2f} s)")]:
        print(f"  {k:<14} {v}")
    dr = res["drain"]
    print(f"drained through the cluster ({dr['cluster']}): {dr['units']:,} units in {dr['drain_s']:.1f} s = "
          f"{dr['units_per_s']:,.0f} units/s (loaded in {dr['load_s']:.1f} s); finished {dr['finished']:,}, "
          f"failed {dr['failed']}")
    print(f"not measured yet: {'; '.join(res['not_measured'])}")
    print(f"results in {res['json_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
