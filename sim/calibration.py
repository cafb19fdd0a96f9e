"""Calibration: fit θ so that the simulated aggregates match an observed series.

Mode 1 (``fit_params``): θ itself is optimised by a torch optimizer (Adam), in log space for
the positive parameters and linearly for the alignment shifts (:class:`ThetaOptimizer`), with
gradients from the simulator (forward tangents by default).

Mode 2 (``fit_network``): a small calibration network (a GRU over the observed series) maps
features to θ, and is trained end to end: ``dL/dθ`` from the simulator is backpropagated into
the network's weights (``θ.backward(dL/dθ)``).

Both fit any parameters the simulator differentiates (``ModelConfig.grad``): the epidemic's,
and the behaviour table's alignment (``scale_<g>``, ``shift_<g>``), whose gradient reaches θ
through the straight-through draws of each agent's choices.

**Cases** (:func:`series_loss`): the model's new infections, summed per observation period (7
days for a weekly series), against the observed counts on a log1p scale — robust to the range
from a handful to hundreds of cases — scaled by a fixed ascertainment rate (the fraction of
infections that become reported cases).

**Employment** (:func:`employment_loss`): a monthly labour-force series (e.g. Queens County's
``employed``, about 1.1 million people) cannot be compared in level with a synthetic population
of a few thousand agents, nor with its notion of a labour force (agents with an occupation).
What both share is the *shape* of the series, so the loss compares month-on-month relative
changes, in percent: month ``m`` of the run is days ``30m … 30m+29`` (``MONTH_DAYS``), its
simulated employment ``E_m`` the mean over those days of the agents working (the ``employment``
observation), and the loss is the mean over ``m >= 1`` of
``(100 (E_m / E_{m-1} − 1) − 100 (O_m / O_{m-1} − 1))²`` for the observed series ``O`` whose
first month is the run's month 0. The same changes give the validation the seed talk shows: the
Pearson correlation between simulated and observed month-on-month change (:func:`pearson`).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sim.archetypes import MONTH_DAYS, BehaviourSource
from sim.params import LOG_PARAMS, PARAM_BOUNDS, PARAM_NAMES, Theta
from sim.runner import CentralSimulator, LossFn


class TargetFileError(ValueError):
    """The observed-series CSV is unusable; the message names file, line and field."""


@dataclass(frozen=True)
class ObservedSeries:
    """An observed count series: ``values`` per period of ``period_days`` days, with labels."""

    values: torch.Tensor
    period_days: int
    labels: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return int(self.values.numel())

    @property
    def days(self) -> int:
        return len(self) * self.period_days

    def head(self, periods: int) -> ObservedSeries:
        """The first ``periods`` periods."""
        return ObservedSeries(
            self.values[:periods], self.period_days, self.labels[:periods], self.source
        )


def load_target(
    path: str | Path,
    column: str = "cases_week",
    filters: dict[str, str] | None = None,
    label_column: str = "date",
    period_days: int = 7,
) -> ObservedSeries:
    """Read one column of a CSV as an observed series, after row filters (e.g. nta_id=QN0103).

    Rows repeating an earlier label with the same value are dropped (the NYC file repeats its
    first weeks); a repeated label with a different value, a missing column, or an empty,
    non-numeric or negative value is an error naming the file, line and field.
    """
    path = Path(path)
    filters = filters or {}
    try:
        fh = path.open(newline="")
    except OSError as e:
        raise TargetFileError(f"{path}: cannot open ({e.strerror})") from None
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for name in (column, label_column, *filters):
            if name not in header:
                raise TargetFileError(f"{path}:1: missing column {name!r} (have {header})")
        seen: dict[str, float] = {}
        for lineno, row in enumerate(reader, start=2):
            if any(row[k] != v for k, v in filters.items()):
                continue
            raw = (row[column] or "").strip()
            try:
                v = float(raw)
            except ValueError:
                raise TargetFileError(
                    f"{path}:{lineno}: field {column!r}: {raw!r} is not a number"
                ) from None
            if not math.isfinite(v) or v < 0:
                raise TargetFileError(
                    f"{path}:{lineno}: field {column!r}: {raw!r} must be a finite count >= 0"
                )
            label = row[label_column]
            if label in seen and seen[label] != v:
                raise TargetFileError(
                    f"{path}:{lineno}: field {column!r}: {label_column} {label!r} repeats with "
                    f"a different value ({seen[label]} vs {v})"
                )
            seen.setdefault(label, v)
    if not seen:
        raise TargetFileError(f"{path}: no rows match the filters {filters}")
    labels = sorted(seen)
    return ObservedSeries(
        torch.tensor([seen[k] for k in labels], dtype=torch.float64),
        period_days,
        tuple(labels),
        str(path),
    )


def series_loss(target: ObservedSeries, ascertainment: float = 1.0) -> LossFn:
    """A loss on the run's aggregates ``y`` (T, channels, G): mean squared log1p error of the
    new infections per period."""

    def loss(y: torch.Tensor) -> torch.Tensor:
        n = len(target)
        daily = y[: target.days, 0].sum(-1)
        predicted = daily.reshape(n, target.period_days).sum(-1) * ascertainment
        obs = target.values.to(daily.dtype)
        return ((torch.log1p(predicted) - torch.log1p(obs)) ** 2).mean()

    return loss


_MONTH_LABEL = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


@dataclass(frozen=True)
class EmploymentSeries:
    """An observed monthly employment series (``values`` per calendar month, labelled
    ``YYYY-MM``); its first month is the run's month 0 (days 0 … 29)."""

    values: torch.Tensor
    labels: tuple[str, ...]
    source: str = ""
    column: str = "employed"

    def __len__(self) -> int:
        return int(self.values.numel())

    @property
    def days(self) -> int:
        """Days of the run the series covers (``MONTH_DAYS`` per month)."""
        return len(self) * MONTH_DAYS

    def head(self, months: int) -> EmploymentSeries:
        """The first ``months`` months."""
        return EmploymentSeries(
            self.values[:months], self.labels[:months], self.source, self.column
        )

    def since(self, label: str) -> EmploymentSeries:
        """The series from month ``label`` (``YYYY-MM``) on.

        Raises:
            ValueError: the series has no such month; the message names its range.
        """
        if label not in self.labels:
            raise ValueError(
                f"no month {label} in {self.source} (it covers {self.labels[0]} to "
                f"{self.labels[-1]})"
            )
        i = self.labels.index(label)
        return EmploymentSeries(self.values[i:], self.labels[i:], self.source, self.column)

    def changes(self) -> torch.Tensor:
        """Month-on-month change in percent, (months − 1,) (:func:`month_on_month`)."""
        return month_on_month(self.values)


def load_employment(path: str | Path, column: str = "employed") -> EmploymentSeries:
    """A monthly labour-force CSV (``year, month, <column>``, e.g. the New York State
    Department of Labor's ``year, month, labor_force, employed, unemployed,
    unemployment_rate``) as an :class:`EmploymentSeries`.

    Rows must be consecutive calendar months in order, each once, with a count > 0.

    Raises:
        TargetFileError: names the file, line and field (a missing column, a value that is not
            a positive count, a month out of 1..12, a gap or a repeat).
    """
    path = Path(path)
    try:
        fh = path.open(newline="")
    except OSError as e:
        raise TargetFileError(f"{path}: cannot open ({e.strerror})") from None
    labels: list[str] = []
    values: list[float] = []
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for name in ("year", "month", column):
            if name not in header:
                raise TargetFileError(f"{path}:1: missing column {name!r} (have {header})")
        previous: tuple[int, int] | None = None
        for lineno, row in enumerate(reader, start=2):
            year, month = (_integer(path, lineno, row, name) for name in ("year", "month"))
            if not 1 <= month <= 12:
                raise TargetFileError(f"{path}:{lineno}: field 'month': {month} is not 1..12")
            if previous is not None:
                want = (previous[0] + previous[1] // 12, previous[1] % 12 + 1)
                if (year, month) != want:
                    raise TargetFileError(
                        f"{path}:{lineno}: field 'month': {year}-{month:02d} follows "
                        f"{previous[0]}-{previous[1]:02d}; the series must be consecutive months"
                    )
            previous = (year, month)
            raw = (row[column] or "").strip()
            try:
                v = float(raw)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and v > 0):
                raise TargetFileError(
                    f"{path}:{lineno}: field {column!r}: {raw!r} is not a count > 0"
                )
            labels.append(f"{year}-{month:02d}")
            values.append(v)
    if not values:
        raise TargetFileError(f"{path}: no rows")
    return EmploymentSeries(
        torch.tensor(values, dtype=torch.float64), tuple(labels), str(path), column
    )


def _integer(path: Path, lineno: int, row: dict[str, str], name: str) -> int:
    raw = (row[name] or "").strip()
    try:
        return int(raw)
    except ValueError:
        raise TargetFileError(
            f"{path}:{lineno}: field {name!r}: {raw!r} is not an integer"
        ) from None


def is_month_label(text: str) -> bool:
    """Whether ``text`` is a ``YYYY-MM`` month label."""
    return _MONTH_LABEL.fullmatch(text) is not None


def monthly_employment(daily: torch.Tensor, months: int) -> torch.Tensor:
    """(months,) mean daily employment of each month of ``MONTH_DAYS`` days, from the run's
    daily employment (T,) (T >= months × MONTH_DAYS)."""
    return daily[: months * MONTH_DAYS].reshape(months, MONTH_DAYS).mean(-1)


def month_on_month(monthly: torch.Tensor) -> torch.Tensor:
    """Relative change from each month to the next, in percent: ``100 (x_m / x_{m-1} − 1)``.

    A simulated month with fewer than one agent working on average counts as one, so a run
    without workers gives a finite (large) loss instead of a division by zero.
    """
    return 100.0 * (monthly[1:] / monthly[:-1].clamp_min(1.0) - 1.0)


def employment_loss(target: EmploymentSeries) -> LossFn:
    """A loss on the run's aggregates ``y`` (T, channels, G): the mean squared difference of
    simulated and observed month-on-month employment change, in percent points (see the
    module doc). The target needs two months at least."""
    if len(target) < 2:
        raise ValueError(f"an employment target needs 2 months at least, got {len(target)}")
    observed = target.changes()

    def loss(y: torch.Tensor) -> torch.Tensor:
        simulated = month_on_month(monthly_employment(y[:, 2].sum(-1), len(target)))
        return ((simulated - observed.to(simulated.dtype)) ** 2).mean()

    return loss


def weighted_loss(terms: Sequence[tuple[float, LossFn]]) -> LossFn:
    """``Σ weight × loss`` over ``terms``: one loss of several targets."""

    def loss(y: torch.Tensor) -> torch.Tensor:
        return sum((w * fn(y) for w, fn in terms), torch.zeros((), dtype=y.dtype))

    return loss


def pearson(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float | None:
    """The Pearson correlation of two equally long series; None where it is undefined (fewer
    than 3 points — two points always correlate ±1 — or a constant series)."""
    a = torch.as_tensor(x, dtype=torch.float64)
    b = torch.as_tensor(y, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"pearson needs two series of one length, got {a.shape} and {b.shape}")
    if a.numel() < 3:
        return None
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    return float((a * b).sum()) / norm if norm > 0 else None


@dataclass
class FitResult:
    """The fitted θ, the loss and θ per epoch, and daily series: the fitted θ's new infections
    and employment, and the employment of the first epoch's run (at the start θ)."""

    theta: Theta
    losses: list[float]
    thetas: list[dict[str, float]]
    fitted_daily: list[float] = field(default_factory=list)
    fitted_employment: list[float] = field(default_factory=list)
    start_employment: list[float] = field(default_factory=list)


def _clamp_theta(values: torch.Tensor) -> torch.Tensor:
    lo = torch.tensor([PARAM_BOUNDS[n][0] for n in PARAM_NAMES], dtype=values.dtype)
    hi = torch.tensor([PARAM_BOUNDS[n][1] for n in PARAM_NAMES], dtype=values.dtype)
    return torch.minimum(torch.maximum(values, lo + 1e-9), hi)


def full_grad(grad: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """A gradient over ``names`` as a (p,) vector in ``PARAM_NAMES`` order (0 elsewhere: the
    run did not differentiate those parameters)."""
    out = torch.zeros(len(PARAM_NAMES), dtype=torch.float64)
    out[[PARAM_NAMES.index(n) for n in names]] = grad.detach().to(torch.float64)
    return out


def fit_mask(fit: Sequence[str]) -> torch.Tensor:
    """1.0 for each parameter named in ``fit``, 0.0 for the others (``PARAM_NAMES`` order).

    Raises:
        ValueError: ``fit`` is empty or names an unknown parameter.
    """
    unknown = set(fit) - set(PARAM_NAMES)
    if unknown:
        raise ValueError(f"cannot fit unknown parameter(s) {sorted(unknown)}")
    if not fit:
        raise ValueError("name at least one parameter to fit")
    return torch.tensor([n in fit for n in PARAM_NAMES], dtype=torch.float64)


class ThetaOptimizer:
    """Adam on θ for the parameters named in ``fit``; the others stay exactly at ``start``.

    The one optimizer of every calibration: central (:func:`fit_params`) and federated (the
    coordinator steps θ between epochs and persists :meth:`state_dict`, so a restarted
    coordinator continues the same optimisation). Positive parameters (``LOG_PARAMS``: β,
    mortality, the initial fraction, the alignment scales) move in log space, which keeps them
    positive, so each must start > 0; the alignment shifts move linearly. Each step's θ is
    clamped into ``PARAM_BOUNDS``.
    """

    def __init__(self, start: Theta, fit: Sequence[str], lr: float) -> None:
        self.mask = fit_mask(fit)
        self.fixed = start.as_tensor()
        #: 1.0 where a parameter moves in log space
        self.log = torch.tensor([n in LOG_PARAMS for n in PARAM_NAMES], dtype=torch.float64)
        zero = [
            n
            for n, m, lg, v in zip(PARAM_NAMES, self.mask, self.log, self.fixed, strict=True)
            if m and lg and v <= 0
        ]
        if zero:
            raise ValueError(f"cannot fit {zero} from 0 (θ is fitted in log space)")
        # the optimizer's coordinates: log θ for positive parameters, θ itself for shifts
        self.log_theta = torch.where(
            self.log > 0, torch.log(self.fixed.clamp_min(1e-300)), self.fixed
        ).requires_grad_(True)
        self.adam = torch.optim.Adam([self.log_theta], lr=lr)

    def theta(self) -> torch.Tensor:
        """The current θ (p,): fitted parameters from the optimizer's coordinates (clamped),
        the others exact."""
        z = self.log_theta.detach()
        moved = _clamp_theta(torch.where(self.log > 0, torch.exp(z), z))
        return torch.where(self.mask > 0, moved, self.fixed)

    def step(self, grad: torch.Tensor, names: Sequence[str] = PARAM_NAMES) -> torch.Tensor:
        """One Adam step with ``dL/dθ`` over ``names`` (default: all of θ, in order) at
        :meth:`theta`; returns the new θ.

        Raises:
            ValueError: a fitted parameter has no gradient (it is not in ``names``).
        """
        missing = [n for n, m in zip(PARAM_NAMES, self.mask, strict=True) if m and n not in names]
        if missing:
            raise ValueError(f"no gradient for fitted parameter(s) {missing}")
        g = full_grad(grad, names)
        theta = self.theta()
        self.adam.zero_grad()
        # chain rule through θ = exp(log θ) for positive parameters (dθ/dlog θ = θ); parameters
        # not being fitted get no gradient
        self.log_theta.grad = g * torch.where(self.log > 0, theta, 1.0) * self.mask
        self.adam.step()
        return self.theta()

    def state_dict(self) -> dict[str, object]:
        """JSON-ready state: log θ and Adam's moments and step count."""
        state = self.adam.state.get(self.log_theta, {})
        return {
            "log_theta": self.log_theta.detach().tolist(),
            "step": float(state["step"]) if "step" in state else 0.0,
            "exp_avg": state["exp_avg"].tolist() if "exp_avg" in state else None,
            "exp_avg_sq": state["exp_avg_sq"].tolist() if "exp_avg_sq" in state else None,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        with torch.no_grad():
            self.log_theta.copy_(torch.tensor(state["log_theta"], dtype=torch.float64))
        if state.get("exp_avg") is not None:
            self.adam.state[self.log_theta] = {
                "step": torch.tensor(float(state["step"])),  # type: ignore[arg-type]
                "exp_avg": torch.tensor(state["exp_avg"], dtype=torch.float64),
                "exp_avg_sq": torch.tensor(state["exp_avg_sq"], dtype=torch.float64),
            }


def _check_differentiated(sim: CentralSimulator, fit: Sequence[str]) -> None:
    """Every fitted parameter must carry a gradient: be in ``sim.config.grad``."""
    fit_mask(fit)
    missing = [n for n in fit if n not in sim.config.grad]
    if missing:
        raise ValueError(
            f"cannot fit {missing}: the simulator differentiates only {list(sim.config.grad)} "
            "(add them to ModelConfig.grad)"
        )


def fit_params(
    sim: CentralSimulator,
    loss_fn: LossFn,
    days: int,
    start: Theta,
    epochs: int = 50,
    lr: float = 0.05,
    fit: Sequence[str] = ("beta",),
    grad: str = "forward",
    progress: bool = False,
    source: BehaviourSource | None = None,
) -> FitResult:
    """Mode 1: Adam on θ (:class:`ThetaOptimizer`) for the parameters named in ``fit`` (others
    stay at ``start``). ``source`` fills the behaviour table of a ``table`` run, every epoch
    from that epoch's own public numbers.

    Raises:
        ValueError: no epochs, or a fitted parameter the simulator does not differentiate.
    """
    _check_epochs(epochs)
    _check_differentiated(sim, fit)
    opt = ThetaOptimizer(start, fit, lr)
    losses: list[float] = []
    thetas: list[dict[str, float]] = []
    start_employment: list[float] = []
    bar = tqdm(range(epochs), desc="calibrate", unit="epoch", disable=not progress)
    for epoch in bar:
        theta = opt.theta()
        result = sim.run(theta, days, grad, source=source)
        loss, g = result.loss_and_grad(loss_fn)
        assert g is not None
        opt.step(g, result.grad_names)
        losses.append(loss)
        thetas.append(Theta.from_tensor(theta).to_dict())
        if epoch == 0:  # the run at the start θ
            start_employment = result.employment.tolist()
        bar.set_postfix(loss=f"{loss:.4g}")
    return _best_epoch(sim, days, losses, thetas, start_employment, source)


def _check_epochs(epochs: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")


def _best_epoch(
    sim: CentralSimulator,
    days: int,
    losses: list[float],
    thetas: list[dict[str, float]],
    start_employment: list[float],
    source: BehaviourSource | None,
) -> FitResult:
    """The epoch with the lowest loss wins: the ABM's loss is not monotone along the path."""
    best = min(range(len(losses)), key=losses.__getitem__)
    final = Theta(**thetas[best])
    run = sim.run(final, days, source=source)
    return FitResult(
        final,
        losses,
        thetas,
        run.new_infections.tolist(),
        run.employment.tolist(),
        start_employment,
    )


class CalibrationNet(torch.nn.Module):
    """Features (T, F) → θ: a GRU over the series, its last hidden state → bounded θ.

    Each fitted parameter is produced within its range ``(lo, hi)`` from ``z = sigmoid(h)``:
    ``exp(log lo + z (log hi − log lo))`` for a positive parameter (``LOG_PARAMS``), so θ is
    always valid, and ``lo + z (hi − lo)`` for an alignment shift.
    """

    def __init__(
        self, n_features: int, ranges: dict[str, tuple[float, float]], hidden: int = 16
    ) -> None:
        super().__init__()
        self.names = tuple(ranges)
        for name, (lo, hi) in ranges.items():
            if not lo < hi or (name in LOG_PARAMS and lo <= 0):
                raise ValueError(
                    f"range of {name!r} must be lo < hi (lo > 0 for a positive parameter), "
                    f"got {(lo, hi)}"
                )
        self.gru = torch.nn.GRU(n_features, hidden, batch_first=True, dtype=torch.float64)
        self.head = torch.nn.Linear(hidden, len(self.names), dtype=torch.float64)
        log = torch.tensor([n in LOG_PARAMS for n in self.names])
        lo = torch.tensor([ranges[n][0] for n in self.names], dtype=torch.float64)
        hi = torch.tensor([ranges[n][1] for n in self.names], dtype=torch.float64)
        # the network's coordinates: log θ for positive parameters, θ itself for shifts
        self.register_buffer("log", log)
        self.register_buffer("lo", torch.where(log, torch.log(lo.abs()), lo))
        self.register_buffer("hi", torch.where(log, torch.log(hi.abs()), hi))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(features.unsqueeze(0))
        z = torch.sigmoid(self.head(h[-1, 0]))
        c = self.lo + z * (self.hi - self.lo)
        return torch.where(self.log, torch.exp(c), c)


def _standardised(x: torch.Tensor) -> torch.Tensor:
    """``x`` with mean 0 and standard deviation 1 (a constant series: all 0), and the time
    index in [0, 1] beside it: (T, 2)."""
    x = (x - x.mean()) / (x.std() + 1e-9)
    t = torch.linspace(0, 1, x.numel(), dtype=torch.float64)
    return torch.stack([x, t], dim=-1)


def series_features(target: ObservedSeries) -> torch.Tensor:
    """The network's input from a case series: log1p counts, standardised, and the period
    index in [0, 1]."""
    return _standardised(torch.log1p(target.values))


def employment_features(target: EmploymentSeries) -> torch.Tensor:
    """The network's input from an employment series: the month-on-month change (0 for the
    first month), standardised, and the month index in [0, 1]."""
    return _standardised(torch.cat([target.values.new_zeros(1), target.changes()]))


def fit_network(
    sim: CentralSimulator,
    features: torch.Tensor,
    loss_fn: LossFn,
    days: int,
    start: Theta,
    ranges: dict[str, tuple[float, float]],
    epochs: int = 50,
    lr: float = 0.02,
    grad: str = "forward",
    seed: int = 0,
    progress: bool = False,
    source: BehaviourSource | None = None,
) -> FitResult:
    """Mode 2: train a ``CalibrationNet`` over ``features`` (T, 2) (:func:`series_features`,
    :func:`employment_features`) end to end through the simulator, runs of ``days`` days, for
    the parameters of ``ranges``; ``source`` as in :func:`fit_params`.

    Raises:
        ValueError: no epochs, a bad range, or a fitted parameter the simulator does not
            differentiate.
    """
    _check_epochs(epochs)
    _check_differentiated(sim, tuple(ranges))
    torch.manual_seed(seed)  # the network's own initialisation; the simulator has no global RNG
    net = CalibrationNet(features.shape[-1], ranges)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    index = [PARAM_NAMES.index(n) for n in net.names]
    losses: list[float] = []
    thetas: list[dict[str, float]] = []
    start_employment: list[float] = []
    bar = tqdm(range(epochs), desc="calibrate (network)", unit="epoch", disable=not progress)
    for epoch in bar:
        fitted = net(features)
        theta = start.as_tensor().clone()
        theta[index] = fitted.detach()
        result = sim.run(theta, days, grad, source=source)
        loss, g = result.loss_and_grad(loss_fn)
        assert g is not None
        opt.zero_grad()
        fitted.backward(full_grad(g, result.grad_names)[index])
        opt.step()
        losses.append(loss)
        thetas.append(Theta.from_tensor(theta).to_dict())
        if epoch == 0:  # the run at the start θ
            start_employment = result.employment.tolist()
        bar.set_postfix(loss=f"{loss:.4g}")
    return _best_epoch(sim, days, losses, thetas, start_employment, source)
