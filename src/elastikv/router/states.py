"""A managed model's states and the steps between them, its counters, and the errors the supervisor raises.

``TRANSITIONS`` lists every step the ``state`` setter of :class:`~elastikv.router.supervisor.ManagedModel` allows
(besides staying put, and STOPPED from any state when the router stops); the supervisor's docstring draws them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from elastikv.errors import ElastikvError


class State(enum.Enum):
    STARTING = "starting"
    AWAKE = "awake"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    ASLEEP = "asleep"
    WAKING = "waking"
    STOPPED = "stopped"
    RESTARTING = "restarting"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {  # besides staying put, and STOPPED (the router stops) from any
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.AWAKE, S.RESTARTING}),  # healthy, or it failed (a cancelled start: STOPPED)
    S.AWAKE: frozenset({S.DRAINING, S.RESTARTING}),
    S.DRAINING: frozenset({S.SLEEPING, S.AWAKE, S.RESTARTING}),  # AWAKE: the drain timed out or was cancelled
    S.SLEEPING: frozenset({S.ASLEEP, S.AWAKE, S.RESTARTING}),  # AWAKE: the sleep failed, the engine still up
    S.ASLEEP: frozenset({S.WAKING, S.RESTARTING}),
    S.WAKING: frozenset({S.AWAKE, S.ASLEEP, S.RESTARTING}),  # ASLEEP: the wake was refused or cancelled
    S.RESTARTING: frozenset({S.STARTING}),
}


class Unavailable(ElastikvError):
    """The model cannot take requests now (its engine crashed and is restarting, or failed to wake)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelConflict(ElastikvError):
    """A model added or removed at run time clashes with what is served: its name, its port, a change under way."""


class EngineExited(ElastikvError):
    """The engine process ended while the router was starting or waking it."""


@dataclass
class Counters:
    wakes: int = 0
    sleeps: int = 0
    restarts: int = 0
    crashes: int = 0
    bad_transitions: int = 0  # state changes outside TRANSITIONS (a bug: logged, and tested to stay 0)
    # From the request that found the model asleep to the engine answering again, since the metrics last read them
    wake_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # until /metrics reads them
    start_seconds: float = 0.0
