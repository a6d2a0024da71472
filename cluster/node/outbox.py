"""The outbox: the task path's messages held to the end of one turn of the node loop, then sent
per peer as one MESSAGE_BATCH (issue 23).

Theory of operation
-------------------
Most of a task's cost on this path was paid per message, not per byte: a send, a receive, a
wake-up of the peer's poller, CURVE's box, the loop's bookkeeping. So the loop holds each Send of
a ``BATCHABLE`` type (WORKER_REQUEST, TASK_RESULT, RESULT_ACK, CREDIT) here, keyed by socket and
route, and at the end of its turn (after draining its sockets, posted events and timers) sends
what each peer has as one message: a lone one as itself, several as MESSAGE_BATCH, cut at
``BATCH_MAX_ITEMS`` items or ``BATCH_MAX_BYTES`` bytes. No linger: an idle path's message leaves
at the end of the turn that made it, within the same wake-up; under load a turn's messages (a
commit's hundred assignments, the results a worker collected while it was busy) travel
together, and the batch grows with the load, as Nagle's algorithm would but without its timer.

Order per peer is kept: a Send of another type to a peer that has messages held here first
flushes them (``take``), so a peer never sees an ATTACHED after the WORKER_REQUESTs that follow
it in the core's effects.
"""

from __future__ import annotations

from cluster.node.events import Send
from proto.messages import BATCH_MAX_ITEMS, BATCHABLE

Key = tuple[str, "bytes | None"]


class Outbox:
    """Held sends, per (socket name, route), in the order the core made them."""

    def __init__(self) -> None:
        self.held: dict[Key, list[Send]] = {}

    def __bool__(self) -> bool:
        return bool(self.held)

    @staticmethod
    def holds(effect: Send) -> bool:
        """Whether ``effect`` is of a type the outbox holds (else it goes at once)."""
        return type(effect.message) in BATCHABLE

    def hold(self, effect: Send) -> list[Send] | None:
        """Hold ``effect``; returns the peer's held sends to go now if they reached a batch's
        item limit (else None)."""
        key = (effect.socket, effect.route)
        group = self.held.get(key)
        if group is None:
            self.held[key] = [effect]
            return None
        group.append(effect)
        if len(group) >= BATCH_MAX_ITEMS:
            del self.held[key]
            return group
        return None

    def take(self, socket: str, route: bytes | None) -> list[Send] | None:
        """The sends held for one peer (to go before another message to it), or None."""
        return self.held.pop((socket, route), None)

    def take_all(self) -> list[list[Send]]:
        """Every peer's held sends, each peer's in order; the outbox is empty after."""
        groups = list(self.held.values())
        self.held.clear()
        return groups
