"""The storage node's core: the transfer protocol as a state machine (sans-I/O).

Theory of operation
-------------------
Uploads follow the zguide's credit-based file transfer. UPLOAD_OPEN names the file by the content
id the sender computed, its size and how many copies must be durable. The core asks the disk to
begin (``BeginUpload``): the answer is where to resume (0, the length of a partial upload left by
an earlier try, or "stored already": dedupe, answered at once). UPLOAD_READY then grants
``window`` bytes of credit; every chunk must continue exactly where the upload stands, fit the
credit, the chunk limit and the announced size, or the upload ends with UPLOAD_DONE saying why
(the partial is kept for a resume unless the bytes themselves were bad). As chunks are written
the core grants more credit, so at most ``window`` bytes are ever in flight towards this node.
The last chunk makes the disk hash, fsync and rename (``FinishUpload``); with ``copies`` > 1 the
core then asks for ``Replicate`` to the peers ranked first for this id by rendezvous hashing
(the same order everywhere, so repairs and readers agree where a file should be), and answers
UPLOAD_DONE with the replicas only once ``copies`` of them are durable (meanwhile a zero
UPLOAD_CREDIT each second tells the sender the node is alive and working). The sender registers
the file with the masters after that, never before.

Reads (FILE_REQUEST) become ``ReadRange``; the disk verifies every block it reads and the answer
(bytes or a status) goes back as FILE_RESPONSE, the bytes as a raw frame.

Disk work happens in the node's performers, which answer with ``DiskDone`` at once; replication
runs on a thread and answers with ``Replicated`` later. The core has no sockets, clock, threads
or disk: tests drive it with events.
"""

from __future__ import annotations

import enum
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.node.events import (
    PEOPLE,
    Effect,
    Event,
    Forbidden,
    Log,
    MessageReceived,
    Refuse,
    Send,
    Started,
    StartTimer,
    TimerFired,
    authorise,
)
from proto.errors import StorageStatus
from storage.readers import LookupReaders, ReadersKnown, ReadGate
from proto.fileids import rank
from proto.ids import join128, split128
from proto.messages import FileChunk, FileRequest, FileResponse, UploadCredit, UploadDone, UploadOpen, UploadReady

API = "api"
MiB = 1 << 20

# StoreError codes (storage.blobs) as wire statuses
STATUS_OF = {
    "not_found": StorageStatus.NOT_FOUND,
    "out_of_range": StorageStatus.OUT_OF_RANGE,
    "corrupt": StorageStatus.CORRUPT,
    "no_space": StorageStatus.NO_SPACE,
    "too_large": StorageStatus.TOO_LARGE,
    "bad_offset": StorageStatus.BAD_OFFSET,
    "size_mismatch": StorageStatus.SIZE_MISMATCH,
    "hash_mismatch": StorageStatus.HASH_MISMATCH,
    "bad_id": StorageStatus.BAD_REQUEST,
    "io_error": StorageStatus.IO_ERROR,
}


# ---- effects (performed by storage.node) and their answers ---------------------------------


@dataclass(frozen=True, slots=True)
class BeginUpload:
    token: int
    file_id: bytes
    size: int


@dataclass(frozen=True, slots=True)
class WriteChunk:
    token: int
    file_id: bytes
    offset: int
    data: Any


@dataclass(frozen=True, slots=True)
class FinishUpload:
    token: int
    file_id: bytes


@dataclass(frozen=True, slots=True)
class AbortUpload:
    file_id: bytes
    keep: bool  # keep the partial for a resume


@dataclass(frozen=True, slots=True)
class ReadRange:
    token: int
    file_id: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Replicate:
    """Push a stored file to ``needed`` of ``targets`` (storage node names, best first)."""

    token: int
    file_id: bytes
    size: int
    targets: tuple[str, ...]
    needed: int


@dataclass(frozen=True, slots=True)
class DiskDone:
    """A disk operation's outcome: ``value`` (resume offset, end, file size), ``data`` (bytes
    read; for a begin, True when the file is stored already), or ``error`` (code, text)."""

    token: int
    value: int = 0
    data: Any = None
    error: tuple[str, str] | None = None
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class Replicated:
    token: int
    stored: tuple[str, ...]
    failed: dict[str, str]
    stimulus_id: str = ""


@dataclass(frozen=True)
class StorageSettings:
    """What a node accepts; the defaults suit a rack (see doc/storage.md)."""

    window: int = 16 * MiB  # upload credit: bytes in flight towards this node per upload
    chunk_max: int = 4 * MiB  # largest FILE_CHUNK payload
    # largest FILE_REQUEST length: a worker's fetch asks for at most 8 MiB (worker/fetch.py
    # MAX_FETCH). With the socket's send high-water mark (storage.node) it bounds what a reader
    # that never reads its answers makes this node hold: SEND_QUEUE x read_max per connection.
    read_max: int = 8 * MiB
    idle_timeout: float = 30.0  # an upload with no chunk for this long is closed (partial kept)
    max_uploads: int = 256
    # what one key's open uploads may still promise to send, in all: an UPLOAD_OPEN announcing
    # more would hold the disk's free space for nothing (the space check counts promises)
    reserve_per_key: int = 64 * 1024 * MiB


class UploadState(enum.Enum):
    """Where an upload is: ``OPENING`` (its partial file is being opened or resumed), ``OPEN``
    (chunks flow within the credit), ``FINISHING`` (all bytes in, the blob being committed),
    ``REPLICATING`` (durable here, copies being made on the peers ranked next)."""

    OPENING = "opening"
    OPEN = "open"
    FINISHING = "finishing"
    REPLICATING = "replicating"


# The only moves an upload makes; anything else is a bug in this core (LocalProtocolError, as
# h11 would say), not a peer's fault: peers' mistakes are refused before they reach a transition.
UPLOAD_TRANSITIONS: dict[UploadState, frozenset[UploadState]] = {
    UploadState.OPENING: frozenset({UploadState.OPEN, UploadState.REPLICATING}),  # a dedupe skips the bytes
    UploadState.OPEN: frozenset({UploadState.FINISHING}),
    UploadState.FINISHING: frozenset({UploadState.REPLICATING}),
    UploadState.REPLICATING: frozenset(),
}


@dataclass
class Upload:
    upload_id: int
    file_id: bytes
    size: int
    copies: int
    route: bytes | None
    request_id: int
    origin: str
    received: int = 0  # bytes accepted (written or being written)
    granted: int = 0  # the sender may send up to this offset
    state: UploadState = UploadState.OPENING
    holder: str = ""  # the sender's key's name: its promises count against its reserve

    def move(self, to: UploadState) -> None:
        """Take the next step of ``UPLOAD_TRANSITIONS``; any other is a local bug."""
        if to not in UPLOAD_TRANSITIONS[self.state]:
            raise AssertionError(f"upload {self.upload_id}: no transition from {self.state.value} to {to.value}")
        self.state = to
    last_seen: float = 0.0
    finish: bool = False


@dataclass
class StorageCore:
    """One storage node's protocol state. ``peers``: the other storage nodes' names."""

    name: str
    peers: list[str]
    settings: StorageSettings = field(default_factory=StorageSettings)
    capacity: Callable[[], dict[str, Any]] = dict
    upkeep: Callable[[], dict[str, Any]] = dict  # the scrub/repair/collector's figures
    role: str = "storage"

    def __post_init__(self) -> None:
        self.uploads: dict[int, Upload] = {}
        self.by_file: dict[bytes, int] = {}
        self.pending: dict[int, tuple[str, Any]] = {}  # disk/replication token → what it was for
        self.counters: dict[str, int] = {}
        self.gate = ReadGate()  # which client keys may read which files (storage.readers)
        self._ids = itertools.count(1)

    # ---- events in ---------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, MessageReceived):
            handler = _HANDLERS.get(type(event.message))
            if handler is None:
                return [Refuse(event.socket, event.route, event.message.code, getattr(event.message, "request_id", 0),
                               f"a storage node does not take {type(event.message).__name__} messages", event.stimulus_id)]
            forbidden = authorise(event, STORE_AND_READ)
            if forbidden:
                return forbidden
            return handler(self, event, event.message, now)
        if isinstance(event, DiskDone):
            return self._on_disk(event, now)
        if isinstance(event, Replicated):
            return self._on_replicated(event)
        if isinstance(event, ReadersKnown):
            return self._on_readers(event, now)
        if isinstance(event, TimerFired) and event.name == "expire":
            return self._expire(now, event.stimulus_id) + [StartTimer("expire", 1.0, event.stimulus_id)]
        if isinstance(event, Started):
            return [StartTimer("expire", 1.0, event.stimulus_id)]
        return []

    # ---- uploads -----------------------------------------------------------------------------

    def _on_open(self, ev: MessageReceived, m: UploadOpen, now: float) -> list[Effect]:
        file_id = join128(m.file_id_upper, m.file_id_lower)
        fail = self._open_problem(m) or self._over_reserve(ev.peer.name, m.size)
        if fail is not None:
            self._count("uploads_refused")
            return [self._done_to(ev.route, m.request_id, 0, file_id, m.size, fail[0], fail[1], ev.stimulus_id)]
        out: list[Effect] = []
        old = self.by_file.get(file_id)
        if old is not None and self.uploads[old].size != m.size:
            self._count("uploads_refused")
            return [self._done_to(ev.route, m.request_id, 0, file_id, m.size, StorageStatus.SIZE_MISMATCH,
                                  f"file {file_id.hex()} is being uploaded with {self.uploads[old].size} bytes, not "
                                  f"{m.size}: the id or the size sent is wrong", ev.stimulus_id)]
        if old is not None:
            # The same file again: its sender reconnected to resume, or a second sender raced
            # the first. The newest wins (a dead sender cannot hold a file hostage); the older
            # one's next chunk is answered UNKNOWN_UPLOAD.
            previous = self.uploads.pop(old)
            if previous.state in (UploadState.FINISHING, UploadState.REPLICATING):
                self.uploads[old] = previous  # nearly done: let it end; the newcomer retries
                return [self._done_to(ev.route, m.request_id, 0, file_id, m.size, StorageStatus.UNKNOWN_UPLOAD,
                                      "this file is being stored by another upload right now; retry in a moment", ev.stimulus_id)]
            self._count("uploads_superseded")
            out.append(Log(logging.INFO, f"upload {previous.upload_id} of {file_id.hex()} superseded by one from {m.origin or 'a peer'}", ev.stimulus_id))
        upload = Upload(next(self._ids), file_id, m.size, m.copies, ev.route, m.request_id, m.origin, last_seen=now,
                        holder=ev.peer.name)
        self.uploads[upload.upload_id] = upload
        self.by_file[file_id] = upload.upload_id
        token = next(self._ids)
        self.pending[token] = ("begin", upload.upload_id)
        self._count("uploads_opened")
        return out + [BeginUpload(token, file_id, m.size)]

    def _open_problem(self, m: UploadOpen) -> tuple[int, str] | None:
        if m.copies < 1:
            return StorageStatus.BAD_REQUEST, "copies must be at least 1"
        if m.copies > 1 + len(self.peers):
            return StorageStatus.BAD_REQUEST, (
                f"{m.copies} copies asked for, but there are only {1 + len(self.peers)} storage nodes: "
                "ask for fewer copies or add storage nodes")
        if len(self.uploads) >= self.settings.max_uploads:
            return StorageStatus.UNKNOWN_UPLOAD, f"this node has {len(self.uploads)} uploads open; retry in a moment"
        return None

    def _over_reserve(self, holder: str, size: int) -> tuple[int, str] | None:
        """NO_SPACE if ``holder``'s open uploads would promise more than ``reserve_per_key``
        with this one. An idle upload is closed after ``idle_timeout``, its promise with it."""
        if not holder:
            return None  # an insecure cluster: no key to count against
        promised = sum(u.size - u.received for u in self.uploads.values() if u.holder == holder)
        if promised + size <= self.settings.reserve_per_key:
            return None
        self._count("uploads_over_key_reserve")
        return StorageStatus.NO_SPACE, (f"key {holder} has uploads open that will send {promised} more bytes; with "
                                        f"{size} more that is over the {self.settings.reserve_per_key} bytes one key "
                                        "may hold: finish or abandon some first")

    def _on_chunk(self, ev: MessageReceived, m: FileChunk, now: float) -> list[Effect]:
        upload = self.uploads.get(m.upload_id)
        if upload is None or upload.route != ev.route:
            self._count("chunks_unknown_upload")
            return [self._done_to(ev.route, 0, m.upload_id, b"\0" * 16, 0, StorageStatus.UNKNOWN_UPLOAD,
                                  f"no upload {m.upload_id} open for this sender (expired, superseded or never opened): "
                                  "open it again to resume", ev.stimulus_id)]
        if not isinstance(m.payload, (bytes, bytearray, memoryview)):
            self._count("chunks_refused")
            return self._fail(upload, StorageStatus.BAD_REQUEST, "a chunk without a payload", keep=True,
                              cause=ev.stimulus_id, peer=True)
        n = len(m.payload)
        upload.last_seen = now
        problem = None
        if upload.state is not UploadState.OPEN:
            problem = StorageStatus.BAD_OFFSET, f"a chunk while the upload is {upload.state.value}"
        elif n > self.settings.chunk_max:
            problem = StorageStatus.TOO_LARGE, f"a chunk of {n} bytes; the limit is {self.settings.chunk_max}"
        elif m.offset != upload.received:
            problem = StorageStatus.BAD_OFFSET, f"a chunk at offset {m.offset}; the upload stands at {upload.received}"
        elif m.offset + n > upload.granted:
            problem = StorageStatus.NO_CREDIT, (
                f"a chunk up to offset {m.offset + n}, beyond the credit granted (up to {upload.granted}): "
                "wait for UPLOAD_CREDIT")
        elif m.offset + n > upload.size:
            problem = StorageStatus.SIZE_MISMATCH, f"bytes up to offset {m.offset + n} of a {upload.size}-byte file"
        elif m.last and m.offset + n != upload.size:
            problem = StorageStatus.SIZE_MISMATCH, f"the last chunk ends at {m.offset + n}, the file has {upload.size} bytes"
        if problem is not None:
            self._count("chunks_refused")
            return self._fail(upload, problem[0], problem[1], keep=True, cause=ev.stimulus_id, peer=True)
        upload.received += n
        upload.finish = bool(m.last)
        self._count("chunks")
        self._count("bytes_in", n)
        token = next(self._ids)
        self.pending[token] = ("write", upload.upload_id)
        return [WriteChunk(token, upload.file_id, m.offset, m.payload)]

    def _on_disk(self, ev: DiskDone, now: float) -> list[Effect]:
        what = self.pending.pop(ev.token, None)
        if what is None:
            return []
        kind, ref = what
        if kind == "read":
            return [self._read_answer(ref, ev)]
        upload = self.uploads.get(ref)
        if upload is None:
            return []  # superseded or expired meanwhile
        if ev.error is not None:
            code, text = ev.error
            status = STATUS_OF.get(code, StorageStatus.BAD_REQUEST)
            self._count(f"uploads_failed.{StorageStatus(status).name}")
            # bytes that did not hash right, or a full disk mid-write: the store already dropped
            # the partial. A begin that finds no room keeps the partial it would have resumed.
            drop = code in ("hash_mismatch", "io_error") or (code == "no_space" and kind != "begin")
            return self._fail(upload, status, text, keep=not drop, cause=ev.stimulus_id)
        if kind == "begin":
            if ev.data is True:  # stored already: dedupe
                self._count("dedupes")
                return self._stored(upload, ev.stimulus_id)
            upload.move(UploadState.OPEN)
            upload.received = ev.value
            upload.granted = ev.value + self.settings.window
            if ev.value:
                self._count("uploads_resumed")
            return [Send(API, UploadReady(upload.request_id, upload.upload_id, ev.value, self.settings.window), upload.route, ev.stimulus_id)]
        if kind == "write":
            if upload.finish and ev.value == upload.size:
                upload.move(UploadState.FINISHING)
                token = next(self._ids)
                self.pending[token] = ("finish", upload.upload_id)
                return [FinishUpload(token, upload.file_id)]
            # Grant in steps of half the window: one credit message per several chunks.
            if upload.granted - ev.value <= self.settings.window // 2 and upload.granted < upload.size:
                more = ev.value + self.settings.window - upload.granted
                upload.granted += more
                return [Send(API, UploadCredit(upload.upload_id, more), upload.route, ev.stimulus_id)]
            return []
        if kind == "finish":
            self._count("uploads_stored")
            self._count("bytes_stored", upload.size)
            return self._stored(upload, ev.stimulus_id)
        return []

    def _stored(self, upload: Upload, cause: str) -> list[Effect]:
        if upload.copies <= 1:
            return self._finish(upload, StorageStatus.OK, None, [self.name], cause)
        upload.move(UploadState.REPLICATING)
        token = next(self._ids)
        self.pending[token] = ("replicate", upload.upload_id)
        targets = tuple(rank(upload.file_id, self.peers))
        return [Replicate(token, upload.file_id, upload.size, targets, upload.copies - 1)]

    def _on_replicated(self, ev: Replicated) -> list[Effect]:
        what = self.pending.pop(ev.token, None)
        if what is None:
            return []
        upload = self.uploads.get(what[1])
        if upload is None:
            return []
        replicas = [self.name, *ev.stored]
        if len(replicas) >= upload.copies:
            self._count("replications")
            return self._finish(upload, StorageStatus.OK, None, replicas, ev.stimulus_id)
        self._count("replications_failed")
        why = "; ".join(f"{n}: {t}" for n, t in ev.failed.items()) or "no peer reachable"
        text = (f"stored on {', '.join(replicas)} but {upload.copies} copies were asked for ({why}); "
                "the file is not registered: retry the upload once the storage nodes are back")
        return self._finish(upload, StorageStatus.REPLICATION_FAILED, text, replicas, ev.stimulus_id)

    def _finish(self, upload: Upload, status: int, error: str | None, replicas: list[str], cause: str) -> list[Effect]:
        self._forget(upload)
        out: list[Effect] = [self._done_to(upload.route, upload.request_id, upload.upload_id, upload.file_id,
                                           upload.size, status, error, cause, replicas)]
        if status != StorageStatus.OK:
            out.append(Log(logging.WARNING, f"upload of {upload.file_id.hex()} from {upload.origin or '?'}: {error}", cause))
        return out

    def _fail(self, upload: Upload, status: int, text: str, *, keep: bool, cause: str, peer: bool = False) -> list[Effect]:
        out = self._finish(upload, status, text, [], cause)
        if peer:  # the sender broke the protocol: one line naming it, counted
            self._count(f"refused.{StorageStatus(status).name}")
        if upload.state in (UploadState.OPENING, UploadState.OPEN):
            out.append(AbortUpload(upload.file_id, keep))
        return out

    def _forget(self, upload: Upload) -> None:
        self.uploads.pop(upload.upload_id, None)
        if self.by_file.get(upload.file_id) == upload.upload_id:
            del self.by_file[upload.file_id]

    def _done_to(self, route: bytes | None, request_id: int, upload_id: int, file_id: bytes, size: int, status: int,
                 error: str | None, cause: str, replicas: list[str] | None = None) -> Effect:
        upper, lower = split128(file_id)
        return Send(API, UploadDone(request_id, upload_id, upper, lower, size, int(status), replicas or [], error), route, cause)

    def _expire(self, now: float, cause: str) -> list[Effect]:
        # A sender waits for UPLOAD_DONE while the copies are pushed, which takes as long as
        # the file is large: a zero credit each second tells it the node is alive and working.
        out: list[Effect] = [Send(API, UploadCredit(u.upload_id, 0), u.route, cause)
                             for u in self.uploads.values() if u.state is UploadState.REPLICATING]
        for upload in [u for u in self.uploads.values() if u.state in (UploadState.OPENING, UploadState.OPEN)]:
            if now - upload.last_seen > self.settings.idle_timeout:
                self._count("uploads_expired")
                out += self._fail(upload, StorageStatus.UNKNOWN_UPLOAD,
                                  f"no chunk for {self.settings.idle_timeout:g} s; the partial upload is kept: open it again to resume",
                                  keep=True, cause=cause)
        return out

    # ---- reads -------------------------------------------------------------------------------

    def _on_read(self, ev: MessageReceived, m: FileRequest, now: float) -> list[Effect]:
        file_id = join128(m.file_id_upper, m.file_id_lower)
        if m.length > self.settings.read_max:
            self._count("reads_refused")
            return [Send(API, FileResponse(m.request_id, m.file_id_upper, m.file_id_lower, m.offset, 0,
                                           int(StorageStatus.TOO_LARGE), b"",
                                           f"a read of {m.length} bytes; the limit is {self.settings.read_max}: read in pieces"),
                         ev.route, ev.stimulus_id)]
        if not self.gate.allows(ev.peer.role, ev.peer.name, file_id, now):
            # a client's first read of a file: the masters say whether its jobs or pins refer to it
            ask = self.gate.park(file_id, (ev, m))
            return [LookupReaders(file_id, ev.stimulus_id)] if ask else []
        return [self._start_read(ev.route, m, file_id, ev.stimulus_id)]

    def _start_read(self, route: bytes | None, m: FileRequest, file_id: bytes, cause: str) -> Effect:
        token = next(self._ids)
        self.pending[token] = ("read", (route, m, cause))
        return ReadRange(token, file_id, m.offset, m.length)

    def _on_readers(self, ev: ReadersKnown, now: float) -> list[Effect]:
        """The masters said who may read a file: the reads that waited go on, or are refused as
        if the file were not here (NOT_FOUND: a key learns nothing of files not its own); if the
        masters could not be asked, the reads are dropped and their clients retry."""
        out: list[Effect] = []
        for read_ev, m in self.gate.answered(ev.file_id, ev.readers, now):
            if ev.readers is None:
                self._count("reads_unanswered")
                continue
            if self.gate.may(read_ev.peer.name, ev.file_id):
                out.append(self._start_read(read_ev.route, m, ev.file_id, ev.stimulus_id))
                continue
            self._count("reads_forbidden")
            reply = FileResponse(m.request_id, m.file_id_upper, m.file_id_lower, m.offset, 0, int(StorageStatus.NOT_FOUND),
                                 b"", f"no file {ev.file_id.hex()} that key {read_ev.peer.name} may read here")
            out.append(Forbidden(read_ev.socket, read_ev.route, "FileRequest", read_ev.peer,
                                 f"file {ev.file_id.hex()} is not referred to by its jobs or pins", ev.stimulus_id, reply))
        return out

    def _read_answer(self, ref: tuple, ev: DiskDone) -> Effect:
        route, m, cause = ref
        if ev.error is not None:
            code, text = ev.error
            self._count(f"reads_{code}")
            return Send(API, FileResponse(m.request_id, m.file_id_upper, m.file_id_lower, m.offset, ev.value,
                                          int(STATUS_OF.get(code, StorageStatus.BAD_REQUEST)), b"", text), route, cause)
        self._count("reads")
        self._count("bytes_out", len(ev.data))
        return Send(API, FileResponse(m.request_id, m.file_id_upper, m.file_id_lower, m.offset, ev.value, 0, ev.data), route, cause)

    # ---- operators ---------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def status(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": "serving",
            "peers": list(self.peers),
            "uploads_open": len(self.uploads),
            "disk": self.capacity(),
            "upkeep": self.upkeep(),
            "settings": {"window": self.settings.window, "chunk_max": self.settings.chunk_max, "read_max": self.settings.read_max},
            "core": dict(self.counters),
        }

    def validate_state(self) -> None:
        for file_id, upload_id in self.by_file.items():
            assert self.uploads[upload_id].file_id == file_id
        for upload in self.uploads.values():
            assert upload.received <= upload.size and (upload.state is UploadState.OPENING or upload.received <= upload.granted)


# Who may upload to and read from a storage node (the sender's key's role): people, the workers
# (inputs through their mounts, outputs of tasks) and the other storage nodes (replication,
# repair). Not monitors, nor the masters and balancers, which never carry data.
STORE_AND_READ = PEOPLE | {"worker", "storage"}

_HANDLERS: dict[type, Callable] = {
    UploadOpen: StorageCore._on_open,
    FileChunk: StorageCore._on_chunk,
    FileRequest: StorageCore._on_read,
}
