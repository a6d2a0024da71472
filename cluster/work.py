"""Work specs and units from Python: the verbs of ``cluster summary``, ``specs``, ``pause`` ...

    from cluster import Client
    from cluster.work import Work

    with Client() as client:
        work = Work(client)
        work.add_spec("fetch", {"kind": "command", "argv": ["fetch.sh"]}, weight=2, max_running=50)
        work.add_units("fetch", ((f"url-{k}", url.encode()) for k, url in enumerate(urls)))
        print(work.summary())
        work.pause("fetch")

Units travel in batches (``BATCH`` units, a few in flight at once), each with its own
idempotency key: a batch resent after a leader change lands once, and a batch is added whole or
refused whole (a duplicate key, a malformed unit), so a refusal names the batch and nothing of
it is half-applied. The masters keep specs and units in the replicated ledger
(``master.workspec``, doc/workspecs.md).
"""

from __future__ import annotations

import os
from itertools import islice
from typing import Any, Callable, Iterable

from cluster.client import Client
from cluster.node.masterlink import ClusterError
from proto.messages import Work as WorkMessage

BATCH = 10_000  # units per ADD_UNITS write: ~0.5 MB on the wire, one Raft entry
WINDOW = 4  # batches in flight


class Work:
    """The work-spec verbs over a ``Client``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def add_spec(self, name: str, run: dict[str, Any], **keys: Any) -> dict[str, Any]:
        """Create a work spec: ``run`` is what each unit runs (a job's ``run``), ``keys`` its
        scheduling keys (priority, weight, max_running, max_attempts, max_lost, lease_s, then, paused),
        redundancy (replicas, quorum, compare) and ``continuous`` with ``interval``."""
        return self._write("add_spec", "", {"name": name, "run": run, **keys})

    def add_units(self, spec: str, units: Iterable, *, batch: int = BATCH,
                  progress: Callable[[int], None] | None = None) -> int:
        """Add ``units`` (``(key, data)`` or ``(key, data, priority)``, data as bytes) to
        ``spec`` in batches; ``progress(n)`` is told each batch's size as it commits. Returns how
        many were added. A refused batch raises ClusterError naming it; batches before it stay."""
        it = iter(units)
        total = 0
        window = 1  # the first batch alone finds the leader; then WINDOW at a time, sent in order to it, so
        # units keep the file's order (a batch redirected by a follower would be retried after later ones)
        while True:
            chunk = list(islice(it, batch * window))
            if not chunk:
                return total
            calls, sizes = [], []
            for start in range(0, len(chunk), batch):
                part = [list(u) for u in chunk[start:start + batch]]
                sizes.append(len(part))
                key = os.urandom(16)  # one per batch, kept across its retries
                calls.append(self.client.link.call(
                    lambda rid, part=part, key=key: WorkMessage(rid, "add_units", spec, part, key), write=True))
            self.client.link.run(calls, window, None)
            window = WINDOW
            for k, call in enumerate(calls):
                if call.error is not None:
                    first = total + k * batch  # the units that batch holds, not a whole batch's worth
                    raise ClusterError(f"units {first:,}..{first + sizes[k] - 1:,} of spec {spec!r} "
                                       f"were refused: {call.error}") from None
                added = call.result.value["added"]
                if progress:
                    progress(added)
            total += len(chunk)

    def summary(self) -> list[dict[str, Any]]:
        """Per spec: priority, weight, paused, max_running and units per state (Coordinate's
        ``summary``), highest priority first."""
        return self.client.link.request(lambda rid: WorkMessage(rid, "summary"), write=False).value

    def units(self, spec: str, *, state: str | None = None, limit: int = 100, min_attempts: int = 0,
              after: int = -1, disputed: bool = False) -> dict[str, Any]:
        """Units of ``spec`` (optionally in ``state``: available, pending, finished, failed;
        with at least ``min_attempts``; only those whose replicas disagreed when ``disputed``),
        each with its attempts (worker, start, end, outcome) and, for a redundant spec, its
        votes; ``value["next"]`` is the ``after`` of the next page."""
        body = {"state": state, "limit": limit, "min_attempts": min_attempts, "after": after, "disputed": disputed}
        return self.client.link.request(lambda rid: WorkMessage(rid, "units", spec, body), write=False).value

    def control(self, spec: str, action: str, value: Any = None) -> dict[str, Any]:
        return self._write("control", spec, {"action": action, "value": value})

    def pause(self, spec: str) -> dict[str, Any]:
        """Hand out no more units of ``spec`` (running ones finish)."""
        return self.control(spec, "pause")

    def resume(self, spec: str) -> dict[str, Any]:
        return self.control(spec, "resume")

    def prioritize(self, spec: str, priority: int) -> dict[str, Any]:
        return self.control(spec, "prioritize", priority)

    def reweight(self, spec: str, weight: float) -> dict[str, Any]:
        return self.control(spec, "weight", weight)

    def retry(self, spec: str) -> dict[str, Any]:
        """Make ``spec``'s failed units available again, with fresh attempts."""
        return self.control(spec, "retry")

    def _write(self, op: str, spec: str, body: Any) -> dict[str, Any]:
        return self.client.link.request(lambda rid: WorkMessage(rid, op, spec, body), write=True).value
