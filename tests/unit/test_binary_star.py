"""The Binary Star pair: the transition table (balancer.binary_star.TRANSITIONS) checked for
coverage and against an independent list of expected moves, every rule carried out, the
split-brain guard, and two simulated balancers exchanging heartbeats over a lossy, partitionable
link (seeded). ``validate_state`` runs after every step."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.binary_star import (
    ACTION_COUNTERS,
    PEER_EVENTS,
    ROLE_STATES,
    SERVING,
    TRANSITIONS,
    Action,
    BinaryStar,
    BinaryStarError,
    Role,
    StarEvent,
    State,
)

A, B, P = State.ACTIVE, State.BACKUP, State.PASSIVE
PR = State.PRIMARY
EXPIRY = 0.25 * 4
CLIENT_EVENTS = (StarEvent.CLIENT_PEER_UNKNOWN, StarEvent.CLIENT_PEER_ALIVE, StarEvent.CLIENT_PEER_SILENT,
                 StarEvent.CLIENT_PEER_STRANDED)
HEARD_EVENTS = (*PEER_EVENTS.values(), StarEvent.PEER_ACTIVE_SERVING, StarEvent.PEER_ACTIVE_IDLE)


def star(primary: bool, state: State | None = None) -> BinaryStar:
    """A star in ``state``, reached the way a real one gets there (heartbeats at t = 0)."""
    s = BinaryStar(primary, interval=0.25, liveness=4, now=0.0)
    s.validate_state()
    if state == A:
        s.on_peer(B if primary else P, 0.0)
    elif state == P:
        s.on_peer(A, 0.0)
    assert state is None or s.state == state
    s.validate_state()
    return s


def forced(role: Role, state: State) -> BinaryStar:
    """A star put straight into ``state`` (no invariants: for carrying out single rules)."""
    s = BinaryStar(role == Role.PRIMARY, interval=0.25, liveness=4, now=0.0)
    s.state = state
    return s


# ---- the table as data ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_the_table_has_a_rule_for_every_state_of_a_role_and_every_event_and_no_other(role):
    assert set(TRANSITIONS[role]) == {(s, e) for s in ROLE_STATES[role] for e in StarEvent}
    assert set(PEER_EVENTS) == set(State) and set(HEARD_EVENTS) | set(CLIENT_EVENTS) == set(StarEvent)


@pytest.mark.parametrize(("role", "state", "event"), [(r, s, e) for r in Role for (s, e) in TRANSITIONS[r]])
def test_each_rule_is_well_formed(role, state, event):
    rule = TRANSITIONS[role][(state, event)]
    assert rule.new in ROLE_STATES[role]
    if event in CLIENT_EVENTS:  # a client is served or refused, nothing else
        assert rule.action in (Action.SERVE, Action.TAKE_OVER, Action.REFUSE)
        assert (rule.new == A) == (rule.action in SERVING)
    else:  # a heartbeat never serves a client
        assert rule.action in (Action.IGNORE, Action.SETTLE, Action.DUAL_ACTIVE, Action.DUAL_PASSIVE)
    if rule.action in (Action.IGNORE, Action.REFUSE):
        assert rule.new == state
    if rule.action == Action.SETTLE:
        assert rule.new != state
    if rule.action == Action.TAKE_OVER:
        assert state in (B, P) and event in (StarEvent.CLIENT_PEER_SILENT, StarEvent.CLIENT_PEER_STRANDED)
    assert rule.why


@pytest.mark.parametrize(("role", "state", "event"), [(r, s, e) for r in Role for (s, e) in TRANSITIONS[r]])
def test_the_machine_carries_out_each_rule(role, state, event):
    rule = TRANSITIONS[role][(state, event)]
    s = forced(role, state)
    served, change = s._apply(event)
    assert s.state == rule.new and served == (rule.action in SERVING)
    assert (change is None) == (rule.new == state)
    if change is not None:
        assert (change.old, change.new) == (state, rule.new) and "{" not in change.why
        assert s.counters[f"to_{rule.new.name.lower()}"] == 1
    counter = ACTION_COUNTERS.get(rule.action)
    assert s.counters.get(counter, 0) == (1 if counter else 0)


@pytest.mark.parametrize(("role", "state", "event"), [(r, s, e) for r in Role for s in ROLE_STATES[r] for e in HEARD_EVENTS])
def test_a_heartbeat_that_settles_a_passive_or_unsettled_state_leaves_it_there_when_heard_again(role, state, event):
    # what validate_state relies on: outside ACTIVE, the last heartbeat heard keeps the state
    after = TRANSITIONS[role][(state, event)].new
    if after != A:
        assert TRANSITIONS[role][(after, event)].new == after


def test_a_state_the_role_cannot_be_in_is_a_clear_error():
    s = forced(Role.BACKUP, PR)
    with pytest.raises(BinaryStarError, match="backup has no rule for PEER_ACTIVE in state PRIMARY"):
        s.on_peer(A, 0.1)
    with pytest.raises(AssertionError, match="cannot be"):
        s.validate_state()
    with pytest.raises(BinaryStarError):
        forced(Role.PRIMARY, B).on_client(0.1)


def test_validate_state_catches_a_state_the_last_heartbeat_contradicts():
    s = star(True, P)
    s.peer_state = B  # a passive primary that last heard a backup would have become active
    with pytest.raises(AssertionError, match="PASSIVE is not where hearing BACKUP"):
        s.validate_state()


# ---- the expected moves, written out independently of the table ----------------------------------


@pytest.mark.parametrize(
    ("primary", "state", "peer", "after"),
    [
        (True, PR, B, A),  # the primary meets its backup: serves
        (True, PR, P, A),
        (True, PR, A, P),  # the backup took over while the primary was away: it stays in charge
        (True, PR, PR, PR),  # two primaries: a misconfiguration, nothing settles
        (False, B, A, P),
        (False, B, P, A),
        (False, B, B, B),
        (False, B, PR, B),  # the backup waits for the primary to settle
        (True, A, PR, A),
        (True, A, B, A),
        (True, A, P, A),
        (True, A, A, A),  # dual active: the primary keeps serving
        (False, A, PR, A),
        (False, A, B, A),
        (False, A, P, A),
        (False, A, A, P),  # ... and the backup steps down
        (False, P, PR, A),  # the peer restarted: this one serves
        (False, P, B, A),
        (True, P, PR, A),
        (True, P, B, A),
        (False, P, A, P),
        (True, P, A, P),
        (True, P, P, A),  # dual passive: the primary serves
        (False, P, P, P),
    ],
)
def test_peer_heartbeats_move_the_state(primary, state, peer, after):
    s = star(primary, state)
    change = s.on_peer(peer, 0.1)
    assert s.state == after
    assert (change is None) == (after == state)
    assert TRANSITIONS[s.role][(state, PEER_EVENTS[peer])].new == after
    s.validate_state()


@pytest.mark.parametrize(
    ("primary", "state", "at", "served", "after"),
    [
        (True, PR, 0.1, False, PR),  # nothing heard yet: the backup may still announce itself
        (True, PR, EXPIRY + 0.01, True, A),  # a primary alone serves
        (False, B, 0.1, False, B),
        (False, B, EXPIRY + 0.01, True, A),  # the primary never came up
        (True, A, 0.1, True, A),
        (True, A, EXPIRY + 0.01, True, A),
        (False, A, 0.1, True, A),
        (False, P, 0.1, False, P),  # the peer is alive: the client should talk to it
        (True, P, 0.1, False, P),
        (False, P, EXPIRY + 0.01, True, A),  # silent peer and a client: take over
        (True, P, EXPIRY + 0.01, True, A),
    ],
)
def test_clients_are_served_or_refused(primary, state, at, served, after):
    s = star(primary, state)
    assert s.on_client(at)[0] is served
    assert s.state == after
    s.validate_state()


def test_a_primary_that_heard_another_primary_serves_a_client():
    s = star(True)
    s.on_peer(PR, 0.0)
    assert s.client_event(0.1) == StarEvent.CLIENT_PEER_ALIVE
    assert s.on_client(0.1)[0] and s.state == A
    s.validate_state()


def test_a_passive_takes_over_only_when_the_peer_is_silent_and_a_client_turns_to_it():
    s = star(False)
    s.on_peer(A, 0.0)
    assert s.state == P
    s.validate_state()
    # the peer is alive: a client is refused (it should be talking to the active one)
    assert s.on_client(0.5) == (False, None)
    s.validate_state()
    # silence alone changes nothing: no client asked (the split-brain case)
    for t in (1.5, 5.0, 60.0):
        assert not s.peer_alive(t) and s.state == P
    served, change = s.on_client(60.0)
    assert served and change.new == A and "taking over" in change.why
    assert change.why == "peer silent for 1 s and a client turned to this one: taking over"
    assert s.counters["takeovers"] == 1
    s.validate_state()


def test_a_primary_alone_serves_after_giving_its_backup_a_chance():
    s = star(True)
    assert s.on_client(0.1) == (False, None)  # the backup may still announce itself (or be active)
    s.validate_state()
    served, change = s.on_client(EXPIRY + 0.01)
    assert served and s.state == A and "no backup answers" in change.why
    assert "takeovers" not in s.counters and s.counters["clients_refused"] == 1
    s.validate_state()


def test_a_restarting_primary_does_not_serve_while_the_backup_is_active():
    s = star(True)
    assert s.on_client(0.05)[0] is False
    s.validate_state()
    s.on_peer(A, 0.1)
    s.validate_state()
    assert s.state == P and s.on_client(0.2)[0] is False
    s.validate_state()


def test_a_backup_whose_primary_never_came_up_serves_once_asked_after_liveness():
    s = star(False)
    assert s.on_client(0.5)[0] is False
    s.validate_state()
    assert s.on_client(EXPIRY + 0.01)[0] is True and s.state == A
    s.validate_state()


def test_status_says_role_state_and_peer():
    s = star(True)
    s.on_peer(B, 1.0)
    s.validate_state()
    st_ = s.status(1.5)
    assert st_["role"] == "primary" and st_["state"] == "active" and st_["peer_state"] == "backup"
    assert st_["peer_alive"] and st_["peer_silent_s"] == 0.5


# ---- two balancers over a simulated link -------------------------------------------------------


def run_pair(seed: int, steps: int, drop: float, partitions: list[tuple[float, float]],
             client_asks: float, dead: tuple[float, float] | None = None):
    """Step two stars 50 ms at a time. Heartbeats every 250 ms, dropped with ``drop`` and during
    ``partitions``; clients ask both sides with probability ``client_asks`` per step only while
    the side they talk to is unreachable (a client goes to the backup only when the primary does
    not answer). ``dead``: the primary is down (no heartbeats, no service) in that interval."""
    rng = random.Random(seed)
    primary, backup = star(True), star(False)
    serving_both = 0
    restarted = False
    for i in range(steps):
        t = i * 0.05
        cut = any(a <= t < b for a, b in partitions)
        primary_down = dead is not None and dead[0] <= t < dead[1]
        if dead is not None and t >= dead[1] and not restarted:
            restarted = True
            primary = BinaryStar(True, interval=0.25, liveness=4, now=t)  # restarted: fresh state
        if i % 5 == 0:
            if not primary_down and not cut and rng.random() > drop:
                backup.on_peer(primary.heartbeat(), t)
            if not primary_down and not cut and rng.random() > drop:
                primary.on_peer(backup.heartbeat(), t)
        if rng.random() < client_asks:
            if primary_down:
                backup.on_client(t)  # the clients fail over to the backup
            else:
                primary.on_client(t)
        if primary.serving() and backup.serving() and not primary_down:
            serving_both += 1
        primary.validate_state()
        backup.validate_state()
    return primary, backup, serving_both


def test_a_dead_primary_is_replaced_and_the_restarted_primary_stands_by():
    primary, backup, both = run_pair(seed=1, steps=400, drop=0.0, partitions=[], client_asks=0.5, dead=(5.0, 12.0))
    assert backup.state == State.ACTIVE and backup.counters.get("takeovers") == 1
    assert primary.state == State.PASSIVE
    assert both == 0


def test_a_partition_between_the_balancers_alone_does_not_make_two_actives():
    # the clients still reach the primary: nobody turns to the backup, it stays passive
    primary, backup, both = run_pair(seed=2, steps=600, drop=0.0, partitions=[(5.0, 20.0)], client_asks=0.5)
    assert primary.state == State.ACTIVE and backup.state == State.PASSIVE and both == 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), drop=st.floats(0.0, 0.5))
def test_with_lossy_heartbeats_at_most_one_side_serves_while_clients_reach_the_primary(seed, drop):
    # Losing heartbeats (not a dead primary) may delay settling but never makes two actives,
    # because a client turns to the backup only when the primary does not answer.
    primary, backup, both = run_pair(seed=seed, steps=400, drop=drop, partitions=[], client_asks=0.3)
    assert both == 0
    assert primary.state == State.ACTIVE


def test_after_a_partition_in_which_both_served_the_backup_steps_down_on_heal():
    primary, backup = star(True), star(False)
    primary.on_peer(B, 0.0)
    backup.on_peer(A, 0.0)
    assert (primary.state, backup.state) == (A, P)
    # the link breaks and a client that cannot reach the primary turns to the backup
    assert backup.on_client(2.0)[0] and backup.state == A
    backup.validate_state()
    # the link heals: each hears the other active
    primary.on_peer(backup.heartbeat(), 2.5)
    backup.on_peer(State.ACTIVE, 2.5)
    assert (primary.state, backup.state) == (A, P)
    primary.validate_state()
    backup.validate_state()
    assert primary.counters["dual_active"] == 1 and backup.counters["dual_active"] == 1


# ---- an active one that reaches no worker (ours: the stranded rule) -------------------------------


def test_a_passive_takes_over_from_an_active_peer_that_has_reached_no_worker_for_a_period():
    s = star(False, P)
    s.on_peer(A, 0.0, peer_workers=2)
    assert s.on_client(0.1) == (False, None)  # the peer serves its workers
    s.on_peer(A, 1.0, peer_workers=0)  # the peer purged its workers: stranded from now
    s.validate_state()
    assert s.client_event(1.5) == StarEvent.CLIENT_PEER_ALIVE and s.on_client(1.5) == (False, None)
    s.on_peer(A, 1.75, peer_workers=0)  # still heard, still without workers
    assert s.status(2.0)["peer_stranded"] and s.peer_alive(2.0)
    served, change = s.on_client(2.0)
    assert served and change.new == A and change.why.startswith("the active peer has reached no worker for 1 s")
    assert s.counters["takeovers"] == 1
    s.validate_state()


@pytest.mark.parametrize("workers", [1, -1])
def test_a_peer_that_announces_workers_or_does_not_say_is_never_stranded(workers):
    s = star(True, P)
    for t in (0.0, 1.0, 2.0, 3.0):
        s.on_peer(A, t, peer_workers=workers)
    assert not s.peer_stranded(3.1) and s.on_client(3.1) == (False, None)
    s.validate_state()


def test_one_heartbeat_with_workers_ends_the_stranding():
    s = star(False, P)
    s.on_peer(A, 0.0, peer_workers=0)
    s.on_peer(A, 0.9, peer_workers=1)  # a worker came back to it
    s.on_peer(A, 1.2, peer_workers=0)
    assert not s.peer_stranded(2.0) and s.peer_stranded(2.2)


@pytest.mark.parametrize("primary", [True, False])
def test_an_active_one_without_workers_yields_to_an_active_peer_with_workers_whatever_its_role(primary):
    s = star(primary, A)
    change = s.on_peer(A, 0.5, peer_workers=3, workers=0)
    assert s.state == P and change.why.startswith("both sides active: the peer has the workers")
    assert s.counters["dual_active"] == 1
    s.validate_state()


@pytest.mark.parametrize(("primary", "mine", "theirs", "after"), [
    (True, 2, 3, A), (False, 2, 3, P),  # both have workers: the backup steps down, as before
    (True, 0, 0, A), (False, 0, 0, P),  # neither has: the same
    (True, 1, 0, A), (False, 1, 0, A),  # this one has them: the peer will yield
])
def test_dual_active_with_workers_on_both_or_neither_side_keeps_the_primary(primary, mine, theirs, after):
    s = star(primary, A)
    s.on_peer(A, 0.5, peer_workers=theirs, workers=mine)
    assert s.state == after
    s.validate_state()


def run_pair_with_workers(seed: int, cut: tuple[float, float], steps: int = 600, n: int = 3):
    """Two stars and ``n`` workers, 50 ms steps, seeded. Each balancer registers the workers that
    reach it and purges one silent for 1.5 s; a worker heartbeats every 250 ms and turns to the
    other balancer after 1 s of silence or at once when refused. During ``cut`` the primary
    hears no worker (and no worker hears it), but it hears its peer. Returns the two stars and,
    per step, (time, primary serving, backup serving, workers registered with an active one)."""
    rng = random.Random(seed)
    phase = [rng.randrange(5) for _ in range(n)]  # workers heartbeat every 250 ms, not in lockstep
    stars = [star(True), star(False)]
    stars[0].on_peer(B, 0.0)
    stars[1].on_peer(A, 0.0)
    heard: list[dict[int, float]] = [{}, {}]  # per balancer: worker -> last heard
    current = [0] * n  # which balancer each worker talks to
    silent_since = [0.0] * n
    trace = []
    for i in range(1, steps):
        t = i * 0.05
        cutting = cut[0] <= t < cut[1]
        for b in (0, 1):
            if not stars[b].serving():
                heard[b].clear()
            for w in [w for w, at in heard[b].items() if t - at > 1.5]:
                del heard[b][w]
        if i % 5 == 0:  # the pair's heartbeats, with each side's registered workers
            counts = [len(heard[b]) if stars[b].serving() else 0 for b in (0, 1)]
            stars[1].on_peer(stars[0].heartbeat(), t, counts[0], counts[1])
            stars[0].on_peer(stars[1].heartbeat(), t, counts[1], counts[0])
        for w in range(n):
            if i % 5 != phase[w]:
                continue
            b = current[w]
            if cutting and b == 0:
                if t - silent_since[w] > 1.0:
                    current[w], silent_since[w] = 1, t
                continue
            if stars[b].serving():
                heard[b][w] = t
                silent_since[w] = t
                continue
            served, _ = stars[b].on_client(t, len(heard[b]) if stars[b].serving() else 0)
            if served:
                heard[b][w] = silent_since[w] = t
            else:
                current[w], silent_since[w] = 1 - b, t
        for s_ in stars:
            s_.validate_state()
        reached = sum(1 for w in range(n) if stars[current[w]].serving() and w in heard[current[w]])
        trace.append((t, stars[0].serving(), stars[1].serving(), reached))
    return stars[0], stars[1], trace


@pytest.mark.parametrize("seed", range(8))
def test_workers_cut_off_from_the_active_one_only_move_to_its_peer_and_stay_after_the_heal(seed):
    primary, backup, trace = run_pair_with_workers(seed, cut=(5.0, 20.0))
    during = [r for t, _, _, r in trace if 10.0 <= t < 20.0]
    assert min(during) == 3, "every worker served by an active balancer 5 s into the cut"
    first = next(t for t, p, b, r in trace if t >= 5.0 and b and r == 3)
    assert first < 5.0 + 5.0, f"all workers with the backup only at {first:.2f} s"
    both = [t for t, p, b, _ in trace if p and b]
    assert all(first - 2.0 <= t < first + 0.5 for t in both), "two actives only for a heartbeat or two"
    assert (primary.state, backup.state) == (P, A) and trace[-1][3] == 3  # after the heal: no flapping back
    assert backup.counters["takeovers"] == 1 and primary.counters["to_passive"] == 1


def test_heartbeats_a_healed_link_delivers_late_are_stale_and_a_restarted_peer_is_measured_afresh():
    s = star(False, A)
    offset = 500.0  # the peer's clock runs 500 s behind this one's; the link takes 2 ms
    for k in range(1, 5):
        assert s.fresh(k * 0.25 - offset, k, k * 0.25 + 0.002)
    # a cut from 1.0 s to 6.0 s: what the peer sent meanwhile arrives in one burst at 6.0 s
    burst = [(k, k * 0.25 - offset) for k in range(5, 25)]
    kept = [k for k, sent in burst if s.fresh(sent, k, 6.0)]
    assert kept == list(range(20, 25))  # sent within a liveness period (1 s) of arriving
    assert s.counters["peer_stale"] == 15
    assert s.fresh(6.25 - offset, 25, 6.252)
    # the peer restarts on another host, whose clock runs ahead: its sequence starts again
    assert s.fresh(9_000.0, 1, 7.0) and s.fresh(9_000.25, 2, 7.25)
    assert not s.fresh(9_000.25, 3, 8.5)  # and late ones are still caught
