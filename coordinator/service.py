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
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from audit.transcript import TranscriptError, TranscriptWriter, load_auditor_public
from coordinator.enrolment import EnrolmentRegistry
from coordinator.grpc_gateway import DeviceGatewayServicer
from coordinator.grpc_link import COORDINATOR_CN, AggregatorLinkClient, LinkError
from coordinator.pki import LocalCA, Purpose
from coordinator.rounds import (
    MESSAGES_PHASE,
    OBSERVATIONS_PHASE,
    STEPS,
    aggregates_codec,
    neighbourhood_codec,
    round_specs,
)
from coordinator.runspec import RunSpec
from coordinator.store import open_db, transaction
from coordinator.wire import deployment_to_pb, mode_to_pb
from proto.decentsim.v1 import common_pb2
from proto.decentsim.v1 import device_pb2 as pb
from proto.decentsim.v1 import device_pb2_grpc as pb_grpc
from proto.limits import Channel, channel_options, server_options
from protocols.secure_sum import AggregatorServer, CoordinatorServer, Deployment, KeyPair, Mode
from protocols.secure_sum.errors import RoundLost, SecureSumError
from sim import dual
from sim.calibration import ObservedSeries, series_loss
from sim.model import OBSERVATIONS
from sim.params import PARAM_NAMES, Theta
from sim.populations import AGE_GROUPS
from sim.runner import total_infections

log = logging.getLogger(__name__)

#: The deployments of a run, by name: pseudonym-slot phases and aggregate phases.
DEPLOYMENTS = ("neighbourhood", "aggregates")
#: Most participant ids one credential may ask for.
MAX_UNITS_PER_CREDENTIAL = 4096
#: Longest GetRound long poll the coordinator holds.
MAX_WAIT_MS = 5_000

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
)


#: a server's DP noise secret, in its state dir
NOISE_FILE = "noise.json"


class ServiceError(Exception):
    """The coordinator cannot run as configured; the message names the file or setting."""


def write_secret(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (atomic replace)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_or_create_keys(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """32-byte secrets by name, created from the OS CSPRNG on first use and kept in ``path``."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ServiceError(f"{path}: key file is readable by group/others; chmod 600 it")
        try:
            raw = json.loads(path.read_text())
            keys = {n: bytes.fromhex(raw[n]) for n in names}
        except (ValueError, KeyError) as e:
            raise ServiceError(f"{path}: corrupt key file ({type(e).__name__}: {e})") from None
        if any(len(k) != 32 for k in keys.values()):
            raise ServiceError(f"{path}: every key must be 32 bytes")
        return keys
    keys = {n: os.urandom(32) for n in names}
    write_secret(path, json.dumps({n: k.hex() for n, k in keys.items()}).encode())
    return keys


def load_noise_secret(state_dir: Path) -> bytes:
    """This server's DP noise secret (``noise.json``, 0600), created on first use; it never
    leaves the state dir."""
    return load_or_create_keys(state_dir / NOISE_FILE, ("aggregate_noise",))["aggregate_noise"]


def read_public_keys(path: Path, what: str) -> dict[str, bytes]:
    """The peer's exported X25519 public keys by deployment (``<peer>_public.json``)."""
    try:
        raw = json.loads(path.read_text())
        keys = {n: bytes.fromhex(raw[n]) for n in DEPLOYMENTS}
    except FileNotFoundError:
        raise ServiceError(f"{path}: {what} public keys not found (run its init)") from None
    except (ValueError, KeyError) as e:
        raise ServiceError(f"{path}: not a public-key file ({type(e).__name__}: {e})") from None
    bad = [n for n, k in keys.items() if len(k) != 32]
    if bad:
        raise ServiceError(f"{path}: public key(s) {bad} are not 32 bytes")
    return keys


class ViewLog:
    """A server's recorded view: one JSON object per line, events and sizes only."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        """Append one event (``t`` = unix time)."""
        line = json.dumps({"t": round(time.time(), 3), "event": event, **fields})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._file.close()


def open_transcript(
    audit_key: Path | None,
    state_dir: Path,
    role: str,
    servers: dict[str, CoordinatorServer] | dict[str, AggregatorServer],
) -> TranscriptWriter | None:
    """With an auditor public key: ``views/<role>.transcript``, recording every message of
    ``servers`` (by deployment name), each record sealed to the auditor. Without: ``None``."""
    if audit_key is None:
        return None
    try:
        writer = TranscriptWriter(
            state_dir / "views" / f"{role}.transcript", role, load_auditor_public(audit_key)
        )
    except TranscriptError as e:
        raise ServiceError(f"--audit-key: {e}") from None
    for name, server in servers.items():
        server.observer = functools.partial(_record, writer, name)
    return writer


def _record(
    writer: TranscriptWriter, deployment: str, direction: str, peer: str, raw: bytes
) -> None:
    writer.record(direction, deployment, peer, raw)


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


@dataclass
class _Step:
    """The run's position: what GetRound publishes."""

    round_id: int = 0
    epoch: int = 0
    day: int = 0
    step: str = "enrolling"
    deadline: float = 0.0
    version: int = 1


class CoordinatorService:
    """The coordinator of one federated run (see the module docstring).

    Args:
        state_dir: identity, database and view log (created by :func:`coordinator_init`).
        spec: the run; ``None`` resumes the run persisted in ``state_dir``.
        aggregator: ``HOST:PORT`` of the aggregator's link.
        aggregator_export: the aggregator's export dir (``ca.pem``, ``aggregator_public.json``).
        insecure: DEBUGGING ONLY: no TLS anywhere; a caller names its credential in metadata.
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
        a_public = read_public_keys(aggregator_export / "aggregator_public.json", "aggregator")
        mode = Mode(self.spec.mode)
        codecs = {"neighbourhood": neighbourhood_codec(), "aggregates": aggregates_codec()}
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
        for name in DEPLOYMENTS:
            pair = KeyPair.from_private_bytes(keys[name])
            dkey = keys["deployment_key"] if name == "neighbourhood" else b""
            self.deployments[name] = Deployment(
                mode, codecs[name], pair.public, a_public[name], dkey
            )
            self.links[name] = AggregatorLinkClient(self._a_channel, mode, name, timeout_s=120.0)
            self.servers[name] = CoordinatorServer(pair, self.deployments[name], self.links[name])
        #: every message in and out, sealed to the auditor (only with ``--audit-key``)
        self.transcript = open_transcript(audit_key, state_dir, "coordinator", self.servers)
        self.servers["neighbourhood"].min_cohort = self.spec.min_cohort
        # C's own DP noise secret (persisted: a re-opened release gets the same noise)
        self.servers["aggregates"].noise_secret = load_noise_secret(state_dir)
        self.gateway = DeviceGatewayServicer(
            self.servers["neighbourhood"],
            self.servers["aggregates"],
            authenticate=self.registry.authenticate,
            service=self,
            insecure=insecure,
        )
        self._cond = threading.Condition()
        self._pos = _Step()
        self._done: dict[tuple[int, str], set[bytes]] = {}
        self._absent: set[str] = set()
        self._lost: set[int] = set()
        self._bytes_in = 0
        self._stop = threading.Event()
        self.finished = threading.Event()
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
        enrolment = self.registry.redeem(request.token, pem)
        units = [os.urandom(16) for _ in range(request.device_count)]
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO credentials (credential, units, enrolled_unix) VALUES (?, ?, ?)",
                (enrolment.device_id, b"".join(units), time.time()),
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
            deployment=deployment_to_pb("neighbourhood", self.deployments["neighbourhood"]),
            deployments=[deployment_to_pb(n, self.deployments[n]) for n in DEPLOYMENTS],
            issued_unix_ms=int(time.time() * 1000),
            expires_unix_ms=int(enrolment.not_after.timestamp() * 1000),
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
        step = {
            "RegisterSlots": "register",
            "PostShares": "messages",
            "FetchSums": "fetch",
            "SubmitAggregates": "observations",
        }.get(rpc)
        with self._cond:
            self._bytes_in += nbytes
            if step is not None:
                self._done.setdefault((round_id, step), set()).add(participant)
                self._cond.notify_all()
        self.view.write(rpc, round=round_id, participant=participant.hex(), bytes=nbytes)

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
        if step == "fetch":  # only registrants have sums to fetch
            units &= self._done.get((round_id, "register"), set())
        return units

    def _run_step(self, round_id: int, step: str) -> None:
        """Publish ``step`` and wait until every expected participant acted or the deadline."""
        deadline = time.time() + self.spec.step_timeout_s
        self._publish(step=step, deadline=deadline)
        with self._cond:
            while not self._stop.is_set():
                if round_id in self._lost:
                    raise RoundLost(f"round {round_id}: the aggregator lost it (restarted)")
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
        """One attempt at a day; commits its aggregates. Raises on a server/link failure."""
        spec_m, spec_o = round_specs(
            round_id, day, self.spec.items_per_device, self.spec.dp_config()
        )
        lock = self.gateway.lock
        with lock:
            for name, spec in (("neighbourhood", spec_m), ("aggregates", spec_o)):
                self.links[name].propose(spec)
                self.servers[name].open_round(spec)
        self.view.write("open_round", round=round_id, epoch=epoch, day=day)
        self._publish(round_id=round_id, epoch=epoch, day=day)
        self._run_step(round_id, "register")
        with lock:
            for name in DEPLOYMENTS:
                self.servers[name].close_registration(round_id)
        self._run_step(round_id, "messages")
        with lock:
            report_m = self.servers["neighbourhood"].close_phase(round_id, MESSAGES_PHASE)
        self.view.write("close", round=round_id, phase=MESSAGES_PHASE, surviving=report_m.surviving)
        self._run_step(round_id, "fetch")
        self._run_step(round_id, "observations")
        with lock:
            agg = self.servers["aggregates"]
            report_o = agg.close_phase(round_id, OBSERVATIONS_PHASE)
            ring = agg.open_aggregates_ring(round_id, OBSERVATIONS_PHASE)
        width = 1 + len(PARAM_NAMES)
        y = agg.codec.decode(np.asarray(ring[f"global/day/{day}"]))
        y = y.reshape(len(OBSERVATIONS), len(AGE_GROUPS), width)
        self.view.write(
            "aggregate",
            round=round_id,
            day=day,
            surviving=report_o.surviving,
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
                    report_m.surviving,
                    report_o.surviving,
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

    def _wait_for_pools(self) -> None:
        with self._cond:
            while len(self._units) < self.spec.pools and not self._stop.is_set():
                self._cond.wait(1.0)

    def _drive(self) -> None:
        self._wait_for_pools()
        backoff = 0.2
        for epoch in range(self.spec.epochs):
            if self._epoch_done(epoch):
                continue
            day = self.committed_days(epoch)
            while day < self.spec.days and not self._stop.is_set():
                rid = self._new_round(epoch, day)
                try:
                    self._run_day(rid, epoch, day)
                except (LinkError, SecureSumError) as err:
                    # A crashed or refused: the attempt is void at both servers; run the day again
                    log.warning("round %d (epoch %d day %d) aborted: %s", rid, epoch, day, err)
                    self._end_round(rid, "aborted", f"{type(err).__name__}: {err}")
                    self._forget(rid)
                    with self._cond:
                        # a void attempt says nothing about who is alive: expect everyone
                        self._absent.clear()
                        self._lost.discard(rid)
                    self.view.write("abort", round=rid, reason=type(err).__name__)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
                day += 1
            if self._stop.is_set():
                return
            self._end_epoch(epoch)
        with self._tx() as conn:
            conn.execute("UPDATE run SET finished_unix = ? WHERE id = 1", (time.time(),))
        self._publish(step="finished", deadline=0.0)
        self.finished.set()

    def _epoch_done(self, epoch: int) -> bool:
        rows = self._read("SELECT loss FROM epochs WHERE epoch = ?", (epoch,))
        return bool(rows) and rows[0][0] is not None

    # -- loss, gradient, θ step ---------------------------------------------------------------
    def loss_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The run's loss on (T, 2, G) aggregates: the target's, else total new infections."""
        if self.spec.target is None:
            return total_infections
        target = ObservedSeries(
            torch.tensor(self.spec.target, dtype=torch.float64), self.spec.target_period_days
        )
        return series_loss(target)

    def aggregates(self, epoch: int) -> torch.Tensor:
        """The committed aggregates of an epoch: dual (T, 2, G, 1 + p)."""
        rows = self._read("SELECT y FROM days WHERE epoch = ? ORDER BY day", (epoch,))
        width = 1 + len(PARAM_NAMES)
        return torch.from_numpy(
            np.stack([np.frombuffer(r[0], "<f8") for r in rows]).reshape(
                -1, len(OBSERVATIONS), len(AGE_GROUPS), width
            )
        )

    def loss_and_grad(self, epoch: int) -> tuple[float, torch.Tensor]:
        """``L(Y)`` and ``dL/dθ = Σ_t ∂L/∂Y_t · dY_t/dθ`` from an epoch's opened aggregates."""
        y = self.aggregates(epoch)
        leaf = dual.value(y).detach().requires_grad_(True)
        loss = self.loss_fn()(leaf)
        (g,) = torch.autograd.grad(loss, leaf)
        return float(loss.detach()), torch.einsum("tkg,tkgp->p", g, dual.tangent(y))

    def _end_epoch(self, epoch: int) -> None:
        """Record the epoch's loss and gradient; with more epochs to go, step θ (Adam, log θ)."""
        loss, grad = self.loss_and_grad(epoch)
        theta = self.theta(epoch)
        (row,) = self._read("SELECT adam FROM epochs WHERE epoch = ?", (epoch,))
        adam = (
            json.loads(row[0])
            if row[0]
            else {"m": [0.0] * len(PARAM_NAMES), "v": [0.0] * len(PARAM_NAMES)}
        )
        t = theta.as_tensor()
        fit = torch.tensor([n in ("beta", "init_frac") for n in PARAM_NAMES], dtype=torch.float64)
        g = grad * t * fit  # chain rule through θ = exp(log θ)
        m = 0.9 * torch.tensor(adam["m"]) + 0.1 * g
        v = 0.999 * torch.tensor(adam["v"]) + 0.001 * g * g
        k = epoch + 1
        step = self.spec.lr * (m / (1 - 0.9**k)) / (torch.sqrt(v / (1 - 0.999**k)) + 1e-8)
        new = Theta.from_tensor(torch.where(fit > 0, torch.exp(torch.log(t) - step), t))
        with self._tx() as conn:
            conn.execute(
                "UPDATE epochs SET loss = ?, grad = ? WHERE epoch = ?",
                (loss, json.dumps(grad.tolist()), epoch),
            )
            if epoch + 1 < self.spec.epochs:
                conn.execute(
                    "INSERT OR REPLACE INTO epochs (epoch, theta, adam) VALUES (?, ?, ?)",
                    (
                        epoch + 1,
                        json.dumps(vars_theta(new)),
                        json.dumps({"m": m.tolist(), "v": v.tolist()}),
                    ),
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


def vars_theta(theta: Theta) -> dict[str, float]:
    """θ as a plain dict."""
    return {n: float(getattr(theta, n)) for n in PARAM_NAMES}
