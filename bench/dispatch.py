#!/usr/bin/env python3
"""Dispatch benchmark (issues 7 and 23): our durable task path against Ray and Dask, the master
leader's CPU per task, the rate through each hop, and draining a work spec, in one session on
this machine. Run from the repository root::

    .venv/bin/python bench/dispatch.py                  # every default part (~10 min)
    .venv/bin/python bench/dispatch.py --quick          # the same, smaller (about a minute)
    .venv/bin/python bench/dispatch.py --parts peers,hops --peers ray --json /tmp/d.json

Parts (``--parts``, comma-separated; default ``peers,hops,leader,drain,slot``; ``all`` adds the
opt-in ``takeover`` and ``curve``):

* ``peers``: ours (3 masters, the balancer pair, one worker of 2 slots, the client's futures;
  CURVE on, as shipped; every task committed by a Raft quorum twice, its assignment and its
  result, before its future resolves) against Dask ``LocalCluster`` (2 processes x 1 thread) and
  Ray (``num_cpus=2``), neither durable, from their own venv. Every system stays up and the
  batches are interleaved (``dispatch_systems.interleave``): R rounds (quick 2, default 7), each
  one batch of N no-op tasks per system (quick 1,000, default 5,000) and K/R sequential submit ->
  result round trips (K: quick 60, default 300), the order rotating. Medians, p99, and ours /
  each peer (ratio of medians and median of the paired per-round ratios). Before the rounds,
  each system's idle CPU (its heartbeats, in the others' background).
* ``hops``: on the same cluster of ours (the peers stopped by then), a stream of batches
  (``dispatch_hops.TaskStream``) for a window after a warm-up: tasks/s through each hop, from
  the nodes' status counters before and after; messages/s per node; CPU per task per process.
* ``leader``: the leader's CPU per task at the highest rate it sustains, with simulated workers
  (``dispatch_leader``): committed tasks/s, leader µs per task and its share of a core, the
  followers', balancers' and simulated workers' too; feeds ``map`` and ``units``.
* ``drain``: N work units (quick 1,000, default 100,000) drained by a fresh local cluster (3
  masters, the balancer pair, one worker of 2 slots), once as callable no-op units and once as
  ``true`` command units (``dispatch_drain``): units/s, all finished checked.
* ``slot``: one ``worker.slots.Slot`` alone, no network and no ledger (the ceiling of a slot).
* ``takeover`` (opt-in): SIGKILL of the active balancer under a stream, 5 times: seconds to the
  first task completed through the other one.
* ``curve`` (opt-in): CURVE against plaintext on our cluster (``dispatch_curve``).

``--raft-option KEY=VALUE`` (repeatable) gives every cluster's masters a pysyncobj option in
``[raft.timings]`` (e.g. ``appendEntriesBatchSizeBytes=67108864``), to measure a setting before
it ships; without it the masters run as shipped, and the JSON says which.

The peers live in the benchmark's own environment, never in the project's dependencies:
``bench/.peers-venv`` (git-ignored), made on demand with ``python -m venv`` and pip installs of the
pinned ``PINS`` (``--skip-setup``: fail if it is missing instead of building it). Each peer runs in
its own process (``bench/dispatch_peers.py --serve``), and once it has quit, any process still
carrying its marker is stopped by pid and reported (``leftovers``). A part that fails is reported
as such and the others go on. The JSON (``--json``; default ``bench/results/dispatch.json``,
``dispatch-quick.json`` with ``--quick``) holds every figure, and ``acceptance`` sets issue 23's
bounds against them.
"""

from __future__ import annotations

import argparse
import json
import os
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
from bench.dispatch_report import acceptance, print_report  # noqa: E402

VENV = ROOT / "bench" / ".peers-venv"
STAMP = ".setup.json"  # in the venv: what was installed and how long it took
# Pins that install on Python 3.11 here (checked 2026-11); distributed pinned with dask.
PINS = {"dask": {"dask": "2026.8.0", "distributed": "2026.8.0"}, "ray": {"ray": "2.60.0"}}
EXTRAS = {"dask": "dask[distributed]"}
PIP_TIMEOUT_S = 900
PARTS = ("peers", "hops", "leader", "drain", "slot", "takeover", "curve")
DEFAULT_PARTS = ("peers", "hops", "leader", "drain", "slot")


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


# ---- the parts -------------------------------------------------------------------------------------


def run_peers(cfg: dict, peers: list[str], setup: dict, ours: Any) -> dict:
    """Ours and each installed peer up side by side, then the interleaved rounds."""
    from bench.dispatch_systems import PeerSystem, idle_cpu, interleave

    systems: dict[str, Any] = {}
    out: dict[str, Any] = {"systems": {}, "not_run": {}}
    started = []
    try:
        for peer in peers:  # the peers start in their processes while ours starts here
            if not setup["peers"][peer]["ok"]:
                out["not_run"][peer] = setup["peers"][peer]["error"]
                continue
            started.append(PeerSystem(peer, venv_python(), cfg["workers"], cfg["warmup_tasks"]))
        log(f"peers: starting ours{''.join(', ' + p.name for p in started)}")
        out["systems"]["ours"] = {"info": ours.start(cfg["warmup_tasks"])}
        systems["ours"] = ours
        for p in started:
            try:
                out["systems"][p.name] = {"info": p.wait_ready(180)}
                systems[p.name] = p
            except Exception as exc:  # noqa: BLE001 - reported; the others go on
                out["not_run"][p.name] = f"{type(exc).__name__}: {exc}"
                out["systems"][p.name] = {"stderr_tail": p.stderr_tail()}
        out["idle_cores"] = idle_cpu(systems, cfg["idle_s"])
        log(f"peers: idle cores {out['idle_cores']}; {cfg['rounds']} rounds of {cfg['tasks']:,} tasks and "
            f"{cfg['round_trips'] // cfg['rounds']} round trips per system")
        cpu0 = machine.cpu_times()
        rounds = interleave(systems, cfg["rounds"], cfg["tasks"], cfg["round_trips"], log)
        rounds["cpu_shares"] = machine.cpu_shares(cpu0, machine.cpu_times())
        for name, r in rounds.pop("systems").items():
            out["systems"][name].update(r)
        out.update(rounds)
    finally:
        for p in started:
            p.close()
            out["systems"].setdefault(p.name, {})["leftovers"] = p.leftovers
    return out


def run_hops(cfg: dict, ours: Any) -> dict:
    """A stream through our cluster; the rate through each hop in the window."""
    from bench.dispatch_hops import TaskStream, hop_rates, sample

    stream = TaskStream(ours.client, ours.noop, cfg["batch"], cfg["depth"])
    log(f"hops: {cfg['depth']} batches of {cfg['batch']:,} in flight, {cfg['warmup_s']:g} s warm-up, "
        f"{cfg['window_s']:g} s window")
    pids = ours.pids() | {"client": os.getpid()}
    stream.pump(time.monotonic() + cfg["warmup_s"])
    a = sample(ours.nodes, pids)
    stream.pump(a.at + cfg["window_s"])
    b = sample(ours.nodes, pids)
    stream.drain()
    backlog = stream.backlog_between(a.at, b.at)
    out = hop_rates(a, b, stream.submitted_between(a.at, b.at))
    out.update(backlog_min=min(backlog, default=None), config=cfg,
               feed=f"Client.map in this process, {cfg['depth']} batches of {cfg['batch']:,} no-op tasks in flight")
    return out


def with_ours(parts: list[str], cfgs: dict, peers: list[str], setup: dict) -> dict:
    """The parts that run on one cluster of ours: peers, hops, takeover (in that order)."""
    from bench.dispatch_hops import log_findings
    from bench.dispatch_systems import OurCluster, takeovers

    ours = OurCluster(slots=cfgs["peers"]["workers"], raft=cfgs["raft"])
    res: dict[str, Any] = {}
    try:
        if "peers" in parts:
            res["peers"] = _guard("peers", lambda: run_peers(cfgs["peers"], peers, setup, ours))
        else:
            ours.start(cfgs["peers"]["warmup_tasks"])
        if "hops" in parts:
            res["hops"] = _guard("hops", lambda: run_hops(cfgs["hops"], ours))
        if "takeover" in parts:
            res["takeover"] = _guard("takeover", lambda: takeovers(ours, cfgs["takeover"]["kills"]))
    except Exception as exc:  # noqa: BLE001 - our cluster did not start: every part on it fails
        for p in ("peers", "hops", "takeover"):
            if p in parts and p not in res:
                res[p] = {"error": f"{type(exc).__name__}: {exc}", "logs": str(ours.work)}
    finally:
        ours.close()
        res["ours_log_findings"] = log_findings(ours.work)
    return res


def _guard(name: str, run: Any) -> dict:
    """``run()``, or ``{"error": ...}`` if it raised: one part's failure does not stop the others."""
    import traceback

    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - reported with the others' figures
        log(f"{name} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_parts(parts: list[str], cfgs: dict, peers: list[str], setup: dict) -> dict:
    from bench.dispatch_curve import measure_security
    from bench.dispatch_drain import measure_drain
    from bench.dispatch_leader import measure_leader

    res: dict[str, Any] = {}
    if "slot" in parts:
        res["slot"] = _guard("slot", lambda: measure_slot(cfgs["slot"]["tasks"]))
    if {"peers", "hops", "takeover"} & set(parts):
        res.update(with_ours(parts, cfgs, peers, setup))
    if "leader" in parts:
        res["leader"] = _guard("leader", lambda: measure_leader(cfgs["leader"]))
    if "drain" in parts:
        res["drain"] = {}
        for variant in cfgs["drain"]["variants"]:
            log(f"drain: {cfgs['drain']['units']:,} {variant} units")
            r = _guard("drain", lambda: measure_drain(variant, cfgs["drain"]["units"], cfgs["raft"]))
            res["drain"][variant] = r
            if "units_per_s" in r:
                log(f"drain ({variant}): {r['units_per_s']:,.0f} units/s, {r['finished']:,} finished, {r['failed']} failed")
    if "curve" in parts:
        c = cfgs["curve"]
        log(f"curve: CURVE against plaintext, {c['rounds']} interleaved batches of {c['tasks']:,} each")
        res["curve"] = measure_security(c["tasks"], c["rounds"], c["workers"], log)
    return res


# ---- main -----------------------------------------------------------------------------------------


def _number(text: str) -> int | float:
    return float(text) if "." in text or "e" in text.lower() else int(text)


def configs(args: argparse.Namespace) -> dict[str, dict]:
    """Every part's settings, full or ``--quick``."""
    q = args.quick
    tasks = args.tasks or (1_000 if q else 5_000)
    raft = {k: _number(v) for k, _, v in (o.partition("=") for o in args.raft_option)} or None
    return {
        "peers": {"tasks": tasks, "rounds": args.rounds or (2 if q else 7),
                  "round_trips": args.round_trips or (60 if q else 300), "warmup_tasks": min(tasks, 300 if q else 1_000),
                  "workers": 2, "idle_s": 1.0 if q else 3.0},
        "hops": {"batch": 500 if q else 2_000, "depth": 4, "warmup_s": 1.0 if q else 3.0, "window_s": 3.0 if q else 15.0},
        "leader": {"workers": 8, "procs": 2, "slots": 16, "prefetch": 16, "feeders": 2,
                   "batch": 1_000 if q else 2_000, "depth": 4 if q else 8,
                   "warmup_s": 1.5 if q else 5.0, "window_s": 3.0 if q else 20.0,
                   "feeds": args.leader_feeds.split(",") if args.leader_feeds else (["units"] if q else ["map", "units"]),
                   "raft": raft},
        "drain": {"units": args.units or (1_000 if q else 100_000), "variants": args.drain_variants.split(",")},
        "slot": {"tasks": tasks},
        "takeover": {"kills": 5},
        "curve": {"tasks": tasks, "rounds": 3 if q else 7, "workers": 2},
        "raft": raft,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts and windows: about a minute once set up")
    ap.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                    help=f"comma-separated parts: {', '.join(PARTS)}, or all (default: {','.join(DEFAULT_PARTS)})")
    ap.add_argument("--json", default=None, help="where to write the results (default bench/results/dispatch.json, "
                                                 "dispatch-quick.json with --quick)")
    ap.add_argument("--peers", default="dask,ray", help="comma-separated peers to run (dask, ray; empty: none)")
    ap.add_argument("--skip-setup", action="store_true", help="fail if bench/.peers-venv is missing instead of building it")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per interleaved batch (default 5,000, --quick 1,000)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 2)")
    ap.add_argument("--round-trips", type=int, default=None, help="latency round trips per system (default 300, --quick 60)")
    ap.add_argument("--units", type=int, default=None, help="units per drain (default 100,000, --quick 1,000)")
    ap.add_argument("--drain-variants", default="call,command", help="comma-separated: call, command")
    ap.add_argument("--leader-feeds", default=None, help="comma-separated: map, units (default both, --quick units)")
    ap.add_argument("--raft-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a pysyncobj option for every cluster's masters ([raft.timings]), e.g. "
                         "appendEntriesBatchSizeBytes=67108864; default none: as shipped")
    args = ap.parse_args(argv)
    parts = list(PARTS) if args.parts == "all" else [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)} or all")
    peers = [p for p in args.peers.split(",") if p] if "peers" in parts else []
    if set(peers) - set(PINS):
        ap.error(f"unknown peers {sorted(set(peers) - set(PINS))}; choose from {sorted(PINS)}")
    json_path = args.json or str(ROOT / "bench" / "results" / ("dispatch-quick.json" if args.quick else "dispatch.json"))

    started = time.perf_counter()
    cfgs = configs(args)
    res: dict[str, Any] = {"machine": machine.machine_info(), "parts": parts, "peers_asked": peers,
                           "config": {"quick": args.quick, **{p: cfgs[p] for p in parts}, "pins": PINS,
                                      "raft_options": cfgs["raft"] or "as shipped"}}
    cpu0 = machine.cpu_times()
    res["setup"] = ensure_peers(peers, args.skip_setup) if peers else {"peers": {}, "first_setup": {}}
    res.update(run_parts(parts, cfgs, peers, res["setup"]))
    for name, r in (res.get("peers") or {}).get("systems", {}).items():
        res["machine"].update((r.get("info") or {}).get("versions", {}) if name != "ours" else {})
    res["acceptance"] = acceptance(res)
    machine.finish(res, cpu0, started, json_path)
    print_report(res)
    failed = [p for p in parts if isinstance(res.get(p), dict) and "error" in res[p]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
