"""The coordinator process: enrolment, the round state machine, persistence, the gateway.

``decentsim coordinator serve`` runs one :class:`CoordinatorService`. It

- keeps its identity in a state dir: a local CA (devices pin its certificate), its TLS server
  certificate, its link client certificate, its X25519 keys of the two secure-sum deployments
  and the pseudonym-slot deployment key (files ``0600``);
- enrols participants (a device pool, or a phone: a pool of one) with single-use tokens: one
  credential per token, and ``device_count`` participant ids of its own (each one a secure-sum
  participant hosting up to ``UNIT_DEVICES`` devices);
- drives the rounds, one per simulated day of each epoch, step by step with deadlines::

      register → messages → fetch → observations → (commit the day's aggregates)

  Each step ends when every expected participant acted, or at its deadline: a participant that
  misses a deadline drops out of the step (sums are over the surviving set) and is not waited
  for again until it calls again;
- persists (SQLite, WAL) the run spec, credentials, rounds and every committed day's opened
  aggregates. A day is atomic: a crash of the coordinator or of the aggregator aborts the day's
  attempt; after restart the day runs again under a new round id. Every draw is a function of
  (seed, agent, day), devices resend byte-identical requests, so the re-run gives the same
  aggregates and no contribution is lost or counted twice (uncommitted shares are discarded at
  both servers).

Leakage (what the coordinator learns): see ``protocols/secure_sum/LEAKAGE.md`` for the secure-sum
phases; in addition the coordinator learns each credential's participant count, which
participants acted in which step and when, and the opened daily aggregates. Its view log
(``views/coordinator.jsonl``) records exactly those events, never a share, value or key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from behaviour import BackendError, LLMSource, LocalLlamaClient, TableSource
from contract.round import DaySpecs, loss_and_grad, run_day
from contract.runspec import RunSpec
from contract.schedule import (
    AGGREGATES,
    DEPLOYMENTS,
    ENROLLING,
    FAILED,
    FETCH,
    FINISHED,
    NEIGHBOURHOOD,
    OBSERVATIONS_PHASE,
    REGISTER,
    RPC_STEP,
    STEPS,
    codecs,
    observations_shape,
    round_specs,
)
from contract.views import ViewLog, open_transcript
from contract.wire import deployment_to_pb, mode_to_pb
from identity.enrolment import EnrolmentRegistry
from identity.enrolment_uri import pilot_of_label
from identity.pki import LocalCA, Purpose
from identity.secret_files import load_noise_secret, load_or_create_keys, read_public_keys
from proto.decentsim.v1 import common_pb2
from proto.decentsim.v1 import device_pb2 as pb
from proto.decentsim.v1 import device_pb2_grpc as pb_grpc
from proto.limits import Channel, channel_options, server_options
from protocols.ble.radio import DAY_SECONDS
from protocols.secure_sum import CoordinatorServer, Deployment, KeyPair, Mode, PhaseReport
from protocols.secure_sum.errors import RoundLost, SecureSumError
from sim.archetypes import MONTH_DAYS, ArchetypeError, BehaviourTable, public_numbers
from sim.calibration import ThetaOptimizer
from sim.params import BASE_PARAMS, PARAM_NAMES, Theta
from storage.sqlite import open_db, transaction
from transport.grpc.channels import require_loopback
from transport.grpc.gateway import DeviceGatewayServicer
from transport.grpc.link import COORDINATOR_CN, AggregatorLinkClient, LinkError

log = logging.getLogger(__name__)

#: Most participant ids one credential may ask for.
MAX_UNITS_PER_CREDENTIAL = 4096
#: Longest GetRound long poll the coordinator holds.
MAX_WAIT_MS = 5_000
#: Attempts of one day that devices may void (``ReportFailure``) before the run stops: a
#: failure that survives re-running the day is not transient (e.g. a tampering server).
MAX_FAILED_ATTEMPTS = 3

_MIGRATIONS = (
    """
    CREATE TABLE run (id INTEGER PRIMARY KEY CHECK (id = 1), spec TEXT NOT NULL,
                      created_unix REAL NOT NULL, finished_unix REAL);
    CREATE TABLE credentials (credential TEXT PRIMARY KEY, units BLOB NOT NULL,
                              enrolled_unix REAL NOT NULL);
    CREATE TABLE rounds (round_id INTEGER PRIMARY KEY, epoch INTEGER NOT NULL,
                         day INTEGER NOT NULL, status TEXT NOT NULL, opened_unix REAL NOT NULL,
                         ended_unix REAL, reason TEXT);
    CREATE TABLE days (epoch INTEGER NOT NULL, day INTEGER NOT NULL, round_id INTEGER NOT NULL,
                       y BLOB NOT NULL, surviving_messages INTEGER NOT NULL,
                       surviving_observations INTEGER NOT NULL, bytes_in INTEGER NOT NULL,
                       PRIMARY KEY (epoch, day));
    CREATE TABLE epochs (epoch INTEGER PRIMARY KEY, theta TEXT NOT NULL, loss REAL,
                         grad TEXT, adam TEXT);
    """,
    # a run that stopped for good says why (a restarted coordinator refuses to go on)
    """
    ALTER TABLE run ADD COLUMN failure TEXT;
    """,
    # the public behaviour table's rows a table/llm run sent to devices, one per period
    """
    CREATE TABLE behaviour_rows (epoch INTEGER NOT NULL, period INTEGER NOT NULL,
                                 row BLOB NOT NULL, source TEXT NOT NULL,
                                 PRIMARY KEY (epoch, period));
    """,
    # a run with pilots: which credential is which pilot agent (from its enrolment token's
    # label), and each credential's last heartbeat (`decentsim pilot status`)
    """
    ALTER TABLE credentials ADD COLUMN pilot_agent INTEGER;
    CREATE UNIQUE INDEX credentials_pilot ON credentials (pilot_agent)
        WHERE pilot_agent IS NOT NULL;
    CREATE TABLE heartbeats (credential TEXT PRIMARY KEY, received_unix REAL NOT NULL,
                             skew_ms INTEGER NOT NULL, progress_round INTEGER NOT NULL,
                             health BLOB);
    """,
)


class ServiceError(Exception):
    """The coordinator cannot run as configured; the message names the file or setting."""


class DayVoided(Exception):
    """Devices reported that they cannot complete a step of the attempt (``ReportFailure``)."""


class RunFailure(Exception):
    """The run cannot go on (names why); the coordinator stops it for good."""


class _Stopping(Exception):
    """The service is stopping (a signal): the driver leaves the day's attempt open; a
    restarted coordinator aborts it and runs the day again."""


def coordinator_init(state_dir: Path, hostnames: tuple[str, ...]) -> Path:
    """Create the coordinator's identity (idempotent); returns its export dir.

    The export dir holds what others need: ``ca.pem`` (devices pin it; the aggregator trusts
    the link client certificate by it) and ``coordinator_public.json`` (X25519 public keys).
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = LocalCA.load_or_create(state_dir / "pki", "decentsim coordinator CA")
    ca.ensure_credential("gateway", Purpose.SERVER, common_name="coordinator", hostnames=hostnames)
    ca.ensure_credential("link-client", Purpose.CLIENT, common_name=COORDINATOR_CN)
    keys = load_or_create_keys(state_dir / "keys.json", (*DEPLOYMENTS, "deployment_key"))
    export = state_dir / "export"
    export.mkdir(exist_ok=True)
    (export / "ca.pem").write_bytes(ca.cert_pem)
    public = {n: KeyPair.from_private_bytes(keys[n]).public.hex() for n in DEPLOYMENTS}
    (export / "coordinator_public.json").write_text(json.dumps(public))
    return export


def behaviour_source(spec: RunSpec, state_dir: Path) -> TableSource | LLMSource | None:
    """What fills a ``table``/``llm`` run's behaviour table: the public table file, or the
    language model — a server, or a GGUF file run in this process — its answers cached in the
    state dir, so a restart asks nothing twice."""
    if spec.behaviour == "table":
        assert spec.behaviour_table is not None  # RunSpec checks it
        try:
            return TableSource(spec.behaviour_table, spec.archetype_grid(), spec.period_days)
        except ArchetypeError as err:
            raise ServiceError(f"behaviour table: {err}") from None
    if spec.behaviour == "llm":
        if spec.llm_gguf is None:
            return LLMSource(spec.llm_client(), state_dir / "llm-cache")
        try:
            return LLMSource(LocalLlamaClient(spec.llm_gguf), state_dir / "llm-cache")
        except BackendError as err:
            raise ServiceError(f"behaviour llm: {err}") from None
    return None


@dataclass
class _Step:
    """The run's position: what GetRound publishes."""

    round_id: int = 0
    epoch: int = 0
    day: int = 0
    step: str = ENROLLING
    deadline: float = 0.0
    version: int = 1
    failure: str = ""
    #: the behaviour table's row of the day's period (float64 LE), and the period
    behaviour_row: bytes = b""
    behaviour_period: int = 0


class CoordinatorService:
    """The coordinator of one federated run (see the module docstring).

    Args:
        state_dir: identity, database and view log (created by :func:`coordinator_init`).
        spec: the run; ``None`` resumes the run persisted in ``state_dir``.
        aggregator: ``HOST:PORT`` of the aggregator's link.
        aggregator_export: the aggregator's export dir (``ca.pem``, ``aggregator_public.json``).
        insecure: DEBUGGING ONLY: no TLS anywhere, loopback only; a caller names its
            credential in metadata.
        audit_key: the coordinator's auditor's public key: record ``views/coordinator.transcript``.
    """

    def __init__(
        self,
        state_dir: Path,
        spec: RunSpec | None,
        aggregator: str,
        aggregator_export: Path,
        hostnames: tuple[str, ...] = ("localhost", "127.0.0.1"),
        insecure: bool = False,
        audit_key: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.insecure = insecure
        if insecure:
            require_loopback(aggregator, "--aggregator")
        coordinator_init(state_dir, hostnames)
        self.db = open_db(
            state_dir / "coordinator.sqlite3", migrations=_MIGRATIONS, check_same_thread=False
        )
        self._db_lock = threading.Lock()
        self.spec = self._load_or_store_spec(spec)
        self.ca = LocalCA.load_or_create(state_dir / "pki", "decentsim coordinator CA")
        self.registry = EnrolmentRegistry(state_dir / "enrolment.sqlite3", self.ca)
        self.view = ViewLog(state_dir / "views" / "coordinator.jsonl")
        keys = load_or_create_keys(state_dir / "keys.json", (*DEPLOYMENTS, "deployment_key"))
        a_public = read_public_keys(
            aggregator_export / "aggregator_public.json", DEPLOYMENTS, "aggregator"
        )
        mode = Mode(self.spec.mode)
        self.deployments: dict[str, Deployment] = {}
        self.links: dict[str, AggregatorLinkClient] = {}
        self.servers: dict[str, CoordinatorServer] = {}
        link_pem = self.ca.ensure_credential(
            "link-client", Purpose.CLIENT, common_name=COORDINATOR_CN
        ).grpc_pem()
        try:
            a_ca = (aggregator_export / "ca.pem").read_bytes()
        except FileNotFoundError:
            raise ServiceError(f"{aggregator_export / 'ca.pem'}: aggregator CA not found") from None
        creds = grpc.ssl_channel_credentials(a_ca, link_pem.private_key, link_pem.certificate_chain)
        self._a_channel = (
            grpc.insecure_channel(aggregator, options=channel_options(Channel.LINK))
            if insecure
            else grpc.secure_channel(aggregator, creds, options=channel_options(Channel.LINK))
        )
        for name, codec in codecs().items():
            pair = KeyPair.from_private_bytes(keys[name])
            # only the neighbourhood deployment has pseudonym slots, keyed by the secret
            # deployment key; the aggregates deployment has none and gets no key
            dkey = keys["deployment_key"] if name == NEIGHBOURHOOD else b""
            self.deployments[name] = Deployment(mode, codec, pair.public, a_public[name], dkey)
            self.links[name] = AggregatorLinkClient(self._a_channel, mode, name, timeout_s=120.0)
            self.servers[name] = CoordinatorServer(pair, self.deployments[name], self.links[name])
        #: every message in and out, sealed to the coordinator's auditor (``--audit-key``)
        self.transcript = open_transcript(audit_key, state_dir, "coordinator", self.servers)
        #: what fills the behaviour table of a table/llm run (public inputs only)
        self.behaviour = behaviour_source(self.spec, state_dir)
        self.servers[NEIGHBOURHOOD].min_cohort = self.spec.min_cohort
        # C's own DP noise secret (persisted: a re-opened release gets the same noise)
        self.servers[AGGREGATES].noise_secret = load_noise_secret(state_dir)
        self.gateway = DeviceGatewayServicer(
            self.servers[NEIGHBOURHOOD],
            self.servers[AGGREGATES],
            authenticate=self.registry.authenticate,
            service=self,
            insecure=insecure,
        )
        self._cond = threading.Condition()
        self._pos = _Step()
        self._done: dict[tuple[int, str], set[bytes]] = {}
        self._absent: set[str] = set()
        self._lost: set[int] = set()
        self._failures: dict[int, str] = {}
        self._bytes_in = 0
        self._stop = threading.Event()
        self.finished = threading.Event()
        #: why the run stopped for good ("" while it has not)
        self.failure = ""
        #: the day attempt in progress: (round id, epoch, day)
        self._attempt = (0, 0, 0)
        #: its behaviour table row: (period, float64 LE bytes; empty for a heuristic run)
        self._day_row: tuple[int, bytes] = (0, b"")
        self._driver: threading.Thread | None = None
        self._servers: list[grpc.Server] = []
        self._units = self._load_units()
        self._abort_open_rounds()

    # -- persistence --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._db_lock, transaction(self.db) as conn:
            yield conn

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of a read, under the lock every write holds: one connection serves the
        driver and the gateway's threads."""
        with self._db_lock:
            return self.db.execute(sql, args).fetchall()

    def _load_or_store_spec(self, spec: RunSpec | None) -> RunSpec:
        rows = self._read("SELECT spec FROM run")
        row = rows[0] if rows else None
        if row is not None:
            failure = self._read("SELECT failure FROM run")[0][0]
            if failure:
                raise ServiceError(
                    f"{self.state_dir} holds a run that failed ({failure}); use a new --state-dir"
                )
            stored = RunSpec.from_json(row[0], f"{self.state_dir}/coordinator.sqlite3")
            if spec is not None and spec != stored:
                raise ServiceError(
                    f"{self.state_dir} already holds a different run; use a new --state-dir "
                    "or omit --run to resume it"
                )
            return stored
        if spec is None:
            raise ServiceError(f"{self.state_dir} holds no run yet: pass --run RUN.json")
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO run (id, spec, created_unix) VALUES (1, ?, ?)",
                (spec.to_json(), time.time()),
            )
            conn.execute(
                "INSERT INTO epochs (epoch, theta) VALUES (0, ?)", (json.dumps(spec.theta),)
            )
        return spec

    def _load_units(self) -> dict[str, frozenset[bytes]]:
        rows = self._read("SELECT credential, units FROM credentials")
        return {c: frozenset(bytes(u[i : i + 16]) for i in range(0, len(u), 16)) for c, u in rows}

    def _abort_open_rounds(self) -> None:
        """A restart abandons an interrupted day's attempt: it runs again under a new id."""
        with self._tx() as conn:
            n = conn.execute(
                "UPDATE rounds SET status = 'aborted', ended_unix = ?, reason = 'restart' "
                "WHERE status = 'open'",
                (time.time(),),
            ).rowcount
        if n:
            log.warning("aborted %d interrupted round attempt(s); their days run again", n)

    # -- enrolment and identity ---------------------------------------------------------------
    def mint_tokens(self, count: int, ttl_s: float = 7 * 24 * 3600) -> list[str]:
        """Single-use enrolment tokens (shown once; only their hashes are stored)."""
        return self.registry.mint_tokens(count, dt.timedelta(seconds=ttl_s))

    def enrol(self, request: pb.EnrolRequest) -> pb.EnrolResponse:
        """Redeem a token for a credential with ``device_count`` participant ids.

        Raises:
            EnrolmentError: bad token or CSR (the gateway maps it to a status code).
            ValueError: a participant count outside 1..MAX_UNITS_PER_CREDENTIAL.
        """
        if not 1 <= request.device_count <= MAX_UNITS_PER_CREDENTIAL:
            raise ValueError(
                f"device_count must be in 1..{MAX_UNITS_PER_CREDENTIAL}, got {request.device_count}"
            )
        try:
            csr = x509.load_der_x509_csr(request.csr_der)
        except ValueError as e:
            raise ValueError(f"csr_der is not a DER certificate signing request: {e}") from None
        pem = csr.public_bytes(serialization.Encoding.PEM)
        pilot = self._pilot_of(self.registry.label_of(request.token), request.device_count)
        enrolment = self.registry.redeem(request.token, pem)
        units = [os.urandom(16) for _ in range(request.device_count)]
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO credentials (credential, units, enrolled_unix, pilot_agent) "
                "VALUES (?, ?, ?, ?)",
                (enrolment.device_id, b"".join(units), time.time(), pilot),
            )
        with self._cond:
            self._units[enrolment.device_id] = frozenset(units)
            self._cond.notify_all()
        self.view.write("enrol", credential=enrolment.device_id, participants=len(units))
        cert = x509.load_pem_x509_certificate(enrolment.certificate_pem)
        ca = x509.load_pem_x509_certificate(enrolment.ca_certificate_pem)
        return pb.EnrolResponse(
            credential_id=enrolment.device_id,
            devices=[common_pb2.DeviceId(value=u) for u in units],
            client_certificate_der=cert.public_bytes(serialization.Encoding.DER),
            ca_certificates_der=[ca.public_bytes(serialization.Encoding.DER)],
            deployment=deployment_to_pb(NEIGHBOURHOOD, self.deployments[NEIGHBOURHOOD]),
            deployments=[deployment_to_pb(n, self.deployments[n]) for n in DEPLOYMENTS],
            issued_unix_ms=int(time.time() * 1000),
            expires_unix_ms=int(enrolment.not_after.timestamp() * 1000),
        )

    def _pilot_of(self, label: str | None, device_count: int) -> int | None:
        """The pilot agent a token was minted for (checked before the token is burnt)."""
        agent = pilot_of_label(label)
        if agent is None:
            return None
        if agent not in self.spec.pilots:
            raise ValueError(f"this token is for pilot agent {agent}, not a pilot of this run")
        if device_count != 1:
            raise ValueError(f"a pilot device enrols one participant, not {device_count}")
        taken = self._read("SELECT 1 FROM credentials WHERE pilot_agent = ?", (agent,))
        if taken:
            raise ValueError(
                f"pilot agent {agent} is enrolled already (one device per pilot agent)"
            )
        return agent

    def heartbeat(self, credential: str, request: pb.HeartbeatRequest, now: float) -> None:
        """Keep a credential's last heartbeat: when, its clock skew, the last round it
        completed, and a pilot's health (no count of anything it heard)."""
        self.seen(credential)
        skew = int(request.client_time_unix_ms - now * 1000) if request.client_time_unix_ms else 0
        health = request.health.SerializeToString() if request.HasField("health") else None
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO heartbeats VALUES (?, ?, ?, ?, ?)",
                (credential, now, skew, request.progress.round_id, health),
            )

    def owns(self, credential: str, participant: bytes) -> bool:
        """Whether ``participant`` is one of ``credential``'s participant ids."""
        self.seen(credential)
        return participant in self._units.get(credential, frozenset())

    def round_lost(self, round_id: int) -> None:
        """The aggregator no longer holds ``round_id`` (it restarted): void the attempt now
        instead of at the step's deadline."""
        with self._cond:
            self._lost.add(round_id)
            self._cond.notify_all()

    def seen(self, credential: str) -> None:
        """A credential called: it is expected in steps again."""
        if credential in self._absent:
            with self._cond:
                self._absent.discard(credential)

    def accepted(self, rpc: str, participant: bytes, round_id: int, nbytes: int) -> None:
        """The gateway served a participant's request (the step's progress, the view)."""
        step = RPC_STEP.get(rpc)
        with self._cond:
            self._bytes_in += nbytes
            if step is not None:
                self._done.setdefault((round_id, step), set()).add(participant)
                self._cond.notify_all()
        self.view.write(rpc, round=round_id, participant=participant.hex(), bytes=nbytes)

    def report_failure(
        self, credential: str, round_id: int, step: str, reason: str, detail: str
    ) -> bool:
        """A credential's devices cannot complete ``step`` of ``round_id`` (their fetch failed):
        void the attempt now, so the day runs again. True if it was the current attempt."""
        self.seen(credential)
        with self._cond:
            current = round_id == self._pos.round_id and self._pos.step in STEPS
            if current:
                self._failures.setdefault(round_id, f"{step}: {reason}: {detail}")
                self._cond.notify_all()
        log.warning("round %d: a participant failed step %s (%s)", round_id, step, reason)
        self.view.write("failure", round=round_id, step=step, reason=reason)
        return current

    # -- GetRound -----------------------------------------------------------------------------
    def schedule(self, newer_than: int, wait_ms: int) -> pb.RoundSchedule:
        """The current step (long poll: waits up to ``wait_ms`` for a version > newer_than)."""
        deadline = time.time() + min(wait_ms, MAX_WAIT_MS) / 1000
        with self._cond:
            while self._pos.version <= newer_than and not self._stop.is_set():
                remaining = deadline - time.time()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            pos = _Step(**vars(self._pos))
        theta = self.theta(pos.epoch)
        return pb.RoundSchedule(
            round_id=pos.round_id,
            day=pos.day,
            epoch=pos.epoch,
            days=self.spec.days,
            mode=mode_to_pb(Mode(self.spec.mode)),
            theta=common_pb2.ModelParameters(
                names=list(PARAM_NAMES), values=theta.as_tensor().tolist(), version=pos.epoch
            ),
            model="epidemiology",
            rng_seed=self.spec.seed,
            server_time_unix_ms=int(time.time() * 1000),
            step=pos.step,
            step_deadline_unix_ms=int(pos.deadline * 1000),
            version=pos.version,
            run_json=self.spec.to_json(),
            committed_days=self.committed_days(pos.epoch),
            failure=pos.failure,
            behaviour_row=pos.behaviour_row,
            behaviour_period=pos.behaviour_period,
        )

    def theta(self, epoch: int) -> Theta:
        """θ of an epoch (persisted at the end of the previous one)."""
        (row,) = self._read("SELECT theta FROM epochs WHERE epoch = ?", (epoch,))
        return Theta(**json.loads(row[0]))

    def committed_days(self, epoch: int) -> int:
        """Days of ``epoch`` whose aggregates are committed."""
        return int(self._read("SELECT COUNT(*) FROM days WHERE epoch = ?", (epoch,))[0][0])

    # -- the round state machine --------------------------------------------------------------
    def _publish(self, **changes: Any) -> None:
        with self._cond:
            for k, v in changes.items():
                setattr(self._pos, k, v)
            self._pos.version += 1
            self._cond.notify_all()

    def _expected(self, round_id: int, step: str) -> set[bytes]:
        units = {u for c, us in self._units.items() if c not in self._absent for u in us}
        if step == FETCH:  # only registrants have sums to fetch
            units &= self._done.get((round_id, REGISTER), set())
        return units

    def _run_step(self, round_id: int, step: str) -> None:
        """Publish ``step`` and wait until every expected participant acted or the deadline."""
        deadline = time.time() + self.spec.step_timeout_s
        _, epoch, day = self._attempt
        # one publish: a device never sees a new round with the previous round's step
        self._publish(
            round_id=round_id,
            epoch=epoch,
            day=day,
            step=step,
            deadline=deadline,
            behaviour_row=self._day_row[1],
            behaviour_period=self._day_row[0],
        )
        with self._cond:
            while not self._stop.is_set():
                if round_id in self._lost:
                    raise RoundLost(f"round {round_id}: the aggregator lost it (restarted)")
                if round_id in self._failures:
                    raise DayVoided(self._failures[round_id])
                done = self._done.get((round_id, step), set())
                expected = self._expected(round_id, step)
                missing = expected - done
                # nobody expected (all absent): wait for the deadline in case they come back
                if expected and not missing:
                    return
                remaining = deadline - time.time()
                if remaining <= 0:
                    late = {c for c, us in self._units.items() if us & missing}
                    self._absent |= late
                    log.warning(
                        "round %d step %s: %d participant(s) of %d credential(s) missed the "
                        "deadline and drop out",
                        round_id,
                        step,
                        len(missing),
                        len(late),
                    )
                    self.view.write("dropout", round=round_id, step=step, participants=len(missing))
                    return
                self._cond.wait(min(remaining, 1.0))
            raise _Stopping

    # The servers' side of a day (``contract.round.DayServers``), under the gateway's lock:
    # devices may be calling while a transition runs.
    def open_round(self, specs: DaySpecs) -> None:
        """Propose the day's round to the aggregator, then open it here."""
        with self.gateway.lock:
            for name, spec in zip(DEPLOYMENTS, specs, strict=True):
                self.links[name].propose(spec)
                self.servers[name].open_round(spec)
        round_id, epoch, day = self._attempt
        self.view.write("open_round", round=round_id, epoch=epoch, day=day)

    def close_registration(self, round_id: int) -> None:
        """Close registration at both deployments."""
        with self.gateway.lock:
            for name in DEPLOYMENTS:
                self.servers[name].close_registration(round_id)

    def close_phase(self, round_id: int, deployment: str, phase: str) -> PhaseReport:
        """Close a phase (agree the surviving set with the aggregator)."""
        with self.gateway.lock:
            report = self.servers[deployment].close_phase(round_id, phase)
        self.view.write("close", round=round_id, phase=phase, surviving=report.surviving)
        return report

    def open_aggregates(self, round_id: int) -> dict[str, np.ndarray]:
        """The opened ring sums of the observations phase."""
        with self.gateway.lock:
            return self.servers[AGGREGATES].open_aggregates_ring(round_id, OBSERVATIONS_PHASE)

    def _behaviour_row(self, epoch: int, day: int) -> tuple[int, bytes]:
        """The behaviour table's row of ``day``'s period, made once per (epoch, period) from
        the public numbers of the epoch's opened aggregates so far and kept (a restarted
        coordinator sends the same row).

        Raises:
            RunFailure: the source failed (an unreachable or non-compliant model endpoint, a
                bad table): the run cannot go on without the devices' public table.
        """
        if self.behaviour is None:
            return 0, b""
        period = day // self.spec.period_days
        rows = self._read(
            "SELECT row FROM behaviour_rows WHERE epoch = ? AND period = ?", (epoch, period)
        )
        if rows:
            return period, bytes(rows[0][0])
        start = period * self.spec.period_days
        cases = self.aggregates(epoch)[:start, 0, :, 0].sum(-1).tolist() if start else []
        config = self.spec.model_config()
        public = public_numbers(
            cases, start, self.spec.period_days, config.stimulus(start // MONTH_DAYS)
        )
        grid = self.spec.archetype_grid()
        try:
            row = np.asarray(self.behaviour.probabilities(grid, public), dtype="<f8")
            BehaviourTable(grid, self.spec.period_days, row[None], self.behaviour.source)
        except (BackendError, ArchetypeError) as err:
            raise RunFailure(f"the behaviour table of period {period}: {err}") from None
        raw = row.tobytes()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO behaviour_rows VALUES (?, ?, ?, ?)",
                (epoch, period, raw, self.behaviour.source),
            )
        self.view.write("behaviour_row", epoch=epoch, period=period, source=self.behaviour.source)
        return period, raw

    def _new_round(self, epoch: int, day: int) -> int:
        with self._tx() as conn:
            rid = int(
                conn.execute("SELECT COALESCE(MAX(round_id), 0) + 1 FROM rounds").fetchone()[0]
            )
            conn.execute(
                "INSERT INTO rounds (round_id, epoch, day, status, opened_unix) "
                "VALUES (?, ?, ?, 'open', ?)",
                (rid, epoch, day, time.time()),
            )
        return rid

    def _end_round(self, round_id: int, status: str, reason: str = "") -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE rounds SET status = ?, ended_unix = ?, reason = ? WHERE round_id = ?",
                (status, time.time(), reason, round_id),
            )

    def _run_day(self, round_id: int, epoch: int, day: int) -> None:
        """One attempt at a day; commits its aggregates. Raises on a server/link failure, or
        when devices void the attempt."""
        specs = round_specs(
            round_id,
            day,
            self.spec.items_per_device,
            self.spec.beacons_per_day,
            self.spec.dp_config(),
        )
        self._attempt = (round_id, epoch, day)
        self._day_row = self._behaviour_row(epoch, day)
        result = run_day(
            self,
            specs,
            day,
            lambda step: self._run_step(round_id, step),
            self.servers[AGGREGATES].codec,
        )
        y = result.y.numpy()
        self.view.write(
            "aggregate",
            round=round_id,
            day=day,
            surviving=result.observations.surviving,
            totals=y[:, :, 0].sum(1).tolist(),
        )
        with self._cond:
            nbytes, self._bytes_in = self._bytes_in, 0
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO days VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    epoch,
                    day,
                    round_id,
                    y.astype("<f8").tobytes(),
                    result.messages.surviving,
                    result.observations.surviving,
                    nbytes,
                ),
            )
            conn.execute(
                "UPDATE rounds SET status = 'committed', ended_unix = ? WHERE round_id = ?",
                (time.time(), round_id),
            )
        self._forget(round_id)

    def _forget(self, round_id: int) -> None:
        """Free a finished (committed or aborted) round's protocol state and progress."""
        with self.gateway.lock:
            for server in self.servers.values():
                server.rounds.pop(round_id, None)
        with self._cond:
            for s in STEPS:
                self._done.pop((round_id, s), None)
            self._lost.discard(round_id)
            self._failures.pop(round_id, None)

    def _wait_for_pools(self) -> None:
        with self._cond:
            while len(self._units) < self.spec.pools and not self._stop.is_set():
                self._cond.wait(1.0)

    def _drive(self) -> None:
        """The round driver thread: every day of every epoch, then ``finished``. Any failure
        it cannot recover from stops the run for good, with the reason published to devices,
        persisted, and in :attr:`failure` (the process exits non-zero)."""
        try:
            self._drive_days()
        except _Stopping:
            return
        except Exception as err:  # recorded, published and re-raised by serve loops as exit 1
            reason = f"{type(err).__name__}: {err}"
            log.exception("the round driver failed; the run stops: %s", reason)
            self._fail(reason)

    def _drive_days(self) -> None:
        self._wait_for_pools()
        backoff = 0.2
        for epoch in range(self.spec.epochs):
            if self._epoch_done(epoch):
                continue
            day = self.committed_days(epoch)
            voided = 0  # attempts of this day that devices voided
            while day < self.spec.days and not self._stop.is_set():
                if not self._await_day_end(day):
                    return
                rid = self._new_round(epoch, day)
                try:
                    self._run_day(rid, epoch, day)
                except (LinkError, SecureSumError, DayVoided) as err:
                    # A crashed or refused, or devices could not finish: the attempt is void
                    # at both servers; run the day again
                    log.warning("round %d (epoch %d day %d) aborted: %s", rid, epoch, day, err)
                    self._end_round(rid, "aborted", f"{type(err).__name__}: {err}")
                    self._forget(rid)
                    with self._cond:
                        # a void attempt says nothing about who is alive: expect everyone
                        self._absent.clear()
                    self.view.write("abort", round=rid, reason=type(err).__name__)
                    if isinstance(err, DayVoided):
                        voided += 1
                        if voided >= MAX_FAILED_ATTEMPTS:
                            raise RunFailure(
                                f"epoch {epoch} day {day}: devices could not complete the day "
                                f"in {voided} attempts (last: {err})"
                            ) from None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff, voided = 0.2, 0
                day += 1
            if self._stop.is_set():
                return
            self._end_epoch(epoch)
        with self._tx() as conn:
            conn.execute("UPDATE run SET finished_unix = ? WHERE id = 1", (time.time(),))
        self._publish(step=FINISHED, deadline=0.0)
        self.finished.set()

    def _await_day_end(self, day: int) -> bool:
        """A run with pilots opens day ``day``'s round once that protocol day is over on the
        run clock (the pilots' radios have heard all of it), at the spec's ``round_at_s`` past
        midnight; False if stopped meanwhile. A simulated run does not wait: its days are
        contact graphs, not hours."""
        if not self.spec.pilots:
            return True
        clock = self.spec.clock()
        end = clock.sim_epoch + (day + 1) * DAY_SECONDS + self.spec.round_at_s
        while not self._stop.is_set():
            left = clock.to_wall(end - clock.now())
            if left <= 0:
                return True
            self._stop.wait(min(left, 1.0))
        return False

    def _fail(self, reason: str) -> None:
        """Stop the run for good: persist and publish why."""
        self.failure = reason
        with self._tx() as conn:
            conn.execute("UPDATE run SET failure = ? WHERE id = 1", (reason,))
        self.view.write("failed", reason=reason.split(":", 1)[0])
        self._publish(step=FAILED, deadline=0.0, failure=reason)

    def _epoch_done(self, epoch: int) -> bool:
        rows = self._read("SELECT loss FROM epochs WHERE epoch = ?", (epoch,))
        return bool(rows) and rows[0][0] is not None

    # -- loss, gradient, θ step ---------------------------------------------------------------
    def aggregates(self, epoch: int) -> np.ndarray:
        """The committed aggregates of an epoch: dual (T, 2, G, 1 + p)."""
        rows = self._read("SELECT y FROM days WHERE epoch = ? ORDER BY day", (epoch,))
        return np.stack([np.frombuffer(r[0], "<f8") for r in rows]).reshape(
            -1, *observations_shape()
        )

    def loss_and_grad(self, epoch: int) -> tuple[float, torch.Tensor]:
        """``L(Y)`` and ``dL/dθ`` from an epoch's opened aggregates."""
        return loss_and_grad(torch.from_numpy(self.aggregates(epoch)), self.spec.loss_fn())

    def _end_epoch(self, epoch: int) -> None:
        """Record the epoch's loss and gradient; with more epochs to go, step θ with the
        calibration's optimizer (``sim.calibration.ThetaOptimizer``), whose state is kept."""
        loss, grad = self.loss_and_grad(epoch)
        (row,) = self._read("SELECT adam FROM epochs WHERE epoch = ?", (epoch,))
        optimizer = ThetaOptimizer(Theta(**self.spec.theta), self.spec.fit, self.spec.lr)
        if row[0]:
            optimizer.load_state_dict(json.loads(row[0]))
        new = Theta.from_tensor(optimizer.step(grad, BASE_PARAMS))
        with self._tx() as conn:
            conn.execute(
                "UPDATE epochs SET loss = ?, grad = ? WHERE epoch = ?",
                (loss, json.dumps(grad.tolist()), epoch),
            )
            if epoch + 1 < self.spec.epochs:
                conn.execute(
                    "INSERT OR REPLACE INTO epochs (epoch, theta, adam) VALUES (?, ?, ?)",
                    (epoch + 1, json.dumps(new.to_dict()), json.dumps(optimizer.state_dict())),
                )
        self.view.write("epoch", epoch=epoch, loss=loss, grad=grad.tolist())
        log.info("epoch %d: loss %.6g", epoch, loss)

    # -- lifecycle ----------------------------------------------------------------------------
    def serve(self, listen: str, enrol_listen: str) -> tuple[int, int]:
        """Start the gateway (mutual TLS) on ``listen``, the enrolment endpoint (server TLS
        only: a new device has no certificate yet) on ``enrol_listen``, and the round driver.
        Port 0 picks a free port; returns (gateway port, enrolment port).

        gRPC's Python server can require client certificates or not ask for them at all, so
        enrolment gets its own port; there every RPC but Enrol answers UNAUTHENTICATED.
        """
        if self.insecure:
            require_loopback(listen, "--listen")
            require_loopback(enrol_listen, "--enrol-listen")
        pem = self.ca.ensure_credential(
            "gateway", Purpose.SERVER, common_name="coordinator"
        ).grpc_pem()
        ports = []
        for address, mutual in ((listen, True), (enrol_listen, False)):
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=16), options=server_options(Channel.DEVICE)
            )
            pb_grpc.add_DeviceGatewayServicer_to_server(self.gateway, server)
            creds = grpc.ssl_server_credentials(
                [(pem.private_key, pem.certificate_chain)],
                pem.root_certificates if mutual else None,
                require_client_auth=mutual,
            )
            if self.insecure:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, creds)
            if port == 0:
                raise ServiceError(f"cannot listen on {address}")
            server.start()
            self._servers.append(server)
            ports.append(port)
        self.start_driver()
        return ports[0], ports[1]

    def start_driver(self) -> None:
        """Start the round driver (the gRPC gateway's :meth:`serve`, or the Flower transport's
        ServerApp, moves the devices)."""
        self._driver = threading.Thread(target=self._drive, name="round-driver", daemon=True)
        self._driver.start()

    def driving(self) -> bool:
        """Whether the round driver is running (or finished the run)."""
        return self.finished.is_set() or (self._driver is not None and self._driver.is_alive())

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop the driver and the server; the state dir keeps everything committed."""
        self._stop.set()
        self.gateway.drain()
        with self._cond:
            self._cond.notify_all()
        for server in self._servers:
            server.stop(grace_s).wait()
        if self._driver is not None:
            self._driver.join(timeout=10)
        self._a_channel.close()
        self.view.close()
        if self.transcript is not None:
            self.transcript.close()
        self.registry.close()
        self.db.close()
