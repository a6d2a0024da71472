"""Why an attempt failed, kept in the ledger (master/reasons.py): for tasks and for work units,
bounded, and surviving a snapshot."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from master import reasons, views
from master.commands import FAILED, LOST, AssignTasks, CompleteTask
from master.ledger import Ledger
from master.workspec import DONE, FAILED_OUTCOME, WorkSpecError, WorkState, spec_id

from .test_ledger import assign, complete, fences, jid, submit

TRACEBACK = b"".join(f"  frame {i}\n".encode() for i in range(40)) + b"ZeroDivisionError: division by zero\n"


def test_a_failed_task_attempt_keeps_its_line_and_the_end_of_its_traceback():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1, "max_attempts": 2})
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    summary = {"stderr": TRACEBACK, "stderr_file": "ab" * 16}
    complete(ledger, jid(1), 0, f, outcome=FAILED, error="ZeroDivisionError: division by zero", summary=summary)
    (attempt,) = views.task_view(ledger.state, jid(1), 0)["attempts"]
    assert attempt["outcome"] == "failed" and attempt["error"] == "ZeroDivisionError: division by zero"
    lines = attempt["tail"].splitlines()
    assert lines[-2] == "ZeroDivisionError: division by zero" and len(lines) == reasons.TAIL_LINES + 1
    assert lines[-1] == f"(all of stderr: file {'ab' * 16})"
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    complete(ledger, jid(1), 0, f, outcome=LOST, error="worker w1 lost")
    lost = views.task_view(ledger.state, jid(1), 0)["attempts"][1]
    assert (lost["outcome"], lost["error"], lost["tail"]) == ("lost", "worker w1 lost", "")
    restored = Ledger.restore(ledger.snapshot())
    assert views.task_view(restored.state, jid(1), 0) == views.task_view(ledger.state, jid(1), 0)


def test_a_done_attempt_keeps_no_reason():
    ledger = Ledger()
    submit(ledger, "range", {"count": 1})
    f = fences(assign(ledger, [(jid(1), 0)]))[(jid(1), 0)]
    complete(ledger, jid(1), 0, f, summary={"stderr": b"a warning\n"})
    (attempt,) = views.task_view(ledger.state, jid(1), 0)["attempts"]
    assert attempt["error"] is None and attempt["tail"] == ""


def _spec_with_a_failing_unit() -> tuple[Ledger, bytes]:
    ledger = Ledger()
    w = ledger.work
    w.add_spec({"name": "sq", "run": {"kind": "command", "argv": ["sh", "-c", "exit 4"]}, "max_attempts": 2,
                "max_lost": 1})
    w.add_units("sq", [["u1", b""]])
    return ledger, spec_id("sq")


def test_a_failed_unit_says_why_and_an_expired_lease_says_so():
    ledger, sid = _spec_with_a_failing_unit()
    ledger.apply(AssignTasks(1, 1, "b1", [(sid, 0)], 10.0))
    ledger.apply(CompleteTask(sid, 0, 1, 1, FAILED, "w1", {"stderr": b"sh: oops\n", "exit_code": 4}, None,
                              "exit status 4", 11.0))
    ledger.apply(AssignTasks(1, 2, "b1", [(sid, 0)], 12.0))
    ledger.work.expire(10_000.0)
    units = ledger.work.units_view("sq")["units"]
    first, second = units[0]["attempts"]
    assert (first["outcome"], first["reason"], first["tail"], first["worker"]) == ("failed", "exit status 4", "sh: oops", "w1")
    # its last attempt used up max_lost: its reason says so
    assert second["outcome"] == "lost" and second["reason"] == reasons.line(reasons.lost_out(1, reasons.expired("b1")), "")
    assert second["reason"].startswith("lost 1 time: its workers kept failing")
    assert units[0]["state"] == "failed"
    ledger.work.validate_state()
    again = WorkState.from_state(msgspec.msgpack.decode(msgspec.msgpack.encode(ledger.work.to_state())))
    assert again.units_view("sq") == ledger.work.units_view("sq")


def test_a_spec_keeps_the_reasons_of_its_newest_failures_only(monkeypatch):
    monkeypatch.setattr("master.work_history.KEPT_PER_SPEC", 3)
    w = WorkState()
    w.add_spec({"name": "s", "run": {"kind": "call"}, "max_attempts": 1})
    w.add_units("s", [[f"u{i}", b""] for i in range(5)])
    sid = spec_id("s")
    for uid in range(5):
        w.assign([(sid, uid, (1, uid + 1))], "b1", 1.0)
        w.complete(sid, uid, (1, uid + 1), FAILED_OUTCOME, "w1", b"", 2.0, reason=(f"boom {uid}", ""))
    w.validate_state()
    kept = [a["reason"] for u in w.units_view("s")["units"] for a in u["attempts"]]
    assert kept == [None, None, "boom 2", "boom 3", "boom 4"]
    assert DONE != FAILED_OUTCOME


@given(st.text(max_size=5000), st.binary(max_size=20_000), st.one_of(st.none(), st.text(max_size=40)))
def test_reasons_are_bounded_whatever_a_worker_sends(error, stderr, whole):
    summary = {"stderr": stderr, **({"stderr_file": whole} if whole is not None else {})}
    assert len(reasons.line(error, "failed")) <= reasons.LINE_MAX
    assert "\n" not in reasons.line(error, "failed")
    assert len(reasons.tail(summary)) <= reasons.TAIL_MAX + len(f"\n(all of stderr: file {whole})")


def test_a_spec_whose_run_no_worker_runs_is_refused_at_once():
    w = WorkState()
    for run, words in (({"kind": "comand", "argv": ["sh"]}, "'comand'"), ({"kind": "command", "env": {"A": 1}}, "'env'")):
        with pytest.raises(WorkSpecError) as caught:
            w.add_spec({"name": "bad2", "run": run})
        assert caught.value.code == "bad_run" and words in caught.value.text
    assert "bad2" not in w.specs


def test_a_spec_without_run_is_for_outside_workers_and_never_handed_to_the_clusters():
    w = WorkState()
    w.add_spec({"name": "outside"})  # a Coordinate gateway's: its own workers take the units
    w.add_spec({"name": "inside", "run": {"kind": "call"}})
    w.add_units("outside", [["a", b""]])
    w.add_units("inside", [["b", b""]])
    assert w.ready(10) == [(spec_id("inside"), 0)]
    assert {r["spec"]: r["available"] for r in w.summary()} == {"outside": 1, "inside": 1}
