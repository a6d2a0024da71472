"""128-bit ids (jobs, files, idempotency keys) as they travel: two uint64 header fields."""

from __future__ import annotations

_MASK64 = 2**64 - 1


def split128(value: bytes) -> tuple[int, int]:
    """A 16-byte id as (upper, lower) header fields."""
    n = int.from_bytes(value, "big")
    return n >> 64, n & _MASK64


def join128(upper: int, lower: int) -> bytes:
    """The 16-byte id of (upper, lower) header fields."""
    return ((upper << 64) | lower).to_bytes(16, "big")
