"""Storage nodes and masters as real processes on 127.0.0.1: uploads, downloads, faults, upkeep.

Each test starts its own cluster (``cluster``: 3 masters and 1 to 3 storage nodes from
``cluster.local``); every process is stopped by pid at teardown (SIGTERM, then SIGKILL), and a
node restarted by a test is the same ``LocalNode``, so its newest process is the one stopped.
Conditions are polled with deadlines (``wait_for``), never slept for. A node's blobs live in
``<tmp>/<name>/blobs/<2 hex>/<32 hex>`` and its uploads in progress in ``<tmp>/<name>/partial/``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from cluster.client import Answer, Client, ClusterError, NotFound
from cluster.node import keys
from cluster.node.config import ClusterConfig, StorageOptions, load_cluster_config
from cluster.files import download_file
from cluster.local import LocalNode, credentials_as, free_port, master_nodes, storage_nodes
from cluster.node.status import query_status
from proto import Codec, new_node_id
from proto.errors import StorageStatus
from proto.ids import split128
from proto.messages import FileChunk, FileRequest, FileResponse, UploadCredit, UploadDone, UploadOpen, UploadReady
from proto.fileids import BLOCK, file_id, file_id_of_path
from proto.fileids import rank
from cluster.node.storagelink import StorageLink, TransferError

from .conftest import Client as RawClient
from .conftest import wait_for

pytestmark = pytest.mark.integration

MiB = 1 << 20


# ---- the cluster -------------------------------------------------------------------------------


@dataclass
class Cluster:
    root: Path
    masters: list[LocalNode]
    storage: list[LocalNode]
    config: ClusterConfig
    client: Client | None

    def node(self, name: str) -> LocalNode:
        return next(n for n in self.storage if n.name == name)

    def blob(self, name: str, fid: bytes) -> Path:
        return self.root / name / "blobs" / fid.hex()[:2] / fid.hex()

    def partial(self, name: str, fid: bytes) -> Path:
        return self.root / name / "partial" / f"{fid.hex()}.part"

    def detail(self, name: str) -> dict | None:
        """The storage node's status detail, or None if it does not answer."""
        reply = query_status([self.node(name).address], timeout=1.0)[0].reply
        return reply.detail if reply is not None else None

    def counters(self, name: str) -> dict:
        return (self.detail(name) or {}).get("core", {})

    def upkeep(self, name: str) -> dict:
        return (self.detail(name) or {}).get("upkeep", {})

    def new_client(self, **kw) -> Client:
        kw.setdefault("attempt_timeout", 0.3)  # a storage link waits 10x this: 3 s
        kw.setdefault("timeout", 20.0)
        return Client(list(self.config.masters.values()), storage=self.config.storage_nodes,
                      replicas=self.config.storage.replicas, **kw)

    def logs(self, tail: int = 2000) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.log_text()[-tail:]}" for n in self.storage + self.masters)


@pytest.fixture
def cluster(tmp_path):
    """``start(storage=2, options=None, masters=3)``: a cluster answering, its masters serving
    (a leader's fresh answer); all its processes stopped by pid at teardown."""
    started: list[LocalNode] = []
    clients: list[Client] = []
    clusters: list[Cluster] = []

    def start(storage: int = 2, options: StorageOptions | None = None, masters: int = 3) -> Cluster:
        ms = master_nodes(tmp_path, masters) if masters else []
        config_path, nodes = storage_nodes(tmp_path, storage, masters=ms or None, options=options)
        for node in ms + nodes:
            started.append(node.start())
        for node in ms + nodes:
            node.wait_ready()
        config = load_cluster_config(config_path)
        c = Cluster(tmp_path, ms, nodes, config, None)
        clusters.append(c)
        if ms:
            c.client = c.new_client()
            clients.append(c.client)
            wait_for(lambda: not c.client.lookup_files([]).stale, 30, "a master leader to serve")
        return c

    yield start
    for client in clients:
        client.close()
    for node in reversed(started):  # storage nodes first: their upkeep may be asking the masters
        node.stop(timeout=5)
    for c in clusters:
        print(c.logs())  # shown by pytest only when the test failed


class LaggingFollower:
    """A master link whose ledger reads come from a follower that has not applied the newest
    registrations: every lookup is a stale "unknown"."""

    def __init__(self, client: Client) -> None:
        self.attempt_timeout = client.attempt_timeout
        self.credentials = client.link.credentials  # the storage links authenticate as the client

    def lookup_files(self, file_ids: list[bytes]) -> Answer:
        return Answer({f.hex(): None for f in file_ids}, True, 1, None)


def random_file(path: Path, size: int) -> bytes:
    data = random.randbytes(size)
    path.write_bytes(data)
    return data


def half_files(root: Path) -> list[str]:
    """What a reader of ``blobs/`` must never see: anything but complete blobs (each hashing to
    its own name) and their sidecars."""
    bad = []
    for path in (root / "blobs").rglob("*"):
        if path.is_dir():
            continue
        if path.name.endswith(".blocks") and path.with_name(path.name[:-7]).is_file():
            continue
        if len(path.name) == 32 and file_id_of_path(path).hex() == path.name:
            continue
        bad.append(str(path.relative_to(root)))
    return bad


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)  # blobs are read-only: the "disk" is what goes wrong here
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


# ---- round trip ----------------------------------------------------------------------------------


def test_upload_download_round_trip_with_two_replicas_and_dedupe(cluster, tmp_path):
    c = cluster(storage=2)
    src = tmp_path / "input.bin"
    data = random_file(src, 20 * MiB + 12345)
    fid = file_id(data)
    ref = c.client.upload(src)
    assert ref.id == fid.hex() and ref.size == len(data) and ref.replicas == ["s1", "s2"]

    out = tmp_path / "output.bin"
    assert c.client.download(ref.id, out) == len(data)
    assert out.read_bytes() == data and not out.with_name("output.bin.part").exists()
    # asked of a follower that has not applied the registration yet: still found on the nodes
    out.unlink()
    assert download_file(LaggingFollower(c.client), c.client.storage, fid, out, progress=None) == len(data)
    assert out.read_bytes() == data
    with pytest.raises(NotFound, match="no file"):
        c.client.download("ab" * 16, tmp_path / "nothing.bin")

    record = c.client.lookup_files([fid]).value[ref.id]
    assert record["size"] == len(data) and record["replicas"] == ["s1", "s2"]
    assert record["refs"] == {"pinned:client": "input.bin"}  # the pin of the key that uploaded it
    assert [f["id"] for f in c.client.files().value["files"]] == [ref.id]
    for name in ("s1", "s2"):
        blob = c.blob(name, fid)
        assert blob.is_file() and blob.stat().st_size == len(data)
        assert file_id_of_path(blob) == fid
        assert half_files(c.root / name) == [] and not c.partial(name, fid).exists()

    # the same file again: stored already everywhere, so no byte is sent
    bytes_in = {name: c.counters(name).get("bytes_in", 0) for name in ("s1", "s2")}
    again = c.client.upload(src)
    assert again == ref
    assert {name: c.counters(name).get("bytes_in", 0) for name in ("s1", "s2")} == bytes_in
    assert all(c.counters(name).get("dedupes", 0) >= 1 for name in ("s1", "s2"))


# ---- faults --------------------------------------------------------------------------------------


def test_sigkill_during_an_upload_then_the_restarted_node_resumes(cluster, tmp_path):
    c = cluster(storage=2)
    src = tmp_path / "big.bin"
    size = 96 * MiB
    data = random_file(src, size)
    fid = file_id(data)
    target, other = rank(fid, list(c.config.storage_nodes))
    outcome: dict = {}

    def upload() -> None:
        with c.new_client() as client:  # its own sockets: a Client is not thread-safe
            try:
                outcome["ref"] = client.upload(src)
            except ClusterError as exc:
                outcome["error"] = exc
            except BaseException as exc:  # reported by the assertion below
                outcome["crash"] = exc

    thread = threading.Thread(target=upload, name="upload", daemon=True)
    thread.start()
    part = c.partial(target, fid)
    wait_for(lambda: part.exists() and part.stat().st_size > 0, 30, f"bytes of the upload to reach {target}")
    c.node(target).kill()
    arrived = part.stat().st_size
    assert 0 < arrived < size, "the node was killed mid-upload"
    thread.join(60)
    assert not thread.is_alive(), "the upload did not give up on the dead node"
    assert "crash" not in outcome, outcome

    assert not c.blob(target, fid).exists()
    for name in (target, other):
        assert half_files(c.root / name) == [], f"{name} shows a half file"
    if "error" in outcome:
        text = str(outcome["error"])
        assert "nothing was registered" in text and target in text, text
        assert c.client.lookup_files([fid]).value[fid.hex()] is None
        # the other node stored it but could not make the second copy: it said so
        wait_for(lambda: c.counters(other).get("replications_failed", 0) >= 1, 20, f"{other} to give up replicating")
    else:
        ref = outcome["ref"]
        assert target not in ref.replicas
        assert c.client.lookup_files([fid]).value[fid.hex()]["replicas"] == ref.replicas

    # The node comes back (same address, same data dir) and the upload is tried again: the
    # client goes to it first, and it resumes from its partial instead of starting over.
    c.node(target).start().wait_ready()
    assert part.stat().st_size >= arrived
    ref = c.client.upload(src)
    assert sorted(ref.replicas) == sorted([target, other])
    counters = c.counters(target)
    assert counters.get("uploads_resumed", 0) >= 1, counters
    assert counters.get("bytes_in", 0) <= size - arrived, "only the rest was sent"
    assert not part.exists() and file_id_of_path(c.blob(target, fid)) == fid
    assert sorted(c.client.lookup_files([fid]).value[fid.hex()]["replicas"]) == sorted([target, other])
    out = tmp_path / "big.out"
    assert c.client.download(ref.id, out) == size
    assert out.read_bytes() == data


def test_with_a_node_killed_downloads_fail_over_and_uploads_go_to_the_others(cluster, tmp_path):
    c = cluster(storage=3)
    src = tmp_path / "input.bin"
    data = random_file(src, 6 * MiB + 1)
    ref = c.client.upload(src)
    dead = c.client.lookup_files([file_id(data)]).value[ref.id]["replicas"][0]  # the one read first
    c.node(dead).kill()
    out = tmp_path / "output.bin"
    with c.new_client(attempt_timeout=0.1) as client:  # a storage link gives up on a dead node after 1 s
        assert client.download(ref.id, out) == len(data)
    assert out.read_bytes() == data

    # A file the dead node ranks first for: the client skips it, and the node it goes to
    # skips it too when it pushes the second copy.
    names = list(c.config.storage_nodes)
    while True:
        data = random.randbytes(MiB)
        if rank(file_id(data), names)[0] == dead:
            break
    src = tmp_path / "second.bin"
    src.write_bytes(data)
    ref = c.client.upload(src)
    assert dead not in ref.replicas and len(ref.replicas) == 2, ref
    assert c.client.download(ref.id, out) == len(data) and out.read_bytes() == data


def test_a_corrupt_replica_is_refused_read_elsewhere_and_repaired_by_the_scrub(cluster, tmp_path):
    c = cluster(storage=2, options=StorageOptions(replicas=2, scrub_interval_s=2.0))
    src = tmp_path / "input.bin"
    data = random_file(src, 3 * MiB + 5)
    fid = file_id(data)
    ref = c.client.upload(src)
    bad = c.client.lookup_files([fid]).value[ref.id]["replicas"][0]  # the replica a download tries first
    # Corrupt it just after a scrub pass, so the next pass is a whole interval away.
    passes = c.upkeep(bad).get("scrub_passes", 0)
    wait_for(lambda: c.upkeep(bad).get("scrub_passes", 0) > passes, 15, f"a scrub pass on {bad}")
    blob = c.blob(bad, fid)
    flip_byte(blob, BLOCK + 10)
    with StorageLink(c.node(bad).address, name=bad, timeout=5.0) as link:
        with pytest.raises(TransferError) as caught:
            link.read(fid, BLOCK, 100)
        assert caught.value.status == StorageStatus.CORRUPT and "block 1" in str(caught.value), caught.value
        assert caught.value.retryable
        assert bytes(link.read(fid, 0, 100)[0]) == data[:100], "the sound blocks are still served"
    out = tmp_path / "output.bin"
    assert c.client.download(ref.id, out) == len(data)
    assert out.read_bytes() == data

    wait_for(lambda: c.upkeep(bad).get("repaired", 0) >= 1, 20, f"the scrub to repair {bad}'s copy")
    upkeep = c.upkeep(bad)
    assert upkeep.get("corrupt_found", 0) >= 1 and upkeep.get("repair_failed", 0) == 0, upkeep
    assert file_id_of_path(blob) == fid
    with StorageLink(c.node(bad).address, name=bad, timeout=5.0) as link:
        assert bytes(link.read(fid, BLOCK, 100)[0]) == data[BLOCK:BLOCK + 100]


# ---- collection ----------------------------------------------------------------------------------


def test_released_files_are_collected_and_pinned_ones_kept(cluster, tmp_path):
    c = cluster(storage=2, options=StorageOptions(replicas=2, gc_grace_s=1.0, gc_interval_s=0.5))
    released = c.client.upload(_small_file(tmp_path / "released.bin", 1))
    pinned = c.client.upload(_small_file(tmp_path / "pinned.bin", 2))
    fr, fp = bytes.fromhex(released.id), bytes.fromhex(pinned.id)
    answer = c.client.release_files(released.id)
    assert answer["dropped"] == [fr]
    assert c.client.lookup_files([fr]).value[released.id] is None

    def gone() -> bool:
        return not any(c.blob(n, fr).exists() or c.blob(n, fr).with_suffix(".blocks").exists() for n in ("s1", "s2"))

    wait_for(gone, 20, "the released file to be collected from both nodes")
    collected_at = time.time()
    for name in ("s1", "s2"):  # a later pass still keeps the pinned file
        wait_for(lambda n=name: (c.upkeep(n).get("last_gc_at") or 0) > collected_at, 10, f"another collection on {name}")
        assert c.upkeep(name).get("collected", 0) >= 1
        assert file_id_of_path(c.blob(name, fp)) == fp
    assert c.client.lookup_files([fp]).value[pinned.id]["refs"] == {"pinned:client": "pinned.bin"}


def _small_file(path: Path, seed: int) -> Path:
    path.write_bytes(os.urandom(MiB + seed))
    return path


# ---- bad input over the wire -----------------------------------------------------------------------


def test_bad_input_over_the_wire_gets_clear_statuses(cluster, tmp_path, client_for):
    c = cluster(storage=1, options=StorageOptions(replicas=1, idle_timeout_s=1.5, window_mb=1))
    node = c.storage[0]
    raw = client_for(node)
    data = os.urandom(3 * MiB)
    fid = file_id(data)
    upper, lower = split128(fid)

    def expect(kind: type, timeout: float = 5.0):
        while True:
            m = raw.recv(timeout)
            if not isinstance(m, UploadCredit) or kind is UploadCredit:
                assert isinstance(m, kind), m
                return m

    def open_upload(request_id: int) -> UploadReady:
        raw.send(UploadOpen(request_id, upper, lower, len(data), 1, "raw"))
        ready = expect(UploadReady)
        assert ready.request_id == request_id and ready.credit == MiB
        return ready

    def refused(chunk: FileChunk, status: StorageStatus, words: str) -> UploadDone:
        raw.send(chunk)
        done = expect(UploadDone)
        assert done.status == status and words in (done.error or ""), done
        return done

    refused(FileChunk(424242, 0, 0, b"x" * 100), StorageStatus.UNKNOWN_UPLOAD, "no upload 424242")
    uid = open_upload(1).upload_id
    refused(FileChunk(uid, 0, 0, bytes(4 * MiB + 1)), StorageStatus.TOO_LARGE, "the limit is 4194304")
    uid = open_upload(2).upload_id
    refused(FileChunk(uid, 0, 0, data[:2 * MiB]), StorageStatus.NO_CREDIT, "beyond the credit")
    uid = open_upload(3).upload_id
    refused(FileChunk(uid, 10, 0, data[10:20]), StorageStatus.BAD_OFFSET, "stands at 0")

    # a sender that goes silent mid-transfer: the node drops the upload and keeps the partial
    uid = open_upload(4).upload_id
    for offset in (0, 256 * 1024):
        raw.send(FileChunk(uid, offset, 0, data[offset:offset + 256 * 1024]))
    # 10 s only guards against a node that never gives up; that it waits its idle timeout, no
    # less, is test_storage_core's (a counted clock)
    done = expect(UploadDone, timeout=10.0)
    assert done.status == StorageStatus.UNKNOWN_UPLOAD and "no chunk for 1.5 s" in done.error, done
    assert c.partial("s1", fid).stat().st_size == 512 * 1024

    # reads: a range past the end, an unknown id, too much at once. The file is stored but never
    # registered, so no client key may read it (storage.readers): an operator's key reads here.
    small = os.urandom(100_000)
    sid = file_id(small)
    with StorageLink(node.address, name="s1", timeout=5.0) as link:
        assert link.upload(sid, len(small), lambda o, n: small[o:o + n]) == ["s1"]
    s_upper, s_lower = split128(sid)
    reader = RawClient(node.address, credentials_as(Path(c.config.path), "root", "operator"))
    for rid, (u, lo, offset, length, status, words) in enumerate([
        (s_upper, s_lower, len(small) + 1, 10, StorageStatus.OUT_OF_RANGE, "100000 bytes"),
        (upper ^ 1, lower, 0, 10, StorageStatus.NOT_FOUND, "not stored here"),
        (s_upper, s_lower, 0, 16 * MiB + 1, StorageStatus.TOO_LARGE, "read in pieces"),
        (s_upper, s_lower, 99_990, 100, StorageStatus.OK, ""),
    ], start=100):
        reader.send(FileRequest(rid, u, lo, offset, length))
        r = reader.recv()
        assert r.request_id == rid and r.status == status and words in (r.error or ""), r
    assert bytes(r.payload) == small[99_990:]
    reader.close()

    # the node is still serving, counted every refusal, and holds no upload open
    detail = c.detail("s1")
    assert detail is not None and detail["uploads_open"] == 0
    core = detail["core"]
    for key in ("refused.TOO_LARGE", "refused.NO_CREDIT", "refused.BAD_OFFSET", "chunks_unknown_upload",
                "uploads_expired", "reads_out_of_range", "reads_not_found", "reads_refused"):
        assert core.get(key) == 1, (key, core)
    assert not c.blob("s1", fid).exists()
    assert c.client.lookup_files([fid, sid]).value == {fid.hex(): None, sid.hex(): None}, "the node registers nothing"

    # the partial is there for a resume: a well-behaved sender finishes from where it stands
    assert open_upload(5).offset == 512 * 1024
    with StorageLink(node.address, name="s1", timeout=5.0) as link:
        assert link.upload(fid, len(data), lambda o, n: data[o:o + n]) == ["s1"]
    assert file_id_of_path(c.blob("s1", fid)) == fid
    assert c.counters("s1").get("uploads_resumed", 0) >= 2


# ---- the sending side ------------------------------------------------------------------------------


class AnswerFirst(StorageLink):
    """A link that, after sending the last chunk, waits until the node's answer is in before it
    reads anything: the race where UPLOAD_DONE comes with the credit it is still draining."""

    def _send(self, message) -> None:
        super()._send(message)
        if isinstance(message, FileChunk) and message.last:
            assert self._sock.poll(5000, zmq.POLLIN)


def test_an_upload_done_read_with_the_credit_is_not_lost(cluster):
    c = cluster(storage=1, masters=0)
    data = os.urandom(100_000)  # one chunk: no credit comes back, only the answer
    with AnswerFirst(c.storage[0].address, name="s1", timeout=3.0) as link:
        # a lost answer is a TransferError after the link's 3 s timeout, not a slow success
        assert link.upload(file_id(data), len(data), lambda o, n: data[o:o + n]) == ["s1"]


def test_the_sender_waits_while_the_node_pushes_copies_and_skips_dead_nodes_quickly():
    """A fake node (a ROUTER in this process) that takes longer than the link's ``timeout`` to
    push the copies after the last chunk, saying it is alive (a zero credit) meanwhile: the
    sender waits for it. One that goes silent instead is given up on after ``timeout``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    keys.learn(keys.Credentials.plaintext([f"tcp://127.0.0.1:{port}"]))  # a fake node, without keys
    codec = Codec(new_node_id())
    stop = threading.Event()
    size = 4 * MiB
    keep_alive = [True]

    def node() -> None:
        while not stop.is_set():
            if not sock.poll(100):
                continue
            route, _, m = codec.recv(sock, router=True)
            if isinstance(m, UploadOpen):
                codec.send(sock, UploadReady(m.request_id, 1, 0, size), route=route)
            elif isinstance(m, FileChunk) and m.last:
                for _ in range(5):  # "pushing to the peer" for 2.5 s, longer than the 1 s timeout
                    if stop.wait(0.5):
                        return
                    if keep_alive[0]:
                        codec.send(sock, UploadCredit(1, 0), route=route)
                codec.send(sock, UploadDone(0, 1, 0, 0, size, 0, ["f1", "f2"]), route=route)

    thread = threading.Thread(target=node, daemon=True)
    thread.start()
    data = bytes(size)
    try:
        with StorageLink(f"tcp://127.0.0.1:{port}", name="fake", timeout=1.0) as link:
            assert link.upload(b"\1" * 16, size, lambda o, n: memoryview(data)[o:o + n], copies=2) == ["f1", "f2"]
        keep_alive[0] = False
        with StorageLink(f"tcp://127.0.0.1:{port}", name="fake", timeout=1.0) as link:
            with pytest.raises(TransferError, match="did not answer within 1 s to store the file"):
                link.upload(b"\1" * 16, size, lambda o, n: memoryview(data)[o:o + n], copies=2)
        # nothing listens here: the link says so after its connect timeout, not its answer
        # timeout (600 s: waiting for it would fail the test at its 120 s limit)
        nowhere = f"tcp://127.0.0.1:{free_port()}"
        keys.learn(keys.Credentials.plaintext([nowhere]))
        dead = StorageLink(nowhere, name="dead", timeout=600.0)
        assert dead.connect_timeout == 3.0, "by default a node that is down costs 3 s, not the answer timeout"
        dead.connect_timeout = 0.5
        with dead, pytest.raises(TransferError, match="not reachable") as caught:
            dead.read(b"\1" * 16, 0, 1)
        assert caught.value.status is None and caught.value.retryable
    finally:
        stop.set()
        thread.join(5)
        sock.close()
        ctx.term()
