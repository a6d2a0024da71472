"""cluster/dotplot.py: the shared k-mers against a naive set-based oracle, the filters and bounds
that keep a genome pair fast and legible, and the drawn path checked pixel by pixel against the
CIGAR it comes from."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import dotplot
from cluster.alnout import AlignmentRecord
from worker.sw import cigar

_RC = str.maketrans("ACGT", "TGCA")


# --- oracles ----------------------------------------------------------------------------------

def naive_shared(a: str, b: str, k: int) -> set[tuple[int, int, bool]]:
    """Every (i, j, reverse) with A[i:i+k] equal to B[j:j+k] (or to its reverse complement),
    ACGT only and case ignored, leaving out k-mers seen more than MAX_OCCURRENCES times on
    either side."""
    a, b = a.upper(), b.upper()
    kmers_a = [a[i:i + k] for i in range(len(a) - k + 1)]
    kmers_b = [b[j:j + k] for j in range(len(b) - k + 1)]
    ok = set("ACGT")
    out = set()
    for reverse in (False, True):
        seen_b = [s.translate(_RC)[::-1] if reverse else s for s in kmers_b]
        for i, s in enumerate(kmers_a):
            if not set(s) <= ok or kmers_a.count(s) > dotplot.MAX_OCCURRENCES:
                continue
            if seen_b.count(s) > dotplot.MAX_OCCURRENCES:
                continue
            out |= {(i, j, reverse) for j, t in enumerate(seen_b) if t == s}
    return out


def naive_accompanied(dots: dotplot.Dots, reach: int) -> set[tuple[int, int, bool]]:
    """The dots of a run of >= k consecutive k-mers on one diagonal, or with another run on
    their diagonal at most ``reach`` letters away, found by walking each diagonal."""
    by_diag: dict[tuple[bool, int], list[int]] = {}
    for x, y, r in zip(dots.x.tolist(), dots.y.tolist(), dots.reverse.tolist()):
        by_diag.setdefault((r, x + y if r else x - y), []).append(x)
    keep = set()
    for (r, d), xs in by_diag.items():
        xs.sort()
        runs = [[xs[0], xs[0]]]
        for x in xs[1:]:
            if x == runs[-1][1] + 1:
                runs[-1][1] = x
            else:
                runs.append([x, x])
        for n, (first, last) in enumerate(runs):
            near = any(0 <= m < len(runs) and m != n and
                       max(runs[m][0], first) - min(runs[m][1], last) - dots.k <= reach for m in (n - 1, n + 1))
            if last - first + 1 >= dots.k or near:
                keep |= {(x, d - x if r else x - d, r) for x in range(first, last + 1)}
    return keep


def as_set(dots: dotplot.Dots) -> set[tuple[int, int, bool]]:
    return set(zip(dots.x.tolist(), dots.y.tolist(), dots.reverse.tolist()))


# --- the shared k-mers ------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(a=st.text("ACGTNacgt", max_size=70), b=st.text("ACGTNacgt", max_size=70), k=st.integers(2, 7))
def test_shared_kmers_are_the_naive_set(a, b, k):
    dots = dotplot.shared_kmers(a, b, k)
    assert len(as_set(dots)) == len(dots)  # no pair twice
    assert as_set(dots) == naive_shared(a, b, k)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(3, 6), reach=st.integers(0, 30))
def test_accompanied_is_the_naive_walk(seed, k, reach):
    rng = random.Random(seed)
    a = "".join(rng.choice("ACGT") for _ in range(rng.randint(0, 300)))
    b = "".join(rng.choice("ACGT") if rng.random() < 0.3 else c for c in a[::-1] + a)  # both strands
    dots = dotplot.shared_kmers(a, b, k)
    kept = dots.take(dotplot.accompanied(dots, reach))
    assert as_set(kept) == naive_accompanied(dots, reach)


@pytest.mark.parametrize("w", [1, 3, 7])
def test_chunks_change_nothing(monkeypatch, w):
    """Computing codes chunk by chunk (a genome takes several) finds what one pass finds."""
    rng = random.Random(w)
    seq = "".join(rng.choice("ACGTN" if rng.random() < 0.02 else "ACGT") for _ in range(3000))
    one = [dotplot._table(seq, 9, w, rev) for rev in (False, True)]
    monkeypatch.setattr(dotplot, "_CHUNK", 101)
    many = [dotplot._table(seq, 9, w, rev) for rev in (False, True)]
    for x, y in zip(one, many):
        for u, v in zip(x, y):
            assert np.array_equal(u, v)


def test_choose_k_from_the_lengths():
    assert dotplot.choose_k(18_803, 22_929) == 13  # the demo pair
    assert dotplot.choose_k(1_578_824, 1_709_911) == 16  # the H. pylori pair
    assert dotplot.choose_k(400, 400, dotplot.ZOOM_MIN_K) == 9  # a zoom of a few hundred letters
    assert dotplot.choose_k(10**9, 10**9) == dotplot.MAX_K
    assert dotplot.choose_k(1, 1) == dotplot.MIN_K


def test_a_planted_copy_is_kept_and_chance_is_dropped():
    rng = np.random.default_rng(3)
    core = rng.choice(list("ACGT"), 4000)
    mutated = np.where(rng.random(4000) < 0.05, rng.choice(list("ACGT"), 4000), core)
    a = "".join(rng.choice(list("ACGT"), 20_000)) + "".join(core) + "".join(rng.choice(list("ACGT"), 10_000))
    b = "".join(rng.choice(list("ACGT"), 5_000)) + "".join(mutated) + "".join(rng.choice(list("ACGT"), 30_000))
    dots = dotplot.shared_kmers(a, b, 11)
    kept = dots.take(dotplot.accompanied(dots))
    on_copy = (kept.x - kept.y == 15_000) & ~kept.reverse
    assert on_copy.sum() > 1000 and on_copy.all()
    assert (dots.x - dots.y != 15_000).sum() > 50  # there was chance to drop


# --- bounds -----------------------------------------------------------------------------------

def test_output_is_bounded_on_a_larger_input(monkeypatch):
    """A repeat-rich pair: at most MAX_OCCURRENCES pairs per kept k-mer, at most max_points
    dots per strand drawn, one per raster cell; a long sequence keeps minimizers only."""
    rng = np.random.default_rng(5)
    unit = "".join(rng.choice(list("ACGT"), 300))
    seq = "".join("".join(rng.choice(list("ACGT"), 2_000)) + unit for _ in range(100))  # a repeat 100 times
    seq_b = seq[50_000:] + seq[:50_000]
    dots = dotplot.shared_kmers(seq, seq_b, 12)
    assert len(dots) <= 2 * dotplot.MAX_OCCURRENCES * len(seq)
    assert not np.isin(dots.x, [seq.find(unit) + 10]).any()  # the repeat's k-mers are left out
    shown = dotplot.thin(dots, (0, len(seq), 0, len(seq_b)), grid=100, max_points=500)
    for rev in (False, True):
        assert (shown.reverse == rev).sum() <= 500
    cells = (shown.x * 100 // len(seq)) * 100 + shown.y * 100 // len(seq_b) + len(seq) ** 2 * shown.reverse
    assert np.unique(cells).size == len(shown)
    monkeypatch.setattr(dotplot, "ALL_KMERS_UP_TO", 20_000)
    w = dotplot.window(len(seq))
    kept = sum(c.size for c, _ in dotplot.minimizers(seq, 12, w))
    assert w > 1 and kept < 1.5 * 20_000
    sampled = dotplot.shared_kmers(seq, seq_b, 12)
    assert 0 < len(sampled) < len(dots) / 5
    assert (sampled.x - sampled.y == 50_000).sum() > 0.5 * len(sampled)  # the shifted copy still shows


def test_path_is_downsampled():
    n = 50_000
    ops = np.zeros(n, dtype=np.uint8)
    seq = "A" * (n + 10)
    r = AlignmentRecord("a", "b", n + 10, n + 10, 5, n + 4, 3, n + 2, 2 * n, ops, seq, seq)
    x, y = dotplot.path_points(r)
    assert x.size <= dotplot.PATH_POINTS
    assert (x[0], y[0]) == (5, 3) and (x[-1], y[-1]) == (n + 5, n + 3)
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)


# --- the drawn path ---------------------------------------------------------------------------

def planted(seed: int) -> AlignmentRecord:
    """A random pair holding a copy made by a known CIGAR (= X I D runs), in random flanks."""
    rng = random.Random(seed)
    ops = []
    while len(ops) < 2500:
        op = rng.choices([cigar.EQ, cigar.X, cigar.INS, cigar.DEL], [40, 3, 1, 1])[0]
        ops += [op] * (rng.randint(1, 40) if op != cigar.X else 1)
    ops = [cigar.EQ] * 5 + ops + [cigar.EQ] * 5
    core_a, core_b = [], []
    for op in ops:
        c = rng.choice("ACGT")
        if op in (cigar.EQ, cigar.X, cigar.INS):
            core_a.append(c)
        if op == cigar.EQ:
            core_b.append(c)
        elif op in (cigar.X, cigar.DEL):
            core_b.append(rng.choice("ACGT".replace(c, "")))
    flank = lambda n: "".join(rng.choice("ACGT") for _ in range(n))  # noqa: E731
    a = flank(1500) + "".join(core_a) + flank(800)
    b = flank(600) + "".join(core_b) + flank(1900)
    return AlignmentRecord("query one", "target\ttwo", len(a), len(b), 1500, 1500 + len(core_a) - 1,
                           600, 600 + len(core_b) - 1, 1000, np.array(ops, np.uint8), a, b)


def hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])


def test_the_drawn_path_lies_on_the_alignment_cells():
    r = planted(11)
    fig, shown = dotplot.render(r)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(int)
    height, width = img.shape[:2]
    path = hex_rgb(dotplot.PATH_COLOUR)
    in_a, in_b = cigar.consumed(r.ops)
    x = r.start_a + np.concatenate(([0], np.cumsum(in_a)))
    y = r.start_b + np.concatenate(([0], np.cumsum(in_b)))
    cells = np.stack([(x[:-1] + x[1:]) / 2, (y[:-1] + y[1:]) / 2], 1)  # each column's midpoint
    near = np.zeros((height, width), dtype=bool)  # the path, the dots and the markers, widened
    for ax, dots in zip(fig.axes[:2], shown):
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        inside = (cells[:, 0] > x0) & (cells[:, 0] < x1) & (cells[:, 1] > y0) & (cells[:, 1] < y1)
        px = ax.transData.transform(cells[inside])
        cols, rows = px[:, 0].astype(int), height - 1 - px[:, 1].astype(int)
        ends = ax.transData.transform([[x[0], y[0]], [x[-1], y[-1]]])
        clear = np.linalg.norm(px[:, None, :] - ends[None, :, :], axis=2).min(axis=1) > 8  # off the markers
        assert clear.sum() > 100
        got = img[rows[clear], cols[clear]]
        assert (np.abs(got - path).max(axis=1) <= 40).mean() > 0.99  # the path colour on its cells
        centres = np.stack([dots.x + dots.k / 2, dots.y + dots.k / 2], 1).reshape(-1, 2)
        for pts in (px, ax.transData.transform(centres) if len(dots) else np.zeros((0, 2)), ends):
            c, rr = pts[:, 0].astype(int), height - 1 - pts[:, 1].astype(int)
            ok = (c >= 0) & (c < width) & (rr >= 0) & (rr < height)
            near[rr[ok], c[ok]] = True
    grown = near.copy()  # widened by the line's and the strokes' reach: 10 pixels
    for dr in range(-10, 11):
        for dc in range(-10, 11):
            grown |= np.roll(np.roll(near, dr, 0), dc, 1)
    rng = np.random.default_rng(0)
    far = 0
    for ax in fig.axes[:2]:
        (c0, r1), (c1, r0) = ax.transAxes.transform([[0, 0], [1, 1]])
        rows = rng.integers(height - 1 - int(r0) + 3, height - 1 - int(r1) - 3, 3000)
        cols = rng.integers(int(c0) + 3, int(c1) - 3, 3000)
        pick = ~grown[rows, cols]
        far += int(pick.sum())
        got = img[rows[pick], cols[pick]]
        assert not (np.abs(got - path).max(axis=1) <= 40).any()  # no path colour away from the path
    assert far > 2000


def test_write_dotplot_names_and_png(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    r = planted(2)
    path = dotplot.write_dotplot(r, tmp_path / "p.png", title="t")
    assert image.imread(str(path)).shape[2] in (3, 4)
    fig, _ = dotplot.render(r)
    whole, zoom = fig.axes[:2]
    assert "query one" in whole.get_xlabel() and "target two" in whole.get_ylabel()
    assert "bp" in whole.get_xlabel() and "bp" in zoom.get_xlabel()
    (x0, x1), (y0, y1) = zoom.get_xlim(), zoom.get_ylim()
    assert x0 <= r.start_a and x1 >= r.end_a + 1 and y0 <= r.start_b and y1 >= r.end_b + 1
