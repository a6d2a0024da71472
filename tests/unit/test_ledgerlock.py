"""master/ledgerlock.py: pysyncobj's thread gets the ledger's lock ahead of a node loop that takes
it for every event, back to back (with a plain lock it could wait for as long as the loop is busy:
a leader lost its leadership so, issue 23)."""

from __future__ import annotations

import threading
import time

from master.ledgerlock import LedgerLock


def test_the_raft_thread_gets_in_while_the_loop_takes_the_lock_back_to_back():
    lock = LedgerLock()
    stop = threading.Event()
    held = []

    def loop() -> None:  # the node loop: one event after another, no pause between them
        while not stop.is_set():
            with lock:
                held.append(1)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        entries = 0
        while entries < 200 and time.monotonic() < deadline:
            with lock.first():  # pysyncobj's thread, applying an entry
                entries += 1
        assert entries == 200, "the Raft thread was starved of the lock"
        assert held, "and the loop still ran"
    finally:
        stop.set()
        t.join(5)


def test_the_loop_is_not_held_up_when_the_raft_thread_does_not_want_the_lock():
    lock = LedgerLock()
    with lock.first():
        pass
    t0 = time.monotonic()
    for _ in range(1000):
        with lock:
            pass
    assert time.monotonic() - t0 < 5  # no wait on the done event once the Raft thread is through
