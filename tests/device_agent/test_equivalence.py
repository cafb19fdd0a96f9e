"""Equivalence invariant: device pools over secure slot sums reproduce the central simulator.

Two pools hold half of a synthetic population each; each pool splits its devices into
secure-sum participants of at most ``unit_devices`` devices, and every participant posts its
devices' messages (pre-summed per heard slot) and their summed observations through the
in-memory secure-sum transport (mailbox and shuffled modes). The coordinator sees only the
opened daily aggregates. With the model's exact sums (float64) and an ideal radio those
equal the central ``RunResult.y`` values bit for bit, and the gradient agrees to fixed-point
precision.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pytest
import torch

from contract.round import FederatedRun, InMemoryServers, RoundDriver, RoundError
from contract.schedule import MESSAGES_PHASE, OBSERVATIONS_PHASE, UNIT_DEVICES
from device_agent.pool import (
    BeaconScheduleError,
    Connect,
    DevicePool,
    PoolInputError,
    PoolStateError,
    SimulatedWorld,
    TraceOverflow,
)
from protocols.ble.radio import IdealRadio, RadioModel, SimulatedRadio
from protocols.ble.simkeys import SimulatedKeyring
from protocols.secure_sum import DeviceClient, InMemoryNetwork, Mode, RoundSpec
from sim import dual
from sim.model import ModelConfig, behaviour, infectiousness, initial_state, update
from sim.params import Theta
from sim.populations import AGE_GROUPS, Population, synthetic
from sim.runner import CentralSimulator, RunResult, total_infections

N, SEED, DAYS = 300, 3, 6
THETA = Theta(beta=0.6, init_frac=0.05)
CONFIG = ModelConfig()
#: at least the largest number of RPIs a device hears in a day (27 in this population)
ITEMS = 32
#: the ideal radio uses the first two intervals of the day here
ADVERTISED = 4


@pytest.fixture(scope="module")
def population() -> Population:
    return synthetic(N, seed=1)


@pytest.fixture(scope="module")
def central(population: Population) -> RunResult:
    return CentralSimulator(population, CONFIG, SEED, dtype=torch.float64).run(
        THETA, DAYS, "forward"
    )


def split(n: int, pools: int) -> list[torch.Tensor]:
    """A random partition of the agents into pools (not contiguous id ranges)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(11))
    return [torch.sort(part).values for part in perm.chunk(pools)]


#: ``connect_for(servers, pool index)``: the ``connect`` a pool of the federation gets
ConnectFor = Callable[[InMemoryServers, int], Connect]


def federation(
    population: Population,
    mode: Mode,
    pools: int = 2,
    items: int = ITEMS,
    unit_devices: int = UNIT_DEVICES,
    connect_for: ConnectFor | None = None,
) -> tuple[RoundDriver, list[DevicePool], list[torch.Tensor]]:
    keyring = SimulatedKeyring(bytes(range(16)))
    world = SimulatedWorld(population, CONFIG, IdealRadio(keyring), ADVERTISED)
    servers = InMemoryServers(mode)
    parts = split(population.n_agents, pools)
    device_pools = [
        DevicePool.of_population(
            ids,
            population,
            CONFIG,
            SEED,
            keyring,
            world,
            servers.connect if connect_for is None else connect_for(servers, k),
            unit_devices=unit_devices,
        )
        for k, ids in enumerate(parts)
    ]
    driver = RoundDriver(
        servers.neighbourhood,
        servers.aggregates,
        device_pools,
        items,
        device_pools[0].world.advertising_intervals,
    )
    return driver, device_pools, parts


class LossyClient(DeviceClient):
    """A participant's aggregates client whose uploads in ``lost_rounds`` never reach C (the
    participant drops out of the phase: a failed upload)."""

    def __init__(self, net: InMemoryNetwork) -> None:
        pid = os.urandom(16)
        super().__init__(pid, net.deployment, lambda raw: net.coordinator.handle_device(raw, pid))
        self.lost_rounds: set[int] = set()

    def post(
        self, spec: RoundSpec, phase: str, slots: Sequence[bytes | str], values: npt.ArrayLike
    ) -> bool:
        """Post, unless this round's upload is lost (then C never sees it)."""
        if spec.round_id in self.lost_rounds:
            return False
        return super().post(spec, phase, slots, values)


def central_per_agent_y(population: Population) -> torch.Tensor:
    """Every agent's own y_i(t) values (T, N, 2) from the central model functions."""
    sim = CentralSimulator(population, CONFIG, SEED, dtype=torch.float64)
    th = sim.theta_dual(THETA, "forward")
    state = initial_state(sim.agents, th, CONFIG, SEED)
    ys = []
    for day in range(DAYS):
        beh = behaviour(sim.agents, state, th, CONFIG, SEED, day)
        q = infectiousness(sim.agents, state, beh, th, CONFIG, day)
        out = update(sim.agents, state, sim.neighbourhood_sums(q, day), beh, th, CONFIG, SEED, day)
        state = out.state
        ys.append(dual.value(out.y))
    return torch.stack(ys)


@pytest.mark.parametrize(
    ("mode", "unit_devices", "participants"),
    [
        (Mode.MAILBOX, UNIT_DEVICES, 2),
        (Mode.SHUFFLED, UNIT_DEVICES, 2),
        (Mode.MAILBOX, 64, 6),
        (Mode.DENSE, 64, 6),
    ],
    ids=["mailbox", "shuffled", "mailbox-units-of-64", "dense-units-of-64"],
)
def test_pools_reproduce_the_central_run_exactly(
    population: Population, central: RunResult, mode: Mode, unit_devices: int, participants: int
) -> None:
    driver, pools, parts = federation(population, mode, unit_devices=unit_devices)
    # each pool of 150 devices is one participant, or three of at most 64 devices
    assert [p.n_units for p in pools] == [participants // 2] * 2
    assert all(len(ids) == N // 2 for ids in parts)
    driver.begin(THETA)
    assert torch.equal(sum(p.stage_counts() for p in pools), central.stage_counts[0])
    days = []
    for day in range(DAYS):
        result = driver.run_day(day, THETA)
        days.append(result)
        assert torch.equal(dual.value(result.y), dual.value(central.y[day])), f"day {day}"
        assert torch.equal(sum(p.stage_counts() for p in pools), central.stage_counts[day + 1])
        # shuffled mode counts unlinkable items (devices × ITEMS per participant, dummies
        # included), mailbox and dense modes whole posts (one per participant)
        expected = N * ITEMS if mode is Mode.SHUFFLED else participants
        assert result.messages.surviving == expected
        # one observation item per participant (its devices' y summed)
        assert result.observations.surviving == participants
    y = torch.stack([d.y for d in days])
    assert float(dual.value(y)[:, 0].sum()) > 60  # a real epidemic was reproduced
    torch.testing.assert_close(dual.tangent(y), dual.tangent(central.y), rtol=1e-6, atol=1e-9)
    loss_c, grad_c = central.loss_and_grad()
    run = FederatedRun(THETA, days)
    loss_f, grad_f = run.loss_and_grad(total_infections)
    assert loss_f == loss_c
    assert grad_c is not None and float(grad_c.abs().max()) > 1.0
    torch.testing.assert_close(grad_f, grad_c, rtol=1e-6, atol=1e-9)
    assert run.daily()["new_infections"] == central.daily()["new_infections"]


def test_dropping_a_pools_messages_changes_the_aggregates(
    population: Population, central: RunResult
) -> None:
    """The control: the comparison above can fail. Without pool 1's messages, its agents'
    infectiousness never reaches anyone and the epidemic diverges from the central one."""
    driver, pools, _ = federation(population, Mode.MAILBOX)
    pools[1].set_dropouts(MESSAGES_PHASE, range(pools[1].n))
    run = driver.run(THETA, DAYS)
    # pool 1's participant still posts (only dummies): a silent device hides among them
    assert all(d.messages.surviving == 2 for d in run.days)
    differs = [
        day
        for day in range(DAYS)
        if not torch.equal(dual.value(run.y[day]), dual.value(central.y[day]))
    ]
    assert differs, "aggregates unchanged although half of all messages were dropped"


def test_aggregate_dropout_opens_the_sum_over_the_surviving_devices(
    population: Population, central: RunResult
) -> None:
    """A device silent in the observations phase (its participant posts the others' sum), and
    a whole participant whose upload is lost (the surviving set excludes it): each day's
    opened sum is exactly the central aggregate minus the missing devices' own y."""
    per_agent = central_per_agent_y(population)  # (T, N, 2)
    # the sanity link between the per-agent values and the central aggregates
    age = torch.nn.functional.one_hot(population.age_group, len(AGE_GROUPS)).double()
    assert torch.equal(torch.einsum("tnk,ng->tkg", per_agent, age), dual.value(central.y))
    device_day, unit_day = 2, 4
    infected = torch.nonzero(per_agent[device_day, :, 0] > 0).flatten()
    assert infected.numel() > 0
    agent = int(infected[0])
    sick_later = torch.nonzero(per_agent[unit_day, :, 0] > 0).flatten()
    assert sick_later.numel() > 0
    lost_agent = int(sick_later[0])

    lossy: dict[tuple[int, int], LossyClient] = {}

    def connect_for(servers: InMemoryServers, k: int) -> Connect:
        def connect(unit: int, devices: int) -> tuple[DeviceClient, DeviceClient]:
            nbhd, _ = servers.connect(unit, devices)
            lossy[k, unit] = LossyClient(servers.aggregates)
            return nbhd, lossy[k, unit]

        return connect

    driver, pools, parts = federation(
        population, Mode.MAILBOX, unit_devices=64, connect_for=connect_for
    )
    participants = sum(p.n_units for p in pools)
    assert participants == len(lossy) == 6
    owner = next(k for k, ids in enumerate(parts) if bool((ids == agent).any()))
    local = int(pools[owner].local_index(torch.tensor([agent]).numpy())[0])
    # the participant hosting lost_agent, and every agent it hosts
    k_lost = next(k for k, ids in enumerate(parts) if bool((ids == lost_agent).any()))
    pool = pools[k_lost]
    unit = int(pool.unit_of[pool.local_index(torch.tensor([lost_agent]).numpy())[0]])
    hosted = parts[k_lost][int(pool.unit_bounds[unit]) : int(pool.unit_bounds[unit + 1])]
    assert 0 < hosted.numel() <= 64 and bool((hosted == lost_agent).any())
    lossy[k_lost, unit].lost_rounds.add(unit_day)  # round ids are days (round_base 0)

    driver.begin(THETA)
    for day in range(DAYS):
        pools[owner].set_dropouts(OBSERVATIONS_PHASE, [local] if day == device_day else [])
        result = driver.run_day(day, THETA)
        expected = dual.value(central.y[day]).clone()
        if day == device_day:
            expected -= torch.einsum("k,g->kg", per_agent[day, agent], age[agent])
        if day == unit_day:
            expected -= torch.einsum("nk,ng->kg", per_agent[day, hosted], age[hosted])
        if day in (device_day, unit_day):
            assert not torch.equal(expected, dual.value(central.y[day]))
        assert torch.equal(dual.value(result.y), expected), f"day {day}"
        assert result.observations.surviving == participants - (day == unit_day)
        assert result.messages.surviving == participants
    # the devices kept computing: their states still match the central run afterwards
    assert torch.equal(sum(p.stage_counts() for p in pools), central.stage_counts[DAYS])


def test_a_device_hearing_more_rpis_than_the_phase_allows_is_refused(
    population: Population,
) -> None:
    # a phone (a participant of one device) has the phase's budget to itself
    driver, _, _ = federation(population, Mode.MAILBOX, items=8, unit_devices=1)
    with pytest.raises(
        TraceOverflow,
        match=r"day 0: participant \d+ heard \d+ distinct RPIs, more than its budget of 8 "
        r"items \(items_per_device=8\)",
    ):
        driver.run(THETA, 1)


def test_beacons_outside_the_advertised_intervals_are_refused(population: Population) -> None:
    keyring = SimulatedKeyring(bytes(16))
    world = SimulatedWorld(population, CONFIG, IdealRadio(keyring), advertising_intervals=1)
    with pytest.raises(BeaconScheduleError, match="outside the 1 advertised intervals"):
        world.radio_day(0)
    with pytest.raises(PoolInputError, match=r"advertising_intervals must be in 1\.\.144, got 145"):
        SimulatedWorld(population, CONFIG, IdealRadio(keyring), advertising_intervals=145)


def test_beacons_of_the_neighbouring_day_are_dropped(population: Population) -> None:
    """Clocks an hour off put beacons of the previous and next day's TEK into the day's
    contacts: they have no slot in the day's round, so the world drops them (never refuses
    the day), and keeps every sighting of the day's own beacons."""
    keyring = SimulatedKeyring(bytes(16))
    radio = SimulatedRadio(keyring, 5, RadioModel(max_clock_skew_s=3600.0))
    world = SimulatedWorld(population, CONFIG, radio)
    raw = radio.transmit(world.contacts(1))
    k = raw.beacon_enin - world.first_interval(1)
    spill = (k < 0) | (k >= 144)
    assert spill.any() and not spill.all()
    day = world.radio_day(1)
    kept = day.beacon_enin - world.first_interval(1)
    assert ((kept >= 0) & (kept < 144)).all()
    assert len(day.sightings) == int((~spill[raw.sightings.beacon]).sum())
    # the same beacons, and each sighting still names its own beacon's RPI
    assert np.array_equal(
        day.sightings.rpis[day.sightings.beacon],
        raw.sightings.rpis[raw.sightings.beacon[~spill[raw.sightings.beacon]]],
    )


def test_pool_refuses_bad_input_and_calls_out_of_order(population: Population) -> None:
    keyring = SimulatedKeyring(bytes(16))
    world = SimulatedWorld(population, CONFIG, IdealRadio(keyring), ADVERTISED)
    servers = InMemoryServers(Mode.MAILBOX)
    ids = torch.tensor([0, 1, 1])
    with pytest.raises(PoolInputError, match="agent_ids must be unique"):
        DevicePool(ids, population.age_group[ids], CONFIG, SEED, keyring, world, servers.connect)
    ids = torch.arange(5)
    with pytest.raises(PoolInputError, match=r"age_group must have shape \(5,\)"):
        DevicePool(ids, population.age_group[:4], CONFIG, SEED, keyring, world, servers.connect)
    with pytest.raises(PoolInputError, match="unit_devices must be >= 1, got 0"):
        DevicePool(
            ids, population.age_group[ids], CONFIG, SEED, keyring, world, servers.connect, None, 0
        )
    pool = DevicePool(ids, population.age_group[ids], CONFIG, SEED, keyring, world, servers.connect)
    spec = RoundSpec(0, ())
    with pytest.raises(PoolStateError, match="call begin"):
        pool.fetch_and_update(spec, 0)
    pool.begin(THETA.as_tensor(torch.float64))
    with pytest.raises(PoolStateError, match="register and post messages before updating"):
        pool.fetch_and_update(spec, 0)
    with pytest.raises(PoolStateError, match="no observations to post"):
        pool.post_observations(spec, 0)
    with pytest.raises(PoolInputError, match=r"out of range 0\.\.4: \[7\]"):
        pool.set_dropouts(MESSAGES_PHASE, [7])
    with pytest.raises(PoolInputError, match="do not belong to this pool"):
        pool.local_index(torch.tensor([9]).numpy())
    with pytest.raises(RoundError, match="messages_per_device must be >= 1"):
        RoundDriver(servers.neighbourhood, servers.aggregates, [pool], 0, 1)
