"""``cluster keys``: the operator's commands for the cluster's CURVE keys (cluster.node.keys).

``init DIR`` makes a key for every node the config names (and the workers given), plus an
``operator`` and a ``client`` key; ``add``, ``revoke``, ``rotate`` and ``list`` keep the allow-list.
The allow-list and the secrets are where the config's ``[security]`` says (default: beside it,
``keys.toml`` and ``keys/``). Nodes re-read the allow-list within a second of a change; a local
cluster's nodes (``cluster up``) also get SIGHUP at once.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cluster.cli_common import CONFIG_OPTION
from cluster.node import keys
from cluster.node.config import ConfigError, SecurityOptions, find_config, load_cluster_config, parse_security
from cluster.up import is_ours, read_nodes


def _security(config_path: Path | None) -> tuple[Path, SecurityOptions]:
    path, looked = find_config(None, config_path)
    if path is None:
        raise click.ClickException(f"no cluster config found ({looked}): give --config")
    try:
        security = load_cluster_config(path).security
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if security.insecure:
        raise click.ClickException(f"{path}: [security] insecure = true: this cluster admits anyone, keys or not; "
                                   "remove it to use keys")
    return path, security


def _entries(security: SecurityOptions) -> dict[str, keys.KeyEntry]:
    try:
        return {e.name: e for e in keys.parse_allow_list(security.keys)}
    except keys.KeysError as exc:
        raise click.ClickException(str(exc)) from None


def _publish(config: Path, security: SecurityOptions, entries: dict[str, keys.KeyEntry]) -> None:
    keys.write_allow_list(security.keys, list(entries.values()))
    hup = _hangup_local_nodes(config.parent)
    note = f"; {hup} local nodes told (SIGHUP)" if hup else "; nodes re-read it within a second (copy it to every machine)"
    click.echo(f"wrote {security.keys}{note}")


def _hangup_local_nodes(directory: Path) -> int:
    """SIGHUP the nodes `cluster up` started in ``directory`` (by pid, checked to be ours)."""
    count = 0
    for record in read_nodes(directory) or []:
        if record.pid and is_ours(record.pid, directory):
            try:
                os.kill(record.pid, signal.SIGHUP)
                count += 1
            except OSError:
                pass
    return count


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise click.ClickException(f"{name!r}: a key's name is letters, digits, '-', '_' and '.'")


@click.group("keys")
def keys_group() -> None:
    """Make, list, revoke and rotate the cluster's CURVE keys (the allow-list)."""


@keys_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@CONFIG_OPTION
@click.option("--worker", "workers", multiple=True, help="A worker to make a key for (repeat).")
def init(directory: Path, config_path: Path | None, workers: tuple[str, ...]) -> None:
    """Make a key per node of the config (masters, balancers, storage nodes), per --worker, and
    an operator and a client key: DIRECTORY/keys.toml (the allow-list, public) and
    DIRECTORY/keys/NAME.key_secret (mode 600; give each machine only its own)."""
    names: dict[str, str] = {}
    if config_path is not None:
        try:
            config = load_cluster_config(config_path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        names.update({n: "master" for n in config.masters})
        names.update({n: "balancer" for n in config.balancers})
        names.update({n: "storage" for n in config.storage_nodes})
    for w in workers:
        _check_name(w)
        names[w] = "worker"
    names.update(operator="operator", client="client")
    directory = directory.expanduser().absolute()
    security = parse_security({}, str(directory / "cluster.toml"))
    if security.keys.exists():
        raise click.ClickException(f"{security.keys} exists: add keys with `cluster keys add`, or pick a new directory")
    entries = [keys.KeyEntry(n, role, keys.make_secret(security.secrets, n)) for n, role in names.items()]
    keys.write_allow_list(security.keys, entries)
    click.echo(f"made {len(entries)} keys: allow-list {security.keys}, secrets in {security.secrets}/ (mode 600)")
    click.echo("copy the allow-list to every machine, and to each node only its own NAME.key_secret; the config's "
               "[security] keys and secrets say where they are (default: beside the config)")


@keys_group.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(keys.ROLES))
@CONFIG_OPTION
def add(name: str, role: str, config_path: Path | None) -> None:
    """Make a key for NAME with ROLE and admit it."""
    _check_name(name)
    config, security = _security(config_path)
    entries = _entries(security)
    if name in entries:
        raise click.ClickException(f"{name} already has a key ({entries[name].role}); rotate it, or revoke it first")
    entries[name] = keys.KeyEntry(name, role, keys.make_secret(security.secrets, name))
    click.echo(f"{name} ({role}): secret {keys.secret_path(security.secrets, name)}")
    _publish(config, security, entries)


@keys_group.command("revoke")
@click.argument("name")
@CONFIG_OPTION
def revoke(name: str, config_path: Path | None) -> None:
    """Stop admitting NAME's key: its next message is refused once nodes re-read the list."""
    config, security = _security(config_path)
    entries = _entries(security)
    if entries.pop(name, None) is None:
        raise click.ClickException(f"no key named {name} in {security.keys}")
    keys.secret_path(security.secrets, name).unlink(missing_ok=True)
    click.echo(f"revoked {name}")
    _publish(config, security, entries)


@keys_group.command("rotate")
@click.argument("name")
@CONFIG_OPTION
def rotate(name: str, config_path: Path | None) -> None:
    """Give NAME a new keypair (same role); the old key is refused from now on. A node must be
    restarted with its new secret; clients of a rotated node re-read the allow-list at start."""
    config, security = _security(config_path)
    entries = _entries(security)
    if name not in entries:
        raise click.ClickException(f"no key named {name} in {security.keys}")
    entries[name] = keys.KeyEntry(name, entries[name].role, keys.make_secret(security.secrets, name))
    click.echo(f"{name}: new secret {keys.secret_path(security.secrets, name)}")
    _publish(config, security, entries)


@keys_group.command("list")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_keys(config_path: Path | None, as_json: bool) -> None:
    """The admitted keys: name, role, public key, and whether this machine holds the secret."""
    _, security = _security(config_path)
    rows = [{"name": e.name, "role": e.role, "public_key": e.public,
             "secret_here": keys.secret_path(security.secrets, e.name).exists()}
            for e in keys.AllowList(list(_entries(security).values()))]
    if as_json:
        click.echo(json.dumps({"allow_list": str(security.keys), "keys": rows}, indent=2))
        return
    table = Table(title=f"keys ({security.keys})")
    for col in ("name", "role", "public key", "secret here"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(r["name"], r["role"], r["public_key"], "yes" if r["secret_here"] else "-")
    Console().print(table)
