"""The Binary Star pair as a pure state machine (zguide chapter 4, "High-Availability Pair
(Binary Star Pattern)").

Theory of operation
-------------------
Two balancers, a *primary* and a *backup*, heartbeat each other with their state. Each starts
in its configured role (PRIMARY or BACKUP) and settles into ACTIVE (serving masters and
workers) or PASSIVE (standing by) from what it hears. Everything that moves the state lives in
``TRANSITIONS`` below, one rule per (role, state, event): the code only looks rules up and
carries them out (as h11's ``_state.py`` does). The rules, as zguide's finite state machine
draws them, with our departures marked:

- PRIMARY hearing a BACKUP (or a PASSIVE) peer becomes ACTIVE; hearing an ACTIVE peer it
  becomes PASSIVE (the backup took over while the primary was away: it stays in charge). A
  primary alone serves a client that turns to it once it has heard its peer or the peer stayed
  silent past ``peer_expiry`` (it becomes ACTIVE): a cluster may start without its backup.
- BACKUP hearing an ACTIVE peer becomes PASSIVE. Until it hears the primary it refuses
  clients, unless the primary stays silent past ``peer_expiry`` (it never came up): then, like
  a PASSIVE one, it serves a client that turns to it (zguide's backup always refuses: ours).
- PASSIVE hearing the peer restart (PRIMARY or BACKUP) becomes ACTIVE: the peer will go passive.
- PASSIVE takes over only when BOTH the peer has been silent past ``peer_expiry`` AND a client
  (a master or a worker) turns to it. Silence alone is not enough: if the link between the two
  balancers breaks but the active one still serves its clients, nobody turns to the passive
  one and it stays passive. That is the split-brain guard.
- Two ACTIVEs (a heal after a partition in which both served) would be split brain. zguide
  aborts; we resolve it deterministically: the backup steps down to PASSIVE, the primary stays
  ACTIVE, and it is counted and logged. Fencing by epoch at the masters makes the stale side's
  assignments harmless either way.
- Two PASSIVEs would leave nobody serving (zguide aborts): the primary becomes ACTIVE.
- An ACTIVE one that reaches no worker while its peer hears them (ours; zguide has no such
  rule). Each heartbeat says how many workers its sender has registered. A balancer cut off
  from every worker, but not from its peer, purges them and announces 0; the workers turn to
  the passive one, which zguide's rule refuses (the peer is not silent), so all work would stall
  for as long as the cut lasts. So a peer that has announced ACTIVE with 0 workers for a whole
  liveness period counts as *stranded*, and a client turning to the passive one then makes it
  take over (``CLIENT_PEER_STRANDED``), as silence would. The stranded one hears the new active
  one announce workers while it has none (``PEER_ACTIVE_SERVING``) and steps down, whichever
  role it has, and the new one, hearing the reverse (``PEER_ACTIVE_IDLE``), keeps serving: of
  two actives, the side with the workers serves; where both or neither have some, the backup
  steps down as before. Only a client's turn can start this,
  as with silence, so a pair whose workers reach neither side does not flap.
- Every other event changes nothing and is ignored, as in zguide; the table says so with an
  ``IGNORE`` rule, so that it covers every state a role can be in and every event. A state the
  role cannot be in (a backup in PRIMARY) has no rules: an event there is a
  ``BinaryStarError``.

A client turning to this balancer is one of four events, decided before the table is read:
the peer was never heard and its first ``peer_expiry`` is still ahead (``CLIENT_PEER_UNKNOWN``),
it is silent past ``peer_expiry`` (``CLIENT_PEER_SILENT``), it is heard but stranded
(``CLIENT_PEER_STRANDED``), or heard and serving (``CLIENT_PEER_ALIVE``). Likewise a heartbeat
saying ACTIVE is ``PEER_ACTIVE_SERVING`` when it announces workers and this one has none, and
``PEER_ACTIVE_IDLE`` the other way round. zguide tests ``now >= peer_expiry`` inside its
CLIENT_REQUEST handlers; naming the outcomes keeps the table pure data.

A heartbeat is news only while it is fresh. A PUB socket and the kernel hold what the peer sent
while the link was cut and deliver it all when it heals: seconds-old heartbeats saying "active,
with workers" would make a backup step down that has since taken over those workers. Each
heartbeat carries its sender's clock; ``fresh`` keeps the least lag seen (now minus that clock:
the clocks' offset plus the link's delay) and drops a heartbeat that arrives more than a
liveness period later than that, which is no newer than silence. The least lag is forgotten
when the peer restarts (its sequence starts again), so a peer on a host with another clock is
measured afresh.

Everything is a method taking ``now``; no clock, sockets or threads (tests drive every
transition directly). The balancer's loop sends ``heartbeat()`` every ``interval`` seconds
and feeds what it hears to ``on_peer`` and what its clients send to ``on_client``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple


class State(enum.IntEnum):
    """A balancer's state as it travels in heartbeats (stable codes)."""

    PRIMARY = 1  # configured primary, not yet settled
    BACKUP = 2  # configured backup, not yet settled
    ACTIVE = 3  # serving
    PASSIVE = 4  # standing by


class Role(enum.Enum):
    """The role a balancer is configured with (``primary = true`` or ``false``)."""

    PRIMARY = "primary"
    BACKUP = "backup"


class StarEvent(enum.Enum):
    """What a balancer of the pair may learn (zguide's PEER_* and CLIENT_REQUEST events)."""

    PEER_PRIMARY = "peer_primary"  # the peer's heartbeat said PRIMARY
    PEER_BACKUP = "peer_backup"
    PEER_ACTIVE = "peer_active"
    PEER_PASSIVE = "peer_passive"
    CLIENT_PEER_UNKNOWN = "client_peer_unknown"  # a client turned here; the peer never heard, not yet expired
    CLIENT_PEER_ALIVE = "client_peer_alive"  # ... the peer heard within its liveness
    CLIENT_PEER_SILENT = "client_peer_silent"  # ... the peer silent past peer_expiry
    CLIENT_PEER_STRANDED = "client_peer_stranded"  # ... the peer heard, active with no worker for a period
    PEER_ACTIVE_SERVING = "peer_active_serving"  # the peer is active with workers and this one has none
    PEER_ACTIVE_IDLE = "peer_active_idle"  # the peer is active with no worker and this one has some


class Action(enum.Enum):
    """What a rule does besides setting the state."""

    IGNORE = "ignore"  # nothing: the event does not change this state (zguide ignores it)
    SETTLE = "settle"  # a heartbeat moves the state
    DUAL_ACTIVE = "dual_active"  # both sides active: counted; the backup steps down
    DUAL_PASSIVE = "dual_passive"  # both sides passive: counted; the primary serves
    SERVE = "serve"  # serve the client
    REFUSE = "refuse"  # refuse the client (counted as clients_refused)
    TAKE_OVER = "take_over"  # serve the client, taking over from a silent peer (counted)


class Rule(NamedTuple):
    """One row of the table: the state after the event, what to do, and why (for the log;
    ``{silence}`` is the peer's liveness period in seconds)."""

    new: State
    action: Action
    why: str


# Actions that serve the client, and the counter each action bumps (before any change of state).
SERVING: frozenset[Action] = frozenset({Action.SERVE, Action.TAKE_OVER})
ACTION_COUNTERS: dict[Action, str] = {
    Action.DUAL_ACTIVE: "dual_active",
    Action.DUAL_PASSIVE: "dual_passive",
    Action.REFUSE: "clients_refused",
    Action.TAKE_OVER: "takeovers",
}

PEER_EVENTS: dict[State, StarEvent] = {
    State.PRIMARY: StarEvent.PEER_PRIMARY,
    State.BACKUP: StarEvent.PEER_BACKUP,
    State.ACTIVE: StarEvent.PEER_ACTIVE,
    State.PASSIVE: StarEvent.PEER_PASSIVE,
}

_PR, _BK, _AC, _PA = State.PRIMARY, State.BACKUP, State.ACTIVE, State.PASSIVE
_E = StarEvent
_IGNORE, _SETTLE, _SERVE, _REFUSE, _TAKE_OVER = Action.IGNORE, Action.SETTLE, Action.SERVE, Action.REFUSE, Action.TAKE_OVER
_TAKING_OVER = "peer silent for {silence:g} s and a client turned to this one: taking over"
_STRANDED = "the active peer has reached no worker for {silence:g} s and a worker turned to this one: taking over"
_YIELD = "both sides active: the peer has the workers and this one none, so it stands by"
_KEEP = "both sides active: this one has the workers and the peer none, so it keeps serving"

# The whole machine: role -> (state, event) -> rule. zguide chapter 4, "Binary Star", its state
# chart and bstar.c's s_execute_fsm, with the departures listed in the module docstring.
TRANSITIONS: dict[Role, dict[tuple[State, StarEvent], Rule]] = {
    Role.PRIMARY: {
        (_PR, _E.PEER_PRIMARY): Rule(_PR, _IGNORE, "two primaries: a misconfiguration, nothing settles"),
        (_PR, _E.PEER_BACKUP): Rule(_AC, _SETTLE, "peer is backup: this primary serves"),
        (_PR, _E.PEER_ACTIVE): Rule(_PA, _SETTLE, "peer is active (it took over): this primary stands by"),
        (_PR, _E.PEER_PASSIVE): Rule(_AC, _SETTLE, "peer is passive: this primary serves"),
        (_PR, _E.CLIENT_PEER_UNKNOWN): Rule(_PR, _REFUSE, "give the backup its chance to show up first"),
        (_PR, _E.CLIENT_PEER_ALIVE): Rule(_AC, _SERVE, "a client turned to this primary and no backup answers: it serves"),
        (_PR, _E.CLIENT_PEER_SILENT): Rule(_AC, _SERVE, "a client turned to this primary and no backup answers: it serves"),
        (_PR, _E.CLIENT_PEER_STRANDED): Rule(_AC, _SERVE, "a client turned to this primary and no backup answers: it serves"),
        (_PR, _E.PEER_ACTIVE_SERVING): Rule(_PA, _SETTLE, "peer is active (it took over): this primary stands by"),
        (_PR, _E.PEER_ACTIVE_IDLE): Rule(_PA, _SETTLE, "peer is active (it took over): this primary stands by"),
        (_AC, _E.PEER_PRIMARY): Rule(_AC, _IGNORE, "already serving"),
        (_AC, _E.PEER_BACKUP): Rule(_AC, _IGNORE, "already serving"),
        (_AC, _E.PEER_ACTIVE): Rule(_AC, Action.DUAL_ACTIVE, "both sides active: the primary keeps serving"),
        (_AC, _E.PEER_PASSIVE): Rule(_AC, _IGNORE, "already serving"),
        (_AC, _E.CLIENT_PEER_UNKNOWN): Rule(_AC, _SERVE, "serving"),
        (_AC, _E.CLIENT_PEER_ALIVE): Rule(_AC, _SERVE, "serving"),
        (_AC, _E.CLIENT_PEER_SILENT): Rule(_AC, _SERVE, "serving"),
        (_AC, _E.CLIENT_PEER_STRANDED): Rule(_AC, _SERVE, "serving"),
        (_AC, _E.PEER_ACTIVE_SERVING): Rule(_PA, Action.DUAL_ACTIVE, _YIELD),
        (_AC, _E.PEER_ACTIVE_IDLE): Rule(_AC, Action.DUAL_ACTIVE, _KEEP),
        (_PA, _E.PEER_PRIMARY): Rule(_AC, _SETTLE, "peer restarted as primary: this one serves"),
        (_PA, _E.PEER_BACKUP): Rule(_AC, _SETTLE, "peer restarted as backup: this one serves"),
        (_PA, _E.PEER_ACTIVE): Rule(_PA, _IGNORE, "the peer serves"),
        (_PA, _E.PEER_ACTIVE_SERVING): Rule(_PA, _IGNORE, "the peer serves"),
        (_PA, _E.PEER_ACTIVE_IDLE): Rule(_PA, _IGNORE, "the peer serves"),
        (_PA, _E.CLIENT_PEER_STRANDED): Rule(_AC, _TAKE_OVER, _STRANDED),
        (_PA, _E.PEER_PASSIVE): Rule(_AC, Action.DUAL_PASSIVE, "both sides passive: the primary serves"),
        (_PA, _E.CLIENT_PEER_UNKNOWN): Rule(_PA, _REFUSE, "the peer may still serve"),
        (_PA, _E.CLIENT_PEER_ALIVE): Rule(_PA, _REFUSE, "the peer serves: the client should turn to it"),
        (_PA, _E.CLIENT_PEER_SILENT): Rule(_AC, _TAKE_OVER, _TAKING_OVER),
    },
    Role.BACKUP: {
        (_BK, _E.PEER_PRIMARY): Rule(_BK, _IGNORE, "the backup waits for the primary to settle"),
        (_BK, _E.PEER_BACKUP): Rule(_BK, _IGNORE, "two backups: a misconfiguration, nothing settles"),
        (_BK, _E.PEER_ACTIVE): Rule(_PA, _SETTLE, "peer is active: this backup stands by"),
        (_BK, _E.PEER_PASSIVE): Rule(_AC, _SETTLE, "peer is passive: this backup serves"),
        (_BK, _E.CLIENT_PEER_UNKNOWN): Rule(_BK, _REFUSE, "the primary may still come up"),
        (_BK, _E.CLIENT_PEER_ALIVE): Rule(_BK, _REFUSE, "the primary answers: the client should turn to it"),
        (_BK, _E.CLIENT_PEER_SILENT): Rule(_AC, _TAKE_OVER, _TAKING_OVER),
        (_BK, _E.CLIENT_PEER_STRANDED): Rule(_AC, _TAKE_OVER, _STRANDED),
        (_BK, _E.PEER_ACTIVE_SERVING): Rule(_PA, _SETTLE, "peer is active: this backup stands by"),
        (_BK, _E.PEER_ACTIVE_IDLE): Rule(_PA, _SETTLE, "peer is active: this backup stands by"),
        (_AC, _E.PEER_PRIMARY): Rule(_AC, _IGNORE, "already serving"),
        (_AC, _E.PEER_BACKUP): Rule(_AC, _IGNORE, "already serving"),
        (_AC, _E.PEER_ACTIVE): Rule(_PA, Action.DUAL_ACTIVE, "both sides active (a healed partition): the backup steps down"),
        (_AC, _E.PEER_PASSIVE): Rule(_AC, _IGNORE, "already serving"),
        (_AC, _E.CLIENT_PEER_UNKNOWN): Rule(_AC, _SERVE, "serving"),
        (_AC, _E.CLIENT_PEER_ALIVE): Rule(_AC, _SERVE, "serving"),
        (_AC, _E.CLIENT_PEER_SILENT): Rule(_AC, _SERVE, "serving"),
        (_AC, _E.CLIENT_PEER_STRANDED): Rule(_AC, _SERVE, "serving"),
        (_AC, _E.PEER_ACTIVE_SERVING): Rule(_PA, Action.DUAL_ACTIVE, _YIELD),
        (_AC, _E.PEER_ACTIVE_IDLE): Rule(_AC, Action.DUAL_ACTIVE, _KEEP),
        (_PA, _E.PEER_PRIMARY): Rule(_AC, _SETTLE, "peer restarted as primary: this one serves"),
        (_PA, _E.PEER_BACKUP): Rule(_AC, _SETTLE, "peer restarted as backup: this one serves"),
        (_PA, _E.PEER_ACTIVE): Rule(_PA, _IGNORE, "the peer serves"),
        (_PA, _E.PEER_ACTIVE_SERVING): Rule(_PA, _IGNORE, "the peer serves"),
        (_PA, _E.PEER_ACTIVE_IDLE): Rule(_PA, _IGNORE, "the peer serves"),
        (_PA, _E.CLIENT_PEER_STRANDED): Rule(_AC, _TAKE_OVER, _STRANDED),
        (_PA, _E.PEER_PASSIVE): Rule(_PA, Action.DUAL_PASSIVE, "both sides passive: the primary will serve"),
        (_PA, _E.CLIENT_PEER_UNKNOWN): Rule(_PA, _REFUSE, "the peer may still serve"),
        (_PA, _E.CLIENT_PEER_ALIVE): Rule(_PA, _REFUSE, "the peer serves: the client should turn to it"),
        (_PA, _E.CLIENT_PEER_SILENT): Rule(_AC, _TAKE_OVER, _TAKING_OVER),
    },
}

# The states each role can be in: the table has a rule for each of them and every event.
ROLE_STATES: dict[Role, frozenset[State]] = {
    Role.PRIMARY: frozenset({_PR, _AC, _PA}),
    Role.BACKUP: frozenset({_BK, _AC, _PA}),
}


class BinaryStarError(RuntimeError):
    """An event in a state the table has no rule for: this side of the pair is corrupt (the
    local-protocol error of h11's split; a peer cannot cause it, since every state it may
    announce is an event with a rule)."""


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state and why (for the log and ``story``)."""

    old: State
    new: State
    why: str


@dataclass
class BinaryStar:
    """One balancer's view of the pair. ``primary`` says which role it was configured with;
    the peer counts as gone after ``liveness`` heartbeat intervals of silence."""

    primary: bool
    interval: float = 0.25
    liveness: int = 4
    now: float = 0.0
    state: State = field(init=False)
    peer_state: State | None = field(init=False, default=None)
    peer_expiry: float = field(init=False)
    last_heard: float | None = field(init=False, default=None)
    workers: int = field(init=False, default=0)  # this side's registered workers, as the core last said
    peer_workers: int = field(init=False, default=-1)  # the peer's, as its last heartbeat said (-1: it did not say)
    peer_stranded_since: float | None = field(init=False, default=None)  # since when it announces ACTIVE with none
    peer_lag: float | None = field(init=False, default=None)  # the least (now - the peer's clock) seen
    peer_sequence: int = field(init=False, default=-1)  # the last heartbeat's sequence
    counters: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.state = State.PRIMARY if self.primary else State.BACKUP
        # At start the peer is unknown; give it one liveness period to show up before a client
        # may make a passive node take over (zguide does the same).
        self.peer_expiry = self.now + self.period

    @property
    def role(self) -> Role:
        return Role.PRIMARY if self.primary else Role.BACKUP

    @property
    def period(self) -> float:
        """Seconds of silence after which the peer counts as gone."""
        return self.interval * self.liveness

    # ---- events ------------------------------------------------------------------------------

    def fresh(self, sent: float, sequence: int, now: float) -> bool:
        """Whether a heartbeat the peer sent at ``sent`` (its clock) with ``sequence``, arriving
        at ``now``, is news; a stale one is counted (``peer_stale``) and must be ignored."""
        if sequence < self.peer_sequence:
            self.peer_lag = None  # a restarted peer counts from 1 again: measure its clock afresh
        self.peer_sequence = sequence
        lag = now - sent
        if self.peer_lag is None or lag < self.peer_lag:
            self.peer_lag = lag
            return True
        if lag - self.peer_lag > self.period:
            self._count("peer_stale")
            return False
        return True

    def on_peer(self, peer: State, now: float, peer_workers: int = -1, workers: int | None = None) -> Transition | None:
        """The peer's heartbeat said it is in state ``peer`` with ``peer_workers`` registered
        (-1: a peer that does not say); ``workers`` is how many this side has now."""
        if workers is not None:
            self.workers = workers
        self.peer_state = peer
        self.peer_workers = peer_workers
        self.last_heard = now
        self.peer_expiry = now + self.period
        if peer != State.ACTIVE or peer_workers != 0:
            self.peer_stranded_since = None
        elif self.peer_stranded_since is None:
            self.peer_stranded_since = now
        return self._apply(self.peer_event())[1]

    def on_client(self, now: float, workers: int | None = None) -> tuple[bool, Transition | None]:
        """A master or worker turned to this balancer: (serve it?, any change of state)."""
        if workers is not None:
            self.workers = workers
        return self._apply(self.client_event(now))

    def peer_event(self) -> StarEvent:
        """The event the peer's last heartbeat is: its state, or for an active peer that has
        workers where this one has none (or the other way round) ``PEER_ACTIVE_SERVING``
        (``PEER_ACTIVE_IDLE``)."""
        if self.peer_state == State.ACTIVE and self.peer_workers >= 0 and (self.peer_workers == 0) != (self.workers == 0):
            return StarEvent.PEER_ACTIVE_SERVING if self.peer_workers > 0 else StarEvent.PEER_ACTIVE_IDLE
        return PEER_EVENTS[self.peer_state]

    def client_event(self, now: float) -> StarEvent:
        """Which of the four client events a client turning to this balancer at ``now`` is."""
        if now >= self.peer_expiry:
            return StarEvent.CLIENT_PEER_SILENT
        if self.peer_state is None:
            return StarEvent.CLIENT_PEER_UNKNOWN
        return StarEvent.CLIENT_PEER_STRANDED if self.peer_stranded(now) else StarEvent.CLIENT_PEER_ALIVE

    def peer_stranded(self, now: float) -> bool:
        """The peer, still heard, has announced ACTIVE with no worker for a whole liveness period."""
        return self.peer_stranded_since is not None and now - self.peer_stranded_since >= self.period

    def rule(self, event: StarEvent) -> Rule:
        """The table's rule for ``event`` in the current state; ``BinaryStarError`` if none."""
        rule = TRANSITIONS[self.role].get((self.state, event))
        if rule is None:
            raise BinaryStarError(f"Binary Star: a {self.role.value} has no rule for {event.name} in state "
                                  f"{self.state.name} (it can only be in "
                                  f"{', '.join(sorted(s.name for s in ROLE_STATES[self.role]))})")
        return rule

    def heartbeat(self) -> State:
        """The state to announce to the peer now."""
        return self.state

    def peer_alive(self, now: float) -> bool:
        return now < self.peer_expiry

    def serving(self) -> bool:
        return self.state == State.ACTIVE

    def status(self, now: float) -> dict:
        return {
            "role": self.role.value,
            "state": self.state.name.lower(),
            "peer_state": None if self.peer_state is None else self.peer_state.name.lower(),
            "peer_alive": self.peer_alive(now),
            "peer_silent_s": None if self.last_heard is None else round(now - self.last_heard, 3),
            "workers": self.workers,
            "peer_workers": None if self.peer_workers < 0 else self.peer_workers,
            "peer_stranded": self.peer_stranded(now),
            **self.counters,
        }

    def validate_state(self) -> None:
        """Check the invariants the table implies; raises AssertionError on the first broken."""
        assert isinstance(self.state, State) and self.state in ROLE_STATES[self.role], \
            f"a {self.role.value} cannot be {self.state!r}"
        assert self.interval > 0 and self.liveness >= 1
        assert (self.peer_state is None) == (self.last_heard is None), "a peer state comes with the time it was heard"
        if self.last_heard is not None:
            assert isinstance(self.peer_state, State)
            assert self.peer_expiry >= self.last_heard + self.period, "the peer expires a liveness period after it was heard"
        # Only a heartbeat can make one PASSIVE, and nothing but a client makes one ACTIVE
        # without a heartbeat: in any state but ACTIVE, the last heartbeat heard leaves it there.
        if self.state == State.PASSIVE:
            assert self.peer_state is not None, "only a heartbeat makes a balancer passive"
        if self.peer_stranded_since is not None:
            assert self.peer_state == State.ACTIVE and self.peer_workers == 0, "only an active peer with no worker strands"
        if self.state != State.ACTIVE and self.peer_state is not None:
            assert self.rule(self.peer_event()).new == self.state, \
                f"{self.state.name} is not where hearing {self.peer_state.name} leaves a {self.role.value}"
        if self.state in (State.ACTIVE, State.PASSIVE):
            assert self.counters.get(f"to_{self.state.name.lower()}", 0) >= 1, "a balancer starts unsettled"
        assert all(isinstance(n, int) and n > 0 for n in self.counters.values())

    # ---- inside ------------------------------------------------------------------------------

    def _apply(self, event: StarEvent) -> tuple[bool, Transition | None]:
        """Carry out the table's rule for ``event``: (serve the client?, any change of state)."""
        rule = self.rule(event)
        counter = ACTION_COUNTERS.get(rule.action)
        if counter is not None:
            self._count(counter)
        change = None
        if rule.new != self.state:
            change = self._go(rule.new, rule.why.format(silence=self.period))
        return rule.action in SERVING, change

    def _go(self, new: State, why: str) -> Transition:
        old, self.state = self.state, new
        self._count(f"to_{new.name.lower()}")
        return Transition(old, new, why)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1
