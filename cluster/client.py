"""The client library: submit, cancel, and read jobs and tasks on the masters.

Theory of operation
-------------------
The client holds one DEALER per master (``ZMQ_IMMEDIATE``: nothing queues towards a master that
is down, a send there fails at once and the client moves on). A request goes to the master
believed to lead; the answer decides what next:

- NOT_LEADER with an address: go there. NOT_LEADER without one (an election), UNAVAILABLE (no
  quorum) or OUTCOME_UNKNOWN (the leader was lost mid-commit): back off (50 ms, doubling to
  0.5 s) and try the next master.
- No answer within ``attempt_timeout``: the master is presumed down; try the next one.
- Anything else is the answer.

Every submit carries a 128-bit idempotency key (random unless given) that stays the same across
all its retries, and the ledger binds the key to one job: a retried submit never makes a second
job, even when the first try committed and only its answer was lost (etcd's approach).
``submit_many`` keeps a window of submits in flight, which is what makes bulk submission fast.

Reads go to the leader when one is known, else to any master; the answer says ``stale`` when it
did not come from a leader with a quorum (it may be behind). Past the ``timeout`` deadline the
client raises ``NoQuorum`` with what each master said, in words a user can act on.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import zmq

from proto import AppReason, Codec, ProtocolError, new_node_id
from proto.ids import join128, split128
from proto.messages import (
    CancelJob,
    Error,
    FileList,
    FileLookup,
    FileRegister,
    FileRelease,
    JobList,
    JobQuery,
    NotLeader,
    QueryReply,
    Submit,
    SubmitAck,
    TaskQuery,
)
from proto.types import Message

if TYPE_CHECKING:
    from cluster.futures import TaskFuture

RETRYABLE = {AppReason.UNAVAILABLE, AppReason.OUTCOME_UNKNOWN}
SPEC_BUDGET = 900 << 10  # bytes of task arguments per job (the masters refuse specs over 1 MiB)


class ClusterError(Exception):
    """Something the user should read: the message says what happened and what to do."""


class NoQuorum(ClusterError):
    """No master leader could take the request before the deadline."""


class Refused(ClusterError):
    """The masters refused the request; nothing changed. ``code`` is stable (e.g. ``spec_too_large``)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


class NotFound(ClusterError):
    """No such job or task."""


@dataclass(frozen=True)
class JobRef:
    """A submitted job: its id (hex) and the Raft log index its submit committed at."""

    job: str
    log_index: int
    key: str


@dataclass(frozen=True)
class FileRef:
    """A stored, registered file: its content id (hex), size, replicas and name."""

    id: str
    size: int
    replicas: list[str]
    name: str = ""


@dataclass(frozen=True)
class Answer:
    """A read's value; ``stale`` when no leader with a quorum answered (it may be behind)."""

    value: Any
    stale: bool
    term: int
    leader: str | None


@dataclass
class _Call:
    make: Callable[[int], Message]
    write: bool
    target: int
    request_id: int = 0
    sent_at: float | None = None
    not_before: float = 0.0
    backoff: float = 0.05
    tries: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    result: Any = None
    error: Exception | None = None
    done: bool = False
    stale_retry: bool = False


@dataclass(frozen=True)
class TaskOptions:
    """How tasks from ``submit``/``map``/``run`` run. ``need``: what a worker must offer
    (cores, memory_mb, gpus, labels, kernel). ``max_attempts`` counts runs lost to a dead worker;
    a task that fails by itself (raises, exits non-zero, times out) is retried only with
    ``retry_failed`` (Ray's ``retry_exceptions``). ``after``: jobs (ids, futures or JobRefs)
    that must be done before these tasks start; if one fails or is cancelled, these fail
    without running."""

    timeout_s: float | None = None
    memory_mb: int | None = None
    need: dict[str, Any] | None = None
    priority: int = 0
    max_attempts: int = 3
    retry_failed: bool = False
    after: tuple[Any, ...] = ()

    def replace(self, **changes: Any) -> "TaskOptions":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ClusterError(f"unknown task options {', '.join(sorted(unknown))}; "
                               f"known: {', '.join(f.name for f in dataclasses.fields(self))}")
        if "after" in changes:  # one job or several
            after = changes["after"]
            changes["after"] = (after,) if isinstance(after, str) or hasattr(after, "job") else tuple(after)
        return dataclasses.replace(self, **changes)

    def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        if self.memory_mb is not None:
            out["memory_mb"] = self.memory_mb
        if self.need:
            out["need"] = dict(self.need)
        return out

    def job(self) -> dict[str, Any]:
        out = {"priority": self.priority, "max_attempts": self.max_attempts, "retry_failed": self.retry_failed,
               "fail_fast": False}
        if self.after:
            out["after"] = sorted({getattr(x, "job", x) for x in self.after})
        return out


class Client:
    """Talks to the masters at ``masters`` (their client API addresses).

    Without ``masters`` it reads the cluster config: ``$CLUSTER_CONFIG`` if set, else
    ``cluster.toml`` in the default cluster directory (``$CLUSTER_HOME``, else ``~/.cluster``,
    where ``cluster up`` puts it); the config also gives ``storage`` and ``replicas`` unless
    they are passed."""

    def __init__(self, masters: Sequence[str] | None = None, *, timeout: float = 30.0, attempt_timeout: float = 1.0,
                 storage: dict[str, str] | None = None, replicas: int | None = None) -> None:
        if masters is None:
            from cluster.config import ConfigError, load_cluster_config
            from cluster.up import find_config

            path, looked = find_config()
            if path is None:
                raise ClusterError(f"no cluster config found ({looked}): start one with `cluster up` "
                                   "or pass masters=[...]")
            try:
                config = load_cluster_config(path)
            except ConfigError as exc:
                raise ClusterError(str(exc)) from None
            if not config.masters:
                raise ClusterError(f"{path}: no [masters.NAME] entries: add them or pass masters=[...]")
            masters = list(config.masters.values())
            storage = config.storage_nodes if storage is None else storage
            replicas = config.storage.replicas if replicas is None else replicas
        if not masters:
            raise ClusterError("no master addresses given: pass masters=['tcp://host:port', ...]")
        self.masters = list(masters)
        self.storage = dict(storage or {})  # storage node name → address, for upload/download
        self.replicas = 2 if replicas is None else replicas
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.leader = 0  # index of the master believed to lead
        self._ctx = zmq.Context()
        self._codec = Codec(new_node_id())
        self._sockets: list[zmq.Socket] = []
        for address in self.masters:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(address)
            self._sockets.append(sock)
        self._ids = itertools.count(random.getrandbits(40))
        self._watcher: Any = None
        self._task_options = TaskOptions()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        for sock in self._sockets:
            sock.close()
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the API -----------------------------------------------------------------------------

    def submit_job(self, kind: str, spec: dict[str, Any], *, key: bytes | None = None) -> JobRef:
        """Submit a job (``master.jobs`` says what a spec holds); returns once a quorum of
        masters has committed it."""
        return self.submit_many([(kind, spec)], keys=[key] if key else None)[0]

    # ---- tasks as futures ---------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "TaskFuture":
        """Run ``fn(*args, **kwargs)`` on a worker; returns its future once the task is durable
        (committed by a quorum of masters). Options: ``Client.options(...)``."""
        return self.map_args(fn, [(args, kwargs)])[0]

    def map(self, fn: Callable[..., Any], *iterables: Any) -> list["TaskFuture"]:
        """Run ``fn`` over the items of ``iterables`` (like the built-in ``map``), one task each,
        submitted as one job (several when the arguments are large); futures in input order."""
        return self.map_args(fn, [(args, {}) for args in zip(*iterables)])

    def map_args(self, fn: Callable[..., Any], calls: Sequence[tuple[tuple, dict]]) -> list["TaskFuture"]:
        """Run ``fn(*args, **kwargs)`` for each ``(args, kwargs)`` of ``calls``."""
        import cloudpickle

        from cluster.futures import TaskFuture

        try:
            program = cloudpickle.dumps(fn)
            tasks = [{"args": cloudpickle.dumps((tuple(a), dict(k)))} for a, k in calls]
        except Exception as exc:  # noqa: BLE001 - whatever pickling raises, the user gets one line
            raise ClusterError(f"cannot ship {getattr(fn, '__name__', fn)!r} or its arguments to the workers: "
                               f"{type(exc).__name__}: {exc}") from None
        if not tasks:
            return []
        name = getattr(fn, "__qualname__", getattr(fn, "__name__", "call"))
        run = {"kind": "call", "program": program, **self._task_options.run()}
        out: list[TaskFuture] = []
        for chunk in _chunks(tasks, SPEC_BUDGET - len(program)):
            spec = {"name": name, "run": run, "tasks": chunk, **self._task_options.job()}
            ref = self.submit_job("list", spec)
            futures = {i: TaskFuture(ref.job, i, "call") for i in range(len(chunk))}
            self._watch(ref.job, futures)
            out += futures.values()
        return out

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, inputs: dict[str, str] | None = None,
            outputs: Sequence[str] = ()) -> "TaskFuture":
        """Run a command on a worker: ``argv`` in a scratch directory, ``env`` added to a minimal
        environment, ``inputs`` (name → stored file id) visible there by name, ``outputs`` the
        files it must leave (stored, ids in the ``CommandResult``)."""
        from cluster.futures import TaskFuture

        argv = list(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ClusterError("a command is a non-empty list of strings, e.g. ['sort', '-o', 'out', 'in']")
        run = {"kind": "command", "argv": argv, "env": dict(env or {}), "inputs": dict(inputs or {}),
               "outputs": list(outputs), **self._task_options.run()}
        ref = self.submit_job("list", {"name": argv[0], "run": run, "tasks": [{}], **self._task_options.job()})
        future = TaskFuture(ref.job, 0, "command")
        self._watch(ref.job, {0: future})
        return future

    def options(self, **options: Any) -> "Client":
        """A view of this client whose ``submit``/``map``/``run`` use ``options``
        (``TaskOptions``: timeout_s, memory_mb, need, priority, max_attempts, retry_failed, after)."""
        import copy

        view = copy.copy(self)
        view._task_options = self._task_options.replace(**options)
        return view

    def task_result(self, job: str, task_id: int, *, kind: str = "call") -> Any:
        """The value of a finished task, looked up by id (raises ``TaskError`` if it failed)."""
        from cluster.futures import TaskFuture, resolve

        view = self.task(job, task_id).value
        if view.get("state") not in ("done", "failed"):
            raise ClusterError(f"task {task_id} of job {job} is {view.get('state')}: it has no result yet")
        future = TaskFuture(job, task_id, kind)
        attempts = view.get("attempts", [])
        errors = [a.get("error") for a in attempts if a.get("error")]
        result_file = bytes.fromhex(view["result_file"]) if view.get("result_file") else None
        resolve(future, view["state"], view.get("summary"), errors[-1] if errors else None, len(attempts),
                self._fetch, result_file)
        return future.result(0)

    def _watch(self, job: str, futures: dict) -> None:
        if self._watcher is None:
            from cluster.futures import Watcher

            self._watcher = Watcher(self.masters, self._fetch, attempt_timeout=self.attempt_timeout)
            self._watcher.start()
        self._watcher.add(job, futures)

    def _fetch(self, file_id: str) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="cluster-result-") as d:
            path = Path(d) / "value"
            self.download(file_id, path)
            return path.read_bytes()

    def submit_many(
        self,
        jobs: Iterable[tuple[str, dict[str, Any]]],
        *,
        keys: Sequence[bytes] | None = None,
        window: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> list[JobRef]:
        """Submit many jobs with up to ``window`` in flight; results in input order.
        A refused submit raises ``Refused`` after the others have finished."""
        jobs = list(jobs)
        keys = list(keys) if keys else [os.urandom(16) for _ in jobs]
        calls = [self._submit_call(kind, spec, key) for (kind, spec), key in zip(jobs, keys)]
        self._run(calls, window, progress)
        out = []
        for call, key in zip(calls, keys):
            if call.error is not None:
                raise call.error
            ack: SubmitAck = call.result
            job = join128(ack.job_uuid_upper, ack.job_uuid_lower).hex()
            out.append(JobRef(job, ack.log_index, key.hex()))
        return out

    def cancel(self, job: str, reason: str = "") -> dict[str, Any]:
        upper, lower = _split(job)
        return self._one(lambda rid: CancelJob(rid, upper, lower, reason), write=True).value

    def job(self, job: str) -> Answer:
        """A job's state and progress."""
        upper, lower = _split(job)
        return self._one(lambda rid: JobQuery(rid, upper, lower), write=False)

    def jobs(self, limit: int = 100, state: str | None = None) -> Answer:
        """The newest jobs, newest first."""
        return self._one(lambda rid: JobList(rid, limit, state), write=False)

    def task(self, job: str, task_id: int) -> Answer:
        """A task's state, attempts and result reference."""
        upper, lower = _split(job)
        return self._one(lambda rid: TaskQuery(rid, upper, lower, task_id), write=False)

    # ---- files ------------------------------------------------------------------------------

    def register_file(self, file_id: bytes, size: int, replicas: Sequence[str], *, owner: str | None = None,
                      name: str = "", pin: bool = False) -> dict[str, Any]:
        """Record a durable file in the ledger, referred to by job ``owner`` or a user ``pin``."""
        upper, lower = split128(file_id)
        job = _id_bytes(owner) if owner else None
        return self._one(lambda rid: FileRegister(rid, upper, lower, size, int(pin), list(replicas), job, name), write=True).value

    def release_files(self, file_id: str | None = None, *, owner: str | None = None) -> dict[str, Any]:
        """Drop ``owner``'s reference (a job; None: the user pin) on a file, or on every file of
        ``owner``. A file nothing refers to any more is deleted by the storage nodes."""
        fid = _id_bytes(file_id) if file_id else None
        job = _id_bytes(owner) if owner else None
        return self._one(lambda rid: FileRelease(rid, fid, job), write=True).value

    def lookup_files(self, file_ids: Sequence[bytes]) -> Answer:
        """The ledger's records (size, replicas, refs) of ``file_ids``, by hex id; None if unknown."""
        ids = list(file_ids)
        return self._one(lambda rid: FileLookup(rid, ids), write=False)

    def files(self, limit: int = 100, *, owner: str | None = None, after: str | None = None) -> Answer:
        """Registered files in id order (of one job with ``owner``); ``value["next"]`` pages on."""
        job = _id_bytes(owner) if owner else None
        start = _id_bytes(after) if after else None
        return self._one(lambda rid: FileList(rid, limit, job, start), write=False)

    def upload(self, path: str | os.PathLike[str], *, owner: str | None = None, name: str | None = None,
               copies: int | None = None, progress: Callable[[int], None] | None = None) -> FileRef:
        """Store a local file on ``copies`` storage nodes (default: the cluster's replicas), then
        register it, owned by job ``owner`` or pinned by the user. Returns its FileRef."""
        from cluster.files import upload_file

        return upload_file(self, path, owner=owner, name=name, copies=copies or self.replicas, progress=progress)

    def download(self, file_id: str, path: str | os.PathLike[str], *,
                 progress: Callable[[int], None] | None = None) -> int:
        """Fetch a stored file into ``path`` from any replica (failing over), verified by its
        content id; returns its size."""
        from cluster.files import download_file

        return download_file(self, _id_bytes(file_id), path, progress=progress)

    # ---- the engine --------------------------------------------------------------------------

    def _submit_call(self, kind: str, spec: dict[str, Any], key: bytes) -> _Call:
        upper, lower = split128(key)
        return _Call(lambda rid: Submit(rid, upper, lower, kind, spec), True, self.leader)

    def _one(self, make: Callable[[int], Message], write: bool) -> Any:
        call = _Call(make, write, self.leader)
        self._run([call], 1, None)
        if call.error is not None:
            raise call.error
        if isinstance(call.result, QueryReply):
            r = call.result
            return Answer(r.value, bool(r.stale), r.term, r.leader)
        return call.result

    def _run(self, calls: list[_Call], window: int, progress: Callable[[int], None] | None) -> None:
        deadline = time.monotonic() + self.timeout
        waiting = list(reversed(calls))  # popped from the end: input order
        in_flight: dict[int, _Call] = {}
        done = 0
        poller = zmq.Poller()
        for sock in self._sockets:
            poller.register(sock, zmq.POLLIN)
        while waiting or in_flight:
            now = time.monotonic()
            if now > deadline:
                for call in list(in_flight.values()) + waiting:
                    call.error = self._deadline_error(call)
                return
            held = []
            while waiting and len(in_flight) < window:
                call = waiting.pop()
                if call.not_before > now:
                    held.append(call)
                    continue
                if self._send(call, now):
                    in_flight[call.request_id] = call
                else:
                    held.append(call)
            waiting.extend(reversed(held))
            wait_ms = 20 if waiting else int(self.attempt_timeout * 1000 / 4) + 1
            for sock, _ in poller.poll(wait_ms):
                for _ in range(1024):
                    try:
                        _, _, reply = self._codec.recv(sock, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ProtocolError:
                        continue
                    call = in_flight.pop(getattr(reply, "request_id", -1), None)
                    if call is None:
                        continue  # an answer to a try we gave up on
                    self._on_reply(call, reply, time.monotonic())
                    if call.done:
                        done += 1
                        if progress is not None:
                            progress(done)
                    else:
                        waiting.append(call)
            now = time.monotonic()
            for rid, call in list(in_flight.items()):
                if now - call.sent_at > self.attempt_timeout:
                    del in_flight[rid]
                    call.notes[self.masters[call.target]] = f"no answer within {self.attempt_timeout:g} s"
                    call.target = (call.target + 1) % len(self.masters)
                    waiting.append(call)

    def _send(self, call: _Call, now: float) -> bool:
        call.request_id = next(self._ids)
        call.tries += 1
        try:
            self._codec.send(self._sockets[call.target], call.make(call.request_id), flags=zmq.NOBLOCK)
        except zmq.Again:  # not connected (IMMEDIATE): that master is down or starting
            call.notes[self.masters[call.target]] = "not reachable"
            call.target = (call.target + 1) % len(self.masters)
            if call.target == self.leader:
                call.not_before = now + call.backoff
                call.backoff = min(call.backoff * 2, 0.5)
            return False
        call.sent_at = now
        return True

    def _on_reply(self, call: _Call, reply: Message, now: float) -> None:
        here = self.masters[call.target]
        if isinstance(reply, NotLeader):
            call.notes[here] = f"not the leader (term {reply.term})"
            if reply.leader in self.masters:
                call.target = self.leader = self.masters.index(reply.leader)
            else:
                call.target = (call.target + 1) % len(self.masters)
                self._back_off(call, now)
            return
        if isinstance(reply, Error):
            code = reply.detail.get("code", "") if isinstance(reply.detail, dict) else ""
            if reply.reason in RETRYABLE:
                call.notes[here] = reply.text
                call.target = (call.target + 1) % len(self.masters)
                self._back_off(call, now)
                return
            call.done = True
            if reply.reason == AppReason.NOT_FOUND:
                call.error = NotFound(reply.text)
            else:
                call.error = Refused(code or "refused", reply.text)
            return
        if isinstance(reply, QueryReply) and reply.stale and not call.stale_retry and reply.leader in self.masters:
            leader = self.masters.index(reply.leader)
            if leader != call.target:  # a follower answered: ask the leader once
                call.stale_retry = True
                call.target = self.leader = leader
                return
        if call.write:
            self.leader = call.target
        call.result = reply
        call.done = True

    @staticmethod
    def _back_off(call: _Call, now: float) -> None:
        call.not_before = now + call.backoff * (0.5 + random.random())
        call.backoff = min(call.backoff * 2, 0.5)

    def _deadline_error(self, call: _Call) -> ClusterError:
        said = "; ".join(f"{m}: {why}" for m, why in call.notes.items()) or "no master answered"
        majority = len(self.masters) // 2 + 1
        if call.write:
            return NoQuorum(
                f"no master leader took the request within {self.timeout:g} s ({said}). Writes need a majority "
                f"({majority} of {len(self.masters)}) of masters up and connected; start the stopped ones "
                "(`cluster status` shows which) and retry: a retried submit with the same key is never doubled."
            )
        return NoQuorum(f"no master answered within {self.timeout:g} s ({said}); are the masters running?")


def _chunks(tasks: list[dict], budget: int) -> Iterable[list[dict]]:
    """Tasks in runs whose arguments fit one job's spec."""
    chunk: list[dict] = []
    size = 0
    for t in tasks:
        n = len(t["args"]) + 16
        if chunk and size + n > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(t)
        size += n
    if chunk:
        yield chunk


def _id_bytes(hex_id: str) -> bytes:
    return join128(*_split(hex_id))


def _split(hex_id: str) -> tuple[int, int]:
    try:
        value = bytes.fromhex(hex_id)
    except ValueError:
        raise ClusterError(f"{hex_id!r} is not an id (32 hex digits)") from None
    if len(value) != 16:
        raise ClusterError(f"{hex_id!r} is not an id (32 hex digits)")
    return split128(value)
