"""The probe core driven directly: events in, effects out; no sockets, clocks, threads or sleeps."""

from __future__ import annotations

import logging

import pytest

from cluster.probe.core import BEAT, SERVE, ProbeCore, peer_socket
from cluster.node.events import Log, MessageReceived, Refuse, Send, Started, StartTimer, TimerFired
from proto.messages import Heartbeat, StatusQuery, Submit

A, B = "tcp://10.0.0.1:5600", "tcp://10.0.0.2:5600"


@pytest.fixture
def core():
    c = ProbeCore([A, B], interval=1.0, liveness=3)
    yield c
    c.validate_state()


def sends(effects):
    return [e for e in effects if isinstance(e, Send)]


def reply_from(peer: str, seq: int, stim: str = "s") -> MessageReceived:
    return MessageReceived(peer_socket(peer), None, 7, Heartbeat(0, seq, 1), stim)


def test_start_sends_a_heartbeat_to_every_peer_and_arms_the_timer(core):
    effects = core.handle(Started("start-1"), now=100.0)
    out = sends(effects)
    assert [(s.socket, s.message) for s in out] == [(peer_socket(A), Heartbeat(0, 1, 0)), (peer_socket(B), Heartbeat(0, 1, 0))]
    assert StartTimer(BEAT, 1.0, cause="start-1") in effects
    assert all(e.cause == "start-1" for e in effects)


def test_reply_makes_peer_alive_with_round_trip(core):
    core.handle(Started("s"), now=100.0)
    effects = core.handle(reply_from(A, 1), now=100.004)
    assert [type(e) for e in effects] == [Log]
    assert effects[0].level == logging.INFO and "alive" in effects[0].text
    st = core.status(now=100.5)["peers"][A]
    assert st["state"] == "alive" and st["rtt_ms"] == pytest.approx(4.0) and st["replies"] == 1
    assert core.status(now=100.5)["peers"][B]["state"] == "unknown"
    core.validate_state()


def test_peer_without_replies_goes_silent_once_and_comes_back(core):
    core.handle(Started("s"), now=0.0)
    core.handle(reply_from(A, 1), now=0.001)
    logs = []
    for t in range(1, 6):  # B never answers; A answers every beat
        effects = core.handle(TimerFired(BEAT, f"t{t}"), now=float(t))
        logs += [e for e in effects if isinstance(e, Log)]
        core.handle(reply_from(A, core.sequence), now=t + 0.001)
        core.validate_state()
    assert len(logs) == 1 and logs[0].text.startswith(f"peer {B} silent:")
    assert core.status(5.0)["peers"][B]["state"] == "silent"
    assert core.status(5.0)["peers"][A]["state"] == "alive"
    effects = core.handle(reply_from(B, core.sequence), now=5.002)
    assert "alive" in effects[0].text


def test_memory_of_sends_is_bounded_and_stale_replies_are_counted(core):
    core.handle(Started("s"), now=0.0)
    for t in range(1, 50):
        core.handle(TimerFired(BEAT, "t"), now=float(t))
    core.validate_state()  # at most `liveness` remembered sends per peer
    assert core.handle(reply_from(A, 1), now=50.0) == []
    assert core.status(50.0)["peers"][A]["late_replies"] == 1


def test_serving_socket_echoes_heartbeats_to_the_sender(core):
    effects = core.handle(MessageReceived(SERVE, b"\x00k", 9, Heartbeat(4, 77, 0), "m1"), now=1.0)
    assert effects == [Send(SERVE, Heartbeat(0, 77, 1), route=b"\x00k", cause="m1")]
    assert core.status(1.0)["heartbeats_answered"] == 1


@pytest.mark.parametrize(
    "socket, message",
    [
        (SERVE, Submit(1, 2, 3, "x", {})),  # not a probe's message at all
        (SERVE, Heartbeat(0, 1, 1)),  # a reply where requests belong
        (peer_socket(A), Heartbeat(0, 1, 0)),  # a request where replies belong
    ],
)
def test_messages_a_probe_does_not_accept_are_refused_not_swallowed(core, socket, message):
    effects = core.handle(MessageReceived(socket, b"r" if socket == SERVE else None, 1, message, "m"), now=1.0)
    assert len(effects) == 1 and isinstance(effects[0], Refuse)
    assert effects[0].message_type == message.code and effects[0].detail


def test_status_query_never_reaches_the_core_but_would_be_refused(core):
    # The loop answers STATUS_QUERY itself; a core that got one anyway refuses it cleanly.
    effects = core.handle(MessageReceived(SERVE, b"r", 1, StatusQuery(5), "m"), now=0.0)
    assert isinstance(effects[0], Refuse) and effects[0].request_id == 5


def test_bad_settings_are_a_clear_error():
    with pytest.raises(ValueError, match="interval"):
        ProbeCore([A], interval=0)
