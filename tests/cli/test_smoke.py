"""Every ``decentsim`` command runs: ``--help`` of each command and subcommand, and the smallest
real run of each command the README shows (or the test elsewhere that runs it as a process).

:data:`COVERED` maps each command to the tests that run it; a test here parses the README's
"Command line" section and fails when it shows a command :data:`COVERED` lacks, so a command
cannot rot unseen.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from decentsim.cli import build_parser
from sim.archetypes import BehaviourTable, population_cells
from sim.populations import AGE_GROUPS, from_spec

from .conftest import ROOT, Outcome

#: README command -> the tests that run it, as ``path::name`` from the project root
COVERED: dict[str, tuple[str, ...]] = {
    "simulate": (
        "tests/cli/test_smoke.py::test_simulate_smallest_run",
        "tests/cli/test_smoke.py::test_simulate_astoria_as_in_the_readme",
        "tests/cli/test_smoke.py::test_simulate_with_a_behaviour_table",
        "tests/cli/test_smoke.py::test_simulate_with_a_language_model_then_from_its_cache",
        "tests/cli/test_real_model.py::test_simulate_asks_a_real_model_in_process_then_its_cache",
    ),
    "calibrate": (
        "tests/cli/test_smoke.py::test_calibrate_smallest_run",
        "tests/cli/test_smoke.py::test_calibrate_astoria_as_in_the_readme",
        "tests/cli/test_smoke.py::test_calibrate_to_employment_smallest_run",
        "tests/cli/test_smoke.py::test_calibrate_to_cases_and_queens_employment",
    ),
    "bench sim": ("tests/cli/test_smoke.py::test_bench_sim_smallest_run",),
    "bench securesum": ("tests/cli/test_smoke.py::test_bench_securesum_smallest_run",),
    "bench ble": ("tests/cli/test_smoke.py::test_bench_ble_smallest_run",),
    "bench cohorts": (
        "tests/cli/test_smoke.py::test_bench_cohorts_smallest_run",
        "tests/bench/test_bench_cohorts.py::"
        "test_an_ideal_radio_gives_every_group_its_central_contacts",
    ),
    "bench floor": ("tests/cli/test_smoke.py::test_bench_floor_smallest_run",),
    "bench pilot": ("tests/cli/test_smoke.py::test_bench_pilot_smallest_run",),
    "bench federated": ("tests/cli/test_smoke.py::test_bench_federated_smallest_run",),
    "bench vs-secaggplus": ("tests/cli/test_smoke.py::test_bench_vs_secaggplus_smallest_run",),
    "bench behaviour": (
        "tests/bench/test_bench_behaviour.py::"
        "test_smallest_run_counts_calls_and_its_cached_rerun_makes_none",
    ),
    "coordinator init": ("tests/cli/test_smoke.py::test_server_identities_and_tokens",),
    "coordinator tokens": ("tests/cli/test_smoke.py::test_server_identities_and_tokens",),
    "aggregator init": ("tests/cli/test_smoke.py::test_server_identities_and_tokens",),
    # Long process tests that exist already, not repeated here. `federated run` is
    # run_spec_from_args + launcher.run.federated_run: test_dp_run builds its spec from the
    # command's own arguments; test_federation runs federated_run over gRPC and test_flower over
    # Flower (--transport flower).
    "federated run": (
        "tests/audit/test_dp_run.py::test_a_dp_run_reports_its_guarantee_and_fidelity_cost",
        "tests/launcher/test_federation.py::test_federated_run_equals_central",
        "tests/launcher/test_flower.py::test_flower_transport_equals_grpc",
        "tests/cli/test_federated_behaviour.py::"
        "test_federated_run_with_a_table_samples_on_the_devices_and_audits",
        "tests/launcher/test_behaviour_federation.py::"
        "test_an_llm_run_asks_per_cell_and_samples_on_the_devices",
        "tests/cli/test_real_model.py::test_a_federation_asks_a_real_model_in_its_coordinator",
        "tests/cli/test_record_views.py::test_a_run_records_no_transcript_unless_asked",
    ),
    # launcher.federation.Federation starts these as `python -m decentsim …` processes
    "coordinator serve": ("tests/launcher/test_federation.py::test_federated_run_equals_central",),
    "aggregator serve": ("tests/launcher/test_federation.py::test_federated_run_equals_central",),
    "device-agent run": (
        "tests/launcher/test_federation.py::test_federated_run_equals_central",
        "tests/launcher/test_hybrid_run.py::"
        "test_hybrid_run_equals_the_central_simulator_on_the_realised_contacts",
    ),
    # pilots: the radio hub and pilot radios as real processes, and a hybrid run's pilots
    "radio-hub": (
        "tests/device_agent/test_pilot_radio.py::test_pilots_hear_the_schedule_through_the_hub",
        "tests/launcher/test_hybrid_run.py::test_pilot_contacts_follow_the_schedule",
    ),
    "device-agent radio": (
        "tests/device_agent/test_pilot_radio.py::test_pilots_hear_the_schedule_through_the_hub",
        "tests/protocols/ble/test_ble_bluez.py::test_device_agent_radio_advertises_through_bluez",
    ),
    "pilot init": (
        "tests/cli/test_pilot.py::test_pilot_init_writes_the_run_with_its_pilots_and_clock",
    ),
    "pilot enrol": (
        "tests/cli/test_pilot.py::test_pilot_enrol_writes_a_bound_uri_and_its_qr_code",
        "tests/launcher/test_hybrid_run.py::test_the_operator_sees_the_fleet_and_no_contact_counts",
    ),
    "pilot status": (
        "tests/cli/test_pilot.py::test_pilot_status_needs_a_coordinator_database",
        "tests/launcher/test_hybrid_run.py::test_the_operator_sees_the_fleet_and_no_contact_counts",
    ),
    "device-agent calibration": (
        "tests/device_agent/test_calibration.py::test_a_session_measures_the_correction_a_radio_needs",
    ),
    "device-agent trace": (
        "tests/device_agent/test_pilot_radio.py::test_the_device_prints_its_own_trace",
    ),
    # runs the audit command's run() on real federations
    "audit": ("tests/audit/test_audit_runs.py::test_audit_of_the_four_modes",),
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser`` (empty for a leaf command)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_of(words: list[str]) -> str:
    """The command a ``decentsim WORDS`` line runs, e.g. ``coordinator tokens``."""
    parser: argparse.ArgumentParser = build_parser(words)
    path: list[str] = []
    while sub := _subcommands(parser):
        word = words[len(path)]
        assert word in sub, f"unknown command {' '.join([*path, word])!r}"
        parser = sub[word]
        path.append(word)
    return " ".join(path)


def all_commands() -> list[str]:
    """Every command and subcommand the parser knows (each parser built with it chosen, as
    the CLI builds it: a command's own arguments are added only when it runs)."""
    found: list[str] = []

    def walk(path: list[str]) -> None:
        parser: argparse.ArgumentParser = build_parser(path)
        for word in path:
            parser = _subcommands(parser)[word]
        sub = _subcommands(parser)
        if not sub:
            found.append(" ".join(path))
        for name in sub:
            walk([*path, name])

    walk([])
    return found


def readme_commands() -> list[list[str]]:
    """The ``decentsim …`` lines of the README's "Command line" code blocks, continuation
    lines joined, comments dropped and optional ``[…]`` parts kept as given, without the
    leading ``decentsim``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(line[4:] for line in section.splitlines() if line.startswith("    "))
    joined = re.sub(r"\\\n\s*", "", code)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line.startswith("decentsim "):
            commands.append(line.replace("[", "").replace("]", "").split()[1:])
    return commands


def test_the_readme_shows_commands() -> None:
    """The parser of the README below still finds its commands."""
    assert len(readme_commands()) >= 15


@pytest.mark.parametrize("words", readme_commands(), ids=" ".join)
def test_every_readme_command_has_a_test(words: list[str]) -> None:
    command = command_of(words)
    assert command in COVERED, f"`decentsim {command}` is in the README but no test runs it"


@pytest.mark.parametrize("words", readme_commands(), ids=" ".join)
def test_every_readme_command_parses(words: list[str]) -> None:
    """The README's options and arguments are still the command's (parsed, not run)."""
    try:
        build_parser(words).parse_args(words)
    except SystemExit as e:
        pytest.fail(f"the README's `decentsim {' '.join(words)}` does not parse (exit {e.code})")


@pytest.mark.parametrize("test", sorted({t for tests in COVERED.values() for t in tests}))
def test_every_covering_test_exists(test: str) -> None:
    path, _, name = test.partition("::")
    assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE), test


@pytest.mark.parametrize("command", all_commands())
def test_help(command: str, cli: Callable[..., Outcome]) -> None:
    done = cli(*command.split(), "--help")
    assert done.status == 0, done.err
    assert done.out.startswith(f"usage: decentsim {command}")
    assert done.err == ""


def test_top_level_help_as_a_process(process: Callable[..., Outcome]) -> None:
    done = process("--help")
    assert done.status == 0, done.err
    assert "usage: decentsim" in done.out
    for command in ("simulate", "calibrate", "federated", "audit", "bench"):
        assert command in done.out


def _json_line(done: Outcome) -> dict[str, object]:
    """The one JSON object a successful ``--json`` run or bench printed on stdout."""
    assert done.status == 0, done.err[-3000:]
    lines = done.out.splitlines()
    assert len(lines) == 1, done.out
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    return result


def test_simulate_smallest_run(cli: Callable[..., Outcome], tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = _json_line(
        cli("simulate", "--population", "synthetic:50", "--days", "1", "--json", "--out", str(out))
    )
    assert summary["agents"] == 50 and summary["days"] == 1
    for name in ("trajectory.csv", "summary.json", "stages.png", "daily.png", "by_age.png"):
        assert (out / name).is_file(), name


def test_simulate_astoria_as_in_the_readme(cli: Callable[..., Outcome], astoria_dir: Path) -> None:
    summary = _json_line(
        cli(
            "simulate", "--population", str(astoria_dir), "--days", "1", "--population-seeds",
            "--theta", "beta=0.0099", "--lockdown", "contacts_1:30:0.5", "--vaccinate", "45:0.3",
            "--json",
        )
    )  # fmt: skip
    assert summary["population"] == "astoria" and summary["days"] == 1


def test_calibrate_smallest_run(
    cli: Callable[..., Outcome], tmp_path: Path, tiny_target: Path
) -> None:
    out = tmp_path / "cal"
    result = _json_line(
        cli(
            "calibrate", "--population", "synthetic:50", "--target", str(tiny_target),
            "--filter", "region=X", "--days", "7", "--epochs", "1", "--out", str(out), "--json",
        )
    )  # fmt: skip
    assert result["periods"] == 1 and len(result["losses"]) == 1
    for name in ("theta.json", "loss.png", "fit.png"):
        assert (out / name).is_file(), name


def test_calibrate_astoria_as_in_the_readme(
    cli: Callable[..., Outcome], tmp_path: Path, astoria_dir: Path
) -> None:
    result = _json_line(
        cli(
            "calibrate", "--population", str(astoria_dir),
            "--target", str(astoria_dir / "nyc_neighborhood_weekly_cases.csv"),
            "--filter", "nta_id=QN0103", "--days", "7", "--epochs", "1",
            "--theta", "beta=0.01,init_frac=0.0003", "--out", str(tmp_path / "astoria"), "--json",
        )
    )  # fmt: skip
    assert result["population"] == "astoria" and result["periods"] == 1


def _table_for(population: str, path: Path, periods: int = 2) -> Path:
    """A behaviour table (CSV) of ``population``'s archetype grid: fixed probabilities away
    from 0 and 1, changing from period to period."""
    grid, _ = population_cells(from_spec(population, seed=0))
    cells = np.arange(grid.n_cells) % 7 / 20  # a spread in [0, 0.3]
    p = np.stack(
        [
            np.stack([0.1 + cells + 0.05 * (k % 5), 0.9 - cells - 0.1 * (k % 5)], -1)
            for k in range(periods)
        ]
    )
    BehaviourTable(grid, 7, p).save(path)
    return path


def test_simulate_with_a_behaviour_table(cli: Callable[..., Outcome], tmp_path: Path) -> None:
    table = _table_for("synthetic:300", tmp_path / "table.csv")
    out = tmp_path / "run"
    summary = _json_line(
        cli(
            "simulate", "--population", "synthetic:300", "--days", "10", "--theta",
            "beta=0.5,init_frac=0.02,shift_30t39=-1", "--behaviour", f"table:{table}",
            "--period", "week", "--work-layer", "work", "--grad", "forward", "--json",
            "--out", str(out),
        )
    )  # fmt: skip
    beh = summary["behaviour"]
    assert beh["kind"] == "table" and beh["source"] == f"table:{table}" and beh["periods"] == 2
    assert {f"shift_{g}" for g in AGE_GROUPS} <= set(summary["grad"])
    for name in ("trajectory.csv", "summary.json", "behaviour_table.csv", "employment.png"):
        assert (out / name).is_file(), name
    grid, _ = population_cells(from_spec("synthetic:300", seed=0))
    saved = BehaviourTable.load(out / "behaviour_table.csv", grid)
    assert saved.version == beh["table_version"]
    assert np.array_equal(saved.p, BehaviourTable.load(table, grid).p)
    employment = summary["daily"]["employment"]
    assert min(employment) > 0 and max(employment) < summary["labour_force"]


def test_simulate_with_a_language_model_then_from_its_cache(
    cli: Callable[..., Outcome], tmp_path: Path, small_population: Path, rule_backend
) -> None:
    """Against the rule backend (a deterministic rule, not a language model): the first run
    asks each of the 36 cells' two questions once per period; the second asks nothing and
    gives the same run."""
    cache = tmp_path / "cache"

    def run(out: str, *extra: str) -> dict[str, Any]:
        return _json_line(
            cli(
                "simulate", "--population", str(small_population), "--days", "20",
                "--population-seeds", "--theta", "beta=0.8", "--behaviour", "llm",
                "--llm-url", rule_backend.base_url, "--llm-model", "rule",
                "--llm-cache", str(cache), "--work-layer", "contacts_1", "--json",
                "--out", str(tmp_path / out), *extra,
            )
        )  # fmt: skip

    before = rule_backend.requests()
    first = run("first")
    asked = 2 * 36 * 3  # two questions, 36 cells, periods starting on days 0, 7 and 14
    assert first["behaviour"]["backend_calls"] == asked == rule_backend.requests() - before
    assert first["behaviour"]["source"] == f"llm:rule@{rule_backend.base_url}/chat/completions"
    assert sum(first["daily"]["new_infections"]) > 0
    second = run("second")
    assert second["behaviour"]["backend_calls"] == 0 and rule_backend.requests() - before == asked
    assert second["behaviour"]["cache_hits"] == asked
    assert second["daily"] == first["daily"]
    assert second["behaviour"]["table_version"] == first["behaviour"]["table_version"]
    for name in ("trajectory.csv", "behaviour_table.csv"):
        assert (tmp_path / "second" / name).read_text() == (tmp_path / "first" / name).read_text()
    # A stimulus is told to the model: new questions for the periods of its month (0).
    paid = run("paid", "--stimulus", "0:600")
    assert paid["behaviour"]["backend_calls"] == asked
    assert paid["behaviour"]["stimuli"] == [{"month": 0, "amount": 600.0}]
    assert paid["behaviour"]["table_version"] != first["behaviour"]["table_version"]


def test_calibrate_to_employment_smallest_run(cli: Callable[..., Outcome], tmp_path: Path) -> None:
    table = _table_for("synthetic:200", tmp_path / "table.csv", periods=10)
    labour = tmp_path / "labour.csv"
    labour.write_text(
        "year,month,labor_force,employed,unemployed,unemployment_rate\n"
        "2020,2,100,95,5,5\n2020,3,100,94,6,6\n2020,4,100,80,20,20\n"
    )
    out = tmp_path / "cal"
    for mode in ("params", "network"):  # both fit the alignment
        result = _json_line(
            cli(
                "calibrate", "--population", "synthetic:200", "--behaviour", f"table:{table}",
                "--target-employment", str(labour), "--epochs", "1", "--mode", mode,
                "--fit", "beta,scale_20t29,shift_30t39", "--out", str(out), "--json",
            )
        )  # fmt: skip
        assert result["days"] == 90 and result["target"] is None
        employment = result["employment"]
        assert employment["months"] == ["2020-02", "2020-03", "2020-04"]
        assert len(employment["observed_change_pct"]) == 2
        assert len(employment["simulated_change_pct"]) == 2
        assert employment["pearson"] is None  # two changes: the correlation is undefined
        assert len(result["losses"]) == 1
        for name in ("theta.json", "loss.png", "employment_fit.png"):
            assert (out / name).is_file(), name
        assert not (out / "fit.png").exists()


def test_calibrate_to_cases_and_queens_employment(
    cli: Callable[..., Outcome], tmp_path: Path, astoria_dir: Path
) -> None:
    """Astoria's cases and Queens County's labour force together, with a behaviour table: the
    report gives the Pearson correlation of simulated and observed month-on-month employment
    change."""
    table = _table_for("synthetic:300", tmp_path / "table.csv", periods=20)
    done = cli(
        "calibrate", "--population", "synthetic:300", "--behaviour", f"table:{table}",
        "--target", str(astoria_dir / "nyc_neighborhood_weekly_cases.csv"),
        "--filter", "nta_id=QN0103",
        "--target-employment", str(astoria_dir / "queens_labor_force.csv"),
        "--employment-from", "2020-08", "--employment-weight", "0.5", "--days", "120",
        "--epochs", "1", "--fit", "beta,shift_20t29", "--out", str(tmp_path / "cal"),
    )  # fmt: skip
    assert done.status == 0, done.err
    report = json.loads((tmp_path / "cal" / "theta.json").read_text())
    employment = report["employment"]
    assert employment["months"] == ["2020-08", "2020-09", "2020-10", "2020-11"]
    assert report["periods"] == 17 and report["days"] == 120 and employment["weight"] == 0.5
    assert isinstance(employment["pearson"], float) and -1 <= employment["pearson"] <= 1
    assert f"= {employment['pearson']:.3f}" in done.out.splitlines()[-1]
    assert (tmp_path / "cal" / "fit.png").is_file()


def test_server_identities_and_tokens(cli: Callable[..., Outcome], tmp_path: Path) -> None:
    c, a = tmp_path / "C", tmp_path / "A"
    assert cli("coordinator", "init", "--state-dir", str(c)).status == 0
    assert (c / "export" / "ca.pem").is_file()
    assert (c / "export" / "coordinator_public.json").is_file()
    assert cli("aggregator", "init", "--state-dir", str(a)).status == 0
    assert (a / "export" / "ca.pem").is_file()
    done = cli("coordinator", "tokens", "--state-dir", str(c), "--count", "2")
    assert done.status == 0 and len(set(done.out.split())) == 2
    tokens = tmp_path / "tokens.txt"
    done = cli("coordinator", "tokens", "--state-dir", str(c), "--count", "1", "--out", str(tokens))
    assert done.status == 0 and done.out == ""
    assert len(tokens.read_text().split()) == 1 and tokens.stat().st_mode & 0o077 == 0


def test_bench_sim_smallest_run(cli: Callable[..., Outcome]) -> None:
    result = _json_line(cli("bench", "sim", "--agents", "2", "--degree", "1", "--steps", "1"))
    assert result["edges"] == 2
    for key in ("forward", "tangent", "reverse"):
        assert f"interactions_per_s_{key}" in result


def test_bench_securesum_smallest_run(cli: Callable[..., Outcome]) -> None:
    result = _json_line(
        cli("bench", "securesum", "--devices", "1", "--dim", "1", "--items-per-device", "1")
    )
    assert result["exact"] is True and result["items"] == 1
    dense = _json_line(
        cli(
            "bench",
            "securesum",
            "--devices",
            "4",
            "--dim",
            "2",
            "--items-per-device",
            "2",
            "--mode",
            "dense",
            "--devices-per-participant",
            "2",
        )
    )
    assert dense["exact"] is True and dense["participants"] == 2 and dense["sealed_envelopes"] == 2


def test_bench_ble_smallest_run(cli: Callable[..., Outcome]) -> None:
    result = _json_line(cli("bench", "ble", "--contacts", "1"))
    assert result["contacts"] == 1


def test_bench_cohorts_smallest_run(cli: Callable[..., Outcome]) -> None:
    result = _json_line(
        cli("bench", "cohorts", "--population", "synthetic:50", "--days", "1", "--radio", "ideal")
    )
    assert result["device_days"] == 50 and result["min_cohort"] == 5
    # an ideal radio hears every contact: each group sums exactly the agent's central contacts
    assert result["groups_below_2_contacts"] == result["central_below_2_contacts"]


def test_bench_floor_smallest_run(cli: Callable[..., Outcome]) -> None:
    result = _json_line(
        cli("bench", "floor", "--devices", "20", "--participants", "3", "--repeats", "1")
    )
    assert result["items"] == 20 * 27 and result["participants"] == 3
    # registration (4 slots) and padded posts (27 items of a slot id and 4 words), per device
    assert result["day_bytes"] == 20 * (4 * 8 + 27 * (8 + 4 * 8))
    parts = ("aes_ctr_expand_s", "slot_sums_s", "slot_lookup_s", "x25519_s", "loopback_s")
    assert all(result[p] >= 0 for p in parts)
    total = sum(result[p] for p in parts) + result["slot_sums_s"] + result["slot_lookup_s"]
    assert result["floor_per_day_s"] == pytest.approx(total, abs=1e-3)


@pytest.mark.slow
def test_bench_federated_smallest_run(process: Callable[..., Outcome]) -> None:
    """Starts the coordinator, the aggregator and one pool as processes (about 10 s)."""
    result = _json_line(
        process(
            "bench", "federated", "--population", "synthetic:60", "--days", "1", "--pools", "1",
            timeout=300,
        )
    )  # fmt: skip
    assert result["agents"] == 60 and result["pools"] == 1
    assert result["equal_daily"] is True


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_bench_vs_secaggplus_smallest_run(process: Callable[..., Outcome]) -> None:
    """Starts Ray (about 10 s): SecAgg+ needs 3 clients at least."""
    result = _json_line(
        process(
            "bench", "vs-secaggplus", "--clients", "3", "--dim", "1", "--rounds", "1",
            "--warmup", "0", timeout=300,
        )
    )  # fmt: skip
    assert result["clients"] == 3 and result["rounds"] == 1
    assert result["secaggplus_max_abs_error"] <= result["secaggplus_error_bound"]
    assert result["decentsim_max_abs_error"] <= result["decentsim_error_bound"]


def test_the_pilot_systemd_unit_runs_a_command_that_parses() -> None:
    """deploy/pilot's unit starts `decentsim device-agent run` as a pilot, with options that
    still parse (its ${VARIABLES} filled in as /etc/decentsim/pilot.env would)."""
    unit = (ROOT / "deploy" / "pilot" / "decentsim-pilot.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit, re.MULTILINE | re.DOTALL)
    assert exec_start is not None
    line = re.sub(r"\\\n\s*", "", exec_start.group(1))
    env = {"HCI": "usb:0", "POPULATION": "synthetic:20", "WORLD_SECRET": "/etc/ws"}
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line)
    words = line.split()[1:]  # after the decentsim executable
    assert command_of(words) == "device-agent run"
    args = build_parser(words).parse_args(words)
    assert (args.radio, args.hci) == ("bumble", "usb:0")
    assert str(args.enrolment_uri) == "/etc/decentsim/pilot.uri"


def test_bench_pilot_smallest_run(process: Callable[..., Outcome]) -> None:
    """Two pilot processes over the radio hub for one protocol day at 8640× (10 s)."""
    done = process(
        "bench", "pilot", "--pilots", "2", "--days", "1", "--scale", "8640", "--agents", "30",
        timeout=300,
    )  # fmt: skip
    assert done.status == 0, done.err
    out = json.loads(done.out)
    assert set(out) == {
        "pilots", "days", "scale", "contacts_scheduled", "contacts_recovered",
        "weight_rel_error_median", "cpu_s_per_pilot_day", "rss_mb_per_pilot",
        "rss_mb_torch_import", "wall_s",
    }  # fmt: skip
    assert out["pilots"] == 2 and out["contacts_scheduled"] >= 2
    assert 0 <= out["contacts_recovered"] <= out["contacts_scheduled"]
    assert out["rss_mb_per_pilot"] > out["rss_mb_torch_import"] > 0
    assert out["cpu_s_per_pilot_day"] > 0
