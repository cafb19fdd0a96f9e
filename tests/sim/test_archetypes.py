"""Archetype cells and behaviour tables: the full grid, the binning, files with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sim.archetypes import (
    BEHAVIOURS,
    NO_OCCUPATION,
    OCCUPATIONS,
    ArchetypeError,
    ArchetypeGrid,
    Attribute,
    BehaviourTable,
    income_band,
    occupation_group,
    population_cells,
)
from sim.populations import AGE_GROUPS, from_spec, synthetic

ASTORIA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "astoria"

GRID = ArchetypeGrid(
    (
        Attribute("age_group", AGE_GROUPS),
        Attribute("gender", ("female", "male", "other")),
        Attribute("area", ("north", "south")),
    )
)


def test_cells_number_the_full_grid_in_mixed_radix() -> None:
    assert GRID.n_cells == 6 * 3 * 2 and GRID.shape == (6, 3, 2)
    cells = list(GRID.cells())
    assert cells[0] == {"age_group": "U19", "gender": "female", "area": "north"}
    assert cells[1] == {"age_group": "U19", "gender": "female", "area": "south"}
    assert [GRID.index(c) for c in cells] == list(range(GRID.n_cells))
    codes = {
        "age_group": torch.tensor([0, 5, 2]),
        "gender": torch.tensor([1, 2, 0]),
        "area": torch.tensor([1, 0, 1]),
    }
    assert GRID.cell_of(codes).tolist() == [3, 34, 13]
    assert GRID.cell(34) == {"age_group": "65A", "gender": "other", "area": "north"}
    assert ArchetypeGrid.from_json(GRID.to_json()) == GRID
    with pytest.raises(ArchetypeError, match="unknown level 'x'"):
        GRID.index({"age_group": "U19", "gender": "x", "area": "north"})
    with pytest.raises(ArchetypeError, match="starts with age_group"):
        ArchetypeGrid((Attribute("gender", ("f",)),))


def test_binning_of_occupations_and_incomes() -> None:
    assert occupation_group("29-2011.00") == "29" and occupation_group(" ") == NO_OCCUPATION
    with pytest.raises(ArchetypeError, match="not in a SOC 2018 major group"):
        occupation_group("99-0000.00")
    assert [income_band(x) for x in (0, 24_999, 25_000, 99_999.5, 1e7)] == [
        "<25k",
        "<25k",
        "25k-50k",
        "50k-100k",
        ">=200k",
    ]
    with pytest.raises(ArchetypeError, match="income"):
        income_band(-1)


def test_synthetic_populations_have_the_public_attributes() -> None:
    pop = synthetic(3000, seed=4)
    grid, cells = population_cells(pop)
    assert grid.names == ("age_group", "gender", "occupation", "area", "income")
    assert grid.n_cells == 6 * 3 * len(OCCUPATIONS) * 1 * 5  # empty cells included
    assert cells.shape == (3000,) and int(cells.min()) >= 0 and int(cells.max()) < grid.n_cells
    # occupations only for workers: everyone with colleagues has one, and about the working-age
    # share × employment rate of everyone has one
    soc = pop.attributes["soc_code"]
    assert all(soc[i] != "" for i in set(pop.layer("work").src.tolist()))
    assert 0.4 < sum(s != "" for s in soc) / 3000 < 0.6
    # the new attributes leave the rest of the population as it was
    again = synthetic(3000, seed=4)
    assert torch.equal(again.age_group, pop.age_group)


@pytest.mark.skipif(not ASTORIA.is_dir(), reason="the Astoria data is not next to the project")
def test_astoria_cells() -> None:
    grid, cells = population_cells(from_spec(str(ASTORIA)))
    assert grid.names == ("age_group", "gender", "occupation", "area")
    assert grid.n_cells == 6 * 3 * len(OCCUPATIONS)
    assert cells.numel() == 37_518 and len(torch.unique(cells)) > 200


def test_tables_round_trip_and_name_what_is_wrong(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = BehaviourTable(GRID, 7, rng.random((3, GRID.n_cells, len(BEHAVIOURS))), "test")
    for name in ("t.csv", "t.json"):
        table.save(tmp_path / name)
        back = BehaviourTable.load(tmp_path / name, GRID)
        np.testing.assert_array_equal(back.p, table.p)
        assert back.version == table.version
    assert np.array_equal(table.row(99), table.p[-1])  # the last period holds after the end
    lines = (tmp_path / "t.csv").read_text().splitlines()
    (tmp_path / "missing.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ArchetypeError, match="period 2 lacks cell"):
        BehaviourTable.load(tmp_path / "missing.csv", GRID)
    bad = lines[:]
    bad[5] = bad[5].rsplit(",", 1)[0] + ",1.5"
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(ArchetypeError, match=r"bad\.csv:6: field 'work': probability 1\.5"):
        BehaviourTable.load(tmp_path / "bad.csv", GRID)
    (tmp_path / "cols.csv").write_text("period,age_group,colour,isolate,work\n")
    with pytest.raises(ArchetypeError, match=r"cols\.csv:1: columns must be"):
        BehaviourTable.load(tmp_path / "cols.csv", GRID)
    with pytest.raises(ArchetypeError, match="outside"):
        BehaviourTable(GRID, 7, np.full((1, GRID.n_cells, 2), -0.1))
    other = ArchetypeGrid((Attribute("age_group", AGE_GROUPS),))
    with pytest.raises(ArchetypeError, match="a table of another grid"):
        BehaviourTable.load(tmp_path / "t.json", other)
