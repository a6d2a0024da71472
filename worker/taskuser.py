"""The task user: running every task process as an unprivileged user of its own (issue 20).

With a ``TaskUser`` every task process (a slot's child, a command) is started by ``Popen`` with
``user=``, ``group=`` (the user's primary group, called G below), ``extra_groups=[]`` and
``umask=0o007``: Python's child does setgroups, setregid and setreuid between fork and exec, so
the worker needs root, or exactly CAP_SETUID, CAP_SETGID and CAP_KILL (``switch_problem``).
CAP_KILL because kill(2) lets a process signal another uid's processes only with it: without
it a timeout, a closing slot or the end-of-task sweep of a task's group gets EPERM. No helper
binary. A worker that is not root holds these capabilities as systemd gives them
(``AmbientCapabilities=``): ambient capabilities survive setreuid between two non-zero uids and
execve, so a task would start with CAP_SETUID and could become anyone.
``drop_inheritable_capabilities`` therefore clears the worker's ambient and inheritable sets
at start (its effective set, which setreuid in the child needs, stays; an execve without file
capabilities then leaves the task with none), and ``probe_task_user`` starts one process as
the task user and checks that it holds no capability, cannot read what it must not, and can
write where it must; the slot child checks its own capabilities again (``--unprivileged``).

Files are shared through the group G, not through ownership (which would need CAP_CHOWN): the
worker's user is a member of G, so it can give a directory it made to G (``task_dir``: mode
2770, setgid, so what a task makes inside belongs to G too) and, with the tasks' umask 007,
read and delete what a task leaves there. A task that chmods its files away is cleaned up by a
process started as the task user (``clear_as``). A task's processes are one uid, so anything
the worker does in a task's scratch directory must not follow a path a task may have replaced
with a symbolic link: reads go through ``open_beneath`` (no symlink on the way, a regular file
at the end) and the inputs are linked in with directory fds (``_place_inputs``). The worker's
own files (what it stores) never live in a directory a task can write.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pwd
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASK_UMASK = 0o007  # a task's files are readable and removable by the worker, through the group
TASK_DIR_MODE = 0o2770  # worker-owned, group G, setgid: what a task makes here belongs to G
CAP_KILL, CAP_SETGID, CAP_SETUID = 5, 6, 7  # bits of /proc/self/status CapEff
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TaskUserError(Exception):
    """The worker cannot run its tasks as the user it was given: one line for the operator."""


@dataclass(frozen=True, slots=True)
class TaskUser:
    """The unprivileged user every task process runs as (``cluster worker --task-user``)."""

    name: str
    uid: int
    gid: int  # its primary group: G, which the worker's user must be a member of
    home: str

    @classmethod
    def lookup(cls, name: str) -> TaskUser:
        """The user ``name``; ``TaskUserError`` if it does not exist or may not be a task user."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise TaskUserError(f"task user {name!r} does not exist on this machine (make one, e.g. "
                                f"useradd --system --user-group --no-create-home {name})") from None
        if entry.pw_uid == 0:
            raise TaskUserError(f"task user {name!r} is root: tasks must run as an unprivileged user")
        if entry.pw_uid == os.geteuid():
            raise TaskUserError(f"task user {name!r} is the worker's own user: its tasks could read "
                                "the worker's keys and data; name a user of their own")
        if entry.pw_gid == os.getegid():
            raise TaskUserError(f"task user {name!r} has the worker's own primary group "
                                f"({entry.pw_gid}): give it a group of its own")
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def spawn(self) -> dict[str, Any]:
        """``Popen`` keyword arguments that start a process as this user. The first call on a
        thread clears that thread's ambient and inheritable capabilities (which its children
        would otherwise keep as the task user: see the module docstring)."""
        if not getattr(_THREAD, "dropped", False):
            drop_inheritable_capabilities()
            _THREAD.dropped = True
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "umask": TASK_UMASK}


_THREAD = threading.local()


def _capabilities(field: str = "CapEff") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                return int(value, 16)
    return 0


def switch_problem() -> str | None:
    """Why this process cannot start tasks as another user, or None: it must be root or hold
    CAP_SETUID, CAP_SETGID and CAP_KILL (see the module docstring)."""
    if os.geteuid() == 0:
        return None
    have = _capabilities("CapEff")
    missing = [name for bit, name in ((CAP_SETUID, "CAP_SETUID"), (CAP_SETGID, "CAP_SETGID"),
                                      (CAP_KILL, "CAP_KILL")) if not have >> bit & 1]
    if not missing:
        return None
    return (f"the worker (uid {os.geteuid()}) cannot start tasks as another user: it needs root or "
            f"CAP_SETUID, CAP_SETGID and CAP_KILL, and lacks {', '.join(missing)} (a systemd unit: "
            "AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_inheritable_capabilities() -> None:
    """Clear this thread's ambient and inheritable capability sets (keeping the effective and
    permitted ones), so that no process it starts keeps a capability across execve. Call it on
    the main thread before any other thread starts: capabilities are per thread, and a new
    thread copies its creator's."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_cap_ambient, pr_cap_ambient_clear_all = 47, 4
    if libc.prctl(pr_cap_ambient, pr_cap_ambient_clear_all, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        if code != errno.EINVAL:  # EINVAL: a kernel before 4.3, which has no ambient set
            raise TaskUserError(f"cannot clear the ambient capabilities: {os.strerror(code)}")
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise TaskUserError(f"cannot read the capabilities: {os.strerror(ctypes.get_errno())}")
    if data[0].inheritable or data[1].inheritable:
        data[0].inheritable = data[1].inheritable = 0
        if libc.capset(ctypes.byref(header), data) != 0:
            raise TaskUserError(f"cannot clear the inheritable capabilities: {os.strerror(ctypes.get_errno())}")


# Run as the task user by probe_task_user: what it is, and what it can reach.
_PROBE = r"""
import json, os, stat, sys
spec = json.loads(sys.argv[1])
out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
       "groups": sorted(os.getgroups()), "caps": {}, "reads": [], "cannot_read": [], "umask": os.umask(0o007)}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            out["caps"][key] = int(value, 16)
try:
    import worker.slot_child
    out["import"] = None
except BaseException as exc:
    out["import"] = f"{type(exc).__name__}: {exc}"
try:
    os.chdir(spec["writable"])
    fd = os.open(".probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    st = os.fstat(fd)
    os.close(fd)
    os.unlink(".probe")
    out["write"] = None
    out["made"] = [st.st_gid, stat.S_IMODE(st.st_mode)]
except OSError as exc:
    out["write"] = str(exc)
for path in spec["unreadable"]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").close()
        out["reads"].append(path)
    except OSError:
        pass
for path in spec["readable"]:
    try:
        os.listdir(path) if os.path.isdir(path) else open(path, "rb").close()
    except OSError as exc:
        out["cannot_read"].append(f"{path}: {exc.strerror}")
print(json.dumps(out))
"""


def probe_task_user(user: TaskUser, *, env: dict[str, str] | None, writable: Path,
                    unreadable: list[Path] = (), readable: list[Path] = ()) -> None:
    """Start one process as ``user`` exactly as a task starts, and check what it is: that uid,
    only its group, no capability, this Python and the worker's modules usable, ``writable`` (a
    ``task_dir``) writable with its files in the group, none of ``unreadable`` readable (a file
    opened, a directory listed) and all of ``readable`` readable. ``TaskUserError`` otherwise."""
    spec = {"writable": str(writable), "unreadable": [str(p) for p in unreadable],
            "readable": [str(p) for p in readable]}
    who = f"task user {user.name!r}"
    try:
        done = subprocess.run([sys.executable, "-P", "-c", _PROBE, json.dumps(spec)], cwd="/", env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=120, **user.spawn())
    except PermissionError as exc:
        raise TaskUserError(f"{who} may not run {exc.filename or sys.executable} ({exc.strerror}): install the "
                            "cluster's Python where that user can read it (is a directory above it closed?)") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise TaskUserError(f"cannot start a process as {who}: {exc}") from None
    try:
        seen = json.loads(done.stdout)
    except ValueError:
        why = (done.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise TaskUserError(f"a process started as {who} failed ({why}): can it run {sys.executable}?") from None
    if (seen["uid"], seen["euid"], seen["gid"], seen["egid"]) != (user.uid, user.uid, user.gid, user.gid) \
            or set(seen["groups"]) - {user.gid}:
        raise TaskUserError(f"a process started as {who} is uid {seen['uid']}, gid {seen['gid']}, groups "
                            f"{seen['groups']}, not uid {user.uid} gid {user.gid} alone")
    held = {k: v for k, v in seen["caps"].items() if v}
    if held:
        raise TaskUserError(f"a process started as {who} holds capabilities ({', '.join(f'{k} {v:x}' for k, v in held.items())}): "
                            "tasks would be privileged")
    if seen["import"]:
        raise TaskUserError(f"{who} cannot import the worker's modules with {sys.executable} ({seen['import']}): "
                            "install the cluster where that user can read it")
    if seen["write"]:
        raise TaskUserError(f"{who} cannot write in {writable} ({seen['write']}): is a directory above it "
                            "closed to that user?")
    if seen["made"][0] != user.gid or seen["made"][1] & 0o060 != 0o060:
        raise TaskUserError(f"a file {who} makes in {writable} gets group {seen['made'][0]} and mode "
                            f"{seen['made'][1]:o}: the worker could not read it through group {user.gid}")
    if seen["reads"]:
        raise TaskUserError(f"{who} can read {', '.join(seen['reads'])}: close it to that user")
    if seen["cannot_read"]:
        raise TaskUserError(f"{who} cannot read {'; '.join(seen['cannot_read'])}")


# Run as the task user by clear_as: empty a directory whatever modes the task left in it.
_CLEAR = r"""
import os, shutil, sys
root, keep = sys.argv[1], set(sys.argv[2:])
def own(path):
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            own(entry.path)
for entry in os.scandir(root):
    if entry.name in keep:
        continue
    if entry.is_dir(follow_symlinks=False):
        own(entry.path)
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        try:
            os.unlink(entry.path)
        except OSError:
            pass
"""


def clear_as(user: TaskUser, directory: Path, keep: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
    """Empty ``directory`` (a ``task_dir``) as ``user``: for what a task left that the worker
    cannot remove through the group (a file or directory it chmodded away)."""
    subprocess.run([sys.executable, "-P", "-c", _CLEAR, str(directory), *keep], cwd="/", env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=300, check=False, **user.spawn())


def task_dir(path: Path, user: TaskUser | None) -> None:
    """Make the directory ``path`` (and its parents) if it is missing; with a task user, make it
    group G's, mode 2770 (the worker owns it and reads through the group; the task writes)."""
    if user is None:
        Path(path).mkdir(parents=True, exist_ok=True)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    fd = os.open(path, DIR_FLAGS)
    try:
        give_to_group(fd, user)
    finally:
        os.close(fd)


def give_to_group(fd: int, user: TaskUser) -> None:
    st = os.fstat(fd)
    if st.st_gid != user.gid:
        os.fchown(fd, -1, user.gid)
    if stat.S_IMODE(st.st_mode) != TASK_DIR_MODE:
        os.fchmod(fd, TASK_DIR_MODE)


def open_beneath(root: Path, relative: str | Path) -> int:
    """A read-only fd of the regular file ``relative`` inside the directory ``root``, found
    without following a symbolic link on the way (a task may have planted one to make the worker
    read the worker's own files); OSError if there is none such."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts:
        raise OSError(errno.EINVAL, f"{relative}: not a relative path inside {root}")
    dir_fd = os.open(root, DIR_FLAGS)
    try:
        for part in parts[:-1]:
            inner = os.open(part, DIR_FLAGS, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = inner
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{relative}: not a regular file")
    return fd


