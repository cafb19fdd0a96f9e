"""A federated run's day, as every party spells it: steps, phases, slots, codecs, partition.

One simulated day is one round of two secure-sum deployments, moved through four steps::

    register → messages → fetch → observations

1. ``register``: every device registers the pseudonym slots of its own beacons of the day;
2. ``messages``: devices post ``message(q_j, w)`` (value + tangents) to the slots of the beacons
   they heard (the :data:`NEIGHBOURHOOD` deployment's :data:`MESSAGES_PHASE`);
3. ``fetch``: registrants fetch their own slots' sums and apply the local update ``f``;
4. ``observations``: devices post ``y_i(t)`` (value + tangents) to :func:`day_slot`
   (the :data:`AGGREGATES` deployment's :data:`OBSERVATIONS_PHASE`), which the coordinator opens.

Two deployments, because one fixed-point codec cannot serve both phases within the ring's
overflow bound ``ceil(max_abs · 2^f) · max_summands ≤ 2^63 − 1``: neighbourhood sums need
``f = sim.model.EXACT_FRAC_BITS`` (32) for exact values with ``|message| < 2^MAX_MESSAGE_LOG2``
and many summands per slot (dummies included), while observation tangents need a wider
``max_abs`` with one summand per participant.

A pool's devices are split into secure-sum *participants* of at most :data:`UNIT_DEVICES`
devices (:func:`units_of`); a run's population is split into contiguous slices, one per pool
(:func:`slice_ids`). Every string and partition of the protocol has its home here.
"""

from __future__ import annotations

import numpy as np
import torch

from protocols.secure_sum import FixedPointCodec, PhaseSpec, RoundSpec, SlotKind
from protocols.secure_sum.dp import DPConfig, check_headroom
from sim.model import EXACT_FRAC_BITS, MAX_MESSAGE_LOG2, OBSERVATIONS
from sim.params import BASE_PARAMS
from sim.populations import AGE_GROUPS

#: The steps of a round, in order (a federated run's day).
STEPS = ("register", "messages", "fetch", "observations")
REGISTER, MESSAGES, FETCH, OBSERVATIONS_STEP = STEPS
#: What the schedule says before the first round and after the last.
ENROLLING = "enrolling"
FINISHED = "finished"
#: The run stopped for good; the schedule's reason says why (the devices exit non-zero).
FAILED = "failed"

#: The two secure-sum deployments of a run: pseudonym-slot phases and aggregate phases.
NEIGHBOURHOOD = "neighbourhood"
AGGREGATES = "aggregates"
DEPLOYMENTS = (NEIGHBOURHOOD, AGGREGATES)
#: The phase in which devices post messages to pseudonym slots (neighbourhood sums).
MESSAGES_PHASE = "messages"
#: The phase in which devices post their observations to the day's aggregate slot.
OBSERVATIONS_PHASE = "observations"
#: The step each DeviceGateway RPC serves (what a served request moves on).
RPC_STEP = {
    "RegisterSlots": REGISTER,
    "PostShares": MESSAGES,
    "FetchSums": FETCH,
    "SubmitAggregates": OBSERVATIONS_STEP,
}

#: Largest |tangent| of one device's observation.
OBSERVATION_MAX_ABS = float(2**10)
#: Devices per secure-sum participant of a pool (bounds one post's size).
UNIT_DEVICES = 1024
#: Devices per aggregate slot (2^20: 2^10 · 2^32 · 2^20 = 2^62 below the ring's 2^63).
MAX_DEVICES = 2**20
#: Summands per pseudonym slot (real messages and dummies) the neighbourhood codec allows.
MAX_SLOT_SUMMANDS = 2**24
#: Width of every message and observation: a value and its tangents dvalue/dθ. A federation
#: differentiates the epidemic's parameters (``BASE_PARAMS``: a run spec's model config keeps
#: the default ``grad``); the behaviour table's alignment is fitted centrally.
WIDTH = 1 + len(BASE_PARAMS)

_DAY_SLOT_PREFIX = "global/day/"


class ScheduleError(ValueError):
    """A slice, slot name or partition is malformed; the message names it."""


def day_slot(day: int) -> str:
    """The aggregate slot of a day's observations: ``global/day/<day>``."""
    return f"{_DAY_SLOT_PREFIX}{day}"


def is_day_slot(name: str) -> bool:
    """Whether ``name`` is a day's aggregate slot (``global/day/<int>``)."""
    rest = name.removeprefix(_DAY_SLOT_PREFIX)
    return rest != name and rest.isdigit()


def neighbourhood_codec() -> FixedPointCodec:
    """Fixed point on the exact-sum grid: values of the model's messages encode exactly."""
    return FixedPointCodec(EXACT_FRAC_BITS, float(2**MAX_MESSAGE_LOG2), MAX_SLOT_SUMMANDS)


def aggregates_codec() -> FixedPointCodec:
    """Fixed point for observations: 0/1 values exact, tangents to 2^-32.

    One item is one *participant's* total — up to ``UNIT_DEVICES`` devices' observations summed
    — so an item may reach ``UNIT_DEVICES × OBSERVATION_MAX_ABS`` (2^20), and a slot takes
    ``MAX_DEVICES / UNIT_DEVICES`` (2^10) participants: the same 2^62 bound on the total. (A
    per-device bound on the item refused a 1,024-device participant whose summed tangent was
    1,113 on Astoria, day 16, and stalled the round.) A run of single-device participants
    (phones) is thus limited to 1,024 of them; more are refused, never wrapped."""
    return FixedPointCodec(
        EXACT_FRAC_BITS, OBSERVATION_MAX_ABS * UNIT_DEVICES, MAX_DEVICES // UNIT_DEVICES
    )


def codecs() -> dict[str, FixedPointCodec]:
    """Each deployment's codec, by name."""
    return {NEIGHBOURHOOD: neighbourhood_codec(), AGGREGATES: aggregates_codec()}


def observations_dim() -> int:
    """Length of the observations phase's vector: channels × age groups × (1 + p)."""
    return len(OBSERVATIONS) * len(AGE_GROUPS) * WIDTH


def observations_shape() -> tuple[int, int, int]:
    """The shape of one day's opened observations: (channels, age groups, 1 + p)."""
    return len(OBSERVATIONS), len(AGE_GROUPS), WIDTH


def observations_dp(sigma: float, delta: float, l2_sensitivity: float) -> DPConfig:
    """The DP config of the observations phase (one release = one day's :func:`day_slot`).

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
    round_id: int,
    day: int,
    items_per_device: int,
    beacons_per_day: int,
    dp: DPConfig | None = None,
) -> tuple[RoundSpec, RoundSpec]:
    """A day's round specs: the neighbourhood (messages) phase and the observations phase.

    ``items_per_device`` is the public per-device budget of the messages phase (a participant
    hosting m devices posts m × budget items). ``beacons_per_day`` (the run's
    ``advertising_intervals``) groups the messages phase's slots: a device registers its day's
    beacons as one group and is released only the group's total — its day's neighbourhood
    sum, never one beacon's. Observations go to :func:`day_slot`, one item
    per participant: its devices' ``y_i`` summed (a pool is one trust domain; a phone posts its
    own). ``dp`` (see :func:`observations_dp`) makes both servers noise the observations.
    """
    messages = PhaseSpec(
        MESSAGES_PHASE, WIDTH, SlotKind.PSEUDONYM, items_per_device, group_slots=beacons_per_day
    )
    observations = PhaseSpec(
        OBSERVATIONS_PHASE, observations_dim(), SlotKind.AGGREGATE, 1, (day_slot(day),), dp
    )
    return RoundSpec(round_id, (messages,)), RoundSpec(round_id, (observations,))


def parse_slice(text: str) -> tuple[int, int]:
    """``I/P`` → (I, P): a pool takes the I-th of P contiguous agent ranges."""
    try:
        i, p = (int(x) for x in text.split("/"))
    except ValueError:
        raise ScheduleError(f"slice {text!r}: expected I/P, e.g. 0/4") from None
    if not (p >= 1 and 0 <= i < p):
        raise ScheduleError(f"slice {text!r}: need 0 <= I < P")
    return i, p


def slice_ids(n_agents: int, index: int, count: int) -> torch.Tensor:
    """The agent ids of slice ``index`` of ``count`` contiguous ranges."""
    bounds = np.linspace(0, n_agents, count + 1).astype(np.int64)
    return torch.arange(int(bounds[index]), int(bounds[index + 1]), dtype=torch.int64)


def units_of(devices: int) -> int:
    """Secure-sum participants a pool of ``devices`` devices needs."""
    return -(-devices // UNIT_DEVICES)


def unit_bounds(devices: int, unit_devices: int = UNIT_DEVICES) -> np.ndarray:
    """Participant ``u`` of a pool hosts the devices at ``bounds[u]:bounds[u + 1]``."""
    return np.unique(np.arange(0, devices + unit_devices, unit_devices).clip(max=devices))
