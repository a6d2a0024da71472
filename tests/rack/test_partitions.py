"""Partitions on a simulated rack (issue 22): every node on its own host, CURVE on every link.

Black-box: work goes in through the client API, faults are network cuts (tests/rack/rack.py),
and what is checked is what a user sees (results, the ledger's job and task views) and what
`cluster status` says (roles, attachment, registered workers). Each test starts from a healed
rack that serves as a whole and leaves it healed. The times each fault cost are printed
(`pytest -s`): takeover, resume, election, rerun.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter

import cloudpickle
import pytest

from cluster.client import Client

from .rack import Rack

pytestmark = pytest.mark.rack

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module


def nap_triple(x):
    time.sleep(0.02)
    return x * 3


def double(x):
    return x * 2


def slow_double(x, seconds):
    time.sleep(seconds)
    return x * 2


# ---- helpers -----------------------------------------------------------------------------------


class Tally:
    """Completion times of futures, by (job, task): each must complete once."""

    def __init__(self, futures) -> None:
        self.futures = list(futures)
        self.lock = threading.Lock()
        self.times: dict[tuple[str, int], list[float]] = {}
        for f in self.futures:
            f.add_done_callback(self._note)

    def _note(self, f) -> None:
        with self.lock:
            self.times.setdefault((f.job, f.task), []).append(time.monotonic())

    def done(self) -> int:
        with self.lock:
            return len(self.times)

    def first_after(self, t: float) -> float | None:
        with self.lock:
            later = [x for stamps in self.times.values() for x in stamps if x > t]
        return min(later) if later else None


def start_work(c: Client, calls: int, commands: int, tag: str):
    """``calls`` callables and ``commands`` commands, and what each must return."""
    futures = c.map(nap_triple, range(calls))
    runs = [c.run(["sh", "-c", f"echo {tag}-{i}"]) for i in range(commands)]
    expected = [3 * i for i in range(calls)] + [f"{tag}-{i}\n".encode() for i in range(commands)]
    return futures + runs, expected, calls


def results(futures, calls: int, timeout: float) -> list:
    return [f.result(timeout=timeout) if k < calls else f.result(timeout=timeout).stdout
            for k, f in enumerate(futures)]


def recorded_once(c: Client, futures) -> int:
    """Every task of ``futures`` done, recorded with exactly one done attempt; every job done
    with done == total. Returns the duplicate completions the ledger refused."""
    tasks: dict[str, list[int]] = {}
    for f in futures:
        tasks.setdefault(f.job, []).append(f.task)
    duplicates = 0
    for job, ids in tasks.items():
        view = c.job(job).value
        assert view["state"] == "done" and view["done"] == view["total"] == len(ids), view
        duplicates += view["duplicates"]
        for t in ids:
            task = c.task(job, t).value
            outcomes = Counter(a["outcome"] for a in task["attempts"])
            assert task["state"] == "done" and outcomes["done"] == 1, task
    return duplicates


def work_goes_on(rack: Rack, c: Client, tag: str) -> float:
    """New work after a heal finishes right, on the rack as it is now; returns how long it took."""
    t = time.monotonic()
    futures, expected, calls = start_work(c, 20, 2, tag)
    assert results(futures, calls, 30) == expected
    recorded_once(c, futures)
    return time.monotonic() - t


def heal_and_go_on(rack: Rack, c: Client, futures, tag: str) -> tuple[float, float, int]:
    """Heal, wait until the rack serves as a whole, run new work, check ``futures`` recorded once:
    (seconds to serve again after the heal, seconds the new work took, duplicates refused)."""
    rack.heal()
    healed = time.monotonic()
    rack.wait_healthy(30)
    settled = time.monotonic() - healed
    return settled, work_goes_on(rack, c, tag), recorded_once(c, futures)


def other(pair: list[str], name: str) -> str:
    return next(n for n in pair if n != name)


# ---- a: the active balancer cut off from everything, then healed ---------------------------------


def test_active_balancer_cut_off_mid_run_then_healed_work_still_runs(healthy: Rack):
    rack = healthy
    old = rack.active()
    new = other(rack.role("balancer"), old)
    with rack.client() as c:
        futures, expected, calls = start_work(c, 200, 20, "a")
        tally = Tally(futures)
        rack.wait(lambda: tally.done() >= 40, 60, "40 tasks done before the cut")
        cut = time.monotonic()
        done_at_cut = tally.done()
        rack.isolate(old)
        rack.wait(lambda: (d := rack.detail(new)) and d["state"] == "active" and d["master"].get("attached"), 20,
                  f"{new} to take over and attach")
        takeover = time.monotonic() - cut
        resumed = rack.wait(lambda: tally.first_after(cut + takeover), 20, f"a task to finish through {new}") - cut
        assert results(futures, calls, 120) == expected
        assert done_at_cut < len(futures), "the work was all done before the cut"
        assert all(len(t) == 1 for t in tally.times.values()) and len(tally.times) == len(futures)

        settled, after, duplicates = heal_and_go_on(rack, c, futures, "a-after")
    print(f"\n[rack a] cut {old} at {done_at_cut}/{len(futures)} done; {new} active and attached after "
          f"{takeover:.2f} s, first task through it {resumed:.2f} s after the cut; after the heal the rack "
          f"served as a whole in {settled:.2f} s (active: {rack.active()}), new work took {after:.2f} s; "
          f"duplicate completions refused: {duplicates}")


# ---- b: the masters' leader cut off from both followers ----------------------------------------------


def test_master_leader_cut_off_from_followers_majority_elects_nothing_acknowledged_is_lost(healthy: Rack):
    rack = healthy
    old = rack.leader()
    followers = [m for m in rack.role("master") if m != old]
    acked: list = []  # futures of writes the masters acknowledged (a submit returns once committed)
    errors: list[str] = []
    stop = threading.Event()

    def write(c: Client) -> None:
        i = 0
        while not stop.is_set():
            try:
                acked.append((time.monotonic(), i, c.submit(double, i)))
            except Exception as exc:  # a submit that was never acknowledged: not a lost write
                errors.append(repr(exc))
            i += 1
            stop.wait(0.05)  # a steady stream of writes, not a busy loop

    with rack.client(timeout=20) as c:
        writer = threading.Thread(target=write, args=(c,), daemon=True)
        writer.start()
        try:
            rack.wait(lambda: len(acked) >= 10, 30, "10 writes acknowledged before the cut")
            cut = time.monotonic()
            rack.cut([old], followers)
            new = rack.wait(lambda: next((m for m in followers if (d := rack.detail(m))
                                          and d["state"] == "leader" and d["serving"]), None), 20,
                            f"one of {followers} to lead")
            elected = time.monotonic() - cut
            moved = rack.wait(lambda: next((t for t, _, _ in acked if t > cut + elected), None), 20,
                              "a write acknowledged by the new leader") - cut
            rack.wait(lambda: (d := rack.detail(old)) and not (d["state"] == "leader" and d["has_quorum"]), 10,
                      f"the old leader {old} to know it has no quorum")
            during = len(acked)
            rack.heal()
            healed = time.monotonic()
            rack.wait(lambda: (d := rack.detail(old)) and d["state"] == "follower" and d["leader"], 20,
                      f"{old} to rejoin as a follower")
            rejoined = time.monotonic() - healed
            rack.wait(lambda: len(acked) >= during + 10, 20, "writes after the heal")
        finally:
            stop.set()
            writer.join(30)
        rack.wait_healthy(30)
        assert rack.leader() == new
        futures = [f for _, _, f in acked]
        assert [f.result(timeout=60) for f in futures] == [2 * i for _, i, _ in acked]
        for f in futures:
            view = c.job(f.job).value  # every acknowledged write is in the ledger, read from the leader
            assert view["state"] == "done" and view["done"] == view["total"] == 1, view
        recorded_once(c, futures)
    print(f"\n[rack b] cut leader {old} from {followers}: {new} leads after {elected:.2f} s, the first write "
          f"acknowledged through it {moved:.2f} s after the cut; {old} a follower {rejoined:.2f} s after the heal; "
          f"{len(acked)} writes acknowledged, none lost; {len(errors)} submits not acknowledged")


# ---- c: a worker cut off mid-task ------------------------------------------------------------------


def test_worker_cut_off_mid_task_reruns_elsewhere_recorded_once(healthy: Rack):
    rack = healthy
    with rack.client() as c:
        future = c.submit(slow_double, 21, 4.0)
        # the worker whose own status lists this task (another may still be finishing a task of an earlier test)
        mine = f"{future.job}/0"
        victim = rack.wait(lambda: next((n for n, d in rack.details(rack.role("worker")).items()
                                         if d and any(r["task"] == mine for r in d["running"])), None),
                           20, "a worker running the task")
        survivor = other(rack.role("worker"), victim)
        cut = time.monotonic()
        rack.isolate(victim)
        assert future.result(timeout=60) == 42
        rerun = time.monotonic() - cut
        attempts = [(a["outcome"], a["worker"]) for a in c.task(future.job, 0).value["attempts"]]
        assert attempts[0] == ("lost", victim) and attempts[-1] == ("done", survivor), attempts

        rack.heal()
        rack.wait_healthy(30)
        # The victim's own run ended while it was cut off: its result, sent after the heal, is refused.
        late = rack.wait(lambda: (d := rack.detail(victim)) and not d["running"] and d["results_unacked"] == 0
                         and d, 20, f"{victim} to have handed in its late result")
        view = c.task(future.job, 0).value
        assert Counter(a["outcome"] for a in view["attempts"])["done"] == 1, view
        assert [(a["outcome"], a["worker"]) for a in view["attempts"]] == attempts, view
        job = c.job(future.job).value
        assert job["done"] == job["total"] == 1, job
        after = work_goes_on(rack, c, "c-after")
    print(f"\n[rack c] cut {victim} mid-task: the task finished on {survivor} {rerun:.2f} s after the cut; "
          f"late result after the heal: refused {late['core'].get('results_refused', 0)}, duplicates in the ledger "
          f"{job['duplicates']}; new work took {after:.2f} s")


# ---- d: the pair split with its workers ---------------------------------------------------------------


def test_pair_split_with_its_workers_mid_run_then_healed(healthy: Rack):
    rack = healthy
    b1, b2 = rack.role("balancer")
    w1, w2 = rack.role("worker")
    with rack.client() as c:
        futures, expected, calls = start_work(c, 200, 20, "d")
        tally = Tally(futures)
        rack.wait(lambda: tally.done() >= 40, 60, "40 tasks done before the split")
        cut = time.monotonic()
        done_at_cut = tally.done()
        rack.cut([b1, w1], [b2, w2])
        rack.wait(lambda: all((d := rack.detail(b)) and d["state"] == "active" for b in (b1, b2)), 20,
                  "both balancers active, each with its side's worker")
        split = time.monotonic() - cut
        assert results(futures, calls, 120) == expected
        finished = time.monotonic() - cut
        assert done_at_cut < len(futures), "the work was all done before the split"
        assert all(len(t) == 1 for t in tally.times.values()) and len(tally.times) == len(futures)

        settled, after, duplicates = heal_and_go_on(rack, c, futures, "d-after")
    print(f"\n[rack d] split {{{b1},{w1}}} | {{{b2},{w2}}} at {done_at_cut}/{len(futures)} done: both active after "
          f"{split:.2f} s, all work done {finished:.2f} s after the split; after the heal the rack served as a "
          f"whole in {settled:.2f} s (active: {rack.active()}), new work took {after:.2f} s; duplicate "
          f"completions refused: {duplicates}")


# ---- e: the active balancer cut off from the workers, not from its peer nor the masters ---------------
#
# Binary Star alone (zguide ch. 4) would stall here: the passive one takes over only when its peer
# is silent, and the peer is not. Ours adds the stranded rule (balancer/binary_star.py): the
# active one purges the workers it no longer hears and says so in its heartbeats; once it has
# announced none for a liveness period, a worker turning to the passive one makes it take over,
# and the stranded one, hearing that its peer has the workers, stands down.


def test_active_balancer_cut_off_from_the_workers_only_the_peer_takes_over_nothing_lost(healthy: Rack):
    rack = healthy
    old = rack.active()
    new = other(rack.role("balancer"), old)
    with rack.client() as c:
        futures, expected, calls = start_work(c, 200, 20, "e")
        tally = Tally(futures)
        rack.wait(lambda: tally.done() >= 40, 60, "40 tasks done before the cut")
        cut = time.monotonic()
        done_at_cut = tally.done()
        rack.cut([old], rack.role("worker"))
        rack.wait(lambda: (d := rack.detail(new)) and d["state"] == "active" and d["master"].get("attached")
                  and len(d["workers"]) == len(rack.role("worker")), 30,
                  f"{new} to take over with every worker while {old} still hears it")
        takeover = time.monotonic() - cut
        rack.wait(lambda: (d := rack.detail(old)) and d["state"] == "passive", 10, f"{old} to stand down")
        resumed = rack.wait(lambda: tally.first_after(cut + takeover), 30, f"a task to finish through {new}") - cut
        assert results(futures, calls, 120) == expected  # all of it during the cut
        finished = time.monotonic() - cut
        assert done_at_cut < len(futures), "the work was all done before the cut"
        assert all(len(t) == 1 for t in tally.times.values()) and len(tally.times) == len(futures)
        assert rack.detail(old)["state"] == "passive", "the stranded balancer took the work back during the cut"

        settled, after, duplicates = heal_and_go_on(rack, c, futures, "e-after")
    print(f"\n[rack e] cut {old} from the workers at {done_at_cut}/{len(futures)} done: {new} active with every "
          f"worker after {takeover:.2f} s, first task through it {resumed:.2f} s after the cut, all done "
          f"{finished:.2f} s after the cut; after the heal the rack served as a whole in {settled:.2f} s (active: "
          f"{rack.active()}), new work took {after:.2f} s; duplicate completions refused: {duplicates}")


# ---- f: the active balancer paused (SIGSTOP) mid-run, then continued --------------------------------


def test_active_balancer_paused_mid_run_then_continued(healthy: Rack):
    rack = healthy
    old = rack.active()
    new = other(rack.role("balancer"), old)
    with rack.client() as c:
        futures, expected, calls = start_work(c, 200, 20, "f")
        tally = Tally(futures)
        rack.wait(lambda: tally.done() >= 40, 60, "40 tasks done before the pause")
        paused = time.monotonic()
        done_at_pause = tally.done()
        rack.signal(old, signal.SIGSTOP)
        try:
            rack.wait(lambda: (d := rack.detail(new)) and d["state"] == "active" and d["master"].get("attached"),
                      20, f"{new} to take over from the paused {old}")
            takeover = time.monotonic() - paused
            moved = tally.done()
            rack.wait(lambda: tally.done() >= moved + 10, 20, f"10 tasks done through {new} while {old} is paused")
            resumed = time.monotonic() - paused
        finally:
            rack.signal(old, signal.SIGCONT)
        continued = time.monotonic()
        assert results(futures, calls, 120) == expected
        assert done_at_pause < len(futures), "the work was all done before the pause"
        assert all(len(t) == 1 for t in tally.times.values()) and len(tally.times) == len(futures)
        rack.wait_healthy(30)
        settled = time.monotonic() - continued
        after = work_goes_on(rack, c, "f-after")
        duplicates = recorded_once(c, futures)
    print(f"\n[rack f] paused {old} at {done_at_pause}/{len(futures)} done: {new} active and attached after "
          f"{takeover:.2f} s, 10 more tasks done {resumed:.2f} s after the pause; continued, the rack served as a whole {settled:.2f} s later (active: {rack.active()}), "
          f"new work took {after:.2f} s; duplicate completions refused: {duplicates}")
