"""A balancer stand-in that completes every task the moment it arrives.

It speaks the real master ⇄ balancer protocol (ATTACH, CREDIT, WORKER_REQUEST, TASK_RESULT,
RESULT_ACK) with no workers behind it, so it measures and tests the masters alone: how many task
completions per second a Raft-replicated ledger commits (bench/ledger.py), and that results
survive a leader's death (tests/integration/test_masters.py). The real dispatcher is the
balancer tier (``balancer/``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import zmq

from cluster.node import keys
from proto import AppReason, Codec, ProtocolError, new_node_id
from proto.messages import (BATCH_MAX_ITEMS, Attach, Attached, Credit, Error, Heartbeat, MessageBatch, NotLeader, ResultAck,
                            TaskResult, WorkerRequest)


@dataclass
class EchoStats:
    received: int = 0  # WORKER_REQUESTs
    acked: int = 0  # RESULT_ACKs: completions committed (or found duplicate)
    refused: int = 0
    attaches: int = 0
    resent: int = 0
    acked_keys: set = field(default_factory=set)  # (job, task) acknowledged


class EchoBalancer:
    """Attach to the leader among ``masters``; answer each task with a DONE result."""

    def __init__(self, masters: list[str], *, credit: int = 512, epoch: int = 1, name: str = "echo",
                 summary: dict | None = None, credentials: keys.Credentials | None = None) -> None:
        self.masters = masters
        self.credentials = credentials  # a balancer's key; None: those learnt for the masters' addresses
        self.credit = credit
        self.epoch = epoch
        self.name = name
        self.summary = summary or {}
        self.stats = EchoStats()
        self.codec = Codec(new_node_id())
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.target = 0
        self.attached = False
        self.unacked: dict[tuple[int, int, int], TaskResult] = {}  # sent results awaiting RESULT_ACK
        self.outbox: list[TaskResult] = []  # results of this drain, to go as batches
        self.sent_at: dict[tuple[int, int, int], float] = {}
        self.pending_credit = 0

    def _connect(self, index: int) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.target = index
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 200_000)
        self.sock.setsockopt(zmq.RCVHWM, 200_000)
        keys.connect(self.sock, self.masters[index], self.credentials)
        self.attached = False
        self.codec.send(self.sock, Attach(1, self.epoch, self.credit, self.name))
        self.stats.attaches += 1
        self.attach_sent = self.last_heard = self.pinged = time.monotonic()

    def run(self, until: float, stop_after: int | None = None) -> EchoStats:
        """Serve until ``until`` (a monotonic time) or ``stop_after`` acknowledged results."""
        self._connect(self.target)
        checked = time.monotonic()
        while time.monotonic() < until and (stop_after is None or self.stats.acked < stop_after):
            # the timers (re-attach, resend) run every 100 ms even while messages keep coming:
            # a stream of answers from a master that does not accept us must not starve them
            if time.monotonic() - checked > 0.1:
                checked = time.monotonic()
                self._on_silence()
            if not self.sock.poll(50):
                self._on_silence()
                continue
            for _ in range(4096):
                try:
                    _, _, m = self.codec.recv(self.sock, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                except ProtocolError:
                    continue
                self.last_heard = time.monotonic()
                if type(m) is MessageBatch:  # each item alone, as a balancer's loop does
                    for item in self.codec.unbatch(m):
                        if isinstance(item, tuple):
                            self._on(item[1])
                else:
                    self._on(m)
            self._flush()
            if self.pending_credit and self.attached:
                self.codec.send(self.sock, Credit(self.epoch, self.pending_credit, 0))
                self.pending_credit = 0
        return self.stats

    def _flush(self) -> None:
        out, self.outbox = self.outbox, []
        for start in range(0, len(out), BATCH_MAX_ITEMS):
            chunk = out[start:start + BATCH_MAX_ITEMS]
            self.codec.send(self.sock, chunk[0] if len(chunk) == 1 else self.codec.batch(chunk))

    def _on_silence(self) -> None:
        now = time.monotonic()
        if not self.attached and now - self.attach_sent > 1.0:
            self._connect((self.target + 1) % len(self.masters))
            return
        if self.attached and now - self.last_heard > 1.5:
            # A killed leader sends no NOT_LEADER, and with every result acknowledged it may
            # have nothing to send either: the heartbeats below go unanswered. Try the next
            # master; a follower redirects to the new leader.
            self._connect((self.target + 1) % len(self.masters))
            return
        if self.attached and now - self.last_heard > 0.5 and now - self.pinged > 0.5:
            self.pinged = now
            self.codec.send(self.sock, Heartbeat(self.epoch, 0, 0))  # masters answer every heartbeat
        # results unanswered for a while: the leader may have died mid-commit; send again
        for key, sent in list(self.sent_at.items()):
            if now - sent > 1.0 and self.attached:
                self.codec.send(self.sock, self.unacked[key])
                self.sent_at[key] = now
                self.stats.resent += 1

    def _on(self, m) -> None:
        if isinstance(m, Attached):
            self.attached = True
            for key, result in self.unacked.items():  # results the old leader may not have recorded
                self.codec.send(self.sock, result)
                self.sent_at[key] = time.monotonic()
        elif isinstance(m, WorkerRequest):
            self.stats.received += 1
            key = (m.job_uuid_upper, m.job_uuid_lower, m.task_id)
            result = TaskResult(m.job_uuid_upper, m.job_uuid_lower, m.task_id, m.fence_term, m.fence_sequence,
                                0, 0, self.summary, None, None, self.name)
            self.unacked[key] = result
            self.sent_at[key] = time.monotonic()
            self.outbox.append(result)  # a drain's results go as MESSAGE_BATCHes, as a balancer's would
        elif isinstance(m, ResultAck):
            for upper, lower, task, _term, _seq in m.acks():
                key = (upper, lower, task)
                if self.unacked.pop(key, None) is not None:
                    self.sent_at.pop(key, None)
                    self.stats.acked += 1
                    self.stats.acked_keys.add(key)
                    self.pending_credit += 1
        elif isinstance(m, NotLeader):
            self.attached = False
            index = self.masters.index(m.leader) if m.leader in self.masters else (self.target + 1) % len(self.masters)
            self._connect(index)
        elif isinstance(m, Error):
            if m.reason in (AppReason.UNAVAILABLE, AppReason.OUTCOME_UNKNOWN):
                return  # the resend timer retries
            self.stats.refused += 1

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.ctx.term()
