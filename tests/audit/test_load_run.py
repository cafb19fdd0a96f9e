"""Loading a run directory: missing pieces are named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from audit.load import load_run
from audit.views import AuditInputError
from contract.runspec import RunSpec
from contract.transcript import create_auditor_keys
from decentsim.commands import audit as cli


def test_missing_run_spec_and_transcript_are_named(tmp_path: Path) -> None:
    with pytest.raises(AuditInputError, match="run spec not found"):
        load_run(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "run.json").write_text(RunSpec("synthetic:10", 1).to_json())
    create_auditor_keys(tmp_path / "audit")
    with pytest.raises(AuditInputError, match="not started with --audit-key"):
        load_run(tmp_path)
    # the CLI turns it into a one-line exit message
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(
        SystemExit, match=r"decentsim audit: .*coordinator\.transcript: no transcript"
    ):
        cli.run(parser.parse_args([str(tmp_path)]))
    with pytest.raises(SystemExit, match="--colluders ≥ 0"):
        cli.run(parser.parse_args([str(tmp_path), "--colluders", "-1"]))
