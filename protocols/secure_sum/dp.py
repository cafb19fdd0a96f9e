"""Differential privacy for aggregate slots: distributed discrete Gaussian noise and accounting.

Each of the two servers adds its own part of the noise to its share sums of an aggregate phase
before C opens them, so the opened sum is ``Σ x + n_C + n_A``. Both parts are integer vectors in
the fixed-point ring Z_2^64 (two's complement int64), drawn from the discrete Gaussian
``N_Z(0, σ_s²)`` (Canonne, Kamath & Steinke 2020, "CKS20") by a batch rejection sampler fed by a
cryptographic stream (AES-256-CTR keyed from ``os.urandom``, or from a seed for reproducible
runs). Numpy is used only to transform those bits, never as a source of randomness.

Who is protected against whom (``Adversary``):

- ``PUBLIC`` — anyone who sees only opened sums (devices, analysts, a published report): the
  noise is the sum of both servers' parts, ``n_C + n_A``.
- ``SERVER`` — one honest-but-curious server that knows its own part: C opens the sum and can
  subtract ``n_C``; A can subtract ``n_A`` from a published sum. It still faces the other
  server's part alone. If C and A collude there is no secrecy at all (they add their shares).

``NoiseSplit`` fixes how σ is spread: ``HALF_VARIANCE`` gives each server ``σ²/2`` (the opened
sum carries σ, a single server faces ``σ/√2``); ``FULL_VARIANCE`` gives each server ``σ²`` (a
single server faces σ, the opened sum carries ``σ·√2`` — the fidelity price of protecting the
release from the servers too).

Accounting (``Accountant``), both through Google's ``dp-accounting`` library:

- ``DISCRETE_RDP`` (the default; rigorous for what is sampled): the sum of ``n`` independent
  ``N_Z(0, σ_s²)^d`` vectors with an integer query of L2 sensitivity Δ is ``ρ``-zCDP with
  ``ρ = (Δ/(√n·σ_s) + √d·τ)² / 2``, ``τ = 10·Σ_{k=1}^{n-1} exp(−2π²σ_s²·k/(k+1))`` (Kairouz,
  Liu & Steinke 2021, Prop. 14; for ``n = 1`` it is CKS20's ``Δ²/(2σ²)``). Releases compose in
  ``RdpAccountant`` (``ZCDpEvent``), which converts to (ε, δ).
- ``GAUSSIAN_PLD``: the privacy-loss-distribution accountant for the *continuous* Gaussian
  mechanism with the same total σ — tight for that mechanism, and the customary approximation
  of the discrete one (CKS20 show the discrete Gaussian is essentially as private; in one
  dimension at least as private), but not a proof for ``d > 1`` summed discrete Gaussians.

The neighbouring relation is *zero-out*: one device's contribution vector to a release (every
slot and coordinate of one aggregate phase) replaced by zeros. Who participated is not protected
(the servers see it by design), and the per-slot summand counts C opens are exact — see
``LEAKAGE.md``. Sensitivity is given in real units and converted to ring units with the codec's
scale, including the rounding of ``FixedPointCodec.encode``.

The sampler follows CKS20 (Algorithm 2's discrete Laplace proposal with ``t = ⌊σ⌋ + 1``, built
from an exactly uniform integer below ``t`` and a geometric, and Algorithm 3's acceptance
``exp(−(|y| − σ²/t)²/(2σ²))``), but tests each Bernoulli by comparing a 64-bit uniform with a
float64 probability instead of CKS20's exact rational arithmetic. So each pmf value is off by a
relative ~2^-50 except in tails of total mass below ~2^-40 (where the uniforms' granularity
matters; that mass belongs in δ, far below any δ used here), and the proposal is truncated at
``|y| < 46·t`` (mass < 2^-64). Outputs are integers, so Mironov's floating-point attack on
continuous noise does not apply.
"""

from __future__ import annotations

import enum
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .envelope import hkdf_sha256
from .errors import OverflowBoundError, SecureSumError, WrongLength
from .fixed_point import FixedPointCodec

#: bytes of a noise seed (an AES-256 key)
SEED_BYTES = 32
#: shortest secret accepted by :meth:`NoiseRng.derive`
MIN_SECRET_BYTES = 16
#: initial CTR block; a domain-separation constant (every key is used for one stream only)
_NOISE_IV = b"decentsim/dp/v1\x00"
_DERIVE_SALT = b"decentsim/dp-noise/v1"
#: the servers that add noise
N_SERVERS = 2
#: CKS20 / KLS21 need σ ≥ 1/2; one ring unit is the least noise worth adding
MIN_SIGMA_SERVER_RING = 1.0
#: keeps every proposal (``< 46·t``) below 2^52, so float64 holds it exactly
MAX_SIGMA_SERVER_RING = float(2**46)
#: ``⌊−ln 2^-65⌋``: the largest geometric draw, from the smallest uniform ``2^-65``
_MAX_GEOMETRIC = 45
_INT64_MAX = (1 << 63) - 1
_TWO_POW_M64 = 2.0**-64


class DPError(SecureSumError):
    """Base class of the errors of the differential-privacy layer."""


class DPConfigError(DPError, ValueError):
    """A DP parameter or argument is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NoiseHeadroomError(DPError, OverflowBoundError):
    """The codec's overflow bound leaves no room for the noise: a noisy sum could wrap 2^64."""


class NoiseSplit(enum.Enum):
    """How the configured σ is split between the two servers."""

    #: each server adds σ²/2: the opened sum carries σ, one server alone faces σ/√2
    HALF_VARIANCE = "half-variance"
    #: each server adds σ²: one server alone faces σ, the opened sum carries σ·√2
    FULL_VARIANCE = "full-variance"


class Adversary(enum.Enum):
    """Whose view a privacy guarantee is stated for."""

    #: sees only opened sums: both servers' noise protects
    PUBLIC = "public"
    #: one non-colluding server, which knows (and subtracts) its own noise
    SERVER = "server"


class Accountant(enum.Enum):
    """Which analysis turns (σ, Δ, releases) into (ε, δ)."""

    #: rigorous zCDP bound for summed discrete Gaussians, composed by ``RdpAccountant``
    DISCRETE_RDP = "discrete-rdp"
    #: tight PLD accounting of the continuous Gaussian mechanism (an approximation here)
    GAUSSIAN_PLD = "gaussian-pld"


def check_positive_finite(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DPConfigError(field, f"must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise DPConfigError(field, f"must be finite and > 0, got {value!r}")


def check_int(field: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DPConfigError(field, f"must be an integer, got {type(value).__name__}")
    if value < least:
        raise DPConfigError(field, f"must be >= {least}, got {value}")


def check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise DPConfigError("delta", f"must be a real number, got {type(delta).__name__}")
    if not 0.0 < delta < 1.0:
        raise DPConfigError("delta", f"must be in (0, 1), got {delta!r}")


@dataclass(frozen=True)
class DPConfig:
    """The noise of one aggregate phase (one *release*) and what it must hide.

    Args:
        sigma: noise standard deviation in real units: the opened sum's under
            ``HALF_VARIANCE``, each server's part under ``FULL_VARIANCE``.
        delta: the δ of the (ε, δ) guarantee reported by :func:`epsilon`.
        coordinates: ring coordinates in one release (``len(aggregate_slots) × dim``).
        frac_bits: the deployment codec's fractional bits (sets the ring scale).
        l2_sensitivity: bound on the L2 norm of one device's contribution to a release (all
            slots and coordinates of the phase), in real units.
        linf_sensitivity: bound on each coordinate of that contribution, in real units.
            At least one of the two bounds is required; with both the tighter one is used.
        split: how σ is split between the two servers.

    Raises:
        DPConfigError: a field is invalid; ``field`` names it.
    """

    sigma: float
    delta: float
    coordinates: int
    frac_bits: int
    l2_sensitivity: float | None = None
    linf_sensitivity: float | None = None
    split: NoiseSplit = NoiseSplit.HALF_VARIANCE

    def __post_init__(self) -> None:
        check_positive_finite("sigma", self.sigma)
        check_delta(self.delta)
        check_int("coordinates", self.coordinates, 1)
        check_int("frac_bits", self.frac_bits, 0)
        if self.frac_bits > 62:
            raise DPConfigError("frac_bits", f"must be <= 62, got {self.frac_bits}")
        if self.l2_sensitivity is None and self.linf_sensitivity is None:
            raise DPConfigError(
                "l2_sensitivity", "give l2_sensitivity or linf_sensitivity (or both)"
            )
        if self.l2_sensitivity is not None:
            check_positive_finite("l2_sensitivity", self.l2_sensitivity)
        if self.linf_sensitivity is not None:
            check_positive_finite("linf_sensitivity", self.linf_sensitivity)
        if not isinstance(self.split, NoiseSplit):
            raise DPConfigError("split", f"must be a NoiseSplit, got {self.split!r}")
        s = self.sigma_server_ring
        if not MIN_SIGMA_SERVER_RING <= s <= MAX_SIGMA_SERVER_RING:
            raise DPConfigError(
                "sigma",
                f"each server's noise is {s:.6g} ring units (sigma={self.sigma!r}, "
                f"frac_bits={self.frac_bits}, {self.split.value}); it must be in "
                f"[{MIN_SIGMA_SERVER_RING:g}, 2^46]",
            )

    @classmethod
    def for_phase(
        cls,
        codec: FixedPointCodec,
        n_slots: int,
        dim: int,
        *,
        sigma: float,
        delta: float,
        l2_sensitivity: float | None = None,
        linf_sensitivity: float | None = None,
        split: NoiseSplit = NoiseSplit.HALF_VARIANCE,
    ) -> DPConfig:
        """A config for an aggregate phase of ``n_slots`` slots of ``dim`` coordinates."""
        check_int("n_slots", n_slots, 1)
        check_int("dim", dim, 1)
        return cls(
            sigma=sigma,
            delta=delta,
            coordinates=n_slots * dim,
            frac_bits=codec.frac_bits,
            l2_sensitivity=l2_sensitivity,
            linf_sensitivity=linf_sensitivity,
            split=split,
        )

    @property
    def scale(self) -> float:
        """Ring units per real unit, ``2^frac_bits``."""
        return float(1 << self.frac_bits)

    @property
    def sigma_server(self) -> float:
        """Standard deviation of one server's part, in real units."""
        half = self.split is NoiseSplit.HALF_VARIANCE
        return self.sigma / math.sqrt(2.0) if half else self.sigma

    @property
    def sigma_server_ring(self) -> float:
        """The discrete Gaussian parameter σ_s of one server's part, in ring units."""
        return self.sigma_server * self.scale

    @property
    def sigma_total(self) -> float:
        """Standard deviation of the noise in an opened sum (both parts), in real units."""
        return self.sigma_server * math.sqrt(N_SERVERS)

    @property
    def sensitivity_ring(self) -> float:
        """L2 bound of one device's *encoded* contribution to a release, in ring units.

        ``encode`` rounds every coordinate by at most 1/2, so an L2 bound ``s`` becomes
        ``s·2^f + √d/2``; a per-coordinate bound ``c`` becomes ``√d·⌈c·2^f⌉``.
        """
        root_d = math.sqrt(self.coordinates)
        bounds = []
        if self.l2_sensitivity is not None:
            bounds.append(self.l2_sensitivity * self.scale + 0.5 * root_d)
        if self.linf_sensitivity is not None:
            bounds.append(root_d * math.ceil(self.linf_sensitivity * self.scale))
        return min(bounds)

    def encode(self) -> bytes:
        """A canonical byte string of the config, for the servers' round-spec digest."""
        return b"decentsim/dp-config/v1" + struct.pack(
            ">ddQBdd?",
            float(self.sigma),
            float(self.delta),
            int(self.coordinates),
            int(self.frac_bits),
            float(self.l2_sensitivity or 0.0),
            float(self.linf_sensitivity or 0.0),
            self.split is NoiseSplit.FULL_VARIANCE,
        )


# -- randomness ------------------------------------------------------------------------------


class NoiseRng:
    """A cryptographic stream of uniform bits for noise: AES-256-CTR keyed by a 32-byte key.

    Without a seed the key comes from ``os.urandom`` (production). With a seed the stream is
    reproducible — for tests, or for a server that must re-add *identical* noise after a crash
    (see :meth:`derive`). The stream position advances with every draw.
    """

    def __init__(self, seed: bytes | None = None) -> None:
        if seed is None:
            seed = os.urandom(SEED_BYTES)
        elif not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            got = len(seed) if isinstance(seed, bytes) else type(seed).__name__
            raise DPConfigError("seed", f"must be {SEED_BYTES} bytes, got {got}")
        self._encryptor = Cipher(algorithms.AES(seed), modes.CTR(_NOISE_IV)).encryptor()

    @classmethod
    def derive(cls, secret: bytes, context: bytes) -> NoiseRng:
        """A stream keyed by HKDF-SHA256(secret, context): the same pair gives the same noise.

        A server passes its persisted noise secret and a context binding the round, the phase
        and the agreed surviving set, so a retried opening re-adds the same noise, while any
        other release gets independent noise.
        """
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            raise DPConfigError("secret", f"must be at least {MIN_SECRET_BYTES} bytes")
        if not isinstance(context, bytes):
            raise DPConfigError("context", f"must be bytes, got {type(context).__name__}")
        return cls(hkdf_sha256(secret, _DERIVE_SALT, context, SEED_BYTES))

    def words(self, n: int) -> npt.NDArray[np.uint64]:
        """``n`` uniform 64-bit words."""
        check_int("n", n, 0)
        stream = self._encryptor.update(bytes(8 * n))
        return np.frombuffer(stream, dtype="<u8").astype(np.uint64)

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` uniforms in ``(0, 1]``: ``(k + 1/2)·2^-64`` for a uniform 64-bit ``k``.

        Never 0, so ``log`` is finite; the smallest value is ``2^-65``.
        """
        return (self.words(n).astype(np.float64) + 0.5) * _TWO_POW_M64


# -- sampling --------------------------------------------------------------------------------


def _check_sigma_ring(sigma: float) -> None:
    check_positive_finite("sigma", sigma)
    if sigma > MAX_SIGMA_SERVER_RING:
        raise DPConfigError("sigma", f"must be <= 2^46 ring units, got {sigma!r}")


def proposal_bound(sigma: float) -> int:
    """Largest ``|y|`` :func:`sample_discrete_gaussian` can return for parameter ``sigma``.

    A proposal is ``u + t·v`` with ``u < t`` and ``v = ⌊−ln w⌋ ≤ 45`` (the smallest uniform
    ``w`` is ``2^-65``), so ``|y| ≤ 46·t − 1``.
    """
    _check_sigma_ring(sigma)
    t = math.floor(sigma) + 1
    return (_MAX_GEOMETRIC + 1) * t - 1


def _uniform_below(t: int, m: int, rng: NoiseRng) -> npt.NDArray[np.int64]:
    """Up to ``m`` exactly uniform integers in ``[0, t)``: words above the largest multiple of
    ``t`` are dropped (probability ``< t/2^64``) rather than reduced with a modulo bias."""
    words = rng.words(m)
    limit = np.uint64((1 << 64) - (1 << 64) % t - 1)
    return (words[words <= limit] % np.uint64(t)).astype(np.int64)


def _discrete_laplace(t: int, m: int, rng: NoiseRng) -> npt.NDArray[np.int64]:
    """Draws from ``DLap(t)``, ``P(y) ∝ exp(−|y|/t)`` — CKS20 Algorithm 2, vectorised.

    ``|y| = u + t·v`` with ``u`` uniform in ``[0, t)`` kept with probability ``exp(−u/t)``
    and ``v`` geometric with ``P(v ≥ k) = e^−k``; a random sign, rejecting ``−0`` so that zero
    is not counted twice. Splitting ``|y|`` this way keeps every probability that float64
    evaluates between ``e^−1`` and 1 (bar the geometric's far tail), where 64-bit uniforms
    resolve it to ~2^-52, even when ``t`` is 2^46. Returns fewer than ``m`` draws (~60 %).
    """
    u = _uniform_below(t, m, rng)
    k = u.size
    keep = rng.uniform(k) <= np.exp(-u.astype(np.float64) / t)
    v = np.floor(-np.log(rng.uniform(k))).astype(np.int64)
    negative = np.unpackbits(rng.words(-(-k // 64)).view(np.uint8))[:k].astype(bool)
    x = u + t * v
    keep &= ~(negative & (x == 0))
    return np.where(negative, -x, x)[keep]


def sample_discrete_gaussian(sigma: float, n: int, rng: NoiseRng) -> npt.NDArray[np.int64]:
    """``n`` i.i.d. draws from the discrete Gaussian ``N_Z(0, sigma²)`` over the integers.

    ``P(y) ∝ exp(−y²/(2σ²))``. CKS20 Algorithm 3 in batches: propose ``y ~ DLap(t)`` with
    ``t = ⌊σ⌋ + 1`` and accept with probability ``exp(−(|y| − σ²/t)²/(2σ²))``. Batches are
    sized from the observed acceptance rate, so the loop runs over batches, never samples.

    Raises:
        DPConfigError: ``sigma`` is not in ``(0, 2^46]`` or ``n`` is negative.
    """
    _check_sigma_ring(sigma)
    check_int("n", n, 0)
    t = math.floor(sigma) + 1
    var2 = 2.0 * sigma * sigma
    shift = sigma * sigma / t
    out = np.empty(n, dtype=np.int64)
    filled = 0
    rate = 0.4  # outputs per candidate: ~0.43 for large σ, re-estimated after each batch
    while filled < n:
        need = n - filled
        m = math.ceil(1.1 * need / rate) + 256
        y = _discrete_laplace(t, m, rng)
        # |y| < 2^52, so the float64 conversion is exact
        x = np.square(np.abs(y).astype(np.float64) - shift) / var2
        accepted = y[rng.uniform(y.size) <= np.exp(-x)]
        rate = max(accepted.size / m, 0.05)
        take = accepted[:need]
        out[filled : filled + take.size] = take
        filled += take.size
    return out


def server_noise(
    config: DPConfig, shape: int | tuple[int, ...], rng: NoiseRng
) -> npt.NDArray[np.int64]:
    """The noise one server adds to its share sums of a release: ring elements (int64).

    Entries are i.i.d. ``N_Z(0, σ_s²)`` with ``σ_s = config.sigma_server_ring``; negative
    values are their two's-complement ring representatives, so adding them wraps mod 2^64.

    Raises:
        WrongLength: ``shape`` does not hold ``config.coordinates`` entries (the config is
            for another phase, and its accounting would be wrong).
    """
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    size = math.prod(dims)
    if any(d < 0 for d in dims) or size != config.coordinates:
        raise WrongLength(
            f"noise shape {dims} does not hold the config's {config.coordinates} coordinates"
        )
    return sample_discrete_gaussian(config.sigma_server_ring, size, rng).reshape(dims)


def add_noise(
    share_sums: npt.NDArray[np.int64], noise: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """``share_sums + noise`` in Z_2^64 (explicitly modular, via uint64)."""
    a = np.asarray(share_sums)
    b = np.asarray(noise)
    if a.dtype != np.int64 or b.dtype != np.int64:
        raise WrongLength(f"ring arrays must be int64, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise WrongLength(f"share sums {a.shape} and noise {b.shape} differ in shape")
    return (a.view(np.uint64) + b.view(np.uint64)).view(np.int64)


def noisy_share_sums(
    config: DPConfig, share_sums: npt.NDArray[np.int64], rng: NoiseRng
) -> npt.NDArray[np.int64]:
    """A server's share sums of a release with its own noise part added (what it releases)."""
    sums = np.asarray(share_sums)
    return add_noise(sums, server_noise(config, sums.shape, rng))


def noise_bound(config: DPConfig) -> int:
    """Hard bound on ``|n_C + n_A|`` per coordinate: the sampler never exceeds it."""
    return N_SERVERS * proposal_bound(config.sigma_server_ring)


def check_headroom(config: DPConfig, codec: FixedPointCodec) -> None:
    """Raise :class:`NoiseHeadroomError` unless noisy sums cannot wrap around 2^64.

    The codec guarantees ``|true sum| ≤ max_summands·max_encoded``; the noise adds at most
    :func:`noise_bound`, and the total must stay within ``2^63 − 1``.
    """
    if codec.frac_bits != config.frac_bits:
        raise DPConfigError(
            "frac_bits",
            f"the config's {config.frac_bits} differs from the codec's {codec.frac_bits}",
        )
    need = codec.max_summands * codec.max_encoded + noise_bound(config)
    if need > _INT64_MAX:
        raise NoiseHeadroomError(
            f"max_summands·max_encoded + noise bound = {need} > 2^63-1: lower max_abs, "
            f"max_summands or frac_bits, or sigma ({config.sigma!r})"
        )


def check_noisy_sum(
    config: DPConfig,
    codec: FixedPointCodec,
    ring: npt.ArrayLike,
    counts: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int64]:
    """``FixedPointCodec.check_sum`` for a noisy release: the bound widened by the noise.

    ``codec.check_sum`` would refuse a noisy sum (a slot with no summands has bound 0, and any
    nonzero noise exceeds it); this accepts ``|sum| ≤ min(count, max_summands)·max_encoded +``
    :func:`noise_bound` and returns the ring array.

    Raises:
        NoiseHeadroomError: see :func:`check_headroom`.
        OverflowBoundError: an entry lies outside the widened bound.
    """
    check_headroom(config, codec)
    r = np.asarray(ring)
    if r.dtype != np.int64:
        raise WrongLength(f"ring elements must be int64, got dtype {r.dtype}")
    c = np.full(r.shape[:1], codec.max_summands) if counts is None else np.asarray(counts)
    bound = np.minimum(c, codec.max_summands).astype(np.int64) * np.int64(codec.max_encoded)
    bound = bound + np.int64(noise_bound(config))  # ≤ 2^63 − 1 by check_headroom
    bound = bound.reshape(bound.shape + (1,) * (r.ndim - bound.ndim))
    bad = (r > bound) | (r < -bound)
    if bad.any():
        raise OverflowBoundError(
            f"{int(bad.sum())} noisy sum entr(y/ies) outside ±(count·max_encoded + noise bound): "
            "a contribution exceeded max_abs or the sum wrapped around 2^64"
        )
    return r


# -- fidelity --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FidelityCost:
    """What the noise cost: errors of a noisy aggregate series against the exact one.

    ``expected_rms_error`` is the noise σ of an opened sum (``config.sigma_total``) when a
    config was given, so a report can set the observed RMS error beside the configured one.
    """

    n: int
    max_abs_error: float
    mean_abs_error: float
    rms_error: float
    relative_l2_error: float
    expected_rms_error: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        """The fields as a JSON-ready dict."""
        return {
            "n": self.n,
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
            "rms_error": self.rms_error,
            "relative_l2_error": self.relative_l2_error,
            "expected_rms_error": self.expected_rms_error,
        }


def fidelity_cost(
    exact: npt.ArrayLike, noisy: npt.ArrayLike, config: DPConfig | None = None
) -> FidelityCost:
    """Errors of ``noisy`` against ``exact`` (same shape, real units, any dimensions).

    ``relative_l2_error`` is ``‖noisy − exact‖₂ / ‖exact‖₂`` (``inf`` if the exact series is
    all zero and the noisy one is not, ``0`` if both are).

    Raises:
        WrongLength: the shapes differ or the series are empty.
        DPConfigError: a value is not finite.
    """
    x = np.asarray(exact, dtype=np.float64)
    y = np.asarray(noisy, dtype=np.float64)
    if x.shape != y.shape:
        raise WrongLength(f"exact {x.shape} and noisy {y.shape} series differ in shape")
    if x.size == 0:
        raise WrongLength("cannot measure the fidelity of an empty series")
    for name, arr in (("exact", x), ("noisy", y)):
        if not np.isfinite(arr).all():
            raise DPConfigError(name, "contains a non-finite value")
    err = (y - x).ravel()
    err_norm = float(np.linalg.norm(err))
    ref_norm = float(np.linalg.norm(x))
    if ref_norm > 0:
        rel = err_norm / ref_norm
    elif err_norm == 0:
        rel = 0.0
    else:
        rel = math.inf
    return FidelityCost(
        n=int(err.size),
        max_abs_error=float(np.abs(err).max()),
        mean_abs_error=float(np.abs(err).mean()),
        rms_error=err_norm / math.sqrt(err.size),
        relative_l2_error=rel,
        expected_rms_error=None if config is None else config.sigma_total,
    )
