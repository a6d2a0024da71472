"""The ledger: the cluster's replicated truth (jobs, tasks, attempts, results, files).

Theory of operation
-------------------
``Ledger.apply(entry)`` is the Raft state machine: it takes one committed log entry (a command
from ``master.commands`` or a batch of them) and changes the state deterministically — no clock
(the leader stamps ``now`` into each command), no randomness (the leader picks ids), no I/O. The
same log gives byte-identical snapshots on every master.

A command that cannot apply is *refused*: ``apply`` returns ``Applied(ok=False, code, text)``
and nothing changes but the counters (``applied``, ``refused.<code>``): every check runs before
the first mutation. Nothing a client or a balancer sends can raise out of ``apply``.

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

Each concern has its own module, all functions over the state types of ``master.state``:
``master.joblife`` (submits, the DAG of ``after``, a job's end), ``master.attempts`` (assignment,
completion, retries, folding, reduce), ``master.files`` (the file table); every change of a job's
ready set goes through ``LedgerState.ready_index`` (``master.ready``), the index dispatch reads.
This module holds the ``Ledger`` object (the live state, the dispatch of commands, snapshots,
invariants); the read views are functions in ``master.views`` (e.g.
``views.job_view(ledger.state, job_id)``).
"""

from __future__ import annotations

from typing import Any, Callable

import msgspec

from master import attempts, files, joblife
from master.commands import (
    DONE,
    AddUnits,
    AddWorkSpec,
    AssignTasks,
    Barrier,
    Batch,
    CancelJob,
    CompactJobs,
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
from master.files import task_files_problem
from master.joblife import spec_digest
from master.state import (
    ENDINGS_KEPT,
    JOB_STATES,
    MAX_TASK_FILES,
    TASK_TRANSITIONS,
    Applied,
    Attempt,
    Job,
    JobState,
    LedgerState,
    Task,
    TaskState,
    count,
    refused,
)
from master.workspec import WorkSpecError, WorkState

_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(LedgerState)


class Ledger:
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
        result = handler(self.state, self.work, command)
        if not result.ok:
            count(self.state, f"refused.{result.code}")
        return result

    # ---- invariants ----------------------------------------------------------------------

    def validate_state(self) -> None:
        """Raise AssertionError if an invariant does not hold."""
        s = self.state
        for key, (_, job_id) in s.keys.items():
            assert job_id in s.jobs, f"idempotency key {key.hex()} names a missing job"
        for job in s.jobs.values():
            _validate_job(s, job)
        s.ready_index.validate(s.jobs)  # the dispatch index is what a full scan of the jobs finds
        files.validate(s)


def _validate_job(s: LedgerState, job: Job) -> None:
    """One job's invariants: its counts, ready set, tasks, attempts and the jobs it waits for."""
    assert job.state in JOB_STATES, job.state
    assert 0 <= job.done and 0 <= job.failed and job.done + job.failed <= job.total
    _validate_endings(job)
    for task_id in job.ready:
        assert job.tasks[task_id].state == TaskState.READY, f"task {task_id} in the ready set is {job.tasks[task_id].state}"
    for task_id, task in job.tasks.items():
        assert job.source.exists(task_id)
        if task.state == TaskState.READY:
            assert task_id in job.ready, f"ready task {task_id} missing from the ready set"
        if task.state == TaskState.ASSIGNED:
            assert task.open_attempt() is not None, f"assigned task {task_id} has no open attempt"
        if task.state == TaskState.DONE:
            assert job.source.is_done(task_id), f"done task {task_id} not done in its source"
            assert sum(a.outcome == DONE for a in task.attempts) == 1, f"task {task_id} completed twice"
            assert all(a.outcome is not None for a in task.attempts)
        if task.state == TaskState.FAILED and not job.spec.get("fail_fast", True):
            assert job.source.is_done(task_id), f"failed task {task_id} has not ended in its source"
        for a in task.attempts:
            assert (a.fence_term, a.fence_sequence) <= s.fence, "an attempt token newer than the fence"
    live = sum(t.state in (TaskState.READY, TaskState.ASSIGNED) for t in job.tasks.values())
    assert job.state != JobState.ACTIVE or job.live == live, f"live count {job.live} != {live}"
    if job.state == JobState.DONE:
        assert job.done == job.total and not job.failed and not job.ready
    if job.state != JobState.ACTIVE:
        assert not job.ready
    if job.after and job.state == JobState.ACTIVE:
        assert not job.tasks, f"job {job.job_id.hex()} waits for other jobs but has tasks"
        for dep in job.after:
            assert s.jobs[dep].state == JobState.ACTIVE and job.job_id in s.waiting[dep], dep.hex()


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
        assert task is None or task.state in (TaskState.DONE, TaskState.FAILED), f"ending {task_id} is {task.state}"
        failed += task is not None and task.state == TaskState.FAILED
    assert failed == job.failed == sum(t.state == TaskState.FAILED for t in job.tasks.values())


def _barrier(state: LedgerState, c: Barrier) -> Applied:
    """BARRIER: a new leader's first entry of its term (Raft §8): the ledger learns who leads."""
    if c.term > state.term:
        state.term = c.term
        state.leader = c.leader
    return Applied(True, value={"term": state.term})


_Handler = Callable[[LedgerState, WorkState, Any], Applied]


def _on_state(apply: Callable[[LedgerState, Any], Applied]) -> _Handler:
    """A handler of a command that reads and changes only ``LedgerState``."""
    return lambda state, work, c: apply(state, c)


def _work(apply: Callable[[WorkState, Any], Any]) -> _Handler:
    """A work-spec command's handler: WorkState checks before it changes anything, so a
    refusal (WorkSpecError) leaves the state as it was."""

    def handler(state: LedgerState, work: WorkState, c: Any) -> Applied:
        try:
            return Applied(True, value=apply(work, c))
        except WorkSpecError as exc:
            return refused(exc.code, exc.text)

    return handler


_HANDLERS: dict[type, _Handler] = {
    AddWorkSpec: _work(lambda w, c: {"spec": w.add_spec(c.spec).name}),
    AddUnits: _work(lambda w, c: w.add_units(c.spec, c.units, c.key)),
    ControlSpec: _work(lambda w, c: w.control(c.spec, c.action, c.value)),
    ExpireLeases: _work(lambda w, c: {"expired": w.expire(c.now)}),
    MakeUnits: _work(lambda w, c: {"made": w.make_units(c.specs, c.now)}),
    SubmitJob: _on_state(joblife.submit),
    CancelJob: _on_state(joblife.cancel),
    CompactJobs: _on_state(joblife.compact),
    AssignTasks: attempts.assign,
    CompleteTask: attempts.complete,
    RegisterFile: _on_state(files.register),
    ReleaseFile: _on_state(files.release),
    DropFile: _on_state(files.drop),
    Barrier: _on_state(_barrier),
}

__all__ = [
    "Applied", "Ledger", "LedgerState", "Task", "Job", "Attempt", "TASK_TRANSITIONS", "ENDINGS_KEPT",
    "MAX_TASK_FILES", "spec_digest", "task_files_problem",
]
