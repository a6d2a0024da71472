"""The blob store on disk: its layout, the commit protocol, verification, and the store's errors.

Theory of operation
-------------------
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
A delete unlinks the data first and the sidecar after, for the same reason.

``verify`` rehashes a whole blob against its id and its sidecar, for the scrub.

Whatever creates, renames or unlinks an id's files holds that id's name lock (one of a fixed set
of stripes). This module keeps no tables: the store's counts, open files and upload sessions
belong to storage/blobs.py, storage/openblobs.py and storage/uploads.py, which share one store
lock, the ``Tally``'s.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Callable, Iterator

from proto.fileids import BLOCK, HASH_SIZE, BlockHasher, hash_fd, is_hex_id

log = logging.getLogger("cluster.storage")

ERROR_CODES = frozenset(
    {"not_found", "out_of_range", "corrupt", "no_space", "bad_offset", "size_mismatch", "hash_mismatch",
     "too_large", "bad_id"}
)
COUNTERS = ("reads", "bytes_read", "corrupt_reads", "writes", "bytes_written", "finished", "dedupes",
            "hash_mismatches", "no_space", "repairs", "deleted")
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_STRIPES = 64


class StoreError(Exception):
    """A request the store refused; ``code`` is one of ``ERROR_CODES`` and stable for peers."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown StoreError code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def check_id(fid: bytes) -> bytes:
    """``fid`` as bytes if it is a file id, else bad_id."""
    if not isinstance(fid, (bytes, bytearray, memoryview)) or len(fid) != HASH_SIZE:
        raise StoreError("bad_id", f"a file id is {HASH_SIZE} bytes, got {fid!r:.60}; ids come from file_id()")
    return bytes(fid)


class Tally:
    """The store lock and the counters (``COUNTERS``) it guards, shared by the store's parts.

    The parts guard their own tables (open files, upload sessions) with the same lock, so the
    store keeps one lock order (storage/blobs.py). It is held only for dictionary and counter
    updates and single metadata calls, never across data I/O.
    """

    __slots__ = ("lock", "counters")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n


# ---- small file-system helpers -------------------------------------------------------------------


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def pread_all(fd: int, length: int, offset: int) -> bytes:
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


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# ---- the layout ----------------------------------------------------------------------------------


class BlobLayout:
    """The files of a blob store under ``root``: names, name locks, commit, delete, listing, verify."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._blobs = str(self.root / "blobs")
        self._partial = str(self.root / "partial")
        self._names = [threading.RLock() for _ in range(_STRIPES)]
        os.makedirs(self._blobs, exist_ok=True)
        os.makedirs(self._partial, exist_ok=True)

    def blob_path(self, fid: bytes) -> str:
        h = fid.hex()
        return os.path.join(self._blobs, h[:2], h)

    def part_path(self, fid: bytes) -> str:
        return os.path.join(self._partial, fid.hex() + ".part")

    def temp_path(self, fid: bytes) -> str:
        """A fresh name for a copy being written (a repair); startup deletes it if left."""
        return os.path.join(self._partial, f"{fid.hex()}.{secrets.token_hex(4)}.tmp")

    def name_lock(self, fid: bytes) -> threading.RLock:
        return self._names[fid[0] % _STRIPES]

    def stored_size(self, fid: bytes) -> int | None:
        try:
            return os.stat(self.blob_path(fid)).st_size
        except FileNotFoundError:
            return None

    def recover(self) -> tuple[int, int]:
        """Delete what a crash left half-done (temp files, sidecars without data); returns the
        number of blobs and their bytes."""
        removed = orphans = count = nbytes = 0
        with os.scandir(self._blobs) as top:
            dirs = [e.path for e in top if e.is_dir()]
        for d in dirs:
            with os.scandir(d) as it:
                entries = list(it)
            names = {e.name for e in entries}
            for e in entries:
                if e.name.endswith(".tmp"):
                    removed += unlink_quietly(e.path)
                elif e.name.endswith(".blocks") and e.name[:-7] not in names:
                    orphans += unlink_quietly(e.path)
                elif is_hex_id(e.name):
                    count += 1
                    nbytes += e.stat().st_size
                    if e.name + ".blocks" not in names:
                        log.warning("blob %s has no sidecar: its reads fail until repaired", e.name)
        with os.scandir(self._partial) as it:
            for e in it:
                if e.name.endswith(".tmp"):
                    removed += unlink_quietly(e.path)
        if removed or orphans:
            log.info("blob store %s: removed %d temp files and %d orphan sidecars left by a crash",
                     self.root, removed, orphans)
        return count, nbytes

    def commit(self, fid: bytes, src: str, hashes: bytes, committed: Callable[[int | None], None]) -> None:
        """Commit ``src`` (complete, fsynced) as blob ``fid``: sidecar first, then the data rename.

        ``committed(old_size)`` runs right after the rename (``old_size`` None when the blob is
        new), before the directory's fsync: the store drops its fds of the old file there. The
        caller holds the id's name lock, so nothing else renames or unlinks these names.
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
                fsync_dir(self._blobs)
        self._write_sidecar(dest + ".blocks", hashes)
        if self.fsync:
            fsync_dir(d)  # the sidecar is durable before the data it describes can appear
        old = self.stored_size(fid)
        os.rename(src, dest)  # the commit point
        committed(old)
        if self.fsync:
            fsync_dir(d)

    def _write_sidecar(self, path: str, hashes: bytes) -> None:
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                pwrite_all(fd, memoryview(hashes), 0)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            unlink_quietly(tmp)
            raise

    def unlink(self, fid: bytes) -> int | None:
        """Delete blob ``fid``'s files (name lock held); returns its size, None if it was not stored."""
        dest = self.blob_path(fid)
        size = self.stored_size(fid)
        if size is not None:
            unlink_quietly(dest)
        # The sidecar after the data: a crash between leaves an orphan sidecar, which startup removes.
        unlink_quietly(dest + ".blocks")
        return size

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

    def verify(self, fid: bytes) -> str | None:
        """Rehash the whole blob for the scrub: None if it is sound, else a one-line problem."""
        path = self.blob_path(fid)
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
