"""Batching and proposals: the vocabulary between the master core and its loop about Raft.

Theory of operation
-------------------
The leader validates a write, queues its command with how to answer it (a *reply*: a tuple
whose first item names its kind, e.g. ``("submit", route, request_id)``) and, when the loop has
drained its socket (a zero-delay ``flush`` timer), proposes everything queued as one ``Batch``
entry: one Raft round for many submits or completions. The loop replicates a ``Propose`` and
posts ``Committed`` (with what the ledger's ``apply`` returned) or ``ProposalFailed`` for its
token; the core answers each reply then (Raft §5.3: only what a quorum holds is acknowledged).
A proposal unanswered for ``PROPOSAL_TIMEOUT`` is failed by the core (outcome unknown).

Group commit (issue 23): at most ``max_in_flight`` proposals are in flight. While they commit,
what arrives queues, and goes as one entry once one of them is answered (``rearm``). Each Raft
entry costs the leader the same whatever it holds (an AppendEntries per follower, a pickle, a
MAC, an msync), so under load the batch grows with the round's length instead of the leader
paying that cost for every two or three commands: the leader's CPU per task falls as the load
rises. An idle leader proposes a lone command at once, so a single task waits for no one. A
queue of ``batch_max`` goes whatever is in flight. The assignments the balancer's credit allows
join the same queue (``BalancerStream.dispatch``), so one entry records a round's completions
and the assignments they make room for.

Pure: no sockets, clocks or threads; ``now`` comes with each call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.node.events import Effect, StartTimer
from master.commands import Batch, CancelJob, CompleteTask, Entry, encode
from master.standing import Standing

PROPOSAL_TIMEOUT = 5.0  # a proposal unanswered this long is answered OUTCOME_UNKNOWN
# A Raft entry is cut before its encoding passes this many bytes (a lone larger command goes
# alone). It keeps every entry far below pysyncobj's ``appendEntriesBatchSizeBytes`` (master.raft),
# above which pysyncobj sends an entry in pieces, a path that truncated entries under load.
ENTRY_MAX_BYTES = 8 << 20


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
    """Replicate ``entry`` through Raft; the loop posts Committed/ProposalFailed for ``token``.
    ``data`` is its encoding (``master.commands.encode``), made once, by the batcher."""

    entry: Entry
    token: int
    cause: str = ""
    data: bytes | None = None


@dataclass
class Proposal:
    """A proposal in flight: how to answer each of its commands once it commits or fails."""

    replies: list[tuple]  # one per command: how to answer it
    proposed_at: float
    jobs: set[bytes] = field(default_factory=set)  # whose endings or state its commit may change


class Batcher:
    """The write queue and the proposals in flight. ``batch_max`` commands make one batch at most."""

    def __init__(self, standing: Standing, batch_max: int = 2048, max_in_flight: int = 1) -> None:
        self.standing = standing
        self.batch_max = batch_max
        self.max_in_flight = max_in_flight
        self.queue: list[tuple[Any, tuple]] = []  # (command, how to answer) awaiting a flush
        self.flush_pending = False
        self.proposals: dict[int, Proposal] = {}
        self.tokens = 0

    def enqueue(self, command: Any, reply: tuple, cause: str, now: float) -> list[Effect]:
        """Queue ``command``; a full queue is proposed at once, else at the next ``flush``."""
        self.queue.append((command, reply))
        if len(self.queue) >= self.batch_max:
            return self.flush(now, cause)
        if not self.flush_pending:
            self.flush_pending = True
            # zero delay: the loop fires it after draining the socket, so a burst is one batch
            return [StartTimer("flush", 0.0, cause)]
        return []

    def on_flush_timer(self, now: float, cause: str) -> list[Effect]:
        self.flush_pending = False
        return self.flush(now, cause)

    def flush(self, now: float, cause: str) -> list[Effect]:
        """Propose what is queued, unless ``max_in_flight`` proposals are still being committed
        and the queue is short of ``batch_max`` (then ``rearm`` proposes it once one answers)."""
        if not self.queue:
            return []
        if len(self.proposals) >= self.max_in_flight and len(self.queue) < self.batch_max:
            return []
        batch, self.queue = self.queue[: self.batch_max], self.queue[self.batch_max:]
        return self.propose(batch, now, cause)

    def rearm(self, cause: str) -> list[Effect]:
        """A proposal was answered: what queued meanwhile goes at the next flush (after the loop
        has drained its sockets, so the entry takes all that arrived)."""
        if self.queue and not self.flush_pending and len(self.proposals) < self.max_in_flight:
            self.flush_pending = True
            return [StartTimer("flush", 0.0, cause)]
        return []

    def propose(self, items: list[tuple[Any, tuple]], now: float, cause: str) -> list[Effect]:
        """One ``Propose`` for ``items`` (command, reply): a single command, or a ``Batch``; cut
        in halves while its encoding is over ``ENTRY_MAX_BYTES``."""
        commands = [c for c, _ in items]
        entry = commands[0] if len(commands) == 1 else Batch(commands)
        data = encode(entry)
        if len(data) > ENTRY_MAX_BYTES and len(items) > 1:
            self.standing.count("entries_cut")
            half = len(items) // 2
            return self.propose(items[:half], now, cause) + self.propose(items[half:], now, cause)
        self.tokens += 1
        touched = {c.job_id for c in commands if isinstance(c, (CompleteTask, CancelJob))}
        self.proposals[self.tokens] = Proposal([reply for _, reply in items], now, touched)
        self.standing.count("proposals")
        self.standing.count("commands_proposed", len(commands))
        return [Propose(entry, self.tokens, cause, data)]

    def take(self, token: int) -> Proposal | None:
        """The proposal ``token`` (now answered), or None if it was answered already."""
        return self.proposals.pop(token, None)

    def overdue(self, now: float) -> list[int]:
        """The tokens of proposals unanswered for longer than ``PROPOSAL_TIMEOUT``."""
        return [t for t, p in self.proposals.items() if now - p.proposed_at > PROPOSAL_TIMEOUT]

    def drop_queue(self) -> list[tuple]:
        """Forget the queued writes (this master stopped leading); their replies, to answer."""
        replies = [reply for _, reply in self.queue]
        self.queue.clear()
        return replies
