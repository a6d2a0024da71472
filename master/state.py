"""The ledger's state: the msgspec Structs every master replicates, and the result of a command.

Theory of operation
-------------------
``LedgerState`` is the whole replicated truth (jobs, tasks, attempts, files, the fence); the
ledger (``master.ledger``) changes it, the read views (``master.views``) only look at it. This
module sits below both and imports neither, so the two never import each other.

The Structs are ``array_like``: a snapshot is one MessagePack encode of ``LedgerState`` with
no field names, so a new field goes last and carries a default, and older snapshots still
decode. Moving a Struct between modules does not change the snapshot (no type names are
written).

``LedgerState.ready_index`` (``master.ready.ReadyIndex``: the jobs with ready tasks, by priority)
is derived from the jobs and is no field: msgspec neither encodes nor compares it, and
``__post_init__`` builds it again whenever a state is made or decoded, so snapshots keep their
format and every master holds the same index after the same log.

``Applied`` is what applying one command did; ``refused`` makes a refusal. Tasks move through
``TASK_TRANSITIONS``; ``next_state`` is the only way a task's state changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from master import jobs
from master.ready import ReadyIndex


class TaskState(StrEnum):
    """A materialised task's state. A str enum: snapshots and views carry the same strings as
    before (msgspec encodes a member as its value), and old snapshots decode unchanged."""

    READY = "ready"
    ASSIGNED = "assigned"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobState(StrEnum):
    """A job's state: active until every task has ended (or it is cancelled, or fails fast)."""

    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TASK_TRANSITIONS: dict[tuple[TaskState, str], TaskState] = {
    (TaskState.READY, "assign"): TaskState.ASSIGNED,
    (TaskState.ASSIGNED, "complete"): TaskState.DONE,
    # an attempt reported lost came back with a good result after all
    (TaskState.READY, "complete"): TaskState.DONE,
    (TaskState.ASSIGNED, "retry"): TaskState.READY,  # a failed attempt with attempts left
    (TaskState.ASSIGNED, "fail"): TaskState.FAILED,  # the last attempt failed
    (TaskState.READY, "cancel"): TaskState.CANCELLED,
    (TaskState.ASSIGNED, "cancel"): TaskState.CANCELLED,
}
JOB_STATES = tuple(JobState)
INT64_MAX = 2**63 - 1
MAX_NAME = 255
MAX_TASK_FILES = 1024  # files one completion may register
ENDINGS_KEPT = 2 * jobs.WINDOW  # the newest endings always held; older folded ones may be dropped
PIN = b""  # the owner key of a user's pin in FileRecord.refs (without keys: everyone's)
PIN_PREFIX = b"pin:"  # a key's own pins: PIN_PREFIX + its name (a job id is 16 bytes, never this)


def pin_owner(name: str) -> bytes:
    """The owner key of the pins of key ``name`` ("" in an insecure cluster: the shared PIN)."""
    return PIN_PREFIX + name.encode() if name else PIN


def is_pin(owner: bytes) -> bool:
    """A pin's owner key (shared or a key's own), not a job id."""
    return owner == PIN or owner.startswith(PIN_PREFIX)


class Attempt(msgspec.Struct, array_like=True):
    """One try of a task: who was handed it, under which fencing token, and how it ended."""

    fence_term: int
    fence_sequence: int
    balancer: str
    assigned_at: float
    worker: str = ""
    ended_at: float | None = None
    outcome: int | None = None  # None while open; else commands.DONE … LOST
    error: str | None = None  # why it failed: one line (master.reasons)
    tail: str = ""  # the end of what a failed attempt wrote, and the file holding all of it


class Task(msgspec.Struct, array_like=True):
    """A materialised task: one of the job's frontier, or a finished one whose result is kept."""

    state: TaskState
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
    state: JobState = JobState.ACTIVE
    tasks: dict[int, Task] = {}
    ready: dict[int, None] = {}  # an ordered set: ready tasks, oldest first (changed only through the ReadyIndex)
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
    endings_dropped: int = 0  # leading endings forgotten: done tasks folded away (see attempts.trim_endings)
    after: list[bytes] = []  # the jobs it still waits for (spec 'after'): no task is made until they are done

    @property
    def total(self) -> int:
        return jobs.total_tasks(self.source)


class FileRecord(msgspec.Struct, array_like=True):
    size: int
    replicas: list[str]
    registered_at: float
    refs: dict[bytes, str] = {}  # owner (a job id, or PIN) → the name it knows the file by


class LedgerState(msgspec.Struct, array_like=True, dict=True):
    """The replicated state. ``dict=True`` lets it carry ``ready_index``, derived and not a field."""

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

    def __post_init__(self) -> None:
        # derived from the jobs (master.ready), rebuilt on every make and decode, never encoded
        self.ready_index = ReadyIndex.of(self.jobs)


@dataclass(frozen=True, slots=True)
class Applied:
    """What one command did: ``ok`` and a value, or a refusal with a stable ``code``."""

    ok: bool
    code: str = "ok"
    text: str = ""
    value: Any = None


def refused(code: str, text: str) -> Applied:
    return Applied(False, code, text)


def count(state: LedgerState, name: str, n: int = 1) -> None:
    """Add ``n`` to the ledger's counter ``name`` (replicated: every master counts the same)."""
    state.counters[name] = state.counters.get(name, 0) + n


def next_state(state: TaskState, event: str) -> TaskState:
    """A task's state after ``event`` (``TASK_TRANSITIONS``); an illegal one is a bug."""
    try:
        return TASK_TRANSITIONS[(state, event)]
    except KeyError:
        raise AssertionError(f"illegal task transition: {event} in state {state}") from None
