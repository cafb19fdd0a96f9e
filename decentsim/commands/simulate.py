"""``decentsim simulate``: one run of the central simulator, with outputs and plots."""

from __future__ import annotations

import argparse
import json
import sys

from decentsim.commands.common import USER_ERRORS, add_population_arguments, model_config
from sim import env, models, populations
from sim.params import Theta
from sim.runner import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_population_arguments(p)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--theta", default="", help="name=value,... (beta, mortality, init_frac)")
    p.add_argument(
        "--grad",
        choices=("forward", "reverse"),
        help="also compute loss = total new infections and dloss/dθ",
    )
    p.add_argument("--out", help="directory for trajectory.csv, summary.json and plots")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        theta = Theta.parse(args.theta, models.epidemiology.theta)
        pop = populations.from_spec(args.population, seed=args.seed)
        simulation = env.create_from_template(
            models.epidemiology,
            pop,
            theta=theta,
            config=model_config(args),
            seed=args.seed,
            days=args.days,
            device=args.device,
            dtype=DTYPES[args.dtype],
        )
    except USER_ERRORS as e:
        raise SystemExit(f"decentsim simulate: {e}") from None
    if args.days < 1:
        raise SystemExit(f"decentsim simulate: --days must be >= 1, got {args.days}")
    simulation.execute(grad=args.grad or "none", progress=sys.stderr.isatty())
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
