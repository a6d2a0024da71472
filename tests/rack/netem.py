"""Delay on the rack's links, in user space: what ``tc qdisc ... netem delay`` would do.

Theory of operation
-------------------
This kernel has no netem and cannot load modules, so each host of the rack (tests/rack/rack.py)
runs one of these proxies inside its namespace, from the moment its link is made. An nftables
rule there (``nat_rules``: prerouting, ``iif eth0``) redirects every TCP connection that comes in
over the link to the proxy's port; the proxy reads where it was going (``SO_ORIGINAL_DST``),
connects to that port on its own host (its own connection is locally generated, so prerouting
never sees it: no loop) and pumps both directions. Every TCP connection of the rack has exactly
one server side, so it passes exactly one proxy: each direction of every link is delayed once,
whoever connects, the client in the root namespace included. Traffic inside a host (``lo``) is
never touched.

Each chunk read is delivered at max(the previous chunk's delivery, its arrival + delay + a
uniform jitter in [-jitter, +jitter]): order is kept, as netem keeps it when its jitter is not
allowed to reorder. Delay and jitter change at run time over a control socket (a Unix socket
file on the host's tree: file sockets cross network namespaces), so connections open when the
delay is set are delayed from then on, as with netem on a live link; 0 is pass-through. The
control socket answers one JSON line with one JSON line: the settings after the change and
counts of the connections proxied.

What it does not do: the handshake (SYN, SYN-ACK) is not delayed, only the bytes (a connect
returns at once; the peer's first bytes, a ZeroMQ greeting or a Raft message, pay the delay).
A connection to a port nobody listens on is accepted and then reset, instead of refused. Loss is
not here: the rack drops packets with nftables (``numgen random``) and TCP retransmits them.

The proxy is started and stopped by the rack, by pid (``start``, ``control``); it uses only the
standard library and runs as a script: ``ip netns exec NS python netem.py --port P --control S``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path

PORT = 4799  # the proxy's port on every host: none of the nodes' ports (deploy/cluster.example.toml)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a redirected connection was going
CHUNK = 65_536
QUEUE = 64  # chunks in flight per direction (4 MiB): past that the proxy stops reading, as TCP would


def nat_rules(port: int = PORT) -> str:
    """The nftables script that sends every TCP connection coming in over eth0 to the proxy."""
    return ("table ip netem {\n chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
            f"  iif \"eth0\" tcp dport != {port} redirect to :{port}\n }}\n}}\n")


class Settings:
    """The delay and jitter of the host's links now, and the counts the control socket reports."""

    def __init__(self, seed: int) -> None:
        self.delay = 0.0  # seconds, each way
        self.jitter = 0.0
        self.rng = random.Random(seed)
        self.connections = 0  # accepted since the start
        self.open = 0
        self.refused = 0  # accepted, but nothing listened where they were going
        self.ports: dict[int, int] = {}  # connections by the port they were going to

    def due(self, now: float, previous: float) -> float:
        """When a chunk that arrived at ``now`` is delivered: never before the one before it."""
        if self.delay == 0 and self.jitter == 0:
            return max(now, previous)
        return max(previous, now + max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter)))

    def report(self) -> dict:
        return {"delay_ms": self.delay * 1000, "jitter_ms": self.jitter * 1000, "connections": self.connections,
                "open": self.open, "refused": self.refused, "ports": self.ports}


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: Settings) -> None:
    """Copy ``reader`` to ``writer``, each chunk held until it is due; EOF is passed on (half-close)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(QUEUE)
    held = 0  # chunks queued or being delivered

    async def deliver() -> None:
        nonlocal held
        while True:
            at, chunk = await queue.get()
            if (wait := at - loop.time()) > 0:
                await asyncio.sleep(wait)
            if chunk is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
            held -= 1

    async def feed() -> None:
        nonlocal held
        last = 0.0
        while chunk := await reader.read(CHUNK):
            now = loop.time()
            last = settings.due(now, last)
            if last <= now and not held:  # due now, nothing ahead of it: no hop through the queue
                writer.write(chunk)
                await writer.drain()
                continue
            held += 1
            await queue.put((last, chunk))
        held += 1
        await queue.put((settings.due(loop.time(), last), None))

    both = [asyncio.ensure_future(feed()), asyncio.ensure_future(deliver())]
    try:
        await asyncio.gather(*both)  # the first failure of either ends both
    finally:
        for task in both:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (linger 0), as a host with nothing listening, or a dead peer, would."""
    sock = writer.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: Settings,
                           port: int) -> None:
    settings.connections += 1
    settings.open += 1
    try:
        raw = writer.get_extra_info("socket").getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        dport, daddr = struct.unpack_from("!2xH4s", raw)
        if dport == port:  # came to the proxy's own port: nowhere to send it
            _reset(writer)
            return
        settings.ports[dport] = settings.ports.get(dport, 0) + 1
        try:
            up_reader, up_writer = await asyncio.open_connection(socket.inet_ntoa(daddr), dport)
        except OSError:
            settings.refused += 1
            _reset(writer)
            return
        both = [asyncio.ensure_future(pump(reader, up_writer, settings)),
                asyncio.ensure_future(pump(up_reader, writer, settings))]
        try:
            await asyncio.gather(*both)
        except (OSError, asyncio.IncompleteReadError):
            _reset(writer)  # one side reset or failed: the other sees a reset too
            _reset(up_writer)
        finally:
            for task in both:
                task.cancel()
            up_writer.close()
    finally:
        settings.open -= 1
        writer.close()


async def serve_control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: Settings) -> None:
    try:
        request = json.loads(await reader.readline() or b"{}")
        if "delay_ms" in request:
            settings.delay = max(0.0, float(request["delay_ms"])) / 1000
        if "jitter_ms" in request:
            settings.jitter = max(0.0, float(request["jitter_ms"])) / 1000
        reply = {"ok": True, **settings.report()}
    except (ValueError, TypeError) as exc:
        reply = {"ok": False, "error": str(exc)}
    writer.write(json.dumps(reply).encode() + b"\n")
    await writer.drain()
    writer.close()


async def main(port: int, control: Path, seed: int) -> None:
    settings = Settings(seed)
    try:
        # The network is no process competing with the nodes (netem runs in the kernel): on a
        # busy machine a starved proxy would add its own delay to every hop, and to every status
        # query the rack's health checks make with a 1 s deadline.
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass
    control.unlink(missing_ok=True)
    await asyncio.start_server(lambda r, w: serve_connection(r, w, settings, port), "0.0.0.0", port, backlog=512)
    ctl = await asyncio.start_unix_server(lambda r, w: serve_control(r, w, settings), str(control))
    async with ctl:
        await ctl.serve_forever()


# ---- the rack's side ----------------------------------------------------------------------------


def start(netns: str, control: Path, log: Path, seed: int, port: int = PORT) -> subprocess.Popen:
    """Start a proxy in namespace ``netns`` (``ip netns exec`` execs it: the pid is the proxy's)."""
    control.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, __file__, "--port", str(port),
                                 "--control", str(control), "--seed", str(seed)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)


def control(path: Path, timeout: float = 5.0, **settings: float) -> dict:
    """Ask the proxy at control socket ``path`` to take ``settings`` (delay_ms, jitter_ms; none: only
    report); returns its reply. OSError if it does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(settings).encode() + b"\n")
        reply = s.makefile("rb").readline()
    if not reply:
        raise ConnectionError(f"{path}: no reply")
    out = json.loads(reply)
    if not out.get("ok"):
        raise ValueError(f"{path}: {out.get('error')}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.control, args.seed))
