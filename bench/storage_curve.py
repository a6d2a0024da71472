"""What CURVE costs the storage data path (issue 20), for ``bench/storage.py``.

Two storage nodes run side by side, alike but for ``[security]``: one with CURVE (keys made as
``cluster.local`` makes them, the default), one with ``insecure = true`` (plaintext), each with
a fresh blob store (in the same directory kind) every round. The client process learns each
cluster's keys from its config, as ``cluster upload --config`` does. Per round and client chunk
size, the two upload a file of the same size (a different random file per chunk size, so that
no upload is a dedupe of an earlier one), then download it into a prefilled file; the pair's
order flips every round, so drift in the machine's load falls on both alike; a first round warms
up (first-touch pages, imports) and is not counted. Optionally
(``raw``) raw pyzmq moves the same bytes with and without CURVE (same chunks and window, no
hashing, no ZAP): the ceiling of each mode on this machine.

The chunk is the client's: ``StorageLink.upload(chunk=)`` (the node refuses chunks over
``StorageSettings.chunk_max``, 4 MiB; credit stays 16 MiB) and ``StorageLink.download(chunk=)``
(reads up to ``read_max``, 8 MiB; 8 in flight, so 4 MiB reads keep 32 MiB in flight). The
product's default is 1 MiB for both (``cluster.node.storagelink.CHUNK``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import zmq

MiB = 1 << 20
GiB = 1 << 30
MODES = ("curve", "plaintext")
CHUNKS = (MiB, 2 * MiB, 4 * MiB)
QUICK_CHUNKS = (MiB, 4 * MiB)


def add_arguments(ap: Any) -> None:
    ap.add_argument("--no-curve", action="store_true", help="skip the CURVE against plaintext part")
    ap.add_argument("--curve-reps", type=int, default=None,
                    help="its interleaved rounds after a warm-up one (default 8, --quick 4)")
    ap.add_argument("--curve-size", type=int, default=None, help="its file size in MiB (default 256, --quick 64)")
    ap.add_argument("--curve-chunks", default=None, help="its client chunk sizes in MiB (default 1,2,4; --quick 1,4)")
    ap.add_argument("--curve-store", choices=("disk", "shm"), default="shm", help="where its blob stores live")
    ap.add_argument("--no-curve-raw", action="store_true", help="leave raw pyzmq out of the CURVE part")


def run(args: Any, dirs: dict[str, Path], mpctx: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """The CURVE part as ``bench/storage.py``'s options say."""
    size = (args.curve_size or (64 if args.quick else 256)) * MiB
    chunks = (tuple(int(c) * MiB for c in args.curve_chunks.split(",")) if args.curve_chunks
              else QUICK_CHUNKS if args.quick else CHUNKS)
    reps = args.curve_reps or (4 if args.quick else 8)
    log(f"CURVE against plaintext: {reps} rounds of {size // MiB} MiB on {args.curve_store}, "
        f"client chunks of {', '.join(str(c // MiB) for c in chunks)} MiB")
    out = measure_security(dirs[args.curve_store] / "curve", size, reps, chunks, not args.no_curve_raw, mpctx, log)
    return out | {"store": args.curve_store}


def measure_security(base: Path, size: int, reps: int, chunks: tuple[int, ...], raw: bool, mpctx: Any,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved CURVE / plaintext uploads and downloads of ``size`` bytes, ``reps`` rounds,
    per client chunk in ``chunks``, the blob stores under ``base``; medians and ratios."""
    from bench import machine
    from bench.storage import Nodes, make_source, prefill, with_cpu
    from bench.storage_procs import worker
    from cluster.node.storagelink import WINDOW

    base.mkdir(parents=True, exist_ok=True)
    sources = {c: base / f"curve-source-{c // MiB}MiB.bin" for c in chunks}
    for src in sources.values():
        make_source(src, size)
    dests = {(side, m): base / f"curve-download-{side}-{m}.bin" for side in ("ours", "raw") for m in MODES}
    for side, m in dests:
        if side == "ours" or raw:
            prefill(dests[side, m], size)
    keys = _raw_keys() if raw else {}
    client = worker(mpctx, "curve-client")
    server = worker(mpctx, "curve-raw-server") if raw else None
    trials: dict[tuple, list[dict]] = {}
    cpu0 = machine.cpu_times()
    try:
        for r in range(-1, reps):  # round -1 warms up (first-touch pages, imports); not counted
            t0 = time.perf_counter()
            order = MODES if r % 2 == 0 else MODES[::-1]
            bucket: dict[tuple, list[dict]] = {} if r < 0 else trials
            clusters = {m: Nodes(base / f"{m}-{r}", 1, insecure=m == "plaintext") for m in MODES}
            try:
                for m in order:
                    clusters[m].__enter__()
                for c in chunks:
                    fids = {}
                    for m in order:
                        n = clusters[m]
                        got = with_cpu(client, n.pids, lambda: client.run(
                            "ours_upload", nodes=n.addresses, src=str(sources[c]), copies=1, config=str(n.config),
                            chunk=c))
                        fids[m] = got["fid"]
                        bucket.setdefault(("upload", c, "ours", m), []).append(got)
                    for m in order if raw else ():
                        got = _raw_trial(server, client, "upload", base / f"curve-raw-{m}.bin", sources[c], size, c,
                                         WINDOW, keys if m == "curve" else None)
                        bucket.setdefault(("upload", c, "raw", m), []).append(got)
                    for m in order:
                        n = clusters[m]
                        got = with_cpu(client, n.pids, lambda: client.run(
                            "ours_download", address=n.nodes[0].address, fid=fids[m], dest=str(dests["ours", m]),
                            config=str(n.config), chunk=c, window=WINDOW))
                        if not got["verified"]:
                            raise RuntimeError(f"the {m} download of {fids[m]} does not match")
                        bucket.setdefault(("download", c, "ours", m), []).append(got)
                    for m in order if raw else ():
                        got = _raw_trial(server, client, "download", base / f"curve-raw-{m}.bin", dests["raw", m],
                                         size, c, WINDOW, keys if m == "curve" else None)
                        bucket.setdefault(("download", c, "raw", m), []).append(got)
            finally:
                for n in clusters.values():
                    n.close()
            log(f"  curve round {r + 1 or 'warm-up'}/{reps}: {time.perf_counter() - t0:.1f} s; "
                + ", ".join(f"{op[0]}{c // MiB} {m[0]} {_rate(size, bucket[op, c, 'ours', m][-1][_key(op)]):,.0f}"
                            for op in ("upload", "download") for c in chunks for m in MODES))
    finally:
        client.stop()
        if server:
            server.stop()
        for p in [*sources.values(), *dests.values(), *(base / f"curve-raw-{m}.bin" for m in MODES)]:
            p.unlink(missing_ok=True)
    return summarize(trials, size, reps, chunks, raw) | {
        "cpu_shares": machine.cpu_shares(cpu0, machine.cpu_times()), "window_reads": WINDOW}


def _raw_keys() -> dict[str, bytes]:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return {"server_public": server_public, "server_secret": server_secret, "client_public": client_public,
            "client_secret": client_secret}


def _raw_trial(server: Any, client: Any, op: str, path: Path, src_or_dest: Path, size: int, chunk: int, window: int,
               curve: dict | None) -> dict:
    """One raw pyzmq transfer, CURVE when ``curve`` has keys; as ``bench.storage.raw_trial``."""
    from bench.storage import with_cpu
    from storage.core import StorageSettings

    server.start("raw_server", mode=op, path=str(path), window=StorageSettings().window, curve=curve)
    port = server.message("port")

    def run() -> dict:
        if op == "upload":
            got = client.run("raw_upload", port=port, src=str(src_or_dest), chunk=chunk, curve=curve)
        else:
            got = client.run("raw_download", port=port, dest=str(src_or_dest), size=size, chunk=chunk, window=window,
                             curve=curve)
        server.result()
        return got

    return with_cpu(client, [server.proc.pid], run)


def _key(op: str) -> str:
    """The timing a ratio is taken on: an upload's transfer alone (the client's content-id hash
    before it is the same work in both modes and would dilute the difference), a download's."""
    return "transfer_s" if op == "upload" else "seconds"


def _rate(size: int, seconds: float | None) -> float | None:
    return size / seconds / 1e6 if seconds else None


def summarize(trials: dict, size: int, reps: int, chunks: tuple[int, ...], raw: bool) -> dict[str, Any]:
    rows = []
    for op in ("upload", "download"):
        for side in ("ours", "raw") if raw else ("ours",):
            for c in chunks:
                row: dict[str, Any] = {"op": op, "side": side, "chunk": c}
                for m in MODES:
                    runs = trials.get((op, c, side, m), [])
                    secs = [t[_key(op)] for t in runs]
                    cpu = [t["client_transfer_cpu_s"] + t["server_cpu_s"] for t in runs]
                    row[m] = {"mb_s": _rate(size, statistics.median(secs)) if secs else None,
                              "mb_s_trials": [_rate(size, s) for s in secs],
                              "cpu_s_per_gib": statistics.median(cpu) / (size / GiB) if cpu else None,
                              "trials": runs}
                    if op == "upload" and side == "ours" and runs:  # with the client's hash, as `cluster upload`
                        row[m]["end_to_end_mb_s"] = _rate(size, statistics.median(t["seconds"] for t in runs))
                if row["curve"]["mb_s"] and row["plaintext"]["mb_s"]:
                    row["ratio"] = row["curve"]["mb_s"] / row["plaintext"]["mb_s"]
                    # each round's pair ran back to back: their ratio shares that moment's load
                    pairs = zip(trials[op, c, side, "curve"], trials[op, c, side, "plaintext"])
                    row["ratio_paired"] = statistics.median(p[_key(op)] / cv[_key(op)] for cv, p in pairs)
                    row["cpu_ratio"] = row["curve"]["cpu_s_per_gib"] / row["plaintext"]["cpu_s_per_gib"]
                if row["curve"].get("end_to_end_mb_s") and row["plaintext"].get("end_to_end_mb_s"):
                    row["ratio_end_to_end"] = row["curve"]["end_to_end_mb_s"] / row["plaintext"]["end_to_end_mb_s"]
                rows.append(row)
    for row in rows:  # ours against raw pyzmq in the same mode and chunk
        ref = next((x for x in rows if x["side"] == "raw" and x["op"] == row["op"] and x["chunk"] == row["chunk"]), None)
        if row["side"] == "ours" and ref:
            for m in MODES:
                if row[m]["mb_s"] and ref[m]["mb_s"]:
                    row[m]["of_raw"] = row[m]["mb_s"] / ref[m]["mb_s"]
    return {"size": size, "reps": reps, "chunks": list(chunks), "raw": raw, "rows": rows}


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _range(xs: list[float]) -> str:
    return f"{_mb(min(xs))}-{_mb(max(xs))}" if xs else "-"


def _cpu(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(sec: dict) -> tuple[str, list[str], list[list[str]]]:
    """The title, columns and cells of the report's CURVE table."""
    title = (f"CURVE against plaintext: 2 storage nodes side by side ({sec.get('store', '?')}), {sec['size'] // MiB} MiB, "
             f"{sec['reps']} interleaved rounds (medians; uploads: the transfer, without the client's hash; paired: "
             "median of each round's CURVE/plain; every trial in the JSON)")
    cols = ["op", "side", "chunk", "CURVE MB/s", "plain MB/s", "CURVE/plain", "paired", "of raw CURVE/plain",
            "CPU s/GiB CURVE/plain", "CURVE range MB/s", "plain range MB/s"]
    cells = []
    for r in sec["rows"]:
        cv, pl = r["curve"], r["plaintext"]
        cells.append([
            r["op"], r["side"], f"{r['chunk'] // MiB} MiB", _mb(cv["mb_s"]), _mb(pl["mb_s"]),
            f"{r['ratio']:.0%}" if "ratio" in r else "-", f"{r['ratio_paired']:.0%}" if "ratio_paired" in r else "-",
            f"{cv['of_raw']:.0%} / {pl['of_raw']:.0%}" if "of_raw" in cv and "of_raw" in pl else "-",
            f"{_cpu(cv['cpu_s_per_gib'])} / {_cpu(pl['cpu_s_per_gib'])}",
            _range(cv["mb_s_trials"]), _range(pl["mb_s_trials"])])
    return title, cols, cells


def print_table(con: Any, sec: dict) -> None:
    from rich.table import Table

    title, cols, cells = table(sec)
    t = Table(title=title)
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i < 2 else "right")
    for row in cells:
        t.add_row(*row)
    con.print(t)
    for line in notes(sec):
        con.print(line)


def notes(sec: dict) -> list[str]:
    """Lines under the table: end-to-end uploads (with the client's hash)."""
    out = []
    for r in sec["rows"]:
        if "ratio_end_to_end" in r:
            out.append(f"upload {r['chunk'] // MiB} MiB chunks with the client's hash (as `cluster upload`): CURVE "
                       f"{_mb(r['curve']['end_to_end_mb_s'])}, plaintext {_mb(r['plaintext']['end_to_end_mb_s'])} MB/s "
                       f"({r['ratio_end_to_end']:.0%})")
    sh = sec.get("cpu_shares")
    if sh:
        out.append(f"CPU during the CURVE part: busy {sh['busy']:.0%}, idle {sh['idle']:.0%}, steal {sh['steal']:.0%}")
    return out
