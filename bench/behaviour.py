"""``decentsim bench behaviour``: what a behaviour table costs the simulator, and how many backend
calls filling one takes.

**Overhead.** One population, run for ``--steps`` days twice per repeat: with
``behaviour="heuristic"`` (today's archetypes) and with ``behaviour="table"`` (each agent takes
its archetype cell's row of a behaviour table, aligns it by θ and draws whether to isolate and
whether to work; the workplace layer then only joins agents at work). The table is a
``table:PATH`` file read by :class:`behaviour.TableSource`: random probabilities, fixed by
``--seed``. The two modes are timed alternately, ``--repeats`` times each, and the medians are
compared (``ratio`` = table / heuristic; the target is at most 10 % slower).

**Population.** ``--agents`` agents spread evenly over a synthetic archetype grid of about
``--cells`` cells: 6 age groups × 3 genders × ``round(cells / 18)`` areas (every cell holds
``agents // cells`` or one more agents, in random order fixed by ``--seed``), given to the
simulator as public attributes (``gender``, ``area``) so that it builds the grid itself
(:func:`sim.archetypes.population_cells`). Contacts are ``random:N:K``-style: every agent hears
exactly ``--degree`` contacts a day, ``--work-degree`` of them on the ``work`` layer and the
rest on a ``community`` layer (uniform random senders, weight 0.05). The labour force is the
working-age groups (20–64).

**Backend calls.** A ``--weeks``-week ``table`` run of the same simulator whose table is filled
period by period (``--period-days``, weekly by default) by :class:`behaviour.LLMSource` from the
run's own public numbers, against an OpenAI-compatible HTTP endpoint: by default the *rule
server* (``bench/rule_server.py``, started here as a subprocess on loopback: a
deterministic rule answering from a hash of the prompt, **not a language model**), or any
``--llm-url``. Then the same run again with a fresh client on the same answer cache: it must make
no call and give the same table and results. The source asks one question per cell per
*behaviour* (isolate, work) per period, so a full run makes ``cells × periods × 2`` calls:
``cells × periods`` per behaviour. The rule server's own request log gives the count per
behaviour and confirms the client's count.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from behaviour import BackendError, LLMSource, OpenAIClient, PromptTemplates, TableSource
from decentsim.usage import CommandFailed, UsageError, nonnegative_int, positive_int
from sim import populations
from sim.archetypes import (
    BEHAVIOURS,
    GENDERS,
    ArchetypeGrid,
    BehaviourSource,
    BehaviourTable,
    PublicNumbers,
)
from sim.model import ModelConfig, ModelConfigError
from sim.params import Theta
from sim.populations import AGE_GROUPS, ContactLayer, Population
from sim.runner import DTYPES, CentralSimulator

#: the target: a table run at most this much slower than the heuristic one, in percent
TARGET_OVERHEAD_PCT = 10.0
#: weight of every contact (as ``bench sim``)
WEIGHT = 0.05
#: cells per area of the synthetic grid: age groups × genders
CELLS_PER_AREA = len(AGE_GROUPS) * len(GENDERS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bench behaviour``."""
    p.add_argument("--agents", type=positive_int, default=1_000_000)
    p.add_argument(
        "--cells",
        type=positive_int,
        default=2000,
        help=f"archetype cells, about: 6 age groups × 3 genders × round(cells / "
        f"{CELLS_PER_AREA}) areas (at least one area)",
    )
    p.add_argument("--steps", type=positive_int, default=10, help="days of each timed run")
    p.add_argument("--degree", type=positive_int, default=10, help="contacts each agent hears")
    p.add_argument(
        "--work-degree",
        type=nonnegative_int,
        default=3,
        help="of those, contacts on the workplace layer (the rest: community)",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per mode")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument(
        "--threads",
        type=nonnegative_int,
        default=0,
        help="torch's CPU threads (0: its default); on a shared machine 1 times more steadily",
    )
    p.add_argument(
        "--weeks",
        type=nonnegative_int,
        default=26,
        help="weeks of the run whose table a backend fills (0: no backend run)",
    )
    p.add_argument(
        "--period-days", type=positive_int, default=7, help="days per table period (7: weekly)"
    )
    p.add_argument(
        "--llm-url",
        default=None,
        help="an OpenAI-compatible endpoint's base URL (…/v1); default: start the rule server "
        "(a deterministic rule, not a language model) on loopback",
    )
    p.add_argument("--llm-model", default="rule", help="the model name sent to the endpoint")
    p.add_argument("--seed", type=nonnegative_int, default=0)


def grid_population(
    agents: int, areas: int, degree: int, work_degree: int, seed: int
) -> tuple[Population, np.ndarray]:
    """The bench's population (see the module doc) and each agent's intended cell.

    Cells are numbered as :class:`sim.archetypes.ArchetypeGrid` numbers them: age group
    slowest, then gender, then area.
    """
    n_cells = CELLS_PER_AREA * areas
    rng = np.random.default_rng(seed)
    cell = rng.permutation(np.arange(agents, dtype=np.int64) % n_cells)
    genders = len(GENDERS)
    area, gender, age = cell % areas, (cell // areas) % genders, cell // (areas * genders)
    width = len(str(areas - 1))
    area_labels = [f"area{a:0{width}d}" for a in range(areas)]  # sorted = numbered
    layers = []
    for name, k, layer_seed in (
        ("community", degree - work_degree, seed),
        ("work", work_degree, seed + 1),
    ):
        if k:
            (layer,) = populations.random_contacts(agents, k, layer_seed, WEIGHT).layers
            layers.append(ContactLayer(name, layer.src, layer.dst, layer.weight))
    population = Population(
        name=f"bench-behaviour(n={agents}, cells={n_cells}, degree={degree})",
        age_group=torch.from_numpy(age),
        layers=tuple(layers),
        attributes={
            "gender": [GENDERS[g] for g in gender.tolist()],
            "area": [area_labels[a] for a in area.tolist()],
        },
    )
    return population, cell


def _random_table(sim: CentralSimulator, periods: int, seed: int, folder: Path) -> TableSource:
    """A ``table:PATH`` source of random probabilities (fixed by ``seed``) for ``sim``'s grid."""
    rng = np.random.default_rng(seed)
    p = rng.random((periods, sim.grid.n_cells, len(BEHAVIOURS)))
    path = folder / "table.json"
    BehaviourTable(sim.grid, sim.config.period_days, p, "bench").save(path)
    return TableSource(path, sim.grid)


def _timed(sim: CentralSimulator, theta: Theta, days: int, source: TableSource | None) -> float:
    """Seconds of one ``days``-day run (values only, mode ``none``)."""
    t0 = time.perf_counter()
    sim.run(theta, days, "none", source=source)
    return time.perf_counter() - t0


def _progress(message: str) -> None:
    print(f"bench behaviour: {message}", file=sys.stderr, flush=True)


@contextmanager
def rule_server() -> Iterator[str]:
    """Start the rule server (:mod:`bench.rule_server`) on a free loopback port; yields its
    API base URL; stops it on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.rule_server"], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise CommandFailed(f"the rule server did not start (it said {line!r})")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _server_log(base_url: str) -> list[dict[str, Any]]:
    """The chat requests the rule server received (its test-only ``GET /stats``)."""
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/stats", timeout=60) as response:
        return list(json.loads(response.read())["bodies"])


class _Timed:
    """A :class:`sim.archetypes.BehaviourSource` that times another one's table rows."""

    def __init__(self, source: BehaviourSource) -> None:
        self.source = source
        self.seconds = 0.0

    def probabilities(self, grid: ArchetypeGrid, public: PublicNumbers) -> np.ndarray:
        """The wrapped source's row, its time added to :attr:`seconds`."""
        t0 = time.perf_counter()
        try:
            return self.source.probabilities(grid, public)
        finally:
            self.seconds += time.perf_counter() - t0


def _behaviour_of(prompt: str, questions: dict[str, str]) -> str:
    """Which behaviour a prompt asks about, by the question it ends with."""
    for name, question in questions.items():
        if prompt.endswith(question):
            return name
    return "other"


def backend_calls(
    sim: CentralSimulator, theta: Theta, weeks: int, url: str, model: str, served: bool
) -> dict[str, Any]:
    """A ``weeks``-week run whose table ``url`` fills, then its rerun on the same cache."""
    days = weeks * 7
    periods = math.ceil(days / sim.config.period_days)
    out: dict[str, Any] = {
        "backend": "rule server (bench/rule_server.py: a deterministic rule over "
        "OpenAI-compatible HTTP on loopback, not a language model)"
        if served
        else f"OpenAI-compatible endpoint {url}",
        "backend_model": model,
        "weeks": weeks,
        "backend_days": days,
        "period_days": sim.config.period_days,
        "periods": periods,
        "behaviours": len(BEHAVIOURS),
    }
    with tempfile.TemporaryDirectory(prefix="bench-behaviour-cache-") as cache:
        runs = []
        for label in ("first", "cached"):
            _progress(f"{weeks}-week run against {url} ({label})")
            with OpenAIClient(url, model) as client:
                source = LLMSource(client, cache)
                timed = _Timed(source)
                t0 = time.perf_counter()
                try:
                    result = sim.run(theta, days, "none", progress=True, source=timed)
                except BackendError as e:
                    raise CommandFailed(str(e)) from None
                runs.append((time.perf_counter() - t0, timed.seconds, source.calls, result))
    (first_s, first_fill, calls, first), (cached_s, cached_fill, cached_calls, cached) = runs
    assert first.table is not None and cached.table is not None
    n_cells = sim.grid.n_cells
    out.update(
        {
            "cells_x_periods": n_cells * periods,
            "backend_calls": calls,
            "backend_run_s": round(first_s, 2),
            # of which filling the table: prompts, cache, backend (the rest: the simulator)
            "backend_fill_s": round(first_fill, 2),
            "cached_rerun_calls": cached_calls,
            "cached_rerun_s": round(cached_s, 2),
            "cached_fill_s": round(cached_fill, 2),
            "cached_rerun_identical": bool(
                np.array_equal(first.table.p, cached.table.p) and torch.equal(first.y, cached.y)
            ),
        }
    )
    if served:
        questions = {
            name: template.rsplit("}", 1)[-1]
            for name, template in PromptTemplates().by_behaviour().items()
        }
        log = _server_log(url)
        per: dict[str, int] = dict.fromkeys(BEHAVIOURS, 0)
        for body in log:
            name = _behaviour_of(body["messages"][-1]["content"], questions)
            per[name] = per.get(name, 0) + 1
        out["server_requests"] = len(log)
        out["backend_calls_per_behaviour"] = per
        out["per_behaviour_within_cells_x_periods"] = all(
            count <= n_cells * periods for count in per.values()
        )
    else:  # an endpoint of its own: no request log to read
        out["server_requests"] = None
        out["backend_calls_per_behaviour"] = None
        out["per_behaviour_within_cells_x_periods"] = None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both modes, then count a backend run's calls; return the JSON-line fields."""
    if args.work_degree > args.degree:
        raise UsageError(f"--work-degree {args.work_degree} exceeds --degree {args.degree}")
    areas = max(1, round(args.cells / CELLS_PER_AREA))
    n_cells = CELLS_PER_AREA * areas
    if args.agents < n_cells:
        raise UsageError(
            f"--agents {args.agents}: fewer agents than the grid's {n_cells} cells (every "
            "cell is inhabited in this bench)"
        )
    if args.llm_url is not None:
        try:
            OpenAIClient(args.llm_url, args.llm_model)
        except ValueError as e:
            raise UsageError(f"--llm-url: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    _progress(f"population of {args.agents} agents over {n_cells} cells")
    population, cell = grid_population(args.agents, areas, args.degree, args.work_degree, args.seed)
    theta = Theta(beta=0.3, mortality=0.01, init_frac=0.001)
    dtype = DTYPES[args.dtype]
    try:
        heuristic = CentralSimulator(population, ModelConfig(), seed=1, dtype=dtype)
        table_config = ModelConfig(behaviour="table", period_days=args.period_days)
        table = CentralSimulator(population, table_config, seed=1, dtype=dtype)
    except ModelConfigError as e:
        raise UsageError(str(e)) from None
    assert table.grid.n_cells == n_cells, table.grid.to_json()
    assert torch.equal(table.agents.cell.cpu(), torch.from_numpy(cell))
    out: dict[str, Any] = {
        "agents": args.agents,
        "cells": n_cells,
        "grid": dict(zip(table.grid.names, table.grid.shape, strict=True)),
        "edges": population.n_edges,
        "work_edges": population.layer("work").n_edges if args.work_degree else 0,
        "steps": args.steps,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory(prefix="bench-behaviour-") as folder:
        periods = math.ceil(args.steps / args.period_days)
        source = _random_table(table, periods, args.seed, Path(folder))
        sims = {"heuristic": (heuristic, None), "table": (table, source)}
        # warm-up, one full run each: the allocator's pages, kernels, the CSR matrices
        for sim, src in sims.values():
            sim.run(theta, args.steps, "none", source=src)
        times: dict[str, list[float]] = {name: [] for name in sims}
        _progress(f"timing {args.repeats} × {args.steps} days per mode")
        for r in range(args.repeats):
            # alternate the order so that a drift of the shared machine hits both modes alike
            for name in list(sims) if r % 2 == 0 else list(sims)[::-1]:
                sim, src = sims[name]
                times[name].append(_timed(sim, theta, args.steps, src))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med["table"] / med["heuristic"]
    fastest = {name: min(ts) for name, ts in times.items()}
    out.update(
        {
            "heuristic_s": round(med["heuristic"], 4),
            "table_s": round(med["table"], 4),
            "heuristic_step_ms": round(1000 * med["heuristic"] / args.steps, 2),
            "table_step_ms": round(1000 * med["table"] / args.steps, 2),
            "heuristic_s_runs": [round(t, 4) for t in times["heuristic"]],
            "table_s_runs": [round(t, 4) for t in times["table"]],
            "ratio": round(ratio, 4),
            "overhead_pct": round(100 * (ratio - 1), 2),
            # the fastest runs' ratio: the least disturbed by other work on a shared machine
            "ratio_fastest": round(fastest["table"] / fastest["heuristic"], 4),
            "target_overhead_pct": TARGET_OVERHEAD_PCT,
            "within_target": bool(100 * (ratio - 1) <= TARGET_OVERHEAD_PCT),
        }
    )
    if args.weeks:
        if args.llm_url is None:
            with rule_server() as url:
                out.update(backend_calls(table, theta, args.weeks, url, args.llm_model, True))
        else:
            out.update(backend_calls(table, theta, args.weeks, args.llm_url, args.llm_model, False))
    return out
