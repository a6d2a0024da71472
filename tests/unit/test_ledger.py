"""The ledger driven directly: commands in, state and ``Applied`` out; no Raft, sockets or clocks.

Every apply goes through ``apply()`` below, which runs ``Ledger.validate_state()`` afterwards.
"""

from __future__ import annotations

import random

import msgspec
import pytest

from master import jobs, views
from master.commands import (
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
from master.ledger import ENDINGS_KEPT, MAX_TASK_FILES, Ledger, spec_digest

NOW = 1_000.0


def jid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def key_of(n: int) -> bytes:
    return (10_000 + n).to_bytes(16, "big")


def fid(n: int) -> bytes:
    return (20_000 + n).to_bytes(16, "big")


def apply(ledger: Ledger, entry):
    result = ledger.apply(entry)
    ledger.validate_state()
    return result


def submit(ledger: Ledger, kind: str, spec, n: int = 1, key: bytes | None = None, now: float = NOW):
    key = key_of(n) if key is None else key
    return apply(ledger, SubmitJob(jid(n), key, spec_digest(kind, spec), kind, spec, "client-1", now))


def assign(ledger: Ledger, tasks, term: int | None = None, seq: int | None = None):
    """Assign with the next fencing token (or the one given)."""
    t0, s0 = ledger.state.fence
    term = max(t0, 1) if term is None else term
    seq = (s0 + 1 if term == t0 else 1) if seq is None else seq
    return apply(ledger, AssignTasks(term, seq, "balancer-1", list(tasks), NOW))


def fences(result) -> dict[tuple[bytes, int], tuple[int, int]]:
    return {(j, t): f for j, t, f in result.value["assigned"]}


def complete(ledger, job, task, fence, outcome=DONE, summary=None, result_file=None, error=None, worker="w1", files=None):
    c = CompleteTask(job, task, fence[0], fence[1], outcome, worker, summary or {}, result_file, error, NOW + 1,
                     [] if files is None else files)
    return apply(ledger, c)


def run_many(ledger, job, tasks, validate: bool = True) -> None:
    """Assign ``tasks`` and complete them well, validating once at the end (not after each
    command: ``validate_state`` is O(tasks), and big jobs would make that quadratic)."""
    t0, s0 = ledger.state.fence
    r = ledger.apply(AssignTasks(max(t0, 1), s0 + 1, "balancer-1", [(job, t) for t in tasks], NOW))
    results = ledger.apply(Batch([CompleteTask(job, t, *f, DONE, "w1", {}, None, None, NOW + 1) for _, t, f in r.value["assigned"]]))
    assert [x.code for x in results] == ["recorded"] * len(tasks)
    if validate:
        ledger.validate_state()


def run_task(ledger, job, task, **kw):
    """Assign one task and complete it."""
    fence = fences(assign(ledger, [(job, task)]))[(job, task)]
    return complete(ledger, job, task, fence, **kw)


def ready(ledger: Ledger, job: bytes) -> list[int]:
    return list(ledger.state.jobs[job].ready)


def substance(ledger: Ledger) -> bytes:
    """The snapshot without the bookkeeping a refusal is allowed to bump (``applied``, counters)."""
    return msgspec.msgpack.encode(msgspec.structs.replace(ledger.state, applied=0, counters={}))


def copy(ledger: Ledger) -> Ledger:
    return Ledger.restore(ledger.snapshot())


def assert_refused(ledger: Ledger, before: Ledger, result, code: str, *fragments: str) -> None:
    """Refused with ``code`` and a text naming ``fragments``; nothing but bookkeeping changed."""
    assert not result.ok and result.code == code, result
    for fragment in fragments:
        assert fragment in result.text, (fragment, result.text)
    assert substance(ledger) == substance(before)
    assert ledger.state.applied == before.state.applied + 1
    changed = {k for k in ledger.state.counters if ledger.state.counters[k] != before.state.counters.get(k)}
    assert f"refused.{code}" in changed
    assert changed <= {f"refused.{code}", "stale_assignments", "stale_completions"}, changed


# ---- submit ---------------------------------------------------------------------------------


def test_submit_list_job_materialises_its_argument_maps_in_order():
    ledger = Ledger()
    tasks = [{"seq": "ACGT"}, {"seq": "GG"}, {"seq": "T"}]
    r = submit(ledger, "list", {"tasks": tasks, "run": {"kind": "call", "fn": "sw"}, "name": "three"})
    assert r.ok and r.value == {"job": jid(1), "created": True}
    assert ready(ledger, jid(1)) == [0, 1, 2]
    assert views.task_order(ledger.state, ledger.work, jid(1), 1) == {"run": {"kind": "call", "fn": "sw"}, "arguments": {"seq": "GG"}, "inputs": []}
    view = views.job_view(ledger.state, jid(1))
    assert (view["name"], view["total"], view["ready"], view["state"], view["priority"]) == ("three", 3, 3, "active", 0)
    spec = ledger.state.jobs[jid(1)].spec
    assert (spec["max_attempts"], spec["keep_results"], spec["reduce"]) == (3, True, {})


def test_submit_range_job_keeps_a_window_and_refills_it():
    ledger = Ledger()
    count = jobs.WINDOW + 6
    assert submit(ledger, "range", {"count": count}).ok
    job = ledger.state.jobs[jid(1)]
    assert len(job.tasks) == jobs.WINDOW and ready(ledger, jid(1))[:3] == [0, 1, 2]
    assert views.task_order(ledger.state, ledger.work, jid(1), 7)["arguments"] == {"index": 7}
    assert run_task(ledger, jid(1), 5).code == "recorded"
    assert jobs.WINDOW in job.tasks and job.tasks[jobs.WINDOW].state == "ready"
    assert job.live == jobs.WINDOW and len(job.tasks) == jobs.WINDOW + 1  # done records are kept
    assert views.task_view(ledger.state, jid(1), count - 1)["state"] == "waiting"


def test_submit_grid_wavefront_starts_at_the_corner_only():
    ledger = Ledger()
    assert submit(ledger, "grid", {"rows": 3, "cols": 4}).ok
    job = ledger.state.jobs[jid(1)]
    assert ready(ledger, jid(1)) == [0] and list(job.tasks) == [0]
    assert job.spec["depends"] == "wavefront" and job.spec["keep_results"] is False
    assert views.task_order(ledger.state, ledger.work, jid(1), 0)["arguments"] == {"row": 0, "col": 0}
    assert views.task_order(ledger.state, ledger.work, jid(1), 6)["arguments"] == {"row": 1, "col": 2}
    assert views.job_view(ledger.state, jid(1))["total"] == 12


def test_submit_grid_without_dependencies_makes_every_tile_ready():
    ledger = Ledger()
    assert submit(ledger, "grid", {"rows": 2, "cols": 3, "depends": "none"}).ok
    assert ready(ledger, jid(1)) == list(range(6))
    for task in reversed(range(1, 6)):  # any order: nothing waits for anything
        assert run_task(ledger, jid(1), task).code == "recorded"
    assert views.footprint(ledger.state)["frontier_entries"] == 5  # done, but above an unfinished task 0
    assert run_task(ledger, jid(1), 0).code == "recorded"
    assert views.footprint(ledger.state)["frontier_entries"] == 0
    job = ledger.state.jobs[jid(1)]
    assert job.state == "done" and job.done == 6 and job.tasks == {}
    assert views.task_view(ledger.state, jid(1), 3)["folded"] is True


def test_resubmit_with_the_same_key_and_body_returns_the_same_job():
    ledger = Ledger()
    spec = {"count": 4}
    assert submit(ledger, "range", spec, n=1, key=key_of(7)).value == {"job": jid(1), "created": True}
    again = submit(ledger, "range", {"count": 4}, n=2, key=key_of(7))  # the leader proposed a fresh job id
    assert again.ok and again.value == {"job": jid(1), "created": False}
    assert list(ledger.state.jobs) == [jid(1)] and ledger.state.counters["submits_deduplicated"] == 1


def test_same_key_with_another_body_is_refused():
    ledger = Ledger()
    submit(ledger, "range", {"count": 4}, key=key_of(7))
    before = copy(ledger)
    r = submit(ledger, "range", {"count": 5}, n=2, key=key_of(7))
    assert_refused(ledger, before, r, "idempotency_conflict", key_of(7).hex(), jid(1).hex(), "fresh key")
    r = submit(ledger, "list", {"tasks": [{}]}, n=2, key=key_of(7))  # another kind, too
    assert r.code == "idempotency_conflict"


def test_a_reused_job_id_is_refused():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1}, n=1, key=key_of(1))
    before = copy(ledger)
    assert_refused(ledger, before, submit(ledger, "range", {"count": 2}, n=1, key=key_of(2)), "duplicate_job_id")


BAD_SUBMISSIONS = [
    ("matrix", {"count": 1}, "unknown_kind", ["'matrix'", "list, range, grid"]),
    ("", {"count": 1}, "unknown_kind", ["''"]),
    ("grid", {"cols": 4}, "bad_spec", ["'rows'"]),
    ("grid", {"rows": 4}, "bad_spec", ["'cols'"]),
    ("grid", {"rows": 2, "cols": 0}, "bad_spec", ["'cols'", "0"]),
    ("grid", {"rows": 2**31, "cols": 2**31}, "bad_spec", ["over"]),
    ("grid", {"rows": 2, "cols": 2, "depends": "diagonal"}, "bad_spec", ["'depends'", "'diagonal'"]),
    ("grid", {"rows": 2, "cols": 2, "keep_files": "rows"}, "bad_spec", ["'keep_files'"]),
    ("grid", {"rows": 2, "cols": 2, "keep_files": ["rows", ""]}, "bad_spec", ["'keep_files'"]),
    ("grid", {"rows": 2, "cols": 2, "keep_files": [3]}, "bad_spec", ["'keep_files'"]),
    ("range", {}, "bad_spec", ["'count'"]),
    ("range", {"count": -1}, "bad_spec", ["'count'", "-1"]),
    ("range", {"count": 0}, "bad_spec", ["'count'"]),
    ("range", {"count": True}, "bad_spec", ["'count'"]),
    ("range", {"count": 2.0}, "bad_spec", ["'count'"]),
    ("range", {"count": 2**40 + 1}, "bad_spec", ["'count'"]),
    ("list", {}, "bad_spec", ["'tasks'"]),
    ("list", {"tasks": []}, "bad_spec", ["'tasks'"]),
    ("list", {"tasks": [{"a": 1}, 2]}, "bad_spec", ["argument maps"]),
    ("list", {"tasks": {"a": {}}}, "bad_spec", ["'tasks'"]),
    ("range", {"count": 1, "reduce": {"min": "score"}}, "bad_spec", ["'reduce'"]),
    ("range", {"count": 1, "reduce": ["max"]}, "bad_spec", ["'reduce'"]),
    ("range", {"count": 1, "reduce": {"max": 3}}, "bad_spec", ["reduce 'max'"]),
    ("range", {"count": 1, "reduce": {"sum": "score"}}, "bad_spec", ["reduce 'sum'"]),
    ("range", {"count": 1, "reduce": {"ties": ["end_b"]}}, "bad_spec", ["reduce 'ties'"]),
    ("range", {"count": 1, "reduce": {"max": "score", "ties": "end_b"}}, "bad_spec", ["reduce 'ties'"]),
    ("range", {"count": 1, "reduce": {"sum": ["a", 1]}}, "bad_spec", ["reduce 'sum'"]),
    ("range", {"count": 1, "max_attempts": 0}, "bad_spec", ["'max_attempts'"]),
    ("range", {"count": 1, "max_attempts": jobs.MAX_ATTEMPTS + 1}, "bad_spec", ["'max_attempts'"]),
    ("range", {"count": 1, "max_attempts": "3"}, "bad_spec", ["'max_attempts'"]),
    ("range", {"count": 1, "max_lost": 0}, "bad_spec", ["'max_lost'", "from 1 to 100"]),
    ("range", {"count": 1, "max_lost": jobs.MAX_LOST + 1}, "bad_spec", ["'max_lost'"]),
    ("range", {"count": 1, "max_lost": True}, "bad_spec", ["'max_lost'"]),
    ("range", {"count": 1, "priority": 2**31}, "bad_spec", ["'priority'"]),
    ("range", {"count": 1, "run": ["sw"]}, "bad_spec", ["'run'"]),
    ("range", {"count": 1, "run": {"kind": "comand", "argv": ["id"]}}, "bad_run", ["'comand'", "command"]),
    ("list", {"tasks": [{}], "run": {"kind": "command", "argv": "id"}}, "bad_run", ["'argv'"]),
    ("list", {"tasks": [{}], "run": {"kind": "call", "timeout_s": -1}}, "bad_run", ["'timeout_s'"]),
    ("range", {"count": 1, "keep_results": 1}, "bad_spec", ["'keep_results'"]),
    ("range", {"count": 1, "retry_failed": 0}, "bad_spec", ["'retry_failed'", "true or false"]),
    ("list", {"tasks": [{}], "fail_fast": "no"}, "bad_spec", ["'fail_fast'", "'no'"]),
    ("grid", {"rows": 2, "cols": 2, "fail_fast": False}, "bad_spec", ["'fail_fast'", "wavefront"]),
    # size is checked before the fields: an oversized spec is refused as such even if also malformed
    ("grid", {"run": {"blob": b"x" * (1 << 20)}}, "spec_too_large", [str(1 << 20), "storage"]),
]


@pytest.mark.parametrize(
    ("kind", "spec", "code", "fragments"), BAD_SUBMISSIONS, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_SUBMISSIONS)]
)
def test_bad_submissions_are_refused_and_change_nothing(kind, spec, code, fragments):
    ledger = Ledger()
    submit(ledger, "range", {"count": 2}, n=9)  # something to leave alone
    before = copy(ledger)
    assert_refused(ledger, before, submit(ledger, kind, spec, n=1), code, *fragments)
    assert submit(ledger, "range", {"count": 1}, n=1).value["created"] is True  # the key was not taken


def test_spec_size_limit_is_inclusive():
    overhead = len(msgspec.msgpack.encode({"count": 1, "run": {"kind": "call", "blob": b"x" * 70_000}})) - 70_000
    at_limit = {"count": 1, "run": {"kind": "call", "blob": b"x" * (jobs.MAX_SPEC_BYTES - overhead)}}
    assert len(msgspec.msgpack.encode(at_limit)) == jobs.MAX_SPEC_BYTES
    ledger = Ledger()
    assert submit(ledger, "range", at_limit, n=1).ok
    over = {"count": 1, "run": {"kind": "call", "blob": b"x" * (jobs.MAX_SPEC_BYTES - overhead + 1)}}
    assert submit(ledger, "range", over, n=2).code == "spec_too_large"


# ---- assignment and completion --------------------------------------------------------------


def test_assignment_with_a_stale_fence_is_refused():
    ledger = Ledger()
    submit(ledger, "range", {"count": 5})
    r = assign(ledger, [(jid(1), 0), (jid(1), 1)], term=2, seq=5)
    assert fences(r) == {(jid(1), 0): (2, 5), (jid(1), 1): (2, 6)} and ledger.state.fence == (2, 6)
    for term, seq in [(2, 6), (2, 3), (1, 100), (0, 0)]:
        before = copy(ledger)
        r = assign(ledger, [(jid(1), 2)], term=term, seq=seq)
        assert_refused(ledger, before, r, "stale_fence", f"({term}, {seq})", "(2, 6)")
    assert ledger.state.jobs[jid(1)].tasks[2].state == "ready"
    assert ledger.state.counters["stale_assignments"] == 4
    r = assign(ledger, [(jid(1), 2)], term=3, seq=0)  # a new leader's term
    assert fences(r) == {(jid(1), 2): (3, 0)}


def test_assignment_skips_what_is_not_ready_but_consumes_the_tokens():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 2, "cols": 2})
    r = assign(ledger, [(jid(1), 0), (jid(1), 0), (jid(1), 3), (jid(9), 0)], term=1, seq=1)
    assert r.value["assigned"] == [(jid(1), 0, (1, 1))]
    assert r.value["skipped"] == [(jid(1), 0), (jid(1), 3), (jid(9), 0)]
    assert ledger.state.fence == (1, 4) and ledger.state.counters["assign_skipped"] == 3
    assert list(views.open_assignments(ledger.state, ledger.work)) == [(jid(1), 0, ledger.state.jobs[jid(1)].tasks[0].attempts[0])]


def test_completion_must_name_an_attempt_of_the_task():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 2, "cols": 2})
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    cases = [
        (jid(1), 0, (f[0], f[1] + 1), DONE, "stale_fence", ["never committed"]),
        (jid(1), 0, (f[0] + 1, f[1]), DONE, "stale_fence", []),
        (jid(1), 3, f, DONE, "stale_fence", ["never assigned"]),  # a tile still waiting
        (jid(1), 4, f, DONE, "unknown_task", ["no task 4"]),
        (jid(1), -1, f, DONE, "unknown_task", []),
        (jid(2), 0, f, DONE, "unknown_job", [jid(2).hex()]),
        (jid(1), 0, f, 7, "bad_outcome", ["7"]),
    ]
    for job, task, fence, outcome, code, fragments in cases:
        before = copy(ledger)
        assert_refused(ledger, before, complete(ledger, job, task, fence, outcome), code, *fragments)
    assert ledger.state.counters["stale_completions"] == 3
    assert complete(ledger, jid(1), 0, f).code == "recorded"


def test_second_completion_is_a_counted_duplicate_and_the_first_result_stays():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2})
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    assert complete(ledger, jid(1), 0, f, summary={"score": 1}, result_file=fid(1)).code == "recorded"
    r = complete(ledger, jid(1), 0, f, summary={"score": 99}, result_file=fid(2), worker="w2")
    assert r.ok and r.code == "duplicate"
    r = complete(ledger, jid(1), 0, (9, 9), outcome=FAILED)  # even a bogus token: the task is done
    assert r.code == "duplicate"
    task = ledger.state.jobs[jid(1)].tasks[0]
    assert (task.result_file, task.summary, task.state) == (fid(1), {"score": 1}, "done")
    assert [(a.outcome, a.worker) for a in task.attempts] == [(DONE, "w1")]
    assert ledger.state.counters["duplicate_completions"] == 2
    assert views.job_view(ledger.state, jid(1))["duplicates"] == 2 and ledger.state.jobs[jid(1)].done == 1


def test_duplicate_completion_of_a_folded_tile_is_recognised():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 1, "cols": 1})
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    assert complete(ledger, jid(1), 0, f).code == "recorded"
    assert ledger.state.jobs[jid(1)].tasks == {}  # folded at once: nobody reads it
    assert complete(ledger, jid(1), 0, f).code == "duplicate"
    assert ledger.state.counters["duplicate_completions"] == 1


def test_failed_attempts_retry_until_max_attempts_then_the_job_fails():
    ledger = Ledger()
    submit(ledger, "range", {"count": 3, "max_attempts": 3})
    for attempt in (1, 2):
        f = fences(assign(ledger, [(jid(1), 1)]))[(jid(1), 1)]
        r = complete(ledger, jid(1), 1, f, outcome=FAILED, error="out of memory")
        assert r.code == "retry" and f"attempt {attempt} of 3" in r.text
        assert ready(ledger, jid(1))[-1] == 1 and ledger.state.jobs[jid(1)].state == "active"
    f = fences(assign(ledger, [(jid(1), 1)]))[(jid(1), 1)]
    r = complete(ledger, jid(1), 1, f, outcome=FAILED, error="out of memory")
    job = ledger.state.jobs[jid(1)]
    assert r.code == "failed" and job.state == "failed"
    assert job.error == "task 1 failed after 3 attempts: out of memory" and r.text == job.error
    assert job.tasks[1].state == "failed" and job.failed_attempts == 3
    assert {job.tasks[t].state for t in (0, 2)} == {"cancelled"} and not job.ready
    assert views.ready_tasks(ledger.state, ledger.work, 10) == [] and ledger.state.counters["jobs_failed"] == 1


def test_lost_attempts_use_max_lost_not_max_attempts():
    # the chaos soak (seed 30): three lost attempts in 11 s failed a command that never failed
    ledger = Ledger()
    submit(ledger, "range", {"count": 1, "max_attempts": 2, "max_lost": 3})
    assert ledger.state.jobs[jid(1)].spec["max_lost"] == 3
    for n in (1, 2):
        r = run_task(ledger, jid(1), 0, outcome=LOST)
        assert r.code == "retry" and r.text == f"attempt {n} lost ({n} of 3 losses allowed)"
    r = run_task(ledger, jid(1), 0, outcome=LOST, error="worker w2 was lost while running it")
    assert r.code == "failed" and r.text == (
        "task 0 lost 3 times: its workers kept failing (max_lost); the last: worker w2 was lost while running it")
    ledger = Ledger()
    submit(ledger, "range", {"count": 1, "max_attempts": 2})
    assert ledger.state.jobs[jid(1)].spec["max_lost"] == jobs.DEFAULT_MAX_LOST == 10
    assert all(run_task(ledger, jid(1), 0, outcome=LOST).code == "retry" for _ in range(9))
    assert run_task(ledger, jid(1), 0, outcome=FAILED).code == "retry", "its first failure of its own"
    r = run_task(ledger, jid(1), 0, outcome=FAILED, error="exit status 4")
    assert r.code == "failed" and r.text == "task 0 failed after 11 attempts: exit status 4"


def test_a_job_from_before_max_lost_gets_the_default():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1, "max_attempts": 1})
    del ledger.state.jobs[jid(1)].spec["max_lost"]  # a spec accepted before the key existed
    assert all(run_task(ledger, jid(1), 0, outcome=LOST).code == "retry" for _ in range(9))
    assert run_task(ledger, jid(1), 0, outcome=LOST).code == "failed"


def test_completions_after_the_job_failed_are_ignored():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2, "max_attempts": 2})
    lost = fences(assign(ledger, [(jid(1), 1)]))[(jid(1), 1)]
    assert complete(ledger, jid(1), 1, lost, outcome=LOST).code == "retry"
    run_task(ledger, jid(1), 0, outcome=FAILED)
    assert run_task(ledger, jid(1), 0, outcome=FAILED).code == "failed"
    assert ledger.state.jobs[jid(1)].tasks[1].state == "cancelled"
    assert complete(ledger, jid(1), 1, lost).code == "ignored"  # the lost attempt turns up after all
    job = ledger.state.jobs[jid(1)]
    assert job.done == 0 and job.tasks[1].state == "cancelled" and job.reduced == {}
    assert ledger.state.counters["late_completions"] == 1


def test_a_failing_job_cancels_its_running_tasks_and_their_late_results_are_ignored():
    """Regression: the running task used to stay 'assigned' and, once its attempt ended, had no open one."""
    ledger = Ledger()
    submit(ledger, "range", {"count": 2, "max_attempts": 1})
    f = fences(assign(ledger, [(jid(1), 0), (jid(1), 1)]))
    assert complete(ledger, jid(1), 0, f[(jid(1), 0)], outcome=FAILED).code == "failed"
    task = ledger.state.jobs[jid(1)].tasks[1]
    assert task.state == "cancelled" and list(views.open_assignments(ledger.state, ledger.work)) == []
    assert complete(ledger, jid(1), 1, f[(jid(1), 1)]).code == "ignored"
    assert task.state == "cancelled" and task.attempts[0].outcome == DONE
    assert ledger.state.jobs[jid(1)].done == 0


def test_lost_attempt_that_finishes_after_reassignment_is_recorded_once():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1})
    old = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    assert complete(ledger, jid(1), 0, old, outcome=LOST, worker="").code == "retry"
    new = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    assert new > old
    r = complete(ledger, jid(1), 0, old, summary={"score": 7}, result_file=fid(1), worker="w-old")
    assert r.code == "recorded"
    r = complete(ledger, jid(1), 0, new, summary={"score": 8}, result_file=fid(2), worker="w-new")
    assert r.code == "duplicate"
    job = ledger.state.jobs[jid(1)]
    assert job.state == "done" and job.done == 1 and job.tasks[0].result_file == fid(1)
    view = views.task_view(ledger.state, jid(1), 0)
    assert [a["outcome"] for a in view["attempts"]] == ["done", "cancelled"]
    assert "superseded" in view["attempts"][1]["error"]
    assert list(views.open_assignments(ledger.state, ledger.work)) == []


def test_lost_attempt_that_finishes_before_reassignment_leaves_the_ready_set():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2})
    old = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    complete(ledger, jid(1), 0, old, outcome=LOST)
    assert ready(ledger, jid(1)) == [1, 0]
    assert complete(ledger, jid(1), 0, old).code == "recorded"
    assert ready(ledger, jid(1)) == [1] and ledger.state.jobs[jid(1)].tasks[0].state == "done"


def test_an_older_attempt_failing_does_not_disturb_the_newer_one():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1})
    old = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    complete(ledger, jid(1), 0, old, outcome=LOST)
    new = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    assert complete(ledger, jid(1), 0, old, outcome=FAILED).code == "ignored"
    job = ledger.state.jobs[jid(1)]
    assert job.tasks[0].state == "assigned" and job.failed_attempts == 1
    assert complete(ledger, jid(1), 0, new).code == "recorded"


def test_cancel_stops_the_job_and_later_completions_are_ignored():
    ledger = Ledger()
    submit(ledger, "range", {"count": 4})
    f = fences(assign(ledger, [(jid(1), 0), (jid(1), 1)]))
    assert complete(ledger, jid(1), 0, f[(jid(1), 0)]).code == "recorded"
    r = apply(ledger, CancelJob(jid(1), "user asked", NOW + 2))
    assert r.value == {"job": jid(1), "state": "cancelled", "changed": True}
    job = ledger.state.jobs[jid(1)]
    assert [job.tasks[t].state for t in range(4)] == ["done", "cancelled", "cancelled", "cancelled"]
    assert job.error == "user asked" and job.finished_at == NOW + 2 and views.ready_tasks(ledger.state, ledger.work, 10) == []
    assert complete(ledger, jid(1), 1, f[(jid(1), 1)]).code == "ignored"
    assert job.done == 1 and job.tasks[1].state == "cancelled" and job.tasks[1].attempts[0].outcome == DONE
    assert assign(ledger, [(jid(1), 2)]).value["skipped"] == [(jid(1), 2)]
    assert apply(ledger, CancelJob(jid(1), "again", NOW)).value["changed"] is False
    before = copy(ledger)
    assert_refused(ledger, before, apply(ledger, CancelJob(jid(2), "", NOW)), "unknown_job")


def test_cancel_of_a_finished_job_changes_nothing():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1})
    run_task(ledger, jid(1), 0)
    r = apply(ledger, CancelJob(jid(1), "late", NOW))
    assert r.value == {"job": jid(1), "state": "done", "changed": False} and ledger.state.jobs[jid(1)].error is None


# ---- grids ----------------------------------------------------------------------------------


def wavefront_ready(rows: int, cols: int, done: set[int], busy: set[int]) -> set[int]:
    """The oracle: tiles not done or running whose upper and left neighbours are done."""
    out = set()
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        if t not in done and t not in busy and (r == 0 or t - cols in done) and (c == 0 or t - 1 in done):
            out.add(t)
    return out


def test_wavefront_readiness_on_a_3x4_grid():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 3, "cols": 4})
    expected_after = {  # tile completed → ready set afterwards (ids: row * 4 + col)
        0: {1, 4},
        1: {4, 2},
        4: {2, 5, 8},  # (1,0) done: (1,1) has (0,1) above, (2,0) has nothing more to wait for
        2: {5, 8, 3},
        5: {8, 3, 6},  # (1,1) done: (1,2) has (0,2); (2,1) still waits for (2,0)
        8: {3, 6, 9},
        6: {3, 9},  # (1,3) still waits for (0,3)
        3: {9, 7},
    }
    assert set(ready(ledger, jid(1))) == {0}
    for tile, expected in expected_after.items():
        assert tile in ready(ledger, jid(1))
        assert run_task(ledger, jid(1), tile).code == "recorded"
        assert set(ready(ledger, jid(1))) == expected, tile
    for tile in (9, 7, 10, 11):
        run_task(ledger, jid(1), tile)
    assert ledger.state.jobs[jid(1)].state == "done"


@pytest.mark.parametrize("seed", range(5))
def test_wavefront_readiness_matches_the_oracle(seed):
    rng = random.Random(seed)
    rows, cols = rng.randint(1, 6), rng.randint(1, 6)
    ledger = Ledger()
    submit(ledger, "grid", {"rows": rows, "cols": cols})
    done: set[int] = set()
    running: dict[int, tuple[int, int]] = {}
    while len(done) < rows * cols:
        assert set(ready(ledger, jid(1))) == wavefront_ready(rows, cols, done, set(running))
        candidates = ready(ledger, jid(1))
        if candidates and (not running or rng.random() < 0.5):
            picked = rng.sample(candidates, rng.randint(1, len(candidates)))
            running.update({t: f for (_, t), f in fences(assign(ledger, [(jid(1), t) for t in picked])).items()})
        else:
            tile = rng.choice(sorted(running))
            assert complete(ledger, jid(1), tile, running.pop(tile)).code == "recorded"
            done.add(tile)
    assert ledger.state.jobs[jid(1)].state == "done" and ledger.state.jobs[jid(1)].tasks == {}


def test_grid_results_are_passed_to_their_readers_then_folded():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 3, "cols": 3})
    J = jid(1)

    def run(tile):
        assert run_task(ledger, J, tile, result_file=fid(tile), summary={"tile": tile}).code == "recorded"

    assert views.task_order(ledger.state, ledger.work, J, 0)["inputs"] == []
    run(0)
    assert views.task_order(ledger.state, ledger.work, J, 1)["inputs"] == [fid(0)]  # (0,1) reads its left
    assert views.task_order(ledger.state, ledger.work, J, 3)["inputs"] == [fid(0)]  # (1,0) reads what is above it
    run(1)
    assert views.task_view(ledger.state, J, 0)["state"] == "done" and "folded" not in views.task_view(ledger.state, J, 0)
    assert ledger.state.jobs[J].tasks[0].readers_left == 1
    run(3)
    assert views.task_view(ledger.state, J, 0)["folded"] is True and 0 not in ledger.state.jobs[J].tasks
    assert views.task_order(ledger.state, ledger.work, J, 4)["inputs"] == [fid(1), fid(3)]  # above, then left
    run(4)
    run(2)
    assert views.task_view(ledger.state, J, 1)["folded"] is True  # read by (0,2) and (1,1)
    assert views.task_order(ledger.state, ledger.work, J, 5)["inputs"] == [fid(2), fid(4)]
    for tile in (5, 6, 7, 8):
        run(tile)
    assert ledger.state.jobs[J].state == "done" and ledger.state.jobs[J].tasks == {}
    assert views.task_view(ledger.state, J, 8)["folded"] is True


def test_a_consumed_boundary_is_released_so_the_job_holds_only_its_frontier():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 2, "cols": 2})
    J = jid(1)

    def run(tile):
        files = [[fid(tile), 10, ["s1", "s2"], "boundary"]]
        assert run_task(ledger, J, tile, result_file=fid(tile), files=files).code == "recorded"

    run(0)
    assert ledger.state.named[J] == {"task-0.boundary": fid(0)}
    run(1)
    assert fid(0) in ledger.state.files  # (1,0) has not read it yet
    run(2)
    assert fid(0) not in ledger.state.files and "task-0.boundary" not in ledger.state.named[J]
    run(3)
    assert J not in ledger.state.named and not ledger.state.files  # every boundary read: none kept


def test_keep_files_survive_the_fold_and_stay_owned_by_the_job():
    """An alignment's special rows: the traceback reads them after the score pass."""
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 2, "cols": 2, "keep_files": ["rows"]})
    J = jid(1)
    for tile in (0, 1, 2, 3):
        files = [[fid(tile), 10, ["s1", "s2"], "boundary"], [fid(10 + tile), 99, ["s1", "s2"], "rows"]]
        assert run_task(ledger, J, tile, result_file=fid(tile), files=files).code == "recorded"
    assert ledger.state.named[J] == {f"task-{t}.rows": fid(10 + t) for t in (0, 1, 2, 3)}
    assert all(fid(t) not in ledger.state.files for t in (0, 1, 2, 3))  # the boundaries went
    assert ledger.state.files[fid(12)].refs == {J: "task-2.rows"}
    ledger.validate_state()


def test_grid_with_keep_results_keeps_every_tile():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 2, "cols": 2, "keep_results": True})
    for tile in (0, 1, 2, 3):
        run_task(ledger, jid(1), tile, result_file=fid(tile))
    assert sorted(ledger.state.jobs[jid(1)].tasks) == [0, 1, 2, 3]
    assert views.task_view(ledger.state, jid(1), 0)["result_file"] == fid(0).hex()


# ---- reduce ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [[3, 2, 1, 0, 4], [1, 3, 0, 2, 4], [4, 0, 1, 2, 3]])
def test_reduce_max_prefers_the_lowest_task_on_ties_and_sum_adds_up(order):
    scores = {0: 2, 1: 5, 2: 4.5, 3: 5, 4: "n/a"}
    ledger = Ledger()
    submit(ledger, "range", {"count": 5, "reduce": {"max": "score", "sum": ["score", "cells"]}})
    for task in order:
        run_task(ledger, jid(1), task, summary={"score": scores[task], "cells": 10})
    reduced = views.job_view(ledger.state, jid(1))["reduced"]
    assert reduced["max"] == {"task": 1, "summary": {"score": 5, "cells": 10}}
    assert reduced["sum"] == {"score": 16.5, "cells": 50}


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_reduce_max_breaks_ties_by_the_smallest_tie_fields_in_any_completion_order(order):
    # parasail's tie-break across tiles: the first best cell in row-major order (end_b, end_a)
    cells = {0: (9, 5, 7), 1: (9, 5, 3), 2: (9, 4, 8), 3: (8, 0, 0)}  # score, end_b, end_a
    ledger = Ledger()
    submit(ledger, "range", {"count": 4, "reduce": {"max": "score", "ties": ["end_b", "end_a"]}})
    for task in order:
        score, eb, ea = cells[task]
        run_task(ledger, jid(1), task, summary={"score": score, "end_b": eb, "end_a": ea})
    assert views.job_view(ledger.state, jid(1))["reduced"]["max"]["task"] == 2


def test_a_job_sharing_its_best_hands_it_to_the_next_tasks():
    ledger = Ledger()
    submit(ledger, "range", {"count": 3, "run": {"kind": "tile", "share_best": True}, "reduce": {"max": "score"}})
    assert "best_so_far" not in views.task_order(ledger.state, ledger.work, jid(1), 1)["arguments"]  # nothing known yet
    run_task(ledger, jid(1), 0, summary={"score": 41})
    assert views.task_order(ledger.state, ledger.work, jid(1), 1)["arguments"]["best_so_far"] == 41


def test_reduce_without_rules_reduces_nothing():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2})
    run_task(ledger, jid(1), 0, summary={"score": 3})
    assert views.job_view(ledger.state, jid(1))["reduced"] == {}


# ---- scheduling -----------------------------------------------------------------------------


def test_ready_tasks_serve_priority_first_and_round_robin_within_a_priority():
    ledger = Ledger()
    A, B, C, D = jid(1), jid(2), jid(3), jid(4)
    submit(ledger, "range", {"count": 3}, n=1)
    submit(ledger, "range", {"count": 2}, n=2)
    submit(ledger, "range", {"count": 2, "priority": 5}, n=3)
    submit(ledger, "range", {"count": 2, "priority": -1}, n=4)
    assert views.ready_tasks(ledger.state, ledger.work, 20) == [(C, 0), (C, 1), (A, 0), (B, 0), (A, 1), (B, 1), (A, 2), (D, 0), (D, 1)]
    assert views.ready_tasks(ledger.state, ledger.work, 4) == [(C, 0), (C, 1), (A, 0), (B, 0)]
    assert views.ready_tasks(ledger.state, ledger.work, 0) == []
    assert views.ready_tasks(ledger.state, ledger.work, 5, exclude={(A, 0), (C, 1)}) == [(C, 0), (A, 1), (B, 0), (A, 2), (B, 1)]
    assign(ledger, [(C, 0), (C, 1), (A, 1)])
    assert views.ready_tasks(ledger.state, ledger.work, 20) == [(A, 0), (B, 0), (A, 2), (B, 1), (D, 0), (D, 1)]


# ---- endings, failure rules and the files a task stored --------------------------------------


def test_endings_list_final_outcomes_in_the_order_they_were_recorded():
    ledger = Ledger()
    submit(ledger, "range", {"count": 5, "max_attempts": 2, "fail_fast": False})
    f = fences(assign(ledger, [(jid(1), t) for t in range(5)]))
    complete(ledger, jid(1), 3, f[(jid(1), 3)], summary={"v": 3}, result_file=fid(3))
    assert complete(ledger, jid(1), 1, f[(jid(1), 1)], outcome=FAILED, error="boom").code == "retry"
    complete(ledger, jid(1), 4, f[(jid(1), 4)])
    complete(ledger, jid(1), 4, f[(jid(1), 4)])  # a duplicate ends nothing twice
    job = ledger.state.jobs[jid(1)]
    assert job.endings == [3, 4], "a retried attempt is not an ending"
    r = run_task(ledger, jid(1), 1, outcome=FAILED, error="boom again", summary={"type": "KeyError"}, result_file=fid(7))
    assert r.code == "failed"
    assert job.endings == [3, 4, 1] and (job.done, job.failed) == (2, 1)
    view = views.endings_view(ledger.state, jid(1), 1, 10)
    assert view == {
        "state": "active", "cursor": 3, "more": False, "skipped": 0, "error": None, "done": 2, "failed": 1, "total": 5,
        "tasks": [
            {"task": 4, "state": "done", "summary": {}, "result_file": None, "error": None, "attempts": 1},
            {"task": 1, "state": "failed", "summary": {"type": "KeyError"}, "result_file": fid(7), "error": "boom again",
             "attempts": 2},  # what the failure left is kept: the client re-raises from it
        ],
    }
    assert views.endings_view(ledger.state, jid(1), 0, 1)["cursor"] == 1 and views.endings_view(ledger.state, jid(1), 0, 1)["more"] is True
    assert views.endings_view(ledger.state, jid(1), 3, 10)["tasks"] == []
    assert views.has_news(ledger.state, jid(1), 2) and not views.has_news(ledger.state, jid(1), 3) and views.has_news(ledger.state, jid(9), 0)
    assert views.endings_view(ledger.state, jid(9), 0, 10) is None
    restored = copy(ledger)
    assert restored.state.jobs[jid(1)].endings == [3, 4, 1], "endings survive a snapshot"


def test_a_folded_tile_still_appears_in_the_endings():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 1, "cols": 3})
    for t in range(3):
        run_task(ledger, jid(1), t, summary={"score": t}, result_file=fid(t))
    job = ledger.state.jobs[jid(1)]
    assert job.state == "done" and job.endings == [0, 1, 2] and job.tasks == {}
    first = views.endings_view(ledger.state, jid(1), 0, 1)["tasks"][0]
    assert first == {"task": 0, "state": "done", "summary": None, "result_file": None, "error": None,
                     "attempts": None, "folded": True}


def test_old_folded_endings_are_dropped_and_a_late_watcher_is_told_how_many_it_skipped():
    ledger = Ledger()
    n = 3 * ENDINGS_KEPT
    submit(ledger, "grid", {"rows": 1, "cols": n})
    for t in range(n):  # one tile at a time: each waits for its left neighbour
        run_many(ledger, jid(1), [t], validate=t % 1000 == 0)
    ledger.validate_state()
    job = ledger.state.jobs[jid(1)]
    assert job.endings_dropped + len(job.endings) == n and len(job.endings) <= 2 * ENDINGS_KEPT
    assert job.endings_dropped > 0 and job.endings == list(range(job.endings_dropped, n))
    view = views.endings_view(ledger.state, jid(1), 5, 3)
    assert view["skipped"] == job.endings_dropped - 5 and view["cursor"] == job.endings_dropped + 3
    assert [t["task"] for t in view["tasks"]] == [job.endings_dropped + i for i in range(3)]


def test_a_snapshot_from_before_the_endings_log_counts_what_ended_as_dropped():
    ledger = Ledger()
    submit(ledger, "range", {"count": 3})
    run_task(ledger, jid(1), 0)
    raw = msgspec.msgpack.decode(ledger.snapshot())  # the LedgerState as plain arrays
    del raw[0][jid(1)][-4:]  # endings, failed, endings_dropped, after: the Job's fields that came later
    restored = Ledger.restore(msgspec.msgpack.encode(raw))
    restored.validate_state()
    job = restored.state.jobs[jid(1)]
    assert (job.endings, job.failed, job.endings_dropped) == ([], 0, 1)
    view = views.endings_view(restored.state, jid(1), 0, 10)
    assert (view["skipped"], view["cursor"], view["tasks"]) == (1, 1, [])
    run_task(restored, jid(1), 2)
    assert views.endings_view(restored.state, jid(1), 1, 10)["tasks"][0]["task"] == 2


def test_held_records_stop_the_trim_so_no_result_is_skipped():
    ledger = Ledger()
    n = 3 * ENDINGS_KEPT
    submit(ledger, "range", {"count": n})  # keep_results: every record stays, and every ending
    for batch in range(0, n, 512):
        run_many(ledger, jid(1), range(batch, batch + 512))
    job = ledger.state.jobs[jid(1)]
    assert job.state == "done" and job.endings == list(range(n)) and job.endings_dropped == 0


def test_retry_failed_false_ends_a_task_at_its_own_failure_but_retries_lost_attempts():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2, "max_attempts": 3, "retry_failed": False})
    assert run_task(ledger, jid(1), 0, outcome=LOST).code == "retry", "a dead worker says nothing about the task"
    assert run_task(ledger, jid(1), 0, outcome=LOST).code == "retry"
    assert run_task(ledger, jid(1), 0, outcome=LOST).code == "retry", "LOST does not use max_attempts"
    ledger = Ledger()
    submit(ledger, "range", {"count": 2, "max_attempts": 1, "max_lost": 2, "retry_failed": False})
    assert run_task(ledger, jid(1), 0, outcome=LOST).code == "retry"
    assert run_task(ledger, jid(1), 0, outcome=LOST).code == "failed", "LOST ends at max_lost"
    ledger = Ledger()
    submit(ledger, "range", {"count": 2, "max_attempts": 3, "retry_failed": False})
    assert run_task(ledger, jid(1), 1, outcome=LOST).code == "retry"
    r = run_task(ledger, jid(1), 1, outcome=FAILED, error="ValueError: x")
    job = ledger.state.jobs[jid(1)]
    assert r.code == "failed" and r.value == {"job_state": "failed"}
    assert job.error == "task 1 failed after 2 attempts: ValueError: x"  # fail_fast: the job fails
    assert job.endings == [1] and job.failed == 1 and job.tasks[0].state == "cancelled"
    ledger = Ledger()
    submit(ledger, "range", {"count": 1, "retry_failed": False})
    assert run_task(ledger, jid(1), 0, outcome=FAILED).text == "task 0 failed after 1 attempt: failed"
    ledger = Ledger()
    submit(ledger, "range", {"count": 1})  # the default retries the task's own failures
    assert run_task(ledger, jid(1), 0, outcome=FAILED).code == "retry"


def test_fail_fast_false_records_failures_and_the_window_keeps_refilling():
    ledger = Ledger()
    n = 3000
    submit(ledger, "range", {"count": n, "max_attempts": 2, "retry_failed": False, "fail_fast": False,
                             "reduce": {"sum": ["v"]}})
    job = ledger.state.jobs[jid(1)]
    lost_once = set()

    def end(t, fence, outcome, error=None):  # validated once a round: per command would be quadratic
        return ledger.apply(CompleteTask(jid(1), t, *fence, outcome, "w", {"v": 1}, None, error, NOW + 1))

    while job.state == "active":
        picked = views.ready_tasks(ledger.state, ledger.work, 700)
        assert picked, "an active job with nothing ready"
        _, s0 = ledger.state.fence
        for _, t, fence in ledger.apply(AssignTasks(1, s0 + 1, "b", picked, NOW)).value["assigned"]:
            if t % 100 == 50 and t not in lost_once:  # a worker died: retried though retry_failed is off
                lost_once.add(t)
                assert end(t, fence, LOST).code == "retry"
            elif t % 7 == 3:
                r = end(t, fence, FAILED, f"bad input {t}")
                assert r.code == "failed" and (r.value["job_state"] == "active" or len(job.endings) == n)
            else:
                assert end(t, fence, DONE).code == "recorded"
        ledger.validate_state()
        assert job.live <= jobs.WINDOW
    failed = [t for t in range(n) if t % 7 == 3]
    assert (job.done, job.failed) == (n - len(failed), len(failed)) and job.reduced["sum"] == {"v": n - len(failed)}
    assert job.state == "failed" and job.error == f"{len(failed)} of {n} tasks failed (first: task 3: bad input 3)"
    assert sorted(job.endings) == list(range(n)) and job.source.done_below == n
    assert all(job.tasks[t].state == "failed" and len(job.tasks[t].attempts) == 1 + (t in lost_once) for t in failed)
    assert ledger.state.counters["tasks_failed"] == len(failed) and ledger.state.counters["jobs_failed"] == 1
    view = views.job_view(ledger.state, jid(1))
    assert (view["done"], view["failed"]) == (n - len(failed), len(failed))


def test_fail_fast_false_job_with_no_failure_is_done_and_a_failed_task_ignores_late_results():
    ledger = Ledger()
    submit(ledger, "list", {"tasks": [{}, {}], "fail_fast": False, "max_attempts": 1})
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    assert complete(ledger, jid(1), 0, f, outcome=FAILED, error="x").code == "failed"
    r = complete(ledger, jid(1), 0, f)  # the same attempt reports success after all
    assert r.code == "ignored" and "task 0 is failed" in r.text
    assert run_task(ledger, jid(1), 1).code == "recorded"
    job = ledger.state.jobs[jid(1)]
    assert job.state == "failed" and job.error == "1 of 2 tasks failed (first: task 0: x)" and job.finished_at == NOW + 1
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 2, "cols": 2, "depends": "none", "fail_fast": False})
    for t in range(4):
        run_task(ledger, jid(1), t)
    assert ledger.state.jobs[jid(1)].state == "done"


def file_entry(n: int, name: str, size: int = 10, replicas=("s1", "s2")):
    return [fid(n), size, list(replicas), name]


def test_a_completion_registers_the_task_files_with_the_job_and_they_go_with_its_release():
    ledger = Ledger()
    submit(ledger, "range", {"count": 3, "max_attempts": 2, "fail_fast": False})
    apply(ledger, RegisterFile(fid(9), 5, ["s3"], None, NOW))  # a result file the ledger knows already
    r = run_task(ledger, jid(1), 0, result_file=fid(1), files=[file_entry(1, "result"), file_entry(2, "stdout")])
    assert r.code == "recorded"
    assert run_task(ledger, jid(1), 1, result_file=fid(9)).code == "recorded"
    f = fences(assign(ledger, [(jid(1), 2)]))[(jid(1), 2)]
    retry = complete(ledger, jid(1), 2, f, outcome=FAILED, files=[file_entry(3, "stderr")])
    assert retry.code == "retry" and fid(3) not in ledger.state.files, "a retried attempt registers nothing"
    r = run_task(ledger, jid(1), 2, outcome=FAILED, error="exit 1", files=[file_entry(4, "stderr", size=0)])
    assert r.code == "failed"
    assert ledger.state.named[jid(1)] == {
        "task-0.result": fid(1), "task-0.stdout": fid(2), "task-1.result": fid(9), "task-2.stderr": fid(4),
    }
    assert views.file_view(ledger.state, fid(1))["replicas"] == ["s1", "s2"] and views.file_view(ledger.state, fid(4))["size"] == 0
    assert ledger.state.counters["task_files_registered"] == 4
    r = apply(ledger, ReleaseFile(None, jid(1), NOW))
    assert r.value == {"released": 4, "dropped": [fid(1), fid(2), fid(4)]}
    assert ledger.state.files == {fid(9): ledger.state.files[fid(9)]} and jid(1) not in ledger.state.named


def test_duplicate_and_ignored_completions_register_nothing():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2, "max_attempts": 1, "max_lost": 1})
    f = fences(assign(ledger, [(jid(1), 0), (jid(1), 1)]))
    complete(ledger, jid(1), 0, f[(jid(1), 0)])
    assert complete(ledger, jid(1), 0, f[(jid(1), 0)], files=[file_entry(1, "out")]).code == "duplicate"
    complete(ledger, jid(1), 1, f[(jid(1), 1)], outcome=LOST)  # the job fails
    assert ledger.state.jobs[jid(1)].state == "failed"
    assert complete(ledger, jid(1), 1, f[(jid(1), 1)], files=[file_entry(2, "out")]).code == "ignored"
    assert ledger.state.files == {}


BAD_FILES = [
    ("not a list", "must be a list"),
    ([[fid(1), 1, ["s1"]]], "must be [file id, size, replicas, name]"),
    ([[b"short", 1, ["s1"], "a"]], "16 bytes"),
    ([[fid(1), -1, ["s1"], "a"]], "size must be an integer"),
    ([[fid(1), True, ["s1"], "a"]], "size must be an integer"),
    ([[fid(1), 2**63, ["s1"], "a"]], "size must be an integer"),
    ([[fid(1), 1, [], "a"]], "non-empty list of storage node names"),
    ([[fid(1), 1, ["s1", 3], "a"]], "non-empty list of storage node names"),
    ([[fid(1), 1, "s1", "a"]], "non-empty list of storage node names"),
    ([[fid(1), 1, ["s1"], 7]], "the name must be a string"),
    ([[fid(1), 1, ["s1"], "a/b"]], "'/'"),
    ([[fid(1), 1, ["s1"], ".."]], "reserved"),
    ([[fid(1), 1, ["s1"], "x" * 250]], "255 bytes"),
    ([[fid(1), 1, ["s1"], "a"], [fid(1), 1, ["s1"], "b"]], "listed twice"),
    ([[fid(1), 1, ["s1"], "a"], [fid(2), 1, ["s1"], "a"]], "two files are named 'a'"),
    ([[fid(1), 1, ["s1"], "result"]], "the name 'result' is kept"),
    ([[fid(n), 1, ["s1"], f"f{n}"] for n in range(MAX_TASK_FILES + 1)], f"at most {MAX_TASK_FILES}"),
]


@pytest.mark.parametrize(("files", "fragment"), BAD_FILES, ids=[f"bad-files-{i}" for i in range(len(BAD_FILES))])
def test_a_completion_with_malformed_files_is_refused_and_changes_nothing(files, fragment):
    ledger = Ledger()
    submit(ledger, "range", {"count": 2})
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    before = copy(ledger)
    r = complete(ledger, jid(1), 0, f, result_file=fid(99), files=files)
    assert_refused(ledger, before, r, "bad_files", fragment, "task 0")
    assert complete(ledger, jid(1), 0, f).code == "recorded", "the attempt is still open"


def test_a_completion_whose_files_clash_with_the_registry_is_refused_whole():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2})
    apply(ledger, RegisterFile(fid(5), 10, ["s1"], jid(1), NOW, "task-0.log"))  # a user took the name
    apply(ledger, RegisterFile(fid(6), 10, ["s1"], None, NOW))
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    for files, code, fragment in [
        ([file_entry(1, "out"), file_entry(2, "log")], "name_taken", "task-0.log"),
        ([file_entry(1, "out"), file_entry(6, "six", size=11)], "size_mismatch", "10 bytes, not 11"),
    ]:
        before = copy(ledger)
        assert_refused(ledger, before, complete(ledger, jid(1), 0, f, files=files), code, fragment, "task 0's files")
    assert fid(1) not in ledger.state.files, "nothing half-applied"



# ---- files and leadership -------------------------------------------------------------------


def test_register_and_drop_files():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1})
    r = apply(ledger, RegisterFile(fid(1), 100, ["s2", "s1", "s2"], jid(1), NOW))
    assert r.value == {"file": fid(1), "replicas": ["s1", "s2"]}
    r = apply(ledger, RegisterFile(fid(1), 100, ["s3", "s1"], jid(1), NOW + 1))  # another replica
    assert r.value["replicas"] == ["s1", "s2", "s3"] and ledger.state.files[fid(1)].registered_at == NOW
    assert apply(ledger, RegisterFile(fid(2), 0, ["s1"], None, NOW)).ok  # pinned
    assert views.footprint(ledger.state)["files"] == 2
    refusals = [
        (RegisterFile(fid(1), 101, ["s4"], jid(1), NOW), "size_mismatch", ["100", "101"]),
        (RegisterFile(b"short", 1, ["s1"], None, NOW), "bad_file_id", ["16 bytes"]),
        (RegisterFile(fid(3), 1, [], None, NOW), "no_replicas", [fid(3).hex()]),
        (RegisterFile(fid(3), 1, ["s1"], jid(7), NOW), "unknown_job", [jid(7).hex()]),
        (RegisterFile(fid(3), 1, ["s1"], None, NOW, "a/b"), "bad_name", ["'/'"]),
        (RegisterFile(fid(3), 1, ["s1"], None, NOW, ".."), "bad_name", ["reserved"]),
        (RegisterFile(fid(3), 1, ["s1"], None, NOW, "x" * 256), "bad_name", ["255 bytes"]),
        (RegisterFile(fid(3), 1, ["s1"], None, NOW, add_ref=False), "unknown_file", ["released or never"]),
        (DropFile(fid(9), NOW), "unknown_file", [fid(9).hex()]),
    ]
    for command, code, fragments in refusals:
        before = copy(ledger)
        assert_refused(ledger, before, apply(ledger, command), code, *fragments)
    assert apply(ledger, DropFile(fid(1), NOW)).ok and fid(1) not in ledger.state.files
    assert jid(1) not in ledger.state.named  # its name went with it
    before = copy(ledger)
    assert_refused(ledger, before, apply(ledger, DropFile(fid(1), NOW)), "unknown_file")


def test_files_are_named_per_owner_and_leave_when_nothing_refers_to_them():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1}, n=1)
    submit(ledger, "range", {"count": 1}, n=2)
    a, b = jid(1), jid(2)
    assert apply(ledger, RegisterFile(fid(1), 10, ["s1"], a, NOW, "genome.fa")).ok
    assert apply(ledger, RegisterFile(fid(1), 10, ["s2"], b, NOW, "ref.fa")).ok  # the same bytes, another job
    assert apply(ledger, RegisterFile(fid(2), 20, ["s1"], a, NOW, "other.fa")).ok
    assert apply(ledger, RegisterFile(fid(1), 10, ["s3"], None, NOW, add_ref=False)).ok  # a repair adds a replica only
    view = views.file_view(ledger.state, fid(1))
    assert view["replicas"] == ["s1", "s2", "s3"] and view["refs"] == {a.hex(): "genome.fa", b.hex(): "ref.fa"}
    listing = views.files_view(ledger.state, 10, owner=a)
    assert [(f["name"], f["id"]) for f in listing["files"]] == sorted([("genome.fa", fid(1).hex()), ("other.fa", fid(2).hex())], key=lambda x: x[1])
    before = copy(ledger)
    assert_refused(ledger, before, apply(ledger, RegisterFile(fid(3), 1, ["s1"], a, NOW, "genome.fa")), "name_taken", "genome.fa")
    # paging: 1 per page walks every file once
    seen, after = [], None
    while True:
        page = views.files_view(ledger.state, 1, after=after)
        seen += [f["id"] for f in page["files"]]
        if page["next"] is None:
            break
        after = bytes.fromhex(page["next"])
    assert seen == sorted([fid(1).hex(), fid(2).hex()])
    r = apply(ledger, ReleaseFile(None, a, NOW))  # job a lets go of everything it owns
    assert r.value == {"released": 2, "dropped": [fid(2)]}
    assert views.file_view(ledger.state, fid(1))["refs"] == {b.hex(): "ref.fa"} and a not in ledger.state.named
    before = copy(ledger)
    assert_refused(ledger, before, apply(ledger, ReleaseFile(fid(1), a, NOW)), "not_referenced", a.hex())
    before = copy(ledger)
    assert_refused(ledger, before, apply(ledger, ReleaseFile(None, None, NOW)), "bad_release")
    assert apply(ledger, ReleaseFile(fid(1), b, NOW)).value == {"released": 1, "dropped": [fid(1)]}
    assert not ledger.state.files and not ledger.state.named
    ledger.validate_state()


def test_barrier_raises_the_term_and_never_lowers_it():
    ledger = Ledger()
    assert apply(ledger, Barrier(3, "master-a", NOW)).value == {"term": 3}
    assert (ledger.state.term, ledger.state.leader) == (3, "master-a")
    assert apply(ledger, Barrier(2, "master-b", NOW)).value == {"term": 3}
    assert apply(ledger, Barrier(3, "master-c", NOW)).value == {"term": 3}
    assert (ledger.state.term, ledger.state.leader) == (3, "master-a")
    apply(ledger, Barrier(4, "master-b", NOW))
    assert (ledger.state.term, ledger.state.leader) == (4, "master-b")


def test_a_batch_answers_per_command_and_counts_each():
    ledger = Ledger()
    spec = {"count": 2}
    batch = Batch([
        SubmitJob(jid(1), key_of(1), spec_digest("range", spec), "range", spec, "c", NOW),
        SubmitJob(jid(2), key_of(2), spec_digest("nope", spec), "nope", spec, "c", NOW),
        Barrier(1, "m", NOW),
    ])
    results = apply(ledger, batch)
    assert [r.code for r in results] == ["ok", "unknown_kind", "ok"]
    assert ledger.state.applied == 3 and list(ledger.state.jobs) == [jid(1)]


def test_snapshot_restores_an_equal_ledger():
    ledger = Ledger()
    submit(ledger, "grid", {"rows": 2, "cols": 3, "reduce": {"sum": ["cells"]}})
    submit(ledger, "list", {"tasks": [{"a": [1, 2]}, {"b": None}]}, n=2)
    run_task(ledger, jid(1), 0, summary={"cells": 4}, result_file=fid(0))
    assign(ledger, [(jid(2), 1)])
    apply(ledger, RegisterFile(fid(1), 5, ["s1"], jid(1), NOW))
    restored = Ledger.restore(ledger.snapshot())
    assert restored.state == ledger.state and restored.snapshot() == ledger.snapshot()
    restored.validate_state()
    assert views.ready_tasks(restored.state, restored.work, 10) == views.ready_tasks(ledger.state, ledger.work, 10)


def test_masters_that_restored_and_that_replayed_have_identical_snapshots():
    """Regression: done_above was a set, encoded in an order that depended on its history."""
    log = [SubmitJob(jid(1), key_of(1), spec_digest("range", {"count": 10}), "range", {"count": 10}, "c", NOW)]
    log.append(AssignTasks(1, 1, "b", [(jid(1), t) for t in range(10)], NOW))
    for t in (1, 2, 3, 4, 5, 7, 9, 0):  # done_above grows to 7 entries, then drains to {7, 9}
        log.append(CompleteTask(jid(1), t, 1, 1 + t, DONE, "w", {}, None, None, NOW))
    replayer = Ledger()
    for entry in log:
        apply(replayer, entry)
    restorer = Ledger.restore(replayer.snapshot())
    assert restorer.state == replayer.state
    tail = CompleteTask(jid(1), 8, 1, 9, DONE, "w", {}, None, None, NOW)
    apply(replayer, tail)
    apply(restorer, tail)
    assert restorer.snapshot() == replayer.snapshot()


def test_a_sum_past_the_msgpack_integer_range_keeps_the_ledger_snapshottable():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2, "reduce": {"sum": ["cells"]}})
    for task in (0, 1):  # each summary is a valid MessagePack integer
        assert run_task(ledger, jid(1), task, summary={"cells": 2**63}).code == "recorded"
    Ledger.restore(ledger.snapshot())


def test_an_assignment_past_the_msgpack_integer_range_is_refused_or_snapshottable():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2})
    command = decode(encode(AssignTasks(1, 2**64 - 1, "b", [(jid(1), 0), (jid(1), 1)], NOW)))
    r = apply(ledger, command)
    assert not r.ok or Ledger.restore(ledger.snapshot()).state == ledger.state


# ---- acceptance -----------------------------------------------------------------------------


def test_ledger_memory_for_a_400x400_tile_alignment_job_is_o_frontier():
    """Ledger memory for a 400×400-tile alignment job is O(frontier)."""
    n = 400
    ledger = Ledger()
    assert submit(ledger, "grid", {"rows": n, "cols": n, "reduce": {"max": "score", "sum": ["cells"]}}).ok
    J = jid(1)
    seq = 0
    max_records = max_frontier = max_snapshot = rounds = 0
    while ledger.state.jobs[J].state == "active":
        picked = views.ready_tasks(ledger.state, ledger.work, 64)
        assert picked, "an active wavefront job with nothing ready and nothing running"
        r = ledger.apply(AssignTasks(1, seq + 1, "b", picked, NOW))
        seq += len(picked)
        done = [
            CompleteTask(J, t, *f, DONE, "w", {"score": t * 7919 % 10007, "cells": 1}, t.to_bytes(16, "big"), None, NOW)
            for _, t, f in r.value["assigned"]
        ]
        assert [x.code for x in ledger.apply(Batch(done))] == ["recorded"] * len(done)
        footprint = views.footprint(ledger.state)
        max_records = max(max_records, footprint["task_records"])
        max_frontier = max(max_frontier, footprint["frontier_entries"])
        max_snapshot = max(max_snapshot, len(ledger.snapshot()))
        rounds += 1
        if rounds % 500 == 0:
            ledger.validate_state()
    ledger.validate_state()
    job = ledger.state.jobs[J]
    assert job.state == "done" and job.done == n * n
    assert views.footprint(ledger.state)["task_records"] == 0 and job.tasks == {}
    assert max_records <= 3 * n, max_records
    assert max_frontier <= 2 * n, max_frontier
    assert max_snapshot < 200_000, max_snapshot  # 160,000 task records would be many MB
    # the endings log keeps only its newest folded entries: O(frontier) too
    assert job.endings_dropped + len(job.endings) == n * n and len(job.endings) < 2 * ENDINGS_KEPT
    best = max(range(n * n), key=lambda t: ((t * 7919) % 10007, -t))
    assert job.reduced["max"]["task"] == best and job.reduced["sum"] == {"cells": n * n}


# ---- job DAGs ('after') ---------------------------------------------------------------------


def test_a_job_waits_for_the_jobs_it_names_and_starts_when_they_are_done():
    ledger = Ledger()
    submit(ledger, "range", {"count": 2}, n=1)
    submit(ledger, "range", {"count": 1}, n=2)
    assert submit(ledger, "range", {"count": 3, "after": [jid(1).hex(), jid(2).hex()]}, n=3).ok
    assert submit(ledger, "range", {"count": 1, "after": [jid(3).hex()]}, n=4).ok  # a chain: 1, 2 -> 3 -> 4
    assert ready(ledger, jid(3)) == [] and views.job_view(ledger.state, jid(3))["waiting_for"] == [jid(1).hex(), jid(2).hex()]
    assert all(j != jid(3) for j, _ in views.ready_tasks(ledger.state, ledger.work, 100))
    run_many(ledger, jid(1), [0, 1])
    assert views.job_view(ledger.state, jid(3))["waiting_for"] == [jid(2).hex()] and ready(ledger, jid(3)) == []
    run_task(ledger, jid(2), 0)
    assert ready(ledger, jid(3)) == [0, 1, 2] and views.job_view(ledger.state, jid(3))["waiting_for"] == []
    assert ledger.state.counters["jobs_released"] == 1
    again = copy(ledger)  # the waits survive a snapshot
    run_many(ledger, jid(3), [0, 1, 2])
    assert ready(ledger, jid(4)) == [0]
    run_many(again, jid(3), [0, 1, 2])
    assert ready(again, jid(4)) == [0]
    # a job naming one already done starts at once
    assert submit(ledger, "range", {"count": 1, "after": [jid(1).hex()]}, n=5).ok and ready(ledger, jid(5)) == [0]


def test_a_job_whose_dependency_fails_or_is_cancelled_fails_without_running_down_the_dag():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1, "max_attempts": 1}, n=1)
    submit(ledger, "range", {"count": 1}, n=2)
    submit(ledger, "range", {"count": 1, "after": [jid(1).hex()]}, n=3)
    submit(ledger, "range", {"count": 1, "after": [jid(3).hex(), jid(2).hex()]}, n=4)
    run_task(ledger, jid(1), 0, outcome=FAILED, error="boom")
    for n in (3, 4):
        view = views.job_view(ledger.state, jid(n))
        assert view["state"] == "failed" and "which it waits for, failed: it never ran" in view["error"], view
        assert view["done"] == 0 and not ledger.state.jobs[jid(n)].tasks
    assert views.job_view(ledger.state, jid(2))["state"] == "active"  # the other branch goes on
    submit(ledger, "range", {"count": 1, "after": [jid(2).hex()]}, n=5)
    apply(ledger, CancelJob(jid(2), "not needed", NOW))
    assert views.job_view(ledger.state, jid(5))["state"] == "failed" and "cancelled" in views.job_view(ledger.state, jid(5))["error"]


@pytest.mark.parametrize("after,code,fragment", [
    (["00" * 16], "unknown_job", "does not exist"),
    ("abc", "bad_spec", "'after'"),
    (["xyz"], "bad_spec", "32 hex digits"),
    ([jid(1).hex()], "dependency_failed", "could never start"),
])
def test_a_bad_after_is_refused_and_changes_nothing(after, code, fragment):
    ledger = Ledger()
    submit(ledger, "range", {"count": 1}, n=1)
    apply(ledger, CancelJob(jid(1), "", NOW))
    before = copy(ledger)
    assert_refused(ledger, before, submit(ledger, "range", {"count": 1, "after": after}, n=9), code, fragment)
