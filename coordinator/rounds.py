"""The coordinator's transport-free round driver: one simulated day per secure-sum round.

Per day ``d`` (``RoundDriver.run_day``):

1. open round ``d`` on both secure-sum deployments (neighbourhood sums, aggregates);
2. contacts happen (the devices' radios record them) and every device registers the pseudonym
   slots of its own beacons; registration closes;
3. neighbourhood phase: devices post ``message(q_j, w)`` to the slots of the beacons they
   heard; the phase closes (surviving-set agreement);
4. devices fetch their own slots' sums and apply the local update ``f``;
5. aggregates phase: devices post ``y_i(t)`` (value + tangents) to ``global/day/<d>``; the
   phase closes and the coordinator opens the sum ``Y_d`` (2, G, 1 + p).

The coordinator sees only opened aggregates: never an agent's attributes, state or message.
θ is public; it travels with every round to the participants.

Two deployments, because one fixed-point codec cannot serve both phases within the ring's
overflow bound ``ceil(max_abs · 2^f) · max_summands ≤ 2^63 − 1``: neighbourhood sums need
``f = sim.model.EXACT_FRAC_BITS`` (32) for exact values with ``|message| < 2^MAX_MESSAGE_LOG2``
and many summands per slot (dummies included), while observation tangents need a wider
``max_abs`` with one summand per device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from protocols.secure_sum import (
    CoordinatorServer,
    DeviceClient,
    FixedPointCodec,
    InMemoryNetwork,
    Mode,
    PhaseReport,
    PhaseSpec,
    RoundSpec,
    SlotKind,
)
from protocols.secure_sum.dp import DPConfig, check_headroom
from sim import dual
from sim.model import EXACT_FRAC_BITS, MAX_MESSAGE_LOG2, OBSERVATIONS
from sim.params import PARAM_NAMES, Theta
from sim.populations import AGE_GROUPS

MESSAGES_PHASE = "messages"
OBSERVATIONS_PHASE = "observations"
#: Largest |tangent| of one device's observation that the aggregates codec accepts.
OBSERVATION_MAX_ABS = float(2**10)
#: Devices per aggregate slot the aggregates codec allows (2^10 · 2^32 · 2^20 = 2^62).
MAX_DEVICES = 2**20
#: Summands per pseudonym slot (real messages and dummies) the neighbourhood codec allows.
MAX_SLOT_SUMMANDS = 2**24


#: The steps of a round, in order (a federated run's day).
STEPS = ("register", "messages", "fetch", "observations")


class RoundError(Exception):
    """A round could not run as asked; the message names the reason."""


def neighbourhood_codec() -> FixedPointCodec:
    """Fixed point on the exact-sum grid: values of ``exact_sums`` messages encode exactly."""
    return FixedPointCodec(EXACT_FRAC_BITS, float(2**MAX_MESSAGE_LOG2), MAX_SLOT_SUMMANDS)


def aggregates_codec() -> FixedPointCodec:
    """Fixed point for observations: 0/1 values exact, tangents to 2^-32."""
    return FixedPointCodec(EXACT_FRAC_BITS, OBSERVATION_MAX_ABS, MAX_DEVICES)


def observations_dim() -> int:
    """Length of the observations phase's vector: channels × age groups × (1 + p)."""
    return len(OBSERVATIONS) * len(AGE_GROUPS) * (1 + len(PARAM_NAMES))


def observations_dp(sigma: float, delta: float, l2_sensitivity: float) -> DPConfig:
    """The DP config of the observations phase (one release = one day's ``global/day/<d>``).

    ``sigma`` and ``l2_sensitivity`` are in real units of the whole observation vector (values
    and tangents): the noise is added to every coordinate, and ``l2_sensitivity`` must bound
    the L2 norm of one participant's contribution to it (see ``LEAKAGE.md``).

    Raises:
        DPConfigError: a bad parameter, or noise outside the codec's supported range.
        NoiseHeadroomError: the aggregates codec leaves no room for this much noise.
    """
    codec = aggregates_codec()
    config = DPConfig.for_phase(
        codec, 1, observations_dim(), sigma=sigma, delta=delta, l2_sensitivity=l2_sensitivity
    )
    check_headroom(config, codec)
    return config


def round_specs(
    round_id: int, day: int, items_per_device: int, dp: DPConfig | None = None
) -> tuple[RoundSpec, RoundSpec]:
    """A day's round specs: the neighbourhood (messages) phase and the observations phase.

    ``items_per_device`` is the public per-device budget of the messages phase (a participant
    hosting m devices posts m × budget items). Observations go to ``global/day/<day>``, one item
    per participant: its devices' ``y_i`` summed (a pool is one trust domain; a phone posts its
    own). ``dp`` (see :func:`observations_dp`) makes both servers noise the observations.
    """
    width = 1 + len(PARAM_NAMES)
    messages = PhaseSpec(MESSAGES_PHASE, width, SlotKind.PSEUDONYM, items_per_device)
    observations = PhaseSpec(
        OBSERVATIONS_PHASE,
        observations_dim(),
        SlotKind.AGGREGATE,
        1,
        (f"global/day/{day}",),
        dp,
    )
    return RoundSpec(round_id, (messages,)), RoundSpec(round_id, (observations,))


class SumService(Protocol):
    """One secure-sum deployment as the coordinator drives it (e.g. ``InMemoryNetwork``)."""

    @property
    def coordinator(self) -> CoordinatorServer:
        """The coordinator's server of this deployment."""
        ...

    def open_round(self, spec: RoundSpec) -> None:
        """Open ``spec`` at both servers."""
        ...


class Participant(Protocol):
    """What the coordinator asks of a set of devices each round (e.g. a device pool)."""

    def begin(self, theta: torch.Tensor) -> None:
        """Start a run under public θ: draw initial states."""
        ...

    def register(self, spec: RoundSpec, day: int) -> None:
        """Register the pseudonym slots of the devices' own beacons of ``day``."""
        ...

    def post_messages(self, spec: RoundSpec, day: int, theta: torch.Tensor) -> None:
        """Post the day's messages to the slots of the beacons heard."""
        ...

    def fetch_and_update(self, spec: RoundSpec, day: int) -> None:
        """Fetch own neighbourhood sums and apply the local update."""
        ...

    def post_observations(self, spec: RoundSpec, day: int) -> None:
        """Post the day's observations to the aggregate slot."""
        ...


class InMemoryServers:
    """The two secure-sum deployments (neighbourhood, aggregates) over in-memory links."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        # The pseudonym-slot key is shared with enrolled devices only.
        self.neighbourhood = InMemoryNetwork(mode, neighbourhood_codec(), os.urandom(32))
        self.aggregates = InMemoryNetwork(mode, aggregates_codec())

    def connect(self, unit: int, devices: int) -> tuple[DeviceClient, DeviceClient]:
        """A new participant's clients of the two deployments (the pool's ``connect``): a
        random participant id hosting ``devices`` devices."""
        del unit  # in memory, participants need no stable identity across restarts
        pid = os.urandom(16)
        return tuple(  # type: ignore[return-value]
            DeviceClient(
                pid,
                net.deployment,
                _sender(net, pid),
                net.directory_cache,
                devices=devices if net is self.neighbourhood else 1,
            )
            for net in (self.neighbourhood, self.aggregates)
        )


def _sender(net: InMemoryNetwork, pid: bytes) -> Callable[[bytes], bytes]:
    """``send`` of a participant linked to ``net``'s coordinator in memory."""

    def send(raw: bytes) -> bytes:
        return net.coordinator.handle_device(raw, pid)

    return send


@dataclass(frozen=True)
class DayResult:
    """One opened round: the day's aggregates and what closing each phase did."""

    day: int
    #: dual (2, G, 1 + p): new infections / new deaths by age group, with dY/dθ
    y: torch.Tensor
    messages: PhaseReport
    observations: PhaseReport


@dataclass
class FederatedRun:
    """The coordinator's record of a run: public θ and the opened daily aggregates."""

    theta: Theta
    days: list[DayResult] = field(default_factory=list)

    @property
    def y(self) -> torch.Tensor:
        """dual (T, 2, G, 1 + p), as ``sim.runner.RunResult.y``."""
        return torch.stack([d.y for d in self.days])

    def daily(self) -> dict[str, list[float]]:
        """Each observation channel's daily total over all ages."""
        totals = dual.value(self.y).sum(-1)
        return {name: totals[:, k].tolist() for k, name in enumerate(OBSERVATIONS)}

    def loss_and_grad(
        self, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[float, torch.Tensor]:
        """L(Y) and ``dL/dθ = Σ_t ∂L/∂Y_t · dY_t/dθ`` from the opened aggregates."""
        leaf = dual.value(self.y).detach().requires_grad_(True)
        loss = loss_fn(leaf)
        (g,) = torch.autograd.grad(loss, leaf)
        return float(loss.detach()), torch.einsum("tkg,tkgp->p", g, dual.tangent(self.y))


class RoundDriver:
    """Drives the per-day rounds over two sum services and a set of participants.

    Args:
        neighbourhood, aggregates: the secure-sum deployments of the two phase kinds.
        participants: the device pools.
        messages_per_device: the neighbourhood phase's fixed item count (public): every
            device posts exactly this many items, real messages padded with dummies.
        round_base: round id of day 0 (day ``d`` runs round ``round_base + d``).
    """

    def __init__(
        self,
        neighbourhood: SumService,
        aggregates: SumService,
        participants: Sequence[Participant],
        messages_per_device: int,
        round_base: int = 0,
    ) -> None:
        if not participants:
            raise RoundError("a round needs at least one participant")
        if messages_per_device < 1:
            raise RoundError(f"messages_per_device must be >= 1, got {messages_per_device}")
        self.neighbourhood = neighbourhood
        self.aggregates = aggregates
        self.participants = list(participants)
        self.messages_per_device = messages_per_device
        self.round_base = round_base
        self.width = 1 + len(PARAM_NAMES)

    def specs(self, day: int) -> tuple[RoundSpec, RoundSpec]:
        """The day's round specs: the neighbourhood phase and the observations phase."""
        return round_specs(self.round_base + day, day, self.messages_per_device)

    def begin(self, theta: Theta) -> None:
        """Start a run: every participant draws its initial state under public θ."""
        t = theta.as_tensor(torch.float64)
        for p in self.participants:
            p.begin(t)

    def run_day(self, day: int, theta: Theta) -> DayResult:
        """One round: contacts → registration → messages → fetch + update → aggregates."""
        if day < 0:
            raise RoundError(f"day must be >= 0, got {day}")
        t = theta.as_tensor(torch.float64)
        spec_m, spec_o = self.specs(day)
        rid = spec_m.round_id
        self.neighbourhood.open_round(spec_m)
        self.aggregates.open_round(spec_o)
        for p in self.participants:
            p.register(spec_m, day)
        self.neighbourhood.coordinator.close_registration(rid)
        self.aggregates.coordinator.close_registration(rid)
        for p in self.participants:
            p.post_messages(spec_m, day, t)
        report_m = self.neighbourhood.coordinator.close_phase(rid, MESSAGES_PHASE)
        for p in self.participants:
            p.fetch_and_update(spec_m, day)
        for p in self.participants:
            p.post_observations(spec_o, day)
        report_o = self.aggregates.coordinator.close_phase(rid, OBSERVATIONS_PHASE)
        ring = self.aggregates.coordinator.open_aggregates_ring(rid, OBSERVATIONS_PHASE)
        codec = self.aggregates.coordinator.codec
        flat = codec.decode(np.asarray(ring[f"global/day/{day}"]))
        y = torch.from_numpy(flat).reshape(len(OBSERVATIONS), len(AGE_GROUPS), self.width)
        return DayResult(day, y, report_m, report_o)

    def run(self, theta: Theta, days: int) -> FederatedRun:
        """``days`` rounds from a fresh start under θ."""
        if days < 1:
            raise RoundError(f"days must be >= 1, got {days}")
        self.begin(theta)
        run = FederatedRun(theta)
        for day in range(days):
            run.days.append(self.run_day(day, theta))
        return run
