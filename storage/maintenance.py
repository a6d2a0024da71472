"""A storage node's upkeep, on its own thread: scrub, repair, re-replication and collection.

- **Scrub** (ZFS/Ceph style): every ``scrub_interval_s`` each local blob is re-hashed in full,
  at most ``scrub_rate_mb_s`` of disk reads per second so serving is not starved. A blob that
  fails is **repaired** from another replica (those the ledger lists, else any peer): fetched,
  verified by its content id, and renamed over the bad copy; readers never see a half file.
- **Re-replication**: for each local blob the ledger knows, every other replica it lists is
  asked for the file's size; one that answers NOT_FOUND (a node whose disk was replaced) gets a
  fresh copy pushed. A replica that answers CORRUPT repairs itself in its own scrub.
- **Collection**: blobs the ledger does not know (never registered, or released by every job
  and user) are deleted once older than ``gc_grace_s`` (the grace covers an upload whose
  registration is still on its way), and stale partial uploads after ``partial_ttl_s``. Only a
  leader's fresh answer counts: a node that cannot reach the masters deletes nothing.

The decisions are pure functions (``collectable``, ``RateLimit``) tested without threads.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from cluster.node.config import ClusterConfig
from cluster.node.masterlink import ClusterError, MasterLink
from proto.errors import StorageStatus
from proto.fileids import rank
from storage.blobs import BlobStore, StoreError
from cluster.node.storagelink import CHUNK, LinkPool, StorageLink, TransferError

log = logging.getLogger("cluster.storage")

LOOKUP_BATCH = 1000


def collectable(blobs: list[tuple[bytes, float]], known: dict[str, Any], now: float, grace: float) -> list[bytes]:
    """The blobs to delete: unknown to the ledger (``known[hex]`` is None) and older than
    ``grace`` seconds (``now`` and the mtimes on the same wall clock)."""
    return [fid for fid, mtime in blobs if fid.hex() in known and known[fid.hex()] is None and now - mtime > grace]



def push(store: BlobStore, file_id: bytes, size: int, link: StorageLink, origin: str) -> list[str]:
    """Copy a file stored in ``store``  to the node behind
    ``link``: one copy there; dedupe makes it instant when the node has it already."""
    return link.upload(file_id, size, lambda offset, n: store.read(file_id, offset, n), copies=1, origin=origin)


@dataclass
class RateLimit:
    """A token bucket over bytes: ``delay(n, now)`` says how long to wait before reading n."""

    rate: float  # bytes per second
    burst: float
    tokens: float = 0.0
    at: float | None = None

    def delay(self, n: int, now: float) -> float:
        if self.at is None:
            self.at, self.tokens = now, self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Maintenance:
    """The upkeep thread of storage node ``name``; ``start()`` it, ``close()`` to stop."""

    def __init__(self, store: BlobStore, name: str, config: ClusterConfig,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.name = name
        self.config = config
        self.options = config.storage
        self.wall = wall
        self.peers = {n: a for n, a in config.storage_nodes.items() if n != name}
        self.counters: dict[str, int] = {}
        self.last: dict[str, Any] = {"scrub_at": None, "gc_at": None, "error": None}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._masters: MasterLink | None = None
        self._links = LinkPool(self.peers)
        self._down: set[str] = set()

    # ---- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="storage-upkeep", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._links.close()
        if self._masters is not None:
            self._masters.close()

    def status(self) -> dict[str, Any]:
        return {**self.counters, "last_scrub_at": self.last["scrub_at"], "last_gc_at": self.last["gc_at"],
                "last_error": self.last["error"], "masters": bool(self.config.masters)}

    def _run(self) -> None:
        next_gc = self.options.gc_interval_s
        next_scrub = min(self.options.scrub_interval_s, self.options.gc_interval_s)
        started = time.monotonic()
        while not self._stop.is_set():
            elapsed = time.monotonic() - started
            try:
                if elapsed >= next_gc:
                    self.collect()
                    next_gc = elapsed + self.options.gc_interval_s
                if elapsed >= next_scrub:
                    self.scrub()
                    next_scrub = time.monotonic() - started + self.options.scrub_interval_s
            except Exception as exc:  # upkeep must never take the node down
                self._count("errors")
                self.last["error"] = f"{type(exc).__name__}: {exc}"
                log.exception("storage upkeep failed; it runs again next round")
            self._stop.wait(max(0.05, min(next_gc, next_scrub) - (time.monotonic() - started)))

    # ---- scrub and repair ------------------------------------------------------------------

    def scrub(self) -> None:
        """One pass: verify every blob (rate-limited), repair bad ones, re-replicate lost ones."""
        limit = RateLimit(self.options.scrub_rate_mb_s * 1e6, burst=64e6)
        self._down: set[str] = set()  # peers that failed this pass are not asked again in it
        batch: list[bytes] = []
        for fid, _ in list(self.store.ids()):
            if self._stop.is_set():
                return
            try:
                size = self.store.size(fid)
            except (StoreError, OSError):
                continue  # deleted meanwhile
            wait = limit.delay(size, time.monotonic())
            if wait and self._stop.wait(wait):
                return
            try:
                problem = self.store.verify(fid)
            except StoreError as exc:
                if exc.code == "not_found":
                    continue  # deleted meanwhile
                problem = str(exc)
            except OSError as exc:  # unreadable: as bad as corrupt, and one blob must not stop the pass
                problem = f"unreadable: {exc}"
            self._count("blobs_verified")
            self._count("bytes_verified", size)
            if problem is not None:
                self._count("corrupt_found")
                log.warning("scrub: %s is corrupt here (%s); repairing from another replica", fid.hex(), problem)
                try:
                    self.repair(fid)
                except Exception as exc:
                    self._count("repair_failed")
                    log.error("repair of %s failed: %s", fid.hex(), exc)
            batch.append(fid)
            if len(batch) >= LOOKUP_BATCH:
                self._check_replicas(batch)
                batch = []
        if batch:
            self._check_replicas(batch)
        self._count("scrub_passes")
        self.last["scrub_at"] = self.wall()

    def repair(self, fid: bytes) -> bool:
        """Replace the local copy of ``fid`` with a verified one from another replica."""
        record = self._lookup([fid]).get(fid.hex()) if self.config.masters else None
        sources = [n for n in (record or {}).get("replicas", []) if n in self.peers] or list(self.peers)
        for source in sources:
            link = self._links.get(source)
            try:
                size = link.size(fid)
                self.store.replace_from(fid, self._chunks(link, fid, size), size=size)
            except (TransferError, StoreError, OSError) as exc:
                log.warning("repair of %s from %s failed: %s", fid.hex(), source, exc)
                self._links.drop(source)
                continue
            self._count("repaired")
            log.info("repaired %s from %s", fid.hex(), source)
            return True
        self._count("repair_failed")
        log.error("could not repair %s: no other replica could serve a good copy (%s)", fid.hex(), ", ".join(sources) or "no peers")
        return False

    @staticmethod
    def _chunks(link: StorageLink, fid: bytes, size: int) -> Iterator[bytes]:
        offset = 0
        while offset < size:
            data, _ = link.read(fid, offset, min(CHUNK * 4, size - offset))
            if not len(data):
                raise TransferError(f"storage node {link.name} sent nothing at offset {offset} of a {size}-byte file",
                                    None, link.name)
            yield data
            offset += len(data)

    def _check_replicas(self, fids: list[bytes]) -> None:
        if not self.config.masters:
            return
        known = self._lookup(fids)
        for fid in fids:
            record = known.get(fid.hex())
            if not record:
                continue
            if len(record["replicas"]) < self.options.replicas and self.name == min(record["replicas"], default=None):
                self._top_up(fid, record)
            for node in record["replicas"]:
                if node == self.name or node not in self.peers or node in self._down:
                    continue
                link = self._links.get(node)
                try:
                    link.size(fid)
                except TransferError as exc:
                    if exc.status != StorageStatus.NOT_FOUND:
                        if exc.status is None:
                            self._down.add(node)
                        self._links.drop(node)
                        continue  # down or corrupt there: its own scrub or a later pass deals with it
                    try:
                        push(self.store, fid, record["size"], link, self.name)
                        self._count("replicas_recreated")
                        log.info("re-created the replica of %s on %s", fid.hex(), node)
                    except (TransferError, StoreError) as exc2:
                        log.warning("could not re-create %s on %s: %s", fid.hex(), node, exc2)
                        self._links.drop(node)

    def _top_up(self, fid: bytes, record: dict[str, Any]) -> None:
        """A file stored with fewer copies than ``replicas`` (a degraded write while a node was
        down): copy it to the next nodes in its rank and tell the masters. Only the first of its
        holders by name does it, so two holders do not race."""

        have = list(record["replicas"])
        for node in rank(fid, [self.name, *self.peers]):
            if len(have) >= self.options.replicas:
                break
            if node in have or node in self._down:
                continue
            try:
                push(self.store, fid, record["size"], self._links.get(node), self.name)
            except (TransferError, StoreError) as exc:
                log.warning("could not add a copy of %s on %s: %s", fid.hex(), node, exc)
                self._links.drop(node)
                self._down.add(node)
                continue
            have.append(node)
        if len(have) > len(record["replicas"]):
            try:
                self._masters.register_file(fid, record["size"], have)  # adds replicas, no reference
            except ClusterError as exc:
                log.warning("copies of %s made on %s but not registered yet: %s", fid.hex(), ", ".join(have), exc)
                return
            self._count("replicas_added", len(have) - len(record["replicas"]))
            log.info("%s had %d of %d copies; now on %s", fid.hex(), len(record["replicas"]), self.options.replicas,
                     ", ".join(have))

    # ---- collection ------------------------------------------------------------------------

    def collect(self) -> None:
        """Delete blobs nothing refers to (after the grace) and stale partial uploads."""
        self.store.drop_stale_partials(self.options.partial_ttl_s, self.wall())
        if not self.config.masters:
            return
        blobs = list(self.store.ids())
        now = self.wall()
        old = [(fid, mtime) for fid, mtime in blobs if now - mtime > self.options.gc_grace_s]
        for i in range(0, len(old), LOOKUP_BATCH):
            batch = old[i:i + LOOKUP_BATCH]
            known = self._lookup([fid for fid, _ in batch], fresh=True)
            for fid in collectable(batch, known, now, self.options.gc_grace_s):
                # the lookup took time: a dedupe that touched the blob meanwhile keeps it
                if self.store.delete_if_older(fid, now - self.options.gc_grace_s):
                    self._count("collected")
                    log.info("collected %s: no job or pin refers to it", fid.hex())
        self.last["gc_at"] = now

    def _lookup(self, fids: list[bytes], fresh: bool = False) -> dict[str, Any]:
        """The ledger's records of ``fids``; empty when no fresh answer could be had (so
        nothing is collected on a guess)."""
        if self._masters is None:
            self._masters = MasterLink(list(self.config.masters.values()), timeout=5.0)
        try:
            answer = self._masters.lookup_files(fids)
        except ClusterError as exc:
            self.last["error"] = str(exc)
            return {}
        if fresh and answer.stale:
            return {}
        return answer.value

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
