"""The dot plot of one alignment: the pair's shared k-mers as dots, the optimal path over them.

Theory of operation. A dot plot shows what the two sequences share, as MUMmer's mummerplot,
Gepard or a minimap2 self-map do: every k-mer of A found again in B is a dot at (position in
A, position in B); homologous regions show as diagonal runs of dots (anti-diagonal for a
reverse-complement match), rearrangements and repeats as runs off the main diagonal. Over them
we draw the optimal local alignment's path, from its start cell and CIGAR, and a second panel
zooms onto the aligned region (``zoom_box``).

The k-mers are found with numpy alone, bounded in time and memory, so a pair of bacterial
genomes (1.6 x 1.7 Mbp) takes about a second on a 2-core VM:

1. **Codes.** Each sequence is read as 2-bit letters (case ignored; a k-mer holding any other
   letter, such as N, is skipped) and every k-mer becomes one integer code, built by k shifted
   adds over the array (k <= 31 fits a uint64). The reverse-complement codes of B are built the
   same way, so a k-mer of A equal to a code of B's reverse strand is a reverse match.
2. **k from the lengths** (``choose_k``): two random sequences share about
   len_a * len_b / 4^k k-mers by chance, so k is the smallest value keeping that under
   ``NOISE_PER_LETTER`` (one per 5,000 letters of the pair; clipped to 11..20). The demo pair
   (19 x 23 kbp) gets k = 13, a pair of 1.7 Mbp genomes k = 16: short enough that regions of
   ~85% identity still share runs of k-mers (0.85^16 = 7% of their positions start one), and
   on real genomes, whose k-mers are far from uniform, k = 14 already left a dense speckle of
   chance (and k = 20 costs sensitivity). The zoom panel takes k from its own box (at least
   ``ZOOM_MIN_K``): a few hundred letters afford k = 9, which shows a 70%-identity path's seeds.
3. **Sampling** (``minimizers``): up to ``ALL_KMERS_UP_TO`` letters every k-mer is kept; a
   longer sequence keeps only its (w, k)-minimizers (the k-mer of least hash among w
   neighbours, Roberts et al. 2004, as minimap2 does), with w chosen so that about
   ``ALL_KMERS_UP_TO`` k-mers remain: both sequences pick the same k-mers where they agree,
   and the codes are computed in chunks, so memory stays bounded however long the pair.
4. **Repeats dropped.** A k-mer seen more than ``MAX_OCCURRENCES`` times in either sequence is
   dropped (as minimap2's -f drops frequent minimizers): it would add a block of
   occurrences_a x occurrences_b dots saying only "repeat". So the pairs number at most
   ``MAX_OCCURRENCES`` x min(kept k-mers of A, of B).
5. **Join by sorting.** Each side's codes are argsorted once (runs of equal codes give each
   code's occurrences), the shared codes found with ``np.intersect1d``, and every pair of
   their occurrences spelled out with ``np.repeat``: no Python loop over k-mers, 4-byte
   positions, ~140 MiB at most for the H. pylori pair.
6. **Chance removed** (``accompanied``, whole-pair panel): a dot is kept when another exact
   match lies on its diagonal within ``REACH`` letters, or its own run of matching letters is
   2k - 1 long. Homologous regions have many such; a k-mer shared by chance almost never has.
7. **Rasterised** (``thin``): a panel a few hundred pixels wide cannot show more dots than
   pixels, so the pairs are binned into ``GRID`` x ``GRID`` cells of the panel, one dot kept per
   cell and strand, then at most ``MAX_POINTS`` of them (a seeded sample) are drawn.

matplotlib is imported inside ``render`` only, so importing this module stays light.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.sw import cigar

MIN_K, MAX_K = 11, 20
ZOOM_MIN_K = 8  # the zoom panel's region is small: shorter k-mers show its weaker similarity
NOISE_PER_LETTER = 2e-4  # random shared k-mers allowed per letter of A and B together
MAX_OCCURRENCES = 4  # a k-mer seen more often on either side is a repeat: not drawn
ALL_KMERS_UP_TO = 4_000_000  # letters up to which every k-mer is kept (no minimizer sampling)
REACH = 300  # letters between two exact matches on one diagonal that make them a similarity
GRID = 700  # cells per panel side when rasterising the dots
MAX_POINTS = 40_000  # dots drawn per panel and strand, at most
PATH_POINTS = 10_000  # points of the drawn path, at most
ZOOM_COLUMNS = 2_000  # the zoom's columns when the aligned region is most of the pair
_CHUNK = 1 << 20  # letters per pass when computing codes (~50 bytes of temporaries each)
_HASH = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: minimizers must not prefer poly-A

FORWARD_COLOUR = "#1f5fbf"  # blue
REVERSE_COLOUR = "#d62728"  # red
PATH_COLOUR = "#ff9f00"  # amber, drawn wide over the dots
ZOOM_COLOUR = "#2ca02c"  # the zoom panel's frame on the whole plot

_CODE = np.full(256, 4, dtype=np.uint8)  # A C G T (either case) -> 0..3, anything else 4
for _i, _ch in enumerate("ACGT"):
    _CODE[ord(_ch)] = _CODE[ord(_ch.lower())] = _i


@dataclass(frozen=True, slots=True)
class Dots:
    """Shared k-mers: the k-mer at ``x`` in A equals the one at ``y`` in B (``reverse``: equals
    its reverse complement). Positions are 0-based k-mer starts."""

    x: np.ndarray
    y: np.ndarray
    reverse: np.ndarray
    k: int

    def __len__(self) -> int:
        return int(self.x.size)

    def take(self, keep: np.ndarray) -> Dots:
        return Dots(self.x[keep], self.y[keep], self.reverse[keep], self.k)


def choose_k(len_a: int, len_b: int, lowest: int = MIN_K) -> int:
    """The smallest k in [lowest, MAX_K] with len_a * len_b / 4^k (the shared k-mers two random
    sequences would have) at most NOISE_PER_LETTER * (len_a + len_b), or 1."""
    noise = max(1.0, NOISE_PER_LETTER * (len_a + len_b))
    k = math.ceil(math.log(max(1, len_a) * max(1, len_b) / noise, 4))
    return min(MAX_K, max(lowest, k))


def encode(seq: str) -> np.ndarray:
    """2-bit letters (uint8 0..3) of ``seq``; 4 for any letter but ACGT/acgt."""
    return _CODE[np.frombuffer(seq.encode("ascii", "replace"), dtype=np.uint8)]


def kmer_codes(letters: np.ndarray, k: int, *, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(codes, starts): the uint64 code of every k-mer of ``letters`` (``encode``'s output) that
    holds only ACGT, and its start. ``reverse``: the code of each k-mer's reverse complement."""
    if not 1 <= k <= 31:
        raise ValueError(f"k must be in 1..31, got {k}")
    n = letters.size - k + 1
    if n <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    digits = np.minimum(letters, 3).astype(np.uint64)
    if reverse:  # the complement, and the k-mer's first letter becomes its lowest digit
        digits = np.uint64(3) - digits
    codes = np.zeros(n, dtype=np.uint64)
    for j in range(k):
        codes |= digits[j:j + n] << np.uint64(2 * j if reverse else 2 * (k - 1 - j))
    bad = np.concatenate(([0], np.cumsum(letters == 4, dtype=np.int64)))
    ok = bad[k:] == bad[:n]
    starts = np.flatnonzero(ok)
    return codes[ok], starts


def minimizers(seq: str, k: int, w: int, *, reverse: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(codes, starts) of the k-mers ``seq`` keeps, chunk by chunk: all of them when w == 1,
    else the one of least hash in each run of w consecutive ACGT-only k-mers. Chunks overlap by
    k + w - 2 letters; each yields the picks of the windows that begin in it, so a k-mer picked
    on both sides of a chunk edge comes twice (``_table`` drops the copy)."""
    step = max(_CHUNK, 4 * (k + w))
    for c0 in range(0, max(1, len(seq) - k + 1), step):
        letters = encode(seq[c0:c0 + step + k + w - 2])
        codes, starts = kmer_codes(letters, k, reverse=reverse)
        if w > 1 and codes.size >= w:
            windows = np.lib.stride_tricks.sliding_window_view(codes * _HASH, w)  # wraps mod 2^64
            first = np.flatnonzero(starts[:windows.shape[0]] < step)
            pick = np.unique(first + windows[first].argmin(axis=1))
            codes, starts = codes[pick], starts[pick]
        else:
            own = starts < step
            codes, starts = codes[own], starts[own]
        yield codes, starts + c0


def _table(seq: str, k: int, w: int, reverse: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(codes, first, count, starts): the distinct codes seen at most MAX_OCCURRENCES times,
    where their occurrences begin in ``starts`` (sorted by code) and how many there are."""
    parts = list(minimizers(seq, k, w, reverse=reverse))
    codes = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.uint64)
    starts = np.concatenate([s for _, s in parts]) if parts else np.zeros(0, np.int64)
    if w > 1:  # a pick on both sides of a chunk edge
        starts, once = np.unique(starts, return_index=True)
        codes = codes[once]
    index = np.int32 if len(seq) < 2**31 else np.int64  # 4 bytes a k-mer where they suffice
    order = np.argsort(codes)  # the order of one code's occurrences does not matter
    codes, starts = codes[order], starts[order].astype(index)
    del order
    first = np.flatnonzero(np.concatenate(([codes.size > 0], codes[1:] != codes[:-1]))).astype(index)
    count = np.diff(np.append(first, index(codes.size)))
    keep = count <= MAX_OCCURRENCES
    return codes[first[keep]], first[keep], count[keep], starts


def _pairs(ta: tuple, tb: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Every (start in A, start in B) of the codes both tables hold."""
    codes_a, first_a, count_a, starts_a = ta
    codes_b, first_b, count_b, starts_b = tb
    _, ia, ib = np.intersect1d(codes_a, codes_b, assume_unique=True, return_indices=True)
    na, nb = count_a[ia], count_b[ib]
    per_code = na * nb
    group = np.repeat(np.arange(ia.size), per_code)
    offset = np.arange(group.size) - np.repeat(np.cumsum(per_code) - per_code, per_code)
    x = starts_a[first_a[ia][group] + offset // nb[group]]
    y = starts_b[first_b[ib][group] + offset % nb[group]]
    return x, y


def window(length: int) -> int:
    """The minimizer window for a sequence of ``length`` letters: 1 (every k-mer) up to
    ALL_KMERS_UP_TO letters, else about 2 * length / ALL_KMERS_UP_TO (w, k)-minimizers
    leave ~2 / (w + 1) of the k-mers, so about ALL_KMERS_UP_TO remain."""
    return 1 if length <= ALL_KMERS_UP_TO else math.ceil(2 * length / ALL_KMERS_UP_TO)


def shared_kmers(seq_a: str, seq_b: str, k: int | None = None, *, reverse: bool = True) -> Dots:
    """The k-mers A and B share (forward, and with ``reverse`` also A against B's reverse
    complement), repeats dropped (module docstring). ``k`` defaults to ``choose_k``."""
    k = choose_k(len(seq_a), len(seq_b)) if k is None else k
    w = window(max(len(seq_a), len(seq_b)))
    ta = _table(seq_a, k, w)
    xs, ys, rs = [], [], []
    for rev in ((False, True) if reverse else (False,)):
        x, y = _pairs(ta, _table(seq_b, k, w, reverse=rev))
        xs.append(x)
        ys.append(y)
        rs.append(np.full(x.size, rev))
    return Dots(np.concatenate(xs).astype(np.int64), np.concatenate(ys).astype(np.int64),
                np.concatenate(rs), k)


def accompanied(dots: Dots, reach: int = REACH) -> np.ndarray:
    """A mask of the dots that belong to a similarity rather than to chance: those of an exact
    match of at least 2k - 1 letters (k consecutive k-mers on one diagonal), or with another
    exact match on their diagonal (x - y forward, x + y reverse) at most ``reach`` letters
    away. Two random sequences share such a pair of k-mers with odds ~2 reach / 4^k (1e-4
    for k = 11, reach = 300); a region of ~80% identity or more has several per diagonal."""
    if not len(dots):
        return np.zeros(0, dtype=bool)
    diag = np.where(dots.reverse, dots.x + dots.y, dots.x - dots.y)
    order = np.lexsort((dots.x, diag, dots.reverse))
    rev, dg, x = dots.reverse[order], diag[order], dots.x[order]
    same = (rev[1:] == rev[:-1]) & (dg[1:] == dg[:-1])
    starts = np.concatenate(([True], ~(same & (np.diff(x) == 1))))  # runs of consecutive k-mers
    run = np.cumsum(starts) - 1
    first, last = x[starts], x[np.concatenate((starts[1:], [True]))]
    rrev, rdg = rev[starts], dg[starts]
    near = (rrev[1:] == rrev[:-1]) & (rdg[1:] == rdg[:-1]) & (first[1:] - last[:-1] - dots.k <= reach)
    keep = last - first + 1 >= dots.k
    keep[1:] |= near
    keep[:-1] |= near
    mask = np.empty(len(dots), dtype=bool)
    mask[order] = keep[run]
    return mask


def thin(dots: Dots, box: tuple[float, float, float, float], *, grid: int = GRID,
         max_points: int = MAX_POINTS, seed: int = 0) -> Dots:
    """The dots inside ``box`` (x0, x1, y0, y1: k-mer starts in [x0, x1) x [y0, y1)), one per
    cell of a ``grid`` x ``grid`` raster of the box and strand, then at most ``max_points`` per
    strand (a seeded sample): what a panel of about ``grid`` pixels can show."""
    x0, x1, y0, y1 = box
    inside = (dots.x >= x0) & (dots.x < x1) & (dots.y >= y0) & (dots.y < y1)
    d = dots.take(inside)
    cx = ((d.x - x0) * grid // max(1.0, x1 - x0)).astype(np.int64)
    cy = ((d.y - y0) * grid // max(1.0, y1 - y0)).astype(np.int64)
    cell = (cx * grid + cy) * 2 + d.reverse
    _, first = np.unique(cell, return_index=True)
    d = d.take(np.sort(first))
    rng = np.random.default_rng(seed)
    keep = []
    for rev in (False, True):
        idx = np.flatnonzero(d.reverse == rev)
        if idx.size > max_points:
            idx = np.sort(rng.choice(idx, max_points, replace=False))
        keep.append(idx)
    return d.take(np.concatenate(keep))


def path_points(record: Any, max_points: int = PATH_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): positions in A and B along the alignment path, from its start corner
    (start_a, start_b) to its end corner (end_a + 1, end_b + 1), at most ``max_points``
    points evenly spaced over the columns (both ends always included)."""
    in_a, in_b = cigar.consumed(record.ops)
    x = record.start_a + np.concatenate(([0], np.cumsum(in_a, dtype=np.int64)))
    y = record.start_b + np.concatenate(([0], np.cumsum(in_b, dtype=np.int64)))
    if x.size > max_points:
        keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
        x, y = x[keep], y[keep]
    return x, y


# --- drawing ----------------------------------------------------------------------------------

def zoom_box(record: Any) -> tuple[tuple[int, int, int, int], str]:
    """(x0, x1, y0, y1) and a caption: a square of the aligned region's larger span plus a
    fifth (at least 40 letters), centred on it and moved inside the two sequences. When the
    region is more than half of the pair (two genomes aligned end to end), a zoom onto it
    would repeat the whole plot: the square is then around the first ``ZOOM_COLUMNS`` columns
    of the path, where its letters and gaps can be seen."""
    r = record
    lo_a, hi_a, lo_b, hi_b = r.start_a, r.end_a + 1, r.start_b, r.end_b + 1
    caption = "aligned region"
    if max(hi_a - lo_a, hi_b - lo_b) > max(r.len_a, r.len_b) / 2 and r.ops.size > ZOOM_COLUMNS:
        in_a, in_b = cigar.consumed(r.ops[:ZOOM_COLUMNS])
        hi_a, hi_b = lo_a + int(in_a.sum()), lo_b + int(in_b.sum())
        caption = f"the alignment's first {ZOOM_COLUMNS:,} columns"
    side = max(40, round(1.2 * max(hi_a - lo_a, hi_b - lo_b)))
    out = []
    for lo, hi, length in ((lo_a, hi_a, r.len_a), (lo_b, hi_b, r.len_b)):
        s = min(side, length)
        x0 = min(max(0, (lo + hi - s) // 2), length - s)
        out += [x0, x0 + s]
    return (out[0], out[1], out[2], out[3]), caption


def panel_dots(seq_a: str, seq_b: str, box: tuple[int, int, int, int], *, lowest: int = MIN_K,
               whole: Dots | None = None) -> Dots:
    """The dots a panel over ``box`` shows, ``thin``ned to what it can show: ``whole``'s when
    they have the k this box gets (``choose_k`` of its sides, at least ``lowest``), else the
    shared k-mers of its two stretches. Those are not filtered by ``accompanied``: k keeps the
    k-mers shared by chance under one for a box of a few hundred letters, and the lone exact
    matches the path runs through are what a zoom is for. Positions are k-mer starts."""
    x0, x1, y0, y1 = box
    k = choose_k(x1 - x0, y1 - y0, lowest)
    if whole is not None and whole.k == k:
        dots = whole
    else:
        found = shared_kmers(seq_a[x0:x1 + k - 1], seq_b[y0:y1 + k - 1], k)
        dots = Dots(found.x + x0, found.y + y0, found.reverse, k)
    return thin(dots, (x0 - k / 2, x1 - k / 2, y0 - k / 2, y1 - k / 2))


def _short(name: str, limit: int = 56) -> str:
    """A name fit for an axis label: whitespace runs as one space (a tab has no glyph), cut."""
    name = " ".join(name.split())
    return name if len(name) <= limit else name[:limit - 1] + "\u2026"


def _draw(ax: Any, dots: Dots, px: np.ndarray, py: np.ndarray, box: tuple, *, marker: float) -> None:
    """One panel: each strand's dots, as k-letter strokes where those are 3 pixels long or
    more (else as dots of ``marker`` points at the k-mers' centres), then the path over them."""
    from matplotlib.collections import LineCollection  # lazy: matplotlib (see ``render``)

    x0, x1, y0, y1 = box
    k = dots.k
    strokes = k * GRID / max(x1 - x0, y1 - y0) >= 3
    for rev, colour in ((False, FORWARD_COLOUR), (True, REVERSE_COLOUR)):
        x, y = dots.x[dots.reverse == rev], dots.y[dots.reverse == rev]
        if strokes:  # A[x, x+k) against B[y, y+k): a diagonal, or an anti-diagonal if reverse
            ends = np.stack([np.stack([x, y + k * rev], 1), np.stack([x + k, y + k * (not rev)], 1)], 1)
            ax.add_collection(LineCollection(ends, colors=colour, linewidths=6, alpha=0.6, zorder=2))
        else:
            ax.plot(x + k / 2, y + k / 2, linestyle="none", marker="o", markersize=marker, markeredgewidth=0,
                    color=colour, zorder=2)
    if not len(dots):
        ax.text(0.5, 0.97, f"no shared {k}-mers here beyond chance", transform=ax.transAxes, ha="center",
                va="top", fontsize="small", color="#555555")
    ax.plot(px, py, color=PATH_COLOUR, linewidth=2, solid_capstyle="round", zorder=3)
    ax.plot([px[0]], [py[0]], "o", color=PATH_COLOUR, markeredgecolor="black", markersize=6, zorder=4)
    ax.plot([px[-1]], [py[-1]], "s", color=PATH_COLOUR, markeredgecolor="black", markersize=6, zorder=4)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    if max(x1 - x0, y1 - y0) <= 3 * min(x1 - x0, y1 - y0):
        ax.set_aspect("equal", adjustable="box")  # diagonals at 45 degrees
    ax.grid(True, color="#dddddd", linewidth=0.6, zorder=0)


def _label(fig: Any, whole: Any, zoom: Any, record: Any, shown: tuple[Dots, Dots], caption: str,
           title: str | None) -> None:
    """Axis names in bp, the panels' titles, the figure's title and its legend."""
    from matplotlib.lines import Line2D  # lazy: matplotlib (see ``render``)
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import EngFormatter, FuncFormatter

    r = record
    whole.set_xlabel(f"A: {_short(r.name_a)} ({r.len_a:,} bp)")
    whole.set_ylabel(f"B: {_short(r.name_b)} ({r.len_b:,} bp)")
    (x0, x1), (y0, y1) = zoom.get_xlim(), zoom.get_ylim()
    zoom.set_xlabel(f"A (bp), {x0 + 1:,.0f}..{x1:,.0f}")
    zoom.set_ylabel(f"B (bp), {y0 + 1:,.0f}..{y1:,.0f}")
    for axis in (whole.xaxis, whole.yaxis):
        axis.set_major_formatter(EngFormatter(unit="bp"))
    for axis in (zoom.xaxis, zoom.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    for ax, what, dots in ((whole, "whole pair", shown[0]), (zoom, caption, shown[1])):
        ax.set_title(f"{what}: shared {dots.k}-mers", fontsize="medium")
    stats = cigar.stats(r.ops)
    fig.suptitle(title if title is not None else
                 f"score {int(r.score):,}, {stats['identity']:.1%} identity over {stats['columns']:,} columns: "
                 f"A[{r.start_a + 1:,}..{r.end_a + 1:,}] x B[{r.start_b + 1:,}..{r.end_b + 1:,}]")
    handles = [
        Line2D([], [], linestyle="none", marker="o", color=FORWARD_COLOUR, label="shared k-mer, forward"),
        Line2D([], [], linestyle="none", marker="o", color=REVERSE_COLOUR, label="shared k-mer, reverse complement"),
        Line2D([], [], color=PATH_COLOUR, linewidth=2, label="optimal local alignment (\u25cb start, \u25a1 end)"),
        Rectangle((0, 0), 1, 1, fill=False, edgecolor=ZOOM_COLOUR, linestyle="--", label="zoomed region"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize="small", frameon=False)


def render(record: Any, *, title: str | None = None) -> tuple[Any, tuple[Dots, Dots]]:
    """The dot plot of ``record`` (an ``alnout.AlignmentRecord``, which holds both sequences):
    a matplotlib Figure with the whole pair on the left (``fig.axes[0]``), the aligned region
    on the right (``fig.axes[1]``) and the legend below them, and the dots each panel shows."""
    # Imported here: matplotlib costs ~0.3 s to import and only the dot plot needs it. The
    # Figure API without pyplot keeps no global state, so it is safe from worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    r = record
    px, py = path_points(r)
    found = shared_kmers(r.seq_a, r.seq_b)
    everywhere = found.take(accompanied(found))
    box, caption = zoom_box(r)
    shown = (panel_dots(r.seq_a, r.seq_b, (0, r.len_a, 0, r.len_b), whole=everywhere),
             panel_dots(r.seq_a, r.seq_b, box, lowest=ZOOM_MIN_K, whole=everywhere))
    fig = Figure(figsize=(13, 7.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    whole, zoom = fig.subplots(1, 2)
    _draw(whole, shown[0], px, py, (0, r.len_a, 0, r.len_b), marker=1.8)
    _draw(zoom, shown[1], px, py, box, marker=4)  # wider than the path, which runs over them
    x0, x1, y0, y1 = box
    whole.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=ZOOM_COLOUR, linewidth=1.2,
                              linestyle="--", zorder=2.5))
    for spine in zoom.spines.values():
        spine.set_edgecolor(ZOOM_COLOUR)
        spine.set_linestyle("--")
    _label(fig, whole, zoom, r, shown, caption, title)
    return fig, shown


def write_dotplot(record: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Write ``render(record)``'s figure as a PNG; returns the path."""
    path = Path(path)
    render(record, title=title)[0].savefig(path, format="png")
    return path
