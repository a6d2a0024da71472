"""cluster/node/sendqueue.py: per-peer byte budgets, driven with trackers the test completes."""

from __future__ import annotations

from cluster.node.sendqueue import FORGET_S, SendQueues


class Tracker:
    """Stands for a libzmq tracker: ``done`` once the test says libzmq let go of the message."""

    def __init__(self) -> None:
        self.done = False


def fill(queues: SendQueues, route: bytes, nbytes: int, count: int) -> list[Tracker]:
    trackers = []
    for _ in range(count):
        assert queues.blocked("api", route) is None
        t = Tracker()
        queues.sent("api", route, t, nbytes, 0.0)
        trackers.append(t)
    return trackers


def test_a_client_that_does_not_read_is_blocked_at_its_budget_and_freed_as_it_reads():
    q = SendQueues(people_bytes=100, node_bytes=1000)
    q.heard("api", b"alice", "alice", "client", 0.0)
    trackers = fill(q, b"alice", 30, 4)  # 120 held: over 100 only with the last one
    entry = q.blocked("api", b"alice")
    assert entry is not None and entry.held == 120 and entry.name == "alice"
    trackers[0].done = True  # the peer read one: 90 held, under the budget again
    assert q.blocked("api", b"alice") is None
    assert q.status() == {"routes": 1, "largest_held_bytes": 90}


def test_nodes_get_the_larger_budget_and_an_insecure_cluster_treats_everyone_as_one():
    q = SendQueues(people_bytes=100, node_bytes=1000)
    q.heard("api", b"b1", "balancer-1", "balancer", 0.0)
    fill(q, b"b1", 100, 10)
    assert q.blocked("api", b"b1") is not None
    loose = SendQueues(people_bytes=100, node_bytes=1000, insecure=True)
    loose.heard("api", b"x", "", "", 0.0)
    fill(loose, b"x", 100, 10)
    assert loose.blocked("api", b"x") is not None


def test_a_route_handed_over_to_another_key_takes_that_keys_budget():
    q = SendQueues(people_bytes=100, node_bytes=1000)
    q.heard("api", b"r", "balancer-1", "balancer", 0.0)
    fill(q, b"r", 50, 3)
    q.heard("api", b"r", "mallory", "client", 1.0)  # ROUTER_HANDOVER: same route, another key
    assert q.blocked("api", b"r") is not None


def test_a_route_never_heard_from_gets_the_peoples_budget():
    q = SendQueues(people_bytes=100, node_bytes=1000)
    fill(q, b"stranger", 60, 2)
    assert q.blocked("api", b"stranger") is not None


def test_sweep_forgets_idle_routes_but_not_those_still_holding_bytes():
    q = SendQueues(people_bytes=100, node_bytes=1000)
    q.heard("api", b"idle", "a", "client", 0.0)
    q.heard("api", b"busy", "b", "client", 0.0)
    (tracker,) = fill(q, b"busy", 10, 1)
    q.sweep(FORGET_S / 2)
    assert q.status()["routes"] == 2
    q.sweep(FORGET_S + 1)
    assert q.status() == {"routes": 1, "largest_held_bytes": 10}
    tracker.done = True
    q.sweep(FORGET_S + 2)
    assert q.status() == {"routes": 0, "largest_held_bytes": 0}


def test_only_some_messages_carry_a_tracker_and_a_done_one_releases_the_untracked_before_it():
    """libzmq lets go of one route's messages in order: one tracker speaks for what went before."""
    q = SendQueues(people_bytes=1000, node_bytes=10_000)
    q.heard("api", b"b1", "balancer-1", "balancer", 0.0)
    assert q.wants_tracker("api", b"b1", 10), "nothing pending: the first one is tracked"
    first = Tracker()
    q.sent("api", b"b1", first, 10, 0.0)
    assert not q.wants_tracker("api", b"b1", 10), "one is pending: small ones ride the next tracker"
    q.sent("api", b"b1", None, 10, 0.0)
    q.sent("api", b"b1", None, 10, 0.0)
    assert q.wants_tracker("api", b"b1", 64 * 1024), "a large message always carries one"
    second = Tracker()
    q.sent("api", b"b1", second, 20, 0.0)
    assert q.status()["largest_held_bytes"] == 50
    first.done = True
    assert q.status()["largest_held_bytes"] == 40
    second.done = True  # releases itself and the two untracked ones sent before it
    assert q.status()["largest_held_bytes"] == 0
    assert q.wants_tracker("api", b"b1", 10), "nothing pending again"


def test_untracked_bytes_force_a_tracker_before_they_reach_the_bound():
    q = SendQueues(people_bytes=1 << 30, node_bytes=1 << 30)
    q.heard("api", b"c", "c", "client", 0.0)
    q.sent("api", b"c", Tracker(), 10, 0.0)  # never done: the peer does not read
    sent = 0
    while not q.wants_tracker("api", b"c", 1000):
        q.sent("api", b"c", None, 1000, 0.0)
        sent += 1000
    assert 0 < sent < 1 << 20
