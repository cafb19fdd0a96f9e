"""The round state machine: one simulated day of a federated run, for every transport.

:func:`run_day` is the only place the order of a day is written. It opens the day's round on
both secure-sum deployments, and between the server-side transitions lets the participants act
on each step of :data:`~contract.schedule.STEPS`::

    open round → register → close registration → messages → close messages phase
               → fetch → observations → close observations phase → open Y_d

Who acts, and how, is the caller's: the in-memory :class:`RoundDriver` calls each
participant's :meth:`Participant.act` directly; the gRPC coordinator
(``coordinator.service``) publishes the step in its schedule and waits for the devices' calls
until a deadline; the Flower ServerApp hosts that same service. The servers' side of each
transition is a :class:`DayServers` (in memory: :class:`InMemoryServers`).

The coordinator sees only opened aggregates: never an agent's attributes, state or message.
θ is public; it travels with every round to the participants.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from contract.schedule import (
    AGGREGATES,
    MESSAGES_PHASE,
    NEIGHBOURHOOD,
    OBSERVATIONS_PHASE,
    STEPS,
    aggregates_codec,
    day_slot,
    neighbourhood_codec,
    observations_shape,
    round_specs,
)
from protocols.secure_sum import (
    CoordinatorServer,
    DeviceClient,
    FixedPointCodec,
    InMemoryNetwork,
    Mode,
    PhaseReport,
    RoundSpec,
)
from sim import dual
from sim.model import OBSERVATIONS
from sim.params import Theta

#: A day's two round specs: (neighbourhood phase, observations phase).
DaySpecs = tuple[RoundSpec, RoundSpec]


class RoundError(Exception):
    """A round could not run as asked; the message names the reason."""


class DayServers(Protocol):
    """The coordinator's side of a day: the transitions between the steps."""

    def open_round(self, specs: DaySpecs) -> None:
        """Open the day's round at both deployments (and at the aggregator)."""
        ...

    def close_registration(self, round_id: int) -> None:
        """Close registration at both deployments."""
        ...

    def close_phase(self, round_id: int, deployment: str, phase: str) -> PhaseReport:
        """Close a phase: agree the surviving set with the aggregator."""
        ...

    def open_aggregates(self, round_id: int) -> dict[str, np.ndarray]:
        """The opened ring sums of the observations phase, by aggregate slot."""
        ...


class Participant(Protocol):
    """What the coordinator asks of a set of devices each round (e.g. a device pool)."""

    def begin(self, theta: torch.Tensor) -> None:
        """Start a run under public θ: draw initial states."""
        ...

    def act(self, step: str, specs: DaySpecs, day: int, theta: torch.Tensor) -> None:
        """Do the devices' part of ``step`` of ``day`` under the round's public θ."""
        ...


@dataclass(frozen=True)
class DayResult:
    """One opened round: the day's aggregates and what closing each phase did."""

    day: int
    #: dual (2, G, 1 + p): new infections / new deaths by age group, with dY/dθ
    y: torch.Tensor
    messages: PhaseReport
    observations: PhaseReport


def run_day(
    servers: DayServers,
    specs: DaySpecs,
    day: int,
    act: Callable[[str], None],
    codec: FixedPointCodec,
) -> DayResult:
    """Run one day's round; ``act(step)`` returns when the participants are done with it
    (or dropped out of it). ``codec`` decodes the opened observations."""
    round_id = specs[0].round_id
    register, messages, fetch, observations = STEPS
    servers.open_round(specs)
    act(register)
    servers.close_registration(round_id)
    act(messages)
    report_m = servers.close_phase(round_id, NEIGHBOURHOOD, MESSAGES_PHASE)
    act(fetch)
    act(observations)
    report_o = servers.close_phase(round_id, AGGREGATES, OBSERVATIONS_PHASE)
    ring = servers.open_aggregates(round_id)
    y = codec.decode(np.asarray(ring[day_slot(day)])).reshape(observations_shape())
    return DayResult(day, torch.from_numpy(y), report_m, report_o)


def loss_and_grad(
    y: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[float, torch.Tensor]:
    """``L(Y)`` and ``dL/dθ = Σ_t ∂L/∂Y_t · dY_t/dθ`` from opened aggregates, a dual
    (T, 2, G, 1 + p): the coordinator's gradient needs nothing but the aggregates."""
    leaf = dual.value(y).detach().requires_grad_(True)
    loss = loss_fn(leaf)
    (g,) = torch.autograd.grad(loss, leaf)
    return float(loss.detach()), torch.einsum("tkg,tkgp->p", g, dual.tangent(y))


class SumService(Protocol):
    """One secure-sum deployment as the coordinator drives it (e.g. ``InMemoryNetwork``)."""

    @property
    def coordinator(self) -> CoordinatorServer:
        """The coordinator's server of this deployment."""
        ...

    def open_round(self, spec: RoundSpec) -> None:
        """Open ``spec`` at both servers."""
        ...


class ServicePair:
    """:class:`DayServers` over two :class:`SumService` deployments (in memory, or tests'
    gRPC stacks)."""

    def __init__(self, neighbourhood: SumService, aggregates: SumService) -> None:
        self.services = {NEIGHBOURHOOD: neighbourhood, AGGREGATES: aggregates}

    def open_round(self, specs: DaySpecs) -> None:
        for service, spec in zip(self.services.values(), specs, strict=True):
            service.open_round(spec)

    def close_registration(self, round_id: int) -> None:
        for service in self.services.values():
            service.coordinator.close_registration(round_id)

    def close_phase(self, round_id: int, deployment: str, phase: str) -> PhaseReport:
        return self.services[deployment].coordinator.close_phase(round_id, phase)

    def open_aggregates(self, round_id: int) -> dict[str, np.ndarray]:
        return self.services[AGGREGATES].coordinator.open_aggregates_ring(
            round_id, OBSERVATIONS_PHASE
        )


class InMemoryServers(ServicePair):
    """The two secure-sum deployments (neighbourhood, aggregates) over in-memory links."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        # The pseudonym-slot key is shared with enrolled devices only.
        self.neighbourhood = InMemoryNetwork(mode, neighbourhood_codec(), os.urandom(32))
        self.aggregates = InMemoryNetwork(mode, aggregates_codec(), deployment_key=b"")
        super().__init__(self.neighbourhood, self.aggregates)

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
        """L(Y) and ``dL/dθ`` from the opened aggregates (:func:`loss_and_grad`)."""
        return loss_and_grad(self.y, loss_fn)


class RoundDriver:
    """Drives the per-day rounds in process: participants act when :func:`run_day` says.

    Args:
        neighbourhood, aggregates: the secure-sum deployments of the two phase kinds.
        participants: the device pools.
        messages_per_device: the neighbourhood phase's fixed item count (public): every
            device posts exactly this many items, real messages padded with dummies.
        beacons_per_day: the beacons (RPIs) each device advertises and registers a day: the
            slot group whose total a device is released (``round_specs``).
        round_base: round id of day 0 (day ``d`` runs round ``round_base + d``).
    """

    def __init__(
        self,
        neighbourhood: SumService,
        aggregates: SumService,
        participants: Sequence[Participant],
        messages_per_device: int,
        beacons_per_day: int,
        round_base: int = 0,
    ) -> None:
        if not participants:
            raise RoundError("a round needs at least one participant")
        if messages_per_device < 1:
            raise RoundError(f"messages_per_device must be >= 1, got {messages_per_device}")
        self.servers = ServicePair(neighbourhood, aggregates)
        self.codec = aggregates.coordinator.codec
        self.participants = list(participants)
        self.messages_per_device = messages_per_device
        self.beacons_per_day = beacons_per_day
        self.round_base = round_base

    def specs(self, day: int) -> DaySpecs:
        """The day's round specs: the neighbourhood phase and the observations phase."""
        return round_specs(
            self.round_base + day, day, self.messages_per_device, self.beacons_per_day
        )

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
        specs = self.specs(day)

        def act(step: str) -> None:
            for p in self.participants:
                p.act(step, specs, day, t)

        return run_day(self.servers, specs, day, act, self.codec)

    def run(self, theta: Theta, days: int) -> FederatedRun:
        """``days`` rounds from a fresh start under θ."""
        if days < 1:
            raise RoundError(f"days must be >= 1, got {days}")
        self.begin(theta)
        run = FederatedRun(theta)
        for day in range(days):
            run.days.append(self.run_day(day, theta))
        return run
