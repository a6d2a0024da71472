"""The cluster's config file: one TOML that every node and client of a cluster reads.

It holds the masters (``[masters.NAME]``, see ``master.node``), the balancer pair
(``[balancers.NAME]``: ``workers`` and ``peer`` endpoints, ``primary``), the storage nodes
(``[storage.nodes.NAME]``) and the storage options (``[storage]``). ``deploy/cluster.example.toml``
shows every key. ``load_cluster_config`` checks it and says where it is wrong.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


log = logging.getLogger("cluster.config")


class ConfigError(ValueError):
    """The config file is wrong; the message says where and how."""


@dataclass(frozen=True)
class MasterAddress:
    """One master: ``api`` for clients and balancers (ZeroMQ), ``raft`` for its peers only
    (host:port; None in a client's config, which has no use for it)."""

    name: str
    api: str
    raft: str | None = None


@dataclass(frozen=True)
class StorageOptions:
    replicas: int = 2
    scrub_interval_s: float = 3600.0
    scrub_rate_mb_s: float = 64.0
    gc_grace_s: float = 600.0
    gc_interval_s: float = 60.0
    partial_ttl_s: float = 86400.0
    fsync: bool = True  # false only for throwaway local clusters on tmpfs
    window_mb: float = 16.0  # upload credit: MiB in flight towards a node per upload
    idle_timeout_s: float = 30.0  # an upload with no chunk for this long is closed (partial kept)
    reserve_per_key_gb: float = 64.0  # what one key's open uploads may promise to send, in all


@dataclass(frozen=True)
class HeartbeatOptions:
    """How often workers and balancers tell each other they are alive (``[heartbeat]``), and how
    long a silence means death. Short by default, for a rack of tens of workers: a dead worker is
    purged in 1.5 s, a dead balancer left in 1 s, the balancer pair fails over in 4 intervals.
    With hundreds of workers, longer intervals cost less (each worker's heartbeats are messages
    the active balancer reads, one Python thread): zguide's Paranoid Pirate uses 1 s and 3 s."""

    interval_s: float = 0.25  # workers' and balancers' heartbeats (and the Binary Star pair's)
    worker_liveness_s: float = 1.5  # a worker silent this long is purged, its tasks reported lost
    balancer_liveness_s: float = 1.0  # a balancer silent this long: the worker turns to the other


@dataclass(frozen=True)
class BalancerAddress:
    """One balancer of the pair: where workers connect, where its peer listens for its state."""

    name: str
    workers: str
    peer: str
    primary: bool


@dataclass(frozen=True)
class SecurityOptions:
    """``[security]``: where the allow-list (``keys``) and this machine's secret keys
    (``secrets``, a directory of ``<name>.key_secret``) are; relative paths are read from the
    config's directory. ``insecure = true``: plaintext, every peer admitted (nodes warn)."""

    insecure: bool = False
    keys: Path = Path("keys.toml")
    secrets: Path = Path("keys")


@dataclass(frozen=True)
class ClusterConfig:
    masters: dict[str, str] = field(default_factory=dict)  # name → client API address
    balancers: dict[str, BalancerAddress] = field(default_factory=dict)
    storage_nodes: dict[str, str] = field(default_factory=dict)  # name → address
    storage: StorageOptions = field(default_factory=StorageOptions)
    path: str = ""
    heartbeat: HeartbeatOptions = field(default_factory=HeartbeatOptions)
    security: SecurityOptions = field(default_factory=SecurityOptions)

    def servers(self) -> dict[str, str]:
        """Every address a node of this cluster serves, and that node's name (its key's name)."""
        out = {address: name for name, address in self.masters.items()}
        for b in self.balancers.values():
            out[b.workers] = out[b.peer] = b.name
        out.update({address: name for name, address in self.storage_nodes.items()})
        return out


def read_toml(path: Path | str) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; ConfigError says what is wrong with it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_cluster_config(path: Path | str) -> ClusterConfig:
    """Read and check the cluster's TOML file."""
    return parse_cluster_config(read_toml(path), str(path))


def parse_masters(data: dict[str, Any], where: str = "config", *, raft: bool = False) -> dict[str, MasterAddress]:
    """The ``[masters.NAME]`` tables. ``raft``: each must also say where its Raft peer port is
    (what a master needs; a client or another node needs only ``api``)."""
    masters = data.get("masters") or {}
    if not isinstance(masters, dict) or (raft and not masters):
        raise ConfigError(f"{where}: needs a [masters.<name>] table per master")
    out = {}
    for name, entry in masters.items():
        peer = entry.get("raft") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("api"), str) or (raft and not isinstance(peer, str)):
            raise ConfigError(f"{where}: [masters.{name}] needs api = \"tcp://host:port\"" + (" and raft = \"host:port\"" if raft else ""))
        if peer is not None and (not isinstance(peer, str) or ":" not in peer or peer.startswith("tcp://")):
            raise ConfigError(f"{where}: [masters.{name}] raft must be host:port, not {peer!r}")
        out[name] = MasterAddress(name, entry["api"], peer)
    if raft and len(out) % 2 == 0:
        log.warning("%s: %d masters; an odd number (3 or 5) tolerates as many failures with fewer nodes", where, len(out))
    return out


def parse_cluster_config(data: dict[str, Any], where: str = "config") -> ClusterConfig:
    masters = {name: m.api for name, m in parse_masters(data, where).items()}
    section = data.get("storage") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: [storage] must be a table")
    nodes = {}
    for name, entry in (section.get("nodes") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str) or not entry["address"].startswith("tcp://"):
            raise ConfigError(f"{where}: [storage.nodes.{name}] needs address = \"tcp://host:port\"")
        nodes[name] = entry["address"]
    known = set(StorageOptions.__dataclass_fields__)
    options = {k: v for k, v in section.items() if k != "nodes"}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"{where}: [storage] has unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    try:
        storage = StorageOptions(**options)
    except TypeError as exc:
        raise ConfigError(f"{where}: [storage]: {exc}") from None
    if storage.replicas < 1:
        raise ConfigError(f"{where}: [storage] replicas must be at least 1")
    if nodes and storage.replicas > len(nodes):
        raise ConfigError(f"{where}: [storage] replicas = {storage.replicas} but only {len(nodes)} storage nodes are listed")
    return ClusterConfig(masters, _balancers(data, where), nodes, storage, where, _heartbeat(data, where),
                         parse_security(data, where))


def parse_security(data: dict[str, Any], where: str) -> SecurityOptions:
    """The ``[security]`` table, its paths made absolute from the config's directory."""
    section = data.get("security") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: [security] must be a table")
    unknown = set(section) - set(SecurityOptions.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{where}: [security] has unknown keys {', '.join(sorted(unknown))} "
                          "(known: insecure, keys, secrets)")
    insecure = section.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}: [security] insecure must be true or false")
    base = Path(where).expanduser().absolute().parent
    paths = {}
    for key in ("keys", "secrets"):
        value = section.get(key, str(getattr(SecurityOptions, key)))
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: [security] {key} must be a path")
        paths[key] = base / Path(value).expanduser()
    return SecurityOptions(insecure, paths["keys"], paths["secrets"])


def _heartbeat(data: dict[str, Any], where: str) -> HeartbeatOptions:
    section = data.get("heartbeat") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: [heartbeat] must be a table")
    known = set(HeartbeatOptions.__dataclass_fields__)
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"{where}: [heartbeat] has unknown keys {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(known))})")
    for key, value in section.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 600:
            raise ConfigError(f"{where}: [heartbeat] {key} must be seconds from 0 to 600, not {value!r}")
    beat = HeartbeatOptions(**{k: float(v) for k, v in section.items()})
    for key in ("worker_liveness_s", "balancer_liveness_s"):
        if getattr(beat, key) < 2 * beat.interval_s:
            # one late heartbeat must not look like a death
            raise ConfigError(f"{where}: [heartbeat] {key} = {getattr(beat, key):g} must be at least twice "
                              f"interval_s = {beat.interval_s:g}")
    return beat


def _balancers(data: dict[str, Any], where: str) -> dict[str, BalancerAddress]:
    section = data.get("balancers") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: [balancers] must be a table of [balancers.<name>]")
    out = {}
    for name, entry in section.items():
        ok = isinstance(entry, dict) and all(isinstance(entry.get(k), str) and entry[k].startswith("tcp://")
                                             for k in ("workers", "peer"))
        if not ok:
            raise ConfigError(f"{where}: [balancers.{name}] needs workers = \"tcp://host:port\" and peer = \"tcp://host:port\"")
        primary = entry.get("primary", False)
        if not isinstance(primary, bool):
            raise ConfigError(f"{where}: [balancers.{name}] primary must be true or false")
        out[name] = BalancerAddress(name, entry["workers"], entry["peer"], primary)
    if len(out) > 2:
        raise ConfigError(f"{where}: {len(out)} balancers listed; a Binary Star pair is one or two")
    if len(out) == 2 and sum(b.primary for b in out.values()) != 1:
        raise ConfigError(f"{where}: of the two balancers exactly one must have primary = true")
    if len(out) == 1 and not next(iter(out.values())).primary:
        raise ConfigError(f"{where}: a lone balancer must be the primary (primary = true)")
    return out


def cluster_home() -> Path:
    """The default cluster directory: ``$CLUSTER_HOME``, else ``~/.cluster``."""
    return Path(os.environ.get("CLUSTER_HOME") or Path.home() / ".cluster").expanduser().absolute()


def find_config(directory: Path | None = None, config: Path | None = None) -> tuple[Path | None, str]:
    """The cluster config to use and where we looked: ``config`` if given, else
    ``directory/cluster.toml`` if given, else ``$CLUSTER_CONFIG`` if set, else
    ``<cluster_home()>/cluster.toml``. The path is None when that file does not exist."""
    if config is not None:
        path = Path(config)
    elif directory is not None:
        path = Path(directory).expanduser().absolute() / "cluster.toml"
    elif os.environ.get("CLUSTER_CONFIG"):
        path = Path(os.environ["CLUSTER_CONFIG"]).expanduser()
        return (path if path.is_file() else None), f"$CLUSTER_CONFIG is {path}"
    else:
        path = cluster_home() / "cluster.toml"
    return (path if path.is_file() else None), f"looked for {path}"


def write_balancers_section(balancers: dict[str, BalancerAddress]) -> str:
    """The TOML text of the balancer part (used by local clusters and tests)."""
    lines = []
    for b in balancers.values():
        lines += [f"[balancers.{b.name}]", f'workers = "{b.workers}"', f'peer = "{b.peer}"',
                  f"primary = {str(b.primary).lower()}", ""]
    return "\n".join(lines)


def write_storage_section(nodes: dict[str, str], options: StorageOptions) -> str:
    """The TOML text of the storage part (used by local clusters and tests)."""
    lines = ["[storage]"]
    for key in StorageOptions.__dataclass_fields__:
        value = getattr(options, key)
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    for name, address in nodes.items():
        lines += ["", f"[storage.nodes.{name}]", f'address = "{address}"']
    return "\n".join(lines) + "\n"
