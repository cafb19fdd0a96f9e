"""``decentsim simulate``: one run of the central simulator, with outputs and plots."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from decentsim.commands.common import (
    add_behaviour_arguments,
    add_population_arguments,
    behaviour_errors,
    behaviour_source,
    check_config,
    check_device,
    check_stimuli,
    check_work_layer,
    load_population,
    make_out_dir,
    model_config,
    parse_theta,
    population_grid,
)
from decentsim.usage import UsageError, positive_int
from sim import env, models
from sim.model import ModelConfigError
from sim.params import ALIGNMENT_PARAMS, BASE_PARAMS
from sim.runner import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``simulate`` options."""
    add_population_arguments(p)
    add_behaviour_arguments(p)
    p.add_argument("--days", type=positive_int, default=60)
    p.add_argument(
        "--theta",
        default="",
        help="name=value,... (beta, mortality, init_frac; a table's alignment scale_<age "
        "group>, shift_<age group>)",
    )
    p.add_argument(
        "--grad",
        choices=("forward", "reverse"),
        help="also compute loss = total new infections and dloss/dθ (with a behaviour table, "
        "the alignment parameters' too)",
    )
    p.add_argument("--out", help="directory for trajectory.csv, summary.json and plots")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _report(summary: dict[str, Any], out: str | None) -> None:
    """The summary in a few lines of text."""
    daily = summary["daily"]
    total, deaths = int(sum(daily["new_infections"])), int(sum(daily["new_deaths"]))
    employed = daily["employment"]
    print(
        f"{summary['agents']:,} agents, {summary['days']} days: {total:,} infections, "
        f"{deaths:,} deaths; {int(employed[0]):,} of {summary['labour_force']:,} in the labour "
        f"force working on day 1, {int(employed[-1]):,} on day {summary['days']} "
        f"({summary['wall_s']:.2f} s)"
    )
    beh = summary["behaviour"]
    if beh["kind"] == "table":
        line = (
            f"behaviour table from {beh['source']}: {beh['periods']} period(s) of "
            f"{beh['period_days']} days over {beh['cells']:,} cells, version "
            f"{beh['table_version'][:12]}"
        )
        if "backend_calls" in beh:
            line += f"; {beh['backend_calls']:,} backend calls, {beh['cache_hits']:,} cached"
        print(line)
    if "grad" in summary:
        print(
            "d(total infections)/dθ: "
            + ", ".join(f"{k}={v:.4g}" for k, v in summary["grad"].items())
        )
    if out:
        table = ", behaviour_table.csv" if beh["kind"] == "table" else ""
        print(
            f"wrote {out}/trajectory.csv, summary.json{table}, stages.png, daily.png, "
            "by_age.png, employment.png"
        )


def run(args: argparse.Namespace) -> int:
    """Run the simulation; print its summary (and write its files with ``--out``)."""
    theta = parse_theta(args.theta, models.epidemiology.theta)
    config = model_config(args)
    if config.behaviour == "table" and args.grad:
        config = replace(config, grad=(*BASE_PARAMS, *ALIGNMENT_PARAMS))
    check_stimuli(config, args.days)
    check_device(args.device)
    pop = load_population(args.population, args.seed)
    check_config(config, pop)
    check_work_layer(args, pop)
    source = behaviour_source(args, population_grid(pop))
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
            source=source,
        )
        with behaviour_errors():
            simulation.execute(grad=args.grad or "none", progress=sys.stderr.isatty())
    except ModelConfigError as e:  # exact sums' bit budget: the message names --dtype
        raise UsageError(str(e)) from None
    summary = simulation.save(args.out) if args.out else simulation.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        _report(summary, args.out)
    return 0
