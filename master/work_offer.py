"""The units a dispatch may hand out: a table's available queues less the units in flight (pure).

Theory of operation
-------------------
A spec's available units wait in one FIFO per unit priority (``UnitTable.available``, in the
snapshot). When the leader proposes units for assignment they stay available until the
assignment commits, so a dispatch used to skip every unit in flight, one by one, on every call:
O(units in flight), that is O(workers). ``UnitOffer`` mirrors the queues less the units the
leader *took* (proposed, not yet committed): a dispatch reads its fronts and skips nothing.

It is derived and soft, like ``master.ready.ReadyIndex`` for jobs: never in a snapshot, rebuilt
with the table (``of``), told of every change of the queues by the table (``queued``, ``left``),
and of the leader's proposals by ``WorkState.take``/``release`` (``master.ready.InFlight``).
Followers take nothing. A unit taken that leaves the queues (its lease committed) is no longer
taken; one released goes back to its place in the order of its queue.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Collection, Iterable, Mapping


class UnitOffer:
    """The available units not taken, per unit priority, in queue order; see the module docstring."""

    def __init__(self) -> None:
        self.queues: dict[int, deque[int]] = {}  # unit priority → available units not taken, in queue order
        self.taken: dict[int, int] = {}  # unit → its priority: proposed for assignment, still available

    @classmethod
    def of(cls, available: Mapping[int, deque[int]]) -> "UnitOffer":
        """The offer of queues ``available``, nothing taken."""
        offer = cls()
        offer.queues = {p: deque(q) for p, q in available.items()}
        return offer

    # ---- the table's queues changed (deterministic) ----------------------------------------------

    def queued(self, priority: int, uid: int, first: bool = False) -> None:
        """``uid`` joined its queue: last, or ``first`` (a redundant unit's next replica)."""
        q = self.queues.setdefault(priority, deque())
        q.appendleft(uid) if first else q.append(uid)

    def left(self, priority: int, uid: int) -> None:
        """``uid`` left its queue (leased). Near the front of the offer: what dispatch handed out."""
        if self.taken.pop(uid, None) is not None:
            return
        q = self.queues[priority]
        if q[0] == uid:
            q.popleft()
        else:
            q.remove(uid)
        if not q:
            del self.queues[priority]

    # ---- the leader's proposals (soft) -------------------------------------------------------------

    def take(self, units: Iterable[tuple[int, int]]) -> None:
        """``units`` ((unit, its priority) pairs) were proposed for assignment: off the offer
        until their lease commits (``left``) or ``release``. Units not in the offer are passed over."""
        for uid, p in units:
            q = self.queues.get(p)
            if q is None or uid in self.taken:
                continue
            if q[0] == uid:
                q.popleft()
            else:
                try:
                    q.remove(uid)
                except ValueError:  # not available (leased, finished): nothing to take
                    continue
            self.taken[uid] = p
            if not q:
                del self.queues[p]

    def release(self, uids: Iterable[int], available: Mapping[int, deque[int]]) -> None:
        """A proposal of ``uids`` will not commit (or is answered): those still taken go back to
        their places. O(how far into its queue the last of them sits): near the front."""
        back: dict[int, set[int]] = {}
        for uid in uids:
            p = self.taken.pop(uid, None)
            if p is not None:
                back.setdefault(p, set()).add(uid)
        for p, units in back.items():
            self._requeue(p, units, available[p])

    def release_all(self, available: Mapping[int, deque[int]]) -> None:
        """Nothing is in flight any more."""
        back: dict[int, set[int]] = {}
        for uid, p in self.taken.items():
            back.setdefault(p, set()).add(uid)
        self.taken = {}
        for p, units in back.items():
            self._requeue(p, units, available[p])

    def _requeue(self, priority: int, units: set[int], queue: deque[int]) -> None:
        """Put ``units`` (available, no longer taken) back into the offer in ``queue``'s order:
        rebuild the offer's front up to the last of them, keep the rest as it is."""
        front: list[int] = []
        kept = 0  # units of the new front that were in the offer already (its first ones, in order)
        left = len(units)
        for uid in queue:
            if uid in self.taken:
                continue
            front.append(uid)
            if uid in units:
                left -= 1
                if not left:
                    break
            else:
                kept += 1
        old = self.queues.get(priority, deque())
        self.queues[priority] = deque(front)
        self.queues[priority].extend(islice(old, kept, None))

    # ---- reading ---------------------------------------------------------------------------------

    def peek(self, n: int, exclude: Collection[int] = frozenset()) -> list[int]:
        """The next ``n`` units of the offer, highest unit priority first, skipping ``exclude``
        (a caller's own in-flight set, when it did not take them)."""
        out: list[int] = []
        for p in sorted(self.queues, reverse=True):
            for uid in self.queues[p]:
                if uid not in exclude:
                    out.append(uid)
                    if len(out) >= n:
                        return out
        return out

    def validate(self, available: Mapping[int, deque[int]]) -> None:
        """Raise AssertionError unless each queue of the offer is its available queue less the
        units taken, in order, and every unit taken is available under the priority it names."""
        for uid, p in self.taken.items():
            assert uid in available.get(p, ()), f"unit {uid} is taken but not available under priority {p}"
        for p, q in available.items():
            expect = [u for u in q if u not in self.taken]
            assert list(self.queues.get(p, ())) == expect, f"the offer of priority {p} is not its queue less the taken"
        assert all(self.queues.values()) and set(self.queues) <= set(available), "an empty or unknown offer queue"
