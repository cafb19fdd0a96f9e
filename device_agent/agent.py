"""The device-agent process (``decentsim device-agent run``): a device pool on the wire.

The agent enrols once with a single-use token (TLS, server authenticated by the coordinator's
CA certificate the operator installed; its own key never leaves its state dir), then connects
with mutual TLS and follows the coordinator's round schedule (``GetRound`` long polls), acting
on each step of each round:

    register → messages → fetch (and the local update f) → observations

Everything that must survive a crash lives in the pool's own SQLite store (WAL, ``0600``): its
credential and participant ids, the run's deployments (with the secret pseudonym-slot key), its
secret (from which every participant derives the randomness of its requests, so a restarted
agent resends byte-identical requests: the servers see replays, never conflicts), the
start-of-day state of every day (the agent resumes or re-runs a day from it), its devices'
contact log of the last 14 days (heard RPIs and weights), and its own daily observation totals
(a local diagnostic). The store never leaves the device.

A pool loads its own agents' slice of the population itself; the coordinator never receives an
agent's attributes. In a simulated federation the pool's radio is driven by the population's
contact layers (``SimulatedWorld``); every pool of a run shares the world's beacon secret.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from coordinator.enrolment import build_enrolment_csr
from coordinator.grpc_gateway import CREDENTIAL_METADATA
from coordinator.pki import generate_private_key
from coordinator.rounds import STEPS, round_specs
from coordinator.runspec import RunSpec
from coordinator.store import open_db, transaction
from coordinator.wire import deployment_from_pb
from device_agent.grpc_client import (
    AwaitingReply,
    GatewayLink,
    RetryPolicy,
    Role,
    TransportError,
)
from device_agent.pool import UNIT_DEVICES, DevicePool, SimulatedWorld
from proto.decentsim.v1 import device_pb2 as pb
from proto.decentsim.v1 import device_pb2_grpc as pb_grpc
from proto.limits import Channel, channel_options
from protocols.ble.radio import IdealRadio, Radio, SimulatedRadio
from protocols.ble.scoring import Trace
from protocols.ble.simkeys import SimulatedKeyring
from protocols.secure_sum import DeviceClient, RoundSpec
from protocols.secure_sum.errors import SecureSumError
from protocols.secure_sum.slots import SlotTable
from sim.model import State
from sim.params import PARAM_NAMES
from sim.populations import Population, from_spec

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_MIGRATIONS = (
    """
    CREATE TABLE credential (id INTEGER PRIMARY KEY CHECK (id = 1), key_pem BLOB NOT NULL,
                             enrolment BLOB NOT NULL, secret BLOB NOT NULL);
    CREATE TABLE states (epoch INTEGER NOT NULL, day INTEGER NOT NULL, state BLOB NOT NULL,
                         PRIMARY KEY (epoch, day));
    CREATE TABLE observed (epoch INTEGER NOT NULL, day INTEGER NOT NULL, round_id INTEGER NOT NULL,
                           y BLOB NOT NULL, PRIMARY KEY (epoch, day));
    CREATE TABLE traces (epoch INTEGER NOT NULL, day INTEGER NOT NULL, entries INTEGER NOT NULL,
                         observer BLOB NOT NULL, rpi BLOB NOT NULL, weight BLOB NOT NULL,
                         PRIMARY KEY (epoch, day));
    """,
    # an Enrol request in flight over a transport that answers later (Flower): kept so the
    # redone request is byte-identical (a new key would make it a different request)
    """
    CREATE TABLE pending_enrolment (id INTEGER PRIMARY KEY CHECK (id = 1),
                                    key_pem BLOB NOT NULL, request BLOB NOT NULL);
    """,
)
#: Days of contact log a device keeps (Exposure Notification keeps 14).
TRACE_RETENTION_DAYS = 14


class AgentError(Exception):
    """The agent cannot go on; the message says why."""


def parse_slice(text: str) -> tuple[int, int]:
    """``I/P`` → (I, P): this pool takes the I-th of P contiguous agent ranges."""
    try:
        i, p = (int(x) for x in text.split("/"))
    except ValueError:
        raise AgentError(f"--slice {text!r}: expected I/P, e.g. 0/4") from None
    if not (p >= 1 and 0 <= i < p):
        raise AgentError(f"--slice {text!r}: need 0 <= I < P")
    return i, p


def slice_ids(n_agents: int, index: int, count: int) -> torch.Tensor:
    """The agent ids of slice ``index`` of ``count`` contiguous ranges."""
    bounds = np.linspace(0, n_agents, count + 1).astype(np.int64)
    return torch.arange(int(bounds[index]), int(bounds[index + 1]), dtype=torch.int64)


def state_to_bytes(state: State) -> bytes:
    """Serialize a pool's state (its devices' private state: stays in the pool's store)."""
    buf = io.BytesIO()
    torch.save({f.name: getattr(state, f.name) for f in fields(state)}, buf)
    return buf.getvalue()


def state_from_bytes(raw: bytes) -> State:
    """Inverse of :func:`state_to_bytes` (tensors only: ``weights_only``)."""
    return State(**torch.load(io.BytesIO(raw), weights_only=True))


class PoolStore:
    """The pool's private SQLite store (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = open_db(state_dir / "pool.sqlite3", migrations=_MIGRATIONS)

    def enrolment(self) -> tuple[bytes, pb.EnrolResponse, bytes] | None:
        """(private key PEM, Enrol reply, pool secret), once enrolled."""
        row = self.db.execute("SELECT key_pem, enrolment, secret FROM credential").fetchone()
        if row is None:
            return None
        return bytes(row[0]), pb.EnrolResponse.FromString(bytes(row[1])), bytes(row[2])

    def save_enrolment(self, key_pem: bytes, reply: pb.EnrolResponse) -> None:
        """Keep the credential and a fresh pool secret (atomically, before first use)."""
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO credential VALUES (1, ?, ?, ?)",
                (key_pem, reply.SerializeToString(), os.urandom(32)),
            )
            conn.execute("DELETE FROM pending_enrolment")

    def pending_enrolment(
        self, make: Callable[[], tuple[bytes, pb.EnrolRequest]]
    ) -> tuple[bytes, pb.EnrolRequest]:
        """The Enrol request in flight (key PEM, request), made by ``make`` and kept first."""
        row = self.db.execute("SELECT key_pem, request FROM pending_enrolment").fetchone()
        if row is not None:
            return bytes(row[0]), pb.EnrolRequest.FromString(bytes(row[1]))
        key_pem, request = make()
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO pending_enrolment VALUES (1, ?, ?)",
                (key_pem, request.SerializeToString()),
            )
        return key_pem, request

    def state(self, epoch: int, day: int) -> State | None:
        """The stored start-of-day state, if any."""
        row = self.db.execute(
            "SELECT state FROM states WHERE epoch = ? AND day = ?", (epoch, day)
        ).fetchone()
        return None if row is None else state_from_bytes(bytes(row[0]))

    def save_state(self, epoch: int, day: int, state: State) -> None:
        """Keep the start-of-day state of (epoch, day)."""
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO states VALUES (?, ?, ?)",
                (epoch, day, state_to_bytes(state)),
            )

    def save_observed(self, epoch: int, day: int, round_id: int, y: torch.Tensor) -> None:
        """Keep the pool's own observation total of a day (a local diagnostic)."""
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO observed VALUES (?, ?, ?, ?)",
                (epoch, day, round_id, y.numpy().astype("<f8").tobytes()),
            )

    def save_trace(self, epoch: int, day: int, trace: Trace) -> None:
        """Keep the day's contact log (who heard which RPI, with what weight); days older
        than :data:`TRACE_RETENTION_DAYS` are deleted."""
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO traces VALUES (?, ?, ?, ?, ?, ?)",
                (
                    epoch,
                    day,
                    len(trace.observer),
                    trace.observer.astype("<i8").tobytes(),
                    np.ascontiguousarray(trace.rpi).tobytes(),
                    trace.weight.astype("<f8").tobytes(),
                ),
            )
            conn.execute(
                "DELETE FROM traces WHERE epoch < ? OR (epoch = ? AND day <= ?)",
                (epoch, epoch, day - TRACE_RETENTION_DAYS),
            )

    def trace_days(self) -> list[tuple[int, int, int]]:
        """(epoch, day, entries) of the contact log kept."""
        return [
            (int(e), int(d), int(n))
            for e, d, n in self.db.execute(
                "SELECT epoch, day, entries FROM traces ORDER BY epoch, day"
            ).fetchall()
        ]

    def observed(self, epoch: int) -> dict[int, np.ndarray]:
        """The pool's own observation totals of an epoch, by day."""
        rows = self.db.execute(
            "SELECT day, y FROM observed WHERE epoch = ? ORDER BY day", (epoch,)
        ).fetchall()
        return {d: np.frombuffer(y, "<f8") for d, y in rows}


def participant_secret(pool_secret: bytes, index: int) -> bytes:
    """The secret of the pool's participant ``index`` (HKDF-SHA256 of the pool secret)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"decentsim/v1/participant" + index.to_bytes(4, "big"),
    ).derive(pool_secret)


@dataclass(frozen=True)
class AgentConfig:
    """How to run one device-agent process."""

    coordinator: str
    state_dir: Path
    ca_pem: Path
    population: str
    population_seed: int = 0
    slice: tuple[int, int] = (0, 1)
    token: str | None = None
    enrol_address: str | None = None
    world_secret: bytes | None = None
    #: DEBUGGING ONLY: plaintext gRPC; the credential is named in call metadata
    insecure: bool = False
    policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=8, timeout_s=120.0))


def _retry(call: Callable[[], _T], what: str, give_up_s: float = 600.0) -> _T:
    """Call until it succeeds, backing off on UNAVAILABLE (a server restarting)."""
    start, wait = time.time(), 0.2
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AgentError(f"{what} failed with {err.code().name}: {err.details()}") from err
            if time.time() - start > give_up_s:
                raise AgentError(f"{what}: coordinator unreachable for {give_up_s:.0f} s") from err
            log.info("%s: %s, retrying in %.1f s", what, err.code().name, wait)
            time.sleep(wait)
            wait = min(wait * 2, 2.0)


def _channel(target: str, creds: grpc.ChannelCredentials, insecure: bool) -> grpc.Channel:
    """A TLS channel, or (``--insecure``, debugging only) a plaintext one."""
    opts = channel_options(Channel.DEVICE)
    if insecure:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, creds, options=opts)


class _CredentialMetadata(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """``--insecure`` only: name the credential in every call's metadata (nothing proves it)."""

    def __init__(self, credential: str) -> None:
        self._item = (CREDENTIAL_METADATA, credential)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._item]
        return continuation(details._replace(metadata=metadata), request)


def enrolment_request(token: str, device_count: int) -> tuple[bytes, pb.EnrolRequest]:
    """A new key pair (PEM, unencrypted: it goes into the pool's 0600 store) and the Enrol
    request for it."""
    key = generate_private_key()
    csr_der = x509.load_pem_x509_csr(build_enrolment_csr(key)).public_bytes(
        serialization.Encoding.DER
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    request = pb.EnrolRequest(
        token=token, csr_der=csr_der, device_count=device_count, agent_version="1"
    )
    return key_pem, request


def enrol(config: AgentConfig, store: PoolStore, device_count: int) -> None:
    """Redeem the token: a new key pair here, a certificate from the coordinator."""
    if config.token is None or config.enrol_address is None:
        raise AgentError(f"{config.state_dir}: not enrolled yet: give --token and --enrol")
    key_pem, req = enrolment_request(config.token, device_count)
    ca = config.ca_pem.read_bytes()
    channel = _channel(
        config.enrol_address,
        grpc.ssl_channel_credentials(ca),
        config.insecure,
    )
    try:
        stub = pb_grpc.DeviceGatewayStub(channel)
        reply = _retry(lambda: stub.Enrol(req, timeout=30), "Enrol")
    finally:
        channel.close()
    store.save_enrolment(key_pem, reply)


def pem_of_der(der: bytes) -> bytes:
    """A DER certificate as PEM."""
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def load_slice(config: AgentConfig) -> tuple[Population, torch.Tensor]:
    """The population and this pool's agent ids (its slice); the pool loads its own agents."""
    population = from_spec(config.population, seed=config.population_seed)
    ids = slice_ids(population.n_agents, *config.slice)
    if ids.numel() == 0:
        raise AgentError(f"slice {config.slice} of {population.n_agents} agents is empty")
    return population, ids


def units_of(ids: torch.Tensor) -> int:
    """Secure-sum participants a pool of these devices needs."""
    return -(-ids.numel() // UNIT_DEVICES)


class PoolRunner:
    """A device pool following the coordinator's round schedule, over any transport.

    ``stub`` is anything with the DeviceGateway's unary methods (``RegisterSlots(request,
    timeout=…)``, …): a gRPC stub, or the Flower transport's tunnel. The runner acts on each
    schedule it is shown (:meth:`follow`); every step is safe to redo (its requests are
    byte-identical), which is how a failed or interrupted step is retried.
    """

    def __init__(
        self,
        config: AgentConfig,
        store: PoolStore,
        stub: Any,
        population: Population,
        ids: torch.Tensor,
    ) -> None:
        self.config = config
        self.store = store
        self.population = population
        self.ids = ids
        enrolled = store.enrolment()
        if enrolled is None:
            raise AgentError(f"{config.state_dir}: not enrolled")
        _, reply, self.secret = enrolled
        units = units_of(ids)
        if len(reply.devices) != units:
            raise AgentError(
                f"{config.state_dir}: enrolled with {len(reply.devices)} participants but this "
                f"slice needs {units}"
            )
        self.units = [bytes(d.value) for d in reply.devices]
        deployments = {d.deployment_id: deployment_from_pb(d) for d in reply.deployments}
        self.neighbourhood, self.aggregates = (
            deployments["neighbourhood"],
            deployments["aggregates"],
        )
        self.stub = stub
        self._directory: dict[int, SlotTable] = {}
        self.pool: DevicePool | None = None
        self.spec: RunSpec | None = None
        self._day_key: tuple[int, int, int] | None = None  # (epoch, day, round id) in work
        self._done: set[str] = set()

    def _connect(self, unit: int, devices: int) -> tuple[DeviceClient, DeviceClient]:
        pid = self.units[unit]
        secret = participant_secret(self.secret, unit)
        policy = self.config.policy
        nbhd = GatewayLink(self.stub, pid, Role.NEIGHBOURHOOD, policy)
        aggr = GatewayLink(self.stub, pid, Role.AGGREGATES, policy)
        return (
            DeviceClient(
                pid, self.neighbourhood, nbhd, self._directory, devices=devices, secret=secret
            ),
            DeviceClient(pid, self.aggregates, aggr, devices=1, secret=secret),
        )

    def _build_pool(self, spec: RunSpec) -> DevicePool:
        world_secret = self.config.world_secret
        if world_secret is None:
            raise AgentError("a simulated federation needs the world's beacon secret")
        keyring = SimulatedKeyring(world_secret)
        radio: Radio = (
            IdealRadio(keyring) if spec.radio == "ideal" else SimulatedRadio(keyring, spec.seed)
        )
        config = spec.model_config()
        world = SimulatedWorld(
            self.population, config, radio, spec.advertising_intervals, self.ids.numpy()
        )
        infected = self.population.initially_infected
        return DevicePool(
            self.ids,
            self.population.age_group[self.ids],
            config,
            spec.seed,
            keyring,
            world,
            self._connect,
            None if infected is None else infected[self.ids],
        )

    def follow(self, sched: pb.RoundSchedule) -> bool:
        """Act on one schedule (a step of a round); False if the step must be retried later
        (a transport failure: its requests did not all get answers)."""
        if sched.step not in STEPS:
            return True
        if self.pool is None:
            self.spec = RunSpec.from_json(sched.run_json, "the coordinator's run_json")
            self.pool = self._build_pool(self.spec)
        key = (sched.epoch, sched.day, sched.round_id)
        if key != self._day_key:
            self._start_day(sched)
            self._day_key, self._done = key, set()
        if sched.step in self._done:
            return True
        return self._act(sched, self._done)

    def _theta(self, sched: pb.RoundSchedule) -> torch.Tensor:
        if list(sched.theta.names) != list(PARAM_NAMES):
            raise AgentError(f"θ names {list(sched.theta.names)} differ from {PARAM_NAMES}")
        return torch.tensor(list(sched.theta.values), dtype=torch.float64)

    def _start_day(self, sched: pb.RoundSchedule) -> None:
        """Load the start-of-day state of the schedule's (epoch, day) (day 0: draw it)."""
        pool = self.pool
        assert pool is not None
        theta = self._theta(sched)
        stored = self.store.state(sched.epoch, sched.day)
        if stored is not None:
            pool.restore(theta, stored)
            return
        if sched.day != 0:
            raise AgentError(
                f"no stored state for epoch {sched.epoch} day {sched.day}: this pool missed "
                "earlier days and cannot rejoin the run"
            )
        pool.begin(theta)
        assert pool.state is not None
        self.store.save_state(sched.epoch, 0, pool.state)

    def _finish_day(self, sched: pb.RoundSchedule, spec_m: RoundSpec) -> None:
        """Fetch and update (a participant without sums updates with zero incoming); keep the
        next day's start state before anything else can fail."""
        pool = self.pool
        assert pool is not None
        pool.finish_day(spec_m, sched.day, self._theta(sched))
        assert pool.state is not None
        self.store.save_state(sched.epoch, sched.day + 1, pool.state)

    def _act(self, sched: pb.RoundSchedule, done: set[str]) -> bool:
        pool = self.pool
        assert pool is not None and self.spec is not None
        spec_m, spec_o = _specs(sched, self.spec)
        theta = self._theta(sched)
        step, day = sched.step, sched.day
        try:
            if step != "register" and "register" not in done:
                # a process (re)started mid-round: replay its registration (byte-identical, so
                # the coordinator answers from its record) to learn its slots; if it had not
                # registered before the step closed, it has none this round
                try:
                    pool.register(spec_m, day)
                except SecureSumError as err:
                    log.warning("round %d: no registration (%s)", sched.round_id, err)
                done.add("register")
            if step == "register":
                pool.register(spec_m, day)
            elif step == "messages":
                pool.post_messages(spec_m, day, theta)
                if pool.last_trace is not None:
                    self.store.save_trace(sched.epoch, day, pool.last_trace)
            elif step == "fetch":
                self._finish_day(sched, spec_m)
            elif step == "observations":
                if "fetch" not in done:
                    self._finish_day(sched, spec_m)
                    done.add("fetch")
                pool.post_observations(spec_o, day)
                assert pool.last_y is not None
                self.store.save_observed(sched.epoch, day, sched.round_id, pool.last_y)
        except SecureSumError as err:
            # e.g. the step closed while we were down: we drop out of it; the refusal names no
            # value. A device that missed a step still updates (finish_day) later.
            log.warning("round %d step %s refused: %s", sched.round_id, step, err)
        except AwaitingReply:
            return False  # the tunnel delivers the replies with the next message
        except TransportError as err:
            log.warning(
                "round %d step %s: transport failed, will retry: %s", sched.round_id, step, err
            )
            return False
        done.add(step)
        return True


class Agent:
    """One device-agent process: a pool of devices following the coordinator's rounds over
    gRPC (enrolment on the server-TLS port, then mutual TLS; ``GetRound`` long polls)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        store = PoolStore(config.state_dir)
        population, ids = load_slice(config)
        if store.enrolment() is None:
            enrol(config, store, units_of(ids))
        enrolled = store.enrolment()
        assert enrolled is not None
        key_pem, reply, _ = enrolled
        creds = grpc.ssl_channel_credentials(
            config.ca_pem.read_bytes(), key_pem, pem_of_der(reply.client_certificate_der)
        )
        self.channel = _channel(config.coordinator, creds, config.insecure)
        if config.insecure:
            self.channel = grpc.intercept_channel(
                self.channel, _CredentialMetadata(reply.credential_id)
            )
        self.stub = pb_grpc.DeviceGatewayStub(self.channel)
        self.runner = PoolRunner(config, store, self.stub, population, ids)

    @property
    def store(self) -> PoolStore:
        """The pool's private store."""
        return self.runner.store

    @property
    def pool(self) -> DevicePool | None:
        """The device pool (built at the first round)."""
        return self.runner.pool

    def run(self, on_step: Callable[[pb.RoundSchedule], None] | None = None) -> None:
        """Follow the rounds until the run is finished."""
        version = 0
        while True:
            sched = _retry(
                lambda v=version: self.stub.GetRound(
                    pb.GetRoundRequest(newer_than=v, wait_ms=2000), timeout=30
                ),
                "GetRound",
            )
            version = sched.version
            if sched.step == "finished":
                return
            self.runner.follow(sched)
            if on_step is not None:
                on_step(sched)


def _specs(sched: pb.RoundSchedule, spec: RunSpec) -> tuple[RoundSpec, RoundSpec]:
    return round_specs(sched.round_id, sched.day, spec.items_per_device)


def run_agent(config: AgentConfig) -> None:
    """Run one device-agent process to the end of the run."""
    agent = Agent(config)
    try:
        agent.run()
    finally:
        agent.channel.close()
