"""The file commands of ``cluster``: ``upload``, ``download`` and ``files`` (``files rm``)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from cluster.cli_common import CONFIG_OPTION, WRITE_TIMEOUT, _progress, _session, _table_console
from cluster.client import ClusterError
from proto.fileids import parse_id


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@CONFIG_OPTION
@click.option("--job", default=None, help="The job (hex id) that owns the file; without it the file is pinned by you.")
@click.option("--name", default=None, help="The name it has in the job's listing (default: the file's name).")
@click.option("--copies", type=int, default=None, help="Storage nodes that must hold it (default: the config's replicas).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (id, size, replicas, name).")
def upload(path: Path, config_path: Path, job: str | None, name: str | None, copies: int | None, as_json: bool) -> None:
    """Store PATH in the cluster; prints its content id."""
    with _session(config_path, WRITE_TIMEOUT) as client:
        progress, advance = _progress(path.stat().st_size, f"upload {path.name}")
        with progress:
            ref = client.upload(path, owner=job, name=name, copies=copies, progress=advance)
    if as_json:
        click.echo(json.dumps({"id": ref.id, "size": ref.size, "replicas": ref.replicas, "name": ref.name}))
    else:
        click.echo(ref.id)


@click.command()
@click.argument("file_id")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@CONFIG_OPTION
def download(file_id: str, path: Path, config_path: Path) -> None:
    """Fetch the stored file FILE_ID into PATH (verified against its id)."""
    with _session(config_path, WRITE_TIMEOUT) as client:
        try:
            file_id = parse_id(file_id).hex()
        except ValueError as exc:
            raise ClusterError(str(exc)) from None
        record = client.lookup_files([bytes.fromhex(file_id)]).value.get(file_id)
        progress, advance = _progress((record or {}).get("size", 0), f"download {file_id[:12]}")
        with progress:
            size = client.download(file_id, path, progress=advance)
    click.echo(f"{path}: {size} bytes", err=True)


@click.group(invoke_without_command=True)
@CONFIG_OPTION
@click.option("--job", default=None, help="Only the files of this job (hex id), with their names.")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def files(ctx: click.Context, config_path: Path, job: str | None, limit: int, as_json: bool) -> None:
    """List registered files (or `files rm ID` to drop your pin)."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    with _session(config_path, WRITE_TIMEOUT) as client:
        answer = client.files(limit, owner=job)
    if as_json:
        click.echo(json.dumps(answer.value, indent=2, sort_keys=True))
        return
    table = Table(title="files" + (" (stale: a follower answered)" if answer.stale else ""))
    table.add_column("id", no_wrap=True, min_width=len(f"{0:032x}"))  # whole: it is what the other commands take
    for col in ("name" if job else "refs", "size", "replicas"):
        table.add_column(col, overflow="fold")
    for f in answer.value["files"]:
        label = f.get("name") if job else ", ".join(f"{k}: {v}" for k, v in f["refs"].items())
        table.add_row(f["id"], label, f"{f['size']:,}", ", ".join(f["replicas"]))
    _table_console().print(table)


@files.command("rm")
@click.argument("file_id")
@click.option("--job", default=None, help="Drop this job's reference instead of your pin.")
@click.pass_obj
def files_rm(config_path: Path, file_id: str, job: str | None) -> None:
    """Drop your pin (or a job's reference) on FILE_ID; it is deleted once nothing refers to it."""
    with _session(config_path, WRITE_TIMEOUT) as client:
        result = client.release_files(file_id, owner=job)
    click.echo(f"released; {len(result['dropped'])} file(s) no longer referenced will be deleted by the storage nodes")
