"""cluster/node/acting.py: a gateway's ACT_FOR, unwrapped without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.node.acting import OWNER, NotAGateway, acting, unwrap, wrap
from cluster.node.events import Peer
from proto import Codec, ProtocolError, Reason
from proto.messages import ActFor, CancelJob, FileChunk, Submit

GATEWAY = Peer("gw", "gateway")


def roundtrip(message, owner: str, peer: Peer = GATEWAY):
    codec = Codec(7)
    wrapped = wrap(codec, message, owner)
    assert isinstance(wrapped, ActFor)
    _, decoded = Codec(9).decode(Codec(7).encode(wrapped))  # the wrapper survives the wire itself
    return unwrap(Codec(9), decoded, peer)


def test_a_gateways_request_is_handled_as_its_user_with_a_client_key():
    sender, message, peer = roundtrip(Submit(5, 1, 2, "list", {"tasks": [{"i": 1}]}), "alice")
    assert (sender, message, peer) == (7, Submit(5, 1, 2, "list", {"tasks": [{"i": 1}]}), Peer("gw/alice", "client"))


def test_a_large_payload_travels_inside():
    chunk = FileChunk(3, 0, 1, b"\x01" * (300 << 10))  # over the inline threshold: a raw frame when sent alone
    _, message, _ = roundtrip(chunk, "alice")
    assert bytes(message.payload) == chunk.payload


@pytest.mark.parametrize("role", ["client", "operator", "worker", "master", "monitor", "balancer", "storage"])
def test_only_a_gateway_key_may_act_for_someone_and_its_frames_are_never_decoded(role):
    garbage = ActFor("alice", [b"not a message at all"])
    with pytest.raises(NotAGateway):
        unwrap(Codec(1), garbage, Peer("mallory", role))


def test_without_keys_the_owner_is_the_user_itself():
    assert acting(Peer("", ""), "alice") == Peer("alice", "")


@pytest.mark.parametrize("owner", ["", "a/b", "../x", "-dash", "x" * 65, "é", "a b", "alice\n"])
def test_an_owner_that_is_not_a_plain_name_is_refused(owner):
    with pytest.raises(ProtocolError) as caught:
        unwrap(Codec(1), wrap(Codec(1), CancelJob(1, 2, 3, ""), owner), GATEWAY)
    assert (caught.value.reason, caught.value.field) == (Reason.BAD_BODY, "owner")


def test_frames_that_are_not_one_message_are_refused_with_the_codecs_reason():
    with pytest.raises(ProtocolError) as caught:
        unwrap(Codec(1), ActFor("alice", [b"GET / HTTP/1.1"]), GATEWAY)
    assert caught.value.reason == Reason.BAD_MAGIC
    with pytest.raises(ProtocolError) as caught:
        unwrap(Codec(1), ActFor("alice", []), GATEWAY)
    assert caught.value.reason == Reason.SHORT_FRAME


def test_an_act_for_inside_an_act_for_is_refused():
    codec = Codec(1)
    inner = wrap(codec, CancelJob(1, 2, 3, ""), "bob")
    with pytest.raises(ProtocolError) as caught:
        unwrap(codec, wrap(codec, inner, "alice"), GATEWAY)
    assert caught.value.reason == Reason.UNEXPECTED


@given(st.text(max_size=80))
def test_an_acting_peer_never_bears_a_keys_name(owner):
    """A key's name has no slash (the allow-list refuses one), and every acting name has one."""
    if OWNER.fullmatch(owner):
        assert acting(GATEWAY, owner).name == f"gw/{owner}"
    else:
        with pytest.raises(ProtocolError):
            unwrap(Codec(1), wrap(Codec(1), CancelJob(1, 2, 3, ""), owner), GATEWAY)
