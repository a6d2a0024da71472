"""The codec, frame by frame: every refusal reason, encode errors, evolution, payload placement.

Each malformation starts from a valid encoding and changes exactly one thing, so a test fails
for the reason it names and not for an earlier check. No sockets here (see test_codec_socket.py).
"""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest
import zmq

from proto import (
    CATALOGUE,
    GENERIC_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    SPECS,
    Codec,
    EncodeError,
    Limits,
    Message,
    ProtocolError,
    Reason,
    new_node_id,
    spec_by_code,
    spec_for,
)
from proto.codec import GENERIC_STRUCT
from proto.messages import BATCH_MAX_BYTES, BATCH_MAX_ITEMS
from proto.messages import (
    Attach,
    Attached,
    CancelJob,
    Credit,
    JobList,
    JobQuery,
    QueryReply,
    TaskQuery,
    Error,
    FileChunk,
    FileList,
    FileLookup,
    FileRegister,
    FileRelease,
    UploadCredit,
    UploadDone,
    UploadOpen,
    UploadReady,
    FileRequest,
    FileResponse,
    ActFor,
    TaskWaiting,
    OutputFollow,
    OutputLines,
    Heartbeat,
    NotLeader,
    ResultAck,
    StatusQuery,
    StatusReply,
    Submit,
    SubmitAck,
    TaskResult,
    MessageBatch,
    PeerState,
    Watch,
    Work,
    WorkerRequest,
    WorkerStatus,
)

NODE = 0x0123456789ABCDEF_FEDCBA9876543210
FILE_ID = bytes(range(16))

SAMPLES: dict[type[Message], Message] = {
    Error: Error(7, int(Reason.BAD_BODY), 20, "bad body", {"why": "test"}),
    StatusQuery: StatusQuery(8),
    StatusReply: StatusReply(9, 1000, 4242, "worker", "0.1.0", {"tasks": 3}, {"slots": [1, 2]}),
    Heartbeat: Heartbeat(3, 17, 1),
    ActFor: ActFor("alice", [b"\x01\x02", b"raw"]),
    TaskWaiting: TaskWaiting(3, [[bytes(range(16)), 3, "no worker has 64 cores (the most is 2)"]]),
    OutputFollow: OutputFollow(4, 1, 2, 3, 0),
    OutputLines: OutputLines(4, 2, 0, 0, [[1, 1790000000.25, 1, "line 1"], [2, 1790000000.5, 2, "oops"]]),
    Submit: Submit(10, 11, 12, "smith-waterman", {"query": "ACGT", "n": 2}),
    SubmitAck: SubmitAck(10, 13, 14, 99),
    NotLeader: NotLeader(10, 5, "tcp://127.0.0.1:5555"),
    CancelJob: CancelJob(10, 1, 2, "no longer needed"),
    JobQuery: JobQuery(10, 1, 2),
    JobList: JobList(10, 50, "active"),
    TaskQuery: TaskQuery(10, 1, 2, 399),
    QueryReply: QueryReply(10, 1, 3, 120, {"job": "ab", "done": 3}, "tcp://127.0.0.1:5555"),
    Attach: Attach(10, 2, 64, "balancer-a"),
    Attached: Attached(10, 3, 7, "m1"),
    WorkerRequest: WorkerRequest(1, 2, 3, 4, 5, 4, 2, "sw", b"prog", [FILE_ID, FILE_ID[::-1]], {"k": 1}),
    TaskResult: TaskResult(1, 2, 3, 4, 5, 0, -1, {"score": 12.5}, FILE_ID, None, "w1",
                           [[FILE_ID, 10, ["s1"], "out.txt"]]),
    ResultAck: ResultAck(1, 2, 3, 4, 5),
    WorkerStatus: WorkerStatus(8, 3, 2**33, 5, ["gpu"], {"simd": True}, "w1", True, 12,
                               [[b"j" * 16, 3, 2, 7]], [FILE_ID], []),
    Watch: Watch(11, 5000, {b"j" * 16: 3}),
    Work: Work(12, "add_units", "fetch", [["url-1", b"http://x/1"]], b"k" * 16),
    PeerState: PeerState(3, 1_700_000_000_000, 42, "b1", "tcp://127.0.0.1:5570", 2, 123_456_789),
    MessageBatch: Codec(7).batch([Credit(3, 4, 0), ResultAck(1, 2, 3, 4, 5)]),
    Credit: Credit(1, 4096, 1),
    FileRequest: FileRequest(1, 2, 3, 0, 4096),
    FileResponse: FileResponse(1, 2, 3, 0, 10, 0, b"0123456789", None),
    FileChunk: FileChunk(5, 0, 1, b"chunk"),
    UploadOpen: UploadOpen(6, 1, 2, 3 * 2**20, 2, "client:7"),
    UploadReady: UploadReady(6, 9, 2**20, 8 * 2**20),
    UploadCredit: UploadCredit(9, 2**20),
    UploadDone: UploadDone(6, 9, 1, 2, 3 * 2**20, 0, ["s1", "s2"], None),
    FileRegister: FileRegister(7, 1, 2, 42, 1, ["s1", "s2"], b"j" * 16, "pseudocat.fa"),
    FileLookup: FileLookup(8, [b"a" * 16, b"b" * 16]),
    FileList: FileList(9, 100, b"j" * 16, None),
    FileRelease: FileRelease(10, b"f" * 16, None),
}


def codec(**limits) -> Codec:
    return Codec(NODE, Limits(**limits)) if limits else Codec(NODE)


def frame0(message: Message, c: Codec | None = None) -> bytes:
    frames = (c or codec()).encode(message)
    assert len(frames) == 1, "the base message should fit in frame 0"
    return frames[0]


def headers_and_body(message: Message) -> tuple[bytes, bytes]:
    f0 = frame0(message)
    hl = spec_for(message).header_length
    return f0[:hl], f0[hl:]


def refused(frames, reason: Reason, *fragments: str, c: Codec | None = None) -> ProtocolError:
    """Decode must refuse ``frames`` for ``reason`` with a sentence mentioning ``fragments``."""
    with pytest.raises(ProtocolError) as info:
        (c or codec()).decode(frames)
    exc = info.value
    assert exc.reason is reason, f"expected {reason.name}, got {exc.reason.name}: {exc.detail}"
    assert isinstance(exc.detail, str) and len(exc.detail) >= 15 and " " in exc.detail, exc.detail
    assert str(exc) == f"{reason.name}: {exc.detail}"
    for fragment in fragments:
        assert fragment in exc.detail, f"{fragment!r} not in {exc.detail!r}"
    return exc


def test_every_catalogue_type_has_a_sample():
    assert set(SAMPLES) == set(CATALOGUE) == {s.cls for s in SPECS}


@pytest.mark.parametrize("cls", CATALOGUE, ids=lambda c: c.__name__)
def test_samples_round_trip(cls):
    c = codec()
    assert c.decode(c.encode(SAMPLES[cls])) == (NODE, SAMPLES[cls])


# ---- the generic header layout ---------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_generic_header_layout(spec):
    f0 = frame0(SAMPLES[spec.cls])
    assert GENERIC_SIZE == 28
    assert f0[0:2] == b"CZ" and MAGIC == int.from_bytes(b"CZ", "little")
    assert f0[2] == PROTOCOL_VERSION == 1
    assert f0[3] == spec.code
    assert int.from_bytes(f0[4:12], "little") == NODE >> 64
    assert int.from_bytes(f0[12:20], "little") == NODE & (2**64 - 1)
    assert int.from_bytes(f0[20:28], "little") == spec.header_length
    sizes = sum(struct.calcsize("<" + ct.struct_code) for _, ct in spec.header_fields)
    assert spec.header_length == GENERIC_SIZE + sizes
    # the type-specific header holds the header fields, packed little-endian, in order
    values = struct.unpack_from("<" + "".join(ct.struct_code for _, ct in spec.header_fields), f0, GENERIC_SIZE)
    assert values == tuple(getattr(SAMPLES[spec.cls], name) for name, _ in spec.header_fields)
    if spec.body_decoder is None:
        assert len(f0) == spec.header_length
    else:
        assert len(f0) > spec.header_length
    assert spec_by_code(spec.code) is spec and spec_for(spec.cls) is spec


@pytest.mark.parametrize("node_id", [0, 1, 2**64 - 1, 2**64, 2**127 + 5, 2**128 - 1, NODE])
def test_sender_node_id_round_trips(node_id):
    c = Codec(node_id)
    frames = c.encode(Heartbeat(1, 2, 0))
    assert struct.unpack_from("<QQ", frames[0], 4) == (node_id >> 64, node_id & (2**64 - 1))
    sender, message = codec().decode(frames)  # a different node decodes it
    assert sender == node_id and message == Heartbeat(1, 2, 0)


def test_random_node_ids_are_128_bit_and_round_trip():
    ids = {new_node_id() for _ in range(20)}
    assert len(ids) == 20 and all(0 <= i < 2**128 for i in ids)
    for i in ids:
        assert codec().decode(Codec(i).encode(StatusQuery(1)))[0] == i


@pytest.mark.parametrize("bad", [-1, 2**128])
def test_node_id_must_be_128_bit(bad):
    with pytest.raises(ValueError, match="128-bit"):
        Codec(bad)


# ---- every reason decode() can raise -------------------------------------------------------


def test_short_frame_truncated_type_specific_header():
    f0 = frame0(Heartbeat(1, 2, 0))
    exc = refused([f0[:30]], Reason.SHORT_FRAME, "30 bytes", "HEARTBEAT", str(spec_for(Heartbeat).header_length))
    assert exc.message_type == Heartbeat.code


def test_short_frame_truncated_generic_header():
    f0 = frame0(Heartbeat(1, 2, 0))
    refused([f0[:10]], Reason.SHORT_FRAME, "10 bytes", "needs")
    refused([f0[:3]], Reason.SHORT_FRAME, "3 bytes", "generic header", "28")


def test_short_frame_no_frames_at_all():
    refused([], Reason.SHORT_FRAME, "no frame 0")


def test_long_frame_bytes_after_a_bodyless_type():
    f0 = frame0(Heartbeat(1, 2, 0))
    exc = refused([f0 + b"\x90\x00"], Reason.LONG_FRAME, "2 bytes", "HEARTBEAT", "no body")
    assert exc.message_type == Heartbeat.code


def test_bad_magic():
    f0 = frame0(Heartbeat(1, 2, 0))
    refused([b"XY" + f0[2:]], Reason.BAD_MAGIC, "5859", "CZ", "not a cluster message")
    refused([b"GET / HTTP/1.1\r\n\r\n"], Reason.BAD_MAGIC, "not a cluster message")
    refused([b""], Reason.BAD_MAGIC, "nothing")


def test_bad_version():
    f0 = bytearray(frame0(Heartbeat(1, 2, 0)))
    f0[2] = 2
    refused([bytes(f0)], Reason.BAD_VERSION, "version 2", f"speaks {PROTOCOL_VERSION}")


def test_unknown_type():
    f0 = bytearray(frame0(Heartbeat(1, 2, 0)))
    f0[3] = 200
    exc = refused([bytes(f0)], Reason.UNKNOWN_TYPE, "200", "catalogue")
    assert exc.message_type == 200


def test_header_length_disagrees():
    f0 = frame0(SAMPLES[StatusReply])
    spec = spec_for(StatusReply)
    magic, version, mtype, hi, lo, hl = GENERIC_STRUCT.unpack_from(f0)
    assert hl == spec.header_length
    for wrong in (hl + 1, hl - 8, 0, 2**64 - 1):
        bad = GENERIC_STRUCT.pack(magic, version, mtype, hi, lo, wrong) + f0[GENERIC_SIZE:]
        exc = refused([bad], Reason.HEADER_LENGTH, f"header_length is {wrong}", f"STATUS_REPLY headers are {hl} bytes")
        assert exc.message_type == StatusReply.code


def test_bad_body_not_msgpack():
    head, _ = headers_and_body(SAMPLES[StatusReply])
    assert refused([head + b"\xc1"], Reason.BAD_BODY, "STATUS_REPLY body").field is None  # 0xc1 is never used in msgpack
    assert refused([head + b"\x94\xa4wor"], Reason.BAD_BODY, "STATUS_REPLY body").field is None  # truncated


def test_bad_body_trailing_garbage_after_the_body():
    head, body = headers_and_body(SAMPLES[StatusReply])
    refused([head + body + b"\x00"], Reason.BAD_BODY, "STATUS_REPLY body")


def test_bad_body_wrong_field_type_names_the_field():
    head, _ = headers_and_body(SAMPLES[StatusReply])
    body = msgspec.msgpack.encode([12, "0.1", {}, {}])
    exc = refused([head + body], Reason.BAD_BODY, "`role`")
    assert exc.message_type == StatusReply.code
    assert exc.field == "role"
    body = msgspec.msgpack.encode(["worker", "0.1", {"tasks": "three"}, {}])
    assert refused([head + body], Reason.BAD_BODY, "STATUS_REPLY body").field == "counters"


def test_bad_body_not_an_array():
    head, _ = headers_and_body(SAMPLES[StatusReply])
    assert refused([head + msgspec.msgpack.encode({"role": "w"})], Reason.BAD_BODY).field is None


def test_bad_body_missing_required_field():
    head, _ = headers_and_body(SAMPLES[StatusReply])
    exc = refused([head + msgspec.msgpack.encode(["worker"])], Reason.BAD_BODY, "STATUS_REPLY body")
    assert exc.message_type == StatusReply.code


def test_bad_body_absent_where_the_type_needs_one():
    head, _ = headers_and_body(SAMPLES[StatusReply])
    refused([head], Reason.BAD_BODY, "STATUS_REPLY has no body", "role")


def test_bad_body_invalid_utf8_is_a_protocol_error():
    """Regression: msgspec raises UnicodeDecodeError (not a DecodeError) for a str that is not
    UTF-8; it used to escape decode(). The refusal names the field, whatever msgspec's words."""
    head, _ = headers_and_body(SAMPLES[StatusReply])
    assert refused([head + b"\x94\xa1\xff\xa11\x80\x80"], Reason.BAD_BODY, "STATUS_REPLY body", "`role`").field == "role"
    assert refused([head + b"\x94\xa1w\xa11\x80\x81\xa1\xff\x01"], Reason.BAD_BODY).field == "detail"  # a key
    assert refused([head + b"\x94\xa1w\xa11\x80\x81\xa1a\xa2\xc3\x28"], Reason.BAD_BODY).field == "detail"  # a value


def test_bad_body_nested_too_deeply_is_a_protocol_error():
    """Regression: a dict[str, Any] nested thousands deep made msgspec raise RecursionError,
    which used to escape decode()."""
    head, _ = headers_and_body(SAMPLES[StatusReply])
    body = b"\x94\xa1w\xa11\x80\x81\xa1a" + b"\x91" * 100_000 + b"\xc0"
    refused([head + body], Reason.BAD_BODY, "STATUS_REPLY body", "recursion")
    # and the codec is fine afterwards
    assert codec().decode(codec().encode(SAMPLES[StatusReply]))[1] == SAMPLES[StatusReply]


def test_too_many_frames_for_a_type_without_payloads():
    f0 = frame0(Heartbeat(1, 2, 0))
    exc = refused([f0, b"extra"], Reason.TOO_MANY_FRAMES, "1 raw frames", "HEARTBEAT", "carries none")
    assert exc.message_type == Heartbeat.code
    refused([frame0(SAMPLES[StatusReply]), b"x", b"y"], Reason.TOO_MANY_FRAMES, "2 raw frames", "STATUS_REPLY")


def test_too_many_frames_payload_inline_yet_raw_frames_follow():
    f0 = frame0(FileChunk(1, 0, 1, b"small"))
    refused([f0, b"stray"], Reason.TOO_MANY_FRAMES, "1 raw frames", "FILE_CHUNK", "refers to 0")


def test_too_many_frames_more_raw_frames_than_referred_to():
    c = codec(inline_payload_bytes=64)
    frames = c.encode(FileChunk(1, 0, 1, b"x" * 100))
    assert len(frames) == 2
    refused([*frames, b"stray"], Reason.TOO_MANY_FRAMES, "2 raw frames", "refers to 1", c=c)


def test_missing_frames_payload_refers_to_a_raw_frame_that_did_not_come():
    c = codec(inline_payload_bytes=64)
    frames = c.encode(FileChunk(1, 0, 1, b"x" * 100))
    assert len(frames) == 2
    exc = refused(frames[:1], Reason.MISSING_FRAMES, "FILE_CHUNK.payload", "raw frame 1", "has 0", c=c)
    assert exc.message_type == FileChunk.code


def test_payload_referring_to_the_wrong_raw_frame_index():
    head, _ = headers_and_body(FileChunk(1, 0, 1, b"x"))
    for ref in (0, 2, -1):
        refused([head + msgspec.msgpack.encode([ref]), b"payload"], Reason.BAD_BODY, f"raw frame {ref}", "expected 1")


def test_too_many_frames_over_the_limit():
    c = codec(max_frames=3)
    f0 = frame0(Heartbeat(1, 2, 0))
    exc = refused([f0, b"a", b"b", b"c"], Reason.TOO_MANY_FRAMES, "4 frames", "limit is 3", c=c)
    assert exc.message_type == 0  # refused before frame 0 was read


def test_too_large_message():
    c = codec(max_message_bytes=200, inline_payload_bytes=64)
    frames = c.encode(FileChunk(1, 0, 1, b"x" * 300))
    assert len(frames) == 2
    refused(frames, Reason.TOO_LARGE, "bytes", "limit is 200", c=c)


def test_too_large_frame0():
    c = codec(max_frame0_bytes=100)
    message = StatusReply(1, 2, 3, "worker", "1", {}, {"blob": "x" * 200})
    refused(c.encode(message), Reason.TOO_LARGE, "frame 0", "limit is 100", c=c)


def test_limits_allow_exactly_the_limit():
    message = FileChunk(1, 0, 1, b"x" * 100)
    frames = codec(inline_payload_bytes=64).encode(message)
    total = sum(len(f) for f in frames)
    c = codec(max_message_bytes=total, max_frame0_bytes=len(frames[0]), max_frames=2, inline_payload_bytes=64)
    assert bytes(c.decode(frames)[1].payload) == b"x" * 100


def test_decode_reasons_cover_every_decode_reason():
    """Every reason decode() can raise has a test above; UNEXPECTED is the application's."""
    tested = {
        Reason.SHORT_FRAME, Reason.LONG_FRAME, Reason.BAD_MAGIC, Reason.BAD_VERSION, Reason.UNKNOWN_TYPE,
        Reason.HEADER_LENGTH, Reason.BAD_BODY, Reason.TOO_MANY_FRAMES, Reason.MISSING_FRAMES, Reason.TOO_LARGE,
    }  # fmt: skip
    not_decodes = {r for r in Reason if r.name in ("NO_ENVELOPE", "UNEXPECTED")}
    assert set(Reason) - tested == not_decodes


# ---- WORKER_REQUEST consistency ------------------------------------------------------------


def _worker_request_frame(program_length: int, num_input_files: int, body: list) -> bytes:
    spec = spec_for(WorkerRequest)
    good = frame0(SAMPLES[WorkerRequest])
    h = list(spec.struct.unpack_from(good))
    h[-2], h[-1] = program_length, num_input_files
    return spec.struct.pack(*h) + msgspec.msgpack.encode(body)


def test_worker_request_consistent_by_hand_decodes():
    f0 = _worker_request_frame(4, 1, ["sw", b"prog", [FILE_ID], {}])
    message = codec().decode([f0])[1]
    assert message.program == b"prog" and message.input_files == [FILE_ID] and message.problem() is None


@pytest.mark.parametrize(
    ("program_length", "num_input_files", "body", "fragment"),
    [
        (5, 1, ["sw", b"prog", [FILE_ID], {}], "program_length is 5, the program has 4 bytes"),
        (4, 2, ["sw", b"prog", [FILE_ID], {}], "num_input_files is 2, the body lists 1"),
        (4, 0, ["sw", b"prog", [FILE_ID], {}], "num_input_files is 0, the body lists 1"),
        (4, 1, ["sw", b"prog", [b"short"], {}], "input_files[0] is not a 16-byte file id"),
    ],
)
def test_worker_request_inconsistent_on_decode(program_length, num_input_files, body, fragment):
    exc = refused([_worker_request_frame(program_length, num_input_files, body)], Reason.BAD_BODY, "WORKER_REQUEST", fragment)
    assert exc.message_type == WorkerRequest.code


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"program_length": 3}, "program_length is 3, the program has 4 bytes"),
        ({"num_input_files": 3}, "num_input_files is 3, the body lists 2"),
        ({"input_files": [FILE_ID, b"x" * 15]}, "input_files[1] is not a 16-byte file id"),
    ],
)
def test_worker_request_inconsistent_on_encode(changes, fragment):
    message = msgspec.structs.replace(SAMPLES[WorkerRequest], **changes)
    with pytest.raises(EncodeError, match="WORKER_REQUEST") as info:
        codec().encode(message)
    assert fragment in str(info.value)


# ---- EncodeError ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (Heartbeat(-1, 0, 0), "header field epoch=-1 does not fit uint64_t"),
        (Heartbeat(0, 2**64, 0), "header field sequence=18446744073709551616 does not fit uint64_t"),
        (Heartbeat(0, 0, 256), "header field reply=256 does not fit uint8_t"),
        (TaskResult(1, 2, 3, 4, 5, 0, 2**31, {}), "header field exit_code=2147483648 does not fit int32_t"),
        (StatusReply(1, 2, 2**32, "w", "1", {}), "header field pid=4294967296 does not fit uint32_t"),
        (Credit(1, 2, -1), "header field unit=-1 does not fit uint8_t"),
    ],
)
def test_encode_error_header_out_of_range(message, fragment):
    with pytest.raises(EncodeError) as info:
        codec().encode(message)
    assert fragment in str(info.value) and spec_for(message).name in str(info.value)


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (Heartbeat("1", 0, 0), "header field epoch must be a number, got str"),
        (StatusQuery(None), "header field request_id must be a number, got NoneType"),
        (FileRequest(1, 2, 3, 4, b"5"), "header field length must be a number, got bytes"),
        (StatusReply(1, 2, 3, "w", "1", {"c": object()}), "STATUS_REPLY"),  # body: not encodable
        (Submit(1, 2, 3, "k", {"n": 2**70}), "SUBMIT"),  # body: int over 64 bits
        (FileChunk(1, 0, 1, "not a buffer"), "FILE_CHUNK"),  # payload: not a buffer
        (FileChunk(1, 0, 1, 12345), "FILE_CHUNK"),
    ],
)
def test_encode_error_wrong_types(message, fragment):
    with pytest.raises(EncodeError) as info:
        codec().encode(message)
    assert fragment in str(info.value)


def test_encode_error_non_catalogue_class():
    class Stranger(Message, frozen=True, gc=False):
        code = 250
        struct_name = "stranger"
        sender = receiver = "nobody"
        x: int = 0

    class MyHeartbeat(Heartbeat, frozen=True, gc=False):  # a subclass is not the catalogue's type
        pass

    for message in (Stranger(1), MyHeartbeat(1, 2, 0)):
        with pytest.raises(EncodeError, match="is not a message of the catalogue"):
            codec().encode(message)
        with pytest.raises(EncodeError, match="is not a message of the catalogue"):
            spec_for(message)
    assert spec_by_code(250) is None and spec_by_code(-1) is None and spec_by_code(1000) is None


def test_encode_error_non_contiguous_payload():
    array = np.arange(200, dtype=np.uint8).reshape(10, 20)[:, ::2]
    with pytest.raises(EncodeError, match="FILE_CHUNK.payload: payload must be contiguous"):
        codec(inline_payload_bytes=64).encode(FileChunk(1, 0, 1, array))


def test_encode_after_an_encode_error_is_clean():
    c = codec()
    with pytest.raises(EncodeError):
        c.encode(StatusReply(1, 2, 3, "w", "1", {"c": object()}))
    assert c.decode(c.encode(SAMPLES[StatusReply])) == (NODE, SAMPLES[StatusReply])


def test_one_codec_encodes_types_of_every_header_size_in_turn():
    """The scratch buffer for frame 0 is reused: a small message must not corrupt a large one."""
    c = codec(inline_payload_bytes=64)
    order = sorted(SAMPLES.values(), key=lambda m: spec_for(m).header_length)
    for message in order + order[::-1]:
        assert c.decode(c.encode(message)) == (NODE, message)


# ---- forward compatibility -----------------------------------------------------------------


def test_extra_trailing_body_elements_are_ignored():
    message = SAMPLES[StatusReply]
    head, _ = headers_and_body(message)
    body = msgspec.msgpack.encode(["worker", "0.1.0", {"tasks": 3}, {"slots": [1, 2]}, "new field", {"x": [1]}])
    assert codec().decode([head + body]) == (NODE, message)


def test_extra_trailing_elements_after_a_payload_are_ignored():
    message = FileChunk(5, 0, 1, b"chunk")
    head, _ = headers_and_body(message)
    assert codec().decode([head + msgspec.msgpack.encode([b"chunk", 1, 2, 3])])[1] == message


@pytest.mark.parametrize(
    ("message", "body"),
    [
        (StatusReply(9, 1000, 4242, "worker", "0.1.0", {"tasks": 3}), ["worker", "0.1.0", {"tasks": 3}]),
        (Error(7, 7, 20, "bad"), ["bad"]),
        (NotLeader(10, 5), []),
        (TaskResult(1, 2, 3, 4, 5, 0, -1, {"score": 1}), [{"score": 1}]),
        (TaskResult(1, 2, 3, 4, 5, 0, -1, {}, FILE_ID), [{}, FILE_ID]),
        (WorkerStatus(8, 3, 2**33, 5), []),
        (FileResponse(1, 2, 3, 0, 1, 0, b"x"), [b"x"]),
        (WorkerRequest(1, 2, 3, 4, 5, 1, 0, "sw", b"p", []), ["sw", b"p", []]),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Message) else "",
)
def test_missing_trailing_optional_fields_take_defaults(message, body):
    head, _ = headers_and_body(message)
    assert codec().decode([head + msgspec.msgpack.encode(body)]) == (NODE, message)


# ---- payload placement ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 63])
def test_small_payload_rides_inline(size):
    c = codec(inline_payload_bytes=64)
    payload = bytes(range(size))
    frames = c.encode(FileChunk(1, 0, 1, payload))
    assert len(frames) == 1 and frames[0].endswith(payload)
    decoded = c.decode(frames)[1]
    assert type(decoded.payload) is bytes and decoded.payload == payload


@pytest.mark.parametrize("size", [64, 65, 10_000])
def test_large_payload_goes_to_a_raw_frame(size):
    c = codec(inline_payload_bytes=64)
    payload = bytes(i % 251 for i in range(size))
    frames = c.encode(FileChunk(1, 0, 1, payload))
    assert len(frames) == 2 and frames[1] is payload  # handed to zmq as is, for copy=False
    assert frames[0][spec_for(FileChunk).header_length :] == msgspec.msgpack.encode([1])
    assert bytes(c.decode(frames)[1].payload) == payload


def test_default_inline_threshold_is_pyzmqs_copy_threshold():
    assert Limits().inline_payload_bytes == zmq.COPY_THRESHOLD
    c = codec()
    assert len(c.encode(FileChunk(1, 0, 1, b"x" * (zmq.COPY_THRESHOLD - 1)))) == 1
    assert len(c.encode(FileChunk(1, 0, 1, b"x" * zmq.COPY_THRESHOLD))) == 2


def test_none_payload_round_trips():
    c = codec(inline_payload_bytes=64)
    message = FileResponse(1, 2, 3, 0, 0, 1, None, "not found")
    frames = c.encode(message)
    assert len(frames) == 1 and c.decode(frames) == (NODE, message)


def test_raw_payload_from_a_zmq_frame_is_a_view_of_that_frame():
    c = codec(inline_payload_bytes=64)
    payload = bytes(range(256)) * 4
    f0, raw = c.encode(FileResponse(1, 2, 3, 0, len(payload), 0, payload))
    frame = zmq.Frame(raw)
    message = c.decode([zmq.Frame(f0), frame])[1]
    assert isinstance(message.payload, memoryview)
    assert message.payload.obj is frame  # no copy: the memory is the frame's
    frame_view = np.frombuffer(frame.buffer, np.uint8)
    assert np.shares_memory(np.frombuffer(message.payload, np.uint8), frame_view)
    assert message.payload.tobytes() == payload and message.payload.nbytes == len(payload)


def test_inline_payload_from_a_zmq_frame_is_bytes():
    c = codec(inline_payload_bytes=64)
    message = c.decode([zmq.Frame(c.encode(FileChunk(1, 0, 1, b"tiny"))[0])])[1]
    assert type(message.payload) is bytes and message.payload == b"tiny"


@pytest.mark.parametrize(
    "array",
    [
        np.arange(300, dtype=np.float64).reshape(3, 100),
        np.arange(1000, dtype=np.int32),
        np.arange(64, dtype=np.uint8),
        np.linspace(0, 1, 4),  # 32 bytes: inline
        np.array([[1, 2], [3, 4]], dtype=np.int16),  # 8 bytes, 2-D: inline as its bytes
    ],
    ids=["f64-2d-raw", "i32-raw", "u8-at-threshold", "f64-inline", "i16-2d-inline"],
)
def test_numpy_array_payload_round_trips(array):
    c = codec(inline_payload_bytes=64)
    frames = c.encode(FileChunk(1, 0, 1, array))
    assert len(frames) == (2 if array.nbytes >= 64 else 1)
    on_wire = [zmq.Frame(f) for f in frames]  # as a receiver would get them
    payload = c.decode(on_wire)[1].payload
    back = np.frombuffer(payload, dtype=array.dtype).reshape(array.shape)
    np.testing.assert_array_equal(back, array)


def test_bytearray_and_memoryview_payloads_round_trip():
    c = codec(inline_payload_bytes=64)
    for payload in (bytearray(b"ab" * 10), memoryview(b"cd" * 10), bytearray(b"e" * 100), memoryview(b"f" * 100)):
        assert bytes(c.decode(c.encode(FileChunk(1, 0, 1, payload)))[1].payload) == bytes(payload)


def test_decode_accepts_memoryviews_and_bytearrays():
    c = codec(inline_payload_bytes=64)
    frames = c.encode(FileChunk(1, 0, 1, b"z" * 100))
    decoded = c.decode([memoryview(frames[0]), bytearray(frames[1])])[1]
    assert bytes(decoded.payload) == b"z" * 100


def test_wrong_typed_field_in_a_checked_message_is_an_encode_error():
    from proto.messages import WorkerRequest

    with pytest.raises(EncodeError):
        Codec(1).encode(WorkerRequest(1, 2, 3, 4, 5, 0, 0, "call", None, []))


def test_size_limit_counts_bytes_of_numpy_frames_not_rows():
    import numpy as np
    from proto.messages import FileChunk

    frames = Codec(1, Limits(inline_payload_bytes=8)).encode(FileChunk(1, 0, 1, b"x" * 64))
    big = np.zeros((4, 1000), dtype=np.uint8)  # 4 rows, 4000 bytes
    with pytest.raises(ProtocolError) as info:
        Codec(1, Limits(max_message_bytes=1000)).decode([frames[0], big])
    assert info.value.reason == Reason.TOO_LARGE


# ---- MESSAGE_BATCH: many messages in one, each handled (and refused) alone --------------------


def test_a_batch_refuses_each_bad_item_alone_and_keeps_the_others():
    codec = Codec(7)
    good = [ResultAck(1, 2, 3, 4, 5), Credit(9, 2, 0)]
    nested = codec.encode(codec.batch(good))[0]
    not_batchable = codec.encode(SAMPLES[Submit])[0]
    garbage = b"CZ\x01\x15" + b"\x00" * 3
    items = [codec.encode(good[0])[0], nested, not_batchable, garbage, codec.encode(good[1])[0]]
    out = codec.unbatch(MessageBatch(len(items), items))
    assert [type(x[1]) if isinstance(x, tuple) else x.reason for x in out] == [
        ResultAck, Reason.UNEXPECTED, Reason.UNEXPECTED, Reason.SHORT_FRAME, Credit]
    assert out[1].message_type == MessageBatch.code and out[2].message_type == Submit.code
    assert [x[1] for x in (out[0], out[4])] == good
    assert out[0][0] == 7  # each item keeps its sender's node id


def test_a_batch_whose_count_disagrees_is_refused_whole():
    codec = Codec(7)
    frame0 = bytearray(codec.encode(codec.batch([Credit(1, 1, 0), Credit(2, 1, 0)]))[0])
    struct.pack_into("<I", frame0, GENERIC_SIZE, 3)  # the header's count
    with pytest.raises(ProtocolError) as err:
        codec.decode([bytes(frame0)])
    assert err.value.reason == Reason.BAD_BODY and err.value.message_type == MessageBatch.code


def test_only_the_task_paths_messages_may_be_batched():
    codec = Codec(7)
    with pytest.raises(EncodeError):
        codec.batch([SAMPLES[Submit]])
    with pytest.raises(EncodeError):
        codec.batch([Credit(1, 1, 0)] * (BATCH_MAX_ITEMS + 1))


def test_batch_cuts_respect_the_item_and_byte_limits():
    assert Codec.batch_cuts([10] * 5) == [(0, 5)]
    assert Codec.batch_cuts([10] * (BATCH_MAX_ITEMS + 1)) == [(0, BATCH_MAX_ITEMS), (BATCH_MAX_ITEMS, BATCH_MAX_ITEMS + 1)]
    big = BATCH_MAX_BYTES // 2 + 1
    assert Codec.batch_cuts([big, big, 5, BATCH_MAX_BYTES * 2]) == [(0, 1), (1, 3), (3, 4)]
