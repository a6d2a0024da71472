"""Processes of a local cluster, by pid (never by name): who is ours, stopping, leftovers.

A pid is opened as a pidfd first and kept only if its ``/proc/<pid>/cmdline`` is one of D's
nodes (``python -m cluster`` with a path under D), so a reused pid is never signalled, and the
pidfd then pins that very process. ``stop_records`` stops D's nodes role by role (workers first:
on SIGTERM they unmount their FUSE view and stop their slots), SIGTERM then SIGKILL past a
shared deadline, with the descendants a SIGKILLed node leaves behind; ``sweep_mounts`` stops the
FUSE mount child a SIGKILLed worker left (``D/<worker>/mount.pid``) and unmounts what is still
mounted under D (lazily if busy).
"""

from __future__ import annotations

import os
import re
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from worker.fusefs import unmount

STOP_ORDER = ("worker", "balancer", "storage", "master")


class UpError(Exception):
    """One sentence for the user: what went wrong and what to do."""

# ---- processes, by pid ------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_ours(pid: int, directory: Path) -> bool:
    """Whether ``pid`` runs one of D's nodes: ``python -m cluster …`` with a path under D."""
    args = _cmdline(pid)
    under = str(directory) + os.sep
    return "cluster" in args[:4] and any(a.startswith(under) for a in args)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _open(pid: int | None, directory: Path | None) -> int | None:
    """A pidfd for ``pid`` if it is alive (and, with ``directory``, one of D's nodes)."""
    if not pid or pid <= 0:
        return None
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return None
    if directory is not None and not is_ours(pid, directory):
        os.close(fd)
        return None
    return fd


def open_ours(pid: int | None, directory: Path) -> int | None:
    """A pidfd for ``pid`` if it is alive and one of D's nodes (the caller closes it), else None."""
    return _open(pid, directory)


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc), e.g. a worker's slot processes, which run
    in sessions of their own."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def _wait_exit(fds: dict[int, Any], deadline: float) -> dict[int, Any]:
    """Wait on the pidfds until all exited or the deadline; returns those still running."""
    left = dict(fds)
    poller = select.poll()
    for fd in left:
        poller.register(fd, select.POLLIN)
    while left and (rest := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(rest * 1000):
            poller.unregister(fd)
            left.pop(fd, None)
    return left


def _wait_reaped(fds: dict[int, Any], deadline: float) -> None:
    """Wait until the exited processes behind ``fds`` are reaped (gone from the process table),
    so that a caller checking their pids afterwards finds none. Their parent now is init (or a
    subreaper), which may reap only every second or so; our own children are left to us."""
    left = [fd for fd in fds if _parent(_pid_of(fd)) != os.getpid()]
    while left and time.monotonic() < deadline:
        for fd in list(left):
            try:
                signal.pidfd_send_signal(fd, 0)
            except ProcessLookupError:
                left.remove(fd)
        if left:
            time.sleep(0.02)  # the poll interval of a deadline loop: reaping by another process has no event


def _parent(pid: int | None) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) if pid else None
    except (OSError, ValueError, IndexError):
        return None


def _signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


@dataclass
class Stopped:
    """What ``stop_processes`` did: processes that exited on SIGTERM, and those it SIGKILLed."""

    terminated: int = 0
    killed: int = 0

    def add(self, other: "Stopped") -> None:
        self.terminated += other.terminated
        self.killed += other.killed


def stop_processes(fds: dict[int, str], deadline: float, grace: float = 2.0) -> Stopped:
    """SIGTERM the processes behind ``fds`` (pidfd → name), wait until ``deadline`` (at least
    ``grace`` seconds), then SIGKILL what is left. The caller closes the pidfds."""
    done = Stopped()
    for fd in fds:
        _signal(fd, signal.SIGTERM)
    left = _wait_exit(fds, max(deadline, time.monotonic() + grace))
    done.terminated = len(fds) - len(left)
    for fd in left:
        _signal(fd, signal.SIGKILL)
    done.killed = len(left)
    _wait_exit(left, time.monotonic() + 5.0)
    return done


def stop_records(records: Sequence[Any], directory: Path, timeout: float = 15.0) -> Stopped:
    """Stop D's node processes (records with name, role, pid) by pid, workers first, then balancers, storage, masters. Only pids
    whose cmdline is one of D's nodes are touched. Descendants a SIGKILLed node leaves behind
    (slot processes, their commands, a mount child) are SIGKILLed too. Returns once every one
    of them is gone from the process table (or a few seconds after)."""
    deadline = time.monotonic() + timeout
    done = Stopped()
    held: list[int] = []  # every pidfd opened, closed at the end
    try:
        for role in STOP_ORDER:
            fds: dict[int, str] = {}
            for r in records:
                if r.role == role and (fd := _open(r.pid, directory)) is not None:
                    fds[fd] = r.name
            held += fds
            orphans = _family_of(fds)  # taken now: a SIGKILLed node's children are reparented
            held += orphans
            if fds:
                done.add(stop_processes(fds, deadline))
            left = _wait_exit(orphans, time.monotonic() + 1.0)
            for fd in left:
                _signal(fd, signal.SIGKILL)
            _wait_exit(left, time.monotonic() + 5.0)
            done.killed += len(left)
        _wait_reaped(dict.fromkeys(held), time.monotonic() + 5.0)
    finally:
        for fd in held:
            os.close(fd)
    return done


def _family_of(fds: dict[int, str]) -> dict[int, str]:
    """Pidfds for the live descendants of the processes behind ``fds``."""
    out: dict[int, str] = {}
    for fd, name in fds.items():
        pid = _pid_of(fd)
        for kid in descendants(pid) if pid else ():
            kfd = _open(kid, None)
            if kfd is not None:
                out[kfd] = f"{name}/{kid}"
    return out


def _pid_of(fd: int) -> int | None:
    """The pid behind a pidfd (its /proc/self/fdinfo ``Pid:`` line)."""
    try:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


# ---- FUSE mounts a dead worker left -------------------------------------------------------------


def _fuse_mounts_under(directory: Path) -> list[str]:
    """FUSE mount points under ``directory``, deepest first (from /proc/self/mountinfo)."""
    under = str(directory) + os.sep
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                mine, _, theirs = line.partition(" - ")
                fields = mine.split()
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]) if len(fields) > 4 else ""
                if point.startswith(under) and theirs.split(" ", 1)[0].startswith("fuse"):
                    found.append(point)
    except OSError:
        return []
    return sorted(set(found), key=len, reverse=True)


def sweep_mounts(directory: Path, deadline: float, worker: str | None = None) -> tuple[Stopped, list[str]]:
    """Stop the mount children SIGKILLed workers left (their pid in ``D/<worker>/mount.pid``), then
    unmount the FUSE mounts still under D (lazily when busy); with ``worker``, only that worker's.
    Returns what it stopped and the mount points it unmounted."""
    pid_files = [directory / worker / "mount.pid"] if worker else list(directory.glob("*/mount.pid"))
    fds: dict[int, str] = {}
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if (fd := _open(pid, directory)) is not None:
            fds[fd] = f"{pid_file.parent.name}'s mount"
    try:
        stopped = stop_processes(fds, deadline)
        _wait_reaped(fds, time.monotonic() + 5.0)
    finally:
        for fd in fds:
            os.close(fd)
    for pid_file in pid_files:
        pid_file.unlink(missing_ok=True)
    unmounted = []
    for point in _fuse_mounts_under(directory / worker if worker else directory):
        try:
            unmount(point)
        except OSError:
            try:
                unmount(point, lazy=True)
            except OSError as exc:
                raise UpError(f"cannot unmount {point} ({exc}): unmount it by hand (`fusermount3 -uz {point}`)") from None
        unmounted.append(point)
    return stopped, unmounted


def sweep_worker_mount(directory: Path, worker: str, deadline: float) -> tuple[Stopped, list[str]]:
    """``sweep_mounts`` for one worker of D (before it starts again)."""
    return sweep_mounts(directory, deadline, worker)
