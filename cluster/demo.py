"""``make demo`` until the alignment job exists: two probe nodes, their status, a clean stop.

The whole-genome alignment demo arrives with the alignment-job issue; this shows honestly what
runs today: the wire protocol and the node runtime, on two real processes on 127.0.0.1.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.local import free_port, probe_node
from cluster.status import query_status


def main() -> int:
    print("What runs today: the wire protocol and the node runtime (two probe nodes).")
    print("The alignment demo comes with the alignment-job issue.\n")
    with tempfile.TemporaryDirectory(prefix="cluster-demo-") as tmp:
        pa, pb = free_port(), free_port()
        a = probe_node("probe-a", Path(tmp), pa, [pb])
        b = probe_node("probe-b", Path(tmp), pb, [pa])
        try:
            for node in (a, b):
                node.start()
            for node in (a, b):
                node.wait_ready()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until each sees the other alive
                replies = [r.reply for r in query_status([a.address, b.address], timeout=1)]
                if all(r and all(p["state"] == "alive" for p in r.detail["peers"].values()) for r in replies):
                    break
            subprocess.run([sys.executable, "-m", "cluster", "status", a.address, b.address], check=False)
            for r in query_status([a.address, b.address]):
                for peer, s in r.reply.detail["peers"].items():
                    print(f"{r.address} sees {peer}: {s['state']}, round trip {s['rtt_ms']} ms")
        finally:
            codes = [node.stop() for node in (a, b)]
        print(f"\nstopped with SIGTERM, exit statuses {codes}")
        return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
