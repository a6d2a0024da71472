"""The wire: message catalogue, packed headers, MessagePack bodies, frames, limits, errors.

This package is the one place that knows the bytes on the wire; doc/protocol.md describes them
and ``proto/cluster_proto.h`` is generated from the same definitions.
"""

from proto.codec import (
    DEFAULT_LIMITS,
    GENERIC_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    SPECS,
    Codec,
    Limits,
    MessageSpec,
    new_node_id,
    spec_by_code,
    spec_for,
)
from proto.errors import AppReason, EncodeError, ProtocolError, Reason
from proto.messages import CATALOGUE
from proto.types import Message

__all__ = [
    "AppReason",
    "CATALOGUE",
    "DEFAULT_LIMITS",
    "GENERIC_SIZE",
    "MAGIC",
    "PROTOCOL_VERSION",
    "SPECS",
    "Codec",
    "EncodeError",
    "Limits",
    "Message",
    "MessageSpec",
    "ProtocolError",
    "Reason",
    "new_node_id",
    "spec_by_code",
    "spec_for",
]
