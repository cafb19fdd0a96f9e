"""Calibration recovers planted parameters; targets load with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sim import populations
from sim.calibration import (
    ObservedSeries,
    TargetFileError,
    ThetaOptimizer,
    fit_network,
    fit_params,
    load_target,
    series_features,
    series_loss,
)
from sim.params import BASE_PARAMS, PARAM_BOUNDS, Theta
from sim.runner import CentralSimulator

PLANTED = Theta(beta=0.25, mortality=0.15, init_frac=0.01)


@pytest.fixture(scope="module")
def planted() -> tuple[CentralSimulator, torch.Tensor]:
    sim = CentralSimulator(populations.synthetic(3000, seed=2), seed=4, dtype=torch.float64)
    y = sim.run(PLANTED, 42).y[..., :2, :, 0].sum(-1).detach()  # (T, 2): infections, deaths
    assert y[:, 0].sum() > 300, "the planted epidemic must take off"
    return sim, y


def weekly_log_loss(observed: torch.Tensor):
    obs = observed.reshape(6, 7, 2).sum(1)

    def loss(y: torch.Tensor) -> torch.Tensor:
        sim_w = y[:42, :2].sum(-1).reshape(6, 7, 2).sum(1)
        return ((torch.log1p(sim_w) - torch.log1p(obs)) ** 2).mean()

    return loss


@pytest.mark.parametrize(
    "start",
    [
        Theta(beta=0.15, mortality=0.3, init_frac=0.01),
        Theta(beta=0.4, mortality=0.08, init_frac=0.01),
        Theta(beta=0.18, mortality=0.1, init_frac=0.01),
    ],
)
def test_params_mode_recovers_planted_theta(planted, start: Theta) -> None:
    sim, observed = planted
    result = fit_params(
        sim, weekly_log_loss(observed), 42, start, epochs=60, lr=0.05, fit=("beta", "mortality")
    )
    assert min(result.losses) < 0.1 * result.losses[0]
    assert result.theta.beta == pytest.approx(PLANTED.beta, rel=0.10)
    assert result.theta.mortality == pytest.approx(PLANTED.mortality, rel=0.10)
    assert result.theta.init_frac == start.init_frac  # not fitted, not moved


def test_reverse_mode_calibration_also_recovers(planted) -> None:
    sim, observed = planted
    start = PLANTED.replace(beta=0.15)
    result = fit_params(
        sim, weekly_log_loss(observed), 42, start, epochs=40, lr=0.05, fit=("beta",), grad="reverse"
    )
    assert result.theta.beta == pytest.approx(PLANTED.beta, rel=0.10)


def test_network_mode_recovers_planted_beta(planted) -> None:
    sim, observed = planted
    target = ObservedSeries(observed[:, 0].reshape(6, 7).sum(-1), 7)
    start = PLANTED.replace(beta=0.15)
    result = fit_network(
        sim,
        series_features(target),
        series_loss(target),
        target.days,
        start,
        {"beta": (0.05, 1.0)},
        epochs=50,
        lr=0.05,
    )
    assert min(result.losses) < 0.1 * result.losses[0]
    assert result.theta.beta == pytest.approx(PLANTED.beta, rel=0.10)


def test_unknown_fit_parameter_and_zero_epochs_are_rejected(planted) -> None:
    sim, observed = planted
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        fit_params(sim, weekly_log_loss(observed), 42, PLANTED, epochs=0)
    with pytest.raises(ValueError, match="gamma"):
        fit_params(sim, weekly_log_loss(observed), 42, PLANTED, epochs=1, fit=("gamma",))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cases.csv"
    p.write_text(text)
    return p


def test_load_target_filters_and_drops_exact_repeats(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "date,nta_id,cases_week\n2020/08/08,QN0103,3\n2020/08/08,BK01,99\n"
        "2020/08/15,QN0103,10\n2020/08/08,QN0103,3\n",
    )
    t = load_target(p, filters={"nta_id": "QN0103"})
    assert t.values.tolist() == [3.0, 10.0]
    assert t.labels == ("2020/08/08", "2020/08/15")
    assert t.days == 14


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("date,cases\n2020/08/08,3\n", ":1: missing column 'cases_week'"),
        ("date,cases_week\n2020/08/08,3\n2020/08/15,abc\n", ":3: field 'cases_week': 'abc'"),
        ("date,cases_week\n2020/08/08,\n", ":2: field 'cases_week': ''"),
        ("date,cases_week\n2020/08/08,-4\n", ":2: field 'cases_week': '-4'"),
        ("date,cases_week\n2020/08/08,nan\n", ":2: field 'cases_week': 'nan'"),
        (
            "date,cases_week\n2020/08/08,3\n2020/08/08,5\n",
            ":3: field 'cases_week': date '2020/08/08'",
        ),
        ("date,cases_week\n", "no rows match"),
    ],
)
def test_bad_target_files_name_file_line_and_field(tmp_path: Path, text: str, where: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(TargetFileError) as e:
        load_target(p)
    assert str(p) in str(e.value)
    assert where in str(e.value)


def test_astoria_target_loads(astoria_dir: Path) -> None:
    t = load_target(astoria_dir / "nyc_neighborhood_weekly_cases.csv", filters={"nta_id": "QN0103"})
    assert len(t) > 30
    assert t.labels == tuple(sorted(set(t.labels)))  # the repeated first weeks collapsed
    assert t.values[:4].tolist() == [3.0, 10.0, 10.0, 15.0]


def test_astoria_fit_improves_on_its_start(
    astoria_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A short version of the documented QN0103 fit (docs/model.md): the loss must fall."""
    from decentsim.cli import main

    rc = main(
        [
            "calibrate",
            "--population",
            str(astoria_dir),
            "--target",
            str(astoria_dir / "nyc_neighborhood_weekly_cases.csv"),
            "--filter",
            "nta_id=QN0103",
            "--days",
            "56",
            "--epochs",
            "8",
            "--theta",
            "beta=0.0100,init_frac=0.0003",
            "--lr",
            "0.02",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["agents"] == 37_518 and result["periods"] == 8
    assert result["loss_best"] < result["loss_first"]
    assert (tmp_path / "fit.png").is_file() and (tmp_path / "loss.png").is_file()


# -- the one optimizer of central and federated calibration ----------------------------------
def test_theta_optimizer_fits_only_what_it_is_told_within_the_bounds() -> None:
    start = Theta(beta=0.3, mortality=0.02, init_frac=0.01)
    opt = ThetaOptimizer(start, ("beta", "init_frac"), lr=0.5)
    for _ in range(30):  # a gradient that pushes β up without end
        theta = opt.step(torch.tensor([-1e6, 5.0, -3.0], dtype=torch.float64), BASE_PARAMS)
    assert theta[1] == start.mortality  # not fitted: exactly the start value
    assert theta[0] > start.beta and theta[2] > start.init_frac
    assert 0 < theta[0] <= PARAM_BOUNDS["beta"][1] and 0 < theta[2] <= 1
    Theta.from_tensor(theta)  # valid
    with pytest.raises(ValueError, match="cannot fit unknown parameter"):
        ThetaOptimizer(start, ("gamma",), 0.1)
    with pytest.raises(ValueError, match=r"cannot fit \['init_frac'\] from 0"):
        ThetaOptimizer(start.replace(init_frac=0.0), ("init_frac",), 0.1)


def test_theta_optimizer_state_round_trips_through_json() -> None:
    """A restarted coordinator continues the same optimisation from the persisted state."""
    start = Theta(beta=0.3, mortality=0.02, init_frac=0.01)
    grads = [torch.tensor([g, 0.1, -g], dtype=torch.float64) for g in (2.0, -1.0, 0.5, 3.0)]
    straight = ThetaOptimizer(start, ("beta", "init_frac"), 0.1)
    thetas = [straight.step(g, BASE_PARAMS) for g in grads]
    resumed = ThetaOptimizer(start, ("beta", "init_frac"), 0.1)
    resumed.step(grads[0], BASE_PARAMS)
    state = json.loads(json.dumps(resumed.state_dict()))
    again = ThetaOptimizer(start, ("beta", "init_frac"), 0.1)
    again.load_state_dict(state)
    assert torch.equal(again.theta(), thetas[0])
    for g, want in zip(grads[1:], thetas[1:], strict=True):
        assert torch.equal(again.step(g, BASE_PARAMS), want)
