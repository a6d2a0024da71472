"""A worker process: the core, its loop, the task slots and the view of storage.

``cluster-worker --config cluster.toml --name w1 --data-dir D [--slots N] [--label L]…`` runs
one. The config names the balancers (``[balancers.*]``), masters and storage nodes. Each slot
is a thread that owns one ``worker.slots.Slot`` (a persistent child process for callables and
tiles); the core's ``RunTask`` effects are queued to the slots and each ending is posted back
as ``TaskEnded``. Stored files reach tasks through the FUSE view: with ``--mount`` the worker
starts ``cluster mount`` there as a child process (or uses a mount already served there); where
FUSE is unavailable it fetches whole files into its cache instead and says so.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from cluster.node.config import ClusterConfig, ConfigError, load_cluster_config
from cluster.node.keys import node_credentials, secret_path
from cluster.node.loop import NodeLoop, SocketSpec
from cluster.node.storagelink import LinkPool
from proto.ids import join128
from worker.cache import BlockCache
from worker.core import RunTask, TaskEnded, WorkerCore, WorkerIdentity, WorkerOptions, balancer_socket
from worker.files import WorkerFiles
from worker.fusefs import fuse_available, unmount
from worker.slots import Slot
from worker.tasks import TaskRunner
from worker.view import ClusterView

log = logging.getLogger("cluster.worker")


class SlotPool:
    """``slots`` threads, each with its own ``Slot``, taking ``RunTask`` effects in order."""

    def __init__(self, slots: int, runner: TaskRunner, post, stimulus) -> None:
        self.runner = runner
        self.post = post
        self.stimulus = stimulus
        self.tasks: queue.Queue[RunTask | None] = queue.Queue()
        self.slots = [Slot(i) for i in range(slots)]
        self.threads = [threading.Thread(target=self._serve, args=(s,), name=f"slot-{s.index}", daemon=True)
                        for s in self.slots]
        for t in self.threads:
            t.start()

    def perform(self, effect: RunTask) -> None:
        self.tasks.put(effect)

    def _serve(self, slot: Slot) -> None:
        while True:
            effect = self.tasks.get()
            if effect is None:
                return
            m = effect.request
            ended = self.runner.run(slot, m)
            job = join128(m.job_uuid_upper, m.job_uuid_lower)
            self.post(TaskEnded(job, m.task_id, (m.fence_term, m.fence_sequence), ended.outcome, ended.exit_code,
                                ended.summary, ended.result_file, ended.error, ended.files, ended.cached,
                                self.stimulus("task-ended")))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the slot processes (a running task is killed with its child) and the threads."""
        for _ in self.threads:
            self.tasks.put(None)
        for slot in self.slots:
            slot.close()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


class MountChild:
    """``cluster mount`` run as this worker's child, so stored files appear as paths."""

    def __init__(self, mountpoint: Path, config_path: Path, cache: Path, key_file: Path | None = None) -> None:
        self.key_file = key_file  # the worker's own key: the mount reads files as the worker
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
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        logf = open(self.mountpoint.parent / "mount.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster", "mount", str(self.mountpoint), "--config", str(self.config_path),
             "--cache", str(self.cache), *(["--key", str(self.key_file)] if self.key_file else [])], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
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


def build_worker(config: ClusterConfig, me: WorkerIdentity, data_dir: Path, *, mount: bool = True,
                 control: str | None = None, options: WorkerOptions | None = None
                 ) -> tuple[NodeLoop, Callable[[], None]]:
    """A worker ready to ``run()``, and the function that releases what it holds afterwards.
    ``control`` is an endpoint to bind for STATUS_QUERY (a worker otherwise only connects out).
    ``options`` default to the config's ``[heartbeat]`` timings."""
    if options is None:
        options = WorkerOptions(interval=config.heartbeat.interval_s, liveness=config.heartbeat.balancer_liveness_s)
    if not config.balancers:
        raise ConfigError(f"{config.path}: a worker needs the balancers' [balancers.<name>] tables")
    credentials = node_credentials(config.security, me.name, "worker", config.servers())
    data_dir = Path(data_dir)
    scratch = data_dir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)  # a killed predecessor's leftovers
    scratch.mkdir(parents=True)
    files = view = links = child = None
    if config.storage_nodes and config.masters:
        mountpoint = data_dir / "mnt"
        if mount:
            child = MountChild(mountpoint, Path(config.path), data_dir / "mount-cache",
                               None if config.security.insecure else secret_path(config.security.secrets, me.name))
            if not child.start():
                child = None
        view = ClusterView(list(config.masters.values()), config.storage_nodes)
        files = WorkerFiles(view, BlockCache(data_dir / "cache", 4 << 30), mountpoint if child else None)
        links = LinkPool(config.storage_nodes, timeout=30.0)
    runner = TaskRunner(me.name, scratch, files=files, links=links, copies=config.storage.replicas)
    balancers = sorted(config.balancers.values(), key=lambda b: not b.primary)  # b0 = the primary
    core = WorkerCore(me, len(balancers), options)
    sockets = [SocketSpec(balancer_socket(i), zmq.DEALER, connect=(b.workers,),
                          options={zmq.SNDHWM: 100_000, zmq.RCVHWM: 100_000, zmq.IMMEDIATE: 1})
               for i, b in enumerate(balancers)]
    if control:
        sockets.append(SocketSpec("control", zmq.ROUTER, bind=(control,)))
    holder: dict[str, object] = {}
    loop = NodeLoop(core, sockets, performers={RunTask: lambda e: holder["pool"].perform(e)}, credentials=credentials)
    pool = SlotPool(me.slots, runner, loop.post, loop.stimulus)
    holder["pool"] = pool

    def release() -> None:
        pool.close()
        if links is not None:
            links.close()
        if view is not None:
            view.close()
        if child is not None:
            child.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    return loop, release


def run_worker(config_path: Path, me: WorkerIdentity, data_dir: Path, *, mount: bool = True,
               control: str | None = None) -> int:
    config = load_cluster_config(config_path)
    loop, release = build_worker(config, me, data_dir, mount=mount, control=control)
    try:
        return loop.run()
    finally:
        release()


def default_identity(name: str, slots: int | None, labels: list[str], memory_mb: int | None = None,
                     prefetch: int | None = None) -> WorkerIdentity:
    """This machine as a worker: one slot per core unless told otherwise, and as many tasks
    again prefetched."""
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
    return WorkerIdentity(name, slots, cores, memory_mb, 0, list(labels), kernel,
                          slots if prefetch is None else prefetch)

