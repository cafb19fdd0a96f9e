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

from sim import populations
from sim.params import Theta
from sim.runner import DTYPES, CentralSimulator


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", type=int, default=1_000_000)
    p.add_argument("--degree", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument(
        "--modes",
        default="none,forward,reverse",
        help="which modes to time (reverse stores every step: the largest memory)",
    )


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    pop = populations.random_contacts(args.agents, args.degree, seed=0, weight=0.05)
    sim = CentralSimulator(pop, seed=1, device=device, dtype=DTYPES[args.dtype])
    theta = Theta(beta=0.3, mortality=0.01, init_frac=0.001)
    sim.run(theta, 2)  # warm-up: allocator, kernels
    edges = pop.n_edges
    out: dict[str, Any] = {
        "agents": args.agents,
        "edges": edges,
        "steps": args.steps,
        "device": str(device),
        "dtype": args.dtype,
    }
    peaks = {}
    for mode in args.modes.split(","):
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
        key = {"none": "forward", "forward": "tangent", "reverse": "reverse"}[mode]
        out[f"interactions_per_s_{key}"] = round(edges * args.steps / dt)
        peaks[key] = round(_peak_mb(device), 1)
        del result
    out["peak_mem_mb"] = max(peaks.values())
    out["peak_mem_mb_after"] = peaks
    return out
