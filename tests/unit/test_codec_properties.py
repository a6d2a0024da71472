"""Property tests of the codec: every valid message round-trips; nothing but ProtocolError escapes.

Strategies are derived from ``proto.codec.SPECS`` and the classes' type hints, so a message type
added to the catalogue is tested here without touching this file. ``inline_payload_bytes=64``
makes raw payload frames cheap to exercise.
"""

from __future__ import annotations

import struct
import types
import typing
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import SPECS, Codec, Limits, Message, MessageSpec, ProtocolError
from proto.codec import GENERIC_SIZE, GENERIC_STRUCT, MAGIC, PROTOCOL_VERSION
from proto.messages import BATCHABLE, MessageBatch, WorkerRequest
from proto.types import CType, PayloadMarker

LIMITS = Limits(inline_payload_bytes=64)
INT64 = st.integers(-(2**63), 2**63 - 1)
NODE_IDS = st.integers(0, 2**128 - 1)

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_like = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
payloads = st.one_of(
    st.binary(max_size=LIMITS.inline_payload_bytes - 1),  # inline
    st.binary(min_size=LIMITS.inline_payload_bytes, max_size=4 * LIMITS.inline_payload_bytes),  # raw frame
    st.none(),
)


def strategy_for(hint: Any) -> st.SearchStrategy:
    """Values of a body field's annotated type."""
    if typing.get_origin(hint) is typing.Annotated:
        if any(isinstance(m, PayloadMarker) for m in hint.__metadata__):
            return payloads
        return strategy_for(typing.get_args(hint)[0])
    if hint is Any:
        return json_like
    if hint is type(None):
        return st.none()
    if hint is str:
        return st.text(max_size=30)
    if hint is bytes:
        return st.binary(max_size=40)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-(2**63), 2**64 - 1)  # what MessagePack carries
    if hint is float:
        return st.floats(allow_nan=False)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=5)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=5)
    raise NotImplementedError(f"no strategy for {hint!r}: teach test_codec_properties.py about it")


def header_strategy(ctype: CType) -> st.SearchStrategy:
    if ctype.struct_code in "fd":
        return st.floats(allow_nan=False)
    return st.integers(ctype.low, ctype.high)


@st.composite
def worker_requests(draw) -> WorkerRequest:
    program = draw(st.binary(max_size=200))
    input_files = draw(st.lists(st.binary(min_size=16, max_size=16), max_size=6))
    header = {name: draw(header_strategy(ct)) for name, ct in _spec(WorkerRequest).header_fields}
    header.update(program_length=len(program), num_input_files=len(input_files))
    return WorkerRequest(
        **header,
        kind=draw(st.text(max_size=20)),
        program=program,
        input_files=input_files,
        arguments=draw(st.dictionaries(st.text(max_size=8), json_like, max_size=4)),
    )


def _spec(cls: type[Message]) -> MessageSpec:
    return next(s for s in SPECS if s.cls is cls)


@st.composite
def message_batches(draw) -> MessageBatch:
    """A MESSAGE_BATCH of 0-6 messages of the types that may ride one."""
    inner = draw(st.lists(st.sampled_from(sorted(BATCHABLE, key=lambda c: c.code))
                          .flatmap(lambda c: messages_of(_spec(c))), max_size=6))
    return Codec(draw(NODE_IDS)).batch(inner)


def messages_of(spec: MessageSpec) -> st.SearchStrategy[Message]:
    if spec.cls is WorkerRequest:
        return worker_requests()
    if spec.cls is MessageBatch:
        return message_batches()
    hints = typing.get_type_hints(spec.cls, include_extras=True)
    fields = {name: header_strategy(ct) for name, ct in spec.header_fields}
    for f in msgspec.structs.fields(spec.cls):
        if f.name in spec.body_fields:
            values = strategy_for(hints[f.name])
            if not f.required:  # sometimes leave it at its default
                default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
                values = st.just(default) | values
            fields[f.name] = values
    return st.builds(spec.cls, **fields)


any_message = st.sampled_from(SPECS).flatmap(messages_of)


def normalized(message: Message) -> Message:
    """Raw payloads decode as memoryviews of the frame: compare their bytes."""
    spec = _spec(type(message))
    changes = {p: bytes(getattr(message, p)) for p in spec.payload_fields if getattr(message, p) is not None}
    return msgspec.structs.replace(message, **changes) if changes else message


def as_received(frames: list, kind: str) -> list:
    if kind == "frame":
        return [zmq.Frame(bytes(f)) for f in frames]
    if kind == "memoryview":
        return [memoryview(bytes(f)) for f in frames]
    return frames


# ---- (a) round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), node_id=NODE_IDS, kind=st.sampled_from(["bytes", "frame", "memoryview"]))
def test_every_message_round_trips(spec, data, node_id, kind):
    message = data.draw(messages_of(spec), label="message")
    codec = Codec(node_id, LIMITS)
    frames = codec.encode(message)
    assert len(frames) == 1 + sum(
        1
        for p in spec.payload_fields
        if getattr(message, p) is not None and len(getattr(message, p)) >= LIMITS.inline_payload_bytes
    )
    sender, decoded = Codec(0, LIMITS).decode(as_received(frames, kind))
    assert sender == node_id
    assert type(decoded) is type(message)
    assert normalized(decoded) == normalized(message)


@settings(max_examples=100, **SETTINGS)
@given(messages=st.lists(any_message, min_size=1, max_size=6))
def test_one_codec_round_trips_a_sequence_of_messages(messages):
    """One codec (one scratch buffer) encoding messages of mixed types in turn."""
    codec = Codec(77, LIMITS)
    for message in messages:
        assert normalized(codec.decode(codec.encode(message))[1]) == normalized(message)


# ---- (b) nothing but ProtocolError escapes decode ------------------------------------------


def decodes_or_refuses(frames: list, limits: Limits = LIMITS) -> None:
    try:
        sender, message = Codec(1, limits).decode(frames)
    except ProtocolError as exc:
        assert exc.detail and isinstance(exc.reason, int)
        return
    assert 0 <= sender < 2**128 and isinstance(message, Message)


@settings(max_examples=300, **SETTINGS)
@given(frames=st.lists(st.binary(max_size=200), min_size=1, max_size=20), kind=st.sampled_from(["bytes", "frame", "memoryview"]))
def test_arbitrary_frames_raise_only_protocol_error(frames, kind):
    decodes_or_refuses(as_received(frames, kind))


@settings(max_examples=300, **SETTINGS)
@given(
    code=st.sampled_from([s.code for s in SPECS] + [0, 200, 255]),
    version=st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2]),
    header_length=st.sampled_from(sorted({s.header_length for s in SPECS}) + [0, 27, 2**64 - 1]),
    rest=st.binary(max_size=200),
    raw=st.lists(st.binary(max_size=100), max_size=4),
)
def test_plausible_headers_with_arbitrary_rest_raise_only_protocol_error(code, version, header_length, rest, raw):
    """Arbitrary bytes rarely get past the magic; these start with a generic header."""
    frame0 = GENERIC_STRUCT.pack(MAGIC, version, code, 1, 2, header_length) + rest
    decodes_or_refuses([frame0, *raw])


@settings(max_examples=200, **SETTINGS)
@given(
    spec=st.sampled_from([s for s in SPECS if s.body_decoder is not None]),
    data=st.data(),
    raw=st.lists(st.binary(max_size=100), max_size=3),
)
def test_valid_headers_with_arbitrary_msgpack_bodies_raise_only_protocol_error(spec, data, raw):
    """Well-formed MessagePack of the wrong shape: the schema check must say so."""
    message = data.draw(messages_of(spec))
    head = Codec(1, LIMITS).encode(message)[0][: spec.header_length]
    body = data.draw(st.lists(json_like, max_size=len(spec.body_fields) + 2) | json_like)
    decodes_or_refuses([head + msgspec.msgpack.encode(body), *raw])


def _flip(data: bytes, positions: list[int], masks: list[int]) -> bytes:
    out = bytearray(data)
    for p, m in zip(positions, masks):
        if out:
            out[p % len(out)] ^= m
    return bytes(out)


@st.composite
def mutated_encodings(draw) -> list:
    message = draw(any_message)
    frames = [bytes(f) for f in Codec(draw(NODE_IDS), LIMITS).encode(message)]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["flip", "truncate", "extend", "header", "body", "drop", "add", "raw"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if what == "flip" and frames:
            n = draw(st.integers(1, 4))
            positions = draw(st.lists(st.integers(0, 2**16), min_size=n, max_size=n))
            masks = draw(st.lists(st.integers(1, 255), min_size=n, max_size=n))
            frames[i] = _flip(frames[i], positions, masks)
        elif what == "truncate" and frames:
            frames[i] = frames[i][: draw(st.integers(0, max(len(frames[i]) - 1, 0)))]
        elif what == "extend" and frames:
            frames[i] = frames[i] + draw(st.binary(min_size=1, max_size=40))
        elif what == "header" and frames and len(frames[0]) >= GENERIC_SIZE:
            fields = list(GENERIC_STRUCT.unpack_from(frames[0]))
            j = draw(st.integers(0, 5))
            fields[j] = draw(st.integers(0, [2**16 - 1, 255, 255, 2**64 - 1, 2**64 - 1, 2**64 - 1][j]))
            frames[0] = GENERIC_STRUCT.pack(*fields) + frames[0][GENERIC_SIZE:]
        elif what == "body" and frames:
            code = frames[0][3] if len(frames[0]) > 3 else 0
            hl = next((s.header_length for s in SPECS if s.code == code), GENERIC_SIZE)
            frames[0] = frames[0][:hl] + draw(st.binary(max_size=60))
        elif what == "drop" and frames:
            del frames[i]
        elif what == "add":
            frames.insert(draw(st.integers(0, len(frames))), draw(st.binary(max_size=80)))
        elif what == "raw" and frames and len(frames[0]) > 0:
            # swap a byte of the specific header for one more likely to matter (0, 1, 0xff)
            j = draw(st.integers(GENERIC_SIZE, max(len(frames[0]) - 1, GENERIC_SIZE)))
            if j < len(frames[0]):
                b = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xC1, 0xFF, 0xA1, 0x91, 0xDD]))
                frames[0] = frames[0][:j] + bytes([b]) + frames[0][j + 1 :]
    return frames


@settings(max_examples=400, **SETTINGS)
@given(frames=mutated_encodings(), kind=st.sampled_from(["bytes", "frame"]))
def test_mutated_encodings_raise_only_protocol_error(frames, kind):
    if not frames:
        with pytest.raises(ProtocolError):
            Codec(1, LIMITS).decode(frames)
        return
    decodes_or_refuses(as_received(frames, kind))


@settings(max_examples=100, **SETTINGS)
@given(frames=mutated_encodings())
def test_mutated_encodings_under_tight_limits_raise_only_protocol_error(frames):
    decodes_or_refuses(frames, Limits(max_message_bytes=300, max_frame0_bytes=120, max_frames=2, inline_payload_bytes=64))


@settings(max_examples=100, **SETTINGS)
@given(
    spec=st.sampled_from([s for s in SPECS if s.body_decoder is not None]),
    # array headers and leading fields that get a nested value into a dict[str, Any] field
    prefix=st.sampled_from([b"", b"\x94\xa1w\xa11\x80\x81\xa1a", b"\x92\xa1k\x81\xa1a", b"\x81\xa1a"])
    | st.binary(max_size=10),
    token=st.sampled_from([b"\x91", b"\x81\xa1a", b"\xdc\x00\x01", b"\x81\x91"]),
    depth=st.sampled_from([2, 900, 3000, 20_000]) | st.integers(1, 200),
)
def test_deeply_nested_bodies_raise_only_protocol_error(spec, prefix, token, depth):
    head = GENERIC_STRUCT.pack(MAGIC, PROTOCOL_VERSION, spec.code, 0, 0, spec.header_length)
    head += b"\x00" * (spec.header_length - GENERIC_SIZE)
    decodes_or_refuses([head + prefix + token * depth + b"\xc0"])


def test_header_struct_matches_generic_layout():
    assert GENERIC_STRUCT.format in ("<HBBQQQ", b"<HBBQQQ") and struct.calcsize("<HBBQQQ") == GENERIC_SIZE


@settings(max_examples=200, **SETTINGS)
@given(batch=message_batches(), node_id=NODE_IDS)
def test_a_batch_unpacks_to_its_messages_in_order(batch, node_id):
    """What rides a MESSAGE_BATCH comes out of it unchanged, in order, from its sender."""
    codec = Codec(node_id, LIMITS)
    _, received = codec.decode(codec.encode(batch))
    items = codec.unbatch(received)
    assert len(items) == batch.count
    for item, raw in zip(items, batch.items):
        assert not isinstance(item, ProtocolError)
        sender, message = item
        assert Codec(sender, LIMITS).encode(message)[0] == raw


@settings(max_examples=300, **SETTINGS)
@given(items=st.lists(st.binary(max_size=120), max_size=8))
def test_arbitrary_batch_items_raise_nothing_and_refuse_each_alone(items):
    """Whatever bytes a batch's items hold, unbatch answers one result per item, never raises."""
    out = Codec(1).unbatch(MessageBatch(len(items), items))
    assert len(out) == len(items)
    assert all(isinstance(x, ProtocolError) or type(x[1]) in BATCHABLE for x in out)
