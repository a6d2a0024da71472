#!/usr/bin/env python3
"""Simulated workers for the dispatch-latency benchmark (issue 10, ``bench/batch.py``).

One process runs ``--count`` workers. Each one is a real ``worker.core.WorkerCore`` (the
protocol logic a real worker runs: registration by WORKER_STATUS, heartbeats with its credit at
the cluster config's ``[heartbeat]`` timings, the balancer's liveness, NOT_LEADER, results kept
and resent until RESULT_ACK) with 1 slot and no prefetch, over its own two DEALER sockets ``b0``/``b1`` set up as worker/node.py
sets them up. Only the slot is simulated: a WORKER_REQUEST's ``RunTask`` becomes a timer, and
the task ends (done, exit 0) ``run_s`` × uniform(0.5, 1.5) seconds later (the spread keeps
the workers' cycles from staying in lock step). One ``zmq.Poller`` loop serves every socket
and timer of the process: no thread per worker.

Latency, as measured here: for each WORKER_REQUEST a worker receives, the time from the
moment that worker announced its free slot (its registration WORKER_STATUS for its first task;
afterwards the TASK_RESULT that frees the slot, which a real worker's credit rides on) to the
moment the request was read from its socket, both on ``time.monotonic`` (the system-wide
CLOCK_MONOTONIC, so the parent can place samples in time). It includes this process's own
delay in reading the socket; ``loop`` in the output (how long one pass of the loop took)
bounds that delay.

Like a real worker's loop, a simulated worker handles each message of a MESSAGE_BATCH alone, and
the task-path messages it makes in one pass of the loop go to each balancer as one batch (a lone
one as itself).

``--slots``/``--prefetch`` give each worker more slots (the leader benchmark of
``bench/dispatch.py``, issue 23, where ``--run-s 0`` ends every task at once). In a cluster with
CURVE (the default) each simulated worker speaks with its own key, named as the worker
(``sim0001`` ...), which the parent must have put in the allow-list with role worker
(``cluster.local.make_keys``); a plaintext cluster (``insecure = true``) needs none.

On SIGTERM or SIGINT (or after ``--max-s``) the process writes ``--out`` (JSON: per request
``[arrival, latency_s, worker, nth task of that worker]``, counters, loop timings) and exits.

    python bench/simworkers.py --config cluster.toml --count 250 --first 1 --run-s 5 --out F.json
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from cluster.node.config import load_cluster_config  # noqa: E402
from cluster.node.keys import node_credentials  # noqa: E402
from cluster.node.events import Log, MessageReceived, Send, Started, StartTimer, TimerFired  # noqa: E402
from proto import Codec, ProtocolError, new_node_id  # noqa: E402
from proto.ids import join128  # noqa: E402
from proto.messages import BATCHABLE, MessageBatch, TaskResult, WorkerRequest, WorkerStatus  # noqa: E402
from worker.core import RunTask, TaskEnded, WorkerCore, WorkerIdentity, WorkerOptions  # noqa: E402

HWM = 100_000  # as worker/node.py


def raise_nofile() -> int:
    """Lift the soft limit on open files to the hard one: two sockets per worker, each a TCP
    connection and a mailbox descriptor. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SimWorkers:
    """``count`` workers named ``sim<first>`` … on one loop; ``endpoints`` are the balancers'
    worker endpoints, the primary's first (b0, as a real worker orders them)."""

    def __init__(self, endpoints: list[str], count: int, first: int, run_s: float, seed: int,
                 options: WorkerOptions = WorkerOptions(), slots: int = 1, prefetch: int = 0,
                 credentials: Callable[[str], Any] | None = None) -> None:
        self.run_s = run_s
        self.options = options
        self.rng = random.Random(seed)
        self.ctx = zmq.Context()
        self.ctx.MAX_SOCKETS = 2 * count * len(endpoints) + 64
        self.cores: list[WorkerCore] = []
        self.codecs: list[Codec] = []
        self.socks: list[list[zmq.Socket]] = []
        self.owner: dict[zmq.Socket, tuple[int, str]] = {}
        self.poller = zmq.Poller()
        for i in range(count):
            me = WorkerIdentity(f"sim{first + i:04d}", slots=slots, cores=slots, prefetch=prefetch)
            keys = credentials(me.name) if credentials is not None else None  # CURVE: each worker its own key
            self.cores.append(WorkerCore(me, len(endpoints), options))
            self.codecs.append(Codec(new_node_id()))  # each worker is a node of its own
            socks = []
            for b, endpoint in enumerate(endpoints):
                s = self.ctx.socket(zmq.DEALER)
                for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, HWM), (zmq.RCVHWM, HWM), (zmq.IMMEDIATE, 1)):
                    s.setsockopt(opt, value)
                if keys is not None:
                    keys.connect(s, endpoint)
                else:
                    s.connect(endpoint)
                self.poller.register(s, zmq.POLLIN)
                self.owner[s] = (i, f"b{b}")
                socks.append(s)
            self.socks.append(socks)
        self.timers: list[tuple[float, int, int, str, Any]] = []  # (due, seq, worker, name, event)
        self.timer_seq: dict[tuple[int, str], int] = {}
        self.seq = itertools.count(1)
        self.stimuli = itertools.count(1)
        self.free_since: list[float | None] = [None] * count  # when each announced its free slot
        self.nth = [0] * count
        self.samples: list[list] = []  # [arrival, latency, worker, nth]
        self.counters: dict[str, int] = {}
        self.held: dict[tuple[int, int], list[Any]] = {}  # (worker, balancer) -> task-path messages this pass
        self.passes: list[float] = []  # seconds each pass of the loop took (poll return → next poll)
        self.stopping = False

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, max_s: float) -> None:
        deadline = time.monotonic() + max_s
        interval = self.options.interval
        for i in range(len(self.cores)):
            # spread the workers' start over one heartbeat interval, as real ones would be
            self._timer(i, "_start", self.rng.uniform(0, interval), None)
        while not self.stopping and time.monotonic() < deadline:
            due = self.timers[0][0] - time.monotonic() if self.timers else 1.0
            ready = self.poller.poll(max(0, min(1000, int(due * 1000) + 1)))
            t0 = time.monotonic()
            for sock, _ in ready:
                self._drain(sock)
            self._fire_timers()
            self._flush()
            self.passes.append(time.monotonic() - t0)

    def _drain(self, sock: zmq.Socket) -> None:
        i, name = self.owner[sock]
        codec = self.codecs[i]
        for _ in range(64):
            try:
                route, sender, message = codec.recv(sock, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                self._count(f"rejected.{exc.reason.name}")
                continue
            if type(message) is not MessageBatch:
                self._received(i, name, route, sender, message)
                continue
            for item in codec.unbatch(message):  # each alone, as the node loop hands them to the core
                if isinstance(item, ProtocolError):
                    self._count(f"rejected.{item.reason.name}")
                else:
                    self._received(i, name, route, *item)

    def _received(self, i: int, name: str, route: bytes | None, sender: int, message: Any) -> None:
        now = time.monotonic()
        if type(message) is WorkerRequest:
            self._count("requests")
            since = self.free_since[i]
            if since is not None:
                self.samples.append([now, now - since, i, self.nth[i]])
                self.nth[i] += 1
                self.free_since[i] = None
        self._handle(i, MessageReceived(name, route, sender, message, self._stimulus("msg")), now)

    def _flush(self) -> None:
        """Send what each worker held in this pass of the loop, per balancer socket: a lone message
        as itself, more as MESSAGE_BATCHes, as a real worker's loop does at the end of its turn."""
        for (i, b), messages in self.held.items():
            codec, sock = self.codecs[i], self.socks[i][b]
            if len(messages) == 1:
                self._send(codec, sock, messages[0])
                continue
            items = codec.encode_items(messages)
            for start, end in codec.batch_cuts([len(x) for x in items]):
                self._send(codec, sock, messages[start] if end - start == 1 else
                           MessageBatch(end - start, items[start:end]))
        self.held.clear()

    def _send(self, codec: Codec, sock: zmq.Socket, message: Any) -> None:
        try:
            codec.send(sock, message, flags=zmq.NOBLOCK)
            self._count("sent")
        except zmq.Again:
            self._count("send_dropped")  # as the real loop: the protocol's retries recover

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, seq, i, name, event = heapq.heappop(self.timers)
            if self.timer_seq.get((i, name)) != seq:
                continue  # restarted since
            del self.timer_seq[(i, name)]
            if name == "_start":
                event = Started(self._stimulus("start"))
            elif event is None:
                event = TimerFired(name, self._stimulus(f"timer-{name}"))
            self._handle(i, event, time.monotonic())

    def _timer(self, i: int, name: str, delay: float, event: Any) -> None:
        seq = next(self.seq)
        self.timer_seq[(i, name)] = seq
        heapq.heappush(self.timers, (time.monotonic() + delay, seq, i, name, event))

    # ---- one worker's effects ------------------------------------------------------------------

    def _handle(self, i: int, event: Any, now: float) -> None:
        ended = type(event) is TaskEnded
        for effect in self.cores[i].handle(event, now):
            kind = type(effect)
            if kind is Send:
                m = effect.message
                sent_at = time.monotonic()
                if type(m) is WorkerStatus and m.register:
                    self.free_since[i] = sent_at  # its first free slot, or again after a re-registration
                elif ended and type(m) is TaskResult:
                    self.free_since[i] = sent_at  # the result frees the slot (not a resend: those come by timer)
                key = (i, int(effect.socket[1:]))
                if type(m) in BATCHABLE:
                    self.held.setdefault(key, []).append(m)  # sent at the end of this pass (_flush)
                    continue
                for held in self.held.pop(key, []):  # what was held for that balancer goes first
                    self._send(self.codecs[i], self.socks[i][key[1]], held)
                self._send(self.codecs[i], self.socks[i][key[1]], m)
            elif kind is StartTimer:
                self._timer(i, effect.name, effect.delay, None)
            elif kind is RunTask:
                run_s = self.run_s * self.rng.uniform(0.5, 1.5) if self.run_s > 0 else 0.0  # 0: ends at once
                self._timer(i, f"run-{_key(effect.request)}", run_s, _ended(effect.request, self._stimulus("task-ended")))
            elif kind is Log:
                pass  # registrations, redirections: the counters below say it
            else:
                self._count(f"effect.{kind.__name__}")

    def _stimulus(self, kind: str) -> str:
        return f"{kind}-{next(self.stimuli)}"

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def report(self) -> dict:
        counters = dict(self.counters)
        for core in self.cores:
            for k, v in core.counters.items():
                counters[f"core.{k}"] = counters.get(f"core.{k}", 0) + v
        passes = sorted(self.passes)

        def q(p: float) -> float:
            return passes[min(len(passes) - 1, int(p * len(passes)))] if passes else 0.0

        return {"workers": len(self.cores), "run_s": self.run_s, "samples": self.samples, "counters": counters,
                "registered": sum(c.registered for c in self.cores),
                "loop": {"passes": len(passes), "p50_s": q(0.5), "p99_s": q(0.99), "max_s": passes[-1] if passes else 0.0,
                         "busy_s": sum(passes)}}

    def close(self) -> None:
        for socks in self.socks:
            for s in socks:
                s.close(linger=0)
        self.ctx.term()


def _key(m: WorkerRequest) -> str:
    return f"{join128(m.job_uuid_upper, m.job_uuid_lower).hex()}/{m.task_id}"


def _ended(m: WorkerRequest, stimulus: str) -> TaskEnded:
    """What a slot posts when a no-op task is over: done, exit 0, nothing written."""
    job = join128(m.job_uuid_upper, m.job_uuid_lower)
    return TaskEnded(job, m.task_id, (m.fence_term, m.fence_sequence), 0, 0, {}, None, None, [], (), stimulus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the cluster's TOML (names the balancers)")
    ap.add_argument("--count", type=int, default=250, help="workers in this process")
    ap.add_argument("--first", type=int, default=1, help="number of the first worker (names sim0001 …)")
    ap.add_argument("--run-s", type=float, default=5.0, help="mean simulated run time of a task, seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--slots", type=int, default=1, help="slots of each worker")
    ap.add_argument("--prefetch", type=int, default=0, help="tasks each worker holds ready beyond its slots")
    ap.add_argument("--max-s", type=float, default=600.0, help="exit after this long even without a signal")
    ap.add_argument("--out", required=True, help="where to write the JSON at exit")
    args = ap.parse_args(argv)
    nofile = raise_nofile()
    config = load_cluster_config(Path(args.config))
    balancers = sorted(config.balancers.values(), key=lambda b: not b.primary)  # b0 = the primary
    beat = config.heartbeat  # the timings a real worker of this cluster would use
    credentials = None
    if not config.security.insecure:  # each worker's key must be in the allow-list, role worker (the parent makes them)
        def credentials(name: str) -> Any:
            return node_credentials(config.security, name, "worker", config.servers())
    sim = SimWorkers([b.workers for b in balancers], args.count, args.first, args.run_s, args.seed,
                     WorkerOptions(interval=beat.interval_s, liveness=beat.balancer_liveness_s),
                     slots=args.slots, prefetch=args.prefetch, credentials=credentials)

    def on_signal(signum: int, _frame: Any) -> None:
        sim.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sim.run(args.max_s)
    finally:
        report = sim.report()
        report["nofile"] = nofile
        Path(args.out).write_text(json.dumps(report))
        sim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
