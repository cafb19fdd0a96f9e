"""Ground truth of a federated run, from the pools' own stores (never from a server).

Each pool keeps, in ``state/pool-<i>/pool.sqlite3`` (see ``device_agent.agent.PoolStore``): its
credential and participant ids, its secret and private key, the start-of-day state of every
day, its contact log (heard RPIs and weights; the last ``TRACE_RETENTION_DAYS`` days) and its
own daily observation totals with the round they were posted in. From these the audit
recomputes, with the model's own functions, exactly what each participant contributed:

- **messages**: ``message(q, w)`` per heard RPI, summed per RPI within a participant (as the
  pool does), posted to ``pseudonym_slot(RPI)``; for every day whose contact log is kept;
- **observations**: the participant's daily total (pools of one participant; a pool of several
  participants stores only its grand total, so its observation items are left out).

It also collects the planted secrets no server may ever hold (the needles of the secrets scan),
and counts the store rows no contribution could be derived from (``Truth.unused``).
``audit/truth.json`` (written by ``federated run``) names the population seed; without it the
run seed is used, as ``federated run`` does. θ of later epochs and the opened aggregates (a lone
contributor's value may equal one) come from the coordinator's database tables ``epochs`` and
``days``: published results, not the coordinator's view.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from audit.views import ServerView, Truth, TruthBuilder, registrations, round_slot_keys
from contract.schedule import AGGREGATES, NEIGHBOURHOOD
from protocols.secure_sum.slots import SLOT_ID_BYTES

if TYPE_CHECKING:
    from contract.runspec import RunSpec


def float_needles(v: float) -> list[bytes]:
    """Encodings a float could leak in: raw float64 (both byte orders), their hex, and decimal
    text (shortest repr and 10 significant digits, sign dropped so ``-x`` matches too)."""
    raw = [struct.pack("<d", v), struct.pack(">d", v)]
    text = {repr(abs(v)), f"{abs(v):.10g}"}
    return [*raw, *(r.hex().encode() for r in raw), *(t.encode() for t in text)]


def bytes_needles(b: bytes) -> list[bytes]:
    """A secret's raw bytes and hex (lower and upper case)."""
    return [b, b.hex().encode(), b.hex().upper().encode()]


def distinctive(values: np.ndarray, public: set[float]) -> list[float]:
    """Values that identify an individual: not 0/±1, with ≥ 12 significant digits (≥ 10 when
    printed to 10 digits), and not within 10⁻⁹ (relative, up to sign) of a public aggregate — a
    lone contributor's value is public by design, and a needle's 10-digit decimal form must not
    match a published number."""
    pub = np.sort(np.asarray(sorted(public), dtype=np.float64))
    keep: list[float] = []
    for v in np.unique(values[np.isfinite(values)]).tolist():
        if abs(v) in (0.0, 1.0) or _near_public(abs(v), pub):
            continue
        # its full and its 10-digit decimal forms must both be long: a value next to a short
        # decimal (0.49999999999999994) would "match" every 0.5 in a file
        if _digits(repr(abs(v))) >= 12 and _digits(f"{abs(v):.10g}") >= 10:
            keep.append(v)
    return keep


def _digits(text: str) -> int:
    """Significant digits of a decimal float text (exponent excluded)."""
    mantissa = text.split("e")[0]
    return len(mantissa.replace(".", "").lstrip("0"))


def _near_public(v: float, pub: np.ndarray) -> bool:
    if not pub.size:
        return False
    i = int(np.searchsorted(pub, v))
    near = pub[max(i - 1, 0) : i + 1]
    return bool(np.any(np.abs(near - v) <= 1e-9 * max(v, 1e-300)))


def _query(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _thetas(run_dir: Path, spec: RunSpec) -> dict[int, torch.Tensor]:
    """θ of each epoch: the spec's for epoch 0, later ones from the coordinator's (public)
    epochs table."""
    from sim.params import PARAM_NAMES

    out = {0: torch.tensor([spec.theta[n] for n in PARAM_NAMES], dtype=torch.float64)}
    db = run_dir / "state" / "coordinator" / "coordinator.sqlite3"
    if db.exists():
        for epoch, theta in _query(db, "SELECT epoch, theta FROM epochs"):
            t = json.loads(theta)
            out[int(epoch)] = torch.tensor([t[n] for n in PARAM_NAMES], dtype=torch.float64)
    return out


def _behaviour_rows(run_dir: Path, spec: RunSpec) -> dict[tuple[int, int], torch.Tensor]:
    """A table/llm run's behaviour rows by (epoch, period), from the coordinator's (public)
    behaviour_rows table: each device drew its choices from its period's row."""
    db = run_dir / "state" / "coordinator" / "coordinator.sqlite3"
    if spec.behaviour == "heuristic" or not db.exists():
        return {}
    return {
        (int(epoch), int(period)): torch.from_numpy(np.frombuffer(raw, "<f8").reshape(-1, 2).copy())
        for epoch, period, raw in _query(db, "SELECT epoch, period, row FROM behaviour_rows")
    }


#: reasons a row of a pool's store yields no contribution (the keys of ``Truth.unused``)
NO_CREDENTIAL = "pool store without a credential (never enrolled)"
NO_ROUND = (
    "contact-log entry of a day without its round, start-of-day state, θ or behaviour row in "
    "the store"
)
UNREGISTERED = "heard RPI whose slot its owner did not register (nothing was posted to it)"


def load_truth(run_dir: Path, spec: RunSpec, view: ServerView) -> Truth | None:
    """The ground truth of a run dir, or ``None`` if it holds no pool store. ``view`` (the
    audited server's) says which slots were registered: a pool posts only to those."""
    from contract.schedule import UNIT_DEVICES, day_slot, slice_ids
    from contract.wire import deployment_from_pb
    from device_agent.pool import forward_theta
    from device_agent.store import state_from_bytes
    from proto.decentsim.v1 import device_pb2 as pb
    from protocols.secure_sum import aggregate_slot, pseudonym_slots
    from sim.archetypes import labour_force, population_cells
    from sim.model import behaviour, infectiousness, make_agents, message
    from sim.populations import from_spec

    pool_dirs = sorted(
        (p for p in (run_dir / "state").glob("pool-*") if (p / "pool.sqlite3").exists()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if not pool_dirs:
        return None
    meta_path = run_dir / "audit" / "truth.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    population = from_spec(spec.population, seed=int(meta.get("population_seed", spec.seed)))
    config = spec.model_config()
    _, cells = population_cells(population)
    workforce = labour_force(population)
    thetas = _thetas(run_dir, spec)
    table_rows = _behaviour_rows(run_dir, spec)
    directory = registrations(view, spec.advertising_intervals)
    registered_rounds = directory.rounds()
    unused: Counter[str] = Counter()
    builder = TruthBuilder()
    domains: dict[bytes, int] = {}
    needles: dict[str, list[bytes]] = {}
    notes: list[str] = []
    world = run_dir / "state" / "world-secret"
    if world.exists():
        needles["world beacon secret"] = bytes_needles(world.read_bytes())
    public = _public_values(run_dir)
    for pool_dir in pool_dirs:
        i = int(pool_dir.name.split("-")[1])
        db = pool_dir / "pool.sqlite3"
        cred = _query(db, "SELECT key_pem, enrolment, secret FROM credential")
        if not cred:
            unused[NO_CREDENTIAL] += 1
            continue
        key_pem, secret = bytes(cred[0][0]), bytes(cred[0][2])
        reply = pb.EnrolResponse.FromString(bytes(cred[0][1]))
        units = [bytes(d.value) for d in reply.devices]
        for u in units:
            domains[u] = i
        deployments = {d.deployment_id: deployment_from_pb(d) for d in reply.deployments}
        dkey = deployments[NEIGHBOURHOOD].deployment_key
        needles[f"pool-{i} secret"] = bytes_needles(secret)
        needles[f"pool-{i} private key"] = [key_pem]
        ids = slice_ids(population.n_agents, i, spec.pools)
        seeded = population.initially_infected
        agents = make_agents(
            ids,
            population.age_group[ids],
            config,
            spec.seed,
            None if seeded is None else seeded[ids],
            cells[ids],
            workforce[ids],
        )
        unit_of = (torch.arange(ids.numel()) // UNIT_DEVICES).numpy()
        rounds = {
            (int(e), int(d)): int(r)
            for e, d, r in _query(db, "SELECT epoch, day, round_id FROM observed")
        }
        states = {
            (int(e), int(d)): bytes(s)
            for e, d, s in _query(db, "SELECT epoch, day, state FROM states")
        }
        tangents = [state_from_bytes(raw).x[..., 1:].numpy().ravel() for raw in states.values()]
        # observations: one participant per pool → its total is that participant's item
        for (epoch, day), y in _observed(db).items():
            rid = rounds[(epoch, day)]
            if len(units) == 1:
                builder.add(
                    AGGREGATES, rid, units[0], aggregate_slot(day_slot(day)), y, int(ids.numel())
                )
            for j, v in enumerate(distinctive(y, public)[:10]):
                needles[f"pool-{i} own daily total (epoch {epoch} day {day}) #{j}"] = float_needles(
                    v
                )
        if len(units) > 1:
            notes.append(
                f"pool-{i} hosts {len(units)} participants: its observation items are not scored"
            )
        message_values: list[np.ndarray] = []
        for epoch, day, observer, rpi, weight in _traces(db):
            rid = rounds.get((epoch, day))
            raw = states.get((epoch, day))
            row = table_rows.get((epoch, day // spec.period_days))
            if (
                rid is None
                or raw is None
                or epoch not in thetas
                or (spec.behaviour != "heuristic" and row is None)
            ):
                unused[NO_ROUND] += len(observer)
                continue
            state = state_from_bytes(raw)
            th = forward_theta(thetas[epoch], config.grad)
            beh = behaviour(agents, state, th, config, spec.seed, day, row)
            q = infectiousness(agents, state, beh, th, config, day).detach()
            local = observer - int(ids[0])
            values = message(q[torch.from_numpy(local)], torch.from_numpy(weight)).numpy()
            has_round = rid in registered_rounds
            for u, unit in enumerate(units):
                rows = np.flatnonzero(unit_of[local] == u)
                keys = np.ascontiguousarray(rpi[rows]).view("V16").ravel()
                uniq_keys, inverse = np.unique(keys, return_inverse=True)
                uniq = uniq_keys.view(np.uint8).reshape(-1, 16)
                summed = np.zeros((len(uniq), values.shape[1]), dtype=np.float64)
                np.add.at(summed, inverse.reshape(-1), values[rows])
                devs = np.zeros(len(uniq), dtype=np.int64)
                np.add.at(devs, inverse.reshape(-1), 1)
                slots = pseudonym_slots(np.ascontiguousarray(uniq).tobytes(), rid, dkey)
                slot_ids = np.frombuffer(slots, np.uint8).reshape(-1, SLOT_ID_BYTES)
                ok = (
                    directory.registered(round_slot_keys(rid, slot_ids))
                    if has_round
                    else np.ones(len(uniq), dtype=bool)
                )
                unused[UNREGISTERED] += int((~ok).sum())
                builder.add(NEIGHBOURHOOD, rid, unit, slot_ids[ok].tobytes(), summed[ok], devs[ok])
                message_values.append(summed[:, 0])
            for j, r in enumerate(rpi[:: max(1, len(rpi) // 5)][:5]):
                needles[f"pool-{i} heard RPI (day {day}) #{j}"] = bytes_needles(bytes(r))
        for j, v in enumerate(
            distinctive(np.concatenate(tangents), public)[:40] if tangents else []
        ):
            needles[f"pool-{i} device state tangent #{j}"] = float_needles(v)
        if message_values:
            vals = distinctive(np.concatenate(message_values), public)
            for j, v in enumerate(vals[:20]):
                needles[f"pool-{i} message value #{j}"] = float_needles(v)
    kept = {d for _, d, *_ in _all_traces(pool_dirs)}
    if spec.days > len(kept):
        notes.append(
            f"message truth covers {len(kept)} of {spec.days} days (the contact log is kept for "
            "a limited number of days)"
        )
    return Truth(builder.tables(), domains, needles, notes, unused)


def _observed(db: Path) -> dict[tuple[int, int], np.ndarray]:
    return {
        (int(e), int(d)): np.frombuffer(bytes(y), "<f8").copy()
        for e, d, y in _query(db, "SELECT epoch, day, y FROM observed")
    }


def _traces(db: Path):
    for e, d, n, obs, rpi, w in _query(
        db, "SELECT epoch, day, entries, observer, rpi, weight FROM traces ORDER BY epoch, day"
    ):
        yield (
            int(e),
            int(d),
            np.frombuffer(bytes(obs), "<i8").astype(np.int64)[: int(n)],
            np.frombuffer(bytes(rpi), np.uint8).reshape(-1, 16),
            np.frombuffer(bytes(w), "<f8").copy(),
        )


def _all_traces(pool_dirs: list[Path]):
    for d in pool_dirs:
        for e, day in _query(d / "pool.sqlite3", "SELECT epoch, day FROM traces"):
            yield int(e), int(day)


def _public_values(run_dir: Path) -> set[float]:
    """Published aggregate values (a lone contributor's value may equal one, by design): the
    opened daily aggregates with their tangents, and the gradient."""
    out: set[float] = set()
    db = run_dir / "state" / "coordinator" / "coordinator.sqlite3"
    if db.exists():
        for (y,) in _query(db, "SELECT y FROM days"):
            out |= {abs(float(v)) for v in np.frombuffer(bytes(y), "<f8")}
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        for series in s.get("daily", {}).values():
            out |= {abs(float(v)) for v in series}
        out |= {abs(float(v)) for v in (s.get("grad") or {}).values()}
    return out
