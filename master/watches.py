"""WATCH: long polls on the jobs' task endings, parked on the leader until a commit brings news.

Theory of operation
-------------------
WATCH is a long poll on the jobs' ``endings`` (the ledger's record of which tasks ended, in
order): the leader answers at once if a watched job has endings past the client's cursor or is
over; otherwise it parks the watch (one per connection: a newer one replaces it) until a commit
brings news for one of its jobs (``wake``), or its deadline (a ``watch`` timer at the earliest
one, ``expire``), when it answers with no news. Only the leader parks watches: it alone learns
of commits as they happen; when it stops leading, every parked watch is answered NOT_LEADER.

Parked watches are indexed by job (``watching``), so a commit looks only at those watching the
jobs it touched; their deadlines are a heap whose answered entries stay until popped (or until
they outnumber the parked ones, when it is rebuilt).

Pure: no sockets, clocks or threads; ``now`` comes with each call.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Iterable

from cluster.node.events import Effect, MessageReceived, StartTimer
from master import views
from master.ledger import Ledger
from master.standing import Standing, app_error, not_owner, owns
from proto.errors import AppReason
from proto.messages import Watch

MAX_WATCH_JOBS = 10_000  # jobs per WATCH
MAX_WATCH_TASKS = 10_000  # task endings per WATCH reply (the cursor advances only that far)
MAX_WATCH_WAIT = 60.0  # seconds a WATCH may be parked


@dataclass
class Watcher:
    """A parked WATCH: answered when a commit brings news for one of ``jobs``, or at ``deadline``."""

    route: bytes
    request_id: int
    jobs: dict[bytes, int]  # job id → the client's cursor
    deadline: float
    seq: int  # tells this watch from an earlier one of the same route in the deadline heap
    cause: str


def no_news() -> dict[str, Any]:
    return {"jobs": {}, "unknown": []}


class WatchIndex:
    """The parked watches of this master (the leader), by route and by job."""

    def __init__(self, ledger: Ledger, standing: Standing) -> None:
        self.ledger = ledger
        self.standing = standing
        self.watchers: dict[bytes, Watcher] = {}  # route → its parked watch
        self.watching: dict[bytes, dict[bytes, None]] = {}  # job id → routes parked on it (ordered)
        self.deadlines: list[tuple[float, int, bytes]] = []  # a heap; answered ones stay until popped
        self.timer_at: float | None = None  # when the pending ``watch`` timer fires
        self.seq = 0

    def on_watch(self, ev: MessageReceived, m: Watch, now: float) -> list[Effect]:
        if not self.standing.leading():  # only the leader hears of commits as they happen
            self.standing.count("redirected")
            return [self.standing.not_leader(m.request_id, ev.route, ev.stimulus_id)]
        if len(m.jobs) > MAX_WATCH_JOBS:
            return [app_error(ev, m.request_id, AppReason.REFUSED, "too_many_jobs",
                              f"{len(m.jobs)} jobs in one watch; watch at most {MAX_WATCH_JOBS} "
                              "(one watch per connection is parked: split them over several)")]
        bad = next(((j, c) for j, c in m.jobs.items() if c < 0), None)
        if bad is not None:
            return [app_error(ev, m.request_id, AppReason.REFUSED, "bad_cursor",
                              f"the cursor of job {bad[0].hex()} is {bad[1]}: a cursor counts the endings seen, from 0")]
        jobs = self.ledger.state.jobs
        foreign = next((j for j in m.jobs if j in jobs and not owns(ev.peer, jobs[j].client)), None)
        if foreign is not None:  # a watch answers with results: its owner's only
            return [not_owner(ev, m.request_id, foreign)]
        out: list[Effect] = []
        old = self._unpark(ev.route)
        if old is not None:  # one parked watch per connection: the newer one replaces it
            self.standing.count("watches_replaced")
            out.append(self.standing.reply_to(old.route, old.request_id, no_news(), ev.stimulus_id))
        value = self.news(m.jobs)
        if value is not None or m.wait_ms == 0:
            self.standing.count("watches_answered")
            return out + [self.standing.reply(ev, m.request_id, value if value is not None else no_news())]
        self.seq += 1
        w = Watcher(ev.route, m.request_id, dict(m.jobs), now + min(m.wait_ms / 1000, MAX_WATCH_WAIT),
                    self.seq, ev.stimulus_id)
        return out + self._park(w, now)

    def news(self, watched: dict[bytes, int]) -> dict[str, Any] | None:
        """WATCH's reply value for ``watched`` (job → cursor), or None if nothing is new. Jobs go
        in request order until ``MAX_WATCH_TASKS`` endings are in; a job with endings left past
        that waits for the next watch, which is answered at once."""
        state = self.ledger.state
        budget = MAX_WATCH_TASKS
        found: dict[str, Any] = {}
        unknown: list[str] = []
        for job_id, cursor in watched.items():
            if not views.has_news(state, job_id, cursor):
                continue
            view = views.endings_view(state, job_id, cursor, budget)
            if view is None:
                unknown.append(job_id.hex())
            elif view["cursor"] > cursor or view["done"] + view["failed"] <= cursor:
                # (else endings are left and no room for them: the next watch gets them at once)
                found[job_id.hex()] = view
                budget -= len(view["tasks"])
        if not found and not unknown:
            return None
        return {"jobs": found, "unknown": unknown}

    def wake(self, job_ids: Iterable[bytes], cause: str) -> list[Effect]:
        """Answer the parked watches that a commit touching ``job_ids`` brought news for."""
        routes: dict[bytes, None] = {}
        for job_id in job_ids:
            for route in self.watching.get(job_id, ()):
                if views.has_news(self.ledger.state, job_id, self.watchers[route].jobs[job_id]):
                    routes[route] = None
        out: list[Effect] = []
        for route in routes:
            w = self._unpark(route)
            self.standing.count("watches_woken")
            out.append(self.standing.reply_to(route, w.request_id, self.news(w.jobs) or no_news(), cause))
        return out

    def expire(self, now: float, cause: str) -> list[Effect]:
        """The ``watch`` timer fired: answer the watches whose deadline has come, with no news."""
        self.timer_at = None
        out: list[Effect] = []
        heap = self.deadlines
        while heap and (heap[0][0] <= now or not self._current(heap[0])):
            entry = heapq.heappop(heap)
            if self._current(entry):
                w = self._unpark(entry[2])
                self.standing.count("watches_expired")
                out.append(self.standing.reply_to(w.route, w.request_id, no_news(), cause))
        if heap:
            self.timer_at = heap[0][0]
            out.append(StartTimer("watch", max(0.0, heap[0][0] - now), cause))
        return out

    def step_down(self, cause: str) -> list[Effect]:
        """This master stopped leading: the next leader parks them (it alone hears of commits)."""
        out: list[Effect] = []
        for route in list(self.watchers):
            w = self._unpark(route)
            out.append(self.standing.not_leader(w.request_id, route, cause))
        self.deadlines.clear()
        self.timer_at = None
        return out

    def validate(self) -> None:
        for route, w in self.watchers.items():
            assert w.route == route and all(route in self.watching[j] for j in w.jobs)
        for job_id, routes in self.watching.items():
            assert routes and all(job_id in self.watchers[r].jobs for r in routes)
        if self.watchers:
            assert self.timer_at is not None, "parked watches with no timer to expire them"
            assert self.timer_at <= min(w.deadline for w in self.watchers.values())
        assert self.watchers or not self.watching

    def _park(self, w: Watcher, now: float) -> list[Effect]:
        self.watchers[w.route] = w
        for job_id in w.jobs:
            self.watching.setdefault(job_id, {})[w.route] = None
        if len(self.deadlines) > 2 * len(self.watchers) + 64:  # drop the answered ones' entries
            self.deadlines = [e for e in self.deadlines if self._current(e)]
            heapq.heapify(self.deadlines)
        heapq.heappush(self.deadlines, (w.deadline, w.seq, w.route))
        self.standing.count("watches_parked")
        if self.timer_at is not None and self.timer_at <= w.deadline:
            return []
        self.timer_at = w.deadline
        return [StartTimer("watch", max(0.0, w.deadline - now), w.cause)]

    def _current(self, entry: tuple[float, int, bytes]) -> bool:
        w = self.watchers.get(entry[2])
        return w is not None and w.seq == entry[1]

    def _unpark(self, route: bytes) -> Watcher | None:
        w = self.watchers.pop(route, None)
        if w is not None:
            for job_id in w.jobs:
                routes = self.watching[job_id]
                del routes[route]
                if not routes:
                    del self.watching[job_id]
        return w
