"""End to end: real federations (processes, gRPC, TLS) in each mode, audited by the CLI — one
invocation per server, each holding only that server's auditor key.

The issue's acceptance: on ``plaintext`` the audit FAILS (uniformity and reconstruction); on
``mailbox`` it passes the value checks and reports the graph leakage; on ``shuffled`` and
``dense`` it passes every check. Each server's transcript is sealed to its own auditor, and one
server's audit runs with the other server's transcript, keys and auditor key out of reach.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from audit.load import load_run
from contract.runspec import RunSpec
from contract.transcript import (
    auditor_files,
    fingerprint,
    load_auditor_keypair,
    load_auditor_public,
    read_header,
)
from decentsim.commands import audit as cli
from decentsim.usage import UsageError
from launcher.federation import items_budget
from launcher.run import federated_run
from sim.populations import from_spec

from .conftest import colluding_recovery

POPULATION = "synthetic:300"
ROLES = ("coordinator", "aggregator")


@contextmanager
def _out_of_reach(paths: list[Path]) -> Iterator[None]:
    """Move ``paths`` away for the duration: whatever runs meanwhile cannot read them."""
    for p in paths:
        p.rename(p.with_name(p.name + ".away"))
    try:
        yield
    finally:
        for p in paths:
            p.with_name(p.name + ".away").rename(p)


def _other_server(out: Path, role: str) -> list[Path]:
    """The other server's transcript, private keys and auditor key."""
    other = ROLES[1 - ROLES.index(role)]
    return [
        out / "views" / f"{other}.transcript",
        out / "state" / other / "views" / f"{other}.transcript",
        out / "state" / other / "keys.json",
        auditor_files(out / "audit", other)[0],
    ]


def _audit(
    tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, dict[str, tuple[int, dict]]]:
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
    federated_run(spec, out, population_seed=3, timeout_s=300, record_views=True)
    # each server's transcript is sealed to its own auditor, and the two auditors differ
    sealed = {}
    for role in ROLES:
        got_role, sealed[role] = read_header(out / "views" / f"{role}.transcript")
        assert got_role == role
        assert sealed[role] == load_auditor_public(auditor_files(out / "audit", role)[1])
    assert sealed["coordinator"] != sealed["aggregator"]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    verdicts = {}
    for role in ROLES:
        capsys.readouterr()
        with _out_of_reach(_other_server(out, role)):
            rc = cli.run(parser.parse_args([str(out), "--role", role, "--json"]))
        data = json.loads(capsys.readouterr().out)
        assert data["role"] == role
        assert (out / "audit" / role / "report.html").exists()
        verdicts[role] = (rc, {c["key"]: c for c in data["checks"]} | {"verdict": data["verdict"]})
    return out, verdicts


@pytest.mark.slow
@pytest.mark.xdist_group("audit-e2e")
def test_audit_of_the_four_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, plain = _audit(tmp_path, "plaintext", capsys)
    for role in ROLES:
        rc, checks = plain[role]
        assert rc == 1 and checks["verdict"] == "fail"
        assert checks["uniformity"]["status"] == "fail"  # C: raw values; A: zeros
    c_plain = plain["coordinator"][1]["reconstruction"]
    assert c_plain["status"] == "fail"
    assert c_plain["details"]["attackers"]["coordinator"]["recovered_nonzero"] > 0

    out, mb = _audit(tmp_path, "mailbox", capsys)
    for role in ROLES:
        rc, checks = mb[role]
        assert rc == 0 and checks["verdict"] == "pass"
        assert checks["uniformity"]["status"] == "pass"
        recon = checks["reconstruction"]
        assert recon["status"] in ("pass", "leak")
        assert recon["details"]["attackers"][role]["recovered_nonzero"] == 0
        control = recon["details"]["control"]
        assert control["recovered"] == control["expected"] == control["units"] > 0
        assert checks["linkage"]["status"] == "leak"
        assert checks["linkage"]["details"]["servers"][role]["recall"] == 1.0
        assert checks["secrets"]["status"] == "pass" and checks["profile"]["status"] == "pass"
    # the C + A boundary, outside the product: this test holds both auditors' keys (as the
    # launcher of a one-machine simulation holds everything) and adds the two views' shares
    both = {role: load_run(out, role) for role in ROLES}
    assert colluding_recovery(both["coordinator"], both["aggregator"]) == 1.0
    # one server's audit refuses the other server's auditor key, naming both keys
    a_key = auditor_files(out / "audit", "aggregator")[0]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(UsageError, match=r"does not open the coordinator's transcript") as e:
        cli.run(parser.parse_args([str(out), "--role", "coordinator", "--auditor-key", str(a_key)]))
    assert fingerprint(load_auditor_keypair(a_key).public) in str(e.value)

    _, sh = _audit(tmp_path, "shuffled", capsys)
    for role in ROLES:
        rc, checks = sh[role]
        assert rc == 0 and checks["verdict"] == "pass"
        assert all(checks[k]["status"] != "fail" for k in checks if k != "verdict")
        assert checks["linkage"]["status"] == "pass"
        assert checks["uniformity"]["status"] == "pass"

    _, dense = _audit(tmp_path, "dense", capsys)
    for role in ROLES:
        rc, checks = dense[role]
        assert rc == 0 and checks["verdict"] == "pass"
        assert all(checks[k]["status"] != "fail" for k in checks if k != "verdict")
        # every participant's share of every slot: the complete poster↔slot graph, at chance
        link = checks["linkage"]["details"]["servers"][role]
        assert checks["linkage"]["status"] == "pass" and link["z"] == 0.0
        assert link["precision"] == link["chance_precision"]
        assert checks["uniformity"]["status"] == "pass"
