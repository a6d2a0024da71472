#!/usr/bin/env python3
"""Storage benchmark: uploads and downloads through a real storage node against raw pyzmq moving
the same bytes, and reads through the FUSE mount against reading the cache file directly.

Run from the repository root::

    .venv/bin/python bench/storage.py            # full run (~8 min), writes bench/results/storage.json
    .venv/bin/python bench/storage.py --quick    # under a minute
    .venv/bin/python bench/storage.py --json /tmp/s.json --reps 2 --no-fuse
    .venv/bin/python bench/storage.py --profile  # cProfile of both sides of one upload and download

Transfers (files of 256 MiB and 1 GiB of random bytes; 256 MiB only with ``--quick``). The same
process roles on both sides, on tcp://127.0.0.1 (``bench/storage_procs.py`` has the tasks):

* the server: ours is a real storage node (``python -m cluster storage``, started through
  ``cluster.local.storage_nodes``, a fresh blob store every round); raw is a benchmark process
  with a ROUTER socket;
* the client: one benchmark process (DEALER) that runs ours and raw trials alternately.

Ours, upload: the client computes the content id (``file_id_of_path``: BLAKE3 of every 1 MiB
block, as ``cluster upload`` does), then ``StorageLink.upload`` sends 1 MiB chunks read with
``os.pread`` within the node's credit (16 MiB window, granted in 8 MiB steps); the node writes
each chunk to its partial file and hashes it, and at the end checks the id, fsyncs, writes and
fsyncs the block-hash sidecar, renames both into place and fsyncs the directory. "ours MB/s"
counts from the hash's start to UPLOAD_DONE; "xfer" is the transfer alone (UPLOAD_OPEN → DONE).
Raw, upload: the same 1 MiB ``os.pread`` chunks sent with ``copy=False`` under the same credit
scheme; the server ``pwrite``s them and fsyncs once at the end; no hashing, sidecar or rename.

Ours, download: ``StorageLink.download`` (8 reads of 1 MiB in flight, each ``pwrite``n where it
belongs); the node ``pread``s each range and verifies its BLAKE3 block hash before sending it.
Raw, download: the same window of 8 requests of 1 MiB; the server ``pread``s and sends, the client
``pwrite``s. Neither fsyncs. Both write into a file of the right size written once beforehand
(see ``prefill``: fresh page cache costs this VM up to 8 s per GiB, which would swamp both
sides). Also recorded, not in the ratio: the client's rehash of what it wrote (``cluster
download`` checks the content id before renaming).

The blob store sits on a disk directory (``--disk-dir``, default /var/tmp) and, as a second case,
on /dev/shm (no disk: what the protocol and the hashing cost). Extra rows: uploads with 2 copies
(2 storage nodes; the first stores, then pushes to the second before UPLOAD_DONE); their ratio is
to raw moving one copy. Every trial also records the CPU seconds of the client (its own
``process_time``) and of the server processes (``/proc/PID/stat``): "CPU s/GiB" is their sum per
GiB moved, steadier than MB/s on a shared machine.

FUSE (``python -m cluster mount``, the real mount: ``worker.view.ClusterView`` over 3 masters and
the storage node, ``worker.cache.BlockCache`` on disk, durable as by default), the 1 GiB file
(256 MiB with ``--quick``) registered through ``Client.upload``, read start to end with 128 KiB
``readv`` calls into one buffer:

1. first read through FUSE, the cache empty (every block fetched from the storage node), also
   compared with ``StorageLink.download`` of the same size from the disk store;
2. after a remount (the mount's page cache is gone; the cache's data file complete and in the
   host page cache): the userspace path of a cached blob;
3. the cache's data file read directly with the same loop (the reference for 2);
4. a second read on the same mount (the kernel's page cache of the FUSE file);
5. 2 and 3 again with the cache's data file evicted from the page cache (``POSIX_FADV_DONTNEED``):
   both read the disk.

Before all that, a probe of the machine: 1 MiB pwrites into a new file against over the pages of
an existing one (in the disk and the shm directory), since fresh page cache is what most of the
cases above pay for.

The transfers and FUSE run in plaintext (``[security] insecure = true``, as raw pyzmq); then
CURVE (the default) against plaintext, two nodes side by side, several client chunk sizes
(``bench/storage_curve.py``; ``--no-curve`` skips it).

Every round runs each case once, ours and raw alternating (the order flips every round: use an
even number of rounds); the tables give medians over the rounds and ratios of the medians. The
machine has 2 cores and is shared: read the CPU shares printed at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# first, even when an editable install lists ROOT already: run as `python bench/X.py`, sys.path
# starts with bench/, where storage.py would shadow the storage package
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bench import machine, storage_curve  # noqa: E402
from bench.procs import Worker  # noqa: E402
from bench.storage_procs import worker  # noqa: E402
from cluster.local import start_all, stop_all  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SIZES = (256 * MiB, GiB)
QUICK_SIZES = (256 * MiB,)
READ_BS = 128 * KiB  # the FUSE part's read size
MOUNT_TIMEOUT_S = 30.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def label(size: int) -> str:
    return f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB"


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fs_of(path: str | Path) -> str:
    """The file system a path lives on, as "type device" (from /proc/self/mountinfo)."""
    target, best = os.path.realpath(path), ("", "?")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                point = fields[4]
                sep = fields.index("-")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best[0]):
                    best = (point, f"{fields[sep + 1]} {fields[sep + 2]}")
    except (OSError, ValueError, IndexError):
        pass
    return best[1]


def make_source(path: Path, size: int) -> None:
    """A file of ``size`` random bytes (incompressible; no two runs alike)."""
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(64 * MiB, left)
            fh.write(os.urandom(n))
            left -= n


def prefill(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes, really written (not sparse): downloads overwrite it in place.

    Here (a VM that hands freed memory back to its host) fresh page cache costs from a quarter of
    a second to 8 s per GiB, often more than the transfer itself, and varies tenfold from run to
    run (``page_cache_rates`` measures it); both sides download into a file like this so that
    the figures are the transfers', not the VM's.
    """
    zeros = bytes(8 * MiB)
    with open(path, "wb") as fh:
        for offset in range(0, size, len(zeros)):
            fh.write(zeros[:min(len(zeros), size - offset)])


def page_cache_rates(dirs: dict[str, Path], size: int = 256 * MiB, reps: int = 3) -> dict:
    """MB/s of 1 MiB pwrites into a new file and over the same file again, per directory: how much
    this machine charges for fresh page cache (a VM that returns freed memory to its host pays a
    fault per new page) against copying into pages it already has."""
    buf = os.urandom(MiB)
    out = {}
    for name, d in dirs.items():
        path, rates = d / "page-cache-probe.bin", {"new": [], "overwrite": []}
        for _ in range(reps):
            for kind, flags in (("new", os.O_TRUNC), ("overwrite", 0)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
                t0 = time.perf_counter()
                for offset in range(0, size, MiB):
                    os.pwrite(fd, buf, offset)
                rates[kind].append(_rate(size, time.perf_counter() - t0))
                os.close(fd)
            path.unlink()
        out[name] = {k: median(v) for k, v in rates.items()} | {"trials": rates}
    return out


# ---- the servers: storage nodes and the raw server ---------------------------------------------


class Nodes:
    """``count`` storage nodes with a fresh blob store each under ``root`` (deleted at the end).

    The upkeep's scrub and collection are pushed past the run: they would hash and list the
    stores in the middle of a measurement.
    """

    def __init__(self, root: Path, count: int, masters: list | None = None, insecure: bool = True) -> None:
        from cluster.node.config import StorageOptions
        from cluster.local import storage_nodes

        self.root = root
        options = StorageOptions(replicas=count, scrub_interval_s=1e6, gc_interval_s=1e6)
        self.config, self.nodes = storage_nodes(root, count, masters=masters, options=options, log_level="WARNING",
                                                insecure=insecure)

    @property
    def addresses(self) -> dict[str, str]:
        return {n.name: n.address for n in self.nodes}

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes]

    def __enter__(self) -> "Nodes":
        start_all(self.nodes)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        stop_all(self.nodes)
        for n in self.nodes:
            shutil.rmtree(self.root / n.name, ignore_errors=True)


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def with_cpu(client: Worker, servers: list[int], run: Any) -> dict:
    """``run()``'s result with the CPU seconds the server processes spent meanwhile (the client
    counts its own)."""
    s0 = sum(cpu_seconds(pid) for pid in servers)
    got = run()
    got["server_cpu_s"] = sum(cpu_seconds(pid) for pid in servers) - s0
    return got


def raw_trial(server: Worker, client: Worker, op: str, path: Path, src: Path, dest: Path, size: int) -> dict:
    """One raw transfer: ``op`` "upload" (client src → server path) or "download" (server path →
    client dest), with the same chunk and window as ours."""
    from storage.core import StorageSettings
    from cluster.node.storagelink import CHUNK, WINDOW

    window = StorageSettings().window
    server.start("raw_server", mode=op, path=str(path), window=window)
    port = server.message("port")

    def run() -> dict:
        if op == "upload":
            got = client.run("raw_upload", port=port, src=str(src), chunk=CHUNK)
        else:
            got = client.run("raw_download", port=port, dest=str(dest), size=size, chunk=CHUNK, window=WINDOW)
        server.result()
        return got

    return with_cpu(client, [server.proc.pid], run)


def _rate(size: int, seconds: float | None) -> float | None:
    return size / seconds / 1e6 if seconds else None


# ---- transfers ---------------------------------------------------------------------------------


def download_dest(base: Path, side: str, size: int) -> Path:
    """Where ``side`` downloads a file of ``size`` bytes (prefilled once per run)."""
    return base / f"download-{side}-{size // MiB}MiB.bin"


def upload_pair(order: tuple[str, str], key: tuple, src: Path, raw_path: Path, nodes: Nodes, server: Worker,
                client: Worker, trials: dict) -> str:
    """Raw and ours upload ``src`` (in ``order``); returns the content id ours stored."""
    fid = ""
    for side in order:
        if side == "raw":
            got = raw_trial(server, client, "upload", raw_path, src, raw_path, key[1])
        else:
            got = with_cpu(client, nodes.pids, lambda: client.run(
                "ours_upload", nodes=nodes.addresses, src=str(src), copies=1, config=str(nodes.config)))
            fid = got["fid"]
        trials.setdefault(("upload", *key, 1, side), []).append(got)
    return fid


def download_pair(order: tuple[str, str], key: tuple, fid: str, raw_path: Path, base: Path, nodes: Nodes,
                  server: Worker, client: Worker, trials: dict) -> None:
    """Raw downloads ``raw_path`` and ours the blob ``fid`` (in ``order``), into prefilled files."""
    address = next(iter(nodes.addresses.values()))
    for side in order:
        dest = download_dest(base, side, key[1])
        if side == "raw":
            got = raw_trial(server, client, "download", raw_path, raw_path, dest, key[1])
        else:
            got = with_cpu(client, nodes.pids, lambda: client.run(
                "ours_download", address=address, fid=fid, dest=str(dest), config=str(nodes.config)))
            if not got["verified"]:
                raise RuntimeError(f"the downloaded file {dest} does not match {fid}")
        trials.setdefault(("download", *key, 1, side), []).append(got)


def transfer_round(r: int, stores: dict[str, Path], sources: dict[int, Path], server: Worker, client: Worker,
                   trials: dict, copies2: bool) -> None:
    """One round: for each store and size, uploads then downloads, raw and ours alternating
    (the order flips every round), then the 2-copy uploads on a pair of fresh nodes."""
    order = ("raw", "ours") if r % 2 == 0 else ("ours", "raw")
    for store, base in stores.items():
        with Nodes(base / f"k1-{r}", 1) as nodes:
            for size, src in sources.items():
                raw_path = base / f"raw-{r}.bin"
                fid = upload_pair(order, (store, size), src, raw_path, nodes, server, client, trials)
                download_pair(order, (store, size), fid, raw_path, base, nodes, server, client, trials)
                raw_path.unlink()
        if copies2:
            with Nodes(base / f"k2-{r}", 2) as nodes:
                for size, src in sources.items():
                    got = with_cpu(client, nodes.pids, lambda: client.run(
                        "ours_upload", nodes=nodes.addresses, src=str(src), copies=2, config=str(nodes.config)))
                    trials.setdefault(("upload", store, size, 2, "ours"), []).append(got)


def summarize_transfers(trials: dict, sizes: tuple[int, ...], stores: dict[str, Path]) -> list[dict]:
    rows = []
    for op in ("upload", "download"):
        for store in stores:
            for size in sizes:
                for copies in (1, 2):
                    ours = trials.get((op, store, size, copies, "ours"))
                    if not ours:
                        continue
                    raw = trials.get((op, store, size, 1, "raw"), [])
                    rows.append(_row(op, store, size, copies, ours, raw))
    return rows


def _side(size: int, runs: list[dict]) -> dict:
    out: dict[str, Any] = {"trials": runs}
    for key in ("seconds", "transfer_s", "hash_s", "verify_s", "client_cpu_s", "client_transfer_cpu_s", "server_cpu_s"):
        xs = [t[key] for t in runs if key in t]
        if xs:
            out[f"{key}_median"] = median(xs)
    out["mb_s"] = _rate(size, out.get("seconds_median"))
    out["transfer_mb_s"] = _rate(size, out.get("transfer_s_median"))
    out["mb_s_trials"] = [_rate(size, t["seconds"]) for t in runs]
    return out


def _row(op: str, store: str, size: int, copies: int, ours: list[dict], raw: list[dict]) -> dict:
    row: dict[str, Any] = {"op": op, "store": store, "size": size, "label": label(size), "copies": copies,
                           "ours": _side(size, ours)}
    if raw:
        row["raw"] = _side(size, raw)
        row["ratio"] = row["ours"]["mb_s"] / row["raw"]["mb_s"]
        row["ratio_transfer_only"] = row["ours"]["transfer_mb_s"] / row["raw"]["mb_s"]
    return row


def bench_transfers(tmp: dict[str, Path], reps: int, sizes: tuple[int, ...], copies2: bool, mpctx: Any) -> dict:
    sources = {}
    for size in sizes:
        sources[size] = tmp["disk"] / f"source-{label(size).replace(' ', '')}.bin"
        make_source(sources[size], size)
        for base in tmp.values():
            for side in ("raw", "ours"):
                prefill(download_dest(base, side, size), size)
    server, client = worker(mpctx, "raw-server"), worker(mpctx, "client")
    trials: dict = {}
    cpu0 = machine.cpu_times()
    try:
        for r in range(reps):
            t0 = time.perf_counter()
            transfer_round(r, tmp, sources, server, client, trials, copies2)
            log(f"  round {r + 1}/{reps}: {time.perf_counter() - t0:.1f} s")
    finally:
        client.stop()
        server.stop()
        for base in tmp.values():
            for size in sizes:
                for side in ("raw", "ours"):
                    download_dest(base, side, size).unlink(missing_ok=True)
    return {"rows": summarize_transfers(trials, sizes, tmp), "cpu_shares": machine.cpu_shares(cpu0, machine.cpu_times()),
            "sources": {str(k): str(v) for k, v in sources.items()}}


# ---- FUSE --------------------------------------------------------------------------------------


class Mount:
    """``python -m cluster mount`` (the real command: ClusterView over the masters and the storage
    nodes, a durable BlockCache) at ``mountpoint`` while in the ``with`` block."""

    def __init__(self, config: Path, cache: Path, mountpoint: Path, log_path: Path, cache_gb: float) -> None:
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "cluster", "mount", str(mountpoint), "--config", str(config),
                     "--cache", str(cache), "--cache-gb", f"{cache_gb:g}", "--log-level", "WARNING"]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Mount":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=log_file, start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the mount at {self.mountpoint} did not come up; see {self.log_path}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        from worker.fusefs import unmount

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # libfuse's handler ends the loop and unmounts
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if os.path.ismount(self.mountpoint):
            unmount(self.mountpoint, lazy=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache (what a read then has to fetch from disk)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fuse_round(r: int, d: Path, config: Path, fid: str, size: int, reader: Worker, trials: dict) -> None:
    """First read (empty cache); remount; the cached read and the direct read of the cache file
    (their order flips every round); a re-read on the same mount; the same pair with the cache
    file evicted from the page cache."""
    cache, mnt = d / "cache", d / "mnt"
    shutil.rmtree(cache, ignore_errors=True)
    inside, data_file = mnt / "files" / fid, cache / f"{fid}.data"
    gb = 2 * size / GiB + 1

    def read(path: Path, key: str, mount: Mount | None, cold: bool = False) -> None:
        if cold:
            evict(data_file)
            if mount:
                evict(inside)
        c0 = cpu_seconds(mount.pid) if mount else 0.0
        got = reader.run("seq_read", path=str(path), bs=READ_BS)
        if got["bytes"] != size:
            raise RuntimeError(f"read {got['bytes']} bytes of {path}, expected {size}")
        if mount:
            got["server_cpu_s"] = cpu_seconds(mount.pid) - c0
        trials.setdefault(key, []).append(got)

    def flip(pairs: list) -> list:
        return pairs if r % 2 == 0 else pairs[::-1]

    with Mount(config, cache, mnt, d / "mount.log", gb) as m:
        read(inside, "fuse_first", m)
    with Mount(config, cache, mnt, d / "mount.log", gb) as m:  # a new mount: no pages of the FUSE file
        for path, key, mount in flip([(inside, "fuse_cached", m), (data_file, "direct", None)]):
            read(path, key, mount)
        read(inside, "fuse_kernel_cached", m)
        for path, key, mount in flip([(inside, "fuse_cached_cold", m), (data_file, "direct_cold", None)]):
            read(path, key, mount, cold=True)


def bench_fuse(base: Path, size: int, reps: int, mpctx: Any) -> dict:
    """The FUSE reads of one file stored on a real storage node and registered with 3 masters."""
    from cluster.client import Client
    from cluster.local import master_nodes
    from worker.fusefs import fuse_available

    ok, why = fuse_available()
    if not ok:
        return {"skipped": f"FUSE is unavailable here: {why}"}
    d = base / "fuse"
    src = base / f"source-{label(size).replace(' ', '')}.bin"
    if not src.exists():
        make_source(src, size)
    masters = master_nodes(d, 3, log_level="WARNING", insecure=True)
    trials: dict[str, list[dict]] = {}
    reader = worker(mpctx, "reader")
    cpu0 = machine.cpu_times()
    try:
        start_all(masters)
        with Nodes(d, 1, masters=masters) as nodes:
            with Client([m.address for m in masters], storage=nodes.addresses, replicas=1) as client:
                ref = client.upload(src, name="bench-fuse", copies=1)
            for r in range(reps):
                fuse_round(r, d, nodes.config, ref.id, size, reader, trials)
    finally:
        reader.stop()
        stop_all(masters)
    return _fuse_summary(size, trials, machine.cpu_shares(cpu0, machine.cpu_times()), fs_of(d))


def _fuse_summary(size: int, trials: dict, shares: dict | None, fs: str) -> dict:
    out: dict[str, Any] = {"size": size, "label": label(size), "read_bs": READ_BS, "cache_fs": fs, "cpu_shares": shares}
    for key, runs in trials.items():
        out[key] = {"mb_s": _rate(size, median([t["seconds"] for t in runs])),
                    "mb_s_trials": [_rate(size, t["seconds"]) for t in runs], "trials": runs}
        cpu = [t["server_cpu_s"] for t in runs if "server_cpu_s" in t]
        if cpu:
            out[key]["mount_cpu_s_per_gib"] = median(cpu) / (size / GiB)
    for key, ref in (("fuse_cached", "direct"), ("fuse_kernel_cached", "direct"),
                     ("fuse_cached_cold", "direct_cold")):
        if key in out and ref in out:
            out[key]["ratio_to_direct"] = out[key]["mb_s"] / out[ref]["mb_s"]
    return out


# ---- profiles -----------------------------------------------------------------------------------


def top_functions(path: str, n: int = 14) -> list[dict]:
    """The ``n`` functions with the most own time in a cProfile dump."""
    st = pstats.Stats(path, stream=io.StringIO())
    total = st.total_tt or 1e-9
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": nc, "tottime_s": tt,
                     "cumtime_s": ct, "share": tt / total})
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:n]


def profile_side(node_dir: Path, client: Worker, task: str, out: Path, curve: bool, **kwargs: Any) -> dict:
    """Run a storage node in this process's main thread under cProfile while ``client`` runs
    ``task`` under cProfile too; the client stops the node with SIGTERM when it is done."""
    from cluster.node.config import StorageOptions, load_cluster_config
    from cluster.local import storage_nodes
    from storage.node import build_storage

    path, _ = storage_nodes(node_dir.parent / f"profile-{task}", 1, options=StorageOptions(replicas=1),
                            insecure=not curve)  # writes the config (and keys); the node runs here
    config = load_cluster_config(path)
    address = config.storage_nodes["s1"]
    kwargs["config"] = str(path)
    loop, closables = build_storage(config, "s1", node_dir)
    client_prof, node_prof = str(out / f"{task}-client.prof"), str(out / f"{task}-node.prof")
    kwargs = {"nodes": {"s1": address}} | kwargs if task == "ours_upload" else {"address": address} | kwargs
    client.start(task, kill_after=os.getpid(), profile=client_prof, **kwargs)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    try:
        prof.runcall(loop.run)
    finally:
        prof.dump_stats(node_prof)
        for c in closables:
            c.close()
    got = client.result()
    return {"client": got, "node_wall_s": time.perf_counter() - t0,
            "client_top": top_functions(client_prof), "node_top": top_functions(node_prof),
            "client_prof": client_prof, "node_prof": node_prof}


def bench_profile(tmp: dict[str, Path], size: int, store: str, mpctx: Any, out: Path, curve: bool) -> dict:
    src = tmp["disk"] / "source-profile.bin"
    make_source(src, size)
    client = worker(mpctx, "client")
    node_dir = tmp[store] / "profile-node"
    try:
        up = profile_side(node_dir, client, "ours_upload", out, curve, src=str(src), copies=1)
        dest = tmp[store] / "profile-download.bin"
        prefill(dest, size)
        down = profile_side(node_dir, client, "ours_download", out, curve, fid=up["client"]["fid"], dest=str(dest))
    finally:
        client.stop()
    return {"size": size, "store": store, "curve": curve, "upload": up, "download": down}


def print_profile(res: dict) -> None:
    for op in ("upload", "download"):
        p = res[op]
        c = p["client"]
        mode = "CURVE" if res["curve"] else "plaintext"
        print(f"\n{op} of {label(res['size'])} (store on {res['store']}, {mode}): client {c['seconds']:.2f} s "
              f"({_rate(res['size'], c['transfer_s']):.0f} MB/s transfer), profiles {p['client_prof']} {p['node_prof']}")
        for side in ("client_top", "node_top"):
            print(f"  {side[:-4]}: own time by function")
            for r in p[side]:
                print(f"    {r['tottime_s']:7.3f} s {r['share']:5.1%} {r['calls']:>8} calls  {r['function']}")


# ---- report and main -----------------------------------------------------------------------------

ACCEPT = 0.5  # the issue's bar: ours at least half of raw pyzmq, FUSE at least half of a direct read

SIDES = {
    "upload": ("ours: client hashes the file (content id), then 1 MiB chunks within 16 MiB of credit; the node "
               "writes and hashes each, checks the id, fsyncs data and block-hash sidecar, renames, fsyncs the "
               "directory", "raw: the same 1 MiB chunks and credit; the server pwrites, fsyncs once"),
    "download": ("ours: 8 reads of 1 MiB in flight; the node preads and verifies each block's BLAKE3 hash; "
                 "the client pwrites into a prefilled file", "raw: the same window and reads, no hashing"),
}


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _cpu_per_gib(side: dict, size: int, client_key: str = "client_transfer_cpu_s") -> float | None:
    c, srv = side.get(f"{client_key}_median"), side.get("server_cpu_s_median")
    return None if c is None or srv is None else (c + srv) / (size / GiB)


def transfer_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = ["op", "size", "store", "copies", "ours MB/s", "ours xfer MB/s", "raw MB/s", "ours/raw", "xfer/raw",
            "CPU s/GiB ours", "CPU s/GiB raw", "ours trials MB/s", "raw trials MB/s"]
    cells = []
    for r in rows:
        ours, raw = r["ours"], r.get("raw")
        up = r["op"] == "upload"
        cells.append([
            r["op"], r["label"], r["store"], str(r["copies"]), _mb(ours["mb_s"]),
            _mb(ours["transfer_mb_s"]) if up else "=",
            _mb(raw["mb_s"]) if raw else "-",
            f"{r['ratio']:.0%}" if raw else "-",
            f"{r['ratio_transfer_only']:.0%}" if raw and up else "-",
            _fmt_cpu(_cpu_per_gib(ours, r["size"])), _fmt_cpu(_cpu_per_gib(raw, r["size"]) if raw else None),
            " ".join(_mb(x) for x in ours["mb_s_trials"]),
            " ".join(_mb(x) for x in raw["mb_s_trials"]) if raw else "",
        ])
    return cols, cells


def _fmt_cpu(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def fuse_table(f: dict) -> tuple[list[str], list[list[str]]]:
    cols = ["read (128 KiB readv)", "MB/s", "vs direct", "vs download", "mount CPU s/GiB", "trials MB/s"]
    names = {"fuse_first": "FUSE, first read (cache empty: fetched from storage)",
             "fuse_cached": "FUSE, cached blob (after a remount)",
             "direct": "the cache's data file, directly",
             "fuse_kernel_cached": "FUSE, re-read on the same mount (kernel page cache)",
             "fuse_cached_cold": "FUSE, cached blob, cache file evicted (disk)",
             "direct_cold": "the cache's data file, directly, evicted (disk)"}
    cells = []
    for key, text in names.items():
        if key not in f:
            continue
        e = f[key]
        cells.append([text, _mb(e["mb_s"]), f"{e['ratio_to_direct']:.0%}" if "ratio_to_direct" in e else "-",
                      f"{e['ratio_to_download']:.0%}" if "ratio_to_download" in e else "-",
                      _fmt_cpu(e.get("mount_cpu_s_per_gib")), " ".join(_mb(x) for x in e["mb_s_trials"])])
    return cols, cells


def link_download(res: dict) -> None:
    """The FUSE first read against StorageLink.download of the same size from a disk store."""
    first = res.get("fuse", {}).get("fuse_first")
    for r in res.get("transfers", {}).get("rows", []):
        if first and r["op"] == "download" and r["store"] == "disk" and r["size"] == res["fuse"]["size"]:
            first["ratio_to_download"] = first["mb_s"] / r["ours"]["mb_s"]


def acceptance(res: dict) -> list[dict]:
    """The issue's acceptance checks, one per measured pair."""
    out = []
    for r in res.get("transfers", {}).get("rows", []):
        if "ratio" in r and r["copies"] == 1:
            out.append({"check": f"{r['op']} {r['label']} ({r['store']}) >= {ACCEPT:.0%} of raw pyzmq",
                        "value": r["ratio"], "pass": r["ratio"] >= ACCEPT})
    f = res.get("fuse", {})
    if "ratio_to_direct" in f.get("fuse_cached_cold", {}):
        v = f["fuse_cached_cold"]["ratio_to_direct"]
        out.append({"check": f"(disk) FUSE read of a cached blob >= {ACCEPT:.0%} of a direct read, both from disk",
                    "value": v, "pass": v >= ACCEPT})
    if "ratio_to_direct" in f.get("fuse_cached", {}):
        v = f["fuse_cached"]["ratio_to_direct"]
        out.append({"check": f"FUSE read of a cached blob >= {ACCEPT:.0%} of a direct read", "value": v, "pass": v >= ACCEPT})
    return out


def print_report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(160, Console().width))
    m, cfg = res["machine"], res["config"]
    con.print(f"[bold]Storage benchmark[/] {m['date']}  {m['nproc']} cpus ({m['cpu']}), Python {m['python']}, "
              f"pyzmq {m['pyzmq']}, libzmq {m['libzmq']}, {cfg['reps']} rounds{' (quick)' if cfg['quick'] else ''}; "
              + ", ".join(f"{k}: {v['path']} ({v['fs']})" for k, v in cfg["dirs"].items()))
    for title, (cols, cells) in (
            ("Transfers over tcp://127.0.0.1, client and server processes (median of rounds; ours MB/s of an "
             "upload counts the client's hashing, xfer does not)", transfer_table(res["transfers"]["rows"])),
            (f"FUSE sequential read of {res['fuse'].get('label', '?')}", fuse_table(res["fuse"]))):
        if not cells:
            continue
        t = Table(title=title)
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i < 3 and c != "copies" else "right")
        for row in cells:
            t.add_row(*row)
        con.print(t)
    for op, (ours, raw) in SIDES.items():
        con.print(f"{op}: {ours}; {raw}.")
    con.print("The transfers and FUSE run in plaintext (\\[security] insecure = true), as raw pyzmq does; CURVE's "
              "cost is the next table's.")
    if res.get("security"):
        storage_curve.print_table(con, res["security"])
    con.print("copies 2: the first node stores the file, then pushes it to the second before UPLOAD_DONE; its "
              "ratio is to raw moving one copy. CPU s/GiB: client + server processes, per GiB moved.")
    if "skipped" in res.get("fuse", {}):
        con.print(f"FUSE part skipped: {res['fuse']['skipped']}")
    pc = res.get("page_cache", {})
    if pc:
        con.print("This machine, 1 MiB pwrites: " + "; ".join(
            f"{k}: new file {_mb(v['new'])} MB/s, over existing pages {_mb(v['overwrite'])} MB/s" for k, v in pc.items()))
    for a in res["acceptance"]:
        con.print(f"  [{'green' if a['pass'] else 'red'}]{'PASS' if a['pass'] else 'FAIL'}[/] {a['check']}: {a['value']:.0%}")
    for name, part in (("transfers", res.get("transfers", {})), ("FUSE", res.get("fuse", {}))):
        sh = part.get("cpu_shares")
        if sh:
            con.print(f"CPU during {name}: busy {sh['busy']:.0%}, idle {sh['idle']:.0%}, steal {sh['steal']:.0%}")
    con.print(f"total {res['elapsed_s']:.1f} s; results in {res['json_path']}")


def protocol_settings() -> dict:
    """The chunk, windows and read size both sides use (ours' defaults, mirrored by raw)."""
    from storage.core import StorageSettings
    from cluster.node.storagelink import CHUNK, WINDOW

    window = StorageSettings().window
    return {"chunk": CHUNK, "download_window_reads": WINDOW, "upload_credit_window": window,
            "upload_credit_step": window // 2, "fuse_read_bs": READ_BS, "transport": "tcp://127.0.0.1",
            "processes": "client: multiprocessing spawn; ours server: python -m cluster storage; raw server: spawn"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB only, fewer rounds (whole run < 60 s)")
    ap.add_argument("--json", default=None, help="where to write the results (default bench/results/storage.json; "
                    "with --profile: none)")
    ap.add_argument("--reps", type=int, default=None, help="rounds (default 4, --quick 2; even: each side goes first as often)")
    ap.add_argument("--disk-dir", default="/var/tmp", help="where the disk cases live (a disk, not tmpfs)")
    ap.add_argument("--shm-dir", default="/dev/shm", help="where the in-memory cases live")
    ap.add_argument("--no-fuse", action="store_true", help="skip the FUSE part")
    ap.add_argument("--no-transfers", action="store_true", help="skip the upload/download part")
    ap.add_argument("--no-copies2", action="store_true", help="skip the 2-copy uploads")
    ap.add_argument("--profile", action="store_true",
                    help="only profile one upload and one download (node in this process) and print where the time goes")
    ap.add_argument("--profile-size", type=int, default=GiB, help="bytes for --profile")
    ap.add_argument("--profile-store", choices=("disk", "shm"), default="shm")
    ap.add_argument("--profile-curve", action="store_true", help="profile against a CURVE node (default plaintext)")
    storage_curve.add_arguments(ap)
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 4)
    sizes = QUICK_SIZES if args.quick else SIZES
    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine.machine_info(pyzmq=zmq.__version__, libzmq=zmq.zmq_version())}
    cpu0 = machine.cpu_times()
    mpctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-storage-", dir=args.disk_dir) as disk, \
            tempfile.TemporaryDirectory(prefix="bench-storage-", dir=args.shm_dir) as shm:
        tmp = {"disk": Path(disk), "shm": Path(shm)}
        res["config"] = {"quick": args.quick, "reps": reps, "sizes": list(sizes), **protocol_settings(),
                         "dirs": {k: {"path": str(v), "fs": fs_of(v)} for k, v in tmp.items()}}
        if args.profile:  # the .prof files stay for snakeviz/pstats; the JSON only if --json says where
            out = Path(tempfile.mkdtemp(prefix="storage-profile-"))
            res["profile"] = bench_profile(tmp, args.profile_size, args.profile_store, mpctx, out, args.profile_curve)
            print_profile(res["profile"])
            if args.json:
                machine.finish(res, cpu0, started, args.json)
            return 0
        res["page_cache"] = page_cache_rates(tmp)
        log(f"transfers: {reps} rounds of {', '.join(label(s) for s in sizes)} on {', '.join(tmp)}")
        res["transfers"] = (bench_transfers(tmp, reps, sizes, not args.no_copies2, mpctx) if not args.no_transfers
                            else {"rows": [], "skipped": "--no-transfers"})
        if not args.no_curve:
            res["security"] = storage_curve.run(args, tmp, mpctx, log)
        if args.no_fuse:
            res["fuse"] = {"skipped": "--no-fuse"}
        else:
            log(f"FUSE: {reps} rounds of {label(sizes[-1])}")
            res["fuse"] = bench_fuse(tmp["disk"], sizes[-1], reps, mpctx)
    link_download(res)
    res["acceptance"] = acceptance(res)
    machine.finish(res, cpu0, started, args.json or ROOT / "bench" / "results" / "storage.json")
    print_report(res)
    return 0 if all(a["pass"] for a in res["acceptance"]) else 1


if __name__ == "__main__":
    sys.exit(main())
