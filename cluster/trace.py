"""The alignment itself: the traceback of a finished alignment job, run on the cluster.

Theory of operation
-------------------
The score pass (``cluster.align``) kept every tile's special rows (``keep_files: ["rows"]``).
Stage 2 is one ``trace`` task (``op: crosspoints``): it reads every tile's rows file and walks
from the end cell up to the start, strip by strip (``worker.sw.trace.crosspoints``). Stages 3-4
are one ``trace`` task per box between consecutive crosspoints (``op: box``), independent, so
the cluster runs them on every slot. Stage 5 here joins the boxes' CIGARs, places them at the
start cell and re-scores them against the sequences: the alignment is returned only if it
scores exactly the score pass's S*.

Both stages are ordinary jobs in the ledger: a worker or a master leader lost mid-way costs a
retried task, not the traceback. If the special rows are gone (released, or lost by storage),
the traceback says so and how to recompute them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cluster.client import Client, ClusterError
from cluster.align import answer, poll_job
from cluster.alnout import AlignmentRecord
from worker.sw import cigar
from worker.sw.scoring import Scoring, encode
from worker.sw.trace import Point, TracedAlignment, boxes

RECOMPUTE = ("run its score pass again to keep new special rows: `cluster align --job {job} --recompute` (its "
             "stored sequences and scoring), or align the FASTA files anew")


@dataclass(frozen=True)
class Traced(TracedAlignment):
    """An alignment traced by the cluster, with the two sequences it spans (as letters), the
    seconds each stage took, and the jobs that ran the stages."""

    seq_a: str
    seq_b: str
    timings: dict[str, float] = field(default_factory=dict)
    crosspoints: int = 0
    boxes: int = 0
    jobs: dict[str, str] = field(default_factory=dict)  # stage -> the job that ran it


def job_files(client: Client, job: str) -> dict[str, str]:
    """Name -> file id (hex) of every file job ``job`` owns."""
    out: dict[str, str] = {}
    after = None
    while True:
        page = client.files(1000, owner=job, after=after).value
        for f in page["files"]:
            out[f["name"]] = f["id"]
        after = page.get("next")
        if not after:
            return out


def _wait(client: Client, job: str, what: str, timeout: float | None, align_job: str, poll_s: float = 0.1,
          progress: Callable[[dict], None] | None = None) -> dict:
    """Job ``job`` (a stage of ``align_job``'s traceback) once done; ClusterError otherwise."""
    view = poll_job(client, job, poll_s=poll_s, timeout=timeout, progress=progress, still=f"it is {what}")
    if view["state"] != "done":
        error = view.get("error") or "no reason given"
        if "no longer stored" in error or "special-rows" in error or "special rows" in error:
            raise ClusterError(f"{what} failed: the score pass's special rows are gone ({error}); "
                               f"{RECOMPUTE.format(job=align_job)}")
        raise ClusterError(f"{what} (job {job}) {view['state']}: {error}")
    return view


def traceback(client: Client, job: str, *, seq_a: str | None = None, seq_b: str | None = None,
              progress: Callable[[str, dict], None] | None = None, timeout: float | None = None) -> Traced:
    """Trace the optimal local alignment of finished alignment job ``job``.

    ``seq_a``/``seq_b`` are the pair's letters when the caller has them (else they are fetched
    from storage). ``progress(stage, view)`` gets each stage's job view while it runs. Raises
    ClusterError with what to do when the job is not a finished alignment, its special rows are
    gone, or the alignment does not re-score to the job's score.
    """
    t0 = time.monotonic()
    info, best, rows = _traceable(client, job)
    if seq_a is None or seq_b is None:
        seq_a, seq_b = (_fetch_text(client, info[side]) for side in ("a", "b"))
    scoring = info.get("scoring") or {}
    run = {"kind": "trace", "a": info["a"], "b": info["b"], "scoring": scoring, "kernel": info.get("kernel", "int16")}
    timings: dict[str, float] = {}

    def stage(key: str, op: str, name: str, what: str, tasks: list[dict]) -> str:
        """Run one stage of the traceback (``op``) as a job of ``tasks``; its id once done.
        ``key`` names the stage to ``progress`` and in the timings."""
        t = time.monotonic()
        ref = client.submit_job("list", {"name": f"trace {job}: {name}", "run": {**run, "op": op}, "tasks": tasks,
                                         "max_attempts": 5, "retry_failed": False})
        _wait(client, ref.job, what, timeout, job, progress=(lambda v: progress(key, v)) if progress else None)
        timings[f"{key}_s"] = time.monotonic() - t
        return ref.job

    task = {"end_a": best["end_a"], "end_b": best["end_b"], "score": best["score"], "rows": rows}
    jobs = {"crosspoints": stage("crosspoints", "crosspoints", "crosspoints", "the crosspoint search", [task])}
    points = client.task(jobs["crosspoints"], 0).value["summary"]["points"]
    pieces = boxes([Point(*p) for p in points])
    jobs["boxes"] = stage("boxes", "box", f"{len(pieces)} boxes", "the boxes of the traceback",
                          [b.as_dict() for b in pieces])

    t = time.monotonic()
    ops = _joined(client, jobs["boxes"], len(pieces))
    start_a, start_b = points[-1][1] + 1, points[-1][0] + 1
    a_codes, b_codes = encode(seq_a, "A"), encode(seq_b, "B")
    rescored = cigar.rescore(ops, a_codes, b_codes, start_a, start_b, Scoring(**scoring))
    in_a, in_b = cigar.consumed(ops)
    end_a, end_b = start_a + int(in_a.sum()) - 1, start_b + int(in_b.sum()) - 1
    if rescored != best["score"] or (end_a, end_b) != (best["end_a"], best["end_b"]):
        raise ClusterError(f"the traced alignment re-scores to {rescored} ending at A[{end_a}] B[{end_b}], not the "
                           f"score pass's {best['score']} at A[{best['end_a']}] B[{best['end_b']}]; {RECOMPUTE.format(job=job)}")
    timings["join_s"] = time.monotonic() - t
    timings["total_s"] = time.monotonic() - t0
    return Traced(best["score"], start_a, start_b, end_a, end_b, ops, seq_a, seq_b, timings,
                  crosspoints=len(points), boxes=len(pieces), jobs=jobs)


def _traceable(client: Client, job: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(the job's alignment info, its best cell, its special-rows files) when ``job`` is a
    finished alignment whose rows are all still stored; ClusterError saying what to do if not."""
    view = client.job(job).value
    info = view.get("align")
    if not info:
        raise ClusterError(f"job {job} is not an alignment job")
    if view["state"] != "done":
        raise ClusterError(f"alignment job {job} is {view['state']}; the traceback needs a finished score pass")
    best = answer(view)
    if not info.get("special_stride"):
        raise ClusterError(f"alignment job {job} kept no special rows (it was submitted score-only); {RECOMPUTE.format(job=job)}")
    if best["score"] <= 0:
        raise ClusterError(f"alignment job {job} found no alignment (best score {best['score']})")
    files = job_files(client, job)
    rows = sorted(fid for name, fid in files.items() if name.endswith(".rows"))
    tiles = info["rows"] * info["cols"]
    if len(rows) != tiles:
        raise ClusterError(f"the score pass's special rows of job {job} are gone: {len(rows)} of {tiles} "
                           f"tiles' rows files are still registered; {RECOMPUTE.format(job=job)}")
    return info, best, rows


def _joined(client: Client, boxes_job: str, count: int) -> np.ndarray:
    """The boxes' CIGARs, in order, as one array of ops (a long one was stored as a file)."""
    parts = []
    for k in range(count):
        task_view = client.task(boxes_job, k).value
        text = (task_view.get("summary") or {}).get("cigar")
        if text is None:
            text = _fetch_text(client, task_view["result_file"])
        parts.append(cigar.parse(text))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _fetch_text(client: Client, file_id: str) -> str:
    with tempfile.TemporaryDirectory(prefix="cluster-trace-") as d:
        path = Path(d) / "file"
        client.download(file_id, path)
        return path.read_text("ascii")


def record(traced: Traced, info: dict[str, Any], scoring: dict[str, int] | None = None):
    """The ``cluster.alnout.AlignmentRecord`` of a traced alignment (names from the job)."""
    return AlignmentRecord(
        name_a=info.get("name_a", "A"), name_b=info.get("name_b", "B"), len_a=len(traced.seq_a),
        len_b=len(traced.seq_b), start_a=traced.start_a, end_a=traced.end_a, start_b=traced.start_b,
        end_b=traced.end_b, score=traced.score, ops=traced.ops, seq_a=traced.seq_a, seq_b=traced.seq_b,
        scoring=Scoring(**(scoring if scoring is not None else info.get("scoring") or {})))
