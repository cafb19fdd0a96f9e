"""Populations: agents with an age group and contact layers as edge lists.

A contact layer is a directed edge list ``src -> dst``: agent ``src`` sends a message to agent
``dst``. A physical contact is symmetric, so loaders store both directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Age groups, in the order of the Astoria data; ``Population.age_group`` indexes this tuple.
AGE_GROUPS: tuple[str, ...] = ("U19", "20t29", "30t39", "40t49", "50t64", "65A")


@dataclass(frozen=True)
class ContactLayer:
    """One contact layer (household, school, work, community, a mobility layer, ...).

    ``src``/``dst`` are int64 tensors of shape (E,), ``weight`` float32 of shape (E,).
    """

    name: str
    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor

    @property
    def n_edges(self) -> int:
        return int(self.src.numel())


@dataclass(frozen=True)
class Population:
    """Agents (by index 0..N-1) and their contact layers.

    ``age_group`` is int64 (N,) into ``AGE_GROUPS``; ``initially_infected`` is an optional bool
    (N,) mask of agents that start infected (data-driven seeding, e.g. Astoria).
    """

    name: str
    age_group: torch.Tensor
    layers: tuple[ContactLayer, ...]
    initially_infected: torch.Tensor | None = None
    attributes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_agents(self) -> int:
        return int(self.age_group.numel())

    @property
    def n_edges(self) -> int:
        return sum(layer.n_edges for layer in self.layers)
