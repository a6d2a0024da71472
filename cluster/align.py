"""The whole-genome alignment job: two FASTA records in, the exact best local score out.

Theory of operation
-------------------
Both sequences are read (pyfastx: plain or gzipped, multi-record; the user picks a record or
gets the first), checked, and stored once in storage as plain letters. The DP matrix is cut into
a grid of tiles, rows over the reference B and columns over the query A (parasail's s2 and s1),
and submitted as one ``grid`` job with the wavefront rule: tile (i, j) is ready when (i-1, j)
and (i, j-1) are done, and the ledger holds only the wavefront (``master.jobs.GridSource``).
Each tile is a ``tile`` task (``worker.tiles``): it reads its slices of A and B and the
neighbours' boundary files, and stores its own boundary. The job keeps the global best with
parasail's tie-break (the largest score, then the smallest end in B, then in A: ``reduce``
``max`` + ``ties``), and hands it to later tiles (``share_best``) for block pruning. The answer
is bit-identical to ``python -m worker.sw`` on one machine.

The job lives in the ledger, not in this client: a client that disconnects can watch it again
(``wait``) by its id, and it finishes without anyone watching.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cluster.client import Client, ClusterError
from worker.sw.fasta import RecordNotFound, read_fasta
from worker.sw.scoring import Scoring, ScoringError, SequenceError, encode

# Tiles of up to 65,536 letters a side: ~0.6 s of one core at the kernels' ~7 GCUPS here. On the
# H. pylori pair (bench/align.py) the cluster ran at 87% of the raw kernel with 32,768 (each tile
# also pays a Raft commit, two boundary copies and its input fetches: ~24 ms of idle slot per
# tile), 106% with 65,536 and 110% with 131,072 (fewer, longer tiles; a longer ramp). 65,536
# keeps a retried tile short. Smaller pairs get smaller tiles so that their wavefront still
# spreads over the slots.
MAX_TILE = 65_536
MIN_TILE = 1_024
BLOCK = 128  # the kernels' block width (worker.sw.tile.BLOCK): tiles are multiples of it
# The special rows the traceback starts from (worker.sw.special_rows): every `stride`-th reference
# row's H and F, 8 bytes a query letter before compression (they pack ~14x smaller on disk).
# The budget bounds those raw bytes; a denser stride makes the traceback's crosspoint search
# cheaper (it costs about stride x the path's length). 4 GiB keeps 8,192-row strides on the
# H. pylori pair (~0.3 GB on disk).
ROWS_BUDGET = 4 << 30
MIN_STRIDE = 8_192  # two rounds of the 16 lanes x 256-row bands: fewer rows pay the lanes' ramp too often


@dataclass(frozen=True)
class Pair:
    """The two records of an alignment, as read from their files."""

    name_a: str
    seq_a: str
    name_b: str
    seq_b: str


def read_pair(fasta_a: str | os.PathLike, fasta_b: str | os.PathLike, record_a: str | None = None,
              record_b: str | None = None) -> Pair:
    """Read and check both records; ClusterError says what is wrong with which file."""
    out = []
    for what, path, record in (("A", fasta_a, record_a), ("B", fasta_b, record_b)):
        if not Path(path).is_file():
            raise ClusterError(f"{what}: no file at {path}")
        try:
            name, seq = read_fasta(path, record)
        except RecordNotFound as exc:
            raise ClusterError(f"{what}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - pyfastx raises plain RuntimeErrors on junk
            raise ClusterError(f"{what}: {path} is not a FASTA file ({exc})") from None
        if not seq:
            raise ClusterError(f"{what}: record {name!r} of {path} is empty")
        try:
            encode(seq, f"{what} ({name})")  # strict: a letter outside the alphabet is named
        except SequenceError as exc:
            raise ClusterError(str(exc)) from None
        out += [name, seq]
    return Pair(*out)


def tile_size(length_a: int, length_b: int, slots: int) -> tuple[int, int]:
    """(rows, cols) of a tile: at most ``MAX_TILE`` a side, and at least ~2 tiles per slot
    across each side so the wavefront has work for every slot."""
    slots = max(1, slots)

    def side(n: int) -> int:
        want = math.ceil(n / (2 * slots))
        # past one round of the kernels' lanes, whole rounds (multiples of MIN_STRIDE): the tile's
        # special rows then cut it into rectangles that split into whole rounds too
        unit = MIN_STRIDE if want > MIN_STRIDE else BLOCK
        return max(MIN_TILE, min(MAX_TILE, -(-want // unit) * unit))

    return side(length_b), side(length_a)


def special_stride(length_a: int, length_b: int, tile_rows: int, budget: int = ROWS_BUDGET) -> int:
    """The rows between two special rows: the smallest divisor of ``tile_rows`` that is a
    multiple of ``MIN_STRIDE`` and keeps the rows' raw bytes (8 per query letter a row) within
    ``budget``; ``tile_rows`` itself (one special row per tile row, whatever the budget) when
    none is."""
    if tile_rows % MIN_STRIDE:
        return tile_rows
    for stride in range(MIN_STRIDE, tile_rows, MIN_STRIDE):
        if tile_rows % stride == 0 and (length_b // stride) * 8 * length_a <= budget:
            return stride
    return tile_rows


def submit_alignment(client: Client, pair: Pair, *, scoring: dict[str, int] | None = None, kernel: str = "int16",
                     slots: int = 2, tile: tuple[int, int] | None = None, prune: bool = True,
                     rows_budget: int | None = ROWS_BUDGET,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Store both sequences and submit the tile grid; returns the job's description (its id,
    grid and sizes) for ``wait``. ``rows_budget`` (bytes, see ``special_stride``) keeps the
    special rows for the traceback (``cluster.trace``); None keeps none (score only)."""
    scoring = dict(scoring or {})
    try:
        Scoring(**scoring).check_lengths(len(pair.seq_a), len(pair.seq_b))
    except (ScoringError, TypeError, ValueError) as exc:
        raise ClusterError(f"scoring: {exc}") from None
    refs = {}
    with tempfile.TemporaryDirectory(prefix="cluster-align-") as d:
        for side, name, seq in (("a", pair.name_a, pair.seq_a), ("b", pair.name_b, pair.seq_b)):
            path = Path(d) / f"{side}.seq"
            path.write_bytes(seq.encode("ascii", "replace"))
            if progress:
                progress(f"storing {side.upper()} ({name}, {len(seq):,} letters)")
            refs[side] = client.upload(path, name=f"{side}-{_safe(name)}.seq")
    desc = submit_grid(client, refs["a"].id, refs["b"].id,
                       {"length_a": len(pair.seq_a), "length_b": len(pair.seq_b), "name_a": pair.name_a,
                        "name_b": pair.name_b}, scoring=scoring, kernel=kernel, slots=slots, tile=tile,
                       prune=prune, rows_budget=rows_budget)
    for side in ("a", "b"):  # the job holds the sequences now; the user's pin can go
        client.release_files(refs[side].id)
    return desc


def submit_grid(client: Client, a_id: str, b_id: str, pair: dict[str, Any], *, scoring: dict[str, int],
                kernel: str = "int16", slots: int = 2, tile: tuple[int, int] | None = None, prune: bool = True,
                rows_budget: int | None = ROWS_BUDGET) -> dict[str, Any]:
    """Submit the tile grid over two stored sequences (``pair``: length_a/b, name_a/b) and make
    the job own them (``a.seq``, ``b.seq``); returns the job's description."""
    length_a, length_b = pair["length_a"], pair["length_b"]
    tile_rows, tile_cols = tile or tile_size(length_a, length_b, slots)
    rows, cols = math.ceil(length_b / tile_rows), math.ceil(length_a / tile_cols)
    stride = special_stride(length_a, length_b, tile_rows, rows_budget) if rows_budget else None
    spec = {
        "name": f"align {pair['name_a']} x {pair['name_b']}",
        "rows": rows, "cols": cols, "depends": "wavefront",
        "run": {"kind": "tile", "a": a_id, "b": b_id, "tile_rows": tile_rows, "tile_cols": tile_cols,
                "scoring": scoring, "kernel": kernel, "share_best": prune,
                **({"special_stride": stride} if stride else {})},
        "reduce": {"max": "score", "ties": ["end_b", "end_a"], "sum": ["cells", "rows_bytes"]},
        "max_attempts": 5,
        "keep_files": ["rows"] if stride else [],
        # what the traceback (cluster.trace) and --recompute need to know of the pair
        "align": {**{k: pair[k] for k in ("length_a", "length_b", "name_a", "name_b")}, "a": a_id, "b": b_id,
                  "scoring": scoring, "kernel": kernel, "rows": rows, "cols": cols, "tile_rows": tile_rows,
                  "tile_cols": tile_cols, "special_stride": stride},
    }
    ref = client.submit_job("grid", spec)
    known = client.lookup_files([bytes.fromhex(a_id), bytes.fromhex(b_id)]).value
    for side, fid in (("a", a_id), ("b", b_id)):
        record = known.get(fid) if isinstance(known, dict) else None
        if record is None:
            raise ClusterError(f"the {side.upper()} sequence ({fid}) is no longer stored; align the FASTA files anew")
        client.register_file(bytes.fromhex(fid), record["size"], record["replicas"], owner=ref.job, name=f"{side}.seq")
    return {"job": ref.job, "rows": rows, "cols": cols, "tile_rows": tile_rows, "tile_cols": tile_cols,
            "length_a": length_a, "length_b": length_b, "special_stride": stride, "submitted": time.time()}


def recompute(client: Client, job: str, *, slots: int = 2, rows_budget: int | None = ROWS_BUDGET) -> dict[str, Any]:
    """Submit alignment job ``job``'s score pass again (its stored sequences, scoring, kernel and
    tiles), keeping special rows: for a job whose rows were deleted or never kept."""
    view = client.job(job).value
    info = view.get("align")
    if not info or "a" not in info:
        raise ClusterError(f"job {job} is not an alignment job this version can recompute; align the FASTA files anew")
    tile = (info["tile_rows"], info["tile_cols"]) if "tile_rows" in info else None
    return submit_grid(client, info["a"], info["b"], info, scoring=info.get("scoring") or {},
                       kernel=info.get("kernel", "int16"), slots=slots, tile=tile, rows_budget=rows_budget)


def wait(client: Client, job: str, *, progress: Callable[[dict[str, Any]], None] | None = None,
         poll_s: float = 0.25, timeout: float | None = None, slots: int = 0) -> dict[str, Any]:
    """Wait for an alignment job and return its answer: the keys of ``python -m worker.sw
    --json`` (score, end_a, end_b, cells, seconds, gcups, threads) plus ``job`` and the grid's
    figures. ``progress`` gets the job's view at each poll (done/total tiles). Raises
    ClusterError when the job failed or was cancelled, with the ledger's reason."""
    view = poll_job(client, job, poll_s=poll_s, timeout=timeout, progress=progress,
                    still=f"`cluster align --job {job}` watches it again")
    if view["state"] != "done":
        raise ClusterError(f"alignment job {job} {view['state']}: {view.get('error') or 'no reason given'}")
    return answer(view, slots)


def poll_job(client: Client, job: str, *, poll_s: float, timeout: float | None,
             progress: Callable[[dict[str, Any]], None] | None = None, still: str = "") -> dict[str, Any]:
    """The job's view once it is over (done, failed or cancelled), polled every ``poll_s``;
    ClusterError after ``timeout`` seconds, saying how far it got and ``still`` (what to do)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        view = client.job(job).value
        if progress:
            progress(view)
        if view["state"] != "active":
            return view
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job} still running after {timeout:g} s ({view['done']} of {view['total']} tasks)"
                               + (f"; {still}" if still else ""))
        time.sleep(poll_s)  # polling the ledger's job view: the tasks end inside the cluster


def answer(view: dict[str, Any], slots: int = 0) -> dict[str, Any]:
    """The alignment's result from the job's ledger view; ``threads`` is the cluster's task
    slots (``worker.sw``'s threads), when the caller knows them."""
    best = view["reduced"].get("max", {}).get("summary", {"score": 0, "end_a": 0, "end_b": 0})
    cells = int(view["reduced"].get("sum", {}).get("cells", 0))
    seconds = max(1e-9, (view.get("finished_at") or 0) - (view.get("submitted_at") or 0))
    return {
        "score": int(best["score"]), "end_a": int(best["end_a"]), "end_b": int(best["end_b"]),
        "cells": cells, "seconds": round(seconds, 6), "gcups": round(cells / seconds / 1e9, 4),
        "threads": slots, "job": view["job"], "tiles": view["total"],
        "failed_attempts": view.get("failed_attempts", 0),
        "special_rows_bytes": int(view["reduced"].get("sum", {}).get("rows_bytes", 0)),
    }


def _safe(name: str) -> str:
    """A record name as a file name in the job's listing (no '/', bounded)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:100] or "seq"
