"""Exposure scoring: hand-computed weights, de-duplication, windows, skew-tolerant matching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.ble import gaen
from protocols.ble.errors import ScoringConfigError, SightingsError
from protocols.ble.scoring import ScoringConfig, match_keys, score
from protocols.ble.sightings import Sightings

T0 = 1_600_000_200.0  # inside ENIN 2666667


def make(rows: list[tuple[int, int, float, int, float, float]], n_rpis: int = 3) -> Sightings:
    """rows: (observer, beacon, rssi, scan, time, seconds); TX power -8 dBm."""
    cols = list(zip(*rows, strict=True))
    rpis = np.repeat(np.arange(n_rpis, dtype=np.uint8)[:, None], 16, axis=1)
    return Sightings(
        observer=np.array(cols[0], np.int64),
        beacon=np.array(cols[1], np.int64),
        rpis=rpis,
        rssi=np.array(cols[2], np.float64),
        tx_power=np.full(len(rows), -8.0),
        time=np.array(cols[4], np.float64),
        scan=np.array(cols[3], np.int64),
        seconds=np.array(cols[5], np.float64),
    )


def test_hand_computed_weight() -> None:
    s = make(
        [
            (0, 1, -58.0, 10, T0, 240.0),  # scan 10: attenuations 50 and 54 -> mean 52
            (0, 1, -62.0, 10, T0 + 1, 240.0),  #   -> bucket 0 (<= 55 dB), weight 1.0
            (0, 1, -68.0, 11, T0 + 240, 240.0),  # scan 11: 60 dB -> bucket 1, weight 0.5
            (0, 1, -90.0, 12, T0 + 480, 240.0),  # scan 12: 82 dB -> bucket 3, weight 0
        ]
    )
    trace = score(s)
    assert trace.entries() == [(bytes([1] * 16), int(T0 // 600), 240 / 900 * 1.0 + 240 / 900 * 0.5)]


def test_dedup_counts_a_scan_once_and_clamps_attenuation() -> None:
    one = make([(0, 0, 0.0, 1, T0, 240.0)])  # rssi above tx power: attenuation clamped to 0
    many = make([(0, 0, 0.0, 1, T0 + i * 0.25, 240.0) for i in range(16)])
    assert score(one).weight.tolist() == score(many).weight.tolist() == [240 / 900]


def test_window_is_capped_at_30_minutes() -> None:
    # 7 scans 250 s apart each credit 300 s: 2100 s credited inside one 30-min window.
    rows = [(0, 0, -50.0, k, T0 + 250.0 * k, 300.0) for k in range(7)]
    assert score(make(rows)).weight.tolist() == [pytest.approx(1800 / 900)]
    rows += [(0, 0, -50.0, 7, T0 + 1800.0 + 1, 300.0)]  # a second window opens at 30 min
    assert score(make(rows)).weight.tolist() == [pytest.approx(2.0 + 300 / 900)]


def test_zero_weight_entries_dropped_and_config_applies() -> None:
    s = make([(0, 0, -90.0, 1, T0, 240.0), (0, 1, -50.0, 1, T0, 240.0)])
    assert [r[0] for r in score(s).entries()] == [bytes([1] * 16)]
    cfg = ScoringConfig(thresholds_db=(40.0,), bucket_weights=(1.0, 0.25), reference_seconds=480.0)
    assert score(s, cfg).weight.tolist() == [0.125, 0.125]


def test_observers_are_scored_independently() -> None:
    rows = [
        (obs, b, -50.0 - 5 * b, k, T0 + 240 * k, 240.0)
        for obs in range(3)
        for b in range(3)
        for k in range(obs + 1)
    ]
    s = make(rows)
    whole = score(s)
    for obs in range(3):
        alone = score(s.for_observer(obs))
        assert whole.entries(obs) == alone.entries()
    with pytest.raises(SightingsError, match="trace holds 3 observers"):
        whole.entries()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(-95, -30), st.integers(0, 20)),
        min_size=1,
        max_size=60,
    ),
    st.randoms(),
)
def test_row_order_does_not_matter(rows: list, rnd) -> None:
    full = [(o, b, float(r), k, T0 + 240.0 * k, 240.0) for o, b, r, k in rows]
    shuffled = full[:]
    rnd.shuffle(shuffled)
    a, b = score(make(full)), score(make(shuffled))
    for obs in range(3):
        ea, eb = sorted(a.entries(obs)), sorted(b.entries(obs))
        assert [e[:2] for e in ea] == [e[:2] for e in eb]
        assert [e[2] for e in ea] == pytest.approx([e[2] for e in eb], rel=1e-12)


def test_bad_config_and_sightings() -> None:
    with pytest.raises(ScoringConfigError, match="strictly increasing"):
        ScoringConfig(thresholds_db=(60.0, 50.0), bucket_weights=(1.0, 0.5, 0.0))
    with pytest.raises(ScoringConfigError, match="need 3 bucket_weights for 2 thresholds"):
        ScoringConfig(thresholds_db=(50.0, 60.0), bucket_weights=(1.0, 0.5))
    with pytest.raises(ScoringConfigError, match="reference_seconds must be > 0"):
        ScoringConfig(reference_seconds=0.0)
    good = make([(0, 0, -50.0, 1, T0, 240.0)])
    with pytest.raises(SightingsError, match=r"sightings\.rssi has 2 rows, observer has 1"):
        Sightings(**{**good.__dict__, "rssi": np.zeros(2)})
    with pytest.raises(SightingsError, match=r"sightings\.scan must be int64, got float64"):
        Sightings(**{**good.__dict__, "scan": np.zeros(1)})
    with pytest.raises(SightingsError, match=r"beacon must index rpis \(0..2\)"):
        Sightings(**{**good.__dict__, "beacon": np.array([3])})
    with pytest.raises(SightingsError, match="seconds must be >= 0"):
        Sightings(**{**good.__dict__, "seconds": np.array([-1.0])})


def test_matching_tolerates_two_hours_of_clock_skew() -> None:
    start = 2642976
    key = gaen.TemporaryExposureKey(bytes(range(16)), start)
    other = gaen.TemporaryExposureKey(bytes(16), start)
    heard_enin = start + 60
    rpi = np.frombuffer(gaen.rpi(key.rpik, heard_enin), np.uint8)[None, :]
    rpis = np.repeat(rpi, 5, axis=0)
    skews = np.array([-12, 0, 12, 13, -13])  # the observer's clock runs ahead/behind
    got = match_keys(rpis, heard_enin + skews, [other, key])
    assert got.tolist() == [1, 1, 1, -1, -1]
    assert match_keys(rpis, heard_enin + skews, [other, key], tolerance_intervals=13).tolist() == [
        1,
        1,
        1,
        1,
        1,
    ]
    unknown = np.zeros((1, 16), np.uint8)
    assert match_keys(unknown, np.array([heard_enin]), [key]).tolist() == [-1]


def test_wide_scan_ids_take_the_lexsort_path_with_the_same_result() -> None:
    rows = [
        (o, b, -50.0 - 7 * b, k, T0 + 240.0 * k, 240.0)
        for o in range(2)
        for b in range(3)
        for k in range(4)
    ]
    small = make(rows)
    wide = Sightings(**{**small.__dict__, "scan": small.scan * (2**60) - 2**62})  # > 63 bits
    a, b = score(small), score(wide)
    assert a.entries(0) == b.entries(0) and a.entries(1) == b.entries(1)
    assert len(a) == 6
