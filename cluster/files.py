"""Uploads and downloads for users: the client side of the storage tier.

An upload hashes the file first (its content id names it everywhere, and a file the cluster
has already is stored instantly), sends it to the storage node ranked first for that id
(rendezvous hashing: the node that fans the copies out), and registers it with the masters
only once the node says every copy is durable. A failed node is skipped for the next in rank;
a node that comes back resumes its partial copy where it stopped.

A download asks the masters where the file lives, streams it from the first replica with a
window of range reads, fails over to the next replica on an error, and checks the content id
of what it wrote before renaming it into place: a corrupt or half file is never left behind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from cluster.node.masterlink import ClusterError, MasterLink, NotFound
from cluster.node.storagelink import LinkPool, StorageLink, TransferError, upload_ranked
from proto.fileids import HASH_SIZE, file_id_of_path, parse_id, rank

log = logging.getLogger("cluster.client")


@dataclass(frozen=True)
class FileRef:
    """A stored, registered file: its content id (hex), size, replicas and name."""

    id: str
    size: int
    replicas: list[str]
    name: str = ""

    def __str__(self) -> str:
        return self.id  # an f-string or a command line gets the id, as `cluster upload` prints it


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
                  progress: Callable[[int], None] | None) -> int:
    """Fetch file ``fid`` into ``path`` from a replica among ``storage`` (failing over), verified
    by its content id before it is renamed into place; returns its size."""
    answer = masters.lookup_files([fid])
    record = answer.value.get(fid.hex())
    if record is None and not answer.stale:
        raise NotFound(f"no file {fid.hex()} is registered; `cluster files` lists what is")
    # A stale answer (a follower's) may not know a file registered a moment ago: the replicas
    # only say where to look first, and what arrives is checked against the id anyway.
    sources = [n for n in (record or {}).get("replicas", []) if n in storage]
    sources += [n for n in rank(fid, list(storage)) if n not in sources]
    path = Path(path)
    part = path.with_name(path.name + ".part")
    errors: dict[str, str] = {}
    for node in sources:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        got = [0]

        def write_at(offset: int, data: Any) -> None:
            os.pwrite(fd, data, offset)
            got[0] += len(data)
            if progress:
                progress(len(data))

        try:
            with StorageLink(storage[node], name=node, timeout=masters.attempt_timeout * 10,
                             credentials=masters.credentials) as link:
                size = link.download(fid, write_at)
            os.fsync(fd)
        except TransferError as exc:
            errors[node] = str(exc)
            if progress and got[0]:
                progress(-got[0])
            continue
        finally:
            os.close(fd)
        if file_id_of_path(part) != fid:
            errors[node] = "the bytes it sent do not match the file id"
            continue
        os.replace(part, path)
        return size
    part.unlink(missing_ok=True)
    said = "; ".join(f"{n}: {e}" for n, e in errors.items())
    raise ClusterError(f"could not download {fid.hex()} from any replica ({said})")
