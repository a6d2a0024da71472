"""WORK requests (work specs and their units, ``master.workspec``) and the leader's unit clock.

Theory of operation
-------------------
A WORK message names an op: ``summary`` and ``units`` are reads, answered by any master from its
own ledger; ``add_spec``, ``add_units`` and ``control`` are writes for the log, taken by the
leader only and answered once they commit (as the client API's writes are, ``master.api``). A
body of the wrong shape is refused before it costs a Raft round.

Once a second a serving leader takes back the work units whose leases ended (``ExpireLeases``)
and makes the units of continuous specs that are due (``MakeUnits``): its wall clock goes into
the command, so every master ends and makes the same ones.

Handlers take ``(event, message, now)`` and return effects; pure, like the core that holds them.
"""

from __future__ import annotations

import logging
from typing import Any

from cluster.node.events import Effect, Log, MessageReceived
from master.batching import Batcher
from master.commands import AddUnits, AddWorkSpec, ControlSpec, ExpireLeases, MakeUnits
from master.ledger import Ledger
from master.standing import MAX_LIST, Standing, app_error
from master.state import Applied
from master.workspec import WorkSpecError
from proto.errors import AppReason
from proto.messages import Work

_BODY = {"add_spec": dict, "add_units": list, "control": dict}  # the write ops and their body's type


class WorkSpecs:
    """WORK's handler and the leader's lease and continuous-unit timer."""

    def __init__(self, ledger: Ledger, standing: Standing, batcher: Batcher) -> None:
        self.ledger = ledger
        self.standing = standing
        self.batcher = batcher

    def on_work(self, ev: MessageReceived, m: Work, now: float) -> list[Effect]:
        """Work specs and units: ``summary`` and ``units`` are read here, the rest are writes for the log."""
        if m.op == "summary":
            return [self.standing.reply(ev, m.request_id, self.ledger.work.summary())]
        if m.op == "units":
            return [self._units(ev, m)]
        if m.op not in _BODY:
            return [app_error(ev, m.request_id, AppReason.REFUSED, "bad_op",
                              f"unknown work op {m.op!r}; the ops are add_spec, add_units, control, summary, units")]
        refusal = self.standing.writable(ev, m.request_id)
        if refusal is not None:
            return [refusal]
        shape = _BODY[m.op]
        if not isinstance(m.body, shape):  # refused before it costs a Raft round
            return [app_error(ev, m.request_id, AppReason.REFUSED, "bad_units" if m.op == "add_units" else "bad_spec",
                              f"{m.op} takes a {'list of units' if shape is list else 'map'} as its body, "
                              f"not {type(m.body).__name__}")]
        at = self.standing.wall(now)
        if m.op == "add_spec":
            command: Any = AddWorkSpec(m.body, at)
        elif m.op == "add_units":
            command = AddUnits(m.spec, m.body, at, m.key)
        else:
            command = ControlSpec(m.spec, str(m.body.get("action", "")), at, m.body.get("value"))
        return self.batcher.enqueue(command, ("write", ev.route, m.request_id), ev.stimulus_id, now)

    def _units(self, ev: MessageReceived, m: Work) -> Effect:
        """The ``units`` read: one spec's units, filtered and paged as the body asks."""
        q = m.body if isinstance(m.body, dict) else {}
        try:
            view = self.ledger.work.units_view(m.spec, q.get("state"), max(1, min(int(q.get("limit", 100)), MAX_LIST)),
                                               int(q.get("min_attempts", 0)), int(q.get("after", -1)),
                                               q.get("disputed") is True)
        except (WorkSpecError, TypeError, ValueError) as exc:
            return app_error(ev, m.request_id, AppReason.REFUSED, getattr(exc, "code", "bad_query"), str(exc))
        return self.standing.reply(ev, m.request_id, view)

    def expire_leases(self, now: float, cause: str) -> list[Effect]:
        """Once a second, a serving leader takes back the work units whose leases ended and makes
        the units of continuous specs that are due (its clock, in the command, so every master
        ends and makes the same ones)."""
        if not self.standing.serving():
            return []
        wall = self.standing.wall(now)
        out: list[Effect] = []
        if self.ledger.work.has_expired(wall):
            out += self.batcher.enqueue(ExpireLeases(wall), ("leases",), cause, now)
        due = self.ledger.work.due(wall)
        if due:  # continuous specs: the same clock decides when their next unit is made
            out += self.batcher.enqueue(MakeUnits(due, wall), ("made",), cause, now)
        return out

    def made(self, reply: tuple, result: Applied, log_index: int, now: float, cause: str) -> list[Effect]:
        """A ``made`` reply: continuous specs' units were made."""
        if not (result.ok and result.value["made"]):
            return []
        self.standing.count("continuous_units", len(result.value["made"]))
        return [Log(logging.INFO, f"continuous units made: {', '.join(result.value['made'])}", cause)]

    def leases_ended(self, reply: tuple, result: Applied, log_index: int, now: float, cause: str) -> list[Effect]:
        """A ``leases`` reply: work units whose leases ended are handed out again."""
        if not (result.ok and result.value["expired"]):
            return []
        self.standing.count("leases_expired", result.value["expired"])
        return [Log(logging.INFO, f"{result.value['expired']} work-unit leases ended: their units are handed out again",
                    cause)]
