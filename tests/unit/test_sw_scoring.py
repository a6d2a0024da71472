"""worker/sw/scoring.py: parameter validation, the nucleotide encoding and the query-side codes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from worker.sw.scoring import (
    MAX_PARAMETER,
    OTHER,
    OTHER_QUERY,
    Scoring,
    ScoringError,
    SequenceError,
    encode,
    query_codes,
)

# --- Scoring ----------------------------------------------------------------------------------


def test_defaults():
    s = Scoring()
    assert (s.match, s.mismatch, s.gap_open, s.gap_extend) == (2, -3, 5, 2)


def test_is_frozen_and_hashable():
    s = Scoring()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.match = 3  # type: ignore[misc]
    assert hash(s) == hash(Scoring())


@pytest.mark.parametrize("field", ["match", "mismatch", "gap_open", "gap_extend"])
@pytest.mark.parametrize("value", [True, False, 2.0, "2", None])
def test_non_integer_values_are_refused(field, value):
    with pytest.raises(ScoringError, match=rf"{field} must be an integer, got {value!r}"):
        Scoring(**{field: value})


def test_numpy_integers_are_accepted():
    s = Scoring(match=np.int32(3), mismatch=np.int64(-1), gap_open=np.uint8(4),
                gap_extend=np.int16(1))
    assert (s.match, s.mismatch, s.gap_open, s.gap_extend) == (3, -1, 4, 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"match": 0}, "match must be between 1 and 1000, got 0"),
    ({"match": -2}, "match must be between 1 and 1000, got -2"),
    ({"match": MAX_PARAMETER + 1}, "match must be between 1 and 1000, got 1001"),
    ({"mismatch": 1}, r"mismatch must be between -1000 and 0 \(a score, not a penalty\), got 1"),
    ({"mismatch": -1001}, "mismatch must be between -1000 and 0"),
    ({"gap_open": -5}, r"gap_open must be between 0 and 1000 \(a positive penalty\), got -5"),
    ({"gap_open": 1001}, "gap_open must be between 0 and 1000"),
    ({"gap_extend": -1}, r"gap_extend must be between 0 and 1000 \(a positive penalty\), got -1"),
    ({"gap_extend": 10**6}, "gap_extend must be between 0 and 1000"),
])
def test_out_of_range_values_are_refused(kwargs, message):
    with pytest.raises(ScoringError, match=message):
        Scoring(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"match": 1}, {"match": MAX_PARAMETER}, {"mismatch": 0}, {"mismatch": -MAX_PARAMETER},
    {"gap_open": 0}, {"gap_open": MAX_PARAMETER}, {"gap_extend": 0},
    {"gap_extend": MAX_PARAMETER}, {"gap_open": 1, "gap_extend": 3},
])
def test_bounds_are_inclusive(kwargs):
    Scoring(**kwargs)


def test_scoring_error_is_a_value_error():
    assert issubclass(ScoringError, ValueError)
    assert issubclass(SequenceError, ValueError)


def test_check_lengths():
    s = Scoring(match=2)
    s.check_lengths(5_000_000, 5_000_000)
    s.check_lengths(2**29, 10**12)  # bound = 2 * 2^29 = 2^30: still allowed
    s.check_lengths(0, 0)
    with pytest.raises(ScoringError, match=r"could score up to 1073741826, beyond the int32"):
        s.check_lengths(2**29 + 1, 2**29 + 1)
    with pytest.raises(ScoringError, match=r"a 3000000 x 2000000 alignment with match=1000"):
        Scoring(match=1000).check_lengths(3_000_000, 2_000_000)
    Scoring(match=1000).check_lengths(1_000_000, 1)  # only the shorter length counts


# --- encode -----------------------------------------------------------------------------------


def test_encode_acgt_either_case():
    codes = encode("ACGTacgt")
    assert codes.dtype == np.uint8
    assert codes.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("letter", list("NRYSWKMBDHVU"))
def test_other_iupac_codes_are_other(letter):
    assert encode(letter + letter.lower()).tolist() == [OTHER, OTHER]


def test_empty():
    for empty in ("", b""):
        codes = encode(empty)
        assert codes.dtype == np.uint8 and codes.size == 0


def test_bytes_like_inputs():
    expected = encode("ACGTN").tolist()
    assert encode(b"ACGTN").tolist() == expected
    assert encode(bytearray(b"acgtn")).tolist() == expected
    assert encode(memoryview(b"ACGTN")).tolist() == expected


def test_bytes_input_is_not_modified():
    raw = bytearray(b"acgt")
    encode(raw)
    assert raw == bytearray(b"acgt")


@pytest.mark.parametrize("seq, char, pos, count", [
    ("ACGX", "X", 3, 1),
    ("ACGT-ACGT", "-", 4, 1),
    ("AC GT", " ", 2, 1),
    ("ACGT\n", "\n", 4, 1),
    ("E", "E", 0, 1),
    ("AC*1Z", "*", 2, 3),
])
def test_invalid_character_is_named_with_its_position(seq, char, pos, count):
    with pytest.raises(SequenceError) as info:
        encode(seq, name="chr7")
    message = str(info.value)
    assert message.startswith(f"chr7: invalid character {char!r} at position {pos} ({count} invalid")
    assert "expected nucleotide letters" in message


def test_invalid_byte_in_bytes_input():
    with pytest.raises(SequenceError, match=r"sequence: invalid character 'x' at position 1"):
        encode(b"AxC")


def test_non_ascii_str():
    with pytest.raises(SequenceError, match=r"query: non-ASCII character 'é' at position 3"):
        encode("ACGé", name="query")


def test_non_ascii_bytes():
    with pytest.raises(SequenceError, match=r"invalid character .* at position 2"):
        encode("AC\u00e9".encode("latin-1"))


def test_long_sequence_round_trip():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5, 100_000).astype(np.uint8)
    text = "".join("ACGTN"[c] for c in codes)
    assert np.array_equal(encode(text), codes)
    assert np.array_equal(encode(text.lower()), codes)


# --- query_codes ------------------------------------------------------------------------------


def test_query_codes_moves_other_only():
    codes = encode("ACGTNRacgtn")
    moved = query_codes(codes)
    assert moved.dtype == np.uint8
    assert moved.tolist() == [0, 1, 2, 3, OTHER_QUERY, OTHER_QUERY, 0, 1, 2, 3, OTHER_QUERY]
    assert codes.tolist() == [0, 1, 2, 3, OTHER, OTHER, 0, 1, 2, 3, OTHER]  # input untouched


def test_query_other_never_equals_reference_other():
    ref = encode("ACGTN")
    query = query_codes(encode("ACGTN"))
    assert (ref == query).tolist() == [True, True, True, True, False]
    assert OTHER_QUERY != OTHER


def test_query_codes_empty():
    assert query_codes(encode("")).size == 0
