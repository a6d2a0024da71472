"""A worker process: the core, its loop, the task slots and the view of storage.

``cluster-worker --config cluster.toml --name w1 --data-dir D [--slots N] [--label L]…`` runs
one. The config names the balancers (``[balancers.*]``), masters and storage nodes. Its slots
(``worker.slots.Slot``: a persistent child process each, which runs callables, tiles and traces
and starts commands) are driven from the node's own loop (``worker.slotpool``): the core's
``RunTask`` begins a task on a free slot and returns, and the slots' pipes, in the loop's
poller, bring its output and its end (``OutputRead``, ``TaskEnded``); no thread per slot or per
task. Stored files reach tasks through the FUSE view: with ``--mount`` the worker
starts ``cluster mount`` there as a child process (or uses a mount already served there); where
FUSE is unavailable it fetches whole files into its cache instead and says so.

``--task-user NAME`` runs every task process as that user (issue 20; worker/executor.py says
how, and what the worker needs: root, or CAP_SETUID, CAP_SETGID and CAP_KILL, and its user a
member of the task user's primary group G). The data directory is then laid out so that the
task user reaches only what a task needs, by name (``task_layout``):

- ``D`` itself 0711: searchable, not listable; everything in it but the three names below is
  closed to group and others (``cache``, ``mount-cache``, ``private``: 0700; ``mount.log``).
- ``D/scratch`` 0710, group G: the task user passes through it to its own directories,
  ``slot-N`` (2770, group G: the task's working directory) and ``inputs-N`` (0750, group G:
  stored files staged for it when there is no mount).
- ``D/task-cache`` 2770, group G, kept across restarts: the tasks' HOME-like caches (the tile
  kernels' build, numba's cache: ``XDG_CACHE_HOME``, ``NUMBA_CACHE_DIR``, ``CLUSTER_SW_CACHE``).
- ``D/mnt``: the FUSE view, mounted with ``allow_other`` so that the task user reads it (a
  worker that is not root needs ``user_allow_other`` in /etc/fuse.conf; without it the view is
  not mounted and tasks get stored files staged from the cache).
- ``D/private`` 0700: what the worker writes and copies for a task (worker/tasks.py).

Before it serves, the worker starts one process as the task user (``taskuser.probe_task_user``)
that must find itself without capabilities and unable to list ``D``, ``cache``,
``mount-cache``, ``private`` or read the worker's secret key, and able to write in
``task-cache`` (and read the view, when mounted); otherwise it refuses to start, with one line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket as pysocket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import zmq

from cluster.node.config import ClusterConfig, ConfigError, load_cluster_config
from cluster.node.keys import node_credentials, secret_path
from cluster.node.loop import NodeLoop, SocketSpec
from cluster.node.storagelink import LinkPool
from worker.cache import BlockCache
from worker.core import RunTask, StopTask, WorkerCore, WorkerIdentity, WorkerOptions, balancer_socket
from worker.taskuser import (TaskUser, TaskUserError, clear_as, drop_inheritable_capabilities, probe_task_user,
                             switch_problem)
from worker.files import WorkerFiles
from worker.fusefs import fuse_available, unmount
from worker.slotpool import SlotPool
from worker.tasks import TaskRunner
from worker.view import ClusterView

log = logging.getLogger("cluster.worker")


class MountChild:
    """``cluster mount`` run as this worker's child, so stored files appear as paths."""

    def __init__(self, mountpoint: Path, config_path: Path, cache: Path, key_file: Path | None = None,
                 allow_other: bool = False) -> None:
        self.key_file = key_file  # the worker's own key: the mount reads files as the worker
        self.allow_other = allow_other  # tasks run as another user, who must read the view
        self.mountpoint = mountpoint
        self.process: subprocess.Popen | None = None
        self.config_path = config_path
        self.cache = cache
        # The child's pid, for `cluster down` when this worker was SIGKILLed and left it behind.
        self.pid_file = mountpoint.parent / "mount.pid"

    def start(self, timeout: float = 15.0) -> bool:
        ok, why = fuse_available()
        if not ok:
            log.warning("FUSE unavailable (%s): tasks get stored files fetched whole into the cache", why)
            return False
        if os.path.ismount(self.mountpoint):
            log.info("using the FUSE view already mounted at %s", self.mountpoint)
            return True
        if self.allow_other and os.geteuid() != 0 and not _fuse_allows_other():
            log.warning("tasks run as another user, who cannot read a FUSE view without allow_other, which a "
                        "user other than root may ask for only with user_allow_other in /etc/fuse.conf: tasks "
                        "get stored files fetched whole into the cache")
            return False
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        logf = os.fdopen(os.open(self.mountpoint.parent / "mount.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                 | os.O_CLOEXEC, 0o600), "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster", "mount", str(self.mountpoint), "--config", str(self.config_path),
             "--cache", str(self.cache), *(["--key", str(self.key_file)] if self.key_file else []),
             *(["--allow-other"] if self.allow_other else []),
             # ends with this worker, however it ends (a SIGKILL too): see worker.fusefs.end_with
             "--end-with", str(os.getpid()),
             "--no-listing"],  # the tasks of every owner share this mount: no enumerating others' files
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        self.pid_file.write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.ismount(self.mountpoint) and (self.mountpoint / "files").is_dir():
                log.info("FUSE view mounted at %s (pid %d)", self.mountpoint, self.process.pid)
                return True
            if self.process.poll() is not None:
                break
            time.sleep(0.05)  # polling a mount table: no event to wait on
        log.warning("the FUSE view did not come up at %s; tasks get files through the cache", self.mountpoint)
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            unmount(self.mountpoint)
        except OSError as exc:
            log.warning("unmount of %s: %s", self.mountpoint, exc)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        self.pid_file.unlink(missing_ok=True)


def _fuse_allows_other() -> bool:
    """Whether /etc/fuse.conf lets users other than root mount with allow_other."""
    try:
        lines = Path("/etc/fuse.conf").read_text().splitlines()
    except OSError:
        return False
    return any(line.split("#")[0].strip() == "user_allow_other" for line in lines)


TASK_VISIBLE = ("mnt", "scratch", "task-cache")  # what a task user may reach in the data dir, by name
PRIVATE = ("cache", "mount-cache", "private")  # 0700: the worker's alone


def task_layout(data_dir: Path, task_user: TaskUser) -> None:
    """Lay the data directory out for tasks run as ``task_user`` (module docstring); the
    scratch directory must have been removed (or never made) before."""
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(data_dir, 0o711)
    except PermissionError:
        raise TaskUserError(f"cannot set the mode of the data directory {data_dir}: the worker's user must own it") from None
    for entry in os.scandir(data_dir):
        if entry.name in TASK_VISIBLE or entry.is_symlink():
            continue
        mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
        if mode & 0o077:
            os.chmod(entry.path, mode & ~0o077)
    for name in PRIVATE:
        (data_dir / name).mkdir(mode=0o700, exist_ok=True)
    scratch, cache = data_dir / "scratch", data_dir / "task-cache"
    scratch.mkdir(mode=0o700, exist_ok=True)
    cache.mkdir(mode=0o700, exist_ok=True)
    for path, mode in ((scratch, 0o710), (cache, 0o2770)):
        try:
            os.chown(path, -1, task_user.gid)
        except PermissionError:
            raise TaskUserError(f"the worker cannot give {path} to group {task_user.gid} (the primary group of task "
                                f"user {task_user.name!r}): its user must be a member of that group (usermod -aG, or "
                                "SupplementaryGroups= in its unit)") from None
        os.chmod(path, mode)


def task_environment(task_user: TaskUser, cache: Path) -> dict[str, str]:
    """The slot processes' environment with a task user: the worker's, as that user, with the
    caches that Python code reaches for in ``cache`` (a ``task-cache`` the user writes)."""
    env = dict(os.environ)
    env.pop("CLUSTER_KEY", None)  # the worker's key file: nothing of the tasks'
    env.update(HOME=task_user.home, USER=task_user.name, LOGNAME=task_user.name, XDG_CACHE_HOME=str(cache),
               NUMBA_CACHE_DIR=str(cache / "numba"), CLUSTER_SW_CACHE=str(cache / "cluster" / "sw"))
    return env


def _remove_scratch(scratch: Path, task_user: TaskUser | None) -> None:
    """Remove a killed predecessor's scratch directory; what its tasks chmodded away from the
    worker is removed as the task user first."""
    shutil.rmtree(scratch, ignore_errors=True)
    if task_user is not None and scratch.exists():
        for entry in os.scandir(scratch):
            if entry.is_dir(follow_symlinks=False):
                clear_as(task_user, Path(entry.path))
        shutil.rmtree(scratch, ignore_errors=True)


def _switchable(task_user: str) -> TaskUser:
    """The task user, once the worker is known able to switch to it (``TaskUserError`` if not),
    with the capabilities no task may inherit cleared. First, on the main thread before any
    other starts: capabilities are per thread."""
    user = TaskUser.lookup(task_user)
    problem = switch_problem()
    if problem:
        raise TaskUserError(problem)
    drop_inheritable_capabilities()
    return user


def advertised(endpoint: str) -> str:
    """The endpoint followers reach a bound ``endpoint`` at: a wildcard host (``0.0.0.0``, ``*``)
    becomes this machine's name, as the balancers and clients of a rack know it."""
    scheme, _, rest = endpoint.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme == "tcp" and sep and host in ("0.0.0.0", "*", "[::]", "::"):
        return f"tcp://{pysocket.getfqdn()}:{port}"
    return endpoint


def build_worker(config: ClusterConfig, me: WorkerIdentity, data_dir: Path, *, mount: bool = True,
                 control: str | None = None, options: WorkerOptions | None = None,
                 task_user: str | None = None) -> tuple[NodeLoop, Callable[[], None]]:
    """A worker ready to ``run()``, and the function that releases what it holds afterwards.
    ``control`` is an endpoint to bind for STATUS_QUERY (a worker otherwise only connects out).
    ``options`` default to the config's ``[heartbeat]`` timings. ``task_user``: run every task
    as that user (module docstring); ``TaskUserError`` if the worker cannot."""
    user = _switchable(task_user) if task_user is not None else None
    if options is None:
        options = WorkerOptions(interval=config.heartbeat.interval_s, liveness=config.heartbeat.balancer_liveness_s)
    if not config.balancers:
        raise ConfigError(f"{config.path}: a worker needs the balancers' [balancers.<name>] tables")
    credentials = node_credentials(config.security, me.name, "worker", config.servers())
    data_dir = Path(data_dir)
    scratch = data_dir / "scratch"
    _remove_scratch(scratch, user)  # a killed predecessor's leftovers
    env = None
    if user is None:
        scratch.mkdir(parents=True)
    else:
        task_layout(data_dir, user)
        env = task_environment(user, (data_dir / "task-cache").absolute())
    files = view = links = child = None
    try:
        if config.storage_nodes and config.masters:
            mountpoint = data_dir / "mnt"
            if mount:
                child = MountChild(mountpoint, Path(config.path), data_dir / "mount-cache",
                                   None if config.security.insecure else secret_path(config.security.secrets, me.name),
                                   allow_other=user is not None)
                if not child.start():
                    child = None
            view = ClusterView(list(config.masters.values()), config.storage_nodes)
            files = WorkerFiles(view, BlockCache(data_dir / "cache", 4 << 30), mountpoint if child else None)
            links = LinkPool(config.storage_nodes, timeout=30.0)
        if user is not None:
            closed = [data_dir, *(data_dir / name for name in PRIVATE)]
            if not config.security.insecure:
                closed.append(secret_path(config.security.secrets, me.name))
            probe_task_user(user, env=env, writable=(data_dir / "task-cache").absolute(),
                            unreadable=[p.absolute() for p in closed],
                            readable=[(data_dir / "mnt" / "files").absolute()] if child else [])
            log.info("tasks run as %s (uid %d, gid %d)", user.name, user.uid, user.gid)
    except BaseException:
        if child is not None:
            child.stop()
        for held in (links, view):
            if held is not None:
                held.close()
        raise
    runner = TaskRunner(me.name, scratch, files=files, links=links, copies=config.storage.replicas,
                        task_user=user, private_root=data_dir / "private")
    balancers = sorted(config.balancers.values(), key=lambda b: not b.primary)  # b0 = the primary
    if control:  # followers find its tasks' output there (the balancer's worker list shows it)
        me = dataclasses.replace(me, output=advertised(control))
    core = WorkerCore(me, len(balancers), options, wall_offset=time.time() - time.monotonic())
    sockets = [SocketSpec(balancer_socket(i), zmq.DEALER, connect=(b.workers,),
                          options={zmq.SNDHWM: 100_000, zmq.RCVHWM: 100_000, zmq.IMMEDIATE: 1})
               for i, b in enumerate(balancers)]
    if control:
        sockets.append(SocketSpec("control", zmq.ROUTER, bind=(control,)))
    holder: dict[str, SlotPool] = {}
    loop = NodeLoop(core, sockets, credentials=credentials,
                    performers={RunTask: lambda e: holder["pool"].run(e), StopTask: lambda e: holder["pool"].stop(e)})
    pool = holder["pool"] = SlotPool(me.slots, runner, loop, task_user=user, env=env)

    def release() -> None:
        pool.close()
        if links is not None:
            links.close()
        if view is not None:
            view.close()
        if child is not None:
            child.stop()
        _remove_scratch(scratch, user)

    return loop, release


def run_worker(config_path: Path, me: WorkerIdentity, data_dir: Path, *, mount: bool = True,
               control: str | None = None, task_user: str | None = None) -> int:
    config = load_cluster_config(config_path)
    loop, release = build_worker(config, me, data_dir, mount=mount, control=control, task_user=task_user)
    try:
        return loop.run()
    finally:
        release()


PREFETCH_PER_SLOT = 64  # the most an adaptive prefetch queue holds per slot (worker.prefetch)


def default_identity(name: str, slots: int | None, labels: list[str], memory_mb: int | None = None,
                     prefetch: int | None = None) -> WorkerIdentity:
    """This machine as a worker: one slot per core unless told otherwise; ``prefetch`` tasks
    queued beyond them, or (None) a queue that adapts from one per slot to ``PREFETCH_PER_SLOT``
    per slot (worker.prefetch)."""
    cores = os.cpu_count() or 1
    if memory_mb is None:
        try:
            memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        except (ValueError, OSError):
            memory_mb = 0
    # The kernel build a tile may ask for: the vector width the kernels compile to here (read
    # from /proc/cpuinfo, so the worker does not load LLVM just to say it).
    try:
        flags = Path("/proc/cpuinfo").read_text()
        kernel = "avx2" if " avx2" in flags else "sse"
    except OSError:
        kernel = ""
    slots = slots or cores
    if prefetch is not None:
        return WorkerIdentity(name, slots, cores, memory_mb, 0, list(labels), kernel, prefetch)
    return WorkerIdentity(name, slots, cores, memory_mb, 0, list(labels), kernel, slots,
                          prefetch_max=PREFETCH_PER_SLOT * slots)

