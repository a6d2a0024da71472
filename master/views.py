"""The ledger's read views: what the leader's dispatcher and the client API read.

Plain functions over the ledger's state (``master.state.LedgerState``) and, for the views that
cover work units too, its live work table (``master.workspec.WorkState``): e.g.
``job_view(ledger.state, job_id)``. They only look; ``master.ledger`` changes the state. This
module imports ``master.state`` and never ``master.ledger``, so the two cannot form a cycle.
"""

from __future__ import annotations

import heapq
from typing import Any, Collection, Iterator

from master import jobs
from master.commands import FAILED, LOST, OUTCOMES
from master.ready import InFlight
from master.state import PIN, PIN_PREFIX, Attempt, Job, JobState, LedgerState, TaskState, is_pin
from master.workspec import WorkState

FAILURES_SHOWN = 3  # the newest failed attempts a job view carries


def ready_tasks(state: LedgerState, work: WorkState, limit: int,
                exclude: Collection[tuple[bytes, int]] = frozenset()) -> list[tuple[bytes, int]]:
    """Up to ``limit`` ready tasks: higher job priority first, round-robin between the jobs
    of one priority (so one big job cannot starve the others), oldest task first in a job;
    then work units (``WorkState.ready``). Tasks in ``exclude`` (proposed and not yet
    committed) are not handed out again.

    Reads the ready index (``master.ready``): O(limit + jobs visited), never O(all jobs). The
    tasks an ``InFlight`` took (the stream's in-flight set, passed as ``exclude``) are off the
    index's queues, so they are never handed out and never skipped one by one; the tasks of a
    plain set are skipped one by one."""
    out: list[tuple[bytes, int]] = []
    if limit > 0:
        queues = state.ready_index.queues
        skip = exclude.tasks if isinstance(exclude, InFlight) else exclude  # its set: no method call a task
        for tier in state.ready_index.tiers():  # highest priority first
            _round_robin(queues, tier, limit, skip, out)
            if len(out) >= limit:
                break
    # then the work specs' units, shared by priority and weight (master.workspec.allocate)
    return out + work.ready(limit - len(out), _units_in_flight(exclude, work))


def _round_robin(queues: dict[bytes, dict[int, None]], tier: Iterator[bytes], limit: int,
                 exclude: Collection[tuple[bytes, int]], out: list[tuple[bytes, int]]) -> None:
    """Hand out the ready tasks of one priority's jobs into ``out`` until it holds ``limit``:
    one task of each job in submission order, then a second of each, and so on."""
    turn = []
    for job_id in tier:  # the first round reads the tier lazily: it may stop after a few jobs
        if len(out) >= limit:
            return
        tasks = iter(queues[job_id])
        if _next_task(job_id, tasks, exclude, out):
            turn.append((job_id, tasks))
    while turn and len(out) < limit:
        still = []
        for job_id, tasks in turn:
            if len(out) >= limit:
                break
            if _next_task(job_id, tasks, exclude, out):
                still.append((job_id, tasks))
        turn = still


def _next_task(job_id: bytes, tasks: Iterator[int], exclude: Collection[tuple[bytes, int]],
               out: list[tuple[bytes, int]]) -> bool:
    """Append the job's next task not in ``exclude`` to ``out``; False when it has none left."""
    for task_id in tasks:
        if (job_id, task_id) not in exclude:
            out.append((job_id, task_id))
            return True
    return False


def _units_in_flight(exclude: Collection[tuple[bytes, int]], work: WorkState) -> dict[bytes, set[int]]:
    """The work units among ``exclude``, by spec id (an ``InFlight`` keeps them so)."""
    if isinstance(exclude, InFlight):
        return exclude.units
    units: dict[bytes, set[int]] = {}
    if work.specs:
        for job_id, task_id in exclude:
            if work.is_spec(job_id):
                units.setdefault(job_id, set()).add(task_id)
    return units


def open_assignments(state: LedgerState, work: WorkState) -> Iterator[tuple[bytes, int, Attempt]]:
    """Every task handed out and not yet ended (a new balancer is told these again)."""
    for job in state.jobs.values():
        if job.state != JobState.ACTIVE:
            continue
        for task_id, task in job.tasks.items():
            if task.state == TaskState.ASSIGNED:
                yield job.job_id, task_id, task.open_attempt()
    for sid, uid, term, seq, holder, started in work.open():
        yield sid, uid, Attempt(term, seq, holder, started)


def task_order(state: LedgerState, work: WorkState, job_id: bytes, task_id: int) -> dict[str, Any]:
    """What a worker needs to run a task: the job's ``run``, the task's arguments, and the
    result files of the tasks it reads (e.g. the neighbouring tiles' boundaries)."""
    if work.is_spec(job_id):
        return work.order(job_id, task_id)
    job = state.jobs[job_id]
    inputs = []
    for other in job.source.inputs(task_id):
        t = job.tasks.get(other)
        if t is not None and t.result_file is not None:
            inputs.append(t.result_file)
    arguments = jobs.task_arguments(job.kind, job.spec, task_id)
    best = job.reduced.get("max")
    if job.spec["run"].get("share_best") and best is not None:
        # the best so far, for block pruning: a tile that cannot reach it is skipped
        arguments = {**arguments, "best_so_far": best["summary"][job.spec["reduce"]["max"]]}
    return {"run": job.spec["run"], "arguments": arguments, "inputs": inputs}


def job_view(state: LedgerState, job_id: bytes) -> dict[str, Any] | None:
    """A job's state, counts and reduced result (JOB_QUERY's reply); None if unknown."""
    job = state.jobs.get(job_id)
    if job is None:
        return None
    states: dict[str, int] = {}
    failures: list[tuple[float, int, Any]] = []  # (ended at, task id, attempt) of failed or lost attempts
    for task_id, t in job.tasks.items():
        if job.failed_attempts:
            failures.extend((a.ended_at or 0.0, task_id, a) for a in t.attempts if a.outcome in (FAILED, LOST))
        states[t.state] = states.get(t.state, 0) + 1
    return {
        "job": job_id.hex(),
        "kind": job.kind,
        "name": job.spec.get("name", ""),
        "state": job.state,
        "priority": job.spec["priority"],
        "submitted_at": job.submitted_at,
        "finished_at": job.finished_at,
        "client": job.client,
        "total": job.total,
        "done": job.done,
        "ready": states.get("ready", 0),
        "assigned": states.get("assigned", 0),
        "failed": job.failed,
        "failed_attempts": job.failed_attempts,
        "duplicates": job.duplicates,
        "reduced": job.reduced,
        "error": job.error,
        # why its newest attempts failed (master.reasons), newest first: `cluster jobs JOB` shows them
        "failures": [{"task": t, "worker": a.worker, "outcome": OUTCOMES.get(a.outcome), "error": a.error, "tail": a.tail,
                      "ended_at": a.ended_at} for _, t, a in heapq.nlargest(FAILURES_SHOWN, failures, key=lambda f: f[:2])],
        "waiting_for": [j.hex() for j in job.after] if job.state == JobState.ACTIVE else [],
        **({"align": job.spec["align"]} if "align" in job.spec else {}),
    }


def jobs_view(state: LedgerState, limit: int = 100, job_state: str | None = None,
              client: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs (optionally only those in ``job_state``, or submitted by
    ``client``), newest first."""
    out = []
    for job in reversed(state.jobs.values()):
        if (job_state is None or job.state == job_state) and (client is None or job.client == client):
            out.append(job_view(state, job.job_id))
            if len(out) >= limit:
                break
    return out


def task_view(state: LedgerState, job_id: bytes, task_id: int) -> dict[str, Any] | None:
    """A task's state, attempts and result reference; None if the job is unknown."""
    job = state.jobs.get(job_id)
    if job is None:
        return None
    base = {"job": job_id.hex(), "task": task_id}
    if not job.source.exists(task_id):
        return {**base, "state": "unknown", "note": f"the job has tasks 0..{job.total - 1}"}
    task = job.tasks.get(task_id)
    if task is None:
        if job.source.is_done(task_id):
            return {**base, "state": TaskState.DONE, "folded": True, "note": "its result was consumed and folded into the job's"}
        return {**base, "state": "waiting" if job.state == JobState.ACTIVE else job.state}
    return {
        **base,
        "state": task.state,
        "result_file": task.result_file.hex() if task.result_file else None,
        "summary": task.summary,
        "attempts": [
            {
                "fence": [a.fence_term, a.fence_sequence],
                "balancer": a.balancer,
                "worker": a.worker,
                "assigned_at": a.assigned_at,
                "ended_at": a.ended_at,
                "outcome": OUTCOMES.get(a.outcome) if a.outcome is not None else None,
                "error": a.error,
                "tail": a.tail,
            }
            for a in task.attempts
        ],
    }


def task_story(state: LedgerState, job_id: bytes, task_id: int) -> list[dict[str, Any]]:
    """A task's life as the ledger records it, oldest first: its job submitted, then each
    attempt assigned (fence, balancer) and ended (worker, outcome, error); a done task whose
    record was folded away ends with ``folded``. [] if the job is unknown. Durable and the same
    on every master; ``MasterCore.story`` adds the leader's log around it."""
    job = state.jobs.get(job_id)
    if job is None:
        return []
    out: list[dict[str, Any]] = [{"step": "submitted", "at": job.submitted_at, "client": job.client}]
    task = job.tasks.get(task_id)
    if task is None:
        if job.source.exists(task_id) and job.source.is_done(task_id):
            out.append({"step": "folded", "at": None})
        return out
    for a in task.attempts:
        fence = [a.fence_term, a.fence_sequence]
        out.append({"step": "assigned", "at": a.assigned_at, "fence": fence, "balancer": a.balancer})
        if a.outcome is not None:
            out.append({"step": "ended", "at": a.ended_at, "fence": fence, "worker": a.worker,
                        "outcome": OUTCOMES.get(a.outcome), "error": a.error, "tail": a.tail})
    return out


def has_news(state: LedgerState, job_id: bytes, cursor: int) -> bool:
    """Whether a watcher at ``cursor`` of the job's endings has something to hear: endings
    past it, or the job is over (or unknown)."""
    job = state.jobs.get(job_id)
    return job is None or job.endings_dropped + len(job.endings) > cursor or job.state != JobState.ACTIVE


def endings_view(state: LedgerState, job_id: bytes, cursor: int, limit: int) -> dict[str, Any] | None:
    """The job's state and up to ``limit`` task endings past ``cursor`` (WATCH's reply for one
    job); ``cursor`` in the answer is where the next watch starts, ``more`` whether endings are
    left past it (a job "done" with ``more`` has not told all yet), ``skipped`` how many endings
    past the old cursor had been dropped (done tasks folded away: see ``attempts.trim_endings``).
    None if the job is unknown."""
    job = state.jobs.get(job_id)
    if job is None:
        return None
    skipped = max(0, job.endings_dropped - cursor) if limit > 0 else 0
    start = cursor + skipped - job.endings_dropped
    ids = job.endings[start:start + limit] if 0 <= start < len(job.endings) and limit > 0 else []
    after = cursor + skipped + len(ids)
    return {
        "state": job.state,
        "cursor": after,
        "more": after < job.endings_dropped + len(job.endings),  # endings left: watch again at once
        "skipped": skipped,
        "error": job.error,
        "done": job.done,
        "failed": job.failed,
        "total": job.total,
        "tasks": [_ending(job, t) for t in ids],
    }


def file_view(state: LedgerState, file_id: bytes) -> dict[str, Any] | None:
    """A file's size, replicas and who refers to it (by name), or None if unknown."""
    record = state.files.get(file_id)
    if record is None:
        return None
    return {
        "id": file_id.hex(),
        "size": record.size,
        "replicas": list(record.replicas),
        "refs": {_owner_label(owner): name for owner, name in record.refs.items()},
        "readers": _readers(state, record),
        "registered_at": record.registered_at,
    }


def files_view(state: LedgerState, limit: int, owner: bytes | None = None, after: bytes | None = None,
               among: set[bytes] | None = None) -> dict[str, Any]:
    """Files in id order after ``after`` (all, or those ``owner`` refers to, or those any of
    ``among``'s owners refers to); ``next`` is the ``after`` of the following page, None at the
    end. Cost: O(files) per page."""
    if owner is not None:
        ids: Any = state.named.get(owner, {}).values()
    elif among is not None:
        ids = {f for o in among for f in state.named.get(o, {}).values()}
    else:
        ids = state.files.keys()
    page = heapq.nsmallest(limit + 1, (f for f in ids if after is None or f > after))
    views = [file_view(state, f) for f in page[:limit]]
    if owner is not None:
        for v in views:
            v["name"] = state.files[bytes.fromhex(v["id"])].refs[owner]
    return {"files": views, "next": page[limit - 1].hex() if len(page) > limit else None}


def _readers(state: LedgerState, record: Any) -> list[str]:
    """The keys that may read a file from storage (storage.readers): the owners of the jobs that
    refer to it and the keys that pinned it; "*" for the shared pin of a cluster without keys."""
    out = set()
    for owner in record.refs:
        if owner == PIN:
            out.add("*")
        elif is_pin(owner):
            out.add(owner[len(PIN_PREFIX):].decode(errors="replace"))
        elif (job := state.jobs.get(owner)) is not None:
            out.add(job.client)
    return sorted(out)


def _owner_label(owner: bytes) -> str:
    """How a file's reference is shown: a job's hex id, "pinned" (the shared pin of an
    insecure cluster) or "pinned:NAME" (the pin of key NAME)."""
    if owner == PIN:
        return "pinned"
    if is_pin(owner):
        return "pinned:" + owner[len(PIN_PREFIX):].decode(errors="replace")
    return owner.hex()


def footprint(state: LedgerState) -> dict[str, int]:
    """How much the ledger holds: what O(frontier) is measured by."""
    return {
        "jobs": len(state.jobs),
        "task_records": sum(len(j.tasks) for j in state.jobs.values()),
        "frontier_entries": sum(j.source.frontier() for j in state.jobs.values()),
        "files": len(state.files),
    }


def _ending(job: Job, task_id: int) -> dict[str, Any]:
    task = job.tasks.get(task_id)
    if task is None:  # a done tile whose readers consumed it: its result is in the job's reduced one
        return {"task": task_id, "state": TaskState.DONE, "summary": None, "result_file": None, "error": None,
                "attempts": None, "folded": True}
    last = task.attempts[-1] if task.attempts else None
    return {
        "task": task_id,
        "state": task.state,
        "summary": task.summary,
        "result_file": task.result_file,
        "error": last.error if task.state == TaskState.FAILED and last is not None else None,
        "attempts": len(task.attempts),
    }
