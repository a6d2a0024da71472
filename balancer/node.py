"""A balancer process: the cluster config, the core and its loop.

The cluster's TOML (``deploy/cluster.example.toml``) names the pair::

    [balancers.b1]
    workers = "tcp://10.0.0.5:5570"   # workers connect here (ZeroMQ ROUTER)
    peer    = "tcp://10.0.0.5:5571"   # the peer subscribes to this one's state here (PUB)
    primary = true
    [balancers.b2] ...                # primary = false

``cluster-balancer --config cluster.toml --name b1`` runs one.
"""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from balancer.core import PEER_IN, PEER_OUT, WORKERS, BalancerCore, BalancerOptions
from balancer.masters import master_socket
from cluster.node.config import ConfigError, load_cluster_config
from cluster.node.keys import node_credentials
from cluster.node.loop import NodeLoop, SocketSpec


def build_balancer(config_path: Path, name: str, *, options: BalancerOptions | None = None,
                   bind_workers: str | None = None) -> NodeLoop:
    """A balancer ready to ``run()``; ``options`` default to the config's ``[heartbeat]`` timings."""
    config = load_cluster_config(config_path)
    if options is None:
        options = BalancerOptions(interval=config.heartbeat.interval_s,
                                  worker_liveness=config.heartbeat.worker_liveness_s)
    if name not in config.balancers:
        known = ", ".join(config.balancers) or "none"
        raise ConfigError(f"{config_path}: no balancer named {name!r} (the file lists {known})")
    if not config.masters:
        raise ConfigError(f"{config_path}: a balancer needs the masters' [masters.<name>] tables")
    me = config.balancers[name]
    credentials = node_credentials(config.security, name, "balancer", config.servers())
    peer = next((b for b in config.balancers.values() if b.name != name), None)
    masters = list(config.masters.values())
    core = BalancerCore(
        name, primary=me.primary, masters=masters, workers_endpoint=me.workers,
        peer_workers=peer.workers if peer else "", epoch_base=time.time_ns() // 1_000_000, options=options,
        now=time.monotonic(),
    )
    # Heartbeats must not queue behind a dead peer: a PUB drops what a slow subscriber cannot
    # take, and the SUB keeps only the newest states.
    sockets = [
        SocketSpec(WORKERS, zmq.ROUTER, bind=(bind_workers or me.workers,),
                   options={zmq.ROUTER_HANDOVER: 1, zmq.SNDHWM: 100_000, zmq.RCVHWM: 100_000}),
        SocketSpec(PEER_OUT, zmq.PUB, bind=(me.peer,), options={zmq.SNDHWM: 16}),
    ]
    if peer is not None:
        sockets.append(SocketSpec(PEER_IN, zmq.SUB, connect=(peer.peer,),
                                  options={zmq.SUBSCRIBE: b"", zmq.RCVHWM: 16}))
    for i, address in enumerate(masters):
        sockets.append(SocketSpec(master_socket(i), zmq.DEALER, connect=(address,),
                                  options={zmq.SNDHWM: 100_000, zmq.RCVHWM: 100_000, zmq.IMMEDIATE: 1}))
    return NodeLoop(core, sockets, credentials=credentials)


def run_balancer(config_path: Path, name: str) -> int:
    return build_balancer(config_path, name).run()
