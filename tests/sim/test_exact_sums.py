"""Exact sums: the model's grids make central float64 neighbourhood sums equal fixed-point
sums bit for bit (what lets a federation reproduce the central run)."""

from __future__ import annotations

import pytest
import torch

from sim import dual
from sim.model import (
    EXACT_FRAC_BITS,
    Lockdown,
    ModelConfig,
    ModelConfigError,
    behaviour,
    day_weight,
    infectiousness,
    initial_state,
    message,
)
from sim.params import Theta
from sim.populations import ContactLayer, Population, synthetic
from sim.runner import CentralSimulator

THETA = Theta(beta=0.4, mortality=0.05, init_frac=0.03)


def fixed_point_sums(
    pop: Population, config: ModelConfig, q: torch.Tensor, day: int, seed: int
) -> torch.Tensor:
    """What a decentralized run computes: each message encoded to int64, summed in any order."""
    total = torch.zeros(pop.n_agents, dtype=torch.int64)
    for layer in pop.layers:
        w = day_weight(layer.weight.double(), config.layer_scale(layer.name, day))
        m = dual.value(message(q[layer.src], w)) * 2.0**EXACT_FRAC_BITS
        ring = m.to(torch.int64)
        assert torch.equal(ring.double(), m), "every message is on the 2^-32 grid"
        order = torch.randperm(ring.numel(), generator=torch.Generator().manual_seed(seed))
        total.index_add_(0, layer.dst[order], ring[order])
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_central_sums_equal_fixed_point_sums_exactly(seed: int) -> None:
    pop = synthetic(1500, seed=seed)
    config = ModelConfig(lockdowns=(Lockdown("work", 3, 0.37),))
    sim = CentralSimulator(pop, config, seed=seed, dtype=torch.float64)
    th = sim.theta_dual(THETA, "forward")
    state = initial_state(sim.agents, th, config, seed)
    checked = 0
    for day in range(12):
        beh = behaviour(sim.agents, state, th, config, seed, day)
        q = infectiousness(sim.agents, state, beh, th, config, day)
        central = dual.value(sim.neighbourhood_sums(q, day))
        ring = fixed_point_sums(pop, config, q, day, seed + day)
        assert torch.equal(central * 2.0**EXACT_FRAC_BITS, ring.double()), f"day {day}"
        checked += int((ring != 0).sum())
        state, _ = sim.step(state, th, day)
    assert checked > 1000  # many non-trivial sums were compared


def test_off_grid_messages_do_not_sum_on_the_grid() -> None:
    """The control: messages off the 2^-Q_BITS grid give sums that are not integer multiples
    of 2^-32 (the grid, not the float64 sums alone, makes them exact)."""
    pop = synthetic(1500, seed=0)
    sim = CentralSimulator(pop, ModelConfig(), seed=0, dtype=torch.float64)
    q = dual.constant(torch.rand(pop.n_agents, dtype=torch.float64), 1)
    scaled = dual.value(sim.neighbourhood_sums(q, 0)) * 2.0**EXACT_FRAC_BITS
    assert not torch.equal(scaled, torch.round(scaled))


def test_exact_sums_keep_gradient_modes_in_agreement() -> None:
    sim = CentralSimulator(synthetic(800, seed=4), ModelConfig(), seed=4, dtype=torch.float64)
    fwd, rev = sim.run(THETA, 25, "forward"), sim.run(THETA, 25, "reverse")
    assert torch.equal(fwd.new_infections, rev.new_infections)
    _, gf = fwd.loss_and_grad()
    _, gr = rev.loss_and_grad()
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-6)


def test_float32_runs_the_same_model_inexactly() -> None:
    """float32 keeps the grids (same model) but makes no exactness promise: no bit-budget
    checks, and its results stay close to float64's."""
    pop = synthetic(600, seed=2)
    exact = CentralSimulator(pop, ModelConfig(), seed=2, dtype=torch.float64)
    fast = CentralSimulator(pop, ModelConfig(), seed=2, dtype=torch.float32)
    assert exact.exact and not fast.exact
    a, b = exact.run(THETA, 10), fast.run(THETA, 10)
    assert (
        abs(float(a.new_infections.sum()) - float(b.new_infections.sum()))
        <= 0.05 * float(a.new_infections.sum()) + 5
    )


def test_exact_sums_refuse_messages_beyond_the_bit_budget() -> None:
    heavy = ContactLayer(
        "heavy", torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2.0, 2.0])
    )
    pop = Population("pair", torch.zeros(2, dtype=torch.int64), (heavy,))
    sim = CentralSimulator(pop, ModelConfig(), dtype=torch.float64)
    sim.run(THETA.replace(beta=20.0), 2)  # 20 × 1.2 × 2 = 48 < 64: fine
    with pytest.raises(ModelConfigError, match="beta=40"):
        sim.run(THETA.replace(beta=40.0), 2)


def test_exact_sums_refuse_receivers_beyond_the_bit_budget() -> None:
    n = 2**15 + 2
    hub = ContactLayer(
        "star", torch.arange(1, n), torch.zeros(n - 1, dtype=torch.int64), torch.full((n - 1,), 0.1)
    )
    pop = Population("star", torch.zeros(n, dtype=torch.int64), (hub,))
    with pytest.raises(ModelConfigError, match="receives up to 32769 messages"):
        CentralSimulator(pop, ModelConfig(), dtype=torch.float64)
