"""A local cluster in the background: what ``cluster up``, ``cluster down`` and ``cluster status`` do.

Theory of operation
-------------------
A local cluster lives in one directory D (``--dir``; default ``$CLUSTER_HOME``, else
``~/.cluster``): ``D/cluster.toml`` (what every node and ``Client()`` read), ``D/nodes.json`` (the
record of what ``up`` started: name, role, address, pid, log, data dir), and per node ``D/<name>/``
(its data) and ``D/<name>.log``. ``D/.local-cluster`` marks a directory ``up`` made, so a later
``up`` may clear the previous run's state there and nowhere else.

``up`` starts 3 masters, the balancer pair, 2 storage nodes (replicas 2) and N workers with
``cluster.local.LocalNode`` (each in its own session, so they outlive ``up``), writes nodes.json
at once (so ``down`` can stop them even if ``up`` itself dies), then polls every node's
STATUS_REPLY until the cluster serves: a serving master leader, an active balancer attached to
it, every worker registered with that balancer, every storage node answering. ``assess`` (pure)
reads one round of replies and says what is still missing and whose log to show. If a node exits
or the deadline passes, ``up`` stops every node it started, by pid, and names the node.

``down`` stops by pid, never by name. Each pid is opened as a pidfd first and kept only if its
``/proc/<pid>/cmdline`` is one of our nodes (``python -m cluster`` with a path under D), so a
reused pid is never signalled, and the pidfd then pins that very process. Workers go first (on
SIGTERM they unmount their FUSE view and stop their slots), then balancers, storage, masters:
SIGTERM, wait on the pidfds until a shared deadline, SIGKILL what is left and the descendants
it leaves behind (slot processes, task commands). Then a FUSE mount child a SIGKILLed worker left
(``D/<worker>/mount.pid``) is stopped the same way, and FUSE mounts still under D are unmounted
(lazily if busy).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from cluster.local import LocalNode, balancer_nodes, master_nodes, stop_all, storage_nodes, worker_nodes
from cluster.node.config import ConfigError, cluster_home, load_cluster_config
from cluster.node.keys import KeysError, client_credentials
from cluster.node.status import StatusResult, query_status
from worker.fusefs import unmount

ROLES = ("master", "balancer", "storage", "worker")
STOP_ORDER = ("worker", "balancer", "storage", "master")
MARKER = ".local-cluster"
NODES = "nodes.json"
_OUR_ENTRIES = re.compile(r"[msbw]\d+(\.log)?|cluster\.toml|masters\.toml|nodes\.json")


class UpError(Exception):
    """One sentence for the user: what went wrong and what to do."""


@dataclass(frozen=True)
class NodeRecord:
    """One process of a local cluster, as nodes.json lists it."""

    name: str
    role: str
    address: str
    pid: int | None
    log: str
    data_dir: str | None = None


# ---- where the cluster is -------------------------------------------------------------------------


def read_nodes(directory: Path) -> list[NodeRecord] | None:
    """The records of ``directory/nodes.json``, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((directory / NODES).read_text())
        return [NodeRecord(**n) for n in data["nodes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_nodes(directory: Path, records: list[NodeRecord]) -> None:
    """Write ``directory/nodes.json`` whole (a reader never sees half of it)."""
    tmp = directory / (NODES + ".tmp")
    tmp.write_text(json.dumps({"dir": str(directory), "config": str(directory / "cluster.toml"),
                               "nodes": [asdict(r) for r in records]}, indent=2) + "\n")
    tmp.replace(directory / NODES)


# ---- processes, by pid ------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_ours(pid: int, directory: Path) -> bool:
    """Whether ``pid`` runs one of D's nodes: ``python -m cluster …`` with a path under D."""
    args = _cmdline(pid)
    under = str(directory) + os.sep
    return "cluster" in args[:4] and any(a.startswith(under) for a in args)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _open(pid: int | None, directory: Path | None) -> int | None:
    """A pidfd for ``pid`` if it is alive (and, with ``directory``, one of D's nodes)."""
    if not pid or pid <= 0:
        return None
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return None
    if directory is not None and not is_ours(pid, directory):
        os.close(fd)
        return None
    return fd


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc), e.g. a worker's slot processes, which run
    in sessions of their own."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def _wait_exit(fds: dict[int, Any], deadline: float) -> dict[int, Any]:
    """Wait on the pidfds until all exited or the deadline; returns those still running."""
    left = dict(fds)
    poller = select.poll()
    for fd in left:
        poller.register(fd, select.POLLIN)
    while left and (rest := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(rest * 1000):
            poller.unregister(fd)
            left.pop(fd, None)
    return left


def _wait_reaped(fds: dict[int, Any], deadline: float) -> None:
    """Wait until the exited processes behind ``fds`` are reaped (gone from the process table),
    so that a caller checking their pids afterwards finds none. Their parent now is init (or a
    subreaper), which may reap only every second or so; our own children are left to us."""
    left = [fd for fd in fds if _parent(_pid_of(fd)) != os.getpid()]
    while left and time.monotonic() < deadline:
        for fd in list(left):
            try:
                signal.pidfd_send_signal(fd, 0)
            except ProcessLookupError:
                left.remove(fd)
        if left:
            time.sleep(0.02)  # the poll interval of a deadline loop: reaping by another process has no event


def _parent(pid: int | None) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) if pid else None
    except (OSError, ValueError, IndexError):
        return None


def _signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


@dataclass
class Stopped:
    """What ``stop_processes`` did: processes that exited on SIGTERM, and those it SIGKILLed."""

    terminated: int = 0
    killed: int = 0

    def add(self, other: "Stopped") -> None:
        self.terminated += other.terminated
        self.killed += other.killed


def stop_processes(fds: dict[int, str], deadline: float, grace: float = 2.0) -> Stopped:
    """SIGTERM the processes behind ``fds`` (pidfd → name), wait until ``deadline`` (at least
    ``grace`` seconds), then SIGKILL what is left. The caller closes the pidfds."""
    done = Stopped()
    for fd in fds:
        _signal(fd, signal.SIGTERM)
    left = _wait_exit(fds, max(deadline, time.monotonic() + grace))
    done.terminated = len(fds) - len(left)
    for fd in left:
        _signal(fd, signal.SIGKILL)
    done.killed = len(left)
    _wait_exit(left, time.monotonic() + 5.0)
    return done


def stop_records(records: list[NodeRecord], directory: Path, timeout: float = 15.0) -> Stopped:
    """Stop D's node processes by pid, workers first, then balancers, storage, masters. Only pids
    whose cmdline is one of D's nodes are touched. Descendants a SIGKILLed node leaves behind
    (slot processes, their commands, a mount child) are SIGKILLed too. Returns once every one
    of them is gone from the process table (or a few seconds after)."""
    deadline = time.monotonic() + timeout
    done = Stopped()
    held: list[int] = []  # every pidfd opened, closed at the end
    try:
        for role in STOP_ORDER:
            fds: dict[int, str] = {}
            for r in records:
                if r.role == role and (fd := _open(r.pid, directory)) is not None:
                    fds[fd] = r.name
            held += fds
            orphans = _family_of(fds)  # taken now: a SIGKILLed node's children are reparented
            held += orphans
            if fds:
                done.add(stop_processes(fds, deadline))
            left = _wait_exit(orphans, time.monotonic() + 1.0)
            for fd in left:
                _signal(fd, signal.SIGKILL)
            _wait_exit(left, time.monotonic() + 5.0)
            done.killed += len(left)
        _wait_reaped(dict.fromkeys(held), time.monotonic() + 5.0)
    finally:
        for fd in held:
            os.close(fd)
    return done


def _family_of(fds: dict[int, str]) -> dict[int, str]:
    """Pidfds for the live descendants of the processes behind ``fds``."""
    out: dict[int, str] = {}
    for fd, name in fds.items():
        pid = _pid_of(fd)
        for kid in descendants(pid) if pid else ():
            kfd = _open(kid, None)
            if kfd is not None:
                out[kfd] = f"{name}/{kid}"
    return out


def _pid_of(fd: int) -> int | None:
    """The pid behind a pidfd (its /proc/self/fdinfo ``Pid:`` line)."""
    try:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


# ---- FUSE mounts a dead worker left -------------------------------------------------------------


def _fuse_mounts_under(directory: Path) -> list[str]:
    """FUSE mount points under ``directory``, deepest first (from /proc/self/mountinfo)."""
    under = str(directory) + os.sep
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                mine, _, theirs = line.partition(" - ")
                fields = mine.split()
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]) if len(fields) > 4 else ""
                if point.startswith(under) and theirs.split(" ", 1)[0].startswith("fuse"):
                    found.append(point)
    except OSError:
        return []
    return sorted(set(found), key=len, reverse=True)


def sweep_mounts(directory: Path, deadline: float) -> tuple[Stopped, list[str]]:
    """Stop the mount children SIGKILLed workers left (their pid in ``D/<worker>/mount.pid``), then
    unmount the FUSE mounts still under D (lazily when busy). Returns what it stopped and the
    mount points it unmounted."""
    fds: dict[int, str] = {}
    for pid_file in directory.glob("*/mount.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if (fd := _open(pid, directory)) is not None:
            fds[fd] = f"{pid_file.parent.name}'s mount"
    try:
        stopped = stop_processes(fds, deadline)
        _wait_reaped(fds, time.monotonic() + 5.0)
    finally:
        for fd in fds:
            os.close(fd)
    for pid_file in directory.glob("*/mount.pid"):
        pid_file.unlink(missing_ok=True)
    unmounted = []
    for point in _fuse_mounts_under(directory):
        try:
            unmount(point)
        except OSError:
            try:
                unmount(point, lazy=True)
            except OSError as exc:
                raise UpError(f"cannot unmount {point} ({exc}): unmount it by hand (`fusermount3 -uz {point}`)") from None
        unmounted.append(point)
    return stopped, unmounted


# ---- up ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    """One round of status replies read: ready, or what is missing (node name, what) in order."""

    ready: bool
    missing: tuple[tuple[str, str], ...] = ()

    def words(self) -> str:
        return ", ".join(f"{name}: {what}" for name, what in self.missing)


def assess(nodes: list[NodeRecord], details: dict[str, dict | None]) -> Readiness:
    """Whether the cluster serves, from each node's status detail (None: no answer). Serving: a
    master leader that serves, an active balancer attached to it, every worker listed by that
    balancer, every node answering."""
    missing = [(n.name, "not answering yet") for n in nodes if details.get(n.name) is None]
    by_role = {role: [n for n in nodes if n.role == role] for role in ROLES}
    leader = next((m for m in by_role["master"]
                   if (d := details.get(m.name)) and d.get("state") == "leader" and d.get("serving")), None)
    if leader is None and by_role["master"]:
        missing.append((by_role["master"][0].name, "no master leader serving yet"))
    active = next((b for b in by_role["balancer"] if (details.get(b.name) or {}).get("state") == "active"), None)
    listed: set[str] = set()
    if active is None:
        if by_role["balancer"]:
            missing.append((by_role["balancer"][0].name, "no balancer active yet"))
    else:
        d = details[active.name]
        link = d.get("master") or {}
        if not link.get("attached") or (leader is not None and link.get("address") != leader.address):
            missing.append((active.name, "not attached to the master leader yet"))
        listed = {w.get("name") for w in d.get("workers") or []}
    for w in by_role["worker"]:
        if details.get(w.name) is not None and (w.name not in listed or details[w.name].get("state") != "registered"):
            missing.append((w.name, "not registered with the active balancer yet"))
    return Readiness(not missing, tuple(missing))


def _tail(path: str | Path, lines: int = 1) -> str:
    """The last non-empty line(s) of a log, shortened, for a one-line error."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    last = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(last)[-240:] or "(empty log)"


def running_records(directory: Path) -> list[NodeRecord]:
    """The records of D's nodes.json whose process still runs (and is one of D's nodes)."""
    live = []
    for r in read_nodes(directory) or []:
        fd = _open(r.pid, directory)
        if fd is not None:
            os.close(fd)
            live.append(r)
    return live


def _prepare(directory: Path) -> None:
    """Make D ready for a new cluster: refuse if one runs there; clear a stopped one's state."""
    live = running_records(directory)
    if live:
        raise UpError(f"a cluster is already running in {directory} ({len(live)} processes): "
                      f"run `cluster down{_dir_flag(directory)}` first")
    if directory.exists() and any(directory.iterdir()) and not (directory / MARKER).exists():
        raise UpError(f"{directory} is not empty and was not made by `cluster up`: pass --dir with a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    sweep_mounts(directory, time.monotonic() + 10.0)
    for entry in directory.iterdir():
        if _OUR_ENTRIES.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    (directory / MARKER).write_text("made by `cluster up`; `cluster up` clears the nodes' state here\n")


def _dir_flag(directory: Path) -> str:
    return "" if directory == cluster_home() else f" --dir {directory}"


def _plan(directory: Path, workers: int, slots: int) -> list[tuple[str, LocalNode]]:
    """The nodes of a local cluster (roles with ``LocalNode``s); writes D/cluster.toml."""
    masters = master_nodes(directory, 3)
    _, storage = storage_nodes(directory, 2, masters=masters)
    config, pair = balancer_nodes(directory, 2)
    crew = worker_nodes(directory, config, workers, slots=slots, mount=True)
    return [("master", n) for n in masters] + [("balancer", n) for n in pair] + \
        [("storage", n) for n in storage] + [("worker", n) for n in crew]


def _record(role: str, node: LocalNode, directory: Path) -> NodeRecord:
    data = directory / node.name
    return NodeRecord(node.name, role, node.address, node.pid, str(node.log_path),
                      str(data) if role != "balancer" else None)


def up(directory: Path, workers: int = 1, slots: int | None = None, *, timeout: float = 60.0,
       progress: Callable[[str], None] = lambda what: None) -> list[NodeRecord]:
    """Start a local cluster in ``directory`` in the background and return once it serves (see
    the module docstring). Raises ``UpError`` (after stopping what it started) if it does not."""
    directory = Path(directory).expanduser().absolute()
    if workers < 1:
        raise UpError("--workers must be at least 1")
    slots = slots or max(1, (os.cpu_count() or 1) // workers)
    _prepare(directory)
    plan = _plan(directory, workers, slots)
    nodes = [n for _, n in plan]
    try:
        for _, node in plan:
            node.start()
        records = [_record(role, node, directory) for role, node in plan]
        write_nodes(directory, records)
        _wait_serving(plan, records, timeout, progress)
    except BaseException:
        started = [_record(role, node, directory) for role, node in plan if node.pid is not None]
        stop_records(started, directory, timeout=10.0)  # by pid, with what a killed worker leaves
        stop_all(nodes)  # reaps our children (all exited by now)
        sweep_mounts(directory, time.monotonic() + 5.0)
        forget(directory)
        raise
    return records


def _wait_serving(plan: list[tuple[str, LocalNode]], records: list[NodeRecord], timeout: float,
                  progress: Callable[[str], None]) -> None:
    """Poll every node's status until ``assess`` says the cluster serves; ``UpError`` naming the
    node to look at when a node exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    by_name = {r.name: r for r in records}
    while True:
        for _, node in plan:
            code = node.process.poll() if node.process else None
            if code is not None:
                raise UpError(f"{node.name} exited with status {code} while starting: {_tail(node.log_path)} "
                              f"(log: {node.log_path})")
        results = query_status([r.address for r in records], timeout=0.5)
        details = {r.name: (res.reply.detail if res.reply else None) for r, res in zip(records, results)}
        state = assess(records, details)
        if state.ready:
            return
        progress(state.words())
        if time.monotonic() > deadline:
            name, what = state.missing[0]
            log = by_name[name].log
            raise UpError(f"the cluster did not come up within {timeout:g} s ({name}: {what}); "
                          f"{name}'s log ends with: {_tail(log)} (log: {log})")
        time.sleep(0.1)  # the poll interval of a deadline loop, not a wait for the condition


def forget(directory: Path) -> None:
    """Drop what names a cluster's processes and ports: nodes.json and the config files."""
    for name in (NODES, "cluster.toml", "masters.toml"):
        (directory / name).unlink(missing_ok=True)


# ---- down --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownReport:
    """What ``down`` found and did."""

    running: int  # processes of nodes.json that were still running
    terminated: int  # exited on SIGTERM
    killed: int  # SIGKILLed (nodes past the deadline, their orphaned children, leftover mount children)
    unmounted: tuple[str, ...]


def down(directory: Path, timeout: float = 15.0) -> DownReport:
    """Stop D's cluster by pid (see the module docstring); forget its nodes and config."""
    directory = Path(directory).expanduser().absolute()
    records = read_nodes(directory) or []
    live = running_records(directory)
    done = stop_records(records, directory, timeout)
    swept, unmounted = sweep_mounts(directory, time.monotonic() + 5.0) if directory.is_dir() else (Stopped(), [])
    if directory.is_dir() and (records or (directory / MARKER).exists()):
        forget(directory)
    return DownReport(len(live), done.terminated + swept.terminated, done.killed + swept.killed, tuple(unmounted))


# ---- status of a whole cluster ------------------------------------------------------------------------


def _state(role: str, detail: dict[str, Any]) -> str:
    if role == "storage":
        return "up"
    return str(detail.get("state", "up"))


def _extras(role: str, d: dict[str, Any]) -> dict[str, Any]:
    """A few role-specific facts for the status listing (``cluster status ADDRESS`` has them all)."""
    if role == "master":
        return {"term": d.get("term"), "leader": d.get("leader")}
    if role == "balancer":
        link = d.get("master") or {}
        return {"attached": bool(link.get("attached")), "workers": len(d.get("workers") or [])}
    if role == "worker":
        return {"slots": d.get("slots"), "free": d.get("free")}
    if role == "storage":
        return {"disk": d.get("disk")}
    return {}


def node_entry(role: str, name: str, address: str | None, result: StatusResult | None,
               log: str | None = None) -> dict[str, Any]:
    """One node of ``cluster status --json``: role, name, state, address, pid, version,
    uptime_s, health, and a few role-specific facts (or ``error`` when it does not answer)."""
    entry: dict[str, Any] = {"role": role, "name": name, "state": "down", "address": address, "pid": None,
                             "version": None, "uptime_s": None, "health": "down", "public_key": None}
    reply = result.reply if result is not None else None
    if reply is not None:
        entry.update(state=_state(role, reply.detail), pid=reply.pid, version=reply.version,
                     uptime_s=round(reply.uptime_ms / 1000, 1), health="up", public_key=reply.detail.get("public_key"),
                     **_extras(role, reply.detail))
    elif result is not None:
        entry["error"] = result.error
    if log is not None:
        entry["log"] = log
    return entry


def cluster_status(config_path: Path, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Every node of the cluster at ``config_path``: masters, balancers, storage nodes, and the
    workers (from nodes.json next to the config when ``cluster up`` made it; else the ones the
    active balancer lists, with address and pid None). Raises ``UpError`` if the config is wrong."""
    try:
        config = load_cluster_config(config_path)
        credentials = client_credentials(config.security, config.servers())
    except (ConfigError, KeysError) as exc:
        raise UpError(str(exc)) from None
    records = {r.name: r for r in read_nodes(Path(config_path).absolute().parent) or []}
    for r in records.values():
        if r.role == "worker" and r.address:
            credentials.add_server(r.address, r.name)
    nodes = [("master", n, a) for n, a in config.masters.items()]
    nodes += [("balancer", b.name, b.workers) for b in config.balancers.values()]
    nodes += [("storage", n, a) for n, a in config.storage_nodes.items()]
    nodes += [("worker", r.name, r.address) for r in records.values() if r.role == "worker"]
    results = query_status([a for _, _, a in nodes], timeout=timeout)
    out = [node_entry(role, name, address, res, records[name].log if name in records else None)
           for (role, name, address), res in zip(nodes, results)]
    if not any(r.role == "worker" for r in records.values()):
        out += _reported_workers(nodes, results)
    return out


def _reported_workers(nodes: list[tuple[str, str, str]], results: list[StatusResult]) -> list[dict[str, Any]]:
    """The workers the active balancer lists (a rack: workers only connect out, so this is
    what there is to see of them)."""
    for (role, _, _), res in zip(nodes, results):
        if role == "balancer" and res.reply is not None and res.reply.detail.get("state") == "active":
            return [{"role": "worker", "name": w.get("name"), "state": "registered", "address": None, "pid": None,
                     "version": None, "uptime_s": None, "health": "up", "slots": w.get("slots"),
                     "free": w.get("free"), "silent_s": w.get("silent_s")}
                    for w in res.reply.detail.get("workers") or []]
    return []
