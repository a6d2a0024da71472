"""What workers and masters send, checked before it touches the balancer's state.

A worker's registration claims capabilities; past the bounds below a claim is a bug or a lie,
not a machine, and the worker is refused with a reason (doc/dispatch.md, "Workers"). A task's
``need`` comes from its job's ``run`` section (or the task's own arguments); a malformed one
fails the task at once with a reason instead of leaving it waiting forever. Each function
returns its result with ``None``, or a placeholder with the reason: nothing here raises.

Pure functions of the message; no state, no I/O.
"""

from __future__ import annotations

from balancer.dispatch import Need
from balancer.registry import Capabilities
from cluster.node.events import Effect, MessageReceived, Refuse
from proto.messages import WorkerRequest, WorkerStatus

# Sanity bounds on what a worker may claim: past these it is a bug or a lie, not a machine.
MAX_SLOTS = 4096
MAX_CORES = 4096
MAX_GPUS = 64
MAX_MEMORY_MB = 64 << 20  # 64 TiB

NEED_KEYS = ("cores", "memory_mb", "gpus", "labels", "kernel")


def parse_registration(m: WorkerStatus) -> tuple[Capabilities, dict, str | None]:
    """(capabilities, running tasks by key, None) or (.., .., why it is refused)."""
    c = m.capabilities if isinstance(m.capabilities, dict) else {}
    bad = Capabilities(), {}
    if not m.name:
        return *bad, "a worker must register with a name"
    if not 0 < m.slots_total <= MAX_SLOTS:
        return *bad, f"worker {m.name}: {m.slots_total} slots is impossible (1 to {MAX_SLOTS})"
    if m.slots_free > m.slots_total:
        return *bad, f"worker {m.name}: {m.slots_free} free slots of {m.slots_total}"
    cores, memory, gpus, kernel = c.get("cores", 1), c.get("memory_mb", 0), c.get("gpus", 0), c.get("kernel", "")
    for label, value, high in (("cores", cores, MAX_CORES), ("memory_mb", memory, MAX_MEMORY_MB), ("gpus", gpus, MAX_GPUS)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
            return *bad, f"worker {m.name}: {label} = {value!r} is impossible (an integer from 0 to {high})"
    if cores < 1:
        return *bad, f"worker {m.name}: a worker needs at least 1 core"
    if not isinstance(kernel, str) or not all(isinstance(x, str) for x in m.labels):
        return *bad, f"worker {m.name}: labels and kernel must be strings"
    if any(not isinstance(f, bytes) or len(f) != 16 for f in m.cache_add):
        return *bad, f"worker {m.name}: cached file ids must be 16 bytes"
    tasks = {}
    for t in m.tasks:
        if not _is_running_task(t):
            return *bad, f"worker {m.name}: a running task is [job id (16 bytes), task, term, sequence], not {t!r}"
        tasks[(t[0], t[1])] = (t[2], t[3])
    caps = Capabilities(cores, memory, gpus, frozenset(m.labels), kernel)
    return caps, tasks, None


def _is_running_task(t: object) -> bool:
    return (isinstance(t, (list, tuple)) and len(t) == 4 and isinstance(t[0], bytes) and len(t[0]) == 16
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in t[1:]))


def worker_slots(m: WorkerStatus) -> int:
    """The task slots a worker runs (``capabilities.slots``); its ``slots_total`` adds a prefetch
    queue. A missing or impossible claim counts as ``slots_total``."""
    slots = m.capabilities.get("slots") if isinstance(m.capabilities, dict) else None
    return slots if isinstance(slots, int) and 0 < slots <= m.slots_total else m.slots_total


def worker_output(m: WorkerStatus) -> str:
    """Where the worker serves its tasks' output (``capabilities.output``, an endpoint), "" if
    it says nowhere or says it wrongly: followers ask it there (OUTPUT_FOLLOW)."""
    output = m.capabilities.get("output") if isinstance(m.capabilities, dict) else None
    ok = isinstance(output, str) and output.startswith(("tcp://", "ipc://")) and len(output) <= 200
    return output if ok else ""


def need_of(m: WorkerRequest) -> tuple[Need, int, str | None]:
    """What the task needs of a worker and its priority, from the job's ``run`` section."""
    args = m.arguments if isinstance(m.arguments, dict) else {}
    run = args.get("run", {}) if isinstance(args.get("run", {}), dict) else {}
    priority = args.get("priority", run.get("priority", 0))
    if not isinstance(priority, int) or isinstance(priority, bool):
        priority = 0
    spec = run.get("need", {})
    if not isinstance(spec, dict):
        return Need(), priority, "'need' must be a map (cores, memory_mb, gpus, labels, kernel)"
    unknown = set(spec) - set(NEED_KEYS)
    if unknown:
        return Need(), priority, f"unknown need {', '.join(sorted(unknown))} (known: cores, memory_mb, gpus, labels, kernel)"
    labels = spec.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return Need(), priority, "need 'labels' must be a list of strings"
    avoid = args.get("avoid", [])  # workers that ran a replica of this work unit already
    if not isinstance(avoid, list) or not all(isinstance(x, str) for x in avoid):
        return Need(), priority, "'avoid' must be a list of worker names"
    need = Need(spec.get("cores", 1), spec.get("memory_mb", 0), spec.get("gpus", 0), frozenset(labels), spec.get("kernel", ""),
                frozenset(avoid))
    why = need.problem()
    return need, priority, why


def refuse(ev: MessageReceived, detail: str) -> Effect:
    """A REFUSE of the message ``ev`` brought (one the balancer does not take on that socket)."""
    return Refuse(ev.socket, ev.route, ev.message.code, getattr(ev.message, "request_id", 0), detail, ev.stimulus_id)
