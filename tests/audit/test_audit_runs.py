"""End to end: real federations (processes, gRPC, TLS) in each mode, audited by the CLI.

The issue's acceptance: on ``plaintext`` the audit FAILS (uniformity and reconstruction); on
``mailbox`` it passes the value checks and reports the graph leakage; on ``shuffled`` it
passes every check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from contract.runspec import RunSpec
from decentsim.commands import audit as cli
from launcher.federation import items_budget
from launcher.run import federated_run
from sim.populations import from_spec

POPULATION = "synthetic:300"


def _audit(tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    spec = RunSpec(
        population=POPULATION,
        days=3,
        seed=3,
        mode=mode,
        theta={"beta": 0.6, "mortality": 0.01, "init_frac": 0.05},
        items_per_device=items_budget(from_spec(POPULATION, seed=3), 2),
        advertising_intervals=4,
        radio="ideal",
        pools=2,
        step_timeout_s=60.0,
    )
    out = tmp_path / mode
    federated_run(spec, out, population_seed=3, timeout_s=300)
    assert (out / "views" / "coordinator.transcript").exists()
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    capsys.readouterr()
    rc = cli.run(parser.parse_args([str(out), "--json"]))
    data = json.loads(capsys.readouterr().out)
    assert (out / "audit" / "report" / "report.html").exists()
    return rc, {c["key"]: c for c in data["checks"]} | {"verdict": data["verdict"]}


@pytest.mark.slow
@pytest.mark.xdist_group("audit-e2e")
def test_audit_of_the_three_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, plain = _audit(tmp_path, "plaintext", capsys)
    assert rc == 1 and plain["verdict"] == "fail"
    assert plain["uniformity"]["status"] == "fail"
    assert plain["reconstruction"]["status"] == "fail"
    assert plain["reconstruction"]["details"]["attackers"]["coordinator"]["recovered_nonzero"] > 0

    rc, mb = _audit(tmp_path, "mailbox", capsys)
    assert rc == 0 and mb["verdict"] == "pass"
    assert mb["uniformity"]["status"] == "pass"
    assert mb["reconstruction"]["status"] in ("pass", "leak")
    att = mb["reconstruction"]["details"]["attackers"]
    assert att["coordinator"]["recovered_nonzero"] == att["aggregator"]["recovered_nonzero"] == 0
    assert att["coordinator + aggregator"]["rate"] == 1.0
    assert mb["linkage"]["status"] == "leak"
    assert mb["linkage"]["details"]["servers"]["coordinator"]["recall"] == 1.0
    assert mb["secrets"]["status"] == "pass" and mb["profile"]["status"] == "pass"

    rc, sh = _audit(tmp_path, "shuffled", capsys)
    assert rc == 0 and sh["verdict"] == "pass"
    assert all(sh[k]["status"] != "fail" for k in sh if k != "verdict")
    assert sh["linkage"]["status"] == "pass"
    assert sh["uniformity"]["status"] == "pass"
