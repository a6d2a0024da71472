"""A slot's child process seen from the worker: how it is started, the frames it answers with,
how it is reaped (worker.slots drives it; worker.slot_child is the other side).

The child gets two pipes of its own, requests in and replies out (private descriptors it is
told on its command line), and its slot's output pipes as its stdout and stderr (fds 1 and 2,
which the worker reads as they fill); stdin is /dev/null. It leads a session of its own (so a
command it starts, which leads a group of its own in that session, is still found and killed
with it). The worker's ends are non-blocking; the request pipe is made as large as Linux lets a
user ask for, so most requests go in one write.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Protocol

from worker import slot_child
from worker.executor import _signal_group
from worker.taskuser import TaskUser

REQUEST_PIPE_BYTES = 1 << 20  # Linux lets a user ask for up to 1 MiB (fs.pipe-max-size)
LENGTH = struct.Struct("<Q")
_READ_CHUNK = 1 << 16
_FRAME_MAX = 1 << 40  # a length beyond this is not ours (text written to the pipe reads as ~2^62)


class Watcher(Protocol):
    """Where a slot's descriptors are watched for reading (the worker's loop)."""

    def add(self, fd: int) -> None: ...

    def remove(self, fd: int) -> None: ...


@dataclass(slots=True)
class Child:
    """A slot's child process and the worker's ends of its pipes."""

    proc: subprocess.Popen
    pidfd: int
    requests: int  # write end of the request pipe (non-blocking)
    replies: int  # read end of the reply pipe (non-blocking)
    memory_bytes: int | None
    cpu_total_s: float = 0.0  # the child's CPU time as of its last reply
    ended: tuple | None = None  # (wait status, rusage) once reaped
    frames: Frames = field(default_factory=lambda: Frames())
    exit_poll: select.poll | None = None  # its pidfd, to ask without waiting whether it exited

    def exited(self) -> bool:
        """Whether it has exited (checked now, without waiting)."""
        if self.exit_poll is None:
            self.exit_poll = select.poll()
            self.exit_poll.register(self.pidfd, select.POLLIN)
        return bool(self.exit_poll.poll(0))


def spawn_child(memory: int | None, env: dict[str, str] | None, task_user: TaskUser | None,
                stdout: int, stderr: int) -> Child:
    """Start a slot's child (under RLIMIT_AS ``memory``, as ``task_user``) writing to ``stdout``
    and ``stderr``; OSError if it cannot."""
    requests_r, requests_w = os.pipe()  # O_CLOEXEC: other slots' children never get them
    replies_r, replies_w = os.pipe()
    argv = [sys.executable, "-P", "-m", slot_child.__name__, str(requests_r), str(replies_w)]
    if memory is not None:
        argv.append(str(memory))
    if task_user is not None:
        argv.append(slot_child.UNPRIVILEGED)
    try:
        proc = subprocess.Popen(argv, cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                pass_fds=(requests_r, replies_w), start_new_session=True,
                                **(task_user.spawn() if task_user else {}))
    except OSError:
        for fd in (requests_r, requests_w, replies_r, replies_w):
            os.close(fd)
        raise
    for fd in (requests_r, replies_w):
        os.close(fd)
    for fd in (requests_w, replies_r):
        os.set_blocking(fd, False)
    try:
        fcntl.fcntl(requests_w, fcntl.F_SETPIPE_SZ, REQUEST_PIPE_BYTES)
    except OSError:
        pass  # the system's cap is lower: requests go in more pieces
    return Child(proc, os.pidfd_open(proc.pid), requests_w, replies_r, memory)


GARBLED = {"ok": False, "status": slot_child.UNUSABLE, "result": None, "cpu_total_s": 0.0,
            "max_rss_bytes": 0, "error": "the slot process sent a reply that cannot be read "
                                         "(did the task write to the slot's pipes?)"}
_REPLY_KEYS = {"ok", "status", "error", "result", "cpu_total_s", "max_rss_bytes"}


class Frames:
    """Length-prefixed frames read in pieces from a non-blocking pipe."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray()

    def read_from(self, fd: int) -> list | None:
        """The frames that one read of what the pipe holds completes ([] if none); None at EOF."""
        try:
            chunk = os.read(fd, max(_READ_CHUNK, min(self._needed() - len(self.buffer), 1 << 24)))
        except BlockingIOError:
            return []
        return self._take(chunk) if chunk else None

    def drain(self, fd: int) -> list:
        """Every frame the pipe still holds, read to its EOF or until it is empty."""
        frames: list = []
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return frames
            if not chunk:
                return frames
            frames += self._take(chunk)

    def _take(self, chunk: bytes) -> list:
        """The frames ``chunk`` completes. One that is not a reply or a MORE reads as
        ``GARBLED``, and so does all that came after it (the stream is lost)."""
        if not self.buffer and len(chunk) > LENGTH.size and LENGTH.unpack_from(chunk)[0] == len(chunk) - LENGTH.size:
            return [self._frame(memoryview(chunk)[LENGTH.size:])]  # one whole frame, as most replies come
        self.buffer += chunk
        frames = []
        while len(self.buffer) >= LENGTH.size:
            end = self._needed()
            if end > _FRAME_MAX:
                self.buffer.clear()
                frames.append(GARBLED)
                break
            if len(self.buffer) < end:
                break
            with memoryview(self.buffer) as view:
                frame = self._frame(view[LENGTH.size:end])
            if len(self.buffer) == end:
                self.buffer = bytearray()
            else:
                del self.buffer[:end]
            frames.append(frame)
            if frame is GARBLED:
                self.buffer.clear()
                break
        return frames

    @staticmethod
    def _frame(body: memoryview) -> dict:
        """A reply, MORE, or GARBLED (what only user code writing to our pipe makes)."""
        try:
            value = pickle.loads(body)
        except Exception:  # noqa: BLE001
            return GARBLED
        if value == slot_child.MORE:
            return slot_child.MORE
        if isinstance(value, dict) and _REPLY_KEYS <= value.keys():
            return value
        return GARBLED

    def _needed(self) -> int:
        if len(self.buffer) < LENGTH.size:
            return LENGTH.size
        return LENGTH.size + LENGTH.unpack_from(self.buffer)[0]


def write_some(fd: int, data: memoryview) -> memoryview:
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


def reap(child: Child) -> tuple[int, object]:
    """Kill what is left of a child that exited (or is being killed) and reap it: its wait status
    and rusage; its descriptors closed."""
    if child.ended is not None:
        return child.ended
    # Its leftovers go first, while the leader is unreaped: its pid (the group and session id)
    # cannot have been reused yet. A command has a group of its own in the child's session.
    _signal_group(child.proc.pid, signal.SIGKILL)
    kill_session(child.proc.pid)
    _, status, usage = os.wait4(child.proc.pid, 0)
    child.proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits on it
    for fd in (child.pidfd, child.requests, child.replies):
        close_fd(fd)
    child.pidfd = child.requests = child.replies = -1
    child.ended = (status, usage)
    return child.ended


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (one a child started, still unreaped)."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in pids:
        if pid == sid:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and int(fields[3]) == sid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def has_exited(pidfd: int) -> bool:
    return wait_readable(pidfd, 0)


def wait_readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout_s * 1000)))


def close_fd(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
