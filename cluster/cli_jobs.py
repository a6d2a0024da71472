"""The job commands of ``cluster``, for users and operators: ``jobs``, ``workers`` and ``align``
(``submit``, ``cancel`` and ``logs`` are in ``cluster.cli_tasks``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from cluster.cli_common import (CONFIG_OPTION, WATCH_OPTION, _ago, _client, _cluster_config, _json,
                                _ledger_age, _session, _table_console, _watch, _when)
from cluster import align as job_lib
from cluster import alnout
from cluster.client import ClusterError
from cluster.node.config import find_config, load_cluster_config
from cluster.node.status import query_status


@click.command()
@click.argument("fasta_a", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("fasta_b", required=False, type=click.Path(dir_okay=False, path_type=Path))
@CONFIG_OPTION
@click.option("--record-a", help="Record of A to align (default: the first; you are told which).")
@click.option("--record-b", help="Record of B to align (default: the first).")
@click.option("--match", type=int, default=2, show_default=True)
@click.option("--mismatch", type=int, default=-3, show_default=True)
@click.option("--open", "gap_open", type=int, default=5, show_default=True,
              help="Gap open penalty: a gap of length k costs open + (k-1)*extend.")
@click.option("--extend", "gap_extend", type=int, default=2, show_default=True)
@click.option("--kernel", type=click.Choice(["int16", "int32"]), default="int16", show_default=True)
@click.option("--tile", type=click.IntRange(128, 1 << 20), default=None,
              help="Tile side in letters (default: sized from the kernels' rate and the slots).")
@click.option("--job", "job_id", default=None, help="Watch an alignment job already submitted, instead of a new one.")
@click.option("--recompute", is_flag=True,
              help="With --job: run that job's score pass again (its stored sequences and scoring) to keep new "
                   "special rows, then trace.")
@click.option("--paf", type=click.Path(dir_okay=False, path_type=Path), help="Write the alignment as PAF (with cg:Z).")
@click.option("--sam", type=click.Path(dir_okay=False, path_type=Path), help="Write the alignment as SAM.")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), help="Write a pairwise text view.")
@click.option("--dotplot", type=click.Path(dir_okay=False, path_type=Path), help="Write a dotplot PNG of the path.")
@click.option("--no-traceback", is_flag=True, help="The score and end cell only: keep no special rows, trace nothing.")
@click.option("--rows-budget", default="4G", show_default=True,
              help="Raw bytes of special rows the score pass may keep for the traceback (K/M/G suffixes); "
                   "more rows make the traceback faster. They pack ~10x smaller on disk.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (python -m worker.sw's keys, job, and start_a, start_b, cigar).")
def align(fasta_a: Path | None, fasta_b: Path | None, config_path: Path | None, record_a: str | None,
          record_b: str | None, match: int, mismatch: int, gap_open: int, gap_extend: int, kernel: str,
          tile: int | None, job_id: str | None, recompute: bool, paf: Path | None, sam: Path | None,
          text: Path | None, dotplot: Path | None, no_traceback: bool, rows_budget: str, as_json: bool) -> None:
    """Align FASTA_A (query) against FASTA_B (reference) on the cluster: the exact best local
    score and where it ends, as `python -m worker.sw` gives it on one machine, then the alignment
    itself (traced in linear space on the cluster): its start, CIGAR, and on request PAF, SAM, a
    text view and a dotplot."""
    err = Console(stderr=True)
    budget = None if no_traceback else _size(rows_budget)
    if no_traceback and (paf or sam or text or dotplot):
        raise click.ClickException("--paf/--sam/--text/--dotplot need the traceback: drop --no-traceback")
    if recompute and job_id is None:
        raise click.ClickException("--recompute goes with --job ID (a new alignment computes its rows anyway)")
    client = _client(config_path)
    pair = None
    try:
        slots = _cluster_slots(config_path)
        if recompute:
            desc = job_lib.recompute(client, job_id, slots=max(1, slots), rows_budget=budget or job_lib.ROWS_BUDGET)
            if not as_json:
                err.print(f"job {job_id} recomputed as job {desc['job']}")
            job_id = desc["job"]
        if job_id is None:
            if fasta_a is None or fasta_b is None:
                raise click.UsageError("give two FASTA files (or --job ID to watch a submitted alignment)")
            pair = job_lib.read_pair(fasta_a, fasta_b, record_a, record_b)
            if not as_json:
                err.print(f"A {pair.name_a} ({len(pair.seq_a):,} bp) x B {pair.name_b} ({len(pair.seq_b):,} bp)"
                          + ("" if record_a or record_b else "  (first records; --record-a/-b pick others)"))
            scoring = {"match": match, "mismatch": mismatch, "gap_open": gap_open, "gap_extend": gap_extend}
            desc = job_lib.submit_alignment(client, pair, scoring=scoring, kernel=kernel, slots=max(1, slots),
                                            tile=(tile, tile) if tile else None, rows_budget=budget,
                                            progress=None if as_json else err.print)
            job_id = desc["job"]
            if not as_json:
                err.print(f"job {job_id}: {desc['rows']} x {desc['cols']} tiles of {desc['tile_rows']:,} x "
                          f"{desc['tile_cols']:,} (Ctrl-C leaves it running: `cluster align --job {job_id}`)")
        result = _watch_alignment(client, job_id, slots, quiet=as_json)
        record = None
        if not no_traceback and result["score"] > 0:
            record = _trace(client, job_id, pair, result, quiet=as_json)
            _write_outputs(record, paf, sam, text, dotplot)
    except ClusterError as exc:
        raise click.ClickException(str(exc))
    except (OSError, ValueError) as exc:  # an output path that cannot be written, a bad record
        raise click.ClickException(f"cannot write the outputs: {exc}")
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(result))
    else:
        _report_alignment(result, slots, traced=record is not None,
                          outputs=(("PAF", paf), ("SAM", sam), ("text", text), ("dotplot", dotplot)))


def _report_alignment(result: dict, slots: int, *, traced: bool, outputs: tuple[tuple[str, Path | None], ...]) -> None:
    """The alignment's answer for people: the score pass, then the traceback and the files written."""
    click.echo(f"score {result['score']}, ends at A[{result['end_a']}] B[{result['end_b']}]")
    click.echo(f"{result['cells']:,} cells in {result['seconds']:.2f} s: {result['gcups']:.2f} GCUPS "
               f"({result['tiles']} tiles on {slots} slots; job {result['job']})")
    if not traced:
        return
    t = result["traceback"]
    click.echo(f"starts at A[{result['start_a']}] B[{result['start_b']}]: {t['columns']:,} columns, "
               f"identity {t['identity']:.1%}, {t['gap_opens']:,} gaps ({t['insertions']:,} I + "
               f"{t['deletions']:,} D letters)")
    click.echo(f"traceback {t['seconds']:.2f} s ({t['seconds'] / max(result['seconds'], 1e-9):.0%} of the score "
               f"pass): {t['crosspoints']} crosspoints, {t['boxes']} box{'es' if t['boxes'] != 1 else ''}; CIGAR re-scores to "
               f"{result['score']}")
    for what, path in outputs:
        if path:
            click.echo(f"{what}: {path}")


def _size(text: str) -> int:
    """'4G', '512M', '100000' as bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    try:
        if t and t[-1] in units:
            value = int(float(t[:-1]) * units[t[-1]])
        else:
            value = int(t)
    except ValueError:
        raise click.ClickException(f"--rows-budget {text!r} is not a size (e.g. 4G, 512M, 1000000)") from None
    if value <= 0:
        raise click.ClickException(f"--rows-budget {text!r}: the budget must be positive")
    return value


def _trace(client: Any, job_id: str, pair: Any, result: dict, quiet: bool):
    """The traceback (with a progress line per stage); adds start_a, start_b, cigar and the
    traceback's figures to ``result`` and returns the alignment record for the writers."""
    # lazy: the traceback loads numba (its box kernels), which `cluster jobs` and friends never need
    from cluster import trace

    seqs = {"seq_a": pair.seq_a, "seq_b": pair.seq_b} if pair is not None else {}
    if quiet:
        traced = trace.traceback(client, job_id, **seqs)
    else:
        columns = [TextColumn("traceback: {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("trace", total=None, stage="")

            def show(stage: str, view: dict) -> None:
                bar.update(task, total=view["total"], completed=view["done"], stage=stage)

            traced = trace.traceback(client, job_id, progress=show, **seqs)
    info = client.job(job_id).value.get("align", {})
    record = trace.record(traced, info)
    counts = alnout.summary(record)
    result.update(start_a=traced.start_a, start_b=traced.start_b, cigar=traced.cigar)
    result["traceback"] = {"seconds": round(traced.timings["total_s"], 6), **{k: round(v, 6) for k, v in traced.timings.items()},
                           "crosspoints": traced.crosspoints, "boxes": traced.boxes,
                           **{k: counts[k] for k in ("columns", "identity", "gap_opens", "insertions", "deletions")
                              if k in counts}}
    return record


def _write_outputs(record: Any, paf: Path | None, sam: Path | None, text: Path | None, dotplot: Path | None) -> None:
    if paf:
        alnout.write_paf(record, paf)
    if sam:
        alnout.write_sam(record, sam)
    if text:
        alnout.write_text(record, text)
    if dotplot:
        alnout.write_dotplot(record, dotplot)


def _cluster_slots(config_path: Path | None) -> int:
    """The task slots of the workers registered with the active balancer (0 if unknown)."""
    path = config_path or find_config()[0]
    try:
        config = load_cluster_config(path)
    except Exception:  # noqa: BLE001 - the slot count only sizes tiles and labels the output
        return 0
    for b in config.balancers.values():
        reply = query_status([b.workers], timeout=1.0)[0].reply
        if reply is not None and reply.detail.get("state") == "active":
            return sum(w.get("slots", 0) for w in reply.detail.get("workers", []))
    return 0


def _watch_alignment(client: Any, job_id: str, slots: int, quiet: bool) -> dict:
    """Wait for the job, with a progress bar of tiles, cells, GCUPS and ETA."""
    if quiet:
        return job_lib.wait(client, job_id, slots=slots)
    columns = [TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("align", total=None, rate="")

        def show(view: dict) -> None:
            cells = view["reduced"].get("sum", {}).get("cells", 0)
            elapsed = _ledger_age(view.get("submitted_at"), client.masters)  # the ledger's clock is not time.time()
            rate = f"{cells / max(1e-6, elapsed) / 1e9:.2f} GCUPS" if elapsed else ""
            bar.update(task, total=view["total"], completed=view["done"], rate=rate)

        return job_lib.wait(client, job_id, slots=slots, progress=show)


@click.command()
@click.argument("job_id", required=False)
@CONFIG_OPTION
@click.option("--state", type=click.Choice(["active", "done", "failed", "cancelled"]), default=None,
              help="Only the jobs in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True, help="How many of the newest.")
@click.option("--task", "task_id", type=click.IntRange(0), default=None,
              help="With JOB: task N end to end (submitted; each attempt's fence, balancer, worker, outcome; "
                   "the commits' log indices).")
@click.option("--json", "as_json", is_flag=True, help="Print the masters' job views (+ age_s) as JSON.")
@WATCH_OPTION
def jobs(job_id: str | None, config_path: Path | None, state: str | None, limit: int, task_id: int | None,
         as_json: bool, watch_s: float | None) -> None:
    """The newest jobs, newest first; with JOB (hex id), that job's view (an alignment's
    cells done, GCUPS so far and ETA too); with JOB --task N, that task's story."""
    if watch_s is not None and (as_json or task_id is not None):
        raise click.UsageError("--watch redraws the list or a JOB's view: drop --json and --task")
    if task_id is not None:
        if job_id is None:
            raise click.ClickException("--task N goes with a JOB: `cluster jobs JOB --task N`")
        _show_task(config_path, job_id, task_id, as_json)
        return
    if job_id is not None:
        if watch_s is not None:
            _watch(lambda: Text("\n".join(_show_job(config_path, job_id, False, show=None))), watch_s)
        else:
            _show_job(config_path, job_id, as_json)
        return
    with _session(config_path) as client:
        if watch_s is not None:
            _watch(lambda: _jobs_table(*_job_views(client, limit, state), state), watch_s)
            return
        views, stale = _job_views(client, limit, state)
    if as_json:
        click.echo(_json(views))
        return
    _table_console().print(_jobs_table(views, stale, state))
    if not views:
        click.echo("no jobs" + (f" in state {state}" if state else "") + ": `cluster submit -- CMD` runs one", err=True)


def _job_views(client: Any, limit: int, state: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The newest jobs' views (each with its ``age_s``) and whether a follower answered."""
    answer = client.jobs(limit, state)
    return [{**v, "age_s": _ledger_age(v.get("submitted_at"), client.masters)} for v in answer.value], answer.stale


def _jobs_table(views: list[dict[str, Any]], stale: bool, state: str | None) -> Table:
    table = Table(title=f"jobs{f' ({state})' if state else ''}" + (" (stale: a follower answered)" if stale else ""))
    for col in ("id", "name", "kind", "state", "done/total", "failed", "submitted", "age"):
        table.add_column(col, no_wrap=col in ("id", "submitted"))
    for v in views:
        state_text = _state_text(v)
        table.add_row(v["job"], v.get("name") or "-", v["kind"], state_text, f"{v['done']}/{v['total']}",
                      str(v["failed"]), _when(v["age_s"]), _ago(v["age_s"]))
    return table


def _show_job(config_path: Path | None, job_id: str, as_json: bool, show: Any = click.echo) -> list[str] | None:
    """Print JOB's view (``show`` None: return its lines instead, for --watch)."""
    with _session(config_path) as client:
        answer = client.job(job_id.lower())
        view = answer.value
        lengths = _alignment_lengths(client, view["job"]) if view["kind"] == "grid" else None
        age = _ledger_age(view.get("submitted_at"), client.masters)
    alignment = _alignment_progress(view, lengths, age)
    if as_json:
        click.echo(_json({**view, "age_s": age, "stale": answer.stale, "alignment": alignment}))
        return
    ran = view["finished_at"] - view["submitted_at"] if view.get("finished_at") and view.get("submitted_at") else None
    lines = [f"job {view['job']}  {view.get('name') or ''}".rstrip(),
             f"kind {view['kind']}, {view['state']}" + (" (stale: a follower answered)" if answer.stale else ""),
             f"tasks: {view['done']} of {view['total']} done, {view['failed']} failed, "
             f"{view.get('running', view['assigned'])} running, {view.get('waiting', 0)} waiting for a worker, "
             f"{view['ready']} ready; {view['failed_attempts']} failed attempts",
             f"submitted {_when(age)} ({_ago(age)} ago)" + (f", ended after {_ago(ran)}" if ran is not None else "")]
    if view.get("waiting_for"):
        lines.append(f"waiting for job{'s' * (len(view['waiting_for']) > 1)} {', '.join(view['waiting_for'])} "
                     "to be done before it starts")
    for w in view.get("waiting_reasons") or []:  # the balancer's word: why no worker runs them
        lines.append(f"waiting: {w['tasks']} task{'s' * (w['tasks'] != 1)}: {w['reason']}")
    if view.get("error"):
        lines.append(f"error: {view['error']}")
    lines += _failure_lines(view.get("failures") or [])
    if alignment is not None:
        a = alignment
        total = (f"{a['total_cells']:,}" + ("" if a["exact_total"] else " (estimated)")) if a["total_cells"] else "?"
        rate = "" if a["gcups"] is None else f", {a['gcups']:.2f} GCUPS so far"
        eta = "" if a["eta_s"] is None else f", ETA {_ago(a['eta_s'])}"
        lines.append(f"alignment: {a['cells']:,} of {total} cells{rate}{eta}")
        if a["best"]:
            lines.append(f"best so far: score {a['best']['score']} at A[{a['best']['end_a']}] B[{a['best']['end_b']}]")
    if show is None:
        return lines
    show("\n".join(lines))
    return None


def _state_text(v: dict[str, Any]) -> str:
    """A job's state as the list shows it: what it waits for when nothing of it runs (Slurm's
    REASON), else its state."""
    if v.get("waiting_for"):
        return f"waiting for {len(v['waiting_for'])} job(s)"
    reasons = v.get("waiting_reasons") or []
    if v["state"] == "active" and reasons and not v.get("running"):
        return f"waiting: {reasons[0]['reason']}"
    return v["state"]


def _failure_lines(failures: list[dict[str, Any]]) -> list[str]:
    """Why the job's newest attempts failed, and what the newest one wrote (the ledger keeps the
    end of it: master.reasons), so "why did this fail?" takes one command."""
    if not failures:
        return []
    lines = ["failures (newest first):"]
    for i, f in enumerate(failures):
        lines.append(f"  task {f['task']} on {f['worker'] or '?'}: {f['outcome']}: {f['error'] or '-'}")
        if i == 0 and f.get("tail"):
            lines += [f"    {line}" for line in f["tail"].splitlines()]
    lines.append(f"  (`cluster jobs JOB --task {failures[0]['task']}` tells that task's whole story)")
    return lines


# How `cluster jobs JOB --task N` words each step of a task's story (MasterCore.story's steps).
_STEP_TEXT = {
    "submitted": "job submitted by {client}",
    "proposed": "proposed under fence {fence} for balancer {balancer}",
    "assigned": "assigned under fence {fence} to balancer {balancer}",
    "sent": "sent under fence {fence} to balancer {balancer}, committed at log index {log_index}",
    "resent": "sent again under fence {fence} to balancer {balancer}, which had just attached",
    "skipped": "not handed out: no longer ready at log index {log_index}",
    "result": "result under fence {fence} from worker {worker}: {outcome}",
    "ended": "attempt under fence {fence} ended on worker {worker}: {outcome}",
    "recorded": "result under fence {fence} committed at log index {log_index}: {code}",
    "refused": "refused under fence {fence}: {code}",
    "not_committed": "not committed: {reason}",
    "folded": "done; its record was folded into the job's result",
}


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "-"


def _show_task(config_path: Path | None, job_id: str, task_id: int, as_json: bool) -> None:
    with _session(config_path) as client:
        answer = client.task(job_id.lower(), task_id)
    view = answer.value
    if as_json:
        click.echo(_json({**view, "stale": answer.stale}))
        return
    click.echo("\n".join(_task_lines(view, answer.stale)))


def _task_lines(view: dict[str, Any], stale: bool) -> list[str]:
    """A task's view and story as lines: each step's time since the submit, where it is known
    from (the ledger, or the leader's log, with the stimulus id), and what happened."""
    lines = [f"task {view['task']} of job {view['job']}: {view['state']}"
             + (" (stale: a follower answered)" if stale else "")]
    if view.get("note"):
        lines.append(view["note"])
    if view.get("result_file"):
        lines.append(f"result file {view['result_file']}")
    story = view.get("story") or []
    start = next((s["at"] for s in story if s["step"] == "submitted"), None)
    for s in story:
        when = "" if s.get("at") is None or start is None else f"+{s['at'] - start:.3f} s"
        fields = _Blank({k: v for k, v in s.items() if v is not None})
        if s.get("fence"):
            fields["fence"] = f"({s['fence'][0]}, {s['fence'][1]})"
        text = _STEP_TEXT.get(s["step"], s["step"]).format_map(fields)
        if s.get("error"):
            text += f" ({s['error']})"
        cause = f"  [{s['stimulus_id']}]" if s.get("stimulus_id") else ""
        lines.append(f"  {when:>11}  {s['source']:<6}  {text}{cause}")
        lines += [f"{'':>23}| {line}" for line in (s.get("tail") or "").splitlines()]
    if story and not any(s["source"] == "leader" for s in story):
        lines.append("(the leader's log holds none of it: another leader handed it out, or it is older than the log)")
    return lines


def _alignment_lengths(client: Any, job: str) -> tuple[int, int] | None:
    """The lengths of an alignment job's two sequences: the sizes of the files `cluster align`
    attaches to it as a.seq and b.seq (the job view does not carry the spec). None if absent.
    The job's files are those and its live tile boundaries (O(rows + cols)): one page holds them."""
    try:
        listed = client.files(10_000, owner=job).value["files"]
    except ClusterError:
        return None
    sizes = {f.get("name"): f["size"] for f in listed}
    return (sizes["a.seq"], sizes["b.seq"]) if "a.seq" in sizes and "b.seq" in sizes else None


def _alignment_progress(view: dict[str, Any], lengths: tuple[int, int] | None,
                        age: float | None) -> dict[str, Any] | None:
    """Cells done and in all, GCUPS so far and an ETA from a grid job's view (its reduced sum
    of ``cells`` and its times; ``age``: seconds since it was submitted, None if unknown here);
    None when the job is no alignment (no sequences, no cells)."""
    sums = (view.get("reduced") or {}).get("sum", {})
    if view["kind"] != "grid" or (lengths is None and "cells" not in sums):
        return None
    cells = int(sums.get("cells", 0))
    if lengths is not None:
        total = lengths[0] * lengths[1]
    elif view["state"] == "done":
        total = cells
    else:  # tiles are near-equal: scale by the tiles done (the edge tiles make it a slight overestimate)
        total = round(cells / view["done"] * view["total"]) if view["done"] else 0
    if view.get("finished_at") and view.get("submitted_at"):
        seconds = view["finished_at"] - view["submitted_at"]  # both on the leader's clock
    else:
        seconds = age
    rate = cells / max(1e-9, seconds) if seconds is not None else None
    eta = None
    if view["state"] == "active" and rate and total:
        eta = round(max(0, total - cells) / rate, 1)
    best = (view.get("reduced") or {}).get("max", {}).get("summary")
    return {"cells": cells, "total_cells": total, "exact_total": lengths is not None or view["state"] == "done",
            "seconds": None if seconds is None else round(seconds, 3),
            "gcups": None if rate is None else round(rate / 1e9, 4), "eta_s": eta,
            "best": {k: best[k] for k in ("score", "end_a", "end_b") if k in best} if best else None}


@click.command()
@CONFIG_OPTION
@click.option("--timeout", default=2.0, show_default=True, help="Seconds each balancer has to answer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (balancer, workers) instead of a table.")
@WATCH_OPTION
def workers(config_path: Path | None, timeout: float, as_json: bool, watch_s: float | None) -> None:
    """The workers as the active balancer sees them: slots, free slots, running, cached files,
    cores, memory, labels, and how long each has been silent."""
    if watch_s is not None:
        if as_json:
            raise click.UsageError("--watch redraws the table: drop --json")
        _watch(lambda: _workers_table(*_active_balancer(config_path, timeout)), watch_s)
        return
    name, found = _active_balancer(config_path, timeout)
    if as_json:
        click.echo(_json({"balancer": name, "workers": found.get("workers", [])}))
        return
    _table_console().print(_workers_table(name, found))
    if not found.get("workers"):
        click.echo("no worker is registered: start one with `cluster worker` (or `cluster up --workers N`)", err=True)


def _workers_table(name: str, found: dict[str, Any]) -> Table:
    listed = found.get("workers", [])
    table = Table(title=f"workers (active balancer {name})")
    for col in ("name", "slots", "free", "running", "cached", "cores", "memory", "labels", "silent"):
        table.add_column(col, no_wrap=col == "name")
    for w in listed:
        memory = f"{w.get('memory_mb', 0) / 1024:.1f} GiB" if w.get("memory_mb") else "-"
        table.add_row(w["name"], str(w["slots"]), str(w["free"]), str(w["running"]), str(w["cached"]),
                      str(w.get("cores", "-")), memory, ", ".join(w.get("labels", [])) or "-",
                      f"{w.get('silent_s', 0):.1f} s")
    return table


def _active_balancer(config_path: Path | None, timeout: float) -> tuple[str, dict[str, Any]]:
    """(name, status detail) of the balancer of the config's pair that is active; else one line
    saying what each balancer answered."""
    path, config = _cluster_config(config_path)
    if not config.balancers:
        raise click.ClickException(f"{path}: no [balancers.NAME] entries: the workers are known to the balancers")
    pair = list(config.balancers.values())
    said = []
    for b, r in zip(pair, query_status([b.workers for b in pair], timeout=timeout)):
        if r.reply is not None and r.reply.detail.get("state") == "active":
            return b.name, r.reply.detail
        said.append(f"{b.name} ({b.workers}): {r.error if r.reply is None else r.reply.detail.get('state')}")
    raise click.ClickException(f"no active balancer ({'; '.join(said)}); `cluster status` shows the nodes")
