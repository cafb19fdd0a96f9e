"""The run clock's options, shared by every process of a run that reads protocol time.

Every process of one run must agree on the clock: with ``--clock-scale`` other than 1 the two
epochs are required, so two processes never start their own day at their own start-up time.
"""

from __future__ import annotations

import argparse

from decentsim.usage import UsageError, positive_float
from protocols.clock import ClockError, RunClock


def add_clock_arguments(p: argparse.ArgumentParser) -> None:
    """``--clock-scale``, ``--sim-epoch``, ``--wall-epoch``."""
    p.add_argument(
        "--clock-scale",
        type=positive_float,
        default=1.0,
        help="protocol seconds per wall second (1: a pilot in real time; 1440: a day a minute)",
    )
    p.add_argument(
        "--sim-epoch",
        type=float,
        help="protocol time (unix seconds) at --wall-epoch (needed with --clock-scale != 1)",
    )
    p.add_argument(
        "--wall-epoch",
        type=float,
        help="the wall time (unix seconds) protocol time starts from (with --sim-epoch)",
    )


def clock_from_args(args: argparse.Namespace) -> RunClock:
    """The run clock the options describe."""
    if (args.sim_epoch is None) != (args.wall_epoch is None):
        raise UsageError("--sim-epoch and --wall-epoch go together")
    if args.sim_epoch is None:
        if args.clock_scale != 1.0:
            raise UsageError(
                "--clock-scale other than 1 needs --sim-epoch and --wall-epoch "
                "(every process of the run must share them)"
            )
        return RunClock()
    try:
        return RunClock(
            sim_epoch=args.sim_epoch, scale=args.clock_scale, wall_epoch=args.wall_epoch
        )
    except ClockError as e:
        raise UsageError(str(e)) from None
