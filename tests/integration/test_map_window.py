"""``Client.map`` over many items on a real cluster (issue 23, the client): chunk by chunk, within
the client's window, every result right; a refused later chunk fails its own futures.

3 masters, the balancer pair, one worker of 2 slots, on 127.0.0.1 (``test_dispatch.running``
starts them and stops every process by pid).
"""

from __future__ import annotations

import sys

import cloudpickle
import pytest

from cluster.client import Client, ClusterError, Refused
from cluster.local import balancer_nodes, master_nodes, worker_nodes

from .test_dispatch import running

pytestmark = pytest.mark.integration

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WINDOW = 2_000
CHUNK = 500


def noop(i):
    return i


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("mapwindow")
    masters = master_nodes(d, 3)
    config, balancers = balancer_nodes(d, 2)
    with running(d, masters, balancers, worker_nodes(d, config, 1, slots=2)) as c:
        yield c


@pytest.fixture
def client(cluster):
    client = Client([m.address for m in cluster.masters], timeout=30, map_window=WINDOW, map_chunk=CHUNK)
    yield client
    client.close()


def test_twenty_thousand_items_go_chunk_by_chunk_within_the_window(cluster, client):
    durable: list[int] = []
    futures = client.map(noop, range(20_000), progress=durable.append)
    assert futures[0].job is not None, "map returns once its first chunk is durable"
    assert [f.result(timeout=300) for f in futures] == list(range(20_000))
    assert 0 < client.most_outstanding <= WINDOW and client.outstanding == 0
    assert sum(durable) == 20_000 and max(durable) <= CHUNK
    jobs = {f.job for f in futures}
    assert len(jobs) == 20_000 // CHUNK, "one job per chunk"
    assert all(0 <= f.task < CHUNK for f in futures[::97])
    leader = cluster.leader()
    assert not leader["core"].get("refused_too_many_pending"), "the client's window kept it under the masters' limit"


def test_a_refused_later_chunk_fails_its_own_futures_and_the_rest_of_the_map(client):
    small = Client(client.masters, timeout=30, map_window=WINDOW, map_chunk=3)
    try:
        items = [b"a"] * 6 + [b"x" * (1200 << 10)] + [b"b"] * 4  # item 6 alone is over the 1 MiB spec limit
        futures = small.map(len, items)
        assert [f.result(timeout=60) for f in futures[:6]] == [1] * 6
        with pytest.raises(Refused) as refused:
            futures[6].result(timeout=60)
        assert refused.value.code == "spec_too_large" and futures[6].job is None
        for f in futures[7:]:
            exc = f.exception(timeout=60)
            assert isinstance(exc, ClusterError) and not isinstance(exc, Refused) and f.job is None
        assert small.outstanding == 0
    finally:
        small.close()
