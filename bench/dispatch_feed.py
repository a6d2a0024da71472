#!/usr/bin/env python3
"""A client process that keeps a cluster busy with no-op tasks, for the leader part of
``bench/dispatch.py`` (issue 23): one client in one Python process resolves futures at a few
thousand tasks a second at most, so the offered load comes from several of these.

It keeps ``--depth`` batches of ``--batch`` no-op tasks in flight through ``Client.map``
(``dispatch_hops.TaskStream``) until ``--until`` (a ``time.monotonic()`` value: CLOCK_MONOTONIC
is the same clock in every process of the machine, so the parent sets the deadline), waits for
what is in flight, and writes ``--out``: the time and size of every committed submit, its
backlog samples (tasks submitted and not yet ended) and how many tasks ended.

    python bench/dispatch_feed.py --config DIR/masters.toml --batch 1000 --depth 4 --until T --out F.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the masters' config (its keys: this process is a client)")
    ap.add_argument("--batch", type=int, default=1000, help="tasks per Client.map call")
    ap.add_argument("--depth", type=int, default=4, help="batches in flight")
    ap.add_argument("--until", type=float, required=True, help="stop submitting at this time.monotonic()")
    ap.add_argument("--check", action="store_true", help="check every result (real workers; simulated ones return none)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import cloudpickle

    from bench import dispatch_peers
    from bench.dispatch_hops import TaskStream
    from cluster.client import Client
    from cluster.local import learn_keys
    from cluster.node.config import load_cluster_config

    cloudpickle.register_pickle_by_value(dispatch_peers)  # the workers cannot import bench/
    learn_keys(Path(args.config))
    masters = list(load_cluster_config(Path(args.config)).masters.values())
    out: dict = {}
    with Client(masters, timeout=60) as client:
        stream = TaskStream(client, dispatch_peers.noop, args.batch, args.depth, check=args.check)
        try:
            stream.pump(args.until)
            stream.drain(timeout=60)
        except Exception as exc:  # noqa: BLE001 - the parent reports it with what was counted
            out["error"] = f"{type(exc).__name__}: {exc}"
        out.update(submits=stream.submits, backlog=stream.backlog, submitted=stream.submitted, ended=stream.ended)
    Path(args.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
