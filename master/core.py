"""The master core: the client API, the balancer stream and batching, around the ledger.

Theory of operation
-------------------
Every master runs this core; Raft (behind ``master.raft``) decides which one leads. The core
sees Raft only through ``raft_view()`` (a read-only snapshot of role, term, leader, indices,
peers) and the events the loop posts when a proposal commits or fails; it asks for replication
with the ``Propose`` effect. It reads the ledger (the loop holds the ledger lock around it) and
never mutates it: only committed entries do, on the Raft thread.

Writes (SUBMIT, CANCEL_JOB, TASK_RESULT) reach only the leader; a follower answers NOT_LEADER
with the leader's client address. The leader validates a write, queues its command and, when
the loop has drained its socket (a zero-delay ``flush`` timer), proposes everything queued as
one ``Batch`` entry: one Raft round for many submits or completions. The answer (SUBMIT_ACK,
RESULT_ACK, an ERROR) goes out only when the batch has committed on a quorum (Raft §5.3); a
proposal that fails or times out is answered OUTCOME_UNKNOWN, and the client retries with the
same idempotency key, which the ledger deduplicates.

Towards the balancer: a balancer ATTACHes with its Binary Star epoch and a credit. Once the
leader's first entry of its term (a ``Barrier``, Raft §8) has committed, the leader proposes
``AssignTasks`` for ready tasks within the credit; each assignment carries a fencing token
(term, sequence) and goes out as WORKER_REQUEST only after it commits. Completions come back as
TASK_RESULT and are acknowledged with RESULT_ACK once recorded (or found to be duplicates).

Reads (JOB_QUERY, JOB_LIST, TASK_QUERY) are answered by any master from its own ledger;
``stale`` is 0 only when a serving leader with a quorum answers. HEARTBEAT is answered by every
master with its Raft term (balancers use it to notice a dead or deposed leader).

WATCH is a long poll on the jobs' ``endings`` (the ledger's record of which tasks ended, in
order): the leader answers at once if a watched job has endings past the client's cursor or is
over; otherwise it parks the watch (one per connection: a newer one replaces it) until a commit
brings news for one of its jobs, or its deadline (a ``watch`` timer at the earliest one), when it
answers with no news. Only the leader parks watches: it alone learns of commits as they happen.
Parked watches are indexed by job, so a commit looks only at those watching the jobs it touched.

Pure: no sockets, clocks, threads or disk; ``now`` comes with each event.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from cluster.node.events import (
    Effect,
    Event,
    Log,
    MessageReceived,
    Refuse,
    Send,
    Started,
    StartTimer,
    StopRequested,
    TimerFired,
)
from master import jobs, views
from master.commands import (
    AddUnits,
    AddWorkSpec,
    AssignTasks,
    Barrier,
    Batch,
    CancelJob as CancelCommand,
    CompleteTask,
    ControlSpec,
    Entry,
    ExpireLeases,
    MakeUnits,
    RegisterFile,
    ReleaseFile,
    SubmitJob,
)
from master.files import task_files_problem
from master.joblife import spec_digest
from master.ledger import Ledger
from master.state import Applied
from master.workspec import WorkSpecError
from proto.errors import AppReason
from proto.ids import join128, split128
from proto.messages import (
    Attach,
    Attached,
    CancelJob,
    Credit,
    Error,
    FileList,
    FileLookup,
    FileRegister,
    FileRelease,
    Heartbeat,
    JobList,
    JobQuery,
    NotLeader,
    QueryReply,
    ResultAck,
    Submit,
    SubmitAck,
    TaskQuery,
    TaskResult,
    Watch,
    Work,
    WorkerRequest,
)

API = "api"
RAFT_POLL = 0.02  # how often the core looks at Raft's role and leader (seconds)
PROPOSAL_TIMEOUT = 5.0  # a proposal unanswered this long is answered OUTCOME_UNKNOWN
MAX_LIST = 10_000
MAX_LOOKUP = 10_000  # file ids per FILE_LOOKUP
MAX_WATCH_JOBS = 10_000  # jobs per WATCH
MAX_WATCH_TASKS = 10_000  # task endings per WATCH reply (the cursor advances only that far)
MAX_WATCH_WAIT = 60.0  # seconds a WATCH may be parked


# ---- the vocabulary between this core and its loop ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Committed:
    """Proposal ``token`` committed; ``result`` is what the ledger's ``apply`` returned."""

    token: int
    result: Any
    log_index: int
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class ProposalFailed:
    """Proposal ``token`` did not commit here (leader change, queue full …): outcome unknown."""

    token: int
    reason: str
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class Propose:
    """Replicate ``entry`` through Raft; the loop posts Committed/ProposalFailed for ``token``."""

    entry: Entry
    token: int
    cause: str = ""


@dataclass(frozen=True, slots=True)
class RaftView:
    """What the core may know of Raft at one instant."""

    role: str  # leader, follower, candidate
    term: int
    leader: str | None  # the leader's Raft address
    has_quorum: bool
    commit_index: int = 0
    last_applied: int = 0
    log_size: int = 0


def job_id_for(key: bytes) -> bytes:
    """A job's id, derived from its idempotency key so every leader picks the same one."""
    return hashlib.blake2b(key, digest_size=16, person=b"cluster-job").digest()


@dataclass
class _BalancerLink:
    route: bytes
    epoch: int
    name: str
    credit: int  # tasks it can still take
    sent: int = 0


@dataclass
class _Proposal:
    replies: list[tuple]  # one per command: how to answer it
    proposed_at: float
    jobs: set[bytes] = field(default_factory=set)  # whose endings or state its commit may change


@dataclass
class _Watcher:
    """A parked WATCH: answered when a commit brings news for one of ``jobs``, or at ``deadline``."""

    route: bytes
    request_id: int
    jobs: dict[bytes, int]  # job id → the client's cursor
    deadline: float
    seq: int  # tells this watch from an earlier one of the same route in the deadline heap
    cause: str


class MasterCore:
    """One master's logic. ``raft_view`` is the adapter's read-only view of Raft (polled every
    ``RAFT_POLL``, so kept cheap); ``raft_detail`` gives the costlier part only STATUS_REPLY needs
    (peers, snapshot); ``client_address`` maps a master's Raft address to the address clients use."""

    role = "master"

    def __init__(
        self,
        ledger: Ledger,
        name: str,
        raft_view: Callable[[], RaftView],
        client_address: dict[str, str],
        *,
        raft_detail: Callable[[], dict[str, Any]] = dict,
        batch_max: int = 2048,
        dispatch_max: int = 1024,
        wall_offset: float = 0.0,
    ) -> None:
        self.ledger = ledger
        # Ledger times (submitted, assigned, ended) are wall-clock seconds, read on any master
        # after a failover; ``now`` is the loop's monotonic clock (timers, timeouts). The loop
        # gives the offset between them once, at start.
        self.wall_offset = wall_offset
        self.name = name
        self.raft_view = raft_view
        self.raft_detail = raft_detail
        self.client_address = client_address
        self.batch_max = batch_max
        self.dispatch_max = dispatch_max
        self.view = RaftView("follower", 0, None, False)
        self.serving_term = 0  # the term whose Barrier has committed on this leader
        self.barrier_term = 0  # the term a Barrier was proposed for
        self.sequence = 0  # fencing sequence within the current term
        self.queue: list[tuple[Any, tuple]] = []  # (command, how to answer) awaiting a flush
        self.flush_pending = False
        self.proposals: dict[int, _Proposal] = {}
        self.tokens = 0
        self.inflight: set[tuple[bytes, int]] = set()  # tasks proposed for assignment
        self.balancer: _BalancerLink | None = None
        self.counters: dict[str, int] = {}
        self.leader_since: float | None = None
        self.first_commit_at: float | None = None
        self.watchers: dict[bytes, _Watcher] = {}  # route → its parked watch
        self.watching: dict[bytes, dict[bytes, None]] = {}  # job id → routes parked on it (ordered)
        self.watch_deadlines: list[tuple[float, int, bytes]] = []  # a heap; answered ones stay until popped
        self.watch_timer_at: float | None = None  # when the pending ``watch`` timer fires
        self.watch_seq = 0

    # ---- events --------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, MessageReceived):
            return self._on_message(event, now)
        if isinstance(event, Committed):
            return self._on_committed(event, now)
        if isinstance(event, ProposalFailed):
            return self._on_failed(event.token, event.reason, event.stimulus_id)
        if isinstance(event, TimerFired):
            if event.name == "raft":
                return self._check_raft(now, event.stimulus_id) + [StartTimer("raft", RAFT_POLL)]
            if event.name == "flush":
                self.flush_pending = False
                return self._flush(now, event.stimulus_id)
            if event.name == "expire":
                return self._expire(now, event.stimulus_id) + self._expire_leases(now, event.stimulus_id) + \
                    [StartTimer("expire", 1.0)]
            if event.name == "watch":
                return self._expire_watches(now, event.stimulus_id)
            return []
        if isinstance(event, Started):
            return [StartTimer("raft", 0.0, event.stimulus_id), StartTimer("expire", 1.0, event.stimulus_id)]
        if isinstance(event, StopRequested):
            return []
        return []

    def _on_message(self, ev: MessageReceived, now: float) -> list[Effect]:
        m = ev.message
        handler = _MESSAGE_HANDLERS.get(type(m))
        if handler is None:
            return [_refuse(ev, f"a master does not take {type(m).__name__} messages")]
        return handler(self, ev, m, now)

    # ---- Raft role -------------------------------------------------------------------------

    def _check_raft(self, now: float, cause: str) -> list[Effect]:
        old, self.view = self.view, self.raft_view()
        out: list[Effect] = []
        if (old.role, old.term, old.leader) != (self.view.role, self.view.term, self.view.leader):
            leader = self.client_address.get(self.view.leader or "", self.view.leader)
            out.append(Log(logging.INFO, f"raft: {self.view.role} in term {self.view.term}, leader {leader or 'unknown'}", cause))
        leading = self.view.role == "leader"
        if old.role == "leader" and (not leading or old.term != self.view.term):
            out += self._step_down(cause)
        if leading and self.barrier_term != self.view.term:
            self.barrier_term = self.view.term
            self.sequence = 0
            self.leader_since = now
            self.first_commit_at = None
            out += self._propose([(Barrier(self.view.term, self.name, self.wall(now)), ("barrier", self.view.term))], now, cause)
        return out

    def _step_down(self, cause: str) -> list[Effect]:
        """This master stopped leading: answer what it queued, forget the balancer."""
        out: list[Effect] = [Log(logging.WARNING, "no longer the leader; queued writes are answered NOT_LEADER", cause)]
        for _, reply in self.queue:
            out += self._answer_not_leader(reply, cause)
        self.queue.clear()
        if self.balancer is not None:
            out.append(Send(API, NotLeader(0, self.view.term, self._leader_address()), self.balancer.route, cause))
            self.balancer = None
        self.inflight.clear()
        self.serving_term = 0
        for route in list(self.watchers):  # the next leader parks them: it alone hears of commits
            w = self._unpark(route)
            out.append(Send(API, NotLeader(w.request_id, self.view.term, self._leader_address()), route, cause))
        self.watch_deadlines.clear()
        self.watch_timer_at = None
        return out

    def _leader_address(self) -> str | None:
        if self.view.leader is None:
            return None
        return self.client_address.get(self.view.leader, self.view.leader)

    def wall(self, now: float) -> float:
        """Wall-clock seconds for ``now`` (what the ledger records)."""
        return now + self.wall_offset

    def _writable(self, ev: MessageReceived, request_id: int) -> Effect | None:
        """None if this master may take a write now; else the answer that says where to go."""
        if self.view.role != "leader":
            self._count("redirected")
            return Send(API, NotLeader(request_id, self.view.term, self._leader_address()), ev.route, ev.stimulus_id)
        if not self.view.has_quorum:
            return _app_error(
                ev, request_id, AppReason.UNAVAILABLE, "unavailable",
                "this leader cannot reach a majority of masters: writes are refused until a quorum is back",
            )
        return None

    # ---- client writes ---------------------------------------------------------------------

    def _on_submit(self, ev: MessageReceived, m: Submit, now: float) -> list[Effect]:
        refusal = self._writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        key = join128(m.idempotency_key_upper, m.idempotency_key_lower)
        try:
            encoded = msgspec.msgpack.encode(m.spec)
            jobs.validate_spec(m.kind, m.spec, len(encoded))
        except jobs.SpecError as exc:
            return [_app_error(ev, m.request_id, AppReason.REFUSED, exc.code, exc.text)]
        digest = spec_digest(m.kind, m.spec)
        known = self.ledger.state.keys.get(key)
        if known is not None:  # already committed: answer now, from the ledger
            if known[0] != digest:
                return [_app_error(ev, m.request_id, AppReason.REFUSED, "idempotency_conflict",
                                   f"idempotency key {key.hex()} was used for another job with a different body")]
            upper, lower = split128(known[1])
            return [Send(API, SubmitAck(m.request_id, upper, lower, self.view.last_applied), ev.route, ev.stimulus_id)]
        command = SubmitJob(job_id_for(key), key, digest, m.kind, m.spec, f"node:{ev.sender:032x}", self.wall(now))
        return self._enqueue(command, ("submit", ev.route, m.request_id), ev.stimulus_id, now)

    def _on_cancel(self, ev: MessageReceived, m: CancelJob, now: float) -> list[Effect]:
        refusal = self._writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        if job_id not in self.ledger.state.jobs:
            return [_app_error(ev, m.request_id, AppReason.NOT_FOUND, "unknown_job", f"no job {job_id.hex()}")]
        return self._enqueue(CancelCommand(job_id, m.reason, self.wall(now)), ("cancel", ev.route, m.request_id), ev.stimulus_id, now)

    def _on_file_register(self, ev: MessageReceived, m: FileRegister, now: float) -> list[Effect]:
        refusal = self._writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        file_id = join128(m.file_id_upper, m.file_id_lower)
        # pin=0 without an owner is a repair: it adds replicas and no reference
        command = RegisterFile(file_id, m.size, list(m.replicas), m.owner, self.wall(now), m.name, add_ref=bool(m.pin or m.owner))
        return self._enqueue(command, ("write", ev.route, m.request_id), ev.stimulus_id, now)

    def _on_file_release(self, ev: MessageReceived, m: FileRelease, now: float) -> list[Effect]:
        refusal = self._writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        return self._enqueue(ReleaseFile(m.file_id, m.owner, self.wall(now)), ("write", ev.route, m.request_id), ev.stimulus_id, now)

    def _on_work(self, ev: MessageReceived, m: Work, now: float) -> list[Effect]:
        """Work specs and units: ``summary`` is read here, the rest are writes for the log."""
        if m.op == "summary":
            return [self._reply(ev, m.request_id, self.ledger.work.summary())]
        if m.op == "units":
            q = m.body if isinstance(m.body, dict) else {}
            try:
                view = self.ledger.work.units_view(m.spec, q.get("state"), max(1, min(int(q.get("limit", 100)), MAX_LIST)),
                                                   int(q.get("min_attempts", 0)), int(q.get("after", -1)),
                                                   q.get("disputed") is True)
            except (WorkSpecError, TypeError, ValueError) as exc:
                return [_app_error(ev, m.request_id, AppReason.REFUSED, getattr(exc, "code", "bad_query"), str(exc))]
            return [self._reply(ev, m.request_id, view)]
        if m.op not in ("add_spec", "add_units", "control"):
            return [_app_error(ev, m.request_id, AppReason.REFUSED, "bad_op",
                               f"unknown work op {m.op!r}; the ops are add_spec, add_units, control, summary, units")]
        refusal = self._writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        at = self.wall(now)
        shape = {"add_spec": dict, "add_units": list, "control": dict}[m.op]
        if not isinstance(m.body, shape):  # refused before it costs a Raft round
            return [_app_error(ev, m.request_id, AppReason.REFUSED, "bad_units" if m.op == "add_units" else "bad_spec",
                               f"{m.op} takes a {'list of units' if shape is list else 'map'} as its body, "
                               f"not {type(m.body).__name__}")]
        if m.op == "add_spec":
            command: Any = AddWorkSpec(m.body, at)
        elif m.op == "add_units":
            command = AddUnits(m.spec, m.body, at, m.key)
        else:
            command = ControlSpec(m.spec, str(m.body.get("action", "")), at, m.body.get("value"))
        return self._enqueue(command, ("write", ev.route, m.request_id), ev.stimulus_id, now)

    def _on_result(self, ev: MessageReceived, m: TaskResult, now: float) -> list[Effect]:
        refusal = self._writable(ev, 0)
        if refusal is not None:
            return [refusal]
        if m.fence_term > self.view.term:
            # A token from a newer term than ours: this leader has been deposed and not yet heard.
            return [_app_error(ev, 0, AppReason.STALE_FENCE, "stale_leader",
                               f"token term {m.fence_term} is newer than this master's term {self.view.term}")]
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        problem = task_files_problem(m.files, m.task_id, m.result_file)
        if problem:  # refused before it costs a Raft round (the ledger would refuse it too)
            return [_app_error_to(ev.route, 0, AppReason.REFUSED, "bad_files", f"task {m.task_id} of job {job_id.hex()}: {problem}",
                                  ev.stimulus_id, refers_to=TaskResult.code, extra={"task_id": m.task_id, "job": job_id.hex()})]
        command = CompleteTask(
            job_id, m.task_id, m.fence_term, m.fence_sequence,
            m.outcome, m.worker, m.summary, m.result_file, m.error, self.wall(now), [list(f) for f in m.files],
        )
        return self._enqueue(command, ("complete", ev.route, m), ev.stimulus_id, now)

    def _enqueue(self, command: Any, reply: tuple, cause: str, now: float) -> list[Effect]:
        self.queue.append((command, reply))
        if len(self.queue) >= self.batch_max:
            return self._flush(now, cause)
        if not self.flush_pending:
            self.flush_pending = True
            # zero delay: the loop fires it after draining the socket, so a burst is one batch
            return [StartTimer("flush", 0.0, cause)]
        return []

    def _flush(self, now: float, cause: str) -> list[Effect]:
        if not self.queue:
            return []
        batch, self.queue = self.queue, []
        return self._propose(batch, now, cause)

    def _propose(self, items: list[tuple[Any, tuple]], now: float, cause: str) -> list[Effect]:
        self.tokens += 1
        commands = [c for c, _ in items]
        touched = {c.job_id for c in commands if isinstance(c, (CompleteTask, CancelCommand))}
        self.proposals[self.tokens] = _Proposal([reply for _, reply in items], now, touched)
        entry = commands[0] if len(commands) == 1 else Batch(commands)
        self._count("proposals")
        self._count("commands_proposed", len(commands))
        return [Propose(entry, self.tokens, cause)]

    # ---- commits ---------------------------------------------------------------------------

    def _on_committed(self, ev: Committed, now: float) -> list[Effect]:
        proposal = self.proposals.pop(ev.token, None)
        if proposal is None:
            return []  # answered already (expired); the ledger has it either way
        results = ev.result if isinstance(ev.result, list) else [ev.result]
        out: list[Effect] = []
        for reply, result in zip(proposal.replies, results):
            out += self._answer(reply, result, ev.log_index, now, ev.stimulus_id)
        out = _merge_acks(out)
        out += self._dispatch(now, ev.stimulus_id)
        # A Barrier commits after every entry of earlier terms: any watched job may have changed.
        every = any(reply[0] == "barrier" for reply in proposal.replies)
        return out + self._wake(list(self.watching) if every else proposal.jobs, ev.stimulus_id)

    def _answer(self, reply: tuple, result: Applied, log_index: int, now: float, cause: str) -> list[Effect]:
        kind = reply[0]
        if kind == "submit":
            _, route, request_id = reply
            if not result.ok:
                return [_app_error_to(route, request_id, AppReason.REFUSED, result.code, result.text, cause)]
            upper, lower = split128(result.value["job"])
            self._count("submits_committed")
            return [Send(API, SubmitAck(request_id, upper, lower, log_index), route, cause)]
        if kind == "cancel":
            _, route, request_id = reply
            if not result.ok:
                return [_app_error_to(route, request_id, AppReason.REFUSED, result.code, result.text, cause)]
            view = views.job_view(self.ledger.state, result.value["job"])
            return [Send(API, QueryReply(request_id, 0, self.view.term, log_index, view, self._leader_address()), route, cause)]
        if kind == "write":
            _, route, request_id = reply
            if not result.ok:
                return [_app_error_to(route, request_id, AppReason.REFUSED, result.code, result.text, cause)]
            return [Send(API, QueryReply(request_id, 0, self.view.term, log_index, result.value, self._leader_address()), route, cause)]
        if kind == "complete":
            _, route, m = reply
            if not result.ok:
                reason = AppReason.STALE_FENCE if result.code == "stale_fence" else AppReason.REFUSED
                return [_app_error_to(route, 0, reason, result.code, result.text, cause, refers_to=TaskResult.code,
                                      extra={"task_id": m.task_id, "job": join128(m.job_uuid_upper, m.job_uuid_lower).hex()})]
            self._count("results_" + result.code)
            return [Send(API, ResultAck(m.job_uuid_upper, m.job_uuid_lower, m.task_id, m.fence_term, m.fence_sequence), route, cause)]
        if kind == "assign":
            return self._assigned(reply, result, cause)
        if kind == "barrier":
            if reply[1] == self.view.term and self.view.role == "leader":
                self.serving_term = reply[1]
                self.first_commit_at = now
                return [Log(logging.INFO, f"serving as leader of term {reply[1]}", cause)]
            return []
        if kind == "made" and result.ok and result.value["made"]:
            self._count("continuous_units", len(result.value["made"]))
            return [Log(logging.INFO, f"continuous units made: {', '.join(result.value['made'])}", cause)]
        if kind == "leases" and result.ok and result.value["expired"]:
            self._count("leases_expired", result.value["expired"])
            return [Log(logging.INFO, f"{result.value['expired']} work-unit leases ended: their units are handed out again",
                        cause)]
        return []

    def _assigned(self, reply: tuple, result: Applied, cause: str) -> list[Effect]:
        _, _, tasks = reply
        self.inflight.difference_update(tasks)
        if not result.ok:
            return [Log(logging.WARNING, f"assignment refused by the ledger: {result.text}", cause)]
        link = self.balancer
        out: list[Effect] = []
        for job_id, task_id, fence in result.value["assigned"]:
            self._count("tasks_assigned")
            if link is None:
                continue  # no balancer now: the next one gets open assignments on ATTACH
            # A balancer that attached while this was committing did not get it among the open
            # assignments: it goes to whichever balancer is attached now.
            out.append(Send(API, self._worker_request(job_id, task_id, fence), link.route, cause))
            link.credit -= 1
            link.sent += 1
        return out

    def _on_failed(self, token: int, reason: str, cause: str) -> list[Effect]:
        proposal = self.proposals.pop(token, None)
        if proposal is None:
            return []
        self._count("proposals_failed")
        out: list[Effect] = [Log(logging.WARNING, f"proposal {token} did not commit here ({reason}); its senders retry", cause)]
        for reply in proposal.replies:
            out += self._answer_unknown(reply, reason, cause)
        return out

    def _expire(self, now: float, cause: str) -> list[Effect]:
        out: list[Effect] = []
        for token in [t for t, p in self.proposals.items() if now - p.proposed_at > PROPOSAL_TIMEOUT]:
            out += self._on_failed(token, f"no commit within {PROPOSAL_TIMEOUT:g} s", cause)
        return out

    def _expire_leases(self, now: float, cause: str) -> list[Effect]:
        """Once a second, a serving leader takes back the work units whose leases ended and makes
        the units of continuous specs that are due (its clock, in the command, so every master
        ends and makes the same ones)."""
        if self.view.role != "leader" or self.serving_term != self.view.term:
            return []
        wall = self.wall(now)
        out: list[Effect] = []
        if self.ledger.work.has_expired(wall):
            out += self._enqueue(ExpireLeases(wall), ("leases",), cause, now)
        due = self.ledger.work.due(wall)
        if due:  # continuous specs: the same clock decides when their next unit is made
            out += self._enqueue(MakeUnits(due, wall), ("made",), cause, now)
        return out

    def _answer_unknown(self, reply: tuple, reason: str, cause: str) -> list[Effect]:
        kind = reply[0]
        if kind in ("submit", "cancel", "write"):
            return [_app_error_to(reply[1], reply[2], AppReason.OUTCOME_UNKNOWN, "outcome_unknown",
                                  f"the write may or may not have committed ({reason}); retry with the same idempotency key", cause)]
        if kind == "complete":
            m = reply[2]
            return [_app_error_to(reply[1], 0, AppReason.OUTCOME_UNKNOWN, "outcome_unknown",
                                  f"the result may not be recorded ({reason}); send it again", cause,
                                  refers_to=TaskResult.code, extra={"task_id": m.task_id})]
        if kind == "assign":
            self.inflight.difference_update(reply[2])
        return []

    def _answer_not_leader(self, reply: tuple, cause: str) -> list[Effect]:
        kind = reply[0]
        if kind in ("submit", "cancel", "write"):
            return [Send(API, NotLeader(reply[2], self.view.term, self._leader_address()), reply[1], cause)]
        if kind == "complete":
            return [Send(API, NotLeader(0, self.view.term, self._leader_address()), reply[1], cause)]
        return []

    # ---- the balancer stream ---------------------------------------------------------------

    def _on_attach(self, ev: MessageReceived, m: Attach, now: float) -> list[Effect]:
        refusal = self._writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        if self.balancer is not None and m.epoch < self.balancer.epoch:
            return [_app_error(ev, m.request_id, AppReason.STALE_FENCE, "stale_balancer",
                               f"balancer epoch {m.epoch} is older than the active balancer's ({self.balancer.epoch})")]
        replaced = self.balancer is not None and self.balancer.route != ev.route
        self.balancer = _BalancerLink(ev.route, m.epoch, m.name, m.credit)
        self.inflight.clear()  # answers to earlier proposals still land; they are simply not resent
        out: list[Effect] = [Log(logging.INFO, f"balancer {m.name} attached (epoch {m.epoch}, credit {m.credit})"
                                 + (", replacing the previous one" if replaced else ""), ev.stimulus_id)]
        open_now = list(views.open_assignments(self.ledger.state, self.ledger.work))
        out.append(Send(API, Attached(m.request_id, self.view.term, len(open_now), self.name), ev.route, ev.stimulus_id))
        for job_id, task_id, attempt in open_now:  # the balancer matches these with its workers
            out.append(Send(API, self._worker_request(job_id, task_id, (attempt.fence_term, attempt.fence_sequence)),
                            ev.route, ev.stimulus_id))
        return out + self._dispatch(now, ev.stimulus_id)

    def _on_credit(self, ev: MessageReceived, m: Credit, now: float) -> list[Effect]:
        link = self.balancer
        if link is None or ev.route != link.route or m.stream != link.epoch or m.unit != 0:
            return [_refuse(ev, "CREDIT from a balancer that is not attached (send ATTACH first)")]
        link.credit += m.amount
        return self._dispatch(now, ev.stimulus_id)

    def _dispatch(self, now: float, cause: str) -> list[Effect]:
        link = self.balancer
        if link is None or self.serving_term != self.view.term or self.view.role != "leader":
            return []
        room = min(link.credit - len(self.inflight), self.dispatch_max)
        if room <= 0:
            return []
        tasks = views.ready_tasks(self.ledger.state, self.ledger.work, room, self.inflight)
        if not tasks:
            return []
        first = self.sequence + 1
        self.sequence += len(tasks)
        self.inflight.update(tasks)
        command = AssignTasks(self.view.term, first, link.name, tasks, self.wall(now))
        return self._propose([(command, ("assign", link.epoch, tasks))], now, cause)

    def _worker_request(self, job_id: bytes, task_id: int, fence: tuple[int, int]) -> WorkerRequest:
        order = views.task_order(self.ledger.state, self.ledger.work, job_id, task_id)
        run = order["run"]
        program = run.get("program", b"")
        program = program if isinstance(program, bytes) else b""
        upper, lower = split128(job_id)
        metadata = {"task": order["arguments"], "run": {k: v for k, v in run.items() if k != "program"}}
        if order.get("avoid"):
            metadata["avoid"] = order["avoid"]  # workers that already ran a replica of this unit
        return WorkerRequest(
            upper, lower, task_id, fence[0], fence[1], len(program), len(order["inputs"]),
            str(run.get("kind", "")), program, order["inputs"], metadata,
        )

    # ---- reads -----------------------------------------------------------------------------

    def _reply(self, ev: MessageReceived, request_id: int, value: Any) -> Effect:
        return self._reply_to(ev.route, request_id, value, ev.stimulus_id)

    def _reply_to(self, route: bytes | None, request_id: int, value: Any, cause: str) -> Effect:
        stale = 0 if (self.view.role == "leader" and self.view.has_quorum and self.serving_term == self.view.term) else 1
        return Send(API, QueryReply(request_id, stale, self.view.term, self.view.last_applied, value, self._leader_address()),
                    route, cause)

    def _on_job_query(self, ev: MessageReceived, m: JobQuery, now: float) -> list[Effect]:
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        view = views.job_view(self.ledger.state, job_id)
        if view is None:
            return [self._not_found(ev, m.request_id, f"no job {job_id.hex()}")]
        return [self._reply(ev, m.request_id, view)]

    def _on_job_list(self, ev: MessageReceived, m: JobList, now: float) -> list[Effect]:
        return [self._reply(ev, m.request_id, views.jobs_view(self.ledger.state, min(m.limit, MAX_LIST), m.state))]

    def _on_task_query(self, ev: MessageReceived, m: TaskQuery, now: float) -> list[Effect]:
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        view = views.task_view(self.ledger.state, job_id, m.task_id)
        if view is None:
            return [self._not_found(ev, m.request_id, f"no job {job_id.hex()}")]
        return [self._reply(ev, m.request_id, view)]

    def _on_file_lookup(self, ev: MessageReceived, m: FileLookup, now: float) -> list[Effect]:
        if len(m.ids) > MAX_LOOKUP:
            return [_app_error(ev, m.request_id, AppReason.REFUSED, "too_many_ids",
                               f"{len(m.ids)} file ids in one lookup; ask for at most {MAX_LOOKUP} at a time")]
        return [self._reply(ev, m.request_id, {f.hex(): views.file_view(self.ledger.state, f) for f in m.ids})]

    def _on_file_list(self, ev: MessageReceived, m: FileList, now: float) -> list[Effect]:
        if m.owner is not None and m.owner not in self.ledger.state.jobs and m.owner not in self.ledger.state.named:
            return [self._not_found(ev, m.request_id, f"no job {m.owner.hex()}")]
        return [self._reply(ev, m.request_id, views.files_view(self.ledger.state, max(1, min(m.limit, MAX_LIST)), m.owner, m.after))]

    def _on_heartbeat(self, ev: MessageReceived, m: Heartbeat, now: float) -> list[Effect]:
        if m.reply:
            return []  # masters send no heartbeats: a stray answer
        self._count("heartbeats")
        # Followers answer too: a balancer learns "not leader" from the answers to its other messages.
        return [Send(API, Heartbeat(self.view.term, m.sequence, 1), ev.route, ev.stimulus_id)]

    # ---- watches (long polls on task endings) ------------------------------------------------

    def _on_watch(self, ev: MessageReceived, m: Watch, now: float) -> list[Effect]:
        if self.view.role != "leader":  # only the leader hears of commits as they happen
            self._count("redirected")
            return [Send(API, NotLeader(m.request_id, self.view.term, self._leader_address()), ev.route, ev.stimulus_id)]
        if len(m.jobs) > MAX_WATCH_JOBS:
            return [_app_error(ev, m.request_id, AppReason.REFUSED, "too_many_jobs",
                               f"{len(m.jobs)} jobs in one watch; watch at most {MAX_WATCH_JOBS} "
                               "(one watch per connection is parked: split them over several)")]
        bad = next(((j, c) for j, c in m.jobs.items() if c < 0), None)
        if bad is not None:
            return [_app_error(ev, m.request_id, AppReason.REFUSED, "bad_cursor",
                               f"the cursor of job {bad[0].hex()} is {bad[1]}: a cursor counts the endings seen, from 0")]
        out: list[Effect] = []
        old = self._unpark(ev.route)
        if old is not None:  # one parked watch per connection: the newer one replaces it
            self._count("watches_replaced")
            out.append(self._reply_to(old.route, old.request_id, _no_news(), ev.stimulus_id))
        value = self._watch_news(m.jobs)
        if value is not None or m.wait_ms == 0:
            self._count("watches_answered")
            return out + [self._reply(ev, m.request_id, value if value is not None else _no_news())]
        self.watch_seq += 1
        w = _Watcher(ev.route, m.request_id, dict(m.jobs), now + min(m.wait_ms / 1000, MAX_WATCH_WAIT),
                     self.watch_seq, ev.stimulus_id)
        return out + self._park(w, now)

    def _watch_news(self, watched: dict[bytes, int]) -> dict[str, Any] | None:
        """WATCH's reply value for ``watched`` (job → cursor), or None if nothing is new. Jobs go
        in request order until ``MAX_WATCH_TASKS`` endings are in; a job with endings left past
        that waits for the next watch, which is answered at once."""
        budget = MAX_WATCH_TASKS
        found: dict[str, Any] = {}
        unknown: list[str] = []
        for job_id, cursor in watched.items():
            if not views.has_news(self.ledger.state, job_id, cursor):
                continue
            view = views.endings_view(self.ledger.state, job_id, cursor, budget)
            if view is None:
                unknown.append(job_id.hex())
            elif view["cursor"] > cursor or view["done"] + view["failed"] <= cursor:
                # (else endings are left and no room for them: the next watch gets them at once)
                found[job_id.hex()] = view
                budget -= len(view["tasks"])
        if not found and not unknown:
            return None
        return {"jobs": found, "unknown": unknown}

    def _park(self, w: _Watcher, now: float) -> list[Effect]:
        self.watchers[w.route] = w
        for job_id in w.jobs:
            self.watching.setdefault(job_id, {})[w.route] = None
        if len(self.watch_deadlines) > 2 * len(self.watchers) + 64:  # drop the answered ones' entries
            self.watch_deadlines = [e for e in self.watch_deadlines if self._current(e)]
            heapq.heapify(self.watch_deadlines)
        heapq.heappush(self.watch_deadlines, (w.deadline, w.seq, w.route))
        self._count("watches_parked")
        if self.watch_timer_at is not None and self.watch_timer_at <= w.deadline:
            return []
        self.watch_timer_at = w.deadline
        return [StartTimer("watch", max(0.0, w.deadline - now), w.cause)]

    def _current(self, entry: tuple[float, int, bytes]) -> bool:
        w = self.watchers.get(entry[2])
        return w is not None and w.seq == entry[1]

    def _unpark(self, route: bytes) -> _Watcher | None:
        w = self.watchers.pop(route, None)
        if w is not None:
            for job_id in w.jobs:
                routes = self.watching[job_id]
                del routes[route]
                if not routes:
                    del self.watching[job_id]
        return w

    def _wake(self, job_ids: Any, cause: str) -> list[Effect]:
        """Answer the parked watches that a commit touching ``job_ids`` brought news for."""
        routes: dict[bytes, None] = {}
        for job_id in job_ids:
            for route in self.watching.get(job_id, ()):
                if views.has_news(self.ledger.state, job_id, self.watchers[route].jobs[job_id]):
                    routes[route] = None
        out: list[Effect] = []
        for route in routes:
            w = self._unpark(route)
            self._count("watches_woken")
            out.append(self._reply_to(route, w.request_id, self._watch_news(w.jobs) or _no_news(), cause))
        return out

    def _expire_watches(self, now: float, cause: str) -> list[Effect]:
        self.watch_timer_at = None
        out: list[Effect] = []
        heap = self.watch_deadlines
        while heap and (heap[0][0] <= now or not self._current(heap[0])):
            entry = heapq.heappop(heap)
            if self._current(entry):
                w = self._unpark(entry[2])
                self._count("watches_expired")
                out.append(self._reply_to(w.route, w.request_id, _no_news(), cause))
        if heap:
            self.watch_timer_at = heap[0][0]
            out.append(StartTimer("watch", max(0.0, heap[0][0] - now), cause))
        return out

    def _not_found(self, ev: MessageReceived, request_id: int, text: str) -> Effect:
        if self.view.role != "leader":
            text += " on this master (a follower: it may be behind the leader)"
        return _app_error(ev, request_id, AppReason.NOT_FOUND, "not_found", text)

    # ---- operators -------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def status(self, now: float) -> dict[str, Any]:
        v = self.view
        return {
            "name": self.name,
            "state": v.role,
            "term": v.term,
            "leader": self._leader_address(),
            "has_quorum": v.has_quorum,
            "serving": self.serving_term == v.term and v.role == "leader",
            "commit_index": v.commit_index,
            "last_applied": v.last_applied,
            "log_size": v.log_size,
            **self.raft_detail(),
            "ledger": {**views.footprint(self.ledger.state), "commands_applied": self.ledger.state.applied, **self.ledger.state.counters},
            "queued_writes": len(self.queue),
            "watches_parked": len(self.watchers),
            "proposals_in_flight": len(self.proposals),
            "balancer": None if self.balancer is None else {
                "name": self.balancer.name, "epoch": self.balancer.epoch,
                "credit": self.balancer.credit, "sent": self.balancer.sent,
            },
            "leader_since": self.leader_since,
            "first_commit_s": None if self.first_commit_at is None or self.leader_since is None
            else round(self.first_commit_at - self.leader_since, 4),
            "core": dict(self.counters),
        }

    def validate_state(self) -> None:
        self.ledger.validate_state()
        assert all(p.replies for p in self.proposals.values())
        if self.balancer is not None:
            assert self.balancer.credit >= 0 or self.balancer.sent > 0
        for route, w in self.watchers.items():
            assert w.route == route and all(route in self.watching[j] for j in w.jobs)
        for job_id, routes in self.watching.items():
            assert routes and all(job_id in self.watchers[r].jobs for r in routes)
        if self.watchers:
            assert self.watch_timer_at is not None, "parked watches with no timer to expire them"
            assert self.watch_timer_at <= min(w.deadline for w in self.watchers.values())
        assert self.watchers or not self.watching


def _no_news() -> dict[str, Any]:
    return {"jobs": {}, "unknown": []}


def _merge_acks(effects: list[Effect]) -> list[Effect]:
    """One RESULT_ACK per route for all the results one commit recorded (``ResultAck.more``),
    in place of the first one; the other effects keep their order."""
    acks: dict[bytes | None, list[Send]] = {}
    for e in effects:
        if isinstance(e, Send) and type(e.message) is ResultAck:
            acks.setdefault(e.route, []).append(e)
    if all(len(group) == 1 for group in acks.values()):
        return effects
    out: list[Effect] = []
    for e in effects:
        if isinstance(e, Send) and type(e.message) is ResultAck:
            group = acks.pop(e.route, None)
            if group is None:
                continue  # merged into the first of its route
            more = [[r.message.job_uuid_upper, r.message.job_uuid_lower, r.message.task_id,
                     r.message.fence_term, r.message.fence_sequence] for r in group[1:]]
            first = group[0].message
            out.append(Send(e.socket, ResultAck(first.job_uuid_upper, first.job_uuid_lower, first.task_id,
                                                first.fence_term, first.fence_sequence, more), e.route, e.cause))
        else:
            out.append(e)
    return out


def _refuse(ev: MessageReceived, detail: str) -> Effect:
    return Refuse(ev.socket, ev.route, ev.message.code, getattr(ev.message, "request_id", 0), detail, ev.stimulus_id)


def _app_error(ev: MessageReceived, request_id: int, reason: AppReason, code: str, text: str) -> Effect:
    return _app_error_to(ev.route, request_id, reason, code, text, ev.stimulus_id, refers_to=ev.message.code)


def _app_error_to(route: bytes | None, request_id: int, reason: AppReason, code: str, text: str, cause: str,
                  refers_to: int = 0, extra: dict | None = None) -> Effect:
    return Send(API, Error(request_id, int(reason), refers_to, text, {"code": code, **(extra or {})}), route, cause)


_MESSAGE_HANDLERS: dict[type, Callable] = {
    Submit: MasterCore._on_submit,
    CancelJob: MasterCore._on_cancel,
    TaskResult: MasterCore._on_result,
    Attach: MasterCore._on_attach,
    Credit: MasterCore._on_credit,
    JobQuery: MasterCore._on_job_query,
    JobList: MasterCore._on_job_list,
    TaskQuery: MasterCore._on_task_query,
    FileRegister: MasterCore._on_file_register,
    FileRelease: MasterCore._on_file_release,
    FileLookup: MasterCore._on_file_lookup,
    FileList: MasterCore._on_file_list,
    Heartbeat: MasterCore._on_heartbeat,
    Watch: MasterCore._on_watch,
    Work: MasterCore._on_work,
}
