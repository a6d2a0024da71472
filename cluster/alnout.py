"""Writers for one local alignment: PAF, SAM, an EMBOSS-style pairwise text view, a dot plot.

Every writer takes an ``AlignmentRecord``: query A against reference B, the 0-based inclusive
ranges ``A[start_a..end_a]`` and ``B[start_b..end_b]``, the score and the op codes of
``worker.sw.cigar`` (= X I D, one per column). PAF and SAM put A in the query/read columns and B
in the target/reference columns, so their I and D mean what ours mean.

Alignments can be millions of columns long: the text view is written block by block from
numpy chunks, never as one string. The dot plot is ``cluster.dotplot``'s (shared k-mers in
numpy, matplotlib imported only when drawing), so importing this module stays light.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from cluster import dotplot
from worker.sw import cigar
from worker.sw.scoring import Scoring

PAF_MAPQ = 255  # "missing" in both the PAF and SAM specs: we compute no mapping quality
SAM_MAX_POS = 2**31 - 1  # SAM v1 section 1.4: POS and @SQ LN are in [1, 2^31 - 1]
_TEXT_CHUNK_BLOCKS = 512  # text view: blocks per numpy pass and per write (~110 kB)

# SAM v1 section 1.4: QNAME is [!-?A-~]{1,254}; RNAME (and @SQ SN) is
# [0-9A-Za-z!#$%&+./:;?@^_|~-][0-9A-Za-z!#$%&*+./:;=?@^_|~-]*.
_QNAME_ILLEGAL = re.compile(r"[^!-?A-~]")
_RNAME_ILLEGAL = re.compile(r"[^0-9A-Za-z!#$%&*+./:;=?@^_|~-]")
_WHITESPACE = re.compile(r"\s")
_SAM_SEQ = np.full(256, ord("N"), dtype=np.uint8)  # SEQ letters: ACGT kept, the rest N
for _ch in "ACGTacgt":
    _SAM_SEQ[ord(_ch)] = ord(_ch.upper())


@dataclass(frozen=True, slots=True, eq=False)
class AlignmentRecord:
    """One local alignment of query A (``seq_a``) against reference B (``seq_b``).

    Positions are 0-based and inclusive; ``ops`` holds one op code per column (see
    ``worker.sw.cigar``). The constructor checks that the ops cover exactly the two ranges, so a
    writer never emits a record whose CIGAR and coordinates disagree. An alignment with no
    columns (best score 0) has nothing to write and is refused.
    """

    name_a: str
    name_b: str
    len_a: int
    len_b: int
    start_a: int
    end_a: int
    start_b: int
    end_b: int
    score: int
    ops: np.ndarray
    seq_a: str
    seq_b: str
    scoring: Scoring = field(default_factory=Scoring)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", cigar.as_ops(self.ops))
        if self.ops.size == 0:
            raise ValueError("the alignment has no columns: nothing to write")
        for name, seq, length in (("A", self.seq_a, self.len_a), ("B", self.seq_b, self.len_b)):
            if len(seq) != length:
                raise ValueError(f"len_{name.lower()}={length} but seq_{name.lower()} has "
                                 f"{len(seq)} letters")
        counts = cigar.stats(self.ops)
        for name, start, end, length, span in (
                ("A", self.start_a, self.end_a, self.len_a, counts["span_a"]),
                ("B", self.start_b, self.end_b, self.len_b, counts["span_b"])):
            if not 0 <= start <= end < length:
                raise ValueError(f"{name}[{start}..{end}] is not a range inside {name}'s "
                                 f"{length} letters")
            if end - start + 1 != span:
                raise ValueError(f"the ops consume {span} letters of {name} but "
                                 f"{name}[{start}..{end}] holds {end - start + 1}")


# --- names ------------------------------------------------------------------------------------

def sam_qname(name: str) -> str:
    """``name`` made a legal SAM QNAME: characters outside ``[!-?A-~]`` (whitespace, '@',
    non-ASCII) become '_', cut to 254 characters; an empty name becomes '_'."""
    return _QNAME_ILLEGAL.sub("_", name)[:254] or "_"


def sam_rname(name: str) -> str:
    """``name`` made a legal SAM RNAME / @SQ SN: illegal characters (whitespace, quotes,
    brackets, backslash, comma, non-ASCII; '*' or '=' in first place) become '_'; an empty
    name becomes '_'."""
    clean = _RNAME_ILLEGAL.sub("_", name)
    if not clean or clean[0] in "*=":
        clean = "_" + clean[1:]
    return clean


def field_name(name: str) -> str:
    """``name`` made one whitespace-free field (PAF, text view): whitespace becomes '_'."""
    return _WHITESPACE.sub("_", name) or "_"


# --- small helpers ----------------------------------------------------------------------------

@contextlib.contextmanager
def _text_out(path_or_file: str | Path | IO[str]) -> Iterator[IO[str]]:
    """A text stream to write to: the file object itself, or ``path`` opened (and closed)."""
    if hasattr(path_or_file, "write"):
        yield path_or_file  # type: ignore[misc]
    else:
        with open(path_or_file, "w", encoding="utf-8", newline="\n") as f:
            yield f


def _nm(counts: dict) -> int:
    """Edit distance in the SAM/PAF sense: mismatches plus inserted and deleted letters."""
    return counts["mismatches"] + counts["insertions"] + counts["deletions"]


def summary(record: AlignmentRecord) -> dict:
    """Plain numbers about the alignment for the CLI and JSON: score, the 0-based inclusive
    ranges, the ``cigar.stats`` counts, ``gaps`` (gap letters), ``edit_distance`` (NM),
    ``cigar_runs`` (operations in the CIGAR) and ``cigar_chars`` (its length as text)."""
    counts = cigar.stats(record.ops)
    _, lengths, _ = cigar.run_arrays(record.ops)
    digits = sum(int((lengths >= 10**k).sum()) for k in range(19))  # of all counts, in text
    return {
        "score": int(record.score),
        "start_a": record.start_a, "end_a": record.end_a,
        "start_b": record.start_b, "end_b": record.end_b,
        **counts,
        "gaps": counts["insertions"] + counts["deletions"],
        "edit_distance": _nm(counts),
        "cigar_runs": int(lengths.size),
        "cigar_chars": digits + int(lengths.size),
    }


# --- PAF --------------------------------------------------------------------------------------

def write_paf(record: AlignmentRecord, path_or_file: str | Path | IO[str]) -> None:
    """Write one PAF line (minimap2's PAF spec): query A, target B, strand '+'.

    Columns: qname qlen qstart qend tname... with half-open 0-based ends, nmatch = '=' columns,
    alnlen = all columns, mapq 255 (missing); tags NM:i (mismatches + gap letters), AS:i (the
    score), cg:Z (the CIGAR in = X I D) and tp:A:P (primary). Names have whitespace made '_'.
    """
    r = record
    counts = cigar.stats(r.ops)
    fields = [field_name(r.name_a), r.len_a, r.start_a, r.end_a + 1, "+",
              field_name(r.name_b), r.len_b, r.start_b, r.end_b + 1,
              counts["matches"], counts["columns"], PAF_MAPQ,
              f"NM:i:{_nm(counts)}", f"AS:i:{int(r.score)}", f"cg:Z:{cigar.to_string(r.ops)}",
              "tp:A:P"]
    with _text_out(path_or_file) as out:
        out.write("\t".join(str(f) for f in fields) + "\n")


# --- SAM --------------------------------------------------------------------------------------

def sam_cigar(record: AlignmentRecord) -> str:
    """The SAM CIGAR: the = X I D runs between soft clips (S) of the unaligned ends of A."""
    before, after = record.start_a, record.len_a - 1 - record.end_a
    return ((f"{before}S" if before else "") + cigar.to_string(record.ops)
            + (f"{after}S" if after else ""))


def write_sam(record: AlignmentRecord, path: str | Path, *, program: str = "cluster") -> Path:
    """Write a SAM v1.6 file holding the alignment as one mapped, forward-strand record.

    Header: @HD (unsorted), one @SQ for B, one @PG. The record: QNAME A, RNAME B, POS
    start_b + 1, MAPQ 255 (missing), CIGAR with soft-clipped ends of A, SEQ the whole of A
    upper-cased with letters other than ACGT written as N, QUAL '*', tags AS:i and NM:i.

    Names are sanitized, not refused: characters SAM forbids (whitespace, and '@' in QNAME;
    quotes, brackets, backslash or comma in RNAME) become '_' (``sam_qname``, ``sam_rname``),
    so a FASTA header such as "chr1 Homo sapiens" is written as "chr1_Homo_sapiens".
    Returns the path.
    """
    r = record
    if r.len_b > SAM_MAX_POS:
        raise ValueError(f"B has {r.len_b} letters; SAM allows reference lengths up to "
                         f"{SAM_MAX_POS} (2^31 - 1): split the reference")
    rname = sam_rname(r.name_b)
    seq = _SAM_SEQ[np.frombuffer(r.seq_a.encode("ascii"), dtype=np.uint8)].tobytes().decode()
    counts = cigar.stats(r.ops)
    path = Path(path)
    with open(path, "w", encoding="ascii", newline="\n") as out:
        out.write("@HD\tVN:1.6\tSO:unsorted\n")
        out.write(f"@SQ\tSN:{rname}\tLN:{r.len_b}\n")
        out.write(f"@PG\tID:{program}\tPN:{program}\n")
        out.write("\t".join([sam_qname(r.name_a), "0", rname, str(r.start_b + 1), "255",
                             sam_cigar(r), "*", "0", "0", seq, "*",
                             f"AS:i:{int(r.score)}", f"NM:i:{_nm(counts)}"]) + "\n")
    return path


# --- pairwise text ----------------------------------------------------------------------------

def _header(record: AlignmentRecord, counts: dict) -> str:
    """The EMBOSS-style '#' block above the pairwise view."""
    r, s = record, record.scoring
    cols = counts["columns"]
    gaps = counts["insertions"] + counts["deletions"]
    lines = [
        "#" * 40,
        "# Program: cluster (Smith-Waterman, local)",
        "# Aligned_sequences: 2",
        f"# 1: {field_name(r.name_a)}",
        f"# 2: {field_name(r.name_b)}",
        f"# Matrix: match {s.match}, mismatch {s.mismatch} (N never matches)",
        f"# Gap_penalty: {s.gap_open} open, {s.gap_extend} extend "
        f"(a gap of k letters costs {s.gap_open} + (k-1)*{s.gap_extend})",
        "#",
        f"# Length: {cols}",
        f"# Identity: {counts['matches']:>10}/{cols} ({100 * counts['matches'] / cols:5.1f}%)",
        f"# Gaps:     {gaps:>10}/{cols} ({100 * gaps / cols:5.1f}%)",
        f"# Score: {int(r.score)}",
        f"# Range_A: {r.start_a + 1}-{r.end_a + 1} of {r.len_a}",
        f"# Range_B: {r.start_b + 1}-{r.end_b + 1} of {r.len_b}",
        "#",
        "#" * 40,
        "",
    ]
    return "\n".join(lines) + "\n"


def _gapped(ops: np.ndarray, mask: np.ndarray, seq: str, pos: int) -> np.ndarray:
    """The gapped line (uint8) of one sequence over ``ops``: its letters from ``seq[pos:]``
    where ``mask`` (columns consuming it) is set, '-' elsewhere."""
    line = np.full(ops.size, ord("-"), dtype=np.uint8)
    n = int(mask.sum())
    line[mask] = np.frombuffer(seq[pos:pos + n].encode("ascii"), dtype=np.uint8)
    return line


def write_text(record: AlignmentRecord, path_or_file: str | Path | IO[str],
               width: int = 60) -> None:
    """Write the pairwise view of EMBOSS water: a '#' header, then blocks of ``width`` columns.

    Each block is the A line ``name start letters end`` (1-based positions of the first and
    last letters of A in the block), a middle line ('|' match, '.' mismatch, ' ' gap) and the B
    line; gaps are '-', letters keep their case. A block holding no letter of a sequence shows
    the position of its last letter before the block on both sides, as EMBOSS does. The
    output is streamed block by block (a 2-million-column alignment is ~100 MB of text).
    """
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    r = record
    counts = cigar.stats(r.ops)
    name_a, name_b = field_name(r.name_a)[:20], field_name(r.name_b)[:20]
    name_w = max(len(name_a), len(name_b))
    num_w = len(str(max(r.len_a, r.len_b)))
    indent = " " * (name_w + num_w + 2)
    symbols = np.frombuffer(b"|.  ", dtype=np.uint8)  # by op code: = X I D
    in_a, in_b = cigar.consumed(r.ops)
    pos_a, pos_b = r.start_a, r.start_b  # 0-based index of the next letter to show
    chunk = width * _TEXT_CHUNK_BLOCKS
    with _text_out(path_or_file) as out:
        out.write(_header(r, counts))
        for c0 in range(0, r.ops.size, chunk):
            ops = r.ops[c0:c0 + chunk]
            ma, mb = in_a[c0:c0 + chunk], in_b[c0:c0 + chunk]
            line_a = _gapped(ops, ma, r.seq_a, pos_a).tobytes().decode()
            line_b = _gapped(ops, mb, r.seq_b, pos_b).tobytes().decode()
            middle = symbols[ops].tobytes().decode()
            # Letters of A and B consumed before each block of this chunk, and in each block.
            bounds = np.arange(0, ops.size, width)
            before_a = np.concatenate(([0], np.cumsum(ma)))[bounds]
            before_b = np.concatenate(([0], np.cumsum(mb)))[bounds]
            n_a = np.add.reduceat(ma.astype(np.int64), bounds)
            n_b = np.add.reduceat(mb.astype(np.int64), bounds)
            parts = []
            for k, s in enumerate(bounds.tolist()):
                a0 = pos_a + int(before_a[k])
                b0 = pos_b + int(before_b[k])
                a_first, a_last = (a0 + 1, a0 + int(n_a[k])) if n_a[k] else (a0, a0)
                b_first, b_last = (b0 + 1, b0 + int(n_b[k])) if n_b[k] else (b0, b0)
                e = s + width
                parts.append(f"{name_a:<{name_w}} {a_first:>{num_w}} {line_a[s:e]} {a_last}\n"
                             f"{indent}{middle[s:e]}\n"
                             f"{name_b:<{name_w}} {b_first:>{num_w}} {line_b[s:e]} {b_last}\n"
                             "\n")
            out.write("".join(parts))
            pos_a += int(ma.sum())
            pos_b += int(mb.sum())


# --- dot plot ---------------------------------------------------------------------------------

def write_dotplot(record: AlignmentRecord, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG dot plot (``cluster.dotplot``): the shared k-mers of the two whole sequences
    (forward and reverse complement), the alignment's path over them, and a zoom onto the
    aligned region, axes in bp with the sequences' names. The record holds both sequences, so
    nothing else is needed. Returns the path."""
    return dotplot.write_dotplot(record, path, title=title)
