"""The active balancer's stream to the master leader: attach, heartbeats, failover and credit.

Theory of operation
-------------------
A balancer that becomes active (``balancer.binary_star``) opens a stream to the master leader
(design.md, "Balancer pair"; doc/dispatch.md, "The balancer pair"):

- **Attach.** It ATTACHes with its *epoch*, which grows at every activation (the core computes
  it). The masters refuse an older epoch than the one attached: a deposed balancer cannot take
  the stream back. On ATTACHED the leader sends its open assignments again, then ready tasks
  within the credit granted here.
- **Failover between masters.** While attached, the balancer heartbeats the master every tick;
  a master silent for ``timeout`` seconds is replaced by the next one. NOT_LEADER naming a
  leader moves the stream to that master at once; NOT_LEADER without one (an election is on)
  moves it to the next master after ``retry`` seconds, not at once, so that the pair does not
  spin through the masters until one wins. An unanswered ATTACH is sent again after ``retry``.
- **Credit towards the master.** The core asks for at most a queue's worth of tasks held at
  once (pending + running on workers + credit the master still holds; ``grant``), in batches
  of a quarter of that queue. Credit travels as CREDIT(stream = epoch). Open assignments resent
  on ATTACH are not charged against it (the master does not charge them): ``charge`` spends
  those first.

This module owns only the link's state (``MasterLink``); what arrives on it for tasks
(WORKER_REQUEST, RESULT_ACK, a refused result) is the core's. Pure: ``now`` comes with each
call; effects are returned, never sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cluster.node.events import Effect, Log, Send
from proto.errors import AppReason
from proto.messages import Attach, Attached, Credit, Error, Heartbeat, NotLeader


def master_socket(index: int) -> str:
    """The name of the DEALER socket connected to master ``index``."""
    return f"m{index}"


@dataclass
class MasterLink:
    """The state of the stream to one master (soft: reset at every activation)."""

    index: int = 0
    attached: bool = False
    attach_sent: float | None = None
    last_heard: float = 0.0
    term: int = 0
    leader: str = ""
    credit: int = 0  # credit the master still holds
    uncharged: int = 0  # open assignments still to come after ATTACHED (not charged)
    heartbeat_seq: int = 0


class MasterStream:
    """The stream from balancer ``name`` to one of ``masters`` (client endpoints, in socket
    order). ``counters`` is the core's, shared: the stream counts into it."""

    def __init__(self, name: str, masters: list[str], *, timeout: float, retry: float,
                 counters: dict[str, int]) -> None:
        self.name = name
        self.masters = list(masters)
        self.timeout = timeout
        self.retry = retry
        self.counters = counters
        self.link = MasterLink()

    @property
    def socket(self) -> str:
        """The socket of the master the stream is (or is being) attached to."""
        return master_socket(self.link.index)

    def accepts(self, socket: str) -> bool:
        """Whether a message on ``socket`` comes from the master the stream is with."""
        return socket == self.socket

    def send(self, message: Any, cause: str) -> Send:
        """``message`` to the master the stream is with."""
        return Send(self.socket, message, None, cause)

    def reset(self) -> None:
        """Forget the link (a new activation, or standing down); keep the master it was with."""
        self.link = MasterLink(index=self.link.index)

    # ---- attaching and failing over -----------------------------------------------------------

    def attach(self, now: float, epoch: int, ask: int, cause: str) -> list[Effect]:
        """ATTACH to the current master with ``epoch``, granting ``ask`` tasks of credit."""
        link = self.link
        link.attached = False
        link.attach_sent = now
        link.last_heard = now
        link.credit = ask
        self._count("attaches")
        return [self.send(Attach(1, epoch, ask, self.name), cause)]

    def next_master(self, now: float, epoch: int, ask: int, cause: str, leader: str | None = None) -> list[Effect]:
        """Attach to ``leader`` if it is one of the masters, else to the next one in order."""
        link = self.link
        if leader and leader in self.masters:
            link.index = self.masters.index(leader)
        else:
            link.index = (link.index + 1) % len(self.masters)
        return self.attach(now, epoch, ask, cause)

    def heard(self, now: float) -> None:
        """The master the stream is with sent something."""
        self.link.last_heard = now

    def tick(self, now: float, epoch: int, ask: int, cause: str) -> list[Effect]:
        """Once an interval: heartbeat the master, replace a silent one, or retry ATTACH."""
        link = self.link
        if link.attached:
            if now - link.last_heard > self.timeout:
                self._count("master_silent")
                return [Log(logging.WARNING, f"master {self.masters[link.index]} silent for "
                                             f"{now - link.last_heard:.1f} s; trying the next one", cause),
                        *self.next_master(now, epoch, ask, cause)]
            link.heartbeat_seq += 1
            return [self.send(Heartbeat(epoch, link.heartbeat_seq, 0), cause)]
        if link.attach_sent is None or now - link.attach_sent > self.retry:
            return self.attach(now, epoch, ask, cause)
        return []

    # ---- what the master says about the stream ------------------------------------------------

    def on_message(self, m: Any, now: float, epoch: int, ask: int, cause: str) -> list[Effect]:
        """ATTACHED, NOT_LEADER, HEARTBEAT or an ERROR (not about a result) from the master the
        stream is with."""
        link = self.link
        if isinstance(m, Attached):
            link.attached = True
            link.term = m.term
            link.leader = m.leader
            link.uncharged = m.open_assignments
            self._count("attached")
            return [Log(logging.INFO, f"attached to master {m.leader} (term {m.term}, epoch {epoch}, "
                                      f"{m.open_assignments} open assignments, credit {link.credit})", cause)]
        if isinstance(m, NotLeader):
            self._count("not_leader")
            if m.leader in self.masters and self.masters.index(m.leader) != link.index:
                return self.next_master(now, epoch, ask, cause, m.leader)
            # an election is on (no leader named): ask the next master after ``retry``, not at
            # once, or the pair would spin through the masters until one wins
            link.attached = False
            link.index = (link.index + 1) % len(self.masters)
            link.attach_sent = now
            return []
        if isinstance(m, Error):
            if isinstance(m.detail, dict) and m.detail.get("code") == "not_attached":
                self._count("reattached")  # the master restarted, or forgot us: attach again at once
                return self.attach(now, epoch, ask, cause)
            return self._on_error(m, cause)
        return []

    def _on_error(self, m: Error, cause: str) -> list[Effect]:
        code = m.detail.get("code", "") if isinstance(m.detail, dict) else ""
        if m.refers_to == Attach.code:
            self.link.attached = False
            self._count("attach_refused")
            return [Log(logging.WARNING, f"master refused ATTACH ({code}): {m.text}", cause)]
        if m.reason == AppReason.UNAVAILABLE:
            return []
        return [Log(logging.WARNING, f"master error ({code or m.reason}): {m.text}", cause)]

    # ---- credit ------------------------------------------------------------------------------

    def charge(self) -> None:
        """A WORKER_REQUEST arrived: it spends an open assignment first, else a unit of credit."""
        link = self.link
        if link.uncharged > 0:
            link.uncharged -= 1
        else:
            link.credit = max(0, link.credit - 1)

    def grant(self, target: int, holding: int, epoch: int, cause: str) -> list[Effect]:
        """CREDIT up to ``target`` tasks held (``holding`` here and on workers, plus what the
        master still holds), in batches of a quarter of the target."""
        link = self.link
        if not link.attached:
            return []
        want = target - holding - link.credit
        if want <= 0 or (want < max(1, target // 4) and link.credit > 0):
            return []  # grant in batches: one CREDIT per quarter of the queue, not per task
        link.credit += want
        return [self.send(Credit(epoch, want, 0), cause)]

    # ---- operators ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        link = self.link
        return {
            "address": self.masters[link.index] if self.masters else None,
            "attached": link.attached,
            "term": link.term,
            "leader": link.leader,
            "credit": link.credit,
        }

    def validate_state(self) -> None:
        link = self.link
        assert not self.masters or 0 <= link.index < len(self.masters)
        assert link.credit >= 0 and link.uncharged >= 0 and link.heartbeat_seq >= 0

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
