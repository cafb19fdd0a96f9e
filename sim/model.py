"""The epidemic model as separately named pieces of ``z(t+1) = f(z, ⊕M, θ, ℓ)``.

- ``behaviour`` (ℓ): an agent's own choices — archetype contact scaling and isolating when ill,
  or, under a behaviour table, isolating and working as drawn from its archetype cell's row.
- ``infectiousness``: the per-sender factor of a message (θ, the sender's state, ℓ).
- ``message``: what flows along one contact edge, ``M_ij = weight_ij × infectiousness_j``.
- ``aggregate`` (⊕): the sum of incoming messages per receiver — the only place where agents'
  data meet; centrally a scatter-add, decentralized a private neighbourhood sum.
- ``update`` (f): SEIRD progression and stochastic infection/death, returning the agent's
  observations ``y_i(t)`` (new infection, new death, at work).

All functions act on any subset of agents (``Agents``): the central runner passes everyone; a
device passes its one agent, and draws the same random numbers (``sim.rng``) for it.

Differentiability: quantities that depend on θ are dual tensors (``sim.dual``: value plus p
tangents in the last axis). Discrete events use straight-through estimators (``sim.sampling``):
the value is the hard 0/1 event, the derivative that of its probability. The hard stage is kept
alongside as an int8 so that masks never depend on θ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sim import dual, rng
from sim.params import ALIGNMENT_GROUPS, BASE_PARAMS, PARAM_NAMES
from sim.rng import Purpose
from sim.sampling import Estimator, bernoulli

#: Disease stages; ``State.stage`` holds these codes, ``State.x`` one soft indicator per stage.
S, E, I, R, D = range(5)  # noqa: E741 (I is the epidemiological name)
STAGES: tuple[str, ...] = ("S", "E", "I", "R", "D")

#: Observation channels of ``y_i(t)``: ``employment`` is 1 for an agent alive and working
#: that day (``Behaviour.work``).
OBSERVATIONS: tuple[str, ...] = ("new_infections", "new_deaths", "employment")
#: How agents decide ℓ: the built-in archetypes, or a behaviour table (``sim.archetypes``).
BEHAVIOUR_KINDS: tuple[str, ...] = ("heuristic", "table")

#: Exact-sum grids, part of the model: a sender's infectiousness is a multiple of 2^-Q_BITS and
#: a day's edge weight a multiple of 2^-W_BITS, so every message is an integer multiple of
#: 2^-EXACT_FRAC_BITS. With |message| < 2^MAX_MESSAGE_LOG2 and fewer than 2^MAX_IN_DEGREE_LOG2
#: messages per receiver, every partial sum needs at most 53 bits: float64 sums are exact in
#: any order and equal a fixed-point sum with EXACT_FRAC_BITS fraction bits. That is why the
#: central simulator (float64) and a federation (fixed-point secure sums) give the same model;
#: float32 keeps the grids but rounds its sums.
Q_BITS = 20
W_BITS = 12
EXACT_FRAC_BITS = Q_BITS + W_BITS
MAX_MESSAGE_LOG2 = 6
MAX_IN_DEGREE_LOG2 = 53 - EXACT_FRAC_BITS - MAX_MESSAGE_LOG2

_BETA, _MORTALITY, _INIT = (PARAM_NAMES.index(n) for n in ("beta", "mortality", "init_frac"))
#: θ's rows of the alignment's scales and shifts, in age-group order
_SCALE = [PARAM_NAMES.index(f"scale_{g}") for g in ALIGNMENT_GROUPS]
_SHIFT = [PARAM_NAMES.index(f"shift_{g}") for g in ALIGNMENT_GROUPS]
#: probabilities are clamped into [ε, 1 − ε] before their logit
_P_EPS = 1e-6


def theta_dual(theta: torch.Tensor, grad: tuple[str, ...]) -> torch.Tensor:
    """θ (p,) as a forward-mode dual (p, 1 + k) with tangents along the k parameters in
    ``grad``: parameter ``grad[j]`` has unit tangent j, every other parameter none."""
    t = theta.detach()
    tangents = t.new_zeros((len(PARAM_NAMES), len(grad)))
    for j, name in enumerate(grad):
        tangents[PARAM_NAMES.index(name), j] = 1.0
    return dual.make(t, tangents)


class ModelConfigError(ValueError):
    """A model setting or intervention is invalid; the message names it."""


@dataclass(frozen=True)
class Archetype:
    """A behavioural archetype (ℓ): how much an agent mixes, and whether it isolates when ill."""

    name: str
    share: float
    contact_scale: float
    isolation_prob: float


@dataclass(frozen=True)
class Lockdown:
    """Scale contact layer ``layer``'s weights by ``scale`` on days ``start_day <= t < end_day``."""

    layer: str
    start_day: int
    scale: float
    end_day: int | None = None

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ModelConfigError(
                f"lockdown of {self.layer!r}: scale must be >= 0, got {self.scale}"
            )
        if self.start_day < 0 or (self.end_day is not None and self.end_day <= self.start_day):
            raise ModelConfigError(
                f"lockdown of {self.layer!r}: need 0 <= start_day < end_day, got "
                f"{self.start_day}..{self.end_day}"
            )

    def active(self, day: int) -> bool:
        return day >= self.start_day and (self.end_day is None or day < self.end_day)


@dataclass(frozen=True)
class Vaccination:
    """On ``day``, a ``fraction`` of agents is vaccinated: susceptibility × (1 − efficacy)."""

    day: int
    fraction: float
    efficacy: float = 0.9

    def __post_init__(self) -> None:
        if self.day < 0:
            raise ModelConfigError(f"vaccination day must be >= 0, got {self.day}")
        for name in ("fraction", "efficacy"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ModelConfigError(f"vaccination {name} must be in [0, 1], got {v}")


@dataclass(frozen=True)
class Stimulus:
    """A stimulus payment of ``amount`` US dollars in month ``month`` (0: the run's first
    month): public policy that enters the behaviour table's prompts (``sim.archetypes``)."""

    month: int
    amount: float

    def __post_init__(self) -> None:
        if self.month < 0:
            raise ModelConfigError(f"stimulus month must be >= 0, got {self.month}")
        if not (math.isfinite(self.amount) and self.amount >= 0):
            raise ModelConfigError(f"stimulus amount must be >= 0 dollars, got {self.amount}")


@dataclass(frozen=True)
class ModelConfig:
    """Fixed (non-calibrated) model settings. Defaults are COVID-19-like, per age group.

    Age-indexed tuples follow ``sim.populations.AGE_GROUPS`` (U19, 20t29, 30t39, 40t49, 50t64,
    65A).
    """

    susceptibility: tuple[float, ...] = (0.6, 1.0, 1.0, 1.0, 1.1, 1.2)
    age_mortality: tuple[float, ...] = (0.005, 0.02, 0.05, 0.15, 0.6, 3.0)
    latent_days: tuple[int, int] = (2, 4)  # inclusive range; drawn per agent
    infectious_days: tuple[int, int] = (4, 7)
    #: relative infectiousness by day since onset of infectiousness (last value repeats)
    profile: tuple[float, ...] = (0.7, 1.0, 1.0, 0.8, 0.6, 0.4, 0.3)
    archetypes: tuple[Archetype, ...] = (
        Archetype("cautious", 0.3, 0.7, 0.8),
        Archetype("average", 0.5, 1.0, 0.4),
        Archetype("carefree", 0.2, 1.2, 0.0),
    )
    isolation_delay: int = 1  # days after onset before an isolating agent isolates
    isolation_effect: float = 0.8  # fraction of outgoing contact removed while isolating
    #: seed from ``Population.initially_infected`` instead of drawing ``init_frac``
    use_population_seeds: bool = False
    lockdowns: tuple[Lockdown, ...] = ()
    vaccinations: tuple[Vaccination, ...] = ()
    estimator: Estimator = field(default_factory=Estimator)
    #: the parameters that carry forward-mode tangents (and are reported in gradients)
    grad: tuple[str, ...] = BASE_PARAMS
    #: ``heuristic``: the archetypes above decide (isolating when ill; everyone in the labour
    #: force works); ``table``: each agent draws whether to isolate and whether to work from
    #: its archetype cell's row of a behaviour table (``sim.archetypes``), one row per period
    behaviour: str = "heuristic"
    #: days per period of the behaviour table (7: weekly, 30: monthly)
    period_days: int = 7
    #: the contact layer a day off work removes (a population without it: no contact effect)
    work_layer: str = "work"
    stimuli: tuple[Stimulus, ...] = ()

    def __post_init__(self) -> None:
        if len(self.susceptibility) != 6 or len(self.age_mortality) != 6:
            raise ModelConfigError(
                "susceptibility and age_mortality need one value per age group (6)"
            )
        for name, (lo, hi) in (
            ("latent_days", self.latent_days),
            ("infectious_days", self.infectious_days),
        ):
            if not 1 <= lo <= hi:
                raise ModelConfigError(f"{name} must satisfy 1 <= min <= max, got {(lo, hi)}")
        if abs(sum(a.share for a in self.archetypes) - 1.0) > 1e-9:
            raise ModelConfigError("archetype shares must sum to 1")
        if not self.profile or min(self.profile) < 0:
            raise ModelConfigError("profile must be a non-empty sequence of non-negative values")
        if self.behaviour not in BEHAVIOUR_KINDS:
            raise ModelConfigError(
                f"behaviour must be one of {BEHAVIOUR_KINDS}, got {self.behaviour!r}"
            )
        if self.period_days < 1:
            raise ModelConfigError(f"period_days must be >= 1, got {self.period_days}")
        unknown = [n for n in self.grad if n not in PARAM_NAMES]
        if not self.grad or unknown or len(set(self.grad)) != len(self.grad):
            raise ModelConfigError(
                f"grad must name distinct parameters of {PARAM_NAMES}, got {list(self.grad)}"
            )

    def stimulus(self, month: int) -> float:
        """The stimulus paid in ``month`` (dollars; 0 if none)."""
        return sum(s.amount for s in self.stimuli if s.month == month)

    def layer_scale(self, layer: str, day: int) -> float:
        """The lockdown multiplier of ``layer`` on ``day``."""
        s = 1.0
        for lock in self.lockdowns:
            if lock.layer == layer and lock.active(day):
                s *= lock.scale
        return s


@dataclass(frozen=True)
class Agents:
    """Per-agent constants for a set of agents: what a device knows about its own agent.

    Everything here is a pure function of (seed, agent id, age group), so any subset is
    consistent with the whole.
    """

    ids: torch.Tensor  # int64 (n,) global agent ids (the randomness counters)
    age_group: torch.Tensor  # int64 (n,)
    latent_days: torch.Tensor  # int32 (n,)
    infectious_days: torch.Tensor  # int32 (n,)
    archetype: torch.Tensor  # int64 (n,) index into ModelConfig.archetypes
    seeded: torch.Tensor  # bool (n,) data-driven initial infections
    cell: torch.Tensor  # int64 (n,) archetype cell (``sim.archetypes``), public attributes
    labour_force: torch.Tensor  # bool (n,) in the labour force (has an occupation)

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    @property
    def device(self) -> torch.device:
        return self.ids.device


def quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to the nearest multiple of 2^-bits (exact in float64 for |x| < 2^(52 − bits))."""
    return torch.round(x * 2.0**bits) / 2.0**bits


def day_weight(weight: torch.Tensor, layer_scale: float) -> torch.Tensor:
    """The weight an edge carries on a day: its layer weight × the day's lockdown scale.

    It lives on the 2^-W_BITS grid (see :data:`EXACT_FRAC_BITS`). A device's radio measures
    this weight; the central runner multiplies by it: both use this one function.
    """
    return quantize(weight * layer_scale, W_BITS)


def make_agents(
    ids: torch.Tensor,
    age_group: torch.Tensor,
    config: ModelConfig,
    seed: int,
    seeded: torch.Tensor | None = None,
    cell: torch.Tensor | None = None,
    labour_force: torch.Tensor | None = None,
) -> Agents:
    """Draw the per-agent constants (durations, archetype) for agents ``ids``.

    ``cell`` and ``labour_force`` are the agents' archetype cells and labour-force flags
    (``sim.archetypes.population_cells``, ``labour_force``); without them every agent is in
    cell 0 and the working-age groups (20–64) are the labour force.
    """
    ids = ids.to(torch.int64)

    def duration(purpose: Purpose, lo_hi: tuple[int, int]) -> torch.Tensor:
        lo, hi = lo_hi
        u = rng.uniform(seed, ids, 0, purpose)
        return (lo + torch.floor(u * (hi - lo + 1))).to(torch.int32)

    shares = torch.tensor(
        [a.share for a in config.archetypes], dtype=torch.float64, device=ids.device
    )
    u = rng.uniform(seed, ids, 0, Purpose.ARCHETYPE)
    archetype = torch.searchsorted(torch.cumsum(shares, 0)[:-1], u, right=True)
    return Agents(
        ids=ids,
        age_group=age_group.to(torch.int64),
        latent_days=duration(Purpose.LATENT_DAYS, config.latent_days),
        infectious_days=duration(Purpose.INFECTIOUS_DAYS, config.infectious_days),
        archetype=archetype,
        seeded=(
            seeded.to(torch.bool) if seeded is not None else torch.zeros_like(ids, dtype=torch.bool)
        ),
        cell=torch.zeros_like(ids) if cell is None else cell.to(ids.device, torch.int64),
        labour_force=(
            ((age_group >= 1) & (age_group <= 4)).to(ids.device)
            if labour_force is None
            else labour_force.to(ids.device, torch.bool)
        ),
    )


@dataclass(frozen=True)
class State:
    """An agent set's state z(t).

    ``stage``: int8 hard stage (S E I R D). ``t_exposed``: int32 day of exposure (−1: never).
    ``x``: dual (n, 5, 1+p) soft stage indicators; their values equal ``one_hot(stage)``
    exactly, their tangents are ``dz/dθ``.
    """

    stage: torch.Tensor
    t_exposed: torch.Tensor
    x: torch.Tensor


@dataclass(frozen=True)
class Behaviour:
    """ℓ for one day, as duals (n, 1+p) (θ-dependent through a behaviour table's alignment).

    ``out_scale``, ``in_scale``: multipliers on outgoing and incoming contact weight.
    ``work``: 1 for an agent who works that day (the ``employment`` observation, once alive).
    ``at_work``: the hard 0/1 of ``work`` where a day off removes the agent's workplace
    contacts (a behaviour table), or ``None`` (the heuristic: workplace contacts as given).
    """

    out_scale: torch.Tensor
    in_scale: torch.Tensor
    work: torch.Tensor
    at_work: torch.Tensor | None = None


def _table(values: tuple[float, ...], index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=index.device)[index]


def initial_state(agents: Agents, theta: torch.Tensor, config: ModelConfig, seed: int) -> State:
    """z(0): each agent starts infectious with probability ``init_frac`` (or per the data seeds).

    Seeds enter stage I on day 0 as if exposed ``latent_days`` earlier. ``theta`` is a dual
    (p, 1+p) (see ``sim.dual``); its dtype sets the state's.
    """
    n, width = agents.n, theta.shape[-1]
    dtype = theta.dtype
    if config.use_population_seeds:
        b = dual.constant(agents.seeded.to(dtype), width)
    else:
        u = rng.uniform(seed, agents.ids, 0, Purpose.INITIAL_INFECTION, dtype)
        p = theta[_INIT].expand(n, width)
        b = bernoulli(p, u, config.estimator)
    hard = dual.value(b).detach() > 0.5
    zero = theta.new_zeros((n, width))
    x = torch.stack([dual.constant(theta.new_ones(n), width) - b, zero, b, zero, zero], dim=1)
    stage = torch.where(hard, I, S).to(torch.int8)
    t_exposed = torch.where(hard, -agents.latent_days, -1).to(torch.int32)
    return State(stage=stage, t_exposed=t_exposed, x=x)


def _days_since_onset(agents: Agents, state: State, day: int) -> torch.Tensor:
    return day - state.t_exposed - agents.latent_days


def vaccinated(
    agents: Agents, config: ModelConfig, seed: int, day: int, dtype: torch.dtype
) -> torch.Tensor:
    """Susceptibility multiplier from vaccination campaigns that happened on or before ``day``."""
    mult = torch.ones(agents.n, dtype=dtype, device=agents.device)
    for vac in config.vaccinations:
        if day >= vac.day:
            u = rng.uniform(seed, agents.ids, vac.day, Purpose.VACCINATION, dtype)
            mult = torch.where(u < vac.fraction, mult * (1.0 - vac.efficacy), mult)
    return mult


def _alignment(agents: Agents, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each agent's alignment scale and shift by its age group, duals (n, 1+p): θ's rows
    gathered once for both (``index_select`` copies the same values as indexing each)."""
    rows = theta[_SCALE + _SHIFT].reshape(2, len(_SCALE), theta.shape[-1])
    both = rows.index_select(1, agents.age_group)  # (2, n, width)
    return both[0], both[1]


def aligned(
    p: torch.Tensor,
    agents: Agents,
    theta: torch.Tensor,
    alignment: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A table's probabilities (n,) aligned per age group g: ``sigmoid(scale_g · logit p +
    shift_g)``, as a dual (n, 1+p) whose tangents come from θ's alignment parameters.
    ``alignment``: the agents' (scale, shift) if already gathered (:func:`_alignment`)."""
    logit = torch.logit(p.clamp(_P_EPS, 1.0 - _P_EPS))
    if alignment is None:
        scale = theta[_SCALE][agents.age_group]  # (n, width)
        shift = theta[_SHIFT][agents.age_group]
    else:
        scale, shift = alignment
    z = dual.scale(scale, logit) + shift
    s = torch.sigmoid(dual.value(z))
    if z.shape[-1] == 1:  # no tangents: the value alone (saves the copy of a concatenation)
        return s.unsqueeze(-1)
    return torch.cat([s.unsqueeze(-1), (s * (1 - s)).unsqueeze(-1) * z[..., 1:]], dim=-1)


def _choice(
    p: torch.Tensor,
    u: torch.Tensor,
    agents: Agents,
    theta: torch.Tensor,
    config: ModelConfig,
    alignment: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """An agent's choice from its cell's probability ``p`` (n,) and its draw ``u``: the dual
    event ``bernoulli(aligned(p), u)``. Where nothing carries a derivative (no tangents, no
    autograd graph) that event's value is its hard 0/1 — whatever the estimator, its soft
    part cancels — so the hard value is all that is computed."""
    a = aligned(p, agents, theta, alignment)
    if a.shape[-1] == 1 and not (torch.is_grad_enabled() and a.requires_grad):
        return (u < a[..., 0]).to(a.dtype).unsqueeze(-1)
    return bernoulli(a, u, config.estimator)


def behaviour(
    agents: Agents,
    state: State,
    theta: torch.Tensor,
    config: ModelConfig,
    seed: int,
    day: int,
    probabilities: torch.Tensor | None = None,
) -> Behaviour:
    """ℓ: each agent's choices of the day.

    ``heuristic``: every agent scales its contacts by its archetype's ``contact_scale``; an
    infectious agent whose archetype isolates (drawn once per infection episode) cuts its
    outgoing contact by ``isolation_effect`` from ``isolation_delay`` days after onset; the
    labour force works.

    ``table``: ``probabilities`` is the period's table row, (cells, 2): p(isolate), p(work)
    per archetype cell. Each agent takes its cell's row, aligned by θ (:func:`aligned`), and
    draws both choices (straight-through, so ``d/dθ`` reaches the alignment): an isolating
    agent cuts its outgoing and incoming contact by ``isolation_effect``; an agent in the
    labour force who does not work stays off the workplace layer.
    """
    dtype, width = state.x.dtype, theta.shape[-1]
    labour = agents.labour_force.to(dtype)
    if config.behaviour == "heuristic":
        contact = _table(tuple(a.contact_scale for a in config.archetypes), agents.archetype, dtype)
        iso_prob = _table(
            tuple(a.isolation_prob for a in config.archetypes), agents.archetype, dtype
        )
        # Drawn at step = day of exposure: one decision per episode, the same on every later day.
        episode = state.t_exposed.clamp(min=0).to(torch.int64)
        u = rng.uniform(seed, agents.ids, episode, Purpose.ISOLATION, dtype)
        isolating = (
            (state.stage == I)
            & (_days_since_onset(agents, state, day) >= config.isolation_delay)
            & (u < iso_prob)
        )
        out_scale = torch.where(isolating, contact * (1.0 - config.isolation_effect), contact)
        return Behaviour(
            out_scale=dual.constant(out_scale, width),
            in_scale=dual.constant(contact, width),
            work=dual.constant(labour, width),
        )
    if probabilities is None:
        raise ModelConfigError("a behaviour table run needs the period's table row")
    # (2, n): each behaviour's probabilities, a contiguous row (index_select: a fast gather)
    p = probabilities.to(agents.device, dtype).T.index_select(1, agents.cell)
    u_iso = rng.uniform(seed, agents.ids, day, Purpose.ISOLATE_CHOICE, dtype)
    u_work = rng.uniform(seed, agents.ids, day, Purpose.WORK_CHOICE, dtype)
    # One gather of the alignment serves both choices; under autograd each choice gathers its
    # own, so that backpropagation adds up each choice's gradient as a graph of its own.
    alignment = (
        None if torch.is_grad_enabled() and theta.requires_grad else _alignment(agents, theta)
    )
    isolate = _choice(p[0], u_iso, agents, theta, config, alignment)
    work = dual.scale(_choice(p[1], u_work, agents, theta, config, alignment), labour)
    # 1 − isolation_effect × isolate: the scale on an isolating agent's contacts
    lost = dual.scale(isolate, config.isolation_effect)
    keep = 1.0 - lost if width == 1 else dual.constant(torch.ones_like(labour), width) - lost
    return Behaviour(
        out_scale=keep, in_scale=keep, work=work, at_work=dual.value(work).detach() > 0.5
    )


def work_choices(
    agents: Agents,
    theta: torch.Tensor,
    config: ModelConfig,
    seed: int,
    day: int,
    probabilities: torch.Tensor,
) -> torch.Tensor:
    """Who is at work on ``day`` (bool (n,)) under a behaviour table: the hard value of
    :func:`behaviour`'s ``work`` — the same draws and arithmetic, for any agent set. A
    simulated world uses it to know who meets whom at work; ``theta`` may be a plain (p,) θ."""
    th = theta if theta.dim() == 2 else theta.unsqueeze(-1)
    dtype = th.dtype
    p = probabilities[:, 1].to(agents.device, dtype).index_select(0, agents.cell)
    u = rng.uniform(seed, agents.ids, day, Purpose.WORK_CHOICE, dtype)
    return (u < dual.value(aligned(p, agents, th)).detach()) & agents.labour_force


def infectiousness(
    agents: Agents, state: State, beh: Behaviour, theta: torch.Tensor, config: ModelConfig, day: int
) -> torch.Tensor:
    """Per-sender factor of every message: ``beta × x_I × profile(days since onset) × out_scale``.

    Returns a dual (n, 1+p) whose values are on the 2^-Q_BITS grid.
    """
    dtype = state.x.dtype
    k = _days_since_onset(agents, state, day).clamp(0, len(config.profile) - 1).to(torch.int64)
    prof = torch.where(state.stage == I, _table(config.profile, k, dtype), 0.0)
    q = dual.scale_dual(
        dual.mul(state.x[:, I], theta[_BETA].expand(agents.n, -1)), beh.out_scale, prof
    )
    # Values go on the 2^-Q_BITS grid; the rounding is straight-through for autograd and the
    # tangents are left as they are (they need no exactness, only the discrete outcomes do).
    v = q[..., 0]
    v = v + (quantize(v.detach(), Q_BITS) - v.detach())
    return torch.cat([v.unsqueeze(-1), q[..., 1:]], dim=-1)


def message(q_src: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``M_ij = weight_ij × q_j`` for each edge j→i; ``q_src`` is the sender's dual (E, 1+p).

    Linear in ``q_src``, so value and tangents are scaled alike.
    """
    return q_src * weight.unsqueeze(-1)


def aggregate(messages: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """⊕: sum the messages (E, 1+p) per receiver ``dst`` → (n, 1+p). A scatter-add."""
    out = messages.new_zeros((n, messages.shape[-1]))
    return out.index_add(0, dst, messages)


@dataclass(frozen=True)
class StepResult:
    """What ``update`` returns: z(t+1) and the agents' observations ``y_i(t)``."""

    state: State
    y: torch.Tensor  # dual (n, 3, 1+p): new_infections, new_deaths, employment


def update(
    agents: Agents,
    state: State,
    incoming: torch.Tensor,
    beh: Behaviour,
    theta: torch.Tensor,
    config: ModelConfig,
    seed: int,
    day: int,
) -> StepResult:
    """f: one day of disease dynamics for ``agents`` given their neighbourhood sums ``incoming``.

    1. Infection: force = susceptibility(age) × vaccination × in_scale × incoming;
       P(infected) = 1 − exp(−force), sampled straight-through for susceptible agents.
    2. Progression: E→I after ``latent_days``; I→R/D after ``infectious_days``, death with
       P = mortality × age_mortality(age), sampled straight-through.
    """
    dtype, n, width = state.x.dtype, agents.n, state.x.shape[-1]
    susc = _table(config.susceptibility, agents.age_group, dtype) * vaccinated(
        agents, config, seed, day, dtype
    )
    p_inf = dual.one_minus_exp_neg(dual.scale_dual(incoming, beh.in_scale, susc))
    b_inf = bernoulli(
        p_inf, rng.uniform(seed, agents.ids, day, Purpose.INFECTION, dtype), config.estimator
    )
    is_s = (state.stage == S).to(dtype)
    new_inf = dual.scale(dual.mul(b_inf, state.x[:, S]), is_s)

    since = day - state.t_exposed
    onset = ((state.stage == E) & (since == agents.latent_days)).to(dtype)
    ending = ((state.stage == I) & (since == agents.latent_days + agents.infectious_days)).to(dtype)
    flow_ei = dual.scale(state.x[:, E], onset)
    flow_out = dual.scale(state.x[:, I], ending)

    rr = _table(config.age_mortality, agents.age_group, dtype)
    p_die = dual.scale(theta[_MORTALITY].expand(n, width), rr).clone()
    # Clamp to a probability; where clamped the derivative is zero, as autograd's clamp has it.
    over = dual.value(p_die) > 1.0
    p_die[over] = dual.constant(p_die.new_ones(int(over.sum())), width)
    b_die = bernoulli(
        p_die, rng.uniform(seed, agents.ids, day, Purpose.DEATH, dtype), config.estimator
    )
    deaths = dual.mul(b_die, flow_out)
    recoveries = flow_out - deaths

    x = state.x
    x = torch.stack(
        [
            x[:, S] - new_inf,
            x[:, E] + new_inf - flow_ei,
            x[:, I] + flow_ei - flow_out,
            x[:, R] + recoveries,
            x[:, D] + deaths,
        ],
        dim=1,
    )

    infected_now = dual.value(new_inf).detach() > 0.5
    died_now = dual.value(deaths).detach() > 0.5
    stage = state.stage.clone()
    stage[onset > 0] = I
    stage[ending > 0] = R
    stage[died_now] = D
    stage[infected_now] = E
    t_exposed = torch.where(infected_now, torch.full_like(state.t_exposed, day), state.t_exposed)
    # employment: working and alive at the start of the day
    employed = dual.mul(beh.work, dual.constant(torch.ones(n, dtype=dtype), width) - state.x[:, D])
    y = torch.stack([new_inf, deaths, employed], dim=1)
    return StepResult(State(stage=stage, t_exposed=t_exposed, x=x), y)
