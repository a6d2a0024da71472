"""Futures for tasks run on the cluster: ``Client.submit``, ``map`` and ``run`` return these.

Theory of operation
-------------------
A call (``submit(fn, *args)``), a batch of calls (``map``) or a command (``run``) becomes a job
in the ledger, committed by a quorum before the call returns: a task's future exists only once
its task is durable. Its result is recorded by the masters when a worker finishes it, with the
value in the ledger (small) or in storage (large).

One thread per client (``Watcher``) learns the endings with the masters' WATCH long poll: it
asks the leader "anything past these cursors for these jobs?", the leader answers as soon as a
commit brings one (or after ``WAIT_MS``), and the thread resolves the futures and asks again at
once. A job added while a watch is parked sends a new watch straight away (the leader answers
the older one empty), so a fresh task is never waiting for the previous watch to time out. The
cursors are positions in the ledger's per-job list of endings, so a watch resumes unchanged on
a new leader after a failover; nothing is lost in between.

A job "unknown" to the master that answered counts only if that master has applied the entry
its submit committed at (the reply's ``log_index``, against the submit's): a leader cut off from
the others still believes it leads for up to a second, while the client may already have
submitted through the new one, and its ledger lacks that job. Such an answer is stale: the
watch goes to the next master, after a back-off.

``TaskFuture`` is a ``concurrent.futures.Future``: ``result``, ``exception``,
``add_done_callback``, ``concurrent.futures.wait`` and ``as_completed`` work as usual. A task
that raised gives its exception's line in a ``TaskError`` (the traceback, captured on the
worker, is in ``TaskError.stderr``); a command gives a ``CommandResult``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import cloudpickle
import zmq

from cluster.node import keys
from cluster.node.acting import wrap
from proto import AppReason, Codec, ProtocolError, new_node_id
from proto.messages import Error, NotLeader, QueryReply, Watch

log = logging.getLogger("cluster.client")

WAIT_MS = 10_000  # how long the leader may hold a watch
MAX_JOBS_PER_WATCH = 10_000


class TaskError(Exception):
    """A task failed for good: ``error`` is its one-line reason (e.g. ``ZeroDivisionError:
    division by zero``), ``stderr`` the end of what it wrote there (a traceback for a call),
    shown as a note under the exception. The subclasses say how it failed; a callable's own
    exception is raised as itself when it can be unpickled here (``task_exception``)."""

    def __init__(self, job: str, task: int, error: str, stderr: bytes = b"", attempts: int = 0) -> None:
        super().__init__(f"task {task} of job {job} failed: {error}")
        self.job = job
        self.task = task
        self.error = error
        self.stderr = stderr
        self.attempts = attempts


class TaskTimeout(TaskError):
    """The task ran past its ``timeout_s`` and was killed."""


class CommandFailed(TaskError):
    """A command ended with a non-zero status (``exit_code``) or was killed by a signal
    (``exit_code`` is then 128 + the signal's number, as a shell says it)."""

    def __init__(self, job: str, task: int, error: str, stderr: bytes = b"", attempts: int = 0,
                 exit_code: int = 1) -> None:
        super().__init__(job, task, error, stderr, attempts)
        self.exit_code = exit_code


def task_exception(job: str, task: int, kind: str, summary: dict, error: str, attempts: int) -> Exception:
    """The exception a failed task's future raises: the callable's own (with the worker's
    traceback as a note) when it travelled and unpickles; else a ``TaskError`` of the kind the
    worker reported (``worker.tasks.failure_kind``)."""
    stderr = summary.get("stderr", b"")
    stderr = stderr if isinstance(stderr, bytes) else b""
    failure = summary.get("failure")
    if failure == "timeout":
        exc: TaskError = TaskTimeout(job, task, error, stderr, attempts)
    elif kind == "command" and failure in ("exit", "signal"):
        code, signum = summary.get("exit_code"), summary.get("signal")
        code = code if isinstance(code, int) and code > 0 else 128 + signum if isinstance(signum, int) else 1
        exc = CommandFailed(job, task, error, stderr, attempts, code)
    else:
        exc = TaskError(job, task, error, stderr, attempts)
    told = stderr.decode("utf-8", "replace").rstrip()
    note = f"(task {task} of job {job}, on the worker" + (f"; what it wrote to stderr ends:)\n{told}" if told else ")")
    raised = summary.get("exception")
    if failure == "raised" and isinstance(raised, bytes):
        try:
            original = cloudpickle.loads(raised)
        except Exception:  # noqa: BLE001 - its class is not importable here: the TaskError stands
            original = None
        if isinstance(original, Exception):  # never a SystemExit or KeyboardInterrupt out of result()
            original.add_note(note)
            original.task_error = exc  # type: ignore[attr-defined] - job, task, attempts for who wants them
            return original
    exc.add_note(note)
    return exc


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: exit code, output (the end of it, when it was stored whole too)
    and the declared output files by name (file ids, hex)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    outputs: dict[str, str] = field(default_factory=dict)
    stdout_file: str | None = None
    stderr_file: str | None = None


_ENDED = ("FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED")  # concurrent.futures' final states


class TaskFuture(concurrent.futures.Future):
    """The future of one task: ``job`` (hex id) and ``task`` (its index in the job). A map's
    item whose chunk is not submitted yet has both None (``cluster.mapfeed``).

    ``condition``: one shared by many futures (a map's): a ``Future``'s own condition is ~1.4 KB
    of its ~1.6 KB, which made 100,000 futures take 160 MiB; shared, they take ~28 MiB. A shared
    condition is notified when any of its futures settles, so ``result`` and ``exception`` wait
    for their own future's end (``wait_for``) where ``Future``'s would take any wake-up for a
    timeout; ``wait`` and ``as_completed`` take each future's condition in turn (reentrant) and
    wait on their own events, so they work unchanged."""

    def __init__(self, job: str | None, task: int | None, kind: str,
                 condition: threading.Condition | None = None) -> None:
        super().__init__()
        if condition is not None:
            self._condition = condition
        self.job = job
        self.task = task
        self.kind = kind
        self.follower: Any = None  # the Client that made it (stream())
        self.set_running_or_notify_cancel()  # it is durable and queued: it cannot be cancelled here

    def __repr__(self) -> str:
        where = "(not submitted)" if self.job is None else f"{self.job}/{self.task}"
        return f"<TaskFuture {where} {self._state.lower()}>"

    def result(self, timeout: float | None = None) -> Any:
        self._wait_for_end(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_for_end(timeout)
        return super().exception(0)

    def _wait_for_end(self, timeout: float | None) -> None:
        with self._condition:
            if not self._condition.wait_for(self._ended, timeout):
                raise concurrent.futures.TimeoutError()

    def _ended(self) -> bool:
        return self._state in _ENDED

    def stream(self) -> Iterator[Any]:
        """Its output as it comes: ``cluster.follow.Line`` s (``at``, ``stream``, ``text``) from
        the worker that runs it, until it has ended there (``result()`` still has the whole
        output). E.g. ``for line in future.stream(): print(line.text)``."""
        if self.job is None:
            raise RuntimeError("this task is not submitted yet: its map submits it once earlier tasks end")
        if self.follower is None:
            raise RuntimeError("this future was not made by a Client: it has no output to follow")
        return self.follower.follow(self.job, self.task, done=self.done)


def resolve(future: TaskFuture, state: str, summary: dict | None, error: str | None, attempts: int,
            fetch: Callable[[str], bytes], result_file: bytes | str | None = None) -> None:
    """Settle ``future`` from a task's recorded ending (the WATCH reply or a TASK_QUERY)."""
    summary = summary or {}
    try:
        if state != "done":
            future.set_exception(task_exception(future.job, future.task, future.kind, summary, error or state, attempts))
            return
        future.set_result(decode_value(future.kind, summary, fetch, result_file))
    except Exception as exc:  # noqa: BLE001 - an undecodable value is this future's failure only
        if not future.done():
            future.set_exception(exc)


def decode_value(kind: str, summary: dict, fetch: Callable[[str], bytes], result_file: bytes | str | None = None) -> Any:
    """A task's value from its summary (or its result file, when the value was too large to
    travel inline): a call's return value, a command's ``CommandResult``."""
    if kind == "command":
        return CommandResult(summary.get("exit_code", 0) or 0, summary.get("stdout", b""), summary.get("stderr", b""),
                             dict(summary.get("outputs", {})), summary.get("stdout_file"), summary.get("stderr_file"))
    if "value" in summary:
        return cloudpickle.loads(summary["value"])
    if result_file:
        return cloudpickle.loads(fetch(result_file.hex() if isinstance(result_file, bytes) else result_file))
    return None


@dataclass
class _Watched:
    cursor: int = 0
    since: int = 0  # the log index its submit committed at: a master behind it cannot know the job
    futures: dict[int, TaskFuture] = field(default_factory=dict)


@dataclass
class _WatchCall:
    """The one WATCH in flight (request id, sent at) and when the next may go."""

    outstanding: tuple[int, float] | None = None
    rid: int = 0
    not_before: float = 0.0
    backoff: float = 0.05

    def back_off(self, now: float) -> None:
        self.not_before = now + self.backoff
        self.backoff = min(self.backoff * 2, 0.5)


class Watcher(threading.Thread):
    """Resolves the futures of one client from the leader's WATCH answers (see the module doc)."""

    def __init__(self, masters: list[str], fetch: Callable[[str], bytes], *, attempt_timeout: float = 1.0,
                 credentials: keys.Credentials | None = None) -> None:
        super().__init__(name="cluster-watcher", daemon=True)
        self.masters = masters
        self.credentials = credentials
        self.fetch = fetch
        self.attempt_timeout = attempt_timeout
        self.leader = 0
        self._lock = threading.Lock()
        self._jobs: dict[bytes, _Watched] = {}
        self._dirty = False
        self._closing = False
        self._ctx = zmq.Context()
        self._wake_addr = f"inproc://watcher-{id(self)}"
        self._wake_r = self._ctx.socket(zmq.PAIR)
        self._wake_r.bind(self._wake_addr)
        self._wake_w = self._ctx.socket(zmq.PAIR)
        self._wake_w.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        # watches sent; replies to the one out (with endings or an ended job in them: "news"); futures settled
        self.counters: dict[str, int] = {"watches": 0, "replies": 0, "news": 0, "resolved": 0}

    def add(self, job: str, futures: dict[int, TaskFuture], since: int = 0) -> None:
        """Watch ``futures`` (task id → future) of ``job`` until each is settled; ``since``: the
        Raft log index its submit committed at."""
        key = bytes.fromhex(job)
        with self._lock:
            watched = self._jobs.setdefault(key, _Watched())
            watched.since = max(watched.since, since)
            watched.futures.update(futures)
            self._dirty = True
        self._wake()

    def pending(self) -> int:
        with self._lock:
            return sum(len(w.futures) for w in self._jobs.values())

    def close(self) -> None:
        self._closing = True
        self._wake()
        self.join(5)
        with self._lock:
            for watched in self._jobs.values():
                for f in watched.futures.values():
                    if not f.done():
                        f.set_exception(RuntimeError("the client was closed before this task ended; "
                                                     "look it up with Client.task_result(job, task)"))
            self._jobs.clear()

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_w.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def run(self) -> None:
        codec = Codec(new_node_id())
        socks = []
        for address in self.masters:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)
            keys.connect(s, address, self.credentials)
            socks.append(s)
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        call = _WatchCall()
        try:
            while not self._closing:
                timeout = self._send_watch(codec, socks, call)
                for sock, _ in poller.poll(timeout):
                    if sock is self._wake_r:
                        while self._wake_r.poll(0):
                            self._wake_r.recv()
                    else:
                        self._read_replies(codec, sock, call)
                if call.outstanding is not None and time.monotonic() - call.outstanding[1] > WAIT_MS / 1000 + self.attempt_timeout:
                    call.outstanding = None  # the leader died holding it: ask the next master
                    self.leader = (self.leader + 1) % len(socks)
        finally:
            for s in socks:
                s.close(0)
            self._wake_r.close(0)
            with self._wake_lock:
                self._wake_w.close(0)
            self._ctx.term()

    def _send_watch(self, codec: Codec, socks: list[zmq.Socket], call: "_WatchCall") -> int:
        """Send a WATCH of every watched job when none is out (or the set changed) and the back-off
        allows; returns how long to poll, in ms."""
        now = time.monotonic()
        with self._lock:
            dirty, self._dirty = self._dirty, False
            jobs = {k: w.cursor for k, w in self._jobs.items() if w.futures}
        if jobs and (call.outstanding is None or dirty) and now >= call.not_before:
            call.rid += 1
            batch = dict(list(jobs.items())[:MAX_JOBS_PER_WATCH])
            try:
                act_for = self.credentials.act_for if self.credentials is not None else None
                codec.send(socks[self.leader], wrap(codec, Watch(call.rid, WAIT_MS, batch), act_for), flags=zmq.NOBLOCK)
                call.outstanding = (call.rid, now)
                self.counters["watches"] += 1
            except zmq.Again:  # that master is down: try the next
                self.leader = (self.leader + 1) % len(socks)
                call.outstanding = None
                call.back_off(now)
        elif dirty and not jobs:
            call.outstanding = None
        return 1000 if call.outstanding is not None or not jobs else max(1, int((call.not_before - now) * 1000) + 1)

    def _read_replies(self, codec: Codec, sock: zmq.Socket, call: "_WatchCall") -> None:
        """Take every reply waiting on ``sock``; only the answer to the WATCH out counts."""
        while True:
            try:
                _, _, reply = codec.recv(sock, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError:
                continue
            if call.outstanding is None or getattr(reply, "request_id", -1) != call.outstanding[0]:
                continue  # an answer to a watch we replaced
            call.outstanding = None
            if isinstance(reply, QueryReply):
                call.backoff = 0.05
                self.counters["replies"] += 1
                if isinstance(reply.value, dict) and (reply.value.get("jobs") or reply.value.get("unknown")):
                    self.counters["news"] += 1
                if not self._apply(reply.value, reply.log_index):
                    self.leader = (self.leader + 1) % len(self.masters)  # behind our submits: not the leader
                    call.back_off(time.monotonic())
            elif isinstance(reply, NotLeader):
                known = reply.leader in self.masters
                self.leader = self.masters.index(reply.leader) if known else (self.leader + 1) % len(self.masters)
                if not known:
                    call.back_off(time.monotonic())
            elif isinstance(reply, Error):
                self._on_error(reply)
                call.back_off(time.monotonic())

    def _on_error(self, reply: Error) -> None:
        if reply.reason not in (AppReason.UNAVAILABLE, AppReason.OUTCOME_UNKNOWN):
            log.warning("watch refused: %s", reply.text)
        self.leader = (self.leader + 1) % len(self.masters)

    def _apply(self, value: Any, applied: int) -> bool:
        """Settle what a WATCH answer says; False if it came from a master that has not applied
        some watched job's submit yet (its "unknown" for that job is stale, and is ignored)."""
        if not isinstance(value, dict):
            return True
        settled: list[tuple[TaskFuture, dict]] = []
        orphaned: list[tuple[TaskFuture, str]] = []
        current = True
        with self._lock:
            for job_hex in value.get("unknown", []):
                watched = self._jobs.get(bytes.fromhex(job_hex))
                if watched is not None and applied < watched.since:
                    current = False
                    continue
                self._jobs.pop(bytes.fromhex(job_hex), None)
                for f in (watched.futures.values() if watched else []):
                    orphaned.append((f, f"job {job_hex} is unknown to the leader"))
            for job_hex, entry in value.get("jobs", {}).items():
                key = bytes.fromhex(job_hex)
                watched = self._jobs.get(key)
                if watched is None:
                    continue
                watched.cursor = max(watched.cursor, entry.get("cursor", watched.cursor))
                for t in entry.get("tasks", []):
                    f = watched.futures.pop(t.get("task"), None)
                    if f is not None:
                        settled.append((f, t))
                if entry.get("state") not in (None, "active") and not entry.get("more"):
                    for f in watched.futures.values():  # the job ended without these (cancelled, failed fast)
                        orphaned.append((f, f"the job is {entry.get('state')}: {entry.get('error') or 'no result'}"))
                    watched.futures.clear()
                if not watched.futures:
                    del self._jobs[key]
        for f, t in settled:
            resolve(f, t.get("state", "failed"), t.get("summary"), t.get("error"), t.get("attempts", 0), self.fetch,
                    t.get("result_file"))
            self.counters["resolved"] += 1
        for f, why in orphaned:
            if not f.done():
                f.set_exception(TaskError(f.job, f.task, why))
        return current
