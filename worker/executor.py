"""Runs one task in a child process under limits and reports how it went (issue 7).

Theory of operation
-------------------
``run_command`` (a shell command: argv, env, scratch directory, declared inputs and outputs)
and ``run_callable`` (a cloudpickled Python callable) run one task each and block until it is
over, returning an ``Outcome``; a failing task is an ``Outcome`` with ``ok=False`` and an
``error`` line, never an exception, so a bad task cannot take its worker down. A worker's slots
(worker.slots) run tasks without blocking and without a process per callable, but word their
outcomes as this module does (``_Run``, ``_Capture``, the input and output checks are shared).

Every task runs as the leader of its own session and process group, so the whole tree it
starts can be signalled at once. One supervisor (``_supervise``) serves both kinds: it polls the
leader's pidfd and its stdout/stderr pipes together, so there is no reader thread and no sleep.

- Timeout: SIGTERM to the whole group, then SIGKILL after ``Limits.grace_s``.
- Memory: ``RLIMIT_AS`` set in the child between fork and exec (see ``_address_space_limit``).
- End of task: when the leader exits, whatever is left of its group is SIGKILLed (a task's
  processes never outlive it), and the pipes are drained to EOF, so when we return every
  process that held them has been killed and is at least in its exit. Only a process that
  left the group (``setsid``) can escape; we stop waiting for its pipes after ``grace_s``.
- Accounting: the leader is reaped with ``os.wait4``, whose rusage covers it and the
  descendants it waited for; per-child, so slots on other threads do not mix their numbers.
- Output: each stream keeps its first and last half of ``output_cap_bytes`` and notes what it
  dropped in between (the end of a log is where errors are).

Callables run in ``python -m worker.task_child`` rather than a multiprocessing child: the child
is then an ordinary process under the same supervisor (group, limits, timeout, rusage), and
``os._exit``, a segfault or the memory limit inside user code are just an exit status. With
multiprocessing, a child dying mid-send can leave the parent waiting on a pipe or a result
queue, the spawn start method re-imports the worker's ``__main__``, and its resource tracker is
one more process to keep alive. Call and result travel as files in the scratch directory, so a
large result never has to fit through a pipe and a half-written one is never read.

Tasks as their own user (``--task-user``): ``worker.taskuser``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import cloudpickle

from worker import task_child
from worker.taskuser import DIR_FLAGS, TaskUser, give_to_group, task_dir

OUTPUT_CAP_BYTES = 1 << 20
_READ_CHUNK = 1 << 16
# The signals a process under RLIMIT_AS typically dies of when an allocation fails: a runtime
# that aborts (C++ bad_alloc, Rust), one that touches a NULL it did not check, or the OOM killer.
_MEMORY_SIGNALS = {signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS}
_CALL_DIR = ".task"

Listen = Callable[[int, bytes], None]  # (stream: 1 stdout, 2 stderr; a chunk as it was read)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a task may use. ``None`` means no limit."""

    timeout_s: float | None = None
    memory_bytes: int | None = None
    # Between the SIGTERM of a timeout and the SIGKILL that follows it.
    grace_s: float = 2.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one task ended. ``ok`` is the only field a caller must read to know if it worked."""

    ok: bool
    kind: str  # "command" or "callable"
    exit_code: int | None  # None when it never started or a signal ended it
    error: str | None  # one line for people, None when ok
    result: bytes | None  # callables: cloudpickle of the return value
    stdout: bytes
    stderr: bytes
    outputs: dict[str, Path] = field(default_factory=dict)  # declared outputs found, by name
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_bytes: int = 0
    timed_out: bool = False
    killed_by_signal: int | None = None
    exception: bytes | None = None  # callables: cloudpickle of what it raised, when that pickles


class TaskFailed(Exception):
    """``unpack_result`` of an outcome that is not ok."""


def pack_call(fn, *args, **kwargs) -> bytes:
    """The payload ``run_callable`` takes: ``fn(*args, **kwargs)`` shipped with cloudpickle."""
    return cloudpickle.dumps((fn, args, kwargs))


def unpack_result(outcome: Outcome) -> Any:
    """The return value of a callable's ``Outcome``; ``TaskFailed`` if the task failed."""
    if not outcome.ok:
        raise TaskFailed(outcome.error)
    return cloudpickle.loads(outcome.result)


def run_command(
    argv: list[str],
    *,
    env: dict[str, str] | None,
    scratch: Path,
    inputs: dict[str, Path] | None = None,
    outputs: list[str] | None = None,
    limits: Limits = Limits(),
    output_cap_bytes: int = OUTPUT_CAP_BYTES,
    task_user: TaskUser | None = None,
    listen: Listen | None = None,
) -> Outcome:
    """Run ``argv`` in ``scratch`` (created if missing) and report how it ended.

    ``env`` is the whole environment (``None``: the worker's own). ``inputs`` are symlinked into
    ``scratch`` under their names; ``outputs`` are paths relative to ``scratch`` that must exist
    afterwards, or the outcome is not ok. ``task_user``: the command runs as that user, and
    ``scratch`` is made a ``task_dir``.
    """
    scratch = Path(scratch)
    try:
        task_dir(scratch, task_user)
    except OSError as exc:
        return _not_started("command", f"cannot prepare the scratch directory: {exc}")
    problem = _place_inputs(scratch, inputs or {}, task_user)
    if problem:
        return _not_started("command", problem)
    run = _supervise(argv, env=env, cwd=scratch, limits=limits, cap=output_cap_bytes,
                     spawn=task_user.spawn() if task_user else None, listen=listen)
    if run.start_error:
        return _not_started("command", run.start_error)
    found, missing = _collect_outputs(scratch, outputs or [])
    errors = [e for e in (run.ending_error(limits),) if e]
    if missing:
        errors.append("missing output: " + ", ".join(missing))
    return run.outcome("command", errors, result=None, outputs=found)


def run_callable(
    payload: bytes, *, scratch: Path, limits: Limits = Limits(), output_cap_bytes: int = OUTPUT_CAP_BYTES
) -> Outcome:
    """Run a ``pack_call`` payload in a fresh interpreter (``worker.task_child``) under ``limits``.

    The callable's working directory is ``scratch``; ``Outcome.result`` is the cloudpickled
    return value. Its print output is in ``stdout``/``stderr``, and a traceback in ``stderr``.
    """
    scratch = Path(scratch)
    box = scratch / _CALL_DIR
    box.mkdir(parents=True, exist_ok=True)
    for stale in ("result.pkl", "error.txt"):
        (box / stale).unlink(missing_ok=True)
    (box / "call.pkl").write_bytes(payload)
    # -P: the scratch directory (cwd) is not put on sys.path, so task files shadow no module.
    argv = [sys.executable, "-P", "-m", task_child.__name__, str(box.resolve())]
    run = _supervise(argv, env=None, cwd=scratch, limits=limits, cap=output_cap_bytes)
    if run.start_error:
        return _not_started("callable", run.start_error)
    error, result = _callable_ending(run, box, limits), None
    if error is None:
        result = (box / "result.pkl").read_bytes()
    return run.outcome("callable", [error] if error else [], result=result, outputs={})


def _callable_ending(run: _Run, box: Path, limits: Limits) -> str | None:
    """Why the callable failed (from the exit status and the child's answer files), or None."""
    ending = run.ending_error(limits)
    if run.timed_out or run.signum is not None:
        return ending
    if (box / "error.txt").exists():
        error = (box / "error.txt").read_text(errors="replace")
        if error.startswith("MemoryError") and limits.memory_bytes:
            error += f" (memory limit {_mib(limits.memory_bytes)})"
        return error
    if (box / "result.pkl").exists() and run.exit_code == 0:
        return None
    return f"{ending or 'exit status 0'} before the callable returned"


# -- supervision -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    start_error: str | None = None
    status: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_bytes: int = 0
    timed_out: bool = False
    timeout_s: float | None = None
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    @property
    def signum(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    def ending_error(self, limits: Limits) -> str | None:
        """Why the process ended badly, or None if it exited with status 0."""
        if self.timed_out:
            return f"killed after {self.timeout_s:g} s timeout"
        if self.signum is not None:
            text = f"killed by signal {self.signum} ({signal.Signals(self.signum).name})"
            if limits.memory_bytes and self.signum in _MEMORY_SIGNALS:
                text += f" — over its {_mib(limits.memory_bytes)} memory limit?"
            return text
        if self.exit_code:
            return f"exit status {self.exit_code}"
        return None

    def outcome(self, kind: str, errors: list[str], *, result: bytes | None, outputs: dict[str, Path]) -> Outcome:
        return Outcome(
            ok=not errors, kind=kind, exit_code=self.exit_code, error="; ".join(errors) or None,
            result=result, stdout=self.stdout, stderr=self.stderr, outputs=outputs,
            wall_s=self.wall_s, cpu_s=self.cpu_s, max_rss_bytes=self.max_rss_bytes,
            timed_out=self.timed_out, killed_by_signal=self.signum,
        )


def _supervise(argv: list[str], *, env: dict[str, str] | None, cwd: Path, limits: Limits, cap: int,
               spawn: dict[str, Any] | None = None, listen: Listen | None = None) -> _Run:
    """Start ``argv`` as a group leader, enforce ``limits``, reap it; see the module docstring.
    ``spawn``: more ``Popen`` arguments (``TaskUser.spawn``); ``listen(stream, chunk)`` hears
    each chunk of stdout (1) and stderr (2) as it is read."""
    run = _Run(timeout_s=limits.timeout_s)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_address_space_limit(limits.memory_bytes) if limits.memory_bytes else None,
            **(spawn or {}),
        )
    except FileNotFoundError:
        run.start_error = f"command not found: {argv[0]}"
        return run
    except OSError as exc:
        run.start_error = f"cannot start {argv[0]}: {exc.strerror or exc}"
        return run
    streams = {proc.stdout.fileno(): _Capture(cap, None if listen is None else partial(listen, 1)),
               proc.stderr.fileno(): _Capture(cap, None if listen is None else partial(listen, 2))}
    try:
        pidfd = os.pidfd_open(proc.pid)
        try:
            run.timed_out = _wait_for_exit(proc.pid, pidfd, streams, started, limits)
        finally:
            os.close(pidfd)
        # The leader is a zombie, so its pid (the group id) cannot have been reused yet.
        _signal_group(proc.pid, signal.SIGKILL)
        _, run.status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(run.status)  # so Popen never waits on it
        _drain(streams, time.monotonic() + limits.grace_s)
    finally:
        if proc.returncode is None:  # interrupted (KeyboardInterrupt, a bug): leave no task behind
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    run.wall_s = time.monotonic() - started
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.max_rss_bytes = usage.ru_maxrss * 1024  # Linux reports KiB
    run.stdout, run.stderr = (c.value() for c in streams.values())
    return run


def _wait_for_exit(pid: int, pidfd: int, streams: dict[int, _Capture], started: float, limits: Limits) -> bool:
    """Read the pipes until the leader exits, enforcing the timeout; True if it timed out."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    for fd in streams:
        poller.register(fd, select.POLLIN)
    # The timeout's escalation: SIGTERM at the deadline, SIGKILL a grace period later.
    steps = []
    if limits.timeout_s is not None:
        deadline = started + limits.timeout_s
        steps = [(deadline, signal.SIGTERM), (deadline + limits.grace_s, signal.SIGKILL)]
    timed_out = False
    while True:
        wait_ms = max(0, int((steps[0][0] - time.monotonic()) * 1000) + 1) if steps else None
        for fd, _ in poller.poll(wait_ms):
            if fd == pidfd:
                return timed_out
            if not streams[fd].read_from(fd):
                poller.unregister(fd)
        while steps and time.monotonic() >= steps[0][0]:
            _signal_group(pid, steps.pop(0)[1])
            timed_out = True


def _drain(streams: dict[int, _Capture], deadline: float) -> None:
    """Read the pipes to EOF: every process still holding them has been killed, or escaped."""
    poller = select.poll()  # not select.select: a busy worker's fds may be past FD_SETSIZE
    open_fds = set(streams)
    for fd in open_fds:
        poller.register(fd, select.POLLIN)
    while open_fds:
        wait_s = deadline - time.monotonic()
        if wait_s <= 0:
            return
        for fd, _ in poller.poll(int(wait_s * 1000) + 1):
            if not streams[fd].read_from(fd):
                poller.unregister(fd)
                open_fds.discard(fd)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _address_space_limit(memory_bytes: int):
    """A preexec_fn capping the child's address space.

    RLIMIT_AS rather than a cgroup: it needs no privileges, no cgroup v2 delegation and no
    systemd, and it is inherited by everything the task starts, so it works the same on any
    worker host. Its costs: it counts reserved address space, not resident memory (a runtime
    that reserves big arenas, such as the JVM or Go, needs headroom), and each process of the
    task gets the cap on its own rather than the tree sharing one. An allocation over it fails
    (MemoryError, ENOMEM) instead of the OOM killer picking a victim, which makes the failure
    the task's own and visible in its output. The function only calls setrlimit, since between
    fork and exec in a threaded worker it must not take locks.
    """
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return limit


class _Capture:
    """One output stream: all of it up to ``cap`` bytes, else its head and tail and a note."""

    __slots__ = ("cap", "head", "tail", "total", "listen")

    def __init__(self, cap: int, listen: Callable[[bytes], None] | None = None) -> None:
        self.cap = cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.listen = listen  # told every chunk as it is read: a follower sees output live

    def read_from(self, fd: int) -> bool:
        """Take one chunk from ``fd``; False at EOF."""
        chunk = os.read(fd, _READ_CHUNK)
        if not chunk:
            return False
        self.take(chunk)
        return True

    def take(self, chunk: bytes) -> None:
        """Keep ``chunk`` (as the cap allows) and tell it to ``listen``."""
        if self.listen is not None:
            self.listen(chunk)
        self.total += len(chunk)
        room = self.cap // 2 - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        keep = self.cap - self.cap // 2
        if len(self.tail) > 2 * keep + _READ_CHUNK:
            del self.tail[: len(self.tail) - keep]

    def value(self) -> bytes:
        if self.total <= self.cap:
            return bytes(self.head + self.tail)
        keep = self.cap - self.cap // 2
        dropped = self.total - len(self.head) - keep
        note = f"\n[... {dropped} bytes truncated: output over the {self.cap} byte cap ...]\n"
        return bytes(self.head) + note.encode() + bytes(self.tail[-keep:] if keep else b"")


# -- scratch directory -------------------------------------------------------------------------


def _relative_inside(name: str) -> bool:
    path = Path(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def _place_inputs(scratch: Path, inputs: dict[str, Path], task_user: TaskUser | None = None) -> str | None:
    """Symlink each input into ``scratch`` under its name; the problem, if one cannot be.

    Through directory fds, never following a symbolic link in ``scratch`` (a task of the same
    user on another slot could have planted one, to have the worker make links elsewhere); the
    directories made on the way are ``task_dir``s when there is a task user."""
    for name, source in inputs.items():
        if not _relative_inside(name):
            return f"input {name!r}: not a relative path inside the scratch directory"
        source = Path(source)
        if not source.exists():
            return f"input {name!r}: {source} does not exist"
        parts = Path(name).parts
        try:
            dir_fd = os.open(scratch, DIR_FLAGS)
            try:
                for part in parts[:-1]:
                    try:
                        os.mkdir(part, 0o777, dir_fd=dir_fd)
                        made = True
                    except FileExistsError:
                        made = False
                    inner = os.open(part, DIR_FLAGS, dir_fd=dir_fd)
                    os.close(dir_fd)
                    dir_fd = inner
                    if made and task_user is not None:
                        give_to_group(dir_fd, task_user)
                os.symlink(source.resolve(), parts[-1], dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            return f"input {name!r}: cannot link into the scratch directory: {exc.strerror or exc}"
    return None


def _collect_outputs(scratch: Path, outputs: list[str]) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for name in outputs:
        path = scratch / name
        if _relative_inside(name) and path.exists():
            found[name] = path
        else:
            missing.append(name)
    return found, missing


def _not_started(kind: str, error: str) -> Outcome:
    return Outcome(ok=False, kind=kind, exit_code=None, error=error, result=None, stdout=b"", stderr=b"")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"
