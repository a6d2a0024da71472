"""Issue 9's cluster tests: the traceback survives a SIGKILLed worker and master leader, and a job
whose special rows are gone says so and can be recomputed.

The pair is test_align_faults's (150 kbp, a planted 120 kbp mutated copy, 6 x 6 tiles of 25,600).
The oracle is ``worker.sw.trace.trace_local``, the same stages on this machine: the traceback is
deterministic (the same special rows give the same crosspoints, the same boxes give the same
CIGAR), so the cluster's alignment must equal it column for column, and re-score to S*.

The score pass keeps one special row per tile row here (a 1-byte budget: the stride is the tile
height), so the crosspoint search is one task of a few seconds, long enough to be caught
running and SIGKILLed.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cluster import trace
from cluster.align import recompute, submit_alignment, wait
from cluster.client import Client, ClusterError
from worker.sw import cigar
from worker.sw import trace as local_trace
from worker.sw.scoring import Scoring, encode

from .conftest import detail
from .test_align_faults import GRID, JOB_TIMEOUT, TILE, Case, Cluster, case, running  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def oracle(case: Case, tmp_path_factory) -> local_trace.Traced:  # noqa: F811 - case is the imported fixture
    d = tmp_path_factory.mktemp("rows")
    a, b = encode(case.pair.seq_a), encode(case.pair.seq_b)
    got = local_trace.trace_local(a, b, Scoring(), d, tile=TILE, stride=TILE)
    assert (got.score, got.end_a, got.end_b) == case.oracle
    assert cigar.rescore(got.ops, a, b, got.start_a, got.start_b, Scoring()) == got.score
    return got


def score_pass(c: Cluster, case: Case) -> str:  # noqa: F811
    job = submit_alignment(c.client, case.pair, slots=2, tile=(TILE, TILE), rows_budget=1)
    assert job["special_stride"] == TILE
    result = wait(c.client, job["job"], timeout=JOB_TIMEOUT)
    assert (result["score"], result["end_a"], result["end_b"]) == case.oracle
    return job["job"]


def check(traced: trace.Traced, want: local_trace.Traced) -> None:
    assert (traced.score, traced.start_a, traced.start_b, traced.end_a, traced.end_b) == \
        (want.score, want.start_a, want.start_b, want.end_a, want.end_b)
    assert np.array_equal(traced.ops, want.ops), "the cluster's CIGAR is the one traced on one machine"


def running_trace(c: Cluster, job: str) -> tuple | None:
    """(worker, task) of a worker running a trace task, per its status."""
    for w in c.workers:
        for r in (detail(w) or {}).get("running", []):
            if r["kind"] == "trace":
                return w, r["task"]
    return None


def work_done(c: Cluster) -> tuple[int, dict[str, int]]:
    """The number of jobs in the serving leader's ledger (a submit returns once the leader has
    applied it) and each worker's count of tasks started: what a traceback that submitted
    anything would change."""
    leader = c.wait(c.leader, 10, "a serving master leader")
    workers = {w.name: detail(w) for w in c.workers}
    assert all(workers.values()), f"a worker does not answer: {workers}"
    return detail(leader)["ledger"]["jobs"], {name: d["core"].get("tasks_started", 0) for name, d in workers.items()}


def test_traceback_survives_a_worker_and_the_leader_sigkilled(tmp_path, case, oracle):  # noqa: F811
    with running(tmp_path) as c:
        job = score_pass(c, case)
        out: dict = {}

        def run() -> None:
            with Client(c.client.masters, storage=c.client.storage, replicas=2, timeout=30) as client:
                try:
                    out["traced"] = trace.traceback(client, job, seq_a=case.pair.seq_a, seq_b=case.pair.seq_b,
                                                    timeout=JOB_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - reported below with the logs
                    out["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        victim, task = c.wait(lambda: running_trace(c, job) or ("error" in out and (None, None)), 60,
                              "a worker running the crosspoint search")
        assert victim is not None, out.get("error")
        c.extra_pids |= set(__import__("cluster.up", fromlist=["descendants"]).descendants(victim.pid))
        victim.kill()
        killed = f"{victim.name} running {task}"
        leader = c.wait(c.leader, 10, "the master leader")
        # the leader goes while the traceback is still on: during the crosspoint search's retry
        # on the other worker or during the boxes
        c.wait(lambda: not thread.is_alive() or running_trace(c, job), 60, "the traceback's next task to run")
        leader.kill()
        thread.join(JOB_TIMEOUT)
        assert not thread.is_alive(), f"the traceback did not end\n{c.logs()}"
        if "error" in out:
            pytest.fail(f"{out['error']}\n{c.logs()}")
        print(f"\n[traceback] killed {killed}, then the leader {leader.name}; {out['traced'].timings}")
        check(out["traced"], oracle)


def test_deleted_special_rows_are_a_clear_error_and_can_be_recomputed(tmp_path, case, oracle):  # noqa: F811
    with running(tmp_path) as c:
        job = score_pass(c, case)
        rows = sorted(fid for name, fid in trace.job_files(c.client, job).items() if name.endswith(".rows"))
        assert len(rows) == GRID
        c.client.release_files(rows[7], owner=job)  # deleted: the ledger drops it, the storage nodes collect it
        before = work_done(c)
        with pytest.raises(ClusterError) as failed:
            trace.traceback(c.client, job, timeout=JOB_TIMEOUT)
        message = str(failed.value)
        assert "special rows of job" in message and f"{GRID - 1} of {GRID}" in message and "--recompute" in message
        assert work_done(c) == before, "refused before any task ran: no job submitted, no task started"
        # the job itself is intact: its score and its sequences are still there
        assert c.client.job(job).value["state"] == "done"
        again = recompute(c.client, job, slots=2, rows_budget=1)
        result = wait(c.client, again["job"], timeout=JOB_TIMEOUT)
        assert (result["score"], result["end_a"], result["end_b"]) == case.oracle
        jobs, started = work_done(c)  # the counts above do move when work is done
        assert jobs > before[0] and sum(started.values()) > sum(before[1].values())
        check(trace.traceback(c.client, again["job"], timeout=JOB_TIMEOUT), oracle)
