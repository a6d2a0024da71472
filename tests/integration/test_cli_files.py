"""`cluster upload`, `download`, `files` and `files rm` (cluster/cli_files.py): the file commands
run as the real console script against 3 masters and 2 storage nodes (replicas 2) on 127.0.0.1.

Each node is stopped by pid at the end (``stop_all``). Every error a command gives must be one
line on stderr with a non-zero exit (``one_line_error``).
"""

from __future__ import annotations

import random

import pytest

from cluster.local import master_nodes, start_all, stop_all, storage_nodes
from proto.fileids import file_id_of_path

from .conftest import wait_for
from .test_cli_commands import as_json, one_line_error, run

pytestmark = pytest.mark.integration


@pytest.fixture
def config(tmp_path):
    """The cluster.toml of a running cluster of masters and storage nodes."""
    masters = master_nodes(tmp_path / "cluster", 3)
    path, storage = storage_nodes(tmp_path / "cluster", 2, masters=masters)
    nodes = masters + storage
    try:
        start_all(nodes, timeout=30)
        yield path
    finally:
        stop_all(nodes)


def test_upload_files_download_and_rm(config, tmp_path):
    home = tmp_path / "nohome"  # nothing of ~/.cluster: every command names the config

    def cli(command: str, *args: str):
        return run(home, command, "--config", str(config), *args)

    def listed(*args: str) -> dict[str, dict]:
        return {f["id"]: f for f in as_json(cli("files", "--limit", "1000", "--json", *args))["files"]}

    rng = random.Random(4)
    src = tmp_path / "data.bin"
    src.write_bytes(rng.randbytes(3 * (1 << 20) + 17))  # more than one chunk
    fid = file_id_of_path(src).hex()
    up = as_json(cli("upload", str(src), "--json"))
    assert (up["id"], up["size"], up["name"]) == (fid, src.stat().st_size, "data.bin")
    assert sorted(up["replicas"]) == ["s1", "s2"]
    plain = cli("upload", str(src))  # the content id alone on stdout
    assert plain.returncode == 0 and plain.stdout.strip() == fid, plain.stderr

    mine = listed()[fid]
    assert (mine["size"], sorted(mine["replicas"]), mine["refs"]) == (up["size"], ["s1", "s2"], {"pinned:client": "data.bin"})
    table = cli("files")
    assert table.returncode == 0 and fid in table.stdout, table.stderr  # whole ids, in a pipe too

    out = tmp_path / "back.bin"
    got = cli("download", fid, str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == src.read_bytes()
    assert "'zz'" in one_line_error(cli("download", "zz", str(tmp_path / "x.bin")))  # names the bad id
    assert "no file" in one_line_error(cli("download", "ab" * 16, str(tmp_path / "x.bin")))
    assert not (tmp_path / "x.bin").exists()

    # a job's file: listed under the job by the name it was given (no worker: the job only waits)
    job = as_json(cli("submit", "--no-wait", "--json", "--", "true"))["job"]
    second = tmp_path / "second.bin"
    second.write_bytes(rng.randbytes(1000))
    owned = as_json(cli("upload", str(second), "--job", job, "--name", "input-1", "--json"))
    assert owned["name"] == "input-1"
    assert [(f["id"], f["name"]) for f in listed("--job", job).values()] == [(owned["id"], "input-1")]

    # `files rm` drops the pin: the file leaves the ledger (the storage nodes then collect it)
    released = cli("files", "rm", fid)
    assert released.returncode == 0, released.stderr
    wait_for(lambda: fid not in listed(), 20, "the released file to leave the listing")
    assert owned["id"] in listed()
    assert "'zz'" in one_line_error(cli("files", "rm", "zz"))
