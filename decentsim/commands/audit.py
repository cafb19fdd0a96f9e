"""``decentsim audit RUN_DIR``: audit a federated run's recorded views.

Reads the servers' sealed transcripts (opened with the run's auditor key), each server's own
keys, and the pools' stores as ground truth where present; runs every check of
:mod:`audit.checks`; writes ``audit.json``, ``report.md``, ``report.html`` and plots into
``--out`` (default ``RUN_DIR/audit/report``). Exits 1 if any check fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from audit.checks import add_dp_fidelity, add_fidelity, run_checks
from audit.load import load_run
from audit.report import write_report
from audit.views import AuditInputError
from contract.transcript import TranscriptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``audit RUN_DIR [--out DIR] [--json] …``."""
    p.add_argument("run_dir", type=Path, help="a `decentsim federated run` output directory")
    p.add_argument("--out", type=Path, help="report directory (default RUN_DIR/audit/report)")
    p.add_argument("--json", action="store_true", help="print the verdicts as one JSON object")
    p.add_argument(
        "--auditor-key", type=Path, help="auditor private key (default RUN_DIR/audit/auditor.key)"
    )
    p.add_argument(
        "--colluders", type=int, default=1, help="pools colluding with the coordinator (t)"
    )
    p.add_argument(
        "--cohort-k", type=int, default=2, help="report slots with fewer than k contributors"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="the same run without the protection (minimum cohort, DP noise): report the "
        "fidelity cost",
    )
    p.add_argument(
        "--max-open",
        type=int,
        default=200_000,
        help="most shuffled items opened per batch (a fixed-seed sample beyond)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the audit; 1 if a check failed."""
    if args.colluders < 0 or args.cohort_k < 1 or args.max_open < 1:
        raise SystemExit("decentsim audit: --colluders ≥ 0, --cohort-k ≥ 1, --max-open ≥ 1")
    try:
        inp = load_run(args.run_dir, args.auditor_key)
    except (AuditInputError, TranscriptError) as e:
        raise SystemExit(f"decentsim audit: {e}") from None
    results = run_checks(inp, args.colluders, args.cohort_k, args.max_open)
    if args.baseline is not None:
        try:
            run_summary = json.loads((args.run_dir / "summary.json").read_text())
            base_summary = json.loads((args.baseline / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"decentsim audit: --baseline: {e}") from None
        by_key = {r.key: r for r in results}
        add_fidelity(by_key["cohorts"], run_summary, base_summary)
        add_dp_fidelity(by_key["dp"], run_summary, base_summary)
    out = args.out or args.run_dir / "audit" / "report"
    data = write_report(inp, results, out)
    if args.json:
        print(
            json.dumps({k: data[k] for k in ("source", "mode", "verdict", "checks")}, default=str)
        )
    else:
        for r in results:
            print(f"{r.status.value.upper():5} {r.title}: {r.summary}")
        print(f"verdict: {data['verdict'].upper()} — report in {out / 'report.html'}")
    sys.stdout.flush()
    return 1 if data["verdict"] == "fail" else 0
