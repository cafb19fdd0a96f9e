"""Behaviour tables in the central model: gradients reach the table's alignment, a stimulus
what-if moves cases and employment the way the table says, calibration fits the alignment
(Mode 1 and Mode 2) and to an employment target, and a run saves the table it realised.

The tables come from the deterministic rules of ``behaviour_rules.py``, not a language model.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from sim import env, models, populations
from sim.archetypes import BehaviourTable
from sim.calibration import (
    TargetFileError,
    employment_loss,
    fit_network,
    fit_params,
    load_employment,
    month_on_month,
    monthly_employment,
    pearson,
)
from sim.model import ModelConfig, ModelConfigError, Stimulus
from sim.params import ALIGNMENT_PARAMS, BASE_PARAMS, PARAM_NAMES, Theta
from sim.runner import CentralSimulator
from sim.sampling import Estimator

from .behaviour_rules import CaseRule, FixedRule, StimulusRule

THETA = Theta(beta=0.3, init_frac=0.01, scale_20t29=1.3, shift_40t49=-0.4, shift_U19=0.3)


@pytest.mark.parametrize("estimator", [Estimator("st"), Estimator("gumbel", tau=0.7)])
def test_forward_and_reverse_gradients_agree_on_the_alignment(estimator: Estimator) -> None:
    pop = populations.synthetic(1500, seed=2)
    config = ModelConfig(behaviour="table", grad=PARAM_NAMES, estimator=estimator)
    sim = CentralSimulator(pop, config, seed=2, dtype=torch.float64)
    fwd = sim.run(THETA, 21, "forward", source=FixedRule())
    rev = sim.run(THETA, 21, "reverse", source=FixedRule())
    assert torch.equal(fwd.y[..., 0], rev.y[..., 0].detach())
    assert fwd.new_infections.sum() > 100, "the epidemic must take off for a meaningful check"

    def cases_and_work(y: torch.Tensor) -> torch.Tensor:
        return y[:, 0].sum() + 0.05 * y[:, 2].sum()

    _, gf = fwd.loss_and_grad(cases_and_work)
    _, gr = rev.loss_and_grad(cases_and_work)
    assert gf is not None and gr is not None
    align = [PARAM_NAMES.index(n) for n in ALIGNMENT_PARAMS]
    assert (gf[align].abs() > 1e-3).all(), "every alignment parameter must have a gradient"
    torch.testing.assert_close(gf[align], gr[align], rtol=1e-4, atol=0)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-8 * float(gf.abs().max()))


def test_a_larger_stimulus_gives_fewer_infections_and_less_employment() -> None:
    """The rule: a payment raises isolation, and an isolating person does not work."""
    pop = populations.synthetic(2000, seed=1)
    infections, employment = [], []
    for amount in (0.0, 300.0, 900.0, 2700.0):
        config = ModelConfig(behaviour="table", stimuli=(Stimulus(0, amount), Stimulus(1, amount)))
        run = CentralSimulator(pop, config, seed=1).run(
            Theta(beta=0.35, init_frac=0.01), 35, source=StimulusRule()
        )
        infections.append(float(run.new_infections.sum()))
        employment.append(float(run.employment.sum()))
    assert all(a > b for a, b in itertools.pairwise(infections)), infections
    assert all(a > b for a, b in itertools.pairwise(employment)), employment
    assert infections[-1] < 0.1 * infections[0]


def test_the_public_numbers_drive_the_table_and_it_is_saved(tmp_path: Path) -> None:
    pop = populations.synthetic(1200, seed=4)
    rule = CaseRule()
    simulation = env.create_from_template(
        models.epidemiology,
        pop,
        theta=Theta(beta=0.35, init_frac=0.01),
        config=ModelConfig(behaviour="table", period_days=7),
        seed=4,
        days=20,
        source=rule,
    )
    predicted = simulation.predict()  # runs first: there is no result yet
    assert rule.calls == 3  # one row per period: days 0, 7, 14
    assert simulation.result is not None and simulation.result.table is not None
    table = simulation.result.table
    assert table.periods == 3
    # Period 0 knows no cases yet; later periods saw the run's own infections.
    assert (table.p[1, :, 0] > table.p[0, :, 0]).all()
    assert predicted.employment.min() > 0 and predicted.employment.max() <= pop.n_agents
    assert set(predicted.to_dict()) == {"new_infections", "new_deaths", "employment"}
    summary = simulation.save(tmp_path)
    beh = summary["behaviour"]
    assert beh["kind"] == "table" and beh["source"] == "rule:cases" and beh["periods"] == 3
    saved = BehaviourTable.load(tmp_path / "behaviour_table.csv", table.grid, 7)
    assert saved.version == beh["table_version"] == table.version
    assert json.loads((tmp_path / "summary.json").read_text())["behaviour"] == beh
    assert (tmp_path / "employment.png").stat().st_size > 10_000
    trajectory = (tmp_path / "trajectory.csv").read_text().splitlines()
    assert trajectory[0].endswith(",employment")
    days = trajectory[2:]  # after the header and day 0 (the initial state: no employment yet)
    assert [int(d.split(",")[-1]) for d in days] == [int(x) for x in predicted.employment]


def test_a_table_run_needs_its_source() -> None:
    sim = CentralSimulator(populations.synthetic(100), ModelConfig(behaviour="table"))
    with pytest.raises(ModelConfigError, match="needs a source"):
        sim.run(Theta(), 3)


# -- calibration of the alignment (Mode 1 and Mode 2) ------------------------------------------
FIT = ("shift_30t39", "scale_50t64")
PLANTED = Theta(beta=0.2, init_frac=0.01, shift_30t39=-1.0, scale_50t64=2.0)


@pytest.fixture(scope="module")
def planted_employment() -> tuple[CentralSimulator, torch.Tensor]:
    config = ModelConfig(behaviour="table", grad=(*BASE_PARAMS, *FIT))
    sim = CentralSimulator(populations.synthetic(1200, seed=3), config, seed=3)
    return sim, sim.run(PLANTED, 14, source=FixedRule()).y[..., 0].detach()[:, 2]


def _weekly_employment_loss(observed: torch.Tensor):
    """Squared error of weekly employment per age group (a level loss: the planted shift and
    scale change the level of each group's employment)."""
    target = observed.reshape(2, 7, -1).sum(1)

    def loss(y: torch.Tensor) -> torch.Tensor:
        return ((y[:14, 2].reshape(2, 7, -1).sum(1) - target) ** 2).mean() / 100

    return loss


def test_params_mode_fits_the_alignment(planted_employment) -> None:
    sim, observed = planted_employment
    start = PLANTED.replace(shift_30t39=0.0, scale_50t64=1.0)
    result = fit_params(
        sim, _weekly_employment_loss(observed), 14, start, 30, 0.1, FIT, source=FixedRule()
    )
    assert min(result.losses) < 0.05 * result.losses[0]
    assert result.theta.shift_30t39 == pytest.approx(-1.0, abs=0.2)
    assert result.theta.scale_50t64 == pytest.approx(2.0, abs=0.3)
    assert result.theta.beta == PLANTED.beta  # not fitted, not moved


def test_network_mode_fits_the_alignment(planted_employment) -> None:
    sim, observed = planted_employment
    start = PLANTED.replace(shift_30t39=0.0, scale_50t64=1.0)
    features = torch.stack([torch.linspace(0, 1, 4, dtype=torch.float64)] * 2, dim=-1)
    ranges = {"shift_30t39": (-2.0, 2.0), "scale_50t64": (0.2, 5.0)}
    result = fit_network(
        sim,
        features,
        _weekly_employment_loss(observed),
        14,
        start,
        ranges,
        epochs=40,
        lr=0.05,
        source=FixedRule(),
    )
    assert min(result.losses) < 0.05 * result.losses[0]
    assert result.theta.shift_30t39 == pytest.approx(-1.0, abs=0.2)
    assert result.theta.scale_50t64 == pytest.approx(2.0, abs=0.3)


def test_fitting_what_the_simulator_does_not_differentiate_is_refused(
    planted_employment,
) -> None:
    sim, observed = planted_employment
    with pytest.raises(ValueError, match=r"cannot fit \['shift_U19'\].*ModelConfig.grad"):
        fit_params(sim, _weekly_employment_loss(observed), 14, PLANTED, 1, fit=("shift_U19",))


# -- the employment target -----------------------------------------------------------------
def _labour_csv(tmp_path: Path, rows: str) -> Path:
    path = tmp_path / "labour.csv"
    path.write_text("year,month,labor_force,employed,unemployed,unemployment_rate\n" + rows)
    return path


def test_employment_is_compared_by_month_on_month_change(tmp_path: Path) -> None:
    path = _labour_csv(
        tmp_path,
        "2019,12,110,100,10,9.1\n2020,1,110,110,0,0\n2020,2,110,99,11,10\n2020,3,110,99,11,10\n",
    )
    series = load_employment(path)
    assert series.labels == ("2019-12", "2020-01", "2020-02", "2020-03")
    assert series.days == 120
    want = torch.tensor([10.0, -10.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(series.changes(), want)
    assert series.since("2020-01").labels[0] == "2020-01"
    with pytest.raises(ValueError, match=r"no month 2021-01 .* covers 2019-12 to 2020-03"):
        series.since("2021-01")
    # A simulated run whose monthly mean employment moves as the observed one: loss 0, r = 1.
    daily = torch.cat([torch.full((30,), v) for v in (50.0, 55.0, 49.5, 49.5)]).double()
    y = torch.zeros(120, 3, 6, dtype=torch.float64)
    y[:, 2, 1] = daily
    assert float(employment_loss(series)(y)) == pytest.approx(0.0, abs=1e-20)
    simulated = month_on_month(monthly_employment(daily, 4))
    assert pearson(simulated, series.changes()) == pytest.approx(1.0)
    assert pearson([1.0, 2.0], [2.0, 1.0]) is None  # two points: undefined
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # a constant series


@pytest.mark.parametrize(
    ("rows", "where"),
    [
        ("2020,1,1,x,0,0\n", ":2: field 'employed': 'x' is not a count > 0"),
        ("2020,1,1,0,0,0\n", ":2: field 'employed': '0' is not a count > 0"),
        ("2020,13,1,5,0,0\n", ":2: field 'month': 13 is not 1..12"),
        ("2020,1,1,5,0,0\n2020,3,1,5,0,0\n", ":3: field 'month': 2020-03 follows 2020-01"),
        ("2020,1,1,5,0,0\n2020,1,1,5,0,0\n", ":3: field 'month': 2020-01 follows 2020-01"),
        ("20x0,1,1,5,0,0\n", ":2: field 'year': '20x0' is not an integer"),
        ("", ": no rows"),
    ],
)
def test_bad_employment_files_name_file_line_and_field(
    tmp_path: Path, rows: str, where: str
) -> None:
    path = _labour_csv(tmp_path, rows)
    with pytest.raises(TargetFileError) as e:
        load_employment(path)
    assert str(e.value).startswith(str(path)) and where in str(e.value)
    with pytest.raises(TargetFileError, match=":1: missing column 'jobs'"):
        load_employment(path, "jobs")


def test_the_queens_labour_force_file_loads(astoria_dir: Path) -> None:
    series = load_employment(astoria_dir / "queens_labor_force.csv")
    assert len(series) == 60 and series.labels[0] == "2019-01" and series.labels[-1] == "2023-12"
    april = series.since("2020-03").changes()[0]
    assert float(april) == pytest.approx(100 * (909_400 / 1_138_000 - 1))
