"""The worker's block cache against a dict of files: exact reads, one fetch per block, bounds."""

from __future__ import annotations

import errno
import os
import random
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import worker.cache as cache_mod
import worker.cache_index as index_mod
import worker.fetch as fetch_mod
from worker.cache import BlockCache

BS = 64  # a small block keeps the property tests fast; the code never assumes 1 MiB


def fid_of(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Source:
    """The cluster as a dict of files, counting every fetch as (fid, offset, length)."""

    def __init__(self, files: dict[bytes, bytes]) -> None:
        self.files = files
        self.calls: list[tuple[bytes, int, int]] = []
        self.lock = threading.Lock()

    def fetcher(self, fid: bytes):
        def fetch(offset: int, length: int) -> bytes:
            with self.lock:
                self.calls.append((fid, offset, length))
            return self.files[fid][offset:offset + length]
        return fetch

    def read(self, cache: BlockCache, fid: bytes, offset: int, length: int) -> bytes:
        return cache.read(fid, offset, length, len(self.files[fid]), self.fetcher(fid))

    def blocks_fetched(self, fid: bytes | None = None) -> list[tuple[bytes, int]]:
        out = []
        for f, offset, length in self.calls:
            if fid is None or f == fid:
                out += [(f, b) for b in range(offset // BS, (offset + length - 1) // BS + 1)]
        return out


def make(root: Path, capacity: int = 1 << 30, **kw) -> BlockCache:
    return BlockCache(root, capacity, BS, durable=kw.pop("durable", False), **kw)


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ---- reads --------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 7 * BS + 5), min_size=1, max_size=3),
    reads=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 8 * BS), st.integers(0, 3 * BS)), max_size=25),
)
def test_reads_equal_source_and_fetch_each_block_once(sizes, reads):
    files = {fid_of(i): payload(n, i) for i, n in enumerate(sizes)}
    src = Source(files)
    with tempfile.TemporaryDirectory() as tmp:
        cache = make(Path(tmp))
        for which, offset, length in reads:
            fid = fid_of(which % len(sizes))
            data = files[fid]
            assert src.read(cache, fid, offset, length) == data[offset:offset + length]
        fetched = src.blocks_fetched()
        assert len(fetched) == len(set(fetched)), "a block was fetched twice"
        for fid, offset, length in src.calls:
            assert offset % BS == 0 and length > 0
            assert length % BS == 0 or offset + length == len(files[fid]), "fetch not block-aligned"
        cache.validate_state()
        cache.close()


def test_adjacent_missing_blocks_merge_into_one_fetch(tmp_path):
    fid = fid_of(1)
    src = Source({fid: payload(10 * BS + 7)})
    cache = make(tmp_path)
    src.read(cache, fid, 2 * BS + 1, 5)
    src.read(cache, fid, 6 * BS, BS)
    src.calls.clear()
    assert src.read(cache, fid, 0, 10 * BS + 7) == src.files[fid]
    assert src.calls == [(fid, 0, 2 * BS), (fid, 3 * BS, 3 * BS), (fid, 7 * BS, 3 * BS + 7)]
    assert cache.path_if_complete(fid).read_bytes() == src.files[fid]


def test_fetches_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod, "MAX_FETCH", 4 * BS)
    fid = fid_of(1)
    src = Source({fid: payload(10 * BS)})
    cache = make(tmp_path)
    assert src.read(cache, fid, 0, 10 * BS) == src.files[fid]
    assert [length for _, _, length in src.calls] == [4 * BS, 4 * BS, 2 * BS]


def test_posix_clipping(tmp_path):
    fid = fid_of(1)
    src = Source({fid: payload(100), fid_of(2): b""})
    cache = make(tmp_path)
    assert src.read(cache, fid, 100, 10) == b""
    assert src.read(cache, fid, 500, 10) == b""
    assert src.read(cache, fid, 50, 0) == b""
    assert src.read(cache, fid, 90, 1000) == src.files[fid][90:]
    assert src.read(cache, fid_of(2), 0, 10) == b""
    assert cache.materialize(fid_of(2), 0, src.fetcher(fid_of(2))).read_bytes() == b""
    with pytest.raises(ValueError):
        src.read(cache, fid, -1, 10)
    with pytest.raises(ValueError):
        cache.read(fid, 0, 10, 99, src.fetcher(fid))  # the size of an immutable file cannot change


def test_stats_count_hits_misses_and_bytes(tmp_path):
    fid = fid_of(1)
    src = Source({fid: payload(3 * BS)})
    cache = make(tmp_path)
    src.read(cache, fid, 0, 10)
    src.read(cache, fid, 5, 10)
    src.read(cache, fid, 0, 3 * BS)
    s = cache.stats()
    assert (s["misses"], s["hits"], s["bytes_fetched"], s["bytes_cached"]) == (2, 1, 3 * BS, 3 * BS)
    src.read(cache, fid, 0, 3 * BS)  # complete now: the fast path
    assert cache.stats()["hits"] == 2
    assert (s["files"], s["capacity_bytes"]) == (1, 1 << 30)


def test_prepare_gives_an_fd_to_pread(tmp_path):
    fid = fid_of(1)
    src = Source({fid: payload(3 * BS + 1)})
    cache = make(tmp_path)
    cache.pin(fid)
    fd, n = cache.prepare(fid, BS - 3, 2 * BS, len(src.files[fid]), src.fetcher(fid))
    assert n == 2 * BS and os.pread(fd, n, BS - 3) == src.files[fid][BS - 3:3 * BS - 3]
    cache.materialize(fid, len(src.files[fid]), src.fetcher(fid))
    fd, n = cache.prepare(fid, 3 * BS, 100, len(src.files[fid]), src.fetcher(fid))
    assert n == 1 and os.pread(fd, n, 3 * BS) == src.files[fid][-1:]
    cache.unpin(fid)
    with pytest.raises(RuntimeError):
        cache.unpin(fid)


# ---- files the worker wrote ---------------------------------------------------------------------

def test_put_file_and_put_bytes_are_complete_without_fetching(tmp_path):
    a, b = fid_of(1), fid_of(2)
    src = Source({a: payload(5 * BS + 3, 1), b: payload(2 * BS, 2)})
    written = tmp_path / "out.bin"
    written.write_bytes(src.files[a])
    cache = make(tmp_path / "cache")
    cache.put_file(a, written)
    cache.put_bytes(b, src.files[b])
    for fid in (a, b):
        assert cache.path_if_complete(fid).read_bytes() == src.files[fid]
        assert src.read(cache, fid, BS - 1, 2 * BS) == src.files[fid][BS - 1:3 * BS - 1]
        assert cache.materialize(fid, len(src.files[fid]), src.fetcher(fid)) == cache.path_if_complete(fid)
    assert src.calls == [] and cache.stats()["bytes_fetched"] == 0
    cache.put_bytes(a, src.files[a])  # again: a no-op
    cache.validate_state()


def test_put_bytes_tops_up_a_partial_file(tmp_path):
    fid = fid_of(1)
    src = Source({fid: payload(4 * BS)})
    cache = make(tmp_path)
    src.read(cache, fid, BS, 1)
    cache.put_bytes(fid, src.files[fid])
    assert cache.path_if_complete(fid).read_bytes() == src.files[fid]
    assert len(src.calls) == 1 and cache.stats()["bytes_fetched"] == BS
    cache.validate_state()


def test_materialize_fetches_every_missing_block(tmp_path):
    fid = fid_of(1)
    src = Source({fid: payload(9 * BS + 1)})
    cache = make(tmp_path)
    src.read(cache, fid, 4 * BS, 1)
    assert cache.path_if_complete(fid) is None
    path = cache.materialize(fid, len(src.files[fid]), src.fetcher(fid))
    assert path.read_bytes() == src.files[fid] and path == cache.path_if_complete(fid)
    assert sorted(b for _, b in src.blocks_fetched()) == list(range(10))


# ---- bounds -------------------------------------------------------------------------------------

def test_eviction_keeps_within_capacity_least_recently_read_first(tmp_path):
    files = {fid_of(i): payload(2 * BS, i) for i in range(5)}
    src = Source(files)
    cache = make(tmp_path, capacity=5 * BS)
    a, b, c = fid_of(0), fid_of(1), fid_of(2)
    src.read(cache, a, 0, 2 * BS)
    src.read(cache, b, 0, 2 * BS)
    src.read(cache, a, 0, 1)  # a is now more recent than b
    src.read(cache, c, 0, 2 * BS)
    assert set(cache.cached_ids()) == {a, c} and b not in cache.cached_ids()
    assert cache.stats()["bytes_cached"] <= 5 * BS and cache.stats()["evictions"] == 1
    for i in range(40):
        fid = fid_of(random.Random(i).randrange(5))
        src.read(cache, fid, random.Random(i).randrange(2 * BS), BS)
        assert cache.stats()["bytes_cached"] <= 5 * BS
    assert {p.name for p in tmp_path.iterdir()} == {
        f"{fid.hex()}.{ext}" for fid in cache.cached_ids() for ext in ("data", "have")}
    cache.validate_state()


def test_pinned_files_are_never_evicted(tmp_path):
    files = {fid_of(i): payload(2 * BS, i) for i in range(6)}
    src = Source(files)
    cache = make(tmp_path, capacity=5 * BS)
    pinned = fid_of(0)
    cache.pin(pinned)
    src.read(cache, pinned, 0, 2 * BS)
    for i in range(1, 6):
        src.read(cache, fid_of(i), 0, 2 * BS)
        assert pinned in cache.cached_ids()
        assert cache.stats()["bytes_cached"] <= 5 * BS
    src.calls.clear()
    assert src.read(cache, pinned, 0, 2 * BS) == files[pinned] and src.calls == []
    cache.unpin(pinned)
    cache.validate_state()


def test_all_pinned_exceeds_capacity_and_counts_it(tmp_path):
    files = {fid_of(i): payload(2 * BS, i) for i in range(3)}
    src = Source(files)
    cache = make(tmp_path, capacity=5 * BS)
    for fid in files:
        cache.pin(fid)
        assert src.read(cache, fid, 0, 2 * BS) == files[fid]
    s = cache.stats()
    assert s["bytes_cached"] == 6 * BS and s["over_capacity"] >= 1 and s["evictions"] == 0
    for fid in files:
        cache.unpin(fid)
    assert cache.stats()["bytes_cached"] <= 5 * BS
    cache.validate_state()


def test_a_file_larger_than_the_cache_still_reads(tmp_path):
    fid = fid_of(1)
    src = Source({fid: payload(8 * BS)})
    cache = make(tmp_path, capacity=2 * BS)
    assert src.read(cache, fid, 0, 8 * BS) == src.files[fid]
    assert cache.stats()["bytes_cached"] <= 2 * BS


# ---- restart ------------------------------------------------------------------------------------

def test_restart_rebuilds_the_index(tmp_path):
    files = {fid_of(i): payload(3 * BS + i, i) for i in range(3)}
    src = Source(files)
    cache = make(tmp_path, durable=True)
    src.read(cache, fid_of(0), 0, 3 * BS + 0)
    src.read(cache, fid_of(1), BS + 1, 2)
    cache.put_bytes(fid_of(2), files[fid_of(2)])
    before = cache.stats()
    cache.close()
    (tmp_path / f"{fid_of(9).hex()}.data").write_bytes(b"orphan")
    (tmp_path / f"{fid_of(9).hex()}.1234.tmp").write_bytes(b"half written")

    again = make(tmp_path)
    after = again.stats()
    assert (after["files"], after["bytes_cached"], after["complete_files"]) == (3, before["bytes_cached"], 2)
    src.calls.clear()
    assert src.read(again, fid_of(0), 0, 10**6) == files[fid_of(0)]
    assert src.read(again, fid_of(1), BS, BS) == files[fid_of(1)][BS:2 * BS]
    assert src.calls == []
    assert src.read(again, fid_of(1), 0, 10**6) == files[fid_of(1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{fid_of(i).hex()}.{ext}" for i in range(3) for ext in ("data", "have"))
    again.validate_state()


def test_restart_takes_lru_order_from_mtimes(tmp_path):
    files = {fid_of(i): payload(2 * BS, i) for i in range(3)}
    src = Source(files)
    cache = make(tmp_path)
    for fid in files:
        src.read(cache, fid, 0, 2 * BS)
    cache.close()
    for age, i in enumerate((1, 0, 2)):  # oldest first: 1, then 0, then 2
        os.utime(tmp_path / f"{fid_of(i).hex()}.have", ns=(10**18 + age, 10**18 + age))
    smaller = make(tmp_path, capacity=4 * BS)
    assert set(smaller.cached_ids()) == {fid_of(0), fid_of(2)}
    smaller.validate_state()


def test_torn_or_foreign_have_files_are_dropped(tmp_path):
    files = {fid_of(i): payload(2 * BS, i) for i in range(3)}
    src = Source(files)
    cache = make(tmp_path)
    for fid in files:
        src.read(cache, fid, 0, 2 * BS)
    cache.close()
    (tmp_path / f"{fid_of(0).hex()}.have").write_bytes(b"BCH")  # torn header
    have1 = tmp_path / f"{fid_of(1).hex()}.have"
    have1.write_bytes(have1.read_bytes()[:-1])  # bitmap cut short
    again = make(tmp_path)
    assert again.cached_ids() == [fid_of(2)]
    assert not (tmp_path / f"{fid_of(0).hex()}.data").exists()
    src.calls.clear()
    assert src.read(again, fid_of(0), 0, 2 * BS) == files[fid_of(0)] and len(src.calls) == 1


# ---- concurrency and failure --------------------------------------------------------------------

class WatchedEvent(threading.Event):
    """The cache's in-flight marker, counting the threads waiting on it (no sleeps in tests)."""

    waiting = 0
    changed = threading.Condition()

    def wait(self, timeout=None):
        with WatchedEvent.changed:
            WatchedEvent.waiting += 1
            WatchedEvent.changed.notify_all()
        return super().wait(timeout)


@pytest.fixture
def watched(monkeypatch):
    WatchedEvent.waiting = 0
    monkeypatch.setattr(fetch_mod, "_Event", WatchedEvent)

    def until_waiting(n: int) -> None:
        with WatchedEvent.changed:
            assert WatchedEvent.changed.wait_for(lambda: WatchedEvent.waiting >= n, timeout=10)
    return until_waiting


def run_threads(target, n: int) -> list:
    results: list = [None] * n

    def work(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[i] = e
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_concurrent_readers_fetch_a_block_once(tmp_path, watched):
    fid = fid_of(1)
    data = payload(4 * BS)
    calls = []
    release = threading.Event()

    def fetch(offset, length):
        calls.append((offset, length))
        watched(7)  # every other reader is now waiting on this fetch
        release.set()
        return data[offset:offset + length]

    cache = make(tmp_path)
    threads, results = run_threads(lambda i: cache.read(fid, BS + i, 10, len(data), fetch), 8)
    for t in threads:
        t.join(10)
    assert release.is_set()
    assert results == [data[BS + i:BS + i + 10] for i in range(8)]
    assert calls == [(BS, BS)]
    cache.validate_state()


def test_a_failing_fetch_propagates_and_a_waiter_fetches_for_itself(tmp_path, watched):
    fid = fid_of(1)
    data = payload(3 * BS)
    cache = make(tmp_path)
    calls = []
    second: list = []

    def good(offset, length):
        calls.append("good")
        return data[offset:offset + length]

    def failing(offset, length):
        calls.append("fail")
        # The blocks are in flight now: a second reader must wait on them, then fetch itself.
        waiter = threading.Thread(target=lambda: second.append(cache.read(fid, 0, 2 * BS, len(data), good)))
        waiter.start()
        second.append(waiter)
        watched(1)
        raise OSError(errno.EIO, "no replica")

    with pytest.raises(OSError) as raised:
        cache.read(fid, 0, 2 * BS, len(data), failing)
    assert raised.value.errno == errno.EIO
    second[0].join(10)
    assert second[1] == data[:2 * BS]
    assert calls == ["fail", "good"]
    cache.validate_state()


def test_a_failed_fetch_leaves_nothing_present_on_disk(tmp_path):
    fid = fid_of(1)
    cache = make(tmp_path)

    def failing(offset, length):
        raise OSError(errno.EIO, "no replica")

    with pytest.raises(OSError):
        cache.read(fid, 0, 10, 3 * BS, failing)
    with pytest.raises(OSError, match="returned 3 bytes"):
        cache.read(fid, 0, 10, 3 * BS, lambda offset, length: b"abc")
    assert cache.stats()["bytes_cached"] == 0 and cache.path_if_complete(fid) is None
    assert cache.cached_ids() == [] and sorted(tmp_path.iterdir()) == []
    cache.validate_state()
    cache.close()
    again = make(tmp_path)
    assert again.stats()["bytes_cached"] == 0
    data = payload(3 * BS)
    assert again.read(fid, 0, 3 * BS, 3 * BS, lambda o, n: data[o:o + n]) == data


# ---- read-ahead and batched syncs ---------------------------------------------------------------

def test_read_ahead_grows_for_a_sequential_reader_and_stops_on_random_access():
    ra = cache_mod.ReadAhead(max_window=8 * cache_mod.BLOCK, min_window=2 * cache_mod.BLOCK)
    mib = cache_mod.BLOCK
    assert ra.advise(0, mib) == (mib, 2 * mib)
    assert ra.advise(mib, mib) == (2 * mib, 4 * mib)
    assert ra.advise(3 * mib, mib) == (4 * mib, 8 * mib)  # a little out of order: still a stream
    assert ra.advise(2 * mib, mib) == (4 * mib, 8 * mib)  # capped at max_window
    assert ra.advise(100 * mib, mib) is None  # a jump: random access
    assert ra.advise(7 * mib, mib) is None
    assert ra.advise(8 * mib, mib) == (9 * mib, 2 * mib)  # two in a row start a new stream
    assert cache_mod.ReadAhead(max_window=0).advise(0, mib) is None


def test_prefetch_fetches_each_block_once_in_the_background(tmp_path, watched):
    fid = fid_of(1)
    data = payload(20 * BS + 3)
    src = Source({fid: data})
    cache = make(tmp_path)
    assert cache.prefetch(fid, 0, 4 * BS, src.fetcher(fid)) == 0  # not held by a reader: nothing
    cache.pin(fid)
    assert src.read(cache, fid, 0, 10) == data[:10]
    assert cache.prefetch(fid, BS, 30 * BS, src.fetcher(fid)) == 20  # clipped at the size
    assert cache.prefetch(fid, BS, 30 * BS, src.fetcher(fid)) == 0  # claimed: never twice
    assert src.read(cache, fid, 0, len(data)) == data  # waits for the prefetches as needed
    cache.close()  # waits for the pool
    assert sorted(src.blocks_fetched()) == [(fid, b) for b in range(21)]
    assert cache.stats()["bytes_prefetched"] == 19 * BS + 3  # blocks 1-20
    cache.unpin(fid)
    cache.validate_state()


def test_a_failing_prefetch_marks_nothing_and_the_reader_fetches_for_itself(tmp_path):
    fid = fid_of(1)
    data = payload(4 * BS)
    cache = make(tmp_path)
    cache.pin(fid)
    cache.read(fid, 0, 1, len(data), lambda o, n: data[o:o + n])

    def failing(offset, length):
        raise OSError(errno.EIO, "no replica")

    assert cache.prefetch(fid, BS, 3 * BS, failing) == 3
    assert cache.read(fid, 0, len(data), len(data), lambda o, n: data[o:o + n]) == data
    cache.close()
    assert cache.stats()["bytes_prefetched"] == 0
    cache.unpin(fid)
    cache.validate_state()


def test_durable_bits_reach_disk_only_after_a_batched_sync(tmp_path, monkeypatch):
    fid = fid_of(1)
    data = payload(6 * BS)
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(index_mod.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    monkeypatch.setattr(index_mod, "SYNC_BATCH", 4 * BS)
    cache = make(tmp_path, durable=True)
    have = tmp_path / f"{fid.hex()}.have"
    header = index_mod._HEADER.size
    cache.pin(fid)
    for b in range(3):
        cache.read(fid, b * BS, BS, len(data), lambda o, n: data[o:o + n])
    assert syncs == [] and have.read_bytes()[header:] == b"\0"  # present in memory, not on disk
    cache.read(fid, 3 * BS, BS, len(data), lambda o, n: data[o:o + n])
    assert len(syncs) == 1 and have.read_bytes()[header:] == b"\x0f"  # a batch of 4 blocks
    cache.read(fid, 4 * BS, BS, len(data), lambda o, n: data[o:o + n])
    cache.validate_state()
    cache.unpin(fid)  # the last pin flushes
    assert len(syncs) == 2 and have.read_bytes()[header:] == b"\x1f"
    cache.read(fid, 5 * BS, BS, len(data), lambda o, n: data[o:o + n])  # completes: flushes
    assert len(syncs) == 3 and cache.path_if_complete(fid) is not None
    cache.validate_state()
    cache.close()
    again = make(tmp_path)
    assert again.path_if_complete(fid) is not None
