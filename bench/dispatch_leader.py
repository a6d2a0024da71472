"""The leader's CPU per task at the rate it sustains, for ``bench/dispatch.py`` (issue 23).

On a rack the master leader's CPU per task bounds the whole cluster: workers and balancers
scale out, the leader does not. So the leader is measured alone, as far as one machine allows:
3 masters and the balancer pair (as shipped: CURVE on, Raft journals on disk) and no real
workers, only simulated ones (``bench/simworkers.py``: the real ``worker.core.WorkerCore``
protocol over its own two DEALERs with its own key; only running the task is simulated, and
here every task ends at once), with more slots than the leader can keep busy, so that the
workers are never the limit.

Two feeds, each for a window after a warm-up, on the same cluster:

* ``map``: ``feeders`` client processes (``bench/dispatch_feed.py``; one client process
  resolves a few thousand futures a second at most, less than the leader commits) each keep
  ``depth`` batches of ``batch`` no-op tasks in flight through ``Client.map``: submits,
  assignments, results and the WATCH replies that resolve the futures, the whole durable path;
* ``units``: a spec of work units loaded paused (outside the window) and resumed: assignments
  and results only, no submits and no futures.

Saturation: the offered load must stay above what is committed, i.e. work is always waiting
(the stream's backlog, the spec's available units, never 0 in the window). Reported per feed:
the committed rate (the leader's ``results_recorded``), the leader's CPU in µs per committed task
and the share of a core it used, the same for each follower, each balancer, the simulated workers
and the client, the rate through each hop, and the Raft entries per second and tasks per entry.
The leader is the master whose status says ``state: leader`` (checked at both ends of the window).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Units per ADD_UNITS entry. Work.add_units' default, 10,000 (~0.5 MB a Raft entry), made the
# followers fail to unpickle pysyncobj's chunked transmission of the entry ("pickle data was
# truncated", retried until it passed; seen here on main and on fb9fc6d), and once, under load,
# a leader change in the window. 1,000 (~50 KB, under pysyncobj's 64 KB chunk) never did.
LOAD_BATCH = 1_000
FEEDER_START_S = 2.5
OTHER_ROLES = {"sim": "simulated workers", "feed": "client (feeder)", "client": "this process"}
LEADER_BUSY = 0.8  # cores: a leader using this much of its core is what bounds the rate  # a feeder's imports and its Client before its first submit


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _start_sims(config: Path, work: Path, workers: int, procs: int, slots: int, prefetch: int,
                max_s: float) -> list[tuple[subprocess.Popen, Path]]:
    per = [workers // procs + (1 if k < workers % procs else 0) for k in range(procs)]
    sims, first = [], 1
    for k, count in enumerate(per):
        out = work / f"sim{k}.json"
        with open(work / f"sim{k}.log", "ab") as logf:
            p = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "simworkers.py"), "--config", str(config),
                 "--count", str(count), "--first", str(first), "--run-s", "0", "--slots", str(slots),
                 "--prefetch", str(prefetch), "--seed", str(k + 1), "--max-s", str(max_s), "--out", str(out)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        sims.append((p, out))
        first += count
    return sims


def _stop_sims(sims: list[tuple[subprocess.Popen, Path]]) -> list[dict]:
    """SIGTERM each (by pid), SIGKILL one that does not write its report in time; their reports."""
    for p, _ in sims:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    reports = []
    for p, out in sims:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        if out.exists():
            r = json.loads(out.read_text())
            reports.append({"workers": r["workers"], "registered": r["registered"], "counters": r["counters"],
                            "loop": r["loop"]})
    return reports


def _roles(b: Any) -> dict[str, str]:
    """Each process's role in sample ``b``: leader, follower, active/passive balancer, ..."""
    out = {}
    for name, v in b.nodes.items():
        out[name] = (v["state"] if v["role"] == "master" else
                     f"{v['state']} balancer" if v["role"] == "balancer" else v["role"])
    return out


def _summary(a: Any, b: Any, extra: dict[str, Any]) -> dict[str, Any]:
    from bench.dispatch_hops import hop_rates

    rates = hop_rates(a, b, extra.pop("client_tasks", None))
    leader = rates["leader"]
    roles = _roles(b)
    cpu = rates["cpu"]
    # the leader's CPU per task means something only if one master led the whole window
    lead = (cpu.get(leader) or {}) if not rates["leader_changed"] else {}
    cores = lead.get("cores")
    # what bounded the rate: the leader's CPU only if it used most of a core; else something it
    # waited on (Raft commits, the balancer's credit, the other processes' share of the 2 cores)
    bound = (None if cores is None else "the leader's CPU" if cores >= LEADER_BUSY else
             f"not the leader's CPU (it used {cores:.2f} of a core)")
    out = {"committed_per_s": rates["committed_per_s"], "committed": rates["committed"],
           "leader": leader, "leader_changed": rates["leader_changed"],
           "leader_us_per_task": lead.get("us_per_task"), "leader_cores": cores, "bound": bound,
           "cpu_by_process": {name: {"role": roles.get(name, OTHER_ROLES.get(name.rstrip("0123456789"), "")), **(c or {})}
                              for name, c in cpu.items()},
           "hops": rates, **extra}
    return out


def _map_window(work: Path, nodes: list, pids: dict, cfg: dict) -> dict:
    """The ``map`` feed: ``cfg["feeders"]`` client processes (``bench/dispatch_feed.py``), each
    with ``depth`` batches of ``batch`` tasks in flight, for the warm-up and the window."""
    from bench.dispatch_hops import sample

    start = time.monotonic() + FEEDER_START_S
    until = start + cfg["warmup_s"] + cfg["window_s"] + 1.0
    feeders = []
    for k in range(cfg["feeders"]):
        out = work / f"feed{k}.json"
        out.unlink(missing_ok=True)
        with open(work / f"feed{k}.log", "ab") as logf:
            feeders.append((subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "dispatch_feed.py"), "--config", str(work / "masters.toml"),
                 "--batch", str(cfg["batch"]), "--depth", str(cfg["depth"]), "--until", repr(until), "--out", str(out)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True), out))
    try:
        feeding = {**pids, **{f"feed{k}": p.pid for k, (p, _) in enumerate(feeders)}}
        time.sleep(max(0.0, start + cfg["warmup_s"] - time.monotonic()))  # the feeders start, then the warm-up
        a = sample(nodes, feeding)
        time.sleep(max(0.0, a.at + cfg["window_s"] - time.monotonic()))  # the window
        b = sample(nodes, feeding)
    finally:
        for p, _ in feeders:
            try:
                p.wait(max(1.0, until + 90 - time.monotonic()))  # a feeder drains for 60 s at most
            except subprocess.TimeoutExpired:  # by pid: it outlived its deadline and its drain
                p.kill()
                p.wait(5)
    reports = [json.loads(out.read_text()) if out.exists() else {"error": f"no report (see {out.with_suffix('.log')})"}
               for _, out in feeders]
    submitted = sum(n for r in reports for t, n in r.get("submits", []) if a.at <= t < b.at)
    backlog = [min((n for t, n in r.get("backlog", []) if a.at <= t <= b.at), default=0) for r in reports]
    seconds = b.at - a.at
    return _summary(a, b, {"client_tasks": submitted, "offered_per_s": round(submitted / seconds, 1),
                           "backlog_min_per_feeder": backlog, "saturated": all(x > 0 for x in backlog),
                           "feeder_errors": [r["error"] for r in reports if "error" in r],
                           "feed": f"Client.map from {cfg['feeders']} client processes, each {cfg['depth']} batches "
                                   f"of {cfg['batch']:,} no-op tasks in flight"})


def _units_window(client: Any, nodes: list, pids: dict, cfg: dict, units: int) -> dict:
    from bench.dispatch_hops import sample
    from cluster.work import Work

    work = Work(client)
    # what the units run does not matter: the simulated workers run nothing
    work.add_spec("leader-bench", {"kind": "command", "argv": ["true"]}, paused=True)
    t0 = time.perf_counter()
    work.add_units("leader-bench", ((f"u{k:07d}", b"") for k in range(units)), batch=LOAD_BATCH)
    load_s = time.perf_counter() - t0
    work.resume("leader-bench")
    time.sleep(cfg["warmup_s"])  # the warm-up: the units run inside the cluster
    a = sample(nodes, pids)
    time.sleep(cfg["window_s"])  # the window
    b = sample(nodes, pids)
    row = next(r for r in work.summary() if r["spec"] == "leader-bench")
    work.pause("leader-bench")
    return _summary(a, b, {"units_loaded": units, "load_s": round(load_s, 2), "available_at_end": row["available"],
                           "saturated": row["available"] > 0,
                           "feed": f"work units: {units:,} loaded paused, then resumed"})


def measure_leader(cfg: dict) -> dict:
    """The leader part (module docstring). ``cfg``: workers, procs, slots, prefetch, batch, depth,
    warmup_s, window_s, feeds (a list of ``map``, ``units``)."""
    from bench.dispatch_hops import log_findings
    from bench.dispatch_systems import raft_options, wait_registered
    from cluster.client import Client
    from cluster.local import balancer_nodes, make_keys, master_nodes, start_all, stop_all

    work = Path(tempfile.mkdtemp(prefix="dispatch-leader-"))
    masters = master_nodes(work, 3, log_level="WARNING")
    raft_options(work, cfg.get("raft"))
    config, balancers = balancer_nodes(work, 2, log_level="WARNING")
    make_keys(config.parent, {f"sim{i:04d}": "worker" for i in range(1, cfg["workers"] + 1)})
    nodes = masters + balancers
    sims: list = []
    client = None
    res: dict[str, Any] = {"config": {**cfg, "cluster": "3 masters, 2 balancers (CURVE, as shipped), "
                                      f"{cfg['workers']} simulated workers x {cfg['slots']} slots "
                                      f"(+{cfg['prefetch']} prefetch) in {cfg['procs']} processes, tasks end at once"},
                           "logs": str(work)}
    try:
        start_all(nodes, timeout=30)
        sims = _start_sims(config, work, cfg["workers"], cfg["procs"], cfg["slots"], cfg["prefetch"], 3600)
        client = Client([m.address for m in masters], timeout=60)
        wait_registered(balancers, cfg["workers"])
        pids = {n.name: n.pid for n in nodes} | {f"sim{k}": p.pid for k, (p, _) in enumerate(sims)}
        pids["client"] = os.getpid()
        rate = None
        for feed in cfg["feeds"]:
            log(f"leader: feed {feed}, {cfg['warmup_s']:g} s warm-up, {cfg['window_s']:g} s window")
            if feed == "map":
                r = _map_window(work, nodes, pids, cfg)
            else:
                # enough that the spec never runs dry in the window: twice what the map feed
                # committed, or twice 6,000/s (above any rate seen here) without it
                est = rate or 6000.0
                units = min(1_000_000, max(20_000, int(2 * est * (cfg["warmup_s"] + cfg["window_s"]))))
                r = _units_window(client, nodes, pids, cfg, units)
            rate = r["committed_per_s"] or rate
            res[feed] = r
            log(f"leader ({feed}): {r['committed_per_s'] or 0:,.0f} tasks/s committed, leader "
                f"{r['leader_us_per_task'] or 0:,.0f} µs per task, {r['leader_cores'] or 0:.2f} cores"
                f"{'' if r['saturated'] else ' (NOT saturated: work ran out in the window)'}")
    except Exception as exc:  # noqa: BLE001 - the report says what failed; the other parts still run
        log(f"leader failed: {type(exc).__name__}: {exc} (logs in {work})\n{traceback.format_exc()}")
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if client is not None:
            client.close()
        res["simworkers"] = _stop_sims(sims)
        stop_all(nodes[::-1])
        res["log_findings"] = log_findings(work)
    return res
