"""A fetch that fails — refused, or a server's reply that fails authentication — never becomes an
update on made-up exposure: the devices report it, the coordinator voids the day and runs it
again, and a failure that survives the re-runs stops the run with its reason."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from aggregator.service import AggregatorService, aggregator_init
from contract.round import InMemoryServers
from contract.schedule import FETCH, MESSAGES, REGISTER, round_specs
from coordinator.service import MAX_FAILED_ATTEMPTS, CoordinatorService, coordinator_init
from device_agent.agent import Agent, AgentConfig, RunFailed
from device_agent.pool import DevicePool, FetchFailed, SimulatedWorld
from device_agent.store import PoolStore
from launcher.federation import make_spec
from protocols.ble.radio import IdealRadio
from protocols.ble.simkeys import SimulatedKeyring
from protocols.secure_sum import Mode
from protocols.secure_sum.messages import FetchReply, decode
from sim.model import ModelConfig
from sim.params import Theta
from sim.populations import synthetic

THETA = Theta(beta=0.6, mortality=0.01, init_frac=0.05).as_tensor()


def tampered(handle: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """An aggregator link handler that flips one bit of every fetch reply's sealed box."""

    def handle_and_tamper(raw: bytes) -> bytes:
        reply = handle(raw)
        msg = decode(reply)
        if not isinstance(msg, FetchReply):
            return reply
        box = bytearray(msg.box)
        box[-1] ^= 1
        return FetchReply(bytes(box)).to_bytes()

    return handle_and_tamper


def test_a_pool_whose_fetch_fails_raises_and_keeps_its_state() -> None:
    """In memory: A's tampered fetch reply fails authentication at the devices; the pool raises
    ``FetchFailed`` and its state is the start-of-day state (no update on zero exposure)."""
    population = synthetic(200, seed=5)
    servers = InMemoryServers(Mode.MAILBOX)
    net = servers.neighbourhood
    keyring = SimulatedKeyring(bytes(16))
    config = ModelConfig()
    world = SimulatedWorld(population, config, IdealRadio(keyring), 4)
    ids = torch.arange(population.n_agents)
    pool = DevicePool(ids, population.age_group, config, 5, keyring, world, servers.connect)
    pool.begin(THETA)
    start = pool.state
    specs = round_specs(1, 0, 64, 4)
    servers.open_round(specs)
    pool.act(REGISTER, specs, 0, THETA)
    servers.close_registration(1)
    pool.act(MESSAGES, specs, 0, THETA)
    servers.close_phase(1, "neighbourhood", "messages")
    net.a_to_c_filter = tampered(lambda raw: raw)
    with pytest.raises(FetchFailed, match="AuthenticationFailed"):
        pool.act(FETCH, specs, 0, THETA)
    assert pool.state is start and not pool.updated


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[CoordinatorService, AggregatorService, int, int]]:
    """An aggregator whose fetch replies are tampered with, and a coordinator, on loopback."""
    c_dir, a_dir = tmp_path / "c", tmp_path / "a"
    c_export = coordinator_init(c_dir, ("localhost", "127.0.0.1"))
    a_export = aggregator_init(a_dir, ("localhost", "127.0.0.1"))
    aggregator = AggregatorService(a_dir, Mode.MAILBOX, c_export)
    nbhd = aggregator.servers["neighbourhood"]
    nbhd.handle = tampered(nbhd.handle)  # type: ignore[method-assign]
    a_port = aggregator.serve("127.0.0.1:0")
    spec = make_spec(
        "synthetic:150",
        3,
        population_seed=5,
        pools=1,
        seed=5,
        theta={"beta": 0.6, "mortality": 0.01, "init_frac": 0.05},
        step_timeout_s=20,
    )
    svc = CoordinatorService(c_dir, spec, f"127.0.0.1:{a_port}", a_export)
    port, enrol_port = svc.serve("127.0.0.1:0", "127.0.0.1:0")
    try:
        yield svc, aggregator, port, enrol_port
    finally:
        svc.stop()
        aggregator.stop()


def test_a_tampering_aggregator_stops_the_run_instead_of_suppressing_infections(
    servers: tuple[CoordinatorService, AggregatorService, int, int], tmp_path: Path
) -> None:
    """Over gRPC with a real device agent: every attempt at day 0 is voided by the devices'
    report, the run stops after MAX_FAILED_ATTEMPTS with the reason, the agent exits with it,
    and the pool never stored a state for day 1 (it never updated)."""
    svc, _, port, enrol_port = servers
    (token,) = svc.mint_tokens(1)
    config = AgentConfig(
        coordinator=f"127.0.0.1:{port}",
        state_dir=tmp_path / "pool",
        ca_pem=svc.state_dir / "export" / "ca.pem",
        population="synthetic:150",
        population_seed=5,
        token=token,
        enrol_address=f"127.0.0.1:{enrol_port}",
        world_secret=os.urandom(16),
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            Agent(config).run()
        except RunFailed as err:
            failure.append(err)

    agent = threading.Thread(target=run, daemon=True)
    agent.start()
    agent.join(timeout=180)
    assert not agent.is_alive(), "the agent did not stop"
    assert failure and "could not complete the day" in str(failure[0])
    assert "AuthenticationFailed" in svc.failure and f"{MAX_FAILED_ATTEMPTS} attempts" in (
        svc.failure
    )
    db = sqlite3.connect(svc.state_dir / "coordinator.sqlite3")
    rounds = db.execute("SELECT day, status, reason FROM rounds ORDER BY round_id").fetchall()
    assert [(d, s) for d, s, _ in rounds] == [(0, "aborted")] * MAX_FAILED_ATTEMPTS
    assert all(r.startswith("DayVoided") for _, _, r in rounds)
    assert db.execute("SELECT COUNT(*) FROM days").fetchone()[0] == 0
    assert db.execute("SELECT failure FROM run").fetchone()[0] == svc.failure
    store = PoolStore(config.state_dir)
    assert store.state(0, 0) is not None and store.state(0, 1) is None
    assert store.observed(0) == {}
