"""``decentralize(simulation)``: the same model, run by devices holding one agent each.

    from sim import env, models, populations
    simulation = env.create_from_template(models.epidemiology, populations.synthetic(2_000))
    from decentsim import decentralize
    real_sim = decentralize(simulation, protocol="ble_contact_tracing", mode="mailbox")
    real_sim.deploy()      # start the servers and spawn the simulated device pools
    day = real_sim.sync()  # one round: contacts → private sums → local updates → aggregates
    summary = real_sim.run()   # the remaining rounds; the run's loss, gradient and θ history
    real_sim.close()

``deploy`` starts the aggregator, the coordinator and ``pools`` device-pool processes on
loopback with TLS (a :class:`~launcher.federation.Federation`); the pools load their own
agents from the population's spec. The coordinator drives the rounds with its deadlines;
``sync`` returns the next round it commits (its opened aggregates) and, at the end of an epoch,
the epoch's loss, gradient and θ update.

With ``pilots=K`` (or a list of agent ids) the run is a hybrid run (``docs/pilot.md``): K agents
are pilot devices with real radios. ``deploy`` then writes one enrolment URI and QR code per
pilot (:attr:`Decentralized.enrolment_dir`) and waits until all K have enrolled; day 0 starts
at ``start`` (unix seconds) on a run clock of ``clock_scale``.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from launcher.federation import Federation, FederationTimeout, make_spec, write_outputs
from sim.env import Simulation
from sim.model import OBSERVATIONS

PROTOCOLS = ("ble_contact_tracing",)
_SYNTHETIC = re.compile(r"^synthetic\(n=(\d+), seed=(-?\d+)\)$")


class DecentralizeError(ValueError):
    """The simulation cannot be decentralized as asked; the message says why."""


class SyncTimeout(DecentralizeError, TimeoutError):
    """A round did not arrive in time (``sync(timeout_s=…)``)."""


def _population_spec(simulation: Simulation, population: str | None) -> tuple[str, int]:
    """The spec the pools load their agents from, and its seed."""
    if population is not None:
        return population, simulation.seed
    match = _SYNTHETIC.match(simulation.population.name)
    if match:
        return f"synthetic:{match.group(1)}", int(match.group(2))
    raise DecentralizeError(
        f"population {simulation.population.name!r}: pass population='DIR' (the directory the "
        "device pools load their own agents from)"
    )


def _interventions(simulation: Simulation) -> tuple[tuple[str, ...], tuple[str, ...]]:
    cfg = simulation.config
    locks = []
    for lock in cfg.lockdowns:
        if lock.end_day is not None:
            raise DecentralizeError("lockdowns with an end day are not supported in federations")
        locks.append(f"{lock.layer}:{lock.start_day}:{lock.scale}")
    vacs = tuple(f"{v.day}:{v.fraction}:{v.efficacy}" for v in cfg.vaccinations)
    return tuple(locks), vacs


def _epoch_done(results: dict[str, Any], epoch: int) -> bool:
    return any(e["epoch"] == epoch and e["loss"] is not None for e in results["epochs"])


class Decentralized:
    """A deployed (or deployable) federation of one simulation; see the module docstring."""

    def __init__(
        self,
        simulation: Simulation,
        mode: str,
        pools: int,
        radio: str,
        root: Path | None,
        population: str | None,
        epochs: int,
        step_timeout_s: float,
        pilots: int | Sequence[int] = 0,
        start: float | None = None,
        clock_scale: float = 1.0,
        pilot_radios: dict[int, list[str]] | None = None,
    ) -> None:
        spec_text, pop_seed = _population_spec(simulation, population)
        locks, vacs = _interventions(simulation)
        chosen = _pilots(pilots, simulation.population.n_agents, simulation.seed)
        hybrid: dict[str, Any] = {}
        if chosen:
            # day 0 starts at `start` (default: in ten minutes, time to hand out the URIs)
            wall_epoch = time.time() + 600.0 if start is None else start
            hybrid = {"pilots": chosen, "clock_scale": clock_scale, "clock_wall_epoch": wall_epoch}
        self.spec = make_spec(
            spec_text,
            simulation.days,
            population_seed=pop_seed,
            pools=pools,
            radio=radio,
            seed=simulation.seed,
            mode=mode,
            theta=simulation.theta.to_dict(),
            epochs=epochs,
            step_timeout_s=step_timeout_s,
            lockdowns=locks,
            vaccinations=vacs,
            estimator=simulation.config.estimator.kind,
            population_seeds=simulation.config.use_population_seeds,
            loaded=simulation.population,
            **hybrid,
        )
        self._tmp = tempfile.TemporaryDirectory(prefix="decentsim-") if root is None else None
        self.root = Path(self._tmp.name) if self._tmp is not None else Path(root)  # type: ignore[arg-type]
        self.federation = Federation(
            self.root / "state", self.spec, pop_seed, pilot_radios=pilot_radios
        )
        self._synced = 0
        self._deployed = False
        #: perf_counter() when deploy() started the processes (what ``wall_s`` counts from)
        self._started: float | None = None

    @property
    def enrolment_dir(self) -> Path:
        """A hybrid run's enrolment URIs and QR codes (``pilot-A.uri``, ``pilot-A.png``),
        written by :meth:`deploy`: hand each to its pilot device."""
        return self.federation.enrolment_dir

    def deploy(self, timeout_s: float = 3600.0) -> None:
        """Start the servers and the simulated device pools (they enrol with single-use
        tokens, then follow the coordinator's rounds); in a hybrid run, wait until every
        pilot has enrolled.

        Raises:
            SyncTimeout: not every pilot enrolled within ``timeout_s`` (names how many did).
        """
        if self._deployed:
            raise DecentralizeError("already deployed")
        self._started = time.perf_counter()
        self.federation.start()
        self._deployed = True
        pilots = len(self.spec.pilots)
        if not pilots:
            return
        print(
            f"decentsim: enrolment URIs and QR codes of {pilots} pilots in {self.enrolment_dir}",
            file=sys.stderr,
        )
        deadline = time.monotonic() + timeout_s
        while (enrolled := self.federation.pilots_enrolled()) < pilots:
            if time.monotonic() > deadline:
                raise SyncTimeout(f"{enrolled} of {pilots} pilots enrolled within {timeout_s:g} s")
            self.federation.check_alive()
            time.sleep(0.2)

    def sync(self, timeout_s: float = 3600.0) -> dict[str, Any]:
        """Wait for the next round the coordinator commits; returns its day, opened daily
        totals and, when the round ended an epoch, the epoch's loss, gradient and new θ.

        Raises:
            SyncTimeout: the round (and, at an epoch's end, the epoch's record) did not
                arrive within ``timeout_s``.
            FederationError: a process of the federation died (names it, with its log).
        """
        if not self._deployed:
            raise DecentralizeError("deploy() first")
        total = self.spec.days * self.spec.epochs
        if self._synced >= total:
            raise DecentralizeError(f"all {total} rounds are done")
        deadline = time.monotonic() + timeout_s
        index = self._synced
        epoch, day = divmod(index, self.spec.days)
        try:
            self.federation.wait(until_days=index + 1, timeout_s=timeout_s)
        except FederationTimeout:
            raise SyncTimeout(
                f"round {index} (epoch {epoch}, day {day}) not committed within {timeout_s:g} s"
            ) from None
        results = self.federation.results()
        if day == self.spec.days - 1:  # the coordinator records the epoch right after its day
            while not _epoch_done(results, epoch):
                if time.monotonic() > deadline:
                    raise SyncTimeout(
                        f"epoch {epoch}'s loss and θ step not recorded within {timeout_s:g} s"
                    )
                self.federation.check_alive()
                time.sleep(0.1)
                results = self.federation.results()
        self._synced += 1
        out: dict[str, Any] = {"epoch": epoch, "day": day}
        y = results["y"]
        if day < len(y):
            totals = y[day, :, :, 0].sum(-1)
            out.update({name: float(totals[k]) for k, name in enumerate(OBSERVATIONS)})
        done = [e for e in results["epochs"] if e["epoch"] == epoch and e["loss"] is not None]
        if done:
            out["loss"] = done[0]["loss"]
            out["grad"] = results["grad"]
            nxt = [e for e in results["epochs"] if e["epoch"] == epoch + 1]
            out["theta"] = nxt[0]["theta"] if nxt else done[0]["theta"]
        return out

    def run(self, out: Path | None = None, timeout_s: float = 3600.0) -> dict[str, Any]:
        """Wait for the remaining rounds; write the outputs (to ``out``, default the root);
        returns the summary (as ``federated run``)."""
        if not self._deployed:
            self.deploy()
        assert self._started is not None
        self.federation.wait(timeout_s=timeout_s)
        wall_s = time.perf_counter() - self._started
        self._synced = self.spec.days * self.spec.epochs
        return write_outputs(out or self.root, self.federation, self.federation.results(), wall_s)

    def aggregates(self) -> np.ndarray:
        """The opened daily aggregates of the last epoch so far: (T, 2, G, 1 + p)."""
        return self.federation.results()["y"]

    def close(self) -> None:
        """Stop every process (and remove the temporary root, if one was made)."""
        self.federation.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def decentralize(
    simulation: Simulation,
    protocol: str = "ble_contact_tracing",
    mode: str = "mailbox",
    pools: int = 2,
    radio: str = "ideal",
    root: str | Path | None = None,
    population: str | None = None,
    epochs: int = 1,
    step_timeout_s: float = 120.0,
    pilots: int | Sequence[int] = 0,
    start: float | None = None,
    clock_scale: float = 1.0,
    pilot_radios: dict[int, list[str]] | None = None,
) -> Decentralized:
    """The simulation as a federation of devices (see the module docstring).

    Args:
        simulation: a ``sim.env.Simulation`` (its population, θ, seed, days and model options).
        protocol: how contacts are measured: ``ble_contact_tracing`` (Exposure Notification
            beacons over the ideal or simulated radio).
        mode: secure-sum posting mode (``mailbox``, ``shuffled``, ``dense``, ``plaintext``).
        pools: device-pool processes.
        radio: ``ideal`` (the decentralized run equals the central one) or ``simulated``.
        root: where the processes keep their state (default: a temporary directory).
        population: the spec pools load (default: derived from a synthetic population).
        epochs: calibration epochs (θ steps between them).
        step_timeout_s: deadline of each step of a round.
        pilots: a hybrid run: that many pilot agents (drawn with the simulation's seed), or
            their ids; each is a physical device with a real radio (``docs/pilot.md``).
        start: a hybrid run's day 0, unix seconds on the wall clock (default: in 10 minutes).
        clock_scale: a hybrid run's protocol seconds per wall second (1: real time).
        pilot_radios: start these pilots' device processes here too, each with its radio
            options (``--hci tcp-client:…`` of a radio hub, in tests); the others join from
            their own devices.
    """
    if protocol not in PROTOCOLS:
        raise DecentralizeError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return Decentralized(
        simulation, mode, pools, radio, None if root is None else Path(root), population,
        epochs, step_timeout_s, pilots, start, clock_scale, pilot_radios,
    )  # fmt: skip


def _pilots(pilots: int | Sequence[int], n_agents: int, seed: int) -> tuple[int, ...]:
    """The pilot agents: the ids given, or ``pilots`` of them drawn with the run's seed."""
    if isinstance(pilots, int):
        if not 0 <= pilots < n_agents:
            raise DecentralizeError(f"pilots must be in 0..{n_agents - 1}, got {pilots}")
        drawn = np.random.default_rng(seed).choice(n_agents, size=pilots, replace=False)
        return tuple(sorted(int(a) for a in drawn))
    return tuple(int(a) for a in pilots)
