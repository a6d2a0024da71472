#!/usr/bin/env python3
"""Failover on a rack: how long client writes stop when the masters' leader is cut off.

Run from the repository root, as root (the rack needs network namespaces)::

    .venv/bin/python bench/failover.py            # 5 cuts and a quiet minute, writes bench/results/failover.json
    .venv/bin/python bench/failover.py --quick    # 2 cuts, no quiet phase (under a minute)
    .venv/bin/python bench/failover.py --cuts 9 --quiet 120 --json /tmp/f.json

A rack (tests/rack/rack.py: every node on its own host, started from its systemd unit, CURVE on)
is built as tests/rack/conftest.py builds it and torn down at the end whatever happens. A writer
thread submits one-task jobs through the client API back to back (each submit returns once a
quorum committed it, then 50 ms of rest), with the client as a user has it (``Rack.client``:
its config, default timeouts). Then, N times:

1. the leader (serving) is cut off from both followers (``Rack.cut``: nftables; the client
   still reaches every master, so the old leader keeps taking the client's writes until it steps
   down);
2. **election**: from the cut until a follower says, in its status, that it leads and serves
   (its term's first entry committed); polled every 50 ms;
3. **first write**: from the cut until the first submit acknowledged by another master than the
   old leader (the client's leader after the answer). The submit that was in flight at the cut
   is in it, with its tries;
4. **why**: the new leader's term less the old one (1: one election; more: a vote was lost or
   split), and the role changes the masters logged after the cut (``raft: candidate in term N``
   lines, the masters' wall clock on this same machine);
5. the old leader steps down (it knows it has no quorum), the cut heals, the old leader rejoins
   as a follower, and the whole rack serves again before the next cut.

Then, with ``--quiet S``, S seconds of the same writes with no fault: any term change of any
master is a spurious election (the election timeouts are too short for this machine's load).
The machine's load and CPU shares are recorded (other racks may be running beside this one).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first: bench/storage.py would shadow the storage package

from bench import machine  # noqa: E402
from master.raft import DEFAULT_TIMINGS  # noqa: E402
from tests.rack.rack import Rack, unavailable  # noqa: E402

WRITE_REST = 0.05  # between one acknowledged submit and the next: a steady stream, not a busy loop
STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*"
# master.core's role changes (its "candidate" is any master that knows no leader) and master.raft's
# campaigns (this master asked for votes) and hurried campaigns (a refused vote, see _RaftTransport)
ROLE_LINE = re.compile(STAMP + r"raft: (\w+) in term (\d+), leader (\S+)")
CAMPAIGN_LINE = re.compile(STAMP + r"raft: campaigning in term (\d+)")
HURRY_LINE = re.compile(STAMP + r"raft: (\S+) asked for votes in term (\d+) (.*): campaigning at once")


def double(x):
    return x * 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Writer:
    """Submits back to back on its own thread; records (sent, acknowledged, master) per submit
    (times on the monotonic clock) and the submits that were not acknowledged."""

    def __init__(self, rack: Rack) -> None:
        self.client = rack.client(timeout=20)
        self.by_address = {a: n for n, a in rack.config.masters.items()}
        self.acks: list[tuple[float, float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def _run(self) -> None:
        i = 0
        link = self.client.link
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                self.client.submit(double, i)
                by = self.by_address.get(link.masters[link.leader], "?")
                with self.lock:
                    self.acks.append((sent, time.monotonic(), by))
            except Exception as exc:  # never acknowledged: not a lost write, but counted
                with self.lock:
                    self.errors.append((sent, repr(exc)))
            i += 1
            self.stop.wait(WRITE_REST)

    def count(self) -> int:
        with self.lock:
            return len(self.acks)

    def first_after(self, t: float, not_by: str) -> tuple[float, float, str] | None:
        with self.lock:
            return next((a for a in self.acks if a[1] > t and a[2] != not_by), None)

    def __enter__(self) -> "Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()


def role_changes(rack: Rack, since_wall: float) -> list[dict[str, Any]]:
    """The masters' logged role changes after ``since_wall`` (wall clock), oldest first."""
    out = []
    for m in rack.role("master"):
        for line in rack.log(m).read_text(errors="replace").splitlines():
            if (hit := ROLE_LINE.match(line)):
                event = {"role": hit.group(2), "term": int(hit.group(3)), "leader": hit.group(4).rstrip(",")}
            elif (hit := CAMPAIGN_LINE.match(line)):
                event = {"role": "campaign", "term": int(hit.group(2))}
            elif (hit := HURRY_LINE.match(line)):
                event = {"role": "hurried", "term": int(hit.group(3)), "by": hit.group(2), "why": hit.group(4)}
            else:
                continue
            stamp = datetime.datetime.strptime(hit.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if stamp >= since_wall - 0.001:
                out.append({"master": m, "at_s": round(stamp - since_wall, 3), **event})
    return sorted(out, key=lambda e: e["at_s"])


def terms(rack: Rack) -> dict[str, int | None]:
    return {m: (d or {}).get("term") for m, d in rack.details(rack.role("master")).items()}


def one_cut(rack: Rack, writer: Writer, k: int) -> dict[str, Any]:
    """Cut the serving leader off from its followers; measure; heal; wait for the whole rack."""
    rack.wait_healthy(60)
    old = rack.leader()
    followers = [m for m in rack.role("master") if m != old]
    term0 = rack.detail(old)["term"]
    before = writer.count()
    rack.wait(lambda: writer.count() >= before + 10, 30, "10 writes acknowledged before the cut")
    cut_wall, cut = time.time(), time.monotonic()
    rack.cut([old], followers)

    def serving_follower():
        return next((m for m in followers if (d := rack.detail(m)) and d["state"] == "leader" and d["serving"]), None)

    new = rack.wait(serving_follower, 30, f"one of {followers} to lead and serve")
    elected = time.monotonic() - cut
    first = rack.wait(lambda: writer.first_after(cut, old), 30, "a write acknowledged by the new leader")
    term1 = rack.detail(new)["term"]
    rack.wait(lambda: (d := rack.detail(old)) and not (d["state"] == "leader" and d["has_quorum"]), 10,
              f"the old leader {old} to know it has no quorum")
    stepped_down = time.monotonic() - cut
    rack.heal()
    healed = time.monotonic()
    rack.wait(lambda: (d := rack.detail(old)) and d["state"] == "follower" and d["leader"], 60,
              f"{old} to rejoin as a follower")
    rejoined = time.monotonic() - healed
    rack.wait_healthy(60)
    changes = role_changes(rack, cut_wall)
    result = {
        "cut": k, "old": old, "new": new, "term_before": term0, "term_after": term1, "terms": term1 - term0,
        "elected_s": round(elected, 3), "first_write_s": round(first[1] - cut, 3),
        "first_write_sent_s": round(first[0] - cut, 3),  # negative: in flight at the cut
        "old_stepped_down_by_s": round(stepped_down, 3), "rejoined_after_heal_s": round(rejoined, 3),
        "role_changes": [c for c in changes if c["at_s"] <= elected + 1.0],
        "settled_term": rack.detail(new)["term"],
    }
    log(f"cut {k}: {old} -> {new}, {result['terms']} term(s), elected {elected:.2f} s, first write "
        f"{result['first_write_s']:.2f} s (sent {result['first_write_sent_s']:+.2f} s), rejoined {rejoined:.2f} s "
        f"after the heal")
    return result


def quiet(rack: Rack, seconds: float) -> dict[str, Any]:
    """``seconds`` of writes with no fault: every master's term should stay put."""
    rack.wait_healthy(60)
    start_wall = time.time()
    t0, cpu0 = terms(rack), machine.cpu_times()
    time.sleep(seconds)  # the measured interval itself (writes go on meanwhile)
    t1 = terms(rack)
    changes = role_changes(rack, start_wall)
    return {"seconds": seconds, "terms_before": t0, "terms_after": t1,
            "term_changes": {m: (t1[m] or 0) - (t0[m] or 0) for m in t0}, "role_changes": changes,
            "cpu_shares": machine.cpu_shares(cpu0, machine.cpu_times()), "loadavg": list(os.getloadavg())}


def why(c: dict[str, Any]) -> str:
    steps = [f"{e['master']} t{e['term']}{'!' if e['role'] == 'hurried' else ''} @{e['at_s']:.2f}"
             for e in c["role_changes"] if e["role"] in ("campaign", "hurried") and e["master"] != c["old"]]
    n = c["terms"]
    return f"{'one election' if n == 1 else f'{n} terms'}: {', '.join(steps) or '?'}"


def summary(cuts: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(c[key] for c in cuts), 3)
    return {
        "cuts": len(cuts), "elected_median_s": med("elected_s"), "first_write_median_s": med("first_write_s"),
        "first_write_max_s": max(c["first_write_s"] for c in cuts), "elected_max_s": max(c["elected_s"] for c in cuts),
        "one_election": sum(c["terms"] == 1 for c in cuts), "rejoined_median_s": med("rejoined_after_heal_s"),
    }


def print_report(res: dict[str, Any]) -> None:
    print()
    print("| cut | leader | terms | elected s | first write s | (sent s) | rejoin s | why (campaigns; ! hurried) |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for c in res["cuts"]:
        print(f"| {c['cut']} | {c['old']} → {c['new']} | {c['terms']} | {c['elected_s']:.2f} | "
              f"**{c['first_write_s']:.2f}** | {c['first_write_sent_s']:+.2f} | {c['rejoined_after_heal_s']:.2f} | "
              f"{why(c)} |")
    s = res["summary"]
    print(f"\nmedian of {s['cuts']}: elected {s['elected_median_s']:.2f} s, first write "
          f"**{s['first_write_median_s']:.2f} s** (max {s['first_write_max_s']:.2f}); one election in "
          f"{s['one_election']} of {s['cuts']}; rejoin after the heal {s['rejoined_median_s']:.2f} s")
    print(f"writes acknowledged {res['writes']['acknowledged']}, not acknowledged {res['writes']['not_acknowledged']}")
    if res.get("quiet"):
        q = res["quiet"]
        print(f"quiet {q['seconds']:g} s under writes: term changes {q['term_changes']} "
              f"(load {q['loadavg'][0]:.2f}; CPU busy {q['cpu_shares']['busy']:.0%}, steal {q['cpu_shares']['steal']:.0%})")
    m = res["machine"]
    sh = m.get("cpu_shares_during_run") or {}
    print(f"machine: {m['nproc']} CPUs, load {m['loadavg_start'][0]:.2f} → {m['loadavg_end'][0]:.2f}, "
          f"CPU busy {sh.get('busy', 0):.0%} idle {sh.get('idle', 0):.0%} steal {sh.get('steal', 0):.0%}; "
          f"other racks running: {res['other_racks']}; results in {res['json_path']}")


def other_racks() -> int:
    """Racks of other processes on this machine now (their namespaces' prefixes)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    mine = f"crk{os.getpid()}"
    return len({n.split("-")[0] for n in names if n.startswith("crk") and not n.startswith(mine)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 cuts, no quiet phase (under a minute)")
    ap.add_argument("--cuts", type=int, default=None, help="leader cuts (default 5, --quick 2)")
    ap.add_argument("--quiet", type=float, default=None, help="seconds of writes with no fault (default 60, --quick 0)")
    ap.add_argument("--logs", default=None, help="copy the nodes' logs to this directory before the rack goes")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "failover.json"), help="where to write the results")
    args = ap.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        print(f"cannot build a rack here: {reason}", file=sys.stderr)
        return 2
    n_cuts = args.cuts or (2 if args.quick else 5)
    quiet_s = args.quiet if args.quiet is not None else (0 if args.quick else 60)
    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine.machine_info(), "other_racks": other_racks(),
                           "config": {"cuts": n_cuts, "quiet_s": quiet_s, "raft_timings": DEFAULT_TIMINGS,
                                      "write_rest_s": WRITE_REST}}
    cpu0 = machine.cpu_times()
    directory = Path(tempfile.mkdtemp(prefix="crk-rack-"))
    directory.chmod(0o711)  # the workers' task user passes through it (tests/rack/conftest.py)
    rack = Rack(directory)
    try:
        log("building the rack")
        rack.up()
        with Writer(rack) as writer:
            res["cuts"] = [one_cut(rack, writer, k + 1) for k in range(n_cuts)]
            if quiet_s:
                log(f"{quiet_s:g} s of writes with no fault")
                res["quiet"] = quiet(rack, quiet_s)
        res["writes"] = {"acknowledged": len(writer.acks), "not_acknowledged": len(writer.errors),
                         "errors": writer.errors[:10]}
    finally:
        problems = rack.down()
        if args.logs and (directory / "logs").is_dir():
            shutil.copytree(directory / "logs", args.logs, dirs_exist_ok=True)
        shutil.rmtree(directory, ignore_errors=True)
        if problems:
            print(f"rack teardown left: {problems}", file=sys.stderr)
    res["summary"] = summary(res["cuts"])
    machine.finish(res, cpu0, started, args.json)
    print_report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
