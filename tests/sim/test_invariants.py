"""Property tests: the epidemic's bookkeeping holds for any θ, seed and intervention."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import populations
from sim.model import D, Lockdown, ModelConfig, S, Vaccination
from sim.params import Theta
from sim.runner import CentralSimulator

POP = populations.synthetic(400, seed=3)


@settings(max_examples=25, deadline=None)
@given(
    beta=st.floats(0.0, 3.0),
    mortality=st.floats(0.0, 1.0),
    init_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    lock_day=st.integers(0, 20),
    lock_scale=st.floats(0.0, 1.0),
    vac_fraction=st.floats(0.0, 1.0),
)
def test_stage_bookkeeping(
    beta: float,
    mortality: float,
    init_frac: float,
    seed: int,
    lock_day: int,
    lock_scale: float,
    vac_fraction: float,
) -> None:
    config = ModelConfig(
        lockdowns=(Lockdown("school", lock_day, lock_scale),),
        vaccinations=(Vaccination(5, vac_fraction),),
    )
    sim = CentralSimulator(POP, config, seed=seed)
    r = sim.run(Theta(beta=beta, mortality=mortality, init_frac=init_frac), 20, "forward")
    counts = r.stage_counts
    assert bool((counts >= 0).all())
    assert bool((counts.sum(1) == POP.n_agents).all()), "every agent is in exactly one stage"
    new_inf, new_dead = r.new_infections, r.new_deaths
    assert torch.equal(counts[:-1, S] - counts[1:, S], new_inf.long())
    assert torch.equal(counts[1:, D] - counts[:-1, D], new_dead.long())
    if mortality == 0.0:
        assert new_dead.sum() == 0
    if beta == 0.0:
        assert new_inf.sum() == 0
    _, grad = r.loss_and_grad()
    assert grad is not None and bool(torch.isfinite(grad).all())
