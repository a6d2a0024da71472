"""Draining a work spec through a local cluster, for ``bench/dispatch.py`` (issue 23; the earlier
``true`` drain is ``bench/batch.py``'s): 3 masters, the balancer pair, one worker of 2 slots,
127.0.0.1, CURVE on, as shipped; a fresh cluster per variant.

A work spec's ``run`` is a job's ``run`` (``master/workspec.py``: ``WorkSpecs.order``), so its units
run either of two ways:

* ``call``: ``{"kind": "call", "program": cloudpickle.dumps(fn)}``: the worker's slot calls
  ``fn(key, data)`` (the unit's key and data as arguments), in the slot's long-lived child, as
  ``Client.map``'s calls run; here ``fn`` is a no-op (``unit_noop``);
* ``command``: ``{"kind": "command", "argv": ["true"]}``: a process per unit (the unit in its
  environment as ``WORK_KEY``/``WORK_DATA``).

Each variant: the spec made paused, N units loaded (outside the clock), resumed; timed from the
resume to the moment the ledger's summary (polled every 0.2 s) counts every unit finished or
failed. Checked: all N finished, none failed, and a few finished units' attempts say ``done``
on the worker. Also: CPU per unit of each process over the drain, and the rates through each
hop (``dispatch_hops``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POLL_S = 0.2


def unit_noop(key: str, data: bytes) -> None:
    """A unit's callable that does nothing (a work unit's callable gets ``(key, data)``)."""
    return None


def run_of(variant: str) -> dict[str, Any]:
    """The spec's ``run`` for ``variant`` (``call`` or ``command``)."""
    if variant == "call":
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import bench/
        return {"kind": "call", "program": cloudpickle.dumps(unit_noop)}
    if variant == "command":
        return {"kind": "command", "argv": ["true"]}
    raise ValueError(f"unknown drain variant {variant!r} (call, command)")


def _wait_drained(work: Any, spec: str, n: int, timeout: float) -> dict:
    deadline = time.perf_counter() + timeout
    while True:
        row = next(r for r in work.summary() if r["spec"] == spec)
        if row["finished"] + row["failed"] >= n or time.perf_counter() > deadline:
            return row
        time.sleep(POLL_S)  # polling the ledger's summary: the units end inside the cluster


def measure_drain(variant: str, n: int, raft: dict[str, Any] | None = None) -> dict:
    """Drain ``n`` units of ``variant`` (module docstring); units/s and the checks."""
    from bench.dispatch_hops import hop_rates, log_findings, sample
    from bench.dispatch_leader import LOAD_BATCH
    from bench.dispatch_systems import raft_options, wait_registered
    from cluster.client import Client
    from cluster.local import balancer_nodes, master_nodes, start_all, stop_all, worker_nodes
    from cluster.work import Work

    work_dir = Path(tempfile.mkdtemp(prefix=f"dispatch-drain-{variant}-"))
    masters = master_nodes(work_dir, 3, log_level="WARNING")
    raft_options(work_dir, raft)
    config, balancers = balancer_nodes(work_dir, 2, log_level="WARNING")
    workers = worker_nodes(work_dir, config, 1, slots=2, log_level="WARNING")
    nodes = masters + balancers + workers
    spec = f"drain-{variant}"
    res: dict[str, Any] = {"variant": variant, "units": n, "logs": str(work_dir),
                           "cluster": "3 masters, 2 balancers, 1 worker x 2 slots, 127.0.0.1, CURVE",
                           "run": "callable unit_noop(key, data)" if variant == "call" else "command `true`"}
    try:
        start_all(nodes, timeout=30)
        with Client([m.address for m in masters], timeout=60) as client:
            wait_registered(balancers, 1)
            work = Work(client)
            work.add_spec(spec, run_of(variant), paused=True)
            t0 = time.perf_counter()
            work.add_units(spec, ((f"u{k:07d}", b"") for k in range(n)), batch=LOAD_BATCH)
            res["load_s"] = round(time.perf_counter() - t0, 2)
            pids = {node.name: node.pid for node in nodes}
            a = sample(nodes, pids)
            t0 = time.perf_counter()
            work.resume(spec)
            row = _wait_drained(work, spec, n, timeout=120 + n / 50)
            res["drain_s"] = round(time.perf_counter() - t0, 3)
            b = sample(nodes, pids)
            res.update(finished=row["finished"], failed=row["failed"], pending=row["pending"],
                       available=row["available"], units_per_s=round(row["finished"] / res["drain_s"], 1))
            res["all_finished"] = row["finished"] == n and row["failed"] == 0
            res["examples"] = _examples(work, spec)
            res["hops"] = hop_rates(a, b)
    except Exception as exc:  # noqa: BLE001 - the report says what failed; the other parts still run
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_all(nodes[::-1])
        res["log_findings"] = log_findings(work_dir)
    return res


def _examples(work: Any, spec: str) -> dict:
    """A few finished units (their last attempt: worker, outcome) and, if any failed, why."""
    out: dict[str, Any] = {}
    done = work.units(spec, limit=3)["units"]
    out["finished"] = [{"key": u["key"], "state": u["state"],
                        "last_attempt": {k: u["attempts"][-1].get(k) for k in ("worker", "outcome")} if u["attempts"] else None}
                       for u in done]
    failed = work.units(spec, state="failed", limit=3)["units"]
    if failed:
        out["failed"] = [{"key": u["key"], "attempts": u["attempts"][-2:]} for u in failed]
    return out
