"""The ready index: the jobs that have ready tasks, by priority, so that a dispatch never scans
every job the ledger holds.

Theory of operation
-------------------
Each job's ready tasks are ``Job.ready``, an ordered set in the snapshot (the ledger's truth).
``ReadyIndex`` is derived from them and is never written to a snapshot: ``LedgerState`` builds
it whenever a state is made or decoded (``ReadyIndex.of``), and applying the log keeps it in
step, because every change to a job's ready set goes through it (``add``, ``remove``,
``clear``). Every master so holds the same index after the same log, and ``validate`` checks it
against a full scan of the jobs.

It holds, per job, its ready tasks that are not taken, oldest first (``queues``), and the jobs
with such tasks by priority (highest first) and, within one priority, in submission order
(``seq``): the order ``views.ready_tasks`` hands tasks out in. A dispatch thus costs
O(tasks handed out + jobs visited), however many finished jobs the ledger keeps for its
retention period (the masters' note of issue 23 measured completions falling from 5.9k/s to
4.2k/s as they piled up, when every dispatch scanned and sorted them all).

Tasks *taken* are the leader's soft state, not the log's: tasks proposed for assignment and not
yet committed (``InFlight``, the balancer stream's in-flight set). Taking a task moves it off
its job's queue, so that the next dispatch does not skip it again (it used to skip every task
in flight, on every dispatch: O(workers)). The committed assignment removes it from the ready
set, and so from ``taken``; a proposal that did not commit releases it to its place. Followers
take nothing; a state restored from a snapshot starts with nothing taken.

Pure: no I/O. Jobs are read through ``ReadyJob`` (the fields of ``master.state.Job`` it needs),
so this module imports nothing of the ledger's and ``master.state`` can build it.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any, Iterable, Iterator, Mapping, Protocol


class ReadyJob(Protocol):
    """What the index reads of a job (``master.state.Job``)."""

    job_id: bytes
    seq: int
    spec: dict[str, Any]
    ready: dict[int, None]


class ReadyIndex:
    """The jobs with ready tasks not taken, by priority then submission; see the module docstring."""

    def __init__(self) -> None:
        self.queues: dict[bytes, dict[int, None]] = {}  # job id → its ready tasks not taken, oldest first
        self.taken: dict[bytes, dict[int, None]] = {}  # job id → its ready tasks the leader proposed
        self._tiers: dict[int, list[int]] = {}  # priority → the seqs of the jobs in ``queues``, ascending
        self._priorities: list[int] = []  # the tiers' priorities, ascending
        self._by_seq: dict[int, bytes] = {}  # seq → job id, for the jobs in the tiers
        self._place: dict[bytes, tuple[int, int]] = {}  # job id → (priority, seq), for the jobs in the tiers

    @classmethod
    def of(cls, jobs: Mapping[bytes, ReadyJob]) -> "ReadyIndex":
        """The index of ``jobs``, nothing taken (a state just made or decoded)."""
        index = cls()
        for job in jobs.values():
            if job.ready:
                index.queues[job.job_id] = dict(job.ready)
                index._enter(job.job_id, job.spec["priority"], job.seq)
        return index

    # ---- the ledger's side: every change of a job's ready set (deterministic) -------------------

    def add(self, job: ReadyJob, task_ids: Iterable[int]) -> None:
        """``task_ids`` of ``job`` became ready (made, or to run again): last in its ready set."""
        queue = self.queues.get(job.job_id)
        if queue is None:
            queue = {}
        for task_id in task_ids:
            job.ready[task_id] = None
            queue[task_id] = None
        if queue and job.job_id not in self.queues:
            self.queues[job.job_id] = queue
            self._enter(job.job_id, job.spec["priority"], job.seq)

    def remove(self, job: ReadyJob, task_id: int) -> None:
        """``task_id`` left ``job``'s ready set (assigned, or done by an attempt it had before)."""
        del job.ready[task_id]
        job_id = job.job_id
        queue = self.queues.get(job_id)
        if queue is not None and task_id in queue:
            del queue[task_id]
            if not queue:
                del self.queues[job_id]
                self._leave(job_id)
            return
        taken = self.taken[job_id]
        del taken[task_id]
        if not taken:
            del self.taken[job_id]

    def clear(self, job: ReadyJob) -> None:
        """``job`` ended: none of its tasks is ready any more."""
        job.ready.clear()
        if self.queues.pop(job.job_id, None) is not None:
            self._leave(job.job_id)
        self.taken.pop(job.job_id, None)

    # ---- the leader's side: tasks proposed and not yet committed (soft) --------------------------

    def take(self, tasks: Iterable[tuple[bytes, int]]) -> None:
        """``tasks`` were proposed for assignment: off their queues until the assignment commits
        or ``release``. Those in no queue (work units, tasks no longer ready, or taken) are
        passed over."""
        for job_id, task_id in tasks:
            queue = self.queues.get(job_id)
            if queue is None or task_id not in queue:
                continue
            del queue[task_id]
            self.taken.setdefault(job_id, {})[task_id] = None
            if not queue:
                del self.queues[job_id]
                self._leave(job_id)

    def release(self, tasks: Iterable[tuple[bytes, int]], jobs: Mapping[bytes, ReadyJob]) -> None:
        """A proposal of ``tasks`` will not commit (or is answered): those still taken go back to
        their places in their queues. O(the ready tasks of their jobs): proposals seldom fail,
        and a committed one took its tasks out of the ready sets already."""
        touched: dict[bytes, None] = {}
        for job_id, task_id in tasks:
            taken = self.taken.get(job_id)
            if taken is None or task_id not in taken:
                continue
            del taken[task_id]
            if not taken:
                del self.taken[job_id]
            touched[job_id] = None
        for job_id in touched:
            self._requeue(jobs[job_id])

    def release_all(self, jobs: Mapping[bytes, ReadyJob]) -> None:
        """Nothing is in flight any more (a new balancer, or this master stopped leading)."""
        taken, self.taken = self.taken, {}
        for job_id in taken:
            self._requeue(jobs[job_id])

    def _requeue(self, job: ReadyJob) -> None:
        """Rebuild ``job``'s queue in the order of its ready set, less what is still taken."""
        taken = self.taken.get(job.job_id, {})
        queue = {t: None for t in job.ready if t not in taken}
        if not queue:
            return
        if job.job_id not in self.queues:
            self._enter(job.job_id, job.spec["priority"], job.seq)
        self.queues[job.job_id] = queue

    # ---- reading ---------------------------------------------------------------------------------

    def tiers(self) -> Iterator[Iterator[bytes]]:
        """For each priority, highest first: the ids of its jobs with tasks in their queues, in
        submission order. Lazy: a dispatch reads only as far as it hands tasks out."""
        for priority in reversed(self._priorities):
            yield map(self._by_seq.__getitem__, self._tiers[priority])

    def __len__(self) -> int:
        """How many jobs have ready tasks not taken."""
        return len(self.queues)

    # ---- the tiers -------------------------------------------------------------------------------

    def _enter(self, job_id: bytes, priority: int, seq: int) -> None:
        tier = self._tiers.get(priority)
        if tier is None:
            tier = self._tiers[priority] = []
            insort(self._priorities, priority)
        if not tier or seq > tier[-1]:
            tier.append(seq)  # the common case: a job newer than every other of its priority
        else:
            insort(tier, seq)
        self._by_seq[seq] = job_id
        self._place[job_id] = (priority, seq)

    def _leave(self, job_id: bytes) -> None:
        priority, seq = self._place.pop(job_id)
        tier = self._tiers[priority]
        del tier[bisect_left(tier, seq)]
        del self._by_seq[seq]
        if not tier:
            del self._tiers[priority]
            del self._priorities[bisect_left(self._priorities, priority)]

    # ---- invariants ------------------------------------------------------------------------------

    def validate(self, jobs: Mapping[bytes, ReadyJob]) -> None:
        """Raise AssertionError unless the index is what a full scan of ``jobs`` gives: each
        job's queue is its ready set, in order, less its taken tasks (themselves ready), and the
        tiers hold exactly the jobs with a queue, by priority and submission."""
        assert set(self.queues) <= jobs.keys() and set(self.taken) <= jobs.keys(), "the index names a job not held"
        assert all(self.queues.values()) and all(self.taken.values()), "an empty queue or taken set is kept"
        place = {}
        for job_id, job in jobs.items():
            taken = self.taken.get(job_id, {})
            assert taken.keys() <= job.ready.keys(), f"job {job_id.hex()}: a task taken is not ready"
            queue = [t for t in job.ready if t not in taken]
            assert list(self.queues.get(job_id, ())) == queue, f"job {job_id.hex()}: its queue is not its ready set"
            if queue:
                place[job_id] = (job.spec["priority"], job.seq)
        assert self._place == place, "the tiers do not hold exactly the jobs with a queue"
        tiers: dict[int, list[int]] = {}
        for priority, seq in sorted(place.values()):
            tiers.setdefault(priority, []).append(seq)
        assert self._tiers == tiers, "a tier is out of submission order"
        assert self._priorities == sorted(tiers), "the priorities are out of order"
        assert self._by_seq == {seq: job_id for job_id, (_, seq) in place.items()}, "the seq → job map is stale"


class InFlight:
    """The tasks the leader proposed for assignment and not yet committed, as a set (what
    ``BalancerStream.inflight`` holds), that also takes them off the ledger's ready index
    (``ReadyIndex.take``) and the work units among them off their tables' offers
    (``WorkState.take``, ``master.work_offer``), so that dispatching never skips them again; it
    keeps the units by spec (``WorkState.ready`` counts them as running).

    ``ledger`` is a ``master.ledger.Ledger`` (read through its ``state`` and ``work`` each time:
    a follower that installs a snapshot gets a new state, and with it an index taken of nothing).
    """

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self.tasks: set[tuple[bytes, int]] = set()
        self.units: dict[bytes, set[int]] = {}  # spec id → its units in flight

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, task: object) -> bool:
        return task in self.tasks

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return iter(self.tasks)

    def update(self, tasks: Iterable[tuple[bytes, int]]) -> None:
        """``tasks`` were proposed for assignment: taken off the index (and units off their offer)."""
        tasks = list(tasks)
        self.tasks.update(tasks)
        work = self.ledger.work
        if work.specs:  # (no per-task look-up where there are no work specs)
            units: dict[bytes, list[int]] = {}
            for job_id, task_id in tasks:
                if work.is_spec(job_id):
                    self.units.setdefault(job_id, set()).add(task_id)
                    units.setdefault(job_id, []).append(task_id)
            for sid, uids in units.items():
                work.take(sid, uids)
        self.ledger.state.ready_index.take(tasks)

    def difference_update(self, tasks: Iterable[tuple[bytes, int]]) -> None:
        """The proposal of ``tasks`` was answered: committed (they left the ready sets and the
        queues), refused or unknown (those still ready or available are offered again)."""
        tasks = list(tasks)
        self.tasks.difference_update(tasks)
        if self.units:
            units: dict[bytes, list[int]] = {}
            for job_id, task_id in tasks:
                in_flight = self.units.get(job_id)
                if in_flight is not None:
                    in_flight.discard(task_id)
                    units.setdefault(job_id, []).append(task_id)
                    if not in_flight:
                        del self.units[job_id]
            for sid, uids in units.items():
                self.ledger.work.release(sid, uids)
        state = self.ledger.state
        state.ready_index.release(tasks, state.jobs)

    def clear(self) -> None:
        """Nothing is in flight any more (a new balancer attached, or leadership ended)."""
        self.tasks.clear()
        self.units.clear()
        self.ledger.work.release_all()
        state = self.ledger.state
        state.ready_index.release_all(state.jobs)
