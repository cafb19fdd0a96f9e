"""Dual numbers as plain tensors: ``d[..., 0]`` is the value, ``d[..., 1:]`` its tangent d/dθ.

Forward mode carries p tangents per quantity (last dimension 1 + p). Reverse mode (autograd) and
plain runs use the same code with last dimension 1 (no tangents). Linear operations — the
``message`` and the aggregate ``⊕`` — act on every column alike, so the same function serves the
value and the tangents; only the nonlinear pieces of ``update`` need the product/chain rules
below.
"""

from __future__ import annotations

import torch


def value(d: torch.Tensor) -> torch.Tensor:
    """The value part of a dual tensor."""
    return d[..., 0]


def tangent(d: torch.Tensor) -> torch.Tensor:
    """The tangent part (shape ``(..., p)``; p = 0 when no tangents are carried)."""
    return d[..., 1:]


def constant(v: torch.Tensor, width: int) -> torch.Tensor:
    """A dual with value ``v`` and zero tangents; ``width`` = 1 + p."""
    out = v.new_zeros((*v.shape, width))
    out[..., 0] = v
    return out


def make(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Assemble a dual from a value ``(...)`` and a tangent ``(..., p)``."""
    return torch.cat([v.unsqueeze(-1), t], dim=-1)


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product rule: (a·b)' = a'·b + a·b'."""
    av, bv = a[..., :1], b[..., :1]
    return torch.cat([av * bv, av * b[..., 1:] + bv * a[..., 1:]], dim=-1)


def scale(a: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """Multiply a dual by a constant (no tangent) ``s`` broadcast over the dual axis."""
    if isinstance(s, torch.Tensor):
        s = s.unsqueeze(-1)
    return a * s


def one_minus_exp_neg(a: torch.Tensor) -> torch.Tensor:
    """p = 1 − exp(−a), with p' = exp(−a)·a'. Used for infection probabilities."""
    e = torch.exp(-a[..., :1])
    return torch.cat([1.0 - e, e * a[..., 1:]], dim=-1)


def scale_dual(a: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a · c · s`` for a dual ``a``, a dual ``s`` and a constant ``c``, with the value
    computed as ``a · (c · s)`` — exactly :func:`scale`'s arithmetic when ``s`` has no tangent —
    and the tangent by the product rule."""
    cs = c * s[..., 0]
    out = scale(a, cs)
    return torch.cat([out[..., :1], out[..., 1:] + (a[..., :1] * c.unsqueeze(-1)) * s[..., 1:]], -1)
