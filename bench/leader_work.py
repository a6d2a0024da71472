#!/usr/bin/env python3
"""The leader's ledger work per task, in one process: dispatch (``views.ready_tasks``), the
``AssignTasks`` apply and the ``CompleteTask`` apply, with and without finished jobs in the ledger.

Run from the repository root::

    .venv/bin/python bench/leader_work.py                    # 0 and 10,000 finished jobs, 5 reps
    .venv/bin/python bench/leader_work.py --finished 0 20000 --tasks 20000 --reps 7

``bench/ledger.py --finished-jobs N`` runs it too. No Raft, no sockets: a ``Ledger`` driven the way
the leader drives it (``master.stream.BalancerStream``): the dispatcher asks for up to ``chunk``
ready tasks at a time, excluding those proposed and not yet committed (at most ``inflight``), each
proposal's ``AssignTasks`` is applied once the pipeline is full, and results come back ``chunk``
at a time as one ``Batch`` of ``CompleteTask``. One ``range`` job of ``tasks`` tasks
(``keep_results`` false) is drained per rep; before it, ``finished`` one-task jobs were submitted,
assigned and completed (they stay in the ledger, as they do for the retention period).

The in-flight set is the stream's plain ``set`` (``exclude``: what the stream passed before issue
23) or, where the code has it, ``master.ready.InFlight`` (the in-flight tasks taken off the ready
index, so a dispatch never skips them again). Timings are wall-clock (``perf_counter``) of this
one thread: medians of the reps; the machine is shared, so compare runs made side by side.

Then the same drain through the leader's whole core (``master.core.MasterCore``: the balancer
stream, batching, the task log, the watches), with Raft faked (every proposal commits at once)
and a simulated balancer that answers every WORKER_REQUEST and gives its credit back 64 at a
time: the core's CPU per task (``process_time``), the figure issue 23 drives down, without the
Raft library, the sockets and the codec.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.node.events import MessageReceived, Peer, Send, Started, StartTimer, TimerFired  # noqa: E402
from master import views  # noqa: E402
from master.commands import DONE, AssignTasks, Batch, CompleteTask, SubmitJob  # noqa: E402
from master.core import API, Committed, MasterCore, Propose, RaftView  # noqa: E402
from master.ledger import Ledger, spec_digest  # noqa: E402
from proto.messages import Attach, Credit, TaskResult, WorkerRequest  # noqa: E402

if (ROOT / "master" / "ready.py").exists():  # the index's in-flight set (issue 23); older code has none
    from master.ready import InFlight  # noqa: E402
else:  # (checked by path: an editable install could find another checkout's module)
    InFlight = None

FILL_BATCH = 1024  # commands per entry while filling the ledger with finished jobs
CHUNK = 16  # tasks per dispatch and per batch of results
INFLIGHT = 512  # tasks proposed and not yet committed, at most
CORE_CHUNK = 64  # results (and credit) a simulated balancer sends back at a time, in the core mode
CREDIT = 2048  # the simulated balancer's credit (bench/ledger.py's echo balancer's)


def _job_id(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Driver:
    """A ledger and the leader's fencing sequence (term 1), applying commands as the log would."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.sequence = 0
        self.jobs = 0
        self.now = 1.0

    def submit(self, spec: dict[str, Any]) -> bytes:
        self.jobs += 1
        job = _job_id(self.jobs)
        key = (1 << 100 | self.jobs).to_bytes(16, "big")
        self.ledger.apply(SubmitJob(job, key, spec_digest("range", spec), "range", spec, "client", self.now))
        return job

    def assign(self, tasks: list[tuple[bytes, int]], first: int) -> list[tuple[bytes, int, tuple[int, int]]]:
        return self.ledger.apply(AssignTasks(1, first, "bench", tasks, self.now)).value["assigned"]

    def propose(self, n: int) -> int:
        """The first sequence of a proposal of ``n`` tasks (as ``BalancerStream.dispatch``)."""
        first = self.sequence + 1
        self.sequence += n
        return first

    def complete(self, assigned: list[tuple[bytes, int, tuple[int, int]]]) -> None:
        self.ledger.apply(Batch([CompleteTask(j, t, f[0], f[1], DONE, "w", {}, None, None, self.now)
                                 for j, t, f in assigned]))

    def fill(self, finished: int) -> None:
        """``finished`` one-task jobs, each submitted, assigned and done."""
        left = finished
        while left > 0:
            n = min(FILL_BATCH, left)
            jobs = [self.submit({"count": 1}) for _ in range(n)]
            tasks = [(j, 0) for j in jobs]
            self.complete(self.assign(tasks, self.propose(n)))
            left -= n


def drain(d: Driver, tasks: int, chunk: int, inflight_cap: int, mode: str) -> dict[str, Any]:
    """Drain one ``range`` job of ``tasks`` tasks the way the leader does; returns the timings."""
    state, work = d.ledger.state, d.ledger.work
    job = d.submit({"count": tasks, "keep_results": False})
    inflight: Any = InFlight(d.ledger) if mode == "index" else set()
    proposals: deque[tuple[int, list[tuple[bytes, int]]]] = deque()
    running: deque[tuple[bytes, int, tuple[int, int]]] = deque()
    t_ready = t_assign = t_complete = 0.0
    calls = done = 0
    clock = time.perf_counter
    start = clock()
    while done < tasks:
        room = min(chunk, inflight_cap - len(inflight))
        got: list[tuple[bytes, int]] = []
        if room > 0:
            t0 = clock()
            got = views.ready_tasks(state, work, room, inflight)
            t_ready += clock() - t0
            calls += 1
            if got:
                inflight.update(got)
                proposals.append((d.propose(len(got)), got))
        if proposals and (len(inflight) >= inflight_cap or not got):
            first, proposed = proposals.popleft()
            t0 = clock()
            assigned = d.assign(proposed, first)
            t_assign += clock() - t0
            inflight.difference_update(proposed)
            running.extend(assigned)
        if running and (len(running) >= chunk or not proposals):
            batch = [running.popleft() for _ in range(min(chunk, len(running)))]
            t0 = clock()
            d.complete(batch)
            t_complete += clock() - t0
            done += len(batch)
    total = clock() - start
    assert state.jobs[job].state == "done", state.jobs[job].state
    return {"tasks": tasks, "seconds": total, "tasks_per_s": tasks / total, "ready_calls": calls,
            "ready_us_per_call": 1e6 * t_ready / max(calls, 1), "ready_us_per_task": 1e6 * t_ready / tasks,
            "assign_us_per_task": 1e6 * t_assign / tasks, "complete_us_per_task": 1e6 * t_complete / tasks,
            "dispatch_per_s": tasks / (t_ready + t_assign), "completions_per_s": tasks / t_complete}


class CoreDriver:
    """The leader's core (``master.core.MasterCore``) over ``ledger``, Raft faked: a proposal
    commits when ``commit_all`` applies it (as every master's Raft thread would) and posts
    ``Committed``; the zero-delay flush timers the loop would fire are fired in between. A
    balancer attaches with ``credit``, sends a TASK_RESULT for each WORKER_REQUEST and gives the
    credit back, ``chunk`` tasks at a time."""

    ROUTE = b"balancer"
    PEER = Peer("bench", "balancer")

    def __init__(self, ledger: Ledger, credit: int) -> None:
        self.ledger, self.index, self.flush, self.now = ledger, 0, False, 100.0
        self.term = max(ledger.state.fence[0], ledger.state.term) + 1  # a new leader's term: its tokens are newer
        self.view = RaftView("leader", self.term, "m1:1", True)
        self.core = MasterCore(ledger, "m1", lambda: self.view, {"m1:1": "tcp://m1:1"})
        self.proposed: list[Propose] = []
        self.requests: list[WorkerRequest] = []
        self.event(Started("s"))
        self.event(TimerFired("raft", "r"))  # a leader proposes its Barrier
        self.commit_all()
        self.message(Attach(1, 1, credit, "bench"))

    def event(self, ev: Any) -> None:
        for e in self.core.handle(ev, self.now):
            if isinstance(e, Propose):
                self.proposed.append(e)
            elif isinstance(e, Send) and isinstance(e.message, WorkerRequest):
                self.requests.append(e.message)
            elif isinstance(e, StartTimer) and e.name == "flush" and e.delay == 0:
                self.flush = True

    def message(self, m: Any) -> None:
        self.event(MessageReceived(API, self.ROUTE, 7, m, "m", self.PEER))

    def commit_all(self) -> None:
        while self.proposed or self.flush:
            if not self.proposed:
                self.flush = False
                self.event(TimerFired("flush", "f"))
                continue
            p = self.proposed.pop(0)
            self.index += 1
            self.view = RaftView("leader", self.term, "m1:1", True, self.index, self.index)
            self.event(Committed(p.token, self.ledger.apply(p.entry), self.index, "c"))

    def drain(self, tasks: int, chunk: int) -> None:
        done = 0
        while done < tasks:
            self.commit_all()
            requests, self.requests = self.requests, []
            if not requests:
                raise RuntimeError(f"the core handed out nothing after {done} of {tasks} tasks")
            for i in range(0, len(requests), chunk):
                part = requests[i:i + chunk]
                for r in part:
                    self.message(TaskResult(r.job_uuid_upper, r.job_uuid_lower, r.task_id, r.fence_term,
                                            r.fence_sequence, DONE, 0, {}, None, None, "w", []))
                self.commit_all()
                self.message(Credit(1, len(part), 0))
                done += len(part)


def core_drain(d: Driver, tasks: int, chunk: int, credit: int) -> dict[str, Any]:
    """Drain one ``range`` job through the leader's core: its CPU per task (``process_time``)."""
    job = d.submit({"count": tasks, "keep_results": False})
    c = CoreDriver(d.ledger, credit)
    t0 = time.process_time()
    c.drain(tasks, chunk)
    cpu = time.process_time() - t0
    assert d.ledger.state.jobs[job].state == "done", d.ledger.state.jobs[job].state
    return {"tasks": tasks, "cpu_us_per_task": 1e6 * cpu / tasks, "tasks_per_cpu_s": tasks / cpu}


def run_core(finished: list[int], tasks: int, reps: int, chunk: int, credit: int, log: Any = print) -> dict[str, Any]:
    """The leader core's CPU per task with each count of finished jobs in the ledger."""
    out: dict[str, Any] = {"config": {"tasks": tasks, "reps": reps, "chunk": chunk, "credit": credit}, "runs": []}
    for n in finished:
        d = Driver()
        d.fill(n)
        reps_out = [core_drain(d, tasks, chunk, credit) for _ in range(reps)]
        med = statistics.median(r["cpu_us_per_task"] for r in reps_out)
        out["runs"].append({"finished_jobs": n, "cpu_us_per_task": med, "reps": reps_out})
        each = ", ".join(f"{r['cpu_us_per_task']:.1f}" for r in reps_out)
        log(f"  {n:>6,} finished jobs: the leader core {med:5.1f} µs of CPU per task ({each})")
    return out


def run(finished: list[int], tasks: int, reps: int, chunk: int, inflight_cap: int,
        log: Any = print) -> dict[str, Any]:
    """Each count of finished jobs in a fresh ledger, ``reps`` drains each, every mode side by side."""
    modes = ["set"] + (["index"] if InFlight is not None else [])
    out: dict[str, Any] = {"config": {"tasks": tasks, "reps": reps, "chunk": chunk, "inflight": inflight_cap,
                                      "modes": modes}, "runs": []}
    for n in finished:
        d = Driver()
        t0 = time.perf_counter()
        d.fill(n)
        fill_s = time.perf_counter() - t0
        for mode in modes:
            reps_out = [drain(d, tasks, chunk, inflight_cap, mode) for _ in range(reps)]
            med = {k: statistics.median(r[k] for r in reps_out) for k in reps_out[0] if k != "tasks"}
            entry = {"finished_jobs": n, "mode": mode, "fill_s": fill_s, "median": med, "reps": reps_out}
            out["runs"].append(entry)
            log(f"  {n:>6,} finished jobs, exclude={mode:5s}: {med['tasks_per_s']:8,.0f} tasks/s "
                f"(dispatch {med['dispatch_per_s']:8,.0f}/s: ready_tasks {med['ready_us_per_call']:7.1f} µs/call, "
                f"{med['ready_us_per_task']:5.1f} µs/task, assign {med['assign_us_per_task']:4.1f} µs/task; "
                f"completions {med['completions_per_s']:7,.0f}/s)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finished", type=int, nargs="+", default=[0, 10_000], help="finished jobs in the ledger")
    ap.add_argument("--tasks", type=int, default=10_000, help="tasks drained per rep")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="tasks per dispatch and per batch of results")
    ap.add_argument("--inflight", type=int, default=INFLIGHT, help="tasks proposed and not yet committed, at most")
    ap.add_argument("--credit", type=int, default=CREDIT, help="the balancer's credit in the core mode")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    print("the ledger and the dispatch view (ready_tasks, AssignTasks, CompleteTask):")
    res = run(args.finished, args.tasks, args.reps, args.chunk, args.inflight)
    print("the leader's core (MasterCore, Raft faked), results and credit back in chunks:")
    res["core"] = run_core(args.finished, args.tasks, args.reps, CORE_CHUNK, args.credit)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
