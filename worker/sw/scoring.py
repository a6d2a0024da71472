"""Scoring parameters and the nucleotide alphabet of the Smith-Waterman kernels.

Sequences are encoded once into small integer codes so that the kernels compare codes with a
single equality test: A C G T (either case; lower case is soft-masked and scores as upper case)
are 0..3. N and every other IUPAC code are "other": they score as a mismatch against
everything, N included. To make "other never equals other" hold under plain equality, the
reference keeps code 4 and the query side is shifted to code 5 when it enters a kernel
(``query_codes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

A, C, G, T = 0, 1, 2, 3
OTHER = 4
OTHER_QUERY = 5

_IUPAC_OTHER = "NRYSWKMBDHVU"

_TABLE = np.full(256, 255, dtype=np.uint8)
for _code, _letters in ((A, "Aa"), (C, "Cc"), (G, "Gg"), (T, "Tt")):
    for _ch in _letters:
        _TABLE[ord(_ch)] = _code
for _ch in _IUPAC_OTHER:
    _TABLE[ord(_ch)] = OTHER
    _TABLE[ord(_ch.lower())] = OTHER

# Bounds keep every intermediate value of the int16 and int32 kernels far from overflow:
# see tile.py for how they enter the int16 range checks.
MAX_PARAMETER = 1000


class ScoringError(ValueError):
    """Scoring parameters that the kernels cannot use; the message says which and why."""


class SequenceError(ValueError):
    """A sequence holding a letter that is not a nucleotide code."""


@dataclass(frozen=True, slots=True)
class Scoring:
    """Linear substitution and affine gaps, in parasail's convention.

    A gap of length k costs ``gap_open + (k - 1) * gap_extend``; ``gap_open`` and
    ``gap_extend`` are given as positive penalties, ``mismatch`` as a score (zero or negative).
    """

    match: int = 2
    mismatch: int = -3
    gap_open: int = 5
    gap_extend: int = 2

    def __post_init__(self) -> None:
        for name in ("match", "mismatch", "gap_open", "gap_extend"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ScoringError(f"{name} must be an integer, got {value!r}")
        if not 1 <= self.match <= MAX_PARAMETER:
            raise ScoringError(f"match must be between 1 and {MAX_PARAMETER}, got {self.match}")
        if not -MAX_PARAMETER <= self.mismatch <= 0:
            raise ScoringError(
                f"mismatch must be between -{MAX_PARAMETER} and 0 (a score, not a penalty), "
                f"got {self.mismatch}")
        for name in ("gap_open", "gap_extend"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_PARAMETER:
                raise ScoringError(
                    f"{name} must be between 0 and {MAX_PARAMETER} (a positive penalty), "
                    f"got {value}")

    def check_lengths(self, len_a: int, len_b: int) -> None:
        """Refuse pairs whose best score could overflow the int32 kernels."""
        bound = self.match * min(len_a, len_b)
        if bound > 2**30:
            raise ScoringError(
                f"a {len_a} x {len_b} alignment with match={self.match} could score up to "
                f"{bound}, beyond the int32 kernels (2^30): lower match or split the pair")


def encode(sequence: str | bytes, name: str = "sequence") -> np.ndarray:
    """Encode nucleotides to codes 0..4 (uint8); raise SequenceError on anything else."""
    if isinstance(sequence, str):
        try:
            raw = sequence.encode("ascii")
        except UnicodeEncodeError as exc:
            raise SequenceError(
                f"{name}: non-ASCII character {sequence[exc.start]!r} at position "
                f"{exc.start}; expected nucleotide letters (ACGT, IUPAC codes)") from None
    else:
        raw = bytes(sequence)
    codes = _TABLE[np.frombuffer(raw, dtype=np.uint8)]
    bad = np.flatnonzero(codes == 255)
    if bad.size:
        pos = int(bad[0])
        raise SequenceError(
            f"{name}: invalid character {chr(raw[pos])!r} at position {pos} "
            f"({bad.size} invalid in all); expected nucleotide letters (ACGT, IUPAC codes)")
    return codes


def query_codes(codes: np.ndarray) -> np.ndarray:
    """The query side's codes: "other" moved to its own code so that it never equals the
    reference's "other" (N against N is a mismatch)."""
    return np.where(codes == OTHER, np.uint8(OTHER_QUERY), codes).astype(np.uint8)
