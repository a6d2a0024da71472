"""Field types of the wire: C types for packed headers, the payload marker, the message base.

A message class declares its fields once. A field annotated with a C type (``U8`` … ``U64``,
``I32``, ``I64``, ``F64``) lives in the packed little-endian type-specific header; every other
field lives in the MessagePack body, in declaration order. A field annotated ``Payload`` is a
byte buffer that travels inline in the body when small, or as a raw frame of its own when large
(see ``proto.codec``). Everything else about the wire is derived from these declarations: the
codec, the C header ``cluster_proto.h`` and the table in ``doc/protocol.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgspec


@dataclass(frozen=True, slots=True)
class CType:
    """A fixed-width C type of a packed header field."""

    c_name: str  # as spelled in the generated C header (<stdint.h>)
    struct_code: str  # the Python ``struct`` format character
    low: int | float
    high: int | float


U8 = Annotated[int, CType("uint8_t", "B", 0, 2**8 - 1)]
U16 = Annotated[int, CType("uint16_t", "H", 0, 2**16 - 1)]
U32 = Annotated[int, CType("uint32_t", "I", 0, 2**32 - 1)]
U64 = Annotated[int, CType("uint64_t", "Q", 0, 2**64 - 1)]
I32 = Annotated[int, CType("int32_t", "i", -(2**31), 2**31 - 1)]
I64 = Annotated[int, CType("int64_t", "q", -(2**63), 2**63 - 1)]
F64 = Annotated[float, CType("double", "d", float("-inf"), float("inf"))]


class PayloadMarker:
    """Marks a body field as a raw byte payload (file chunk, numpy buffer)."""


# What a decoded payload is: ``bytes`` when it came inline, a ``memoryview`` of the received
# ZeroMQ frame (no copy) when it came as a raw frame. Senders may pass any contiguous buffer.
Payload = Annotated[Any, PayloadMarker()]


class Message(msgspec.Struct, frozen=True, gc=False):
    """Base of every message. Subclasses set ``code``, ``struct_name``, ``sender``, ``receiver``.

    Instances are immutable; ``gc=False`` because messages hold plain data and never form
    reference cycles, which makes them cheaper to create on the hot path.
    """

    code: ClassVar[int]
    struct_name: ClassVar[str]
    sender: ClassVar[str]
    receiver: ClassVar[str]
