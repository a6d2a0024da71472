"""master.workspec: work specs, columnar work units, leases and the share of slots (pure core).

The scheduler is driven with a simulated clock and simulated slots: no sockets, no sleeps.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master import commands as C
from master import views
from master.commands import AddUnits, AddWorkSpec, ControlSpec
from master.ledger import Ledger
from master.work_history import AttemptOutcome
from master.work_units import TRANSITIONS, IllegalTransition, UnitState
from master.workspec import (AVAILABLE, DONE, FAILED, FAILED_OUTCOME, FINISHED, LOST, PENDING, Demand, UnitTable,
                             WorkSpecError, WorkState, allocate, check_chain, spec_id, validate_spec)
from tests.unit.test_purity import FORBIDDEN, imported_roots


def units(n: int, prefix: str = "u") -> list:
    return [[f"{prefix}{k}", f"data {k}".encode()] for k in range(n)]


def check_invariants(t: UnitTable, spec=None) -> None:
    """The table's own ``validate_state``, and these checks written independently of it."""
    t.validate_state(spec)
    state = t.state.view
    assert t.counts == [int(np.count_nonzero(state == k)) for k in range(4)]
    queued = [u for q in t.available.values() for u in q]
    assert sorted(queued) == sorted(np.flatnonzero(state == AVAILABLE).tolist())
    assert sorted(t.history.open) == sorted(np.flatnonzero(state == PENDING).tolist())
    assert len(t.keys) == len(t.data) == len(t.index) == t.state.n == t.priority.n == t.attempts.n == t.votes.n
    ballots = t.quorum.ballots
    assert all(t.state.data[u] in (AVAILABLE, PENDING, FAILED) for u in ballots)  # decided units keep no ballots
    assert all(len(b) == t.votes.data[u] for u, b in ballots.items())


# ---- the share of slots -----------------------------------------------------------------------------


def simulate(specs: dict[str, dict], slots: int, rounds: int, seed: int = 1):
    """Slots run units of the specs; each round every running unit ends with probability 0.3
    and the free slots are allocated. Returns the mean running count per spec."""
    rng = random.Random(seed)
    running = {name: 0 for name in specs}
    total = {name: 0 for name in specs}
    for _ in range(rounds):
        for name in running:
            running[name] -= sum(1 for _ in range(running[name]) if rng.random() < 0.3)
        free = slots - sum(running.values())
        demands = [Demand(name, s.get("priority", 0), s.get("weight", 1), running[name], s.get("available", 10**9),
                          s.get("max_running")) for name, s in specs.items()]
        for name, got in allocate(demands, free).items():
            running[name] += got
            assert s_max(specs[name]) is None or running[name] <= s_max(specs[name])
        assert sum(running.values()) <= slots
        for name in running:
            total[name] += running[name]
    return {name: total[name] / rounds for name in specs}


def s_max(spec: dict):
    return spec.get("max_running")


def test_weights_converge_to_their_shares():
    specs = {"a": {"weight": 1}, "b": {"weight": 2}, "c": {"weight": 3}}
    mean = simulate(specs, slots=60, rounds=3000)
    for name, spec in specs.items():
        assert abs(mean[name] / 60 - spec["weight"] / 6) < 0.02, mean


def test_priorities_come_strictly_first():
    got = allocate([Demand("low", 0, 100.0, 0, 50), Demand("high", 5, 1.0, 3, 7)], 10)
    assert got == {"high": 7, "low": 3}  # the high tier takes all it can, the rest goes down
    got = allocate([Demand("low", 0, 100.0, 0, 50), Demand("high", 5, 1.0, 3, 70)], 10)
    assert got == {"high": 10}


def test_a_spec_at_max_running_gets_nothing_and_its_share_goes_to_the_others():
    mean = simulate({"capped": {"weight": 10, "max_running": 5}, "other": {"weight": 1}}, slots=40, rounds=2000)
    assert mean["capped"] <= 5 and mean["other"] > 30


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-2, 2), st.floats(0.1, 10), st.integers(0, 20), st.integers(0, 30),
                          st.one_of(st.none(), st.integers(0, 25)), st.booleans()), min_size=1, max_size=8),
       st.integers(0, 60))
def test_allocate_never_passes_max_running_available_or_the_slots(rows, n):
    demands = [Demand(f"s{k}", p, w, r, a, m, paused) for k, (p, w, r, a, m, paused) in enumerate(rows)]
    got = allocate(demands, n)
    assert sum(got.values()) <= n and all(v > 0 for v in got.values())
    by = {d.name: d for d in demands}
    for name, k in got.items():
        d = by[name]
        assert not d.paused and k <= d.available
        assert d.max_running is None or d.running + k <= d.max_running
    # strict priority: a spec of a lower tier got slots only if no higher-tier spec had room left
    for name in got:
        for d in demands:
            if d.priority > by[name].priority and not d.paused:
                room = d.available if d.max_running is None else min(d.available, d.max_running - d.running)
                assert got.get(d.name, 0) >= room


# ---- units, leases, attempts --------------------------------------------------------------------


def test_leases_expire_on_the_simulated_clock_and_attempts_are_recorded():
    t = UnitTable()
    t.add(units(5))
    leased = t.lease(3, "w1", now=100.0, lease_s=10)
    assert leased == [0, 1, 2] and t.summary() == {"available": 2, "pending": 3, "finished": 0, "failed": 0, "total": 5}
    assert t.expired(109.9).size == 0
    assert t.expired(110.5).tolist() == [0, 1, 2]
    assert t.end(0, LOST, 110.5, max_attempts=2) == AVAILABLE  # back in the queue, after the others
    assert t.end(1, DONE, 111.0, max_attempts=2) == FINISHED
    assert t.end(1, DONE, 112.0, max_attempts=2) == FINISHED  # a duplicate report changes nothing
    assert t.lease(10, "w2", now=120.0, lease_s=10) == [3, 4, 0]
    assert t.end(0, FAILED_OUTCOME, 121.0, max_attempts=1) == FAILED  # its own first failure: the lost one did not count
    assert [(a.worker, a.start, a.end, a.outcome) for a in t.attempts_of(0)] == \
        [("w1", 100.0, 110.5, "lost"), ("w2", 120.0, 121.0, "failed")]
    assert t.held_by("w1").tolist() == [2] and t.held_by("w2").tolist() == [3, 4]
    assert t.retry([0, 1]) == 1 and t.state.data[0] == AVAILABLE  # a finished unit is not retried
    check_invariants(t)


def test_an_assignment_naming_a_unit_twice_leases_it_once():
    """A committed assignment is applied on every master: one that names a unit twice (never
    proposed by a correct leader) must not leave a queue half-popped."""
    t = UnitTable()
    t.add(units(1))
    assert t.lease_ids([0, 0], "w1", 10.0, 5.0, [(1, 1), (1, 2)]) == [0]
    assert t.summary()["pending"] == 1 and t.summary()["available"] == 0
    assert (t.fence_term.data[0], t.fence_seq.data[0]) == (1, 1)  # the first naming's token
    t.validate_state()
    check_invariants(t)


def test_unit_priority_orders_the_queue():
    t = UnitTable()
    t.add([["low", b""], ["high", b"", 9], ["mid", b"", 3]])
    assert [t.keys[u] for u in t.lease(3, "w", 0.0, 1.0)] == ["high", "mid", "low"]


@pytest.mark.parametrize("batch,code,fragment", [
    ([["a", b""], ["a", b"x"]], "duplicate_key", "'a'"),
    ([["b", b""], ["old", b""]], "duplicate_key", "'old'"),
    ([["c", "text, not bytes"]], "bad_units", "data must be bytes"),
    ([["", b""]], "bad_units", "non-empty"),
    ([["d"]], "bad_units", "[key, data]"),
    ([["e", b"", 2**40]], "bad_units", "int32"),
    (["f"], "bad_units", "[key, data]"),
])
def test_a_bad_batch_is_refused_whole(batch, code, fragment):
    t = UnitTable()
    t.add([["old", b"1"]])
    before = t.to_state()
    with pytest.raises(WorkSpecError) as refused:
        t.add([["fine", b""], *batch])
    assert refused.value.code == code and fragment in refused.value.text
    assert t.to_state() == before  # nothing of the batch was applied


def run_ops(ops, spec=None) -> None:
    """Apply a sequence of (op, k, x) to a fresh table, checking the invariants after each, and
    that a snapshot round-trips at the end. With a redundant ``spec``, "vote" ends a replica and
    "end" ends one lost or failed (a DONE without a vote is not what dispatch does there)."""
    t = UnitTable()
    now, added = 0.0, 0
    for op, k, x in ops:
        now += 1.0
        before = t.state.view.copy()  # each op moves a unit along one edge of TRANSITIONS at most
        if op == "add":
            t.add([[f"k{added + j}", b"d", j % 3] for j in range(k)])
            added += k
        elif op == "lease":
            t.lease(k, f"w{x}", now, 5.0)
        elif op in ("end", "vote") and t.history.open:
            uid = sorted(t.history.open)[k % len(t.history.open)]
            if op == "vote":
                state, output = t.vote(uid, f"w{k % 4}", bytes([x]) * 16, b"o%d" % x, now, spec)
                assert (state == FINISHED) == (output is not None)
            else:
                t.end(uid, x if spec is None else (LOST, FAILED_OUTCOME)[x % 2], now, max_attempts=2)
        elif op == "expire":
            for uid in t.expired(now):
                t.end(int(uid), LOST, now, max_attempts=2)
        elif op == "retry":
            t.retry(range(k))
        after = t.state.view
        moved = np.flatnonzero(after[:len(before)] != before)
        assert all(UnitState(int(after[u])) in TRANSITIONS[UnitState(int(before[u]))] for u in moved), op
        check_invariants(t, spec)  # validate_state after every op
        for uid, (winner, ballots) in t.disputes.items():  # every winner has its quorum
            assert winner is None or sum(d == winner for _, d in ballots) >= spec.quorum
    again = UnitTable.from_state(t.to_state())
    check_invariants(again, spec)
    assert again.to_state() == t.to_state()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "lease", "end", "expire", "retry"]), st.integers(0, 30),
                          st.integers(0, 2)), max_size=60))
def test_any_sequence_keeps_the_columns_consistent_and_snapshots_round_trip(ops):
    run_ops(ops)


# ---- specs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,code,fragment", [
    ({"name": "a", "run": {"kind": "call"}, "replicas": 0}, "bad_replicas", "'replicas'"),
    ({"name": "a", "run": {"kind": "call"}, "replicas": 16}, "bad_replicas", "'replicas'"),
    ({"name": "a", "run": {"kind": "call"}, "replicas": 4, "quorum": 2}, "bad_replicas", "majority"),
    ({"name": "a", "run": {"kind": "call"}, "replicas": 3, "quorum": 4}, "bad_replicas", "majority"),
    ({"name": "a", "run": {"kind": "call"}, "replicas": 3, "compare": "fuzzy"}, "bad_spec", "'compare'"),
    ({"name": "a", "run": {"kind": "call"}, "continuous": "yes"}, "bad_spec", "'continuous'"),
    ({"name": "a", "run": {"kind": "call"}, "continuous": True, "interval": 0}, "bad_spec", "'interval'"),
    ({"name": "a", "run": {"kind": "call"}, "weight": 0}, "bad_weight", "positive"),
    ({"name": "a", "run": {"kind": "call"}, "weight": -2}, "bad_weight", "positive"),
    ({"name": "a", "run": {"kind": "call"}, "weight": float("nan")}, "bad_weight", "positive"),
    ({"name": "a", "run": {"kind": "call"}, "then": "a"}, "then_cycle", "itself"),
    ({"name": "a", "run": {"kind": "call"}, "then": "nowhere"}, "unknown_spec", "'nowhere'"),
    ({"name": "a", "run": {"kind": "call"}, "colour": 1}, "bad_spec", "'colour'"),
    ({"name": "", "run": {"kind": "call"}}, "bad_spec", "'name'"),
    ({"name": "a", "run": "echo"}, "bad_spec", "'run'"),
    ({"name": "a", "run": {"kind": "call"}, "max_running": -1}, "bad_spec", "'max_running'"),
    ({"name": "a", "run": {"kind": "call"}, "max_attempts": 0}, "bad_spec", "'max_attempts'"),
])
def test_bad_specs_are_refused_with_the_field_named(spec, code, fragment):
    with pytest.raises(WorkSpecError) as refused:
        validate_spec(spec, known=["b"])
    assert refused.value.code == code and fragment in refused.value.text


def test_a_then_cycle_through_other_specs_is_refused():
    specs = {"b": validate_spec({"name": "b", "run": {"kind": "call"}, "then": "c"}, known=["c"]),
             "c": validate_spec({"name": "c", "run": {"kind": "call"}})}
    check_chain(specs, "a", "b")  # a -> b -> c: fine
    specs["c"].then = "a"
    with pytest.raises(WorkSpecError, match="a -> b -> c -> a"):
        check_chain(specs, "a", "b")


# ---- in the ledger: commands through the log's codec, refusals, snapshots ---------------------------


def ledger_apply(ledger, command):
    got = ledger.apply(C.decode(C.encode(command)))  # as the log carries it
    ledger.work.validate_state()  # after every command
    return got


def test_work_specs_and_units_through_the_ledger_and_its_snapshot():
    ledger = Ledger()
    assert ledger_apply(ledger, AddWorkSpec({"name": "parse", "run": {"kind": "command", "argv": ["parse"]},
                                             "weight": 2}, 1.0)).value == {"spec": "parse"}
    assert ledger_apply(ledger, AddWorkSpec({"name": "fetch", "run": {"kind": "call"}, "then": "parse",
                                             "priority": 5}, 1.0)).ok
    got = ledger_apply(ledger, AddUnits("fetch", units(1000), 2.0))
    assert got.ok and got.value == {"added": 1000, "total": 1000}
    assert ledger_apply(ledger, AddUnits("parse", units(10, "p"), 2.0)).ok
    assert ledger_apply(ledger, ControlSpec("parse", "pause", 3.0)).ok
    assert ledger_apply(ledger, ControlSpec("parse", "prioritize", 3.0, 7)).ok
    rows = ledger.work.summary()
    assert [(r["spec"], r["priority"], r["paused"], r["available"], r["total"]) for r in rows] == \
        [("parse", 7, True, 10, 10), ("fetch", 5, False, 1000, 1000)]
    ledger.work.tables["fetch"].lease(3, "w1", 4.0, 30.0)
    again = Ledger.restore(ledger.snapshot())
    assert again.work.summary() == ledger.work.summary()
    assert again.work.tables["fetch"].to_state() == ledger.work.tables["fetch"].to_state()
    assert again.snapshot() == ledger.snapshot()  # a snapshot does not leave a copy behind
    assert ledger.state.work == b""


@pytest.mark.parametrize("command,code,fragment", [
    (lambda C: C.AddUnits("nowhere", [["a", b""]], 1.0), "unknown_spec", "'nowhere'"),
    (lambda C: C.AddUnits("s", [["a", b""], ["a", b""]], 1.0), "duplicate_key", "'a'"),
    (lambda C: C.AddUnits("s", [["k0", b""]], 1.0), "duplicate_key", "'k0'"),
    (lambda C: C.AddUnits("s", [], 1.0), "bad_units", "non-empty"),
    (lambda C: C.AddUnits("s", [["z", 3]], 1.0), "bad_units", "bytes"),
    (lambda C: C.AddWorkSpec({"name": "s", "run": {"kind": "call"}}, 1.0), "duplicate_spec", "'s'"),
    (lambda C: C.AddWorkSpec({"name": "t", "run": {"kind": "call"}, "weight": 0}, 1.0), "bad_weight", "positive"),
    (lambda C: C.AddWorkSpec({"name": "t", "run": {"kind": "call"}, "then": "u"}, 1.0), "unknown_spec", "'u'"),
    (lambda C: C.ControlSpec("s", "explode", 1.0), "bad_control", "'explode'"),
    (lambda C: C.ControlSpec("s", "weight", 1.0, -1), "bad_weight", "positive"),
    (lambda C: C.ControlSpec("s", "prioritize", 1.0, "high"), "bad_control", "integer"),
])
def test_bad_work_commands_are_refused_and_change_nothing(command, code, fragment):
    ledger = Ledger()
    ledger_apply(ledger, C.AddWorkSpec({"name": "s", "run": {"kind": "call"}}, 0.0))
    ledger_apply(ledger, C.AddUnits("s", [["k0", b"x"]], 0.0))
    before = ledger.work.to_state()
    got = ledger_apply(ledger, command(C))
    assert not got.ok and got.code == code and fragment in got.text
    assert ledger.state.counters[f"refused.{code}"] == 1
    assert ledger.work.to_state() == before  # nothing half-applied


# ---- dispatch: units as tasks through the ledger -------------------------------------------------


def test_units_are_handed_out_fenced_finished_lost_and_chained_through_the_ledger():
    ledger = Ledger()
    ledger_apply(ledger, C.AddWorkSpec({"name": "parse", "run": {"kind": "call", "program": b"fn"}}, 0.0))
    ledger_apply(ledger, C.AddWorkSpec({"name": "fetch", "run": {"kind": "command", "argv": ["sh", "-c", "echo $WORK_KEY"]},
                                        "then": "parse", "max_attempts": 2}, 0.0))
    ledger_apply(ledger, C.AddUnits("fetch", [[f"u{k}", b"data %d" % k] for k in range(5)], 0.0))
    fetch, parse = spec_id("fetch"), spec_id("parse")
    ready = views.ready_tasks(ledger.state, ledger.work, 3)
    assert ready == [(fetch, 0), (fetch, 1), (fetch, 2)]
    assert views.ready_tasks(ledger.state, ledger.work, 3, exclude=set(ready)) == [(fetch, 3), (fetch, 4)]  # proposed ones are skipped
    got = ledger_apply(ledger, C.AssignTasks(1, 1, "b1", ready, 10.0))
    assert [a[:2] for a in got.value["assigned"]] == ready and got.value["skipped"] == []
    order = views.task_order(ledger.state, ledger.work, fetch, 1)
    assert order["arguments"]["env"] == {"WORK_KEY": "u1", "WORK_DATA": "data 1", "WORK_SPEC": "fetch"}
    assert order["run"]["argv"] == ["sh", "-c", "echo $WORK_KEY"]
    assert sorted((j, t) for j, t, _ in views.open_assignments(ledger.state, ledger.work)) == ready
    done = C.CompleteTask(fetch, 0, 1, 1, C.DONE, "w1", {"stdout": b"page 0\n"}, None, None, 11.0)
    assert ledger_apply(ledger, done).code == "recorded"
    assert ledger_apply(ledger, done).code == "duplicate"  # a resent result: acknowledged, not recorded twice
    stale = C.CompleteTask(fetch, 1, 1, 99, C.DONE, "w1", {}, None, None, 11.0)
    assert ledger_apply(ledger, stale).code == "stale_fence"
    lost = C.CompleteTask(fetch, 1, 1, 2, C.LOST, "w2", {}, None, None, 12.0)
    assert ledger_apply(ledger, lost).code == "recorded"
    rows = {r["spec"]: r for r in ledger.work.summary()}
    assert (rows["fetch"]["finished"], rows["fetch"]["pending"], rows["fetch"]["available"]) == (1, 1, 3)
    assert (rows["parse"]["available"], ledger.work.tables["parse"].data[0]) == (1, b"page 0\n")  # chained
    assert [(a.worker, a.outcome) for a in ledger.work.tables["fetch"].attempts_of(1)] == [("w2", "lost")]
    # the chained unit goes out as a call with (key, data) as its arguments
    (nxt,) = [t for t in views.ready_tasks(ledger.state, ledger.work, 10) if t[0] == parse]
    assert pickle.loads(views.task_order(ledger.state, ledger.work, *nxt)["arguments"]["args"]) == (("u0", b"page 0\n"), {})
    again = Ledger.restore(ledger.snapshot())  # fences and leases survive a snapshot
    assert sorted(views.open_assignments(again.state, again.work), key=lambda x: x[1])[0][2].fence_sequence == 3
    assert ledger_apply(again, C.CompleteTask(fetch, 2, 1, 3, C.FAILED, "w1", {}, None, "boom", 13.0)).ok
    assert again.work.tables["fetch"].state.data[2] == AVAILABLE  # its first attempt of 2 failed


def test_ready_tasks_share_the_slots_among_specs_by_weight_and_priority():
    ledger = Ledger()
    for name, keys in (("light", {"weight": 1}), ("heavy", {"weight": 3}), ("urgent", {"priority": 9, "max_running": 2})):
        ledger_apply(ledger, C.AddWorkSpec({"name": name, "run": {"kind": "call"}, **keys}, 0.0))
        ledger_apply(ledger, C.AddUnits(name, units(100, name), 0.0))
    ready = views.ready_tasks(ledger.state, ledger.work, 10)
    count = {name: sum(1 for j, _ in ready if j == spec_id(name)) for name in ("light", "heavy", "urgent")}
    assert count == {"urgent": 2, "heavy": 6, "light": 2}  # urgent first, to its max; then 3:1 (ties by name)


def test_a_unit_lost_again_and_again_fails_at_max_lost_not_max_attempts():
    t = UnitTable()
    t.add(units(1))
    for n in range(1, 5):
        t.lease(1, f"w{n}", now=float(n), lease_s=10)
        state = t.end(0, LOST, n + 0.5, max_attempts=1, reason=(f"worker w{n} lost", ""), max_lost=4)
        assert state == (FAILED if n == 4 else AVAILABLE) and t.lost.data[0] == n
    assert t.attempts_of(0)[-1].reason == "lost 4 times: its workers kept failing (max_lost); the last: worker w4 lost"
    assert t.retry([0]) == 1 and t.lost.data[0] == 0  # a fresh budget of both kinds
    t.lease(1, "w5", now=9.0, lease_s=10)
    assert t.end(0, FAILED_OUTCOME, 9.5, max_attempts=1, max_lost=4) == FAILED
    check_invariants(t)


def test_leases_that_end_are_taken_back_by_the_leader_and_late_results_refused():
    ledger = Ledger()
    ledger_apply(ledger, C.AddWorkSpec({"name": "s", "run": {"kind": "call"}, "lease_s": 30, "max_attempts": 1,
                                        "max_lost": 2}, 0.0))
    ledger_apply(ledger, C.AddUnits("s", units(3), 0.0))
    sid = spec_id("s")
    ledger_apply(ledger, C.AssignTasks(1, 1, "b1", views.ready_tasks(ledger.state, ledger.work, 2), 100.0))
    assert not ledger.work.has_expired(129.0) and ledger.work.has_expired(131.0)
    assert ledger_apply(ledger, C.ExpireLeases(131.0)).value == {"expired": 2}
    late = C.CompleteTask(sid, 0, 1, 1, C.DONE, "w-stuck", {}, None, None, 140.0)
    assert ledger_apply(ledger, late).code == "stale_fence"  # its lease was taken back
    assert [a.outcome for a in ledger.work.tables["s"].attempts_of(0)] == ["lost"]
    ledger_apply(ledger, C.AssignTasks(1, 10, "b1", views.ready_tasks(ledger.state, ledger.work, 3), 150.0))
    assert ledger_apply(ledger, C.ExpireLeases(200.0)).value == {"expired": 3}
    assert ledger.work.summary()[0]["failed"] == 2  # units 0 and 1: their second lease ended too


# ---- redundant execution ---------------------------------------------------------------------------


def _replica(ledger, sid, uid, worker, digest, fence, now, stdout=None):
    """Assign unit ``uid`` (its next replica) and report it done on ``worker`` with ``digest``."""
    got = ledger_apply(ledger, C.AssignTasks(1, fence, "b1", [(sid, uid)], now))
    assert [a[:2] for a in got.value["assigned"]] == [(sid, uid)], got
    summary = {"stdout": stdout if stdout is not None else b"out " + digest, "digest": digest}
    return ledger_apply(ledger, C.CompleteTask(sid, uid, 1, fence, C.DONE, worker, summary, None, None, now + 1))


def test_each_unit_runs_on_distinct_workers_and_the_quorum_decides():
    ledger = Ledger()
    ledger_apply(ledger, C.AddWorkSpec({"name": "collect", "run": {"kind": "call"}}, 0.0))
    ledger_apply(ledger, C.AddWorkSpec({"name": "s", "run": {"kind": "command", "argv": ["x"]}, "replicas": 3,
                                        "then": "collect"}, 0.0))
    ledger_apply(ledger, C.AddUnits("s", units(2), 0.0))
    sid, t = spec_id("s"), ledger.work.tables["s"]
    assert ledger.work.specs["s"].quorum == 2  # a majority by default
    assert views.task_order(ledger.state, ledger.work, sid, 0)["avoid"] == [] and views.task_order(ledger.state, ledger.work, sid, 0)["arguments"]["compare"] == "bytes"
    # unit 0: w1 and w2 agree, w3 (wrong) does not; the replicas follow each other
    assert _replica(ledger, sid, 0, "w1", b"A" * 16, 1, 10.0).ok
    assert t.state.data[0] == AVAILABLE and views.ready_tasks(ledger.state, ledger.work, 1) == [(sid, 0)]  # first in line again
    assert views.task_order(ledger.state, ledger.work, sid, 0)["avoid"] == ["w1"]
    assert _replica(ledger, sid, 0, "w3", b"B" * 16, 2, 12.0).ok
    assert views.task_order(ledger.state, ledger.work, sid, 0)["avoid"] == ["w1", "w3"]
    assert _replica(ledger, sid, 0, "w2", b"A" * 16, 3, 14.0).ok
    assert t.state.data[0] == FINISHED
    assert ledger.work.tables["collect"].data == [b"out " + b"A" * 16]  # the quorum's output goes on
    row = {r["spec"]: r for r in ledger.work.summary()}["s"]
    assert (row["finished"], row["disputed"], row["replicas"], row["quorum"]) == (1, 1, 3, 2)
    view = ledger.work.units_view("s", disputed=True)["units"]
    assert [u["unit"] for u in view] == [0]
    assert view[0]["ballots"] == {"votes": [["w1", "41" * 16], ["w3", "42" * 16], ["w2", "41" * 16]],
                                  "winner": "41" * 16, "disputed": True}
    # unit 1: three different results, no quorum: failed, the votes kept; a retry starts it over
    for k, (w, d) in enumerate((("w1", b"C"), ("w2", b"D"), ("w3", b"E"))):
        assert _replica(ledger, sid, 1, w, d * 16, 10 + k, 20.0 + k).ok
    assert t.state.data[1] == FAILED and t.disputes[1][0] is None
    assert len(ledger.work.tables["collect"]) == 1  # nothing went on from a unit without a quorum
    snap = Ledger.restore(ledger.snapshot())
    assert snap.work.tables["s"].to_state() == t.to_state()
    assert ledger_apply(ledger, C.ControlSpec("s", "retry", 30.0)).value == {"retried": 1}
    assert (t.state.data[1], t.votes.data[1], views.task_order(ledger.state, ledger.work, sid, 1).get("avoid")) == (AVAILABLE, 0, [])
    check_invariants(t)


def test_a_replica_lost_or_reported_twice_by_one_worker_does_not_count():
    ledger = Ledger()
    ledger_apply(ledger, C.AddWorkSpec({"name": "s", "run": {"kind": "call"}, "replicas": 2, "max_attempts": 2}, 0.0))
    ledger_apply(ledger, C.AddUnits("s", units(1), 0.0))
    sid, t = spec_id("s"), ledger.work.tables["s"]
    assert _replica(ledger, sid, 0, "w1", b"A" * 16, 1, 1.0).ok
    ledger_apply(ledger, C.AssignTasks(1, 2, "b1", [(sid, 0)], 3.0))
    assert ledger_apply(ledger, C.CompleteTask(sid, 0, 1, 2, C.LOST, "w2", {}, None, None, 4.0)).ok
    assert (t.state.data[0], t.votes.data[0]) == (AVAILABLE, 1)  # lost: max_lost's budget, not max_attempts
    assert _replica(ledger, sid, 0, "w1", b"A" * 16, 3, 5.0).ok  # the same worker again: no second vote
    assert (t.state.data[0], t.votes.data[0]) == (AVAILABLE, 1)  # one attempt of its own, of 2
    assert _replica(ledger, sid, 0, "w1", b"A" * 16, 4, 5.5).ok
    assert (t.state.data[0], t.votes.data[0]) == (FAILED, 1)  # and that used up the budget
    assert [a.outcome for a in t.attempts_of(0)] == ["done", "lost", "done", "done"]
    # with a budget left, the unit finishes once a second worker agrees
    ledger_apply(ledger, C.ControlSpec("s", "retry", 6.0))
    assert _replica(ledger, sid, 0, "w1", b"A" * 16, 5, 7.0).ok and _replica(ledger, sid, 0, "w2", b"A" * 16, 6, 9.0).ok
    assert t.state.data[0] == FINISHED and 0 not in t.disputes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "lease", "end", "vote", "expire", "retry"]), st.integers(0, 30),
                          st.integers(0, 2)), max_size=60))
def test_any_sequence_with_votes_keeps_the_table_consistent(ops):
    run_ops(ops, validate_spec({"name": "s", "run": {"kind": "call"}, "replicas": 3, "max_attempts": 2}))


def test_the_worker_digests_whole_outputs_as_the_spec_compares_them():
    from worker.tasks import output_digest

    assert output_digest(b"a\nb\n", "bytes") != output_digest(b"a \nb\n\n", "bytes")
    assert output_digest(b"a\nb\n", "text") == output_digest(b"a  \nb\n\n\n", "text") != output_digest(b"b\na\n", "text")
    assert output_digest(b'{"x": 1, "y": [2]}', "json") == output_digest(b'{"y":[2],\n "x":1}', "json")
    assert output_digest(b'{"x": 1}', "json") != output_digest(b'{"x": 2}', "json")
    assert output_digest(b"not json", "json") == output_digest(b"not json", "json") != output_digest(b"not json!", "json")
    assert len(output_digest(b"x" * 10**6, "bytes")) == 16


# ---- continuous specs ------------------------------------------------------------------------------


def test_a_continuous_spec_gets_a_unit_every_interval_while_none_waits_or_runs():
    ledger = Ledger()
    ledger_apply(ledger, C.AddWorkSpec({"name": "poll", "run": {"kind": "call"}, "continuous": True, "interval": 60}, 0.0))
    ledger_apply(ledger, C.AddWorkSpec({"name": "batch", "run": {"kind": "call"}}, 0.0))
    work, t0 = ledger.work, 1_790_000_000.0
    assert work.due(t0) == ["poll"]  # never run: due at once; a plain spec never is
    assert ledger_apply(ledger, C.MakeUnits(["poll", "batch"], t0)).value == {"made": ["poll/2026-09-21T14:13:20.000Z"]}
    assert ledger_apply(ledger, C.MakeUnits(["poll"], t0)).value == {"made": []}  # a repeated proposal makes nothing
    assert work.due(t0 + 120) == []  # its unit waits: no second one
    sid = spec_id("poll")
    ledger_apply(ledger, C.AssignTasks(1, 1, "b1", views.ready_tasks(ledger.state, ledger.work, 5), t0 + 1))
    ledger_apply(ledger, C.CompleteTask(sid, 0, 1, 1, C.DONE, "w1", {}, None, None, t0 + 2))
    assert work.due(t0 + 59) == [] and work.due(t0 + 60) == ["poll"]  # the interval counts from the last unit made
    ledger_apply(ledger, C.ControlSpec("poll", "pause", t0 + 60))
    assert work.due(t0 + 61) == []  # paused: nothing made
    ledger_apply(ledger, C.ControlSpec("poll", "resume", t0 + 61))
    assert ledger_apply(ledger, C.MakeUnits(["poll"], t0 + 61.5)).value == {"made": ["poll/2026-09-21T14:14:21.500Z"]}
    again = Ledger.restore(ledger.snapshot())  # when it last ran survives a snapshot
    assert again.work.due(t0 + 200) == [] and again.work.specs["poll"].last_made == t0 + 61.5
    assert work.summary()[1]["continuous"] == 60.0 and work.summary()[0]["continuous"] is None


# ---- persisted formats, invariants, the split modules ---------------------------------------------


def golden_work() -> bytes:
    """A small work state through every kind of change (a redundant spec with a dispute and
    kept ballots, a chained unit, a batch key, an expired lease, a continuous spec, a pause)."""
    w = WorkState()
    w.add_spec({"name": "collect", "run": {"kind": "call"}})
    w.add_spec({"name": "s", "run": {"kind": "command", "argv": ["x"]}, "replicas": 3, "then": "collect",
                "max_attempts": 2, "priority": 2, "weight": 1.5})
    w.add_spec({"name": "poll", "run": {"kind": "call"}, "continuous": True, "interval": 60})
    w.add_units("s", [["a", b"1"], ["b", b"2", 5], ["c", b"3"]], b"batch-1")
    w.make_units(["poll"], 1_790_000_000.0)
    sid, seq = spec_id("s"), 0
    for worker, digest in (("w1", b"A"), ("w2", b"B"), ("w3", b"A"), ("w1", b"C")):
        ((_, uid),) = w.ready(1)
        seq += 1
        w.assign([(sid, uid, (1, seq))], "b1", 10.0 + seq)
        w.complete(sid, uid, (1, seq), DONE, worker, b"out", 11.0 + seq, digest * 16)
    w.assign([(sid, 2, (1, seq + 1))], "b1", 20.0)
    w.expire(400.0)
    w.control("s", "pause")
    w.validate_state()
    return msgspec.msgpack.encode(w.to_state())


def test_the_snapshot_form_and_the_persisted_numbers_do_not_change():
    # the digest of golden_work()'s snapshot as master/workspec.py wrote it before the split (849
    # lines, one module): snapshots and the Raft log outlive any version of this code
    blob = golden_work()
    state = msgspec.msgpack.decode(blob)
    # the attempts' reasons came later (master.reasons), as one key a table has only when an
    # attempt failed; without it, the form is the one pinned before
    assert state["tables"]["s"].pop("reasons") == [[4, "lease expired: no report from b1 in time (its worker lost, or too slow)", ""]]
    # so did the count of lost attempts (max_lost), as a column a table has only once one was lost
    assert np.frombuffer(state["tables"]["s"].pop("lost"), np.uint8).tolist() == [0, 0, 1]
    older = msgspec.msgpack.encode(state)
    assert hashlib.blake2b(older, digest_size=16).hexdigest() == "de842aa8d6d872112db78efc07acf5f3"
    assert msgspec.msgpack.encode(WorkState.from_state(state).to_state()) == older  # a snapshot from before reasons loads
    assert hashlib.blake2b(blob, digest_size=16).hexdigest() == "c03ea694c27903e57e483c0fc1a2e694"  # with "lost"
    assert msgspec.msgpack.encode(WorkState.from_state(msgspec.msgpack.decode(blob)).to_state()) == blob
    assert [(s.name, int(s)) for s in UnitState] == [("AVAILABLE", 0), ("PENDING", 1), ("FINISHED", 2), ("FAILED", 3)]
    assert [(o.name, int(o)) for o in AttemptOutcome] == [("DONE", 0), ("LOST", 1), ("FAILED", 2)]
    assert [(o.name, int(o)) for o in C.Outcome] == [("DONE", 0), ("FAILED", 1), ("CANCELLED", 2), ("LOST", 3)]
    assert C.OUTCOMES == {0: "done", 1: "failed", 2: "cancelled", 3: "lost"}
    assert all(type(k) is int for k in C.OUTCOMES)  # plain ints: refusal texts list them as numbers
    assert (DONE, LOST, FAILED_OUTCOME, AVAILABLE, PENDING, FINISHED, FAILED) == (0, 1, 2, 0, 1, 2, 3)
    t = UnitTable()
    t.add(units(1))
    assert list(t.to_state()) == ["keys", "data", "workers", "available", "open", "ballots", "outputs", "disputes",
                                  "state", "priority", "attempts", "lease_until", "holder", "h_unit", "h_worker",
                                  "h_start", "h_end", "h_outcome", "fence_term", "fence_seq", "votes"]


def test_a_task_outcome_maps_to_a_unit_attempt_outcome():
    assert [AttemptOutcome.of_task(o) for o in C.Outcome] == [DONE, FAILED_OUTCOME, FAILED_OUTCOME, LOST]
    assert C.encode(C.CompleteTask(b"j" * 16, 0, 1, 1, C.LOST, "w", {}, None, None, 0.0)) == \
        C.encode(C.CompleteTask(b"j" * 16, 0, 1, 1, 3, "w", {}, None, None, 0.0))  # the enum encodes as its number


@pytest.mark.parametrize("corrupt,fragment", [
    (lambda t: t.counts.__setitem__(0, 9), "counts"),
    (lambda t: t.available[0].append(1), "not available"),
    (lambda t: t.available[0].popleft(), "not queued"),
    (lambda t: t.available.__setitem__(7, deque()), "empty queue"),
    (lambda t: t.holder.data.__setitem__(3, -1), "without holder"),
    (lambda t: t.lease_until.data.__setitem__(4, 5.0), "a lease on a unit not pending"),
    (lambda t: t.history.open.pop(3), "open"),
    (lambda t: t.index.__setitem__("u0", 4), "key index"),
    (lambda t: t.votes.data.__setitem__(4, 1), "more votes than attempts"),
    (lambda t: t.votes.data.__setitem__(3, 1), "lost its ballots"),
    (lambda t: t.history.outcome.data.__setitem__(2, -1), "open"),
])
def test_validate_state_finds_a_broken_table(corrupt, fragment):
    t = UnitTable()
    t.add(units(6))
    t.lease(2, "w1", 0.0, 10.0)
    assert t.lease(2, "w2", 1.0, 10.0) == [2, 3]
    t.end(2, DONE, 2.0, max_attempts=3)
    check_invariants(t)
    corrupt(t)
    with pytest.raises(AssertionError, match=fragment):
        t.validate_state()


def test_an_illegal_transition_is_a_clear_error():
    t = UnitTable()
    t.add(units(2))
    t.lease(1, "w1", 0.0, 10.0)
    t.end(0, DONE, 1.0, max_attempts=3)
    with pytest.raises(IllegalTransition, match=r"\[0\] leased while not available"):
        t._start(np.array([0]), "w2", 2.0, 10.0)  # a finished unit leased again: a bug, not a refusal
    with pytest.raises(IllegalTransition, match="PENDING to PENDING"):
        t._settle(0, PENDING)
    assert TRANSITIONS[FINISHED] == frozenset()


@pytest.mark.parametrize("module", ["workspec", "work_specs", "work_units", "work_history", "work_quorum",
                                    "work_share"])
def test_the_work_modules_touch_no_io(module):
    path = Path(__file__).resolve().parents[2] / "master" / f"{module}.py"
    assert not imported_roots(path) & FORBIDDEN
