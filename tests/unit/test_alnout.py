"""cluster/alnout.py: PAF, SAM, the pairwise text view and the dot plot of one alignment.

Each output is read back by something that does not share our code: a small PAF parser that
follows minimap2's column list, htslib (pysam, and samtools when installed), matplotlib's PNG
reader, and a parser of the text view's blocks.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import sys
import warnings

import numpy as np
import parasail
import pytest

from cluster import alnout
from cluster.alnout import AlignmentRecord
from worker.sw import cigar
from worker.sw.scoring import Scoring, encode

DEFAULT = Scoring()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- records ----------------------------------------------------------------------------------

def hand_made() -> AlignmentRecord:
    """A small alignment spelled out by hand: A[3..13] against B[2..13], soft-masked letters
    and an N in the flanks, a mismatch and both kinds of gap."""
    #   A  ttg ACGTA--CGTAAC ggnA
    #          |.|||  ||| ||
    #   B   cc ATGTAGGCGT-AC t
    seq_a = "ttg" "ACGTACGTAAC" "ggnA"
    seq_b = "cc" "ATGTAGGCGTAC" "t"
    ops = cigar.parse("1=1X3=2D3=1I2=")
    return AlignmentRecord("query one", "ref\tB", len(seq_a), len(seq_b), 3, 13, 2, 13,
                           score=0, ops=ops, seq_a=seq_a, seq_b=seq_b, scoring=DEFAULT)


def with_score(record: AlignmentRecord) -> AlignmentRecord:
    score = cigar.rescore(record.ops, encode(record.seq_a), encode(record.seq_b),
                          record.start_a, record.start_b, record.scoring)
    return AlignmentRecord(**{f: getattr(record, f) for f in AlignmentRecord.__dataclass_fields__}
                           | {"score": score})


def from_parasail(seed: int) -> AlignmentRecord:
    """A seeded related pair (ACGT only, ~1,500 letters) aligned by parasail with traceback."""
    rng = random.Random(seed)
    core = "".join(rng.choice("ACGT") for _ in range(1500))
    mutated = "".join(c if rng.random() > 0.08 else rng.choice("ACGT") for c in core)
    mutated = mutated[:300] + "GATTACA" + mutated[300:900] + mutated[905:]  # an I and a D
    a = "".join(rng.choice("ACGT") for _ in range(80)) + core + "TTTT"
    b = "CCC" + mutated + "".join(rng.choice("ACGT") for _ in range(50))
    matrix = parasail.matrix_create("ACGT", DEFAULT.match, DEFAULT.mismatch)
    result = parasail.sw_trace_striped_32(a, b, DEFAULT.gap_open, DEFAULT.gap_extend, matrix)
    trace = result.get_traceback()
    ops = cigar.ops_from_strings(trace.query, trace.ref)
    return AlignmentRecord("parasail query", "parasail ref", len(a), len(b),
                           result.cigar.beg_query, result.end_query,
                           result.cigar.beg_ref, result.end_ref, result.score, ops, a, b)


@pytest.fixture(params=["hand_made", "parasail"])
def record(request) -> AlignmentRecord:
    return with_score(hand_made()) if request.param == "hand_made" else from_parasail(3)


# --- the record -------------------------------------------------------------------------------

def test_record_refuses_ops_that_do_not_cover_the_ranges():
    r = hand_made()
    fields = {f: getattr(r, f) for f in AlignmentRecord.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"consume 11 letters of A but A\[3\.\.12\] holds 10"):
        AlignmentRecord(**fields | {"end_a": 12})
    with pytest.raises(ValueError, match=r"len_b=99 but seq_b has 15 letters"):
        AlignmentRecord(**fields | {"len_b": 99})
    with pytest.raises(ValueError, match="no columns"):
        AlignmentRecord(**fields | {"ops": np.zeros(0, dtype=np.uint8)})


def test_summary(record):
    s = alnout.summary(record)
    counts = cigar.stats(record.ops)
    text = cigar.to_string(record.ops)
    assert s["score"] == record.score and s["columns"] == counts["columns"]
    assert s["cigar_runs"] == len(cigar.runs(record.ops)) and s["cigar_chars"] == len(text)
    assert s["gaps"] == counts["insertions"] + counts["deletions"]
    assert (s["start_a"], s["end_a"], s["start_b"], s["end_b"]) == (
        record.start_a, record.end_a, record.start_b, record.end_b)


# --- PAF --------------------------------------------------------------------------------------

PAF_TYPES = [str, int, int, int, str, str, int, int, int, int, int, int]


def parse_paf(line: str) -> tuple[list, dict]:
    """minimap2's 12 mandatory columns, typed, and the SAM-like tags (TAG:TYPE:VALUE)."""
    parts = line.rstrip("\n").split("\t")
    assert len(parts) >= 12
    cols = [t(v) for t, v in zip(PAF_TYPES, parts[:12])]
    tags = {}
    for tag in parts[12:]:
        name, kind, value = tag.split(":", 2)
        tags[name] = int(value) if kind == "i" else value
    return cols, tags


def test_paf(record, tmp_path):
    path = tmp_path / "out.paf"
    alnout.write_paf(record, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    (qname, qlen, qstart, qend, strand, tname, tlen, tstart, tend, nmatch, alnlen, mapq), tags \
        = parse_paf(lines[0])
    counts = cigar.stats(record.ops)
    assert (qname, tname) == tuple(n.replace(" ", "_").replace("\t", "_")
                                   for n in (record.name_a, record.name_b))
    assert (qlen, tlen, strand, mapq) == (record.len_a, record.len_b, "+", 255)
    assert qend - qstart == counts["span_a"] and tend - tstart == counts["span_b"]
    assert (qstart, tstart) == (record.start_a, record.start_b)
    assert nmatch == counts["matches"] and alnlen == counts["columns"]
    assert tags["tp"] == "P"
    assert tags["NM"] == counts["mismatches"] + counts["insertions"] + counts["deletions"]
    ops = cigar.parse(tags["cg"])
    assert cigar.rescore(ops, encode(record.seq_a), encode(record.seq_b), qstart, tstart,
                         record.scoring) == tags["AS"] == record.score


def test_paf_to_a_file_object(record):
    buf = io.StringIO()
    alnout.write_paf(record, buf)
    assert buf.getvalue().count("\n") == 1


# --- SAM --------------------------------------------------------------------------------------

PYSAM_OP = {"=": 7, "X": 8, "I": 1, "D": 2, "S": 4}


def test_sam_read_by_htslib(record, tmp_path):
    pysam = pytest.importorskip("pysam")
    path = alnout.write_sam(record, tmp_path / "out.sam")
    with pysam.AlignmentFile(str(path)) as sam:
        header = sam.header.to_dict()
        reads = list(sam)
    assert header["HD"]["VN"] == "1.6"
    assert header["SQ"] == [{"SN": alnout.sam_rname(record.name_b), "LN": record.len_b}]
    assert len(reads) == 1
    read = reads[0]
    assert read.query_name == alnout.sam_qname(record.name_a)
    assert not read.is_unmapped and not read.is_reverse and read.mapping_quality == 255
    assert read.reference_start == record.start_b
    assert read.reference_end == record.end_b + 1
    expected = ([(4, record.start_a)] if record.start_a else []) + [
        (PYSAM_OP[op], n) for n, op in cigar.runs(record.ops)] + (
        [(4, record.len_a - 1 - record.end_a)] if record.end_a < record.len_a - 1 else [])
    assert read.cigartuples == expected
    assert read.query_alignment_start == record.start_a
    assert read.query_alignment_length == cigar.stats(record.ops)["span_a"]
    assert read.query_sequence == record.seq_a.upper()
    assert read.get_tag("AS") == record.score
    counts = cigar.stats(record.ops)
    assert read.get_tag("NM") == counts["mismatches"] + counts["insertions"] + counts["deletions"]


@pytest.mark.skipif(shutil.which("samtools") is None, reason="samtools not installed")
def test_sam_accepted_by_samtools(record, tmp_path):
    path = alnout.write_sam(record, tmp_path / "out.sam")
    done = subprocess.run(["samtools", "view", "-h", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.splitlines()[-1].split("\t")[5] == alnout.sam_cigar(record)
    # Converting to BAM parses every field into binary: a stricter check than printing.
    bam = tmp_path / "out.bam"
    done = subprocess.run(["samtools", "view", "-b", "-o", str(bam), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""


def test_sam_names_are_sanitized(tmp_path):
    base = with_score(hand_made())
    fields = {f: getattr(base, f) for f in AlignmentRecord.__dataclass_fields__}
    r = AlignmentRecord(**fields | {"name_a": "read 7\tsample@lab", "name_b": "*chr 1 (hg38)"})
    assert alnout.sam_qname(r.name_a) == "read_7_sample_lab"
    assert alnout.sam_rname(r.name_b) == "_chr_1__hg38_"
    path = alnout.write_sam(r, tmp_path / "names.sam")
    body = path.read_text().splitlines()
    assert "@SQ\tSN:_chr_1__hg38_\tLN:15" in body
    assert body[-1].split("\t")[:3] == ["read_7_sample_lab", "0", "_chr_1__hg38_"]
    pysam = pytest.importorskip("pysam")
    with pysam.AlignmentFile(str(path)) as sam:
        assert [read.query_name for read in sam] == ["read_7_sample_lab"]


def test_sam_seq_letters(tmp_path):
    r = with_score(hand_made())
    assert r.score == 9 * 2 - 3 - (5 + 2) - 5
    line = alnout.write_sam(r, tmp_path / "seq.sam").read_text().splitlines()[-1]
    assert line.split("\t")[5] == "3S1=1X3=2D3=1I2=4S"
    assert line.split("\t")[9] == "TTGACGTACGTAACGGNA"  # upper case, N kept


# --- text -------------------------------------------------------------------------------------

def parse_text(text: str, name_a: str, name_b: str) -> dict:
    """The blocks of the pairwise view: letters and coordinates of each A and B line."""
    body = [line for line in text.splitlines() if not line.startswith("#")]
    a_lines = [line.split() for line in body if line.startswith(name_a + " ")]
    b_lines = [line.split() for line in body if line.startswith(name_b + " ")]
    middles = [body[i + 1] for i, line in enumerate(body) if line.startswith(name_a + " ")]
    assert len(a_lines) == len(b_lines) == len(middles) > 0
    return {"a": a_lines, "b": b_lines, "middles": middles}


@pytest.mark.parametrize("width", [60, 7, 1])
def test_text(record, tmp_path, width):
    path = tmp_path / "out.txt"
    alnout.write_text(record, path, width=width)
    text = path.read_text()
    name_a, name_b = alnout.field_name(record.name_a), alnout.field_name(record.name_b)
    assert f"# 1: {name_a}" in text and f"# Score: {record.score}" in text
    counts = cigar.stats(record.ops)
    assert f"# Length: {counts['columns']}" in text
    blocks = parse_text(text, name_a, name_b)
    for key, seq, start, end in (("a", record.seq_a, record.start_a, record.end_a),
                                 ("b", record.seq_b, record.start_b, record.end_b)):
        lines = blocks[key]
        assert all(len(letters) <= width for _, _, letters, _ in lines)
        assert "".join(letters for _, _, letters, _ in lines).replace("-", "") \
            == seq[start:end + 1]
        assert int(lines[0][1]) == start + 1 and int(lines[-1][3]) == end + 1
        for _, first, letters, last in lines:  # each line's numbers bound its own letters
            n = len(letters.replace("-", ""))
            if n:
                assert seq[int(first) - 1:int(last)] == letters.replace("-", "")
    middle = "".join(m[-len(a[2]):] if a[2] else "" for m, a in zip(blocks["middles"], blocks["a"]))
    assert middle.count("|") == counts["matches"] and middle.count(".") == counts["mismatches"]


def test_text_streams():
    """A long alignment goes out in bounded writes, never as one string."""
    rng = np.random.default_rng(5)
    n = 300_000
    ops = rng.choice(2, size=n, p=[0.9, 0.1]).astype(np.uint8)
    a = rng.choice(list("ACGT"), size=n)
    b = np.where(ops == 0, a, np.where(a == "A", "C", "A"))
    r = AlignmentRecord("a", "b", n, n, 0, n - 1, 0, n - 1, 0, ops, "".join(a), "".join(b))

    class Sink:
        largest = 0
        total = 0

        def write(self, s: str) -> int:
            self.largest = max(self.largest, len(s))
            self.total += len(s)
            return len(s)

    sink = Sink()
    alnout.write_text(r, sink)
    assert sink.total > 3 * n
    assert sink.largest < sink.total / 5


# --- dot plot ---------------------------------------------------------------------------------

@pytest.mark.parametrize("title", [None, "a test plot"])
def test_dotplot(record, tmp_path, title):
    image = pytest.importorskip("matplotlib.image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a tab in a name has no glyph
        path = alnout.write_dotplot(record, tmp_path / "plot.png", title=title)
    assert path == tmp_path / "plot.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_import_is_light():
    """Importing cluster.alnout must not pull matplotlib in (only write_dotplot needs it)."""
    code = "import sys, cluster.alnout; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
