"""Fixtures of the behaviour-backend tests: the rule backend (``rule_server.py``, a
deterministic OpenAI-compatible HTTP server on loopback — not a language model) and grids."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sim.archetypes import AGE_GROUPS, ArchetypeGrid, Attribute, PublicNumbers

SERVER = Path(__file__).with_name("rule_server.py")
_spec = importlib.util.spec_from_file_location("rule_server", SERVER)
assert _spec is not None and _spec.loader is not None
rule_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rule_server)


@dataclass(frozen=True)
class RuleServer:
    """A running rule backend: its API base URL, its stats, and its rule."""

    base_url: str
    rule_p: Callable[[str], float]

    def stats(self) -> dict[str, Any]:
        """``GET /stats``: requests received so far, their bodies and Authorization headers."""
        root = self.base_url.removesuffix("/v1")
        with urllib.request.urlopen(f"{root}/stats", timeout=10) as response:
            return json.loads(response.read())

    def requests(self) -> int:
        """Chat requests received so far."""
        return int(self.stats()["requests"])


@pytest.fixture(scope="session")
def rule_backend() -> Iterator[RuleServer]:
    """The rule backend, started once for the session on a free loopback port."""
    process = subprocess.Popen(
        [sys.executable, str(SERVER)], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), f"rule backend did not start: {line!r}"
        yield RuleServer(f"http://127.0.0.1:{int(line.split()[1])}/v1", rule_server.rule_p)
    finally:
        process.terminate()
        process.wait(timeout=10)


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
