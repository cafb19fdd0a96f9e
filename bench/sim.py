"""``decentsim bench sim``: interactions per second of the central simulator, per gradient mode.

An interaction is one edge message per step. The graph is ``populations.random_contacts``
(every agent hears exactly K contacts).
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

import torch

from decentsim.usage import UsageError, int_in, positive_int
from sim import populations
from sim.model import ModelConfigError
from sim.params import Theta
from sim.runner import DTYPES, CentralSimulator

#: gradient mode -> the name of its result field
MODES = {"none": "forward", "forward": "tangent", "reverse": "reverse"}


def modes(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated gradient modes, each one of :data:`MODES`."""
    names = tuple(m.strip() for m in text.split(","))
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {unknown} in {text!r}: expected a comma-separated subset of "
            f"{list(MODES)}"
        )
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bench sim``."""
    # at least two agents: an agent's contacts are other agents
    p.add_argument("--agents", type=int_in(2), default=1_000_000)
    p.add_argument("--degree", type=positive_int, default=10, help="contacts each agent hears")
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument(
        "--modes",
        type=modes,
        default=tuple(MODES),
        help="which modes to time, comma-separated: none, forward, reverse (reverse stores "
        "every step: the largest memory)",
    )


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time each mode; return the JSON-line fields."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    device = torch.device(args.device)
    pop = populations.random_contacts(args.agents, args.degree, seed=0, weight=0.05)
    theta = Theta(beta=0.3, mortality=0.01, init_frac=0.001)
    try:
        sim = CentralSimulator(pop, seed=1, device=device, dtype=DTYPES[args.dtype])
        sim.run(theta, 2)  # warm-up: allocator, kernels
    except ModelConfigError as e:  # float64's exact sums' bit budget: the message names --dtype
        raise UsageError(str(e)) from None
    edges = pop.n_edges
    out: dict[str, Any] = {
        "agents": args.agents,
        "edges": edges,
        "steps": args.steps,
        "device": str(device),
        "dtype": args.dtype,
    }
    peaks = {}
    for mode in args.modes:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = sim.run(theta, args.steps, mode)
        if mode == "reverse":
            result.loss_and_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        key = MODES[mode]
        out[f"interactions_per_s_{key}"] = round(edges * args.steps / dt)
        peaks[key] = round(_peak_mb(device), 1)
        del result
    out["peak_mem_mb"] = max(peaks.values())
    out["peak_mem_mb_after"] = peaks
    return out
