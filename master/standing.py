"""Where one master stands, as its core sees it: Raft's view, the term it serves, its counters,
and the answers that depend on them (NOT_LEADER, errors, the ``stale`` flag of a read).

Theory of operation
-------------------
The core sees Raft only through ``RaftView`` (polled by ``master.core``): role, term, leader,
quorum and indices. A leader *serves* once its term's ``Barrier`` has committed (Raft §8); until
then its ledger may lack entries of earlier terms, so it hands out no work and its reads are
marked stale. Writes go to the leader only: ``writable`` answers where to go instead.

One ``Standing`` is shared by the core's handler groups (``master.api``, ``master.stream``,
``master.watches``, ``master.specs``), which read it and count into its ``counters`` (the
``core`` table of STATUS_REPLY); only ``master.core`` changes the role fields. Pure: no
sockets, clocks or threads; ``now`` comes with each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.node.events import Effect, Forbidden, MessageReceived, Peer, Refuse, Send
from proto.errors import AppReason
from proto.messages import Error, NotLeader, QueryReply

API = "api"
MAX_LIST = 10_000  # entries per listing (jobs, files, units)


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


DISK_ALARM_BYTES = 256 << 20  # below this much free disk, writes that grow the ledger are refused

class Standing:
    """This master's role and term as last polled, the term it serves, and its counters.
    ``client_address`` maps a master's Raft address to the address clients use."""

    def __init__(self, name: str, client_address: dict[str, str], wall_offset: float = 0.0) -> None:
        self.name = name
        self.client_address = client_address
        # Ledger times (submitted, assigned, ended) are wall-clock seconds, read on any master
        # after a failover; ``now`` is the loop's monotonic clock (timers, timeouts). The loop
        # gives the offset between them once, at start.
        self.wall_offset = wall_offset
        self.view = RaftView("follower", 0, None, False)
        self.serving_term = 0  # the term whose Barrier has committed on this leader
        self.barrier_term = 0  # the term a Barrier was proposed for
        self.barrier_lost = False  # that Barrier went unanswered: propose another
        self.leader_since: float | None = None
        self.first_commit_at: float | None = None
        self.counters: dict[str, int] = {}
        self.disk_free: int | None = None  # bytes free where the journal lives (DiskChecked); None: unknown
        self.disk_alarm_bytes = DISK_ALARM_BYTES

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def wall(self, now: float) -> float:
        """Wall-clock seconds for ``now`` (what the ledger records)."""
        return now + self.wall_offset

    def leading(self) -> bool:
        return self.view.role == "leader"

    def serving(self) -> bool:
        """Leading in a term whose Barrier has committed: it may hand out work."""
        return self.view.role == "leader" and self.serving_term == self.view.term

    def leader_address(self) -> str | None:
        if self.view.leader is None:
            return None
        return self.client_address.get(self.view.leader, self.view.leader)

    def not_leader(self, request_id: int, route: bytes | None, cause: str) -> Effect:
        """NOT_LEADER with this master's term and the leader's client address."""
        return Send(API, NotLeader(request_id, self.view.term, self.leader_address()), route, cause)

    def writable(self, ev: MessageReceived, request_id: int, grows: bool = True) -> Effect | None:
        """None if this master may take a write now; else the answer that says where to go.
        ``grows``: a write that adds to the ledger (a submit, a file, a work spec), refused
        while the disk alarm is raised; a cancel, a release or a task's result is taken even
        then (they let jobs end and space be reclaimed, as etcd's NOSPACE alarm allows deletes)."""
        if self.view.role != "leader":
            self.count("redirected")
            return self.not_leader(request_id, ev.route, ev.stimulus_id)
        if not self.view.has_quorum:
            return app_error(
                ev, request_id, AppReason.UNAVAILABLE, "unavailable",
                "this leader cannot reach a majority of masters: writes are refused until a quorum is back",
            )
        if grows and self.disk_alarm():
            self.count("refused_no_space")
            return app_error(
                ev, request_id, AppReason.REFUSED, "no_space",
                f"master {self.name}'s disk is nearly full ({self.disk_free >> 20} MiB free, the alarm is below "
                f"{self.disk_alarm_bytes >> 20} MiB): new writes are refused until an operator frees space; "
                "reads, cancels and releases still work",
            )
        return None

    def disk_alarm(self) -> bool:
        """True while this master's disk has less than ``disk_alarm_bytes`` free."""
        return self.disk_free is not None and self.disk_free < self.disk_alarm_bytes

    def reply(self, ev: MessageReceived, request_id: int, value: Any) -> Effect:
        return self.reply_to(ev.route, request_id, value, ev.stimulus_id)

    def reply_to(self, route: bytes | None, request_id: int, value: Any, cause: str) -> Effect:
        """QUERY_REPLY; ``stale`` is 0 only when a serving leader with a quorum answers."""
        stale = 0 if (self.serving() and self.view.has_quorum) else 1
        return Send(API, QueryReply(request_id, stale, self.view.term, self.view.last_applied, value, self.leader_address()),
                    route, cause)

    def not_found(self, ev: MessageReceived, request_id: int, text: str) -> Effect:
        """NOT_FOUND; a follower's says so and names the leader (``leader`` in its detail), which
        a client asks before it believes the answer (MasterLink)."""
        if self.view.role == "leader":
            return app_error(ev, request_id, AppReason.NOT_FOUND, "not_found", text)
        text += " on this master (a follower: it may be behind the leader)"
        return app_error_to(ev.route, request_id, AppReason.NOT_FOUND, "not_found", text, ev.stimulus_id,
                            refers_to=ev.message.code, extra={"leader": self.leader_address()})


def owns(peer: Peer, client: str) -> bool:
    """May ``peer`` act on a job submitted by ``client`` (a job's ``client``: the submitting key's
    name)? Its owner and operators may; in an insecure cluster everyone may."""
    return not peer.role or peer.role == "operator" or client == peer.name


def not_owner(ev: MessageReceived, request_id: int, job_id: bytes) -> Effect:
    """Refuse ``ev``: its sender does not own job ``job_id``. Answered (the sender is
    authenticated and may own other jobs), logged once, counted; nothing changes."""
    what = type(ev.message).__name__
    text = f"job {job_id.hex()} belongs to another key; only its owner or an operator may do that ({what})"
    error = Error(request_id, int(AppReason.REFUSED), ev.message.code, text, {"code": "not_owner", "job": job_id.hex()})
    return Forbidden(ev.socket, ev.route, what, ev.peer, f"job {job_id.hex()} is not its own", ev.stimulus_id, error)


def refuse(ev: MessageReceived, detail: str) -> Effect:
    """REFUSE: a message this master does not take (a protocol error, not an application one)."""
    return Refuse(ev.socket, ev.route, ev.message.code, getattr(ev.message, "request_id", 0), detail, ev.stimulus_id)


def app_error(ev: MessageReceived, request_id: int, reason: AppReason, code: str, text: str) -> Effect:
    """ERROR in answer to ``ev``'s message."""
    return app_error_to(ev.route, request_id, reason, code, text, ev.stimulus_id, refers_to=ev.message.code)


def app_error_to(route: bytes | None, request_id: int, reason: AppReason, code: str, text: str, cause: str,
                 refers_to: int = 0, extra: dict | None = None) -> Effect:
    """ERROR to ``route``; ``code`` (and ``extra``) go in its detail map."""
    return Send(API, Error(request_id, int(reason), refers_to, text, {"code": code, **(extra or {})}), route, cause)
