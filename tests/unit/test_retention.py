"""Job retention: finished jobs, their specs, idempotency keys and file references are forgotten
once they ended longer ago than the retention (``CompactJobs``, proposed by the leader), like
etcd's compaction and Slurm's accounting purge; younger history and active jobs stay, and what
stays survives a restart (the snapshot)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.node.events import MessageReceived, StartTimer, TimerFired
from master.commands import CancelJob, CompactJobs, RegisterFile
from master.joblife import oldest_ended
from master.ledger import Ledger
from master.standing import API
from proto.messages import Submit

from .test_ledger import apply, copy, fid, jid, key_of, run_task, submit
from .test_master_core import CLIENT
from .test_master_core import Harness as MasterHarness

DAY = 86400.0


def _ended_job(ledger: Ledger, n: int, at: float, file: int | None = None) -> bytes:
    submit(ledger, "list", {"tasks": [{"i": n}]}, n=n, now=at - 10)
    if file is not None:
        apply(ledger, RegisterFile(fid(file), 100, ["s1"], jid(n), at - 5, f"out{n}"))
    apply(ledger, CancelJob(jid(n), "done with it", at))
    return jid(n)


def test_jobs_that_ended_before_the_cut_off_are_forgotten_with_their_keys_and_files():
    ledger = Ledger()
    old = _ended_job(ledger, 1, 1 * DAY, file=1)
    young = _ended_job(ledger, 2, 40 * DAY, file=2)
    submit(ledger, "list", {"tasks": [{"i": 3}]}, n=3, now=0.5 * DAY)  # old, but still active
    apply(ledger, RegisterFile(fid(1), 100, ["s1"], None, 2 * DAY, "pinned"))  # the user pins old's file too
    assert oldest_ended(ledger.state) == 1 * DAY
    result = apply(ledger, CompactJobs(10 * DAY, 41 * DAY))
    assert result.value == {"compacted": 1}
    assert old not in ledger.state.jobs and young in ledger.state.jobs and jid(3) in ledger.state.jobs
    assert key_of(1) not in ledger.state.keys and key_of(2) in ledger.state.keys
    assert old not in ledger.state.named
    assert fid(1) in ledger.state.files and list(ledger.state.files[fid(1)].refs) != [old]  # the pin keeps it
    assert fid(2) in ledger.state.files
    assert ledger.state.counters["jobs_compacted"] == 1
    # the key is free again: submitting with it makes a new job
    submit(ledger, "list", {"tasks": [{"i": 9}]}, n=1, now=41 * DAY)
    assert ledger.state.jobs[jid(1)].spec["tasks"] == [{"i": 9}] and ledger.state.jobs[jid(1)].state == "active"
    # what remains survives a restart: a restored ledger is the same
    assert copy(ledger).snapshot() == ledger.snapshot()


def test_a_file_only_a_compacted_job_referred_to_leaves_the_ledger():
    ledger = Ledger()
    _ended_job(ledger, 1, 1 * DAY, file=1)
    apply(ledger, CompactJobs(2 * DAY, 31 * DAY))
    assert fid(1) not in ledger.state.files  # the storage nodes' collector deletes it


def test_a_finished_job_with_results_is_compacted_whole():
    ledger = Ledger()
    submit(ledger, "list", {"tasks": [{"i": 1}]}, n=1, now=0.0)
    run_task(ledger, jid(1), 0)
    assert ledger.state.jobs[jid(1)].state == "done"
    apply(ledger, CompactJobs(ledger.state.jobs[jid(1)].finished_at + 1, 100 * DAY))
    assert ledger.state.jobs == {} and ledger.state.keys == {}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.booleans()), min_size=1, max_size=12), st.floats(0, 100))
def test_compaction_forgets_exactly_the_ended_jobs_older_than_the_cut_off(jobs, cut):
    ledger = Ledger()
    for n, (day, ends) in enumerate(jobs, 1):
        if ends:
            _ended_job(ledger, n, day * DAY + 20)
        else:
            submit(ledger, "list", {"tasks": [{"i": n}]}, n=n, now=day * DAY)
    before = dict(ledger.state.jobs)
    apply(ledger, CompactJobs(cut * DAY, 200 * DAY))
    kept = {j for j, job in before.items() if job.state == "active" or job.finished_at >= cut * DAY}
    assert set(ledger.state.jobs) == kept
    assert {v[1] for v in ledger.state.keys.values()} == kept
    assert copy(ledger).snapshot() == ledger.snapshot()


def test_the_leader_proposes_compaction_once_a_job_is_older_than_the_retention():
    h = MasterHarness()
    h.core.retention_s = 10.0
    h.event(MessageReceived(API, CLIENT, 7, Submit(1, 0, 42, "list", {"tasks": [{"i": 1}]}), "m1"))
    h.flush()
    h.commit_all()
    (job,) = h.ledger.state.jobs
    h.ledger.apply(CancelJob(job, "stop", h.core.standing.wall(h.now)))
    h.event(TimerFired("expire", "e1"))
    h.flush()
    assert not h.proposed, "nothing is older than the retention yet"
    h.now += 100.0  # past the retention, and past the minute between looks
    effects = h.event(TimerFired("expire", "e2"))
    assert any(isinstance(e, StartTimer) and e.name == "expire" for e in effects)
    h.flush()
    assert h.proposed, "the leader proposed the compaction"
    h.commit_all()
    assert h.ledger.state.jobs == {}
    assert h.core.status(h.now)["core"]["jobs_compacted"] == 1


# ---- the disk alarm (etcd's NOSPACE) -------------------------------------------------------------


def test_a_master_short_of_disk_refuses_writes_that_grow_the_ledger_and_takes_the_rest():
    from master.core import CheckDisk, DiskChecked
    from proto.messages import CancelJob as CancelMessage
    from proto.messages import Error, FileRegister, JobList, QueryReply

    h = MasterHarness()
    effects = h.event(TimerFired("expire", "e1"))
    assert any(isinstance(e, CheckDisk) for e in effects)  # it looks (every few seconds)
    h.event(MessageReceived(API, CLIENT, 7, Submit(1, 0, 42, "list", {"tasks": [{"i": 1}]}), "m1"))
    h.flush()
    h.commit_all()
    (job,) = h.ledger.state.jobs
    effects = h.event(DiskChecked(100 << 20, "d1"))  # 100 MiB free: below the 256 MiB alarm
    assert any("disk alarm" in getattr(e, "text", "") for e in effects)
    assert h.core.status(h.now)["disk"]["alarm"] is True
    before = len(h.ledger.state.jobs)
    for m in (Submit(2, 0, 43, "list", {"tasks": [{"i": 2}]}), FileRegister(3, 1, 2, 10, 1, ["s1"], None, "f")):
        h.event(MessageReceived(API, CLIENT, 7, m, f"m{m.request_id}"))
        (err,) = h.take(Error)
        assert err.detail["code"] == "no_space" and err.request_id == m.request_id
    h.flush()
    assert not h.proposed and len(h.ledger.state.jobs) == before
    up, lo = int.from_bytes(job[:8], "big"), int.from_bytes(job[8:], "big")
    h.event(MessageReceived(API, CLIENT, 7, CancelMessage(4, up, lo, "make room"), "m4"))  # a cancel goes on
    h.flush()
    h.commit_all()
    assert h.ledger.state.jobs[job].state == "cancelled"
    h.event(MessageReceived(API, CLIENT, 7, JobList(5, 10, None), "m5"))  # and reads
    assert h.take(QueryReply)
    effects = h.event(DiskChecked(1 << 30, "d2"))  # space freed: the alarm clears
    assert any("cleared" in getattr(e, "text", "") for e in effects)
    h.event(MessageReceived(API, CLIENT, 7, Submit(6, 0, 44, "list", {"tasks": [{"i": 3}]}), "m6"))
    h.flush()
    assert h.proposed
