"""Loading one server's view of a ``decentsim federated run`` directory into the audit's input
(:class:`AuditInput`): that server's transcript and keys (:mod:`audit.views`) and the ground
truth (:mod:`audit.truth`).

One load is one server's audit: it opens ``views/<role>.transcript`` with that server's own
auditor's key and reads that server's own keys, and never the other server's transcript or
keys (the two together are the coordinator + aggregator collusion the threat model excludes).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from audit.behaviour import load_behaviour
from audit.truth import bytes_needles, load_truth
from audit.views import ROLES, AuditInput, AuditInputError, ServerView
from contract.runspec import RunSpec, RunSpecError
from contract.schedule import (
    AGGREGATES,
    DEPLOYMENTS,
    NEIGHBOURHOOD,
    WIDTH,
    aggregates_codec,
    neighbourhood_codec,
    observations_dim,
)
from contract.transcript import (
    auditor_files,
    fingerprint,
    load_auditor_keypair,
    read_header,
    read_transcript,
)
from protocols.secure_sum import KeyPair, Mode

#: the reason a transcript's tail bytes are not used (``Transcript.tail_bytes``)
CUT_SHORT = "record cut short at the transcript's end (a crash while writing it)"


class AuditKeyMismatch(AuditInputError):
    """The auditor key given does not open the audited server's transcript."""


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


def default_auditor_key(run_dir: Path, role: str) -> Path:
    """Where ``federated run`` puts ``role``'s auditor's private key:
    ``RUN_DIR/audit/<role>-auditor.key``."""
    return auditor_files(Path(run_dir) / "audit", role)[0]


def transcript_path(run_dir: Path, role: str) -> Path:
    """``RUN_DIR/views/<role>.transcript`` (``federated run``'s copy), else the one in the
    server's state dir.

    Raises:
        AuditInputError: neither exists (no ``--record-views`` / ``--audit-key``).
    """
    for path in (
        run_dir / "views" / f"{role}.transcript",
        run_dir / "state" / role / "views" / f"{role}.transcript",
    ):
        if path.exists():
            return path
    raise AuditInputError(
        f"{run_dir / 'views' / f'{role}.transcript'}: no transcript — the run did not record "
        f"the servers' views (`federated run --record-views`; a deployed {role}: "
        "`serve --audit-key`)"
    )


def load_run(
    run_dir: Path, role: str, auditor_key: Path | None = None, with_truth: bool = True
) -> AuditInput:
    """The audit input of one server (``role``) of a ``decentsim federated run`` directory.

    Reads ``views/<role>.transcript`` (opened with ``auditor_key``, default
    ``RUN_DIR/audit/<role>-auditor.key``), that server's own keys from ``state/<role>/keys.json``
    and its view log, the run spec from ``state/run.json``, and the pools' stores as ground truth
    where present. The other server's transcript, keys and files are not read.

    Raises:
        AuditInputError: an unknown role, or a missing transcript, key or run file (named).
        AuditKeyMismatch: the key does not open this server's transcript (both keys named by
            fingerprint).
        TranscriptError: an unusable key file; ``TranscriptIntegrityError``: a record of the
            transcript fails to authenticate or parse.
    """
    if role not in ROLES:
        raise AuditInputError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditInputError(f"{run_dir}: no such directory (a `federated run --out` directory)")
    spec_path = run_dir / "state" / "run.json"
    try:
        spec = RunSpec.from_json(spec_path.read_text(), str(spec_path))
    except FileNotFoundError:
        raise AuditInputError(
            f"{spec_path}: run spec not found (not a federated run dir?)"
        ) from None
    except RunSpecError as e:
        raise AuditInputError(str(e)) from None
    path = transcript_path(run_dir, role)
    key_path = auditor_key or default_auditor_key(run_dir, role)
    auditor = load_auditor_keypair(key_path)
    got_role, sealed_to = read_header(path)
    if got_role != role:
        raise AuditInputError(f"{path}: a transcript of the {got_role}, expected the {role}")
    if sealed_to != auditor.public:
        raise AuditKeyMismatch(
            f"{key_path} (key {fingerprint(auditor.public)}) does not open the {role}'s "
            f"transcript {path}, which is sealed to key {fingerprint(sealed_to)}: pass the "
            f"{role}'s own auditor key (--auditor-key; `federated run` writes "
            f"{default_auditor_key(run_dir, role)})"
        )
    transcript = read_transcript(path, auditor)
    unused: Counter[str] = Counter()
    if transcript.tail_bytes:
        unused[CUT_SHORT] += 1
    view = ServerView(
        role,
        transcript.records,
        _keys_file(run_dir / "state" / role / "keys.json", DEPLOYMENTS),
        _events(run_dir / "views" / f"{role}.jsonl"),
        unused,
    )
    # this server's files and the run's public outputs; the transcript is left out: it is
    # ciphertext (every record opened and authenticated above), and byte-scanning gigabytes
    # of it for needles proves nothing
    scan = [
        p
        for p in [
            *sorted((run_dir / "state" / role).rglob("*")),
            *sorted((run_dir / "views").glob(f"{role}.*")),
        ]
        if p.is_file() and p.suffix != ".transcript"
    ] + [p for p in (run_dir / "summary.json", run_dir / "trajectory.csv") if p.exists()]
    truth = load_truth(run_dir, spec, view) if with_truth else None
    if truth is not None:
        # the key this audit holds must rest in none of the server's files
        truth.needles[f"{role}'s auditor private key"] = bytes_needles(
            auditor.private.private_bytes_raw()
        )
    return AuditInput(
        mode=Mode(spec.mode),
        codecs={NEIGHBOURHOOD: neighbourhood_codec(), AGGREGATES: aggregates_codec()},
        view=view,
        truth=truth,
        scan_files=scan,
        config=json.loads(spec.to_json()),
        min_cohort=int(getattr(spec, "min_cohort", 0)),
        source=str(run_dir),
        dims={NEIGHBOURHOOD: WIDTH, AGGREGATES: observations_dim()},
        behaviour=load_behaviour(run_dir / "state" / role) if role == "coordinator" else None,
        group_slots=spec.advertising_intervals,
    )
