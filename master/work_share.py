"""The share of free slots among work specs: strict priority, then stride scheduling (pure).

Theory of operation
-------------------
When the balancers ask for ``n`` units, ``allocate`` decides how many each spec gets. Between
priority tiers the order is strict: a lower tier gets slots only when every spec of the higher
ones can take no more. Within a tier, slots go one at a time to the spec whose running count
is lowest relative to its weight, counting the slots already given ((running + given) /
weight, ties by name): stride scheduling (Waldspurger and Weihl, 1995), so the running shares
converge to the weights. A spec never gets past ``max_running`` or its available units, and a
paused spec gets nothing.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Demand:
    """What ``allocate`` needs to know of a spec right now."""

    name: str
    priority: int
    weight: float
    running: int
    available: int
    max_running: int | None = None
    paused: bool = False

    @property
    def room(self) -> int:
        """How many more units it can take: its available units, within ``max_running``."""
        return self.available if self.max_running is None else min(self.available, self.max_running - self.running)


def allocate(specs: Iterable[Demand], n: int) -> dict[str, int]:
    """How many of ``n`` free slots each spec gets: strict priority between tiers (a lower tier
    gets slots only when the higher ones can take no more), then stride scheduling within a tier
    (each slot to the spec with the lowest (running + given) / weight, ties by name), never past
    ``max_running`` or what a spec has available. Paused specs get nothing."""
    out: dict[str, int] = {}
    tiers: dict[int, list[Demand]] = {}
    for d in specs:
        if not d.paused and d.available > 0:
            tiers.setdefault(d.priority, []).append(d)
    left = n
    for p in sorted(tiers, reverse=True):
        if left <= 0:
            break
        left -= _stride(tiers[p], left, out)
    return out


def _stride(tier: list[Demand], left: int, out: dict[str, int]) -> int:
    """Give up to ``left`` slots among the specs of one tier, one at a time (stride
    scheduling), adding to ``out``; returns how many were given."""
    heap = [(d.running / d.weight, d.name, d, d.room) for d in tier if d.room > 0]
    heapq.heapify(heap)
    given = 0
    while heap and given < left:
        _, name, d, room = heapq.heappop(heap)
        got = out.get(name, 0) + 1
        out[name] = got
        given += 1
        if got < room:
            heapq.heappush(heap, ((d.running + got) / d.weight, name, d, room))
    return given
