"""Crafted audit inputs: a real in-memory secure-sum round whose servers record transcripts.

:func:`crafted` runs one round of the real protocol (``InMemoryNetwork``) with ``n`` participants
that each register one beacon and post known messages to the slots of a fixed contact graph;
the servers' observers record every message exactly as the sealed transcript would, and the
posted values are the ground truth. It returns one audit input per server — the product audits
one server's view at a time. Tests then break one property at a time (a server that does not
shuffle, a plaintext deployment, a planted secret) and check the verdict flips.

:func:`colluding_recovery` is the coordinator + aggregator combination — outside the threat
model, so only here, where a test holds both in-memory views (as the launcher of a one-machine
simulation holds everything): they add their shares of each item, which must give back every
true value. It is the value-level check of the share extraction that no single server's audit
can make.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from audit.checks import shares_of
from audit.views import AuditInput, RecordingObserver, Rows, ServerView, TrueItem, Truth
from protocols.secure_sum import (
    FixedPointCodec,
    InMemoryNetwork,
    Mode,
    PhaseSpec,
    RoundSpec,
    SlotKind,
    pseudonym_slot,
)
from protocols.secure_sum.protocol import InsecurePlaintextWarning

DIM = 4
#: items each participant posts (real contacts + zero-valued dummies)
ITEMS = 16
ROUND = 7
DEPLOYMENT_KEY = bytes(range(32))


def crafted(
    mode: Mode,
    n: int = 40,
    degree: int = 3,
    seed: int = 1,
    a_permutation: Callable[[int], np.ndarray] | None = None,
    c_permutation: Callable[[int], np.ndarray] | None = None,
    min_cohort: int = 0,
    group: int = 1,
) -> dict[str, AuditInput]:
    """One round of ``n`` participants, each registering ``group`` beacons as one slot group
    and sending ``degree`` non-zero messages to a slot of each of its ring neighbours'
    groups (participant i → i+1, …, i+degree), everyone fetching its group's total; both
    servers enforce ``min_cohort``. One audit input per server (by role), sharing the ground
    truth."""
    kw = {}
    if a_permutation is not None:
        kw["a_permutation"] = a_permutation
    if c_permutation is not None:
        kw["c_permutation"] = c_permutation
    with warnings.catch_warnings():
        # the plaintext baseline warns on every party; that is its documented behaviour
        warnings.simplefilter("ignore", InsecurePlaintextWarning)
        return _crafted(mode, n, degree, seed, kw, min_cohort, group)


def _crafted(
    mode: Mode, n: int, degree: int, seed: int, kw: dict, min_cohort: int, group: int
) -> dict[str, AuditInput]:
    codec = FixedPointCodec(16, 1024.0, 1024)
    net = InMemoryNetwork(mode, codec, deployment_key=DEPLOYMENT_KEY, **kw)
    rec = {
        "coordinator": RecordingObserver("coordinator"),
        "aggregator": RecordingObserver("aggregator"),
    }
    net.coordinator.observer = rec["coordinator"].bind("neighbourhood")
    net.aggregator.observer = rec["aggregator"].bind("neighbourhood")
    net.coordinator.min_cohort = net.aggregator.min_cohort = min_cohort
    spec = RoundSpec(
        ROUND, (PhaseSpec("messages", DIM, SlotKind.PSEUDONYM, ITEMS, group_slots=group),)
    )
    net.open_round(spec)
    ids = [bytes([i + 1]) * 16 for i in range(n)]
    rpis = [[os.urandom(16) for _ in range(group)] for _ in range(n)]
    clients = [net.device(pid, secret=bytes([i]) * 32) for i, pid in enumerate(ids)]
    slots = [c.register(ROUND, r) for c, r in zip(clients, rpis, strict=True)]
    assert slots[0][0] == pseudonym_slot(rpis[0][0], ROUND, DEPLOYMENT_KEY)
    net.coordinator.close_registration(ROUND)
    rng = np.random.default_rng(seed)
    # which beacon of a neighbour's day was heard (its own stream: values stay as they were)
    beacon = np.random.default_rng(seed + 1000).integers(0, group, (n, degree))
    items: list[TrueItem] = []
    for i, c in enumerate(clients):
        to = [slots[(i + d) % n][beacon[i, d - 1]] for d in range(1, degree + 1)]
        values = np.round(rng.uniform(0.5, 4.0, (degree, DIM)), 3)
        c.post(spec, "messages", to, values)
        items += [
            TrueItem("neighbourhood", ROUND, ids[i], slot, values[k]) for k, slot in enumerate(to)
        ]
    net.coordinator.close_phase(ROUND, "messages")
    fetched = [c.fetch(ROUND, "messages", s, group)[0] for c, s in zip(clients, slots, strict=True)]
    truth = Truth.from_items(items, {pid: i for i, pid in enumerate(ids)})
    keys = {"coordinator": net.c_keys, "aggregator": net.a_keys}
    return {
        role: AuditInput(
            mode=mode,
            codecs={"neighbourhood": codec},
            view=ServerView(role, rec[role].records, {"neighbourhood": keys[role]}),
            truth=truth,
            min_cohort=min_cohort,
            source=f"crafted {mode.value} round",
            config={"fetched": fetched},
            group_slots=group,
        )
        for role in ("coordinator", "aggregator")
    }


def identity(n: int) -> np.ndarray:
    """A 'shuffle' that keeps arrival order (a broken server)."""
    return np.arange(n, dtype=np.int64)


def colluding_recovery(c: AuditInput, a: AuditInput) -> float:
    """The fraction of true contributions C + A recover by adding their shares of each item
    (mailbox: the same post and position; shuffled: the same contribution id), summed per
    (round, poster, slot) where the poster is known, else matched per item at its slot."""
    assert c.truth is not None and c.mode is a.mode
    c_shares, a_shares = shares_of(c), shares_of(a)
    recovered = total = 0
    for dep, codec in c.codecs.items():
        c_rows, a_rows = c_shares.rows.get(dep), a_shares.rows.get(dep)
        if c_rows is None or a_rows is None:
            continue
        index = {_item(a_rows, i, c.mode): i for i in range(len(a_rows))}
        by_poster: dict[tuple[int, bytes, bytes], np.ndarray] = {}
        at_slot: dict[tuple[int, bytes], list[np.ndarray]] = {}
        for i in range(len(c_rows)):
            j = index.get(_item(c_rows, i, c.mode))
            if j is None:
                continue
            value = c_rows.share[i] + a_rows.share[j]  # int64 wraps as the ring does
            rnd, slot = int(c_rows.round_id[i]), c_rows.slot[i].tobytes()
            if c_rows.known[i]:  # a poster's items to one slot add up
                key = (rnd, c_rows.participant[i].tobytes(), slot)
                by_poster[key] = by_poster.get(key, np.zeros_like(value)) + value
            else:
                at_slot.setdefault((rnd, slot), []).append(value)
        rounds = set(c_rows.round_id.tolist())
        for it in c.truth.items():
            if it.deployment != dep or it.round_id not in rounds:
                continue
            total += 1
            want = codec.encode(it.value.reshape(1, -1)).astype(np.int64).ravel()
            got = by_poster.get((it.round_id, it.participant, it.slot))
            candidates = [got] if got is not None else at_slot.get((it.round_id, it.slot), [])
            recovered += any(np.abs(v - want).max() <= 2 for v in candidates)
    return recovered / total if total else 0.0


def _item(rows: Rows, i: int, mode: Mode) -> tuple[int, bytes, int | bytes]:
    """The key both servers' rows of one item share."""
    if mode is Mode.SHUFFLED:
        return int(rows.round_id[i]), b"", rows.cid[i].tobytes()
    return int(rows.round_id[i]), rows.participant[i].tobytes(), int(rows.position[i])


@pytest.fixture(scope="module")
def mailbox() -> dict[str, AuditInput]:
    return crafted(Mode.MAILBOX)


@pytest.fixture(scope="module")
def shuffled() -> dict[str, AuditInput]:
    return crafted(Mode.SHUFFLED)


@pytest.fixture(scope="module")
def plaintext() -> dict[str, AuditInput]:
    return crafted(Mode.PLAINTEXT)


def write_files(root: Path, files: dict[str, bytes]) -> list[Path]:
    """Server-side files for the secrets scan (relative paths under ``root``)."""
    out = []
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o600)
        out.append(p)
    return out
