"""The peer half of the dispatch benchmark: Dask and Ray measured from inside their own venv.

``bench/dispatch.py`` runs this file with ``bench/.peers-venv/bin/python -I`` (isolated: neither
the project nor ``bench/`` is on ``sys.path``), one peer per process, in one of two modes:

* ``--serve`` (what ``bench/dispatch.py`` uses, issue 23): the system starts, warms up, says
  ``ready`` and then answers ``batch N`` / ``latency K`` / ``quit`` lines on stdin with one JSON
  line each (``serve``), so the parent keeps every system up and interleaves their batches::

    bench/.peers-venv/bin/python -I bench/dispatch_peers.py ray --serve --warmup-tasks 1000

* one-shot: the whole measurement (``measure``) and one JSON line at the end::

    bench/.peers-venv/bin/python -I bench/dispatch_peers.py dask --tasks 5000 --reps 5 --round-trips 300

Progress goes to stderr. This file needs only the standard library at import time; ``dask`` and
``ray`` are imported inside their openers (``open_dask``, ``open_ray``).

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
import contextlib
import json
import logging
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator

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


@contextlib.contextmanager
def open_dask(workers: int) -> Iterator[dict]:
    """Dask ``LocalCluster``: ``workers`` worker processes (nannies), 1 thread each, on 127.0.0.1.
    Yields ``{"batch", "round_trip", "start_s", "setup"}``."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR,
                           local_directory=os.environ.get("TMPDIR"))
    try:
        client = Client(cluster)
        try:
            client.wait_for_workers(workers, timeout=60)

            def batch(n: int) -> list:
                return client.gather(client.map(noop, range(n), pure=False))

            def round_trip(i: int) -> Any:
                return client.submit(noop, i, pure=False).result()

            yield {"batch": batch, "round_trip": round_trip, "start_s": time.perf_counter() - t0,
                   "workers": len(client.scheduler_info()["workers"]),
                   "setup": (f"distributed.LocalCluster(n_workers={workers}, threads_per_worker=1, processes=True, "
                             "host='127.0.0.1'); client.map(noop, range(N), pure=False) + client.gather; "
                             "client.submit(noop, i, pure=False).result()")}
        finally:
            client.close()
    finally:
        cluster.close()


@contextlib.contextmanager
def open_ray(workers: int) -> Iterator[dict]:
    """Ray: a local instance, ``num_cpus=workers``, on 127.0.0.1, no dashboard, no usage stats."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             _node_ip_address="127.0.0.1", _temp_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ray"),
             object_store_memory=256 * 1024 * 1024)
    try:
        remote_noop = ray.remote(noop)

        def batch(n: int) -> list:
            return ray.get([remote_noop.remote(i) for i in range(n)])

        def round_trip(i: int) -> Any:
            return ray.get(remote_noop.remote(i))

        yield {"batch": batch, "round_trip": round_trip, "start_s": time.perf_counter() - t0,
               "node_ip": ray.util.get_node_ip_address(),
               "setup": (f"ray.init(num_cpus={workers}, include_dashboard=False, _node_ip_address='127.0.0.1'); "
                         "ray.get([noop.remote(i) for i in range(N)]); ray.get(noop.remote(i))")}
    finally:
        ray.shutdown()


def run_once(opener: Callable, args: argparse.Namespace) -> dict:
    """The one-shot measurement: ``measure`` on the opened system, then close it."""
    with opener(args.workers) as system:
        res = measure(system["batch"], system["round_trip"], args.tasks, args.reps, args.round_trips,
                      args.warmup_tasks)
        res.update({k: v for k, v in system.items() if k not in ("batch", "round_trip")})
    return res


def timed_batch(batch: Callable[[int], list], n: int) -> float:
    """Seconds for ``batch(n)``, its results checked."""
    t0 = time.perf_counter()
    out = batch(n)
    seconds = time.perf_counter() - t0
    if len(out) != n or sum(out) != n * (n - 1) // 2:
        raise AssertionError(f"batch of {n}: {len(out)} results, wrong sum")
    return seconds


def round_trips(round_trip: Callable[[int], Any], k: int) -> list[float]:
    """``k`` sequential round trips, each checked; their times in ms."""
    now = time.perf_counter_ns
    samples = []
    for i in range(k):
        t0 = now()
        if round_trip(i) != i:
            raise AssertionError(f"round trip {i}: wrong result")
        samples.append(round((now() - t0) / 1e6, 4))
    return samples


def serve(opener: Callable, args: argparse.Namespace, answer: Callable[[dict], None],
          commands: Iterator[str]) -> None:
    """Keep the system up and answer commands, one JSON line each (``answer``), so that the parent
    can interleave this system's batches with other systems' while every cluster stays up:

    * first, unasked: ``{"op": "ready", "start_s", "warmup_s", ...}`` once the system is up and
      warmed (one batch of ``--warmup-tasks`` and ``LATENCY_WARMUP`` round trips, untimed);
    * ``batch N`` -> ``{"op": "batch", "tasks": N, "seconds": s}`` (N no-op tasks at once);
    * ``latency K`` -> ``{"op": "latency", "samples_ms": [...]}`` (K sequential round trips);
    * ``quit`` (or the end of stdin) -> ``{"op": "quit"}`` after the system is shut down.

    A command that fails answers ``{"op": ..., "error": "..."}`` and the next one is read."""
    with opener(args.workers) as system:
        t0 = time.perf_counter()
        timed_batch(system["batch"], args.warmup_tasks)
        round_trips(system["round_trip"], LATENCY_WARMUP)
        info = {k: v for k, v in system.items() if k not in ("batch", "round_trip")}
        answer({"op": "ready", "warmup_s": time.perf_counter() - t0, "warmup_tasks": args.warmup_tasks, **info})
        for line in commands:
            op, _, count = line.strip().partition(" ")
            if op == "quit":
                break
            try:
                n = int(count)
                if op == "batch":
                    answer({"op": op, "tasks": n, "seconds": timed_batch(system["batch"], n)})
                elif op == "latency":
                    answer({"op": op, "samples_ms": round_trips(system["round_trip"], n)})
                else:
                    answer({"op": op, "error": f"unknown command {line.strip()!r} (batch N, latency K, quit)"})
            except Exception as exc:  # noqa: BLE001 - the parent reports it; the system stays up
                answer({"op": op, "error": f"{type(exc).__name__}: {exc}"})
    answer({"op": "quit"})


PEERS = {"dask": (open_dask, ("dask", "distributed")), "ray": (open_ray, ("ray",))}


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
    ap.add_argument("--serve", action="store_true",
                    help="keep the system up and answer 'batch N' / 'latency K' / 'quit' lines on stdin")
    args = ap.parse_args(argv)
    opener, packages = PEERS[args.peer]
    t0 = time.perf_counter()
    res = {"system": args.peer, "versions": versions(packages), "python": platform.python_version(),
           "pid": os.getpid()}
    if args.serve:
        log(f"{args.peer}: serving batch/latency commands")

        def answer(line: dict) -> None:
            print(json.dumps({**res, **line} if line["op"] == "ready" else line), flush=True)

        serve(opener, args, answer, iter(sys.stdin.readline, ""))
        return 0
    log(f"{args.peer}: {args.reps} batches of {args.tasks:,} tasks, {args.round_trips} round trips")
    res.update(run_once(opener, args))
    res["elapsed_s"] = time.perf_counter() - t0
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
