"""The worker registry and dispatch: life cycle, bad input, credit, capabilities, locality,
fairness and the stories that explain each decision (synchronous, no sockets, no sleeps)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.dispatch import Dispatcher, DispatchError, Need, Task
from balancer.registry import Capabilities, Registry, RegistryError
from tests.unit.test_purity import FORBIDDEN, imported_roots

ROOT = Path(__file__).resolve().parents[2]
CPU = Capabilities(cores=4, memory_mb=8192)
GPU = Capabilities(cores=8, memory_mb=32768, gpus=1, labels=frozenset({"gpu"}), kernel="sw-avx2")
JOB_A, JOB_B = b"A" * 16, b"B" * 16


def fid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def task(job: bytes = JOB_A, n: int = 0, need: Need = Need(), inputs=(), sizes=(), priority: int = 0, fence=(1, 0)):
    return Task(job, n, fence, need, tuple(inputs), tuple(sizes), priority)


def registry(*workers: tuple[str, Capabilities, int], liveness: float = 3.0) -> Registry:
    reg = Registry(liveness)
    for name, caps, slots in workers:
        reg.register(name, name.encode(), caps, slots, now=0.0)
    return reg


@pytest.mark.parametrize("module", ["balancer/registry.py", "balancer/dispatch.py"])
def test_cores_import_no_io(module):
    assert not imported_roots(ROOT / module) & FORBIDDEN


# ---- registry life cycle ---------------------------------------------------------------------


def test_register_heartbeat_credit_and_cache():
    reg = Registry(liveness=3.0)
    assert reg.register("w1", b"r1", CPU, 4, now=1.0, cached=[fid(1)]) == []
    w = reg.get("w1")
    assert (w.slots, w.free, w.cached, w.registered_at, w.last_heard) == (4, 4, {fid(1)}, 1.0, 1.0)
    reg.sent("w1", (JOB_A, 0), (1, 1))
    reg.sent("w1", (JOB_A, 1), (1, 2))
    assert w.free == 2 and w.running == {(JOB_A, 0): (1, 1), (JOB_A, 1): (1, 2)}
    assert reg.finished("w1", (JOB_A, 0)) == (1, 1)
    assert reg.finished("w1", (JOB_A, 0)) is None  # a duplicate result
    assert w.free == 3  # the result gives its slot back; a duplicate does not
    reg.heartbeat("w1", 2.0, free=3, cached_add=[fid(2), fid(3)], cached_drop=[fid(1)])
    assert (w.free, w.cached, w.last_heard) == (3, {fid(2), fid(3)}, 2.0)
    reg.heartbeat("w1", 2.5, free=3, cached_drop=[fid(9)])  # dropping an unknown id is harmless
    assert reg.status() == {"workers": 1, "slots": 4, "free": 3, "running": 1, "cached_files": 2, "registered": 1}
    assert reg.free_total() == 3 and len(reg) == 1 and "w1" in reg
    reg.validate_state()


def test_no_send_beyond_credit():
    reg = registry(("w1", CPU, 1))
    reg.sent("w1", (JOB_A, 0), (1, 0))
    with pytest.raises(RegistryError) as e:
        reg.sent("w1", (JOB_A, 1), (1, 1))
    assert e.value.code == "no_credit"
    assert reg.get("w1").running == {(JOB_A, 0): (1, 0)}


def test_expiry_returns_running_tasks_as_lost():
    reg = registry(("w1", CPU, 2), ("w2", CPU, 2), liveness=3.0)
    reg.sent("w1", (JOB_A, 5), (1, 0))
    reg.sent("w1", (JOB_A, 2), (1, 1))
    reg.heartbeat("w2", 2.0, free=2)
    assert reg.expire(3.0) == []  # silent exactly `liveness`: still alive
    gone = reg.expire(3.5)
    assert [(w.name, lost) for w, lost in gone] == [("w1", [(JOB_A, 2), (JOB_A, 5)])]
    assert [w.name for w in reg.workers()] == ["w2"]
    assert reg.newest_fence((JOB_A, 2)) is None
    assert reg.status()["expired"] == 1 and reg.status()["lost_tasks"] == 2
    reg.validate_state()


def test_restart_with_a_new_route_loses_the_old_tasks():
    reg = registry(("w1", CPU, 2))
    reg.sent("w1", (JOB_A, 0), (1, 0))
    # same route: an update of what it offers, its tasks stay
    assert reg.register("w1", b"w1", GPU, 3, now=1.0) == []
    assert reg.get("w1").caps == GPU and reg.get("w1").running == {(JOB_A, 0): (1, 0)}
    # new route: the worker restarted
    assert reg.register("w1", b"w1-again", CPU, 2, now=2.0, running={(JOB_B, 7): (1, 3)}) == [(JOB_A, 0)]
    w = reg.get("w1")
    assert (w.route, w.running, w.registered_at, w.free) == (b"w1-again", {(JOB_B, 7): (1, 3)}, 2.0, 2)
    assert reg.newest_fence((JOB_B, 7)) == ("w1", (1, 3)) and reg.newest_fence((JOB_A, 0)) is None
    assert reg.status()["restarts"] == 1
    reg.validate_state()


def test_a_newer_fence_replaces_an_older_one():
    reg = registry(("w1", CPU, 3))
    reg.sent("w1", (JOB_A, 0), (1, 4))
    with pytest.raises(RegistryError) as e:
        reg.sent("w1", (JOB_A, 0), (1, 4))
    assert e.value.code == "stale_fence"
    reg.sent("w1", (JOB_A, 0), (2, 0))
    assert reg.get("w1").running == {(JOB_A, 0): (2, 0)} and reg.get("w1").free == 1


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda r: r.heartbeat("nobody", 1.0, free=1), "unknown_worker"),
        (lambda r: r.heartbeat("w1", 1.0, free=-1), "bad_credit"),
        (lambda r: r.heartbeat("w1", 1.0, free=5), "bad_credit"),
        (lambda r: r.heartbeat("w1", 1.0, free=1, cached_add=[b"short"]), "bad_file_id"),
        (lambda r: r.heartbeat("w1", 1.0, free=1, cached_add=[fid(1)], cached_drop=[fid(1)]), "bad_cache_change"),
        (lambda r: r.sent("nobody", (JOB_A, 0), (1, 0)), "unknown_worker"),
        (lambda r: r.sent("w1", (JOB_A, 0), (1,)), "bad_fence"),
        (lambda r: r.sent("w1", ("job", 0), (1, 0)), "bad_task"),
        (lambda r: r.finished("nobody", (JOB_A, 0)), "unknown_worker"),
        (lambda r: r.register("", b"r", CPU, 1, 1.0), "bad_name"),
        (lambda r: r.register("w1", b"", CPU, 1, 1.0), "bad_route"),
        (lambda r: r.register("w9", b"r", Capabilities(cores=-1), 1, 1.0), "bad_capabilities"),
        (lambda r: r.register("w9", b"r", CPU, -2, 1.0), "bad_slots"),
        (lambda r: r.register("w9", b"r", CPU, 2, 1.0, free=3), "bad_credit"),
        (lambda r: r.register("w1", b"new", CPU, 2, 1.0, cached=[b"x" * 15]), "bad_file_id"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(call, code):
    reg = registry(("w1", CPU, 4))
    reg.heartbeat("w1", 0.5, free=2, cached_add=[fid(1)])
    before = (reg.status(), [(w.name, w.route, w.caps, w.free, set(w.cached), dict(w.running), w.last_heard)
                             for w in reg.workers()])
    with pytest.raises(RegistryError) as e:
        call(reg)
    assert isinstance(e.value, ValueError) and e.value.code == code and e.value.text
    after = (reg.status(), [(w.name, w.route, w.caps, w.free, set(w.cached), dict(w.running), w.last_heard)
                            for w in reg.workers()])
    assert after[1] == before[1]
    assert after[0].pop(f"refused.{code}") == 1 and after[0] == before[0]


def test_dispatcher_refuses_bad_tasks():
    d = Dispatcher()
    d.add(task(n=1), 0.0)
    for bad, code in [
        (task(n=1), "duplicate"),
        (task(n=2, inputs=[b"short"]), "bad_task"),
        (task(n=2, inputs=[fid(1)], sizes=[1, 2]), "bad_task"),
        (task(n=2, need=Need(cores=-1)), "bad_task"),
        (task(n=2, fence=(1,)), "bad_task"),
    ]:
        with pytest.raises(DispatchError) as e:
            d.add(bad, 0.0)
        assert e.value.code == code
    assert d.pending() == 1
    d.validate_state()


# ---- dispatch ----------------------------------------------------------------------------------


def test_capability_matching():
    reg = registry(("cpu1", CPU, 4), ("gpu1", GPU, 1))
    d = Dispatcher()
    d.add(task(n=0, need=Need(gpus=1, labels=frozenset({"gpu"}))), 0.0)
    d.add(task(n=1, need=Need(cores=6)), 0.0)
    d.add(task(n=2, need=Need(memory_mb=4096)), 0.0)
    d.add(task(n=3, need=Need(kernel="sw-avx2")), 0.0)
    d.add(task(n=4, need=Need(kernel="sw-avx512")), 0.0)
    placed = {p.task.task: p.worker_name for p in d.place(reg, 1.0)}
    # gpu1 has one slot: the GPU task (oldest) takes it; tasks 1 and 3 fit only gpu1
    assert placed == {0: "gpu1", 2: "cpu1"}
    assert d.story(JOB_A, 1) == "waiting: the one worker that can run it (gpu1) has no free slot"
    assert d.story(JOB_A, 4) == "waiting: no worker runs kernel 'sw-avx512'"
    reg.heartbeat("gpu1", 2.0, free=1)
    assert [(p.task.task, p.worker_name) for p in d.place(reg, 2.0)] == [(1, "gpu1")]
    d.validate_state()
    reg.validate_state()


def test_an_unplaceable_task_does_not_block_its_job():
    reg = registry(("cpu1", CPU, 3))
    d = Dispatcher()
    d.add(task(n=0, need=Need(labels=frozenset({"gpu"}))), 0.0)
    for n in range(1, 4):
        d.add(task(n=n), 0.0)
    assert [p.task.task for p in d.place(reg, 1.0)] == [1, 2, 3]
    assert d.story(JOB_A, 0) == "waiting: no worker has label 'gpu'"
    assert d.pending() == 1


def test_a_replica_avoids_the_workers_that_ran_its_unit_and_does_not_block_the_rest():
    reg = registry(("w1", CPU, 2), ("w2", CPU, 1))
    d = Dispatcher()
    d.add(task(n=0, need=Need(avoid=frozenset({"w1", "w2"}))), 0.0)  # both ran it: it waits
    d.add(task(n=1, need=Need(avoid=frozenset({"w2"}))), 0.0)
    d.add(task(n=2, need=Need(avoid=frozenset({"w1"}))), 0.0)
    d.add(task(n=3), 0.0)
    placed = {p.task.task: p.worker_name for p in d.place(reg, 1.0)}
    assert placed == {1: "w1", 2: "w2", 3: "w1"}
    assert "already ran a replica of this unit (w1, w2)" in d.story(JOB_A, 0)
    assert "not on w1, w2" in Need(avoid=frozenset({"w2", "w1"})).text()
    d.validate_state()


def test_locality_prefers_the_worker_holding_the_inputs():
    reg = registry(("w1", CPU, 4), ("w2", CPU, 4), ("w3", CPU, 4))
    reg.heartbeat("w2", 0.5, free=3, cached_add=[fid(1), fid(2)])
    reg.heartbeat("w3", 0.5, free=4, cached_add=[fid(1)])
    d = Dispatcher()
    d.add(task(n=0, inputs=[fid(1), fid(2)], sizes=[1 << 20, 2 << 20]), 0.0)
    [p] = d.place(reg, 1.0)
    assert p.worker_name == "w2"
    assert p.why == d.story(JOB_A, 0) == "sent to w2: 2 of 2 inputs (3.0 MiB) in its cache, 3 slots free"
    assert reg.get("w2").running == {(JOB_A, 0): (1, 0)} and reg.get("w2").free == 2


def test_locality_weighs_bytes_then_count_then_free_then_name():
    reg = registry(("w1", CPU, 4), ("w2", CPU, 4), ("w3", CPU, 4))
    reg.heartbeat("w1", 0.5, free=4, cached_add=[fid(1)])  # holds the big input
    reg.heartbeat("w2", 0.5, free=4, cached_add=[fid(2), fid(3)])  # holds two small ones
    d = Dispatcher()
    d.add(task(n=0, inputs=[fid(1), fid(2), fid(3)], sizes=[100, 10, 10]), 0.0)
    d.add(task(n=1, inputs=[fid(1), fid(2), fid(3)]), 0.0)  # no sizes: the count decides
    d.add(task(n=2), 0.0)  # no inputs: most free credit, then name
    placed = [(p.task.task, p.worker_name) for p in d.place(reg, 1.0)]
    assert placed[:3] == [(0, "w1"), (1, "w2"), (2, "w3")]
    assert d.story(JOB_A, 1) == "sent to w2: 2 of 3 inputs in its cache, 4 slots free"
    assert d.story(JOB_A, 2) == "sent to w3: no inputs, 4 slots free"


def test_locality_falls_back_when_the_holder_has_no_credit():
    reg = registry(("w1", CPU, 2), ("w2", CPU, 2))
    reg.heartbeat("w1", 0.5, free=0, cached_add=[fid(1)])
    d = Dispatcher()
    d.add(task(n=0, inputs=[fid(1)], sizes=[5 << 20]), 0.0)
    [p] = d.place(reg, 1.0)
    assert p.worker_name == "w2"
    assert p.why == "sent to w2: 0 of 1 inputs (0.0 MiB) in its cache, 2 slots free"
    assert reg.get("w1").running == {}


def test_fairness_a_small_job_is_not_starved_by_a_big_one():
    reg = registry(*((f"w{i}", CPU, 1) for i in range(4)))
    d = Dispatcher()
    for n in range(1000):
        d.add(task(JOB_A, n), 0.0)
    for n in range(10):
        d.add(task(JOB_B, n), 1.0)
    order = []
    t = 1.0
    while len(order) < 40:  # one credit at a time: the turn order must persist across calls
        t += 1
        for w in reg.workers():
            reg.heartbeat(w.name, t, free=1)
        w0 = reg.workers()[0]
        for w in reg.workers()[1:]:
            reg.heartbeat(w.name, t, free=0)
        assert w0.free == 1
        order += [p.task.job for p in d.place(reg, t)]
    assert b"".join(order[:20]).count(JOB_B) == 10
    assert order[20:] == [JOB_A] * 20
    d.validate_state()


def test_fairness_round_robin_in_one_call():
    reg = registry(("w1", CPU, 30))
    d = Dispatcher()
    for n in range(1000):
        d.add(task(JOB_A, n), 0.0)
    for n in range(10):
        d.add(task(JOB_B, n), 0.0)
    placed = d.place(reg, 1.0)
    assert len(placed) == 30
    assert [p.task.job for p in placed[:20]] == [JOB_A, JOB_B] * 10
    assert [p.task.task for p in placed if p.task.job == JOB_A] == list(range(20))  # FIFO within a job


def test_priorities_strictly_first():
    reg = registry(("w1", CPU, 5))
    d = Dispatcher()
    for n in range(10):
        d.add(task(JOB_A, n, priority=0), 0.0)
    for n in range(4):
        d.add(task(JOB_B, n, priority=5), 1.0)
    d.add(task(JOB_A, 100, priority=9), 2.0)
    placed = [(p.task.job, p.task.task) for p in d.place(reg, 3.0)]
    assert placed == [(JOB_A, 100), (JOB_B, 0), (JOB_B, 1), (JOB_B, 2), (JOB_B, 3)]
    assert d.status()["priorities"] == [0]


def test_a_higher_priority_task_that_cannot_run_does_not_block_lower_ones():
    reg = registry(("w1", CPU, 2))
    d = Dispatcher()
    d.add(task(JOB_A, 0, need=Need(gpus=2), priority=9), 0.0)
    d.add(task(JOB_B, 0), 0.0)
    assert [p.task.key for p in d.place(reg, 1.0)] == [(JOB_B, 0)]
    assert d.story(JOB_A, 0) == "waiting: no worker has 2 GPUs (the most is 0)"


def test_waiting_stories():
    d = Dispatcher()
    d.add(task(n=0), 0.0)
    assert d.story(JOB_A, 0) == "waiting: not yet considered (no placement round since it arrived)"
    reg = Registry(liveness=3.0)
    assert d.place(reg, 1.0) == []
    assert d.story(JOB_A, 0) == "waiting: no worker registered"
    for i in range(4):
        reg.register(f"w{i}", b"r%d" % i, CPU, 2, now=1.0, free=0)
    reg.register("gpu", b"g", GPU, 1, now=1.0, free=0)
    d.add(task(n=1, need=Need(labels=frozenset({"gpu"}))), 1.0)
    d.add(task(n=2, need=Need(labels=frozenset({"gpu", "fpga", "big"}))), 1.0)
    d.add(task(n=3, need=Need(cores=16, memory_mb=65536)), 1.0)
    d.add(task(n=4, need=Need(cores=8, gpus=1, memory_mb=8192, labels=frozenset())), 1.0)
    d.add(task(n=5, need=Need(cores=8, memory_mb=32768, labels=frozenset({"x"}))), 1.0)
    assert d.place(reg, 2.0) == []  # no credit anywhere: returns at once
    assert d.story(JOB_A, 0) == "waiting: the 5 workers that can run it have no free slot"
    reg.heartbeat("gpu", 2.0, free=0)
    assert d.story(JOB_A, 1) == "waiting: the one worker that can run it (gpu) has no free slot"
    assert d.story(JOB_A, 2) == "waiting: no worker has labels 'big', 'fpga'"
    assert d.story(JOB_A, 3) == ("waiting: no worker has 16 cores (the most is 8); "
                                 "no worker has 65536 MiB of memory (the most is 32768 MiB)")
    assert d.story(JOB_A, 5) == "waiting: no worker has label 'x'"
    reg.register("big", b"b", Capabilities(cores=16, memory_mb=65536), 1, now=2.0, free=0)
    d.add(task(n=6, need=Need(cores=16, gpus=1)), 2.0)
    d.place(reg, 3.0)
    assert d.story(JOB_A, 6) == "waiting: no single worker has all it needs (16 cores, 1 GPU)"
    assert d.story(JOB_A, 99) == "unknown: not pending, and no decision about it is kept"


def test_four_capable_workers_without_credit():
    reg = registry(*((f"w{i}", CPU, 1) for i in range(4)), ("gpu", GPU, 1))
    d = Dispatcher()
    for n in range(6):
        d.add(task(n=n, need=Need(cores=4)), 0.0)
    d.add(task(n=9, need=Need(cores=1)), 0.0)
    d.place(reg, 1.0)
    # 5 capable, 5 slots: five placed, then the two left wait on full workers
    assert d.pending() == 2
    assert d.story(JOB_A, 5) == "waiting: the 5 workers that can run it have no free slot"
    reg2 = registry(*((f"w{i}", CPU, 1) for i in range(4)), ("small", Capabilities(cores=1), 1))
    d2 = Dispatcher()
    for n in range(5):
        d2.add(task(n=n, need=Need(cores=4)), 0.0)
    d2.place(reg2, 1.0)
    assert d2.story(JOB_A, 4) == "waiting: the 4 workers that can run it have no free slot"


def test_remove_and_re_add():
    reg = registry(("w1", CPU, 1))
    d = Dispatcher()
    d.add(task(n=0), 0.0)
    d.add(task(n=1), 0.0)
    assert d.remove(JOB_A, 0) and not d.remove(JOB_A, 0)
    [p] = d.place(reg, 1.0)
    assert p.task.task == 1 and d.pending() == 0
    assert d.status()["pending"] == 0 and d.status()["jobs"] == 0
    # the worker died; the leader pushes the task again with a new fence
    reg.register("w1", b"w1-restarted", CPU, 1, now=2.0)
    d.add(task(n=1, fence=(1, 5)), 2.0)
    assert d.story(JOB_A, 1).startswith("waiting")
    assert [q.worker_name for q in d.place(reg, 3.0)] == ["w1"]
    d.validate_state()


def test_a_task_already_running_under_its_fence_is_not_sent_twice():
    # after a balancer failover the new active one learns running tasks from the workers and
    # outstanding ones from the leader: the two overlap
    reg = Registry(liveness=3.0)
    reg.register("w1", b"w1", CPU, 4, now=0.0, free=3, running={(JOB_A, 0): (2, 7)})
    d = Dispatcher()
    d.add(task(n=0, fence=(2, 7)), 0.0)
    d.add(task(n=1, fence=(2, 8)), 0.0)
    assert [p.task.task for p in d.place(reg, 1.0)] == [1]
    assert d.story(JOB_A, 0) == "dropped: w1 already runs it under fence (2, 7)"
    assert reg.get("w1").free == 2 and d.status()["dropped_running"] == 1


def test_placement_stops_early_without_credit():
    reg = registry(("w1", CPU, 1))
    reg.heartbeat("w1", 0.5, free=0)
    d = Dispatcher()
    for n in range(50_000):
        d.add(task(n=n), 0.0)
    calls = []
    real = Need.fits
    Need.fits = lambda self, caps: calls.append(1) or real(self, caps)  # type: ignore[method-assign]
    try:
        assert d.place(reg, 1.0) == []
    finally:
        Need.fits = real  # type: ignore[method-assign]
    assert calls == []


def test_blocked_tasks_are_not_rescanned():
    reg = registry(("cpu1", CPU, 5), ("cpu2", CPU, 5))
    d = Dispatcher()
    for n in range(10_000):
        d.add(task(JOB_A, n, need=Need(gpus=1)), 0.0)
    for n in range(10_000, 10_020):
        d.add(task(JOB_A, n), 0.0)
    calls = []
    real = Need.fits
    Need.fits = lambda self, caps: calls.append(1) or real(self, caps)  # type: ignore[method-assign]
    try:
        assert len(d.place(reg, 1.0)) == 10
        assert len(d.place(reg, 2.0)) == 0
    finally:
        Need.fits = real  # type: ignore[method-assign]
    assert len(calls) <= 2 * 2  # two distinct needs, two workers, once per call with credit
    assert d.story(JOB_A, 0) == "waiting: no worker has 1 GPU (the most is 0)"


# ---- properties --------------------------------------------------------------------------------

caps_st = st.builds(
    Capabilities,
    cores=st.integers(1, 8),
    memory_mb=st.sampled_from([0, 1024, 4096]),
    gpus=st.integers(0, 2),
    labels=st.frozensets(st.sampled_from(["gpu", "ssd", "big"]), max_size=2),
    kernel=st.sampled_from(["", "k1", "k2"]),
)
need_st = st.builds(
    Need,
    cores=st.integers(1, 8),
    memory_mb=st.sampled_from([0, 1024, 4096, 8192]),
    gpus=st.integers(0, 2),
    labels=st.frozensets(st.sampled_from(["gpu", "ssd", "big"]), max_size=2),
    kernel=st.sampled_from(["", "", "k1", "k2"]),
)
worker_st = st.tuples(caps_st, st.integers(0, 4), st.integers(0, 4), st.frozensets(st.integers(0, 9), max_size=4))
task_st = st.tuples(
    st.integers(0, 3), need_st, st.lists(st.integers(0, 9), max_size=3, unique=True), st.integers(0, 2)
)


@settings(max_examples=150, deadline=None)
@given(st.lists(worker_st, max_size=6), st.lists(task_st, max_size=40), st.integers(1, 4))
def test_credit_capabilities_and_at_most_once(workers, tasks, rounds):
    reg = Registry(liveness=100.0)
    for i, (caps, slots, free, cached) in enumerate(workers):
        reg.register(f"w{i}", b"%d" % i, caps, slots, now=0.0, free=min(free, slots), cached=map(fid, cached))
    d = Dispatcher()
    for n, (job, need, inputs, priority) in enumerate(tasks):
        d.add(Task(b"J%015d" % job, n, (1, n), need, tuple(map(fid, inputs)), (), priority), 0.0)
    placed: set[tuple[bytes, int]] = set()
    for r in range(rounds):
        credit = {w.name: w.free for w in reg.workers()}
        got: dict[str, int] = {}
        out = d.place(reg, float(r))
        for p in out:
            w = reg.get(p.worker_name)
            assert p.task.need.fits(w.caps)
            assert p.task.key not in placed
            placed.add(p.task.key)
            got[p.worker_name] = got.get(p.worker_name, 0) + 1
            assert w.running[p.task.key] == p.task.fence
            assert d.story(*p.task.key) == p.why
        for name, n in got.items():
            assert n <= credit[name]
            assert reg.get(name).free == credit[name] - n
        # maximal: whatever still waits has no capable worker with credit left
        for n, (j, need, _, _) in enumerate(tasks):
            job = b"J%015d" % j
            if (job, n) not in placed:
                assert not any(w.free > 0 and need.fits(w.caps) for w in reg.workers())
                assert d.story(job, n).startswith("waiting: ")
        d.validate_state()
        reg.validate_state()
        for w in reg.workers():  # the workers finish some and grant new credit
            reg.heartbeat(w.name, float(r) + 0.5, free=w.slots)
    assert d.pending() == len(tasks) - len(placed)
