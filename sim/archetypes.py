"""Archetype cells and behaviour tables: how a public table drives each agent's choices ℓ.

An *archetype* is a cell of public attributes. Every agent falls in exactly one cell; a
behaviour table gives, for each cell and period, the probability of each behaviour
(:data:`BEHAVIOURS`: whether to isolate, whether to work). A language model (or a file, or a
rule) fills the table from a cell's attributes and the period's public numbers only
(:class:`PublicNumbers`); every agent then draws its own decisions from its cell's row with its
own counter-based randomness (``sim.model.behaviour``). So the table is public and identical for
everyone, and on a device the agent's attributes and draws never leave it.

Attributes and their binning (:data:`ATTRIBUTES`), each used where the population has it:

- ``age_group``: the population's six groups (``sim.populations.AGE_GROUPS``), always present;
- ``gender``: ``female``, ``male``, ``other`` (any other recorded value);
- ``occupation``: the SOC 2018 *major group* of ``soc_code`` — its first two digits (``11``
  Management … ``53`` Transportation and material moving, ``55`` Military), :data:`NO_OCCUPATION`
  for an agent with none;
- ``area``: the values of an ``area`` column, sorted; a population without one is one area;
- ``income``: the bands of :data:`INCOME_BANDS` (annual household income, US dollars).

The grid (:class:`ArchetypeGrid`) is the full cartesian product of the levels of the
attributes used, **empty cells included**: the table says nothing about which combinations
exist. Cells are numbered in mixed radix, the first attribute varying slowest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sim.populations import AGE_GROUPS, Population

#: The behaviours a table gives probabilities for, in column order.
BEHAVIOURS: tuple[str, ...] = ("isolate", "work")
#: The public attributes that may define archetype cells, in cell-numbering order.
ATTRIBUTES: tuple[str, ...] = ("age_group", "gender", "occupation", "area", "income")

GENDERS: tuple[str, ...] = ("female", "male", "other")
#: SOC 2018 major groups (first two digits of a SOC code) and their titles.
SOC_MAJOR_GROUPS: dict[str, str] = {
    "11": "management",
    "13": "business and financial operations",
    "15": "computer and mathematical",
    "17": "architecture and engineering",
    "19": "life, physical and social science",
    "21": "community and social service",
    "23": "legal",
    "25": "educational instruction and library",
    "27": "arts, design, entertainment, sports and media",
    "29": "healthcare practitioners and technical",
    "31": "healthcare support",
    "33": "protective service",
    "35": "food preparation and serving",
    "37": "building and grounds cleaning and maintenance",
    "39": "personal care and service",
    "41": "sales",
    "43": "office and administrative support",
    "45": "farming, fishing and forestry",
    "47": "construction and extraction",
    "49": "installation, maintenance and repair",
    "51": "production",
    "53": "transportation and material moving",
    "55": "military",
}
#: The occupation level of an agent without a SOC code.
NO_OCCUPATION = "none"
OCCUPATIONS: tuple[str, ...] = (*SOC_MAJOR_GROUPS, NO_OCCUPATION)
#: Annual household income bands (US dollars): lower bounds, and their labels.
INCOME_BOUNDS: tuple[float, ...] = (0.0, 25_000.0, 50_000.0, 100_000.0, 200_000.0)
INCOME_BANDS: tuple[str, ...] = ("<25k", "25k-50k", "50k-100k", "100k-200k", ">=200k")


class ArchetypeError(ValueError):
    """An attribute, a table or a cell is malformed; the message names it (and file/line)."""


@dataclass(frozen=True)
class Attribute:
    """One public attribute of the grid: its name and its levels (labels) in code order."""

    name: str
    levels: tuple[str, ...]


@dataclass(frozen=True)
class ArchetypeGrid:
    """The full grid of archetype cells over some public attributes (see the module doc)."""

    attributes: tuple[Attribute, ...]

    def __post_init__(self) -> None:
        names = [a.name for a in self.attributes]
        if not names or names[0] != "age_group" or len(set(names)) != len(names):
            raise ArchetypeError(f"a grid starts with age_group, each attribute once: {names}")
        unknown = sorted(set(names) - set(ATTRIBUTES))
        if unknown:
            raise ArchetypeError(f"unknown attribute(s) {unknown}; known: {list(ATTRIBUTES)}")
        for a in self.attributes:
            if not a.levels or len(set(a.levels)) != len(a.levels):
                raise ArchetypeError(f"attribute {a.name!r}: levels must be distinct and some")

    @property
    def names(self) -> tuple[str, ...]:
        """The attributes' names, in cell-numbering order."""
        return tuple(a.name for a in self.attributes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Levels per attribute."""
        return tuple(len(a.levels) for a in self.attributes)

    @property
    def n_cells(self) -> int:
        """Cells of the full grid (empty ones included)."""
        return math.prod(self.shape)

    def cell_of(self, codes: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each agent's cell (int64), from its attribute codes (level indices, int64)."""
        cell = torch.zeros_like(codes[self.names[0]], dtype=torch.int64)
        for a in self.attributes:
            cell = cell * len(a.levels) + codes[a.name].to(torch.int64)
        return cell

    def cell(self, index: int) -> dict[str, str]:
        """Cell ``index`` as attribute name → level label."""
        if not 0 <= index < self.n_cells:
            raise ArchetypeError(f"cell {index} is outside 0..{self.n_cells - 1}")
        out: dict[str, str] = {}
        for a in reversed(self.attributes):
            index, code = divmod(index, len(a.levels))
            out[a.name] = a.levels[code]
        return {name: out[name] for name in self.names}

    def cells(self) -> Iterator[dict[str, str]]:
        """Every cell, in index order."""
        for index in range(self.n_cells):
            yield self.cell(index)

    def index(self, labels: Mapping[str, str]) -> int:
        """The index of the cell with these level labels (every attribute named)."""
        missing = sorted(set(self.names) - set(labels))
        if missing:
            raise ArchetypeError(f"cell names no level for {missing}")
        index = 0
        for a in self.attributes:
            label = labels[a.name]
            if label not in a.levels:
                raise ArchetypeError(
                    f"attribute {a.name!r}: unknown level {label!r}; levels: {list(a.levels)}"
                )
            index = index * len(a.levels) + a.levels.index(label)
        return index

    def to_json(self) -> list[dict[str, object]]:
        """The grid as ``[{"name", "levels"}, …]`` in cell-numbering order (a list, so the
        order survives any JSON encoder that sorts keys)."""
        return [{"name": a.name, "levels": list(a.levels)} for a in self.attributes]

    @classmethod
    def from_json(cls, raw: Sequence[Mapping[str, object]]) -> ArchetypeGrid:
        """Inverse of :meth:`to_json`.

        Raises:
            ArchetypeError: not a list of ``{"name", "levels"}`` objects.
        """
        try:
            return cls(
                tuple(
                    Attribute(str(a["name"]), tuple(str(x) for x in a["levels"]))  # type: ignore[attr-defined]
                    for a in raw
                )
            )
        except (KeyError, TypeError) as e:
            raise ArchetypeError(f"grid: expected [{{'name', 'levels'}}, …] ({e})") from None

    @property
    def digest(self) -> str:
        """SHA-256 of the grid's canonical JSON: a table is only valid for its grid."""
        text = json.dumps(self.to_json(), sort_keys=False, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def occupation_group(soc_code: str) -> str:
    """The occupation level of a SOC code: its major group, or :data:`NO_OCCUPATION`.

    Raises:
        ArchetypeError: a code whose first two digits are not a SOC 2018 major group.
    """
    code = soc_code.strip()
    if not code:
        return NO_OCCUPATION
    major = code[:2]
    if major not in SOC_MAJOR_GROUPS:
        raise ArchetypeError(f"soc_code {soc_code!r} is not in a SOC 2018 major group")
    return major


def income_band(income: float) -> str:
    """The band of an annual household income (US dollars, >= 0)."""
    if not (math.isfinite(income) and income >= 0):
        raise ArchetypeError(f"income must be a finite amount >= 0, got {income}")
    return INCOME_BANDS[int(np.searchsorted(INCOME_BOUNDS, income, side="right")) - 1]


def _codes(values: Sequence[str], levels: Sequence[str], name: str) -> torch.Tensor:
    index = {level: i for i, level in enumerate(levels)}
    try:
        return torch.tensor([index[v] for v in values], dtype=torch.int64)
    except KeyError as e:
        raise ArchetypeError(f"attribute {name!r}: unknown level {e.args[0]!r}") from None


def population_cells(population: Population) -> tuple[ArchetypeGrid, torch.Tensor]:
    """The grid over the attributes ``population`` has, and each agent's cell.

    Uses ``population.attributes`` (string columns): ``gender``, ``soc_code`` (binned to its
    major group), ``area``, ``income`` (binned, see :func:`income_band`). A population
    without an ``area`` column is one area named after the population.
    """
    attrs = population.attributes
    n = population.n_agents
    grid: list[Attribute] = [Attribute("age_group", AGE_GROUPS)]
    codes: dict[str, torch.Tensor] = {"age_group": population.age_group.cpu().to(torch.int64)}
    if "gender" in attrs:
        genders = [g.strip().lower() for g in attrs["gender"]]
        genders = [g if g in GENDERS else "other" for g in genders]
        grid.append(Attribute("gender", GENDERS))
        codes["gender"] = _codes(genders, GENDERS, "gender")
    if "soc_code" in attrs:
        grid.append(Attribute("occupation", OCCUPATIONS))
        codes["occupation"] = _codes(
            [occupation_group(c) for c in attrs["soc_code"]], OCCUPATIONS, "occupation"
        )
    areas = sorted(set(attrs["area"])) if "area" in attrs else [population.name]
    grid.append(Attribute("area", tuple(areas)))
    codes["area"] = (
        _codes(attrs["area"], areas, "area")
        if "area" in attrs
        else torch.zeros(n, dtype=torch.int64)
    )
    if "income" in attrs:
        bands = []
        for raw in attrs["income"]:
            try:
                bands.append(income_band(float(raw)))
            except ValueError:
                raise ArchetypeError(f"attribute 'income': {raw!r} is not an amount") from None
        grid.append(Attribute("income", INCOME_BANDS))
        codes["income"] = _codes(bands, INCOME_BANDS, "income")
    built = ArchetypeGrid(tuple(grid))
    return built, built.cell_of(codes)


def labour_force(population: Population) -> torch.Tensor:
    """Who is in the labour force (bool (N,)): agents with an occupation (a ``soc_code``) where
    the population records one, else the working-age groups (20–64)."""
    if "soc_code" in population.attributes:
        return torch.tensor([bool(c.strip()) for c in population.attributes["soc_code"]])
    age = population.age_group.cpu()
    return (age >= 1) & (age <= 4)


#: Days of a month in ``PublicNumbers.months_since_start`` and stimulus months.
MONTH_DAYS = 30


@dataclass(frozen=True)
class PublicNumbers:
    """What a period's behaviour may depend on: public aggregates and public policy only.

    Attributes:
        period: the period's index (0-based).
        months_since_start: the period's start, in months since the run's first day.
        cases: new infections in the previous period (0 for the first).
        change_pct: their change from the period before, in percent (0 when undefined).
        stimulus: the stimulus payment (US dollars) paid in this period's month, 0 if none.
    """

    period: int
    months_since_start: float
    cases: float
    change_pct: float
    stimulus: float


def public_numbers(
    daily_cases: Sequence[float], day: int, period_days: int, stimulus: float
) -> PublicNumbers:
    """The public numbers of the period starting on ``day``, from the run's own daily new
    infections so far (the central trajectory, or a federation's opened aggregates: the same
    numbers give the same table). ``stimulus`` is what that month pays."""
    start = day - period_days
    cases = float(sum(daily_cases[max(start, 0) : day])) if start >= 0 else 0.0
    before = (
        float(sum(daily_cases[start - period_days : start])) if start - period_days >= 0 else 0.0
    )
    change = 100.0 * (cases - before) / before if before > 0 else 0.0
    return PublicNumbers(
        period=day // period_days,
        months_since_start=day / MONTH_DAYS,
        cases=cases,
        change_pct=change,
        stimulus=stimulus,
    )


class BehaviourSource(Protocol):
    """Fills a period's row of a behaviour table (heuristic rule, file, language model)."""

    def probabilities(self, grid: ArchetypeGrid, public: PublicNumbers) -> np.ndarray:
        """(cells, len(BEHAVIOURS)) probabilities in [0, 1] for the period of ``public``."""
        ...


@dataclass(frozen=True)
class BehaviourTable:
    """Probabilities per (period, cell, behaviour): public, versioned, saved with a run.

    Attributes:
        grid: the cells.
        period_days: days per period (7: weekly, 30: monthly).
        p: (periods, cells, len(BEHAVIOURS)) float64 in [0, 1].
        source: where the rows came from (``table:PATH``, ``llm:MODEL@URL``, …).
    """

    grid: ArchetypeGrid
    period_days: int
    p: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        if self.period_days < 1:
            raise ArchetypeError(f"period_days must be >= 1, got {self.period_days}")
        p = np.asarray(self.p, dtype=np.float64)
        want = (self.grid.n_cells, len(BEHAVIOURS))
        if p.ndim != 3 or p.shape[1:] != want:
            raise ArchetypeError(f"table must be (periods, {want[0]}, {want[1]}), got {p.shape}")
        bad = ~np.isfinite(p) | (p < 0) | (p > 1)
        if bad.any():
            period, cell, behaviour = (int(x[0]) for x in np.nonzero(bad))
            raise ArchetypeError(
                f"period {period}, cell {self.grid.cell(cell)}: {BEHAVIOURS[behaviour]} "
                f"probability {p[period, cell, behaviour]} is outside [0, 1]"
            )
        object.__setattr__(self, "p", p)

    @property
    def periods(self) -> int:
        """Periods the table covers."""
        return int(self.p.shape[0])

    @property
    def version(self) -> str:
        """SHA-256 of the grid and the probabilities: the table's version, saved with a run."""
        h = hashlib.sha256(self.grid.digest.encode())
        h.update(str(self.period_days).encode())
        h.update(np.ascontiguousarray(self.p, dtype="<f8").tobytes())
        return h.hexdigest()

    def row(self, period: int) -> np.ndarray:
        """(cells, behaviours) of ``period``; the last period's row holds after the end."""
        if period < 0:
            raise ArchetypeError(f"period must be >= 0, got {period}")
        return self.p[min(period, self.periods - 1)]

    def to_csv(self) -> str:
        """``period, <attributes…>, isolate, work``: one line per (period, cell), full grid."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["period", *self.grid.names, *BEHAVIOURS])
        for period in range(self.periods):
            for index, cell in enumerate(self.grid.cells()):
                w.writerow(
                    [period, *cell.values(), *(repr(float(x)) for x in self.p[period, index])]
                )
        return out.getvalue()

    def save(self, path: Path) -> None:
        """Write the table: CSV, or JSON (``.json``: grid, period_days, source, version, p)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(
                json.dumps(
                    {
                        "grid": self.grid.to_json(),
                        "period_days": self.period_days,
                        "source": self.source,
                        "version": self.version,
                        "p": self.p.tolist(),
                    }
                )
            )
        else:
            path.write_text(self.to_csv())

    @classmethod
    def load(cls, path: str | Path, grid: ArchetypeGrid, period_days: int = 7) -> BehaviourTable:
        """A table from a CSV (``period, <grid attributes…>, isolate, work``) or JSON file,
        for ``grid``: every (period, cell) must be given exactly once.

        Raises:
            ArchetypeError: names the file, line and field: an unknown attribute or level, a
                missing or repeated cell, a probability outside [0, 1], another grid.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ArchetypeError(f"{path}: cannot read ({e.strerror})") from None
        if path.suffix == ".json":
            return cls._from_json(path, text, grid)
        return cls._from_csv(path, text, grid, period_days)

    @classmethod
    def _from_json(cls, path: Path, text: str, grid: ArchetypeGrid) -> BehaviourTable:
        try:
            raw = json.loads(text)
            theirs = ArchetypeGrid.from_json(raw["grid"])
            period_days, p = int(raw["period_days"]), np.asarray(raw["p"], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise ArchetypeError(
                f"{path}: not a behaviour table ({type(e).__name__}: {e})"
            ) from None
        if theirs != grid:
            raise ArchetypeError(f"{path}: a table of another grid ({theirs.to_json()})")
        try:
            return cls(grid, period_days, p, f"table:{path}")
        except ArchetypeError as e:
            raise ArchetypeError(f"{path}: {e}") from None

    @classmethod
    def _from_csv(
        cls, path: Path, text: str, grid: ArchetypeGrid, period_days: int
    ) -> BehaviourTable:
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        want = ["period", *grid.names, *BEHAVIOURS]
        missing = [c for c in want if c not in header]
        extra = [c for c in header if c not in want]
        if missing or extra:
            raise ArchetypeError(
                f"{path}:1: columns must be {want}; missing {missing}, unknown {extra}"
            )
        rows: dict[tuple[int, int], tuple[float, float]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                period = int(row["period"])
            except ValueError:
                raise ArchetypeError(
                    f"{path}:{line}: field 'period': {row['period']!r} is not an integer"
                ) from None
            if period < 0:
                raise ArchetypeError(f"{path}:{line}: field 'period': must be >= 0")
            try:
                cell = grid.index({n: row[n] for n in grid.names})
            except ArchetypeError as e:
                raise ArchetypeError(f"{path}:{line}: {e}") from None
            values = []
            for b in BEHAVIOURS:
                try:
                    v = float(row[b])
                except ValueError:
                    raise ArchetypeError(
                        f"{path}:{line}: field {b!r}: {row[b]!r} is not a number"
                    ) from None
                if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                    raise ArchetypeError(
                        f"{path}:{line}: field {b!r}: probability {v} is outside [0, 1]"
                    )
                values.append(v)
            if (period, cell) in rows:
                raise ArchetypeError(f"{path}:{line}: period {period}, cell {row} given twice")
            rows[(period, cell)] = (values[0], values[1])
        if not rows:
            raise ArchetypeError(f"{path}: no rows")
        periods = 1 + max(k[0] for k in rows)
        p = np.empty((periods, grid.n_cells, len(BEHAVIOURS)))
        for period in range(periods):
            for cell in range(grid.n_cells):
                if (period, cell) not in rows:
                    raise ArchetypeError(
                        f"{path}: period {period} lacks cell {grid.cell(cell)} (a table "
                        f"covers the full grid of {grid.n_cells} cells, empty ones included)"
                    )
                p[period, cell] = rows[(period, cell)]
        return cls(grid, period_days, p, f"table:{path}")
