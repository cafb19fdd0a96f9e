"""Counter-based randomness: pinned vectors, purity, independence of streams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sim import rng

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rng.json").read_text())["cases"]


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: f"seed{c['seed']}-step{c['step']}")
def test_vectors(case: dict) -> None:
    seed, step, purpose = case["seed"], case["step"], case["purpose"]
    assert f"{rng.stream_key(seed, step, purpose):016x}" == case["stream_key"]
    expected = [float.fromhex(h) for h in case["uniform_hex"]]
    ids = torch.tensor(case["counters"], dtype=torch.int64)
    assert rng.uniform(seed, ids, step, purpose).tolist() == expected
    assert [rng.reference_uniform(seed, c, step, purpose) for c in case["counters"]] == expected
    steps = torch.full_like(ids, step)
    assert rng.uniform(seed, ids, steps, purpose).tolist() == expected


def test_a_subset_draws_what_the_whole_draws() -> None:
    ids = torch.arange(10_000)
    full = rng.uniform(3, ids, 5, rng.Purpose.INFECTION)
    pick = torch.tensor([9_999, 17, 4_242])
    assert torch.equal(rng.uniform(3, pick, 5, rng.Purpose.INFECTION), full[pick])


def test_float32_draws_are_the_top_bits_of_the_float64_draws() -> None:
    ids = torch.arange(1000)
    u64 = rng.uniform(1, ids, 2, 3, torch.float64)
    u32 = rng.uniform(1, ids, 2, 3, torch.float32)
    assert torch.equal(u32.double(), torch.floor(u64 * 2**24) / 2**24)


def test_streams_are_uniform_and_independent() -> None:
    ids = torch.arange(200_000)
    a = rng.uniform(0, ids, 0, rng.Purpose.INFECTION)
    b = rng.uniform(0, ids, 0, rng.Purpose.DEATH)
    c = rng.uniform(0, ids, 1, rng.Purpose.INFECTION)
    for u in (a, b, c):
        assert float(u.min()) >= 0 and float(u.max()) < 1
        counts = torch.histc(u.float(), bins=20, min=0, max=1)
        expected = len(u) / 20
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 45.0  # 19 dof: p ≈ 0.001
    for x, y in ((a, b), (a, c)):
        assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.01


def test_negative_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="step"):
        rng.uniform(0, torch.arange(3), -1, 1)
    with pytest.raises(ValueError, match="seed"):
        rng.uniform(-5, torch.arange(3), 0, 1)
    with pytest.raises(ValueError, match="step"):
        rng.uniform(0, torch.arange(3), torch.tensor([0, -1, 2]), 1)
    with pytest.raises(ValueError, match="dtype"):
        rng.uniform(0, torch.arange(3), 0, 1, torch.float16)
