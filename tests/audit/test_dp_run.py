"""End to end: a federated run with ``--dp-sigma`` (processes, gRPC, TLS), audited by the CLI.

Both servers add their part of the noise to every opened daily aggregate; the audit's DP check
states (ε, δ) for the run's releases and measures the fidelity cost against the pools' own
totals, which must be consistent with the configured σ. A run whose spec claims more noise
than the servers added fails the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from audit.checks import Status, check_dp
from audit.load import load_run
from audit.views import AuditInput, TrueItem, Truth
from contract.schedule import observations_dim
from decentsim.commands import audit as cli
from decentsim.commands.federated import add_federated_arguments, run_spec_from_args
from launcher.run import federated_run

POPULATION = "synthetic:300"
SIGMA = 0.5


@pytest.mark.slow
@pytest.mark.xdist_group("audit-e2e")
def test_a_dp_run_reports_its_guarantee_and_fidelity_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_federated_arguments(parser)
    args = parser.parse_args(
        ["run", "--population", POPULATION, "--days", "3", "--seed", "3", "--pools", "2",
         "--theta", "beta=0.6,mortality=0.01,init_frac=0.05", "--step-timeout", "60",
         "--dp-sigma", str(SIGMA), "--dp-delta", "1e-6", "--dp-sensitivity", "2.0"]
    )  # fmt: skip
    spec = run_spec_from_args(args)
    assert spec.dp == {"sigma": SIGMA, "delta": 1e-6, "l2_sensitivity": 2.0}
    out = tmp_path / "dp"
    summary = federated_run(spec, out, population_seed=3, timeout_s=300, record_views=True)
    assert summary["daily"] and all(len(s) == 3 for s in summary["daily"].values())
    # the noisy daily totals are not the integers an exact run opens
    totals = [v for series in summary["daily"].values() for v in series]
    assert any(abs(v - round(v)) > 1e-6 for v in totals)

    cli_parser = argparse.ArgumentParser()
    cli.add_arguments(cli_parser)
    capsys.readouterr()
    rc = cli.run(cli_parser.parse_args([str(out), "--role", "coordinator", "--json"]))
    data = json.loads(capsys.readouterr().out)
    checks = {c["key"]: c for c in data["checks"]}
    assert rc == 0 and data["verdict"] == "pass", [
        (k, c["status"], c["summary"]) for k, c in checks.items()
    ]
    dp = checks["dp"]
    assert dp["status"] == "pass", dp["summary"]
    privacy = dp["details"]["privacy"]
    assert privacy["releases"] == 3  # one opening of global/day/<d> per committed day
    assert privacy["delta"] == 1e-6 and privacy["sigma_total"] == pytest.approx(SIGMA)
    eps = {k: v for k, v in privacy.items() if k.startswith("epsilon_")}
    assert len(eps) == 4 and all(0 < v < float("inf") for v in eps.values())
    # one server alone faces σ/√2: its ε is larger than the public one
    assert privacy["epsilon_server_discrete_rdp"] > privacy["epsilon_public_discrete_rdp"]
    cost = dp["details"]["fidelity_vs_truth"]
    assert cost["days"] == 3 and cost["n"] == 3 * privacy["coordinates"]
    assert cost["expected_rms_error"] == pytest.approx(SIGMA)
    assert cost["consistent_with_sigma"] is True
    assert 0.6 * SIGMA < cost["rms_error"] < 1.4 * SIGMA
    assert (out / "audit" / "coordinator" / "dp.png").exists()
    for key in ("uniformity", "secrets", "profile"):
        assert checks[key]["status"] == "pass", checks[key]["summary"]

    # the aggregator's audit counts the same releases from its own transcript (the requests it
    # received); the observed noise is measured by the coordinator's, which opens it
    rc = cli.run(cli_parser.parse_args([str(out), "--role", "aggregator", "--json"]))
    a_dp = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["key"] == "dp")
    assert rc == 0 and a_dp["status"] == "pass", a_dp["summary"]
    assert a_dp["details"]["privacy"] == privacy and "fidelity_vs_truth" not in a_dp["details"]

    # a run that claims 4× the noise the servers added fails the DP check
    inp = load_run(out, "coordinator")
    claimed = dict(inp.config["dp"], sigma=4 * SIGMA)
    lie = check_dp(dataclasses.replace(inp, config={**inp.config, "dp": claimed}))
    assert lie.status is Status.FAIL and "INCONSISTENT with the configured σ" in lie.summary


def _run_dir_with_noise(tmp_path: Path, noise_sigma: float) -> tuple[Path, Truth]:
    """A run dir whose C committed 3 days = the 2 pools' totals + N(0, noise_sigma²) noise."""
    rng = np.random.default_rng(11)  # test data only
    dim = observations_dim()
    db_dir = tmp_path / "state" / "coordinator"
    db_dir.mkdir(parents=True)
    conn = sqlite3.connect(db_dir / "coordinator.sqlite3")
    conn.execute("CREATE TABLE days (round_id INTEGER, y BLOB)")
    items = []
    for rid in (4, 5, 6):
        vals = [rng.integers(0, 5, dim).astype(np.float64) for _ in range(2)]
        items += [
            TrueItem("aggregates", rid, bytes([p]) * 16, b"s" * 8, v) for p, v in enumerate(vals)
        ]
        opened = vals[0] + vals[1] + rng.normal(0.0, noise_sigma, dim)
        conn.execute("INSERT INTO days VALUES (?, ?)", (rid, opened.astype("<f8").tobytes()))
    conn.commit()
    conn.close()
    return tmp_path, Truth.from_items(items, {bytes([0]) * 16: 0, bytes([1]) * 16: 1})


def test_the_dp_check_measures_the_noise_against_the_truth(
    tmp_path: Path, mailbox: dict[str, AuditInput]
) -> None:
    run_dir, truth = _run_dir_with_noise(tmp_path, SIGMA)
    conf = {"sigma": SIGMA, "delta": 1e-6, "l2_sensitivity": 1.0}
    inp = dataclasses.replace(
        mailbox["coordinator"], truth=truth, source=str(run_dir), config={"dp": conf, "days": 3}
    )
    r = check_dp(inp)
    assert r.status is Status.PASS, r.summary
    cost = r.details["fidelity_vs_truth"]
    assert cost["days"] == 3 and cost["n"] == 3 * observations_dim()
    assert cost["consistent_with_sigma"] is True
    assert cost["rms_error"] == pytest.approx(SIGMA, rel=0.25)
    assert r.plot["dp_errors"]["sigma"] == SIGMA and len(r.plot["dp_errors"]["errors"]) == cost["n"]
    # claiming more (or less) noise than the opened aggregates carry fails the check
    for claimed in (4 * SIGMA, SIGMA / 4):
        lie = check_dp(dataclasses.replace(inp, config={"dp": {**conf, "sigma": claimed}}))
        assert lie.status is Status.FAIL, claimed
        assert "INCONSISTENT with the configured σ" in lie.summary
    # without C's database (not a run dir) only the configured σ is stated
    bare = check_dp(dataclasses.replace(inp, source="crafted"))
    assert bare.status is Status.PASS and "fidelity_vs_truth" not in bare.details
