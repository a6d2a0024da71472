#!/usr/bin/env python3
"""Chaos soak (issue 22): random faults across every host of a simulated rack while a mixed
workload runs, then a checker that nothing was lost, recorded twice or wrong.

Run from the repository root, as root (the rack is network namespaces on a bridge)::

    .venv/bin/python bench/chaos.py --seed 7 --minutes 5   # writes bench/results/chaos.json
    .venv/bin/python bench/chaos.py --quick                # one minute, a new seed (printed)
    .venv/bin/python bench/chaos.py --seed 7 --minutes 30 --json /tmp/c.json

The rack is tests/rack/rack.py's (3 masters, the balancer pair, 2 storage nodes, 2 workers, each
node in its own namespace, started from its systemd unit, CURVE on every link), built for this run
and torn down at the end by pid and by name, whatever happens.

The faults (bench/chaos_faults.py) are a pure function of the seed and the duration: the same
seed replays the same schedule (which master is the leader when "kill leader" comes is the
rack's, and is in the history). The workload (bench/chaos_work.py): callables, commands, units
through a chain of three work specs, and alignments checked against the single-process answer.
After the last fault the rack is healed; the soak waits until it serves as a whole, waits for
every acknowledged operation's results, and the checker (bench/chaos_check.py) reads the ledger:
every acknowledged submit there, every task and unit done exactly once, every result right, every
node healthy. It prints the faults table (count, stall, lost attempts per fault) and the totals.
Exit status 1 on any violation; the run's seed and the command that replays it are printed, and
the rack's directory (every node's log, the history as JSON lines) is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first: run as `python bench/X.py`, sys.path starts with bench/

from bench import machine  # noqa: E402
from bench.chaos_check import check, fault_table, format_table  # noqa: E402
from bench.chaos_faults import Injector, schedule  # noqa: E402
from bench.chaos_work import History, Workload  # noqa: E402
from tests.rack.rack import Rack, RackTimeout, unavailable  # noqa: E402

DRAIN_S = 240.0  # after the heal, for every acknowledged operation's results
HEALTHY_S = 90.0  # after the heal, for the rack to serve as a whole


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def soak(seed: int, minutes: float, *, echo: Callable[[str], None] = log, keep: bool = False) -> dict[str, Any]:
    """One soak on a rack of its own; returns the run's figures (``verdict.ok`` says whether it
    passed). The rack's directory is removed unless the run failed or ``keep``."""
    seconds = minutes * 60.0
    faults = schedule(seed, seconds)
    directory = Path(tempfile.mkdtemp(prefix="crk-chaos-"))
    directory.chmod(0o711)  # the workers' task user passes through the hosts' trees (tests/rack/conftest.py)
    rack = Rack(directory)
    res: dict[str, Any] = {"seed": seed, "minutes": minutes, "faults_planned": len(faults), "directory": str(directory)}
    ok = False
    try:
        t = time.monotonic()
        rack.up()
        res["rack_up_s"] = time.monotonic() - t
        with rack.client() as c:
            Workload.setup(c)
        echo(f"chaos: rack up in {res['rack_up_s']:.1f} s ({directory}); seed {seed}, {minutes:g} min, "
             f"{len(faults)} faults planned")
        res.update(run(rack, seed, seconds, faults, echo))
        ok = res["verdict"]["ok"]
        if not ok:
            (directory / "history.jsonl").write_text("".join(json.dumps(e, default=str) + "\n" for e in res.pop(
                "_history")))
            (directory / "forensics.json").write_text(json.dumps(res.pop("_forensics"), indent=1, default=str))
        res.pop("_history", None)
        res.pop("_forensics", None)
        return res
    finally:
        problems = rack.down()
        res["teardown_problems"] = problems
        if ok and not keep and not problems:
            shutil.rmtree(directory, ignore_errors=True)


def run(rack: Rack, seed: int, seconds: float, faults: list, echo: Callable[[str], None]) -> dict[str, Any]:
    """The soak proper on a rack that serves: workload and faults for ``seconds``, heal, drain,
    check."""
    t0 = time.monotonic()

    def note(event: str, /, **detail: Any) -> None:
        history.note(event, **detail)
        if event in ("inject", "heal", "crash", "loop_error"):
            shown = " ".join(f"{k}={v}" for k, v in detail.items() if v not in (None, [], ""))
            echo(f"[{time.monotonic() - t0:7.1f} s] {event:<6} {shown}")

    history = History(t0)
    work = Workload(lambda: rack.client(timeout=20), seed, history)
    injector = Injector(rack, faults, note, t0)
    stop = threading.Event()
    work.start()
    try:
        injector.run(stop)  # every fault and its heal, then everything healed
        stop.wait(max(0.0, seconds - (time.monotonic() - t0)))  # the workload runs to the end
    finally:
        injector.heal_all()
    healed = time.monotonic()
    unhealthy = None
    try:
        rack.wait_healthy(HEALTHY_S)
    except RackTimeout as exc:
        unhealthy = str(exc)[:3000]
    serving_after = time.monotonic() - healed
    echo(f"chaos: healed at {healed - t0:.1f} s; the rack served as a whole {serving_after:.2f} s later"
         if unhealthy is None else f"chaos: the rack did NOT serve as a whole {HEALTHY_S:g} s after the heal")
    outstanding = work.finish(DRAIN_S)
    drained = time.monotonic() - healed
    checked = time.monotonic()
    with rack.client() as c:
        verdict = check(c, work, unhealthy or rack.unhealthy(), injector.crashes)
    checked = time.monotonic() - checked
    verdict.unhealthy += [f"still running after the drain: {x}" for x in outstanding if x.startswith("loop")]
    forensics = None if verdict.ok else {"t0_wall": time.time() - (time.monotonic() - t0),
                                         "status": rack.details([h.name for h in rack.nodes()], timeout=2.0)}
    work.close()
    completions = sorted(e[0] for e in history.of("result"))
    table = fault_table(injector.played, t0, completions, verdict.ended)
    return {
        "soak_s": healed - t0, "serving_after_heal_s": serving_after, "drained_after_heal_s": drained,
        "check_s": checked,
        "faults": [p.as_dict() for p in injector.played], "table": table, "verdict": verdict.as_dict(),
        "history_counts": history.counts(), "alignments": work.alignments, "crashes": injector.crashes,
        "units_added": work.units_added, "outstanding_after_drain": outstanding,
        "_history": history.events, "_forensics": forensics,
    }


def report(res: dict[str, Any], out: Callable[[str], None] = print) -> None:
    v = res["verdict"]
    out(f"\nchaos soak: seed {res['seed']}, {res['minutes']:g} min, {len(res['faults'])} faults played "
        f"({sum(r['skipped'] for r in res['table'])} skipped)")
    out(format_table(res["table"]))
    out(f"\noperations acknowledged {v['operations']} (not acknowledged: {v['not_acknowledged']}); tasks "
        f"{v['tasks']}, units {v['units']}, results checked {v['results']}, alignments {len(res['alignments'])}; "
        f"attempts lost or failed {v['lost_or_failed_attempts']}; duplicate completions refused by the ledger "
        f"{v['refused_duplicates']}")
    out(f"lost {len(v['lost'])}, duplicated {len(v['duplicated'])}, wrong {len(v['wrong'])}, unhealthy "
        f"{len(v['unhealthy'])}; the rack served as a whole {res['serving_after_heal_s']:.2f} s after the last "
        f"heal, every result in {res['drained_after_heal_s']:.1f} s")
    for name in ("lost", "duplicated", "wrong", "unhealthy"):
        for line in v[name][:20]:
            out(f"  {name}: {line}")
        if len(v[name]) > 20:
            out(f"  {name}: ... {len(v[name]) - 20} more")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="the fault schedule's seed (default: a new one, printed)")
    ap.add_argument("--minutes", type=float, default=None, help="how long faults are injected (default 5, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="a one-minute soak")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "chaos.json"), help="where to write the results")
    ap.add_argument("--keep", action="store_true", help="keep the rack's directory (logs) even when the run passes")
    args = ap.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        log(f"chaos: {reason}")
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 5.0)
    replay = f".venv/bin/python bench/chaos.py --seed {seed} --minutes {minutes:g}"
    log(f"chaos: seed {seed} (replay: {replay})")
    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine.machine_info()}
    cpu0 = machine.cpu_times()
    res.update(soak(seed, minutes, keep=args.keep))
    res["replay"] = replay
    machine.finish(res, cpu0, started, args.json)
    report(res)
    if not res["verdict"]["ok"]:
        print(f"\nchaos: FAILED with seed {seed}; replay: {replay}\n  logs and history: {res['directory']}")
        return 1
    print(f"\nchaos: passed (seed {seed}); results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
