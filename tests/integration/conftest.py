"""Real node processes on 127.0.0.1, stopped by pid at teardown whatever happens."""

from __future__ import annotations

import time

import pytest
import zmq

from cluster.local import LocalNode, free_port, probe_node
from cluster.node import keys
from cluster.node.status import query_status
from proto import Codec, new_node_id

pytestmark = pytest.mark.integration


@pytest.fixture
def launch(tmp_path):
    """Start probe nodes; every one is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[LocalNode] = []

    def start(name: str, port: int | None = None, peers: list[int] = (), extra: list[str] = ()) -> LocalNode:
        node = probe_node(name, tmp_path, port or free_port(), list(peers), extra=list(extra))
        started.append(node.start())
        return node

    yield start
    for node in started:
        node.stop(timeout=5)


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # the poll interval of a deadline loop, not a wait for the condition
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def status_of(node: LocalNode, timeout: float = 2.0):
    result = query_status([node.address], timeout=timeout)[0]
    return result.reply


class Client:
    """A DEALER speaking the protocol to one node, able to send raw frames too; it
    authenticates with ``credentials``, else with the keys this process learnt for ``address``."""

    def __init__(self, address: str, credentials: keys.Credentials | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        keys.connect(self.sock, address, credentials)
        self.codec = Codec(new_node_id())

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def send(self, message) -> None:
        self.codec.send(self.sock, message)

    def recv(self, timeout: float = 5.0):
        if not self.sock.poll(timeout * 1000):
            pytest.fail(f"no reply within {timeout:g} s")
        return self.codec.recv(self.sock)[2]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def client_for():
    clients: list[Client] = []

    def make(node: LocalNode) -> Client:
        c = Client(node.address)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def detail(node: LocalNode, timeout: float = 1.0) -> dict | None:
    """The node's status detail, or None if it is not running or does not answer."""
    if node.process is None or node.process.poll() is not None:
        return None
    reply = query_status([node.address], timeout=timeout)[0].reply
    return reply.detail if reply is not None else None


class NodeGroup:
    """What the real-cluster harnesses share; a subclass has ``nodes`` and ``balancers``."""

    nodes: list[LocalNode]
    balancers: list[LocalNode]

    def logs(self, tail: int = 1500) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.log_text()[-tail:]}" for n in self.nodes)

    def wait(self, predicate, timeout: float, what: str):
        """``wait_for`` whose failure message carries every node's log tail."""
        try:
            return wait_for(predicate, timeout, what)
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{self.logs()}")

    def active(self) -> tuple[LocalNode, dict] | None:
        """The active balancer and its status detail, or None."""
        for b in self.balancers:
            d = detail(b)
            if d is not None and d["state"] == "active":
                return b, d
        return None
