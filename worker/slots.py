"""A worker's task slots: one persistent child process per slot runs task after task.

Theory of operation
-------------------
``executor.run_callable`` starts a fresh interpreter per task, which costs 30-50 ms of CPU and
caps a worker at a few dozen small tasks a second. Ray and Dask reuse their worker processes;
so does a ``Slot``: every task runs in or from one child (``python -m worker.slot_child``),
started on the slot's first task and reused until a task kills it, times out or needs another
memory limit. Reuse also keeps a map's unpickled function and Numba's compiled kernels warm.
Callables, tiles and traces run inside the child. A command is started with posix_spawn (a
vfork: its cost does not grow with the starter's size; a process group of its own), by the
child (``spawn_here=False``, as the worker's loop has it: the loop never waits for a spawn) or
by the slot's own process (worker.spawn: the least CPU); under a memory limit or a task user
always by the child (slot_child.py says how).

A slot never blocks. ``begin_*`` writes the task's request to the child's request pipe and
returns; what follows arrives on descriptors the caller watches (``watched``): the reply pipe,
the slot's stdout and stderr pipes (the child's fds 1 and 2, and a command's), the child's
pidfd, and a command's own pidfd when the slot started it. ``readable(fd)`` takes what one of
them holds and returns the task's ``Outcome`` once it is over. The worker watches them in its
own loop's poller (``watcher``: its ``add_reader``), so a task costs it no thread and no
hand-off; the ``run_*`` methods are the same driven by a private poll, for callers without a
loop (tests, benchmarks). A request larger than the pipe holds is written as the child asks for
more (a MORE frame on the reply pipe): the slot writes only when it reads.

- Timeout: ``deadlines()`` says when the running task is to be stopped, and the caller calls
  ``stop``: SIGTERM to the child's process group at ``Limits.timeout_s``, SIGKILL
  ``Limits.grace_s`` later; the child is reaped and the next task starts a fresh one. A command's
  timeout is enforced by the child, which can signal the command's group without racing its
  reaping; the slot only kills the child if it has not answered ``COMMAND_BACKSTOP_S`` after it
  should have (a command that stopped its own parent).
- Death mid-task (``os._exit``, a signal, the memory limit): reported from the exit status,
  worded as ``executor`` words it; the next task starts a fresh child. A ``MemoryError``
  that the child catches is a failed task like any other, and the child lives on. Whatever is
  left in the dead child's session (a command's group, what a callable started) is killed.
- Memory: RLIMIT_AS, which the child sets on itself before it serves anything (so the spawn
  needs no ``preexec_fn`` and stays a vfork). A task's limit is the lower of the slot's
  ``memory_bytes`` and the task's ``Limits.memory_bytes``; when it differs from the running
  child's, the child is replaced by one started under it. The limit is therefore honest (a
  fresh process, counted from its start) at the price of a restart whenever consecutive tasks
  ask for different limits; a map's tasks all ask for the same one. A command needs only a child
  whose own limit is no lower than the command's, which the child sets on the command.
- Accounting: the child reports the CPU time (its own and its waited-for children's) and the
  peak RSS of each task, and a command's own from ``wait4``; for a child that dies, the slot
  takes them from ``wait4``.
- Output: the child's fds 1 and 2 are pipes the slot reads as they fill, into a capture capped
  as ``executor`` caps a pipe (head and tail) and told to ``listen`` chunk by chunk, so a
  follower sees a task's lines as it prints them. When the reply comes, what the pipes still
  hold is the task's too (the child flushed before it replied). Output while no task runs (a
  thread a task left behind) is dropped and counted.

What reuse gives up, as in Ray and Dask: a task can leave state behind in the child (modules,
globals, threads), and processes a callable starts and leaves running live on, their output
counted as a later task's, until the child is replaced or closed, when its whole session is
killed.

With a ``task_user`` (``taskuser.TaskUser``; the worker's ``--task-user``) the child is started
as that user (``Popen`` ``user``/``group``/``extra_groups``/``umask``, see executor's docstring
for what the worker needs), with ``--unprivileged``, so it refuses to serve if it holds any
capability; the commands it starts are that user's too. The scratch directory is a
``taskuser.task_dir`` (group G, 2770) that the child writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import select
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from worker import executor, slot_child, taskuser
from worker.executor import OUTPUT_CAP_BYTES, Limits, Outcome, _signal_group
from worker.slotend import EMPTY, Task, child_outcome, command_outcome
from worker.slotproc import GARBLED, LENGTH, Child, Watcher, close_fd, reap, spawn_child, wait_readable, write_some
from worker.spawn import spawner
from worker.taskuser import TaskUser

log = logging.getLogger("cluster.worker")

CLOSE_GRACE_S = 2.0
COMMAND_BACKSTOP_S = 5.0  # past a command's own timeout and grace: the child that enforces it is stuck
OUTPUT_READ = 256 << 10  # what one readable() takes from an output pipe: a flood cannot hold a loop
_READ_CHUNK = 1 << 16
_COUNTERS = ("tasks", "callables", "tiles", "traces", "commands", "failed", "spawns", "restarts",
             "timeouts", "deaths", "idle_deaths", "limit_restarts", "stray_output_bytes")


class Slot:
    """One task slot of a worker: runs one task at a time in or from its persistent child process
    (``python -m worker.slot_child``), started on first use and reused (module docstring).

    ``watcher``: where the slot's descriptors are watched (the worker's loop); without one, the
    ``run_*`` methods wait for their task themselves. ``close`` may come from another thread
    while a ``run_*`` waits: that task's processes are killed and the task fails. ``counters``
    counts tasks (``tasks``, ``callables``, ``tiles``, ``traces``, ``commands``, ``failed``) and
    the child's life (``spawns``, ``restarts``, ``timeouts``, ``deaths`` mid-task,
    ``idle_deaths`` between tasks, ``limit_restarts``). ``task_user``: every task process runs
    as that user. ``spawn_here``: a command (without a memory limit or task user) is started by
    this process (worker.spawn: the least CPU, but the caller's thread waits until the command
    has exec'd, ~60 µs on an idle machine, a millisecond on a busy one); False: by the child,
    which waits instead (~150 µs more CPU a command, in the child and its frames).
    """

    def __init__(self, index: int, *, memory_bytes: int | None = None,
                 env: dict[str, str] | None = None,
                 output_cap_bytes: int = OUTPUT_CAP_BYTES,
                 task_user: TaskUser | None = None,
                 watcher: Watcher | None = None, spawn_here: bool = True) -> None:
        if memory_bytes is not None and memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be a positive number of bytes, got {memory_bytes}")
        self.index = index
        self.memory_bytes = memory_bytes  # the slot's cap; a task may ask for less
        self.env = dict(env) if env is not None else None  # the child's; None: the worker's
        self.output_cap_bytes = output_cap_bytes
        self.task_user = task_user
        self.watcher = watcher
        self.spawn_here = spawn_here  # commands started by this process itself, when they may be
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._child: Child | None = None
        self._task: Task | None = None
        self._pipes: tuple[int, int, int, int] | None = None  # stdout and stderr: (read, write) each
        self._output_poll: select.poll | None = None  # the two read ends, to ask whether they hold any
        self._watched: set[int] = set()
        # The scratch directory the last task began in, made or found then: a task's tidying
        # (worker.tasks) leaves it there, so the next task in it needs no mkdir.
        self._scratch: str | None = None
        self._closed = False
        self._lock = threading.RLock()  # _child, _task and _closed, between a waiting run_* and close

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
            if (self._task is None or self._task.child is not child) and child.exited():
                self._lose(child)  # a running task's end reaps its own child
                return None
            return child.proc.pid

    @property
    def busy(self) -> bool:
        """Whether a task runs (begun, its outcome not yet returned)."""
        return self._task is not None

    @property
    def watched(self) -> tuple[int, ...]:
        """The descriptors to watch now (the output pipes, the child's, a command's pidfd)."""
        return tuple(self._watched)

    # -- starting a task -------------------------------------------------------------------

    def begin_callable(self, function: bytes, arguments: bytes, scratch: Path,
                       limits: Limits = Limits(), listen: executor.Listen | None = None) -> Outcome | None:
        """Start ``function(*args, **kwargs)`` in the slot's child, with cwd ``scratch``; None
        when it runs (its ``Outcome`` comes from ``readable``), else the Outcome at once.

        ``function`` is ``cloudpickle.dumps(fn)`` and ``arguments`` is
        ``cloudpickle.dumps((args, kwargs))``, apart so that a map ships one function with many
        argument tuples. ``Outcome.result`` is the cloudpickled return value, as in
        ``executor.run_callable``.
        """
        for name, value in (("function", function), ("arguments", arguments)):
            if not isinstance(value, (bytes, bytearray, memoryview)):
                return self._refused("callable", f"{name} must be cloudpickle bytes, got a "
                                                 f"{type(value).__name__}")
        message = {"op": "call", "function": function if isinstance(function, bytes) else bytes(function),
                   "arguments": arguments if isinstance(arguments, bytes) else bytes(arguments)}
        return self._begin("callable", message, scratch, limits, listen)

    def begin_tile(self, request: dict, scratch: Path, limits: Limits = Limits()) -> Outcome | None:
        """Start computing the tile ``request`` names (see worker/tiles.py) in the slot's child.

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

        def outputs(outcome: Outcome) -> Outcome:
            if not outcome.ok:
                return outcome
            found = {"boundary": out}
            rows = out.with_name("rows.swr")  # worker.tiles.rows_path: the special rows, if kept
            if rows.exists():
                found["rows"] = rows
            return dataclasses.replace(outcome, outputs=found)

        return self._begin("tile", {"op": "tile", "request": request, "out": str(out)}, scratch, limits,
                           finish=outputs)

    def begin_trace(self, request: dict, scratch: Path, limits: Limits = Limits()) -> Outcome | None:
        """Start a traceback task (``worker.trace_tasks``) in the slot's child. ``Outcome.result``
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

        def outputs(outcome: Outcome) -> Outcome:
            if not outcome.ok:
                return outcome
            return dataclasses.replace(outcome, outputs={p.stem: p for p in out.iterdir() if p.is_file()})

        return self._begin("trace", {"op": "trace", "request": request, "out": str(out)}, scratch, limits,
                           finish=outputs)

    def begin_command(self, argv: list[str], env: dict[str, str] | None, scratch: Path,
                      inputs: dict[str, Path] | None = None, outputs: list[str] | None = None,
                      limits: Limits = Limits(), listen: executor.Listen | None = None) -> Outcome | None:
        """Start ``argv`` in ``scratch`` (made if missing), as ``executor.run_command`` runs it:
        ``env`` the whole environment (None: the slot's), ``inputs`` symlinked into ``scratch``
        under their names, ``outputs`` paths relative to ``scratch`` that must exist afterwards,
        or the outcome is not ok. Started by the worker (worker.spawn), or by the slot's child
        when it needs a memory limit or a task user."""
        scratch = os.path.abspath(scratch)
        memory = self._task_memory(limits)
        if memory is not None and memory <= 0:
            return self._refused("command", _bad_memory(memory))
        if inputs:
            try:
                _scratch_dir(scratch, self.task_user)
            except OSError as exc:
                return self._refused("command", f"cannot prepare the scratch directory: {exc}")
            problem = executor._place_inputs(Path(scratch), inputs, self.task_user)
            if problem:
                return self._refused("command", problem)

        def ended(outcome: Outcome) -> Outcome:
            if outcome.exit_code is None and outcome.error and not outcome.killed_by_signal \
                    and not outcome.timed_out:
                return outcome  # it never started: nothing to look for
            found, missing = executor._collect_outputs(Path(scratch), outputs)
            if not missing:
                return dataclasses.replace(outcome, outputs=found)
            error = "; ".join(e for e in (outcome.error, "missing output: " + ", ".join(missing)) if e)
            return dataclasses.replace(outcome, ok=False, error=error, outputs=found)

        env = env if env is not None else self.env
        if self.spawn_here and memory is None and self.task_user is None and spawner().usable:
            return self._spawn_command(list(argv), env, scratch, limits, listen, ended if outputs else None)
        message = {"op": "command", "argv": list(argv), "env": env, "timeout_s": limits.timeout_s,
                   "grace_s": limits.grace_s, "memory_bytes": memory}
        return self._begin("command", message, scratch, limits, listen, finish=ended if outputs else None)

    # -- what the descriptors say ------------------------------------------------------------

    def readable(self, fd: int) -> Outcome | None:
        """Take what ``fd`` (one of ``watched``) holds: the task's Outcome once it is over, else
        None. A descriptor that is no longer the slot's is ignored."""
        if fd not in self._watched:
            return None
        task = self._task
        pipes = self._pipes
        if fd == pipes[0] or fd == pipes[2]:
            self._read_output(fd, task, OUTPUT_READ)
            return None
        if task is not None and fd == task.pidfd:
            return self._command_exited(task)
        child = self._child if task is None or task.child is None else task.child
        if child is None:
            return None
        owner = task if task is not None and task.child is child else None
        if fd == child.pidfd:
            return self._died(child, owner)
        frames = child.frames.read_from(fd)
        if frames is None:  # EOF: the child is on its way out; its pidfd says when it is gone
            self._unwatch(fd)
            return None
        for frame in frames:
            if frame is slot_child.MORE:
                if owner is not None and owner.pending:
                    owner.pending = write_some(child.requests, owner.pending)
                continue
            if frame is GARBLED:  # the channel is lost: so is the child
                _signal_group(child.proc.pid, signal.SIGKILL)
                if owner is None:
                    self._lose(child)
                    return None
                return self._ended(owner, reply=GARBLED, usage=self._lose(child)[1])
            if owner is not None:
                return self._ended(owner, reply=frame)
        return None

    def deadlines(self) -> list[tuple[float, bool]]:
        """When the running task is to be stopped: ``(seconds after its start, final)`` for each
        ``stop(final)`` due, in order; empty without a timeout."""
        task = self._task
        if task is None or task.limits.timeout_s is None:
            return []
        timeout, grace = task.limits.timeout_s, task.limits.grace_s
        if task.kind == "command" and task.child is not None:  # its child enforces it
            return [(timeout + grace + COMMAND_BACKSTOP_S, True)]
        return [(timeout, False), (timeout + grace, True)]

    def stop(self, final: bool) -> None:
        """Stop the running task for its timeout: SIGTERM to its process group, or SIGKILL when
        ``final``. Its outcome comes from ``readable`` as it dies."""
        task = self._task
        if task is None:
            return
        task.timed_out = True
        sig = signal.SIGKILL if final else signal.SIGTERM
        if task.child is None:
            _signal_group(task.pid, sig)  # unreaped until its pidfd is read: its group id is its own
        elif task.child.ended is None:
            _signal_group(task.child.proc.pid, sig)

    # -- blocking conveniences -----------------------------------------------------------------

    def run_callable(self, function: bytes, arguments: bytes, scratch: Path,
                     limits: Limits = Limits(), listen: executor.Listen | None = None) -> Outcome:
        """``begin_callable`` and wait for its end."""
        return self._wait(self.begin_callable(function, arguments, scratch, limits, listen))

    def run_tile(self, request: dict, scratch: Path, limits: Limits = Limits()) -> Outcome:
        """``begin_tile`` and wait for its end."""
        return self._wait(self.begin_tile(request, scratch, limits))

    def run_trace(self, request: dict, scratch: Path, limits: Limits = Limits()) -> Outcome:
        """``begin_trace`` and wait for its end."""
        return self._wait(self.begin_trace(request, scratch, limits))

    def run_command(self, argv: list[str], env: dict[str, str] | None, scratch: Path,
                    inputs: dict[str, Path] | None = None, outputs: list[str] | None = None,
                    limits: Limits = Limits(), listen: executor.Listen | None = None) -> Outcome:
        """``begin_command`` and wait for its end."""
        return self._wait(self.begin_command(argv, env, scratch, inputs, outputs, limits, listen))

    def _wait(self, outcome: Outcome | None) -> Outcome:
        """Drive the task just begun to its end with a private poll (no watcher)."""
        task = self._task
        if outcome is not None or task is None:
            return outcome
        steps = self.deadlines()
        poller, polled = select.poll(), set()
        while True:
            now = set(self._watched)
            for fd in polled - now:
                poller.unregister(fd)
            for fd in now - polled:
                poller.register(fd, select.POLLIN)
            polled = now
            wait_ms = None
            if steps:
                wait_ms = max(0, int((task.started + steps[0][0] - time.monotonic()) * 1000) + 1)
            for fd, _ in poller.poll(wait_ms):
                outcome = self.readable(fd)
                if outcome is not None:
                    return outcome
            while steps and time.monotonic() >= task.started + steps[0][0]:
                self.stop(steps.pop(0)[1])

    def close(self) -> None:
        """Stop the child (EOF and SIGTERM, SIGKILL after a grace), reap it, and refuse later
        tasks; idempotent. While a task runs, its processes are killed at once and the task's end
        is reported as they die (its waiting ``run_*`` may be on another thread)."""
        with self._lock:
            self._closed = True
            task = self._task
            if task is not None:
                if task.child is None:
                    _signal_group(task.pid, signal.SIGKILL)
                elif task.child.ended is None:
                    _signal_group(task.child.proc.pid, signal.SIGKILL)
                if self._child is not None and self._child is not task.child:
                    self._stop(self._child)
                self._child = None
                return
            child, self._child = self._child, None
        if child is not None:
            self._stop(child)
        self._release_pipes()

    def reap_closed(self, timeout_s: float = CLOSE_GRACE_S) -> None:
        """After ``close`` with a task under way and no one left to wait for its end (the worker's
        loop has stopped): wait for its killed processes to exit, and reap them."""
        task = self._task
        if task is None:
            return
        if task.child is None:
            wait_readable(task.pidfd, timeout_s)
            self._command_exited(task)
        elif task.child.ended is None:
            wait_readable(task.child.pidfd, timeout_s)
            self._died(task.child, task)

    # -- the exchange ------------------------------------------------------------------------

    def _count(self, kind_counter: str) -> None:
        self.counters["tasks"] += 1
        self.counters[kind_counter] += 1

    def _begin(self, kind: str, message: dict, scratch: Path | str, limits: Limits,
               listen: executor.Listen | None = None,
               finish: Callable[[Outcome], Outcome] | None = None) -> Outcome | None:
        """Send a task to the slot's child."""
        started = time.monotonic()
        if self._task is not None:
            raise RuntimeError(f"slot {self.index} runs a task already")
        self._count(kind + "s")
        memory = self._task_memory(limits)
        if memory is not None and memory <= 0:
            return self._refused(kind, _bad_memory(memory), counted=True)
        scratch = self._ready_scratch(scratch)
        if not isinstance(scratch, str):
            return self._refused(kind, f"cannot prepare the scratch directory: {scratch}", counted=True)
        message["scratch"] = scratch
        try:
            frame = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - whatever the request holds that pickle refuses
            return self._refused(kind, f"cannot prepare the {kind} request: {exc}", counted=True)
        with self._lock:
            if self._closed:
                return self._refused(kind, f"slot {self.index} is closed", counted=True)
            try:
                child = self._ready_child(memory, kind == "command")
            except OSError as exc:
                return self._refused(kind, "cannot start the slot process: "
                                           f"{exc.strerror or exc}", counted=True)
            task = self._task = Task(kind, child, limits, started, EMPTY, listen, finish,
                                      cpu_before=child.cpu_total_s)
        task.pending = write_some(child.requests, memoryview(LENGTH.pack(len(frame)) + frame))
        return None

    def _spawn_command(self, argv: list[str], env: dict[str, str] | None, scratch: str, limits: Limits,
                       listen: executor.Listen | None, finish: Callable[[Outcome], Outcome] | None) -> Outcome | None:
        """Start a command from the worker itself (worker.spawn), writing to the slot's pipes."""
        started = time.monotonic()
        if self._task is not None:
            raise RuntimeError(f"slot {self.index} runs a task already")
        self._count("commands")
        made = self._ready_scratch(scratch)
        if not isinstance(made, str):
            return self._refused("command", f"cannot prepare the scratch directory: {made}", counted=True)
        with self._lock:
            if self._closed:
                return self._refused("command", f"slot {self.index} is closed", counted=True)
            out_r, out_w, err_r, err_w = self._output_pipes()
            try:
                pid = spawner().spawn(argv, os.environ if env is None else env, made, out_w, err_w)
            except FileNotFoundError:
                return self._refused("command", f"command not found: {argv[0]}", counted=True)
            except OSError as exc:
                return self._refused("command", f"cannot start {argv[0]}: {exc.strerror or exc}", counted=True)
            task = self._task = Task("command", None, limits, started, EMPTY, listen, finish, pid=pid,
                                      pidfd=os.pidfd_open(pid))
            self._watch(task.pidfd)
        return None

    def _ready_scratch(self, scratch: Path | str) -> str | OSError:
        """``scratch``, absolute, made if missing (once: see ``_scratch``); the error if not."""
        scratch = os.fspath(scratch)
        if not scratch.startswith("/"):
            scratch = os.path.abspath(scratch)
        if scratch != self._scratch or self.watcher is None:
            try:
                _scratch_dir(scratch, self.task_user)
            except OSError as exc:
                return exc
            self._scratch = scratch
        return scratch

    def _command_exited(self, task: Task) -> Outcome:
        """A command the worker started exited: what it left behind killed, it reaped."""
        _signal_group(task.pid, signal.SIGKILL)  # unreaped yet: its group id cannot have been reused
        _, status, usage = os.wait4(task.pid, 0)
        self._unwatch(task.pidfd)
        close_fd(task.pidfd)
        task.pidfd = -1
        return self._ended(task, status=status, usage=usage)

    def _ended(self, task: Task, *, reply: dict | None = None, status: int | None = None,
               usage: object = None) -> Outcome:
        """The task's Outcome, once its reply came or its process died; the slot is free again."""
        self._drain_output(task)  # the rest: the child flushed before replying
        with self._lock:
            self._task = None
            closed = self._closed
        if closed and task.child is not None and task.child.ended is None:  # closed during the task
            self._stop(task.child)
        if task.kind == "command" and reply is not GARBLED and (reply is not None or task.child is None):
            outcome = command_outcome(task, reply, status, usage, closed, self.index, self.counters,
                                      self._task_memory(task.limits))
        else:
            outcome = child_outcome(task, reply, status, usage, closed, self.index, self.counters)
        if closed:
            self._release_pipes()
        if task.finish is not None:
            outcome = task.finish(outcome)
        if not outcome.ok:
            self.counters["failed"] += 1
        return outcome

    def _died(self, child: Child, task: Task | None) -> Outcome | None:
        """The child's pidfd is readable: it exited. Its last words first, then the task's end."""
        reply = None
        if child.replies in self._watched:
            reply = next((f for f in child.frames.drain(child.replies) if f is not slot_child.MORE), None)
        if task is not None:
            self._drain_output(task)
        status, usage = self._lose(child)
        if task is None:
            self.counters["idle_deaths"] += 1  # between tasks (a leftover thread, an outside kill)
            return None
        if reply is not None and not task.timed_out:  # it answered, then died: the answer holds
            return self._ended(task, reply=reply)
        return self._ended(task, status=status, usage=usage)

    def _drain_output(self, task: Task) -> None:
        """What the output pipes hold now, into the task's captures (one poll when they are empty,
        as they mostly are)."""
        for fd, _ in self._output_poll.poll(0):
            self._read_output(fd, task, None)

    def _read_output(self, fd: int, task: Task | None, limit: int | None) -> None:
        """Read what the output pipe ``fd`` holds (up to ``limit`` bytes, None: all of it) into
        the task's capture; dropped, and counted, while no task runs."""
        taken = 0
        while limit is None or taken < limit:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            taken += len(chunk)
            if task is not None:
                task.capture(1 if fd == self._pipes[0] else 2, self.output_cap_bytes).take(chunk)
            else:
                if not self.counters["stray_output_bytes"]:
                    log.info("slot %d: output while no task runs (dropped): %r", self.index, chunk[:200])
                self.counters["stray_output_bytes"] += len(chunk)

    def _task_memory(self, limits: Limits) -> int | None:
        mine, asked = self.memory_bytes, limits.memory_bytes
        if mine is None or asked is None:
            return asked if mine is None else mine
        return min(mine, asked)

    def _ready_child(self, memory: int | None, command: bool) -> Child:
        """The running child if it lives and suits the task's memory limit, else a new one: a
        callable's child must have that limit, a command's one no lower than the command's."""
        child = self._child
        if child is not None and child.exited():
            self.counters["idle_deaths"] += 1
            self._lose(child)  # it died between tasks (a leftover thread, an outside kill)
            child = None
        if child is not None:
            if command:
                suits = child.memory_bytes is None or (memory is not None and memory <= child.memory_bytes)
            else:
                suits = child.memory_bytes == memory
            if not suits:
                self.counters["limit_restarts"] += 1
                self._child = None
                self._stop(child)
                child = None
        if child is None:
            _, out_w, _, err_w = self._output_pipes()
            child = spawn_child(memory, self.env, self.task_user, out_w, err_w)
            self.counters["spawns"] += 1
            if self.counters["spawns"] > 1:
                self.counters["restarts"] += 1
            self._watch(child.replies)
            self._watch(child.pidfd)
            self._child = child
        return child

    def _output_pipes(self) -> tuple[int, int, int, int]:
        """The slot's stdout and stderr pipes (made on first use; the worker keeps both ends, so
        its children and commands share them and they never reach EOF)."""
        if self._pipes is None:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            for fd in (out_r, err_r):
                os.set_blocking(fd, False)
            self._pipes = (out_r, out_w, err_r, err_w)
            self._output_poll = select.poll()
            for fd in (out_r, err_r):
                self._output_poll.register(fd, select.POLLIN)
                self._watch(fd)
        return self._pipes

    def _release_pipes(self) -> None:
        if self._pipes is not None:
            for fd in (self._pipes[0], self._pipes[2]):
                self._unwatch(fd)
            for fd in self._pipes:
                close_fd(fd)
            self._pipes = None

    def _watch(self, fd: int) -> None:
        self._watched.add(fd)
        if self.watcher is not None:
            self.watcher.add(fd)

    def _unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            if self.watcher is not None:
                self.watcher.remove(fd)

    def _lose(self, child: Child) -> tuple[int, object]:
        """Reap a child that exited (or is being killed); the slot starts a new one next time."""
        with self._lock:  # so that close() never signals a pid that was reaped (and reusable)
            if self._child is child:
                self._child = None
            self._unwatch(child.replies)
            self._unwatch(child.pidfd)
            return reap(child)

    def _stop(self, child: Child) -> None:
        """End an idle child: EOF on its requests and SIGTERM, SIGKILL after a grace; reap it.
        Driven by a loop (``watcher``), at once SIGKILL: the loop must not wait out a grace."""
        if child.ended is not None:
            return
        self._unwatch(child.replies)
        self._unwatch(child.pidfd)
        close_fd(child.requests)
        child.requests = -1
        if self.watcher is None:
            _signal_group(child.proc.pid, signal.SIGTERM)
        if self.watcher is not None or not wait_readable(child.pidfd, CLOSE_GRACE_S):
            _signal_group(child.proc.pid, signal.SIGKILL)
        reap(child)

    def _refused(self, kind: str, error: str, *, counted: bool = False) -> Outcome:
        """A task that never reached a process: a bad argument or an unusable scratch dir."""
        if not counted:
            self._count(kind + "s")
        self.counters["failed"] += 1
        return executor._not_started(kind, error)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _scratch_dir(scratch: str, task_user: TaskUser | None) -> None:
    """``scratch`` made if missing (a ``taskuser.task_dir``): one mkdir when it exists."""
    try:
        os.mkdir(scratch, 0o777 if task_user is None else 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        pass  # its parents are missing too
    taskuser.task_dir(scratch, task_user)


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
