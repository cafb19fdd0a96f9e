"""``decentsim bench vs-secaggplus``: decentsim's two-server sum next to Flower's SecAgg+.

One invocation runs both protocols on this machine over the same client vectors (``--clients``
vectors of ``--dim`` values, each drawn uniformly from [-1, 1) by :func:`client_vector` from
``--seed``) and reports the seconds per round and the error of each recovered sum.

**Flower SecAgg+** (flwr 1.41): a ``ServerApp`` runs ``DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))`` with ``FedAvg`` over every client, in Flower's simulation engine
(``run_simulation``, Ray backend); each virtual client is a ``ClientApp`` with
``secaggplus_mod`` whose ``fit`` returns its vector with ``num_examples = 1``. A round is timed
inside the ``ServerApp`` around the fit workflow, so it covers all four SecAgg+ stages (setup
with fresh key pairs, key-share exchange, masked-vector collection, unmasking) with the
clients' work in Ray actors and Flower's message passing, plus ``FedAvg.aggregate_fit``. Not
timed: Ray start-up, the actor pool, node registration, parameter initialisation.

**decentsim**: one aggregate phase with a single slot (``grad/epoch/<round>``) on an
``InMemoryNetwork`` (coordinator C and aggregator A over in-memory byte links) with the
production aggregates codec (:func:`contract.schedule.aggregates_codec`); each client is a
``DeviceClient`` posting its vector as one item. A round is timed from opening it at both
servers, through every client building its post (encode, PRG share, seal A's seed to A) and C
accepting it, closing the phase (relay to A, A opening every envelope and summing, the
surviving-set agreement) to C opening the aggregate (A's share sum, the overflow-bound check,
decoding). Not timed: the servers' key pairs and the clients' objects (enrolment).

decentsim runs its clients one after the other in this process; Ray runs the SecAgg+ clients
in actors of ``--client-cpus`` CPUs each (by default one actor per core, so they run in
parallel). ``--warmup`` rounds run first and are not timed (lazy imports in fresh Ray workers,
cold caches); errors are checked on every round.

Where the time goes, per timed round: for SecAgg+, ``server_compute`` (the workflow's own work:
configuring, relaying keys and shares, Shamir reconstruction, unmasking, ``aggregate_fit``),
``waiting_for_clients`` (wall time inside ``grid.send_and_receive``: client work, Ray
dispatch and Flower's message polling) and ``client_compute_total`` (seconds the clients spent
in ``secaggplus_mod`` and ``fit``, summed over clients, measured by a client mod); for
decentsim, ``clients_building_posts`` and ``servers`` (the rest of the round).

**Like with like**: SecAgg+ in Flower releases the weighted *mean* ``Σ w_i x_i / Σ w_i``
(the workflow divides by the securely summed weights, then ``FedAvg`` averages the identical
per-client copies). With every weight ``1`` (and ``max_weight = 1``, so the weights quantize
exactly) that is ``Σ x_i / N``; the bench multiplies it by ``N`` to recover the sum. Both
errors are ``max_k |recovered_sum_k − Σ_i x_ik|`` against the float64 sum of the same vectors,
taken over every coordinate and round.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from decentsim.usage import CommandFailed, UsageError
from protocols.secure_sum import InMemoryNetwork, Mode, PhaseSpec, RoundSpec, SlotKind
from transport.flower.env import import_flwr, start_ray

if TYPE_CHECKING:
    from protocols.secure_sum import FixedPointCodec

#: the secure-sum phase of a round: one item per client to one aggregate slot
PHASE = "vectors"
#: name of the record in which a SecAgg+ client reports its own seconds
TIMING_RECORD = "decentsim.bench.client-seconds"
#: SecAgg+'s modulus (Flower's default and its largest allowed value)
MODULUS_RANGE = 2**32
#: client values lie in [-1, 1): SecAgg+ clips to ±this, so nothing is clipped
CLIPPING_RANGE = 1.0
#: each client's weight (``num_examples``); with ``max_weight`` equal to it, it quantizes exactly
WEIGHT = 1
#: SecAgg+ quantizes with ``np.int32`` (stochastic rounding), so its range must stay below this
INT32_LIMIT = 2**31
#: fewest clients: SecAgg+ needs ``num_shares >= 3`` shares and a threshold of 2 or more below it
MIN_CLIENTS = 3


class VsSecAggPlusError(Exception):
    """Base class of this benchmark's errors."""


class BenchArgumentError(VsSecAggPlusError, UsageError):
    """An argument is out of range; the message names it and the allowed range."""


class AggregationFailed(VsSecAggPlusError, CommandFailed):
    """A protocol round did not aggregate every client (halted, a client failed, a dropout)."""


@dataclass(frozen=True)
class SecAggPlusParams:
    """The ``SecAggPlusWorkflow`` configuration of a run.

    Args:
        num_shares: shares of each client's two secrets, one per neighbour (itself included):
            the neighbourhood size ``k``.
        reconstruction_threshold: shares needed to rebuild a secret (``t``); ``2 <= t < k``.
        quantization_range: SecAgg+ maps ``[-clipping_range, clipping_range]`` to
            ``[0, quantization_range]``; the sum of ``N`` quantized vectors (and of the ``N``
            quantized weights) must stay below ``modulus_range``.
        clipping_range: values are clipped to ±this before quantization.
        modulus_range: masks and sums live modulo this.
        max_weight: a weight of ``max_weight`` quantizes to ``quantization_range``.
    """

    num_shares: int
    reconstruction_threshold: int
    quantization_range: int
    clipping_range: float = CLIPPING_RANGE
    modulus_range: int = MODULUS_RANGE
    max_weight: float = float(WEIGHT)

    @classmethod
    def for_clients(
        cls,
        clients: int,
        num_shares: int | None = None,
        reconstruction_threshold: int | None = None,
        quantization_range: int | None = None,
    ) -> SecAggPlusParams:
        """Parameters for ``clients`` clients; ``None`` picks the default of each.

        Defaults: ``k = min(N, 2·ceil(log2 N) + 1)`` (SecAgg+ neighbourhoods grow as O(log N);
        odd, as Flower's workflow wants), ``t = max(2, ceil(2k/3))``, and the largest
        power-of-two ``quantization_range`` for which ``N`` quantized values still sum below
        the modulus (the finest quantization SecAgg+ allows at this ``N``).

        Raises:
            BenchArgumentError: a value outside what SecAgg+ accepts, with the reason.
        """
        if clients < MIN_CLIENTS:
            raise BenchArgumentError(
                f"--clients must be >= {MIN_CLIENTS}: SecAgg+ splits each secret into "
                f"num_shares >= 3 shares among a client's neighbours, got {clients}"
            )
        k = (
            min(clients, 2 * math.ceil(math.log2(clients)) + 1)
            if num_shares is None
            else num_shares
        )
        if not 3 <= k <= clients:
            raise BenchArgumentError(
                f"--num-shares must be in [3, --clients={clients}] (a client's neighbourhood, "
                f"itself included), got {k}"
            )
        t = (
            max(2, math.ceil(2 * k / 3))
            if reconstruction_threshold is None
            else reconstruction_threshold
        )
        if not 2 <= t < k:
            raise BenchArgumentError(
                f"--reconstruction-threshold must be in [2, num_shares={k}), got {t}"
            )
        q = quantization_range
        if q is None:
            q = 1 << ((MODULUS_RANGE - 1) // clients).bit_length() - 1
        if not 1 <= q < INT32_LIMIT or clients * q >= MODULUS_RANGE:
            raise BenchArgumentError(
                f"--quantization-range must be >= 1, < 2^31 and keep clients × range below the "
                f"modulus 2^32 (else the masked sum wraps), got {q} for {clients} clients"
            )
        return cls(k, t, q)

    @property
    def step(self) -> float:
        """One quantization step: ``2 · clipping_range / quantization_range``."""
        return 2 * self.clipping_range / self.quantization_range

    def sum_error_bound(self, clients: int) -> float:
        """Largest error of a recovered sum from quantization: stochastic rounding moves each
        client's value by less than one step."""
        return clients * self.step

    def as_json(self) -> dict[str, float | int]:
        """The parameters as JSON-able numbers."""
        return {
            "num_shares": self.num_shares,
            "reconstruction_threshold": self.reconstruction_threshold,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "modulus_range": self.modulus_range,
            "max_weight": self.max_weight,
        }


def client_vector(seed: int, index: int, dim: int) -> npt.NDArray[np.float64]:
    """Client ``index``'s vector: ``dim`` values uniform in [-1, 1) from ``(seed, index)``.

    Benchmark data, not a secret: a seeded numpy generator keeps runs comparable, and every
    SecAgg+ client (in its Ray worker) rebuilds its own vector instead of receiving it.
    """
    return np.random.default_rng([seed, index]).uniform(-1.0, 1.0, size=dim)


def client_vectors(seed: int, clients: int, dim: int) -> npt.NDArray[np.float64]:
    """All clients' vectors, ``(clients, dim)``."""
    return np.stack([client_vector(seed, i, dim) for i in range(clients)])


@dataclass(frozen=True)
class SideResult:
    """One protocol's rounds: the timed seconds and every round's recovered sum."""

    #: seconds of each timed round (warm-up rounds excluded)
    seconds: list[float]
    #: the recovered sum of every round, warm-up rounds included
    sums: list[npt.NDArray[np.float64]]
    #: where each timed round's seconds went (names per protocol)
    parts: list[dict[str, float]]

    @property
    def seconds_per_round(self) -> float:
        """Mean seconds over the timed rounds."""
        return float(np.mean(self.seconds))

    @property
    def breakdown(self) -> dict[str, float]:
        """Mean seconds per timed round of each part."""
        return {k: round(float(np.mean([p[k] for p in self.parts])), 6) for k in self.parts[0]}

    def max_abs_error(self, exact: npt.NDArray[np.float64]) -> float:
        """``max |sum − exact|`` over coordinates and rounds."""
        return max(float(np.abs(s - exact).max()) for s in self.sums)


@dataclass(frozen=True)
class Comparison:
    """Both sides of one benchmark run over the same vectors."""

    clients: int
    dim: int
    rounds: int
    warmup: int
    mode: Mode
    params: SecAggPlusParams
    #: float64 sum of the client vectors
    exact: npt.NDArray[np.float64]
    secaggplus: SideResult
    decentsim: SideResult

    def as_json(self) -> dict[str, object]:
        """The result line."""
        sec, dec = self.secaggplus.seconds_per_round, self.decentsim.seconds_per_round
        return {
            "clients": self.clients,
            "dim": self.dim,
            "secaggplus_s_per_round": round(sec, 6),
            "decentsim_s_per_round": round(dec, 6),
            "ratio": round(sec / dec, 2),
            "secaggplus_max_abs_error": self.secaggplus.max_abs_error(self.exact),
            "decentsim_max_abs_error": self.decentsim.max_abs_error(self.exact),
            "secaggplus_error_bound": self.params.sum_error_bound(self.clients),
            "decentsim_error_bound": decentsim_error_bound(self.clients),
            "rounds": self.rounds,
            "warmup_rounds": self.warmup,
            "mode": self.mode.value,
            "secaggplus_params": self.params.as_json(),
            "secaggplus_breakdown_s_per_round": self.secaggplus.breakdown,
            "decentsim_breakdown_s_per_round": self.decentsim.breakdown,
        }


# -- decentsim ---------------------------------------------------------------------------------
def _codec() -> FixedPointCodec:
    # imported here: contract.schedule pulls in torch and the simulator, which the SecAgg+
    # clients (Ray workers importing this module) do not need
    from contract.schedule import aggregates_codec

    return aggregates_codec()


def decentsim_error_bound(clients: int) -> float:
    """Largest error of decentsim's sum: encoding rounds each value to the nearest multiple of
    ``2^-f``; the ring sum and its decoding are exact."""
    return clients * 2.0 ** -(_codec().frac_bits + 1)


def decentsim_rounds(
    vectors: npt.NDArray[np.float64], rounds: int, warmup: int, mode: Mode
) -> SideResult:
    """Run ``warmup + rounds`` decentsim rounds summing ``vectors`` (one client per row).

    Raises:
        AggregationFailed: a round's surviving set is not every client.
    """
    n, d = vectors.shape
    codec = _codec()
    codec.check_summands(n)
    net = InMemoryNetwork(mode, codec)
    clients = [net.device() for _ in range(n)]  # enrolment: per run, not timed
    seconds: list[float] = []
    sums: list[npt.NDArray[np.float64]] = []
    parts: list[dict[str, float]] = []
    for r in tqdm(range(warmup + rounds), desc="decentsim rounds", file=sys.stderr):
        slot = f"grad/epoch/{r}"
        spec = RoundSpec(r, (PhaseSpec(PHASE, d, SlotKind.AGGREGATE, 1, (slot,)),))
        t0 = time.perf_counter()
        net.open_round(spec)
        net.coordinator.close_registration(r)
        building = 0.0
        for i, client in enumerate(clients):
            t1 = time.perf_counter()
            raw = client.build_post(spec, PHASE, [slot], vectors[i : i + 1])
            building += time.perf_counter() - t1
            net.coordinator.handle_device(raw, client.device_id)
        report = net.coordinator.close_phase(r, PHASE)
        total = codec.decode(net.coordinator.open_aggregates_ring(r, PHASE)[slot])
        elapsed = time.perf_counter() - t0
        if report.surviving != n:
            raise AggregationFailed(f"decentsim round {r}: {report.surviving} of {n} survived")
        if r >= warmup:
            seconds.append(elapsed)
            parts.append({"clients_building_posts": building, "servers": elapsed - building})
        sums.append(total)
    return SideResult(seconds, sums, parts)


# -- Flower SecAgg+ ----------------------------------------------------------------------------
@functools.cache
def _vector_client_class() -> type:
    """A ``NumPyClient`` whose ``fit`` returns its fixed vector with weight 1 (built on first
    use, so importing this module does not import Flower)."""
    import_flwr()
    from flwr.client import NumPyClient

    class VectorClient(NumPyClient):  # type: ignore[misc]
        """A client contributing one fixed vector."""

        def __init__(self, vector: npt.NDArray[np.float64]) -> None:
            self.vector = vector

        def fit(
            self, parameters: list[npt.NDArray[Any]], config: dict[str, Any]
        ) -> tuple[list[npt.NDArray[np.float64]], int, dict[str, Any]]:
            """Return the vector; the global parameters are not used."""
            del parameters, config
            return [self.vector], WEIGHT, {}

    return VectorClient


def _client_fn(seed: int, dim: int, context: Any) -> Any:
    """``client_fn`` of the ``ClientApp``: the client of simulated node ``partition-id``."""
    index = int(context.node_config["partition-id"])
    return _vector_client_class()(client_vector(seed, index, dim)).to_client()


def _timing_mod(msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
    """Client mod (outside ``secaggplus_mod``): attach the seconds this client spent in
    SecAgg+ and ``fit`` to its reply, for the per-round breakdown; the workflow ignores it."""
    from flwr.app import ConfigRecord

    t0 = time.perf_counter()
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content.config_records[TIMING_RECORD] = ConfigRecord(
            {"seconds": time.perf_counter() - t0}
        )
    return reply


class _TimingGrid:
    """The grid as the SecAgg+ workflow sees it: times each exchange with the clients and adds
    up the seconds the clients report (:func:`_timing_mod`)."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.waiting_s = 0.0
        self.client_s = 0.0

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Any:
        """Forward to the grid; returns its replies."""
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.waiting_s += time.perf_counter() - t0
        for reply in replies:
            if reply.has_content() and TIMING_RECORD in reply.content.config_records:
                self.client_s += float(reply.content.config_records[TIMING_RECORD]["seconds"])
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python, Ray's processes, C code) to stderr: the
    bench's stdout is its one JSON line."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # Ray's daemons, started in here, inherit the redirected descriptor
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def secaggplus_rounds(
    seed: int,
    clients: int,
    dim: int,
    rounds: int,
    warmup: int,
    params: SecAggPlusParams,
    client_cpus: float,
) -> SideResult:
    """Run ``warmup + rounds`` SecAgg+ rounds in Flower's Ray simulation; client ``i``
    contributes :func:`client_vector` ``(seed, i, dim)``.

    Raises:
        AggregationFailed: SecAgg+ halted, or a round aggregated fewer than ``clients``.
    """
    import_flwr()
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.simulation import run_simulation

    total = warmup + rounds
    seconds: list[float] = []
    sums: list[npt.NDArray[np.float64]] = []
    parts: list[dict[str, float]] = []
    errors: list[str] = []
    bar = tqdm(total=total, desc="SecAgg+ rounds", file=sys.stderr)

    class AllClientsFedAvg(FedAvg):  # type: ignore[misc]
        """FedAvg that refuses a round missing a client (SecAgg+ would drop it silently)."""

        def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
            """Aggregate only when all clients returned and none failed."""
            if failures or len(results) != clients:
                errors.append(
                    f"round {server_round}: {len(results)} results, {len(failures)} failures"
                )
                return None, {}
            return super().aggregate_fit(server_round, results, failures)

    workflow = SecAggPlusWorkflow(
        num_shares=params.num_shares,
        reconstruction_threshold=params.reconstruction_threshold,
        max_weight=params.max_weight,
        clipping_range=params.clipping_range,
        quantization_range=params.quantization_range,
        modulus_range=params.modulus_range,
    )

    def timed_fit(grid: Any, context: Any) -> None:
        """One SecAgg+ fit round, timed; records the released sum."""
        before = context.state.array_records[MAIN_PARAMS_RECORD]
        timing = _TimingGrid(grid)
        t0 = time.perf_counter()
        workflow(timing, context)
        elapsed = time.perf_counter() - t0
        after = context.state.array_records[MAIN_PARAMS_RECORD]
        if after is before:  # the workflow halted, or aggregate_fit refused the round
            errors.append(
                f"round {len(sums) + 1}: SecAgg+ released no aggregate (the workflow halted or "
                "a client failed; Flower's log on stderr says which)"
            )
            raise AggregationFailed("; ".join(errors))
        (mean,) = after.to_numpy_ndarrays()
        sums.append(np.asarray(mean, dtype=np.float64) * clients)  # the mean of N, as a sum
        if len(sums) > warmup:
            seconds.append(elapsed)
            parts.append(
                {
                    "server_compute": elapsed - timing.waiting_s,
                    "waiting_for_clients": timing.waiting_s,
                    "client_compute_total": timing.client_s,
                }
            )
        bar.update()

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        """The ServerApp: every round samples every client; no evaluation."""
        strategy = AllClientsFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_available_clients=clients,
            accept_failures=False,
            initial_parameters=ndarrays_to_parameters([np.zeros(dim)]),
        )
        legacy = LegacyContext(context, ServerConfig(num_rounds=total), strategy)
        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    client_app = ClientApp(
        client_fn=functools.partial(_client_fn, seed, dim), mods=[_timing_mod, secaggplus_mod]
    )
    backend = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}}
    with _stdout_to_stderr(), bar:
        start_ray(os.cpu_count() or 1)  # as Flower would, with retries on a slow start
        run_simulation(server_app, client_app, clients, backend_config=backend)
    if errors or len(sums) != total:
        detail = "; ".join(errors) or "the simulation ended early"
        raise AggregationFailed(f"SecAgg+ completed {len(sums)} of {total} rounds: {detail}")
    return SideResult(seconds, sums, parts)


# -- the bench ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options."""
    parser.add_argument("--clients", type=int, required=True, help="clients (N), >= 3")
    parser.add_argument("--dim", type=int, required=True, help="values per client vector (D)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per protocol")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first (errors still checked)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the client vectors")
    parser.add_argument(
        "--mode",
        choices=[Mode.MAILBOX.value, Mode.SHUFFLED.value],
        default=Mode.MAILBOX.value,
        help="decentsim posting mode",
    )
    parser.add_argument(
        "--num-shares", type=int, help="SecAgg+ shares per secret (default min(N, 2⌈log2 N⌉+1))"
    )
    parser.add_argument(
        "--reconstruction-threshold",
        type=int,
        help="SecAgg+ shares to rebuild a secret (default max(2, ⌈2k/3⌉))",
    )
    parser.add_argument(
        "--quantization-range",
        type=int,
        help="SecAgg+ quantization levels (default: the largest power of two with N·Q < 2^32)",
    )
    parser.add_argument(
        "--client-cpus",
        type=float,
        default=1.0,
        help="CPUs per Ray actor running SecAgg+ clients (1 = one actor per core)",
    )


def benchmark(args: argparse.Namespace) -> Comparison:
    """Validate the arguments, then run both protocols over the same vectors.

    Raises:
        BenchArgumentError: a bad argument (before anything runs).
        AggregationFailed: a protocol did not sum every client.
    """
    for name, low in (("dim", 1), ("rounds", 1), ("warmup", 0), ("seed", 0)):
        value = getattr(args, name)
        if value < low:
            raise BenchArgumentError(f"--{name} must be >= {low}, got {value}")
    if not args.client_cpus > 0:
        raise BenchArgumentError(f"--client-cpus must be > 0, got {args.client_cpus}")
    # before SecAgg+'s parameters, whose default quantization needs clients < 2^32
    max_clients = _codec().max_summands
    if args.clients > max_clients:
        raise BenchArgumentError(
            f"--clients must be <= {max_clients} (the aggregates codec's max_summands), "
            f"got {args.clients}"
        )
    params = SecAggPlusParams.for_clients(
        args.clients, args.num_shares, args.reconstruction_threshold, args.quantization_range
    )
    mode = Mode(args.mode)
    vectors = client_vectors(args.seed, args.clients, args.dim)
    exact = vectors.sum(axis=0)
    secagg = secaggplus_rounds(
        args.seed, args.clients, args.dim, args.rounds, args.warmup, params, args.client_cpus
    )
    decent = decentsim_rounds(vectors, args.rounds, args.warmup, mode)
    return Comparison(
        args.clients, args.dim, args.rounds, args.warmup, mode, params, exact, secagg, decent
    )


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the benchmark; returns the JSON-able result line."""
    return benchmark(args).as_json()


__all__ = [
    "AggregationFailed",
    "BenchArgumentError",
    "Comparison",
    "SecAggPlusParams",
    "SideResult",
    "VsSecAggPlusError",
    "add_arguments",
    "benchmark",
    "client_vector",
    "client_vectors",
    "decentsim_error_bound",
    "decentsim_rounds",
    "run",
    "secaggplus_rounds",
]
