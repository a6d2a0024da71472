"""Tasks run as their own user (issue 20, ``cluster worker --task-user``), on real processes.

A cluster on 127.0.0.1 (a master, a storage node, a balancer) with a worker started as root with
``--task-user nobody``: a command and a Python callable both run as uid 65534, with no other
group and no capability; a task cannot read the worker's secret key, nor list its data
directory, its cache or the scratch root; stdout, a stored input, a declared output and a long log
still work; an output that is a symbolic link to the worker's key is refused, not uploaded; the
FUSE view (when this machine can mount) is readable by the task. Then the refusals at start
(a user that does not exist, the worker's own user, a worker without the capabilities), and a
worker that is not root, holding only CAP_SETUID, CAP_SETGID and CAP_KILL (``setpriv``), running
tasks, timing one out and cleaning up after one that chmodded its files away.

Runs as root only (switching users needs it, or the capabilities); skipped otherwise, and when
the task user cannot run this Python at all (a pyenv interpreter under a 0700 /root, say).
The cluster lives in a directory of its own under /tmp, mode 0711, since pytest's is 0700 and
closed to the task user. Every process is stopped by pid; conditions are polled with deadlines.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest

from cluster.client import Client
from cluster.futures import TaskError
from cluster.local import (LocalNode, balancer_nodes, master_nodes, start_all, stop_all, storage_nodes,
                           worker_nodes)
from cluster.node.config import load_cluster_config
from worker.fusefs import fuse_available

from .conftest import NodeGroup

pytestmark = pytest.mark.integration
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module

TASK_USER = "nobody"
OTHER_UID = 54321  # a worker that is not root, for setpriv (no passwd entry needed)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "tasks as their own user need a worker that can switch users: run as root"
    try:
        pwd.getpwnam(TASK_USER)
    except KeyError:
        return f"there is no user {TASK_USER!r} here"
    try:
        subprocess.run([sys.executable, "-c", "pass"], user=TASK_USER, check=True, timeout=60,
                       capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return (f"user {TASK_USER!r} cannot run {sys.executable} ({exc}); a directory above it is closed to "
                "others (e.g. /root, mode 700): install Python where every user can read it")
    return None


if (_reason := _skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

NOBODY = pwd.getpwnam(TASK_USER)


# ---- what the tasks run ----------------------------------------------------------------------------


def who_am_i():
    print("hello from a callable")
    caps = {line.split(":")[0]: int(line.split(":")[1], 16) for line in open("/proc/self/status")
            if line.startswith(("CapInh", "CapPrm", "CapEff", "CapAmb"))}
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "caps": caps, "cwd": os.getcwd()}


def try_to_read(paths):
    """What of ``paths`` this process can open or list (it should be none)."""
    got = {}
    for path in paths:
        try:
            got[path] = os.listdir(path) if os.path.isdir(path) else open(path, "rb").read()[:8]
        except OSError as exc:
            got[path] = type(exc).__name__
    return got


# ---- the cluster -----------------------------------------------------------------------------------


class Cluster(NodeGroup):
    def __init__(self, d: Path, masters, storage, balancers, workers) -> None:
        self.dir = d
        self.masters, self.storage, self.balancers, self.workers = masters, storage, balancers, workers
        self.config = load_cluster_config(d / "cluster.toml")
        self.client: Client | None = None

    @property
    def nodes(self) -> list[LocalNode]:
        return self.masters + self.storage + self.balancers + self.workers

    def registered(self, count: int) -> None:
        self.wait(lambda: (a := self.active()) and len(a[1]["workers"]) == count, 30,
                  f"{count} worker(s) registered with the balancer")

    def key(self, worker: str) -> Path:
        return self.dir / "keys" / f"{worker}.key_secret"


@contextlib.contextmanager
def a_directory():
    """A directory under /tmp the task user may pass through (0711), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="cluster-task-user-", dir="/tmp"))
    os.chmod(d, 0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    with a_directory() as d:
        masters = master_nodes(d, 1)
        _, storage = storage_nodes(d, 1, masters=masters)
        config, balancers = balancer_nodes(d, 1)
        workers = worker_nodes(d, config, 1, slots=2, task_user=TASK_USER)
        c = Cluster(d, masters, storage, balancers, workers)
        try:
            start_all(c.nodes, timeout=30)
            c.registered(1)
            c.client = Client(list(c.config.masters.values()), storage=c.config.storage_nodes,
                              replicas=c.config.storage.replicas, timeout=30)
            c.wait(lambda: not c.client.lookup_files([]).stale, 30, "a master leader to serve")
            yield c
        finally:
            if c.client is not None:
                c.client.close()
            stop_all(c.nodes)


def run(c: Cluster, argv: list[str], **kwargs):
    return c.client.run(argv, **kwargs).result(timeout=60)


def fails(c: Cluster, argv: list[str], **kwargs) -> TaskError:
    with pytest.raises(TaskError) as info:
        run(c, argv, **kwargs)
    return info.value


# ---- who a task is ---------------------------------------------------------------------------------


def test_a_command_runs_as_the_task_user_with_its_group_alone(cluster):
    out = run(cluster, ["sh", "-c", "id -u; id -g; id -G; grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status"])
    lines = out.stdout.decode().split("\n")
    assert lines[:3] == [str(NOBODY.pw_uid), str(NOBODY.pw_gid), str(NOBODY.pw_gid)], out
    assert all(line.split()[1] == "0000000000000000" for line in lines[3:7]), out  # no capability
    assert out.exit_code == 0


def test_a_callable_runs_as_the_task_user_and_still_returns_its_value(cluster):
    got = cluster.client.submit(who_am_i).result(timeout=60)
    assert (got["uid"], got["euid"], got["gid"]) == (NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_gid), got
    assert set(got["groups"]) <= {NOBODY.pw_gid}, got
    assert not any(got["caps"].values()), got
    assert Path(got["cwd"]).parent == cluster.dir / "w1" / "scratch", got
    # a large value travels as a stored file, which the worker wrote where the task cannot
    big = cluster.client.submit(lambda n: os.urandom(n).hex(), 100_000).result(timeout=60)
    assert len(big) == 200_000


def test_a_task_cannot_read_the_workers_key_nor_its_data(cluster):
    data = cluster.dir / "w1"
    key = cluster.key("w1")
    assert key.exists()
    err = fails(cluster, ["cat", str(key)])
    assert "exit status 1" in err.error and b"Permission denied" in err.stderr, (err.error, err.stderr)
    for closed in (data, data / "cache", data / "scratch", data / "private"):
        err = fails(cluster, ["ls", str(closed)])
        assert "exit status 2" in err.error and b"Permission denied" in err.stderr, (closed, err.error, err.stderr)
    # nor from Python. (Another slot's scratch directory, slot-N by name, it can reach: the
    # tasks of one worker are all the task user; doc/security.md says so.)
    paths = [str(key), str(data), str(data / "cache"), str(data / "scratch"), str(data / "mount-cache"),
             str(data / "private")]
    got = cluster.client.submit(try_to_read, paths).result(timeout=60)
    for path in paths:
        assert got[path] == "PermissionError", (path, got[path])


def test_stdout_inputs_outputs_and_long_logs_come_back(cluster):
    c = cluster
    assert run(c, ["echo", "hello"]).stdout == b"hello\n"
    source = c.dir / "input.txt"
    source.write_text("some words\n")
    ref = c.client.upload(source)
    out = run(c, ["sh", "-c", "cat in.txt; tr a-z A-Z < in.txt > out.txt; echo two > second; "
                              "head -c 20000 /dev/zero | tr '\\0' y"],
              inputs={"in.txt": ref.id}, outputs=["out.txt", "second"])
    assert out.stdout == b"y" * 4096 and out.stdout_file, out  # 20 kB: the tail inline, stored whole
    for name, want in (("out.txt", b"SOME WORDS\n"), ("second", b"two\n")):
        target = c.dir / f"got-{name}"
        c.client.download(out.outputs[name], target)
        assert target.read_bytes() == want
    whole = c.dir / "stdout"
    c.client.download(out.stdout_file, whole)
    assert whole.read_bytes() == b"some words\n" + b"y" * 20000


def test_an_output_that_links_to_the_workers_key_is_refused(cluster):
    """The worker (root here) reads a task's outputs without following its symbolic links."""
    key = cluster.key("w1")
    for argv, output in ((["ln", "-s", str(key), "out"], "out"),
                         (["sh", "-c", f"mkdir d && ln -s {key.parent} d/k"], f"d/k/{key.name}")):
        err = fails(cluster, argv, outputs=[output])
        assert "not a regular file of the task's own" in err.error, err.error


def test_the_fuse_view_is_readable_by_the_task_user(cluster):
    ok, why = fuse_available()
    if not ok:
        pytest.skip(f"FUSE is unavailable here: {why}")
    c = cluster
    source = c.dir / "viewed.txt"
    source.write_text("seen through the mount\n")
    ref = c.client.upload(source)
    # a second worker, mounting its view, alone in the cluster for this test
    stop_all(c.workers)
    c.registered(0)
    mounted = worker_nodes(c.dir, c.dir / "cluster.toml", 1, slots=1, mount=True, first=2, task_user=TASK_USER)
    try:
        start_all(mounted, timeout=30)
        c.registered(1)
        view = c.dir / "w2" / "mnt"
        c.wait(lambda: os.path.ismount(view), 15, "the worker's FUSE view")
        out = run(c, ["sh", "-c", "readlink in; cat in"], inputs={"in": ref.id})
        where, text = out.stdout.split(b"\n", 1)
        assert where.decode() == str(view / "files" / ref.id) and text == b"seen through the mount\n", out
    finally:
        stop_all(mounted)
        start_all(c.workers, timeout=30)  # the module's worker back, for whatever runs next
        c.registered(1)


# ---- refusals at start -----------------------------------------------------------------------------


def refused(node: LocalNode, timeout: float = 60.0) -> str:
    """Start ``node``, which must exit non-zero on its own; its log."""
    node.start()
    deadline = time.monotonic() + timeout
    try:
        while node.process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"{node.name} did not refuse to start within {timeout:g} s:\n{node.log_text()[-2000:]}")
            time.sleep(0.05)  # the poll interval of a deadline loop
    finally:
        node.stop()
    assert node.process.returncode not in (0, None), node.log_text()
    return node.log_text()


@pytest.mark.parametrize("number, user, says", [(6, "no-such-user-zz", "does not exist on this machine"),
                                                (7, "root", "is root")])
def test_a_worker_refuses_a_task_user_it_cannot_use(cluster, number, user, says):
    node = worker_nodes(cluster.dir, cluster.dir / "cluster.toml", 1, first=number, task_user=user)[0]
    text = refused(node)
    line = next(line for line in text.splitlines() if "--task-user" in line)
    assert f"worker w{number}: --task-user {user}: task user {user!r} {says}" in line, text
    assert not (cluster.dir / f"w{number}" / "scratch").exists()  # refused before touching its data


def test_a_worker_without_the_capabilities_refuses_to_start(cluster):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    node = worker_nodes(cluster.dir, cluster.dir / "cluster.toml", 1, first=8, task_user=TASK_USER)[0]
    # the same command, run as another uid without any capability (numba needs a cache it can write)
    numba = cluster.dir / "numba-8"
    numba.mkdir(exist_ok=True)
    os.chown(numba, OTHER_UID, OTHER_UID)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(numba)}
    done = subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                           sys.executable, "-m", "cluster", *node.argv], capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=env)
    assert done.returncode != 0
    assert b"needs root or CAP_SETUID, CAP_SETGID and CAP_KILL" in done.stderr, done.stderr


# ---- a worker that is not root ---------------------------------------------------------------------

NOT_ROOT = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import cloudpickle
    from worker import executor
    from worker import taskuser
    from worker.executor import Limits, unpack_result
    from worker.taskuser import TaskUser
    from worker.slots import Slot

    root = Path(sys.argv[1])
    root.mkdir(mode=0o711)
    report = {"switch_problem": taskuser.switch_problem()}
    taskuser.drop_inheritable_capabilities()
    user = TaskUser.lookup(sys.argv[2])
    scratch_root = root / "scratch"
    scratch_root.mkdir(mode=0o700)
    os.chown(scratch_root, -1, user.gid)  # only as a member of the task user's group
    os.chmod(scratch_root, 0o710)
    secret = root / "secret"
    secret.write_text("the worker's")
    os.chmod(secret, 0o600)
    taskuser.task_dir(scratch_root / "probe", user)
    taskuser.probe_task_user(user, env=None, writable=scratch_root / "probe", unreadable=[secret, root])
    scratch = scratch_root / "slot-0"
    with Slot(0, task_user=user) as slot:
        done = slot.run_callable(cloudpickle.dumps(lambda: (os.getuid(), print("out"))[0]),
                                 cloudpickle.dumps(((), {})), scratch)
        report["callable"] = [unpack_result(done), done.stdout.decode()]
        done = slot.run_command(["sh", "-c", f"id -u; cat {secret}; mkdir -p d/e; touch d/e/f; chmod 000 d/e d"],
                                None, scratch)
        report["command"] = [done.ok, done.stdout.decode(), done.stderr.decode()]
        started = time.monotonic()
        done = slot.run_command(["sleep", "60"], None, scratch, limits=Limits(timeout_s=0.5, grace_s=0.5))
        report["timeout"] = [done.error, time.monotonic() - started]
    try:
        import shutil
        shutil.rmtree(scratch / "d")
        report["worker_removed"] = True
    except PermissionError:
        report["worker_removed"] = False
    taskuser.clear_as(user, scratch)
    report["left"] = sorted(os.listdir(scratch))
    print(json.dumps(report))
""")


def test_a_worker_that_is_not_root_needs_only_setuid_setgid_and_kill():
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    import json

    with a_directory() as d:
        (d / "w").mkdir()
        os.chown(d / "w", OTHER_UID, OTHER_UID)
        (d / "check.py").write_text(NOT_ROOT)
        caps = "+setuid,+setgid,+kill"
        env = {**os.environ, "HOME": str(d / "w"), "NUMBA_CACHE_DIR": str(d / "w" / "numba")}
        done = subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}",
                               f"--groups={NOBODY.pw_gid}", f"--inh-caps={caps}", f"--ambient-caps={caps}",
                               sys.executable, str(d / "check.py"), str(d / "w" / "data"), TASK_USER],
                              capture_output=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert report["switch_problem"] is None
    assert report["callable"] == [NOBODY.pw_uid, "out\n"]
    ok, stdout, stderr = report["command"]
    assert ok and stdout == f"{NOBODY.pw_uid}\n" and "Permission denied" in stderr, report["command"]
    error, took = report["timeout"]
    assert "timeout" in error and took < 5, report["timeout"]  # the worker could signal the task
    assert report["worker_removed"] is False  # a directory chmodded 000 by the task...
    assert report["left"] == []  # ...is removed as the task user (the slot keeps nothing there: its output is piped)
