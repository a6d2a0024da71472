#!/usr/bin/env python3
"""Dispatch benchmark (issue 7): no-op task throughput and submit→result latency of our cluster's
durable path against Dask ``LocalCluster`` and Ray, in one run on this machine.

Run from the repository root::

    .venv/bin/python bench/dispatch.py                # full run (~3-4 min once the peers are installed)
    .venv/bin/python bench/dispatch.py --quick        # under a minute (the first run also builds the venv)
    .venv/bin/python bench/dispatch.py --peers dask --json /tmp/d.json --skip-setup

The peers live in the benchmark's own environment, never in the project's dependencies:
``bench/.peers-venv`` (git-ignored), made on demand with ``python -m venv`` and pip installs of the
pinned ``PINS`` (``--skip-setup``: fail if it is missing instead of building it). Each peer runs in
its own process, ``bench/dispatch_peers.py`` under that venv's python, which prints one JSON line;
a peer that cannot be installed or fails is reported as such and the others go on.

What is measured, the same loop for every system (``dispatch_peers.measure``):

* **Throughput**: N no-op tasks (``def noop(i): return i``) submitted at once, the idiomatic fast
  way (Dask: ``client.map(noop, range(N), pure=False)`` + ``client.gather``; Ray:
  ``ray.get([noop.remote(i) for i in range(N)])``), timed from the first submit to the last
  result, after one untimed warm-up batch. N = 5,000 (quick 1,000), R = 5 (quick 2) reps; the
  median and every rep are reported.
* **Latency**: K = 300 (quick 100) sequential round trips of one task, submit → result; median
  and p99 in ms (with K = 100 the p99 is the second-largest sample).

Dask: 2 worker processes, 1 thread each. Ray: ``ray.init(num_cpus=2)``. Both on 127.0.0.1, their
scratch files in a temporary directory. Every process a peer run starts carries a marker in its
environment; once the peer's process has exited, any process still carrying it is stopped by pid
and reported (``leftovers``). Our system is one more row (``measure_ours``), with ratios.

Before the systems, one worker slot alone (``measure_slot``): N no-op callables through one
``worker.slots.Slot`` in this process, its child started outside the clock: the rate a slot
allows with no network and no ledger, and the count of child processes it started (1: the child
is reused, not respawned per task).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# first, even when an editable install lists ROOT already: run as `python bench/X.py`, sys.path
# starts with bench/, where storage.py would shadow the storage package
sys.path.insert(0, str(ROOT))

from bench import machine  # noqa: E402
from bench.dispatch_curve import measure_security  # noqa: E402

VENV = ROOT / "bench" / ".peers-venv"
PEERS_SCRIPT = ROOT / "bench" / "dispatch_peers.py"
STAMP = ".setup.json"  # in the venv: what was installed and how long it took
# Pins that install on Python 3.11 here (checked 2026-11); distributed pinned with dask.
PINS = {"dask": {"dask": "2026.8.0", "distributed": "2026.8.0"}, "ray": {"ray": "2.60.0"}}
EXTRAS = {"dask": "dask[distributed]"}
PIP_TIMEOUT_S = 900
DURABLE = {"ours": True, "dask": False, "ray": False}
MARKER = "DISPATCH_BENCH_RUN"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- the peers' venv -----------------------------------------------------------------------------


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def installed(py: Path, peer: str) -> dict[str, str | None]:
    """The versions of ``peer``'s pinned distributions in the venv (None: not installed)."""
    code = ("import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
            "for n in sys.argv[1:]:\n    try: out[n] = version(n)\n    except PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    r = subprocess.run([str(py), "-I", "-c", code, *PINS[peer]], capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 else dict.fromkeys(PINS[peer])


def requirements(peer: str) -> list[str]:
    pins = PINS[peer]
    out = [f"{EXTRAS.get(peer, peer)}=={pins[peer]}"]
    return out + [f"{name}=={v}" for name, v in pins.items() if name != peer]


def ensure_peers(peers: list[str], skip_setup: bool, venv: Path = VENV) -> dict:
    """Make the venv and install each peer at its pin where needed; one failure stops only that peer.

    Returns ``{"venv", "created_s", "peers": {peer: {"ok", "versions", "install_s"?, "error"?}},
    "first_setup": what the stamp recorded when the venv was built}``.
    """
    py = venv_python(venv)
    stamp_path = venv / STAMP
    out: dict[str, Any] = {"venv": str(venv), "peers": {}}
    if not py.exists():
        if skip_setup:
            raise SystemExit(f"dispatch: {venv} is missing and --skip-setup was given; run without it to build "
                             f"it (python -m venv + pip install {' '.join(r for p in peers for r in requirements(p))})")
        log(f"setup: creating {venv}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        out["created_s"] = time.perf_counter() - t0
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    for peer in peers:
        have = installed(py, peer)
        entry: dict[str, Any] = {"versions": have, "ok": have == PINS[peer]}
        if not entry["ok"] and skip_setup:
            entry["error"] = f"not installed at {PINS[peer]} in {venv} (--skip-setup)"
        elif not entry["ok"]:
            reqs = requirements(peer)
            log(f"setup: pip install {' '.join(reqs)} (ray is a large download: minutes)")
            t0 = time.perf_counter()
            try:
                r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", *reqs], capture_output=True,
                                   text=True, timeout=PIP_TIMEOUT_S)
                err = None if r.returncode == 0 else (r.stdout + r.stderr)[-2000:]
            except subprocess.TimeoutExpired:
                err = f"pip install timed out after {PIP_TIMEOUT_S} s"
            entry["install_s"] = time.perf_counter() - t0
            entry["versions"] = installed(py, peer)
            entry["ok"] = err is None and entry["versions"] == PINS[peer]
            if not entry["ok"]:
                entry["error"] = f"pip install {' '.join(reqs)} failed: {err or entry['versions']}"
                log(f"setup: {peer} could not be installed, going on without it:\n{entry['error']}")
            else:
                log(f"setup: {peer} installed in {entry['install_s']:.0f} s")
            stamp[peer] = {"requirements": reqs, "ok": entry["ok"], "install_s": entry["install_s"],
                           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
            if "created_s" in out:
                stamp["venv_created_s"] = out["created_s"]
            stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
        out["peers"][peer] = entry
    out["first_setup"] = stamp
    return out


# ---- one peer, in its own process ------------------------------------------------------------------


def marked_pids(token: str) -> list[int]:
    """Processes whose environment carries this run's marker (all the peer's descendants)."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def stop_leftovers(token: str) -> list[dict]:
    """Stop, by pid, every process still carrying the marker: SIGTERM, then SIGKILL after 5 s."""
    found = [{"pid": pid, "cmdline": _cmdline(pid)} for pid in marked_pids(token)]
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        alive = marked_pids(token)
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = marked_pids(token)
        if not alive:
            break
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def run_peer(peer: str, cfg: dict, timeout: float) -> dict:
    """Run ``dispatch_peers.py PEER`` in the venv; its JSON line, summarized, or ``{"error": …}``."""
    token = secrets.token_hex(8)
    cpu0 = machine.cpu_times()
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update({MARKER: token, "TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DASK_TEMPORARY_DIRECTORY": tmp})
        cmd = [str(venv_python()), "-I", str(PEERS_SCRIPT), peer, "--tasks", str(cfg["tasks"]),
               "--reps", str(cfg["reps"]), "--round-trips", str(cfg["round_trips"]),
               "--warmup-tasks", str(cfg["warmup_tasks"]), "--workers", str(cfg["workers"])]
        err_path = Path(tmp) / "stderr.txt"
        t0 = time.perf_counter()
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp, env=env,
                                    start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=timeout)
                error = None if proc.returncode == 0 else f"exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
                error = f"no result in {timeout:.0f} s"
        wall = time.perf_counter() - t0
        leftovers = stop_leftovers(token)
        tail = err_path.read_text(errors="replace").splitlines()[-30:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if error or not lines:
        return {"system": peer, "error": error or "no JSON line on stdout", "stderr_tail": tail,
                "leftovers": leftovers, "wall_s": wall}
    res = summarize(json.loads(lines[-1]))
    res.update(wall_s=wall, leftovers=leftovers, cpu_shares=machine.cpu_shares(cpu0, machine.cpu_times()))
    return res


def p99(xs: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def summarize(res: dict) -> dict:
    """Add the medians and the p99 that the table shows to a result of ``dispatch_peers.measure``."""
    tp, lat = res["throughput"], res["latency"]
    tp["tasks_per_s_median"] = statistics.median(tp["tasks_per_s_reps"])
    lat["median_ms"] = statistics.median(lat["samples_ms"])
    lat["p99_ms"] = p99(lat["samples_ms"])
    lat["mean_ms"] = statistics.fmean(lat["samples_ms"])
    res["durable"] = DURABLE.get(res["system"], False)
    return res


# ---- our cluster ---------------------------------------------------------------------------------


def measure_ours(args: argparse.Namespace) -> dict | None:
    """Our cluster's full durable path on this machine: 3 masters (Raft journals fsynced on
    disk), the balancer pair, one worker of 2 slots (Ray's 2 CPUs, Dask's 2 × 1 thread), the
    client's futures. Each task is committed twice by a quorum (its assignment and its result)
    before its future resolves. Then the balancer takeover: ``args.kills`` times, SIGKILL the
    active balancer while tasks stream and time until the first task completes through the
    other one (the killed one is restarted and becomes the passive one)."""
    import cloudpickle

    from bench import dispatch_peers
    from bench.dispatch_peers import measure, noop
    from cluster import __version__
    from cluster.client import Client
    from cluster.local import balancer_nodes, master_nodes, start_all, stop_all, worker_nodes
    from cluster.node.status import query_status

    # the workers cannot import bench/: ship noop by value (as a notebook's function would be)
    cloudpickle.register_pickle_by_value(dispatch_peers)
    work = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    masters = master_nodes(work, 3)
    config, balancers = balancer_nodes(work, 2)
    # one worker with 2 slots, as Ray's one node with num_cpus=2 (2 worker processes); 2 workers of
    # 1 slot (Dask's layout) measured ~10% slower here: one more process on 2 cores
    workers = worker_nodes(work, config, 1, slots=args.workers)
    nodes = masters + balancers + workers
    client = None
    t0 = time.perf_counter()
    cpu0 = machine.cpu_times()
    try:
        start_all(nodes)
        client = Client([m.address for m in masters], timeout=60)
        _wait_registered(balancers, 1, query_status)
        start_s = time.perf_counter() - t0
        log(f"ours: {args.reps} batches of {args.tasks:,} tasks, {args.round_trips} round trips")
        res = measure(lambda n: [f.result(timeout=300) for f in client.map(noop, range(n))],
                      lambda i: client.submit(noop, i).result(timeout=60),
                      args.tasks, args.reps, args.round_trips, args.warmup_tasks)
        res.update(system="ours", versions={"cluster": __version__}, start_s=round(start_s, 2))
        res["takeover"] = _takeovers(client, balancers, args.kills, query_status)
        res.update(wall_s=time.perf_counter() - t0, cpu_shares=machine.cpu_shares(cpu0, machine.cpu_times()))
        out = summarize(res)
        out["takeover"] = res["takeover"]
        log(f"ours: {out['throughput']['tasks_per_s_median']:,.0f} tasks/s, latency median "
            f"{out['latency']['median_ms']:.2f} ms; takeover median {res['takeover']['median_s']:.2f} s")
        return out
    except Exception as exc:  # noqa: BLE001 - the report says what failed; the peers still run
        log(f"ours failed: {type(exc).__name__}: {exc} (logs in {work})")
        return {"error": f"{type(exc).__name__}: {exc}", "logs": str(work)}
    finally:
        if client is not None:
            client.close()
        stop_all(nodes)


def measure_slot(tasks: int) -> dict:
    """One slot's no-op rate: ``tasks`` no-op callables through ``worker.slots.Slot`` (see the
    module docstring); tasks/s and the slot's counters."""
    import cloudpickle

    from worker.slots import Slot

    noop = cloudpickle.dumps(lambda: None)
    no_args = cloudpickle.dumps(((), {}))
    with tempfile.TemporaryDirectory(prefix="dispatch-slot-") as scratch, Slot(0) as slot:
        if not slot.run_callable(noop, no_args, Path(scratch)).ok:  # starts the child, untimed
            raise RuntimeError("the slot could not run a no-op")
        t0 = time.perf_counter()
        ok = sum(slot.run_callable(noop, no_args, Path(scratch)).ok for _ in range(tasks))
        seconds = time.perf_counter() - t0
        counters = dict(slot.counters)
    log(f"one slot: {tasks / seconds:,.0f} no-op tasks/s, {counters['spawns']} child process(es)")
    return {"tasks": tasks, "ok": ok, "seconds": seconds, "tasks_per_s": tasks / seconds,
            "spawns": counters["spawns"], "restarts": counters["restarts"]}


def _active(balancers: list, query_status) -> Any:
    for b in balancers:
        if b.process is None or b.process.poll() is not None:
            continue
        r = query_status([b.address], timeout=0.5)[0].reply
        if r is not None and r.detail.get("state") == "active" and r.detail.get("master", {}).get("attached"):
            return b, r
    return None, None


def _wait_registered(balancers: list, workers: int, query_status, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, r = _active(balancers, query_status)
        if r is not None and r.detail["registry"]["workers"] >= workers:
            return
        time.sleep(0.05)  # polling another process's status: nothing to wait on
    raise TimeoutError(f"{workers} workers did not register with an active balancer within {timeout:g} s")


def _takeovers(client: Any, balancers: list, kills: int, query_status) -> dict:
    """Kill the active balancer ``kills`` times under a stream of tasks: seconds from each kill
    to the first task dispatched by the other balancer and recorded done (the ledger's attempt
    says which balancer handed it out)."""
    import concurrent.futures

    from bench.dispatch_peers import noop

    times = []
    for k in range(kills):
        _wait_registered(balancers, 1, query_status)
        victim, _ = _active(balancers, query_status)
        stream = client.map(noop, range(1000))
        concurrent.futures.wait(stream[:50])
        killed_at = time.perf_counter()
        victim.kill()
        pending = [f for f in stream if not f.done()]
        took = None
        for f in concurrent.futures.as_completed(pending, timeout=60):
            # tasks the killed one handed out may still finish (workers keep their results and
            # resend them): the takeover is done when a task the other one dispatched is recorded
            attempts = client.task(f.job, f.task).value.get("attempts", [])
            if any(a["outcome"] == "done" and a["balancer"] != victim.name for a in attempts):
                took = time.perf_counter() - killed_at
                break
        if took is None:
            raise AssertionError(f"takeover {k + 1}: no task went through the other balancer")
        if sorted(f.result(timeout=120) for f in stream) != list(range(1000)):
            raise AssertionError(f"takeover {k + 1}: wrong results")
        times.append(took)
        log(f"  takeover {k + 1}/{kills}: {took:.2f} s")
        victim.start()  # it comes back passive: the other one is in charge now
    return {"kills": kills, "seconds": [round(t, 3) for t in times],
            "median_s": round(statistics.median(times), 3) if times else None}


# ---- report ---------------------------------------------------------------------------------------

METRICS = (("tasks_per_s", "tasks/s median", True), ("latency_median_ms", "latency median ms", False),
           ("latency_p99_ms", "latency p99 ms", False))


def metric(res: dict | None, name: str) -> float | None:
    if not res or "error" in res:
        return None
    if name == "tasks_per_s":
        return res["throughput"]["tasks_per_s_median"]
    return res["latency"]["median_ms" if name == "latency_median_ms" else "p99_ms"]


def ratios(systems: dict[str, dict | None]) -> list[dict]:
    """ours / each peer and ours / the best peer, per metric (tasks/s: > 1 is ours faster;
    latency: < 1 is ours faster)."""
    ours = systems.get("ours")
    out = []
    for name, _, higher_better in METRICS:
        mine = metric(ours, name)
        peers = {p: metric(r, name) for p, r in systems.items() if p != "ours" and metric(r, name)}
        if mine is None or not peers:
            continue
        for p, v in peers.items():
            out.append({"metric": name, "baseline": p, "value": mine / v})
        best = (max if higher_better else min)(peers, key=peers.get)
        out.append({"metric": name, "baseline": f"faster peer ({best})", "value": mine / peers[best]})
    return out


def _row(name: str, res: dict | None, reason: str) -> list[str]:
    if not res or "error" in res:
        why = res["error"] if res else reason
        return [name, "yes" if DURABLE.get(name) else "no", "-", "-", "-", why[:60], ""]
    tp, lat = res["throughput"], res["latency"]
    return [name, "yes" if res["durable"] else "no", f"{tp['tasks_per_s_median']:,.0f}",
            f"{lat['median_ms']:.2f}", f"{lat['p99_ms']:.2f}",
            " ".join(f"{x:,.0f}" for x in tp["tasks_per_s_reps"]),
            ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items())]


def print_report(res: dict) -> None:
    m, cfg = res["machine"], res["config"]
    head = (f"Dispatch benchmark {m['date']}  {m['nproc']} cpus ({m['cpu']}), Python {m['python']}; "
            f"{cfg['reps']} batches of {cfg['tasks']:,} no-op tasks, {cfg['round_trips']} round trips"
            f"{' (quick)' if cfg['quick'] else ''}")
    cols = ["system", "durable", "tasks/s median", "latency median ms", "latency p99 ms", "tasks/s reps", "versions"]
    cells = [_row(name, r, res["not_run"].get(name, "not run")) for name, r in res["systems"].items()]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        con = Console(width=max(140, Console().width))
        out = con.print
        out(head)
        t = Table(title="No-op tasks on 2 workers, one machine (median of reps)")
        for c in cols:
            t.add_column(c, justify="left" if c in ("system", "durable", "versions", "tasks/s reps") else "right")
        for r in cells:
            t.add_row(*r)
        out(t)
    else:
        out = print
        out(head)
        w = [max(len(x[i]) for x in [cols] + cells) for i in range(len(cols))]
        for r in [cols] + cells:
            out("  ".join(x.ljust(w[i]) for i, x in enumerate(r)))
    if res["ratios"]:
        out("Ratios ours / peer (tasks/s: > 1 ours faster; latency: < 1 ours faster):")
        for r in res["ratios"]:
            out(f"  {r['metric']:18s} / {r['baseline']:18s} {r['value']:6.2f}x")
    setup = res["setup"]
    for peer, e in setup["peers"].items():
        first = setup["first_setup"].get(peer, {})
        took = e.get("install_s", first.get("install_s"))
        out(f"setup {peer}: {'ok' if e['ok'] else e.get('error', 'failed')[:200]}"
            + (f"; pip install took {took:.0f} s" + ("" if "install_s" in e else f" ({first.get('date')})")
               if took else ""))
    for name, r in res["systems"].items():
        if r and "error" not in r:
            sh = r.get("cpu_shares") or {}
            out(f"{name}: started in {r.get('start_s', 0):.1f} s, warm-up {r['warmup']['seconds']:.1f} s, "
                f"process {r['wall_s']:.1f} s; CPU busy {sh.get('busy', 0):.0%}, steal {sh.get('steal', 0):.0%}"
                + (f"; LEFTOVER processes stopped: {len(r['leftovers'])}" if r.get("leftovers") else ""))
            if r.get("takeover"):
                t = r["takeover"]
                out(f"{name}: balancer takeover, SIGKILL of the active one to the first task completed through "
                    f"the other: median {t['median_s']:.2f} s of {t['kills']} ({', '.join(f'{x:.2f}' for x in t['seconds'])})")
        elif r:
            out(f"{name} failed: {r['error']}\n  " + "\n  ".join(r.get("stderr_tail", [])[-10:]))
    s = res.get("slot")
    if s:
        out(f"one slot alone: {s['tasks_per_s']:,.0f} no-op tasks/s ({s['ok']:,} of {s['tasks']:,} ok, "
            f"{s['spawns']} child process(es) started)")
    sec = res.get("security")
    if sec and "error" not in sec:
        out(f"CURVE against plaintext (our cluster, {sec['rounds']} interleaved batches of {sec['tasks']:,}): "
            f"{sec['curve']['median']:,.0f} against {sec['plaintext']['median']:,.0f} tasks/s median, "
            f"ratio {sec['curve_over_plaintext']:.2f} (CURVE costs {1 - sec['curve_over_plaintext']:.0%})")
    elif sec:
        out(f"CURVE against plaintext failed: {sec['error']}")
    out(f"total {res['elapsed_s']:.1f} s; results in {res['json_path']}")


# ---- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 tasks x 2 reps, 100 round trips (< 60 s once set up)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "dispatch.json"), help="where to write the results")
    ap.add_argument("--peers", default="dask,ray", help="comma-separated peers to run (dask, ray; empty: none)")
    ap.add_argument("--skip-setup", action="store_true", help="fail if bench/.peers-venv is missing instead of building it")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per throughput batch (default 5,000, --quick 1,000)")
    ap.add_argument("--reps", type=int, default=None, help="timed throughput batches (default 5, --quick 2)")
    ap.add_argument("--round-trips", type=int, default=None, help="latency round trips (default 300, --quick 100)")
    ap.add_argument("--security-rounds", type=int, default=None,
                    help="interleaved CURVE/plaintext batches each (default 7, --quick 3; 0: skip)")
    args = ap.parse_args(argv)
    q = args.quick
    args.tasks = args.tasks or (1_000 if q else 5_000)
    args.reps = args.reps or (2 if q else 5)
    args.round_trips = args.round_trips or (100 if q else 300)
    args.warmup_tasks = min(args.tasks, 1_000)
    args.security_rounds = (3 if q else 7) if args.security_rounds is None else args.security_rounds
    args.workers = 2
    args.kills = 5
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PINS)
    if unknown:
        ap.error(f"unknown peers {sorted(unknown)}; choose from {sorted(PINS)}")

    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine.machine_info()}
    cfg = {"quick": q, "tasks": args.tasks, "reps": args.reps, "round_trips": args.round_trips,
           "warmup_tasks": args.warmup_tasks, "workers": args.workers, "peers": peers, "pins": PINS}
    res["config"] = cfg
    cpu0 = machine.cpu_times()
    res["setup"] = ensure_peers(peers, args.skip_setup) if peers else {"peers": {}, "first_setup": {}}
    res["slot"] = measure_slot(args.tasks)
    systems: dict[str, dict | None] = {"ours": measure_ours(args)}
    if args.security_rounds:
        log(f"security: CURVE against plaintext, {args.security_rounds} interleaved batches of {args.tasks:,} each")
        res["security"] = measure_security(args.tasks, args.security_rounds, args.workers, log)
    not_run = {"ours": systems["ours"]["error"]} if systems["ours"] and "error" in systems["ours"] else {}
    timeout = 120.0 if q else 300.0
    for peer in peers:
        setup = res["setup"]["peers"][peer]
        if not setup["ok"]:
            systems[peer], not_run[peer] = None, setup["error"]
            continue
        log(f"{peer}: {args.reps} batches of {args.tasks:,} tasks, {args.round_trips} round trips")
        systems[peer] = run_peer(peer, cfg, timeout)
        r = systems[peer]
        if "error" in r:
            log(f"{peer} failed: {r['error']}")
        else:
            log(f"{peer}: {r['throughput']['tasks_per_s_median']:,.0f} tasks/s, "
                f"latency median {r['latency']['median_ms']:.2f} ms, p99 {r['latency']['p99_ms']:.2f} ms")
            res["machine"].update(r.get("versions", {}))
    res["systems"], res["not_run"] = systems, not_run
    res["ratios"] = ratios(systems)
    machine.finish(res, cpu0, started, args.json)
    print_report(res)
    return 0 if all(r is None or "error" not in r for r in systems.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
