"""The message catalogue: every message of the system, in one place.

Each class is one message type. Its docstring says what it means; ``sender``/``receiver`` say
who sends it to whom; fields annotated with a C type (``U64`` …) form its packed header
(``struct_name`` in ``cluster_proto.h``), the others its MessagePack body, in order.

Evolution (also in doc/protocol.md):
- Type codes are never reused. A new message type takes a new code; nodes that do not know it
  reject it as UNKNOWN_TYPE, so send it only to peers whose status reports a version that has it.
- A new body field may be appended at the end of a body with a default; older receivers ignore
  trailing body fields they do not know, newer receivers fill in the default when it is absent.
- Any other change (a header field added, removed, resized or reordered; a body field removed,
  retyped or made required) changes the wire for every peer and bumps ``PROTOCOL_VERSION``.
  Peers of different versions refuse each other's messages (BAD_VERSION) and say so in the log.

The seed structs are kept under their seed names: ``worker_request`` (the task assignment:
job uuid, program_length, num_input_files), ``worker_status``, ``file_request``, ``file_response``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from proto.types import I32, U8, U16, U32, U64, Message, Payload

# ---- every node ----------------------------------------------------------------------------


class Error(Message, frozen=True, gc=False):
    """The receiver refused a message: ``reason`` is a ``proto.errors.Reason`` code (or an
    application code ≥ 1000), ``refers_to`` the refused message type (0 if unknown)."""

    code = 1
    struct_name = "error_message"
    sender = "any node"
    receiver = "the peer whose message it refused"

    request_id: U64
    reason: U16
    refers_to: U8
    text: str
    detail: dict[str, Any] = {}


class StatusQuery(Message, frozen=True, gc=False):
    """Ask a node for its status; every node answers with STATUS_REPLY."""

    code = 2
    struct_name = "status_query"
    sender = "CLI, operators, any node"
    receiver = "any node"

    request_id: U64


class StatusReply(Message, frozen=True, gc=False):
    """A node's role, uptime, version, counters and role-specific detail."""

    code = 3
    struct_name = "status_reply"
    sender = "any node"
    receiver = "whoever sent STATUS_QUERY"

    request_id: U64
    uptime_ms: U64
    pid: U32
    role: str
    version: str
    counters: dict[str, int]
    detail: dict[str, Any] = {}


class Heartbeat(Message, frozen=True, gc=False):
    """Liveness, both ways (zguide ch. 4, Paranoid Pirate). ``epoch`` is the sender's term or
    Binary Star epoch, ``sequence`` counts its heartbeats; a reply echoes the sequence."""

    code = 4
    struct_name = "heartbeat"
    sender = "workers, balancers, probes"
    receiver = "their peers"

    epoch: U64
    sequence: U64
    reply: U8


class ActFor(Message, frozen=True, gc=False):
    """A gateway's request made for one of its own users: ``frames`` are a whole message (as the
    codec encodes it), handled as if ``owner`` had sent it with a client key. Only a gateway key
    may send it; the owner it acts for is ``GATEWAY/owner`` (the gateway's key name, a slash,
    ``owner``), so a gateway acts for its own users and never for another key. Replies go to the
    gateway, as to any request."""

    code = 5
    struct_name = "act_for"
    sender = "gateways"
    receiver = "masters, storage nodes"

    owner: str
    frames: list[bytes]


# ---- client ⇄ masters ----------------------------------------------------------------------


class Submit(Message, frozen=True, gc=False):
    """Submit a job. The idempotency key makes a retried submit land once (etcd-style)."""

    code = 10
    struct_name = "submit"
    sender = "client"
    receiver = "master leader"

    request_id: U64
    idempotency_key_upper: U64
    idempotency_key_lower: U64
    kind: str
    spec: dict[str, Any]


class SubmitAck(Message, frozen=True, gc=False):
    """The job is committed by a quorum of masters at ``log_index``."""

    code = 11
    struct_name = "submit_ack"
    sender = "master leader"
    receiver = "client"

    request_id: U64
    job_uuid_upper: U64
    job_uuid_lower: U64
    log_index: U64


class NotLeader(Message, frozen=True, gc=False):
    """This master is not the leader; try ``leader`` (an address, or none while electing)."""

    code = 12
    struct_name = "not_leader"
    sender = "master follower"
    receiver = "client, balancer"

    request_id: U64
    term: U64
    leader: str | None = None


class CancelJob(Message, frozen=True, gc=False):
    """Cancel a job; answered with QUERY_REPLY (the job's view) once the cancel is committed."""

    code = 13
    struct_name = "cancel_job"
    sender = "client"
    receiver = "master leader"

    request_id: U64
    job_uuid_upper: U64
    job_uuid_lower: U64
    reason: str = ""


class JobQuery(Message, frozen=True, gc=False):
    """A job's state and progress; answered with QUERY_REPLY by any master."""

    code = 14
    struct_name = "job_query"
    sender = "client"
    receiver = "any master"

    request_id: U64
    job_uuid_upper: U64
    job_uuid_lower: U64


class JobList(Message, frozen=True, gc=False):
    """The newest ``limit`` jobs, optionally only those in ``state``; answered with QUERY_REPLY."""

    code = 15
    struct_name = "job_list"
    sender = "client"
    receiver = "any master"

    request_id: U64
    limit: U32
    state: str | None = None


class TaskQuery(Message, frozen=True, gc=False):
    """One task's state, attempts and result reference; answered with QUERY_REPLY."""

    code = 16
    struct_name = "task_query"
    sender = "client"
    receiver = "any master"

    request_id: U64
    job_uuid_upper: U64
    job_uuid_lower: U64
    task_id: U64


class QueryReply(Message, frozen=True, gc=False):
    """The answer to a read. ``stale`` is 1 unless a leader with a quorum answered: a follower
    or a cut-off master answers from what it has, which may be behind."""

    code = 17
    struct_name = "query_reply"
    sender = "master"
    receiver = "client"

    request_id: U64
    stale: U8
    term: U64
    log_index: U64
    value: Any
    leader: str | None = None


class Watch(Message, frozen=True, gc=False):
    """Wait for tasks of ``jobs`` to end (a long poll). ``jobs`` maps a job id to a cursor: how
    many of its task endings the client has seen. The leader answers (QUERY_REPLY) as soon as
    any listed job has endings past its cursor or is over, or after ``wait_ms``; the reply maps
    each job id (hex) to its state, new cursor and the tasks that ended (state, summary, result
    file, error). Endings are in the ledger, so a watch resumes on a new leader unchanged."""

    code = 18
    struct_name = "watch"
    sender = "client"
    receiver = "master leader"

    request_id: U64
    wait_ms: U32
    jobs: dict[bytes, int]


class Work(Message, frozen=True, gc=False):
    """Work specs and units (Coordinate's model, ``master.workspec``). Writes go to the leader
    and are answered (QUERY_REPLY) once committed: ``add_spec`` (``body``: the spec),
    ``add_units`` (``body``: a list of ``[key, data]`` or ``[key, data, priority]``, all or none;
    ``key``: the batch's idempotency key, so a resent batch lands once), ``control`` (``body``:
    ``{"action": pause|resume|prioritize|weight|retry, "value": ...}``). Reads any master answers
    from what it has: ``summary`` (per spec: keys and units per state) and ``units`` (``body``:
    ``{"state", "limit", "min_attempts", "after"}``: units with their attempts)."""

    code = 19
    struct_name = "work"
    sender = "client"
    receiver = "master leader"

    request_id: U64
    op: str
    spec: str = ""
    body: Any = None
    key: bytes | None = None


class FileRegister(Message, frozen=True, gc=False):
    """Record that a file is durable on ``replicas`` (storage node names) and who refers to it:
    the job ``owner`` (under ``name`` in its listing) and/or a user ``pin``. A file nothing
    refers to is deleted by the storage nodes. Answered with QUERY_REPLY once committed."""

    code = 40
    struct_name = "file_register"
    sender = "client, storage (repair)"
    receiver = "master leader"

    request_id: U64
    file_id_upper: U64
    file_id_lower: U64
    size: U64
    pin: U8
    replicas: list[str]
    owner: bytes | None = None
    name: str = ""


class FileLookup(Message, frozen=True, gc=False):
    """Where are these files and who refers to them? QUERY_REPLY value: hex id → record or None."""

    code = 41
    struct_name = "file_lookup"
    sender = "client, worker, storage"
    receiver = "master"

    request_id: U64
    ids: list[bytes]


class FileList(Message, frozen=True, gc=False):
    """List registered files (of one job when ``owner`` is set), in id order after ``after``."""

    code = 42
    struct_name = "file_list"
    sender = "client, worker"
    receiver = "master"

    request_id: U64
    limit: U32
    owner: bytes | None = None
    after: bytes | None = None


class FileRelease(Message, frozen=True, gc=False):
    """Drop a reference: ``owner``'s (a job) or the user pin (``owner`` none) on ``file_id``, or
    every file of ``owner`` when ``file_id`` is none. Files left without a reference are dropped
    from the ledger and deleted by the storage nodes' collector."""

    code = 43
    struct_name = "file_release"
    sender = "client"
    receiver = "master leader"

    request_id: U64
    file_id: bytes | None = None
    owner: bytes | None = None


# ---- masters ⇄ balancers ⇄ workers ---------------------------------------------------------


class WorkerRequest(Message, frozen=True, gc=False):
    """Run a task (the seed's ``worker_request``). ``fence_term``/``fence_sequence`` are the
    fencing token: receivers refuse tokens older than the newest they have seen."""

    code = 20
    struct_name = "worker_request"
    sender = "balancer (for the master leader)"
    receiver = "worker"

    job_uuid_upper: U64
    job_uuid_lower: U64
    task_id: U64
    fence_term: U64
    fence_sequence: U64
    program_length: U32
    num_input_files: U32
    kind: str
    program: bytes
    input_files: list[bytes]
    arguments: dict[str, Any] = {}

    def problem(self) -> str | None:
        """The seed's lengths must agree with what the body carries."""
        if self.program_length != len(self.program):
            return f"program_length is {self.program_length}, the program has {len(self.program)} bytes"
        if self.num_input_files != len(self.input_files):
            return f"num_input_files is {self.num_input_files}, the body lists {len(self.input_files)}"
        bad = [i for i, f in enumerate(self.input_files) if len(f) != 16]
        if bad:
            return f"input_files[{bad[0]}] is not a 16-byte file id"
        return None


class Outcome(IntEnum):
    """How a task's attempt ended: TASK_RESULT's ``outcome``, and the ledger's ``CompleteTask``.
    One vocabulary for the worker, the balancer and the masters. These numbers are on the wire
    and in the Raft log: never renumber. (A work unit's attempt history numbers its outcomes
    otherwise, in its snapshot columns: ``master.work_history.AttemptOutcome``.)"""

    DONE = 0
    FAILED = 1
    CANCELLED = 2
    LOST = 3


class TaskResult(Message, frozen=True, gc=False):
    """A task ended. ``outcome``: 0 done, 1 failed, 2 cancelled, 3 lost. Results live in
    storage (``result_file``, a 16-byte file id); the ledger keeps ``summary``."""

    code = 21
    struct_name = "task_result"
    sender = "worker"
    receiver = "balancer, then master leader"

    job_uuid_upper: U64
    job_uuid_lower: U64
    task_id: U64
    fence_term: U64
    fence_sequence: U64
    outcome: U8
    exit_code: I32
    summary: dict[str, Any]
    result_file: bytes | None = None
    error: str | None = None
    worker: str = ""  # the worker that ran it, filled in by the balancer
    # Files the task wrote to storage, registered with the job when the result is recorded:
    # [file id (16 bytes), size, [storage node names], name].
    files: list[list[Any]] = []


class ResultAck(Message, frozen=True, gc=False):
    """The task's completion is committed in the ledger; the worker may forget it. ``more``
    acknowledges further results in the same message, each ``[job uuid upper, lower, task id,
    fence term, fence sequence]``: one commit records many results, and one message per task
    on two hops was most of the acknowledgement's cost."""

    code = 22
    struct_name = "result_ack"
    sender = "master leader, via balancer"
    receiver = "worker"

    job_uuid_upper: U64
    job_uuid_lower: U64
    task_id: U64
    fence_term: U64
    fence_sequence: U64
    more: list[list[int]] = []

    def acks(self) -> list[tuple[int, int, int, int, int]]:
        """Every result acknowledged: (job upper, job lower, task, term, sequence)."""
        first = (self.job_uuid_upper, self.job_uuid_lower, self.task_id, self.fence_term, self.fence_sequence)
        return [first] + [tuple(a) for a in self.more]


class WorkerStatus(Message, frozen=True, gc=False):
    """A worker's capacity and capabilities (the seed's ``worker_status``), and its heartbeat.

    With ``register`` set it (re)registers: ``capabilities`` (cores, memory_mb, gpus, kernel),
    ``cache_add`` the whole cache and ``tasks`` every task it still runs or holds a result of
    (``[job id, task id, fence term, fence sequence]``), so a balancer that just took over
    learns them. Without it, it is the worker's heartbeat: ``slots_free`` now, ``received`` the
    WORKER_REQUESTs it has had since registering (so credit in flight is not counted twice), and
    the cache changes since the last one."""

    code = 23
    struct_name = "worker_status"
    sender = "worker"
    receiver = "balancer"

    slots_total: U32
    slots_free: U32
    memory_free: U64
    running: U32
    labels: list[str] = []
    capabilities: dict[str, Any] = {}
    name: str = ""
    register: bool = False
    received: int = 0
    tasks: list[list[Any]] = []
    cache_add: list[bytes] = []
    cache_drop: list[bytes] = []


class Credit(Message, frozen=True, gc=False):
    """Flow-control credit (zguide ch. 7, FileMQ): the receiver grants ``amount`` more units
    (``unit`` 0: task slots, 1: bytes) on ``stream``; nothing is sent beyond it."""

    code = 24
    struct_name = "credit"
    sender = "workers (slots), storage receivers (bytes)"
    receiver = "balancer, uploaders"

    stream: U64
    amount: U64
    unit: U8


class Attach(Message, frozen=True, gc=False):
    """A balancer becomes the master leader's dispatcher. ``epoch`` is its Binary Star epoch
    (a newer one replaces an older one, an older one is refused); ``credit`` is how many tasks
    it can take now (CREDIT adds more). Answered with ATTACHED, then the leader streams
    WORKER_REQUEST messages: first the open assignments again, then ready tasks within credit."""

    code = 25
    struct_name = "attach"
    sender = "active balancer"
    receiver = "master leader"

    request_id: U64
    epoch: U64
    credit: U32
    name: str


class TaskWaiting(Message, frozen=True, gc=False):
    """The tasks the balancer holds and cannot place yet, and why (Slurm's REASON): ``jobs``
    has one ``[job id (16 bytes), tasks, reason]`` per job and distinct need, at most a few
    hundred; ``total`` counts every task it holds unplaced. Sent about once a second while any
    wait (and once more when none do), on the attached stream. Soft state: the leader shows it
    in job views, and forgets it when the balancer falls silent."""

    code = 44
    struct_name = "task_waiting"
    sender = "balancer"
    receiver = "master leader"

    total: U64
    jobs: list[list[Any]]


class OutputFollow(Message, frozen=True, gc=False):
    """Ask a worker for the output lines of a task it runs (or ran lately) after line ``after``
    (0: from the first it still holds). Answered with OUTPUT_LINES. Output never passes through
    masters or balancers: a follower asks the worker's own port (its ``output`` endpoint, in
    the balancer's worker list)."""

    code = 45
    struct_name = "output_follow"
    sender = "clients (the task's owner), operators, monitors"
    receiver = "worker (its control port)"

    request_id: U64
    job_uuid_upper: U64
    job_uuid_lower: U64
    task_id: U64
    after: U64


class OutputLines(Message, frozen=True, gc=False):
    """A task's output lines after OUTPUT_FOLLOW's ``after``: ``lines`` are ``[seq, time (Unix
    seconds, when the worker read it), stream (1 stdout, 2 stderr), text]``; ``next`` is the
    ``after`` to ask with next; ``dropped`` counts lines lost to the worker's bound before the
    first one here. ``status``: 0 running, 1 ended (nothing will follow ``next``), 2 not here
    (this worker neither runs nor lately ran it)."""

    code = 46
    struct_name = "output_lines"
    sender = "worker"
    receiver = "whoever sent OUTPUT_FOLLOW"

    request_id: U64
    next: U64
    dropped: U64
    status: U8
    lines: list[list[Any]]


class Attached(Message, frozen=True, gc=False):
    """The leader accepted the balancer; its assignments carry fencing tokens of ``term``."""

    code = 26
    struct_name = "attached"
    sender = "master leader"
    receiver = "balancer"

    request_id: U64
    term: U64
    open_assignments: U32
    leader: str


class PeerState(Message, frozen=True, gc=False):
    """A balancer's Binary Star heartbeat to its peer: its ``state`` (balancer.binary_star.State:
    1 primary, 2 backup, 3 active, 4 passive) and ``epoch`` (grows each time one becomes
    active; the masters fence balancers by it). ``workers`` is the endpoint workers use, so a
    passive one can send them to the active one; ``workers_registered`` how many workers it
    has registered (-1 from a sender that does not say), so that an active one that reaches
    none can be taken over from (balancer.binary_star); ``clock_ms`` the sender's monotonic
    clock when it sent it (-1: not said), so that heartbeats a healed link delivers late are
    known for stale."""

    code = 27
    struct_name = "peer_state"
    sender = "balancer"
    receiver = "its peer balancer"

    state: U8
    epoch: U64
    sequence: U64
    name: str
    workers: str = ""
    workers_registered: int = -1
    clock_ms: int = -1


class MessageBatch(Message, frozen=True, gc=False):
    """Many messages for one peer in one (issue 23): ``items`` are ``count`` whole messages, each
    as the codec encodes its frame 0 (none carries raw frames). The receiver handles each alone,
    as if it had come by itself from the same sender on the same connection: every task keeps its
    own fence and is accepted or refused alone, and a malformed item is refused alone. Only the
    task path's types ride a batch (``BATCHABLE``); a batch in a batch, or any other type
    inside, is refused as UNEXPECTED. A node's loop sends one when it holds more than one such
    message for the same peer at the end of one turn of its loop: an idle path sends a lone
    message as itself, so batching adds no delay; under load a turn's messages travel together
    (at most ``BATCH_MAX_ITEMS`` items, ``BATCH_MAX_BYTES`` bytes)."""

    code = 47
    struct_name = "message_batch"
    sender = "masters, balancers, workers"
    receiver = "their peers on the task path"

    count: U32
    items: list[bytes]

    def problem(self) -> str | None:
        if self.count != len(self.items):
            return f"count is {self.count}, the body carries {len(self.items)} items"
        if self.count > BATCH_MAX_ITEMS:
            return f"{self.count} items, at most {BATCH_MAX_ITEMS} ride one batch"
        return None


BATCH_MAX_ITEMS = 1024  # items in one MESSAGE_BATCH at most
BATCH_MAX_BYTES = 1 << 20  # a batch is cut before its items pass this many bytes
# What may ride a MESSAGE_BATCH: only what masters, balancers and workers (node loops all) send
# each other per task. Never what a client or a probe receives: they read messages one by one.
BATCHABLE: frozenset[type[Message]] = frozenset({WorkerRequest, TaskResult, ResultAck, Credit})


# ---- storage (proto.storage_messages, re-exported here) ------------------------------------

from proto.storage_messages import (  # noqa: E402 - the catalogue below lists them with the rest
    FileChunk,
    FileRequest,
    FileResponse,
    UploadCredit,
    UploadDone,
    UploadOpen,
    UploadReady,
)


CATALOGUE: tuple[type[Message], ...] = (
    Error,
    StatusQuery,
    StatusReply,
    Heartbeat,
    ActFor,
    Submit,
    SubmitAck,
    NotLeader,
    CancelJob,
    JobQuery,
    JobList,
    TaskQuery,
    QueryReply,
    Watch,
    Work,
    WorkerRequest,
    TaskResult,
    ResultAck,
    WorkerStatus,
    Credit,
    TaskWaiting,
    OutputFollow,
    OutputLines,
    Attach,
    Attached,
    PeerState,
    MessageBatch,
    FileRequest,
    FileResponse,
    FileChunk,
    UploadOpen,
    UploadReady,
    UploadCredit,
    UploadDone,
    FileRegister,
    FileLookup,
    FileList,
    FileRelease,
)
