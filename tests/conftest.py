"""Shared test fixtures: the Astoria data directory and thread settings under xdist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: ``../shared/data/astoria`` relative to the project root (read-only data, not in the repo).
ASTORIA_DIR: Path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "astoria"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker is its own process: one intra-op thread each avoids oversubscribing
    # the cores when several workers run torch at once.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def astoria_dir() -> Path:
    """The Astoria population directory; skips the test when the data is not present."""
    if not (ASTORIA_DIR / "agents.csv").is_file():
        pytest.skip(f"Astoria data not found at {ASTORIA_DIR}")
    return ASTORIA_DIR
