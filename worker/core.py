"""The worker core: registration, heartbeats, credit, fencing and results, without I/O.

Theory of operation
-------------------
A worker talks to one balancer of the pair at a time (zguide's Binary Star client): it
registers (WORKER_STATUS with ``register``: capabilities, slots, the tasks it still runs or
holds results of, its cache) and from then on heartbeats every ``interval`` with its free slots
(its credit) and the cache changes. The balancer heartbeats back (Paranoid Pirate). When the
balancer has been silent for ``liveness`` seconds, or answers NOT_LEADER (it is passive), the
worker turns to the other one and registers there; that is what lets a passive balancer take
over, and only then.

Tasks (WORKER_REQUEST) become ``RunTask`` effects, at most one per slot; the loop runs them and
reports ``TaskEnded``. A task with a time limit is reported ``TaskTimed`` when it begins; the
core times it and asks for ``StopTask`` (SIGTERM, then SIGKILL) if it is still running then.
Fencing: a request whose token is older than the newest this worker has seen for that task is
refused (a deposed leader's); a task already running here is not started twice, and one whose
result is waiting for its acknowledgement gets that result again instead of a second run.

Credit and prefetch. The credit a worker announces is its slots plus a prefetch queue, so a
slot that frees starts the next task at once instead of waiting for a round trip to the
balancer; a request beyond that (it should not happen: credit) waits in the same queue rather
than being dropped. The queue is fixed (``WorkerIdentity.prefetch``) or adapts between that and
``prefetch_max`` to the tasks' duration and the dispatch round trip (worker.prefetch): short
tasks behind a slow round trip get a deep queue, long ones keep the small one. Every heartbeat
states the credit of the moment (``slots_total``); a queue that grew is announced at once.

Results are kept until RESULT_ACK (the master committed them) or a final refusal, and sent
again every ``result_retry`` seconds and after every registration, so a result survives the
death of a balancer or of the master leader. Recording is exactly-once in the ledger; sending
is at-least-once here.

Each step a task takes here goes into a bounded log with its stimulus id (received under a
fence, refused, queued, started, ended, result sent, acknowledged), so ``story(job, task)``
tells what this worker did with it (dask's ``Worker.story``); the master's ``story`` tells the
rest.

Pure: no sockets, clocks, threads or disk; ``now`` comes with each event. Sockets: ``b0`` and
``b1``, DEALERs connected to the two balancers.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cluster.node.events import (
    READERS,
    CancelTimer,
    Effect,
    Event,
    Forbidden,
    Log,
    MessageReceived,
    Refuse,
    Send,
    Started,
    StartTimer,
    StopRequested,
    TimerFired,
    authorise,
)
from proto.ids import join128, split128
from proto.errors import AppReason
from proto.messages import (Error, Heartbeat, NotLeader, Outcome, OutputFollow, OutputLines, ResultAck, TaskResult,
                            WorkerRequest, WorkerStatus)
from worker.output import Outputs
from worker.prefetch import Prefetch

RUNNING, ENDED, NOT_HERE = 0, 1, 2  # OUTPUT_LINES' status

TaskKey = tuple[bytes, int]
Fence = tuple[int, int]

STORY_KEPT = 8_192  # task steps the worker remembers (about the last 1,500 tasks' lives)
STOP_TIMERS = ("term ", "kill ")  # timer names of a task's time limit: SIGTERM, then SIGKILL


def balancer_socket(index: int) -> str:
    return f"b{index}"


@dataclass(frozen=True, slots=True)
class RunTask:
    """Effect: run ``request`` on a free slot; the loop posts ``TaskEnded`` when it is over."""

    request: WorkerRequest
    cause: str = ""


@dataclass(frozen=True, slots=True)
class TaskEnded:
    """Event: a task ran. Fields as in TASK_RESULT; ``cached`` are files now in the cache."""

    job: bytes
    task: int
    fence: Fence
    outcome: int
    exit_code: int
    summary: dict[str, Any]
    result_file: bytes | None
    error: str | None
    files: list[list[Any]]
    cached: tuple[bytes, ...]
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class TaskTimed:
    """Event: the task ``job``/``task`` began on a slot with a time limit: if it still runs
    ``term_after`` seconds from now, stop it (SIGTERM; None: no such step), and kill it (SIGKILL)
    ``kill_after`` seconds from now."""

    job: bytes
    task: int
    term_after: float | None
    kill_after: float
    stimulus_id: str = "timed"


@dataclass(frozen=True, slots=True)
class StopTask:
    """Effect: the running task ``job``/``task`` is past its time limit: SIGTERM its processes,
    or SIGKILL them when ``final``; its ``TaskEnded`` follows as it dies."""

    job: bytes
    task: int
    final: bool
    cause: str = ""


@dataclass(frozen=True, slots=True)
class OutputRead:
    """Event: the task ``job``/``task`` wrote ``data`` to ``stream`` (1 stdout, 2 stderr), read at
    ``at`` (Unix seconds) by the loop (worker.output)."""

    job: bytes
    task: int
    stream: int
    data: bytes
    at: float
    stimulus_id: str = "output"


@dataclass(frozen=True)
class WorkerOptions:
    interval: float = 0.25  # heartbeats
    liveness: float = 1.0  # balancer silence before turning to the other one
    result_retry: float = 2.0  # an unacknowledged result is sent again this often


@dataclass
class _Running:
    request: WorkerRequest
    fence: Fence
    started: float
    timed: bool = False  # its stop timers are set


@dataclass
class _Held:
    result: TaskResult
    sent_at: float


@dataclass
class WorkerIdentity:
    """What the worker announces when it registers."""

    name: str
    slots: int
    cores: int
    memory_mb: int = 0
    gpus: int = 0
    labels: list[str] = field(default_factory=list)
    kernel: str = ""
    # Tasks held ready beyond the slots (Celery's prefetch, Dask's ready queue): a slot that
    # frees starts its next task at once instead of waiting a round trip to the balancer.
    prefetch: int = 0
    output: str = ""  # where followers ask for its tasks' output (its control port), "" if nowhere
    # Above ``prefetch``: the queue adapts between the two to the tasks' length and the round
    # trip (module docstring); at or below it, the queue is ``prefetch``, fixed.
    prefetch_max: int = 0

    @property
    def credit(self) -> int:
        """Tasks this worker takes at once at first: its slots and its (smallest) prefetch queue."""
        return self.slots + self.prefetch


BALANCERS_ONLY = frozenset({"balancer"})  # who may send a worker tasks, acks and heartbeats


class WorkerCore:
    """One worker's protocol logic."""

    role = "worker"

    def __init__(self, me: WorkerIdentity, balancers: int, options: WorkerOptions = WorkerOptions(),
                 cached: tuple[bytes, ...] = (), wall_offset: float = 0.0) -> None:
        if balancers not in (1, 2):
            raise ValueError("a worker talks to one balancer or a pair")
        self.me = me
        self.balancers = balancers
        self.options = options
        self.current = 0
        self.registered = False
        self.register_sent: float | None = None
        self.last_heard = 0.0
        self.received = 0
        self.running: dict[TaskKey, _Running] = {}
        self.queued: deque[WorkerRequest] = deque()
        self.queued_keys: set[TaskKey] = set()  # of ``queued``: a deep prefetch queue is searched per request
        self.held: dict[TaskKey, _Held] = {}  # results awaiting RESULT_ACK
        self.newest: dict[TaskKey, Fence] = {}  # newest token seen per live task
        self.cached: set[bytes] = set(cached)
        self.cache_added: list[bytes] = []
        self.status_due = False
        self.epoch = 0
        self.counters: dict[str, int] = {}
        self.log: deque[tuple[TaskKey, str, float, str, dict[str, Any]]] = deque(maxlen=STORY_KEPT)
        self.outputs = Outputs()  # the running tasks' output lines, for followers (worker.output)
        self.prefetch = Prefetch(me.slots, me.prefetch, me.prefetch_max)
        self.wall_offset = wall_offset  # Unix time less the loop's clock: when an output ended

    # ---- events ------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, MessageReceived):
            return self._on_message(event, now)
        if isinstance(event, TaskEnded):
            return self._on_ended(event, now)
        if isinstance(event, OutputRead):
            self.outputs.feed((event.job, event.task), event.stream, event.data, event.at)
            return []
        if isinstance(event, TaskTimed):
            return self._on_timed(event)
        if isinstance(event, TimerFired):
            if event.name.startswith(STOP_TIMERS):
                return self._on_time_up(event, now)
            if event.name == "tick":
                return self._tick(now, event.stimulus_id) + [StartTimer("tick", self.options.interval, event.stimulus_id)]
            if event.name == "status":
                self.status_due = False
                return self._heartbeat(event.stimulus_id) if self.registered else []
            return []
        if isinstance(event, Started):
            self.last_heard = now
            return self._register(now, event.stimulus_id) + [StartTimer("tick", self.options.interval, event.stimulus_id)]
        if isinstance(event, StopRequested):
            return []
        return []

    def _on_message(self, ev: MessageReceived, now: float) -> list[Effect]:
        m = ev.message
        if ev.socket == "control":  # STATUS_QUERY (answered by the loop) and OUTPUT_FOLLOW come here
            if isinstance(m, OutputFollow):
                return self._on_follow(ev, m)
            return [Refuse(ev.socket, ev.route, m.code, getattr(m, "request_id", 0),
                           f"a worker's control socket answers STATUS_QUERY and OUTPUT_FOLLOW only, not {type(m).__name__}",
                           ev.stimulus_id)]
        # the balancers' keys are pinned by this worker: a refusal here means one was revoked
        forbidden = authorise(ev, BALANCERS_ONLY)
        if forbidden:
            return forbidden
        from_current = ev.socket == balancer_socket(self.current)
        if from_current:
            self.last_heard = now
        if isinstance(m, WorkerRequest):
            return self._on_request(ev, m, now)
        if isinstance(m, ResultAck):
            for upper, lower, task, term, seq in m.acks():
                key = (join128(upper, lower), task)
                if self.held.pop(key, None) is not None:
                    self.newest.pop(key, None)
                    self._count("results_acked")
                    self._note(key, "acked", now, ev.stimulus_id, fence=[term, seq])
            return []
        if isinstance(m, Heartbeat):
            if from_current and m.reply == 1 and not self.registered:
                return self._on_registered(m, now, ev.stimulus_id)
            return []
        if isinstance(m, NotLeader):
            if not from_current:
                return []
            self._count("redirected")
            self.registered = False
            self.current = (self.current + 1) % self.balancers
            self.register_sent = None  # register with the other at the next tick
            return [Log(logging.INFO, f"balancer {self.current ^ 1 if self.balancers == 2 else 0} is passive; "
                                      f"turning to balancer {self.current}", ev.stimulus_id)]
        if isinstance(m, Error):
            return self._on_error(ev, m, now)
        return [Refuse(ev.socket, ev.route, m.code, 0, f"a worker does not take {type(m).__name__}", ev.stimulus_id)]

    def _on_error(self, ev: MessageReceived, m: Error, now: float) -> list[Effect]:
        detail = m.detail if isinstance(m.detail, dict) else {}
        code = detail.get("code", "")
        if code == "not_registered":
            self.registered = False
            return self._register(now, ev.stimulus_id)
        if m.refers_to == TaskResult.code and "task_id" in detail and "job" in detail:
            try:
                key = (bytes.fromhex(detail["job"]), int(detail["task_id"]))
            except (TypeError, ValueError):
                key = None
            if key is not None and self.held.pop(key, None) is not None:
                self.newest.pop(key, None)
                self._count("results_refused")
                self._note(key, "refused", now, ev.stimulus_id, code=code, text=m.text)
                return [Log(logging.WARNING, f"result of {detail['job']}/{detail['task_id']} refused for good: {m.text}",
                            ev.stimulus_id)]
            return []
        if m.refers_to == WorkerStatus.code:
            self._count("registration_refused")
            self.registered = False
            return [Log(logging.ERROR, f"the balancer refused this worker: {m.text}", ev.stimulus_id)]
        return [Log(logging.WARNING, f"balancer error: {m.text}", ev.stimulus_id)]

    # ---- registration and heartbeats -----------------------------------------------------------

    def _register(self, now: float, cause: str) -> list[Effect]:
        self.register_sent = now
        self.registered = False
        self.prefetch.forget_returned()
        me = self.me
        tasks = [[k[0], k[1], r.fence[0], r.fence[1]] for k, r in self.running.items()]
        tasks += [[k[0], k[1], h.result.fence_term, h.result.fence_sequence] for k, h in self.held.items() if k not in self.running]
        status = WorkerStatus(
            self._credit(), self._free(), 0, len(self.running), list(me.labels),
            {"cores": me.cores, "memory_mb": me.memory_mb, "gpus": me.gpus, "kernel": me.kernel, "slots": me.slots,
             **({"output": me.output} if me.output else {})},
            me.name, True, 0, tasks, sorted(self.cached), [],
        )
        self._count("registrations_sent")
        return [Send(balancer_socket(self.current), status, None, cause)]

    def _on_registered(self, m: Heartbeat, now: float, cause: str) -> list[Effect]:
        self.registered = True
        self.received = 0
        self.cache_added.clear()  # the registration carried the whole cache
        self.epoch = m.epoch
        self._count("registered")
        out: list[Effect] = [Log(logging.INFO, f"registered with balancer {self.current} (epoch {m.epoch}); "
                                               f"{len(self.running)} running, {len(self.held)} results to resend", cause)]
        for key, held in self.held.items():
            held.sent_at = now
            out.append(Send(balancer_socket(self.current), held.result, None, cause))
            self._note(key, "result_resent", now, cause, balancer=self.current, why="registered")
        return out

    def _heartbeat(self, cause: str) -> list[Effect]:
        me = self.me
        added, self.cache_added = self.cache_added, []
        status = WorkerStatus(self._credit(), self._free(), 0, len(self.running), [], {}, me.name, False,
                              self.received, [], added, [])
        return [Send(balancer_socket(self.current), status, None, cause)]

    def _tick(self, now: float, cause: str) -> list[Effect]:
        out: list[Effect] = []
        if self.registered and now - self.last_heard > self.options.liveness:
            self._count("balancer_silent")
            old = self.current
            self.current = (self.current + 1) % self.balancers
            out.append(Log(logging.WARNING, f"balancer {old} silent for {now - self.last_heard:.1f} s; "
                                            f"turning to balancer {self.current}", cause))
            self.last_heard = now
            return out + self._register(now, cause)
        if not self.registered:
            if self.register_sent is None or now - self.register_sent >= self.options.interval:
                if self.register_sent is not None and now - self.last_heard > self.options.liveness:
                    # no answer at all from this one: it may be down, try the other
                    self.current = (self.current + 1) % self.balancers
                    self.last_heard = now
                out += self._register(now, cause)
            return out
        out += self._adapt(now, cause, shrink=True)  # told at once, in the heartbeat below
        out += self._heartbeat(cause)
        for key, held in self.held.items():
            if now - held.sent_at >= self.options.result_retry:
                held.sent_at = now
                self._count("results_resent")
                out.append(Send(balancer_socket(self.current), held.result, None, cause))
                self._note(key, "result_resent", now, cause, balancer=self.current, why="not acknowledged")
        return out

    # ---- tasks -------------------------------------------------------------------------------

    def _on_request(self, ev: MessageReceived, m: WorkerRequest, now: float) -> list[Effect]:
        key = (join128(m.job_uuid_upper, m.job_uuid_lower), m.task_id)
        fence = (m.fence_term, m.fence_sequence)
        self.received += 1
        self.prefetch.task_received(now)
        self._note(key, "received", now, ev.stimulus_id, fence=list(fence), balancer=self.current)
        newest = self.newest.get(key)
        if newest is not None and fence < newest:
            self._count("stale_requests")
            self._note(key, "refused", now, ev.stimulus_id, code="stale_fence", newest=list(newest))
            self.status_due = True
            return [Log(logging.WARNING, f"task {key[0].hex()}/{key[1]} refused: token {fence} is older than {newest}",
                        ev.stimulus_id)] + self._status_soon(ev.stimulus_id)
        self.newest[key] = fence if newest is None else max(newest, fence)
        if key in self.running or key in self.queued_keys:
            self._count("duplicate_requests")
            self._note(key, "duplicate", now, ev.stimulus_id)
            if key in self.running and self.running[key].fence < fence:
                # The run under way is now this token's attempt: its result goes out under it (the
                # older token's attempt was recorded lost, so a result under that one is refused)
                self.running[key].fence = fence
            return self._status_soon(ev.stimulus_id)
        held = self.held.get(key)
        if held is not None and (held.result.fence_term, held.result.fence_sequence) < fence:
            # The masters recorded the attempt whose result is held as lost (this worker was cut
            # off or silent) and gave the task a newer token, here: that result will be refused as
            # stale, and resending it would leave the new attempt to no one (seen in the chaos
            # soak: units pending until their lease ran out). Run the task again instead.
            del self.held[key]
            self._count("held_superseded")
            self._note(key, "superseded", now, ev.stimulus_id, fence=[held.result.fence_term, held.result.fence_sequence])
            held = None
        if held is not None:  # ran here already; its result is on its way: send it again
            self._count("results_resent")
            self._note(key, "result_resent", now, ev.stimulus_id, balancer=self.current, why="asked again")
            held.sent_at = now
            return [Send(balancer_socket(self.current), held.result, None, ev.stimulus_id)] + self._status_soon(ev.stimulus_id)
        if len(self.running) >= self.me.slots:
            if len(self.queued) >= self.prefetch.depth:
                self._count("queued_beyond_credit")
            self.queued.append(m)
            self.queued_keys.add(key)
            self._note(key, "queued", now, ev.stimulus_id, ahead=len(self.queued) - 1)
            return []
        return self._start(m, now, ev.stimulus_id, key)

    def _on_follow(self, ev: MessageReceived, m: OutputFollow) -> list[Effect]:
        """A task's output lines, to its owner, an operator or a monitor (worker.output)."""
        forbidden = authorise(ev, READERS)
        if forbidden:
            return forbidden
        ring = self.outputs.find((join128(m.job_uuid_upper, m.job_uuid_lower), m.task_id))
        if ring is None:
            return [Send(ev.socket, OutputLines(m.request_id, m.after, 0, NOT_HERE, []), ev.route, ev.stimulus_id)]
        if ev.peer.role in ("client", "gateway") and ev.peer.name != ring.owner:
            error = Error(m.request_id, int(AppReason.REFUSED), m.code, "the task belongs to another key; only its owner "
                          "or an operator may follow its output", {"code": "not_owner"})
            return [Forbidden(ev.socket, ev.route, "OutputFollow", ev.peer, "a task not its own", ev.stimulus_id, error)]
        lines, nxt, dropped = ring.read(m.after)
        status = ENDED if ring.ended and nxt >= ring.next_seq - 1 else RUNNING
        return [Send(ev.socket, OutputLines(m.request_id, nxt, dropped, status, lines), ev.route, ev.stimulus_id)]

    def _start(self, m: WorkerRequest, now: float, cause: str, key: TaskKey | None = None) -> list[Effect]:
        key = key or _key_of(m)
        self.running[key] = _Running(m, (m.fence_term, m.fence_sequence), now)
        owner = m.arguments.get("owner") if isinstance(m.arguments, dict) else None
        self.outputs.start(key, owner if isinstance(owner, str) else "")
        self._count("tasks_started")
        # which slot runs it is the loop's affair (a free slot thread takes it); the core knows how many are busy
        self._note(key, "started", now, cause, fence=[m.fence_term, m.fence_sequence], kind=m.kind,
                   running=len(self.running), slots=self.me.slots)
        return [RunTask(m, cause)]

    def _on_ended(self, ev: TaskEnded, now: float) -> list[Effect]:
        key = (ev.job, ev.task)
        ran = self.running.pop(key, None)
        if ran is None:
            self._count("unknown_endings")
            return []
        self.outputs.end(key, now + self.wall_offset)
        self.prefetch.task_ended(now - ran.started)
        self._count("tasks_done" if ev.outcome == Outcome.DONE else "tasks_failed")
        upper, lower = split128(ev.job)
        # a newer token given while it ran or waited in line (see _on_request): the run is that attempt
        fence = max(tuple(ev.fence), tuple(ran.fence), tuple(self.newest.get(key, ev.fence)))
        result = TaskResult(upper, lower, ev.task, fence[0], fence[1], ev.outcome, ev.exit_code, ev.summary,
                            ev.result_file, ev.error, self.me.name, ev.files)
        self.held[key] = _Held(result, now)
        self._note(key, "ended", now, ev.stimulus_id, fence=list(fence), outcome=ev.outcome, exit_code=ev.exit_code,
                   error=ev.error, seconds=round(now - ran.started, 6))
        for fid in ev.cached:
            if fid not in self.cached:
                self.cached.add(fid)
                self.cache_added.append(fid)
        out: list[Effect] = [CancelTimer(f"{step}{key[0].hex()}/{key[1]}", ev.stimulus_id)
                             for step in STOP_TIMERS] if ran.timed else []
        if self.registered:
            # the result is also the credit for the slot it frees (the balancer counts it so);
            # the next heartbeat restates the count, so no extra message per task
            out.append(Send(balancer_socket(self.current), result, None, ev.stimulus_id))
            if len(self.running) + len(self.queued) < self._credit():  # else the balancer keeps it
                self.prefetch.credit_returned(now)
            self._note(key, "result_sent", now, ev.stimulus_id, balancer=self.current)
        else:
            self._note(key, "result_held", now, ev.stimulus_id, why="not registered: sent once registered")
        if self.queued:
            nxt = self.queued.popleft()
            nxt_key = _key_of(nxt)
            self.queued_keys.discard(nxt_key)
            out += self._start(nxt, now, ev.stimulus_id, nxt_key)
        return out + self._adapt(now, ev.stimulus_id, shrink=False)  # grows now, shrinks at a heartbeat

    def _on_timed(self, ev: TaskTimed) -> list[Effect]:
        """A task with a time limit began: its stop timers."""
        key = (ev.job, ev.task)
        ran = self.running.get(key)
        if ran is None:
            return []
        ran.timed = True
        name = f"{key[0].hex()}/{key[1]}"
        out: list[Effect] = [StartTimer(f"{STOP_TIMERS[1]}{name}", ev.kill_after, ev.stimulus_id)]
        if ev.term_after is not None:
            out.append(StartTimer(f"{STOP_TIMERS[0]}{name}", ev.term_after, ev.stimulus_id))
        return out

    def _on_time_up(self, ev: TimerFired, now: float) -> list[Effect]:
        """A running task's time limit (or its grace after SIGTERM) is over: stop it."""
        step, _, name = ev.name.partition(" ")
        job_hex, _, task = name.partition("/")
        try:
            key = (bytes.fromhex(job_hex), int(task))
        except ValueError:
            return []
        if key not in self.running:
            return []
        final = step == STOP_TIMERS[1].strip()
        self._count("tasks_killed" if final else "tasks_stopped")
        self._note(key, "killed" if final else "stopped", now, ev.stimulus_id, why="time limit")
        return [StopTask(key[0], key[1], final, ev.stimulus_id)]

    def _adapt(self, now: float, cause: str, shrink: bool) -> list[Effect]:
        """The prefetch queue set anew; a grown one is announced right after this burst."""
        if not self.prefetch.adaptive:
            return []
        oldest = now - min((r.started for r in self.running.values()), default=now)
        return self._status_soon(cause) if self.prefetch.update(oldest, shrink) else []

    def _status_soon(self, cause: str) -> list[Effect]:
        """A heartbeat with the new credit right after this burst (a zero-delay timer fires once
        the loop has drained what is waiting, so many endings share one message)."""
        if self.status_due or not self.registered:
            return []
        self.status_due = True
        return [StartTimer("status", 0.0, cause)]

    def _credit(self) -> int:
        """Tasks this worker takes at once now: its slots and its prefetch queue."""
        return self.me.slots + self.prefetch.depth

    def _free(self) -> int:
        return max(0, self._credit() - len(self.running) - len(self.queued))

    # ---- operators ---------------------------------------------------------------------------

    def story(self, job: bytes, task: int) -> list[dict[str, Any]]:
        """What this worker did with a task, oldest first, from its bounded log: one dict per
        step with ``step`` (received, refused, duplicate, queued, started, ended, result_sent,
        result_held, result_resent, acked), ``at`` (the worker's clock), ``stimulus_id`` and what
        the step says (``fence``, ``balancer`` index, ``outcome``, ``error``, ...)."""
        key = (job, task)
        return [{"step": step, "at": at, **fields, "stimulus_id": cause}
                for k, step, at, cause, fields in self.log if k == key]

    def status(self, now: float) -> dict[str, Any]:
        return {
            "name": self.me.name,
            "state": "registered" if self.registered else "registering",
            "balancer": self.current,
            "epoch": self.epoch,
            "slots": self.me.slots,
            **self.prefetch.status(),
            "free": max(0, self.me.slots - len(self.running)),  # task slots, never above "slots"
            "credit_free": self._free(),  # what it may still take, its prefetch queue included
            "running": [{"task": f"{k[0].hex()}/{k[1]}", "kind": r.request.kind, "for_s": round(now - r.started, 3)}
                        for k, r in list(self.running.items())[:50]],
            "queued": len(self.queued),
            "results_unacked": len(self.held),
            "cached_files": len(self.cached),
            "capabilities": {"cores": self.me.cores, "memory_mb": self.me.memory_mb, "gpus": self.me.gpus,
                             "labels": list(self.me.labels), "kernel": self.me.kernel},
            "core": dict(self.counters),
        }

    def validate_state(self) -> None:
        assert len(self.running) <= self.me.slots
        assert self.prefetch.floor <= self.prefetch.depth <= self.prefetch.ceiling
        assert all(_key_of(q) not in self.running for q in self.queued)
        assert self.queued_keys == {_key_of(q) for q in self.queued}

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _note(self, key: TaskKey, step: str, now: float, cause: str, **fields: Any) -> None:
        # kept as given: the dict ``story`` shows is made only when someone asks (a step per
        # task event is on the hot path, a story is read rarely)
        self.log.append((key, step, now, cause, fields))


def _key_of(m: WorkerRequest) -> TaskKey:
    return (join128(m.job_uuid_upper, m.job_uuid_lower), m.task_id)
