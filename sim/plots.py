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


def plot_run(result: RunResult, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write stages.png (agents per stage), daily.png (new infections/deaths) and by_age.png."""
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
    return paths


def plot_calibration(
    losses: Sequence[float],
    observed: torch.Tensor,
    fitted: Sequence[float],
    period_days: int,
    out_dir: str | Path,
    labels: Sequence[str] = (),
    ascertainment: float = 1.0,
) -> list[Path]:
    """Write loss.png (loss per epoch) and fit.png (observed vs fitted per period)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="calibration loss")
    ax.grid(alpha=0.3)
    loss_png = _save(fig, out / "loss.png")

    n = int(observed.numel())
    fitted_t = torch.tensor(list(fitted), dtype=torch.float64)[: n * period_days]
    per_period = fitted_t.reshape(n, period_days).sum(-1) * ascertainment
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(n)
    ax.plot(x, observed.numpy(), "o-", label="observed")
    ax.plot(x, per_period.numpy(), "s--", label="fitted model")
    if labels:
        step = max(1, n // 10)
        ax.set_xticks(list(x)[::step], list(labels)[::step], rotation=30, fontsize=8)
    ax.set(ylabel=f"cases per {period_days} days", title="observed vs fitted")
    ax.legend()
    ax.grid(alpha=0.3)
    return [loss_png, _save(fig, out / "fit.png")]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
