"""A master process: the config file, the ledger, the Raft adapter, the core and its loop.

One TOML file describes every master of a cluster (``deploy/cluster.example.toml``)::

    [masters.m1]
    api  = "tcp://10.0.0.1:5550"   # clients and balancers (ZeroMQ ROUTER)
    raft = "10.0.0.1:5560"         # Raft between masters only (pysyncobj, TCP)
    [masters.m2] ...
    [raft]
    password_file = "raft.secret"   # the masters' shared secret (0600; relative to this file)
    # password = "…"                # or the secret itself (then keep this file 0600)
    # insecure = true               # plaintext Raft: pickles from anyone who reaches the port
    snapshot_every = 20000          # log entries between snapshots

Raft needs a secret: pysyncobj unpickles what arrives on the Raft port, and the secret is what
authenticates a message before that (master.raft). A master refuses to start without one unless
``insecure = true`` says so in so many words, and then it warns at every start.

``cluster-master --config cluster.toml --name m1 --data-dir /var/lib/cluster/m1`` runs one.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import time
from pathlib import Path
from typing import Any

import zmq

from cluster.node.config import ConfigError
from cluster.node.keys import node_credentials
from cluster.node.loop import NodeLoop, SocketSpec
from master.config import MastersConfig, load_config
from master.core import API, CheckDisk, Committed, DiskChecked, MasterCore, Propose, ProposalFailed
from master.ledger import Ledger
from master.raft import RaftAdapter

log = logging.getLogger("cluster.master")


def build_master(config: MastersConfig, name: str, data_dir: Path | None, bind: str | None = None) -> tuple[NodeLoop, RaftAdapter]:
    """A master ready to ``run()``; close the adapter after the loop returns."""
    if name not in config.masters:
        raise ConfigError(f"no master named {name!r} in the config (it has {', '.join(config.masters)})")
    secret = config.raft_secret()
    if secret is None and not config.insecure:
        raise ConfigError("Raft between the masters needs a secret: set [raft] password_file (a file of "
                          "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`, mode 600) in the "
                          "config, or insecure = true to run Raft in plaintext (anyone who reaches the Raft "
                          "port can then run code in a master)")
    if secret is None:
        log.warning("master %s: [raft] insecure = true: Raft runs in plaintext; anyone who reaches %s can "
                    "run code in this master", name, config.masters[name].raft)
    me = config.masters[name]
    credentials = node_credentials(config.security, name, "master", {})
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
        password=secret, snapshot_every=config.snapshot_every, timings=config.timings,
    )
    core = MasterCore(ledger, name, adapter.view, {m.raft: m.api for m in config.masters.values()},
                      raft_detail=adapter.detail, wall_offset=time.time() - time.monotonic(),
                      retention_s=config.jobs_days * 86400 if config.jobs_days > 0 else None)
    # A burst of WORKER_REQUESTs (up to the balancer's credit) or replies must not hit the default
    # high-water mark of 1000: a ROUTER drops silently beyond it.
    options = {zmq.ROUTER_HANDOVER: 1, zmq.SNDHWM: 200_000, zmq.RCVHWM: 200_000}
    sockets = [SocketSpec(API, zmq.ROUTER, bind=(bind or me.api,), options=options)]
    core.standing.disk_alarm_bytes = int(config.disk_alarm_mb) << 20

    def check_disk(effect: CheckDisk) -> list[DiskChecked]:
        if data_dir is None:
            return []  # a master without a disk (tests): no alarm
        st = os.statvfs(data_dir)
        return [DiskChecked(st.f_bavail * st.f_frsize, effect.cause or "disk")]

    performers = {Propose: lambda p: adapter.propose(p.entry, p.token, p.data), CheckDisk: check_disk}
    loop = NodeLoop(core, sockets, guard=adapter.lock, performers=performers, credentials=credentials)
    holder["loop"] = loop
    return loop, adapter


def run_master(config_path: Path, name: str, data_dir: Path | None) -> int:
    # A fault in C (a SIGBUS from a journal page the disk could not back, master.raft) leaves the
    # Python stack of every thread in the log instead of a bare "Bus error".
    faulthandler.enable()
    config = load_config(config_path)
    loop, adapter = build_master(config, name, data_dir)
    try:
        return loop.run()
    finally:
        adapter.close()
