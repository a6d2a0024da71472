"""The chaos soak's workload and its history: what was submitted, acknowledged, refused, and
every result seen, with the time of each.

Theory of operation
-------------------
Four loops run at once, each with a client of its own, and keep a bounded amount of work in flight
(the machine is small and shared; a backlog would only measure the queue):

- **calls**: ``Client.map`` of a function shipped by value (cloudpickle), each call's value a
  digest of its own arguments, so a result handed to the wrong task is caught;
- **commands**: ``Client.run`` of ``sh -c``, whose stdout is a digest of the same kind;
- **units**: a chain of three command specs joined by ``then`` (doc/workspecs.md): ``hash`` prints a
  digest of its unit's key, ``upper`` checks that its data is that digest and prints it upper-cased,
  ``check`` checks that in turn. A wrong link of the chain fails its unit with "WRONG" in the tail;
- **alignment**: a seeded pair (a planted similar region, as tests/integration/test_tile_tasks.py
  has it) stored and submitted as a ``grid`` job of ``tile`` tasks, one at a time; its answer must
  be ``worker.sw.align``'s on the whole pair in this process, score and end cell.

A submit is acknowledged when the client's call returns (the masters answer once a quorum has
committed it); one that raises is noted as failed and not retried with the same key (a unit batch
that did land would refuse its keys again). History events carry monotonic seconds since the
soak's start and the wall clock (the ledger's attempt times are wall clock).
"""

from __future__ import annotations

import hashlib
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cloudpickle

from cluster.work import Work

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import bench/

CALL_BATCH, CALLS_IN_FLIGHT = 10, 40
COMMAND_BATCH, COMMANDS_IN_FLIGHT = 3, 9
UNIT_BATCH, UNITS_IN_FLIGHT = 15, 45
SPECS = ("soak-hash", "soak-upper", "soak-check")
UNIT_ATTEMPTS = 10  # kills and cuts cost attempts: a unit fails only if it is truly wrong
TILE_ROWS, TILE_COLS = 400, 500
LEN_A, LEN_B, PLANT_LEN = 1_620, 1_230, 400  # 4 x 4 tiles, the last ones narrow


def digest(*parts: Any) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16]


def soak_call(seed: int, op: int, i: int, nap: float) -> str:
    """The callables' body (runs on a worker): a short nap, then a digest of its own arguments."""
    time.sleep(nap)
    return hashlib.sha256(f"{seed}/{op}/{i}".encode()).hexdigest()[:16]


_KEY_DIGEST = 'printf %s "$WORK_KEY" | sha256sum | cut -c1-16'
UNIT_RUNS = {
    "soak-hash": f'if [ "$WORK_DATA" = slow ]; then sleep 1; fi; printf %s "$({_KEY_DIGEST})"',
    "soak-upper": (f'want=$({_KEY_DIGEST}); if [ "$WORK_DATA" != "$want" ]; then '
                   'echo "WRONG data for $WORK_KEY: $WORK_DATA" >&2; exit 3; fi; printf %s "$want" | tr a-f A-F'),
    "soak-check": (f'want=$({_KEY_DIGEST} | tr a-f A-F); if [ "$WORK_DATA" != "$want" ]; then '
                   'echo "WRONG data for $WORK_KEY: $WORK_DATA" >&2; exit 3; fi; printf ok'),
}


def pair(seed: int, k: int) -> tuple[bytes, bytes]:
    """(a, b) of the k-th alignment: random ACGT, b's region copied into a with ~4% substituted."""
    rng = random.Random(f"chaos-pair-{seed}-{k}")
    b = bytearray(rng.choice(b"ACGT") for _ in range(LEN_B))
    a = bytearray(rng.choice(b"ACGT") for _ in range(LEN_A))
    at_b, at_a = rng.randrange(LEN_B - PLANT_LEN), rng.randrange(LEN_A - PLANT_LEN)
    region = bytearray(b[at_b:at_b + PLANT_LEN])
    for i in rng.sample(range(20, PLANT_LEN - 20), PLANT_LEN // 25):
        region[i] = rng.choice([c for c in b"ACGT" if c != region[i]])
    a[at_a:at_a + PLANT_LEN] = region
    return bytes(a), bytes(b)


# ---- the history ----------------------------------------------------------------------------


class History:
    """Every operation's steps, in order: (seconds since ``t0``, wall clock, kind, detail)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.lock = threading.Lock()
        self.events: list[tuple[float, float, str, dict[str, Any]]] = []

    def note(self, event: str, /, **detail: Any) -> None:
        with self.lock:
            self.events.append((time.monotonic() - self.t0, time.time(), event, detail))

    def of(self, *kinds: str) -> list[tuple[float, float, str, dict[str, Any]]]:
        with self.lock:
            return [e for e in self.events if e[2] in kinds]

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(Counter(e[2] for e in self.events))


@dataclass
class Op:
    """One submit: what it was, whether it was acknowledged, and its tasks' expected values and
    what came back (task index -> value), or the unit keys it added."""

    n: int
    kind: str  # call | command | units | align
    jobs: list[str] = field(default_factory=list)
    expected: dict[tuple[str, int], Any] = field(default_factory=dict)
    seen: dict[tuple[str, int], Any] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    acked: bool = False
    error: str | None = None


class Workload:
    """The four loops on ``clients()`` (a fresh client per loop), noting into ``history``."""

    def __init__(self, clients: Callable[[], Any], seed: int, history: History) -> None:
        self.clients = clients
        self.seed = seed
        self.history = history
        self.ops: list[Op] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.units_finished = 0  # the last stage's finished count, as last polled
        self.units_added = 0
        self.alignments: list[dict[str, Any]] = []
        self.rng = random.Random(f"chaos-work-{seed}")
        self._open: list[Any] = []

    # ---- running --------------------------------------------------------------------------

    @staticmethod
    def setup(client: Any) -> None:
        """The chain of unit specs (once, before any fault)."""
        work = Work(client)
        for name, then in (("soak-check", None), ("soak-upper", "soak-check"), ("soak-hash", "soak-upper")):
            work.add_spec(name, {"kind": "command", "argv": ["sh", "-c", UNIT_RUNS[name]]}, then=then,
                          max_attempts=UNIT_ATTEMPTS)

    def start(self) -> None:
        for name, loop in (("calls", self._calls), ("commands", self._commands), ("units", self._units),
                           ("align", self._align)):
            t = threading.Thread(target=self._loop, args=(name, loop), name=f"chaos-{name}", daemon=True)
            t.start()
            self.threads.append(t)

    def _loop(self, name: str, once: Callable[[Any], bool]) -> None:
        """Call ``once(client)`` until stopped; it returns False when the loop is at its cap."""
        client = self.clients()
        self._open.append(client)
        while not self.stop.is_set():
            try:
                busy = not once(client)
            except Exception as exc:  # noqa: BLE001 - a loop's own failure is noted, never fatal
                self.history.note("loop_error", loop=name, error=repr(exc))
                busy = True
            if busy:
                with self.changed:
                    self.changed.wait(0.25)  # woken by a result; the timeout re-checks stop

    def _new(self, kind: str) -> Op:
        with self.lock:
            op = Op(len(self.ops), kind)
            self.ops.append(op)
        self.history.note("submit", op=op.n, kind=kind)
        return op

    def _submitted(self, op: Op, submit: Callable[[], Any]) -> Any:
        """``submit()``'s value, noted as acknowledged; None if it raised (noted as failed)."""
        try:
            value = submit()
        except Exception as exc:  # noqa: BLE001 - ClusterError, a timeout: not acknowledged
            op.error = repr(exc)
            self.history.note("fail", op=op.n, kind=op.kind, error=op.error[:300])
            self.stop.wait(0.5)  # the cluster is in a fault: do not spin on it
            return None
        op.acked = True
        self.history.note("ack", op=op.n, kind=op.kind, jobs=op.jobs)
        return value

    def in_flight(self, kind: str) -> int:
        with self.lock:
            return sum(len(o.expected) - len(o.seen) for o in self.ops if o.kind == kind and o.acked)

    def _watch(self, op: Op, futures: list[Any], check: Callable[[Any], Any]) -> None:
        for f in futures:
            f.add_done_callback(lambda f, op=op, check=check: self._seen(op, f, check))

    def _seen(self, op: Op, f: Any, check: Callable[[Any], Any]) -> None:
        key = (f.job, f.task)
        try:
            value = check(f.result(0))
        except Exception as exc:  # noqa: BLE001 - the task failed: its error is its result
            value = f"error: {exc!r}"[:300]
        with self.changed:
            op.seen[key] = value
            self.changed.notify_all()
        right = value == op.expected.get(key)
        self.history.note("result" if right else "wrong", op=op.n, kind=op.kind, job=f.job, task=f.task,
                          **({} if right else {"got": value, "want": op.expected.get(key)}))

    def _calls(self, client: Any) -> bool:
        if self.in_flight("call") >= CALLS_IN_FLIGHT:
            return False
        op = self._new("call")
        nap = self.rng.choice([0.0, 0.02, 0.05, 0.2])
        n = CALL_BATCH
        futures = self._submitted(op, lambda: client.map(soak_call, [self.seed] * n, [op.n] * n, range(n), [nap] * n))
        if futures is not None:
            op.jobs = sorted({f.job for f in futures})
            with self.lock:
                op.expected = {(f.job, f.task): digest(self.seed, op.n, i) for i, f in enumerate(futures)}
            self._watch(op, futures, lambda v: v)
        return True

    def _commands(self, client: Any) -> bool:
        if self.in_flight("command") >= COMMANDS_IN_FLIGHT:
            return False
        for i in range(COMMAND_BATCH):
            op = self._new("command")
            token, nap = digest(self.seed, "cmd", op.n), self.rng.choice(["0", "0.1", "0.5", "1.5"])
            future = self._submitted(op, lambda: client.run(["sh", "-c", f"sleep {nap}; echo {token}"]))
            if future is not None:
                op.jobs = [future.job]
                with self.lock:
                    op.expected = {(future.job, future.task): (0, f"{token}\n".encode())}
                self._watch(op, [future], lambda r: (r.exit_code, r.stdout))
        return True

    def _units(self, client: Any) -> bool:
        work = Work(client)
        rows = {r["spec"]: r for r in work.summary()}
        finished = rows["soak-check"]["finished"] if "soak-check" in rows else 0
        if finished > self.units_finished:
            self.history.note("result", kind="units", count=finished - self.units_finished)
            with self.changed:
                self.units_finished = finished
        if self.units_added - self.units_finished >= UNITS_IN_FLIGHT:
            return False
        op = self._new("units")
        op.keys = [f"u{self.seed}-{op.n}-{i}" for i in range(UNIT_BATCH)]
        units = [(k, b"slow" if self.rng.random() < 0.1 else b"") for k in op.keys]
        if self._submitted(op, lambda: work.add_units("soak-hash", units)) is not None:
            self.units_added += len(op.keys)
        return True

    def _align(self, client: Any) -> bool:
        from worker.sw.align import align  # the oracle: numba kernels, loaded only if an alignment runs

        k = len(self.alignments)
        a, b = pair(self.seed, k)
        record: dict[str, Any] = {"k": k}
        self.alignments.append(record)
        op = self._new("align")
        record["op"] = op.n
        job = self._submitted(op, lambda: self._submit_grid(client, a, b, op))
        if job is None:
            return True
        oracle = align(a, b)
        record["want"] = want = (oracle.score, oracle.end_a, oracle.end_b)
        with self.lock:
            op.expected = {(job, -1): want}
        view = self._wait_job(client, job)
        best = (view or {}).get("reduced", {}).get("max", {}).get("summary") or {}
        got = (best.get("score"), best.get("end_a"), best.get("end_b")) if view and view["state"] == "done" \
            else f"job {view and view['state']}: {view and view.get('error')}"
        record["got"] = got
        with self.changed:
            op.seen = {(job, -1): got}
            self.changed.notify_all()
        right = got == want
        self.history.note("result" if right else "wrong", op=op.n, kind="align", job=job,
                          **({} if right else {"got": got, "want": want}))
        return True

    def _submit_grid(self, client: Any, a: bytes, b: bytes, op: Op) -> str:
        with tempfile.TemporaryDirectory(prefix="chaos-pair-") as d:
            (Path(d) / "a.seq").write_bytes(a)
            (Path(d) / "b.seq").write_bytes(b)
            fa = client.upload(Path(d) / "a.seq", name=f"chaos-{op.n}-a.seq")  # names are unique in a pin
            fb = client.upload(Path(d) / "b.seq", name=f"chaos-{op.n}-b.seq")
        rows, cols = -(-LEN_B // TILE_ROWS), -(-LEN_A // TILE_COLS)
        job = client.submit_job("grid", {
            "name": f"chaos align {op.n}", "rows": rows, "cols": cols, "depends": "wavefront",
            "run": {"kind": "tile", "a": fa.id, "b": fb.id, "tile_rows": TILE_ROWS, "tile_cols": TILE_COLS},
            "reduce": {"max": "score", "ties": ["end_b", "end_a"], "sum": ["cells"]},
            "max_attempts": UNIT_ATTEMPTS, "keep_results": True}).job  # every tile's attempts stay for the check
        op.jobs = [job]
        with self.lock:
            op.expected = {(job, -1): None}  # the answer, once the oracle has it
        return job

    def _wait_job(self, client: Any, job: str, timeout: float = 600.0) -> dict[str, Any] | None:
        """The job's view once it is over (polled through faults: a read may fail for a while)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                view = client.job(job).value
                if view and view["state"] != "active":
                    return view
            except Exception:  # noqa: BLE001 - no leader for now: ask again
                pass
            time.sleep(0.5)  # polling the ledger's job view: the tiles end inside the cluster
        return None

    # ---- ending ---------------------------------------------------------------------------

    def finish(self, timeout: float) -> list[str]:
        """Stop submitting and wait (up to ``timeout`` s) for every acknowledged operation's
        results; returns what is still outstanding."""
        self.stop.set()
        with self.changed:
            self.changed.notify_all()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        client = self.clients()
        self._open.append(client)
        work = Work(client)

        def outstanding() -> list[str]:
            out = [f"op {o.n} ({o.kind}): {len(o.expected) - len(o.seen)} results not seen"
                   for o in self.ops if o.acked and o.kind != "units" and len(o.seen) < len(o.expected)]
            try:
                rows = {r["spec"]: r for r in work.summary()}
            except Exception as exc:  # noqa: BLE001
                return out + [f"units: no summary ({exc!r})"]
            total, ended = rows["soak-hash"]["total"], rows["soak-check"]["finished"] + sum(
                rows[s]["failed"] for s in SPECS)
            if ended < total:
                out.append(f"units: {total - ended} of {total} not through the chain")
            self.units_finished = rows["soak-check"]["finished"]
            return out

        while (left := outstanding()) and time.monotonic() < deadline:
            time.sleep(0.5)  # the results come in on the clients' watcher threads
        return left + [f"loop {t.name} still running" for t in self.threads if t.is_alive()]

    def close(self) -> None:
        for c in self._open:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing after a soak: nothing to do about it
                pass
