"""Ask nodes for their status over the wire (STATUS_QUERY → STATUS_REPLY)."""

from __future__ import annotations

import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq

from cluster import __version__
from cluster.node import keys
from proto import PROTOCOL_VERSION, Codec, ProtocolError, new_node_id
from proto.messages import Error, StatusQuery, StatusReply


STATUS_HISTORY = 20  # of a node loop's history entries, the newest ones a status reply shows


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


def status_reply(loop: Any, query: StatusQuery) -> StatusReply:
    """A node loop's answer to STATUS_QUERY: the loop's runtime facts (endpoints, key, send
    queues, counters, the newest history) and ``core.status()``. A core whose status raises is
    a bug: counted, logged, and the reply still goes, saying so."""
    now = loop.clock()
    try:
        with loop._guard:
            detail = dict(loop.core.status(now))
    except Exception:
        loop.counters["core_errors"] += 1
        loop.log.exception("%s core failed to report status", loop.core.role)
        detail = {"error": "core status failed; see the node's log"}
    creds = loop.credentials
    detail.setdefault("node_id", str(uuid.UUID(int=loop.node_id)))
    detail.setdefault("endpoints", {n: a for n, a in loop.bound.items() if a})
    detail.setdefault("public_key", None if creds.insecure else creds.public.decode())
    detail.setdefault("key_name", creds.name or None)
    detail.setdefault("send_queues", loop.send_queues.status())
    detail.setdefault("history", [list(e) for e in list(loop.history)[-STATUS_HISTORY:]])
    return StatusReply(
        request_id=query.request_id,
        uptime_ms=int((now - loop._started_at) * 1000),
        pid=os.getpid(),
        role=loop.core.role,
        version=f"{__version__} (protocol {PROTOCOL_VERSION})",
        counters=dict(loop.counters),
        detail=detail,
    )
