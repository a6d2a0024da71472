"""master.diskfull: the line a master logs when its disk fails it, and how far pysyncobj grows
its journal (what master.raft allocates before pysyncobj maps it)."""

from __future__ import annotations

import errno

import pytest

from master.diskfull import EXIT_DISK, directory_of, failure_line, grown_size


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_says_where_what_failed_and_what_to_do(err):
    line = failure_line("append to the Raft journal", "/var/lib/cluster/master-m1/raft.journal", err,
                        "No space left on device")
    assert line.startswith("disk full in /var/lib/cluster/master-m1: could not append to the Raft journal "
                           "(/var/lib/cluster/master-m1/raft.journal: No space left on device)")
    assert f"exit status {EXIT_DISK}" in line
    assert "Free space in /var/lib/cluster/master-m1 and restart it" in line
    assert "\n" not in line


def test_an_io_error_and_anything_else_say_so():
    eio = failure_line("sync the Raft journal to disk", "/d/raft.journal", errno.EIO, "Input/output error")
    assert eio.startswith("disk I/O error in /d: could not sync the Raft journal to disk") and "dmesg" in eio
    assert "move /d aside" in eio
    other = failure_line("store the Raft term, vote and commit index", "/d/raft.journal.meta", errno.EROFS,
                         "Read-only file system")
    assert other.startswith("cannot write in /d: could not store the Raft term") and "Make /d writable" in other
    assert "error 5" in failure_line("x", "/d/f", errno.EIO, None)


def test_directory_of():
    assert [directory_of(p) for p in ("/a/b/c", "/c", "c", "a/c")] == ["/a/b", "/", ".", "a"]


def test_grown_size_is_pysyncobjs_next_size():
    assert grown_size(1024, 1000, 2.0) == 1024  # it fits: no growth
    assert grown_size(1024, 1025, 2.0) == 2048  # doubled
    assert grown_size(1024, 5000, 2.0) == 5000  # one write bigger than the double
    assert grown_size(1000, 1001, 1.5) == 1500
