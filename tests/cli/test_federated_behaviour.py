"""``decentsim federated run --behaviour …``: the same behaviour options as ``simulate``, the
table made by the coordinator and sampled on the devices, the run audited, and bad input
refused in one line before any process starts."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sim.archetypes import BehaviourTable, population_cells
from sim.populations import from_spec

from .conftest import Outcome

FED = ("federated", "run", "--days", "8", "--pools", "2", "--step-timeout", "60", "--record-views")


def _table(population: Path, path: Path, period_days: int = 7) -> Path:
    grid = population_cells(from_spec(str(population)))[0]
    rng = np.random.default_rng(1)
    BehaviourTable(grid, period_days, rng.uniform(0.2, 0.8, (2, grid.n_cells, 2))).save(path)
    return path


@pytest.mark.slow
def test_federated_run_with_a_table_samples_on_the_devices_and_audits(
    cli: Callable[..., Outcome], small_population: Path, tmp_path: Path
) -> None:
    table = _table(small_population, tmp_path / "table.csv")
    out = tmp_path / "run"
    pop = ("--population", str(small_population))
    r = cli(*FED, *pop, "--behaviour", f"table:{table}", "--work-layer", "contacts_1",
            "--out", str(out), "--json")  # fmt: skip
    assert r.status == 0, r.err
    summary = json.loads(r.out)
    assert summary["behaviour"]["kind"] == "table" and summary["behaviour"]["periods"] == 2
    work = summary["daily"]["employment"]
    assert min(work) < max(work)  # who works is each device's draw, day by day
    saved = BehaviourTable.load(out / "behaviour_table.csv", population_cells(
        from_spec(str(small_population)))[0])  # fmt: skip
    np.testing.assert_array_equal(saved.p, BehaviourTable.load(table, saved.grid).p)
    spec = json.loads((out / "state" / "run.json").read_text())
    assert spec["behaviour_table"] == str(table.resolve()) and spec["work_layer"] == "contacts_1"
    audit = cli("audit", str(out), "--role", "coordinator", "--json")
    report = json.loads(audit.out)
    checks = {c["key"]: c for c in report["checks"]}
    assert checks["behaviour"]["status"] == "pass", checks["behaviour"]["summary"]
    # the ground truth replays each device's draws from its period's row: every check runs
    assert audit.status == 0 and report["verdict"] == "pass", report
    recon = checks["reconstruction"]
    assert recon["details"]["attackers"]["coordinator"]["recovered_nonzero"] == 0
    # the audit's own control recovers every device's message: the truth is exact
    control = recon["details"]["control"]
    assert control["recovered"] == control["expected"] == control["units"] > 0
    assert "truth" not in report["unused"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_an_unreachable_model_fails_the_run_in_one_line(
    cli: Callable[..., Outcome], small_population: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    r = cli(*FED, "--population", str(small_population), "--behaviour", "llm", "--llm-url", url,
            "--llm-model", "m", "--llm-retries", "0", "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.status == 1
    line = r.error_line()
    assert url in line and "period 0" in line


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (("--behaviour", "llm"), "--llm-url"),
        (
            (
                "--behaviour",
                "llm",
                "--llm-url",
                "http://x/v1",
                "--llm-model",
                "m",
                "--llm-cache",
                "c",
            ),
            "--llm-cache",
        ),
        (("--stimulus", "0:600"), "--stimulus"),
        (("--period", "month"), "--period"),
        (("--behaviour", "table:nowhere.csv"), "nowhere.csv"),
        (("--behaviour", "table:T", "--work-layer", "commute"), "--work-layer"),
        (("--behaviour", "llm", "--llm-url", "ftp://x", "--llm-model", "m"), "--llm-url"),
        (
            (
                "--behaviour",
                "llm",
                "--llm-url",
                "http://x/v1",
                "--llm-model",
                "m",
                "--stimulus",
                "9:600",
            ),
            "--stimulus",
        ),
    ],
)
def test_bad_behaviour_options_are_refused_before_any_process(
    cli: Callable[..., Outcome],
    small_population: Path,
    tmp_path: Path,
    extra: tuple[str, ...],
    names: str,
) -> None:
    table = _table(small_population, tmp_path / "table.csv")
    args = [a.replace("table:T", f"table:{table}") for a in extra]
    out = tmp_path / "run"
    r = cli(*FED, "--population", str(small_population), *args, "--out", str(out))
    assert r.status == 2
    assert names in r.error_line()
    assert not (out / "state").exists()  # nothing was started


def test_a_table_missing_cells_is_named_with_its_file_and_line(
    cli: Callable[..., Outcome], small_population: Path, tmp_path: Path
) -> None:
    table = _table(small_population, tmp_path / "table.csv")
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:-1]) + "\n")  # the last cell of period 1 is gone
    r = cli(*FED, "--population", str(small_population), "--behaviour", f"table:{table}",
            "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.status == 2
    assert str(table) in r.error_line()
