#!/usr/bin/env python3
"""MESSAGE_BATCH: where to cut a batch (issue 23). Items per second and CPU per item through a
CURVE DEALER → ROUTER pair on 127.0.0.1 (as between a balancer and a worker), for batches of 1 (no
batching: each message alone) to 1,024 items.

Run from the repository root::

    .venv/bin/python bench/batching.py            # ~1 min
    .venv/bin/python bench/batching.py --quick    # ~15 s
    .venv/bin/python bench/batching.py --json PATH

The items are real WORKER_REQUESTs of a no-op callable (~330 bytes each, what a master sends per
task). The sender encodes (``Codec.encode_items`` + MESSAGE_BATCH, or each message alone) and
sends; the receiver, a thread of its own, receives, decodes and unpacks every item
(``Codec.unbatch``), as the node loop does. Timed from the first send to the last item decoded;
CPU from the process's clock (both threads). Each size runs ``--reps`` times, interleaved with the
others; medians. The cut in ``proto.messages`` (``BATCH_MAX_ITEMS``, ``BATCH_MAX_BYTES``) comes
from this table: the rate flattens well before the cap, so the cap only bounds a turn's batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bench import machine  # noqa: E402
from proto import Codec  # noqa: E402
from proto.messages import MessageBatch, WorkerRequest  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 64, 256, 1024)


def sample_request(i: int) -> WorkerRequest:
    program = bytes(120)  # a cloudpickled no-op is about this long
    return WorkerRequest(1, 2, i, 5, i + 1, len(program), 0, "call", program, [],
                         {"task": {"args": bytes(40)}, "run": {"kind": "call", "timeout_s": 60}, "owner": "client"})


def one_run(items: int, size: int, port: int, keys: dict) -> dict:
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_secretkey, router.curve_publickey = keys["server"]
    router.setsockopt(zmq.RCVHWM, 0)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    dealer = ctx.socket(zmq.DEALER)
    dealer.curve_serverkey = keys["server"][1]
    dealer.curve_secretkey, dealer.curve_publickey = keys["client"]
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.connect(endpoint)
    messages = [sample_request(i) for i in range(items)]
    tx, rx = Codec(1), Codec(2)
    # handshake first, outside the clock
    tx.send(dealer, messages[0])
    rx.recv(router, router=True)
    got = [0]
    done = threading.Event()

    def receive() -> None:
        while got[0] < items:
            _, _, m = rx.recv(router, router=True)
            if type(m) is MessageBatch:
                got[0] += sum(1 for x in rx.unbatch(m) if isinstance(x, tuple))
            else:
                got[0] += 1
        done.set()

    t = threading.Thread(target=receive, daemon=True)
    cpu0, t0 = time.process_time(), time.perf_counter()
    t.start()
    for start in range(0, items, size):
        chunk = messages[start:start + size]
        if len(chunk) == 1:
            tx.send(dealer, chunk[0])
        else:
            payload = tx.encode_items(chunk)
            tx.send(dealer, MessageBatch(len(payload), payload))
    done.wait(120)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    t.join(1)
    dealer.close(0)
    router.close(0)
    return {"items_per_s": items / wall, "cpu_us_per_item": cpu / items * 1e6, "ok": got[0] == items}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer items and reps (~15 s)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "batching.json"))
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    items = 20_000 if args.quick else 50_000
    reps = args.reps or (3 if args.quick else 5)
    keys = {"server": zmq.curve_keypair()[::-1], "client": zmq.curve_keypair()[::-1]}
    runs: dict[int, list[dict]] = {s: [] for s in SIZES}
    for _ in range(reps):
        for size in SIZES:  # interleaved: a noisy minute spreads over every size alike
            runs[size].append(one_run(items, size, 0, keys))
    rows = []
    base = statistics.median(r["items_per_s"] for r in runs[1])
    for size in SIZES:
        rate = statistics.median(r["items_per_s"] for r in runs[size])
        cpu = statistics.median(r["cpu_us_per_item"] for r in runs[size])
        rows.append({"batch": size, "items_per_s": rate, "cpu_us_per_item": cpu, "speedup": rate / base,
                     "all_ok": all(r["ok"] for r in runs[size]), "reps": [round(r["items_per_s"]) for r in runs[size]]})
    print(f"MESSAGE_BATCH cut: {items:,} WORKER_REQUESTs (~{len(Codec(1).encode(sample_request(1))[0])} B each) "
          f"over CURVE DEALER -> ROUTER, 127.0.0.1, median of {reps}")
    print(f"{'batch':>6} {'items/s':>10} {'CPU us/item':>12} {'x alone':>8}  reps")
    for r in rows:
        print(f"{r['batch']:>6} {r['items_per_s']:>10,.0f} {r['cpu_us_per_item']:>12.1f} {r['speedup']:>8.2f}  "
              + " ".join(f"{x:,}" for x in r["reps"]) + ("" if r["all_ok"] else "  (items missing!)"))
    out = {"machine": machine.machine_info(), "items": items, "reps": reps, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"results in {args.json}")
    return 0 if all(r["all_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
