"""Counter-based randomness: every draw is a pure function of (seed, id, step, purpose).

There is no global generator. A device that simulates agent ``i`` alone draws exactly what the
central simulator draws for agent ``i``, so decentralized and central runs can agree bit for bit.

The construction is SplitMix64 used as an indexable stream: a 64-bit stream key is derived from
``(seed, step, purpose)`` in exact Python integer arithmetic, and the draw for counter ``id`` is
``mix64(key + (id + 1) * GOLDEN)`` computed element-wise on int64 tensors (wrap-around
multiplication, logical shifts emulated with masks). ``reference_uniform`` is the same function
in pure Python; ``tests/sim/vectors/rng.json`` pins both.

This module depends only on torch, so ``protocols`` may use it as a small shared utility.
"""

from __future__ import annotations

from enum import IntEnum

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


class Purpose(IntEnum):
    """Why a number is drawn. Distinct purposes give independent streams.

    Values below 100 belong to the simulator; ``protocols`` uses 100 and above.
    """

    INITIAL_INFECTION = 1
    INFECTION = 2
    DEATH = 3
    LATENT_DAYS = 4
    INFECTIOUS_DAYS = 5
    ISOLATION = 6
    VACCINATION = 7
    ARCHETYPE = 8
    #: the day's choices from a behaviour table (``sim.archetypes``)
    ISOLATE_CHOICE = 9
    WORK_CHOICE = 10


def _signed(x: int) -> int:
    """Two's-complement view of an unsigned 64-bit integer (torch int64 has no uint64 math)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64_py(x: int) -> int:
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _C1) & _MASK64
    x = ((x ^ (x >> 27)) * _C2) & _MASK64
    return x ^ (x >> 31)


def _purpose_key(seed: int, purpose: int) -> int:
    if seed < 0 or purpose < 0:
        raise ValueError(f"seed and purpose must be >= 0, got {seed}, {purpose}")
    k = _mix64_py(seed * _GOLDEN + 0x632BE59BD9B4E019)
    return _mix64_py(k ^ (purpose * 0xD1B54A32D192ED03))


def stream_key(seed: int, step: int, purpose: int) -> int:
    """The 64-bit key of the stream for one (seed, step, purpose), as an unsigned int."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return _mix64_py(_purpose_key(seed, purpose) + step * _GOLDEN)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _signed(_C1)
    x = (x ^ _shr(x, 27)) * _signed(_C2)
    return x ^ _shr(x, 31)


def bits(seed: int, ids: torch.Tensor, step: int | torch.Tensor, purpose: int) -> torch.Tensor:
    """64 random bits (as int64) per counter in ``ids`` for (seed, step, purpose).

    ``step`` is one int, or an int tensor broadcastable to ``ids`` (each counter its own step).
    """
    if isinstance(step, torch.Tensor):
        if bool((step < 0).any()):
            raise ValueError("step must be >= 0")
        base = _signed(_purpose_key(seed, purpose))
        key = _mix64(step.to(torch.int64) * _signed(_GOLDEN) + base)
    else:
        key = _signed(stream_key(seed, step, purpose))
    x = (ids.to(torch.int64) + 1) * _signed(_GOLDEN) + key
    return _mix64(x)


def uniform(
    seed: int,
    ids: torch.Tensor,
    step: int | torch.Tensor,
    purpose: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Uniform draws in [0, 1), one per counter in ``ids``.

    float64 draws use the top 53 bits, float32 the top 24, so every value is exactly
    representable and the same on CPU and GPU.
    """
    b = bits(seed, ids, step, purpose)
    if dtype == torch.float64:
        return _shr(b, 11).to(torch.float64) * 2.0**-53
    if dtype == torch.float32:
        return _shr(b, 40).to(torch.float32) * 2.0**-24
    raise ValueError(f"uniform: dtype must be float32 or float64, got {dtype}")


def reference_uniform(seed: int, counter: int, step: int, purpose: int) -> float:
    """Pure-Python float64 draw, the specification that ``uniform`` must reproduce."""
    x = _mix64_py(stream_key(seed, step, purpose) + (counter + 1) * _GOLDEN)
    return (x >> 11) * 2.0**-53
