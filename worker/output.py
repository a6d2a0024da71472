"""A running task's output as timed lines, for whoever follows it (pure).

A command's pipes are read as it writes (``worker.executor``), a callable's output files a few
times a second; each chunk read arrives here, with the time it was read, as ``Outputs.feed``.
Chunks are cut into lines (a partial line waits for its end, or is cut at ``LINE_MAX``), each
numbered and stamped, and kept in a ring per task: at most ``LINES_KEPT`` lines and
``BYTES_KEPT`` bytes, the oldest dropped first and counted, so a chatty task costs the worker a
bounded amount whatever it prints. A follower reads the lines after the last it saw
(``Outputs.read``), a bounded page at a time; lines it was too slow for are counted as
dropped, never blocked on. A task's ring outlives the task for the ``ENDED_KEPT`` tasks that
ended last, so a follower that comes late, or polls once more, still gets the end.

This is for watching a task live. The whole output is still what the task's result stores
(inline when small, a file in storage when not); lines are not written twice.

Pure: no clock (times come with the chunks), no threads, no sockets.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

TaskKey = tuple[bytes, int]

LINE_MAX = 4096  # characters of one line; a longer one is cut into pieces
LINES_KEPT = 5000  # per task
BYTES_KEPT = 1 << 20  # per task
ENDED_KEPT = 64  # ended tasks whose rings are kept for late followers
PAGE_BYTES = 60_000  # what one read returns at most (an OUTPUT_LINES message stays small)
STDOUT, STDERR = 1, 2


@dataclass
class Ring:
    """One task's lines: ``(seq, time, stream, text)``, seq counting from 1."""

    owner: str
    lines: deque[tuple[int, float, int, str]] = field(default_factory=deque)
    size: int = 0
    next_seq: int = 1
    dropped: int = 0  # lines dropped from the front so far
    ended: bool = False
    partial: dict[int, str] = field(default_factory=dict)  # stream -> the line it has not ended yet

    def feed(self, stream: int, data: bytes, at: float) -> None:
        text = self.partial.pop(stream, "") + data.decode("utf-8", "replace")
        *whole, rest = text.split("\n")
        for line in whole:
            while len(line) > LINE_MAX:
                self._add(stream, line[:LINE_MAX], at)
                line = line[LINE_MAX:]
            self._add(stream, line, at)
        while len(rest) > LINE_MAX:
            self._add(stream, rest[:LINE_MAX], at)
            rest = rest[LINE_MAX:]
        if rest:
            self.partial[stream] = rest

    def end(self, at: float) -> None:
        for stream, rest in sorted(self.partial.items()):
            self._add(stream, rest, at)
        self.partial.clear()
        self.ended = True

    def read(self, after: int, page: int = PAGE_BYTES) -> tuple[list[list], int, int]:
        """The lines after seq ``after``, at most ``page`` bytes of text (at least one line);
        the seq to ask after next; how many lines after ``after`` were dropped before them."""
        first = self.lines[0][0] if self.lines else self.next_seq
        skipped = max(0, first - after - 1)
        out, used = [], 0
        start = max(0, after + 1 - first)
        for i in range(start, len(self.lines)):
            seq, at, stream, text = self.lines[i]
            if out and used + len(text) > page:
                break
            out.append([seq, at, stream, text])
            used += len(text)
        nxt = out[-1][0] if out else max(after, first - 1)
        return out, nxt, skipped

    def _add(self, stream: int, text: str, at: float) -> None:
        self.lines.append((self.next_seq, at, stream, text))
        self.next_seq += 1
        self.size += len(text)
        while len(self.lines) > LINES_KEPT or self.size > BYTES_KEPT:
            self.size -= len(self.lines.popleft()[3])
            self.dropped += 1


class Outputs:
    """The rings of the tasks a worker runs, and of the last ``ENDED_KEPT`` it ended."""

    def __init__(self) -> None:
        self.running: dict[TaskKey, Ring] = {}
        self.ended: OrderedDict[TaskKey, Ring] = OrderedDict()

    def start(self, key: TaskKey, owner: str) -> None:
        """A task starts: its ring (a rerun here starts a new one)."""
        self.ended.pop(key, None)
        self.running[key] = Ring(owner)

    def feed(self, key: TaskKey, stream: int, data: bytes, at: float) -> None:
        ring = self.running.get(key)
        if ring is not None:  # output read after the task ended is already in its result
            ring.feed(stream, data, at)

    def end(self, key: TaskKey, at: float) -> None:
        ring = self.running.pop(key, None)
        if ring is None:
            return
        ring.end(at)
        self.ended[key] = ring
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)

    def find(self, key: TaskKey) -> Ring | None:
        return self.running.get(key) or self.ended.get(key)

    def status(self) -> dict[str, int]:
        return {"followed_tasks": len(self.running), "ended_kept": len(self.ended),
                "lines_held": sum(len(r.lines) for r in (*self.running.values(), *self.ended.values()))}
