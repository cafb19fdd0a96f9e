"""The ``decentsim`` command line.

Each subcommand lives beside the code it drives, as a module exposing
``add_arguments(parser)`` and ``run(args) -> int`` (or, for ``module:name``, the functions
``add_<name>_arguments`` and ``run_<name>``); this file only wires them together.
Benchmarks (``decentsim bench NAME``) expose ``add_arguments(parser)`` and
``run(args) -> dict`` and print that dict as one JSON line. Problems are one line on stderr
(:mod:`decentsim.usage`): bad input exits 2, a failed run exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from decentsim.usage import FAILED, USAGE, CommandFailed, Parser, UsageError, fail
from sim.allocator import keep_freed_memory

#: subcommand -> module path
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("decentsim.commands.simulate", "run the central simulator"),
    "calibrate": ("decentsim.commands.calibrate", "fit parameters to an observed series"),
    "coordinator": ("decentsim.commands.servers:coordinator", "the coordinator server process"),
    "aggregator": ("decentsim.commands.servers:aggregator", "the aggregator server process"),
    "device-agent": ("decentsim.commands.device_agent:agent", "a device (pool) process"),
    "federated": ("decentsim.commands.federated:federated", "a simulated federation"),
    "radio-hub": ("decentsim.commands.radio_hub", "virtual Bluetooth controllers for pilot tests"),
    "pilot": ("decentsim.commands.pilot", "a run with pilot devices: init, enrol, status"),
    "audit": ("decentsim.commands.audit", "audit a federated run's recorded views"),
}

#: bench name -> module path
BENCHES: dict[str, tuple[str, str]] = {
    "sim": ("bench.sim", "central simulator throughput"),
    "securesum": ("bench.securesum", "two-server slot sums"),
    "ble": ("bench.ble", "simulated radio + exposure scoring"),
    "federated": ("bench.federated", "federated run vs the central simulator"),
    "cohorts": ("bench.cohorts", "contacts behind each device-day total"),
    "floor": ("bench.floor", "the mailbox protocol's own cost of a day, part by part"),
    "pilot": ("bench.pilot", "a hybrid run of pilot processes over the radio hub"),
    "vs-secaggplus": ("bench.secaggplus", "two-server sum vs Flower's SecAgg+"),
    "behaviour": ("bench.behaviour", "behaviour-table overhead and backend calls"),
}


def _entry(module: str) -> tuple[object, str]:
    """(the module object, the attribute suffix) of a ``module[:name]`` entry."""
    path, _, name = module.partition(":")
    return importlib.import_module(path), name


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the module of the chosen subcommand is imported (start-up stays fast)."""
    parser = Parser(prog="decentsim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = [a for a in argv if not a.startswith("-")][:2]

    def add(
        subparsers: argparse._SubParsersAction,
        name: str,
        module: str,
        help_text: str,
        kind: str,
        selected: bool,
    ) -> None:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        if selected:
            mod, name = _entry(module)
            getattr(mod, f"add_{name}_arguments" if name else "add_arguments")(p)
        p.set_defaults(_module=module, _kind=kind)

    for name, (module, help_text) in COMMANDS.items():
        add(sub, name, module, help_text, "command", chosen[:1] == [name])
    bench = sub.add_parser("bench", help="benchmarks; each prints one JSON line")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHES.items():
        add(bench_sub, name, module, help_text, "bench", chosen == ["bench", name])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``decentsim ARGV``; returns the exit status (0, 1: the run failed, 2: bad input)."""
    # A privacy product sends no telemetry, whichever transport ends up imported.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    keep_freed_memory()  # reuse freed tensors' memory instead of page-faulting it back each day
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = build_parser(argv).parse_known_args(argv)
    module, name = _entry(args._module)
    run = getattr(module, f"run_{name}" if name else "run")
    # the words that chose what runs: `decentsim bench sim`, `decentsim coordinator tokens`
    chosen = (args.command, getattr(args, "bench", None) or getattr(args, "action", None))
    prog = " ".join(["decentsim", *(word for word in chosen if word)])
    if unknown:  # argparse would blame the top-level parser; name the command they were for
        return fail(prog, UsageError(f"unrecognized arguments: {' '.join(unknown)}"), USAGE)
    try:
        if args._kind == "bench":
            print(json.dumps(run(args)), flush=True)
            return 0
        return int(run(args))
    except UsageError as e:
        return fail(prog, e, USAGE)
    except CommandFailed as e:
        return fail(prog, e, FAILED)


if __name__ == "__main__":
    sys.exit(main())
