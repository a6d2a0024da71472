"""What a power loss must not undo, read from the syscalls (strace): a master's term and vote are
fsynced, and renamed into place with the directory fsynced, before it goes on; a snapshot's
rename is followed by an fsync of its directory. pysyncobj alone does neither (master.raft
replaces its two functions); this test fails with them taken out."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import sys
import master.raft  # replaces pysyncobj's meta writer and snapshot rename with durable ones
from pysyncobj import serializer
from pysyncobj.journal import FileJournal
d = sys.argv[1]
journal = FileJournal(d + "/journal")
journal.setCurrentTerm(7, "10.0.0.2:6000")  # what a master does before it sends its vote
with open(d + "/ledger.snapshot.tmp", "wb") as f:
    f.write(b"snapshot")
serializer.atomicReplace(d + "/ledger.snapshot.tmp", d + "/ledger.snapshot")
"""


def _trace(tmp_path: Path) -> list[str]:
    strace = shutil.which("strace")
    assert strace, "strace is installed by deploy/system-packages.sh"
    out = tmp_path / "trace.txt"
    subprocess.run([strace, "-f", "-qq", "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
                    "-o", str(out), sys.executable, "-c", SCRIPT, str(tmp_path)],
                   check=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    return out.read_text().splitlines()


def _fd_opened(lines: list[str], path_pattern: str, start: int = 0) -> tuple[int, str]:
    """(line index, fd) of the first openat of a path matching ``path_pattern`` after ``start``."""
    for i in range(start, len(lines)):
        m = re.search(r'openat\(.*"(' + path_pattern + r')".*= (\d+)$', lines[i])
        if m:
            return i, m.group(2)
    pytest.fail(f"no openat of {path_pattern} in the trace:\n" + "\n".join(lines[-40:]))


def _first(lines: list[str], pattern: str, start: int) -> int:
    for i in range(start, len(lines)):
        if re.search(pattern, lines[i]):
            return i
    pytest.fail(f"no {pattern} after line {start} of the trace:\n" + "\n".join(lines[start:start + 40]))


def test_term_vote_and_snapshot_survive_a_power_loss(tmp_path):
    lines = _trace(tmp_path)
    d = re.escape(str(tmp_path))
    # the term and vote: written to a temporary file, fsynced, renamed, the directory fsynced
    opened, fd = _fd_opened(lines, d + r"/journal\.meta\.tmp")
    synced = _first(lines, rf"\b(fsync|fdatasync)\({fd}\)", opened)
    renamed = _first(lines, rf'rename(at2?)?\(.*"{d}/journal\.meta\.tmp".*"{d}/journal\.meta"', synced)
    dir_opened, dir_fd = _fd_opened(lines, d, renamed)
    assert "O_DIRECTORY" in lines[dir_opened]
    _first(lines, rf"\bfsync\({dir_fd}\)", dir_opened)
    # the snapshot's rename, then its directory
    renamed = _first(lines, rf'rename(at2?)?\(.*"{d}/ledger\.snapshot\.tmp".*"{d}/ledger\.snapshot"', 0)
    dir_opened, dir_fd = _fd_opened(lines, d, renamed)
    _first(lines, rf"\bfsync\({dir_fd}\)", dir_opened)
    # and what was written reads back
    from pysyncobj.journal import FileJournal
    journal = FileJournal(str(tmp_path / "journal"))
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (7, "10.0.0.2:6000")
