"""The ``tile`` task kind end to end: a Smith-Waterman grid job on a real cluster with storage.

3 masters, 2 storage nodes, the balancer pair and 2 workers of 1 slot each (``--no-mount``: a
worker fetches each stored file whole into its cache) on 127.0.0.1. A seeded pair of sequences
with one planted similar region is uploaded (pinned); a ``grid`` job with ``depends: wavefront``
runs one tile task per tile (CUDAlign stage 1: each tile reads the boundary files of the tiles
above and left, ``master.ledger.task_order``), and ``reduce: {"max": "score"}`` keeps the best
tile's summary. The oracle is ``worker.sw.align`` on the whole pair in this process: same score,
same end cell. The planted region crosses a tile row and a tile column, so the answer is right
only if the borders travelled through storage intact; the last row and column of tiles are
narrower than the rest.

Every process is stopped by pid (``stop_all``), whatever happens. Conditions are polled with
deadlines. The slot processes compile (or load from the kernel cache: $CLUSTER_SW_CACHE, else
~/.cache/cluster/sw; ``LocalNode`` passes this process's environment on) the numba kernels on
their first tile: the job's deadline allows for a cold cache.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster.client import Client
from cluster.node.config import load_cluster_config
from cluster.local import LocalNode, balancer_nodes, master_nodes, start_all, stop_all, storage_nodes, worker_nodes
from cluster.node.status import query_status
from worker.sw.align import align
from worker.tiles import boundary_size, read_boundary

from .conftest import wait_for

pytestmark = pytest.mark.integration

TILE_ROWS, TILE_COLS = 400, 500
LEN_A, LEN_B = 1_620, 1_230  # query (the columns), reference (the rows): 4 x 4 tiles, the last ones narrow
PLANT_B, PLANT_A, PLANT_LEN = 330, 420, 400  # crosses tile row 0/1 (b = 400) and column 0/1 (a = 500)
SEED = 20240611


def sequences(seed: int = SEED) -> tuple[bytes, bytes]:
    """(a, b): random ACGT with b[PLANT_B:+PLANT_LEN] copied into a at PLANT_A, ~4% substituted."""
    rng = random.Random(seed)
    b = bytearray(rng.choice(b"ACGT") for _ in range(LEN_B))
    a = bytearray(rng.choice(b"ACGT") for _ in range(LEN_A))
    region = bytearray(b[PLANT_B:PLANT_B + PLANT_LEN])
    for i in rng.sample(range(20, PLANT_LEN - 20), PLANT_LEN // 25):  # the ends stay exact
        region[i] = rng.choice([c for c in b"ACGT" if c != region[i]])
    a[PLANT_A:PLANT_A + PLANT_LEN] = region
    return bytes(a), bytes(b)


def detail(node: LocalNode, timeout: float = 1.0) -> dict | None:
    """The node's status detail, or None if it is not running or does not answer."""
    if node.process is None or node.process.poll() is not None:
        return None
    reply = query_status([node.address], timeout=timeout)[0].reply
    return reply.detail if reply is not None else None


def logs(nodes: list[LocalNode], tail: int = 1500) -> str:
    return "\n".join(f"--- {n.name} ---\n{n.log_text()[-tail:]}" for n in nodes)


def test_a_wavefront_grid_of_tiles_finds_the_best_cell_of_the_whole_pair(tmp_path: Path):
    d = tmp_path
    masters = master_nodes(d, 3)
    _, storage = storage_nodes(d, 2, masters=masters)  # cluster.toml: masters + storage
    config_path, balancers = balancer_nodes(d, 2)  # appends the pair to the same cluster.toml
    workers = worker_nodes(d, config_path, 2, slots=1, mount=False)
    nodes = masters + storage + balancers + workers
    config = load_cluster_config(config_path)
    assert set(config.storage_nodes) == {"s1", "s2"} and len(config.masters) == 3  # both sections kept

    def wait(predicate, timeout: float, what: str):
        try:
            return wait_for(predicate, timeout, what)
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{logs(nodes)}")

    client = None
    try:
        start_all(nodes, timeout=30)
        b1 = balancers[0]
        wait(lambda: (x := detail(b1)) and x["state"] == "active" and len(x["workers"]) == 2, 30,
             "b1 active with both workers registered")
        client = Client(list(config.masters.values()), storage=config.storage_nodes,
                        replicas=config.storage.replicas, timeout=30)
        wait(lambda: not client.lookup_files([]).stale, 30, "a master leader to serve")

        a, b = sequences()
        (d / "query.txt").write_bytes(a)
        (d / "reference.txt").write_bytes(b)
        query, reference = client.upload(d / "query.txt"), client.upload(d / "reference.txt")
        assert (query.size, reference.size) == (LEN_A, LEN_B)

        rows, cols = -(-LEN_B // TILE_ROWS), -(-LEN_A // TILE_COLS)  # b is the rows (worker/tiles.py)
        assert (rows, cols) == (4, 4)
        job = client.submit_job("grid", {
            "rows": rows, "cols": cols, "depends": "wavefront",
            "run": {"kind": "tile", "a": query.id, "b": reference.id,
                    "tile_rows": TILE_ROWS, "tile_cols": TILE_COLS},
            "reduce": {"max": "score", "sum": ["cells"]},
            # keep every tile's record and boundary, so the test can read them back (by default a
            # consumed boundary is released: test_ledger checks that)
            "keep_results": True,
        }).job

        oracle = align(a, b)  # while the cluster works
        assert oracle.score > 500, oracle  # the planted region, far above the random background

        def finished():
            view = client.job(job).value
            return view if view["state"] != "active" else None

        # warm kernel cache: ~5 s; a cold one (each slot compiles, as does align here): ~55 s
        view = wait(finished, 80, "the grid job to end (the slots compile their kernels first)")
        assert view["state"] == "done", f"{view}\n{logs(nodes)}"

        # every tile done exactly once
        assert view["total"] == view["done"] == rows * cols, view
        assert (view["failed"], view["failed_attempts"], view["duplicates"]) == (0, 0, 0), view
        assert view["reduced"]["sum"] == {"cells": LEN_A * LEN_B}, view["reduced"]

        # the reduced best is the whole pair's best cell
        best = view["reduced"]["max"]
        summary = best["summary"]
        assert (summary["score"], summary["end_a"], summary["end_b"]) == \
            (oracle.score, oracle.end_a, oracle.end_b), (best, oracle)
        assert best["task"] == (oracle.end_b // TILE_ROWS) * cols + oracle.end_a // TILE_COLS, best
        assert summary["pruned"] is False, summary

        # each tile stored its boundary file under the job: task-<id>.boundary, of the tile's size
        listing = client.files(limit=1000, owner=job).value
        assert listing["next"] is None
        found = {f["name"]: f for f in listing["files"] if f["name"].endswith(".boundary")}
        assert sorted(found) == sorted(f"task-{t}.boundary" for t in range(rows * cols)), listing
        for t, f in ((t, found[f"task-{t}.boundary"]) for t in range(rows * cols)):
            row, col = divmod(t, cols)
            height = min(TILE_ROWS, LEN_B - row * TILE_ROWS)
            width = min(TILE_COLS, LEN_A - col * TILE_COLS)
            assert f["size"] == boundary_size(height, width), (t, f)
            assert sorted(f["replicas"]) == ["s1", "s2"], (t, f)

        # the best tile's boundary, fetched back from storage, says what its summary said
        path = d / "best.swb"
        client.download(found[f"task-{best['task']}.boundary"]["id"], path)
        stored = read_boundary(path)
        assert (stored.row, stored.col) == divmod(best["task"], cols)
        assert (stored.score, stored.end_a, stored.end_b) == (oracle.score, oracle.end_a, oracle.end_b)
    finally:
        if client is not None:
            client.close()
        stop_all(nodes[::-1])  # workers first: none of them is left turning to a stopped balancer
