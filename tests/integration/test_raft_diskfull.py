"""A master's disk filling up, on a real tmpfs (issue 22): master.raft on its own, with no rack.

pysyncobj memory-maps its journal and grows it with ``mmap.resize``, which leaves the new part
sparse: on a full disk the first store into it is a SIGBUS (the first test shows pysyncobj
alone dying of it). master.raft allocates each growth first, so the failure is an ENOSPC it
can handle: the process logs one line (what, where, what to do) and ends with EXIT_DISK, and
the journal is what it was before the failed write. A one-master cluster in a subprocess fills
its tmpfs with commits until it stops; after the tmpfs is given room again, a restart holds
every job it acknowledged and commits new ones.

Needs root (mount); each tmpfs is unmounted at the end whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from master.diskfull import EXIT_DISK

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]

REPO = Path(__file__).resolve().parents[2]

JOURNAL = """
import sys
if sys.argv[2] == "ours":
    import master.raft  # its journal file and the stop on a failed write
    from master.raft import _DurableJournal as Journal
else:
    from pysyncobj.journal import FileJournal as Journal
journal = Journal(sys.argv[1] + "/journal")
for i in range(1, 1_000_000):
    journal.add(b"x" * 200, i, 1)
    print(i, flush=True)
"""

SOLO = """
import json, queue, sys, time
from pathlib import Path
from cluster.local import free_port
from master.commands import SubmitJob
from master.ledger import Ledger, spec_digest
from master.raft import RaftAdapter

done = queue.Queue()
adapter = RaftAdapter(Ledger(), f"127.0.0.1:{free_port()}", [], Path(sys.argv[1]),
                      on_result=lambda token, result, index: done.put(token),
                      on_failure=lambda token, reason: done.put(-1))
deadline = time.monotonic() + 20
while adapter.view().role != "leader" and time.monotonic() < deadline:
    time.sleep(0.02)  # a one-master cluster elects itself

def submit(n):
    spec = {"count": 2}
    return SubmitJob(n.to_bytes(16, "big"), (10**6 + n).to_bytes(16, "big"), spec_digest("range", spec),
                     "range", spec, "test", 1000.0)

first, count = int(sys.argv[2]), int(sys.argv[3])
for start in range(first, first + count, 50):  # windows of 50 proposals, each answered before the next
    for n in range(start, start + 50):
        adapter.propose(submit(n), n)
    for _ in range(50):
        token = done.get(timeout=20)
        if token >= 0:
            print("acked", token, flush=True)
with adapter.lock:
    jobs = sorted(int.from_bytes(j, "big") for j in adapter.ledger.state.jobs)
print("jobs", json.dumps(jobs), flush=True)
adapter.close()
"""


@pytest.fixture
def tmpfs(tmp_path):
    """A mounted tmpfs: ``(directory, resize(size))``; unmounted at the end (lazily if busy)."""
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], check=True)

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    try:
        yield where, resize
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def the_line(stderr: str, directory: Path) -> str:
    """The one line the master logged before it stopped."""
    lines = [ln for ln in stderr.splitlines() if "disk full in" in ln]
    assert len(lines) == 1, stderr
    assert re.search(rf"disk full in {re.escape(str(directory))}: could not .+ No space left on device\); this "
                     rf"master stops \(exit status {EXIT_DISK}\).+ Free space in {re.escape(str(directory))} and "
                     r"restart it", lines[0]), lines[0]
    assert "Bus error" not in stderr and "Traceback" not in stderr, stderr
    return lines[0]


def test_pysyncobj_alone_dies_of_sigbus_and_the_master_stops_with_the_line_its_journal_whole(tmpfs):
    directory, _ = tmpfs
    bare = run(JOURNAL, str(directory), "pysyncobj")
    assert bare.returncode == -signal.SIGBUS, (bare.returncode, bare.stderr[-2000:])
    (directory / "journal").unlink()
    (directory / "journal.meta").unlink(missing_ok=True)

    ours = run(JOURNAL, str(directory), "ours")
    assert ours.returncode == EXIT_DISK, (ours.returncode, ours.stderr[-2000:])
    line = the_line(ours.stderr, directory)
    written = int(ours.stdout.split()[-1])
    reread = run("import sys, master.raft\njournal = master.raft._DurableJournal(sys.argv[1] + '/journal')\n"
                 "print(len(journal), journal[len(journal) - 1][1])", str(directory))
    assert reread.returncode == 0, reread.stderr
    assert reread.stdout.split() == [str(written), str(written)]  # every entry added, the last one whole
    print(f"\n[diskfull journal] pysyncobj alone: SIGBUS; master.raft: exit {EXIT_DISK} after {written} "
          f"entries, all read back; {line!r}")


def test_a_master_whose_disk_fills_stops_then_restarts_with_every_acknowledged_write(tmpfs):
    directory, resize = tmpfs
    resize("256k")
    data = directory / "m1"
    full = run(SOLO, str(data), "0", "100000")
    assert full.returncode == EXIT_DISK, (full.returncode, full.stderr[-3000:])
    the_line(full.stderr, data)
    acked = [int(ln.split()[1]) for ln in full.stdout.splitlines() if ln.startswith("acked ")]
    assert len(acked) > 100, full.stdout[-500:]

    resize("1m")  # space returns
    again = run(SOLO, str(data), "200000", "50")
    assert again.returncode == 0, again.stderr[-3000:]
    jobs = set(json.loads(again.stdout.split("jobs ", 1)[1]))
    assert set(acked) <= jobs, sorted(set(acked) - jobs)[:10]
    assert set(range(200000, 200050)) <= jobs
    print(f"\n[diskfull adapter] a one-master cluster stopped with exit {EXIT_DISK} after {len(acked)} "
          f"acknowledged jobs on a 256 KiB tmpfs; restarted with room, it held all of them "
          f"({len(jobs)} jobs in its ledger) and committed 50 more")
