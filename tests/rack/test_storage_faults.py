"""Storage nodes cut off mid-transfer on a simulated rack (issue 22): uploads and reads.

Theory of operation
-------------------
The rack has two storage nodes and keeps ``replicas = 2`` copies of every file
(deploy/cluster.example.toml). A client uploads to the node ranked first for the file's id
(rendezvous hashing); that node stores the file and pushes the second copy to its peer, and the
client registers the file with the masters only once both copies are durable. A download asks
the masters where the file lives and streams it from one replica with a window of range reads,
going to the next one when a node fails.

The tests are black-box: the client API, network faults (tests/rack/rack.py) and what the
storage nodes' status and the ledger say. Transfers on the rack's bridge take a second or two,
too short to land a cut in reliably on a busy machine, so the client paces itself through its
own ``progress`` callback (a slow client, as on a long link) until the cut, then runs free; the
cut is made once the node's own counters show the transfer under way. Each test starts from a
healed rack that serves as a whole and leaves it healed; the figures are printed (``pytest -s``).

- Mid-upload, the receiving node isolated: two copies cannot be made with one node, so the
  upload must fail with a retryable ``UploadFailed`` and nothing registered; after the heal the
  same upload completes (the cut node resumes its partial) with both copies, byte-exact.
- Mid-upload, the receiving node cut off from the client only: the upload goes to the other
  node, which pushes the second copy to the cut one, and completes with both copies.
- Mid-read, the serving node isolated: a client's download completes from the other replica
  (after READ_SILENCE_S of silence it moves there and fetches only the chunks it lacks, well
  within the 10 s it took when it waited out a long timeout and started over), and so does a
  task that reads its input through its worker's FUSE view (the mount's reads have a short
  timeout and fail over block by block, behind its read-ahead).
- Mid-read, every replica cut off from the client: the download fails within two silences with
  a retryable ``DownloadFailed`` and leaves no file, partial or whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.client import UploadFailed
from cluster.files import READ_SILENCE_S, DownloadFailed, FileRef
from cluster.node.storagelink import StorageLink
from proto.fileids import file_id_of_path, rank

from .rack import Rack

pytestmark = pytest.mark.rack

MiB = 1 << 20
SIZE = 64 * MiB  # four upload windows (16 MiB of credit each) and 64 range reads
PACE_S = 0.06  # seconds a paced client waits after each MiB: ~17 MB/s, ~4 s for the file
CUT_AT = 12 * MiB  # the node has taken (or sent) this much of the transfer when it is cut
# A read cut off moves to the next replica after READ_SILENCE_S; this much more is room for the
# connection and the first answers there on a busy 2-core machine (0.7 s was the worst measured
# under load), and still well below the 10 s the old silence timeout took alone.
FAILOVER_SLACK_S = 3.0


# ---- helpers -----------------------------------------------------------------------------------


class Pace:
    """A ``progress`` callback that slows the transfer it watches until ``release()``, and
    records when bytes moved: (monotonic time, bytes; negative when a failed node's share is
    taken back)."""

    def __init__(self) -> None:
        self.paced = threading.Event()
        self.paced.set()
        self.lock = threading.Lock()
        self.moves: list[tuple[float, int]] = []

    def __call__(self, n: int) -> None:
        with self.lock:
            self.moves.append((time.monotonic(), n))
        if n > 0 and self.paced.is_set():
            time.sleep(PACE_S * n / MiB)

    def release(self) -> None:
        self.paced.clear()

    def total(self) -> int:
        with self.lock:
            return sum(n for _, n in self.moves)

    def first_after(self, t: float, positive_after_negative: bool = False) -> float | None:
        """When bytes first moved after ``t`` (after the first negative move, if asked)."""
        with self.lock:
            moves = [m for m in self.moves if m[0] > t]
        if positive_after_negative:
            k = next((i for i, (_, n) in enumerate(moves) if n < 0), None)
            moves = [] if k is None else moves[k + 1:]
        return next((at for at, n in moves if n > 0), None)

    def longest_silence_after(self, t: float) -> tuple[float, float] | None:
        """The longest time after ``t`` that no bytes moved (from ``t`` itself on): its start and
        its end (when bytes moved again), or None if nothing moved after ``t``."""
        with self.lock:
            times = [t] + [at for at, n in self.moves if at > t]
        gaps = list(zip(times, times[1:]))
        return max(gaps, key=lambda g: g[1] - g[0]) if gaps else None


class Transfer(threading.Thread):
    """Runs ``job(client)`` with a client of its own, keeping what it returned or raised."""

    def __init__(self, rack: Rack, job) -> None:
        super().__init__(daemon=True)
        self.rack, self.job = rack, job
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended: float | None = None

    def run(self) -> None:
        try:
            with self.rack.client() as c:
                self.result = self.job(c)
        except BaseException as exc:  # handed to the test, which asserts on its type
            self.error = exc
        finally:
            self.ended = time.monotonic()


def random_file(path: Path, size: int = SIZE) -> tuple[Path, bytes, str]:
    """A file of ``size`` fresh random bytes (a new content id each run): its path, id and sha256."""
    data = os.urandom(size)
    path.write_bytes(data)
    return path, file_id_of_path(path), hashlib.sha256(data).hexdigest()


def status_of(rack: Rack, names) -> dict[str, dict[str, Any]]:
    """Each named storage node's status (its counters under "core"); every node must answer."""
    d = rack.details(names, timeout=5.0)
    missing = [n for n, x in d.items() if x is None]
    assert not missing, f"not answering: {missing}"
    return d


def grown(rack: Rack, before: dict[str, dict[str, Any]], name: str, at_least: int) -> str | None:
    """The storage node whose counter ``name`` has grown by ``at_least`` since ``before``, if one
    has (a node slow to answer, busy with the transfer, is asked again on the next poll)."""
    now = rack.details(before)
    return next((n for n, d in now.items() if d and counter(d, name) - counter(before[n], name) >= at_least), None)


def counter(detail: dict[str, Any], name: str) -> int:
    return detail["core"].get(name, 0)


def replica_digest(rack: Rack, c, node: str, fid: bytes) -> str:
    """sha256 of the whole file as node ``node`` serves it to this client (its own copy, no failover)."""
    buf = bytearray()

    def write_at(offset: int, data) -> None:
        if len(buf) < offset + len(data):
            buf.extend(bytes(offset + len(data) - len(buf)))
        buf[offset:offset + len(data)] = data

    with StorageLink(rack.config.storage_nodes[node], name=node, credentials=c.link.credentials) as link:
        link.download(fid, write_at)
    return hashlib.sha256(buf).hexdigest()


def on_both(rack: Rack, c, ref: FileRef, sha: str) -> None:
    """The ledger lists both storage nodes for ``ref`` and each serves it byte-exact."""
    record = c.lookup_files([ref]).value[ref.id]
    assert record is not None and sorted(record["replicas"]) == rack.role("storage"), record
    assert record["size"] == SIZE, record
    for node in rack.role("storage"):
        assert replica_digest(rack, c, node, bytes.fromhex(ref.id)) == sha, f"{node}'s copy differs"


def upkeep_clean(rack: Rack) -> dict[str, dict[str, Any]]:
    """The storage nodes' status, once their upkeep reports no error."""
    d = status_of(rack, rack.role("storage"))
    for node, detail in d.items():
        assert detail["upkeep"]["last_error"] is None, (node, detail["upkeep"])
    return d


def start_upload(rack: Rack, path: Path, pace: Pace) -> tuple[Transfer, str, dict[str, Any]]:
    """Start uploading ``path`` (paced) and wait until the node receiving it has taken CUT_AT
    bytes of it: (the transfer, that node, the storage nodes' status before)."""
    storage = rack.role("storage")
    before = status_of(rack, storage)
    upload = Transfer(rack, lambda c: c.upload(path, progress=pace))
    upload.start()
    receiver = rack.wait(lambda: grown(rack, before, "bytes_in", CUT_AT), 30,
                         f"a storage node to take {CUT_AT // MiB} MiB of the upload")
    return upload, receiver, before


# ---- mid-upload, the receiving node isolated: fails cleanly, then works after the heal ------------


def test_storage_node_isolated_mid_upload_fails_cleanly_then_uploads_after_heal(healthy: Rack, tmp_path: Path):
    rack = healthy
    path, fid, sha = random_file(tmp_path / "genome.bin")
    s_first, s_other = rank(fid, rack.role("storage"))
    pace = Pace()
    upload, receiver, before = start_upload(rack, path, pace)
    assert receiver == s_first, f"the upload went to {receiver}, not {s_first}, the node ranked first for its id"
    sent_at_cut = pace.total()
    cut = time.monotonic()
    rack.isolate(receiver)
    assert sent_at_cut < SIZE, "the upload was all sent before the cut"
    pace.release()
    upload.join(120)
    assert not upload.is_alive(), "the upload hung after its storage node was cut off"
    failed = upload.ended - cut
    # Two copies cannot be durable with one node reachable: a typed, retryable failure.
    assert isinstance(upload.error, UploadFailed), repr(upload.error)
    assert upload.error.retryable, upload.error
    with rack.client() as c:
        # Nothing half-visible: the ledger has no entry pointing at the copies that were left.
        assert c.lookup_files([fid]).value.get(fid.hex()) is None
        assert fid.hex() not in [f["id"] for f in c.files(1000).value["files"]]

        rack.heal()
        healed = time.monotonic()
        rack.wait_healthy(30)
        ref = c.upload(path)
        again = time.monotonic() - healed
        assert ref.id == fid.hex() and ref.size == SIZE and ref.replicas == rack.role("storage"), ref
        on_both(rack, c, ref, sha)
        after = upkeep_clean(rack)
        # the cut node took up the upload where its partial copy stood, and dropped that partial
        assert counter(after[receiver], "uploads_resumed") > counter(before[receiver], "uploads_resumed"), after[receiver]["core"]
        assert after[receiver]["disk"]["partials"] <= before[receiver]["disk"]["partials"], after[receiver]["disk"]
        c.release_files(ref)
    print(f"\n[rack g] isolated {receiver} after {sent_at_cut / MiB:.0f} MiB of a {SIZE // MiB} MiB upload: it failed "
          f"{failed:.2f} s after the cut ({type(upload.error).__name__}, retryable), "
          f"nothing registered; after the heal the upload completed in {again:.2f} s (rack serving again included) "
          f"on {ref.replicas}, {receiver} resumed its partial; both copies byte-exact")


# ---- mid-upload, the receiving node cut off from the client only: completes with both copies ------


def test_storage_node_cut_from_client_mid_upload_completes_on_both(healthy: Rack, tmp_path: Path):
    rack = healthy
    path, fid, sha = random_file(tmp_path / "reads.bin")
    s_first, s_other = rank(fid, rack.role("storage"))
    pace = Pace()
    upload, receiver, before = start_upload(rack, path, pace)
    assert receiver == s_first, f"the upload went to {receiver}, not {s_first}, the node ranked first for its id"
    sent_at_cut = pace.total()
    cut = time.monotonic()
    rack.cut([receiver], ["client"])
    assert sent_at_cut < SIZE, "the upload was all sent before the cut"
    pace.release()
    try:
        upload.join(120)
        assert not upload.is_alive(), "the upload hung after its storage node was cut off from the client"
        done = upload.ended - cut
        moved = (pace.first_after(cut, positive_after_negative=True) or upload.ended) - cut
        assert upload.error is None, repr(upload.error)
        ref = upload.result
        assert ref.id == fid.hex() and ref.size == SIZE and ref.replicas == rack.role("storage"), ref
        with rack.client() as c:
            # the cut node's copy is checked after the heal; the other's now
            record = c.lookup_files([ref]).value[ref.id]
            assert sorted(record["replicas"]) == rack.role("storage"), record
            assert replica_digest(rack, c, s_other, fid) == sha
    finally:
        rack.heal()
    rack.wait_healthy(30)
    with rack.client() as c:
        on_both(rack, c, ref, sha)
        after = upkeep_clean(rack)
        # s_other pushed the second copy to the cut node, which resumed the client's partial
        assert counter(after[receiver], "uploads_resumed") > counter(before[receiver], "uploads_resumed"), after[receiver]["core"]
        c.release_files(ref)
    print(f"\n[rack h] cut {receiver} off from the client after {sent_at_cut / MiB:.0f} MiB of a {SIZE // MiB} MiB "
          f"upload: {s_other} took it {moved:.2f} s after the cut, the upload completed {done:.2f} s after the cut "
          f"with copies on {ref.replicas} ({s_other} pushed the second to {receiver}); both byte-exact")


def read_under_way(rack: Rack, ref, out: Path):
    """Start a paced download of ``ref`` to ``out`` and wait until a storage node has served
    ``CUT_AT`` bytes of it: (the transfer, its pace, the nodes' status before, the serving node)."""
    pace = Pace()
    before = status_of(rack, rack.role("storage"))
    read = Transfer(rack, lambda c: c.download(ref, out, progress=pace))
    read.start()
    server = rack.wait(lambda: grown(rack, before, "bytes_out", CUT_AT), 30,
                       f"a storage node to serve {CUT_AT // MiB} MiB of the read")
    return read, pace, before, server


# ---- mid-read, the serving node isolated: the read completes from the other replica ---------------


def test_storage_node_isolated_mid_read_completes_from_the_other_replica(healthy: Rack, tmp_path: Path):
    rack = healthy
    storage = rack.role("storage")
    path, fid, sha = random_file(tmp_path / "input.bin")
    with rack.client() as c:
        ref = c.upload(path)
    assert ref.replicas == storage, ref
    out = tmp_path / "copy.bin"
    read, pace, before, server = read_under_way(rack, ref, out)
    survivor = next(n for n in storage if n != server)
    got_at_cut = pace.total()
    cut = time.monotonic()
    rack.isolate(server)
    assert got_at_cut < SIZE, "the read was all done before the cut"
    pace.release()
    try:
        read.join(120)
        assert not read.is_alive(), "the read hung after its storage node was cut off"
        assert read.error is None, repr(read.error)
        done = read.ended - cut
        silent_from, resumed = pace.longest_silence_after(cut)
        failover = resumed - cut
        assert read.result == SIZE
        assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
        assert not out.with_name(out.name + ".part").exists()
        assert all(n > 0 for _, n in pace.moves), "bytes were taken back: the read started over"
        served = status_of(rack, [survivor])[survivor]
        from_survivor = counter(served, "bytes_out") - counter(before[survivor], "bytes_out")
        # The survivor served only what the read lacked: no more than was missing at the cut (less
        # what the cut node's answers already on their way brought), not the file from byte 0.
        assert 0 < from_survivor <= SIZE - got_at_cut, (from_survivor, got_at_cut)
        assert failover < READ_SILENCE_S + FAILOVER_SLACK_S, f"the read moved on {failover:.2f} s after the cut"
    finally:
        rack.heal()
    rack.wait_healthy(30)
    with rack.client() as c:
        c.release_files(ref)
    print(f"\n[rack i] isolated {server} after {got_at_cut / MiB:.0f} MiB of a {SIZE // MiB} MiB read: silent "
          f"{resumed - silent_from:.2f} s, {survivor} served the missing {from_survivor / MiB:.0f} MiB from "
          f"{failover:.2f} s after the cut (silence timeout {READ_SILENCE_S:g} s), the read completed "
          f"{done:.2f} s after the cut, {SIZE} bytes, sha256 matches")


# ---- mid-read, every replica cut off from the client: a typed failure, no file left --------------


def test_every_replica_cut_off_mid_read_fails_typed_and_leaves_no_file(healthy: Rack, tmp_path: Path):
    rack = healthy
    storage = rack.role("storage")
    path, fid, sha = random_file(tmp_path / "lost.bin")
    with rack.client() as c:
        ref = c.upload(path)
    out = tmp_path / "copy.bin"
    read, pace, before, server = read_under_way(rack, ref, out)
    got_at_cut = pace.total()
    cut = time.monotonic()
    rack.cut(storage, ["client"])  # the storage nodes still hear the masters and each other
    pace.release()
    try:
        read.join(120)
        assert not read.is_alive(), "the read hung after every replica was cut off"
        failed = read.ended - cut
        assert isinstance(read.error, DownloadFailed), repr(read.error)
        assert read.error.retryable and read.error.status is None, (read.error.status, read.error.failures)
        assert sorted(read.error.failures) == storage and set(read.error.failures.values()) == {None}
        assert list(tmp_path.iterdir()) == [path], "a file was left behind"
        # the cut node's silence, then the other's unanswered connection: two silences, not two 10 s
        assert failed < 2 * READ_SILENCE_S + FAILOVER_SLACK_S, f"the read failed {failed:.2f} s after the cut"
    finally:
        rack.heal()
    rack.wait_healthy(30)
    with rack.client() as c:
        assert c.download(ref, out) == SIZE  # once healed, the same read completes
        assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
        c.release_files(ref)
    print(f"\n[rack k] cut both storage nodes off from the client after {got_at_cut / MiB:.0f} MiB of a "
          f"{SIZE // MiB} MiB read from {server}: DownloadFailed (retryable, no status: nobody answered) "
          f"{failed:.2f} s after the cut, no file left; after the heal the read completed")


# ---- mid-read through a worker's mount, the serving node isolated -------------------------------

# The task: read its input through the worker's FUSE view a MiB at a time, paced like the client
# above, and say where the file was, its sha256 and when each read started and how long it took
# (CLOCK_MONOTONIC: network namespaces share the test's clock).
PACED_READER = f"""
import hashlib, json, os, sys, time
h, reads = hashlib.sha256(), []
with open("in", "rb") as f:
    while True:
        t = time.monotonic()
        block = f.read({MiB})
        if not block:
            break
        reads.append((t, time.monotonic() - t))
        h.update(block)
        time.sleep({PACE_S})
print(json.dumps({{"path": os.path.realpath("in"), "sha256": h.hexdigest(), "reads": reads}}))
"""


def test_storage_node_isolated_mid_read_through_a_worker_mount_completes_from_the_other_replica(
        healthy: Rack, tmp_path: Path):
    rack = healthy
    storage = rack.role("storage")
    path, fid, sha = random_file(tmp_path / "reference.bin")
    with rack.client() as c:
        ref = c.upload(path)
        assert ref.replicas == storage, ref
        before = status_of(rack, storage)
        task = c.run(["/usr/bin/python3", "-I", "-c", PACED_READER], inputs={"in": ref})
        server = rack.wait(lambda: grown(rack, before, "bytes_out", CUT_AT), 60,
                           f"a storage node to serve {CUT_AT // MiB} MiB of the task's read")
        survivor = next(n for n in storage if n != server)
        cut = time.monotonic()
        rack.isolate(server)
        try:
            out = json.loads(task.result(timeout=120).stdout)
            done = time.monotonic() - cut
            served = status_of(rack, [survivor])[survivor]
        finally:
            rack.heal()
        assert out["path"].endswith(f"/mnt/files/{ref.id}"), out["path"]  # read through the FUSE view
        assert out["sha256"] == sha
        assert counter(served, "bytes_out") > counter(before[survivor], "bytes_out"), "the other replica served nothing"
        read_at_cut = sum(1 for t, _ in out["reads"] if t < cut)
        assert read_at_cut < len(out["reads"]), "the task had read everything before the cut"
        stall = max(d for t, d in out["reads"] if t + d > cut)  # the read that waited on the cut node
        # the mount's reads time out after 2 s (worker/view.py), as a client's download does
        assert stall < READ_SILENCE_S + FAILOVER_SLACK_S, f"a read through the mount waited {stall:.2f} s"
        rack.wait_healthy(30)
        c.release_files(ref)
    print(f"\n[rack j] isolated {server} while a task read a {SIZE // MiB} MiB input through its worker's mount "
          f"({read_at_cut} MiB read by the task, {(counter(served, 'bytes_out') - counter(before[survivor], 'bytes_out')) / MiB:.0f} "
          f"MiB then served by {survivor}): its longest read after the cut took {stall:.2f} s, the task ended "
          f"{done:.2f} s after the cut; sha256 matches")
