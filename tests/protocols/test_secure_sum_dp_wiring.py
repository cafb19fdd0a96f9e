"""Differential privacy wired into the two-server protocol: both servers noise aggregate phases.

Checks the noise the servers actually add (scale against the configured σ, per server and in
total), its determinism per surviving set (re-openings and restarts re-add the same noise, a
different set gets independent noise), the servers' refusal to open a round under different DP
settings, the phase-spec validation, and the run-level plumbing (``RunSpec.dp``, the services'
persisted noise secrets).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from protocols.secure_sum import (
    AggregatorServer,
    CoordinatorServer,
    FixedPointCodec,
    InMemoryNetwork,
    Mode,
    PhaseSpec,
    RoundSpec,
    SecureSumError,
    SlotKind,
)
from protocols.secure_sum.dp import DPConfig, NoiseHeadroomError
from protocols.secure_sum.errors import AgreementError, UnknownRound
from protocols.secure_sum.protocol import spec_digest

CODEC = FixedPointCodec(frac_bits=16, max_abs=1000.0, max_summands=4096)
SLOTS = ("global/day/7", "region/BK/day/7")
DIM = 2500
#: false-failure probability of each statistical assertion
ALPHA = 1e-7


def dp_config(sigma: float = 0.5, dim: int = DIM, codec: FixedPointCodec = CODEC) -> DPConfig:
    return DPConfig.for_phase(codec, len(SLOTS), dim, sigma=sigma, delta=1e-6, l2_sensitivity=1.0)


def obs_spec(round_id: int, dp: DPConfig | None, dim: int = DIM) -> RoundSpec:
    return RoundSpec(round_id, (PhaseSpec("obs", dim, SlotKind.AGGREGATE, 1, SLOTS, dp),))


def values(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    # test data only (nothing secret): a fixed generator keeps the expected sums reproducible
    return np.random.default_rng(seed).uniform(-100.0, 100.0, (n, dim))


def run_round(
    net: InMemoryNetwork,
    spec: RoundSpec,
    vals: np.ndarray,
    ids: list[bytes],
    secrets: list[bytes] | None = None,
    post: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """Open ``spec``, let devices ``post`` (default all) send row i to ``global/day/7``, close,
    agree and open; returns the opened ring sums."""
    rid = spec.round_id
    net.open_round(spec)
    net.coordinator.close_registration(rid)
    for i in range(len(ids)) if post is None else post:
        dev = net.device(ids[i], secret=None if secrets is None else secrets[i])
        dev.post(spec, "obs", [SLOTS[0]], vals[i : i + 1])
    net.coordinator.close_phase(rid, "obs")
    return net.coordinator.open_aggregates_ring(rid, "obs")


def exact(vals: np.ndarray, rows: list[int] | None = None) -> np.ndarray:
    pick = vals if rows is None else vals[rows]
    return CODEC.encode(pick).sum(axis=0)


def ring_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a − b`` in Z_2^64 as signed int64 (the noise is far below 2^63)."""
    return (a.view(np.uint64) - b.view(np.uint64)).view(np.int64)


def assert_scale(noise: np.ndarray, sigma_ring: float) -> None:
    """``noise`` (ring units) is centred with standard deviation ``sigma_ring``: chi-square
    bounds on the sum of squares and a z bound on the mean, each failing falsely < ALPHA."""
    x = noise.astype(np.float64).ravel() / sigma_ring
    n = x.size
    ss = float(np.square(x).sum())
    lo, hi = stats.chi2.ppf(ALPHA / 2, n), stats.chi2.isf(ALPHA / 2, n)
    assert lo <= ss <= hi, f"empirical std {np.sqrt(ss / n):.4f}σ outside chi-square bounds"
    z = stats.norm.isf(ALPHA / 2)
    assert abs(x.mean()) <= z / np.sqrt(n), f"noise mean {x.mean():.4f}σ is not 0"


def test_opened_sums_are_exact_plus_noise_of_the_configured_scale() -> None:
    """Over 8 rounds × 2 slots × 2500 coordinates: C opens exact + n_C + n_A with std σ_total;
    A's released part alone carries σ_server; an empty slot opens as noise alone."""
    cfg = dp_config(sigma=0.5)
    net = InMemoryNetwork(Mode.MAILBOX, CODEC)
    ids = [os.urandom(16) for _ in range(3)]
    vals = values(3)
    total, a_part = [], []
    for rid in range(1, 9):
        spec = obs_spec(rid, cfg)
        opened = run_round(net, spec, vals, ids)
        want = np.stack([exact(vals), np.zeros(DIM, dtype=np.int64)])
        got = np.stack([opened[s] for s in SLOTS])
        total.append(ring_diff(got, want))
        # A's part: what A released minus A's own (noise-free) share sums
        acc = net.aggregator.rounds[rid].accumulators["obs"]
        raw, _ = acc.released_sums(np.arange(len(SLOTS)))
        released, _ = net.aggregator._released_aggregates(net.aggregator.rounds[rid], "obs")
        a_part.append(ring_diff(released, raw))
    noise = np.stack(total)
    assert np.count_nonzero(noise) > 0.99 * noise.size  # σ_ring ≈ 32768: zeros are rare
    assert_scale(noise, cfg.sigma_total * cfg.scale)
    assert_scale(np.stack(a_part), cfg.sigma_server_ring)
    assert cfg.sigma_server_ring == pytest.approx(cfg.sigma_total * cfg.scale / np.sqrt(2))
    # the decoded error is in real units and of the configured size
    decoded = CODEC.decode(noise)
    assert np.sqrt(np.mean(decoded**2)) == pytest.approx(cfg.sigma_total, rel=0.05)


def test_without_dp_the_sums_stay_exact() -> None:
    net = InMemoryNetwork(Mode.MAILBOX, CODEC)
    ids = [os.urandom(16) for _ in range(3)]
    vals = values(3)
    opened = run_round(net, obs_spec(1, None), vals, ids)
    np.testing.assert_array_equal(opened[SLOTS[0]], exact(vals))
    np.testing.assert_array_equal(opened[SLOTS[1]], np.zeros(DIM, dtype=np.int64))


def _restart(net: InMemoryNetwork) -> None:
    """Both servers restart with their keys and persisted noise secrets, but no round state."""
    a_secret, c_secret = net.aggregator.noise_secret, net.coordinator.noise_secret
    net.aggregator = AggregatorServer(net.a_keys, net.deployment)
    net.aggregator.noise_secret = a_secret
    net.coordinator = CoordinatorServer(net.c_keys, net.deployment, net._c_to_a)
    net.coordinator.noise_secret = c_secret
    net.directory_cache.clear()


def test_the_same_surviving_set_gets_the_same_noise_another_set_independent_noise() -> None:
    cfg = dp_config(sigma=0.5)
    net = InMemoryNetwork(Mode.MAILBOX, CODEC)
    ids = [os.urandom(16) for _ in range(4)]
    secrets = [os.urandom(32) for _ in range(4)]
    vals = values(4)
    spec = obs_spec(9, cfg)
    first = run_round(net, spec, vals, ids, secrets)
    # asking again (e.g. C lost A's reply) re-adds the identical noise at both servers
    again = net.coordinator.open_aggregates_ring(9, "obs")
    for s in SLOTS:
        np.testing.assert_array_equal(again[s], first[s])
    # after a restart of both servers (same keys and noise secrets) the same round with the
    # same surviving set opens to the same noisy sums: a retry cannot average the noise away
    _restart(net)
    replay = run_round(net, spec, vals, ids, secrets)
    for s in SLOTS:
        np.testing.assert_array_equal(replay[s], first[s])
    noise_all = ring_diff(first[SLOTS[0]], exact(vals))
    # another surviving set (device 3 drops out) is another release: independent noise
    _restart(net)
    other = run_round(net, spec, vals, ids, secrets, post=[0, 1, 2])
    noise_3 = ring_diff(other[SLOTS[0]], exact(vals, [0, 1, 2]))
    assert np.count_nonzero(noise_3 == noise_all) < DIM // 50
    r = stats.pearsonr(noise_all.astype(float), noise_3.astype(float))
    assert r.pvalue > ALPHA, "noise of different surviving sets is correlated"
    # and a server with another noise secret adds other noise to the same set
    _restart(net)
    net.aggregator.noise_secret = os.urandom(32)
    fresh = run_round(net, spec, vals, ids, secrets)
    assert np.count_nonzero(fresh[SLOTS[0]] == first[SLOTS[0]]) < DIM // 50


def test_the_servers_refuse_a_round_under_different_dp_settings() -> None:
    net = InMemoryNetwork(Mode.MAILBOX, CODEC)
    net.aggregator.open_round(obs_spec(3, dp_config(sigma=0.5)))
    with pytest.raises(AgreementError, match=r"round 3: C and A hold different round specs"):
        net.coordinator.open_round(obs_spec(3, dp_config(sigma=0.25)))
    assert 3 not in net.coordinator.rounds  # state unchanged at C
    with pytest.raises(AgreementError, match="DP settings"):
        net.coordinator.open_round(obs_spec(3, None))  # C without DP: refused too
    assert 3 not in net.coordinator.rounds
    net.coordinator.open_round(obs_spec(3, dp_config(sigma=0.5)))  # the same settings agree
    assert net.coordinator.rounds[3].spec.phases[0].dp == dp_config(sigma=0.5)


def test_the_aggregator_applies_its_operators_dp_settings_to_wire_specs() -> None:
    """A spec from the wire carries no DP; A attaches its operator's, so C must match them."""
    cfg = dp_config(sigma=0.5)
    net = InMemoryNetwork(Mode.MAILBOX, CODEC)
    net.aggregator.phase_dp["obs"] = cfg
    net.aggregator.open_round(obs_spec(4, None))  # as decoded from C's proposal
    assert net.aggregator.rounds[4].spec.phases[0].dp == cfg
    with pytest.raises(AgreementError, match="C and A hold different round specs"):
        net.coordinator.open_round(obs_spec(4, None))  # C runs without DP: refused
    net.coordinator.open_round(obs_spec(4, cfg))
    # a spec that names other DP settings than A's operator chose is refused outright
    with pytest.raises(AgreementError, match="phase 'obs': the spec's DP settings differ"):
        net.aggregator.open_round(obs_spec(5, dp_config(sigma=2.0)))
    assert 5 not in net.aggregator.rounds
    # and C's requests for a round A never opened stay an ordinary refusal
    with pytest.raises(UnknownRound):
        net.coordinator.close_registration(5)


def test_the_round_spec_digest_covers_the_dp_settings() -> None:
    plain = spec_digest(obs_spec(1, None))
    a = spec_digest(obs_spec(1, dp_config(sigma=0.5)))
    assert a == spec_digest(obs_spec(1, dp_config(sigma=0.5)))
    assert len({plain, a, spec_digest(obs_spec(1, dp_config(sigma=0.5000001)))}) == 3
    other_delta = replace(dp_config(sigma=0.5), delta=1e-5)
    assert spec_digest(obs_spec(1, other_delta)) != a


def test_phase_spec_validates_its_dp_config() -> None:
    cfg = dp_config()
    with pytest.raises(SecureSumError, match="differential privacy applies to aggregate phases"):
        PhaseSpec("messages", DIM, SlotKind.PSEUDONYM, 2, (), cfg)
    with pytest.raises(SecureSumError, match=r"dp.coordinates is 5000, .* 1 slot\(s\) × dim 2500"):
        PhaseSpec("obs", DIM, SlotKind.AGGREGATE, 1, SLOTS[:1], cfg)
    with pytest.raises(SecureSumError, match="dp must be a DPConfig, got dict"):
        PhaseSpec("obs", DIM, SlotKind.AGGREGATE, 1, SLOTS, {"sigma": 1.0})  # type: ignore[arg-type]


def test_a_round_whose_noise_could_wrap_is_refused_at_open() -> None:
    # a codec whose overflow bound fills the ring to 2^63 − 2^21 leaves too little headroom
    tight = FixedPointCodec(frac_bits=16, max_abs=2.0**26 - 2.0**-16, max_summands=2**21)
    net = InMemoryNetwork(Mode.MAILBOX, tight)
    spec = obs_spec(1, dp_config(sigma=1.0, dim=4, codec=tight), dim=4)
    with pytest.raises(NoiseHeadroomError, match="noise bound"):
        net.aggregator.open_round(spec)
    assert net.aggregator.rounds == {}


# -- run-level plumbing -------------------------------------------------------------------------
def test_run_spec_carries_dp_into_the_observations_phase() -> None:
    from contract.runspec import RunSpec, RunSpecError
    from contract.schedule import observations_dim, round_specs

    spec = RunSpec("synthetic:50", 3, dp={"sigma": 2.0, "delta": 1e-6, "l2_sensitivity": 1.5})
    assert RunSpec.from_json(spec.to_json()) == spec
    cfg = spec.dp_config()
    assert cfg is not None
    assert (cfg.sigma, cfg.delta, cfg.l2_sensitivity) == (2.0, 1e-6, 1.5)
    assert cfg.coordinates == observations_dim()
    _, obs = round_specs(7, 2, 4, 1, cfg)
    assert obs.phases[0].dp == cfg and obs.phases[0].aggregate_slots == ("global/day/2",)
    assert RunSpec("synthetic:50", 3).dp_config() is None
    with pytest.raises(RunSpecError, match=r"dp must have exactly the fields .* got \['sigma'\]"):
        RunSpec("synthetic:50", 3, dp={"sigma": 2.0})
    with pytest.raises(RunSpecError, match=r"dp\.delta: must be in"):
        RunSpec("synthetic:50", 3, dp={"sigma": 2.0, "delta": 1.5, "l2_sensitivity": 1.0})


def test_each_service_persists_its_own_noise_secret(tmp_path: Path) -> None:
    from aggregator.service import AggregatorService
    from contract.schedule import OBSERVATIONS_PHASE, observations_dp
    from coordinator.service import coordinator_init
    from identity.secret_files import NOISE_FILE, SecretFileError, load_noise_secret

    c_dir, a_dir = tmp_path / "c", tmp_path / "a"
    export = coordinator_init(c_dir, ("localhost",))
    c_secret = load_noise_secret(c_dir)
    assert (c_dir / NOISE_FILE).stat().st_mode & 0o777 == 0o600
    assert load_noise_secret(c_dir) == c_secret and len(c_secret) == 32
    cfg = observations_dp(1.0, 1e-6, 1.0)
    service = AggregatorService(a_dir, Mode.MAILBOX, export, dp=cfg)
    a_secret = service.servers["aggregates"].noise_secret
    assert service.servers["aggregates"].phase_dp == {OBSERVATIONS_PHASE: cfg}
    assert service.servers["neighbourhood"].phase_dp == {}
    service.stop()
    restarted = AggregatorService(a_dir, Mode.MAILBOX, export, dp=cfg)
    assert restarted.servers["aggregates"].noise_secret == a_secret  # survives the restart
    restarted.stop()
    assert a_secret != c_secret  # each server has its own
    # the secret is never in a file other than noise.json (view logs, databases, keys)
    for p in a_dir.rglob("*"):
        if p.is_file() and p.name != NOISE_FILE:
            data = p.read_bytes()
            assert a_secret not in data and a_secret.hex().encode() not in data, p
    (a_dir / NOISE_FILE).chmod(0o644)
    with pytest.raises(SecretFileError, match="readable by group/others"):
        load_noise_secret(a_dir)
