"""Who may read a stored file: a client reads what its jobs and its pins refer to (issue 20).

Theory of operation
-------------------
A blob is named by its content hash, and a storage node knows nothing of jobs; the masters do.
So a storage node asks them, once per file, which keys may read it (``FILE_LOOKUP``'s
``readers``: the keys whose jobs refer to the file, and the keys that pinned it; ``*`` when a
cluster without keys pinned it) and remembers a positive answer for ``TTL_S``: files are
immutable, and a reference that goes away takes at most that long to close the door again. A
read from a key the remembered list does not name is asked about afresh (the key's job may
have referred to the file a moment ago), never refused from memory.

Only client and gateway keys are gated. Operators read everything; workers read what their
tasks need (their mounts: the tasks' owners are the masters' business) and storage nodes what
they replicate and repair. The gate is pure: ``StorageCore`` asks it, and performs the lookups
it asks for (``LookupReaders``) through the node's I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TTL_S = 30.0  # how long a positive answer of the masters is trusted
GATED = frozenset({"client", "gateway"})
EVERYONE = "*"  # in ``readers``: a pin made without keys


@dataclass(frozen=True, slots=True)
class LookupReaders:
    """Effect: ask the masters who may read ``file_id``; ``ReadersKnown`` comes back."""

    file_id: bytes
    cause: str = ""


@dataclass(frozen=True, slots=True)
class ReadersKnown:
    """Event: the keys that may read ``file_id`` (None: the masters could not be asked)."""

    file_id: bytes
    readers: frozenset[str] | None
    stimulus_id: str


@dataclass
class ReadGate:
    """The remembered answers and the reads waiting for one."""

    enabled: bool = True  # False: a storage tier without masters (tests, benchmarks): nobody to ask
    known: dict[bytes, tuple[frozenset[str], float]] = field(default_factory=dict)  # file → (readers, until)
    waiting: dict[bytes, list[Any]] = field(default_factory=dict)  # file → parked reads

    def allows(self, role: str, name: str, file_id: bytes, now: float) -> bool:
        """True if a key of ``role`` named ``name`` may read ``file_id`` without asking."""
        if role not in GATED or not name or not self.enabled:
            return True
        entry = self.known.get(file_id)
        return entry is not None and entry[1] > now and self.may(name, file_id)

    def park(self, file_id: bytes, read: Any) -> bool:
        """Hold ``read`` until the masters answer; True if a lookup must be sent (the first)."""
        queue = self.waiting.setdefault(file_id, [])
        queue.append(read)
        return len(queue) == 1

    def answered(self, file_id: bytes, readers: frozenset[str] | None, now: float) -> list[Any]:
        """The masters' answer: remember it, and hand back the reads that waited for it."""
        if readers is not None:
            self.known[file_id] = (readers, now + TTL_S)
        if len(self.known) > 100_000:  # bounded: drop what has expired
            self.known = {f: e for f, e in self.known.items() if e[1] > now}
        return self.waiting.pop(file_id, [])

    def may(self, name: str, file_id: bytes) -> bool:
        """True if the masters' last answer about ``file_id`` names ``name`` (or everyone)."""
        entry = self.known.get(file_id)
        return entry is not None and (name in entry[0] or EVERYONE in entry[0])
