"""A master process: the config file, the ledger, the Raft adapter, the core and its loop.

One TOML file describes every master of a cluster (``deploy/cluster.example.toml``)::

    [masters.m1]
    api  = "tcp://10.0.0.1:5550"   # clients and balancers (ZeroMQ ROUTER)
    raft = "10.0.0.1:5560"         # Raft between masters only (pysyncobj, TCP)
    [masters.m2] ...
    [raft]                          # optional
    password = "…"                  # encrypts and authenticates Raft traffic (needs `cryptography`)
    snapshot_every = 20000          # log entries between snapshots

``cluster-master --config cluster.toml --name m1 --data-dir /var/lib/cluster/m1`` runs one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from cluster.node.config import ConfigError, MasterAddress, parse_masters, read_toml
from cluster.node.loop import NodeLoop, SocketSpec
from master.core import API, Committed, MasterCore, Propose, ProposalFailed
from master.ledger import Ledger
from master.raft import RaftAdapter

log = logging.getLogger("cluster.master")


@dataclass(frozen=True)
class MastersConfig:
    masters: dict[str, MasterAddress]
    password: str | None = None
    snapshot_every: int = 20_000
    timings: dict[str, float] | None = None


def load_config(path: Path) -> MastersConfig:
    """Read and check the masters' part of the cluster's TOML file."""
    return parse_config(read_toml(path), str(path))


def parse_config(data: dict[str, Any], where: str = "config") -> MastersConfig:
    out = parse_masters(data, where, raft=True)
    raft = data.get("raft", {})
    timings = raft.get("timings")
    return MastersConfig(out, raft.get("password"), int(raft.get("snapshot_every", 20_000)), timings)


def write_config(config: MastersConfig, path: Path) -> None:
    """Write ``config`` as the TOML ``load_config`` reads (used by local clusters and tests)."""
    lines = []
    for m in config.masters.values():
        lines += [f"[masters.{m.name}]", f'api = "{m.api}"', f'raft = "{m.raft}"', ""]
    lines += ["[raft]", f"snapshot_every = {config.snapshot_every}"]
    if config.password:
        lines.append(f'password = "{config.password}"')
    if config.timings:
        lines.append("[raft.timings]")
        lines += [f"{k} = {v}" for k, v in config.timings.items()]
    Path(path).write_text("\n".join(lines) + "\n")


def build_master(config: MastersConfig, name: str, data_dir: Path | None, bind: str | None = None) -> tuple[NodeLoop, RaftAdapter]:
    """A master ready to ``run()``; close the adapter after the loop returns."""
    if name not in config.masters:
        raise ConfigError(f"no master named {name!r} in the config (it has {', '.join(config.masters)})")
    me = config.masters[name]
    partners = [m.raft for m in config.masters.values() if m.name != name]
    ledger = Ledger()
    holder: dict[str, NodeLoop] = {}

    def on_result(token: int, result: Any, index: int) -> None:
        loop = holder["loop"]
        loop.post(Committed(token, result, index, loop.stimulus("commit")))

    def on_failure(token: int, reason: str) -> None:
        loop = holder["loop"]
        loop.post(ProposalFailed(token, reason, loop.stimulus("commit-failed")))

    adapter = RaftAdapter(
        ledger, me.raft, partners, data_dir,
        on_result=on_result, on_failure=on_failure,
        password=config.password, snapshot_every=config.snapshot_every, timings=config.timings,
    )
    core = MasterCore(ledger, name, adapter.view, {m.raft: m.api for m in config.masters.values()},
                      raft_detail=adapter.detail, wall_offset=time.time() - time.monotonic())
    # A burst of WORKER_REQUESTs (up to the balancer's credit) or replies must not hit the default
    # high-water mark of 1000: a ROUTER drops silently beyond it.
    options = {zmq.ROUTER_HANDOVER: 1, zmq.SNDHWM: 200_000, zmq.RCVHWM: 200_000}
    sockets = [SocketSpec(API, zmq.ROUTER, bind=(bind or me.api,), options=options)]
    loop = NodeLoop(core, sockets, guard=adapter.lock, performers={Propose: lambda p: adapter.propose(p.entry, p.token)})
    holder["loop"] = loop
    return loop, adapter


def run_master(config_path: Path, name: str, data_dir: Path | None) -> int:
    config = load_config(config_path)
    loop, adapter = build_master(config, name, data_dir)
    try:
        return loop.run()
    finally:
        adapter.close()
