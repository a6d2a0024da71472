"""Uploads into the blob store: resumable sessions that fill a partial file and commit it.

Theory of operation
-------------------
``begin`` opens a session per id: the partial ``partial/<id>.part`` (storage/layout.py), its fd
and the hash of what it holds so far. A partial outlives its session: an upload that stops (an
``abort``, a closed store, a crash) keeps it, and a later ``begin`` of the same id resumes from
its end after rehashing it. ``write`` appends at exactly the session's end; ``finish`` checks
the size and the id, fsyncs the partial and hands it to the store's commit (the layout's commit
protocol), then ends the session.

Space: ``begin`` refuses an upload that does not fit the free space minus ``reserve_bytes``,
counting what the open sessions still have to send (promised); a full disk mid-write deletes the
partial, since it may then hold bytes its hash does not cover: nothing half-written stays.

Locks, in the store's order (storage/blobs.py): a session's lock (one writer per upload), then
the id's name lock, then the store lock (the ``Tally``'s), which guards the table of sessions.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Iterable, Iterator

from proto.fileids import IO_CHUNK, BlockHasher, file_id, hash_fd
from storage.layout import NO_SPACE, BlobLayout, StoreError, Tally, check_id, pwrite_all, unlink_quietly

log = logging.getLogger("cluster.storage")

Commit = Callable[[bytes, str, int, bytes], None]
"""commit(fid, path, size, block_hashes): install the complete, fsynced file at ``path`` as blob
``fid`` (the caller holds the id's name lock)."""


class Session:
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


class Uploads:
    """The upload sessions of one store; see the module docstring."""

    def __init__(self, layout: BlobLayout, tally: Tally, commit: Commit, *, reserve_bytes: int) -> None:
        self.reserve_bytes = reserve_bytes
        self._layout = layout
        self._tally = tally
        self._lock = tally.lock
        self._commit = commit
        self._sessions: dict[bytes, Session] = {}

    def close(self) -> None:
        """Close every session; their partials stay on disk for a later ``begin``."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            with session.lock:
                if session.open:
                    self._end_session(session, keep=True)

    def begin(self, fid: bytes, size: int) -> tuple[int, bool]:
        """The offset to send from, and whether the blob is stored already (no session opened)."""
        if size < 0:
            raise StoreError("size_mismatch", f"a blob's size is at least 0, not {size}")
        stored = self._layout.stored_size(fid)
        if stored is not None:
            if stored != size:
                raise StoreError("size_mismatch", f"blob {fid.hex()} is stored with {stored} bytes, not {size}: "
                                 "the id or the size sent is wrong")
            self._tally.count("dedupes")
            return size, True
        while True:
            with self._lock:
                session = self._sessions.get(fid)
                if session is None:
                    session = self._sessions[fid] = Session(fid, size)
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

    def _open_session(self, session: Session) -> None:
        """Open (creating or resuming) the partial of a new session; its lock is held."""
        fid, path = session.fid, self._layout.part_path(session.fid)
        with self._layout.name_lock(fid):
            try:
                have = os.stat(path).st_size
            except FileNotFoundError:
                have = 0
            if have > session.size:  # from an upload that declared another size: no use to this one
                log.info("partial %s has %d bytes, more than the %d now declared: starting over",
                         fid.hex(), have, session.size)
                os.unlink(path)
                have = 0
            self.check_space(session.size, session.size - have, session)
            session.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if have:
            os.utime(session.fd)  # resumed now: not a stale partial for drop_stale_partials
            # After a crash the tail may be garbage on some file systems (written size, unwritten
            # data): then the id will not match at finish, and the upload is discarded, not stored.
            session.hasher = hash_fd(session.fd, have)

    def check_space(self, size: int, need: int, session: Session | None) -> None:
        """Refuse a blob of ``size`` that needs ``need`` more bytes on disk: too_large or no_space."""
        st = os.statvfs(self._layout.root)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if size > total - self.reserve_bytes:
            raise StoreError("too_large", f"{size} bytes is more than this node's disk can ever hold "
                             f"({total} bytes, {self.reserve_bytes} kept in reserve); store it on a bigger node")
        with self._lock:
            promised = sum(s.size - s.end for s in self._sessions.values() if s is not session and s.fd is not None)
        if need > 0 and need > free - self.reserve_bytes - promised:
            self._tally.count("no_space")
            raise StoreError("no_space", f"{need} bytes do not fit: {free} free, {self.reserve_bytes} kept in "
                             f"reserve, {promised} promised to uploads in progress; try another node")

    def _session(self, fid: bytes) -> Session:
        fid = check_id(fid)
        with self._lock:
            session = self._sessions.get(fid)
        if session is None:
            raise _no_upload(fid)
        return session

    def write(self, fid: bytes, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` at ``offset``; see ``BlobStore.write``."""
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
                pwrite_all(session.fd, view, end)
            except OSError as e:
                # The partial may now hold bytes its hash does not cover: never resume from it.
                self._end_session(session, keep=False)
                if e.errno in NO_SPACE:
                    self._tally.count("no_space")
                    raise StoreError("no_space", f"the disk filled while writing {session.fid.hex()} at {end}; "
                                     "the partial is deleted, upload it to another node") from e
                raise
            session.hasher.update(view)
        with self._lock:
            self._tally.counters["writes"] += 1
            self._tally.counters["bytes_written"] += len(view)
        return end + len(view)

    def finish(self, fid: bytes) -> None:
        """Check the upload's size and id and commit it; see ``BlobStore.finish``."""
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
                self._tally.count("hash_mismatches")
                raise StoreError("hash_mismatch", f"the upload of {fid.hex()} hashes to {digest.hex()}: the content "
                                 "or the id is wrong; it is discarded, begin again from offset 0")
            try:
                if self._layout.fsync:
                    os.fsync(session.fd)
                os.fchmod(session.fd, 0o444)
                with self._layout.name_lock(fid):
                    self._commit(fid, self._layout.part_path(fid), session.size, session.hasher.block_hashes())
                    self._end_session(session, keep=True)
            except OSError as e:
                self._end_session(session, keep=False)
                if e.errno in NO_SPACE:
                    self._tally.count("no_space")
                    raise StoreError("no_space", f"the disk filled while committing {fid.hex()}; the upload is "
                                     "deleted, send it to another node") from e
                raise
        self._tally.count("finished")

    def abort(self, fid: bytes, keep: bool = True) -> None:
        """End the upload of ``fid``: keep its partial for a later ``begin`` to resume, or delete it."""
        fid = check_id(fid)
        with self._lock:
            session = self._sessions.get(fid)
        if session is not None:
            with session.lock:
                if session.open:
                    self._end_session(session, keep=keep)
                    return
        if not keep:
            self._unlink_idle_partial(fid)

    def _end_session(self, session: Session, *, keep: bool) -> None:
        """Close a session (its lock held) and forget it; delete its partial unless ``keep``."""
        with self._layout.name_lock(session.fid):
            session.open = False
            if session.fd is not None:
                os.close(session.fd)
                session.fd = None
            with self._lock:
                if self._sessions.get(session.fid) is session:
                    del self._sessions[session.fid]
            if not keep:
                unlink_quietly(self._layout.part_path(session.fid))

    def _unlink_idle_partial(self, fid: bytes) -> bool:
        with self._layout.name_lock(fid):
            with self._lock:
                session = self._sessions.get(fid)
                if session is not None and session.fd is not None:
                    return False  # an upload resumed it meanwhile
            return unlink_quietly(self._layout.part_path(fid))

    def drop_stale_partials(self, older_than_s: float, now: float) -> list[bytes]:
        """Delete partials not written for ``older_than_s`` before ``now`` (a wall-clock time),
        closing their sessions if any: their uploaders are gone. Returns the ids dropped."""
        cutoff = now - older_than_s
        dropped = []
        for fid, _size, mtime in self._layout.partials():
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

    # ---- whole files through a session -----------------------------------------------------------

    def put_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Store ``data`` through begin/write/finish; returns its id."""
        view = memoryview(data).cast("B")
        return self._put(file_id(view), len(view), lambda offset: [view[offset:]])

    def put_path(self, path: str | os.PathLike[str]) -> bytes:
        """Store the file at ``path`` through begin/write/finish (two passes); returns its id."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            hasher = hash_fd(fd)
            return self._put(hasher.digest(), hasher.size, lambda offset: _chunks_of(fd, offset, hasher.size))
        finally:
            os.close(fd)

    def _put(self, fid: bytes, size: int, chunks_from: Callable[[int], Iterable[memoryview]]) -> bytes:
        offset, deduped = self.begin(fid, size)
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
