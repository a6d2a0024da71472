"""How many tasks a worker queues beyond its slots (issue 23): fixed, or adapting (pure).

Theory of operation
-------------------
A worker's credit is its slots plus a prefetch queue, so that a slot that frees starts its next
task at once instead of waiting for the dispatch round trip: the result sent (which is the
credit for the next task) to the next WORKER_REQUEST received. To keep ``slots`` slots busy
through a round trip of ``r`` seconds with tasks of ``d`` seconds, each slot needs ``r / d`` tasks
waiting (Little's law); the queue holds ``PREFETCH_SAFETY`` times that for all slots, between a
floor (the configured prefetch: long tasks keep that small queue, so they are not hoarded on one
worker while others idle) and a ceiling (``WorkerIdentity.prefetch_max``). With the two equal
the queue is fixed.

Estimates: a task's duration is a running average (weight ``DURATION_WEIGHT`` for the newest),
and a task running ``LONG_TASK`` times longer than it counts with its age at once, so a burst of
long tasks after short ones shrinks the queue before the first of them ends. The round trip is
measured from each result that returns credit (sent while the worker holds less than its credit)
to the next request received, paired oldest first, and the estimate is the 90th percentile of the
last ``RTT_SAMPLES``: a slot starves on the slow round trips, not the typical one (measured, 5,000
no-op callable units on 2 slots: the lower quartile, ~1 ms, kept a queue of 3-5 and drained
1,250-1,500 units/s; a fixed queue of 64 drained 1,800-2,000/s at 180 µs of worker CPU a unit
instead of 235). A sample over ``RTT_WAIT`` is a wait for work that was not there, not a round
trip, and is left out. Pure: every time comes in as an argument (the worker core's ``now``).
"""

from __future__ import annotations

from collections import deque
from typing import Any

PREFETCH_SAFETY = 2.0  # round trips' worth of tasks queued: the round trip varies under load
DURATION_WEIGHT = 0.2  # of the newest task's duration in the running estimate
RTT_SAMPLES = 32  # round trips kept; their 90th percentile is the estimate
RTT_WAIT = 1.0  # seconds: a longer "round trip" was a wait for work, and is not counted
ANNOUNCE_GROWTH = 4  # a queue grown by a quarter (or 2 tasks) is announced at once, not at the next heartbeat
SHRINK_BELOW = 0.75  # a queue shrinks only when it wants less than this share of it (hysteresis)
LONG_TASK = 4.0  # a task running this many times the estimate makes its age the estimate


class Prefetch:
    """How many tasks a worker queues beyond its slots: fixed at ``floor``, or adapting between
    ``floor`` and ``ceiling`` to the tasks' duration and the dispatch round trip (module
    docstring). ``depth`` is the queue now."""

    def __init__(self, slots: int, floor: int, ceiling: int) -> None:
        self.slots = slots
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.depth = floor
        self.task_s: float | None = None  # running estimate of a task's duration
        self.round_trip_s: float | None = None
        self.samples: deque[float] = deque(maxlen=RTT_SAMPLES)
        self.released: deque[float] = deque(maxlen=self.ceiling + slots)  # credit returned, oldest first
        self.announced = floor  # the depth the balancer was last told of
        self.adaptive = self.ceiling > self.floor
        self._taken = 0  # round trips measured

    def credit_returned(self, now: float) -> None:
        """A result that returns one task's credit went to the balancer at ``now`` (one sent while
        the worker holds its whole credit or more returns none: the balancer keeps it)."""
        if self.adaptive:
            self.released.append(now)

    def task_received(self, now: float) -> None:
        """A WORKER_REQUEST arrived at ``now``: a round trip closed, if one was open."""
        if not self.adaptive or not self.released:
            return
        sample = now - self.released.popleft()
        if sample > RTT_WAIT:
            return
        self.samples.append(sample)
        self._taken += 1
        if self._taken < 8 or self._taken % 8 == 0:  # a sort per 8 tasks, not per task
            ranked = sorted(self.samples)
            self.round_trip_s = ranked[int(len(ranked) * 0.9)]

    def task_ended(self, seconds: float) -> None:
        """A task ran for ``seconds`` (from its start to its end, as the core saw them)."""
        if self.task_s is None:
            self.task_s = seconds
        else:
            self.task_s += DURATION_WEIGHT * (seconds - self.task_s)

    def forget_returned(self) -> None:
        """A new registration: credit returned to the old balancer closes no round trip."""
        self.released.clear()

    def update(self, oldest_running_s: float, shrink: bool = True) -> bool:
        """Set ``depth`` from the estimates; ``oldest_running_s``: the age of the oldest task
        running now (one older than the estimate counts at once). ``shrink``: the queue may
        shrink now (only when the balancer is told at once: what it sent meanwhile under the
        larger credit would come beyond the smaller one). True when the queue grew enough since
        the balancer was last told to tell it now."""
        if not self.adaptive or self.task_s is None or self.round_trip_s is None:
            return False
        # a task running far past the estimate says the tasks got longer, before any of them ends
        outlived = oldest_running_s > LONG_TASK * self.task_s
        duration = max(oldest_running_s if outlived else self.task_s, 1e-6)
        want = min(self.ceiling, max(self.floor, int(PREFETCH_SAFETY * self.slots * self.round_trip_s / duration) + 1))
        # Up at once; down only past a margin, or when a task outlived the estimate: the
        # estimates wobble, and a queue that shrank by one and grew back each task would leave
        # the balancer's tasks in flight beyond the credit of the moment
        if want > self.depth or (shrink and (want < self.depth * SHRINK_BELOW or outlived)):
            self.depth = want
        if self.depth >= self.announced + max(2, self.announced // ANNOUNCE_GROWTH):
            self.announced = self.depth
            return True
        return False

    def status(self) -> dict[str, Any]:
        return {"prefetch": self.depth, "prefetch_range": [self.floor, self.ceiling],
                "task_s": None if self.task_s is None else round(self.task_s, 6),
                "round_trip_s": None if self.round_trip_s is None else round(self.round_trip_s, 6)}
