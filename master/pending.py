"""Why assigned tasks are not running yet, as the attached balancer tells it (pure).

The ledger records a task as assigned once the leader hands it to the balancer; whether a worker
runs it is the balancer's to know. A task no worker can take (it needs 64 cores and the largest
worker has 2; no worker is registered) would read as "running" in `cluster jobs`. So the balancer
tells the leader, once a second, which tasks it holds unplaced and why (TASK_WAITING), and the
leader shows it in job views (Slurm's REASON column): ``waiting`` tasks with their reasons, and
``assigned`` less them as ``running``.

Soft state: it is the leader's alone, replaced by each report, and forgotten after ``STALE_S``
without one (a balancer gone quiet) or when another balancer attaches.
"""

from __future__ import annotations

from typing import Any

STALE_S = 5.0  # a report older than this says nothing any more


class WaitingBoard:
    """The latest TASK_WAITING of the attached balancer."""

    def __init__(self) -> None:
        self.by_job: dict[bytes, list[tuple[int, str]]] = {}
        self.total = 0
        self.heard_at: float | None = None

    def update(self, total: int, rows: list[list[Any]], now: float) -> str | None:
        """Take a report; returns why it is malformed (nothing taken), or None."""
        by_job: dict[bytes, list[tuple[int, str]]] = {}
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], bytes) and len(row[0]) == 16
                    and isinstance(row[1], int) and row[1] > 0 and isinstance(row[2], str)):
                return f"a row of TASK_WAITING is not [job id, tasks, reason]: {row!r:.80}"
            by_job.setdefault(row[0], []).append((row[1], row[2][:300]))
        self.by_job, self.total, self.heard_at = by_job, total, now
        return None

    def forget(self) -> None:
        self.by_job, self.total, self.heard_at = {}, 0, None

    def of(self, job: bytes, now: float) -> list[tuple[int, str]]:
        if self.heard_at is None or now - self.heard_at > STALE_S:
            return []
        return self.by_job.get(job, [])

    def annotate(self, view: dict[str, Any], now: float) -> dict[str, Any]:
        """A job view (``master.views.job_view``) with ``waiting``, ``waiting_reasons`` and
        ``running`` (assigned less waiting); a job that is not active waits for nothing."""
        rows = self.of(bytes.fromhex(view["job"]), now) if view.get("state") == "active" else []
        waiting = min(view.get("assigned", 0), sum(n for n, _ in rows))
        return {**view, "waiting": waiting, "running": view.get("assigned", 0) - waiting,
                "waiting_reasons": [{"tasks": n, "reason": why} for n, why in rows]}

    def status(self, now: float) -> dict[str, Any]:
        fresh = self.heard_at is not None and now - self.heard_at <= STALE_S
        return {"tasks": self.total if fresh else None, "jobs": len(self.by_job) if fresh else None}
