"""``decentsim calibrate``: fit θ to observed cases, employment or both; writes theta.json and
plots.

An employment target (``--target-employment``, a monthly labour-force CSV such as Queens
County's) is compared by its month-on-month relative change, not its level: a synthetic
population is not the county (see :mod:`sim.calibration`). Its first month (or
``--employment-from``) is the run's month 0, days 0–29; the report gives the Pearson
correlation between simulated and observed month-on-month change at the fitted θ.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from decentsim.commands.common import (
    add_behaviour_arguments,
    add_population_arguments,
    behaviour_errors,
    behaviour_source,
    check_config,
    check_device,
    check_stimuli,
    check_work_layer,
    describe_source,
    load_population,
    load_target_series,
    make_out_dir,
    model_config,
    parse_filters,
    parse_fit,
    parse_theta,
    population_grid,
)
from decentsim.usage import UsageError, positive_float, positive_int
from sim import models
from sim.archetypes import BehaviourSource, labour_force
from sim.calibration import (
    EmploymentSeries,
    FitResult,
    ObservedSeries,
    TargetFileError,
    employment_features,
    employment_loss,
    fit_network,
    fit_params,
    is_month_label,
    load_employment,
    month_on_month,
    monthly_employment,
    pearson,
    series_features,
    series_loss,
    weighted_loss,
)
from sim.model import ModelConfigError
from sim.params import ALIGNMENT_PARAMS, BASE_PARAMS, LOG_PARAMS, PARAM_BOUNDS, PARAM_NAMES, Theta
from sim.plots import plot_case_fit, plot_employment_fit, plot_loss
from sim.runner import DTYPES, CentralSimulator, LossFn

#: how the employment target is compared (theta.json says it beside the numbers)
EMPLOYMENT_MAPPING = (
    "month m of the run = days 30m..30m+29; simulated E_m = mean agents working per day; "
    "compared: month-on-month change 100 (E_m / E_{m-1} - 1) against the observed series'"
)
#: Mode 2 searches an alignment shift within this distance of its start value
SHIFT_SPAN = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``calibrate`` options."""
    add_population_arguments(p)
    add_behaviour_arguments(p, period_option="--behaviour-period")
    p.add_argument("--target", help="CSV with the observed case series")
    p.add_argument("--column", default="cases_week", help="column of counts in --target")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep rows of --target where COLUMN equals VALUE (repeatable)",
    )
    p.add_argument(
        "--period", type=positive_int, default=7, help="days per row of --target (7: weekly)"
    )
    p.add_argument(
        "--target-employment",
        metavar="CSV",
        help="monthly labour-force CSV (year, month, employed, …): fit the month-on-month "
        "change of employment, alone or with --target",
    )
    p.add_argument(
        "--employment-column",
        help="column of counts in --target-employment: employed (default), labor_force, …",
    )
    p.add_argument(
        "--employment-from",
        metavar="YYYY-MM",
        help="the month of --target-employment that is the run's month 0 (default: its first)",
    )
    p.add_argument(
        "--employment-weight",
        type=positive_float,
        help="with both targets: the weight of the employment loss (percent points squared) "
        "against the cases loss (log1p squared); default 1",
    )
    p.add_argument(
        "--days",
        type=positive_int,
        help="days to fit (the first days/period rows of --target, the first days/30 months "
        "of --target-employment); default: the whole series",
    )
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument(
        "--lr",
        type=positive_float,
        default=0.05,
        help="step size (Adam on log θ; on θ for alignment shifts)",
    )
    p.add_argument(
        "--mode",
        choices=("params", "network"),
        default="params",
        help="params: fit θ directly; network: train a GRU features→θ",
    )
    p.add_argument(
        "--fit",
        default="beta,init_frac",
        help="parameters to fit, comma-separated (with a behaviour table also its alignment: "
        "scale_<age group>, shift_<age group>)",
    )
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


def _load_employment(args: argparse.Namespace) -> EmploymentSeries:
    """``--target-employment`` from ``--employment-from``, cut to ``--days``."""
    if args.employment_from is not None and not is_month_label(args.employment_from):
        raise UsageError(f"--employment-from {args.employment_from!r}: expected YYYY-MM")
    try:
        series = load_employment(args.target_employment, args.employment_column or "employed")
    except TargetFileError as e:
        raise UsageError(f"--target-employment: {e}") from None
    if args.employment_from is not None:
        try:
            series = series.since(args.employment_from)
        except ValueError as e:
            raise UsageError(f"--employment-from: {e}") from None
    if args.days is not None:
        series = series.head(args.days // 30)
    if len(series) < 2:
        raise UsageError(
            f"--target-employment: {len(series)} month(s) after --employment-from and --days; "
            "a month-on-month change needs 2 at least (--days 60 or more)"
        )
    return series


def _ranges(start: Theta, fit: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Mode 2's search range of each fitted parameter: within a factor of 5 of its start value
    (a log-scale prior) for a positive parameter, within ``SHIFT_SPAN`` of it for a shift."""
    values = start.to_dict()
    out = {}
    for n in fit:
        lo, hi = PARAM_BOUNDS[n]
        v = values[n]
        if n in LOG_PARAMS:
            out[n] = (max(v / 5, lo + 1e-9), min(v * 5, hi))
        else:
            out[n] = (max(v - SHIFT_SPAN, lo), min(v + SHIFT_SPAN, hi))
    return out


def _fit(
    args: argparse.Namespace,
    sim: CentralSimulator,
    targets: tuple[ObservedSeries | None, EmploymentSeries | None],
    loss_fn: LossFn,
    days: int,
    start: Theta,
    fit: tuple[str, ...],
    source: BehaviourSource | None,
) -> FitResult:
    """Fit ``fit`` by ``--mode``: θ directly, or a GRU calibration network, which reads the
    case series of ``targets`` if there is one, else the employment series."""
    progress = sys.stderr.isatty()
    if args.mode == "params":
        return fit_params(
            sim,
            loss_fn,
            days,
            start,
            args.epochs,
            args.lr,
            fit,
            args.grad,
            progress=progress,
            source=source,
        )
    cases, employment = targets
    if cases is not None:
        features = series_features(cases)
    else:
        assert employment is not None  # one target at least, checked by run()
        features = employment_features(employment)
    return fit_network(
        sim,
        features,
        loss_fn,
        days,
        start,
        _ranges(start, fit),
        args.epochs,
        args.lr,
        args.grad,
        seed=args.seed,
        progress=progress,
        source=source,
    )


def _employment_report(
    target: EmploymentSeries, result: FitResult, args: argparse.Namespace
) -> dict[str, Any]:
    """The employment fit: observed and simulated month-on-month change, and their Pearson
    correlation at the fitted θ and at the start θ."""
    months = len(target)
    observed = target.changes()

    def simulated(daily: list[float]) -> torch.Tensor:
        return month_on_month(monthly_employment(torch.tensor(daily, dtype=torch.float64), months))

    fitted, start = simulated(result.fitted_employment), simulated(result.start_employment)
    return {
        "target": target.source,
        "column": target.column,
        "months": list(target.labels),
        "mapping": EMPLOYMENT_MAPPING,
        "weight": args.employment_weight or 1.0,
        "observed_change_pct": observed.tolist(),
        "simulated_change_pct": fitted.tolist(),
        "start_change_pct": start.tolist(),
        "pearson": pearson(fitted, observed),
        "pearson_start": pearson(start, observed),
    }


def run(args: argparse.Namespace) -> int:
    """Fit θ to ``--target`` and/or ``--target-employment``; write theta.json, loss.png and
    fit.png and/or employment_fit.png into ``--out``."""
    if args.target is None and args.target_employment is None:
        raise UsageError("--target or --target-employment: give one or both (cases, employment)")
    if args.employment_weight is not None and not (args.target and args.target_employment):
        raise UsageError("--employment-weight: only with both --target and --target-employment")
    if args.filter and not args.target:
        raise UsageError("--filter: only with --target (it selects the case series' rows)")
    for option, value in (
        ("--employment-from", args.employment_from),
        ("--employment-column", args.employment_column),
    ):
        if value is not None and not args.target_employment:
            raise UsageError(f"{option}: only with --target-employment")
    if args.ascertainment > 1:
        raise UsageError(f"--ascertainment must be in (0, 1], got {args.ascertainment}")
    if args.target and args.days is not None and args.days < args.period:
        raise UsageError(f"--days must be >= --period ({args.period}), got {args.days}")
    fit = parse_fit(args.fit)
    start = parse_theta(args.theta, models.epidemiology.theta)
    # θ is fitted in log space (params) or within a factor of 5 of its start (network)
    zero = [n for n in fit if n in LOG_PARAMS and start.to_dict()[n] <= 0]
    if zero:
        raise UsageError(f"--theta: the fitted parameter(s) {zero} need a positive start value")
    # Forward tangents for what is fitted, beside the epidemic's (in θ's order).
    grad = tuple(n for n in PARAM_NAMES if n in BASE_PARAMS or n in fit)
    config = model_config(args, grad=grad)
    alignment = [n for n in fit if n in ALIGNMENT_PARAMS]
    if alignment and config.behaviour != "table":
        raise UsageError(
            f"--fit: {alignment} align a behaviour table; they need --behaviour table:PATH or llm"
        )
    check_device(args.device)
    cases: ObservedSeries | None = None
    if args.target:
        cases = load_target_series(
            args.target, args.column, parse_filters(args.filter), args.period
        )
        if args.days is not None:
            cases = cases.head(args.days // args.period)
        if args.mode == "network" and len(cases) < 2:  # its features standardise the series
            raise UsageError(
                "--mode network needs at least 2 periods of --target (after --filter and "
                f"--days), got {len(cases)}"
            )
    employment = _load_employment(args) if args.target_employment else None
    days = max(series.days for series in (cases, employment) if series is not None)
    check_stimuli(config, days)
    pop = load_population(args.population, args.seed)
    check_config(config, pop)
    check_work_layer(args, pop)
    if employment is not None and not labour_force(pop).any():
        raise UsageError(
            f"--target-employment: population {pop.name!r} has no labour force (no agent with "
            "an occupation, or of working age) to employ"
        )
    source = behaviour_source(args, population_grid(pop))
    out = make_out_dir("--out", args.out)
    terms: list[tuple[float, LossFn]] = []
    if cases is not None:
        terms.append((1.0, series_loss(cases, args.ascertainment)))
    if employment is not None:
        terms.append((args.employment_weight or 1.0, employment_loss(employment)))
    try:
        sim = CentralSimulator(
            pop, config, seed=args.seed, device=args.device, dtype=DTYPES[args.dtype]
        )
        with behaviour_errors():
            result = _fit(
                args, sim, (cases, employment), weighted_loss(terms), days, start, fit, source
            )
    except ModelConfigError as e:  # exact sums' bit budget: the message names --dtype
        raise UsageError(str(e)) from None
    summary: dict[str, Any] = {
        "mode": args.mode,
        "population": pop.name,
        "agents": pop.n_agents,
        "target": cases.source if cases else None,
        "periods": len(cases) if cases else 0,
        "days": days,
        "behaviour": describe_source(source),
        "fit": list(fit),
        "theta": result.theta.to_dict(),
        "loss_first": result.losses[0],
        "loss_best": min(result.losses),
        "losses": result.losses,
        "thetas": result.thetas,
    }
    plot_loss(result.losses, out)
    plots = ["loss.png"]
    if cases is not None:
        plot_case_fit(
            cases.values,
            result.fitted_daily,
            cases.period_days,
            out,
            cases.labels,
            args.ascertainment,
        )
        plots.append("fit.png")
    if employment is not None:
        report = _employment_report(employment, result, args)
        summary["employment"] = report
        plot_employment_fit(
            employment.labels[1:],
            report["observed_change_pct"],
            report["simulated_change_pct"],
            report["start_change_pct"],
            report["pearson"],
            out,
        )
        plots.append("employment_fit.png")
    (out / "theta.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"fitted {', '.join(f'{k}={v:.4g}' for k, v in result.theta.to_dict().items())}; "
        f"loss {result.losses[0]:.4g} -> {min(result.losses):.4g}; wrote {out}/theta.json, "
        + ", ".join(plots)
    )
    if employment is not None:
        r, r0 = summary["employment"]["pearson"], summary["employment"]["pearson_start"]
        print(
            "employment: Pearson r between simulated and observed month-on-month change over "
            f"{len(employment) - 1} changes ({employment.labels[0]} to {employment.labels[-1]}) "
            f"= {_r(r)} (at the start θ: {_r(r0)})"
        )
    return 0


def _r(r: float | None) -> str:
    return "undefined" if r is None else f"{r:.3f}"
