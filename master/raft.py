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
- A full disk, or one that fails, stops the master (``master.diskfull``): pysyncobj keeps an
  entry in memory before writing it, so a master that carried on after a failed write could
  acknowledge what it never persisted. Every write of the journal, the meta file and snapshots
  (made or received) goes through ``stop_for_disk`` on an ``OSError``: one clear line, then
  ``os._exit(EXIT_DISK)``, with nothing else of the process run. pysyncobj grows the journal
  with ``mmap.resize`` (a sparse file): on a full disk the first store into a new page was a
  SIGBUS (tried on a tmpfs). ``_AllocatedFile`` allocates each growth with ``posix_fallocate``
  first, so it is an ENOSPC before anything is written, and the journal is what it was.

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
journal's ``MetaStorer.storeMeta`` and the serializer's ``atomicReplace``, replaced (see above);
the journal module's ``ResizableFile`` (its ``__mm`` and ``__f``) and the ``Serializer`` class
``syncobj`` builds, subclassed; the transport's tick, connect and message hooks
and ``SyncObj``'s election deadline, vote, state, log and last log entry (``_RaftTransport``, faster
failovers and catch-ups).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import pysyncobj.syncobj as _syncobj_module
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
import pysyncobj.tcp_server as _tcp_server_module
import pysyncobj.transport as _transport_module
import pysyncobj.pickle as _pysyncobj_pickle
import pysyncobj.serializer as _serializer_module
import pysyncobj.journal as _journal_module
from pysyncobj.journal import FileJournal, MemoryJournal, MetaStorer, ResizableFile
from pysyncobj.serializer import Serializer
from pysyncobj.monotonic import monotonic as raft_clock  # pysyncobj's deadlines are on its clock
from pysyncobj.syncobj import _RAFT_STATE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import TCPTransport

from master import commands
from master.core import RaftView
from master.diskfull import EXIT_DISK, failure_line, grown_size
from master.ledger import Ledger
from master.ledgerlock import LedgerLock

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


def stop_for_disk(what: str, path: str, exc: OSError) -> NoReturn:
    """Log why (``master.diskfull.failure_line``) and end the process at once with ``EXIT_DISK``.
    ``os._exit``: no other thread may run on, and nothing may be written after a failed write."""
    log.critical(failure_line(what, path, exc.errno, exc.strerror))
    logging.shutdown()  # flushes every handler: the line must reach the log before the process ends
    sys.stderr.flush()
    os._exit(EXIT_DISK)


def durable_replace(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst``, then fsync the directory: the rename survives a power loss."""
    os.replace(src, dst)
    fd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _AllocatedFile(ResizableFile):
    """pysyncobj's journal file with every byte it maps allocated on disk before it is mapped, so a
    full disk is an ENOSPC here, before anything is written, and never a SIGBUS (module docstring)."""

    def __init__(self, fileName: str, initialSize: int = 1024, resizeFactor: float = 2.0,  # noqa: N803 (pysyncobj's)
                 defaultContent: bytes | None = None) -> None:
        self.path = fileName
        self.factor = resizeFactor
        if not os.path.exists(fileName):
            # made whole under another name: a journal cut short by ENOSPC would not open again
            tmp = fileName + ".new"
            with open(tmp, "wb") as f:
                f.write(defaultContent or b"")
                f.flush()
                os.posix_fallocate(f.fileno(), 0, initialSize)
                os.fsync(f.fileno())
            durable_replace(tmp, fileName)
        super().__init__(fileName, initialSize, resizeFactor, defaultContent)
        self._allocate(0, len(self._ResizableFile__mm))  # one written sparse before this class

    def write(self, offset: int, values: bytes) -> None:
        mm = self._ResizableFile__mm
        mapped = len(mm)
        size = grown_size(mapped, offset + len(values), self.factor)
        if size > mapped:
            self._allocate(mapped, size)
            # pysyncobj grows the mapping only while the file (mm.size(): fstat) is too small
            mm.resize(size)
        super().write(offset, values)

    def _allocate(self, start: int, end: int) -> None:
        if end > start:
            os.posix_fallocate(self._ResizableFile__f.fileno(), start, end - start)


_journal_module.ResizableFile = _AllocatedFile  # what FileJournal opens its file with


class _DurableJournal(FileJournal):
    """pysyncobj's file journal, remembering when it holds writes not yet msynced, and stopping the
    process on a write it could not make (``stop_for_disk``)."""

    dirty = False

    def __init__(self, journalFile: str) -> None:  # noqa: N803 (pysyncobj's name)
        self.path = journalFile
        try:
            super().__init__(journalFile)
        except OSError as exc:
            stop_for_disk("open the Raft journal", journalFile, exc)

    def add(self, command: bytes, idx: int, term: int) -> None:
        try:
            super().add(command, idx, term)
        except OSError as exc:
            stop_for_disk("append to the Raft journal", self.path, exc)
        self.dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (pysyncobj's name)
        try:
            super().deleteEntriesFrom(entryFrom)
        except OSError as exc:
            stop_for_disk("truncate the Raft journal", self.path, exc)
        self.dirty = True

    def clear(self) -> None:
        try:
            super().clear()
        except OSError as exc:
            stop_for_disk("clear the Raft journal", self.path, exc)
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            try:
                self.flush()  # mmap.flush(): msync(MS_SYNC)
            except OSError as exc:
                stop_for_disk("sync the Raft journal to disk", self.path, exc)
            self.dirty = False

    def _destroy(self) -> None:
        try:
            super()._destroy()
        except OSError as exc:
            stop_for_disk("sync the Raft journal to disk", self.path, exc)


def _replace_or_stop(src: str, dst: str) -> None:
    try:
        durable_replace(src, dst)
    except OSError as exc:
        stop_for_disk("rename a ledger snapshot into place", dst, exc)


def _store_meta(self: MetaStorer, meta: dict) -> None:
    """pysyncobj's ``MetaStorer.storeMeta`` (term, vote, commit index), durable before it returns."""
    path = self.getPath()
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(_pysyncobj_pickle.dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        durable_replace(path + ".tmp", path)
    except OSError as exc:
        stop_for_disk("store the Raft term, vote and commit index", path, exc)


MetaStorer.storeMeta = _store_meta  # type: ignore[method-assign]
_serializer_module.atomicReplace = _replace_or_stop  # what pysyncobj renames a snapshot with


class _DurableSerializer(Serializer):
    """pysyncobj's snapshot serializer, writing a snapshot received from the leader itself: pysyncobj
    logs a failed write of one and goes on without it (the leader sends it again, and again), and
    renames it into place without an fsync."""

    def __init__(self, fileName: str | None, *args: Any) -> None:  # noqa: N803 (pysyncobj's name)
        super().__init__(fileName, *args)
        self.path = fileName
        self.incoming: Any = None

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802 (pysyncobj's name)
        if self.path is None or data is None:
            return super().setTransmissionData(data)
        chunk, first, last = data
        tmp = self.path + ".1.tmp"
        try:
            if first:
                if self.incoming is not None:
                    self.incoming.close()
                self.incoming = open(tmp, "wb")
            elif self.incoming is None:
                return False
            self.incoming.write(chunk)
            if not last:
                return False
            self.incoming.flush()
            os.fsync(self.incoming.fileno())
            self.incoming.close()
            self.incoming = None
            durable_replace(tmp, self.path)
            return True
        except OSError as exc:
            stop_for_disk("write the ledger snapshot received from the leader", tmp, exc)


_syncobj_module.Serializer = _DurableSerializer  # what SyncObj.__init__ builds its serializer with

_journals = threading.local()

APPEND_ENTRIES_BYTES = 32 << 20  # see SyncObjConf below; under AUTHENTICATED_MAX
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

    connect_started = 0.0

    def connect(self, host: str, port: int) -> bool:
        self.connect_started = time.monotonic()
        return super().connect(host, port)

    def check_idle(self, connect_within: float) -> None:
        """Drop the connection if it has read nothing for its timeout (pysyncobj checks only when
        it sends or polls it), or if it is still connecting after ``connect_within``: a SYN lost
        in a partition is otherwise retried on the kernel's backoff (1, 2, 4 s...), long after
        the partition healed. The transport connects again (``connectionRetryTime``)."""
        if self.state == CONNECTION_STATE.CONNECTING and time.monotonic() - self.connect_started > connect_within:
            self.disconnect()
        else:
            self._TcpConnection__processConnectionTimeout()  # type: ignore[attr-defined]

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


KEEPALIVE = {"type": "keepalive"}  # not a Raft message: SyncObj ignores a type it does not know


class _RaftTransport(TCPTransport):
    """pysyncobj's TCP transport with the journal msynced before any Raft message leaves (see the
    module docstring), and three changes that make a failover one election, not two or three.

    - **Idle links are kept alive.** pysyncobj drops a connection that has read nothing for
      ``connectionTimeout``, but notices only when it next sends on it or polls it. Two followers
      never speak until one campaigns, so the candidate's first RequestVote went out on a link
      idle since the last election: the send found it timed out, closed it, and the vote was
      lost; the other follower's timer then fired in the same term (a split vote). Now a master
      sends a keepalive on a link where it has sent nothing for ``connectionTimeout / 4`` (only
      follower-to-follower links: appends and their answers keep the others busy).
    - **Dead links are noticed on the tick**, not only at the next send: a leader cut off from
      the others stops counting them as connected within ``connectionTimeout``, so it does not
      campaign while cut off (it used to, once, right after stepping down), and its term stays
      below the new leader's. A connect whose SYN was lost in the cut is retried every
      ``connectionRetryTime``, not on the kernel's backoff. And a leaderless master whose link
      comes up waits one election timeout before campaigning, so the leader's appends reach it
      first: after a heal the old leader rejoins as a follower and deposes nobody.
    - **A refused vote hurries the master that can win** (Raft §5.2 leaves the timeouts to the
      implementation; this only moves a timer): a master that knows no leader and refuses a
      candidate whose log is behind its own, or that is itself a candidate in that term and wins
      the tie-break (the more up-to-date log, then the higher id), campaigns at the next tick
      instead of waiting out its 0.4-0.8 s timer. A master that knows a leader (the leader
      included) never hurries: a stale candidate of the leader's own term deposes nobody. With the cut applied to one follower
      a little before the other, the first to time out often has the shorter log and cannot
      win; and under load both timers often fire together.
    - **A follower whose log ends in entries the leader does not have points the leader back
      past them at once** (the conflicting term's first index, Raft §5.3's optimisation), and
      keeps pointing there until an append fits. pysyncobj's follower answers a conflict with
      "from prevLogIdx" and an append beyond its log with "from my end + 1", while its leader
      streams every batch of a tick (64 KiB each) and obeys the last answer: with more than one
      batch in flight, the later batches' "end + 1" undid the first one's step back, for good.
      The follower stayed stuck until the leader's next compaction sent it a snapshot (up to
      300 s: the chaos soak's stalls; doc/masters.md). The hint never points below the
      follower's commit index, and a lower next index only makes the leader resend entries.
    """

    journal: Any = None

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803 (pysyncobj's names)
        self._linked: set[Any] = set()  # partners whose connection is up, its handshake done
        self._last_sent: dict[Any, float] = {}
        self._campaign = 0  # the last term this master asked votes for (one log line per campaign)
        self._resend_from: dict[Any, int] = {}  # leader -> where our log stops matching the leader's (a hint)
        super().__init__(syncObj, selfNode, otherNodes)

    def send(self, node: Any, message: Any) -> bool:
        journal = self.journal
        if journal is not None and getattr(journal, "dirty", False):
            journal.sync()
        if message.get("type") == "request_vote" and message["term"] != self._campaign:
            self._campaign = message["term"]
            log.info("raft: campaigning in term %d", message["term"])
        if message.get("type") == "next_node_idx":
            message = self._steer(node, message)
        self._last_sent[node] = time.monotonic()
        return super().send(node, message)

    def _steer(self, node: Any, message: dict) -> dict:
        """Our answer to an append: a refusal names the lowest conflict found since the last
        append that fitted (the class docstring); an append that fitted ends the search."""
        if message["success"]:
            self._resend_from.pop(node, None)
        elif message["reset"] and node in self._resend_from:
            message = {**message, "next_node_idx": min(message["next_node_idx"], self._resend_from[node])}
        return message

    def _note_conflict(self, node: Any, message: dict) -> None:
        """Before pysyncobj reads an append: if our entry at its prevLogIdx has another term than
        the leader's, remember the first index of our entries that cannot be the leader's either
        (terms only grow along a log: ours from the first with a term >= min(our term there,
        the leader's + 1)), never at or below our commit index."""
        prev = message.get("prevLogIdx")
        if prev is None or message.get("transmission") not in (None, "finish"):
            return
        r = self._syncObj
        entries = r._SyncObj__raftLog  # noqa: SLF001 (a list of (command, index, term))
        first = entries[0][1]
        if message["term"] < r._getTerm() or not first <= prev <= entries[-1][1]:
            return
        mine = entries[prev - first][2]
        if mine == message["prevLogTerm"]:
            return
        low, high = max(r.raftCommitIndex + 1, first + 1), prev
        if low > high:
            return  # nothing above our commit index to point at: pysyncobj's own answer stands
        bound = min(mine, message["prevLogTerm"] + 1)
        while low < high:
            mid = (low + high) // 2
            if entries[mid - first][2] >= bound:
                high = mid
            else:
                low = mid + 1
        self._resend_from[node] = min(low, self._resend_from.get(node, low))

    def _onTick(self) -> None:  # noqa: N802 (pysyncobj's name; called on the Raft thread every tick)
        super()._onTick()
        conf = self._syncObj.conf
        for conn in list(self._connections.values()):
            if conn.state != CONNECTION_STATE.DISCONNECTED:
                conn.check_idle(conf.connectionRetryTime)
        now, idle = time.monotonic(), conf.connectionTimeout / 4
        for node in list(self._linked):
            if now - self._last_sent.get(node, 0.0) >= idle:
                self._last_sent[node] = now
                TCPTransport.send(self, node, KEEPALIVE)  # nothing of the journal's in it: no msync

    def _onNodeConnected(self, node: Any) -> None:  # noqa: N802
        self._linked.add(node)
        super()._onNodeConnected(node)
        r = self._syncObj
        if r._getLeader() is None and not r._isLeader():
            # Back from a partition, leaderless: give the leader one election timeout to reach
            # us (its link may come up a little after this one) before campaigning; an expired
            # timer would otherwise campaign at once and depose it.
            timeout = r.conf.raftMinTimeout + (r.conf.raftMaxTimeout - r.conf.raftMinTimeout) * random.random()
            r._SyncObj__raftElectionDeadline = max(r._SyncObj__raftElectionDeadline,  # noqa: SLF001
                                                   raft_clock() + timeout)

    def _onNodeDisconnected(self, node: Any) -> None:  # noqa: N802
        self._linked.discard(node)
        super()._onNodeDisconnected(node)

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if message == KEEPALIVE:
            return  # reading it was the point: the link's idle clock restarted
        if message.get("type") == "append_entries":
            self._note_conflict(node, message)
        if message.get("type") != "request_vote":
            return super()._onMessageReceived(node, message)
        r = self._syncObj
        mine = (r._SyncObj__getCurrentLogTerm(), r._SyncObj__getCurrentLogIndex())  # noqa: SLF001
        theirs = (message["last_log_term"], message["last_log_index"])
        rival = (r._SyncObj__raftState == _RAFT_STATE.CANDIDATE and message["term"] == r._getTerm()  # noqa: SLF001
                 and (*mine, r.selfNode.id) > (*theirs, node.id))
        super()._onMessageReceived(node, message)
        # only where no leader is known now: a follower of a live leader, or the leader, refusing a
        # stale candidate of their own term must not depose that leader
        leaderless = r._getLeader() is None and message["term"] == r._getTerm()
        behind = theirs < mine
        if leaderless and (behind or rival) and r._SyncObj__votedForNodeId != node.id:  # noqa: SLF001
            log.info("raft: %s asked for votes in term %d %s: campaigning at once", node, message["term"],
                     "with a shorter log" if behind else "too (a split vote)")
            r._SyncObj__raftElectionDeadline = 0  # noqa: SLF001


class _Replica(SyncObj):
    def __init__(self, adapter: "RaftAdapter", self_address: str, partners: list[str], conf: SyncObjConf) -> None:
        self._adapter = adapter
        super().__init__(self_address, partners, conf, transportClass=_RaftTransport)

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
        self.lock = LedgerLock()
        self.self_address = self_address
        self.on_result = on_result or (lambda token, result, index: None)
        self.on_failure = on_failure or (lambda token, reason: None)
        self.apply_errors = 0
        self.last_snapshot: dict[str, Any] | None = None
        journal = snapshot = None
        if data_dir is not None:
            try:
                data_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                stop_for_disk("make the data directory", str(data_dir / "raft.journal"), exc)
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
            # An entry at or above appendEntriesBatchSizeBytes goes in pieces ("transmission"):
            # pysyncobj pickles with protocol 2 (bytes >= 0x80 double) yet marks the last piece
            # by the unpickled length, so followers failed with "pickle data was truncated"
            # (bench/dispatch.py, issue 23: ~1,900 errors per master and a lost quorum once
            # group commit made entries of ~100 KiB). master.batching keeps entries under
            # ENTRY_MAX_BYTES, far below APPEND_ENTRIES_BYTES, so that path is never taken; it
            # also bounds one AppendEntries to a follower catching up (AUTHENTICATED_MAX).
            **{"appendEntriesBatchSizeBytes": APPEND_ENTRIES_BYTES, **DEFAULT_TIMINGS, **(timings or {})},
        )
        self.replica = _Replica(self, self_address, partners, conf)
        self.replica._SyncObj__transport.journal = getattr(_journals, "last", None)  # noqa: SLF001

    # ---- the Raft thread -------------------------------------------------------------------

    def _apply(self, data: bytes) -> Any:
        entry = commands.decode(data)
        with self.lock.first():
            try:
                return self.ledger.apply(entry)
            except Exception:  # a ledger bug must not kill the Raft thread; every master logs it
                self.apply_errors += 1
                log.exception("the ledger failed to apply an entry; it is skipped on this master")
                return None

    def _write_snapshot(self, path: str, raft_data: Any) -> None:
        with self.lock.first():
            state = self.ledger.snapshot()
            applied = self.ledger.state.applied
        raft = pickle.dumps(raft_data, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with open(path, "wb") as f:
                f.write(SNAPSHOT_MAGIC + struct.pack("<QQ", len(raft), len(state)))
                f.write(raft)
                f.write(state)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # pysyncobj would log it and try again at the next compaction
            stop_for_disk("write a ledger snapshot", path, exc)
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
        with self.lock.first():
            # both halves: the work specs and units live beside the state (ledger.work), and a
            # restore that kept the old ones lost every spec of the snapshot (or kept stale ones)
            self.ledger.state = restored.state
            self.ledger.work = restored.work
        self.last_snapshot = {"bytes": n_state, "commands_applied": restored.state.applied,
                              "log_index": raft_data[0][1], "restored": True}
        log.info("ledger restored from snapshot (%d bytes, log index %d)", n_state, raft_data[0][1])
        return raft_data

    # ---- the loop thread -------------------------------------------------------------------

    def propose(self, entry: commands.Entry, token: int, data: bytes | None = None) -> None:
        """Replicate ``entry`` (``data``: its encoding, if made already); ``on_result(token,
        result, log_index)`` or ``on_failure(token, reason)`` is called later, on the Raft thread."""
        if data is None:
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
