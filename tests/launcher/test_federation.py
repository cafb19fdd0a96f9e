"""Process-level tests of the simulated federation (``decentsim federated run``).

Every test starts the real processes (aggregator, coordinator, two device-pool agents) over
loopback with TLS through :class:`launcher.federation.Federation`, and checks what the
design promises of them:

- equivalence: the opened daily aggregates equal the central simulator's exactly and the
  gradient matches its forward-mode gradient (both posting modes), with the documented outputs;
- crash and resume: SIGKILL of the coordinator, the aggregator or a pool mid-day (a pool
  also right after its registration), each restarted, gives exactly the uninterrupted results
  (no contribution lost or counted twice, nobody dropped out);
- dropout: a pool killed for good drops out and the aggregates are exactly the survivors' sums;
- privacy: planted individual secrets and values never reach a server's files.

Runs are tiny (400 agents, 6 days). A day takes tens of milliseconds, so kills are
gated by freezing the pools (SIGSTOP): the coordinator then waits in an open day's step, and a
kill lands mid-day instead of after the run finished.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import signal
import sqlite3
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from audit.truth import bytes_needles, distinctive, float_needles
from contract.runspec import RunSpec
from device_agent.store import PoolStore, state_from_bytes
from launcher.federation import Federation, items_budget
from launcher.run import federated_run
from proto.decentsim.v1 import device_pb2 as pb
from sim import dual
from sim.model import OBSERVATIONS
from sim.params import BASE_PARAMS
from sim.populations import AGE_GROUPS, from_spec
from sim.runner import CentralSimulator, RunResult, total_infections

POPULATION = "synthetic:400"
POOLS = 2
#: θ with infections every day (and deaths in the 6-day equivalence run).
THETA = {"beta": 0.6, "mortality": 0.5, "init_frac": 0.05}
WIDTH = 1 + len(BASE_PARAMS)
#: Tolerance of a decoded tangent (fixed point; the ring's resolution is far finer).
TANGENT_ATOL = 1e-6


def make_spec(seed: int, days: int, mode: str = "mailbox", step_timeout_s: float = 60.0) -> RunSpec:
    """A test run: ideal radio, two pools; the population seed is the run seed."""
    return RunSpec(
        population=POPULATION,
        days=days,
        seed=seed,
        mode=mode,
        theta=dict(THETA),
        items_per_device=items_budget(from_spec(POPULATION, seed=seed), POOLS),
        advertising_intervals=4,
        radio="ideal",
        pools=POOLS,
        step_timeout_s=step_timeout_s,
    )


@functools.cache
def central(seed: int, days: int) -> RunResult:
    """The central simulator's forward-mode run of the same population, θ and seed."""
    spec = make_spec(seed, days)
    pop = from_spec(POPULATION, seed=seed)
    return CentralSimulator(pop, spec.model_config(), seed, dtype=torch.float64).run(
        spec.theta_object(), days, "forward"
    )


def central_values(seed: int, days: int) -> np.ndarray:
    """Central daily aggregates' values (T, 2, G)."""
    return dual.value(central(seed, days).y).detach().numpy()


def central_grad(seed: int, days: int) -> np.ndarray:
    """Central forward-mode ``d(total infections)/dθ`` (p,)."""
    _, grad = central(seed, days).loss_and_grad(total_infections)
    assert grad is not None
    return grad.numpy()


def pool_names() -> list[str]:
    """Process names of the pools."""
    return [f"pool-{i}" for i in range(POOLS)]


def await_days(fed: Federation, n: int, timeout_s: float = 120.0) -> int:
    """Poll tightly (a day takes tens of ms) until ``n`` days are committed; returns the count."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = fed.committed()
        if done >= n:
            return done
        fed.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"only {done} of {n} days committed after {timeout_s:.0f} s")
        time.sleep(0.005)


def await_open_day(
    fed: Federation, after_round: int = 0, timeout_s: float = 60.0
) -> tuple[int, int]:
    """With the pools frozen: wait until the coordinator has the next day open (and waits for
    them) under a round id > ``after_round``; returns (round id, day)."""
    db = fed.c_dir / "coordinator.sqlite3"
    deadline = time.monotonic() + timeout_s
    while True:
        done = fed.committed()
        rows = query(db, "SELECT round_id, day FROM rounds WHERE status = 'open'")
        if len(rows) == 1 and rows[0][1] == done and rows[0][0] > after_round:
            return rows[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no open day after {done} committed days: {rows}")
        time.sleep(0.01)


def signal_procs(fed: Federation, names: Iterable[str], sig: signal.Signals) -> None:
    """Send ``sig`` to those of the named processes (started by ``fed``) still running."""
    for name in names:
        proc = fed.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)


@contextlib.contextmanager
def running(fed: Federation) -> Iterator[Federation]:
    """Start ``fed``; on exit resume any frozen process and stop them all."""
    try:
        fed.start()
        yield fed
    finally:
        signal_procs(fed, list(fed.procs), signal.SIGCONT)
        fed.stop()


def query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read-only query of a process's SQLite database (safe while it runs: WAL)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def view_events(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a view log, each checked to carry ``t`` and ``event``."""
    events = [json.loads(line) for line in path.read_text().splitlines() if line]
    for e in events:
        assert isinstance(e["t"], float | int) and isinstance(e["event"], str), e
    return events


def observed(fed: Federation, i: int) -> dict[int, np.ndarray]:
    """Pool ``i``'s own daily observation totals, (2, G, 1 + p) by day (its private store)."""
    store = PoolStore(fed.pool_dirs[i])
    try:
        rows = store.observed(0)
    finally:
        store.db.close()
    return {d: y.reshape(len(OBSERVATIONS), len(AGE_GROUPS), WIDTH) for d, y in rows.items()}


def assert_equals_central(y: np.ndarray, seed: int, days: int) -> None:
    """Opened aggregates (T, 2, G, 1 + p): values exactly central, tangents to fixed point."""
    ref = central(seed, days).y.detach().numpy()
    assert y.shape == ref.shape
    np.testing.assert_array_equal(y[..., 0], ref[..., 0])
    np.testing.assert_allclose(y[..., 1:], ref[..., 1:], rtol=0, atol=TANGENT_ATOL)


# -- 1. equivalence (and the run's outputs) ---------------------------------------------------
EQ_SEED, EQ_DAYS = 7, 6


@dataclass(frozen=True)
class Finished:
    """A finished ``federated_run``: its spec, out dir, summary and public results."""

    spec: RunSpec
    out: Path
    summary: dict[str, Any]
    fed: Federation
    results: dict[str, Any]


@pytest.fixture(scope="module", params=["mailbox", "shuffled", "dense"])
def finished(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """One whole federated run per posting mode (shared by the equivalence and privacy tests)."""
    spec = make_spec(EQ_SEED, EQ_DAYS, mode=request.param)
    out = tmp_path_factory.mktemp(f"federated-{request.param}")
    summary = federated_run(spec, out, EQ_SEED, timeout_s=300)
    fed = Federation(out / "state", spec, EQ_SEED)
    return Finished(spec, out, summary, fed, fed.results())


def test_federated_run_equals_central(finished: Finished) -> None:
    """Daily aggregates equal the central run's exactly, per age group and in total; the
    gradient matches the central forward-mode gradient; the documented outputs exist."""
    spec, out, summary = finished.spec, finished.out, finished.summary
    ref = central_values(EQ_SEED, EQ_DAYS)
    assert ref[:, 0].sum() > 0 and ref[:, 1].sum() > 0, "θ must give infections and deaths"

    assert_equals_central(finished.results["y"], EQ_SEED, EQ_DAYS)
    totals = ref.sum(-1)  # (T, 2)
    for k, name in enumerate(OBSERVATIONS):
        assert summary["daily"][name] == totals[:, k].tolist()
    loss_c = float(total_infections(torch.from_numpy(ref)))
    assert summary["loss"] == loss_c
    grad_f = np.array([summary["grad"][n] for n in BASE_PARAMS])
    grad_c = central_grad(EQ_SEED, EQ_DAYS)
    assert np.abs(grad_c).max() > 1.0
    np.testing.assert_allclose(grad_f, grad_c, rtol=1e-6, atol=1e-9)

    # the summary's documented keys and values
    assert summary["agents"] == 400
    assert summary["days"] == EQ_DAYS
    assert summary["mode"] == spec.mode
    assert summary["wall_s"] > 0
    assert summary["bytes_device_to_servers"] > 0
    assert set(summary["grad"]) == set(BASE_PARAMS)
    assert json.loads((out / "summary.json").read_text()) == summary

    # trajectory.csv: one row a day, the opened totals as integers
    with (out / "trajectory.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["day", *OBSERVATIONS]
    assert [[int(v) for v in r] for r in rows[1:]] == [
        [d + 1, *(int(v) for v in totals[d])] for d in range(EQ_DAYS)
    ]
    assert (out / "federated.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the views: the coordinator's opened totals per day, the aggregator's round openings
    c_events = view_events(out / "views" / "coordinator.jsonl")
    aggregates = [e for e in c_events if e["event"] == "aggregate"]
    assert [e["day"] for e in aggregates] == list(range(EQ_DAYS))
    assert [e["totals"] for e in aggregates] == totals.tolist()
    assert not [e for e in c_events if e["event"] in ("dropout", "abort")]
    a_events = view_events(out / "views" / "aggregator.jsonl")
    opened = {(e["deployment"], e["round"]) for e in a_events if e["event"] == "open_round"}
    rounds = {e["round"] for e in aggregates}
    assert opened == {(d, r) for d in ("neighbourhood", "aggregates") for r in rounds}

    # both pools contributed every day, and each pool's own totals add up to the aggregates
    db = finished.fed.c_dir / "coordinator.sqlite3"
    days = query(db, "SELECT day, surviving_messages, surviving_observations FROM days")
    # shuffled items carry no sender, so its surviving set counts (padded) items, not senders
    messages = 400 * spec.items_per_device if spec.mode == "shuffled" else POOLS
    assert sorted(days) == [(d, messages, POOLS) for d in range(EQ_DAYS)]
    own = [observed(finished.fed, i) for i in range(POOLS)]
    for d in range(EQ_DAYS):
        np.testing.assert_array_equal(sum(o[d][..., 0] for o in own), ref[d])
    # every pool keeps its devices' contact log of each day it took part in
    for d in finished.fed.pool_dirs:
        kept = PoolStore(d).trace_days()
        assert [day for _, day, _ in kept] == list(range(EQ_DAYS))
        assert all(entries > 0 for _, _, entries in kept)


# -- 2. crash and resume ----------------------------------------------------------------------
CRASH_SEED, CRASH_DAYS = 5, 6

#: An attempt a kill interrupted: (round id, day, how the coordinator learns of it: "restart"
#: when it is the coordinator that restarted, "link" when the aggregator lost the round).
Interrupted = tuple[int, int, str]


def participants(fed: Federation, i: int) -> set[str]:
    """Pool ``i``'s participant ids (hex, as the coordinator's view names them)."""
    ((blob,),) = query(fed.pool_dirs[i] / "pool.sqlite3", "SELECT enrolment FROM credential")
    return {bytes(d.value).hex() for d in pb.EnrolResponse.FromString(bytes(blob)).devices}


def in_view(fed: Federation, event: str, round_id: int, who: set[str]) -> bool:
    """Whether the coordinator's view records ``event`` in ``round_id`` by one of ``who``."""
    text = (fed.c_dir / "views" / "coordinator.jsonl").read_text()
    # only whole lines: the coordinator may be appending one right now
    for line in text.split("\n")[:-1]:
        e = json.loads(line)
        if e["event"] == event and e["round"] == round_id and e["participant"] in who:
            return True
    return False


def await_view(
    fed: Federation,
    event: str,
    round_id: int,
    who: set[str],
    allow_dead: frozenset[str] = frozenset(),
    timeout_s: float = 60.0,
) -> None:
    """Wait until the coordinator's view records ``event`` in ``round_id`` by one of ``who``."""
    deadline = time.monotonic() + timeout_s
    while not in_view(fed, event, round_id, who):
        fed.check_alive(allow_dead)
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} in round {round_id} after {timeout_s:.0f} s")
        time.sleep(0.01)


def freeze_with_day_open(fed: Federation, pools: list[str]) -> tuple[int, int]:
    """Once a day is committed, freeze ``pools``; returns the next day's open (round, day)."""
    await_days(fed, 1)
    signal_procs(fed, pools, signal.SIGSTOP)
    assert fed.committed() < CRASH_DAYS, "the run finished before the kill"
    return await_open_day(fed)


def kill_frozen(fed: Federation, role: str) -> list[Interrupted]:
    """With the pools frozen and a day open (the coordinator waiting for them, at whatever
    step they reached), SIGKILL ``role`` and start it again: a server resumes from its
    database (the aggregator on its old port), a pool from its store."""
    pools = pool_names()
    round_id, day = freeze_with_day_open(fed, pools)
    fed.kill(role)
    if role == "coordinator":
        fed.start_coordinator()
    elif role == "aggregator":
        fed.start_aggregator()
    else:
        fed.start_pool(int(role.removeprefix("pool-")))
    signal_procs(fed, pools, signal.SIGCONT)
    if role == "coordinator":
        return [(round_id, day, "restart")]
    return [(round_id, day, "link")] if role == "aggregator" else []


def kill_coordinator_then_aggregator(fed: Federation) -> list[Interrupted]:
    """Kill and restart the coordinator with the pools frozen: it re-opens the day under a new
    round id, in which no pool can have registered yet. Then kill and restart the aggregator,
    and let the pools go: every registration reaches an aggregator that lost the round (a
    request C relays to A mid-step, not one it holds until the step ends)."""
    pools = pool_names()
    first, day = freeze_with_day_open(fed, pools)
    fed.kill("coordinator")
    fed.start_coordinator()
    second, again = await_open_day(fed, after_round=first)
    assert again == day
    fed.kill("aggregator")
    fed.start_aggregator()
    signal_procs(fed, pools, signal.SIGCONT)
    return [(first, day, "restart"), (second, day, "link")]


def kill_pool_after_registration(fed: Federation) -> list[Interrupted]:
    """SIGKILL pool 0 once it registered in the open day, and restart it only after that day's
    registration closed: the new process must still fetch the sums of the slots its
    predecessor registered, and the day goes on without an abort."""
    open_round, _ = freeze_with_day_open(fed, ["pool-1"])  # pool 1 holds the day open
    await_view(fed, "RegisterSlots", open_round, participants(fed, 0))
    fed.kill("pool-0")
    signal_procs(fed, ["pool-1"], signal.SIGCONT)
    # pool 1 posts its messages only once registration has closed
    dead = frozenset({"pool-0"})
    await_view(fed, "PostShares", open_round, participants(fed, 1), allow_dead=dead)
    fed.start_pool(0)
    return []


@pytest.mark.parametrize(
    "scenario",
    [
        "coordinator",
        "aggregator",
        "pool-0",
        "coordinator-then-aggregator",
        "pool-0-registered",
        "aggregator-dense",
    ],
)
def test_killed_process_resumes_to_the_uninterrupted_results(tmp_path: Path, scenario: str) -> None:
    """SIGKILL a process while a day is open (after a committed day) and restart it: the
    finished run equals the central, uninterrupted one exactly (no contribution lost or
    counted twice), no participant drops out, and only an interrupted server attempt is
    aborted, its day re-run under a later round id.

    ``coordinator``, ``aggregator``, ``pool-0``: killed at whatever point the frozen pools
    reached. ``coordinator-then-aggregator``: the aggregator dies while every pool's
    registration is still to come. ``pool-0-registered``: restarted after its registration
    closed. ``aggregator-dense``: the aggregator, in a dense-mode run."""
    mode = "dense" if scenario.endswith("-dense") else "mailbox"
    scenario = scenario.removesuffix("-dense")
    spec = make_spec(CRASH_SEED, CRASH_DAYS, mode=mode, step_timeout_s=20.0)
    fed = Federation(tmp_path / "state", spec, CRASH_SEED)
    db = fed.c_dir / "coordinator.sqlite3"
    with running(fed):
        if scenario == "coordinator-then-aggregator":
            interrupted = kill_coordinator_then_aggregator(fed)
        elif scenario == "pool-0-registered":
            interrupted = kill_pool_after_registration(fed)
        else:
            interrupted = kill_frozen(fed, scenario)
        fed.wait(timeout_s=180)
        results = fed.results()

    # exact equality with the uninterrupted run
    ref = central_values(CRASH_SEED, CRASH_DAYS)
    assert_equals_central(results["y"], CRASH_SEED, CRASH_DAYS)
    grad_f = np.array([results["grad"][n] for n in BASE_PARAMS])
    np.testing.assert_allclose(grad_f, central_grad(CRASH_SEED, CRASH_DAYS), rtol=1e-6, atol=1e-9)
    assert results["loss"] == float(total_infections(torch.from_numpy(ref)))

    # exactly the interrupted attempts were aborted, each for its cause; after a link failure
    # the same day may take further attempts while C's channel to A reconnects
    rounds = query(db, "SELECT round_id, day, status, reason FROM rounds ORDER BY round_id")
    aborted = [(rid, day, reason) for rid, day, status, reason in rounds if status == "aborted"]
    n = len(interrupted)
    assert [a[:2] for a in aborted[:n]] == [i[:2] for i in interrupted], aborted
    for (_, _, reason), (_, _, cause) in zip(aborted, interrupted, strict=False):
        assert (reason == "restart") == (cause == "restart"), (reason, cause)
    for _, day, reason in aborted[n:]:
        assert interrupted and interrupted[-1][2] == "link", aborted
        assert day == interrupted[-1][1] and reason != "restart", aborted
    # every day committed exactly once, an aborted day under a later round id
    committed = dict(query(db, "SELECT day, round_id FROM days WHERE epoch = 0"))
    assert sorted(committed) == list(range(CRASH_DAYS))
    assert all(status in ("committed", "aborted") for _, _, status, _ in rounds)
    assert sorted(committed.values()) == [r[0] for r in rounds if r[2] == "committed"]
    assert all(committed[day] > rid for rid, day, _ in aborted)
    # no participant dropped out: every day holds both pools' contributions
    surviving = query(db, "SELECT surviving_messages, surviving_observations FROM days")
    assert surviving == [(POOLS, POOLS)] * CRASH_DAYS
    events = view_events(fed.c_dir / "views" / "coordinator.jsonl")
    assert [e for e in events if e["event"] == "dropout"] == []
    assert [e["round"] for e in events if e["event"] == "abort"] == [
        rid for rid, _, reason in aborted if reason != "restart"
    ]
    # the pools' own totals, kept across their restarts, add up to the committed aggregates
    own = [observed(fed, i) for i in range(POOLS)]
    for d in range(CRASH_DAYS):
        np.testing.assert_array_equal(sum(o[d][..., 0] for o in own), ref[d])


# -- 3. dropout -------------------------------------------------------------------------------
DROP_SEED, DROP_DAYS = 3, 6


def test_dead_pool_drops_out_and_aggregates_are_the_survivors_sums(tmp_path: Path) -> None:
    """Pool 1 is killed for good after day 0 is committed: the run finishes (short step
    deadline), and every later day's aggregate is exactly pool 0's own total."""
    spec = make_spec(DROP_SEED, DROP_DAYS, step_timeout_s=4.0)
    fed = Federation(tmp_path / "state", spec, DROP_SEED)
    pool1 = fed.pool_dirs[1] / "pool.sqlite3"
    with running(fed):
        await_days(fed, 1)
        # pool 1 keeps its total just after posting it: wait for that too (milliseconds)
        while not query(pool1, "SELECT day FROM observed"):
            time.sleep(0.005)
        fed.kill("pool-1")
        killed_at = fed.committed()
        assert killed_at < DROP_DAYS, "the run finished before the pool could be killed"
        fed.wait(timeout_s=180, allow_dead=frozenset({"pool-1"}))
        results = fed.results()
    assert fed.finished()
    y = results["y"]
    assert y.shape == (DROP_DAYS, len(OBSERVATIONS), len(AGE_GROUPS), WIDTH)
    db = fed.c_dir / "coordinator.sqlite3"
    survivors = dict(query(db, "SELECT day, surviving_observations FROM days WHERE epoch = 0"))
    own0, own1 = observed(fed, 0), observed(fed, 1)
    assert sorted(own0) == list(range(DROP_DAYS))
    # pool 1 kept its totals for days 0..last1 (it posted them before saving); it died in or
    # before day last1 + 1, whose contribution may or may not have reached the servers
    last1 = max(own1)
    assert 0 <= last1 < DROP_DAYS - 2, f"pool 1 lived too long ({last1 + 1} days)"
    for d in range(DROP_DAYS):
        if d <= last1:
            assert survivors[d] == 2
            expected = own0[d] + own1[d]
        elif d == last1 + 1 and survivors[d] == 2:
            # posted its observations, killed before keeping them: its counts are there
            extra = y[d, :, :, 0] - own0[d][..., 0]
            assert (extra >= 0).all() and np.array_equal(extra, np.round(extra))
            continue
        else:
            assert survivors[d] == 1, f"day {d}: the dead pool counted"
            expected = own0[d]
        np.testing.assert_array_equal(y[d, :, :, 0], expected[..., 0], err_msg=f"day {d}")
        np.testing.assert_allclose(y[d, :, :, 1:], expected[..., 1:], atol=TANGENT_ATOL)
    # the distinction is real: pool 1 contributed while alive, and after its death the opened
    # totals are not the whole population's
    assert sum(own1[d][..., 0].sum() for d in own1) > 0
    after = range(last1 + 2, DROP_DAYS)
    ref = central_values(DROP_SEED, DROP_DAYS)
    assert any(not np.array_equal(y[d, :, :, 0], ref[d]) for d in after)
    # the coordinator recorded the dropout: one participant (pool 1's only one), once
    events = view_events(fed.c_dir / "views" / "coordinator.jsonl")
    dropouts = [e for e in events if e["event"] == "dropout"]
    assert len(dropouts) == 1 and dropouts[0]["participants"] == 1, dropouts
    assert dropouts[0]["step"] in ("register", "messages", "fetch", "observations")


# -- 4. privacy: planted individual values never reach a server -------------------------------
#: Server-side files to scan, relative to the run's out dir (state/ holds every process).
SERVER_SCOPE = ("state/coordinator", "state/aggregator", "views", "summary.json", "trajectory.csv")


def planted(fed: Finished) -> dict[str, list[bytes]]:
    """What no server may ever hold, by label: each pool's secret, private key and devices'
    state tangents and own daily totals; the world's beacon secret."""
    y = fed.results["y"]
    public = {abs(float(v)) for v in y.ravel()}
    public |= {abs(float(v)) for v in fed.summary["grad"].values()}
    needles: dict[str, list[bytes]] = {}
    world = (fed.out / "state" / "world-secret").read_bytes()
    assert len(world) == 16
    needles["world secret"] = bytes_needles(world)
    for i, d in enumerate(fed.fed.pool_dirs):
        (key_pem, secret) = query(d / "pool.sqlite3", "SELECT key_pem, secret FROM credential")[0]
        needles[f"pool-{i} secret"] = bytes_needles(bytes(secret))
        key = serialization.load_pem_private_key(bytes(key_pem), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        needles[f"pool-{i} private key"] = [bytes(key_pem), *bytes_needles(scalar)]
        tangents = [
            state_from_bytes(bytes(blob)).x[..., 1:].numpy().ravel()
            for (blob,) in query(d / "pool.sqlite3", "SELECT state FROM states")
        ]
        states = distinctive(np.concatenate(tangents), public)
        assert len(states) >= 10, f"pool {i}: too few distinctive state values to plant"
        for j, v in enumerate(states[:40]):
            needles[f"pool-{i} device state tangent #{j}"] = float_needles(v)
        # the beacons its devices heard (the contact log): servers see only slots
        heard = query(d / "pool.sqlite3", "SELECT rpi FROM traces")
        rpis = np.frombuffer(b"".join(bytes(r) for (r,) in heard), np.uint8).reshape(-1, 16)
        assert len(rpis) > 0
        for j, rpi in enumerate(rpis[:: max(1, len(rpis) // 20)][:20]):
            needles[f"pool-{i} heard RPI #{j}"] = bytes_needles(bytes(rpi))
        own = np.concatenate([o[..., 1:].ravel() for o in observed(fed.fed, i).values()])
        for j, v in enumerate(distinctive(own, public)[:20]):
            needles[f"pool-{i} own daily total #{j}"] = float_needles(v)
    return needles


def files_under(root: Path, scope: Iterable[str]) -> list[Path]:
    """Every regular file in ``scope`` (files or directories, relative to ``root``)."""
    found: list[Path] = []
    for rel in scope:
        p = root / rel
        found += [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return found


def scan(files: Iterable[Path], needles: dict[str, list[bytes]]) -> list[tuple[str, str]]:
    """(label, file) for every needle found in a file's bytes."""
    hits: list[tuple[str, str]] = []
    for f in files:
        data = f.read_bytes()
        hits += [(label, str(f)) for label, ns in needles.items() if any(n in data for n in ns)]
    return hits


def test_servers_never_hold_planted_individual_values(finished: Finished, tmp_path: Path) -> None:
    """No server file (databases with their -wal/-shm, logs, stderr, views, keys, exports) nor
    the published outputs holds a pool's secret, key, devices' state values or own totals, or
    the world secret, in raw, hex or decimal form; the same scan finds them where they are."""
    needles = planted(finished)
    files = files_under(finished.out, SERVER_SCOPE)
    names = {f.name for f in files}
    assert {"coordinator.sqlite3", "aggregator.sqlite3", "coordinator.jsonl", "stderr.log"} <= names
    assert scan(files, needles) == []

    # the scan can fail: the pools' own stores hold their secrets and states in raw form
    for i, d in enumerate(finished.fed.pool_dirs):
        hits = {label for label, _ in scan([d / "pool.sqlite3"], needles)}
        assert f"pool-{i} secret" in hits
        assert f"pool-{i} private key" in hits
        assert f"pool-{i} device state tangent #0" in hits
    # … and a value leaked into a server file in any encoding is found
    label = "pool-0 device state tangent #3"
    for j, needle in enumerate(needles[label]):
        canary = tmp_path / f"canary-{j}.jsonl"
        view = (finished.out / "views" / "coordinator.jsonl").read_bytes()
        canary.write_bytes(view + b'{"event": "leak", "value": "' + needle + b'"}\n')
        assert scan([canary], needles) == [(label, str(canary))]
    number = struct.unpack("<d", needles[label][0])[0]
    canary = tmp_path / "canary-json.jsonl"
    canary.write_text(json.dumps({"event": "leak", "value": -number}))
    assert scan([canary], needles) == [(label, str(canary))]
