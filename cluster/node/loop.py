"""The node loop: owns ZeroMQ sockets, the poller, the clock, timers and signals for one core.

Theory of operation
-------------------
``NodeLoop.run()`` opens the sockets, feeds ``Started`` to the core, then repeats: poll the
sockets and the signal wake-up pipe until the next timer is due; drain each readable socket (a
bounded batch, so one busy peer cannot starve the others or the timers); fire due timers. Each
message goes through ``Codec.recv``; a malformed one raises ``ProtocolError`` and is *rejected
here*: one log line (what was wrong, which peer sent it), a counter per reason, and an ERROR
reply when the peer is addressable (ROUTER). The core never sees it. STATUS_QUERY is answered
here too, for every node alike, from the loop's runtime facts plus ``core.status()``.

Other threads (a Raft library's, a worker pool's) hand events to the core with ``post()``: the
event is queued and the poll is woken, so every event still reaches the core on the loop's own
thread, one at a time. A ``guard`` (a lock shared with such a thread) is held while the core
handles an event or reports status, so the core may read state that thread mutates. Effects the
runtime does not know (a master's ``Propose``, a storage node's disk operations) go to the
``performers`` given for their type; a performer may return events (the outcome of a disk write),
which the core handles next, before anything else.

Every effect is recorded with its cause in a bounded log, ``history``: (stimulus id, event,
effect, cause), the cause being the effect's own ``cause`` or else the stimulus that produced
it. ``story(stimulus_id)`` reads what one stimulus led to, and the status reply carries the
newest entries, so an operator can ask a live node why it did something. Entries are names and
short words, never messages: a storage node's effects carry megabytes of payload.

Sockets are CURVE-secured with the node's ``credentials`` (``cluster.node.keys``): a bound socket
admits only connections whose key ZAP finds in the allow-list, and every message is checked
again against the live list (its key travels with it as ZAP's User-Id), so a key revoked and
reloaded (SIGHUP) stops at its next message. The core receives the sender's ``Peer`` (name and
role) with each message and authorises it. A message from a key no longer admitted is dropped
here: no reply, one log line, a counter. Failed handshakes (no key, unknown key) are counted
from the sockets' monitors.

On SIGTERM or SIGINT the core gets ``StopRequested`` (its farewells are still sent), then every
socket is closed with a bounded linger and ``run`` returns 0. A core that raises is a bug: the
loop logs the traceback, counts ``core_errors`` and goes on serving; the node stays answerable.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import socket as pysocket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import zmq

from cluster import __version__
from cluster.node.acting import NotAGateway, unwrap
from cluster.node.keys import ZAP_DOMAIN, Credentials, Gatekeeper, KeysError
from cluster.node.history import Entry, describe_effect
from cluster.node.outbox import Outbox
from cluster.node.sendqueue import SendQueues
from cluster.node.signals import SignalPipe
from cluster.node.status import status_reply
from cluster.node.events import (
    CancelTimer,
    Core,
    Forbidden,
    Effect,
    Event,
    Log,
    MessageReceived,
    Peer,
    Refuse,
    Send,
    Started,
    StartTimer,
    Stop,
    StopRequested,
    TimerFired,
)
from proto import Codec, Limits, ProtocolError, Reason, new_node_id
from proto.codec import describe_peer
from proto.errors import EncodeError
from proto.messages import ActFor, Error, MessageBatch, StatusQuery
from zmq.utils.monitor import recv_monitor_message

BATCH = 256  # messages drained from one socket before looking at the others and the timers
LOG_BURST = 20  # rejection lines logged back to back before rate limiting starts
LOG_RATE = 10.0  # rejection lines per second allowed after the burst
HISTORY = 2000  # (stimulus, event, effect, cause) entries kept; the oldest fall off

QUARANTINE_S = 60.0  # how long the messages of a key that sent an oversized one are dropped
OVERSIZE = (Reason.TOO_LARGE, Reason.TOO_MANY_FRAMES)
KEYS_CHECK_S = 1.0  # how often the loop looks whether the allow-list file changed
SWEEP_S = 10.0  # how often the per-peer send queues forget idle peers
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True)
class SocketSpec:
    """One socket of a node: its name (as the core refers to it), ZeroMQ type and endpoints."""

    name: str
    kind: int  # zmq.ROUTER, zmq.DEALER, zmq.PUSH, zmq.PULL …
    bind: tuple[str, ...] = ()
    connect: tuple[str, ...] = ()
    options: dict[int, Any] = field(default_factory=dict)
    server: str | None = None  # the name (in the allow-list) of the node it connects to, when
    # its address is not one the cluster config names (a worker's status port, a probe)


class NodeLoop:
    """Runs one core over real sockets until it stops or a signal arrives."""

    def __init__(
        self,
        core: Core,
        sockets: list[SocketSpec],
        *,
        node_id: int | None = None,
        limits: Limits = Limits(),
        linger_ms: int = 1000,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        guard: Any = None,
        performers: dict[type, Callable[[Any], None]] | None = None,
        credentials: Credentials | None = None,
        send_queues: SendQueues | None = None,
    ) -> None:
        self.core = core
        self.specs = {s.name: s for s in sockets}
        self.node_id = node_id if node_id is not None else new_node_id()
        self.codec = Codec(self.node_id, limits)
        self.limits = limits
        self.linger_ms = linger_ms
        self.log = logger or logging.getLogger(f"cluster.{core.role}")
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.bound: dict[str, list[str]] = {}
        self._ctx: zmq.Context | None = None
        self._sockets: dict[str, zmq.Socket] = {}
        self._by_socket: dict[zmq.Socket, str] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._timer_seq: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._stimuli = itertools.count(1)
        self._stopping = False
        self._signal: str | None = None
        self._started_at = 0.0
        self._log_tokens = float(LOG_BURST)
        self._log_checked = 0.0
        self._suppressed = 0
        self._current: tuple[zmq.Frame | None, int] | None = None  # the message being handled
        self._guard = guard if guard is not None else contextlib.nullcontext()
        self._performers = dict(performers or {})
        self._posted: collections.deque[Event] = collections.deque()  # appended from other threads
        self._wake_w: pysocket.socket | None = None
        self.history: collections.deque[Entry] = collections.deque(maxlen=HISTORY)
        # No credentials: plaintext, for loops that tests build by hand; nodes always pass theirs.
        self.credentials = credentials if credentials is not None else Credentials.plaintext()
        self._authenticator: Any = None
        self._monitors: dict[zmq.Socket, str] = {}
        self._server_keys: dict[str, str] = {}  # socket name -> the key (Z85) of the server it reaches
        self._reload = False
        self._keys_checked = 0.0
        self._forbidden_logged: set[tuple[str, str]] = set()
        # What each ROUTER peer has yet to read, bounded in bytes (cluster.node.sendqueue).
        self.send_queues = send_queues if send_queues is not None else SendQueues(insecure=self.credentials.insecure)
        self._swept = 0.0
        self._quarantined: dict[str, float] = {}  # Z85 key -> until when its messages are dropped
        self._readers: dict[int, Callable[[], list[Event] | None]] = {}  # fd -> what to call when readable
        self._poller: zmq.Poller | None = None
        self._outbox = Outbox()  # the task path's sends, batched per peer at the end of a turn

    def post(self, event: Event) -> None:
        """Queue an event for the core from any thread; the loop handles it promptly."""
        self._posted.append(event)
        wake = self._wake_w
        if wake is not None:
            try:
                wake.send(b"p")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (a wake-up is pending anyway) or closing

    def add_reader(self, fd: int, on_readable: Callable[[], list[Event] | None]) -> None:
        """Call ``on_readable`` on the loop's thread whenever ``fd`` is readable; the events it
        returns reach the core in order. For pipes the node drives itself (a worker's slot
        processes): one thread, no hand-off. Call it on the loop's thread (a performer) or before
        ``run``; the callback must not block (read what is there, return)."""
        self._readers[fd] = on_readable
        if self._poller is not None:
            self._poller.register(fd, zmq.POLLIN)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (before closing it: a closed descriptor in the poller is an error)."""
        if self._readers.pop(fd, None) is not None and self._poller is not None:
            self._poller.unregister(fd)

    def story(self, stimulus_id: str) -> list[Entry]:
        """What the loop did for ``stimulus_id`` (and what named it as cause), oldest first."""
        return [e for e in self.history if stimulus_id in (e.stimulus_id, e.cause)]

    def stimulus(self, kind: str) -> str:
        """A fresh stimulus id, for events built outside the loop (see ``post``)."""
        return self._stimulus(kind)

    # ---- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the core stops or SIGTERM/SIGINT; returns the exit status (0)."""
        self._open()
        pipe = SignalPipe(self._on_signal, self._on_hangup)
        self._wake_w = pipe.write
        try:
            self._started_at = self.clock()
            self._log_checked = self._started_at
            self.log.info(
                "%s %s serving as node %s on %s",
                self.core.role,
                __version__,
                uuid.UUID(int=self.node_id),
                ", ".join(f"{n}={','.join(a)}" for n, a in self.bound.items() if a) or "no bound sockets",
            )
            self._dispatch(Started(self._stimulus("start")))
            poller = zmq.Poller()
            for sock in self._sockets.values():
                if sock.type not in (zmq.PUSH, zmq.PUB):
                    poller.register(sock, zmq.POLLIN)
            # pyzmq's poll reports a plain socket by its file descriptor, not by the object
            # registered: test the fd, or the pipe is never drained and the loop spins.
            wake_fd = pipe.read.fileno()
            poller.register(wake_fd, zmq.POLLIN)
            for monitor in self._monitors:
                poller.register(monitor, zmq.POLLIN)
            for fd in self._readers:
                poller.register(fd, zmq.POLLIN)
            self._poller = poller
            while not self._stopping:
                ready = dict(poller.poll(self._poll_timeout_ms()))
                if wake_fd in ready:
                    pipe.drain()
                if self._reload or self.clock() >= self._keys_checked + KEYS_CHECK_S:
                    self._reload_keys(forced=self._reload)
                    self._reload = False
                if self.clock() >= self._swept + SWEEP_S:
                    self._swept = self.clock()
                    self.send_queues.sweep(self._swept)
                for monitor in self._monitors:
                    if monitor in ready:
                        self._read_monitor(monitor)
                while self._posted and not self._stopping:
                    self._dispatch(self._posted.popleft())
                if self._signal is not None:
                    reason, self._signal = self._signal, None
                    self.log.info("%s received, stopping", reason)
                    self._dispatch(StopRequested(reason, self._stimulus("stop")))
                    self._stopping = True
                    break
                for sock, name in self._by_socket.items():
                    if sock in ready:
                        self._drain(name, sock)
                if self._readers:
                    self._read_fds(ready)
                self._fire_timers()
                if self._outbox:
                    self._flush_outbox()
        finally:
            if self._outbox and self._sockets:
                self._flush_outbox()  # farewells and the last turn's results still go
            self._wake_w = None
            self._poller = None
            pipe.restore()
            self._close()
        self.log.info("%s stopped", self.core.role)
        return 0

    def _on_signal(self, name: str) -> None:
        self._signal = name

    def _on_hangup(self) -> None:
        self._reload = True

    def _open(self) -> None:
        self._ctx = zmq.Context()
        creds = self.credentials
        if creds.insecure:
            self.log.warning("%s runs INSECURE: plaintext, and anyone who reaches its ports is admitted with "
                             "every role ([security] insecure = true)", self.core.role)
        else:
            # ZAP must answer before the first bind: a CURVE server with no ZAP handler admits anyone.
            from zmq.auth.thread import ThreadAuthenticator
            self._authenticator = ThreadAuthenticator(self._ctx, log=logging.getLogger("cluster.zap"))
            self._authenticator.start()
            # The gatekeeper counts on pyzmq's ZAP thread: the key exists before it starts, so the
            # status reply's copy of the counters never sees the dict change size under it.
            self.counters["auth_refused"] = 0
            self._authenticator.configure_curve_callback(ZAP_DOMAIN, Gatekeeper(creds, self.counters, self.log))
        for spec in self.specs.values():
            sock = self._ctx.socket(spec.kind)
            sock.setsockopt(zmq.LINGER, self.linger_ms)
            # The largest legal frame: libzmq drops the connection of a peer whose frame is larger
            # before buffering it. It limits frames, not a multipart message's total (nor its
            # frame count): the codec checks those once libzmq hands the whole message over, and
            # an admitted key that overstepped them is quarantined (see _quarantine).
            sock.setsockopt(zmq.MAXMSGSIZE, max(self.limits.max_message_bytes, self.limits.max_frame0_bytes))
            for opt, value in spec.options.items():
                sock.setsockopt(opt, value)
            self.bound[spec.name] = []
            if spec.bind:
                creds.serve(sock)
                if not creds.insecure:
                    self._monitors[sock.get_monitor_socket(HANDSHAKE_FAILURES)] = spec.name
            for endpoint in spec.bind:
                sock.bind(endpoint)
                self.bound[spec.name].append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            for endpoint in spec.connect:
                creds.connect(sock, endpoint, spec.server)
                if not creds.insecure:
                    self._server_keys[spec.name] = creds.server_key(endpoint, spec.server).decode()
            self._sockets[spec.name] = sock
            self._by_socket[sock] = spec.name

    def _close(self) -> None:
        for monitor, name in self._monitors.items():
            self._sockets[name].disable_monitor()
            monitor.close(linger=0)
        self._monitors.clear()
        for sock in self._sockets.values():
            sock.close(linger=self.linger_ms)
        self._sockets.clear()
        self._by_socket.clear()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ---- events in -----------------------------------------------------------------------

    def _stimulus(self, kind: str) -> str:
        return f"{kind}-{next(self._stimuli)}"

    def _drain(self, name: str, sock: zmq.Socket) -> None:
        router = sock.type == zmq.ROUTER
        for _ in range(BATCH):
            try:
                route, sender, message = self.codec.recv(sock, router=router, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                frame = self.codec.last_frame
                if self._peer(name, frame) is None:
                    continue  # a key no longer admitted: not even an error goes back
                if exc.reason in OVERSIZE:
                    self._quarantine(name, frame)
                self._reject(name, sock, exc)
                continue
            self.counters["messages_in"] += 1
            peer = self._peer(name, self.codec.last_frame)
            if peer is None:
                continue
            if route is not None:
                self.send_queues.heard(name, route, peer.name, peer.role, self.clock())
            if type(message) is ActFor:
                try:
                    sender, message, peer = unwrap(self.codec, message, peer)
                except NotAGateway as exc:
                    self._current = (self.codec.last_frame, sender)
                    self._forbid(Forbidden(name, route, "ActFor", peer, str(exc), "act-for"))
                    self._current = None
                    continue
                except ProtocolError as exc:
                    exc.route, exc.peer = route, describe_peer(self.codec.last_frame, route)
                    self._reject(name, sock, exc)
                    continue
            if type(message) is StatusQuery:
                self._perform(Send(name, status_reply(self, message), route=route, cause="status"))
                continue
            self._current = (self.codec.last_frame, sender)
            if type(message) is MessageBatch:
                self._unbatch(name, sock, route, peer, message)
            else:
                self._dispatch(MessageReceived(name, route, sender, message, self._stimulus("msg"), peer))
            self._current = None
            if self._stopping:
                return

    def _unbatch(self, name: str, sock: zmq.Socket, route: bytes | None, peer: Peer, batch: MessageBatch) -> None:
        """Each message of a MESSAGE_BATCH reaches the core alone, from the batch's sender; a
        malformed item (or one that may not ride a batch) is refused alone."""
        self.counters["batches_in"] += 1
        for item in self.codec.unbatch(batch):
            if isinstance(item, ProtocolError):
                item.route, item.peer = route, describe_peer(self.codec.last_frame, route)
                self._reject(name, sock, item)
                continue
            self.counters["batched_in"] += 1
            sender, message = item
            self._dispatch(MessageReceived(name, route, sender, message, self._stimulus("msg"), peer))
            if self._stopping:
                return

    def _read_fds(self, ready: dict) -> None:
        for fd, on_readable in list(self._readers.items()):
            # a reader (or the events it made) may remove another, or itself, in this pass
            if fd not in ready or self._stopping or self._readers.get(fd) is not on_readable:
                continue
            try:
                events = on_readable()
            except Exception:  # a reader's bug: logged and counted, the node serves on
                self.counters["reader_errors"] += 1
                self.log.exception("%s could not read descriptor %d; the node goes on serving", self.core.role, fd)
                continue
            for event in events or ():
                self._dispatch(event)

    def _peer(self, name: str, frame: zmq.Frame | None) -> Peer | None:
        """Who sent ``frame``, by the key it was authenticated with, if that key is still in the
        live allow-list; None (dropped, counted, logged) if not."""
        creds = self.credentials
        if creds.insecure:
            return creds.peer(None)
        server_key = self._server_keys.get(name)
        if server_key is not None:  # we connected: the peer is the server whose key we pinned
            peer = creds.peer(server_key)
        else:
            user_id = _user_id(frame)
            peer = creds.peer(user_id)
            if peer is not None and self._quarantined and user_id in self._quarantined:
                if self._quarantined[user_id] > self.clock():
                    self.counters["dropped_quarantined"] += 1
                    return None
                del self._quarantined[user_id]
        if peer is not None:
            return peer
        self.counters["refused_revoked_key"] += 1
        if self._may_log():
            self.log.warning("dropped a message on %s from %s: its key is no longer in the allow-list",
                             name, describe_peer(frame, None) if frame is not None else "?")
        return None

    def _quarantine(self, name: str, frame: zmq.Frame | None) -> None:
        """An admitted key sent a message over the size limits: libzmq had to buffer all of it
        (it hands a multipart message over only once whole), so its next messages, for
        ``QUARANTINE_S``, are dropped unread. A ROUTER cannot close one peer's connection; this is
        the closest it comes. A well-behaved client never does it: its codec refuses to send one."""
        user_id = _user_id(frame)
        if not user_id or self.credentials.insecure:
            return
        self._quarantined[user_id] = self.clock() + QUARANTINE_S
        self.counters["quarantined"] += 1
        entry = self.credentials.allow.admit(user_id.encode())
        self.log.warning("key %s (%s) sent an oversized message on %s: its messages are dropped for %g s",
                         entry.name if entry else "?", user_id, name, QUARANTINE_S)

    def _read_monitor(self, monitor: zmq.Socket) -> None:
        """Count (and log, rate-limited) the connections whose CURVE handshake failed: a peer
        with no key or an unknown one. It never got a byte through; ZAP logged unknown keys."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail"}.get(event["event"])
            if kind is None:
                continue
            self.counters[f"handshake_failed.{kind}"] += 1
            self.counters["handshake_failed_total"] += 1
            if kind != "auth" and self._may_log():  # auth: the gatekeeper logged the key already
                self.log.warning("a connection to %s failed its CURVE handshake (%s): a peer without the "
                                 "cluster's keys?", self._monitors[monitor], kind)

    def _reload_keys(self, forced: bool) -> None:
        """Re-read the allow-list on SIGHUP (``forced``), or when the file changed."""
        self._keys_checked = self.clock()
        creds = self.credentials
        if creds.insecure:
            if forced:
                self.log.info("SIGHUP: insecure, no allow-list to reload")
            return
        why = "SIGHUP" if forced else "the allow-list changed"
        try:
            if forced:
                creds.allow.reload()
            elif not creds.allow.refresh():
                return
        except KeysError as exc:
            self.counters["keys_reload_failed"] += 1
            self.log.error("%s: kept the old allow-list: %s", why, exc)
            return
        self.counters["keys_reloaded"] += 1
        self.log.info("%s: reloaded %s: %d keys", why, creds.allow.path, len(creds.allow))

    def _fire_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now and not self._stopping:
            _, seq, name = heapq.heappop(self._timers)
            if self._timer_seq.get(name) != seq:
                continue  # cancelled or restarted
            del self._timer_seq[name]
            self._dispatch(TimerFired(name, self._stimulus(f"timer-{name}")))

    def _poll_timeout_ms(self) -> int:
        if self._posted:
            return 0
        if not self._timers:
            return 1000
        return max(0, min(1000, int((self._timers[0][0] - self.clock()) * 1000) + 1))

    def _dispatch(self, event: Event) -> None:
        followups: list[Event] = [event]
        while followups:
            event = followups.pop(0)
            try:
                with self._guard:
                    effects = self.core.handle(event, self.clock())
            except Exception:
                self.counters["core_errors"] += 1
                self.log.exception("%s core failed on %s; the node goes on serving", self.core.role, type(event).__name__)
                continue
            # posted events and performers' effects are the tiers' own types: causes are optional
            stimulus_id = getattr(event, "stimulus_id", "") or type(event).__name__
            event_name = type(event).__name__
            for effect in effects:
                self.history.append(Entry(stimulus_id, event_name, describe_effect(effect), getattr(effect, "cause", "") or stimulus_id))
                try:
                    result = self._perform(effect)
                except Exception:  # a performer's bug: logged and counted, the node serves on
                    self.counters["performer_errors"] += 1
                    self.log.exception("%s could not perform %s; the node goes on serving", self.core.role, type(effect).__name__)
                    continue
                if result:
                    followups.extend(result)

    # ---- effects out ---------------------------------------------------------------------

    def _perform(self, effect: Effect) -> list[Event] | None:
        if isinstance(effect, Send):
            if self._outbox.holds(effect):
                group = self._outbox.hold(effect)
                if group is not None:
                    self._send_group(group)
                return None
            if self._outbox:
                group = self._outbox.take(effect.socket, effect.route)
                if group is not None:  # what the core said first to this peer goes first
                    self._send_group(group)
            self._send(effect)
        elif isinstance(effect, StartTimer):
            seq = next(self._seq)
            self._timer_seq[effect.name] = seq
            heapq.heappush(self._timers, (self.clock() + effect.delay, seq, effect.name))
        elif isinstance(effect, CancelTimer):
            self._timer_seq.pop(effect.name, None)
        elif isinstance(effect, Refuse):
            exc = ProtocolError(Reason.UNEXPECTED, effect.detail, effect.message_type)
            exc.route = effect.route
            frame, sender = self._current or (None, None)
            exc.peer = describe_peer(frame, effect.route)
            if sender is not None:
                exc.peer += f" (node {uuid.UUID(int=sender)})"
            self._reject(effect.socket, self._sockets[effect.socket], exc, effect.request_id)
        elif isinstance(effect, Forbidden):
            self._forbid(effect)
        elif isinstance(effect, Log):
            self.log.log(effect.level, "%s", effect.text)
        elif isinstance(effect, Stop):
            self.log.info("stopping: %s", effect.reason)
            self._stopping = True
        elif type(effect) in self._performers:
            # A performer may answer at once with events (a disk write's outcome): they reach
            # the core right after this event's effects, before any other message.
            return self._performers[type(effect)](effect)
        else:
            raise TypeError(f"unknown effect {effect!r}")

    def _send(self, effect: Send) -> None:
        """Send one message now, within its peer's byte budget."""
        sock = self._sockets[effect.socket]
        route = effect.route
        if route is not None and self._over_budget(effect):
            return
        try:
            # Never block the loop on a slow or absent peer: a DEALER with no connection
            # (or a full queue) would wait forever. The drop is counted, the core's
            # protocol (heartbeats, credit, retries) is what recovers from it.
            track = False if route is None else partial(self.send_queues.wants_tracker, effect.socket, route)
            tracker, nbytes = self.codec.send(sock, effect.message, route=route, flags=zmq.NOBLOCK, track=track)
            if route is not None:
                self.send_queues.sent(effect.socket, route, tracker, nbytes, self.clock())
            self.counters["messages_out"] += 1
        except zmq.Again:
            self.counters["send_dropped"] += 1
        except zmq.ZMQError as exc:  # e.g. EHOSTUNREACH on a ROUTER with mandatory routing
            self.counters["send_errors"] += 1
            self.log.warning("could not send %s on %s: %s", type(effect.message).__name__, effect.socket, exc)

    def _send_group(self, group: list[Send]) -> None:
        """One peer's held sends: a lone one as itself, more as MESSAGE_BATCHes."""
        if len(group) == 1:
            self._send(group[0])
            return
        try:
            items = self.codec.encode_items([e.message for e in group])
        except EncodeError:  # a core's bug: each goes alone, so the one at fault is named
            for effect in group:
                self._send(effect)
            return
        first = group[0]
        for start, end in self.codec.batch_cuts([len(b) for b in items]):
            if end - start == 1:
                self._send(group[start])
                continue
            self.counters["batches_out"] += 1
            self.counters["batched_out"] += end - start
            self._send(Send(first.socket, MessageBatch(end - start, items[start:end]), first.route, first.cause))

    def _flush_outbox(self) -> None:
        for group in self._outbox.take_all():
            self._send_group(group)

    def _over_budget(self, effect: Send) -> bool:
        """True (the message is dropped, counted, logged rate-limited) if its peer already holds
        its budget of unread bytes (cluster.node.sendqueue)."""
        entry = self.send_queues.blocked(effect.socket, effect.route)
        if entry is None:
            return False
        self.counters["send_dropped"] += 1
        self.counters["send_dropped.peer_queue_bytes"] += 1
        if self._may_log():
            self.log.warning("dropped a %s for key %s on %s: %d bytes already wait for it to read (its budget: %d)",
                             type(effect.message).__name__, entry.name or "?", effect.socket, entry.held, entry.budget)
        return True

    def _reject(self, name: str, sock: zmq.Socket, exc: ProtocolError, request_id: int = 0) -> None:
        self.counters[f"rejected.{exc.reason.name}"] += 1
        self.counters["rejected_total"] += 1
        if self._may_log():
            more = f" ({self._suppressed} similar lines suppressed)" if self._suppressed else ""
            self._suppressed = 0
            self.log.warning("rejected message from %s on %s: %s: %s%s", exc.peer, name, exc.reason.name, exc.detail, more)
        else:
            self._suppressed += 1
            self.counters["rejected_log_suppressed"] += 1
        if exc.route is None or sock.type != zmq.ROUTER:
            return  # only a ROUTER knows whom to answer; a DEALER's peer is a server
        reply = Error(
            request_id=request_id,
            reason=int(exc.reason),
            refers_to=exc.message_type if 0 <= exc.message_type < 256 else 0,
            text=f"{exc.reason.name}: {exc.detail}",
        )
        self._perform(Send(name, reply, route=exc.route, cause="rejected"))

    def _forbid(self, effect: Forbidden) -> None:
        """A peer's key may not send what it sent: counted, logged once per key and message type
        (naming the key and the address), never answered."""
        self.counters["forbidden_total"] += 1
        self.counters[f"forbidden.{effect.message_type}"] += 1
        if effect.reply is not None:
            self._perform(Send(effect.socket, effect.reply, effect.route, effect.cause))
        seen = (effect.peer.name, effect.message_type)
        if seen in self._forbidden_logged or len(self._forbidden_logged) >= 10_000:
            return
        self._forbidden_logged.add(seen)
        frame = (self._current or (None, None))[0]
        where = describe_peer(frame, effect.route) if frame is not None else effect.socket
        key = self.credentials.allow.by_name.get(effect.peer.name)
        self.log.warning("forbidden: %s from key %s (%s) at %s on %s: %s", effect.message_type, effect.peer.name or "?",
                         key.public if key else "?", where, effect.socket, effect.detail)

    def _may_log(self) -> bool:
        """A token bucket, so a peer spraying garbage cannot flood the log."""
        now = self.clock()
        self._log_tokens = min(float(LOG_BURST), self._log_tokens + (now - self._log_checked) * LOG_RATE)
        self._log_checked = now
        if self._log_tokens >= 1.0:
            self._log_tokens -= 1.0
            return True
        return False

def _user_id(frame: zmq.Frame | None) -> str | None:
    """The key (Z85) ZAP authenticated ``frame``'s connection with; None without CURVE."""
    try:
        return frame.get("User-Id") if frame is not None else None
    except zmq.ZMQError:
        return None
