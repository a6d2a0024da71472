"""A rack on one machine: every node on its own host, started from its systemd unit, faults on demand.

Theory of operation
-------------------
Each host of the rack (3 masters, the balancer pair, 2 storage nodes, 2 workers) is a Linux
network namespace with one veth link to a bridge and its own address, 10.77.N.(10+k)/24. The
test process is the rack's client: it stays in the root namespace, with 10.77.N.1 on the bridge.
N is picked per run (under a lock, among the /24s no address or route of this machine uses) and
every name the harness makes (namespaces ``crk<pid>[k]-m1``, links ``crk<pid>[k]m1``, the bridge
``crk<pid>[k]br``) starts with a prefix of this process's pid, so two runs, or a run and the
leftovers of a killed one, never meet.

Each host is laid out as an operator lays out a real one (doc/operations.md, "A rack"), under
its own directory ROOT: ROOT/etc/cluster/cluster.toml is deploy/cluster.example.toml with the
rack's addresses; the keys come from ``cluster keys init`` on the operator's side, and each host
gets the allow-list and only its own secret (the masters also the Raft secret). The node is
started from its unit's ExecStart line, read from deploy/systemd/, inside its namespace (``ip
netns exec``), with the unit's Environment= and the directories of its StateDirectory= and
CacheDirectory= made as systemd makes them. The one substitution is where an install puts
things (``installed``): /opt/cluster is this checkout (its .venv), /etc/cluster, /var/lib and
/var/cache are the host's own under ROOT; and the worker's task user ``cluster-task`` is
``nobody`` (a user every Debian machine has). systemd is not PID 1 here: User=, the sandbox
and Restart= are not exercised (tests/rack/test_units.py runs ``systemd-analyze verify``).

Faults: ``isolate(host)`` takes the bridge's end of the host's link down (the host hears
nothing and nobody hears it, the client included); ``cut(a, b)`` drops, with nftables inside
the namespaces, every packet between the hosts of ``a`` and those of ``b`` (``one_way=True``:
only what ``a`` sends to ``b``); ``heal()`` undoes every cut and isolation. A receiver in a
namespace drops on input (the sender's packets leave and vanish, as on a cut cable); where the
receiver is the client, the sender drops on output. ``signal``, ``kill`` and ``restart`` act on
a host's node by pid.

A slow network (this kernel has no netem): every host runs a delay proxy (tests/rack/netem.py)
from the moment its link is made, and an nftables nat rule in its namespace sends every TCP
connection coming in over its link through it, so each direction of every link, the client's
included, passes one proxy. The proxies pass bytes straight through until ``delay(ms,
jitter_ms)`` sets, at run time, a delay on the connections the given hosts accept (all hosts:
every link, each way once; open connections too, as netem on a live link). ``loss(percent)``
drops that share of the packets the given hosts receive, and of those they send the client
(nftables ``numgen random``: TCP retransmits them). ``heal()`` clears delay and loss too.

``down()`` tears everything down whatever happened: the nodes by pid (SIGTERM, SIGKILL after a
grace) and every descendant seen (checked by start time, so a reused pid is never signalled),
and the hosts' delay proxies by pid, then the namespaces and the bridge by name. Nothing is ever
found or stopped by process name.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterable

from cluster.client import Client
from cluster.node import keys
from cluster.node.config import load_cluster_config
from cluster.node.status import query_status
from cluster.pids import descendants

from . import netem

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
EXAMPLE = REPO / "deploy" / "cluster.example.toml"
CLUSTER = REPO / ".venv" / "bin" / "cluster"
TASK_USER = "nobody"  # the worker unit's cluster-task: a user every Debian machine has
LOCK = Path("/tmp/crk-rack.lock")  # held while a run picks its /24 and puts it on its bridge

# The rack's hosts: name -> (role, unit file, the address deploy/cluster.example.toml gives it).
HOSTS: dict[str, tuple[str, str, str | None]] = {
    "m1": ("master", "cluster-master@.service", "10.0.0.1"),
    "m2": ("master", "cluster-master@.service", "10.0.0.2"),
    "m3": ("master", "cluster-master@.service", "10.0.0.3"),
    "s1": ("storage", "cluster-storage@.service", "10.0.0.11"),
    "s2": ("storage", "cluster-storage@.service", "10.0.0.12"),
    "b1": ("balancer", "cluster-balancer@.service", "10.0.0.5"),
    "b2": ("balancer", "cluster-balancer@.service", "10.0.0.6"),
    "w1": ("worker", "cluster-worker.service", None),
    "w2": ("worker", "cluster-worker.service", None),
}  # in the order doc/operations.md starts them: masters, storage, balancers (primary first), workers
CLIENT = "client"  # the test process, in the root namespace
_runs = count()


class RackError(RuntimeError):
    """The rack could not be built or torn down."""


class RackTimeout(AssertionError):
    """A condition did not hold by its deadline (the message carries every host's log tail)."""


def unavailable() -> str | None:
    """Why a rack cannot be built on this machine, or None."""
    if os.geteuid() != 0:
        return "a rack needs root (network namespaces, a bridge, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (deploy/system-packages.sh installs iproute2 and nftables)"
    probe = f"crk{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# ---- the units and the install -----------------------------------------------------------------


def installed(text: str, root: Path) -> str:
    """``text`` (a unit's line, the example config) with the paths of an operator's install on
    the host whose tree is ``root``: the project where the units expect /opt/cluster, and the
    host's own /etc/cluster, /var/lib and /var/cache."""
    for path, here in (("/opt/cluster", str(REPO)), ("/etc/cluster", f"{root}/etc/cluster"),
                       ("/var/lib/", f"{root}/var/lib/"), ("/var/cache/", f"{root}/var/cache/")):
        text = text.replace(path, here)
    return text


@dataclass(frozen=True)
class Unit:
    """What the rack takes from a unit file: its command line, environment and directories."""

    file: str
    exec_start: str
    environment: dict[str, str]
    directories: list[tuple[str, str, int]]  # (/var/lib or /var/cache, relative path, mode)

    @classmethod
    def read(cls, file: str) -> "Unit":
        settings: dict[str, list[str]] = {}
        for line in (UNITS / file).read_text().splitlines():
            line = line.strip()
            if line and line[0] not in "#;[" and "=" in line:
                key, value = line.split("=", 1)
                settings.setdefault(key.strip(), []).append(value.strip())
        (exec_start,) = settings["ExecStart"]
        if exec_start[:1] in "-+@!:":
            raise RackError(f"{file}: ExecStart={exec_start}: the rack runs plain command lines only")
        env: dict[str, str] = {}
        for value in settings.get("Environment", []):
            env.update(item.split("=", 1) for item in shlex.split(value))
        dirs = []
        for kind, base in (("State", "/var/lib/"), ("Cache", "/var/cache/")):
            mode = int(settings.get(f"{kind}DirectoryMode", ["0755"])[-1], 8)
            for value in settings.get(f"{kind}Directory", []):
                dirs += [(base, d, mode) for d in value.split()]
        return cls(file, exec_start, env, dirs)


@dataclass
class Host:
    """One host of the rack: its namespace, link, address, tree, and the node its unit runs."""

    name: str
    role: str
    ip: str
    netns: str | None  # None: the client, in the root namespace
    veth: str | None  # the bridge's end of its link
    root: Path
    unit: Unit | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    proxy: subprocess.Popen | None = field(default=None, repr=False)  # its delay proxy (netem.py)
    strays: dict[int, str] = field(default_factory=dict)  # descendants seen: pid -> start time

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "cluster"

    @property
    def config(self) -> Path:
        return self.etc / "cluster.toml"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        """The unit's ExecStart for this host, as its install has it."""
        line = self.unit.exec_start.replace("%i", self.name).replace("%H", self.name)
        return [TASK_USER if arg == "cluster-task" else arg for arg in shlex.split(installed(line, self.root))]


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _run(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RackError(f"{shlex.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


# ---- the rack ---------------------------------------------------------------------------------


class Rack:
    """The hosts of ``HOSTS`` on a bridge, under ``directory``; ``up()`` builds and starts it,
    ``down()`` tears it down (call it whatever ``up()`` did)."""

    def __init__(self, directory: Path) -> None:
        k = next(_runs)
        self.prefix = f"crk{os.getpid()}{k if k else ''}"  # at most 11 characters: interface names have 15
        self.dir = Path(directory)
        self.bridge = f"{self.prefix}br"
        self.subnet: int | None = None
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []  # made by this rack, to delete by name
        self.config: Any = None  # the client's view of the cluster (cluster.node.config.ClusterConfig)
        self._bridge_made = False

    # ---- building ---------------------------------------------------------------------------

    def up(self, timeout: float = 90.0) -> "Rack":
        self._make_network()
        self._lay_out()
        self.wait(lambda: all(self._proxy_answers(h) for h in self.nodes()), 20, "every host's delay proxy")
        for host in self.nodes():
            self.start(host.name)

        def serving() -> bool:
            exited = [f"{h.name} (exit status {h.process.returncode})" for h in self.nodes() if not h.running()]
            if exited:
                raise RackError(f"exited while the rack came up: {', '.join(exited)}\n{self.tails()}")
            return self.unhealthy() is None

        self.wait(serving, timeout, "the rack to serve", why=self.unhealthy)
        return self

    def nodes(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.netns is not None]

    def _make_network(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _run(["ip", "-4", "-o", "addr", "show"]) + _run(["ip", "-4", "route", "show", "table", "all"])
            free = [n for n in range(1, 255) if f"10.77.{n}." not in used]
            if not free:
                raise RackError("every 10.77.N.0/24 is in use on this machine")
            self.subnet = free[os.getpid() % len(free)]
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            self._bridge_made = True
            _run(["ip", "addr", "add", f"10.77.{self.subnet}.1/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
        self.hosts[CLIENT] = Host(CLIENT, "client", f"10.77.{self.subnet}.1", None, None, self.dir / "hosts" / CLIENT)
        for k, (name, (role, unit, _)) in enumerate(HOSTS.items()):
            host = Host(name, role, f"10.77.{self.subnet}.{10 + k}", f"{self.prefix}-{name}", f"{self.prefix}{name}",
                        self.dir / "hosts" / name, Unit.read(unit))
            self.hosts[name] = host
            self._link(host)

    def _link(self, host: Host) -> None:
        ns, veth = host.netns, host.veth
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p"])
        _run(["ip", "link", "set", f"{veth}p", "netns", ns])
        _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        for argv in (["link", "set", f"{veth}p", "name", "eth0"], ["addr", "add", f"{host.ip}/24", "dev", "eth0"],
                     ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            _run(["ip", "-n", ns, *argv])
        # The table the faults fill: a chain on input and one on output for cuts, the same for
        # loss (a drop in either is final), accepting by default.
        self._nft(ns, "table inet rack {\n chain input { type filter hook input priority 0; policy accept; }\n"
                      " chain output { type filter hook output priority 0; policy accept; }\n"
                      " chain loss_in { type filter hook input priority 1; policy accept; }\n"
                      " chain loss_out { type filter hook output priority 1; policy accept; }\n}\n")
        self._nft(ns, netem.nat_rules())
        self.log(host.name).parent.mkdir(parents=True, exist_ok=True)
        host.proxy = netem.start(ns, self._control(host), self.log(f"{host.name}.netem"), seed=len(self.namespaces))

    def _control(self, host: Host) -> Path:
        return self.dir / "netem" / f"{host.name}.sock"

    def _proxy_answers(self, host: Host) -> bool:
        if host.proxy.poll() is not None:
            raise RackError(f"{host.name}'s delay proxy exited ({host.proxy.returncode}): "
                            f"{self.log(host.name + '.netem').read_text(errors='replace')[-2000:]}")
        try:
            return bool(netem.control(self._control(host), timeout=1.0))
        except OSError:
            return False

    def _nft(self, ns: str, script: str) -> None:
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=script)

    def _lay_out(self) -> None:
        """Each host's /etc/cluster as doc/operations.md lays it out; the keys from `cluster keys
        init` on the operator's side, each host given only its own secret."""
        addresses = {example: self.hosts[name].ip for name, (_, _, example) in HOSTS.items() if example}
        text = re.sub(r"\b10\.0\.0\.(\d+)\b", lambda m: addresses[m.group(0)], EXAMPLE.read_text())
        for host in self.hosts.values():
            host.etc.mkdir(parents=True, exist_ok=True)
            host.config.write_text(installed(text, host.root))
        operator = self.dir / "operator"
        workers = [a for name, (role, _, _) in HOSTS.items() if role == "worker" for a in ("--worker", name)]
        _run([str(CLUSTER), "keys", "init", str(operator), "--config", str(self.hosts[CLIENT].config), *workers])
        raft_secret = secrets.token_urlsafe(32) + "\n"
        for host in self.hosts.values():
            shutil.copyfile(operator / "keys.toml", host.etc / "keys.toml")
            (host.etc / "keys").mkdir(mode=0o700, exist_ok=True)
            own = host.etc / "keys" / f"{host.name}.key_secret"
            shutil.copyfile(operator / "keys" / f"{host.name}.key_secret", own)
            own.chmod(0o600)
            if host.role == "master":
                (host.etc / "raft.secret").write_text(raft_secret)
                (host.etc / "raft.secret").chmod(0o600)
            for base, rel, mode in (host.unit.directories if host.unit else []):
                path = Path(installed(base, host.root)) / rel.replace("%i", host.name)
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(mode)
        self.config = load_cluster_config(self.hosts[CLIENT].config)
        credentials = keys.client_credentials(self.config.security, self.config.servers())
        for host in self.nodes():
            if host.role == "worker":
                credentials.add_server(self.address(host.name), host.name)

    # ---- nodes ------------------------------------------------------------------------------

    def address(self, name: str) -> str:
        """Where host ``name``'s node answers STATUS_QUERY."""
        host = self.hosts[name]
        cfg = self.config
        if host.role == "master":
            return cfg.masters[name]
        if host.role == "balancer":
            return cfg.balancers[name].workers
        if host.role == "storage":
            return cfg.storage_nodes[name]
        argv = host.command()
        return argv[argv.index("--bind") + 1].replace("0.0.0.0", host.ip)

    def log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def start(self, name: str) -> None:
        """Start host ``name``'s node from its unit's command line, inside its namespace."""
        host = self.hosts[name]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": str(host.root / "var" / "lib" / "cluster"),
               **{k: installed(v, host.root) for k, v in host.unit.environment.items()}}
        if "PYTHONPATH" in os.environ:  # another checkout's code under this venv (e.g. an older commit's)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as log:
            log.write(f"---- rack: {shlex.join(host.command())}\n".encode())
            log.flush()
            # `ip netns exec` enters the namespace and execs the command: the pid is the node's.
            host.process = subprocess.Popen(["ip", "netns", "exec", host.netns, *host.command()], env=env, cwd="/",
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def _note_strays(self, host: Host) -> None:
        if host.running():
            for pid in descendants(host.pid):
                if (started := _start_time(pid)) is not None:
                    host.strays.setdefault(pid, started)

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to host ``name``'s node (SIGSTOP, SIGCONT, SIGTERM...), by pid."""
        host = self.hosts[name]
        self._note_strays(host)
        if host.running():
            os.kill(host.pid, sig)

    def kill(self, name: str) -> None:
        """SIGKILL host ``name``'s node and reap it (its slot processes may outlive it)."""
        self.signal(name, signal.SIGKILL)
        host = self.hosts[name]
        if host.process is not None:
            host.process.wait(10)

    def restart(self, name: str) -> None:
        """Start host ``name``'s node again from its unit line (killing it first if it runs)."""
        self.kill(name)
        self.start(name)

    # ---- faults -----------------------------------------------------------------------------

    def isolate(self, name: str) -> None:
        """Cut host ``name`` off from everything: the bridge's end of its link goes down."""
        _run(["ip", "link", "set", self.hosts[name].veth, "down"])

    def cut(self, a: Iterable[str], b: Iterable[str], *, one_way: bool = False) -> None:
        """Drop every packet from the hosts of ``a`` to those of ``b``, and back unless ``one_way``."""
        a, b = list(a), list(b)
        pairs = [(x, y) for x in a for y in b] + ([] if one_way else [(y, x) for x in a for y in b])
        rules: dict[str, list[str]] = {}
        for src, dst in pairs:
            s, d = self.hosts[src], self.hosts[dst]
            if d.netns is not None:
                rules.setdefault(d.netns, []).append(f"add rule inet rack input ip saddr {s.ip} drop")
            elif s.netns is not None:
                rules.setdefault(s.netns, []).append(f"add rule inet rack output ip daddr {d.ip} drop")
            else:
                raise RackError(f"{src} and {dst} are both outside the rack's namespaces")
        for ns, lines in rules.items():
            self._nft(ns, "\n".join(lines) + "\n")

    def delay(self, ms: float, jitter_ms: float = 0.0, hosts: Iterable[str] | None = None) -> None:
        """Delay each direction of every TCP connection the hosts of ``hosts`` (default: every
        host, so every link) accept by ``ms`` +- a uniform ``jitter_ms``, order kept; 0 clears it."""
        for name in self._hosts(hosts):
            netem.control(self._control(self.hosts[name]), delay_ms=ms, jitter_ms=jitter_ms)

    def loss(self, percent: float, hosts: Iterable[str] | None = None) -> None:
        """Drop ``percent`` % of the packets the hosts of ``hosts`` (default: every host) receive
        over their links, and of those they send the client; 0 clears it."""
        for name in self._hosts(hosts):
            host = self.hosts[name]
            lines = ["flush chain inet rack loss_in", "flush chain inet rack loss_out"]
            if percent > 0:
                drop = f"numgen random mod 100000 < {round(percent * 1000)} counter drop"
                lines += [f"add rule inet rack loss_in iif \"eth0\" {drop}",
                          f"add rule inet rack loss_out oif \"eth0\" ip daddr {self.hosts[CLIENT].ip} {drop}"]
            self._nft(host.netns, "\n".join(lines) + "\n")

    def links(self, name: str) -> dict[str, Any]:
        """Host ``name``'s links: its proxy's delay and jitter now and the connections it carried,
        and ``lost``, the packets its loss rules dropped since ``loss()`` set them."""
        host = self.hosts[name]
        listed = _run(["ip", "netns", "exec", host.netns, "nft", "list", "table", "inet", "rack"])
        lost = sum(int(n) for n in re.findall(r"counter packets (\d+)", listed))  # only the loss rules count
        return {**netem.control(self._control(host)), "lost": lost}

    def _hosts(self, hosts: Iterable[str] | None) -> list[str]:
        names = [h.name for h in self.nodes()] if hosts is None else list(hosts)
        if unknown := [n for n in names if self.hosts[n].netns is None]:
            raise RackError(f"{unknown}: only the rack's hosts have links to slow down (the client's are theirs)")
        return names

    def heal(self) -> None:
        """Undo every cut and isolation, and clear delay and loss."""
        for host in self.nodes():
            self._nft(host.netns, "flush chain inet rack input\nflush chain inet rack output\n"
                                  "flush chain inet rack loss_in\nflush chain inet rack loss_out\n")
            _run(["ip", "link", "set", host.veth, "up"])
        self.delay(0)

    # ---- what the nodes say ------------------------------------------------------------------

    def detail(self, name: str, timeout: float = 1.0) -> dict[str, Any] | None:
        """Host ``name``'s status detail, or None if it is not running or does not answer."""
        if not self.hosts[name].running():
            return None
        reply = query_status([self.address(name)], timeout=timeout)[0].reply
        return reply.detail if reply is not None else None

    def details(self, names: Iterable[str], timeout: float = 1.0) -> dict[str, dict[str, Any] | None]:
        names = list(names)
        results = query_status([self.address(n) for n in names], timeout=timeout)
        return {n: (r.reply.detail if r.reply is not None and self.hosts[n].running() else None)
                for n, r in zip(names, results)}

    def role(self, role: str) -> list[str]:
        return [h.name for h in self.nodes() if h.role == role]

    def leader(self) -> str | None:
        """The master that leads and serves, if one does."""
        return next((n for n, d in self.details(self.role("master")).items()
                     if d and d["state"] == "leader" and d["serving"]), None)

    def active(self) -> str | None:
        """The balancer that is active and attached to the master leader, if one is."""
        return next((n for n, d in self.details(self.role("balancer")).items()
                     if d and d["state"] == "active" and d["master"].get("attached")), None)

    def unhealthy(self) -> str | None:
        """Why the rack is not serving as a whole, or None: every node up and answering, one
        master leading and serving (the others following), one balancer active and attached
        (the other passive) with every worker registered."""
        exited = [h.name for h in self.nodes() if not h.running()]
        if exited:
            return f"not running: {', '.join(exited)}"
        d = self.details(h.name for h in self.nodes())
        down = [n for n, x in d.items() if x is None]
        if down:
            return f"not answering: {', '.join(down)}"
        masters = sorted((d[m]["state"], m) for m in self.role("master"))
        if [s for s, _ in masters] != ["follower", "follower", "leader"] or not any(
                d[m]["serving"] for _, m in masters if d[m]["state"] == "leader"):
            return f"masters: {masters}"
        pair = {b: (d[b]["state"], d[b]["master"].get("attached")) for b in self.role("balancer")}
        if sorted(s for s, _ in pair.values()) != ["active", "passive"] or not any(
                a for s, a in pair.values() if s == "active"):
            return f"balancers: {pair}"
        active = next(b for b, (s, _) in pair.items() if s == "active")
        registered = sorted(w["name"] for w in d[active]["workers"])
        if registered != self.role("worker"):
            return f"workers registered with {active}: {registered}"
        return None

    def client(self, timeout: float = 30.0) -> Client:
        """A client as a user of the rack has it: its host's config and client key."""
        return Client(config=self.hosts[CLIENT].config, timeout=timeout)

    def tails(self, chars: int = 2500) -> str:
        out = []
        for host in self.nodes():
            text = self.log(host.name).read_text(errors="replace") if self.log(host.name).exists() else ""
            out.append(f"--- {host.name} ({host.ip}, pid {host.pid}) ---\n{text[-chars:]}")
        return "\n".join(out)

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str,
             why: Callable[[], Any] | None = None) -> Any:
        """Poll ``predicate`` until it returns something truthy; at the deadline raise
        ``RackTimeout`` with ``why()`` (if given) and every host's log tail."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                because = f" ({why()})" if why is not None else ""
                raise RackTimeout(f"timed out after {timeout:g} s waiting for {what}{because}\n{self.tails()}")
            time.sleep(0.05)  # the poll interval of a deadline loop

    def wait_healthy(self, timeout: float = 30.0) -> None:
        self.wait(lambda: self.unhealthy() is None, timeout, "the whole rack to serve", why=self.unhealthy)

    # ---- tearing down -------------------------------------------------------------------------

    def _stop_proxies(self, grace: float) -> None:
        """The hosts' delay proxies, by pid: SIGTERM, SIGKILL after ``grace`` (they keep no state)."""
        proxies = [h.proxy for h in self.nodes() if h.proxy is not None]
        for proxy in proxies:
            if proxy.poll() is None:
                proxy.terminate()
        for proxy in proxies:
            try:
                proxy.wait(grace)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait(10)

    def down(self, grace: float = 5.0) -> list[str]:
        """Stop every node by pid (SIGTERM, SIGKILL after ``grace``) and every descendant seen,
        delete the namespaces and the bridge by name. Returns what could not be undone."""
        problems: list[str] = []
        nodes = [h for h in self.hosts.values() if h.process is not None]
        for host in nodes:
            self._note_strays(host)
            if host.running():
                for sig in (signal.SIGTERM, signal.SIGCONT):  # a stopped node gets SIGTERM once continued
                    os.kill(host.pid, sig)
        deadline = time.monotonic() + grace
        for host in nodes:
            try:
                host.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._note_strays(host)
                host.process.kill()
                host.process.wait(10)
        for host in nodes:
            for pid, started in host.strays.items():
                if _start_time(pid) == started:
                    os.kill(pid, signal.SIGKILL)
        self._stop_proxies(grace)
        for host in self.nodes():  # a veth pair goes with its bridge end at once (with its namespace, later)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        for ns in self.namespaces:
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if done.returncode != 0:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        self.namespaces = []
        if self._bridge_made:
            done = subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, text=True)
            if done.returncode != 0:
                problems.append(f"ip link del {self.bridge}: {done.stderr.strip()}")
            self._bridge_made = False
        left = [ns for ns in _run(["ip", "netns", "list"]).split() if ns.startswith(f"{self.prefix}-")]
        left += [name for name in re.findall(r"^\d+: ([^:@]+)", _run(["ip", "-o", "link", "show"]), re.M)
                 if name.startswith(self.prefix)]
        problems += [f"left behind: {name}" for name in left]
        return problems
