"""bench/dispatch.py's arithmetic and protocols, without clusters: the rates through each hop
from two status samples, the interleaved rounds, the peers' command loop, the acceptance."""

from __future__ import annotations

import json

from bench.dispatch_hops import Sample, hop_rates
from bench.dispatch_peers import LATENCY_WARMUP, serve
from bench.dispatch_report import acceptance
from bench.dispatch_systems import interleave


def node(role: str, state: str | None, core: dict, messages: tuple[int, int] = (0, 0), **extra) -> dict:
    return {"role": role, "pid": 1, "state": state, "counters": {"messages_in": messages[0], "messages_out": messages[1]},
            "core": core, **extra}


def test_hops_sum_the_masters_counts_across_a_leader_change_and_count_new_counters_from_zero():
    a = Sample(10.0, {
        "m1": node("master", "leader", {"tasks_assigned": 100, "results_recorded": 90}, commit_index=5),
        "m2": node("master", "follower", {}, commit_index=5),
        "b1": node("balancer", "active", {"placed": 100, "results_forwarded": 90}, dispatch={"added": 100}),
        "w1": node("worker", "registered", {"tasks_started": 100, "tasks_done": 90}),
    }, cpu={"m1": 1.0, "m2": 0.5, "b1": 0.2, "w1": 3.0})
    b = Sample(12.0, {
        "m1": node("master", "follower", {"tasks_assigned": 150, "results_recorded": 140}, commit_index=9),
        # m2 took over: its counters appear for the first time
        "m2": node("master", "leader", {"tasks_assigned": 50, "results_recorded": 60, "results_duplicate": 2},
                   commit_index=9, ledger={"tasks_done": 7}),
        "b1": node("balancer", "active", {"placed": 200, "results_forwarded": 200}, (300, 400), dispatch={"added": 200}),
        "w1": node("worker", "registered", {"tasks_started": 200, "tasks_done": 200}),
    }, cpu={"m1": 1.5, "m2": 0.9, "b1": 0.4, "w1": None})
    r = hop_rates(a, b, client_tasks=120)
    hops = {h["hop"].split(" (")[0]: h for h in r["hops"]}
    assert r["leader"] == "m2" and r["leader_changed"] is True
    assert r["committed"] == 110 and r["committed_per_s"] == 55.0  # (140-90) + (60-0)
    assert hops["master -> balancer: tasks assigned"]["tasks"] == 100
    assert hops["client -> master: tasks submitted, committed"]["per_s"] == 60.0
    assert hops["master: results decided"]["tasks"] == 112  # every result code, the duplicates too
    assert hops["workers -> balancer: results"]["tasks"] == 110
    assert r["raft"]["entries"] == 4
    assert r["messages"]["b1"]["out_per_task"] == round(400 / 110, 3)
    assert r["cpu"]["m2"]["us_per_task"] == round(0.4e6 / 110, 1)
    assert r["cpu"]["w1"] is None  # gone at the second sample: no figure rather than a wrong one


def test_hops_leave_out_what_a_node_does_not_report():
    a = Sample(0.0, {"m1": node("master", "leader", {"results_recorded": 1})})
    b = Sample(1.0, {"m1": node("master", "leader", {"results_recorded": 5})})
    hops = {h["hop"]: h["tasks"] for h in hop_rates(a, b)["hops"]}
    assert hops["master: results committed (results_recorded)"] == 4
    assert hops["balancer -> workers: tasks placed"] is None


class FakeSystem:
    def __init__(self, seconds: float, fail_at: int | None = None) -> None:
        self.seconds, self.fail_at, self.calls = seconds, fail_at, []

    def batch(self, n: int) -> float:
        self.calls.append(("batch", n))
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            raise RuntimeError("went away")
        return self.seconds

    def latency(self, k: int) -> list[float]:
        self.calls.append(("latency", k))
        return [self.seconds * 10] * k


def test_interleave_rotates_the_order_keeps_every_system_up_and_drops_one_that_fails():
    systems = {"ours": FakeSystem(0.5), "ray": FakeSystem(1.0), "dask": FakeSystem(2.0, fail_at=3)}
    r = interleave(systems, rounds=3, tasks=100, round_trips=30, say=lambda _: None)
    s = r["systems"]
    assert s["ours"]["order"] == [0, 2, 1] and s["ray"]["order"] == [1, 0, 2]
    assert s["ours"]["tasks_per_s_rounds"] == [200.0] * 3 and s["ours"]["latency"]["round_trips"] == 30
    assert "went away" in s["dask"]["error"] and len(s["dask"]["tasks_per_s_rounds"]) == 1
    assert r["ratios"]["ray"]["tasks_per_s"] == 2.0 and r["ratios"]["ray"]["latency_median"] == 0.5


def test_the_peers_command_loop_answers_one_json_line_per_command_and_survives_a_bad_one():
    import contextlib

    @contextlib.contextmanager
    def opener(workers: int):
        yield {"batch": lambda n: list(range(n)), "round_trip": lambda i: i, "start_s": 0.1}

    class Args:
        workers, warmup_tasks = 2, 10

    lines: list[dict] = []
    serve(opener, Args, lambda d: lines.append(json.loads(json.dumps(d))),
          iter(["batch 50\n", "latency 3\n", "frobnicate 1\n", "batch x\n", "quit\n", "batch 1\n"]))
    assert [x["op"] for x in lines] == ["ready", "batch", "latency", "frobnicate", "batch", "quit"]
    assert lines[0]["warmup_tasks"] == 10 and lines[0]["start_s"] == 0.1 and LATENCY_WARMUP > 0
    assert lines[1]["tasks"] == 50 and lines[1]["seconds"] >= 0
    assert len(lines[2]["samples_ms"]) == 3
    assert "error" in lines[3] and "error" in lines[4]


def test_acceptance_takes_the_worst_leader_feed_and_says_what_did_not_run():
    res = {"peers": {"ratios": {"ray": {"tasks_per_s": 1.6, "tasks_per_s_paired_median": 1.55, "latency_median": 2.5}}},
           "drain": {"call": {"units_per_s": 2100.0}},
           "leader": {"map": {"leader_us_per_task": 140.0}, "units": {"leader_us_per_task": 90.0}}}
    a = acceptance(res)
    assert a["ours_over_ray_tasks_per_s"]["met"] is True and a["ours_over_ray_tasks_per_s"]["paired_median"] == 1.55
    assert a["ours_over_ray_latency_median"]["met"] is False
    assert a["drain_call_units_per_s"]["met"] is True
    assert a["drain_command_units_per_s"]["value"] is None and a["drain_command_units_per_s"]["met"] is None
    assert a["leader_us_per_task"]["value"] == 140.0 and a["leader_us_per_task"]["feed"] == "map"
