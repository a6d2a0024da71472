"""``Client.map``'s chunks and window (``cluster.mapfeed``), without sockets.

The chunker and the window are plain logic. The feeder runs its thread against a fake link
(``FakeLink``: records each submit, refuses on cue) and a fake watcher (a queue the test takes
durable chunks from and settles, as the real watcher would); waits are on futures and queues with
deadlines, never sleeps.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass

import cloudpickle
import pytest

from cluster.futures import TaskFuture
from cluster.mapfeed import ITEM_OVERHEAD, TOO_MANY_PENDING, Chunker, MapFeed, MapFeeder, Window
from cluster.node.masterlink import ClusterError, Refused

DEADLINE = 10.0


def futures(n: int) -> list[TaskFuture]:
    return [TaskFuture(None, None, "call") for _ in range(n)]


def calls(items) -> iter:
    return iter([((x,), {}) for x in items])


class Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling here")


# ---- the chunker ------------------------------------------------------------------------------


def test_chunks_hold_at_most_max_tasks_in_input_order():
    fs = futures(5)
    chunker = Chunker(calls(range(5)), fs, budget=1 << 20)
    first = chunker.cut(2)
    assert first.futures == fs[:2] and [cloudpickle.loads(t["args"]) for t in first.tasks] == [((0,), {}), ((1,), {})]
    assert chunker.left() == 3 and chunker.unsent() == fs[2:]
    assert chunker.cut(2).futures == fs[2:4]
    assert chunker.cut(2).futures == fs[4:] and chunker.left() == 0
    assert chunker.cut(2).tasks == []


def test_an_item_that_crosses_the_byte_budget_opens_the_next_chunk():
    size = len(cloudpickle.dumps(((0,), {}))) + ITEM_OVERHEAD
    fs = futures(5)
    chunker = Chunker(calls(range(5)), fs, budget=2 * size)
    assert len(chunker.cut(10).tasks) == 2
    assert chunker.left() == 3 and chunker.unsent() == fs[2:], "the carried item is not lost"
    assert chunker.cut(10).futures == fs[2:4]
    assert chunker.cut(10).futures == fs[4:]


def test_items_are_pickled_only_when_their_chunk_is_cut():
    pickled = []

    def dumps(obj):
        pickled.append(obj[0][0])
        return cloudpickle.dumps(obj)

    chunker = Chunker(calls(range(10)), futures(10), budget=1 << 20, dumps=dumps)
    chunker.cut(3)
    assert pickled == [0, 1, 2]


def test_an_item_that_cannot_be_pickled_fails_alone():
    fs = futures(3)
    chunk = Chunker(calls([1, Unpicklable(), 3]), fs, budget=1 << 20).cut(3)
    assert chunk.futures == [fs[0], fs[2]]
    ((future, exc),) = chunk.failed
    assert future is fs[1] and isinstance(exc, ClusterError) and "item 1" in str(exc)


def test_the_window_counts_outstanding_tasks_and_their_high_water_mark():
    w = Window(10)
    w.take(6)
    w.take(4)
    assert w.room() == 0 and w.most == 10
    w.give(3)
    assert (w.room(), w.outstanding, w.ended, w.most) == (3, 7, 3, 10)
    with pytest.raises(ValueError):
        Window(0)


# ---- the feeder, against a fake link and a fake watcher ---------------------------------------


@dataclass
class Ref:
    job: str
    log_index: int


class FakeLink:
    """Answers submits with job refs; ``refusals`` maps a submit's number (from 0, tries counted) to
    the error it gets instead."""

    def __init__(self, refusals=None) -> None:
        self.specs: list[dict] = []
        self.keys: list[bytes] = []
        self.refusals = dict(refusals or {})
        self.closed = threading.Event()

    def submit(self, kind, spec, key):
        n = len(self.keys)
        self.keys.append(key)
        if n in self.refusals:
            raise self.refusals[n]
        self.specs.append(spec)
        return Ref(f"{len(self.specs):032x}", 100 + n)

    def close(self):
        self.closed.set()


def feeder_with(link: FakeLink, window: int, chunk: int, patience: float = 30.0) -> tuple[MapFeeder, queue.Queue]:
    return MapFeeder(lambda: link, window=window, chunk=chunk, patience=patience), queue.Queue()


def make_feed(items, watched: queue.Queue, progress=None) -> MapFeed:
    fs = futures(len(items))
    return MapFeed(Chunker(calls(items), fs, 1 << 20), lambda tasks: {"tasks": tasks},
                   lambda ref, chunk: watched.put((ref, chunk)), progress)


def settle_all(feeder: MapFeeder, watched: queue.Queue, feed: MapFeed) -> list[int]:
    """Act as the watcher: settle each durable chunk's futures with their item, checking the
    window at every chunk; the chunk sizes in order."""
    sizes = []
    while not all(f.done() for f in feed.futures):
        ref, chunk = watched.get(timeout=DEADLINE)
        assert feeder.window.outstanding <= feeder.window.capacity
        sizes.append(len(chunk))
        for i, f in chunk.items():
            assert (f.job, f.task) == (ref.job, i)
            f.set_result(cloudpickle.loads(feed_spec_args(feeder, ref, i)))
    return sizes


def feed_spec_args(feeder: MapFeeder, ref: Ref, i: int) -> bytes:
    link = feeder.connect()
    args, _ = cloudpickle.loads(link.specs[int(ref.job, 16) - 1]["tasks"][i]["args"])
    return cloudpickle.dumps(args[0])


def test_a_map_goes_chunk_by_chunk_and_never_past_its_window():
    link = FakeLink()
    feeder, watched = feeder_with(link, window=6, chunk=3)
    seen = []
    feed = make_feed(list(range(20)), watched, progress=seen.append)
    feeder.feed(feed)  # returns once the first chunk is durable
    assert feed.futures[0].job == f"{1:032x}"
    sizes = settle_all(feeder, watched, feed)
    assert [f.result(0) for f in feed.futures] == list(range(20))
    assert sizes == [3, 3, 3, 3, 3, 3, 2] and sum(seen) == 20
    assert feeder.window.most <= 6 and feeder.window.outstanding == 0
    assert len(link.specs) == 7 and len(set(link.keys)) == 7
    feeder.close()
    assert link.closed.wait(DEADLINE)


def test_the_next_chunk_waits_for_endings():
    link = FakeLink()
    feeder, watched = feeder_with(link, window=4, chunk=2)
    feed = make_feed(list(range(10)), watched)
    feeder.feed(feed)
    ref, first = watched.get(timeout=DEADLINE)
    ref, second = watched.get(timeout=DEADLINE)
    assert watched.empty() and feeder.window.outstanding == 4
    first[0].set_result(0)  # one ending: not room for a whole chunk
    assert feeder.window.outstanding == 3
    first[1].set_result(1)
    ref, third = watched.get(timeout=DEADLINE)
    assert len(third) == 2 and feeder.window.most == 4
    feeder.close()


def test_a_refused_later_chunk_fails_its_futures_and_the_rest_of_the_map():
    link = FakeLink({2: Refused("bad_spec", "no")})
    feeder, watched = feeder_with(link, window=100, chunk=2)
    feed = make_feed(list(range(8)), watched)
    feeder.feed(feed)
    for _ in range(2):
        ref, chunk = watched.get(timeout=DEADLINE)
        for f in chunk.values():
            f.set_result("ok")
    with pytest.raises(Refused) as refused:
        feed.futures[4].result(DEADLINE)
    assert refused.value.code == "bad_spec"
    assert feed.futures[5].exception(DEADLINE).code == "bad_spec"
    for f in feed.futures[6:]:
        exc = f.exception(DEADLINE)
        assert isinstance(exc, ClusterError) and "bad_spec" not in str(type(exc)) and "earlier chunk" in str(exc)
    assert [f.result(0) for f in feed.futures[:4]] == ["ok"] * 4
    assert feeder.window.outstanding == 0, "a refused chunk gives its room back"
    # the feeder goes on with the next map
    after = make_feed([7], watched)
    feeder.feed(after)
    feeder.close()


def test_a_refused_first_chunk_is_raised_by_map():
    link = FakeLink({0: Refused("bad_spec", "no")})
    feeder, watched = feeder_with(link, window=100, chunk=2)
    feed = make_feed(list(range(5)), watched)
    with pytest.raises(Refused):
        feeder.feed(feed)
    assert len(link.keys) == 1, "nothing after the first chunk is submitted"
    feeder.close()


def test_an_unpicklable_item_of_the_first_chunk_is_raised_and_a_later_one_fails_alone():
    link = FakeLink()
    feeder, watched = feeder_with(link, window=100, chunk=2)
    with pytest.raises(ClusterError, match="item 1"):
        feeder.feed(make_feed([0, Unpicklable(), 2], watched))
    assert not link.keys
    feed = make_feed([0, 1, Unpicklable(), 3], watched)
    feeder.feed(feed)
    assert isinstance(feed.futures[2].exception(DEADLINE), ClusterError)
    ref, first = watched.get(timeout=DEADLINE)
    ref, second = watched.get(timeout=DEADLINE)
    assert list(second.values()) == [feed.futures[3]]
    feeder.close()


def test_too_many_pending_is_tried_again_with_the_same_key():
    busy = Refused(TOO_MANY_PENDING, "wait")
    link = FakeLink({1: busy, 2: busy})
    feeder, watched = feeder_with(link, window=100, chunk=2)
    feed = make_feed(list(range(4)), watched)
    feeder.feed(feed)
    ref, first = watched.get(timeout=DEADLINE)
    first[0].set_result(0)  # an ending wakes the waiting submit
    ref, second = watched.get(timeout=DEADLINE)
    assert link.keys[1] == link.keys[2] == link.keys[3] and len(link.specs) == 2
    assert feeder.counters["busy_refusals"] == 2
    feeder.close()


def test_too_many_pending_past_patience_fails_the_chunk():
    link = FakeLink({1: Refused(TOO_MANY_PENDING, "wait")})
    feeder, watched = feeder_with(link, window=100, chunk=2, patience=0.0)
    feed = make_feed(list(range(4)), watched)
    feeder.feed(feed)
    assert feed.futures[2].exception(DEADLINE).code == TOO_MANY_PENDING
    feeder.close()


def test_close_fails_what_was_not_submitted():
    link = FakeLink()
    feeder, watched = feeder_with(link, window=2, chunk=2)
    feed = make_feed(list(range(6)), watched)
    feeder.feed(feed)
    feeder.close()
    for f in feed.futures:
        assert isinstance(f.exception(DEADLINE), RuntimeError)
    assert link.closed.wait(DEADLINE)
    with pytest.raises(ClusterError):
        feeder.feed(make_feed([1], watched))


# ---- a map's futures share one condition ------------------------------------------------------


def test_a_sibling_settling_does_not_end_a_wait_for_another_future():
    shared = threading.Condition()
    first, second = TaskFuture("j", 0, "call", shared), TaskFuture("j", 1, "call", shared)
    got: queue.Queue = queue.Queue()
    waiting = threading.Thread(target=lambda: got.put(_outcome(first)))
    waiting.start()
    poll(lambda: len(shared._waiters) == 1)  # the waiter is parked on the shared condition
    second.set_result("second")  # wakes it: Future.result would take that for its timeout
    poll(lambda: len(shared._waiters) == 1 or not got.empty())  # parked again (or gave up)
    first.set_result("first")
    assert got.get(timeout=DEADLINE) == "first"
    waiting.join(DEADLINE)


def poll(predicate) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)  # the poll interval of a deadline loop


def _outcome(future: TaskFuture):
    try:
        return future.result(timeout=DEADLINE)
    except concurrent.futures.TimeoutError:
        return "timeout"


def test_shared_condition_futures_work_with_wait_and_as_completed():
    shared = threading.Condition()
    fs = [TaskFuture("j", i, "call", shared) for i in range(5)]
    fs[3].set_result(3)
    done, not_done = concurrent.futures.wait(fs, timeout=DEADLINE, return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {fs[3]} and len(not_done) == 4
    for i, f in enumerate(fs):
        if i != 3:
            f.set_exception(ValueError(i)) if i == 1 else f.set_result(i)
    assert sorted(f.task for f in concurrent.futures.as_completed(fs, timeout=DEADLINE)) == list(range(5))
    assert isinstance(fs[1].exception(0), ValueError) and fs[4].result(0) == 4
    with pytest.raises(concurrent.futures.TimeoutError):
        TaskFuture("j", 9, "call", shared).result(timeout=0)
