"""``make demo``: a local cluster aligns a real pair of sequences, then stops and leaves nothing.

What it runs is what a user types: ``cluster up`` (3 masters, the balancer pair, 2 storage
nodes, a worker), ``cluster status``, ``cluster align`` on pseudocat × pseudopig2 from Debian's
``lastz-examples`` (fetched by ``deploy/fetch-data.sh``) with its traceback written as PAF, SAM,
a text view and a dotplot under ``demo-output/`` (the text view's first blocks are shown), the
same pair on this machine alone
with ``python -m worker.sw`` for comparison, and ``cluster down``. ``--genome`` (``make
demo-genome``) aligns the two *Helicobacter pylori* genomes of ``sibelia-examples`` instead
(1.58 × 1.71 Mbp: minutes, not seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = {
    "small": ("pseudocat.fa", "pseudopig2.fa"),
    "genome": ("hpylori_a.fa", "hpylori_b.fa"),
}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A ``cluster`` command as a user would type it, echoed first."""
    print(f"\n$ cluster {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "cluster", *args], text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"demo: `cluster {args[0]}` failed (exit {done.returncode}); see the lines above")
    return done


def show_alignment(text: Path, blocks: int = 2) -> None:
    """The text view's header and first blocks: what the alignment looks like."""
    lines = text.read_text().splitlines()
    head = [ln for ln in lines if ln.startswith("#") and ln.strip("# ")]
    body = [ln for ln in lines if not ln.startswith("#")]
    print(f"\n$ head {text.relative_to(ROOT)}   # the pairwise view (also PAF, SAM and a dotplot PNG there)")
    print("\n".join(head[-8:]) + "\n")
    shown, seen = [], 0
    for ln in body:
        shown.append(ln)
        if not ln.strip() and shown[:-1] and shown[-2].strip():
            seen += 1
            if seen == blocks + 1:
                break
    print("\n".join(shown).strip("\n"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    which = "genome" if "--genome" in argv else "small"
    data = Path(os.environ.get("DATA_DIR", ROOT / "data"))
    a, b = (data / name for name in PAIRS[which])
    for f in (a, b):
        if not f.is_file():
            print(f"demo: {f} is missing; run ./deploy/fetch-data.sh (make demo does)", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="cluster-demo-") as d:
        nodes_file = Path(d) / "nodes.json"
        pids: list[int] = []
        try:
            run("up", "--dir", d)
            pids = [n["pid"] for n in json.loads(nodes_file.read_text())["nodes"] if n.get("pid")]
            run("status", "--dir", d, check=False)
            out = ROOT / "demo-output"
            out.mkdir(exist_ok=True)
            files = {k: out / f"{which}.{ext}" for k, ext in (("paf", "paf"), ("sam", "sam"), ("text", "txt"),
                                                              ("dotplot", "png"))}
            run("align", str(a), str(b), "--config", str(Path(d) / "cluster.toml"),
                *[x for k, f in files.items() for x in (f"--{k}", str(f))])
            show_alignment(files["text"])
            if which == "small":
                print("(a pair this small is mostly the slots' kernel load and per-tile costs; `make demo-genome` "
                      "shows the cluster's rate: ~15 GCUPS on 2 cores, doc/benchmarks.md)")
            print(f"\n$ python -m worker.sw {a.name} {b.name}   # the same pair on this machine alone", flush=True)
            subprocess.run([sys.executable, "-m", "worker.sw", str(a), str(b), "--threads", str(os.cpu_count() or 1)])
        finally:
            run("down", "--dir", d, check=False)
        left = [p for p in pids if Path(f"/proc/{p}").exists()]
        if left:
            print(f"demo: processes still running after `cluster down`: {left}", file=sys.stderr)
            return 1
        print(f"\nthe cluster stopped; none of its {len(pids)} processes is left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
