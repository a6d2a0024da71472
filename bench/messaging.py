#!/usr/bin/env python3
"""Messaging benchmark: our codec (encode → send → receive → decode) against raw pyzmq.

Run from the repository root::

    .venv/bin/python bench/messaging.py            # full run (~1-2 min), writes bench/results/messaging.json
    .venv/bin/python bench/messaging.py --quick    # under a minute
    .venv/bin/python bench/messaging.py --json /tmp/m.json --reps 7
    .venv/bin/python bench/messaging.py --curve-only   # CURVE against plaintext only (~40 s)

What it measures, for payloads of 64 B, 1 KiB, 64 KiB and 1 MiB:

* Throughput, PUSH → PULL over tcp://127.0.0.1, sender and receiver in separate processes.
  Raw: ``send(payload)`` / ``recv()`` below 64 KiB, ``send(payload, copy=False)`` /
  ``recv(copy=False)`` from 64 KiB (pyzmq's best plain use). Ours: ``codec.send(sock,
  FileChunk(...))`` / ``codec.recv(sock)``. Messages per second are counted at the receiver,
  from the first message to the last. Raw and ours trials alternate; the median of R trials
  of each is reported.
* Round-trip latency, DEALER → ROUTER → DEALER. Raw: a 16-byte request, the payload as the
  reply. Ours: FILE_REQUEST → FILE_RESPONSE carrying the payload. Median and p99 in µs.
* Zero-copy evidence for payloads ≥ 64 KiB: buffer addresses on the send and receive side,
  and decode cost against payload size.
* CURVE against plaintext (issue 20, ``bench/messaging_curve.py``): the throughput trials (raw
  and ours) and our round trip at 64 B, 1 KiB and 64 KiB, each in both security modes,
  alternating. ``--curve-only`` runs just this part.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# first, even when an editable install lists ROOT already: run as `python bench/X.py`, sys.path
# starts with bench/, where storage.py would shadow the storage package
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from bench import machine, messaging_curve  # noqa: E402
from bench.procs import Worker  # noqa: E402
from proto.codec import DEFAULT_LIMITS, Codec, new_node_id  # noqa: E402
from proto.messages import FileChunk, FileRequest, FileResponse  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
SIZES = (64, KiB, 64 * KiB, MiB)
LARGE = zmq.COPY_THRESHOLD  # from here on: copy=False (raw) / a raw frame (ours)
SOCKET_TIMEOUT_MS = 15_000  # a worker gives up on a silent socket after this (no hangs)
RESULT_TIMEOUT_S = 120.0  # the parent gives up on a worker after this

# First guesses of msgs/s for the discarded pilot trial, which then calibrates the counts.
GUESS_RATE = {64: 200_000, KiB: 150_000, 64 * KiB: 15_000, MiB: 1_500}


def label(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB} MiB"
    if size >= KiB:
        return f"{size // KiB} KiB"
    return f"{size} B"


def hwm_for(size: int) -> int:
    """The same HWM for raw and ours: pyzmq's default 1000, capped at ~256 MiB in flight."""
    return max(16, min(1000, 256 * MiB // size))


# ---- worker processes ---------------------------------------------------------------------


def task_tp_recv(ctx: zmq.Context, conn: Any, mode: str, size: int, count: int, hwm: int,
                 sec: str | None = None, keys: dict | None = None) -> dict:
    """``sec`` (None: as before; "plain" or "curve"): the security mode of the CURVE comparison;
    then "ours" also checks each message's sender as the node loop does (messaging_curve.peer_check)."""
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = hwm
    sock.rcvtimeo = SOCKET_TIMEOUT_MS
    sock.linger = 0
    try:
        messaging_curve.serve(ctx, sock, sec, keys)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        conn.send(("port", port))
        n = count - 1
        if mode == "raw":
            recv = sock.recv
            if size < LARGE:
                total = len(recv())
                t0 = time.perf_counter()
                for _ in range(n):
                    total += len(recv())
                t1 = time.perf_counter()
            else:
                total = len(recv(copy=False))
                t0 = time.perf_counter()
                for _ in range(n):
                    total += len(recv(copy=False))
                t1 = time.perf_counter()
        elif sec is None:
            crecv = Codec(new_node_id()).recv
            total = len(crecv(sock)[2].payload)
            t0 = time.perf_counter()
            for _ in range(n):
                total += len(crecv(sock)[2].payload)
            t1 = time.perf_counter()
        else:
            codec = Codec(new_node_id())
            crecv, peer = codec.recv, messaging_curve.peer_check(sec, keys)
            total = len(crecv(sock)[2].payload)
            peer(codec.last_frame)
            t0 = time.perf_counter()
            for _ in range(n):
                total += len(crecv(sock)[2].payload)
                peer(codec.last_frame)
            t1 = time.perf_counter()
        if total != count * size:
            raise AssertionError(f"received {total} payload bytes, expected {count * size}")
        return {"count": count, "seconds": t1 - t0, "msgs_per_s": n / (t1 - t0)}
    finally:
        sock.close(linger=0)


def task_tp_send(ctx: zmq.Context, conn: Any, mode: str, size: int, count: int, hwm: int, port: int,
                 sec: str | None = None, keys: dict | None = None) -> dict:
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = hwm
    sock.sndtimeo = SOCKET_TIMEOUT_MS
    sock.linger = SOCKET_TIMEOUT_MS
    payload = os.urandom(size)
    try:
        messaging_curve.connect(sock, f"tcp://127.0.0.1:{port}", sec, keys)
        t0 = time.perf_counter()
        if mode == "raw":
            send = sock.send
            if size < LARGE:
                for _ in range(count):
                    send(payload)
            else:
                for _ in range(count):
                    send(payload, copy=False)
        else:
            csend = Codec(new_node_id()).send
            for i in range(count):
                csend(sock, FileChunk(7, i * size, 0, payload))
        return {"seconds": time.perf_counter() - t0}
    finally:
        sock.close()  # the context's I/O thread keeps flushing (linger bounded above)


def task_lat_server(ctx: zmq.Context, conn: Any, mode: str, size: int, count: int,
                    sec: str | None = None, keys: dict | None = None) -> dict:
    sock = ctx.socket(zmq.ROUTER)
    sock.rcvtimeo = SOCKET_TIMEOUT_MS
    sock.sndtimeo = SOCKET_TIMEOUT_MS
    payload = os.urandom(size)
    try:
        messaging_curve.serve(ctx, sock, sec, keys)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        conn.send(("port", port))
        if mode == "raw":
            copy = size < LARGE
            recv, send = sock.recv, sock.send
            for _ in range(count):
                route = recv()
                recv()  # the 16-byte request
                send(route, zmq.SNDMORE)
                send(payload, copy=copy)
        else:
            codec = Codec(new_node_id())
            crecv, csend = codec.recv, codec.send
            peer = messaging_curve.peer_check(sec, keys) if sec is not None else None
            for _ in range(count):
                route, _, req = crecv(sock, router=True)
                if peer is not None:
                    peer(codec.last_frame)
                reply = FileResponse(req.request_id, req.file_id_upper, req.file_id_lower, req.offset, size, 0, payload)
                csend(sock, reply, route=route)
        return {"served": count}
    finally:
        # linger: the last reply may still be in libzmq's queue (a 1 MiB one takes a while);
        # close does not block, the context's I/O thread delivers it in the background.
        sock.close(linger=SOCKET_TIMEOUT_MS)


def task_lat_client(ctx: zmq.Context, conn: Any, mode: str, size: int, count: int, warmup: int, port: int,
                    sec: str | None = None, keys: dict | None = None) -> list[int]:
    sock = ctx.socket(zmq.DEALER)
    sock.rcvtimeo = SOCKET_TIMEOUT_MS
    sock.sndtimeo = SOCKET_TIMEOUT_MS
    sock.linger = 0
    now = time.perf_counter_ns
    samples: list[int] = []
    keep = samples.append
    try:
        messaging_curve.connect(sock, f"tcp://127.0.0.1:{port}", sec, keys)
        if mode == "raw":
            request = os.urandom(16)
            send, recv = sock.send, sock.recv
            copy = size < LARGE
            for i in range(warmup + count):
                t0 = now()
                send(request)
                n = len(recv(copy=copy))
                t1 = now()
                if n != size:
                    raise AssertionError(f"reply of {n} bytes, expected {size}")
                if i >= warmup:
                    keep(t1 - t0)
        else:
            codec = Codec(new_node_id())
            csend, crecv = codec.send, codec.recv
            for i in range(warmup + count):
                t0 = now()
                csend(sock, FileRequest(i, 0x1234, 0x5678, 0, size))
                n = len(crecv(sock)[2].payload)
                t1 = now()
                if n != size:
                    raise AssertionError(f"reply of {n} bytes, expected {size}")
                if i >= warmup:
                    keep(t1 - t0)
        return samples
    finally:
        sock.close(linger=0)


TASKS = {
    "tp_recv": task_tp_recv,
    "tp_send": task_tp_send,
    "lat_server": task_lat_server,
    "lat_client": task_lat_client,
    **messaging_curve.TASKS,
}


# ---- throughput ------------------------------------------------------------------------------


def tp_trial(rx: Worker, tx: Worker, mode: str, size: int, count: int, **security: Any) -> dict:
    """One throughput trial; ``security`` (sec=, keys=) goes to both ends (messaging_curve)."""
    hwm = hwm_for(size)
    rx.start("tp_recv", mode=mode, size=size, count=count, hwm=hwm, **security)
    port = rx.message("port")
    tx.start("tp_send", mode=mode, size=size, count=count, hwm=hwm, port=port, **security)
    sent = tx.result()
    got = rx.result()
    got["send_seconds"] = sent["seconds"]
    return got


def run_throughput(rx: Worker, tx: Worker, reps: int, target_s: float, log: Any) -> list[dict]:
    out = []
    for size in SIZES:
        counts = {}
        for mode in ("raw", "ours"):  # pilot trial (discarded): warms up, calibrates the count
            pilot = max(200, int(GUESS_RATE[size] * target_s * 0.4))
            rate = tp_trial(rx, tx, mode, size, pilot)["msgs_per_s"]
            counts[mode] = max(200, int(rate * target_s * 1.1))  # a cold pilot runs a little slow
        trials: dict[str, list[dict]] = {"raw": [], "ours": []}
        for _ in range(reps):
            for mode in ("raw", "ours"):
                trials[mode].append(tp_trial(rx, tx, mode, size, counts[mode]))
        row: dict[str, Any] = {"size": size, "label": label(size), "hwm": hwm_for(size)}
        for mode in ("raw", "ours"):
            rates = [t["msgs_per_s"] for t in trials[mode]]
            med = statistics.median(rates)
            row[mode] = {
                "msgs_per_s_median": med,
                "mb_per_s_median": med * size / 1e6,
                "msgs_per_s_trials": rates,
                "trial_seconds": [t["seconds"] for t in trials[mode]],
                "count": counts[mode],
            }
        row["ratio"] = row["ours"]["msgs_per_s_median"] / row["raw"]["msgs_per_s_median"]
        log(
            f"  throughput {label(size):>7}: raw {row['raw']['msgs_per_s_median']:>10,.0f}/s  "
            f"ours {row['ours']['msgs_per_s_median']:>10,.0f}/s  ratio {row['ratio']:.2f}"
        )
        out.append(row)
    return out


# ---- latency ---------------------------------------------------------------------------------


def run_latency(server: Worker, client: Worker, reps: int, totals: dict[int, int], log: Any) -> list[dict]:
    out = []
    for size in SIZES:
        per_block = max(50, totals[size] // reps)
        warmup = max(20, per_block // 10)
        samples: dict[str, list[int]] = {"raw": [], "ours": []}
        block_medians: dict[str, list[float]] = {"raw": [], "ours": []}
        for _ in range(reps):
            for mode in ("raw", "ours"):
                server.start("lat_server", mode=mode, size=size, count=warmup + per_block)
                port = server.message("port")
                client.start("lat_client", mode=mode, size=size, count=per_block, warmup=warmup, port=port)
                got = client.result()
                server.result()
                samples[mode].extend(got)
                block_medians[mode].append(statistics.median(got) / 1e3)
        row: dict[str, Any] = {"size": size, "label": label(size), "round_trips_per_mode": per_block * reps}
        for mode in ("raw", "ours"):
            us = np.asarray(samples[mode], dtype=np.float64) / 1e3
            row[mode] = {
                "median_us": float(np.median(us)),
                "p99_us": float(np.percentile(us, 99)),
                "mean_us": float(us.mean()),
                "min_us": float(us.min()),
                "block_medians_us": block_medians[mode],
            }
        row["ratio_median"] = row["ours"]["median_us"] / row["raw"]["median_us"]
        row["ratio_p99"] = row["ours"]["p99_us"] / row["raw"]["p99_us"]
        row["overhead_median_us"] = row["ours"]["median_us"] - row["raw"]["median_us"]
        log(
            f"  latency    {label(size):>7}: raw {row['raw']['median_us']:8.1f} µs  "
            f"ours {row['ours']['median_us']:8.1f} µs  ratio {row['ratio_median']:.2f}"
        )
        out.append(row)
    return out


# ---- zero-copy evidence ----------------------------------------------------------------------


def addr(buf: Any) -> int:
    """The address of a buffer's first byte, through the buffer protocol (no copy)."""
    return int(np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0])


def per_call_us(fn: Any, n: int, repeat: int = 7) -> float:
    """The time of one call in µs, best of ``repeat`` runs of ``n`` calls (the least disturbed
    by other processes and the hypervisor on a noisy machine)."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return min(runs)


ZERO_COPY_CHECKS = (
    "send_raw_frame_is_payload_numpy",
    "send_raw_frame_shares_memory_numpy",
    "send_raw_frame_is_payload_bytes",
    "send_raw_frame_address_bytes_equal",
    "inproc_received_payload_is_sender_memory",
    "inproc_payload_equal",
    "tcp_decoded_payload_points_into_frame",
    "tcp_copy_address_differs",
    "tcp_payload_equal",
    "recv_payload_points_into_owner_frame",
)


def run_zero_copy(quick: bool) -> dict:
    ctx = zmq.Context()
    codec = Codec(new_node_id())
    rng = np.random.default_rng(1)
    result: dict[str, Any] = {"sizes": {}, "timing": []}
    try:
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        pair_a, pair_b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        for s in (push, pull, pair_a, pair_b):
            s.linger = 0
            s.rcvtimeo = s.sndtimeo = SOCKET_TIMEOUT_MS
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        pair_a.bind("inproc://zero-copy")
        pair_b.connect("inproc://zero-copy")

        for size in (64 * KiB, MiB):
            arr = rng.integers(0, 256, size, dtype=np.uint8)
            blob = arr.tobytes()
            ev: dict[str, Any] = {}
            # (1) sender: the raw frame handed to pyzmq is the caller's object, not a copy.
            frames = codec.encode(FileChunk(1, 0, 0, arr))
            ev["encode_frames"] = len(frames)
            ev["encode_frame0_bytes"] = len(frames[0])
            ev["send_raw_frame_is_payload_numpy"] = frames[1] is arr
            ev["send_raw_frame_shares_memory_numpy"] = bool(np.shares_memory(np.asarray(frames[1]), arr))
            frames_b = codec.encode(FileChunk(1, 0, 0, blob))
            ev["send_raw_frame_is_payload_bytes"] = frames_b[1] is blob
            ev["send_raw_frame_address_bytes_equal"] = addr(frames_b[1]) == addr(blob)
            # (1b) end to end over inproc (libzmq passes the message, no socket buffer): the
            # receiver's decoded payload is the sender's numpy memory itself.
            codec.send(pair_a, FileChunk(1, 0, 0, arr))
            _, _, m = codec.recv(pair_b)
            ev["inproc_sender_array_address"] = hex(addr(arr))
            ev["inproc_received_payload_address"] = hex(addr(m.payload))
            ev["inproc_received_payload_is_sender_memory"] = addr(m.payload) == addr(arr)
            ev["inproc_payload_equal"] = bytes(m.payload) == blob
            del m
            # (2) receiver over tcp: codec.decode's payload is a view of the zmq.Frame's buffer.
            codec.send(push, FileChunk(1, 0, 0, arr))
            rframes = pull.recv_multipart(copy=False)
            _, m = codec.decode(rframes)
            frame_addr, payload_addr = addr(rframes[1]), addr(m.payload)
            ev["tcp_payload_type"] = type(m.payload).__name__
            ev["tcp_frame_buffer_address"] = hex(frame_addr)
            ev["tcp_decoded_payload_address"] = hex(payload_addr)
            ev["tcp_decoded_payload_points_into_frame"] = payload_addr == frame_addr
            ev["tcp_copy_address_differs"] = addr(bytes(m.payload)) != frame_addr  # control: a copy moves
            ev["tcp_payload_equal"] = bytes(m.payload) == blob
            del m
            # (2b) the same through codec.recv: the payload memoryview's owner is the zmq.Frame.
            codec.send(push, FileChunk(1, 0, 0, arr))
            _, _, m = codec.recv(pull)
            owner = m.payload.obj
            ev["recv_payload_owner_type"] = type(owner).__name__
            ev["recv_payload_points_into_owner_frame"] = isinstance(owner, zmq.Frame) and addr(m.payload) == addr(owner)
            ev["recv_payload_readonly"] = m.payload.readonly
            del m, owner
            result["sizes"][label(size)] = ev

        # (3) decode cost against payload size (frames already received: pure codec work).
        n = 3000 if quick else 20000
        for size in (64, KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB):
            payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            msg = FileChunk(1, 0, 0, payload)
            codec.send(push, msg)
            rframes = pull.recv_multipart(copy=False)
            decode_us = per_call_us(lambda: codec.decode(rframes), n)
            encode_us = per_call_us(lambda: codec.encode(msg), n)
            big = rframes[-1].buffer if size >= LARGE else payload
            copy_n = max(50, min(n, int(n * 64 * KiB / size))) if size >= LARGE else n
            copy_us = per_call_us(lambda: bytes(big), copy_n)
            # the whole codec path in one process over inproc (no socket copies)
            inproc_n = max(200, n // 10)

            def roundtrip() -> None:
                codec.send(pair_a, msg)
                codec.recv(pair_b)

            inproc_us = per_call_us(roundtrip, inproc_n, repeat=5)
            result["timing"].append(
                {
                    "size": size,
                    "label": label(size),
                    "payload_travels": "raw frame" if size >= LARGE else "inline",
                    "decode_us": decode_us,
                    "encode_us": encode_us,
                    "copy_payload_us": copy_us,
                    "inproc_send_recv_us": inproc_us,
                }
            )
        t = {r["size"]: r for r in result["timing"]}
        result["decode_1MiB_over_64KiB"] = t[MiB]["decode_us"] / t[64 * KiB]["decode_us"]
        result["decode_4MiB_over_64KiB"] = t[4 * MiB]["decode_us"] / t[64 * KiB]["decode_us"]
        result["copy_1MiB_over_64KiB"] = t[MiB]["copy_payload_us"] / t[64 * KiB]["copy_payload_us"]
        checks = [ev[k] for ev in result["sizes"].values() for k in ZERO_COPY_CHECKS]
        result["all_address_checks_pass"] = all(checks)
        result["decode_flat"] = result["decode_1MiB_over_64KiB"] < 2.0
        for s in (push, pull, pair_a, pair_b):
            s.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    return result


# ---- report ----------------------------------------------------------------------------------


def machine_info() -> dict:
    return machine.machine_info(pyzmq=zmq.__version__, libzmq=zmq.zmq_version(),
                                msgspec=msgspec.__version__)


def print_report(res: dict) -> None:
    from rich.console import Console

    con = Console()
    m = res["machine"]
    con.print(
        f"[bold]Messaging benchmark[/] {m['date']}  {m['nproc']} cpus ({m['cpu']}), Python {m['python']}, "
        f"pyzmq {m['pyzmq']}, libzmq {m['libzmq']}, reps {res['config']['reps']}"
        f"{' (quick)' if res['config']['quick'] else ''}"
    )
    if "throughput" in res:
        print_main_tables(con, res)
    if "curve" in res:
        messaging_curve.print_curve(con, res["curve"])
    shares = m.get("cpu_shares_during_run")
    if shares:
        con.print(
            f"CPU during the run: busy {shares['busy']:.0%}, idle {shares['idle']:.0%}, "
            f"steal {shares['steal']:.0%} (time the hypervisor gave to other guests)"
        )
    con.print(f"total {res['elapsed_s']:.1f} s; results in {res['json_path']}")


def print_main_tables(con: Any, res: dict) -> None:
    from rich.table import Table

    t = Table(title="Throughput PUSH→PULL, tcp://127.0.0.1, separate processes (median of trials)")
    for c in ("payload", "raw msg/s", "ours msg/s", "ours/raw", "raw MB/s", "ours MB/s", "HWM"):
        t.add_column(c, justify="right")
    for r in res["throughput"]:
        t.add_row(
            r["label"],
            f"{r['raw']['msgs_per_s_median']:,.0f}",
            f"{r['ours']['msgs_per_s_median']:,.0f}",
            f"{r['ratio']:.0%}",
            f"{r['raw']['mb_per_s_median']:,.1f}",
            f"{r['ours']['mb_per_s_median']:,.1f}",
            str(r["hwm"]),
        )
    con.print(t)
    t = Table(title="Round trip DEALER→ROUTER→DEALER, tcp://127.0.0.1 (µs)")
    for c in ("payload", "raw median", "ours median", "ratio", "Δ median", "raw p99", "ours p99", "ratio p99"):
        t.add_column(c, justify="right")
    for r in res["latency"]:
        t.add_row(
            r["label"],
            f"{r['raw']['median_us']:.1f}",
            f"{r['ours']['median_us']:.1f}",
            f"{r['ratio_median']:.2f}",
            f"{r['overhead_median_us']:+.1f}",
            f"{r['raw']['p99_us']:.1f}",
            f"{r['ours']['p99_us']:.1f}",
            f"{r['ratio_p99']:.2f}",
        )
    con.print(t)
    zc = res["zero_copy"]
    t = Table(title="Zero-copy evidence (payloads ≥ 64 KiB travel as raw frames)")
    t.add_column("check")
    for k in zc["sizes"]:
        t.add_column(k, justify="right")
    rows = [
        ("send: raw frame `is` the numpy payload", "send_raw_frame_is_payload_numpy"),
        ("send: raw frame shares memory with it", "send_raw_frame_shares_memory_numpy"),
        ("send: raw frame `is` the bytes payload", "send_raw_frame_is_payload_bytes"),
        ("inproc: received payload address = sender array", "inproc_received_payload_is_sender_memory"),
        ("tcp: decoded payload address = zmq.Frame buffer", "tcp_decoded_payload_points_into_frame"),
        ("tcp: control, bytes(payload) lives elsewhere", "tcp_copy_address_differs"),
        ("recv: payload memoryview owned by zmq.Frame", "recv_payload_points_into_owner_frame"),
        ("payload bytes intact", "tcp_payload_equal"),
    ]
    for text, key in rows:
        t.add_row(text, *[str(ev[key]) for ev in zc["sizes"].values()])
    con.print(t)
    t = Table(title="Codec cost against payload size (µs per call, best of 7; frames already received)")
    for c in ("payload", "travels", "decode", "encode", "copy (bytes())", "inproc send+recv"):
        t.add_column(c, justify="right")
    for r in zc["timing"]:
        t.add_row(
            r["label"],
            r["payload_travels"],
            f"{r['decode_us']:.2f}",
            f"{r['encode_us']:.2f}",
            f"{r['copy_payload_us']:.2f}",
            f"{r['inproc_send_recv_us']:.2f}",
        )
    con.print(t)
    con.print(
        f"decode 1 MiB / 64 KiB = {zc['decode_1MiB_over_64KiB']:.2f}×, 4 MiB / 64 KiB = "
        f"{zc['decode_4MiB_over_64KiB']:.2f}× (a copy: {zc['copy_1MiB_over_64KiB']:.1f}× for 1 MiB / 64 KiB); "
        f"address checks {'all pass' if zc['all_address_checks_pass'] else 'FAIL'}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter trials (whole run < 60 s)")
    ap.add_argument("--json", default=None, help="where to write the results (default "
                    "bench/results/messaging.json, with --curve-only bench/results/messaging_curve.json)")
    ap.add_argument("--reps", type=int, default=None, help="trials per mode and size (default 5, --quick 2)")
    ap.add_argument("--curve-only", action="store_true", help="only CURVE against plaintext (issue 20)")
    args = ap.parse_args(argv)
    json_path = args.json or str(ROOT / "bench" / "results" / ("messaging_curve.json" if args.curve_only else "messaging.json"))
    reps = args.reps or (2 if args.quick else 5)
    target_s = 0.25 if args.quick else 0.85
    lat_totals = (
        {64: 3000, KiB: 3000, 64 * KiB: 1500, MiB: 300}
        if args.quick
        else {64: 20000, KiB: 20000, 64 * KiB: 8000, MiB: 1500}
    )
    # CURVE against plaintext: shorter trials, so that the full run stays under ~3 minutes
    curve_target_s = 0.2 if args.quick else 0.5
    curve_totals = {64: 2000, KiB: 2000, 64 * KiB: 1000} if args.quick else {64: 10000, KiB: 10000, 64 * KiB: 4000}

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.perf_counter()
    res: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "quick": args.quick,
            "reps": reps,
            "throughput_target_trial_s": target_s,
            "latency_round_trips_per_mode": lat_totals,
            "sizes": list(SIZES),
            "raw_copy_false_from_bytes": LARGE,
            "codec_inline_payload_below_bytes": DEFAULT_LIMITS.inline_payload_bytes,
            "transport": "tcp://127.0.0.1 (random free ports)",
            "processes": "multiprocessing spawn; persistent sender/receiver (client/server) processes, fresh sockets per trial",
            "curve_only": args.curve_only,
        },
    }
    cpu_before = machine.cpu_times()
    mpctx = mp.get_context("spawn")
    a = Worker(mpctx, "bench-a", "bench.messaging", RESULT_TIMEOUT_S)
    b = Worker(mpctx, "bench-b", "bench.messaging", RESULT_TIMEOUT_S)
    try:
        if not args.curve_only:
            log("throughput (raw and ours alternate) …")
            res["throughput"] = run_throughput(a, b, reps, target_s, log)
            log("round-trip latency …")
            res["latency"] = run_latency(a, b, reps, lat_totals, log)
        log("CURVE against plaintext (the two alternate) …")
        res["curve"] = messaging_curve.run_curve(a, b, reps, curve_target_s, curve_totals, log, tp_trial, label)
        res["curve"]["zap"] = messaging_curve.stop_zap([a, b])
    finally:
        b.stop()
        a.stop()
    ok = res["curve"]["zap_check"]["stranger_refused"] and res["curve"]["zap_check"]["client_admitted"]
    if not args.curve_only:
        log("zero-copy evidence …")
        res["zero_copy"] = run_zero_copy(args.quick)
        ok = ok and res["zero_copy"]["all_address_checks_pass"]
    machine.finish(res, cpu_before, started, json_path)
    print_report(res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
