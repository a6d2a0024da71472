"""Ledger commands: what the Raft log carries, one entry per command (or per batch).

Every change to the ledger is one of these, applied in log order on every master. A command
holds everything its application needs, the leader's wall-clock time (``now``) and fresh ids
included, so application is deterministic: the same log gives the same ledger everywhere.

The encoding is MessagePack through msgspec (tagged arrays: compact, and decoding validates the
shape in C). Raft (pysyncobj) sees only the bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from proto.messages import Outcome  # the wire's vocabulary: CompleteTask carries TaskResult's outcome


DONE, FAILED, CANCELLED, LOST = Outcome
OUTCOMES = {int(o): o.name.lower() for o in Outcome}  # plain int keys: {0: "done", 1: "failed", ...}


class SubmitJob(msgspec.Struct, tag="submit", array_like=True, frozen=True):
    """Create a job, unless ``key`` already made one (then answer with that job)."""

    job_id: bytes  # 16 bytes, chosen by the proposing leader
    key: bytes  # the client's idempotency key (16 bytes)
    digest: bytes  # BLAKE2b of (kind, spec): a reused key with another body is refused
    kind: str
    spec: dict[str, Any]
    client: str
    now: float


class CancelJob(msgspec.Struct, tag="cancel", array_like=True, frozen=True):
    """Stop a job: its unfinished tasks will not run (running ones finish unrecorded)."""

    job_id: bytes
    reason: str
    now: float


class AssignTasks(msgspec.Struct, tag="assign", array_like=True, frozen=True):
    """The leader hands ready tasks to the active balancer. Task ``i`` gets the fencing token
    (``term``, ``first_sequence + i``); tokens only grow, so a deposed leader's late assignment
    (an older token) is refused."""

    term: int
    first_sequence: int
    balancer: str
    tasks: list[tuple[bytes, int]]  # (job id, task id)
    now: float


class CompleteTask(msgspec.Struct, tag="complete", array_like=True, frozen=True):
    """An attempt ended (``outcome`` as in TASK_RESULT). Recorded once per task. ``files`` are
    what the worker stored, ``[file id (16 bytes), size, [storage node names], name]`` each, as
    in TASK_RESULT; the ledger checks them (the core does too, earlier) and registers them with
    the job when the completion ends the task."""

    job_id: bytes
    task_id: int
    fence_term: int
    fence_sequence: int
    outcome: int
    worker: str
    summary: dict[str, Any]
    result_file: bytes | None
    error: str | None
    now: float
    # appended: a new field goes last with a default, so older log entries still decode
    files: list[list[Any]] = []


class RegisterFile(msgspec.Struct, tag="file", array_like=True, frozen=True):
    """A file is durable on ``replicas`` (storage node names). ``owner`` (a job id, or None for
    a user's pin) refers to it under ``name``. ``add_ref`` False only adds replicas (a repair)."""

    file_id: bytes
    size: int
    replicas: list[str]
    owner: bytes | None
    now: float
    name: str = ""
    add_ref: bool = True


class ReleaseFile(msgspec.Struct, tag="release_file", array_like=True, frozen=True):
    """Drop ``owner``'s reference (None: the user pin) on ``file_id``, or on every file of
    ``owner`` when ``file_id`` is None. A file left with no reference leaves the ledger, and
    the storage nodes' collector deletes it."""

    file_id: bytes | None
    owner: bytes | None
    now: float


class DropFile(msgspec.Struct, tag="drop_file", array_like=True, frozen=True):
    """Forget a file whatever refers to it (an operator's override; storage deletes it)."""

    file_id: bytes
    now: float


class Barrier(msgspec.Struct, tag="barrier", array_like=True, frozen=True):
    """A new leader's first entry (Raft §8): once it commits, the leader knows every earlier
    entry is committed too and may serve."""

    term: int
    leader: str
    now: float


class AddWorkSpec(msgspec.Struct, tag="workspec", array_like=True, frozen=True):
    """Create a work spec (``master.workspec.validate_spec``); its name must be new."""

    spec: dict[str, Any]
    now: float


class AddUnits(msgspec.Struct, tag="units", array_like=True, frozen=True):
    """Add a batch of work units (``[key, data]`` or ``[key, data, priority]``) to spec
    ``spec``: all of them, or none when one is malformed or its key is already there."""

    spec: str
    units: list[Any]
    now: float
    key: bytes | None = None  # the batch's idempotency key: a resent batch is answered, not added twice


class ControlSpec(msgspec.Struct, tag="control", array_like=True, frozen=True):
    """An operator's action on a spec: ``pause``, ``resume``, ``prioritize`` (``value``: the
    new priority), ``weight`` (``value``: the new weight) or ``retry`` (its failed units)."""

    spec: str
    action: str
    now: float
    value: Any = None


class ExpireLeases(msgspec.Struct, tag="expire_leases", array_like=True, frozen=True):
    """The leader's clock says some work units' leases ended before ``now``: each such unit's
    attempt ends LOST (its worker is alive but has not finished in ``lease_s``), and the unit is
    available again, or failed once its attempts ran out. A late result under the old token is
    then refused as stale."""

    now: float


class MakeUnits(msgspec.Struct, tag="make_units", array_like=True, frozen=True):
    """The leader's clock says continuous specs ``specs`` are due: each that still has no unit
    waiting or running, and whose ``interval`` has passed since its last one, gets a unit keyed
    by ``now`` (checked again here, so a repeated proposal makes nothing twice)."""

    specs: list[str]
    now: float


class CompactJobs(msgspec.Struct, tag="compact_jobs", array_like=True, frozen=True):
    """Forget the jobs that ended before ``before`` (wall seconds): their records, specs,
    idempotency keys and file references (the retention, like etcd's compaction and Slurm's
    accounting purge). The leader proposes it; the cut-off travels in the command, so every
    master forgets the same jobs."""

    before: float
    now: float


Command = (SubmitJob | CancelJob | AssignTasks | CompleteTask | RegisterFile | ReleaseFile | DropFile | Barrier
           | AddWorkSpec | AddUnits | ControlSpec | ExpireLeases | MakeUnits | CompactJobs)


class Batch(msgspec.Struct, tag="batch", array_like=True, frozen=True):
    """Several commands in one log entry: one Raft round for many submits or completions."""

    commands: list[Command]


Entry = Command | Batch

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


def encode(entry: Entry) -> bytes:
    """The bytes of one log entry."""
    return _encoder.encode(entry)


def decode(data: bytes) -> Entry:
    """A log entry from its bytes; raises ``msgspec.ValidationError``/``DecodeError`` if malformed."""
    return _decoder.decode(data)
