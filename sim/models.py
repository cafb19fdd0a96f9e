"""Model templates: a model's configuration and default θ, ready to bind to a population."""

from __future__ import annotations

from dataclasses import dataclass, field

from sim.model import ModelConfig
from sim.params import Theta


@dataclass(frozen=True)
class ModelTemplate:
    """A named model: its fixed configuration and default calibratable parameters."""

    name: str
    config: ModelConfig = field(default_factory=ModelConfig)
    theta: Theta = field(default_factory=Theta)
    description: str = ""


#: The SEIRD epidemic model of ``sim.model`` with COVID-19-like defaults.
epidemiology = ModelTemplate(
    name="epidemiology",
    description="SEIRD with age-dependent susceptibility and mortality, an infectiousness "
    "profile, behaviour from archetypes (mixing, isolation) or from a behaviour table "
    "(isolating, working: employment), lockdowns, vaccination and stimulus payments.",
)
