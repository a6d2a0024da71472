"""The storage node's core driven directly: no sockets, no threads, no clock, no sleeps.

``Harness`` stands in for ``storage.node``'s loop. It feeds events to the core and performs the
disk effects on a real ``BlobStore`` in ``tmp_path`` through ``storage.node.DiskPerformer`` (the
node's own code), handling each answer right after the effects that caused it, as the loop does.
``Replicate`` effects are kept for the test to answer with ``Replicated``. Writes can be held
(``hold_writes``) to stand for a slow disk. After every event it checks the core's invariants
and the credit rule: what the sender may send never runs more than ``window`` bytes beyond what
the disk has written.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from cluster.node.events import Log, MessageReceived, Refuse, Send, Started, StartTimer, TimerFired
from proto.errors import StorageStatus
from proto.ids import join128, split128
from proto.messages import FileChunk, FileRequest, FileResponse, UploadCredit, UploadDone, UploadOpen, UploadReady
from proto.fileids import BLOCK, file_id
from storage.blobs import BlobStore
from storage.core import (
    API,
    AbortUpload,
    BeginUpload,
    FinishUpload,
    ReadRange,
    Replicate,
    Replicated,
    StorageCore,
    StorageSettings,
    UPLOAD_TRANSITIONS,
    Upload,
    UploadState,
    WriteChunk,
)
from proto.fileids import rank
from storage.maintenance import RateLimit, collectable
from cluster.node.config import StorageOptions
from storage.node import DiskPerformer, settings_of

KiB = 1024
CLIENT = b"client-route"
OTHER = b"other-route"
PEERS = ["s2", "s3"]
SETTINGS = StorageSettings(window=256 * KiB, chunk_max=64 * KiB, read_max=512 * KiB, idle_timeout=5.0, max_uploads=4)


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


class Harness:
    def __init__(self, root: Path, settings: StorageSettings = SETTINGS, peers: list[str] = PEERS) -> None:
        self.root = root
        self.store = BlobStore(root, fsync=False)
        self.disk = DiskPerformer(self.store)
        self.settings = settings
        self.core = StorageCore("s1", list(peers), settings, capacity=self.store.capacity)
        self.now = 100.0
        self.hold_writes = False
        self.held: list[WriteChunk] = []
        self.replications: list[Replicate] = []
        self.limit: dict[int, int] = {}  # upload id → the offset its sender may send up to
        self.written: dict[bytes, int] = {}  # file id → where the disk's copy ends
        self.n = 0
        self.started = self.event(Started("start"))

    # ---- the loop's part -----------------------------------------------------------------------

    def event(self, ev) -> list:
        """Handle ``ev`` and every disk answer it leads to (breadth first, like NodeLoop._dispatch)."""
        out = []
        queue = [ev]
        while queue:
            effects = self.core.handle(queue.pop(0), self.now)
            self.core.validate_state()
            for e in effects:
                out.append(e)
                queue.extend(self._perform(e))
        self.check_credit()
        return out

    def _perform(self, e) -> list:
        if isinstance(e, BeginUpload):
            return self.disk.begin(e)
        if isinstance(e, WriteChunk):
            if self.hold_writes:
                self.held.append(e)
                return []
            return self._write(e)
        if isinstance(e, FinishUpload):
            return self.disk.finish(e)
        if isinstance(e, AbortUpload):
            self.disk.abort(e)
        elif isinstance(e, ReadRange):
            return self.disk.read(e)
        elif isinstance(e, Replicate):
            self.replications.append(e)
        elif isinstance(e, Send) and isinstance(e.message, UploadReady):
            m = e.message
            self.limit[m.upload_id] = m.offset + m.credit
            self.written[self.core.uploads[m.upload_id].file_id] = m.offset
        elif isinstance(e, Send) and isinstance(e.message, UploadCredit):
            self.limit[e.message.upload_id] += e.message.credit
        return []

    def _write(self, e: WriteChunk) -> list:
        answers = self.disk.write(e)
        if answers[0].error is None:
            self.written[e.file_id] = answers[0].value
        return answers

    def release_writes(self, count: int | None = None) -> list:
        """Let the held writes reach the disk (the first ``count``, or all), answering each."""
        out = []
        take = len(self.held) if count is None else count
        for e in self.held[:take]:
            for answer in self._write(e):
                out += self.event(answer)
        del self.held[:take]
        return out

    def check_credit(self) -> None:
        for upload_id, limit in self.limit.items():
            upload = self.core.uploads.get(upload_id)
            if upload is not None and upload.state is UploadState.OPEN:
                ahead = limit - self.written[upload.file_id]
                assert ahead <= self.settings.window, f"upload {upload_id}: credit runs {ahead} bytes past the disk"

    # ---- a sender's part -----------------------------------------------------------------------

    def message(self, m, route: bytes = CLIENT) -> list:
        self.n += 1
        return self.event(MessageReceived(API, route, 7, m, f"msg-{self.n}"))

    def open(self, fid: bytes, size: int, copies: int = 1, route: bytes = CLIENT) -> list:
        upper, lower = split128(fid)
        return self.message(UploadOpen(501 + self.n, upper, lower, size, copies, "test"), route)

    def chunk(self, upload_id: int, offset: int, data: bytes, last: bool = False, route: bytes = CLIENT) -> list:
        return self.message(FileChunk(upload_id, offset, int(last), data), route)

    def read(self, fid: bytes, offset: int, length: int, route: bytes = CLIENT) -> list:
        upper, lower = split128(fid)
        return self.message(FileRequest(901 + self.n, upper, lower, offset, length), route)

    def send_rest(self, upload_id: int, data: bytes, start: int, route: bytes = CLIENT) -> list:
        """Send ``data`` from ``start`` as a well-behaved sender: chunk_max pieces within the
        credit, the last one flagged."""
        out, offset = [], start
        while True:
            n = min(self.settings.chunk_max, len(data) - offset, self.limit[upload_id] - offset)
            assert n > 0 or offset == len(data), "the sender ran out of credit"
            last = offset + n == len(data)
            out += self.chunk(upload_id, offset, data[offset:offset + n], last, route)
            offset += n
            if last:
                return out

    def upload(self, data: bytes, copies: int = 1, route: bytes = CLIENT) -> list:
        ready = one(self.open(file_id(data), len(data), copies, route), UploadReady)
        return self.send_rest(ready.upload_id, data, ready.offset, route)

    # ---- what is on disk -----------------------------------------------------------------------

    def blob_path(self, fid: bytes) -> Path:
        return self.root / "blobs" / fid.hex()[:2] / fid.hex()

    def partials(self) -> dict[bytes, int]:
        return {fid: size for fid, size, _ in self.store.partials()}


def messages(effects: list, kind: type, route: bytes | None = None) -> list:
    return [e.message for e in effects if isinstance(e, Send) and isinstance(e.message, kind)
            and (route is None or e.route == route)]


def one(effects: list, kind: type, route: bytes | None = None):
    found = messages(effects, kind, route)
    assert len(found) == 1, f"expected one {kind.__name__}, got {found} in {effects}"
    return found[0]


def of_type(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def fid_of(done: UploadDone) -> bytes:
    return join128(done.file_id_upper, done.file_id_lower)


@pytest.fixture
def h(tmp_path) -> Harness:
    harness = Harness(tmp_path / "s1")
    yield harness
    harness.core.validate_state()
    harness.store.close()


# ---- opening, credit, storing ------------------------------------------------------------------


def test_started_arms_the_expiry_timer(h):
    assert of_type(h.started, StartTimer) == [StartTimer("expire", 1.0, "start")]


def test_open_grants_a_window_of_credit(h):
    data = payload(300 * KiB)
    fid = file_id(data)
    effects = h.open(fid, len(data))
    (begin,) = of_type(effects, BeginUpload)
    assert (begin.file_id, begin.size) == (fid, len(data))
    ready = one(effects, UploadReady, CLIENT)
    assert ready.request_id == 500 + h.n and ready.offset == 0 and ready.credit == SETTINGS.window
    assert h.core.uploads[ready.upload_id].state is UploadState.OPEN
    assert h.core.counters["uploads_opened"] == 1
    assert h.partials() == {fid: 0}, "the partial exists from the open on"


def test_credit_follows_the_disk_and_never_runs_a_window_ahead(h):
    data = payload(BLOCK + 123 * KiB)  # 17 chunks of 64 KiB, the last short
    ready = one(h.open(file_id(data), len(data)), UploadReady)
    uid = ready.upload_id
    h.hold_writes = True  # a slow disk: chunks are accepted, not yet written
    offset = 0
    while offset + SETTINGS.chunk_max <= h.limit[uid]:
        effects = h.chunk(uid, offset, data[offset:offset + SETTINGS.chunk_max])
        assert not messages(effects, UploadCredit), "no credit while nothing is written"
        offset += SETTINGS.chunk_max
    assert offset == SETTINGS.window and len(h.held) == SETTINGS.window // SETTINGS.chunk_max
    # The disk catches up one write at a time: credit comes in half-window steps, each one
    # topping the grant up to one window past what is written, never more (check_credit).
    grants = []
    for _ in range(len(h.held)):
        grants += [m.credit for m in messages(h.release_writes(1), UploadCredit)]
    assert grants == [SETTINGS.window // 2, SETTINGS.window // 2]
    assert h.limit[uid] == offset + SETTINGS.window
    h.hold_writes = False
    effects = h.send_rest(uid, data, offset)
    credits = messages(effects, UploadCredit)
    assert 0 < len(credits) < len(data) // SETTINGS.chunk_max, "credit is granted per several chunks"
    done = one(effects, UploadDone)
    assert done.status == StorageStatus.OK and done.replicas == ["s1"]
    assert h.store.read(file_id(data), 0, len(data)) == data


def test_the_last_chunk_finishes_and_one_copy_is_done_at_once(h):
    data = payload(200 * KiB + 7)
    fid = file_id(data)
    effects = h.upload(data)
    finishes = of_type(effects, FinishUpload)
    assert [f.file_id for f in finishes] == [fid]
    done = one(effects, UploadDone, CLIENT)
    assert done.status == StorageStatus.OK and done.error is None
    assert done.replicas == ["s1"] and fid_of(done) == fid and done.size == len(data)
    assert not h.replications and not of_type(effects, Replicate)
    assert h.blob_path(fid).is_file() and h.store.read(fid, 0, len(data)) == data
    assert h.partials() == {}
    assert h.core.uploads == {} and h.core.by_file == {}
    c = h.core.counters
    assert (c["uploads_stored"], c["bytes_stored"], c["bytes_in"]) == (1, len(data), len(data))


def test_an_empty_file_is_one_empty_last_chunk(h):
    effects = h.upload(b"")
    assert one(effects, UploadDone).status == StorageStatus.OK
    assert h.store.size(file_id(b"")) == 0


def test_two_copies_replicate_to_the_ranked_peers_before_done(h):
    data = payload(150 * KiB, seed=2)
    fid = file_id(data)
    effects = h.upload(data, copies=2)
    assert not messages(effects, UploadDone), "not done until the second copy is durable"
    (rep,) = h.replications
    assert rep.targets == tuple(rank(fid, PEERS)) and rep.needed == 1
    assert (rep.file_id, rep.size) == (fid, len(data))
    assert h.blob_path(fid).is_file(), "stored here before it is pushed"
    h.core.validate_state()
    # while the copy is pushed, the sender hears a zero credit each second: alive, working
    (alive,) = messages(h.event(TimerFired("expire", "tick")), UploadCredit)
    assert alive.credit == 0
    effects = h.event(Replicated(rep.token, (rep.targets[0],), {}, "replicated-1"))
    done = one(effects, UploadDone, CLIENT)
    assert done.status == StorageStatus.OK and done.replicas == ["s1", rep.targets[0]]
    assert h.core.counters["replications"] == 1 and h.core.uploads == {}


def test_replication_that_stores_nowhere_fails_clearly(h):
    data = payload(10 * KiB, seed=3)
    h.upload(data, copies=3)
    (rep,) = h.replications
    assert rep.needed == 2 and set(rep.targets) == set(PEERS)
    failed = {"s2": "storage node s2 at tcp://x is not reachable; is it running?", "s3": "no space"}
    effects = h.event(Replicated(rep.token, ("s2",), {"s3": failed["s3"]}, "replicated-1"))
    done = one(effects, UploadDone, CLIENT)
    assert done.status == StorageStatus.REPLICATION_FAILED
    assert done.replicas == ["s1", "s2"]
    assert "3 copies" in done.error and "s3: no space" in done.error and "not registered" in done.error
    assert any(e.level >= 30 for e in of_type(effects, Log))
    assert h.core.counters["replications_failed"] == 1 and h.core.uploads == {}

    # nothing stored anywhere else: the reason says so
    data2 = payload(10 * KiB, seed=4)
    h.upload(data2, copies=2)
    rep2 = h.replications[-1]
    done2 = one(h.event(Replicated(rep2.token, (), failed, "replicated-2")), UploadDone)
    assert done2.status == StorageStatus.REPLICATION_FAILED and done2.replicas == ["s1"]
    assert "2 copies" in done2.error and "s2: storage node s2" in done2.error


def test_a_stale_replicated_answer_is_ignored(h):
    assert h.event(Replicated(12345, ("s2",), {}, "late")) == []


def test_dedupe_answers_at_once_without_chunks(h):
    data = payload(100 * KiB, seed=5)
    fid = h.store.put_bytes(data)
    effects = h.open(fid, len(data))
    done = one(effects, UploadDone, CLIENT)
    assert done.status == StorageStatus.OK and done.replicas == ["s1"]
    assert not messages(effects, UploadReady) and not of_type(effects, WriteChunk)
    assert h.core.counters["dedupes"] == 1 and h.core.uploads == {}
    # with two copies the peers are still asked (they dedupe too, if they have it)
    effects = h.open(fid, len(data), copies=2)
    assert not messages(effects, UploadDone)
    assert h.replications[-1].targets == tuple(rank(fid, PEERS))


def test_dedupe_with_another_size_is_refused(h):
    data = payload(1000, seed=6)
    fid = h.store.put_bytes(data)
    done = one(h.open(fid, len(data) + 1), UploadDone)
    assert done.status == StorageStatus.SIZE_MISMATCH and "1000 bytes" in done.error


def test_an_interrupted_upload_resumes_where_its_partial_ends(h):
    data = payload(BLOCK + 5, seed=7)
    fid = file_id(data)
    uid = one(h.open(fid, len(data)), UploadReady).upload_id
    for i in range(3):
        h.chunk(uid, i * SETTINGS.chunk_max, data[i * SETTINGS.chunk_max:(i + 1) * SETTINGS.chunk_max])
    h.now += SETTINGS.idle_timeout + 1  # the sender went away
    expired = one(h.event(TimerFired("expire", "t-1")), UploadDone, CLIENT)
    assert expired.status == StorageStatus.UNKNOWN_UPLOAD
    assert h.partials() == {fid: 3 * SETTINGS.chunk_max}
    ready = one(h.open(fid, len(data), route=OTHER), UploadReady, OTHER)
    assert ready.offset == 3 * SETTINGS.chunk_max and ready.credit == SETTINGS.window
    assert h.core.counters["uploads_resumed"] == 1
    done = one(h.send_rest(ready.upload_id, data, ready.offset, OTHER), UploadDone, OTHER)
    assert done.status == StorageStatus.OK
    assert h.store.read(fid, 0, len(data)) == data and h.partials() == {}


# ---- bad input: each ends the upload with a clear status and a counter; nothing is stored ---------


def bad_chunk_cases():
    cm, win = SETTINGS.chunk_max, SETTINGS.window
    cases = [
        # name, file size, chunks sent first (offset, n), the bad chunk (offset, n or bytes, last), status, words
        ("over_chunk_max", 400 * KiB, [], (0, cm + 1, False), StorageStatus.TOO_LARGE, "limit is"),
        ("wrong_offset_ahead", 400 * KiB, [(0, cm)], (cm + 1, 10, False), StorageStatus.BAD_OFFSET, "stands at"),
        ("wrong_offset_repeat", 400 * KiB, [(0, cm), (cm, cm)], (cm, cm, False), StorageStatus.BAD_OFFSET, "stands at"),
        ("more_than_size", 1000, [(0, 600)], (600, 401, False), StorageStatus.SIZE_MISMATCH, "1000-byte file"),
        ("more_than_size_last", 1000, [], (0, 1001, True), StorageStatus.SIZE_MISMATCH, "1000-byte file"),
        ("last_chunk_short", 1000, [(0, 600)], (600, 399, True), StorageStatus.SIZE_MISMATCH, "has 1000 bytes"),
        ("empty_last_short", 3 * win, [(0, cm)], (cm, 0, True), StorageStatus.SIZE_MISMATCH, "has"),
    ]
    return [pytest.param(*case, id=case[0]) for case in cases]


@pytest.mark.parametrize("name, size, before, bad, status, words", bad_chunk_cases())
def test_a_bad_chunk_ends_the_upload_clearly(h, name, size, before, bad, status, words):
    data = payload(size, seed=8)
    fid = file_id(data)
    uid = one(h.open(fid, size), UploadReady).upload_id
    for offset, n in before:
        assert not messages(h.chunk(uid, offset, data[offset:offset + n]), UploadDone)
    offset, n, last = bad
    effects = h.chunk(uid, offset, payload(n, seed=9), last)
    done = one(effects, UploadDone, CLIENT)
    assert done.status == status and words in done.error, done.error
    assert done.upload_id == uid and fid_of(done) == fid
    assert of_type(effects, AbortUpload) == [AbortUpload(fid, True)], "the partial is kept for a resume"
    assert not of_type(effects, WriteChunk)
    c = h.core.counters
    assert c["chunks_refused"] == 1 and c[f"refused.{status.name}"] == 1
    assert h.core.uploads == {} and not h.store.has(fid)
    assert h.partials() == {fid: sum(n for _, n in before)}
    # the sender's next chunk finds no upload; an open resumes from the partial
    assert one(h.chunk(uid, 0, b"x"), UploadDone).status == StorageStatus.UNKNOWN_UPLOAD
    assert one(h.open(fid, size), UploadReady).offset == sum(n for _, n in before)


def test_a_chunk_beyond_the_credit_is_refused(h):
    data = payload(2 * SETTINGS.window, seed=10)
    fid = file_id(data)
    uid = one(h.open(fid, len(data)), UploadReady).upload_id
    h.hold_writes = True
    cm = SETTINGS.chunk_max
    for offset in range(0, SETTINGS.window, cm):
        assert not messages(h.chunk(uid, offset, data[offset:offset + cm]), UploadDone)
    effects = h.chunk(uid, SETTINGS.window, data[SETTINGS.window:SETTINGS.window + 1])
    done = one(effects, UploadDone, CLIENT)
    assert done.status == StorageStatus.NO_CREDIT and "UPLOAD_CREDIT" in done.error
    assert h.core.counters["refused.NO_CREDIT"] == 1 and h.core.uploads == {}
    assert h.release_writes() == [], "writes that land after the end are ignored"
    assert not h.store.has(fid)


def test_without_a_slow_disk_credit_is_only_exceeded_by_chunks_over_half_a_window(tmp_path):
    """The node grants as it writes, and writes before it reads the next message: a sender that
    ignores credit is caught only when one chunk outruns the half window still granted."""
    settings = StorageSettings(window=256 * KiB, chunk_max=512 * KiB)
    h = Harness(tmp_path / "s1", settings)
    data = payload(BLOCK, seed=11)
    uid = one(h.open(file_id(data), len(data)), UploadReady).upload_id
    for offset in range(0, 512 * KiB, 128 * KiB):  # never reading UPLOAD_CREDIT
        assert not messages(h.chunk(uid, offset, data[offset:offset + 128 * KiB]), UploadDone)
    done = one(h.chunk(uid, 512 * KiB, data[512 * KiB:512 * KiB + 300 * KiB]), UploadDone)
    assert done.status == StorageStatus.NO_CREDIT
    h.store.close()


def test_unknown_upload_ids_and_other_senders_uploads(h):
    done = one(h.chunk(777, 0, b"abc"), UploadDone, CLIENT)
    assert done.status == StorageStatus.UNKNOWN_UPLOAD and done.upload_id == 777
    assert "open it again" in done.error
    data = payload(100 * KiB, seed=12)
    uid = one(h.open(file_id(data), len(data)), UploadReady).upload_id
    effects = h.chunk(uid, 0, data[:1000], route=OTHER)
    assert one(effects, UploadDone, OTHER).status == StorageStatus.UNKNOWN_UPLOAD
    assert not messages(effects, UploadDone, CLIENT) and not of_type(effects, AbortUpload)
    assert h.core.counters["chunks_unknown_upload"] == 2
    # the owner's upload is untouched by the stranger
    assert one(h.send_rest(uid, data, 0), UploadDone, CLIENT).status == StorageStatus.OK


def test_content_that_is_not_its_id_is_discarded(h):
    data = payload(BLOCK + 10, seed=13)
    fid = file_id(data)
    wrong = bytearray(data)
    wrong[BLOCK + 3] ^= 1
    uid = one(h.open(fid, len(data)), UploadReady).upload_id
    effects = h.send_rest(uid, bytes(wrong), 0)
    done = one(effects, UploadDone, CLIENT)
    assert done.status == StorageStatus.HASH_MISMATCH and "discarded" in done.error
    assert h.core.counters["uploads_failed.HASH_MISMATCH"] == 1
    assert not h.store.has(fid) and h.partials() == {}, "bad bytes are not kept for a resume"
    assert h.core.uploads == {} and h.core.by_file == {}


@pytest.mark.parametrize("copies, words", [(0, "at least 1"), (4, "only 3 storage nodes")])
def test_impossible_copies_are_refused_before_the_disk(h, copies, words):
    data = payload(10, seed=14)
    effects = h.open(file_id(data), len(data), copies)
    done = one(effects, UploadDone, CLIENT)
    assert done.status == StorageStatus.BAD_REQUEST and words in done.error
    assert not of_type(effects, BeginUpload) and h.partials() == {}
    assert h.core.counters["uploads_refused"] == 1 and h.core.uploads == {}


def test_too_many_open_uploads_are_refused_as_retryable(h):
    for i in range(SETTINGS.max_uploads):
        data = payload(100, seed=100 + i)
        one(h.open(file_id(data), len(data)), UploadReady)
    done = one(h.open(file_id(b"one more"), 8), UploadDone)
    assert done.status == StorageStatus.UNKNOWN_UPLOAD and "retry" in done.error


def test_a_message_a_storage_node_does_not_take_is_refused(h):
    (refuse,) = h.message(UploadCredit(1, 100))
    assert isinstance(refuse, Refuse) and refuse.route == CLIENT and "UploadCredit" in refuse.detail


# ---- time: idle uploads expire, the partial stays --------------------------------------------------


def test_an_idle_upload_expires_on_the_timer_and_keeps_its_partial(h):
    data = payload(300 * KiB, seed=15)
    fid = file_id(data)
    uid = one(h.open(fid, len(data)), UploadReady).upload_id
    h.now += 2.0
    h.chunk(uid, 0, data[:SETTINGS.chunk_max])
    h.now += SETTINGS.idle_timeout  # exactly the timeout since the chunk: not yet
    effects = h.event(TimerFired("expire", "t-1"))
    assert effects == [StartTimer("expire", 1.0, "t-1")] and uid in h.core.uploads
    h.now += 0.5
    effects = h.event(TimerFired("expire", "t-2"))
    done = one(effects, UploadDone, CLIENT)
    assert done.status == StorageStatus.UNKNOWN_UPLOAD and "kept" in done.error
    assert AbortUpload(fid, True) in effects and StartTimer("expire", 1.0, "t-2") in effects
    assert h.core.counters["uploads_expired"] == 1 and h.core.uploads == {}
    assert h.partials() == {fid: SETTINGS.chunk_max} and not h.store.has(fid)
    assert one(h.chunk(uid, SETTINGS.chunk_max, data[SETTINGS.chunk_max:2 * SETTINGS.chunk_max]),
               UploadDone).status == StorageStatus.UNKNOWN_UPLOAD


def test_a_second_open_of_the_same_file_supersedes_the_first(h):
    data = payload(400 * KiB, seed=16)
    fid = file_id(data)
    first = one(h.open(fid, len(data)), UploadReady).upload_id
    h.chunk(first, 0, data[:SETTINGS.chunk_max])
    effects = h.open(fid, len(data), route=OTHER)
    assert any("superseded" in e.text for e in of_type(effects, Log))
    second = one(effects, UploadReady, OTHER)
    assert second.upload_id != first and second.offset == SETTINGS.chunk_max
    assert h.core.counters["uploads_superseded"] == 1
    late = one(h.chunk(first, SETTINGS.chunk_max, data[SETTINGS.chunk_max:2 * SETTINGS.chunk_max]), UploadDone, CLIENT)
    assert late.status == StorageStatus.UNKNOWN_UPLOAD
    assert one(h.send_rest(second.upload_id, data, second.offset, OTHER), UploadDone, OTHER).status == StorageStatus.OK
    assert h.store.read(fid, 0, len(data)) == data


def test_an_open_while_the_file_is_replicating_waits_its_turn(h):
    data = payload(50 * KiB, seed=17)
    fid = file_id(data)
    h.upload(data, copies=2)
    (rep,) = h.replications
    done = one(h.open(fid, len(data), copies=2, route=OTHER), UploadDone, OTHER)
    assert done.status == StorageStatus.UNKNOWN_UPLOAD and "retry" in done.error
    finished = one(h.event(Replicated(rep.token, ("s2",), {}, "r")), UploadDone, CLIENT)
    assert finished.status == StorageStatus.OK and finished.replicas == ["s1", "s2"]


# ---- reads ---------------------------------------------------------------------------------------


def response(effects) -> FileResponse:
    return one(effects, FileResponse, CLIENT)


def test_reads_give_bytes_or_a_clear_status(h):
    data = payload(BLOCK + 1000, seed=18)
    fid = h.store.put_bytes(data)
    r = response(h.read(fid, 10, 1000))
    assert r.status == StorageStatus.OK and bytes(r.payload) == data[10:1010] and r.file_size == len(data)
    assert r.request_id == 900 + h.n and r.offset == 10
    r = response(h.read(fid, len(data) - 5, 100))
    assert bytes(r.payload) == data[-5:], "clipped at the end, like pread"
    assert bytes(response(h.read(fid, len(data), 10)).payload) == b""
    r = response(h.read(fid, len(data) + 1, 10))
    assert r.status == StorageStatus.OUT_OF_RANGE and r.file_size == len(data) and str(len(data)) in r.error
    r = response(h.read(file_id(b"never stored"), 0, 10))
    assert r.status == StorageStatus.NOT_FOUND and r.file_size == 0 and "not stored here" in r.error
    effects = h.read(fid, 0, SETTINGS.read_max + 1)
    r = response(effects)
    assert r.status == StorageStatus.TOO_LARGE and "read in pieces" in r.error and not of_type(effects, ReadRange)
    c = h.core.counters
    assert (c["reads"], c["reads_out_of_range"], c["reads_not_found"], c["reads_refused"]) == (3, 1, 1, 1)
    assert c["bytes_out"] == 1005


def test_a_corrupt_block_is_reported_not_served(h):
    data = payload(BLOCK + 1000, seed=19)
    fid = h.store.put_bytes(data)
    assert response(h.read(fid, 0, 100)).status == StorageStatus.OK  # its fd is cached now
    path = h.blob_path(fid)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 0x40]))
    r = response(h.read(fid, 0, 100))
    assert r.status == StorageStatus.CORRUPT and "block 0" in r.error and r.payload in (b"", None)
    assert r.file_size == len(data)
    assert h.core.counters["reads_corrupt"] == 1
    # the other block still verifies and is served
    assert bytes(response(h.read(fid, BLOCK, 1000)).payload) == data[BLOCK:]


def test_status_reports_the_counters_and_settings(h):
    h.upload(payload(1000, seed=20))
    s = h.core.status(h.now)
    assert s["name"] == "s1" and s["peers"] == PEERS and s["uploads_open"] == 0
    assert s["settings"]["window"] == SETTINGS.window and s["core"]["uploads_stored"] == 1
    assert s["disk"]["blobs"] == 1


# ---- pure functions -------------------------------------------------------------------------------


def test_rank_is_a_deterministic_permutation():
    nodes = [f"s{i}" for i in range(1, 8)]
    firsts = set()
    for i in range(300):
        fid = hashlib.blake2b(str(i).encode(), digest_size=16).digest()
        order = rank(fid, nodes)
        assert sorted(order) == sorted(nodes)
        assert order == rank(fid, list(reversed(nodes))) == rank(fid, tuple(nodes))
        # a node's peers are ranked as everyone is, minus itself: the replicator, the client and
        # the repairer agree on where a file belongs
        for me in nodes:
            assert rank(fid, [n for n in nodes if n != me]) == [n for n in order if n != me]
        firsts.add(order[0])
    assert firsts == set(nodes), "every node is first for some files"
    assert rank(b"\0" * 16, []) == []


def test_collectable_takes_only_old_blobs_the_ledger_does_not_know():
    now, grace = 1000.0, 60.0
    a, b, c, d = (bytes([i]) * 16 for i in range(4))
    blobs = [(a, now - 100), (b, now - 100), (c, now - 10), (d, now - 100)]
    known = {a.hex(): None, b.hex(): {"size": 1, "replicas": ["s1"]}, c.hex(): None}  # d: no answer
    assert collectable(blobs, known, now, grace) == [a]
    assert collectable(blobs, {}, now, grace) == [], "no answer from the ledger: delete nothing"
    assert collectable([(a, now - grace)], {a.hex(): None}, now, grace) == [], "exactly the grace: kept"


def test_rate_limit_allows_a_burst_then_paces_reads():
    limit = RateLimit(rate=100.0, burst=1000.0)
    assert limit.delay(500, 0.0) == 0.0
    assert limit.delay(500, 0.0) == 0.0
    assert limit.delay(500, 0.0) == pytest.approx(5.0)
    assert limit.delay(0, 5.0) == 0.0, "the wait paid the debt"
    assert limit.delay(1000, 1e6) == 0.0, "a long pause refills up to the burst only"
    assert limit.delay(200, 1e6) == pytest.approx(2.0)


def test_settings_from_the_config():
    assert settings_of(StorageOptions()) == StorageSettings()
    assert settings_of(StorageOptions(window_mb=1, idle_timeout_s=1.5)) == StorageSettings(window=1 << 20, idle_timeout=1.5)

# ---- faults the review found ----------------------------------------------------------------


def test_a_disk_that_fails_mid_upload_ends_that_upload_with_io_error_and_nothing_else(h, monkeypatch):
    import errno

    data = payload(300 * KiB, seed=40)
    fid = file_id(data)
    upload_id = one(h.open(fid, len(data)), UploadReady).upload_id

    def broken(*_a, **_k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(h.store, "write", broken)
    done = one(h.chunk(upload_id, 0, data[:KiB]), UploadDone, CLIENT)
    assert done.status == StorageStatus.IO_ERROR and "try another node" in done.error
    assert h.core.uploads == {} and not h.partials() and not h.store.has(fid)
    monkeypatch.undo()
    assert one(h.upload(data), UploadDone, CLIENT).status == StorageStatus.OK  # the node goes on


def test_a_chunk_without_a_payload_is_refused_clearly(h):
    data = payload(10 * KiB, seed=41)
    fid = file_id(data)
    upload_id = one(h.open(fid, len(data)), UploadReady).upload_id
    done = one(h.chunk(upload_id, 0, None), UploadDone, CLIENT)
    assert done.status == StorageStatus.BAD_REQUEST and "without a payload" in done.error


def test_an_open_with_another_size_does_not_supersede_a_running_upload(h):
    data = payload(200 * KiB, seed=42)
    fid = file_id(data)
    first = one(h.open(fid, len(data)), UploadReady).upload_id
    refused = one(h.open(fid, len(data) + 1, route=OTHER), UploadDone, OTHER)
    assert refused.status == StorageStatus.SIZE_MISMATCH and h.core.uploads[first].route == CLIENT
    assert one(h.send_rest(first, data, 0, CLIENT), UploadDone, CLIENT).status == StorageStatus.OK


def test_the_collector_spares_a_blob_a_dedupe_touched_after_it_looked(h):
    import os

    data = payload(5 * KiB, seed=43)
    fid = h.store.put_bytes(data)
    path = h.blob_path(fid)
    os.utime(path, (1000.0, 1000.0))  # old: past any grace
    cutoff = 2000.0
    assert h.store.touch(fid)  # a dedupe now
    assert not h.store.delete_if_older(fid, cutoff) and h.store.has(fid)
    os.utime(path, (1000.0, 1000.0))
    assert h.store.delete_if_older(fid, cutoff) and not h.store.has(fid)


def test_upload_states_move_only_along_the_table():
    assert set(UPLOAD_TRANSITIONS) == set(UploadState)
    for start in UploadState:
        for to in UploadState:
            upload = Upload(7, b"\x01" * 16, 10, 1, None, 1, "client")
            upload.state = start
            if to in UPLOAD_TRANSITIONS[start]:
                upload.move(to)
                assert upload.state is to
            else:
                with pytest.raises(AssertionError, match="no transition"):
                    upload.move(to)
                assert upload.state is start
