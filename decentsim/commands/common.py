"""Arguments shared by the simulator's subcommands, and their checks.

Every function here turns bad input into a :class:`~decentsim.usage.UsageError` whose message
names the argument (``--population: …``, ``--lockdown 'x': …``), so each command reports it in
one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from behaviour import (
    BackendError,
    BackendUnreachable,
    CacheError,
    LLMSource,
    LocalLlamaClient,
    MalformedAnswer,
    NonCompliantEndpoint,
    OpenAIClient,
    TableSource,
)
from contract.schedule import observations_dp
from decentsim.usage import CommandFailed, UsageError, nonnegative_int, positive_float
from protocols.secure_sum.dp import DPConfig, DPConfigError, NoiseHeadroomError
from sim.archetypes import (
    MONTH_DAYS,
    ArchetypeError,
    ArchetypeGrid,
    population_cells,
)
from sim.calibration import ObservedSeries, TargetFileError, load_target
from sim.model import Lockdown, ModelConfig, ModelConfigError, Stimulus, Vaccination
from sim.params import BASE_PARAMS, PARAM_NAMES, ParameterError, Theta
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


def model_config(args: argparse.Namespace, grad: Sequence[str] = BASE_PARAMS) -> ModelConfig:
    """The ``ModelConfig`` described by the shared arguments and the behaviour arguments
    (:func:`add_behaviour_arguments`), differentiating ``grad``."""
    return ModelConfig(
        lockdowns=tuple(_lockdown(t) for t in args.lockdown),
        vaccinations=tuple(_vaccination(t) for t in args.vaccinate),
        estimator=Estimator(args.estimator),
        use_population_seeds=args.population_seeds,
        grad=tuple(grad),
        **behaviour_config(args),
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


# -- behaviour: how the agents decide ℓ (a heuristic, a table file, a language model) -------

#: ``--period`` → days per period of the behaviour table
PERIODS: dict[str, int] = {"week": 7, "month": MONTH_DAYS}
#: the contact layer a day off work removes, unless ``--work-layer`` names another
DEFAULT_WORK_LAYER: str = ModelConfig.work_layer
#: ``--llm-timeout`` and ``--llm-retries`` unless given
LLM_TIMEOUT_S = 60.0
LLM_RETRIES = 3
_BEHAVIOURS = "heuristic, table:PATH or llm"


def default_llm_cache() -> Path:
    """Where the language model's answers are cached unless ``--llm-cache`` says otherwise:
    ``$XDG_CACHE_HOME/decentsim/llm``, or ``~/.cache/decentsim/llm``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec ignores a relative XDG_CACHE_HOME.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "decentsim" / "llm"


def add_behaviour_arguments(p: argparse.ArgumentParser, period_option: str = "--period") -> None:
    """``--behaviour``, the ``--llm-*`` options (URL, model, timeout, retries, cache), the period
    option (``period_option``: ``calibrate`` has a ``--period`` of its own), ``--stimulus`` and
    ``--work-layer``: how agents decide whether to isolate and whether to work.

    Read them with :func:`behaviour_config` (the ``ModelConfig`` fields) and
    :func:`behaviour_source` (the table's source); run with :func:`behaviour_errors`.
    """
    p.add_argument(
        "--behaviour",
        default="heuristic",
        metavar="heuristic|table:PATH|llm",
        help="heuristic: three fixed archetypes (default); table:PATH: each agent draws whether "
        "to isolate and whether to work from its archetype cell's row of a behaviour table "
        "(CSV: period, <cell attributes…>, isolate, work; or a saved JSON table); llm: a "
        "language model fills that table, asked once per cell, behaviour and period",
    )
    p.add_argument(
        "--llm-url",
        metavar="URL",
        help="--behaviour llm: the base URL of an OpenAI-compatible API, e.g. "
        "http://127.0.0.1:8080/v1 (llama.cpp's server, vLLM, Ollama's /v1, a hosted API; "
        "an API key is read from OPENAI_API_KEY)",
    )
    p.add_argument("--llm-model", metavar="NAME", help="--behaviour llm: the model's name")
    p.add_argument(
        "--llm-gguf",
        metavar="PATH",
        help="--behaviour llm without a server: run this GGUF model file in process with "
        "llama.cpp (the optional extra decentsim[llm-local]); instead of --llm-url/--llm-model",
    )
    p.add_argument(
        "--llm-timeout",
        type=positive_float,
        metavar="SECONDS",
        help=f"--behaviour llm: seconds to wait for a connection and each answer (default "
        f"{LLM_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--llm-retries",
        type=nonnegative_int,
        metavar="N",
        help=f"--behaviour llm: further tries after a connection error, a timeout or HTTP "
        f"5xx/429, with exponential back-off (default {LLM_RETRIES})",
    )
    p.add_argument(
        "--llm-cache",
        metavar="DIR",
        help="--behaviour llm: the answer cache, keyed by model, prompt and sampling, so a "
        f"rerun makes no call (default {default_llm_cache()})",
    )
    p.add_argument(
        period_option,
        dest="behaviour_period",
        choices=tuple(PERIODS),
        help="a table or llm run: one table row per week (default) or month (30 days)",
    )
    p.add_argument(
        "--stimulus",
        action="append",
        default=[],
        metavar="MONTH:AMOUNT",
        help="--behaviour llm: a stimulus payment of AMOUNT dollars in MONTH (0: the run's "
        "first 30 days), told to the language model (repeatable; payments of one month add up)",
    )
    p.add_argument(
        "--work-layer",
        metavar="NAME",
        help="a table or llm run: the contact layer an agent who does not work stays off "
        f"(default {DEFAULT_WORK_LAYER!r}; a population without it: working has no contact "
        "effect)",
    )
    p.set_defaults(behaviour_period_option=period_option)


def _behaviour_kind(text: str) -> tuple[str, Path | None]:
    """``--behaviour TEXT`` as (``heuristic`` | ``table`` | ``llm``, the table's path)."""
    if text in ("heuristic", "llm"):
        return text, None
    kind, sep, path = text.partition(":")
    if kind == "table" and sep and path:
        return "table", Path(path)
    raise UsageError(f"--behaviour {text!r}: expected {_BEHAVIOURS}")


def _stimulus(text: str) -> Stimulus:
    parts = text.split(":")
    if len(parts) != 2:
        raise UsageError(f"--stimulus {text!r}: expected MONTH:AMOUNT")
    month = int(_number("--stimulus", text, "MONTH", parts[0], int))
    amount = _number("--stimulus", text, "AMOUNT", parts[1], float)
    try:
        return Stimulus(month, amount)
    except ModelConfigError as e:
        raise UsageError(f"--stimulus {text!r}: {e}") from None


def behaviour_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ModelConfig`` fields of :func:`add_behaviour_arguments`' arguments: ``behaviour``
    and, for a table or llm run, ``period_days``, ``work_layer`` and ``stimuli``.

    An option that would change nothing is refused rather than ignored: the ``--llm-*``
    options and ``--stimulus`` (which only a language model is told) without
    ``--behaviour llm``, the period and ``--work-layer`` with the heuristic.

    Raises:
        UsageError: names the option.
    """
    kind, _ = _behaviour_kind(args.behaviour)
    llm_options = {"--llm-url": args.llm_url, "--llm-model": args.llm_model}
    if kind == "llm" and args.llm_gguf is not None:
        for option, value in {
            **llm_options,
            "--llm-timeout": args.llm_timeout,
            "--llm-retries": args.llm_retries,
        }.items():
            if value is not None:
                raise UsageError(f"{option}: not with --llm-gguf (the model runs in process)")
    elif kind == "llm":
        missing = [option for option, value in llm_options.items() if not value]
        if missing:
            raise UsageError(
                f"--behaviour llm needs {' and '.join(missing)} (a server), or --llm-gguf"
            )
    else:
        for option, value in {
            **llm_options,
            "--llm-gguf": args.llm_gguf,
            "--llm-timeout": args.llm_timeout,
            "--llm-retries": args.llm_retries,
            "--llm-cache": args.llm_cache,
        }.items():
            if value is not None:
                raise UsageError(f"{option}: only with --behaviour llm")
        if args.stimulus:
            raise UsageError(
                "--stimulus: only with --behaviour llm (a stimulus payment is told to the "
                "language model; a table file's rows and the heuristic do not depend on it)"
            )
    if kind == "heuristic":
        for option, value in (
            (args.behaviour_period_option, args.behaviour_period),
            ("--work-layer", args.work_layer),
        ):
            if value is not None:
                raise UsageError(f"{option}: only with --behaviour table:PATH or llm")
        return {"behaviour": "heuristic"}
    return {
        "behaviour": "table",
        "period_days": PERIODS[args.behaviour_period or "week"],
        "work_layer": args.work_layer or DEFAULT_WORK_LAYER,
        "stimuli": tuple(_stimulus(t) for t in args.stimulus),
    }


def population_grid(population: Population) -> ArchetypeGrid:
    """The archetype grid of ``population``'s public attributes (a value that bins nowhere,
    e.g. a SOC code outside the major groups, names ``--population``)."""
    try:
        return population_cells(population)[0]
    except ArchetypeError as e:
        raise UsageError(f"--population: {e}") from None


def check_work_layer(args: argparse.Namespace, population: Population) -> None:
    """A ``--work-layer`` the user named must be a layer of ``population`` (the default
    ``work`` may be absent: then working has no contact effect)."""
    layers = sorted(layer.name for layer in population.layers)
    if args.work_layer is not None and args.work_layer not in layers:
        raise UsageError(
            f"--work-layer: population {population.name!r} has no layer {args.work_layer!r}; "
            f"its layers: {layers}"
        )


def check_stimuli(config: ModelConfig, days: int) -> None:
    """Every ``--stimulus`` month starts within the run's ``days``."""
    for s in config.stimuli:
        if s.month * MONTH_DAYS >= days:
            raise UsageError(
                f"--stimulus '{s.month}:{s.amount:g}': month {s.month} starts on day "
                f"{s.month * MONTH_DAYS}, after the run's {days} days"
            )


def behaviour_source(
    args: argparse.Namespace, grid: ArchetypeGrid
) -> TableSource | LLMSource | None:
    """The source of a table or llm run's behaviour table over ``grid`` (None for the
    heuristic): the table file, read and checked in full now, or the language model behind
    ``--llm-url`` with its answer cache (contacted during the run: see
    :func:`behaviour_errors`).

    Raises:
        UsageError: a missing or malformed table (its file, line and field), a table of
            another period, a bad ``--llm-url``, a ``--llm-cache`` that cannot be created.
    """
    kind, path = _behaviour_kind(args.behaviour)
    if kind == "heuristic":
        return None
    period_days = PERIODS[args.behaviour_period or "week"]
    if kind == "table":
        assert path is not None
        try:
            table = TableSource(path, grid, period_days)
        except ArchetypeError as e:
            raise UsageError(f"--behaviour: {e}") from None
        if table.table.period_days != period_days:
            raise UsageError(
                f"--behaviour: {path}: a table of {table.table.period_days}-day periods; "
                f"{args.behaviour_period_option} gives {period_days}-day periods"
            )
        return table
    cache = make_out_dir("--llm-cache", args.llm_cache or default_llm_cache())
    if args.llm_gguf is not None:
        try:
            return LLMSource(LocalLlamaClient(args.llm_gguf), cache)
        except BackendError as e:
            raise UsageError(f"--llm-gguf: {e}") from None
    try:
        client = OpenAIClient(
            args.llm_url,
            args.llm_model,
            timeout=args.llm_timeout or LLM_TIMEOUT_S,
            retries=LLM_RETRIES if args.llm_retries is None else args.llm_retries,
        )
    except ValueError as e:
        raise UsageError(f"--llm-url: {e}") from None
    return LLMSource(client, cache)


def describe_source(source: TableSource | LLMSource | None) -> dict[str, Any]:
    """What a run's results record of its behaviour source: where the rows come from
    (``heuristic``, ``table:PATH``, ``llm:MODEL@URL``), a table file's version, a language
    model's backend calls and cached answers so far."""
    if source is None:
        return {"source": "heuristic"}
    if isinstance(source, TableSource):
        return {"source": source.source, "table_version": source.table.version}
    return {
        "source": source.source,
        "backend_calls": source.calls,
        "cache_hits": source.cache_hits,
    }


@contextmanager
def behaviour_errors() -> Iterator[None]:
    """Report a behaviour source's failure during a run as the command line does: an endpoint
    that cannot be reached or does not speak the API, or a cache entry that is not one, is bad
    input (``UsageError`` naming ``--llm-url`` or ``--llm-cache``); an endpoint that fails
    after the retries (HTTP errors, timeouts) failed the run (``CommandFailed``). Each message
    is one line naming the URL or file."""
    try:
        yield
    except (BackendUnreachable, NonCompliantEndpoint, MalformedAnswer) as e:
        raise UsageError(f"--llm-url: {e}") from None
    except BackendError as e:
        raise CommandFailed(str(e)) from None
    except CacheError as e:
        raise UsageError(f"--llm-cache: {e}") from None
