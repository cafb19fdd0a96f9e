"""``decentsim device-agent run``: one device-pool process (a phone is a pool of one)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from contract.runspec import RunSpecError
from contract.schedule import ScheduleError, parse_slice
from decentsim.usage import CommandFailed, UsageError, nonnegative_int
from device_agent.agent import AgentConfig, AgentError
from device_agent.agent import run_agent as run_pool
from sim.populations import PopulationError
from transport.grpc.channels import InsecureAddressError, warn_insecure


def pool_slice(text: str) -> tuple[int, int]:
    """An argparse type: ``I/P``, this pool's share of the agents."""
    try:
        return parse_slice(text)
    except ScheduleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    run.add_argument(
        "--population-seed", type=nonnegative_int, default=0, help="seed of synthetic:N"
    )
    run.add_argument(
        "--slice",
        type=pool_slice,
        default=(0, 1),
        metavar="I/P",
        help="this pool's share of the agents: the I-th of P (default 0/1)",
    )
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


def _read(flag: str, path: Path) -> bytes:
    """The contents of the file an option names."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {str(path)!r}: cannot read it ({e.strerror})") from None


def run_agent(args: argparse.Namespace) -> int:
    """Run the agent to the end of the run."""
    token = args.token
    if args.token_file is not None:
        try:
            token = _read("--token-file", args.token_file).decode("ascii").strip()
        except UnicodeDecodeError:
            raise UsageError(
                f"--token-file {str(args.token_file)!r}: not a token (tokens are ASCII text)"
            ) from None
    world = _read("--world-secret", args.world_secret) if args.world_secret is not None else None
    _read("--ca", args.ca)  # the agent reads it once enrolled; a wrong path is bad input now
    try:
        args.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(
            f"--state-dir {str(args.state_dir)!r}: cannot create it ({e.strerror})"
        ) from None
    logging.basicConfig(
        filename=args.state_dir / "agent.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.insecure:
        warn_insecure("device-agent")
    config = AgentConfig(
        coordinator=args.coordinator,
        state_dir=args.state_dir,
        ca_pem=args.ca,
        population=args.population,
        population_seed=args.population_seed,
        slice=args.slice,
        token=token,
        enrol_address=args.enrol,
        world_secret=world,
        insecure=args.insecure,
    )
    try:
        run_pool(config)
    except PopulationError as e:
        raise UsageError(f"--population: {e}") from None
    except InsecureAddressError as e:  # names the option (--coordinator, --enrol)
        raise UsageError(str(e)) from None
    # the enrolment, the coordinator or the run failed (each names why), or the pool's store
    except (AgentError, RunSpecError, ScheduleError, OSError) as e:
        raise CommandFailed(str(e)) from None
    return 0
