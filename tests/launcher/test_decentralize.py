"""``decentralize(simulation)``, the run spec and the wire conversions of the coordinator."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from contract.runspec import RunSpec, RunSpecError
from contract.wire import (
    deployment_from_pb,
    deployment_to_pb,
    mode_from_pb,
    phase_from_pb,
    phase_to_pb,
)
from decentsim import decentralize
from launcher.decentralized import DecentralizeError, SyncTimeout
from protocols.secure_sum import Deployment, FixedPointCodec, Mode, PhaseSpec, SlotKind
from protocols.secure_sum.errors import MessageError
from sim import env, models, populations
from sim.params import Theta
from sim.runner import CentralSimulator


def test_run_spec_round_trips_and_names_bad_fields() -> None:
    spec = RunSpec(population="synthetic:50", days=3, lockdowns=("household:1:0.5",))
    assert RunSpec.from_json(spec.to_json()) == spec
    with pytest.raises(RunSpecError, match="days must be >= 1, got 0"):
        RunSpec(population="synthetic:50", days=0)
    with pytest.raises(RunSpecError, match="mode must be one of"):
        RunSpec(population="synthetic:50", days=3, mode="carrier-pigeon")
    with pytest.raises(RunSpecError, match=r"run.json: unknown field\(s\) \['colour'\]"):
        RunSpec.from_json('{"population": "synthetic:5", "days": 2, "colour": 1}', "run.json")
    with pytest.raises(RunSpecError, match=r"run\.json: not JSON"):
        RunSpec.from_json("{", "run.json")
    with pytest.raises(RunSpecError, match="bad intervention"):
        RunSpec(population="synthetic:50", days=3, lockdowns=("household:x:0.5",))
    with pytest.raises(RunSpecError, match="target covers 14 days, more than days=3"):
        RunSpec(population="synthetic:50", days=3, target=[1.0, 2.0])


def test_wire_conversions_round_trip_and_refuse_unknown_enums() -> None:
    phase = PhaseSpec("observations", 8, SlotKind.AGGREGATE, 1, ("global/day/3",))
    assert phase_from_pb(phase_to_pb(phase)) == phase
    codec = FixedPointCodec(32, 2.0**6, 2**24)
    dep = Deployment(Mode.SHUFFLED, codec, bytes(range(32)), bytes(32), b"k" * 32)
    assert deployment_from_pb(deployment_to_pb("neighbourhood", dep)) == dep
    with pytest.raises(MessageError, match="posting mode 0 is not one of"):
        mode_from_pb(0)
    bad = phase_to_pb(phase)
    bad.kind = 0
    with pytest.raises(MessageError, match="slot kind 0 is unspecified"):
        phase_from_pb(bad)


def test_decentralize_syncs_rounds_equal_to_the_central_run(tmp_path: Path) -> None:
    theta = Theta(beta=0.6, init_frac=0.05)
    simulation = env.create_from_template(
        models.epidemiology, populations.synthetic(300, seed=2), theta=theta, seed=2, days=3
    )
    with pytest.raises(DecentralizeError, match="protocol must be one of"):
        decentralize(simulation, protocol="carrier-pigeon")
    real = decentralize(simulation, root=tmp_path, step_timeout_s=60)
    with pytest.raises(DecentralizeError, match="deploy"):
        real.sync()
    central = CentralSimulator(
        simulation.population, real.spec.model_config(), 2, dtype=torch.float64
    ).run(theta, 3, "forward")
    try:
        started = time.perf_counter()
        real.deploy()
        # a round that cannot arrive in time is an error, not a silent partial answer
        with pytest.raises(SyncTimeout, match=r"round 0 .* not committed within 0\.001 s"):
            real.sync(timeout_s=0.001)
        first = real.sync(timeout_s=120)
        assert first["day"] == 0
        assert first["new_infections"] == float(central.new_infections[0])
        summary = real.run(out=tmp_path / "out", timeout_s=120)
        elapsed = time.perf_counter() - started
    finally:
        real.close()
    # wall_s is the run's real duration, from deploy() to the last committed day
    assert 1.0 < summary["wall_s"] <= elapsed
    assert summary["daily"]["new_infections"] == central.new_infections.tolist()
    assert summary["daily"]["new_deaths"] == central.new_deaths.tolist()
    assert (tmp_path / "out" / "federated.png").stat().st_size > 0
    assert (tmp_path / "out" / "views" / "coordinator.jsonl").exists()


def test_insecure_debug_mode_runs_without_tls_and_still_checks_the_credential(
    tmp_path: Path,
) -> None:
    """``--insecure`` (debugging only): plaintext gRPC everywhere, a loud warning from every
    process, the same results; a call that names no credential is refused."""
    import grpc

    from launcher.federation import Federation, make_spec
    from proto.decentsim.v1 import device_pb2 as pb
    from proto.decentsim.v1 import device_pb2_grpc as pb_grpc

    theta = {"beta": 0.6, "mortality": 0.01, "init_frac": 0.05}
    spec = make_spec(
        "synthetic:200", 2, population_seed=4, pools=1, seed=4, theta=theta, step_timeout_s=60
    )
    fed = Federation(tmp_path, spec, population_seed=4, insecure=True)
    try:
        fed.start()
        with (
            grpc.insecure_channel(f"127.0.0.1:{fed.c_port}") as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            pb_grpc.DeviceGatewayStub(channel).GetRound(pb.GetRoundRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "decentsim-credential" in (refused.value.details() or "")
        fed.wait(timeout_s=120)
        results = fed.results()
    finally:
        fed.stop()
    central = CentralSimulator(
        populations.from_spec("synthetic:200", seed=4), spec.model_config(), 4, dtype=torch.float64
    ).run(spec.theta_object(), 2, "forward")
    assert results["y"][..., 0].sum(-1)[:, 0].tolist() == central.new_infections.tolist()
    for role in ("coordinator", "aggregator", "pool-0"):
        assert "--insecure: NO TLS" in (tmp_path / role / "stderr.log").read_text()


def test_a_run_specs_grid_keeps_its_cell_order_through_json() -> None:
    """The cells are numbered in the grid's attribute order; a JSON encoder that sorts keys
    (RunSpec.to_json does) must not reorder them (it would hand devices another table)."""
    from launcher.federation import make_spec

    spec = make_spec("synthetic:60", 2, pools=1, behaviour="table", behaviour_table="t.csv")
    grid = spec.archetype_grid()
    assert grid.names == ("age_group", "gender", "occupation", "area", "income")
    assert RunSpec.from_json(spec.to_json()).archetype_grid() == grid
