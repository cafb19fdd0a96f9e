"""``decentsim audit RUN_DIR --role ROLE``: audit one server's recorded view of a federated run.

One invocation audits one server (``--role coordinator`` or ``--role aggregator``) and holds
only that server's auditor key: it opens that server's transcript (sealed to its own auditor),
reads that server's own keys, and the pools' stores as ground truth where present — never the
other server's transcript or keys (the two together are the C + A collusion the threat model
excludes). It runs every check of :mod:`audit.checks` and writes ``audit.json``,
``report.md``, ``report.html`` and plots into ``--out`` (default ``RUN_DIR/audit/<role>``).
Exits 1 if a check fails, 2 on bad input (a missing file, a key that does not open the role's
transcript), 1 if the audit cannot complete (a transcript record fails to authenticate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from audit.checks import add_dp_fidelity, add_fidelity, run_checks
from audit.load import load_run
from audit.report import write_report
from audit.views import ROLES, AuditInputError
from contract.transcript import TranscriptError, TranscriptIntegrityError
from decentsim.usage import CommandFailed, UsageError, nonnegative_int, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``audit RUN_DIR --role ROLE [--auditor-key PATH] [--out DIR] [--json] …``."""
    p.add_argument("run_dir", type=Path, help="a `decentsim federated run` output directory")
    p.add_argument(
        "--role",
        required=True,
        choices=ROLES,
        help="the server whose view to audit (one per invocation: each has its own auditor)",
    )
    p.add_argument(
        "--auditor-key",
        type=Path,
        help="that server's auditor's private key (default RUN_DIR/audit/<role>-auditor.key)",
    )
    p.add_argument("--out", type=Path, help="report directory (default RUN_DIR/audit/<role>)")
    p.add_argument("--json", action="store_true", help="print the verdicts as one JSON object")
    p.add_argument(
        "--colluders",
        type=nonnegative_int,
        default=1,
        help="pools colluding with the audited server (t)",
    )
    p.add_argument(
        "--cohort-k",
        type=positive_int,
        default=2,
        help="report slots with fewer than k contributors",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="the same run without the protection (minimum cohort, DP noise): report the "
        "fidelity cost",
    )
    p.add_argument(
        "--max-open",
        type=positive_int,
        default=200_000,
        help="most shuffled items opened per batch (a fixed-seed sample beyond)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the audit of ``args.role``'s view; 1 if a check failed.

    Raises:
        UsageError: bad input — a missing or unreadable run file, key or transcript, a key that
            does not open the role's transcript, an unreadable ``--baseline``.
        CommandFailed: the audit could not complete (a transcript record fails to authenticate
            or parse; the report cannot be written).
    """
    try:
        inp = load_run(args.run_dir, args.role, args.auditor_key)
    except TranscriptIntegrityError as e:
        raise CommandFailed(str(e)) from None
    except (AuditInputError, TranscriptError) as e:
        raise UsageError(str(e)) from None
    audit = run_checks(inp, args.colluders, args.cohort_k, args.max_open)
    if args.baseline is not None:
        try:
            run_summary = json.loads((args.run_dir / "summary.json").read_text())
            base_summary = json.loads((args.baseline / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--baseline: {e}") from None
        by_key = {r.key: r for r in audit.checks}
        add_fidelity(by_key["cohorts"], run_summary, base_summary)
        add_dp_fidelity(by_key["dp"], run_summary, base_summary)
    out = args.out or args.run_dir / "audit" / args.role
    try:
        data = write_report(inp, audit, out)
    except OSError as e:
        raise CommandFailed(f"--out {out}: cannot write the report: {e}") from None
    if args.json:
        keys = ("source", "role", "mode", "verdict", "checks", "unused")
        print(json.dumps({k: data[k] for k in keys}, default=str))
    else:
        for r in audit.checks:
            print(f"{r.status.value.upper():5} {r.title}: {r.summary}")
        not_used = sum(n for reasons in audit.unused.values() for n in reasons.values())
        if not_used:
            print(f"not used: {not_used} record(s), item(s) or truth row(s) — see the report")
        print(
            f"verdict of the {args.role}'s audit: {data['verdict'].upper()} — report in "
            f"{out / 'report.html'}"
        )
    sys.stdout.flush()
    return 1 if data["verdict"] == "fail" else 0
