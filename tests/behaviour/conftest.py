"""Fixtures of the behaviour-backend tests: grids and public numbers (the rule backend,
``rule_backend``, is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sim.archetypes import AGE_GROUPS, ArchetypeGrid, Attribute, PublicNumbers


@pytest.fixture
def grid() -> ArchetypeGrid:
    """Six age groups × three genders × two areas: 36 cells."""
    return ArchetypeGrid(
        (
            Attribute("age_group", AGE_GROUPS),
            Attribute("gender", ("female", "male", "other")),
            Attribute("area", ("QN0101", "QN0103")),
        )
    )


def _public(period: int = 1, stimulus: float = 0.0) -> PublicNumbers:
    return PublicNumbers(
        period=period, months_since_start=2.0, cases=120.0, change_pct=15.0, stimulus=stimulus
    )


@pytest.fixture
def public() -> Callable[..., PublicNumbers]:
    """``public(period=1, stimulus=0.0)``: a period's public numbers (120 cases, +15 %, month 2)."""
    return _public
