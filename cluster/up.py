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

A cluster that served is recorded in ``D/local.json`` (``cluster.localstate``), which ``down``
keeps: the next ``up`` in D restarts that same cluster (same ports, keys, ledger, stored files;
logs appended), with the flags that differ applied where they safely can be; ``up --fresh``
removes the nodes' state first. ``up`` on a running cluster starts what of it is not running
(and the workers a larger --workers adds); ``restart NODE`` starts one dead node with its
recorded arguments. Both put the new pids in nodes.json, so ``down`` stops them too.

``down`` stops by pid, never by name (``cluster.pids``): workers first (on SIGTERM they unmount
their FUSE view and stop their slots), then balancers, storage, masters, SIGKILL past a shared
deadline, with the descendants a SIGKILLed node leaves behind; then the FUSE mount child of a
SIGKILLed worker and the mounts still under D.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from cluster import localstate
from cluster.local import LocalNode, balancer_nodes, learn_keys, master_nodes, stop_all, storage_nodes, worker_nodes
from cluster.localstate import ChangeRefused, Settings
from cluster.node.config import ConfigError, cluster_home, load_cluster_config
from cluster.node.keys import KeysError, client_credentials
from cluster.node.status import StatusResult, query_status
from cluster.pids import (STOP_ORDER, Stopped, UpError, alive, descendants, is_ours, open_ours, stop_records,
                          sweep_mounts, sweep_worker_mount)

__all__ = ["UpError", "NodeRecord", "STOP_ORDER", "Stopped", "alive", "descendants", "is_ours", "stop_records",
           "sweep_mounts", "read_nodes", "write_nodes", "up", "down", "restart", "assess", "cluster_status"]

ROLES = ("master", "balancer", "storage", "worker")
MARKER = ".local-cluster"
NODES = "nodes.json"


@dataclass(frozen=True)
class NodeRecord:
    """One process of a local cluster, as nodes.json lists it."""

    name: str
    role: str
    address: str
    pid: int | None
    log: str
    data_dir: str | None = None
    argv: list[str] | None = field(default=None, compare=False)  # what it runs with (`python -m cluster ARGV`)


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
        fd = open_ours(r.pid, directory)
        if fd is not None:
            os.close(fd)
            live.append(r)
    return live


def _running(directory: Path, live: list[NodeRecord]) -> UpError:
    return UpError(f"a cluster is already running in {directory} ({len(live)} processes): "
                   f"run `cluster down{_dir_flag(directory)}` first")


def _check_ours(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()) and not (directory / MARKER).exists():
        raise UpError(f"{directory} is not empty and was not made by `cluster up`: pass --dir with a new or empty directory")


def _prepare(directory: Path) -> None:
    """Make D ready for a new cluster: refuse if one runs there; clear a stopped one's state."""
    live = running_records(directory)
    if live:
        raise _running(directory, live)
    _check_ours(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sweep_mounts(directory, time.monotonic() + 10.0)
    localstate.clear_state(directory)
    (directory / MARKER).write_text("made by `cluster up`; `cluster up --fresh` clears the nodes' state here\n")


def _dir_flag(directory: Path) -> str:
    return "" if directory == cluster_home() else f" --dir {directory}"


def _plan(directory: Path, workers: int, slots: int, masters: int = 3) -> list[tuple[str, LocalNode]]:
    """The nodes of a local cluster (roles with ``LocalNode``s); writes D/cluster.toml."""
    masters_ = master_nodes(directory, masters)
    _, storage = storage_nodes(directory, 2, masters=masters_)
    config, pair = balancer_nodes(directory, 2)
    crew = worker_nodes(directory, config, workers, slots=slots, mount=True)
    return [("master", n) for n in masters_] + [("balancer", n) for n in pair] + \
        [("storage", n) for n in storage] + [("worker", n) for n in crew]


def _record(role: str, node: LocalNode, directory: Path) -> NodeRecord:
    data = directory / node.name
    return NodeRecord(node.name, role, node.address, node.pid, str(node.log_path),
                      str(data) if role != "balancer" else None, list(node.argv))


def up(directory: Path, workers: int | None = None, slots: int | None = None, *, masters: int | None = None,
       fresh: bool = False, timeout: float = 60.0, progress: Callable[[str], None] = lambda what: None,
       say: Callable[[str], None] = lambda line: None) -> list[NodeRecord]:
    """Start the local cluster of ``directory`` in the background and return once it serves: the
    one recorded there (restarted, or what of it is not running), else a new one; ``None`` flags:
    as recorded (see the module docstring). ``say`` gets a line for each thing the user should
    know (what --fresh removes, what is restarted). Raises ``UpError`` (after stopping what it
    started) if it does not serve, or when the flags cannot apply to the recorded cluster."""
    directory = Path(directory).expanduser().absolute()
    if workers is not None and workers < 1:
        raise UpError("--workers must be at least 1")
    _check_ours(directory)
    live = running_records(directory)
    if fresh:
        if live:
            raise _running(directory, live)
        _fresh(directory, say)
    settings = localstate.read_settings(directory)
    if settings is None:
        return _start_new(directory, workers or 1, slots, masters or 3, timeout, progress)
    try:
        change = localstate.reconcile(settings, workers, slots, masters, running=bool(live))
    except ChangeRefused as exc:
        raise UpError(str(exc)) from None
    if live:
        return _bring_back(directory, settings, change, live, timeout, progress, say)
    return _restart_all(directory, settings, change, timeout, progress, say)


def _fresh(directory: Path, say: Callable[[str], None]) -> None:
    """``up --fresh``: say what of the stopped cluster in D goes, then remove it."""
    sweep_mounts(directory, time.monotonic() + 10.0)
    entries = localstate.state_entries(directory)
    if entries:
        say(f"--fresh: removing {localstate.describe(entries)} in {directory} (the keys stay)")
    localstate.clear_state(directory)


def _start_new(directory: Path, workers: int, slots: int | None, masters: int, timeout: float,
               progress: Callable[[str], None]) -> list[NodeRecord]:
    slots = slots or max(1, (os.cpu_count() or 1) // workers)
    _prepare(directory)
    plan = _plan(directory, workers, slots, masters)
    records = _launch(directory, plan, [], timeout, progress)
    _record_settings(directory, Settings(masters, 2, 2, workers, slots, localstate.read_configs(directory)), records)
    return records


def _restart_all(directory: Path, settings: Settings, change: localstate.Change, timeout: float,
                 progress: Callable[[str], None], say: Callable[[str], None]) -> list[NodeRecord]:
    """Start the stopped cluster recorded in D again, with ``change`` applied."""
    sweep_mounts(directory, time.monotonic() + 10.0)
    settings = _applied(settings, change)
    localstate.write_configs(directory, settings)
    if (taken := localstate.taken_port(settings)) is not None:
        forget(directory)
        raise UpError(f"port {taken[0]} ({taken[1]}) is in use by another program: stop it, or start a new, "
                      f"empty cluster on new ports with `cluster up{_dir_flag(directory)} --fresh`")
    plan = [(n["role"], _node_of(n)) for n in settings.nodes] + _more_workers(directory, settings, change)
    say(f"restarting the cluster recorded in {directory / localstate.SETTINGS}{_words(change)}")
    records = _launch(directory, plan, [], timeout, progress)
    _record_settings(directory, settings, records)
    return records


def _bring_back(directory: Path, settings: Settings, change: localstate.Change, live: list[NodeRecord],
                timeout: float, progress: Callable[[str], None], say: Callable[[str], None]) -> list[NodeRecord]:
    """``up`` on a running cluster: start its recorded nodes that are not running, and the
    workers ``change`` adds; nodes.json gets their pids."""
    running = {r.name for r in live}
    dead = [n for n in settings.nodes if n["name"] not in running]
    dead_names = {n["name"] for n in dead}
    if not dead and not change.add_workers:
        raise _running(directory, live)
    for n in dead:
        if n["role"] == "worker":
            sweep_worker_mount(directory, n["name"], time.monotonic() + 10.0)
    plan = [(n["role"], _node_of(n)) for n in dead] + _more_workers(directory, settings, change)
    if dead:
        say(f"starting what of the cluster in {directory} is not running: {', '.join(n['name'] for n in dead)}")
    if change.add_workers:
        say(f"adding {', '.join(n.name for _, n in plan if n.name not in running and n.name not in dead_names)} "
            "to the running cluster")
    records = _launch(directory, plan, read_nodes(directory) or [], timeout, progress)
    _record_settings(directory, settings, records)
    return records


def _applied(settings: Settings, change: localstate.Change) -> Settings:
    """The recorded settings less the dropped workers, with the new slots."""
    settings = localstate.without(settings, change.drop_workers)
    if change.slots is None:
        return settings
    nodes = tuple({**n, "argv": localstate.with_slots(n["argv"], change.slots)} if n["role"] == "worker" else n
                  for n in settings.nodes)
    return replace(settings, nodes=nodes, slots=change.slots)


def _more_workers(directory: Path, settings: Settings, change: localstate.Change) -> list[tuple[str, LocalNode]]:
    if not change.add_workers:
        return []
    crew = worker_nodes(directory, directory / "cluster.toml", change.add_workers, slots=change.slots or settings.slots,
                        mount=True, first=localstate.next_worker(settings))
    return [("worker", n) for n in crew]


def _words(change: localstate.Change) -> str:
    parts = [f"{change.add_workers} more worker(s)"] if change.add_workers else []
    parts += [f"without {', '.join(change.drop_workers)}"] if change.drop_workers else []
    parts += [f"{change.slots} slots per worker"] if change.slots is not None else []
    return f" ({'; '.join(parts)})" if parts else ""


def _node_of(n: dict[str, Any]) -> LocalNode:
    """The ``LocalNode`` that starts a recorded node again, with its recorded arguments."""
    return LocalNode(n["name"], list(n["argv"]), n["address"], Path(n["log"]))


def _record_settings(directory: Path, settings: Settings, records: list[NodeRecord]) -> None:
    nodes = tuple({k: v for k, v in asdict(r).items() if k != "pid"} for r in records)
    workers = sum(r.role == "worker" for r in records)
    localstate.write_settings(directory, replace(settings, nodes=nodes, workers=workers))


def restart(directory: Path, name: str, *, timeout: float = 60.0,
            progress: Callable[[str], None] = lambda what: None) -> NodeRecord:
    """Start D's node ``name`` again, with its recorded arguments, once it is down (e.g. it was
    SIGKILLed); returns its record with the new pid, which nodes.json now has (so ``down`` stops
    it). A worker's leftover FUSE mount is swept first. Returns once the cluster serves again."""
    directory = Path(directory).expanduser().absolute()
    records = read_nodes(directory)
    if not records:
        raise UpError(f"no cluster running in {directory}: `cluster up{_dir_flag(directory)}` starts it again")
    record = next((r for r in records if r.name == name), None)
    if record is None:
        raise UpError(f"{name} is not a node of the cluster in {directory} (its nodes: "
                      f"{', '.join(r.name for r in records)})")
    if (fd := open_ours(record.pid, directory)) is not None:
        os.close(fd)
        raise UpError(f"{name} is running (pid {record.pid}): `cluster restart` starts a node that is down")
    if not record.argv:
        raise UpError(f"{name} was started by an older `cluster up` that did not record how: "
                      f"`cluster down{_dir_flag(directory)}` then `cluster up{_dir_flag(directory)}` restart it")
    if record.role == "worker":
        sweep_worker_mount(directory, name, time.monotonic() + 10.0)
    node = LocalNode(record.name, list(record.argv), record.address, Path(record.log))
    out = _launch(directory, [(record.role, node)], records, timeout, progress)
    return next(r for r in out if r.name == name)


def _launch(directory: Path, plan: list[tuple[str, LocalNode]], others: list[NodeRecord], timeout: float,
            progress: Callable[[str], None]) -> list[NodeRecord]:
    """Start ``plan``'s nodes, put them in nodes.json (replacing the records of ``others`` with
    their names; the other records stay) and wait until the cluster serves: the new nodes and
    those of ``others`` that run. On failure, stop the new nodes by pid; when it started the
    whole cluster, forget it (nodes.json and the configs; the recorded settings stay)."""
    credentials = learn_keys(directory / "cluster.toml")
    for role, node in plan:
        if role == "worker":
            credentials.add_server(node.address, node.name)
    for r in others:
        if r.role == "worker":
            credentials.add_server(r.address, r.name)
    live = {r.name for r in running_records(directory)} if others else set()
    try:
        for _, node in plan:
            node.start()
        new = {node.name: _record(role, node, directory) for role, node in plan}
        records = [new.pop(r.name, r) for r in others] + list(new.values())
        write_nodes(directory, records)
        watched = [r for r in records if r.name in live or any(r.name == n.name for _, n in plan)]
        _wait_serving(plan, watched, timeout, progress)
    except BaseException:
        started = [_record(role, node, directory) for role, node in plan if node.pid is not None]
        stop_records(started, directory, timeout=10.0)  # by pid, with what a killed worker leaves
        stop_all([n for _, n in plan])  # reaps our children (all exited by now)
        if not others:
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
    """Stop D's cluster by pid (see the module docstring); forget its pids and config. What makes it
    the same cluster on the next ``up`` stays: the recorded settings, data, logs and keys."""
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
