"""Two real probe processes on 127.0.0.1: heartbeats, garbage, SIGKILL, SIGTERM."""

from __future__ import annotations

import os

import pytest

from cluster.local import free_port
from proto.messages import Error, Heartbeat

from .conftest import status_of, wait_for


def peer_state(node, peer):
    reply = status_of(node, timeout=1.0)
    return reply and reply.detail["peers"][peer.address]["state"]


@pytest.fixture
def pair(launch):
    pa, pb = free_port(), free_port()
    a = launch("a", pa, [pb])
    b = launch("b", pb, [pa])
    for n in (a, b):
        n.wait_ready()
    wait_for(lambda: peer_state(a, b) == "alive" and peer_state(b, a) == "alive", what="both peers alive")
    return a, b


def test_garbage_leaves_both_nodes_serving_and_counted(pair, client_for):
    a, b = pair
    client = client_for(a)
    garbage = [[os.urandom(n)] for n in (0, 1, 5, 27, 28, 64, 4096)] * 50  # 350 messages
    garbage += [[b"CZ\x01\x04" + os.urandom(60)], [b"\xff" * 100, b"", b"x"]]
    for frames in garbage:
        client.send_frames(frames)
    wait_for(lambda: status_of(a).counters.get("rejected_total", 0) == len(garbage), what="all garbage counted")
    ra, rb = status_of(a), status_of(b)
    assert ra.role == rb.role == "probe"
    assert ra.counters.get("core_errors", 0) == 0
    # Rate limiting keeps the log readable: not 352 lines, and the suppressed ones are counted.
    logged = sum("rejected message from" in line for line in a.log_text().splitlines())
    assert logged + ra.counters.get("rejected_log_suppressed", 0) == len(garbage)
    assert logged < len(garbage)
    # Heartbeats kept flowing through the flood, both ways.
    replies = ra.detail["peers"][b.address]["replies"]
    wait_for(lambda: status_of(a).detail["peers"][b.address]["replies"] > replies, what="a heartbeat after the garbage")
    assert peer_state(b, a) == "alive"
    # And a well-formed heartbeat from the same client is still echoed.
    client.send(Heartbeat(0, 99, 0))
    errors = 0
    while isinstance(reply := client.recv(), Error):  # the refusals of the garbage come first
        errors += 1
    assert reply == Heartbeat(0, 99, 1)
    assert errors == len(garbage)


def test_sigkilled_peer_goes_silent_and_comes_back_when_restarted(pair, launch):
    a, b = pair
    b.kill()
    wait_for(lambda: peer_state(a, b) == "silent", what="a to see b silent")
    assert status_of(a) is not None  # a serves on alone
    port = int(b.address.rsplit(":", 1)[1])
    b2 = launch("b2", port, [int(a.address.rsplit(":", 1)[1])])
    b2.wait_ready()
    wait_for(lambda: peer_state(a, b2) == "alive", what="a to see the restarted b alive")
    assert "silent" in a.log_text() and a.log_text().count("alive") >= 2


def test_sigterm_stops_cleanly_with_exit_zero(pair):
    a, b = pair
    assert a.stop() == 0
    assert b.stop() == 0
    for n in (a, b):
        assert "SIGTERM received, stopping" in n.log_text() and "probe stopped" in n.log_text()


def test_status_shows_the_loop_history_with_each_effects_cause(pair):
    """The loop keeps (stimulus, event, effect, cause) for every effect; a status reply carries
    the newest: a live node can say why it sent what it sent."""
    a, b = pair
    wait_for(lambda: any("Send Heartbeat" in e[2] for e in status_of(a).detail["history"]), what="a heartbeat in the history")
    history = status_of(a).detail["history"]
    assert 0 < len(history) <= 20
    for stimulus_id, event, effect, cause in history:
        assert stimulus_id and event in {"Started", "MessageReceived", "TimerFired", "StopRequested"}
        assert cause, f"{effect} on {stimulus_id} has no cause"
    # the periodic heartbeats go out on the heartbeat timer, and say so
    wait_for(lambda: any(e[1] == "TimerFired" and e[2].startswith("Send Heartbeat") and e[0].startswith("timer-")
                         for e in status_of(a).detail["history"]), what="a heartbeat sent on its timer")


def test_probes_with_keys_heartbeat_each_other_and_a_stranger_gets_nothing(tmp_path):
    """`cluster probe --config --name`: CURVE between two probes, each pinning the other's key by
    its name; a peer without a key gets no answer, even to STATUS_QUERY."""
    import zmq

    from cluster.local import LocalNode, learn_keys, make_keys, start_all, stop_all
    from proto import Codec, new_node_id
    from proto.messages import StatusQuery

    make_keys(tmp_path, {"pa": "monitor", "pb": "monitor"})
    config = tmp_path / "cluster.toml"
    config.write_text("# keys only: keys.toml and keys/ beside this file\n")
    creds = learn_keys(config)
    ports = {"pa": free_port(), "pb": free_port()}
    nodes = []
    for me, other in (("pa", "pb"), ("pb", "pa")):
        address = f"tcp://127.0.0.1:{ports[me]}"
        creds.add_server(address, me)  # this process's status queries pin the probe's key
        argv = ["probe", "--bind", address, "--interval", "0.2", "--config", str(config), "--name", me,
                "--peer", f"{other}=tcp://127.0.0.1:{ports[other]}"]
        nodes.append(LocalNode(me, argv, address, tmp_path / f"{me}.log"))
    start_all(nodes)
    try:
        a, b = nodes
        wait_for(lambda: peer_state(a, b) == "alive" and peer_state(b, a) == "alive", what="both peers alive")
        assert status_of(a).detail["public_key"] == creds.allow.by_name["pa"].public
        ctx = zmq.Context()
        try:
            stranger = ctx.socket(zmq.DEALER)
            stranger.linger = 0
            stranger.connect(a.address)
            Codec(new_node_id()).send(stranger, StatusQuery(1))
            assert not stranger.poll(1500)
        finally:
            ctx.destroy(linger=0)
        assert "INSECURE" not in a.log_text()
    finally:
        stop_all(nodes)
