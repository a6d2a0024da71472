"""The worker's on-disk block cache of stored files.

Theory of operation
-------------------
Stored files are immutable and content-addressed, so a cached byte never goes stale: the cache
only ever adds blocks to a file and drops whole files. Storage verifies 1 MiB blocks, so the
cache fetches block-aligned ranges (the last block of a file may be short) and keeps, per file,

- ``<hex>.data``: a sparse file the size of the stored file; each block is written at its own
  offset;
- ``<hex>.have``: a 16-byte header (magic, block size, file size) and a bitmap of the blocks
  present.

Crash safety is an ordering rule: a block's bit is set on disk only after its data is written
(and, when ``durable``, fdatasync'ed), so a crash can lose bits (those blocks are fetched again)
but never set one over a hole. In memory a block is present as soon as it is written (readers
get it from the page cache); when ``durable`` its on-disk bit waits in ``pending`` for the next
batched fdatasync (``SYNC_BATCH``), so a crash loses at most the unsynced batch. A torn bitmap is therefore safe too. A ``.have`` that does not parse
drops its file, a ``.data`` without a ``.have`` is an orphan, and eviction unlinks ``.have``
first. A file whose blocks are all present is *complete*.

Concurrency: one lock guards the index (files, pins, byte counts, in-flight blocks) and is
never held across a fetch. A reader claims the missing blocks of its range by putting an Event
in ``inflight``; another reader of a claimed block waits on that Event and then looks again,
so a block is fetched once however many threads want it, and a failed fetch is retried by the
next reader rather than remembered. A complete file is served by one ``pread`` on a cached fd.

Bounds: the bytes of present blocks stay within ``capacity_bytes``. When over, whole files are
evicted, least recently read first; pinned files (open through FUSE, or being read right now)
are never evicted, and if only pinned files are left the cache stays over capacity and counts
it (``over_capacity``) instead of failing the read. The LRU order survives a restart through
the ``.have`` mtimes, which a fetch (bitmap write) or a pin refreshes.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# The cache's block is the storage's verification block: a fetch of whole blocks is what a
# storage node verifies with the least reading.
from proto.fileids import BLOCK, is_hex_id

log = logging.getLogger("cluster.worker")

# One fetch covers at most this many bytes of adjacent missing blocks: large enough to amortise
# a round trip, small enough that one request does not hold a replica's link for long.
MAX_FETCH = 8 << 20
# Open data fds kept for unpinned files; beyond it the least recently read are closed (the
# soft RLIMIT_NOFILE is often 1024, and a cache may hold thousands of files).
MAX_OPEN_FILES = 256
# Read-ahead: a sequential reader's window grows from READ_AHEAD_MIN to READ_AHEAD_MAX bytes past
# its furthest read; the window's missing blocks are fetched PREFETCH_RUN bytes at a time on
# PREFETCH_THREADS threads, so several requests are in flight on the storage links at once
# (each thread has its own link), as in StorageLink.download's window of 8 reads.
READ_AHEAD_MIN = 2 << 20
READ_AHEAD_MAX = 16 << 20
PREFETCH_RUN = 1 << 20
PREFETCH_THREADS = 8
# When ``durable``, a file's new blocks are fdatasync'ed (and only then their bits written to the
# ``.have``) once this many bytes are pending, when the file completes, and when its last pin
# goes: one sync per batch instead of one per fetched run.
SYNC_BATCH = 32 << 20

_MAGIC = b"BCH1"
_HEADER = struct.Struct("<4sIQ")  # magic, block size, file size

# The in-flight marker of a block being fetched; a module name so that tests can observe waits.
_Event = threading.Event

Fetch = Callable[[int, int], bytes | memoryview]
"""fetch(offset, length) -> exactly ``length`` bytes of the file at ``offset`` (block-aligned);
any buffer (a memoryview over a received frame saves a copy)."""


class StorageView(Protocol):
    """What a worker sees of the cluster's storage (the network one lives elsewhere)."""

    def size(self, fid: bytes) -> int | None:
        """The size of file ``fid``; None when no replica knows it."""

    def read(self, fid: bytes, offset: int, length: int) -> bytes | memoryview:
        """Bytes of ``fid`` (any buffer) from any replica, failing over; OSError(EIO) when none can serve."""

    def jobs(self) -> list[bytes]:
        """The ids (16 bytes) of the jobs that own files."""

    def job_files(self, job: bytes) -> dict[str, bytes] | None:
        """A job's files, readable name -> fid; None for an unknown job."""


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


@dataclass(slots=True, eq=False)
class _File:
    """One cached file. Mutable fields change under BlockCache._lock only."""

    fid: bytes
    size: int
    nblocks: int
    have: bytearray
    present: int = 0
    nbytes: int = 0
    tick: int = 0
    fd: int = -1
    hfd: int = -1
    inflight: dict[int, threading.Event] = field(default_factory=dict)
    # durable only: blocks present in memory whose data is not yet fdatasync'ed (bits not on
    # disk), their bytes, the bitmap as written to disk, and flushes under way
    pending: list[int] = field(default_factory=list)
    unsynced: int = 0
    disk: bytearray = field(default_factory=bytearray)
    syncing: int = 0

    @property
    def complete(self) -> bool:
        return self.present == self.nblocks

    def has(self, b: int) -> bool:
        return bool(self.have[b >> 3] & (1 << (b & 7)))


class BlockCache:
    """A bounded, persistent, thread-safe cache of file blocks under ``root``.

    ``durable`` fdatasyncs block data before marking it present, so that a power loss cannot
    leave a bit set over a hole; without it only process crashes are covered (tests, tmpfs).
    """

    def __init__(
        self, root: Path, capacity_bytes: int, block_size: int = BLOCK, *, durable: bool = True
    ) -> None:
        if block_size <= 0 or capacity_bytes < 0:
            raise ValueError("block_size must be positive and capacity_bytes non-negative")
        self.root = Path(root).absolute()  # libfuse may chdir("/") after the mount
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.block_size = block_size
        self.durable = durable
        self._max_run = max(1, MAX_FETCH // block_size)
        self._lock = threading.Lock()
        self._files: dict[bytes, _File] = {}
        # The complete files, read without the lock by callers that hold a pin (prepare()).
        self._complete: dict[bytes, _File] = {}
        self._pins: dict[bytes, int] = {}
        self._ticks = itertools.count(1)
        self._open = 0
        self._cached = 0
        self._hits = self._misses = self._fetched = self._evictions = self._over = 0
        self._prefetched = 0
        self._pool: ThreadPoolExecutor | None = None  # started by the first prefetch
        self._closing = False
        self._load()

    # ---- public API -------------------------------------------------------------------------

    def read(self, fid: bytes, offset: int, length: int, size: int, fetch: Fetch) -> bytes:
        """``pread(fid, length, offset)`` of a file of ``size`` bytes, fetching missing blocks.

        Returns exactly what POSIX pread would: clipped at ``size``, empty at or past it.
        An exception from ``fetch`` propagates and leaves the blocks it covered missing.
        """
        n = _clip(offset, length, size)
        if n == 0:
            return b""
        f = self._hold(fid, size)
        try:
            if not f.complete:
                self._ensure(f, offset, offset + n, fetch, count=True)
            return _pread_full(f.fd, n, offset)
        finally:
            self.unpin(fid)

    def prepare(self, fid: bytes, offset: int, length: int, size: int, fetch: Fetch) -> tuple[int, int]:
        """Make ``[offset, offset + length)`` present and return ``(fd, n)`` to pread from.

        ``n`` is the length clipped at ``size``. The caller must hold a pin on ``fid`` for as
        long as it uses ``fd`` (FUSE hands the fd to libfuse, which reads it in C: no copy
        through Python). For a complete file this takes no lock.
        """
        n = _clip(offset, length, size)
        f = self._complete.get(fid)
        if f is not None and f.fd >= 0:
            f.tick = next(self._ticks)
            self._hits += 1  # a statistic: a lost update under a thread switch is harmless
            return f.fd, n
        f = self._hold(fid, size)
        try:
            if n and not f.complete:
                self._ensure(f, offset, offset + n, fetch, count=True)
            return f.fd, n
        finally:
            self.unpin(fid)

    def prefetch(self, fid: bytes, offset: int, length: int, fetch: Fetch) -> int:
        """Start fetching the missing blocks of ``[offset, offset + length)`` in the background.

        For read-ahead: only for a file that someone holds open (pinned), clipped at its size.
        Each block is claimed as in-flight before it is queued, so a reader that needs it waits
        for that fetch instead of fetching it again, and a block is never queued twice. A
        failed prefetch releases its claims and marks nothing (the reader fetches the block
        itself); it is logged at debug level only. Returns the number of blocks queued.
        """
        f = self._files.get(fid)
        if f is None or f.complete or self._closing:
            return 0
        n = _clip(offset, length, f.size)
        if n == 0:
            return 0
        first, last = offset // self.block_size, (offset + n - 1) // self.block_size
        with self._lock:
            if self._files.get(fid) is not f or f.fd < 0 or f.hfd < 0 or fid not in self._pins:
                return 0
            claims = [b for b in range(first, last + 1) if not f.has(b) and b not in f.inflight]
            if not claims:
                return 0
            for b in claims:
                f.inflight[b] = _Event()
            runs = _runs(claims, max(1, PREFETCH_RUN // self.block_size))
            self._pins[fid] += len(runs)  # one per task: fds stay open, no eviction meanwhile
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="cache-prefetch")
            pool = self._pool
        for i, run in enumerate(runs):
            try:
                pool.submit(self._prefetch_run, f, run, fetch)
            except RuntimeError:  # shut down by close() meanwhile
                for rest in runs[i:]:
                    self._release(f, rest)
                    self.unpin(fid)
                break
        return len(claims)

    def put_file(self, fid: bytes, src_path: Path) -> None:
        """Add a file the worker wrote itself, complete, without fetching anything.

        The cache may hard-link ``src_path``: the caller must not modify it afterwards
        (stored files are immutable anyway).
        """
        src = Path(src_path)
        size = src.stat().st_size
        if self._top_up(fid, size, src):
            return
        tmp = self._tmp_path(fid)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)  # another filesystem, or links refused
        self._install(fid, size, tmp, src)

    def put_bytes(self, fid: bytes, data: bytes) -> None:
        """Add a file from memory, complete, without fetching anything."""
        if self._top_up(fid, len(data), data):
            return
        tmp = self._tmp_path(fid)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _pwrite_full(fd, memoryview(data), 0)
        finally:
            os.close(fd)
        self._install(fid, len(data), tmp, data)

    def materialize(self, fid: bytes, size: int, fetch: Fetch) -> Path:
        """Fetch every missing block and return the complete data file's path.

        For running without FUSE. The path stays valid while ``fid`` is pinned; an unpinned
        file may be evicted later.
        """
        f = self._hold(fid, size)
        try:
            if not f.complete:
                self._ensure(f, 0, size, fetch, count=True)
            return self._data_path(fid)
        finally:
            self.unpin(fid)

    def path_if_complete(self, fid: bytes) -> Path | None:
        """The data file of ``fid`` if every block is present, else None."""
        with self._lock:
            return self._data_path(fid) if fid in self._complete else None

    def is_complete(self, fid: bytes) -> bool:
        """Whether every block of ``fid`` is present (no lock: a hint that may be stale)."""
        return fid in self._complete

    def size_of(self, fid: bytes) -> int | None:
        """The size of ``fid`` if the cache holds any of it (no network needed), else None."""
        f = self._files.get(fid)
        return None if f is None else f.size

    def cached_ids(self) -> list[bytes]:
        """The ids of the files the cache holds any block of (complete or not)."""
        with self._lock:
            return [fid for fid, f in self._files.items() if f.present or f.complete]

    def pin(self, fid: bytes) -> None:
        """Protect ``fid`` from eviction until a matching ``unpin`` (pins are counted)."""
        with self._lock:
            self._pins[fid] = self._pins.get(fid, 0) + 1
            f = self._files.get(fid)
            if f is not None:
                f.tick = next(self._ticks)
        if f is not None:
            self._touch(f)

    def unpin(self, fid: bytes) -> None:
        """Drop one pin on ``fid``; evicts if the cache was held over capacity by pins."""
        f = self._files.get(fid)
        if f is not None and f.pending and self._pins.get(fid, 0) == 1:
            self._flush(f)  # the last pin (a racing pin only means an early flush): still held
        with self._lock:
            count = self._pins.get(fid, 0)
            if count <= 0:
                raise RuntimeError(f"unpin of {fid.hex()} without a pin")
            if count == 1:
                del self._pins[fid]
                f = self._files.get(fid)
                if f is not None and not f.present and f.nblocks and not f.inflight:
                    self._drop_locked(f)  # every fetch failed: keep no empty entry around
                self._evict_locked()
            else:
                self._pins[fid] = count - 1

    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, bytes_fetched, bytes_prefetched (the part of bytes_fetched fetched ahead), bytes_cached, files, complete_files,
        evictions, over_capacity (times pins kept the cache over), pinned, capacity_bytes."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "bytes_fetched": self._fetched,
                "bytes_prefetched": self._prefetched,
                "bytes_cached": self._cached,
                "files": len(self._files),
                "complete_files": len(self._complete),
                "evictions": self._evictions,
                "over_capacity": self._over,
                "pinned": len(self._pins),
                "capacity_bytes": self.capacity_bytes,
            }

    def validate_state(self) -> None:
        """Check the index's invariants (tests call it); raises AssertionError."""
        with self._lock:
            total = 0
            for fid, f in self._files.items():
                bits = sum(f.has(b) for b in range(f.nblocks))
                assert bits == f.present, (fid.hex(), bits, f.present)
                assert f.nbytes == sum(self._block_len(f, b) for b in range(f.nblocks) if f.has(b))
                assert (fid in self._complete) == f.complete, fid.hex()
                assert all(f.has(b) for b in f.pending), fid.hex()
                assert all(f.has(b) for b in range(f.nblocks) if f.disk[b >> 3] & (1 << (b & 7)))
                total += f.nbytes
            assert total == self._cached, (total, self._cached)
            assert set(self._complete) <= set(self._files)
            assert self._open == sum(f.fd >= 0 for f in self._files.values())

    def close(self) -> None:
        """Stop prefetching, close every fd the cache holds; the on-disk state stays."""
        self._closing = True
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # queued prefetches release their claims without fetching
        for f in list(self._files.values()):
            if f.pending:
                self._flush(f)
        with self._lock:
            for f in self._files.values():
                self._close_fds_locked(f)

    # ---- index --------------------------------------------------------------------------------

    def _data_path(self, fid: bytes) -> Path:
        return self.root / f"{fid.hex()}.data"

    def _have_path(self, fid: bytes) -> Path:
        return self.root / f"{fid.hex()}.have"

    def _tmp_path(self, fid: bytes) -> Path:
        return self.root / f"{fid.hex()}.{uuid.uuid4().hex}.tmp"

    def _block_len(self, f: _File, b: int) -> int:
        return min(self.block_size, f.size - b * self.block_size)

    def _new_file(self, fid: bytes, size: int, full: bool) -> _File:
        nblocks = -(-size // self.block_size)
        have = bytearray(-(-nblocks // 8))
        f = _File(fid, size, nblocks, have)
        if full:
            for b in range(nblocks):
                have[b >> 3] |= 1 << (b & 7)
            f.present, f.nbytes = nblocks, size
        f.disk = bytearray(have)
        return f

    def _header(self, f: _File) -> bytes:
        return _HEADER.pack(_MAGIC, self.block_size, f.size) + bytes(f.have)

    def _create_locked(self, fid: bytes, size: int) -> _File:
        """A new, empty entry with its files on disk (data first: an orphan is harmless)."""
        f = self._new_file(fid, size, full=size == 0)
        fd = os.open(self._data_path(fid), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        _write_new(self._have_path(fid), self._header(f))
        self._add_locked(f)
        return f

    def _add_locked(self, f: _File) -> None:
        self._files[f.fid] = f
        if f.complete:
            self._complete[f.fid] = f
        self._cached += f.nbytes
        f.tick = next(self._ticks)

    def _hold(self, fid: bytes, size: int) -> _File:
        """Pin ``fid`` (creating its entry) and open its fds; the caller unpins."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        with self._lock:
            f = self._files.get(fid)
            if f is None:
                f = self._create_locked(fid, size)
            elif f.size != size:
                raise ValueError(f"{fid.hex()}: size {size} differs from the cached {f.size}")
            self._pins[fid] = self._pins.get(fid, 0) + 1
            f.tick = next(self._ticks)
            try:
                self._open_locked(f)
            except BaseException:
                self._pins[fid] -= 1
                if not self._pins[fid]:
                    del self._pins[fid]
                raise
            if f.complete:
                self._hits += 1
            return f

    def _open_locked(self, f: _File) -> None:
        if f.fd < 0:
            if self._open >= MAX_OPEN_FILES:
                self._close_idle_locked()
            flags = os.O_RDONLY if f.complete else os.O_RDWR
            f.fd = os.open(self._data_path(f.fid), flags | os.O_CLOEXEC)
            self._open += 1
        if not f.complete and f.hfd < 0:
            f.hfd = os.open(self._have_path(f.fid), os.O_WRONLY | os.O_CLOEXEC)

    def _close_fds_locked(self, f: _File) -> None:
        if f.fd >= 0:
            os.close(f.fd)
            f.fd = -1
            self._open -= 1
        if f.hfd >= 0:
            os.close(f.hfd)
            f.hfd = -1

    def _close_idle_locked(self) -> None:
        """Close the fds of the least recently read unpinned files, down to half the budget."""
        idle = sorted(
            (f for f in self._files.values() if f.fd >= 0 and f.fid not in self._pins and not f.inflight),
            key=lambda f: f.tick,
        )
        for f in idle:
            if self._open < MAX_OPEN_FILES // 2:
                break
            self._close_fds_locked(f)

    def _touch(self, f: _File) -> None:
        """Refresh the ``.have`` mtime: the LRU order a restart rebuilds."""
        try:
            os.utime(self._have_path(f.fid))
        except FileNotFoundError:
            pass  # evicted meanwhile

    # ---- fetching -----------------------------------------------------------------------------

    def _ensure(self, f: _File, start: int, end: int, fetch: Fetch, *, count: bool) -> None:
        """Make blocks covering ``[start, end)`` present; ``f`` must be held (pinned, fds open)."""
        first, last = start // self.block_size, (end - 1) // self.block_size
        waited = False
        while True:
            claims: list[int] = []
            waits: list[threading.Event] = []
            with self._lock:
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
                            self._misses += 1
                        else:
                            self._hits += 1
                    return
            waited = True
            self._fetch_claims(f, claims, fetch, count)
            for event in waits:
                event.wait()

    def _fetch_claims(self, f: _File, claims: list[int], fetch: Fetch, count: bool) -> None:
        """Fetch the claimed blocks in runs of adjacent ones; on failure release what is left."""
        done = 0
        try:
            for run in _runs(claims, self._max_run):
                self._fetch_run(f, run[0], run[-1], fetch, count)
                done += len(run)
        except BaseException:
            self._release(f, claims[done:])
            raise

    def _release(self, f: _File, blocks: list[int]) -> None:
        """Give up claims on ``blocks`` without marking them present."""
        with self._lock:
            for b in blocks:
                event = f.inflight.pop(b, None)
                if event is not None:
                    event.set()  # waiters look again and claim it themselves

    def _prefetch_run(self, f: _File, run: list[int], fetch: Fetch) -> None:
        """A pool task: fetch one run claimed by ``prefetch``, then drop its pin."""
        try:
            if self._closing:
                self._release(f, run)
                return
            self._fetch_claims(f, run, fetch, count=True)
            with self._lock:
                self._prefetched += sum(self._block_len(f, b) for b in run)
        except Exception as e:
            log.debug("block cache: prefetch of %s blocks %d-%d failed: %s", f.fid.hex(), run[0], run[-1], e)
        finally:
            self.unpin(f.fid)

    def _fetch_run(self, f: _File, b0: int, b1: int, fetch: Fetch, count: bool) -> None:
        offset = b0 * self.block_size
        length = min((b1 + 1) * self.block_size, f.size) - offset
        data = fetch(offset, length)
        if len(data) != length:
            raise OSError(errno.EIO, f"{f.fid.hex()}: fetch at {offset} returned {len(data)} bytes, "
                                     f"not {length}")
        _pwrite_full(f.fd, memoryview(data), offset)
        flush = False
        with self._lock:
            for b in range(b0, b1 + 1):
                f.have[b >> 3] |= 1 << (b & 7)
            f.present += b1 - b0 + 1
            f.nbytes += length
            self._cached += length
            if count:
                self._fetched += length
            if self.durable:
                f.pending.extend(range(b0, b1 + 1))
                f.unsynced += length
                flush = f.unsynced >= SYNC_BATCH or f.complete
            else:
                self._write_bits_locked(f, range(b0, b1 + 1))
            if f.complete:
                self._complete[f.fid] = f
                if not f.pending and not f.syncing:
                    os.close(f.hfd)
                    f.hfd = -1
            for b in range(b0, b1 + 1):
                f.inflight.pop(b).set()
            self._evict_locked()
        if flush:
            self._flush(f)

    def _write_bits_locked(self, f: _File, blocks: range | list[int]) -> None:
        """Set ``blocks`` in the on-disk bitmap; their data must be written (durable: synced)."""
        for b in blocks:
            f.disk[b >> 3] |= 1 << (b & 7)
        lo, hi = min(blocks) >> 3, (max(blocks) >> 3) + 1
        if f.hfd < 0:
            return  # closed meanwhile (only when unpinned): the bits are lost, the data is not
        # Under the lock so that two runs sharing a bitmap byte cannot write it out of order.
        try:
            _pwrite_full(f.hfd, memoryview(f.disk)[lo:hi], _HEADER.size + lo)
        except OSError as e:  # the data is good; a restart merely fetches these blocks again
            log.warning("block cache: bitmap of %s not updated: %s", f.fid.hex(), e)

    def _flush(self, f: _File) -> None:
        """fdatasync ``f``'s pending blocks, then set their on-disk bits (one batch).

        The caller holds a pin on ``f`` (its fds stay open). A failed sync keeps the bits off
        disk: the blocks stay readable now and are fetched again after a restart.
        """
        with self._lock:
            blocks, f.pending, f.unsynced = f.pending, [], 0
            if not blocks or f.fd < 0:
                return
            f.syncing += 1
            fd = f.fd
        try:
            os.fdatasync(fd)
            synced = True
        except OSError as e:
            log.warning("block cache: fdatasync of %s failed: %s", f.fid.hex(), e)
            synced = False
        with self._lock:
            f.syncing -= 1
            if synced:
                self._write_bits_locked(f, blocks)
            if f.complete and not f.pending and not f.syncing and f.hfd >= 0:
                os.close(f.hfd)
                f.hfd = -1

    # ---- files the worker wrote itself ----------------------------------------------------------

    def _top_up(self, fid: bytes, size: int, source: Path | bytes) -> bool:
        """If ``fid`` is already cached, fill its missing blocks from ``source``; True if so."""
        with self._lock:
            f = self._files.get(fid)
            if f is None:
                return False
            if f.size != size:
                raise ValueError(f"{fid.hex()}: size {size} differs from the cached {f.size}")
            if f.complete:
                f.tick = next(self._ticks)
                return True
        self._fill_from(fid, size, source)
        return True

    def _fill_from(self, fid: bytes, size: int, source: Path | bytes) -> None:
        sfd = -1
        if isinstance(source, (bytes, bytearray, memoryview)):
            view = memoryview(source)

            def fetch(off: int, n: int) -> bytes:
                return bytes(view[off:off + n])
        else:
            sfd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)

            def fetch(off: int, n: int) -> bytes:
                return _pread_full(sfd, n, off)
        try:
            f = self._hold(fid, size)
            try:
                if not f.complete:
                    self._ensure(f, 0, size, fetch, count=False)
            finally:
                self.unpin(fid)
        finally:
            if sfd >= 0:
                os.close(sfd)

    def _install(self, fid: bytes, size: int, tmp: Path, source: Path | bytes) -> None:
        """Move a complete data file written at ``tmp`` into place and index it."""
        try:
            if self.durable:
                _fsync_path(tmp)
            f = self._new_file(fid, size, full=True)
            with self._lock:
                if fid not in self._files:
                    os.replace(tmp, self._data_path(fid))
                    _write_new(self._have_path(fid), self._header(f))
                    self._add_locked(f)
                    self._evict_locked()
                    return
        finally:
            tmp.unlink(missing_ok=True)
        self._top_up(fid, size, source)  # a reader created the entry meanwhile

    # ---- eviction and restart -------------------------------------------------------------------

    def _evict_locked(self) -> None:
        if self._cached <= self.capacity_bytes:
            return
        victims = sorted(
            (f for f in self._files.values() if f.fid not in self._pins and not f.inflight and f.nbytes),
            key=lambda f: f.tick,
        )
        for f in victims:
            if self._cached <= self.capacity_bytes:
                break
            self._drop_locked(f)
            self._evictions += 1
        if self._cached > self.capacity_bytes:
            self._over += 1

    def _drop_locked(self, f: _File) -> None:
        self._close_fds_locked(f)
        # .have first: a crash in between leaves an orphan .data, which a restart removes.
        self._have_path(f.fid).unlink(missing_ok=True)
        self._data_path(f.fid).unlink(missing_ok=True)
        del self._files[f.fid]
        self._complete.pop(f.fid, None)
        self._cached -= f.nbytes

    def _load(self) -> None:
        """Rebuild the index from ``root``: LRU order from the ``.have`` mtimes."""
        found: list[tuple[int, _File]] = []
        for path in self.root.iterdir():
            if path.suffix == ".tmp":
                path.unlink(missing_ok=True)
            elif path.suffix == ".have":
                loaded = self._load_one(path)
                if loaded is None:
                    log.warning("block cache: dropping unreadable %s", path.name)
                    path.unlink(missing_ok=True)
                    path.with_suffix(".data").unlink(missing_ok=True)
                else:
                    found.append(loaded)
        with self._lock:
            for _, f in sorted(found, key=lambda item: item[0]):
                self._add_locked(f)
            for path in self.root.glob("*.data"):
                fid = _parse_hex(path.stem)
                if fid is None or fid not in self._files:
                    path.unlink(missing_ok=True)
            self._evict_locked()
        log.info("block cache %s: %d files, %d bytes", self.root, len(self._files), self._cached)

    def _load_one(self, path: Path) -> tuple[int, _File] | None:
        fid = _parse_hex(path.stem)
        data = path.with_suffix(".data")
        try:
            raw = path.read_bytes()
            mtime = path.stat().st_mtime_ns
            data_size = data.stat().st_size
        except OSError:
            return None
        if fid is None or len(raw) < _HEADER.size:
            return None
        magic, block_size, size = _HEADER.unpack_from(raw)
        if (magic, block_size, data_size) != (_MAGIC, self.block_size, size):
            return None  # checked before sizing the bitmap by a header that may be garbage
        f = self._new_file(fid, size, full=False)
        bitmap = raw[_HEADER.size:]
        if len(bitmap) != len(f.have):
            return None
        f.have[:] = bitmap
        f.disk[:] = bitmap
        for b in range(f.nblocks, len(f.have) * 8):  # bits past the end: garbage from a torn write
            f.have[b >> 3] &= ~(1 << (b & 7)) & 0xFF
        present = [b for b in range(f.nblocks) if f.has(b)]
        f.present = len(present)
        f.nbytes = sum(self._block_len(f, b) for b in present)
        return mtime, f


def _clip(offset: int, length: int, size: int) -> int:
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


def _parse_hex(name: str) -> bytes | None:
    return bytes.fromhex(name) if is_hex_id(name) else None


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:  # only for huge reads: Linux returns at most ~2 GiB per call
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            raise OSError(errno.EIO, f"short read of a cache file at {offset + got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _write_new(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_full(fd, memoryview(content), 0)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
