"""Events in, effects out: the vocabulary between every node core and its loop.

Theory of operation
-------------------
A node core is a pure state machine: ``core.handle(event, now) -> list[Effect]``. Events are
facts in the past tense (a message arrived, a timer fired, a stop was asked for); effects are
commands (send this, start that timer, stop). The loop (``cluster.node.loop``) owns the
sockets, poller, clock, signals and disk; it turns the world into events and performs effects
in the order the core returned them. Every event carries a ``stimulus_id`` and every effect a
``cause`` (the stimulus that produced it), so logs and ``story()`` can explain any decision
(the pattern of dask's worker state machine).

This module imports nothing that touches the world (no zmq, time, threading, os).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from proto.types import Message

# ---- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """The loop opened its sockets and is about to serve."""

    stimulus_id: str


class Peer(NamedTuple):
    """Who sent a message, as its authenticated key says: the key's ``name`` and ``role``
    (``cluster.node.keys.ROLES``). An insecure cluster's peers are ``Peer("", "")``: nobody
    in particular, allowed every role."""

    name: str
    role: str

    def may(self, *roles: str) -> bool:
        """True if this peer holds one of ``roles`` (always, in an insecure cluster)."""
        return not self.role or self.role in roles


ANYONE = Peer("", "")

# Role groups the cores' tables use (cluster.node.keys.ROLES names every role).
PEOPLE = frozenset({"client", "operator", "gateway"})  # submit jobs, own them, upload and read files
READERS = PEOPLE | {"monitor"}  # may read what people may read; a monitor may write nothing


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A well-formed message arrived on ``socket`` (``route``: the peer's id on a ROUTER) from
    ``peer``, the holder of the key it was authenticated with."""

    socket: str
    route: bytes | None
    sender: int
    message: Message
    stimulus_id: str
    peer: Peer = ANYONE


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A timer the core started has expired."""

    name: str
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class StopRequested:
    """SIGTERM/SIGINT or an operator asked the node to stop; sockets are still open."""

    reason: str
    stimulus_id: str


Event = Started | MessageReceived | TimerFired | StopRequested

# ---- effects ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` on ``socket``; ``route`` addresses a ROUTER peer."""

    socket: str
    message: Message
    route: bytes | None = None
    cause: str = ""


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Fire ``TimerFired(name)`` after ``delay`` seconds; restarting a name replaces it."""

    name: str
    delay: float
    cause: str = ""


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """Forget the timer ``name`` if it is pending."""

    name: str
    cause: str = ""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse a well-formed message this node does not accept: log, count, answer ERROR."""

    socket: str
    route: bytes | None
    message_type: int
    request_id: int
    detail: str
    cause: str = ""


@dataclass(frozen=True, slots=True)
class Forbidden:
    """``peer`` may not send this message here (its key's role, or a name not its own, or a job
    not its own): the loop logs it once per peer and message type, naming the key and address,
    and counts it. A wrong role is answered nothing; ``reply`` (e.g. ERROR not_owner to a client
    asking about another's job) is sent if given. The core changed nothing."""

    socket: str
    route: bytes | None
    message_type: str
    peer: Peer
    detail: str
    cause: str = ""
    reply: Message | None = None


def authorise(ev: MessageReceived, roles: frozenset[str] | None) -> list["Forbidden"]:
    """[] if ``ev``'s sender holds one of ``roles``; else the one ``Forbidden`` effect that refuses
    it. ``roles`` None: no role may send this message here."""
    if roles is not None and ev.peer.may(*roles):
        return []
    held = ev.peer.role or "none"
    return [Forbidden(ev.socket, ev.route, type(ev.message).__name__, ev.peer,
                      f"role {held} may not send {type(ev.message).__name__} here", ev.stimulus_id)]


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the operator (``level`` as in ``logging``)."""

    level: int
    text: str
    cause: str = ""


@dataclass(frozen=True, slots=True)
class Stop:
    """The core is done; the loop closes its sockets and exits 0."""

    reason: str
    cause: str = ""


Effect = Send | StartTimer | CancelTimer | Refuse | Log | Stop


@runtime_checkable
class Core(Protocol):
    """What a loop needs from a node core."""

    role: str

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Advance the state machine by one event; return the effects, in order."""
        ...

    def status(self, now: float) -> dict[str, Any]:
        """Role-specific state for STATUS_REPLY (plain data: str keys, msgpack-able values)."""
        ...

    def validate_state(self) -> None:
        """Raise AssertionError if an invariant of the core does not hold."""
        ...
