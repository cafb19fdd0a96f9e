"""Static configuration of a secure-sum deployment: modes, rounds and phases."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .dp import DPConfig
from .errors import SecureSumError, UnknownPhase
from .fixed_point import FixedPointCodec
from .slots import DEPLOYMENT_KEY_BYTES, aggregate_slot


class Mode(enum.Enum):
    """How devices post their shares (see ``LEAKAGE.md`` for what each mode reveals)."""

    MAILBOX = "mailbox"
    SHUFFLED = "shuffled"
    #: every participant posts a share of every slot of the phase, in the slot table's order:
    #: no server sees which slots a participant posted to (``LEAKAGE.md``, *Dense mode*)
    DENSE = "dense"
    #: insecure baseline: servers see raw values; never a default, warns when used
    PLAINTEXT = "plaintext"


class SlotKind(enum.Enum):
    """Which slots a phase sums into."""

    #: registered recipient pseudonyms; only the registrant fetches the sum
    PSEUDONYM = "pseudonym"
    #: declared named slots; the coordinator opens the sums
    AGGREGATE = "aggregate"


@dataclass(frozen=True)
class PhaseSpec:
    """One posting phase of a round.

    Args:
        name: phase name, unique within the round (e.g. ``"messages"``, ``"observations"``).
        dim: length of every contributed vector.
        kind: pseudonym or aggregate slots.
        items_per_device: the fixed number of items each device posts (padded with zero-valued
            dummies), so per-device counts leak nothing; a participant hosting ``m`` devices
            posts ``m × items_per_device``.
        aggregate_slots: the named slots of an aggregate phase.
        dp: optional differential privacy of an aggregate phase: each server adds its part of
            discrete Gaussian noise to its share sums of every slot before C opens them (one
            *release* per opening). Covers all ``len(aggregate_slots) × dim`` coordinates;
            part of the round-spec digest, so both servers must hold the same settings.
        group_slots: of a pseudonym phase: a registrant's slots form consecutive groups of
            this many (in the order it registered them), and a fetch releases only whole
            groups' *totals*, one row per group — never a slot's own sum. A device registers
            its day's beacons as one group, so it learns its day's total exposure and not
            whom it met when (``LEAKAGE.md``). A registration must hold whole groups.
    """

    name: str
    dim: int
    kind: SlotKind
    items_per_device: int
    aggregate_slots: tuple[str, ...] = ()
    dp: DPConfig | None = None
    group_slots: int = 1

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 64:
            raise SecureSumError(f"phase name must be 1..64 bytes, got {self.name!r}")
        if self.dim < 1:
            raise SecureSumError(f"phase {self.name!r}: dim must be >= 1, got {self.dim}")
        if self.items_per_device < 1:
            raise SecureSumError(
                f"phase {self.name!r}: items_per_device must be >= 1, got {self.items_per_device}"
            )
        if self.kind is SlotKind.AGGREGATE and not self.aggregate_slots:
            raise SecureSumError(f"aggregate phase {self.name!r} declares no slots")
        if self.kind is SlotKind.PSEUDONYM and self.aggregate_slots:
            raise SecureSumError(f"pseudonym phase {self.name!r} cannot declare named slots")
        for n in self.aggregate_slots:
            aggregate_slot(n)  # validates the name
        if self.group_slots < 1:
            raise SecureSumError(
                f"phase {self.name!r}: group_slots must be >= 1, got {self.group_slots}"
            )
        if self.group_slots > 1 and self.kind is not SlotKind.PSEUDONYM:
            raise SecureSumError(
                f"phase {self.name!r}: only a pseudonym phase groups its slots (group_slots)"
            )
        if self.dp is not None:
            if self.kind is not SlotKind.AGGREGATE:
                raise SecureSumError(
                    f"phase {self.name!r}: differential privacy applies to aggregate phases only"
                )
            if not isinstance(self.dp, DPConfig):
                raise SecureSumError(
                    f"phase {self.name!r}: dp must be a DPConfig, got {type(self.dp).__name__}"
                )
            want = len(self.aggregate_slots) * self.dim
            if self.dp.coordinates != want:
                # the accounting is per release: a config for another shape states a wrong ε
                raise SecureSumError(
                    f"phase {self.name!r}: dp.coordinates is {self.dp.coordinates}, but the "
                    f"phase releases {len(self.aggregate_slots)} slot(s) × dim {self.dim} = {want}"
                )

    def aggregate_ids(self) -> list[bytes]:
        """Identifiers of the declared aggregate slots, in declaration order."""
        return [aggregate_slot(n) for n in self.aggregate_slots]


@dataclass(frozen=True)
class RoundSpec:
    """A round: an id and its ordered phases."""

    round_id: int
    phases: tuple[PhaseSpec, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.round_id < 2**64:
            raise SecureSumError(f"round_id must fit in 64 unsigned bits, got {self.round_id}")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise SecureSumError(f"round {self.round_id}: duplicate phase names {names}")

    def registration_unit(self) -> int:
        """A registration's slot count must be a multiple of this: the least common multiple
        of the pseudonym phases' ``group_slots`` (1 without groups)."""
        return math.lcm(1, *(p.group_slots for p in self.phases if p.kind is SlotKind.PSEUDONYM))

    def phase(self, name: str) -> PhaseSpec:
        """The phase called ``name``; raises :class:`UnknownPhase`."""
        for p in self.phases:
            if p.name == name:
                return p
        raise UnknownPhase(f"round {self.round_id} has no phase {name!r}")


@dataclass(frozen=True)
class Deployment:
    """What every party knows: the mode, the codec, the servers' public keys.

    ``deployment_key`` is the secret 32-byte key of the pseudonym-slot derivation (shared with
    enrolled devices only); a deployment of aggregate slots only has none (``b""``), and then
    cannot derive pseudonym slots at all (``slots.round_slot_key`` fails closed).
    """

    mode: Mode
    codec: FixedPointCodec
    coordinator_public: bytes
    aggregator_public: bytes
    deployment_key: bytes = b""

    def __post_init__(self) -> None:
        if len(self.deployment_key) not in (0, DEPLOYMENT_KEY_BYTES):
            raise SecureSumError(
                f"deployment_key must be empty (no pseudonym slots) or {DEPLOYMENT_KEY_BYTES} "
                f"bytes, got {len(self.deployment_key)}"
            )
