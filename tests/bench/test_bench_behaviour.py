"""``decentsim bench behaviour``: the smallest real run (both modes timed, a one-week table filled
by the rule server — a deterministic OpenAI-compatible HTTP server process, not a language model
— then its cached rerun), its population, and its bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.behaviour import CELLS_PER_AREA, grid_population
from decentsim.cli import main
from sim.archetypes import population_cells

#: the smallest real run: 36 cells (2 areas), one weekly period, one timed run per mode
SMALLEST = [
    "bench", "behaviour", "--agents", "200", "--cells", "36", "--steps", "2",
    "--weeks", "1", "--repeats", "1",
]  # fmt: skip

KEYS = {
    "agents", "cells", "grid", "edges", "work_edges", "steps", "dtype", "threads", "repeats",
    "heuristic_s", "table_s", "heuristic_step_ms", "table_step_ms", "heuristic_s_runs",
    "table_s_runs", "ratio", "overhead_pct", "ratio_fastest", "target_overhead_pct",
    "within_target", "backend", "backend_model", "weeks", "backend_days", "period_days",
    "periods", "behaviours", "cells_x_periods", "backend_calls", "backend_run_s",
    "backend_fill_s", "cached_rerun_calls", "cached_rerun_s", "cached_fill_s",
    "cached_rerun_identical", "server_requests", "backend_calls_per_behaviour",
    "per_behaviour_within_cells_x_periods",
}  # fmt: skip


def test_smallest_run_counts_calls_and_its_cached_rerun_makes_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(SMALLEST) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1, out  # one JSON line on stdout; progress went to stderr
    result = json.loads(lines[0])
    assert set(result) == KEYS
    assert "bench behaviour:" in err
    assert result["cells"] == 36
    assert result["grid"] == {"age_group": 6, "gender": 3, "area": 2}
    assert result["edges"] == 200 * 10 and result["work_edges"] == 200 * 3
    assert len(result["heuristic_s_runs"]) == len(result["table_s_runs"]) == 1
    # the ratio of the medians (each printed to 4 decimals: compare within that rounding)
    h, t = result["heuristic_s"], result["table_s"]
    assert result["ratio"] > 0 and abs(result["ratio"] * h - t) <= 5e-5 * (1 + result["ratio"] + h)
    # one question per cell, behaviour and period: each a real HTTP exchange the server logged
    assert (result["periods"], result["behaviours"], result["backend_days"]) == (1, 2, 7)
    assert result["cells_x_periods"] == 36
    assert result["backend_calls"] == result["server_requests"] == 36 * 1 * 2
    assert result["backend_calls_per_behaviour"] == {"isolate": 36, "work": 36}
    assert result["per_behaviour_within_cells_x_periods"] is True
    # the rerun on the same answer cache asks nothing and draws the same run
    assert result["cached_rerun_calls"] == 0
    assert result["cached_rerun_identical"] is True
    assert "not a language model" in result["backend"]


def test_population_spreads_agents_evenly_over_the_grid_the_simulator_builds() -> None:
    population, cell = grid_population(100, 2, 4, 1, seed=3)
    grid, cells = population_cells(population)
    assert grid.n_cells == 2 * CELLS_PER_AREA
    assert torch.equal(cells, torch.from_numpy(cell))
    counts = np.bincount(cell, minlength=grid.n_cells)
    assert counts.min() >= 100 // grid.n_cells and counts.max() <= 100 // grid.n_cells + 1
    assert {layer.name: layer.n_edges for layer in population.layers} == {
        "community": 300,
        "work": 100,
    }


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--work-degree", "11"], "--work-degree"),
        (["--agents", "17", "--cells", "18"], "--agents"),
        (["--cells", "0"], "--cells"),
        (["--llm-url", "ftp://nowhere"], "--llm-url"),
    ],
)
def test_bad_input_is_one_line_naming_it(
    extra: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*SMALLEST, *extra]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = int(e.code or 0)
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("decentsim bench behaviour"), line
    assert names in line, line
