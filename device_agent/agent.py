"""The device-agent process (``decentsim device-agent run``): a device pool on the wire.

The agent enrols once with a single-use token (TLS, server authenticated by the coordinator's
CA certificate the operator installed; its own key never leaves its state dir), then connects
with mutual TLS and follows the coordinator's round schedule (``GetRound`` long polls), acting
on each step of each round (:class:`PoolRunner`, shared with the Flower ClientApp)::

    register → messages → fetch (and the local update f) → observations

Everything that must survive a crash lives in the pool's private store
(:mod:`device_agent.store`), which never leaves the device. A pool loads its own agents' slice
of the population itself; the coordinator never receives an agent's attributes. In a simulated
federation the pool's radio is driven by the population's contact layers (``SimulatedWorld``);
every pool of a run shares the world's beacon secret.

A step the devices cannot complete — their fetch refused, or a server's reply that fails
authentication — is reported to the coordinator (``ReportFailure``), which voids the round's
attempt and runs the day again; the devices never update on made-up exposure.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from contract.runspec import RunSpec
from contract.schedule import (
    AGGREGATES,
    FAILED,
    FETCH,
    FINISHED,
    MESSAGES,
    NEIGHBOURHOOD,
    OBSERVATIONS_STEP,
    REGISTER,
    STEPS,
    round_specs,
    slice_ids,
    units_of,
)
from contract.wire import deployment_from_pb
from device_agent.pilot import PilotWorld
from device_agent.pool import DevicePool, FetchFailed, SimulatedWorld
from device_agent.radio import RadioConfig, RadioStore, RadioThread
from device_agent.store import PoolStore
from identity.enrolment import build_enrolment_csr
from identity.pki import generate_private_key
from proto.decentsim.v1 import common_pb2
from proto.decentsim.v1 import device_pb2 as pb
from proto.decentsim.v1 import device_pb2_grpc as pb_grpc
from protocols.ble.radio import IdealRadio, Radio, SimulatedRadio
from protocols.ble.simkeys import SimulatedKeyring
from protocols.secure_sum import DeviceClient
from protocols.secure_sum.errors import SecureSumError
from protocols.secure_sum.slots import SlotTable
from sim.params import PARAM_NAMES
from sim.populations import Population, from_spec
from transport.grpc.channels import CredentialMetadata, device_channel
from transport.grpc.client import (
    AwaitingReply,
    GatewayLink,
    RetryPolicy,
    Role,
    TransportError,
    call_with_retries,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")


#: seconds between an agent's heartbeats
HEARTBEAT_S = 10.0


def device_health(radio: RadioThread, state_dir: Path) -> pb.DeviceHealth:
    """A pilot's health for the operator: software, radio, battery and disk in buckets."""
    try:
        version = metadata.version("decentsim")
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        version = "unknown"
    free = shutil.disk_usage(state_dir).free
    disk = sum(free >= limit for limit in (100e6, 1e9, 10e9))
    return pb.DeviceHealth(
        agent_version=version,
        battery_bucket=battery_bucket(),
        free_disk_bucket=disk,
        **radio.operator_health(),
    )


def battery_bucket(power_supply: Path = Path("/sys/class/power_supply")) -> int:
    """The battery's charge in quarters (1..4), 0 when the device has none (a board on mains)
    or does not say."""
    for capacity in sorted(power_supply.glob("BAT*/capacity")):
        try:
            percent = int(capacity.read_text().strip())
        except (OSError, ValueError):
            continue
        return 1 + min(3, max(0, (percent - 1) // 25))
    return 0


class AgentError(Exception):
    """The agent cannot go on; the message says why."""


class RunFailed(AgentError):
    """The coordinator stopped the run for good (its schedule says ``failed`` and why)."""


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
    #: a run with pilots: the pilot agents, which no simulated pool hosts (its slice is of the
    #: other agents); they must be the run spec's ``pilots``
    pilots: tuple[int, ...] = ()
    #: this process is a pilot device: that agent alone, with a physical radio
    pilot_agent: int | None = None
    #: the pilot's physical radio (its clock is replaced by the run's when the run is known)
    radio: RadioConfig | None = None
    #: DEBUGGING ONLY: plaintext gRPC to loopback; the credential is named in call metadata
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
    channel = device_channel(
        config.enrol_address, grpc.ssl_channel_credentials(ca), config.insecure, "--enrol"
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
    """The population and this pool's agent ids; the pool loads its own agents.

    A simulated pool takes its slice of the agents that are not pilots; a pilot device takes
    its own agent alone."""
    population = from_spec(config.population, seed=config.population_seed)
    n = population.n_agents
    outside = [a for a in (*config.pilots, config.pilot_agent) if a is not None and a >= n]
    if outside:
        raise AgentError(f"pilot agent(s) {outside} are not agents of the population (0..{n - 1})")
    if config.pilot_agent is not None:
        return population, torch.tensor([config.pilot_agent], dtype=torch.int64)
    simulated = torch.ones(n, dtype=torch.bool)
    simulated[list(config.pilots)] = False
    candidates = torch.nonzero(simulated).flatten()
    ids = candidates[slice_ids(candidates.numel(), *config.slice)]
    if ids.numel() == 0:
        raise AgentError(f"slice {config.slice} of {candidates.numel()} agents is empty")
    return population, ids


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
        units = units_of(ids.numel())
        if len(reply.devices) != units:
            raise AgentError(
                f"{config.state_dir}: enrolled with {len(reply.devices)} participants but this "
                f"slice needs {units}"
            )
        self.units = [bytes(d.value) for d in reply.devices]
        deployments = {d.deployment_id: deployment_from_pb(d) for d in reply.deployments}
        self.neighbourhood, self.aggregates = deployments[NEIGHBOURHOOD], deployments[AGGREGATES]
        self.stub = stub
        self._directory: dict[int, SlotTable] = {}
        self.pool: DevicePool | None = None
        self.spec: RunSpec | None = None
        self._day_key: tuple[int, int, int] | None = None  # (epoch, day, round id) in work
        #: the newest round whose observations this pool posted (heartbeats report it)
        self.last_round = store.last_round()
        self._done: set[str] = set()
        #: a pilot's physical radio (started when the run, and so its clock, is known)
        self.radio: RadioThread | None = None

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

    def _check_pilots(self, spec: RunSpec) -> None:
        """This process's place in the run matches the run's pilots."""
        pilot = self.config.pilot_agent
        if pilot is not None and pilot not in spec.pilots:
            raise AgentError(
                f"--pilot-agent {pilot}: not one of the run's pilots {list(spec.pilots)}"
            )
        if pilot is None and sorted(self.config.pilots) != sorted(spec.pilots):
            raise AgentError(
                f"this pool leaves out pilots {sorted(self.config.pilots)} but the run's pilots "
                f"are {sorted(spec.pilots)} (pass --pilots)"
            )
        if pilot is not None and self.config.radio is None:
            raise AgentError(f"pilot agent {pilot} needs a physical radio (--radio bumble)")

    def start_radio(self, spec: RunSpec) -> None:
        """A pilot's radio starts advertising and scanning on the run's clock."""
        if self.config.radio is None or self.radio is not None:
            return
        config = replace(self.config.radio, clock=spec.clock(), state_dir=self.config.state_dir)
        self.radio = RadioThread(config)
        self.radio.start()

    def _build_pool(self, spec: RunSpec) -> DevicePool:
        world_secret = self.config.world_secret
        if world_secret is None:
            raise AgentError("a simulated federation needs the world's beacon secret")
        keyring = SimulatedKeyring(world_secret)
        radio: Radio = (
            IdealRadio(keyring) if spec.radio == "ideal" else SimulatedRadio(keyring, spec.seed)
        )
        config = spec.model_config()
        pilots = np.array(spec.pilots, dtype=np.int64)
        world: SimulatedWorld
        if self.config.pilot_agent is not None:
            assert self.radio is not None
            world = PilotWorld(
                self.population,
                config,
                radio,
                self.config.pilot_agent,
                pilots,
                RadioStore(self.config.state_dir),
                self.radio.flush,
            )
        else:
            world = SimulatedWorld(
                self.population,
                config,
                radio,
                spec.advertising_intervals,
                self.ids.numpy(),
                pilots=pilots,
            )
        return DevicePool.of_population(
            self.ids, self.population, config, spec.seed, keyring, world, self._connect
        )

    def follow(self, sched: pb.RoundSchedule) -> bool:
        """Act on one schedule (a step of a round); False if the step must be retried later
        (a transport failure: its requests did not all get answers).

        Raises:
            RunFailed: the coordinator stopped the run (the schedule's step is ``failed``).
        """
        if sched.step == FAILED:
            raise RunFailed(f"the coordinator stopped the run: {sched.failure}")
        if self.spec is None and sched.run_json:
            self.spec = RunSpec.from_json(sched.run_json, "the coordinator's run_json")
            self._check_pilots(self.spec)
            self.start_radio(self.spec)
        if sched.step not in STEPS:
            return True
        if self.pool is None:
            if self.spec is None:
                raise AgentError("the coordinator's schedule carries no run_json")
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

    def _behaviour_row(self, sched: pb.RoundSchedule) -> torch.Tensor | None:
        """The public behaviour table's row the schedule carries (a table/llm run)."""
        assert self.spec is not None
        if self.spec.behaviour == "heuristic":
            return None
        cells = self.spec.archetype_grid().n_cells
        if len(sched.behaviour_row) != cells * 2 * 8:
            raise AgentError(
                f"round {sched.round_id}: the behaviour row has {len(sched.behaviour_row)} "
                f"bytes, not the {cells * 2 * 8} of {cells} cells × 2 float64"
            )
        row = np.frombuffer(sched.behaviour_row, dtype="<f8").reshape(cells, 2)
        if not np.all((row >= 0) & (row <= 1)):
            raise AgentError(f"round {sched.round_id}: a behaviour probability is outside [0, 1]")
        return torch.from_numpy(row.copy())

    def _start_day(self, sched: pb.RoundSchedule) -> None:
        """Load the start-of-day state of the schedule's (epoch, day) (day 0: draw it) and the
        period's behaviour row."""
        pool = self.pool
        assert pool is not None
        pool.behaviour_row = self._behaviour_row(sched)
        theta = self._theta(sched)
        stored = self.store.state(sched.epoch, sched.day)
        if stored is not None:
            pool.restore(theta, stored)
            return
        last = self.store.latest_state_day(sched.epoch, sched.day)
        if last is None:
            pool.begin(theta)
            assert pool.state is not None
            self.store.save_state(sched.epoch, 0, pool.state)
            last = 0
        else:
            stored = self.store.state(sched.epoch, last)
            assert stored is not None
            pool.restore(theta, stored)
        if last < sched.day:
            self._sit_out(sched, last, theta)

    def _sit_out(self, sched: pb.RoundSchedule, first: int, theta: torch.Tensor) -> None:
        """Days ``first .. sched.day - 1`` went by while this process was down (their rounds
        are committed without it): its devices update on zero exposure, day by day, sending
        nothing, and rejoin at ``sched.day`` (a phone that was off for a day)."""
        pool, spec = self.pool, self.spec
        assert pool is not None and spec is not None
        for day in range(first, sched.day):
            specs = round_specs(0, day, spec.items_per_device, spec.beacons_per_day)
            pool.sit_out(specs[0], day, theta)
            assert pool.state is not None
            self.store.save_state(sched.epoch, day + 1, pool.state)
        log.warning(
            "days %d..%d went by without this pool: updated on zero exposure, nothing sent",
            first,
            sched.day - 1,
        )

    def _act(self, sched: pb.RoundSchedule, done: set[str]) -> bool:
        pool = self.pool
        assert pool is not None and self.spec is not None
        specs = round_specs(
            sched.round_id, sched.day, self.spec.items_per_device, self.spec.beacons_per_day
        )
        theta = self._theta(sched)
        step, day = sched.step, sched.day
        try:
            if step != REGISTER and REGISTER not in done:
                # a process (re)started mid-round: replay its registration (byte-identical, so
                # the coordinator answers from its record) to learn its slots; if it had not
                # registered before the step closed, it has none this round
                try:
                    pool.act(REGISTER, specs, day, theta)
                except SecureSumError as err:
                    log.warning("round %d: no registration (%s)", sched.round_id, err)
                done.add(REGISTER)
            updated = pool.updated
            pool.act(step, specs, day, theta)
            if step == MESSAGES and pool.last_trace is not None:
                self.store.save_trace(sched.epoch, day, pool.last_trace)
            if not updated and step in (FETCH, OBSERVATIONS_STEP):
                # keep the next day's start state before anything else can fail
                assert pool.state is not None
                self.store.save_state(sched.epoch, day + 1, pool.state)
                done.add(FETCH)
            if step == OBSERVATIONS_STEP:
                assert pool.last_y is not None
                self.store.save_observed(sched.epoch, day, sched.round_id, pool.last_y)
                self.last_round = sched.round_id
        except FetchFailed as err:
            return self._report(sched, err)
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

    def _report(self, sched: pb.RoundSchedule, err: FetchFailed) -> bool:
        """Tell the coordinator the devices cannot finish the day; it voids the attempt and
        runs the day again (the pool restarts it from its stored start-of-day state)."""
        cause = err.__cause__
        log.error("round %d step %s failed: %s", sched.round_id, sched.step, err)
        request = pb.ReportFailureRequest(
            round_id=sched.round_id,
            step=sched.step,
            reason=type(cause if cause is not None else err).__name__,
            detail=str(err)[:1024],
        )
        try:
            call_with_retries(
                lambda timeout: self.stub.ReportFailure(request, timeout=timeout),
                self.config.policy,
                "ReportFailure",
            )
        except AwaitingReply:
            return False
        except TransportError as report_err:
            log.warning("round %d: could not report the failure: %s", sched.round_id, report_err)
            return False
        self._done.update(STEPS)  # nothing more to do in this attempt
        return True


class Agent:
    """One device-agent process: a pool of devices following the coordinator's rounds over
    gRPC (enrolment on the server-TLS port, then mutual TLS; ``GetRound`` long polls)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        store = PoolStore(config.state_dir)
        population, ids = load_slice(config)
        if store.enrolment() is None:
            enrol(config, store, units_of(ids.numel()))
        enrolled = store.enrolment()
        assert enrolled is not None
        key_pem, reply, _ = enrolled
        creds = grpc.ssl_channel_credentials(
            config.ca_pem.read_bytes(), key_pem, pem_of_der(reply.client_certificate_der)
        )
        self.channel = device_channel(config.coordinator, creds, config.insecure)
        if config.insecure:
            self.channel = grpc.intercept_channel(
                self.channel, CredentialMetadata(reply.credential_id)
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

    def heartbeat(self) -> None:
        """Tell the coordinator this credential is alive: its clock, the last round it
        completed and, on a pilot, the device's health (``decentsim pilot status``)."""
        runner = self.runner
        request = pb.HeartbeatRequest(
            progress=common_pb2.RoundRef(round_id=runner.last_round),
            client_time_unix_ms=int(time.time() * 1000),  # infrastructure time: clock skew
        )
        if runner.radio is not None:
            request.health.CopyFrom(device_health(runner.radio, self.config.state_dir))
        try:
            self.stub.Heartbeat(request, timeout=10)
        except grpc.RpcError as err:  # a missed heartbeat is retried at the next interval
            log.info("heartbeat failed: %s", err.code().name)

    def run(self, on_step: Callable[[pb.RoundSchedule], None] | None = None) -> None:
        """Follow the rounds until the run is finished; a heartbeat every
        :data:`HEARTBEAT_S` seconds.

        Raises:
            RunFailed: the coordinator stopped the run (names why).
        """
        version = 0
        last_beat, reported = 0.0, -1
        while True:
            # every HEARTBEAT_S, and as soon as a round is done (the operator sees progress)
            due = time.monotonic() - last_beat >= HEARTBEAT_S  # infrastructure time
            if due or self.runner.last_round != reported:
                self.heartbeat()
                last_beat, reported = time.monotonic(), self.runner.last_round
            sched = _retry(
                lambda v=version: self.stub.GetRound(
                    pb.GetRoundRequest(newer_than=v, wait_ms=2000), timeout=30
                ),
                "GetRound",
            )
            version = sched.version
            if sched.step == FINISHED:
                return
            self.runner.follow(sched)
            if on_step is not None:
                on_step(sched)


def run_agent(config: AgentConfig) -> None:
    """Run one device-agent process to the end of the run."""
    agent = Agent(config)
    try:
        agent.run()
    finally:
        if agent.runner.radio is not None:
            agent.runner.radio.stop()
        agent.channel.close()
