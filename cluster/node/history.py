"""The node loop's history: what each stimulus led the core to do, in a few words per effect."""

from __future__ import annotations

from typing import NamedTuple

from cluster.node.events import CancelTimer, Effect, Send, StartTimer


class Entry(NamedTuple):
    """One line of the loop's history: what ``effect`` the core asked for, on which event."""

    stimulus_id: str
    event: str
    effect: str
    cause: str


def describe_effect(effect: Effect) -> str:
    """A few words naming an effect (its message's type, a timer's name), never its payload."""
    if isinstance(effect, Send):
        return f"Send {type(effect.message).__name__} on {effect.socket}"
    if isinstance(effect, (StartTimer, CancelTimer)):
        return f"{type(effect).__name__} {effect.name}"
    return type(effect).__name__
