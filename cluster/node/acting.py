"""A gateway acting for its own users (ACT_FOR).

A gateway (the Coordinate REST gateway, a web front end) authenticates its users itself, with
whatever it speaks to them, and talks to the cluster with one key of role ``gateway``. For a
user's request it wraps the whole request in ACT_FOR with the user's name; the receiving node
unwraps it here and handles the request as if ``GATEWAY/user`` had sent it with a client key.
So the jobs, pins and reads of two users of one gateway are kept apart by the very owner checks
that keep two client keys apart, and a gateway can never act for a key of its own (a key's name
has no slash) nor for another gateway's users.

What is checked here, before any core sees the request: the sender holds a gateway key (any
other role gets ``NotAGateway``: counted and logged as forbidden, answered nothing); the owner
is a plain name; the wrapped frames are one well-formed message of the catalogue, through the
same codec and limits as any message (``ProtocolError`` otherwise: rejected and answered); and
that message is not itself an ACT_FOR. The role the user acts with is ``client``: a gateway
cannot lend its users an operator's reach.
"""

from __future__ import annotations

import re

from cluster.node.events import Peer
from proto import Codec, ProtocolError, Reason
from proto.messages import ActFor, Message

OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


class NotAGateway(Exception):
    """ACT_FOR from a key that is not a gateway's."""


def acting(peer: Peer, owner: str) -> Peer:
    """The peer a gateway's request for ``owner`` is handled as (see the module docstring). In an
    insecure cluster, where nobody has a key, it is ``owner`` itself, with every role."""
    if not peer.role:
        return Peer(owner, "")
    if peer.role != "gateway":
        raise NotAGateway(f"only a gateway key may act for another owner; {peer.name!r} has role {peer.role}")
    return Peer(f"{peer.name}/{owner}", "client")


def wrap(codec: Codec, message: Message, owner: str | None) -> Message:
    """``message`` as a gateway sends it for ``owner`` (ACT_FOR), or as it is when ``owner`` is None."""
    if owner is None:
        return message
    return ActFor(owner, [bytes(frame) for frame in codec.encode(message)])


def unwrap(codec: Codec, message: ActFor, peer: Peer) -> tuple[int, Message, Peer]:
    """The (sender node id, message, acting peer) an ACT_FOR stands for. Raises NotAGateway or
    ProtocolError; nothing else."""
    acted = acting(peer, message.owner)  # first: a non-gateway's frames are never decoded
    if not OWNER.fullmatch(message.owner):
        raise ProtocolError(Reason.BAD_BODY, f"owner {message.owner[:80]!r} is not a name: 1 to 64 of A-Z a-z 0-9 . _ @ + -, "
                            "starting with a letter or digit", ActFor.code, "owner")
    sender, inner = codec.decode(message.frames)
    if type(inner) is ActFor:
        raise ProtocolError(Reason.UNEXPECTED, "an ACT_FOR inside an ACT_FOR", ActFor.code, "frames")
    return sender, inner, acted
