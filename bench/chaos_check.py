"""The chaos soak's checker and its faults table.

Theory of operation
-------------------
The checker runs once the last fault is healed and the rack serves as a whole again, and reads
only what a user can read: the ledger's job, task and unit views (through the leader: a stale
read is asked again), and the rack's status. It asserts what issue 22 asks of the soak:

- every acknowledged submit is in the ledger: its jobs exist and are done; every unit key of an
  acknowledged batch is in the first spec of the chain;
- every task and every unit is recorded done exactly once: one attempt with outcome ``done``
  (a task of a job, a tile of an alignment, a unit of each of the three specs), and the chain fed
  each unit on exactly once (the three specs hold the same keys);
- every result is right: each value the clients saw is the digest its arguments call for, each
  alignment's answer is the oracle's, no unit failed a check of its data ("WRONG");
- every node is healthy: none crashed during the soak, and the rack serves as a whole.

What each fault cost: its *stall* is the time from its start to the next result any client saw;
its *lost attempts* are the attempts (of tasks and units) that ended lost or failed while it was
held or settling (by the ledger's wall clock; an attempt in the window of two faults counts for
the later one).
"""

from __future__ import annotations

import statistics
import time
from bisect import bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.node.masterlink import Answer
from proto.messages import Work as WorkMessage

from bench.chaos_work import SPECS, Workload


@dataclass
class Verdict:
    """What the checker found: counts, and a line for each violation."""

    operations: int = 0  # acknowledged submits
    not_acked: int = 0  # submits that raised (not a violation: never acknowledged)
    tasks: int = 0
    units: int = 0
    results: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    unhealthy: list[str] = field(default_factory=list)
    refused_duplicates: int = 0  # duplicate completions the ledger refused (fencing at work, not a fault)
    ended: list[tuple[float, str, str]] = field(default_factory=list)  # (wall end, outcome, what) not done

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong or self.unhealthy)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "operations": self.operations, "not_acknowledged": self.not_acked,
                "tasks": self.tasks, "units": self.units, "results": self.results, "lost": self.lost,
                "duplicated": self.duplicated, "wrong": self.wrong, "unhealthy": self.unhealthy,
                "refused_duplicates": self.refused_duplicates, "lost_or_failed_attempts": len(self.ended),
                "attempts_not_done": [list(e) for e in sorted(self.ended)[:300]]}


class Fresh:
    """Reads from a leader with a quorum: a stale answer is asked again, for up to ``patience``
    seconds over all the reads; past that (the rack does not serve, which the verdict says) the
    answers are taken as they come, stale or not, so that a wedged rack is still checked in
    bounded time."""

    def __init__(self, patience: float = 60.0) -> None:
        self.left = patience
        self.stale_taken = 0

    def __call__(self, read: Callable[[], Answer]) -> Any:
        while True:
            started = time.monotonic()
            try:
                answer = read()
                if not answer.stale:
                    return answer.value
                if self.left <= 0:
                    self.stale_taken += 1
                    return answer.value
            except Exception:  # noqa: BLE001 - a timeout right after a heal: ask again while patient
                if self.left <= 0:
                    raise
            time.sleep(0.1)  # the rack was just healed: a leader is being found
            self.left -= time.monotonic() - started


def check_jobs(client: Any, work: Workload, v: Verdict, fresh: Fresh) -> None:
    """Every acknowledged job in the ledger and done; each of its tasks done exactly once; each
    value seen right."""
    for op in work.ops:
        if op.kind == "units":
            continue
        if not op.acked:
            v.not_acked += 1
            continue
        v.operations += 1
        for job in op.jobs:
            view = fresh(lambda: client.job(job))
            if view is None:
                v.lost.append(f"op {op.n} ({op.kind}): job {job} acknowledged but not in the ledger")
                continue
            if view["state"] != "done" or view["done"] != view["total"]:
                v.lost.append(f"op {op.n} ({op.kind}): job {job} is {view['state']}, {view['done']}/{view['total']} "
                              f"done: {view.get('error')} {view.get('failures', [])[:2]}")
            v.refused_duplicates += view.get("duplicates", 0)
            for t in range(view["total"]):
                check_task(fresh(lambda: client.task(job, t)), f"op {op.n} ({op.kind}) task {job}/{t}", v)
        for key, want in op.expected.items():
            got = op.seen.get(key)
            if key not in op.seen:
                v.lost.append(f"op {op.n} ({op.kind}): no result seen for {key[0]}/{key[1]}")
            elif got != want:
                v.wrong.append(f"op {op.n} ({op.kind}): {key[0]}/{key[1]} gave {got!r}, want {want!r}")
            else:
                v.results += 1


def check_task(view: dict[str, Any], what: str, v: Verdict) -> None:
    v.tasks += 1
    outcomes = Counter(a["outcome"] for a in view.get("attempts", []))
    for a in view.get("attempts", []):
        if a["outcome"] not in ("done", None):
            v.ended.append((a.get("ended_at") or 0.0, a["outcome"], f"{what} on {a.get('worker')}: {a.get('error')}"))
    if view.get("folded"):
        return  # a done task whose record was folded into the job's: done once, by the ledger's word
    if view["state"] != "done" or outcomes["done"] == 0:
        tried = [(a["worker"], a["outcome"], a["assigned_at"], a["ended_at"], a["error"]) for a in view.get("attempts", [])]
        v.lost.append(f"{what}: {view['state']}, attempts (worker, outcome, assigned, ended, error) {tried}")
    elif outcomes["done"] > 1:
        v.duplicated.append(f"{what}: {outcomes['done']} attempts recorded done")


def units_of(client: Any, spec: str, fresh: Fresh) -> list[dict[str, Any]]:
    """Every unit of ``spec``, with its attempts, read from the leader page by page."""
    out, after = [], -1
    while True:
        body = {"state": None, "limit": 1000, "min_attempts": 0, "after": after, "disputed": False}
        page = fresh(lambda: client.link.request(lambda rid: WorkMessage(rid, "units", spec, body), write=False))
        out += page["units"]
        if page["next"] is None:
            return out
        after = page["next"]


def check_units(client: Any, work: Workload, v: Verdict, fresh: Fresh) -> None:
    """Every acknowledged unit in the chain's first spec; every unit of each spec finished with
    exactly one done attempt; the chain fed on each key once; no check of the data failed."""
    keys: dict[str, list[str]] = {}
    for spec in SPECS:
        units = units_of(client, spec, fresh)
        keys[spec] = [u["key"] for u in units]
        for u in units:
            v.units += 1
            what = f"unit {spec}/{u['key']}"
            outcomes = Counter(a["outcome"] for a in u["attempts"])
            for a in u["attempts"]:
                if a["outcome"] not in ("done", None):
                    v.ended.append((a.get("end") or 0.0, a["outcome"], f"{what} on {a.get('worker')}: {a.get('reason')}"))
                if "WRONG" in (a.get("tail") or "") + (a.get("reason") or ""):
                    v.wrong.append(f"{what}: {a.get('reason')} {a.get('tail', '')[-200:]!r}")
            if u["state"] != "finished" or outcomes["done"] == 0:
                tried = [(a["worker"], a["outcome"], round(a["start"], 2), a["end"] and round(a["end"], 2))
                         for a in u["attempts"]]
                v.lost.append(f"{what} (unit {u['unit']}): {u['state']}, attempts (worker, outcome, start, end) {tried}")
            elif outcomes["done"] > 1:
                v.duplicated.append(f"{what}: {outcomes['done']} attempts recorded done")
    first = set(keys[SPECS[0]])
    for spec in SPECS:
        twice = [k for k, n in Counter(keys[spec]).items() if n > 1]
        v.duplicated += [f"unit {spec}/{k}: in the spec {Counter(keys[spec])[k]} times" for k in twice]
        if spec != SPECS[0] and set(keys[spec]) != first:
            v.lost += [f"unit {spec}/{k}: never fed on by the chain" for k in sorted(first - set(keys[spec]))]
    for op in work.ops:
        if op.kind != "units":
            continue
        if not op.acked:
            v.not_acked += 1
            continue
        v.operations += 1
        v.lost += [f"op {op.n} (units): key {k} acknowledged but not in {SPECS[0]}" for k in op.keys if k not in first]


def check(client: Any, work: Workload, unhealthy: str | None, crashes: list[dict[str, Any]]) -> Verdict:
    """The whole verdict (the rack healed and, unless ``unhealthy`` says why not, serving)."""
    v = Verdict()
    fresh = Fresh()
    try:
        check_jobs(client, work, v, fresh)
        check_units(client, work, v, fresh)
    except Exception as exc:  # noqa: BLE001 - no master answers: that is the verdict
        v.unhealthy.append(f"the ledger could not be read to the end: {exc!r}")
    if fresh.stale_taken:
        v.unhealthy.append(f"{fresh.stale_taken} reads of the check were stale: no leader with a quorum served")
    idle = [kind for kind in ("call", "command", "align") if not any(
        o.acked and o.kind == kind and o.seen for o in work.ops)] + ([] if v.units else ["units"])
    v.lost += [f"the workload's {kind} loop never got a result: nothing of it was tested" for kind in idle]
    if unhealthy:
        v.unhealthy.append(f"the rack does not serve as a whole after the last heal: {unhealthy}")
    v.unhealthy += [f"{c['host']} exited by itself (status {c['exit']}) {c['at']:.1f} s into the soak"
                    for c in crashes]
    return v


# ---- what each fault cost --------------------------------------------------------------------


def fault_table(played: list[Any], t0: float, completions: list[float],
                ended: list[tuple[float, str, str]]) -> list[dict]:
    """One row per fault label: how many, stall after each (median and max), attempts lost or
    failed in their windows. ``played``: ``chaos_faults.Played``; ``completions``: seconds since
    ``t0`` (the soak's start, monotonic) of every result seen, sorted."""
    windows = []  # (wall start, wall end, label) of every fault applied
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "skipped": 0, "stalls": [], "lost": 0,
                                                             "failed": 0})
    for p in played:
        row = rows[p.fault.label]
        row["kind"] = p.fault.kind
        if p.skipped:
            row["skipped"] += 1
            continue
        row["count"] += 1
        began = p.began - t0
        nxt = bisect_right(completions, began)
        row["stalls"].append(completions[nxt] - began if nxt < len(completions) else None)
        if p.began_wall is not None:
            end = (p.healed_wall or p.began_wall) + p.fault.settle
            windows.append((p.began_wall, end, p.fault.label))
    windows.sort()
    for at, outcome, _ in ended:
        holders = [w for w in windows if w[0] <= at <= w[1]]
        label = holders[-1][2] if holders else "(no fault held)"
        if label not in rows:
            rows[label]["kind"] = "-"
        rows[label]["lost" if outcome == "lost" else "failed"] += 1
    out = []
    for label, r in sorted(rows.items(), key=lambda kv: (-kv[1]["count"], kv[0])):
        stalls = [s for s in r["stalls"] if s is not None]
        out.append({"fault": label, "kind": r["kind"], "count": r["count"], "skipped": r["skipped"],
                    "stall_median_s": statistics.median(stalls) if stalls else None,
                    "stall_max_s": max(stalls) if stalls else None,
                    "no_result_after": sum(s is None for s in r["stalls"]),
                    "lost_attempts": r["lost"], "failed_attempts": r["failed"]})
    return out


def format_table(rows: list[dict]) -> str:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    head = f"{'fault':<34} {'count':>5} {'skip':>4} {'stall med s':>11} {'stall max s':>11} {'lost att':>8} {'failed att':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['fault']:<34} {r['count']:>5} {r['skipped']:>4} {s(r['stall_median_s']):>11} "
                     f"{s(r['stall_max_s']):>11} {r['lost_attempts']:>8} {r['failed_attempts']:>10}")
    return "\n".join(lines)
