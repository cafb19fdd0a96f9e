"""The aggregator process (``decentsim aggregator serve``): the second, independent share holder.

It runs the ``AggregatorLink`` gRPC service over mutual TLS — it accepts only the coordinator's
client certificate (issued by the coordinator's CA, whose certificate the operator installs as
``--coordinator-ca``) and never talks to devices. Its own state dir holds its own CA and TLS
identity, its X25519 keys (one per secure-sum deployment; devices seal A-bound material to the
public halves, exported in ``export/aggregator_public.json``), a SQLite (WAL) log of the
rounds it opened and the surviving sets it agreed, and its view log.

A opens a round only after checking the spec C proposes against its own policy (phase names,
kinds, dimensions, item bounds, aggregate slot names): the spec fixes sizes and names only, so
A trusts C for nothing confidential. Differential privacy is A's operator's own setting
(``--dp-sigma``…, like the minimum cohort): A attaches it to every observations phase it opens,
and the round-spec digest makes A refuse a round C proposes under other DP settings (or none).
A adds its part of the noise from its own secret (``noise.json``, 0600), which never leaves
its state dir. Shares live in memory for the round: when A restarts, C's
next call for that round fails and C runs the day again (see ``coordinator.service``).

Leakage (what A learns): see ``protocols/secure_sum/LEAKAGE.md``; its view log
(``views/aggregator.jsonl``) records round openings, registrations, relays and agreements with
counts only — never a share, seed, value or key.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from contract.schedule import (
    AGGREGATES,
    DEPLOYMENTS,
    MAX_SLOT_SUMMANDS,
    MESSAGES_PHASE,
    NEIGHBOURHOOD,
    OBSERVATIONS_PHASE,
    WIDTH,
    codecs,
    is_day_slot,
    observations_dim,
)
from contract.views import ViewLog, open_transcript
from identity.pki import LocalCA, Purpose
from identity.secret_files import load_noise_secret, load_or_create_keys, read_public_keys
from proto.decentsim.v1 import aggregator_pb2_grpc
from proto.limits import Channel, server_options
from protocols.secure_sum import AggregatorServer, Deployment, KeyPair, Mode, RoundSpec, SlotKind
from protocols.secure_sum.dp import DPConfig
from protocols.secure_sum.errors import MessageError
from protocols.secure_sum.messages import Agreed, decode
from storage.sqlite import open_db, transaction
from transport.grpc.channels import require_loopback
from transport.grpc.link import AGGREGATOR_CN, COORDINATOR_CN, AggregatorLinkServicer

log = logging.getLogger(__name__)


class AggregatorError(Exception):
    """The aggregator cannot run as configured; the message names the file or setting."""


_MIGRATIONS = (
    """
    CREATE TABLE rounds (deployment TEXT NOT NULL, round_id INTEGER NOT NULL,
                         opened_unix REAL NOT NULL, PRIMARY KEY (deployment, round_id));
    CREATE TABLE agreements (deployment TEXT NOT NULL, round_id INTEGER NOT NULL,
                             phase TEXT NOT NULL, digest BLOB NOT NULL, agreed_unix REAL NOT NULL,
                             PRIMARY KEY (deployment, round_id, phase));
    """,
)


def aggregator_init(state_dir: Path, hostnames: tuple[str, ...]) -> Path:
    """Create the aggregator's identity (idempotent); returns its export dir (``ca.pem``,
    ``aggregator_public.json``)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = LocalCA.load_or_create(state_dir / "pki", "decentsim aggregator CA")
    ca.ensure_credential(
        "link-server", Purpose.SERVER, common_name=AGGREGATOR_CN, hostnames=hostnames
    )
    keys = load_or_create_keys(state_dir / "keys.json", DEPLOYMENTS)
    export = state_dir / "export"
    export.mkdir(exist_ok=True)
    (export / "ca.pem").write_bytes(ca.cert_pem)
    public = {n: KeyPair.from_private_bytes(keys[n]).public.hex() for n in DEPLOYMENTS}
    (export / "aggregator_public.json").write_text(json.dumps(public))
    return export


def round_policy(deployment: str, spec: RoundSpec) -> None:
    """A's policy for the rounds C proposes: the run's two phase shapes, nothing else.

    Raises:
        MessageError: the spec is not a neighbourhood or aggregates round of this model.
    """
    if len(spec.phases) != 1:
        raise MessageError(f"a {deployment} round has exactly one phase, got {len(spec.phases)}")
    p = spec.phases[0]
    if deployment == NEIGHBOURHOOD:
        ok = p.name == MESSAGES_PHASE and p.kind is SlotKind.PSEUDONYM and p.dim == WIDTH
        ok = ok and p.items_per_device <= MAX_SLOT_SUMMANDS
    elif deployment == AGGREGATES:
        ok = (
            p.name == OBSERVATIONS_PHASE
            and p.kind is SlotKind.AGGREGATE
            and p.dim == observations_dim()
            and p.items_per_device == 1
            and len(p.aggregate_slots) == 1
            and is_day_slot(p.aggregate_slots[0])
        )
    else:
        raise MessageError(f"unknown deployment {deployment!r}")
    if not ok:
        raise MessageError(f"phase {p.name!r} does not match the {deployment} policy")


class AggregatorService:
    """The aggregator of one deployment pair (see the module docstring)."""

    def __init__(
        self,
        state_dir: Path,
        mode: Mode,
        coordinator_export: Path,
        hostnames: tuple[str, ...] = ("localhost", "127.0.0.1"),
        insecure: bool = False,
        audit_key: Path | None = None,
        min_cohort: int = 0,
        dp: DPConfig | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.insecure = insecure
        aggregator_init(state_dir, hostnames)
        self.ca = LocalCA.load_or_create(state_dir / "pki", "decentsim aggregator CA")
        self._pem = self.ca.ensure_credential(
            "link-server", Purpose.SERVER, common_name=AGGREGATOR_CN, hostnames=hostnames
        ).grpc_pem()
        try:
            self._c_ca = (coordinator_export / "ca.pem").read_bytes()
        except FileNotFoundError:
            raise AggregatorError(
                f"{coordinator_export / 'ca.pem'}: coordinator CA not found"
            ) from None
        c_public = read_public_keys(
            coordinator_export / "coordinator_public.json", DEPLOYMENTS, "coordinator"
        )
        keys = load_or_create_keys(state_dir / "keys.json", DEPLOYMENTS)
        self.servers: dict[str, AggregatorServer] = {}
        for name, codec in codecs().items():
            pair = KeyPair.from_private_bytes(keys[name])
            deployment = Deployment(mode, codec, c_public[name], pair.public)
            self.servers[name] = AggregatorServer(pair, deployment)
        #: every message in and out, sealed to the auditor (only with ``--audit-key``)
        self.transcript = open_transcript(audit_key, state_dir, "aggregator", self.servers)
        # A's operator sets the minimum cohort itself; it must equal the run's (C's)
        self.servers[NEIGHBOURHOOD].min_cohort = min_cohort
        # ... and its DP settings and noise secret (the noise is A's own, never C's)
        if dp is not None:
            self.servers[AGGREGATES].phase_dp[OBSERVATIONS_PHASE] = dp
        self.servers[AGGREGATES].noise_secret = load_noise_secret(state_dir)
        self.db = open_db(
            state_dir / "aggregator.sqlite3", migrations=_MIGRATIONS, check_same_thread=False
        )
        self._db_lock = threading.Lock()
        self.view = ViewLog(state_dir / "views" / "aggregator.jsonl")
        self.link = AggregatorLinkServicer(
            self.servers,
            allowed_peers=frozenset({COORDINATOR_CN}),
            policy=round_policy,
            observer=self._observe,
            insecure=insecure,
        )
        self._server: grpc.Server | None = None

    def _observe(self, event: str, deployment: str, round_id: int, reply: bytes) -> None:
        """Record A's view; persist round openings and agreed surviving sets."""
        try:
            msg = decode(reply)
        except MessageError:
            msg = None
        self.view.write(event, deployment=deployment, round=round_id, reply=type(msg).__name__)
        now = time.time()
        with self._db_lock, transaction(self.db) as conn:
            if event == "open_round":
                conn.execute(
                    "INSERT OR IGNORE INTO rounds VALUES (?, ?, ?)", (deployment, round_id, now)
                )
            elif event.startswith("agree:") and isinstance(msg, Agreed):
                conn.execute(
                    "INSERT OR REPLACE INTO agreements VALUES (?, ?, ?, ?, ?)",
                    (deployment, round_id, event.split(":", 1)[1], msg.digest, now),
                )

    def serve(self, listen: str) -> int:
        """Start the mutual-TLS link server on ``listen`` (port 0 picks one)."""
        if self.insecure:
            require_loopback(listen, "--listen")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), options=server_options(Channel.LINK)
        )
        aggregator_pb2_grpc.add_AggregatorLinkServicer_to_server(self.link, server)
        creds = grpc.ssl_server_credentials(
            [(self._pem.private_key, self._pem.certificate_chain)],
            self._c_ca,
            require_client_auth=True,
        )
        port = (
            server.add_insecure_port(listen)
            if self.insecure
            else server.add_secure_port(listen, creds)
        )
        if port == 0:
            raise AggregatorError(f"cannot listen on {listen}")
        server.start()
        self._server = server
        return port

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving and close the database."""
        if self._server is not None:
            self._server.stop(grace_s).wait()
        self.view.close()
        if self.transcript is not None:
            self.transcript.close()
        self.db.close()
