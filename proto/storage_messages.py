"""The storage messages of the catalogue (``proto.messages`` holds them all and re-exports
these): reads and uploads between clients, workers and storage nodes, and replication between
storage nodes. Data flows client -> storage -> workers, never through masters or balancers."""

from __future__ import annotations

from proto.types import U8, U64, Message, Payload


class FileRequest(Message, frozen=True, gc=False):
    """Read ``length`` bytes at ``offset`` of an immutable file (the seed's ``file_request``)."""

    code = 30
    struct_name = "file_request"
    sender = "worker, client"
    receiver = "storage"

    request_id: U64
    file_id_upper: U64
    file_id_lower: U64
    offset: U64
    length: U64


class FileResponse(Message, frozen=True, gc=False):
    """Bytes of a file (the seed's ``file_response``). ``status`` is a ``proto.errors.StorageStatus``
    (0 ok, 1 not found, 2 range out of bounds, 3 corrupt replica …); ``file_size`` is the whole
    file's size. Reads past the end are clipped like ``pread``; an offset beyond it is an error."""

    code = 31
    struct_name = "file_response"
    sender = "storage"
    receiver = "worker, client"

    request_id: U64
    file_id_upper: U64
    file_id_lower: U64
    offset: U64
    file_size: U64
    status: U8
    payload: Payload
    error: str | None = None


class FileChunk(Message, frozen=True, gc=False):
    """One chunk of an upload, within the credit the receiver granted. ``last`` is 1 on the
    final chunk, whose arrival lets the receiver hash, fsync and rename the file."""

    code = 32
    struct_name = "file_chunk"
    sender = "client, storage (replication)"
    receiver = "storage"

    upload_id: U64
    offset: U64
    last: U8
    payload: Payload


class UploadOpen(Message, frozen=True, gc=False):
    """Start (or resume) storing a file of ``size`` bytes whose content id the sender computed.
    ``copies`` is how many storage nodes must hold it durably before UPLOAD_DONE (this one
    included; a replication push asks for 1). Answered with UPLOAD_READY, or at once with
    UPLOAD_DONE when the file is stored already (dedupe) or cannot be."""

    code = 33
    struct_name = "upload_open"
    sender = "client, storage (replication)"
    receiver = "storage"

    request_id: U64
    file_id_upper: U64
    file_id_lower: U64
    size: U64
    copies: U8
    origin: str = ""


class UploadReady(Message, frozen=True, gc=False):
    """Send FILE_CHUNKs of upload ``upload_id`` from ``offset`` (non-zero: resuming a partial
    upload), at most ``credit`` bytes beyond ``offset`` until UPLOAD_CREDIT grants more."""

    code = 34
    struct_name = "upload_ready"
    sender = "storage"
    receiver = "client, storage (replication)"

    request_id: U64
    upload_id: U64
    offset: U64
    credit: U64


class UploadCredit(Message, frozen=True, gc=False):
    """``credit`` more bytes of upload ``upload_id`` may be sent (the receiver wrote earlier ones)."""

    code = 35
    struct_name = "upload_credit"
    sender = "storage"
    receiver = "client, storage (replication)"

    upload_id: U64
    credit: U64


class UploadDone(Message, frozen=True, gc=False):
    """The end of an upload. ``status`` 0: durable on ``replicas`` (storage node names), which
    the sender registers with the masters; otherwise a ``proto.errors.StorageStatus`` code and
    ``error`` says what to do. A partial upload is kept for resume unless the status says not."""

    code = 36
    struct_name = "upload_done"
    sender = "storage"
    receiver = "client, storage (replication)"

    request_id: U64
    upload_id: U64
    file_id_upper: U64
    file_id_lower: U64
    size: U64
    status: U8
    replicas: list[str] = []
    error: str | None = None
