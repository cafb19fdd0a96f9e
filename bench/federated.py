"""``decentsim bench federated``: the federated run against the central simulator, same input.

Runs the central simulator (float64, exact sums, forward-mode gradient: the configuration the
federated run reproduces) and then ``federated run`` on the same population, seed and θ, and
prints one JSON line::

    {"agents", "days", "mode", "pools", "central_wall_s", "federated_wall_s", "ratio",
     "bytes_per_device_per_day", "equal_daily"}

``central_wall_s`` times building the simulator and running it (the population is loaded
before the clock starts); ``federated_wall_s`` times the whole federation from process start
to the last committed day (process start-up, enrolment and every round). ``equal_daily`` says
whether the federated daily aggregates equal the central ones exactly (ideal radio).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from decentsim.commands.common import make_out_dir
from decentsim.commands.federated import add_federation_arguments, federation_spec
from decentsim.usage import (
    CommandFailed,
)
from launcher.federation import FederationError
from launcher.run import federated_run
from sim.populations import from_spec
from sim.runner import CentralSimulator


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bench federated``."""
    add_federation_arguments(p, days=10, step_timeout_s=600.0)
    p.add_argument("--out", type=Path, help="keep the federated run's outputs here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both runs; see the module docstring."""
    if args.out is not None:
        make_out_dir("--out", args.out)
    spec = federation_spec(args)
    population = from_spec(args.population, seed=args.seed)
    start = time.perf_counter()
    sim = CentralSimulator(population, spec.model_config(), args.seed, dtype=torch.float64)
    central = sim.run(spec.theta_object(), args.days, "forward")
    central_wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        try:
            summary = federated_run(spec, out, args.seed, progress=True)
        except FederationError as e:
            raise CommandFailed(str(e)) from None
    fed_inf = torch.tensor(summary["daily"]["new_infections"], dtype=torch.float64)
    fed_dead = torch.tensor(summary["daily"]["new_deaths"], dtype=torch.float64)
    equal = bool(
        torch.equal(fed_inf, central.new_infections.to(torch.float64))
        and torch.equal(fed_dead, central.new_deaths.to(torch.float64))
    )
    fed_wall = float(summary["wall_s"])
    return {
        "agents": population.n_agents,
        "days": args.days,
        "mode": args.mode,
        "pools": args.pools,
        "central_wall_s": round(central_wall, 4),
        "federated_wall_s": round(fed_wall, 3),
        "ratio": round(fed_wall / central_wall, 1),
        "bytes_per_device_per_day": round(
            summary["bytes_device_to_servers"] / (population.n_agents * args.days), 1
        ),
        "equal_daily": equal,
    }
