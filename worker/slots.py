"""A worker's task slots: one persistent child process per slot runs task after task.

Theory of operation
-------------------
``executor.run_callable`` starts a fresh interpreter per task, which costs 30-50 ms of CPU and
caps a worker at a few dozen small tasks a second. Ray and Dask reuse their worker processes;
so does a ``Slot``: callables and tiles run in one child (``python -m worker.slot_child``),
started on the slot's first such task and reused until a task kills it, times out or needs
another memory limit. Reuse also keeps a map's unpickled function and Numba's compiled
kernels warm. Commands still get a fresh process group each (``executor.run_command``).

Parent and child exchange one frame per task over a private pipe pair (slot_child.py says
how); stdin and stdout stay the user's. The parent never blocks on the child: it polls the
reply pipe, the request pipe (a large argument is written as the child reads it) and the
child's pidfd together, with the task's deadline, on the caller's thread; there is no thread
or sleep in a Slot (the worker runs each Slot on a thread of its own).

- Timeout: SIGTERM to the child's process group at ``Limits.timeout_s``, SIGKILL
  ``Limits.grace_s`` later; the child is reaped and the next task starts a fresh one.
- Death mid-task (``os._exit``, a signal, the memory limit): reported from the exit status,
  worded as ``executor`` words it; the next task starts a fresh child. A ``MemoryError``
  that the child catches is a failed task like any other, and the child lives on.
- Memory: RLIMIT_AS, which the child sets on itself before it serves anything (so the spawn
  needs no ``preexec_fn`` and stays a vfork). A task's limit is the lower of the slot's
  ``memory_bytes`` and the task's ``Limits.memory_bytes``; when it differs from the running
  child's, the child is replaced by one started under it. The limit is therefore honest (a
  fresh process, counted from its start) at the price of a restart whenever consecutive tasks
  ask for different limits; a map's tasks all ask for the same one.
- Accounting: the child reports the CPU time (its own and its waited-for children's) and the
  peak RSS of each task; for a child that dies, the parent takes them from ``wait4``.
- Output: fds 1 and 2 go to ``scratch/.slot/stdout`` and ``stderr`` during the task, which the
  parent reads back capped as ``executor`` caps a pipe (head and tail).

What reuse gives up, as in Ray and Dask: a task can leave state behind in the child (modules,
globals, threads), and processes a callable starts and leaves running live on until the child
is replaced or closed, when its whole process group is killed.

With a ``task_user`` (``taskuser.TaskUser``; the worker's ``--task-user``) the child is started
as that user (``Popen`` ``user``/``group``/``extra_groups``/``umask``, see executor's docstring
for what the worker needs), with ``--unprivileged``, so it refuses to serve if it holds any
capability. The scratch directory and ``.slot`` are ``taskuser.task_dir``s (group G, 2770) that
the child writes; the parent opens ``.slot`` and the output files there through a directory fd
without following symbolic links, since any task of that user could have replaced them.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from worker import executor, slot_child, taskuser
from worker.executor import OUTPUT_CAP_BYTES, Limits, Outcome, _Capture, _mib, _Run, _signal_group
from worker.taskuser import DIR_FLAGS, TaskUser

CLOSE_GRACE_S = 2.0
_LENGTH = struct.Struct("<Q")
_READ_CHUNK = 1 << 16
_COUNTERS = ("tasks", "callables", "tiles", "traces", "commands", "failed", "spawns", "restarts",
             "timeouts", "deaths", "idle_deaths", "limit_restarts")


@dataclass(slots=True)
class _Child:
    proc: subprocess.Popen
    pidfd: int
    requests: int  # write end of the request pipe (non-blocking)
    replies: int  # read end of the reply pipe (non-blocking)
    memory_bytes: int | None
    cpu_total_s: float = 0.0  # the child's CPU time as of its last reply
    ended: tuple | None = None  # (wait status, rusage) once reaped


@dataclass(slots=True)
class _Ending:
    """How one exchange with the child ended: a reply, or the child's death."""

    reply: dict | None = None
    status: int | None = None  # wait status when the child died
    usage: object = None  # its rusage (from wait4) when it died
    timed_out: bool = False


class Slot:
    """One task slot of a worker: runs one task at a time. Callables and tiles run in a
    persistent child process (``python -m worker.slot_child``) started on first use and
    reused; commands run through ``executor.run_command`` (a fresh process group each).

    One thread runs a slot's tasks; ``close`` may come from another (a worker shutting down)
    while a task runs: that task's child is killed and the task fails. ``counters`` counts tasks
    (``tasks``, ``callables``, ``tiles``, ``commands``, ``failed``) and the child's life
    (``spawns``, ``restarts``, ``timeouts``, ``deaths`` mid-task, ``idle_deaths`` between tasks,
    ``limit_restarts``). ``task_user``: every task process runs as that user (module docstring).
    """

    def __init__(self, index: int, *, memory_bytes: int | None = None,
                 env: dict[str, str] | None = None,
                 output_cap_bytes: int = OUTPUT_CAP_BYTES,
                 task_user: TaskUser | None = None) -> None:
        if memory_bytes is not None and memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be a positive number of bytes, got {memory_bytes}")
        self.index = index
        self.memory_bytes = memory_bytes  # the slot's cap; a task may ask for less
        self.env = dict(env) if env is not None else None  # the child's; None: the worker's
        self.output_cap_bytes = output_cap_bytes
        self.task_user = task_user
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._child: _Child | None = None
        self._running: _Child | None = None  # the child a task waits on, while one does
        self._closed = False
        self._lock = threading.RLock()  # _child, _running and _closed, between task and close

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The child's pid while it lives, else None."""
        with self._lock:
            child = self._child
            if child is None:
                return None
            if child is not self._running and _has_exited(child.pidfd):
                self._lose(child)  # a running task's thread reaps its own child
                return None
            return child.proc.pid

    # -- tasks -------------------------------------------------------------------------------

    def run_callable(self, function: bytes, arguments: bytes, scratch: Path,
                     limits: Limits = Limits(), listen: executor.Listen | None = None) -> Outcome:
        """Run ``function(*args, **kwargs)`` in the slot's child, with cwd ``scratch``.

        ``function`` is ``cloudpickle.dumps(fn)`` and ``arguments`` is
        ``cloudpickle.dumps((args, kwargs))``, apart so that a map ships one function with many
        argument tuples. ``Outcome.result`` is the cloudpickled return value, as in
        ``executor.run_callable``.
        """
        for name, value in (("function", function), ("arguments", arguments)):
            if not isinstance(value, (bytes, bytearray, memoryview)):
                return self._refused("callable", f"{name} must be cloudpickle bytes, got a "
                                                 f"{type(value).__name__}")
        message = {"op": "call", "function": bytes(function), "arguments": bytes(arguments)}
        return self._run_in_child("callable", message, Path(scratch), limits, listen)

    def run_tile(self, request: dict, scratch: Path, limits: Limits = Limits()) -> Outcome:
        """Compute the tile ``request`` names (see worker/tiles.py) in the slot's child.

        Relative paths in the request are taken from the caller's working directory, as
        ``tiles.run_tile`` in-process takes them.

        The boundary file is ``scratch / "boundary.swb"``, in ``Outcome.outputs["boundary"]``;
        ``Outcome.result`` is the summary dict in MessagePack (``msgspec.msgpack.decode``).
        """
        scratch = Path(os.path.abspath(scratch))
        out = scratch / "boundary.swb"
        if isinstance(request, dict):  # the child works in scratch: relative paths are ours
            request = {**request, **{k: _absolute(request[k]) for k in ("a", "b", "boundaries")
                                     if k in request}}
        _unlink(out)  # a stale file from an earlier run must not pass for this one's
        _unlink(out.with_name("rows.swr"))
        outcome = self._run_in_child("tile", {"op": "tile", "request": request, "out": str(out)},
                                     scratch, limits)
        if outcome.ok:
            outputs = {"boundary": out}
            rows = out.with_name("rows.swr")  # worker.tiles.rows_path: the special rows, if kept
            if rows.exists():
                outputs["rows"] = rows
            outcome = dataclasses.replace(outcome, outputs=outputs)
        return outcome

    def run_trace(self, request: dict, scratch: Path, limits: Limits = Limits()) -> Outcome:
        """Run a traceback task (``worker.trace_tasks``) in the slot's child. ``Outcome.result``
        is the summary in MessagePack; a CIGAR too long to travel inline is
        ``Outcome.outputs["cigar"]``."""
        scratch = Path(os.path.abspath(scratch))
        out = scratch / "trace"
        if isinstance(request, dict):
            request = {**request, **{k: _absolute(request[k]) for k in ("a", "b", "rows") if k in request}}
        if out.is_symlink():
            _unlink(out)
        shutil.rmtree(out, ignore_errors=True)
        try:
            taskuser.task_dir(out, self.task_user)
        except OSError as exc:
            return self._refused("trace", f"cannot prepare the scratch directory: {exc}")
        outcome = self._run_in_child("trace", {"op": "trace", "request": request, "out": str(out)},
                                     scratch, limits)
        if outcome.ok:
            outputs = {p.stem: p for p in out.iterdir() if p.is_file()}
            outcome = dataclasses.replace(outcome, outputs=outputs)
        return outcome

    def run_command(self, argv: list[str], env: dict[str, str] | None, scratch: Path,
                    inputs: dict[str, Path] | None = None, outputs: list[str] | None = None,
                    limits: Limits = Limits(), listen: executor.Listen | None = None) -> Outcome:
        """``executor.run_command`` under the slot's memory cap; ``env`` None: the slot's env."""
        self._count("commands")
        if self._closed:
            return self._refused("command", f"slot {self.index} is closed", counted=True)
        memory = self._task_memory(limits)
        if memory is not None and memory <= 0:
            return self._refused("command", _bad_memory(memory), counted=True)
        outcome = executor.run_command(
            argv, env=env if env is not None else self.env, scratch=scratch, inputs=inputs,
            outputs=outputs, limits=dataclasses.replace(limits, memory_bytes=memory),
            output_cap_bytes=self.output_cap_bytes, task_user=self.task_user, listen=listen)
        if not outcome.ok:
            self.counters["failed"] += 1
        return outcome

    def close(self) -> None:
        """Stop the child (EOF and SIGTERM, SIGKILL after a grace), reap it, and refuse later
        tasks; idempotent. From another thread while a task runs, the task's child is killed
        at once and the task's own thread reaps it."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
            if child is None:
                return
            if child is self._running:
                if child.ended is None:
                    _signal_group(child.proc.pid, signal.SIGKILL)
                return
        _stop(child)

    # -- the exchange ------------------------------------------------------------------------

    def _count(self, kind_counter: str) -> None:
        self.counters["tasks"] += 1
        self.counters[kind_counter] += 1

    def _run_in_child(self, kind: str, message: dict, scratch: Path, limits: Limits,
                      listen: executor.Listen | None = None) -> Outcome:
        started = time.monotonic()
        self._count(kind + "s")
        memory = self._task_memory(limits)
        if memory is not None and memory <= 0:
            return self._refused(kind, _bad_memory(memory), counted=True)
        scratch = Path(os.path.abspath(scratch))
        message["scratch"] = str(scratch)
        try:
            frame = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - whatever the request holds that pickle refuses
            return self._refused(kind, f"cannot prepare the {kind} request: {exc}", counted=True)
        try:
            output_fd = _output_dir(scratch, self.task_user)
        except OSError as exc:
            return self._refused(kind, f"cannot prepare the scratch directory: {exc}",
                                 counted=True)
        try:
            return self._run_with_output(kind, output_fd, frame, memory, limits, started, listen)
        finally:
            os.close(output_fd)

    def _run_with_output(self, kind: str, output_fd: int, frame: bytes, memory: int | None,
                         limits: Limits, started: float, listen: executor.Listen | None = None) -> Outcome:
        for name in ("stdout", "stderr"):
            _unlink_at(output_fd, name)
        with self._lock:
            if self._closed:
                return self._refused(kind, f"slot {self.index} is closed", counted=True)
            try:
                child = self._ready_child(memory)
            except OSError as exc:
                return self._refused(kind, "cannot start the slot process: "
                                           f"{exc.strerror or exc}", counted=True)
            self._running = child
        cpu_before = child.cpu_total_s
        tail = _OutputTail(output_fd, listen) if listen is not None else None
        try:
            ending = self._exchange(child, _LENGTH.pack(len(frame)) + frame, limits, started)
        finally:
            if tail is not None:
                tail.close()
            with self._lock:
                self._running = None
                closed = self._closed
            if closed and child.pidfd >= 0:  # closed during the task, which got its reply
                _stop(child)
        stdout = _read_capped(output_fd, "stdout", self.output_cap_bytes)
        stderr = _read_capped(output_fd, "stderr", self.output_cap_bytes)
        outcome = self._outcome(kind, child, ending, limits, cpu_before)
        outcome = dataclasses.replace(outcome, stdout=stdout, stderr=stderr,
                                      wall_s=time.monotonic() - started)
        if not outcome.ok:
            self.counters["failed"] += 1
        return outcome

    def _task_memory(self, limits: Limits) -> int | None:
        asked = [m for m in (self.memory_bytes, limits.memory_bytes) if m is not None]
        return min(asked) if asked else None

    def _ready_child(self, memory: int | None) -> _Child:
        """The running child if it lives and has the task's memory limit, else a new one."""
        child = self._child
        if child is not None and _has_exited(child.pidfd):
            self.counters["idle_deaths"] += 1
            self._lose(child)  # it died between tasks (a leftover thread, an outside kill)
            child = None
        if child is not None and child.memory_bytes != memory:
            self.counters["limit_restarts"] += 1
            self._child = None
            _stop(child)
            child = None
        if child is None:
            child = self._spawn(memory)
        return child

    def _spawn(self, memory: int | None) -> _Child:
        requests_r, requests_w = os.pipe()  # O_CLOEXEC: other slots' children never get them
        replies_r, replies_w = os.pipe()
        argv = [sys.executable, "-P", "-m", slot_child.__name__, str(requests_r), str(replies_w)]
        if memory is not None:
            argv.append(str(memory))
        if self.task_user is not None:
            argv.append(slot_child.UNPRIVILEGED)
        try:
            # stdout goes nowhere and stderr to the worker's log between tasks: only what the
            # child says outside any task (it failed to start) lands there.
            proc = subprocess.Popen(argv, cwd="/", env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, pass_fds=(requests_r, replies_w),
                                    start_new_session=True,
                                    **(self.task_user.spawn() if self.task_user else {}))
        except OSError:
            for fd in (requests_r, requests_w, replies_r, replies_w):
                os.close(fd)
            raise
        os.close(requests_r)
        os.close(replies_w)
        os.set_blocking(requests_w, False)
        os.set_blocking(replies_r, False)
        self.counters["spawns"] += 1
        if self.counters["spawns"] > 1:
            self.counters["restarts"] += 1
        self._child = _Child(proc, os.pidfd_open(proc.pid), requests_w, replies_r, memory)
        return self._child

    def _exchange(self, child: _Child, frame: bytes, limits: Limits, started: float) -> _Ending:
        """Send the request and wait for the reply or the child's end, enforcing the timeout."""
        pending = _write_some(child.requests, memoryview(frame))
        poller = select.poll()  # not select.select: a busy worker's fds may be past FD_SETSIZE
        poller.register(child.replies, select.POLLIN)
        poller.register(child.pidfd, select.POLLIN)
        if pending:
            poller.register(child.requests, select.POLLOUT)
        steps = []  # the timeout's escalation: SIGTERM at the deadline, SIGKILL a grace later
        if limits.timeout_s is not None:
            deadline = started + limits.timeout_s
            steps = [(deadline, signal.SIGTERM), (deadline + limits.grace_s, signal.SIGKILL)]
        reply = _Reply()
        timed_out = False
        while True:
            wait_ms = max(0, int((steps[0][0] - time.monotonic()) * 1000) + 1) if steps else None
            for fd, _ in poller.poll(wait_ms):
                if fd == child.requests:
                    pending = _write_some(child.requests, pending)
                    if not pending:
                        poller.unregister(fd)
                elif fd == child.replies:
                    got = reply.read_from(fd)
                    if got is False:
                        poller.unregister(fd)  # EOF: the child is on its way out
                    elif reply.value is _GARBLED:  # the channel is lost: so is the child
                        _signal_group(child.proc.pid, signal.SIGKILL)
                        self._lose(child)
                        return _Ending(reply=reply.value)
                    elif reply.done and not timed_out:
                        child.cpu_total_s = reply.value["cpu_total_s"]
                        return _Ending(reply=reply.value)
                elif fd == child.pidfd:
                    while not reply.done and reply.read_from(child.replies):
                        pass
                    status, usage = self._lose(child)
                    if reply.done and not timed_out:  # it answered, then died: the answer holds
                        return _Ending(reply=reply.value)
                    return _Ending(status=status, usage=usage, timed_out=timed_out)
            while steps and time.monotonic() >= steps[0][0]:
                _signal_group(child.proc.pid, steps.pop(0)[1])
                timed_out = True

    def _lose(self, child: _Child) -> tuple[int, object]:
        """Reap a child that exited (or is being killed); the slot starts a new one next time."""
        with self._lock:  # so that close() never signals a pid that was reaped (and reusable)
            if self._child is child:
                self._child = None
            return _reap(child)

    def _outcome(self, kind: str, child: _Child, ending: _Ending, limits: Limits,
                 cpu_before: float) -> Outcome:
        if ending.reply is not None:
            reply = ending.reply
            error = reply["error"]
            if error and error.startswith("MemoryError") and child.memory_bytes:
                error += f" (memory limit {_mib(child.memory_bytes)})"
            # The CPU since the previous reply: a fresh child's start-up is its first task's.
            cpu_s = max(0.0, reply["cpu_total_s"] - cpu_before)
            return Outcome(ok=reply["ok"], kind=kind, exit_code=reply["status"], error=error,
                           result=reply["result"] if reply["ok"] else None, exception=reply.get("exception"), stdout=b"",
                           stderr=b"", cpu_s=cpu_s, max_rss_bytes=reply["max_rss_bytes"])
        run = _Run(status=ending.status)
        if self._closed:
            error = f"slot {self.index} was closed while the task ran"
        elif ending.timed_out:
            self.counters["timeouts"] += 1
            error = f"timed out after {limits.timeout_s:g} s"
        else:
            self.counters["deaths"] += 1
            ending_error = run.ending_error(Limits(memory_bytes=child.memory_bytes))
            done = {"callable": "the callable returned", "trace": "the trace task was done"}.get(kind, "the tile was done")
            error = f"{ending_error or 'exit status 0'} before {done}"
        usage = ending.usage
        cpu_s = max(0.0, usage.ru_utime + usage.ru_stime - cpu_before)
        return Outcome(ok=False, kind=kind, exit_code=run.exit_code, error=error, result=None,
                       stdout=b"", stderr=b"", cpu_s=cpu_s, max_rss_bytes=usage.ru_maxrss * 1024,
                       timed_out=ending.timed_out, killed_by_signal=run.signum)

    def _refused(self, kind: str, error: str, *, counted: bool = False) -> Outcome:
        """A task that never reached a process: a bad argument or an unusable scratch dir."""
        if not counted:
            self._count(kind + "s")
        self.counters["failed"] += 1
        return executor._not_started(kind, error)


_REPLY_KEYS = {"ok", "status", "error", "result", "cpu_total_s", "max_rss_bytes"}
_GARBLED = {"ok": False, "status": slot_child.UNUSABLE, "result": None, "cpu_total_s": 0.0,
            "max_rss_bytes": 0, "error": "the slot process sent a reply that cannot be read "
                                         "(did the task write to the slot's pipes?)"}


class _Reply:
    """One length-prefixed frame read in pieces from a non-blocking pipe."""

    __slots__ = ("buffer", "needed", "value")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.needed: int | None = None
        self.value: dict | None = None

    @property
    def done(self) -> bool:
        return self.value is not None

    def read_from(self, fd: int) -> bool | None:
        """Take what the pipe holds now: True if something came, None if nothing was there,
        False at EOF."""
        want = _READ_CHUNK if self.needed is None else max(_READ_CHUNK, self.needed - len(self.buffer))
        try:
            chunk = os.read(fd, min(want, 1 << 24))
        except BlockingIOError:
            return None
        if not chunk:
            return False
        self.buffer += chunk
        if self.needed is None and len(self.buffer) >= _LENGTH.size:
            self.needed = _LENGTH.size + _LENGTH.unpack_from(self.buffer)[0]
        if self.value is None and self.needed is not None and len(self.buffer) >= self.needed:
            try:
                value = pickle.loads(memoryview(self.buffer)[_LENGTH.size:self.needed])
            except Exception:  # noqa: BLE001 - only user code writing to our pipe does this
                value = None
            self.value = value if isinstance(value, dict) and _REPLY_KEYS <= value.keys() \
                else _GARBLED
        return True


def _write_some(fd: int, data: memoryview) -> memoryview:
    """Write what the pipe takes now; the rest. A closed pipe (the child died) takes nothing
    more: its death comes through the pidfd."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except BlockingIOError:
        pass
    except BrokenPipeError:
        return data[:0]
    return data


def _stop(child: _Child) -> None:
    """End an idle child: EOF on its requests and SIGTERM, SIGKILL after a grace; reap it."""
    if child.ended is not None:
        return
    _close_fd(child.requests)
    child.requests = -1
    _signal_group(child.proc.pid, signal.SIGTERM)
    if not _wait_readable(child.pidfd, CLOSE_GRACE_S):
        _signal_group(child.proc.pid, signal.SIGKILL)
    _reap(child)


def _reap(child: _Child) -> tuple[int, object]:
    if child.ended is not None:
        return child.ended
    # Its leftovers go first, while the leader is unreaped: its pid (the group id) cannot have
    # been reused yet.
    _signal_group(child.proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(child.proc.pid, 0)
    child.proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits on it
    for fd in (child.pidfd, child.requests, child.replies):
        _close_fd(fd)
    child.pidfd = child.requests = child.replies = -1
    child.ended = (status, usage)
    return child.ended


def _has_exited(pidfd: int) -> bool:
    return _wait_readable(pidfd, 0)


def _wait_readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout_s * 1000)))


def _close_fd(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _output_dir(scratch: Path, task_user: TaskUser | None) -> int:
    """An fd of ``scratch/.slot`` (made, with ``scratch``, if missing): a real directory, never
    a symbolic link a task left there in its place."""
    taskuser.task_dir(scratch, task_user)
    scratch_fd = os.open(scratch, DIR_FLAGS)
    try:
        name = slot_child.OUTPUT_DIR
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=scratch_fd)
        except FileNotFoundError:
            fd = None
        except OSError:  # ELOOP, ENOTDIR: something else took its name
            os.unlink(name, dir_fd=scratch_fd)
            fd = None
        if fd is None:
            try:
                os.mkdir(name, 0o777 if task_user is None else 0o700, dir_fd=scratch_fd)
            except FileExistsError:
                pass
            fd = os.open(name, DIR_FLAGS, dir_fd=scratch_fd)
        if task_user is not None:
            try:
                taskuser.give_to_group(fd, task_user)
            except BaseException:
                os.close(fd)
                raise
        return fd
    finally:
        os.close(scratch_fd)


def _absolute(value):
    """A path (or list of paths) made absolute here; anything else as it is, for the child's
    request checks to refuse."""
    if isinstance(value, (str, Path)):
        return os.path.abspath(value)
    if isinstance(value, (list, tuple)):
        return [_absolute(v) for v in value]
    return value


def _bad_memory(memory: int) -> str:
    return f"memory limit must be a positive number of bytes, got {memory}"


class _OutputTail(threading.Thread):
    """What a callable appends to its output files, read a few times a second and told to
    ``listen`` (stream, chunk) while it runs: a follower sees ``print`` live (worker.output).
    Opened as ``_read_capped`` opens them: by name in the output directory, never through a
    link. Reads at most ``TAIL_READ`` per file and pass, so a flood is followed late, not all."""

    EVERY_S = 0.2
    TAIL_READ = 256 << 10

    def __init__(self, dir_fd: int, listen: executor.Listen) -> None:
        super().__init__(name="output-tail", daemon=True)
        self.dir_fd, self.listen = dir_fd, listen
        self.offsets = {1: 0, 2: 0}
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(self.EVERY_S):
            self.read()

    def close(self) -> None:
        self.done.set()
        self.join()
        self.read()  # what it wrote last

    def read(self) -> None:
        for stream, name in ((1, "stdout"), (2, "stderr")):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dir_fd)
            except OSError:
                continue  # not written yet
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                chunk = os.pread(fd, self.TAIL_READ, self.offsets[stream])
            except OSError:
                continue
            finally:
                os.close(fd)
            if chunk:
                self.offsets[stream] += len(chunk)
                self.listen(stream, chunk)


def _read_capped(dir_fd: int, name: str, cap: int) -> bytes:
    """A task's output file (``name`` in the directory ``dir_fd``) as ``executor`` captures a
    pipe: whole up to ``cap`` bytes, else its head, a note of what was dropped, and its tail.
    Reads only those two ends; a symbolic link or anything but a regular file reads as empty."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except (FileNotFoundError, OSError):
        return b""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b""
        size = st.st_size
        capture = _Capture(cap)
        if size > cap:  # the head, then straight to the tail
            while capture.total < cap // 2 and capture.read_from(fd):
                pass
            os.lseek(fd, max(size - (cap - cap // 2), capture.total), os.SEEK_SET)
        while capture.read_from(fd):
            pass
        if size > cap:
            capture.total = os.lseek(fd, 0, os.SEEK_CUR)  # what was there, read or skipped
        return capture.value()
    finally:
        os.close(fd)
