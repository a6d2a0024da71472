"""The chaos soak's fault schedule (bench/chaos_faults.py): a pure function of the seed and the
duration, and within what the cluster is meant to survive."""

from __future__ import annotations

import pytest

from bench.chaos_faults import ROLE_OF, schedule, overlaps


def test_the_same_seed_and_duration_give_the_same_schedule_and_another_seed_another():
    assert schedule(22, 300) == schedule(22, 300)
    assert schedule(22, 300) != schedule(23, 300)
    assert [f.n for f in schedule(22, 300)] == list(range(len(schedule(22, 300))))


@pytest.mark.parametrize("seed", range(40))
def test_no_two_faults_take_the_same_role_at_once_and_every_one_is_healed_in_time(seed):
    faults = schedule(seed, 600)
    assert overlaps(faults) == []
    assert all(0 < f.at and f.healed_at <= 600 for f in faults)
    for f in faults:  # every host named is a rack host, the client or a symbol resolved when it starts
        assert set(f.a) | set(f.b) <= set(ROLE_OF) | {"client", "@follower"}, f


def test_a_half_hour_soak_has_the_issues_two_hundred_faults_of_every_kind():
    faults = schedule(1, 1800)
    assert len(faults) >= 200
    assert {f.kind for f in faults} == {"kill", "pause", "isolate", "cut", "oneway", "delay", "loss"}
