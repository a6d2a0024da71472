"""Tasks dispatched on a real cluster: 3 masters, the balancer pair, 2 workers, on 127.0.0.1.

Issue 7's "real processes" and "bad input" lines: futures (``submit``, ``map``, ``as_completed``,
callbacks, lookup by id); tasks that raise, commands that cannot start, exit non-zero or time
out; forged results and impossible registrations sent by hand; then the faults: the active
balancer SIGKILLed under 1,000 tasks, a worker SIGKILLed mid-task, a worker whose heartbeats
stop (SIGSTOP) and that comes back (SIGCONT), and the balancers' peer link cut by a TCP relay
with both of them alive (Binary Star's split-brain guard: at most one dispatches).

The first tests share one module-scoped cluster; each fault test starts its own. Every process
is stopped by pid (``stop_all``), whatever happens; a worker's slot processes that outlive a
SIGKILLed worker are waited for and stopped by pid too. Conditions are polled with deadlines.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
import pytest
import zmq

from cluster.client import Client, Refused
from cluster.node.config import BalancerAddress, write_balancers_section
from cluster.futures import CommandFailed, TaskError, TaskTimeout
from cluster.local import (LocalNode, balancer_nodes, credentials_as, free_port, make_keys, master_nodes, start_all,
                           stop_all, worker_nodes)
from cluster.node import keys
from cluster.node.status import query_status
from cluster.up import alive, descendants
from proto import Codec, new_node_id
from proto.errors import AppReason
from proto.messages import Error, TaskResult, WorkerStatus

from .conftest import NodeGroup, detail

pytestmark = pytest.mark.integration

# The workers cannot import this module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---- what the tasks run ----------------------------------------------------------------------


def double(x):
    return x * 2


def raise_on_three(x):
    if x == 3:
        raise ValueError(f"item {x} is unlucky")
    return x * 10


class Unloadable(Exception):
    """Pickles on the worker, but cannot be unpickled anywhere: its reduction calls int('x')."""

    def __reduce__(self):
        return int, ("not a number",)


def raise_unloadable():
    raise Unloadable("nobody can load me")


def nap_triple(x):
    time.sleep(0.005)
    return x * 3


def slow_double(x, seconds=3.0):
    time.sleep(seconds)
    return x * 2


# ---- a cluster ---------------------------------------------------------------------------------


@dataclass
class Cluster(NodeGroup):
    dir: Path
    masters: list[LocalNode]
    balancers: list[LocalNode]  # b1 (primary), b2
    workers: list[LocalNode]
    client: Client | None = None
    extra_pids: set[int] = field(default_factory=set)  # slot processes orphaned by a SIGKILL

    @property
    def nodes(self) -> list[LocalNode]:
        return self.masters + self.balancers + self.workers

    def worker(self, name: str) -> LocalNode:
        return next(w for w in self.workers if w.name == name)

    def cluster_active(self) -> tuple[LocalNode, dict]:
        """The active balancer once it is attached to the master leader (it holds results back
        until then), and its status detail."""
        return self.wait(lambda: (found := self.active()) and found[1]["master"].get("attached") and found, 15,
                         "an active balancer attached to the leader")

    def active_detail(self) -> dict:
        return self.cluster_active()[1]

    def registered(self) -> list[str]:
        """The names of the workers the active balancer lists (empty if none is active)."""
        found = self.active()
        return sorted(w["name"] for w in found[1]["workers"]) if found else []

    def leader(self) -> dict:
        def find():
            for m in self.masters:
                d = detail(m)
                if d and d["state"] == "leader" and d["serving"]:
                    return d
            return None

        return self.wait(find, 15, "a serving master leader")


@contextlib.contextmanager
def running(d: Path, masters: list[LocalNode], balancers: list[LocalNode], workers: list[LocalNode]):
    """Start every node, wait for both workers on the primary b1, yield the ``Cluster``; stop
    every process by pid at the end, whatever happened."""
    c = Cluster(d, masters, balancers, workers)
    try:
        start_all(c.nodes, timeout=30)
        c.wait(lambda: (a := c.active()) and a[0] is balancers[0] and len(a[1]["workers"]) == len(workers),
               30, f"b1 active with {len(workers)} workers registered")
        c.client = Client([m.address for m in masters], timeout=30)
        yield c
    finally:
        if c.client is not None:
            c.client.close()
        stop_all(c.nodes)
        for pid in c.extra_pids:
            _kill_pid(pid)


def standard(d: Path, workers: int = 2):
    masters = master_nodes(d, 3)
    config, balancers = balancer_nodes(d, 2)
    return running(d, masters, balancers, worker_nodes(d, config, workers, slots=1))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with standard(tmp_path_factory.mktemp("dispatch")) as c:
        yield c


def _kill_pid(pid: int) -> None:
    if alive(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def task_view(c: Cluster, job: str, task: int) -> dict:
    answer = c.client.task(job, task)
    assert answer.stale is False
    return answer.value


def running_worker(c: Cluster) -> str:
    """The name of the worker the active balancer says runs a task."""
    return c.wait(lambda: next((w["name"] for w in (c.active() or (None, {"workers": []}))[1]["workers"]
                                if w["running"]), None), 10, "a worker running the task")


# ---- 1: the happy path -----------------------------------------------------------------------


def test_submit_map_as_completed_callbacks_and_lookup_by_id(cluster):
    c = cluster
    assert c.client.submit(lambda x: x * 2, 21).result(timeout=30) == 42

    futures = c.client.map(double, range(200))
    called: list[int] = []
    lock = threading.Lock()

    def on_done(f):
        with lock:
            called.append(f.task)

    for f in futures:
        f.add_done_callback(on_done)
    seen = set()
    for f in concurrent.futures.as_completed(futures, timeout=60):
        seen.add(f)
        assert f.result() == 2 * futures.index(f)
    assert seen == set(futures)
    assert [f.result() for f in futures] == [2 * i for i in range(200)]
    c.wait(lambda: len(called) == len(futures), 10, "every done callback")
    assert sorted(called) == sorted(f.task for f in futures)

    late = []
    futures[0].add_done_callback(late.append)  # added after it finished: called at once
    assert late == [futures[0]]

    for f in random.Random(7).sample(futures, 5):
        assert c.client.task_result(f.job, f.task) == f.result()


def gated(gate: Path, then: str) -> list[str]:
    """A command that runs ``then`` once the test has created the file ``gate`` (the workers are
    on this machine). It gives up waiting after ~60 s, so a test that failed first frees its slot."""
    wait = 'i=0; while [ ! -e "$0" ] && [ "$i" -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; '
    return ["sh", "-c", wait + then, str(gate)]


def test_a_job_dag_runs_in_order_and_a_failed_dependency_stops_its_children(cluster):
    """Each parent runs until the test opens its gate, which it does only once the children
    are submitted and seen waiting: no race between a fast parent and the next submits."""
    c = cluster
    gate_first, gate_broken = c.dir / "dag-first.gate", c.dir / "dag-broken.gate"
    first = c.client.run(gated(gate_first, "date +%s.%N"))
    second = c.client.options(after=first).run(["date", "+%s.%N"])  # waits for first
    view = c.client.job(second.job).value
    assert view["waiting_for"] == [first.job] and view["assigned"] == 0
    gate_first.touch()
    assert float(second.result(timeout=60).stdout) > float(first.result(timeout=1).stdout)

    broken = c.client.run(gated(gate_broken, "exit 3"))
    child = c.client.options(after=[broken, first]).run(["echo", "never"])
    grandchild = c.client.options(after=child).submit(lambda: "never either")
    assert c.client.job(child.job).value["waiting_for"] == [broken.job]  # first is done already
    assert c.client.job(grandchild.job).value["waiting_for"] == [child.job]
    gate_broken.touch()
    for f in (child, grandchild):
        with pytest.raises(TaskError, match="which it waits for, failed: it never ran"):
            f.result(timeout=60)
    with pytest.raises(Refused, match="could never start"):  # and now it has failed, naming it is refused
        c.client.options(after=broken).run(["echo", "never"])
    for f in (child, grandchild):
        view = c.client.job(f.job).value
        assert (view["state"], view["done"]) == ("failed", 0), view
        assert task_view(c, f.job, 0).get("attempts", []) == [], "a task of a job that never ran was attempted"


# ---- 2: bad input --------------------------------------------------------------------------------


def test_a_raising_task_fails_alone_and_the_rest_of_its_map_succeeds(cluster):
    futures = cluster.client.map(raise_on_three, range(8))
    concurrent.futures.wait(futures, timeout=60)
    assert all(f.done() for f in futures)
    err = futures[3].exception()
    assert type(err) is ValueError and str(err) == "item 3 is unlucky", err  # the callable's own exception
    assert "ValueError" in err.task_error.error and (err.task_error.job, err.task_error.task) == (futures[3].job, 3)
    assert [f.result() for i, f in enumerate(futures) if i != 3] == [i * 10 for i in range(8) if i != 3]
    view = task_view(cluster, futures[3].job, 3)
    assert view["state"] == "failed"
    assert [a["outcome"] for a in view["attempts"]] == ["failed"]  # a task's own failure is not retried
    with pytest.raises(ValueError, match="unlucky"):
        cluster.client.task_result(futures[3].job, 3)


def test_a_failed_call_carries_its_traceback(cluster):
    err = cluster.client.submit(raise_on_three, 3).exception(timeout=30)
    assert type(err) is ValueError
    shown = "".join(traceback.format_exception(err))  # what an uncaught one prints: the worker's traceback too
    assert "raise_on_three" in shown and "item 3 is unlucky" in shown and f"of job {err.task_error.job}" in shown
    assert b"Traceback" in err.task_error.stderr


def test_an_exception_that_cannot_be_unpickled_here_arrives_as_a_task_error(cluster):
    err = cluster.client.submit(raise_unloadable).exception(timeout=30)
    assert type(err) is TaskError and "Unloadable" in err.error and "nobody can load me" in err.error, err
    assert "raise_unloadable" in "".join(traceback.format_exception(err))


def test_commands_that_cannot_start_exit_non_zero_or_time_out_fail(cluster):
    client = cluster.client
    missing = client.run(["no-such-command-xyz"])
    failing = client.run(["sh", "-c", "exit 3"])
    slow = client.options(timeout_s=1).run(["sleep", "600"])  # its end within 30 s is the timeout's doing

    err = missing.exception(timeout=30)
    assert isinstance(err, TaskError), err
    assert "no-such-command-xyz" in err.error and ("not found" in err.error or "cannot start" in err.error), err.error

    assert not isinstance(err, (CommandFailed, TaskTimeout))  # it never ran: the cluster's failure

    err = failing.exception(timeout=30)
    assert isinstance(err, CommandFailed) and err.exit_code == 3, err
    assert "exit status 3" in err.error, err.error

    err = slow.exception(timeout=30)
    assert isinstance(err, TaskTimeout), err
    assert "timed out" in err.error or "timeout" in err.error, err.error

    ok = client.run(["sh", "-c", "echo hi"]).result(timeout=30)
    assert ok.exit_code == 0 and ok.stdout == b"hi\n"


@contextlib.contextmanager
def dealer(address: str, credentials: keys.Credentials | None = None):
    """A raw DEALER to ``address``, authenticated with ``credentials`` (default: this process's
    client key)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys.connect(sock, address, credentials)
    try:
        yield sock, Codec(new_node_id())
    finally:
        sock.close()
        ctx.term()


def recv_within(sock, codec: Codec, timeout: float):
    if not sock.poll(timeout * 1000):
        pytest.fail(f"no reply within {timeout:g} s")
    return codec.recv(sock)[2]


def test_a_forged_result_is_refused_by_the_master_and_the_balancer_keeps_serving(cluster):
    """A result from a client key goes nowhere (only worker keys post results); one from a
    worker key for a task no worker was sent is refused by the master (its job is unknown)."""
    c = cluster
    b, before = c.cluster_active()
    ledger_before = c.leader()["ledger"]
    job = os.urandom(16)
    upper, lower = int.from_bytes(job[:8], "big"), int.from_bytes(job[8:], "big")
    forged = TaskResult(upper, lower, 0, 1, 1, 0, 0, {"value": b"forged"}, None, None, "forger", [])
    with dealer(b.address) as (sock, codec):  # this process's client key
        codec.send(sock, forged)
        assert not sock.poll(1500), "a client key's result got an answer"
    c.wait(lambda: (r := query_status([b.address])[0].reply) and r.counters.get("forbidden.TaskResult", 0) >= 1, 10,
           "the balancer to count the forbidden result")
    with dealer(b.address, credentials_as(c.dir / "cluster.toml", "forger", "worker")) as (sock, codec):
        codec.send(sock, forged)
        reply = recv_within(sock, codec, 10)
    assert isinstance(reply, Error), reply
    assert reply.refers_to == TaskResult.code and reply.reason == AppReason.REFUSED, reply
    assert reply.detail.get("code") == "unknown_job" and reply.detail.get("job") == job.hex(), reply

    refused = before["core"].get("results_refused", 0)
    after = c.wait(lambda: (d := detail(b)) and d["core"].get("results_refused", 0) > refused and d, 10,
                   "the balancer to count the refusal")
    assert after["state"] == "active"
    assert after["core"].get("results_from_unregistered", 0) == before["core"].get("results_from_unregistered", 0) + 1
    ledger = c.leader()["ledger"]
    assert ledger.get("refused.unknown_job", 0) == ledger_before.get("refused.unknown_job", 0) + 1
    assert ledger["jobs"] == ledger_before["jobs"]
    assert c.registered() == ["w1", "w2"]
    assert c.client.submit(double, 5).result(timeout=30) == 10


def test_impossible_capabilities_are_refused_and_change_nothing(cluster):
    c = cluster
    b, before = c.cluster_active()
    with dealer(b.address, credentials_as(c.dir / "cluster.toml", "liar", "worker")) as (sock, codec):
        codec.send(sock, WorkerStatus(1, 1, 0, 0, [], {"cores": -5}, "liar", True))
        reply = recv_within(sock, codec, 10)
    assert isinstance(reply, Error), reply
    assert reply.refers_to == WorkerStatus.code, reply
    assert "cores" in reply.text and "-5" in reply.text and "liar" in reply.text, reply.text

    after = detail(b)
    assert after["state"] == "active"
    assert sorted(w["name"] for w in after["workers"]) == ["w1", "w2"]
    assert after["registry"]["workers"] == 2
    assert after["registry"].get("registered") == before["registry"].get("registered")
    changed = {k for k in set(before["core"]) | set(after["core"]) if before["core"].get(k) != after["core"].get(k)}
    assert changed == {"workers_refused"}, changed
    assert after["core"]["workers_refused"] == before["core"].get("workers_refused", 0) + 1


def test_after_bad_input_a_fresh_submit_works_and_every_node_answers(cluster):
    c = cluster
    assert c.client.submit(double, 50).result(timeout=30) == 100
    answers = query_status([n.address for n in c.nodes], timeout=3)
    assert [a.error for a in answers if a.reply is None] == []
    assert c.registered() == ["w1", "w2"]


# ---- 3: the active balancer SIGKILLed under 1,000 tasks -----------------------------------------


def test_active_balancer_sigkilled_while_1000_tasks_run(tmp_path):
    """Every task ends done exactly once across the takeover. How long the takeover takes is
    bench/dispatch.py's ("balancer takeover"); here the 20 s wait only guards against none."""
    with standard(tmp_path) as c:
        b1, b2 = c.balancers
        total = 1000
        futures = c.client.map(nap_triple, range(total))
        order: list[tuple[str, int]] = []  # completions in the order they came

        def note(f):
            order.append((f.job, f.task))

        for f in futures:
            f.add_done_callback(note)
        c.wait(lambda: sum(f.done() for f in futures) >= 200, 60, "200 tasks done")
        done_before = len(order)
        b1.kill()

        c.wait(lambda: (d := detail(b2, 0.5)) and d["state"] == "active", 20, "b2 to take over")
        results = [f.result(timeout=120) for f in futures]
        assert results == [3 * i for i in range(total)]
        assert done_before < total, "the tasks were all done before the kill"
        assert len(order) == len(set(order)) == total, "a future completed twice or never"

        jobs: dict[str, list[int]] = {}
        for f in futures:
            jobs.setdefault(f.job, []).append(f.task)
        duplicates = 0
        for job, tasks in jobs.items():
            view = c.client.job(job).value
            assert view["state"] == "done", view
            assert view["done"] == view["total"] == len(tasks), view
            duplicates += view["duplicates"]
        # a sample, and the tasks that completed around the kill (the likeliest to be run twice)
        around = set(order[max(0, done_before - 10):done_before + 10])
        sample = around | {(f.job, f.task) for f in random.Random(3).sample(futures, 30)}
        for job, task in sorted(sample):
            view = task_view(c, job, task)
            outcomes = [a["outcome"] for a in view["attempts"]]
            assert view["state"] == "done" and outcomes.count("done") == 1, view
        print(f"\n[takeover] killed at {done_before} done; duplicates recorded by the ledger: {duplicates}")
        d2 = detail(b2)
        assert d2["state"] == "active" and sorted(w["name"] for w in d2["workers"]) == ["w1", "w2"]


# ---- 4: a worker SIGKILLed mid-task ---------------------------------------------------------------


def test_worker_sigkilled_mid_task_its_task_finishes_on_the_other(tmp_path):
    with standard(tmp_path) as c:
        future = c.client.submit(slow_double, 21)
        victim_name = running_worker(c)
        victim = c.worker(victim_name)
        children = descendants(victim.pid)
        c.extra_pids |= children  # the slot process lives in its own session: stopped by pid at the end
        victim.kill()

        assert future.result(timeout=60) == 42
        view = task_view(c, future.job, 0)
        attempts = [(a["outcome"], a["worker"]) for a in view["attempts"]]
        other = next(w.name for w in c.workers if w is not victim)
        assert attempts == [("lost", victim_name), ("done", other)], view
        lost = view["attempts"][0]["error"]  # the reason the ledger keeps, as `cluster jobs JOB` shows it
        assert victim_name in lost and "silent" in lost, lost
        # The orphaned slot process ends by itself once its task is over (its pipes are gone).
        c.wait(lambda: not any(alive(p) for p in children), 15,
               f"the slot processes {children} of the killed worker to exit")
        assert c.registered() == [other]


# ---- 5: a worker whose heartbeats stop ----------------------------------------------------------------


def test_a_silent_worker_is_purged_its_task_rerun_and_it_comes_back(tmp_path):
    with standard(tmp_path) as c:
        future = c.client.submit(slow_double, 8)
        victim_name = running_worker(c)
        victim = c.worker(victim_name)
        other = next(w.name for w in c.workers if w is not victim)
        lost_before = c.active_detail()["core"].get("tasks_lost", 0)
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            c.wait(lambda: c.registered() == [other], 10, f"{victim_name} to be purged")
            assert c.active_detail()["core"].get("tasks_lost", 0) >= lost_before + 1
            assert future.result(timeout=60) == 16
            outcomes = [(a["outcome"], a["worker"]) for a in task_view(c, future.job, 0)["attempts"]]
            assert outcomes[0] == ("lost", victim_name) and outcomes[-1] == ("done", other), outcomes
        finally:
            os.kill(victim.pid, signal.SIGCONT)

        c.wait(lambda: c.registered() == ["w1", "w2"], 20, f"{victim_name} to register again")
        started = detail(victim)["core"].get("tasks_started", 0)
        futures = c.client.map(lambda x: (time.sleep(0.2), x + 1)[1], range(10))
        assert [f.result(timeout=60) for f in futures] == list(range(1, 11))
        back = detail(victim)
        assert back["state"] == "registered" and back["core"].get("tasks_started", 0) > started, back
        view = c.client.job(future.job).value
        assert view["done"] == view["total"] == 1, view


# ---- 6: the pair's peer link cut, both alive ------------------------------------------------------------


class Relay:
    """A TCP relay 127.0.0.1:``port`` → 127.0.0.1:``target``; ``stop`` cuts every connection."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def start(self) -> "Relay":
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        self._spawn(self._accept, self.listener)
        return self

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=2)
                up.settimeout(None)
            except OSError:
                conn.close()  # nothing there yet: the peer's ZeroMQ reconnects
                continue
            with self.lock:
                self.conns += [conn, up]
            self._spawn(self._pump, conn, up)
            self._spawn(self._pump, up, conn)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
            self.listener.close()
            self.listener = None
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(5)
        self.threads = [t for t in self.threads if t.is_alive()]


def split_pair(d: Path) -> tuple[list[LocalNode], list[LocalNode], dict[int, int], Path]:
    """Masters and a balancer pair whose peer link runs through relays: b1 publishes its state
    on p1 and hears b2 through r2 → p2; b2 publishes on p2 and hears b1 through r1 → p1. Each
    balancer gets its own cluster file (the pair's ``peer`` endpoints differ); the workers' one
    is b1's. Returns (masters, [b1, b2], {relay port: target port}, the workers' config)."""
    masters = master_nodes(d, 3)
    make_keys(d, {"b1": "balancer", "b2": "balancer"})
    text = (d / "masters.toml").read_text() + "\n"
    w1, w2, p1, p2, r1, r2 = (free_port() for _ in range(6))
    balancers = []
    for name, port, (b1_peer, b2_peer) in (("b1", w1, (p1, r2)), ("b2", w2, (r1, p2))):
        pair = {"b1": BalancerAddress("b1", f"tcp://127.0.0.1:{w1}", f"tcp://127.0.0.1:{b1_peer}", True),
                "b2": BalancerAddress("b2", f"tcp://127.0.0.1:{w2}", f"tcp://127.0.0.1:{b2_peer}", False)}
        config = d / f"cluster-{name}.toml"
        config.write_text(text + write_balancers_section(pair))
        balancers.append(LocalNode(name, ["balancer", "--config", str(config), "--name", name, "--log-level", "INFO"],
                                   f"tcp://127.0.0.1:{port}", d / f"{name}.log"))
    return masters, balancers, {r1: p1, r2: p2}, d / "cluster-b1.toml"


def test_peer_link_cut_with_both_alive_only_the_active_one_dispatches(tmp_path):
    d = tmp_path
    masters, balancers, links, workers_config = split_pair(d)
    relays = [Relay(port, target).start() for port, target in links.items()]
    try:
        with running(d, masters, balancers, worker_nodes(d, workers_config, 2, slots=1)) as c:
            b1, b2 = balancers
            c.wait(lambda: (x := detail(b2)) and x["state"] == "passive" and x["star"]["peer_alive"]
                   and detail(b1)["star"]["peer_alive"], 15, "the pair hearing each other through the relays")

            for r in relays:
                r.stop()
            c.wait(lambda: not detail(b1)["star"]["peer_alive"] and not detail(b2)["star"]["peer_alive"], 15,
                   "both balancers to find their peer silent")
            placed = {b.name: detail(b)["core"].get("placed", 0) for b in balancers}

            futures = c.client.map(nap_triple, range(100))
            states = set()
            while not all(f.done() for f in futures):
                x1, x2 = detail(b1), detail(b2)
                if x1 is not None and x2 is not None:  # one too busy to answer within 1 s is not a state
                    states.add((x1["state"], x2["state"]))
                concurrent.futures.wait(futures, timeout=0.1)  # sample the pair while the tasks run
            assert [f.result() for f in futures] == [3 * i for i in range(100)]
            assert states == {("active", "passive")}, states

            x1, x2 = detail(b1), detail(b2)
            grew = {b.name: detail(b)["core"].get("placed", 0) - placed[b.name] for b in balancers}
            assert sum(1 for g in grew.values() if g > 0) <= 1, grew
            assert grew["b1"] >= 100 and grew["b2"] == 0, grew
            assert x2["state"] == "passive" and x2["workers"] == [] and not x2["star"]["peer_alive"], x2
            assert x1["state"] == "active" and sorted(w["name"] for w in x1["workers"]) == ["w1", "w2"]
            for w in c.workers:
                wd = detail(w)
                assert wd["state"] == "registered" and wd["balancer"] == 0, wd  # b0 is the primary, b1
            job = c.client.job(futures[0].job).value
            assert job["done"] == job["total"] == 100, job
            for f in futures:
                attempts = task_view(c, f.job, f.task)["attempts"]
                assert [(a["outcome"], a["balancer"]) for a in attempts] == [("done", "b1")], attempts

            # The link heals: they hear each other again and nothing changes hands.
            relays = [Relay(port, target).start() for port, target in links.items()]
            c.wait(lambda: detail(b1)["star"]["peer_alive"] and detail(b2)["star"]["peer_alive"], 15,
                   "the pair to hear each other again")
            assert detail(b1)["state"] == "active" and detail(b2)["state"] == "passive"
            assert c.client.submit(double, 4).result(timeout=30) == 8
    finally:
        for r in relays:
            r.stop()
