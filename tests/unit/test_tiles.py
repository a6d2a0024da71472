"""worker.tiles: a grid of tile tasks, borders passed as boundary files, equals worker.sw.align.

The kernels come from the same on-disk build cache as tests/unit/test_sw_kernels.py
($CLUSTER_SW_CACHE, else ~/.cache/cluster/sw), so only a cold cache compiles them.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from worker.executor import Limits
from worker.slots import Slot
from worker.sw import align, edge_left, edge_top, encode, kernels, sw_tile
from worker.tiles import (MAGIC, Boundary, BoundaryError, TileError, boundary_size, read_boundary,
                          run_tile)

TILE_ROWS, TILE_COLS = 256, 300
SCORING = {"match": 2, "mismatch": -3, "gap_open": 5, "gap_extend": 2}


@pytest.fixture(scope="module", autouse=True)
def compiled():
    return kernels.load("int16")


def planted_pair(len_a: int, len_b: int, seed: int = 7) -> tuple[str, str]:
    """Random A and B with a mutated copy of 200 letters of A planted in B."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("ACGT"))
    a = letters[rng.integers(0, 4, len_a)]
    b = letters[rng.integers(0, 4, len_b)]
    region = a[len_a // 3:len_a // 3 + 200].copy()
    mutate = rng.random(region.size) < 0.08
    region[mutate] = letters[rng.integers(0, 4, int(mutate.sum()))]
    b[len_b // 3:len_b // 3 + 200] = region  # across tile borders in both directions
    return "".join(a), "".join(b)


def write_pair(tmp_path: Path, a: str, b: str) -> tuple[Path, Path]:
    (tmp_path / "a.seq").write_text(a)
    (tmp_path / "b.seq").write_text(b)
    return tmp_path / "a.seq", tmp_path / "b.seq"


def request_for(pa, pb, row, col, out_of, tile_rows=TILE_ROWS, tile_cols=TILE_COLS, **extra):
    """The request of tile (row, col); ``out_of(r, c)`` is where tile (r, c) wrote its file."""
    boundaries = ([str(out_of(row - 1, col))] if row else []) + \
                 ([str(out_of(row, col - 1))] if col else [])
    return {"a": str(pa), "b": str(pb), "row": row, "col": col, "tile_rows": tile_rows,
            "tile_cols": tile_cols, "boundaries": boundaries, "scoring": SCORING, **extra}


def wavefront(rows: int, cols: int):
    """Tiles in anti-diagonal order: each after the tile above it and the tile to its left."""
    for d in range(rows + cols - 1):
        for row in range(rows):
            if 0 <= d - row < cols:
                yield row, d - row


def best_of(summaries) -> tuple[int, int, int]:
    """The whole pair's best as align() breaks ties: highest score, smallest end_b, end_a."""
    best = min(summaries, key=lambda s: (-s["score"], s["end_b"], s["end_a"]))
    return best["score"], best["end_a"], best["end_b"]


def run_grid(tmp_path, a, b, **extra):
    pa, pb = write_pair(tmp_path, a, b)
    rows, cols = -(-len(b) // TILE_ROWS), -(-len(a) // TILE_COLS)
    out_of = lambda r, c: tmp_path / f"tile-{r}-{c}.swb"  # noqa: E731
    summaries = {}
    for row, col in wavefront(rows, cols):
        summaries[row, col] = run_tile(request_for(pa, pb, row, col, out_of, **extra),
                                       out_of(row, col))
    return rows, cols, out_of, summaries


# -- a grid equals the whole matrix ------------------------------------------------------------


def test_a_grid_of_tiles_equals_align(tmp_path):
    a, b = planted_pair(700, 900)
    rows, cols, out_of, summaries = run_grid(tmp_path, a, b)
    assert (rows, cols) == (4, 3)  # ragged last row and column of tiles
    whole = align(a, b)
    assert whole.score > 100  # the planted region, not noise
    assert best_of(summaries.values()) == (whole.score, whole.end_a, whole.end_b)
    assert sum(s["cells"] for s in summaries.values()) == len(a) * len(b)
    assert not any(s["pruned"] for s in summaries.values())

    # Bit-identical borders: the last row and column of the grid against one whole tile.
    full = sw_tile(encode(a), encode(b), *edge_top(len(a)), *edge_left(len(b)))
    bottom = [read_boundary(out_of(rows - 1, c)) for c in range(cols)]
    right = [read_boundary(out_of(r, cols - 1)) for r in range(rows)]
    assert np.concatenate([bottom[0].bottom_h[:1]] + [t.bottom_h[1:] for t in bottom]).tolist() \
        == full.bottom_h.tolist()
    assert np.concatenate([t.bottom_f for t in bottom]).tolist() == full.bottom_f.tolist()
    assert np.concatenate([t.right_h for t in right]).tolist() == full.right_h.tolist()
    assert np.concatenate([t.right_e for t in right]).tolist() == full.right_e.tolist()


def test_pruning_with_the_best_so_far_keeps_the_answer(tmp_path):
    a, b = planted_pair(700, 900)
    whole = align(a, b)
    _, _, _, summaries = run_grid(tmp_path, a, b, best_so_far=whole.score)
    assert best_of(summaries.values()) == (whole.score, whole.end_a, whole.end_b)
    assert any(s["pruned"] for s in summaries.values())


def test_the_boundary_file_reads_back(tmp_path):
    a, b = planted_pair(700, 900)
    _, _, out_of, summaries = run_grid(tmp_path, a, b)
    found = read_boundary(out_of(3, 2))
    assert isinstance(found, Boundary)
    assert (found.row, found.col, found.height, found.width) == (3, 2, 900 - 768, 700 - 600)
    assert (found.score, found.end_a, found.end_b) == \
        tuple(summaries[3, 2][k] for k in ("score", "end_a", "end_b"))
    assert out_of(3, 2).stat().st_size == boundary_size(132, 100)
    assert not list(tmp_path.glob("*.tmp"))


# -- through a slot ----------------------------------------------------------------------------


def test_a_two_by_two_grid_through_a_slot(tmp_path):
    a, b = planted_pair(520, 480, seed=3)
    pa, pb = write_pair(tmp_path, a, b)
    out_of = lambda r, c: tmp_path / f"s{r}{c}" / "boundary.swb"  # noqa: E731
    summaries, pids = [], set()
    with Slot(0) as slot:
        for row, col in wavefront(2, 2):
            out = slot.run_tile(request_for(pa, pb, row, col, out_of), tmp_path / f"s{row}{col}",
                                Limits(timeout_s=60))
            assert out.ok, (out.error, out.stderr)
            assert out.kind == "tile" and out.outputs == {"boundary": out_of(row, col)}
            summaries.append(msgspec.msgpack.decode(out.result))
            pids.add(slot.pid)
        assert len(pids) == 1  # one child, kernels loaded once

        bad = slot.run_tile(request_for(pa, pb, 5, 0, out_of), tmp_path / "bad")
        assert not bad.ok and bad.error.startswith("row 5 is outside the grid")
        assert bad.outputs == {} and slot.pid in pids  # a refused tile does not cost the child
    whole = align(a, b)
    assert best_of(summaries) == (whole.score, whole.end_a, whole.end_b)


def test_special_rows_and_the_trace_tasks_through_a_slot(tmp_path):
    """The score pass keeps its special rows through a slot (rows.swr beside the boundary), and
    the traceback's two task kinds read them there: the crosspoints, then every box, whose CIGARs
    re-score to the best."""
    from worker.sw import cigar, trace
    from worker.sw.scoring import Scoring
    from worker.sw.special_rows import read_rows

    a, b = planted_pair(520, 480, seed=3)
    pa, pb = write_pair(tmp_path, a, b)
    out_of = lambda r, c: tmp_path / f"s{r}{c}" / "boundary.swb"  # noqa: E731
    summaries, rows = [], []
    with Slot(0) as slot:
        for row, col in wavefront(2, 2):
            out = slot.run_tile(request_for(pa, pb, row, col, out_of, special_stride=64),
                                tmp_path / f"s{row}{col}", Limits(timeout_s=60))
            assert out.ok, out.error
            assert set(out.outputs) == {"boundary", "rows"}
            rows.append(str(out.outputs["rows"]))
            summaries.append(msgspec.msgpack.decode(out.result))
        assert [r for r in sorted(read_rows(rows[0]).offsets)] == [63, 127, 191, 255]
        score, end_a, end_b = best_of(summaries)
        crossing = slot.run_trace({"op": "crosspoints", "a": str(pa), "b": str(pb), "scoring": SCORING,
                                   "end_a": end_a, "end_b": end_b, "score": score, "rows": rows},
                                  tmp_path / "x", Limits(timeout_s=60))
        assert crossing.ok, crossing.error
        points = [trace.Point(*p) for p in msgspec.msgpack.decode(crossing.result)["points"]]
        ops = []
        for box in trace.boxes(points):
            out = slot.run_trace({"op": "box", "a": str(pa), "b": str(pb), "scoring": SCORING, **box.as_dict()},
                                 tmp_path / "x", Limits(timeout_s=60))
            assert out.ok, out.error
            ops.append(cigar.parse(msgspec.msgpack.decode(out.result)["cigar"]))
        bad = slot.run_trace({"op": "crosspoints", "a": str(pa), "b": str(pb), "end_a": end_a, "end_b": end_b,
                              "score": score, "rows": rows[:3]}, tmp_path / "x")
        assert not bad.ok and "a tile's file is missing" in bad.error
    start_a, start_b = points[-1].a + 1, points[-1].b + 1
    assert cigar.rescore(np.concatenate(ops), encode(a), encode(b), start_a, start_b, Scoring(**SCORING)) == score


def test_a_bad_special_stride_is_refused(tmp_path):
    a, b = planted_pair(200, 200)
    pa, pb = write_pair(tmp_path, a, b)
    with pytest.raises(TileError, match="special_stride must be a positive integer"):
        run_tile(request_for(pa, pb, 0, 0, lambda r, c: tmp_path / "x", special_stride=0), tmp_path / "o.swb")


# -- bad requests ------------------------------------------------------------------------------


@pytest.fixture()
def grid(tmp_path):
    a, b = planted_pair(700, 900)
    _, _, out_of, _ = run_grid(tmp_path, a, b)
    pa, pb = tmp_path / "a.seq", tmp_path / "b.seq"
    return pa, pb, out_of


def refused(request, out: Path, match: str, error=TileError):
    with pytest.raises(error, match=match):
        run_tile(request, out)
    assert not out.exists()


def test_missing_and_unknown_keys(grid, tmp_path):
    pa, pb, out_of = grid
    request = request_for(pa, pb, 0, 0, out_of)
    del request["tile_rows"]
    refused(request, tmp_path / "x.swb", "tile request is missing tile_rows")
    refused({**request_for(pa, pb, 0, 0, out_of), "best_so_fat": 3}, tmp_path / "x.swb",
            "unknown keys best_so_fat")
    refused("not a dict", tmp_path / "x.swb", "must be a dict")


def test_bad_values(grid, tmp_path):
    pa, pb, out_of = grid
    out = tmp_path / "x.swb"
    refused(request_for(pa, pb, 0, 0, out_of, tile_rows=0), out, "tile_rows must be at least 1")
    refused({**request_for(pa, pb, 0, 0, out_of), "row": "0"}, out, "row must be an integer")
    refused(request_for(pa, pb, 0, 3, out_of), out, "col 3 is outside the grid")
    refused(request_for(pa, pb, -1, 0, out_of), out, "row -1 is outside the grid")
    refused(request_for(pa, pb, 0, 0, out_of, kernel="int8"), out, "kernel must be one of")
    refused({**request_for(pa, pb, 0, 0, out_of), "scoring": {"match": -1}}, out,
            "bad scoring: match must be between")
    refused({**request_for(pa, pb, 0, 0, out_of), "scoring": {"gap": 1}}, out,
            "unknown fields gap")
    refused(request_for(pa, pb, 0, 0, out_of, best_so_far=1.5), out, "best_so_far must be an")
    refused({**request_for(pa, pb, 0, 0, out_of), "a": 3}, out, "a must be the path")


def test_bad_sequence_files(grid, tmp_path):
    pa, pb, out_of = grid
    out = tmp_path / "x.swb"
    refused({**request_for(pa, pb, 0, 0, out_of), "a": str(tmp_path / "nope")}, out,
            "cannot read the query")
    bad = tmp_path / "bad.seq"
    bad.write_text("ACGT" * 10 + "Z" + "ACGT" * 200)
    refused({**request_for(bad, pb, 0, 0, out_of)}, out, "invalid character 'Z' at position 40")


def test_wrong_boundaries(grid, tmp_path):
    pa, pb, out_of = grid
    out = tmp_path / "x.swb"
    swapped = request_for(pa, pb, 1, 1, out_of)
    swapped["boundaries"].reverse()
    refused(swapped, out, r"is tile \(1, 0\)'s, not tile \(0, 1\)'s, the tile above",
            BoundaryError)
    one = request_for(pa, pb, 1, 1, out_of)
    one["boundaries"].pop()
    refused(one, out, r"tile \(1, 1\) takes 2 boundary files .* got 1")
    # Tile (0, 0) as the left neighbour of tile (0, 1) is right; its height is not (1, 1)'s.
    refused({**request_for(pa, pb, 1, 1, out_of, tile_rows=128), "boundaries": [
        str(out_of(0, 1)), str(out_of(1, 0))]}, out, "tile", BoundaryError)

    cut = tmp_path / "cut.swb"
    cut.write_bytes(out_of(0, 0).read_bytes()[:-4])
    refused({**request_for(pa, pb, 0, 1, out_of), "boundaries": [str(cut)]}, out,
            "holds .* bytes; a 256 x 300 tile's file holds", BoundaryError)
    forged = tmp_path / "forged.swb"
    forged.write_bytes(b"XXXX" + out_of(0, 0).read_bytes()[4:])
    with pytest.raises(BoundaryError, match="is not a boundary file"):
        read_boundary(forged)
    short = tmp_path / "short.swb"
    short.write_bytes(MAGIC)
    with pytest.raises(BoundaryError, match="fewer than its"):
        read_boundary(short)
    with pytest.raises(BoundaryError, match="cannot read boundary file"):
        read_boundary(tmp_path / "missing.swb")


def test_relative_paths_through_a_slot_are_the_callers(grid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Slot(0) as slot:
        out = slot.run_tile({"a": "a.seq", "b": "b.seq", "row": 1, "col": 1, "tile_rows": TILE_ROWS,
                             "tile_cols": TILE_COLS, "scoring": SCORING,
                             "boundaries": ["tile-0-1.swb", "tile-1-0.swb"]}, "t")
    assert out.ok, out.error
    assert out.outputs["boundary"] == tmp_path / "t" / "boundary.swb"
    assert read_boundary(out.outputs["boundary"]).bottom_h.tolist() == \
        read_boundary(tmp_path / "tile-1-1.swb").bottom_h.tolist()


def test_bad_request_through_a_slot_is_a_failed_outcome(grid, tmp_path):
    pa, pb, out_of = grid
    with Slot(0) as slot:
        out = slot.run_tile({"a": str(pa)}, tmp_path / "t")
        assert not out.ok and out.error.startswith("tile request is missing b, row")
        assert b"tile request refused" in out.stderr
        unpicklable = slot.run_tile({**request_for(pa, pb, 0, 0, out_of),
                                     "kernel": lambda: 1}, tmp_path / "t")
        assert not unpicklable.ok and unpicklable.error.startswith("cannot prepare the tile")
        good = slot.run_tile(request_for(pa, pb, 0, 0, out_of), tmp_path / "t")
        assert msgspec.msgpack.decode(good.result)["cells"] == 256 * 300
