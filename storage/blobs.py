"""The storage node's blob store: immutable, content-addressed files on local disk.

Theory of operation
-------------------
A file's id and its block hashes are computed as proto/fileids.py says (one BLAKE3 pass gives
both); the sidecar of each blob keeps the block hashes, to verify reads with. ``BlobStore`` is
the façade the node uses; it composes three parts and keeps the store's counts:

- storage/layout.py: the files on disk, the commit protocol (fsync, sidecar, rename: a reader
  sees the old file or the new one, never half), startup cleanup, ``verify`` for the scrub, and
  ``StoreError``;
- storage/openblobs.py: the open data files (an LRU with reference counts and an epoch) and the
  block-by-block verification of every read;
- storage/uploads.py: resumable upload sessions (begin/write/finish of a partial file).

``replace_from`` writes a fresh copy beside a bad one and renames it over (the repair).

Concurrency: the node's loop thread and its scrub thread share one store. Three kinds of lock,
always taken in this order: an upload session's lock (one writer per upload); a per-id "name"
lock stripe (the layout's), held by whatever creates, renames or unlinks that id's files; and the
store lock (the ``Tally``'s, shared by the parts), held only for dictionary and counter updates
and single metadata calls, never across data I/O, so reads never wait long on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Iterable, Iterator

from proto.fileids import BLOCK, IO_CHUNK, BlockHasher, file_id_of_path, hex_id
from storage.layout import NO_SPACE, BlobLayout, StoreError, Tally, check_id, pwrite_all, unlink_quietly
from storage.openblobs import OPEN_FILES, OpenBlobs
from storage.uploads import Uploads

__all__ = ["MAX_READ", "BlobStore", "StoreError", "main"]

log = logging.getLogger("cluster.storage")

MAX_READ = 64 << 20  # the most one read() returns: a node never buffers a whole large file


class BlobStore:
    """The blobs of one storage node under ``root``. Thread-safe; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], *, reserve_bytes: int = 64 << 20, fsync: bool = True,
                 open_files: int = OPEN_FILES) -> None:
        self._layout = BlobLayout(root, fsync=fsync)
        self.root = self._layout.root
        self._tally = Tally()
        self.counters = self._tally.counters
        self._lock = self._tally.lock
        self._open = OpenBlobs(self._layout, self._tally, open_files)
        self._uploads = Uploads(self._layout, self._tally, self._install, reserve_bytes=reserve_bytes)
        self._blob_count, self._blob_bytes = self._layout.recover()

    @property
    def fsync(self) -> bool:
        return self._layout.fsync

    @property
    def reserve_bytes(self) -> int:
        return self._uploads.reserve_bytes

    @property
    def open_files(self) -> int:
        return self._open.open_files

    def __enter__(self) -> "BlobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close cached fds and upload sessions; partials stay on disk for a later ``begin``."""
        self._uploads.close()
        self._open.close()

    # ---- reads -----------------------------------------------------------------------------------

    def has(self, fid: bytes) -> bool:
        """Whether the blob is stored here (committed, not an upload in progress)."""
        return os.path.isfile(self._layout.blob_path(check_id(fid)))

    def size(self, fid: bytes) -> int:
        """The stored blob's size in bytes; ``not_found`` if it is not stored here."""
        fid = check_id(fid)
        try:
            return os.stat(self._layout.blob_path(fid)).st_size
        except FileNotFoundError:
            raise StoreError("not_found", f"blob {fid.hex()} is not stored here; ask another replica") from None

    def read(self, fid: bytes, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``, verified block by block against the sidecar.

        Like pread: ``length`` is clipped at the end, and ``offset == size`` gives ``b""``. Raises
        not_found, out_of_range (offset past the end), too_large (more than ``MAX_READ`` bytes
        after clipping) or corrupt (a block differs from its hash: read another replica).
        """
        fid = check_id(fid)
        h = self._open.acquire(fid)
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
            data = self._open.read_verified(fid, h, first, start, stop)
        finally:
            self._open.release(h)
        with self._lock:
            self.counters["reads"] += 1
            self.counters["bytes_read"] += end - offset
        if start == offset and stop == end:
            return data  # block-aligned: the buffer read is the answer, no copy
        return data[offset - start:end - start]

    # ---- uploads (storage/uploads.py) ------------------------------------------------------------

    def begin(self, fid: bytes, size: int) -> int:
        """Start or resume the upload of blob ``fid`` of ``size`` bytes; returns the offset to send from.

        0 for a new upload; the length of the partial an earlier try left (in this process or a
        previous one: the prefix is rehashed); ``size`` when the blob is already stored (dedupe:
        send nothing, no ``finish``). Raises size_mismatch (a stored blob or open upload of this id
        has another size), too_large (more than this node's disk can ever hold) or no_space (not
        enough free space above ``reserve_bytes``, counting what open uploads still have to send).
        """
        return self._uploads.begin(check_id(fid), size)[0]

    def write(self, fid: bytes, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` at ``offset``, which must be the upload's current end; returns the new end.

        Raises not_found (no upload in progress: call ``begin``), bad_offset (send from the offset
        the message names), size_mismatch (past the size given to ``begin``) or no_space (the
        partial is deleted: nothing half-written stays; try another node).
        """
        return self._uploads.write(fid, offset, data)

    def finish(self, fid: bytes) -> None:
        """Check the upload's size and id and commit it: from now on ``read`` serves it.

        Raises size_mismatch (bytes missing: the upload stays open, send from the offset named),
        hash_mismatch (the content is not the id: the partial is deleted) or no_space.
        """
        self._uploads.finish(fid)

    def abort(self, fid: bytes, keep: bool = True) -> None:
        """End the upload of ``fid``: keep its partial for a later ``begin`` to resume, or delete it."""
        self._uploads.abort(fid, keep)

    def put_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Store ``data`` through begin/write/finish; returns its id."""
        return self._uploads.put_bytes(data)

    def put_path(self, path: str | os.PathLike[str]) -> bytes:
        """Store the file at ``path`` through begin/write/finish; returns its id.

        Two passes over the file: one for the id (so a stored blob is deduped without writing a
        byte), one to copy it. If the file changes in between, ``finish`` says hash_mismatch.
        """
        return self._uploads.put_path(path)

    def partials(self) -> list[tuple[bytes, int, float]]:
        """(id, bytes so far, mtime) of every upload in progress or kept for resuming."""
        return self._layout.partials()

    def drop_stale_partials(self, older_than_s: float, now: float) -> list[bytes]:
        """Delete partials not written for ``older_than_s`` before ``now`` (a wall-clock time),
        closing their sessions if any: their uploaders are gone. Returns the ids dropped."""
        return self._uploads.drop_stale_partials(older_than_s, now)

    # ---- commit, repair, deletion, listing -------------------------------------------------------

    def _install(self, fid: bytes, src: str, size: int, hashes: bytes) -> None:
        """Commit ``src`` (complete, fsynced) as blob ``fid`` and count it; the caller holds the
        id's name lock."""

        def committed(old: int | None) -> None:
            with self._lock:
                self._open.forget_locked(fid)
                self._blob_count += old is None
                self._blob_bytes += size - (old or 0)

        self._layout.commit(fid, src, hashes, committed)

    def replace_from(self, fid: bytes, chunks: Iterable[bytes | bytearray | memoryview], *,
                     size: int | None = None) -> None:
        """Write a fresh copy of blob ``fid`` from ``chunks`` (e.g. another replica's) and rename it over.

        The copy is checked against the id before it replaces anything, and readers see the old
        file or the new one, never half of one. Also installs a blob not stored before. Give
        ``size`` to check free space first. Raises hash_mismatch, size_mismatch or no_space.
        """
        fid = check_id(fid)
        if size is not None:
            self._uploads.check_space(size, size, None)
        tmp = self._layout.temp_path(fid)
        try:
            hasher = self._copy_in(fid, tmp, chunks, size)
            with self._layout.name_lock(fid):
                self._install(fid, tmp, hasher.size, hasher.block_hashes())
        except OSError as e:
            unlink_quietly(tmp)
            if e.errno in NO_SPACE:
                self._tally.count("no_space")
                raise StoreError("no_space", f"the disk filled while repairing {fid.hex()}") from e
            raise
        except BaseException:
            unlink_quietly(tmp)
            raise
        self._tally.count("repairs")
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
                pwrite_all(fd, view, hasher.size)
                hasher.update(view)
            if size is not None and hasher.size != size:
                raise StoreError("size_mismatch", f"the copy of {fid.hex()} has {hasher.size} of {size} bytes")
            digest = hasher.digest()
            if digest != fid:
                self._tally.count("hash_mismatches")
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
        fid = check_id(fid)
        with self._layout.name_lock(fid):
            try:
                os.utime(self._layout.blob_path(fid))
            except FileNotFoundError:
                return False
        return True

    def delete_if_older(self, fid: bytes, cutoff: float) -> bool:
        """Delete blob ``fid`` only if its mtime is still before ``cutoff`` (wall clock), checked
        under the lock ``touch`` takes: a dedupe that touched it since the collector looked
        keeps it. Returns whether it was deleted."""
        fid = check_id(fid)
        with self._layout.name_lock(fid):
            try:
                if os.stat(self._layout.blob_path(fid)).st_mtime >= cutoff:
                    return False
            except FileNotFoundError:
                return False
            return self._delete_locked(fid)

    def delete(self, fid: bytes) -> bool:
        """Delete blob ``fid``; returns whether it was stored. Readers already reading finish first."""
        fid = check_id(fid)
        with self._layout.name_lock(fid):
            return self._delete_locked(fid)

    def _delete_locked(self, fid: bytes) -> bool:
        size = self._layout.unlink(fid)
        with self._lock:
            self._open.forget_locked(fid)
            if size is not None:
                self._blob_count -= 1
                self._blob_bytes -= size
                self.counters["deleted"] += 1
        return size is not None

    def ids(self) -> Iterator[tuple[bytes, float]]:
        """(id, mtime) of every stored blob, by id; blobs added or deleted meanwhile may or may not appear."""
        return self._layout.ids()

    def verify(self, fid: bytes) -> str | None:
        """Rehash the whole blob for the scrub: None if it is sound, else a one-line problem."""
        return self._layout.verify(check_id(fid))

    def capacity(self) -> dict[str, int]:
        """Disk and store sizes in bytes and counts, for the node's status reports."""
        st = os.statvfs(self.root)
        parts = self._layout.partials()
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
