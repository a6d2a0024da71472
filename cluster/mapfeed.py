"""``Client.map`` over many items: chunks submitted as earlier tasks end, under a window.

Theory of operation
-------------------
A map of N items becomes jobs of at most ``MAP_CHUNK`` tasks each (fewer when their arguments
reach the spec's byte budget). One thread per client (``MapFeeder``) submits them, in the order
the maps were made, while the client has room: at most ``window`` tasks outstanding (submitted
and not yet ended) over all its maps. A chunk's items are pickled only when the chunk is cut, just
before its submit, and its pickled arguments are dropped once the submit is acknowledged; every
ending (a future settled by the ``Watcher``) gives room back, and the next chunk goes as soon as a
whole one fits. So the client holds at most one chunk of pickled arguments and the masters at most
``window`` of its pending tasks, however long the map: memory is bounded by the window, not by N
(the futures themselves, one per item, are what ``map`` returns).

``map`` returns once the map's first chunk is durable (committed by a quorum): what would refuse
every chunk (bad options, an unknown ``after`` job, no quorum, a function that cannot be pickled)
is raised by the call itself, as before. A later chunk that is refused, or that finds no quorum
before the client's deadline, settles its own futures with that error, and the rest of the map
with a ``ClusterError`` that names it (nothing is submitted after it); an item that cannot be
pickled settles its own future (in the first chunk it is raised, as before). A submit refused with
``too_many_pending`` (the leader's admission limit, ``master.api.ClientLoad``: other maps or
processes of the same key hold the room) is tried again with the same idempotency key, after an
ending of ours or a back-off, until ``patience`` seconds pass with none of our tasks ending.

Items are pickled when their chunk is cut, not when ``map`` is called: an argument changed in
place before its chunk is submitted travels as changed (Ray's ``remote`` pickles at once; ours
trades that for bounded memory).

``Chunker`` and ``Window`` are plain logic (no threads, no sockets); ``MapFeeder`` adds the
thread, its lock and the link.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import cloudpickle

from cluster.futures import TaskFuture
from cluster.node.masterlink import ClusterError, Refused

log = logging.getLogger("cluster.client")

MAP_CHUNK = 2048  # tasks per job a map submits
MAP_WINDOW = 10_000  # tasks a client keeps outstanding (submitted, not ended) through its maps
TOO_MANY_PENDING = "too_many_pending"  # the leader's refusal when a client holds too much (master.api)
ITEM_OVERHEAD = 16  # bytes a task's entry adds to a spec besides its pickled arguments


@dataclass
class Chunk:
    """One job's worth of a map: ``tasks`` (pickled arguments) and their ``futures`` in the same
    order; ``failed``: items that could not be pickled, with the error for their futures."""

    tasks: list[dict[str, bytes]] = field(default_factory=list)
    futures: list[TaskFuture] = field(default_factory=list)
    failed: list[tuple[TaskFuture, Exception]] = field(default_factory=list)


class Chunker:
    """Cuts a map's calls (``(args, kwargs)`` pairs, one per future) into chunks, pickling each
    item as it goes: at most ``max_tasks`` per chunk and ``budget`` bytes of arguments (an item
    that would cross the budget opens the next chunk; one item alone may exceed it, and the
    masters then say spec_too_large)."""

    def __init__(self, calls: Iterator[tuple[tuple, dict]], futures: list[TaskFuture], budget: int,
                 dumps: Callable[[Any], bytes] = cloudpickle.dumps) -> None:
        self.calls = calls
        self.futures = futures
        self.budget = budget
        self.dumps = dumps
        self.cut_so_far = 0  # futures handed out in chunks (the carried one included)
        self.carry: tuple[TaskFuture, bytes] | None = None  # pickled, over the last chunk's budget

    def left(self) -> int:
        """Items not yet in a chunk."""
        return len(self.futures) - self.cut_so_far + (self.carry is not None)

    def unsent(self) -> list[TaskFuture]:
        """The futures of the items not yet in a chunk."""
        return ([self.carry[0]] if self.carry is not None else []) + self.futures[self.cut_so_far:]

    def cut(self, max_tasks: int) -> Chunk:
        """The next chunk (empty when every item is cut)."""
        chunk = Chunk()
        size = 0
        while len(chunk.tasks) < max_tasks:
            if self.carry is not None:
                future, args = self.carry
                self.carry = None
            elif self.cut_so_far < len(self.futures):
                future = self.futures[self.cut_so_far]
                self.cut_so_far += 1
                call_args, call_kwargs = next(self.calls)
                try:
                    args = self.dumps((tuple(call_args), dict(call_kwargs)))
                except Exception as exc:  # noqa: BLE001 - whatever pickling raises is this item's failure
                    chunk.failed.append((future, ClusterError(f"cannot ship the arguments of item "
                                                              f"{self.cut_so_far - 1} to the workers: "
                                                              f"{type(exc).__name__}: {exc}")))
                    continue
            else:
                break
            if chunk.tasks and size + len(args) + ITEM_OVERHEAD > self.budget:
                self.carry = (future, args)
                break
            chunk.tasks.append({"args": args})
            chunk.futures.append(future)
            size += len(args) + ITEM_OVERHEAD
        return chunk


class Window:
    """Tasks outstanding (submitted through maps, not yet ended) against ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a map window holds at least one task, not {capacity}")
        self.capacity = capacity
        self.outstanding = 0
        self.most = 0  # the high-water mark of ``outstanding``
        self.ended = 0  # tasks given back so far (a change tells a waiting submit that room came)

    def room(self) -> int:
        return self.capacity - self.outstanding

    def take(self, n: int) -> None:
        self.outstanding += n
        self.most = max(self.most, self.outstanding)

    def give(self, n: int = 1) -> None:
        self.outstanding -= n
        self.ended += n


class Submitter(Protocol):
    """What the feeder submits through (a link of its own: ZeroMQ sockets stay in one thread)."""

    def submit(self, kind: str, spec: dict[str, Any], key: bytes) -> Any:
        """Submit one job; its ``JobRef`` (``job``, ``log_index``). Raises ClusterError."""

    def close(self) -> None: ...


@dataclass
class MapFeed:
    """One ``map`` call on its way: ``spec(tasks)`` makes a chunk's job spec, ``watch(ref,
    futures)`` hands a durable chunk's futures to the watcher, ``progress(n)`` is told of each
    durable chunk. ``first`` settles when the first chunk is durable (or cannot be)."""

    chunker: Chunker
    spec: Callable[[list[dict[str, bytes]]], dict[str, Any]]
    watch: Callable[[Any, dict[int, TaskFuture]], None]
    progress: Callable[[int], None] | None = None
    first: "threading.Event" = field(default_factory=threading.Event)
    error: BaseException | None = None  # why the first chunk failed
    abandoned: bool = False  # its caller gave up waiting (Ctrl-C): submit no more of it

    @property
    def futures(self) -> list[TaskFuture]:
        return self.chunker.futures


def fail(future: TaskFuture, exc: BaseException) -> None:
    """Settle ``future`` with its own copy of ``exc`` (one exception object raised from many
    futures would grow one traceback), unless it is settled already."""
    if not future.done():
        try:  # a copy without calling __init__ (Refused's takes other arguments than its args)
            own = type(exc).__new__(type(exc), *exc.args)
            own.args = exc.args
            own.__dict__.update(exc.__dict__)
        except Exception:  # noqa: BLE001 - an exception class that cannot be copied is shared
            own = exc
        own.__traceback__ = None
        try:
            future.set_exception(own)
        except Exception:  # noqa: BLE001 - settled meanwhile by the watcher: that answer stands
            pass


class MapFeeder(threading.Thread):
    """Submits the chunks of a client's maps in order, within its window (see the module doc)."""

    def __init__(self, connect: Callable[[], Submitter], *, window: int = MAP_WINDOW, chunk: int = MAP_CHUNK,
                 patience: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="cluster-map-feeder", daemon=True)
        if chunk < 1:
            raise ValueError(f"a map chunk holds at least one task, not {chunk}")
        self.connect = connect
        self.window = Window(window)
        self.chunk = chunk
        self.patience = patience
        self.clock = clock
        self.cond = threading.Condition()
        self.feeds: collections.deque[MapFeed] = collections.deque()
        self.current: MapFeed | None = None
        self.closing = False
        self.counters: dict[str, int] = {"chunks": 0, "busy_refusals": 0}

    def feed(self, feed: MapFeed) -> None:
        """Queue ``feed``; returns once its first chunk is durable, or raises why it is not."""
        with self.cond:
            if self.closing:
                raise ClusterError("the client is closed")
            if self.ident is None:
                self.start()
            self.feeds.append(feed)
            self.cond.notify_all()
        try:
            while not feed.first.wait(1.0):
                if not self.is_alive():
                    raise ClusterError("the client's map thread has stopped")
        except BaseException:
            feed.abandoned = True  # e.g. Ctrl-C: what is not submitted yet stays so
            raise
        if feed.error is not None:
            raise feed.error

    def close(self, timeout: float = 5.0) -> None:
        """Stop; every future of a map not wholly submitted that has not ended fails."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            feeds = ([self.current] if self.current is not None else []) + list(self.feeds)
            self.feeds.clear()
        if self.is_alive():
            self.join(timeout)
        closed = RuntimeError("the client was closed before this task was submitted or ended")
        for feed in feeds:
            for f in feed.futures:
                fail(f, closed)
            feed.error = feed.error or ClusterError("the client was closed")
            feed.first.set()

    def run(self) -> None:
        link = None
        try:
            link = self.connect()
            while True:
                with self.cond:
                    while not self.feeds and not self.closing:
                        self.cond.wait()
                    if self.closing:
                        return
                    self.current = self.feeds.popleft()
                self._feed(link, self.current)
                with self.cond:
                    self.current = None
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave futures waiting for ever
            log.exception("the map thread stopped")
            with self.cond:
                self.closing = True
                feeds = ([self.current] if self.current is not None else []) + list(self.feeds)
                self.feeds.clear()
            for feed in feeds:
                self._give_up(feed, Chunk(), ClusterError(f"the client's map thread stopped: {type(exc).__name__}: {exc}"))
        finally:
            if link is not None:
                link.close()

    def _ended(self, _future: Any) -> None:
        """A done callback: one of the map's tasks ended, its room comes back."""
        with self.cond:
            self.window.give()
            self.cond.notify_all()

    def _feed(self, link: Submitter, feed: MapFeed) -> None:
        """Submit ``feed``'s chunks as room comes."""
        while feed.chunker.left() and not feed.abandoned:
            want = min(self.chunk, self.window.capacity, feed.chunker.left())
            with self.cond:
                while self.window.room() < want and not self.closing:
                    self.cond.wait(1.0)
                if self.closing:
                    return
            chunk = feed.chunker.cut(want)
            if chunk.failed and not feed.first.is_set():  # as before: map raises for the first chunk's items
                self._give_up(feed, chunk, chunk.failed[0][1])
                return
            for future, exc in chunk.failed:
                fail(future, exc)
            if not chunk.tasks:
                continue
            with self.cond:
                self.window.take(len(chunk.tasks))
            try:
                ref = self._submit(link, feed.spec(chunk.tasks))
            except ClusterError as exc:
                with self.cond:
                    self.window.give(len(chunk.tasks))
                    self.cond.notify_all()
                self._give_up(feed, chunk, exc)
                return
            self._durable(feed, chunk, ref)
        for future in feed.chunker.unsent():  # abandoned: never submitted
            fail(future, ClusterError("not submitted: map() was interrupted before this item's chunk"))

    def _durable(self, feed: MapFeed, chunk: Chunk, ref: Any) -> None:
        """``chunk`` committed as job ``ref``: its futures learn their task and are watched."""
        self.counters["chunks"] += 1
        for i, future in enumerate(chunk.futures):
            future.job, future.task = ref.job, i
            future.add_done_callback(self._ended)
        feed.watch(ref, dict(enumerate(chunk.futures)))
        if feed.progress is not None:
            feed.progress(len(chunk.futures))
        feed.first.set()

    def _give_up(self, feed: MapFeed, chunk: Chunk, exc: ClusterError) -> None:
        """``chunk`` cannot be submitted: its futures fail with ``exc``, the rest of the map with
        an error naming it; ``map`` raises it if this was the first chunk."""
        for future in chunk.futures:
            fail(future, exc)
        for future, why in chunk.failed:
            fail(future, why)
        rest = ClusterError(f"not submitted: an earlier chunk of this map failed ({type(exc).__name__}: {exc})")
        for future in feed.chunker.unsent():
            fail(future, rest)
        if not feed.first.is_set():
            feed.error = exc
            feed.first.set()

    def _submit(self, link: Submitter, spec: dict[str, Any]) -> Any:
        """Submit one chunk's job; a ``too_many_pending`` refusal is retried with the same key
        after one of our tasks ends or a back-off, until ``patience`` passes with none ending."""
        key = os.urandom(16)
        delay = 0.05
        give_up_at = self.clock() + self.patience
        while True:
            try:
                return link.submit("list", spec, key)
            except Refused as exc:
                if exc.code != TOO_MANY_PENDING or self.clock() >= give_up_at:
                    raise
                self.counters["busy_refusals"] += 1
            with self.cond:
                ended = self.window.ended
                if not self.closing:
                    self.cond.wait(delay)
                if self.closing:
                    raise ClusterError("the client was closed")
                if self.window.ended != ended:
                    give_up_at = self.clock() + self.patience
            delay = min(delay * 2, 1.0)
