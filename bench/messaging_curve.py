"""CURVE against plaintext (issue 20), for ``bench/messaging.py``.

Every ZeroMQ socket of the cluster is a CURVE socket unless ``[security] insecure = true``. This
part of the messaging benchmark runs the script's own trials (the same worker tasks, the same
loops) in both modes, side by side, and reports the medians and their ratio:

* throughput PUSH → PULL, raw pyzmq and ours (``Codec``), at 64 B, 1 KiB and 64 KiB;
* our round trip DEALER → ROUTER → DEALER (``FileRequest`` → ``FileResponse``) at those sizes.

CURVE is set up with the cluster's own ``cluster.node.keys``: an ``AllowList`` admitting the
bench's client key, ``Credentials`` for the server and the client, ``Credentials.serve`` on the
binding socket (CURVE server, its keypair, ``keys.ZAP_DOMAIN``) and ``Credentials.connect`` on the
connecting one (a client that pins the server's public key); plaintext is
``Credentials.plaintext``. The server's process runs pyzmq's ``ThreadAuthenticator`` with
``configure_curve_callback(keys.ZAP_DOMAIN, keys.Gatekeeper(...))``, the node loop's ZAP handler,
so every handshake is a real one answered by ZAP (a key not in the list is refused: checked once
per run). Per received message, our path then does what the node loop's ``_peer`` does: with
CURVE, ``credentials.allow.admit(frame.get("User-Id").encode())`` (the client's Z85 key, looked up
in the live allow-list); in plaintext, ``Credentials.peer`` of an insecure cluster (everyone is
"anyone"). Raw pyzmq does neither.

The handshake is outside every timing: a throughput trial counts from the first message
received, a round-trip block starts after its warm-up; ``cluster.node.keys`` is imported when
this module is, before any trial.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import numpy as np
import zmq

from cluster.node import keys as cluster_keys

KiB = 1024
SIZES = (64, KiB, 64 * KiB)
SECS = ("plain", "curve")
ZAP_DOMAIN = cluster_keys.ZAP_DOMAIN  # what Credentials.serve sets on a CURVE server socket
GUESS_RATE = {("raw", 64): 200_000, ("raw", KiB): 150_000, ("raw", 64 * KiB): 8_000,
              ("ours", 64): 100_000, ("ours", KiB): 100_000, ("ours", 64 * KiB): 8_000}

# ---- in the worker processes ----------------------------------------------------------------

_zap: dict[str, Any] = {}  # this process's server credentials, authenticator and gatekeeper (one per context)
_zap_log = logging.getLogger("bench.messaging_curve.zap")
_zap_log.addHandler(logging.NullHandler())  # the stranger's refusal is expected: counted, not printed
_zap_log.propagate = False


class Gatekeeper(cluster_keys.Gatekeeper):
    """``keys.Gatekeeper`` (it counts refusals as ``counters["auth_refused"]``) that also counts
    the handshakes it admits (``counters["auth_admitted"]``), for the report."""

    def callback(self, domain: str, key: bytes) -> bool:
        admitted = super().callback(domain, key)
        if admitted:
            self.counters["auth_admitted"] = self.counters.get("auth_admitted", 0) + 1
        return admitted


def make_keys() -> dict[str, tuple[bytes, bytes]]:
    """Fresh (public, secret) Z85 keypairs: the server, an admitted client, a stranger."""
    return {name: zmq.curve_keypair() for name in ("server", "client", "stranger")}


def allow_list(keys: dict) -> cluster_keys.AllowList:
    """The allow-list: the bench's client only (not the stranger; the server is never a client)."""
    return cluster_keys.AllowList([cluster_keys.KeyEntry("bench-client", "client", keys["client"][0].decode())])


def server_credentials(keys: dict) -> cluster_keys.Credentials:
    """This process's server credentials (made once: the gatekeeper and the per-message check
    share their live allow-list, as in a node)."""
    creds = _zap.get("server")
    if creds is None or creds.public != keys["server"][0]:
        creds = _zap["server"] = cluster_keys.Credentials(
            name="bench-server", public=keys["server"][0], secret=keys["server"][1], allow=allow_list(keys))
    return creds


def client_credentials(keys: dict, address: str, who: str = "client") -> cluster_keys.Credentials:
    """``who``'s credentials, pinning the server's public key for ``address``."""
    return cluster_keys.Credentials(name=f"bench-{who}", public=keys[who][0], secret=keys[who][1],
                                    allow=allow_list(keys), servers={address: keys["server"][0]})


def _gate(ctx: zmq.Context, keys: dict) -> Gatekeeper:
    """Start this process's ZAP handler on first use (before the first CURVE bind)."""
    if "auth" not in _zap:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        gate = Gatekeeper(server_credentials(keys), {}, _zap_log)
        auth.configure_curve_callback(cluster_keys.ZAP_DOMAIN, gate)
        _zap.update(auth=auth, gate=gate)
    return _zap["gate"]


def serve(ctx: zmq.Context, sock: zmq.Socket, sec: str | None, keys: dict | None) -> None:
    """Make ``sock`` (about to bind) a CURVE server whose clients ZAP must admit
    (``Credentials.serve``); nothing for plaintext."""
    if sec != "curve":
        cluster_keys.Credentials.plaintext().serve(sock)
        return
    _gate(ctx, keys)
    server_credentials(keys).serve(sock)


def connect(sock: zmq.Socket, address: str, sec: str | None, keys: dict | None, who: str = "client") -> None:
    """Connect ``sock`` (``Credentials.connect``): as a CURVE client pinning the server's key, or
    in plaintext."""
    if sec == "curve":
        client_credentials(keys, address, who).connect(sock, address)
    else:
        cluster_keys.Credentials.plaintext([address]).connect(sock, address)


def peer_check(sec: str, keys: dict | None) -> Callable[[zmq.Frame], Any]:
    """What the node loop does for every message it receives on a socket it bound
    (``loop._peer``): with CURVE, the sender's key from the frame's ZAP User-Id, looked up in the
    live allow-list; in plaintext, ``Credentials.peer`` of an insecure cluster (everyone admitted)."""
    if sec != "curve":
        plain_creds = cluster_keys.Credentials.plaintext()

        def plain(frame: zmq.Frame) -> Any:
            return plain_creds.peer(None)
        return plain
    credentials = server_credentials(keys)

    def curve(frame: zmq.Frame) -> Any:
        try:
            user_id = frame.get("User-Id") if frame is not None else None
        except zmq.ZMQError:
            user_id = None
        entry = credentials.allow.admit(user_id.encode()) if user_id else None
        if entry is None:
            raise AssertionError(f"a message from a key not admitted: {user_id!r}")
        return entry.peer
    return curve


def task_zap_check(ctx: zmq.Context, conn: Any, keys: dict) -> dict:
    """The handshake is the real one: a client whose key is not in the allow-list gets nothing
    through; the admitted client's message arrives with its key as User-Id."""
    gate = _gate(ctx, keys)
    refused_before = gate.counters.get("auth_refused", 0)
    server = ctx.socket(zmq.ROUTER)
    socks = [server]
    try:
        serve(ctx, server, "curve", keys)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        for who in ("stranger", "client"):
            s = ctx.socket(zmq.DEALER)
            socks.append(s)
            s.linger = 0
            connect(s, f"tcp://127.0.0.1:{port}", "curve", keys, who)
            s.send(who.encode())
        got: dict[str, str] = {}
        frames: dict[str, zmq.Frame] = {}
        deadline = time.monotonic() + 1.0  # the stranger's retries keep being refused meanwhile
        while time.monotonic() < deadline:
            if server.poll(50):
                _, frame = server.recv_multipart(copy=False)
                got[frame.bytes.decode()] = frame.get("User-Id")
                frames[frame.bytes.decode()] = frame
        refusals = gate.counters.get("auth_refused", 0) - refused_before
        out = {
            "stranger_refused": "stranger" not in got and refusals > 0,
            "zap_refusals": refusals,
            "client_admitted": got.get("client") == keys["client"][0].decode(),
            "user_id_is_client_key": got.get("client"),
        }
        if "client" in frames:  # the per-message check alone, on a received frame (µs, best of 5)
            for sec in SECS:
                check, frame = peer_check(sec, keys), frames["client"]
                runs = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(20_000):
                        check(frame)
                    runs.append((time.perf_counter() - t0) / 20_000 * 1e6)
                out[f"peer_check_{sec}_us"] = min(runs)
        return out
    finally:
        for s in socks:
            s.close(linger=0)


def task_zap_stop(ctx: zmq.Context, conn: Any) -> dict:
    """Stop this process's authenticator (before the context goes); its counts."""
    auth, gate = _zap.pop("auth", None), _zap.pop("gate", None)
    if auth is None:
        return {"handshakes_admitted": 0, "handshakes_refused": 0}
    auth.stop()
    return {"handshakes_admitted": gate.counters.get("auth_admitted", 0),
            "handshakes_refused": gate.counters.get("auth_refused", 0)}


TASKS = {"zap_check": task_zap_check, "zap_stop": task_zap_stop}

# ---- in the parent ----------------------------------------------------------------------------


def _orders(reps: int) -> list[tuple[str, ...]]:
    """plain, curve / curve, plain / …: each mode goes first in half the reps."""
    return [SECS if r % 2 == 0 else SECS[::-1] for r in range(reps)]


def run_curve(a: Any, b: Any, reps: int, target_s: float, lat_totals: dict[int, int], log: Callable[[str], None],
              tp_trial: Callable[..., dict], label: Callable[[int], str]) -> dict:
    """Throughput (a receives, b sends) and round trips (a serves, b asks), both modes
    alternating; ``tp_trial`` is messaging.py's."""
    keys = make_keys()
    out: dict[str, Any] = {"sizes": list(SIZES), "reps": reps, "target_trial_s": target_s,
                           "round_trips_per_mode": lat_totals, "zap_domain": ZAP_DOMAIN}
    out["zap_check"] = a.run("zap_check", keys=keys)
    log(f"  ZAP: stranger refused {out['zap_check']['stranger_refused']}, "
        f"client admitted {out['zap_check']['client_admitted']}")
    out["throughput"] = []
    for size in SIZES:
        for path in ("raw", "ours"):
            counts = {}
            for sec in SECS:  # pilot (discarded): warms up, calibrates the count
                pilot = max(200, int(GUESS_RATE[path, size] * target_s * 0.4))
                rate = tp_trial(a, b, path, size, pilot, sec=sec, keys=keys)["msgs_per_s"]
                counts[sec] = max(200, int(rate * target_s * 1.1))
            rates: dict[str, list[float]] = {sec: [] for sec in SECS}
            for order in _orders(reps):
                for sec in order:
                    rates[sec].append(tp_trial(a, b, path, size, counts[sec], sec=sec, keys=keys)["msgs_per_s"])
            row: dict[str, Any] = {"size": size, "label": label(size), "path": path}
            for sec in SECS:
                med = statistics.median(rates[sec])
                row[sec] = {"msgs_per_s_median": med, "mb_per_s_median": med * size / 1e6,
                            "msgs_per_s_trials": rates[sec], "count": counts[sec]}
            row["ratio"] = row["curve"]["msgs_per_s_median"] / row["plain"]["msgs_per_s_median"]
            log(f"  curve tp {label(size):>7} {path:4}: plain {row['plain']['msgs_per_s_median']:>9,.0f}/s  "
                f"curve {row['curve']['msgs_per_s_median']:>9,.0f}/s  ratio {row['ratio']:.2f}")
            out["throughput"].append(row)
    out["latency"] = []
    for size in SIZES:
        per_block = max(50, lat_totals[size] // reps)
        warmup = max(20, per_block // 10)
        samples: dict[str, list[int]] = {sec: [] for sec in SECS}
        blocks: dict[str, list[float]] = {sec: [] for sec in SECS}
        for order in _orders(reps):
            for sec in order:
                a.start("lat_server", mode="ours", size=size, count=warmup + per_block, sec=sec, keys=keys)
                port = a.message("port")
                b.start("lat_client", mode="ours", size=size, count=per_block, warmup=warmup, port=port,
                        sec=sec, keys=keys)
                got = b.result()
                a.result()
                samples[sec].extend(got)
                blocks[sec].append(statistics.median(got) / 1e3)
        row = {"size": size, "label": label(size), "path": "ours", "round_trips_per_mode": per_block * reps}
        for sec in SECS:
            us = np.asarray(samples[sec], dtype=np.float64) / 1e3
            row[sec] = {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
                        "min_us": float(us.min()), "block_medians_us": blocks[sec]}
        row["ratio_median"] = row["curve"]["median_us"] / row["plain"]["median_us"]
        row["delta_median_us"] = row["curve"]["median_us"] - row["plain"]["median_us"]
        row["ratio_p99"] = row["curve"]["p99_us"] / row["plain"]["p99_us"]
        log(f"  curve rt {label(size):>7} ours: plain {row['plain']['median_us']:8.1f} µs  "
            f"curve {row['curve']['median_us']:8.1f} µs  ratio {row['ratio_median']:.2f}")
        out["latency"].append(row)
    return out


def stop_zap(workers: list[Any]) -> dict:
    """Stop the workers' authenticators; the handshakes ZAP answered, by worker."""
    return {w.name: w.run("zap_stop") for w in workers}


def print_curve(con: Any, res: dict) -> None:
    from rich.table import Table

    reps = res["reps"]
    t = Table(title=f"CURVE against plaintext (issue 20): throughput PUSH→PULL, msg/s, medians of {reps} "
                    "(ratio: CURVE / plain)")
    for c in ("payload", "path", "plain msg/s", "CURVE msg/s", "ratio", "plain MB/s", "CURVE MB/s"):
        t.add_column(c, justify="right")
    for r in res["throughput"]:
        t.add_row(r["label"], r["path"], f"{r['plain']['msgs_per_s_median']:,.0f}",
                  f"{r['curve']['msgs_per_s_median']:,.0f}", f"{r['ratio']:.0%}",
                  f"{r['plain']['mb_per_s_median']:,.1f}", f"{r['curve']['mb_per_s_median']:,.1f}")
    con.print(t)
    t = Table(title="CURVE against plaintext: our round trip DEALER→ROUTER→DEALER (µs), User-Id checked per message")
    for c in ("payload", "plain median", "CURVE median", "ratio", "Δ median", "plain p99", "CURVE p99"):
        t.add_column(c, justify="right")
    for r in res["latency"]:
        t.add_row(r["label"], f"{r['plain']['median_us']:.1f}", f"{r['curve']['median_us']:.1f}",
                  f"{r['ratio_median']:.2f}", f"{r['delta_median_us']:+.1f}",
                  f"{r['plain']['p99_us']:.1f}", f"{r['curve']['p99_us']:.1f}")
    con.print(t)
    z = res["zap_check"]
    handshakes = sum(w["handshakes_admitted"] for w in res.get("zap", {}).values())
    con.print(f"ZAP (ThreadAuthenticator, curve callback): a stranger's key refused {z['stranger_refused']}, "
              f"the client's admitted with its key as User-Id {z['client_admitted']}; "
              f"{handshakes} handshakes admitted in the run; the per-message check takes "
              f"{z.get('peer_check_curve_us', float('nan')):.2f} µs (plaintext's {z.get('peer_check_plain_us', float('nan')):.2f} µs)")
