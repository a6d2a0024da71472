"""What the ``cluster`` command modules share: the --dir, --config and --watch options, a Client
of the config's masters, progress bars, and the helpers of the read commands (JSON, durations,
tables, redrawing a view until Ctrl-C)."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from cluster.client import Client, ClusterError
from cluster.node.config import ClusterConfig, ConfigError, find_config, load_cluster_config
from cluster.node.keys import Credentials, KeysError, client_credentials

DIR_OPTION = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The local cluster's directory (default: $CLUSTER_HOME, else ~/.cluster).")

CONFIG_OPTION = click.option(
    "--config", "config_path", envvar="CLUSTER_CONFIG", default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The cluster's TOML file (default: $CLUSTER_CONFIG, else the one `cluster up` wrote).")

WATCH_OPTION = click.option(
    "--watch", "watch_s", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0, default=None,
    metavar="[SECONDS]", help="Redraw every SECONDS (default 2) until Ctrl-C.")


def _cluster_config(config_path: Path | None, key_file: Path | None = None) -> tuple[Path, ClusterConfig]:
    """(path, ClusterConfig) of ``--config``, else $CLUSTER_CONFIG, else `cluster up`'s, with this
    user's key for it loaded (see ``_credentials``); a missing or broken file or key is the
    command's one-line error."""
    path, looked = find_config(None, config_path)
    if path is None:
        raise click.ClickException(f"no cluster config found ({looked}): start one with `cluster up` or give --config")
    try:
        config = load_cluster_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    _credentials(config, key_file)
    return path, config


def _credentials(config: ClusterConfig, key_file: Path | None = None) -> Credentials:
    """This user's credentials for ``config``'s cluster (``key_file``, else $CLUSTER_KEY, else the
    config's client key), learnt for every link this process opens; a missing key is the
    command's one-line error."""
    try:
        return client_credentials(config.security, config.servers(), key_file)
    except KeysError as exc:
        raise click.ClickException(str(exc)) from None


def _client(config_path: Path | None, timeout: float = 15.0) -> Client:
    config_path, config = _cluster_config(config_path)
    if not config.masters:
        raise click.ClickException(f"{config_path}: no [masters.NAME] entries: the file commands need the masters")
    return Client(list(config.masters.values()), storage=config.storage_nodes, replicas=config.storage.replicas,
                  timeout=timeout, balancers=[b.workers for b in config.balancers.values()])


def _progress(total: int, what: str) -> Any:
    progress = Progress("[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = progress.add_task(what, total=total)
    return progress, (lambda n: progress.advance(task, n))

READ_TIMEOUT = 5.0  # seconds a read command gives the masters (a Client's default, 30 s, is long for a prompt)
WRITE_TIMEOUT = 15.0  # seconds a submit or cancel gives them: a leader election fits in it


def _json(value: Any) -> str:
    """JSON of a ledger view (ids that travel as bytes are written as hex)."""
    return json.dumps(value, indent=2, sort_keys=True,
                      default=lambda o: o.hex() if isinstance(o, (bytes, bytearray)) else str(o))


@contextmanager
def _session(config_path: Path | None, timeout: float = READ_TIMEOUT) -> Iterator[Client]:
    """A Client of the cluster's masters; a ClusterError becomes the command's one-line error."""
    client = _client(config_path, timeout)
    try:
        yield client
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        client.close()


def _ago(seconds: float | None) -> str:
    """A duration as people read it: 42 s, 7 min, 3.5 h, 2 d ("-" when unknown)."""
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _ledger_age(stamp: float | None, masters: list[str]) -> float | None:
    """Seconds since ``stamp``, a wall-clock time the ledger recorded (submitted_at,
    finished_at); None when there is none. ``masters`` is kept for callers' symmetry."""
    if not stamp:
        return None
    return max(0.0, time.time() - stamp)


def _when(age: float | None) -> str:
    """The local time ``age`` seconds ago."""
    return "-" if age is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - age))


UNWRAPPED = 1 << 16  # columns of a console that is no terminal: never wrap, never cut an id


def _table_console() -> Console:
    """The console of a command's output: a terminal's own width; a pipe or a file no limit, not
    rich's 80 columns (a line is as long as what it says: ids whole, nothing wrapped), unless
    $COLUMNS says otherwise."""
    console = Console()
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(width=UNWRAPPED)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # the interval --watch redraws at (a test replaces it)


def _watch(frame: Callable[[], RenderableType], every: float) -> None:
    """Draw ``frame()`` every ``every`` seconds until Ctrl-C (exit status 0): in place on a
    terminal (rich Live), one after another into a pipe, each under a line with the time. A
    frame whose read fails shows its one-line error instead; the next one tries again."""
    console = _table_console()

    def drawn() -> RenderableType:
        try:
            body: RenderableType = frame()
        except (click.ClickException, ClusterError) as exc:
            body = Text(exc.format_message() if isinstance(exc, click.ClickException) else str(exc), style="red")
        stamp = Text(f"{time.strftime('%H:%M:%S')}, every {every:g} s (Ctrl-C stops)", style="dim")
        return Group(stamp, body)

    try:
        if console.is_terminal:
            with Live(drawn(), console=console, auto_refresh=False) as live:
                while True:
                    _sleep(every)
                    live.update(drawn(), refresh=True)
        else:
            while True:
                console.print(drawn())
                console.file.flush()
                _sleep(every)
    except KeyboardInterrupt:
        pass
