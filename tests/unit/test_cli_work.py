"""How `cluster units` and `cluster summary` show redundant specs' votes (the rendering only:
the masters' views are given; the commands themselves run against a cluster in
tests/integration/test_cli_commands.py)."""

from __future__ import annotations

import contextlib

from click.testing import CliRunner

from cluster import cli_work

VIEW = {"units": [
    {"unit": 0, "key": "u0", "state": "finished", "attempts": [{"worker": w, "outcome": "done"} for w in ("w1", "w3", "w2")],
     "ballots": {"votes": [["w1", "aa" * 16], ["w3", "bb" * 16], ["w2", "aa" * 16]], "winner": "aa" * 16,
                 "disputed": True}},
    {"unit": 1, "key": "u1", "state": "failed", "attempts": [{"worker": w, "outcome": "done"} for w in ("w1", "w2", "w3")],
     "ballots": {"votes": [["w1", "cc" * 16], ["w2", "dd" * 16], ["w3", "ee" * 16]], "winner": None, "disputed": True}},
], "next": None}
SUMMARY = [{"spec": "check", "priority": 0, "weight": 1.0, "paused": False, "max_running": None, "replicas": 3,
            "quorum": 2, "continuous": None, "available": 0, "pending": 0, "finished": 1, "failed": 1, "total": 2,
            "disputed": 2}]


class FakeWork:
    def units(self, spec, **kw):
        assert kw["disputed"] is True
        return VIEW

    def summary(self):
        return SUMMARY


def test_disputed_units_show_every_vote_and_the_quorum_s(monkeypatch):
    monkeypatch.setattr(cli_work, "_session", lambda *a, **k: contextlib.nullcontext(object()))
    monkeypatch.setattr(cli_work, "_work", lambda client: FakeWork())
    out = CliRunner().invoke(cli_work.units, ["check", "--disputed"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "w1: aaaaaaaa*; w3: bbbbbbbb; w2: aaaaaaaa*" in out.output
    assert "w1: cccccccc; w2: dddddddd; w3: eeeeeeee (no quorum)" in out.output
    summary = CliRunner().invoke(cli_work.summary, [], terminal_width=200)
    assert summary.exit_code == 0 and "disputed" in summary.output
    assert summary.output.splitlines()[3].split("│")[-2].strip() == "2"
