"""The lock between the master's node loop and pysyncobj's thread over the ledger."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

class LedgerLock:
    """The ledger's lock, taken by the node loop for every event (the loop's ``guard``) and by
    pysyncobj's thread for every applied entry and snapshot (``first``), which goes first.

    A plain lock starved the Raft thread under load (issue 23): the loop releases it after an
    event and takes it again for the next within the same slice of the GIL, so the woken Raft
    thread found it taken, again and again. Blocked in ``apply``, that thread sent no
    AppendEntries, the followers' election timers ran out, and a busy leader lost its
    leadership every few seconds (bench/dispatch.py's leader part: 3-6 step-downs per master a
    minute). Now the Raft thread says it waits, and the loop lets it in before its next event.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raft_waiting = False
        self._raft_done = threading.Event()
        self._raft_done.set()

    def __enter__(self) -> None:  # the loop, per event
        if self._raft_waiting:
            self._raft_done.wait(RAFT_FIRST_WAIT_S)
        self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def first(self) -> Iterator[None]:
        """Take the lock ahead of the loop (pysyncobj's thread)."""
        self._raft_done.clear()
        self._raft_waiting = True
        self._lock.acquire()
        self._raft_waiting = False
        try:
            yield
        finally:
            self._lock.release()
            self._raft_done.set()



RAFT_FIRST_WAIT_S = 0.05  # the loop waits at most this long for the Raft thread to take the lock
