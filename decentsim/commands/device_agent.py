"""``decentsim device-agent run``: one device-pool process (a phone is a pool of one)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from contract.runspec import RunSpecError
from contract.schedule import ScheduleError, parse_slice
from device_agent.agent import AgentConfig, AgentError
from device_agent.agent import run_agent as run_pool
from sim.populations import PopulationError
from transport.grpc.channels import InsecureAddressError, warn_insecure


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    """``device-agent run``."""
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="enrol (first time), then follow the coordinator's rounds")
    run.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    run.add_argument("--ca", type=Path, required=True, help="the coordinator's CA certificate")
    run.add_argument("--state-dir", type=Path, required=True, help="the pool's private store")
    run.add_argument("--enrol", help="HOST:PORT of the coordinator's enrolment endpoint")
    run.add_argument("--token", help="single-use enrolment token (first start only)")
    run.add_argument("--token-file", type=Path, help="read the token from this file")
    run.add_argument(
        "--population", required=True, help="synthetic:N or a directory (this pool's data)"
    )
    run.add_argument("--population-seed", type=int, default=0, help="seed of synthetic:N")
    run.add_argument("--slice", default="0/1", help="I/P: this pool's share of the agents")
    run.add_argument(
        "--insecure",
        action="store_true",
        help="DEBUGGING ONLY: no TLS (the coordinator must run --insecure too)",
    )
    run.add_argument(
        "--world-secret",
        type=Path,
        help="file with the simulated world's beacon secret (simulated radio)",
    )


def run_agent(args: argparse.Namespace) -> int:
    """Run the agent to the end of the run."""
    token = args.token
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    world = args.world_secret.read_bytes() if args.world_secret is not None else None
    args.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    logging.basicConfig(
        filename=args.state_dir / "agent.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.insecure:
        warn_insecure("device-agent")
    try:
        config = AgentConfig(
            coordinator=args.coordinator,
            state_dir=args.state_dir,
            ca_pem=args.ca,
            population=args.population,
            population_seed=args.population_seed,
            slice=parse_slice(args.slice),
            token=token,
            enrol_address=args.enrol,
            world_secret=world,
            insecure=args.insecure,
        )
        run_pool(config)
    except (
        AgentError,
        RunSpecError,
        PopulationError,
        ScheduleError,
        InsecureAddressError,
        OSError,
    ) as e:
        raise SystemExit(f"decentsim device-agent: {e}") from None
    return 0
