"""A client's download moves to the next replica and keeps what it has (cluster/readplan.py, and
the loop in cluster/files.py driven through a fake link): no sockets, no clock, no sleeps.

The plan is pushed events as the loop pushes them (a replica sized the file, a chunk arrived, a
replica failed) and asked which replica comes next; ``validate_state`` runs after every step.
The loop's tests put a ``FakeLink`` in place of ``StorageLink``: it serves a file from memory,
chunk by chunk, and fails after a set number of chunks the way a silent node fails (a
TransferError with no status), so what each replica served is counted exactly.
"""

from __future__ import annotations

import random

import pytest

import cluster.files as files
from cluster.files import DownloadFailed, download_file
from cluster.node.masterlink import Answer, ClusterError
from cluster.node.storagelink import TransferError
from cluster.readplan import ReadPlan
from proto.errors import StorageStatus
from proto.fileids import file_id

SILENT = None  # the status of a replica that did not answer


def plan_of(sources=("s1", "s2"), size: int | None = 10, chunk: int = 2) -> ReadPlan:
    return ReadPlan(list(sources), chunk, size=size)


def take(plan: ReadPlan, node: str, *offsets: int) -> None:
    for at in offsets:
        plan.received(node, at, min(plan.chunk, plan.size - at))
        plan.validate_state()


# ---- the plan --------------------------------------------------------------------------------


def test_a_failed_replica_is_left_for_the_next_which_is_asked_only_for_what_is_missing():
    plan = plan_of()
    assert plan.next_source() == "s1"
    assert plan.sized("s1", 10)
    take(plan, "s1", 0, 4, 2)  # out of order, as a window answers
    plan.failed("s1", "did not answer within 2 s", SILENT)
    plan.validate_state()
    assert plan.next_source() == "s2"
    assert plan.held == 6 and plan.missing() == [6, 8]
    take(plan, "s2", 6, 8)
    assert plan.complete and plan.senders == {"s1", "s2"}


def test_a_full_round_without_a_chunk_gives_up_and_says_a_retry_may_help():
    plan = plan_of(("s1", "s2", "s3"))
    for node in ("s1", "s2", "s3"):
        assert plan.next_source() == node
        plan.failed(node, "not reachable", SILENT)
        plan.validate_state()
    assert plan.next_source() is None
    assert plan.outcome() == (None, True)


def test_a_chunk_starts_a_new_round_so_a_replica_that_failed_before_is_asked_again():
    plan = plan_of()
    assert plan.next_source() == "s1"
    plan.failed("s1", "silent", SILENT)
    assert plan.next_source() == "s2"
    take(plan, "s2", 0, 2)
    plan.failed("s2", "silent", SILENT)
    assert plan.next_source() == "s1"  # it may be back; s2 has just failed
    plan.failed("s1", "silent", SILENT)
    assert plan.next_source() is None  # both failed since the last chunk
    assert plan.held == 4


def test_a_replica_that_lacks_the_file_is_not_asked_again():
    plan = plan_of()
    assert plan.next_source() == "s1"
    plan.failed("s1", "NOT_FOUND", StorageStatus.NOT_FOUND)
    assert plan.next_source() == "s2"
    take(plan, "s2", 0)
    plan.failed("s2", "silent", SILENT)
    assert plan.next_source() is None  # s1 would only say NOT_FOUND again
    assert plan.outcome() == (None, True)


def test_when_no_replica_has_the_file_the_outcome_is_not_found_and_not_retryable():
    plan = plan_of(size=None)
    while (node := plan.next_source()) is not None:
        plan.failed(node, "NOT_FOUND", StorageStatus.NOT_FOUND)
    assert plan.outcome() == (StorageStatus.NOT_FOUND, False)


def test_a_corrupt_block_leaves_the_replica_in_the_turn_for_the_rest():
    plan = plan_of()
    assert plan.next_source() == "s1"
    take(plan, "s1", 0)
    plan.failed("s1", "CORRUPT", StorageStatus.CORRUPT)
    assert plan.next_source() == "s2"
    take(plan, "s2", 2)
    plan.failed("s2", "silent", SILENT)
    assert plan.next_source() == "s1"


def test_the_first_size_is_the_size_and_a_replica_that_disagrees_is_ruled_out():
    plan = plan_of(size=None)
    assert plan.next_source() == "s1"
    assert plan.sized("s1", 10) and plan.size == 10
    plan.failed("s1", "silent", SILENT)
    assert plan.next_source() == "s2"
    assert not plan.sized("s2", 12)
    plan.validate_state()
    assert "s2" in plan.gone and plan.failures["s2"].status == StorageStatus.SIZE_MISMATCH
    # the ledger's size, when it knows the file, is the size from the start
    assert not plan_of(size=10).sized("s1", 8)


def test_a_file_from_one_replica_that_does_not_match_its_id_rules_that_replica_out():
    plan = plan_of()
    assert plan.next_source() == "s1"
    take(plan, "s1", 0, 2, 4, 6, 8)
    assert plan.rejected() == 10
    plan.validate_state()
    assert plan.held == 0 and "s1" in plan.gone
    assert plan.next_source() == "s2"
    take(plan, "s2", 0, 2, 4, 6, 8)
    assert plan.rejected() == 10
    assert plan.next_source() is None
    assert plan.outcome() == (StorageStatus.HASH_MISMATCH, False)


def test_a_mixed_file_that_does_not_match_rules_out_no_one_and_mismatches_are_bounded():
    plan = plan_of()
    for _ in range(2):
        node = plan.next_source()
        take(plan, node, 0, 2)
        plan.failed(node, "silent", SILENT)
        other = plan.next_source()
        take(plan, other, 4, 6, 8)
        assert plan.rejected() == 10 and not plan.gone
    assert plan.next_source() is None  # as many mismatches as replicas
    assert plan.outcome()[1] is False


def test_a_chunk_that_is_not_one_of_the_files_is_refused():
    plan = plan_of()
    with pytest.raises(ValueError):
        plan.received("s1", 1, 2)
    with pytest.raises(ValueError):
        plan.received("s1", 8, 1)  # the last chunk is 2 bytes


@pytest.mark.parametrize("seed", range(200))
def test_any_run_of_failures_ends_complete_or_with_every_replica_failed_since_the_last_chunk(seed):
    rng = random.Random(seed)
    sources = [f"s{k}" for k in range(rng.randint(1, 4))]
    plan = plan_of(sources, size=rng.randint(1, 40), chunk=rng.choice([1, 3, 8]))
    gone_for_good = {n for n in sources if rng.random() < 0.2}
    asked, bound = 0, len(sources) * (len(plan.missing()) + 1)  # a round without a chunk ends it
    while not plan.complete and (node := plan.next_source()) is not None:
        asked += 1
        assert asked <= bound, "the plan does not end"
        if node in gone_for_good:
            plan.failed(node, "NOT_FOUND", StorageStatus.NOT_FOUND)
            continue
        for at in plan.missing():
            if rng.random() < 0.3:
                break
            take(plan, node, at)
        if not plan.complete:
            plan.failed(node, "silent", rng.choice([SILENT, StorageStatus.CORRUPT]))
        plan.validate_state()
    if not plan.complete:
        live = [n for n in sources if n not in plan.gone]
        assert set(live) <= plan.failed_since_progress
        assert plan.outcome()[1] is bool(live)


# ---- the loop (cluster/files.py) through a fake link ------------------------------------------

CHUNK = files.CHUNK
DATA = random.Random(7).randbytes(5 * CHUNK + 1234)
FID = file_id(DATA)


class FakeLink:
    """A replica serving ``DATA`` (or ``serves[node]``), failing after ``budget[node]`` chunks."""

    served: dict[str, list[int]] = {}
    budget: dict[str, int] = {}
    serves: dict[str, bytes] = {}
    status: dict[str, int | None] = {}

    def __init__(self, address: str, *, name: str, timeout: float, credentials) -> None:
        self.name, self.data = name, self.serves.get(name, DATA)

    def __enter__(self) -> "FakeLink":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _spend(self) -> None:
        left = self.budget.get(self.name, 1 << 30)
        if left <= 0:
            raise TransferError(f"storage node {self.name} did not answer", self.status.get(self.name), self.name)
        self.budget[self.name] = left - 1

    def size(self, fid: bytes) -> int:
        if self.status.get(self.name) == StorageStatus.NOT_FOUND:
            raise TransferError("NOT_FOUND", StorageStatus.NOT_FOUND, self.name)
        return len(self.data)

    def download(self, fid: bytes, write_at, *, have=()) -> int:
        for at in range(0, len(self.data), CHUNK):
            if at not in have:
                self._spend()
                self.served.setdefault(self.name, []).append(at)
                write_at(at, memoryview(self.data)[at:at + CHUNK])
        return len(self.data)


class Masters:
    credentials = None

    def __init__(self, replicas=("s1", "s2"), size: int | None = len(DATA), fid: bytes = FID) -> None:
        self.fid, self.record = fid, {"size": size, "replicas": list(replicas)}

    def lookup_files(self, fids):
        return Answer({self.fid.hex(): self.record}, False, 1, "m1")


STORAGE = {"s1": "tcp://s1", "s2": "tcp://s2"}


@pytest.fixture
def link(monkeypatch):
    monkeypatch.setattr(files, "StorageLink", FakeLink)
    monkeypatch.setattr(files, "rank", lambda fid, nodes: sorted(nodes))  # s1 first
    FakeLink.served, FakeLink.budget, FakeLink.serves, FakeLink.status = {}, {}, {}, {}
    return FakeLink


def test_a_download_cut_off_mid_way_resumes_from_the_other_replica(link, tmp_path):
    link.budget["s1"] = 3
    moved = []
    out = tmp_path / "out"
    assert download_file(Masters(), STORAGE, FID, out, progress=moved.append) == len(DATA)
    assert out.read_bytes() == DATA and not (tmp_path / "out.part").exists()
    assert link.served == {"s1": [0, CHUNK, 2 * CHUNK], "s2": [3 * CHUNK, 4 * CHUNK, 5 * CHUNK]}
    assert sum(moved) == len(DATA) and all(n > 0 for n in moved)  # nothing taken back


def test_when_every_replica_fails_the_error_is_typed_and_no_partial_file_is_left(link, tmp_path):
    link.budget.update(s1=2, s2=1)
    out = tmp_path / "out"
    with pytest.raises(DownloadFailed) as raised:
        download_file(Masters(), STORAGE, FID, out, progress=None)
    assert isinstance(raised.value, ClusterError)
    assert raised.value.status is None and raised.value.retryable
    assert raised.value.failures == {"s1": None, "s2": None}
    assert sorted(sum(link.served.values(), [])) == [0, CHUNK, 2 * CHUNK]  # s1 was asked again after s2's chunk
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_file_no_replica_holds_is_not_found_and_not_retryable(link, tmp_path):
    link.status.update(s1=StorageStatus.NOT_FOUND, s2=StorageStatus.NOT_FOUND)
    with pytest.raises(DownloadFailed) as raised:
        download_file(Masters(), STORAGE, FID, tmp_path / "out", progress=None)
    assert raised.value.status == StorageStatus.NOT_FOUND and not raised.value.retryable
    assert list(tmp_path.iterdir()) == []


def test_a_replica_serving_wrong_bytes_is_ruled_out_and_the_file_fetched_again(link, tmp_path):
    link.serves["s1"] = DATA[:-1] + bytes([DATA[-1] ^ 1])
    moved = []
    out = tmp_path / "out"
    assert download_file(Masters(), STORAGE, FID, out, progress=moved.append) == len(DATA)
    assert out.read_bytes() == DATA
    assert -len(DATA) in moved and sum(moved) == len(DATA)


def test_an_empty_file_the_ledger_knows_is_written_without_asking_a_replica(link, tmp_path):
    out = tmp_path / "empty"
    assert download_file(Masters(size=0, fid=file_id(b"")), STORAGE, file_id(b""), out, progress=None) == 0
    assert out.read_bytes() == b"" and link.served == {}
