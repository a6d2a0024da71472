"""Three master cores on a simulated network with seeded drops and leader changes.

Raft itself is pysyncobj's (tested by its authors and by tests/integration/test_masters.py);
here a small stand-in keeps one log, commits an entry only while its proposer leads with a
majority connected, applies committed entries to every master's ledger in order, and sometimes
loses the commit callback (the "committed, but the answer was lost" case). A client with the
library's retry rules (same key on every retry, follow NOT_LEADER, move on after silence)
submits jobs while messages are dropped and leaders change. What must hold, for every seed:
every acknowledged job is in the ledger once, no key ever made two jobs, and all masters that
have applied the same log hold byte-identical ledgers. A watcher (WATCH with a cursor, following
NOT_LEADER, resending after silence) sees every task ending once and in order across elections.
"""

from __future__ import annotations

import random

import pytest

from cluster.node.events import MessageReceived, Send, Started, TimerFired
from master.core import API, Committed, MasterCore, ProposalFailed, Propose, RaftView
from proto.ids import join128
from master import views
from master.ledger import Ledger
from master.commands import AssignTasks, SubmitJob
from master.ledger import spec_digest
from proto.ids import split128
from proto.messages import Error, NotLeader, QueryReply, Submit, SubmitAck, TaskResult, Watch

ADDRS = [f"10.0.0.{i}:6000" for i in range(3)]
CLIENT = b"client"
WATCHER = b"watcher"


class SimCluster:
    def __init__(self, seed: int, drop: float) -> None:
        self.rng = random.Random(seed)
        self.drop = drop
        self.ledgers = [Ledger() for _ in ADDRS]
        self.applied = [0] * len(ADDRS)
        self.log: list = []
        self.term = 1
        self.leader = 0
        self.up = [True] * len(ADDRS)
        self.now = 0.0
        self.cores = [
            MasterCore(self.ledgers[i], f"m{i}", lambda i=i: self._view(i), {a: f"api{j}" for j, a in enumerate(ADDRS)})
            for i in range(len(ADDRS))
        ]
        self.pending: list[tuple[int, Propose]] = []  # proposals awaiting the next Raft step
        self.to_client: list = []
        self.to_watcher: list = []
        self.delivered: dict[int, int] = {}
        self.n = 0
        for i in range(len(ADDRS)):
            self._feed(i, Started("s"))
            self._feed(i, TimerFired("raft", "r"))

    def _view(self, i: int) -> RaftView:
        quorum = sum(self.up) >= 2 and self.up[i]
        role = "leader" if i == self.leader and self.up[i] else "follower"
        return RaftView(role, self.term, ADDRS[self.leader] if self.up[self.leader] else None, quorum,
                        len(self.log), self.applied[i])

    def _feed(self, i: int, event) -> None:
        for effect in self.cores[i].handle(event, self.now):
            if isinstance(effect, Propose):
                self.pending.append((i, effect))
            elif isinstance(effect, Send) and effect.route in (CLIENT, WATCHER):
                if self.rng.random() >= self.drop:
                    (self.to_client if effect.route == CLIENT else self.to_watcher).append((i, effect.message))
        self.cores[i].validate_state()

    def deliver(self, i: int, message) -> None:
        key = (message.idempotency_key_upper << 64) | message.idempotency_key_lower
        self.delivered[key] = self.delivered.get(key, 0) + 1
        if not self.up[i] or self.rng.random() < self.drop:
            return
        self.n += 1
        self._feed(i, MessageReceived(API, CLIENT, 1, message, f"m{self.n}"))
        self._feed(i, TimerFired("flush", "f"))

    def send(self, i: int, message, route: bytes) -> None:
        """Any message, dropped like the others; a write is flushed at once."""
        if not self.up[i] or self.rng.random() < self.drop:
            return
        self.n += 1
        self._feed(i, MessageReceived(API, route, 1, message, f"m{self.n}"))
        self._feed(i, TimerFired("flush", "f"))

    def append(self, entry):
        """An entry committed without a callback to any core (as a balancer's assignments are, here)."""
        self.log.append(entry)
        self._catch_up()
        return self._results[(len(self.log), self.ledgers.index(self.truth()))]

    def truth(self) -> Ledger:
        return self.ledgers[self.up.index(True)]

    def raft_step(self) -> None:
        pending, self.pending = self.pending, []
        for i, p in pending:
            if i != self.leader or not self.up[i] or sum(self.up) < 2:
                self._feed(i, ProposalFailed(p.token, "not_leader", "pf"))
                continue
            self.log.append(p.entry)
            self._catch_up()
            if self.rng.random() < 0.15:  # committed, but the callback is lost: expiry answers it
                continue
            self._feed(i, Committed(p.token, self._results[(len(self.log), i)], len(self.log), "c"))

    def _catch_up(self) -> None:
        self._results = getattr(self, "_results", {})
        for i in range(len(ADDRS)):
            while self.up[i] and self.applied[i] < len(self.log):
                self.applied[i] += 1
                self._results[(self.applied[i], i)] = self.ledgers[i].apply(self.log[self.applied[i] - 1])

    def chaos(self) -> None:
        r = self.rng.random()
        if r < 0.05:  # a new election
            self.term += 1
            self.leader = self.rng.choice([i for i in range(len(ADDRS)) if self.up[i]])
        elif r < 0.08:  # a master goes down or comes back (never two down at once)
            i = self.rng.randrange(len(ADDRS))
            if self.up[i] and sum(self.up) == 3:
                self.up[i] = False
            elif not self.up[i]:
                self.up[i] = True
                self._catch_up()
        self.now += 0.5
        for i in range(len(ADDRS)):
            if self.up[i]:
                self._feed(i, TimerFired("raft", "r"))
                self._feed(i, TimerFired("expire", "e"))
                self._feed(i, TimerFired("watch", "w"))


@pytest.mark.parametrize("seed", range(12))
def test_acknowledged_submits_land_exactly_once_under_drops_and_elections(seed):
    sim = SimCluster(seed, drop=0.2)
    keys = [sim.rng.getrandbits(128) for _ in range(40)]
    target = {k: 0 for k in keys}
    acked: dict[int, bytes] = {}
    waiting: dict[int, int] = {}  # key → steps since last try
    for step in range(400):
        for k in keys:
            if k in acked:
                continue
            waiting[k] = waiting.get(k, 99) + 1
            if waiting[k] > 3:  # silence: try again (same key), elsewhere
                waiting[k] = 0
                target[k] = (target[k] + (1 if sim.rng.random() < 0.5 else 0)) % 3
                sim.deliver(target[k], Submit(k & 0xFFFF, k >> 64, k & (2**64 - 1), "range", {"count": 2}))
        sim.raft_step()
        for i, m in sim.to_client:
            key = next((k for k in keys if k & 0xFFFF == m.request_id), None) if hasattr(m, "request_id") else None
            if key is None:
                continue
            if isinstance(m, SubmitAck):
                job = join128(m.job_uuid_upper, m.job_uuid_lower)
                assert acked.setdefault(key, job) == job, "one key, two different jobs acknowledged"
            elif isinstance(m, NotLeader) and m.leader:
                target[key] = int(m.leader[3:])
                waiting[key] = 99
            elif isinstance(m, Error):
                waiting[key] = 2
        sim.to_client.clear()
        sim.chaos()
        if len(acked) == len(keys):
            break
    sim.up = [True] * 3
    sim._catch_up()
    ledger = sim.ledgers[0]
    for k, job in acked.items():
        assert job in ledger.state.jobs, "an acknowledged submit is missing"
    made = [j.key for j in ledger.state.jobs.values()]
    assert len(made) == len(set(made)), "a key made two jobs"
    assert ledger.state.counters.get("jobs_submitted", 0) == len(made), "a job was created twice"
    retried_after_commit = sum(1 for k in keys if sim.delivered.get(k, 0) > 1 and k in acked)
    assert retried_after_commit > 0, "no submit was retried: the sim is not exercising idempotency"
    assert len(made) <= len(keys)
    snapshots = {lg.snapshot() for lg in sim.ledgers}
    assert len(snapshots) == 1, "masters that applied the same log differ"
    assert len(acked) >= len(keys) // 2, f"too few submits got through ({len(acked)}): the sim is not exercising much"


@pytest.mark.parametrize("seed", range(8))
def test_a_watcher_sees_every_task_ending_once_and_in_order_across_elections(seed):
    sim = SimCluster(seed, drop=0.15)
    job, n = b"\x01" * 16, 80
    spec = {"count": n, "max_attempts": 1, "retry_failed": False, "fail_fast": False}
    sim.append(SubmitJob(job, job, spec_digest("range", spec), "range", spec, "c", 0.0))
    seen: list[int] = []
    target, request, silent = 0, 0, 99
    for step in range(600):
        truth = sim.truth()
        ready = views.ready_tasks(truth.state, truth.work, 4)
        if ready:  # a balancer's assignments commit; the workers' results go to some master
            t0, s0 = truth.state.fence
            sim.append(AssignTasks(sim.term, 1 if sim.term > t0 else s0 + 1, "b", ready, sim.now))
        for job_id, task_id, a in views.open_assignments(truth.state, truth.work):
            if sim.rng.random() < 0.3:
                m = TaskResult(*split128(job_id), task_id, a.fence_term, a.fence_sequence, 1 if task_id % 4 == 1 else 0,
                               0, {"t": task_id}, None, "boom" if task_id % 4 == 1 else None, "w")
                sim.send(sim.leader if sim.rng.random() < 0.8 else sim.rng.randrange(3), m, b"balancer")
        silent += 1
        if silent > 6:  # no answer: ask again, from where we are, perhaps elsewhere
            request, silent = request + 1, 0
            sim.send(target, Watch(request, 2_000, {job: len(seen)}), WATCHER)
        sim.raft_step()
        for i, m in sim.to_watcher:
            if isinstance(m, NotLeader) and m.request_id == request and m.leader:
                target, silent = int(m.leader[3:]), 99
            elif isinstance(m, QueryReply) and m.request_id == request:
                view = m.value["jobs"].get(job.hex())
                if view is not None:
                    assert view["skipped"] == 0 and view["cursor"] == len(seen) + len(view["tasks"])
                    seen += [t["task"] for t in view["tasks"]]
                    assert seen == sim.ledgers[i].state.jobs[job].endings[:len(seen)], "an ending missed, repeated or reordered"
                silent = 99  # answered: watch again at once
        sim.to_watcher.clear()
        sim.chaos()
        if len(seen) == n:
            break
    final = sim.truth().state.jobs[job]
    assert seen == final.endings and sorted(seen) == list(range(n)), f"saw {len(seen)} of {n} endings"
    assert final.state == "failed" and final.failed == len([t for t in range(n) if t % 4 == 1])
