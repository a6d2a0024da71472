"""The masters' part of the cluster's TOML file: addresses, the Raft secret, snapshots, timings.

Apart from ``master.node`` so that a launcher can read and write it (``cluster up`` writes it,
every reader checks it) without loading the master itself (its core, pysyncobj, numpy).
The file's keys are described in ``master.node``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.node.config import ConfigError, MasterAddress, SecurityOptions, parse_masters, parse_security, read_toml

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
    security: SecurityOptions = field(default_factory=SecurityOptions)  # the ZeroMQ ports' keys
    jobs_days: float = 30.0  # [retention]: finished jobs are forgotten after this many days; 0 keeps them
    disk_alarm_mb: float = 256.0  # [raft]: below this much free disk, writes that grow the ledger are refused

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
    retention = data.get("retention", {})
    days = retention.get("jobs_days", 30.0) if isinstance(retention, dict) else None
    if isinstance(days, bool) or not isinstance(days, (int, float)) or days < 0:
        raise ConfigError(f"{where}: [retention] jobs_days must be a number of days, 0 to keep finished jobs forever")
    return MastersConfig(out, password, int(raft.get("snapshot_every", 20_000)), raft.get("timings"),
                         password_file=password_file, insecure=insecure, base=Path(where).parent,
                         security=parse_security(data, where), jobs_days=float(days),
                         disk_alarm_mb=_disk_alarm(raft, where))


def _disk_alarm(raft: dict[str, Any], where: str) -> float:
    mb = raft.get("disk_alarm_mb", 256.0)
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb < 0:
        raise ConfigError(f"{where}: [raft] disk_alarm_mb must be a number of MiB (0: no alarm)")
    return float(mb)


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
    if config.disk_alarm_mb != 256.0:
        lines.append(f"disk_alarm_mb = {config.disk_alarm_mb}")
    if config.password_file:
        lines.append(f'password_file = "{config.password_file}"')
    elif config.password:
        lines.append(f'password = "{config.password}"')
    if config.insecure:
        lines.append("insecure = true")
    if config.security.insecure:
        lines += ["", "[security]", "insecure = true"]
    if config.jobs_days != 30.0:
        lines += ["", "[retention]", f"jobs_days = {config.jobs_days}"]
    if config.timings:
        lines.append("[raft.timings]")
        lines += [f"{k} = {v}" for k, v in config.timings.items()]
    Path(path).write_text("\n".join(lines) + "\n")
