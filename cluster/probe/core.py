"""Probe core: Paranoid Pirate heartbeats (zguide ch. 4) to a fixed set of peers.

Theory of operation
-------------------
Every ``interval`` seconds the core sends HEARTBEAT(sequence=n) to each peer on that peer's own
socket (``peer:<address>``), remembering when it sent it. A peer's probe answers on its
``serve`` socket with HEARTBEAT(reply=1) echoing the sequence; the round trip is measured from
the remembered send time. A peer with no reply for ``liveness`` intervals is *silent*, one with a
recent reply *alive*; every change of state is logged once. Sends are remembered for at most
``liveness`` intervals, so memory stays bounded whatever the peers do.

Pure: no sockets, no clock (``now`` comes with each event), no threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

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
from proto.messages import Heartbeat

SERVE = "serve"
BEAT = "beat"


def peer_socket(address: str) -> str:
    """The name of the socket a probe uses to reach ``address``."""
    return f"peer:{address}"


@dataclass
class PeerState:
    """What a probe knows of one peer."""

    address: str
    state: str = "unknown"  # unknown → alive ⇄ silent
    sent: dict[int, float] = field(default_factory=dict)  # sequence → when sent
    last_reply: float | None = None
    rtt: float | None = None
    replies: int = 0
    late_replies: int = 0


class ProbeCore:
    """Heartbeats to peers and answers to theirs."""

    role = "probe"

    def __init__(self, peers: list[str], interval: float = 1.0, liveness: int = 3, epoch: int = 0) -> None:
        if interval <= 0 or liveness < 1:
            raise ValueError("interval must be > 0 and liveness ≥ 1")
        self.interval = interval
        self.liveness = liveness
        self.epoch = epoch
        self.sequence = 0
        self.started_at: float | None = None
        self.peers = {a: PeerState(a) for a in peers}
        self.heartbeats_answered = 0

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Advance the probe by one event."""
        if isinstance(event, Started):
            self.started_at = now
            return self._beat(now, event.stimulus_id)
        if isinstance(event, TimerFired) and event.name == BEAT:
            return self._check(now, event.stimulus_id) + self._beat(now, event.stimulus_id)
        if isinstance(event, MessageReceived):
            return self._on_message(event, now)
        if isinstance(event, StopRequested):
            return []
        return []

    def _beat(self, now: float, cause: str) -> list[Effect]:
        self.sequence += 1
        out: list[Effect] = []
        for peer in self.peers.values():
            peer.sent[self.sequence] = now
            horizon = self.sequence - self.liveness
            for seq in [s for s in peer.sent if s <= horizon]:
                del peer.sent[seq]
            out.append(Send(peer_socket(peer.address), Heartbeat(self.epoch, self.sequence, 0), cause=cause))
        out.append(StartTimer(BEAT, self.interval, cause=cause))
        return out

    def _check(self, now: float, cause: str) -> list[Effect]:
        out: list[Effect] = []
        deadline = self.liveness * self.interval
        for peer in self.peers.values():
            since = peer.last_reply if peer.last_reply is not None else self.started_at
            if peer.state != "silent" and since is not None and now - since > deadline:
                peer.state = "silent"
                out.append(Log(logging.WARNING, f"peer {peer.address} silent: no heartbeat reply for {now - since:.1f} s", cause))
        return out

    def _on_message(self, event: MessageReceived, now: float) -> list[Effect]:
        msg = event.message
        if not isinstance(msg, Heartbeat):
            return [Refuse(event.socket, event.route, msg.code, getattr(msg, "request_id", 0),
                           f"a probe accepts HEARTBEAT and STATUS_QUERY, not {type(msg).__name__}", event.stimulus_id)]
        if event.socket == SERVE:
            if msg.reply:
                return [Refuse(event.socket, event.route, msg.code, 0, "a heartbeat reply sent to a serving socket", event.stimulus_id)]
            self.heartbeats_answered += 1
            return [Send(SERVE, Heartbeat(self.epoch, msg.sequence, 1), route=event.route, cause=event.stimulus_id)]
        address = event.socket.removeprefix("peer:")
        peer = self.peers.get(address)
        if peer is None or not msg.reply:
            return [Refuse(event.socket, None, msg.code, 0, "a heartbeat request on a peer socket", event.stimulus_id)]
        sent = peer.sent.pop(msg.sequence, None)
        if sent is None:
            peer.late_replies += 1  # older than the liveness window, or never sent
            return []
        peer.rtt = now - sent
        peer.last_reply = now
        peer.replies += 1
        if peer.state != "alive":
            peer.state = "alive"
            return [Log(logging.INFO, f"peer {address} alive, round trip {peer.rtt * 1e3:.2f} ms", event.stimulus_id)]
        return []

    def status(self, now: float) -> dict[str, Any]:
        """Each peer's state, last round trip and counts."""
        return {
            "interval_s": self.interval,
            "heartbeats_answered": self.heartbeats_answered,
            "peers": {
                p.address: {
                    "state": p.state,
                    "rtt_ms": None if p.rtt is None else round(p.rtt * 1e3, 3),
                    "replies": p.replies,
                    "late_replies": p.late_replies,
                    "last_reply_s_ago": None if p.last_reply is None else round(now - p.last_reply, 3),
                }
                for p in self.peers.values()
            },
        }

    def validate_state(self) -> None:
        """Invariants: bounded memory of sends, replies only for sequences we sent."""
        for p in self.peers.values():
            assert len(p.sent) <= self.liveness, (p.address, len(p.sent))
            assert all(0 < s <= self.sequence for s in p.sent), p.address
            assert p.state in ("unknown", "alive", "silent"), p.state
            assert (p.state == "alive") <= (p.last_reply is not None)
