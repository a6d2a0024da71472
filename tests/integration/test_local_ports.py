"""cluster.local.free_port: the ports local clusters are started on (see its theory comment).

Real sockets and one real child process on 127.0.0.1; the child is stopped by pid at the end.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from cluster.local import _port_pool, free_port, pick_port

pytestmark = pytest.mark.integration


def ephemeral_port() -> int:
    """A port free now that this process has not handed out (free_port never gives one of the
    kernel's ephemeral ports, which this is)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_free_ports_are_distinct_free_and_outside_the_ephemeral_range():
    pool = _port_pool()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(p in pool for p in ports)
    low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert not any(low <= p <= high for p in ports)
    with socket.socket() as s:  # free when handed out: a node can bind it
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_is_handed_out_once_per_process():
    port = ephemeral_port()
    assert pick_port(range(port, port + 1)) == port
    with pytest.raises(OSError, match="no free TCP port"):
        pick_port(range(port, port + 1))  # still free, but given already


def test_a_port_in_use_is_skipped():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(OSError, match="no free TCP port"):
            pick_port(range(port, port + 1))
    assert pick_port(range(port, port + 1)) == port  # the claim was let go with the failed check


def test_a_port_another_live_launcher_claimed_is_skipped_until_it_exits():
    port = ephemeral_port()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom cluster.local import pick_port\n"
         f"print(pick_port(range({port}, {port + 1})), flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == str(port)  # the child holds the claim
        with pytest.raises(OSError, match="no free TCP port"):
            pick_port(range(port, port + 1))
    finally:
        child.stdin.close()  # the child exits: its claim goes with it
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
    assert child.returncode == 0
    assert pick_port(range(port, port + 1)) == port
