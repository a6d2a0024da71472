"""The balancer core: the Binary Star pair, the worker registry and dispatch, between masters
and workers.

Theory of operation
-------------------
A balancer sits between the master leader and the workers (design.md, "Balancer pair"). Two
run, a primary and a backup; ``BinaryStar`` decides which one serves. This core joins that
machine to the registry (``balancer.registry``) and the dispatcher (``balancer.dispatch``):

- **Peer.** Every ``interval`` it publishes PEER_STATE (its Binary Star state and epoch) to
  its peer and feeds what it hears to ``BinaryStar.on_peer``.
- **Workers are the clients.** A worker's registration (WORKER_STATUS with ``register``) is
  the "client turns to me" event of Binary Star: a passive balancer whose peer is alive answers
  NOT_LEADER with the peer's worker endpoint; one whose peer went silent takes over. The split
  brain guard follows: if only the link between the two balancers breaks, workers keep talking
  to the active one and the passive one never serves.
- **Masters.** The active balancer ATTACHes to the master leader with its *epoch*, which grows
  at every activation (``max(epoch_base, peer's epoch + 1, own + 1)``; ``epoch_base`` is the
  wall clock in ms at process start, so a restarted balancer outranks its earlier self). The
  stream itself (attach, heartbeats, failover between masters, credit batches) is
  ``balancer.masters.MasterStream``; each WORKER_REQUEST that arrives on it goes to the
  dispatcher, placements go to workers.
- **Credit towards the master.** The core asks for at most ``queue_factor`` × the workers'
  slots (at least ``min_queue``) tasks held at once (pending here + running on workers +
  credit the master still holds), so a burst never piles up here and a freed slot finds a task
  waiting.
- **Credit from workers.** A worker's heartbeat says its free slots and how many WORKER_REQUESTs
  it has received since registering; the difference to what was sent is in flight and is not
  counted twice, and how many tasks it takes in all now (its prefetch queue adapts:
  worker.prefetch). Nothing is sent beyond it (``Registry.sent`` refuses).
- **Results** go to the master leader with the worker's name; RESULT_ACK (or a final refusal
  of the result) comes back and is routed to the worker that sent it. Workers keep results
  until acknowledged and resend them, so nothing is lost when a balancer or a master dies.
- **Liveness.** A worker silent for ``worker_liveness`` seconds is purged; each task it ran is
  reported to the master as a LOST attempt (the ledger retries it up to the job's limit). The
  balancer heartbeats every worker once per ``interval``, ``BEAT_BATCH`` at a time spread over
  the first half of it, so that a thousand heartbeats never hold the loop in one burst.

After a takeover the new active one rebuilds everything from the others: outstanding tasks
from the master leader (open assignments on ATTACH), running tasks from the workers' new
registrations (``tasks``), so a task that still runs is not sent again (``Dispatcher`` drops
one a worker already runs under the same or a newer fence).

What workers and masters send is checked by ``balancer.intake`` before it touches this state.

Pure: no sockets, clocks, threads or disk; ``now`` comes with each event. Sockets named here:
``workers`` (ROUTER), ``m0`` … (one DEALER per master), ``peer_out`` (PUB), ``peer_in`` (SUB).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from balancer.binary_star import BinaryStar, State, Transition
from balancer.dispatch import Dispatcher, DispatchError, Task
from balancer.intake import MAX_SLOTS, need_of, parse_registration, refuse, worker_output, worker_slots
from balancer.masters import MasterStream
from balancer.registry import Registry, RegistryError, Worker
from cluster.node.events import (
    Effect,
    Event,
    Forbidden,
    Log,
    MessageReceived,
    Send,
    Started,
    StartTimer,
    TimerFired,
    authorise,
)
from proto.errors import AppReason
from proto.ids import join128, split128
from proto.messages import (
    Attach,
    Outcome,
    Error,
    Heartbeat,
    NotLeader,
    PeerState,
    ResultAck,
    TaskResult,
    TaskWaiting,
    WorkerRequest,
    WorkerStatus,
)

WORKERS = "workers"
PEER_IN = "peer_in"
PEER_OUT = "peer_out"
LOST, FAILED = Outcome.LOST, Outcome.FAILED

# Heartbeats to workers go out at most this many back to back; more are spread over the interval
# in slices. 1,000 of them in one burst held the loop for 20-60 ms each tick (bench/batch.py,
# 1,000 simulated workers), and a result arriving meanwhile waited that long for its next task.
BEAT_BATCH = 100
EPOCH_RAISE_S = 2.0  # at most one epoch raise (to outbid a stale attachment) per this many seconds
WAITING_EVERY_S = 1.0  # how often the tasks that wait, and why, are told to the master (TASK_WAITING)

_need_of = need_of  # the name tests/unit/test_master_core.py imports from here


@dataclass(frozen=True)
class BalancerOptions:
    """Timings and sizes (seconds, tasks)."""

    interval: float = 0.25  # Binary Star heartbeats, worker heartbeats, housekeeping
    peer_liveness: int = 4  # peer heartbeats missed before it counts as gone
    worker_liveness: float = 1.5  # seconds of worker silence before it is purged
    master_timeout: float = 1.5  # seconds without any answer from the attached master
    attach_retry: float = 0.5
    # Tasks held here or on workers per slot: deep enough that a slot freed finds its next task
    # waiting while the master commits more (two Raft rounds away), shallow enough that a
    # balancer failover re-sends little.
    queue_factor: int = 16
    min_queue: int = 64


# Who may speak on which socket (the sender's key's role, cluster.node.keys): workers on the
# workers' socket, the other balancer on the peer link, masters on the links to them (those are
# the servers whose keys this balancer pinned, so a refusal there means a revoked key).
SOCKET_ROLES: dict[str, frozenset[str]] = {WORKERS: frozenset({"worker"}), PEER_IN: frozenset({"balancer"})}
MASTERS_ONLY = frozenset({"master"})


class BalancerCore:
    """One balancer of the pair. ``masters`` are the masters' client endpoints (in socket order);
    ``peer_workers`` is the peer's worker endpoint (where a passive one sends workers)."""

    role = "balancer"

    def __init__(
        self,
        name: str,
        *,
        primary: bool,
        masters: list[str],
        workers_endpoint: str,
        peer_workers: str,
        epoch_base: int,
        options: BalancerOptions = BalancerOptions(),
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.workers_endpoint = workers_endpoint
        self.peer_workers = peer_workers
        self.options = options
        self.counters: dict[str, int] = {}
        self.star = BinaryStar(primary, interval=options.interval, liveness=options.peer_liveness, now=now)
        self.stream = MasterStream(name, masters, timeout=options.master_timeout, retry=options.attach_retry,
                                   counters=self.counters)
        self.registry = Registry(options.worker_liveness)
        self.dispatcher = Dispatcher()
        self.epoch = 0
        self.epoch_base = epoch_base
        self.peer_epoch = 0
        self.peer_seq = 0
        self.orders: dict[tuple[bytes, int], WorkerRequest] = {}  # pending here, by task
        self.routes: dict[bytes, str] = {}  # worker route → name
        self.sent_count: dict[str, int] = {}  # WORKER_REQUESTs sent to a worker since it registered
        self.ack_routes: dict[tuple[bytes, int], bytes] = {}  # results forwarded: who to acknowledge
        self.transitions: list[tuple[float, str]] = []  # (when, why), the newest last
        self.place_due = False
        self.worker_slots: dict[str, int] = {}  # task slots each worker runs (its credit adds a prefetch queue)
        self.worker_output: dict[str, str] = {}  # where each worker serves its tasks' output ("" if nowhere)
        self.beat_due: list[bytes] = []  # routes still to heartbeat this interval (see BEAT_BATCH)
        self.beat_gap = options.interval  # seconds between two slices of them
        self.epoch_raised_at = float("-inf")  # when an ATTACH refused as stale last raised the epoch
        self.waiting_due = 0.0  # when TASK_WAITING is next told to the master
        self.waiting_told = False  # the last one said some wait: the next says so even when none do

    # ---- events ------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, MessageReceived):
            out = self._on_message(event, now)
        elif isinstance(event, TimerFired):
            if event.name != "tick":
                return self._on_timer(event, now)
            out = self._tick(now, event.stimulus_id) + [StartTimer("tick", self.options.interval, event.stimulus_id)]
        elif isinstance(event, Started):
            self.star.peer_expiry = now + self.star.period
            return [Log(logging.INFO, f"balancer {self.name} starts as {self.star.state.name.lower()}", event.stimulus_id),
                    StartTimer("tick", 0.0, event.stimulus_id)]
        else:  # StopRequested and anything else: nothing to do
            return []
        if self.star.serving() and not self.place_due:
            # place and grant once the loop has drained what is waiting (a zero-delay timer fires
            # after the burst): one pass over the workers per burst, not one per message
            self.place_due = True
            out.append(StartTimer("place", 0.0, getattr(event, "stimulus_id", "")))
        return out

    def _on_timer(self, event: TimerFired, now: float) -> list[Effect]:
        """The ``place`` and ``beat`` timers (``tick`` is the housekeeping round)."""
        if event.name == "place":
            self.place_due = False
            if not self.star.serving():
                return []
            return self._place(now, event.stimulus_id) + self._grant(event.stimulus_id)
        if event.name == "beat":
            return self._beat(event.stimulus_id) if self.star.serving() else []
        return []

    def _on_message(self, ev: MessageReceived, now: float) -> list[Effect]:
        m = ev.message
        forbidden = authorise(ev, SOCKET_ROLES.get(ev.socket, MASTERS_ONLY if ev.socket.startswith("m") else None))
        if forbidden:
            return forbidden
        if ev.socket == WORKERS:
            if isinstance(m, WorkerStatus):
                if ev.peer.name and m.name != ev.peer.name:  # a worker key registers only its own name
                    return [self._forbid(ev, f"worker key {ev.peer.name} may not register as {m.name!r}")]
                return self._on_worker_status(ev, m, now)
            if isinstance(m, TaskResult):
                return self._on_result(ev, m, now)
            return [refuse(ev, f"a balancer does not take {type(m).__name__} from workers")]
        if ev.socket == PEER_IN:
            if isinstance(m, PeerState):
                return self._on_peer(m, now, ev.stimulus_id)
            return []
        if ev.socket.startswith("m"):
            return self._on_master(ev, m, now)
        return []

    # ---- the pair ----------------------------------------------------------------------------

    def _on_peer(self, m: PeerState, now: float, cause: str) -> list[Effect]:
        try:
            peer = State(m.state)
        except ValueError:
            self._count("peer_bad_state")
            return [Log(logging.WARNING, f"peer {m.name} sent an unknown Binary Star state {m.state}; ignored", cause)]
        if m.clock_ms >= 0 and not self.star.fresh(m.clock_ms / 1000, m.sequence, now):
            return []  # sent before a cut healed: no newer than silence (balancer.binary_star)
        self.peer_epoch = max(self.peer_epoch, m.epoch)
        if m.workers:
            self.peer_workers = m.workers
        t = self.star.on_peer(peer, now, m.workers_registered, self._registered())
        return self._transition(t, now, cause)

    def _registered(self) -> int:
        return len(self.registry.workers()) if self.star.serving() else 0

    def _transition(self, t: Transition | None, now: float, cause: str) -> list[Effect]:
        if t is None or t.old == t.new:
            return []
        self.transitions.append((now, t.why))
        del self.transitions[:-20]
        out: list[Effect] = [Log(logging.WARNING if t.new == State.PASSIVE and t.old == State.ACTIVE else logging.INFO,
                                 f"{t.old.name.lower()} -> {t.new.name.lower()}: {t.why}", cause)]
        if t.new == State.ACTIVE:
            self.epoch = max(self.epoch_base, self.peer_epoch + 1, self.epoch + 1)
            self.stream.reset()
            out += self._attach(now, cause)
        elif t.old == State.ACTIVE:
            out += self._stand_down(cause)
        return out

    def _stand_down(self, cause: str) -> list[Effect]:
        """This one is passive now: send its workers to the peer and forget the soft state."""
        out: list[Effect] = []
        for w in self.registry.workers():
            out.append(Send(WORKERS, NotLeader(0, self.epoch, self.peer_workers), w.route, cause))
        self.registry = Registry(self.options.worker_liveness)
        self.dispatcher = Dispatcher()
        self.orders.clear()
        self.routes.clear()
        self.sent_count.clear()
        self.worker_slots.clear()
        self.ack_routes.clear()
        self.beat_due = []
        self.stream.reset()
        return out

    def _client_turns(self, now: float, cause: str) -> tuple[bool, list[Effect]]:
        serve, t = self.star.on_client(now, self._registered())
        return serve, self._transition(t, now, cause)

    # ---- workers -----------------------------------------------------------------------------

    def _on_worker_status(self, ev: MessageReceived, m: WorkerStatus, now: float) -> list[Effect]:
        if m.register:
            serve, out = self._client_turns(now, ev.stimulus_id)
            if not serve:
                return out + [Send(WORKERS, NotLeader(0, self.epoch, self.peer_workers), ev.route, ev.stimulus_id)]
            return out + self._register(ev, m, now)
        if not self.star.serving():
            return [Send(WORKERS, NotLeader(0, self.epoch, self.peer_workers), ev.route, ev.stimulus_id)]
        name = self.routes.get(ev.route)
        if name is None or name != m.name:
            return [self._to_worker_error(ev, "not_registered",
                                          f"worker {m.name!r} is not registered with balancer {self.name}; register again")]
        free = m.slots_free - max(0, self.sent_count.get(name, 0) - m.received)
        slots = m.slots_total if 0 < m.slots_total <= MAX_SLOTS else None  # its credit now (worker.prefetch)
        try:
            self.registry.heartbeat(name, now, max(0, free), m.cache_add, m.cache_drop, slots=slots)
        except RegistryError as exc:
            return [self._to_worker_error(ev, exc.code, exc.text)]
        return []

    def _register(self, ev: MessageReceived, m: WorkerStatus, now: float) -> list[Effect]:
        caps, tasks, why = parse_registration(m)
        if why is not None:
            self._count("workers_refused")
            return [Log(logging.WARNING, f"worker registration refused from {m.name or ev.route.hex()}: {why}", ev.stimulus_id),
                    self._to_worker_error(ev, "bad_registration", why)]
        old_name = self.routes.get(ev.route)
        if old_name is not None and old_name != m.name:  # one route, a new name: the old one is gone
            out = self._purge(old_name, "it registered again under another name", ev.stimulus_id)
        else:
            out = []
        free = min(m.slots_free, m.slots_total)
        before = self.registry.get(m.name)
        fences = dict(before.running) if before is not None else {}
        try:
            lost = self.registry.register(m.name, ev.route, caps, m.slots_total, now, free=free,
                                          cached=m.cache_add, running=tasks)
        except RegistryError as exc:
            self._count("workers_refused")
            return out + [Log(logging.WARNING, f"worker registration refused: {exc.text}", ev.stimulus_id),
                          self._to_worker_error(ev, exc.code, exc.text)]
        self._route(ev.route, m.name, moved=before is None or before.route != ev.route)
        self.sent_count[m.name] = 0
        self.worker_slots[m.name] = worker_slots(m)
        self.worker_output[m.name] = worker_output(m)
        for key, fence in tasks.items():  # it runs these (or holds their results): never dispatch them again from here
            order = self.orders.get(key)
            if order is not None and (order.fence_term, order.fence_sequence) > tuple(fence):
                # not the attempt waiting here: the masters recorded the one it reports lost and gave
                # the task a newer token (dropping this order left it to no one: the chaos soak)
                continue
            if self.dispatcher.remove(*key):
                self.orders.pop(key, None)
                self._count("pending_found_running")
        out += self._report_lost(m.name, {k: fences[k] for k in lost if k in fences}, "it restarted", ev.stimulus_id)
        out.append(Log(logging.INFO, f"worker {m.name} registered: takes {m.slots_total} tasks at once (slots + prefetch), {caps.cores} cores, "
                                     f"{len(tasks)} running, {len(m.cache_add)} cached files", ev.stimulus_id))
        out.append(Send(WORKERS, Heartbeat(self.epoch, 0, 1), ev.route, ev.stimulus_id))
        return out

    def _route(self, route: bytes, name: str, *, moved: bool) -> None:
        """``name`` registered from ``route``; ``moved``: from a route new for that name."""
        if moved:
            # a new route for this name: drop the others it had. Only then: every route change
            # goes through here, so a re-registration from the same route has none to drop, and
            # the scan (over every route) made a re-registration storm quadratic
            for other, known in list(self.routes.items()):
                if known == name and other != route:
                    del self.routes[other]
        self.routes[route] = name

    def _forbid(self, ev: MessageReceived, detail: str) -> Forbidden:
        self._count("forbidden")
        return Forbidden(ev.socket, ev.route, type(ev.message).__name__, ev.peer, detail, ev.stimulus_id)

    def _on_result(self, ev: MessageReceived, m: TaskResult, now: float) -> list[Effect]:
        name = self.routes.get(ev.route)
        key = (join128(m.job_uuid_upper, m.job_uuid_lower), m.task_id)
        runners = self.registry.runners(key)
        if ev.peer.name and runners and ev.peer.name not in runners:
            # a result counts only from the worker its attempt was sent to. One this balancer has
            # not seen sent (it took over since) goes on: the master checks its fence.
            return [self._forbid(ev, f"task {key[0].hex()}/{key[1]} runs on {', '.join(sorted(runners))}, "
                                     f"not on {ev.peer.name}")]
        if name is not None:
            self.registry.finished(name, key, (m.fence_term, m.fence_sequence))
        else:
            self._count("results_from_unregistered")
        self.ack_routes[key] = ev.route
        if not self.star.serving() or not self.stream.link.attached:
            self._count("results_held_back")  # the worker resends it; the master is not reachable now
            return []
        self._count("results_forwarded")
        forwarded = TaskResult(m.job_uuid_upper, m.job_uuid_lower, m.task_id, m.fence_term, m.fence_sequence,
                               m.outcome, m.exit_code, m.summary, m.result_file, m.error,
                               name or ev.peer.name or m.worker, m.files)
        return [self.stream.send(forwarded, ev.stimulus_id)]

    def _to_worker_error(self, ev: MessageReceived, code: str, text: str) -> Effect:
        return Send(WORKERS, Error(0, int(AppReason.REFUSED), ev.message.code, text, {"code": code}), ev.route, ev.stimulus_id)

    def _purge(self, name: str, why: str, cause: str) -> list[Effect]:
        w = self.registry.remove(name)
        if w is None:
            return []
        self.sent_count.pop(name, None)
        self.worker_slots.pop(name, None)
        self.worker_output.pop(name, None)
        return self._report_lost(name, dict(w.running), why, cause)

    def _report_lost(self, name: str, lost: dict[tuple[bytes, int], tuple[int, int]], why: str, cause: str) -> list[Effect]:
        """Tell the master that ``name``'s tasks ended without a result: a LOST attempt each,
        under the fence each ran with (the ledger retries them up to the job's limit)."""
        if not lost:
            return []
        self._count("tasks_lost", len(lost))
        out: list[Effect] = [Log(logging.WARNING, f"worker {name}: {len(lost)} task(s) lost ({why}); the masters retry them", cause)]
        if not self.stream.link.attached:
            return out  # the next leader sends them again as open assignments
        for key, fence in sorted(lost.items()):
            upper, lower = split128(key[0])
            result = TaskResult(upper, lower, key[1], fence[0], fence[1], LOST, -1, {}, None,
                                f"worker {name} was lost while running it ({why})", name)
            out.append(self.stream.send(result, cause))
        return out

    # ---- masters (the stream itself is balancer.masters) ---------------------------------------

    def _attach_ask(self) -> int:
        """The credit an ATTACH grants: what the queue lacks now."""
        return max(0, self._target() - self._holding())

    def _attach(self, now: float, cause: str) -> list[Effect]:
        return self.stream.attach(now, self.epoch, self._attach_ask(), cause)

    def _on_master(self, ev: MessageReceived, m: Any, now: float) -> list[Effect]:
        if not self.stream.accepts(ev.socket) or not self.star.serving():
            if isinstance(m, WorkerRequest):
                self._count("requests_from_other_master")
            return []
        self.stream.heard(now)
        if isinstance(m, WorkerRequest):
            return self._on_request(ev, m, now)
        if isinstance(m, ResultAck):
            return self._route_acks(m, ev.stimulus_id)
        if isinstance(m, Error) and m.refers_to == TaskResult.code:
            return self._on_result_refused(ev, m)
        if isinstance(m, Error) and m.refers_to == Attach.code and isinstance(m.detail, dict) \
                and m.detail.get("code") == "stale_balancer":
            return self._outbid(m, now, ev.stimulus_id)
        return self.stream.on_message(m, now, self.epoch, self._attach_ask(), ev.stimulus_id)

    def _outbid(self, refusal: Error, now: float, cause: str) -> list[Effect]:
        """The masters refused ATTACH: another balancer attached with a newer epoch (it was
        active while this one was cut off, and has stood down since, as Binary Star says). This
        one is the active one now, so it takes an epoch above theirs and attaches again, rather
        than be refused forever (the wedge seen after a heal). At most once per EPOCH_RAISE_S:
        in a split where both are active, the masters' fencing keeps every result once, and the
        two take turns with the stream, not a storm of ATTACHes, until the split heals."""
        theirs = refusal.detail.get("epoch")
        if not isinstance(theirs, int) or isinstance(theirs, bool) or theirs < self.epoch:
            return self.stream.on_message(refusal, now, self.epoch, self._attach_ask(), cause)
        if self._yielding(now):
            self.stream.link.attached = False
            return []  # the peer took over with the workers: this one stands down at its next heartbeat
        if now - self.epoch_raised_at < EPOCH_RAISE_S:
            self.stream.link.attached = False
            return []  # the stream's tick retries ATTACH after attach_retry
        self.epoch_raised_at = now
        self.epoch = theirs + 1
        self._count("epoch_raised")
        self.stream.reset()
        return [Log(logging.WARNING, f"the masters hold a newer balancer epoch ({theirs}): attaching with {self.epoch}",
                    cause)] + self._attach(now, cause)

    def _yielding(self, now: float) -> bool:
        """No worker is registered here and the peer is heard: this one does not take the stream
        from the masters' newer attachment. Either the peer took over with the workers (this one
        stands down at its next heartbeat) or the workers are on their way here (they register,
        and the next refusal outbids). Outbidding now would only make the two take turns."""
        return self._registered() == 0 and self.star.peer_alive(now)

    def _route_acks(self, m: ResultAck, cause: str) -> list[Effect]:
        """Each acknowledgement to the worker that sent the result, one message per worker."""
        by_route: dict[bytes, list[tuple]] = {}
        for ack in m.acks():
            route = self.ack_routes.pop((join128(ack[0], ack[1]), ack[2]), None)
            if route is None:
                self._count("acks_unroutable")
                continue
            by_route.setdefault(route, []).append(ack)
        return [Send(WORKERS, ResultAck(*acks[0], [list(a) for a in acks[1:]]), route, cause)
                for route, acks in by_route.items()]

    def _on_result_refused(self, ev: MessageReceived, m: Error) -> list[Effect]:
        """The master refused a result: for good (the worker drops it) unless its outcome is
        unknown (the worker resends it)."""
        job = m.detail.get("job") if isinstance(m.detail, dict) else None
        task = m.detail.get("task_id") if isinstance(m.detail, dict) else None
        if m.reason == AppReason.OUTCOME_UNKNOWN:
            return []  # the worker resends it
        try:
            key = (bytes.fromhex(job), int(task))
        except (TypeError, ValueError):
            return [Log(logging.WARNING, f"master refused a result: {m.text}", ev.stimulus_id)]
        route = self.ack_routes.pop(key, None)
        self._count("results_refused")
        out: list[Effect] = [Log(logging.WARNING, f"master refused the result of task {job}/{task}: {m.text}", ev.stimulus_id)]
        if route is not None:  # final: the worker drops it
            out.append(Send(WORKERS, m, route, ev.stimulus_id))
        return out

    def _on_request(self, ev: MessageReceived, m: WorkerRequest, now: float) -> list[Effect]:
        self.stream.charge()
        job = join128(m.job_uuid_upper, m.job_uuid_lower)
        key = (job, m.task_id)
        fence = (m.fence_term, m.fence_sequence)
        running = self.registry.newest_fence(key)
        if running is not None and tuple(running[1]) >= fence:
            self._count("requests_already_running")
            return []
        need, priority, why = need_of(m)
        if why is not None:
            self._count("tasks_refused")
            upper, lower = m.job_uuid_upper, m.job_uuid_lower
            fail = TaskResult(upper, lower, m.task_id, m.fence_term, m.fence_sequence, FAILED, -1, {}, None,
                              f"the task cannot be placed: {why}", self.name)
            return [Log(logging.WARNING, f"task {job.hex()}/{m.task_id} refused: {why}", ev.stimulus_id),
                    self.stream.send(fail, ev.stimulus_id)]
        old = self.orders.get(key)
        if old is not None:
            if (old.fence_term, old.fence_sequence) >= fence:
                self._count("requests_duplicate")
                return []
            self.dispatcher.remove(job, m.task_id)
        task = Task(job, m.task_id, fence, need, tuple(m.input_files), (), priority)
        try:
            self.dispatcher.add(task, now)
        except DispatchError as exc:
            self._count("tasks_refused")
            return [Log(logging.WARNING, f"task {job.hex()}/{m.task_id} not queued: {exc.text}", ev.stimulus_id)]
        self.orders[key] = m
        return []

    # ---- placing and credit ------------------------------------------------------------------

    def _place(self, now: float, cause: str) -> list[Effect]:
        if not self.dispatcher.pending() or not self.stream.link.attached:
            return []
        last = self.dispatcher.last_place_at
        if last is not None and now - last < self.options.interval and not self.registry.free_total():
            # No worker has credit: nothing can go, and a round would only refresh the waiting
            # tasks' stories at the cost of a pass over every worker (1.5 ms with 1,000). Once
            # an interval keeps the stories fresh; not after every burst of messages.
            return []
        out: list[Effect] = []
        for p in self.dispatcher.place(self.registry, now):
            order = self.orders.pop(p.task.key, None)
            w = self.registry.get(p.worker_name)
            if order is None or w is None:
                continue
            self.sent_count[w.name] = self.sent_count.get(w.name, 0) + 1
            out.append(Send(WORKERS, order, w.route, cause))
        self._count("placed", len(out))
        return out

    def _target(self) -> int:
        slots = self.registry.slots_total
        return max(self.options.min_queue, self.options.queue_factor * slots) if slots else 0

    def _holding(self) -> int:
        return self.dispatcher.pending() + self.registry.running_total

    def _grant(self, cause: str) -> list[Effect]:
        return self.stream.grant(self._target(), self._holding(), self.epoch, cause)

    # ---- housekeeping ------------------------------------------------------------------------

    def _tick(self, now: float, cause: str) -> list[Effect]:
        self.peer_seq += 1
        out: list[Effect] = [Send(PEER_OUT, PeerState(int(self.star.heartbeat()), self.epoch, self.peer_seq,
                                                      self.name, self.workers_endpoint, self._registered(),
                                                      int(now * 1000)),
                                  None, cause)]
        if not self.star.serving():
            return out
        out += self._expire(now, cause)
        # Slices still due from the last interval (the loop ran late) go now, whole: dropping them
        # would leave the same workers, the last by name, unheard interval after interval until
        # they gave this balancer up. The new round's slices end half-way through the interval.
        late = self.beat_due
        self.beat_due = [w.route for w in self.registry.workers()]
        self.beat_gap = self.options.interval / (2 * max(1, -(-len(self.beat_due) // BEAT_BATCH)))
        beat = Heartbeat(self.epoch, self.peer_seq, 0)
        out += [Send(WORKERS, beat, route, cause) for route in late if route in self.routes]
        out += self._beat(cause)
        out += self.stream.tick(now, self.epoch, self._attach_ask(), cause)
        return out + self._tell_waiting(now, cause)

    def _tell_waiting(self, now: float, cause: str) -> list[Effect]:
        """Once a second, the master hears which tasks wait here and why, so that `cluster jobs`
        says "waiting: no worker has 64 cores (the most is 2)" rather than "running"."""
        if not self.stream.link.attached or now < self.waiting_due:
            return []
        self.waiting_due = now + WAITING_EVERY_S
        total, rows = self.dispatcher.waiting()
        if not total and not self.waiting_told:
            return []
        self.waiting_told = total > 0
        return [self.stream.send(TaskWaiting(total, [[job, n, why] for job, n, why in rows]), cause)]

    def _expire(self, now: float, cause: str) -> list[Effect]:
        """Purge the workers silent for longer than ``worker_liveness``; report their tasks lost."""
        expired = self.registry.expire(now)
        if expired:  # one pass over the routes for all of them, not one per worker
            gone = {w.name for w, _ in expired}
            for route in [r for r, n in self.routes.items() if n in gone]:
                del self.routes[route]
        out: list[Effect] = []
        for w, lost in expired:
            self.sent_count.pop(w.name, None)
            self.worker_slots.pop(w.name, None)
            self.worker_output.pop(w.name, None)
            out += self._report_lost(w.name, {k: w.running[k] for k in lost},
                                     f"silent for more than {self.options.worker_liveness:g} s", cause)
        return out

    def _beat(self, cause: str) -> list[Effect]:
        """Heartbeat the next ``BEAT_BATCH`` workers of this interval; the rest after a pause, so
        that every worker still hears from this balancer once per interval (Paranoid Pirate)."""
        due, self.beat_due = self.beat_due[:BEAT_BATCH], self.beat_due[BEAT_BATCH:]
        beat = Heartbeat(self.epoch, self.peer_seq, 0)
        out: list[Effect] = [Send(WORKERS, beat, route, cause) for route in due if route in self.routes]
        if self.beat_due:
            out.append(StartTimer("beat", self.beat_gap, cause))
        return out

    # ---- operators ---------------------------------------------------------------------------

    def story(self, job: bytes, task: int) -> str:
        """Where a task went and why, or why it waits (see ``Dispatcher.story``)."""
        return self.dispatcher.story(job, task)

    def status(self, now: float) -> dict[str, Any]:
        waiting = []
        for key in list(self.orders)[:10]:
            waiting.append({"task": f"{key[0].hex()}/{key[1]}", "story": self.dispatcher.story(*key)})
        return {
            "name": self.name,
            "state": self.star.state.name.lower(),
            "epoch": self.epoch,
            "star": self.star.status(now),
            "master": self.stream.status(),
            "registry": self.registry.status(),
            "dispatch": self.dispatcher.status(),
            "workers": [self._worker_status(w, now) for w in self.registry.workers()],
            "waiting": waiting,
            "transitions": [{"at": at, "why": why} for at, why in self.transitions[-5:]],
            "core": dict(self.counters),
        }

    def _worker_status(self, w: Worker, now: float) -> dict[str, Any]:
        slots = self.worker_slots.get(w.name, w.slots)
        return {"name": w.name, "slots": slots, "credit": w.slots, "credit_free": w.free, "free": w.free_slots(slots),
                "running": len(w.running),
                "cached": len(w.cached), "silent_s": round(now - w.last_heard, 3),
                "cores": w.caps.cores, "memory_mb": w.caps.memory_mb, "gpus": w.caps.gpus,
                "labels": sorted(w.caps.labels), "kernel": w.caps.kernel, "output": self.worker_output.get(w.name, "")}

    def validate_state(self) -> None:
        self.star.validate_state()
        self.stream.validate_state()
        self.registry.validate_state()
        self.dispatcher.validate_state()
        assert len(self.orders) == self.dispatcher.pending(), "every order waits in the dispatcher, and only those"
        assert all(self.dispatcher.story(*k).startswith("waiting") for k in self.orders)
        assert set(self.routes.values()) <= {w.name for w in self.registry.workers()}
        if not self.star.serving():
            assert not self.registry.workers() and not self.orders

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
