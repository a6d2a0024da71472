"""The peer half of the dispatch benchmark: Dask and Ray measured from inside their own venv.

``bench/dispatch.py`` runs this file with ``bench/.peers-venv/bin/python -I`` (isolated: neither
the project nor ``bench/`` is on ``sys.path``), one peer per process::

    bench/.peers-venv/bin/python -I bench/dispatch_peers.py dask --tasks 5000 --reps 5 --round-trips 300

and reads the one JSON line it prints on stdout (progress goes to stderr). The measurement loop
(``measure``) takes two callables and is the same for every system, ours included: the parent
imports it from here. This file needs only the standard library at import time; ``dask`` and
``ray`` are imported inside their runners.

* **Throughput**: one untimed warm-up batch (workers started, the function shipped), then R
  batches of N no-op tasks submitted all at once the idiomatic fast way; each batch is timed from
  the first submit to the last result, tasks/s = N / that time.
* **Latency**: a few untimed round trips, then K sequential ones: submit one task, wait for its
  result; the samples are in ms.

Both peers are kept on loopback with their scratch files under ``$TMPDIR`` (the parent points it
at a temporary directory it removes), and every process they start is stopped before the line
is printed (``client.close(); cluster.close()``, ``ray.shutdown()``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from typing import Any, Callable

LATENCY_WARMUP = 10  # untimed round trips before the K timed ones


def noop(i: int) -> int:
    """The task: does nothing, returns its argument (checked, so no batch is lost)."""
    return i


def log(text: str) -> None:
    print(f"dispatch_peers: {text}", file=sys.stderr, flush=True)


def measure(batch: Callable[[int], list], round_trip: Callable[[int], Any], tasks: int, reps: int,
            round_trips: int, warmup_tasks: int) -> dict:
    """Throughput and latency of one system, given as two callables.

    ``batch(n)`` submits ``noop(0) … noop(n-1)`` at once and returns their results in order;
    ``round_trip(i)`` submits ``noop(i)`` and returns its result.
    """
    expect = sum(range(warmup_tasks))
    t0 = time.perf_counter()
    if sum(batch(warmup_tasks)) != expect:
        raise AssertionError("warm-up batch: wrong results")
    warmup_s = time.perf_counter() - t0
    rates = []
    expect = sum(range(tasks))
    for rep in range(reps):
        t0 = time.perf_counter()
        out = batch(tasks)
        dt = time.perf_counter() - t0
        if len(out) != tasks or sum(out) != expect:
            raise AssertionError(f"batch {rep}: {len(out)} results, wrong sum")
        rates.append(tasks / dt)
        log(f"  batch {rep + 1}/{reps}: {tasks / dt:,.0f} tasks/s")
    for i in range(LATENCY_WARMUP):
        round_trip(i)
    now = time.perf_counter_ns
    samples = []
    for i in range(round_trips):
        t0 = now()
        if round_trip(i) != i:
            raise AssertionError(f"round trip {i}: wrong result")
        samples.append((now() - t0) / 1e6)
    return {"warmup": {"tasks": warmup_tasks, "seconds": warmup_s},
            "throughput": {"tasks": tasks, "tasks_per_s_reps": rates},
            "latency": {"round_trips": round_trips, "warmup": LATENCY_WARMUP,
                        "samples_ms": [round(s, 4) for s in samples]}}


# ---- the peers ---------------------------------------------------------------------------------


def run_dask(args: argparse.Namespace) -> dict:
    """Dask ``LocalCluster``: 2 worker processes (nannies), 1 thread each, on 127.0.0.1."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR,
                           local_directory=os.environ.get("TMPDIR"))
    try:
        client = Client(cluster)
        try:
            client.wait_for_workers(args.workers, timeout=60)
            start_s = time.perf_counter() - t0

            def batch(n: int) -> list:
                return client.gather(client.map(noop, range(n), pure=False))

            def round_trip(i: int) -> Any:
                return client.submit(noop, i, pure=False).result()

            res = measure(batch, round_trip, args.tasks, args.reps, args.round_trips, args.warmup_tasks)
            res["workers"] = len(client.scheduler_info()["workers"])
        finally:
            client.close()
    finally:
        cluster.close()
    res["start_s"] = start_s
    res["setup"] = (f"distributed.LocalCluster(n_workers={args.workers}, threads_per_worker=1, processes=True, "
                    "host='127.0.0.1'); client.map(noop, range(N), pure=False) + client.gather; "
                    "client.submit(noop, i, pure=False).result()")
    return res


def run_ray(args: argparse.Namespace) -> dict:
    """Ray: a local instance, ``num_cpus=2``, on 127.0.0.1, no dashboard, no usage stats."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             _node_ip_address="127.0.0.1", _temp_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ray"),
             object_store_memory=256 * 1024 * 1024)
    try:
        start_s = time.perf_counter() - t0
        remote_noop = ray.remote(noop)

        def batch(n: int) -> list:
            return ray.get([remote_noop.remote(i) for i in range(n)])

        def round_trip(i: int) -> Any:
            return ray.get(remote_noop.remote(i))

        res = measure(batch, round_trip, args.tasks, args.reps, args.round_trips, args.warmup_tasks)
        res["node_ip"] = ray.util.get_node_ip_address()
    finally:
        ray.shutdown()
    res["start_s"] = start_s
    res["setup"] = (f"ray.init(num_cpus={args.workers}, include_dashboard=False, _node_ip_address='127.0.0.1'); "
                    "ray.get([noop.remote(i) for i in range(N)]); ray.get(noop.remote(i))")
    return res


PEERS = {"dask": (run_dask, ("dask", "distributed")), "ray": (run_ray, ("ray",))}


def versions(names: tuple[str, ...]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure one peer (runs inside bench/.peers-venv).")
    ap.add_argument("peer", choices=sorted(PEERS))
    ap.add_argument("--tasks", type=int, default=5000, help="no-op tasks per throughput batch")
    ap.add_argument("--reps", type=int, default=5, help="timed throughput batches")
    ap.add_argument("--round-trips", type=int, default=300, help="timed sequential round trips")
    ap.add_argument("--warmup-tasks", type=int, default=1000, help="tasks in the untimed warm-up batch")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (Dask) / num_cpus (Ray)")
    args = ap.parse_args(argv)
    runner, packages = PEERS[args.peer]
    t0 = time.perf_counter()
    res = {"system": args.peer, "versions": versions(packages), "python": platform.python_version(),
           "pid": os.getpid()}
    log(f"{args.peer}: {args.reps} batches of {args.tasks:,} tasks, {args.round_trips} round trips")
    res.update(runner(args))
    res["elapsed_s"] = time.perf_counter() - t0
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
