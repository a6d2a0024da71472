"""The operations of a local alignment: run-length CIGARs, re-scoring and statistics.

An alignment is an array of op codes (uint8), one entry per alignment column, between query A
(parasail's s1, the DP columns) and reference B (parasail's s2, the DP rows):

====  ====  ==========================================  ========
code  op    meaning                                     consumes
====  ====  ==========================================  ========
0     ``=``  A letter matches B letter                   A and B
1     ``X``  A letter against a different B letter       A and B
2     ``I``  a letter of A absent from B                 A only
3     ``D``  a letter of B absent from A                 B only
====  ====  ==========================================  ========

These are the SAM v1 meanings of =, X, I and D with A as the read and B as the reference, and
those of parasail's traceback CIGAR. A local alignment covers ``A[start_a..end_a]`` and
``B[start_b..end_b]`` (0-based, inclusive). Matching follows ``worker.sw.scoring``: two letters
match only when their codes are equal AND below 4 (N never matches, not even N).

Everything here is numpy over whole arrays: a whole-genome alignment has millions of columns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from .scoring import OTHER, Scoring, encode

OPS = "=XID"
EQ, X, INS, DEL = 0, 1, 2, 3

_OP_CODE = {op: code for code, op in enumerate(OPS)}
_ACGT_LIMIT = OTHER  # codes below this are real nucleotides that can match
_LETTERS = "ACGTNN"  # code -> letter for messages; 5 is the query-side "other" (query_codes)
_VALID = re.compile(r"(?:[0-9]+[=XID])*")
_TOKEN = re.compile(r"([0-9]+)([=XID])")


def as_ops(ops: np.ndarray) -> np.ndarray:
    """The ops as a 1-D uint8 array (no copy when they already are); ValueError when an entry
    is not 0..3."""
    arr = np.asarray(ops)
    if arr.ndim != 1:
        raise ValueError(f"ops must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ops must be integer codes 0..3 ({OPS}), got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > DEL):
        bad = int(np.flatnonzero((arr < 0) | (arr > DEL))[0])
        raise ValueError(f"op code {arr[bad].item()} at column {bad} is not one of 0..3 ({OPS})")
    return arr.astype(np.uint8, copy=False)


def run_arrays(ops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, codes) of the runs of equal ops, as int64/int64/uint8 arrays."""
    ops = as_ops(ops)
    if ops.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.uint8)
    starts = np.concatenate(([0], np.flatnonzero(ops[1:] != ops[:-1]) + 1)).astype(np.int64)
    lengths = np.diff(np.append(starts, ops.size))
    return starts, lengths, ops[starts]


def runs(ops: np.ndarray) -> list[tuple[int, str]]:
    """Run-length encoding of the ops: ``[(count, op letter), ...]``, adjacent ops differ."""
    _, lengths, codes = run_arrays(ops)
    return [(n, OPS[c]) for n, c in zip(lengths.tolist(), codes.tolist())]


def to_string(ops: np.ndarray) -> str:
    """The CIGAR string of the ops, e.g. ``"10=1X2I5="`` (empty for no columns)."""
    return "".join(f"{n}{op}" for n, op in runs(ops))


def from_runs(pairs: Iterable[tuple[int, str]]) -> np.ndarray:
    """The ops array of ``[(count, op letter), ...]``; counts must be positive integers."""
    counts: list[int] = []
    codes: list[int] = []
    for i, (count, op) in enumerate(pairs):
        if op not in _OP_CODE:
            raise ValueError(f"run {i}: unknown op {op!r}, expected one of {OPS}")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"run {i}: count must be a positive integer, got {count!r}")
        counts.append(int(count))
        codes.append(_OP_CODE[op])
    return np.repeat(np.array(codes, dtype=np.uint8), np.array(counts, dtype=np.int64))


def parse(cigar: str) -> np.ndarray:
    """The ops array of a CIGAR string made of ``<count><op>`` with op in ``=XID``.

    Raises ValueError naming the first fault (unknown op, zero or missing count) and its
    character position. The empty string is the empty alignment.
    """
    if not isinstance(cigar, str):
        raise ValueError(f"CIGAR must be a str, got {type(cigar).__name__}")
    if _VALID.fullmatch(cigar):  # the fast path: one regex, then numpy
        tokens = _TOKEN.findall(cigar)
        counts = np.array([int(n) for n, _ in tokens], dtype=np.int64)
        if counts.size and counts.min() == 0:
            _raise_malformed(cigar)
        codes = np.array([_OP_CODE[op] for _, op in tokens], dtype=np.uint8)
        return np.repeat(codes, counts)
    _raise_malformed(cigar)
    raise AssertionError("unreachable")  # _raise_malformed always raises


def _raise_malformed(cigar: str) -> None:
    """Find the first bad token of ``cigar`` and raise a one-line ValueError about it."""
    shown = cigar if len(cigar) <= 40 else cigar[:37] + "..."
    pos = 0
    while pos < len(cigar):
        digits = re.match(r"[0-9]*", cigar[pos:]).group()
        op_pos = pos + len(digits)
        if op_pos == len(cigar):
            raise ValueError(f"malformed CIGAR {shown!r}: count {digits} at position {pos} "
                             f"has no op (expected one of {OPS})")
        op = cigar[op_pos]
        if op not in _OP_CODE:
            raise ValueError(f"malformed CIGAR {shown!r}: unknown op {op!r} at position "
                             f"{op_pos} (expected one of {OPS})")
        if not digits:
            raise ValueError(f"malformed CIGAR {shown!r}: missing count before {op!r} at "
                             f"position {op_pos}")
        if int(digits) == 0:
            raise ValueError(f"malformed CIGAR {shown!r}: zero count before {op!r} at "
                             f"position {pos}")
        pos = op_pos + 1
    raise AssertionError(f"CIGAR {cigar!r} is well formed")


def consumed(ops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the columns that consume a letter of A and of B."""
    ops = as_ops(ops)
    return ops != DEL, ops != INS


def rescore(ops: np.ndarray, a_codes: np.ndarray, b_codes: np.ndarray, start_a: int,
            start_b: int, scoring: Scoring) -> int:
    """The score of the alignment ``ops`` placed at ``A[start_a]``, ``B[start_b]``.

    ``a_codes`` and ``b_codes`` are whole encoded sequences (``scoring.encode``; the query-side
    code 5 of ``query_codes`` works too). Every ``=`` must be a real match and every ``X`` a
    mismatch, otherwise ValueError names the column, positions and letters. Gaps are scored
    per run, in parasail's convention: a run of k I's (or k D's) costs
    ``gap_open + (k - 1) * gap_extend``, and an I-run next to a D-run is two gaps.
    """
    ops = as_ops(ops)
    a_codes = np.asarray(a_codes)
    b_codes = np.asarray(b_codes)
    in_a, in_b = consumed(ops)
    span_a, span_b = int(in_a.sum()), int(in_b.sum())
    for name, start, span, size in (("A", start_a, span_a, a_codes.size),
                                    ("B", start_b, span_b, b_codes.size)):
        if start < 0 or start + span > size:
            raise ValueError(f"the alignment covers {name}[{start}..{start + span - 1}], "
                             f"outside {name}'s {size} letters")
    # Position of each column's letter in A and B (meaningful where the column consumes it).
    pos_a = start_a + np.cumsum(in_a, dtype=np.int64) - 1
    pos_b = start_b + np.cumsum(in_b, dtype=np.int64) - 1
    paired = np.flatnonzero(ops <= X)
    ca = a_codes[pos_a[paired]]
    cb = b_codes[pos_b[paired]]
    is_match = (ca == cb) & (ca < _ACGT_LIMIT)
    wrong = is_match != (ops[paired] == EQ)
    if wrong.any():
        k = int(np.flatnonzero(wrong)[0])
        col = int(paired[k])
        op = OPS[ops[col]]
        what = "a match" if is_match[k] else "a mismatch"
        raise ValueError(
            f"column {col} is {op!r} but A[{pos_a[col]}]={_LETTERS[min(int(ca[k]), 5)]} "
            f"against B[{pos_b[col]}]={_LETTERS[min(int(cb[k]), 5)]} is {what} "
            f"({int(wrong.sum())} such columns)")
    matches = int(is_match.sum())
    mismatches = paired.size - matches
    _, lengths, codes = run_arrays(ops)
    gap_lengths = lengths[codes >= INS]
    gap_cost = (gap_lengths.size * scoring.gap_open
                + int((gap_lengths - 1).sum()) * scoring.gap_extend)
    return matches * scoring.match + mismatches * scoring.mismatch - gap_cost


def stats(ops: np.ndarray) -> dict:
    """Counts of the alignment: columns, matches, mismatches, insertions (I letters),
    deletions (D letters), gap_opens (I-runs + D-runs), identity (matches / columns, 0.0 for
    no columns), span_a (= + X + I letters of A) and span_b (= + X + D letters of B)."""
    ops = as_ops(ops)
    counts = np.bincount(ops, minlength=4)
    matches, mismatches, ins, dels = (int(c) for c in counts[:4])
    _, _, codes = run_arrays(ops)
    columns = int(ops.size)
    return {
        "columns": columns,
        "matches": matches,
        "mismatches": mismatches,
        "insertions": ins,
        "deletions": dels,
        "gap_opens": int((codes >= INS).sum()),
        "identity": matches / columns if columns else 0.0,
        "span_a": matches + mismatches + ins,
        "span_b": matches + mismatches + dels,
    }


def ops_from_strings(aligned_a: str, aligned_b: str) -> np.ndarray:
    """The ops of two gapped alignment lines of equal length ('-' is a gap), such as
    parasail's ``get_traceback().query`` and ``.ref``. Matches are decided by
    ``scoring.encode`` (so N against N is ``X``); a column with two gaps is refused."""
    if len(aligned_a) != len(aligned_b):
        raise ValueError(f"aligned lines differ in length: {len(aligned_a)} != {len(aligned_b)}")
    raw_a = np.frombuffer(aligned_a.encode("ascii"), dtype=np.uint8)
    raw_b = np.frombuffer(aligned_b.encode("ascii"), dtype=np.uint8)
    gap_a, gap_b = raw_a == ord("-"), raw_b == ord("-")
    both = gap_a & gap_b
    if both.any():
        raise ValueError(f"column {int(np.flatnonzero(both)[0])} is a gap in both lines")
    # Gaps become N so encode accepts the line; gap columns never take the match branch.
    code_a = encode(np.where(gap_a, ord("N"), raw_a).astype(np.uint8).tobytes(), "aligned A")
    code_b = encode(np.where(gap_b, ord("N"), raw_b).astype(np.uint8).tobytes(), "aligned B")
    match = (code_a == code_b) & (code_a < _ACGT_LIMIT)
    ops = np.where(match, EQ, X).astype(np.uint8)
    ops[gap_b] = INS
    ops[gap_a] = DEL
    return ops
