"""Prompt templates: one question per behaviour, asked of a language model once per archetype
cell and period.

**What a prompt holds.** A prompt is rendered from exactly two things: a cell's public attribute
levels (``ArchetypeGrid.cell``: age group, gender, occupation major group, area, income band —
whichever the grid has) and the period's :class:`sim.archetypes.PublicNumbers` (opened
aggregates and public policy). Nothing else reaches :meth:`PromptTemplates.render`, so no agent
id, no individual attribute and no individual outcome can enter a prompt; the model learns only
what the public table already says about a cell and what the run publishes anyway.

**Fields** a template may name (``{name}``, as :meth:`str.format`, no format specs):

- cell: ``age`` (``30 to 39``), ``gender`` (``female``), ``occupation`` (the SOC major group's
  title, ``sales``), ``area``, ``income`` (``$50,000 to $100,000``), and ``person``: every
  attribute the grid has in one phrase (``a woman aged 30 to 39, working in sales, living in
  QN0103, with an annual household income of $50,000 to $100,000``);
- public: ``cases`` (new cases in the previous period), ``change`` (their % change), ``months``
  (since the start), ``payment`` (the stimulus, US dollars) and ``stimulus`` (the sentence
  ``You received a stimulus payment of $500 this month.`` and a space, or nothing).

A template naming any other field, or an attribute the grid lacks, is a :class:`TemplateError`
that names the field.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass

from behaviour.errors import TemplateError
from sim.archetypes import (
    BEHAVIOURS,
    INCOME_BANDS,
    INCOME_BOUNDS,
    NO_OCCUPATION,
    SOC_MAJOR_GROUPS,
    ArchetypeGrid,
    PublicNumbers,
)

#: Cell fields, and the grid attribute each one needs (``person`` adapts to the grid).
CELL_FIELDS: dict[str, str | None] = {
    "age": "age_group",
    "gender": "gender",
    "occupation": "occupation",
    "area": "area",
    "income": "income",
    "person": None,
}
#: Fields from the period's public numbers.
PUBLIC_FIELDS: tuple[str, ...] = ("cases", "change", "months", "payment", "stimulus")
FIELDS: tuple[str, ...] = (*CELL_FIELDS, *PUBLIC_FIELDS)

_SITUATION = (
    "You are {person}. It has been {months} months since the epidemic began. The number of new "
    "cases in your neighbourhood is {cases}, a {change}% change from the previous period. "
    "{stimulus}"
)
#: The seed talk's isolation question.
ISOLATE_TEMPLATE = _SITUATION + "Do you choose to isolate at home? Answer Yes or No."
#: The seed talk's work question.
WORK_TEMPLATE = _SITUATION + "Do you choose to go to work? Answer Yes or No."

_AGES = {
    "U19": "19 or younger",
    "20t29": "20 to 29",
    "30t39": "30 to 39",
    "40t49": "40 to 49",
    "50t64": "50 to 64",
    "65A": "65 or older",
}
_NOUNS = {"female": "woman", "male": "man"}


def _income(band: str) -> str:
    i = INCOME_BANDS.index(band)
    if i == 0:
        return f"under ${INCOME_BOUNDS[1]:,.0f}"
    if i == len(INCOME_BANDS) - 1:
        return f"${INCOME_BOUNDS[i]:,.0f} or more"
    return f"${INCOME_BOUNDS[i]:,.0f} to ${INCOME_BOUNDS[i + 1]:,.0f}"


def _number(x: float) -> str:
    """One decimal at most, none when whole: ``12``, ``-7.5``."""
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _money(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


def cell_values(cell: Mapping[str, str]) -> dict[str, str]:
    """The cell fields of one cell (its level labels, as ``ArchetypeGrid.cell`` gives them)."""
    out: dict[str, str] = {}
    if "age_group" in cell:
        out["age"] = _AGES.get(cell["age_group"], cell["age_group"])
    if "gender" in cell:
        out["gender"] = cell["gender"]
    if "occupation" in cell:
        code = cell["occupation"]
        out["occupation"] = "no occupation" if code == NO_OCCUPATION else SOC_MAJOR_GROUPS[code]
    if "area" in cell:
        out["area"] = cell["area"]
    if "income" in cell:
        out["income"] = _income(cell["income"])
    person = f"a {_NOUNS.get(cell.get('gender', ''), 'person')}"
    if "age" in out:
        person += f" aged {out['age']}"
    if "occupation" in cell:
        person += (
            ", without an occupation"
            if cell["occupation"] == NO_OCCUPATION
            else f", working in {out['occupation']}"
        )
    if "area" in out:
        person += f", living in {out['area']}"
    if "income" in out:
        person += f", with an annual household income of {out['income']}"
    out["person"] = person
    return out


def public_values(public: PublicNumbers) -> dict[str, str]:
    """The public fields of one period."""
    payment = _money(public.stimulus)
    return {
        "cases": f"{round(public.cases):,d}",
        "change": _number(public.change_pct),
        "months": _number(public.months_since_start),
        "payment": payment,
        "stimulus": (
            f"You received a stimulus payment of ${payment} this month. "
            if public.stimulus > 0
            else ""
        ),
    }


def _fields(behaviour: str, template: str) -> set[str]:
    """The fields a template names; raises on anything but plain known ``{name}`` fields."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"template {behaviour!r}: {e}") from None
    names: set[str] = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            raise TemplateError(
                f"template {behaviour!r}: unknown field {{{name}}}; known: {list(FIELDS)}"
            )
        if spec or conversion:
            raise TemplateError(
                f"template {behaviour!r}: field {{{name}}} has a format spec or conversion "
                "(values come formatted)"
            )
        names.add(name)
    return names


@dataclass(frozen=True)
class PromptTemplates:
    """The question for each behaviour (:data:`sim.archetypes.BEHAVIOURS`), overridable.

    Attributes:
        isolate: the isolation question (a template with named fields, see the module doc).
        work: the work question.

    Raises:
        TemplateError: a template names an unknown field (the message names it).
    """

    isolate: str = ISOLATE_TEMPLATE
    work: str = WORK_TEMPLATE

    def __post_init__(self) -> None:
        # Validated on construction, so a bad template fails before any backend call.
        for behaviour, template in self.by_behaviour().items():
            _fields(behaviour, template)

    def by_behaviour(self) -> dict[str, str]:
        """Behaviour → template, in :data:`~sim.archetypes.BEHAVIOURS` order."""
        return {"isolate": self.isolate, "work": self.work}

    def check(self, grid: ArchetypeGrid) -> None:
        """Raise :class:`TemplateError` if a template names an attribute ``grid`` lacks."""
        for behaviour, template in self.by_behaviour().items():
            for name in sorted(_fields(behaviour, template)):
                needs = CELL_FIELDS.get(name)
                if needs is not None and needs not in grid.names:
                    raise TemplateError(
                        f"template {behaviour!r}: field {{{name}}} needs attribute {needs!r}, "
                        f"which this grid lacks (it has {list(grid.names)})"
                    )

    def render(self, behaviour: str, cell: Mapping[str, str], public: PublicNumbers) -> str:
        """The prompt for one behaviour, cell (level labels) and period."""
        if behaviour not in BEHAVIOURS:
            raise TemplateError(f"unknown behaviour {behaviour!r}; known: {list(BEHAVIOURS)}")
        values = {**cell_values(cell), **public_values(public)}
        template = self.by_behaviour()[behaviour]
        missing = sorted(_fields(behaviour, template) - set(values))
        if missing:
            raise TemplateError(
                f"template {behaviour!r}: field {{{missing[0]}}} is not an attribute of "
                f"cell {dict(cell)}"
            )
        return template.format_map(values)

    def render_grid(self, grid: ArchetypeGrid, public: PublicNumbers) -> list[tuple[str, ...]]:
        """Every cell's prompts (one per behaviour, in BEHAVIOURS order), in cell order."""
        self.check(grid)
        return [tuple(self.render(b, cell, public) for b in BEHAVIOURS) for cell in grid.cells()]
