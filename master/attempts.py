"""A task's attempts in the ledger: handed out under a fencing token, ended, retried, recorded.

Theory of operation
-------------------
Tasks move through ``master.state.TASK_TRANSITIONS`` (ready → assigned → done | ready again |
failed; cancelled when their job is). ``assign`` hands ready tasks out under fencing tokens
(Raft term, sequence) that only grow; a token not newer than the ledger's fence is a deposed
leader's and is refused. ``complete`` records an attempt's end: execution is at-least-once,
recording exactly-once, so the first completion of a task is recorded and later ones are
acknowledged, ignored and counted; a completion must name the token of one of the task's
attempts. A failed attempt is retried until the task has failed ``max_attempts`` times of its
own (FAILED: it raised, exited non-zero, timed out; never again with ``retry_failed: false``) or
been LOST ``max_lost`` times (its worker died: no fault of the task's, so that budget is apart
and larger, and bounds only a task that kills every worker it runs on); a task failing for good
fails its job, or with ``fail_fast: false`` is recorded and the job goes on. A done task whose readers have all read it is folded
away (its record and files dropped, unless ``keep_results``), so a grid job's ledger holds its
frontier, not every tile. Work units (``master.workspec``) share the tokens; their table
records their ends.

Functions over ``master.state.LedgerState`` and the live ``WorkState``; the ledger
(``master.ledger``) calls them while applying the log.
"""

from __future__ import annotations

from typing import Any

from master import files, joblife, reasons
from master.commands import CANCELLED, DONE, FAILED, LOST, OUTCOMES, AssignTasks, CompleteTask
from master.files import task_files_problem
from master.jobs import DEFAULT_MAX_LOST
from master.state import (
    ENDINGS_KEPT,
    INT64_MAX,
    Applied,
    Attempt,
    Job,
    JobState,
    LedgerState,
    Task,
    TaskState,
    count,
    next_state,
    refused,
)
from master.workspec import DONE as UNIT_DONE
from master.workspec import FAILED_OUTCOME as UNIT_FAILED
from master.workspec import LOST as UNIT_LOST
from master.workspec import WorkSpecError, WorkState


def assign(state: LedgerState, work: WorkState, c: AssignTasks) -> Applied:
    """ASSIGN_TASKS: hand ready tasks (and work units) out under fencing tokens that only grow."""
    first = (c.term, c.first_sequence)
    if c.term > INT64_MAX or c.first_sequence + len(c.tasks) > INT64_MAX:
        return refused("bad_fence", f"assignment token {first} for {len(c.tasks)} tasks is past 2**63 - 1")
    if first <= state.fence:
        count(state, "stale_assignments")
        return refused(
            "stale_fence",
            f"assignment token {first} is not newer than {state.fence}: from a deposed leader",
        )
    assigned, skipped, units = [], [], []
    for i, (job_id, task_id) in enumerate(c.tasks):
        if work.is_spec(job_id):
            units.append((job_id, task_id, (c.term, c.first_sequence + i)))
            continue
        job = state.jobs.get(job_id)
        task = job.tasks.get(task_id) if job is not None else None
        if job is None or job.state != JobState.ACTIVE or task is None or task.state != TaskState.READY:
            skipped.append((job_id, task_id))
            continue
        fence = (c.term, c.first_sequence + i)
        task.state = next_state(task.state, "assign")
        task.attempts.append(Attempt(fence[0], fence[1], c.balancer, c.now))
        state.ready_index.remove(job, task_id)
        assigned.append((job_id, task_id, fence))
    if units:
        got, missed = work.assign(units, c.balancer, c.now)
        assigned += got
        skipped += missed
    state.fence = (c.term, c.first_sequence + max(len(c.tasks) - 1, 0))
    if skipped:
        count(state, "assign_skipped", len(skipped))
    return Applied(True, value={"assigned": assigned, "skipped": skipped})


def complete(state: LedgerState, work: WorkState, c: CompleteTask) -> Applied:
    """COMPLETE_TASK: an attempt ended; the first completion of a task is recorded."""
    if work.is_spec(c.job_id):
        return _complete_unit(state, work, c)
    job = state.jobs.get(c.job_id)
    if job is None:
        return refused("unknown_job", f"no job {c.job_id.hex()}")
    if c.outcome not in OUTCOMES:
        return refused("bad_outcome", f"outcome {c.outcome} is not one of {sorted(OUTCOMES)}")
    if not job.source.exists(c.task_id):
        return refused("unknown_task", f"job {c.job_id.hex()} has no task {c.task_id}")
    problem = task_files_problem(c.files, c.task_id, c.result_file)
    if problem:
        return refused("bad_files", f"task {c.task_id} of job {c.job_id.hex()}: {problem}")
    task = job.tasks.get(c.task_id)
    if task is None:
        if job.source.is_done(c.task_id):  # finished and folded away
            job.duplicates += 1
            count(state, "duplicate_completions")
            return Applied(True, "duplicate", "the task was already recorded as done")
        count(state, "stale_completions")
        return refused("stale_fence", f"task {c.task_id} of job {c.job_id.hex()} was never assigned")
    attempt = next(
        (a for a in task.attempts if (a.fence_term, a.fence_sequence) == (c.fence_term, c.fence_sequence)),
        None,
    )
    if task.state == TaskState.DONE:
        job.duplicates += 1
        count(state, "duplicate_completions")
        if attempt is not None and attempt.outcome is None:
            _end(attempt, c, CANCELLED, "superseded: the task was already done")
        return Applied(True, "duplicate", "the task was already recorded as done")
    if attempt is None:
        count(state, "stale_completions")
        return refused(
            "stale_fence",
            f"token ({c.fence_term}, {c.fence_sequence}) is not an attempt of task {c.task_id}: "
            "an assignment that never committed",
        )
    if job.state != JobState.ACTIVE or task.state in (TaskState.CANCELLED, TaskState.FAILED):
        if attempt.outcome is None:
            _end(attempt, c, c.outcome, c.error)
        count(state, "late_completions")
        why = f"the job is {job.state}" if job.state != JobState.ACTIVE else f"task {c.task_id} is {task.state}"
        return Applied(True, "ignored", f"{why}; the result is not recorded")
    if c.outcome == DONE:
        return _record_done(state, job, c, task, attempt)
    return _record_failure(state, job, c, task, attempt)


def _complete_unit(state: LedgerState, work: WorkState, c: CompleteTask) -> Applied:
    """A work unit's attempt ended: its table records it (master.workspec)."""
    if c.outcome not in OUTCOMES:
        return refused("bad_outcome", f"outcome {c.outcome} is not one of {sorted(OUTCOMES)}")
    outcome = UNIT_DONE if c.outcome == DONE else UNIT_LOST if c.outcome == LOST else UNIT_FAILED
    output = c.summary.get("stdout") if isinstance(c.summary, dict) else None
    if not isinstance(output, (bytes, bytearray)):
        value = c.summary.get("value") if isinstance(c.summary, dict) else None
        output = value if isinstance(value, (bytes, bytearray)) else b""
    digest = c.summary.get("digest") if isinstance(c.summary, dict) else None
    try:
        why = None if c.outcome == DONE else (reasons.line(c.error, OUTCOMES[c.outcome]), reasons.tail(c.summary))
        code = work.complete(c.job_id, c.task_id, (c.fence_term, c.fence_sequence), outcome, c.worker,
                             bytes(output), c.now, digest if isinstance(digest, bytes) else None, why)
    except WorkSpecError as exc:
        if exc.code == "stale_fence":
            count(state, "stale_completions")
        return refused(exc.code, exc.text)
    if code == "duplicate":
        count(state, "duplicate_completions")
        return Applied(True, "duplicate", "the unit was already recorded as finished")
    count(state, "units_ended")
    return Applied(True, "recorded")


def _record_done(state: LedgerState, job: Job, c: CompleteTask, task: Task, attempt: Attempt) -> Applied:
    task_files, refusal = files.task_files(state, job, c)
    if refusal is not None:
        return refusal
    _end(attempt, c, DONE, None)
    for other in task.attempts:
        if other.outcome is None:
            _end(other, c, CANCELLED, "superseded: another attempt finished first")
    if task.state == TaskState.READY:
        state.ready_index.remove(job, c.task_id)
    job.live -= 1
    task.state = next_state(task.state, "complete")
    task.result_file = c.result_file
    task.summary = c.summary
    job.done += 1
    job.endings.append(c.task_id)
    files.store_task_files(state, task_files)
    count(state, "tasks_done")
    _reduce(job, c.task_id, c.summary)
    newly_ready = job.source.on_done(c.task_id)
    for reader_of in job.source.inputs(c.task_id):  # this tile has read its inputs
        source_task = job.tasks.get(reader_of)
        if source_task is not None:
            source_task.readers_left -= 1
            _maybe_fold(state, job, reader_of, source_task)
    _maybe_fold(state, job, c.task_id, task)
    trim_endings(job)
    joblife.materialise(state, job, newly_ready)
    joblife.refill(state, job)
    joblife.finish_if_ended(state, job, c.now)
    return Applied(True, "recorded", value={"newly_ready": len(newly_ready)})


def trim_endings(job: Job) -> None:
    """Forget the oldest endings of tasks folded away, keeping the newest ``ENDINGS_KEPT``: a
    folded ending says only "task i is done", and holding all of them would make a grid job's
    ledger O(tiles), not O(frontier). A held record (kept results, a failed task) stops the
    trim, so no watcher misses a result or a failure; one that falls behind is told how many
    it skipped. Trimmed in chunks of ``ENDINGS_KEPT``, so the cost is O(1) per ending."""
    if len(job.endings) < 2 * ENDINGS_KEPT or job.endings[0] in job.tasks:
        return
    drop = 0
    while drop < len(job.endings) - ENDINGS_KEPT and job.endings[drop] not in job.tasks:
        drop += 1
    del job.endings[:drop]
    job.endings_dropped += drop


def _maybe_fold(state: LedgerState, job: Job, task_id: int, task: Task) -> None:
    if task.state == TaskState.DONE and task.readers_left <= 0 and not job.spec["keep_results"]:
        del job.tasks[task_id]
        files.release_task_files(state, job, task_id)


def _record_failure(state: LedgerState, job: Job, c: CompleteTask, task: Task, attempt: Attempt) -> Applied:
    error = c.error or OUTCOMES[c.outcome]
    if attempt.outcome is not None or task.open_attempt() is not attempt:
        _end(attempt, c, c.outcome, error)
        return Applied(True, "ignored", "an older attempt ended; a newer one is running")
    ended = 1 + sum(1 for a in task.attempts if a.outcome not in (None, DONE))
    # LOST attempts say nothing about the task (its worker died): they use their own budget,
    # max_lost, and only the task's own failures use max_attempts (HTCondor and Slurm requeue
    # a job whose machine was lost without charging it); only its own failure may end it early
    lost = (c.outcome == LOST) + sum(1 for a in task.attempts if a.outcome == LOST)
    own = ended - lost
    max_lost = job.spec.get("max_lost", DEFAULT_MAX_LOST)  # a job from before max_lost: the default
    own_failure_final = c.outcome == FAILED and not job.spec.get("retry_failed", True)
    if own < job.spec["max_attempts"] and lost < max_lost and not own_failure_final:
        _end(attempt, c, c.outcome, error)
        job.failed_attempts += 1
        count(state, f"attempts_{OUTCOMES[c.outcome]}")
        task.state = next_state(task.state, "retry")
        state.ready_index.add(job, (c.task_id,))
        if c.outcome == LOST:
            return Applied(True, "retry", f"attempt {ended} lost ({lost} of {max_lost} losses allowed)")
        return Applied(True, "retry", f"attempt {own} of {job.spec['max_attempts']} failed")
    task_files, refusal = files.task_files(state, job, c)
    if refusal is not None:
        return refusal
    _end(attempt, c, c.outcome, error)
    job.failed_attempts += 1
    count(state, f"attempts_{OUTCOMES[c.outcome]}")
    task.state = next_state(task.state, "fail")
    # what the failure left (an exception's type and text, a pickled exception): for the client
    task.result_file = c.result_file
    task.summary = c.summary
    job.failed += 1
    job.endings.append(c.task_id)
    files.store_task_files(state, task_files)
    count(state, "tasks_failed")
    if lost >= max_lost:
        text = f"task {c.task_id} {reasons.lost_out(lost, error)}"
    else:
        text = f"task {c.task_id} failed after {ended} attempt{'s' * (ended != 1)}: {error}"
    if not job.spec.get("fail_fast", True):
        job.live -= 1
        job.source.on_failed(c.task_id)  # ended: the window moves past it
        joblife.refill(state, job)
        joblife.finish_if_ended(state, job, c.now)
        return Applied(True, "failed", text, value={"job_state": job.state})
    joblife.end_job(state, job, JobState.FAILED, text, c.now)  # its other tasks are cancelled or finish unrecorded
    return Applied(True, "failed", job.error, value={"job_state": job.state})


def _reduce(job: Job, task_id: int, summary: dict[str, Any]) -> None:
    rule = job.spec["reduce"]
    if "max" in rule:
        field = rule["max"]
        value = summary.get(field)
        best = job.reduced.get("max")
        ties = rule.get("ties", ())
        if _is_number(value) and (
            best is None or _rank(value, summary, ties, task_id) > _rank(best["summary"][field], best["summary"], ties, best["task"])
        ):
            job.reduced["max"] = {"task": task_id, "summary": summary}
    for field in rule.get("sum", ()):
        value = summary.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sums = job.reduced.setdefault("sum", {})
            # saturate: a sum past int64 would make the state unencodable on every master
            sums[field] = max(-INT64_MAX, min(INT64_MAX, sums.get(field, 0) + value))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rank(value: Any, summary: dict[str, Any], ties: Any, task_id: int) -> tuple:
    """Order of candidates for a ``max`` reduce: larger value, then smaller ``ties`` fields (a
    missing one loses), then lower task id."""
    tie_key = tuple(-summary[t] if _is_number(summary.get(t)) else float("-inf") for t in ties)
    return (value, tie_key, -task_id)


def _end(attempt: Attempt, c: CompleteTask, outcome: int, error: str | None) -> None:
    attempt.outcome = outcome
    attempt.ended_at = c.now
    attempt.worker = c.worker or attempt.worker
    attempt.error = None if error is None else reasons.line(error, OUTCOMES[outcome])
    if outcome in (FAILED, LOST) and c.outcome == outcome:  # its own report: what it wrote is its
        attempt.tail = reasons.tail(c.summary)
