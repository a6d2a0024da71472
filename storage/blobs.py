"""The storage node's blob store: immutable, content-addressed files on local disk.

Theory of operation
-------------------
A file's id and its block hashes are computed as proto/fileids.py says (one BLAKE3 pass gives
both); the sidecar of each blob keeps the block hashes, to verify reads with.

Layout under ``root``::

    blobs/<2 hex>/<32 hex>          the data, mode 0444
    blobs/<2 hex>/<32 hex>.blocks   its sidecar: the concatenated block hashes
    partial/<32 hex>.part           an upload in progress (resumable across restarts)
    *.tmp                           anything half-written; deleted at startup

Commit protocol (design.md, "writes go to a temporary name, are hashed, fsynced and renamed"):
fsync the data, write the sidecar to a temp name, fsync it, rename it into place, fsync the
directory, then rename the data into place and fsync the directory again. The data rename is the
commit point: a data file never exists without its sidecar, and a crash leaves at worst an orphan
sidecar or temp file, which startup deletes. A reader sees the old file or the new one, never half.

Reads verify: every block a read touches is hashed and compared with the sidecar, so a flipped
bit on disk is reported (``corrupt``) instead of served. ``verify`` rehashes a whole file for the
scrub, and ``replace_from`` writes a fresh copy beside a bad one and renames it over.

Concurrency: the node's loop thread and its scrub thread share one store. Three kinds of lock,
always taken in this order: an upload session's lock (one writer per upload); a per-id "name"
lock stripe, held by whatever creates, renames or unlinks that id's files; and the store lock,
held only for dictionary and counter updates and single metadata calls, never across data I/O,
so reads never wait long on it. Open data files are cached (an LRU of ``open_files``) with a
reference count, so an fd evicted or dropped by a delete is closed only when its last reader is
done with it: a number is never reused under a reader's feet. A delete or replace bumps an epoch
after its unlink or rename; a reader whose open() overlapped one uses its fd once and does not
cache it, since it may belong to the old file.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import blake3

from proto.fileids import BLOCK, HASH_SIZE, IO_CHUNK, BlockHasher, file_id, file_id_of_path, hash_fd, hex_id, is_hex_id

log = logging.getLogger("cluster.storage")

MAX_READ = 64 << 20  # the most one read() returns: a node never buffers a whole large file
OPEN_FILES = 64
ERROR_CODES = frozenset(
    {"not_found", "out_of_range", "corrupt", "no_space", "bad_offset", "size_mismatch", "hash_mismatch",
     "too_large", "bad_id"}
)
COUNTERS = ("reads", "bytes_read", "corrupt_reads", "writes", "bytes_written", "finished", "dedupes",
            "hash_mismatches", "no_space", "repairs", "deleted")
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_STRIPES = 64


class StoreError(Exception):
    """A request the store refused; ``code`` is one of ``ERROR_CODES`` and stable for peers."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown StoreError code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _check_id(fid: bytes) -> bytes:
    if not isinstance(fid, (bytes, bytearray, memoryview)) or len(fid) != HASH_SIZE:
        raise StoreError("bad_id", f"a file id is {HASH_SIZE} bytes, got {fid!r:.60}; ids come from file_id()")
    return bytes(fid)



# ---- small file-system helpers -------------------------------------------------------------------


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]  # a short read on a regular file: only at its end, or after a signal
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class _Handle:
    """An open blob shared by readers: its fd, size and block hashes, reference counted."""

    __slots__ = ("fd", "size", "hashes", "refs", "cached")

    def __init__(self, fd: int, size: int, hashes: bytes) -> None:
        self.fd, self.size, self.hashes = fd, size, hashes
        self.refs = 0
        self.cached = False


class _Session:
    """One upload in progress: the partial's fd and the hash of what it holds so far."""

    __slots__ = ("fid", "size", "fd", "hasher", "lock", "open")

    def __init__(self, fid: bytes, size: int) -> None:
        self.fid, self.size = fid, size
        self.fd: int | None = None
        self.hasher = BlockHasher()
        self.lock = threading.Lock()
        self.open = True

    @property
    def end(self) -> int:
        return self.hasher.size


class BlobStore:
    """The blobs of one storage node under ``root``. Thread-safe; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], *, reserve_bytes: int = 64 << 20, fsync: bool = True,
                 open_files: int = OPEN_FILES) -> None:
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self.fsync = fsync
        self.open_files = open_files
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._blobs = str(self.root / "blobs")
        self._partial = str(self.root / "partial")
        self._lock = threading.Lock()
        self._names = [threading.RLock() for _ in range(_STRIPES)]
        self._handles: OrderedDict[bytes, _Handle] = OrderedDict()
        self._sessions: dict[bytes, _Session] = {}
        self._epoch = 0  # bumped whenever a blob's file is unlinked or replaced; see _acquire
        self._blob_count = 0
        self._blob_bytes = 0
        os.makedirs(self._blobs, exist_ok=True)
        os.makedirs(self._partial, exist_ok=True)
        self._recover()

    def __enter__(self) -> "BlobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close cached fds and upload sessions; partials stay on disk for a later ``begin``."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            with session.lock:
                if session.open:
                    self._end_session(session, keep=True)
        with self._lock:
            while self._handles:
                self._uncache(next(iter(self._handles)))

    # ---- paths and startup -----------------------------------------------------------------------

    def _blob_path(self, fid: bytes) -> str:
        h = fid.hex()
        return os.path.join(self._blobs, h[:2], h)

    def _part_path(self, fid: bytes) -> str:
        return os.path.join(self._partial, fid.hex() + ".part")

    def _name_lock(self, fid: bytes) -> threading.RLock:
        return self._names[fid[0] % _STRIPES]

    def _recover(self) -> None:
        """Delete what a crash left half-done (temp files, sidecars without data); count blobs."""
        removed = orphans = 0
        with os.scandir(self._blobs) as top:
            dirs = [e.path for e in top if e.is_dir()]
        for d in dirs:
            with os.scandir(d) as it:
                entries = list(it)
            names = {e.name for e in entries}
            for e in entries:
                if e.name.endswith(".tmp"):
                    removed += _unlink_quietly(e.path)
                elif e.name.endswith(".blocks") and e.name[:-7] not in names:
                    orphans += _unlink_quietly(e.path)
                elif is_hex_id(e.name):
                    self._blob_count += 1
                    self._blob_bytes += e.stat().st_size
                    if e.name + ".blocks" not in names:
                        log.warning("blob %s has no sidecar: its reads fail until repaired", e.name)
        with os.scandir(self._partial) as it:
            for e in it:
                if e.name.endswith(".tmp"):
                    removed += _unlink_quietly(e.path)
        if removed or orphans:
            log.info("blob store %s: removed %d temp files and %d orphan sidecars left by a crash",
                     self.root, removed, orphans)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # ---- reads -----------------------------------------------------------------------------------

    def has(self, fid: bytes) -> bool:
        """Whether the blob is stored here (committed, not an upload in progress)."""
        return os.path.isfile(self._blob_path(_check_id(fid)))

    def size(self, fid: bytes) -> int:
        """The stored blob's size in bytes; ``not_found`` if it is not stored here."""
        fid = _check_id(fid)
        try:
            return os.stat(self._blob_path(fid)).st_size
        except FileNotFoundError:
            raise StoreError("not_found", f"blob {fid.hex()} is not stored here; ask another replica") from None

    def read(self, fid: bytes, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``, verified block by block against the sidecar.

        Like pread: ``length`` is clipped at the end, and ``offset == size`` gives ``b""``. Raises
        not_found, out_of_range (offset past the end), too_large (more than ``MAX_READ`` bytes
        after clipping) or corrupt (a block differs from its hash: read another replica).
        """
        fid = _check_id(fid)
        h = self._acquire(fid)
        try:
            if offset < 0 or length < 0 or offset > h.size:
                raise StoreError("out_of_range", f"cannot read {length} bytes at offset {offset} of blob "
                                 f"{fid.hex()}, which has {h.size} bytes")
            end = min(h.size, offset + length)
            if end - offset > MAX_READ:
                raise StoreError("too_large", f"read at most {MAX_READ} bytes per call, not {end - offset}")
            if end == offset:
                return b""
            first = offset // BLOCK
            start = first * BLOCK
            stop = min(h.size, -(-end // BLOCK) * BLOCK)
            data = self._read_verified(fid, h, first, start, stop)
        finally:
            self._release(h)
        with self._lock:
            self.counters["reads"] += 1
            self.counters["bytes_read"] += end - offset
        if start == offset and stop == end:
            return data  # block-aligned: the buffer read is the answer, no copy
        return data[offset - start:end - start]

    def _read_verified(self, fid: bytes, h: _Handle, first: int, start: int, stop: int) -> bytes:
        try:
            data = _pread_all(h.fd, stop - start, start)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            self._count("corrupt_reads")
            raise StoreError("corrupt", f"blob {fid.hex()}: the disk failed to read bytes {start}-{stop} (EIO); "
                             "read another replica and repair this one") from e
        if len(data) != stop - start:  # shorter than fstat said when opened: truncated under us
            self._count("corrupt_reads")
            raise StoreError("corrupt", f"blob {fid.hex()} ends at byte {start + len(data)}, before its size "
                             f"{h.size}; read another replica and repair this one")
        view = memoryview(data)
        for i, pos in enumerate(range(0, stop - start, BLOCK)):
            block = first + i
            got = blake3.blake3(view[pos:pos + BLOCK]).digest(HASH_SIZE)
            if got != h.hashes[block * HASH_SIZE:(block + 1) * HASH_SIZE]:
                self._count("corrupt_reads")
                raise StoreError("corrupt", f"blob {fid.hex()} block {block} (bytes {block * BLOCK}-"
                                 f"{min(h.size, (block + 1) * BLOCK)}) does not match its hash; read another "
                                 "replica and repair this one")
        return data

    def _open_handle(self, fid: bytes) -> _Handle:
        path = self._blob_path(fid)
        for _attempt in range(3):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                break
            try:
                size = os.fstat(fd).st_size
                with open(path + ".blocks", "rb") as f:
                    hashes = f.read()
            except FileNotFoundError:
                unlinked = os.fstat(fd).st_nlink == 0
                os.close(fd)
                if unlinked:  # deleted or replaced between our two opens: look again
                    continue
                raise StoreError("corrupt", f"blob {fid.hex()} has no sidecar of block hashes; repair it from "
                                 "another replica") from None
            except BaseException:
                os.close(fd)
                raise
            if len(hashes) != -(-size // BLOCK) * HASH_SIZE:
                os.close(fd)
                raise StoreError("corrupt", f"blob {fid.hex()} has {size} bytes but its sidecar lists "
                                 f"{len(hashes) // HASH_SIZE} blocks (truncated?); repair it from another replica")
            return _Handle(fd, size, hashes)
        raise StoreError("not_found", f"blob {fid.hex()} is not stored here; ask another replica")

    def _acquire(self, fid: bytes) -> _Handle:
        """A referenced handle on the blob; pair with ``_release``."""
        with self._lock:
            h = self._handles.get(fid)
            if h is not None:
                self._handles.move_to_end(fid)
                h.refs += 1
                return h
            epoch = self._epoch
        fresh = self._open_handle(fid)  # outside the lock: open() may wait on the disk
        with self._lock:
            h = self._handles.get(fid)
            if h is not None:  # another reader opened it meanwhile
                os.close(fresh.fd)
                self._handles.move_to_end(fid)
            elif self._epoch == epoch:
                h = fresh
                h.cached = True
                self._handles[fid] = h
                while len(self._handles) > self.open_files:
                    self._uncache(next(iter(self._handles)))
            else:  # a delete or replace ran while we opened: the fd may be the old file's; use it once
                h = fresh
            h.refs += 1
            return h

    def _release(self, h: _Handle) -> None:
        with self._lock:
            h.refs -= 1
            if h.refs == 0 and not h.cached:
                os.close(h.fd)

    def _uncache(self, fid: bytes) -> None:
        """Drop a cached handle (store lock held); its fd closes when its last reader is done."""
        h = self._handles.pop(fid, None)
        if h is not None:
            h.cached = False
            if h.refs == 0:
                os.close(h.fd)

    # ---- uploads ---------------------------------------------------------------------------------

    def begin(self, fid: bytes, size: int) -> int:
        """Start or resume the upload of blob ``fid`` of ``size`` bytes; returns the offset to send from.

        0 for a new upload; the length of the partial an earlier try left (in this process or a
        previous one: the prefix is rehashed); ``size`` when the blob is already stored (dedupe:
        send nothing, no ``finish``). Raises size_mismatch (a stored blob or open upload of this id
        has another size), too_large (more than this node's disk can ever hold) or no_space (not
        enough free space above ``reserve_bytes``, counting what open uploads still have to send).
        """
        return self._begin(_check_id(fid), size)[0]

    def _begin(self, fid: bytes, size: int) -> tuple[int, bool]:
        """``begin``, and whether it deduped (no session was opened)."""
        if size < 0:
            raise StoreError("size_mismatch", f"a blob's size is at least 0, not {size}")
        stored = self._stored_size(fid)
        if stored is not None:
            if stored != size:
                raise StoreError("size_mismatch", f"blob {fid.hex()} is stored with {stored} bytes, not {size}: "
                                 "the id or the size sent is wrong")
            self._count("dedupes")
            return size, True
        while True:
            with self._lock:
                session = self._sessions.get(fid)
                if session is None:
                    session = self._sessions[fid] = _Session(fid, size)
                    session.lock.acquire()  # a new lock: taking it under the store lock cannot deadlock
                    break
            with session.lock:
                if session.open:
                    if session.size != size:
                        raise StoreError("size_mismatch", f"an upload of {fid.hex()} with {session.size} bytes is "
                                         f"in progress; {size} cannot be right for the same id")
                    return session.end, False
            # that session ended while we waited for it (a failed begin, an abort): open a new one
        try:
            self._open_session(session)
        except BaseException:
            self._end_session(session, keep=True)
            raise
        finally:
            session.lock.release()
        return session.end, False

    def _stored_size(self, fid: bytes) -> int | None:
        try:
            return os.stat(self._blob_path(fid)).st_size
        except FileNotFoundError:
            return None

    def _open_session(self, session: _Session) -> None:
        """Open (creating or resuming) the partial of a new session; its lock is held."""
        fid, path = session.fid, self._part_path(session.fid)
        with self._name_lock(fid):
            try:
                have = os.stat(path).st_size
            except FileNotFoundError:
                have = 0
            if have > session.size:  # from an upload that declared another size: no use to this one
                log.info("partial %s has %d bytes, more than the %d now declared: starting over",
                         fid.hex(), have, session.size)
                os.unlink(path)
                have = 0
            self._check_space(session.size, session.size - have, session)
            session.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if have:
            os.utime(session.fd)  # resumed now: not a stale partial for drop_stale_partials
            # After a crash the tail may be garbage on some file systems (written size, unwritten
            # data): then the id will not match at finish, and the upload is discarded, not stored.
            session.hasher = hash_fd(session.fd, have)

    def _check_space(self, size: int, need: int, session: _Session | None) -> None:
        st = os.statvfs(self.root)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if size > total - self.reserve_bytes:
            raise StoreError("too_large", f"{size} bytes is more than this node's disk can ever hold "
                             f"({total} bytes, {self.reserve_bytes} kept in reserve); store it on a bigger node")
        with self._lock:
            promised = sum(s.size - s.end for s in self._sessions.values() if s is not session and s.fd is not None)
        if need > 0 and need > free - self.reserve_bytes - promised:
            self._count("no_space")
            raise StoreError("no_space", f"{need} bytes do not fit: {free} free, {self.reserve_bytes} kept in "
                             f"reserve, {promised} promised to uploads in progress; try another node")

    def _session(self, fid: bytes) -> _Session:
        fid = _check_id(fid)
        with self._lock:
            session = self._sessions.get(fid)
        if session is None:
            raise _no_upload(fid)
        return session

    def write(self, fid: bytes, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` at ``offset``, which must be the upload's current end; returns the new end.

        Raises not_found (no upload in progress: call ``begin``), bad_offset (send from the offset
        the message names), size_mismatch (past the size given to ``begin``) or no_space (the
        partial is deleted: nothing half-written stays; try another node).
        """
        session = self._session(fid)
        view = memoryview(data).cast("B")
        with session.lock:
            if not session.open or session.fd is None:
                raise _no_upload(session.fid)
            end = session.end
            if offset != end:
                raise StoreError("bad_offset", f"the upload of {session.fid.hex()} is at offset {end}, not {offset}; "
                                 f"send from {end}")
            if end + len(view) > session.size:
                raise StoreError("size_mismatch", f"{len(view)} bytes at {end} overrun the {session.size} bytes "
                                 f"declared for {session.fid.hex()}")
            try:
                _pwrite_all(session.fd, view, end)
            except OSError as e:
                # The partial may now hold bytes its hash does not cover: never resume from it.
                self._end_session(session, keep=False)
                if e.errno in _NO_SPACE:
                    self._count("no_space")
                    raise StoreError("no_space", f"the disk filled while writing {session.fid.hex()} at {end}; "
                                     "the partial is deleted, upload it to another node") from e
                raise
            session.hasher.update(view)
        with self._lock:
            self.counters["writes"] += 1
            self.counters["bytes_written"] += len(view)
        return end + len(view)

    def finish(self, fid: bytes) -> None:
        """Check the upload's size and id and commit it: from now on ``read`` serves it.

        Raises size_mismatch (bytes missing: the upload stays open, send from the offset named),
        hash_mismatch (the content is not the id: the partial is deleted) or no_space.
        """
        session = self._session(fid)
        fid = session.fid
        with session.lock:
            if not session.open or session.fd is None:
                raise _no_upload(fid)
            if session.end != session.size:
                raise StoreError("size_mismatch", f"the upload of {fid.hex()} has {session.end} of its "
                                 f"{session.size} bytes; write the rest from offset {session.end}")
            digest = session.hasher.digest()
            if digest != fid:
                self._end_session(session, keep=False)
                self._count("hash_mismatches")
                raise StoreError("hash_mismatch", f"the upload of {fid.hex()} hashes to {digest.hex()}: the content "
                                 "or the id is wrong; it is discarded, begin again from offset 0")
            try:
                if self.fsync:
                    os.fsync(session.fd)
                os.fchmod(session.fd, 0o444)
                with self._name_lock(fid):
                    self._install(fid, self._part_path(fid), session.size, session.hasher.block_hashes())
                    self._end_session(session, keep=True)
            except OSError as e:
                self._end_session(session, keep=False)
                if e.errno in _NO_SPACE:
                    self._count("no_space")
                    raise StoreError("no_space", f"the disk filled while committing {fid.hex()}; the upload is "
                                     "deleted, send it to another node") from e
                raise
        self._count("finished")

    def abort(self, fid: bytes, keep: bool = True) -> None:
        """End the upload of ``fid``: keep its partial for a later ``begin`` to resume, or delete it."""
        fid = _check_id(fid)
        with self._lock:
            session = self._sessions.get(fid)
        if session is not None:
            with session.lock:
                if session.open:
                    self._end_session(session, keep=keep)
                    return
        if not keep:
            self._unlink_idle_partial(fid)

    def _end_session(self, session: _Session, *, keep: bool) -> None:
        """Close a session (its lock held) and forget it; delete its partial unless ``keep``."""
        with self._name_lock(session.fid):
            session.open = False
            if session.fd is not None:
                os.close(session.fd)
                session.fd = None
            with self._lock:
                if self._sessions.get(session.fid) is session:
                    del self._sessions[session.fid]
            if not keep:
                _unlink_quietly(self._part_path(session.fid))

    def _unlink_idle_partial(self, fid: bytes) -> bool:
        with self._name_lock(fid):
            with self._lock:
                session = self._sessions.get(fid)
                if session is not None and session.fd is not None:
                    return False  # an upload resumed it meanwhile
            return _unlink_quietly(self._part_path(fid))

    def put_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Store ``data`` through begin/write/finish; returns its id."""
        view = memoryview(data).cast("B")
        return self._put(file_id(view), len(view), lambda offset: [view[offset:]])

    def put_path(self, path: str | os.PathLike[str]) -> bytes:
        """Store the file at ``path`` through begin/write/finish; returns its id.

        Two passes over the file: one for the id (so a stored blob is deduped without writing a
        byte), one to copy it. If the file changes in between, ``finish`` says hash_mismatch.
        """
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            hasher = hash_fd(fd)
            return self._put(hasher.digest(), hasher.size, lambda offset: _chunks_of(fd, offset, hasher.size))
        finally:
            os.close(fd)

    def _put(self, fid: bytes, size: int, chunks_from: Callable[[int], Iterable[memoryview]]) -> bytes:
        offset, deduped = self._begin(fid, size)
        if deduped:
            return fid
        try:
            for chunk in chunks_from(offset):
                offset = self.write(fid, offset, chunk)
            self.finish(fid)
        except BaseException:
            self.abort(fid)  # keeps what was written for a retry (no_space and hash_mismatch removed it)
            raise
        return fid

    # ---- repair, deletion, listing ---------------------------------------------------------------

    def _install(self, fid: bytes, src: str, size: int, hashes: bytes) -> None:
        """Commit ``src`` (complete, fsynced) as blob ``fid``: sidecar first, then the data rename.

        The caller holds the id's name lock, so nothing else renames or unlinks these names.
        """
        h = fid.hex()
        d = os.path.join(self._blobs, h[:2])
        dest = os.path.join(d, h)
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        else:
            if self.fsync:
                _fsync_dir(self._blobs)
        tmp = f"{dest}.blocks.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                _pwrite_all(fd, memoryview(hashes), 0)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, dest + ".blocks")
        except BaseException:
            _unlink_quietly(tmp)
            raise
        if self.fsync:
            _fsync_dir(d)  # the sidecar is durable before the data it describes can appear
        old = self._stored_size(fid)
        os.rename(src, dest)  # the commit point
        with self._lock:
            self._epoch += 1
            self._uncache(fid)
            self._blob_count += old is None
            self._blob_bytes += size - (old or 0)
        if self.fsync:
            _fsync_dir(d)

    def replace_from(self, fid: bytes, chunks: Iterable[bytes | bytearray | memoryview], *,
                     size: int | None = None) -> None:
        """Write a fresh copy of blob ``fid`` from ``chunks`` (e.g. another replica's) and rename it over.

        The copy is checked against the id before it replaces anything, and readers see the old
        file or the new one, never half of one. Also installs a blob not stored before. Give
        ``size`` to check free space first. Raises hash_mismatch, size_mismatch or no_space.
        """
        fid = _check_id(fid)
        if size is not None:
            self._check_space(size, size, None)
        tmp = os.path.join(self._partial, f"{fid.hex()}.{secrets.token_hex(4)}.tmp")
        try:
            hasher = self._copy_in(fid, tmp, chunks, size)
            with self._name_lock(fid):
                self._install(fid, tmp, hasher.size, hasher.block_hashes())
        except OSError as e:
            _unlink_quietly(tmp)
            if e.errno in _NO_SPACE:
                self._count("no_space")
                raise StoreError("no_space", f"the disk filled while repairing {fid.hex()}") from e
            raise
        except BaseException:
            _unlink_quietly(tmp)
            raise
        self._count("repairs")
        log.info("blob %s rewritten from a fresh copy", fid.hex())

    def _copy_in(self, fid: bytes, tmp: str, chunks: Iterable[bytes | bytearray | memoryview],
                 size: int | None) -> BlockHasher:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            hasher = BlockHasher()
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                if size is not None and hasher.size + len(view) > size:
                    raise StoreError("size_mismatch", f"the copy of {fid.hex()} runs past the {size} bytes declared")
                _pwrite_all(fd, view, hasher.size)
                hasher.update(view)
            if size is not None and hasher.size != size:
                raise StoreError("size_mismatch", f"the copy of {fid.hex()} has {hasher.size} of {size} bytes")
            digest = hasher.digest()
            if digest != fid:
                self._count("hash_mismatches")
                raise StoreError("hash_mismatch", f"the copy of {fid.hex()} hashes to {digest.hex()}; fetch it from "
                                 "another replica")
            if self.fsync:
                os.fsync(fd)
            os.fchmod(fd, 0o444)
            return hasher
        finally:
            os.close(fd)

    def touch(self, fid: bytes) -> bool:
        """Mark blob ``fid`` as just stored (its mtime): an upload that found it here (dedupe)
        must not see it collected before its registration reaches the ledger."""
        fid = _check_id(fid)
        with self._name_lock(fid):
            try:
                os.utime(self._blob_path(fid))
            except FileNotFoundError:
                return False
        return True

    def delete_if_older(self, fid: bytes, cutoff: float) -> bool:
        """Delete blob ``fid`` only if its mtime is still before ``cutoff`` (wall clock), checked
        under the lock ``touch`` takes: a dedupe that touched it since the collector looked
        keeps it. Returns whether it was deleted."""
        fid = _check_id(fid)
        with self._name_lock(fid):
            try:
                if os.stat(self._blob_path(fid)).st_mtime >= cutoff:
                    return False
            except FileNotFoundError:
                return False
            return self._delete_locked(fid)

    def delete(self, fid: bytes) -> bool:
        """Delete blob ``fid``; returns whether it was stored. Readers already reading finish first."""
        fid = _check_id(fid)
        with self._name_lock(fid):
            return self._delete_locked(fid)

    def _delete_locked(self, fid: bytes) -> bool:
        dest = self._blob_path(fid)
        size = self._stored_size(fid)
        if size is not None:
            _unlink_quietly(dest)
        # The sidecar after the data: a crash between leaves an orphan sidecar, which startup removes.
        _unlink_quietly(dest + ".blocks")
        with self._lock:
            self._epoch += 1
            self._uncache(fid)
            if size is not None:
                self._blob_count -= 1
                self._blob_bytes -= size
                self.counters["deleted"] += 1
        return size is not None

    def ids(self) -> Iterator[tuple[bytes, float]]:
        """(id, mtime) of every stored blob, by id; blobs added or deleted meanwhile may or may not appear."""
        with os.scandir(self._blobs) as top:
            dirs = sorted(e.path for e in top if len(e.name) == 2 and e.is_dir())
        for d in dirs:
            with os.scandir(d) as it:
                entries = sorted((e for e in it if is_hex_id(e.name)), key=lambda e: e.name)
            for e in entries:
                try:
                    mtime = e.stat().st_mtime
                except FileNotFoundError:
                    continue
                yield bytes.fromhex(e.name), mtime

    def verify(self, fid: bytes) -> str | None:
        """Rehash the whole blob for the scrub: None if it is sound, else a one-line problem."""
        fid = _check_id(fid)
        path = self._blob_path(fid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError("not_found", f"blob {fid.hex()} is not stored here") from None
        try:
            hasher = hash_fd(fd)
        except OSError as e:
            return f"blob {fid.hex()}: unreadable ({e.strerror})"
        finally:
            os.close(fd)
        try:
            with open(path + ".blocks", "rb") as f:
                sidecar: bytes | None = f.read()
        except FileNotFoundError:
            sidecar = None
        return _problem(fid, hasher, sidecar)

    def partials(self) -> list[tuple[bytes, int, float]]:
        """(id, bytes so far, mtime) of every upload in progress or kept for resuming."""
        out = []
        with os.scandir(self._partial) as it:
            for e in it:
                if e.name.endswith(".part") and is_hex_id(e.name[:-5]):
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    out.append((bytes.fromhex(e.name[:-5]), st.st_size, st.st_mtime))
        return sorted(out)

    def drop_stale_partials(self, older_than_s: float, now: float) -> list[bytes]:
        """Delete partials not written for ``older_than_s`` before ``now`` (a wall-clock time),
        closing their sessions if any: their uploaders are gone. Returns the ids dropped."""
        cutoff = now - older_than_s
        dropped = []
        for fid, _size, mtime in self.partials():
            if mtime >= cutoff:
                continue
            with self._lock:
                session = self._sessions.get(fid)
            if session is None:
                if self._unlink_idle_partial(fid):
                    dropped.append(fid)
                continue
            with session.lock:
                if session.open and session.fd is not None and os.fstat(session.fd).st_mtime < cutoff:
                    self._end_session(session, keep=False)
                    dropped.append(fid)
        if dropped:
            log.info("dropped %d stale partial uploads", len(dropped))
        return dropped

    def capacity(self) -> dict[str, int]:
        """Disk and store sizes in bytes and counts, for the node's status reports."""
        st = os.statvfs(self.root)
        parts = self.partials()
        with self._lock:
            blobs, blob_bytes = self._blob_count, self._blob_bytes
        return {
            "total_bytes": st.f_blocks * st.f_frsize,
            "free_bytes": st.f_bavail * st.f_frsize,
            "reserve_bytes": self.reserve_bytes,
            "blob_bytes": blob_bytes,
            "blobs": blobs,
            "partials": len(parts),
            "partial_bytes": sum(size for _fid, size, _mtime in parts),
        }


def _no_upload(fid: bytes) -> StoreError:
    return StoreError("not_found", f"no upload of {fid.hex()} is in progress; call begin first")


def _chunks_of(fd: int, offset: int, end: int) -> Iterator[memoryview]:
    """The file's bytes from ``offset`` to ``end`` in one reused buffer (each chunk is consumed
    before the next is read)."""
    buf = memoryview(bytearray(IO_CHUNK))
    while offset < end:
        n = os.preadv(fd, [buf[:min(IO_CHUNK, end - offset)]], offset)
        if n == 0:
            return  # the file shrank since it was hashed: finish reports the size
        yield buf[:n]
        offset += n


def _problem(fid: bytes, hasher: BlockHasher, sidecar: bytes | None) -> str | None:
    """What ``verify`` reports for data hashed by ``hasher`` and the sidecar on disk."""
    got = hasher.block_hashes()
    name = f"blob {fid.hex()}"
    if hasher.digest() != fid:
        if sidecar is not None and len(sidecar) == len(got):
            block = _first_difference(got, sidecar)
            if block is not None:
                return (f"{name}: block {block} (bytes {block * BLOCK}-{min(hasher.size, (block + 1) * BLOCK)}) does "
                        "not match its hash; the data is corrupt")
        return f"{name}: its {hasher.size} bytes hash to {hasher.digest().hex()}; the data is corrupt or truncated"
    if sidecar is None:
        return f"{name}: the sidecar of block hashes is missing (the data is sound)"
    if sidecar != got:
        block = _first_difference(got, sidecar)
        return f"{name}: the sidecar differs from the data at block {block} (the data is sound)"
    return None


def _first_difference(a: bytes, b: bytes) -> int | None:
    for i in range(0, max(len(a), len(b)), HASH_SIZE):
        if a[i:i + HASH_SIZE] != b[i:i + HASH_SIZE]:
            return i // HASH_SIZE
    return None


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m storage.blobs id PATH...``: print ``<id>  <path>`` per file, like b3sum."""
    parser = argparse.ArgumentParser(prog="python -m storage.blobs", description="Blob store tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    ids = commands.add_parser("id", help="print the content id of each file ('-' for stdin)")
    ids.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            fid = _stdin_id() if path == "-" else file_id_of_path(path)
        except OSError as e:
            print(f"{parser.prog}: {path}: {e.strerror}", file=sys.stderr)
            status = 1
            continue
        print(f"{hex_id(fid)}  {path}")
    return status


def _stdin_id() -> bytes:
    hasher = BlockHasher()
    while chunk := sys.stdin.buffer.read(IO_CHUNK):
        hasher.update(chunk)
    return hasher.digest()


if __name__ == "__main__":
    sys.exit(main())
