"""The systems ``bench/dispatch.py`` compares, kept up side by side and measured in turns
(issue 23: "runs interleaved, medians quoted").

* ``OurCluster``: our full durable path on 127.0.0.1, as shipped (CURVE on every ZeroMQ socket,
  keys made as ``cluster up`` makes them): 3 masters, the balancer pair, one worker of 2 slots
  (Ray's ``num_cpus=2``, Dask's 2 x 1 thread), the client's futures in this process. Each task
  is committed by a quorum twice (its assignment with its fencing token, then its result) before
  its future resolves.
* ``PeerSystem``: Dask or Ray in its own process under ``bench/.peers-venv``
  (``dispatch_peers.py --serve``), driven by ``batch N`` / ``latency K`` lines on its stdin.

``interleave`` runs R rounds; in each, every system runs one batch of N no-op tasks and K/R
sequential round trips, the order rotating from round to round, so the machine's drift (other
work on the 2 cores) falls on every system alike. Throughput: the median of the rounds' rates;
latency: the median and p99 of all the round trips pooled; and per round, ours / each peer's
rate (the paired ratio, whose median is less noisy than the ratio of medians).
"""

from __future__ import annotations

import json
import math
import os
import queue
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
PEERS_SCRIPT = ROOT / "bench" / "dispatch_peers.py"
MARKER = "DISPATCH_BENCH_RUN"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- processes a peer leaves behind -------------------------------------------------------------


def marked_pids(token: str) -> list[int]:
    """Processes whose environment carries this run's marker (all the peer's descendants)."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def stop_leftovers(token: str) -> list[dict]:
    """Stop, by pid, every process still carrying the marker: SIGTERM, then SIGKILL after 5 s."""
    found = [{"pid": pid, "cmdline": _cmdline(pid)} for pid in marked_pids(token)]
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        alive = marked_pids(token)
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)  # waiting for other processes to exit: nothing to wait on but /proc
            alive = marked_pids(token)
        if not alive:
            break
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


# ---- a peer, in its own venv and process ------------------------------------------------------------


class PeerSystem:
    """Dask or Ray under ``python`` (the peers' venv), serving commands on its stdin."""

    durable = False

    def __init__(self, name: str, python: Path, workers: int, warmup_tasks: int) -> None:
        self.name = name
        self.token = secrets.token_hex(8)
        self.tmp = tempfile.TemporaryDirectory(prefix=f"bench-dispatch-{name}-")
        self.err_path = Path(self.tmp.name) / "stderr.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update({MARKER: self.token, "TMPDIR": self.tmp.name, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DASK_TEMPORARY_DIRECTORY": self.tmp.name})
        cmd = [str(python), "-I", str(PEERS_SCRIPT), name, "--serve", "--workers", str(workers),
               "--warmup-tasks", str(warmup_tasks)]
        self.started = time.perf_counter()
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         cwd=self.tmp.name, env=env, start_new_session=True)
        self.info: dict[str, Any] = {}
        self.leftovers: list[dict] = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_lines, name=f"{name}-stdout", daemon=True).start()

    def wait_ready(self, timeout: float) -> dict:
        """The peer's ``ready`` line (versions, start and warm-up seconds)."""
        self.info = self._answer("ready", timeout)
        self.info["ready_after_s"] = round(time.perf_counter() - self.started, 2)
        return self.info

    def _read_lines(self) -> None:
        """On its own thread: every line the peer prints, then None at its end."""
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _answer(self, op: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self.proc.wait(10)
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.stderr_tail(5)}")
            if not line.startswith("{"):
                continue
            answer = json.loads(line)
            if "error" in answer:
                raise RuntimeError(f"{self.name} {op}: {answer['error']}")
            if answer.get("op") == op:
                return answer
        raise TimeoutError(f"{self.name}: no answer to {op!r} within {timeout:g} s")

    def _ask(self, line: str, timeout: float) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._answer(line.split()[0], timeout)

    def batch(self, n: int) -> float:
        return self._ask(f"batch {n}", 600)["seconds"]

    def latency(self, k: int) -> list[float]:
        return self._ask(f"latency {k}", 600)["samples_ms"]

    def pids(self) -> dict[str, int]:
        return {f"{self.name}-{pid}": pid for pid in marked_pids(self.token)}

    def stderr_tail(self, lines: int = 30) -> list[str]:
        try:
            return self.err_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self.leftovers = stop_leftovers(self.token)
        self.tmp.cleanup()


# ---- our cluster ------------------------------------------------------------------------------------


def raft_options(directory: Path, options: dict[str, Any] | None) -> None:
    """Add ``options`` as ``[raft.timings]`` (pysyncobj's ``SyncObjConf`` keywords, passed through
    by master/raft.py) to the masters' config in ``directory``, before they start. Only for a run
    that asks (``--raft-option``, to measure a setting before it ships); by default the masters
    run as shipped."""
    if not options:
        return
    path = directory / "masters.toml"
    text = path.read_text()
    if "[raft.timings]" in text:
        raise ValueError(f"{path} has [raft.timings] already")
    path.write_text(text.rstrip("\n") + "\n\n[raft.timings]\n" + "".join(f"{k} = {v!r}\n" for k, v in options.items()))


class OurCluster:
    """Our durable path (see the module docstring), started by ``start``; ``nodes`` are the
    ``cluster.local.LocalNode``s, ``client`` the ``cluster.client.Client``."""

    name = "ours"
    durable = True

    def __init__(self, slots: int = 2, log_level: str = "WARNING", raft: dict[str, Any] | None = None) -> None:
        import cloudpickle

        from bench import dispatch_peers
        from cluster.local import balancer_nodes, master_nodes, worker_nodes

        # the workers cannot import bench/: ship noop by value (as a notebook's function would be)
        cloudpickle.register_pickle_by_value(dispatch_peers)
        self.noop = dispatch_peers.noop
        self.work = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
        self.masters = master_nodes(self.work, 3, log_level=log_level)
        raft_options(self.work, raft)
        self.config, self.balancers = balancer_nodes(self.work, 2, log_level=log_level)
        self.workers = worker_nodes(self.work, self.config, 1, slots=slots, log_level=log_level)
        self.nodes = self.masters + self.balancers + self.workers
        self.client: Any = None
        self.info: dict[str, Any] = {}

    def start(self, warmup_tasks: int) -> dict:
        from cluster import __version__
        from cluster.client import Client
        from cluster.local import start_all

        t0 = time.perf_counter()
        start_all(self.nodes)
        self.client = Client([m.address for m in self.masters], timeout=60)
        wait_registered(self.balancers, 1)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if sum(self.run_batch(warmup_tasks)) != warmup_tasks * (warmup_tasks - 1) // 2:
            raise AssertionError("warm-up batch: wrong results")
        self.latency(10)
        self.info = {"versions": {"cluster": __version__}, "start_s": round(start_s, 2),
                     "warmup_s": round(time.perf_counter() - t0, 2), "warmup_tasks": warmup_tasks,
                     "security": "CURVE (as shipped)", "logs": str(self.work)}
        return self.info

    def run_batch(self, n: int) -> list:
        return [f.result(timeout=300) for f in self.client.map(self.noop, range(n))]

    def batch(self, n: int) -> float:
        t0 = time.perf_counter()
        out = self.run_batch(n)
        seconds = time.perf_counter() - t0
        if len(out) != n or sum(out) != n * (n - 1) // 2:
            raise AssertionError(f"batch of {n}: {len(out)} results, wrong sum")
        return seconds

    def latency(self, k: int) -> list[float]:
        now = time.perf_counter_ns
        samples = []
        for i in range(k):
            t0 = now()
            if self.client.submit(self.noop, i).result(timeout=60) != i:
                raise AssertionError(f"round trip {i}: wrong result")
            samples.append(round((now() - t0) / 1e6, 4))
        return samples

    def pids(self) -> dict[str, int]:
        return {n.name: n.pid for n in self.nodes if n.pid is not None}

    def close(self) -> None:
        from cluster.local import stop_all

        if self.client is not None:
            self.client.close()
        stop_all(self.nodes[::-1])


def active_balancer(balancers: list) -> tuple[Any, Any]:
    """The active, attached balancer and its status reply, or (None, None)."""
    from cluster.node.status import query_status

    for b in balancers:
        if b.process is None or b.process.poll() is not None:
            continue
        r = query_status([b.address], timeout=0.5)[0].reply
        if r is not None and r.detail.get("state") == "active" and r.detail.get("master", {}).get("attached"):
            return b, r
    return None, None


def wait_registered(balancers: list, workers: int, timeout: float = 60.0) -> Any:
    """Wait until an active balancer has ``workers`` registered; returns that balancer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b, r = active_balancer(balancers)
        if r is not None and r.detail["registry"]["workers"] >= workers:
            return b
        time.sleep(0.05)  # polling another process's status: nothing to wait on
    raise TimeoutError(f"{workers} workers did not register with an active balancer within {timeout:g} s")


# ---- the interleaved rounds ---------------------------------------------------------------------------


def p99(xs: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def idle_cpu(systems: dict[str, Any], seconds: float) -> dict[str, float]:
    """Cores each system's processes use while nothing is asked of them (heartbeats, polling):
    the background each one adds while the others are measured."""
    from bench.dispatch_hops import tree_cpu_s

    before = {name: {p: tree_cpu_s(pid) for p, pid in s.pids().items()} for name, s in systems.items()}
    time.sleep(seconds)  # the measurement is of doing nothing
    out = {}
    for name, s in systems.items():
        used = sum((tree_cpu_s(pid) or 0.0) - (before[name].get(p) or 0.0)
                   for p, pid in s.pids().items() if before[name].get(p) is not None)
        out[name] = round(used / seconds, 3)
    return out


def interleave(systems: dict[str, Any], rounds: int, tasks: int, round_trips: int,
               say: Callable[[str], None] = log) -> dict[str, Any]:
    """``rounds`` rounds, each: one batch of ``tasks`` per system, then ``round_trips / rounds``
    round trips per system, the order rotated every round. A system that fails drops out (its
    error kept) and the others go on."""
    names = list(systems)
    res: dict[str, dict[str, Any]] = {n: {"tasks_per_s_rounds": [], "samples_ms": [], "order": []} for n in names}
    per_round = max(1, round_trips // rounds)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if "error" in res[n]:
                continue
            try:
                res[n]["tasks_per_s_rounds"].append(round(tasks / systems[n].batch(tasks), 1))
                res[n]["order"].append(order.index(n))
            except Exception as exc:  # noqa: BLE001 - reported; the other systems go on
                res[n]["error"] = f"{type(exc).__name__}: {exc}"
        for n in order:
            if "error" not in res[n]:
                try:
                    res[n]["samples_ms"] += systems[n].latency(per_round)
                except Exception as exc:  # noqa: BLE001
                    res[n]["error"] = f"{type(exc).__name__}: {exc}"
        say(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {res[n]['tasks_per_s_rounds'][-1]:,.0f}/s" if res[n]["tasks_per_s_rounds"] and "error" not in res[n]
            else f"{n} failed" for n in names))
    for n, v in res.items():
        if v["tasks_per_s_rounds"]:
            v["tasks_per_s_median"] = round(statistics.median(v["tasks_per_s_rounds"]), 1)
        if v["samples_ms"]:
            s = v["samples_ms"]
            v["latency"] = {"round_trips": len(s), "median_ms": round(statistics.median(s), 3),
                            "p99_ms": round(p99(s), 3), "mean_ms": round(statistics.fmean(s), 3)}
    return {"rounds": rounds, "tasks": tasks, "round_trips_per_round": per_round, "systems": res,
            "ratios": ratios(res)}


def ratios(res: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ours / each peer: tasks/s (ratio of medians, and the median of the per-round ratios; > 1:
    ours faster) and latency median (< 1: ours faster)."""
    ours = res.get("ours", {})
    out = {}
    for peer, v in res.items():
        if peer == "ours" or "tasks_per_s_median" not in v or "tasks_per_s_median" not in ours:
            continue
        paired = [a / b for a, b in zip(ours["tasks_per_s_rounds"], v["tasks_per_s_rounds"])]
        entry = {"tasks_per_s": round(ours["tasks_per_s_median"] / v["tasks_per_s_median"], 3),
                 "tasks_per_s_paired_median": round(statistics.median(paired), 3)}
        if "latency" in ours and "latency" in v:
            entry["latency_median"] = round(ours["latency"]["median_ms"] / v["latency"]["median_ms"], 3)
            entry["latency_p99"] = round(ours["latency"]["p99_ms"] / v["latency"]["p99_ms"], 3)
        out[peer] = entry
    return out


# ---- balancer takeover ---------------------------------------------------------------------------------


def takeovers(cluster: OurCluster, kills: int) -> dict:
    """Kill the active balancer ``kills`` times under a stream of tasks: seconds from each kill
    to the first task dispatched by the other balancer and recorded done (the ledger's attempt
    says which balancer handed it out). The killed one is restarted and becomes the passive one."""
    import concurrent.futures

    client, times = cluster.client, []
    for k in range(kills):
        wait_registered(cluster.balancers, 1)
        victim, _ = active_balancer(cluster.balancers)
        stream = client.map(cluster.noop, range(1000))
        concurrent.futures.wait(stream[:50])
        killed_at = time.perf_counter()
        victim.kill()
        pending = [f for f in stream if not f.done()]
        took = None
        for f in concurrent.futures.as_completed(pending, timeout=60):
            # tasks the killed one handed out may still finish (workers keep their results and
            # resend them): the takeover is done when a task the other one dispatched is recorded
            attempts = client.task(f.job, f.task).value.get("attempts", [])
            if any(a["outcome"] == "done" and a["balancer"] != victim.name for a in attempts):
                took = time.perf_counter() - killed_at
                break
        if took is None:
            raise AssertionError(f"takeover {k + 1}: no task went through the other balancer")
        if sorted(f.result(timeout=120) for f in stream) != list(range(1000)):
            raise AssertionError(f"takeover {k + 1}: wrong results")
        times.append(took)
        log(f"  takeover {k + 1}/{kills}: {took:.2f} s")
        victim.start()  # it comes back passive: the other one is in charge now
    return {"kills": kills, "seconds": [round(t, 3) for t in times],
            "median_s": round(statistics.median(times), 3) if times else None}
