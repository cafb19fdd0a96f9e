"""The central, vectorized simulator: every agent at once, on CPU or GPU.

Per day it calls the named model functions of ``sim.model`` on all agents. The aggregate
``⊕`` of ``message`` over each contact layer is computed as one sparse CSR matrix product
``A_l @ q`` (rows = receivers, columns = senders, values = edge weights), which equals
``aggregate(message(q[src], w), dst)`` (``tests/sim/test_model.py`` checks it) and is
2–3× faster than a scatter-add on CPU, with a deterministic summation order per receiver.

Three gradient modes share this one code path:

- ``"none"``: values only (dual width 1, no autograd).
- ``"forward"``: every quantity carries p tangents (dual width 1 + p); memory O(N·p) whatever
  the number of days, nothing stored per step but the aggregates ``Y_t`` and ``dY_t/dθ``.
- ``"reverse"``: autograd through the whole run (dual width 1); memory grows with days.

dtype: float32 (default) is ~2× faster and is what the benchmark uses; float64 is for
gradient-agreement tests and long calibrations where tangents accumulate many terms.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from sim import dual
from sim.archetypes import (
    MONTH_DAYS,
    BehaviourSource,
    BehaviourTable,
    labour_force,
    population_cells,
    public_numbers,
)
from sim.model import (
    MAX_IN_DEGREE_LOG2,
    MAX_MESSAGE_LOG2,
    OBSERVATIONS,
    STAGES,
    Agents,
    ModelConfig,
    ModelConfigError,
    State,
    behaviour,
    day_weight,
    infectiousness,
    initial_state,
    make_agents,
    theta_dual,
    update,
)
from sim.params import BASE_PARAMS, PARAM_NAMES, Theta
from sim.populations import AGE_GROUPS, Population

# CSR support is marked beta in torch; the operations used here (matmul, transpose-free
# construction) have been stable since 2.0, so the warning is noise for users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

GradMode = str  # "none" | "forward" | "reverse"
#: The dtypes a run can use: float64 (the default) sums exactly; float32 is faster, inexact.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LossFn = Callable[[torch.Tensor], torch.Tensor]


def total_infections(y: torch.Tensor) -> torch.Tensor:
    """The default loss: total new infections over the run. ``y`` is (T, channels, G) values."""
    return y[:, 0].sum()


class _CSRMatmul(torch.autograd.Function):
    """``A @ Q`` with a fast backward ``Aᵀ @ grad`` from a precomputed transposed CSR."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        a: torch.Tensor,
        a_t: torch.Tensor,
        q: torch.Tensor,
    ) -> torch.Tensor:
        ctx.a_t = a_t
        return a @ q

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, None, torch.Tensor]:
        return None, None, ctx.a_t @ grad


class _Layer:
    """One contact layer as CSR index structures; matrices are built per day weight.

    The sparsity pattern (receivers × senders) and its transpose are fixed; only the values
    change with the day's lockdown scale, so matrices share the index tensors and are cached
    per scale (a run sees only a few distinct scales).
    """

    def __init__(
        self, name: str, src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, n: int
    ) -> None:
        self.name = name
        self.n = n
        crow, col, order = _csr_index(dst, src, n)
        crow_t, col_t, order_t = _csr_index(src, dst, n)
        self._index = (crow, col, crow_t, col_t)
        # Weights kept in each pattern's order: day_weight is element-wise, so it commutes
        # with the permutation, and floats take half the memory of the int64 orders.
        self._weight = (weight[order], weight[order_t])
        self.max_weight = float(weight.abs().max()) if weight.numel() else 0.0
        self.max_in_degree = int((crow[1:] - crow[:-1]).max()) if n else 0
        self._cache: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, Aᵀ)`` with values ``day_weight(weight, scale)``."""
        if scale not in self._cache:
            crow, col, crow_t, col_t = self._index
            w, w_t = (day_weight(x, scale) for x in self._weight)
            shape = (self.n, self.n)
            self._cache[scale] = (
                torch.sparse_csr_tensor(crow, col, w, shape, check_invariants=False),
                torch.sparse_csr_tensor(crow_t, col_t, w_t, shape, check_invariants=False),
            )
        return self._cache[scale]


def _csr_index(
    rows: torch.Tensor, cols: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row pointers, column indices and the edge order of a CSR pattern sorted by (row, col)."""
    order = torch.argsort(rows * n + cols)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return crow, cols[order], order


@dataclass
class RunResult:
    """The outcome of a run.

    ``y``: dual (T, 3, G, 1+p) of daily aggregates — observations ``new_infections``,
    ``new_deaths``, ``employment`` by age group (``AGE_GROUPS``); its value part is
    differentiable in reverse mode. ``stage_counts``: (T+1, 5) agents per stage (S E I R D),
    row 0 the initial state.
    """

    days: int
    agents: int
    mode: GradMode
    y: torch.Tensor
    stage_counts: torch.Tensor
    theta: Theta
    #: the parameters ``loss_and_grad`` differentiates (``ModelConfig.grad``), in order
    grad_names: tuple[str, ...] = BASE_PARAMS
    #: the behaviour table the run realised (one row per period), or None (heuristic)
    table: BehaviourTable | None = None
    _theta_tensor: torch.Tensor | None = field(default=None, repr=False)

    @property
    def new_infections(self) -> torch.Tensor:
        """(T,) daily new infections, all ages."""
        return dual.value(self.y)[:, 0].sum(-1).detach()

    @property
    def new_deaths(self) -> torch.Tensor:
        """(T,) daily new deaths, all ages."""
        return dual.value(self.y)[:, 1].sum(-1).detach()

    @property
    def employment(self) -> torch.Tensor:
        """(T,) agents working each day, all ages."""
        return dual.value(self.y)[:, 2].sum(-1).detach()

    def loss_and_grad(
        self, loss_fn: LossFn = total_infections
    ) -> tuple[float, torch.Tensor | None]:
        """L(Y) and dL/dθ over :attr:`grad_names` (a (k,) tensor; None in mode "none").

        Forward mode: ``dL/dθ = Σ_t ∂L/∂Y_t · dY_t/dθ`` (autograd only over the small Y).
        Reverse mode: backpropagation through the whole run.
        """
        yv = dual.value(self.y)
        if self.mode == "forward":
            leaf = yv.detach().requires_grad_(True)
            loss = loss_fn(leaf)
            (g,) = torch.autograd.grad(loss, leaf)
            grad = torch.einsum("tkg,tkgp->p", g, dual.tangent(self.y))
            return float(loss.detach()), grad
        if self.mode == "reverse":
            assert self._theta_tensor is not None
            loss = loss_fn(yv)
            # The graph is kept so that several losses can be asked of one run.
            (grad,) = torch.autograd.grad(loss, self._theta_tensor, retain_graph=True)
            index = [PARAM_NAMES.index(n) for n in self.grad_names]
            return float(loss.detach()), grad[index]
        return float(loss_fn(yv)), None

    def daily(self) -> dict[str, list[float]]:
        """Each observation channel's daily total over all ages, by name."""
        totals = dual.value(self.y).sum(-1).detach()  # (T, channels)
        return {name: totals[:, k].tolist() for k, name in enumerate(OBSERVATIONS)}


class CentralSimulator:
    """Runs a population under a model configuration; build once, run many θ.

    >>> sim = CentralSimulator(populations.synthetic(1000), ModelConfig(), seed=1)
    >>> result = sim.run(Theta(beta=0.3), days=30, mode="forward")
    >>> loss, grad = result.loss_and_grad()
    """

    def __init__(
        self,
        population: Population,
        config: ModelConfig | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.population = population
        self.config = config or ModelConfig()
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype
        n = population.n_agents
        if self.config.use_population_seeds and population.initially_infected is None:
            raise ModelConfigError(
                f"population {population.name!r} has no initially_infected column "
                "to seed from; use init_frac instead"
            )
        known = {layer.name for layer in population.layers}
        for lock in self.config.lockdowns:
            if lock.layer not in known:
                raise ModelConfigError(
                    f"lockdown names layer {lock.layer!r}; layers: {sorted(known)}"
                )
        #: the archetype cells of the population's public attributes (``sim.archetypes``)
        self.grid, cells = population_cells(population)
        self.agents: Agents = make_agents(
            torch.arange(n, device=self.device),
            population.age_group.to(self.device),
            self.config,
            seed,
            None
            if population.initially_infected is None
            else population.initially_infected.to(self.device),
            cells.to(self.device),
            labour_force(population).to(self.device),
        )
        self.layers = tuple(
            _Layer(
                layer.name,
                layer.src.to(self.device),
                layer.dst.to(self.device),
                layer.weight.to(self.device, dtype),
                n,
            )
            for layer in population.layers
        )
        if self.exact:
            self._check_exact_sums()
        self.age_onehot = torch.nn.functional.one_hot(self.agents.age_group, len(AGE_GROUPS)).to(
            dtype
        )

    def neighbourhood_sums(
        self, q: torch.Tensor, day: int, at_work: torch.Tensor | None = None
    ) -> torch.Tensor:
        """⊕ over all layers of ``message``: Σ_l A_l(day) @ q for a dual q (N, 1+p).

        ``A_l(day)`` carries ``day_weight`` (layer weight × lockdown scale) per edge. With
        ``at_work`` (bool (N,)), the workplace layer's contacts happen only between agents at
        work that day: who meets whom, not a differentiable quantity.
        """
        total = torch.zeros_like(q)
        for layer in self.layers:
            scale = self.config.layer_scale(layer.name, day)
            if scale == 0.0:
                continue
            a, a_t = layer.matrices(scale)
            if at_work is not None and layer.name == self.config.work_layer:
                present = at_work.to(q.dtype).unsqueeze(-1)
                sent = q * present
                summed = _CSRMatmul.apply(a, a_t, sent) if sent.requires_grad else a @ sent
                total = total + summed * present
                continue
            total = total + (_CSRMatmul.apply(a, a_t, q) if q.requires_grad else a @ q)
        return total

    @property
    def exact(self) -> bool:
        """Whether neighbourhood sums are exact (float64: see ``sim.model.EXACT_FRAC_BITS``),
        so a federation's fixed-point sums reproduce this run bit for bit."""
        return self.dtype == torch.float64

    def _check_exact_sums(self) -> None:
        """The bit budget of exact sums (see ``sim.model.EXACT_FRAC_BITS``) must hold."""
        degree = sum(layer.max_in_degree for layer in self.layers)
        if degree >= 2**MAX_IN_DEGREE_LOG2:
            raise ModelConfigError(
                f"exact sums: an agent receives up to {degree} messages a day; the bit budget "
                f"allows fewer than 2^{MAX_IN_DEGREE_LOG2} (use --dtype float32, inexact)"
            )

    def _max_message(self, theta: Theta) -> float:
        """An upper bound of |message| under θ: beta × max profile × max mixing × max weight."""
        c = self.config
        w = max((layer.max_weight for layer in self.layers), default=0.0)
        scale = max([1.0, *(lock.scale for lock in c.lockdowns)])
        return theta.beta * max(c.profile) * max(a.contact_scale for a in c.archetypes) * w * scale

    def theta_dual(self, theta: Theta | torch.Tensor, mode: GradMode) -> torch.Tensor:
        """θ as a dual (p, width): in forward mode, unit tangents along ``config.grad``."""
        t = theta if isinstance(theta, torch.Tensor) else theta.as_tensor()
        t = t.to(self.device, self.dtype)
        if mode == "forward":
            return theta_dual(t, self.config.grad)
        return t.unsqueeze(-1)

    def run(
        self,
        theta: Theta | torch.Tensor,
        days: int,
        mode: GradMode = "none",
        progress: bool = False,
        source: BehaviourSource | None = None,
    ) -> RunResult:
        """Simulate ``days`` days.

        ``theta``: a ``Theta`` or a (p,) tensor; in reverse mode pass a tensor with
        ``requires_grad=True`` to backpropagate into it (e.g. an optimizer's parameter or a
        calibration network's output). ``source`` fills the behaviour table of a ``table``
        run, one row at the start of each period, from the run's own public numbers so far
        (its daily new infections, the stimulus paid): the realised table is in the result.
        """
        if mode not in ("none", "forward", "reverse"):
            raise ValueError(f"mode must be none, forward or reverse, got {mode!r}")
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        checked = theta if isinstance(theta, Theta) else Theta.from_tensor(theta)
        if self.exact and self._max_message(checked) >= 2**MAX_MESSAGE_LOG2:
            raise ModelConfigError(
                f"exact sums: messages may reach {self._max_message(checked):.3g} under "
                f"beta={checked.beta}; the bit budget allows less than 2^{MAX_MESSAGE_LOG2} "
                "(use --dtype float32, inexact)"
            )
        if (self.config.behaviour == "table") != (source is not None):
            raise ModelConfigError(
                "a behaviour table run needs a source of the table, and only it takes one"
            )
        if mode == "reverse":
            leaf = (
                theta
                if isinstance(theta, torch.Tensor) and theta.requires_grad
                else (checked.as_tensor(self.dtype, self.device).requires_grad_(True))
            )
        else:
            leaf = None
        with torch.set_grad_enabled(mode == "reverse"):
            th = self.theta_dual(leaf if leaf is not None else theta, mode)
            state = initial_state(self.agents, th, self.config, self.seed)
            ys, counts = [], [self._counts(state)]
            rows: list[np.ndarray] = []
            daily_cases: list[float] = []
            for day in tqdm(
                range(days), desc="simulate", unit="day", disable=not progress, leave=False
            ):
                probabilities = None
                if source is not None:
                    period = self.config.period_days
                    if day % period == 0:
                        public = public_numbers(
                            daily_cases, day, period, self.config.stimulus(day // MONTH_DAYS)
                        )
                        rows.append(source.probabilities(self.grid, public))
                    probabilities = torch.from_numpy(rows[-1])
                state, y = self.step(state, th, day, probabilities)
                ys.append(y)
                daily_cases.append(float(dual.value(y)[0].sum().detach()))
                counts.append(self._counts(state))
        return RunResult(
            days=days,
            agents=self.agents.n,
            mode=mode,
            y=torch.stack(ys),
            stage_counts=torch.stack(counts),
            theta=checked,
            grad_names=self.config.grad,
            table=(
                BehaviourTable(self.grid, self.config.period_days, np.stack(rows), "run")
                if rows
                else None
            ),
            _theta_tensor=leaf,
        )

    def step(
        self,
        state: State,
        theta: torch.Tensor,
        day: int,
        probabilities: torch.Tensor | None = None,
    ) -> tuple[State, torch.Tensor]:
        """One day for everyone: ℓ, messages, ⊕, f; returns z(t+1) and Y_t (channels, G,
        width). ``probabilities``: the behaviour table's row of the day's period."""
        beh = behaviour(self.agents, state, theta, self.config, self.seed, day, probabilities)
        q = infectiousness(self.agents, state, beh, theta, self.config, day)
        incoming = self.neighbourhood_sums(q, day, beh.at_work)
        out = update(self.agents, state, incoming, beh, theta, self.config, self.seed, day)
        return out.state, self.observe(out.y, day)

    def observe(self, y: torch.Tensor, day: int) -> torch.Tensor:
        """The day's aggregates Y_t (channels, G, width) of every agent's ``y_i`` (N, …):
        Y_t[k, g] = Σ_{i in age group g} y_i,k, a (G × N) @ (N × 2·width) product."""
        n, k, w = y.shape
        return (self.age_onehot.T @ y.reshape(n, k * w)).reshape(-1, k, w).permute(1, 0, 2)

    @staticmethod
    def _counts(state: State) -> torch.Tensor:
        return torch.bincount(state.stage.to(torch.int64), minlength=len(STAGES)).cpu()
