"""``decentsim bench ble``: simulated radio + exposure scoring throughput.

Draws ``--contacts`` directed contacts among ``contacts / degree`` devices with a household /
work / community weight mix (1.0 / 0.3 / 0.1), runs :class:`SimulatedRadio` (including the GAEN
key schedule of every heard device) and the scoring, and reports one JSON line.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from decentsim.usage import nonnegative_int, positive_float, positive_int
from protocols.ble.errors import RadioInputError
from protocols.ble.radio import DayContacts, SimulatedRadio
from protocols.ble.scoring import score
from protocols.ble.simkeys import SimulatedKeyring


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI options of the benchmark."""
    parser.add_argument(
        "--contacts", type=positive_int, default=1_000_000, help="directed contacts/day"
    )
    parser.add_argument(
        "--degree", type=positive_float, default=10.0, help="mean contacts per device"
    )
    parser.add_argument("--seed", type=nonnegative_int, default=1)


def make_contacts(n: int, degree: float, seed: int) -> DayContacts:
    """A synthetic day: uniform random pairs, weights 1.0 / 0.3 / 0.1 with p 0.2 / 0.4 / 0.4."""
    if n < 1 or degree <= 0:
        raise RadioInputError(f"need contacts >= 1 and degree > 0, got {n}, {degree}")
    devices = max(2, int(n / degree))
    gen = np.random.default_rng(seed)  # workload generation only: nothing secret
    src = gen.integers(0, devices, n, dtype=np.int64)
    dst = (src + gen.integers(1, devices, n, dtype=np.int64)) % devices
    weight = gen.choice(np.array([1.0, 0.3, 0.1]), n, p=[0.2, 0.4, 0.4])
    return DayContacts(src, dst, weight, day=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the radio and the scoring; return the JSON-line fields."""
    contacts = make_contacts(args.contacts, args.degree, args.seed)
    radio = SimulatedRadio(SimulatedKeyring(bytes(16)), seed=args.seed)
    t0 = time.perf_counter()
    day = radio.transmit(contacts)
    t1 = time.perf_counter()
    trace = score(day.sightings)
    t2 = time.perf_counter()
    return {
        "contacts": len(contacts),
        "sightings": len(day.sightings),
        "trace_entries": len(trace),
        "seconds_radio": round(t1 - t0, 3),
        "seconds_scoring": round(t2 - t1, 3),
        "contacts_per_s": round(len(contacts) / (t2 - t0), 1),
    }
