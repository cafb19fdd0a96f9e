"""A pilot device in a hybrid run: one agent of the simulated population, a real radio.

The pilot runs the same pool code as a simulated device (:class:`~device_agent.pool.DevicePool`
of one agent); only its world differs. :class:`PilotWorld` gives it

* the sightings its **physical radio** recorded during the protocol day (other pilots' beacons,
  from the device's private radio store, :mod:`device_agent.radio`), and
* the sightings of its **simulated contacts** (with the agents that are not pilots), from the
  population's contact graph through the same simulated radio the simulated pools use,

as one set of sightings, scored by the one scoring path. It registers, besides its simulated
beacons, the RPIs its radio put on the air that day (from its own TEK), one per interval, so a
simulated agent's messages reach it under its simulated beacons and a pilot's under its real
ones. Its attributes come from the population file on the device; its state never leaves it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from device_agent.pool import PoolStateError, SimulatedWorld
from device_agent.radio import RadioStore
from protocols.ble import gaen
from protocols.ble.radio import DAY_SECONDS, Radio
from protocols.ble.sightings import Sightings
from sim.model import ModelConfig
from sim.populations import Population


class PilotWorld(SimulatedWorld):
    """The world of pilot agent ``pilot`` (see the module docstring).

    ``store`` reads the radio's private store; ``flush`` makes everything the radio heard so
    far readable there (the radio runs in its own thread)."""

    def __init__(
        self,
        population: Population,
        config: ModelConfig,
        radio: Radio,
        pilot: int,
        pilots: np.ndarray,
        store: RadioStore,
        flush: Callable[[], None],
    ) -> None:
        if pilot not in set(np.asarray(pilots).tolist()):
            raise PoolStateError(f"agent {pilot} is not one of the run's pilots")
        super().__init__(
            population,
            config,
            radio,
            gaen.TEK_ROLLING_PERIOD,
            observers=np.array([pilot], dtype=np.int64),
            pilots=pilots,
        )
        self.pilot = pilot
        self.store = store
        self.flush = flush

    def physical_beacons(self, day: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pilot's RPIs of the intervals of ``day`` its radio put on the air."""
        on_air, aired = super().physical_beacons(day, ids)
        rows = np.flatnonzero(ids == self.pilot)
        if rows.size == 0:
            return on_air, aired
        self.flush()
        first = self.first_interval(day)
        enins = self.store.broadcasts(first, first + gaen.TEK_ROLLING_PERIOD)
        if enins.size:
            keys = [k for k in self.store.teks() if k.rolling_start_interval_number == first]
            if not keys:
                raise PoolStateError(
                    f"day {day}: the radio broadcast {enins.size} interval(s) but the day's "
                    "TEK is not in its store"
                )
            k = enins - first
            on_air[rows[0], k] = keys[0].all_rpis()[k]
            aired[rows[0], k] = True
        return on_air, aired

    def sightings(self, day: int, observers: np.ndarray) -> Sightings:
        """The simulated sightings of ``day`` plus what the physical radio heard that day."""
        simulated = super().sightings(day, observers)
        if self.pilot not in set(np.asarray(observers).tolist()):
            return simulated
        self.flush()
        start = float(self.radio.day_start(day))
        heard = self.store.sightings(start, start + DAY_SECONDS, observer=self.pilot)
        return Sightings.concat([simulated, heard])
