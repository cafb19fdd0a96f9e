"""A federation with a behaviour table samples on the devices: the coordinator builds each
period's row from public inputs only (a table file, or a language model asked per cell from the
opened aggregates) and sends it to every device; each device draws its agent's choices from it.
The opened daily aggregates — cases, deaths and employment — equal the central simulator's fed
the same table, and the gradient agrees within 1e-6."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from audit.checks import Status, check_behaviour
from audit.load import load_run
from behaviour import LLMSource, OpenAIClient, TableSource
from launcher.federation import make_spec
from launcher.run import federated_run
from sim.archetypes import BEHAVIOURS, BehaviourTable, population_cells
from sim.params import BASE_PARAMS
from sim.populations import from_spec
from sim.runner import CentralSimulator

POPULATION, SEED, DAYS = "synthetic:400", 5, 10
THETA = {"beta": 0.6, "mortality": 0.01, "init_frac": 0.05}


def central(spec, source):  # type: ignore[no-untyped-def]
    """The central run of ``spec`` with its behaviour ``source``."""
    sim = CentralSimulator(
        from_spec(spec.population, seed=SEED), spec.model_config(), SEED, dtype=torch.float64
    )
    return sim.run(spec.theta_object(), spec.days, "forward", source=source)


def check_equal(summary: dict, run, out: Path) -> None:  # type: ignore[no-untyped-def]
    y = run.y[..., 0].sum(-1)  # (T, channels)
    assert summary["daily"]["new_infections"] == y[:, 0].tolist()
    assert summary["daily"]["new_deaths"] == y[:, 1].tolist()
    assert summary["daily"]["employment"] == y[:, 2].tolist()
    # the choices mattered: some of the labour force stayed home, on some day
    assert min(summary["daily"]["employment"]) < max(summary["daily"]["employment"])
    _, grad = run.loss_and_grad()
    got = np.array([summary["grad"][n] for n in BASE_PARAMS])
    np.testing.assert_allclose(got, grad.numpy(), rtol=1e-6, atol=1e-9)
    # every period's row the devices got is kept, and equals the central run's table
    db = out / "state" / "coordinator" / "coordinator.sqlite3"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT period, row FROM behaviour_rows ORDER BY period").fetchall()
    assert [p for p, _ in rows] == list(range(run.table.periods))
    for period, raw in rows:
        sent = np.frombuffer(raw, "<f8").reshape(-1, len(BEHAVIOURS))
        np.testing.assert_array_equal(sent, run.table.p[period])
    # …and is the run's public table, saved beside its trajectory
    saved = BehaviourTable.load(out / "behaviour_table.csv", run.table.grid, run.table.period_days)
    np.testing.assert_array_equal(saved.p, run.table.p)
    assert summary["behaviour"]["version"] == run.table.version


@pytest.mark.slow
def test_a_table_run_samples_on_the_devices_as_centrally(tmp_path: Path) -> None:
    grid = population_cells(from_spec(POPULATION, seed=SEED))[0]
    rng = np.random.default_rng(3)
    table = BehaviourTable(grid, 7, rng.uniform(0.2, 0.8, (2, grid.n_cells, 2)), "test")
    path = tmp_path / "table.csv"
    table.save(path)
    spec = make_spec(
        POPULATION, DAYS, population_seed=SEED, pools=2, seed=SEED, theta=THETA,
        behaviour="table", behaviour_table=str(path), step_timeout_s=60,
    )  # fmt: skip
    out = tmp_path / "out"
    summary = federated_run(spec, out, population_seed=SEED, timeout_s=300, record_views=True)
    check_equal(summary, central(spec, TableSource(path, grid, 7)), out)
    # the audit shows every row the devices got is the table file's…
    inp = load_run(out, "coordinator", with_truth=False)
    assert check_behaviour(inp).status is Status.PASS, check_behaviour(inp).summary
    assert check_behaviour(load_run(out, "aggregator", with_truth=False)).status is Status.SKIP
    # …and notices a row that is not
    assert inp.behaviour is not None
    inp.behaviour.rows[0, 1] = 1 - inp.behaviour.rows[0, 1]
    bad = check_behaviour(inp)
    assert bad.status is Status.FAIL and "epoch 0 period 1" in bad.summary


@pytest.mark.slow
def test_an_llm_run_asks_per_cell_and_samples_on_the_devices(tmp_path: Path, rule_backend) -> None:  # type: ignore[no-untyped-def]
    """The coordinator asks the (rule) backend once per cell, behaviour and period, from the
    opened aggregates; the central run asking the same backend gets the same table."""
    spec = make_spec(
        POPULATION, DAYS, population_seed=SEED, pools=2, seed=SEED, theta=THETA,
        behaviour="llm", llm_url=rule_backend.base_url, llm_model="rule", step_timeout_s=60,
        stimuli=("0:600",),
    )  # fmt: skip
    out = tmp_path / "out"
    before = rule_backend.requests()
    summary = federated_run(spec, out, population_seed=SEED, timeout_s=300, record_views=True)
    cells = spec.archetype_grid().n_cells
    asked = rule_backend.requests() - before
    assert 0 < asked <= cells * len(BEHAVIOURS) * 2  # 2 periods; repeated prompts asked once
    source = LLMSource(OpenAIClient(rule_backend.base_url, "rule"), tmp_path / "central-cache")
    check_equal(summary, central(spec, source), out)
    # the prompts are public: the coordinator's answer cache holds only cell questions
    cached = list((out / "state" / "coordinator" / "llm-cache").rglob("*.json"))
    assert cached and all("agent" not in p.read_text().lower() for p in cached)
    # the audit recomputes the public numbers from the opened aggregates and renders every
    # cell's questions: each cached prompt is one of them, each row their answers
    inp = load_run(out, "coordinator", with_truth=False)
    ok = check_behaviour(inp)
    assert ok.status is Status.PASS, ok.summary
    assert ok.details["cached_prompts"] == len(cached) and ok.details["rows"] == 2
    # a prompt carrying an individual's outcome is caught, and named by its file only
    entry = json.loads(cached[0].read_text())
    entry["prompt"] += " Agent 17 tested positive yesterday."
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps(entry))
    assert inp.behaviour is not None
    inp.behaviour.cache.append(planted)
    bad = check_behaviour(inp)
    assert bad.status is Status.FAIL and str(planted) in bad.summary
    assert "Agent 17" not in json.dumps(bad.details) + bad.summary
    # so is a row that is not the model's answers
    inp.behaviour.cache.pop()
    inp.behaviour.rows[0, 0] = np.clip(inp.behaviour.rows[0, 0] + 0.01, 0, 1)
    assert "not the model's answers" in check_behaviour(inp).summary
