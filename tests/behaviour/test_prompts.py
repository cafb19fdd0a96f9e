"""Prompt templates: the seed talk's questions from a cell's public attributes and the period's
public numbers only; an unknown or unavailable field is a one-line error naming it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from behaviour import PromptTemplates, TemplateError
from behaviour.prompts import FIELDS
from sim.archetypes import (
    AGE_GROUPS,
    INCOME_BANDS,
    OCCUPATIONS,
    ArchetypeGrid,
    Attribute,
    PublicNumbers,
)

FULL = ArchetypeGrid(
    (
        Attribute("age_group", AGE_GROUPS),
        Attribute("gender", ("female", "male", "other")),
        Attribute("occupation", OCCUPATIONS),
        Attribute("area", ("QN0103",)),
        Attribute("income", INCOME_BANDS),
    )
)


def test_the_seed_talk_questions(public: Callable[..., PublicNumbers]) -> None:
    cell = {
        "age_group": "30t39",
        "gender": "female",
        "occupation": "41",
        "area": "QN0103",
        "income": "50k-100k",
    }
    isolate = PromptTemplates().render("isolate", cell, public(stimulus=1200))
    assert isolate == (
        "You are a woman aged 30 to 39, working in sales, living in QN0103, with an annual "
        "household income of $50,000 to $100,000. It has been 2 months since the epidemic "
        "began. The number of new cases in your neighbourhood is 120, a 15% change from the "
        "previous period. You received a stimulus payment of $1,200 this month. Do you choose "
        "to isolate at home? Answer Yes or No."
    )
    work = PromptTemplates().render("work", {**cell, "occupation": "none"}, public())
    assert "without an occupation" in work
    assert "stimulus" not in work
    assert work.endswith("Do you choose to go to work? Answer Yes or No.")


def test_the_person_adapts_to_the_grid(public: Callable[..., PublicNumbers]) -> None:
    prompt = PromptTemplates().render("isolate", {"age_group": "65A"}, public())
    assert prompt.startswith("You are a person aged 65 or older. It has been")


def test_every_cell_of_a_grid(public: Callable[..., PublicNumbers]) -> None:
    rows = PromptTemplates().render_grid(FULL, public())
    assert len(rows) == FULL.n_cells
    assert all(len(row) == 2 for row in rows)
    assert len({p for row in rows for p in row}) == 2 * FULL.n_cells


def test_custom_templates_with_every_field(public: Callable[..., PublicNumbers]) -> None:
    template = " ".join(f"{name}={{{name}}}" for name in FIELDS)
    templates = PromptTemplates(isolate=template, work="{age}: work?")
    cell = FULL.cell(0)
    prompt = templates.render("isolate", cell, public(stimulus=500.5))
    assert "age=19 or younger gender=female occupation=management" in prompt
    assert "income=under $25,000" in prompt
    assert "cases=120 change=15 months=2 payment=500.50" in prompt
    assert templates.render("work", cell, public()) == "19 or younger: work?"


@pytest.mark.parametrize("field", ["agent_id", "id", "soc_code", "0", ""])
def test_an_unknown_field_is_named(field: str) -> None:
    with pytest.raises(TemplateError) as e:
        PromptTemplates(work=f"Do you work, {{{field}}}? Answer Yes or No.")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"template 'work': unknown field {{{field}}}")


def test_a_field_the_grid_lacks_is_named(public: Callable[..., PublicNumbers]) -> None:
    grid = ArchetypeGrid((Attribute("age_group", AGE_GROUPS), Attribute("area", ("A",))))
    templates = PromptTemplates(isolate="You earn {income}. Isolate? Answer Yes or No.")
    with pytest.raises(TemplateError) as e:
        templates.render_grid(grid, public())
    assert str(e.value) == (
        "template 'isolate': field {income} needs attribute 'income', which this grid lacks "
        "(it has ['age_group', 'area'])"
    )
    with pytest.raises(TemplateError, match=r"field \{income\} is not an attribute of cell"):
        templates.render("isolate", grid.cell(0), public())


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{cases:>8} cases", "format spec or conversion"),
        ("{cases!r} cases", "format spec or conversion"),
        ("{age.upper} years", "unknown field {age.upper}"),
        ("{cases} cases {", "Single '{'"),
    ],
)
def test_templates_are_plain_named_fields(template: str, says: str) -> None:
    with pytest.raises(TemplateError, match="template 'isolate'") as e:
        PromptTemplates(isolate=template)
    assert says in str(e.value)


def test_an_unknown_behaviour(public: Callable[..., PublicNumbers]) -> None:
    with pytest.raises(TemplateError, match="unknown behaviour 'shop'"):
        PromptTemplates().render("shop", FULL.cell(0), public())
