"""The link to the masters: requests to the leader, with leader discovery, retries and deadlines.

Every client of the ledger uses it: the user's ``Client``, and the nodes that read or write the
file registry (a storage node's upkeep, a worker's view of the files).

Theory of operation
-------------------
The link holds one DEALER per master (``ZMQ_IMMEDIATE``: nothing queues towards a master that
is down, a send there fails at once and the link moves on). A request goes to the master
believed to lead; the answer decides what next:

- NOT_LEADER with an address: go there. NOT_LEADER without one (an election), UNAVAILABLE (no
  quorum) or OUTCOME_UNKNOWN (the leader was lost mid-commit): back off (50 ms, doubling to
  0.5 s) and try the next master.
- No answer within ``attempt_timeout``: the master is presumed down; try the next one.
- Anything else is the answer.

A write the leader leaves unanswered for ``attempt_timeout / 5`` may be stuck at a leader that
has lost its quorum and does not know it yet (it steps down only after Raft's leader fallback,
and the followers may have elected another by then). So the link asks the other masters who
leads (a FILE_LOOKUP of no file: any master answers it at once, from memory, with the leader it
knows), once per that interval while a write waits. When the answer names another
master, the writes waiting at the old one go there at once (a retried submit keeps its
idempotency key: never doubled) instead of waiting out ``attempt_timeout``. A leader that is
merely slow is named by the others and left alone.

Reads go to the leader when one is known, else to any master; the answer says ``stale`` when it
did not come from a leader with a quorum (it may be behind). Past the ``timeout`` deadline the
link raises ``NoQuorum`` with what each master said, in words a user can act on. ``run`` keeps a
window of requests in flight, which is what makes bulk submission fast.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import zmq

from cluster.node import keys
from cluster.node.acting import wrap
from cluster.node.events import PEOPLE
from proto import AppReason, Codec, ProtocolError, new_node_id
from proto.ids import join128, split128
from proto.messages import Error, FileList, FileLookup, FileRegister, FileRelease, NotLeader, QueryReply
from proto.types import Message

RETRYABLE = {AppReason.UNAVAILABLE, AppReason.OUTCOME_UNKNOWN}
WRITERS = PEOPLE | {"storage"}  # the roles whose keys may write to the ledger (master.core.ROLES)


class ClusterError(Exception):
    """Something the user should read: the message says what happened and what to do."""


class NoQuorum(ClusterError):
    """No master leader could take the request before the deadline."""


class Refused(ClusterError):
    """The masters refused the request; nothing changed. ``code`` is stable (e.g. ``spec_too_large``)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


class NotFound(ClusterError):
    """No such job or task."""

@dataclass(frozen=True)
class Answer:
    """A read's value; ``stale`` when no leader with a quorum answered (it may be behind)."""

    value: Any
    stale: bool
    term: int
    leader: str | None


@dataclass
class Call:
    """One request to the masters and its progress through retries."""

    make: Callable[[int], Message]
    write: bool
    target: int
    request_id: int = 0
    sent_at: float | None = None
    not_before: float = 0.0
    backoff: float = 0.05
    tries: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    result: Any = None
    error: Exception | None = None
    done: bool = False
    stale_retry: bool = False


@dataclass(frozen=True)
class Probe:
    """A question to master ``asked``: who leads? (``target``: where the stalled writes wait)."""

    asked: int
    target: int
    sent_at: float

class MasterLink:
    """Requests to the masters at ``masters`` (their client API addresses): ``timeout`` is the
    deadline of one request, retries included; ``attempt_timeout`` how long one master may stay
    silent before the next is tried."""

    def __init__(self, masters: Sequence[str], *, timeout: float = 30.0, attempt_timeout: float = 1.0,
                 credentials: keys.Credentials | None = None) -> None:
        if not masters:
            raise ClusterError("no master addresses given: pass masters=['tcp://host:port', ...]")
        self.masters = list(masters)
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.leader = 0  # index of the master believed to lead
        self._ctx = zmq.Context()
        self._codec = Codec(new_node_id())
        self._sockets: list[zmq.Socket] = []
        for address in self.masters:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            keys.connect(sock, address, credentials)
            self._sockets.append(sock)
        # A key whose role may not write is told so here: the masters answer it nothing.
        creds = self.credentials = credentials or keys.for_address(self.masters[0])
        entry = None if creds.insecure else creds.allow.by_name.get(creds.name)
        self._read_only = entry.role if entry is not None and entry.role not in WRITERS else None
        self._ids = itertools.count(random.getrandbits(40))
        self.probe_after = max(0.05, attempt_timeout / 5)  # a write unanswered this long: ask who leads

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._ctx.term()

    def __enter__(self) -> "MasterLink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the file registry --------------------------------------------------------------------

    def register_file(self, file_id: bytes, size: int, replicas: Sequence[str], *, owner: str | None = None,
                      name: str = "", pin: bool = False) -> dict[str, Any]:
        """Record a durable file in the ledger, referred to by job ``owner`` or a user ``pin``."""
        upper, lower = split128(file_id)
        job = id_bytes(owner) if owner else None
        return self.request(lambda rid: FileRegister(rid, upper, lower, size, int(pin), list(replicas), job, name), write=True).value

    def release_files(self, file_id: str | None = None, *, owner: str | None = None) -> dict[str, Any]:
        """Drop ``owner``'s reference (a job; None: the user pin) on a file, or on every file of
        ``owner``. A file nothing refers to any more is deleted by the storage nodes."""
        fid = id_bytes(file_id) if file_id else None
        job = id_bytes(owner) if owner else None
        return self.request(lambda rid: FileRelease(rid, fid, job), write=True).value

    def lookup_files(self, file_ids: Sequence[bytes]) -> Answer:
        """The ledger's records (size, replicas, refs) of ``file_ids``, by hex id; None if unknown."""
        ids = list(file_ids)
        return self.request(lambda rid: FileLookup(rid, ids), write=False)

    def files(self, limit: int = 100, *, owner: str | None = None, after: str | None = None) -> Answer:
        """Registered files in id order (of one job with ``owner``); ``value["next"]`` pages on."""
        job = id_bytes(owner) if owner else None
        start = id_bytes(after) if after else None
        return self.request(lambda rid: FileList(rid, limit, job, start), write=False)

    # ---- the engine ---------------------------------------------------------------------------

    def call(self, make: Callable[[int], Message], write: bool) -> Call:
        """A request to run (``make(request_id)`` builds each try's message), aimed at the leader."""
        return Call(make, write, self.leader)

    def request(self, make: Callable[[int], Message], write: bool) -> Any:
        """One request, retried until it is answered or the deadline passes; an ``Answer`` for a
        read, the reply for a write. Raises NoQuorum, Refused or NotFound."""
        call = Call(make, write, self.leader)
        self.run([call], 1, None)
        if call.error is not None:
            raise call.error
        if isinstance(call.result, QueryReply):
            r = call.result
            return Answer(r.value, bool(r.stale), r.term, r.leader)
        return call.result

    def run(self, calls: list[Call], window: int, progress: Callable[[int], None] | None) -> None:
        """Run ``calls`` with up to ``window`` in flight; each ends with ``result`` or ``error``."""
        deadline = time.monotonic() + self.timeout
        if self._read_only is not None:
            for call in calls:
                if call.write:
                    call.error, call.done = Refused("forbidden", f"your key has role {self._read_only}, which may not "
                                                                 "change the ledger: ask an operator for a client key "
                                                                 "(cluster keys add NAME --role client)"), True
            calls = [c for c in calls if not c.write]
        waiting = list(reversed(calls))  # popped from the end: input order
        in_flight: dict[int, Call] = {}
        probes: dict[int, Probe] = {}  # request id -> who-leads question in flight
        done = 0
        poller = zmq.Poller()
        for sock in self._sockets:
            poller.register(sock, zmq.POLLIN)
        while waiting or in_flight:
            now = time.monotonic()
            if now > deadline:
                for call in list(in_flight.values()) + waiting:
                    call.error = self._deadline_error(call)
                return
            held = []
            while waiting and len(in_flight) < window:
                call = waiting.pop()
                if call.not_before > now:
                    held.append(call)
                    continue
                if self._send(call, now):
                    in_flight[call.request_id] = call
                else:
                    held.append(call)
            waiting.extend(reversed(held))
            wait_ms = 20 if waiting else int(min(self.attempt_timeout / 4, self.probe_after / 2) * 1000) + 1
            for sock, _ in poller.poll(wait_ms):
                for _ in range(1024):
                    try:
                        _, _, reply = self._codec.recv(sock, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ProtocolError:
                        continue
                    rid = getattr(reply, "request_id", -1)
                    call = in_flight.pop(rid, None)
                    if call is None:  # an answer to a try we gave up on, or to a probe
                        if rid in probes:
                            waiting += self._on_probe(probes.pop(rid), reply, in_flight)
                        continue
                    self._on_reply(call, reply, time.monotonic())
                    if call.done:
                        done += 1
                        if progress is not None:
                            progress(done)
                    else:
                        waiting.append(call)
            now = time.monotonic()
            for rid, call in list(in_flight.items()):
                if now - call.sent_at > self.attempt_timeout:
                    del in_flight[rid]
                    call.notes[self.masters[call.target]] = f"no answer within {self.attempt_timeout:g} s"
                    call.target = (call.target + 1) % len(self.masters)
                    waiting.append(call)
            self._probe(in_flight, probes, now)

    def _probe(self, in_flight: dict[int, Call], probes: dict[int, Probe], now: float) -> None:
        """Ask the other masters who leads when a write has waited ``probe_after`` (module docstring)."""
        for rid, p in list(probes.items()):
            if now - p.sent_at > self.attempt_timeout:
                del probes[rid]  # unanswered: that master is down or busy; the next probe asks again
        stalled = next((c for c in in_flight.values() if c.write and now - c.sent_at > self.probe_after), None)
        if stalled is None or len(self.masters) < 2 or any(now - p.sent_at < self.probe_after for p in probes.values()):
            return
        for asked in range(len(self.masters)):
            if asked == stalled.target:
                continue
            rid = next(self._ids)
            try:
                message = wrap(self._codec, FileLookup(rid, []), self.credentials.act_for)
                self._codec.send(self._sockets[asked], message, flags=zmq.NOBLOCK)
            except zmq.Again:  # not connected: that one cannot say
                continue
            probes[rid] = Probe(asked, stalled.target, now)

    def _on_probe(self, probe: Probe, reply: Message, in_flight: dict[int, Call]) -> list[Call]:
        """The writes to send again, to the leader ``probe``'s answer names, if another than theirs."""
        leader = reply.leader if isinstance(reply, QueryReply) else None
        if leader not in self.masters or self.masters.index(leader) == probe.target:
            return []
        self.leader = self.masters.index(leader)
        moved = []
        for rid, call in list(in_flight.items()):
            if call.write and call.target == probe.target:
                del in_flight[rid]
                call.notes[self.masters[probe.target]] = (f"no answer; {self.masters[probe.asked]} said {leader} "
                                                          f"leads (term {reply.term})")
                call.target = self.leader
                moved.append(call)
        return moved

    def _send(self, call: Call, now: float) -> bool:
        call.request_id = next(self._ids)
        call.tries += 1
        try:
            message = wrap(self._codec, call.make(call.request_id), self.credentials.act_for)
            self._codec.send(self._sockets[call.target], message, flags=zmq.NOBLOCK)
        except zmq.Again:  # not connected (IMMEDIATE): that master is down or starting
            call.notes[self.masters[call.target]] = "not reachable"
            call.target = (call.target + 1) % len(self.masters)
            if call.target == self.leader:
                call.not_before = now + call.backoff
                call.backoff = min(call.backoff * 2, 0.5)
            return False
        call.sent_at = now
        return True

    def _on_reply(self, call: Call, reply: Message, now: float) -> None:
        here = self.masters[call.target]
        if isinstance(reply, NotLeader):
            call.notes[here] = f"not the leader (term {reply.term})"
            if reply.leader in self.masters:
                call.target = self.leader = self.masters.index(reply.leader)
            else:
                call.target = (call.target + 1) % len(self.masters)
                self._back_off(call, now)
            return
        if isinstance(reply, Error):
            code = reply.detail.get("code", "") if isinstance(reply.detail, dict) else ""
            if reply.reason in RETRYABLE:
                call.notes[here] = reply.text
                call.target = (call.target + 1) % len(self.masters)
                self._back_off(call, now)
                return
            leader = reply.detail.get("leader") if isinstance(reply.detail, dict) else None
            if reply.reason == AppReason.NOT_FOUND and self._ask_leader(call, leader):
                return  # a follower's "not found" may be one it has not applied yet: the leader's decides
            call.done = True
            if reply.reason == AppReason.NOT_FOUND:
                call.error = NotFound(reply.text)
            else:
                call.error = Refused(code or "refused", reply.text)
            return
        if isinstance(reply, QueryReply) and reply.stale and self._ask_leader(call, reply.leader):
            return  # a follower answered: ask the leader once
        if call.write:
            self.leader = call.target
        call.result = reply
        call.done = True

    def _ask_leader(self, call: Call, leader: str | None) -> bool:
        """Aim ``call`` at ``leader`` (a follower's answer named it) once; False when it was
        asked already, is unknown, or is the master that answered."""
        if call.stale_retry or leader not in self.masters or self.masters.index(leader) == call.target:
            return False
        call.stale_retry = True
        call.target = self.leader = self.masters.index(leader)
        return True

    @staticmethod
    def _back_off(call: Call, now: float) -> None:
        call.not_before = now + call.backoff * (0.5 + random.random())
        call.backoff = min(call.backoff * 2, 0.5)

    def _deadline_error(self, call: Call) -> ClusterError:
        said = "; ".join(f"{m}: {why}" for m, why in call.notes.items()) or "no master answered"
        majority = len(self.masters) // 2 + 1
        if call.write:
            return NoQuorum(
                f"no master leader took the request within {self.timeout:g} s ({said}). Writes need a majority "
                f"({majority} of {len(self.masters)}) of masters up and connected; start the stopped ones "
                "(`cluster status` shows which) and retry: a retried submit with the same key is never doubled."
            )
        return NoQuorum(f"no master answered within {self.timeout:g} s ({said}); are the masters running?")


def id_bytes(hex_id: str) -> bytes:
    """A job or file id written as 32 hex digits, as 16 bytes; ClusterError if it is not one."""
    return join128(*split_id(hex_id))


def split_id(hex_id: str) -> tuple[int, int]:
    try:
        value = bytes.fromhex(hex_id)
    except ValueError:
        raise ClusterError(f"{hex_id!r} is not an id (32 hex digits)") from None
    if len(value) != 16:
        raise ClusterError(f"{hex_id!r} is not an id (32 hex digits)")
    return split128(value)
