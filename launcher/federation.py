"""``decentsim federated run``: a simulated federation of real processes on this machine.

:class:`Federation` starts, as separate processes speaking gRPC over loopback with TLS, the
aggregator, the coordinator and P device-pool agents (the same commands a deployment runs:
``decentsim aggregator serve``, ``coordinator serve``, ``device-agent run``), waits for the
run to finish with a progress bar, and collects the public results from the coordinator's
database. Tests use the same class to kill (SIGKILL) and restart any process mid-run.

Layout of ``DIR`` (``--out``)::

    trajectory.csv      day, new_infections, new_deaths, employment (the opened daily aggregates)
    summary.json        agents, days, mode, wall_s, bytes_device_to_servers, daily, loss, grad, …
    federated.png       daily aggregates by age group
    behaviour_table.csv a table/llm run's public behaviour table: each period's row the devices
                        got (period, cell attributes, isolate, work), as ``simulate`` writes it
    views/              the servers' event logs (coordinator.jsonl, aggregator.jsonl) and, with
                        ``--record-views``, their transcripts, each sealed to that server's own
                        auditor (*.transcript)
    audit/              with ``--record-views``: one key pair per server's auditor
                        (<role>-auditor.key 0600 and <role>-auditor.pub; each server gets only
                        its own auditor's .pub); truth.json (population seed) for
                        ``decentsim audit --role ROLE``
    state/              every process's state dir (identities, databases, logs)

View format (``views/*.jsonl``, one JSON object per line): ``t`` (unix time), ``event`` and
event fields: ``open_round`` (round, epoch, day), ``RegisterSlots``/``PostShares``/``FetchSums``/
``SubmitAggregates`` (round, participant id hex, bytes of the payload), ``close`` (round,
phase, surviving), ``dropout`` (round, step, participants), ``aggregate`` (round, day,
surviving, opened totals), ``abort`` (round, reason), ``epoch`` (epoch, loss, grad), ``enrol``
(credential, participants) at the coordinator; ``open_round``, ``register``, ``relay:<phase>``,
``agree:<phase>`` (deployment, round, reply type) at the aggregator. A view holds what that
server learns — identifiers, sizes, timing, opened aggregates — and never a share or value.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from contract.runspec import RunSpec, RunSpecError
from contract.schedule import UNIT_DEVICES, WIDTH, slice_ids
from contract.transcript import auditor_files, create_auditor_keys
from identity.secret_files import write_secret
from protocols.ble import gaen
from sim.archetypes import BehaviourTable, population_cells
from sim.model import OBSERVATIONS
from sim.params import BASE_PARAMS
from sim.populations import AGE_GROUPS, Population, from_spec

#: 10-minute intervals devices advertise per day under the ideal radio.
IDEAL_INTERVALS = 4


class FederationError(Exception):
    """A federated run failed; the message names the process and its log."""


class FederationTimeout(FederationError):
    """The run did not get as far as asked in time."""


def _free_env() -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    # P processes share the cores: one thread each avoids oversubscription
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def items_budget(population: Population, pools: int) -> int:
    """The messages phase's per-device budget: enough for the busiest participant.

    A participant pads to ``devices × budget`` items; the most distinct RPIs a participant's
    devices hear in a day is at most its out-edges, so ``ceil(max over participants of
    out-edges / devices)`` always fits (checked again, per day, by the pool).
    """
    out_deg = torch.zeros(population.n_agents, dtype=torch.int64)
    for layer in population.layers:
        out_deg += torch.bincount(layer.src, minlength=population.n_agents)
    need = 1
    for i in range(pools):
        ids = slice_ids(population.n_agents, i, pools)
        units = out_deg[ids].split(UNIT_DEVICES)
        need = max(need, *(math.ceil(int(u.sum()) / len(u)) for u in units))
    return need


def make_spec(
    population: str,
    days: int,
    *,
    population_seed: int = 0,
    pools: int = 2,
    radio: str = "ideal",
    loaded: Population | None = None,
    **options: Any,
) -> RunSpec:
    """The :class:`RunSpec` of a simulated federation of ``population`` in ``pools`` pools.

    Derives what follows from the population and the radio: the messages phase's per-device
    budget (:func:`items_budget`) and the advertised beacon intervals (a few at the start of
    the day under the ideal radio; all day under the simulated one, whose contacts spread
    over the day). ``loaded`` is the population if the caller has it already; ``options`` are
    further :class:`RunSpec` fields.

    Raises:
        PopulationError: the population cannot be loaded (names the file, line, field).
        RunSpecError: a bad field, or more pools than agents (every pool needs an agent).
    """
    pop = loaded if loaded is not None else from_spec(population, seed=population_seed)
    pilots = tuple(options.pop("pilots", ()))
    if not 1 <= pools <= pop.n_agents - len(pilots):
        raise RunSpecError(
            f"pools must be in 1..{pop.n_agents - len(pilots)} (the population's simulated "
            f"agents), got {pools}"
        )
    outside = [a for a in pilots if not 0 <= a < pop.n_agents]
    if outside:
        raise RunSpecError(f"pilots {outside} are not agents of the population")
    if options.get("behaviour", "heuristic") != "heuristic" and "grid" not in options:
        # the archetype grid is public: the attributes' levels, never who has which
        options["grid"] = population_cells(pop)[0].to_json()
    # room for 144 beacons a day heard on the air (a day's worth of intervals: one pilot near
    # all day, or several for less) in every device's budget, so a pilot's posts look like
    # anyone's; a pilot that hears more distinct RPIs fails closed (TraceOverflow)
    physical = gaen.TEK_ROLLING_PERIOD if pilots else 0
    return RunSpec(
        population=population,
        days=days,
        # the coordinator waits for every participant: the simulated pools and the pilots
        pools=pools + len(pilots),
        radio=radio,
        items_per_device=items_budget(pop, pools) + physical,
        advertising_intervals=(
            IDEAL_INTERVALS if radio == "ideal" and not pilots else gaen.TEK_ROLLING_PERIOD
        ),
        pilots=pilots,
        **options,
    )


class Federation:
    """Coordinator, aggregator and device-pool processes of one run, under ``root``.

    Args:
        root: state dirs of every process (``root/coordinator``, ``root/aggregator``,
            ``root/pool-<i>``).
        spec: the run.
        population_seed: seed of a ``synthetic:N`` population (the pools generate it).
        insecure: DEBUGGING ONLY: run every process with ``--insecure`` (no TLS).
        record_views: each server records every message it sends and receives in a transcript
            sealed to its own auditor, for ``decentsim audit`` (as large as the traffic: an
            explicit choice, ``federated run --record-views``).
    """

    def __init__(
        self,
        root: Path,
        spec: RunSpec,
        population_seed: int = 0,
        insecure: bool = False,
        record_views: bool = False,
        pilot_radios: dict[int, list[str]] | None = None,
    ) -> None:
        self.root = root
        self.spec = spec
        self.population_seed = population_seed
        self.record_views = record_views
        #: DEBUGGING ONLY: every process without TLS
        self.insecure = insecure
        self.c_dir = root / "coordinator"
        self.a_dir = root / "aggregator"
        #: simulated pools: every participant the run waits for but its pilots
        self.simulated_pools = spec.pools - len(spec.pilots)
        self.pool_dirs = [root / f"pool-{i}" for i in range(self.simulated_pools)]
        #: pilot agent → the radio options of the pilot process this launcher starts for it
        #: (``--hci`` …); pilots not listed join from their own devices
        self.pilot_radios = dict(pilot_radios or {})
        unknown = sorted(set(self.pilot_radios) - set(spec.pilots))
        if unknown:
            raise FederationError(f"pilot radios for agents {unknown}, not pilots of the run")
        #: the two servers' auditors' key pairs (the launcher of a one-machine simulation
        #: holds both, as it holds every process's state; each server gets only its own
        #: auditor's public key, so no key opens both transcripts)
        self.audit_dir = root.parent / "audit"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: the environment of every process it starts
        self.env = _free_env()
        self._tokens: list[str] = []

    # -- processes ----------------------------------------------------------------------------
    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "decentsim", *args]

    def _spawn(self, name: str, args: list[str], log_dir: Path) -> None:
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.insecure:
            args = [*args, "--insecure"]
        with (log_dir / "stderr.log").open("ab") as err:
            self.procs[name] = subprocess.Popen(
                self._cli(*args), stdout=subprocess.DEVNULL, stderr=err, env=self.env
            )

    def _port(self, state_dir: Path, name: str, timeout_s: float = 60.0) -> list[int]:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            path = state_dir / "port"
            if path.exists():
                return [int(x) for x in path.read_text().split()]
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise FederationError(
                    f"{name} exited with {proc.returncode} before listening; see "
                    f"{state_dir / 'stderr.log'}: {self._tail(state_dir)}"
                )
            time.sleep(0.05)
        raise FederationError(f"{name} did not start listening within {timeout_s:.0f} s")

    @staticmethod
    def _tail(state_dir: Path) -> str:
        path = state_dir / "stderr.log"
        return path.read_text(errors="replace")[-600:] if path.exists() else ""

    def _run_cli(self, *commands: Sequence[str]) -> None:
        """Run CLI commands side by side (each start-up imports the stack, ~1.5 s) and wait
        for all of them."""
        running = [
            (args, subprocess.Popen(self._cli(*args), env=self.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE))
            for args in commands
        ]  # fmt: skip
        failed = []
        for args, proc in running:
            _, err = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"decentsim {' '.join(args[:2])} failed: {err.decode()[-600:]}")
        if failed:
            raise FederationError("; ".join(failed))

    def start(self) -> None:
        """Create identities, mint tokens and start every process."""
        self.start_servers()
        for i in range(self.simulated_pools):
            self.start_pool(i)
        for agent in self.pilot_radios:
            self.start_pilot(agent)

    def start_servers(self) -> None:
        """Create identities, mint one enrolment token per simulated pool, start both servers;
        then, in a run with pilots, one enrolment URI per pilot (``pilot enrol``)."""
        token_file = self.c_dir / "tokens.txt"
        self.prepare(token_file if self.simulated_pools else None)
        self._tokens = token_file.read_text().split() if self.simulated_pools else []
        self.start_aggregator()
        self.start_coordinator()
        if self.spec.pilots:
            self._run_cli([
                "pilot", "enrol", "--state-dir", str(self.c_dir),
                "--run", str(self.root / "run.json"),
                "--coordinator", f"127.0.0.1:{self.c_port}",
                "--enrol", f"127.0.0.1:{self.enrol_port}", "--out", str(self.enrolment_dir),
            ])  # fmt: skip

    @property
    def enrolment_dir(self) -> Path:
        """Where ``pilot enrol`` wrote each pilot's enrolment URI and QR code."""
        return self.root / "enrolment"

    def prepare(self, token_file: Path | None = None) -> None:
        """Both servers' identities (each server's own CLI, side by side), the simulated
        world's beacon secret and the run file; with ``token_file``, one enrolment token per
        simulated pool written there (``coordinator tokens`` creates the identity first)."""
        self.root.mkdir(parents=True, exist_ok=True)
        coordinator = ["coordinator", "init", "--state-dir", str(self.c_dir)]
        if token_file is not None:
            count = str(self.simulated_pools)
            coordinator = ["coordinator", "tokens", "--state-dir", str(self.c_dir),
                           "--count", count, "--out", str(token_file)]  # fmt: skip
        self._run_cli(coordinator, ["aggregator", "init", "--state-dir", str(self.a_dir)])
        write_secret(self.world_secret, os.urandom(16))
        (self.root / "run.json").write_text(self.spec.to_json())
        # with record_views, each server records a transcript sealed to its own auditor (one
        # key opening both would be the C + A collusion); the ground truth's population seed
        if self.record_views:
            for role in ("coordinator", "aggregator"):
                create_auditor_keys(self.audit_dir, role)
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        (self.audit_dir / "truth.json").write_text(
            json.dumps({"population_seed": self.population_seed})
        )

    def audit_key(self, role: str) -> Path:
        """The public key of ``role``'s auditor: what that server, and only it, records to."""
        return auditor_files(self.audit_dir, role)[1]

    def _audit_flags(self, role: str) -> list[str]:
        return ["--audit-key", str(self.audit_key(role))] if self.record_views else []

    @property
    def world_secret(self) -> Path:
        """The file of the simulated world's beacon secret (shared by the pools)."""
        return self.root / "world-secret"

    def start_aggregator(self) -> None:
        """Start (or restart) the aggregator on a fresh port."""
        (self.a_dir / "port").unlink(missing_ok=True)
        self._spawn(
            "aggregator",
            ["aggregator", "serve", "--state-dir", str(self.a_dir), "--mode", self.spec.mode,
             "--coordinator-export", str(self.c_dir / "export"),
             "--listen", f"127.0.0.1:{self._a_port_hint()}",
             *self._audit_flags("aggregator"),
             "--min-cohort", str(self.spec.min_cohort),
             *dp_flags(self.spec)],
            self.a_dir,
        )  # fmt: skip
        (self.a_port,) = self._port(self.a_dir, "aggregator")

    def _a_port_hint(self) -> int:
        # a restarted aggregator takes its old port: the coordinator's channel reconnects to it
        return getattr(self, "a_port", 0)

    def start_coordinator(self) -> None:
        """Start (or restart: it resumes its stored run) the coordinator."""
        (self.c_dir / "port").unlink(missing_ok=True)
        fresh = not (self.c_dir / "coordinator.sqlite3").exists()
        run = ["--run", str(self.root / "run.json")] if fresh else []
        self._spawn(
            "coordinator",
            ["coordinator", "serve", "--state-dir", str(self.c_dir),
             "--aggregator", f"127.0.0.1:{self.a_port}",
             "--aggregator-export", str(self.a_dir / "export"),
             "--listen", f"127.0.0.1:{getattr(self, 'c_port', 0)}",
             "--enrol-listen", f"127.0.0.1:{getattr(self, 'enrol_port', 0)}",
             "--exit-when-finished", *self._audit_flags("coordinator"), *run],
            self.c_dir,
        )  # fmt: skip
        self.c_port, self.enrol_port = self._port(self.c_dir, "coordinator")

    def start_pool(self, i: int) -> None:
        """Start (or restart: it resumes from its store) pool ``i``."""
        d = self.pool_dirs[i]
        args = [
            "device-agent", "run", "--coordinator", f"127.0.0.1:{self.c_port}",
            "--ca", str(self.c_dir / "export" / "ca.pem"), "--state-dir", str(d),
            "--population", self.spec.population,
            "--population-seed", str(self.population_seed),
            "--slice", f"{i}/{self.simulated_pools}",
            "--world-secret", str(self.world_secret),
        ]  # fmt: skip
        if self.spec.pilots:
            args += ["--pilots", ",".join(map(str, self.spec.pilots))]
        if not (d / "pool.sqlite3").exists():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            token = d / "token"
            write_secret(token, self._tokens[i].encode())
            args += ["--token-file", str(token), "--enrol", f"127.0.0.1:{self.enrol_port}"]
        self._spawn(f"pool-{i}", args, d)

    def pilot_dir(self, agent: int) -> Path:
        """The state dir of pilot ``agent``'s process (its private stores)."""
        return self.root / f"pilot-{agent}"

    def start_pilot(self, agent: int) -> None:
        """Start (or restart) the pilot device process of ``agent`` with its radio options,
        from its enrolment URI, as a pilot device starts."""
        d = self.pilot_dir(agent)
        args = [
            "device-agent", "run",
            "--enrolment-uri", str(self.enrolment_dir / f"pilot-{agent}.uri"),
            "--state-dir", str(d), "--population", self.spec.population,
            "--population-seed", str(self.population_seed),
            "--world-secret", str(self.world_secret),
            "--radio", "bumble", *self.pilot_radios[agent],
        ]  # fmt: skip
        self._spawn(f"pilot-{agent}", args, d)

    def pilots_enrolled(self) -> int:
        """How many pilot agents have enrolled a device (from the coordinator's database)."""
        conn = self._db()
        if conn is None:
            return 0
        try:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM credentials WHERE pilot_agent IS NOT NULL"
            ).fetchone()
        except sqlite3.OperationalError:  # the coordinator has not migrated its database yet
            return 0
        finally:
            conn.close()
        return int(n)

    def kill(self, name: str) -> None:
        """SIGKILL a process (``coordinator``, ``aggregator`` or ``pool-<i>``) and reap it."""
        proc = self.procs[name]
        proc.kill()
        proc.wait()

    # -- progress and results -----------------------------------------------------------------
    def _db(self) -> sqlite3.Connection | None:
        path = self.c_dir / "coordinator.sqlite3"
        if not path.exists():
            return None
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)

    def committed(self) -> int:
        """Days committed so far, over all epochs."""
        conn = self._db()
        if conn is None:
            return 0
        try:
            return int(conn.execute("SELECT COUNT(*) FROM days").fetchone()[0])
        except sqlite3.OperationalError:  # tables not created yet
            return 0
        finally:
            conn.close()

    def finished(self) -> bool:
        """Whether the coordinator recorded the run as finished."""
        conn = self._db()
        if conn is None:
            return False
        try:
            row = conn.execute("SELECT finished_unix FROM run").fetchone()
            return row is not None and row[0] is not None
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()

    def failure(self) -> str | None:
        """Why the coordinator stopped the run for good, if it did."""
        conn = self._db()
        if conn is None:
            return None
        try:
            row = conn.execute("SELECT failure FROM run").fetchone()
            return None if row is None else row[0]
        except sqlite3.OperationalError:  # tables not created yet
            return None
        finally:
            conn.close()

    def check_alive(self, allow: frozenset[str] = frozenset()) -> None:
        """Raise if the coordinator stopped the run, or a process died unexpectedly (its log
        tail in the message)."""
        failure = self.failure()
        if failure:
            raise FederationError(
                f"the coordinator stopped the run: {failure} (see {self.c_dir / 'coordinator.log'})"
            )
        for name, proc in self.procs.items():
            if name in allow or proc.poll() is None:
                continue
            # the coordinator and pools exit 0 at the run's end; the aggregator never should
            if proc.returncode == 0 and name != "aggregator":
                continue
            state = self.root / name
            raise FederationError(f"{name} exited with {proc.returncode}: {self._tail(state)}")

    def wait(
        self,
        until_days: int | None = None,
        timeout_s: float = 3600.0,
        progress: bool = False,
        allow_dead: frozenset[str] = frozenset(),
    ) -> None:
        """Wait for the run to finish (or ``until_days`` committed days)."""
        total = self.spec.days * self.spec.epochs
        deadline = time.time() + timeout_s
        with tqdm(total=total, unit="day", disable=not progress, file=sys.stderr) as bar:
            while True:
                n = self.committed()
                bar.update(n - bar.n)
                if (until_days is not None and n >= until_days) or (
                    until_days is None and self.finished()
                ):
                    return
                self.check_alive(allow_dead)
                if time.time() > deadline:
                    raise FederationTimeout(f"run not finished after {timeout_s:.0f} s ({n} days)")
                time.sleep(0.1)

    def results(self) -> dict[str, Any]:
        """The public results from the coordinator's database."""
        conn = self._db()
        if conn is None:
            raise FederationError("the coordinator never created its database")
        try:
            epochs = conn.execute(
                "SELECT epoch, theta, loss, grad FROM epochs ORDER BY epoch"
            ).fetchall()
            # the last finished epoch, or the one in progress when none has finished yet
            last = max((e for e, _, loss, _ in epochs if loss is not None), default=0)
            rows = conn.execute(
                "SELECT y, bytes_in FROM days WHERE epoch = ? ORDER BY day", (last,)
            ).fetchall()
            total_bytes = int(
                conn.execute("SELECT COALESCE(SUM(bytes_in), 0) FROM days").fetchone()[0]
            )
            behaviour = conn.execute(
                "SELECT row, source FROM behaviour_rows WHERE epoch = ? ORDER BY period", (last,)
            ).fetchall()
        finally:
            conn.close()
        width = WIDTH
        flat = [np.frombuffer(r[0], "<f8") for r in rows]
        y = (np.stack(flat) if flat else np.zeros((0, 0))).reshape(
            -1, len(OBSERVATIONS), len(AGE_GROUPS), width
        )
        grad = next((json.loads(g) for e, _, _, g in epochs if e == last and g), None)
        loss = next((loss for e, _, loss, _ in epochs if e == last), None)
        return {
            "y": y,
            "loss": loss,
            "grad": dict(zip(BASE_PARAMS, grad, strict=True)) if grad else None,
            "epochs": [{"epoch": e, "theta": json.loads(t), "loss": lo} for e, t, lo, _ in epochs],
            "bytes_device_to_servers": total_bytes,
            "behaviour": self._table(behaviour),
        }

    def _table(self, rows: list[tuple[bytes, str]]) -> BehaviourTable | None:
        """The behaviour table the devices got in the reported epoch (None: heuristic)."""
        if not rows:
            return None
        grid = self.spec.archetype_grid()
        p = np.stack([np.frombuffer(r, "<f8").reshape(grid.n_cells, -1) for r, _ in rows])
        return BehaviourTable(grid, self.spec.period_days, p, rows[0][1])

    def stop(self) -> None:
        """Terminate every process still running."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_outputs(
    out: Path, fed: Federation, results: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """trajectory.csv, summary.json, federated.png and views/ in ``out``; returns the summary."""
    y = results["y"]
    totals = y[..., 0].sum(-1)  # (T, 2)
    daily = {name: totals[:, k].tolist() for k, name in enumerate(OBSERVATIONS)}
    out.mkdir(parents=True, exist_ok=True)
    with (out / "trajectory.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["day", *OBSERVATIONS])
        for d in range(len(totals)):
            # counts; with differential privacy on they carry the noise (not rounded away)
            w.writerow([d + 1, *(int(v) if float(v).is_integer() else float(v) for v in totals[d])])
    n_agents = from_spec(fed.spec.population, seed=fed.population_seed).n_agents
    summary = {
        "agents": n_agents,
        "days": fed.spec.days,
        "mode": fed.spec.mode,
        "radio": fed.spec.radio,
        "pools": fed.spec.pools,
        "wall_s": round(wall_s, 3),
        "bytes_device_to_servers": results["bytes_device_to_servers"],
        "daily": daily,
        "loss": results["loss"],
        "grad": results["grad"],
        "epochs": results["epochs"],
        "record_views": fed.record_views,
    }
    table = results["behaviour"]
    if table is not None:
        table.save(out / "behaviour_table.csv")
        summary["behaviour"] = {
            "kind": fed.spec.behaviour,
            "source": table.source,
            "periods": table.periods,
            "version": table.version,
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    views = out / "views"
    views.mkdir(exist_ok=True)
    for role, d in (("coordinator", fed.c_dir), ("aggregator", fed.a_dir)):
        for name in (f"{role}.jsonl", f"{role}.transcript"):  # the transcript is sealed
            src, dst = d / "views" / name, views / name
            if not src.exists():
                continue
            dst.unlink(missing_ok=True)
            try:  # a transcript is as large as the traffic: link it rather than copy
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    _plot(y, out / "federated.png", f"federated run ({fed.spec.mode}, {fed.spec.pools} pools)")
    return summary


def _plot(y: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(OBSERVATIONS), figsize=(5.5 * len(OBSERVATIONS), 4), constrained_layout=True
    )
    days = np.arange(1, y.shape[0] + 1)
    for k, ax in enumerate(axes):
        bottom = np.zeros(len(days))
        for g, group in enumerate(AGE_GROUPS):
            ax.bar(days, y[:, k, g, 0], bottom=bottom, label=group, width=0.9)
            bottom += y[:, k, g, 0]
        ax.set_title(OBSERVATIONS[k].replace("_", " "))
        ax.set_xlabel("day")
    axes[0].legend(title="age", fontsize=8)
    fig.suptitle(title + " — opened daily aggregates")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dp_flags(spec: RunSpec) -> list[str]:
    """``aggregator serve`` flags of the run's DP settings (A's operator sets the same)."""
    if spec.dp is None:
        return []
    return [
        "--dp-sigma", repr(float(spec.dp["sigma"])),
        "--dp-delta", repr(float(spec.dp["delta"])),
        "--dp-sensitivity", repr(float(spec.dp["l2_sensitivity"])),
    ]  # fmt: skip
