"""`cluster keys`: init, add, revoke, rotate, list, as an operator uses them, and their effect on
running masters (a revoked key is refused within one reload; a rotated key's old half too)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from cluster.cli import cli
from cluster.client import Client, ClusterError
from cluster.local import master_nodes, start_all, stop_all
from cluster.node import keys
from cluster.node.status import query_status

from .conftest import wait_for

pytestmark = pytest.mark.integration


def _reloads(node) -> int:
    reply = query_status([node.address], timeout=2)[0].reply
    return reply.counters.get("keys_reloaded", 0) if reply else -1


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_init_makes_a_key_per_node_and_secrets_only_their_owner_reads(tmp_path):
    config = tmp_path / "cluster.toml"
    config.write_text('[masters.m1]\napi = "tcp://10.0.0.1:5550"\n[storage]\nreplicas = 1\n[storage.nodes.s1]\naddress = "tcp://10.0.0.11:5700"\n'
                      '[balancers.b1]\nworkers = "tcp://10.0.0.5:5570"\npeer = "tcp://10.0.0.5:5571"\nprimary = true\n')
    out = run("keys", "init", str(tmp_path / "etc"), "--config", str(config), "--worker", "w1", "--worker", "w2")
    assert out.exit_code == 0, out.output
    allow = keys.AllowList.read(tmp_path / "etc" / "keys.toml")
    assert {(e.name, e.role) for e in allow} == {("m1", "master"), ("s1", "storage"), ("b1", "balancer"),
                                                 ("w1", "worker"), ("w2", "worker"), ("operator", "operator"),
                                                 ("client", "client")}
    for e in allow:
        secret = tmp_path / "etc" / "keys" / f"{e.name}.key_secret"
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        assert keys.load_secret(secret)[0].decode() == e.public
    again = run("keys", "init", str(tmp_path / "etc"))
    assert again.exit_code != 0 and "exists" in again.output  # never overwrites an allow-list


def test_add_revoke_rotate_and_list(tmp_path):
    run("keys", "init", str(tmp_path))
    config = tmp_path / "cluster.toml"
    config.write_text('[masters.m1]\napi = "tcp://127.0.0.1:1"\n')
    assert run("keys", "add", "alice", "--role", "client", "--config", str(config)).exit_code == 0
    dup = run("keys", "add", "alice", "--role", "monitor", "--config", str(config))
    assert dup.exit_code != 0 and "already has a key" in dup.output
    bad = run("keys", "add", "a/b", "--role", "client", "--config", str(config))
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    listed = json.loads(run("keys", "list", "--json", "--config", str(config)).output)
    alice = next(k for k in listed["keys"] if k["name"] == "alice")
    assert alice["role"] == "client" and alice["secret_here"] is True
    assert run("keys", "rotate", "alice", "--config", str(config)).exit_code == 0
    rotated = next(k for k in json.loads(run("keys", "list", "--json", "--config", str(config)).output)["keys"]
                   if k["name"] == "alice")
    assert rotated["public_key"] != alice["public_key"] and rotated["role"] == "client"
    assert run("keys", "revoke", "alice", "--config", str(config)).exit_code == 0
    assert "alice" not in {e.name for e in keys.AllowList.read(tmp_path / "keys.toml")}
    assert not (tmp_path / "keys" / "alice.key_secret").exists()
    gone = run("keys", "revoke", "alice", "--config", str(config))
    assert gone.exit_code != 0 and "no key named alice" in gone.output
    insecure = tmp_path / "insecure.toml"
    insecure.write_text('[security]\ninsecure = true\n')
    refused = run("keys", "list", "--config", str(insecure))
    assert refused.exit_code != 0 and "insecure" in refused.output


def test_a_revoked_and_a_rotated_key_stop_working_on_running_masters(tmp_path):
    nodes = master_nodes(tmp_path, 3)
    start_all(nodes)
    config = tmp_path / "masters.toml"
    try:
        assert run("keys", "add", "alice", "--role", "client", "--config", str(config)).exit_code == 0
        alice_key = tmp_path / "keys" / "alice.key_secret"
        old_secret = alice_key.read_bytes()
        with Client(config=config, key=alice_key, timeout=10) as c:
            assert c.submit_job("list", {"tasks": [{"i": 1}]})
        assert run("keys", "rotate", "alice", "--config", str(config)).exit_code == 0
        (tmp_path / "old.key_secret").write_bytes(old_secret)
        os.chmod(tmp_path / "old.key_secret", 0o600)
        with pytest.raises(ClusterError, match="not in the allow-list"):
            Client(config=config, key=tmp_path / "old.key_secret", timeout=3)
        with Client(config=config, key=alice_key, timeout=10) as c:  # the new half works at once
            assert c.submit_job("list", {"tasks": [{"i": 2}]})
        # a client that loaded its keys before the revocation is refused by the masters
        c = Client(config=config, key=alice_key, timeout=3, attempt_timeout=0.5)
        try:
            reloads = [_reloads(n) for n in nodes]
            assert run("keys", "revoke", "alice", "--config", str(config)).exit_code == 0
            wait_for(lambda: all(_reloads(n) > r for n, r in zip(nodes, reloads)), 10, "every master to re-read the list")
            with pytest.raises(ClusterError):
                c.submit_job("list", {"tasks": [{"i": 3}]})
        finally:
            c.close()
    finally:
        stop_all(nodes)
