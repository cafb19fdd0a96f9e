"""The device pool: many virtual devices in one process, each holding one agent.

A device knows only its own agent (its attributes, state and private contact trace) and the
public θ of the round. Per simulated day it

1. registers the pseudonym slots of the beacons (RPIs) it advertised that day;
2. computes its message factor ``q`` (``sim.model.behaviour`` + ``infectiousness``) and posts
   ``message(q, w)`` (value + tangents) to the slot of every RPI it heard, with weight ``w`` from
   its own trace;
3. fetches the *total* of its day's slots — the servers release a device's slot group only
   as one sum, never a beacon's — as its ``incoming`` neighbourhood sum, and applies
   ``sim.model.update`` (f) to its agent;
4. contributes its observations ``y_i(t)`` (and tangents), placed in its age group's column, to
   the aggregate slot ``global/day/<d>``.

A pool is one trust domain (one process holds all its devices' states). For the secure sums it
splits its devices into *participants* of at most ``unit_devices`` devices each; a participant
posts one batch per phase: its devices' messages, pre-summed per heard slot and padded with
zero-valued dummies to exactly ``devices × items_per_device`` items, and its devices' summed
observations as one item. A phone is a pool of one device: exactly the per-device protocol.

The model calls are vectorized over the pool's agents (one ``update`` call for the whole pool);
only the per-participant protocol calls loop (a handful per pool).

:class:`SimulatedWorld` is the physical world of a simulated federation: it turns the
population's contact layers into a day of radio sightings and hands each pool only its own
devices' sightings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import torch

from contract.schedule import (
    FETCH,
    MESSAGES,
    MESSAGES_PHASE,
    OBSERVATIONS_PHASE,
    OBSERVATIONS_STEP,
    REGISTER,
    UNIT_DEVICES,
    day_slot,
    unit_bounds,
)
from protocols.ble import gaen
from protocols.ble.mapping import sightings_from_contacts, traces_from_sightings
from protocols.ble.radio import DayContacts, Radio, RadioDay
from protocols.ble.scoring import Trace
from protocols.ble.sightings import Sightings
from protocols.ble.simkeys import SimulatedKeyring
from protocols.secure_sum import DeviceClient, RoundSpec, pseudonym_slots
from protocols.secure_sum.errors import SecureSumError
from protocols.secure_sum.slots import SLOT_ID_BYTES, SlotTable
from sim import dual
from sim.archetypes import labour_force, population_cells
from sim.model import (
    W_BITS,
    Agents,
    Behaviour,
    ModelConfig,
    State,
    behaviour,
    day_weight,
    infectiousness,
    initial_state,
    make_agents,
    message,
    quantize,
    theta_dual,
    update,
    work_choices,
)
from sim.params import PARAM_NAMES
from sim.populations import AGE_GROUPS, Population

#: ``connect(participant index, devices) -> (neighbourhood client, aggregates client)``: a
#: participant's links to the two secure-sum deployments (one per phase kind, as their
#: fixed-point codecs differ); ``devices`` is how many devices the participant hosts.
Connect = Callable[[int, int], tuple[DeviceClient, DeviceClient]]


class PoolError(Exception):
    """Base class of the device pool's refusals; the message names what is wrong."""


class PoolInputError(PoolError, ValueError):
    """Bad arguments to a pool or world (ids, shapes, settings)."""


class PoolStateError(PoolError):
    """A call out of order (e.g. posting before ``begin`` or updating before posting)."""


class FetchFailed(PoolError):
    """The day's neighbourhood sums could not be fetched (refused, or a reply that failed
    authentication): the devices report it instead of updating."""


class TraceOverflow(PoolError):
    """A device heard more RPIs in a day than the phase's fixed ``items_per_device``."""


class BeaconScheduleError(PoolError):
    """The radio put a beacon outside the intervals the devices advertise (and register)."""


def forward_theta(
    theta: torch.Tensor, grad: tuple[str, ...], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The public θ (p,) as a forward-mode dual (p, 1 + k), unit tangents along ``grad``."""
    if theta.shape != (len(PARAM_NAMES),):
        raise PoolInputError(
            f"theta must have shape ({len(PARAM_NAMES)},), got {tuple(theta.shape)}"
        )
    t = theta.detach().to(dtype)
    return theta_dual(t, grad)


class SimulatedWorld:
    """Who meets whom each day, as seen through a radio: the physics of a simulated run.

    Each day's contacts are the population's layers with ``day_weight`` (the central
    simulator's edge weights, bit for bit); edge ``src → dst`` of the simulator means src sends
    its message to dst, i.e. src must have heard dst's beacon, which is exactly the radio's
    ``DayContacts(src, dst)`` convention. Devices advertise in the first
    ``advertising_intervals`` 10-minute intervals of the day (144: all day, as a phone does);
    a beacon heard outside them could not be registered, so the world refuses it.
    ``observers`` restricts the simulation to the contacts those devices observe (a pool
    simulates only its own devices' radios).

    Under a behaviour table, who is at work is physics too: a workplace contact happens only
    between two agents at work that day (``sim.model.work_choices``: the same draws the agents
    make on their devices, from the public table and θ), so the world holds every agent's
    public archetype cell — what meets whom, never a device's private state.
    """

    def __init__(
        self,
        population: Population,
        config: ModelConfig,
        radio: Radio,
        advertising_intervals: int = gaen.TEK_ROLLING_PERIOD,
        observers: np.ndarray | None = None,
        pilots: np.ndarray | None = None,
    ) -> None:
        if not 1 <= advertising_intervals <= gaen.TEK_ROLLING_PERIOD:
            raise PoolInputError(
                f"advertising_intervals must be in 1..{gaen.TEK_ROLLING_PERIOD}, "
                f"got {advertising_intervals}"
            )
        self.population = population
        self.config = config
        self.radio = radio
        self.advertising_intervals = advertising_intervals
        #: only these devices' radios are simulated (a pool's own), or everyone's
        self.observers = None if observers is None else np.unique(np.asarray(observers))
        #: a run with pilots: their contacts with each other happen on the air, not here; and
        #: every device registers one slot per interval of a physical radio besides
        self.pilots = np.zeros(0, np.int64) if pilots is None else np.unique(np.asarray(pilots))
        self.physical_intervals = gaen.TEK_ROLLING_PERIOD if self.pilots.size else 0
        self._cached: tuple[tuple[int, tuple[float, ...] | None], RadioDay] | None = None
        self._behaviour: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.everyone: Agents | None = None
        if config.behaviour == "table":
            _, cells = population_cells(population)
            self.everyone = make_agents(
                torch.arange(population.n_agents),
                population.age_group,
                config,
                0,  # the seed keys draws the world never makes (durations, archetypes)
                cell=cells,
                labour_force=labour_force(population),
            )

    def first_interval(self, day: int) -> int:
        """The ENIntervalNumber at the start of ``day``."""
        return self.radio.day_start(day) // gaen.EN_INTERVAL_SECONDS

    def contacts(self, day: int, at_work: np.ndarray | None = None) -> DayContacts:
        """The day's directed contacts with their day weights (zero-weight edges dropped:
        their messages are zero, so leaving them out changes no sum); with ``at_work`` (bool
        per agent), workplace contacts only between agents at work."""
        src, dst, w = [], [], []
        for layer in self.population.layers:
            scale = self.config.layer_scale(layer.name, day)
            weight = day_weight(layer.weight.to(torch.float64), scale).numpy()
            keep = weight > 0
            if at_work is not None and layer.name == self.config.work_layer:
                keep &= at_work[layer.src.numpy()] & at_work[layer.dst.numpy()]
            if self.observers is not None:
                # the radio's draws are keyed per contact, so simulating only the pool's own
                # observers gives exactly their sightings of the whole world's run
                keep &= np.isin(layer.src.numpy(), self.observers)
            if self.pilots.size:
                # two pilots meet (or not) in the physical world: their radios say so
                src_pilot = np.isin(layer.src.numpy(), self.pilots)
                keep &= ~(src_pilot & np.isin(layer.dst.numpy(), self.pilots))
            src.append(layer.src.numpy()[keep])
            dst.append(layer.dst.numpy()[keep])
            w.append(weight[keep])
        return DayContacts(
            np.concatenate(src).astype(np.int64),
            np.concatenate(dst).astype(np.int64),
            np.concatenate(w).astype(np.float64),
            day,
        )

    def set_behaviour(self, theta: torch.Tensor, row: torch.Tensor, seed: int) -> None:
        """The public θ (p,), the behaviour table's row and the run seed of the days to come:
        what decides who is at work (a ``table`` run)."""
        self._behaviour = (theta.detach().to(torch.float64), row.to(torch.float64), seed)

    def _at_work(self, day: int) -> np.ndarray | None:
        if self.everyone is None:
            return None
        if self._behaviour is None:
            raise PoolStateError("a behaviour table run: set_behaviour() before the day's radio")
        theta, row, seed = self._behaviour
        return work_choices(self.everyone, theta, self.config, seed, day, row).numpy()

    def radio_day(self, day: int) -> RadioDay:
        """Everyone's sightings of ``day`` (computed once per day and behaviour).

        Around midnight an observer can hear the next (or previous) day's RPI of a contact:
        a scan that started before midnight ends after it, or the owner's clock runs ahead
        (behind). The day's round registers only the day's RPIs, so such beacons have no slot
        this round and are dropped here, as a phone would find them unregistered (Astoria
        under the simulated radio: about one beacon every few days). A beacon inside the day
        but after the advertised intervals is a schedule that cannot work and is refused.
        """
        key = (day, None if self._behaviour is None else tuple(self._behaviour[0].tolist()))
        if self._cached is None or self._cached[0] != key:
            rd = sightings_from_contacts(self.contacts(day, self._at_work(day)), self.radio)
            k = rd.beacon_enin - self.first_interval(day)
            today = (k >= 0) & (k < gaen.TEK_ROLLING_PERIOD)
            unadvertised = today & (k >= self.advertising_intervals)
            if unadvertised.any():
                raise BeaconScheduleError(
                    f"day {day}: {int(unadvertised.sum())} beacon(s) heard outside the "
                    f"{self.advertising_intervals} advertised intervals (latest interval "
                    f"{int(k[today].max())}); raise advertising_intervals"
                )
            if not today.all():
                rd = _beacons_of(rd, today)
            self._cached = (key, rd)
        return self._cached[1]

    def physical_beacons(self, day: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The RPIs that devices ``ids`` put on the air with a physical radio on ``day``, one
        per interval, (len(ids), physical_intervals, 16), and which intervals were on the air
        (bool, same shape without the last axis). A simulated device has no physical radio:
        none (the pilot's world, :class:`device_agent.pilot.PilotWorld`, has one)."""
        shape = (len(ids), self.physical_intervals)
        return np.zeros((*shape, gaen.RPI_LEN), np.uint8), np.zeros(shape, bool)

    def sightings(self, day: int, observers: np.ndarray) -> Sightings:
        """The sightings recorded by ``observers`` only (what their own scanners heard)."""
        s = self.radio_day(day).sightings
        mask = np.isin(s.observer, observers)
        # Only the RPIs these observers heard: not what other devices heard.
        used, beacon = np.unique(s.beacon[mask], return_inverse=True)
        return s.subset(mask, beacon.astype(np.int64).reshape(-1), s.rpis[used])


def _beacons_of(rd: RadioDay, keep: np.ndarray) -> RadioDay:
    """``rd`` with only the beacons ``keep`` marks (and the sightings of them)."""
    s = rd.sightings
    rows = keep[s.beacon]
    new_index = (np.cumsum(keep) - 1).astype(np.int64)
    return RadioDay(
        s.subset(rows, new_index[s.beacon[rows]], s.rpis[keep]),
        rd.beacon_owner[keep],
        rd.beacon_enin[keep],
    )


def _distinct_rpis(
    rpis: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The distinct rows of ``(n, 16)`` RPIs and each row's index among them. The two 64-bit
    halves are sorted together: several times faster than sorting 16-byte void keys."""
    halves = np.ascontiguousarray(rpis).view("<u8").reshape(-1, 2)
    order = np.lexsort((halves[:, 1], halves[:, 0]))
    ranked = halves[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (ranked[1:] != ranked[:-1]).any(axis=1)
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return rpis[order[first]], inverse


class DevicePool:
    """Virtual devices, one agent each, computing the model locally and posting shares.

    Args:
        agent_ids: the global ids of this pool's agents (unique); they key the counter-based
            randomness, so a device draws what the central simulator draws for its agent.
        age_group: each agent's age group (its own attribute, loaded by the pool itself).
        config, seed: the public model configuration and run seed.
        keyring: derives each device's own beacon keys (TEKs → RPIs).
        world: the simulated physical world (the source of each device's own sightings).
        connect: opens a participant's links to the two secure-sum deployments.
        seeded: optional data-driven initial infections of these agents.
        unit_devices: most devices per secure-sum participant.
        cell, labour_force: the agents' archetype cells and labour-force flags (their own
            public attributes, ``sim.archetypes``).
    """

    def __init__(
        self,
        agent_ids: torch.Tensor,
        age_group: torch.Tensor,
        config: ModelConfig,
        seed: int,
        keyring: SimulatedKeyring,
        world: SimulatedWorld,
        connect: Connect,
        seeded: torch.Tensor | None = None,
        unit_devices: int = UNIT_DEVICES,
        cell: torch.Tensor | None = None,
        labour_force: torch.Tensor | None = None,
    ) -> None:
        ids = agent_ids.to(torch.int64)
        if ids.ndim != 1 or ids.numel() == 0:
            raise PoolInputError("agent_ids must be a non-empty 1-D tensor")
        if torch.unique(ids).numel() != ids.numel():
            raise PoolInputError("agent_ids must be unique")
        if age_group.shape != ids.shape:
            raise PoolInputError(
                f"age_group must have shape {tuple(ids.shape)}, got {tuple(age_group.shape)}"
            )
        if unit_devices < 1:
            raise PoolInputError(f"unit_devices must be >= 1, got {unit_devices}")
        self.config = config
        self.seed = seed
        self.keyring = keyring
        self.world = world
        self.agents: Agents = make_agents(ids, age_group, config, seed, seeded, cell, labour_force)
        #: the behaviour table's row of the current period (``table`` runs; public)
        self.behaviour_row: torch.Tensor | None = None
        self._ids_np = ids.numpy()
        self._order = np.argsort(self._ids_np, kind="stable")
        self._sorted_ids = self._ids_np[self._order]
        self._age_onehot = torch.nn.functional.one_hot(self.agents.age_group, len(AGE_GROUPS)).to(
            torch.float64
        )
        # participant u hosts the agents at local positions bounds[u]:bounds[u + 1]
        n = ids.numel()
        self.unit_bounds = unit_bounds(n, unit_devices)
        self.unit_of = np.repeat(np.arange(len(self.unit_bounds) - 1), np.diff(self.unit_bounds))
        links = [
            connect(u, int(self.unit_bounds[u + 1] - self.unit_bounds[u]))
            for u in range(self.n_units)
        ]
        self._nbhd = [a for a, _ in links]
        self._aggr = [b for _, b in links]
        self.state: State | None = None
        self._theta: torch.Tensor | None = None
        self._slots: list[bytes] = []
        self._beh: Behaviour | None = None
        self._y: torch.Tensor | None = None
        self._silent: dict[str, frozenset[int]] = {}
        #: sum of the last update's y over all devices (a local diagnostic, never sent as such)
        self.last_y: torch.Tensor | None = None
        self.last_trace: Trace | None = None

    @classmethod
    def of_population(
        cls,
        agent_ids: torch.Tensor,
        population: Population,
        config: ModelConfig,
        seed: int,
        keyring: SimulatedKeyring,
        world: SimulatedWorld,
        connect: Connect,
        unit_devices: int = UNIT_DEVICES,
    ) -> DevicePool:
        """A pool of ``agent_ids``, each device with its own agent's attributes from
        ``population`` (age group, data-driven seed, archetype cell, labour force)."""
        ids = agent_ids.to(torch.int64)
        infected = population.initially_infected
        _, cells = population_cells(population)
        return cls(
            ids,
            population.age_group[ids],
            config,
            seed,
            keyring,
            world,
            connect,
            None if infected is None else infected[ids],
            unit_devices,
            cells[ids],
            labour_force(population)[ids],
        )

    @property
    def n(self) -> int:
        """Number of devices (agents) in the pool."""
        return self.agents.n

    @property
    def updated(self) -> bool:
        """Whether the day's update ran and its observations are still to be posted."""
        return self._y is not None

    @property
    def n_units(self) -> int:
        """Number of secure-sum participants the pool's devices are split into."""
        return len(self.unit_bounds) - 1

    def local_index(self, agent_ids: np.ndarray) -> np.ndarray:
        """Positions in this pool of the given agent ids (all must belong to the pool)."""
        pos = np.searchsorted(self._sorted_ids, agent_ids)
        pos = np.minimum(pos, self._sorted_ids.size - 1)
        if not np.array_equal(self._sorted_ids[pos], agent_ids):
            raise PoolInputError("some agent ids do not belong to this pool")
        return self._order[pos]

    def set_dropouts(self, phase: str, devices: Sequence[int]) -> None:
        """Simulate devices (local indices) that go silent in ``phase`` from now on.

        A silent device contributes nothing in that phase but keeps computing locally (its
        state goes on), as a phone whose upload failed would.
        """
        bad = [i for i in devices if not 0 <= i < self.n]
        if bad:
            raise PoolInputError(f"dropout device indices out of range 0..{self.n - 1}: {bad}")
        if phase not in (MESSAGES_PHASE, OBSERVATIONS_PHASE):
            raise PoolInputError(f"unknown phase {phase!r}")
        self._silent[phase] = frozenset(devices)

    def _speaking(self, phase: str) -> np.ndarray:
        """Boolean mask of the devices that contribute in ``phase``."""
        mask = np.ones(self.n, dtype=bool)
        silent = self._silent.get(phase, frozenset())
        if silent:
            mask[list(silent)] = False
        return mask

    def begin(self, theta: torch.Tensor) -> None:
        """Start a run under the public θ (p,): every device draws its initial state."""
        self._theta = forward_theta(theta, self.config.grad)
        self.state = initial_state(self.agents, self._theta, self.config, self.seed)
        self._beh, self._y, self._slots = None, None, []

    def restore(self, theta: torch.Tensor, state: State) -> None:
        """Resume from a stored start-of-day ``state`` under θ (after a restart or a re-run)."""
        self._theta = forward_theta(theta, self.config.grad)
        self.state = state
        self._beh, self._y, self._slots = None, None, []

    def _require_theta(self) -> tuple[torch.Tensor, State]:
        if self._theta is None or self.state is None:
            raise PoolStateError("the pool has no run: call begin(theta) first")
        return self._theta, self.state

    def register(self, spec: RoundSpec, day: int) -> None:
        """Each participant registers the slots of its devices' RPIs advertised on ``day``.

        A new round starts here: the clients forget older rounds' requests."""
        for client in (*self._nbhd, *self._aggr):
            client.forget_before(spec.round_id)
        k, extra = self.world.advertising_intervals, self.world.physical_intervals
        enins = self.world.first_interval(day) + np.arange(k, dtype=np.int64)
        simulated = self.keyring.rpis(np.repeat(self._ids_np, k), np.tile(enins, self.n))
        beacons = simulated.reshape(self.n, k, gaen.RPI_LEN)
        if extra:
            # one group per device: its simulated beacons, then one per physical interval (the
            # RPI it put on the air, else padding), so every device registers k + extra slots
            on_air, aired = self.world.physical_beacons(day, self._ids_np)
            beacons = np.concatenate([beacons, on_air], axis=1)
        slots: list[bytes] = []
        for u, client in enumerate(self._nbhd):
            lo, hi = int(self.unit_bounds[u]), int(self.unit_bounds[u + 1])
            if extra:
                pad = np.frombuffer(
                    client.padding_beacons(spec.round_id, (hi - lo) * extra), np.uint8
                ).reshape(hi - lo, extra, gaen.RPI_LEN)
                physical = beacons[lo:hi, k:]
                physical[~aired[lo:hi]] = pad[~aired[lo:hi]]
            slots.append(client.register_ids(spec.round_id, beacons[lo:hi].tobytes()))
        self._slots = slots
        if self.behaviour_row is not None:
            theta, _ = self._require_theta()
            self.world.set_behaviour(dual.value(theta), self.behaviour_row, self.seed)
        # the day's radio (cached) runs now, while the other participants still register
        self.world.radio_day(day)

    def prepare(self, day: int, theta: torch.Tensor) -> torch.Tensor:
        """Adopt the round's public θ (p,) and compute the day's behaviour; returns every
        device's message factor ``q`` (dual). A device that missed the messages step still
        prepares, so it can update."""
        _, state = self._require_theta()
        self._theta = th = forward_theta(theta, self.config.grad)
        self._beh = behaviour(
            self.agents, state, th, self.config, self.seed, day, self.behaviour_row
        )
        return infectiousness(self.agents, state, self._beh, th, self.config, day).detach()

    def post_messages(self, spec: RoundSpec, day: int, theta: torch.Tensor) -> None:
        """Each participant posts its devices' ``message(q, w)`` to the slots of the RPIs they
        heard on ``day``, summed per slot (one trust domain), padded to its fixed item count.

        ``theta`` is the round's public θ (p,); the devices adopt it for the day's update.
        """
        q = self.prepare(day, theta)
        trace = traces_from_sightings(self.world.sightings(day, self._ids_np))
        #: the day's private contact trace (heard RPI, weight per device); kept by the device
        self.last_trace = trace
        local = self.local_index(trace.observer)
        # a measured weight goes on the model's weight grid (sim.model.W_BITS), as the central
        # simulator's day weights do: then every message, and every sum of them, is exact
        weight = quantize(torch.from_numpy(trace.weight), W_BITS)
        values = message(q[torch.from_numpy(local)], weight).numpy()
        keep = self._speaking(MESSAGES_PHASE)[local]
        unit = self.unit_of[local[keep]]
        # each participant's sightings by one stable sort, not one pass over all per participant
        by_unit = np.argsort(unit, kind="stable")
        bounds = np.searchsorted(unit[by_unit], np.arange(len(self._nbhd) + 1)).tolist()
        values, rpis = values[keep][by_unit], trace.rpi[keep][by_unit]
        # the directory is fetched once, here: the participants share it, and from now on only
        # the sender thread talks to the servers
        directory = self._nbhd[0].directory(spec.round_id)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="post") as sender:
            in_flight: Future[bool] | None = None
            for u, client in enumerate(self._nbhd):
                lo, hi = bounds[u], bounds[u + 1]
                self._stage_messages(spec, day, u, directory, values[lo:hi], rpis[lo:hi])
                if in_flight is not None:
                    in_flight.result()  # a failed send raises here, before the next one
                # one participant's post travels while the next is built
                in_flight = sender.submit(client.resend, spec.round_id, MESSAGES_PHASE)
            if in_flight is not None:
                in_flight.result()
        # tomorrow's own beacons, derived while the servers close this phase
        k = self.world.advertising_intervals
        tomorrow = self.world.first_interval(day + 1) + np.arange(k, dtype=np.int64)
        self.keyring.prefetch(np.repeat(self._ids_np, k), np.tile(tomorrow, self.n))

    def _stage_messages(
        self,
        spec: RoundSpec,
        day: int,
        u: int,
        directory: SlotTable,
        values: npt.NDArray[np.float64],
        rpis: npt.NDArray[np.uint8],
    ) -> None:
        """Build participant ``u``'s messages post and stage it in its client (not sent): its
        devices' messages (one row per sighting, with the RPI heard) summed per heard RPI's
        slot."""
        phase = spec.phase(MESSAGES_PHASE)
        client = self._nbhd[u]
        uniq, inverse = _distinct_rpis(rpis)
        budget = phase.items_per_device * int(self.unit_bounds[u + 1] - self.unit_bounds[u])
        if len(uniq) > budget:
            raise TraceOverflow(
                f"day {day}: participant {u} heard {len(uniq)} distinct RPIs, more than its "
                f"budget of {budget} items (items_per_device={phase.items_per_device})"
            )
        summed = np.zeros((len(uniq), values.shape[1]), dtype=np.float64)
        np.add.at(summed, inverse, values)
        key = client.deployment.deployment_key
        joined = pseudonym_slots(np.ascontiguousarray(uniq).tobytes(), spec.round_id, key)
        # a beacon whose owner did not register this round (it dropped out) has no slot: its
        # message has no recipient, as a phone's would not
        ids = np.frombuffer(joined, dtype=np.uint8).reshape(-1, SLOT_ID_BYTES)
        _, registered = directory.find(ids)
        client.stage(spec, MESSAGES_PHASE, ids[registered].tobytes(), summed[registered])

    def fetch_and_update(self, spec: RoundSpec, day: int) -> None:
        """Each participant fetches its devices' day totals (their ``incoming``); then f.

        A participant that could not register this round has no sums: its devices' incoming
        is zero (they heard of no exposure), as for a phone that was offline.
        """
        theta, _ = self._require_theta()
        if self._beh is None:
            raise PoolStateError(f"day {day}: register and post messages before updating")
        width = theta.shape[-1]
        k = self.world.advertising_intervals + self.world.physical_intervals
        group = spec.phase(MESSAGES_PHASE).group_slots
        if group != k:
            raise PoolStateError(
                f"day {day}: the round groups {group} slot(s) per device, but the devices "
                f"register {k} beacons a day"
            )
        # The servers release each device's day total (its k slots' group) as exact ring sums.
        ring = np.zeros((self.n, width), dtype=np.int64)
        for u, client in enumerate(self._nbhd):
            slots = self._slots[u] if u < len(self._slots) else None
            if not slots:
                continue
            lo, hi = int(self.unit_bounds[u]), int(self.unit_bounds[u + 1])
            # None: every slot it registered (each device's group, in order), named by none
            ring[lo:hi] = client.fetch_ring(spec.round_id, MESSAGES_PHASE, None, group)
        incoming = torch.from_numpy(self._nbhd[0].codec.decode(ring))
        self.apply_update(incoming, day)

    def finish_day(self, spec: RoundSpec, day: int, theta: torch.Tensor) -> None:
        """Make sure the day's update ran, whatever steps the pool missed: prepare if the
        messages step was missed, fetch its devices' day totals, then ``f``. A no-op once
        updated.

        A participant that did not register this round (it was offline then) has no slots, so
        no message could be addressed to its devices: their incoming sum is zero, as a phone's
        that was off. A registered participant whose fetch fails gets no update at all.

        Raises:
            FetchFailed: the servers refused the fetch or their reply did not authenticate;
                the state is unchanged (never an update on made-up exposure).
        """
        if self._y is not None:
            return
        if self._beh is None:
            self.prepare(day, theta)
        try:
            self.fetch_and_update(spec, day)
        except SecureSumError as err:
            raise FetchFailed(
                f"day {day}: fetching the neighbourhood sums failed ({type(err).__name__}: "
                f"{err}); the day's update is not made"
            ) from err

    def sit_out(self, spec: RoundSpec, day: int, theta: torch.Tensor) -> None:
        """A day the devices missed entirely (offline through its whole round): nobody could
        address them, so they update on zero exposure, and their observations are never sent
        (the day's aggregates were opened without them)."""
        self._beh, self._y, self._slots = None, None, []
        self.finish_day(spec, day, theta)
        self._y = None

    def act(
        self, step: str, specs: tuple[RoundSpec, RoundSpec], day: int, theta: torch.Tensor
    ) -> None:
        """The devices' part of one step of the day's round (``contract.round.Participant``)."""
        spec_m, spec_o = specs
        if step == REGISTER:
            self.register(spec_m, day)
        elif step == MESSAGES:
            self.post_messages(spec_m, day, theta)
        elif step == FETCH:
            self.finish_day(spec_m, day, theta)
        elif step == OBSERVATIONS_STEP:
            self.finish_day(spec_m, day, theta)
            self.post_observations(spec_o, day)
        else:
            raise PoolInputError(f"unknown step {step!r}")

    def apply_update(self, incoming: torch.Tensor, day: int) -> None:
        """``f`` for every device given its neighbourhood sums (n, 1 + p)."""
        theta, state = self._require_theta()
        if self._beh is None:
            raise PoolStateError(f"day {day}: register and post messages before updating")
        out = update(self.agents, state, incoming, self._beh, theta, self.config, self.seed, day)
        self.state = out.state
        self._y = out.y.detach()
        self._beh = None
        self._slots = []

    def observations(self) -> torch.Tensor:
        """Per participant, its contributing devices' ``y_i`` summed: (units, 2·G·(1+p))."""
        if self._y is None:
            raise PoolStateError("no observations to post (update first)")
        y = (
            self._y
            * torch.from_numpy(self._speaking(OBSERVATIONS_PHASE)).to(self._y.dtype)[:, None, None]
        )
        vec = torch.einsum("ng,nkw->nkgw", self._age_onehot, y).reshape(self.n, -1)
        unit = torch.from_numpy(self.unit_of)
        out = torch.zeros(self.n_units, vec.shape[1], dtype=vec.dtype)
        return out.index_add_(0, unit, vec)

    def post_observations(self, spec: RoundSpec, day: int) -> None:
        """Each participant posts its devices' summed observations to ``global/day/<d>``."""
        if self._y is None:
            raise PoolStateError(f"day {day}: no observations to post (update first)")
        per_unit = self.observations().numpy()
        self.last_y = torch.from_numpy(per_unit.sum(0))
        name = day_slot(day)
        for u, client in enumerate(self._aggr):
            client.post(spec, OBSERVATIONS_PHASE, [name], per_unit[u : u + 1])
        self._y = None

    def stage_counts(self) -> torch.Tensor:
        """Agents per stage (S E I R D) in this pool — a local diagnostic, never sent."""
        _, state = self._require_theta()
        return torch.bincount(state.stage.to(torch.int64), minlength=5)
