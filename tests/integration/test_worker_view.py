"""The workers' FUSE view on a real cluster: 3 masters, 2 storage nodes, `cluster mount`.

Files uploaded with the client read back exactly through the mount (cat, sha256sum, dd with odd
block sizes), a large file streams through with the mount process's memory bounded, the job
listing shows names, and a read keeps going when one replica is SIGKILLed mid-file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from cluster.client import Client
from cluster.node.config import StorageOptions, load_cluster_config
from cluster.local import LocalNode, master_nodes, start_all, stop_all, storage_nodes
from proto.fileids import rank
from worker.fusefs import fuse_available, unmount

from .conftest import wait_for

pytestmark = pytest.mark.integration

MiB = 1 << 20
BIG = int(os.environ.get("CLUSTER_TEST_BIG_MIB", "1024")) * MiB


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ok, why = fuse_available()
    if not ok:
        pytest.skip(f"FUSE unavailable: {why}")
    d = tmp_path_factory.mktemp("view")
    masters = master_nodes(d, 3)
    config, storage = storage_nodes(d, 2, masters=masters, options=StorageOptions(replicas=2))
    nodes = masters + storage
    mountpoint = d / "mnt"
    mount = LocalNode("mount", ["mount", str(mountpoint), "--config", str(config), "--cache", str(d / "cache"),
                                "--cache-gb", "0.25"], "", d / "mount.log")
    try:
        start_all(nodes)
        conf = load_cluster_config(config)
        client = Client(list(conf.masters.values()), storage=conf.storage_nodes, replicas=2)
        mount.start()
        wait_for(lambda: os.path.ismount(mountpoint) and (mountpoint / "files").is_dir(), 20, "the mount")
        yield {"dir": d, "client": client, "storage": {n.name: n for n in storage}, "mnt": mountpoint, "mount": mount}
        client.close()
    finally:
        mount.stop()
        if os.path.ismount(mountpoint):
            unmount(mountpoint, lazy=True)
        stop_all(nodes)


def _random_file(path: Path, size: int, seed: int) -> Path:
    rng = __import__("random").Random(seed)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 8 * MiB)
            fh.write(rng.randbytes(n))
            left -= n
    return path


def test_cat_sha256sum_and_dd_read_exactly_what_was_uploaded(cluster):
    src = _random_file(cluster["dir"] / "small.bin", 5 * MiB + 4097, seed=1)
    ref = cluster["client"].upload(src)
    through = cluster["mnt"] / "files" / ref.id
    assert through.stat().st_size == ref.size
    cat = subprocess.run(["cat", str(through)], capture_output=True, check=True).stdout
    assert cat == src.read_bytes()
    digest = subprocess.run(["sha256sum", str(through)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    for bs, skip, count in [(4097, 3, 700), (1_000_003, 2, 3), (131072, 0, 100)]:
        out = subprocess.run(["dd", f"if={through}", f"bs={bs}", f"skip={skip}", f"count={count}", "status=none"],
                             capture_output=True, check=True).stdout
        data = src.read_bytes()
        assert out == data[bs * skip: bs * (skip + count)], (bs, skip, count)
    # the pinned upload has no job; a job's listing shows its names
    job = cluster["client"].submit_job("range", {"count": 1}).job
    named = cluster["client"].upload(src, owner=job, name="reads.fa")
    listed = wait_for(lambda: (cluster["mnt"] / "jobs" / job / "reads.fa").exists(), 10, "the job's listing")
    assert listed and (cluster["mnt"] / "jobs" / job / "reads.fa").read_bytes() == src.read_bytes()
    assert named.id == ref.id  # the same bytes: one blob, two references
    with pytest.raises(FileNotFoundError):
        (cluster["mnt"] / "files" / ("0" * 32)).stat()
    with pytest.raises(OSError):
        (cluster["mnt"] / "files" / "new").write_bytes(b"x")


def test_many_cold_reads_keep_the_mounts_sockets_bounded(cluster):
    """FUSE calls in on libfuse's own threads, each call with a fresh Python thread state: links
    kept per threading.local were made anew on every read and never closed, and the mount ran out
    of ZeroMQ sockets ("Too many open files") after ~500 reads (an H. pylori alignment's tiles).
    Keyed by the native thread, the links stay a few per FUSE thread."""
    client = cluster["client"]
    ids = []
    for k in range(700):
        path = cluster["dir"] / f"many-{k}.bin"
        path.write_bytes(k.to_bytes(4, "little") * 300)
        ids.append(client.upload(path).id)
    pid = cluster["mount"].pid

    def sockets() -> int:  # each ZeroMQ socket holds an eventfd (its mailbox); cached files are plain fds
        return sum(1 for fd in os.listdir(f"/proc/{pid}/fd")
                   if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventfd]")

    before = sockets()
    for fid in ids:  # each a cold read: the mount fetches it from a storage node
        assert len((cluster["mnt"] / "files" / fid).read_bytes()) == 1200
    assert sockets() - before < 64, (before, sockets())


def test_a_large_file_streams_through_with_bounded_memory(cluster):
    src = _random_file(cluster["dir"] / "big.bin", BIG, seed=2)
    want = hashlib.sha256()
    with open(src, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            want.update(chunk)
    ref = cluster["client"].upload(src)
    src.unlink()  # the page cache of the source is not what we read back
    pid = cluster["mount"].pid
    peak = [0]

    def rss() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    got = hashlib.sha256()
    with open(cluster["mnt"] / "files" / ref.id, "rb", buffering=0) as fh:
        while chunk := fh.read(128 * 1024):
            got.update(chunk)
            if fh.tell() % (64 * MiB) < 128 * 1024:
                peak[0] = max(peak[0], rss())
    assert got.hexdigest() == want.hexdigest()
    assert peak[0] < 300 * MiB, f"the mount process grew to {peak[0] / MiB:.0f} MiB reading a {BIG // MiB} MiB file"


def test_a_read_goes_on_when_a_replica_is_killed(cluster, tmp_path):
    src = _random_file(tmp_path / "failover.bin", 48 * MiB, seed=3)
    ref = cluster["client"].upload(src)
    data = src.read_bytes()
    first = rank(bytes.fromhex(ref.id), list(cluster["storage"]))[0]  # the replica reads go to first
    node = cluster["storage"][first]
    out = bytearray()
    with open(cluster["mnt"] / "files" / ref.id, "rb", buffering=0) as fh:
        out += fh.read(4 * MiB)
        node.kill()
        while chunk := fh.read(1 * MiB):
            out += chunk
    assert bytes(out) == data
    node.start()  # the module's later users see both nodes again
    node.wait_ready()
