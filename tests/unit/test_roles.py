"""Authorisation by role, in the cores (no sockets): for every core, every message type it takes
and every role, a key of a role that may not send it there gets one ``Forbidden`` (the loop logs
it once, counts it and answers nothing) and the core changes nothing. The roles that may are let
through. A worker registers only under its own key's name; a result counts only from the worker
its task was sent to."""

from __future__ import annotations

import json

import pytest

from balancer.core import MASTERS_ONLY, PEER_IN, SOCKET_ROLES, WORKERS
from balancer.masters import master_socket
from cluster.node.events import PEOPLE, READERS, Forbidden, MessageReceived, Peer, StartTimer, authorise
from cluster.node.keys import ROLES
from master.core import ROLES as MASTER_ROLES
from master.core import roles_for
from master.standing import API
from proto.ids import join128, split128
from proto.messages import (CancelJob, Error, FileList, FileRegister, FileRelease, JobList, JobQuery, QueryReply,
                            StatusQuery, Submit, SubmitAck, TaskQuery, TaskResult, Watch, Work, WorkerStatus)
from storage.core import _HANDLERS as STORAGE_TYPES
from storage.core import STORE_AND_READ
from worker.core import BALANCERS_ONLY, balancer_socket

from .test_balancer_core import JOB, active
from .test_balancer_core import Harness as BalancerHarness
from .test_codec import SAMPLES
from .test_master_core import CLIENT
from .test_master_core import Harness as MasterHarness
from .test_storage_core import Harness as StorageHarness
from .test_worker_core import Harness as WorkerHarness

MESSAGES = [cls for cls in SAMPLES if cls is not StatusQuery]  # the loop answers STATUS_QUERY itself


def snapshot(core, now: float) -> str:
    # "disk" is the machine's free space, not the core's state: other processes change it
    return json.dumps({k: v for k, v in core.status(now).items() if k != "disk"}, sort_keys=True, default=repr)


def forbidden_only(effects: list, peer: Peer) -> bool:
    """One Forbidden for ``peer`` and nothing else (but the balancer's placement timer, which it
    starts after any message it handles while serving: a pass over an unchanged state)."""
    effects = [e for e in effects if not (isinstance(e, StartTimer) and e.name == "place")]
    return len(effects) == 1 and isinstance(effects[0], Forbidden) and effects[0].peer == peer


def registration(name: str) -> WorkerStatus:
    return WorkerStatus(2, 2, 0, 0, [], {"cores": 2, "memory_mb": 1024}, name, True, 0, [], [], [])


def test_the_role_groups():
    assert PEOPLE == {"client", "operator", "gateway"} and READERS == PEOPLE | {"monitor"}
    assert set(ROLES) == PEOPLE | {"monitor", "master", "balancer", "storage", "worker"}


@pytest.mark.parametrize("cls", sorted(MASTER_ROLES, key=lambda c: c.code), ids=lambda c: c.__name__)
def test_a_master_lets_through_only_the_roles_that_may_send_each_message(cls):
    for role in ROLES:
        h = MasterHarness()
        message = SAMPLES[cls]
        peer = Peer(f"key-{role}", role)
        before = snapshot(h.core, h.now)
        effects = h.core.handle(MessageReceived(API, CLIENT, 7, message, "m1", peer), h.now)
        if role in roles_for(message):
            assert not any(isinstance(e, Forbidden) for e in effects), (role, effects)
        else:
            assert forbidden_only(effects, peer), (role, effects)
            assert snapshot(h.core, h.now) == before


def test_who_may_send_what_to_a_master():
    assert MASTER_ROLES[TaskResult] == {"balancer"}  # never a worker or a client directly
    assert not any("worker" in MASTER_ROLES[cls] for cls in MASTER_ROLES if cls.__name__ not in ("FileLookup", "FileList"))
    read = Work(1, "summary", "", None, None)
    write = Work(1, "add_spec", "", {"name": "s"}, None)
    assert "monitor" in roles_for(read) and "monitor" not in roles_for(write)


@pytest.mark.parametrize("socket", [WORKERS, PEER_IN, master_socket(0)])
def test_a_balancer_lets_through_only_the_role_each_socket_is_for(socket):
    allowed = SOCKET_ROLES.get(socket, MASTERS_ONLY)
    h = BalancerHarness()
    for role in ROLES:
        peer = Peer(f"key-{role}", role)
        for cls in MESSAGES:
            before = snapshot(h.core, h.now)
            effects = h.core.handle(MessageReceived(socket, b"r", 1, SAMPLES[cls], "m", peer), h.now)
            if role in allowed:
                assert not forbidden_only(effects, peer) or cls is WorkerStatus, (role, cls, effects)
            else:
                assert forbidden_only(effects, peer), (role, cls, effects)
                assert snapshot(h.core, h.now) == before


def test_a_worker_key_registers_only_under_its_own_name():
    h = active()
    status = registration("w2")
    effects = h.core.handle(MessageReceived(WORKERS, b"r1", 1, status, "m", Peer("w1", "worker")), h.now)
    assert forbidden_only(effects, Peer("w1", "worker"))
    assert h.core.status(h.now)["registry"]["workers"] == 0
    effects = h.core.handle(MessageReceived(WORKERS, b"r1", 1, status, "m", Peer("w2", "worker")), h.now)
    assert not any(isinstance(e, Forbidden) for e in effects)
    assert h.core.status(h.now)["registry"]["workers"] == 1


def test_a_result_counts_only_from_the_worker_its_task_was_sent_to():
    h = active()
    for name, route in (("w1", b"r1"), ("w2", b"r2")):
        h.core.handle(MessageReceived(WORKERS, route, 1, registration(name), "m", Peer(name, "worker")), h.now)
    assert h.core.status(h.now)["registry"]["workers"] == 2
    key = (JOB, 4)
    h.core.registry.sent("w1", key, (3, 1))  # what dispatching task 4 to w1 records
    upper, lower = split128(JOB)
    forged = TaskResult(upper, lower, 4, 3, 1, 0, 0, {"value": b"forged"}, None, None, "w1", [])
    before = snapshot(h.core, h.now)
    effects = h.core.handle(MessageReceived(WORKERS, b"r2", 1, forged, "m", Peer("w2", "worker")), h.now)
    assert forbidden_only(effects, Peer("w2", "worker"))
    assert "runs on w1" in effects[0].detail
    assert h.core.registry.runners(key) == {"w1"}
    assert json.loads(snapshot(h.core, h.now))["registry"] == json.loads(before)["registry"]
    effects = h.core.handle(MessageReceived(WORKERS, b"r1", 1, forged, "m", Peer("w1", "worker")), h.now)
    assert not any(isinstance(e, Forbidden) for e in effects)
    assert h.core.registry.runners(key) == set()


@pytest.mark.parametrize("cls", sorted(STORAGE_TYPES, key=lambda c: c.code), ids=lambda c: c.__name__)
def test_a_storage_node_takes_data_only_from_people_workers_and_its_peers(cls, tmp_path):
    h = StorageHarness(tmp_path)
    for role in ROLES:
        peer = Peer(f"key-{role}", role)
        before = snapshot(h.core, h.now)
        effects = h.core.handle(MessageReceived("api", b"r", 1, SAMPLES[cls], "m", peer), h.now)
        if role in STORE_AND_READ:
            assert not any(isinstance(e, Forbidden) for e in effects), (role, effects)
        else:
            assert forbidden_only(effects, peer), (role, effects)
            assert snapshot(h.core, h.now) == before


def test_a_worker_takes_tasks_only_from_a_balancer():
    h = WorkerHarness()
    for role in ROLES:
        peer = Peer(f"key-{role}", role)
        for cls in MESSAGES:
            before = snapshot(h.core, h.now)
            effects = h.core.handle(MessageReceived(balancer_socket(0), None, 1, SAMPLES[cls], "m", peer), h.now)
            if role in BALANCERS_ONLY:
                assert not forbidden_only(effects, peer)
            else:
                assert forbidden_only(effects, peer), (role, cls, effects)
                assert snapshot(h.core, h.now) == before


def test_an_insecure_clusters_peers_may_send_anything():
    ev = MessageReceived(API, CLIENT, 7, SAMPLES[TaskResult], "m")
    assert authorise(ev, MASTER_ROLES[TaskResult]) == []
    assert authorise(ev, None) != []  # a message no role may send is refused even then


# ---- owners ------------------------------------------------------------------------------------

ALICE, BOB = Peer("alice", "client"), Peer("bob", "client")


def _as(h: MasterHarness, peer: Peer, message) -> list:
    h.stimuli += 1
    return h.event(MessageReceived(API, CLIENT, 7, message, f"msg-{h.stimuli}", peer))


def _alices_job(h: MasterHarness) -> bytes:
    _as(h, ALICE, Submit(1, 0, 42, "range", {"count": 3}))
    h.flush()
    h.commit_all()
    (ack,) = h.take(SubmitAck)
    job = join128(ack.job_uuid_upper, ack.job_uuid_lower)
    assert h.ledger.state.jobs[job].client == "alice"
    return job


def _refused_as_not_owner(effects: list, peer: Peer, job: bytes) -> bool:
    (f,) = [e for e in effects if isinstance(e, Forbidden)]
    return f.peer == peer and f.reply.detail == {"code": "not_owner", "job": job.hex()} and len(effects) == 1


def test_a_job_belongs_to_the_key_that_submitted_it():
    h = MasterHarness()
    job = _alices_job(h)
    up, lo = split128(job)
    before = snapshot(h.core, h.now)
    for message in (CancelJob(2, up, lo, "mine now"), TaskQuery(3, up, lo, 0), JobQuery(4, up, lo),
                    FileRelease(5, None, job), FileRegister(6, 1, 2, 10, 0, ["s1"], job, "x"), Watch(7, 0, {job: 0}),
                    FileList(8, 10, job, None)):
        assert _refused_as_not_owner(_as(h, BOB, message), BOB, job), message
    h.flush()
    assert not h.proposed and snapshot(h.core, h.now) == before
    # bob lists no job; alice her one; a monitor reads its state, not its results; an operator cancels it
    for peer, count in ((BOB, 0), (ALICE, 1), (Peer("graf", "monitor"), 1), (Peer("root", "operator"), 1)):
        _as(h, peer, JobList(9, 100, None))
        (reply,) = h.take(QueryReply)
        assert len(reply.value) == count, peer
    _as(h, Peer("graf", "monitor"), JobQuery(10, up, lo))
    assert h.take(QueryReply)[0].value["client"] == "alice"
    assert _refused_as_not_owner(_as(h, Peer("graf", "monitor"), TaskQuery(11, up, lo, 0)), Peer("graf", "monitor"), job)
    _as(h, ALICE, TaskQuery(12, up, lo, 0))
    assert h.take(QueryReply)[0].value["job"] == job.hex()
    _as(h, Peer("root", "operator"), CancelJob(13, up, lo, "operator"))
    h.flush()
    h.commit_all()
    assert h.ledger.state.jobs[job].state == "cancelled"


def test_one_keys_upload_promises_are_bounded_and_other_keys_go_on(tmp_path):
    """An UPLOAD_OPEN announcing more than a key may hold (an 82 GB promise held the disk's free
    space against every real upload) is refused NO_SPACE; the key's other uploads and other
    keys' are not touched; finishing or abandoning uploads frees the key's reserve."""
    from dataclasses import replace

    from proto.errors import StorageStatus
    from proto.messages import UploadDone, UploadOpen, UploadReady

    from .test_storage_core import SETTINGS

    h = StorageHarness(tmp_path, replace(SETTINGS, reserve_per_key=1 << 20))
    alice, bob = Peer("alice", "client"), Peer("bob", "client")

    def open_as(peer: Peer, fid: bytes, size: int, route: bytes) -> list:
        upper, lower = split128(fid)
        h.n += 1
        return h.event(MessageReceived("api", route, 7, UploadOpen(h.n, upper, lower, size, 1, "t"), f"m{h.n}", peer))

    def answers(effects, kind):
        return [e.message for e in effects if hasattr(e, "message") and isinstance(e.message, kind)]

    assert answers(open_as(alice, b"\1" * 16, 700 << 10, b"a1"), UploadReady)
    (done,) = answers(open_as(alice, b"\2" * 16, 82 * 10**9, b"a2"), UploadDone)  # the 82 GB promise
    assert done.status == StorageStatus.NO_SPACE
    (done,) = answers(open_as(alice, b"\3" * 16, 400 << 10, b"a3"), UploadDone)  # 700 + 400 KiB > 1 MiB
    assert done.status == StorageStatus.NO_SPACE
    assert answers(open_as(bob, b"\4" * 16, 900 << 10, b"b1"), UploadReady)  # bob holds his own reserve
    assert h.core.counters["uploads_over_key_reserve"] == 2
    assert sorted(u.holder for u in h.core.uploads.values()) == ["alice", "bob"]


def test_a_pin_belongs_to_the_key_that_made_it_and_clients_list_only_their_files():
    h = MasterHarness()
    job = _alices_job(h)
    for who, fid, owner in ((ALICE, 1, None), (BOB, 2, None), (ALICE, 3, job)):  # two pins, one job file
        upper, lower = split128(bytes([fid]) * 16)
        _as(h, who, FileRegister(10 + fid, upper, lower, 5, int(owner is None), ["s1"], owner, f"f{fid}"))
    h.flush()
    h.commit_all()
    h.take(QueryReply)
    refs = {f.hex(): r.refs for f, r in h.ledger.state.files.items()}
    assert list(refs[(bytes([1]) * 16).hex()]) == [b"pin:alice"] and list(refs[(bytes([2]) * 16).hex()]) == [b"pin:bob"]
    # bob cannot release alice's pin (his own pin of that file does not exist); alice can
    _as(h, BOB, FileRelease(20, bytes([1]) * 16, None))
    h.flush()
    h.commit_all()
    (err,) = [m for m in h.take(Error)]
    assert err.detail["code"] == "not_referenced"
    # each client lists what its pins and jobs refer to; an operator and a worker list every file
    for peer, want in ((ALICE, {1, 3}), (BOB, {2}), (Peer("root", "operator"), {1, 2, 3}), (Peer("w1", "worker"), {1, 2, 3})):
        _as(h, peer, FileList(21, 100, None, None))
        (reply,) = h.take(QueryReply)
        assert {bytes.fromhex(f["id"])[0] for f in reply.value["files"]} == want, peer
    _as(h, ALICE, FileRelease(22, bytes([1]) * 16, None))
    h.flush()
    h.commit_all()
    assert bytes([1]) * 16 not in h.ledger.state.files


def test_a_client_reads_from_storage_only_what_its_jobs_and_pins_refer_to(tmp_path):
    from proto.errors import StorageStatus
    from proto.messages import FileRequest, FileResponse
    from storage.core import ReadRange
    from storage.readers import LookupReaders, ReadersKnown

    h = StorageHarness(tmp_path)
    fid = b"\7" * 16
    upper, lower = split128(fid)

    def read_as(peer: Peer, rid: int) -> list:
        return h.core.handle(MessageReceived("api", b"r", 1, FileRequest(rid, upper, lower, 0, 10), f"m{rid}", peer), h.now)

    worker = read_as(Peer("w1", "worker"), 1)  # workers, storage nodes and operators are not asked about
    assert [type(e) for e in worker] == [ReadRange]
    first = read_as(ALICE, 2)
    assert [type(e) for e in first] == [LookupReaders] and first[0].file_id == fid
    assert read_as(BOB, 3) == []  # parked behind the same lookup
    answered = h.core.handle(ReadersKnown(fid, frozenset({"alice"}), "r1"), h.now)
    starts = [e for e in answered if isinstance(e, ReadRange)]
    refusals = [e for e in answered if isinstance(e, Forbidden)]
    assert len(starts) == 1 and len(refusals) == 1 and refusals[0].peer == BOB
    assert isinstance(refusals[0].reply, FileResponse) and refusals[0].reply.status == StorageStatus.NOT_FOUND
    assert [type(e) for e in read_as(ALICE, 4)] == [ReadRange]  # remembered
    again = read_as(BOB, 5)  # not remembered as refused: asked afresh (his job may refer to it now)
    assert [type(e) for e in again] == [LookupReaders]
    assert h.core.handle(ReadersKnown(fid, None, "r2"), h.now) == []  # masters unreachable: dropped, retried
    assert h.core.counters["reads_forbidden"] == 1 and h.core.counters["reads_unanswered"] == 1
