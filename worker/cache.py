"""The worker's on-disk block cache of stored files.

Theory of operation
-------------------
Stored files are immutable and content-addressed, so a cached byte never goes stale: the cache
only ever adds blocks to a file and drops whole files, and never needs invalidating.
``BlockCache`` is the façade the FUSE view and the worker use; it composes two parts:

- worker/cache_index.py: which blocks of which file are present (a sparse ``.data`` file and a
  ``.have`` bitmap each, crash-safe by ordering), pins, eviction by LRU of whole files, bounded
  fds, batched fdatasync when ``durable``;
- worker/fetch.py: fetching missing blocks in block-aligned runs, once each however many threads
  want them (in-flight claims), and read-ahead on a pool of threads.

A complete file is served by one ``pread`` on a cached fd (``prepare`` takes no lock for it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from proto.fileids import BLOCK
from worker.cache_index import CacheIndex, pread_full, pwrite_full
from worker.fetch import READ_AHEAD_MAX, BlockFetcher, Fetch, ReadAhead, clip

__all__ = ["BLOCK", "READ_AHEAD_MAX", "BlockCache", "Fetch", "ReadAhead", "StorageView"]


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


class BlockCache:
    """A bounded, persistent, thread-safe cache of file blocks under ``root``.

    ``durable`` fdatasyncs block data before marking it present, so that a power loss cannot
    leave a bit set over a hole; without it only process crashes are covered (tests, tmpfs).
    """

    def __init__(
        self, root: Path, capacity_bytes: int, block_size: int = BLOCK, *, durable: bool = True
    ) -> None:
        self._index = CacheIndex(root, capacity_bytes, block_size, durable=durable)
        self._fetcher = BlockFetcher(self._index)
        self.root = self._index.root
        self.capacity_bytes = capacity_bytes
        self.block_size = block_size
        self.durable = durable
        # The index's tables, for the lock-free path of a complete file in prepare().
        self._complete = self._index.complete
        self._ticks = self._index.ticks

    # ---- reads --------------------------------------------------------------------------------

    def read(self, fid: bytes, offset: int, length: int, size: int, fetch: Fetch) -> bytes:
        """``pread(fid, length, offset)`` of a file of ``size`` bytes, fetching missing blocks.

        Returns exactly what POSIX pread would: clipped at ``size``, empty at or past it.
        An exception from ``fetch`` propagates and leaves the blocks it covered missing.
        """
        n = clip(offset, length, size)
        if n == 0:
            return b""
        f = self._index.hold(fid, size)
        try:
            if not f.complete:
                self._fetcher.ensure(f, offset, offset + n, fetch, count=True)
            return pread_full(f.fd, n, offset)
        finally:
            self._index.unpin(fid)

    def prepare(self, fid: bytes, offset: int, length: int, size: int, fetch: Fetch) -> tuple[int, int]:
        """Make ``[offset, offset + length)`` present and return ``(fd, n)`` to pread from.

        ``n`` is the length clipped at ``size``. The caller must hold a pin on ``fid`` for as
        long as it uses ``fd`` (FUSE hands the fd to libfuse, which reads it in C: no copy
        through Python). For a complete file this takes no lock.
        """
        n = clip(offset, length, size)
        f = self._complete.get(fid)
        if f is not None and f.fd >= 0:
            f.tick = next(self._ticks)
            self._index.hits += 1  # a statistic: a lost update under a thread switch is harmless
            return f.fd, n
        f = self._index.hold(fid, size)
        try:
            if n and not f.complete:
                self._fetcher.ensure(f, offset, offset + n, fetch, count=True)
            return f.fd, n
        finally:
            self._index.unpin(fid)

    def prefetch(self, fid: bytes, offset: int, length: int, fetch: Fetch) -> int:
        """Start fetching the missing blocks of ``[offset, offset + length)`` in the background.

        For read-ahead: only for a file that someone holds open (pinned), clipped at its size.
        Each block is claimed as in-flight before it is queued, so a reader that needs it waits
        for that fetch instead of fetching it again, and a block is never queued twice. A
        failed prefetch releases its claims and marks nothing (the reader fetches the block
        itself); it is logged at debug level only. Returns the number of blocks queued.
        """
        return self._fetcher.prefetch(fid, offset, length, fetch)

    def materialize(self, fid: bytes, size: int, fetch: Fetch) -> Path:
        """Fetch every missing block and return the complete data file's path.

        For running without FUSE. The path stays valid while ``fid`` is pinned; an unpinned
        file may be evicted later.
        """
        f = self._index.hold(fid, size)
        try:
            if not f.complete:
                self._fetcher.ensure(f, 0, size, fetch, count=True)
            return self._index.data_path(fid)
        finally:
            self._index.unpin(fid)

    # ---- files the worker wrote itself ----------------------------------------------------------

    def put_file(self, fid: bytes, src_path: Path) -> None:
        """Add a file the worker wrote itself, complete, without fetching anything.

        The cache may hard-link ``src_path``: the caller must not modify it afterwards
        (stored files are immutable anyway).
        """
        src = Path(src_path)
        size = src.stat().st_size
        if self._top_up(fid, size, src):
            return
        tmp = self._index.tmp_path(fid)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)  # another filesystem, or links refused
        if not self._index.install(fid, size, tmp):
            self._top_up(fid, size, src)  # a reader created the entry meanwhile

    def put_bytes(self, fid: bytes, data: bytes) -> None:
        """Add a file from memory, complete, without fetching anything."""
        if self._top_up(fid, len(data), data):
            return
        tmp = self._index.tmp_path(fid)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            pwrite_full(fd, memoryview(data), 0)
        finally:
            os.close(fd)
        if not self._index.install(fid, len(data), tmp):
            self._top_up(fid, len(data), data)  # a reader created the entry meanwhile

    def _top_up(self, fid: bytes, size: int, source: Path | bytes) -> bool:
        """If ``fid`` is already cached, fill its missing blocks from ``source``; True if so."""
        index = self._index
        with index.lock:
            f = index.files.get(fid)
            if f is None:
                return False
            if f.size != size:
                raise ValueError(f"{fid.hex()}: size {size} differs from the cached {f.size}")
            if f.complete:
                f.tick = next(index.ticks)
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
                return pread_full(sfd, n, off)
        try:
            f = self._index.hold(fid, size)
            try:
                if not f.complete:
                    self._fetcher.ensure(f, 0, size, fetch, count=False)
            finally:
                self._index.unpin(fid)
        finally:
            if sfd >= 0:
                os.close(sfd)

    # ---- what is held -------------------------------------------------------------------------

    def path_if_complete(self, fid: bytes) -> Path | None:
        """The data file of ``fid`` if every block is present, else None."""
        with self._index.lock:
            return self._index.data_path(fid) if fid in self._complete else None

    def is_complete(self, fid: bytes) -> bool:
        """Whether every block of ``fid`` is present (no lock: a hint that may be stale)."""
        return fid in self._complete

    def size_of(self, fid: bytes) -> int | None:
        """The size of ``fid`` if the cache holds any of it (no network needed), else None."""
        f = self._index.files.get(fid)
        return None if f is None else f.size

    def cached_ids(self) -> list[bytes]:
        """The ids of the files the cache holds any block of (complete or not)."""
        with self._index.lock:
            return [fid for fid, f in self._index.files.items() if f.present or f.complete]

    def pin(self, fid: bytes) -> None:
        """Protect ``fid`` from eviction until a matching ``unpin`` (pins are counted)."""
        self._index.pin(fid)

    def unpin(self, fid: bytes) -> None:
        """Drop one pin on ``fid``; evicts if the cache was held over capacity by pins."""
        self._index.unpin(fid)

    def pins(self, fid: bytes) -> int:
        """How many pins hold ``fid`` now (0: it may be evicted)."""
        with self._index.lock:
            return self._index.pins.get(fid, 0)

    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, bytes_fetched, bytes_prefetched (the part of bytes_fetched
        fetched ahead), bytes_cached, files, complete_files, evictions, over_capacity (times pins
        kept the cache over), pinned, capacity_bytes."""
        return self._index.stats()

    def validate_state(self) -> None:
        """Check the index's invariants (tests call it); raises AssertionError."""
        self._index.validate_state()

    def close(self) -> None:
        """Stop prefetching, close every fd the cache holds; the on-disk state stays."""
        self._fetcher.close()
        self._index.close()
