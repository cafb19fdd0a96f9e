"""The mapping between the simulator's interactions and physical encounters.

Both directions produce the same formats:

* simulated interactions -> :func:`sightings_from_contacts` -> the sightings a scanner records;
* sightings (simulated or from :class:`protocols.ble.scanner.ExposureScanner`) ->
  :func:`trace_from_sightings` -> the device's private trace ``[(heard_rpi, weight)]``, whose RPIs
  address the secure neighbourhood-sum slots.

With :class:`~protocols.ble.radio.IdealRadio` the weights of a contact's RPIs sum to the
simulator's contact weight exactly.
"""

from __future__ import annotations

from protocols.ble.radio import DayContacts, Radio, RadioDay
from protocols.ble.scoring import DEFAULT_CONFIG, ScoringConfig, Trace, score
from protocols.ble.sightings import Sightings


def sightings_from_contacts(day_contacts: DayContacts, radio: Radio) -> RadioDay:
    """Sightings of every device for one day (``.sightings.for_observer(i)`` gives device i's)."""
    return radio.transmit(day_contacts)


def traces_from_sightings(sightings: Sightings, config: ScoringConfig = DEFAULT_CONFIG) -> Trace:
    """The private traces of all observers in ``sightings``, vectorized (see :func:`score`)."""
    return score(sightings, config)


def trace_from_sightings(
    sightings: Sightings, config: ScoringConfig = DEFAULT_CONFIG
) -> list[tuple[bytes, float]]:
    """One device's private trace ``[(heard_rpi, weight)]`` from its own sightings."""
    return [(r, w) for r, _interval, w in score(sightings, config).entries()]
