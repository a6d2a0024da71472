"""Property tests of the ledger: random command sequences against a model, determinism, round trips."""

from __future__ import annotations

import random
from typing import Any

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from master import jobs, views
from master.commands import (
    CANCELLED,
    DONE,
    FAILED,
    LOST,
    AssignTasks,
    Barrier,
    Batch,
    CancelJob,
    CompleteTask,
    DropFile,
    RegisterFile,
    ReleaseFile,
    SubmitJob,
    decode,
    encode,
)
from master.ledger import Ledger, spec_digest

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def jid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def key_of(n: int) -> bytes:
    return (10_000 + n).to_bytes(16, "big")


def fid(n: int) -> bytes:
    return (20_000 + n).to_bytes(16, "big")


def substance(ledger: Ledger) -> bytes:
    """The snapshot without the bookkeeping a refusal bumps (``applied``, counters)."""
    return msgspec.msgpack.encode(msgspec.structs.replace(ledger.state, applied=0, counters={}))


def wavefront_oracle(job) -> set[int]:
    """An active wavefront job's live tiles: not done, with the tiles above and to the left done."""
    src = job.source
    out = set()
    for t in range(src.rows * src.cols):
        r, c = divmod(t, src.cols)
        if not src.is_done(t) and (r == 0 or src.is_done(t - src.cols)) and (c == 0 or src.is_done(t - 1)):
            out.add(t)
    return out


@st.composite
def job_bodies(draw) -> tuple[str, dict[str, Any]]:
    """A small valid (kind, spec)."""
    kind = draw(st.sampled_from(jobs.KINDS))
    spec: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "priority": st.integers(-1, 1),
                "max_attempts": st.integers(1, 3),
                "max_lost": st.integers(1, 3),
                "keep_results": st.booleans(),
                "reduce": st.sampled_from(
                    [{}, {"max": "score"}, {"sum": ["score"]}, {"max": "score", "sum": ["score", "cells"]}]
                ),
                # a run names a kind the workers run (master.runs), and keys of its own
                "run": st.dictionaries(st.text(max_size=4).map("x".__add__), st.integers(0, 9), max_size=2).map(
                    lambda d: {**d, "kind": "call"}),
                "retry_failed": st.booleans(),
                "fail_fast": st.booleans(),
            },
        )
    )
    if kind == "list":
        arguments = st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2)
        spec["tasks"] = draw(st.lists(arguments, min_size=1, max_size=5))
    elif kind == "range":
        spec["count"] = draw(st.integers(1, 6))
    else:
        spec["rows"], spec["cols"] = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        spec["depends"] = draw(st.sampled_from(jobs.DEPENDS))
        if spec["depends"] == "wavefront" and spec.get("fail_fast") is False:
            del spec["fail_fast"]  # refused: a wavefront stops at its first failed tile
    return kind, spec


# ---- (a) a state machine against a model ---------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    """Random submits, assignments, completions, cancels and files; the model tracks what was recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.term = 1
        self.made = 0  # job ids and keys handed out
        self.bodies: dict[bytes, tuple[str, dict[str, Any], bytes]] = {}  # key → (kind, spec, job id)
        self.jobs: list[bytes] = []
        self.attempts: list[tuple[bytes, int, tuple[int, int]]] = []  # every token handed out
        self.recorded: set[tuple[bytes, int]] = set()
        self.failed: set[tuple[bytes, int]] = set()  # tasks failed for good
        self.recorded_commands: list[CompleteTask] = []
        self.now = 0.0

    def apply(self, entry):
        """Apply through the log encoding; a refusal must leave the state's substance alone."""
        self.now += 1.0
        before = substance(self.ledger)
        result = self.ledger.apply(decode(encode(entry)))
        event(f"{type(entry).__name__}: {result.code}")
        if not result.ok:
            assert result.text, result
            assert substance(self.ledger) == before, result
        return result

    def submit_body(self, kind: str, spec: dict[str, Any], key: bytes, job: bytes):
        return self.apply(SubmitJob(job, key, spec_digest(kind, spec), kind, spec, "client", self.now))

    @initialize(body=job_bodies())
    def first_job(self, body) -> None:
        self.submit(body, reuse=False, same=False)

    @rule(body=job_bodies(), reuse=st.booleans(), same=st.booleans())
    def submit(self, body, reuse: bool, same: bool) -> None:
        kind, spec = body
        self.made += 1
        job = jid(self.made)
        if reuse and self.bodies:
            key = sorted(self.bodies)[self.made % len(self.bodies)]
            old_kind, old_spec, old_job = self.bodies[key]
            if same:
                kind, spec = old_kind, old_spec
            r = self.submit_body(kind, spec, key, job)
            if spec_digest(kind, spec) == spec_digest(old_kind, old_spec):
                assert r.ok and r.value == {"job": old_job, "created": False}
            else:
                assert r.code == "idempotency_conflict"
            assert job not in self.ledger.state.jobs
            return
        key = key_of(self.made)
        r = self.submit_body(kind, spec, key, job)
        assert r.ok and r.value == {"job": job, "created": True}, r
        self.bodies[key] = (kind, spec, job)
        self.jobs.append(job)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), limit=st.integers(0, 8), extra=st.integers(0, 6))
    def assign(self, data, limit: int, extra: int) -> None:
        ready = views.ready_tasks(self.ledger.state, self.ledger.work, limit)
        picked = data.draw(st.lists(st.sampled_from(ready), min_size=1, unique=True)) if ready else []
        if extra < 3:  # and something that may well not be ready
            picked.append((self.jobs[extra % len(self.jobs)], extra))
        self.assign_tasks(picked)

    def assign_tasks(self, picked: list[tuple[bytes, int]]) -> None:
        ready = views.ready_tasks(self.ledger.state, self.ledger.work, 1_000)
        t0, s0 = self.ledger.state.fence
        term, seq = (self.term, 1) if self.term > t0 else (t0, s0 + 1)
        r = self.apply(AssignTasks(term, seq, "balancer", picked, self.now))
        assert r.ok
        assigned = {(j, t): f for j, t, f in r.value["assigned"]}
        assert set(ready) & set(picked) <= set(assigned)
        assert [f for f in assigned.values()] == sorted(assigned.values())
        for (j, t), f in assigned.items():
            assert f >= (term, seq)
            task = self.ledger.state.jobs[j].tasks[t]
            assert task.state == "assigned" and (task.attempts[-1].fence_term, task.attempts[-1].fence_sequence) == f
            self.attempts.append((j, t, f))

    @precondition(lambda self: self.jobs and self.ledger.state.fence > (0, 0))
    @rule(back=st.integers(0, 2), limit=st.integers(0, 3))
    def assign_with_a_stale_fence(self, back: int, limit: int) -> None:
        t0, s0 = self.ledger.state.fence
        term, seq = [(t0, s0), (t0, max(s0 - 1, 0)), (t0 - 1, s0 + 5)][back]
        ready = views.ready_tasks(self.ledger.state, self.ledger.work, limit)
        r = self.apply(AssignTasks(term, seq, "old-leader", ready, self.now))
        assert r.code == "stale_fence"

    def open_tokens(self) -> list[tuple[bytes, int, tuple[int, int]]]:
        return [(j, t, (a.fence_term, a.fence_sequence)) for j, t, a in views.open_assignments(self.ledger.state, self.ledger.work)]

    @precondition(lambda self: self.attempts)
    @rule(data=st.data(), outcome=st.sampled_from([DONE, DONE, DONE, FAILED, LOST, CANCELLED]), any_token=st.integers(0, 3))
    def complete(self, data, outcome: int, any_token: int) -> None:
        """Mostly a running attempt; sometimes any token ever handed out (ended, superseded, cancelled)."""
        running = self.open_tokens()
        job, task, fence = data.draw(st.sampled_from(running if running and any_token else self.attempts))
        self.complete_one(job, task, fence, outcome)

    @precondition(lambda self: self.jobs)
    @rule()
    def work_a_round(self) -> None:
        """Hand out up to 4 ready tasks; then every running attempt ends, most of them well.
        (Hypothesis tries rules without arguments first, so this one has none: outcomes cycle.)"""
        self.assign_tasks(views.ready_tasks(self.ledger.state, self.ledger.work, 4))
        for i, (job, task, fence) in enumerate(self.open_tokens()):
            self.complete_one(job, task, fence, [DONE, DONE, DONE, FAILED, DONE, LOST][(i + len(self.attempts)) % 6])

    def complete_one(self, job: bytes, task: int, fence: tuple[int, int], outcome: int) -> None:
        summary = {"score": task % 3, "cells": 1}
        files = [[fid(100 + task), 1, ["s1"], "out"]] if task % 2 else []  # the same file for each job's task
        c = CompleteTask(job, task, fence[0], fence[1], outcome, "worker", summary, fid(task), None, self.now, files)
        was_recorded = (job, task) in self.recorded
        r = self.apply(c)
        assert r.ok, r  # a real token is never refused
        if was_recorded:
            assert r.code == "duplicate", r
        elif r.code == "recorded":
            assert outcome == DONE
            self.recorded.add((job, task))
            self.recorded_commands.append(c)
        else:
            assert r.code in ("retry", "failed", "ignored"), r
            assert r.code == "ignored" or outcome != DONE
        if r.code in ("retry", "failed"):
            record = self.ledger.state.jobs[job]
            attempts = record.tasks[task].attempts
            own = sum(a.outcome not in (None, DONE, LOST) for a in attempts)
            lost = sum(a.outcome == LOST for a in attempts)
            final = (own == record.spec["max_attempts"] or lost == record.spec["max_lost"]
                     or (outcome == FAILED and not record.spec["retry_failed"]))
            assert final is (r.code == "failed"), (own, lost, r)
            if r.code == "failed":
                self.failed.add((job, task))
            if record.spec["fail_fast"] or r.code == "retry":
                assert record.state == ("failed" if r.code == "failed" else "active")
            else:  # the job goes on, or every task has ended
                assert record.state == "active" or record.done + record.failed == record.total
        if r.code in ("recorded", "failed") and files:
            if task in self.ledger.state.jobs[job].tasks:
                assert self.ledger.state.named[job][f"task-{task}.out"] == fid(100 + task)
            else:  # a tile read by nobody more is folded at once, its files released with it
                assert f"task-{task}.out" not in self.ledger.state.named.get(job, {})

    @precondition(lambda self: self.recorded_commands)
    @rule(data=st.data())
    def complete_again(self, data) -> None:
        c = data.draw(st.sampled_from(self.recorded_commands))
        c = msgspec.structs.replace(c, worker="another", summary={"score": 100}, result_file=fid(999))
        dups = self.ledger.state.counters.get("duplicate_completions", 0)
        assert self.apply(c).code == "duplicate"
        assert self.ledger.state.counters["duplicate_completions"] == dups + 1
        task = self.ledger.state.jobs[c.job_id].tasks.get(c.task_id)
        assert task is None or (task.result_file, task.summary["score"]) == (fid(c.task_id), c.task_id % 3)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), task=st.integers(0, 12), outcome=st.sampled_from([DONE, FAILED, LOST]), ahead=st.integers(1, 3))
    def complete_with_a_bogus_fence(self, data, task: int, outcome: int, ahead: int) -> None:
        job = data.draw(st.sampled_from(self.jobs))
        t0, s0 = self.ledger.state.fence
        r = self.apply(CompleteTask(job, task, t0, s0 + ahead, outcome, "liar", {}, None, None, self.now))
        if (job, task) in self.recorded:
            assert r.code == "duplicate"
        elif task >= self.ledger.state.jobs[job].total:
            assert r.code == "unknown_task"
        else:
            assert r.code == "stale_fence"

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), now=st.integers(0, 2))
    def cancel(self, data, now: int) -> None:
        if now:  # cancels are rare: most jobs should get to run
            return
        job_id = data.draw(st.sampled_from(self.jobs))
        was = self.ledger.state.jobs[job_id].state
        r = self.apply(CancelJob(job_id, "test", self.now))
        job = self.ledger.state.jobs[job_id]
        assert r.value["changed"] is (was == "active")
        assert job.state == ("cancelled" if was == "active" else was)
        if was == "active":
            # (failed ones too: a fail_fast: false job goes on past its failed tasks)
            assert not job.ready and all(t.state in ("done", "cancelled", "failed") for t in job.tasks.values())

    @rule(
        n=st.integers(0, 3),
        size=st.integers(1, 2),
        replicas=st.lists(st.sampled_from(["s1", "s2", "s3"]), max_size=3),
        owner=st.integers(0, 3),
        bad_id=st.booleans(),
    )
    def register_file(self, n: int, size: int, replicas: list[str], owner: int, bad_id: bool) -> None:
        owner_id = None if owner == 0 else jid(owner)
        file_id = b"short" if bad_id else fid(n)
        known = self.ledger.state.files.get(file_id)
        r = self.apply(RegisterFile(file_id, size, replicas, owner_id, self.now))
        expect_ok = (
            not bad_id
            and (owner_id is None or owner_id in self.ledger.state.jobs)
            and bool(replicas)
            and (known is None or known.size == size)
        )
        assert r.ok is expect_ok, r
        if r.ok:
            assert set(replicas) <= set(self.ledger.state.files[file_id].replicas)

    @rule(n=st.integers(0, 3), now=st.integers(0, 1))
    def drop_file(self, n: int, now: int) -> None:
        if now:
            return
        known = fid(n) in self.ledger.state.files
        assert self.apply(DropFile(fid(n), self.now)).ok is known
        assert fid(n) not in self.ledger.state.files

    @rule(n=st.integers(0, 3), owner=st.integers(0, 3), every=st.booleans())
    def release_file(self, n: int, owner: int, every: bool) -> None:
        owner_id = None if owner == 0 else jid(owner)
        key = b"" if owner_id is None else owner_id
        if every:
            if owner_id is None:
                assert not self.apply(ReleaseFile(None, None, self.now)).ok
                return
            held = [f for f, rec in self.ledger.state.files.items() if key in rec.refs]
            r = self.apply(ReleaseFile(None, owner_id, self.now))
            assert r.ok and r.value["released"] == len(held)
            assert all(key not in rec.refs for rec in self.ledger.state.files.values())
            return
        record = self.ledger.state.files.get(fid(n))
        referenced = record is not None and key in record.refs
        only = referenced and len(record.refs) == 1
        r = self.apply(ReleaseFile(fid(n), owner_id, self.now))
        assert r.ok is referenced, r
        if r.ok:
            assert (fid(n) not in self.ledger.state.files) is only
            assert r.value["dropped"] == ([fid(n)] if only else [])

    @rule(now=st.integers(0, 2))
    def new_leader(self, now: int) -> None:
        if now:  # rare, too
            return
        self.term += 1
        assert self.apply(Barrier(self.term, f"master-{self.term}", self.now)).value == {"term": self.term}

    # ---- invariants ----

    @invariant()
    def state_is_valid(self) -> None:
        self.ledger.validate_state()

    @invariant()
    def each_task_is_recorded_at_most_once(self) -> None:
        for job_id in self.jobs:
            job = self.ledger.state.jobs[job_id]
            assert job.done == sum(1 for j, _ in self.recorded if j == job_id)
            for task_id, task in job.tasks.items():
                assert (task.state == "done") == ((job_id, task_id) in self.recorded)
        for job_id, task_id in self.recorded:
            assert self.ledger.state.jobs[job_id].source.is_done(task_id)

    @invariant()
    def endings_are_the_recorded_and_the_failed_tasks(self) -> None:
        for job_id in self.jobs:
            job = self.ledger.state.jobs[job_id]
            ended = {t for j, t in self.recorded | self.failed if j == job_id}
            assert set(job.endings) == ended and job.endings_dropped == 0  # (small jobs: nothing trimmed)
            assert job.failed == sum(1 for j, _ in self.failed if j == job_id)
            if job.state == "done":
                assert not job.failed and job.done == job.total
            if job.state == "failed" and not job.spec["fail_fast"]:
                assert job.done + job.failed == job.total and f"{job.failed} of {job.total} tasks failed" in job.error

    @invariant()
    def every_assigned_task_has_an_open_attempt(self) -> None:
        handed = {(j, t, f) for j, t, f in self.attempts}
        for job_id in self.jobs:
            for task_id, task in self.ledger.state.jobs[job_id].tasks.items():
                if task.state == "assigned":
                    a = task.open_attempt()
                    assert a is not None and (job_id, task_id, (a.fence_term, a.fence_sequence)) in handed
        for job_id, task_id, attempt in views.open_assignments(self.ledger.state, self.ledger.work):
            assert attempt is not None and self.ledger.state.jobs[job_id].tasks[task_id].state == "assigned"

    @invariant()
    def wavefront_holds_exactly_its_frontier(self) -> None:
        for job in self.ledger.state.jobs.values():
            if job.state == "active" and isinstance(job.source, jobs.GridSource) and job.source.wavefront:
                live = {t for t, task in job.tasks.items() if task.state in ("ready", "assigned")}
                assert live == wavefront_oracle(job)
                for t in live:  # every input is still held, above then left
                    inputs = [t - job.source.cols] * (t >= job.source.cols) + [t - 1] * (t % job.source.cols > 0)
                    assert views.task_order(self.ledger.state, self.ledger.work, job.job_id, t)["inputs"] == [fid(i) for i in inputs]

    @invariant()
    def snapshot_restores_an_equal_state(self) -> None:
        data = self.ledger.snapshot()
        restored = Ledger.restore(data)
        assert restored.state == self.ledger.state
        assert restored.snapshot() == data


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=50, stateful_step_count=40, **SETTINGS)


# ---- (b) determinism and the log encoding --------------------------------------------------


def make_log(rng: random.Random, steps: int) -> list:
    """A plausible log (with refusals, duplicates and stale tokens), built against a driver ledger."""
    driver, log = Ledger(), []
    attempts: list[tuple[bytes, int, tuple[int, int]]] = []
    state = {"term": 1, "jobs": 0, "now": 0.0}

    def emit(c):
        state["now"] += rng.random()
        log.append(c)
        return driver.apply(c)

    for _ in range(steps):
        op = rng.choice(["submit"] * 3 + ["assign"] * 4 + ["complete"] * 5 + ["cancel", "file", "drop", "barrier", "bogus"])
        jobs_known = [jid(n) for n in range(1, state["jobs"] + 1)]
        now = state["now"]
        if op == "submit":
            kind = rng.choice(jobs.KINDS + ("bogus",))
            spec = {"count": rng.randint(0, 5), "rows": rng.randint(1, 3), "cols": rng.randint(1, 3),
                    "depends": rng.choice(jobs.DEPENDS), "tasks": [{"i": i} for i in range(rng.randint(0, 3))],
                    "max_attempts": rng.randint(1, 2), "reduce": {"max": "score", "sum": ["cells"]},
                    "retry_failed": rng.random() < 0.5, "fail_fast": rng.random() < 0.5}
            n = state["jobs"] + 1
            key = key_of(rng.randint(1, n))  # sometimes a reused key
            r = emit(SubmitJob(jid(n), key, spec_digest(kind, spec), kind, spec, "c", now))
            if r is not None and r.ok and r.value["created"]:
                state["jobs"] = n
        elif op == "assign":
            t0, s0 = driver.state.fence
            stale = rng.random() < 0.15 and (t0, s0) > (0, 0)
            term, seq = (t0, s0) if stale else ((state["term"], 1) if state["term"] > t0 else (t0, s0 + 1))
            r = emit(AssignTasks(term, seq, "b", views.ready_tasks(driver.state, driver.work, rng.randint(0, 5)), now))
            if r is not None and r.ok:
                attempts += r.value["assigned"]
        elif op == "complete" and attempts:
            job, task, (ft, fs) = rng.choice(attempts)
            outcome = rng.choice([DONE, DONE, DONE, FAILED, LOST])
            summary = {"score": rng.randint(0, 9), "cells": rng.random()}
            files = [[fid(rng.randint(0, 5)), rng.randint(1, 2), ["a"], rng.choice(["out", "err"])]] * rng.randint(0, 1)
            emit(CompleteTask(job, task, ft, fs, outcome, "w", summary, fid(rng.randint(0, 99)), None, now, files))
        elif op == "cancel" and jobs_known:
            emit(CancelJob(rng.choice(jobs_known), "", now))
        elif op == "file":
            owner = rng.choice([None, jid(1), jid(2)])
            replicas = rng.sample(["a", "b", "c"], rng.randint(0, 2))
            emit(RegisterFile(fid(rng.randint(0, 3)), rng.randint(1, 2), replicas, owner, now))
        elif op == "drop":
            emit(DropFile(fid(rng.randint(0, 3)), now))
        elif op == "barrier":
            state["term"] += rng.randint(0, 1)
            emit(Barrier(state["term"], "m", now))
        elif op == "bogus" and jobs_known:
            t0, s0 = driver.state.fence
            emit(CompleteTask(rng.choice(jobs_known), rng.randint(0, 9), t0, s0 + 1, DONE, "w", {}, None, None, now))
    return log


@settings(max_examples=60, **SETTINGS)
@given(rng=st.randoms(use_true_random=False), steps=st.integers(1, 80), data=st.data())
def test_the_same_log_gives_the_same_snapshot_bytes(rng, steps, data):
    log = make_log(rng, steps)
    a, b = Ledger(), Ledger()
    results_a = [a.apply(c) for c in log]
    results_b = []
    for c in log:
        wire = encode(c)
        assert decode(wire) == c
        results_b.append(b.apply(decode(wire)))
        b.validate_state()
    assert results_a == results_b
    assert a.snapshot() == b.snapshot() and a.state.applied == len(log)

    cuts = sorted(data.draw(st.lists(st.integers(0, len(log)), max_size=6)))
    batched, results_c, start = Ledger(), [], 0
    for end in cuts + [len(log)]:
        batch = Batch(log[start:end])
        assert decode(encode(batch)) == batch
        results_c += batched.apply(decode(encode(batch)))
        start = end
    assert results_c == results_a
    assert batched.snapshot() == a.snapshot()


bytes16 = st.binary(min_size=16, max_size=16)
wire_ints = st.integers(-(2**63), 2**64 - 1)
tokens = st.integers(-1, 12) | st.integers(-(2**63), 2**63 - 1)  # a token near 2**64 overflows: see test_ledger.py
small_ints = st.integers(-1, 12)
floats = st.floats(allow_nan=False)
texts = st.text(max_size=10)
job_ids = st.sampled_from([jid(1), jid(2), jid(3)]) | bytes16
summaries = st.dictionaries(texts, msgpack_values, max_size=3)
file_entries = st.tuples(bytes16 | st.binary(max_size=17), small_ints | wire_ints, st.lists(texts, max_size=2), texts).map(list)
task_files = st.lists(file_entries | st.lists(msgpack_values, max_size=5), max_size=3)
commands = st.one_of(
    st.builds(
        SubmitJob, job_ids, bytes16, bytes16, st.sampled_from(jobs.KINDS) | texts, summaries, texts, floats
    ),
    st.builds(CancelJob, job_ids, texts, floats),
    st.builds(AssignTasks, tokens, tokens, texts, st.lists(st.tuples(job_ids, small_ints | wire_ints), max_size=4), floats),
    st.builds(
        CompleteTask, job_ids, small_ints | wire_ints, small_ints, small_ints, st.integers(-1, 4) | wire_ints,
        texts, summaries, st.none() | bytes16, st.none() | texts, floats, task_files,
    ),
    st.builds(RegisterFile, bytes16 | st.binary(max_size=20), wire_ints, st.lists(texts, max_size=3), st.none() | job_ids, floats),
    st.builds(DropFile, bytes16, floats),
    st.builds(Barrier, wire_ints, texts, floats),
)


@settings(max_examples=100, **SETTINGS)
@given(st.lists(commands, max_size=6))
def test_every_command_and_batch_round_trips_through_the_log_encoding(cmds):
    for c in cmds:
        assert decode(encode(c)) == c
    assert decode(encode(Batch(cmds))) == Batch(cmds)


def _seeded_ledger() -> Ledger:
    """Three jobs with some history, for arbitrary commands to hit."""
    ledger = Ledger()
    bodies = [("range", {"count": 4, "max_attempts": 1}), ("grid", {"rows": 2, "cols": 3}), ("list", {"tasks": [{}, {}]})]
    for n, (kind, spec) in enumerate(bodies, 1):
        ledger.apply(SubmitJob(jid(n), key_of(n), spec_digest(kind, spec), kind, spec, "c", 0.0))
    ledger.apply(AssignTasks(1, 1, "b", views.ready_tasks(ledger.state, ledger.work, 6), 0.0))
    ledger.apply(CompleteTask(jid(1), 0, 1, 1, DONE, "w", {}, None, None, 0.0))
    return ledger


SEEDED = _seeded_ledger().snapshot()


@settings(max_examples=150, **SETTINGS)
@given(st.lists(commands, min_size=1, max_size=8))
def test_arbitrary_commands_never_raise_and_refusals_change_nothing(cmds):
    ledger = Ledger.restore(SEEDED)
    for c in cmds:
        before = substance(ledger)
        r = ledger.apply(decode(encode(c)))
        assert r.ok or (r.code and r.text)
        if not r.ok:
            assert substance(ledger) == before, r
        ledger.validate_state()


# ---- (c) refusals of garbage specs ---------------------------------------------------------

VALID = {"list": {"tasks": [{"a": 1}]}, "range": {"count": 3}, "grid": {"rows": 2, "cols": 2}}
FIELDS = ["tasks", "count", "rows", "cols", "depends", "priority", "max_attempts", "run", "reduce", "keep_results",
          "retry_failed", "fail_fast"]
REQUIRED = {"list": ["tasks"], "range": ["count"], "grid": ["rows", "cols"]}


@st.composite
def corrupted(draw) -> tuple[str, dict[str, Any]]:
    """A valid spec with one field removed or set to an arbitrary value."""
    kind = draw(st.sampled_from(jobs.KINDS))
    spec = dict(VALID[kind])
    field = draw(st.sampled_from(FIELDS))
    if draw(st.booleans()):
        spec.pop(field, None)
    else:
        spec[field] = draw(msgpack_values)
    return kind, spec


garbage = st.one_of(
    corrupted(),
    st.tuples(st.sampled_from(jobs.KINDS) | st.text(max_size=8), st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6)),
)


@settings(max_examples=150, **SETTINGS)
@given(garbage)
def test_refused_submissions_leave_the_ledger_unchanged(body):
    kind, spec = body
    ledger = Ledger.restore(SEEDED)
    before = ledger.snapshot()
    c = decode(encode(SubmitJob(jid(50), key_of(50), spec_digest(kind, spec), kind, spec, "c", 1.0)))
    r = ledger.apply(c)
    ledger.validate_state()
    missing = kind in jobs.KINDS and any(f not in spec for f in REQUIRED[kind])
    if kind not in jobs.KINDS:
        assert r.code == "unknown_kind" and repr(kind) in r.text
    elif missing:  # (priority, max_attempts and run are checked first)
        named = REQUIRED[kind] + ["priority", "max_attempts", "run"]
        assert r.code == "bad_run" or (r.code == "bad_spec" and any(f"'{f}'" in r.text for f in named)), r
    if r.ok:
        assert r.value == {"job": jid(50), "created": True}
        spec_held = ledger.state.jobs[jid(50)].spec
        assert isinstance(spec_held["priority"], int) and 1 <= spec_held["max_attempts"] <= jobs.MAX_ATTEMPTS
        return
    assert r.code in ("unknown_kind", "bad_spec", "bad_run", "spec_too_large") and r.text
    restored_before = Ledger.restore(before)
    assert substance(ledger) == substance(restored_before)
    assert ledger.state.applied == restored_before.state.applied + 1
    assert ledger.state.counters[f"refused.{r.code}"] == restored_before.state.counters.get(f"refused.{r.code}", 0) + 1
    assert key_of(50) not in ledger.state.keys and jid(50) not in ledger.state.jobs


# ---- the two budgets: a task's own failures (max_attempts) and its lost attempts (max_lost) ---------


@settings(max_examples=200, **SETTINGS)
@given(st.integers(1, 5), st.integers(1, 12), st.lists(st.sampled_from([FAILED, LOST]), min_size=1, max_size=20),
       st.booleans())
def test_a_task_fails_only_when_one_budget_is_used_up(max_attempts, max_lost, outcomes, retry_failed):
    """However lost and failed attempts interleave, the task is retried while it has failed fewer
    than ``max_attempts`` times of its own and been lost fewer than ``max_lost`` times (and, with
    ``retry_failed: false``, not failed at all), and fails at the attempt that uses one up, with
    the reason of the budget it used up: lost attempts never use ``max_attempts``."""
    ledger = Ledger()
    spec = {"count": 1, "max_attempts": max_attempts, "max_lost": max_lost, "retry_failed": retry_failed}
    assert ledger.apply(SubmitJob(jid(1), key_of(1), spec_digest("range", spec), "range", spec, "c", 1.0)).ok
    own = lost = 0
    for n, outcome in enumerate(outcomes):
        ((_, _, fence),) = ledger.apply(AssignTasks(1, n + 1, "b", [(jid(1), 0)], 2.0 + n)).value["assigned"]
        r = ledger.apply(CompleteTask(jid(1), 0, fence[0], fence[1], outcome, "w", {}, None, "why", 2.5 + n))
        own += outcome == FAILED
        lost += outcome == LOST
        spent = own >= max_attempts or lost >= max_lost or (outcome == FAILED and not retry_failed)
        assert r.code == ("failed" if spent else "retry"), (own, lost, r)
        if spent:
            job = ledger.state.jobs[jid(1)]
            assert job.state == "failed" and job.failed_attempts == n + 1
            assert ("lost" in job.error.split(":")[0]) is (outcome == LOST), job.error
            return
    assert lost < max_lost and ledger.state.jobs[jid(1)].state == "active"


@settings(max_examples=50, **SETTINGS)
@given(st.integers(1, 100), st.integers(1, 3))
def test_fewer_lost_attempts_than_max_lost_never_fail_a_task(max_lost, max_attempts):
    ledger = Ledger()
    spec = {"count": 1, "max_attempts": max_attempts, "max_lost": max_lost}
    assert ledger.apply(SubmitJob(jid(1), key_of(1), spec_digest("range", spec), "range", spec, "c", 1.0)).ok
    for n in range(max_lost):
        ((_, _, fence),) = ledger.apply(AssignTasks(1, n + 1, "b", [(jid(1), 0)], 2.0)).value["assigned"]
        r = ledger.apply(CompleteTask(jid(1), 0, fence[0], fence[1], LOST, "w", {}, None, None, 3.0))
        assert r.code == ("failed" if n + 1 == max_lost else "retry"), (n, r)
    assert ledger.state.jobs[jid(1)].error.startswith(f"task 0 lost {max_lost} time")
