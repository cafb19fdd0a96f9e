"""A hybrid run end to end, without Bluetooth hardware.

A radio hub (one virtual controller per pilot, range and RSSI from a scripted proximity
schedule), the coordinator, the aggregator, two simulated pools and four pilot processes
(``device-agent run --pilot-agent A --radio bumble --hci tcp-client:…``: real bumble hosts
over TCP) run two protocol days of a population of 80 at 2880× (a day in 30 s).

* Pilot↔pilot contacts come from the radios: each pilot's recovered weights match the schedule
  within the band ``docs/ble.md`` gives, and a pilot near nobody hears nobody.
* Every advert rotates its address with its RPI.
* Equivalence: the run's daily aggregates equal those of the central simulator fed with the
  contact graph whose pilot↔pilot edges are the ones actually realised (read by this harness
  from the pilots' private stores after the run), and the gradient agrees within 1e-6.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from audit.truth import bytes_needles, distinctive, float_needles
from decentsim import decentralize
from device_agent.radio import RadioStore
from device_agent.store import PoolStore, state_from_bytes
from launcher.federation import Federation
from protocols.ble.proximity import ProximitySchedule
from protocols.ble.radio import DAY_SECONDS, DEFAULT_EPOCH
from protocols.ble.scoring import match_keys, score
from sim import dual, env, models, populations
from sim.model import W_BITS, message, quantize
from sim.params import BASE_PARAMS, Theta
from sim.populations import ContactLayer, Population, from_spec
from sim.runner import CentralSimulator, total_infections

ROOT = Path(__file__).resolve().parents[2]
POPULATION = "synthetic:80"
#: agents 9 and 28 start infectious (seed 0, init_frac 0.1), 5 and 3 susceptible: the messages
#: the radios carry from 9 and 28 to 5 move its exposure, so losing them changes the result
PILOTS = (9, 5, 28, 3)
DAYS = 2
SCALE = 2880.0  # a protocol day per 30 wall seconds
THETA = {"beta": 0.6, "mortality": 0.5, "init_frac": 0.1}
SCHEDULE = """\
start_s,end_s,a,b,distance_m
# day 0 (from 08:00, so a loaded machine has every radio up): 45 min at 1 m; 30 min at 8 m
28800,31500,9,5,1.0
36000,37800,5,28,8.0
# day 1: 30 min at 1 m; 45 min at 1 m again
115200,117000,9,28,1.0
118800,121500,9,5,1.0
# pilot 3 is never near anyone
"""
Edges = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: pilot 3 is killed during day 0 and down through its round: it sits that day out
ABSENT = {0: [3]}
#: one scan credits 240 protocol seconds (see test_pilot_radio)
SCAN_WEIGHT = 240.0 / 900.0


def realised_contacts(
    fed: Federation,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per day, the pilot↔pilot contacts the radios realised: ``src`` heard ``dst`` with
    weight ``w`` (each heard RPI's weight on the model's grid, summed, as the pilot posts
    them), from the pilots' private stores and TEKs."""
    stores = {a: RadioStore(fed.pilot_dir(a)) for a in PILOTS}
    teks = {a: stores[a].teks() for a in PILOTS}
    out = {}
    for day in range(DAYS):
        start = float(DEFAULT_EPOCH + day * DAY_SECONDS)
        src, dst, w = [], [], []
        for a in PILOTS:
            trace = score(stores[a].sightings(start, start + DAY_SECONDS))
            weight = quantize(torch.from_numpy(trace.weight), W_BITS)
            for b in PILOTS:
                hit = torch.from_numpy(match_keys(trace.rpi, trace.interval, teks[b]) >= 0)
                for value in weight[hit].tolist():  # one message per heard RPI
                    src.append(a)
                    dst.append(b)
                    w.append(value)
        out[day] = (
            torch.tensor(src, dtype=torch.int64),
            torch.tensor(dst, dtype=torch.int64),
            torch.tensor(w, dtype=torch.float64),
        )
    return out


class RealisedCentral(CentralSimulator):
    """The central simulator on the population without pilot↔pilot edges, plus each day's
    realised pilot↔pilot contacts (``src`` heard ``dst``: ``src`` sends to ``dst``); an agent
    ``absent`` on a day (its device was off through that day's round) sends and receives
    nothing that day and is not in that day's aggregates."""

    def __init__(
        self,
        *args: Any,
        realised: dict[int, Edges],
        absent: dict[int, list[int]] | None = None,
        **kw: Any,
    ):
        super().__init__(*args, **kw)
        self.realised = realised
        self.absent = absent or {}

    def _present(self, day: int, like: torch.Tensor) -> torch.Tensor:
        present = torch.ones(like.shape[0], 1, dtype=like.dtype)
        present[self.absent.get(day, [])] = 0.0
        return present

    def neighbourhood_sums(
        self, q: torch.Tensor, day: int, at_work: torch.Tensor | None = None
    ) -> torch.Tensor:
        present = self._present(day, q)
        q = q * present
        total = super().neighbourhood_sums(q, day, at_work)
        src, dst, w = self.realised[day]
        return total.index_add(0, dst, message(q[src], w)) * present

    def observe(self, y: torch.Tensor, day: int) -> torch.Tensor:
        """The day's aggregates without the absent agents' observations."""
        return super().observe(y * self._present(day, y).unsqueeze(-1), day)


def without_pilot_pairs(pop: Population) -> Population:
    """``pop`` with no edge between two pilots (those happen on the air)."""
    pilots = torch.tensor(PILOTS)
    layers = []
    for layer in pop.layers:
        keep = ~(torch.isin(layer.src, pilots) & torch.isin(layer.dst, pilots))
        layers.append(
            ContactLayer(layer.name, layer.src[keep], layer.dst[keep], layer.weight[keep])
        )
    return replace(pop, layers=tuple(layers))


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("hybrid")
    schedule = tmp / "schedule.csv"
    schedule.write_text(SCHEDULE)
    # servers, pools and pilots start and enrol before day 0 (a loaded 2-core CI box included)
    wall_epoch = time.time() + 30.0
    clock = ["--clock-scale", str(SCALE), "--sim-epoch", str(DEFAULT_EPOCH),
             "--wall-epoch", str(wall_epoch)]  # fmt: skip
    hub = subprocess.Popen(
        [sys.executable, "-m", "decentsim", "radio-hub", "--schedule", str(schedule),
         "--agents", ",".join(map(str, PILOTS)), "--sniff", str(tmp / "sniff.json"), *clock],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    real = None
    try:
        assert hub.stdout is not None
        ports = {int(a): p for a, p in json.loads(hub.stdout.readline())["ports"].items()}
        simulation = env.create_from_template(
            models.epidemiology, populations.synthetic(80, seed=0), theta=Theta(**THETA),
            seed=0, days=DAYS,
        )  # fmt: skip
        radio = ["--advertising-interval-ms", "20", "--scan-window-s", "0.06",
                 "--scan-interval-s", str(240.0 / SCALE)]  # fmt: skip
        real = decentralize(
            simulation, root=tmp / "run", pools=2, radio="ideal", step_timeout_s=15.0,
            pilots=PILOTS, start=wall_epoch, clock_scale=SCALE,
            pilot_radios={a: ["--hci", f"tcp-client:127.0.0.1:{ports[a]}", *radio] for a in PILOTS},
        )  # fmt: skip
        real.deploy(timeout_s=120.0)  # returns once the four pilots have enrolled
        enrolled_at_deploy = real.federation.pilots_enrolled()
        fed, spec = real.federation, real.spec
        # kill -9 a pilot in the middle of protocol day 0; it stays down through day 0's
        # round (which closes without it once registration's 15 s deadline passes, half-way
        # through protocol day 1), then starts again from its store in time for day 1's round
        while spec.clock().now() < DEFAULT_EPOCH + 12 * 3600:
            time.sleep(0.05)
        fed.kill("pilot-3")
        killed_at = spec.clock().now()
        fed.wait(until_days=1, timeout_s=120.0, allow_dead=frozenset({"pilot-3"}))
        fed.start_pilot(3)
        restarted_at = spec.clock().now()
        days = [real.sync(timeout_s=120.0) for _ in range(DAYS)]
        results = fed.results()
        status = subprocess.run(
            [sys.executable, "-m", "decentsim", "pilot", "status", "--state-dir",
             str(fed.c_dir), "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    finally:
        if real is not None:
            real.close()
        hub.send_signal(signal.SIGTERM)
        hub.communicate(timeout=30)
    return {
        "fed": fed,
        "spec": spec,
        "results": results,
        "schedule": ProximitySchedule.read(schedule),
        "sniff": json.loads((tmp / "sniff.json").read_text()),
        "status": json.loads(status),
        "days": days,
        "enrolled_at_deploy": enrolled_at_deploy,
        "killed_at": killed_at,
        "restarted_at": restarted_at,
        "status_text": status,
    }


def test_hybrid_run_equals_the_central_simulator_on_the_realised_contacts(
    hybrid: dict[str, Any],
) -> None:
    fed, spec, results = hybrid["fed"], hybrid["spec"], hybrid["results"]
    realised = realised_contacts(fed)
    assert all(len(realised[d][0]) > 0 for d in range(DAYS))  # the radios did carry contacts
    pop = from_spec(POPULATION, seed=spec.seed)
    central = RealisedCentral(
        without_pilot_pairs(pop), spec.model_config(), spec.seed, realised=realised, absent=ABSENT
    ).run(spec.theta_object(), DAYS, "forward")
    ref = dual.value(central.y).detach().numpy()
    assert ref[:, 0].sum() > 0
    np.testing.assert_array_equal(results["y"][..., 0], ref)
    # decentralize(..., pilots=…): deploy() waited for the pilots, sync() gave each day
    assert hybrid["enrolled_at_deploy"] == len(PILOTS)
    assert [d["day"] for d in hybrid["days"]] == list(range(DAYS))
    assert [d["new_infections"] for d in hybrid["days"]] == ref[:, 0].sum(-1).tolist()
    _, grad = central.loss_and_grad(total_infections)
    assert grad is not None
    got = np.array([results["grad"][n] for n in BASE_PARAMS])
    np.testing.assert_allclose(got, grad.numpy(), rtol=1e-6, atol=1e-6)
    # and the radios' contacts mattered: without them the gradient is another
    empty = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    none = {d: (*empty, torch.zeros(0, dtype=torch.float64)) for d in range(DAYS)}
    without = RealisedCentral(
        without_pilot_pairs(pop), spec.model_config(), spec.seed, realised=none, absent=ABSENT
    ).run(spec.theta_object(), DAYS, "forward")
    _, grad_without = without.loss_and_grad(total_infections)
    assert grad_without is not None
    assert np.abs(grad_without.numpy() - got).max() > 1e-3


def test_pilot_contacts_follow_the_schedule(hybrid: dict[str, Any]) -> None:
    fed, schedule = hybrid["fed"], hybrid["schedule"]
    realised = realised_contacts(fed)
    for day in range(DAYS):
        src, dst, w = realised[day]
        for a in PILOTS:
            for b in PILOTS:
                if a == b:
                    continue
                got = float(w[(src == a) & (dst == b)].sum())
                expected = schedule.expected_weight(
                    a, b, day * DAY_SECONDS, (day + 1) * DAY_SECONDS
                )
                if expected == 0:
                    assert got == 0.0, (day, a, b, got)
                else:
                    assert abs(got - expected) <= 0.15 * expected + 2 * SCAN_WEIGHT, (
                        day, a, b, got, expected,
                    )  # fmt: skip


def test_every_address_carries_one_rpi(hybrid: dict[str, Any]) -> None:
    address_rpis = hybrid["sniff"]["address_rpis"]
    # four pilots, each a new address every interval of two days (most of them heard)
    assert len(address_rpis) >= 4 * 2 * 144 // 2
    assert all(len(rpis) == 1 for rpis in address_rpis.values())


def test_the_operator_sees_the_fleet_and_no_contact_counts(hybrid: dict[str, Any]) -> None:
    """``pilot status``: every pilot enrolled through its URI (its token bound to its agent),
    heard from, with a working radio; and nothing that counts what a device heard."""
    status, fed = hybrid["status"], hybrid["fed"]
    assert status["fleet"] == {
        "pilots": 4, "enrolled": 4, "online": 4, "days_committed": DAYS, "days": DAYS,
    }  # fmt: skip
    assert [p["agent"] for p in status["pilots"]] == list(PILOTS)
    allowed = {
        "agent", "enrolled", "last_seen_s", "online", "clock_skew_s", "last_round", "version",
        "scanner_healthy", "scanner_last_success_age_s", "advertiser_last_rotation_age_s",
        "privacy_alarm", "radio_reopened", "battery_bucket", "free_disk_bucket",
    }  # fmt: skip
    for pilot in status["pilots"]:
        assert set(pilot) == allowed, set(pilot) ^ allowed
        assert pilot["scanner_healthy"] and not pilot["privacy_alarm"]
        assert 0 <= pilot["advertiser_last_rotation_age_s"] < 30
        assert abs(pilot["clock_skew_s"]) < 5 and pilot["last_round"] >= 1
    # each pilot enrolled with the URI pilot enrol wrote for it: 0600, and the PNG too
    for agent in PILOTS:
        for name in (f"pilot-{agent}.uri", f"pilot-{agent}.png"):
            assert (fed.enrolment_dir / name).stat().st_mode & 0o077 == 0


def test_a_pilot_killed_mid_day_drops_out_of_it_and_rejoins_the_next(
    hybrid: dict[str, Any],
) -> None:
    """Pilot 3 was SIGKILLed during protocol day 0 and stayed down through day 0's round:
    the round closed without it; started again from its store, it updated on zero exposure
    for the day it missed, took part in day 1, and was counted once a day at most."""
    fed, killed_at, restarted_at = hybrid["fed"], hybrid["killed_at"], hybrid["restarted_at"]
    day0 = DEFAULT_EPOCH // 600  # day 0's first interval
    assert day0 * 600 < killed_at < (day0 + 144) * 600 < restarted_at  # killed during day 0
    store = RadioStore(fed.pilot_dir(3))
    starts = [k.rolling_start_interval_number for k in store.teks()]
    assert starts.count(day0) == 1 and starts.count(day0 + 144) == 1  # one key a day
    aired = store.broadcasts(day0, day0 + 288)
    dead = aired[(aired * 600 > killed_at + 600) & (aired * 600 < restarted_at - 600)]
    assert dead.size == 0 and aired.max() * 600 > restarted_at  # off the air while dead
    # day 0 closed without it (2 pools + 3 pilots); day 1 counted all six, once each
    conn = sqlite3.connect(fed.c_dir / "coordinator.sqlite3")
    try:
        rows = conn.execute("SELECT day, surviving_observations FROM days ORDER BY day").fetchall()
    finally:
        conn.close()
    assert rows == [(0, 1 + len(PILOTS)), (1, 2 + len(PILOTS))]
    pool = PoolStore(fed.pilot_dir(3))
    assert list(pool.observed(0)) == [1]  # it sent its observations of day 1 only
    assert "went by without this pool" in (fed.pilot_dir(3) / "agent.log").read_text()


def pilot_needles(fed: Federation, sniff: dict[str, Any]) -> dict[str, list[bytes]]:
    """What no server may hold, by label: each pilot's TEKs, the RPIs it broadcast and heard,
    the addresses it advertised from, and its state's values."""
    needles: dict[str, list[bytes]] = {}
    for a in PILOTS:
        store = RadioStore(fed.pilot_dir(a))
        for k in store.teks():
            needles[f"pilot-{a} TEK {k.rolling_start_interval_number}"] = bytes_needles(k.key)
            for j, rpi in enumerate(k.all_rpis()[::12]):
                needles[f"pilot-{a} RPI {k.rolling_start_interval_number}#{j}"] = bytes_needles(
                    bytes(rpi)
                )
        heard = store.sightings(0.0, 1e12)
        for j, rpi in enumerate(heard.rpis[:10]):
            needles[f"pilot-{a} heard RPI #{j}"] = bytes_needles(bytes(rpi))
        states = query_states(fed.pilot_dir(a))
        for j, v in enumerate(distinctive(states, set())[:10]):
            needles[f"pilot-{a} state #{j}"] = float_needles(v)
    for j, address in enumerate(sorted(sniff["address_rpis"])[::25]):
        needles[f"advertiser address #{j}"] = [address.encode(), address.lower().encode()]
    return needles


def query_states(pilot_dir: Path) -> np.ndarray:
    """Every value of a pilot's stored start-of-day states (its private dual state)."""
    conn = sqlite3.connect(pilot_dir / "pool.sqlite3")
    try:
        blobs = conn.execute("SELECT state FROM states").fetchall()
    finally:
        conn.close()
    return np.concatenate([state_from_bytes(bytes(b)).x.numpy().ravel() for (b,) in blobs])


def test_no_server_file_or_status_holds_a_pilots_keys_beacons_or_state(
    hybrid: dict[str, Any], tmp_path: Path
) -> None:
    fed = hybrid["fed"]
    needles = pilot_needles(fed, hybrid["sniff"])
    assert len(needles) > 4 * 10
    server_files = [p for d in (fed.c_dir, fed.a_dir) for p in sorted(d.rglob("*")) if p.is_file()]
    assert {"coordinator.sqlite3", "aggregator.sqlite3"} <= {p.name for p in server_files}
    status = tmp_path / "status.json"
    status.write_text(hybrid["status_text"])
    assert scan([*server_files, status], needles) == []
    # the scan can fail: each pilot's own stores hold its keys, beacons and state
    with_state = 0
    for a in PILOTS:
        found = {label for label, _ in scan(sorted(fed.pilot_dir(a).glob("*.sqlite3*")), needles)}
        assert any(label.startswith(f"pilot-{a} TEK") for label in found)
        # a pilot whose state moved (its tangents are not all 0 or 1) has state needles
        state = [label for label in needles if label.startswith(f"pilot-{a} state")]
        if state:
            with_state += 1
            assert set(state) <= found
    assert with_state >= 1  # pilot 5, exposed by 9 and 28: its tangents moved
    canary = tmp_path / "leak.jsonl"
    canary.write_bytes(b'{"rpi": "' + needles[next(iter(needles))][1] + b'"}')
    assert [label for label, _ in scan([canary], needles)] == [next(iter(needles))]


def scan(files: list[Path], needles: dict[str, list[bytes]]) -> list[tuple[str, str]]:
    """(label, file) for every needle found in a file's bytes."""
    hits = []
    for f in files:
        data = f.read_bytes()
        hits += [(label, str(f)) for label, ns in needles.items() if any(n in data for n in ns)]
    return hits
