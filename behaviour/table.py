"""The ``table`` behaviour source: probabilities from a user's file, no model at all.

The file (CSV ``period, <grid attributes…>, isolate, work`` or a saved JSON table) is read and
checked in full when the source is made — every (period, cell) of the grid exactly once, every
probability in [0, 1] — so a bad table fails before a run starts, with its file, line and field
(:meth:`sim.archetypes.BehaviourTable.load`). A period past the table's end keeps its last row.
It learns nothing: the rows are fixed by the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sim.archetypes import ArchetypeError, ArchetypeGrid, BehaviourTable, PublicNumbers


class TableSource:
    """A :class:`sim.archetypes.BehaviourSource` reading a user's behaviour table."""

    def __init__(self, path: str | Path, grid: ArchetypeGrid, period_days: int = 7) -> None:
        """Load ``path`` for ``grid`` (``period_days``: the CSV's period; JSON carries its own).

        Raises:
            ArchetypeError: the table is unreadable or malformed (file, line and field named).
        """
        self.table = BehaviourTable.load(path, grid, period_days)

    @property
    def source(self) -> str:
        """``table:PATH``."""
        return self.table.source

    def probabilities(self, grid: ArchetypeGrid, public: PublicNumbers) -> np.ndarray:
        """The table's row for ``public.period`` (its last row past the end), a copy.

        Raises:
            ArchetypeError: ``grid`` is not the grid the table was loaded for.
        """
        if grid != self.table.grid:
            raise ArchetypeError(
                f"{self.table.source}: loaded for grid {self.table.grid.to_json()}, "
                f"asked for {grid.to_json()}"
            )
        return self.table.row(public.period).copy()
