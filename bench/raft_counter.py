#!/usr/bin/env python3
"""The baseline for bench/ledger.py: pysyncobj's own replicated counter, one node per process.

``bench/ledger.py`` starts three of these on 127.0.0.1 (``counter_cluster`` below), all with the
same arguments but their own address. Every node waits until a leader is elected and has been
stable for a moment; the node that leads then drives the load, the others only follow:

* ``--warmup`` increments (not timed), then ``--reps`` times ``--count`` increments, each an
  asynchronous ``incr(callback=…)`` with at most ``--window`` outstanding (a semaphore released
  by the callback, which pysyncobj calls on its Raft thread once the entry is committed and
  applied on the leader). One rep's rate is ``count`` / (last callback − first call).
* The result (JSON) is written atomically to ``--result``; the node then keeps following until
  the parent stops it (SIGTERM, by pid).

Raft settings: ``master.raft.DEFAULT_TIMINGS`` (the masters' timings), ``autoTick``, pysyncobj's
own ``FileJournal`` in ``--journal`` (as the masters journal to disk), ``appendEntriesUseBatch``
from ``--batch``, ``commandsWaitLeader=False`` as in the masters' adapter. ``--durable`` uses the
masters' own journal and transport instead (``master.raft``: msync of the journal before any Raft
message leaves), which isolates what that durability costs.

The command is the smallest there is: ``incr()`` with no argument (a pickled function id).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# first, even when an editable install lists ROOT already: run as `python bench/X.py`, sys.path
# starts with bench/, where storage.py would shadow the storage package
sys.path.insert(0, str(ROOT))


# ---- the node (runs in its own process) --------------------------------------------------------


def run_node(args: argparse.Namespace) -> int:
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    from master.raft import DEFAULT_TIMINGS

    transport_class = None
    if args.durable:
        import master.raft as mraft  # installs the masters' journal factory in pysyncobj

        transport_class = mraft._SyncingTransport  # noqa: SLF001

    class Counter(SyncObj):
        def __init__(self, self_address: str, partners: list[str], conf: SyncObjConf) -> None:
            self.value = 0
            kwargs = {"transportClass": transport_class} if transport_class else {}
            super().__init__(self_address, partners, conf, **kwargs)

        @replicated
        def incr(self) -> int:
            self.value += 1
            return self.value

    conf = SyncObjConf(
        autoTick=True,
        appendEntriesUseBatch=bool(args.batch),
        journalFile=args.journal,
        commandsWaitLeader=False,
        **DEFAULT_TIMINGS,
    )
    counter = Counter(args.self_address, args.partner, conf)
    if args.durable:
        import master.raft as mraft

        counter._SyncObj__transport.journal = getattr(mraft._journals, "last", None)  # noqa: SLF001

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    # wait for a leader that has stayed the same for `settle` seconds
    deadline = time.monotonic() + args.ready_timeout
    stable_since, last = None, None
    while not stop.is_set() and time.monotonic() < deadline:
        leader = counter._getLeader()  # noqa: SLF001
        now = time.monotonic()
        if leader is None or leader != last or not counter.hasQuorum and counter._isLeader():  # noqa: SLF001
            stable_since, last = (now if leader is not None else None), leader
        elif stable_since is not None and now - stable_since >= args.settle:
            break
        time.sleep(0.02)
    else:
        if not stop.is_set():
            _write(args.result + f".{os.getpid()}.err", {"error": "no stable leader", "node": args.self_address})
        counter.destroy()
        return 1

    if counter._isLeader():  # noqa: SLF001
        result = drive(counter, args, FAIL_REASON)
        result["node"] = args.self_address
        _write(args.result, result)
    stop.wait()
    counter.destroy()
    return 0


def drive(counter: Any, args: argparse.Namespace, fail_reason: Any) -> dict:
    term0 = counter._getTerm()  # noqa: SLF001

    def burst(n: int) -> dict:
        sem = threading.Semaphore(args.window)
        done = threading.Event()
        tally = {"ok": 0, "failed": 0, "left": n, "last": 0.0, "reasons": {}}

        def callback(result: Any, error: int) -> None:  # the Raft thread
            if error == fail_reason.SUCCESS:
                tally["ok"] += 1
            else:
                tally["failed"] += 1
                tally["reasons"][str(error)] = tally["reasons"].get(str(error), 0) + 1
            tally["left"] -= 1
            if tally["left"] == 0:
                tally["last"] = time.perf_counter()
                done.set()
            sem.release()

        t0 = time.perf_counter()
        for _ in range(n):
            sem.acquire()
            counter.incr(callback=callback)
        finished = done.wait(args.rep_timeout)
        seconds = (tally["last"] if finished else time.perf_counter()) - t0
        return {"count": n, "ok": tally["ok"], "failed": tally["failed"], "reasons": tally["reasons"],
                "finished": finished, "seconds": seconds, "per_s": tally["ok"] / seconds if seconds else 0.0}

    warm = burst(args.warmup) if args.warmup else None
    reps = [burst(args.count) for _ in range(args.reps)]
    time.sleep(0.1)
    ok = sum(r["ok"] for r in reps) + (warm["ok"] if warm else 0)
    return {"warmup": warm, "reps": reps, "term_start": term0, "term_end": counter._getTerm(),  # noqa: SLF001
            "still_leader": bool(counter._isLeader()), "value": counter.value, "ok_total": ok,  # noqa: SLF001
            "value_matches": counter.value == ok}


def _write(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, path)


# ---- the parent side (used by bench/ledger.py) -------------------------------------------------


@dataclass
class CounterRun:
    mode: str
    result: dict | None = None
    error: str | None = None
    logs: dict[str, str] = field(default_factory=dict)


def counter_cluster(mode: str, *, count: int, reps: int, window: int, warmup: int, nodes: int = 3,
                    timeout: float = 180.0, keep_dir: Path | None = None) -> CounterRun:
    """Run the counter on ``nodes`` local processes; ``mode`` is ``batch`` (appendEntriesUseBatch
    True), ``nobatch`` (False) or ``durable`` (False, with the masters' msync'd journal).
    Every process is stopped by pid before this returns, also on error."""
    from cluster.local import free_port

    run = CounterRun(mode)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix=f"raftcounter-{mode}-", dir=keep_dir) as tmp:
        d = Path(tmp)
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(nodes)]
        result_path = d / "result.json"
        try:
            for i, me in enumerate(addresses):
                argv = [sys.executable, str(Path(__file__).resolve()), "node", "--self", me,
                        "--journal", str(d / f"n{i}.journal"), "--batch", "0" if mode in ("nobatch", "durable") else "1",
                        "--result", str(result_path), "--count", str(count), "--reps", str(reps),
                        "--window", str(window), "--warmup", str(warmup)]
                if mode == "durable":
                    argv.append("--durable")
                for other in addresses:
                    if other != me:
                        argv += ["--partner", other]
                log = open(d / f"n{i}.log", "wb")
                procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                              start_new_session=True, cwd=str(ROOT)))
                log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if result_path.exists():
                    run.result = json.loads(result_path.read_text())
                    break
                errs = list(d.glob("result.json.*.err"))
                dead = [p for p in procs if p.poll() is not None]
                if errs or dead:
                    run.error = (f"node exited with {dead[0].returncode}" if dead else
                                 json.loads(errs[0].read_text())["error"])
                    break
                time.sleep(0.05)
            else:
                run.error = f"no result within {timeout:g} s"
        finally:
            for p in procs:
                stop_pid(p)
            for i in range(len(procs)):
                f = d / f"n{i}.log"
                run.logs[f"n{i}"] = f.read_text(errors="replace")[-4000:] if f.exists() else ""
    return run


def stop_pid(p: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM this one process, SIGKILL if it does not exit in time."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("node", help="one counter node (started by counter_cluster)")
    n.add_argument("--self", dest="self_address", required=True)
    n.add_argument("--partner", action="append", default=[])
    n.add_argument("--journal", default=None)
    n.add_argument("--batch", type=int, default=1)
    n.add_argument("--durable", action="store_true")
    n.add_argument("--result", required=True)
    n.add_argument("--count", type=int, default=20_000)
    n.add_argument("--reps", type=int, default=3)
    n.add_argument("--window", type=int, default=1000)
    n.add_argument("--warmup", type=int, default=2000)
    n.add_argument("--settle", type=float, default=0.5)
    n.add_argument("--ready-timeout", type=float, default=60.0)
    n.add_argument("--rep-timeout", type=float, default=120.0)
    c = sub.add_parser("run", help="run a 3-node counter cluster here and print its result")
    c.add_argument("--mode", choices=("batch", "nobatch", "durable"), default="batch")
    c.add_argument("--count", type=int, default=20_000)
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--window", type=int, default=1000)
    c.add_argument("--warmup", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.cmd == "node":
        return run_node(args)
    r = counter_cluster(args.mode, count=args.count, reps=args.reps, window=args.window, warmup=args.warmup)
    if r.error:
        print("error:", r.error, file=sys.stderr)
        for name, text in r.logs.items():
            print(f"--- {name}\n{text}", file=sys.stderr)
        return 1
    print(json.dumps(r.result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
