"""Bytes queued towards each peer of a ROUTER socket, bounded per peer.

libzmq bounds a connection's send queue in messages (``SNDHWM``), not bytes, and a ROUTER drops
silently beyond it. A peer that asks and never reads (a stalled client, a hostile one with a
valid key) could therefore make a node hold ``SNDHWM`` times its largest reply: gigabytes on a
master. So the loop sends every routed message with a libzmq tracker, which is done once libzmq
has let go of the message (written it to the connection, or dropped it with a closed one), and
keeps, per route, the bytes still held. A message that would take a route over its budget is
not sent: the loop counts and logs it, as libzmq would drop it at the high-water mark; the
peer's own protocol (a retry, a re-read) recovers, as from any lost message.

A message goes while the route holds less than its budget, so a route holds at most its budget
plus one message (itself at most the codec's largest).

Not every message carries a tracker (issue 23): a zero-copy send with a tracker cost the task
path about a third of a balancer's CPU (pyzmq frees such a frame through its garbage-collector
thread, one inproc message and a wake-up per send). libzmq lets go of one route's messages in
the order they were sent, so a done tracker releases every byte sent before it on that route
too. A message therefore carries one (``wants_tracker``) only when its route has no tracked
message pending, when it is large (``TRACK_BYTES``), or when ``TRACK_EVERY`` untracked bytes have
gone since the last tracked one; the bytes in between ride the next tracker. At most
``TRACK_EVERY`` bytes stay counted after a route's queue has drained, until its next message. The budget depends on who the peer is, by
the role of the key it last spoke with: a person's key (client, operator, monitor, gateway) gets
``people_bytes``; a node's key gets ``node_bytes``, larger, because a master's stream to its
balancer carries every dispatched task's spec, and a node is trusted to read its queue. In an
insecure cluster any peer may be a node, so every one gets ``node_bytes``.
"""

from __future__ import annotations

import collections
from typing import Any

MiB = 1 << 20
PEOPLE_BYTES = 64 * MiB  # a client's replies waiting to be read: a few full-size answers
NODE_BYTES = 1024 * MiB  # a balancer's stream of tasks waiting to be read
NODE_ROLES = frozenset({"master", "balancer", "storage", "worker"})
FORGET_S = 60.0  # an idle route's entry (nothing queued, not heard from) is forgotten after this
TRACK_BYTES = 64 * 1024  # a message this large always carries a tracker
TRACK_EVERY = 1 * MiB  # untracked bytes a route may send before its next message carries one


class _Route:
    __slots__ = ("budget", "name", "held", "queued", "heard", "untracked")

    def __init__(self, budget: int, name: str, heard: float) -> None:
        self.budget = budget
        self.name = name
        self.held = 0
        self.queued: collections.deque[tuple[Any, int]] = collections.deque()  # (tracker, bytes it releases)
        self.heard = heard
        self.untracked = 0  # bytes sent since the last tracked message: the next tracker releases them


class SendQueues:
    """Per-route byte budgets for one node's ROUTER sockets (see the module docstring)."""

    def __init__(self, people_bytes: int = PEOPLE_BYTES, node_bytes: int = NODE_BYTES, insecure: bool = False) -> None:
        self.people_bytes = people_bytes
        self.node_bytes = node_bytes
        self.insecure = insecure
        self._routes: dict[tuple[str, bytes], _Route] = {}

    def heard(self, socket: str, route: bytes, name: str, role: str, now: float) -> None:
        """``route`` on ``socket`` spoke with the key ``name`` of ``role`` ('' in an insecure cluster)."""
        entry = self._routes.get((socket, route))
        if entry is None:
            budget = self.node_bytes if (role in NODE_ROLES or self.insecure) else self.people_bytes
            self._routes[(socket, route)] = _Route(budget, name, now)
        elif entry.name != name:  # a route handed over to another key (ROUTER_HANDOVER)
            entry.budget = self.node_bytes if (role in NODE_ROLES or self.insecure) else self.people_bytes
            entry.name = name
            entry.heard = now
        else:
            entry.heard = now

    def blocked(self, socket: str, route: bytes) -> _Route | None:
        """The route's entry if it holds its budget or more (nothing more may go), else None."""
        entry = self._routes.get((socket, route))
        if entry is None:
            return None
        if entry.held >= entry.budget:
            self._release(entry)
            if entry.held >= entry.budget:
                return entry
        return None

    def wants_tracker(self, socket: str, route: bytes, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` to ``route`` should carry a tracker (module docstring)."""
        entry = self._routes.get((socket, route))
        if entry is None or nbytes >= TRACK_BYTES or entry.untracked + nbytes >= TRACK_EVERY:
            return True
        self._release(entry)
        return not entry.queued

    def sent(self, socket: str, route: bytes, tracker: Any, nbytes: int, now: float) -> None:
        """A message of ``nbytes`` went into libzmq's queue towards ``route``; ``tracker`` says
        when it left (None: it rides the route's next tracker)."""
        entry = self._routes.get((socket, route))
        if entry is None:
            budget = self.node_bytes if self.insecure else self.people_bytes
            entry = self._routes[(socket, route)] = _Route(budget, "", now)
        self._release(entry)  # as it goes, so a fast peer's queue of trackers stays short
        entry.held += nbytes
        if tracker is None:
            entry.untracked += nbytes
            return
        entry.queued.append((tracker, entry.untracked + nbytes))
        entry.untracked = 0

    def sweep(self, now: float) -> None:
        """Release what libzmq has let go of, and forget routes idle for ``FORGET_S``."""
        for key, entry in list(self._routes.items()):
            self._release(entry)
            if not entry.queued and now - entry.heard > FORGET_S:
                del self._routes[key]

    def status(self) -> dict[str, int]:
        """The number of routes followed, and the most bytes one of them holds."""
        for entry in self._routes.values():
            self._release(entry)
        return {"routes": len(self._routes), "largest_held_bytes": max((e.held for e in self._routes.values()), default=0)}

    @staticmethod
    def _release(entry: _Route) -> None:
        queued = entry.queued
        while queued and queued[0][0].done:
            entry.held -= queued.popleft()[1]
