"""The balancer core driven directly: workers registering, the pair taking over, credit both
ways, results and acknowledgements routed, dead workers purged. No sockets, no sleeps."""

from __future__ import annotations

import pytest

from balancer.binary_star import State
from balancer.core import BEAT_BATCH, PEER_OUT, WORKERS, BalancerCore, BalancerOptions
from cluster.node.events import Log, MessageReceived, Send, Started, StartTimer, TimerFired
from proto.ids import split128
from proto.messages import (
    Attach,
    Attached,
    Credit,
    Error,
    Heartbeat,
    NotLeader,
    PeerState,
    ResultAck,
    TaskResult,
    WorkerRequest,
    WorkerStatus,
)

JOB = bytes(range(16))
MASTERS = ["tcp://m1:1", "tcp://m2:1", "tcp://m3:1"]
OPTIONS = BalancerOptions(interval=0.25, peer_liveness=4, worker_liveness=1.5, master_timeout=1.5,
                          queue_factor=2, min_queue=4)


class Harness:
    def __init__(self, primary: bool = True, epoch_base: int = 1000) -> None:
        self.core = BalancerCore("b1" if primary else "b2", primary=primary, masters=MASTERS,
                                 workers_endpoint="tcp://b:1", peer_workers="tcp://peer:1",
                                 epoch_base=epoch_base, options=OPTIONS, now=0.0)
        self.now = 0.0
        self.n = 0
        self.out: list = []
        self.event(Started("s"))

    def event(self, ev) -> list:
        effects = self.core.handle(ev, self.now)
        self.out += effects
        # the loop fires a zero-delay timer once it has drained the socket: here, at once
        while any(isinstance(e, StartTimer) and e.name == "place" and e.delay == 0 for e in effects):
            effects = self.core.handle(TimerFired("place", "p"), self.now)
            self.out += effects
        self.core.validate_state()
        return effects

    def msg(self, socket: str, message, route: bytes | None = None) -> list:
        self.n += 1
        return self.event(MessageReceived(socket, route, 1, message, f"m{self.n}"))

    def tick(self, dt: float = 0.25) -> list:
        self.now += dt
        return self.event(TimerFired("tick", "t"))

    def peer(self, state: State, epoch: int = 0) -> list:
        return self.msg("peer_in", PeerState(int(state), epoch, 1, "peer", "tcp://peer:1"))

    def register(self, name: str, slots: int = 2, route: bytes | None = None, tasks=(), **caps) -> list:
        caps = {"cores": 2, "memory_mb": 1024, **caps}
        return self.msg(WORKERS, WorkerStatus(slots, slots, 0, 0, [], caps, name, True, 0, list(tasks), [], []),
                        route or name.encode())

    def heartbeat(self, name: str, free: int, received: int, slots: int = 2) -> list:
        return self.msg(WORKERS, WorkerStatus(slots, free, 0, 0, [], {}, name, False, received, [], [], []), name.encode())

    def attach(self, open_assignments: int = 0, socket: str = "m0") -> list:
        return self.msg(socket, Attached(1, 5, open_assignments, "m1"))

    def request(self, task: int, fence=(5, 1), need=None, socket: str = "m0") -> list:
        up, lo = split128(JOB)
        run = {"kind": "call"} if need is None else {"kind": "call", "need": need}
        return self.msg(socket, WorkerRequest(up, lo, task, fence[0], fence[1], 0, 0, "call", b"", [], {"run": run, "task": {}}))

    def sent(self, kind=None, socket=None, route=None) -> list:
        return [e for e in self.out if isinstance(e, Send) and (kind is None or isinstance(e.message, kind))
                and (socket is None or e.socket == socket) and (route is None or e.route == route)]


def active() -> Harness:
    h = Harness()
    h.peer(State.BACKUP)  # the primary meets its backup: it serves and attaches
    assert h.core.star.state == State.ACTIVE
    h.attach()
    return h


def test_a_primary_meeting_its_backup_serves_and_attaches_with_a_fresh_epoch():
    h = Harness(epoch_base=1000)
    h.peer(State.BACKUP, epoch=0)
    attach = h.sent(Attach)
    assert attach and attach[0].message.epoch == 1000 and attach[0].socket == "m0"
    assert attach[0].message.credit == 0  # no workers yet: nothing to ask for
    h.attach()
    assert h.core.stream.link.attached


def test_a_passive_balancer_sends_workers_to_its_peer_while_the_peer_lives():
    h = Harness(primary=False)
    h.peer(State.ACTIVE, epoch=7)
    assert h.core.star.state == State.PASSIVE
    h.register("w1")
    refusal = h.sent(NotLeader, WORKERS, b"w1")
    assert refusal and refusal[0].message.leader == "tcp://peer:1"
    assert len(h.core.registry) == 0 and not h.sent(Attach)


def test_a_passive_balancer_takes_over_only_when_the_peer_is_silent_and_a_worker_turns_to_it():
    h = Harness(primary=False)
    h.peer(State.ACTIVE, epoch=7)
    for _ in range(8):  # the peer falls silent: silence alone changes nothing (split-brain guard)
        h.tick()
    assert h.core.star.state == State.PASSIVE and not h.sent(Attach)
    h.register("w1")  # ... until a worker turns to it
    assert h.core.star.state == State.ACTIVE
    attach = h.sent(Attach)
    assert attach and attach[0].message.epoch > 7  # outranks the silent peer at the masters
    assert "w1" in h.core.registry


def test_heartbeats_to_the_peer_carry_state_and_epoch():
    h = active()
    h.tick()
    states = [e.message for e in h.sent(PeerState, PEER_OUT)]
    assert states[-1].state == int(State.ACTIVE) and states[-1].epoch == h.core.epoch


def test_credit_to_the_master_follows_the_workers_slots_and_what_is_held():
    h = active()
    h.register("w1", slots=2)
    credit = h.sent(Credit)
    assert credit and credit[-1].message.stream == h.core.epoch
    granted = sum(c.message.amount for c in credit)
    assert granted == OPTIONS.min_queue  # max(min_queue 4, 2 × 2 slots)
    for t in range(granted):
        h.request(t, (5, t + 1))
    placed = h.sent(WorkerRequest, WORKERS, b"w1")
    assert len(placed) == 2  # only the worker's credit
    assert h.core.dispatcher.pending() == 2
    assert not [c for c in h.sent(Credit) if c not in credit]  # holding 4 of 4: no more asked


def test_open_assignments_after_attach_are_not_charged_against_credit():
    h = Harness()
    h.peer(State.BACKUP)
    h.register("w1", slots=2)
    h.attach(open_assignments=3)
    before = h.core.stream.link.credit
    for t in range(3):
        h.request(t, (4, t))
    assert h.core.stream.link.credit == before


def test_credit_in_flight_is_not_counted_twice():
    h = active()
    h.register("w1", slots=2)
    h.request(0, (5, 1))
    h.request(1, (5, 2))
    assert h.core.registry.get("w1").free == 0
    # a heartbeat written before the worker saw the two tasks says 2 free: still 0 really
    h.heartbeat("w1", free=2, received=0)
    assert h.core.registry.get("w1").free == 0
    h.heartbeat("w1", free=1, received=2)  # it got both and finished one
    assert h.core.registry.get("w1").free == 1


def test_a_heartbeat_restates_the_workers_credit_as_its_prefetch_queue_grows_and_shrinks():
    """A worker's prefetch queue adapts (worker.prefetch): each heartbeat's slots_total is its
    credit now, which the registry takes (and sizes its ask to the master by)."""
    h = active()
    h.register("w1", slots=4)
    h.heartbeat("w1", free=40, received=0, slots=40)  # short tasks: a deep queue
    w = h.core.registry.get("w1")
    assert (w.slots, w.free, h.core.registry.slots_total) == (40, 40, 40)
    for t in range(3):
        h.request(t, (5, t + 1))
    assert w.free == 37
    h.heartbeat("w1", free=3, received=3, slots=6)  # long tasks now: the queue shrank, 3 still held
    assert (w.slots, w.free, h.core.registry.slots_total) == (6, 3, 6)
    assert h.core.status(h.now)["workers"][0]["credit"] == 6
    h.heartbeat("w1", free=7, received=3, slots=6)  # more free than it takes in all: refused, nothing changes
    assert (w.slots, w.free) == (6, 3)


def test_a_worker_whose_credit_shrank_below_what_it_holds_gets_no_task_until_it_holds_less():
    """Results return credit one by one; after a worker's credit shrank (its prefetch queue, for
    long tasks) they must not, or it stays over its credit for as long as work comes."""
    h = active()
    h.register("w1", slots=10)
    for t in range(10):
        h.request(t, (5, t + 1))
    w = h.core.registry.get("w1")
    assert (w.free, len(w.running)) == (0, 10)
    h.heartbeat("w1", free=0, received=10, slots=4)  # it holds 10, takes 4 from now on
    up, lo = split128(JOB)
    for t in range(7):  # 7 end: it holds 3
        h.msg(WORKERS, TaskResult(up, lo, t, 5, t + 1, 0, 0, {}, None, None, "", []), b"w1")
    assert (w.free, len(w.running)) == (1, 3)  # one slot of credit, not the 7 the results brought


def test_free_slots_never_exceed_the_slots_though_the_credit_adds_a_prefetch_queue():
    h = active()
    caps = {"cores": 2, "memory_mb": 1024, "slots": 2}  # 2 task slots, credit 4 (a prefetch queue of 2)
    h.msg(WORKERS, WorkerStatus(4, 4, 0, 0, [], caps, "w1", True, 0, [], [], []), b"w1")

    def shown() -> tuple:
        w = h.core.status(h.now)["workers"][0]
        return w["slots"], w["free"], w["credit"], w["credit_free"]

    assert shown() == (2, 2, 4, 4)
    h.request(0, (5, 1))
    assert shown() == (2, 1, 4, 3)
    for t in (1, 2):
        h.request(t, (5, t + 1))
    assert shown() == (2, 0, 4, 1)  # two running, one waiting in the queue: no slot is free


def test_results_go_to_the_master_with_the_worker_name_and_acks_come_back_to_that_worker():
    h = active()
    h.register("w1")
    h.request(0, (5, 1))
    up, lo = split128(JOB)
    h.msg(WORKERS, TaskResult(up, lo, 0, 5, 1, 0, 0, {"v": 1}, None, None, "", []), b"w1")
    forwarded = h.sent(TaskResult, "m0")
    assert forwarded and forwarded[0].message.worker == "w1"
    assert h.core.registry.get("w1").free == 2  # the result gave its slot back
    h.msg("m0", ResultAck(up, lo, 0, 5, 1))
    assert h.sent(ResultAck, WORKERS, b"w1")


def test_acks_of_one_commit_are_split_per_worker_one_message_each():
    h = active()
    h.register("w1")
    h.register("w2")
    up, lo = split128(JOB)
    for t, w in ((0, b"w1"), (1, b"w2"), (2, b"w1")):
        h.msg(WORKERS, TaskResult(up, lo, t, 5, t + 1, 0, 0, {}, None, None, "", []), w)
    h.msg("m0", ResultAck(up, lo, 0, 5, 1, [[up, lo, 1, 5, 2], [up, lo, 2, 5, 3], [up, lo, 99, 5, 9]]))
    to_w1 = [e.message for e in h.sent(ResultAck, WORKERS, b"w1")]
    to_w2 = [e.message for e in h.sent(ResultAck, WORKERS, b"w2")]
    assert [[a[2] for a in m.acks()] for m in to_w1] == [[0, 2]]
    assert [[a[2] for a in m.acks()] for m in to_w2] == [[1]]
    assert h.core.counters["acks_unroutable"] == 1


def test_a_master_refusing_a_result_for_good_tells_the_worker():
    h = active()
    h.register("w1")
    up, lo = split128(JOB)
    h.msg(WORKERS, TaskResult(up, lo, 9, 5, 1, 0, 0, {}, None, None, "", []), b"w1")
    h.msg("m0", Error(0, 1003, TaskResult.code, "stale", {"code": "stale_fence", "task_id": 9, "job": JOB.hex()}))
    assert h.sent(Error, WORKERS, b"w1")


def test_a_silent_worker_is_purged_and_its_tasks_reported_lost_under_their_fences():
    h = active()
    h.register("w1")
    h.request(0, (5, 1))
    h.request(1, (5, 2))
    for _ in range(8):  # 2 s without a heartbeat
        h.tick()
    assert "w1" not in h.core.registry
    lost = [e.message for e in h.sent(TaskResult, "m0")]
    assert sorted((m.task_id, m.fence_sequence, m.outcome) for m in lost) == [(0, 1, 3), (1, 2, 3)]
    assert all("w1" in m.error for m in lost)


def test_a_worker_that_restarts_loses_its_old_tasks_and_reports_what_it_still_runs():
    h = active()
    h.register("w1")
    h.request(0, (5, 1))
    h.register("w1", route=b"w1-new", tasks=[[JOB, 7, 5, 9]])  # a new process under the same name
    lost = [e.message for e in h.sent(TaskResult, "m0")]
    assert [(m.task_id, m.outcome) for m in lost] == [(0, 3)]
    assert h.core.registry.get("w1").running == {(JOB, 7): (5, 9)}


def test_a_request_for_a_task_a_worker_already_runs_is_not_sent_again():
    h = active()
    h.register("w1", tasks=[[JOB, 3, 5, 4]])
    h.request(3, (5, 4))  # the new leader resends its open assignment after a failover
    assert not h.sent(WorkerRequest, WORKERS)
    assert h.core.counters["requests_already_running"] == 1


@pytest.mark.parametrize(("caps", "slots", "words"), [
    ({"cores": -1}, 2, "cores"),
    ({"cores": 1, "memory_mb": 2**60}, 2, "memory_mb"),
    ({"cores": 1, "gpus": 1000}, 2, "gpus"),
    ({"cores": 1}, 0, "slots"),
    ({"cores": 1}, 100_000, "slots"),
    ({"cores": "many"}, 2, "cores"),
])
def test_impossible_capabilities_are_refused_with_a_reason_and_nothing_registered(caps, slots, words):
    h = active()
    h.register("w1", slots=slots, **caps)
    refusal = h.sent(Error, WORKERS, b"w1")
    assert refusal and words in refusal[0].message.text
    assert "w1" not in h.core.registry


def test_a_heartbeat_from_an_unknown_worker_asks_it_to_register():
    h = active()
    h.heartbeat("ghost", free=1, received=0)
    err = h.sent(Error, WORKERS, b"ghost")
    assert err and err[0].message.detail["code"] == "not_registered"


def test_a_task_with_a_malformed_need_fails_clearly_instead_of_waiting_forever():
    h = active()
    h.register("w1")
    h.request(0, (5, 1), need={"gpus": "two"})
    failed = [e.message for e in h.sent(TaskResult, "m0")]
    assert failed and failed[0].outcome == 1 and "gpus" in failed[0].error


def test_a_task_no_worker_can_run_waits_and_says_why():
    h = active()
    h.register("w1")
    h.request(0, (5, 1), need={"gpus": 1})
    assert not h.sent(WorkerRequest, WORKERS)
    assert "GPU" in h.core.story(JOB, 0)


def test_a_silent_master_is_replaced_by_the_next_and_not_leader_redirects():
    h = active()
    for _ in range(7):
        h.tick()
    attaches = h.sent(Attach)
    assert attaches[-1].socket == "m1"
    h.msg("m1", NotLeader(1, 6, "tcp://m3:1"))
    assert h.sent(Attach)[-1].socket == "m2"


def test_not_leader_without_a_leader_waits_before_the_next_attach():
    h = active()
    n = len(h.sent(Attach))
    h.msg("m0", NotLeader(1, 6, None))
    assert len(h.sent(Attach)) == n  # no hot loop through the masters during an election
    h.tick(0.75)
    assert len(h.sent(Attach)) == n + 1 and h.sent(Attach)[-1].socket == "m1"


def test_messages_from_a_master_it_is_not_attached_to_are_ignored():
    h = active()
    h.register("w1")
    h.request(0, (5, 1), socket="m2")
    assert not h.sent(WorkerRequest, WORKERS)


def test_dual_active_the_backup_steps_down_and_sends_its_workers_to_the_primary():
    h = Harness(primary=False)
    h.peer(State.PASSIVE)
    assert h.core.star.state == State.ACTIVE
    h.attach()
    h.register("w1")
    h.peer(State.ACTIVE)  # a healed partition: both active
    assert h.core.star.state == State.PASSIVE
    assert h.sent(NotLeader, WORKERS, b"w1")
    assert len(h.core.registry) == 0 and not h.core.stream.link.attached


def test_workers_get_heartbeats_from_the_active_balancer():
    h = active()
    h.register("w1")
    h.tick()
    assert h.sent(Heartbeat, WORKERS, b"w1")
    assert any(isinstance(e, Log) for e in h.out)


def test_many_workers_are_heartbeated_in_slices_and_none_is_skipped():
    """Heartbeats to many workers go out BEAT_BATCH at a time over the interval, not in one burst
    that holds the loop; slices the loop did not reach before the next tick go out with it."""
    h = active()
    names = [f"w{i:03d}" for i in range(2 * BEAT_BATCH + 50)]
    for name in names:
        h.register(name)
    h.out.clear()
    h.tick()
    assert len(h.sent(Heartbeat, WORKERS)) == BEAT_BATCH
    assert any(isinstance(e, StartTimer) and e.name == "beat" and 0 < e.delay < OPTIONS.interval for e in h.out)
    h.event(TimerFired("beat", "b"))
    assert len(h.sent(Heartbeat, WORKERS)) == 2 * BEAT_BATCH
    h.out.clear()
    h.tick()  # the last slice's timer never fired: those workers hear now, with the next round's first slice
    heard = {e.route for e in h.sent(Heartbeat, WORKERS)}
    assert {n.encode() for n in names[2 * BEAT_BATCH:]} <= heard and len(heard) == BEAT_BATCH + 50


def test_a_master_that_forgot_the_stream_makes_the_balancer_attach_again_at_once():
    h = active()
    h.out.clear()
    h.msg("m0", Error(0, 1003, Heartbeat.code, "ATTACH again", {"code": "not_attached"}))
    (attach,) = h.sent(Attach)
    assert attach.socket == "m0" and not h.core.stream.link.attached
    assert h.core.counters["reattached"] == 1


def test_an_active_balancer_refused_as_stale_outbids_the_epoch_the_masters_hold_at_most_every_two_seconds():
    """After a heal, the primary is active again but the backup attached with a newer epoch
    while it was cut off: the masters refused the primary forever and no task ran (issue 22).
    The backup has stood down and sent its workers here."""
    h = active()
    h.register("w1")
    mine = h.core.epoch
    h.out.clear()
    stale = Error(1, 1003, Attach.code, "older", {"code": "stale_balancer", "epoch": mine + 5})
    h.msg("m0", stale)
    (again,) = h.sent(Attach)
    assert again.message.epoch == mine + 6 and h.core.counters["epoch_raised"] == 1
    h.out.clear()
    h.msg("m0", Error(1, 1003, Attach.code, "older", {"code": "stale_balancer", "epoch": mine + 9}))
    assert not h.sent(Attach) and h.core.epoch == mine + 6  # not twice within EPOCH_RAISE_S
    h.now += 2.5
    h.msg("m0", Error(1, 1003, Attach.code, "older", {"code": "stale_balancer", "epoch": mine + 9}))
    (again,) = h.sent(Attach)
    assert again.message.epoch == mine + 10


def test_heartbeats_to_the_peer_say_how_many_workers_are_registered():
    h = active()
    h.register("w1")
    h.register("w2")
    h.tick()
    assert h.sent(PeerState, PEER_OUT)[-1].message.workers_registered == 2
    b = Harness(primary=False)
    b.peer(State.ACTIVE)
    b.tick()
    assert b.sent(PeerState, PEER_OUT)[-1].message.workers_registered == 0


def test_an_active_balancer_that_lost_every_worker_yields_to_its_peer_that_took_over_with_them():
    """The active one cut off from the workers but not from its peer (issue 22): it purges them;
    the peer takes over when they turn to it; hearing the peer active with the workers, this one
    stands down, and a stale refusal meanwhile does not make it outbid the peer's attachment."""
    h = active()
    h.register("w1")
    for _ in range(8):  # w1 silent for 2 s: purged
        h.tick()
    assert len(h.core.registry) == 0 and h.core.star.serving()
    h.peer(State.PASSIVE)  # the peer still heard
    h.out.clear()
    h.msg("m0", Error(1, 1003, Attach.code, "older", {"code": "stale_balancer", "epoch": h.core.epoch + 1}))
    assert not h.sent(Attach) and "epoch_raised" not in h.core.counters
    h.msg("peer_in", PeerState(int(State.ACTIVE), h.core.epoch + 1, 2, "peer", "tcp://peer:1", 1))
    assert h.core.star.state == State.PASSIVE and h.core.star.counters["dual_active"] == 1


def test_a_passive_balancer_takes_over_from_an_active_peer_stranded_without_workers():
    h = Harness(primary=False)
    h.msg("peer_in", PeerState(int(State.ACTIVE), 7, 1, "peer", "tcp://peer:1", 2))
    h.register("w1")  # the peer has its workers: refused
    assert h.core.star.state == State.PASSIVE and h.sent(NotLeader, WORKERS, b"w1")
    for k in range(5):  # the peer announces no worker for over a second, still heard
        h.now += 0.25
        h.msg("peer_in", PeerState(int(State.ACTIVE), 7, 2 + k, "peer", "tcp://peer:1", 0))
    h.register("w1")
    assert h.core.star.state == State.ACTIVE and "w1" in h.core.registry
    attach = h.sent(Attach)
    assert attach and attach[-1].message.epoch > 7
    h.tick()  # and it tells the peer it has the workers
    assert h.sent(PeerState, PEER_OUT)[-1].message.workers_registered == 1


def test_a_heartbeat_the_peer_sent_before_a_cut_healed_is_ignored():
    h = Harness(primary=False)
    h.msg("peer_in", PeerState(int(State.ACTIVE), 7, 1, "peer", "tcp://peer:1", 2, 0))
    assert h.core.star.state == State.PASSIVE
    h.now = 10.0  # the peer's last word before a cut, delivered when it heals
    h.msg("peer_in", PeerState(int(State.PASSIVE), 7, 2, "peer", "tcp://peer:1", 2, 250))
    assert h.core.star.state == State.PASSIVE and h.core.star.counters["peer_stale"] == 1
    h.msg("peer_in", PeerState(int(State.PASSIVE), 7, 40, "peer", "tcp://peer:1", 2, 9_990))
    assert h.core.star.counters["dual_passive"] == 1  # a fresh one is news: both passive (the primary will serve)


def test_a_stale_result_from_a_worker_sent_the_task_again_leaves_the_newer_attempt_running_there():
    """Chaos soak (seed 2): a worker's result under an older token popped the newer attempt the
    balancer had sent it since, so that attempt was never reported lost when the worker was."""
    h = active()
    h.register("w1")
    h.request(0, (5, 1))
    h.request(0, (6, 1))  # the masters recorded (5, 1) lost and gave the task a newer token
    assert h.core.registry.get("w1").running == {(JOB, 0): (6, 1)}
    up, lo = split128(JOB)
    h.msg(WORKERS, TaskResult(up, lo, 0, 5, 1, 0, 0, {"v": 1}, None, None, "", []), b"w1")
    assert h.core.registry.get("w1").running == {(JOB, 0): (6, 1)}  # still runs there
    h.msg(WORKERS, TaskResult(up, lo, 0, 6, 1, 0, 0, {"v": 1}, None, None, "", []), b"w1")
    assert h.core.registry.get("w1").running == {}
    assert [m.message.fence_term for m in h.sent(TaskResult, "m0")] == [5, 6]  # the master judges each


def test_a_worker_registering_with_an_older_attempt_of_a_waiting_task_does_not_drop_the_newer_one():
    """Chaos soak (seed 2): a worker cut off from the balancers was purged and its tasks reported
    lost; the masters gave them newer tokens, which waited here; the worker came back listing the
    old attempts (their results held), and the balancer dropped the waiting orders as "running
    there": the units stayed pending until their lease ran out."""
    h = active()
    h.request(0, (6, 1))  # no worker yet: it waits
    assert (JOB, 0) in h.core.orders
    h.register("w2", tasks=[[JOB, 0, 5, 1]])  # holds the result of the attempt recorded lost
    assert [(m.message.task_id, m.message.fence_term) for m in h.sent(WorkerRequest, WORKERS)] == [(0, 6)]
    assert h.core.counters.get("pending_found_running", 0) == 0


def test_a_worker_registering_with_the_attempt_that_waits_here_takes_it_off_the_queue():
    h = active()
    h.request(0, (6, 1))
    h.register("w2", tasks=[[JOB, 0, 6, 1]])  # a new balancer's open assignment it already runs
    assert not h.sent(WorkerRequest, WORKERS) and h.core.counters["pending_found_running"] == 1


def test_a_batch_of_requests_and_a_batch_of_results_are_handled_one_by_one():
    """MESSAGE_BATCHes unpacked as the node loop does (``Codec.unbatch``): each request keeps its
    own fence (a duplicate, an older token and one a worker already runs go nowhere), each
    result goes on alone under its own fence (issue 23)."""
    from proto import Codec

    h = active()
    h.register("w1", slots=4, tasks=[[JOB, 7, 5, 9]])
    up, lo = split128(JOB)

    def request(task, fence):
        return WorkerRequest(up, lo, task, fence[0], fence[1], 0, 0, "call", b"", [], {"run": {"kind": "call"}, "task": {}})

    codec = Codec(3)
    mix = [request(1, (5, 1)), request(1, (5, 1)), request(2, (5, 2)), request(2, (5, 1)),
           request(7, (5, 9)), request(3, (6, 1))]
    for _, m in codec.unbatch(codec.decode(codec.encode(codec.batch(mix)))[1]):
        h.msg("m0", m)
    sent = sorted((e.message.task_id, e.message.fence_term, e.message.fence_sequence)
                  for e in h.sent(WorkerRequest, WORKERS, b"w1"))
    assert sent == [(1, 5, 1), (2, 5, 2), (3, 6, 1)]
    # (1, (5,1)) again and (2, (5,1)), older than the (5,2) w1 now runs, and 7, which w1 ran
    # before: none goes out again
    assert h.core.counters["requests_already_running"] + h.core.counters.get("requests_duplicate", 0) == 3

    results = [TaskResult(up, lo, t, f, s, 0, 0, {"t": t}, None, None, "", []) for t, f, s in sent]
    results.append(TaskResult(up, lo, 99, 5, 77, 0, 0, {}, None, None, "", []))  # never sent here
    for _, m in codec.unbatch(codec.decode(codec.encode(codec.batch(results)))[1]):
        h.msg(WORKERS, m, b"w1")
    forwarded = sorted((e.message.task_id, e.message.fence_sequence, e.message.worker)
                       for e in h.sent(TaskResult, "m0"))
    assert forwarded == [(1, 1, "w1"), (2, 2, "w1"), (3, 1, "w1"), (99, 77, "w1")], \
        "each goes on under its own fence; the master, not the balancer, judges the unknown one"
