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
    password_file: str | None = None  # as written in the config (write_config keeps it so)
    insecure: bool = False
    base: Path = Path(".")  # the config's directory: a relative password_file is read from there

    def raft_secret(self) -> str | None:
        """The masters' Raft secret: ``password``, else the contents of ``password_file``
        (read when a master starts, so any reader may check a config without the secret)."""
        if self.password_file is None:
            return self.password
        secret = _read_secret(self.base / self.password_file)
        _check_password(secret, str(self.base / self.password_file))
        return secret


def load_config(path: Path) -> MastersConfig:
    """Read and check the masters' part of the cluster's TOML file."""
    return parse_config(read_toml(path), str(path))


def parse_config(data: dict[str, Any], where: str = "config") -> MastersConfig:
    out = parse_masters(data, where, raft=True)
    raft = data.get("raft", {})
    if not isinstance(raft, dict):
        raise ConfigError(f"{where}: [raft] must be a table")
    insecure = raft.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}: [raft] insecure must be true or false")
    password, password_file = raft.get("password"), raft.get("password_file")
    if password is not None and password_file is not None:
        raise ConfigError(f"{where}: [raft] has both password and password_file; keep one")
    if password_file is not None and not isinstance(password_file, str):
        raise ConfigError(f"{where}: [raft] password_file must be a path")
    if password is not None:
        _check_password(password, f"{where}: [raft] password")
    return MastersConfig(out, password, int(raft.get("snapshot_every", 20_000)), raft.get("timings"),
                         password_file=password_file, insecure=insecure, base=Path(where).parent)


def _check_password(secret: Any, what: str) -> None:
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigError(f"{what}: the Raft secret must be a string of at least 16 characters "
                          "(`python -c 'import secrets; print(secrets.token_urlsafe(32))'` makes one)")


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"[raft] password_file {path}: {exc.strerror}") from None
    if path.stat().st_mode & 0o077:
        log.warning("the Raft secret %s is readable by others than its owner: chmod 600 it", path)
    return secret


def write_config(config: MastersConfig, path: Path) -> None:
    """Write ``config`` as the TOML ``load_config`` reads (used by local clusters and tests)."""
    lines = []
    for m in config.masters.values():
        lines += [f"[masters.{m.name}]", f'api = "{m.api}"', f'raft = "{m.raft}"', ""]
    lines += ["[raft]", f"snapshot_every = {config.snapshot_every}"]
    if config.password_file:
        lines.append(f'password_file = "{config.password_file}"')
    elif config.password:
        lines.append(f'password = "{config.password}"')
    if config.insecure:
        lines.append("insecure = true")
    if config.timings:
        lines.append("[raft.timings]")
        lines += [f"{k} = {v}" for k, v in config.timings.items()]
    Path(path).write_text("\n".join(lines) + "\n")


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
