"""One log format for every node: time, level, logger, pid, message."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


def configure(level: str = "INFO") -> None:
    """Send node logs to stderr (systemd's journal or the launcher's log file takes them)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=numeric, format=FORMAT, stream=sys.stderr, force=True)
