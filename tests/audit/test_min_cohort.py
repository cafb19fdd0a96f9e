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
from protocols.secure_sum.slots import SLOT_ID_BYTES

from .conftest import DIM, crafted

K = 14


def _registered(inp: AuditInput, group: int) -> list[list[bytes]]:
    """Each participant's slot group, in participant (fetch) order."""
    return [
        [ids[i : i + SLOT_ID_BYTES] for i in range(0, len(ids), SLOT_ID_BYTES)]
        for ids in (
            RegisterRequest.from_bytes(r.payload).slot_ids
            for r in inp.view.records
            if r.kind == "RegisterRequest" and r.direction == "in"
        )
    ]


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("mode", [Mode.MAILBOX, Mode.SHUFFLED])
def test_groups_below_the_minimum_are_released_as_zero(mode: Mode, group: int) -> None:
    """With a slot group per device-day (``group`` > 1) the cohort is the group's: its total
    is released, or zero when all its slots together hold fewer than K summands."""
    inp = crafted(mode, seed=5, min_cohort=K * group // 2 if group > 1 else K, group=group)[
        "coordinator"
    ]
    k = inp.min_cohort
    shares = shares_of(inp)
    # the servers' summand count per slot (padding dummies included), from C's own rows
    counts: dict[bytes, int] = defaultdict(int)
    rows = shares.rows["neighbourhood"]
    for i in range(len(rows)):
        counts[rows.slot[i].tobytes()] += 1
    assert inp.truth is not None
    true_sum: dict[bytes, np.ndarray] = defaultdict(lambda: np.zeros(DIM))
    for it in inp.truth.items():
        true_sum[it.slot] = true_sum[it.slot] + it.value
    suppressed = 0
    for slots, got in zip(_registered(inp, group), inp.config["fetched"], strict=True):
        assert len(slots) == group
        if sum(counts[s] for s in slots) < k:
            suppressed += 1
            assert np.array_equal(got, np.zeros(DIM))
        else:  # released totals are exact (the codec's resolution)
            np.testing.assert_allclose(got, sum(true_sum[s] for s in slots), atol=2**-15)
    assert 0 < suppressed < 40
    r = check_cohorts(inp, shares)
    assert r.status is not Status.FAIL, r.summary
    assert r.details["unit"] == ("slots" if group == 1 else "device-days (slot groups)")
    assert r.details["slots"] <= 40  # counted per group: at most one per participant
    assert r.details["released_below_min_cohort"] == 0
    assert r.details["suppressed_slots"] == suppressed
    assert 0 < r.details["suppressed_message_mass"] < 1


def test_run_spec_refuses_a_negative_minimum() -> None:
    with pytest.raises(RunSpecError, match="min_cohort must be >= 0, got -1"):
        RunSpec(population="synthetic:10", days=1, min_cohort=-1)
