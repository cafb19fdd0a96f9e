"""``decentsim bench cohorts``: the per-device-day counts it reports."""

from __future__ import annotations

import argparse

import numpy as np

from bench import cohorts as bench


def parse(*argv: str) -> argparse.Namespace:
    """The bench's arguments as the CLI parses them."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_distinct_contributors_per_group() -> None:
    # agent 0's group: devices 1, 1 (a second beacon of the same pair) and 2; agent 3's: 0
    owner = np.array([0, 0, 0, 3])
    observer = np.array([1, 1, 2, 0])
    assert bench._distinct_per(owner, observer, 4).tolist() == [2, 0, 0, 1]
    assert bench._distinct_per(np.zeros(0, int), np.zeros(0, int), 2).tolist() == [0, 0]


def test_an_ideal_radio_gives_every_group_its_central_contacts() -> None:
    """Every contact heard: the share of small groups is the central graph's; a cohort bound
    of 1 suppresses no exposure (only groups nobody posted to, which carry none)."""
    ideal = bench.run(parse("--population", "synthetic:300", "--days", "2", "--radio", "ideal"))
    assert ideal["device_days"] == 600
    assert ideal["groups_below_2_contacts"] == ideal["central_below_2_contacts"]
    assert 0 < ideal["weight_share_below_min_cohort"] < 1
    one = bench.run(parse("--population", "synthetic:300", "--days", "1", "--min-cohort", "1"))
    assert one["weight_share_below_min_cohort"] == 0
    assert one["groups_below_min_cohort"] <= one["groups_below_2_contacts"]


def test_a_lossy_radio_never_adds_contacts() -> None:
    """The simulated radio can miss a contact, never invent one: small groups are at least
    as common as small central contact sets, and the exposure in them is reported."""
    lossy = bench.run(parse("--population", "synthetic:300", "--days", "2"))
    assert lossy["groups_below_2_contacts"] >= lossy["central_below_2_contacts"]
    assert lossy["radio"] == "simulated" and lossy["seconds"] >= 0
