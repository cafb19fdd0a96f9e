"""Protocol code reads the time only through a run clock (``protocols.clock``).

A lint rule as a test: every module of the protocol layer and of the round schedule is parsed,
and any read of the machine's clock — ``time.time``, ``time.time_ns``, ``time.monotonic``,
``time.perf_counter``, ``datetime.now``/``utcnow``/``today`` and ``from time import …`` of them —
fails unless its line says ``# infrastructure time`` (a duty cycle, a timeout: wall seconds on
purpose). Mixing the two clocks is how a scaled test clock breaks protocol timing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from protocols.clock import RunClock

ROOT = Path(__file__).resolve().parents[2]
#: protocol time lives here: the BLE and secure-sum protocols, the day's round schedule
PROTOCOL_CODE = sorted(
    [
        *(ROOT / "protocols").rglob("*.py"),
        ROOT / "contract" / "round.py",
        ROOT / "contract" / "schedule.py",
    ]
)
#: the one place that reads the machine's clock for protocol time
CLOCK = ROOT / "protocols" / "clock.py"
CLOCK_READS = {
    "time",
    "time_ns",
    "monotonic",
    "monotonic_ns",
    "perf_counter",
    "now",
    "utcnow",
    "today",
}
MARK = "# infrastructure time"


def clock_reads(source: str) -> list[int]:
    """Line numbers of clock reads in ``source`` that carry no infrastructure-time mark."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        read = (
            isinstance(node, ast.Attribute)
            and node.attr in CLOCK_READS
            and isinstance(node.value, ast.Name)
            and node.value.id in ("time", "datetime", "date")
        ) or (
            isinstance(node, ast.ImportFrom)
            and node.module in ("time", "datetime")
            and any(a.name in CLOCK_READS for a in node.names)
        )
        if read and MARK not in lines[node.lineno - 1]:
            found.append(node.lineno)
    return found


@pytest.mark.parametrize("path", PROTOCOL_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_protocol_code_reads_no_clock_but_the_run_clock(path: Path) -> None:
    if path == CLOCK:
        return
    bad = clock_reads(path.read_text())
    assert not bad, (
        f"{path.relative_to(ROOT)}:{bad[0]}: reads the machine's clock; protocol time comes "
        f"from protocols.clock.RunClock (mark wall-clock infrastructure with '{MARK}')"
    )


def test_the_rule_catches_each_kind_of_clock_read() -> None:
    assert clock_reads("import time\nt = time.time()\n") == [2]
    assert clock_reads("import time\nt = time.monotonic()  # infrastructure time\n") == []
    assert clock_reads("from time import monotonic\n") == [1]
    assert clock_reads("import datetime\nd = datetime.now()\n") == [2]
    assert clock_reads("x = clock.now()\n") == []


def test_the_run_clock_maths() -> None:
    """now = sim_epoch + scale × (wall − wall_epoch); durations convert by the scale."""
    wall = [1_000.0]
    clock = RunClock(sim_epoch=5_000_000.0, scale=1440.0, wall_epoch=990.0, wall=lambda: wall[0])
    assert clock.now() == 5_000_000.0 + 1440.0 * 10.0
    wall[0] = 990.0 + 60.0  # a wall minute is a protocol day
    assert clock.now() - clock.sim_epoch == 86_400.0
    assert clock.to_protocol(0.5) == 720.0 and clock.to_wall(600.0) == 600.0 / 1440.0
    assert clock.to_wall(clock.to_protocol(3.25)) == 3.25
    real = RunClock(wall=lambda: 1234.5)  # scale 1, both epochs 0: the machine's clock
    assert real.now() == 1234.5 and real.to_wall(600.0) == 600.0
