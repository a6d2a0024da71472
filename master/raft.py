"""The one adapter between the master and pysyncobj (Raft).

Theory of operation
-------------------
pysyncobj runs Raft on its own thread (``autoTick``) over its own TCP connections between the
masters' Raft addresses. The ledger is replicated through one method, ``_Replica.apply(bytes)``,
whose argument is an encoded ``master.commands`` entry; pysyncobj calls it on every master in log
order once the entry is committed, holding ``lock`` so the loop thread never reads a ledger
half-way through a command. The proposer's callback (result or failure) is handed back to the
node loop, which turns it into a ``Committed``/``ProposalFailed`` event for the core.

Durability, beyond pysyncobj's defaults:
- The journal is pysyncobj's mmap'd file journal with a flush added: every append marks it
  dirty, and the transport msyncs it before any Raft message leaves the node. So an entry is on
  disk before this master acknowledges it to a leader (follower) or sends it out to be
  acknowledged (leader): what a quorum acknowledged survives a power loss, not just a SIGKILL.
- Snapshots (pysyncobj's "full dump", taken at log compaction) are our own format: the ledger's
  exact MessagePack snapshot plus pysyncobj's small bookkeeping tuple, written to a temporary
  file, fsynced, then atomically renamed by pysyncobj. A master with an empty disk receives the
  leader's snapshot over Raft and restores the ledger from it.
- The term and the vote (pysyncobj's journal "meta" file) are written before a vote leaves the
  node, but pysyncobj neither fsyncs the file nor the directory after renaming it into place, and
  renames a snapshot without fsyncing the directory: after a power loss a master could vote
  twice in one term, or lose a snapshot it had already truncated its journal for. ``durable_replace``
  (rename, then fsync the directory) and ``_store_meta`` (write, fsync, ``durable_replace``)
  replace pysyncobj's, for this process (``tests/integration/test_raft_durability.py`` reads
  the syscalls with strace).

Security: pysyncobj pickles what it sends and unpickles what it receives, so a byte from a
stranger must never reach it.
- ``password`` (the masters' shared secret) makes pysyncobj encrypt and authenticate every
  message (Fernet: an HMAC-SHA256 checked before decryption, let alone unpickling). A master
  refuses to start without one unless the config says ``insecure = true`` (master.node).
- The Raft port binds exactly the configured address (pysyncobj binds 0.0.0.0 unless told).
- A message's 4-byte length prefix is not authenticated: a stranger could announce 2 GiB and
  make a master buffer it. ``_BoundedConnection`` allows ``UNAUTHENTICATED_MAX`` bytes before a
  connection's first message has been authenticated (the handshake is tiny) and
  ``AUTHENTICATED_MAX`` after, never buffers more than that plus one read, and drops the
  connection on a prefix beyond the bound.

pysyncobj private API used here, in one place: ``_getLeader``, ``_isLeader``, ``_getTerm``,
``_getRaftLogSize``, ``getStatus()`` keys, the module-level ``createJournal`` factory, and the
journal's ``MetaStorer.storeMeta`` and the serializer's ``atomicReplace``, replaced (see above).
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import threading
from pathlib import Path
from typing import Any, Callable

import pysyncobj.syncobj as _syncobj_module
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
import pysyncobj.tcp_server as _tcp_server_module
import pysyncobj.transport as _transport_module
import pysyncobj.pickle as _pysyncobj_pickle
import pysyncobj.serializer as _serializer_module
from pysyncobj.journal import FileJournal, MemoryJournal, MetaStorer
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

from master import commands
from master.core import RaftView
from master.ledger import Ledger

log = logging.getLogger("cluster.master.raft")

FAILURES = {
    v: k.lower() for k, v in vars(FAIL_REASON).items() if k.isupper() and isinstance(v, int)
}
SNAPSHOT_MAGIC = b"CZLEDGER1"

# Timings that make a failover take well under 2 s here (measured in bench/ledger.py); the
# defaults (5 s connection retries, 30 s leader fallback) made 5-30 s outages.
DEFAULT_TIMINGS = {
    "raftMinTimeout": 0.4,
    "raftMaxTimeout": 0.8,
    "appendEntriesPeriod": 0.05,
    "connectionTimeout": 1.0,
    "connectionRetryTime": 0.3,
    "leaderFallbackTimeout": 1.0,
}


class _DurableJournal(FileJournal):
    """pysyncobj's file journal, remembering when it holds writes not yet msynced."""

    dirty = False

    def add(self, command: bytes, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self.dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (pysyncobj's name)
        super().deleteEntriesFrom(entryFrom)
        self.dirty = True

    def clear(self) -> None:
        super().clear()
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            self.flush()  # mmap.flush(): msync(MS_SYNC)


def durable_replace(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst``, then fsync the directory: the rename survives a power loss."""
    os.replace(src, dst)
    fd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_meta(self: MetaStorer, meta: dict) -> None:
    """pysyncobj's ``MetaStorer.storeMeta`` (term, vote, commit index), durable before it returns."""
    path = self.getPath()
    with open(path + ".tmp", "wb") as f:
        f.write(_pysyncobj_pickle.dumps(meta))
        f.flush()
        os.fsync(f.fileno())
    durable_replace(path + ".tmp", path)


MetaStorer.storeMeta = _store_meta  # type: ignore[method-assign]
_serializer_module.atomicReplace = durable_replace  # what pysyncobj renames a snapshot with

_journals = threading.local()

UNAUTHENTICATED_MAX = 64 << 10  # bytes a connection may announce before its first good message
# After it: one Raft message, at most a batch of commands the client API accepted (64 MiB of
# frames) with pysyncobj's framing around it.
AUTHENTICATED_MAX = 80 << 20


class _BoundedConnection(TcpConnection):
    """pysyncobj's TCP connection with its unauthenticated length prefix bounded (see above).
    Overrides two of TcpConnection's private methods, by their mangled names."""

    authenticated = False
    refused = 0  # connections dropped for an oversized prefix, all of them (for the status)

    def _TcpConnection__processRead(self) -> bool:  # noqa: N802 (pysyncobj's name)
        more = TcpConnection._TcpConnection__processRead(self)  # type: ignore[attr-defined]
        buffered = self._TcpConnection__readBuffer  # type: ignore[attr-defined]
        if len(buffered) < 4:
            return more
        limit = AUTHENTICATED_MAX if self.authenticated else UNAUTHENTICATED_MAX
        (length,) = struct.unpack_from("i", buffered)  # pysyncobj's own framing: native int
        if not 0 <= length <= limit:
            _BoundedConnection.refused += 1
            log.warning("Raft connection from %s dropped: it announced a %d-byte message (at most %d %s)",
                        self._peer(), length, limit, "once authenticated" if self.authenticated else "before authenticating")
            self.disconnect()
            return False
        # parse what is whole before reading more: the buffer never exceeds a message and a read
        return more and len(buffered) <= length + 4

    def _peer(self) -> str:
        try:
            host, port = self._TcpConnection__socket.getpeername()[:2]  # type: ignore[attr-defined]
            return f"{host}:{port}"
        except (OSError, AttributeError, ValueError):
            return "?"

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802 (pysyncobj's name)
        message = TcpConnection._TcpConnection__processParseMessage(self)  # type: ignore[attr-defined]
        if message is not None:
            self.authenticated = True  # it decrypted and its HMAC checked (with a password)
        return message


# pysyncobj's server and transport build their connections from these module globals.
_tcp_server_module.TcpConnection = _BoundedConnection
_transport_module.TcpConnection = _BoundedConnection


def _create_journal(journal_file: str | None):
    journal = _DurableJournal(journal_file) if journal_file else MemoryJournal()
    _journals.last = journal
    return journal


# pysyncobj builds its journal through this module-level factory in SyncObj.__init__.
_syncobj_module.createJournal = _create_journal


class _SyncingTransport(TCPTransport):
    """Msync the journal before any Raft message leaves (see the module docstring)."""

    journal: Any = None

    def send(self, node: Any, message: Any) -> bool:
        journal = self.journal
        if journal is not None and getattr(journal, "dirty", False):
            journal.sync()
        return super().send(node, message)


class _Replica(SyncObj):
    def __init__(self, adapter: "RaftAdapter", self_address: str, partners: list[str], conf: SyncObjConf) -> None:
        self._adapter = adapter
        super().__init__(self_address, partners, conf, transportClass=_SyncingTransport)

    @replicated
    def apply(self, data: bytes) -> Any:
        return self._adapter._apply(data)


class RaftAdapter:
    """Replicates ``ledger`` among the masters at ``self_address`` + ``partners`` (Raft addresses
    ``host:port``), persisting under ``data_dir``."""

    def __init__(
        self,
        ledger: Ledger,
        self_address: str,
        partners: list[str],
        data_dir: Path | None,
        *,
        on_result: Callable[[int, Any, int], None] | None = None,
        on_failure: Callable[[int, str], None] | None = None,
        password: str | None = None,
        snapshot_every: int = 20_000,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.ledger = ledger
        self.lock = threading.Lock()
        self.self_address = self_address
        self.on_result = on_result or (lambda token, result, index: None)
        self.on_failure = on_failure or (lambda token, reason: None)
        self.apply_errors = 0
        self.last_snapshot: dict[str, Any] | None = None
        journal = snapshot = None
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            journal = str(data_dir / "raft.journal")
            snapshot = str(data_dir / "ledger.snapshot")
        conf = SyncObjConf(
            autoTick=True,
            appendEntriesUseBatch=False,  # our core batches; each proposal goes out at once
            journalFile=journal,
            fullDumpFile=snapshot,
            serializer=self._write_snapshot if snapshot else None,
            deserializer=self._read_snapshot if snapshot else None,
            logCompactionMinEntries=snapshot_every,
            commandsWaitLeader=False,  # fail fast (MISSING_LEADER) rather than queue unboundedly
            password=password,
            bindAddress=self_address,  # exactly the configured address; pysyncobj's default is 0.0.0.0
            **{**DEFAULT_TIMINGS, **(timings or {})},
        )
        self.replica = _Replica(self, self_address, partners, conf)
        self.replica._SyncObj__transport.journal = getattr(_journals, "last", None)  # noqa: SLF001

    # ---- the Raft thread -------------------------------------------------------------------

    def _apply(self, data: bytes) -> Any:
        entry = commands.decode(data)
        with self.lock:
            try:
                return self.ledger.apply(entry)
            except Exception:  # a ledger bug must not kill the Raft thread; every master logs it
                self.apply_errors += 1
                log.exception("the ledger failed to apply an entry; it is skipped on this master")
                return None

    def _write_snapshot(self, path: str, raft_data: Any) -> None:
        with self.lock:
            state = self.ledger.snapshot()
            applied = self.ledger.state.applied
        raft = pickle.dumps(raft_data, protocol=pickle.HIGHEST_PROTOCOL)
        with open(path, "wb") as f:
            f.write(SNAPSHOT_MAGIC + struct.pack("<QQ", len(raft), len(state)))
            f.write(raft)
            f.write(state)
            f.flush()
            os.fsync(f.fileno())
        self.last_snapshot = {"bytes": len(state), "commands_applied": applied, "log_index": raft_data[0][1]}
        log.info("snapshot written: %d bytes of ledger at log index %d", len(state), raft_data[0][1])

    def _read_snapshot(self, path: str) -> Any:
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(SNAPSHOT_MAGIC):
            raise ValueError(f"{path} is not a ledger snapshot")
        offset = len(SNAPSHOT_MAGIC)
        n_raft, n_state = struct.unpack_from("<QQ", data, offset)
        offset += 16
        raft_data = pickle.loads(data[offset : offset + n_raft])
        restored = Ledger.restore(data[offset + n_raft : offset + n_raft + n_state])
        with self.lock:
            # both halves: the work specs and units live beside the state (ledger.work), and a
            # restore that kept the old ones lost every spec of the snapshot (or kept stale ones)
            self.ledger.state = restored.state
            self.ledger.work = restored.work
        self.last_snapshot = {"bytes": n_state, "commands_applied": restored.state.applied,
                              "log_index": raft_data[0][1], "restored": True}
        log.info("ledger restored from snapshot (%d bytes, log index %d)", n_state, raft_data[0][1])
        return raft_data

    # ---- the loop thread -------------------------------------------------------------------

    def propose(self, entry: commands.Entry, token: int) -> None:
        """Replicate ``entry``; ``on_result(token, result, log_index)`` or ``on_failure(token,
        reason)`` is called later, on the Raft thread."""
        data = commands.encode(entry)

        def done(result: Any, error: int) -> None:
            if error == FAIL_REASON.SUCCESS:
                self.on_result(token, result, self.replica.raftLastApplied)
            else:
                self.on_failure(token, FAILURES.get(error, str(error)))

        self.replica.apply(data, callback=done)

    def view(self) -> RaftView:
        """Role, term, leader and indices as the core needs them (read without Raft's lock:
        each field is one attribute read; a torn view is at most one tick old)."""
        r = self.replica
        leader = r._getLeader()
        role = "leader" if r._isLeader() else ("follower" if leader is not None else "candidate")
        return RaftView(
            role=role,
            term=r._getTerm(),
            leader=str(leader.address) if leader is not None else None,
            has_quorum=bool(r.hasQuorum),
            commit_index=r.raftCommitIndex,
            last_applied=r.raftLastApplied,
            log_size=r._getRaftLogSize(),
        )

    def detail(self) -> dict[str, Any]:
        """Per-peer health and the last snapshot, for STATUS_REPLY (pysyncobj's getStatus())."""
        status = self.replica.getStatus()
        peers = {}
        for key, value in status.items():
            if key.startswith("partner_node_status_server_"):
                address = key[len("partner_node_status_server_"):]
                peers[address] = {
                    "connected": value == 2,
                    "match_index": status.get(f"match_idx_server_{address}"),
                    "next_index": status.get(f"next_node_idx_server_{address}"),
                }
        return {
            "raft_address": self.self_address,
            "peers": peers,
            "last_snapshot": self.last_snapshot,
            "apply_errors": self.apply_errors,
            # Raft connections dropped for announcing more than the bound (this process's)
            "connections_refused": _BoundedConnection.refused,
        }

    def close(self) -> None:
        """Stop the Raft thread and close the journal."""
        self.replica.destroy_synchronous()
