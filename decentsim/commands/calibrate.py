"""``decentsim calibrate``: fit θ to an observed series; writes theta.json and plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from decentsim.commands.common import USER_ERRORS, add_population_arguments, model_config
from sim import models, populations
from sim.calibration import fit_network, fit_params, load_target, series_loss
from sim.params import PARAM_BOUNDS, Theta
from sim.plots import plot_calibration
from sim.runner import DTYPES, CentralSimulator


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--period", type=int, default=7, help="days per row of the target (7: weekly)")
    p.add_argument(
        "--days",
        type=int,
        help="days to fit (the first days/period rows); default: the whole series",
    )
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05)
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
        type=float,
        default=1.0,
        help="fraction of infections that are reported as cases",
    )
    p.add_argument("--grad", choices=("forward", "reverse"), default="forward")
    p.add_argument("--out", default="out/calibrate")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    filters = {}
    for f in args.filter:
        col, sep, val = f.partition("=")
        if not sep:
            raise SystemExit(f"decentsim calibrate: --filter {f!r} is not COLUMN=VALUE")
        filters[col] = val
    try:
        start = Theta.parse(args.theta, models.epidemiology.theta)
        target = load_target(args.target, args.column, filters, period_days=args.period)
        pop = populations.from_spec(args.population, seed=args.seed)
        sim = CentralSimulator(
            pop, model_config(args), seed=args.seed, device=args.device, dtype=DTYPES[args.dtype]
        )
    except USER_ERRORS as e:
        raise SystemExit(f"decentsim calibrate: {e}") from None
    if args.days is not None:
        if args.days < args.period:
            raise SystemExit(f"decentsim calibrate: --days must be >= --period ({args.period})")
        target = target.head(args.days // args.period)
    if args.epochs < 1:
        raise SystemExit(f"decentsim calibrate: --epochs must be >= 1, got {args.epochs}")
    fit = tuple(n.strip() for n in args.fit.split(",") if n.strip())
    unknown = set(fit) - set(PARAM_BOUNDS)
    if unknown:
        raise SystemExit(f"decentsim calibrate: --fit names unknown parameter(s) {sorted(unknown)}")
    loss_fn = series_loss(target, args.ascertainment)
    progress = sys.stderr.isatty()
    if args.mode == "params":
        result = fit_params(
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
    else:
        # The network searches within a factor of 5 of the start value (a log-scale prior).
        start_values = start.to_dict()
        zero = [n for n in fit if start_values[n] <= 0]
        if zero:
            raise SystemExit(
                f"decentsim calibrate: --mode network needs a positive start value "
                f"for {zero} (set it with --theta)"
            )
        ranges = {
            n: (
                max(start_values[n] / 5, PARAM_BOUNDS[n][0] + 1e-9),
                min(start_values[n] * 5, PARAM_BOUNDS[n][1]),
            )
            for n in fit
        }
        result = fit_network(
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
