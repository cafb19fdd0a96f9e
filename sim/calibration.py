"""Calibration: fit θ so that the simulated aggregates match an observed series.

Mode 1 (``fit_params``): θ itself is optimised by a torch optimizer (Adam), in log space so it
stays positive, with gradients from the simulator (forward tangents by default).

Mode 2 (``fit_network``): a small calibration network (a GRU over the observed series) maps
features to θ, and is trained end to end: ``dL/dθ`` from the simulator is backpropagated into
the network's weights (``θ.backward(dL/dθ)``).

The loss compares the model's new infections, summed per observation period (7 days for a
weekly series), with the observed counts on a log1p scale — robust to the range from a handful
to hundreds of cases — scaled by a fixed ascertainment rate (the fraction of infections that
become reported cases).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sim.params import LOG_PARAMS, PARAM_BOUNDS, PARAM_NAMES, Theta
from sim.runner import CentralSimulator


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


def series_loss(
    target: ObservedSeries, ascertainment: float = 1.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A loss on the run's aggregates ``y`` (T, 2, G): mean squared log1p error per period."""

    def loss(y: torch.Tensor) -> torch.Tensor:
        n = len(target)
        daily = y[: target.days, 0].sum(-1)
        predicted = daily.reshape(n, target.period_days).sum(-1) * ascertainment
        obs = target.values.to(daily.dtype)
        return ((torch.log1p(predicted) - torch.log1p(obs)) ** 2).mean()

    return loss


@dataclass
class FitResult:
    """The fitted θ, the loss per epoch, the θ per epoch and the final run's daily series."""

    theta: Theta
    losses: list[float]
    thetas: list[dict[str, float]]
    fitted_daily: list[float] = field(default_factory=list)


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


def fit_params(
    sim: CentralSimulator,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    days: int,
    start: Theta,
    epochs: int = 50,
    lr: float = 0.05,
    fit: Sequence[str] = ("beta",),
    grad: str = "forward",
    progress: bool = False,
) -> FitResult:
    """Mode 1: Adam on log θ for the parameters named in ``fit`` (others stay at ``start``)."""
    _check_epochs(epochs)
    opt = ThetaOptimizer(start, fit, lr)
    losses: list[float] = []
    thetas: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc="calibrate", unit="epoch", disable=not progress)
    for _ in bar:
        theta = opt.theta()
        result = sim.run(theta, days, grad)
        loss, g = result.loss_and_grad(loss_fn)
        assert g is not None
        opt.step(g, result.grad_names)
        losses.append(loss)
        thetas.append(Theta.from_tensor(theta).to_dict())
        bar.set_postfix(loss=f"{loss:.4g}")
    return _best_epoch(sim, days, losses, thetas)


def _check_epochs(epochs: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")


def _best_epoch(
    sim: CentralSimulator, days: int, losses: list[float], thetas: list[dict[str, float]]
) -> FitResult:
    """The epoch with the lowest loss wins: the ABM's loss is not monotone along the path."""
    best = min(range(len(losses)), key=losses.__getitem__)
    final = Theta(**thetas[best])
    return FitResult(final, losses, thetas, sim.run(final, days).new_infections.tolist())


class CalibrationNet(torch.nn.Module):
    """Features (T, F) → θ: a GRU over the series, its last hidden state → bounded θ.

    Each fitted parameter is produced as ``exp(log lo + sigmoid(h) · (log hi − log lo))``
    within a per-parameter range, so θ is always valid.
    """

    def __init__(
        self, n_features: int, ranges: dict[str, tuple[float, float]], hidden: int = 16
    ) -> None:
        super().__init__()
        self.names = tuple(ranges)
        self.gru = torch.nn.GRU(n_features, hidden, batch_first=True, dtype=torch.float64)
        self.head = torch.nn.Linear(hidden, len(self.names), dtype=torch.float64)
        self.register_buffer(
            "log_lo",
            torch.log(torch.tensor([ranges[n][0] for n in self.names], dtype=torch.float64)),
        )
        self.register_buffer(
            "log_hi",
            torch.log(torch.tensor([ranges[n][1] for n in self.names], dtype=torch.float64)),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(features.unsqueeze(0))
        z = torch.sigmoid(self.head(h[-1, 0]))
        return torch.exp(self.log_lo + z * (self.log_hi - self.log_lo))


def series_features(target: ObservedSeries) -> torch.Tensor:
    """The network's input: log1p counts, standardised, and the period index in [0, 1]."""
    x = torch.log1p(target.values)
    x = (x - x.mean()) / (x.std() + 1e-9)
    t = torch.linspace(0, 1, len(target), dtype=torch.float64)
    return torch.stack([x, t], dim=-1)


def fit_network(
    sim: CentralSimulator,
    target: ObservedSeries,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    start: Theta,
    ranges: dict[str, tuple[float, float]],
    epochs: int = 50,
    lr: float = 0.02,
    grad: str = "forward",
    seed: int = 0,
    progress: bool = False,
) -> FitResult:
    """Mode 2: train a ``CalibrationNet`` end to end through the simulator."""
    _check_epochs(epochs)
    fit_mask(tuple(ranges))
    torch.manual_seed(seed)  # the network's own initialisation; the simulator has no global RNG
    net = CalibrationNet(2, ranges)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    features = series_features(target)
    index = [PARAM_NAMES.index(n) for n in net.names]
    losses: list[float] = []
    thetas: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc="calibrate (network)", unit="epoch", disable=not progress)
    for _ in bar:
        fitted = net(features)
        theta = start.as_tensor().clone()
        theta[index] = fitted.detach()
        result = sim.run(theta, target.days, grad)
        loss, g = result.loss_and_grad(loss_fn)
        assert g is not None
        opt.zero_grad()
        fitted.backward(full_grad(g, result.grad_names)[index])
        opt.step()
        losses.append(loss)
        thetas.append(Theta.from_tensor(theta).to_dict())
        bar.set_postfix(loss=f"{loss:.4g}")
    return _best_epoch(sim, target.days, losses, thetas)
