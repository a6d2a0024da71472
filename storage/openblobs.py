"""The blob store's open data files and the verification of what is read from them.

Theory of operation
-------------------
Reads verify: every block a read touches is hashed and compared with the blob's sidecar
(storage/layout.py), so a flipped bit on disk is reported (``corrupt``) instead of served.

Open data files are cached, an LRU of ``open_files`` handles, each with its size, its sidecar's
block hashes and a reference count, so an fd evicted or dropped by a delete is closed only when
its last reader is done with it: a number is never reused under a reader's feet. A delete or
replace bumps an epoch after its unlink or rename (``forget_locked``); a reader whose open()
overlapped one uses its fd once and does not cache it, since it may belong to the old file.
The table and the epoch are guarded by the store lock (the ``Tally``'s), never held across an
open() or a read.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict

import blake3

from proto.fileids import BLOCK, HASH_SIZE
from storage.layout import BlobLayout, StoreError, Tally, pread_all

OPEN_FILES = 64


class Handle:
    """An open blob shared by readers: its fd, size and block hashes, reference counted."""

    __slots__ = ("fd", "size", "hashes", "refs", "cached")

    def __init__(self, fd: int, size: int, hashes: bytes) -> None:
        self.fd, self.size, self.hashes = fd, size, hashes
        self.refs = 0
        self.cached = False


class OpenBlobs:
    """The open data files of a store's blobs, shared by its readers; see the module docstring."""

    def __init__(self, layout: BlobLayout, tally: Tally, open_files: int = OPEN_FILES) -> None:
        self.open_files = open_files
        self._layout = layout
        self._tally = tally
        self._lock = tally.lock
        self._handles: OrderedDict[bytes, Handle] = OrderedDict()
        self._epoch = 0  # bumped whenever a blob's file is unlinked or replaced; see acquire

    def acquire(self, fid: bytes) -> Handle:
        """A referenced handle on the blob; pair with ``release``. Raises not_found or corrupt."""
        with self._lock:
            h = self._handles.get(fid)
            if h is not None:
                self._handles.move_to_end(fid)
                h.refs += 1
                return h
            epoch = self._epoch
        fresh = self._open(fid)  # outside the lock: open() may wait on the disk
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

    def release(self, h: Handle) -> None:
        with self._lock:
            h.refs -= 1
            if h.refs == 0 and not h.cached:
                os.close(h.fd)

    def forget_locked(self, fid: bytes) -> None:
        """Blob ``fid``'s file was just unlinked or replaced (store lock held): bump the epoch and
        drop its cached handle."""
        self._epoch += 1
        self._uncache(fid)

    def close(self) -> None:
        """Drop every cached handle; fds still being read close when their readers are done."""
        with self._lock:
            while self._handles:
                self._uncache(next(iter(self._handles)))

    def read_verified(self, fid: bytes, h: Handle, first: int, start: int, stop: int) -> bytes:
        """Bytes ``start`` to ``stop`` (block ``first`` on, whole blocks) of the blob, each block
        checked against its hash; corrupt if one differs or the disk fails."""
        try:
            data = pread_all(h.fd, stop - start, start)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            self._tally.count("corrupt_reads")
            raise StoreError("corrupt", f"blob {fid.hex()}: the disk failed to read bytes {start}-{stop} (EIO); "
                             "read another replica and repair this one") from e
        if len(data) != stop - start:  # shorter than fstat said when opened: truncated under us
            self._tally.count("corrupt_reads")
            raise StoreError("corrupt", f"blob {fid.hex()} ends at byte {start + len(data)}, before its size "
                             f"{h.size}; read another replica and repair this one")
        view = memoryview(data)
        for i, pos in enumerate(range(0, stop - start, BLOCK)):
            block = first + i
            got = blake3.blake3(view[pos:pos + BLOCK]).digest(HASH_SIZE)
            if got != h.hashes[block * HASH_SIZE:(block + 1) * HASH_SIZE]:
                self._tally.count("corrupt_reads")
                raise StoreError("corrupt", f"blob {fid.hex()} block {block} (bytes {block * BLOCK}-"
                                 f"{min(h.size, (block + 1) * BLOCK)}) does not match its hash; read another "
                                 "replica and repair this one")
        return data

    def _open(self, fid: bytes) -> Handle:
        path = self._layout.blob_path(fid)
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
            return Handle(fd, size, hashes)
        raise StoreError("not_found", f"blob {fid.hex()} is not stored here; ask another replica")

    def _uncache(self, fid: bytes) -> None:
        """Drop a cached handle (store lock held); its fd closes when its last reader is done."""
        h = self._handles.pop(fid, None)
        if h is not None:
            h.cached = False
            if h.refs == 0:
                os.close(h.fd)
