"""The client API of a master: submits, cancels, file registrations and the reads.

Theory of operation
-------------------
Writes (SUBMIT, CANCEL_JOB, FILE_REGISTER, FILE_RELEASE) reach only the leader; a follower
answers NOT_LEADER with the leader's client address (``Standing.writable``). The leader checks
what it can before it costs a Raft round, queues the command (``master.batching``) and answers
once it has committed (``answer``): SUBMIT_ACK, a QUERY_REPLY with the result, or an ERROR.
A submit whose idempotency key the ledger already holds is answered at once, from the ledger;
one whose proposal fails is answered OUTCOME_UNKNOWN and the client retries with the same key.

Admission (backpressure): the leader holds at most ``MAX_PENDING_TASKS`` pending tasks per
client (``ClientLoad``). A new submit that would take its owner past that is refused, before it
costs a Raft round, with REFUSED ``too_many_pending`` (nothing changed): the client waits for some
of its tasks to end and submits again with the same idempotency key (``Client.map`` keeps
itself under its own, smaller window and never meets it).

Reads (JOB_QUERY, JOB_LIST, TASK_QUERY, FILE_LOOKUP, FILE_LIST) are answered by any master from
its own ledger (``master.views``); ``stale`` is 0 only when a serving leader with a quorum
answers. TASK_QUERY's reply carries the task's ``story`` (``MasterCore.story``): the ledger's
record on every master, and the leader's log of what it saw. HEARTBEAT is answered by every
master with its Raft term (balancers use it to notice a dead or deposed leader).

Handlers take ``(event, message, now)`` and return effects; pure, like the core that holds them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import msgspec

from cluster.node.events import Effect, MessageReceived, Send
from master import jobs, views
from master.batching import Batcher
from master.commands import CancelJob as CancelCommand
from master.commands import RegisterFile, ReleaseFile, SubmitJob
from master.joblife import spec_digest
from master.ledger import Ledger
from master.standing import API, MAX_LIST, Standing, app_error, app_error_to, not_owner, owns
from master.pending import WaitingBoard
from master.state import Applied, Job, JobState, LedgerState, pin_owner
from proto.errors import AppReason
from proto.ids import join128, split128
from proto.messages import (
    CancelJob,
    FileList,
    FileLookup,
    FileRegister,
    FileRelease,
    Heartbeat,
    JobList,
    JobQuery,
    QueryReply,
    Submit,
    SubmitAck,
    TaskQuery,
)

MAX_LOOKUP = 10_000  # file ids per FILE_LOOKUP
# A client's pending tasks the leader admits: 10× Client.map's default window, so several maps
# (or processes) under one key fit, while one careless loop cannot fill the masters' memory.
MAX_PENDING_TASKS = 100_000
LOAD_RECOUNT_S = 0.25  # how old a client's count may be before a submit counts its jobs again
TOO_MANY_PENDING = "too_many_pending"  # the ERROR detail code of the refusal (the client backs off on it)


def job_id_for(key: bytes) -> bytes:
    """A job's id, derived from its idempotency key so every leader picks the same one."""
    return hashlib.blake2b(key, digest_size=16, person=b"cluster-job").digest()


def held_tasks(job: Job) -> int:
    """The tasks ``job`` makes the ledger hold for its client now: a list job's unfinished tasks
    (their arguments are data in its spec); a range or grid job's live records (its tasks are made
    by rule, at most ``jobs.WINDOW`` at a time), at least 1 while it waits for other jobs."""
    if job.state != JobState.ACTIVE:
        return 0
    if job.kind == "list":
        return job.total - job.done - job.failed
    return max(1, job.live)


def submit_cost(kind: str, spec: dict[str, Any]) -> int:
    """What a new job (its validated ``spec``) adds to ``held_tasks`` of its client."""
    if kind == "list":
        return len(spec["tasks"])
    return max(1, min(spec["count"] if kind == "range" else spec["rows"] * spec["cols"], jobs.WINDOW))


class ClientLoad:
    """Each client's pending tasks on this leader, for admission (the module doc).

    A client's pending tasks: ``held_tasks`` summed over its active jobs, plus the tasks of its
    submits queued or proposed and not yet answered (``in_flight``). Its jobs are indexed by
    client as they appear in the ledger (jobs are added in ``Job.seq`` order, so the new ones are
    the last: a look from the newest back), and counted again at most every ``LOAD_RECOUNT_S``
    (what commits in between is added to the count; tasks that end in between lower it only at
    the next count, so the bound errs on the strict side). A restored snapshot is a new
    ``LedgerState``: it is indexed anew. A single job over the limit is admitted when its client
    has nothing pending, else it could never run."""

    def __init__(self, limit: int = MAX_PENDING_TASKS) -> None:
        self.limit = limit
        self.state: LedgerState | None = None  # the ledger state indexed
        self.seq = 0  # the newest job indexed
        self.jobs: dict[str, dict[bytes, None]] = {}  # client → its jobs, active when last looked at
        self.counted: dict[str, tuple[float, int]] = {}  # client → (when, pending tasks then)
        self.in_flight: dict[str, int] = {}  # client → tasks of its submits not yet answered

    def refusal(self, state: LedgerState, client: str, cost: int, now: float) -> str | None:
        """Why a submit of ``cost`` tasks by ``client`` is refused now, or None to admit it."""
        pending = self.pending(state, client, now)
        if pending == 0 or pending + cost <= self.limit:
            return None
        return (f"you have {pending:,} tasks pending (submitted, not ended); the masters hold at most "
                f"{self.limit:,} per client and this job has {cost:,}: submit it again once some have ended")

    def pending(self, state: LedgerState, client: str, now: float) -> int:
        """``client``'s pending tasks, counted again if the count is older than LOAD_RECOUNT_S."""
        counted = self.counted.get(client)
        if counted is None or now - counted[0] >= LOAD_RECOUNT_S or state is not self.state:
            self._index(state)
            mine = self.jobs.get(client, {})
            for job_id in [j for j in mine if j not in state.jobs or state.jobs[j].state != JobState.ACTIVE]:
                del mine[job_id]
            if not mine:
                self.jobs.pop(client, None)
            counted = (now, sum(held_tasks(state.jobs[j]) for j in mine))
            self.counted[client] = counted
        return counted[1] + self.in_flight.get(client, 0)

    def proposed(self, client: str, cost: int) -> None:
        """A submit of ``cost`` tasks was admitted and queued."""
        self.in_flight[client] = self.in_flight.get(client, 0) + cost

    def answered(self, client: str, cost: int, committed: bool) -> None:
        """A submit admitted earlier was answered: it committed (a new job) or not."""
        left = self.in_flight.get(client, 0) - cost
        if left > 0:
            self.in_flight[client] = left
        else:
            self.in_flight.pop(client, None)
        counted = self.counted.get(client)
        if committed and counted is not None:  # its job counts from now, until the next count sees it
            self.counted[client] = (counted[0], counted[1] + cost)

    def _index(self, state: LedgerState) -> None:
        """Add the jobs that appeared since the last look (all of them, for a new state)."""
        if state is not self.state:
            self.state, self.seq, self.jobs, self.counted = state, 0, {}, {}
        if state.job_seq == self.seq:
            return
        new = []
        for job in reversed(state.jobs.values()):
            if job.seq <= self.seq:
                break
            if job.state == JobState.ACTIVE:
                new.append(job)
        for job in reversed(new):
            self.jobs.setdefault(job.client, {})[job.job_id] = None
        self.seq = state.job_seq


class ClientApi:
    """The client messages' handlers, over the shared ledger, standing and write queue."""

    def __init__(self, ledger: Ledger, standing: Standing, batcher: Batcher,
                 story: Callable[[bytes, int], list[dict[str, Any]]] | None = None,
                 waiting: WaitingBoard | None = None) -> None:
        self.ledger = ledger
        self.waiting = waiting if waiting is not None else WaitingBoard()
        self.standing = standing
        self.batcher = batcher
        self.story = story  # a task's story for TASK_QUERY (the core's: ledger and leader's log)
        self.load = ClientLoad()  # admission: each client's pending tasks

    # ---- writes --------------------------------------------------------------------------

    def on_submit(self, ev: MessageReceived, m: Submit, now: float) -> list[Effect]:
        refusal = self.standing.writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        key = join128(m.idempotency_key_upper, m.idempotency_key_lower)
        try:
            encoded = msgspec.msgpack.encode(m.spec)
            spec = jobs.validate_spec(m.kind, m.spec, len(encoded))
        except jobs.SpecError as exc:
            return [app_error(ev, m.request_id, AppReason.REFUSED, exc.code, exc.text)]
        digest = spec_digest(m.kind, m.spec)
        known = self.ledger.state.keys.get(key)
        if known is not None:  # already committed: answer now, from the ledger
            if known[0] != digest:
                return [app_error(ev, m.request_id, AppReason.REFUSED, "idempotency_conflict",
                                  f"idempotency key {key.hex()} was used for another job with a different body")]
            upper, lower = split128(known[1])
            return [Send(API, SubmitAck(m.request_id, upper, lower, self.standing.view.last_applied), ev.route, ev.stimulus_id)]
        # the job's owner: the submitting key's name (without keys, the client's node id)
        client = ev.peer.name or f"node:{ev.sender:032x}"
        cost = submit_cost(m.kind, spec)
        refusal = self.load.refusal(self.ledger.state, client, cost, now)
        if refusal is not None:
            self.standing.count("refused_too_many_pending")
            return [app_error(ev, m.request_id, AppReason.REFUSED, TOO_MANY_PENDING, refusal)]
        self.load.proposed(client, cost)
        command = SubmitJob(job_id_for(key), key, digest, m.kind, m.spec, client, self.standing.wall(now))
        return self.batcher.enqueue(command, ("submit", ev.route, m.request_id, client, cost), ev.stimulus_id, now)

    def on_cancel(self, ev: MessageReceived, m: CancelJob, now: float) -> list[Effect]:
        refusal = self.standing.writable(ev, m.request_id, grows=False)
        if refusal is not None:
            return [refusal]
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        job = self.ledger.state.jobs.get(job_id)
        if job is None:
            return [app_error(ev, m.request_id, AppReason.NOT_FOUND, "unknown_job", f"no job {job_id.hex()}")]
        if not owns(ev.peer, job.client):
            return [not_owner(ev, m.request_id, job_id)]
        command = CancelCommand(job_id, m.reason, self.standing.wall(now))
        return self.batcher.enqueue(command, ("cancel", ev.route, m.request_id), ev.stimulus_id, now)

    def on_file_register(self, ev: MessageReceived, m: FileRegister, now: float) -> list[Effect]:
        refusal = self.standing.writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        file_id = join128(m.file_id_upper, m.file_id_lower)
        foreign = self._foreign_job(ev, m.owner)
        if foreign is not None:
            return [not_owner(ev, m.request_id, foreign)]
        # pin=0 without an owner is a repair: it adds replicas and no reference. A pin is the
        # sender's own (its key's; without keys the one shared pin)
        owner = m.owner if m.owner is not None else (pin_owner(ev.peer.name) or None if m.pin else None)
        command = RegisterFile(file_id, m.size, list(m.replicas), owner, self.standing.wall(now), m.name,
                               add_ref=bool(m.pin or m.owner))
        return self.batcher.enqueue(command, ("write", ev.route, m.request_id), ev.stimulus_id, now)

    def on_file_release(self, ev: MessageReceived, m: FileRelease, now: float) -> list[Effect]:
        refusal = self.standing.writable(ev, m.request_id, grows=False)
        if refusal is not None:
            return [refusal]
        foreign = self._foreign_job(ev, m.owner)
        if foreign is not None:
            return [not_owner(ev, m.request_id, foreign)]
        # no job named: the file's pin by this key (an operator, too, releases only its own pins)
        owner = m.owner if m.owner is not None or m.file_id is None else (pin_owner(ev.peer.name) or None)
        command = ReleaseFile(m.file_id, owner, self.standing.wall(now))
        return self.batcher.enqueue(command, ("write", ev.route, m.request_id), ev.stimulus_id, now)

    # ---- answers to the writes, once they committed (or not) --------------------------------

    def answer(self, reply: tuple, result: Applied, log_index: int, now: float, cause: str) -> list[Effect]:
        """A ``submit``, ``cancel`` or ``write`` reply: the command committed with ``result``."""
        kind, route, request_id = reply[:3]
        if kind == "submit":
            self.load.answered(reply[3], reply[4], result.ok and bool(result.value.get("created")))
        if not result.ok:
            return [app_error_to(route, request_id, AppReason.REFUSED, result.code, result.text, cause)]
        if kind == "submit":
            upper, lower = split128(result.value["job"])
            self.standing.count("submits_committed")
            return [Send(API, SubmitAck(request_id, upper, lower, log_index), route, cause)]
        value = views.job_view(self.ledger.state, result.value["job"]) if kind == "cancel" else result.value
        reply_value = QueryReply(request_id, 0, self.standing.view.term, log_index, value, self.standing.leader_address())
        return [Send(API, reply_value, route, cause)]

    def unknown(self, reply: tuple, reason: str, cause: str) -> list[Effect]:
        """The write's proposal did not commit here: the client retries with the same key."""
        if reply[0] == "submit":
            self.load.answered(reply[3], reply[4], False)
        return [app_error_to(reply[1], reply[2], AppReason.OUTCOME_UNKNOWN, "outcome_unknown",
                             f"the write may or may not have committed ({reason}); retry with the same idempotency key",
                             cause)]

    def not_leader(self, reply: tuple, cause: str) -> list[Effect]:
        """The write was queued when this master stopped leading."""
        if reply[0] == "submit":
            self.load.answered(reply[3], reply[4], False)
        return [self.standing.not_leader(reply[2], reply[1], cause)]

    # ---- reads ---------------------------------------------------------------------------

    def on_job_query(self, ev: MessageReceived, m: JobQuery, now: float) -> list[Effect]:
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        view = views.job_view(self.ledger.state, job_id)
        if view is None:
            return [self.standing.not_found(ev, m.request_id, f"no job {job_id.hex()}")]
        if ev.peer.role != "monitor" and not owns(ev.peer, view["client"]):  # monitors see every job's state
            return [not_owner(ev, m.request_id, job_id)]
        return [self.standing.reply(ev, m.request_id, self.waiting.annotate(view, now))]

    def on_job_list(self, ev: MessageReceived, m: JobList, now: float) -> list[Effect]:
        # people see their own jobs; operators and monitors every job
        mine = ev.peer.name if ev.peer.role in ("client", "gateway") else None
        rows = views.jobs_view(self.ledger.state, min(m.limit, MAX_LIST), m.state, client=mine)
        return [self.standing.reply(ev, m.request_id, [self.waiting.annotate(v, now) for v in rows])]

    def on_task_query(self, ev: MessageReceived, m: TaskQuery, now: float) -> list[Effect]:
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        view = views.task_view(self.ledger.state, job_id, m.task_id)
        if view is None:
            return [self.standing.not_found(ev, m.request_id, f"no job {job_id.hex()}")]
        if not owns(ev.peer, self.ledger.state.jobs[job_id].client):  # a task's result is its owner's
            return [not_owner(ev, m.request_id, job_id)]
        if self.story is not None and view["state"] != "unknown":
            view["story"] = self.story(job_id, m.task_id)
        return [self.standing.reply(ev, m.request_id, view)]

    def on_file_lookup(self, ev: MessageReceived, m: FileLookup, now: float) -> list[Effect]:
        if len(m.ids) > MAX_LOOKUP:
            return [app_error(ev, m.request_id, AppReason.REFUSED, "too_many_ids",
                              f"{len(m.ids)} file ids in one lookup; ask for at most {MAX_LOOKUP} at a time")]
        return [self.standing.reply(ev, m.request_id, {f.hex(): views.file_view(self.ledger.state, f) for f in m.ids})]

    def on_file_list(self, ev: MessageReceived, m: FileList, now: float) -> list[Effect]:
        state = self.ledger.state
        if m.owner is not None and m.owner not in state.jobs and m.owner not in state.named:
            return [self.standing.not_found(ev, m.request_id, f"no job {m.owner.hex()}")]
        people = ev.peer.role in ("client", "gateway")
        foreign = self._foreign_job(ev, m.owner) if people else None
        if foreign is not None:  # workers and storage nodes list any job's files (mounts, the collector)
            return [not_owner(ev, m.request_id, foreign)]
        # a client lists the files its jobs and its pins refer to, not everyone's
        among = None
        if people and m.owner is None:
            among = {j for j, job in state.jobs.items() if job.client == ev.peer.name} | {pin_owner(ev.peer.name)}
        page = views.files_view(state, max(1, min(m.limit, MAX_LIST)), m.owner, m.after, among)
        return [self.standing.reply(ev, m.request_id, page)]

    def _foreign_job(self, ev: MessageReceived, job_id: bytes | None) -> bytes | None:
        """``job_id`` if it names a job ``ev``'s sender does not own, else None."""
        job = self.ledger.state.jobs.get(job_id) if job_id is not None else None
        return job_id if job is not None and not owns(ev.peer, job.client) else None

    def on_heartbeat(self, ev: MessageReceived, m: Heartbeat, now: float, attached: bool = True) -> list[Effect]:
        """A balancer's heartbeat on its stream. Answered in kind only by the leader it is
        attached to: a follower says NOT_LEADER, and a leader it is not attached to (this master
        restarted, or another balancer took the stream) says ``not_attached``, so a balancer
        whose master came back as someone else re-attaches even when it has nothing else to say."""
        if m.reply:
            return []  # masters send no heartbeats: a stray answer
        self.standing.count("heartbeats")
        if not self.standing.leading():
            return [self.standing.not_leader(0, ev.route, ev.stimulus_id)]
        if not attached:
            return [app_error(ev, 0, AppReason.STALE_FENCE, "not_attached",
                              "this master has no stream with you (it restarted, or another balancer attached): ATTACH again")]
        return [Send(API, Heartbeat(self.standing.view.term, m.sequence, 1), ev.route, ev.stimulus_id)]
