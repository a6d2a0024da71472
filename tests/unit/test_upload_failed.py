"""An upload that did not make its copies durable raises UploadFailed, typed and with the storage
status, and registers nothing (cluster/files.py): a caller tells "retry once the nodes are back"
from "this file is refused" without reading the message."""

from __future__ import annotations

import pytest

import cluster.files as files
from cluster.files import UploadFailed, upload_file
from cluster.node.masterlink import ClusterError
from cluster.node.storagelink import TransferError
from proto.errors import StorageStatus


class Masters:
    """The part of MasterLink an upload uses; records what was registered."""

    attempt_timeout = 0.1
    credentials = None

    def __init__(self) -> None:
        self.registered: list[tuple] = []

    def register_file(self, *args, **kwargs) -> None:
        self.registered.append((args, kwargs))


def failing(exc: TransferError):
    def upload_ranked(*args, **kwargs):
        raise exc
    return upload_ranked


@pytest.mark.parametrize("exc, status, retryable", [
    (TransferError("every storage node failed (s1: did not answer; s2: stored on s2 but 2 copies were asked for)"),
     None, True),
    (TransferError("stored on s2 only", StorageStatus.REPLICATION_FAILED, "s2"), StorageStatus.REPLICATION_FAILED, True),
    (TransferError("the bytes do not hash to the id", StorageStatus.HASH_MISMATCH, "s1"), StorageStatus.HASH_MISMATCH,
     False),
])
def test_a_failed_upload_is_typed_and_registers_nothing(monkeypatch, tmp_path, exc, status, retryable):
    monkeypatch.setattr(files, "upload_ranked", failing(exc))
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    masters = Masters()
    with pytest.raises(UploadFailed) as raised:
        upload_file(masters, {"s1": "tcp://127.0.0.1:1", "s2": "tcp://127.0.0.1:2"}, path, owner=None, name=None,
                    copies=2, progress=None)
    assert isinstance(raised.value, ClusterError)  # what callers catch today still catches it
    assert raised.value.status == status and raised.value.retryable is retryable
    assert masters.registered == []
