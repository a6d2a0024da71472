"""How a worker's tasks reach stored files: through the FUSE mount, or the cache without it.

``WorkerFiles.path(fid)`` is the path a task (a kernel, a shell command) opens. With the mount
up it is ``<mount>/files/<id>`` and bytes arrive on demand; where FUSE is not available (no
/dev/fuse, not permitted, no libfuse3) the whole file is fetched into the same on-disk cache
and its cache path is returned, and the worker says so once in its log.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from worker.cache import BlockCache, StorageView

log = logging.getLogger("cluster.worker")


class WorkerFiles:
    """Stored files as local paths for one worker."""

    def __init__(self, view: StorageView, cache: BlockCache, mountpoint: Path | None) -> None:
        self.view = view
        self.cache = cache
        self.mountpoint = Path(mountpoint) if mountpoint else None
        self._said = False

    def mounted(self) -> bool:
        """Whether the FUSE view answers at the mount point now."""
        if self.mountpoint is None:
            return False
        try:
            return os.path.ismount(self.mountpoint) and (self.mountpoint / "files").is_dir()
        except OSError:  # a dead mount: "Transport endpoint is not connected"
            return False

    def path(self, fid: bytes) -> Path:
        """A path whose bytes are the stored file ``fid``; FileNotFoundError if it is unknown."""
        if self.mounted():
            return self.mountpoint / "files" / fid.hex()
        if not self._said:
            self._said = True
            log.warning("no FUSE view at %s: stored files are fetched whole into the cache at %s instead",
                        self.mountpoint or "(no mount point)", self.cache.root)
        done = self.cache.path_if_complete(fid)
        if done is not None:
            return done
        size = self.view.size(fid)
        if size is None:
            raise FileNotFoundError(f"no stored file {fid.hex()}")
        return self.cache.materialize(fid, size, lambda offset, n: self.view.read(fid, offset, n))

    @contextlib.contextmanager
    def inputs(self, fids: Sequence[bytes]) -> Iterator[list[Path]]:
        """Paths of a task's inputs, good until the block ends. A file already complete in the
        cache is handed out as the cache's own file, pinned so it is not evicted meanwhile:
        the task reads it at native speed instead of through FUSE (measured: a FUSE read of a
        cached file runs at ~18% of a direct read, doc/benchmarks.md). Others go through the
        mount (fetched on demand) or, without it, are fetched whole first."""
        pinned: list[bytes] = []
        try:
            paths = []
            for fid in fids:
                self.cache.pin(fid)
                pinned.append(fid)
                done = self.cache.path_if_complete(fid)
                paths.append(done if done is not None else self.path(fid))
            yield paths
        finally:
            for fid in pinned:
                self.cache.unpin(fid)

    def add_own(self, fid: bytes, path: Path) -> None:
        """A file this worker wrote and stored: it is in the cache already, no fetch needed."""
        self.cache.put_file(fid, path)
