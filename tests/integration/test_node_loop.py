"""cluster/node/loop.py driven directly: a real ``NodeLoop`` over a trivial core on 127.0.0.1.

The core (``EchoCore``) answers a HEARTBEAT with its reply, refuses every other message (a
``Refuse`` effect), raises on the heartbeat numbered ``UNLUCKY`` (a core bug), ticks a timer three
times, notes the thread that handed it a posted event, stops on a posted ``Quit`` and says
goodbye (a last HEARTBEAT, sequence ``FAREWELL``) on ``StopRequested``.

``NodeLoop.run`` installs signal handlers, so it runs on the test's main thread while a peer
thread does the talking; the peer always ends by posting ``Quit`` (the loop then returns), and
the test's 120 s limit bounds a loop that would not. SIGTERM is sent to a child process running
the same core (never to the test's own process); it is stopped by pid whatever happens.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from cluster.local import free_port
from cluster.node import keys
from cluster.node.events import (Log, MessageReceived, Refuse, Send, Started, StartTimer, Stop, StopRequested,
                                 TimerFired)
from cluster.node.loop import NodeLoop, SocketSpec
from cluster.node.sendqueue import SendQueues
from cluster.node.status import query_status
from proto import Codec, Reason, new_node_id
from proto.messages import Error, FileResponse, Heartbeat, JobQuery

from .conftest import Client, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNLUCKY = 13
FAREWELL = 999


@dataclass(frozen=True)
class Poked:
    """Posted from another thread (``NodeLoop.post``)."""

    stimulus_id: str


@dataclass(frozen=True)
class Quit:
    """Posted by the test when it is done."""

    stimulus_id: str = "quit"


class EchoCore:
    role = "echo"

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.ticks = 0
        self.poked_on: str | None = None
        self.peer: bytes | None = None

    def handle(self, event, now: float) -> list:
        self.seen[type(event).__name__] += 1
        if isinstance(event, Started):
            return [StartTimer("tick", 0.01, cause=event.stimulus_id)]
        if isinstance(event, TimerFired):
            self.ticks += 1
            return [StartTimer("tick", 0.01)] if self.ticks < 3 else []
        if isinstance(event, Poked):
            self.poked_on = threading.current_thread().name
            return [Log(logging.INFO, "poked")]
        if isinstance(event, Quit):
            return [Stop("the test is done")]
        if isinstance(event, StopRequested):
            return [Send("api", Heartbeat(0, FAREWELL, 0), route=self.peer)] if self.peer else []
        if isinstance(event, MessageReceived):
            m = event.message
            if not isinstance(m, Heartbeat):
                return [Refuse(event.socket, event.route, m.code, getattr(m, "request_id", 0), "echo answers heartbeats only")]
            if m.sequence == UNLUCKY:
                raise RuntimeError("a bug in the core")
            self.peer = event.route
            return [Send(event.socket, Heartbeat(m.epoch, m.sequence, 1), route=event.route, cause=event.stimulus_id)]
        return []

    def status(self, now: float) -> dict:
        return {"ticks": self.ticks, "poked_on": self.poked_on, "seen": dict(self.seen)}

    def validate_state(self) -> None:
        assert 0 <= self.ticks <= 3


def echo_loop(bind: str) -> NodeLoop:
    return NodeLoop(EchoCore(), [SocketSpec("api", zmq.ROUTER, bind=(bind,))], linger_ms=0)


def status(address: str) -> tuple[dict, dict]:
    reply = query_status([address], timeout=5.0)[0].reply
    assert reply is not None, f"no status from {address}"
    return reply.counters, reply.detail


def talk(loop: NodeLoop, out: dict) -> None:
    """The peer thread: every check that needs the loop running, then ``Quit`` whatever happened."""
    peer = None
    try:
        address = wait_for(lambda: loop.bound.get("api") and loop.bound["api"][0], 10, "the loop to bind")
        keys.learn(keys.Credentials.plaintext([address]))  # a loop built by hand has no keys
        out["address"] = address
        peer = Client(address)
        peer.send(Heartbeat(1, 7, 0))
        out["echo"] = peer.recv()
        peer.send_frames([b"GET / HTTP/1.1\r\n\r\n"])  # not our protocol: the loop refuses it
        out["garbage"] = peer.recv()
        peer.send(JobQuery(5, 1, 2))  # well formed, but the core refuses it
        out["refused"] = peer.recv()
        peer.send(Heartbeat(1, UNLUCKY, 0))  # the core raises: no answer ...
        peer.send(Heartbeat(1, 14, 0))  # ... and the node goes on serving
        out["after_bug"] = peer.recv()
        loop.post(Poked("poke-1"))
        wait_for(lambda: status(address)[1]["poked_on"] is not None and status(address)[1]["ticks"] == 3, 10,
                 "the posted event and three ticks")
        out["counters"], out["detail"] = status(address)
    except BaseException as exc:  # reported by the main thread
        out["error"] = exc
    finally:
        if peer is not None:
            peer.close()
        loop.post(Quit())


def test_a_node_loop_serves_refuses_survives_its_core_and_stops():
    loop = echo_loop("tcp://127.0.0.1:0")  # the loop reports the port it got (loop.bound)
    out: dict = {}
    peer = threading.Thread(target=talk, args=(loop, out), name="peer", daemon=True)
    peer.start()
    assert loop.run() == 0
    peer.join(10)
    assert not peer.is_alive()
    if "error" in out:
        raise out["error"]

    assert out["echo"] == Heartbeat(1, 7, 1)
    garbage = out["garbage"]
    assert isinstance(garbage, Error) and garbage.reason == Reason.BAD_MAGIC, garbage
    refused = out["refused"]
    assert isinstance(refused, Error) and (refused.reason, refused.refers_to, refused.request_id) == \
        (Reason.UNEXPECTED, JobQuery.code, 5), refused
    assert out["after_bug"] == Heartbeat(1, 14, 1)

    counters, detail = out["counters"], out["detail"]
    assert (counters["rejected.BAD_MAGIC"], counters["rejected.UNEXPECTED"], counters["rejected_total"]) == (1, 1, 2)
    assert counters["core_errors"] == 1 and counters["messages_in"] >= 4
    assert detail["ticks"] == 3 and detail["poked_on"] == threading.main_thread().name  # posted, handled on the loop's thread
    assert detail["endpoints"] == {"api": [out["address"]]} and detail["node_id"]
    effects = {(e[1], e[2]) for e in detail["history"]}  # (event, effect) of the newest entries
    assert {("MessageReceived", "Send Heartbeat on api"), ("MessageReceived", "Refuse"), ("Poked", "Log")} <= effects

    # story(): what one stimulus led to
    started = next(e.stimulus_id for e in loop.history if e.event == "Started")
    assert [(e.effect, e.cause) for e in loop.story(started)] == [("StartTimer tick", started)]
    refusal = next(e for e in loop.history if e.effect == "Refuse")
    assert [e.effect for e in loop.story(refusal.stimulus_id)] == ["Refuse"]
    assert loop.core.seen["Quit"] == 1 and loop.core.seen["StopRequested"] == 0  # Stop, not a signal
    assert query_status([out["address"]], timeout=0.5)[0].reply is None, "the loop's socket outlived run()"


def serve(address: str) -> None:
    """The child process of the SIGTERM test: the same core, until a signal."""
    logging.basicConfig(level=logging.INFO)
    sys.exit(echo_loop(address).run())


def test_sigterm_stops_the_loop_after_the_core_says_goodbye(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    keys.learn(keys.Credentials.plaintext([address]))
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", f"from tests.integration.test_node_loop import serve; serve({address!r})"],
                                 cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    peer = Client(address)
    try:
        wait_for(lambda: child.poll() is not None or query_status([address], timeout=0.5)[0].reply, 30,
                 "the child's loop to answer")
        assert child.poll() is None, (tmp_path / "child.log").read_text()
        peer.send(Heartbeat(2, 1, 0))  # the core now knows whom to say goodbye to
        assert peer.recv() == Heartbeat(2, 1, 1)
        os.kill(child.pid, signal.SIGTERM)
        assert peer.recv(10) == Heartbeat(0, FAREWELL, 0), "no goodbye: StopRequested did not reach the core"
        assert child.wait(10) == 0, (tmp_path / "child.log").read_text()
    finally:
        peer.close()
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)


class BulkCore:
    """Answers every HEARTBEAT with a 1 MiB FILE_RESPONSE, the way a storage node answers reads."""

    role = "bulk"
    payload = b"\x5a" * (1 << 20)

    def __init__(self) -> None:
        self.asked = 0

    def handle(self, event, now: float) -> list:
        if isinstance(event, Quit):
            return [Stop("the test is done")]
        if isinstance(event, MessageReceived) and isinstance(event.message, Heartbeat):
            self.asked += 1
            reply = FileResponse(event.message.sequence, 1, 2, 0, len(self.payload), 0, self.payload)
            return [Send(event.socket, reply, route=event.route)]
        return []

    def status(self, now: float) -> dict:
        return {"asked": self.asked}


def stall_then_read(loop: NodeLoop, out: dict) -> None:
    """A peer that asks for 64 MiB and reads nothing, then reads what reached it and asks again."""
    reader = None
    try:
        address = wait_for(lambda: loop.bound.get("bulk") and loop.bound["bulk"][0], 10, "the loop to bind")
        keys.learn(keys.Credentials.plaintext([address]))
        reader = Client.__new__(Client)  # its options before it connects: libzmq applies them to new connections only
        reader.ctx = zmq.Context()
        reader.sock = reader.ctx.socket(zmq.DEALER)
        for opt, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 1), (zmq.RCVBUF, 4096)):
            reader.sock.setsockopt(opt, value)  # ZeroMQ and the kernel buffer almost nothing for it
        keys.connect(reader.sock, address)
        reader.codec = Codec(new_node_id())
        for seq in range(64):
            reader.send(Heartbeat(1, seq, 0))
        counters, detail = wait_for(lambda: (s := status(address)) and s[1]["asked"] == 64 and s, 20,
                                    "the loop to take all 64 asks")
        out["stalled"] = (counters, detail)
        got = 0
        while reader.sock.poll(2000):  # what was queued for it drains, then nothing more comes
            reader.codec.recv(reader.sock)
            got += 1
        out["got"] = got
        reader.send(Heartbeat(1, 1000, 0))
        out["after"] = reader.recv(10)
    except BaseException as exc:
        out["error"] = exc
    finally:
        if reader is not None:
            reader.close()
        loop.post(Quit())


def test_a_peer_that_does_not_read_holds_at_most_its_byte_budget_and_is_served_again_once_it_reads():
    budget = 8 << 20
    loop = NodeLoop(BulkCore(), [SocketSpec("bulk", zmq.ROUTER, bind=("tcp://127.0.0.1:0",))], linger_ms=0,
                    send_queues=SendQueues(people_bytes=budget, node_bytes=budget))
    out: dict = {}
    peer = threading.Thread(target=stall_then_read, args=(loop, out), name="peer", daemon=True)
    peer.start()
    assert loop.run() == 0
    peer.join(10)
    if "error" in out:
        raise out["error"]
    counters, detail = out["stalled"]
    held = detail["send_queues"]["largest_held_bytes"]
    # at most its budget and one more message: libzmq's 1000-message queue would have held 64 MiB
    assert 0 < held <= budget + (1 << 20) + 4096, detail["send_queues"]
    dropped = counters["send_dropped.peer_queue_bytes"]
    assert dropped >= 64 - (budget >> 20) - 1 - 8, counters  # a few left through the kernel's buffers
    assert out["got"] == 64 - dropped
    assert isinstance(out["after"], FileResponse) and out["after"].request_id == 1000


# ---- descriptors the node drives itself (add_reader) -----------------------------------------------


@dataclass(frozen=True)
class Piped:
    """What a reader read from its pipe (a worker's slot pipes give OutputRead, TaskEnded)."""

    data: bytes
    stimulus_id: str = "piped"


class PipeCore:
    role = "pipe"

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.threads: set[str] = set()

    def handle(self, event, now: float) -> list:
        if isinstance(event, Piped):
            self.got.append(event.data)
            self.threads.add(threading.current_thread().name)
            if event.data == b"quit":
                return [Stop("the test is done")]
        return []

    def status(self, now: float) -> dict:
        return {"got": len(self.got)}


def test_readers_are_called_on_the_loop_thread_their_events_in_order_and_removed_readers_are_not():
    first_r, first_w = os.pipe()
    second_r, second_w = os.pipe()
    for fd in (first_r, second_r):
        os.set_blocking(fd, False)
    core = PipeCore()
    loop = NodeLoop(core, [], linger_ms=0)
    reads: list[bytes] = []

    def on_first() -> list:
        chunk = os.read(first_r, 100)
        reads.append(chunk)
        if chunk == b"boom":
            raise RuntimeError("a reader's bug")  # logged and counted: the node serves on
        if chunk == b"two":  # from here the loop watches the second pipe, not the first
            loop.remove_reader(first_r)
            loop.add_reader(second_r, on_second)
        return [Piped(chunk), Piped(chunk + b"!")]

    def on_second() -> list:
        return [Piped(os.read(second_r, 100))]

    def writer() -> None:  # one piece at a time, so that each is one read
        try:
            for piece in (b"one", b"boom", b"two"):
                seen = len(reads)
                os.write(first_w, piece)
                wait_for(lambda: len(reads) > seen, 10, f"the loop to read {piece!r}")
            os.write(first_w, b"not read: no longer watched")
        finally:
            os.write(second_w, b"quit")  # the loop stops whatever happened

    loop.add_reader(first_r, on_first)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert loop.run() == 0
    finally:
        thread.join(30)
        for fd in (first_r, first_w, second_r, second_w):
            os.close(fd)
    assert core.got == [b"one", b"one!", b"two", b"two!", b"quit"]
    assert core.threads == {threading.main_thread().name}
    assert loop.counters["reader_errors"] == 1
    assert reads == [b"one", b"boom", b"two"]
