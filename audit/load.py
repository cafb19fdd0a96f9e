"""Loading a ``decentsim federated run`` directory into the audit's input (:class:`AuditInput`):
the servers' views (:mod:`audit.views`) and the ground truth (:mod:`audit.truth`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from audit.truth import load_truth
from audit.views import ROLES, AuditInput, AuditInputError, ServerView
from contract.runspec import RunSpec, RunSpecError
from contract.schedule import DEPLOYMENTS, aggregates_codec, neighbourhood_codec
from contract.transcript import load_auditor_keypair, read_transcript
from protocols.secure_sum import KeyPair, Mode


def _keys_file(path: Path, names: Iterable[str]) -> dict[str, KeyPair]:
    try:
        raw = json.loads(path.read_text())
        return {n: KeyPair.from_private_bytes(bytes.fromhex(raw[n])) for n in names}
    except FileNotFoundError:
        raise AuditInputError(f"{path}: server keys not found") from None
    except (ValueError, KeyError) as e:
        raise AuditInputError(f"{path}: not a server key file ({type(e).__name__}: {e})") from None


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AuditInputError(f"{path}:{n}: not JSON: {e}") from None
    return out


def load_run(run_dir: Path, auditor_key: Path | None = None, with_truth: bool = True) -> AuditInput:
    """The audit input of a ``decentsim federated run`` output directory.

    Reads ``views/<role>.transcript`` (opened with ``auditor_key``, default
    ``RUN_DIR/audit/auditor.key``), each server's own keys from ``state/<role>/keys.json``,
    the run spec from ``state/run.json``, and the pools' stores as ground truth where present.

    Raises:
        AuditInputError: a missing transcript, key or run file (named).
    """
    run_dir = Path(run_dir)
    spec_path = run_dir / "state" / "run.json"
    try:
        spec = RunSpec.from_json(spec_path.read_text(), str(spec_path))
    except FileNotFoundError:
        raise AuditInputError(
            f"{spec_path}: run spec not found (not a federated run dir?)"
        ) from None
    except RunSpecError as e:
        raise AuditInputError(str(e)) from None
    key_path = auditor_key or run_dir / "audit" / "auditor.key"
    auditor = load_auditor_keypair(key_path)
    servers: dict[str, ServerView] = {}
    for role in ROLES:
        path = run_dir / "views" / f"{role}.transcript"
        if not path.exists():
            path = run_dir / "state" / role / "views" / f"{role}.transcript"
        if not path.exists():
            raise AuditInputError(
                f"{run_dir / 'views' / f'{role}.transcript'}: no transcript — the {role} was "
                "not started with --audit-key"
            )
        got_role, records = read_transcript(path, auditor)
        if got_role != role:
            raise AuditInputError(f"{path}: a transcript of the {got_role}, expected the {role}")
        keys = _keys_file(run_dir / "state" / role / "keys.json", DEPLOYMENTS)
        events = _events(run_dir / "views" / f"{role}.jsonl")
        servers[role] = ServerView(role, records, keys, events)
    # every server file; the transcripts are left out: they are ciphertext (every record opened
    # and authenticated above), and byte-scanning gigabytes of it for needles proves nothing
    scan = [
        p
        for rel in ("state/coordinator", "state/aggregator", "views")
        for p in sorted((run_dir / rel).rglob("*"))
        if p.is_file() and p.suffix != ".transcript"
    ] + [p for p in (run_dir / "summary.json", run_dir / "trajectory.csv") if p.exists()]
    truth = load_truth(run_dir, spec, servers) if with_truth else None
    return AuditInput(
        mode=Mode(spec.mode),
        codecs={"neighbourhood": neighbourhood_codec(), "aggregates": aggregates_codec()},
        servers=servers,
        truth=truth,
        scan_files=scan,
        config=json.loads(spec.to_json()),
        min_cohort=int(getattr(spec, "min_cohort", 0)),
        source=str(run_dir),
    )
