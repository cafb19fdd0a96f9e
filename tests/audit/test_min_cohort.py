"""The minimum cohort: both servers release slots of fewer summands as zeros, and the audit
verifies it (and fails a run that claims it without enforcing it, see test_checks)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from audit.checks import Status, check_cohorts, shares_of
from audit.views import AuditInput
from contract.runspec import RunSpec, RunSpecError
from protocols.secure_sum import Mode
from protocols.secure_sum.messages import RegisterRequest

from .conftest import DIM, crafted

K = 14


def _registered(inp: AuditInput) -> list[bytes]:
    """Each participant's registered slot, in participant (fetch) order."""
    return [
        RegisterRequest.from_bytes(r.payload).slot_ids
        for r in inp.view.records
        if r.kind == "RegisterRequest" and r.direction == "in"
    ]


@pytest.mark.parametrize("mode", [Mode.MAILBOX, Mode.SHUFFLED])
def test_slots_below_the_minimum_are_released_as_zero(mode: Mode) -> None:
    inp = crafted(mode, seed=5, min_cohort=K)["coordinator"]
    shares = shares_of(inp)
    # the servers' summand count per slot (padding dummies included), from C's own rows
    counts: dict[bytes, int] = defaultdict(int)
    rows = shares.rows["neighbourhood"]
    for i in range(len(rows)):
        counts[rows.slot[i].tobytes()] += 1
    assert inp.truth is not None
    true_sum: dict[bytes, np.ndarray] = defaultdict(lambda: np.zeros(DIM))
    for it in inp.truth.items:
        true_sum[it.slot] = true_sum[it.slot] + it.value
    suppressed = 0
    for slot, got in zip(_registered(inp), inp.config["fetched"], strict=True):
        if counts[slot] < K:
            suppressed += 1
            assert np.array_equal(got, np.zeros(DIM))
        else:  # released slots are exact (the codec's resolution)
            np.testing.assert_allclose(got, true_sum[slot], atol=2**-15)
    assert 0 < suppressed < 40
    r = check_cohorts(inp, shares)
    assert r.status is not Status.FAIL, r.summary
    assert r.details["released_below_min_cohort"] == 0
    assert r.details["suppressed_slots"] == suppressed
    assert 0 < r.details["suppressed_message_mass"] < 1


def test_run_spec_refuses_a_negative_minimum() -> None:
    with pytest.raises(RunSpecError, match="min_cohort must be >= 0, got -1"):
        RunSpec(population="synthetic:10", days=1, min_cohort=-1)
