"""Dispatch: which ready task goes to which worker, and why.

Theory of operation
-------------------
The master leader pushes ready tasks to the active balancer (``Dispatcher.add``); the balancer
hands them to workers as credit allows (``Dispatcher.place``). Four rules decide, in this order
(design.md, "Balancer pair"; issue 7):

1. **Credit** (FileMQ, zguide chapter 7). A worker is sent at most as many tasks as the free
   slots it announced (``Worker.free``). ``place`` records every placement in the registry with
   ``Registry.sent``, which takes the credit, so two calls never spend the same slot twice.
   With no credit anywhere, ``place`` returns at once.
2. **Capabilities.** A worker is *capable* of a task when its cores, memory and GPUs are at
   least the task's ``Need``, it holds every label the task asks for and, when the task names
   a kernel build, runs that one. A task no worker can run waits, with its reason in its
   story, and does not hold up the tasks queued behind it: each job keeps one FIFO queue per
   distinct ``Need``, and a queue whose head has no capable worker with credit is passed over
   for the rest of the call.
3. **Fairness.** Priorities first: every task of a higher priority that can be placed is
   placed before any of a lower one. Within a priority, jobs take turns (round-robin): each
   round takes one task from each job that has one it can place now, so a job of ten tasks
   queued behind one of a thousand is served within its first twenty placements. The turn
   order persists across calls (a job served moves to the back), so a trickle of one credit
   at a time is shared as fairly as a flood. Within a job, the oldest placeable task goes first.
4. **Locality.** Among the capable workers with credit, the task goes to the one whose cache
   holds the most bytes of its inputs (the count of inputs when sizes are unknown), e.g. the
   neighbouring tile's boundary; then the one with the most free slots (spreading load); then
   the first by name, so that every decision is deterministic.

A task a worker already runs under the same or a newer fence (the leader pushed it again after
a balancer failover, and the worker reported it running) is dropped, not sent twice.

Cost. ``place`` takes one pass over the workers with credit (to find, lazily, the capable ones
for each distinct need, in a heap by free slots), then O(log workers) per task placed without
inputs and O(eligible workers × inputs) per task placed with inputs (locality); queues that
cannot be served are set aside once per call, never rescanned task by task.

Explanations. ``story(job, task)`` says in words where a task went and why, or why it waits.
Waiting reasons are computed on demand against the registry ``place`` last saw (names,
capabilities and free slots as they are when asked), so a call costs no work per waiting task
and none per idle worker: ``place`` looks only at the workers with credit
(``Registry.with_credit``), so one freed slot among a thousand busy workers costs a round of
O(1), not O(workers). Pure: ``now`` is an argument; no clock, socket, thread or disk.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NoReturn

from balancer.registry import FILE_ID_BYTES, Capabilities, Fence, Registry, TaskKey, Worker

MIB = 1 << 20


class DispatchError(ValueError):
    """A task the dispatcher refuses (``code`` stable, ``text`` for people); nothing changed."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class Need:
    """What one task needs of the worker that runs it. ``kernel`` empty means any build.
    ``avoid``: workers it must not run on (a replica of a redundant work unit goes to a worker
    that has not run that unit yet)."""

    cores: int = 1
    memory_mb: int = 0
    gpus: int = 0
    labels: frozenset[str] = frozenset()
    kernel: str = ""
    avoid: frozenset[str] = frozenset()

    def fits(self, caps: Capabilities) -> bool:
        """Whether a worker with ``caps`` can run it (``avoid`` aside: see ``allows``)."""
        return (
            self.cores <= caps.cores
            and self.memory_mb <= caps.memory_mb
            and self.gpus <= caps.gpus
            and self.labels <= caps.labels
            and (not self.kernel or self.kernel == caps.kernel)
        )

    def allows(self, name: str, caps: Capabilities) -> bool:
        """Whether worker ``name`` with ``caps`` may run it."""
        return self.fits(caps) and name not in self.avoid

    def problem(self) -> str | None:
        for name in ("cores", "memory_mb", "gpus"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"need.{name} must be an integer >= 0, not {value!r}"
        if not isinstance(self.labels, frozenset) or not all(isinstance(x, str) for x in self.labels):
            return "need.labels must be a frozenset of strings"
        if not isinstance(self.kernel, str):
            return "need.kernel must be a string"
        if not isinstance(self.avoid, frozenset) or not all(isinstance(x, str) for x in self.avoid):
            return "need.avoid must be a frozenset of worker names"
        return None

    def text(self) -> str:
        """The need in words, e.g. ``4 cores, 1 GPU, label 'gpu'``."""
        parts = [_plural(self.cores, "core")]
        if self.memory_mb:
            parts.append(f"{self.memory_mb} MiB of memory")
        if self.gpus:
            parts.append(_plural(self.gpus, "GPU"))
        parts += [f"label {x!r}" for x in sorted(self.labels)]
        if self.kernel:
            parts.append(f"kernel {self.kernel!r}")
        if self.avoid:
            parts.append("not on " + ", ".join(sorted(self.avoid)))
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Task:
    """A ready task as the leader pushed it. ``inputs`` are 16-byte file ids; ``input_bytes``
    their sizes (same order) when known, else empty; ``fence`` is (Raft term, sequence)."""

    job: bytes
    task: int
    fence: Fence
    need: Need = Need()
    inputs: tuple[bytes, ...] = ()
    input_bytes: tuple[int, ...] = ()
    priority: int = 0

    @property
    def key(self) -> TaskKey:
        return (self.job, self.task)


@dataclass(frozen=True, slots=True)
class Placement:
    """Send ``task`` to worker ``worker_name``; ``why`` is its story."""

    task: Task
    worker_name: str
    why: str


@dataclass(slots=True)
class _Entry:
    task: Task
    seq: int  # arrival order, across all jobs
    added_at: float


@dataclass(slots=True)
class _Lane:
    """One job's pending tasks at one priority: a FIFO queue per distinct need."""

    queues: OrderedDict[Need, OrderedDict[int, _Entry]] = field(default_factory=OrderedDict)
    count: int = 0


@dataclass(frozen=True, slots=True)
class _Seen:
    """A worker as the last ``place`` left it (what waiting stories are told against)."""

    name: str
    caps: Capabilities
    free: int


class _Call:
    """One ``place`` call's view: per need, the capable workers with credit in a heap by (most
    free slots, name), so that the usual choice (no inputs to be near) costs O(log workers)
    and a round placing k tasks on n idle workers costs O(n + k log n), not O(n × k). An entry
    whose worker's credit changed since it was pushed is stale, and is pushed again with the
    new figure (or dropped at 0) when it reaches the top."""

    __slots__ = ("workers", "heaps")

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.heaps: dict[Need, list[tuple[int, str, Worker]]] = {}

    def _heap(self, need: Need) -> list[tuple[int, str, Worker]]:
        h = self.heaps.get(need)
        if h is None:
            h = [(-w.free, w.name, w) for w in self.workers if w.free > 0 and need.allows(w.name, w.caps)]
            heapq.heapify(h)
            self.heaps[need] = h
        while h and h[0][2].free != -h[0][0]:  # credit only shrinks within a call
            _, _, w = heapq.heappop(h)
            if w.free > 0:
                heapq.heappush(h, (-w.free, w.name, w))
        return h

    def any(self, need: Need) -> bool:
        """Whether some capable worker has credit."""
        return bool(self._heap(need))

    def best(self, need: Need) -> Worker:
        """The capable worker with the most free slots (then the first by name)."""
        return self._heap(need)[0][2]

    def eligible(self, need: Need) -> list[Worker]:
        """Every capable worker with credit (for the locality choice: O(workers))."""
        return [w for _, _, w in self._heap(need) if w.free > 0]


@dataclass
class Dispatcher:
    """Pending tasks by priority and job, placed on workers by credit, capability, fairness and
    locality (see the module docstring). ``story_limit`` bounds the placement stories kept."""

    story_limit: int = 100_000
    # priority -> job -> lane; the inner order is the round-robin turn order
    _levels: dict[int, OrderedDict[bytes, _Lane]] = field(init=False, default_factory=dict)
    _where: dict[TaskKey, tuple[int, Need]] = field(init=False, default_factory=dict)
    _done: OrderedDict[TaskKey, str] = field(init=False, default_factory=OrderedDict)
    _seen: Registry | None = field(init=False, default=None)  # the registry the last ``place`` saw
    _seen_seq: int = field(init=False, default=0)  # tasks with seq below it were considered
    _seq: int = field(init=False, default=0)
    last_place_at: float | None = field(init=False, default=None)
    counters: dict[str, int] = field(init=False, default_factory=dict)

    # ---- events ------------------------------------------------------------------------------

    def add(self, task: Task, now: float) -> None:
        """The leader pushed a ready task; it waits for ``place``."""
        why = _task_problem(task)
        if why:
            self._refuse("bad_task", why)
        if task.key in self._where:
            self._refuse("duplicate", f"task {_key_text(task.key)} is already pending")
        level = self._levels.setdefault(task.priority, OrderedDict())
        lane = level.get(task.job)
        if lane is None:
            lane = level[task.job] = _Lane()
        lane.queues.setdefault(task.need, OrderedDict())[task.task] = _Entry(task, self._seq, now)
        lane.count += 1
        self._seq += 1
        self._where[task.key] = (task.priority, task.need)
        self._done.pop(task.key, None)
        self._count("added")

    def remove(self, job: bytes, task: int) -> bool:
        """Forget a pending task (cancelled, or done elsewhere); False when it was not pending."""
        key = (job, task)
        where = self._where.pop(key, None)
        if where is None:
            return False
        priority, need = where
        self._unqueue(priority, job, need, task)
        self._done.pop(key, None)
        self._count("removed")
        return True

    def place(self, registry: Registry, now: float) -> list[Placement]:
        """Place as many pending tasks as credit allows; each placement is recorded in
        ``registry`` (``Registry.sent`` takes its credit). The caller sends them, in order."""
        workers = registry.with_credit()  # only these can take a task: O(free workers), not O(all)
        credit = sum(w.free for w in workers)
        out: list[Placement] = []
        self._count("place_calls")
        if credit and self._where:
            call = _Call(workers)
            for priority in sorted(self._levels, reverse=True):
                credit = self._place_level(priority, call, registry, out, credit)
                if not credit:
                    break
        self._seen = registry  # waiting stories are told against it when asked, not built per call
        self._seen_seq = self._seq
        self.last_place_at = now
        return out

    # ---- queries -----------------------------------------------------------------------------

    def story(self, job: bytes, task: int) -> str:
        """The last decision about a task, in words: where it went and why, or why it waits."""
        key = (job, task)
        where = self._where.get(key)
        if where is None:
            return self._done.get(key, "unknown: not pending, and no decision about it is kept")
        priority, need = where
        entry = self._levels[priority][job].queues[need][task]
        if self._seen is None or entry.seq >= self._seen_seq:
            return "waiting: not yet considered (no placement round since it arrived)"
        seen = tuple(_Seen(w.name, w.caps, w.free) for w in self._seen.workers())
        return "waiting: " + _why_waiting(need, seen)

    def pending(self) -> int:
        """How many tasks wait."""
        return len(self._where)

    def waiting(self, limit: int = 200) -> tuple[int, list[tuple[bytes, int, str]]]:
        """How many tasks wait, and why, per job and distinct need: ``(job, tasks, reason)``, the
        largest ``limit`` of them, the reason as ``story`` tells it for the queue's head (every
        task of one queue waits for the same reason). O(queues + workers), once a second."""
        seen = None if self._seen is None else tuple(_Seen(w.name, w.caps, w.free) for w in self._seen.workers())
        rows = []
        for level in self._levels.values():
            for job, lane in level.items():
                for need, queue in lane.queues.items():
                    if not queue:
                        continue
                    head = next(iter(queue.values()))
                    fresh = seen is None or head.seq >= self._seen_seq
                    rows.append((job, len(queue), "not yet considered" if fresh else _why_waiting(need, seen)))
        rows.sort(key=lambda r: -r[1])
        return len(self._where), rows[:limit]

    def status(self) -> dict:
        oldest = min(
            (next(iter(q.values())).added_at for level in self._levels.values() for lane in level.values()
             for q in lane.queues.values()),
            default=None,
        )
        return {
            "pending": len(self._where),
            "jobs": len({job for level in self._levels.values() for job in level}),
            "priorities": sorted(self._levels, reverse=True),
            "oldest_pending_since": oldest,
            "last_place_at": self.last_place_at,
            **self.counters,
        }

    def validate_state(self) -> None:
        """Check the invariants (test fixtures call this)."""
        seen = 0
        for priority, level in self._levels.items():
            assert level, priority
            for job, lane in level.items():
                assert lane.queues and lane.count == sum(len(q) for q in lane.queues.values()), job
                for need, q in lane.queues.items():
                    assert q, (job, need)
                    seqs = [e.seq for e in q.values()]
                    assert seqs == sorted(seqs), (job, need)
                    for tid, e in q.items():
                        assert e.task.task == tid and e.task.job == job and e.task.need == need
                        assert self._where[(job, tid)] == (priority, need)
                        seen += 1
        assert seen == len(self._where), (seen, len(self._where))
        assert len(self._done) <= self.story_limit

    # ---- inside ------------------------------------------------------------------------------

    def _place_level(self, priority: int, call: _Call, registry: Registry, out: list[Placement], credit: int) -> int:
        """Round-robin over the jobs of one priority until credit or placeable tasks run out."""
        level = self._levels[priority]
        active = list(level)
        while active and credit:
            still = []
            for job in active:
                if not credit:
                    break
                lane = level[job]
                placed = self._place_one(lane, call, registry, out)
                if placed is None:
                    continue  # nothing of this job can go now: out of this call
                credit -= placed
                if job in level:  # not emptied: to the back of the turn order
                    level.move_to_end(job)
                    still.append(job)
            active = still
        return credit

    def _place_one(self, lane: _Lane, call: _Call, registry: Registry, out: list[Placement]) -> int | None:
        """Place the lane's oldest placeable task: 1 placed, 0 one dropped as already running,
        None when none can go."""
        best: _Entry | None = None
        for need, q in lane.queues.items():
            head = next(iter(q.values()))
            if (best is None or head.seq < best.seq) and call.any(need):
                best = head
        if best is None:
            return None
        task = best.task
        running = registry.newest_fence(task.key)
        if running is not None and tuple(running[1]) >= tuple(task.fence):
            self._settle(task, f"dropped: {running[0]} already runs it under fence {tuple(running[1])}")
            self._count("dropped_running")
            return 0
        if task.inputs:
            scored = [(_locality(task, w), w) for w in call.eligible(task.need)]
            (cached_bytes, cached_n), w = min(scored, key=lambda s: (-s[0][0], -s[0][1], -s[1].free, s[1].name))
        else:  # nothing to be near: the most free slots, then the name (the heap's order)
            (cached_bytes, cached_n), w = (0, 0), call.best(task.need)
        why = _why_sent(task, w, cached_n, cached_bytes)
        registry.sent(w.name, task.key, task.fence)
        self._settle(task, why)
        out.append(Placement(task, w.name, why))
        self._count("placed")
        return 1

    def _settle(self, task: Task, why: str) -> None:
        """The task leaves the queue with its story."""
        del self._where[task.key]
        self._unqueue(task.priority, task.job, task.need, task.task)
        self._done[task.key] = why
        while len(self._done) > self.story_limit:
            self._done.popitem(last=False)

    def _unqueue(self, priority: int, job: bytes, need: Need, task: int) -> None:
        level = self._levels[priority]
        lane = level[job]
        q = lane.queues[need]
        del q[task]
        lane.count -= 1
        if not q:
            del lane.queues[need]
        if not lane.count:
            del level[job]
        if not level:
            del self._levels[priority]

    def _refuse(self, code: str, text: str) -> NoReturn:
        self._count(f"refused.{code}")
        raise DispatchError(code, text)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


# ---- words and checks ------------------------------------------------------------------------


def _locality(task: Task, w: Worker) -> tuple[int, int]:
    """(bytes, count) of the task's inputs already in the worker's cache."""
    n = size = 0
    sizes = task.input_bytes
    for i, f in enumerate(task.inputs):
        if f in w.cached:
            n += 1
            if sizes:
                size += sizes[i]
    return size, n


def _why_sent(task: Task, w: Worker, cached_n: int, cached_bytes: int) -> str:
    """E.g. ``sent to w2: 2 of 2 inputs (3.0 MiB) in its cache, 3 slots free`` (free slots as
    the decision found them, before this task took one)."""
    if not task.inputs:
        cache = "no inputs"
    else:
        size = f" ({cached_bytes / MIB:.1f} MiB)" if task.input_bytes else ""
        cache = f"{cached_n} of {len(task.inputs)} inputs{size} in its cache"
    return f"sent to {w.name}: {cache}, {_plural(w.free, 'slot')} free"


def _why_waiting(need: Need, seen: tuple[_Seen, ...]) -> str:
    """Why a task with ``need`` could not be placed on the workers as ``seen``."""
    if not seen:
        return "no worker registered"
    capable = [s for s in seen if need.allows(s.name, s.caps)]
    if not capable and need.avoid and any(need.fits(s.caps) for s in seen):
        return (f"every worker that can run it already ran a replica of this unit ({', '.join(sorted(need.avoid))}); "
                "it waits for another worker")
    if capable:
        if any(s.free > 0 for s in capable):  # placement stopped before reaching it
            return "behind other tasks in line"
        if len(capable) == 1:
            return f"the one worker that can run it ({capable[0].name}) has no free slot"
        return f"the {len(capable)} workers that can run it have no free slot"
    reasons = []
    held = frozenset().union(*(s.caps.labels for s in seen))
    missing = sorted(need.labels - held)
    if missing:
        noun = "label" if len(missing) == 1 else "labels"
        reasons.append(f"no worker has {noun} " + ", ".join(repr(x) for x in missing))
    if need.kernel and all(s.caps.kernel != need.kernel for s in seen):
        reasons.append(f"no worker runs kernel {need.kernel!r}")
    for attr, noun, unit in (("gpus", "GPU", ""), ("cores", "core", ""), ("memory_mb", "MiB of memory", " MiB")):
        want, most = getattr(need, attr), max(getattr(s.caps, attr) for s in seen)
        if want > most:
            what = f"{want} {noun}" if attr == "memory_mb" else _plural(want, noun)
            reasons.append(f"no worker has {what} (the most is {most}{unit})")
    if reasons:
        return "; ".join(reasons)
    return f"no single worker has all it needs ({need.text()})"


def _task_problem(task: Task) -> str | None:
    if not isinstance(task, Task):
        return f"not a Task: {task!r}"
    if not isinstance(task.job, bytes) or not task.job:
        return "task.job must be non-empty bytes"
    if not isinstance(task.task, int) or isinstance(task.task, bool):
        return f"task.task must be an integer, not {task.task!r}"
    f = task.fence
    if not (isinstance(f, tuple) and len(f) == 2 and all(isinstance(x, int) and x >= 0 for x in f)):
        return f"task.fence must be (term, sequence) integers >= 0, not {f!r}"
    if not isinstance(task.need, Need):
        return "task.need must be a Need"
    why = task.need.problem()
    if why:
        return why
    if not isinstance(task.inputs, tuple) or not all(isinstance(x, bytes) and len(x) == FILE_ID_BYTES for x in task.inputs):
        return f"task.inputs must be a tuple of {FILE_ID_BYTES}-byte file ids"
    sizes = task.input_bytes
    if not isinstance(sizes, tuple) or not all(isinstance(x, int) and x >= 0 for x in sizes):
        return "task.input_bytes must be a tuple of sizes >= 0"
    if sizes and len(sizes) != len(task.inputs):
        return f"task.input_bytes has {len(sizes)} sizes for {len(task.inputs)} inputs"
    if not isinstance(task.priority, int) or isinstance(task.priority, bool):
        return "task.priority must be an integer"
    return None


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _key_text(key: TaskKey) -> str:
    return f"{key[0].hex()}/{key[1]}"
