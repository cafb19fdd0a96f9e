"""The Python API: bind a model template to a population, execute, visualize.

from sim import env, models, populations
simulation = env.create_from_template(models.epidemiology, populations.synthetic(10_000))
simulation.execute()
simulation.predict()  # daily new infections, deaths and employment
simulation.visualize("out/")

A behaviour-table model (``ModelConfig(behaviour="table")``) takes the source of its table
(``source=``, a ``sim.archetypes.BehaviourSource``: e.g. ``behaviour.TableSource`` or
``behaviour.LLMSource``); ``save`` then also writes the table the run realised.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from sim.archetypes import BehaviourSource
from sim.model import STAGES, ModelConfig
from sim.models import ModelTemplate
from sim.params import Theta
from sim.plots import plot_run
from sim.populations import Population
from sim.runner import CentralSimulator, GradMode, LossFn, RunResult, total_infections

#: the realised behaviour table, beside trajectory.csv (``save``)
TABLE_FILE = "behaviour_table.csv"


@runtime_checkable
class NamedSource(Protocol):
    """A behaviour source that says where its rows come from (``table:PATH``,
    ``llm:MODEL@URL``): the sources of the ``behaviour`` package do."""

    @property
    def source(self) -> str: ...


@runtime_checkable
class CountingSource(Protocol):
    """A behaviour source that counts its backend calls and cached answers (a language
    model's): a rerun from the cache makes no calls."""

    @property
    def calls(self) -> int: ...

    cache_hits: int


@dataclass(frozen=True)
class Prediction:
    """What a run predicts: daily totals over all ages, (T,) each."""

    new_infections: torch.Tensor
    new_deaths: torch.Tensor
    #: agents working each day (alive, in the labour force, and choosing to work)
    employment: torch.Tensor

    def to_dict(self) -> dict[str, list[float]]:
        """The series as lists, by name."""
        return {
            "new_infections": self.new_infections.tolist(),
            "new_deaths": self.new_deaths.tolist(),
            "employment": self.employment.tolist(),
        }


class Simulation:
    """A model bound to a population, a seed and θ; ``execute`` runs it on the central simulator."""

    def __init__(
        self,
        template: ModelTemplate,
        population: Population,
        *,
        theta: Theta | None = None,
        config: ModelConfig | None = None,
        seed: int = 0,
        days: int = 60,
        device: str = "cpu",
        dtype: torch.dtype = torch.float64,
        source: BehaviourSource | None = None,
    ) -> None:
        self.template = template
        self.population = population
        self.theta = theta or template.theta
        self.config = config or template.config
        self.seed = seed
        self.days = days
        #: fills the behaviour table of a ``table`` model (None for the heuristic)
        self.source = source
        self.simulator = CentralSimulator(
            population, self.config, seed=seed, device=device, dtype=dtype
        )
        self.result: RunResult | None = None
        self.wall_s = 0.0

    def execute(
        self, days: int | None = None, grad: GradMode = "none", progress: bool = False
    ) -> RunResult:
        """Run for ``days`` (default: the simulation's); ``grad`` = none | forward | reverse."""
        t0 = time.perf_counter()
        self.result = self.simulator.run(
            self.theta, days or self.days, grad, progress=progress, source=self.source
        )
        self.wall_s = time.perf_counter() - t0
        return self.result

    def predict(self) -> Prediction:
        """The daily new infections, deaths and employment of the latest run (a values-only
        run first if there is none)."""
        r = self.result or self.execute()
        return Prediction(r.new_infections, r.new_deaths, r.employment)

    def _require_result(self) -> RunResult:
        if self.result is None:
            raise RuntimeError("call execute() before asking for results")
        return self.result

    def _behaviour(self, r: RunResult) -> dict[str, Any]:
        """How the agents decided: the heuristic, or a table (its source and version)."""
        c = self.config
        if r.table is None:
            return {"kind": c.behaviour}
        out: dict[str, Any] = {
            "kind": c.behaviour,
            "source": (
                self.source.source
                if isinstance(self.source, NamedSource)
                else type(self.source).__name__
            ),
            "period_days": c.period_days,
            "work_layer": c.work_layer,
            "stimuli": [{"month": s.month, "amount": s.amount} for s in c.stimuli],
            "cells": r.table.grid.n_cells,
            "periods": r.table.periods,
            "table_version": r.table.version,
        }
        if isinstance(self.source, CountingSource):
            out["backend_calls"] = self.source.calls
            out["cache_hits"] = self.source.cache_hits
        return out

    def summary(self, loss_fn: LossFn = total_infections) -> dict[str, Any]:
        """The run as a JSON-ready dict (the CLI's ``--json`` output)."""
        r = self._require_result()
        out: dict[str, Any] = {
            "days": r.days,
            "agents": r.agents,
            "seed": self.seed,
            "population": self.population.name,
            "theta": self.theta.to_dict(),
            "wall_s": round(self.wall_s, 4),
            "labour_force": int(self.simulator.agents.labour_force.sum()),
            "behaviour": self._behaviour(r),
            "daily": r.daily(),
        }
        if r.mode != "none":
            loss, grad = r.loss_and_grad(loss_fn)
            assert grad is not None
            out["loss"] = loss
            out["grad"] = dict(zip(r.grad_names, grad.tolist(), strict=True))
            out["grad_mode"] = r.mode
        return out

    def write_trajectory(self, path: str | Path) -> Path:
        """trajectory.csv: day, S, E, I, R, D (end of day), new_infections, new_deaths,
        employment."""
        r = self._require_result()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = r.stage_counts.tolist()
        new_inf, new_dead = r.new_infections.tolist(), r.new_deaths.tolist()
        employed = r.employment.tolist()
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["day", *STAGES, "new_infections", "new_deaths", "employment"])
            w.writerow([0, *counts[0], 0, 0, ""])
            for d in range(r.days):
                w.writerow(
                    [d + 1, *counts[d + 1], int(new_inf[d]), int(new_dead[d]), int(employed[d])]
                )
        return path

    def visualize(self, out_dir: str | Path) -> list[Path]:
        """Write the run's plots (PNG) into ``out_dir``; returns their paths."""
        r = self._require_result()
        return plot_run(
            r,
            out_dir,
            title=f"{self.template.name} on {self.population.name}",
            labour_force=int(self.simulator.agents.labour_force.sum()),
        )

    def save(self, out_dir: str | Path) -> dict[str, Any]:
        """trajectory.csv, summary.json, the plots and — when the run had a behaviour table —
        the table it realised (behaviour_table.csv; its version is in summary.json) in
        ``out_dir``; returns the summary."""
        out = Path(out_dir)
        summary = self.summary()
        self.write_trajectory(out / "trajectory.csv")
        r = self._require_result()
        if r.table is not None:
            (out / TABLE_FILE).write_text(r.table.to_csv())
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.visualize(out)
        return summary


def create_from_template(
    template: ModelTemplate, population: Population, **kwargs: Any
) -> Simulation:
    """A ``Simulation`` of ``template`` on ``population`` (keyword options as ``Simulation``)."""
    return Simulation(template, population, **kwargs)
