"""Crafted audit inputs: a real in-memory secure-sum round whose servers record transcripts.

:func:`crafted` runs one round of the real protocol (``InMemoryNetwork``) with ``n`` participants
that each register one beacon and post known messages to the slots of a fixed contact graph;
the servers' observers record every message exactly as the sealed transcript would, and the
posted values are the ground truth. Tests then break one property at a time (a server that does
not shuffle, a plaintext deployment, a planted secret) and check the verdict flips.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from audit.views import AuditInput, RecordingObserver, ServerView, TrueItem, Truth
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
) -> AuditInput:
    """One round of ``n`` participants, each sending ``degree`` non-zero messages to the slots
    of its ring neighbours (participant i → i+1, …, i+degree), everyone fetching; both servers
    enforce ``min_cohort``."""
    kw = {}
    if a_permutation is not None:
        kw["a_permutation"] = a_permutation
    if c_permutation is not None:
        kw["c_permutation"] = c_permutation
    with warnings.catch_warnings():
        # the plaintext baseline warns on every party; that is its documented behaviour
        warnings.simplefilter("ignore", InsecurePlaintextWarning)
        return _crafted(mode, n, degree, seed, kw, min_cohort)


def _crafted(mode: Mode, n: int, degree: int, seed: int, kw: dict, min_cohort: int) -> AuditInput:
    codec = FixedPointCodec(16, 1024.0, 1024)
    net = InMemoryNetwork(mode, codec, deployment_key=DEPLOYMENT_KEY, **kw)
    rec = {
        "coordinator": RecordingObserver("coordinator"),
        "aggregator": RecordingObserver("aggregator"),
    }
    net.coordinator.observer = rec["coordinator"].bind("neighbourhood")
    net.aggregator.observer = rec["aggregator"].bind("neighbourhood")
    net.coordinator.min_cohort = net.aggregator.min_cohort = min_cohort
    spec = RoundSpec(ROUND, (PhaseSpec("messages", DIM, SlotKind.PSEUDONYM, ITEMS),))
    net.open_round(spec)
    ids = [bytes([i + 1]) * 16 for i in range(n)]
    rpis = [os.urandom(16) for _ in range(n)]
    clients = [net.device(pid, secret=bytes([i]) * 32) for i, pid in enumerate(ids)]
    slots = [c.register(ROUND, [rpi])[0] for c, rpi in zip(clients, rpis, strict=True)]
    assert slots[0] == pseudonym_slot(rpis[0], ROUND, DEPLOYMENT_KEY)
    net.coordinator.close_registration(ROUND)
    rng = np.random.default_rng(seed)
    items: list[TrueItem] = []
    for i, c in enumerate(clients):
        to = [(i + d) % n for d in range(1, degree + 1)]
        values = np.round(rng.uniform(0.5, 4.0, (degree, DIM)), 3)
        c.post(spec, "messages", [slots[j] for j in to], values)
        items += [
            TrueItem("neighbourhood", ROUND, ids[i], slots[j], values[k]) for k, j in enumerate(to)
        ]
    net.coordinator.close_phase(ROUND, "messages")
    fetched = [
        c.fetch(ROUND, "messages", [slot])[0] for c, slot in zip(clients, slots, strict=True)
    ]
    return AuditInput(
        mode=mode,
        codecs={"neighbourhood": codec},
        servers={
            "coordinator": ServerView(
                "coordinator", rec["coordinator"].records, {"neighbourhood": net.c_keys}
            ),
            "aggregator": ServerView(
                "aggregator", rec["aggregator"].records, {"neighbourhood": net.a_keys}
            ),
        },
        truth=Truth(items, {pid: i for i, pid in enumerate(ids)}),
        min_cohort=min_cohort,
        source=f"crafted {mode.value} round",
        config={"fetched": fetched},
    )


def identity(n: int) -> np.ndarray:
    """A 'shuffle' that keeps arrival order (a broken server)."""
    return np.arange(n, dtype=np.int64)


@pytest.fixture(scope="module")
def mailbox() -> AuditInput:
    return crafted(Mode.MAILBOX)


@pytest.fixture(scope="module")
def shuffled() -> AuditInput:
    return crafted(Mode.SHUFFLED)


@pytest.fixture(scope="module")
def plaintext() -> AuditInput:
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
