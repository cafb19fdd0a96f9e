"""``decentsim simulate``: one run of the central simulator, with outputs and plots."""

from __future__ import annotations

import argparse
import json
import sys

from decentsim.commands.common import (
    add_population_arguments,
    check_config,
    check_device,
    load_population,
    make_out_dir,
    model_config,
    parse_theta,
)
from decentsim.usage import UsageError, positive_int
from sim import env, models
from sim.model import ModelConfigError
from sim.runner import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``simulate`` options."""
    add_population_arguments(p)
    p.add_argument("--days", type=positive_int, default=60)
    p.add_argument("--theta", default="", help="name=value,... (beta, mortality, init_frac)")
    p.add_argument(
        "--grad",
        choices=("forward", "reverse"),
        help="also compute loss = total new infections and dloss/dθ",
    )
    p.add_argument("--out", help="directory for trajectory.csv, summary.json and plots")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Run the simulation; print its summary (and write its files with ``--out``)."""
    theta = parse_theta(args.theta, models.epidemiology.theta)
    config = model_config(args)
    check_device(args.device)
    pop = load_population(args.population, args.seed)
    check_config(config, pop)
    if args.out:
        make_out_dir("--out", args.out)
    try:
        simulation = env.create_from_template(
            models.epidemiology,
            pop,
            theta=theta,
            config=config,
            seed=args.seed,
            days=args.days,
            device=args.device,
            dtype=DTYPES[args.dtype],
        )
        simulation.execute(grad=args.grad or "none", progress=sys.stderr.isatty())
    except ModelConfigError as e:  # exact sums' bit budget: the message names --dtype
        raise UsageError(str(e)) from None
    summary = simulation.save(args.out) if args.out else simulation.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        total = int(sum(summary["daily"]["new_infections"]))
        deaths = int(sum(summary["daily"]["new_deaths"]))
        print(
            f"{summary['agents']:,} agents, {summary['days']} days: {total:,} infections, "
            f"{deaths:,} deaths ({summary['wall_s']:.2f} s)"
        )
        if "grad" in summary:
            print(
                "d(total infections)/dθ: "
                + ", ".join(f"{k}={v:.4g}" for k, v in summary["grad"].items())
            )
        if args.out:
            print(
                f"wrote {args.out}/trajectory.csv, summary.json, stages.png, daily.png, by_age.png"
            )
    return 0
