"""The ``cluster`` command line: for users and operators.

Built so far: ``status`` (ask any node) and ``probe`` (run a probe node between machines).
Read commands take ``--json``. Errors are one line that says what to do, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import zmq
from rich.console import Console
from rich.table import Table

from cluster import __version__
from cluster.status import query_status
from proto import Limits


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cluster")
def cli() -> None:
    """Operate a ZeroMQ compute cluster."""


@cli.command()
@click.argument("addresses", nargs=-1, required=True)
@click.option("--timeout", default=2.0, show_default=True, help="Seconds each node has to answer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(addresses: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Ask nodes at ADDRESSES (e.g. tcp://127.0.0.1:5600) for role, health, uptime, counters."""
    results = query_status(list(addresses), timeout=timeout)
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
    else:
        table = Table(title="cluster status")
        for col in ("address", "role", "health", "pid", "uptime", "version", "rejected"):
            table.add_column(col)
        for r in results:
            if r.reply is None:
                table.add_row(r.address, "?", f"[red]down[/red]: {r.error}", "", "", "", "")
                continue
            m = r.reply
            table.add_row(r.address, m.role, "[green]up[/green]", str(m.pid), f"{m.uptime_ms / 1000:.1f} s",
                          m.version, str(m.counters.get("rejected_total", 0)))
        Console().print(table)
    if any(r.reply is None for r in results):
        sys.exit(1)


@cli.command()
@click.option("--bind", required=True, help="Endpoint to serve on, e.g. tcp://0.0.0.0:5600.")
@click.option("--peer", "peers", multiple=True, help="Another probe's endpoint (repeatable).")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between heartbeats.")
@click.option("--liveness", default=3, show_default=True, help="Missed intervals before a peer is silent.")
@click.option("--max-message-bytes", default=Limits().max_message_bytes, show_default=True,
              help="Larger messages are refused as TOO_LARGE.")
@click.option("--log-level", default="INFO", show_default=True)
def probe(bind: str, peers: tuple[str, ...], interval: float, liveness: int, max_message_bytes: int, log_level: str) -> None:
    """Run a probe node: heartbeats to PEERs with round-trip times; stops on SIGTERM/Ctrl-C."""
    from cluster.probe.node import build_probe
    from cluster.runtime.logs import configure

    try:
        configure(log_level)
        limits = Limits(max_message_bytes=max_message_bytes,
                        max_frame0_bytes=min(Limits().max_frame0_bytes, max_message_bytes))
        node = build_probe(bind, list(peers), interval=interval, liveness=liveness, limits=limits)
        sys.exit(node.run())
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot open {bind}: {exc} (is the port in use, or the address not local?)")
    except ValueError as exc:
        raise click.ClickException(str(exc))


@cli.command("master")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The masters' TOML file (every master's api and raft address).")
@click.option("--name", required=True, help="Which master of the config this process is.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Raft journal and ledger snapshots; without it the ledger lives in memory only.")
@click.option("--log-level", default="INFO", show_default=True)
def master_command(config_path: Path, name: str, data_dir: Path | None, log_level: str) -> None:
    """Run a master: the Raft-replicated ledger and the client API; stops on SIGTERM."""
    from cluster.runtime.logs import configure
    from master.node import ConfigError, run_master

    try:
        configure(log_level)
        sys.exit(run_master(config_path, name, data_dir))
    except ConfigError as exc:
        raise click.ClickException(str(exc))
    except zmq.ZMQError as exc:
        raise click.ClickException(f"master {name}: cannot open its API address: {exc} (port in use?)")
    except OSError as exc:
        raise click.ClickException(f"master {name}: {exc}")


def main() -> None:
    """Entry point of the ``cluster`` console script."""
    cli()
