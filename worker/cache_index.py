"""The block cache's index: which blocks of which file are present, on disk and in memory.

Theory of operation
-------------------
Stored files are immutable and content-addressed, so a cached byte never goes stale: the cache
only ever adds blocks to a file and drops whole files. Per file, under ``root``:

- ``<hex>.data``: a sparse file the size of the stored file; each block is written at its own
  offset;
- ``<hex>.have``: a 16-byte header (magic, block size, file size) and a bitmap of the blocks
  present.

Crash safety is an ordering rule: a block's bit is set on disk only after its data is written
(and, when ``durable``, fdatasync'ed), so a crash can lose bits (those blocks are fetched again)
but never set one over a hole. In memory a block is present as soon as it is written (readers
get it from the page cache); when ``durable`` its on-disk bit waits in ``pending`` for the next
batched fdatasync (``SYNC_BATCH``), so a crash loses at most the unsynced batch. A torn bitmap
is therefore safe too. A ``.have`` that does not parse drops its file, a ``.data`` without a
``.have`` is an orphan, and eviction unlinks ``.have`` first. A file whose blocks are all
present is *complete*.

Bounds: the bytes of present blocks stay within ``capacity_bytes``. When over, whole files are
evicted, least recently read first; pinned files (open through FUSE, or being read right now)
are never evicted, and if only pinned files are left the cache stays over capacity and counts
it (``over``) instead of failing the read. The LRU order survives a restart through the
``.have`` mtimes, which a fetch (bitmap write) or a pin refreshes. Open data fds are bounded
too (``MAX_OPEN_FILES``).

Concurrency: ``lock`` guards every table and counter here and every mutable field of a
``CachedFile``; it is never held across a fetch. The fetcher (worker/fetch.py) and the cache
(worker/cache.py) take it to claim blocks and to read the tables.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import struct
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from proto.fileids import is_hex_id

log = logging.getLogger("cluster.worker")

# Open data fds kept for unpinned files; beyond it the least recently read are closed (the
# soft RLIMIT_NOFILE is often 1024, and a cache may hold thousands of files).
MAX_OPEN_FILES = 256
# When ``durable``, a file's new blocks are fdatasync'ed (and only then their bits written to the
# ``.have``) once this many bytes are pending, when the file completes, and when its last pin
# goes: one sync per batch instead of one per fetched run.
SYNC_BATCH = 32 << 20

_MAGIC = b"BCH1"
_HEADER = struct.Struct("<4sIQ")  # magic, block size, file size


@dataclass(slots=True, eq=False)
class CachedFile:
    """One cached file. Mutable fields change under CacheIndex.lock only."""

    fid: bytes
    size: int
    nblocks: int
    have: bytearray
    present: int = 0
    nbytes: int = 0
    tick: int = 0
    fd: int = -1
    hfd: int = -1
    # blocks being fetched (worker/fetch.py): a reader that needs one waits on its Event
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


class CacheIndex:
    """The files a block cache holds under ``root``, their pins, their fds and its counters."""

    def __init__(self, root: Path, capacity_bytes: int, block_size: int, *, durable: bool) -> None:
        if block_size <= 0 or capacity_bytes < 0:
            raise ValueError("block_size must be positive and capacity_bytes non-negative")
        self.root = Path(root).absolute()  # libfuse may chdir("/") after the mount
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.block_size = block_size
        self.durable = durable
        self.lock = threading.Lock()
        self.files: dict[bytes, CachedFile] = {}
        # The complete files, read without the lock by callers that hold a pin (BlockCache.prepare).
        self.complete: dict[bytes, CachedFile] = {}
        self.pins: dict[bytes, int] = {}
        self.ticks = itertools.count(1)
        self.open = 0
        self.cached = 0
        self.hits = self.misses = self.fetched = self.prefetched = self.evictions = self.over = 0
        self._load()

    # ---- names and entries ------------------------------------------------------------------

    def data_path(self, fid: bytes) -> Path:
        return self.root / f"{fid.hex()}.data"

    def have_path(self, fid: bytes) -> Path:
        return self.root / f"{fid.hex()}.have"

    def tmp_path(self, fid: bytes) -> Path:
        return self.root / f"{fid.hex()}.{uuid.uuid4().hex}.tmp"

    def block_len(self, f: CachedFile, b: int) -> int:
        return min(self.block_size, f.size - b * self.block_size)

    def _new_file(self, fid: bytes, size: int, full: bool) -> CachedFile:
        nblocks = -(-size // self.block_size)
        have = bytearray(-(-nblocks // 8))
        f = CachedFile(fid, size, nblocks, have)
        if full:
            for b in range(nblocks):
                have[b >> 3] |= 1 << (b & 7)
            f.present, f.nbytes = nblocks, size
        f.disk = bytearray(have)
        return f

    def _header(self, f: CachedFile) -> bytes:
        return _HEADER.pack(_MAGIC, self.block_size, f.size) + bytes(f.have)

    def _create_locked(self, fid: bytes, size: int) -> CachedFile:
        """A new, empty entry with its files on disk (data first: an orphan is harmless)."""
        f = self._new_file(fid, size, full=size == 0)
        fd = os.open(self.data_path(fid), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        write_new(self.have_path(fid), self._header(f))
        self._add_locked(f)
        return f

    def _add_locked(self, f: CachedFile) -> None:
        self.files[f.fid] = f
        if f.complete:
            self.complete[f.fid] = f
        self.cached += f.nbytes
        f.tick = next(self.ticks)

    def install(self, fid: bytes, size: int, tmp: Path) -> bool:
        """Move a complete data file written at ``tmp`` into place and index it; False (``tmp``
        removed) if ``fid`` has an entry already."""
        try:
            if self.durable:
                fsync_path(tmp)
            f = self._new_file(fid, size, full=True)
            with self.lock:
                if fid not in self.files:
                    os.replace(tmp, self.data_path(fid))
                    write_new(self.have_path(fid), self._header(f))
                    self._add_locked(f)
                    self.evict_locked()
                    return True
        finally:
            tmp.unlink(missing_ok=True)
        return False

    # ---- pins and fds -----------------------------------------------------------------------

    def hold(self, fid: bytes, size: int) -> CachedFile:
        """Pin ``fid`` (creating its entry) and open its fds; the caller unpins."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        with self.lock:
            f = self.files.get(fid)
            if f is None:
                f = self._create_locked(fid, size)
            elif f.size != size:
                raise ValueError(f"{fid.hex()}: size {size} differs from the cached {f.size}")
            self.pins[fid] = self.pins.get(fid, 0) + 1
            f.tick = next(self.ticks)
            try:
                self._open_locked(f)
            except BaseException:
                self.pins[fid] -= 1
                if not self.pins[fid]:
                    del self.pins[fid]
                raise
            if f.complete:
                self.hits += 1
            return f

    def pin(self, fid: bytes) -> None:
        """Protect ``fid`` from eviction until a matching ``unpin`` (pins are counted)."""
        with self.lock:
            self.pins[fid] = self.pins.get(fid, 0) + 1
            f = self.files.get(fid)
            if f is not None:
                f.tick = next(self.ticks)
        if f is not None:
            self._touch(f)

    def unpin(self, fid: bytes) -> None:
        """Drop one pin on ``fid``; evicts if the cache was held over capacity by pins."""
        f = self.files.get(fid)
        if f is not None and f.pending and self.pins.get(fid, 0) == 1:
            self.flush(f)  # the last pin (a racing pin only means an early flush): still held
        with self.lock:
            count = self.pins.get(fid, 0)
            if count <= 0:
                raise RuntimeError(f"unpin of {fid.hex()} without a pin")
            if count == 1:
                del self.pins[fid]
                f = self.files.get(fid)
                if f is not None and not f.present and f.nblocks and not f.inflight:
                    self._drop_locked(f)  # every fetch failed: keep no empty entry around
                self.evict_locked()
            else:
                self.pins[fid] = count - 1

    def _open_locked(self, f: CachedFile) -> None:
        if f.fd < 0:
            if self.open >= MAX_OPEN_FILES:
                self._close_idle_locked()
            flags = os.O_RDONLY if f.complete else os.O_RDWR
            f.fd = os.open(self.data_path(f.fid), flags | os.O_CLOEXEC)
            self.open += 1
        if not f.complete and f.hfd < 0:
            f.hfd = os.open(self.have_path(f.fid), os.O_WRONLY | os.O_CLOEXEC)

    def _close_fds_locked(self, f: CachedFile) -> None:
        if f.fd >= 0:
            os.close(f.fd)
            f.fd = -1
            self.open -= 1
        if f.hfd >= 0:
            os.close(f.hfd)
            f.hfd = -1

    def _close_idle_locked(self) -> None:
        """Close the fds of the least recently read unpinned files, down to half the budget."""
        idle = sorted(
            (f for f in self.files.values() if f.fd >= 0 and f.fid not in self.pins and not f.inflight),
            key=lambda f: f.tick,
        )
        for f in idle:
            if self.open < MAX_OPEN_FILES // 2:
                break
            self._close_fds_locked(f)

    def _touch(self, f: CachedFile) -> None:
        """Refresh the ``.have`` mtime: the LRU order a restart rebuilds."""
        try:
            os.utime(self.have_path(f.fid))
        except FileNotFoundError:
            pass  # evicted meanwhile

    # ---- present blocks ---------------------------------------------------------------------

    def add_blocks_locked(self, f: CachedFile, b0: int, b1: int, length: int, count: bool) -> bool:
        """Blocks ``b0``-``b1`` (``length`` bytes) were just written to ``f``'s data: mark them
        present. Returns whether a flush is due (call ``flush`` without the lock)."""
        flush = False
        for b in range(b0, b1 + 1):
            f.have[b >> 3] |= 1 << (b & 7)
        f.present += b1 - b0 + 1
        f.nbytes += length
        self.cached += length
        if count:
            self.fetched += length
        if self.durable:
            f.pending.extend(range(b0, b1 + 1))
            f.unsynced += length
            flush = f.unsynced >= SYNC_BATCH or f.complete
        else:
            self._write_bits_locked(f, range(b0, b1 + 1))
        if f.complete:
            self.complete[f.fid] = f
            if not f.pending and not f.syncing:
                os.close(f.hfd)
                f.hfd = -1
        return flush

    def _write_bits_locked(self, f: CachedFile, blocks: range | list[int]) -> None:
        """Set ``blocks`` in the on-disk bitmap; their data must be written (durable: synced)."""
        for b in blocks:
            f.disk[b >> 3] |= 1 << (b & 7)
        lo, hi = min(blocks) >> 3, (max(blocks) >> 3) + 1
        if f.hfd < 0:
            return  # closed meanwhile (only when unpinned): the bits are lost, the data is not
        # Under the lock so that two runs sharing a bitmap byte cannot write it out of order.
        try:
            pwrite_full(f.hfd, memoryview(f.disk)[lo:hi], _HEADER.size + lo)
        except OSError as e:  # the data is good; a restart merely fetches these blocks again
            log.warning("block cache: bitmap of %s not updated: %s", f.fid.hex(), e)

    def flush(self, f: CachedFile) -> None:
        """fdatasync ``f``'s pending blocks, then set their on-disk bits (one batch).

        The caller holds a pin on ``f`` (its fds stay open). A failed sync keeps the bits off
        disk: the blocks stay readable now and are fetched again after a restart.
        """
        with self.lock:
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
        with self.lock:
            f.syncing -= 1
            if synced:
                self._write_bits_locked(f, blocks)
            if f.complete and not f.pending and not f.syncing and f.hfd >= 0:
                os.close(f.hfd)
                f.hfd = -1

    # ---- eviction, restart, shutdown --------------------------------------------------------

    def evict_locked(self) -> None:
        if self.cached <= self.capacity_bytes:
            return
        victims = sorted(
            (f for f in self.files.values() if f.fid not in self.pins and not f.inflight and f.nbytes),
            key=lambda f: f.tick,
        )
        for f in victims:
            if self.cached <= self.capacity_bytes:
                break
            self._drop_locked(f)
            self.evictions += 1
        if self.cached > self.capacity_bytes:
            self.over += 1

    def _drop_locked(self, f: CachedFile) -> None:
        self._close_fds_locked(f)
        # .have first: a crash in between leaves an orphan .data, which a restart removes.
        self.have_path(f.fid).unlink(missing_ok=True)
        self.data_path(f.fid).unlink(missing_ok=True)
        del self.files[f.fid]
        self.complete.pop(f.fid, None)
        self.cached -= f.nbytes

    def _load(self) -> None:
        """Rebuild the index from ``root``: LRU order from the ``.have`` mtimes."""
        found: list[tuple[int, CachedFile]] = []
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
        with self.lock:
            for _, f in sorted(found, key=lambda item: item[0]):
                self._add_locked(f)
            for path in self.root.glob("*.data"):
                fid = _parse_hex(path.stem)
                if fid is None or fid not in self.files:
                    path.unlink(missing_ok=True)
            self.evict_locked()
        log.info("block cache %s: %d files, %d bytes", self.root, len(self.files), self.cached)

    def _load_one(self, path: Path) -> tuple[int, CachedFile] | None:
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
        f.nbytes = sum(self.block_len(f, b) for b in present)
        return mtime, f

    def close(self) -> None:
        """Flush what is pending and close every fd; the on-disk state stays."""
        for f in list(self.files.values()):
            if f.pending:
                self.flush(f)
        with self.lock:
            for f in self.files.values():
                self._close_fds_locked(f)

    # ---- reports ----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The counters of ``BlockCache.stats``."""
        with self.lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "bytes_fetched": self.fetched,
                "bytes_prefetched": self.prefetched,
                "bytes_cached": self.cached,
                "files": len(self.files),
                "complete_files": len(self.complete),
                "evictions": self.evictions,
                "over_capacity": self.over,
                "pinned": len(self.pins),
                "capacity_bytes": self.capacity_bytes,
            }

    def validate_state(self) -> None:
        """Check the index's invariants (tests call it); raises AssertionError."""
        with self.lock:
            total = 0
            for fid, f in self.files.items():
                bits = sum(f.has(b) for b in range(f.nblocks))
                assert bits == f.present, (fid.hex(), bits, f.present)
                assert f.nbytes == sum(self.block_len(f, b) for b in range(f.nblocks) if f.has(b))
                assert (fid in self.complete) == f.complete, fid.hex()
                assert all(f.has(b) for b in f.pending), fid.hex()
                assert all(f.has(b) for b in range(f.nblocks) if f.disk[b >> 3] & (1 << (b & 7)))
                total += f.nbytes
            assert total == self.cached, (total, self.cached)
            assert set(self.complete) <= set(self.files)
            assert self.open == sum(f.fd >= 0 for f in self.files.values())


# ---- file helpers -------------------------------------------------------------------------------


def _parse_hex(name: str) -> bytes | None:
    return bytes.fromhex(name) if is_hex_id(name) else None


def pread_full(fd: int, n: int, offset: int) -> bytes:
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


def pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def write_new(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pwrite_full(fd, memoryview(content), 0)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
