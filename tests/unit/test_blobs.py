"""The storage node's blob store on a real file system: ids, uploads, verified reads, repair.

Every store test ends by checking what a reader of ``blobs/`` could see (``assert_no_half_files``):
each data file has its sidecar and hashes to its own name, and nothing half-written is there.
"""

from __future__ import annotations

import array
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.fileids import BLOCK, BlockHasher, file_id, file_id_of_path, hex_id, parse_id
from storage import blobs
from storage.blobs import BlobStore, StoreError

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BIG = random.Random(7).randbytes(3 * BLOCK + 5)  # four blocks, the last of 5 bytes
EDGE_SIZES = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5)


def reference_id(data: bytes) -> bytes:
    """The id as the spec words it, written the obvious way: the oracle."""
    hashes = b"".join(blake3.blake3(data[i:i + BLOCK]).digest(length=16) for i in range(0, len(data), BLOCK))
    return blake3.blake3(b"cluster-blob-v1\0" + len(data).to_bytes(8, "little") + hashes).digest(length=16)


def assert_no_half_files(store: BlobStore) -> None:
    """Everything a reader can find under blobs/ is complete, has its sidecar, and is what it is named."""
    for d in (store.root / "blobs").iterdir():
        names = {p.name for p in d.iterdir()}
        for name in names:
            assert not name.endswith(".tmp"), f"temp file left visible: {d / name}"
            if name.endswith(".blocks"):
                assert name[:-7] in names, f"orphan sidecar {d / name}"
                continue
            path = d / name
            hasher = BlockHasher()
            hasher.update(path.read_bytes())
            assert hasher.digest().hex() == name, f"{path} is not the content it is named for"
            assert (d / (name + ".blocks")).read_bytes() == hasher.block_hashes()


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)  # blobs are stored read-only
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def blob_file(store: BlobStore, fid: bytes) -> Path:
    return store.root / "blobs" / fid.hex()[:2] / fid.hex()


def code_of(excinfo: pytest.ExceptionInfo[StoreError]) -> str:
    return excinfo.value.code


@pytest.fixture
def store(tmp_path):
    with BlobStore(tmp_path / "store", fsync=False) as s:
        yield s
        assert_no_half_files(s)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    with BlobStore(tmp_path_factory.mktemp("shared"), fsync=False) as s:
        yield s


# ---- ids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_id_at_block_boundaries_matches_the_reference(size):
    data = BIG[:size]
    hasher = BlockHasher()
    hasher.update(data)
    assert file_id(data) == hasher.digest() == reference_id(data)
    assert len(hasher.block_hashes()) == 16 * -(-size // BLOCK)
    assert hasher.size == size


@settings(max_examples=60, **SETTINGS)
@given(size=st.sampled_from(EDGE_SIZES) | st.integers(0, 3 * BLOCK + 5),
       cuts=st.lists(st.integers(0, 3 * BLOCK + 5), max_size=8), kind=st.sampled_from(["bytes", "view", "bytearray"]))
def test_hasher_fed_at_any_split_points_gives_the_whole_files_id(size, cuts, kind):
    data = BIG[:size]
    points = sorted({0, size, *(c for c in cuts if c <= size)})
    hasher = BlockHasher()
    view = memoryview(data)
    for a, b in zip(points, points[1:]):
        piece = {"bytes": data[a:b], "view": view[a:b], "bytearray": bytearray(view[a:b])}[kind]
        hasher.update(piece)
    assert hasher.digest() == file_id(data) == reference_id(data)


def test_hasher_takes_buffers_of_any_item_size():
    words = array.array("I", range(1000))
    hasher = BlockHasher()
    hasher.update(memoryview(words))
    assert hasher.digest() == file_id(words.tobytes())


@settings(max_examples=100, **SETTINGS)
@given(data=st.binary(min_size=1, max_size=3000), where=st.integers(0, 2**32), bit=st.integers(0, 7))
def test_flipping_any_bit_changes_the_id(data, where, bit):
    i = where % len(data)
    flipped = bytearray(data)
    flipped[i] ^= 1 << bit
    assert file_id(bytes(flipped)) != file_id(data)


@pytest.mark.parametrize("where", [0, BLOCK - 1, BLOCK, 2 * BLOCK + 17, 3 * BLOCK + 4])
def test_flipping_a_byte_of_a_big_file_changes_the_id(where):
    flipped = bytearray(BIG)
    flipped[where] ^= 1
    assert file_id(flipped) != file_id(BIG)


def test_id_depends_on_the_size_not_only_the_blocks():
    assert file_id(b"") != file_id(b"\0")
    assert file_id(b"") == reference_id(b"")


def test_hex_and_parse_round_trip_and_refuse_junk():
    fid = file_id(b"x")
    text = hex_id(fid)
    assert len(text) == 32 and text == text.lower()
    assert parse_id(text) == fid == parse_id(text.upper())
    for junk in ("", text[:-1], text + "0", "g" * 32, " " + text[1:]):
        with pytest.raises(ValueError, match="not a file id"):
            parse_id(junk)
    with pytest.raises(ValueError):
        hex_id(b"short")


def test_file_id_of_path_and_the_command_line(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(BIG[:BLOCK + 1])
    b.write_bytes(b"")
    assert file_id_of_path(a) == reference_id(BIG[:BLOCK + 1])
    assert blobs.main(["id", str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{file_id_of_path(a).hex()}  {a}", f"{reference_id(b'').hex()}  {b}"]
    assert blobs.main(["id", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


def test_store_error_codes_are_closed():
    with pytest.raises(ValueError):
        StoreError("oops", "no such code")
    e = StoreError("corrupt", "read another replica")
    assert e.code == "corrupt" and "read another replica" in str(e)


# ---- reads -----------------------------------------------------------------------------------------


@settings(max_examples=150, **SETTINGS)
@given(size=st.sampled_from(EDGE_SIZES) | st.integers(0, 3 * BLOCK + 5), offset=st.integers(0, 3 * BLOCK + 6),
       length=st.integers(0, 4 * BLOCK))
def test_read_returns_any_range_like_pread(shared, size, offset, length):
    data = BIG[:size]
    fid = shared.put_bytes(data)
    assert fid == reference_id(data) and shared.size(fid) == size
    if offset > size:
        with pytest.raises(StoreError) as e:
            shared.read(fid, offset, length)
        assert code_of(e) == "out_of_range"
    else:
        assert shared.read(fid, offset, length) == data[offset:offset + length]


@settings(max_examples=60, **SETTINGS)
@given(data=st.binary(max_size=2000))
def test_small_blobs_round_trip(shared, data):
    fid = shared.put_bytes(data)
    assert shared.has(fid)
    assert shared.read(fid, 0, len(data) + 10) == data


def test_out_of_range_and_bad_arguments(store):
    fid = store.put_bytes(b"abc")
    assert store.read(fid, 3, 10) == b""
    for offset, length in ((4, 1), (-1, 1), (0, -1)):
        with pytest.raises(StoreError) as e:
            store.read(fid, offset, length)
        assert code_of(e) == "out_of_range"
    with pytest.raises(StoreError) as e:
        store.read(b"short", 0, 1)
    assert code_of(e) == "bad_id"
    with pytest.raises(StoreError) as e:
        store.read(file_id(b"absent"), 0, 1)
    assert code_of(e) == "not_found"
    with pytest.raises(StoreError) as e:
        store.size(file_id(b"absent"))
    assert code_of(e) == "not_found"


def test_a_read_larger_than_max_read_is_refused(store, monkeypatch):
    monkeypatch.setattr(blobs, "MAX_READ", 100)
    fid = store.put_bytes(bytes(1000))
    assert len(store.read(fid, 0, 100)) == 100
    assert len(store.read(fid, 950, 10**9)) == 50  # clipped first, then checked
    with pytest.raises(StoreError) as e:
        store.read(fid, 0, 101)
    assert code_of(e) == "too_large"


def test_read_counters(store):
    fid = store.put_bytes(BIG[:BLOCK + 10])
    store.read(fid, 5, 100)
    store.read(fid, BLOCK, 10**9)
    assert store.counters["reads"] == 2 and store.counters["bytes_read"] == 110
    assert store.counters["finished"] == 1 and store.counters["bytes_written"] == BLOCK + 10


# ---- uploads ---------------------------------------------------------------------------------------


def test_upload_in_pieces_across_block_boundaries(store):
    fid = file_id(BIG)
    assert store.begin(fid, len(BIG)) == 0
    offset = 0
    for cut in (7, BLOCK + 3, BLOCK + 3, 3 * BLOCK, len(BIG)):
        offset = store.write(fid, offset, memoryview(BIG)[offset:cut])
        assert offset == cut
        assert not store.has(fid)
        assert_no_half_files(store)
    store.finish(fid)
    assert store.read(fid, 0, len(BIG)) == BIG
    assert store.partials() == []


def test_begin_dedupes_a_stored_blob(store):
    fid = store.put_bytes(b"hello")
    assert store.begin(fid, 5) == 5
    assert store.put_bytes(b"hello") == fid
    assert store.counters["dedupes"] == 2 and store.counters["finished"] == 1
    assert store.partials() == []
    with pytest.raises(StoreError) as e:
        store.begin(fid, 6)
    assert code_of(e) == "size_mismatch"


def test_begin_twice_returns_where_the_open_upload_is(store):
    fid = file_id(b"0123456789")
    store.begin(fid, 10)
    store.write(fid, 0, b"0123")
    assert store.begin(fid, 10) == 4
    with pytest.raises(StoreError) as e:
        store.begin(fid, 11)
    assert code_of(e) == "size_mismatch"
    store.abort(fid, keep=False)


@pytest.mark.parametrize("first", [3, BLOCK, BLOCK + 7])
@pytest.mark.parametrize("clean_close", [True, False])
def test_upload_resumes_after_a_restart(tmp_path, first, clean_close):
    data = BIG[:2 * BLOCK + 11]
    fid = file_id(data)
    old = BlobStore(tmp_path, fsync=True)
    assert old.begin(fid, len(data)) == 0
    old.write(fid, 0, data[:first])
    if clean_close:
        old.close()
    # else: the old object is simply abandoned, as a crashed process would leave it
    new = BlobStore(tmp_path, fsync=True)
    assert new.partials()[0][:2] == (fid, first)
    assert new.begin(fid, len(data)) == first
    assert new.write(fid, first, data[first:]) == len(data)
    new.finish(fid)
    assert new.read(fid, 0, len(data)) == data
    assert new.verify(fid) is None and new.partials() == []
    assert_no_half_files(new)
    new.close()


def test_abort_keeps_or_deletes_the_partial(store):
    fid = file_id(b"abcdef")
    store.begin(fid, 6)
    store.write(fid, 0, b"abc")
    store.abort(fid)
    assert [p[:2] for p in store.partials()] == [(fid, 3)]
    with pytest.raises(StoreError) as e:
        store.write(fid, 3, b"def")
    assert code_of(e) == "not_found"
    assert store.begin(fid, 6) == 3
    store.abort(fid, keep=False)
    assert store.partials() == []
    assert store.begin(fid, 6) == 0
    store.abort(fid)
    store.abort(fid, keep=False)  # no session: the partial is still removed
    assert store.partials() == []


def test_bad_offset_leaves_the_upload_usable(store):
    fid = file_id(b"abcdef")
    store.begin(fid, 6)
    store.write(fid, 0, b"abc")
    for offset in (0, 2, 4):
        with pytest.raises(StoreError, match="send from 3") as e:
            store.write(fid, offset, b"def")
        assert code_of(e) == "bad_offset"
    store.write(fid, 3, b"def")
    store.finish(fid)
    assert store.read(fid, 0, 6) == b"abcdef"


def test_size_mismatch_past_the_end_and_on_a_short_finish(store):
    fid = file_id(b"abcdef")
    store.begin(fid, 6)
    with pytest.raises(StoreError) as e:
        store.write(fid, 0, b"abcdefg")
    assert code_of(e) == "size_mismatch"
    store.write(fid, 0, b"abc")
    with pytest.raises(StoreError, match="from offset 3") as e:
        store.finish(fid)
    assert code_of(e) == "size_mismatch"
    assert not store.has(fid)
    store.write(fid, 3, b"def")  # the upload stayed open
    store.finish(fid)
    assert store.has(fid)


def test_hash_mismatch_leaves_nothing_behind(store):
    fid = file_id(b"what was promised")
    store.begin(fid, 17)
    store.write(fid, 0, b"what was delivered"[:17])
    with pytest.raises(StoreError) as e:
        store.finish(fid)
    assert code_of(e) == "hash_mismatch"
    assert not store.has(fid) and store.partials() == [] and list(store.ids()) == []
    assert store.counters["hash_mismatches"] == 1
    with pytest.raises(StoreError) as e:
        store.finish(fid)
    assert code_of(e) == "not_found"
    assert store.begin(fid, 17) == 0
    store.abort(fid, keep=False)


def test_put_path_stores_and_dedupes(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(BIG)
    with BlobStore(tmp_path / "store") as store:  # fsync on: the durable path
        fid = store.put_path(src)
        assert fid == reference_id(BIG)
        assert store.put_path(src) == fid and store.counters["dedupes"] == 1
        assert store.read(fid, BLOCK - 2, 4) == BIG[BLOCK - 2:BLOCK + 2]
        assert (blob_file(store, fid).stat().st_mode & 0o777) == 0o444
        assert_no_half_files(store)


def test_empty_blob(store):
    fid = store.put_bytes(b"")
    assert fid == reference_id(b"")
    assert store.read(fid, 0, 10) == b"" and store.size(fid) == 0 and store.verify(fid) is None


# ---- corruption and repair -------------------------------------------------------------------------


def test_a_flipped_byte_is_caught_reported_and_repaired(store):
    fid = store.put_bytes(BIG)
    assert store.read(fid, 0, 10) == BIG[:10]  # caches the fd: the flip must still be seen
    flip_byte(blob_file(store, fid), BLOCK + 1000)
    with pytest.raises(StoreError, match="block 1 ") as e:
        store.read(fid, BLOCK + 5, 10)
    assert code_of(e) == "corrupt"
    with pytest.raises(StoreError):
        store.read(fid, 0, len(BIG))  # a range that touches block 1 anywhere
    assert store.counters["corrupt_reads"] == 2
    assert store.read(fid, 0, BLOCK) == BIG[:BLOCK]
    assert store.read(fid, 2 * BLOCK, 10**9) == BIG[2 * BLOCK:]
    problem = store.verify(fid)
    assert problem is not None and "block 1 " in problem and "\n" not in problem
    store.replace_from(fid, [memoryview(BIG)[i:i + 100_000] for i in range(0, len(BIG), 100_000)])
    assert store.read(fid, 0, len(BIG)) == BIG
    assert store.verify(fid) is None
    assert store.counters["repairs"] == 1


def test_verify_tells_a_bad_sidecar_from_bad_data(store):
    fid = store.put_bytes(BIG[:BLOCK + 1])
    sidecar = Path(str(blob_file(store, fid)) + ".blocks")
    flip_byte(sidecar, 20)  # block 1's hash
    assert "sidecar differs from the data at block 1" in store.verify(fid)
    with pytest.raises(StoreError) as e:
        store.read(fid, BLOCK, 1)
    assert code_of(e) == "corrupt"
    sidecar.unlink()
    assert "sidecar of block hashes is missing" in store.verify(fid)
    store.replace_from(fid, [BIG[:BLOCK + 1]], size=BLOCK + 1)
    assert store.verify(fid) is None


def test_a_truncated_blob_is_corrupt(store):
    fid = store.put_bytes(BIG[:2 * BLOCK + 3])
    path = blob_file(store, fid)
    path.chmod(0o644)
    os.truncate(path, BLOCK + 5)
    with pytest.raises(StoreError) as e:
        store.read(fid, 0, 1)
    assert code_of(e) == "corrupt"
    assert "corrupt or truncated" in store.verify(fid)
    store.replace_from(fid, [BIG[:2 * BLOCK + 3]])
    assert store.read(fid, 0, 1) == BIG[:1]


def test_replace_from_refuses_a_bad_copy_and_keeps_the_old(store):
    fid = store.put_bytes(b"good")
    for chunks, size, code in (([b"evil"], None, "hash_mismatch"), ([b"go", b"od!"], 4, "size_mismatch"),
                               ([b"go"], 4, "size_mismatch")):
        with pytest.raises(StoreError) as e:
            store.replace_from(fid, chunks, size=size)
        assert code_of(e) == code
        assert store.read(fid, 0, 10) == b"good"
    assert list((store.root / "partial").iterdir()) == []


def test_replace_from_installs_a_missing_blob(store):
    fid = file_id(b"new")
    store.replace_from(fid, [b"n", b"ew"])
    assert store.read(fid, 0, 3) == b"new" and store.capacity()["blobs"] == 1


# ---- space -----------------------------------------------------------------------------------------


def test_no_space_when_the_reserve_exceeds_free_space(tmp_path):
    st_ = os.statvfs(tmp_path)
    free, used = st_.f_bavail * st_.f_frsize, (st_.f_blocks - st_.f_bavail) * st_.f_frsize
    margin = min(1 << 30, used // 2)  # above free space, yet leaving room under total (else: too_large)
    if margin < 1 << 20:
        pytest.skip("the file system under tmp_path is almost empty")
    store = BlobStore(tmp_path, reserve_bytes=free + margin, fsync=False)
    fid = file_id(b"x" * 1000)
    with pytest.raises(StoreError, match="try another node") as e:
        store.begin(fid, 1000)
    assert code_of(e) == "no_space" and store.counters["no_space"] == 1
    assert store.partials() == []
    with pytest.raises(StoreError) as e:
        store.put_bytes(b"x" * 1000)
    assert code_of(e) == "no_space"
    assert store.begin(file_id(b""), 0) == 0  # nothing to store needs no space
    store.abort(file_id(b""), keep=False)


def test_uploads_in_progress_count_against_free_space(tmp_path):
    st_ = os.statvfs(tmp_path)
    free = st_.f_bavail * st_.f_frsize
    if free < 2 << 30:
        pytest.skip("needs 2 GiB free (nothing is written)")
    store = BlobStore(tmp_path, reserve_bytes=free - (1 << 30), fsync=False)  # about 1 GiB usable
    a, b = file_id(b"a"), file_id(b"b")  # begin takes the id on trust; only finish checks it
    store.begin(a, 600 << 20)  # promises 600 MiB, writes nothing
    with pytest.raises(StoreError, match="promised") as e:
        store.begin(b, 600 << 20)
    assert code_of(e) == "no_space"
    store.abort(a, keep=False)
    assert store.begin(b, 600 << 20) == 0
    store.abort(b, keep=False)


def test_too_large_for_the_disk(store):
    total = store.capacity()["total_bytes"]
    with pytest.raises(StoreError) as e:
        store.begin(file_id(b"x"), total)
    assert code_of(e) == "too_large"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_real_enospc_mid_write_leaves_nothing(tiny_tmpfs):
    store = BlobStore(tiny_tmpfs / "store", reserve_bytes=0)
    data = BIG[:1536 << 10]
    fid = file_id(data)
    assert store.begin(fid, len(data)) == 0  # 1.5 MiB fits in 2 MiB ...
    store.write(fid, 0, data[:1000])
    (tiny_tmpfs / "filler").write_bytes(bytes(1 << 20))  # ... until someone else takes 1 MiB
    with pytest.raises(StoreError) as e:
        store.write(fid, 1000, data[1000:])
    assert code_of(e) == "no_space" and store.counters["no_space"] == 1
    assert store.partials() == [] and not store.has(fid) and list(store.ids()) == []
    assert_no_half_files(store)
    (tiny_tmpfs / "filler").unlink()
    assert store.put_bytes(data) == fid  # and the space is back
    store.close()


# ---- startup, listing, housekeeping ----------------------------------------------------------------


def test_startup_removes_temp_files_and_orphan_sidecars_but_keeps_partials(tmp_path):
    with BlobStore(tmp_path, fsync=False) as store:
        kept = store.put_bytes(b"kept")
        fid = file_id(b"resumable")
        store.begin(fid, 9)
        store.write(fid, 0, b"resu")
    orphan = file_id(b"orphan").hex()
    (tmp_path / "blobs" / orphan[:2]).mkdir(exist_ok=True)
    litter = [tmp_path / "blobs" / orphan[:2] / f"{orphan}.blocks",
              tmp_path / "blobs" / kept.hex()[:2] / f"{kept.hex()}.blocks.1234.tmp",
              tmp_path / "partial" / f"{orphan}.abcd.tmp"]
    for path in litter:
        path.write_bytes(b"half")
    with BlobStore(tmp_path, fsync=False) as store:
        assert not any(p.exists() for p in litter)
        assert store.read(kept, 0, 4) == b"kept"
        assert store.begin(fid, 9) == 4
        assert store.capacity()["blobs"] == 1
        assert_no_half_files(store)


def test_ids_capacity_and_delete(store):
    fids = sorted(store.put_bytes(bytes([i]) * (i * 1000)) for i in range(5))
    assert [f for f, _mtime in store.ids()] == fids
    assert all(isinstance(m, float) for _f, m in store.ids())
    part = file_id(b"partial!")
    store.begin(part, 8)
    store.write(part, 0, b"part")
    cap = store.capacity()
    assert (cap["blobs"], cap["blob_bytes"], cap["partials"], cap["partial_bytes"]) == (5, 10_000, 1, 4)
    assert cap["total_bytes"] >= cap["free_bytes"] > 0 and cap["reserve_bytes"] == 64 << 20
    assert store.read(fids[1], 0, 1)  # cache its fd
    assert store.delete(fids[1]) is True and store.delete(fids[1]) is False
    assert not store.has(fids[1])
    with pytest.raises(StoreError) as e:
        store.read(fids[1], 0, 1)
    assert code_of(e) == "not_found"
    with pytest.raises(StoreError) as e:
        store.verify(fids[1])
    assert code_of(e) == "not_found"
    assert store.capacity()["blobs"] == 4 and store.counters["deleted"] == 1
    store.abort(part, keep=False)


def test_drop_stale_partials(store):
    now = time.time()
    idle, live, open_ = file_id(b"idle..."), file_id(b"live..."), file_id(b"open...")
    for fid in (idle, live, open_):
        store.begin(fid, 7)
        store.write(fid, 0, b"abc")
    store.abort(idle)  # kept on disk, no session
    store.abort(live)
    os.utime(store.root / "partial" / f"{live.hex()}.part", (now + 500, now + 500))
    assert store.drop_stale_partials(100, now + 300) == sorted([idle, open_])
    assert [p[0] for p in store.partials()] == [live]
    with pytest.raises(StoreError) as e:
        store.write(open_, 3, b"def")  # its session was closed with it
    assert code_of(e) == "not_found"
    store.abort(live, keep=False)


# ---- threads ---------------------------------------------------------------------------------------


def test_readers_never_see_a_half_or_wrong_file_while_blobs_are_deleted_and_replaced(tmp_path):
    store = BlobStore(tmp_path, fsync=False, open_files=2)  # a tiny fd cache: evictions too
    contents = [random.Random(i).randbytes(BLOCK + 100 * i) for i in range(4)]
    fids = [store.put_bytes(c) for c in contents]
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                i = rng.randrange(len(fids))
                offset = rng.randrange(len(contents[i]))
                try:
                    got = store.read(fids[i], offset, 70_000)
                except StoreError as e:
                    if e.code != "not_found":
                        raise
                    continue
                assert got == contents[i][offset:offset + 70_000]
                reads[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        round_ = 0
        while round_ < 30 or (reads[0] < 30 and round_ < 3000 and not stop.is_set()):
            i = round_ % len(fids)
            round_ += 1
            if round_ % 3 == 0:
                store.delete(fids[i])
                store.put_bytes(contents[i])
            elif round_ % 3 == 1:
                store.replace_from(fids[i], [contents[i]])
            else:
                assert store.verify(fids[i]) is None
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures
    assert reads[0] > 0
    assert_no_half_files(store)
    store.close()


def test_concurrent_uploads_of_different_blobs(store):
    contents = [bytes([i]) * (BLOCK // 2 + i) for i in range(4)]
    errors: list[BaseException] = []

    def upload(data: bytes) -> None:
        try:
            fid = file_id(data)
            offset = store.begin(fid, len(data))
            for i in range(offset, len(data), 4096):
                store.write(fid, i, data[i:i + 4096])
            store.finish(fid)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(f for f, _m in store.ids()) == sorted(file_id(c) for c in contents)



@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 8 * BLOCK, 8 * BLOCK + 5, 17 * BLOCK + 3])
def test_the_threaded_path_hash_equals_the_single_pass_id(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_id_of_path(path) == file_id_of_path(path, threads=1) == file_id(data)
