"""The codec: messages to ZeroMQ frames and back, trusting nothing that arrives.

Theory of operation
-------------------
A message travels as one ZeroMQ multipart message:

    frame 0    generic header (28 bytes) | type-specific header | MessagePack body (optional)
    frame 1…k  raw payloads, only for ``Payload`` fields too large to ride inline

The generic header is the seed's ``generic_message`` with a magic and a version in front::

    uint16 magic = 0x5A43 ("CZ" on the wire); uint8 version; uint8 message_type;
    uint64 node_uuid_upper; uint64 node_uuid_lower; uint64 header_length

all little-endian and packed. ``header_length`` is the size of both headers, so the body starts
there. The body is a MessagePack array of the type's body fields in declaration order (absent for
types that have none). A ``Payload`` field holds either the bytes themselves (below
``Limits.inline_payload_bytes``, pyzmq's copy threshold: a frame costs more than a small copy) or
the index ``k ≥ 1`` of the raw frame that carries it; raw frames are sent with ``copy=False`` and
received as ``memoryview`` s of the ZeroMQ message, so a large payload is never copied by Python.

Decoding checks, in order: size limits, magic, version, type, header length, body schema,
cross-field consistency, raw frame count; the first failure raises ``ProtocolError`` with its
``Reason``. Nothing else escapes the decoder (property-tested with arbitrary frames).

Hot path. On this 2-core machine a raw 1 KiB pyzmq message costs ~3 µs of wall time and each
microsecond of Python per message costs ~15-30 % of throughput, so the common path is one
``Struct.unpack_from`` for both headers (the first uint32 checks magic, version and type in one
compare), one msgspec call that decodes and validates the body in C, and one constructor call.
Every check that fails falls through to ``_diagnose`` for a precise reason.
"""

from __future__ import annotations

import re
import struct
import typing
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgspec
import zmq

from proto.errors import EncodeError, ProtocolError, Reason
from proto.messages import BATCH_MAX_BYTES, BATCH_MAX_ITEMS, BATCHABLE, CATALOGUE, MessageBatch
from proto.types import CType, Message, PayloadMarker

MAGIC = 0x5A43  # b"CZ" little-endian
PROTOCOL_VERSION = 1
GENERIC_STRUCT = struct.Struct("<HBBQQQ")
GENERIC_SIZE = GENERIC_STRUCT.size  # 28
GENERIC_FIELDS = (
    ("magic", "uint16_t"),
    ("version", "uint8_t"),
    ("message_type", "uint8_t"),
    ("node_uuid_upper", "uint64_t"),
    ("node_uuid_lower", "uint64_t"),
    ("header_length", "uint64_t"),
)
_MASK64 = 2**64 - 1


@dataclass(frozen=True)
class Limits:
    """What a node accepts. Oversize messages are refused as TOO_LARGE, not allocated twice."""

    max_message_bytes: int = 64 * 2**20  # all frames together
    max_frame0_bytes: int = 16 * 2**20  # headers + body
    max_frames: int = 16  # frame 0 and raw payload frames
    inline_payload_bytes: int = zmq.COPY_THRESHOLD  # below: inline in the body; above: raw frame


DEFAULT_LIMITS = Limits()


def new_node_id() -> int:
    """A fresh random 128-bit node id (the generic header's node_uuid)."""
    return uuid.uuid4().int


def message_name(cls: type[Message]) -> str:
    """HEARTBEAT for Heartbeat, WORKER_REQUEST for WorkerRequest."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()


@dataclass(frozen=True, eq=False)
class MessageSpec:
    """Everything the codec derives from one message class."""

    cls: type[Message]
    code: int
    name: str
    header_fields: tuple[tuple[str, CType], ...]
    body_fields: tuple[str, ...]
    payload_fields: tuple[str, ...]
    struct: struct.Struct  # generic + specific, first uint32 = magic|version|type
    header_length: int
    word: int  # expected first uint32
    body_decoder: msgspec.msgpack.Decoder | None
    payload_slots: tuple[int, ...]  # positions of payload fields among the body fields
    payload_positions: tuple[int, ...]  # the same among all fields (header first)
    checked: bool  # the class defines cross-field checks (``problem``)


def _build_spec(cls: type[Message]) -> MessageSpec:
    hints = typing.get_type_hints(cls, include_extras=True)
    header: list[tuple[str, CType]] = []
    body: list[tuple] = []
    body_names: list[str] = []
    payloads: list[str] = []
    for f in msgspec.structs.fields(cls):
        hint = hints[f.name]
        meta = getattr(hint, "__metadata__", ())
        ctype = next((m for m in meta if isinstance(m, CType)), None)
        if ctype is not None:
            if body:
                raise TypeError(f"{cls.__name__}.{f.name}: header fields must precede body fields")
            header.append((f.name, ctype))
            continue
        if any(isinstance(m, PayloadMarker) for m in meta):
            payloads.append(f.name)
            wire_type: Any = bytes | int | None  # inline bytes, raw frame index, or absent
        else:
            wire_type = hint
        body_names.append(f.name)
        if f.required:
            body.append((f.name, wire_type))
        else:
            default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            body.append((f.name, wire_type, default))
    fmt = "<IQQQ" + "".join(c.struct_code for _, c in header)
    st = struct.Struct(fmt)
    body_decoder = None
    if body:
        # array_like: the body is a positional array; unknown trailing elements are ignored
        # (forward compatibility), missing trailing elements take their defaults.
        body_cls = msgspec.defstruct(f"{cls.__name__}Body", body, array_like=True, frozen=True)
        body_decoder = msgspec.msgpack.Decoder(body_cls)
    code = cls.code
    if not 0 < code < 256:
        raise TypeError(f"{cls.__name__}: message code {code} does not fit uint8")
    return MessageSpec(
        cls=cls,
        code=code,
        name=message_name(cls),
        header_fields=tuple(header),
        body_fields=tuple(body_names),
        payload_fields=tuple(payloads),
        struct=st,
        header_length=st.size,
        word=MAGIC | PROTOCOL_VERSION << 16 | code << 24,
        body_decoder=body_decoder,
        payload_slots=tuple(body_names.index(p) for p in payloads),
        payload_positions=tuple(len(header) + body_names.index(p) for p in payloads),
        checked="problem" in cls.__dict__,
    )


SPECS: tuple[MessageSpec, ...] = tuple(_build_spec(c) for c in CATALOGUE)
_BY_CODE: list[MessageSpec | None] = [None] * 256
_BY_CLASS: dict[type, MessageSpec] = {}
for _s in SPECS:
    if _BY_CODE[_s.code] is not None:
        raise TypeError(f"message code {_s.code} used twice")
    _BY_CODE[_s.code] = _s
    _BY_CLASS[_s.cls] = _s


def spec_for(message: Message | type[Message]) -> MessageSpec:
    """The spec of a message instance or class; EncodeError if it is not in the catalogue."""
    cls = message if isinstance(message, type) else type(message)
    try:
        return _BY_CLASS[cls]
    except KeyError:
        raise EncodeError(f"{cls.__name__} is not a message of the catalogue") from None


def spec_by_code(code: int) -> MessageSpec | None:
    """The spec of a type code, or None if this node does not know it."""
    return _BY_CODE[code] if 0 <= code < 256 else None


_astuple = msgspec.structs.astuple
_FIELD_PATH = re.compile(r"at `\$\[(\d+)\]`")
_FIELD_INDEX = re.compile(r"at `\$\[(\d+)\]")  # also inside a field: `$[2][...]`


class Codec:
    """Encodes and decodes the messages of one node.

    Not thread-safe, like the ZeroMQ sockets it serves: it owns a scratch buffer for frame 0,
    so give each thread that sends its own ``Codec``.
    """

    def __init__(self, node_id: int, limits: Limits = DEFAULT_LIMITS) -> None:
        if not 0 <= node_id < 2**128:
            raise ValueError("node_id must be a 128-bit unsigned integer")
        self.node_id = node_id
        self.limits = limits
        self._hi = node_id >> 64
        self._lo = node_id & _MASK64
        self._scratch = bytearray(256)
        self._encode_body_into = msgspec.msgpack.Encoder().encode_into
        # Frame 0 of the message ``recv`` returned last: ZeroMQ keeps the peer's address on it,
        # so a node can still say who sent a message its core refuses.
        self.last_frame: zmq.Frame | None = None

    # ---- encoding ------------------------------------------------------------------------

    def _frame0(self, message: Message) -> tuple[bytes | bytearray, list[Any]]:
        """Frame 0 (in the scratch buffer: send or copy it before the next call) and raw frames."""
        spec = _BY_CLASS.get(type(message))
        if spec is None:
            raise EncodeError(f"{type(message).__name__} is not a message of the catalogue")
        if spec.checked:
            try:
                problem = message.problem()  # type: ignore[attr-defined]
            except TypeError as exc:  # a field of the wrong type, e.g. program=None
                raise EncodeError(f"{spec.name}: {exc}") from exc
            if problem:
                raise EncodeError(f"{spec.name}: {problem}")
        values = _astuple(message)
        nh = len(spec.header_fields)
        raw: list[Any] = []
        try:
            if spec.body_decoder is None:
                return spec.struct.pack(spec.word, self._hi, self._lo, spec.header_length, *values), raw
            body = values[nh:]
            inline = self.limits.inline_payload_bytes
            for slot in spec.payload_slots:  # fast path: small bytes stay where they are
                value = body[slot]
                if value is not None and (type(value) is not bytes or len(value) >= inline):
                    body = self._place_payloads(spec, list(body), raw)
                    break
            buf = self._scratch
            self._encode_body_into(body, buf, spec.header_length)
            spec.struct.pack_into(buf, 0, spec.word, self._hi, self._lo, spec.header_length, *values[:nh])
        except (struct.error, TypeError, msgspec.EncodeError, OverflowError) as exc:
            raise EncodeError(f"{spec.name}: {self._explain_encode(spec, values, exc)}") from exc
        return buf, raw

    def _place_payloads(self, spec: MessageSpec, body: list[Any], raw: list[Any]) -> list[Any]:
        for slot in spec.payload_slots:
            value = body[slot]
            if value is None:
                continue
            view = value if isinstance(value, memoryview) else memoryview(value)
            if not view.contiguous:
                raise EncodeError(f"{spec.name}.{spec.body_fields[slot]}: payload must be contiguous")
            if view.nbytes >= self.limits.inline_payload_bytes:
                raw.append(value)
                body[slot] = len(raw)
            elif view.format != "B" or view.ndim != 1:
                body[slot] = view.cast("B")  # e.g. a small numpy array: its bytes, inline
        return body

    @staticmethod
    def _explain_encode(spec: MessageSpec, values: tuple, exc: Exception) -> str:
        for (name, ctype), value in zip(spec.header_fields, values):
            if not isinstance(value, (int, float)) or isinstance(value, bool) and ctype.struct_code == "d":
                return f"header field {name} must be a number, got {type(value).__name__}"
            if not ctype.low <= value <= ctype.high:
                return f"header field {name}={value} does not fit {ctype.c_name}"
        return str(exc)

    def encode(self, message: Message) -> list[bytes | Any]:
        """The frames of a message: frame 0 as ``bytes``, then raw payloads as given."""
        frame0, raw = self._frame0(message)
        return [bytes(frame0), *raw]

    def send(self, sock: zmq.Socket, message: Message, route: bytes | None = None, flags: int = 0,
             track: bool | Callable[[int], bool] = False) -> tuple[zmq.MessageTracker | None, int]:
        """Encode and send; ``route`` is the peer's routing id on a ROUTER socket.

        ``flags`` (e.g. ``zmq.NOBLOCK``) apply to the first frame; once it is queued, ZeroMQ
        takes the rest of the multipart message without blocking. Returns the message's size in
        bytes and, with ``track``, a tracker that is done once libzmq has let go of the message
        (written it to the connection, or dropped it with the connection): what lets a node bound
        the bytes queued towards one peer. ``track`` may be a function of the message's size.
        """
        frame0, raw = self._frame0(message)
        nbytes = len(frame0) + sum(_nbytes(p) for p in raw)
        if callable(track):  # decided by the message's size (cluster.node.sendqueue)
            track = track(nbytes)
        if route is not None:
            sock.send(route, flags | zmq.SNDMORE)
            flags = 0
        if not raw:
            if track:  # zero-copy sends are the tracked ones: frame 0 leaves the scratch buffer first
                return sock.send(bytes(frame0), flags, copy=False, track=True), nbytes
            sock.send(frame0, flags)  # copy=True: the scratch buffer is reused by the next encode
            return None, nbytes
        sock.send(frame0, flags | zmq.SNDMORE)
        last = len(raw) - 1
        tracker = None
        for i, payload in enumerate(raw):
            if i == last:
                # libzmq releases a message's frames in order, so the last one's tracker speaks for all
                tracker = sock.send(payload, 0, copy=False, track=track)
            else:
                sock.send(payload, zmq.SNDMORE, copy=False)
        return (tracker if track else None), nbytes

    def batch(self, messages: Sequence[Message]) -> MessageBatch:
        """One MESSAGE_BATCH carrying ``messages`` (each of ``BATCHABLE``, none with raw frames)."""
        if len(messages) > BATCH_MAX_ITEMS:
            raise EncodeError(f"{len(messages)} messages, at most {BATCH_MAX_ITEMS} ride one batch")
        items = self.encode_items(messages)
        return MessageBatch(len(items), items)

    def encode_items(self, messages: Sequence[Message]) -> list[bytes]:
        """Each message's frame 0, to ride a MESSAGE_BATCH (each of ``BATCHABLE``, no raw frames)."""
        items = []
        for m in messages:
            if type(m) not in BATCHABLE:
                raise EncodeError(f"{type(m).__name__} may not ride a MESSAGE_BATCH")
            frame0, raw = self._frame0(m)
            if raw:
                raise EncodeError(f"{type(m).__name__} with raw frames may not ride a MESSAGE_BATCH")
            items.append(bytes(frame0))
        return items

    @staticmethod
    def batch_cuts(sizes: Sequence[int]) -> list[tuple[int, int]]:
        """Where to cut messages of encoded ``sizes`` into batches: [start, end) runs of at most
        ``BATCH_MAX_ITEMS`` items and (but for a lone large item) ``BATCH_MAX_BYTES`` bytes."""
        cuts, start, total = [], 0, 0
        for i, n in enumerate(sizes):
            if i > start and (i - start >= BATCH_MAX_ITEMS or total + n > BATCH_MAX_BYTES):
                cuts.append((start, i))
                start, total = i, 0
            total += n
        if start < len(sizes):
            cuts.append((start, len(sizes)))
        return cuts

    def unbatch(self, batch: MessageBatch) -> list[tuple[int, Message] | ProtocolError]:
        """The messages a MESSAGE_BATCH carries, in order: each (sender node id, message), or
        the ProtocolError that item alone earns (malformed, a nested batch, a type that may not
        ride one). The caller refuses those and handles the rest, each on its own."""
        out: list[tuple[int, Message] | ProtocolError] = []
        for item in batch.items:
            try:
                sender, message = self._decode(item, ())
            except ProtocolError as exc:
                out.append(exc)
                continue
            if type(message) not in BATCHABLE:
                out.append(ProtocolError(Reason.UNEXPECTED, f"{_BY_CLASS[type(message)].name} may not ride a "
                                         f"MESSAGE_BATCH (only {', '.join(sorted(_BY_CLASS[c].name for c in BATCHABLE))})",
                                         message.code))
                continue
            out.append((sender, message))
        return out

    # ---- decoding ------------------------------------------------------------------------

    def decode(self, frames: Sequence[Any]) -> tuple[int, Message]:
        """Decode the frames of one message (no routing envelope) into (sender node id, message).

        Frames may be ``bytes``, ``memoryview`` s or ``zmq.Frame`` s. Raises only ProtocolError.
        """
        if not frames:
            raise ProtocolError(Reason.SHORT_FRAME, "empty message: no frame 0")
        views = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
        self._check_size(len(views), sum(_nbytes(v) for v in views))
        return self._decode(views[0], views[1:])

    def recv(self, sock: zmq.Socket, router: bool = False, flags: int = 0) -> tuple[bytes | None, int, Message]:
        """Receive one message: (routing id or None, sender node id, message).

        Always consumes the whole multipart message, even a malformed one, so the socket stays
        in step. On ProtocolError the exception's ``peer`` and ``route`` say who sent it.
        """
        route = None
        frame = sock.recv(flags, copy=False)
        if router:
            route = frame.bytes
            if not frame.more:
                # libzmq's ROUTER always puts the routing id before a message of ≥ 1 frame
                raise self._blame(ProtocolError(Reason.SHORT_FRAME, "routing id with no message"), frame, route)
            frame = sock.recv(copy=False)
        first = self.last_frame = frame
        raw: list[Any] = []
        if frame.more:
            total, count = len(frame), 1
            while frame.more:  # drain all of it: a multipart message is delivered whole
                frame = sock.recv(copy=False)
                count += 1
                total += len(frame)
                if count <= self.limits.max_frames:
                    # Read-only: over inproc the view is the sender's own buffer, and even
                    # over tcp a received message is a fact, not scratch space.
                    raw.append(frame.buffer.toreadonly())
            try:
                self._check_size(count, total)
            except ProtocolError as exc:
                raise self._blame(exc, first, route) from None
        try:
            sender, message = self._decode(first.buffer, raw)
        except ProtocolError as exc:
            raise self._blame(exc, first, route) from None
        return route, sender, message

    @staticmethod
    def _blame(exc: ProtocolError, frame: zmq.Frame, route: bytes | None) -> ProtocolError:
        exc.route = route
        exc.peer = describe_peer(frame, route)
        return exc

    def _check_size(self, count: int, total: int) -> None:
        if count > self.limits.max_frames:
            raise ProtocolError(Reason.TOO_MANY_FRAMES, f"{count} frames, the limit is {self.limits.max_frames}")
        if total > self.limits.max_message_bytes:
            raise ProtocolError(Reason.TOO_LARGE, f"{total} bytes, the limit is {self.limits.max_message_bytes}")

    def _decode(self, buf: Any, raw: Sequence[Any]) -> tuple[int, Message]:
        n = len(buf)
        if n > self.limits.max_frame0_bytes:
            raise ProtocolError(Reason.TOO_LARGE, f"frame 0 is {n} bytes, the limit is {self.limits.max_frame0_bytes}")
        spec = _BY_CODE[buf[3]] if n >= GENERIC_SIZE else None
        if spec is None or n < spec.header_length:
            _diagnose(buf)
        hl = spec.header_length
        h = spec.struct.unpack_from(buf)
        if h[0] != spec.word:
            _diagnose(buf)
        if h[3] != hl:
            raise ProtocolError(
                Reason.HEADER_LENGTH,
                f"header_length is {h[3]}, {spec.name} headers are {hl} bytes",
                spec.code,
            )
        if spec.body_decoder is None:
            if n != hl:
                raise ProtocolError(Reason.LONG_FRAME, f"{n - hl} bytes after the headers of {spec.name}, which has no body", spec.code)
            values = h[4:]
        else:
            if n == hl:
                raise ProtocolError(Reason.BAD_BODY, f"{spec.name} has no body; it needs {', '.join(spec.body_fields)}", spec.code)
            try:
                body = spec.body_decoder.decode(buf[hl:])
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                # ValidationError is a DecodeError; msgspec raises UnicodeDecodeError for a str
                # that is not UTF-8 and RecursionError for a body nested too deeply.
                detail, field = _explain_body(spec, exc, buf[hl:])
                raise ProtocolError(Reason.BAD_BODY, detail, spec.code, field=field) from None
            values = h[4:] + _astuple(body)
        if spec.payload_slots:
            if raw:
                values = _attach_payloads(spec, values, raw)
            else:
                for i in spec.payload_positions:  # fast path: every payload came inline
                    if type(values[i]) is int:
                        values = _attach_payloads(spec, values, raw)
                        break
        elif raw:
            raise ProtocolError(Reason.TOO_MANY_FRAMES, f"{len(raw)} raw frames after {spec.name}, which carries none", spec.code)
        message = spec.cls(*values)
        if spec.checked:
            problem = message.problem()  # type: ignore[attr-defined]
            if problem:
                raise ProtocolError(Reason.BAD_BODY, f"{spec.name}: {problem}", spec.code)
        return (h[1] << 64) | h[2], message


def _nbytes(buf: Any) -> int:
    nbytes = getattr(buf, "nbytes", None)  # memoryview, numpy array: bytes, not rows
    return nbytes if isinstance(nbytes, int) else len(buf)


def _diagnose(buf: Any) -> typing.NoReturn:
    """The precise reason frame 0 failed the fast path's checks."""
    n = len(buf)
    if n < 2 or (buf[0] | buf[1] << 8) != MAGIC:
        head = bytes(buf[:4]).hex() or "nothing"
        raise ProtocolError(Reason.BAD_MAGIC, f"frame 0 starts with {head}, not the magic 435a ('CZ'): not a cluster message")
    if n < 3 or buf[2] != PROTOCOL_VERSION:
        got = buf[2] if n >= 3 else "none"
        raise ProtocolError(Reason.BAD_VERSION, f"protocol version {got}, this node speaks {PROTOCOL_VERSION}")
    code = buf[3] if n >= 4 else None
    spec = _BY_CODE[code] if code is not None else None
    if code is not None and spec is None:
        raise ProtocolError(Reason.UNKNOWN_TYPE, f"message type {code} is not in this node's catalogue", code)
    need = spec.header_length if spec else GENERIC_SIZE
    what = spec.name if spec else "the generic header"
    raise ProtocolError(Reason.SHORT_FRAME, f"frame 0 has {n} bytes, {what} needs {need}", code or 0)


def _explain_body(spec: MessageSpec, exc: Exception, body: Any) -> tuple[str, str | None]:
    """The detail and the name of the body field at fault (None when no one field is).

    msgspec says `$[2]`; an operator wants the field's name. Its error for bad UTF-8 names no
    position at all (a UnicodeDecodeError in 0.22, a DecodeError in 0.23), so the field is then
    found by decoding the elements one at a time (the error path only: a refused message is
    rare, the fast path stays one C call)."""
    text = str(exc)
    m = _FIELD_INDEX.search(text)
    field = spec.body_fields[int(m.group(1))] if m and int(m.group(1)) < len(spec.body_fields) else None
    if field is None and not isinstance(exc, RecursionError):
        field = _field_at_fault(spec, body)

    def name(m: re.Match) -> str:
        i = int(m.group(1))
        return f"at field `{spec.body_fields[i]}`" if i < len(spec.body_fields) else m.group(0)

    detail = f"{spec.name} body: {_FIELD_PATH.sub(name, text)}"
    if field is not None and f"`{field}`" not in detail:
        detail += f" (field `{field}`)"
    return detail, field


def _field_at_fault(spec: MessageSpec, body: Any) -> str | None:
    assert spec.body_decoder is not None
    try:
        elements = msgspec.msgpack.decode(body, type=list[msgspec.Raw])
    except (msgspec.DecodeError, RecursionError):
        return None
    for info, element in zip(msgspec.structs.fields(spec.body_decoder.type), elements):
        try:
            msgspec.msgpack.decode(element, type=info.type)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return info.name
    return None


def _attach_payloads(spec: MessageSpec, values: tuple, raw: Sequence[Any]) -> tuple:
    out = list(values)
    base = len(spec.header_fields)
    used = 0
    for slot in spec.payload_slots:
        ref = out[base + slot]
        if isinstance(ref, bytes) or ref is None:
            continue
        used += 1
        if isinstance(ref, bool) or ref != used:
            raise ProtocolError(
                Reason.BAD_BODY,
                f"{spec.name}.{spec.body_fields[slot]} refers to raw frame {ref}, expected {used}",
                spec.code,
            )
        if ref > len(raw):
            raise ProtocolError(
                Reason.MISSING_FRAMES,
                f"{spec.name}.{spec.body_fields[slot]} is in raw frame {ref}, the message has {len(raw)}",
                spec.code,
            )
        out[base + slot] = raw[ref - 1]
    if len(raw) > used:
        raise ProtocolError(Reason.TOO_MANY_FRAMES, f"{len(raw)} raw frames after {spec.name}, its body refers to {used}", spec.code)
    return tuple(out)


def describe_peer(frame: zmq.Frame | None, route: bytes | None) -> str:
    """Who sent a frame, for a log line: its TCP address when ZeroMQ knows it, and routing id."""
    parts = []
    if frame is not None:
        try:
            parts.append(frame.get("Peer-Address"))
        except (zmq.ZMQError, AttributeError, KeyError):  # inproc and ipc have no address
            pass
    if route is not None:
        parts.append(f"route {route.hex()}")
    return " ".join(parts) or "unknown peer"
