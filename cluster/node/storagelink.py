"""The link to storage nodes: the sending and fetching side of the storage protocol, blocking.

``StorageLink`` is what clients, workers and storage nodes (replication, repair) use to talk to
a storage node: ``upload`` streams a file within the credit the node grants (never beyond it),
``read`` fetches one range, ``download`` keeps a window of range reads in flight and writes each
answer where it belongs. Payloads travel as raw ZeroMQ frames: a chunk is sent from the buffer
it was read into (``copy=False``) and a received range is a view of the frame it came in.

A link is not thread-safe; use one per thread. Failures raise ``TransferError`` with the
node's status (``proto.errors.StorageStatus``) and a sentence that says what to do.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any, Callable, Container

import zmq

from cluster.node import keys
from cluster.node.acting import wrap
from proto import Codec, ProtocolError, new_node_id
from proto.errors import StorageStatus
from proto.fileids import rank
from proto.ids import split128
from proto.messages import Error, FileChunk, FileRequest, FileResponse, UploadCredit, UploadDone, UploadOpen, UploadReady

MiB = 1 << 20
CHUNK = MiB  # bytes per upload chunk and per download read
WINDOW = 8  # download reads in flight
CONNECT_TIMEOUT = 3.0  # seconds to wait for a connection before calling a node unreachable


class TransferError(Exception):
    """A transfer failed. ``status`` is a StorageStatus (or None: the node did not answer)."""

    def __init__(self, text: str, status: int | None = None, node: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.node = node

    @property
    def retryable(self) -> bool:
        """Worth trying again (here later, or at another replica)."""
        return self.status in (None, StorageStatus.CORRUPT, StorageStatus.UNKNOWN_UPLOAD, StorageStatus.REPLICATION_FAILED)


class StorageLink:
    """A connection to one storage node at ``address`` (``name`` is for messages). ``timeout``:
    how long the node may stay silent; ``connect_timeout`` (default: the lesser of ``timeout``
    and CONNECT_TIMEOUT): how long to wait for a connection, so a node that is down is
    skipped quickly (a live node on the network is connected in milliseconds)."""

    def __init__(self, address: str, *, name: str = "", timeout: float = 10.0, connect_timeout: float | None = None,
                 ctx: zmq.Context | None = None, codec: Codec | None = None,
                 credentials: keys.Credentials | None = None) -> None:
        self.address = address
        self.name = name or address
        self.timeout = timeout
        self.connect_timeout = min(timeout, CONNECT_TIMEOUT) if connect_timeout is None else connect_timeout
        # One context per process, not per link: a context is an I/O thread, and links come and
        # go with the threads that use them (FUSE's worker threads, replication threads).
        self._ctx = ctx or zmq.Context.instance()
        self._codec = codec or Codec(new_node_id())
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues towards a node that is down
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        self._sock.setsockopt(zmq.RCVHWM, 1000)
        keys.connect(self._sock, address, credentials, name=name or None)
        self._act_for = credentials.act_for if credentials is not None else None
        self._ids = itertools.count(random.getrandbits(40))

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> "StorageLink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- uploads -----------------------------------------------------------------------------

    def upload(
        self,
        file_id: bytes,
        size: int,
        read_at: Callable[[int, int], Any],
        *,
        copies: int = 1,
        origin: str = "",
        chunk: int = CHUNK,
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Store ``size`` bytes (``read_at(offset, n)`` gives them) as ``file_id`` on this node
        and ``copies - 1`` more; returns the replicas once all are durable. An interrupted upload
        resumes where the node's partial copy stands: call again with the same file."""
        request_id = next(self._ids)
        upper, lower = split128(file_id)
        self._send(UploadOpen(request_id, upper, lower, size, copies, origin))
        while True:  # answers to an earlier upload on this link are not ours
            reply = self._expect((UploadReady, UploadDone), "to open the upload")
            if reply.request_id == request_id:
                break
        if isinstance(reply, UploadDone):
            return self._done(reply)
        upload_id, offset, limit = reply.upload_id, reply.offset, reply.offset + reply.credit

        def ours(done: UploadDone) -> bool:
            return done.request_id == request_id or done.upload_id == upload_id
        if progress and offset:
            progress(offset)
        sent_last = False
        while not sent_last:
            n = min(chunk, size - offset, limit - offset)
            if n > 0 or offset == size:
                data = read_at(offset, n) if n else b""
                if len(data) != n:
                    raise TransferError(f"the source gave {len(data)} bytes at offset {offset} where {n} were due: "
                                        "did the file change while it was uploaded?", None, self.name)
                sent_last = offset + n == size
                self._send(FileChunk(upload_id, offset, int(sent_last), data))
                offset += n
                if progress and n:
                    progress(n)
                # Take credit as it comes without waiting: keeps the pipe full.
                while True:
                    reply = self._poll_one(0)
                    if reply is None:
                        break
                    if isinstance(reply, UploadDone) and ours(reply):  # an error, or the answer
                        return self._done(reply)
                    limit = self._on_upload_reply(reply, upload_id, limit)
                continue
            reply = self._expect((UploadCredit, UploadDone), "to grant credit")
            if isinstance(reply, UploadDone) and ours(reply):
                return self._done(reply)
            limit = self._on_upload_reply(reply, upload_id, limit)
        # The node answers once the file is fsynced and pushed to copies - 1 peers; while it
        # pushes, a zero credit each second says it is alive, so silence still means trouble.
        while True:
            reply = self._expect((UploadDone, UploadCredit), "to store the file")
            if isinstance(reply, UploadDone) and ours(reply):
                return self._done(reply)

    def _on_upload_reply(self, reply: Any, upload_id: int, limit: int) -> int:
        if isinstance(reply, UploadCredit) and reply.upload_id == upload_id:
            return limit + reply.credit
        return limit

    def _done(self, reply: UploadDone) -> list[str]:
        if reply.status != StorageStatus.OK:
            raise TransferError(f"storage node {self.name}: {reply.error or StorageStatus(reply.status).name}", reply.status, self.name)
        return list(reply.replicas)

    # ---- reads -------------------------------------------------------------------------------

    def read(self, file_id: bytes, offset: int, length: int) -> tuple[Any, int]:
        """``length`` bytes at ``offset`` (fewer at the end) and the file's size."""
        request_id = next(self._ids)
        upper, lower = split128(file_id)
        self._send(FileRequest(request_id, upper, lower, offset, length))
        while True:
            reply = self._expect((FileResponse,), "to read")
            if reply.request_id == request_id:
                return self._payload(reply), reply.file_size

    def size(self, file_id: bytes) -> int:
        """The file's size; TransferError(NOT_FOUND) if this node does not hold it."""
        return self.read(file_id, 0, 0)[1]

    def download(
        self,
        file_id: bytes,
        write_at: Callable[[int, Any], None],
        *,
        start: int = 0,
        chunk: int = CHUNK,
        window: int = WINDOW,
        progress: Callable[[int], None] | None = None,
        have: Container[int] = (),
    ) -> int:
        """Fetch the file from ``start`` to its end with ``window`` reads in flight, handing
        each range to ``write_at(offset, data)`` (any order); returns the file's size. Ranges
        whose offsets are in ``have`` are skipped (a read resumed from another replica)."""
        size = self.size(file_id)
        upper, lower = split128(file_id)
        inflight: dict[int, tuple[int, int]] = {}  # request id → (offset, length)
        offset = start
        while offset < size or inflight:
            while offset < size and len(inflight) < window:
                if offset in have:
                    offset += chunk
                    continue
                request_id = next(self._ids)
                n = min(chunk, size - offset)
                self._send(FileRequest(request_id, upper, lower, offset, n))
                inflight[request_id] = (offset, n)
                offset += n
            if not inflight:
                break  # the rest was in ``have``
            reply = self._expect((FileResponse,), "to read")
            asked = inflight.pop(reply.request_id, None)
            if asked is None:
                continue  # a late answer to an earlier call
            at, n = asked
            data = self._payload(reply)
            if len(data) != n:
                raise TransferError(f"storage node {self.name} sent {len(data)} bytes at offset {at} where {n} were "
                                    "due (the file is immutable: a short answer is a fault)", None, self.name)
            write_at(at, data)
            if progress:
                progress(len(data))
        return size

    def _payload(self, reply: FileResponse) -> Any:
        if reply.status != StorageStatus.OK:
            raise TransferError(f"storage node {self.name}: {reply.error or StorageStatus(reply.status).name}", reply.status, self.name)
        return reply.payload

    # ---- the socket --------------------------------------------------------------------------

    def _send(self, message: Any) -> None:
        message = wrap(self._codec, message, self._act_for)
        try:
            self._codec.send(self._sock, message, flags=zmq.NOBLOCK)
        except zmq.Again:
            # IMMEDIATE: no connection (the node is down or not started) or its queue is full
            if not self._sock.poll(int(self.connect_timeout * 1000), zmq.POLLOUT):
                raise TransferError(f"storage node {self.name} at {self.address} is not reachable; is it running?", None, self.name) from None
            self._codec.send(self._sock, message)

    def _poll_one(self, timeout_ms: int) -> Any:
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            return None
        try:
            _, _, message = self._codec.recv(self._sock)
        except ProtocolError as exc:
            raise TransferError(f"storage node {self.name} sent a malformed message ({exc}); is it the same version?", None, self.name) from None
        if isinstance(message, Error):
            raise TransferError(f"storage node {self.name} refused a message: {message.text}", None, self.name)
        return message

    def _expect(self, kinds: tuple[type, ...], what: str, timeout: float | None = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferError(f"storage node {self.name} at {self.address} did not answer within "
                                    f"{timeout:g} s {what}; is it running?", None, self.name)
            message = self._poll_one(int(left * 1000) + 1)
            if message is not None and isinstance(message, kinds):
                return message


class LinkPool:
    """Links to storage nodes by name, one set per thread: a ZeroMQ socket must stay on the
    thread that made it, and FUSE, replication and upkeep each read from several threads.
    ``drop`` a link after a failure so the next use connects afresh: a late answer on the old
    socket can then never be taken for a new request's."""

    def __init__(self, addresses: dict[str, str], *, timeout: float = 10.0,
                 credentials: keys.Credentials | None = None) -> None:
        self.addresses = addresses
        self.timeout = timeout
        self.credentials = credentials  # None: the keys this process loaded for each address
        self.down_until: dict[str, float] = {}  # node → until when it is tried last (it did not answer)
        # Keyed by the native thread id, not threading.local: FUSE calls in on libfuse's own
        # threads, and each call from a thread Python did not start gets a fresh thread state,
        # so thread-local links were made anew (and never closed) on every read: the mount ran
        # out of ZeroMQ sockets (EMFILE) after ~500 reads. A thread id that is reused belongs to
        # a thread that has ended, so its links pass on safely (the lock is the memory barrier
        # ZeroMQ asks for when a socket changes threads).
        self._lock = threading.Lock()
        self._by_thread: dict[int, dict[str, StorageLink]] = {}
        self._all: set[StorageLink] = set()

    def get(self, node: str) -> StorageLink:
        links = self._links()
        link = links.get(node)
        if link is None:
            link = links[node] = StorageLink(self.addresses[node], name=node, timeout=self.timeout,
                                             credentials=self.credentials)
            with self._lock:
                self._all.add(link)
        return link

    def drop(self, node: str) -> None:
        link = self._links().pop(node, None)
        if link is not None:
            with self._lock:
                self._all.discard(link)
            link.close()

    def close(self) -> None:
        """Close every link of every thread; call once the threads using them are done."""
        with self._lock:
            links, self._all = self._all, set()
            self._by_thread.clear()
        for link in links:
            link.close()

    def _links(self) -> dict[str, StorageLink]:
        with self._lock:
            return self._by_thread.setdefault(threading.get_ident(), {})


def upload_ranked(links: LinkPool, file_id: bytes, size: int, read_at: Callable[[int, int], Any], *, copies: int,
                  origin: str, progress: Callable[[int], None] | None = None, min_copies: int | None = None,
                  penalty_s: float = 10.0) -> list[str]:
    """Store a file through the node ranked first for its id (rendezvous hashing: that node
    fans the copies out), falling back to the next in rank when a node fails; returns the
    replicas once ``copies`` are durable. A refusal that another node would repeat (the file
    does not hash to its id, too large) raises at once; when every node failed, the last
    ``TransferError`` says what each one answered. ``progress`` gets bytes sent, and minus
    what a failed node had taken (the next one starts over or resumes its own partial).

    ``min_copies`` below ``copies`` accepts a degraded write: when the node holding the file
    could not make every copy (a peer is down), the copies that are durable are returned and
    the storage nodes' upkeep adds the missing ones later (HDFS's pipeline does the same).
    A node that did not answer is tried last for ``penalty_s``, so one dead node does not cost
    every upload a connect timeout."""
    now = time.monotonic()
    order = sorted(rank(file_id, list(links.addresses)), key=lambda n: links.down_until.get(n, 0.0) > now)
    errors: dict[str, str] = {}
    for node in order:
        sent = [0]

        def counted(n: int) -> None:
            sent[0] += n
            if progress:
                progress(n)

        try:
            return links.get(node).upload(file_id, size, read_at, copies=copies, origin=origin, progress=counted)
        except TransferError as exc:
            links.drop(node)
            errors[node] = str(exc)
            if exc.status is None:
                links.down_until[node] = time.monotonic() + penalty_s
            if progress and sent[0]:
                progress(-sent[0])
            if exc.status == StorageStatus.REPLICATION_FAILED and min_copies is not None and min_copies < copies:
                # durable on this node already: a copies=1 upload is an instant dedupe there
                return links.get(node).upload(file_id, size, read_at, copies=1, origin=origin)
            if exc.status is not None and not exc.retryable:
                raise
    said = "; ".join(f"{n}: {e}" for n, e in errors.items()) or "no storage nodes are configured"
    raise TransferError(f"every storage node failed ({said})")
