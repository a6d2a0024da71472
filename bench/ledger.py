#!/usr/bin/env python3
"""Ledger benchmark: what three Raft-replicated masters commit per second, against pysyncobj's
own raw replicated counter, and how long a leader's death interrupts submits.

Run from the repository root::

    .venv/bin/python bench/ledger.py            # full run (a few minutes), writes bench/results/ledger.json
    .venv/bin/python bench/ledger.py --quick    # under a minute
    .venv/bin/python bench/ledger.py --json /tmp/l.json --reps 7 --failovers 9

Every cluster is 3 processes on 127.0.0.1 with their Raft journals in a temporary directory;
only one cluster runs at a time, and every process is stopped by its pid at the end (also on
error). The phases:

1. **Submits/s committed** (our masters, ``cluster.local.master_nodes``): ``Client.submit_many``
   of N ``range`` jobs of one task each, window 256; a submit counts when its SUBMIT_ACK (sent
   only after the batch committed on a quorum) is back. Median of R reps.
   Jobs stay in the ledger once done, so every rep starts with more of them (recorded per rep as
   ``jobs_in_ledger_before``); phase 5 measures what they cost the leader.
2. **Task completions/s committed**, same cluster: one ``range`` job of M tasks
   (``keep_results`` false), then ``master.echo_balancer.EchoBalancer`` (credit 2048) attaches to
   the leader and completes every task at once; M / (time from ATTACH to the M-th RESULT_ACK).
   Each completion is assigned (an ``AssignTasks`` entry) and completed (a ``CompleteTask``), so
   it costs two commands. The one-task jobs of phase 1 are drained by an untimed echo run first.
   Phases 1 and 2 alternate per rep, after one untimed warm-up of each. Every echo run attaches
   with epoch 1 (see ``ECHO_EPOCH``).
3. **Baseline**: pysyncobj's replicated counter (``bench/raft_counter.py``): one ``@replicated
   incr()`` per command, driven on the leader with up to 1,000 asynchronous calls outstanding,
   same ``master.raft.DEFAULT_TIMINGS``, pysyncobj's file journal; ``appendEntriesUseBatch`` True
   (pysyncobj's default) and False (what our adapter sets), plus ``durable``: False with our
   adapter's journal (msync before every Raft message), which isolates what that costs. Median of
   R reps of C increments each. Our submits/s and completions/s are reported as ratios to these.
4. **Failover**, a fresh cluster: a client thread submits one-task jobs back to back
   (``Client(attempt_timeout=0.3)``); the leader (``query_status``: state "leader", serving) is
   SIGKILLed; the failover time is from just before the kill to the first submit acknowledged by
   another master (the client's leader index after the ack). Also reported: when the new leader
   was elected (its ``leader_since``; the masters' clock is CLOCK_MONOTONIC, shared by every
   process here), its ``first_commit_s`` (election → its first entry committed), the terms
   passed. The killed master is restarted and is a caught-up follower before the next round.
5. **Finished jobs** (only with ``--finished-jobs N``): the leader's ledger work per task in one
   process (``bench/leader_work.py``: dispatch, ``AssignTasks`` and ``CompleteTask`` applied as
   the leader drives them, then the leader's whole core with Raft faked: its CPU per task) with
   0 and N finished one-task jobs in the ledger; then, on a fresh
   cluster, completions/s as in phase 2 and the leader process's CPU per task, first with (almost)
   no jobs in the ledger, then after N one-task jobs were submitted and completed. Phases 1-4
   can be left out with ``--phases finished``.

Raft terms are read before and after each phase and the masters' logs are scanned for role
changes: an election that no kill caused is reported as spurious.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
# first, even when an editable install lists ROOT already: run as `python bench/X.py`, sys.path
# starts with bench/, where storage.py would shadow the storage package
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bench import leader_work, machine  # noqa: E402
from bench.raft_counter import counter_cluster  # noqa: E402
from cluster.client import Client, ClusterError  # noqa: E402
from cluster.local import LocalNode, credentials_as, master_nodes, start_all, stop_all  # noqa: E402
from cluster.node.status import query_status  # noqa: E402
from master.echo_balancer import EchoBalancer  # noqa: E402
from master.raft import DEFAULT_TIMINGS  # noqa: E402

SUBMIT_WINDOW = 256
ECHO_CREDIT = 2048
COUNTER_WINDOW = 1000
ATTEMPT_TIMEOUT = 0.3
# Every echo run attaches with the same Binary Star epoch (the same balancer reconnecting). With a
# higher epoch per run, tasks whose AssignTasks was in flight for the previous (gone) balancer when
# the new one attached were never sent to anyone: MasterCore._assigned drops them for the old epoch,
# and they were not yet open assignments when the ATTACH listed those (seen here: 1,000 tasks stuck
# "assigned" for good).
ECHO_EPOCH = 1
COUNTER_MODES = ("batch", "nobatch", "durable")
MODE_LABEL = {
    "batch": "pysyncobj counter, appendEntriesUseBatch=True",
    "nobatch": "pysyncobj counter, appendEntriesUseBatch=False",
    "durable": "pysyncobj counter, UseBatch=False + our msync'd journal",
}
PHASES = ("masters", "counter", "failover", "finished")
ROLE_LINE = re.compile(r"raft: (leader|follower|candidate) in term (\d+)")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---- a local cluster of masters ------------------------------------------------------------


class Masters:
    """Three masters in a temporary directory; ``close()`` stops every process by pid."""

    def __init__(self, root: Path, name: str, count: int = 3) -> None:
        self.dir = root / name
        self.nodes: list[LocalNode] = master_nodes(self.dir, count)
        self.addresses = [n.address for n in self.nodes]
        self.balancer_key = credentials_as(self.dir / "masters.toml", "echo", "balancer")  # the echo attaches

    def __enter__(self) -> "Masters":
        start_all(self.nodes, 30)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        stop_all(self.nodes)

    def statuses(self, timeout: float = 1.0) -> list[dict | None]:
        return [r.reply.detail if r.reply is not None else None
                for r in query_status(self.addresses, timeout=timeout)]

    def wait_leader(self, timeout: float = 30.0, exclude: int | None = None) -> tuple[int, dict]:
        """Index and status of a serving leader (its term's first entry committed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, s in enumerate(self.statuses(0.5)):
                if s and i != exclude and s.get("state") == "leader" and s.get("serving"):
                    return i, s
            time.sleep(0.05)
        raise TimeoutError(f"no serving leader within {timeout:g} s; logs in {self.dir}")

    def terms(self) -> list[int | None]:
        return [s.get("term") if s else None for s in self.statuses()]

    def role_changes(self) -> dict[str, list[tuple[str, int]]]:
        """Each master's logged role changes (role, term), from its log file."""
        return {n.name: [(m.group(1), int(m.group(2))) for m in ROLE_LINE.finditer(n.log_text())]
                for n in self.nodes}

    def warnings(self) -> dict[str, list[str]]:
        out = {}
        for n in self.nodes:
            lines = [ln for ln in n.log_text().splitlines() if " WARNING " in ln or " ERROR " in ln]
            out[n.name] = lines
        return out


def elections(changes: dict[str, list[tuple[str, int]]]) -> dict[str, Any]:
    """Terms in which some master logged itself leader, terms seen (any role), and terms in which
    no master ever led (failed elections: split votes, or a candidate whose log was behind).
    The masters log "candidate" for "no leader known" (``RaftAdapter.view``)."""
    led = sorted({t for ch in changes.values() for role, t in ch if role == "leader"})
    terms = sorted({t for ch in changes.values() for _, t in ch if t > 0})
    return {"leader_terms": led, "terms_seen": terms, "terms_without_leader": [t for t in terms if t not in led]}


# ---- phases 1 and 2: our masters -----------------------------------------------------------


def echo_run(addresses: list[str], n: int, epoch: int, timeout: float, credentials: Any = None) -> dict:
    e = EchoBalancer(addresses, credit=ECHO_CREDIT, epoch=epoch, name=f"echo{epoch}", credentials=credentials)
    try:
        t0 = time.perf_counter()
        st = e.run(time.monotonic() + timeout, stop_after=n)
        dt = time.perf_counter() - t0
    finally:
        e.close()
    return {"acked": st.acked, "received": st.received, "resent": st.resent, "refused": st.refused,
            "attaches": st.attaches, "seconds": dt, "per_s": st.acked / dt if dt else 0.0}


def submit_jobs(c: Client, n: int) -> dict:
    """``n`` one-task jobs, submitted with ``submit_many`` (window ``SUBMIT_WINDOW``)."""
    jobs = [("range", {"count": 1})] * n
    t0 = time.perf_counter()
    refs = c.submit_many(jobs, window=SUBMIT_WINDOW)
    dt = time.perf_counter() - t0
    assert len({r.job for r in refs}) == n, "submit_many returned duplicate jobs"
    return {"count": n, "seconds": dt, "per_s": n / dt}


def drain_jobs(ms: Masters, n: int) -> None:
    """Complete the ``n`` one-task jobs just submitted (untimed)."""
    r = echo_run(ms.addresses, n, ECHO_EPOCH, 60, ms.balancer_key)
    if r["acked"] < n:
        raise RuntimeError(f"drain: only {r['acked']} of {n} one-task jobs completed")


def complete_tasks(ms: Masters, c: Client, m: int) -> dict:
    """One ``range`` job of ``m`` tasks, every one completed by the echo balancer: completions/s."""
    ref = c.submit_job("range", {"count": m, "keep_results": False})
    r = echo_run(ms.addresses, m, ECHO_EPOCH, 60, ms.balancer_key)
    view = c.job(ref.job).value
    r.update(count=m, job_state=view["state"], job_done=view["done"])
    if r["acked"] < m or view["state"] != "done" or view["done"] != m:
        raise RuntimeError(f"completions: acked {r['acked']} of {m} (echo: {r}); job {view}")
    r["per_s"] = m / r["seconds"]
    return r


def leader_jobs(ms: Masters) -> int | None:
    """How many jobs the leader's ledger holds."""
    st = next((x for x in ms.statuses() if x and x.get("state") == "leader"), None)
    return st["ledger"].get("jobs") if st else None


def bench_masters(root: Path, reps: int, n_submits: int, n_tasks: int) -> dict:
    out: dict[str, Any] = {"submits": [], "completions": [], "checks": []}
    cpu0 = machine.cpu_times()
    with Masters(root, "throughput") as ms:
        leader, status = ms.wait_leader()
        log(f"  masters up; leader m{leader + 1} (term {status['term']})")
        out["terms_start"] = ms.terms()
        with Client(ms.addresses, timeout=120) as c:
            log("  warm-up (untimed)")
            warm_n = max(200, n_submits // 10)
            submit_jobs(c, warm_n)
            drain_jobs(ms, warm_n)
            complete_tasks(ms, c, max(1000, n_tasks // 10))
            for rep in range(reps):
                jobs_before = leader_jobs(ms)
                s = submit_jobs(c, n_submits)
                drain_jobs(ms, n_submits)
                s["jobs_in_ledger_before"] = jobs_before
                jobs_before = leader_jobs(ms)
                k = complete_tasks(ms, c, n_tasks)
                k["jobs_in_ledger_before"] = jobs_before
                out["submits"].append(s)
                out["completions"].append(k)
                log(f"  rep {rep + 1}/{reps}: {s['per_s']:,.0f} submits/s, {k['per_s']:,.0f} completions/s"
                    f" (resent {k['resent']}, attaches {k['attaches']}; {jobs_before} jobs in the ledger)")
        out["terms_end"] = ms.terms()
        statuses = ms.statuses()
        leader_status = next((s for s in statuses if s and s.get("state") == "leader"), None)
        if leader_status:
            core = leader_status.get("core") or {}
            out["leader_core_counters"] = core
            if core.get("proposals"):
                out["commands_per_entry"] = core.get("commands_proposed", 0) / core["proposals"]
            out["leader_ledger"] = leader_status.get("ledger")
            out["log_size"] = leader_status.get("log_size")
        out["elections"] = elections(ms.role_changes())
        out["warnings"] = {k: v[-20:] for k, v in ms.warnings().items()}
    out["cpu_shares"] = machine.cpu_shares(cpu0, machine.cpu_times())
    out["submits_per_s"] = median([r["per_s"] for r in out["submits"]])
    out["completions_per_s"] = median([r["per_s"] for r in out["completions"]])
    t0, t1 = out["terms_start"], out["terms_end"]
    out["spurious_elections"] = (max(x for x in t1 if x is not None) - max(x for x in t0 if x is not None)
                                 if any(t0) and any(t1) else None)
    return out


# ---- phase 5 (--finished-jobs N): the leader's work as finished jobs pile up -------------------


def process_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used, from /proc; None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_finished(root: Path, reps: int, n_tasks: int, n_finished: int) -> dict:
    """Completions/s and the leader's CPU per completed task on a fresh cluster, first with
    (almost) no jobs in the ledger, then with ``n_finished`` finished one-task jobs in it
    (jobs stay for the retention period); the dispatch view was O(all jobs) before issue 23."""
    out: dict[str, Any] = {"finished_jobs": n_finished, "phases": {}}
    with Masters(root, "finished") as ms, Client(ms.addresses, timeout=120) as c:
        ms.wait_leader()
        complete_tasks(ms, c, max(1000, n_tasks // 10))  # warm-up (untimed)
        for label in ("empty", "full"):
            if label == "full":
                t0 = time.perf_counter()
                for left in range(n_finished, 0, -5000):
                    submit_jobs(c, min(5000, left))
                    drain_jobs(ms, min(5000, left))
                out["fill_s"] = time.perf_counter() - t0
            runs = []
            for _ in range(reps):
                leader, _ = ms.wait_leader()
                pid, jobs_before = ms.nodes[leader].pid, leader_jobs(ms)
                cpu0 = process_cpu(pid)
                k = complete_tasks(ms, c, n_tasks)
                cpu1 = process_cpu(pid)
                k["jobs_in_ledger_before"] = jobs_before
                k["leader_cpu_us_per_task"] = None if cpu0 is None or cpu1 is None else 1e6 * (cpu1 - cpu0) / n_tasks
                runs.append(k)
            out["phases"][label] = {
                "reps": runs, "jobs_in_ledger": runs[0]["jobs_in_ledger_before"],
                "completions_per_s": median([r["per_s"] for r in runs]),
                "leader_cpu_us_per_task": median([r["leader_cpu_us_per_task"] for r in runs
                                                  if r["leader_cpu_us_per_task"] is not None]),
            }
            p = out["phases"][label]
            each = ", ".join(f"{r['per_s']:,.0f}" for r in runs)
            log(f"  {p['jobs_in_ledger']:,} jobs in the ledger: {p['completions_per_s']:,.0f} completions/s "
                f"({each}), leader CPU {_fmt_us(p['leader_cpu_us_per_task'])} µs per task")
    return out


def _fmt_us(x: float | None) -> str:
    return "?" if x is None else f"{x:.0f}"


# ---- phase 3: the baseline -----------------------------------------------------------------


def bench_counter(root: Path, reps: int, count: int, durable_count: int) -> dict:
    out: dict[str, Any] = {}
    for mode in COUNTER_MODES:
        n = durable_count if mode == "durable" else count
        if n <= 0:
            continue
        log(f"  {MODE_LABEL[mode]}: {reps} x {n:,} increments, window {COUNTER_WINDOW}")
        cpu0 = machine.cpu_times()
        run = counter_cluster(mode, count=n, reps=reps, window=COUNTER_WINDOW, warmup=min(2000, n),
                              keep_dir=root)
        entry: dict[str, Any] = {"mode": mode, "label": MODE_LABEL[mode], "count": n, "window": COUNTER_WINDOW,
                                 "cpu_shares": machine.cpu_shares(cpu0, machine.cpu_times())}
        if run.error or not run.result:
            entry["error"] = run.error
            entry["logs"] = run.logs
            log(f"    FAILED: {run.error}")
        else:
            r = run.result
            entry.update(reps=r["reps"], per_s=median([x["per_s"] for x in r["reps"]]),
                         value_matches=r["value_matches"], term_start=r["term_start"], term_end=r["term_end"],
                         still_leader=r["still_leader"], failed=sum(x["failed"] for x in r["reps"]))
            each = ", ".join(f"{x['per_s']:,.0f}" for x in r["reps"])
            log(f"    {entry['per_s']:,.0f} increments/s ({each})")
        out[mode] = entry
    return out


# ---- phase 4: failover ---------------------------------------------------------------------


class Submitter(threading.Thread):
    """Submits one-task jobs back to back; records (ack time, index of the master that acked)."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(daemon=True, name="submitter")
        self.addresses = addresses
        self.stop = threading.Event()
        self.acks: list[tuple[float, int]] = []
        self.errors: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        with Client(self.addresses, timeout=30, attempt_timeout=ATTEMPT_TIMEOUT) as c:
            while not self.stop.is_set():
                try:
                    c.submit_job("range", {"count": 1})
                    with self.lock:
                        self.acks.append((time.monotonic(), c.leader))
                except ClusterError as exc:
                    with self.lock:
                        self.errors.append((time.monotonic(), str(exc)[:300]))

    def first_ack(self, after: float, predicate: Callable[[int], bool]) -> tuple[float, int] | None:
        with self.lock:  # acks are in time order: scan from the first one after `after`
            for t, who in self.acks[self._index_after(after):]:
                if predicate(who):
                    return t, who
        return None

    def _index_after(self, after: float) -> int:
        lo, hi = 0, len(self.acks)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.acks[mid][0] <= after:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def count_after(self, after: float) -> int:
        with self.lock:
            return len(self.acks) - self._index_after(after)


def bench_failover(root: Path, rounds: int) -> dict:
    out: dict[str, Any] = {"rounds": []}
    cpu0 = machine.cpu_times()
    with Masters(root, "failover") as ms:
        leader, status = ms.wait_leader()
        sub = Submitter(ms.addresses)
        sub.start()
        try:
            for rnd in range(rounds):
                leader, status = ms.wait_leader()
                # steady state: the submitter's acks come from this leader
                t_steady = time.monotonic()
                deadline = t_steady + 30
                while sub.first_ack(t_steady, lambda who: who == leader) is None or sub.count_after(t_steady) < 20:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the submitter is not getting acks from the leader")
                    time.sleep(0.02)
                term_before = status["term"]
                t_kill = time.monotonic()
                ms.nodes[leader].kill()
                got = None
                deadline = t_kill + 30
                while got is None and time.monotonic() < deadline:
                    got = sub.first_ack(t_kill, lambda who: who != leader)
                    time.sleep(0.005)
                if got is None:
                    raise TimeoutError(f"round {rnd + 1}: no submit acknowledged by another master within 30 s")
                t_ack, new_index = got
                new_leader, new_status = ms.wait_leader(exclude=leader)
                rec = {
                    "round": rnd + 1,
                    "killed": ms.nodes[leader].name,
                    "new_leader": ms.nodes[new_index].name,
                    "new_leader_status": ms.nodes[new_leader].name,
                    "term_before": term_before,
                    "term_after": new_status["term"],
                    "terms_used": new_status["term"] - term_before,
                    "failover_s": t_ack - t_kill,
                    "elected_after_kill_s": (new_status["leader_since"] - t_kill
                                             if new_status.get("leader_since") is not None else None),
                    "first_commit_s": new_status.get("first_commit_s"),
                    "acks_from_killed_after_kill": sum(1 for t, w in list(sub.acks) if t > t_kill and w == leader),
                }
                # restart the killed master; wait until it follows and has caught up
                t_restart = time.monotonic()
                ms.nodes[leader].start()
                ms.nodes[leader].wait_ready(30)
                deadline = time.monotonic() + 60
                while True:
                    st = ms.statuses(0.5)
                    me, ld = st[leader], st[new_leader]
                    if (me and ld and me.get("state") == "follower" and me.get("leader")
                            and me.get("commit_index", 0) >= ld.get("commit_index", 0) - 50):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"round {rnd + 1}: {ms.nodes[leader].name} did not rejoin as a follower")
                    time.sleep(0.1)
                rec["rejoin_s"] = time.monotonic() - t_restart
                rec["term_after_rejoin"] = max((s.get("term", 0) for s in st if s), default=None)
                out["rounds"].append(rec)
                log(f"  round {rnd + 1}/{rounds}: killed {rec['killed']} (term {term_before}); "
                    f"{rec['new_leader']} acked after {rec['failover_s']:.3f} s (elected after "
                    f"{_fmt(rec['elected_after_kill_s'])} s, first commit {_fmt(rec['first_commit_s'])} s, "
                    f"term {rec['term_after']}); rejoined in {rec['rejoin_s']:.1f} s")
                time.sleep(0.5)
        finally:
            sub.stop.set()
            sub.join(40)
        out["submits_total"] = len(sub.acks)
        out["client_errors"] = sub.errors[-10:]
        out["elections"] = elections(ms.role_changes())
        out["warnings"] = {k: v[-30:] for k, v in ms.warnings().items()}
    out["cpu_shares"] = machine.cpu_shares(cpu0, machine.cpu_times())
    fo = [r["failover_s"] for r in out["rounds"]]
    out["failover_median_s"] = median(fo)
    out["failover_max_s"] = max(fo) if fo else None
    el = [r["elected_after_kill_s"] for r in out["rounds"] if r["elected_after_kill_s"] is not None]
    out["elected_median_s"] = median(el)
    fc = [r["first_commit_s"] for r in out["rounds"] if r["first_commit_s"] is not None]
    out["first_commit_median_s"] = median(fc)
    out["first_commit_max_s"] = max(fc) if fc else None
    # terms beyond one per kill (term_after - term_before - 1, plus any bump on rejoin)
    out["extra_terms"] = sum((r["term_after"] - r["term_before"] - 1) + (r["term_after_rejoin"] - r["term_after"])
                             for r in out["rounds"])
    return out


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.3f}"


# ---- report --------------------------------------------------------------------------------


def ratios(res: dict) -> list[dict]:
    out = []
    ours = res["masters"]
    for mode, entry in res["counter"].items():
        base = entry.get("per_s")
        if not base:
            continue
        for what in ("submits_per_s", "completions_per_s"):
            if ours.get(what):
                out.append({"ours": what, "baseline": mode, "value": ours[what] / base})
    return out


def print_report(res: dict) -> None:
    m = res["machine"]
    cfg = res["config"]
    ours, counter, fo = res["masters"], res["counter"], res["failover"]
    head = (f"Ledger benchmark {m['date']}  {m['nproc']} cpus ({m['cpu']}), Python {m['python']}, "
            f"pysyncobj {m['pysyncobj']}, reps {cfg['reps']}{' (quick)' if cfg['quick'] else ''}")
    rows = [
        ("our masters: submits committed", f"{cfg['submits']:,} x range(1), window {SUBMIT_WINDOW}",
         ours["submits_per_s"], [r["per_s"] for r in ours["submits"]]),
        ("our masters: task completions committed", f"range({cfg['tasks']:,}), echo credit {ECHO_CREDIT}",
         ours["completions_per_s"], [r["per_s"] for r in ours["completions"]]),
    ]
    for mode, e in counter.items():
        rows.append((e["label"], f"{e['count']:,} incr, window {e['window']}", e.get("per_s"),
                     [r["per_s"] for r in e.get("reps", [])]))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    cols = ("what", "load", "median /s", "reps /s")
    cells = [[a, b, "FAILED" if c is None else f"{c:,.0f}", ", ".join(f"{x:,.0f}" for x in d)] for a, b, c, d in rows]
    if Console is not None:
        con = Console(width=max(140, Console().width))
        out = con.print
        out(head)
        t = Table(title="Commits per second on 3 local processes (median of reps)")
        for c in cols:
            t.add_column(c, justify="left" if c in ("what", "load") else "right")
        for i, r in enumerate(cells):
            if i == 2:
                t.add_section()
            t.add_row(*r)
        out(t)
    else:
        out = print
        out(head)
        w = [max(len(x[i]) for x in [list(cols)] + cells) for i in range(4)]
        for r in [list(cols)] + cells:
            out("  ".join(x.ljust(w[i]) if i < 2 else x.rjust(w[i]) for i, x in enumerate(r)))
    out("Ratios to pysyncobj's raw counter (ours / counter):")
    for r in res["ratios"]:
        out(f"  {r['ours']:18s} / {r['baseline']:8s} {r['value']:6.2f}x")
    out(f"Failover ({len(fo['rounds'])} leader SIGKILLs, client attempt_timeout {ATTEMPT_TIMEOUT} s): "
        f"kill -> first submit acked by the new leader: median {_fmt(fo['failover_median_s'])} s, "
        f"max {_fmt(fo['failover_max_s'])} s")
    out(f"  kill -> new leader elected: median {_fmt(fo['elected_median_s'])} s; "
        f"election -> first commit (first_commit_s): median {_fmt(fo['first_commit_median_s'])} s, "
        f"max {_fmt(fo['first_commit_max_s'])} s")
    out("  per round: " + "; ".join(f"{r['failover_s']:.3f}" for r in fo["rounds"]) + " s; terms per failover: "
        + ", ".join(str(r["terms_used"]) for r in fo["rounds"])
        + f"; terms in which no master led: {fo['elections']['terms_without_leader']}")
    if ours.get("commands_per_entry"):
        out(f"Throughput phase: {ours['commands_per_entry']:.0f} commands per Raft entry on average (the core's batching; "
            "a completion is two commands, AssignTasks + CompleteTask)")
    counter_terms = {m: e["term_end"] - e["term_start"] for m, e in counter.items() if "term_end" in e}
    out(f"Term changes under load (no kill): our masters {ours.get('spurious_elections')}, counter {counter_terms}; "
        f"failover phase: {fo.get('extra_terms')} term(s) beyond one per kill")
    for name, part in (("throughput", ours), ("failover", fo)):
        sh = part.get("cpu_shares")
        if sh:
            out(f"CPU during {name}: busy {sh['busy']:.0%}, idle {sh['idle']:.0%}, steal {sh['steal']:.0%}")
    out(f"total {res['elapsed_s']:.1f} s; results in {res['json_path']}")


def print_finished(res: dict) -> None:
    """Phase 5: the same drain with no finished jobs in the ledger and with N of them."""
    print(f"With finished jobs in the ledger (phase 5, median of {res['config']['reps']} reps):")
    for r in res["finished_inproc"]["runs"]:
        m = r["median"]
        print(f"  in process, {r['finished_jobs']:>6,} finished jobs, in-flight as {r['mode']:5s}: "
              f"{m['tasks_per_s']:8,.0f} tasks/s; dispatch {m['dispatch_per_s']:8,.0f}/s "
              f"(ready_tasks {m['ready_us_per_call']:.1f} µs a call); completions {m['completions_per_s']:8,.0f}/s")
    for r in res["finished_core"]["runs"]:
        print(f"  the leader's core in process (Raft faked), {r['finished_jobs']:>6,} finished jobs: "
              f"{r['cpu_us_per_task']:.1f} µs of CPU per task")
    for label, p in res["finished"]["phases"].items():
        print(f"  3 masters, {p['jobs_in_ledger']:>6,} jobs in the ledger: {p['completions_per_s']:,.0f} completions/s, "
              f"leader CPU {_fmt_us(p['leader_cpu_us_per_task'])} µs per task")
    print(f"total {res['elapsed_s']:.1f} s; results in {res['json_path']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and smaller reps, 3 failovers (< 60 s)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "ledger.json"), help="where to write the results")
    ap.add_argument("--reps", type=int, default=None, help="repeats per measurement (default 5, --quick 2)")
    ap.add_argument("--submits", type=int, default=None, help="jobs per submit rep (default 5,000, --quick 2,000)")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per completion rep (default 30,000, --quick 10,000)")
    ap.add_argument("--increments", type=int, default=None, help="counter increments per rep (default 20,000, --quick 5,000)")
    ap.add_argument("--durable-increments", type=int, default=None,
                    help="increments per rep of the durable counter (default 2,000, --quick 500; 0: skip)")
    ap.add_argument("--failovers", type=int, default=None, help="leader kills (default 5, --quick 3)")
    ap.add_argument("--finished-jobs", type=int, default=0, metavar="N",
                    help="also measure with N finished jobs in the ledger against none (phase 5: in process, "
                         "then on the masters); 0 (default): skip")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"which phases to run, of {','.join(PHASES)} (default: all; 'finished' needs --finished-jobs)")
    args = ap.parse_args(argv)
    phases = set(args.phases.split(","))
    if phases - set(PHASES):
        ap.error(f"unknown phases {sorted(phases - set(PHASES))}; the phases are {','.join(PHASES)}")
    q = args.quick
    reps = args.reps or (2 if q else 5)
    n_submits = args.submits or (2_000 if q else 5_000)
    n_tasks = args.tasks or (10_000 if q else 30_000)
    n_incr = args.increments or (5_000 if q else 20_000)
    n_durable = args.durable_increments if args.durable_increments is not None else (500 if q else 2_000)
    rounds = args.failovers or (3 if q else 5)

    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine.machine_info(pysyncobj=_version("pysyncobj"), pyzmq=zmq.__version__)}
    res["config"] = {
        "quick": q, "reps": reps, "submits": n_submits, "tasks": n_tasks, "increments": n_incr,
        "durable_increments": n_durable, "failovers": rounds, "masters": 3, "submit_window": SUBMIT_WINDOW,
        "echo_credit": ECHO_CREDIT, "counter_window": COUNTER_WINDOW, "attempt_timeout": ATTEMPT_TIMEOUT,
        "raft_timings": DEFAULT_TIMINGS,
        "submit_job": {"kind": "range", "spec": {"count": 1}},
        "completion_job": {"kind": "range", "spec": {"count": n_tasks, "keep_results": False}},
    }
    cpu0 = machine.cpu_times()
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        root = Path(tmp)
        if "masters" in phases:
            log(f"1+2. our masters: {reps} reps of {n_submits:,} submits and {n_tasks:,} task completions")
            res["masters"] = bench_masters(root, reps, n_submits, n_tasks)
        if "counter" in phases:
            log(f"3. pysyncobj's counter: {reps} reps per mode")
            res["counter"] = bench_counter(root, reps, n_incr, n_durable)
        if "failover" in phases:
            log(f"4. failover: {rounds} leader kills")
            res["failover"] = bench_failover(root, rounds)
        if "finished" in phases and args.finished_jobs:
            n = args.finished_jobs
            log(f"5. {n:,} finished jobs in the ledger against none: the leader's ledger work in process "
                f"(bench/leader_work.py), {reps} reps of {n_tasks:,} tasks")
            res["finished_inproc"] = leader_work.run([0, n], n_tasks, reps, leader_work.CHUNK, leader_work.INFLIGHT, log)
            res["finished_core"] = leader_work.run_core([0, n], n_tasks, reps, leader_work.CORE_CHUNK,
                                                        leader_work.CREDIT, log)
            log(f"   and on 3 masters: {reps} reps of {n_tasks:,} completions, before and after filling")
            res["finished"] = bench_finished(root, reps, n_tasks, n)
    if "masters" in res and "counter" in res:
        res["ratios"] = ratios(res)
    machine.finish(res, cpu0, started, args.json)
    if all(k in res for k in ("masters", "counter", "failover")):
        print_report(res)
    if "finished" in res:
        print_finished(res)
    ok = all(not e.get("error") for e in res.get("counter", {}).values())
    return 0 if ok else 1


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
