"""Mount StorageFS over files in a directory: ``python -m tests.fuse_fixture DIR MOUNT [options]``.

DIR holds the stored files, each named by its 32-hex id, and ``names.json``::

    {"jobs": {"<job hex>": {"<name>": "<fid hex>", ...}}, "broken": ["<fid hex>", ...]}

A broken file has a size but every read of it fails with EIO (no replica can serve it). The
block cache lives in DIR/cache unless ``--cache`` says otherwise. Runs in the foreground until
unmounted or sent SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
from pathlib import Path

from worker.cache import BlockCache
from worker.fusefs import Tuning, mount


class DirView:
    """A StorageView over a directory of files named by hex id (reads are preads: no RSS)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        spec = json.loads((root / "names.json").read_text()) if (root / "names.json").exists() else {}
        self._jobs = {bytes.fromhex(j): {n: bytes.fromhex(f) for n, f in files.items()}
                      for j, files in spec.get("jobs", {}).items()}
        self._broken = {bytes.fromhex(f) for f in spec.get("broken", [])}

    def size(self, fid: bytes) -> int | None:
        try:
            return (self.root / fid.hex()).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, fid: bytes, offset: int, length: int) -> bytes:
        if fid in self._broken:
            raise OSError(errno.EIO, "no replica can serve it")
        with open(self.root / fid.hex(), "rb") as fh:
            return os.pread(fh.fileno(), length, offset)

    def jobs(self) -> list[bytes]:
        return list(self._jobs)

    def job_files(self, job: bytes) -> dict[str, bytes] | None:
        return self._jobs.get(job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("mountpoint")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--capacity", type=int, default=4 << 30)
    parser.add_argument("--nothreads", action="store_true")
    parser.add_argument("--no-listing", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cache = BlockCache(args.cache or args.dir / "cache", args.capacity, durable=False)
    try:
        mount(DirView(args.dir), cache, args.mountpoint, threads=not args.nothreads,
              tuning=Tuning(enumerate=not args.no_listing))
    finally:
        cache.close()


if __name__ == "__main__":
    main()
