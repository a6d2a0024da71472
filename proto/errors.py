"""Protocol errors: one typed exception for everything a peer can get wrong, with a reason code.

Like h11, we separate the two directions: ``ProtocolError`` is raised when a *peer* sent
something malformed (the node logs it, counts it and goes on); ``EncodeError`` is raised when
*this* process tried to send something that does not fit the catalogue (a bug, raised loudly).
"""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    """Why a received message was refused. Codes are stable: they travel in ERROR messages."""

    SHORT_FRAME = 1  # frame 0 shorter than the headers it must hold
    LONG_FRAME = 2  # bytes after the headers of a message type that has no body
    BAD_MAGIC = 3  # not our protocol at all
    BAD_VERSION = 4  # our protocol, another version
    UNKNOWN_TYPE = 5  # a message type this node does not know
    HEADER_LENGTH = 6  # header_length disagrees with the type's packed headers
    BAD_BODY = 7  # body is not MessagePack, or does not match the type's schema
    TOO_MANY_FRAMES = 8  # more raw frames than the body refers to, or over the limit
    MISSING_FRAMES = 9  # the body refers to raw frames that did not come
    TOO_LARGE = 10  # frame 0 or the whole message over the configured size limit
    UNEXPECTED = 11  # well-formed, but not a message this node accepts here


class ProtocolError(Exception):
    """A peer sent a message that breaks the protocol.

    ``reason`` says which rule it broke, ``detail`` says how, in words an operator can act on.
    ``message_type`` is the refused type code when it could be read (else 0); ``field`` names the
    body field at fault when one is (a BAD_BODY of a wrong type or bad text). Receivers fill in
    ``peer`` (who sent it, for the log line) and ``route`` (to answer a ROUTER peer).
    """

    def __init__(self, reason: Reason, detail: str, message_type: int = 0, field: str | None = None) -> None:
        super().__init__(f"{reason.name}: {detail}")
        self.reason = reason
        self.detail = detail
        self.message_type = message_type
        self.field = field
        self.peer: str = "?"
        self.route: bytes | None = None


class EncodeError(ValueError):
    """This process tried to encode a message that does not fit the catalogue (a local bug)."""


class AppReason(enum.IntEnum):
    """Why a master refused a well-formed request (ERROR ``reason`` ≥ 1000). ``detail["code"]``
    carries the ledger's own refusal code (``idempotency_conflict``, ``spec_too_large`` …)."""

    REFUSED = 1000  # the ledger refused the command; nothing changed (not retryable)
    UNAVAILABLE = 1001  # no quorum or a leader still electing: retry later, elsewhere
    OUTCOME_UNKNOWN = 1002  # the command may or may not commit (leader lost): retry with the same key
    STALE_FENCE = 1003  # a fencing token older than the newest seen (deposed leader, stale balancer)
    NOT_FOUND = 1004  # no such job or task


class StorageStatus(enum.IntEnum):
    """The outcome of a storage request (FILE_RESPONSE and UPLOAD_DONE ``status``). Stable codes."""

    OK = 0
    NOT_FOUND = 1  # no such file on this node
    OUT_OF_RANGE = 2  # the offset is past the end of the file
    CORRUPT = 3  # this replica failed verification: read another one (scrub repairs it)
    NO_SPACE = 4  # the node's disk cannot take the file; nothing was kept
    TOO_LARGE = 5  # a chunk or read over the node's limit
    NO_CREDIT = 6  # a chunk beyond the credit the receiver granted
    BAD_OFFSET = 7  # a chunk that does not continue the upload where it stands
    SIZE_MISMATCH = 8  # more bytes than announced, or fewer at the last chunk
    HASH_MISMATCH = 9  # the content does not hash to the announced id; nothing was kept
    UNKNOWN_UPLOAD = 10  # no such upload in progress (expired, superseded or never opened)
    REPLICATION_FAILED = 11  # stored here, but fewer than the requested copies became durable
    BAD_REQUEST = 12  # a request this node cannot make sense of (e.g. zero copies)
    IO_ERROR = 13  # this node's disk failed: try another node (the operator should look at it)
