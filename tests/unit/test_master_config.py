"""The masters' config: Raft needs a secret, or `insecure = true` in so many words."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from cluster.local import RAFT_SECRET, raft_secret
from cluster.node.config import ConfigError, read_toml
from master.config import MastersConfig, load_config, parse_config, write_config
from master.node import build_master

MASTERS = {
    "m1": {"api": "tcp://127.0.0.1:5550", "raft": "127.0.0.1:5560"},
    "m2": {"api": "tcp://127.0.0.1:5551", "raft": "127.0.0.1:5561"},
    "m3": {"api": "tcp://127.0.0.1:5552", "raft": "127.0.0.1:5562"},
}


def test_a_master_without_a_raft_secret_refuses_to_start_and_says_what_to_do():
    config = parse_config({"masters": MASTERS})
    assert config.password is None and not config.insecure
    with pytest.raises(ConfigError, match="password_file") as info:
        build_master(config, "m1", None)
    assert "insecure = true" in str(info.value)


def test_insecure_must_be_said_and_is_a_boolean():
    assert parse_config({"masters": MASTERS, "raft": {"insecure": True}}).insecure
    with pytest.raises(ConfigError, match="insecure"):
        parse_config({"masters": MASTERS, "raft": {"insecure": "yes"}})


@pytest.mark.parametrize("raft, fragment", [
    ({"password": "short"}, "at least 16"),
    ({"password": 12345678901234567}, "at least 16"),
    ({"password": "x" * 20, "password_file": "s"}, "both"),
    ({"password_file": 7}, "password_file"),
])
def test_bad_raft_secrets_are_refused_with_the_key_named(raft, fragment, tmp_path):
    with pytest.raises(ConfigError, match=fragment):
        parse_config({"masters": MASTERS, "raft": raft}, str(tmp_path / "cluster.toml"))


def test_a_missing_or_short_secret_file_stops_the_master_not_the_other_readers(tmp_path):
    config = parse_config({"masters": MASTERS, "raft": {"password_file": "raft.secret"}}, str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError, match="password_file"):  # read only when a master starts
        build_master(config, "m1", None)
    (tmp_path / "raft.secret").write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        build_master(config, "m1", None)


def test_the_secret_file_is_made_private_read_relative_to_the_config_and_kept(tmp_path, caplog):
    raft_secret(tmp_path / RAFT_SECRET)
    secret = (tmp_path / RAFT_SECRET).read_text()
    assert stat.S_IMODE(os.stat(tmp_path / RAFT_SECRET).st_mode) == 0o600 and len(secret.strip()) >= 32
    raft_secret(tmp_path / RAFT_SECRET)  # a second call keeps the first secret
    assert (tmp_path / RAFT_SECRET).read_text() == secret
    path = tmp_path / "masters.toml"
    write_config(MastersConfig(parse_config({"masters": MASTERS}).masters, password_file=RAFT_SECRET), path)
    assert read_toml(path)["raft"]["password_file"] == RAFT_SECRET  # the secret is not in the config
    assert load_config(path).raft_secret() == secret.strip()
    os.chmod(tmp_path / RAFT_SECRET, 0o644)
    with caplog.at_level(logging.WARNING, logger="cluster.master"):
        load_config(path).raft_secret()
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
