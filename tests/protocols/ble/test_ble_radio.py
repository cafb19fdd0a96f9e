"""Radios and the mapping: IdealRadio inverts the simulator's weights exactly; SimulatedRadio is
seeded per contact, physical, and survives +-2 h clock skew."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import ble as bench
from protocols.ble import gaen
from protocols.ble.errors import CryptoInputError, RadioInputError
from protocols.ble.mapping import (
    sightings_from_contacts,
    trace_from_sightings,
    traces_from_sightings,
)
from protocols.ble.radio import (
    DayContacts,
    IdealRadio,
    RadioModel,
    RadioPurpose,
    SimulatedRadio,
    counter_bits,
)
from protocols.ble.scoring import match_keys
from protocols.ble.simkeys import SimulatedKeyring
from sim import rng

RING = SimulatedKeyring(bytes(range(16)))


def contacts(src, dst, w, day: int = 2) -> DayContacts:
    return DayContacts(
        np.asarray(src, np.int64), np.asarray(dst, np.int64), np.asarray(w, np.float64), day
    )


def pair_totals(day, n: int) -> np.ndarray:
    trace = traces_from_sightings(day.sightings)
    owner = day.beacon_owner[trace.beacon]
    return np.bincount(trace.observer * n + owner, weights=trace.weight, minlength=n * n)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 7),
            st.integers(1, 7),
            st.floats(1e-6, 20.0, allow_nan=False, allow_infinity=False),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_ideal_radio_returns_simulator_weights_exactly(rows: list) -> None:
    src = np.array([r[0] for r in rows])
    dst = (src + np.array([r[1] for r in rows])) % 8
    w = np.array([r[2] for r in rows])
    c = contacts(src, dst, w)
    day = sightings_from_contacts(c, IdealRadio(RING))
    expected = np.zeros(64)
    for s_, d_, w_ in sorted(zip(src, dst, w, strict=True), key=lambda r: r[2]):
        expected[s_ * 8 + d_] += w_  # exact here: every pair in this test has <= 1 fraction
    got = pair_totals(day, 8)
    unique_pairs = len({(a, b) for a, b in zip(src, dst, strict=True)}) == len(rows)
    if unique_pairs:
        assert np.array_equal(got, expected)  # bit for bit
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-15)


def test_ideal_radio_single_contacts_bit_exact() -> None:
    w = np.array([1.0, 0.3, 0.1, 2.7, 0.123456789, 1e-9, 17.0000001, 143.5])
    n = w.size
    c = contacts(np.arange(n) * 2, np.arange(n) * 2 + 1, w)
    trace = traces_from_sightings(sightings_from_contacts(c, IdealRadio(RING)).sightings)
    got = np.bincount(trace.observer // 2, weights=trace.weight, minlength=n)
    assert got.tolist() == w.tolist()
    radio = IdealRadio(RING)
    assert radio.weight(np.array([900.0, 450.0]), np.array([1.0, 1.0])).tolist() == [1.0, 0.5]
    assert radio.weight(np.array([900.0]), np.array([100.0])).tolist() == [0.0]


def test_ideal_radio_trace_of_one_device() -> None:
    c = contacts([0, 0], [1, 2], [0.3, 1.0])
    day = sightings_from_contacts(c, IdealRadio(RING))
    trace = trace_from_sightings(day.sightings.for_observer(0))
    start = (IdealRadio(RING).day_start(2)) // 600
    assert sorted(trace) == sorted(
        [
            (bytes(RING.rpis(np.array([1]), np.array([start]))[0]), 0.3),
            (bytes(RING.rpis(np.array([2]), np.array([start]))[0]), 1.0),
        ]
    )


def test_ideal_radio_limits() -> None:
    with pytest.raises(RadioInputError, match="more than 144 intervals"):
        IdealRadio(RING).transmit(contacts([0], [1], [144.5]))
    with pytest.raises(RadioInputError, match=r"bucket of weight exactly 1\.0"):
        IdealRadio(RING, reference_distance_m=10.0)


def test_day_contacts_validation() -> None:
    with pytest.raises(RadioInputError, match="lengths differ: 2/1/1"):
        contacts([0, 1], [1], [1.0])
    with pytest.raises(RadioInputError, match="src == dst"):
        contacts([3], [3], [1.0])
    with pytest.raises(RadioInputError, match="finite and > 0"):
        contacts([0], [1], [0.0])
    with pytest.raises(RadioInputError, match=r"\[0, 2\*\*31\)"):
        contacts([0], [2**31], [1.0])
    with pytest.raises(RadioInputError, match=r"contacts\.src must be a 1-D int64"):
        DayContacts(np.array([0.0]), np.array([1]), np.array([1.0]), 0)
    with pytest.raises(RadioInputError, match="packet_loss"):
        RadioModel(packet_loss=1.0)


def _pair_rows(day, observer: int, owner: int) -> np.ndarray:
    s = day.sightings
    own = day.beacon_owner[s.beacon]
    m = (s.observer == observer) & (own == owner)
    return np.stack([s.rssi[m], s.time[m], s.scan[m].astype(np.float64)], axis=1)


def test_simulated_radio_is_seeded_per_contact() -> None:
    gen = np.random.default_rng(0)
    src = gen.permutation(400)[:200].astype(np.int64) * 2
    c = contacts(src, src + 1, np.full(200, 2.0))
    radio = SimulatedRadio(RING, seed=11)
    full = radio.transmit(c)
    again = SimulatedRadio(RING, seed=11).transmit(c)
    np.testing.assert_array_equal(full.sightings.rssi, again.sightings.rssi)
    subset = radio.transmit(contacts(src[[5, 0]], src[[5, 0]] + 1, [2.0, 2.0]))
    for i in (0, 5):  # same draws whatever else is in the batch, in any order
        np.testing.assert_array_equal(
            _pair_rows(full, src[i], src[i] + 1), _pair_rows(subset, src[i], src[i] + 1)
        )
    other = SimulatedRadio(RING, seed=12).transmit(c)
    assert not np.array_equal(
        _pair_rows(full, src[0], src[0] + 1), _pair_rows(other, src[0], src[0] + 1)
    )


def test_both_directions_share_the_encounter() -> None:
    radio = SimulatedRadio(RING, seed=3)
    both = contacts([4, 9], [9, 4], [1.0, 1.0])
    d = radio.draw(both)
    assert d.distance[0] == d.distance[1] and d.start[0] == d.start[1]
    assert d.shadowing_db[0] == d.shadowing_db[1]
    assert d.body_loss_db[0] != d.body_loss_db[1]


def test_simulated_radio_physics() -> None:
    n = 4000
    src = np.arange(n, dtype=np.int64) * 2
    c = contacts(src, src + 1, np.ones(n))
    model = RadioModel(distance_median_m=2.0, distance_sigma=1.0)
    radio = SimulatedRadio(RING, seed=5, model=model)
    draws = radio.draw(c)
    assert draws.exponent.min() >= 2.0 and draws.exponent.max() <= 4.0
    assert draws.duration.mean() == pytest.approx(900.0, rel=0.05)
    day = radio.transmit(c)
    s = day.sightings
    # Duty cycle: one scan per 240 s, 3 packets per scan, 20 % lost.
    expected_packets = 3 * 0.8 * draws.duration.sum() / 240.0
    assert len(s) == pytest.approx(expected_packets, rel=0.05)
    trace = traces_from_sightings(s)
    got = np.bincount(trace.observer // 2, weights=trace.weight, minlength=n)
    near, far = got[draws.distance < 1.0].mean(), got[draws.distance > 4.0].mean()
    assert near > 0.8 and far < 0.3 and near > 3 * far


def test_simulated_radio_calibration() -> None:
    """Duty cycling and duration noise are unbiased in the mean; distance is what lowers it."""
    n = 6000
    src = np.arange(n, dtype=np.int64) * 2
    means = {}
    for w in (0.3, 1.0):
        radio = SimulatedRadio(RING, seed=21)
        c = contacts(src, src + 1, np.full(n, w))
        trace = traces_from_sightings(radio.transmit(c).sightings)
        got = np.bincount(trace.observer // 2, weights=trace.weight, minlength=n) / w
        distance = radio.draw(c).distance
        assert got[distance < 0.7].mean() == pytest.approx(1.0, abs=0.08)  # unbiased up close
        means[w] = got.mean()
    # Under the default distances (median 1.5 m) the mean is ~0.78 w, whatever w.
    assert means[0.3] == pytest.approx(0.78, abs=0.05)
    assert means[1.0] == pytest.approx(0.78, abs=0.05)


@pytest.mark.parametrize(("skew_h", "all_match"), [(1.0, True), (3.5, False)])
def test_clock_skew_up_to_two_hours_still_matches(skew_h: float, all_match: bool) -> None:
    n = 300
    src = np.arange(n, dtype=np.int64) * 2
    model = RadioModel(max_clock_skew_s=skew_h * 3600)  # each clock within +-skew: pairs <= 2x
    radio = SimulatedRadio(RING, seed=9, model=model)
    day = radio.transmit(contacts(src, src + 1, np.ones(n)))
    trace = traces_from_sightings(day.sightings)
    owners = day.beacon_owner[trace.beacon]
    keys, index = [], {}
    for owner in np.unique(owners):  # the owners' published keys (yesterday, today, tomorrow)
        for shift in (-144, 0, 144):
            index[(owner, shift)] = len(keys)
            keys.append(RING.key(int(owner), radio.day_start(2) // 600 + shift))
    matched = match_keys(trace.rpi, trace.interval, keys)
    owner_of_match = np.array([k[0] for k in index])[np.maximum(matched, 0)]
    ok = (matched >= 0) & (owner_of_match == owners)
    skew = np.abs(trace.interval - day.beacon_enin[trace.beacon])
    assert ok[skew <= gaen.MAX_CLOCK_SKEW_INTERVALS].all()
    assert not ok[skew > gaen.MAX_CLOCK_SKEW_INTERVALS].any()
    assert ok.all() == all_match


def test_counter_bits_is_sim_rng_bits() -> None:
    ids = np.array([0, 1, 2**40 + 3, -(2**62), 2**63 - 1, -1], dtype=np.int64)
    for step, purpose in ((0, RadioPurpose.PACKET), (17, RadioPurpose.CONTACT_KEY)):
        want = rng.bits(5, torch.from_numpy(ids), step, int(purpose)).numpy().view(np.uint64)
        assert counter_bits(5, ids, step, int(purpose)).tolist() == want.tolist()


def test_fractional_scan_interval_and_keyring_range() -> None:
    model = RadioModel(scan_interval_s=0.5, scan_window_s=0.25, packets_per_scan=1)
    day = SimulatedRadio(RING, seed=1, model=model).transmit(contacts([0], [1], [0.01]))
    assert len(day.sightings) > 0 and (np.diff(day.sightings.scan) > 0).all()
    with pytest.raises(CryptoInputError, match=r"enins must lie in \[0, 2\*\*32\)"):
        RING.rpis(np.array([1]), np.array([2**32 + 5]))


def test_bench_reports_the_contract_fields() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = bench.run(parser.parse_args(["--contacts", "3000"]))
    assert set(out) >= {"contacts", "sightings", "seconds_radio", "seconds_scoring"}
    assert out["contacts"] == 3000 and out["sightings"] > 3000 and out["contacts_per_s"] > 0
    json.dumps(out)  # one JSON line
