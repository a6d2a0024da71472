"""The master core: the client API, the balancer stream and batching, around the ledger.

Theory of operation
-------------------
Every master runs this core; Raft (behind ``master.raft``) decides which one leads. The core
sees Raft only through ``raft_view()`` (a read-only snapshot of role, term, leader, indices,
peers) and the events the loop posts when a proposal commits or fails; it asks for replication
with the ``Propose`` effect. It reads the ledger (the loop holds the ledger lock around it) and
never mutates it: only committed entries do, on the Raft thread.

Writes reach only the leader; a follower answers NOT_LEADER with the leader's client address.
The leader validates a write, queues its command and proposes everything queued as one
``Batch`` entry (``master.batching``). The answer goes out only when the batch has committed on
a quorum (Raft §5.3); a proposal that fails or times out is answered OUTCOME_UNKNOWN, and the
client retries with the same idempotency key, which the ledger deduplicates. Reads are answered
by any master from its own ledger. A leader serves (hands out work, answers reads as fresh) once
its first entry of its term, a ``Barrier`` (Raft §8), has committed.

The core is a thin dispatcher over handler groups it holds (composition, no mixins), each with
its own theory of operation:

- ``master.api``: the client API (SUBMIT, CANCEL_JOB, FILE_*, the reads, HEARTBEAT);
- ``master.stream``: the balancer stream (ATTACH, CREDIT, assignments, TASK_RESULT);
- ``master.watches``: WATCH, long polls on the jobs' task endings, parked on the leader;
- ``master.specs``: WORK (work specs and units) and the leader's lease clock.

They share the write queue (``master.batching``) and where this master stands
(``master.standing``: Raft's view, the term it serves, the counters). The core itself follows
Raft's role (becoming leader proposes the Barrier; stepping down answers what was queued or
parked) and routes each committed or failed proposal's replies, by kind, to the group that
answers them (``self._answers``). ``story(job, task)`` tells a task's life: the ledger's record
(``views.task_story``) merged with what this master saw as leader (``master.stream.TaskLog``).

Pure: no sockets, clocks, threads or disk; ``now`` comes with each event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from cluster.node.events import (
    PEOPLE,
    READERS,
    Effect,
    Event,
    Log,
    MessageReceived,
    Started,
    StartTimer,
    StopRequested,
    TimerFired,
    authorise,
)
from master import joblife, views
from master.api import ClientApi
from master.batching import PROPOSAL_TIMEOUT, Batcher, Committed, ProposalFailed, Propose
from master.commands import Barrier, CompactJobs
from master.ledger import Ledger
from master.specs import WorkSpecs
from master.standing import API, RaftView, Standing, refuse
from master.state import Applied
from master.pending import WaitingBoard
from master.stream import BalancerStream, merge_acks
from master.watches import WatchIndex
from proto.messages import (
    Attach,
    CancelJob,
    Credit,
    FileList,
    FileLookup,
    FileRegister,
    FileRelease,
    Heartbeat,
    JobList,
    JobQuery,
    Submit,
    TaskQuery,
    TaskResult,
    TaskWaiting,
    Watch,
    Work,
)

__all__ = ["API", "Committed", "MasterCore", "ProposalFailed", "Propose", "RaftView", "RAFT_POLL"]

RAFT_POLL = 0.02  # how often the core looks at Raft's role and leader (seconds)


@dataclass(frozen=True, slots=True)
class CheckDisk:
    """Effect: look how much disk is free where this master's journal lives (DiskChecked)."""

    cause: str = ""


@dataclass(frozen=True, slots=True)
class DiskChecked:
    """Event: ``free_bytes`` are free where this master's journal lives."""

    free_bytes: int
    stimulus_id: str


# Who may send what to a master (the sender's key's role, cluster.node.keys): people submit and
# own jobs, monitors read, balancers run the task stream, storage nodes report replicas and ask
# what is referenced, workers read the file registry for their mounts. Owners are checked after.
ROLES: dict[type, frozenset[str]] = {
    Submit: PEOPLE,
    CancelJob: PEOPLE,
    FileRegister: PEOPLE | {"storage"},
    FileRelease: PEOPLE,
    JobQuery: READERS,
    JobList: READERS,
    TaskQuery: READERS,
    FileLookup: READERS | {"worker", "storage"},
    FileList: READERS | {"worker", "storage"},
    Watch: READERS,
    Work: PEOPLE,
    Heartbeat: frozenset({"balancer"}),
    TaskResult: frozenset({"balancer"}),
    Attach: frozenset({"balancer"}),
    Credit: frozenset({"balancer"}),
    TaskWaiting: frozenset({"balancer"}),
}
WORK_READS = frozenset({"summary", "units"})
DEFAULT_RETENTION_S = 30 * 86400.0  # finished jobs are kept this long (``[retention] jobs_days``)
COMPACT_EVERY_S = 60.0  # how often the leader looks for jobs to forget
DISK_CHECK_S = 5.0  # how often a master looks at its free disk


def roles_for(message: Any) -> frozenset[str] | None:
    """The roles that may send ``message`` to a master (Work: reads to readers, writes to people)."""
    if type(message) is Work and message.op in WORK_READS:
        return READERS
    return ROLES.get(type(message))


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
        retention_s: float | None = DEFAULT_RETENTION_S,
    ) -> None:
        self.ledger = ledger
        self.name = name
        self.raft_view = raft_view
        self.raft_detail = raft_detail
        self.standing = Standing(name, client_address, wall_offset)
        self.batcher = Batcher(self.standing, batch_max)
        self.waiting = WaitingBoard()  # why assigned tasks are not running yet (the balancer's word)
        self.api = ClientApi(ledger, self.standing, self.batcher, story=self.story, waiting=self.waiting)
        self.stream = BalancerStream(ledger, self.standing, self.batcher, dispatch_max, waiting=self.waiting)
        self.watches = WatchIndex(ledger, self.standing)
        self.specs = WorkSpecs(ledger, self.standing, self.batcher)
        self.retention_s = retention_s  # finished jobs older than this are compacted; None: kept
        self._next_compaction = 0.0
        self._next_disk_check = 0.0
        self._messages: dict[type, Callable[[MessageReceived, Any, float], list[Effect]]] = {
            Submit: self.api.on_submit,
            CancelJob: self.api.on_cancel,
            FileRegister: self.api.on_file_register,
            FileRelease: self.api.on_file_release,
            JobQuery: self.api.on_job_query,
            JobList: self.api.on_job_list,
            TaskQuery: self.api.on_task_query,
            FileLookup: self.api.on_file_lookup,
            FileList: self.api.on_file_list,
            Heartbeat: self._on_heartbeat,
            TaskResult: self.stream.on_result,
            Attach: self.stream.on_attach,
            Credit: self.stream.on_credit,
            TaskWaiting: self.stream.on_waiting,
            Watch: self.watches.on_watch,
            Work: self.specs.on_work,
        }
        # per reply kind (see master.batching): (committed, did not commit, this master stepped down)
        self._answers: dict[str, tuple[Callable, Callable | None, Callable | None]] = {
            "submit": (self.api.answer, self.api.unknown, self.api.not_leader),
            "cancel": (self.api.answer, self.api.unknown, self.api.not_leader),
            "write": (self.api.answer, self.api.unknown, self.api.not_leader),
            "complete": (self.stream.recorded, self.stream.result_unknown, self.stream.result_not_leader),
            "assign": (self.stream.assigned, self.stream.assign_unknown, None),
            "barrier": (self._serving, self._barrier_lost, None),
            "made": (self.specs.made, None, None),
            "compacted": (self._compacted, None, None),
            "leases": (self.specs.leases_ended, None, None),
        }

    def _on_heartbeat(self, ev: MessageReceived, m: Heartbeat, now: float) -> list[Effect]:
        link = self.stream.balancer
        return self.api.on_heartbeat(ev, m, now, attached=link is not None and link.route == ev.route)

    # ---- events --------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, MessageReceived):
            handler = self._messages.get(type(event.message))
            if handler is None:
                return [refuse(event, f"a master does not take {type(event.message).__name__} messages")]
            forbidden = authorise(event, roles_for(event.message))
            if forbidden:
                return forbidden
            return handler(event, event.message, now)
        if isinstance(event, Committed):
            return self._on_committed(event, now)
        if isinstance(event, DiskChecked):
            return self._on_disk(event.free_bytes, event.stimulus_id)
        if isinstance(event, ProposalFailed):
            return self._on_failed(event.token, event.reason, event.stimulus_id)
        if isinstance(event, TimerFired):
            return self._on_timer(event.name, now, event.stimulus_id)
        if isinstance(event, Started):
            return [StartTimer("raft", 0.0, event.stimulus_id), StartTimer("expire", 1.0, event.stimulus_id)]
        if isinstance(event, StopRequested):
            return []
        return []

    def _on_timer(self, name: str, now: float, cause: str) -> list[Effect]:
        if name == "raft":
            return self._check_raft(now, cause) + [StartTimer("raft", RAFT_POLL)]
        if name == "flush":
            return self.batcher.on_flush_timer(now, cause)
        if name == "expire":
            out = self._expire(now, cause) + self.specs.expire_leases(now, cause) + self._compact(now, cause)
            if now >= self._next_disk_check:
                self._next_disk_check = now + DISK_CHECK_S
                out.append(CheckDisk(cause))
            return out + [StartTimer("expire", 1.0)]
        if name == "watch":
            return self.watches.expire(now, cause)
        return []

    # ---- the disk alarm (etcd's NOSPACE) ----------------------------------------------------

    def _on_disk(self, free: int, cause: str) -> list[Effect]:
        st = self.standing
        was = st.disk_alarm()
        st.disk_free = free
        if st.disk_alarm() and not was:
            st.count("disk_alarms")
            return [Log(logging.ERROR, f"disk alarm: {free >> 20} MiB free where the journal lives (below "
                                       f"{st.disk_alarm_bytes >> 20} MiB); new jobs, files and work specs are refused "
                                       "until space is freed", cause)]
        if was and not st.disk_alarm():
            return [Log(logging.WARNING, f"disk alarm cleared: {free >> 20} MiB free; writes are taken again", cause)]
        return []

    # ---- retention -------------------------------------------------------------------------

    def _compact(self, now: float, cause: str) -> list[Effect]:
        """Once a minute, a serving leader proposes to forget the jobs that ended more than
        ``retention_s`` ago (its clock, in the command, so every master forgets the same)."""
        if self.retention_s is None or now < self._next_compaction or not self.standing.serving():
            return []
        self._next_compaction = now + COMPACT_EVERY_S
        wall = self.standing.wall(now)
        oldest = joblife.oldest_ended(self.ledger.state)
        if oldest is None or oldest >= wall - self.retention_s:
            return []
        return self.batcher.enqueue(CompactJobs(wall - self.retention_s, wall), ("compacted",), cause, now)

    def _compacted(self, reply: tuple, result: Applied, log_index: int, now: float, cause: str) -> list[Effect]:
        n = result.value["compacted"] if result.ok else 0
        if not n:
            return []
        self.standing.count("jobs_compacted", n)
        return [Log(logging.INFO, f"compacted {n} jobs that ended over {self.retention_s / 86400:g} days ago", cause)]

    # ---- Raft role -------------------------------------------------------------------------

    def _check_raft(self, now: float, cause: str) -> list[Effect]:
        st = self.standing
        old, st.view = st.view, self.raft_view()
        out: list[Effect] = []
        if (old.role, old.term, old.leader) != (st.view.role, st.view.term, st.view.leader):
            leader = st.client_address.get(st.view.leader or "", st.view.leader)
            out.append(Log(logging.INFO, f"raft: {st.view.role} in term {st.view.term}, leader {leader or 'unknown'}", cause))
        leading = st.view.role == "leader"
        if old.role == "leader" and (not leading or old.term != st.view.term):
            out += self._step_down(cause)
        if leading and st.barrier_term != st.view.term:
            st.barrier_term = st.view.term
            self.stream.begin_term()
            st.leader_since = now
            st.first_commit_at = None
            out += self._propose_barrier(now, cause)
        elif leading and st.barrier_lost and st.serving_term != st.view.term:
            out += self._propose_barrier(now, cause)
        return out

    def _propose_barrier(self, now: float, cause: str) -> list[Effect]:
        self.standing.barrier_lost = False
        barrier = Barrier(self.standing.view.term, self.name, self.standing.wall(now))
        return self.batcher.propose([(barrier, ("barrier", self.standing.view.term))], now, cause)

    def _barrier_lost(self, reply: tuple, reason: str, cause: str) -> list[Effect]:
        """The Barrier was not answered in time (followers that catch up from a snapshot take
        longer): its late commit is no answer any more (the proposal was taken), so another is
        proposed at the next Raft check; else this leader never served in its term (the chaos
        soak, seed 5: a leader wedged for good, every write refused)."""
        if reply[1] == self.standing.view.term:
            self.standing.barrier_lost = True
        return [Log(logging.WARNING, f"the Barrier of term {reply[1]} did not commit ({reason}); proposing another", cause)]

    def _step_down(self, cause: str) -> list[Effect]:
        """This master stopped leading: answer what it queued, forget the balancer."""
        out: list[Effect] = [Log(logging.WARNING, "no longer the leader; queued writes are answered NOT_LEADER", cause)]
        for reply in self.batcher.drop_queue():
            not_leader = self._answers[reply[0]][2]
            if not_leader is not None:
                out += not_leader(reply, cause)
        out += self.stream.step_down(cause)
        self.standing.serving_term = 0
        return out + self.watches.step_down(cause)

    def _serving(self, reply: tuple, result: Applied, log_index: int, now: float, cause: str) -> list[Effect]:
        """A ``barrier`` reply: this leader's first entry of its term committed; it serves."""
        st = self.standing
        if reply[1] == st.view.term and st.view.role == "leader":
            st.serving_term = reply[1]
            st.first_commit_at = now
            return [Log(logging.INFO, f"serving as leader of term {reply[1]}", cause)]
        return []

    # ---- commits ---------------------------------------------------------------------------

    def _on_committed(self, ev: Committed, now: float) -> list[Effect]:
        proposal = self.batcher.take(ev.token)
        if proposal is None:
            return []  # answered already (expired); the ledger has it either way
        results = ev.result if isinstance(ev.result, list) else [ev.result]
        out: list[Effect] = []
        for reply, result in zip(proposal.replies, results):
            out += self._answers[reply[0]][0](reply, result, ev.log_index, now, ev.stimulus_id)
        out = merge_acks(out)
        out += self.stream.dispatch(now, ev.stimulus_id)
        # A Barrier commits after every entry of earlier terms: any watched job may have changed.
        every = any(reply[0] == "barrier" for reply in proposal.replies)
        out += self.watches.wake(list(self.watches.watching) if every else proposal.jobs, ev.stimulus_id)
        return out + self.batcher.rearm(ev.stimulus_id)

    def _on_failed(self, token: int, reason: str, cause: str) -> list[Effect]:
        proposal = self.batcher.take(token)
        if proposal is None:
            return []
        self.standing.count("proposals_failed")
        out: list[Effect] = [Log(logging.WARNING, f"proposal {token} did not commit here ({reason}); its senders retry", cause)]
        for reply in proposal.replies:
            unknown = self._answers[reply[0]][1]
            if unknown is not None:
                out += unknown(reply, reason, cause)
        return out + self.batcher.rearm(cause)

    def _expire(self, now: float, cause: str) -> list[Effect]:
        out: list[Effect] = []
        for token in self.batcher.overdue(now):
            out += self._on_failed(token, f"no commit within {PROPOSAL_TIMEOUT:g} s", cause)
        return out

    # ---- operators -------------------------------------------------------------------------

    def story(self, job: bytes, task: int) -> list[dict[str, Any]]:
        """A task's life end to end, oldest first: one dict per step with ``step``, ``at`` (the
        ledger's wall clock), ``source`` ("ledger": durable, on every master; "leader": this
        master's bounded log, with the ``stimulus_id``) and what the step says (``fence``,
        ``balancer``, ``worker``, ``outcome``, ``error``, ``log_index``, ``code``)."""
        return tell(views.task_story(self.ledger.state, job, task), self.stream.log.of(job, task))

    def status(self, now: float) -> dict[str, Any]:
        st, v = self.standing, self.standing.view
        return {
            "name": self.name,
            "state": v.role,
            "term": v.term,
            "leader": st.leader_address(),
            "has_quorum": v.has_quorum,
            "serving": st.serving(),
            "commit_index": v.commit_index,
            "last_applied": v.last_applied,
            "log_size": v.log_size,
            **self.raft_detail(),
            "ledger": {**views.footprint(self.ledger.state), "commands_applied": self.ledger.state.applied,
                       **self.ledger.state.counters},
            "queued_writes": len(self.batcher.queue),
            "watches_parked": len(self.watches.watchers),
            "proposals_in_flight": len(self.batcher.proposals),
            "balancer": self.stream.status(),
            "disk": {"free_bytes": self.standing.disk_free, "alarm_below_bytes": self.standing.disk_alarm_bytes,
                     "alarm": self.standing.disk_alarm()},
            "leader_since": st.leader_since,
            "first_commit_s": None if st.first_commit_at is None or st.leader_since is None
            else round(st.first_commit_at - st.leader_since, 4),
            "core": dict(st.counters),
        }

    def validate_state(self) -> None:
        self.ledger.validate_state()
        assert all(p.replies for p in self.batcher.proposals.values())
        self.stream.validate()
        self.watches.validate()


# Where a step falls among those of one attempt that happened at the same instant.
_STEP_ORDER = {"submitted": 0, "proposed": 1, "refused": 2, "not_committed": 2, "assigned": 3, "skipped": 4,
               "sent": 4, "resent": 4, "result": 5, "ended": 6, "recorded": 7, "folded": 8}


def tell(recorded: list[dict[str, Any]], logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ledger's steps and the leader's logged ones as one story: by time, then by fence
    (tokens only grow), then by the order of an attempt's steps; a step with no time last."""
    steps = [{**s, "source": "ledger"} for s in recorded] + [{**s, "source": "leader"} for s in logged]

    def key(item: tuple[int, dict[str, Any]]) -> tuple:
        i, s = item
        at = s.get("at")
        return (at is None, at or 0.0, tuple(s.get("fence") or ()), _STEP_ORDER.get(s["step"], 9), i)

    return [s for _, s in sorted(enumerate(steps), key=key)]
