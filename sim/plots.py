"""Plots (PNG) of a run and of a calibration, made from their own data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt
import torch

from sim import dual
from sim.model import STAGES
from sim.populations import AGE_GROUPS
from sim.runner import RunResult

_STAGE_NAMES = {
    "S": "susceptible",
    "E": "exposed",
    "I": "infectious",
    "R": "recovered",
    "D": "dead",
}


def plot_run(
    result: RunResult, out_dir: str | Path, title: str = "", labour_force: int | None = None
) -> list[Path]:
    """Write stages.png (agents per stage), daily.png (new infections/deaths), by_age.png and
    employment.png (agents working each day; as a share of ``labour_force`` too, when given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    counts = result.stage_counts.numpy()
    for k, s in enumerate(STAGES):
        ax.plot(range(result.days + 1), counts[:, k], label=_STAGE_NAMES[s])
    ax.set(xlabel="day", ylabel="agents", title=title or f"{result.agents:,} agents by stage")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "stages.png"))

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    days = range(1, result.days + 1)
    a1.bar(days, result.new_infections.numpy(), color="tab:orange")
    a1.set(ylabel="new infections", title=title or "daily observations")
    a2.bar(days, result.new_deaths.numpy(), color="tab:gray")
    a2.set(xlabel="day", ylabel="new deaths")
    paths.append(_save(fig, out / "daily.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    by_age = dual.value(result.y)[:, 0].detach().numpy()  # (T, G)
    ax.stackplot(days, by_age.T, labels=AGE_GROUPS)
    ax.set(xlabel="day", ylabel="new infections", title="new infections by age group")
    ax.legend(loc="upper right", fontsize=8)
    paths.append(_save(fig, out / "by_age.png"))
    paths.append(plot_employment(result, out / "employment.png", title, labour_force))
    return paths


def plot_employment(
    result: RunResult, path: Path, title: str = "", labour_force: int | None = None
) -> Path:
    """employment.png: agents working each day (with the share of the labour force on a second
    axis) and working agents by age group."""
    days = range(1, result.days + 1)
    employed = result.employment.numpy()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    a1.plot(days, employed, color="tab:blue")
    a1.set(ylabel="agents working", title=title or "employment")
    a1.grid(alpha=0.3)
    if labour_force:
        share = a1.secondary_yaxis(
            "right", functions=(lambda x: 100 * x / labour_force, lambda p: p * labour_force / 100)
        )
        share.set_ylabel("% of labour force")
    by_age = dual.value(result.y)[:, 2].detach().numpy()  # (T, G)
    a2.stackplot(days, by_age.T, labels=AGE_GROUPS)
    a2.set(xlabel="day", ylabel="agents working", title="working agents by age group")
    a2.legend(loc="lower left", fontsize=8, ncol=3)
    return _save(fig, path)


def plot_loss(losses: Sequence[float], out_dir: str | Path) -> Path:
    """loss.png: the calibration loss per epoch."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="calibration loss")
    ax.grid(alpha=0.3)
    return _save(fig, out / "loss.png")


def plot_case_fit(
    observed: torch.Tensor,
    fitted: Sequence[float],
    period_days: int,
    out_dir: str | Path,
    labels: Sequence[str] = (),
    ascertainment: float = 1.0,
) -> Path:
    """fit.png: observed cases vs the fitted model's per period."""
    n = int(observed.numel())
    fitted_t = torch.tensor(list(fitted), dtype=torch.float64)[: n * period_days]
    per_period = fitted_t.reshape(n, period_days).sum(-1) * ascertainment
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(n)
    ax.plot(x, observed.numpy(), "o-", label="observed")
    ax.plot(x, per_period.numpy(), "s--", label="fitted model")
    _month_ticks(ax, labels)
    ax.set(ylabel=f"cases per {period_days} days", title="observed vs fitted")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(out_dir) / "fit.png")


def plot_employment_fit(
    labels: Sequence[str],
    observed: Sequence[float],
    fitted: Sequence[float],
    start: Sequence[float],
    correlation: float | None,
    out_dir: str | Path,
) -> Path:
    """employment_fit.png: month-on-month employment change (%), observed vs the fitted model
    (and the start θ's), labelled by the month changed to; the title gives the Pearson
    correlation of observed and fitted."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(observed))
    ax.axhline(0, color="black", linewidth=0.5)
    ax.plot(x, list(observed), "o-", label="observed")
    ax.plot(x, list(start), ":", color="tab:gray", label="model at the start θ")
    ax.plot(x, list(fitted), "s--", label="fitted model")
    _month_ticks(ax, labels)
    r = "undefined" if correlation is None else f"{correlation:.3f}"
    ax.set(
        ylabel="employment change from the month before (%)",
        title=f"month-on-month employment change: Pearson r = {r}",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(out_dir) / "employment_fit.png")


def _month_ticks(ax: plt.Axes, labels: Sequence[str]) -> None:
    """At most ten labelled ticks along x."""
    if labels:
        step = max(1, len(labels) // 10)
        ax.set_xticks(range(len(labels))[::step], list(labels)[::step], rotation=30, fontsize=8)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
