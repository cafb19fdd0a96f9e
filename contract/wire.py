"""Conversions between the secure-sum configuration objects and their wire messages.

Kept in one place so the coordinator, the aggregator and the device agent read and write the
same ``decentsim.v1`` messages the same way; every ``*_from_pb`` validates through the
secure-sum constructors, so a malformed message raises the same typed error as bad local input.
"""

from __future__ import annotations

from proto.decentsim.v1 import common_pb2
from protocols.secure_sum import Deployment, FixedPointCodec, Mode, PhaseSpec, RoundSpec, SlotKind
from protocols.secure_sum.errors import MessageError

_MODE = {
    Mode.MAILBOX: common_pb2.MODE_MAILBOX,
    Mode.SHUFFLED: common_pb2.MODE_SHUFFLED,
    Mode.PLAINTEXT: common_pb2.MODE_PLAINTEXT,
    Mode.DENSE: common_pb2.MODE_DENSE,
}
_KIND = {
    SlotKind.PSEUDONYM: common_pb2.SLOT_KIND_PSEUDONYM,
    SlotKind.AGGREGATE: common_pb2.SLOT_KIND_AGGREGATE,
}


def mode_to_pb(mode: Mode) -> int:
    """The wire enum value of a posting mode."""
    return _MODE[mode]


def mode_from_pb(value: int) -> Mode:
    """The posting mode of a wire enum value; ``MessageError`` if unspecified/unknown."""
    for mode, wire in _MODE.items():
        if wire == value:
            return mode
    raise MessageError(f"posting mode {value} is not one of mailbox, shuffled, dense, plaintext")


def phase_to_pb(phase: PhaseSpec) -> common_pb2.PhaseSpec:
    """A phase spec as its wire message."""
    return common_pb2.PhaseSpec(
        name=phase.name,
        kind=_KIND[phase.kind],
        dim=phase.dim,
        items_per_device=phase.items_per_device,
        aggregate_slots=list(phase.aggregate_slots),
        group_slots=phase.group_slots,
    )


def phase_from_pb(msg: common_pb2.PhaseSpec) -> PhaseSpec:
    """A phase spec from the wire (validated by ``PhaseSpec``)."""
    kind = next((k for k, v in _KIND.items() if v == msg.kind), None)
    if kind is None:
        raise MessageError(f"phase {msg.name!r}: slot kind {msg.kind} is unspecified/unknown")
    return PhaseSpec(
        msg.name,
        msg.dim,
        kind,
        msg.items_per_device,
        tuple(msg.aggregate_slots),
        group_slots=msg.group_slots or 1,
    )


def round_to_pb(spec: RoundSpec) -> list[common_pb2.PhaseSpec]:
    """A round's phases as wire messages (the round id travels beside them)."""
    return [phase_to_pb(p) for p in spec.phases]


def round_from_pb(round_id: int, phases: list[common_pb2.PhaseSpec]) -> RoundSpec:
    """A round spec from its id and wire phases."""
    return RoundSpec(round_id, tuple(phase_from_pb(p) for p in phases))


def deployment_to_pb(name: str, deployment: Deployment) -> common_pb2.Deployment:
    """A deployment as its wire message (``deployment_key`` included: Enrol replies only)."""
    codec = deployment.codec
    return common_pb2.Deployment(
        deployment_id=name,
        mode=_MODE[deployment.mode],
        codec=common_pb2.Codec(
            frac_bits=codec.frac_bits, max_abs=codec.max_abs, max_summands=codec.max_summands
        ),
        coordinator_public=deployment.coordinator_public,
        aggregator_public=deployment.aggregator_public,
        deployment_key=deployment.deployment_key,
    )


def deployment_from_pb(msg: common_pb2.Deployment) -> Deployment:
    """A deployment from the wire (validated by ``Deployment`` and ``FixedPointCodec``)."""
    codec = FixedPointCodec(msg.codec.frac_bits, msg.codec.max_abs, msg.codec.max_summands)
    return Deployment(
        mode_from_pb(msg.mode),
        codec,
        bytes(msg.coordinator_public),
        bytes(msg.aggregator_public),
        bytes(msg.deployment_key),
    )
