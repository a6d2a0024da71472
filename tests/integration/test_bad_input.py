"""Every ProtocolError reason, sent as that exact malformation over a real socket to a real node.

For each: the ERROR reply carries the reason code, the node logs exactly one line naming the
reason and the peer, the per-reason counter goes up by one, and the next well-formed message
from the same peer is served.
"""

from __future__ import annotations

import struct

import msgspec
import pytest

from proto import Codec, Limits, Reason, new_node_id
from proto.messages import Error, FileChunk, Heartbeat, StatusQuery, StatusReply, Submit

from .conftest import status_of, wait_for

MAX_MESSAGE = 4096  # the node under test refuses messages larger than this
codec = Codec(new_node_id())


def frame0(message) -> bytes:
    return codec.encode(message)[0]


def with_byte(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1 :]


def missing_frame() -> list[bytes]:
    frames = Codec(1, Limits(inline_payload_bytes=8)).encode(FileChunk(1, 0, 1, b"0123456789abcdef"))
    assert len(frames) == 2  # the payload went to raw frame 1 …
    return frames[:1]  # … which we do not send


def bad_body() -> list[bytes]:
    head = frame0(Submit(1, 2, 3, "job", {}))[:52]  # Submit's headers are 52 bytes
    return [head + msgspec.msgpack.encode(["job", "not a map"])]


CASES = {
    Reason.SHORT_FRAME: lambda: [frame0(StatusQuery(1))[:30]],
    Reason.LONG_FRAME: lambda: [frame0(Heartbeat(0, 1, 0)) + b"!"],
    Reason.BAD_MAGIC: lambda: [b"GET / HTTP/1.1\r\n\r\n"],
    Reason.BAD_VERSION: lambda: [with_byte(frame0(Heartbeat(0, 1, 0)), 2, 9)],
    Reason.UNKNOWN_TYPE: lambda: [with_byte(frame0(Heartbeat(0, 1, 0)), 3, 200)],
    Reason.HEADER_LENGTH: lambda: [(f := frame0(Heartbeat(0, 1, 0)))[:20] + struct.pack("<Q", 99) + f[28:]],
    Reason.BAD_BODY: bad_body,
    Reason.TOO_MANY_FRAMES: lambda: [frame0(Heartbeat(0, 1, 0)), b"extra frame"],
    Reason.MISSING_FRAMES: missing_frame,
    # each frame within the cap (a larger one is dropped by libzmq: see below), more in all
    Reason.TOO_LARGE: lambda: [frame0(Heartbeat(0, 1, 0)), b"x" * (3 * MAX_MESSAGE // 4), b"x" * (3 * MAX_MESSAGE // 4)],
    Reason.UNEXPECTED: lambda: [frame0(Submit(42, 2, 3, "job", {"a": 1}))],
}


def test_every_reason_has_a_case():
    assert set(CASES) == set(Reason)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from cluster.local import free_port, probe_node

    n = probe_node("target", tmp_path_factory.mktemp("bad-input"), free_port(), extra=["--max-message-bytes", str(MAX_MESSAGE)])
    n.start()
    try:
        n.wait_ready()
        yield n
    finally:
        assert n.stop() == 0, n.log_text()


def rejection_lines(node) -> list[str]:
    return [line for line in node.log_text().splitlines() if "rejected message from" in line]


@pytest.mark.parametrize("reason", list(CASES), ids=lambda r: r.name)
def test_malformed_message_is_refused_counted_logged_and_the_peer_still_served(node, client_for, reason):
    before = status_of(node).counters
    lines_before = rejection_lines(node)
    client = client_for(node)

    client.send_frames(CASES[reason]())

    reply = client.recv()
    assert isinstance(reply, Error), reply
    assert reply.reason == reason, reply.text
    assert reply.text.startswith(reason.name)
    if reason == Reason.UNEXPECTED:
        assert reply.request_id == 42 and reply.refers_to == Submit.code

    new = wait_for(lambda: rejection_lines(node)[len(lines_before):], what="the rejection log line")
    assert len(new) == 1, new
    assert reason.name in new[0] and "127.0.0.1" in new[0], new[0]

    after = status_of(node).counters
    key = f"rejected.{reason.name}"
    assert after.get(key, 0) == before.get(key, 0) + 1
    assert after["rejected_total"] == before.get("rejected_total", 0) + 1

    client.send(StatusQuery(request_id=7))  # the same peer, well-formed now
    served = client.recv()
    assert isinstance(served, StatusReply) and served.request_id == 7


def test_a_frame_over_the_largest_legal_one_closes_that_connection_and_nothing_else(node, client_for):
    """ZMQ_MAXMSGSIZE is the largest legal frame: libzmq drops a connection that sends a bigger
    one before buffering it, so no reply comes, and the node serves the next connection."""
    client = client_for(node)
    client.send_frames(codec.encode(FileChunk(1, 0, 1, b"x" * (2 * MAX_MESSAGE))))
    assert not client.sock.poll(1000), "an oversized frame got an answer"
    again = client_for(node)
    again.send(StatusQuery(request_id=8))
    served = again.recv()
    assert isinstance(served, StatusReply) and served.request_id == 8
