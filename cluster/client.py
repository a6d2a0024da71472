"""The client library: submit, cancel, and read jobs and tasks on the masters.

Theory of operation
-------------------
Requests travel over a ``MasterLink`` (``cluster.node.masterlink``: leader discovery, retries,
deadlines), the same link the nodes use. The client adds what users touch: jobs, tasks as
futures (resolved by a WATCH long poll, ``cluster.futures``), uploads and downloads
(``cluster.files``).

Every submit carries a 128-bit idempotency key (random unless given) that stays the same across
all its retries, and the ledger binds the key to one job: a retried submit never makes a second
job, even when the first try committed and only its answer was lost (etcd's approach).
``submit_many`` keeps a window of submits in flight, which is what makes bulk submission fast.

``map`` over many items submits them chunk by chunk from a thread of its own, keeping at most
``map_window`` tasks outstanding (``cluster.mapfeed``): bounded memory here and on the masters,
which refuse a client past their own limit (``too_many_pending``, ``master.api``); a submit so
refused is tried again with the same key once some of the client's tasks have ended.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cloudpickle

from cluster.files import DownloadFailed, FileRef, UploadFailed, download_file, file_id_text, upload_file
from cluster.follow import Line, follow
from cluster.futures import TaskFuture, Watcher, resolve
from cluster.mapfeed import MAP_CHUNK, MAP_WINDOW, TOO_MANY_PENDING, Chunker, MapFeed, MapFeeder
from cluster.node.config import ConfigError, find_config, load_cluster_config
from cluster.node.keys import KeysError, client_credentials, for_address
from cluster.node.masterlink import (Answer, Call, ClusterError, MasterLink, NoQuorum, NotFound, Refused,
                                     split_id)
from proto.ids import join128, split128
from proto.messages import CancelJob, JobList, JobQuery, Submit, SubmitAck, TaskQuery

__all__ = ["Answer", "Client", "ClusterError", "DownloadFailed", "FileRef", "JobRef", "NoQuorum", "NotFound", "Refused", "TaskOptions",
           "UploadFailed"]

SPEC_BUDGET = 900 << 10  # bytes of task arguments per job (the masters refuse specs over 1 MiB)
NO_KWARGS: dict[str, Any] = {}  # map's items have none (shared: it is copied when pickled)


@dataclass(frozen=True)
class JobRef:
    """A submitted job: its id (hex) and the Raft log index its submit committed at."""

    job: str
    log_index: int
    key: str


@dataclass(frozen=True)
class TaskOptions:
    """How tasks from ``submit``/``map``/``run`` run. ``need``: what a worker must offer
    (cores, memory_mb, gpus, labels, kernel). A task that fails by itself (raises, exits
    non-zero, times out) is retried only with ``retry_failed`` (Ray's ``retry_exceptions``), up to
    ``max_attempts`` runs; runs lost to a dead worker are retried apart from those, up to
    ``max_lost`` (so a flaky cluster never fails sound work, and a task that kills every worker
    it lands on still ends). ``after``: jobs (ids, futures or JobRefs)
    that must be done before these tasks start; if one fails or is cancelled, these fail
    without running."""

    timeout_s: float | None = None
    memory_mb: int | None = None
    need: dict[str, Any] | None = None
    priority: int = 0
    max_attempts: int = 3
    max_lost: int = 10
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
        out = {"priority": self.priority, "max_attempts": self.max_attempts, "max_lost": self.max_lost,
               "retry_failed": self.retry_failed, "fail_fast": False}
        if self.after:
            after = {getattr(x, "job", x) for x in self.after}
            if None in after:
                raise ClusterError("after= names a future whose task is not submitted yet (a long map submits "
                                   "its items as earlier ones end): name it once its job is set")
            out["after"] = sorted(after)
        return out


class Client:
    """Talks to the masters at ``masters`` (their client API addresses).

    Without ``masters`` it reads the cluster config: ``$CLUSTER_CONFIG`` if set, else
    ``cluster.toml`` in the default cluster directory (``$CLUSTER_HOME``, else ``~/.cluster``,
    where ``cluster up`` puts it), or ``config``; the config also gives ``storage`` and
    ``replicas`` unless they are passed, and the keys: the client authenticates with ``key`` (a
    secret key file), else ``$CLUSTER_KEY``, else the config's client key. Given ``masters``
    alone, it uses the keys already loaded for their addresses in this process.

    ``act_for``: a gateway (a key of role ``gateway``) makes every request for that user of its
    own, who owns what it submits, pins and reads as ``GATEWAY/act_for``; see doc/security.md.
    ``balancers``: their addresses (their workers' ports), where ``follow`` finds the workers;
    the config gives them. ``map_window``: the most tasks this client keeps outstanding
    (submitted, not ended) through ``map``; ``map_chunk``: the most tasks per job a map submits."""

    def __init__(self, masters: Sequence[str] | None = None, *, timeout: float = 30.0, attempt_timeout: float = 1.0,
                 storage: dict[str, str] | None = None, replicas: int | None = None,
                 config: str | Path | None = None, key: str | Path | None = None,
                 act_for: str | None = None, balancers: Sequence[str] | None = None,
                 map_window: int = MAP_WINDOW, map_chunk: int = MAP_CHUNK) -> None:
        credentials = None  # without a config: the keys this process loaded for the masters' addresses
        balancers = list(balancers or [])  # where the workers' output ports are listed (cluster.follow)
        if masters is None or config is not None:
            path, looked = find_config(None, Path(config) if config is not None else None)
            if path is None:
                raise ClusterError(f"no cluster config found ({looked}): start one with `cluster up` "
                                   "or pass masters=[...]")
            try:
                config = load_cluster_config(path)
                # a key named here is this client's alone; else the key is the process's default
                credentials = client_credentials(config.security, config.servers(), key, remember=key is None)
            except (ConfigError, KeysError) as exc:
                raise ClusterError(str(exc)) from None
            if not config.masters:
                raise ClusterError(f"{path}: no [masters.NAME] entries: add them or pass masters=[...]")
            masters = list(config.masters.values()) if masters is None else masters
            storage = config.storage_nodes if storage is None else storage
            replicas = config.storage.replicas if replicas is None else replicas
            balancers = balancers or [b.workers for b in config.balancers.values()]
        if act_for is not None:  # a gateway's client, for one of its users (cluster.node.acting)
            if not masters:
                raise ClusterError("act_for needs the masters: pass masters=[...] or config=")
            credentials = dataclasses.replace(credentials or for_address(list(masters)[0]), act_for=act_for)
        self.link = MasterLink(masters or [], timeout=timeout, attempt_timeout=attempt_timeout, credentials=credentials)
        self.masters = self.link.masters
        self.balancers = balancers
        self.storage = dict(storage or {})  # storage node name → address, for upload/download
        self.replicas = 2 if replicas is None else replicas
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self._watcher: Any = None
        self._watch_lock = threading.Lock()  # the map thread and the caller may both make the watcher
        self._task_options = TaskOptions()
        # shared with the views options() makes: one window per client
        self._maps = MapFeeder(self._connect_submitter, window=map_window, chunk=map_chunk, patience=timeout)

    @property
    def map_window(self) -> int:
        """The most tasks this client keeps outstanding through ``map``."""
        return self._maps.window.capacity

    @property
    def outstanding(self) -> int:
        """Tasks submitted through ``map`` that have not ended yet."""
        return self._maps.window.outstanding

    @property
    def most_outstanding(self) -> int:
        """The most tasks that were ever outstanding through ``map`` at once (never over ``map_window``)."""
        return self._maps.window.most

    @property
    def leader(self) -> int:
        """The index in ``masters`` of the master believed to lead (the link follows redirects)."""
        return self.link.leader

    def close(self) -> None:
        self._maps.close()
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self.link.close()

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

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on a worker; returns its future once the task is durable
        (committed by a quorum of masters). Options: ``Client.options(...)``."""
        program = self._program(fn)
        try:
            task = {"args": cloudpickle.dumps((args, kwargs))}
        except Exception as exc:  # noqa: BLE001 - whatever pickling raises, the user gets one line
            raise _cannot_ship(fn, exc) from None
        ref = self.submit_job("list", self._call_spec(fn, program, [task]))
        future = TaskFuture(ref.job, 0, "call")
        self._watch(ref.job, {0: future}, ref.log_index)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Any,
            progress: Callable[[int], None] | None = None) -> list[TaskFuture]:
        """Run ``fn`` over the items of ``iterables`` (like the built-in ``map``), one task each;
        futures in input order. Returns once the first chunk of tasks is durable; the rest are
        submitted as earlier tasks end, within ``map_window`` (``map_args`` says more)."""
        items = list(zip(*iterables))
        return self._map(fn, len(items), ((args, NO_KWARGS) for args in items), progress)

    def map_args(self, fn: Callable[..., Any], calls: Sequence[tuple[tuple, dict]], *,
                 progress: Callable[[int], None] | None = None) -> list[TaskFuture]:
        """Run ``fn(*args, **kwargs)`` for each ``(args, kwargs)`` of ``calls``; futures in input order.

        The calls go as jobs of at most ``map_chunk`` tasks, each pickled only when its job is
        submitted, with at most ``map_window`` tasks of this client outstanding: so memory here
        and on the masters stays bounded however many calls there are. Returns once the first
        job is durable (what would refuse every job raises here, as does an item of it that
        cannot be pickled); the later jobs are submitted by the client's map thread as tasks end.
        A later job that is refused (or finds no quorum) fails its futures with that error and
        the map's remaining ones with a ``ClusterError`` naming it; an item that cannot be
        pickled fails its own future. Arguments are pickled when their job is submitted: do not
        change them in place before then. ``progress(n)``: told of each job's ``n`` durable tasks
        (from the map thread). A future's ``job`` and ``task`` are None until its job is submitted."""
        return self._map(fn, len(calls), iter(calls), progress)

    def _map(self, fn: Callable[..., Any], count: int, calls: Any,
             progress: Callable[[int], None] | None) -> list[TaskFuture]:
        program = self._program(fn)
        if count == 0:
            return []
        shared = threading.Condition()  # one for the map's futures (TaskFuture says why)
        futures = [TaskFuture(None, None, "call", shared) for _ in range(count)]
        feed = MapFeed(Chunker(calls, futures, SPEC_BUDGET - len(program)),
                       lambda tasks: self._call_spec(fn, program, tasks),
                       lambda ref, chunk: self._watch(ref.job, chunk, ref.log_index), progress)
        self._maps.feed(feed)
        return futures

    def _program(self, fn: Callable[..., Any]) -> bytes:
        try:
            return cloudpickle.dumps(fn)
        except Exception as exc:  # noqa: BLE001 - whatever pickling raises, the user gets one line
            raise _cannot_ship(fn, exc) from None

    def _call_spec(self, fn: Callable[..., Any], program: bytes, tasks: list[dict]) -> dict[str, Any]:
        """A job spec that calls ``fn`` (pickled: ``program``) once per task."""
        name = getattr(fn, "__qualname__", getattr(fn, "__name__", "call"))
        run = {"kind": "call", "program": program, **self._task_options.run()}
        return {"name": name, "run": run, "tasks": tasks, **self._task_options.job()}

    def _connect_submitter(self) -> "_LinkSubmitter":
        """A link of its own for the map thread (a ZeroMQ socket belongs to one thread)."""
        return _LinkSubmitter(MasterLink(self.masters, timeout=self.timeout, attempt_timeout=self.attempt_timeout,
                                         credentials=self.link.credentials))

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            inputs: dict[str, FileRef | str] | None = None, outputs: Sequence[str] = ()) -> TaskFuture:
        """Run a command on a worker: ``argv`` in a scratch directory, ``env`` added to a minimal
        environment, ``inputs`` (name → a stored file: the ``FileRef`` ``upload`` returned, or
        its id) visible there by name, ``outputs`` the files it must leave (stored, ids in the
        ``CommandResult``). An input that is no file id is refused here, before any submit."""
        argv = list(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ClusterError("a command is a non-empty list of strings, e.g. ['sort', '-o', 'out', 'in']")
        files = {name: file_id_text(ref, f"input {name!r}") for name, ref in (inputs or {}).items()}
        run = {"kind": "command", "argv": argv, "env": dict(env or {}), "inputs": files,
               "outputs": list(outputs), **self._task_options.run()}
        ref = self.submit_job("list", {"name": argv[0], "run": run, "tasks": [{}], **self._task_options.job()})
        future = TaskFuture(ref.job, 0, "command")
        self._watch(ref.job, {0: future}, ref.log_index)
        return future

    def options(self, **options: Any) -> "Client":
        """A view of this client whose ``submit``/``map``/``run`` use ``options``
        (``TaskOptions``: timeout_s, memory_mb, need, priority, max_attempts, max_lost, retry_failed,
        after)."""
        view = copy.copy(self)
        view._task_options = self._task_options.replace(**options)
        return view

    def task_result(self, job: str, task_id: int, *, kind: str = "call") -> Any:
        """The value of a finished task, looked up by id (raises ``TaskError`` if it failed)."""
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

    def follow(self, job: str, task: int, *, done: Callable[[], bool] | None = None,
               state: dict[str, Any] | None = None, live: bool = True) -> Iterator[Line]:
        """Task ``task`` of ``job``'s output lines as they come (``cluster.follow.Line``: time,
        stream, text), from the worker that runs it, until it has ended there; nothing if no
        worker can be reached. ``done``: whether the task has ended (asked of the masters when
        not given). Needs a client made from the cluster config (it names the balancers)."""
        if not self.balancers:
            raise ClusterError("following output needs the cluster config (Client(config=...)): it names the balancers")

        def ended() -> bool:
            return self.task(job, task).value.get("state") in ("done", "failed", "cancelled")

        return follow(self.balancers, self.link.credentials, job, task, done=done or ended, state=state, live=live)

    def _watch(self, job: str, futures: dict, since: int = 0) -> None:
        with self._watch_lock:
            if self._watcher is None:
                self._watcher = Watcher(self.masters, self._fetch, attempt_timeout=self.attempt_timeout,
                                        credentials=self.link.credentials)
                self._watcher.start()
        for future in futures.values():
            future.follower = self  # future.stream() follows its output through this client
        self._watcher.add(job, futures, since)

    def _fetch(self, file_id: str) -> bytes:
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
        A refused submit raises ``Refused`` after the others have finished; one refused because
        this client has too many tasks pending (``too_many_pending``) is tried again, with the
        same key, backing off until ``timeout`` has passed."""
        return submit_jobs(self.link, list(jobs), list(keys) if keys else None, window, progress, self.timeout)

    def cancel(self, job: str, reason: str = "") -> dict[str, Any]:
        upper, lower = split_id(job)
        return self.link.request(lambda rid: CancelJob(rid, upper, lower, reason), write=True).value

    def job(self, job: str) -> Answer:
        """A job's state and progress."""
        upper, lower = split_id(job)
        return self.link.request(lambda rid: JobQuery(rid, upper, lower), write=False)

    def jobs(self, limit: int = 100, state: str | None = None) -> Answer:
        """The newest jobs, newest first."""
        return self.link.request(lambda rid: JobList(rid, limit, state), write=False)

    def task(self, job: str, task_id: int) -> Answer:
        """A task's state, attempts and result reference."""
        upper, lower = split_id(job)
        return self.link.request(lambda rid: TaskQuery(rid, upper, lower, task_id), write=False)

    # ---- files ------------------------------------------------------------------------------

    def register_file(self, file_id: bytes, size: int, replicas: Sequence[str], *, owner: str | None = None,
                      name: str = "", pin: bool = False) -> dict[str, Any]:
        """Record a durable file in the ledger, referred to by job ``owner`` or a user ``pin``."""
        return self.link.register_file(file_id, size, replicas, owner=owner, name=name, pin=pin)

    def release_files(self, file_id: FileRef | str | None = None, *, owner: str | None = None) -> dict[str, Any]:
        """Drop ``owner``'s reference (a job; None: the user pin) on a file (a ``FileRef`` or its
        id), or on every file of ``owner``. A file nothing refers to any more is deleted by the
        storage nodes."""
        return self.link.release_files(None if file_id is None else file_id_text(file_id), owner=owner)

    def lookup_files(self, file_ids: Sequence[FileRef | str | bytes]) -> Answer:
        """The ledger's records (size, replicas, refs) of ``file_ids`` (FileRefs, hex ids or 16
        bytes each), by hex id; None if unknown."""
        return self.link.lookup_files([bytes.fromhex(file_id_text(f)) for f in file_ids])

    def files(self, limit: int = 100, *, owner: str | None = None, after: str | None = None) -> Answer:
        """Registered files in id order (of one job with ``owner``); ``value["next"]`` pages on."""
        return self.link.files(limit, owner=owner, after=after)

    def upload(self, path: str | os.PathLike[str], *, owner: str | None = None, name: str | None = None,
               copies: int | None = None, progress: Callable[[int], None] | None = None) -> FileRef:
        """Store a local file on ``copies`` storage nodes (default: the cluster's replicas), then
        register it, owned by job ``owner`` or pinned by the user. Returns its FileRef."""
        if owner is not None:
            self.job(owner)  # NotFound before any byte moves, rather than an unregistered upload
        return upload_file(self.link, self.storage, path, owner=owner, name=name, copies=copies or self.replicas,
                           progress=progress)

    def download(self, file_id: FileRef | str, path: str | os.PathLike[str], *,
                 progress: Callable[[int], None] | None = None) -> int:
        """Fetch a stored file (a ``FileRef`` or its id) into ``path`` from any replica (failing
        over), verified by its content id; returns its size."""
        return download_file(self.link, self.storage, bytes.fromhex(file_id_text(file_id)), path, progress=progress)

def _cannot_ship(fn: Any, exc: Exception) -> ClusterError:
    return ClusterError(f"cannot ship {getattr(fn, '__name__', fn)!r} or its arguments to the workers: "
                        f"{type(exc).__name__}: {exc}")


def submit_jobs(link: MasterLink, jobs: list[tuple[str, dict[str, Any]]], keys: list[bytes] | None, window: int,
                progress: Callable[[int], None] | None, patience: float) -> list[JobRef]:
    """``Client.submit_many`` over ``link``: the jobs refused ``too_many_pending`` go again (same
    keys) after a back-off, until ``patience`` seconds have passed."""
    keys = keys or [os.urandom(16) for _ in jobs]
    calls = [_submit_call(link, kind, spec, key) for (kind, spec), key in zip(jobs, keys)]
    todo = list(range(len(calls)))
    give_up_at, delay = time.monotonic() + patience, 0.05
    while True:
        link.run([calls[i] for i in todo], window, progress)
        busy = [i for i in todo if isinstance(calls[i].error, Refused) and calls[i].error.code == TOO_MANY_PENDING]
        if not busy or time.monotonic() + delay > give_up_at:
            break
        time.sleep(delay)  # the masters hold too many of our tasks: some must end first
        delay = min(delay * 2, 1.0)
        for i in busy:
            calls[i] = _submit_call(link, jobs[i][0], jobs[i][1], keys[i])
        todo = busy
    out = []
    for call, key in zip(calls, keys):
        if call.error is not None:
            raise call.error
        ack: SubmitAck = call.result
        job = join128(ack.job_uuid_upper, ack.job_uuid_lower).hex()
        out.append(JobRef(job, ack.log_index, key.hex()))
    return out


def _submit_call(link: MasterLink, kind: str, spec: dict[str, Any], key: bytes) -> Call:
    upper, lower = split128(key)
    return link.call(lambda rid: Submit(rid, upper, lower, kind, spec), write=True)


class _LinkSubmitter:
    """The map thread's submits, over a link of its own (``cluster.mapfeed.Submitter``): one job
    at a time; the feeder does its own back-off, so a busy refusal is raised at once."""

    def __init__(self, link: MasterLink) -> None:
        self.link = link

    def submit(self, kind: str, spec: dict[str, Any], key: bytes) -> JobRef:
        return submit_jobs(self.link, [(kind, spec)], [key], 1, None, 0.0)[0]

    def close(self) -> None:
        self.link.close()
