"""Proximity schedules: who is how far from whom, when — the script of a hardware-free pilot test.

A schedule is a CSV file with the header ``start_s,end_s,a,b,distance_m``: devices ``a`` and ``b``
(pilot agent ids) are ``distance_m`` metres apart from protocol second ``start_s`` to ``end_s``,
counted from the run clock's ``sim_epoch``. Pairs are unordered; a pair not listed at a time is
out of range (nothing is heard). Two rows of one pair must not overlap: the schedule would be
ambiguous. Lines starting with ``#`` are comments.

The radio hub (:mod:`protocols.ble.hub`) turns a schedule into RSSI through the same path loss
the ideal radio uses (41 dB at 1 m, exponent 2), and :meth:`ProximitySchedule.expected_weight`
says what an exposure score should recover from it, so a test can hold the pilots' traces to a
band around it.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.ble.errors import BleError
from protocols.ble.radio import NOMINAL_TX_POWER_DBM, IdealRadio
from protocols.ble.scoring import DEFAULT_CONFIG, ScoringConfig

HEADER = ("start_s", "end_s", "a", "b", "distance_m")


class ScheduleError(BleError):
    """A proximity schedule is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Proximity:
    """Devices ``a < b`` are ``distance_m`` apart during ``[start_s, end_s)`` protocol seconds."""

    start_s: float
    end_s: float
    a: int
    b: int
    distance_m: float


def attenuation_db(distance_m: float) -> float:
    """The hub's path loss: the ideal radio's (41 dB at 1 m, exponent 2)."""
    return float(IdealRadio.attenuation_db(np.array([distance_m]))[0])


class ProximitySchedule:
    """A validated proximity schedule (see the module docstring)."""

    def __init__(self, rows: list[Proximity]) -> None:
        self.rows = sorted(rows, key=lambda r: (r.a, r.b, r.start_s))
        self._by_pair: dict[tuple[int, int], list[Proximity]] = {}
        for row in self.rows:
            self._by_pair.setdefault((row.a, row.b), []).append(row)

    @classmethod
    def read(cls, path: Path) -> ProximitySchedule:
        """Parse and validate a schedule file; :class:`ScheduleError` names what is wrong."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ScheduleError(f"{path}: cannot read the proximity schedule: {err}") from err
        lines = [(i, line) for i, line in enumerate(text.splitlines(), 1)]
        lines = [(i, line) for i, line in lines if line.strip() and not line.startswith("#")]
        if not lines:
            raise ScheduleError(f"{path}: empty proximity schedule (need the header {HEADER})")
        head_no, head = lines[0]
        header = tuple(h.strip() for h in next(csv.reader([head])))
        if header != HEADER:
            raise ScheduleError(f"{path}:{head_no}: header must be {','.join(HEADER)}, got {head}")
        rows = [cls._row(path, no, line) for no, line in lines[1:]]
        schedule = cls(rows)
        for (a, b), pair in schedule._by_pair.items():
            for prev, nxt in itertools.pairwise(pair):
                if nxt.start_s < prev.end_s:
                    raise ScheduleError(
                        f"{path}: pair ({a}, {b}) has overlapping rows "
                        f"[{prev.start_s}, {prev.end_s}) and [{nxt.start_s}, {nxt.end_s})"
                    )
        return schedule

    @staticmethod
    def _row(path: Path, no: int, line: str) -> Proximity:
        cells = [c.strip() for c in next(csv.reader([line]))]
        if len(cells) != len(HEADER):
            raise ScheduleError(f"{path}:{no}: need {len(HEADER)} fields, got {len(cells)}")
        values: dict[str, float] = {}
        for name, cell in zip(HEADER, cells, strict=True):
            try:
                values[name] = int(cell) if name in ("a", "b") else float(cell)
            except ValueError:
                raise ScheduleError(f"{path}:{no}: field {name}: not a number: {cell!r}") from None
            if not math.isfinite(values[name]):
                raise ScheduleError(f"{path}:{no}: field {name}: must be finite, got {cell}")
        a, b = int(values["a"]), int(values["b"])
        if a < 0 or b < 0:
            raise ScheduleError(f"{path}:{no}: field a/b: device ids must be >= 0")
        if a == b:
            raise ScheduleError(f"{path}:{no}: field b: a device is not near itself (a == b)")
        if not 0 <= values["start_s"] < values["end_s"]:
            raise ScheduleError(f"{path}:{no}: field end_s: need 0 <= start_s < end_s")
        if values["distance_m"] <= 0:
            raise ScheduleError(f"{path}:{no}: field distance_m: must be > 0")
        return Proximity(
            values["start_s"], values["end_s"], min(a, b), max(a, b), values["distance_m"]
        )

    @property
    def devices(self) -> list[int]:
        """Every device the schedule names."""
        return sorted({r.a for r in self.rows} | {r.b for r in self.rows})

    def distance(self, a: int, b: int, t: float) -> float | None:
        """Distance between ``a`` and ``b`` at protocol second ``t`` (since the epoch), or None."""
        for row in self._by_pair.get((min(a, b), max(a, b)), ()):
            if row.start_s <= t < row.end_s:
                return row.distance_m
        return None

    def rssi(self, a: int, b: int, t: float, tx_power_dbm: float = NOMINAL_TX_POWER_DBM) -> float:
        """RSSI at ``b`` of ``a``'s advert at ``t`` (NaN: out of range)."""
        d = self.distance(a, b, t)
        return math.nan if d is None else tx_power_dbm - attenuation_db(d)

    def expected_weight(
        self, a: int, b: int, start_s: float, end_s: float, config: ScoringConfig = DEFAULT_CONFIG
    ) -> float:
        """The contact weight an exact scorer recovers for the pair over ``[start_s, end_s)``:
        seconds in range × bucket weight of the attenuation / ``reference_seconds``."""
        total = 0.0
        for row in self._by_pair.get((min(a, b), max(a, b)), ()):
            seconds = max(0.0, min(row.end_s, end_s) - max(row.start_s, start_s))
            bucket = config.bucket_of(np.array([attenuation_db(row.distance_m)]))
            total += seconds * float(config.weight_of_bucket(bucket)[0])
        return total / config.reference_seconds
