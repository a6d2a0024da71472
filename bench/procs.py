"""Benchmark processes: a child that runs named tasks sent over a pipe, and its parent's handle.

A bench script lists its tasks in a module-level ``TASKS`` dict (name → ``fn(ctx, conn,
**kwargs)``) and starts ``Worker(mpctx, name, "bench.<module>")``. The child imports that module,
so the tasks run the same code whether the script ran as ``python bench/x.py`` or as a module.
A task may send progress tuples on ``conn``; its return value comes back as ``("ok", value)``,
an exception as ``("error", traceback)``. ``profile=PATH`` in a task's kwargs runs it under
cProfile and dumps the stats there.
"""

from __future__ import annotations

import cProfile
import importlib
import time
import traceback
from typing import Any

import zmq


def serve(conn: Any, tasks_module: str) -> None:
    """A benchmark process: runs tasks sent by the parent until it sends None (or goes away)."""
    tasks = importlib.import_module(tasks_module).TASKS
    ctx = zmq.Context()
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                break
            if cmd is None:
                break
            name, kwargs = cmd
            try:
                conn.send(("ok", _run_task(tasks[name], ctx, conn, kwargs)))
            except Exception:  # reported to the parent, which stops the run
                conn.send(("error", traceback.format_exc()))
    finally:
        ctx.destroy(linger=0)


def _run_task(task: Any, ctx: zmq.Context, conn: Any, kwargs: dict) -> Any:
    profile = kwargs.pop("profile", None)
    if not profile:
        return task(ctx, conn, **kwargs)
    prof = cProfile.Profile()
    try:
        return prof.runcall(task, ctx, conn, **kwargs)
    finally:
        prof.dump_stats(profile)


class Worker:
    """One benchmark process and its command pipe."""

    def __init__(self, mpctx: Any, name: str, tasks_module: str, result_timeout: float = 120.0) -> None:
        self.name = name
        self.result_timeout = result_timeout
        self.conn, child = mpctx.Pipe()
        self.proc = mpctx.Process(target=serve, args=(child, tasks_module), name=name, daemon=True)
        self.proc.start()
        child.close()

    def start(self, task: str, **kwargs: Any) -> None:
        self.conn.send((task, kwargs))

    def message(self, expect: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.2):  # bounded polling: notice a dead worker, never hang
            if not self.proc.is_alive():
                raise RuntimeError(f"{self.name} died (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no answer in {timeout:.0f} s")
        tag, value = self.conn.recv()
        if tag == "error":
            raise RuntimeError(f"{self.name} failed:\n{value}")
        if tag != expect:
            raise RuntimeError(f"{self.name}: expected {expect!r}, got {tag!r}")
        return value

    def result(self, timeout: float | None = None) -> Any:
        return self.message("ok", self.result_timeout if timeout is None else timeout)

    def run(self, task: str, **kwargs: Any) -> Any:
        self.start(task, **kwargs)
        return self.result()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3)
        self.conn.close()
