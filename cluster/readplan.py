"""What a client's download still needs and which replica it asks next: the pure part of a read.

Theory of operation
-------------------
A stored file is immutable and named by its content, so every replica serves the same bytes: a
download may take any chunk from any replica, and when the replica it streams from fails it
keeps every chunk it has and asks the next one for the rest (HDFS's DFSInputStream and Ceph's
clients do the same: a read moves to another replica and goes on from where it stood). The
whole file is still checked against its id at the end.

``ReadPlan`` holds the chunks received (by offset), the replicas in the order to ask them and
each one's last failure. It opens no socket and reads no clock: the loop (``cluster/files.py``)
streams from the replica ``next_source()`` names, reports each chunk with ``received`` and a
failure with ``failed``, and asks again until the plan is ``complete`` or names no one.

The rules:

- Replicas are asked in turn, from the one after the replica that failed, wrapping round: a
  download does not go back to a node it just left while another has not been tried.
- A replica that says it lacks the file, or answers in a way another request would repeat
  (``GONE``: not found, out of range, a size that disagrees), is not asked again. Any other
  failure (silence, unreachable, a corrupt block, a disk error, a short answer) leaves it in
  the turn: a node that was slow, or whose copy is bad in one block, may serve the rest.
- The download gives up when every replica still in the turn has failed since the last chunk
  arrived (a full round without progress), or none is left. A round that goes on delivered a
  chunk, so a download always ends.
- A file that does not hash to its id at the end (each node verifies its blocks, so this is a
  node's fault, not the network's) is forgotten whole: bytes from several replicas cannot be
  told apart. When one replica sent all of it, that replica is ruled out; after as many
  mismatches as there are replicas the download gives up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from proto.errors import StorageStatus

# Failures another request to the same node would only repeat: the node is not asked again.
GONE = frozenset({StorageStatus.NOT_FOUND, StorageStatus.OUT_OF_RANGE, StorageStatus.BAD_REQUEST,
                  StorageStatus.TOO_LARGE, StorageStatus.SIZE_MISMATCH, StorageStatus.HASH_MISMATCH})


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a replica failed: a sentence and its StorageStatus (None: it did not answer)."""

    text: str
    status: int | None


@dataclass
class ReadPlan:
    """One download of a file of ``size`` bytes (None until a replica says) in chunks of
    ``chunk`` bytes from ``sources``, in the order to ask them."""

    sources: Sequence[str]
    chunk: int
    size: int | None = None
    have: dict[int, int] = field(default_factory=dict)  # chunk offset → its length, received
    failures: dict[str, Failure] = field(default_factory=dict)  # each replica's last failure
    gone: set[str] = field(default_factory=set)  # not asked again
    failed_since_progress: set[str] = field(default_factory=set)
    senders: set[str] = field(default_factory=set)  # replicas that sent what ``have`` holds
    last: str | None = None  # the replica asked last
    mismatches: int = 0

    def __post_init__(self) -> None:
        if self.chunk <= 0:
            raise ValueError(f"chunk must be positive, not {self.chunk}")
        self.sources = list(dict.fromkeys(self.sources))

    # ---- the loop's questions ----------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.size is not None and self.held == self.size

    @property
    def held(self) -> int:
        """Bytes received and kept."""
        return sum(self.have.values())

    def next_source(self) -> str | None:
        """The replica to stream from next, or None: give up (``outcome`` says why)."""
        if self.complete or self.mismatches >= max(1, len(self.sources)):
            return None
        start = 0 if self.last is None else self.sources.index(self.last) + 1
        for k in range(len(self.sources)):
            node = self.sources[(start + k) % len(self.sources)]
            if node not in self.gone and node not in self.failed_since_progress:
                self.last = node
                return node
        return None

    def missing(self) -> list[int]:
        """Offsets of the chunks still to fetch (the size must be known)."""
        if self.size is None:
            raise ValueError("the size is not known yet")
        return [at for at in range(0, self.size, self.chunk) if at not in self.have]

    # ---- what happened -----------------------------------------------------------------------

    def sized(self, node: str, size: int) -> bool:
        """``node`` says the file has ``size`` bytes: True if that is the size (the first answer
        sets it when the ledger did not), else the node is ruled out."""
        if self.size is None:
            self.size = size
        if size == self.size:
            return True
        self.failed(node, f"it says the file has {size} bytes, not {self.size}", StorageStatus.SIZE_MISMATCH)
        return False

    def received(self, node: str, offset: int, n: int) -> None:
        """A whole chunk arrived from ``node`` and was written where it belongs."""
        if self.size is None or offset % self.chunk or offset >= self.size or n != min(self.chunk, self.size - offset):
            raise ValueError(f"chunk at {offset} of {n} bytes is not one of this file's {self.chunk}-byte chunks")
        if offset not in self.have:
            self.have[offset] = n
            self.senders.add(node)
            self.failed_since_progress.clear()

    def failed(self, node: str, text: str, status: int | None) -> None:
        """Streaming from ``node`` ended before the file was complete."""
        self.failures[node] = Failure(text, status)
        self.failed_since_progress.add(node)
        if status in GONE:
            self.gone.add(node)

    def rejected(self) -> int:
        """The complete file does not hash to its id: forget it, rule out its sender if it had
        one, and return how many bytes were forgotten."""
        forgotten = self.held
        self.mismatches += 1
        text = "the bytes it sent do not match the file id"
        if len(self.senders) == 1:
            (node,) = self.senders
            self.failures[node] = Failure(text, StorageStatus.HASH_MISMATCH)
            self.gone.add(node)
        else:
            for node in self.senders:
                self.failures[node] = Failure(f"{text} (with {len(self.senders) - 1} other replicas)", None)
        self.have.clear()
        self.senders.clear()
        self.failed_since_progress.clear()
        return forgotten

    # ---- the end -----------------------------------------------------------------------------

    def outcome(self) -> tuple[int | None, bool]:
        """Why the download gave up: the StorageStatus every replica failed with (None when
        they differ or one did not answer) and whether trying again later may help (a replica
        did not answer or failed in a way that passes, rather than lacking the file)."""
        statuses = {f.status for f in self.failures.values()}
        status = statuses.pop() if len(statuses) == 1 else None
        retryable = any(n not in self.gone for n in self.sources) and self.mismatches < max(1, len(self.sources))
        return status, retryable

    def validate_state(self) -> None:
        assert set(self.failures) <= set(self.sources), self.failures
        assert self.gone <= set(self.failures) and self.failed_since_progress <= set(self.failures)
        assert self.senders <= set(self.sources) and (self.senders or not self.have)
        assert self.last is None or self.last in self.sources
        if self.size is not None:
            assert all(at % self.chunk == 0 and at < self.size for at in self.have), self.have
            assert self.held <= self.size
