"""What a local cluster keeps between ``cluster down`` and ``cluster up``: its recorded settings.

Theory of operation
-------------------
``cluster up`` records the cluster it made in ``D/local.json``: how many masters, storage nodes,
balancers and workers, the slots per worker, the text of ``cluster.toml`` and ``masters.toml``
(every address, so every port), and each node's record with the arguments it runs with.
``cluster down`` keeps that file, the nodes' data directories (the masters' Raft journals and
snapshots: the ledger; the storage nodes' blobs: the files), their logs, the keys (``keys.toml``,
``keys/``) and the Raft secret; it drops only what names running processes (``nodes.json``) and
the config files that let a client find a running cluster. The next ``cluster up`` in D writes
the configs back from the record and starts every node with its recorded arguments: the same
ports (a master's Raft peers are addressed by port), keys and data, so the same cluster, with
logs appended. ``cluster up --fresh`` removes the nodes' state first (``clear_state``).

Flags that differ from the record are read by ``reconcile`` (pure): more workers are added (new
names, ports and keys), fewer are dropped (the highest-numbered; only while the cluster is
stopped), other slots apply to every worker (while stopped). A different number of masters is
refused: the Raft membership is the masters' config, fixed when the cluster was made.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SETTINGS = "local.json"
CONFIGS = ("cluster.toml", "masters.toml")
# A node's data directory and log, the configs, the records: what --fresh removes (never the keys).
STATE_ENTRIES = re.compile(r"[msbw]\d+(\.log)?|cluster\.toml|masters\.toml|nodes\.json|local\.json")
_PORT = re.compile(r"127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class Settings:
    """A local cluster as ``cluster up`` made it (``D/local.json``). ``nodes`` are the node
    records as dicts (name, role, address, log, data_dir, argv; no pid)."""

    masters: int
    storage: int
    balancers: int
    workers: int
    slots: int
    configs: dict[str, str] = field(default_factory=dict)  # file name -> text, written back on up
    nodes: tuple[dict[str, Any], ...] = ()

    def ports(self) -> dict[int, str]:
        """Every TCP port the cluster binds -> the node that binds it (from the configs and the
        workers' status addresses)."""
        out: dict[int, str] = {}
        for node in self.nodes:
            for port in _PORT.findall(node.get("address") or ""):
                out[int(port)] = node["name"]
        for text in self.configs.values():
            for port in _PORT.findall(text):
                out.setdefault(int(port), "the cluster's config")
        return out


def read_settings(directory: Path) -> Settings | None:
    """``D/local.json``, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((directory / SETTINGS).read_text())
        return Settings(data["masters"], data["storage"], data["balancers"], data["workers"], data["slots"],
                        dict(data["configs"]), tuple(data["nodes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_settings(directory: Path, settings: Settings) -> None:
    """Write ``D/local.json`` whole (a reader never sees half of it)."""
    tmp = directory / (SETTINGS + ".tmp")
    data = {"masters": settings.masters, "storage": settings.storage, "balancers": settings.balancers,
            "workers": settings.workers, "slots": settings.slots, "configs": settings.configs,
            "nodes": list(settings.nodes)}
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(directory / SETTINGS)


def write_configs(directory: Path, settings: Settings) -> None:
    """Write the recorded config files back into D, as they were when the cluster was made."""
    for name, text in settings.configs.items():
        if name in CONFIGS:
            (directory / name).write_text(text)


def read_configs(directory: Path) -> dict[str, str]:
    return {name: (directory / name).read_text() for name in CONFIGS if (directory / name).exists()}


# ---- flags against the record -------------------------------------------------------------------


class ChangeRefused(Exception):
    """A flag that cannot apply to the recorded cluster: one line saying why and what to do."""


@dataclass(frozen=True)
class Change:
    """What ``up`` does to the recorded cluster: workers to add (how many) and drop (names), and
    the slots every worker runs with."""

    add_workers: int = 0
    drop_workers: tuple[str, ...] = ()
    slots: int | None = None  # a new slot count for every worker; None: as recorded

    @property
    def empty(self) -> bool:
        return not self.add_workers and not self.drop_workers and self.slots is None


def reconcile(settings: Settings, workers: int | None, slots: int | None, masters: int | None,
              running: bool) -> Change:
    """The change the flags ask of the recorded cluster (None: as recorded), or ``ChangeRefused``.
    ``running``: the cluster runs now (only workers may be added then)."""
    if masters is not None and masters != settings.masters:
        raise ChangeRefused(f"this cluster has {settings.masters} masters and its Raft membership cannot change: "
                            f"drop --masters to restart it, or `cluster up --fresh --masters {masters}` to start a "
                            "new, empty one")
    if slots is not None and slots != settings.slots and running:
        raise ChangeRefused(f"the running workers have {settings.slots} slots each: `cluster down` first to restart "
                            f"them with --slots {slots}")
    names = sorted((n["name"] for n in settings.nodes if n["role"] == "worker"), key=_number)
    drop: tuple[str, ...] = ()
    add = 0
    if workers is not None and workers < len(names):
        if running:
            raise ChangeRefused(f"the cluster runs {len(names)} workers: `cluster down` first to restart it with "
                                f"--workers {workers}")
        drop = tuple(names[workers:])
    elif workers is not None:
        add = workers - len(names)
    return Change(add, drop, slots if slots is not None and slots != settings.slots else None)


def _number(name: str) -> int:
    digits = re.sub(r"\D", "", name)
    return int(digits) if digits else 0


def with_slots(argv: list[str], slots: int) -> list[str]:
    """A worker's arguments with ``--slots`` set to ``slots``."""
    out = list(argv)
    if "--slots" in out:
        out[out.index("--slots") + 1] = str(slots)
    else:
        out += ["--slots", str(slots)]
    return out


def next_worker(settings: Settings) -> int:
    """The number of the next worker's name (w<N>): above every recorded one."""
    return 1 + max((_number(n["name"]) for n in settings.nodes if n["role"] == "worker"), default=0)


def without(settings: Settings, names: tuple[str, ...]) -> Settings:
    """The settings less the nodes ``names``."""
    kept = tuple(n for n in settings.nodes if n["name"] not in names)
    return replace(settings, nodes=kept, workers=sum(n["role"] == "worker" for n in kept))


# ---- ports and state ----------------------------------------------------------------------------


def taken_port(settings: Settings) -> tuple[int, str] | None:
    """A recorded port another program listens on now (port, node), or None. Bound the way the
    nodes bind (SO_REUSEADDR, as ZeroMQ and pysyncobj do): a port left in TIME_WAIT by the
    previous run is free."""
    for port, name in sorted(settings.ports().items()):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return port, name
    return None


def state_entries(directory: Path) -> list[Path]:
    """The nodes' state in D that ``--fresh`` removes: data directories, logs, configs, records."""
    if not directory.is_dir():
        return []
    return sorted((e for e in directory.iterdir() if STATE_ENTRIES.fullmatch(e.name)), key=lambda e: e.name)


def describe(entries: list[Path]) -> str:
    """What ``entries`` hold, in words: e.g. "the ledger (m1, m2, m3), the stored files (s1, s2)"."""
    dirs = [e.name for e in entries if e.is_dir()]
    parts = []
    for role, what in (("m", "the ledger"), ("s", "the stored files"), ("w", "the workers' data")):
        names = [d for d in dirs if d.startswith(role)]
        if names:
            parts.append(f"{what} ({', '.join(names)})")
    if any(e.name.endswith(".log") for e in entries):
        parts.append("the logs")
    if any(e.name in (SETTINGS, "nodes.json", *CONFIGS) for e in entries):
        parts.append("the recorded settings")
    return ", ".join(parts)


def clear_state(directory: Path) -> list[Path]:
    """Remove the nodes' state in D (``state_entries``); the keys and the Raft secret stay."""
    entries = state_entries(directory)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    return entries
