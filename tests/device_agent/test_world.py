"""A pool simulates only its own devices' radios: exactly their sightings of the whole world."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.pool import SimulatedWorld
from protocols.ble.mapping import traces_from_sightings
from protocols.ble.radio import IdealRadio, Radio, SimulatedRadio
from protocols.ble.simkeys import SimulatedKeyring
from sim.model import ModelConfig
from sim.populations import synthetic


@pytest.mark.parametrize("kind", ["ideal", "simulated"])
def test_observer_restricted_world_gives_the_same_sightings(kind: str) -> None:
    population = synthetic(400, seed=5)
    keyring = SimulatedKeyring(bytes(range(16)))
    radio: Radio = IdealRadio(keyring) if kind == "ideal" else SimulatedRadio(keyring, seed=3)
    config = ModelConfig()
    mine = np.arange(150, 290)
    whole = SimulatedWorld(population, config, radio, 144)
    own = SimulatedWorld(population, config, radio, 144, observers=mine)
    assert len(own.contacts(2).src) < len(whole.contacts(2).src)
    for day in (0, 2):
        a = traces_from_sightings(whole.sightings(day, mine))
        b = traces_from_sightings(own.sightings(day, mine))
        order_a = np.lexsort((a.rpi.view(np.uint64)[:, 1], a.rpi.view(np.uint64)[:, 0], a.observer))
        order_b = np.lexsort((b.rpi.view(np.uint64)[:, 1], b.rpi.view(np.uint64)[:, 0], b.observer))
        assert len(a.observer) > 0
        np.testing.assert_array_equal(a.observer[order_a], b.observer[order_b])
        np.testing.assert_array_equal(a.rpi[order_a], b.rpi[order_b])
        np.testing.assert_array_equal(a.weight[order_a], b.weight[order_b])
