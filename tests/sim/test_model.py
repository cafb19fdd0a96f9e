"""The model's named pieces, the two gradient modes, and subset invariance."""

from __future__ import annotations

import pytest
import torch

from sim import dual, populations
from sim.archetypes import (
    MONTH_DAYS,
    BehaviourSource,
    labour_force,
    population_cells,
    public_numbers,
)
from sim.model import (
    OBSERVATIONS,
    STAGES,
    Lockdown,
    ModelConfig,
    Vaccination,
    aggregate,
    behaviour,
    day_weight,
    infectiousness,
    initial_state,
    make_agents,
    message,
    update,
)
from sim.params import PARAM_NAMES, Theta
from sim.populations import ContactLayer, Population
from sim.runner import CentralSimulator
from sim.sampling import Estimator

from .behaviour_rules import CaseRule


def random_population(n: int, k: int, seed: int, layers: int = 2) -> Population:
    """A small random contact graph (both directions of each contact), several layers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for li in range(layers):
        a = torch.randint(0, n, (n * k // 2,), generator=g)
        b = torch.randint(0, n, (n * k // 2,), generator=g)
        keep = a != b
        a, b = a[keep], b[keep]
        w = torch.rand(a.numel(), generator=g) * 0.5
        out.append(
            ContactLayer(f"layer{li}", torch.cat([a, b]), torch.cat([b, a]), torch.cat([w, w]))
        )
    return Population("random", torch.randint(0, 6, (n,), generator=g), tuple(out))


THETA = Theta(beta=0.35, mortality=0.05, init_frac=0.02)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("estimator", [Estimator("st"), Estimator("gumbel", tau=0.7)])
def test_forward_and_reverse_gradients_agree(seed: int, estimator: Estimator) -> None:
    pop = random_population(800, 8, seed)
    config = ModelConfig(
        estimator=estimator,
        lockdowns=(Lockdown("layer1", 10, 0.5),),
        vaccinations=(Vaccination(5, 0.3),),
    )
    sim = CentralSimulator(pop, config, seed=seed, dtype=torch.float64)
    fwd = sim.run(THETA, 30, "forward")
    rev = sim.run(THETA, 30, "reverse")
    assert torch.equal(fwd.new_infections, rev.new_infections)
    assert fwd.new_infections.sum() > 50, "the epidemic must take off for a meaningful check"

    def weekly_mse(y: torch.Tensor) -> torch.Tensor:
        target = torch.linspace(5, 40, 4, dtype=y.dtype)
        weekly = y[:28, 0].sum(-1).reshape(4, 7).sum(-1)
        return ((weekly - target) ** 2).mean() + y[:, 1].sum()

    for loss_fn in (None, weekly_mse):
        kw = {} if loss_fn is None else {"loss_fn": loss_fn}
        lf, gf = fwd.loss_and_grad(**kw)
        lr, gr = rev.loss_and_grad(**kw)
        assert lf == pytest.approx(lr)
        assert gf is not None and gr is not None
        assert gf.abs().max() > 0
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-8 * float(gf.abs().max()))


def test_float32_modes_agree_too() -> None:
    sim = CentralSimulator(random_population(600, 8, 5), seed=5, dtype=torch.float32)
    _, gf = sim.run(THETA, 25, "forward").loss_and_grad()
    _, gr = sim.run(THETA, 25, "reverse").loss_and_grad()
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-3)


def test_gradient_sign_matches_finite_difference_of_expectation() -> None:
    """More transmission → more infections: dL/dbeta > 0, averaged over seeds."""
    pop = random_population(1000, 6, 11)
    grads = []
    for seed in range(4):
        sim = CentralSimulator(pop, seed=seed, dtype=torch.float64)
        _, g = sim.run(
            Theta(beta=0.15, mortality=0.01, init_frac=0.01), 25, "forward"
        ).loss_and_grad()
        assert g is not None
        grads.append(g[PARAM_NAMES.index("beta")])
    assert torch.stack(grads).mean() > 0


def test_soft_state_values_are_exact_one_hot_of_stage() -> None:
    sim = CentralSimulator(random_population(500, 8, 3), seed=3, dtype=torch.float64)
    th = sim.theta_dual(THETA, "forward")
    state = initial_state(sim.agents, th, sim.config, sim.seed)
    for day in range(20):
        state, _ = sim.step(state, th, day)
        onehot = torch.nn.functional.one_hot(state.stage.long(), len(STAGES)).double()
        assert torch.equal(dual.value(state.x), onehot)


def test_fused_csr_sum_equals_message_then_aggregate() -> None:
    pop = random_population(400, 10, 9)
    sim = CentralSimulator(pop, seed=9, dtype=torch.float64)
    q = dual.make(torch.rand(400, dtype=torch.float64), torch.rand(400, 3, dtype=torch.float64))
    expected = torch.zeros_like(q)
    for layer in pop.layers:
        m = message(q[layer.src], day_weight(layer.weight.double(), 1.0))
        expected += aggregate(m, layer.dst, pop.n_agents)
    torch.testing.assert_close(sim.neighbourhood_sums(q, day=0), expected, rtol=1e-12, atol=0)


def test_lockdown_of_all_layers_stops_transmission() -> None:
    pop = random_population(500, 8, 4)
    locks = tuple(Lockdown(layer.name, 0, 0.0) for layer in pop.layers)
    sim = CentralSimulator(pop, ModelConfig(lockdowns=locks), seed=4)
    r = sim.run(THETA, 20)
    assert r.new_infections.sum() == 0
    assert r.stage_counts[0, 2] > 0  # there were seeds, they just could not infect anyone


def test_lockdown_naming_unknown_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match="layer 'school'"):
        CentralSimulator(
            random_population(50, 4, 0), ModelConfig(lockdowns=(Lockdown("school", 0, 0.5),))
        )


def test_vaccination_reduces_infections() -> None:
    pop = random_population(1500, 8, 6)
    base = CentralSimulator(pop, seed=6).run(THETA, 40).new_infections.sum()
    vac = (
        CentralSimulator(pop, ModelConfig(vaccinations=(Vaccination(0, 0.8, 1.0),)), seed=6)
        .run(THETA, 40)
        .new_infections.sum()
    )
    assert vac < 0.5 * base


def test_population_seeds_are_used_when_configured() -> None:
    pop = random_population(300, 6, 2)
    seeds = torch.zeros(300, dtype=torch.bool)
    seeds[[3, 70, 150]] = True
    pop = Population(pop.name, pop.age_group, pop.layers, initially_infected=seeds)
    r = CentralSimulator(pop, ModelConfig(use_population_seeds=True), seed=2).run(THETA, 1)
    assert r.stage_counts[0].tolist()[2] == 3


def _run_in_halves(
    pop: Population,
    config: ModelConfig,
    seed: int,
    days: int,
    theta: torch.Tensor,
    source: BehaviourSource | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Simulate two halves of the agents separately, as two device pools would.

    Each half computes its own agents' messages with ``message`` along the edges it sends on,
    and receives the other half's messages for the edges that end in it; each half applies
    ``aggregate`` and ``update`` to its own agents only.

    With a behaviour table (``source``), the table's row of each period is filled from the
    public numbers the halves publish together (their summed daily new infections), and every
    half draws its own agents' choices from it (``behaviour``) with its agents' own cells; a
    work-layer contact happens only when its sender's half and its receiver's half both find
    their agent at work.

    Returns each day's stages (all agents) and the daily totals (T, 3) of the observations
    (new infections, deaths, employment) summed over the halves.
    """
    n = pop.n_agents
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(123))
    halves = [torch.sort(perm[: n // 2]).values, torch.sort(perm[n // 2 :]).values]
    owner = torch.empty(n, dtype=torch.int64)
    local = torch.empty(n, dtype=torch.int64)
    for h, ids in enumerate(halves):
        owner[ids] = h
        local[ids] = torch.arange(ids.numel())
    grid, cells = population_cells(pop)
    labour = labour_force(pop)
    agents = [
        make_agents(ids, pop.age_group[ids], config, seed, None, cells[ids], labour[ids])
        for ids in halves
    ]
    states = [initial_state(a, theta, config, seed) for a in agents]
    stages, totals = [], []
    row: torch.Tensor | None = None
    for day in range(days):
        if source is not None and day % config.period_days == 0:
            cases = [float(t[0]) for t in totals]
            public = public_numbers(
                cases, day, config.period_days, config.stimulus(day // MONTH_DAYS)
            )
            row = torch.from_numpy(source.probabilities(grid, public))
        behs = [
            behaviour(a, s, theta, config, seed, day, row)
            for a, s in zip(agents, states, strict=True)
        ]
        qs = [
            infectiousness(a, s, b, theta, config, day)
            for a, s, b in zip(agents, states, behs, strict=True)
        ]
        # Every edge's message is computed by the half that owns its sender...
        inbox: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[], []]
        for layer in pop.layers:
            scale = config.layer_scale(layer.name, day)
            at_work = layer.name == config.work_layer and behs[0].at_work is not None
            for h in range(2):
                sent = owner[layer.src] == h
                q = qs[h][local[layer.src[sent]]]
                if at_work:  # the sender is at work, or sends nothing on this layer
                    q = q * behs[h].at_work[local[layer.src[sent]]].to(q.dtype).unsqueeze(-1)
                m = message(q, day_weight(layer.weight[sent].double(), scale))
                dst, src = layer.dst[sent], layer.src[sent]
                for r in range(2):  # ... and delivered to the half that owns its receiver,
                    to_r = owner[dst] == r
                    m_r = m[to_r]
                    if at_work:  # which hears it only when its agent is at work.
                        present = behs[r].at_work[local[dst[to_r]]]
                        m_r = m_r * present.to(m_r.dtype).unsqueeze(-1)
                    inbox[r].append((dst[to_r], src[to_r], m_r))
        new_states, day_total = [], torch.zeros(len(OBSERVATIONS), dtype=torch.float64)
        for h in range(2):
            dst = torch.cat([d for d, _, _ in inbox[h]])
            src = torch.cat([s for _, s, _ in inbox[h]])
            m = torch.cat([x for _, _, x in inbox[h]])
            order = torch.argsort(dst * n + src)  # the central CSR's summation order
            incoming = aggregate(m[order], local[dst[order]], halves[h].numel())
            out = update(agents[h], states[h], incoming, behs[h], theta, config, seed, day)
            new_states.append(out.state)
            day_total += dual.value(out.y).sum(0).detach()  # what the halves publish
        states = new_states
        totals.append(day_total)
        full = torch.empty(n, dtype=torch.int8)
        for h in range(2):
            full[halves[h]] = states[h].stage
        stages.append(full)
    return stages, torch.stack(totals)


@pytest.mark.parametrize("seed", [0, 7])
def test_two_halves_reproduce_the_full_run(seed: int) -> None:
    pop = random_population(600, 8, seed)
    config = ModelConfig(lockdowns=(Lockdown("layer0", 8, 0.3),))
    sim = CentralSimulator(pop, config, seed=seed, dtype=torch.float64)
    th = sim.theta_dual(THETA, "forward")
    halves, _ = _run_in_halves(pop, config, seed, 25, th)
    state = initial_state(sim.agents, th, config, seed)
    changed = 0
    for day in range(25):
        before = state.stage
        state, _ = sim.step(state, th, day)
        assert torch.equal(state.stage, halves[day]), f"day {day}: stages differ"
        changed += int((state.stage != before).sum())
    assert changed > 100  # the run had real dynamics to reproduce


@pytest.mark.parametrize("seed", [0, 7])
def test_two_halves_reproduce_a_behaviour_table_run(seed: int) -> None:
    """Each half draws its own agents' isolation and work from the table's row: cases and
    employment equal the central run's, day by day (the rule's rows follow the cases)."""
    pop = populations.synthetic(800, seed=seed)
    config = ModelConfig(
        behaviour="table",
        period_days=5,
        lockdowns=(Lockdown("school", 8, 0.3),),
        grad=PARAM_NAMES,
    )
    sim = CentralSimulator(pop, config, seed=seed, dtype=torch.float64)
    theta = THETA.replace(shift_20t29=-0.5, scale_50t64=1.5)
    central = sim.run(theta, 25, "forward", source=CaseRule())
    assert central.table is not None and central.table.periods == 5
    stages, halves = _run_in_halves(
        pop, config, seed, 25, sim.theta_dual(theta, "forward"), CaseRule()
    )
    assert torch.equal(halves[:, 0], central.new_infections)
    assert torch.equal(halves[:, 1], central.new_deaths)
    assert torch.equal(halves[:, 2], central.employment)
    for day, stage in enumerate(stages):
        counts = torch.bincount(stage.to(torch.int64), minlength=len(STAGES))
        assert torch.equal(counts, central.stage_counts[day + 1]), f"day {day}: stages differ"
    assert central.new_infections.sum() > 50, "the run must have real dynamics to reproduce"
    employment = central.employment
    assert employment.max() > employment.min(), "work choices must vary from day to day"
    # A workplace contact needs both ends at work: without that the halves would differ.
    assert any(layer.name == config.work_layer for layer in pop.layers)


def test_seeding_from_a_population_without_seeds_is_rejected() -> None:
    with pytest.raises(ValueError, match="no initially_infected column"):
        CentralSimulator(random_population(50, 4, 0), ModelConfig(use_population_seeds=True))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Lockdown("work", 0, -0.5), "scale must be >= 0"),
        (lambda: Lockdown("work", 5, 0.5, end_day=5), "start_day < end_day"),
        (lambda: Vaccination(-1, 0.5), "day must be >= 0"),
        (lambda: Vaccination(3, 1.5), "fraction must be in"),
        (lambda: Vaccination(3, 0.5, efficacy=float("nan")), "efficacy must be in"),
    ],
)
def test_bad_interventions_are_rejected(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
