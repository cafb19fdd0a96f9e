"""The behaviour check: a ``table``/``llm`` run's behaviour table came from public inputs only.

In such a run the coordinator makes each period's row of the behaviour table and sends it to
every device (``behaviour/LEAKAGE.md``). The row may depend on the grid's public cell
attributes, the table file or the language model's answers, and the period's public numbers —
which :func:`sim.archetypes.public_numbers` computes from the opened aggregates of the days
before the period and the run's public stimulus policy. This check recomputes those public
numbers from the coordinator's own committed aggregates and then:

- ``table``: every row the devices got equals the table file's row of its period;
- ``llm``: every prompt in the coordinator's answer cache is one of the prompts rendered for a
  grid cell and a row's public numbers (so no prompt carried anything else: an agent, an
  individual attribute or outcome), each cache entry holds only the documented fields, and
  every row the devices got is exactly the cached answers to its period's prompts (so no row
  came from anything but those prompts).

A prompt that fails is named by its cache file, never printed: were it to hold an individual's
data, the report must not repeat it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audit.views import AuditInput, AuditInputError, BehaviourRecord
from behaviour import Answer, PromptTemplates, TableSource
from contract.runspec import RunSpec
from contract.schedule import observations_shape
from sim.archetypes import MONTH_DAYS, ArchetypeError, PublicNumbers, public_numbers

#: the fields of an answer-cache entry (``behaviour.cache``); any other is unexpected content
CACHE_FIELDS = frozenset({"version", "key", "model", "prompt", "sampling", "answer"})
#: the most offending files a verdict names
MAX_NAMED = 10


def load_behaviour(state_dir: Path) -> BehaviourRecord | None:
    """The coordinator's behaviour record (``state_dir``: its state dir), None when it has no
    database.

    Raises:
        AuditInputError: the database cannot be read (named).
    """
    db = state_dir / "coordinator.sqlite3"
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT epoch, period, row, source FROM behaviour_rows").fetchall()
            days = conn.execute("SELECT epoch, y FROM days ORDER BY epoch, day").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise AuditInputError(f"{db}: cannot read the behaviour rows ({e})") from None
    record = BehaviourRecord(cache=sorted((state_dir / "llm-cache").rglob("*.json")))
    for epoch, period, raw, source in rows:
        record.rows[epoch, period] = np.frombuffer(raw, "<f8")
        record.sources[epoch, period] = source
    by_epoch: dict[int, list[float]] = {}
    for epoch, y in days:
        day = np.frombuffer(y, "<f8").reshape(observations_shape())
        by_epoch.setdefault(epoch, []).append(float(day[0, :, 0].sum()))
    record.daily_cases = {e: np.array(v) for e, v in by_epoch.items()}
    return record


@dataclass
class _Verdict:
    """What the check found, before it becomes a CheckResult."""

    failures: list[str] = field(default_factory=list)
    skipped: str = ""
    checked_rows: int = 0
    checked_prompts: int = 0


def _public(
    spec: RunSpec, record: BehaviourRecord, epoch: int, period: int
) -> PublicNumbers | None:
    """The public numbers of a row, from the epoch's opened aggregates (None: not all opened)."""
    start = period * spec.period_days
    cases = record.daily_cases.get(epoch, np.zeros(0))
    if len(cases) < start:
        return None
    stimulus = spec.model_config().stimulus(start // MONTH_DAYS)
    return public_numbers(cases[:start].tolist(), start, spec.period_days, stimulus)


def _check_table(spec: RunSpec, record: BehaviourRecord, v: _Verdict) -> None:
    assert spec.behaviour_table is not None  # RunSpec requires it for a table run
    grid = spec.archetype_grid()
    try:
        table = TableSource(spec.behaviour_table, grid, spec.period_days)
    except ArchetypeError as e:
        v.skipped = f"the run's table file cannot be compared: {e}"
        return
    # a table file's row depends on its period alone: nothing to recompute
    for (epoch, period), row in sorted(record.rows.items()):
        expected = table.table.row(period)
        if row.size != expected.size or not np.array_equal(row, expected.ravel()):
            v.failures.append(
                f"epoch {epoch} period {period}: the row sent to the devices is not the table "
                f"file's ({spec.behaviour_table})"
            )
        v.checked_rows += 1


def _model_of(spec: RunSpec, model: str) -> bool:
    """Whether a cache entry's ``model`` is the run's: its server's model name, or the GGUF
    file's name and digest (``behaviour.local``)."""
    if spec.llm_gguf is not None:
        return model.startswith(f"{Path(spec.llm_gguf).name}@")
    return model == spec.llm_model


def _check_llm(spec: RunSpec, record: BehaviourRecord, v: _Verdict) -> None:
    grid = spec.archetype_grid()
    templates = PromptTemplates()
    # every prompt a public input could render, and the prompts each row must come from
    allowed: set[str] = set()
    asked: dict[tuple[int, int], list[tuple[str, ...]]] = {}
    for (epoch, period), _ in sorted(record.rows.items()):
        public = _public(spec, record, epoch, period)
        if public is None:
            v.failures.append(
                f"epoch {epoch} period {period}: a row without the opened aggregates of the "
                "days before it (it cannot have come from public numbers)"
            )
            continue
        asked[epoch, period] = templates.render_grid(grid, public)
        allowed.update(p for cell in asked[epoch, period] for p in cell)
    answers: dict[str, float] = {}
    foreign: list[str] = []
    for path in record.cache:
        try:
            entry = json.loads(path.read_text())
            fields = set(entry)
            prompt, model = entry["prompt"], entry["model"]
            p_yes = Answer.from_json(entry["answer"]).p_yes
        except (OSError, ValueError, KeyError, TypeError) as e:
            v.failures.append(f"{path}: not an answer-cache entry ({type(e).__name__})")
            continue
        v.checked_prompts += 1
        if fields != CACHE_FIELDS:
            v.failures.append(f"{path}: unexpected fields {sorted(fields - CACHE_FIELDS)}")
        elif prompt not in allowed:
            foreign.append(str(path))
        elif _model_of(spec, model):
            answers[prompt] = p_yes
    if foreign:
        v.failures.append(
            f"{len(foreign)} cached prompt(s) are not a grid cell's question with the public "
            f"numbers of a period: {', '.join(foreign[:MAX_NAMED])}"
        )
    for (epoch, period), prompts in sorted(asked.items()):
        row = record.rows[epoch, period]
        got = [answers.get(p) for cell in prompts for p in cell]
        if any(a is None for a in got):
            v.failures.append(
                f"epoch {epoch} period {period}: the row sent to the devices has no cached "
                f"answer for {sum(a is None for a in got)} of its prompts"
            )
        elif row.size != len(got) or not np.array_equal(row, np.array(got, dtype=np.float64)):
            v.failures.append(
                f"epoch {epoch} period {period}: the row sent to the devices is not the model's "
                "answers to the period's prompts"
            )
        v.checked_rows += 1


def behaviour_verdict(inp: AuditInput) -> tuple[str, str, dict[str, object]]:
    """(status, message, details) of the behaviour check; status is ``pass``, ``fail`` or
    ``skip`` (see the module doc)."""
    kind = inp.config.get("behaviour", "heuristic")
    if kind == "heuristic":
        return "skip", "heuristic behaviour: no table (each device's rule reads its own agent)", {}
    if inp.role != "coordinator":
        return "skip", f"the {inp.role} never sees the table's inputs (C makes the table)", {}
    if inp.behaviour is None:
        return "skip", "no coordinator database to read the rows from", {}
    spec = RunSpec.from_json(json.dumps(inp.config))
    record = inp.behaviour
    v = _Verdict()
    (_check_table if kind == "table" else _check_llm)(spec, record, v)
    details: dict[str, object] = {
        "behaviour": kind,
        "rows": v.checked_rows,
        "periods": len({p for _, p in record.rows}),
        "cells": spec.archetype_grid().n_cells,
        "cached_prompts": v.checked_prompts,
        "sources": sorted(set(record.sources.values())),
        "failures": v.failures,
    }
    if v.failures:
        return "fail", "; ".join(v.failures[:3]), details
    if v.skipped:
        return "skip", v.skipped, details
    if not record.rows:
        return "skip", "the coordinator sent no behaviour row (the run made no day)", details
    if kind == "table":
        return (
            "pass",
            f"each of the {v.checked_rows} rows the devices got is the public table file's row "
            "of its period",
            details,
        )
    return (
        "pass",
        f"each of the {v.checked_prompts} cached prompts is a grid cell's question with a "
        f"period's public numbers (recomputed from the opened aggregates), and each of the "
        f"{v.checked_rows} rows the devices got is the model's answers to them",
        details,
    )
