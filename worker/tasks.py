"""What a worker does with one task: read its order, run it on a slot, store what it made.

Theory of operation
-------------------
The master's WORKER_REQUEST carries the job's ``run`` section (``arguments["run"]``), the task's
own arguments (``arguments["task"]``), a ``program`` (the job's shipped callable) and the file
ids of the task's inputs (e.g. the boundaries of the neighbouring tiles). Three kinds:

- ``call``: ``program`` is ``cloudpickle.dumps(fn)``, the task's ``args`` is
  ``cloudpickle.dumps((args, kwargs))``; it runs in the slot's persistent child process.
- ``command``: ``argv`` (a list), ``env`` (added to a minimal environment), ``inputs``
  (name → file id hex: the stored file appears under that name in the scratch directory),
  ``outputs`` (file names the command must leave in its scratch directory), from the job's
  ``run`` with the task's own values taking precedence; started by the slot's child with
  posix_spawn (a fork under a memory limit).
- ``tile``: a Smith-Waterman tile (``worker.tiles``): ``run`` names the two sequence files
  (``a``, ``b``: file id hex) and the grid; the inputs are the neighbours' boundary files.

Limits (``timeout_s``, ``memory_mb``) come from ``run`` or the task. A task's value, output or
log small enough (``INLINE_MAX``) travels in the result summary, which the ledger keeps; a
bigger one is stored (replicated) in storage and registered with the job when the result is
recorded (TASK_RESULT ``files``). Every failure here becomes a failed outcome with one line that
says what went wrong: a bad task never takes its worker down.

With a task user (``--task-user``; worker/taskuser.py says how tasks are started as it) the
scratch directory is the task's, so the worker trusts nothing in it: what it stores of a task's
files (outputs, a tile's boundary, a trace's CIGAR) is first copied, through a descriptor opened
without following symbolic links (``taskuser.open_beneath``), into a directory only the worker
can reach (``private_root/slot-N``), and the copy is what is hashed, uploaded and cached (no
task process can change it afterwards, nor pass off a link to the worker's key as its output);
what the worker writes itself (a large value, a long log) goes there too, never into the
scratch directory. Stored files a task reads come through the FUSE view (mounted with
allow_other); without the mount, the cache's copy is hard-linked (or copied) into
``scratch_root/inputs-N``, which the task user may read but not change, since the cache
itself is closed to it. What a task left that the worker cannot remove through the shared group
is removed by a process run as the task user (``taskuser.clear_as``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Any, Callable

import msgspec

from proto.ids import join128
from proto.messages import Outcome as TaskOutcome  # the slot's own Outcome is a run's record
from proto.messages import WorkerRequest
from proto.fileids import file_id_of_path, parse_id
from cluster.node.storagelink import LinkPool, TransferError, upload_ranked
from worker import slot_child, taskuser, tiles, trace_tasks
from worker.executor import Limits, Outcome
from worker.taskuser import TaskUser

log = logging.getLogger("cluster.worker")

DONE, FAILED = TaskOutcome.DONE, TaskOutcome.FAILED
INLINE_MAX = 64 << 10  # a value or log up to this size travels in the summary
LOG_INLINE = 4 << 10  # stdout/stderr kept inline (the tail) when the whole is stored
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


class TaskError(Exception):
    """A task order that cannot run as given; the message is the task's error line."""


@dataclass
class Ended:
    """How one task ended, as TASK_RESULT will say it."""

    outcome: int
    exit_code: int
    summary: dict[str, Any]
    result_file: bytes | None = None
    error: str | None = None
    files: list[list[Any]] = field(default_factory=list)
    cached: tuple[bytes, ...] = ()


def failure_kind(outcome: Any) -> str:
    """How a failed attempt failed, in the words a client's exception types follow
    (``cluster.futures``): ``timeout``, ``signal`` (killed), ``raised`` (a callable raised),
    ``exit`` (a command's non-zero status), ``error`` (anything else: it could not run)."""
    if outcome.timed_out:
        return "timeout"
    if outcome.killed_by_signal:
        return "signal"
    if outcome.kind == "callable" and outcome.exit_code == slot_child.RAISED:
        return "raised"
    if outcome.kind == "command" and outcome.exit_code:
        return "exit"
    return "error"


def output_digest(data: bytes, mode: Any) -> bytes:
    """The digest a redundant work unit's replica votes with (master.workspec), of its whole
    output (stdout, or a callable's pickled value): ``bytes`` as it is; ``text`` with trailing
    blanks on each line and trailing empty lines ignored; ``json`` parsed and written back with
    sorted keys (output that does not parse is digested as it is, so it can still agree with an
    identical one)."""
    if mode == "text":
        lines = [line.rstrip() for line in data.decode("utf-8", "replace").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        data = "\n".join(lines).encode()
    elif mode == "json":
        try:
            data = b"json\0" + json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
        except (ValueError, RecursionError):
            pass
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class _Place:
    """Where one task's files are: ``scratch`` is its working directory; ``own`` is where the
    worker writes its own files for the task (``scratch`` itself without a task user, else a
    directory only the worker reaches); ``inputs``, with a task user and no mount, is where
    stored files are staged for the task to read. ``private``: something went to ``own`` or
    ``inputs`` for this task, to be removed with it."""

    scratch: Path
    own: Path
    inputs: Path | None = None
    taken: int = 0
    private: bool = False


@dataclass
class Prepared:
    """A task ready for a slot: its order read, its files' paths found (``TaskRunner.prepare``).
    ``order`` is what the slot takes (the kind's own arguments); ``task`` the task's own
    arguments (``compare``)."""

    request: WorkerRequest
    kind: str
    place: _Place
    limits: Limits
    order: dict[str, Any]
    task: dict[str, Any]


class TaskRunner:
    """Runs tasks for one worker. ``files`` (a ``worker.files.WorkerFiles``) makes stored files
    local paths; ``links`` stores results (None: no storage, large results fail clearly).
    ``task_user``: the slots run tasks as that user (module docstring); the worker's own files
    for a task then go under ``private_root`` (default: ``private`` beside ``scratch_root``).

    A task goes through four steps, so that the worker's loop runs the quick ones itself and
    hands only those that may wait on storage to a thread: ``prepare`` (read the order, find the
    input files' paths: blocks when ``prepare_blocks``), ``begin`` on a slot (never blocks; its
    ``Outcome`` comes from the slot), ``finish`` (what the outcome becomes, and what is stored:
    blocks when ``finish_blocks``) and ``tidy`` (empty the scratch directory). ``run`` does all
    four in turn, waiting for the slot."""

    def __init__(self, name: str, scratch_root: Path, *, files: Any = None, links: LinkPool | None = None,
                 copies: int = 1, task_user: TaskUser | None = None, private_root: Path | None = None,
                 listen: Callable[[bytes, int, int, bytes], None] | None = None) -> None:
        self.name = name
        # (job, task, stream, chunk): hears a command's or a callable's output as it comes (worker.output)
        self.listen = listen
        self.scratch_root = Path(os.path.abspath(scratch_root))
        self.files = files
        self.links = links
        self.copies = copies
        self.task_user = task_user
        self.private_root = Path(os.path.abspath(private_root or self.scratch_root.parent / "private"))
        self._places: dict[int, _Place] = {}

    def run(self, slot: Any, request: WorkerRequest) -> Ended:
        """Run ``request`` on ``slot`` (a ``worker.slots.Slot``) and wait for its end; never
        raises for the task's faults."""
        prepared = self.prepare(getattr(slot, "index", 0), request)
        if isinstance(prepared, Ended):
            return prepared
        outcome = self.begin(slot, prepared)
        if outcome is None:
            outcome = slot._wait(None)
        ended = self.finish(prepared, outcome)
        self.tidy(prepared.place, quick=False)
        return ended

    # ---- the four steps ----------------------------------------------------------------------

    @staticmethod
    def prepare_blocks(request: WorkerRequest) -> bool:
        """Whether ``prepare`` may wait on storage: the task reads stored files."""
        if request.kind in ("tile", "trace"):
            return True
        if request.kind != "command" or not isinstance(request.arguments, dict):
            return False
        return any(isinstance(part, dict) and part.get("inputs") for part in
                   (request.arguments.get("run"), request.arguments.get("task")))

    def prepare(self, index: int, request: WorkerRequest) -> Prepared | Ended:
        """The task ``request`` ready for slot ``index``, or how it failed (its order is wrong,
        an input is missing: the scratch directory is tidied already)."""
        place = None
        try:
            place = self._place(index)
            args = request.arguments if isinstance(request.arguments, dict) else {}
            run = args.get("run", {}) if isinstance(args.get("run", {}), dict) else {}
            task = args.get("task", {}) if isinstance(args.get("task", {}), dict) else {}
            limits = _limits(run, task)
            if request.kind == "call":
                order = self._call_order(request, task)
            elif request.kind == "command":
                order = self._command_order(run, task, place)
            elif request.kind == "tile":
                order = self._tile_order(request, run, task, place)
            elif request.kind == "trace":
                order = self._trace_order(run, task, place)
            else:
                raise TaskError(f"unknown task kind {request.kind!r} (this worker runs call, command, tile, trace)")
            return Prepared(request, request.kind, place, limits, order, task)
        except Exception as exc:  # noqa: BLE001 - a bad order, or a bug: the attempt's, never the worker's
            ended = self.failure(request, exc)
        if place is not None:
            self.tidy(place, quick=False)
        return ended

    def begin(self, slot: Any, prepared: Prepared) -> Outcome | None:
        """Start the task on ``slot``: None when it runs (its ``Outcome`` comes from the slot),
        else its Outcome at once."""
        order, place, limits = prepared.order, prepared.place, prepared.limits
        listen = self._listener(prepared.request)
        if prepared.kind == "call":
            return slot.begin_callable(prepared.request.program, order["args"], place.scratch, limits, listen=listen)
        if prepared.kind == "command":
            return slot.begin_command(order["argv"], order["env"], place.scratch, order["inputs"], order["outputs"],
                                      limits, listen=listen)
        if prepared.kind == "tile":
            return slot.begin_tile(order, place.scratch, limits)
        return slot.begin_trace(order, place.scratch, limits)

    def finish_blocks(self, prepared: Prepared, outcome: Outcome) -> bool:
        """Whether ``finish`` stores something (and so may wait on storage)."""
        if self.links is not None and any(len(data or b"") > LOG_INLINE for data in (outcome.stdout, outcome.stderr)):
            return True
        if prepared.kind == "call":
            return outcome.ok and outcome.result is not None and len(outcome.result) > INLINE_MAX
        if prepared.kind == "command":
            return bool(outcome.outputs)
        return outcome.ok and (prepared.kind == "tile" or "cigar" in outcome.outputs)

    def finish(self, prepared: Prepared, outcome: Outcome) -> Ended:
        """What the task's ``outcome`` becomes, its files stored; never raises."""
        try:
            if prepared.kind == "call":
                return self._call(prepared, outcome)
            if prepared.kind == "command":
                return self._command(prepared, outcome)
            if prepared.kind == "tile":
                return self._tile(prepared, outcome)
            return self._trace(prepared, outcome)
        except Exception as exc:  # noqa: BLE001 - storing failed, or a bug: the attempt's
            return self.failure(prepared.request, exc)

    def tidy(self, place: _Place, *, quick: bool) -> bool:
        """Empty the task's scratch directory (and the worker's own files for it). ``quick``:
        only if that is a few unlinks (the loop's thread must not wait); False if it was not."""
        try:
            if quick:
                if not _empty_quickly(place.scratch):
                    return False
            else:
                self._empty(place)
            if place.private:
                _empty(place.own, None)
                if place.inputs is not None:
                    _empty(place.inputs, None)
                place.private = False
            place.taken = 0
        except OSError as exc:
            if quick:
                return False
            log.warning("cannot empty the scratch directory %s: %s", place.scratch, exc)
        return True

    def failure(self, request: WorkerRequest, exc: BaseException) -> Ended:
        """How a task failed in the worker: ``exc`` is a ``TaskError`` (its line) or a bug (logged)."""
        if isinstance(exc, TaskError):
            return Ended(FAILED, -1, {}, error=str(exc))
        job = join128(request.job_uuid_upper, request.job_uuid_lower)
        log.error("task %s/%s failed in the worker", job.hex(), request.task_id, exc_info=exc)
        return Ended(FAILED, -1, {}, error=f"worker {self.name}: {type(exc).__name__}: {exc}")

    def _place(self, index: int) -> _Place:
        place = self._places.get(index)
        if place is not None:
            return place
        scratch = self.scratch_root / f"slot-{index}"
        if self.task_user is None:
            place = _Place(scratch, scratch)
        else:
            own = self.private_root / f"slot-{index}"
            inputs = self.scratch_root / f"inputs-{index}"
            if not own.is_dir():
                own.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not inputs.is_dir():  # the task user reads (group G), only the worker writes
                inputs.mkdir(mode=0o700, exist_ok=True)
                os.chown(inputs, -1, self.task_user.gid)
                os.chmod(inputs, 0o750)
            place = _Place(scratch, own, inputs)
        taskuser.task_dir(scratch, self.task_user)
        self._places[index] = place
        return place

    def _empty(self, place: _Place) -> None:
        try:
            _empty(place.scratch, self.task_user)
        except PermissionError:
            if self.task_user is None:
                raise
            # the task chmodded something away from the group: remove it as the task user
            taskuser.clear_as(self.task_user, place.scratch)
            _empty(place.scratch, self.task_user)

    # ---- kinds: the order ---------------------------------------------------------------------

    @staticmethod
    def _call_order(request: WorkerRequest, task: dict) -> dict[str, Any]:
        arguments = task.get("args")
        if not isinstance(arguments, bytes) or not request.program:
            raise TaskError("a call task needs the job's program (a pickled function) and the task's 'args' bytes")
        return {"args": arguments}

    def _command_order(self, run: dict, task: dict, place: _Place) -> dict[str, Any]:
        argv = task.get("argv", run.get("argv"))
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise TaskError("a command task needs 'argv': a non-empty list of strings")
        env = {**BASE_ENV, "CLUSTER_WORKER": self.name}  # as Slurm's SLURMD_NODENAME: which machine runs it
        for source in (run.get("env", {}), task.get("env", {})):
            if not isinstance(source, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in source.items()):
                raise TaskError("'env' must map names to strings")
            env.update(source)
        named = {**_map(run.get("inputs", {}), "inputs"), **_map(task.get("inputs", {}), "inputs")}
        outputs = task.get("outputs", run.get("outputs", []))
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise TaskError("'outputs' must be a list of file names")
        inputs: dict[str, Path] = {}
        for name, hex_id in named.items():
            fid = parse_id(hex_id) if isinstance(hex_id, str) else None
            if fid is None:
                raise TaskError(f"input {name!r}: {hex_id!r} is not a file id (32 hex digits)")
            inputs[name] = self._path(fid, place)
        return {"argv": argv, "env": env, "inputs": inputs, "outputs": outputs}

    def _tile_order(self, request: WorkerRequest, run: dict, task: dict, place: _Place) -> dict[str, Any]:
        paths = {}
        for side in ("a", "b"):
            fid = parse_id(run.get(side)) if isinstance(run.get(side), str) else None
            if fid is None:
                raise TaskError(f"a tile task needs '{side}': the file id of a sequence")
            paths[side] = str(self._path(fid, place))
        boundaries = [str(self._path(f, place)) for f in request.input_files]
        # only the tile's own keys: the job's run section also holds scheduling keys (need,
        # limits) that are not the kernel's business
        order = {k: v for k, v in {**run, **task}.items() if k in tiles.REQUEST_KEYS}
        order.update(a=paths["a"], b=paths["b"], boundaries=boundaries)
        return order

    def _trace_order(self, run: dict, task: dict, place: _Place) -> dict[str, Any]:
        order = {k: v for k, v in {**run, **task}.items() if k in trace_tasks.REQUEST_KEYS}
        for side in ("a", "b"):
            fid = parse_id(order.get(side)) if isinstance(order.get(side), str) else None
            if fid is None:
                raise TaskError(f"a trace task needs '{side}': the file id of a sequence")
            order[side] = str(self._path(fid, place))
        if "rows" in order:
            rows = order["rows"]
            if not isinstance(rows, list) or not all(isinstance(r, str) and parse_id(r) for r in rows):
                raise TaskError("'rows' must list the special-rows files' ids")
            missing = []
            paths = []
            for hex_id in rows:
                try:
                    paths.append(str(self._path(parse_id(hex_id), place)))
                except TaskError:
                    missing.append(hex_id)
            if missing:
                raise TaskError(f"{len(missing)} of the {len(rows)} special-rows files are no longer stored "
                                f"(first {missing[0]}): the score pass must be recomputed")
            order["rows"] = paths
        return order

    # ---- kinds: the outcome -------------------------------------------------------------------

    def _call(self, prepared: Prepared, outcome: Outcome) -> Ended:
        place = prepared.place
        ended = self._base(outcome)
        if outcome.exception is not None and len(outcome.exception) <= INLINE_MAX:
            ended.summary["exception"] = outcome.exception  # what it raised, pickled: the caller raises it again
        if outcome.ok and outcome.result is not None:
            if len(outcome.result) <= INLINE_MAX:
                ended.summary["value"] = outcome.result
            else:
                path = place.own / "value.pkl"
                place.private = True
                path.write_bytes(outcome.result)
                ended.result_file = self._store(path, "value.pkl", ended, place)
                ended.summary["value_size"] = len(outcome.result)
        self._logs(outcome, place, ended)
        if outcome.ok and "compare" in prepared.task:
            ended.summary["digest"] = output_digest(outcome.result or b"", prepared.task["compare"])
        return ended

    def _command(self, prepared: Prepared, outcome: Outcome) -> Ended:
        place = prepared.place
        ended = self._base(outcome)
        ended.summary["exit_code"] = outcome.exit_code
        for name, path in sorted(outcome.outputs.items()):
            fid = self._store(path, name, ended, place)
            ended.summary.setdefault("outputs", {})[name] = fid.hex()
        self._logs(outcome, place, ended)
        if outcome.ok and "compare" in prepared.task:
            ended.summary["digest"] = output_digest(outcome.stdout or b"", prepared.task["compare"])
        return ended

    def _tile(self, prepared: Prepared, outcome: Outcome) -> Ended:
        place = prepared.place
        ended = self._base(outcome)
        if outcome.ok:
            ended.summary.update(msgspec.msgpack.decode(outcome.result) if outcome.result else {})
            boundary = outcome.outputs.get("boundary")
            if boundary is None:
                raise TaskError("the tile left no boundary file")
            ended.result_file = self._store(boundary, "boundary", ended, place)
            rows = outcome.outputs.get("rows")
            if rows is not None:  # the traceback's special rows: the job keeps them (keep_files)
                self._store(rows, "rows", ended, place)
                ended.summary["rows_bytes"] = ended.files[-1][1]  # the size of what was stored
        self._logs(outcome, place, ended)
        return ended

    def _trace(self, prepared: Prepared, outcome: Outcome) -> Ended:
        place = prepared.place
        ended = self._base(outcome)
        if outcome.ok:
            ended.summary.update(msgspec.msgpack.decode(outcome.result) if outcome.result else {})
            if "cigar" in outcome.outputs:
                ended.result_file = self._store(outcome.outputs["cigar"], "cigar", ended, place)
        self._logs(outcome, place, ended)
        return ended

    # ---- pieces ------------------------------------------------------------------------------

    def _listener(self, request: WorkerRequest) -> Callable[[int, bytes], None] | None:
        if self.listen is None:
            return None
        return partial(self.listen, join128(request.job_uuid_upper, request.job_uuid_lower), request.task_id)

    def _base(self, outcome: Outcome) -> Ended:
        summary: dict[str, Any] = {"wall_s": round(outcome.wall_s, 6), "cpu_s": round(outcome.cpu_s, 6)}
        if outcome.max_rss_bytes:
            summary["max_rss_bytes"] = outcome.max_rss_bytes
        code = outcome.exit_code if outcome.exit_code is not None else -1
        if not outcome.ok:
            summary["failure"] = failure_kind(outcome)
            if outcome.killed_by_signal:
                summary["signal"] = outcome.killed_by_signal
        return Ended(DONE if outcome.ok else FAILED, code, summary, error=None if outcome.ok else outcome.error)

    def _logs(self, outcome: Outcome, place: _Place, ended: Ended) -> None:
        """stdout/stderr: inline when small, else stored whole with the tail inline."""
        for stream in ("stdout", "stderr"):
            data = getattr(outcome, stream) or b""
            if not data:
                continue
            if len(data) <= LOG_INLINE or self.links is None:
                ended.summary[stream] = data[-LOG_INLINE:]
                continue
            path = place.own / f".{stream}"
            place.private = True
            path.write_bytes(data)
            ended.summary[stream] = data[-LOG_INLINE:]
            ended.summary[f"{stream}_file"] = self._store(path, stream, ended, place).hex()

    def _path(self, fid: bytes, place: _Place | None = None) -> Path:
        if self.files is None:
            raise TaskError(f"this worker has no storage access, and the task reads file {fid.hex()}")
        try:
            path = self.files.path(fid)
        except FileNotFoundError:
            raise TaskError(f"the task's input {fid.hex()} is not a stored file") from None
        if place is None or place.inputs is None:
            return path
        mountpoint = getattr(self.files, "mountpoint", None)
        if mountpoint is not None and Path(path).is_relative_to(mountpoint):
            return path  # the FUSE view, which the task user reads (allow_other)
        place.private = True
        return _stage(Path(path), place.inputs / fid.hex())

    def _take(self, path: Path, name: str, place: _Place) -> Path:
        """A private copy of the file ``path`` a task left in its scratch directory, made from
        a descriptor opened without following a symbolic link (module docstring)."""
        try:
            fd = taskuser.open_beneath(self.scratch_root, path.relative_to(self.scratch_root))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TaskError(f"{name}: not a regular file of the task's own in its scratch directory "
                            f"({reason})") from None
        place.taken += 1
        place.private = True
        copy = place.own / f"taken-{place.taken}"
        try:
            out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                _copy_fd(fd, out)
            finally:
                os.close(out)
        finally:
            os.close(fd)
        return copy

    def _store(self, path: Path, name: str, ended: Ended, place: _Place | None = None) -> bytes:
        """Store ``path`` (replicated) and list it with the result; returns its file id."""
        if place is not None and self.task_user is not None and Path(path).is_relative_to(place.scratch):
            path = self._take(Path(path), name, place)
        if self.links is None:
            raise TaskError(f"this worker has no storage nodes configured: {name} "
                            f"({path.stat().st_size} bytes) cannot be kept")
        size = path.stat().st_size
        fid = file_id_of_path(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            # a task's output may be stored degraded (fewer copies while a storage node is down):
            # losing the job to a storage outage would be worse, and the upkeep adds the copies
            replicas = upload_ranked(self.links, fid, size, lambda offset, n: os.pread(fd, n, offset),
                                     copies=self.copies, origin=f"worker:{self.name}", min_copies=1)
        except TransferError as exc:
            raise TaskError(f"could not store {name}: {exc}") from None
        finally:
            os.close(fd)
        ended.files.append([fid, size, sorted(replicas), name])
        if self.files is not None:
            try:
                self.files.add_own(fid, path)
                ended.cached += (fid,)
            except OSError:
                pass  # the cache is an optimisation
        return fid


def _stage(source: Path, dest: Path) -> Path:
    """``source`` (the cache's copy of a stored file, which the task user cannot reach) made
    readable to the task at ``dest``: a hard link when the file is readable by others (the
    cache's files are 0644 in a 0700 directory), else a copy."""
    if os.path.lexists(dest):
        return dest
    try:
        if os.stat(source).st_mode & 0o004:
            os.link(source, dest)
            return dest
    except OSError:
        pass  # another filesystem, or links refused: copy
    partial = dest.with_name(dest.name + ".part")
    shutil.copyfile(source, partial)
    os.chmod(partial, 0o644)
    os.replace(partial, dest)
    return dest


def _copy_fd(source: int, dest: int) -> None:
    """Copy the file at ``source`` (from its start) to ``dest``."""
    try:
        while os.copy_file_range(source, dest, 1 << 30):
            pass
        return
    except OSError:  # not supported between these files: plain reads and writes
        os.lseek(source, 0, os.SEEK_SET)
        os.lseek(dest, 0, os.SEEK_SET)
        os.ftruncate(dest, 0)
    while chunk := os.read(source, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dest, view):]


def _empty(scratch: Path, task_user: TaskUser | None = None) -> None:
    """Make ``scratch`` an empty directory; a missing one is made (an ``taskuser.task_dir``
    with a task user)."""
    try:
        entries = list(os.scandir(scratch))
    except FileNotFoundError:
        taskuser.task_dir(scratch, task_user)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


QUICK_ENTRIES = 32  # a scratch directory with more than this is emptied off the loop's thread


def _empty_quickly(scratch: Path) -> bool:
    """Empty ``scratch`` if that takes a few unlinks (most tasks leave nothing); False, having
    removed nothing, if it holds a directory or more than ``QUICK_ENTRIES`` entries or is
    missing, or False part way if an unlink is refused (a task user's file)."""
    try:
        if not os.listdir(scratch):  # most tasks leave nothing: names only, no entry objects
            return True
        with os.scandir(scratch) as listing:
            entries = list(listing)
    except OSError:
        return False
    if len(entries) > QUICK_ENTRIES or any(e.is_dir(follow_symlinks=False) for e in entries):
        return False
    for entry in entries:
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
    return True


def _limits(run: dict, task: dict) -> Limits:
    timeout = task.get("timeout_s", run.get("timeout_s"))
    memory = task.get("memory_mb", run.get("memory_mb"))
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        raise TaskError(f"'timeout_s' must be a positive number of seconds, not {timeout!r}")
    if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0):
        raise TaskError(f"'memory_mb' must be a positive integer, not {memory!r}")
    return Limits(timeout_s=timeout, memory_bytes=memory << 20 if memory else None)


def _map(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TaskError(f"'{what}' must map names to file ids")
    return value
