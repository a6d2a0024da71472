"""The ready index (``master.ready``): what dispatch reads instead of scanning every job.

A Hypothesis state machine applies random submits (priorities, ``after``), proposals taken into
the leader's in-flight set and committed, failed or forgotten, direct assignments, completions
(done, failed, lost), cancels, work units and snapshot restores; after every step the index must
be what a full scan finds (``Ledger.validate_state``), and ``views.ready_tasks`` must hand out
exactly what the scan of every job did before the index (``scan_ready``, kept here as the
oracle), with the in-flight set as an ``InFlight`` or as the plain set the stream used.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from master import views
from master.commands import (
    DONE,
    FAILED,
    LOST,
    AddUnits,
    AddWorkSpec,
    AssignTasks,
    CancelJob,
    CompleteTask,
    SubmitJob,
)
from master.ledger import Ledger, spec_digest
from master.ready import InFlight, ReadyIndex
from master.state import Job, JobState, LedgerState
from master.workspec import WorkState, spec_id
from tests.unit.test_ledger_properties import SETTINGS, jid, job_bodies, key_of


def scan_ready(state: LedgerState, work: WorkState, limit: int, exclude: Any = frozenset()) -> list[tuple[bytes, int]]:
    """``views.ready_tasks`` as it was before the index: sort every active job with ready tasks
    by (priority, submission), round-robin within a priority, skip ``exclude`` task by task."""
    out: list[tuple[bytes, int]] = []
    active = [j for j in state.jobs.values() if j.state == JobState.ACTIVE and j.ready]
    active.sort(key=lambda j: (-j.spec["priority"], j.seq))
    groups: dict[int, list[Job]] = {}
    for job in active:
        groups.setdefault(job.spec["priority"], []).append(job)
    for group in groups.values():
        turn = [(job, iter(job.ready)) for job in group]
        while turn and len(out) < limit:
            still = []
            for job, it in turn:
                for task_id in it:
                    if (job.job_id, task_id) not in exclude:
                        out.append((job.job_id, task_id))
                        still.append((job, it))
                        break
                if len(out) >= limit:
                    break
            turn = still
    units: dict[bytes, set[int]] = {}
    for job_id, task_id in exclude:
        if work.is_spec(job_id):
            units.setdefault(job_id, set()).add(task_id)
    return out + work.ready(limit - len(out), units)


class ReadyIndexMachine(RuleBasedStateMachine):
    """The leader's dispatch loop against a ledger, with the faults that release tasks in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.inflight = InFlight(self.ledger)
        self.proposals: list[tuple[int, list[tuple[bytes, int]]]] = []  # (first sequence, tasks)
        self.sequence = 0
        self.made = 0
        self.now = 0.0
        self.has_spec = False
        self.units = 0  # units added
        self.tokens: list[tuple[bytes, int, tuple[int, int]]] = []  # every assignment committed

    def next_tokens(self, n: int) -> int:
        first = self.sequence + 1
        self.sequence += max(n, 1)
        return first

    @initialize(body=job_bodies())
    def first_job(self, body) -> None:
        self.submit(body, wait=0)

    @rule(body=job_bodies(), wait=st.integers(0, 4))
    def submit(self, body, wait: int) -> None:
        kind, spec = body
        self.made += 1
        if wait and self.made > 1:  # wait for an earlier job: no task until it is done
            spec = {**spec, "after": [jid(1 + wait % (self.made - 1)).hex()]}
        self.now += 1
        self.ledger.apply(SubmitJob(jid(self.made), key_of(self.made), spec_digest(kind, spec), kind, spec, "c", self.now))

    @rule(limit=st.integers(1, 6))
    def propose(self, limit: int) -> None:
        """The stream's dispatch: ready tasks not in flight, taken into the in-flight set."""
        tasks = views.ready_tasks(self.ledger.state, self.ledger.work, limit, self.inflight)
        assert not set(tasks) & self.inflight.tasks, "a task in flight was handed out again"
        if tasks:
            self.inflight.update(tasks)
            self.proposals.append((self.next_tokens(len(tasks)), tasks))

    @precondition(lambda self: self.proposals)
    @rule(data=st.data(), commits=st.booleans())
    def answer(self, data, commits: bool) -> None:
        """The oldest proposal commits (its tasks are assigned, or skipped: Raft commits in log
        order), or any one fails (outcome unknown)."""
        first, tasks = self.proposals.pop(0 if commits else data.draw(st.integers(0, len(self.proposals) - 1)))
        if commits:
            r = self.ledger.apply(AssignTasks(1, first, "b", tasks, self.now))
            assert r.ok or r.code == "stale_fence", r  # a direct assignment took newer tokens
            if r.ok:
                self.tokens += r.value["assigned"]
            event(f"proposal: {r.code}, {'some' if r.ok and r.value['skipped'] else 'none'} skipped")
        else:
            event("proposal: failed")
        self.inflight.difference_update(tasks)

    @rule()
    def balancer_attached(self) -> None:
        """A new balancer: nothing is in flight any more; answers to the proposals still land."""
        self.inflight.clear()

    @rule(limit=st.integers(1, 4), now=st.integers(0, 2))
    def assign_directly(self, limit: int, now: int) -> None:
        """Now and then, an assignment the index was not told of beforehand (replayed)."""
        if now:
            return
        tasks = views.ready_tasks(self.ledger.state, self.ledger.work, limit)
        r = self.ledger.apply(AssignTasks(1, self.next_tokens(len(tasks)), "b", tasks, self.now))
        self.tokens += r.value["assigned"]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), outcome=st.sampled_from([DONE, DONE, FAILED, LOST]), any_token=st.integers(0, 3))
    def complete(self, data, outcome: int, any_token: int) -> None:
        """Mostly a running attempt; now and then any token handed out (e.g. an attempt reported
        lost that comes back done while its task waits, ready, maybe in flight again)."""
        running = [(j, t, (a.fence_term, a.fence_sequence))
                   for j, t, a in views.open_assignments(self.ledger.state, self.ledger.work)]
        job, task, fence = data.draw(st.sampled_from(running if running and any_token else self.tokens))
        self.now += 1
        r = self.ledger.apply(CompleteTask(job, task, fence[0], fence[1], outcome, "w", {}, None, None, self.now))
        assert r.ok or (self.ledger.work.is_spec(job) and r.code == "stale_fence"), r  # (a unit's old lease)
        event(f"complete: {r.code}")

    @rule(n=st.integers(1, 40))
    def cancel(self, n: int) -> None:
        if n <= self.made and n % 4 == 0:  # now and then
            self.ledger.apply(CancelJob(jid(n), "test", self.now))

    @precondition(lambda self: not self.has_spec)
    @rule(replicas=st.integers(1, 2))
    def work_spec(self, replicas: int) -> None:
        """A work spec (a redundant one queues a unit's next replica first: ``UnitTable.vote``)."""
        self.has_spec = True
        spec = {"name": "s", "run": {"kind": "call"}, "replicas": replicas}
        assert self.ledger.apply(AddWorkSpec(spec, self.now)).ok

    @precondition(lambda self: self.has_spec)
    @rule(n=st.integers(1, 4), priority=st.integers(0, 1))
    def work_units(self, n: int, priority: int) -> None:
        units = [[f"u{self.units + i}", b"", priority] for i in range(n)]
        self.units += n
        assert self.ledger.apply(AddUnits("s", units, self.now)).ok

    @rule()
    def snapshot_installed(self) -> None:
        """A follower installs a snapshot (``master.raft``): a new state, its index taken of nothing."""
        restored = Ledger.restore(self.ledger.snapshot())
        self.ledger.state, self.ledger.work = restored.state, restored.work

    @invariant()
    def index_is_a_full_scan(self) -> None:
        self.ledger.validate_state()  # ReadyIndex.validate: each queue is its job's ready set less what is taken
        index, rebuilt = self.ledger.state.ready_index, ReadyIndex.of(self.ledger.state.jobs)
        assert rebuilt.queues == {j: {**index.queues.get(j, {}), **index.taken.get(j, {})} for j in rebuilt.queues}
        assert set(index.taken) <= set(rebuilt.queues)
        if not index.taken:
            assert index.queues == rebuilt.queues and list(map(list, index.tiers())) == list(map(list, rebuilt.tiers()))

    @invariant()
    def dispatch_hands_out_what_a_scan_did(self) -> None:
        """The same ledger restored (nothing taken) and scanned as before the index, excluding the
        in-flight set task by task, hands out what the index does."""
        state, work = self.ledger.state, self.ledger.work
        fresh = Ledger.restore(self.ledger.snapshot())
        taken = {(j, t) for j, tasks in state.ready_index.taken.items() for t in tasks}
        taken |= {(spec_id(name), u) for name, table in work.tables.items() for u in table.offer.taken}
        assert taken <= self.inflight.tasks
        for limit in (0, 1, 3, 100):
            expected = scan_ready(fresh.state, fresh.work, limit, set(self.inflight))
            assert views.ready_tasks(state, work, limit, self.inflight) == expected
            assert views.ready_tasks(state, work, limit, set(self.inflight)) == expected
            # what the leader took is never handed out, whatever the caller excludes
            assert views.ready_tasks(state, work, limit) == scan_ready(fresh.state, fresh.work, limit, taken)


TestReadyIndexMachine = ReadyIndexMachine.TestCase
TestReadyIndexMachine.settings = settings(max_examples=80, stateful_step_count=40, **SETTINGS)


# ---- the index in a few plain cases ----------------------------------------------------------


def _ledger_with(*specs: dict[str, Any]) -> Ledger:
    ledger = Ledger()
    for n, spec in enumerate(specs, 1):
        assert ledger.apply(SubmitJob(jid(n), key_of(n), spec_digest("range", spec), "range", spec, "c", 1.0)).ok
    return ledger


def test_finished_jobs_leave_the_index():
    ledger = _ledger_with(*[{"count": 1}] * 50, {"count": 2})
    tasks = [(jid(n), 0) for n in range(1, 51)]
    assigned = ledger.apply(AssignTasks(1, 1, "b", tasks, 2.0)).value["assigned"]
    for job, task, fence in assigned:
        assert ledger.apply(CompleteTask(job, task, *fence, DONE, "w", {}, None, None, 3.0)).code == "recorded"
    index = ledger.state.ready_index
    assert len(index) == 1 and list(index.queues) == [jid(51)]
    assert views.ready_tasks(ledger.state, ledger.work, 10) == [(jid(51), 0), (jid(51), 1)]
    ledger.validate_state()


def test_tasks_in_flight_are_off_the_queues_until_their_proposal_is_answered():
    ledger = _ledger_with({"count": 4}, {"count": 1, "priority": 1})
    inflight = InFlight(ledger)
    first = views.ready_tasks(ledger.state, ledger.work, 2, inflight)
    assert first == [(jid(2), 0), (jid(1), 0)]
    inflight.update(first)
    index = ledger.state.ready_index
    assert list(index.queues) == [jid(1)] and list(index.queues[jid(1)]) == [1, 2, 3]
    assert views.ready_tasks(ledger.state, ledger.work, 10, inflight) == [(jid(1), 1), (jid(1), 2), (jid(1), 3)]
    inflight.difference_update(first)  # the proposal failed: back in their places, oldest first
    assert views.ready_tasks(ledger.state, ledger.work, 10, inflight) == [(jid(2), 0), (jid(1), 0), (jid(1), 1),
                                                                         (jid(1), 2), (jid(1), 3)]
    inflight.update(first)
    assert ledger.apply(AssignTasks(1, 1, "b", first, 2.0)).ok  # committed: they left the ready sets
    assert not index.taken and len(inflight) == 2
    inflight.difference_update(first)
    assert len(inflight) == 0 and list(index.queues[jid(1)]) == [1, 2, 3]
    ledger.validate_state()


def test_work_units_in_flight_count_as_running():
    ledger = Ledger()
    assert ledger.apply(AddWorkSpec({"name": "s", "run": {"kind": "call"}, "max_running": 2}, 1.0)).ok
    assert ledger.apply(AddUnits("s", [["a", b""], ["b", b""], ["c", b""]], 1.0)).ok
    inflight = InFlight(ledger)
    sid = spec_id("s")
    first = views.ready_tasks(ledger.state, ledger.work, 1, inflight)
    assert first == [(sid, 0)]
    inflight.update(first)
    assert inflight.units == {sid: {0}}
    assert views.ready_tasks(ledger.state, ledger.work, 5, inflight) == [(sid, 1)]  # max_running 2
    inflight.difference_update(first)
    assert not inflight.units


# A snapshot written by the code before the index (commit 2a58082): six jobs (priorities 2, 0,
# -1; a grid; one waiting for another; one cancelled), a retried task, a work spec with units.
OLD_SNAPSHOT = zlib.decompress(base64.b64decode(
    "eNq9lV2I41QUx+9N2tlBUGd2PlBYcWBlVwRRQV9UsL6q6IvskxBukttJbJrU3NuORdB0Zh3RZaAtFBwQnGr66Sg+ivgQZrJPfVhEEZddxH3yAx8GEVR8GE+atNsx2bG"
    "CTF5yb+457f/88j8n7236c+joha+j5fjDfz45P9+yiblKL7UUq2jyVLdg65at8zLazZNXJcI5zRc4E7vBzrAYv+1Du2g6bZuqRYU6uzlKC5JNWdHgbL8/3GV1g7Jqi2"
    "Q5tau7NuV2WcoSeKju94I7bBjfbyqDzEhUI9SQSmGnTRSul+hF1HBVy6S1bYyb8iBzXxjZXBtkzkVZ3o7nDFMpUcsQJyTHie4q/M6O5yEhiq3CWpxYbwie6GEPixg"
    "5nleDnGqMm5AEU4jBPH0EpjiGKZwAzNlIVARTFNEI5gZqdAlj+qpJVQAlToACLl7ABk/wmOS0jj0BaKGATDUJjJgERoyBWXBXbV3dcm1rjQmuYhlMmNJpHZUWqKmy3h"
    "op0axtmTwR195/xRUpFLeHygRhH1UQxpPMRgZMHWNAYQIcngCHh+CwgG5tqVQSuVSM3KJr6IxfanHCcqzuOGNshyfgqcVIVWMoQhDGeNbRhEkmzbOOoJWQcGvDpJP"
    "KTsfKXjrSSUIotnZ15eHjr0f+t/l1LJe7ItlRrwXlRmAcJzgIi6/9+/hFM0k4ZmI4lo/iONEpfSYSNSoWXNBTiKlQA4LBCDc30CzpxOFyMyTwSIhokLk/DPvAtAKn"
    "bMY/TXV/buu5zcaj367I7/75/ddX5hpXpviinYa03qkfnnxpnvxx9e1fPvv1wlvPTDG7FyCtdGP+xc75xWsPPPHlQ2e2njWmmGyLkPbTje2z/cdzl+VTd957duXHn6d"
    "o6yVI+/Ru7cJuZeWx7JuvP63d89fBFG2xDGmzD37Vf+GL8tI35377feGdz++I28ep4/QM2rn94icvWzKTWFHO62ARdaY/nCJSMNiEj0euGRoGh6Hj94Sdy/i1jRYrUI"
    "XV3m+yipvTTdVViGGgwVMH0QQUBxnbC5d7GLfkMqdsb5B5PjweHEZxbU5kcFulyb5DS26Ollm9SZqyqxJO6j7yUWfNsnPUZtUeKYH3guhaHdURdi0Y/tWODH9rcVbt"
    "WEVeKMKiq+oMFoGDGSec+tCC46bwZ0ckuqMag/OPDEoYlaB/9PGLPXhjdG9rlqFS2589jK62BqE691FXk0J5oFOT4O9seNjSJPgq+ainSaBJsfLUR/0sBXoSNFQ+9k5"
    "QLzxk9JX4WatkQSmBRqiUKxplTiVu9Pg4Sf8NgOkd+g=="))


def test_a_snapshot_written_before_the_index_restores_with_it():
    ledger = Ledger.restore(OLD_SNAPSHOT)
    ledger.validate_state()
    sid = spec_id("s")
    # what the code of then handed out (priority 2, then 0 round-robin with task 1 of job 1
    # retried last, then -1, then the units), the job waiting for job 1 and the cancelled one absent
    assert views.ready_tasks(ledger.state, ledger.work, 100) == [
        (jid(2), 1), (jid(2), 2), (jid(1), 2), (jid(3), 1), (jid(1), 3), (jid(3), 2), (jid(1), 1),
        (jid(4), 0), (jid(4), 1), (sid, 0), (sid, 1)]
    assert ledger.snapshot() == OLD_SNAPSHOT  # the format is unchanged: the index is no field


@settings(max_examples=40, **SETTINGS)
@given(st.lists(st.tuples(st.integers(-2, 2), st.integers(1, 3)), min_size=1, max_size=30), st.integers(0, 8))
def test_jobs_of_many_priorities_are_served_in_order(bodies, limit):
    ledger = _ledger_with(*[{"count": c, "priority": p} for p, c in bodies])
    state, work = ledger.state, ledger.work
    assert views.ready_tasks(state, work, limit) == scan_ready(state, work, limit)
    ledger.validate_state()
