"""Issue 8's kill tests: a whole-pair alignment survives the SIGKILL of any one node, exactly.

A seeded synthetic pair, written as FASTA files: A is 150 kbp of random ACGT; B is a mutated
copy of a 120 kbp slice of A (~5% substitutions, small insertions and deletions) between random
flanks, ~150 kbp. The best local score is then far above the random background and its end cell
is unique. The oracle is ``worker.sw.align`` on one machine, computed once for the module.

Each test starts its own cluster on 127.0.0.1 (3 masters, 2 storage nodes with replicas 2, the
Binary Star balancer pair, 2 workers of 1 slot each), submits the alignment as a 6 x 6 wavefront
grid of 25,600 x 25,600 tiles (``cluster.align.submit_alignment``), SIGKILLs one node while the
grid is part done, and waits for the job (``cluster.align.wait``): it must end "done" with the
oracle's (score, end_a, end_b), bit for bit. The victims:

(a) a worker while it runs a tile (the active balancer's status says which one runs one);
(b) the master leader (the master whose status says "leader");
(c) the active balancer (b1: its passive peer takes over when the workers turn to it);
(d) a storage node (with replicas 2 both nodes hold every boundary file); and the same with a
    third storage node, so that two copies of each new boundary can still be made.

Every process is stopped by pid (``stop_all``), whatever happens; the slot processes of a
SIGKILLed worker are found in /proc beforehand and stopped by pid at the end too. Conditions are
polled with deadlines. The slot processes load (or, on a cold cache, compile: ~1 minute) the
numba kernels before their first tile; the deadlines allow for a cold cache. Each test prints
its job's failed attempts and times (run with ``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from cluster.align import Pair, read_pair, submit_alignment, wait
from cluster.client import Client
from cluster.node.config import load_cluster_config
from cluster.local import LocalNode, balancer_nodes, master_nodes, start_all, stop_all, storage_nodes, worker_nodes
from cluster.up import alive, descendants
from worker.sw import align

from .conftest import NodeGroup, detail

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEED = 20240808
LEN_A = 150_000
SLICE = (15_000, 135_000)  # the slice of A that B carries, mutated
FLANKS = (17_000, 13_000)  # B's random letters before and after it
SUBSTITUTION, DELETION, INSERTION = 0.05, 0.003, 0.003  # per letter of the slice
TILE = 25_600  # a multiple of the kernels' block (128): 6 x 6 tiles
GRID = 6 * 6
JOB_TIMEOUT = 180.0  # a cold kernel cache costs each new slot process about a minute


# ---- the pair and its oracle ---------------------------------------------------------------------


def synthetic_pair(seed: int = SEED) -> tuple[str, str]:
    """(a, b): A random; B = flank + A[SLICE] mutated + flank."""
    rng = random.Random(seed)
    a = "".join(rng.choices("ACGT", k=LEN_A))
    source = a[SLICE[0]:SLICE[1]]
    copy: list[str] = []
    i = 0
    while i < len(source):
        r = rng.random()
        if r < SUBSTITUTION:
            copy.append(rng.choice([c for c in "ACGT" if c != source[i]]))
            i += 1
        elif r < SUBSTITUTION + DELETION:
            i += rng.randint(1, 3)
        elif r < SUBSTITUTION + DELETION + INSERTION:
            copy.append("".join(rng.choices("ACGT", k=rng.randint(1, 3))))
        else:
            copy.append(source[i])
            i += 1
    b = "".join(rng.choices("ACGT", k=FLANKS[0])) + "".join(copy) + "".join(rng.choices("ACGT", k=FLANKS[1]))
    return a, b


def write_fasta(path: Path, name: str, seq: str, width: int = 80) -> Path:
    path.write_text(f">{name} synthetic\n" + "".join(seq[i:i + width] + "\n" for i in range(0, len(seq), width)))
    return path


@dataclass(frozen=True)
class Case:
    pair: Pair
    oracle: tuple[int, int, int]  # (score, end_a, end_b)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    d = tmp_path_factory.mktemp("pair")
    a, b = synthetic_pair()
    pair = read_pair(write_fasta(d / "a.fa", "chrA", a), write_fasta(d / "b.fa", "chrB", b))
    assert (pair.seq_a, pair.seq_b) == (a, b)
    assert -(-len(a) // TILE) * -(-len(b) // TILE) == GRID
    best = align(a, b, threads=2)
    assert best.score > 150_000, best  # the planted slice, far above the background
    return Case(pair, (best.score, best.end_a, best.end_b))


# ---- a cluster --------------------------------------------------------------------------------------


@dataclass
class Cluster(NodeGroup):
    masters: list[LocalNode]
    storage: list[LocalNode]
    balancers: list[LocalNode]  # b1 (primary), b2
    workers: list[LocalNode]
    client: Client | None = None
    extra_pids: set[int] = field(default_factory=set)  # slot processes of a SIGKILLed worker

    @property
    def nodes(self) -> list[LocalNode]:
        return self.masters + self.storage + self.balancers + self.workers

    def leader(self) -> LocalNode | None:
        return next((m for m in self.masters if (d := detail(m)) and d["state"] == "leader" and d["serving"]), None)


@contextlib.contextmanager
def running(d: Path, storage_count: int = 2):
    """Start the cluster (``storage_count`` storage nodes, replicas 2), wait for both workers on b1 and a serving leader, yield the ``Cluster``;
    stop every process by pid at the end, whatever happened."""
    masters = master_nodes(d, 3)
    _, storage = storage_nodes(d, storage_count, masters=masters)
    config_path, balancers = balancer_nodes(d, 2)
    workers = worker_nodes(d, config_path, 2, slots=1, mount=False)
    c = Cluster(masters, storage, balancers, workers)
    config = load_cluster_config(config_path)
    assert config.storage.replicas == 2
    try:
        start_all(c.nodes, timeout=30)
        c.wait(lambda: (x := c.active()) and x[0] is balancers[0] and len(x[1]["workers"]) == 2, 30,
               "b1 active with both workers registered")
        c.client = Client(list(config.masters.values()), storage=config.storage_nodes,
                          replicas=config.storage.replicas, timeout=30)
        c.wait(c.leader, 30, "a serving master leader")
        yield c
    finally:
        if c.client is not None:
            c.client.close()
        stop_all(c.nodes[::-1])  # workers first
        for pid in c.extra_pids:
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


# ---- the run: submit, kill one node part way, wait, compare ----------------------------------------


def align_with_fault(c: Cluster, case: Case, at: float, fault: Callable[[Cluster, str], str], label: str) -> dict:
    """Submit the pair; once ``at`` of the tiles are done, call ``fault`` with the job's id (it
    SIGKILLs one node and names it); wait for the job and check it against the oracle. Returns the answer."""
    started = time.monotonic()
    job = submit_alignment(c.client, case.pair, slots=2, tile=(TILE, TILE))
    assert (job["rows"], job["cols"]) == (6, 6), job
    want = max(1, round(at * GRID))
    # the first tiles wait for the slots to load (or compile) their kernels
    seen = c.wait(lambda: (v := c.client.job(job["job"]).value)["done"] >= want and v, JOB_TIMEOUT,
                  f"{want} of {GRID} tiles done")
    assert seen["state"] == "active" and seen["done"] < GRID, f"the grid ended before the kill: {seen}"
    victim = fault(c, job["job"])
    killed_at = time.monotonic()
    try:
        result = wait(c.client, job["job"], timeout=JOB_TIMEOUT)
    except Exception as exc:
        pytest.fail(f"{label}: {exc}\n{c.logs()}")
    ended = time.monotonic()
    view = c.client.job(job["job"]).value
    print(f"\n[{label}] killed {victim} at {seen['done']}/{GRID} tiles; done={view['done']} "
          f"failed_attempts={view['failed_attempts']} duplicates={view['duplicates']}; job {result['seconds']:.1f} s "
          f"(from submit to the kill {killed_at - started:.1f} s, kill to the end {ended - killed_at:.1f} s)")
    assert view["state"] == "done" and view["done"] == view["total"] == GRID and view["failed"] == 0, view
    assert (result["score"], result["end_a"], result["end_b"]) == case.oracle, (result, case.oracle)
    assert result["cells"] == len(case.pair.seq_a) * len(case.pair.seq_b), result
    return result | {"view": view}


# ---- (a) a worker mid-tile ---------------------------------------------------------------------------


def test_a_worker_sigkilled_mid_tile(tmp_path, case):
    with running(tmp_path) as c:
        hit: dict[str, object] = {}

        def just_started_tile(job: str) -> tuple[LocalNode, int] | None:
            """A worker whose status shows a tile of the job started under 0.15 s ago: it is
            mid-tile (a tile takes longer than that) when the SIGKILL lands."""
            for w in c.workers:
                for r in (detail(w) or {}).get("running", []):
                    owner, task = r["task"].split("/")
                    if owner == job and r["kind"] == "tile" and r["for_s"] < 0.15:
                        return w, int(task)
            return None

        def kill_running_worker(c: Cluster, job: str) -> str:
            c.wait(lambda: (x := c.active()) and any(w["running"] for w in x[1]["workers"]), 10,
                   "the active balancer to list a worker running a tile")
            victim, task = c.wait(lambda: just_started_tile(job), 20, "a worker starting a tile")
            c.extra_pids |= descendants(victim.pid)  # its slot process, in its own session
            victim.kill()
            hit.update(worker=victim.name, task=task)
            return f"{victim.name} (running tile {task})"

        result = align_with_fault(c, case, 0.2, kill_running_worker, "worker")
        assert result["view"]["failed_attempts"] >= 1, result["view"]
        # the tile's own record is folded into the job's once its neighbours consumed it: the
        # balancer's count says the attempt was lost with the worker
        b, active = c.wait(c.active, 10, "the active balancer")
        assert active["core"].get("tasks_lost", 0) >= 1, (b.name, active["core"])
        assert sorted(w["name"] for w in active["workers"]) == sorted(w.name for w in c.workers if w.name != hit["worker"])


# ---- (b) the master leader ------------------------------------------------------------------------------


def test_the_master_leader_sigkilled_midway(tmp_path, case):
    with running(tmp_path) as c:
        def kill_leader(c: Cluster, job: str) -> str:
            leader = c.wait(c.leader, 10, "the master leader")
            leader.kill()
            return leader.name

        align_with_fault(c, case, 0.4, kill_leader, "leader")
        assert c.wait(c.leader, 30, "a new master leader") is not None


# ---- (c) the active balancer -----------------------------------------------------------------------------


def test_the_active_balancer_sigkilled_midway(tmp_path, case):
    with running(tmp_path) as c:
        def kill_active_balancer(c: Cluster, job: str) -> str:
            b, _ = c.wait(c.active, 10, "the active balancer")
            b.kill()
            return b.name

        align_with_fault(c, case, 0.4, kill_active_balancer, "balancer")
        b2 = c.balancers[1]
        assert (x := detail(b2)) is not None and x["state"] == "active", x


# ---- (d) a storage node holding boundaries -----------------------------------------------------------------


def kill_storage_holding_boundaries(c: Cluster, job: str) -> str:
    """SIGKILL the storage node that holds the most of the job's live boundary files."""
    listing = c.client.files(limit=1000, owner=job).value["files"]
    held = {s.name: sum(1 for f in listing if f["name"].endswith(".boundary") and s.name in f["replicas"])
            for s in c.storage}
    victim = max(c.storage, key=lambda s: held[s.name])
    assert held[victim.name] > 0, f"no storage node holds a boundary of the job: {listing}"
    victim.kill()
    return f"{victim.name} (holding {held[victim.name]} boundaries)"


def test_a_storage_node_sigkilled_midway(tmp_path, case):
    """The issue's layout: 2 storage nodes, replicas 2: the survivor holds every boundary."""
    with running(tmp_path) as c:
        align_with_fault(c, case, 0.4, kill_storage_holding_boundaries, "storage")


def test_a_storage_node_sigkilled_midway_with_a_third_node(tmp_path, case):
    """3 storage nodes, replicas 2: two copies of each new boundary can still be made."""
    with running(tmp_path, storage_count=3) as c:
        align_with_fault(c, case, 0.4, kill_storage_holding_boundaries, "storage of 3")
