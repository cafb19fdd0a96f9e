"""Running ``decentsim`` in the tests: in this process (fast) or as a real process (end to end).

Both give a :class:`Outcome`: the exit status, stdout and stderr.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@pytest.fixture
def small_population(tmp_path: Path) -> Path:
    """A 400-agent population directory (the Astoria format) with a gender and two areas: 36
    archetype cells, so a language-model run asks few questions. Layers ``contacts_0``
    (households of 4) and ``contacts_1`` (random workplace contacts)."""
    rng = np.random.default_rng(5)
    n = 400
    directory = tmp_path / "small"
    directory.mkdir()
    ages = rng.choice(["U19", "20t29", "30t39", "40t49", "50t64", "65A"], n)
    genders = rng.choice(["female", "male"], n)
    rows = "".join(
        f"{i},{ages[i]},{genders[i]},{'north' if i < n // 2 else 'south'},{int(i % 40 == 0)}\n"
        for i in range(n)
    )
    (directory / "agents.csv").write_text(
        "agent_id,age_group,gender,area,initially_infected\n" + rows
    )
    homes = "".join(f"{i},{i + 1}\n{i},{i + 2}\n" for i in range(0, n - 2, 4))
    (directory / "contacts_0.csv").write_text("src,dst\n" + homes)
    pairs = rng.integers(0, n, size=(3 * n, 2))
    work = "".join(f"{a},{b}\n" for a, b in pairs if a != b)
    (directory / "contacts_1.csv").write_text("src,dst\n" + work)
    return directory
