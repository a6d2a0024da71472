#!/usr/bin/env python3
"""Batch-work benchmark (issue 10): work units in the core, the ledger and a running cluster,
and dispatch to 1,000 simulated workers.

What it measures on this machine, each part in a fresh process of its own (so that the memory
it reports is its own); ``--parts`` runs a subset:

* ``core``: loading 10^6 units (``--units``) into one spec's ``UnitTable`` in batches of 10,000
  (the size one ledger command would carry): seconds, units/s, and the resident memory it added
  (RSS read from /proc before and after, the Python objects, lists and numpy columns together);
  a snapshot: ``to_state`` + MessagePack (msgspec) encode, its bytes and seconds; then decode +
  ``from_state`` (the restore), and a check that the restored table is the same; leasing and
  ending every unit in batches of 1,000 (what dispatch would do, without the network): units/s;
  and one vectorised lease-expiry scan of the whole table;
* ``ledger``: the same 10^6 units through the ledger (``master.ledger.Ledger``), as the masters
  apply them: one ``AddWorkSpec`` and batches of ``AddUnits`` commands, each encoded and decoded
  as the Raft log carries it; the process's RSS at the end (what one master's state machine
  holds, without pysyncobj's log), the ledger snapshot's bytes and seconds, and
  ``Ledger.restore``'s seconds;
* ``drain``: draining no-op units (``true``) through a local cluster (3 masters, the balancer
  pair, one worker of 2 slots): 100,000 units (``--quick``: 5,000), seconds from the load to the
  last unit finished, units/s;
* ``masters``: 3 running masters (no balancers, no workers) loaded with 10^6 units (``--quick``:
  10^5) of one paused spec through ``Work.add_units`` (batches of 10,000, as the client sends
  them): the load's seconds, and per master process (by pid) its RSS and peak RSS (VmRSS, VmHWM)
  and the bytes of its data dir (the Raft journal, its meta file, the ledger snapshot) idle,
  after the load and, unless ``--snapshot-wait 0`` (the default with ``--quick``), again after
  pysyncobj's first log compaction, which comes 300 s after start (``logCompactionMinTime``;
  the load is ~50 log entries, far below ``snapshot_every`` = 20,000). Nothing is triggered;
* ``dispatch``: 1,000 simulated workers (bench/simworkers.py: the real ``worker.core`` protocol,
  1 slot, no prefetch, in 4 processes) against the balancer pair of a local cluster (3 masters,
  2 balancers), no-op units loaded paused then resumed, tasks "running" 5 s on average (offered
  200 tasks/s; the drain above is ~400/s). The dispatch latency per task: from the moment the
  worker announced its free slot (its TASK_RESULT) to the WORKER_REQUEST's arrival, measured in
  the worker's process, over a 60 s window after a 10 s warm-up, each worker's first task
  excluded: p50/p90/p99/max and count, offered and achieved tasks/s, each process's CPU share
  in the window. Run twice: at the default ``[heartbeat]`` (0.25 s) and at 1 s / 3 s liveness
  (``dispatch_heartbeat_1s``). ``--quick``: 200 workers in 2 processes, 2 s tasks, a 10 s
  window, the default heartbeat only.

    .venv/bin/python bench/batch.py [--quick] [--units N] [--parts core,ledger,...] [--json PATH]
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
    assert again.work.summary() == ledger.work.summary()
    return {"units": n, "load_s": round(load_s, 3), "load_units_per_s": round(n / load_s),
            "rss_bytes": rss, "rss_added_bytes": rss - rss0, "snapshot_bytes": len(blob),
            "snapshot_s": round(snap_s, 3), "restore_s": round(restore_s, 3),
            "snapshot_plus_restore_s": round(snap_s + restore_s, 3)}


def load_noop(work, n: int) -> float:
    """Add spec ``noop`` (paused; each unit runs ``true``) and ``n`` units; the load's seconds."""
    work.add_spec("noop", {"kind": "command", "argv": ["true"]}, paused=True)
    t0 = time.perf_counter()
    work.add_units("noop", ((f"u{k:07d}", b"") for k in range(n)))
    return time.perf_counter() - t0


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
                load_s = load_noop(work, n)
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


def proc_memory(pid: int) -> dict[str, int]:
    """A process's resident memory now (VmRSS) and its peak (VmHWM), in bytes, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key.lower()] = int(line.split()[1]) * 1024  # the kernel writes kB
    return {"rss_bytes": out["vmrss"], "hwm_bytes": out["vmhwm"]}


def data_dir_files(directory: Path) -> dict[str, dict[str, int]]:
    """Every file of a master's data dir: its size and the bytes it takes on disk (the journal
    is an mmap'd file that pysyncobj grows ahead of what it holds, so the two differ)."""
    out = {}
    for p in sorted(directory.iterdir()) if directory.exists() else ():
        if p.is_file():
            st = p.stat()
            out[p.name] = {"size": st.st_size, "on_disk": st.st_blocks * 512}
    return out


def master_snapshots(masters: list, work_dir: Path) -> list[dict]:
    """Each master's memory (by pid), its data dir's files and what its status says of the Raft
    log (size, indices, the last snapshot) and of the ledger."""
    from cluster.node.status import query_status

    replies = query_status([m.address for m in masters], timeout=10)
    out = []
    for m, r in zip(masters, replies):
        d = r.reply.detail if r.reply is not None else {}
        files = data_dir_files(work_dir / m.name)
        out.append({"name": m.name, "pid": m.pid, "state": d.get("state"), **proc_memory(m.pid),
                    "log_size": d.get("log_size"), "commit_index": d.get("commit_index"),
                    "last_applied": d.get("last_applied"), "last_snapshot": d.get("last_snapshot"),
                    "files": files, "files_bytes": sum(f["size"] for f in files.values()),
                    "files_on_disk_bytes": sum(f["on_disk"] for f in files.values())})
    return out


def measure_masters(n: int, snapshot_wait: float = 0.0) -> dict:
    """A running cluster of 3 masters (no balancers, no workers) loaded with ``n`` units of one
    paused spec through ``Work.add_units`` (batches of 10,000, as the client sends them): the
    load's seconds, then per master (by pid) its RSS and peak RSS and the bytes of its Raft
    journal and snapshot files. pysyncobj compacts the log (our ledger snapshot) after
    ``snapshot_every`` entries (20,000; the load is one entry per batch) or ``logCompactionMinTime``
    (pysyncobj's default, 300 s) after the last one, i.e. 300 s after start here; with
    ``snapshot_wait`` > 0 the part waits (that long at most) until every master has written
    one and measures again. Nothing is triggered: the masters run as configured."""
    import tempfile

    from cluster.client import Client
    from cluster.local import master_nodes, start_all, stop_all
    from cluster.node.status import query_status
    from cluster.work import Work

    with tempfile.TemporaryDirectory(prefix="bench-masters-") as d:
        work_dir = Path(d)
        masters = master_nodes(work_dir, 3, log_level="WARNING")
        try:
            start_all(masters, timeout=30)
            started = time.monotonic()
            with Client([m.address for m in masters], timeout=60) as client:
                work = Work(client)
                work.add_spec("bench", {"kind": "command", "argv": ["true"]}, paused=True)
                idle = master_snapshots(masters, work_dir)
                t0 = time.perf_counter()
                work.add_units("bench", ((f"unit-{k:08d}", b"s3://bucket/input-%08d" % k) for k in range(n)))
                load_s = time.perf_counter() - t0
            # the followers apply what the leader committed a moment later: wait until every
            # master has applied as far as the leader's commit index (polled: no event to wait on)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                views = [r.reply.detail for r in query_status([m.address for m in masters], timeout=5) if r.reply]
                commit = max((v["commit_index"] for v in views), default=0)
                if len(views) == 3 and all(v["last_applied"] >= commit for v in views):
                    break
                time.sleep(0.1)
            loaded = master_snapshots(masters, work_dir)
            snap = None
            if snapshot_wait > 0:
                deadline = time.monotonic() + snapshot_wait
                while time.monotonic() < deadline:
                    views = [r.reply.detail for r in query_status([m.address for m in masters], timeout=5) if r.reply]
                    if len(views) == 3 and all(v.get("last_snapshot") for v in views):
                        break
                    time.sleep(1.0)  # compaction runs on pysyncobj's own clock: poll for its outcome
                time.sleep(1.0)  # the journal is rewritten right after the snapshot's rename
                snap = master_snapshots(masters, work_dir)
                snap_at = round(time.monotonic() - started, 1)
        finally:
            stop_all(masters[::-1])
    worst = max(m["rss_bytes"] for m in loaded)
    res = {"units": n, "batch": BATCH, "load_s": round(load_s, 3), "load_units_per_s": round(n / load_s),
           "idle": idle, "after_load": loaded, "max_rss_after_load_bytes": worst,
           "max_hwm_bytes": max(m["hwm_bytes"] for m in (snap or loaded)),
           "under_1_gib_per_master": max(m["hwm_bytes"] for m in (snap or loaded)) < 2**30,
           "cluster": "3 masters, no balancers or workers, 127.0.0.1; one spec, paused",
           "compaction": "pysyncobj compacts after snapshot_every = 20,000 entries or 300 s "
                         "(logCompactionMinTime) since the last; the load is one entry per batch",
           "snapshot_wait_s": snapshot_wait}
    if snap is not None:
        res["after_snapshot"] = snap
        res["after_snapshot_at_s"] = snap_at
        res["snapshot_taken"] = all(m["last_snapshot"] for m in snap)
    return res


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds (nearest rank), and the count."""
    v = sorted(values)
    if not v:
        return {"count": 0}

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))] * 1e3, 2)

    return {"count": len(v), "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "max_ms": round(v[-1] * 1e3, 2),
            "mean_ms": round(sum(v) / len(v) * 1e3, 2)}


def measure_dispatch(workers: int, procs: int, run_s: float, warmup_s: float, window_s: float,
                     heartbeat_s: float = 0.25) -> dict:
    """``workers`` simulated workers (bench/simworkers.py, in ``procs`` processes; 1 slot each,
    no prefetch, so every task is a dispatch) against the balancer pair of a local cluster (3
    masters, 2 balancers, no real workers, 127.0.0.1), fed by one spec of no-op command units
    loaded paused, then resumed. Each worker's tasks "run" ``run_s`` × uniform(0.5, 1.5) s, so
    the offered load is ``workers / run_s`` tasks/s.

    Latency: per WORKER_REQUEST a simulated worker receives, from the moment that worker
    announced its free slot (its TASK_RESULT; its registration for the first task) to the
    request's arrival, measured in the worker's process on CLOCK_MONOTONIC. Counted: requests
    arriving in ``[resume + warmup_s, resume + warmup_s + window_s]``, never a worker's first
    (it waited for the resume, not for dispatch). Enough units are loaded that the balancer's
    queue never runs dry in the window (its pending count is sampled every 5 s to show it).

    ``heartbeat_s``: the cluster's ``[heartbeat] interval_s`` (liveness 3 intervals when not the
    default 0.25 s): the workers' and balancers' heartbeats are most of the messages here."""
    import json
    import signal
    import subprocess
    import tempfile

    from cluster.client import Client
    from cluster.local import balancer_nodes, master_nodes, start_all, stop_all
    from cluster.node.status import query_status
    from cluster.work import Work

    offered = workers / run_s
    # the balancer holds queue_factor (16) tasks per slot; beyond that, what the window consumes
    units = 16 * workers + int(1.5 * offered * (warmup_s + window_s + 10))
    per = [workers // procs + (1 if k < workers % procs else 0) for k in range(procs)]
    sims: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as d:
        work_dir = Path(d)
        masters = master_nodes(work_dir, 3, log_level="WARNING")
        from cluster.node.config import HeartbeatOptions

        beat = (HeartbeatOptions() if heartbeat_s == 0.25 else
                HeartbeatOptions(interval_s=heartbeat_s, worker_liveness_s=3 * heartbeat_s, balancer_liveness_s=3 * heartbeat_s))
        config, balancers = balancer_nodes(work_dir, 2, log_level="WARNING", heartbeat=beat)
        nodes = masters + balancers
        outs = [work_dir / f"sim{k}.json" for k in range(procs)]
        samples_q: list[dict] = []
        try:
            start_all(nodes, timeout=30)
            with Client([m.address for m in masters], timeout=60) as client:
                work = Work(client)
                load_s = load_noop(work, units)
                loaded = time.perf_counter()
                first = 1
                for k, count in enumerate(per):
                    with open(work_dir / f"sim{k}.log", "ab") as log:
                        sims.append(subprocess.Popen(
                            [sys.executable, str(ROOT / "bench" / "simworkers.py"), "--config", str(config),
                             "--count", str(count), "--first", str(first), "--run-s", str(run_s), "--seed", str(k + 1),
                             "--max-s", str(warmup_s + window_s + 300), "--out", str(outs[k])],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True))
                    first += count
                active = balancers[0]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # polling the balancer's registry: no event to wait on
                    r = query_status([b.address for b in balancers], timeout=5)
                    regs = {b.name: (x.reply.detail.get("registry", {}).get("workers", 0) if x.reply else 0)
                            for b, x in zip(balancers, r)}
                    if max(regs.values()) >= workers:
                        active = max(balancers, key=lambda b: regs[b.name])
                        break
                    time.sleep(0.5)
                else:
                    raise TimeoutError(f"simulated workers registered: {regs}, wanted {workers}")
                registered_s = round(time.perf_counter() - loaded, 2)
                summary0 = work.summary()[0]
                work.resume("noop")
                resumed = time.monotonic()
                end = resumed + warmup_s + window_s
                pids = {n.name: n.pid for n in nodes} | {f"sim{k}": p.pid for k, p in enumerate(sims)}
                time.sleep(warmup_s)
                cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                while time.monotonic() < end:
                    time.sleep(min(5.0, max(0.0, end - time.monotonic())))
                    r = query_status([active.address], timeout=5)[0].reply
                    if r is not None:
                        samples_q.append({"t_s": round(time.monotonic() - resumed, 1),
                                          "pending": r.detail["dispatch"]["pending"],
                                          "running": r.detail["registry"]["running"],
                                          "free": r.detail["registry"]["free"]})
                cpu = {name: round((cpu_seconds(pid) - cpu0[name]) / window_s, 3) for name, pid in pids.items()}
                summary1 = work.summary()[0]
                bal_status = query_status([active.address], timeout=5)[0].reply
        finally:
            for p in sims:  # by pid, always; SIGKILL only if one does not write its report in time
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in sims:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            stop_all(nodes[::-1])
        reports = [json.loads(o.read_text()) for o in outs if o.exists()]
    lo, hi = resumed + warmup_s, resumed + warmup_s + window_s
    counted = [s[1] for r in reports for s in r["samples"] if lo <= s[0] <= hi and s[3] > 0]
    arrived = sum(1 for r in reports for s in r["samples"] if lo <= s[0] <= hi)
    counters: dict[str, int] = {}
    for r in reports:
        for k, v in r["counters"].items():
            counters[k] = counters.get(k, 0) + v
    core = bal_status.detail.get("core", {}) if bal_status is not None else {}
    return {
        "latency": percentiles(counted),
        "definition": "per WORKER_REQUEST received by a simulated worker: from the moment it announced its free "
                      "slot (its TASK_RESULT, on which the slot's credit rides; its registration for its first "
                      "task) to the request's arrival, measured in the worker's process (CLOCK_MONOTONIC); "
                      "requests arriving in the window only, each worker's first task excluded",
        "offered_tasks_per_s": round(offered, 1),
        "achieved_tasks_per_s": round(arrived / window_s, 1),
        "finished_in_ledger_per_s": round((summary1["finished"] - summary0["finished"]) / (warmup_s + window_s), 1),
        "config": {"workers": workers, "processes": procs, "slots_per_worker": 1, "prefetch": 0,
                   "run_s_mean": run_s, "run_s_spread": "uniform(0.5, 1.5) x mean",
                   "warmup_s": warmup_s, "window_s": window_s, "units_loaded": units,
                   "heartbeat": beat.__dict__, "cluster": "3 masters, 2 balancers (Binary Star pair), no real workers, "
                   "127.0.0.1; simulated workers run worker.core.WorkerCore over 2 DEALERs each"},
        "load_s": round(load_s, 2), "registered_after_s": registered_s,
        "cpu_cores_in_window": cpu, "active_balancer": active.name,
        "balancer_queue": samples_q,
        "min_pending_in_window": min((s["pending"] for s in samples_q), default=None),
        "balancer_counters": {k: core[k] for k in sorted(core) if not k.startswith("peer")},
        "sim_counters": counters,
        "sim_loop": [r["loop"] for r in reports],
        "sim_registered": sum(r["registered"] for r in reports),
    }


def part(name: str, *args: object) -> dict:
    """Run one part in a fresh interpreter and return its figures."""
    import json
    import subprocess

    code = f"import json, bench.batch as b; print(json.dumps(b.{name}(*{args!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


PARTS = ("core", "ledger", "drain", "masters", "dispatch")


def run_parts(parts: list[str], n: int, quick: bool, snapshot_wait: float) -> dict:
    """Each part asked for, in a fresh process of its own, in the order of ``PARTS``."""
    res: dict = {}
    if "core" in parts:
        res["core"] = part("measure", n)
    if "ledger" in parts:
        res["ledger"] = part("measure_ledger", n)
    if "drain" in parts:
        res["drain"] = part("measure_drain", 5_000 if quick else 100_000)
    if "masters" in parts:
        res["masters"] = part("measure_masters", n, snapshot_wait)
    if "dispatch" in parts:
        # --quick: 200 workers in 2 processes and a 10 s window, to keep the whole run under a minute
        res["dispatch"] = (part("measure_dispatch", 200, 2, 2.0, 4.0, 10.0) if quick
                           else part("measure_dispatch", 1000, 4, 5.0, 10.0, 60.0))
        res["dispatch"]["quick"] = quick
        if not quick:  # the same with the heartbeats a rack of 1,000 would be given (1 s, 3 s: Paranoid Pirate's)
            res["dispatch_heartbeat_1s"] = part("measure_dispatch", 1000, 4, 5.0, 10.0, 60.0, 1.0)
    return res


def print_table(res: dict) -> None:
    """The figures of the parts in ``res``, for people."""
    if "core" in res:
        c = res["core"]
        print("work units, master.workspec core alone (one process):")
        for k, v in [("units", f"{c['units']:,}"), ("load", f"{c['load_s']:.2f} s ({c['load_units_per_s']:,} units/s)"),
                     ("memory added", f"{c['rss_added_bytes'] / 2**20:.0f} MiB ({c['rss_bytes_per_unit']:.0f} B/unit)"),
                     ("snapshot", f"{c['snapshot_bytes'] / 2**20:.0f} MiB in {c['snapshot_s']:.2f} s"),
                     ("restore", f"{c['restore_s']:.2f} s (snapshot + restore {c['snapshot_plus_restore_s']:.2f} s)"),
                     ("lease + end", f"{c['lease_and_end_units_per_s']:,} units/s"),
                     ("expiry scan", f"{c['expiry_scan_s'] * 1e3:.1f} ms over all units")]:
            print(f"  {k:<14} {v}")
    if "ledger" in res:
        g = res["ledger"]
        print(f"through the ledger (AddUnits commands of {BATCH:,}, encoded and decoded as the log carries them):")
        for k, v in [("load", f"{g['load_s']:.2f} s ({g['load_units_per_s']:,} units/s)"),
                     ("process RSS", f"{g['rss_bytes'] / 2**20:.0f} MiB (the ledger added {g['rss_added_bytes'] / 2**20:.0f} MiB)"),
                     ("snapshot", f"{g['snapshot_bytes'] / 2**20:.0f} MiB in {g['snapshot_s']:.2f} s"),
                     ("restore", f"{g['restore_s']:.2f} s (snapshot + restore {g['snapshot_plus_restore_s']:.2f} s)")]:
            print(f"  {k:<14} {v}")
    if "drain" in res:
        dr = res["drain"]
        print(f"drained through the cluster ({dr['cluster']}): {dr['units']:,} units in {dr['drain_s']:.1f} s = "
              f"{dr['units_per_s']:,.0f} units/s (loaded in {dr['load_s']:.1f} s); finished {dr['finished']:,}, "
              f"failed {dr['failed']}")
    if "masters" in res:
        ms = res["masters"]
        print(f"running masters ({ms['cluster']}): {ms['units']:,} units loaded through the client in "
              f"{ms['load_s']:.1f} s ({ms['load_units_per_s']:,} units/s); per master, RSS (peak) and data dir bytes:")
        for phase in ("idle", "after_load", "after_snapshot"):
            for m in ms.get(phase, []):
                files = ", ".join(f"{k} {v['size'] / 2**20:.1f} MiB" for k, v in m["files"].items())
                snap = f", snapshot at log index {m['last_snapshot']['log_index']}" if m.get("last_snapshot") else ""
                print(f"  {phase:<14} {m['name']} ({m['state']:<8}) {m['rss_bytes'] / 2**20:5.0f} MiB "
                      f"({m['hwm_bytes'] / 2**20:.0f}), log {m['log_size']} entries{snap}; {files}")
        print(f"  under 1 GiB per master (peak): {ms['under_1_gib_per_master']}")
    for key in ("dispatch", "dispatch_heartbeat_1s"):
        if key not in res:
            continue
        d, cfg = res[key], res[key]["config"]
        lat = d["latency"]
        print(f"dispatch latency, {cfg['workers']:,} simulated workers in {cfg['processes']} processes (1 slot, no "
              f"prefetch, tasks of {cfg['run_s_mean']:g} s mean, heartbeats every {cfg['heartbeat']['interval_s']:g} s) "
              f"against the balancer pair{' (--quick)' if d.get('quick') else ''}:")
        print(f"  offered {d['offered_tasks_per_s']:.0f} tasks/s, achieved {d['achieved_tasks_per_s']:.1f}; "
              f"{lat['count']:,} dispatches in a {cfg['window_s']:g} s window: p50 {lat['p50_ms']:.1f} ms, "
              f"p90 {lat['p90_ms']:.1f}, p99 {lat['p99_ms']:.1f}, max {lat['max_ms']:.1f} (p99 under 50 ms: "
              f"{lat['p99_ms'] < 50})")
        print(f"  CPU (cores) in the window: {d['cpu_cores_in_window']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^5 units, small cluster parts (under a minute)")
    ap.add_argument("--units", type=int, default=None, help="units to load (default 10^6; --quick 10^5)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--snapshot-wait", type=float, default=None,
                    help="masters part: seconds to wait for the first log compaction (default 330; --quick 0)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "batch.json"))
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    n = args.units or (100_000 if args.quick else 1_000_000)
    wait = args.snapshot_wait if args.snapshot_wait is not None else (0.0 if args.quick else 330.0)
    started, cpu0 = time.perf_counter(), machine.cpu_times()
    res = {"machine": machine.machine_info(cluster=__version__, msgspec=msgspec.__version__),
           "config": {"units": n, "batch": BATCH, "parts": parts, "quick": args.quick, "snapshot_wait_s": wait,
                      "what": "master.workspec.UnitTable in one process (core), the ledger (ledger), a local "
                              "cluster (drain, masters, dispatch)"},
           **run_parts(parts, n, args.quick, wait)}
    machine.finish(res, cpu0, started, args.json)
    print_table(res)
    print(f"results in {res['json_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
