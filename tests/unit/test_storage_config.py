"""The cluster config's storage part, and a worker's files without a FUSE mount."""

from __future__ import annotations

import logging
import tomllib

import pytest

from cluster.node.config import ConfigError, StorageOptions, parse_cluster_config, write_storage_section
from proto.fileids import file_id
from worker.cache import BlockCache
from worker.files import WorkerFiles


def test_the_storage_section_round_trips_and_is_checked():
    nodes = {"s1": "tcp://127.0.0.1:5700", "s2": "tcp://127.0.0.1:5701"}
    text = '[masters.m1]\napi = "tcp://127.0.0.1:5550"\nraft = "127.0.0.1:5560"\n' + write_storage_section(nodes, StorageOptions(replicas=2, fsync=False))
    config = parse_cluster_config(tomllib.loads(text))
    assert config.storage_nodes == nodes and config.storage.replicas == 2 and config.storage.fsync is False
    assert config.masters == {"m1": "tcp://127.0.0.1:5550"}
    bad = [
        ({"storage": {"nodes": {"s1": {"address": "127.0.0.1:5700"}}}}, "tcp://host:port"),
        ({"storage": {"replicas": 3, "nodes": {"s1": {"address": "tcp://a:1"}}}}, "only 1 storage nodes"),
        ({"storage": {"replicas": 0}}, "at least 1"),
        ({"storage": {"replcas": 2}}, "unknown keys replcas"),
        ({"masters": {"m1": {"raft": "a:1"}}}, "needs api"),
    ]
    for data, fragment in bad:
        with pytest.raises(ConfigError, match=fragment):
            parse_cluster_config(data, "cluster.toml")


def test_the_heartbeat_section_sets_the_nodes_timings_and_is_checked():
    from cluster.node.config import HeartbeatOptions

    assert parse_cluster_config({}).heartbeat == HeartbeatOptions()
    beat = parse_cluster_config({"heartbeat": {"interval_s": 1, "worker_liveness_s": 3, "balancer_liveness_s": 2.5}}).heartbeat
    assert (beat.interval_s, beat.worker_liveness_s, beat.balancer_liveness_s) == (1.0, 3.0, 2.5)
    for section, fragment in [({"interval_s": 0}, "from 0 to 600"), ({"interval_s": "1"}, "from 0 to 600"),
                              ({"interval_s": 1, "worker_liveness_s": 1.5}, "at least twice"),
                              ({"beat": 1}, "unknown keys beat")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_cluster_config({"heartbeat": section}, "cluster.toml")


class DictView:
    """The stored files of the test, as a worker's StorageView would give them."""

    def __init__(self, files: dict[bytes, bytes]) -> None:
        self.files = files
        self.reads = 0

    def size(self, fid):
        data = self.files.get(fid)
        return None if data is None else len(data)

    def read(self, fid, offset, length):
        self.reads += 1
        return self.files[fid][offset:offset + length]

    def jobs(self):
        return []

    def job_files(self, job):
        return None


def test_without_a_mount_files_are_fetched_whole_into_the_cache_and_it_says_so_once(tmp_path, caplog):
    data = bytes(range(256)) * 9000  # a few blocks
    fid = file_id(data)
    view = DictView({fid: data})
    files = WorkerFiles(view, BlockCache(tmp_path / "cache", 64 << 20, durable=False), tmp_path / "no-mount")
    with caplog.at_level(logging.WARNING, logger="cluster.worker"):
        path = files.path(fid)
        again = files.path(fid)
    assert path.read_bytes() == data and again == path
    assert sum("no FUSE view" in r.message for r in caplog.records) == 1
    reads = view.reads
    files.path(fid)
    assert view.reads == reads  # complete in the cache: no fetch
    with pytest.raises(FileNotFoundError):
        files.path(b"\x01" * 16)
    own = tmp_path / "out.bin"
    own.write_bytes(b"written here")
    files.add_own(file_id(b"written here"), own)
    assert files.path(file_id(b"written here")).read_bytes() == b"written here"
    assert view.reads == reads  # a file the worker wrote itself is never fetched


def test_a_tasks_inputs_are_the_cache_files_pinned_while_the_task_runs(tmp_path):
    a, b = bytes(range(256)) * 5000, b"second input" * 1000
    fa, fb = file_id(a), file_id(b)
    view = DictView({fa: a, fb: b})
    cache = BlockCache(tmp_path / "cache", 64 << 20, durable=False)
    files = WorkerFiles(view, cache, None)
    cache.put_bytes(fa, a)  # complete already: handed out as the cache's own file
    with files.inputs([fa, fb]) as (pa, pb):
        assert pa == cache.path_if_complete(fa) and pa.read_bytes() == a
        assert pb.read_bytes() == b  # fetched whole (no mount here)
        assert cache.pins(fa) == 1 and cache.pins(fb) == 1
    assert cache.pins(fa) == 0 and cache.pins(fb) == 0


def test_the_example_config_in_deploy_is_valid_for_every_reader():
    from pathlib import Path

    from cluster.node.config import load_cluster_config
    from master.config import load_config

    path = Path(__file__).resolve().parents[2] / "deploy" / "cluster.example.toml"
    config = load_cluster_config(path)
    assert config.storage.replicas == 2 and len(config.storage_nodes) == 2 and len(config.masters) == 3
    assert config.heartbeat.interval_s == 0.25
    assert set(load_config(path).masters) == set(config.masters)
