"""The node commands of ``cluster``: ``up``, ``down``, ``restart`` and ``status`` of a cluster, and
the nodes themselves: ``probe``, ``master``, ``storage``, ``balancer``, ``worker`` and ``mount``."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import click
import zmq
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster.cli_common import CONFIG_OPTION, DIR_OPTION, WATCH_OPTION, _cluster_config, _table_console, _watch
from cluster.node.config import ConfigError, cluster_home, find_config, load_cluster_config
from cluster.node.keys import KeysError, node_credentials
from worker.taskuser import TaskUserError  # stdlib only: cheap to load here
from cluster.node.logs import configure
from cluster.node.status import query_status
from cluster.probe.node import build_probe
from cluster.up import UpError, cluster_status
from cluster.up import down as stop_cluster
from cluster.up import restart as restart_node
from cluster.up import up as start_cluster
from proto import Limits
from worker.cache import BlockCache
from worker.fusefs import Tuning, end_with, fuse_available, mount
from worker.view import ClusterView


@click.command()
@click.argument("addresses", nargs=-1)
@DIR_OPTION
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A cluster's TOML file (default: --dir's, else $CLUSTER_CONFIG, else the default directory's).")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds each node has to answer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@WATCH_OPTION
def status(addresses: tuple[str, ...], directory: Path | None, config_path: Path | None, timeout: float,
           as_json: bool, watch_s: float | None) -> None:
    """Every node of the cluster (its config: `cluster up`'s, --dir's or --config's), or the
    nodes at ADDRESSES (e.g. tcp://127.0.0.1:5600): role, state, health, pid, version. A node
    that is down says why (no answer in time, refused, a bad address). Exit status 1 when one is."""
    if watch_s is not None and as_json:
        raise click.UsageError("--watch redraws the table: drop --json")
    if addresses:
        if watch_s is not None:
            _watch(lambda: _status_of_addresses(addresses, timeout, False)[0], watch_s)
            return
        table, up = _status_of_addresses(addresses, timeout, as_json)
        if table is not None:
            _table_console().print(table)
        if not up:
            sys.exit(1)
        return
    path, looked = find_config(directory, config_path)
    if path is None:
        raise click.ClickException(f"no cluster config found ({looked}): start a local cluster with `cluster up`, "
                                   "or pass --config FILE or node ADDRESSES")
    if watch_s is not None:
        _watch(lambda: _status_table(path, _cluster_nodes(path, timeout)), watch_s)
        return
    nodes = _cluster_nodes(path, timeout)
    if as_json:
        click.echo(json.dumps({"config": str(path), "nodes": nodes}, indent=2, sort_keys=True))
    else:
        _table_console().print(_status_table(path, nodes))
    if any(n["health"] != "up" for n in nodes):
        sys.exit(1)


def _cluster_nodes(path: Path, timeout: float) -> list[dict[str, Any]]:
    try:
        return cluster_status(path, timeout=timeout)
    except UpError as exc:
        raise click.ClickException(str(exc)) from None


def _status_table(path: Path, nodes: list[dict[str, Any]]) -> Table:
    """The cluster's nodes as a table; a node that is down says why (its query's error)."""
    table = Table(title=f"cluster status ({path})")
    for col in ("role", "name", "state", "address", "pid", "version"):
        table.add_column(col, no_wrap=col in ("name", "address", "pid"))
    for n in nodes:
        state = n["state"] if n["health"] == "up" else f"[red]down[/red]: {escape(n.get('error') or 'no answer')}"
        table.add_row(n["role"], str(n["name"]), state, n["address"] or "-", str(n["pid"] or "-"), n["version"] or "-")
    return table


def _status_of_addresses(addresses: tuple[str, ...], timeout: float, as_json: bool) -> tuple[Table | None, bool]:
    """The nodes at ``addresses``: printed as JSON with ``as_json``, else returned as a table;
    and whether every one answered."""
    if find_config()[0] is not None:
        _cluster_config(None)  # the keys to reach its nodes
    results = query_status(list(addresses), timeout=timeout)
    up = all(r.reply is not None for r in results)
    if as_json:
        out = []
        for r in results:
            entry: dict[str, Any] = {"address": r.address, "ok": r.reply is not None}
            if r.reply is not None:
                m = r.reply
                entry.update(role=m.role, version=m.version, pid=m.pid, uptime_s=m.uptime_ms / 1000,
                             counters=m.counters, detail=m.detail)
            else:
                entry["error"] = r.error
            out.append(entry)
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return None, up
    table = Table(title="cluster status")
    for col in ("address", "role", "health", "pid", "uptime", "version", "rejected"):
        table.add_column(col)
    for r in results:
        if r.reply is None:
            table.add_row(r.address, "?", f"[red]down[/red]: {escape(r.error or 'no answer')}", "", "", "", "")
            continue
        m = r.reply
        table.add_row(r.address, m.role, "[green]up[/green]", str(m.pid), f"{m.uptime_ms / 1000:.1f} s",
                      m.version, str(m.counters.get("rejected_total", 0)))
    return table, up


@click.command()
@DIR_OPTION
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Workers to run (default: as recorded, else 1); more than recorded adds workers.")
@click.option("--slots", type=click.IntRange(1, 4096), default=None,
              help="Task slots per worker (default: as recorded, else this machine's cores / workers, at least 1).")
@click.option("--masters", type=click.IntRange(1, 7), default=None,
              help="Masters of a new cluster (default 3); a recorded cluster keeps its own.")
@click.option("--fresh", is_flag=True, help="Start a new, empty cluster: remove the stopped one's ledger, stored "
              "files, worker data and logs first (the keys stay).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds the cluster has to come up.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (dir, config, nodes) instead of a table.")
def up(directory: Path | None, workers: int | None, slots: int | None, masters: int | None, fresh: bool,
       timeout: float, as_json: bool) -> None:
    """Start a local cluster in the background: 3 masters, the balancer pair, 2 storage nodes and
    --workers workers on 127.0.0.1; returns once it serves. `cluster down` stops it, and the next
    `cluster up` in the same directory restarts that same cluster (ledger, files, keys, ports; logs
    appended), or what of it is not running."""
    directory = (directory or cluster_home()).expanduser().absolute()
    err = Console(stderr=True)
    try:
        with err.status("starting the cluster") as spinner:
            records = start_cluster(directory, workers, slots, masters=masters, fresh=fresh, timeout=timeout,
                                    progress=lambda what: spinner.update(f"waiting for the cluster: {what}"),
                                    say=lambda line: click.echo(line, err=True))
    except UpError as exc:
        raise click.ClickException(str(exc))
    config = directory / "cluster.toml"
    if as_json:
        click.echo(json.dumps({"dir": str(directory), "config": str(config),
                               "nodes": [asdict(r) for r in records]}, indent=2))
        return
    table = Table(title=f"cluster up: {directory}")
    for col in ("role", "name", "address", "pid", "log"):
        table.add_column(col)
    for r in records:
        table.add_row(r.role, r.name, r.address, str(r.pid), Path(r.log).name)
    _table_console().print(table)
    ok, why = fuse_available()
    if not ok:
        click.echo(f"FUSE is unavailable ({why}): workers fetch stored files into their caches instead.")
    hint = "" if directory == cluster_home() else f" (in another shell: export CLUSTER_HOME={directory})"
    click.echo(f"config: {config}; Client() and the cluster commands find it{hint}. Stop it with `cluster down`.")
    click.echo(f"secured with CURVE: every node, you (client, operator) have a key; the allow-list is "
               f"{directory / 'keys.toml'} (`cluster keys list`).")


@click.command()
@DIR_OPTION
@click.option("--timeout", default=15.0, show_default=True, help="Seconds the nodes have to exit on SIGTERM.")
def down(directory: Path | None, timeout: float) -> None:
    """Stop the local cluster `cluster up` started (by pid: workers, balancers, storage, masters)."""
    directory = (directory or cluster_home()).expanduser().absolute()
    try:
        report = stop_cluster(directory, timeout=timeout)
    except UpError as exc:
        raise click.ClickException(str(exc))
    mounts = f"; unmounted {len(report.unmounted)} leftover FUSE mount(s)" if report.unmounted else ""
    if report.running == 0:
        click.echo(f"no cluster running in {directory}{mounts}")
        return
    killed = f", {report.killed} killed after the deadline" if report.killed else ""
    click.echo(f"stopped {report.running} node processes in {directory}{killed}{mounts}; their data and logs are "
               f"kept there: `cluster up` restarts this cluster, `cluster up --fresh` starts an empty one")


@click.command()
@click.argument("name")
@DIR_OPTION
@click.option("--timeout", default=60.0, show_default=True, help="Seconds the node has to come up.")
def restart(name: str, directory: Path | None, timeout: float) -> None:
    """Start the local cluster's node NAME (m1, b1, s1, w1, ...) again, once it is down (e.g.
    killed), with the arguments `cluster up` started it with; `cluster down` stops it as the others."""
    directory = (directory or cluster_home()).expanduser().absolute()
    err = Console(stderr=True)
    try:
        with err.status(f"restarting {name}") as spinner:
            record = restart_node(directory, name, timeout=timeout,
                                  progress=lambda what: spinner.update(f"waiting for the cluster: {what}"))
    except UpError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"restarted {name} (pid {record.pid}; log: {record.log})")


@click.command()
@click.option("--bind", required=True, help="Endpoint to serve on, e.g. tcp://0.0.0.0:5600.")
@click.option("--peer", "peers", multiple=True,
              help="Another probe's endpoint (repeatable); with --config, NAME=ENDPOINT (NAME: its key's name).")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between heartbeats.")
@click.option("--liveness", default=3, show_default=True, help="Missed intervals before a peer is silent.")
@click.option("--max-message-bytes", default=Limits().max_message_bytes, show_default=True,
              help="Larger messages are refused as TOO_LARGE.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A cluster config whose keys the probe uses (CURVE); without it, plaintext.")
@click.option("--name", default=None, help="With --config: this probe's key's name in the allow-list.")
@click.option("--log-level", default="INFO", show_default=True)
def probe(bind: str, peers: tuple[str, ...], interval: float, liveness: int, max_message_bytes: int,
          config_path: Path | None, name: str | None, log_level: str) -> None:
    """Run a probe node: heartbeats to PEERs with round-trip times; stops on SIGTERM/Ctrl-C."""
    if (config_path is None) != (name is None):
        raise click.ClickException("give --config and --name together (the probe's keys), or neither (plaintext)")
    try:
        configure(log_level)
        limits = Limits(max_message_bytes=max_message_bytes,
                        max_frame0_bytes=min(Limits().max_frame0_bytes, max_message_bytes))
        named = dict(p.split("=", 1)[::-1] if "=" in p.split("://", 1)[0] else (p, "") for p in peers)
        credentials = None
        if config_path is not None:
            credentials = node_credentials(load_cluster_config(config_path).security, name, None, {})
        node = build_probe(bind, list(named), interval=interval, liveness=liveness, limits=limits,
                           credentials=credentials, peer_names={a: n for a, n in named.items() if n})
        sys.exit(node.run())
    except (ConfigError, KeysError) as exc:
        raise click.ClickException(str(exc))
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot open {bind}: {exc} (is the port in use, or the address not local?)")
    except ValueError as exc:
        raise click.ClickException(str(exc))


def _serve(what: str, log_level: str, run: Callable[[], int], zmq_problem: Callable[[Exception], str]) -> None:
    """Run a node process (``run`` returns its exit status) with logging at ``log_level``; its
    start-up failures become one line each, prefixed with ``what`` (e.g. "master m1")."""
    try:
        configure(log_level)
        sys.exit(run())
    except ConfigError as exc:
        raise click.ClickException(str(exc))
    except KeysError as exc:
        raise click.ClickException(f"{what}: {exc}")
    except zmq.ZMQError as exc:
        raise click.ClickException(f"{what}: {zmq_problem(exc)}")
    except OSError as exc:
        raise click.ClickException(f"{what}: {exc}")


@click.command("master")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The masters' TOML file (every master's api and raft address).")
@click.option("--name", required=True, help="Which master of the config this process is.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Raft journal and ledger snapshots; without it the ledger lives in memory only.")
@click.option("--log-level", default="INFO", show_default=True)
def master_command(config_path: Path, name: str, data_dir: Path | None, log_level: str) -> None:
    """Run a master: the Raft-replicated ledger and the client API; stops on SIGTERM."""
    # lazy: a node process's entry point loads its own tier (and pysyncobj, numpy...), which
    # every other `cluster` command would otherwise pay for at start
    from master.node import run_master

    _serve(f"master {name}", log_level, lambda: run_master(config_path, name, data_dir),
           lambda exc: f"cannot open its API address: {exc} (port in use?)")


@click.command("storage")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cluster's TOML file ([storage.nodes.NAME] address, [masters.NAME] api).")
@click.option("--name", required=True, help="Which storage node of the config this process is.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the blobs live (blobs/, partial/).")
@click.option("--log-level", default="INFO", show_default=True)
def storage_command(config_path: Path, name: str, data_dir: Path, log_level: str) -> None:
    """Run a storage node: content-addressed blobs, transfers, replication, scrub; stops on SIGTERM."""
    # lazy: a node process's entry point loads its own tier (and pysyncobj, numpy...), which
    # every other `cluster` command would otherwise pay for at start
    from storage.node import run_storage

    _serve(f"storage {name}", log_level, lambda: run_storage(config_path, name, data_dir),
           lambda exc: f"cannot open its address: {exc} (port in use?)")


@click.command("balancer")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cluster's TOML file ([balancers.NAME] workers/peer/primary, [masters.NAME] api).")
@click.option("--name", required=True, help="Which balancer of the config this process is.")
@click.option("--log-level", default="INFO", show_default=True)
def balancer_command(config_path: Path, name: str, log_level: str) -> None:
    """Run a balancer of the Binary Star pair: worker registry and dispatch; stops on SIGTERM."""
    # lazy: a node process's entry point loads its own tier (and pysyncobj, numpy...), which
    # every other `cluster` command would otherwise pay for at start
    from balancer.node import run_balancer

    _serve(f"balancer {name}", log_level, lambda: run_balancer(config_path, name),
           lambda exc: f"cannot open its addresses: {exc} (port in use?)")


@click.command("worker")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cluster's TOML file (balancers, masters, storage nodes).")
@click.option("--name", required=True, help="This worker's name (unique in the cluster, e.g. the host name).")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Scratch space, the file cache and the FUSE mount point.")
@click.option("--slots", type=click.IntRange(1, 4096), default=None, help="Tasks at once (default: one per core).")
@click.option("--label", "labels", multiple=True, help="A label tasks may ask for (repeatable).")
@click.option("--memory-mb", type=click.IntRange(0), default=None, help="Memory to announce (default: this machine's).")
@click.option("--no-mount", is_flag=True, help="Do not mount the FUSE view; fetch stored files into the cache.")
@click.option("--bind", default=None, help="Endpoint answering `cluster status`, e.g. tcp://0.0.0.0:5580.")
@click.option("--task-user", default=None, metavar="NAME",
              help="Run every task as this unprivileged user, never the worker's own: the worker then needs root "
                   "or CAP_SETUID, CAP_SETGID and CAP_KILL, and its user a member of NAME's primary group "
                   "(doc/security.md).")
@click.option("--log-level", default="INFO", show_default=True)
def worker_command(config_path: Path, name: str, data_dir: Path, slots: int | None, labels: tuple[str, ...],
                   memory_mb: int | None, no_mount: bool, bind: str | None, task_user: str | None,
                   log_level: str) -> None:
    """Run a worker: task slots for callables, commands and alignment tiles; stops on SIGTERM."""
    # lazy: worker.node loads numba (the tile kernels), a third of a second that every other
    # `cluster` command would pay at start
    from worker.node import default_identity, run_worker

    def run() -> int:
        try:
            return run_worker(config_path, default_identity(name, slots, list(labels), memory_mb), data_dir,
                              mount=not no_mount, control=bind, task_user=task_user)
        except TaskUserError as exc:
            raise click.ClickException(f"worker {name}: --task-user {task_user}: {exc}") from None

    _serve(f"worker {name}", log_level, run, lambda exc: f"cannot connect: {exc}")


@click.command("mount")
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@CONFIG_OPTION
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The on-disk block cache (kept across restarts; never needs invalidating).")
@click.option("--cache-gb", default=10.0, show_default=True, help="Bound on the cache's size.")
@click.option("--allow-other", is_flag=True, help="Let users other than the mounting one read.")
@click.option("--key", "key_file", default=None, envvar="CLUSTER_KEY", type=click.Path(dir_okay=False, path_type=Path),
              help="The secret key to read the files with (a worker's mount: the worker's own key).")
@click.option("--no-listing", is_flag=True,
              help="files/ and jobs/ list nothing: a file or a job's directory is reached only by an id one was "
                   "given (a worker's own mount, shared by the tasks of every owner).")
@click.option("--end-with", "end_with_pid", type=click.IntRange(1), default=None, metavar="PID",
              help="Unmount and exit when process PID exits (a worker's mount: the worker's pid).")
@click.option("--log-level", default="INFO", show_default=True)
def mount_command(mountpoint: Path, config_path: Path, cache_dir: Path, cache_gb: float, allow_other: bool,
                  key_file: Path | None, no_listing: bool, end_with_pid: int | None, log_level: str) -> None:
    """Mount the cluster's files read-only at MOUNTPOINT (files/<id>, jobs/<job>/<name>);
    serves until SIGTERM or `fusermount3 -u MOUNTPOINT`."""
    configure(log_level)
    ok, why = fuse_available()
    if not ok:
        raise click.ClickException(f"FUSE is unavailable here ({why}); workers on this machine read stored "
                                   "files through the cache without a mount")
    _, config = _cluster_config(config_path, key_file)
    if end_with_pid is not None:
        end_with(end_with_pid, mountpoint)
    view = ClusterView(list(config.masters.values()), config.storage_nodes)
    try:
        mount(view, BlockCache(cache_dir, int(cache_gb * 2**30)), mountpoint, allow_other=allow_other,
              tuning=Tuning(enumerate=not no_listing))
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(f"cannot mount at {mountpoint}: {exc}")
    finally:
        view.close()
