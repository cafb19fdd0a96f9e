"""``decentsim federated run``: a simulated federation of real processes on this machine
(:mod:`launcher.federation`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from behaviour import OpenAIClient, TableSource
from contract.runspec import MODES, RunSpec, RunSpecError
from decentsim.commands.common import (
    LLM_RETRIES,
    LLM_TIMEOUT_S,
    add_behaviour_arguments,
    add_dp_arguments,
    behaviour_config,
    behaviour_source,
    check_stimuli,
    check_work_layer,
    dp_config,
    load_population,
    load_target_series,
    make_out_dir,
    parse_filters,
    parse_fit,
    parse_theta,
    population_grid,
)
from decentsim.usage import (
    CommandFailed,
    UsageError,
    nonnegative_int,
    positive_float,
    positive_int,
)
from launcher.federation import FederationError, make_spec
from launcher.run import federated_run
from sim.populations import Population


def add_federation_arguments(p: argparse.ArgumentParser, days: int, step_timeout_s: float) -> None:
    """What a simulated federation is made of (``federated run``, ``bench federated``)."""
    p.add_argument("--population", default="synthetic:2000")
    p.add_argument("--days", type=positive_int, default=days)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument(
        "--pools",
        type=positive_int,
        default=2,
        help="device-pool processes (at most one per agent)",
    )
    p.add_argument("--mode", default="mailbox", choices=MODES)
    p.add_argument("--radio", default="ideal", choices=("ideal", "simulated"))
    p.add_argument(
        "--step-timeout", type=positive_float, default=step_timeout_s, help="seconds per step"
    )


def federation_spec(
    args: argparse.Namespace, population: Population | None = None, **options: Any
) -> RunSpec:
    """The RunSpec of :func:`add_federation_arguments`' arguments and further fields
    (``population``: the loaded ``--population``, if the caller has it).

    Raises:
        UsageError: a bad argument; the message names it.
    """
    if population is None:
        population = load_population(args.population, args.seed)
    if args.pools > population.n_agents:
        raise UsageError(
            f"--pools {args.pools}: more pools than the population's {population.n_agents} "
            "agents (every pool needs an agent)"
        )
    try:
        return make_spec(
            args.population,
            args.days,
            population_seed=args.seed,
            pools=args.pools,
            radio=args.radio,
            loaded=population,
            seed=args.seed,
            mode=args.mode,
            step_timeout_s=args.step_timeout,
            **options,
        )
    except RunSpecError as e:  # the spec's own consistency checks (each names its field)
        raise UsageError(str(e)) from None


def add_federated_arguments(p: argparse.ArgumentParser) -> None:
    """``federated run``."""
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="coordinator + aggregator + P pools on loopback, TLS")
    add_federation_arguments(run, days=20, step_timeout_s=120.0)
    run.add_argument("--theta", default="", help="name=value,… (as simulate)")
    run.add_argument("--epochs", type=positive_int, default=1, help="calibration epochs (θ steps)")
    run.add_argument("--lr", type=positive_float, default=0.1, help="θ step size (Adam on log θ)")
    run.add_argument(
        "--fit", default="beta,init_frac", help="parameters the θ steps fit, comma-separated"
    )
    run.add_argument("--target", type=Path, help="observed weekly counts CSV (the loss)")
    run.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep only target rows with COLUMN=VALUE (repeatable), e.g. nta_id=QN0103",
    )
    run.add_argument("--target-column", default="cases_week")
    run.add_argument(
        "--min-cohort",
        type=nonnegative_int,
        default=0,
        metavar="K",
        help="both servers release a device-day's total (a slot group) of fewer than K "
        "summands as zeros",
    )
    run.add_argument(
        "--record-views",
        action="store_true",
        help="both servers record every message in a transcript sealed to their own auditor, "
        "for `decentsim audit` (as large as the traffic; off by default)",
    )
    add_dp_arguments(run)
    add_behaviour_arguments(run)
    run.add_argument(
        "--transport",
        default="grpc",
        choices=("grpc", "flower"),
        help="grpc: pools are device-agent processes; flower: virtual nodes of Flower's "
        "simulation engine (Ray) driven by a ServerApp",
    )
    run.add_argument("--out", type=Path, default=Path("out/federated"))
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def behaviour_fields(args: argparse.Namespace, population: Population) -> dict[str, Any]:
    """The run spec's behaviour fields of the ``--behaviour`` options (checked as ``simulate``
    checks them). The coordinator makes the table: it reads a table file itself (so the path
    is made absolute, and the file checked in full now) and caches a language model's answers
    in its own state dir (``OUT/state/coordinator/llm-cache``), which the audit reads — a run
    shares no cache with another, so ``--llm-cache`` is refused.

    Raises:
        UsageError: a bad option or table file; the message names it.
    """
    config = behaviour_config(args)
    if args.behaviour == "heuristic":
        return {}
    if args.llm_cache is not None:
        raise UsageError(
            "--llm-cache: a federation's coordinator caches the answers in its state dir "
            "(OUT/state/coordinator/llm-cache, which the audit checks), not in a shared cache"
        )
    check_work_layer(args, population)
    fields: dict[str, Any] = {
        "period_days": config["period_days"],
        "work_layer": config["work_layer"],
        "stimuli": tuple(f"{s.month}:{s.amount!r}" for s in config["stimuli"]),
    }
    if args.behaviour == "llm" and args.llm_gguf is not None:
        gguf = Path(args.llm_gguf).resolve()
        if not gguf.is_file():
            raise UsageError(f"--llm-gguf: {args.llm_gguf}: no such model file")
        return {**fields, "behaviour": "llm", "llm_gguf": str(gguf)}
    if args.behaviour == "llm":
        try:
            OpenAIClient(args.llm_url, args.llm_model)
        except ValueError as e:
            raise UsageError(f"--llm-url: {e}") from None
        return {
            **fields,
            "behaviour": "llm",
            "llm_url": args.llm_url,
            "llm_model": args.llm_model,
            "llm_timeout_s": args.llm_timeout or LLM_TIMEOUT_S,
            "llm_retries": LLM_RETRIES if args.llm_retries is None else args.llm_retries,
        }
    source = behaviour_source(args, population_grid(population))  # reads the whole file
    assert isinstance(source, TableSource)
    path = Path(args.behaviour.partition(":")[2]).resolve()
    return {**fields, "behaviour": "table", "behaviour_table": str(path)}


def run_spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of ``federated run`` arguments.

    Raises:
        UsageError: a bad argument or file; the message names it.
    """
    theta = parse_theta(args.theta)
    fit = parse_fit(args.fit)
    filters = parse_filters(args.filter)
    dp = None
    if args.dp_sigma is not None:
        dp_config(args.dp_sigma, args.dp_delta, args.dp_sensitivity)  # names a bad option
        dp = {"sigma": args.dp_sigma, "delta": args.dp_delta, "l2_sensitivity": args.dp_sensitivity}
    target = None
    if args.target is not None:
        series = load_target_series(args.target, args.target_column, filters)
        periods = min(len(series), args.days // series.period_days)
        if periods == 0:
            raise UsageError(
                f"--days {args.days}: shorter than one period ({series.period_days} days) of "
                f"--target {str(args.target)!r}"
            )
        target = series.values[:periods].tolist()
    population = load_population(args.population, args.seed)
    spec = federation_spec(
        args,
        population,
        **behaviour_fields(args, population),
        theta=theta.to_dict(),
        epochs=args.epochs,
        lr=args.lr,
        fit=fit,
        target=target,
        min_cohort=args.min_cohort,
        dp=dp,
    )
    check_stimuli(spec.model_config(), spec.days)
    return spec


def run_federated(args: argparse.Namespace) -> int:
    """Run ``federated run``."""
    spec = run_spec_from_args(args)
    make_out_dir("--out", args.out)
    try:
        summary = federated_run(
            spec,
            args.out,
            args.seed,
            progress=sys.stderr.isatty(),
            transport=args.transport,
            record_views=args.record_views,
        )
    except FederationError as e:
        raise CommandFailed(str(e)) from None
    if args.json:
        print(json.dumps(summary))
    else:
        inf = int(sum(summary["daily"]["new_infections"]))
        employed = ""
        if "behaviour" in summary:  # a table/llm run: who works is a choice
            work = summary["daily"]["employment"]
            employed = f", employment {min(work):,.0f}–{max(work):,.0f} a day"
        print(
            f"{summary['agents']:,} devices in {spec.pools} pools, {spec.days} days "
            f"({spec.mode}): {inf:,} infections{employed}, {summary['wall_s']:.1f} s; "
            f"results, plots and the servers' "
            f"{'views' if args.record_views else 'event logs'} in {args.out}"
        )
    return 0
