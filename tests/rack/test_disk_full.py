"""A master's disk filling up on a simulated rack (issue 22).

Black-box, as an operator sees it: each master's state directory (its unit's StateDirectory, the
host's /var/lib/cluster/master-NAME) is moved onto a tmpfs of its own, one master at a time (kill,
copy onto the tmpfs mounted over the directory, start from the unit line again: the rack keeps a
quorum throughout). The tmpfs is larger than the masters' disk alarm (256 MiB in the example
config), so nothing is refused before the fill. While a client writes, a filler file takes every
byte left on one master's tmpfs. That master must stop with one line in its log saying the disk
is full, where, and what to do, and exit with its own status (master.diskfull.EXIT_DISK), rather
than serve what it cannot persist (pysyncobj's mmap'd journal used to die of SIGBUS here). The two
others go on acknowledging writes (electing first, when the full one led). Then the filler is
removed and the master started again, as systemd's Restart= would: it rejoins as a follower with
its journal, catches up, and the three ledgers agree (the same applied index and ledger counts,
and every acknowledged job done on each master). At the end of the module the state directories
go back onto the hosts' disk and every tmpfs is unmounted (lazily if busy), before the rack's
teardown. The times are printed (`pytest -s`): fill to stop, to a new leader, to rejoin.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from cluster.client import Client
from master.diskfull import EXIT_DISK

from .rack import CLIENT, Rack

pytestmark = pytest.mark.rack

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module

TMPFS_SIZE = "768m"  # far above the masters' 256 MiB disk alarm: the journal, preallocated as it grows,
# took 105 MiB of a 320 MiB one in one run, and the leader refused writes (the alarm) before the fill
FILLER = "filler"


def double(x):
    return x * 2


# ---- the masters' state directories on tmpfs --------------------------------------------------------


def state_dir(rack: Rack, name: str) -> Path:
    """Where host ``name``'s master keeps its journal: --data-dir of its unit line."""
    argv = rack.hosts[name].command()
    return Path(argv[argv.index("--data-dir") + 1])


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _unmount(directory: Path) -> None:
    if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def onto_tmpfs(rack: Rack, name: str, saved: Path) -> None:
    """Move master ``name``'s state directory onto a tmpfs mounted over it, and start it again."""
    state = state_dir(rack, name)
    rack.kill(name)
    shutil.copytree(state, saved, symlinks=True)
    _empty(state)  # what the mount would hide: the state lives on the tmpfs only
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(state)], check=True)
    shutil.copytree(saved, state, symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(saved)
    rack.start(name)


def off_tmpfs(rack: Rack, name: str, saved: Path) -> None:
    """Move master ``name``'s state back onto its host's disk (without the filler) and unmount."""
    state = state_dir(rack, name)
    rack.kill(name)
    (state / FILLER).unlink(missing_ok=True)
    shutil.copytree(state, saved, symlinks=True)
    _unmount(state)
    _empty(state)
    shutil.copytree(saved, state, symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(saved)
    rack.start(name)


@pytest.fixture(scope="module")
def on_tmpfs(rack: Rack):
    """Every master's state directory on its own tmpfs for the module's tests."""
    moved: list[str] = []
    saved = rack.dir / "diskfull"
    try:
        rack.heal()
        rack.wait_healthy(30)
        for name in rack.role("master"):
            moved.append(name)
            onto_tmpfs(rack, name, saved / name)
            rack.wait_healthy(60)
        yield rack
    finally:
        for name in moved:
            off_tmpfs(rack, name, saved / name)
        rack.wait_healthy(60)


def fill(directory: Path) -> int:
    """Take every byte left where ``directory`` lives (one filler file); returns the bytes written."""
    written = 0
    with open(directory / FILLER, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            block = b"\0" * chunk
            try:
                while True:
                    written += f.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return written


# ---- what is checked -----------------------------------------------------------------------------------


class Writer:
    """``client`` submitting ``double(i)`` every 50 ms on a thread of its own, until the block ends:
    the acknowledged futures (a submit returns once committed) and the submits that were not."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.acked: list[tuple[float, int, object]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self.acked.append((time.monotonic(), i, self.client.submit(double, i)))
            except Exception as exc:  # a submit that was never acknowledged: not a lost write
                self.errors.append(repr(exc))
            i += 1
            self.stop.wait(0.05)  # a steady stream of writes, not a busy loop

    def acked_after(self, t: float) -> int:
        return sum(1 for at, _, _ in self.acked if at > t)

    def __enter__(self) -> "Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def stopped_for_disk(rack: Rack, name: str, log_from: int) -> str:
    """The master stopped with EXIT_DISK and logged the one line (returned) since ``log_from``."""
    host = rack.hosts[name]
    assert host.process.returncode == EXIT_DISK, f"{name} exited {host.process.returncode}\n{rack.tails()}"
    with open(rack.log(name), "rb") as f:
        f.seek(log_from)
        text = f.read().decode(errors="replace")
    directory = state_dir(rack, name)
    lines = [ln for ln in text.splitlines() if "disk full in" in ln]
    assert len(lines) == 1 and f"disk full in {directory}: could not " in lines[0], text[-3000:]
    assert f"Free space in {directory} and restart it" in lines[0], lines[0]
    assert "Bus error" not in text and "Traceback" not in text, text[-3000:]
    return lines[0][lines[0].index("disk full in"):]


def ledgers_agree(rack: Rack) -> dict | None:
    """The masters' details if all three have applied the same index to the same ledger, else None."""
    d = rack.details(rack.role("master"))
    if any(x is None for x in d.values()):
        return None
    seen = {(x["last_applied"], json.dumps(x["ledger"], sort_keys=True)) for x in d.values()}
    return d if len(seen) == 1 else None


def nothing_lost(rack: Rack, writer: Writer) -> int:
    """Every acknowledged write ran right and is done in the ledger of every master; returns how many."""
    futures = [f for _, _, f in writer.acked]
    assert [f.result(timeout=60) for f in futures] == [2 * i for _, i, _ in writer.acked]
    agreed = rack.wait(lambda: ledgers_agree(rack), 60, "the three ledgers to agree",
                       why=lambda: {n: d and (d["last_applied"], d["ledger"].get("commands_applied"))
                                    for n, d in rack.details(rack.role("master")).items()})
    config = rack.hosts[CLIENT].config
    for name in rack.role("master"):
        with Client(masters=[rack.address(name)], config=config, timeout=20) as one:
            for f in futures:
                view = one.job(f.job).value  # read from this master's own ledger
                assert view["state"] == "done" and view["done"] == view["total"] == 1, (name, view)
    return next(iter(agreed.values()))["last_applied"]


def fill_until_stopped(rack: Rack, writer: Writer, victim: str) -> tuple[float, int, str]:
    """Fill ``victim``'s tmpfs while ``writer`` writes: (seconds to its stop, bytes filled, its line)."""
    rack.wait(lambda: len(writer.acked) >= 10, 30, "10 writes acknowledged before the fill")
    log_from = rack.log(victim).stat().st_size
    t = time.monotonic()
    filled = fill(state_dir(rack, victim))
    rack.wait(lambda: not rack.hosts[victim].running(), 30, f"{victim} to stop on its full disk")
    return time.monotonic() - t, filled, stopped_for_disk(rack, victim, log_from)


def restart_after_freeing(rack: Rack, writer: Writer, victim: str) -> float:
    """Remove the filler, start ``victim`` again: seconds until it follows a leader, caught up."""
    (state_dir(rack, victim) / FILLER).unlink()
    t = time.monotonic()
    rack.start(victim)
    rack.wait(lambda: (d := rack.detail(victim)) and d["state"] == "follower" and d["leader"], 30,
              f"{victim} to rejoin as a follower")
    rejoined = time.monotonic() - t
    at = len(writer.acked)
    rack.wait(lambda: len(writer.acked) >= at + 10, 30, "writes acknowledged after the rejoin")
    return rejoined


# ---- the tests -----------------------------------------------------------------------------------------


def test_a_followers_disk_fills_it_stops_with_the_line_the_others_serve_it_rejoins(healthy: Rack, on_tmpfs):
    rack = healthy
    leader = rack.leader()
    victim = next(m for m in rack.role("master") if m != leader)
    third = next(m for m in rack.role("master") if m not in (leader, victim))
    with rack.client(timeout=20) as c:
        with Writer(c) as writer:
            took, filled, line = fill_until_stopped(rack, writer, victim)
            stopped = time.monotonic()
            rack.wait(lambda: writer.acked_after(stopped) >= 10, 30, "writes acknowledged by the two others")
            assert rack.leader() in (leader, third)
            rejoined = restart_after_freeing(rack, writer, victim)
        applied = nothing_lost(rack, writer)
    rack.wait_healthy(30)
    print(f"\n[rack disk follower] filled {victim}'s tmpfs ({filled >> 20} MiB): it stopped after {took:.2f} s with "
          f"exit {EXIT_DISK}: {line!r}; {leader} (leading) and {third} served on; restarted with the filler gone, it "
          f"followed after {rejoined:.2f} s; {len(writer.acked)} writes acknowledged, none lost, "
          f"{len(writer.errors)} not acknowledged; the three ledgers agree at applied index {applied}")


def test_the_leaders_disk_fills_it_stops_the_others_elect_and_serve_it_rejoins(healthy: Rack, on_tmpfs):
    rack = healthy
    victim = rack.leader()
    others = [m for m in rack.role("master") if m != victim]
    with rack.client(timeout=20) as c:
        with Writer(c) as writer:
            took, filled, line = fill_until_stopped(rack, writer, victim)
            stopped = time.monotonic()
            new = rack.wait(lambda: next((m for m in others if (d := rack.detail(m))
                                          and d["state"] == "leader" and d["serving"]), None), 20,
                            f"one of {others} to lead")
            elected = time.monotonic() - stopped
            rack.wait(lambda: writer.acked_after(stopped) >= 10, 30, f"writes acknowledged through {new}")
            rejoined = restart_after_freeing(rack, writer, victim)
        applied = nothing_lost(rack, writer)
    rack.wait_healthy(30)
    print(f"\n[rack disk leader] filled the leader {victim}'s tmpfs ({filled >> 20} MiB): it stopped after "
          f"{took:.2f} s with exit {EXIT_DISK}: {line!r}; {new} led {elected:.2f} s later; restarted with the "
          f"filler gone, {victim} followed after {rejoined:.2f} s; {len(writer.acked)} writes acknowledged, none "
          f"lost, {len(writer.errors)} not acknowledged; the three ledgers agree at applied index {applied}")
