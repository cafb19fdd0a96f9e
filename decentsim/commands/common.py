"""Arguments shared by the simulator's subcommands."""

from __future__ import annotations

import argparse

from sim.calibration import TargetFileError
from sim.model import Lockdown, ModelConfig, ModelConfigError, Vaccination
from sim.params import ParameterError
from sim.populations import PopulationError
from sim.runner import DTYPES
from sim.sampling import Estimator

#: Errors caused by what the user typed or pointed at: reported as one line, no traceback.
USER_ERRORS = (ParameterError, PopulationError, ModelConfigError, TargetFileError)


def add_population_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--population",
        default="synthetic:10000",
        help="synthetic:N, or a directory with agents.csv and contacts_*.csv",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--dtype",
        default="float64",
        choices=tuple(DTYPES),
        help="float64 sums exactly (the model a federation runs); float32 is faster, inexact",
    )
    p.add_argument(
        "--lockdown",
        action="append",
        default=[],
        metavar="LAYER:DAY:SCALE",
        help="scale LAYER's weights by SCALE from DAY (repeatable)",
    )
    p.add_argument(
        "--vaccinate",
        action="append",
        default=[],
        metavar="DAY:FRACTION[:EFFICACY]",
        help="vaccinate FRACTION of agents on DAY (repeatable)",
    )
    p.add_argument(
        "--estimator",
        default="st",
        choices=("st", "gumbel"),
        help="gradient estimator of discrete events",
    )
    p.add_argument(
        "--population-seeds",
        action="store_true",
        help="start from the population's initially_infected column, not init_frac",
    )


def _split(text: str, n_min: int, n_max: int, flag: str) -> list[str]:
    parts = text.split(":")
    if not n_min <= len(parts) <= n_max:
        raise SystemExit(
            f"decentsim: {flag} {text!r}: expected {n_min}..{n_max} ':'-separated fields"
        )
    return parts


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ``ModelConfig`` described by the shared arguments (bad values exit with a message)."""
    try:
        locks = tuple(
            Lockdown(p[0], int(p[1]), float(p[2]))
            for p in (_split(t, 3, 3, "--lockdown") for t in args.lockdown)
        )
        vacs = tuple(
            Vaccination(int(p[0]), float(p[1]), *(float(x) for x in p[2:]))
            for p in (_split(t, 2, 3, "--vaccinate") for t in args.vaccinate)
        )
    except ValueError as e:  # int()/float() of a field, or the intervention's own validation
        raise SystemExit(f"decentsim: bad intervention: {e}") from None
    return ModelConfig(
        lockdowns=locks,
        vaccinations=vacs,
        estimator=Estimator(args.estimator),
        use_population_seeds=args.population_seeds,
    )
