"""Calibratable parameters θ, with validation.

θ holds the epidemic's parameters (β, mortality, the initial fraction) and the *alignment* of
the behaviour table (``sim.archetypes``): per age group, a scale and a shift of the table's
logits, ``p' = sigmoid(scale_g · logit p + shift_g)`` (identity at scale 1, shift 0).

Forward-mode tangents are carried only for the parameters a run differentiates
(``ModelConfig.grad``, :data:`BASE_PARAMS` by default): every agent carries ``dz/dθ`` as that
many extra numbers per state variable, so a run that does not fit the alignment pays nothing
for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

#: The epidemic's parameters: the default differentiated ones (``ModelConfig.grad``).
BASE_PARAMS: tuple[str, ...] = ("beta", "mortality", "init_frac")
#: Age groups of the alignment parameters (``sim.populations.AGE_GROUPS``, repeated here so
#: this module stays a leaf).
ALIGNMENT_GROUPS: tuple[str, ...] = ("U19", "20t29", "30t39", "40t49", "50t64", "65A")
#: The behaviour table's alignment: a logit scale and shift per age group.
ALIGNMENT_PARAMS: tuple[str, ...] = (
    *(f"scale_{g}" for g in ALIGNMENT_GROUPS),
    *(f"shift_{g}" for g in ALIGNMENT_GROUPS),
)
#: Parameter order in every θ tensor.
PARAM_NAMES: tuple[str, ...] = (*BASE_PARAMS, *ALIGNMENT_PARAMS)

#: Valid closed ranges; a value outside raises ``ParameterError`` naming the parameter.
PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "beta": (0.0, 50.0),
    "mortality": (0.0, 1.0),
    "init_frac": (0.0, 1.0),
    **{f"scale_{g}": (0.0, 10.0) for g in ALIGNMENT_GROUPS},
    **{f"shift_{g}": (-10.0, 10.0) for g in ALIGNMENT_GROUPS},
}
#: Parameters an optimizer may move in log space (positive by nature); the others (shifts)
#: move linearly.
LOG_PARAMS: frozenset[str] = frozenset(n for n in PARAM_NAMES if not n.startswith("shift_"))


class ParameterError(ValueError):
    """A parameter is missing, unknown, not a number, or out of its range."""


@dataclass(frozen=True)
class Theta:
    """The calibratable parameters.

    beta: transmission rate per unit contact weight per day of full infectiousness.
    mortality: infection fatality scale; an agent's death probability at the end of its
        infection is ``mortality × age_mortality[age]`` (clamped to 1).
    init_frac: fraction of agents infected on day 0 (ignored when the population brings its own
        seeds and the model is configured to use them).
    scale_<g>, shift_<g>: the behaviour table's alignment for age group g (see the module
        doc); they act only with a behaviour table (``ModelConfig.behaviour == "table"``).
    """

    beta: float = 0.25
    mortality: float = 0.01
    init_frac: float = 0.005
    # the behaviour table's alignment (identity by default), one pair per age group
    scale_U19: float = 1.0
    scale_20t29: float = 1.0
    scale_30t39: float = 1.0
    scale_40t49: float = 1.0
    scale_50t64: float = 1.0
    scale_65A: float = 1.0
    shift_U19: float = 0.0
    shift_20t29: float = 0.0
    shift_30t39: float = 0.0
    shift_40t49: float = 0.0
    shift_50t64: float = 0.0
    shift_65A: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            validate(f.name, getattr(self, f.name))

    def as_tensor(
        self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """θ as a (p,) tensor in ``PARAM_NAMES`` order."""
        return torch.tensor([getattr(self, n) for n in PARAM_NAMES], dtype=dtype, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Theta:
        """Inverse of ``as_tensor`` (validates)."""
        vals = t.detach().cpu().tolist()
        return cls(**dict(zip(PARAM_NAMES, vals, strict=True)))

    def replace(self, **changes: float) -> Theta:
        """A copy with some parameters changed (validated)."""
        unknown = set(changes) - set(PARAM_NAMES)
        if unknown:
            raise ParameterError(f"unknown parameter(s) {sorted(unknown)}; known: {PARAM_NAMES}")
        return Theta(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def parse(cls, text: str, base: Theta | None = None) -> Theta:
        """Parse ``name=value,name=value`` (the CLI's ``--theta``) on top of ``base``."""
        base = base or cls()
        changes: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, sep, raw = item.partition("=")
            if not sep:
                raise ParameterError(f"--theta item {item!r} is not of the form name=value")
            try:
                changes[name.strip()] = float(raw)
            except ValueError:
                raise ParameterError(
                    f"parameter {name.strip()!r}: {raw!r} is not a number"
                ) from None
        return base.replace(**changes)


def validate(name: str, v: float) -> None:
    """Raise ``ParameterError`` unless ``v`` is a finite number within ``PARAM_BOUNDS[name]``."""
    if name not in PARAM_BOUNDS:
        raise ParameterError(f"unknown parameter {name!r}; known: {PARAM_NAMES}")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ParameterError(f"parameter {name!r} must be a number, got {type(v).__name__}")
    if math.isnan(v):
        raise ParameterError(f"parameter {name!r} is NaN")
    lo, hi = PARAM_BOUNDS[name]
    if not lo <= v <= hi:
        raise ParameterError(f"parameter {name!r} = {v} is outside [{lo}, {hi}]")
