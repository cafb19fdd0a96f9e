"""Running ``decentsim`` in the tests: in this process (fast) or as a real process (end to end).

Both give a :class:`Outcome`: the exit status, stdout and stderr.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from decentsim.cli import main

#: the project root: where a real ``decentsim`` process runs
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    """What one ``decentsim`` invocation did."""

    status: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one line on stderr; fails the test unless stderr is exactly one line of text
        and no traceback."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert "Traceback" not in self.err, self.err
        assert len(lines) == 1, self.err
        return lines[0]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Outcome]:
    """``cli(*argv)`` runs ``decentsim ARGV`` in this process."""

    def run(*argv: str) -> Outcome:
        capsys.readouterr()
        try:
            status = main(list(argv))
        except SystemExit as e:  # argparse exits itself: --help (0) and its usage errors (2)
            if isinstance(e.code, str):  # as the interpreter does: the message, status 1
                sys.stderr.write(f"{e.code}\n")
                status = 1
            else:
                status = e.code or 0
        out, err = capsys.readouterr()
        return Outcome(status, out, err)

    return run


def decentsim_process(*argv: str, timeout: float = 120.0) -> Outcome:
    """``python -m decentsim ARGV`` as a process of its own, from the project root."""
    done = subprocess.run(
        [sys.executable, "-m", "decentsim", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def process() -> Callable[..., Outcome]:
    """``process(*argv)`` runs ``decentsim ARGV`` as a real process."""
    return decentsim_process


@pytest.fixture
def tiny_target(tmp_path: Path) -> Path:
    """A weekly target CSV of two regions, four weeks each (calibrate's and the federated
    run's ``--target``)."""
    path = tmp_path / "target.csv"
    path.write_text(
        "date,region,cases_week\n"
        + "".join(
            f"2020-01-{7 * week + 1:02d},X,{cases}\n2020-01-{7 * week + 1:02d},Y,0\n"
            for week, cases in enumerate((3, 8, 12, 9))
        )
    )
    return path
