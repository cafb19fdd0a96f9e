"""``federated run`` as a function: one whole simulated federation, over gRPC or Flower."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from contract.runspec import RunSpec
from launcher.federation import Federation, write_outputs
from launcher.flower import simulate_federation


def federated_run(
    spec: RunSpec,
    out: Path,
    population_seed: int = 0,
    progress: bool = False,
    timeout_s: float = 3600.0,
    transport: str = "grpc",
    record_views: bool = False,
) -> dict[str, Any]:
    """Run a whole simulated federation; returns the summary (also written into ``out``).

    ``transport="grpc"``: every party is a process on loopback (TLS). ``"flower"``: the pools
    are virtual nodes of Flower's simulation engine driven by a ServerApp hosting the
    coordinator (``coordinator.flower_server``); the aggregator is a process either way.
    ``record_views``: both servers record sealed transcripts for ``decentsim audit``.
    """
    state = out / "state"
    if state.exists():
        shutil.rmtree(state)
    fed = Federation(state, spec, population_seed, record_views=record_views)
    start = time.perf_counter()
    try:
        if transport == "flower":
            simulate_federation(fed, progress=progress)
        else:
            fed.start()
            fed.wait(timeout_s=timeout_s, progress=progress)
        wall = time.perf_counter() - start
        results = fed.results()
    finally:
        fed.stop()
    return write_outputs(out, fed, results, wall)
