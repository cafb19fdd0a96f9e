"""Calibratable parameters θ, with validation.

θ is small (p = 3 here), which is what makes forward-mode tangents cheap: every agent carries
``dz/dθ`` as p extra numbers per state variable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

#: Parameter order in every θ tensor and every tangent axis.
PARAM_NAMES: tuple[str, ...] = ("beta", "mortality", "init_frac")

#: Valid closed ranges; a value outside raises ``ParameterError`` naming the parameter.
PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "beta": (0.0, 50.0),
    "mortality": (0.0, 1.0),
    "init_frac": (0.0, 1.0),
}


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
    """

    beta: float = 0.25
    mortality: float = 0.01
    init_frac: float = 0.005

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
