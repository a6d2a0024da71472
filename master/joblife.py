"""A job's life in the ledger: submitted, waiting for other jobs, its tasks made window by window,
ended (done, failed or cancelled), and the jobs that wait for it released or failed.

Theory of operation
-------------------
A submit is deduplicated by its idempotency key (bound to a digest of its body, so a reused
key with another body is refused). A job with ``after`` waits, with no task made, until every
job it names is done; if one of them fails or is cancelled, it fails without running, and so
on down the DAG (``release_waiting``). A job holds at most ``jobs.WINDOW`` live tasks: its
source gives more as they end (``refill``). Every way a job ends goes through ``end_job``.

Functions over ``master.state.LedgerState``; the ledger (``master.ledger``) calls them while
applying the log, and ``master.attempts`` when a task's ending ends its job.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from master import jobs
from master import files
from master.commands import CancelJob, CompactJobs, ReleaseFile, SubmitJob
from master.state import Applied, Job, JobState, LedgerState, Task, TaskState, count, next_state, refused


def spec_digest(kind: str, spec: Any) -> bytes:
    """What a submit's idempotency key is bound to (so a reused key with another body is caught)."""
    return hashlib.blake2b(msgspec.msgpack.encode([kind, spec]), digest_size=16).digest()


def submit(state: LedgerState, c: SubmitJob) -> Applied:
    """SUBMIT_JOB: a new job (or the one its idempotency key already made)."""
    known = state.keys.get(c.key)
    if known is not None:
        digest, job_id = known
        if digest != c.digest:
            return refused(
                "idempotency_conflict",
                f"idempotency key {c.key.hex()} was used for another job ({job_id.hex()}) with a different body; "
                "use a fresh key for a new job",
            )
        count(state, "submits_deduplicated")
        return Applied(True, value={"job": job_id, "created": False})
    if c.job_id in state.jobs:
        return refused("duplicate_job_id", f"job id {c.job_id.hex()} exists")
    try:
        spec = jobs.validate_spec(c.kind, c.spec, len(msgspec.msgpack.encode(c.spec)))
    except jobs.SpecError as exc:
        return refused(exc.code, exc.text)
    after, refusal = _dependencies(state, spec)
    if refusal is not None:
        return refusal
    state.job_seq += 1
    job = Job(
        job_id=c.job_id,
        key=c.key,
        kind=c.kind,
        spec=spec,
        client=c.client,
        submitted_at=c.now,
        seq=state.job_seq,
        source=jobs.make_source(c.kind, spec),
        after=after,
    )
    state.jobs[c.job_id] = job
    state.keys[c.key] = (c.digest, c.job_id)
    for dep in after:  # a job can only wait for earlier ones, so the dependencies form a DAG
        state.waiting.setdefault(dep, []).append(c.job_id)
    if not after:
        materialise(state, job, job.source.take(jobs.WINDOW))
    count(state, "jobs_submitted")
    return Applied(True, value={"job": c.job_id, "created": True})


def _dependencies(state: LedgerState, spec: dict[str, Any]) -> tuple[list[bytes], Applied | None]:
    """The jobs a new job must wait for (its ``after`` not yet done), or why it cannot be made."""
    after = []
    for dep in dict.fromkeys(bytes.fromhex(h) for h in spec["after"]):
        other = state.jobs.get(dep)
        if other is None:
            return [], refused("unknown_job", f"'after' names job {dep.hex()}, which does not exist")
        if other.state in (JobState.FAILED, JobState.CANCELLED):
            return [], refused("dependency_failed", f"'after' names job {dep.hex()}, which is {other.state}: "
                                                    "this job could never start")
        if other.state != JobState.DONE:
            after.append(dep)
    return after, None


def cancel(state: LedgerState, c: CancelJob) -> Applied:
    """CANCEL_JOB: the job ends now; cancelling an ended job changes nothing."""
    job = state.jobs.get(c.job_id)
    if job is None:
        return refused("unknown_job", f"no job {c.job_id.hex()}")
    if job.state != JobState.ACTIVE:
        return Applied(True, value={"job": c.job_id, "state": job.state, "changed": False})
    end_job(state, job, JobState.CANCELLED, c.reason or "cancelled", c.now)
    return Applied(True, value={"job": c.job_id, "state": job.state, "changed": True})


def materialise(state: LedgerState, job: Job, task_ids: list[int]) -> None:
    """Make ``task_ids`` ready: each now has a record (the job's frontier)."""
    for task_id in task_ids:
        job.tasks[task_id] = Task(state=TaskState.READY, readers_left=job.source.consumers(task_id))
    state.ready_index.add(job, task_ids)
    job.live += len(task_ids)


def refill(state: LedgerState, job: Job) -> None:
    """Top the job's live tasks back up to the window (a wavefront grid makes its own)."""
    if not isinstance(job.source, jobs.GridSource) or not job.source.wavefront:
        materialise(state, job, job.source.take(jobs.WINDOW - job.live))


def finish_if_ended(state: LedgerState, job: Job, now: float) -> None:
    """Every task has ended: the job is done, or failed with a count (``fail_fast: false``)."""
    if job.done + job.failed < job.total:
        return
    if not job.failed:
        end_job(state, job, JobState.DONE, None, now)
        return
    first = next(t for t in job.endings if t in job.tasks and job.tasks[t].state == TaskState.FAILED)
    end_job(state, job, JobState.FAILED, f"{job.failed} of {job.total} tasks failed (first: task {first}: "
                                  f"{job.tasks[first].attempts[-1].error})", now)


def end_job(state: LedgerState, job: Job, end: str, error: str | None, now: float, release: bool = True) -> None:
    """``job`` is over (``end`` is done, failed or cancelled): its tasks not yet ended will not
    run (or finish unrecorded), and, unless ``release`` is false, the jobs waiting for it go on
    or fail (``release_waiting``)."""
    if job.live:
        for task in job.tasks.values():
            if task.state in (TaskState.READY, TaskState.ASSIGNED):
                task.state = next_state(task.state, "cancel")
    state.ready_index.clear(job)
    job.live = 0
    job.state = end
    job.finished_at = now
    job.error = error
    count(state, f"jobs_{end}")
    if release:
        release_waiting(state, job, now)


def release_waiting(state: LedgerState, ended: Job, now: float) -> None:
    """``ended`` is over: each job waiting for it starts once nothing else holds it (when
    ``ended`` is done), or fails without running (when it failed or was cancelled), and
    so on down the DAG (Slurm's ``afterok``; HTCondor DAGMan does not run a failed node's
    children)."""
    stack = [ended]
    while stack:
        job = stack.pop()
        for waiter_id in state.waiting.pop(job.job_id, []):
            waiter = state.jobs.get(waiter_id)
            if waiter is None or waiter.state != JobState.ACTIVE or job.job_id not in waiter.after:
                continue
            if job.state == JobState.DONE:
                waiter.after.remove(job.job_id)
                if not waiter.after:
                    materialise(state, waiter, waiter.source.take(jobs.WINDOW))
                    count(state, "jobs_released")
                continue
            end_job(state, waiter, JobState.FAILED, f"job {job.job_id.hex()}, which it waits for, {job.state}: "
                                             "it never ran", now, release=False)
            stack.append(waiter)  # its own waiters next: a loop, not a recursion as deep as the DAG


def compact(state: LedgerState, c: CompactJobs) -> Applied:
    """COMPACT_JOBS: forget every job that ended before ``c.before``: its record (spec, tasks,
    results), its idempotency key (a resubmission with it makes a new job) and its references
    to files (a file nothing else refers to leaves the ledger; the storage nodes' collector
    deletes it). Active jobs are never touched, however old."""
    gone = [job_id for job_id, job in state.jobs.items()
            if job.state is not JobState.ACTIVE and job.finished_at is not None and job.finished_at < c.before]
    for job_id in gone:
        job = state.jobs.pop(job_id)
        if state.keys.get(job.key, (b"", b""))[1] == job_id:
            del state.keys[job.key]
        if job_id in state.named:
            files.release(state, ReleaseFile(None, job_id, c.now))
        state.waiting.pop(job_id, None)
    count(state, "jobs_compacted", len(gone))
    return Applied(True, value={"compacted": len(gone)})


def oldest_ended(state: LedgerState) -> float | None:
    """When the job that ended first (of those still kept) ended; None if none has."""
    return min((j.finished_at for j in state.jobs.values() if j.state is not JobState.ACTIVE and j.finished_at is not None),
               default=None)
