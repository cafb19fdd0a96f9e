"""How every ``decentsim`` command reports a problem: one line on stderr, never a traceback.

- Bad input — an argument, a file, a setting the user gave — is a :class:`UsageError`: the
  line names what is wrong (argument, file, line, field) and the exit status is 2, as for
  argparse's own usage errors (:class:`Parser`).
- A run that started and failed — a process died, the coordinator stopped the run — is a
  :class:`CommandFailed`: exit status 1.

Argument types (:func:`positive_int` …) reject bad counts while parsing, naming the argument.
"""

from __future__ import annotations

import argparse
import sys
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


def _number(kind: type, least: float, strict: bool):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value != value or (value <= least if strict else value < least):  # NaN, or too small
            bound = f"> {least:g}" if strict else f">= {least:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


#: an int >= 1 (counts: days, pools, agents, epochs …)
positive_int = _number(int, 0, strict=True)
#: an int >= 0
nonnegative_int = _number(int, 0, strict=False)
#: a float > 0 (durations, rates, step sizes)
positive_float = _number(float, 0.0, strict=True)


def fail(prog: str, error: BaseException, status: int) -> int:
    """Print ``PROG: MESSAGE`` on stderr; return ``status``."""
    sys.stderr.write(f"{prog}: {error}\n")
    return status
