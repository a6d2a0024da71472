"""Starting a command from the worker itself, cheaply (issue 23): ``posix_spawn`` through ctypes.

Theory of operation
-------------------
Starting ``true`` costs ~0.8 ms of CPU here, all of it the command's own (exec, the dynamic
loader); what the worker adds is what this module keeps small. ``subprocess.Popen`` costs the
worker ~180 µs a command (~2.5 ms when it must fork, e.g. with a ``preexec_fn``), and
``os.posix_spawn`` ~160 µs (it rebuilds its attributes per call, and cannot change directory).
glibc's ``posix_spawn`` is a vfork (CLONE_VM|CLONE_VFORK: no page tables copied, whatever the
worker's size, and safe in a threaded process); called through ctypes with attributes built once
it costs ~100 µs, measured on this machine, the kernel's share included.

What the command gets: its working directory (``posix_spawn_file_actions_addchdir_np``, glibc
2.29), stdin from /dev/null, stdout and stderr the pipes it is given, no other descriptor of
the worker's (``addclosefrom_np``, glibc 2.34), a process group of its own (so its tree can be
signalled at once), every signal disposition back to the default (Python ignores SIGPIPE) and
none blocked. Without those two glibc extensions ``Spawner.usable`` is False and commands go
through the slot's child instead (worker.slot_child), as they do with a memory limit (a spawn
cannot set one) or a task user (a spawn cannot change user).

The command's path is found on its own environment's PATH, as ``subprocess`` finds it, and
remembered; a remembered path that fails (ENOENT, EACCES) is looked up again once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal

POSIX_SPAWN_SETPGROUP, POSIX_SPAWN_SETSIGDEF, POSIX_SPAWN_SETSIGMASK = 0x02, 0x04, 0x08
_OPAQUE = 512  # bytes: more than glibc's posix_spawnattr_t (336) and file actions (80) need
_SIGSET = 128  # bytes of a sigset_t
_PATHS_KEPT = 256


class Spawner:
    """Starts commands with glibc's posix_spawn (module docstring); one per worker."""

    def __init__(self) -> None:
        self.usable = False
        self._paths: dict[tuple[str, str], str] = {}
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._spawn = libc.posix_spawn
            self._fa_init = libc.posix_spawn_file_actions_init
            self._fa_destroy = libc.posix_spawn_file_actions_destroy
            self._fa_chdir = libc.posix_spawn_file_actions_addchdir_np
            self._fa_dup2 = libc.posix_spawn_file_actions_adddup2
            self._fa_closefrom = libc.posix_spawn_file_actions_addclosefrom_np
        except (OSError, AttributeError):
            return  # not glibc, or one before 2.34: commands go through the slot's child
        self._attr = ctypes.create_string_buffer(_OPAQUE)
        every, empty = ctypes.create_string_buffer(_SIGSET), ctypes.create_string_buffer(_SIGSET)
        if (libc.posix_spawnattr_init(self._attr) or libc.sigfillset(every) or libc.sigemptyset(empty)
                or libc.sigdelset(every, signal.SIGKILL) or libc.sigdelset(every, signal.SIGSTOP)
                or libc.posix_spawnattr_setflags(self._attr, ctypes.c_short(
                    POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
                or libc.posix_spawnattr_setpgroup(self._attr, 0)
                or libc.posix_spawnattr_setsigdefault(self._attr, every)
                or libc.posix_spawnattr_setsigmask(self._attr, empty)):
            return
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.usable = True

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, stdout: int, stderr: int) -> int:
        """Start ``argv`` (``env`` its whole environment) in ``cwd`` with ``stdout``/``stderr``;
        its pid, the leader of its own process group. ``FileNotFoundError`` when ``argv[0]``
        is not found, ``OSError`` when it cannot start (its errno)."""
        key = (argv[0], env.get("PATH", os.defpath))
        path = self._paths.get(key)
        fresh = path is None
        if fresh:
            path = which(argv[0], env)
        args = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
        envp = (ctypes.c_char_p * (len(env) + 1))(*[os.fsencode(f"{k}={v}") for k, v in env.items()], None)
        actions = ctypes.create_string_buffer(_OPAQUE)
        pid = ctypes.c_int()
        self._fa_init(actions)
        try:
            if (self._fa_chdir(actions, os.fsencode(cwd)) or self._fa_dup2(actions, self._devnull, 0)
                    or self._fa_dup2(actions, stdout, 1) or self._fa_dup2(actions, stderr, 2)
                    or self._fa_closefrom(actions, 3)):
                raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
            code = self._spawn(ctypes.byref(pid), os.fsencode(path), actions, self._attr, args, envp)
        finally:
            self._fa_destroy(actions)
        if code == 0:
            if fresh and len(self._paths) < _PATHS_KEPT:
                self._paths[key] = path
            return pid.value
        self._paths.pop(key, None)
        if not fresh and code in (errno.ENOENT, errno.EACCES):
            return self.spawn(argv, env, cwd, stdout, stderr)  # the remembered path went away: look again
        if code == errno.ENOENT:
            raise FileNotFoundError(code, os.strerror(code), argv[0])
        raise OSError(code, os.strerror(code), argv[0])


def which(name: str, env: dict[str, str]) -> str:
    """The file ``name`` runs, found on ``env``'s PATH as ``subprocess`` finds it; a name
    with a slash is taken as it is (relative to the command's directory)."""
    if "/" in name:
        return name
    denied = None
    for directory in os.get_exec_path(env):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
        if denied is None and os.path.exists(path):
            denied = path
    if denied is not None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


_SPAWNER: Spawner | None = None


def spawner() -> Spawner:
    """The process's one Spawner (its attributes are built once)."""
    global _SPAWNER
    if _SPAWNER is None:
        _SPAWNER = Spawner()
    return _SPAWNER
