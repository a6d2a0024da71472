"""The FUSE view for real: a mount process (tests/fuse_fixture.py) read with cat, dd and sha256sum."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from worker.fusefs import fuse_available, unmount

_ok, _why = fuse_available()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _ok, reason=f"FUSE is unavailable here: {_why}"),
]

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20
JOB = bytes(range(16))


def fid_of(n: int) -> bytes:
    return hashlib.blake2b(n.to_bytes(8, "big"), digest_size=16).digest()


SMALL, EMPTY, BROKEN, OUT, BIG, UNKNOWN = (fid_of(i) for i in range(6))


def wait_until(predicate, timeout: float, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``predicate`` until truthy or fail at the deadline (or when ``proc`` dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"mount process exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.02)  # the poll interval of a deadline loop
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}:\n{_tail(log)}")


def live_mount(path: Path) -> bool:
    """A mount point served by a live process (a dead one passes ismount: stat is cached)."""
    try:
        os.statvfs(path)
    except OSError:
        return False
    return os.path.ismount(path)


def _tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log is not None and log.exists() else ""


class Mount:
    """One mount process over ``store`` at ``path``; stop() kills it by pid and unmounts."""

    def __init__(self, store: Path, path: Path, log: Path, extra: tuple[str, ...] = ()) -> None:
        self.store, self.path, self.log, self.extra = store, path, log, extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> Mount:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fuse_fixture", str(self.store), str(self.path), *self.extra],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: live_mount(self.path), 15, f"the mount at {self.path}", self.proc, self.log)
        return self

    def file(self, fid: bytes) -> Path:
        return self.path / "files" / fid.hex()

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            os.statvfs(self.path)
            mounted = os.path.ismount(self.path)
        except OSError:
            mounted = True  # a dead mount: "Transport endpoint is not connected"
        if mounted:
            unmount(self.path, lazy=True)


@pytest.fixture
def store(tmp_path) -> dict[bytes, bytes]:
    """The cluster's files on disk for the fixture: an odd-sized one, an empty one, a job's."""
    files = {
        SMALL: random.Random(1).randbytes(3 * MB + 12345),
        EMPTY: b"",
        BROKEN: random.Random(2).randbytes(2 * MB),
        OUT: random.Random(3).randbytes(100_000),
    }
    root = tmp_path / "store"
    root.mkdir()
    for fid, data in files.items():
        (root / fid.hex()).write_bytes(data)
    names = {
        "jobs": {JOB.hex(): {"input.fa": SMALL.hex(), "results/out.bin": OUT.hex()}},
        "broken": [BROKEN.hex()],
    }
    (root / "names.json").write_text(json.dumps(names))
    return files


@pytest.fixture
def mounts(tmp_path, store):
    """Start mounts over the store at tmp_path/mnt; every one is stopped at teardown."""
    started: list[Mount] = []

    def start(*extra: str) -> Mount:
        m = Mount(tmp_path / "store", tmp_path / "mnt", tmp_path / "mount.log", extra)
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.stop()


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, check=True, timeout=60)


def test_cat_sha256sum_and_dd_read_exact_bytes(mounts, store):
    m = mounts()
    data = store[SMALL]
    path = m.file(SMALL)
    assert run("cat", str(path)).stdout == data
    assert run("sha256sum", str(path)).stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert run("dd", f"if={path}", "bs=4097", "status=none").stdout == data
    assert run("dd", f"if={path}", "bs=4097", "skip=100", "count=7", "status=none").stdout == \
        data[100 * 4097:107 * 4097]
    assert run("dd", f"if={path}", "bs=1M", "skip=1", "count=2", "status=none").stdout == data[MB:3 * MB]
    assert run("dd", f"if={path}", "bs=1M", "skip=3", "count=5", "status=none").stdout == data[3 * MB:]
    assert run("dd", f"if={path}", "bs=1M", "skip=4", "status=none").stdout == b""
    job = m.path / "jobs" / JOB.hex()
    assert (job / "input.fa").read_bytes() == data
    assert (job / "results" / "out.bin").read_bytes() == store[OUT]
    assert m.file(EMPTY).read_bytes() == b""


def test_parallel_cold_readers_agree(mounts, store):
    m = mounts()
    data = store[SMALL]
    ranges = [(offset, 300_001) for offset in range(0, len(data), 250_000)]
    got: dict[int, bytes] = {}

    def read(offset: int, length: int) -> None:
        with open(m.file(SMALL), "rb", buffering=0) as fh:
            got[offset] = os.pread(fh.fileno(), length, offset)

    threads = [threading.Thread(target=read, args=r) for r in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(got[o] == data[o:o + n] for o, n in ranges)


def test_listings_and_attributes(mounts, store):
    m = mounts()
    assert sorted(os.listdir(m.path)) == ["files", "jobs"]
    assert os.listdir(m.path / "files") == []  # nothing cached yet; ids still resolve:
    assert os.stat(m.file(OUT)).st_size == len(store[OUT])
    m.file(SMALL).read_bytes()
    assert os.listdir(m.path / "files") == [SMALL.hex()]
    assert run("ls", str(m.path / "jobs")).stdout.split() == [JOB.hex().encode()]
    assert run("ls", str(m.path / "jobs" / JOB.hex())).stdout.split() == [b"input.fa", b"results"]
    assert os.listdir(m.path / "jobs" / JOB.hex() / "results") == ["out.bin"]
    st = os.stat(m.file(SMALL))
    assert (st.st_mode & 0o7777, st.st_size) == (0o444, len(store[SMALL]))
    assert os.stat(m.path / "jobs").st_mode & 0o7777 == 0o555
    assert os.stat(m.file(SMALL)).st_mtime == os.stat(m.path / "jobs" / JOB.hex() / "input.fa").st_mtime


def test_a_workers_mount_lists_no_files_and_no_jobs_but_resolves_ids(mounts, store):
    """A worker's own mount (--no-listing) is shared by the tasks of every owner: none of them
    can enumerate the files or jobs of the others; each still reads by the ids it was given."""
    m = mounts("--no-listing")
    assert m.file(SMALL).read_bytes() == store[SMALL]
    assert os.listdir(m.path / "files") == [] and os.listdir(m.path / "jobs") == []
    assert (m.path / "jobs" / JOB.hex() / "results" / "out.bin").read_bytes() == store[OUT]
    assert sorted(os.listdir(m.path / "jobs" / JOB.hex())) == ["input.fa", "results"]  # the job's id is the key


def test_unknown_names_are_enoent(mounts):
    m = mounts()
    for name in (f"files/{UNKNOWN.hex()}", "files/not-hex", f"files/{SMALL.hex().upper()}",
                 f"files/{SMALL.hex()}x", f"jobs/{UNKNOWN.hex()}",
                 f"jobs/{JOB.hex()}/missing", "jobs/xyz", "elsewhere"):
        with pytest.raises(FileNotFoundError):
            os.stat(m.path / name)
    with pytest.raises(FileNotFoundError):
        open(m.file(UNKNOWN), "rb")


def test_writes_are_refused(mounts, store):
    m = mounts()
    attempts = [
        lambda: open(m.file(SMALL), "r+b"),
        lambda: open(m.file(SMALL), "ab"),
        lambda: open(m.path / "files" / "new", "wb"),
        lambda: os.mkdir(m.path / "files" / "d"),
        lambda: os.unlink(m.file(SMALL)),
        lambda: os.rename(m.file(SMALL), m.path / "files" / "moved"),
        lambda: os.chmod(m.file(SMALL), 0o644),
        lambda: os.truncate(m.file(SMALL), 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS, attempt
    assert m.file(SMALL).read_bytes() == store[SMALL]


def test_a_failed_read_is_eio_and_the_mount_stays_up(mounts, store):
    m = mounts()
    assert os.stat(m.file(BROKEN)).st_size == len(store[BROKEN])
    with pytest.raises(OSError) as raised:
        m.file(BROKEN).read_bytes()
    assert raised.value.errno == errno.EIO
    assert m.file(SMALL).read_bytes() == store[SMALL]
    assert os.path.ismount(m.path) and m.proc.poll() is None
    assert f"read of {BROKEN.hex()}" in m.log.read_text()


def test_sigterm_unmounts_cleanly(mounts):
    m = mounts()
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(10) == 0
    assert not os.path.ismount(m.path)
    os.statvfs(m.path)  # not a dead mount
    assert "unmounted" in m.log.read_text()


def test_the_next_mount_clears_a_stale_mount_after_sigkill(mounts, store):
    first = mounts()
    first.file(SMALL).read_bytes()
    first.proc.kill()
    first.proc.wait(10)
    with pytest.raises(OSError) as raised:
        os.statvfs(first.path)  # statfs always asks the (dead) server; stat may be cached
    assert raised.value.errno == errno.ENOTCONN
    second = mounts()
    assert second.file(SMALL).read_bytes() == store[SMALL]  # the cache survived the kill, too
    assert "clearing the stale mount" in second.log.read_text()


def test_a_large_file_streams_with_bounded_rss(mounts, tmp_path):
    data = random.Random(4).randbytes(64 * MB)
    (tmp_path / "store" / BIG.hex()).write_bytes(data)
    m = mounts()
    with open(m.file(BIG), "rb", buffering=0) as fh:
        assert b"".join(iter(lambda: fh.read(MB), b"")) == data
    assert run("dd", f"if={m.file(BIG)}", "bs=128K", "skip=77", "count=9", "status=none").stdout == \
        data[77 * 128 * 1024:86 * 128 * 1024]
    peak = m.rss_peak_kib()
    assert peak < 200 * 1024, f"mount process peaked at {peak} KiB"
