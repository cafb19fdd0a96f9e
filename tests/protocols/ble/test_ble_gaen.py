"""GAEN v1.2 beacon crypto: the published test vectors (all 144 intervals) and input checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from protocols.ble import gaen
from protocols.ble.errors import BadVersion, CryptoInputError
from protocols.ble.simkeys import SimulatedKeyring

VECTORS = json.loads((Path(__file__).parent / "vectors" / "gaen_v1_2_published.json").read_text())
TEK = bytes.fromhex(VECTORS["tek"])
META = bytes.fromhex(VECTORS["ble_metadata"])
START = VECTORS["ctinterval_number_of_generated_key"]


def test_vector_file_is_complete() -> None:
    assert VECTORS["source"] == "published"
    assert [row["i"] for row in VECTORS["intervals"]] == list(range(144))


def test_key_schedule_vectors() -> None:
    assert gaen.en_interval_number(VECTORS["key_generation_unix_seconds"]) == START
    assert gaen.rpik(TEK).hex() == VECTORS["rpik"]
    assert gaen.aemk(TEK).hex() == VECTORS["aemk"]


@pytest.mark.parametrize("row", VECTORS["intervals"], ids=lambda r: f"i{r['i']}")
def test_every_published_interval(row: dict) -> None:
    rpik, aemk = bytes.fromhex(VECTORS["rpik"]), bytes.fromhex(VECTORS["aemk"])
    r = gaen.rpi(rpik, START + row["i"])
    assert r.hex() == row["rpi"]
    a = gaen.aem(aemk, r, META)
    assert a.hex() == row["aem"]
    assert gaen.aem_decrypt(aemk, r, a) == META


def test_batch_paths_match_vectors() -> None:
    key = gaen.TemporaryExposureKey(TEK, START)
    expected = np.array([list(bytes.fromhex(r["rpi"])) for r in VECTORS["intervals"]], np.uint8)
    np.testing.assert_array_equal(key.all_rpis(), expected)
    aems = gaen.aem_batch(key.aemk, expected, META)
    assert [bytes(a).hex() for a in aems] == [r["aem"] for r in VECTORS["intervals"]]
    assert key.identifiers(START + 7, META) == (
        bytes.fromhex(VECTORS["intervals"][7]["rpi"]),
        bytes.fromhex(VECTORS["intervals"][7]["aem"]),
    )


def test_metadata_of_vectors() -> None:
    meta = gaen.parse_metadata(META)
    assert (meta.major, meta.minor, meta.tx_power_dbm) == (1, 0, 8)
    assert gaen.encode_metadata(8) == META
    assert gaen.parse_metadata(gaen.encode_metadata(-20)).tx_power_dbm == -20


def test_bad_version_rejected() -> None:
    with pytest.raises(BadVersion, match=r"metadata version 2\.0 unsupported"):
        gaen.parse_metadata(bytes([0x80, 0, 0, 0]))
    with pytest.raises(BadVersion, match=r"version 0\.1"):
        gaen.parse_metadata(bytes([0x10, 0, 0, 0]))


def test_interval_number_edges() -> None:
    assert gaen.en_interval_number(599.999) == 0
    assert gaen.en_interval_number(600) == 1
    for bad, msg in ((-1, ">= 0"), (math.nan, "finite"), (True, "number"), ("1", "number")):
        with pytest.raises(CryptoInputError, match=msg):
            gaen.en_interval_number(bad)  # type: ignore[arg-type]


def test_bad_key_inputs_named() -> None:
    with pytest.raises(CryptoInputError, match="TEK must be 16 bytes, got 15"):
        gaen.rpik(TEK[:15])
    with pytest.raises(CryptoInputError, match="TEK must be bytes, got str"):
        gaen.aemk("00" * 16)  # type: ignore[arg-type]
    with pytest.raises(CryptoInputError, match=r"ENIN must be in \[0, 2\*\*32\)"):
        gaen.rpi(bytes(16), 2**32)
    with pytest.raises(CryptoInputError, match="metadata must be 4 bytes, got 3"):
        gaen.aem(bytes(16), bytes(16), b"\x40\x00\x00")
    with pytest.raises(CryptoInputError, match="AEM must be 4 bytes"):
        gaen.aem_decrypt(bytes(16), bytes(16), b"\x00")
    with pytest.raises(CryptoInputError, match="rolling_period must be in"):
        gaen.TemporaryExposureKey(TEK, START, rolling_period=145)


def test_new_tek_is_random() -> None:
    keys = {gaen.new_tek() for _ in range(64)}
    assert len(keys) == 64 and all(len(k) == 16 for k in keys)


def test_key_rolling() -> None:
    made: list[int] = []

    def source(start: int) -> bytes:
        made.append(start)
        return start.to_bytes(16, "big")

    roller = gaen.KeyRoller(source, retention_days=2)
    day0 = START * gaen.EN_INTERVAL_SECONDS
    seen = [roller.identifiers_at(day0 + 600 * i, META)[0] for i in range(144 * 3)]
    assert len(set(seen)) == 144 * 3  # a new identifier every interval
    assert made == [START, START + 144, START + 288]  # one TEK per day
    retained = [k.rolling_start_interval_number for k in roller.retained_keys()]
    assert retained == [START + 144, START + 288]
    key = roller.key_for(START + 150)
    with pytest.raises(CryptoInputError, match="outside key validity"):
        key.identifiers(START + 144 * 2, META)


def test_simulated_keyring_matches_spec() -> None:
    ring = SimulatedKeyring(bytes(range(16)))
    devices = np.array([5, 5, 9, 5, 2**31 - 1], dtype=np.int64)
    enins = np.array([START, START + 143, START + 3, START + 144, START + 1], dtype=np.int64)
    got = ring.rpis(devices, enins)
    for d, e, row in zip(devices, enins, got, strict=True):
        assert bytes(row) == gaen.rpi(ring.key(int(d), int(e)).rpik, int(e))
    assert ring.key(5, START).key != ring.key(5, START + 144).key
    assert SimulatedKeyring(bytes(16)).key(5, START).key != ring.key(5, START).key
    with pytest.raises(CryptoInputError, match="multiples of 144"):
        ring.teks(np.array([1]), np.array([START + 1]))


def test_simulated_keyring_remembers_a_day_without_changing_an_rpi() -> None:
    """A pool asks for its own beacons, then its radio for overlapping ones, then a new day:
    every answer equals a fresh keyring's, and the overlap is not derived again."""
    ring, fresh = SimulatedKeyring(bytes(range(16))), SimulatedKeyring(bytes(range(16)))
    own = np.array([3, 3, 7], dtype=np.int64), np.array([START, START + 1, START], np.int64)
    heard = np.array([7, 3, 11, 3], dtype=np.int64), np.array([START] * 3 + [START + 1], np.int64)
    assert np.array_equal(ring.rpis(*own), fresh.rpis(*own))
    derived = []
    original = ring._compute
    ring._compute = lambda d, e: derived.append(len(d)) or original(d, e)  # type: ignore[method-assign]
    assert np.array_equal(ring.rpis(*heard), fresh.rpis(*heard))
    assert derived == [1]  # only device 11's beacon was new
    next_day = np.array([3], np.int64), np.array([START + 144], np.int64)
    assert np.array_equal(ring.rpis(*next_day), fresh.rpis(*next_day))


def test_simulated_keyring_derives_tomorrow_ahead() -> None:
    """A pool prefetches tomorrow's own beacons while it waits: asking for them then derives
    nothing more, every RPI equals a fresh keyring's, and a prefetch for a day that is not
    the one asked next is dropped (the RPIs are derived as usual)."""
    ring, fresh = SimulatedKeyring(bytes(range(16))), SimulatedKeyring(bytes(range(16)))
    tomorrow = np.array([3, 3, 9], np.int64), np.array([START + 144, START + 145, START + 144])
    ring.prefetch(*tomorrow)
    derived = []
    original = ring._compute
    ring._compute = lambda d, e: derived.append(len(d)) or original(d, e)  # type: ignore[method-assign]
    assert np.array_equal(ring.rpis(*tomorrow), fresh.rpis(*tomorrow))
    heard = np.array([9, 4], np.int64), np.array([START + 144, START + 150], np.int64)
    assert np.array_equal(ring.rpis(*heard), fresh.rpis(*heard))
    assert derived == [1]  # only device 4's beacon: the prefetched ones were ready
    ring.prefetch(np.array([3], np.int64), np.array([START + 3 * 144], np.int64))
    later = np.array([3], np.int64), np.array([START + 2 * 144], np.int64)
    assert np.array_equal(ring.rpis(*later), fresh.rpis(*later))
    assert derived == [1, 1] and ring._pending is None
    ring.prefetch(np.array([3, 4]), np.array([START, START + 144]))  # two days: ignored
    assert ring._pending is None
