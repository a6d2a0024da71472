"""A slot's task while it runs, and how it ended, in ``executor``'s words (worker.slots runs it).

A task's output is captured per stream as it is read (head and tail, capped as ``executor``
caps a pipe) and told to its ``listen`` chunk by chunk. Its ending is worded as the one-shot
executor words it, so a task reads the same whether a slot or ``executor`` ran it: a callable,
tile or trace from its child's reply, or, when the child died, from the wait status (``exit
status 3 before the callable returned``, ``killed by signal 11 (SIGSEGV) ...``, ``timed out after
2 s``); a command from its wait status (``exit status 3``, ``killed after 2 s timeout``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from worker import executor
from worker.executor import Limits, Outcome, _Capture, _mib, _Run
from worker.slotproc import GARBLED, Child

EMPTY = memoryview(b"")


@dataclass(slots=True)
class Task:
    """The task a slot runs: what it needs to say how it ended. A command the worker started
    itself has no ``child`` but its own ``pid`` and ``pidfd``."""

    kind: str
    child: Child | None
    limits: Limits
    started: float
    pending: memoryview = EMPTY  # the rest of the request, written as the child asks for it
    listen: executor.Listen | None = None
    finish: Callable[[Outcome], Outcome] | None = None  # the kind's own last step (a tile's files)
    timed_out: bool = False
    cpu_before: float = 0.0
    pid: int = 0
    pidfd: int = -1
    captures: list[_Capture | None] = field(default_factory=lambda: [None, None])  # stdout, stderr: made
    # on their first byte (most tasks print nothing)

    def capture(self, stream: int, cap: int) -> _Capture:
        """Stream 1's (stdout) or 2's capture."""
        capture = self.captures[stream - 1]
        if capture is None:
            listen = self.listen
            capture = self.captures[stream - 1] = _Capture(
                cap, None if listen is None else (lambda chunk: listen(stream, chunk)))
        return capture

    def output(self, stream: int) -> bytes:
        capture = self.captures[stream - 1]
        return b"" if capture is None else capture.value()


def child_outcome(task: Task, reply: dict | None, status: int | None, usage: object, closed: bool,
                  index: int, counters: dict[str, int]) -> Outcome:
    """A task the slot's child ran, from its reply, or from how the child died (``status`` and
    ``usage`` from ``wait4``; ``closed``: the slot was closed under it); counted in ``counters``."""
    kind, child, limits = task.kind, task.child, task.limits
    stdout, stderr, wall_s = task.output(1), task.output(2), time.monotonic() - task.started
    if reply is not None:
        error = reply["error"]
        if error and error.startswith("MemoryError") and child.memory_bytes:
            error += f" (memory limit {_mib(child.memory_bytes)})"
        # The CPU since the previous reply: a fresh child's start-up is its first task's.
        cpu_s = max(0.0, reply["cpu_total_s"] - task.cpu_before)
        if reply is not GARBLED:
            child.cpu_total_s = reply["cpu_total_s"]
        return Outcome(ok=reply["ok"], kind=kind, exit_code=reply["status"], error=error,
                       result=reply["result"] if reply["ok"] else None, exception=reply.get("exception"),
                       stdout=stdout, stderr=stderr, wall_s=wall_s, cpu_s=cpu_s,
                       max_rss_bytes=reply["max_rss_bytes"])
    run = _Run(status=status)
    if closed:
        error = f"slot {index} was closed while the task ran"
    elif task.timed_out:
        counters["timeouts"] += 1
        error = f"timed out after {limits.timeout_s:g} s"
    else:
        counters["deaths"] += 1
        ending_error = run.ending_error(Limits(memory_bytes=child.memory_bytes))
        done = {"callable": "the callable returned", "trace": "the trace task was done",
                "command": "the command ended"}.get(kind, "the tile was done")
        error = f"{ending_error or 'exit status 0'} before {done}"
    cpu_s = max(0.0, usage.ru_utime + usage.ru_stime - task.cpu_before)
    return Outcome(ok=False, kind=kind, exit_code=run.exit_code, error=error, result=None,
                   stdout=stdout, stderr=stderr, wall_s=wall_s, cpu_s=cpu_s,
                   max_rss_bytes=usage.ru_maxrss * 1024, timed_out=task.timed_out, killed_by_signal=run.signum)


def command_outcome(task: Task, reply: dict | None, status: int | None, usage: object, closed: bool,
                    index: int, counters: dict[str, int], memory: int | None) -> Outcome:
    """A command's Outcome, from the child's account of it (``reply``) or from its own wait status
    and rusage (started by the worker), worded as ``executor`` words it; ``memory`` its limit."""
    if reply is not None:
        task.child.cpu_total_s = reply["cpu_total_s"]
        if not reply["ok"]:
            return executor._not_started("command", reply["error"])
        status, timed_out = reply["status"], reply["timed_out"]
        cpu_s, max_rss = reply["cpu_s"], reply["max_rss_bytes"]
    else:
        timed_out = task.timed_out
        cpu_s, max_rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024
    run = _Run(status=status, timed_out=timed_out, timeout_s=task.limits.timeout_s, cpu_s=cpu_s,
               max_rss_bytes=max_rss, stdout=task.output(1), stderr=task.output(2),
               wall_s=time.monotonic() - task.started)
    if run.timed_out:
        counters["timeouts"] += 1
    if closed and reply is None:
        return run.outcome("command", [f"slot {index} was closed while the task ran"], result=None, outputs={})
    limits = task.limits
    error = run.ending_error(limits if memory == limits.memory_bytes else Limits(memory_bytes=memory))
    return run.outcome("command", [error] if error else [], result=None, outputs={})
