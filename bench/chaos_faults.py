"""The chaos soak's faults: a schedule that is a pure function of (seed, seconds), and the injector
that plays it on a rack (tests/rack/rack.py).

Theory of operation
-------------------
A fault is one thing done to the rack, held for a few seconds, then undone: a node SIGKILLed and
started again from its unit line, a node paused (SIGSTOP) and continued, a host isolated, a cut
between sets of hosts (one-way too), a delay or a loss on some links. Faults run in two lanes, one
after another in each: ``proc`` (kills and pauses) and ``net`` (everything the network does). A
net fault is healed with ``Rack.heal()``, which undoes every cut, so net faults never overlap; a
proc fault is undone on its own host, so one of each may run at once.

What the cluster is meant to survive bounds the schedule: each fault names the roles it takes a
member of (a master, a balancer, a storage node, a worker), and no two faults that overlap (their
hold plus the settle after it) share a role. So at most one master is down or cut at a time (two
of three keep a quorum), at most one balancer, one storage node, one worker. A few faults take a
whole role on purpose, because the partition tests show the cluster rides them out: the pair split
with its workers, the active balancer cut off from every worker (work stalls until the heal, and
nothing is lost).

Targets that depend on the rack's state at the time are symbolic: ``@leader`` (the master that
leads, resolved when the fault starts) and ``@active`` (the active balancer). The schedule stays a
pure function of the seed and the duration; what a symbol resolved to is in the soak's history.

Delay and loss need ``Rack.delay(ms, jitter_ms, hosts=None)`` and ``Rack.loss(percent,
hosts=None)``. The schedule has them whatever the rack offers (so a seed means the same faults on
every checkout); on a rack without them they are played as ``skipped``.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

ROLES = ("master", "balancer", "storage", "worker")
MASTERS, BALANCERS, STORAGE, WORKERS = ("m1", "m2", "m3"), ("b1", "b2"), ("s1", "s2"), ("w1", "w2")
CLIENT = "client"
ROLE_OF = {**dict.fromkeys(MASTERS, "master"), **dict.fromkeys(BALANCERS, "balancer"),
           **dict.fromkeys(STORAGE, "storage"), **dict.fromkeys(WORKERS, "worker"),
           "@leader": "master", "@active": "balancer"}

HOLD_S = (1.5, 6.0)  # how long a fault lasts
SETTLE_S = (1.0, 3.0)  # after its heal, before another fault may take the same role
GAP_S = (0.3, 2.5)  # between two faults of one lane
WARMUP_S = (4.0, 7.0)  # the workload gets going before the first fault


@dataclass(frozen=True)
class Fault:
    """One planned fault: ``at`` seconds into the soak, held ``hold`` s, then a ``settle`` s
    quiet for its roles. ``a``/``b``: hosts (or ``@leader``/``@active``); ``params``: the
    kind's numbers (ms, jitter_ms, percent)."""

    n: int
    lane: str
    kind: str  # kill | pause | isolate | cut | oneway | delay | loss
    label: str  # what the table groups by, e.g. "kill master", "cut leader|followers"
    at: float
    hold: float
    settle: float
    a: tuple[str, ...]
    b: tuple[str, ...] = ()
    roles: frozenset[str] = frozenset()
    params: tuple[tuple[str, float], ...] = ()

    @property
    def healed_at(self) -> float:
        return self.at + self.hold

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "lane": self.lane, "kind": self.kind, "label": self.label, "at": round(self.at, 3),
                "hold": round(self.hold, 3), "settle": round(self.settle, 3), "a": list(self.a), "b": list(self.b),
                "roles": sorted(self.roles), "params": dict(self.params)}


def _roles(*hosts: str) -> frozenset[str]:
    return frozenset(ROLE_OF[h] for h in hosts if h in ROLE_OF)


def _proc_fault(rng: random.Random) -> tuple[str, str, tuple[str, ...], tuple[str, ...], frozenset[str], tuple]:
    kind = rng.choices(["kill", "pause"], weights=[3, 2])[0]
    host = rng.choice(["@leader", *MASTERS, "@active", *BALANCERS, *STORAGE, *WORKERS, *WORKERS])
    role = "leader" if host == "@leader" else "active balancer" if host == "@active" else ROLE_OF[host]
    return kind, f"{kind} {role}", (host,), (), _roles(host), ()


def _net_fault(rng: random.Random) -> tuple[str, str, tuple[str, ...], tuple[str, ...], frozenset[str], tuple]:
    """(kind, label, a, b, roles, params) of one network fault, drawn from ``rng``."""
    m, s, w = rng.choice(MASTERS), rng.choice(STORAGE), rng.choice(WORKERS)
    others = tuple(x for x in MASTERS if x != m)
    menu = [  # (weight, kind, label, a, b, roles, params)
        (3, "isolate", None, (rng.choice([*MASTERS, *BALANCERS, *STORAGE, *WORKERS, "@leader", "@active"]),), (),
         None, ()),
        (3, "cut", "cut leader|followers", ("@leader",), ("@follower",), _roles("@leader"), ()),
        (1, "cut", "cut master|client", (m,), (CLIENT,), _roles(m), ()),
        (2, "cut", "cut worker|balancers", (w,), BALANCERS, _roles(w), ()),
        (2, "cut", "cut storage|workers+client", (s,), (*WORKERS, CLIENT), _roles(s), ()),
        (1, "cut", "cut active|workers", ("@active",), WORKERS, frozenset({"balancer", "worker"}), ()),
        (1, "cut", "split pair with workers", ("b1", "w1"), ("b2", "w2"), frozenset({"balancer", "worker"}), ()),
        (1, "oneway", "oneway master->others", (m,), others, _roles(m), ()),
        (1, "oneway", "oneway others->master", others, (m,), _roles(m), ()),
        (1, "oneway", "oneway worker->balancers", (w,), BALANCERS, _roles(w), ()),
        (1, "oneway", "oneway balancers->worker", BALANCERS, (w,), _roles(w), ()),
        (1, "oneway", "oneway active->masters", ("@active",), MASTERS, _roles("@active"), ()),
        (2, "delay", "delay all links", (), (), frozenset(),
         (("ms", rng.choice([20, 50, 100])), ("jitter_ms", rng.choice([5, 10, 20])))),
        (1, "delay", "delay one host", (rng.choice([*MASTERS, *BALANCERS, *STORAGE, *WORKERS]),), (), None,
         (("ms", rng.choice([50, 100, 200])), ("jitter_ms", rng.choice([10, 30])))),
        (2, "loss", "loss all links", (), (), frozenset(), (("percent", rng.choice([1, 3, 5])),)),
        (1, "loss", "loss one host", (rng.choice([*MASTERS, *BALANCERS, *STORAGE, *WORKERS]),), (), None,
         (("percent", rng.choice([5, 10, 20])),)),
    ]
    _, kind, label, a, b_, roles, params = rng.choices(menu, weights=[x[0] for x in menu])[0]
    if roles is None:  # a fault of one host: it takes that host's role, and isolate is named after it
        host = a[0]
        who = "leader" if host == "@leader" else "active balancer" if host == "@active" else ROLE_OF[host]
        label = label or f"isolate {who}"
        roles = _roles(host)
    return kind, label, a, b_, roles, params


def schedule(seed: int, seconds: float) -> list[Fault]:
    """The faults of a soak of ``seconds`` with ``seed``, by start time; every fault healed by
    ``seconds``. A pure function: the same arguments give the same list."""
    rng = random.Random(f"chaos-{seed}")  # a str seed: the same on every Python
    start = rng.uniform(*WARMUP_S)
    lane_free = {"net": start, "proc": start + rng.uniform(*GAP_S)}
    role_free = dict.fromkeys(ROLES, 0.0)
    faults: list[Fault] = []
    while lane_free:
        lane = min(lane_free, key=lambda k: (lane_free[k], k))
        kind, label, a, b, roles, params = (_net_fault if lane == "net" else _proc_fault)(rng)
        at = max([lane_free[lane], *(role_free[r] for r in roles)])
        hold, settle = rng.uniform(*HOLD_S), rng.uniform(*SETTLE_S)
        if at + hold > seconds:
            del lane_free[lane]  # this lane is done: its next fault would outlast the soak
            continue
        faults.append(Fault(0, lane, kind, label, at, hold, settle, a, b, roles, params))
        for r in roles:
            role_free[r] = at + hold + settle
        lane_free[lane] = at + hold + settle + rng.uniform(*GAP_S)
    faults.sort(key=lambda f: (f.at, f.lane))
    return [replace(f, n=n) for n, f in enumerate(faults)]


def overlaps(faults: list[Fault]) -> list[tuple[int, int]]:
    """Pairs of faults that share a role while both are held or settling (none, by design)."""
    out = []
    for i, f in enumerate(faults):
        for g in faults[i + 1:]:
            if g.at < f.healed_at + f.settle and f.at < g.healed_at + g.settle and (
                    f.roles & g.roles or f.lane == g.lane):
                out.append((f.n, g.n))
    return out


# ---- playing it on a rack -------------------------------------------------------------------


@dataclass
class Played:
    """A fault as played: the hosts its symbols resolved to, when it began and was healed
    (monotonic and wall clock: the ledger's attempt times are wall clock), or why it was skipped."""

    fault: Fault
    a: tuple[str, ...] = ()
    b: tuple[str, ...] = ()
    began: float | None = None
    began_wall: float | None = None
    healed: float | None = None
    healed_wall: float | None = None
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.fault.as_dict(), "hosts_a": list(self.a), "hosts_b": list(self.b), "began": self.began,
                "healed": self.healed, "skipped": self.skipped, "notes": self.notes}


class Injector:
    """Plays a schedule on ``rack``: each fault at its time (late, never early, if the one before
    ran over), its heal ``hold`` s later; ``note(kind, **detail)`` records each step in the
    soak's history. A node that exited without being killed is noted as ``crash`` and started
    again from its unit line (what systemd's Restart=on-failure would do)."""

    def __init__(self, rack: Any, faults: list[Fault], note: Callable[..., None], t0: float) -> None:
        self.rack = rack
        self.faults = faults
        self.note = note
        self.t0 = t0
        self.played: list[Played] = []
        self.down: set[str] = set()  # hosts this injector killed and has not started again
        self.stopped: set[str] = set()  # hosts it paused and has not continued
        self.crashes: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Play every fault and its heal in time order (until ``stop``); heal all at the end."""
        steps = sorted([(f.at, 0, f.n) for f in self.faults] + [(f.healed_at, 1, f.n) for f in self.faults])
        played: dict[int, Played] = {}
        try:
            for at, heal, n in steps:
                while not stop.is_set() and time.monotonic() - self.t0 < at:
                    self.check_crashes()
                    stop.wait(min(0.2, max(0.0, at - (time.monotonic() - self.t0))))
                if stop.is_set():
                    break
                if heal:
                    self._heal(played[n])
                else:
                    played[n] = self._begin(self.faults[n])
                    self.played.append(played[n])
        finally:
            for p in played.values():
                if p.healed is None and p.skipped is None:
                    self._heal(p)
            self.heal_all()

    def _resolve(self, names: tuple[str, ...], other: tuple[str, ...] = ()) -> tuple[str, ...]:
        out: list[str] = []
        for name in names:
            if name == "@leader":
                out.append(self.rack.leader() or "m1")
            elif name == "@active":
                out.append(self.rack.active() or "b1")
            elif name == "@follower":
                out += [m for m in MASTERS if m not in other]
            else:
                out.append(name)
        return tuple(out)

    def _begin(self, f: Fault) -> Played:
        p = Played(f)
        p.a = self._resolve(f.a)
        p.b = self._resolve(f.b, p.a)
        p.began, p.began_wall = time.monotonic(), time.time()
        try:
            self._apply(f, p)
        except Exception as exc:  # noqa: BLE001 - a fault that could not be applied is reported, not fatal
            p.notes.append(f"applying failed: {exc!r}")
        self.note("inject", fault=f.n, label=f.label, a=list(p.a), b=list(p.b), skipped=p.skipped)
        return p

    def _apply(self, f: Fault, p: Played) -> None:
        rack, params = self.rack, dict(f.params)
        if f.kind == "kill":
            rack.kill(p.a[0])
            self.down.add(p.a[0])
        elif f.kind == "pause":
            rack.signal(p.a[0], signal.SIGSTOP)
            self.stopped.add(p.a[0])
        elif f.kind == "isolate":
            rack.isolate(p.a[0])
        elif f.kind in ("cut", "oneway"):
            rack.cut(p.a, p.b, one_way=f.kind == "oneway")
        elif f.kind == "delay":
            if not hasattr(rack, "delay"):  # HERE: Rack.delay(ms, jitter_ms, hosts=None), another change
                p.skipped = "the rack has no delay()"
                return
            rack.delay(params["ms"], params["jitter_ms"], hosts=list(p.a) or None)
        elif f.kind == "loss":
            if not hasattr(rack, "loss"):  # HERE: Rack.loss(percent, hosts=None), another change
                p.skipped = "the rack has no loss()"
                return
            rack.loss(params["percent"], hosts=list(p.a) or None)
        else:
            raise ValueError(f"unknown fault kind {f.kind!r}")

    def _heal(self, p: Played) -> None:
        f = p.fault
        if p.skipped is None:
            try:
                if f.kind == "kill":
                    self.rack.start(p.a[0])
                    self.down.discard(p.a[0])
                elif f.kind == "pause":
                    self.rack.signal(p.a[0], signal.SIGCONT)
                    self.stopped.discard(p.a[0])
                else:
                    self.rack.heal()  # net faults never overlap: this heals exactly this one
            except Exception as exc:  # noqa: BLE001 - reported; heal_all at the end retries
                p.notes.append(f"healing failed: {exc!r}")
        p.healed, p.healed_wall = time.monotonic(), time.time()
        self.note("heal", fault=f.n, label=f.label)

    def heal_all(self) -> None:
        """Undo everything: cuts, isolations, delays and losses; every paused node continued, every
        killed one started."""
        self.rack.heal()
        for name in sorted(self.stopped):
            self.rack.signal(name, signal.SIGCONT)
        self.stopped.clear()
        for name in sorted(self.down):
            self.rack.start(name)
        self.down.clear()
        self.check_crashes()

    def check_crashes(self) -> None:
        """A node that is not running though this injector did not kill it crashed: note it and
        start it again."""
        for host in self.rack.nodes():
            if host.name in self.down or host.running():
                continue
            code = host.process.returncode if host.process is not None else None
            tail = self.rack.log(host.name).read_text(errors="replace")[-3000:] if self.rack.log(
                host.name).exists() else ""
            self.crashes.append({"host": host.name, "exit": code, "at": time.monotonic() - self.t0, "log_tail": tail})
            self.note("crash", host=host.name, exit=code)
            self.rack.start(host.name)
