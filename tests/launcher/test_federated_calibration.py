"""Federated calibration steps θ with the calibration's own optimizer: between epochs the
coordinator takes exactly the step ``sim.calibration.ThetaOptimizer`` takes from the epoch's
opened gradient — its parameter selection (``fit``) and bounds included — and each epoch's
loss and gradient are the central simulator's at that epoch's θ."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.federation import make_spec
from launcher.run import federated_run
from sim.calibration import ThetaOptimizer
from sim.params import BASE_PARAMS, Theta
from sim.populations import from_spec
from sim.runner import CentralSimulator

SEED, DAYS, EPOCHS = 3, 7, 3
START = {"beta": 0.5, "mortality": 0.01, "init_frac": 0.03}


@pytest.mark.slow
def test_federated_theta_steps_are_the_calibration_optimizers(tmp_path: Path) -> None:
    spec = make_spec(
        "synthetic:300",
        DAYS,
        population_seed=SEED,
        pools=2,
        seed=SEED,
        theta=START,
        epochs=EPOCHS,
        lr=0.2,
        fit=("beta",),
        target=[40.0],
        step_timeout_s=60,
    )
    summary = federated_run(spec, tmp_path / "out", population_seed=SEED, timeout_s=300)
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(EPOCHS))
    central = CentralSimulator(
        from_spec(spec.population, seed=SEED), spec.model_config(), SEED, dtype=torch.float64
    )
    with sqlite3.connect(tmp_path / "out" / "state" / "coordinator" / "coordinator.sqlite3") as db:
        grads = [json.loads(g) for (g,) in db.execute("SELECT grad FROM epochs ORDER BY epoch")]
    optimizer = ThetaOptimizer(Theta(**START), ("beta",), 0.2)
    for e, opened in zip(epochs, grads, strict=True):
        theta = Theta(**e["theta"])
        # only β is fitted: the other parameters stay exactly at their start values
        assert theta.mortality == START["mortality"] and theta.init_frac == START["init_frac"]
        # the coordinator's θ is the optimizer's, step for step, from the opened gradients
        np.testing.assert_array_equal(theta.as_tensor().numpy(), optimizer.theta().numpy())
        loss, grad = central.run(theta, DAYS, "forward").loss_and_grad(spec.loss_fn())
        assert e["loss"] == pytest.approx(loss, rel=1e-9)
        np.testing.assert_allclose(opened, grad.numpy(), rtol=1e-6, atol=0)
        optimizer.step(torch.tensor(opened, dtype=torch.float64), BASE_PARAMS)
    assert epochs[-1]["theta"]["beta"] != START["beta"]
    np.testing.assert_array_equal([summary["grad"][n] for n in BASE_PARAMS], grads[-1])
