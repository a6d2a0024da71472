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
  ``run`` with the task's own values taking precedence.
- ``tile``: a Smith-Waterman tile (``worker.tiles``): ``run`` names the two sequence files
  (``a``, ``b``: file id hex) and the grid; the inputs are the neighbours' boundary files.

Limits (``timeout_s``, ``memory_mb``) come from ``run`` or the task. A task's value, output or
log small enough (``INLINE_MAX``) travels in the result summary, which the ledger keeps; a
bigger one is stored (replicated) in storage and registered with the job when the result is
recorded (TASK_RESULT ``files``). Every failure here becomes a failed outcome with one line that
says what went wrong: a bad task never takes its worker down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from proto.ids import join128
from proto.messages import Outcome as TaskOutcome  # the slot's own Outcome is a run's record
from proto.messages import WorkerRequest
from proto.fileids import file_id_of_path, parse_id
from cluster.node.storagelink import LinkPool, TransferError, upload_ranked
from worker import slot_child, tiles, trace_tasks
from worker.executor import Limits, Outcome

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


class TaskRunner:
    """Runs tasks for one worker. ``files`` (a ``worker.files.WorkerFiles``) makes stored files
    local paths; ``links`` stores results (None: no storage, large results fail clearly)."""

    def __init__(self, name: str, scratch_root: Path, *, files: Any = None, links: LinkPool | None = None,
                 copies: int = 1) -> None:
        self.name = name
        self.scratch_root = Path(scratch_root)
        self.files = files
        self.links = links
        self.copies = copies

    def run(self, slot: Any, request: WorkerRequest) -> Ended:
        """Run ``request`` on ``slot`` (a ``worker.slots.Slot``); never raises for the task's faults."""
        job = join128(request.job_uuid_upper, request.job_uuid_lower)
        # One scratch directory per slot, emptied between tasks rather than made and removed
        # for each: at hundreds of tiny tasks a second, mkdir + rmtree was most of a task's cost.
        scratch = self.scratch_root / f"slot-{getattr(slot, 'index', 0)}"
        try:
            _empty(scratch)
            args = request.arguments if isinstance(request.arguments, dict) else {}
            run = args.get("run", {}) if isinstance(args.get("run", {}), dict) else {}
            task = args.get("task", {}) if isinstance(args.get("task", {}), dict) else {}
            limits = _limits(run, task)
            if request.kind == "call":
                return self._call(slot, request, task, scratch, limits)
            if request.kind == "command":
                return self._command(slot, run, task, scratch, limits)
            if request.kind == "tile":
                return self._tile(slot, request, run, task, scratch, limits)
            if request.kind == "trace":
                return self._trace(slot, run, task, scratch, limits)
            raise TaskError(f"unknown task kind {request.kind!r} (this worker runs call, command, tile, trace)")
        except TaskError as exc:
            return Ended(FAILED, -1, {}, error=str(exc))
        except Exception as exc:  # a bug or an I/O failure here is the attempt's, not the worker's
            log.exception("task %s/%s failed in the worker", job.hex(), request.task_id)
            return Ended(FAILED, -1, {}, error=f"worker {self.name}: {type(exc).__name__}: {exc}")
        finally:
            try:
                _empty(scratch)
            except OSError as exc:
                log.warning("cannot empty the scratch directory %s: %s", scratch, exc)

    # ---- kinds -------------------------------------------------------------------------------

    def _call(self, slot: Any, request: WorkerRequest, task: dict, scratch: Path, limits: Limits) -> Ended:
        arguments = task.get("args")
        if not isinstance(arguments, bytes) or not request.program:
            raise TaskError("a call task needs the job's program (a pickled function) and the task's 'args' bytes")
        outcome = slot.run_callable(request.program, arguments, scratch, limits)
        ended = self._base(outcome)
        if outcome.ok and outcome.result is not None:
            if len(outcome.result) <= INLINE_MAX:
                ended.summary["value"] = outcome.result
            else:
                path = scratch / "value.pkl"
                path.write_bytes(outcome.result)
                ended.result_file = self._store(path, "value.pkl", ended)
                ended.summary["value_size"] = len(outcome.result)
        self._logs(outcome, scratch, ended)
        if outcome.ok and "compare" in task:
            ended.summary["digest"] = output_digest(outcome.result or b"", task["compare"])
        return ended

    def _command(self, slot: Any, run: dict, task: dict, scratch: Path, limits: Limits) -> Ended:
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
            inputs[name] = self._path(fid)
        outcome = slot.run_command(argv, env, scratch, inputs, outputs, limits)
        ended = self._base(outcome)
        ended.summary["exit_code"] = outcome.exit_code
        for name, path in sorted(outcome.outputs.items()):
            fid = self._store(path, name, ended)
            ended.summary.setdefault("outputs", {})[name] = fid.hex()
        self._logs(outcome, scratch, ended)
        if outcome.ok and "compare" in task:
            ended.summary["digest"] = output_digest(outcome.stdout or b"", task["compare"])
        return ended

    def _tile(self, slot: Any, request: WorkerRequest, run: dict, task: dict, scratch: Path, limits: Limits) -> Ended:
        paths = {}
        for side in ("a", "b"):
            fid = parse_id(run.get(side)) if isinstance(run.get(side), str) else None
            if fid is None:
                raise TaskError(f"a tile task needs '{side}': the file id of a sequence")
            paths[side] = str(self._path(fid))
        boundaries = [str(self._path(f)) for f in request.input_files]
        # only the tile's own keys: the job's run section also holds scheduling keys (need,
        # limits) that are not the kernel's business
        order = {k: v for k, v in {**run, **task}.items() if k in tiles.REQUEST_KEYS}
        order.update(a=paths["a"], b=paths["b"], boundaries=boundaries)
        outcome = slot.run_tile(order, scratch, limits)
        ended = self._base(outcome)
        if outcome.ok:
            ended.summary.update(msgspec.msgpack.decode(outcome.result) if outcome.result else {})
            boundary = outcome.outputs.get("boundary")
            if boundary is None:
                raise TaskError("the tile left no boundary file")
            ended.result_file = self._store(boundary, "boundary", ended)
            rows = outcome.outputs.get("rows")
            if rows is not None:  # the traceback's special rows: the job keeps them (keep_files)
                ended.summary["rows_bytes"] = rows.stat().st_size
                self._store(rows, "rows", ended)
        self._logs(outcome, scratch, ended)
        return ended

    def _trace(self, slot: Any, run: dict, task: dict, scratch: Path, limits: Limits) -> Ended:
        order = {k: v for k, v in {**run, **task}.items() if k in trace_tasks.REQUEST_KEYS}
        for side in ("a", "b"):
            fid = parse_id(order.get(side)) if isinstance(order.get(side), str) else None
            if fid is None:
                raise TaskError(f"a trace task needs '{side}': the file id of a sequence")
            order[side] = str(self._path(fid))
        if "rows" in order:
            rows = order["rows"]
            if not isinstance(rows, list) or not all(isinstance(r, str) and parse_id(r) for r in rows):
                raise TaskError("'rows' must list the special-rows files' ids")
            missing = []
            paths = []
            for hex_id in rows:
                try:
                    paths.append(str(self._path(parse_id(hex_id))))
                except TaskError:
                    missing.append(hex_id)
            if missing:
                raise TaskError(f"{len(missing)} of the {len(rows)} special-rows files are no longer stored "
                                f"(first {missing[0]}): the score pass must be recomputed")
            order["rows"] = paths
        outcome = slot.run_trace(order, scratch, limits)
        ended = self._base(outcome)
        if outcome.ok:
            ended.summary.update(msgspec.msgpack.decode(outcome.result) if outcome.result else {})
            if "cigar" in outcome.outputs:
                ended.result_file = self._store(outcome.outputs["cigar"], "cigar", ended)
        self._logs(outcome, scratch, ended)
        return ended

    # ---- pieces ------------------------------------------------------------------------------

    def _base(self, outcome: Outcome) -> Ended:
        summary: dict[str, Any] = {"wall_s": round(outcome.wall_s, 6), "cpu_s": round(outcome.cpu_s, 6)}
        if outcome.max_rss_bytes:
            summary["max_rss_bytes"] = outcome.max_rss_bytes
        code = outcome.exit_code if outcome.exit_code is not None else -1
        return Ended(DONE if outcome.ok else FAILED, code, summary, error=None if outcome.ok else outcome.error)

    def _logs(self, outcome: Outcome, scratch: Path, ended: Ended) -> None:
        """stdout/stderr: inline when small, else stored whole with the tail inline."""
        for stream in ("stdout", "stderr"):
            data = getattr(outcome, stream) or b""
            if not data:
                continue
            if len(data) <= LOG_INLINE or self.links is None:
                ended.summary[stream] = data[-LOG_INLINE:]
                continue
            path = scratch / f".{stream}"
            path.write_bytes(data)
            ended.summary[stream] = data[-LOG_INLINE:]
            ended.summary[f"{stream}_file"] = self._store(path, stream, ended).hex()

    def _path(self, fid: bytes) -> Path:
        if self.files is None:
            raise TaskError(f"this worker has no storage access, and the task reads file {fid.hex()}")
        try:
            return self.files.path(fid)
        except FileNotFoundError:
            raise TaskError(f"the task's input {fid.hex()} is not a stored file") from None

    def _store(self, path: Path, name: str, ended: Ended) -> bytes:
        """Store ``path`` (replicated) and list it with the result; returns its file id."""
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


def _empty(scratch: Path) -> None:
    """Make ``scratch`` an empty directory (the slot's own output captures may stay: the slot
    truncates them for each task)."""
    try:
        entries = list(os.scandir(scratch))
    except FileNotFoundError:
        scratch.mkdir(parents=True)
        return
    for entry in entries:
        if entry.name == slot_child.OUTPUT_DIR and entry.is_dir(follow_symlinks=False):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


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
