"""A storage process: the config, the blob store, the core, its loop, replication and upkeep.

The cluster's TOML file (the masters' file, ``deploy/cluster.example.toml``) gains::

    [storage]
    replicas = 2                 # copies of every file (uploads wait until all are durable)
    scrub_interval_s = 3600      # a full verification pass over every blob, this often
    scrub_rate_mb_s = 64         # at most this much disk read per second by the scrub
    gc_grace_s = 600             # a blob the ledger does not know is deleted after this age
    [storage.nodes.s1]
    address = "tcp://10.0.0.1:5700"

``cluster-storage --config cluster.toml --name s1 --data-dir /var/lib/cluster/s1`` runs one.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from cluster.node.config import ClusterConfig, ConfigError, StorageOptions, load_cluster_config
from cluster.node.keys import node_credentials
from cluster.node.loop import NodeLoop, SocketSpec
from cluster.node.sendqueue import SendQueues
from proto import Limits
from storage.blobs import BlobStore, StoreError
from storage.core import (
    API,
    AbortUpload,
    BeginUpload,
    DiskDone,
    FinishUpload,
    ReadRange,
    Replicate,
    Replicated,
    StorageCore,
    StorageSettings,
    WriteChunk,
)
from storage.maintenance import Maintenance, push
from cluster.node.masterlink import ClusterError, MasterLink
from cluster.node.storagelink import LinkPool, TransferError
from storage.readers import LookupReaders, ReadersKnown

log = logging.getLogger("cluster.storage")


class DiskPerformer:
    """Performs the core's disk effects on a BlobStore, answering each with a DiskDone."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    # Every performer answers: a disk that fails in a way the store does not name (EIO on a
    # write or fsync, EMFILE, a rename that fails) is an error for that one upload or read,
    # never an exception out of the node's loop.

    def begin(self, e: BeginUpload) -> list[Any]:
        try:
            stored = self.store.size(e.file_id)
        except StoreError:
            stored = None  # not stored here (a bad id: begin says so)
        except OSError as exc:
            return [_disk_error(e.token, exc)]
        try:
            if stored is not None:
                if stored != e.size:  # the id fixes the size: the sender's size or id is wrong
                    return [DiskDone(e.token, error=("size_mismatch", f"blob {e.file_id.hex()} is stored with {stored} "
                                                     f"bytes, not {e.size}: the id or the size sent is wrong"))]
                # a fresh grace period before the collector may take it; if it was collected
                # this very moment, store it again
                if self.store.touch(e.file_id):
                    return [DiskDone(e.token, e.size, True)]
            return [DiskDone(e.token, self.store.begin(e.file_id, e.size))]
        except StoreError as exc:
            return [DiskDone(e.token, error=(exc.code, str(exc)))]
        except Exception as exc:
            return [_disk_error(e.token, exc)]

    def write(self, e: WriteChunk) -> list[Any]:
        try:
            return [DiskDone(e.token, self.store.write(e.file_id, e.offset, e.data))]
        except StoreError as exc:
            return [DiskDone(e.token, error=(exc.code, str(exc)))]
        except Exception as exc:
            self._drop_session(e.file_id)
            return [_disk_error(e.token, exc)]

    def finish(self, e: FinishUpload) -> list[Any]:
        try:
            self.store.finish(e.file_id)
            return [DiskDone(e.token, self.store.size(e.file_id))]
        except StoreError as exc:
            return [DiskDone(e.token, error=(exc.code, str(exc)))]
        except Exception as exc:
            self._drop_session(e.file_id)
            return [_disk_error(e.token, exc)]

    def abort(self, e: AbortUpload) -> None:
        try:
            self.store.abort(e.file_id, keep=e.keep)
        except Exception as exc:
            log.error("could not close the upload of %s: %s", e.file_id.hex(), exc)

    def read(self, e: ReadRange) -> list[Any]:
        try:
            size = self.store.size(e.file_id)
            return [DiskDone(e.token, size, self.store.read(e.file_id, e.offset, e.length))]
        except StoreError as exc:
            try:
                size = self.store.size(e.file_id) if exc.code not in ("not_found", "bad_id") else 0
            except (StoreError, OSError):
                size = 0  # deleted meanwhile
            return [DiskDone(e.token, size, error=(exc.code, str(exc)))]
        except Exception as exc:
            return [_disk_error(e.token, exc)]

    def _drop_session(self, file_id: bytes) -> None:
        try:
            self.store.abort(file_id, keep=False)
        except Exception:
            pass  # the partial is unreadable anyway; startup and the collector clear it


def _disk_error(token: int, exc: BaseException) -> DiskDone:
    log.error("disk error: %s: %s", type(exc).__name__, exc)
    return DiskDone(token, error=("io_error", f"the storage node's disk failed ({exc}): try another node; "
                                              "the operator should check its disk"))


DOWN_PENALTY_S = 10.0


class ReaderLookups:
    """Runs the core's LookupReaders effects (storage.readers) on a thread of their own, with a
    link to the masters made there (a ZeroMQ socket stays on the thread that made it), and posts
    ReadersKnown back to the loop. ``close`` ends the thread and the link."""

    def __init__(self, masters: list[str], loop: NodeLoop) -> None:
        self.masters = masters
        self.loop = loop
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="readers")
        self._link: MasterLink | None = None

    def __call__(self, e: LookupReaders) -> None:
        self.pool.submit(self._run, e)

    def _run(self, e: LookupReaders) -> None:
        readers: frozenset[str] | None
        try:
            if self._link is None:
                self._link = MasterLink(self.masters, timeout=5.0)
            record = self._link.lookup_files([e.file_id]).value.get(e.file_id.hex())
            readers = frozenset(record.get("readers", ())) if record else frozenset()
        except (ClusterError, OSError) as exc:
            log.warning("could not ask the masters who may read %s: %s", e.file_id.hex(), exc)
            readers = None
        self.loop.post(ReadersKnown(e.file_id, readers, self.loop.stimulus("readers")))

    def close(self) -> None:
        self.pool.submit(self._close_link).result(timeout=10)
        self.pool.shutdown(wait=True)

    def _close_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None


class Replicator:
    """Runs the core's Replicate effects on threads and posts Replicated back to the loop."""

    def __init__(self, store: BlobStore, name: str, addresses: dict[str, str], loop: NodeLoop, threads: int = 2) -> None:
        self.store = store
        self.name = name
        self.addresses = addresses
        self.loop = loop
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="replicate")
        self.links = LinkPool(addresses)

    def __call__(self, e: Replicate) -> None:
        self.pool.submit(self._run, e)

    def _run(self, e: Replicate) -> None:
        stored: list[str] = []
        failed: dict[str, str] = {}
        try:
            now = time.monotonic()
            # a peer that did not answer lately goes last, and is not waited for again within
            # DOWN_PENALTY_S: one dead node must not cost every upload a connect timeout
            for target in sorted(e.targets, key=lambda t: self.links.down_until.get(t, 0.0) > now):
                if len(stored) >= e.needed:
                    break
                if self.links.down_until.get(target, 0.0) > now:
                    failed[target] = f"did not answer within the last {DOWN_PENALTY_S:g} s"
                    continue
                try:
                    push(self.store, e.file_id, e.size, self.links.get(target), self.name)
                    stored.append(target)
                except Exception as exc:  # whatever fails, the upload must get its answer
                    failed[target] = str(exc)
                    log.warning("replicating %s to %s failed: %s", e.file_id.hex(), target, exc)
                    self.links.drop(target)
                    if isinstance(exc, TransferError) and exc.status is None:
                        self.links.down_until[target] = time.monotonic() + DOWN_PENALTY_S
        finally:
            self.loop.post(Replicated(e.token, tuple(stored), failed, self.loop.stimulus("replicated")))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.links.close()


SEND_QUEUE = 32  # answers queued towards one connection at most (see build_storage)
RECEIVE_QUEUE = 32  # messages queued from one connection at most: twice a full window of 1 MiB chunks
MESSAGE_MAX = 8 << 20  # the largest message a storage node takes: a 4 MiB chunk with room to spare
SEND_BYTES = 64 << 20  # answers' bytes waiting for one connection to read them, whoever it is


def build_storage(config: ClusterConfig, name: str, data_dir: Path, *, fsync: bool = True,
                  settings: StorageSettings | None = None) -> tuple[NodeLoop, list[Any]]:
    """A storage node ready to ``run()``; close the returned closables after it returns."""
    if name not in config.storage_nodes:
        raise ConfigError(f"no storage node named {name!r} in the config (it has {', '.join(config.storage_nodes) or 'none'})")
    credentials = node_credentials(config.security, name, "storage", config.servers())
    store = BlobStore(Path(data_dir), fsync=fsync)
    peers = [n for n in config.storage_nodes if n != name]
    core = StorageCore(name, peers, settings or StorageSettings(), capacity=store.capacity)
    disk = DiskPerformer(store)
    # What one connection can make this node hold, worst case (doc/security.md, "Resource limits"):
    # - received: credit bounds what a well-behaved sender has in flight; one that ignores it
    #   fills RECEIVE_QUEUE messages of at most MESSAGE_MAX (then TCP pushes back): 256 MiB;
    # - sent: SEND_BYTES of answers (and one more) wait for a reader that does not read; beyond,
    #   they are dropped. A well-behaved reader keeps 8 reads of 1 MiB in flight
    #   (storagelink.WINDOW), a worker's read-ahead 16 MiB per link; SEND_QUEUE answers stays
    #   the bound in messages.
    options = {zmq.ROUTER_HANDOVER: 1, zmq.SNDHWM: SEND_QUEUE, zmq.RCVHWM: RECEIVE_QUEUE}
    sockets = [SocketSpec(API, zmq.ROUTER, bind=(config.storage_nodes[name],), options=options)]
    holder: dict[str, Replicator] = {}
    performers: dict[type, Any] = {
        BeginUpload: disk.begin, WriteChunk: disk.write, FinishUpload: disk.finish,
        AbortUpload: disk.abort, ReadRange: disk.read,
        Replicate: lambda e: holder["replicator"](e),
        LookupReaders: lambda e: holder["readers"](e),
    }
    loop = NodeLoop(core, sockets, performers=performers, credentials=credentials,
                    limits=Limits(max_message_bytes=MESSAGE_MAX, max_frame0_bytes=MESSAGE_MAX),
                    send_queues=SendQueues(people_bytes=SEND_BYTES, node_bytes=SEND_BYTES))
    holder["replicator"] = replicator = Replicator(store, name, config.storage_nodes, loop)
    holder["readers"] = readers = ReaderLookups(list(config.masters.values()), loop)
    core.gate.enabled = bool(config.masters)
    if not config.masters:
        log.warning("storage %s: no masters in the config, so reads are not checked against their owners", name)
    upkeep = Maintenance(store, name, config)
    core.upkeep = upkeep.status
    return loop, [replicator, upkeep, readers, store]


def settings_of(options: StorageOptions) -> StorageSettings:
    """The node core's settings from the config's ``[storage]`` table."""
    return StorageSettings(window=int(options.window_mb * (1 << 20)), idle_timeout=options.idle_timeout_s,
                           reserve_per_key=int(options.reserve_per_key_gb * (1 << 30)))


def run_storage(config_path: Path, name: str, data_dir: Path) -> int:
    config = load_cluster_config(config_path)
    loop, closables = build_storage(config, name, data_dir, fsync=config.storage.fsync, settings=settings_of(config.storage))
    upkeep = closables[1]
    upkeep.start()
    try:
        return loop.run()
    finally:
        for c in closables:
            c.close()
