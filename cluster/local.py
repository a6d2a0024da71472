"""Start and stop node processes on this machine, by process id (never by name).

The building block of local clusters (``make demo``, integration tests, later ``cluster up``):
each node runs as ``python -m cluster …`` with its log in a file, is ready when it answers
STATUS_QUERY, and is stopped with SIGTERM (SIGKILL only if it does not exit in time).
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.node import keys
from cluster.node.config import (BalancerAddress, MasterAddress, SecurityOptions, StorageOptions, load_cluster_config,
                                 write_balancers_section, write_storage_section)
from cluster.node.status import query_status
from master.config import MastersConfig, write_config

log = logging.getLogger("cluster.local")


# ---- ports ---------------------------------------------------------------------------------------
#
# A node's address is written into the cluster's config before the node starts (the masters'
# Raft peers and the balancer pair must know each other's), so a node cannot bind port 0 and
# report what it got: the launcher picks the port. Binding port 0 here, closing, and handing that
# port over (the usual trick) leaves it to the kernel's ephemeral range, which the kernel hands
# out again to any socket: an outgoing connection's source port (ZeroMQ reconnects make many),
# another bind to port 0, or the next free_port() in this very process. So free_port():
#
# 1. picks from below the ephemeral range (``ip_local_port_range``), where the kernel never
#    allocates a port by itself: only an explicit bind can take one;
# 2. never returns a port twice in one process (a set of those handed out);
# 3. claims the port for this user's processes: a one-byte record lock at offset ``port`` on
#    one shared file (``fcntl.lockf``), held until this process exits, so two launchers (two
#    test runs, a test run and `cluster up`) never pick the same port while both are alive;
# 4. checks the port is free right now by binding it (without SO_REUSEADDR).
#
# The window that remains: another program binding that very port explicitly between the check
# and the node's own bind. The node then fails to start with "address in use" (loud, never a
# silent mix-up). Where the ephemeral range leaves no room below or above it, only 2-4 hold.

PORT_FLOOR = 10_000  # below: registered services (and ports that need privileges)
_ports_lock = threading.Lock()
_ports_given: set[int] = set()
_claims_fd: int | None = None
_random = random.SystemRandom()  # not the global generator: tests seed that one


def _port_pool() -> range:
    """Ports outside the kernel's ephemeral range (below it if there is room, else above)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    if low - PORT_FLOOR >= 1000:
        return range(PORT_FLOOR, low)
    if 65535 - high >= 1000:
        return range(high + 1, 65536)
    return range(PORT_FLOOR, 65536)


def _claim(port: int) -> bool:
    """Lock byte ``port`` of this user's claims file; False if another live process holds it.
    True without a lock when the file cannot be opened (then only the bind check guards)."""
    global _claims_fd
    if _claims_fd is None:
        path = Path(tempfile.gettempdir()) / f"cluster-ports-{os.getuid()}.lock"
        try:
            _claims_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            _claims_fd = -1
    if _claims_fd < 0:
        return True
    try:
        fcntl.lockf(_claims_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
    except OSError:
        return False
    return True


def _unclaim(port: int) -> None:
    if _claims_fd is not None and _claims_fd >= 0:
        fcntl.lockf(_claims_fd, fcntl.LOCK_UN, 1, port)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(pool: range) -> int:
    """A port of ``pool`` that this process has not handed out, no other launcher of this user
    has claimed, and that is free now; claimed for this process (see the comment above)."""
    with _ports_lock:
        start = _random.randrange(len(pool))
        for k in range(len(pool)):
            port = pool[(start + k) % len(pool)]
            if port in _ports_given or not _claim(port):
                continue
            if not _bindable(port):
                _unclaim(port)
                continue
            _ports_given.add(port)
            return port
    raise OSError(f"no free TCP port on 127.0.0.1 in {pool.start}-{pool.stop - 1}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 for a node to bind: free now, outside the kernel's ephemeral
    range, never handed out twice by this process nor by two live launchers of this user (the
    theory above says what window remains)."""
    return pick_port(_port_pool())


@dataclass
class LocalNode:
    """One node process started by this machine's launcher."""

    name: str
    argv: list[str]
    address: str
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> "LocalNode":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cluster", *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C at the terminal is the launcher's to handle
            )
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll the node's status until it answers; raise if it exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process and self.process.returncode}; see {self.log_path}")
            if query_status([self.address], timeout=0.5)[0].reply is not None:
                return
        raise TimeoutError(f"{self.name} did not answer at {self.address} within {timeout:g} s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the crash a fault test wants to survive."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_all(nodes: list[LocalNode], timeout: float = 20.0) -> list[LocalNode]:
    """Start every node, then wait until each answers; if any fails, stop those started (by
    pid) and raise. Starting them all first lets them find each other while we wait."""
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready(timeout)
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: list[LocalNode]) -> list[int | None]:
    """SIGTERM every node (SIGKILL the ones that do not exit); one that fails to stop does
    not keep the others running. Returns their exit statuses."""
    codes: list[int | None] = []
    for node in nodes:
        try:
            codes.append(node.stop())
        except Exception as exc:  # keep stopping the others
            log.warning("stopping %s (pid %s): %s", node.name, node.pid, exc)
            codes.append(None)
    return codes


def probe_node(name: str, directory: Path, port: int, peers: list[int] = (), interval: float = 0.2, extra: list[str] = ()) -> LocalNode:
    """A probe node on 127.0.0.1:``port`` heartbeating the probes on ``peers``."""
    address = f"tcp://127.0.0.1:{port}"
    argv = ["probe", "--bind", address, "--interval", str(interval), *extra]
    for p in peers:
        argv += ["--peer", f"tcp://127.0.0.1:{p}"]
    keys.learn(keys.Credentials.plaintext([address]))  # a probe has no keys: it tests the loop alone
    return LocalNode(name, argv, address, directory / f"{name}.log")


RAFT_SECRET = "raft.secret"
ALLOW_LIST = "keys.toml"  # the config's default [security] keys, beside it
SECRETS = "keys"  # the config's default [security] secrets directory


def make_keys(directory: Path, names: dict[str, str]) -> None:
    """A keypair for each of ``names`` (name -> role) not in ``directory``'s allow-list yet, plus
    the local user's ``client`` and ``operator`` keys: secrets in ``directory/keys`` (mode 600),
    public keys in ``directory/keys.toml``, where the config's ``[security]`` defaults look."""
    allow_path = directory / ALLOW_LIST
    entries = {e.name: e for e in keys.parse_allow_list(allow_path)} if allow_path.exists() else {}
    wanted = {"client": "client", "operator": "operator", **names}
    for name, role in wanted.items():
        if name not in entries or not keys.secret_path(directory / SECRETS, name).exists():
            entries[name] = keys.KeyEntry(name, role, keys.make_secret(directory / SECRETS, name))
    keys.write_allow_list(allow_path, list(entries.values()))


def learn_keys(config: Path) -> keys.Credentials:
    """This process's (the launcher's, a test's) client credentials for the cluster at ``config``:
    every link it opens to that cluster's nodes then authenticates with them."""
    cfg = load_cluster_config(config)
    return keys.client_credentials(cfg.security, cfg.servers())  # the `client` key, as the cluster commands


def raft_secret(path: Path) -> None:
    """Make the masters' Raft secret at ``path`` (only its owner may read it), unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


def credentials_as(config: Path, name: str, role: str) -> keys.Credentials:
    """Credentials for a key ``name`` of ``role`` in the cluster at ``config`` (made beside it if
    it is new), not learnt for this process's links: pass them where a test or benchmark acts
    as that role (e.g. ``EchoBalancer(credentials=...)``, a balancer's key)."""
    config = Path(config)
    cfg = load_cluster_config(config)
    if cfg.security.insecure:
        return keys.Credentials.plaintext(list(cfg.servers()))
    make_keys(config.parent, {name: role})
    return keys.client_credentials(cfg.security, cfg.servers(), keys.secret_path(cfg.security.secrets, name),
                                   remember=False)


def master_nodes(directory: Path, count: int = 3, *, snapshot_every: int = 20_000, log_level: str = "INFO",
                 insecure: bool = False) -> list[LocalNode]:
    """``count`` masters on free 127.0.0.1 ports, their config in ``directory/masters.toml``
    and each one's Raft journal and snapshots in ``directory/<name>``. Raft is authenticated
    with a fresh secret in ``directory/raft.secret`` (mode 600), kept if it exists already; the
    ZeroMQ ports with keys made in ``directory`` (``make_keys``). ``insecure``: the ZeroMQ ports
    in plaintext instead (``[security] insecure = true``, inherited by the nodes added to this
    config), for benchmarks that measure what CURVE costs."""
    masters = {}
    for i in range(1, count + 1):
        name = f"m{i}"
        masters[name] = MasterAddress(name, f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    directory.mkdir(parents=True, exist_ok=True)
    raft_secret(directory / RAFT_SECRET)
    make_keys(directory, {name: "master" for name in masters})
    config = directory / "masters.toml"
    write_config(MastersConfig(masters, snapshot_every=snapshot_every, password_file=RAFT_SECRET,
                               security=SecurityOptions(insecure=insecure)), config)
    learn_keys(config)
    return [
        LocalNode(
            m.name,
            ["master", "--config", str(config), "--name", m.name, "--data-dir", str(directory / m.name), "--log-level", log_level],
            m.api,
            directory / f"{m.name}.log",
        )
        for m in masters.values()
    ]


def storage_nodes(directory: Path, count: int = 2, *, masters: list[LocalNode] | None = None, options=None,
                  log_level: str = "INFO", insecure: bool = False) -> tuple[Path, list[LocalNode]]:
    """``count`` storage nodes on free 127.0.0.1 ports. The cluster config (the masters' file,
    when ``masters`` came from ``master_nodes`` in the same directory, plus the storage part)
    is written to ``directory/cluster.toml``; each node's blobs live in ``directory/<name>``.
    ``insecure`` (without ``masters``; with them, theirs applies): plaintext, no keys."""
    options = options or StorageOptions(replicas=min(2, count))
    nodes = {f"s{i}": f"tcp://127.0.0.1:{free_port()}" for i in range(1, count + 1)}
    directory.mkdir(parents=True, exist_ok=True)
    make_keys(directory, {name: "storage" for name in nodes})
    masters_toml = directory / "masters.toml"
    text = masters_toml.read_text() + "\n" if masters and masters_toml.exists() else ""
    if insecure and not text:
        text = "[security]\ninsecure = true\n\n"
    config = directory / "cluster.toml"
    config.write_text(text + write_storage_section(nodes, options))
    learn_keys(config)
    return config, [
        LocalNode(
            name,
            ["storage", "--config", str(config), "--name", name, "--data-dir", str(directory / name), "--log-level", log_level],
            address,
            directory / f"{name}.log",
        )
        for name, address in nodes.items()
    ]


def balancer_nodes(directory: Path, count: int = 2, *, log_level: str = "INFO",
                   heartbeat: Any = None) -> tuple[Path, list[LocalNode]]:
    """The Binary Star pair (``count`` 2) or a lone primary (1) on free 127.0.0.1 ports, added
    to ``directory/cluster.toml`` (made from ``masters.toml`` if there is none yet), with a
    ``[heartbeat]`` section when ``heartbeat`` (a ``HeartbeatOptions``) is given."""
    if count not in (1, 2):
        raise ValueError("a balancer pair is one or two balancers")
    config = directory / "cluster.toml"
    text = config.read_text() if config.exists() else (directory / "masters.toml").read_text()
    pair = {f"b{i}": BalancerAddress(f"b{i}", f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", i == 1)
            for i in range(1, count + 1)}
    if heartbeat is not None:
        text += "\n[heartbeat]\n" + "".join(f"{k} = {getattr(heartbeat, k)}\n" for k in heartbeat.__dataclass_fields__)
    make_keys(directory, {name: "balancer" for name in pair})
    config.write_text(text + "\n" + write_balancers_section(pair))
    learn_keys(config)
    return config, [
        LocalNode(b.name, ["balancer", "--config", str(config), "--name", b.name, "--log-level", log_level],
                  b.workers, directory / f"{b.name}.log")
        for b in pair.values()
    ]


def worker_nodes(directory: Path, config: Path, count: int = 1, *, slots: int = 1, mount: bool = False,
                 log_level: str = "INFO", first: int = 1, task_user: str | None = None) -> list[LocalNode]:
    """``count`` workers of ``slots`` slots each, data under ``directory/<name>``. A worker connects
    out to the balancers; its ``address`` is where it answers STATUS_QUERY (ready = answering;
    registered = listed in the active balancer's status). ``task_user``: their tasks run as that
    user (``--task-user``; the launcher must be root or hold the capabilities it needs)."""
    out = []
    names = [f"w{i}" for i in range(first, first + count)]
    make_keys(Path(config).parent, {name: "worker" for name in names})
    credentials = learn_keys(config)
    for name in names:
        address = f"tcp://127.0.0.1:{free_port()}"
        credentials.add_server(address, name)
        argv = ["worker", "--config", str(config), "--name", name, "--data-dir", str(directory / name),
                "--slots", str(slots), "--bind", address, "--log-level", log_level]
        if not mount:
            argv.append("--no-mount")
        if task_user is not None:
            argv += ["--task-user", task_user]
        out.append(LocalNode(name, argv, address, directory / f"{name}.log"))
    return out
