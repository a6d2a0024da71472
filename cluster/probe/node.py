"""Wires a ProbeCore to real sockets: a ROUTER that serves, one DEALER per peer."""

from __future__ import annotations

import zmq

from cluster.probe.core import SERVE, ProbeCore, peer_socket
from cluster.node.keys import Credentials
from cluster.node.loop import NodeLoop, SocketSpec
from proto import Limits


def build_probe(bind: str, peers: list[str], interval: float = 1.0, liveness: int = 3, limits: Limits = Limits(),
                credentials: Credentials | None = None, peer_names: dict[str, str] | None = None) -> NodeLoop:
    """A probe node ready to ``run()``: serves on ``bind``, heartbeats every peer. With
    ``credentials`` its sockets use CURVE, each peer's key found by its name in ``peer_names``
    (address -> the name of its key in the allow-list); without, plaintext (the loop warns)."""
    core = ProbeCore(peers, interval=interval, liveness=liveness)
    sockets = [SocketSpec(SERVE, zmq.ROUTER, bind=(bind,))]
    # Heartbeats to a peer that is down must not pile up (Paranoid Pirate): only queue to
    # completed connections, and keep at most a few.
    opts = {zmq.IMMEDIATE: 1, zmq.SNDHWM: 16}
    names = peer_names or {}
    sockets += [SocketSpec(peer_socket(p), zmq.DEALER, connect=(p,), options=opts, server=names.get(p)) for p in peers]
    return NodeLoop(core, sockets, limits=limits, credentials=credentials)
