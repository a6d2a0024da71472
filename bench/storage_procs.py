"""The processes of the storage benchmark (``bench/storage.py``): a worker that runs tasks sent
by the parent over a pipe, and the tasks: the client side of ours (``StorageLink``) and of raw
pyzmq, the raw server, and a dd-style sequential read.

Every task takes the worker's zmq context and the pipe first and returns a dict of figures; a
``profile`` argument (a path) runs it under cProfile and dumps the stats there. CPU figures are
``time.process_time()`` deltas: the whole process, libzmq's I/O thread included.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from typing import Any

import zmq

from bench.procs import Worker

MiB = 1 << 20
TIMEOUT_S = 120.0  # a silent peer for this long fails the trial (no hangs)


def worker(mpctx: Any, name: str) -> Worker:
    """A benchmark process running this module's TASKS."""
    return Worker(mpctx, name, "bench.storage_procs", result_timeout=3 * TIMEOUT_S)


# ---- raw pyzmq: the same bytes, the same chunks and window, none of our protocol ---------------
#
# Upload:   client [b"open", size] → server [b"ready", credit]; client [b"chunk", offset+last,
#           payload] within the credit; the server pwrites each and grants more in half-window
#           steps ([b"credit", n]); after the last it fsyncs and answers [b"done"].
# Download: client [b"read", offset+length], ``window`` in flight; server [b"data", offset,
#           payload] (pread, sent with copy=False); the client pwrites each where it belongs.

_QQ = struct.Struct("<QQ")
_QB = struct.Struct("<QB")
_Q = struct.Struct("<Q")


def _raw_socket(ctx: zmq.Context, kind: int, curve: dict | None = None) -> zmq.Socket:
    """A raw socket; ``curve`` (Z85 keys: ``server_public``, ``server_secret``, ``client_public``,
    ``client_secret``) makes it CURVE-encrypted like ours (no ZAP: the handshake is not timed)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.rcvtimeo = sock.sndtimeo = int(TIMEOUT_S * 1000)
    sock.sndhwm = sock.rcvhwm = 1000  # as StorageLink's DEALER
    if curve and kind == zmq.ROUTER:
        sock.curve_secretkey, sock.curve_publickey = curve["server_secret"], curve["server_public"]
        sock.curve_server = True
    elif curve:
        sock.curve_serverkey = curve["server_public"]
        sock.curve_secretkey, sock.curve_publickey = curve["client_secret"], curve["client_public"]
    return sock


def task_raw_server(ctx: zmq.Context, conn: Any, mode: str, path: str, window: int, curve: dict | None = None) -> dict:
    sock = _raw_socket(ctx, zmq.ROUTER, curve)
    try:
        conn.send(("port", sock.bind_to_random_port("tcp://127.0.0.1")))
        if mode == "upload":
            return _raw_serve_upload(sock, path, window)
        return _raw_serve_download(sock, path)
    finally:
        sock.close(linger=int(TIMEOUT_S * 1000))


def _raw_serve_upload(sock: zmq.Socket, path: str, window: int) -> dict:
    route, _, size = sock.recv_multipart()
    size = _Q.unpack(size)[0]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        granted, written = min(window, size), 0
        sock.send_multipart([route, b"ready", _Q.pack(granted)])
        recv = sock.recv
        while True:
            recv()  # route
            recv()  # b"chunk"
            offset, last = _QB.unpack(recv())
            payload = recv(copy=False)
            view = payload.buffer
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            written = offset
            if last:
                break
            if granted - written <= window // 2 and granted < size:
                more = min(size, written + window) - granted
                granted += more
                sock.send_multipart([route, b"credit", _Q.pack(more)])
        os.fsync(fd)
    finally:
        os.close(fd)
    sock.send_multipart([route, b"done"])
    return {"bytes": written}


def _raw_serve_download(sock: zmq.Socket, path: str) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    size, sent = os.fstat(fd).st_size, 0
    try:
        while sent < size:
            route, _, request = sock.recv_multipart()
            offset, n = _QQ.unpack(request)
            data = os.pread(fd, n, offset)
            sock.send(route, zmq.SNDMORE)
            sock.send(b"data", zmq.SNDMORE)
            sock.send(_Q.pack(offset), zmq.SNDMORE)
            sock.send(data, copy=False)
            sent += len(data)
    finally:
        os.close(fd)
    return {"bytes": sent}


def _raw_result(t0: float, c0: float) -> dict:
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "transfer_s": seconds, "client_cpu_s": cpu, "client_transfer_cpu_s": cpu}


def task_raw_upload(ctx: zmq.Context, conn: Any, port: int, src: str, chunk: int, curve: dict | None = None) -> dict:
    sock = _raw_socket(ctx, zmq.DEALER, curve)
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        t0, c0 = time.perf_counter(), time.process_time()
        sock.send_multipart([b"open", _Q.pack(size)])
        kind, credit = sock.recv_multipart()
        limit, offset = _Q.unpack(credit)[0], 0
        while offset < size:
            n = min(chunk, size - offset, limit - offset)
            if n <= 0:  # out of credit: wait for more
                limit += _Q.unpack(sock.recv_multipart()[1])[0]
                continue
            sock.send(b"chunk", zmq.SNDMORE)
            sock.send(_QB.pack(offset, int(offset + n == size)), zmq.SNDMORE)
            sock.send(os.pread(fd, n, offset), copy=False)
            offset += n
            while sock.poll(0, zmq.POLLIN):  # take credit as it comes: keeps the pipe full
                kind, more = sock.recv_multipart()
                if kind == b"credit":
                    limit += _Q.unpack(more)[0]
        while kind != b"done":
            kind = sock.recv_multipart()[0]
        return _raw_result(t0, c0)
    finally:
        os.close(fd)
        sock.close()


def task_raw_download(ctx: zmq.Context, conn: Any, port: int, dest: str, size: int, chunk: int, window: int,
                      curve: dict | None = None) -> dict:
    sock = _raw_socket(ctx, zmq.DEALER, curve)
    fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)  # preallocated: see prefill()
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        t0, c0 = time.perf_counter(), time.process_time()
        offset = got = inflight = 0
        recv = sock.recv
        while got < size:
            while offset < size and inflight < window:
                n = min(chunk, size - offset)
                sock.send_multipart([b"read", _QQ.pack(offset, n)])
                offset, inflight = offset + n, inflight + 1
            recv()  # b"data"
            at = _Q.unpack(recv())[0]
            view = recv(copy=False).buffer
            got, inflight = got + len(view), inflight - 1
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
        return _raw_result(t0, c0)
    finally:
        os.close(fd)
        sock.close()


# ---- ours: StorageLink against a storage node ------------------------------------------------


def _learn(config: str) -> None:
    """Learn the keys (or the plaintext) of the cluster at ``config`` for this process's links,
    as ``cluster upload --config`` does: StorageLink then authenticates to its nodes by itself."""
    if config:
        from pathlib import Path

        from cluster.local import learn_keys

        learn_keys(Path(config))


def task_ours_upload(ctx: zmq.Context, conn: Any, nodes: dict[str, str], src: str, copies: int, config: str = "",
                     kill_after: int = 0, **tuning: Any) -> dict:
    """What ``cluster.files.upload_file`` does short of registering: the content id, then an
    upload to the node ranked first for it (``tuning``: StorageLink.upload's ``chunk``)."""
    from proto.fileids import file_id_of_path
    from proto.fileids import rank
    from cluster.node.storagelink import StorageLink

    _learn(config)

    t0, c0 = time.perf_counter(), time.process_time()
    fid = file_id_of_path(src)
    t1, c1 = time.perf_counter(), time.process_time()
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    node = rank(fid, list(nodes))[0]
    try:
        with StorageLink(nodes[node], name=node, timeout=TIMEOUT_S, ctx=ctx) as link:
            replicas = link.upload(fid, size, lambda offset, n: os.pread(fd, n, offset), copies=copies, origin="bench",
                                   **tuning)
        t2, c2 = time.perf_counter(), time.process_time()
    finally:
        os.close(fd)
    if kill_after:
        os.kill(kill_after, signal.SIGTERM)
    return {"seconds": t2 - t0, "hash_s": t1 - t0, "transfer_s": t2 - t1, "fid": fid.hex(), "replicas": replicas,
            "client_cpu_s": c2 - c0, "client_transfer_cpu_s": c2 - c1}


def task_ours_download(ctx: zmq.Context, conn: Any, address: str, fid: str, dest: str, config: str = "",
                       kill_after: int = 0, **tuning: Any) -> dict:
    """StorageLink.download into a prefilled file (``tuning``: its ``chunk`` and ``window``),
    then the client's rehash of what it wrote."""
    from proto.fileids import file_id_of_path
    from cluster.node.storagelink import StorageLink

    _learn(config)

    fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)  # preallocated: see prefill()

    def write_at(offset: int, data: Any) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    try:
        t0, c0 = time.perf_counter(), time.process_time()
        with StorageLink(address, name="bench", timeout=TIMEOUT_S, ctx=ctx) as link:
            link.download(bytes.fromhex(fid), write_at, **tuning)
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        os.close(fd)
    if kill_after:
        os.kill(kill_after, signal.SIGTERM)
    t2 = time.perf_counter()
    ok = file_id_of_path(dest).hex() == fid  # what `cluster download` checks before the rename
    return {"seconds": t1 - t0, "transfer_s": t1 - t0, "verify_s": time.perf_counter() - t2, "verified": ok,
            "client_cpu_s": c1 - c0, "client_transfer_cpu_s": c1 - c0}


def task_seq_read(ctx: zmq.Context, conn: Any, path: str, bs: int) -> dict:
    """Read a file start to end with ``bs``-byte readv calls into one buffer (dd-style)."""
    buf = bytearray(bs)
    bufs = [buf]
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        total = 0
        t0 = time.perf_counter()
        while True:
            n = os.readv(fd, bufs)
            if n == 0:
                break
            total += n
        return {"seconds": time.perf_counter() - t0, "bytes": total}
    finally:
        os.close(fd)


TASKS = {
    "raw_server": task_raw_server,
    "raw_upload": task_raw_upload,
    "raw_download": task_raw_download,
    "ours_upload": task_ours_upload,
    "ours_download": task_ours_download,
    "seq_read": task_seq_read,
}
