"""The Binary Star pair as a pure state machine (zguide chapter 4, "High-Availability Pair").

Theory of operation
-------------------
Two balancers, a *primary* and a *backup*, heartbeat each other with their state. Each starts
in its configured role (PRIMARY or BACKUP) and settles into ACTIVE (serving masters and
workers) or PASSIVE (standing by) from what it hears:

- PRIMARY hearing a BACKUP (or a PASSIVE) peer becomes ACTIVE; hearing an ACTIVE peer it
  becomes PASSIVE (the backup took over while the primary was away: it stays in charge). A
  primary alone serves a client that turns to it (it becomes ACTIVE): a cluster may start
  without its backup.
- BACKUP hearing an ACTIVE peer becomes PASSIVE. Until it hears the primary it refuses
  clients, unless the primary stays silent past ``peer_expiry`` (it never came up): then, like
  a PASSIVE one, it serves a client that turns to it.
- PASSIVE hearing the peer restart (PRIMARY or BACKUP) becomes ACTIVE: the peer will go passive.
- PASSIVE takes over only when BOTH the peer has been silent past ``peer_expiry`` AND a client
  (a master or a worker) turns to it. Silence alone is not enough: if the link between the two
  balancers breaks but the active one still serves its clients, nobody turns to the passive
  one and it stays passive. That is the split-brain guard.
- Two ACTIVEs (a heal after a partition in which both served) would be split brain. zguide
  aborts; we resolve it deterministically: the backup steps down to PASSIVE, the primary stays
  ACTIVE, and it is counted and logged. Fencing by epoch at the masters makes the stale side's
  assignments harmless either way.
- Two PASSIVEs would leave nobody serving: the primary becomes ACTIVE.

Everything is a method taking ``now``; no clock, sockets or threads (tests drive every
transition directly). The balancer's loop sends ``heartbeat()`` every ``interval`` seconds
and feeds what it hears to ``on_peer`` and what its clients send to ``on_client``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(enum.IntEnum):
    """A balancer's state as it travels in heartbeats (stable codes)."""

    PRIMARY = 1  # configured primary, not yet settled
    BACKUP = 2  # configured backup, not yet settled
    ACTIVE = 3  # serving
    PASSIVE = 4  # standing by


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
    counters: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.state = State.PRIMARY if self.primary else State.BACKUP
        # At start the peer is unknown; give it one liveness period to show up before a client
        # may make a passive node take over (zguide does the same).
        self.peer_expiry = self.now + self.interval * self.liveness

    # ---- events ------------------------------------------------------------------------------

    def on_peer(self, peer: State, now: float) -> Transition | None:
        """The peer's heartbeat said it is in state ``peer``."""
        self.peer_state = peer
        self.last_heard = now
        self.peer_expiry = now + self.interval * self.liveness
        s = self.state
        if s == State.PRIMARY:
            if peer in (State.BACKUP, State.PASSIVE):
                return self._go(State.ACTIVE, f"peer is {peer.name.lower()}: this primary serves")
            if peer == State.ACTIVE:
                return self._go(State.PASSIVE, "peer is active (it took over): this primary stands by")
        elif s == State.BACKUP:
            if peer == State.ACTIVE:
                return self._go(State.PASSIVE, "peer is active: this backup stands by")
            if peer == State.PASSIVE:
                return self._go(State.ACTIVE, "peer is passive: this backup serves")
        elif s == State.ACTIVE:
            if peer == State.ACTIVE:
                self._count("dual_active")
                if not self.primary:
                    return self._go(State.PASSIVE, "both sides active (a healed partition): the backup steps down")
        elif s == State.PASSIVE:
            if peer in (State.PRIMARY, State.BACKUP):
                return self._go(State.ACTIVE, f"peer restarted as {peer.name.lower()}: this one serves")
            if peer == State.PASSIVE:
                self._count("dual_passive")
                if self.primary:
                    return self._go(State.ACTIVE, "both sides passive: the primary serves")
        return None

    def on_client(self, now: float) -> tuple[bool, Transition | None]:
        """A master or worker turned to this balancer: (serve it?, any change of state)."""
        s = self.state
        if s == State.ACTIVE:
            return True, None
        if s == State.PRIMARY:
            if self.peer_state is None and now < self.peer_expiry:
                self._count("clients_refused")
                return False, None  # give the backup its chance to show up first
            return True, self._go(State.ACTIVE, "a client turned to this primary and no backup answers: it serves")
        # BACKUP or PASSIVE: take over only if the peer is silent too (a backup whose primary
        # never came up serves once a client turns to it after the liveness period)
        if now >= self.peer_expiry:
            self._count("takeovers")
            return True, self._go(State.ACTIVE, f"peer silent for {self.interval * self.liveness:g} s and a client "
                                                "turned to this one: taking over")
        self._count("clients_refused")
        return False, None

    def heartbeat(self) -> State:
        """The state to announce to the peer now."""
        return self.state

    def peer_alive(self, now: float) -> bool:
        return now < self.peer_expiry

    def serving(self) -> bool:
        return self.state == State.ACTIVE

    def status(self, now: float) -> dict:
        return {
            "role": "primary" if self.primary else "backup",
            "state": self.state.name.lower(),
            "peer_state": None if self.peer_state is None else self.peer_state.name.lower(),
            "peer_alive": self.peer_alive(now),
            "peer_silent_s": None if self.last_heard is None else round(now - self.last_heard, 3),
            **self.counters,
        }

    # ---- inside ------------------------------------------------------------------------------

    def _go(self, new: State, why: str) -> Transition:
        old, self.state = self.state, new
        self._count(f"to_{new.name.lower()}")
        return Transition(old, new, why)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1
