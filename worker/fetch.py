"""The block cache's fetching: missing blocks from storage, once each, and read-ahead.

Theory of operation
-------------------
Storage verifies 1 MiB blocks, so the cache fetches block-aligned ranges (the last block of a
file may be short), adjacent missing blocks merged into one request of at most ``MAX_FETCH``
bytes.

In-flight coalescing: a reader claims the missing blocks of its range by putting an Event in the
file's ``inflight`` (worker/cache_index.py), under the index lock; another reader of a claimed
block waits on that Event and then looks again, so a block is fetched once however many threads
want it, and a failed fetch is retried by the next reader rather than remembered. The lock is
never held across a fetch.

Read-ahead: ``ReadAhead`` tells a sequential reader from a random one and says how far ahead to
go; ``prefetch`` claims the missing blocks of that window and fetches them on a pool of
``PREFETCH_THREADS`` threads, ``PREFETCH_RUN`` bytes per task, so several requests are in flight
on the storage links at once.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The cache's block is the storage's verification block: a fetch of whole blocks is what a
# storage node verifies with the least reading.
from proto.fileids import BLOCK
from worker.cache_index import CacheIndex, CachedFile, pwrite_full

log = logging.getLogger("cluster.worker")

# One fetch covers at most this many bytes of adjacent missing blocks: large enough to amortise
# a round trip, small enough that one request does not hold a replica's link for long.
MAX_FETCH = 8 << 20
# Read-ahead: a sequential reader's window grows from READ_AHEAD_MIN to READ_AHEAD_MAX bytes past
# its furthest read; the window's missing blocks are fetched PREFETCH_RUN bytes at a time on
# PREFETCH_THREADS threads, so several requests are in flight on the storage links at once
# (each thread has its own link), as in StorageLink.download's window of 8 reads.
READ_AHEAD_MIN = 2 << 20
READ_AHEAD_MAX = 16 << 20
PREFETCH_RUN = 1 << 20
PREFETCH_THREADS = 8

# The in-flight marker of a block being fetched; a module name so that tests can observe waits.
_Event = threading.Event

Fetch = Callable[[int, int], bytes | memoryview]
"""fetch(offset, length) -> exactly ``length`` bytes of the file at ``offset`` (block-aligned);
any buffer (a memoryview over a received frame saves a copy)."""


@dataclass(slots=True)
class ReadAhead:
    """Sequential-read detection for one open file, like the kernel's ``file_ra_state``.

    ``advise(offset, n)`` is told of each read and answers the byte range to prefetch, or None.
    A read that starts near the furthest read so far (within the window behind it, since a
    threaded FUSE mount serves one file's requests a little out of order, or a block ahead)
    continues the stream and doubles the window up to ``max_window``; any other read is random
    access and resets it, so a random reader prefetches nothing. The first read at offset 0
    counts as sequential. Unlocked: concurrent callers may lose an update, which only makes
    the window a step smaller or larger.
    """

    max_window: int = READ_AHEAD_MAX
    min_window: int = READ_AHEAD_MIN
    front: int = 0
    window: int = 0

    def advise(self, offset: int, n: int) -> tuple[int, int] | None:
        front = self.front
        if front - max(self.window, self.min_window) <= offset <= front + BLOCK and self.max_window > 0:
            self.window = min(self.max_window, max(2 * self.window, self.min_window))
            self.front = front = max(front, offset + n)
            return front, self.window
        self.front, self.window = offset + n, 0
        return None


class BlockFetcher:
    """Fills the blocks of an index's files from ``Fetch`` functions; see the module docstring."""

    def __init__(self, index: CacheIndex) -> None:
        self._index = index
        self._block = index.block_size
        self._max_run = max(1, MAX_FETCH // index.block_size)
        self._pool: ThreadPoolExecutor | None = None  # started by the first prefetch
        self._closing = False

    def ensure(self, f: CachedFile, start: int, end: int, fetch: Fetch, *, count: bool) -> None:
        """Make blocks covering ``[start, end)`` present; ``f`` must be held (pinned, fds open)."""
        index = self._index
        first, last = start // self._block, (end - 1) // self._block
        waited = False
        while True:
            claims: list[int] = []
            waits: list[threading.Event] = []
            with index.lock:
                for b in range(first, last + 1):
                    if f.has(b):
                        continue
                    event = f.inflight.get(b)
                    if event is None:
                        f.inflight[b] = _Event()
                        claims.append(b)
                    else:
                        waits.append(event)
                if not claims and not waits:
                    if count:
                        if waited:
                            index.misses += 1
                        else:
                            index.hits += 1
                    return
            waited = True
            self._fetch_claims(f, claims, fetch, count)
            for event in waits:
                event.wait()

    def prefetch(self, fid: bytes, offset: int, length: int, fetch: Fetch) -> int:
        """Claim and queue the missing blocks of ``[offset, offset + length)``; see
        ``BlockCache.prefetch``. Returns the number of blocks queued."""
        index = self._index
        f = index.files.get(fid)
        if f is None or f.complete or self._closing:
            return 0
        n = clip(offset, length, f.size)
        if n == 0:
            return 0
        first, last = offset // self._block, (offset + n - 1) // self._block
        with index.lock:
            if index.files.get(fid) is not f or f.fd < 0 or f.hfd < 0 or fid not in index.pins:
                return 0
            claims = [b for b in range(first, last + 1) if not f.has(b) and b not in f.inflight]
            if not claims:
                return 0
            for b in claims:
                f.inflight[b] = _Event()
            runs = _runs(claims, max(1, PREFETCH_RUN // self._block))
            index.pins[fid] += len(runs)  # one per task: fds stay open, no eviction meanwhile
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="cache-prefetch")
            pool = self._pool
        for i, run in enumerate(runs):
            try:
                pool.submit(self._prefetch_run, f, run, fetch)
            except RuntimeError:  # shut down by close() meanwhile
                for rest in runs[i:]:
                    self._release(f, rest)
                    index.unpin(fid)
                break
        return len(claims)

    def close(self) -> None:
        """Stop prefetching: queued prefetches release their claims without fetching."""
        self._closing = True
        with self._index.lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _fetch_claims(self, f: CachedFile, claims: list[int], fetch: Fetch, count: bool) -> None:
        """Fetch the claimed blocks in runs of adjacent ones; on failure release what is left."""
        done = 0
        try:
            for run in _runs(claims, self._max_run):
                self._fetch_run(f, run[0], run[-1], fetch, count)
                done += len(run)
        except BaseException:
            self._release(f, claims[done:])
            raise

    def _release(self, f: CachedFile, blocks: list[int]) -> None:
        """Give up claims on ``blocks`` without marking them present."""
        with self._index.lock:
            for b in blocks:
                event = f.inflight.pop(b, None)
                if event is not None:
                    event.set()  # waiters look again and claim it themselves

    def _prefetch_run(self, f: CachedFile, run: list[int], fetch: Fetch) -> None:
        """A pool task: fetch one run claimed by ``prefetch``, then drop its pin."""
        index = self._index
        try:
            if self._closing:
                self._release(f, run)
                return
            self._fetch_claims(f, run, fetch, count=True)
            with index.lock:
                index.prefetched += sum(index.block_len(f, b) for b in run)
        except Exception as e:
            log.debug("block cache: prefetch of %s blocks %d-%d failed: %s", f.fid.hex(), run[0], run[-1], e)
        finally:
            index.unpin(f.fid)

    def _fetch_run(self, f: CachedFile, b0: int, b1: int, fetch: Fetch, count: bool) -> None:
        index = self._index
        offset = b0 * self._block
        length = min((b1 + 1) * self._block, f.size) - offset
        data = fetch(offset, length)
        if len(data) != length:
            raise OSError(errno.EIO, f"{f.fid.hex()}: fetch at {offset} returned {len(data)} bytes, "
                                     f"not {length}")
        pwrite_full(f.fd, memoryview(data), offset)
        with index.lock:
            flush = index.add_blocks_locked(f, b0, b1, length, count)
            for b in range(b0, b1 + 1):
                f.inflight.pop(b).set()
            index.evict_locked()
        if flush:
            index.flush(f)


def clip(offset: int, length: int, size: int) -> int:
    """The length of a pread of ``length`` at ``offset`` in a file of ``size`` bytes."""
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length ({offset}, {length})")
    return max(0, min(length, size - offset))


def _runs(blocks: list[int], max_run: int) -> list[list[int]]:
    """Split sorted block numbers into runs of adjacent blocks, each at most ``max_run`` long."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][-1] == b - 1 and len(runs[-1]) < max_run:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs
