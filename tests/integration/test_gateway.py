"""A gateway acts for its own users (ACT_FOR, cluster/node/acting.py) on real masters and storage
nodes: each user owns what it submits and uploads, as ``GATEWAY/user``, and is kept from the
others' by the owner checks that keep two client keys apart; the gateway's own key is not any of
its users; a key of another role that wraps a request gets nothing through."""

from __future__ import annotations

import os

import pytest

from cluster.client import Client
from cluster.local import credentials_as, make_keys, master_nodes, start_all, stop_all, storage_nodes
from cluster.node import keys
from cluster.node.acting import wrap
from cluster.node.masterlink import Refused
from cluster.node.storagelink import StorageLink, TransferError
from cluster.node.config import load_cluster_config
from cluster.node.status import query_status
from proto import Codec, new_node_id
from proto.errors import StorageStatus
from proto.messages import Submit

from .conftest import Client as RawClient
from .conftest import detail, wait_for

pytestmark = pytest.mark.integration

SILENCE_S = 1.5  # how long a refused peer is given to get an answer it must never get


def _leader(nodes):
    def find():
        for n in nodes:
            d = detail(n)
            if d and d["state"] == "leader" and d["serving"]:
                return n
        return None
    return wait_for(find, 15, "a serving leader")


def _counters(node) -> dict:
    reply = query_status([node.address], timeout=2)[0].reply
    return dict(reply.counters) if reply else {}


def test_a_gateways_users_own_their_jobs_and_files_apart_from_each_other_and_from_the_gateway(tmp_path):
    masters = master_nodes(tmp_path, 3)
    config, storage = storage_nodes(tmp_path, 2, masters=masters)
    start_all(masters + storage)
    try:
        make_keys(tmp_path, {"gw": "gateway", "mallory": "client"})
        gw_key = keys.secret_path(tmp_path / "keys", "gw")
        src = tmp_path / "alice.bin"
        src.write_bytes(os.urandom(200_000))
        with Client(config=config, key=gw_key, act_for="alice", timeout=20) as alice, \
                Client(config=config, key=gw_key, act_for="bob", timeout=20) as bob, \
                Client(config=config, key=gw_key, timeout=20) as gateway:
            job = alice.submit_job("list", {"tasks": [{"i": 1}]}).job
            assert alice.job(job).value["client"] == "gw/alice"
            assert [j["job"] for j in alice.jobs().value] == [job]
            assert bob.jobs().value == [] and gateway.jobs().value == []
            for other in (bob, gateway):
                with pytest.raises(Refused) as caught:
                    other.cancel(job)
                assert caught.value.code == "not_owner"
            ref = alice.upload(src)
            for node, address in load_cluster_config(config).storage_nodes.items():  # bob learnt the id
                with StorageLink(address, name=node, timeout=10, credentials=bob.link.credentials) as link:
                    with pytest.raises(TransferError) as caught:
                        link.read(bytes.fromhex(ref.id), 0, 1000)
                    assert caught.value.status == StorageStatus.NOT_FOUND, node
            alice.download(ref.id, tmp_path / "back.bin")
            assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
            assert alice.cancel(job)["state"] == "cancelled"

        # A client key that wraps its request in ACT_FOR gets nothing: no answer, no job.
        leader = _leader(masters)
        mallory = RawClient(leader.address, credentials_as(config, "mallory", "client"))
        try:
            codec = Codec(new_node_id())
            mallory.send(wrap(codec, Submit(5, 1, 2, "list", {"tasks": [{"i": 2}]}), "alice"))
            assert not mallory.sock.poll(SILENCE_S * 1000), "a client key acted for someone"
        finally:
            mallory.close()
        assert _counters(leader).get("forbidden.ActFor") == 1
        assert leader.log_text().count("forbidden: ActFor from key mallory") == 1
        with Client(config=config, key=keys.secret_path(tmp_path / "keys", "operator"), timeout=10) as operator:
            assert [j["client"] for j in operator.jobs().value] == ["gw/alice"]
        assert sum(_counters(n).get("forbidden.FileRequest", 0) for n in storage) == 2
    finally:
        stop_all(masters + storage)
