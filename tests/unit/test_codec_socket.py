"""Codec.recv over real ZeroMQ sockets: envelopes, raw frames, and staying in step after a refusal.

Every wait is a poll with a deadline; nothing sleeps.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import zmq

from proto import Codec, Limits, ProtocolError, Reason
from proto.messages import FileChunk, Heartbeat, StatusQuery, StatusReply

DEADLINE_MS = 5000
LIMITS = Limits(max_frames=4, inline_payload_bytes=64)
CLIENT_NODE = 0xC11E_0000_0000_0000_0000_0000_0000_0001
SERVER_NODE = 2**128 - 1
DEALER_ID = b"dealer-\x00\xff"


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def wait_readable(sock: zmq.Socket) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    assert dict(poller.poll(DEADLINE_MS)).get(sock) == zmq.POLLIN, "nothing arrived before the deadline"


def pair(ctx: zmq.Context, transport: str) -> tuple[zmq.Socket, zmq.Socket]:
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.linger = 0
    dealer.setsockopt(zmq.ROUTING_ID, DEALER_ID)
    if transport == "tcp":
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
    else:
        address = f"inproc://codec-{uuid.uuid4().hex}"
        router.bind(address)
        dealer.connect(address)
    return router, dealer


@pytest.fixture(params=["inproc", "tcp"])
def sockets(ctx, request):
    router, dealer = pair(ctx, request.param)
    return request.param, router, dealer


def recv(codec: Codec, sock: zmq.Socket, router: bool = True):
    wait_readable(sock)
    return codec.recv(sock, router=router, flags=zmq.NOBLOCK)


def refused(codec: Codec, sock: zmq.Socket, reason: Reason) -> ProtocolError:
    wait_readable(sock)
    with pytest.raises(ProtocolError) as info:
        codec.recv(sock, router=True, flags=zmq.NOBLOCK)
    exc = info.value
    assert exc.reason is reason, exc
    assert exc.route == DEALER_ID
    assert f"route {DEALER_ID.hex()}" in exc.peer
    return exc


def test_router_receives_the_route_and_can_answer(sockets):
    transport, router, dealer = sockets
    client, server = Codec(CLIENT_NODE, LIMITS), Codec(SERVER_NODE, LIMITS)
    client.send(dealer, StatusQuery(41))
    route, sender, message = recv(server, router)
    assert (route, sender, message) == (DEALER_ID, CLIENT_NODE, StatusQuery(41))
    reply = StatusReply(41, 5, 6, "probe", "1", {"in": 1})
    server.send(router, reply, route=route)
    assert recv(client, dealer, router=False) == (None, SERVER_NODE, reply)


def test_router_receives_raw_payload_frames(sockets):
    transport, router, dealer = sockets
    client, server = Codec(CLIENT_NODE, LIMITS), Codec(SERVER_NODE, LIMITS)
    payload = bytes(range(256)) * 40
    client.send(dealer, FileChunk(9, 0, 1, payload))
    route, sender, message = recv(server, router)
    assert route == DEALER_ID and sender == CLIENT_NODE
    assert isinstance(message.payload, memoryview) and message.payload == payload
    array = np.arange(500, dtype=np.float64)
    client.send(dealer, FileChunk(9, len(payload), 1, array))
    message = recv(server, router)[2]
    np.testing.assert_array_equal(np.frombuffer(message.payload, np.float64), array)


def test_malformed_messages_are_refused_and_the_socket_stays_in_step(sockets):
    transport, router, dealer = sockets
    client, server = Codec(CLIENT_NODE, LIMITS), Codec(SERVER_NODE, LIMITS)
    good = client.encode(Heartbeat(1, 1, 0))[0]

    dealer.send(b"not a cluster message")
    exc = refused(server, router, Reason.BAD_MAGIC)
    if transport == "tcp":
        assert "127.0.0.1" in exc.peer  # ZeroMQ knows the TCP peer's address

    dealer.send_multipart([good] + [b"raw"] * 10)  # over max_frames: drained whole
    exc = refused(server, router, Reason.TOO_MANY_FRAMES)
    assert "11 frames" in exc.detail and "limit is 4" in exc.detail

    dealer.send_multipart([good, b"raw"])  # under the limit, but HEARTBEAT carries no raw frames
    refused(server, router, Reason.TOO_MANY_FRAMES)

    dealer.send(client.encode(FileChunk(1, 0, 1, b"x" * 100))[0])  # its raw frame never sent
    refused(server, router, Reason.MISSING_FRAMES)

    dealer.send(good[:20])
    refused(server, router, Reason.SHORT_FRAME)

    client.send(dealer, Heartbeat(1, 2, 0))  # the next well-formed message arrives intact
    assert recv(server, router) == (DEALER_ID, CLIENT_NODE, Heartbeat(1, 2, 0))
    client.send(dealer, FileChunk(1, 0, 1, b"y" * 100))
    route, sender, message = recv(server, router)
    assert route == DEALER_ID and bytes(message.payload) == b"y" * 100
    assert router.poll(0) == 0  # nothing left over from the refused messages


def test_too_large_message_is_drained_whole(ctx):
    router, dealer = pair(ctx, "inproc")
    client = Codec(CLIENT_NODE, LIMITS)
    server = Codec(SERVER_NODE, Limits(max_message_bytes=1000, max_frames=4, inline_payload_bytes=64))
    client.send(dealer, FileChunk(1, 0, 0, b"z" * 5000))
    refused(server, router, Reason.TOO_LARGE)
    client.send(dealer, StatusQuery(2))
    assert recv(server, router) == (DEALER_ID, CLIENT_NODE, StatusQuery(2))


def test_routing_id_without_a_message_is_refused(ctx):
    """recv(router=True) on a socket whose first frame is all there is (no ROUTER would do this,
    so a DEALER stands in): refused, and the next enveloped message is read correctly."""
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for s in (a, b):
        s.linger = 0
    address = f"inproc://codec-{uuid.uuid4().hex}"
    a.bind(address)
    b.connect(address)
    codec = Codec(CLIENT_NODE, LIMITS)
    b.send(b"lonely-route")
    wait_readable(a)
    with pytest.raises(ProtocolError) as info:
        codec.recv(a, router=True, flags=zmq.NOBLOCK)
    assert info.value.reason.name in ("NO_ENVELOPE", "SHORT_FRAME")
    assert "routing id" in info.value.detail and info.value.route == b"lonely-route"
    b.send_multipart([b"route-2", codec.encode(Heartbeat(3, 4, 1))[0]])
    assert recv(codec, a) == (b"route-2", CLIENT_NODE, Heartbeat(3, 4, 1))


def test_received_raw_payload_is_a_read_only_view_of_the_sender_buffer_over_inproc():
    from proto.messages import FileChunk

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://readonly-payload")
        b.connect("inproc://readonly-payload")
        payload = bytes(200_000)
        Codec(1).send(a, FileChunk(1, 0, 1, payload))
        assert b.poll(5000)
        message = Codec(2).recv(b)[2]
        assert message.payload.readonly
        with pytest.raises(TypeError):
            message.payload[0] = 65
        assert payload[0] == 0
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
