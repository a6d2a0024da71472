"""What the read commands show, without a cluster (the masters' answers are given): file ids
taken as FileRefs, whole ids and unwrapped lines in a pipe, a dead node's reason, and
`cluster summary --watch`'s rate and ETA. The commands against a real cluster:
tests/integration/test_cli_commands.py."""

from __future__ import annotations

import contextlib
import io

import pytest
from click.testing import CliRunner
from rich.console import Console

from cluster import cli_common, cli_files, cli_nodes, cli_work
from cluster.client import Client, ClusterError, JobRef, TaskOptions
from cluster.files import FileRef, file_id_text

FID = "0123456789abcdef" * 2
JOB = "fedcba9876543210" * 2


def test_a_file_id_is_taken_as_a_file_ref_hex_or_bytes():
    ref = FileRef(FID, 10, ["s1", "s2"], "reads.fa")
    assert file_id_text(ref) == file_id_text(FID.upper()) == file_id_text(bytes.fromhex(FID)) == FID
    assert str(ref) == FID  # what an f-string or a command line gets
    for bad in ("zz", FID[:-2], 42, None, b"short"):
        with pytest.raises(ClusterError, match="input 'x'"):
            file_id_text(bad, "input 'x'")


def test_run_sends_a_file_refs_id_and_refuses_a_bad_input_before_any_submit():
    client = object.__new__(Client)  # no masters: the submit is caught here
    client._task_options = TaskOptions()
    submitted: list[dict] = []
    client.submit_job = lambda kind, spec: submitted.append(spec) or JobRef(JOB, 1, "k")
    client._watch = lambda job, futures, since=0: None
    client.run(["cat", "in"], inputs={"in": FileRef(FID, 10, ["s1"]), "raw": FID.upper()})
    assert submitted[0]["run"]["inputs"] == {"in": FID, "raw": FID}
    with pytest.raises(ClusterError, match="'bad'"):
        client.run(["cat", "bad"], inputs={"bad": "not-an-id"})
    assert len(submitted) == 1


class FakeFiles:
    def files(self, limit, owner=None):
        refs = {JOB: "a.seq", "pinned:client": "reads.fa"}
        return type("Answer", (), {"stale": False, "value": {"files": [
            {"id": FID, "size": 1234, "replicas": ["s1", "s2"], "refs": refs}]}})()


def test_files_prints_whole_ids_in_a_pipe_and_a_narrow_terminal(monkeypatch):
    monkeypatch.setattr(cli_files, "_session", lambda *a, **k: contextlib.nullcontext(FakeFiles()))
    monkeypatch.delenv("COLUMNS", raising=False)
    piped = CliRunner().invoke(cli_files.files, [])
    assert piped.exit_code == 0, piped.output
    row = next(line for line in piped.output.splitlines() if FID in line)
    assert JOB in row and "pinned:client" in row  # one line: nothing cut, nothing wrapped
    narrow = CliRunner().invoke(cli_files.files, [], env={"COLUMNS": "60"})
    assert narrow.exit_code == 0 and FID in narrow.output


def test_a_pipe_never_wraps_a_long_row(monkeypatch):
    long = "spec-" + "x" * 200
    rows = [{"spec": long, "available": 1, "pending": 0, "finished": 0, "failed": 0, "total": 1, "disputed": 0}]
    monkeypatch.setattr(cli_work, "_session", lambda *a, **k: contextlib.nullcontext(object()))
    monkeypatch.setattr(cli_work, "_work", lambda client: type("W", (), {"summary": lambda self: rows})())
    monkeypatch.delenv("COLUMNS", raising=False)
    out = CliRunner().invoke(cli_work.summary, [])
    assert out.exit_code == 0, out.output
    assert any(long in line and "1" in line.replace(long, "") for line in out.output.splitlines())


def test_a_dead_node_shows_why_in_the_status_table(tmp_path):
    nodes = [{"role": "master", "name": "m1", "state": "leader", "health": "up", "address": "tcp://h:1", "pid": 7,
              "version": "v"},
             {"role": "storage", "name": "s2", "state": "down", "health": "down", "address": "tcp://h:2", "pid": None,
              "version": None, "error": "no answer within 2 s: is a node running there?"}]
    out = io.StringIO()
    Console(file=out, width=cli_common.UNWRAPPED).print(cli_nodes._status_table(tmp_path / "c.toml", nodes))
    row = next(line for line in out.getvalue().splitlines() if "s2" in line)
    assert "down" in row and nodes[1]["error"] in row


def test_summary_watch_shows_each_specs_rate_and_eta_until_ctrl_c(monkeypatch):
    clock = [100.0]
    frames: list[int] = []

    def rows() -> list[dict]:
        done = 100 * len(frames)  # 100 units end each 2 s interval: 50 units/s
        frames.append(done)
        return [{"spec": "fetch", "available": 1000 - done, "pending": 0, "finished": done, "failed": 0,
                 "total": 1000, "disputed": 0}]

    def sleep(seconds: float) -> None:
        if len(frames) == 3:
            raise KeyboardInterrupt  # Ctrl-C
        clock[0] += seconds

    monkeypatch.setattr(cli_work, "_session", lambda *a, **k: contextlib.nullcontext(object()))
    monkeypatch.setattr(cli_work, "_work", lambda client: type("W", (), {"summary": lambda self: rows()})())
    monkeypatch.setattr(cli_work, "_clock", lambda: clock[0])
    monkeypatch.setattr(cli_common, "_sleep", sleep)
    monkeypatch.delenv("COLUMNS", raising=False)
    out = CliRunner().invoke(cli_work.summary, ["--watch", "2"])
    assert out.exit_code == 0, out.output
    rows_shown = [line.split("│") for line in out.output.splitlines() if "fetch" in line]
    assert len(rows_shown) == 3
    rates = [r[-3].strip() for r in rows_shown]
    etas = [r[-2].strip() for r in rows_shown]
    assert rates == ["-", "50.0", "50.0"]
    assert etas[0] == "-" and etas[1:] == ["18 s", "16 s"]  # 900 then 800 units left at 50/s
    assert CliRunner().invoke(cli_work.summary, ["--watch", "--json"]).exit_code != 0
