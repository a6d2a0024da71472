"""The ledger: the cluster's replicated truth (jobs, tasks, attempts, results, files).

Theory of operation
-------------------
``Ledger.apply(entry)`` is the Raft state machine: it takes one committed log entry (a command
from ``master.commands`` or a batch of them) and changes the state deterministically — no clock
(the leader stamps ``now`` into each command), no randomness (the leader picks ids), no I/O. The
same log gives byte-identical snapshots on every master.

A command that cannot apply is *refused*: ``apply`` returns ``Applied(ok=False, code, text)``
and nothing changes but the counters (``applied``, ``refused.<code>``): every check runs before
the first mutation. Nothing a client or a
balancer sends can raise out of ``apply``.

Tasks move through ``TASK_TRANSITIONS`` (ready → assigned → done | ready again | failed;
cancelled when their job is). Execution is at-least-once, recording exactly-once: the first
completion of a task is recorded, later ones are acknowledged, ignored and counted. A job's
``endings`` lists its tasks in the order their final outcome (done, or failed for good) was
recorded: clients watch it with a cursor (WATCH) instead of polling every task. A failed attempt
is retried up to ``max_attempts`` (only LOST ones when the spec says ``retry_failed: false``); a
task failing for good fails its job, or with ``fail_fast: false`` is recorded and the job goes
on, ending "failed" with a count once every task has ended. The files a worker stored are
registered with the job (named ``task-<id>.<name>``) when its completion ends the task. An
assignment carries a fencing token (Raft term, sequence) that only grows; a completion must
name the token of one of the task's attempts, so results of assignments that never committed
(a deposed leader's) are refused.

The whole state is msgspec Structs: ``snapshot()`` is one MessagePack encode, ``restore()`` one
decode, and equality is structural (property-tested in tests/unit/test_ledger_properties.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec

from master import jobs
from master.commands import (
    CANCELLED,
    DONE,
    FAILED,
    LOST,
    OUTCOMES,
    AddUnits,
    AddWorkSpec,
    AssignTasks,
    Barrier,
    Batch,
    CancelJob,
    CompleteTask,
    ControlSpec,
    DropFile,
    Entry,
    ExpireLeases,
    MakeUnits,
    RegisterFile,
    ReleaseFile,
    SubmitJob,
)
from master.views import PIN, LedgerViews
from master.workspec import DONE as UNIT_DONE
from master.workspec import FAILED_OUTCOME as UNIT_FAILED
from master.workspec import LOST as UNIT_LOST
from master.workspec import WorkSpecError, WorkState

TASK_TRANSITIONS: dict[tuple[str, str], str] = {
    ("ready", "assign"): "assigned",
    ("assigned", "complete"): "done",
    ("ready", "complete"): "done",  # an attempt reported lost came back with a good result after all
    ("assigned", "retry"): "ready",  # a failed attempt with attempts left
    ("assigned", "fail"): "failed",  # the last attempt failed
    ("ready", "cancel"): "cancelled",
    ("assigned", "cancel"): "cancelled",
}
JOB_STATES = ("active", "done", "failed", "cancelled")
INT64_MAX = 2**63 - 1


class Attempt(msgspec.Struct, array_like=True):
    """One try of a task: who was handed it, under which fencing token, and how it ended."""

    fence_term: int
    fence_sequence: int
    balancer: str
    assigned_at: float
    worker: str = ""
    ended_at: float | None = None
    outcome: int | None = None  # None while open; else commands.DONE … LOST
    error: str | None = None


class Task(msgspec.Struct, array_like=True):
    """A materialised task: one of the job's frontier, or a finished one whose result is kept."""

    state: str
    attempts: list[Attempt] = []
    result_file: bytes | None = None
    summary: dict[str, Any] | None = None
    readers_left: int = 0  # grid tiles that still have to read this result

    def open_attempt(self) -> Attempt | None:
        if self.attempts and self.attempts[-1].outcome is None:
            return self.attempts[-1]
        return None


class Job(msgspec.Struct, array_like=True):
    job_id: bytes
    key: bytes
    kind: str
    spec: dict[str, Any]
    client: str
    submitted_at: float
    seq: int  # submission order, for fair round-robin
    source: jobs.Source
    state: str = "active"
    tasks: dict[int, Task] = {}
    ready: dict[int, None] = {}  # an ordered set: ready tasks, oldest first
    done: int = 0
    live: int = 0  # materialised tasks not finished (ready or assigned)
    failed_attempts: int = 0
    duplicates: int = 0
    reduced: dict[str, Any] = {}
    finished_at: float | None = None
    error: str | None = None
    # appended (array-like: a new field goes last, so older snapshots still decode)
    endings: list[int] = []  # task ids in the order their final outcome was recorded, after the dropped
    failed: int = 0  # tasks failed for good
    endings_dropped: int = 0  # leading endings forgotten: done tasks folded away (see _trim_endings)
    after: list[bytes] = []  # the jobs it still waits for (spec 'after'): no task is made until they are done

    @property
    def total(self) -> int:
        return jobs.total_tasks(self.source)


MAX_NAME = 255
MAX_TASK_FILES = 1024  # files one completion may register
ENDINGS_KEPT = 2 * jobs.WINDOW  # the newest endings always held; older folded ones may be dropped


class FileRecord(msgspec.Struct, array_like=True):
    size: int
    replicas: list[str]
    registered_at: float
    refs: dict[bytes, str] = {}  # owner (a job id, or PIN) → the name it knows the file by


class LedgerState(msgspec.Struct, array_like=True):
    jobs: dict[bytes, Job] = {}
    keys: dict[bytes, tuple[bytes, bytes]] = {}  # idempotency key → (body digest, job id)
    files: dict[bytes, FileRecord] = {}
    fence: tuple[int, int] = (0, 0)  # the newest fencing token handed out
    job_seq: int = 0
    term: int = 0  # of the newest committed Barrier
    leader: str = ""
    applied: int = 0  # commands applied (a batch counts each of its commands)
    counters: dict[str, int] = {}
    # appended (array-like: a new field goes last, so older snapshots still decode)
    named: dict[bytes, dict[str, bytes]] = {}  # owner → name → file id (the per-job listings)
    # the work specs and their units (master.workspec.WorkState), encoded: the live WorkState is
    # Ledger.work (numpy columns); it is written here only when a snapshot is taken
    work: bytes = b""
    waiting: dict[bytes, list[bytes]] = {}  # job id → the jobs that wait for it (spec 'after')


@dataclass(frozen=True, slots=True)
class Applied:
    """What one command did: ``ok`` and a value, or a refusal with a stable ``code``."""

    ok: bool
    code: str = "ok"
    text: str = ""
    value: Any = None


def refused(code: str, text: str) -> Applied:
    return Applied(False, code, text)


def spec_digest(kind: str, spec: Any) -> bytes:
    """What a submit's idempotency key is bound to (so a reused key with another body is caught)."""
    return hashlib.blake2b(msgspec.msgpack.encode([kind, spec]), digest_size=16).digest()


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(LedgerState)


class Ledger(LedgerViews):
    """The replicated state machine. Not thread-safe: its owner serialises access."""

    def __init__(self, state: LedgerState | None = None) -> None:
        self.state = state if state is not None else LedgerState()
        self.work = WorkState.from_state(msgspec.msgpack.decode(self.state.work)) if self.state.work else WorkState()

    # ---- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as bytes; ``Ledger.restore`` gives an equal ledger back."""
        self.state.work = msgspec.msgpack.encode(self.work.to_state()) if self.work.specs else b""
        try:
            return _snapshot_encoder.encode(self.state)
        finally:
            self.state.work = b""  # the live copy is self.work

    @classmethod
    def restore(cls, data: bytes) -> "Ledger":
        state = _snapshot_decoder.decode(data)
        for job in state.jobs.values():
            # A snapshot from before the endings log: what ended then counts as dropped (a
            # watcher is told it skipped them), so cursors and counts agree from here on.
            job.endings_dropped = job.done + job.failed - len(job.endings)
        ledger = cls(state)
        state.work = b""
        return ledger

    # ---- applying the log ----------------------------------------------------------------

    def apply(self, entry: Entry) -> Applied | list[Applied]:
        """Apply one committed entry; a batch gives one ``Applied`` per command."""
        if isinstance(entry, Batch):
            return [self._apply_one(c) for c in entry.commands]
        return self._apply_one(entry)

    def _apply_one(self, command: Any) -> Applied:
        handler = _HANDLERS.get(type(command))
        if handler is None:  # the decoder admits only known commands; this is defence
            return refused("bad_command", f"not a ledger command: {type(command).__name__}")
        self.state.applied += 1
        result = handler(self, command)
        if not result.ok:
            self._count(f"refused.{result.code}")
        return result

    def _count(self, name: str, n: int = 1) -> None:
        self.state.counters[name] = self.state.counters.get(name, 0) + n

    # ---- jobs ----------------------------------------------------------------------------

    def _submit(self, c: SubmitJob) -> Applied:
        known = self.state.keys.get(c.key)
        if known is not None:
            digest, job_id = known
            if digest != c.digest:
                return refused(
                    "idempotency_conflict",
                    f"idempotency key {c.key.hex()} was used for another job ({job_id.hex()}) with a different body; "
                    "use a fresh key for a new job",
                )
            self._count("submits_deduplicated")
            return Applied(True, value={"job": job_id, "created": False})
        if c.job_id in self.state.jobs:
            return refused("duplicate_job_id", f"job id {c.job_id.hex()} exists")
        try:
            spec = jobs.validate_spec(c.kind, c.spec, len(msgspec.msgpack.encode(c.spec)))
        except jobs.SpecError as exc:
            return refused(exc.code, exc.text)
        after = []
        for dep in dict.fromkeys(bytes.fromhex(h) for h in spec["after"]):
            other = self.state.jobs.get(dep)
            if other is None:
                return refused("unknown_job", f"'after' names job {dep.hex()}, which does not exist")
            if other.state in ("failed", "cancelled"):
                return refused("dependency_failed", f"'after' names job {dep.hex()}, which is {other.state}: "
                                                    "this job could never start")
            if other.state != "done":
                after.append(dep)
        self.state.job_seq += 1
        job = Job(
            job_id=c.job_id,
            key=c.key,
            kind=c.kind,
            spec=spec,
            client=c.client,
            submitted_at=c.now,
            seq=self.state.job_seq,
            source=jobs.make_source(c.kind, spec),
            after=after,
        )
        self.state.jobs[c.job_id] = job
        self.state.keys[c.key] = (c.digest, c.job_id)
        for dep in after:  # a job can only wait for earlier ones, so the dependencies form a DAG
            self.state.waiting.setdefault(dep, []).append(c.job_id)
        if not after:
            self._materialise(job, job.source.take(jobs.WINDOW))
        self._count("jobs_submitted")
        return Applied(True, value={"job": c.job_id, "created": True})

    def _cancel(self, c: CancelJob) -> Applied:
        job = self.state.jobs.get(c.job_id)
        if job is None:
            return refused("unknown_job", f"no job {c.job_id.hex()}")
        if job.state != "active":
            return Applied(True, value={"job": c.job_id, "state": job.state, "changed": False})
        self._end_job(job, "cancelled", c.reason or "cancelled", c.now)
        return Applied(True, value={"job": c.job_id, "state": job.state, "changed": True})

    # ---- tasks ---------------------------------------------------------------------------

    def _materialise(self, job: Job, task_ids: list[int]) -> None:
        for task_id in task_ids:
            job.tasks[task_id] = Task(state="ready", readers_left=job.source.consumers(task_id))
            job.ready[task_id] = None
        job.live += len(task_ids)

    def _assign(self, c: AssignTasks) -> Applied:
        first = (c.term, c.first_sequence)
        if c.term > INT64_MAX or c.first_sequence + len(c.tasks) > INT64_MAX:
            return refused("bad_fence", f"assignment token {first} for {len(c.tasks)} tasks is past 2**63 - 1")
        if first <= self.state.fence:
            self._count("stale_assignments")
            return refused(
                "stale_fence",
                f"assignment token {first} is not newer than {self.state.fence}: from a deposed leader",
            )
        assigned, skipped, units = [], [], []
        for i, (job_id, task_id) in enumerate(c.tasks):
            if self.work.is_spec(job_id):
                units.append((job_id, task_id, (c.term, c.first_sequence + i)))
                continue
            job = self.state.jobs.get(job_id)
            task = job.tasks.get(task_id) if job is not None else None
            if job is None or job.state != "active" or task is None or task.state != "ready":
                skipped.append((job_id, task_id))
                continue
            fence = (c.term, c.first_sequence + i)
            task.state = _next(task.state, "assign")
            task.attempts.append(Attempt(fence[0], fence[1], c.balancer, c.now))
            del job.ready[task_id]
            assigned.append((job_id, task_id, fence))
        if units:
            got, missed = self.work.assign(units, c.balancer, c.now)
            assigned += got
            skipped += missed
        self.state.fence = (c.term, c.first_sequence + max(len(c.tasks) - 1, 0))
        if skipped:
            self._count("assign_skipped", len(skipped))
        return Applied(True, value={"assigned": assigned, "skipped": skipped})

    def _complete(self, c: CompleteTask) -> Applied:
        if self.work.is_spec(c.job_id):
            return self._complete_unit(c)
        job = self.state.jobs.get(c.job_id)
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
                self._count("duplicate_completions")
                return Applied(True, "duplicate", "the task was already recorded as done")
            self._count("stale_completions")
            return refused("stale_fence", f"task {c.task_id} of job {c.job_id.hex()} was never assigned")
        attempt = next(
            (a for a in task.attempts if (a.fence_term, a.fence_sequence) == (c.fence_term, c.fence_sequence)),
            None,
        )
        if task.state == "done":
            job.duplicates += 1
            self._count("duplicate_completions")
            if attempt is not None and attempt.outcome is None:
                _end(attempt, c, CANCELLED, "superseded: the task was already done")
            return Applied(True, "duplicate", "the task was already recorded as done")
        if attempt is None:
            self._count("stale_completions")
            return refused(
                "stale_fence",
                f"token ({c.fence_term}, {c.fence_sequence}) is not an attempt of task {c.task_id}: "
                "an assignment that never committed",
            )
        if job.state != "active" or task.state in ("cancelled", "failed"):
            if attempt.outcome is None:
                _end(attempt, c, c.outcome, c.error)
            self._count("late_completions")
            why = f"the job is {job.state}" if job.state != "active" else f"task {c.task_id} is {task.state}"
            return Applied(True, "ignored", f"{why}; the result is not recorded")
        if c.outcome == DONE:
            return self._record_done(job, c, task, attempt)
        return self._record_failure(job, c, task, attempt)

    def _complete_unit(self, c: CompleteTask) -> Applied:
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
            code = self.work.complete(c.job_id, c.task_id, (c.fence_term, c.fence_sequence), outcome, c.worker,
                                      bytes(output), c.now, digest if isinstance(digest, bytes) else None)
        except WorkSpecError as exc:
            if exc.code == "stale_fence":
                self._count("stale_completions")
            return refused(exc.code, exc.text)
        if code == "duplicate":
            self._count("duplicate_completions")
            return Applied(True, "duplicate", "the unit was already recorded as finished")
        self._count("units_ended")
        return Applied(True, "recorded")

    def _record_done(self, job: Job, c: CompleteTask, task: Task, attempt: Attempt) -> Applied:
        files, refusal = self._task_files(job, c)
        if refusal is not None:
            return refusal
        _end(attempt, c, DONE, None)
        for other in task.attempts:
            if other.outcome is None:
                _end(other, c, CANCELLED, "superseded: another attempt finished first")
        if task.state == "ready":
            del job.ready[c.task_id]
        job.live -= 1
        task.state = _next(task.state, "complete")
        task.result_file = c.result_file
        task.summary = c.summary
        job.done += 1
        job.endings.append(c.task_id)
        self._store_files(files)
        self._count("tasks_done")
        self._reduce(job, c.task_id, c.summary)
        newly_ready = job.source.on_done(c.task_id)
        for reader_of in job.source.inputs(c.task_id):  # this tile has read its inputs
            source_task = job.tasks.get(reader_of)
            if source_task is not None:
                source_task.readers_left -= 1
                self._maybe_fold(job, reader_of, source_task)
        self._maybe_fold(job, c.task_id, task)
        self._trim_endings(job)
        self._materialise(job, newly_ready)
        self._refill(job)
        self._finish_if_ended(job, c.now)
        return Applied(True, "recorded", value={"newly_ready": len(newly_ready)})

    def _trim_endings(self, job: Job) -> None:
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

    def _refill(self, job: Job) -> None:
        if not isinstance(job.source, jobs.GridSource) or not job.source.wavefront:
            self._materialise(job, job.source.take(jobs.WINDOW - job.live))

    def _maybe_fold(self, job: Job, task_id: int, task: Task) -> None:
        if task.state == "done" and task.readers_left <= 0 and not job.spec["keep_results"]:
            del job.tasks[task_id]
            self._release_task_files(job, task_id)

    def _release_task_files(self, job: Job, task_id: int) -> None:
        """A folded task's stored outputs (a tile's boundary) have been read by every task that
        needed them: the job lets go of them, and the storage nodes collect those nothing else
        refers to. A wavefront job so keeps O(frontier) files, not one per tile."""
        names = self.state.named.get(job.job_id)
        if not names:
            return
        prefix = f"task-{task_id}."
        kept = {prefix + n for n in job.spec.get("keep_files", ())}
        for name in [n for n in names if n.startswith(prefix) and n not in kept]:
            file_id = names[name]
            self._unname(job.job_id, name)
            record = self.state.files.get(file_id)
            if record is not None:
                record.refs.pop(job.job_id, None)
                if not record.refs:
                    del self.state.files[file_id]
            self._count("files_released_on_fold")

    def _record_failure(self, job: Job, c: CompleteTask, task: Task, attempt: Attempt) -> Applied:
        error = c.error or OUTCOMES[c.outcome]
        if attempt.outcome is not None or task.open_attempt() is not attempt:
            _end(attempt, c, c.outcome, error)
            return Applied(True, "ignored", "an older attempt ended; a newer one is running")
        ended = 1 + sum(1 for a in task.attempts if a.outcome not in (None, DONE))
        # Only the task's own failure may end it early: a LOST attempt says nothing about the task.
        own_failure_final = c.outcome == FAILED and not job.spec.get("retry_failed", True)
        if ended < job.spec["max_attempts"] and not own_failure_final:
            _end(attempt, c, c.outcome, error)
            job.failed_attempts += 1
            self._count(f"attempts_{OUTCOMES[c.outcome]}")
            task.state = _next(task.state, "retry")
            job.ready[c.task_id] = None
            return Applied(True, "retry", f"attempt {ended} of {job.spec['max_attempts']} failed")
        files, refusal = self._task_files(job, c)
        if refusal is not None:
            return refusal
        _end(attempt, c, c.outcome, error)
        job.failed_attempts += 1
        self._count(f"attempts_{OUTCOMES[c.outcome]}")
        task.state = _next(task.state, "fail")
        # what the failure left (an exception's type and text, a pickled exception): for the client
        task.result_file = c.result_file
        task.summary = c.summary
        job.failed += 1
        job.endings.append(c.task_id)
        self._store_files(files)
        self._count("tasks_failed")
        text = f"task {c.task_id} failed after {ended} attempt{'s' * (ended != 1)}: {error}"
        if not job.spec.get("fail_fast", True):
            job.live -= 1
            job.source.on_failed(c.task_id)  # ended: the window moves past it
            self._refill(job)
            self._finish_if_ended(job, c.now)
            return Applied(True, "failed", text, value={"job_state": job.state})
        self._end_job(job, "failed", text, c.now)  # its other tasks are cancelled or finish unrecorded
        return Applied(True, "failed", job.error, value={"job_state": job.state})

    def _finish_if_ended(self, job: Job, now: float) -> None:
        """Every task has ended: the job is done, or failed with a count (``fail_fast: false``)."""
        if job.done + job.failed < job.total:
            return
        if not job.failed:
            self._end_job(job, "done", None, now)
            return
        first = next(t for t in job.endings if t in job.tasks and job.tasks[t].state == "failed")
        self._end_job(job, "failed", f"{job.failed} of {job.total} tasks failed (first: task {first}: "
                                     f"{job.tasks[first].attempts[-1].error})", now)

    def _end_job(self, job: Job, state: str, error: str | None, now: float, release: bool = True) -> None:
        """``job`` is over (done, failed or cancelled): its tasks not yet ended will not run (or
        finish unrecorded), and, unless ``release`` is false, the jobs waiting for it go on or
        fail (``_release_waiting``)."""
        if job.live:
            for task in job.tasks.values():
                if task.state in ("ready", "assigned"):
                    task.state = _next(task.state, "cancel")
        job.ready.clear()
        job.live = 0
        job.state = state
        job.finished_at = now
        job.error = error
        self._count(f"jobs_{state}")
        if release:
            self._release_waiting(job, now)

    def _release_waiting(self, ended: Job, now: float) -> None:
        """``ended`` is over: each job waiting for it starts once nothing else holds it (when
        ``ended`` is done), or fails without running (when it failed or was cancelled), and
        so on down the DAG (Slurm's ``afterok``; HTCondor DAGMan does not run a failed node's
        children)."""
        stack = [ended]
        while stack:
            job = stack.pop()
            for waiter_id in self.state.waiting.pop(job.job_id, []):
                waiter = self.state.jobs.get(waiter_id)
                if waiter is None or waiter.state != "active" or job.job_id not in waiter.after:
                    continue
                if job.state == "done":
                    waiter.after.remove(job.job_id)
                    if not waiter.after:
                        self._materialise(waiter, waiter.source.take(jobs.WINDOW))
                        self._count("jobs_released")
                    continue
                self._end_job(waiter, "failed", f"job {job.job_id.hex()}, which it waits for, {job.state}: "
                                                "it never ran", now, release=False)
                stack.append(waiter)  # its own waiters next: a loop, not a recursion as deep as the DAG

    def _task_files(self, job: Job, c: CompleteTask) -> tuple[list[RegisterFile], Applied | None]:
        """The registrations that recording ``c`` makes, every one checked; or the refusal.
        Each listed file is named ``task-<id>.<name>`` in the job's listing; a result file the
        ledger already knows is referenced too, as ``task-<id>.result``, unless listed."""
        out = [
            RegisterFile(file_id, size, list(replicas), job.job_id, c.now, task_file_name(c.task_id, name or file_id.hex()))
            for file_id, size, replicas, name in c.files
        ]
        known = self.state.files.get(c.result_file) if c.result_file is not None else None
        listed = {entry[0] for entry in c.files}
        if known is not None and c.result_file not in listed and job.job_id not in known.refs:
            out.append(RegisterFile(c.result_file, known.size, list(known.replicas), job.job_id, c.now,
                                    task_file_name(c.task_id, "result")))
        for command in out:
            refusal = self._file_refusal(command)
            if refusal is not None:
                return [], refused(refusal.code, f"task {c.task_id}'s files: {refusal.text}")
        return out, None

    def _store_files(self, commands: list[RegisterFile]) -> None:
        for command in commands:
            self._file_store(command)
        if commands:
            self._count("task_files_registered", len(commands))

    def _reduce(self, job: Job, task_id: int, summary: dict[str, Any]) -> None:
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

    # ---- files and leadership ------------------------------------------------------------

    def _register_file(self, c: RegisterFile) -> Applied:
        refusal = self._file_refusal(c)
        if refusal is not None:
            return refusal
        record = self._file_store(c)
        return Applied(True, value={"file": c.file_id, "replicas": record.replicas})

    def _file_refusal(self, c: RegisterFile) -> Applied | None:
        """Why ``c`` cannot apply, or None: every check of a registration, before any change
        (a completion checks all its files with this before it registers one)."""
        if len(c.file_id) != 16:
            return refused("bad_file_id", "a file id is 16 bytes")
        if not c.replicas:
            return refused("no_replicas", f"file {c.file_id.hex()} has no replica")
        record = self.state.files.get(c.file_id)
        if record is not None and record.size != c.size:
            return refused("size_mismatch", f"file {c.file_id.hex()} is {record.size} bytes, not {c.size}")
        owner = PIN if c.owner is None else c.owner
        name = c.name or c.file_id.hex()
        if c.add_ref:
            if c.owner is not None and c.owner not in self.state.jobs:
                return refused("unknown_job", f"no job {c.owner.hex()} to own file {c.file_id.hex()}")
            problem = _name_problem(name)
            if problem:
                return refused("bad_name", f"file name {name!r} {problem}")
            taken = self.state.named.get(owner, {}).get(name)
            if taken is not None and taken != c.file_id:
                return refused("name_taken", f"{_owner_text(owner)} already has a file named {name!r} ({taken.hex()})")
        elif record is None:
            return refused("unknown_file", f"no file {c.file_id.hex()} to add replicas to (it was released or never registered)")
        return None

    def _file_store(self, c: RegisterFile) -> FileRecord:
        record = self.state.files.get(c.file_id)
        if record is None:
            record = self.state.files[c.file_id] = FileRecord(c.size, sorted(set(c.replicas)), c.now)
        else:
            record.replicas = sorted(set(record.replicas) | set(c.replicas))
        if c.add_ref:
            owner = PIN if c.owner is None else c.owner
            name = c.name or c.file_id.hex()
            old = record.refs.get(owner)
            if old is not None and old != name:
                del self.state.named[owner][old]
            record.refs[owner] = name
            self.state.named.setdefault(owner, {})[name] = c.file_id
        return record

    def _release_file(self, c: ReleaseFile) -> Applied:
        owner = PIN if c.owner is None else c.owner
        if c.file_id is None:
            if c.owner is None:
                return refused("bad_release", "release every file of whom? name a job (or a file id)")
            targets = list(self.state.named.get(owner, {}).values())
        else:
            record = self.state.files.get(c.file_id)
            if record is None:
                return refused("unknown_file", f"no file {c.file_id.hex()}")
            if owner not in record.refs:
                return refused("not_referenced", f"{_owner_text(owner)} does not refer to file {c.file_id.hex()}")
            targets = [c.file_id]
        dropped = []
        for file_id in targets:
            record = self.state.files[file_id]
            self._unname(owner, record.refs.pop(owner))
            if not record.refs:
                del self.state.files[file_id]
                dropped.append(file_id)
        return Applied(True, value={"released": len(targets), "dropped": dropped})

    def _drop_file(self, c: DropFile) -> Applied:
        record = self.state.files.pop(c.file_id, None)
        if record is None:
            return refused("unknown_file", f"no file {c.file_id.hex()}")
        for owner, name in record.refs.items():
            self._unname(owner, name)
        return Applied(True, value={"released": len(record.refs), "dropped": [c.file_id]})

    def _unname(self, owner: bytes, name: str) -> None:
        names = self.state.named[owner]
        del names[name]
        if not names:
            del self.state.named[owner]

    def _barrier(self, c: Barrier) -> Applied:
        if c.term > self.state.term:
            self.state.term = c.term
            self.state.leader = c.leader
        return Applied(True, value={"term": self.state.term})

    # ---- invariants ----------------------------------------------------------------------

    def validate_state(self) -> None:
        """Raise AssertionError if an invariant does not hold."""
        s = self.state
        for key, (_, job_id) in s.keys.items():
            assert job_id in s.jobs, f"idempotency key {key.hex()} names a missing job"
        for job in s.jobs.values():
            assert job.state in JOB_STATES, job.state
            assert 0 <= job.done and 0 <= job.failed and job.done + job.failed <= job.total
            self._validate_endings(job)
            for task_id in job.ready:
                assert job.tasks[task_id].state == "ready", f"task {task_id} in the ready set is {job.tasks[task_id].state}"
            for task_id, task in job.tasks.items():
                assert job.source.exists(task_id)
                if task.state == "ready":
                    assert task_id in job.ready, f"ready task {task_id} missing from the ready set"
                if task.state == "assigned":
                    assert task.open_attempt() is not None, f"assigned task {task_id} has no open attempt"
                if task.state == "done":
                    assert job.source.is_done(task_id), f"done task {task_id} not done in its source"
                    assert sum(a.outcome == DONE for a in task.attempts) == 1, f"task {task_id} completed twice"
                    assert all(a.outcome is not None for a in task.attempts)
                if task.state == "failed" and not job.spec.get("fail_fast", True):
                    assert job.source.is_done(task_id), f"failed task {task_id} has not ended in its source"
                for a in task.attempts:
                    assert (a.fence_term, a.fence_sequence) <= s.fence, "an attempt token newer than the fence"
            live = sum(t.state in ("ready", "assigned") for t in job.tasks.values())
            assert job.state != "active" or job.live == live, f"live count {job.live} != {live}"
            if job.state == "done":
                assert job.done == job.total and not job.failed and not job.ready
            if job.state != "active":
                assert not job.ready
            if job.after and job.state == "active":
                assert not job.tasks, f"job {job.job_id.hex()} waits for other jobs but has tasks"
                for dep in job.after:
                    assert s.jobs[dep].state == "active" and job.job_id in s.waiting[dep], dep.hex()
        for file_id, record in s.files.items():
            assert record.refs, f"file {file_id.hex()} has no reference left"
            assert record.replicas == sorted(set(record.replicas)) and record.replicas
            for owner, name in record.refs.items():
                assert s.named[owner][name] == file_id, f"file {file_id.hex()} missing from {owner.hex()}'s names"
        for owner, names in s.named.items():
            assert names, f"empty name table for {owner.hex()}"
            for name, file_id in names.items():
                assert s.files[file_id].refs[owner] == name

    @staticmethod
    def _validate_endings(job: Job) -> None:
        """``endings`` holds each ended task once: done ones (or their folded trace) and failed ones,
        and nothing else; ``done`` and ``failed`` count them."""
        assert len(set(job.endings)) == len(job.endings), "a task ended twice"
        ended = job.endings_dropped + len(job.endings)
        assert ended == job.done + job.failed, f"{ended} endings for {job.done} + {job.failed}"
        failed = 0
        for task_id in job.endings:
            task = job.tasks.get(task_id)
            assert task is not None or job.source.is_done(task_id), f"ending {task_id} is neither held nor done"
            assert task is None or task.state in ("done", "failed"), f"ending {task_id} is {task.state}"
            failed += task is not None and task.state == "failed"
        assert failed == job.failed == sum(t.state == "failed" for t in job.tasks.values())


def task_file_name(task_id: int, name: str) -> str:
    """A task's file's name in its job's listing: one path component, unique per task."""
    return f"task-{task_id}.{name}"


def task_files_problem(files: Any, task_id: int, result_file: bytes | None) -> str | None:
    """What is wrong with a completion's ``files``, or None. Each entry is ``[file id (16 bytes),
    size (0 .. 2**63 - 1), [storage node names, at least one], name]``; ids and names are unique
    and ``result`` is kept for the result file unless that is listed. Needs no state: the core
    runs it on TASK_RESULT before proposing, the ledger again on apply."""
    if not isinstance(files, (list, tuple)):
        return "'files' must be a list of [file id, size, replicas, name]"
    if len(files) > MAX_TASK_FILES:
        return f"{len(files)} files; one task registers at most {MAX_TASK_FILES}"
    ids: set[bytes] = set()
    names: set[str] = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            return f"file {i} must be [file id, size, replicas, name], not {entry!r:.80}"
        file_id, size, replicas, name = entry
        if not isinstance(file_id, bytes) or len(file_id) != 16:
            return f"file {i}: a file id is 16 bytes, not {file_id!r:.40}"
        what = f"file {i} ({file_id.hex()})"
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= INT64_MAX:
            return f"{what}: the size must be an integer from 0 to 2**63 - 1, not {size!r:.40}"
        if not isinstance(replicas, (list, tuple)) or not replicas or not all(isinstance(r, str) and r for r in replicas):
            return f"{what}: replicas must be a non-empty list of storage node names, not {replicas!r:.80}"
        if not isinstance(name, str):
            return f"{what}: the name must be a string, not {name!r:.40}"
        name = name or file_id.hex()
        problem = _name_problem(name) or _name_problem(task_file_name(task_id, name))
        if problem:
            return f"{what}: the name {name!r:.80} (as {task_file_name(task_id, name)!r:.80}) {problem}"
        if file_id in ids:
            return f"{what} is listed twice"
        if name in names:
            return f"{what}: two files are named {name!r}"
        ids.add(file_id)
        names.add(name)
    if "result" in names and result_file is not None and result_file not in ids:
        return "the name 'result' is kept for the task's result file (list the result file to give it that name)"
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rank(value: Any, summary: dict[str, Any], ties: Any, task_id: int) -> tuple:
    """Order of candidates for a ``max`` reduce: larger value, then smaller ``ties`` fields (a
    missing one loses), then lower task id."""
    tie_key = tuple(-summary[t] if _is_number(summary.get(t)) else float("-inf") for t in ties)
    return (value, tie_key, -task_id)


def _name_problem(name: str) -> str | None:
    if "/" in name or "\0" in name:
        return "has a '/' or NUL: names are single path components"
    if name in (".", ".."):
        return "is reserved"
    if len(name.encode()) > MAX_NAME:
        return f"is over {MAX_NAME} bytes"
    return None


def _owner_text(owner: bytes) -> str:
    return "the user pin" if owner == PIN else f"job {owner.hex()}"


def _next(state: str, event: str) -> str:
    try:
        return TASK_TRANSITIONS[(state, event)]
    except KeyError:
        raise AssertionError(f"illegal task transition: {event} in state {state}") from None


def _end(attempt: Attempt, c: CompleteTask, outcome: int, error: str | None) -> None:
    attempt.outcome = outcome
    attempt.ended_at = c.now
    attempt.worker = c.worker or attempt.worker
    attempt.error = error


def _work(apply):
    """A work-spec command's handler: WorkState checks before it changes anything, so a
    refusal (WorkSpecError) leaves the state as it was."""

    def handler(ledger: Ledger, c: Any) -> Applied:
        try:
            return Applied(True, value=apply(ledger.work, c))
        except WorkSpecError as exc:
            return refused(exc.code, exc.text)

    return handler


_HANDLERS = {
    AddWorkSpec: _work(lambda w, c: {"spec": w.add_spec(c.spec).name}),
    AddUnits: _work(lambda w, c: w.add_units(c.spec, c.units, c.key)),
    ControlSpec: _work(lambda w, c: w.control(c.spec, c.action, c.value)),
    ExpireLeases: _work(lambda w, c: {"expired": w.expire(c.now)}),
    MakeUnits: _work(lambda w, c: {"made": w.make_units(c.specs, c.now)}),
    SubmitJob: Ledger._submit,
    CancelJob: Ledger._cancel,
    AssignTasks: Ledger._assign,
    CompleteTask: Ledger._complete,
    RegisterFile: Ledger._register_file,
    ReleaseFile: Ledger._release_file,
    DropFile: Ledger._drop_file,
    Barrier: Ledger._barrier,
}

__all__ = ["Applied", "Ledger", "LedgerState", "Task", "Job", "Attempt", "TASK_TRANSITIONS", "spec_digest"]
