"""The ``table`` source: a user's table, checked in full on loading; bad tables are one-line
errors naming the file, line and field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from behaviour import TableSource
from sim.archetypes import (
    AGE_GROUPS,
    ArchetypeError,
    ArchetypeGrid,
    Attribute,
    BehaviourTable,
    PublicNumbers,
)


def _table(grid: ArchetypeGrid, periods: int = 2) -> BehaviourTable:
    rng = np.random.default_rng(0)
    return BehaviourTable(grid, 7, rng.uniform(size=(periods, grid.n_cells, 2)))


def test_rows_by_period_and_the_last_row_holds(
    tmp_path: Path, grid: ArchetypeGrid, public: Callable[..., PublicNumbers]
) -> None:
    table = _table(grid)
    path = tmp_path / "table.csv"
    table.save(path)
    source = TableSource(path, grid)
    assert source.source == f"table:{path}"
    assert np.array_equal(source.probabilities(grid, public(period=0)), table.p[0])
    assert np.array_equal(source.probabilities(grid, public(period=1)), table.p[1])
    assert np.array_equal(source.probabilities(grid, public(period=9)), table.p[1])
    # A copy: the caller cannot change the loaded table.
    source.probabilities(grid, public(period=0))[:] = 0
    assert np.array_equal(source.probabilities(grid, public(period=0)), table.p[0])


def test_a_json_table(
    tmp_path: Path, grid: ArchetypeGrid, public: Callable[..., PublicNumbers]
) -> None:
    table = _table(grid, periods=1)
    path = tmp_path / "table.json"
    table.save(path)
    assert np.array_equal(TableSource(path, grid).probabilities(grid, public()), table.p[0])


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_table_missing_a_cell(tmp_path: Path, grid: ArchetypeGrid) -> None:
    path = tmp_path / "table.csv"
    _table(grid).save(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ArchetypeError) as e:
        TableSource(path, grid)
    message = _one_line(e)
    assert str(path) in message and "lacks cell" in message and "65A" in message


def test_a_probability_outside_0_1(tmp_path: Path, grid: ArchetypeGrid) -> None:
    path = tmp_path / "table.csv"
    _table(grid).save(path)
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    fields[-1] = "1.5"
    lines[3] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArchetypeError) as e:
        TableSource(path, grid)
    assert _one_line(e) == f"{path}:4: field 'work': probability 1.5 is outside [0, 1]"


def test_another_grid(
    tmp_path: Path, grid: ArchetypeGrid, public: Callable[..., PublicNumbers]
) -> None:
    path = tmp_path / "table.csv"
    _table(grid).save(path)
    source = TableSource(path, grid)
    other = ArchetypeGrid((Attribute("age_group", AGE_GROUPS),))
    with pytest.raises(ArchetypeError, match="loaded for grid"):
        source.probabilities(other, public())
    with pytest.raises(ArchetypeError) as e:
        TableSource(path, other)
    assert str(path) in _one_line(e)


def test_a_missing_file(tmp_path: Path, grid: ArchetypeGrid) -> None:
    with pytest.raises(ArchetypeError) as e:
        TableSource(tmp_path / "nope.csv", grid)
    assert "nope.csv: cannot read" in _one_line(e)
