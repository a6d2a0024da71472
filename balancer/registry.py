"""The balancer's worker registry: who the workers are, what they can do, their credit and cache.

Theory of operation
-------------------
A worker *registers* with its name, its ROUTER identity (``route``), its ``Capabilities``
(cores, memory, GPUs, labels, kernel build) and its number of task slots. From then on it
*heartbeats*: each heartbeat says how many slots are free right now (its credit), how many it
takes in all now (a worker's prefetch queue may grow and shrink: worker.prefetch) and which
files entered or left its local cache since the last one. The balancer heartbeats the worker
too (the loop does that); this module only keeps the state the dispatcher decides from.

Credit follows FileMQ (zguide chapter 7): a worker's ``free`` is the credit it last announced
minus the tasks ``sent`` to it since. A worker's credit may shrink (its prefetch queue adapts,
worker.prefetch): a result then gives a slot back only if the worker holds (or has on the way,
``running``) fewer tasks than its credit, so the tasks it holds beyond it are not replaced as
they end. Nothing may be sent to a worker with no credit: ``sent``
refuses it. A task's result gives its slot back (``finished``): the result is the worker's own
word that the slot is free, and waiting for the next heartbeat instead would cost a message
and a round trip per task. The heartbeat then restates the count, so a drift cannot last.

Liveness follows the Paranoid Pirate pattern (zguide chapter 4): a worker silent for longer
than ``liveness`` seconds (the heartbeat interval times the number of heartbeats it may miss)
is purged by ``expire(now)``, which hands back the tasks it was running so that the loop can
report them to the master leader as failed attempts. A worker that registers again under a
known name from a new route restarted: its old tasks are lost the same way, returned by
``register``.

Bad input (an unknown worker heartbeating, a credit below zero or above the worker's slots, a
file id that is not 16 bytes) raises ``RegistryError(code, text)`` and changes nothing but the
``refused.<code>`` counter: every check runs before the first mutation. Worker liveness,
credit and caches are soft state (design.md, "The ledger"): after a failover the new active
balancer rebuilds them from the workers' registrations.

Pure: ``now`` is an argument; no clock, socket, thread or disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, NoReturn

FILE_ID_BYTES = 16

TaskKey = tuple[bytes, int]  # (job id, task id)
Fence = tuple[int, int]  # (Raft term, sequence) of the assignment


class RegistryError(ValueError):
    """A registration, heartbeat or send the registry refuses; ``code`` is stable, ``text`` is
    for people. Nothing changed."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a worker can offer one task at most: cores, memory, GPUs, labels, kernel build."""

    cores: int = 1
    memory_mb: int = 0
    gpus: int = 0
    labels: frozenset[str] = frozenset()
    kernel: str = ""

    def problem(self) -> str | None:
        """Why these capabilities are malformed, or None."""
        for name in ("cores", "memory_mb", "gpus"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"{name} must be an integer >= 0, not {value!r}"
        if not isinstance(self.labels, frozenset) or not all(isinstance(x, str) for x in self.labels):
            return "labels must be a frozenset of strings"
        if not isinstance(self.kernel, str):
            return "kernel must be a string"
        return None


@dataclass(slots=True)
class Worker:
    """One registered worker as the balancer sees it (soft state)."""

    name: str
    route: bytes
    caps: Capabilities
    slots: int  # its whole credit: the task slots it runs and its prefetch queue beyond them
    free: int  # credit: last announced free slots minus tasks sent since
    cached: set[bytes] = field(default_factory=set)  # 16-byte ids of files in its local cache
    running: dict[TaskKey, Fence] = field(default_factory=dict)
    last_heard: float = 0.0
    registered_at: float = 0.0

    def free_slots(self, task_slots: int) -> int:
        """The task slots free now, of the ``task_slots`` the worker runs: its credit is those
        and a prefetch queue, and the tasks it holds fill the slots first (a task waits in the
        queue only while every slot is busy). Never above ``task_slots``."""
        return max(0, min(task_slots, self.slots) - len(self.running))


@dataclass
class Registry:
    """The workers known to one balancer. A worker silent for more than ``liveness`` seconds
    is purged by ``expire``."""

    liveness: float
    _workers: dict[str, Worker] = field(init=False, default_factory=dict)
    _runs: dict[TaskKey, dict[str, Fence]] = field(init=False, default_factory=dict)  # who runs each task
    counters: dict[str, int] = field(init=False, default_factory=dict)
    # ``workers()`` in name order, kept until a worker comes or goes: the balancer asks for it
    # several times per placement round, and sorting 1,000 names each time was a measurable
    # part of a round (bench/batch.py, 1,000 simulated workers)
    _by_name: list[Worker] | None = field(init=False, default=None)
    # names of the workers with credit (free > 0): a placement round looks only at these, so
    # with a thousand workers busy and one slot freed, a round costs O(1), not O(workers)
    _credit: set[str] = field(init=False, default_factory=set)
    # slots of all workers, and tasks running on them, kept as they change: the balancer sizes
    # its request for more work from these after every burst of messages
    slots_total: int = field(init=False, default=0)
    running_total: int = field(init=False, default=0)

    # ---- events ------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        route: bytes,
        caps: Capabilities,
        slots: int,
        now: float,
        free: int | None = None,
        cached: Iterable[bytes] = (),
        running: Mapping[TaskKey, Fence] | None = None,
    ) -> list[TaskKey]:
        """A worker announced itself. Returns the tasks lost by a restart (empty otherwise).

        ``free`` defaults to ``slots``; ``cached`` is the whole cache content; ``running`` the
        tasks it is still running (after a balancer failover the new active one learns them so).
        A known name from the same route only updates what it announces and keeps its running
        tasks; from a new route the worker restarted: its old running tasks are returned as lost
        and replaced by ``running``."""
        cached = frozenset(cached)
        running = dict(running or {})
        free = slots if free is None else free
        self._check_registration(name, route, caps, slots, free, cached, running)
        old = self._workers.get(name)
        if old is not None and old.route == route:
            self._update(old, caps, slots, free, cached, running, now)
            return []
        lost: list[TaskKey] = []
        if old is not None:
            lost = sorted(old.running)
            self._forget(name, lost)
            self.slots_total -= old.slots
            self.running_total -= len(old.running)
            self._count("restarts")
            self._count("lost_tasks", len(lost))
        self._workers[name] = w = Worker(name, route, caps, slots, 0, set(cached), running, now, now)
        self._set_free(w, free)
        self.slots_total += slots
        self.running_total += len(running)
        self._by_name = None
        for key, fence in running.items():
            self._runs.setdefault(key, {})[name] = fence
        self._count("registered")
        return lost

    def _check_registration(self, name: str, route: bytes, caps: Capabilities, slots: int, free: int,
                            cached: frozenset[bytes], running: dict[TaskKey, Fence]) -> None:
        """Every check of ``register``, before its first mutation."""
        if not isinstance(name, str) or not name:
            self._refuse("bad_name", f"a worker name must be a non-empty string, not {name!r}")
        if not isinstance(route, bytes) or not route:
            self._refuse("bad_route", f"worker {name}: the route must be non-empty bytes")
        if not isinstance(caps, Capabilities):
            self._refuse("bad_capabilities", f"worker {name}: capabilities must be Capabilities")
        why = caps.problem()
        if why:
            self._refuse("bad_capabilities", f"worker {name}: {why}")
        self._check_slots(name, slots)
        self._check_free(name, free, slots)
        self._check_ids(name, cached)
        for key, fence in running.items():
            self._check_key(name, key, fence)

    def _update(self, old: Worker, caps: Capabilities, slots: int, free: int, cached: frozenset[bytes],
                running: dict[TaskKey, Fence], now: float) -> None:
        """A known worker registered again from the same route: it keeps its running tasks."""
        self.slots_total += slots - old.slots
        old.caps, old.slots, old.cached = caps, slots, set(cached)
        self._set_free(old, free)
        self.running_total += sum(key not in old.running for key in running)
        old.running.update(running)
        for key, fence in running.items():
            self._runs.setdefault(key, {})[old.name] = fence
        old.last_heard = now
        self._count("reregistered")

    def heartbeat(
        self,
        name: str,
        now: float,
        free: int,
        cached_add: Iterable[bytes] = (),
        cached_drop: Iterable[bytes] = (),
        slots: int | None = None,
    ) -> Worker:
        """A worker's heartbeat: its credit now (``free`` slots; ``slots`` in all, when it says)
        and its cache changes."""
        w = self._known(name)
        cached_add, cached_drop = frozenset(cached_add), frozenset(cached_drop)
        if slots is not None:
            self._check_slots(name, slots)
        self._check_free(name, free, w.slots if slots is None else slots)
        self._check_ids(name, cached_add | cached_drop)
        both = cached_add & cached_drop
        if both:
            self._refuse("bad_cache_change", f"worker {name}: {next(iter(both)).hex()} is both added and dropped")
        if slots is not None and slots != w.slots:
            self.slots_total += slots - w.slots
            w.slots = slots
        self._set_free(w, free)
        w.cached |= cached_add
        w.cached -= cached_drop
        w.last_heard = now
        return w

    def sent(self, name: str, key: TaskKey, fence: Fence) -> Worker:
        """Task ``key`` was sent to worker ``name`` under ``fence``: it takes one credit. A task
        the worker already runs under an older fence is replaced (the master reassigned it); under
        the same or a newer one the send is refused (the worker would refuse it too)."""
        w = self._known(name)
        self._check_key(name, key, fence)
        if w.free <= 0:
            self._refuse("no_credit", f"worker {name} has no free slot: nothing may be sent beyond its credit")
        old = w.running.get(key)
        if old is not None and tuple(old) >= tuple(fence):
            self._refuse("stale_fence", f"worker {name} already runs task {_key_text(key)} under fence {old}")
        if old is not None:
            self._count("superseded")
        self._set_free(w, w.free - 1)
        self.running_total += old is None
        w.running[key] = fence
        self._runs.setdefault(key, {})[name] = fence
        return w

    def finished(self, name: str, key: TaskKey, fence: Fence | None = None) -> Fence | None:
        """Worker ``name`` ended task ``key`` (under ``fence``, when known); returns the fence it
        ran under, or None when the task was not running there (a duplicate result). The task's
        slot comes back as credit. A result under an older fence than the one the task was sent
        there with since (the masters recorded that attempt lost and gave the task a newer token)
        ends nothing: the newer attempt still runs there, and is reported lost if the worker is."""
        w = self._known(name)
        running = w.running.get(key)
        if fence is not None and running is not None and tuple(fence) < tuple(running):
            return None
        fence = w.running.pop(key, None)
        if fence is not None:
            self._forget(name, [key])
            self.running_total -= 1
            # the result gives its slot back, unless the worker's credit shrank below what it holds
            self._set_free(w, max(0, min(w.slots - len(w.running), w.free + 1)))
        return fence

    def expire(self, now: float) -> list[tuple[Worker, list[TaskKey]]]:
        """Purge workers silent for more than ``liveness`` seconds; returns each with the tasks
        it was running (to report as failed attempts), by name."""
        gone = sorted(n for n, w in self._workers.items() if now - w.last_heard > self.liveness)
        out = []
        if gone:
            self._by_name = None
        for name in gone:
            w = self._workers.pop(name)
            self._credit.discard(name)
            lost = sorted(w.running)
            self._forget(name, lost)
            self.slots_total -= w.slots
            self.running_total -= len(w.running)
            self._count("expired")
            self._count("lost_tasks", len(lost))
            out.append((w, lost))
        return out

    def remove(self, name: str) -> Worker | None:
        """Forget worker ``name`` now (it left or was replaced); returns it, with the tasks it was
        running still in ``running``, or None when it was not registered."""
        w = self._workers.pop(name, None)
        self._credit.discard(name)
        if w is not None:
            self._by_name = None
            self._forget(name, list(w.running))
            self.slots_total -= w.slots
            self.running_total -= len(w.running)
            self._count("removed")
        return w

    # ---- queries -----------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        """The registered workers, by name (the live objects: do not change them directly)."""
        if self._by_name is None:
            self._by_name = [self._workers[n] for n in sorted(self._workers)]
        return list(self._by_name)

    def get(self, name: str) -> Worker | None:
        return self._workers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._workers

    def __len__(self) -> int:
        return len(self._workers)

    def runners(self, key: TaskKey) -> set[str]:
        """The workers this balancer sent task ``key`` to and that have not ended it."""
        return set(self._runs.get(key, ()))

    def newest_fence(self, key: TaskKey) -> tuple[str, Fence] | None:
        """The worker running task ``key`` under the newest fence, with that fence; None when
        no worker runs it."""
        runs = self._runs.get(key)
        if not runs:
            return None
        name = max(runs, key=lambda n: (tuple(runs[n]), n))
        return name, runs[name]

    def free_total(self) -> int:
        """The credit of all workers together."""
        return sum(self._workers[n].free for n in self._credit)

    def with_credit(self) -> list[Worker]:
        """The workers with a free slot, by name."""
        return [self._workers[n] for n in sorted(self._credit)]

    def _set_free(self, w: Worker, free: int) -> None:
        w.free = free
        if free > 0:
            self._credit.add(w.name)
        else:
            self._credit.discard(w.name)

    def status(self) -> dict:
        ws = self._workers.values()
        return {
            "workers": len(self._workers),
            "slots": sum(w.slots for w in ws),
            "free": sum(w.free for w in ws),
            "running": sum(len(w.running) for w in ws),
            "cached_files": sum(len(w.cached) for w in ws),
            **self.counters,
        }

    def validate_state(self) -> None:
        """Check the invariants (test fixtures call this)."""
        for name, w in self._workers.items():
            assert w.name == name, (name, w.name)
            assert 0 <= w.free <= w.slots, (name, w.free, w.slots)
            assert all(len(f) == FILE_ID_BYTES for f in w.cached), name
            assert w.registered_at <= w.last_heard, name
            for key, fence in w.running.items():
                assert self._runs.get(key, {}).get(name) == fence, (name, key)
        assert self._credit == {n for n, w in self._workers.items() if w.free > 0}, "stale credit index"
        assert self.slots_total == sum(w.slots for w in self._workers.values()), "stale slot count"
        assert self.running_total == sum(len(w.running) for w in self._workers.values()), "stale running count"
        if self._by_name is not None:
            assert [id(w) for w in self._by_name] == [id(self._workers[n]) for n in sorted(self._workers)], "stale name order"
        for key, runs in self._runs.items():
            assert runs, key
            for name, fence in runs.items():
                assert self._workers[name].running.get(key) == fence, (name, key)

    # ---- inside ------------------------------------------------------------------------------

    def _known(self, name: str) -> Worker:
        w = self._workers.get(name)
        if w is None:
            self._refuse("unknown_worker", f"worker {name!r} is not registered (it must register first)")
        return w

    def _check_slots(self, name: str, slots: object) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
            self._refuse("bad_slots", f"worker {name}: slots must be an integer >= 0, not {slots!r}")

    def _check_free(self, name: str, free: object, slots: int) -> None:
        if not isinstance(free, int) or isinstance(free, bool) or free < 0:
            self._refuse("bad_credit", f"worker {name}: free slots must be an integer >= 0, not {free!r}")
        if free > slots:
            self._refuse("bad_credit", f"worker {name}: {free} free slots but only {slots} in all")

    def _check_ids(self, name: str, ids: Iterable[bytes]) -> None:
        for f in ids:
            if not isinstance(f, bytes) or len(f) != FILE_ID_BYTES:
                self._refuse("bad_file_id", f"worker {name}: {f!r} is not a {FILE_ID_BYTES}-byte file id")

    def _check_key(self, name: str, key: object, fence: object) -> None:
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], bytes) and _is_int(key[1])):
            self._refuse("bad_task", f"worker {name}: a task key is (job id bytes, task int), not {key!r}")
        if not (isinstance(fence, tuple) and len(fence) == 2 and all(_is_int(x) and x >= 0 for x in fence)):
            self._refuse("bad_fence", f"worker {name}: a fence is (term, sequence) integers >= 0, not {fence!r}")

    def _forget(self, name: str, keys: Iterable[TaskKey]) -> None:
        for key in keys:
            runs = self._runs.get(key)
            if runs is not None:
                runs.pop(name, None)
                if not runs:
                    del self._runs[key]

    def _refuse(self, code: str, text: str) -> NoReturn:
        self._count(f"refused.{code}")
        raise RegistryError(code, text)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _key_text(key: TaskKey) -> str:
    return f"{key[0].hex()}/{key[1]}"
