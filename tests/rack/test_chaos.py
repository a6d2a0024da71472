"""The chaos soak in the suite (issue 22): bench/chaos.py for two minutes with a fixed seed.

The soak builds a rack of its own (it owns every host for the whole run, so it does not share
the module fixture of the partition tests), injects the seed's faults across all hosts while
callables, commands, a chain of work specs and alignments run, heals, and checks through the
ledger that every acknowledged submit is there, every task and unit recorded done exactly once,
every result right, every node healthy. The faults table and the totals are printed (`pytest
-s`); a failure names the seed, how to replay it, and where the rack's logs and history are.
"""

from __future__ import annotations

import pytest

from bench.chaos import report, soak

from .rack import unavailable

pytestmark = [pytest.mark.rack, pytest.mark.timeout(600)]

SEED = 22
MINUTES = 2.0


def test_a_two_minute_chaos_soak_loses_nothing_records_nothing_twice_and_ends_healthy():
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    res = soak(SEED, MINUTES, echo=lambda line: None)
    report(res)
    v = res["verdict"]
    replay = (f"seed {SEED}: replay with .venv/bin/python bench/chaos.py --seed {SEED} --minutes {MINUTES:g}; "
              f"logs and history in {res['directory']}")
    assert v["lost"] == [], replay
    assert v["duplicated"] == [], replay
    assert v["wrong"] == [], replay
    assert v["unhealthy"] == [], replay
    assert res["teardown_problems"] == [], res["teardown_problems"]
    assert v["operations"] > 0 and v["results"] > 0 and len(res["faults"]) >= 20, v
    print(f"\n[rack chaos] seed {SEED}, {MINUTES:g} min: {len(res['faults'])} faults, {v['operations']} operations "
          f"acknowledged, {v['tasks']} tasks and {v['units']} units checked, {len(res['alignments'])} alignments; "
          f"0 lost, 0 recorded twice, 0 wrong; {v['lost_or_failed_attempts']} attempts lost or failed and retried; "
          f"the rack served as a whole {res['serving_after_heal_s']:.2f} s after the last heal, every result "
          f"{res['drained_after_heal_s']:.1f} s after it, checked in {res['check_s']:.1f} s")
