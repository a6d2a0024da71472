"""What CURVE costs the durable task path (issue 20), for ``bench/dispatch.py``.

Two of our clusters run side by side on this machine, alike but for ``[security]``: one with
CURVE on every ZeroMQ socket (keys made as ``cluster up`` makes them, the default), one with
``insecure = true`` (plaintext; Raft is authenticated in both). Batches of N no-op tasks go to
each in turn, alternating which goes first in each round, so drift in the machine's load falls
on both alike; the medians of the rounds and their ratio are reported. The idle cluster's
heartbeats cost both the same.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def measure_security(tasks: int, rounds: int, slots: int, log: Callable[[str], None]) -> dict[str, Any]:
    """{mode: {tasks_per_s: [...], median}} for ``curve`` and ``plaintext``, and their ratio."""
    import cloudpickle

    from bench import dispatch_peers
    from bench.dispatch_peers import noop
    from cluster.client import Client
    from cluster.local import balancer_nodes, master_nodes, start_all, stop_all, worker_nodes
    from cluster.node.status import query_status

    cloudpickle.register_pickle_by_value(dispatch_peers)
    clusters: dict[str, dict[str, Any]] = {}
    nodes: list = []
    try:
        for mode in ("curve", "plaintext"):
            work = Path(tempfile.mkdtemp(prefix=f"dispatch-{mode}-"))
            masters = master_nodes(work, 3, insecure=mode == "plaintext")
            config, balancers = balancer_nodes(work, 2)
            workers = worker_nodes(work, config, 1, slots=slots)
            nodes += masters + balancers + workers
            clusters[mode] = {"masters": masters, "balancers": balancers, "work": str(work)}
        start_all(nodes)
        for mode, c in clusters.items():
            c["client"] = Client([m.address for m in c["masters"]], timeout=60)
            _wait_registered(c["balancers"], query_status)
            batch(c["client"], noop, min(tasks, 1000))  # warm-up: connections, the workers' children
        rates: dict[str, list[float]] = {mode: [] for mode in clusters}
        for r in range(rounds):
            order = list(clusters) if r % 2 == 0 else list(reversed(clusters))
            for mode in order:
                rates[mode].append(tasks / batch(clusters[mode]["client"], noop, tasks))
            log(f"security round {r + 1}/{rounds}: " + ", ".join(f"{m} {rates[m][-1]:,.0f}/s" for m in clusters))
        out: dict[str, Any] = {m: {"tasks_per_s": [round(x, 1) for x in v], "median": round(statistics.median(v), 1)}
                               for m, v in rates.items()}
        out["curve_over_plaintext"] = round(out["curve"]["median"] / out["plaintext"]["median"], 3)
        out.update(tasks=tasks, rounds=rounds)
        return out
    except Exception as exc:  # noqa: BLE001 - the report says what failed; the rest still runs
        return {"error": f"{type(exc).__name__}: {exc}", "logs": [c["work"] for c in clusters.values()]}
    finally:
        for c in clusters.values():
            if "client" in c:
                c["client"].close()
        stop_all(nodes)


def batch(client: Any, fn: Callable[[int], int], n: int) -> float:
    """Seconds from the first submit of ``n`` tasks to the last result."""
    t0 = time.perf_counter()
    for f in client.map(fn, range(n)):
        f.result(timeout=300)
    return time.perf_counter() - t0


def _wait_registered(balancers: list, query_status: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for b in balancers:
            r = query_status([b.address], timeout=0.5)[0].reply
            if r is not None and r.detail.get("state") == "active" and r.detail["registry"]["workers"] >= 1:
                return
        time.sleep(0.05)  # polling another process's status: nothing to wait on
    raise TimeoutError(f"the worker did not register with an active balancer within {timeout:g} s")
