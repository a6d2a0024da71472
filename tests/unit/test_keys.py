"""Keys, the allow-list and a process's credentials (cluster.node.keys), without sockets."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from cluster.node import keys
from cluster.node.config import ConfigError, parse_security
from cluster.node.events import ANYONE, Peer


def _make(tmp_path, names: dict[str, str]) -> dict[str, keys.KeyEntry]:
    entries = {n: keys.KeyEntry(n, role, keys.make_secret(tmp_path / "keys", n)) for n, role in names.items()}
    keys.write_allow_list(tmp_path / "keys.toml", list(entries.values()))
    return entries


def test_a_secret_is_readable_by_its_owner_only_and_loads_back(tmp_path):
    public = keys.make_secret(tmp_path / "keys", "m1")
    path = keys.secret_path(tmp_path / "keys", "m1")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    assert not (tmp_path / "keys" / "m1.key").exists()  # the allow-list holds the public half
    pub, secret = keys.load_secret(path)
    assert pub.decode() == public and len(secret) == 40
    assert zmq.curve_public(secret) == pub


def test_a_missing_or_public_only_key_file_says_what_to_do(tmp_path):
    with pytest.raises(keys.KeysError, match="cluster keys"):
        keys.load_secret(tmp_path / "nobody.key_secret")
    public, _ = zmq.curve_keypair()
    (tmp_path / "half.key_secret").write_text(f'curve\n    public-key = "{public.decode()}"\n')
    with pytest.raises(keys.KeysError, match="no secret"):
        keys.load_secret(tmp_path / "half.key_secret")


def test_the_allow_list_round_trips_and_maps_keys_to_roles(tmp_path):
    entries = _make(tmp_path, {"m1": "master", "alice": "client", "graf": "monitor"})
    allow = keys.AllowList.read(tmp_path / "keys.toml")
    assert len(allow) == 3
    for name, e in entries.items():
        assert allow.admit(e.public.encode()) == e
        assert allow.by_name[name].peer == Peer(name, e.role)
    assert [e.name for e in allow] == ["m1", "alice", "graf"]  # nodes first, in ROLES order
    assert allow.admit(zmq.curve_keypair()[0]) is None


@pytest.mark.parametrize("text, words", [
    ('[keys.a]\nrole = "admin"\npublic = "{k}"\n', "role"),
    ('[keys.a]\nrole = "client"\npublic = "short"\n', "Z85"),
    ('[keys.a]\nrole = "client"\npublic = "{k}"\n[keys.b]\nrole = "worker"\npublic = "{k}"\n', "same public key"),
    ('keys = 3\n', "tables"),
    ('[keys.a\n', "TOML"),
    ('[keys."gw/alice"]\nrole = "client"\npublic = "{k}"\n', "'/'"),  # the name of a gateway's user
])
def test_a_bad_allow_list_is_refused_with_where_and_why(tmp_path, text, words):
    path = tmp_path / "keys.toml"
    path.write_text(text.format(k=zmq.curve_keypair()[0].decode()))
    with pytest.raises(keys.KeysError, match=words) as info:
        keys.AllowList.read(path)
    assert str(path) in str(info.value)


def test_a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_list(tmp_path):
    entries = _make(tmp_path, {"alice": "client", "bob": "client"})
    allow = keys.AllowList.read(tmp_path / "keys.toml")
    assert not allow.refresh()  # unchanged: no reload
    keys.write_allow_list(tmp_path / "keys.toml", [entries["alice"]])  # bob revoked
    assert allow.refresh()
    assert allow.admit(entries["bob"].public.encode()) is None
    assert allow.admit(entries["alice"].public.encode()) is not None
    (tmp_path / "keys.toml").write_text("[keys.x\n")
    with pytest.raises(keys.KeysError):
        allow.refresh()
    assert allow.admit(entries["alice"].public.encode()) is not None  # the old list stands


def test_the_gatekeeper_admits_known_keys_counts_and_logs_unknown_ones_once(tmp_path, caplog):
    entries = _make(tmp_path, {"alice": "client"})
    creds = keys.Credentials("m1", allow=keys.AllowList.read(tmp_path / "keys.toml"))
    counters: dict[str, int] = {}
    gate = keys.Gatekeeper(creds, counters, __import__("logging").getLogger("test.zap"))
    assert gate.callback(keys.ZAP_DOMAIN, entries["alice"].public.encode())
    stranger = zmq.curve_keypair()[0]
    with caplog.at_level("WARNING", logger="test.zap"):
        assert not gate.callback(keys.ZAP_DOMAIN, stranger)
        assert not gate.callback(keys.ZAP_DOMAIN, stranger)
    assert counters["auth_refused"] == 2
    assert sum(stranger.decode() in r.getMessage() for r in caplog.records) == 1
    # a key added since the list was read is admitted at once (the file is looked at again)
    carol = keys.KeyEntry("carol", "client", keys.make_secret(tmp_path / "keys", "carol"))
    keys.write_allow_list(tmp_path / "keys.toml", [entries["alice"], carol])
    assert gate.callback(keys.ZAP_DOMAIN, carol.public.encode())


def test_credentials_name_the_peer_of_a_live_key_only(tmp_path):
    entries = _make(tmp_path, {"alice": "client"})
    creds = keys.Credentials("m1", allow=keys.AllowList.read(tmp_path / "keys.toml"))
    assert creds.peer(entries["alice"].public) == Peer("alice", "client")
    assert creds.peer(zmq.curve_keypair()[0].decode()) is None
    assert creds.peer(None) is None
    assert keys.Credentials.plaintext().peer(None) is ANYONE
    assert ANYONE.may("master") and Peer("alice", "client").may("client", "operator")
    assert not Peer("alice", "client").may("master")


def test_a_node_loads_its_own_key_with_its_role_and_pins_the_servers_keys(tmp_path):
    entries = _make(tmp_path, {"m1": "master", "s1": "storage", "w1": "worker", "client": "client"})
    security = parse_security({}, str(tmp_path / "cluster.toml"))
    servers = {"tcp://10.0.0.1:5550": "m1", "tcp://10.0.0.11:5700": "s1"}
    creds = keys.node_credentials(security, "w1", "worker", servers)
    assert creds.name == "w1" and creds.public.decode() == entries["w1"].public
    assert creds.server_key("tcp://10.0.0.1:5550") == entries["m1"].public.encode()
    assert keys.for_address("tcp://10.0.0.11:5700") is creds  # learnt for this process's links
    with pytest.raises(keys.KeysError, match="no public key known"):
        creds.server_key("tcp://10.9.9.9:1")
    with pytest.raises(keys.KeysError, match="role worker"):
        keys.node_credentials(security, "w1", "master", servers)
    with pytest.raises(keys.KeysError, match="cluster keys"):
        keys.node_credentials(security, "w9", "worker", servers)


def test_a_revoked_key_file_is_refused_at_load(tmp_path, monkeypatch):
    entries = _make(tmp_path, {"m1": "master", "alice": "client"})
    security = parse_security({}, str(tmp_path / "cluster.toml"))
    keys.write_allow_list(tmp_path / "keys.toml", [entries["m1"]])
    monkeypatch.setenv("CLUSTER_KEY", str(keys.secret_path(tmp_path / "keys", "alice")))
    with pytest.raises(keys.KeysError, match="not in the allow-list"):
        keys.client_credentials(security, {})


def test_security_paths_are_read_from_the_configs_directory(tmp_path):
    sec = parse_security({}, str(tmp_path / "cluster.toml"))
    assert (sec.insecure, sec.keys, sec.secrets) == (False, tmp_path / "keys.toml", tmp_path / "keys")
    sec = parse_security({"security": {"keys": "/etc/cluster/keys.toml", "insecure": True}}, "/x/c.toml")
    assert (sec.insecure, str(sec.keys)) == (True, "/etc/cluster/keys.toml")
    for bad in ({"security": {"insecure": "yes"}}, {"security": {"key": "x"}}, {"security": 3}, {"security": {"keys": ""}}):
        with pytest.raises(ConfigError, match=r"\[security\]"):
            parse_security(bad, "c.toml")
