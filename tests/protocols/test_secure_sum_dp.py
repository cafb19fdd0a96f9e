"""Differential privacy for aggregate slots: sampler, ring mapping, accounting, fidelity.

Statistical tests use thresholds from the exact sampling distributions at a false-failure
probability of at most ~1e-7 each, and fixed seeds, so they are deterministic in practice yet
would fail for a wrong variance, a biased or asymmetric sampler, or a wrong pmf.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import optimize, stats

from protocols.secure_sum import FixedPointCodec, OverflowBoundError, SecureSumError, WrongLength
from protocols.secure_sum.accountant import epsilon, epsilon_of, privacy_report, sigma_for, zcdp_rho
from protocols.secure_sum.accumulator import group_sum
from protocols.secure_sum.dp import (
    Accountant,
    Adversary,
    DPConfig,
    DPConfigError,
    NoiseHeadroomError,
    NoiseRng,
    NoiseSplit,
    add_noise,
    check_headroom,
    check_noisy_sum,
    fidelity_cost,
    noise_bound,
    noisy_share_sums,
    proposal_bound,
    sample_discrete_gaussian,
    server_noise,
)
from protocols.secure_sum.sharing import expand_seeds, split_rows

#: draws per statistical check: 10^6 resolve a 1 % variance error (and take ~0.1 s)
N = 1_000_000
#: two-sided false-failure probability per statistical check
ALPHA = 1e-7
Z = float(stats.norm.isf(ALPHA / 2))


def seed(tag: int) -> bytes:
    return bytes([tag]) * 32


def dg_pmf(sigma: float, ks: np.ndarray) -> np.ndarray:
    """Exact pmf of N_Z(0, σ²) on ``ks`` (normaliser summed far into the tails)."""
    support = np.arange(-int(60 * sigma) - 60, int(60 * sigma) + 61)
    norm = np.exp(-(support.astype(float) ** 2) / (2 * sigma**2)).sum()
    return np.exp(-(ks.astype(float) ** 2) / (2 * sigma**2)) / norm


def dg_moments(sigma: float) -> tuple[float, float]:
    """Exact variance and fourth moment of N_Z(0, σ²) (small σ: by summation)."""
    ks = np.arange(-int(60 * sigma) - 60, int(60 * sigma) + 61)
    p = dg_pmf(sigma, ks)
    return float((p * ks**2).sum()), float((p * ks.astype(float) ** 4).sum())


def assert_variance(x: np.ndarray, var: float) -> None:
    """The sample variance is consistent with ``var`` for near-Gaussian data (χ² quantiles)."""
    n = x.size
    s2 = float(np.var(x.astype(np.float64), ddof=1))
    lo = stats.chi2.ppf(ALPHA / 2, n - 1) / (n - 1)
    hi = stats.chi2.isf(ALPHA / 2, n - 1) / (n - 1)
    assert lo * var <= s2 <= hi * var, (s2 / var, lo, hi)


def assert_mean_zero(x: np.ndarray, var: float) -> None:
    assert abs(float(x.astype(np.float64).mean())) <= Z * math.sqrt(var / x.size)


def config(**kw) -> DPConfig:
    base = dict(sigma=1.0, delta=1e-6, coordinates=4, frac_bits=24, l2_sensitivity=1.0)
    base.update(kw)
    return DPConfig(**base)


# -- the sampler -----------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.7, 3.0])
def test_sampler_pmf_matches_exact_discrete_gaussian(sigma: float) -> None:
    x = sample_discrete_gaussian(sigma, N, NoiseRng(seed(1)))
    assert x.dtype == np.int64 and x.shape == (N,)
    # bins with an expected count ≥ 20, plus one bin for each tail
    ks = np.arange(-int(20 * sigma) - 20, int(20 * sigma) + 21)
    expected = N * dg_pmf(sigma, ks)
    inner = ks[expected >= 20]
    k_lo, k_hi = int(inner.min()), int(inner.max())
    inside = np.bincount(x[(x >= k_lo) & (x <= k_hi)] - k_lo, minlength=k_hi - k_lo + 1)
    observed = np.r_[(x < k_lo).sum(), inside, (x > k_hi).sum()].astype(float)
    probs = np.r_[dg_pmf(sigma, ks[ks < k_lo]).sum(), dg_pmf(sigma, inner)]
    probs = np.r_[probs, dg_pmf(sigma, ks[ks > k_hi]).sum()]
    exp_counts = N * probs
    chi2 = float(((observed - exp_counts) ** 2 / exp_counts).sum())
    assert chi2 <= stats.chi2.isf(ALPHA, len(observed) - 1), chi2
    var, _ = dg_moments(sigma)
    assert_mean_zero(x, var)


def test_sampler_variance_mean_and_symmetry() -> None:
    sigma = 3.0
    x = sample_discrete_gaussian(sigma, N, NoiseRng(seed(2)))
    var, m4 = dg_moments(sigma)
    # for σ = 3 the discrete Gaussian's variance equals σ² to ~1e-70 (Poisson summation)
    assert var == pytest.approx(sigma**2, rel=1e-12)
    assert m4 == pytest.approx(3 * var**2, rel=1e-12)  # Gaussian kurtosis: the χ² law applies
    assert_variance(x, var)
    assert_mean_zero(x, var)
    # symmetry: among nonzero draws, positives ~ Binomial(m, 1/2)
    pos, neg = int((x > 0).sum()), int((x < 0).sum())
    assert abs(pos - neg) <= Z * math.sqrt(pos + neg)
    # and the pmf is symmetric value by value (each pair ~ Binomial, combined as a χ²)
    ks = np.arange(1, 9)
    a = np.array([(x == k).sum() for k in ks], dtype=float)
    b = np.array([(x == -k).sum() for k in ks], dtype=float)
    chi2 = float(((a - b) ** 2 / (a + b)).sum())
    assert chi2 <= stats.chi2.isf(ALPHA, len(ks))


def test_sampler_large_sigma_matches_normal_bins() -> None:
    # σ of ~1 real unit at 24 fractional bits: the discrete Gaussian's CDF differs from the
    # normal CDF by O(1/σ) ≈ 6e-8 here, far below what 10^6 draws can resolve
    sigma = 1.7e7
    x = sample_discrete_gaussian(sigma, N, NoiseRng(seed(3)))
    assert_variance(x, sigma**2)
    assert_mean_zero(x, sigma**2)
    edges = np.r_[-np.inf, np.linspace(-3, 3, 25), np.inf] * sigma
    observed = np.histogram(x.astype(np.float64), bins=edges)[0].astype(float)
    expected = N * np.diff(stats.norm.cdf(edges / sigma))
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 <= stats.chi2.isf(ALPHA, len(observed) - 1)
    assert int(np.abs(x).max()) <= proposal_bound(sigma)


def test_sampler_edge_cases_and_bad_arguments() -> None:
    rng = NoiseRng(seed(4))
    assert sample_discrete_gaussian(2.0, 0, rng).shape == (0,)
    for bad in (0.0, -1.0, math.inf, math.nan, 2.0**47):
        with pytest.raises(DPConfigError, match="sigma") as e:
            sample_discrete_gaussian(bad, 10, rng)
        assert e.value.field == "sigma"
    with pytest.raises(DPConfigError, match=r"n: must be >= 0, got -1"):
        sample_discrete_gaussian(2.0, -1, rng)
    # proposal_bound: (⌊σ⌋ + 1)·46 − 1
    assert proposal_bound(3.0) == 183


# -- randomness ------------------------------------------------------------------------------
def test_noise_rng_is_aes256_ctr_and_reproducible_only_with_a_seed() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    s = os.urandom(32)
    words = NoiseRng(s).words(5)
    ks = Cipher(algorithms.AES(s), modes.CTR(b"decentsim/dp/v1\x00")).encryptor().update(bytes(40))
    np.testing.assert_array_equal(words, np.frombuffer(ks, dtype="<u8"))
    # the stream continues across calls: two draws of 2 and 3 equal one of 5
    r = NoiseRng(s)
    np.testing.assert_array_equal(np.r_[r.words(2), r.words(3)], words)
    u = NoiseRng(s).uniform(1000)
    assert ((u > 0) & (u <= 1)).all()

    cfg = config(coordinates=1000)
    a = server_noise(cfg, (10, 100), NoiseRng(seed(5)))
    b = server_noise(cfg, (10, 100), NoiseRng(seed(5)))
    np.testing.assert_array_equal(a, b)
    c = server_noise(cfg, (10, 100), NoiseRng())
    d = server_noise(cfg, (10, 100), NoiseRng())
    assert not np.array_equal(c, d)
    assert not np.array_equal(a, c)


def test_derived_streams_bind_secret_and_context() -> None:
    secret = os.urandom(32)
    w = NoiseRng.derive(secret, b"round 7|obs|digest A").words(4)
    np.testing.assert_array_equal(w, NoiseRng.derive(secret, b"round 7|obs|digest A").words(4))
    assert not np.array_equal(w, NoiseRng.derive(secret, b"round 7|obs|digest B").words(4))
    assert not np.array_equal(w, NoiseRng.derive(os.urandom(32), b"round 7|obs|digest A").words(4))
    with pytest.raises(DPConfigError, match=r"secret: must be at least 16 bytes") as e:
        NoiseRng.derive(b"short", b"ctx")
    assert e.value.field == "secret"
    with pytest.raises(DPConfigError, match=r"context: must be bytes, got str"):
        NoiseRng.derive(secret, "ctx")  # type: ignore[arg-type]


def test_bad_seed_rejected_and_rejected_draw_leaves_stream_unchanged() -> None:
    for bad in (b"x" * 16, b"x" * 33, "x" * 32):
        with pytest.raises(DPConfigError, match=r"seed: must be 32 bytes") as e:
            NoiseRng(bad)  # type: ignore[arg-type]
        assert e.value.field == "seed"
    r = NoiseRng(seed(6))
    with pytest.raises(DPConfigError, match=r"n: must be >= 0"):
        r.words(-3)
    with pytest.raises(WrongLength, match=r"noise shape \(3,\) does not hold the config's 4"):
        server_noise(config(), 3, r)
    np.testing.assert_array_equal(r.words(3), NoiseRng(seed(6)).words(3))


# -- the two servers' parts ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("split", "part_var", "total_var"),
    [(NoiseSplit.HALF_VARIANCE, 0.5, 1.0), (NoiseSplit.FULL_VARIANCE, 1.0, 2.0)],
)
def test_server_parts_sum_to_the_configured_scale(
    split: NoiseSplit, part_var: float, total_var: float
) -> None:
    # σ = 1 real unit at 2^24: each part ~ N_Z(0, part_var·2^48); variances are σ² to ~1e-70
    cfg = config(coordinates=N, split=split)
    assert cfg.sigma_server_ring**2 == pytest.approx(part_var * 2.0**48, rel=1e-12)
    n_c = server_noise(cfg, N, NoiseRng(seed(7)))
    n_a = server_noise(cfg, N, NoiseRng(seed(8)))
    total = n_c.astype(np.float64) + n_a.astype(np.float64)
    assert_variance(n_c, part_var * 2.0**48)
    assert_variance(n_a, part_var * 2.0**48)
    assert_variance(total, total_var * 2.0**48)
    assert_mean_zero(total, total_var * 2.0**48)
    # independent parts: the correlation of n_C and n_A is ~ N(0, 1/N)
    assert abs(float(np.corrcoef(n_c, n_a)[0, 1])) <= Z / math.sqrt(N)
    assert cfg.sigma_total == pytest.approx(math.sqrt(total_var))
    # the empirical noise scale in real units, as the fidelity report shows it
    cost = fidelity_cost(np.zeros(N), total / cfg.scale, cfg)
    assert cost.expected_rms_error == pytest.approx(math.sqrt(total_var))
    assert cost.rms_error == pytest.approx(cost.expected_rms_error, rel=0.02)
    assert np.abs(total).max() <= noise_bound(cfg)


# -- ring mapping: noisy shares open to x + n_C + n_A ----------------------------------------
def test_noisy_shares_open_to_sum_plus_noise() -> None:
    codec = FixedPointCodec(frac_bits=16, max_abs=64.0, max_summands=2**10)
    n_dev, n_slots, dim = 40, 3, 2
    gen = np.random.default_rng(0)  # test data only, not secret
    values = gen.uniform(-64, 64, size=(n_dev, dim))
    slot_of = np.arange(n_dev) % n_slots
    enc = codec.encode(values)
    seeds = [os.urandom(16) for _ in range(n_dev)]
    share_c, counts = group_sum(slot_of, split_rows(enc, seeds), n_slots)
    share_a, counts_a = group_sum(slot_of, expand_seeds(seeds, dim), n_slots)
    assert np.array_equal(counts, counts_a)
    cfg = DPConfig.for_phase(codec, n_slots, dim, sigma=0.01, delta=1e-6, linf_sensitivity=64.0)
    noisy_c = noisy_share_sums(cfg, share_c, NoiseRng(seed(9)))
    noisy_a = noisy_share_sums(cfg, share_a, NoiseRng(seed(10)))
    n_c = server_noise(cfg, (n_slots, dim), NoiseRng(seed(9)))
    n_a = server_noise(cfg, (n_slots, dim), NoiseRng(seed(10)))
    assert (n_c < 0).any() and (n_a < 0).any()  # negative noise must wrap and cancel
    # the noise is added in the ring: a negative draw wraps to the top half of Z_2^64
    added = (noisy_c - share_c).view(np.uint64)
    np.testing.assert_array_equal(added, n_c.view(np.uint64))
    assert (added[n_c < 0] >= 2**63).all()
    opened = check_noisy_sum(cfg, codec, noisy_c + noisy_a, counts)
    true_sum = group_sum(slot_of, enc, n_slots)[0]
    np.testing.assert_array_equal(opened, true_sum + n_c + n_a)
    np.testing.assert_allclose(
        codec.decode(opened),
        np.stack([values[slot_of == s].sum(axis=0) for s in range(n_slots)])
        + (n_c + n_a) / cfg.scale,
        atol=n_dev * 2.0**-17,
    )
    # add_noise is modular: the extremes wrap both ways
    big = np.array([2**63 - 1, -(2**63)], dtype=np.int64)
    np.testing.assert_array_equal(
        add_noise(big, np.array([1, -1], dtype=np.int64)), [-(2**63), 2**63 - 1]
    )
    with pytest.raises(WrongLength, match=r"differ in shape"):
        add_noise(big, np.zeros(3, dtype=np.int64))
    with pytest.raises(WrongLength, match=r"must be int64"):
        add_noise(big, np.zeros(2, dtype=np.int32))


def test_noisy_sum_check_widens_the_codec_bound() -> None:
    codec = FixedPointCodec(frac_bits=16, max_abs=1.0, max_summands=8)
    cfg = DPConfig.for_phase(codec, 2, 1, sigma=0.5, delta=1e-6, l2_sensitivity=1.0)
    noise = np.array([[-5000], [7000]], dtype=np.int64)  # a slot with no summands, and one
    counts = np.array([0, 1])
    with pytest.raises(OverflowBoundError):
        codec.check_sum(noise, counts)  # the plain check refuses any noise on an empty slot
    np.testing.assert_array_equal(check_noisy_sum(cfg, codec, noise, counts), noise)
    edge = np.array([[noise_bound(cfg)], [codec.max_encoded + noise_bound(cfg)]], np.int64)
    check_noisy_sum(cfg, codec, edge, counts)
    with pytest.raises(OverflowBoundError, match=r"1 noisy sum entr\(y/ies\) outside"):
        check_noisy_sum(cfg, codec, edge + np.array([[0], [1]]), counts)
    with pytest.raises(
        DPConfigError, match=r"frac_bits: the config's 24 differs from the codec's 16"
    ):
        check_noisy_sum(config(frac_bits=24), FixedPointCodec(frac_bits=16), noise, counts)


def test_headroom_refuses_a_codec_the_noise_could_overflow() -> None:
    # (2^17 − 1)·2^46 = 2^63 − 2^46: fits alone, but not with ±2·45·2^40.5 of noise
    codec = FixedPointCodec(frac_bits=30, max_abs=2.0**16, max_summands=2**17 - 1)
    loud = DPConfig(sigma=2.0**11, delta=1e-6, coordinates=1, frac_bits=30, linf_sensitivity=1)
    assert loud.sigma_server_ring == pytest.approx(2.0**40.5)
    assert noise_bound(loud) > 2**46
    with pytest.raises(NoiseHeadroomError, match=r"> 2\^63-1") as e:
        check_headroom(loud, codec)
    assert isinstance(e.value, OverflowBoundError)
    check_headroom(
        DPConfig(sigma=1.0, delta=1e-6, coordinates=1, frac_bits=30, l2_sensitivity=1), codec
    )


# -- accounting ------------------------------------------------------------------------------
def analytic_gaussian_epsilon(z: float, delta: float) -> float:
    """Balle & Wang (2018) exact ε of the Gaussian mechanism with noise multiplier ``z``:
    δ(ε) = Φ(1/(2z) − εz) − e^ε Φ(−1/(2z) − εz), solved for ε."""

    def delta_of(eps: float) -> float:
        return stats.norm.cdf(0.5 / z - eps * z) - math.exp(eps) * stats.norm.cdf(
            -0.5 / z - eps * z
        )

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12)


def test_sensitivity_conversion_includes_encoding_rounding() -> None:
    c = config(coordinates=9, frac_bits=10, l2_sensitivity=2.0)
    assert c.sensitivity_ring == 2.0 * 1024 + 0.5 * 3
    c = config(coordinates=9, frac_bits=10, l2_sensitivity=None, linf_sensitivity=0.3)
    assert c.sensitivity_ring == 3 * math.ceil(0.3 * 1024)
    c = config(coordinates=9, frac_bits=10, l2_sensitivity=2.0, linf_sensitivity=0.3)
    assert c.sensitivity_ring == min(2.0 * 1024 + 1.5, 3 * 308)


def test_pld_matches_the_analytic_gaussian_mechanism() -> None:
    cfg = config(sigma=3.0, delta=1e-5)
    z = math.sqrt(2) * cfg.sigma_server_ring / cfg.sensitivity_ring
    ref = analytic_gaussian_epsilon(z, 1e-5)
    pld = epsilon(cfg, 1, accountant=Accountant.GAUSSIAN_PLD)
    # the PLD accountant is pessimistic by its discretisation only
    assert ref - 1e-9 <= pld <= ref * 1.002 + 1e-4, (pld, ref)
    # k releases of the Gaussian mechanism = one release with noise multiplier z/√k
    ref_k = analytic_gaussian_epsilon(z / math.sqrt(25), 1e-5)
    assert epsilon(cfg, 25, accountant=Accountant.GAUSSIAN_PLD) == pytest.approx(ref_k, rel=2e-3)
    # the server-side view: only one part, σ/√2
    ref_s = analytic_gaussian_epsilon(z / math.sqrt(2), 1e-5)
    got = epsilon(cfg, 1, adversary=Adversary.SERVER, accountant=Accountant.GAUSSIAN_PLD)
    assert got == pytest.approx(ref_s, rel=2e-3)


def test_discrete_rdp_is_a_valid_and_sane_upper_bound() -> None:
    cfg = config(sigma=3.0, delta=1e-5, coordinates=16)
    delta_ring = cfg.sensitivity_ring
    # summed discrete Gaussians at σ_s ≈ 3.6e7 ring units: τ underflows, ρ is Δ²/(2·2σ_s²)
    rho = zcdp_rho(cfg)
    assert rho == pytest.approx(delta_ring**2 / (2 * 2 * cfg.sigma_server_ring**2), rel=1e-12)
    assert zcdp_rho(cfg, Adversary.SERVER) == pytest.approx(2 * rho, rel=1e-12)
    for k in (1, 10, 100):
        eps = epsilon(cfg, k)
        z = math.sqrt(2) * cfg.sigma_server_ring / delta_ring
        # never below the exact Gaussian curve, never above the classic zCDP conversion
        assert analytic_gaussian_epsilon(z / math.sqrt(k), 1e-5) <= eps
        assert eps <= k * rho + 2 * math.sqrt(k * rho * math.log(1e5))


def test_tau_term_of_summed_small_discrete_gaussians() -> None:
    # with σ_s = 1 ring unit the sum of two discrete Gaussians is not a discrete Gaussian:
    # KLS21 add √d·τ to the normalised sensitivity, τ = 10·exp(−π²σ_s²)
    cfg = DPConfig(sigma=math.sqrt(2), delta=1e-6, coordinates=4, frac_bits=0, l2_sensitivity=1)
    assert cfg.sigma_server_ring == pytest.approx(1.0)
    tau = 10 * math.exp(-(math.pi**2))
    a = cfg.sensitivity_ring / math.sqrt(2)
    assert zcdp_rho(cfg) == pytest.approx(0.5 * (a + 2 * tau) ** 2, rel=1e-12)
    assert zcdp_rho(cfg, Adversary.SERVER) == pytest.approx(0.5 * cfg.sensitivity_ring**2)


@pytest.mark.parametrize("accountant", list(Accountant))
def test_epsilon_is_monotone_in_sigma_and_releases(accountant: Accountant) -> None:
    eps_sigma = [epsilon(config(sigma=s), 10, accountant=accountant) for s in (2.0, 4.0, 8.0)]
    assert eps_sigma[0] > eps_sigma[1] > eps_sigma[2] > 0
    eps_k = [epsilon(config(sigma=4.0), k, accountant=accountant) for k in (1, 10, 100)]
    assert eps_k[0] < eps_k[1] < eps_k[2]
    cfg = config(sigma=4.0)
    pub = epsilon(cfg, 10, accountant=accountant)
    srv = epsilon(cfg, 10, adversary=Adversary.SERVER, accountant=accountant)
    assert srv > pub  # a server that knows its own half faces less noise
    # full-variance split: one server now faces what the public faced under half-variance
    full = config(sigma=4.0, split=NoiseSplit.FULL_VARIANCE)
    got = epsilon(full, 10, adversary=Adversary.SERVER, accountant=accountant)
    assert got == pytest.approx(pub, rel=1e-6)
    assert epsilon(cfg, 0, accountant=accountant) == 0.0


def test_composition_of_a_schedule() -> None:
    obs = config(sigma=4.0)
    grad = config(sigma=8.0, l2_sensitivity=0.5, coordinates=32)
    both = epsilon_of([(obs, 10), (grad, 5)], 1e-6)
    assert both == pytest.approx(epsilon_of([(obs, 6), (obs, 4), (grad, 5)], 1e-6), rel=1e-12)
    assert both > max(epsilon(obs, 10), epsilon(grad, 5))
    # the same ρ twice: zCDP adds, so (obs, 20) equals 20 releases
    assert epsilon_of([(obs, 10), (obs, 10)], 1e-6) == pytest.approx(epsilon(obs, 20))


@pytest.mark.parametrize("accountant", list(Accountant))
def test_sigma_for_round_trips(accountant: Accountant) -> None:
    kw = dict(coordinates=8, frac_bits=20)
    sigma = sigma_for(1.5, 1e-6, 30, 2.0, accountant=accountant, **kw)
    cfg = DPConfig(sigma=sigma, delta=1e-6, l2_sensitivity=2.0, **kw)
    eps = epsilon(cfg, 30, accountant=accountant)
    assert 1.5 * (1 - 1e-4) <= eps <= 1.5
    # minimal: 0.1 % less noise overshoots the target
    smaller = DPConfig(sigma=sigma * 0.999, delta=1e-6, l2_sensitivity=2.0, **kw)
    assert epsilon(smaller, 30, accountant=accountant) > 1.5
    # the server-protecting calibration needs more noise against the same adversary
    s_srv = sigma_for(1.5, 1e-6, 30, 2.0, adversary=Adversary.SERVER, accountant=accountant, **kw)
    assert s_srv == pytest.approx(sigma * math.sqrt(2), rel=1e-4)


def test_privacy_report_lists_every_guarantee() -> None:
    cfg = config(sigma=4.0)
    rep = privacy_report(cfg, 30)
    assert rep["epsilon_public_discrete_rdp"] == epsilon(cfg, 30)
    assert rep["epsilon_server_gaussian_pld"] == epsilon(
        cfg, 30, adversary=Adversary.SERVER, accountant=Accountant.GAUSSIAN_PLD
    )
    assert rep["epsilon_public_gaussian_pld"] < rep["epsilon_public_discrete_rdp"]
    assert rep["sigma_total"] == pytest.approx(4.0) and rep["releases"] == 30


# -- configuration errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "field", "message"),
    [
        ({"sigma": 0.0}, "sigma", "must be finite and > 0, got 0.0"),
        ({"sigma": math.nan}, "sigma", "must be finite and > 0"),
        ({"sigma": "1"}, "sigma", "must be a real number, got str"),
        ({"sigma": 1e-9}, "sigma", r"ring units .* must be in \[1, 2\^46\]"),
        ({"sigma": 1e12}, "sigma", r"ring units .* must be in \[1, 2\^46\]"),
        ({"delta": 0.0}, "delta", r"must be in \(0, 1\), got 0.0"),
        ({"delta": 1.0}, "delta", r"must be in \(0, 1\)"),
        ({"coordinates": 0}, "coordinates", "must be >= 1, got 0"),
        ({"coordinates": 2.0}, "coordinates", "must be an integer, got float"),
        ({"coordinates": True}, "coordinates", "must be an integer, got bool"),
        ({"frac_bits": -1}, "frac_bits", "must be >= 0"),
        ({"frac_bits": 63}, "frac_bits", "must be <= 62"),
        ({"l2_sensitivity": None}, "l2_sensitivity", "give l2_sensitivity or linf_sensitivity"),
        ({"l2_sensitivity": -1.0}, "l2_sensitivity", "must be finite and > 0"),
        ({"linf_sensitivity": math.inf}, "linf_sensitivity", "must be finite and > 0"),
        ({"split": "half-variance"}, "split", "must be a NoiseSplit"),
    ],
)
def test_bad_config_rejected_naming_the_field(kw: dict, field: str, message: str) -> None:
    with pytest.raises(DPConfigError, match=message) as e:
        config(**kw)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")
    assert isinstance(e.value, ValueError) and isinstance(e.value, SecureSumError)


def test_bad_accounting_arguments_rejected() -> None:
    cfg = config()
    with pytest.raises(DPConfigError, match=r"releases: must be >= 0, got -1"):
        epsilon(cfg, -1)
    with pytest.raises(DPConfigError, match=r"adversary: must be an Adversary"):
        epsilon(cfg, 1, adversary="public")  # type: ignore[arg-type]
    with pytest.raises(DPConfigError, match=r"accountant: must be an Accountant"):
        epsilon(cfg, 1, accountant="pld")  # type: ignore[arg-type]
    with pytest.raises(DPConfigError, match=r"schedule: needs at least one"):
        epsilon_of([], 1e-6)
    with pytest.raises(DPConfigError, match=r"delta: must be in \(0, 1\)"):
        epsilon_of([(cfg, 1)], 0.0)
    with pytest.raises(DPConfigError, match=r"target_epsilon: must be finite and > 0"):
        sigma_for(0.0, 1e-6, 1, 1.0)
    with pytest.raises(DPConfigError, match=r"releases: must be >= 1"):
        sigma_for(1.0, 1e-6, 0, 1.0)
    with pytest.raises(DPConfigError, match=r"sensitivity: must be finite and > 0"):
        sigma_for(1.0, 1e-6, 1, -2.0)
    with pytest.raises(DPConfigError, match=r"target_epsilon: 1e-09 needs sigma above"):
        sigma_for(1e-9, 1e-6, 1000, 1e6, frac_bits=24)


# -- fidelity --------------------------------------------------------------------------------
def test_fidelity_cost_values() -> None:
    exact = np.array([[3.0, 4.0], [0.0, 0.0]])
    noisy = np.array([[3.0, 5.0], [-2.0, 0.0]])
    cost = fidelity_cost(exact, noisy)
    assert cost.n == 4
    assert cost.max_abs_error == 2.0
    assert cost.mean_abs_error == 0.75
    assert cost.rms_error == pytest.approx(math.sqrt(5 / 4))
    assert cost.relative_l2_error == pytest.approx(math.sqrt(5) / 5)
    assert cost.expected_rms_error is None
    assert cost.as_dict()["max_abs_error"] == 2.0
    assert fidelity_cost([0.0, 0.0], [0.0, 0.0]).relative_l2_error == 0.0
    assert fidelity_cost([0.0, 0.0], [0.0, 1.0]).relative_l2_error == math.inf
    with pytest.raises(WrongLength, match=r"exact \(2,\) and noisy \(3,\) series differ"):
        fidelity_cost([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(WrongLength, match="empty series"):
        fidelity_cost([], [])
    with pytest.raises(DPConfigError, match="noisy: contains a non-finite value"):
        fidelity_cost([1.0], [math.nan])


def test_config_encoding_is_canonical() -> None:
    a = config(sigma=2.0)
    assert a.encode() == config(sigma=2.0).encode()
    others = [
        config(sigma=2.5),
        config(sigma=2.0, delta=1e-7),
        config(sigma=2.0, coordinates=5),
        config(sigma=2.0, split=NoiseSplit.FULL_VARIANCE),
        config(sigma=2.0, linf_sensitivity=1.0),
    ]
    assert len({a.encode(), *(o.encode() for o in others)}) == 1 + len(others)
