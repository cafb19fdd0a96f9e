"""``decentsim calibrate``: fit θ to an observed series; writes theta.json and plots."""

from __future__ import annotations

import argparse
import json
import sys

from decentsim.commands.common import (
    add_population_arguments,
    check_config,
    check_device,
    load_population,
    load_target_series,
    make_out_dir,
    model_config,
    parse_filters,
    parse_fit,
    parse_theta,
)
from decentsim.usage import UsageError, positive_float, positive_int
from sim import models
from sim.calibration import FitResult, ObservedSeries, fit_network, fit_params, series_loss
from sim.model import ModelConfigError
from sim.params import PARAM_BOUNDS, Theta
from sim.plots import plot_calibration
from sim.runner import DTYPES, CentralSimulator


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``calibrate`` options."""
    add_population_arguments(p)
    p.add_argument("--target", required=True, help="CSV with the observed series")
    p.add_argument("--column", default="cases_week", help="column of counts in --target")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep rows where COLUMN equals VALUE (repeatable)",
    )
    p.add_argument(
        "--period", type=positive_int, default=7, help="days per row of the target (7: weekly)"
    )
    p.add_argument(
        "--days",
        type=positive_int,
        help="days to fit (the first days/period rows); default: the whole series",
    )
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--lr", type=positive_float, default=0.05, help="step size (Adam on log θ)")
    p.add_argument(
        "--mode",
        choices=("params", "network"),
        default="params",
        help="params: fit θ directly; network: train a GRU features→θ",
    )
    p.add_argument("--fit", default="beta,init_frac", help="parameters to fit, comma-separated")
    p.add_argument("--theta", default="", help="starting values, name=value,...")
    p.add_argument(
        "--ascertainment",
        type=positive_float,
        default=1.0,
        help="fraction of infections that are reported as cases, in (0, 1]",
    )
    p.add_argument("--grad", choices=("forward", "reverse"), default="forward")
    p.add_argument("--out", default="out/calibrate")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _fit(
    args: argparse.Namespace,
    sim: CentralSimulator,
    target: ObservedSeries,
    start: Theta,
    fit: tuple[str, ...],
) -> FitResult:
    """Fit ``fit`` by ``--mode``: θ directly, or a GRU calibration network."""
    loss_fn = series_loss(target, args.ascertainment)
    progress = sys.stderr.isatty()
    if args.mode == "params":
        return fit_params(
            sim,
            loss_fn,
            target.days,
            start,
            args.epochs,
            args.lr,
            fit,
            args.grad,
            progress=progress,
        )
    # The network searches within a factor of 5 of the start value (a log-scale prior).
    start_values = start.to_dict()
    ranges = {
        n: (
            max(start_values[n] / 5, PARAM_BOUNDS[n][0] + 1e-9),
            min(start_values[n] * 5, PARAM_BOUNDS[n][1]),
        )
        for n in fit
    }
    return fit_network(
        sim,
        target,
        loss_fn,
        start,
        ranges,
        args.epochs,
        args.lr,
        args.grad,
        seed=args.seed,
        progress=progress,
    )


def run(args: argparse.Namespace) -> int:
    """Fit θ to ``--target``; write theta.json, loss.png and fit.png into ``--out``."""
    if args.ascertainment > 1:
        raise UsageError(f"--ascertainment must be in (0, 1], got {args.ascertainment}")
    if args.days is not None and args.days < args.period:
        raise UsageError(f"--days must be >= --period ({args.period}), got {args.days}")
    fit = parse_fit(args.fit)
    start = parse_theta(args.theta, models.epidemiology.theta)
    # θ is fitted in log space (params) or within a factor of 5 of its start (network)
    zero = [n for n in fit if start.to_dict()[n] <= 0]
    if zero:
        raise UsageError(f"--theta: the fitted parameter(s) {zero} need a positive start value")
    config = model_config(args)
    check_device(args.device)
    target = load_target_series(args.target, args.column, parse_filters(args.filter), args.period)
    if args.days is not None:
        target = target.head(args.days // args.period)
    if args.mode == "network" and len(target) < 2:  # its features standardise the series
        raise UsageError(
            f"--mode network needs at least 2 periods of --target (after --filter and --days), "
            f"got {len(target)}"
        )
    pop = load_population(args.population, args.seed)
    check_config(config, pop)
    out = make_out_dir("--out", args.out)
    try:
        sim = CentralSimulator(
            pop, config, seed=args.seed, device=args.device, dtype=DTYPES[args.dtype]
        )
        result = _fit(args, sim, target, start, fit)
    except ModelConfigError as e:  # exact sums' bit budget: the message names --dtype
        raise UsageError(str(e)) from None
    summary = {
        "mode": args.mode,
        "population": pop.name,
        "agents": pop.n_agents,
        "target": target.source,
        "periods": len(target),
        "days": target.days,
        "fit": list(fit),
        "theta": result.theta.to_dict(),
        "loss_first": result.losses[0],
        "loss_best": min(result.losses),
        "losses": result.losses,
        "thetas": result.thetas,
    }
    (out / "theta.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_calibration(
        result.losses,
        target.values,
        result.fitted_daily,
        target.period_days,
        out,
        target.labels,
        args.ascertainment,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"fitted {', '.join(f'{k}={v:.4g}' for k, v in result.theta.to_dict().items())}; "
            f"loss {result.losses[0]:.4g} -> {min(result.losses):.4g}; wrote {out}/theta.json, "
            "loss.png, fit.png"
        )
    return 0
