"""A slow, lossy network on the simulated rack (issue 22): every link delayed and dropping packets.

Black-box, as tests/rack/test_partitions.py: the rack's delay proxies (tests/rack/netem.py) hold
each direction of every link 50 ms +- 10 ms, and nftables drops 1% of the packets each host
receives (``Rack.delay``, ``Rack.loss``); work goes in through the client API. Checked: the delay
is really on the links (a status round trip cannot beat the delay, on a new connection or on
one open before the delay was set, and every host's proxy carried the rack's connections, Raft's
included), and a whole-pair alignment still finishes
exact, against ``worker.sw.align`` on the same pair in this process. The times are printed
(`pytest -s`), the healed rack's beside them.

The pair is small and seeded (A 4,000 letters, B a mutated copy of a 3,000-letter slice of A
between random flanks): 20 tiles of 1,024 x 1,024, whose wavefront (8 anti-diagonals) pays the
links' delay at every step. The first alignment, on the healed rack, also loads (on a cold
cache, compiles) the slots' kernels.
"""

from __future__ import annotations

import random
import time
import tomllib

import pytest

from cluster.align import Pair, submit_alignment, wait
from cluster.node.config import parse_masters
from cluster.node.status import query_status
from worker.sw import align

from .rack import Rack

pytestmark = pytest.mark.rack

SEED = 20250122
LEN_A, SLICE, FLANKS = 4_000, (500, 3_500), (600, 500)
SUBSTITUTION = 0.05
TILE = (1_024, 1_024)  # 5 rows x 4 columns of tiles (B 4,100 letters, A 4,000)
DELAY_MS, JITTER_MS, LOSS_PERCENT = 50, 10, 1.0
JOB_TIMEOUT = 240.0  # a cold kernel cache costs each slot process its compile (~20 s here)


@pytest.fixture(scope="module")
def case() -> tuple[Pair, tuple[int, int, int]]:
    """The seeded pair and its oracle: (score, end_a, end_b) from one process."""
    rng = random.Random(SEED)
    a = "".join(rng.choices("ACGT", k=LEN_A))
    copy = "".join(rng.choice("ACGT") if rng.random() < SUBSTITUTION else c for c in a[SLICE[0]:SLICE[1]])
    b = "".join(rng.choices("ACGT", k=FLANKS[0])) + copy + "".join(rng.choices("ACGT", k=FLANKS[1]))
    best = align(a, b, threads=1)
    assert best.score > 2_000, best  # the planted slice, far above the background
    return Pair("chrA", a, "chrB", b), (best.score, best.end_a, best.end_b)


def aligned(rack: Rack, pair: Pair) -> tuple[dict, float]:
    """Align ``pair`` on the rack as a client would; (the answer, seconds from upload to answer)."""
    started = time.monotonic()
    with rack.client(timeout=60) as c:
        desc = submit_alignment(c, pair, tile=TILE, rows_budget=None)
        result = wait(c, desc["job"], timeout=JOB_TIMEOUT)
        view = c.job(desc["job"]).value
    assert view["state"] == "done" and view["done"] == view["total"] == 20 and view["failed"] == 0, view
    return result | {"duplicates": view["duplicates"]}, time.monotonic() - started


def status_round_trip(rack: Rack, name: str) -> float:
    """Seconds for one status query to host ``name``'s node: a fresh CURVE connection and a reply."""
    started = time.monotonic()
    (result,) = query_status([rack.address(name)], timeout=10)
    assert result.reply is not None, f"{name} did not answer: {result}"
    return time.monotonic() - started


def request_round_trip(c) -> float:
    """Seconds for one read of the ledger (the last job) on client ``c``'s open connection."""
    started = time.monotonic()
    c.jobs(limit=1)
    return time.monotonic() - started


def test_the_delay_is_on_every_link(healthy: Rack):
    rack = healthy
    names = [h.name for h in rack.nodes()]
    healed = {n: status_round_trip(rack, n) for n in names}
    with rack.client() as c:
        c.jobs(limit=1)  # connected to the leader before the delay is set
        open_healed = request_round_trip(c)
        rack.delay(DELAY_MS, JITTER_MS)
        try:
            open_slow = request_round_trip(c)
            slow = {n: status_round_trip(rack, n) for n in names}
            proxies = {n: rack.links(n) for n in names}
        finally:
            rack.heal()
    # A request and its reply each cross the link once, at no less than the delay less its jitter:
    # on a new connection, and on one that was open when the delay was set (as netem on a live link).
    floor = 2 * (DELAY_MS - JITTER_MS) / 1000
    assert min(slow.values()) >= floor, slow
    assert open_slow >= floor, open_slow
    assert all(p["delay_ms"] == DELAY_MS and p["jitter_ms"] == JITTER_MS for p in proxies.values()), proxies
    # Every node's connections came through its host's proxy, and Raft's: each pair of masters
    # holds one connection, which one of the two accepted.
    assert all(p["connections"] > 0 for p in proxies.values()), proxies
    raft = parse_masters(tomllib.loads(rack.hosts["client"].config.read_text()), raft=True)
    raft_links = sum(proxies[n]["ports"].get(raft[n].raft.rsplit(":", 1)[1], 0) for n in rack.role("master"))
    assert raft_links >= 3, {n: proxies[n]["ports"] for n in rack.role("master")}
    print(f"\n[rack slow] status round trip (a new CURVE connection and one request) with every link at "
          f"{DELAY_MS} +- {JITTER_MS} ms: {min(slow.values()) * 1000:.0f}-{max(slow.values()) * 1000:.0f} ms "
          f"(healed: {min(healed.values()) * 1000:.0f}-{max(healed.values()) * 1000:.0f} ms); a request on a client "
          f"connection open before the delay {open_slow * 1000:.0f} ms (healed {open_healed * 1000:.1f} ms); "
          f"connections through the proxies: {sum(p['connections'] for p in proxies.values())}, Raft's {raft_links}")


def test_an_alignment_finishes_exact_on_a_slow_lossy_network(healthy: Rack, case):
    rack = healthy
    pair, oracle = case
    first, first_s = aligned(rack, pair)  # loads (or compiles) the slots' kernels
    assert (first["score"], first["end_a"], first["end_b"]) == oracle, (first, oracle)

    rack.delay(DELAY_MS, JITTER_MS)
    rack.loss(LOSS_PERCENT)
    try:
        slow, slow_s = aligned(rack, pair)
        lost = sum(rack.links(h.name)["lost"] for h in rack.nodes())
    finally:
        rack.heal()
    assert lost > 0, "no packet was dropped"
    assert (slow["score"], slow["end_a"], slow["end_b"]) == oracle, (slow, oracle)
    assert slow["cells"] == len(pair.seq_a) * len(pair.seq_b), slow

    rack.wait_healthy(30)
    healed, healed_s = aligned(rack, pair)
    assert (healed["score"], healed["end_a"], healed["end_b"]) == oracle, (healed, oracle)
    print(f"\n[rack slow] {len(pair.seq_a):,} x {len(pair.seq_b):,} letters in {slow['tiles']} tiles, exact "
          f"(score {slow['score']}): every link at {DELAY_MS} +- {JITTER_MS} ms with {LOSS_PERCENT:g}% loss ({lost} packets dropped) "
          f"{slow_s:.1f} s from upload to answer (job {slow['seconds']:.1f} s, failed attempts "
          f"{slow['failed_attempts']}, duplicates refused {slow['duplicates']}); the healed rack "
          f"{healed_s:.2f} s (job {healed['seconds']:.2f} s; the first run, loading the kernels, {first_s:.1f} s)")
