"""``federated run --record-views``: recording the servers' sealed transcripts is an explicit
choice (they are as large as the traffic). Without it no transcript and no auditor key is
written, and ``decentsim audit`` says in one line how to record them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Outcome

RUN = ("federated", "run", "--population", "synthetic:60", "--days", "1", "--pools", "1")


@pytest.mark.slow
def test_a_run_records_no_transcript_unless_asked(
    cli: Callable[..., Outcome], tmp_path: Path
) -> None:
    plain = cli(*RUN, "--out", str(tmp_path / "plain"), "--json")
    assert plain.status == 0, plain.err
    assert json.loads(plain.out)["record_views"] is False
    assert not list((tmp_path / "plain").rglob("*.transcript"))
    assert not list((tmp_path / "plain").rglob("*-auditor.*"))
    # the event logs (identifiers, sizes, timing: never a share) are always kept
    assert (tmp_path / "plain" / "views" / "coordinator.jsonl").stat().st_size > 0
    audit = cli("audit", str(tmp_path / "plain"), "--role", "coordinator")
    assert audit.status != 0
    line = audit.error_line()
    assert "no transcript" in line and "--record-views" in line

    recorded = cli(*RUN, "--record-views", "--out", str(tmp_path / "rec"), "--json")
    assert recorded.status == 0, recorded.err
    assert json.loads(recorded.out)["record_views"] is True
    views = tmp_path / "rec" / "views"
    assert {p.name for p in views.glob("*.transcript")} == {
        "coordinator.transcript",
        "aggregator.transcript",
    }
    audit = cli("audit", str(tmp_path / "rec"), "--role", "aggregator", "--json")
    assert audit.status == 0, audit.err
    assert json.loads(audit.out)["role"] == "aggregator"
