"""A worker's view of the ledger (worker.view.ClusterView): masters that do not answer a file
lookup are an error (EIO), never an absence (ENOENT), and an absence is asked again once, since a
cut-off leader may answer from a ledger that lacks a file registered since (the chaos soak)."""

from __future__ import annotations

import errno

import pytest

from cluster.node.masterlink import Answer, NoQuorum, NotFound
from worker import view as view_module
from worker.view import ClusterView

FID = bytes(range(16))
RECORD = {"size": 42, "replicas": ["s1"]}


class Masters:
    """Answers lookups from a script: a record, an absence, NotFound or no quorum."""

    def __init__(self, script):
        self.script = list(script)
        self.asked = 0

    def lookup_files(self, ids):
        self.asked += 1
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        stale = isinstance(step, tuple)
        return Answer(step[0] if stale else step, stale, 7, None if stale else "m1")

    def close(self):
        pass


@pytest.fixture
def make_view(monkeypatch):
    naps = []
    monkeypatch.setattr(view_module.time, "sleep", naps.append)
    monkeypatch.setattr(view_module, "MasterLink", lambda masters, timeout: Masters([]))
    monkeypatch.setattr(view_module, "LinkPool", lambda storage, timeout: None)

    def make(script):
        v = ClusterView(["tcp://127.0.0.1:1"], {"s1": "tcp://127.0.0.1:2"})
        v.client.script = list(script)
        return v, naps
    yield make


def test_masters_that_do_not_answer_are_an_io_error_not_an_absence(make_view):
    v, _ = make_view([NoQuorum("no leader")])
    with pytest.raises(OSError) as caught:
        v.size(FID)
    assert caught.value.errno == errno.EIO
    v.client.script = [{FID.hex(): RECORD}]
    assert v.size(FID) == 42  # nothing of the failure was remembered


def test_an_absence_is_asked_again_once_after_a_cut_off_leader_would_have_stepped_down(make_view):
    v, naps = make_view([{}, {FID.hex(): RECORD}])
    assert v.size(FID) == 42 and naps == [view_module.STALE_READ_S] and v.client.asked == 2
    assert v.size(FID) == 42 and v.client.asked == 2  # a record is remembered for good


def test_an_absence_said_by_a_master_without_a_quorum_is_an_io_error(make_view):
    v, _ = make_view([({},)])
    with pytest.raises(OSError) as caught:
        v.size(FID)
    assert caught.value.errno == errno.EIO


def test_a_file_the_masters_twice_do_not_know_is_absent(make_view):
    v, naps = make_view([NotFound("no such file"), {}])
    assert v.size(FID) is None and len(naps) == 1
    with pytest.raises(OSError) as caught:
        v.client.script = [{}, {}]
        v.read(FID, 0, 10)
    assert caught.value.errno == errno.ENOENT
