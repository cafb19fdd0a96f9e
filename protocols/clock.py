"""Protocol time: the one clock a run's protocol reads.

Two kinds of time meet on a device. *Protocol time* is what the contact-tracing protocol is
about: RPI interval numbers and TEK days, sighting timestamps and credited scan seconds,
exposure windows, the matching window and contact-log retention, the daily round schedule. It
comes from one run clock::

    now = sim_epoch + scale × (wall − wall_epoch)

``scale = 1`` with both epochs 0 is real time (a pilot); a test runs a day a minute with
``scale = 1440``. *Infrastructure time* — TLS validity, gRPC deadlines, step timeouts,
watchdogs, the radio's advertising and scan duty cycles — stays the machine's clock, in wall
seconds. A duration crosses from one to the other only through :meth:`RunClock.to_protocol`
or :meth:`RunClock.to_wall`. Protocol code reads the time only through a :class:`RunClock`:
``tests/protocols/test_clock.py`` fails on any other clock read in it (a read of the machine's
clock for infrastructure is marked ``# infrastructure time`` on its line).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class ClockError(ValueError):
    """A run clock's settings are invalid; the message names the field."""


@dataclass(frozen=True)
class RunClock:
    """``now = sim_epoch + scale × (wall − wall_epoch)`` (see the module docstring).

    Attributes:
        sim_epoch: protocol time (unix seconds) at ``wall_epoch``.
        scale: protocol seconds per wall second (> 0).
        wall_epoch: the wall time (unix seconds) the run's protocol time starts from.
        wall: the machine's clock (``time.time``; a test passes its own).
    """

    sim_epoch: float = 0.0
    scale: float = 1.0
    wall_epoch: float = 0.0
    wall: Callable[[], float] = field(default=time.time, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ClockError(f"clock scale must be a finite number > 0, got {self.scale}")
        for name in ("sim_epoch", "wall_epoch"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ClockError(f"clock {name} must be a finite number >= 0, got {value}")

    def now(self) -> float:
        """Protocol time now (unix seconds)."""
        return self.sim_epoch + self.scale * (self.wall() - self.wall_epoch)

    def to_protocol(self, wall_seconds: float) -> float:
        """A duration in wall seconds as protocol seconds."""
        return self.scale * wall_seconds

    def to_wall(self, protocol_seconds: float) -> float:
        """A duration in protocol seconds as wall seconds."""
        return protocol_seconds / self.scale


#: Real time: protocol time is the machine's clock (a pilot device).
REAL_TIME = RunClock()
