"""``decentsim simulate`` and ``decentsim federated run``, typed as a user would (their
defaults, the same population, seed and θ), run the same model: equal daily aggregates and
every gradient within 10⁻⁶ relative — on synthetic populations with several seeds and on
the Astoria population."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ASTORIA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "astoria"


def decentsim(*args: str) -> dict:
    """Run a command as a user would; its ``--json`` summary."""
    done = subprocess.run(
        [sys.executable, "-m", "decentsim", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def same_model(population: str, seed: int, days: int, theta: str, out: Path) -> None:
    common = ["--population", population, "--seed", str(seed), "--days", str(days)]
    central = decentsim("simulate", *common, "--theta", theta, "--grad", "forward")
    federated = decentsim(
        "federated", "run", *common, "--theta", theta, "--pools", "2", "--out", str(out)
    )
    assert federated["daily"] == central["daily"]
    assert sum(central["daily"]["new_infections"]) > 0, "a run with no dynamics proves little"
    assert federated["loss"] == pytest.approx(central["loss"], rel=1e-12)
    names = sorted(central["grad"])
    assert sorted(federated["grad"]) == names
    got = np.array([federated["grad"][n] for n in names])
    want = np.array([central["grad"][n] for n in names])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 4])
def test_synthetic_runs_are_the_same_model(seed: int, tmp_path: Path) -> None:
    same_model("synthetic:400", seed, 6, "beta=0.6,init_frac=0.03", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not ASTORIA.is_dir(), reason="the Astoria data is not next to the project")
def test_astoria_runs_are_the_same_model(tmp_path: Path) -> None:
    same_model(str(ASTORIA), 2, 3, "beta=0.05,init_frac=0.002", tmp_path)
