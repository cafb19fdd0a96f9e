"""Differentiable sampling of discrete events.

A Bernoulli event with probability p (a dual; see ``sim.dual``) and a uniform draw u becomes:

- ``straight-through`` (default): value = 1[u < p]; derivative taken as dp. In reverse mode
  this is ``hard + p − p.detach()``; in forward mode the tangent is p's tangent.
- ``gumbel``: the binary Gumbel-softmax (concrete) relaxation with temperature τ, using the
  logistic noise ``log(1−u) − log u`` from the same u, so the hard event is identical:
  value = 1[u < p]; derivative that of ``sigmoid((logit p + noise)/τ)``.

Both modes use the same uniform u, so the forward values never depend on the estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-6


@dataclass(frozen=True)
class Estimator:
    """Which gradient estimator discrete events use: ``"st"`` or ``"gumbel"`` (with ``tau``)."""

    kind: str = "st"
    tau: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("st", "gumbel"):
            raise ValueError(f"estimator must be 'st' or 'gumbel', got {self.kind!r}")
        if not self.tau > 0:
            raise ValueError(f"gumbel temperature tau must be > 0, got {self.tau}")


def bernoulli(p: torch.Tensor, u: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """Sample events 1[u < p] as a dual with the estimator's derivative.

    ``p``: dual (..., 1+p) of probabilities; ``u``: uniform draws (...).
    """
    pv = p[..., 0]
    hard = (u < pv.detach()).to(pv.dtype)
    if estimator.kind == "st":
        slope = torch.ones_like(pv)
        soft = pv
    else:
        pc = pv.clamp(_EPS, 1 - _EPS)
        uc = u.clamp(_EPS, 1 - _EPS)
        soft = torch.sigmoid(
            (torch.log(pc) - torch.log1p(-pc) + torch.log1p(-uc) - torch.log(uc)) / estimator.tau
        )
        # d soft / d p, with the clamp's zero derivative outside [eps, 1 − eps].
        inside = ((pv > _EPS) & (pv < 1 - _EPS)).to(pv.dtype)
        slope = soft * (1 - soft) / (estimator.tau * pc * (1 - pc)) * inside
    # Reverse mode: the value stays hard, the gradient is that of `soft`.
    v = hard + (soft - soft.detach())
    return torch.cat([v.unsqueeze(-1), slope.detach().unsqueeze(-1) * p[..., 1:]], dim=-1)
