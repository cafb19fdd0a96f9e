"""The Python API: bind a model template to a population, execute, visualize.

from sim import env, models, populations
simulation = env.create_from_template(models.epidemiology, populations.synthetic(10_000))
simulation.execute()
simulation.visualize("out/")
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from sim.model import STAGES, ModelConfig
from sim.models import ModelTemplate
from sim.params import Theta
from sim.plots import plot_run
from sim.populations import Population
from sim.runner import CentralSimulator, GradMode, LossFn, RunResult, total_infections


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
    ) -> None:
        self.template = template
        self.population = population
        self.theta = theta or template.theta
        self.config = config or template.config
        self.seed = seed
        self.days = days
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
        self.result = self.simulator.run(self.theta, days or self.days, grad, progress=progress)
        self.wall_s = time.perf_counter() - t0
        return self.result

    def _require_result(self) -> RunResult:
        if self.result is None:
            raise RuntimeError("call execute() before asking for results")
        return self.result

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
        return plot_run(r, out_dir, title=f"{self.template.name} on {self.population.name}")

    def save(self, out_dir: str | Path) -> dict[str, Any]:
        """trajectory.csv, summary.json and the plots in ``out_dir``; returns the summary."""
        out = Path(out_dir)
        summary = self.summary()
        self.write_trajectory(out / "trajectory.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.visualize(out)
        return summary


def create_from_template(
    template: ModelTemplate, population: Population, **kwargs: Any
) -> Simulation:
    """A ``Simulation`` of ``template`` on ``population`` (keyword options as ``Simulation``)."""
    return Simulation(template, population, **kwargs)
