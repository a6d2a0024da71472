"""Ask nodes for their status over the wire (STATUS_QUERY → STATUS_REPLY)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import zmq

from cluster.node import keys
from proto import Codec, ProtocolError, new_node_id
from proto.messages import Error, StatusQuery, StatusReply


@dataclass(frozen=True)
class StatusResult:
    """A node's answer, or why there is none."""

    address: str
    reply: StatusReply | None
    error: str | None = None


def query_status(addresses: list[str], timeout: float = 2.0,
                 credentials: keys.Credentials | None = None) -> list[StatusResult]:
    """Query every address in parallel; each gets ``timeout`` seconds to answer, with
    ``credentials``, else the keys this process loaded for it (``cluster.node.keys``)."""
    ctx = zmq.Context.instance()
    codec = Codec(new_node_id())
    pending: dict[zmq.Socket, tuple[str, int]] = {}
    results: dict[str, StatusResult] = {}
    poller = zmq.Poller()
    try:
        for address in addresses:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                keys.connect(sock, address, credentials)
            except zmq.ZMQError as exc:
                sock.close()
                results[address] = StatusResult(address, None, f"bad address: {exc}")
                continue
            except keys.KeysError as exc:
                sock.close()
                results[address] = StatusResult(address, None, str(exc))
                continue
            request_id = random.getrandbits(63)
            codec.send(sock, StatusQuery(request_id))
            pending[sock] = (address, request_id)
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(left * 1000):
                address, request_id = pending[sock]
                try:
                    _, _, reply = codec.recv(sock)
                except ProtocolError as exc:
                    results[address] = StatusResult(address, None, f"answered with a malformed message: {exc}")
                else:
                    if isinstance(reply, StatusReply) and reply.request_id == request_id:
                        results[address] = StatusResult(address, reply)
                    elif isinstance(reply, Error):
                        results[address] = StatusResult(address, None, f"refused: {reply.text}")
                    else:
                        continue  # a stale or foreign reply: keep waiting for ours
                poller.unregister(sock)
                del pending[sock]
                sock.close()
        for sock, (address, _) in pending.items():
            sock.close()
            results[address] = StatusResult(address, None, f"no answer within {timeout:g} s: is a node running there?")
    finally:
        for sock in pending:
            sock.close()
    return [results[a] for a in addresses]
