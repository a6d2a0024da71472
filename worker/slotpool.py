"""A worker's task slots driven from its node loop (issue 23): no thread per slot, none per task.

Theory of operation
-------------------
The core's ``RunTask`` reaches ``SlotPool.run`` on the loop's thread. The task is prepared (its
order read, its input files' paths found: ``TaskRunner.prepare``) and begun on a free slot,
which writes the request to its child's pipe and returns. Each slot's descriptors (its child's
reply and output pipes and its pidfd) are in the loop's poller (``NodeLoop.add_reader``), and
what they bring is turned here into the core's events: ``OutputRead`` for each chunk a task
writes, ``TaskEnded`` once the task is over and its result made, ``TaskTimed`` when a task with
a time limit begins (the core times it and answers ``StopTask``, performed by ``stop``).

Steps that may wait on the network or the disk run on a few threads (``Offload``), started only
when a task first needs one: preparing a task that reads stored files (fetched whole into the
cache without the mount), finishing one whose result stores files (outputs, a tile's boundary,
a large value or log), emptying a scratch directory that takes more than a few unlinks. Their
end comes back to the loop through a pipe it watches. A slot stays busy until its task's last
step is done, and only then does the core hear ``TaskEnded`` (and may start the next task on
it). A no-op callable or a plain command touches no thread: one write to the child's pipe, one
read of its reply.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from proto.ids import join128
from proto.messages import WorkerRequest
from worker.core import OutputRead, RunTask, StopTask, TaskEnded, TaskTimed
from worker.executor import Outcome
from worker.slots import Slot
from worker.taskuser import TaskUser
from worker.tasks import FAILED, Ended, Prepared, TaskRunner

log = logging.getLogger("cluster.worker")

OFFLOAD_THREADS = 2  # for storage: a worker's slots rarely all wait on it at once


class Offload:
    """A few threads for the steps that may block (module docstring), started on first use.
    ``submit(work, then)`` runs ``work()`` on one of them; ``then(result)`` (the exception, if
    ``work`` raised) runs on the loop's thread and returns the events for the core."""

    def __init__(self, add_reader: Callable, remove_reader: Callable, threads: int = OFFLOAD_THREADS) -> None:
        self.most = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._remove_reader = remove_reader
        add_reader(self._wake_r, self._finished)

    def submit(self, work: Callable[[], Any], then: Callable[[Any], list]) -> None:
        self._jobs.put((work, then))
        with self._lock:
            if self._idle == 0 and len(self._threads) < self.most:
                thread = threading.Thread(target=self._serve, name=f"offload-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                return
            work, then = job
            try:
                result = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which fails the task
                result = exc
            self._done.append((then, result))
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # a wake-up is pending already, or the pool is closing

    def _finished(self) -> list:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        events: list = []
        while self._done:
            then, result = self._done.popleft()
            events += then(result) or []
        return events

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads (a step under way is waited for, up to ``timeout``)."""
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._remove_reader(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)


@dataclass
class _Job:
    """A task on a slot, from ``RunTask`` to ``TaskEnded``."""

    request: WorkerRequest
    index: int
    prepared: Prepared | None = None
    running: bool = False  # begun on the slot, its outcome not yet come


class _Watcher:
    """A slot's descriptors in the loop's poller."""

    def __init__(self, loop: Any, pool: SlotPool, index: int) -> None:
        self.loop, self.pool, self.index = loop, pool, index

    def add(self, fd: int) -> None:
        self.loop.add_reader(fd, partial(self.pool._readable, self.index, fd))

    def remove(self, fd: int) -> None:
        self.loop.remove_reader(fd)


class SlotPool:
    """``slots`` slots driven from ``loop`` (a ``NodeLoop``, or anything with its
    ``add_reader``, ``remove_reader`` and ``stimulus``): ``run`` and ``stop`` are the performers of
    the core's ``RunTask`` and ``StopTask``."""

    def __init__(self, slots: int, runner: TaskRunner, loop: Any, *, task_user: TaskUser | None = None,
                 env: dict[str, str] | None = None, memory_bytes: int | None = None) -> None:
        self.runner = runner
        self.loop = loop
        runner.listen = self._heard
        # commands are started by the slots' children: a spawn here would stall the loop until the
        # command exec'd, ~0.8 ms a command on this 2-core machine under load (for every slot)
        self.slots = [Slot(i, env=env, task_user=task_user, memory_bytes=memory_bytes,
                           watcher=_Watcher(loop, self, i), spawn_here=False) for i in range(slots)]
        self.jobs: dict[int, _Job] = {}  # by slot index
        self.free = list(range(slots - 1, -1, -1))
        self.offload = Offload(loop.add_reader, loop.remove_reader)
        self._heard_events: list | None = None  # where output read during a slot's step goes

    def run(self, effect: RunTask) -> list:
        """Start the task on a free slot; its end comes later, from the slot's descriptors."""
        request = effect.request
        if not self.free:  # the core starts no more tasks than there are slots
            log.error("no free slot for task %s: %d slots, all busy", request.task_id, len(self.slots))
            return [self._ended(request, Ended(FAILED, -1, {}, error="the worker had no free slot"))]
        job = _Job(request, self.free.pop())
        self.jobs[job.index] = job
        if self.runner.prepare_blocks(request):
            self.offload.submit(partial(self.runner.prepare, job.index, request), partial(self._begin, job))
            return []
        return self._begin(job, self.runner.prepare(job.index, request))

    def stop(self, effect: StopTask) -> list:
        """Stop a task past its time limit (SIGTERM, or SIGKILL when final)."""
        for job in self.jobs.values():
            if job.running and join128(job.request.job_uuid_upper, job.request.job_uuid_lower) == effect.job \
                    and job.request.task_id == effect.task:
                self.slots[job.index].stop(effect.final)
        return []

    def close(self) -> None:
        """Stop the slots' children (a running task is killed with its child) and the threads."""
        for slot in self.slots:
            slot.close()
            slot.reap_closed()
        self.offload.close()

    # ---- a task's steps ----------------------------------------------------------------------

    def _begin(self, job: _Job, prepared: Prepared | Ended | BaseException) -> list:
        if isinstance(prepared, BaseException):  # a bug in prepare
            prepared = self.runner.failure(job.request, prepared)
        if isinstance(prepared, Ended):
            return self._done(job, prepared)
        job.prepared = prepared
        slot = self.slots[job.index]
        events: list = []
        self._heard_events = events
        try:
            outcome = self.runner.begin(slot, prepared)
        except Exception as exc:  # noqa: BLE001 - a bug: the attempt's, never the worker's
            return events + self._settle(job, self.runner.failure(job.request, exc))
        finally:
            self._heard_events = None
        if outcome is not None:
            return events + self._after(job, outcome)
        job.running = True
        steps = slot.deadlines()
        if steps:
            term = steps[0][0] if not steps[0][1] else None
            events.append(TaskTimed(join128(job.request.job_uuid_upper, job.request.job_uuid_lower),
                                    job.request.task_id, term, steps[-1][0]))
        return events

    def _readable(self, index: int, fd: int) -> list:
        """One of slot ``index``'s descriptors is readable (the loop calls this)."""
        slot = self.slots[index]
        events: list = []
        self._heard_events = events
        try:
            outcome = slot.readable(fd)
        except Exception as exc:  # noqa: BLE001 - a bug in the slot: replace it rather than leave it stuck
            log.exception("slot %d failed reading descriptor %d; it is replaced", index, fd)
            return events + self._replace(index, exc)
        finally:
            self._heard_events = None
        job = self.jobs.get(index)
        if outcome is not None and job is not None and job.running:
            events += self._after(job, outcome)
        return events

    def _replace(self, index: int, exc: Exception) -> list:
        """Close slot ``index`` (its processes killed), put a fresh one in its place, and fail the
        task it ran, if any."""
        old = self.slots[index]
        try:
            old.close()
            old.reap_closed()
        except Exception:  # noqa: BLE001 - the slot was broken already; its replacement serves
            log.exception("slot %d could not be closed cleanly", index)
        self.slots[index] = Slot(index, env=old.env, task_user=old.task_user, memory_bytes=old.memory_bytes,
                                 watcher=_Watcher(self.loop, self, index), spawn_here=old.spawn_here)
        job = self.jobs.get(index)
        if job is None or not job.running:
            return []
        job.running = False
        return self._settle(job, self.runner.failure(job.request, exc))

    def _after(self, job: _Job, outcome: Outcome) -> list:
        """The slot's part is over: the result made (and stored, off the loop if it must be)."""
        job.running = False
        prepared = job.prepared
        if self.runner.finish_blocks(prepared, outcome):
            def finish() -> Ended:
                ended = self.runner.finish(prepared, outcome)
                self.runner.tidy(prepared.place, quick=False)
                return ended
            self.offload.submit(finish, partial(self._finished, job))
            return []
        return self._settle(job, self.runner.finish(prepared, outcome))

    def _finished(self, job: _Job, ended: Ended | BaseException) -> list:
        if isinstance(ended, BaseException):
            ended = self.runner.failure(job.request, ended)
        return self._done(job, ended)

    def _settle(self, job: _Job, ended: Ended) -> list:
        """Empty the scratch directory (off the loop if that is more than a few unlinks), then end."""
        place = job.prepared.place if job.prepared is not None else None
        if place is None or self.runner.tidy(place, quick=True):
            return self._done(job, ended)
        self.offload.submit(partial(self.runner.tidy, place, quick=False), lambda _: self._done(job, ended))
        return []

    def _done(self, job: _Job, ended: Ended) -> list:
        """The slot is free again; the core hears the end."""
        del self.jobs[job.index]
        self.free.append(job.index)
        return [self._ended(job.request, ended)]

    def _ended(self, m: WorkerRequest, ended: Ended) -> TaskEnded:
        return TaskEnded(join128(m.job_uuid_upper, m.job_uuid_lower), m.task_id, (m.fence_term, m.fence_sequence),
                         ended.outcome, ended.exit_code, ended.summary, ended.result_file, ended.error, ended.files,
                         ended.cached, self.loop.stimulus("task-ended"))

    def _heard(self, job: bytes, task: int, stream: int, chunk: bytes) -> None:
        """A task's output as a slot reads it: to the core, stamped now (worker.output)."""
        if self._heard_events is not None:
            self._heard_events.append(OutputRead(job, task, stream, chunk, time.time()))
