"""The codecs of a run's two deployments bound what a participant posts, not one device."""

from __future__ import annotations

import numpy as np
import pytest

from contract.schedule import (
    MAX_DEVICES,
    OBSERVATION_MAX_ABS,
    UNIT_DEVICES,
    aggregates_codec,
)
from protocols.secure_sum import EncodingError, OverflowBoundError


def test_a_participant_posts_the_sum_of_its_devices_observations() -> None:
    """A participant's item is its devices' total: a pool's 1,024-device participant whose
    summed tangent is 1,113 (Astoria, day 16: a per-device bound refused it and stalled the
    round) encodes, up to UNIT_DEVICES × the per-device bound; beyond it is refused."""
    codec = aggregates_codec()
    assert codec.max_abs == OBSERVATION_MAX_ABS * UNIT_DEVICES
    ok = np.array([[37.0, -1113.0, 1113.25, OBSERVATION_MAX_ABS * UNIT_DEVICES]])
    np.testing.assert_array_equal(codec.decode(codec.encode(ok)), ok)
    with pytest.raises(EncodingError, match="exceeds max_abs"):
        codec.encode(np.array([[OBSERVATION_MAX_ABS * UNIT_DEVICES + 1]]))
    # the slot's total stays exact at the bound: MAX_DEVICES devices in full participants
    parts = MAX_DEVICES // UNIT_DEVICES
    assert codec.max_summands == parts
    full = np.full((parts, 1), OBSERVATION_MAX_ABS * UNIT_DEVICES)
    total = codec.encode(full).sum(axis=0, keepdims=True)
    assert codec.decode_sum(total, [parts])[0, 0] == OBSERVATION_MAX_ABS * MAX_DEVICES
    with pytest.raises(OverflowBoundError):
        codec.check_summands(parts + 1)
