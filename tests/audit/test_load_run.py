"""Loading one server's view of a run directory: missing pieces are named, one audit opens only
its own server's transcript with that server's auditor key, and refuses the other's key."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from audit.checks import run_checks
from audit.load import CUT_SHORT, AuditKeyMismatch, load_run
from audit.views import AuditInputError
from contract.runspec import RunSpec
from contract.schedule import DEPLOYMENTS
from contract.transcript import (
    TranscriptWriter,
    create_auditor_keys,
    fingerprint,
    load_auditor_keypair,
    load_auditor_public,
)
from decentsim.cli import main
from decentsim.commands import audit as cli
from decentsim.usage import CommandFailed, UsageError
from protocols.secure_sum import KeyPair
from protocols.secure_sum.messages import DirectoryRequest

ROLES = ("coordinator", "aggregator")


def _run_dir(root: Path) -> Path:
    """A run dir as ``federated run`` leaves it, without pools: the run spec, and per server its
    keys, its transcript (sealed to its own auditor) and that auditor's key pair."""
    (root / "state").mkdir(parents=True)
    (root / "state" / "run.json").write_text(RunSpec("synthetic:10", 1).to_json())
    for role in ROLES:
        state = root / "state" / role
        state.mkdir()
        keys = {d: KeyPair.generate().private.private_bytes_raw().hex() for d in DEPLOYMENTS}
        (state / "keys.json").write_text(json.dumps(keys))
        (state / "keys.json").chmod(0o600)
        _, pub = create_auditor_keys(root / "audit", role)
        writer = TranscriptWriter(
            root / "views" / f"{role}.transcript", role, load_auditor_public(pub)
        )
        for rnd in (1, 2):
            writer.record("in", "neighbourhood", "ab" * 16, DirectoryRequest(rnd).to_bytes())
        writer.close()
    return root


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser


def test_missing_run_spec_and_transcript_are_named(tmp_path: Path) -> None:
    with pytest.raises(AuditInputError, match="nowhere: no such directory"):
        load_run(tmp_path / "nowhere", "coordinator")
    with pytest.raises(AuditInputError, match="run spec not found"):
        load_run(tmp_path, "coordinator")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "run.json").write_text(RunSpec("synthetic:10", 1).to_json())
    with pytest.raises(AuditInputError, match="did not record the servers' views"):
        load_run(tmp_path, "aggregator")
    with pytest.raises(AuditInputError, match="role must be one of coordinator, aggregator"):
        load_run(tmp_path, "auditor")
    # the CLI turns it into a one-line usage error (exit status 2)
    with pytest.raises(UsageError, match=r"coordinator\.transcript: no transcript"):
        cli.run(_parser().parse_args([str(tmp_path), "--role", "coordinator"]))


def test_bad_arguments_are_refused_while_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["RUN", "--role", "coordinator", "--colluders", "-1"],
        ["RUN", "--role", "coordinator", "--max-open", "0"],
        ["RUN", "--role", "both"],
        ["RUN"],  # one audit is one server's: --role is required
    ):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
    err = capsys.readouterr().err
    assert "--colluders" in err and "--max-open" in err and "--role" in err


def test_one_audit_opens_only_its_server_with_its_own_auditor_key(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    c_key, a_key = (run / "audit" / f"{role}-auditor.key" for role in ROLES)
    # the aggregator's transcript, keys and auditor key are out of the coordinator's audit
    (tmp_path / "away").mkdir()
    away = {
        p: tmp_path / "away" / p.name
        for p in (run / "views" / "aggregator.transcript", run / "state" / "aggregator", a_key)
    }
    for here, there in away.items():
        here.rename(there)
    inp = load_run(run, "coordinator")
    assert inp.role == "coordinator" and [r.round_id for r in inp.view.records] == [1, 2]
    assert inp.truth is None and not any("aggregator" in str(p) for p in inp.scan_files)
    audit = run_checks(inp)  # no pools: the checks that need ground truth skip
    assert audit.role == "coordinator" and audit.verdict == "pass"
    for here, there in away.items():
        there.rename(here)
    # the other server's auditor key does not open this server's transcript: both keys named
    with pytest.raises(AuditKeyMismatch) as e:
        load_run(run, "coordinator", a_key)
    for key in (a_key, c_key):
        assert fingerprint(load_auditor_keypair(key).public) in str(e.value)
    assert "does not open the coordinator's transcript" in str(e.value)
    # through the command line: one line on stderr, exit status 2
    assert main(["audit", str(run), "--role", "aggregator", "--auditor-key", str(c_key)]) == 2
    # the right key opens it, and a record cut short by a crash is counted, not used
    with (run / "views" / "aggregator.transcript").open("ab") as fh:
        fh.write(b"\x00\x00\x01\x00cut")
    inp = load_run(run, "aggregator")
    assert [r.round_id for r in inp.view.records] == [1, 2]
    assert run_checks(inp).unused == {"transcript": {CUT_SHORT: 1}}
    # a record that fails to authenticate is bad evidence: the audit cannot complete (exit 1)
    path = run / "views" / "coordinator.transcript"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CommandFailed, match="record 1 does not open"):
        cli.run(_parser().parse_args([str(run), "--role", "coordinator"]))
