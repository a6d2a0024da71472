"""What a master says, and how it ends, when its disk cannot keep what Raft gives it (pure).

Theory of operation
-------------------
A master that cannot persist a journal entry, its term and vote, or a snapshot must not go on:
pysyncobj keeps an entry in memory before it writes it, so a master that carried on after a
failed write could acknowledge an entry it never persisted. ``master.raft`` stops the process
at the first failed write with ``EXIT_DISK`` after logging ``failure_line``: one line that says
what failed, in which directory, and what the operator does about it. A restart after space
is freed finds the journal as it was before the failed write and catches up from the leader.

pysyncobj grows its mmap'd journal by ``mmap.resize``, which leaves the new part sparse; on a
full disk the first store into an unbacked page is a SIGBUS, not an error Python can handle.
``grown_size`` is the size pysyncobj will grow to, so ``master.raft`` can allocate it first
(``posix_fallocate``) and get ENOSPC instead.
"""

from __future__ import annotations

import errno

EXIT_DISK = 74  # sysexits.h EX_IOERR: "an error occurred while doing I/O on some file"

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def directory_of(path: str) -> str:
    head, sep, _ = path.rpartition("/")
    return (head or "/") if sep else "."


def failure_line(what: str, path: str, err: int | None, reason: str | None) -> str:
    """The one line a master logs before it stops because ``what`` (e.g. "append to the Raft
    journal") failed on ``path`` with errno ``err``."""
    where = directory_of(path)
    cause = f"could not {what} ({path}: {reason or 'error ' + str(err)})"
    stops = f"this master stops (exit status {EXIT_DISK}) rather than serve writes it cannot persist"
    catch_up = "it keeps its journal and catches up from the other masters"
    if err in _FULL:
        return f"disk full in {where}: {cause}; {stops}. Free space in {where} and restart it; {catch_up}"
    if err == errno.EIO:
        return (f"disk I/O error in {where}: {cause}; {stops}. Check the disk (dmesg), then restart it; {catch_up}. "
                f"If the journal there cannot be read, move {where} aside: the leader sends a snapshot")
    return f"cannot write in {where}: {cause}; {stops}. Make {where} writable and restart it; {catch_up}"


def grown_size(current: int, needed: int, factor: float) -> int:
    """The size pysyncobj's ``ResizableFile.write`` resizes a ``current``-byte file to when a write
    must reach byte ``needed`` (at least ``factor`` times bigger); ``current`` if it fits."""
    if needed <= current:
        return current
    return max(int(current * factor), needed)
