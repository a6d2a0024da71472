"""CURVE on real masters: a peer without a key, with an unknown key, or with a revoked key gets
nothing through (no reply, no state change, counted, logged once); a client never talks to an
impostor holding another key; the legitimate client goes on working throughout."""

from __future__ import annotations

import os

import pytest
import zmq

from cluster.client import Client
from cluster.local import master_nodes, start_all, stop_all
from cluster.node import keys
from cluster.node.config import load_cluster_config, parse_security
from cluster.node.status import query_status
from proto import Codec, Reason, new_node_id
from proto.ids import split128
from cluster.local import make_keys
from proto.messages import Attach, Submit, SubmitAck

from .conftest import Client as RawClient
from .conftest import detail, wait_for

pytestmark = pytest.mark.integration

SILENCE_S = 1.5  # how long a refused peer is given to get an answer it must never get


@pytest.fixture
def cluster(tmp_path):
    nodes = master_nodes(tmp_path, 3)
    start_all(nodes)
    try:
        yield tmp_path, nodes
    finally:
        stop_all(nodes)


def _leader(nodes):
    def find():
        for n in nodes:
            d = detail(n)
            if d and d["state"] == "leader" and d["serving"]:
                return n, d
        return None
    return wait_for(find, 15, "a serving leader")


def _counters(node) -> dict:
    reply = query_status([node.address], timeout=2)[0].reply
    return dict(reply.counters) if reply else {}


def _submit_gets_no_answer(sock: zmq.Socket) -> None:
    Codec(new_node_id()).send(sock, Submit(5, 1, 2, "list", {"tasks": [{"cmd": ["sh", "-c", "id"]}]}))
    assert not sock.poll(SILENCE_S * 1000), "a refused peer got an answer"


def _jobs(tmp_path) -> list:
    with Client(config=tmp_path / "masters.toml", key=keys.secret_path(tmp_path / "keys", "operator"),
                timeout=10) as c:
        return c.jobs().value


def test_a_peer_without_keys_or_with_an_unknown_key_gets_nothing_through(cluster, caplog):
    tmp_path, nodes = cluster
    leader, _ = _leader(nodes)
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.DEALER)
        plain.linger = 0
        plain.connect(leader.address)  # no CURVE at all
        _submit_gets_no_answer(plain)
        wait_for(lambda: _counters(leader).get("handshake_failed_total", 0) >= 1, 10, "the failed handshake counted")

        stranger = ctx.socket(zmq.DEALER)
        stranger.linger = 0
        public, secret = zmq.curve_keypair()  # a well-formed key nobody admitted
        stranger.curve_publickey, stranger.curve_secretkey = public, secret
        stranger.curve_serverkey = keys.for_address(leader.address).server_key(leader.address)
        stranger.connect(leader.address)
        _submit_gets_no_answer(stranger)
        wait_for(lambda: _counters(leader).get("auth_refused", 0) >= 1, 10, "the unknown key counted")
        # twice more: still nothing through, and the master logs the key once
        for _ in range(2):
            stranger.close()
            stranger = ctx.socket(zmq.DEALER)
            stranger.linger = 0
            stranger.curve_publickey, stranger.curve_secretkey = public, secret
            stranger.curve_serverkey = keys.for_address(leader.address).server_key(leader.address)
            stranger.connect(leader.address)
            _submit_gets_no_answer(stranger)
        assert leader.log_text().count(public.decode()) == 1
    finally:
        ctx.destroy(linger=0)
    assert _jobs(tmp_path) == []  # nothing was submitted
    assert all(n.process.poll() is None for n in nodes)


def test_a_revoked_key_is_refused_on_its_next_message_and_at_its_next_connect(cluster):
    tmp_path, nodes = cluster
    leader, _ = _leader(nodes)
    make_keys(tmp_path, {"alice": "client"})
    alice = keys.client_credentials(parse_security({}, str(tmp_path / "masters.toml")),
                                    {n.address: n.name for n in nodes},
                                    keys.secret_path(tmp_path / "keys", "alice"), remember=False)
    raw = RawClient(leader.address, alice)
    try:
        raw.send(Submit(1, 1, 2, "list", {"tasks": [{"i": 1}]}))
        assert isinstance(raw.recv(), SubmitAck)
        entries = [e for e in keys.parse_allow_list(tmp_path / "keys.toml") if e.name != "alice"]
        keys.write_allow_list(tmp_path / "keys.toml", entries)  # `cluster keys revoke alice`, by hand
        wait_for(lambda: _counters(leader).get("keys_reloaded", 0) >= 1, 10, "the leader to re-read the list")
        raw.send(Submit(2, 3, 4, "list", {"tasks": [{"i": 2}]}))  # the same, still open connection
        assert not raw.sock.poll(SILENCE_S * 1000)
        assert _counters(leader).get("refused_revoked_key", 0) >= 1
    finally:
        raw.close()
    fresh = RawClient(leader.address, alice)
    try:
        fresh.send(Submit(3, 5, 6, "list", {"tasks": [{"i": 3}]}))
        assert not fresh.sock.poll(SILENCE_S * 1000)
    finally:
        fresh.close()
    assert len(_jobs(tmp_path)) == 1  # only the job submitted before the revocation


def test_a_key_of_the_wrong_role_gets_nothing_through(cluster):
    """A worker key submitting a command, a client key taking the task stream with the largest
    epoch (both attacks worked before keys): no reply, nothing changes, counted, logged once."""
    tmp_path, nodes = cluster
    leader, _ = _leader(nodes)
    make_keys(tmp_path, {"w9": "worker", "mallory": "client"})
    servers = {n.address: n.name for n in nodes}
    security = parse_security({}, str(tmp_path / "masters.toml"))
    for name, message in (("w9", Submit(5, 1, 2, "list", {"tasks": [{"cmd": ["sh", "-c", "id"]}]})),
                          ("mallory", Attach(1, 2**64 - 1, 100, "mallory")),
                          ("mallory", Attach(2, 2**64 - 1, 100, "mallory"))):
        creds = keys.client_credentials(security, servers, keys.secret_path(tmp_path / "keys", name), remember=False)
        raw = RawClient(leader.address, creds)
        try:
            raw.send(message)
            assert not raw.sock.poll(SILENCE_S * 1000), f"{name} got an answer to {type(message).__name__}"
        finally:
            raw.close()
    counters = _counters(leader)
    assert counters.get("forbidden.Submit") == 1 and counters.get("forbidden.Attach") == 2
    log = leader.log_text()
    assert log.count("forbidden: Attach from key mallory") == 1 and log.count("forbidden: Submit from key w9") == 1
    assert detail(leader)["balancer"] is None  # no balancer took the task stream
    assert _jobs(tmp_path) == []


def test_a_client_never_talks_to_a_node_with_another_key(cluster):
    """CURVE authenticates the server too: an impostor on a node's address gets no message."""
    tmp_path, nodes = cluster
    ctx = zmq.Context()
    try:
        impostor = ctx.socket(zmq.ROUTER)
        impostor.curve_server = True
        impostor.curve_publickey, impostor.curve_secretkey = zmq.curve_keypair()
        port = impostor.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
        creds = keys.for_address(nodes[0].address)
        creds.add_server(address, "m1")  # the client believes m1 is there
        raw = RawClient(address, creds)
        try:
            raw.send(Submit(1, 1, 2, "list", {"tasks": [{"i": 1}]}))
            assert not impostor.poll(SILENCE_S * 1000), "the impostor received a message"
        finally:
            raw.close()
    finally:
        ctx.destroy(linger=0)


def test_every_node_reports_its_public_key(cluster):
    tmp_path, nodes = cluster
    allow = keys.AllowList.read(tmp_path / "keys.toml")
    for n in nodes:
        d = wait_for(lambda n=n: detail(n), 10, f"{n.name} to answer")
        assert d["public_key"] == allow.by_name[n.name].public
        assert d["key_name"] == n.name


def _rss_mib(node) -> float:
    for line in open(f"/proc/{node.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_huge_multipart_from_a_stranger_costs_nothing_and_from_a_key_quarantines_it(cluster):
    """libzmq hands a multipart message over only once whole, and bounds frames, not messages:
    a stranger's 1 GB (20 x 50 MiB) never gets past the handshake; an admitted key's 96 MiB (over
    the 64 MiB limit) is refused TOO_LARGE and its key's next messages are dropped."""
    tmp_path, nodes = cluster
    leader, _ = _leader(nodes)
    before = _rss_mib(leader)
    chunk = bytes(50 << 20)
    ctx = zmq.Context()
    try:
        stranger = ctx.socket(zmq.DEALER)
        stranger.linger = 0
        stranger.connect(leader.address)
        stranger.send_multipart([chunk] * 20, copy=False)
        assert not stranger.poll(SILENCE_S * 1000)
        wait_for(lambda: _counters(leader).get("handshake_failed_total", 0) >= 1, 10, "the failed handshake counted")
        assert _rss_mib(leader) - before < 40, "the master buffered a stranger's bytes"
    finally:
        ctx.destroy(linger=0)
    make_keys(tmp_path, {"greedy": "client"})
    security = parse_security({}, str(tmp_path / "masters.toml"))
    greedy = keys.client_credentials(security, {n.address: n.name for n in nodes},
                                     keys.secret_path(tmp_path / "keys", "greedy"), remember=False)
    raw = RawClient(leader.address, greedy)
    try:
        (frame0,) = Codec(new_node_id()).encode(Submit(1, 1, 2, "list", {"tasks": [{"i": 1}]}))
        raw.send_frames([frame0, bytes(32 << 20), bytes(32 << 20), bytes(32 << 20)])
        reply = raw.recv(10)
        assert reply.reason == Reason.TOO_LARGE
        raw.send(Submit(2, 3, 4, "list", {"tasks": [{"i": 2}]}))  # well-formed, but from a quarantined key
        assert not raw.sock.poll(SILENCE_S * 1000)
    finally:
        raw.close()
    counters = _counters(leader)
    assert counters.get("quarantined") == 1 and counters.get("dropped_quarantined", 0) >= 1
    assert _jobs(tmp_path) == []  # and other keys still get answers


def test_a_reader_that_never_reads_its_answers_costs_a_storage_node_a_bounded_queue(tmp_path):
    """64 reads of 8 MiB, never read: the node holds at most its byte budget (SEND_BYTES and one
    answer) towards that connection (they once took a node to 1 GiB), drops the rest (counted)
    and goes on serving everyone else."""
    from cluster.local import storage_nodes
    from cluster.node.storagelink import StorageLink
    from proto.fileids import file_id
    from proto.messages import FileRequest
    from storage.node import SEND_BYTES

    config, nodes = storage_nodes(tmp_path, 1)
    start_all(nodes)
    try:
        node = nodes[0]
        data = os.urandom(8 << 20)
        fid = file_id(data)
        with StorageLink(node.address, name="s1") as link:
            assert link.upload(fid, len(data), lambda o, n: data[o:o + n]) == ["s1"]
        before = _rss_mib(node)
        upper, lower = split128(fid)
        greedy = RawClient(node.address)
        try:
            greedy.sock.setsockopt(zmq.RCVHWM, 1)
            for i in range(64):
                greedy.send(FileRequest(i, upper, lower, 0, 8 << 20))
            wait_for(lambda: detail(node)["core"].get("reads", 0) >= 64, 30, "the node to serve the 64 reads")
            grown = _rss_mib(node) - before
            assert grown < (SEND_BYTES >> 20) + 8 + 64, f"the node holds {grown:.0f} MiB for one reader"
            assert _counters(node).get("send_dropped.peer_queue_bytes", 0) >= 40
            with StorageLink(node.address, name="s1") as other:  # everyone else is still served
                got, _ = other.read(fid, 0, 1 << 20)
                assert bytes(got) == data[:1 << 20]
        finally:
            greedy.close()
    finally:
        stop_all(nodes)


def test_every_node_kind_lets_no_stranger_through(tmp_path):
    """A master, a balancer (both its ports), a storage node and a worker's status port: a peer
    with no key and one with an unknown key get no answer, even to STATUS_QUERY, and each node
    counts the failed handshakes."""
    from cluster.local import balancer_nodes, storage_nodes, worker_nodes
    from proto.messages import StatusQuery

    masters = master_nodes(tmp_path, 3)
    _, storage = storage_nodes(tmp_path, 1, masters=masters)
    config, pair = balancer_nodes(tmp_path, 1)
    workers = worker_nodes(tmp_path, config, 1)
    nodes = masters + storage + pair + workers
    start_all(nodes)
    try:
        cfg = load_cluster_config(config)
        targets = [masters[0].address, storage[0].address, pair[0].address, cfg.balancers["b1"].peer,
                   workers[0].address]
        ctx = zmq.Context()
        try:
            for address in targets:
                server_key = keys.for_address(address).server_key(address, "w1")
                for how in ("no key", "unknown key"):
                    sock = ctx.socket(zmq.DEALER)
                    sock.linger = 0
                    if how == "unknown key":
                        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
                        sock.curve_serverkey = server_key
                    sock.connect(address)
                    Codec(new_node_id()).send(sock, StatusQuery(7))
                    assert not sock.poll(SILENCE_S * 1000), f"{how} got an answer from {address}"
                    sock.close()
        finally:
            ctx.destroy(linger=0)
        for node in (masters[0], storage[0], pair[0], workers[0]):
            c = wait_for(lambda node=node: (c := _counters(node)) and c.get("handshake_failed_total", 0) >= 2 and c,
                         10, f"{node.name} to count the failed handshakes")
            assert c.get("auth_refused", 0) >= 1, (node.name, c)
    finally:
        stop_all(nodes)


def test_a_client_key_reads_from_storage_only_the_files_its_jobs_and_pins_refer_to(tmp_path):
    """Alice uploads (her pin); Bob, another client key that learnt the id, gets NOT_FOUND from
    every replica; Alice, an operator and a worker key read it."""
    from cluster.local import credentials_as, storage_nodes
    from cluster.node.storagelink import StorageLink, TransferError
    from proto.errors import StorageStatus

    masters = master_nodes(tmp_path, 3)
    config, storage = storage_nodes(tmp_path, 2, masters=masters)
    start_all(masters + storage)
    try:
        src = tmp_path / "secret.bin"
        src.write_bytes(os.urandom(300_000))
        make_keys(tmp_path, {"alice": "client", "bob": "client"})
        with Client(config=config, key=keys.secret_path(tmp_path / "keys", "alice"), timeout=20) as alice:
            ref = alice.upload(src)
        fid = bytes.fromhex(ref.id)
        cfg = load_cluster_config(config)
        for who, role, ok in (("bob", "client", False), ("alice", "client", True), ("operator", "operator", True),
                              ("w7", "worker", True)):
            creds = credentials_as(config, who, role)
            for node, address in cfg.storage_nodes.items():
                with StorageLink(address, name=node, timeout=10, credentials=creds) as link:
                    if ok:
                        data, _ = link.read(fid, 0, 1000)
                        assert bytes(data) == src.read_bytes()[:1000], (who, node)
                    else:
                        with pytest.raises(TransferError) as caught:
                            link.read(fid, 0, 1000)
                        assert caught.value.status == StorageStatus.NOT_FOUND, (who, node)
        counters = [_counters(n) for n in storage]
        assert sum(c.get("forbidden.FileRequest", 0) for c in counters) == 2
    finally:
        stop_all(masters + storage)
