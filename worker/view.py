"""The cluster as a worker sees it: file sizes and names from the masters, bytes from storage.

``ClusterView`` implements ``worker.cache.StorageView`` over the network. Where a file lives and
how big it is come from the ledger (FILE_LOOKUP) and are remembered for good: a file id never
changes meaning. Job listings are remembered briefly (a job gains files while it runs).

Reads go to the file's replicas in the ledger's order, then to the other storage nodes in
rendezvous order. A replica that fails (down, slow past ``read_timeout``, or serving a corrupt
copy) is skipped for ``penalty_s`` so later reads do not wait on it again; the read goes on at
the next one. Each thread has its own links (FUSE serves reads on many threads; a ZeroMQ socket
must stay on one).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any

from cluster.node.masterlink import ClusterError, MasterLink, NotFound
from proto.errors import StorageStatus
from proto.fileids import rank
from cluster.node.storagelink import LinkPool, TransferError

log = logging.getLogger("cluster.worker")

LISTING_TTL = 2.0
STALE_READ_S = 1.2  # a cut-off leader steps down within 1 s (doc/masters.md); ask once more after that


class ClusterView:
    """Sizes, names and bytes of the cluster's files for one worker."""

    def __init__(self, masters: list[str], storage: dict[str, str], *, read_timeout: float = 2.0,
                 penalty_s: float = 10.0) -> None:
        self.client = MasterLink(masters, timeout=10.0)
        self.storage = dict(storage)
        self.read_timeout = read_timeout
        self.penalty_s = penalty_s
        self._records: dict[bytes, dict[str, Any]] = {}
        self._listings: dict[bytes, tuple[float, dict[str, bytes] | None]] = {}
        self._bad: dict[str, float] = {}  # node → until when it is skipped
        self._lock = threading.Lock()  # the masters' client is one set of sockets
        self._links = LinkPool(self.storage, timeout=read_timeout)
        self.counters: dict[str, int] = {"reads": 0, "failovers": 0, "lookups": 0}

    def close(self) -> None:
        self.client.close()
        self._links.close()

    # ---- StorageView -------------------------------------------------------------------------

    def size(self, fid: bytes) -> int | None:
        record = self._record(fid)
        return None if record is None else record["size"]

    def read(self, fid: bytes, offset: int, length: int) -> memoryview:
        record = self._record(fid)
        if record is None:
            raise OSError(errno.ENOENT, f"no file {fid.hex()}")
        errors = []
        now = time.monotonic()
        order = self._sources(fid, record)
        # nodes in their penalty go last, not away: with every node penalised, still try them
        order = [n for n in order if self._bad.get(n, 0) <= now] + [n for n in order if self._bad.get(n, 0) > now]
        for node in order:
            try:
                data, _ = self._links.get(node).read(fid, offset, length)
                self.counters["reads"] += 1
                return memoryview(data)  # a view of the received frame: the cache writes it as is
            except TransferError as exc:
                errors.append(f"{node}: {exc}")
                if exc.status not in (StorageStatus.NOT_FOUND, StorageStatus.OUT_OF_RANGE):
                    # down, slow, or a bad disk there: skip it for a while; a node that simply
                    # lacks this file is fine for others
                    self._bad[node] = time.monotonic() + self.penalty_s
                self._links.drop(node)
                self.counters["failovers"] += 1
                log.warning("read of %s at %d from %s failed (%s); trying the next replica", fid.hex(), offset, node, exc)
        raise OSError(errno.EIO, f"no replica could serve {fid.hex()} at {offset}: {'; '.join(errors)}")

    def jobs(self) -> list[bytes]:
        owners: set[bytes] = set()
        after = None
        while True:
            page = self._ask(lambda: self.client.files(10_000, after=after))
            if page is None:
                break
            for f in page["files"]:
                owners.update(bytes.fromhex(k) for k in f["refs"] if not k.startswith("pinned"))
            if page["next"] is None:
                break
            after = page["next"]
        return sorted(owners)

    def job_files(self, job: bytes) -> dict[str, bytes] | None:
        now = time.monotonic()
        cached = self._listings.get(job)
        if cached is not None and now - cached[0] < LISTING_TTL:
            return cached[1]
        names: dict[str, bytes] | None = {}
        after = None
        while True:
            try:
                page = self._ask(lambda: self.client.files(10_000, owner=job.hex(), after=after), raise_not_found=True)
            except KeyError:
                names = None
                break
            if page is None:
                return cached[1] if cached else None
            for f in page["files"]:
                fid = bytes.fromhex(f["id"])
                names[f["name"]] = fid
                self._records.setdefault(fid, {"size": f["size"], "replicas": f["replicas"]})
            if page["next"] is None:
                break
            after = page["next"]
        self._listings[job] = (now, names)
        return names

    # ---- inside ------------------------------------------------------------------------------

    def _record(self, fid: bytes) -> dict[str, Any] | None:
        """The ledger's record of ``fid``, or None where the masters say there is no such file.
        Masters that do not answer are an error (EIO), not an absence: a task would fail for
        good on ENOENT, and the mount remembers an absence for a while (seen in the chaos soak:
        a tile task failed all its attempts in 0.7 s during a failover). An absence is asked
        again once after ``STALE_READ_S``: a leader cut off from the others answers from its
        own ledger until it steps down, and may not know a file registered since."""
        record = self._records.get(fid)
        if record is not None:
            return record
        for again in (False, True):
            if again:
                time.sleep(STALE_READ_S)  # a FUSE thread of its own waits; the lock is not held
            record = self._lookup(fid).get(fid.hex())
            if record is not None:
                self._records[fid] = record
                return record
        return None

    def _lookup(self, fid: bytes) -> dict[str, Any]:
        with self._lock:
            self.counters["lookups"] += 1
            try:
                answer = self.client.lookup_files([fid])
            except NotFound:
                return {}
            except ClusterError as exc:
                raise OSError(errno.EIO, f"the masters did not answer a lookup of {fid.hex()} ({exc})") from exc
        found = answer.value or {}
        if answer.stale and fid.hex() not in found:  # no leader with a quorum: it may just not know yet
            raise OSError(errno.EIO, f"only a master without a quorum answered a lookup of {fid.hex()}")
        return found

    def _ask(self, call: Any, raise_not_found: bool = False) -> Any:
        with self._lock:
            try:
                return call().value
            except NotFound:
                if raise_not_found:
                    raise KeyError from None
                return None
            except ClusterError as exc:
                log.warning("the masters did not answer (%s)", exc)
                return None

    def _sources(self, fid: bytes, record: dict[str, Any]) -> list[str]:
        # the replicas first, in rendezvous order: readers of one file agree on a first choice
        # (its cache stays warm), and different files spread over the nodes
        listed = rank(fid, [n for n in record.get("replicas", []) if n in self.storage])
        return listed + [n for n in rank(fid, list(self.storage)) if n not in listed]
