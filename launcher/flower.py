"""Flower's simulation engine as a federation's transport (``federated run --transport flower``).

The aggregator is a real process, as in every federation; the coordinator runs in this process
as a Flower ``ServerApp`` (``coordinator.flower_server``); each pool is a virtual node of
Flower's simulation engine (Ray) running the device pool's ``ClientApp``
(``device_agent.flower_client``) with its store in ``fed.root/pool-<i>``, the same layout as
the gRPC transport's pools. Flower and Ray run with telemetry off (``transport.flower.env``).
"""

from __future__ import annotations

import logging
import os

from coordinator.flower_server import FlowerRunError, FlowerServerConfig, make_server_app
from device_agent.flower_client import Handler, make_client_app
from launcher.federation import Federation
from transport.flower.env import import_flwr, start_ray


def simulate_federation(
    fed: Federation, progress: bool = False, handler: Handler | None = None
) -> None:
    """Run ``fed``'s run with its pools as virtual nodes of Flower's simulation engine.

    The aggregator is a real process (as in every federation); the ServerApp, hosting the
    coordinator, runs in this process; each virtual node hosts pool ``partition-id`` with its
    store in ``fed.root/pool-<i>`` (the same layout as the gRPC transport's pools).
    ``handler`` replaces the nodes' message handler (tests: a failing node).
    """
    import_flwr()
    from flwr.simulation import run_simulation

    fed.prepare()
    fed.start_aggregator()
    spec = fed.spec
    config = FlowerServerConfig(
        fed.c_dir,
        spec,
        f"127.0.0.1:{fed.a_port}",
        fed.a_dir / "export",
        progress=progress,
        audit_key=fed.audit_key("coordinator") if fed.record_views else None,
    )
    defaults = {
        "state-dir": str(fed.root / "pool-{partition-id}"),
        "population": spec.population,
        "population-seed": str(fed.population_seed),
        "world-secret": str(fed.world_secret),
    }
    workers = max(1, min(spec.pools, os.cpu_count() or 1))
    start_ray(workers)
    run_simulation(
        server_app=make_server_app(config),
        client_app=make_client_app(defaults, handler),
        num_supernodes=spec.pools,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": workers, "num_gpus": 0, "logging_level": logging.ERROR},
        },
    )
    if not fed.finished():
        raise FlowerRunError(
            "the Flower simulation ended before the run finished; see the log above and "
            f"{fed.a_dir / 'stderr.log'}"
        )
