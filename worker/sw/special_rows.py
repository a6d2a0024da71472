"""Special rows: the score pass's H and F rows that the traceback starts from.

Theory of operation
-------------------
A traceback in linear space (CUDAlign's stages 2-5, ``worker.sw.trace``) needs, for every
``stride``-th reference row ``r`` of the matrix, the forward values H[r][-1..n-1] and
F[r][0..n-1] that the score pass computed. Each tile of the score pass keeps its segment of
those rows (``sw_tile(special_stride=...)``) in one file; the traceback assembles a row from the
files of the tiles in its tile row.

File (little-endian): a 60-byte header (magic ``b"SWR1"``, version u32, then tile row, tile
col, row0, col0, width as i64, stride and count as u32, flags u32 with bit 0 = pruned), then
``count`` entries of (global row i64, bytes of H u32, bytes of F u32), then the compressed
arrays in that order. A pruned tile keeps no rows: by the score pass's contract its H is 0 and
its F is ``NEG``, lower bounds that no optimal path touches.

Compression follows MASA's advice for these rows: neighbouring values differ by little (H by
at most gap_open + match along a row, except where F or a border jumps), so each row is
delta-coded, one byte a delta (int8; the rare larger deltas escaped and kept as int32 after),
and zlib'd at level 1. On H. pylori tiles that is ~14x smaller than int32 at ~0.9 ms per
65,536 values: half the time of zlib over byte-shuffled int32 deltas, for a smaller file.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"SWR1"
VERSION = 2
FLAG_PRUNED = 1
NEG = -(2**28)
_HEADER = struct.Struct("<4sIqqqqqIII")
_ENTRY = struct.Struct("<qII")


class SpecialRowsError(ValueError):
    """A special-rows file that is not one, is cut short, or does not hold the row asked for."""


_ZLEN = struct.Struct("<I")
ESCAPE = -128  # an int8 delta that says "the next int32 of the escapes holds this delta"


def pack(values: np.ndarray) -> bytes:
    """Delta-code, then one byte a delta (int8, ``ESCAPE`` for the rare larger ones, which
    follow as int32), zlib level 1 over the bytes (see the module docstring)."""
    d = np.diff(np.asarray(values, np.int64), prepend=0)
    small = (d > ESCAPE) & (d < 128)
    packed = zlib.compress(np.where(small, d, ESCAPE).astype(np.int8).tobytes(), 1)
    return _ZLEN.pack(len(packed)) + packed + d[~small].astype("<i4").tobytes()


def unpack(data: bytes, count: int) -> np.ndarray:
    """The int32 values ``pack`` packed; ``count`` of them."""
    try:
        (zlen,) = _ZLEN.unpack_from(data)
        raw = zlib.decompress(data[_ZLEN.size:_ZLEN.size + zlen])
    except (struct.error, zlib.error) as exc:
        raise SpecialRowsError(f"a packed row is damaged: {exc}") from None
    if len(raw) != count:
        raise SpecialRowsError(f"a packed row holds {len(raw)} values, expected {count}")
    d = np.frombuffer(raw, np.int8).astype(np.int64)
    escapes = np.flatnonzero(d == ESCAPE)
    tail = np.frombuffer(data, "<i4", offset=_ZLEN.size + zlen) if len(data) > _ZLEN.size + zlen else np.zeros(0, "<i4")
    if tail.size != escapes.size:
        raise SpecialRowsError(f"a packed row has {escapes.size} escaped deltas but {tail.size} values for them")
    d[escapes] = tail
    return np.cumsum(d).astype(np.int32)


def write_rows(path: str | Path, tile_row: int, tile_col: int, row0: int, col0: int, width: int,
               stride: int, rows: list, pruned: bool = False) -> int:
    """Write a tile's special rows (``(global row, h, f)``, h with W + 1 values and f with W) to
    ``path`` under a temporary name, then rename. Returns the file's size."""
    blobs = [(r, pack(h), pack(f)) for r, h, f in rows]
    header = _HEADER.pack(MAGIC, VERSION, tile_row, tile_col, row0, col0, width, stride,
                          len(blobs), FLAG_PRUNED if pruned else 0)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for r, bh, bf in blobs:
            f.write(_ENTRY.pack(r, len(bh), len(bf)))
        for _, bh, bf in blobs:
            f.write(bh)
            f.write(bf)
    os.replace(tmp, path)
    return path.stat().st_size


@dataclass
class TileRows:
    """One tile's special rows, read lazily: ``row(r)`` unpacks a row on demand."""

    path: str
    tile_row: int
    tile_col: int
    row0: int
    col0: int
    width: int
    stride: int
    pruned: bool
    offsets: dict  # global row -> (offset, bytes of H, bytes of F)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(h, f) of global row ``r``: h holds W + 1 values (the corner first), f holds W."""
        if self.pruned:
            return np.zeros(self.width + 1, np.int32), np.full(self.width, NEG, np.int32)
        where = self.offsets.get(r)
        if where is None:
            raise SpecialRowsError(f"{self.path} (tile {self.tile_row},{self.tile_col}) keeps no "
                                   f"row {r}; it keeps {sorted(self.offsets)}")
        offset, nh, nf = where
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(nh + nf)
        if len(data) != nh + nf:
            raise SpecialRowsError(f"{self.path} is cut short in row {r}")
        return unpack(data[:nh], self.width + 1), unpack(data[nh:], self.width)


def read_rows(path: str | Path) -> TileRows:
    """Read a special-rows file's header and index; SpecialRowsError if it is not a whole one."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise SpecialRowsError(f"{path} holds {len(head)} bytes, fewer than its header")
            magic, version, trow, tcol, row0, col0, width, stride, count, flags = _HEADER.unpack(head)
            if magic != MAGIC:
                raise SpecialRowsError(f"{path} is not a special-rows file (magic {magic!r})")
            if version != VERSION:
                raise SpecialRowsError(f"{path} has version {version}; this reads {VERSION}")
            index = f.read(_ENTRY.size * count)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise SpecialRowsError(f"cannot read special-rows file {path}: {exc.strerror or exc}") from None
    if len(index) != _ENTRY.size * count:
        raise SpecialRowsError(f"{path} is cut short in its index")
    offsets = {}
    offset = _HEADER.size + _ENTRY.size * count
    for k in range(count):
        r, nh, nf = _ENTRY.unpack_from(index, k * _ENTRY.size)
        offsets[r] = (offset, nh, nf)
        offset += nh + nf
    if offset != size:
        raise SpecialRowsError(f"{path} holds {size} bytes; its index describes {offset}")
    return TileRows(path, trow, tcol, row0, col0, width, stride, bool(flags & FLAG_PRUNED), offsets)


class RowStore:
    """The special rows of a whole matrix, from its tiles' files.

    ``h(r, lo, hi)`` is H[r][lo-1 .. hi] (hi - lo + 2 values; column -1 is the matrix's left
    edge, H = 0) and ``f(r, lo, hi)`` is F[r][lo .. hi]. ``rows`` lists the special rows kept.
    Unpacked tile rows are cached, a few at a time (one strip of the traceback reads one row).
    """

    def __init__(self, tiles: list[TileRows], length_a: int) -> None:
        self.length_a = length_a
        self.by_row: dict[int, list[TileRows]] = {}
        strides = {t.stride for t in tiles}
        if len(strides) > 1:
            raise SpecialRowsError(f"the tiles' special rows were kept at different strides {sorted(strides)}")
        self.stride = strides.pop() if strides else 0
        for t in tiles:
            self.by_row.setdefault(t.tile_row, []).append(t)
        self._tile_rows = {}  # global row -> its tile row's sorted tiles
        for trow, group in self.by_row.items():
            group.sort(key=lambda t: t.col0)
            covered = sum(t.width for t in group)
            if covered != length_a or any(group[k].col0 + group[k].width != group[k + 1].col0
                                          for k in range(len(group) - 1)):
                raise SpecialRowsError(f"tile row {trow}'s special rows cover {covered} of "
                                       f"{length_a} columns: a tile's file is missing")
            rows = set().union(*(t.offsets for t in group if not t.pruned))
            for r in rows:
                self._tile_rows[r] = group
        self.rows = sorted(self._tile_rows)
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _segment(self, tile: TileRows, r: int):
        key = (r, tile.col0)
        got = self._cache.get(key)
        if got is None:
            got = tile.row(r)
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = got
        return got

    def h(self, r: int, lo: int, hi: int) -> np.ndarray:
        """H[r][lo-1 .. hi] as int64."""
        out = np.empty(hi - lo + 2, np.int64)
        out[0] = 0
        if lo > 0:
            out[0] = self._values(r, lo - 1, lo - 1, True)[0]
        if hi >= lo:
            out[1:] = self._values(r, lo, hi, True)
        return out

    def f(self, r: int, lo: int, hi: int) -> np.ndarray:
        """F[r][lo .. hi] as int64."""
        return self._values(r, lo, hi, False)

    def _values(self, r: int, lo: int, hi: int, want_h: bool) -> np.ndarray:
        group = self._tile_rows.get(r)
        if group is None:
            raise SpecialRowsError(f"row {r} is not a special row kept by the score pass")
        out = np.empty(hi - lo + 1, np.int64)
        for t in group:
            a, b = max(lo, t.col0), min(hi, t.col0 + t.width - 1)
            if a > b:
                continue
            h, f = self._segment(t, r)
            if want_h:
                out[a - lo:b - lo + 1] = h[a - t.col0 + 1:b - t.col0 + 2]
            else:
                out[a - lo:b - lo + 1] = f[a - t.col0:b - t.col0 + 1]
        return out
