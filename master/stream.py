"""The balancer stream: the leader hands ready tasks to the attached balancer and hears how they end.

Theory of operation
-------------------
A balancer ATTACHes with its Binary Star epoch and a credit (a newer epoch replaces an older
balancer; an older one is refused). It is told every open assignment again (it matches them
with its workers), then, once the leader serves (its term's ``Barrier`` has committed, Raft §8),
the leader proposes ``AssignTasks`` for ready tasks within the credit (``dispatch``). Each
assignment carries a fencing token (term, sequence) and goes out as WORKER_REQUEST as soon as it
is proposed, with its commit under way (Raft's pipelining; issue 23: it took a quorum round off
every task's latency). That is safe because only the ledger records: the tokens are exactly the
ones the entry assigns (positional: term, first sequence + i), and a task's completion is
proposed after its assignment, so it is applied after it in every log. If the assignment never
commits (this leader is deposed first), the ledger holds no attempt with that token and refuses
the result as stale, and the task stays ready for the next leader: work may run twice, it is
never recorded twice. A task that is no longer ready when its entry commits (cancelled
meanwhile) is skipped by the ledger, and its result refused alike. CREDIT adds to the credit. Completions come back as TASK_RESULT and are acknowledged
with RESULT_ACK once recorded (or found to be duplicates); the acks one commit makes for one
route go out as one message (``merge_acks``).

Every step a task takes here goes into ``TaskLog`` with its stimulus id (sent to the balancer
under its fence once committed at a log index, its result heard from a worker,
recorded at a log index): the leader's side of ``MasterCore.story``. Soft state, bounded: not
in the ledger, not replicated, gone with a restart.

Handlers take ``(event, message, now)`` and return effects; pure, like the core that holds them.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from cluster.node.events import Effect, Log, MessageReceived, Send
from master import views
from master.batching import Batcher
from master.commands import OUTCOMES, AssignTasks, CompleteTask
from master.files import task_files_problem
from master.ledger import Ledger
from master.standing import API, Standing, app_error, app_error_to, refuse
from master.state import Applied
from proto.errors import AppReason
from proto.ids import join128, split128
from master.pending import WaitingBoard
from master.ready import InFlight
from proto.messages import Attach, Attached, Credit, ResultAck, TaskResult, TaskWaiting, WorkerRequest


STORY_KEPT = 16_384  # task events the leader remembers (about the last 4,000 tasks' lives)
STORY_PER_TASK = 64  # a task's story tells at most its newest this many of them


class TaskLog:
    """The leader's recent task events, oldest first, bounded (dask's ``Worker.log``): each a
    step of one task with the wall time, what it says (fence, worker, log index …) and its
    stimulus id.

    Indexed by task: a TASK_QUERY on the leader's one thread reads one task's events, never a
    scan of the whole log (16,384 events cost ~1 ms to scan, on every query). An event is kept
    as a tuple and becomes a dict only when a story is told: ``add`` runs for every task the
    leader dispatches and records, so it stays under a microsecond."""

    def __init__(self, kept: int = STORY_KEPT) -> None:
        self.kept = kept
        self.order: deque[tuple[bytes, int]] = deque()  # whose event each one is, oldest first
        self.by_task: dict[tuple[bytes, int], list[tuple[str, float, str, dict[str, Any]]]] = {}
        self.last_at = 0.0  # the newest time seen, for steps whose handler is given none

    def __len__(self) -> int:
        return len(self.order)

    def add(self, job: bytes, task: int, step: str, at: float | None, cause: str, **fields: Any) -> None:
        if at is None:
            at = self.last_at
        elif at > self.last_at:
            self.last_at = at
        order = self.order
        if len(order) >= self.kept:  # the oldest event is the first of its task's
            oldest = order.popleft()
            events = self.by_task[oldest]
            del events[0]
            if not events:
                del self.by_task[oldest]
        key = (job, task)
        order.append(key)
        event = (step, at, cause, fields)
        events = self.by_task.get(key)
        if events is None:
            self.by_task[key] = [event]
        else:
            events.append(event)

    def of(self, job: bytes, task: int) -> list[dict[str, Any]]:
        """The task's logged steps, oldest first (its newest ``STORY_PER_TASK``)."""
        return [{"step": step, "at": at, **fields, "stimulus_id": cause}
                for step, at, cause, fields in self.by_task.get((job, task), ())[-STORY_PER_TASK:]]


@dataclass
class BalancerLink:
    """The attached balancer: its route, epoch, name, and the tasks it can still take."""

    route: bytes
    epoch: int
    name: str
    credit: int  # tasks it can still take
    sent: int = 0


class BalancerStream:
    """The leader's side of the balancer stream. ``dispatch_max`` tasks per proposal at most."""

    def __init__(self, ledger: Ledger, standing: Standing, batcher: Batcher, dispatch_max: int = 1024,
                 waiting: WaitingBoard | None = None) -> None:
        self.ledger = ledger
        self.waiting = waiting if waiting is not None else WaitingBoard()  # why assigned tasks wait
        self.standing = standing
        self.batcher = batcher
        self.dispatch_max = dispatch_max
        self.balancer: BalancerLink | None = None
        # tasks proposed for assignment, off the ledger's ready index until answered (master.ready)
        self.inflight = InFlight(ledger)
        # tasks of assignments answered "failed" that may yet commit (a timeout): proposed again,
        # they go out only once committed, never under tokens the ledger may skip (dispatch)
        self.doubtful: set[tuple[bytes, int]] = set()
        self.sequence = 0  # fencing sequence within the current term
        self.log = TaskLog()

    def begin_term(self) -> None:
        """This master leads a new term: its fencing tokens start again at (term, 1)."""
        self.sequence = 0

    # ---- messages --------------------------------------------------------------------------

    def on_attach(self, ev: MessageReceived, m: Attach, now: float) -> list[Effect]:
        refusal = self.standing.writable(ev, m.request_id, grows=False)
        if refusal is not None:
            return [refusal]
        if self.balancer is not None and m.epoch < self.balancer.epoch:
            return [app_error_to(ev.route, m.request_id, AppReason.STALE_FENCE, "stale_balancer",
                                 f"balancer epoch {m.epoch} is older than the active balancer's ({self.balancer.epoch})",
                                 ev.stimulus_id, refers_to=m.code, extra={"epoch": self.balancer.epoch})]
        replaced = self.balancer is not None and self.balancer.route != ev.route
        self.balancer = BalancerLink(ev.route, m.epoch, m.name, m.credit)
        self.waiting.forget()  # the new balancer will say what waits with it
        # Proposals in flight stay in flight: their tasks went to the balancer attached before,
        # and go to this one when they commit (``assigned``), never proposed twice.
        out: list[Effect] = [Log(logging.INFO, f"balancer {m.name} attached (epoch {m.epoch}, credit {m.credit})"
                                 + (", replacing the previous one" if replaced else ""), ev.stimulus_id)]
        open_now = list(views.open_assignments(self.ledger.state, self.ledger.work))
        out.append(Send(API, Attached(m.request_id, self.standing.view.term, len(open_now), self.standing.name),
                        ev.route, ev.stimulus_id))
        at = self.standing.wall(now)
        for job_id, task_id, attempt in open_now:  # the balancer matches these with its workers
            fence = (attempt.fence_term, attempt.fence_sequence)
            out.append(Send(API, self.worker_request(job_id, task_id, fence), ev.route, ev.stimulus_id))
            self.log.add(job_id, task_id, "resent", at, ev.stimulus_id, fence=list(fence), balancer=m.name)
        return out + self.dispatch(now, ev.stimulus_id)

    def on_credit(self, ev: MessageReceived, m: Credit, now: float) -> list[Effect]:
        link = self.balancer
        if link is None or ev.route != link.route or m.stream != link.epoch or m.unit != 0:
            return [refuse(ev, "CREDIT from a balancer that is not attached (send ATTACH first)")]
        link.credit += m.amount
        return self.dispatch(now, ev.stimulus_id)

    def on_waiting(self, ev: MessageReceived, m: TaskWaiting, now: float) -> list[Effect]:
        """The attached balancer says which tasks wait with it, and why (master.pending)."""
        link = self.balancer
        if link is None or ev.route != link.route:
            return [refuse(ev, "TASK_WAITING from a balancer that is not attached (send ATTACH first)")]
        why = self.waiting.update(m.total, m.jobs, now)
        return [refuse(ev, why)] if why else []

    def on_result(self, ev: MessageReceived, m: TaskResult, now: float) -> list[Effect]:
        refusal = self.standing.writable(ev, 0, grows=False)
        if refusal is not None:
            return [refusal]
        term = self.standing.view.term
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        fence = [m.fence_term, m.fence_sequence]
        self.log.add(job_id, m.task_id, "result", self.standing.wall(now), ev.stimulus_id, fence=fence,
                     worker=m.worker, outcome=OUTCOMES.get(m.outcome, m.outcome), error=m.error)
        if m.fence_term > term:
            # A token from a newer term than ours: this leader has been deposed and not yet heard.
            self.log.add(job_id, m.task_id, "refused", None, ev.stimulus_id, fence=fence, code="stale_leader")
            return [app_error(ev, 0, AppReason.STALE_FENCE, "stale_leader",
                              f"token term {m.fence_term} is newer than this master's term {term}")]
        problem = task_files_problem(m.files, m.task_id, m.result_file)
        if problem:  # refused before it costs a Raft round (the ledger would refuse it too)
            self.log.add(job_id, m.task_id, "refused", None, ev.stimulus_id, fence=fence, code="bad_files")
            return [app_error_to(ev.route, 0, AppReason.REFUSED, "bad_files",
                                 f"task {m.task_id} of job {job_id.hex()}: {problem}", ev.stimulus_id,
                                 refers_to=TaskResult.code, extra={"task_id": m.task_id, "job": job_id.hex()})]
        command = CompleteTask(
            job_id, m.task_id, m.fence_term, m.fence_sequence,
            m.outcome, m.worker, m.summary, m.result_file, m.error, self.standing.wall(now), [list(f) for f in m.files],
        )
        return self.batcher.enqueue(command, ("complete", ev.route, m), ev.stimulus_id, now)

    # ---- handing tasks out -----------------------------------------------------------------

    def dispatch(self, now: float, cause: str) -> list[Effect]:
        """Propose assignments for as many ready tasks as the balancer's credit allows."""
        link = self.balancer
        if link is None or not self.standing.serving():
            return []
        room = min(link.credit, self.dispatch_max)
        if room <= 0:
            return []
        tasks = views.ready_tasks(self.ledger.state, self.ledger.work, room, self.inflight)
        if not tasks:
            return []
        first = self.sequence + 1
        self.sequence += len(tasks)
        self.inflight.update(tasks)
        at, term = self.standing.wall(now), self.standing.view.term
        command = AssignTasks(term, first, link.name, tasks, at)
        # queued with the completions: one entry records a round's results and the assignments
        # they made room for (master.batching, group commit)
        held = self.doubtful.intersection(tasks) if self.doubtful else set()
        out = self.batcher.enqueue(command, ("assign", link, tasks, held), cause, now)
        # ... and sent now, under the tokens the entry will record (see the theory above), but
        # for a task whose earlier assignment may yet commit: if it does, this entry skips the
        # task, and the worker must run it under the earlier token. No log step per task here:
        # "sent" follows once it commits (a step per task on this path cost the leader's
        # dispatch rate, bench/ledger.py).
        for i, key in enumerate(tasks):
            if key not in held:
                out.append(Send(API, self.worker_request(key[0], key[1], (term, first + i)), link.route, cause))
        link.credit -= len(tasks)
        link.sent += len(tasks)
        return out

    def worker_request(self, job_id: bytes, task_id: int, fence: tuple[int, int]) -> WorkerRequest:
        """WORKER_REQUEST for one assignment: what a worker needs to run the task."""
        order = views.task_order(self.ledger.state, self.ledger.work, job_id, task_id)
        run = order["run"]
        program = run.get("program", b"")
        program = program if isinstance(program, bytes) else b""
        upper, lower = split128(job_id)
        metadata = {"task": order["arguments"], "run": {k: v for k, v in run.items() if k != "program"}}
        if order.get("avoid"):
            metadata["avoid"] = order["avoid"]  # workers that already ran a replica of this unit
        job = self.ledger.state.jobs.get(job_id)
        if job is not None:  # who may follow its output on the worker (OUTPUT_FOLLOW); a unit: operators
            metadata["owner"] = job.client
        return WorkerRequest(
            upper, lower, task_id, fence[0], fence[1], len(program), len(order["inputs"]),
            str(run.get("kind", "")), program, order["inputs"], metadata,
        )

    # ---- answers, once proposals committed (or not) ------------------------------------------

    def assigned(self, reply: tuple, result: Applied, log_index: int, now: float, cause: str) -> list[Effect]:
        """An ``assign`` reply: the assignments committed; each goes to the attached balancer."""
        _, sent_to, tasks, held = reply
        self.inflight.difference_update(tasks)
        at = self.standing.wall(now)
        if not result.ok:
            for job_id, task_id in tasks:
                self.log.add(job_id, task_id, "refused", at, cause, log_index=log_index, code=result.code)
            return [Log(logging.WARNING, f"assignment refused by the ledger: {result.text}", cause)]
        # Applied after any earlier assignment of these tasks: whatever it did is in the ledger now.
        self.doubtful.difference_update(tasks)
        for job_id, task_id in result.value["skipped"]:  # no longer ready when it committed (e.g. cancelled)
            self.log.add(job_id, task_id, "skipped", at, cause, log_index=log_index)
            if (job_id, task_id) in held and self.balancer is sent_to and sent_to is not None:
                sent_to.credit += 1  # held back and never sent: the balancer still has that room
        link = self.balancer
        out: list[Effect] = []
        # It went to the balancer attached when it was proposed. One that attached (or attached
        # again, on a new connection) while this was committing did not get it among the open
        # assignments: it goes to that one now.
        resend = link is not None and link is not sent_to
        for job_id, task_id, fence in result.value["assigned"]:
            self.standing.count("tasks_assigned")
            self.log.add(job_id, task_id, "sent", at, cause, fence=list(fence), log_index=log_index,
                         balancer=None if link is None else link.name)
            if resend:
                out.append(Send(API, self.worker_request(job_id, task_id, fence), link.route, cause))
                link.credit -= 1
                link.sent += 1
            elif (job_id, task_id) in held and link is not None:
                out.append(Send(API, self.worker_request(job_id, task_id, fence), link.route, cause))
        return out

    def recorded(self, reply: tuple, result: Applied, log_index: int, now: float, cause: str) -> list[Effect]:
        """A ``complete`` reply: the result is recorded (RESULT_ACK) or refused (ERROR)."""
        _, route, m = reply
        job_id = join128(m.job_uuid_upper, m.job_uuid_lower)
        self.log.add(job_id, m.task_id, "recorded" if result.ok else "refused", self.standing.wall(now), cause,
                     fence=[m.fence_term, m.fence_sequence], log_index=log_index, code=result.code)
        if not result.ok:
            reason = AppReason.STALE_FENCE if result.code == "stale_fence" else AppReason.REFUSED
            return [app_error_to(route, 0, reason, result.code, result.text, cause, refers_to=TaskResult.code,
                                 extra={"task_id": m.task_id, "job": job_id.hex()})]
        self.standing.count("results_" + result.code)
        return [Send(API, ResultAck(m.job_uuid_upper, m.job_uuid_lower, m.task_id, m.fence_term, m.fence_sequence), route, cause)]

    def result_unknown(self, reply: tuple, reason: str, cause: str) -> list[Effect]:
        """A ``complete`` reply whose proposal failed: the balancer sends the result again."""
        m = reply[2]
        self.log.add(join128(m.job_uuid_upper, m.job_uuid_lower), m.task_id, "not_committed", None, cause,
                     fence=[m.fence_term, m.fence_sequence], reason=reason)
        return [app_error_to(reply[1], 0, AppReason.OUTCOME_UNKNOWN, "outcome_unknown",
                             f"the result may not be recorded ({reason}); send it again", cause,
                             refers_to=TaskResult.code, extra={"task_id": m.task_id})]

    def assign_unknown(self, reply: tuple, reason: str, cause: str) -> list[Effect]:
        """An ``assign`` reply whose proposal failed: its tasks may be proposed again (it may
        still commit: they are in doubt until a later assignment of theirs commits)."""
        self.inflight.difference_update(reply[2])
        self.doubtful.update(reply[2])
        for job_id, task_id in reply[2]:
            self.log.add(job_id, task_id, "not_committed", None, cause, reason=reason)
        return []

    def result_not_leader(self, reply: tuple, cause: str) -> list[Effect]:
        return [self.standing.not_leader(0, reply[1], cause)]

    # ---- leadership ends -------------------------------------------------------------------

    def step_down(self, cause: str) -> list[Effect]:
        """This master stopped leading: the balancer is told so and forgotten."""
        out: list[Effect] = []
        if self.balancer is not None:
            out.append(self.standing.not_leader(0, self.balancer.route, cause))
            self.balancer = None
        self.inflight.clear()
        self.doubtful.clear()
        return out

    def status(self) -> dict[str, Any] | None:
        if self.balancer is None:
            return None
        return {"name": self.balancer.name, "epoch": self.balancer.epoch,
                "credit": self.balancer.credit, "sent": self.balancer.sent}

    def validate(self) -> None:
        if self.balancer is not None:
            assert self.balancer.credit >= 0 or self.balancer.sent > 0


def merge_acks(effects: list[Effect]) -> list[Effect]:
    """One RESULT_ACK per route for all the results one commit recorded (``ResultAck.more``),
    in place of the first one; the other effects keep their order."""
    acks: dict[bytes | None, list[Send]] = {}
    for e in effects:
        if isinstance(e, Send) and type(e.message) is ResultAck:
            acks.setdefault(e.route, []).append(e)
    if all(len(group) == 1 for group in acks.values()):
        return effects
    out: list[Effect] = []
    for e in effects:
        if isinstance(e, Send) and type(e.message) is ResultAck:
            group = acks.pop(e.route, None)
            if group is None:
                continue  # merged into the first of its route
            more = [[r.message.job_uuid_upper, r.message.job_uuid_lower, r.message.task_id,
                     r.message.fence_term, r.message.fence_sequence] for r in group[1:]]
            first = group[0].message
            out.append(Send(e.socket, ResultAck(first.job_uuid_upper, first.job_uuid_lower, first.task_id,
                                                first.fence_term, first.fence_sequence, more), e.route, e.cause))
        else:
            out.append(e)
    return out
