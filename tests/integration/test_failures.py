"""Every failure explains itself from the CLI alone (issue 21): why a command, a task or a work
unit failed, in one command each, and `cluster submit`'s exit status is the command's own.

One local cluster (`cluster up --workers 1 --slots 1`) under a CLUSTER_HOME of its own, stopped
at the end whatever happened (`cluster down`, then SIGKILL by pid for anything of ours left)."""

from __future__ import annotations

import pytest

from cluster.client import Client

from .test_cli_commands import JOB_ID, as_json, command_failed, local_cluster, one_line_error, run, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with local_cluster(tmp_path_factory, "failures", "--workers", "1", "--slots", "1") as d:
        yield d


def test_submit_exits_with_the_commands_own_status_and_jobs_says_why(home):
    failed = run(home, "submit", "--", "sh", "-c", "echo first >&2; echo boom >&2; exit 4")
    assert failed.returncode == 4, failed.stderr
    job = JOB_ID.search(command_failed(failed, "first", "boom")).group(0)
    shown = run(home, "jobs", job)
    assert shown.returncode == 0, shown.stderr
    assert "exit status 4" in shown.stdout and "    boom" in shown.stdout and "    first" in shown.stdout, shown.stdout
    (failure,) = as_json(run(home, "jobs", job, "--json"))["failures"]
    assert (failure["task"], failure["outcome"], failure["error"]) == (0, "failed", "exit status 4")
    assert failure["tail"].splitlines() == ["first", "boom"]
    story = run(home, "jobs", job, "--task", "0")
    assert "| boom" in story.stdout, story.stdout

    assert run(home, "submit", "--timeout", "1", "--", "sleep", "60", timeout=90).returncode == 124
    assert run(home, "submit", "--env", "novalue", "--", "true").returncode == 125  # not the command's doing
    assert run(home, "submit", "--", "sh", "-c", "kill -9 $$").returncode == 128 + 9


def test_a_misspelt_kind_is_refused_at_once_and_a_failed_unit_says_why(home, tmp_path):
    refused = run(home, "add-spec", "bad2", "--run", '{"kind": "comand", "argv": ["true"]}')
    assert "'comand'" in one_line_error(refused)
    assert "bad2" not in run(home, "specs").stdout

    assert run(home, "add-spec", "sq", "--max-attempts", "2", "--run",
               '{"kind": "command", "argv": ["sh", "-c", "echo \\"cannot square $WORK_KEY\\" >&2; exit 2"]}').returncode == 0
    units = tmp_path / "units.tsv"
    units.write_text("seven\t7\n")
    assert run(home, "load", "sq", str(units)).returncode == 0
    wait_for(lambda: {r["spec"]: r for r in as_json(run(home, "summary", "--json"))}["sq"]["failed"] == 1, 60,
             "the unit to fail twice")
    shown = run(home, "units", "sq", "--state", "failed")
    assert shown.stdout.count("failed (exit status 2)") == 2 and "  cannot square seven" in shown.stdout, shown.stdout
    (unit,) = as_json(run(home, "units", "sq", "--json"))["units"]
    assert [(a["outcome"], a["reason"], a["tail"]) for a in unit["attempts"]] == \
        [("failed", "exit status 2", "cannot square seven")] * 2


def test_a_task_no_worker_can_run_is_waiting_with_the_reason_not_running(home):
    with Client(config=home / "cluster.toml") as client:
        future = client.options(need={"cores": 64}).run(["true"])
    job = future.job

    def waiting():
        view = as_json(run(home, "jobs", job, "--json"))
        return view if view.get("waiting") == 1 else None

    view = wait_for(waiting, 20, "the balancer's reason to reach the job's view")
    assert view["running"] == 0 and view["assigned"] == 1
    (reason,) = view["waiting_reasons"]
    assert reason["tasks"] == 1 and reason["reason"].startswith("no worker has 64 cores (the most is ")
    shown = run(home, "jobs", job).stdout
    assert "0 running, 1 waiting for a worker" in shown and "waiting: 1 task: no worker has 64 cores" in shown, shown
    listed = run(home, "jobs", "--limit", "50").stdout
    assert "waiting: no worker has 64 cores" in listed, listed  # the list's state column says why
    assert run(home, "cancel", job).returncode == 0
