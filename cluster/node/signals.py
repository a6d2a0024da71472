"""Signals for the node loop: SIGTERM/SIGINT ask it to stop, SIGHUP to reload its keys.

A signal interrupts zmq_poll, but pyzmq resumes polling after running the Python handler; so the
handlers only set a flag, and the signal's wake-up pipe (``signal.set_wakeup_fd``) makes the
poll return at once. The same pipe wakes the loop for events posted from other threads.
"""

from __future__ import annotations

import signal
import socket as pysocket
from typing import Any, Callable


class SignalPipe:
    """The loop's wake-up pipe and its signal handlers, installed until ``restore``."""

    def __init__(self, on_stop: Callable[[str], None], on_hangup: Callable[[], None]) -> None:
        self.read, self.write = pysocket.socketpair()
        self.read.setblocking(False)
        self.write.setblocking(False)
        self._old: dict[Any, Any] = {}

        def stop(signum: int, _frame: Any) -> None:
            on_stop(signal.Signals(signum).name)

        def hangup(_signum: int, _frame: Any) -> None:
            on_hangup()

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, stop)
        self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
        self._old["wakeup_fd"] = signal.set_wakeup_fd(self.write.fileno(), warn_on_full_buffer=False)

    def drain(self) -> None:
        """Empty the pipe (the wake-ups it carried have done their work)."""
        try:
            while self.read.recv(512):
                pass
        except BlockingIOError:
            pass

    def restore(self) -> None:
        """Put the previous handlers back and close the pipe."""
        signal.set_wakeup_fd(self._old.pop("wakeup_fd"))
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self.read.close()
        self.write.close()
