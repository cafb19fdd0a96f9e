"""Deterministic behaviour sources for the model's tests: fixed rules written here, *not*
language models. Each is a ``sim.archetypes.BehaviourSource`` — a period's row of the behaviour
table from the cells and the period's public numbers — whose answers the tests know."""

from __future__ import annotations

import math

import numpy as np

from sim.archetypes import ArchetypeGrid, PublicNumbers


def _variety(grid: ArchetypeGrid) -> np.ndarray:
    """A fixed spread over the cells in [0, 0.2], so that cells differ (a multiplicative hash
    of the cell index)."""
    cells = np.arange(grid.n_cells)
    return ((cells * 7919) % 101) / 500


class FixedRule:
    """The same row every period: p(isolate) in [0.2, 0.4], p(work) in [0.6, 0.8] — away from
    0 and 1, and never exactly 0.5, so that every alignment parameter has a gradient."""

    source = "rule:fixed"

    def probabilities(self, grid: ArchetypeGrid, public: PublicNumbers) -> np.ndarray:
        v = _variety(grid)
        return np.stack([0.2 + v, 0.8 - v], axis=-1)


class CaseRule:
    """Isolation rises with the previous period's public case count, and a person works only
    when not isolating: p(isolate) = 0.1 + variety + 0.5 c / (c + 20), p(work) = 0.95 (1 −
    p(isolate)). The rows depend on the run's own public numbers."""

    source = "rule:cases"

    def __init__(self) -> None:
        self.calls = 0

    def probabilities(self, grid: ArchetypeGrid, public: PublicNumbers) -> np.ndarray:
        self.calls += 1
        isolate = 0.1 + _variety(grid) + 0.5 * public.cases / (public.cases + 20.0)
        return np.stack([isolate, 0.95 * (1.0 - isolate)], axis=-1)


class StimulusRule:
    """A stimulus payment raises isolation, and a person works only when not isolating:
    p(isolate) = 0.1 + variety + 0.7 (1 − exp(−payment / 800)), p(work) = 0.95 (1 −
    p(isolate)); the case numbers play no part."""

    source = "rule:stimulus"

    def probabilities(self, grid: ArchetypeGrid, public: PublicNumbers) -> np.ndarray:
        isolate = 0.1 + _variety(grid) + 0.7 * (1.0 - math.exp(-public.stimulus / 800.0))
        return np.stack([isolate, 0.95 * (1.0 - isolate)], axis=-1)
