"""Arguments shared by the simulator's subcommands, and their checks.

Every function here turns bad input into a :class:`~decentsim.usage.UsageError` whose message
names the argument (``--population: …``, ``--lockdown 'x': …``), so each command reports it in
one line and exits 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from contract.schedule import observations_dp
from decentsim.usage import UsageError, nonnegative_int, positive_float
from protocols.secure_sum.dp import DPConfig, DPConfigError, NoiseHeadroomError
from sim.calibration import ObservedSeries, TargetFileError, load_target
from sim.model import Lockdown, ModelConfig, ModelConfigError, Vaccination
from sim.params import PARAM_NAMES, ParameterError, Theta
from sim.populations import Population, PopulationError, from_spec
from sim.runner import DTYPES
from sim.sampling import Estimator


def add_population_arguments(p: argparse.ArgumentParser) -> None:
    """``--population``, ``--seed``, ``--device``, ``--dtype``, the interventions and the
    estimator: the options ``simulate`` and ``calibrate`` share."""
    p.add_argument(
        "--population",
        default="synthetic:10000",
        help="synthetic:N, or a directory with agents.csv and contacts_*.csv",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every random draw")
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


def load_population(spec: str, seed: int) -> Population:
    """The population of ``--population SPEC`` (a bad spec or file names itself)."""
    try:
        return from_spec(spec, seed=seed)
    except PopulationError as e:
        raise UsageError(f"--population: {e}") from None


def parse_theta(text: str, base: Theta | None = None) -> Theta:
    """θ from ``--theta name=value,…`` on top of ``base``."""
    try:
        return Theta.parse(text, base)
    except ParameterError as e:
        message = str(e)  # a malformed item's message names --theta already
        raise UsageError(message if "--theta" in message else f"--theta: {message}") from None


def parse_fit(text: str) -> tuple[str, ...]:
    """The parameters ``--fit a,b`` names (at least one, each a known parameter)."""
    fit = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(fit) - set(PARAM_NAMES))
    if unknown or not fit:
        raise UsageError(f"--fit {text!r}: name one or more of {list(PARAM_NAMES)}")
    return fit


def parse_filters(items: Sequence[str]) -> dict[str, str]:
    """``--filter COLUMN=VALUE`` (repeatable) as a dict."""
    filters = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise UsageError(f"--filter {item!r}: expected COLUMN=VALUE")
        filters[column] = value
    return filters


def load_target_series(
    path: str | Path, column: str, filters: dict[str, str], period_days: int = 7
) -> ObservedSeries:
    """The observed series of ``--target`` (a missing file or a bad field names the file, line
    and field)."""
    try:
        return load_target(path, column, filters, period_days=period_days)
    except TargetFileError as e:
        raise UsageError(f"--target: {e}") from None


def check_device(device: str) -> None:
    """``--device cuda`` needs a CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")


def make_out_dir(flag: str, path: str | Path) -> Path:
    """Create the output directory ``path`` of ``flag`` before the run (not after it)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {str(out)!r}: cannot create it ({e.strerror})") from None
    return out


def _number(flag: str, text: str, name: str, raw: str, kind: type[int] | type[float]) -> float:
    """Field ``name`` of ``flag TEXT`` as ``kind``."""
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise UsageError(f"{flag} {text!r}: {name} {raw!r} is not {what}") from None


def _lockdown(text: str) -> Lockdown:
    parts = text.split(":")
    if len(parts) != 3:
        raise UsageError(f"--lockdown {text!r}: expected LAYER:DAY:SCALE")
    day = int(_number("--lockdown", text, "DAY", parts[1], int))
    scale = _number("--lockdown", text, "SCALE", parts[2], float)
    try:
        return Lockdown(parts[0], day, scale)
    except ModelConfigError as e:
        raise UsageError(f"--lockdown {text!r}: {e}") from None


def _vaccination(text: str) -> Vaccination:
    parts = text.split(":")
    if not 2 <= len(parts) <= 3:
        raise UsageError(f"--vaccinate {text!r}: expected DAY:FRACTION[:EFFICACY]")
    day = int(_number("--vaccinate", text, "DAY", parts[0], int))
    shares = [
        _number("--vaccinate", text, name, raw, float)
        for name, raw in zip(("FRACTION", "EFFICACY"), parts[1:], strict=False)
    ]
    try:
        return Vaccination(day, *shares)
    except ModelConfigError as e:
        raise UsageError(f"--vaccinate {text!r}: {e}") from None


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ``ModelConfig`` described by the shared arguments."""
    return ModelConfig(
        lockdowns=tuple(_lockdown(t) for t in args.lockdown),
        vaccinations=tuple(_vaccination(t) for t in args.vaccinate),
        estimator=Estimator(args.estimator),
        use_population_seeds=args.population_seeds,
    )


def check_config(config: ModelConfig, population: Population) -> None:
    """What ``config`` asks of ``population``, named by the argument that asked for it (the
    simulator checks the same, but cannot name the command line's option)."""
    layers = sorted(layer.name for layer in population.layers)
    for lock in config.lockdowns:
        if lock.layer not in layers:
            raise UsageError(
                f"--lockdown: population {population.name!r} has no layer {lock.layer!r}; "
                f"its layers: {layers}"
            )
    if config.use_population_seeds and population.initially_infected is None:
        raise UsageError(
            f"--population-seeds: population {population.name!r} has no initially_infected "
            "column (leave the option out to seed from init_frac)"
        )


#: the option of each differential-privacy field
DP_OPTIONS = {"sigma": "--dp-sigma", "delta": "--dp-delta", "l2_sensitivity": "--dp-sensitivity"}


def dp_config(sigma: float, delta: float, l2_sensitivity: float) -> DPConfig:
    """The DP settings of ``--dp-sigma``, ``--dp-delta`` and ``--dp-sensitivity`` (the daily
    aggregates' noise), checked against the aggregates codec."""
    try:
        return observations_dp(sigma, delta, l2_sensitivity)
    except DPConfigError as e:  # its field is sigma, delta or l2_sensitivity, or σ in ring units
        raise UsageError(f"{DP_OPTIONS.get(e.field, '--dp-sigma')}: {e}") from None
    except NoiseHeadroomError as e:  # more noise than the codec's headroom
        raise UsageError(f"--dp-sigma: {e}") from None


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    """``--dp-sigma``, ``--dp-delta``, ``--dp-sensitivity``: differential privacy of the daily
    aggregates (``federated run``; ``aggregator serve``, whose operator sets the same)."""
    p.add_argument(
        "--dp-sigma",
        type=positive_float,
        metavar="S",
        help="differential privacy: both servers add discrete Gaussian noise of total standard "
        "deviation S (real units) to every coordinate of each opened daily aggregate "
        "(values and tangents); off by default. The aggregator's operator sets the same "
        "values (A refuses rounds under other settings)",
    )
    p.add_argument(
        "--dp-delta", type=float, default=1e-6, help="δ in (0, 1) of the reported (ε, δ)"
    )
    p.add_argument(
        "--dp-sensitivity",
        type=positive_float,
        default=1.0,
        metavar="L2",
        help="L2 bound of one participant's whole observation vector (values and tangents), "
        "real units; see protocols/secure_sum/LEAKAGE.md",
    )
