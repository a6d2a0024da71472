"""Why an attempt failed, as the ledger keeps it: one line, and the tail of what it wrote (pure).

A worker reports a failed attempt with an error line (``ZeroDivisionError: division by zero``,
``exit status 4``, ``killed after 30 s timeout``, ``killed by signal 9 (SIGKILL)``), a summary
with the end of its stderr (a callable's traceback goes there) and, when stderr was long, the
id of the file that holds all of it. A balancer reports a lost one (``worker w1 lost``), a
master an expired lease. Every failed or lost attempt keeps that in the ledger, so ``cluster
jobs JOB`` and ``cluster units`` can say why without anyone reading a worker's log.

Bounded, because the ledger is replicated and a million failing units must not make it grow by
gigabytes: the line at most ``LINE_MAX`` characters, the tail its last ``TAIL_LINES`` lines and at
most ``TAIL_MAX`` characters (the end is kept: a traceback's last lines say the most), and the
whole stderr stays a file in storage, named in the tail. A spec keeps the reasons of its newest
``KEPT_PER_SPEC`` failed attempts (``master.work_history``).
"""

from __future__ import annotations

from typing import Any

LINE_MAX = 300
TAIL_LINES = 15
TAIL_MAX = 1500
KEPT_PER_SPEC = 10_000


def line(error: str | None, fallback: str) -> str:
    """The attempt's one-line reason: its error's first line, bounded; ``fallback`` without one."""
    text = (error or "").strip().splitlines()
    first = text[0] if text else fallback
    return first if len(first) <= LINE_MAX else first[:LINE_MAX - 1] + "…"


def tail(summary: Any) -> str:
    """The end of the attempt's stderr (else stdout), bounded, and the file holding all of it."""
    if not isinstance(summary, dict):
        return ""
    out = ""
    for stream in ("stderr", "stdout"):
        data = summary.get(stream)
        if isinstance(data, (bytes, bytearray)) and data.strip():
            lines = bytes(data).decode("utf-8", "replace").rstrip().splitlines()[-TAIL_LINES:]
            out = "\n".join(lines)[-TAIL_MAX:]
            whole = summary.get(f"{stream}_file")
            if isinstance(whole, str):
                out += f"\n(all of {stream}: file {whole})"
            break
    return out


def lost_out(times: int, error: str) -> str:
    """Why a task or unit failed for good without failing itself: its attempts were lost
    ``times`` times (its ``max_lost``), each on a worker that died, was purged or went silent."""
    return f"lost {times} time{'s' * (times != 1)}: its workers kept failing (max_lost); the last: {error}"


def expired(holder: str) -> str:
    """The reason of an attempt whose lease ran out."""
    return f"lease expired: no report from {holder or 'its holder'} in time (its worker lost, or too slow)"
