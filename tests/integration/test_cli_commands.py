"""`cluster jobs`, `workers`, `submit`, `cancel`, `logs` and `align`'s bad input: the commands
users and operators type, run as the real console script against one local cluster.

The module starts one cluster (`cluster up --workers 1 --slots 1`) under a CLUSTER_HOME in a
temporary directory (nothing touches ~/.cluster) and stops it at the end, whatever happened:
`cluster down`, then SIGKILL by pid for anything of ours still there. Every error a command gives
must be one line on stderr (never a traceback) with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.client import Client, ClusterError
from cluster.local import free_port, make_keys
from cluster.up import is_ours, read_nodes

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).parent / "cluster"
CLUSTER = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "cluster"]
JOB_ID = re.compile(r"\b[0-9a-f]{32}\b")


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTER_HOME", "CLUSTER_CONFIG")}
    env["CLUSTER_HOME"] = str(home)
    return env


def run(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLUSTER, *args], capture_output=True, text=True, timeout=timeout, env=env_for(home))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed on stderr."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    return lines[0]


def command_failed(result: subprocess.CompletedProcess, *streamed: str) -> str:
    """The one line `cluster submit` ends with when the command failed; before it, only the lines
    the command itself wrote to stderr, as they came (``streamed``)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert lines[:-1] == list(streamed), f"expected the command's own lines {streamed}, then one: {result.stderr!r}"
    return lines[-1]


def as_json(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)  # the poll interval of a deadline loop
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def pids_of(home: Path) -> list[int]:
    pids = [r.pid for r in read_nodes(home) or [] if r.pid]
    return pids + [int(f.read_text().split()[0]) for f in home.glob("*/mount.pid")]


@contextlib.contextmanager
def local_cluster(tmp_path_factory, name: str, *up_args: str):
    """The CLUSTER_HOME of a running `cluster up UP_ARGS`; at the end `cluster down`, then SIGKILL
    by pid for anything of ours left, whatever happened. Other modules' fixtures use it too."""
    d = tmp_path_factory.mktemp(name) / "home"
    started = run(d, "up", *up_args, timeout=120)
    seen = pids_of(d)
    try:
        assert started.returncode == 0, started.stderr
        yield d
    finally:
        seen += pids_of(d)
        run(d, "down", timeout=60)
        for pid in seen:
            if is_ours(pid, d):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The CLUSTER_HOME of the module's running cluster; stopped by pid at the end."""
    with local_cluster(tmp_path_factory, "clicmd", "--workers", "1", "--slots", "1") as d:
        yield d


def test_submit_prints_output_and_jobs_shows_it(home):
    done = run(home, "submit", "--", "sh", "-c", "echo hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi\n"
    assert "exit code 0" in done.stderr
    job = JOB_ID.search(done.stderr).group(0)

    listed = as_json(run(home, "jobs", "--json"))
    mine = [v for v in listed if v["job"] == job]
    assert mine and mine[0]["state"] == "done" and mine[0]["name"] == "sh" and mine[0]["age_s"] >= 0
    assert all(v["state"] == "done" for v in as_json(run(home, "jobs", "--state", "done", "--json")))

    view = as_json(run(home, "jobs", job, "--json"))
    assert (view["job"], view["kind"], view["done"], view["total"], view["alignment"]) == (job, "list", 1, 1, None)
    table = run(home, "jobs", "--limit", "5")
    assert table.returncode == 0 and job in table.stdout

    quiet = as_json(run(home, "submit", "--json", "--env", "WHO=you", "--", "sh", "-c", "echo hi $WHO"))
    assert (quiet["exit_code"], quiet["stdout"]) == (0, "hi you\n")


def test_jobs_task_tells_a_tasks_story_end_to_end(home):
    job = as_json(run(home, "submit", "--json", "--", "true"))["job"]
    view = as_json(run(home, "jobs", job, "--task", "0", "--json"))
    assert (view["job"], view["task"], view["state"], view["stale"]) == (job, 0, "done", False)
    story = view["story"]
    assert (story[0]["step"], story[0]["source"]) == ("submitted", "ledger")
    steps = [s["step"] for s in story]
    assigned = story[steps.index("assigned")]
    ended = story[len(steps) - 1 - steps[::-1].index("ended")]
    recorded = story[len(steps) - 1 - steps[::-1].index("recorded")]
    assert steps.index("assigned") < steps.index("ended") < steps.index("recorded")
    assert assigned["balancer"] in ("b1", "b2") and len(assigned["fence"]) == 2
    assert (ended["fence"], ended["worker"], ended["outcome"], ended["source"]) == (assigned["fence"], "w1", "done", "ledger")
    assert (recorded["fence"], recorded["code"], recorded["source"]) == (assigned["fence"], "recorded", "leader")
    assert recorded["log_index"] > 0 and recorded["stimulus_id"]
    sent = [s for s in story if s["step"] == "sent" and s["fence"] == assigned["fence"]]
    assert sent and 0 < sent[0]["log_index"] < recorded["log_index"]
    text = run(home, "jobs", job, "--task", "0")
    assert text.returncode == 0, text.stderr
    assert job in text.stdout and "w1" in text.stdout and str(recorded["log_index"]) in text.stdout
    assert len(text.stdout.splitlines()) >= len(story)
    assert "--task N goes with a JOB" in one_line_error(run(home, "jobs", "--task", "0"))


def test_submit_of_a_failing_command_is_one_line(home):
    failed = run(home, "submit", "--", "sh", "-c", "echo boom >&2; exit 3")
    line = command_failed(failed, "boom")
    assert "exit status 3" in line and "boom" in line and JOB_ID.search(line)
    assert "--env 'novalue' is not K=V" in one_line_error(run(home, "submit", "--env", "novalue", "--", "true"))
    assert "not a file id" in one_line_error(run(home, "submit", "--input", "x=zz", "--", "true"))


def test_workers_lists_the_worker(home):
    found = as_json(run(home, "workers", "--json"))
    assert found["balancer"] in ("b1", "b2")
    assert [(w["name"], w["slots"]) for w in found["workers"]] == [("w1", 1)]
    assert {"free", "running", "cached", "cores", "memory_mb", "labels", "silent_s"} <= set(found["workers"][0])
    table = run(home, "workers")
    assert table.returncode == 0 and "w1" in table.stdout
    # free counts task slots: never above them, though the credit adds a prefetch queue
    (idle,) = wait_for(lambda: [w for w in as_json(run(home, "workers", "--json"))["workers"] if not w["running"]],
                       30, "the worker to be idle")
    assert idle["free"] == idle["slots"] == 1 and idle["credit"] >= idle["slots"]


def test_upload_gives_a_file_ref_that_run_download_and_release_take(home, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(os.urandom(1000).hex().encode())
    with Client(config=home / "cluster.toml") as client:
        ref = client.upload(src)
        result = client.run(["cat", "data"], inputs={"data": ref}).result(timeout=60)
        assert (result.exit_code, result.stdout) == (0, src.read_bytes())
        assert client.download(ref, tmp_path / "back.txt") == src.stat().st_size
        assert client.lookup_files([ref]).value[ref.id]["size"] == src.stat().st_size
        assert [bytes(d).hex() for d in client.release_files(ref)["dropped"]] == [ref.id]
        with pytest.raises(ClusterError, match="'data'"):
            client.run(["cat", "data"], inputs={"data": ref.name})  # a name is no file id: refused before a submit


def test_watch_redraws_until_ctrl_c(home):
    """`status`, `jobs`, `workers` and `summary` with --watch draw again and again into a pipe,
    until SIGINT (Ctrl-C) ends them with exit status 0."""
    for command, mark in (("status", "leader"), ("jobs", "done/total"), ("workers", "w1"), ("summary", "available")):
        proc = subprocess.Popen([*CLUSTER, command, "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env_for(home))
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            wait_for(lambda: sum(mark in line for line in list(seen)) >= 2, 30, f"`{command} --watch` to redraw")
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
        reader.join(timeout=10)
        assert "Traceback" not in proc.stderr.read()


def test_status_names_why_a_node_is_down(home, tmp_path):
    config = (home / "cluster.toml").read_text()
    storage = as_json(run(home, "status", "--json"))["nodes"]
    s2 = next(n["address"] for n in storage if n["name"] == "s2")
    dead = tmp_path / "dead.toml"  # s2 moved to a port nothing listens on (its key is still the known one)
    dead.write_text(config.replace(s2, f"tcp://127.0.0.1:{free_port()}")
                    + f'\n[security]\nkeys = "{home}/keys.toml"\nsecrets = "{home}/keys"\n')
    said = run(home, "status", "--config", str(dead), "--json", "--timeout", "0.5")
    assert said.returncode == 1
    (down,) = [n for n in json.loads(said.stdout)["nodes"] if n["health"] != "up"]
    assert down["name"] == "s2" and down["error"]
    table = run(home, "status", "--config", str(dead), "--timeout", "0.5")
    assert table.returncode == 1
    row = next(line for line in table.stdout.splitlines() if " s2 " in line)
    assert down["error"].split(":")[0] in row  # the reason itself, on the node's row


def test_unknown_job_and_spec_are_named_as_unknown(home, tmp_path):
    unknown = "ab" * 16
    line = one_line_error(run(home, "align", "--job", unknown))
    assert unknown in line and "follower" not in line  # the leader's answer: no such job
    units = tmp_path / "units.tsv"
    units.write_text("".join(f"u{k}\t{k}\n" for k in range(2000)))
    line = one_line_error(run(home, "load", "no-such-spec", str(units)))
    assert "'no-such-spec'" in line and not re.search(r"units \d", line)  # refused up front, no batch named


def test_logs(home, tmp_path):
    tail = run(home, "logs", "m1", "--lines", "5")
    assert tail.returncode == 0, tail.stderr
    assert 1 <= len(tail.stdout.splitlines()) <= 5 and "cluster.master" in tail.stdout
    assert "m1, m2, m3" in one_line_error(run(home, "logs", "nobody"))

    out = tmp_path / "follow.out"
    with open(out, "wb") as sink:
        follow = subprocess.Popen([*CLUSTER, "logs", "w1", "--follow", "--lines", "1"], stdout=sink,
                                  stderr=subprocess.PIPE, env=env_for(home))
    try:
        wait_for(lambda: out.stat().st_size > 0, 20, "`logs --follow` to print")
        follow.send_signal(signal.SIGINT)  # Ctrl-C
        assert follow.wait(10) == 0
        assert b"Traceback" not in follow.stderr.read()
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(10)


def test_align_rejects_bad_input_in_one_line(home, tmp_path):
    good = tmp_path / "good.fa"
    good.write_text(">good\nACGTACGTAC\n")
    junk = tmp_path / "junk.fa"
    junk.write_bytes(random.Random(0).randbytes(4096))
    empty = tmp_path / "empty.fa"
    empty.write_text(">nothing\n")
    assert "no file" in one_line_error(run(home, "align", str(tmp_path / "missing.fa"), str(good)))
    assert "not a FASTA file" in one_line_error(run(home, "align", str(good), str(junk)))
    assert "empty" in one_line_error(run(home, "align", str(empty), str(good)))


def test_align_traces_the_alignment_and_writes_every_output(home, tmp_path):
    """A planted 1.5 kbp copy in random flanks: --json has the start and the CIGAR, which re-score
    to the score; PAF, SAM (htslib), the text view and the dotplot PNG are written."""
    import numpy as np

    from worker.sw import cigar
    from worker.sw.scoring import Scoring, encode

    rng = random.Random(9)
    core = "".join(rng.choice("ACGT") for _ in range(1500))
    mutated = "".join(c if rng.random() > 0.05 else rng.choice("ACGT") for c in core)
    a = "".join(rng.choice("ACGT") for _ in range(700)) + core + "".join(rng.choice("ACGT") for _ in range(300))
    b = "".join(rng.choice("ACGT") for _ in range(400)) + mutated[:700] + mutated[712:] + "".join(rng.choice("ACGT") for _ in range(900))
    (tmp_path / "a.fa").write_text(f">chrA test pair\n{a}\n")
    (tmp_path / "b.fa").write_text(f">chrB\n{b}\n")
    out = {k: tmp_path / f"out.{k}" for k in ("paf", "sam", "text", "png")}
    result = as_json(run(home, "align", str(tmp_path / "a.fa"), str(tmp_path / "b.fa"), "--json", "--tile", "512",
                         "--paf", str(out["paf"]), "--sam", str(out["sam"]), "--text", str(out["text"]),
                         "--dotplot", str(out["png"]), timeout=240))
    ops = cigar.parse(result["cigar"])
    assert cigar.rescore(ops, encode(a), encode(b), result["start_a"], result["start_b"], Scoring()) == result["score"]
    in_a, in_b = cigar.consumed(ops)
    assert result["start_a"] + int(in_a.sum()) - 1 == result["end_a"]
    assert result["start_b"] + int(in_b.sum()) - 1 == result["end_b"]
    assert 600 <= result["start_a"] <= 760 and 350 <= result["start_b"] <= 460, result  # the planted copy
    paf = out["paf"].read_text().rstrip("\n").split("\t")
    assert paf[0] == "chrA" and int(paf[2]) == result["start_a"] and int(paf[3]) == result["end_a"] + 1
    assert f"cg:Z:{result['cigar']}" in paf and f"AS:i:{result['score']}" in paf
    pysam = pytest.importorskip("pysam")
    with pysam.AlignmentFile(str(out["sam"])) as sam:
        (read,) = list(sam)
        assert read.reference_start == result["start_b"] and read.get_tag("AS") == result["score"]
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Score: " in out["text"].read_text()
    assert np.all(ops <= 3)


def test_align_refuses_contradictory_options_in_one_line(home, tmp_path):
    (tmp_path / "a.fa").write_text(">a\nACGTACGTAC\n")
    fa = str(tmp_path / "a.fa")
    assert "need the traceback" in one_line_error(run(home, "align", fa, fa, "--no-traceback", "--paf", "x.paf"))
    assert "--recompute goes with --job" in one_line_error(run(home, "align", fa, fa, "--recompute"))
    assert "not a size" in one_line_error(run(home, "align", fa, fa, "--rows-budget", "lots"))


def test_work_spec_commands(home, tmp_path):
    """add-spec, load (a progress bar; TSV and JSON lines), summary, specs, pause, prioritize,
    reweight, retry; bad input is one line and leaves the spec as it was."""
    # paused: the cluster's worker would start on the units at once (they are counted below)
    assert run(home, "add-spec", "fetch", "--run", '{"kind": "command", "argv": ["fetch.sh"]}', "--weight", "2",
               "--max-running", "10", "--paused").returncode == 0
    units = tmp_path / "units.tsv"
    units.write_text("".join(f"url-{k}\thttp://example.org/{k}\n" for k in range(25_000)))
    loaded = run(home, "load", "fetch", str(units), timeout=120)
    assert loaded.returncode == 0 and "25,000 units added to fetch" in loaded.stdout, loaded.stderr
    (row,) = as_json(run(home, "summary", "--json"))
    assert (row["spec"], row["available"], row["total"], row["weight"], row["max_running"]) == ("fetch", 25_000, 25_000, 2.0, 10)
    assert run(home, "pause", "fetch").stdout.strip() == "pause fetch"
    assert run(home, "prioritize", "fetch", "7").returncode == 0
    assert run(home, "reweight", "fetch", "0.5").returncode == 0
    assert "0 failed units available again" in run(home, "retry", "fetch").stdout
    (row,) = as_json(run(home, "specs", "--json"))
    assert (row["paused"], row["priority"], row["weight"]) == (True, 7, 0.5)
    assert "fetch" in run(home, "specs").stdout and "25,000" in run(home, "summary").stdout
    listed = as_json(run(home, "units", "fetch", "--state", "available", "--limit", "3", "--json"))
    assert [u["key"] for u in listed["units"]] == ["url-0", "url-1", "url-2"] and listed["next"] == 2
    assert "url-0" in run(home, "units", "fetch", "--limit", "2").stdout
    assert "no work spec named 'nope'" in one_line_error(run(home, "units", "nope"))
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"key": "x", "data": "1", "priority": 3}\n{"key": "url-7", "data": "dup"}\n')
    assert "already a unit" in one_line_error(run(home, "load", "fetch", str(jsonl)))
    assert "positive" in one_line_error(run(home, "add-spec", "bad", "--run", '{"kind": "call"}', "--weight", "0"))
    assert "not JSON" in one_line_error(run(home, "add-spec", "bad", "--run", "{kind"))
    assert "no work spec named 'nope'" in one_line_error(run(home, "load", "nope", str(units)))
    (row,) = as_json(run(home, "summary", "--json"))
    assert row["total"] == 25_000  # the refused batch added nothing
    # redundancy and continuous specs: their keys in `specs`; bad ones are one line each
    assert run(home, "add-spec", "vote", "--run", '{"kind": "command", "argv": ["true"]}', "--replicas", "3",
               "--compare", "text", "--paused").returncode == 0
    assert run(home, "add-spec", "tick", "--run", '{"kind": "command", "argv": ["true"]}', "--every", "3600").returncode == 0
    listed = run(home, "specs").stdout
    assert "3 (quorum 2)" in listed and "3600 s" in listed
    assert "majority" in one_line_error(run(home, "add-spec", "bad", "--run", '{"kind": "call"}', "--replicas", "4",
                                            "--quorum", "2"))
    # the continuous spec's first unit is made at once and runs on the worker; no second one for an hour
    wait_for(lambda: {r["spec"]: r for r in as_json(run(home, "summary", "--json"))}["tick"]["finished"] == 1, 30,
             "the continuous spec's first unit to run")
    assert {r["spec"]: r for r in as_json(run(home, "summary", "--json"))}["tick"]["total"] == 1
    assert as_json(run(home, "units", "vote", "--disputed", "--json"))["units"] == []


def test_submit_after_waits_for_a_job_and_a_bad_dependency_is_one_line(home):
    first = run(home, "submit", "--no-wait", "--", "sleep", "1")
    assert first.returncode == 0, first.stderr
    second = run(home, "submit", "--after", first.stdout.strip(), "--json", "--", "echo", "after")
    assert second.returncode == 0 and json.loads(second.stdout)["stdout"] == "after\n", second.stderr
    view = as_json(run(home, "jobs", first.stdout.strip(), "--json"))
    assert view["state"] == "done"  # the second ran only once the first was done
    assert "does not exist" in one_line_error(run(home, "submit", "--after", "ab" * 16, "--", "true"))


def test_cancel_a_running_command(home):
    started = run(home, "submit", "--no-wait", "--", "sleep", "60")
    assert started.returncode == 0, started.stderr
    job = started.stdout.strip()
    assert JOB_ID.fullmatch(job)
    wait_for(lambda: as_json(run(home, "jobs", job, "--json"))["assigned"] == 1, 30, "the sleep to start")
    cancelled = run(home, "cancel", job, "--reason", "not needed")
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"cancelled job {job}", cancelled.stderr
    view = as_json(run(home, "jobs", job, "--json"))
    assert (view["state"], view["error"]) == ("cancelled", "not needed")
    again = run(home, "cancel", job)
    assert again.returncode == 0 and "already cancelled" in again.stdout
    assert "not an id" in one_line_error(run(home, "cancel", "1234"))


def test_unreachable_masters_are_one_line_in_bounded_time(tmp_path):
    ports = [free_port() for _ in range(7)]  # bound once and closed: nothing listens there
    config = tmp_path / "cluster.toml"
    config.write_text("".join(f'[masters.m{i}]\napi = "tcp://127.0.0.1:{p}"\n' for i, p in enumerate(ports[:3], 1))
                      + f'[balancers.b1]\nworkers = "tcp://127.0.0.1:{ports[3]}"\npeer = "tcp://127.0.0.1:{ports[4]}"\n'
                      + f'primary = true\n[balancers.b2]\nworkers = "tcp://127.0.0.1:{ports[5]}"\n'
                      + f'peer = "tcp://127.0.0.1:{ports[6]}"\nprimary = false\n')
    make_keys(tmp_path, {"m1": "master", "m2": "master", "m3": "master", "b1": "balancer", "b2": "balancer"})
    for command in (["jobs"], ["workers"]):
        began = time.monotonic()
        line = one_line_error(run(tmp_path / "nohome", *command, "--config", str(config), timeout=30))
        assert time.monotonic() - began < 20, line
        assert "no master answered" in line or "no active balancer" in line


def test_after_down_every_command_says_no_cluster(home, tmp_path):
    stopped = run(home, "down", timeout=60)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    for fa in ("a.fa", "b.fa"):
        (tmp_path / fa).write_text(f">{fa}\nACGTACGT\n")
    assert "no cluster" in one_line_error(run(home, "jobs"))
    assert "no cluster" in one_line_error(run(home, "align", str(tmp_path / "a.fa"), str(tmp_path / "b.fa")))
    assert "no cluster" in one_line_error(run(home, "workers"))
    assert "no cluster" in one_line_error(run(home, "submit", "--", "true"))
