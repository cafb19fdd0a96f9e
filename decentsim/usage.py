"""How every ``decentsim`` command reports a problem: one line on stderr, never a traceback.

- Bad input — an argument, a file, a setting the user gave — is a :class:`UsageError`: the
  line names what is wrong (argument, file, line, field) and the exit status is 2, as for
  argparse's own usage errors (:class:`Parser`).
- A run that started and failed — a process died, the coordinator stopped the run — is a
  :class:`CommandFailed`: exit status 1.

Argument types (:func:`positive_int` …) reject bad counts while parsing, naming the argument.
The commands and the benchmarks (``bench/``, which sits above this package and is loaded by
name) share them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

#: exit status of bad input (argparse's own)
USAGE = 2
#: exit status of a run that failed
FAILED = 1


class UsageError(Exception):
    """Bad input; the message names it. The command exits with status 2."""


class CommandFailed(Exception):
    """The command ran and failed; the message says why. The command exits with status 1."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


#: an integer >= 1 (counts: days, pools, agents, epochs …)
positive_int = int_in(1)
#: an integer >= 0 (seeds, thresholds that 0 turns off)
nonnegative_int = int_in(0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (durations, rates, step sizes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number in ``[low, high]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}")
        return value

    return parse


def agent_ids(text: str) -> tuple[int, ...]:
    """An argparse type: distinct agent ids >= 0, comma-separated (``0,3,17``)."""
    try:
        ids = tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated agent ids, got {text!r}"
        ) from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"need distinct agent ids >= 0, got {text!r}")
    return ids


def fail(prog: str, error: BaseException, status: int) -> int:
    """Print ``PROG: MESSAGE`` on stderr; return ``status``."""
    sys.stderr.write(f"{prog}: {error}\n")
    return status
