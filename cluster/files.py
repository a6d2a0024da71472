"""Uploads and downloads for users: the client side of the storage tier.

An upload hashes the file first (its content id names it everywhere, and a file the cluster
has already is stored instantly), sends it to the storage node ranked first for that id
(rendezvous hashing: the node that fans the copies out), and registers it with the masters
only once the node says every copy is durable. A failed node is skipped for the next in rank;
a node that comes back resumes its partial copy where it stopped.

A download asks the masters where the file lives and streams it from the first replica with a
window of range reads. A replica that fails or stays silent for READ_SILENCE_S is left for the
next, which serves only the chunks still missing (the file is immutable: every replica has the
same bytes; ``cluster.readplan`` decides). The content id of what was written is checked before
it is renamed into place: a corrupt or half file is never left behind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from cluster.node.masterlink import ClusterError, MasterLink, NotFound
from cluster.node.storagelink import CHUNK, LinkPool, StorageLink, TransferError, upload_ranked
from cluster.readplan import ReadPlan
from proto.fileids import HASH_SIZE, file_id_of_path, parse_id, rank

log = logging.getLogger("cluster.client")

# How long a replica serving a download may stay silent before the read moves to the next one.
# Measured on the rack (2 cores, CURVE, each link through a user-space proxy) with 3 CPU burners,
# 3 uploaders of 128 MiB files and a second download at once: the longest gap between two chunks
# was ~0.2 s and the first chunk (connect, size, read) came within ~0.55 s. The workers' mount
# uses the same figure (worker/view.py).
READ_SILENCE_S = 2.0


@dataclass(frozen=True)
class FileRef:
    """A stored, registered file: its content id (hex), size, replicas and name."""

    id: str
    size: int
    replicas: list[str]
    name: str = ""

    def __str__(self) -> str:
        return self.id  # an f-string or a command line gets the id, as `cluster upload` prints it


class DownloadFailed(ClusterError):
    """A download that no replica could serve; nothing was left at the path. ``status`` is the
    ``proto.errors.StorageStatus`` every replica failed with (``NOT_FOUND``: no node holds the
    file; None when they differ or a node did not answer), ``retryable``: a replica may serve it
    later (it was silent, unreachable or failed a block), ``failures``: each node's status."""

    def __init__(self, text: str, status: int | None, retryable: bool, failures: dict[str, int | None]) -> None:
        super().__init__(text)
        self.status = status
        self.retryable = retryable
        self.failures = failures


class UploadFailed(ClusterError):
    """An upload that did not make its copies durable: nothing was registered. ``status`` is the
    ``proto.errors.StorageStatus`` a node refused it with (None: no node answered, or too few
    copies could be made); ``retryable``: worth trying again once the storage nodes are back
    (the nodes resume their partial copies), not when the file itself was refused."""

    def __init__(self, text: str, status: int | None, retryable: bool) -> None:
        super().__init__(text)
        self.status = status
        self.retryable = retryable


def file_id_text(ref: FileRef | str | bytes, what: str = "file") -> str:
    """The hex id of a file given as a ``FileRef`` (what ``upload`` returns), its id as 32 hex
    digits, or 16 bytes: what every API that takes a file id accepts. ClusterError for
    anything else, naming ``what`` (e.g. "input 'reads'")."""
    if isinstance(ref, FileRef):
        ref = ref.id
    if isinstance(ref, (bytes, bytearray)) and len(ref) == HASH_SIZE:
        return bytes(ref).hex()
    if isinstance(ref, str):
        try:
            return parse_id(ref.strip()).hex()
        except ValueError:
            pass
    raise ClusterError(f"{what}: {ref!r} is not a file id (a FileRef, or {2 * HASH_SIZE} hex digits as "
                       "`cluster upload` prints)")


def upload_file(masters: MasterLink, storage: dict[str, str], path: str | os.PathLike[str], *, owner: str | None,
                name: str | None, copies: int, progress: Callable[[int], None] | None) -> FileRef:
    """Store the file at ``path`` on ``copies`` of the ``storage`` nodes (name → address), then
    register it with the masters, owned by job ``owner`` or pinned by the user."""
    if not storage:
        raise ClusterError("no storage nodes configured: give Client(storage={name: address}) or use the cluster config")
    path = Path(path)
    try:
        size = path.stat().st_size
        fid = file_id_of_path(path)
    except OSError as exc:
        raise ClusterError(f"cannot read {path}: {exc.strerror}") from None
    if copies > len(storage):
        raise ClusterError(f"{copies} copies asked for but only {len(storage)} storage nodes are configured")
    name = path.name if name is None else name
    fd = os.open(path, os.O_RDONLY)
    links = LinkPool(storage, timeout=masters.attempt_timeout * 10, credentials=masters.credentials)
    try:
        replicas = upload_ranked(links, fid, size, lambda offset, n: os.pread(fd, n, offset), copies=copies,
                                 origin="client", progress=progress)
    except TransferError as exc:
        if exc.status is not None and not exc.retryable:
            raise UploadFailed(f"upload of {path} refused: {exc}", exc.status, False) from None
        raise UploadFailed(f"upload of {path} failed: {exc}; nothing was registered. "
                           "Check `cluster status` and retry: the storage nodes resume partial uploads.",
                           exc.status, True) from None
    finally:
        links.close()
        os.close(fd)
    masters.register_file(fid, size, replicas, owner=owner, name=name, pin=owner is None)
    return FileRef(fid.hex(), size, sorted(replicas), name)


def download_file(masters: MasterLink, storage: dict[str, str], fid: bytes, path: str | os.PathLike[str], *,
                  progress: Callable[[int], None] | None, silence: float = READ_SILENCE_S) -> int:
    """Fetch file ``fid`` into ``path`` from the replicas among ``storage``, verified by its
    content id before it is renamed into place; returns its size. A replica silent for
    ``silence`` seconds is left for the next, which serves only what is still missing
    (``cluster.readplan``). ``progress`` gets the bytes of each chunk, and minus what was
    forgotten if the whole did not match its id. DownloadFailed when no replica could serve
    it; no partial file is left behind."""
    answer = masters.lookup_files([fid])
    record = answer.value.get(fid.hex())
    if record is None and not answer.stale:
        raise NotFound(f"no file {fid.hex()} is registered; `cluster files` lists what is")
    # A stale answer (a follower's) may not know a file registered a moment ago: the replicas
    # only say where to look first, and what arrives is checked against the id anyway. The
    # listed ones go in rendezvous order, so readers of a file agree on a first choice and
    # different files spread over the nodes (as the workers' mounts read).
    listed = rank(fid, [n for n in (record or {}).get("replicas", []) if n in storage])
    plan = ReadPlan(listed + [n for n in rank(fid, list(storage)) if n not in listed], CHUNK,
                    size=(record or {}).get("size"))
    path = Path(path)
    part = path.with_name(path.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    kept = False
    try:
        while True:
            if not plan.complete:  # (an empty file the ledger knows is complete at once)
                node = plan.next_source()
                if node is None:
                    break
                _stream(plan, node, storage[node], fid, fd, silence, masters.credentials, progress)
                continue
            os.fsync(fd)
            if file_id_of_path(part) == fid:
                os.replace(part, path)
                kept = True
                return plan.size
            forgotten = plan.rejected()
            if progress and forgotten:
                progress(-forgotten)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
        if not kept:
            part.unlink(missing_ok=True)
    status, retryable = plan.outcome()
    said = "; ".join(f"{n}: {f.text}" for n, f in plan.failures.items()) or "no storage nodes are configured"
    raise DownloadFailed(f"could not download {fid.hex()} from any replica ({said})", status, retryable,
                         {n: f.status for n, f in plan.failures.items()})


def _stream(plan: ReadPlan, node: str, address: str, fid: bytes, fd: int, silence: float,
            credentials: Any, progress: Callable[[int], None] | None) -> None:
    """Stream what ``plan`` still misses from ``node`` into ``fd`` until it is all there or the
    node fails (recorded in the plan)."""
    def write_at(offset: int, data: Any) -> None:
        os.pwrite(fd, data, offset)
        plan.received(node, offset, len(data))
        if progress:
            progress(len(data))

    try:
        with StorageLink(address, name=node, timeout=silence, credentials=credentials) as link:
            if plan.sized(node, link.size(fid)):
                link.download(fid, write_at, have=plan.have)
    except TransferError as exc:
        plan.failed(node, str(exc), exc.status)
        log.warning("download of %s from %s failed with %d of %s bytes kept (%s); trying the next replica",
                    fid.hex(), node, plan.held, plan.size, exc)
