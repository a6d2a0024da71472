#!/usr/bin/env python3
"""Real example sequences for benchmarks and tests, fetched by ``deploy/fetch-data.sh``.

    from bench.data import ensure_data, read_fasta
    paths = ensure_data()                       # runs the script once if files are missing
    name, seq = read_fasta(paths["pseudocat"])  # first record; letters as in the file

Sequences (Debian packages lastz-examples and sibelia-examples):

* ``pseudocat`` (18,803 bp) and ``pseudopig2`` (22,929 bp): a small real pair.
* ``hpylori_a`` (NC_017366.1, 1,578,824 bp) and ``hpylori_b`` (NC_017371.1, 1,709,911 bp):
  two *Helicobacter pylori* genomes, the genome-scale benchmark.

``python bench/data.py`` fetches them if needed and prints their names and lengths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# first, even when an editable install lists ROOT already: run as `python bench/X.py`, sys.path
# starts with bench/, where storage.py would shadow the storage package
sys.path.insert(0, str(ROOT))

from worker.sw.fasta import RecordNotFound, read_fasta  # noqa: E402  (re-exported)

__all__ = ["RecordNotFound", "ensure_data", "read_fasta"]

SCRIPT = ROOT / "deploy" / "fetch-data.sh"
DATA_DIR = ROOT / "data"
FILES = {
    "pseudocat": "pseudocat.fa",
    "pseudopig2": "pseudopig2.fa",
    "hpylori_a": "hpylori_a.fa",
    "hpylori_b": "hpylori_b.fa",
}


def ensure_data(data_dir: Path | None = None) -> dict[str, Path]:
    """Paths of the example FASTA files by short name; runs deploy/fetch-data.sh if any is missing."""
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    paths = {key: data_dir / name for key, name in FILES.items()}
    missing = [p for p in paths.values() if not (p.is_file() and p.stat().st_size > 0)]
    if missing:
        env = dict(os.environ, DATA_DIR=str(data_dir))
        # The script prints what it made on stdout; send it to stderr to keep stdout clean.
        subprocess.run(["bash", str(SCRIPT)], check=True, env=env, stdout=sys.stderr)
        still = [str(p) for p in paths.values() if not p.is_file()]
        if still:
            raise RuntimeError(f"{SCRIPT} ran but did not make {', '.join(still)}")
    return paths


def main() -> None:
    for key, path in ensure_data().items():
        name, seq = read_fasta(path)
        print(f"{key:12s} {len(seq):>10,d} bp  {name}  ({path.relative_to(ROOT)})")


if __name__ == "__main__":
    main()
