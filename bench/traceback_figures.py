"""The traceback's figures for bench/align.py: stages 2-5 of a finished alignment job on the
cluster, as a fraction of its score pass, and what its special rows cost on disk.

Stage 2 (crosspoints) is one task, stage 3-4 one task per box, stage 5 the client's join and
re-scoring (``cluster.trace.traceback``). The wall time of each stage is measured by the client
(submit to the job's end as the ledger reports it, polled every 0.1 s); the tasks' own seconds
come from their summaries, so the report can tell the stages' compute from their overhead.
"""

from __future__ import annotations

import statistics
from typing import Any

from cluster.client import Client
from cluster.trace import traceback


def measure(client: Client, job: str, seq_a: str, seq_b: str, score_pass: dict, stride: int | None,
            replicas: int) -> dict[str, Any]:
    """Trace ``job`` (its score pass ``score_pass``: run_cluster's row) and return the figures."""
    t = traceback(client, job, seq_a=seq_a, seq_b=seq_b, timeout=3600)
    cross = client.task(t.jobs["crosspoints"], 0).value.get("summary") or {}
    boxes = [client.task(t.jobs["boxes"], k).value.get("summary") or {} for k in range(t.boxes)]
    box_s = [b.get("seconds", 0.0) for b in boxes]
    from worker.sw import cigar

    stats = cigar.stats(t.ops)
    rows = score_pass.get("special_rows_bytes", 0)
    special_rows = len(seq_b) // stride if stride else 0
    return {
        "seconds": round(t.timings["total_s"], 3),
        "fraction_of_score_pass": t.timings["total_s"] / score_pass["seconds"],
        "crosspoints_s": round(t.timings["crosspoints_s"], 3),
        "boxes_s": round(t.timings["boxes_s"], 3),
        "join_s": round(t.timings["join_s"], 3),
        "crosspoints_task_s": cross.get("seconds"),
        "crosspoints_load_rows_s": cross.get("load_s"),
        "crosspoints": t.crosspoints, "boxes": t.boxes,
        "box_task_s_sum": round(sum(box_s), 3),
        "box_task_s_median": round(statistics.median(box_s), 4) if box_s else 0.0,
        "box_cells_sum": sum(b.get("cells", 0) for b in boxes),
        "start_a": t.start_a, "start_b": t.start_b, "columns": stats["columns"],
        "identity": round(stats["identity"], 4), "gap_opens": stats["gap_opens"],
        "rescored_to_score": True,  # traceback() raises unless the CIGAR re-scores to S* at the end cell
        "special_stride": stride, "special_rows": special_rows,
        "special_rows_raw_bytes": special_rows * 8 * len(seq_a),
        "special_rows_bytes": rows, "special_rows_on_disk_bytes": rows * replicas,
    }


def report(out, rows: list[dict]) -> None:
    """One line per traced cluster row."""
    for r in rows:
        t = r.get("traceback")
        if not t:
            continue
        out(f"traceback {r.get('pair', '')} tile {r['tile_rows']}: {t['seconds']:.2f} s = {t['fraction_of_score_pass']:.1%} of the "
            f"score pass ({r['seconds']:.2f} s; goal <= 25%): crosspoints {t['crosspoints_s']:.2f} s ({t['crosspoints']} "
            f"points, task {t['crosspoints_task_s']:.2f} s of which loading rows {t['crosspoints_load_rows_s']:.2f} s), "
            f"boxes {t['boxes_s']:.2f} s ({t['boxes']} tasks, {t['box_task_s_sum']:.2f} s of slot time), join and "
            f"re-score {t['join_s']:.2f} s; {t['columns']:,} columns, identity {t['identity']:.1%}, re-scores exactly; "
            f"special rows every {t['special_stride']:,} rows: {t['special_rows']} rows, "
            f"{t['special_rows_bytes'] / 1e6:.0f} MB packed ({t['special_rows_raw_bytes'] / max(1, t['special_rows_bytes']):.1f}x "
            f"smaller than int32), {t['special_rows_on_disk_bytes'] / 1e6:.0f} MB on disk with replicas")
