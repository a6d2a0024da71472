"""Where a task's time and messages go, for ``bench/dispatch.py`` (issue 23): samples of every
node's status counters and every process's CPU, the rates through each hop between two samples,
and a stream that keeps a cluster busy with batches of no-op tasks.

A sample (``sample``) is, per node, the counters its STATUS_REPLY carries (``messages_in`` /
``messages_out`` from the loop, the core's own under ``detail.core``, and a few detail fields:
a master's state, commit index and ledger counts, a balancer's state and dispatch counts) and
the CPU seconds its process tree has used (``/proc/<pid>/stat``: user + system, with the
children it has waited for, e.g. a command's process, and its live descendants, e.g. a worker's
slot processes). ``hop_rates`` turns two samples into tasks/s through each hop, Raft entries,
messages/s and CPU per task per node. The status counters are totals per node, not per link, so
messages are given per node (in and out), not per hop.

Counters that a node does not report (a renamed counter, a half-landed protocol change) come
out as None rather than as an error: the report says what it could not see.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BACKLOG_EVERY_S = 0.25  # how often a TaskStream notes its backlog


def proc_cpu_s(pid: int, children: bool = True) -> float | None:
    """User + system CPU seconds of ``pid``, with its waited-for children's unless ``children``
    is false (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15 if children else 13]) / CLOCK_TICKS  # utime stime cutime cstime


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` and of its live descendants (a worker's slot processes)."""
    from cluster.pids import descendants

    own = proc_cpu_s(pid)
    if own is None:
        return None
    return own + sum(proc_cpu_s(k) or 0.0 for k in descendants(pid))


@dataclass
class Sample:
    """Every node's counters and every process's CPU at one moment (``at``: time.monotonic)."""

    at: float
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> role, state, counters
    cpu: dict[str, float | None] = field(default_factory=dict)  # process name -> CPU seconds


def _node_view(reply: Any) -> dict[str, Any]:
    d = reply.detail or {}
    view = {"role": reply.role, "pid": reply.pid, "state": d.get("state"), "counters": dict(reply.counters),
            "core": dict(d.get("core") or {})}
    if reply.role == "master":
        view["commit_index"] = d.get("commit_index")
        view["ledger"] = dict(d.get("ledger") or {})
        view["queued_writes"] = d.get("queued_writes")
        view["proposals_in_flight"] = d.get("proposals_in_flight")
    elif reply.role == "balancer":
        view["dispatch"] = {k: v for k, v in (d.get("dispatch") or {}).items() if isinstance(v, int)}
        view["registry"] = dict(d.get("registry") or {})
    return view


def sample(nodes: list, pids: dict[str, int]) -> Sample:
    """Query every node's status (in parallel) and read the CPU of every process in ``pids``
    (name -> pid: the nodes' and any others, e.g. simulated workers), each with its descendants;
    this process (whose descendants are all the others) alone."""
    from cluster.node.status import query_status

    at = time.monotonic()
    cpu = {name: proc_cpu_s(pid, children=False) if pid == os.getpid() else tree_cpu_s(pid)
           for name, pid in pids.items()}
    out = Sample(at, cpu=cpu)
    for node, result in zip(nodes, query_status([n.address for n in nodes], timeout=5.0)):
        if result.reply is not None:
            out.nodes[node.name] = _node_view(result.reply)
    return out


def _pick(s: Sample, role: str, state: str) -> str | None:
    return next((n for n, v in s.nodes.items() if v["role"] == role and v["state"] == state), None)


def _delta(a: Sample, b: Sample, node: str | None, *path: str) -> int | None:
    """``b`` minus ``a`` of the counter at ``path`` in ``node``'s view: None where ``b`` lacks it or
    it went down (restarted); ``a``'s taken as 0 where it lacks it (a core counts from the first
    time, so a counter is absent until then)."""
    if node is None or node not in a.nodes or node not in b.nodes:
        return None
    va, vb = a.nodes[node], b.nodes[node]
    for key in path:
        va = va.get(key) if isinstance(va, dict) else None
        vb = vb.get(key) if isinstance(vb, dict) else None
    if not isinstance(vb, int):
        return None
    d = vb - (va if isinstance(va, int) else 0)
    return d if d >= 0 else None  # the counter started again (a balancer that went passive forgets its dispatch)


def _sum(values: list[int | None]) -> int | None:
    seen = [v for v in values if v is not None]
    return sum(seen) if seen else None


def hop_rates(a: Sample, b: Sample, client_tasks: int | None = None) -> dict[str, Any]:
    """Rates between samples ``a`` and ``b``: tasks/s through each hop (``hops``: name, tasks,
    per_s), the leader's Raft entries and commands per entry, messages/s in and out per node and
    per committed task, CPU per node (cores and µs per committed task). ``client_tasks``: tasks
    whose submit the client saw committed in between (the first hop, counted by the client).

    A master counts assignments and results only while it leads, so those are summed over the
    masters: a leader change in between (``leader_changed``) loses no count."""
    seconds = b.at - a.at
    leader, active = _pick(b, "master", "leader"), _pick(b, "balancer", "active")
    masters = [n for n, v in b.nodes.items() if v["role"] == "master"]
    workers = [n for n, v in b.nodes.items() if v["role"] == "worker"]

    def masters_sum(*path: str) -> int | None:
        return _sum([_delta(a, b, m, *path) for m in masters])

    committed = masters_sum("core", "results_recorded")
    codes = {k for m in masters for k in b.nodes[m]["core"] if k.startswith("results_")}
    hops = [
        ("client -> master: tasks submitted, committed", client_tasks),
        ("master -> balancer: tasks assigned (leader)", masters_sum("core", "tasks_assigned")),
        ("balancer: tasks received from the master", _delta(a, b, active, "dispatch", "added")),
        ("balancer -> workers: tasks placed", _delta(a, b, active, "core", "placed")),
        ("workers: tasks started", _sum([_delta(a, b, w, "core", "tasks_started") for w in workers])),
        ("workers -> balancer: results (worker: tasks done)", _sum([_delta(a, b, w, "core", "tasks_done") for w in workers])),
        ("balancer -> master: results forwarded", _delta(a, b, active, "core", "results_forwarded")),
        ("master: results decided (any code)", _sum([masters_sum("core", k) for k in sorted(codes)])),
        ("master: results committed (results_recorded)", committed),
        ("ledger: tasks done (jobs only)", _delta(a, b, leader, "ledger", "tasks_done")),
    ]
    entries = _delta(a, b, leader, "commit_index")
    proposals = masters_sum("core", "proposals")
    commands = masters_sum("core", "commands_proposed")
    per_task = (lambda x: None if x is None or not committed else x / committed)
    messages = {}
    for name in b.nodes:
        m_in, m_out = _delta(a, b, name, "counters", "messages_in"), _delta(a, b, name, "counters", "messages_out")
        messages[name] = {"in_per_s": _rate(m_in, seconds), "out_per_s": _rate(m_out, seconds),
                          "in_per_task": _round(per_task(m_in), 3), "out_per_task": _round(per_task(m_out), 3)}
        for way in ("in", "out"):  # MESSAGE_BATCHes (issue 23): each counts once in messages_in/out
            batches, items = (_delta(a, b, name, "counters", f"{k}_{way}") for k in ("batches", "batched"))
            total = m_in if way == "in" else m_out
            if batches is not None and items is not None and total:
                messages[name][f"batches_{way}"] = batches
                messages[name][f"items_per_message_{way}"] = round((total - batches + items) / total, 2)
    cpu = {}
    for name, c1 in b.cpu.items():
        c0 = a.cpu.get(name)
        if c0 is None or c1 is None:
            cpu[name] = None
            continue
        used = c1 - c0
        cpu[name] = {"cpu_s": round(used, 3), "cores": round(used / seconds, 3),
                     "us_per_task": _round(per_task(used * 1e6), 1)}
    return {"seconds": round(seconds, 3), "leader": leader, "active_balancer": active,
            "leader_changed": _pick(a, "master", "leader") != leader,
            "hops": [{"hop": h, "tasks": n, "per_s": _rate(n, seconds)} for h, n in hops],
            "committed": committed, "committed_per_s": _rate(committed, seconds),
            "raft": {"entries": entries, "entries_per_s": _rate(entries, seconds), "proposals": proposals,
                     "commands_proposed": commands,
                     "commands_per_proposal": _round(commands / proposals, 2) if commands and proposals else None,
                     "tasks_per_entry": _round(committed / entries, 2) if committed and entries else None},
            "messages": messages, "cpu": cpu}


def _rate(n: int | None, seconds: float) -> float | None:
    return None if n is None or seconds <= 0 else round(n / seconds, 1)


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


# ---- keeping a cluster busy -------------------------------------------------------------------


class TaskStream:
    """Batches of no-op tasks through ``client.map``, ``depth`` batches in flight: ``pump`` submits
    a batch whenever fewer are in flight and otherwise waits on the oldest, so the cluster always
    has work queued (the offered load stays above what it commits). Every batch's results are
    checked (unless ``check`` is false: simulated workers return no value, only that the task
    ended). ``submits`` records ``(time committed, tasks)`` of each submit; ``backlog`` samples
    ``(time, tasks submitted and not yet ended)``."""

    def __init__(self, client: Any, fn: Callable[[int], int], batch: int, depth: int, check: bool = True) -> None:
        self.client, self.fn, self.batch, self.depth, self.check = client, fn, batch, depth, check
        self.inflight: deque[list] = deque()
        self.submits: list[tuple[float, int]] = []
        self.backlog: list[tuple[float, int]] = []
        self.submitted = 0
        self.ended = 0
        self._lock = threading.Lock()

    def _ended(self, _future: Any) -> None:
        with self._lock:
            self.ended += 1

    def pump(self, until: float) -> None:
        """Keep the stream going until ``time.monotonic()`` passes ``until``."""
        next_look = 0.0
        while (now := time.monotonic()) < until:
            if now >= next_look:
                self.backlog.append((now, self.submitted - self.ended))
                next_look = now + BACKLOG_EVERY_S
            if len(self.inflight) < self.depth:
                futures = self.client.map(self.fn, range(self.batch))
                self.submits.append((time.monotonic(), self.batch))
                self.submitted += self.batch
                for f in futures:
                    f.add_done_callback(self._ended)
                self.inflight.append(futures)
                continue
            done, _ = concurrent.futures.wait(self.inflight[0], timeout=max(0.01, min(BACKLOG_EVERY_S, until - now)))
            if len(done) == len(self.inflight[0]):
                self._check(self.inflight.popleft())

    def drain(self, timeout: float = 300.0) -> None:
        """Wait for every batch in flight (results checked), ``timeout`` seconds in all; raise
        TimeoutError saying how many tasks had not ended by then."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            futures = self.inflight[0]
            _, waiting = concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
            if waiting:
                left = sum(1 for batch in self.inflight for f in batch if not f.done())
                raise TimeoutError(f"{left:,} tasks of the stream had not ended {timeout:g} s after it stopped")
            self._check(self.inflight.popleft())

    def _check(self, futures: list) -> None:
        values = [f.result(timeout=60) for f in futures]  # raises what a failed task raised
        if self.check and sum(values) != len(futures) * (len(futures) - 1) // 2:
            raise AssertionError("a batch of the stream came back with wrong results")

    def submitted_between(self, t0: float, t1: float) -> int:
        return sum(n for t, n in self.submits if t0 <= t < t1)

    def backlog_between(self, t0: float, t1: float) -> list[int]:
        return [n for t, n in self.backlog if t0 <= t <= t1]


# ---- what the nodes' logs say -------------------------------------------------------------------

# Lines worth counting in the nodes' logs after a part: a leader that stepped down, a follower
# that could not read a Raft entry sent in chunks (pysyncobj's transmission of an entry over its
# 64 KB batch size), errors of any kind. Counts only: the logs stay in the part's directory.
LOG_MARKS = {"leader_stepped_down": "no longer the leader", "raft_entry_truncated": "pickle data was truncated",
             "tracebacks": "Traceback (most recent call last)", "errors": " ERROR ", "critical": " CRITICAL "}


def log_findings(directory: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Per node log (``*.log`` in ``directory``), how often each of ``LOG_MARKS`` appears (nodes
    with none left out)."""
    from pathlib import Path

    out = {}
    for path in sorted(Path(directory).glob("*.log")):
        text = path.read_text(errors="replace")
        found = {mark: text.count(needle) for mark, needle in LOG_MARKS.items() if needle in text}
        if found:
            out[path.stem] = found
    return out
