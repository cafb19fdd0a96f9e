"""``decentsim bench cohorts``: how many contacts stand behind each released day total.

A federation releases one total per device-day: the sum of the messages posted to the slots of
one device's day of beacons (its slot group, ``LEAKAGE.md`` "Slot groups"). A group with a single
contributing device hands the registrant that device's message, so the question for privacy is
how many devices contribute to a group — and for ``--min-cohort K`` what suppressing the
groups below K costs in exposure.

The benchmark runs the radio half of a simulated federation, which is all these counts depend on:
each day's contacts (the population's layers with the simulator's day weights; an edge
``src → dst`` means src heard dst's beacons and posts its message to dst's group), the radio
(``--radio simulated``: the path-loss, scan and packet-loss model; ``ideal``: every contact heard),
and the devices' exposure scoring. Each scored (observer, heard RPI) row is one item a device
posts, to the slot of a beacon whose owner's group it joins. Per day it counts, for every agent:

- ``contacts``: distinct devices posting to its group (what the registrant's total sums over);
- ``weight``: the exposure weight of those items (the scored contact weights);
- ``central``: distinct agents with a positive-weight edge to it in the central graph (the
  central simulator's in-degree, what the same agent's exposure sums over there).

and prints one JSON line::

    {"agents", "days", "radio", "device_days", "groups_below_2_contacts",
     "central_below_2_contacts", "min_cohort", "groups_below_min_cohort",
     "weight_share_below_min_cohort", "seconds"}

``groups_below_2_contacts`` is the share of device-days whose group sums fewer than 2 contacts,
``central_below_2_contacts`` the share of agent-days with fewer than 2 contacts in the central
graph. ``weight_share_below_min_cohort`` is the share of the total exposure weight in groups with
fewer than ``--min-cohort`` contributing devices: an upper bound on what ``--min-cohort``
suppresses, because the servers count summands — every posted item, and the zero-valued padding
items too, which they cannot tell apart — and never fewer summands than contributing devices.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from decentsim.commands.common import load_population
from decentsim.usage import nonnegative_int, positive_int
from device_agent.pool import SimulatedWorld
from protocols.ble.mapping import traces_from_sightings
from protocols.ble.radio import IdealRadio, Radio, SimulatedRadio
from protocols.ble.simkeys import SimulatedKeyring
from sim.model import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bench cohorts``."""
    p.add_argument(
        "--population",
        default="synthetic:2000",
        help="population spec, as for simulate (synthetic:N, a directory, …)",
    )
    p.add_argument("--days", type=positive_int, default=5)
    p.add_argument("--radio", choices=("simulated", "ideal"), default="simulated")
    p.add_argument(
        "--min-cohort", type=positive_int, default=5, help="K whose suppression cost to report"
    )
    p.add_argument("--seed", type=nonnegative_int, default=1)


def _distinct_per(owner: np.ndarray, other: np.ndarray, n: int) -> np.ndarray:
    """For each of ``n`` agents, how many distinct ``other`` appear with it as ``owner``."""
    # sort-based: numpy's default unique hashes integers, far slower for millions of them
    pairs = np.sort(owner.astype(np.int64) * n + other.astype(np.int64))
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs
    return np.bincount(pairs // n, minlength=n)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Count contributors per device-day over ``--days`` days; see the module docstring."""
    population = load_population(args.population, args.seed)
    n = population.n_agents
    # the world's beacon secret only names the beacons: any fixed one gives the same counts
    keyring = SimulatedKeyring(bytes(16))
    radio: Radio = (
        IdealRadio(keyring) if args.radio == "ideal" else SimulatedRadio(keyring, args.seed)
    )
    world = SimulatedWorld(population, ModelConfig(), radio)
    k = args.min_cohort
    below2 = central_below2 = below_k = 0
    weight_total = weight_below_k = 0.0
    start = time.perf_counter()
    for day in tqdm(range(args.days), unit="day", desc="cohorts"):
        contacts = world.contacts(day)
        rd = world.radio_day(day)
        trace = traces_from_sightings(rd.sightings)
        owner = rd.beacon_owner[trace.beacon]
        contributors = _distinct_per(owner, trace.observer, n)
        weight = np.bincount(owner, weights=trace.weight, minlength=n)
        central = _distinct_per(contacts.dst, contacts.src, n)
        below2 += int((contributors < 2).sum())
        central_below2 += int((central < 2).sum())
        small = contributors < k
        below_k += int(small.sum())
        weight_total += float(weight.sum())
        weight_below_k += float(weight[small].sum())
    seconds = time.perf_counter() - start
    device_days = n * args.days
    return {
        "agents": n,
        "days": args.days,
        "radio": args.radio,
        "device_days": device_days,
        "groups_below_2_contacts": round(below2 / device_days, 5),
        "central_below_2_contacts": round(central_below2 / device_days, 5),
        "min_cohort": k,
        "groups_below_min_cohort": round(below_k / device_days, 5),
        "weight_share_below_min_cohort": round(weight_below_k / weight_total, 6)
        if weight_total
        else 0.0,
        "seconds": round(seconds, 2),
    }
