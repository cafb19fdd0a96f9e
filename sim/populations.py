"""Populations: agents with an age group and contact layers as edge lists.

A contact layer is a directed edge list ``src -> dst``: agent ``src`` sends a message to agent
``dst``. A physical contact is symmetric, so loaders store both directions.

Every layer built here is sorted by ``(dst, src)`` with no self-loops (``random_contacts`` may
repeat a ``(src, dst)`` pair; all other builders have none), because the simulator builds its
per-destination CSR rows directly from that order.

Three ways to get a population:

- ``synthetic(n, seed)``: households, schools, workplaces and community contacts;
- ``random_contacts(n, degree, seed)``: a benchmark graph, every agent with exactly ``degree``
  incoming contacts;
- ``from_csv(dir)``: the Astoria format (``agents.csv`` plus ``contacts_*.csv`` layers).

``from_spec("synthetic:N" | "random:N:K" | DIR, seed)`` picks one from a CLI string.

Generation is not an agent's random draw (agents never generate their own population), so it
uses a seeded NumPy ``Generator`` (PCG64), several times faster than ``torch.randint`` on CPU,
rather than the counter-based ``sim.rng``. The result is a deterministic function of the
arguments.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "AGE_GROUPS",
    "DEFAULT_AGE_DISTRIBUTION",
    "SYNTHETIC_LAYER_WEIGHTS",
    "ContactLayer",
    "Population",
    "PopulationError",
    "PopulationFileError",
    "PopulationSpecError",
    "from_csv",
    "from_spec",
    "random_contacts",
    "synthetic",
]

logger = logging.getLogger(__name__)

#: Age groups, in the order of the Astoria data; ``Population.age_group`` indexes this tuple.
AGE_GROUPS: tuple[str, ...] = ("U19", "20t29", "30t39", "40t49", "50t64", "65A")

#: Share of each age group in ``synthetic`` populations (US census 2020, rounded).
DEFAULT_AGE_DISTRIBUTION: tuple[float, ...] = (0.25, 0.135, 0.133, 0.123, 0.192, 0.167)

#: Contact weight of each synthetic layer: a household contact is the reference (1.0); school,
#: work and community contacts are shorter and less close.
SYNTHETIC_LAYER_WEIGHTS: dict[str, float] = {
    "household": 1.0,
    "school": 0.5,
    "work": 0.3,
    "community": 0.1,
}

_WORKING_AGE_GROUPS = (1, 2, 3, 4)  # 20t29 .. 50t64
_MAX_HOUSEHOLD_SIZE = 6


class PopulationError(ValueError):
    """Base class of the errors raised while building or loading a population."""


class PopulationFileError(PopulationError):
    """A population file is missing or malformed.

    The message names the file, the 1-based line (the header is line 1) and the field, where
    they are known; they are also kept as the attributes ``path``, ``line`` and ``field``.
    """

    def __init__(
        self, path: Path | str, problem: str, *, line: int | None = None, field: str | None = None
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


class PopulationSpecError(PopulationError):
    """A ``--population`` spec string is not ``synthetic:N``, ``random:N:K`` or a directory."""


@dataclass(frozen=True)
class ContactLayer:
    """One contact layer (household, school, work, community, a mobility layer, ...).

    ``src``/``dst`` are int64 tensors of shape (E,), ``weight`` float32 of shape (E,).
    """

    name: str
    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor

    def __post_init__(self) -> None:
        # O(1) shape checks only: a full sortedness check would cost a pass over every edge.
        shapes = (tuple(self.src.shape), tuple(self.dst.shape), tuple(self.weight.shape))
        if len(shapes[0]) != 1 or len(set(shapes)) != 1:
            raise PopulationError(
                f"layer {self.name!r}: src, dst and weight must be 1-D of one length, "
                f"got shapes {shapes}"
            )

    @property
    def n_edges(self) -> int:
        """Number of directed edges."""
        return int(self.src.numel())

    def to(self, device: torch.device | str) -> ContactLayer:
        """A copy of this layer with its tensors on ``device``."""
        return replace(
            self, src=self.src.to(device), dst=self.dst.to(device), weight=self.weight.to(device)
        )


@dataclass(frozen=True)
class Population:
    """Agents (by index 0..N-1) and their contact layers.

    ``age_group`` is int64 (N,) into ``AGE_GROUPS``; ``initially_infected`` is an optional bool
    (N,) mask of agents that start infected (data-driven seeding, e.g. Astoria).
    """

    name: str
    age_group: torch.Tensor
    layers: tuple[ContactLayer, ...]
    initially_infected: torch.Tensor | None = None
    attributes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_agents(self) -> int:
        """Number of agents N."""
        return int(self.age_group.numel())

    @property
    def n_edges(self) -> int:
        """Number of directed edges over all layers."""
        return sum(layer.n_edges for layer in self.layers)

    def layer(self, name: str) -> ContactLayer:
        """The layer called ``name`` (``KeyError`` naming the known layers otherwise)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers are {[lay.name for lay in self.layers]}")

    def to(self, device: torch.device | str) -> Population:
        """A copy of this population with every tensor on ``device``."""
        infected = self.initially_infected
        return replace(
            self,
            age_group=self.age_group.to(device),
            layers=tuple(layer.to(device) for layer in self.layers),
            initially_infected=None if infected is None else infected.to(device),
            attributes={k: list(v) for k, v in self.attributes.items()},
        )

    def summary(self) -> dict[str, object]:
        """Aggregate facts about the population (counts only, nothing about one agent).

        ``mean_degree`` is directed edges per agent, i.e. the mean number of contacts.
        """
        counts = torch.bincount(self.age_group.cpu(), minlength=len(AGE_GROUPS)).tolist()
        n = self.n_agents
        infected = self.initially_infected
        return {
            "name": self.name,
            "agents": n,
            "edges": self.n_edges,
            "layers": {layer.name: layer.n_edges for layer in self.layers},
            "mean_degree": self.n_edges / n if n else 0.0,
            "age_groups": dict(zip(AGE_GROUPS, counts, strict=True)),
            "initially_infected": None if infected is None else int(infected.sum()),
        }


# --------------------------------------------------------------------------------------------
# Edge-list helpers
# --------------------------------------------------------------------------------------------


def _layer_from_undirected(
    name: str, a: np.ndarray, b: np.ndarray, n: int, weight: float
) -> ContactLayer:
    """Both directions of the undirected contacts ``a[k] -- b[k]``, deduplicated and sorted by
    ``(dst, src)``; pairs with ``a == b`` are dropped.

    One radix-friendly ``np.sort`` of the key ``dst * n + src`` sorts and exposes duplicates
    at once (NumPy's int64 sort is several times faster than torch's on CPU).
    """
    keep = a != b
    a, b = a[keep], b[keep]
    key = np.concatenate((b * n + a, a * n + b))
    key.sort()
    if key.size:
        fresh = np.empty(key.size, dtype=bool)
        fresh[0] = True
        np.not_equal(key[1:], key[:-1], out=fresh[1:])
        key = key[fresh]
    dst, src = np.divmod(key, n)
    return ContactLayer(
        name,
        torch.from_numpy(src),
        torch.from_numpy(dst),
        torch.full((key.size,), weight, dtype=torch.float32),
    )


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PopulationError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PopulationError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise PopulationError(f"{name} must be finite and >= 0, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Synthetic populations
# --------------------------------------------------------------------------------------------


def _household_size_probs(mean: float) -> np.ndarray:
    """P(size = 1..6): 1 + a Poisson(λ) truncated to 0..5, with λ solved for ``mean``.

    For mean 2.6 this gives 20 % one-person, 32 % two-person, ... 2 % six-person households,
    close to census tables, and it lets one knob move the whole distribution.
    """
    k = np.arange(_MAX_HOUSEHOLD_SIZE, dtype=np.float64)
    log_fact = np.array([math.lgamma(x + 1) for x in k])

    def probs(lam: float) -> np.ndarray:
        if lam == 0.0:
            return np.eye(1, _MAX_HOUSEHOLD_SIZE).ravel()
        logp = k * math.log(lam) - log_fact
        p = np.exp(logp - logp.max())
        return p / p.sum()

    lo, hi = 0.0, 1e3
    for _ in range(100):  # bisection: the truncated mean is increasing in λ
        mid = 0.5 * (lo + hi)
        if 1.0 + float(probs(mid) @ k) < mean:
            lo = mid
        else:
            hi = mid
    return probs(0.5 * (lo + hi))


def _groups(
    rng: np.random.Generator, count: int, size_range: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``count`` consecutive slots into groups of sizes uniform in ``size_range``.

    Returns per slot the group's first slot and the group's size (the last group is cut short).
    """
    lo, hi = size_range
    sizes = rng.integers(lo, hi + 1, size=count // lo + 1)
    ends = np.cumsum(sizes)
    n_groups = int(np.searchsorted(ends, count)) + 1
    sizes, ends = sizes[:n_groups], ends[:n_groups]
    starts = ends - sizes
    sizes[-1] -= ends[-1] - count  # the last group is cut to fit
    group = np.repeat(np.arange(n_groups), sizes)
    return starts[group], sizes[group]


def _group_contacts(
    rng: np.random.Generator,
    name: str,
    members: np.ndarray,
    size_range: tuple[int, int],
    degree: float,
    n: int,
    weight: float,
) -> ContactLayer:
    """Random contacts within groups (classes, workplaces) of shuffled ``members``.

    ``degree / 2 × len(members)`` undirected contacts, each between a uniformly chosen member
    and a uniformly chosen other member of the same group, so the mean degree is ``degree``
    before merging the (few) repeated pairs.
    """
    members = rng.permutation(members)
    m = members.size
    n_contacts = round(degree * m / 2)
    if m == 0 or n_contacts == 0:
        return _layer_from_undirected(name, members[:0], members[:0], n, weight)
    start, size = _groups(rng, m, size_range)
    u = rng.integers(0, m, size=n_contacts)
    gsize = size[u]
    # An offset in 1..size-1 around the group never lands on u itself; a group of one has no
    # partner, and its draws are dropped as self-pairs.
    offset = 1 + (rng.random(n_contacts) * np.maximum(gsize - 1, 0)).astype(np.int64)
    gstart = start[u]
    v = gstart + (u - gstart + offset) % gsize
    return _layer_from_undirected(name, members[u], members[v], n, weight)


def synthetic(
    n: int,
    seed: int = 0,
    *,
    household_size_mean: float = 2.6,
    age_distribution: Sequence[float] = DEFAULT_AGE_DISTRIBUTION,
    school_contacts: float = 8.0,
    class_size: tuple[int, int] = (20, 25),
    employment_rate: float = 0.85,
    work_contacts: float = 6.0,
    workplace_size: tuple[int, int] = (10, 50),
    community_contacts: float = 6.0,
) -> Population:
    """A synthetic population of ``n`` agents with four contact layers.

    - ``household``: households of 1..6 agents (mean ``household_size_mean``), fully
      connected, weight 1.0. Agents of a household have consecutive ids.
    - ``school``: every U19 agent is in a class of ``class_size`` pupils and has about
      ``school_contacts`` random classmates a day, weight 0.5.
    - ``work``: a share ``employment_rate`` of agents aged 20-64 work in workplaces of
      ``workplace_size`` people, with about ``work_contacts`` colleagues each, weight 0.3.
    - ``community``: about ``community_contacts`` random contacts per agent across the whole
      population, weight 0.1.

    School and work contacts are drawn with replacement and repeats merged, so the distinct
    contacts are a little fewer than drawn (about 6.7 per pupil and 5.4 per worker with the
    defaults). The defaults follow the POLYMOD contact surveys (about 13 contacts a day: home
    2-3, school ~7, work ~5, elsewhere ~6) and give a mean degree of about 12.5 (household 2.2,
    school 1.7, work 2.7, community 6.0 per agent). Ages are drawn
    independently from ``age_distribution`` over ``AGE_GROUPS`` (households are not made
    age-consistent). The result is a deterministic function of all the arguments.
    """
    n = _check_count("n", n, 1)
    seed = _check_count("seed", seed, 0)
    if not 1.0 <= household_size_mean <= 5.5:
        raise PopulationError(
            f"household_size_mean must be in [1, 5.5] (sizes are 1..6), got {household_size_mean}"
        )
    ages_p = np.asarray(age_distribution, dtype=np.float64)
    if ages_p.shape != (len(AGE_GROUPS),) or not np.all(np.isfinite(ages_p)) or (ages_p < 0).any():
        raise PopulationError(
            f"age_distribution must be {len(AGE_GROUPS)} finite non-negative shares "
            f"(one per age group {AGE_GROUPS}), got {list(age_distribution)}"
        )
    if ages_p.sum() <= 0:
        raise PopulationError("age_distribution must not be all zero")
    for label, value in (
        ("school_contacts", school_contacts),
        ("work_contacts", work_contacts),
        ("community_contacts", community_contacts),
    ):
        _check_weight(label, value)
    if not 0.0 <= employment_rate <= 1.0:
        raise PopulationError(f"employment_rate must be in [0, 1], got {employment_rate}")
    for label, (lo, hi) in (("class_size", class_size), ("workplace_size", workplace_size)):
        if not 2 <= lo <= hi:
            raise PopulationError(f"{label} must be (lo, hi) with 2 <= lo <= hi, got {(lo, hi)}")

    rng = np.random.default_rng(seed)
    age = rng.choice(len(AGE_GROUPS), size=n, p=ages_p / ages_p.sum())
    layers = [_households(rng, n, household_size_mean)]

    pupils = np.flatnonzero(age == 0)
    layers.append(
        _group_contacts(
            rng, "school", pupils, class_size, school_contacts, n, SYNTHETIC_LAYER_WEIGHTS["school"]
        )
    )

    working_age = np.flatnonzero(np.isin(age, _WORKING_AGE_GROUPS))
    workers = working_age[rng.random(working_age.size) < employment_rate]
    layers.append(
        _group_contacts(
            rng, "work", workers, workplace_size, work_contacts, n, SYNTHETIC_LAYER_WEIGHTS["work"]
        )
    )

    n_community = round(community_contacts * n / 2) if n > 1 else 0
    a = rng.integers(0, n, size=n_community)
    b = rng.integers(0, max(n - 1, 1), size=n_community)
    b += b >= a  # uniform over the other n - 1 agents
    layers.append(
        _layer_from_undirected("community", a, b, n, SYNTHETIC_LAYER_WEIGHTS["community"])
    )

    return Population(
        name=f"synthetic(n={n}, seed={seed})",
        age_group=torch.from_numpy(age.astype(np.int64)),
        layers=tuple(layers),
        attributes=_public_attributes(rng, age, workers),
    )


#: SOC 2018 major groups of synthetic workers (the first two digits of a SOC code).
_SYNTHETIC_SOC_MAJORS = (
    "11", "13", "15", "17", "19", "21", "23", "25", "27", "29", "31",
    "33", "35", "37", "39", "41", "43", "45", "47", "49", "51", "53",
)  # fmt: skip


def _public_attributes(
    rng: np.random.Generator, age: np.ndarray, workers: np.ndarray
) -> dict[str, list[str]]:
    """Gender, occupation (a SOC code: workers get one of a major group, others none) and
    annual household income (US dollars, log-normal around the US median, higher for
    workers), as the columns of ``agents.csv`` would give them. Drawn after every layer, so
    they leave the rest of the population unchanged."""
    n = age.size
    gender = np.where(rng.random(n) < 0.5, "female", "male")
    soc = np.full(n, "", dtype=object)
    majors = rng.integers(0, len(_SYNTHETIC_SOC_MAJORS), size=workers.size)
    soc[workers] = [f"{_SYNTHETIC_SOC_MAJORS[m]}-0000.00" for m in majors.tolist()]
    income = np.exp(rng.normal(np.log(75_000.0), 0.8, size=n))
    income[workers] *= 1.3
    return {
        "gender": gender.tolist(),
        "soc_code": soc.tolist(),
        "income": [f"{x:.0f}" for x in income],
    }


def _households(rng: np.random.Generator, n: int, mean: float) -> ContactLayer:
    """Fully connected households of consecutive agent ids.

    Built directly in ``(dst, src)`` order: agent i's in-edges come from the other members of
    its household in increasing id order, so no sort is needed.
    """
    probs = _household_size_probs(mean)
    sizes = rng.choice(np.arange(1, _MAX_HOUSEHOLD_SIZE + 1), size=n, p=probs)
    ends = np.cumsum(sizes)
    n_households = int(np.searchsorted(ends, n)) + 1
    sizes, ends = sizes[:n_households], ends[:n_households]
    starts = ends - sizes
    sizes[-1] -= ends[-1] - n  # the last household is cut to fit n
    household = np.repeat(np.arange(n_households), sizes)
    start, size = starts[household], sizes[household]
    local = np.arange(n) - start
    deg = size - 1
    dst = np.repeat(np.arange(n), deg)
    first = np.cumsum(deg) - deg  # first edge of each agent
    k = np.arange(dst.size) - np.repeat(first, deg)  # 0..deg-1 within each agent
    src = start[dst] + k + (k >= local[dst])  # skip the agent itself
    return ContactLayer(
        "household",
        torch.from_numpy(src),
        torch.from_numpy(dst),
        torch.full((dst.size,), SYNTHETIC_LAYER_WEIGHTS["household"], dtype=torch.float32),
    )


def random_contacts(n: int, degree: int, seed: int = 0, weight: float = 1.0) -> Population:
    """A benchmark population: every agent receives exactly ``degree`` contacts.

    Agent i's ``degree`` sources are drawn uniformly, with replacement, from the other n - 1
    agents: no self-loops, but a source may repeat (a repeated pair is a double-weight
    contact; with n ≫ degree repeats are rare). One layer ``"random"`` of ``n × degree`` edges,
    sorted by ``(dst, src)``, all of weight ``weight``; out-degrees are Binomial, not fixed,
    and the graph is not symmetric. Memory: 8 + 8 + 4 bytes per edge (int64 src/dst, float32
    weight) plus one transient int64 array. All agents are in age group ``20t29``.
    """
    n = _check_count("n", n, 1)
    degree = _check_count("degree", degree, 0)
    seed = _check_count("seed", seed, 0)
    weight = _check_weight("weight", weight)
    if n == 1 and degree > 0:
        raise PopulationError("random_contacts: one agent cannot have contacts without self-loops")
    rng = np.random.default_rng(seed)
    src = rng.integers(0, max(n - 1, 1), size=(n, degree))
    src += src >= np.arange(n)[:, None]  # skip the agent itself: uniform over the others
    src.sort(axis=1)
    dst = torch.arange(n).unsqueeze(1).expand(n, degree).reshape(-1)
    return Population(
        name=f"random(n={n}, degree={degree}, seed={seed})",
        age_group=torch.ones(n, dtype=torch.int64),
        layers=(
            ContactLayer(
                "random",
                torch.from_numpy(src.reshape(-1)),
                dst,
                torch.full((n * degree,), weight, dtype=torch.float32),
            ),
        ),
    )


# --------------------------------------------------------------------------------------------
# CSV loading
# --------------------------------------------------------------------------------------------

_Kind = Literal["int", "float", "str"]
_INT_RE = re.compile(r"[+-]?\d+")
_MAX_INT_DIGITS = 18  # 10**18 < 2**63: a field of at most 18 digits fits int64
_POW10 = 10 ** np.arange(_MAX_INT_DIGITS, dtype=np.int64)
_SHOWN = 40  # characters of a bad value quoted in an error message


@dataclass
class _Table:
    """Parsed columns of one CSV file, with the physical line of each row."""

    path: Path
    columns: dict[str, np.ndarray]
    n_rows: int
    lines: np.ndarray | None  # None: row r is on line r + 2 (no quoted line breaks)

    def line(self, row: int) -> int:
        return int(self.lines[row]) if self.lines is not None else row + 2

    def error(self, row: int, column: str, problem: str) -> PopulationFileError:
        return PopulationFileError(self.path, problem, line=self.line(row), field=column)

    def check(self, bad: np.ndarray, column: str, problem: str) -> None:
        """Raise for the first row where ``bad`` holds, quoting that row's value."""
        rows = np.flatnonzero(bad)
        if rows.size:
            value = self.columns[column][rows[0]]
            raise self.error(int(rows[0]), column, problem.format(value=_show(value)))


def _show(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _read_table(
    path: Path,
    schema: dict[str, _Kind],
    required: Sequence[str],
    *,
    keep_extra: bool,
) -> _Table:
    """Read a CSV file with a header into typed columns.

    ``schema`` gives the type of known columns; ``required`` must be present. Other columns are
    kept as strings if ``keep_extra``, else ignored. Fast path: a vectorized tokenizer over the
    raw bytes (no quotes, one row per line). Anything it cannot handle (quotes, spaces, a bad
    value, a wrong field count) goes to a precise row-by-row pass with the ``csv`` module,
    which either parses the file or raises with the exact line and field.
    """
    if not path.is_file():
        raise PopulationFileError(path, "file not found")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    data = data.replace(b"\r\n", b"\n")
    header_bytes, _, body = data.partition(b"\n")
    try:
        header = [name.strip() for name in next(csv.reader([header_bytes.decode("utf-8")]), [])]
    except UnicodeDecodeError as exc:
        raise PopulationFileError(path, f"header is not UTF-8 ({exc.reason})", line=1) from exc
    if not any(header):
        raise PopulationFileError(path, "file is empty: no header line", line=1, field=required[0])
    for name in required:
        if name not in header:
            raise PopulationFileError(
                path, f"missing column {name!r} (header is {header})", line=1, field=name
            )
    seen: set[str] = set()
    for name in header:
        if name == "" or name in seen:
            raise PopulationFileError(
                path, f"empty or repeated column name in header {header}", line=1, field=name
            )
        seen.add(name)
    body = body.rstrip(b"\n")
    if not body:
        raise PopulationFileError(path, "no data rows after the header", line=2, field=header[0])
    kinds: dict[str, _Kind] = {}
    for name in header:
        if name in schema:
            kinds[name] = schema[name]
        elif keep_extra:
            kinds[name] = "str"
    table = _fast_table(path, body, header, kinds)
    return table if table is not None else _slow_table(path, body, header, kinds)


def _fast_table(
    path: Path, body: bytes, header: list[str], kinds: dict[str, _Kind]
) -> _Table | None:
    """Vectorized parse of an unquoted body, or None if anything needs the precise pass."""
    if b'"' in body:
        return None
    ncols = len(header)
    buf = np.frombuffer(body + b"\n", dtype=np.uint8)
    is_nl = buf == ord("\n")
    ends = np.flatnonzero(is_nl | (buf == ord(",")))  # one terminator per field
    if ends.size % ncols:
        return None
    n_rows = ends.size // ncols
    row_end = is_nl[ends].reshape(n_rows, ncols)
    if row_end[:, :-1].any() or not row_end[:, -1].all():
        return None
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    starts = starts.reshape(n_rows, ncols)
    lengths = ends.reshape(n_rows, ncols) - starts
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        kind = kinds.get(name)
        if kind is None:
            continue
        col = _fast_column(buf, starts[:, j], lengths[:, j], kind)
        if col is None:
            return None
        columns[name] = col
    return _Table(path, columns, n_rows, None)


def _fast_column(
    buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, kind: _Kind
) -> np.ndarray | None:
    """One column from field offsets: int64, float64 or str array; None if a value is bad."""
    if kind != "str" and lengths.min() < 1:
        return None  # an empty number: the precise pass names it
    width = max(int(lengths.max()), 1)
    if kind == "int" and width > _MAX_INT_DIGITS:
        return None
    pos = np.arange(width)
    inside = pos < lengths[:, None]
    chars = np.where(inside, buf[np.minimum(starts[:, None] + pos, buf.size - 1)], 0)
    chars = chars.astype(np.uint8)
    if kind == "int":
        digits = chars.astype(np.int64) - ord("0")
        if ((digits < 0) | (digits > 9))[inside].any():
            return None
        # right-align: the last character of a field is its units digit
        exponent = np.clip(lengths[:, None] - 1 - pos, 0, None)
        return np.where(inside, digits * _POW10[exponent], 0).sum(axis=1)
    strings = chars.view(f"S{width}").ravel()
    if kind == "float":
        try:
            return strings.astype(np.float64)
        except ValueError:
            return None
    try:
        return np.char.decode(strings, "utf-8")
    except UnicodeDecodeError:
        return None


def _slow_table(path: Path, body: bytes, header: list[str], kinds: dict[str, _Kind]) -> _Table:
    """Row-by-row parse that either succeeds or raises naming the exact line and field.

    Only reached for files the vectorized path rejects (quoted fields, spaces, bad values).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = body[: exc.start].count(b"\n") + 2
        raise PopulationFileError(path, f"not UTF-8 ({exc.reason})", line=line) from exc
    ncols = len(header)
    wanted = [(j, name, kinds[name]) for j, name in enumerate(header) if name in kinds]
    values: dict[str, list[object]] = {name: [] for _, name, _ in wanted}
    lines: list[int] = []
    reader = csv.reader(io.StringIO(text))
    start_line = 2
    for row in reader:
        line = start_line
        start_line = reader.line_num + 2  # the header is line 1 and not in ``text``
        if len(row) != ncols:
            if not row:
                raise PopulationFileError(
                    path, f"empty line (expected {ncols} fields)", line=line, field=header[0]
                )
            if len(row) < ncols:
                raise PopulationFileError(
                    path,
                    f"{len(row)} fields, expected {ncols}: value missing",
                    line=line,
                    field=header[len(row)],
                )
            raise PopulationFileError(
                path,
                f"{len(row)} fields, expected {ncols}: extra value after the last column",
                line=line,
                field=header[-1],
            )
        for j, name, kind in wanted:
            values[name].append(_parse_value(row[j], kind, path, line, name))
        lines.append(line)
    columns: dict[str, np.ndarray] = {}
    for _, name, kind in wanted:
        dtype = {"int": np.int64, "float": np.float64, "str": np.str_}[kind]
        columns[name] = np.array(values[name], dtype=dtype)
    return _Table(path, columns, len(lines), np.array(lines, dtype=np.int64))


def _parse_value(raw: str, kind: _Kind, path: Path, line: int, name: str) -> object:
    """One cell, validated; raises ``PopulationFileError`` naming file, line and field."""
    if kind == "str":
        return raw
    text = raw.strip()
    if not text:
        raise PopulationFileError(path, "empty value", line=line, field=name)
    if kind == "int":
        if text.lower() == "nan":
            raise PopulationFileError(
                path, "value is NaN, expected an integer", line=line, field=name
            )
        if not _INT_RE.fullmatch(text):
            raise PopulationFileError(path, f"not an integer: {_show(raw)}", line=line, field=name)
        value = int(text)
        if abs(value) >= 2**62:
            raise PopulationFileError(
                path, f"integer too large: {_show(raw)}", line=line, field=name
            )
        return value
    try:
        return float(text)
    except ValueError:
        raise PopulationFileError(
            path, f"not a number: {_show(raw)}", line=line, field=name
        ) from None


def _load_agents(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, list[str]]]:
    """``agents.csv`` → (age group codes, initially-infected mask or None, string attributes),
    all in agent-id order."""
    table = _read_table(
        path,
        {"agent_id": "int", "age_group": "str", "initially_infected": "int"},
        ("agent_id", "age_group"),
        keep_extra=True,
    )
    n = table.n_rows
    ids = table.columns["agent_id"]
    table.check((ids < 0) | (ids >= n), "agent_id", f"agent id {{value}} out of range 0..{n - 1}")
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeated = order[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if repeated.size:
        # ids are in range and there are n of them, so a repeat is the only way to miss one
        row = int(repeated.min())
        first = int(np.flatnonzero(ids == ids[row])[0])
        raise table.error(
            row, "agent_id", f"duplicate agent id {ids[row]} (first on line {table.line(first)})"
        )

    groups = table.columns["age_group"]
    codes = np.full(n, -1, dtype=np.int64)
    stripped = np.char.strip(groups)
    table.check(stripped == "", "age_group", "empty value")
    for code, name in enumerate(AGE_GROUPS):
        codes[stripped == name] = code
    table.check(
        codes < 0, "age_group", f"unknown age group {{value}}, expected one of {AGE_GROUPS}"
    )

    infected = None
    if "initially_infected" in table.columns:
        flags = table.columns["initially_infected"]
        table.check(
            (flags != 0) & (flags != 1), "initially_infected", "must be 0 or 1, got {value}"
        )
        infected = np.empty(n, dtype=bool)
        infected[ids] = flags == 1

    age = np.empty(n, dtype=np.int64)
    age[ids] = codes
    attributes = {
        name: col[order].tolist()
        for name, col in table.columns.items()
        if name not in ("agent_id", "age_group", "initially_infected")
    }
    return age, infected, attributes


def _load_layer(path: Path, n: int, scale: float) -> ContactLayer:
    """One ``contacts_*.csv`` file → a symmetric layer sorted by ``(dst, src)``.

    Each row is an undirected contact. Self-loops are dropped and repeated contacts (in either
    orientation) merged, keeping the largest weight; both are counted in an INFO log line.
    """
    table = _read_table(
        path, {"src": "int", "dst": "int", "weight": "float"}, ("src", "dst"), keep_extra=False
    )
    a, b = table.columns["src"], table.columns["dst"]
    for name, col in (("src", a), ("dst", b)):
        table.check((col < 0) | (col >= n), name, f"agent id {{value}} out of range 0..{n - 1}")
    if "weight" in table.columns:
        w = table.columns["weight"]
        table.check(np.isnan(w), "weight", "weight is NaN")
        table.check(np.isinf(w), "weight", "weight {value} is not finite")
        table.check(w < 0, "weight", "negative weight {value}")
    else:
        w = np.ones(table.n_rows)

    loop = a == b
    lo, hi, w = np.minimum(a, b)[~loop], np.maximum(a, b)[~loop], w[~loop]
    key = lo * n + hi
    order = np.argsort(key, kind="stable")
    key, w = key[order], w[order]
    first = np.ones(key.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(first)
    w = np.maximum.reduceat(w, starts) if starts.size else w
    key = key[starts]
    logger.info(
        "%s: %d rows, %d self-loops dropped, %d repeated contacts merged, %d contacts",
        path.name,
        table.n_rows,
        int(loop.sum()),
        int(order.size - starts.size),
        int(starts.size),
    )
    lo, hi = np.divmod(key, n)
    src = np.concatenate((lo, hi))
    dst = np.concatenate((hi, lo))
    directed = np.argsort(dst * n + src)  # keys are distinct: any sort order is the same
    weight = (np.concatenate((w, w)) * scale).astype(np.float32)
    return ContactLayer(
        path.stem,
        torch.from_numpy(src[directed]),
        torch.from_numpy(dst[directed]),
        torch.from_numpy(weight[directed]),
    )


def _layer_sort_key(path: Path) -> tuple[int, str]:
    """``contacts_2`` before ``contacts_10``; non-numeric suffixes after, by name."""
    suffix = path.stem[len("contacts_") :]
    return (int(suffix), "") if suffix.isdigit() else (2**62, suffix)


def from_csv(path: str | Path, *, weights: dict[str, float] | None = None) -> Population:
    """Load a population directory in the Astoria format.

    - ``agents.csv``: ``agent_id`` (exactly 0..N-1, any order) and ``age_group`` (one of
      ``AGE_GROUPS``) are required; ``initially_infected`` (0/1) is optional; every other
      column (gender, ethnicity, soc_code, ...) is kept as strings in ``attributes``.
    - ``contacts_*.csv``: one layer each, named after the file (``contacts_0``, ...), with
      columns ``src,dst`` and an optional non-negative ``weight`` (default 1.0). Each row is an
      undirected contact stored in both directions; self-loops are dropped and repeated
      contacts merged (see ``_load_layer``).

    ``weights`` multiplies the weights of the named layers (e.g. ``{"contacts_1": 0.5}``).
    Any problem raises ``PopulationFileError`` naming the file, line and field.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise PopulationFileError(directory, "not a directory")
    layer_files = sorted(directory.glob("contacts_*.csv"), key=_layer_sort_key)
    if not layer_files:
        raise PopulationFileError(directory, "no contacts_*.csv layer files")
    scales = dict(weights or {})
    unknown = sorted(set(scales) - {p.stem for p in layer_files})
    if unknown:
        raise PopulationError(
            f"weights given for unknown layers {unknown}; layers are "
            f"{[p.stem for p in layer_files]}"
        )
    for name, value in scales.items():
        scales[name] = _check_weight(f"weights[{name!r}]", value)

    age, infected, attributes = _load_agents(directory / "agents.csv")
    n = age.size
    layers = tuple(_load_layer(p, n, scales.get(p.stem, 1.0)) for p in layer_files)
    return Population(
        name=directory.resolve().name,
        age_group=torch.from_numpy(age),
        layers=layers,
        initially_infected=None if infected is None else torch.from_numpy(infected),
        attributes=attributes,
    )


# --------------------------------------------------------------------------------------------
# CLI specs
# --------------------------------------------------------------------------------------------


def _spec_int(spec: str, text: str, what: str, minimum: int) -> int:
    """``"10000"``, ``"10_000"`` or ``"1e6"`` → int, at least ``minimum``."""
    text = text.strip()
    value: int | None = None
    if re.fullmatch(r"\d+(_\d+)*", text):
        value = int(text)
    elif re.fullmatch(r"\d+(\.\d+)?[eE]\d+", text):
        number = float(text)
        if number.is_integer():
            value = int(number)
    if value is None or value < minimum:
        raise PopulationSpecError(
            f"population spec {spec!r}: {what} must be an integer >= {minimum}, got {text!r}"
        )
    return value


def from_spec(spec: str, seed: int = 0) -> Population:
    """The population named by a CLI ``--population`` string.

    - ``synthetic:N`` → ``synthetic(N, seed)``;
    - ``random:N:K`` → ``random_contacts(N, K, seed)`` (benchmark graph);
    - otherwise a directory → ``from_csv(directory)``.

    N and K accept ``10000``, ``10_000`` or ``1e6``. Bad specs raise ``PopulationSpecError``.
    """
    kind, sep, rest = spec.partition(":")
    if sep and kind == "synthetic":
        return synthetic(_spec_int(spec, rest, "N", 1), seed)
    if sep and kind == "random":
        parts = rest.split(":")
        if len(parts) != 2:
            raise PopulationSpecError(f"population spec {spec!r}: expected random:N:K")
        n = _spec_int(spec, parts[0], "N", 1)
        k = _spec_int(spec, parts[1], "K", 0)
        if n == 1 and k > 0:
            raise PopulationSpecError(f"population spec {spec!r}: one agent cannot have contacts")
        return random_contacts(n, k, seed)
    directory = Path(spec).expanduser()
    if directory.is_dir():
        return from_csv(directory)
    if sep and not directory.exists() and kind.isidentifier():
        raise PopulationSpecError(
            f"population spec {spec!r}: unknown kind {kind!r}; use synthetic:N, random:N:K "
            "or a directory with agents.csv and contacts_*.csv"
        )
    problem = "is a file, not a directory" if directory.exists() else "no such directory"
    raise PopulationSpecError(
        f"population spec {spec!r}: {problem}; use synthetic:N, random:N:K or a directory "
        "with agents.csv and contacts_*.csv"
    )
