"""Privacy accounting of the DP noise (:mod:`protocols.secure_sum.dp`): (ε, δ) of a run.

Kept apart from the noise itself so that a server or device adding noise never imports Google's
``dp-accounting`` (nor scipy): only the audit and reports, which compute ε, import this module.
See :mod:`protocols.secure_sum.dp` for the mechanism, the adversaries and the accountants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .dp import (
    MAX_SIGMA_SERVER_RING,
    MIN_SIGMA_SERVER_RING,
    N_SERVERS,
    Accountant,
    Adversary,
    DPConfig,
    DPConfigError,
    NoiseSplit,
    check_delta,
    check_int,
    check_positive_finite,
)


def _parties(adversary: Adversary) -> int:
    if not isinstance(adversary, Adversary):
        raise DPConfigError("adversary", f"must be an Adversary, got {adversary!r}")
    return N_SERVERS if adversary is Adversary.PUBLIC else 1


def _tau(sigma_server_ring: float, parties: int) -> float:
    """KLS21's τ: how far a sum of ``parties`` discrete Gaussians is from a discrete Gaussian."""
    ks = np.arange(1, parties, dtype=np.float64)
    s2 = sigma_server_ring * sigma_server_ring
    return float(10.0 * np.exp(-2.0 * math.pi**2 * s2 * ks / (ks + 1.0)).sum())


def zcdp_rho(config: DPConfig, adversary: Adversary = Adversary.PUBLIC) -> float:
    """ρ of one release: it is ρ-zCDP against ``adversary`` (KLS21 Prop. 14 / CKS20)."""
    n = _parties(adversary)
    s = config.sigma_server_ring
    a = config.sensitivity_ring / (math.sqrt(n) * s)
    return 0.5 * (a + math.sqrt(config.coordinates) * _tau(s, n)) ** 2


def noise_multiplier(config: DPConfig, adversary: Adversary = Adversary.PUBLIC) -> float:
    """σ of the noise ``adversary`` faces divided by the sensitivity (ring units both)."""
    n = _parties(adversary)
    return math.sqrt(n) * config.sigma_server_ring / config.sensitivity_ring


def _check_schedule(schedule: Sequence[tuple[DPConfig, int]]) -> None:
    if not schedule:
        raise DPConfigError("schedule", "needs at least one (config, releases) pair")
    for cfg, k in schedule:
        if not isinstance(cfg, DPConfig):
            raise DPConfigError("schedule", f"expected DPConfig, got {type(cfg).__name__}")
        check_int("releases", k, 0)


def epsilon_of(
    schedule: Sequence[tuple[DPConfig, int]],
    delta: float,
    *,
    adversary: Adversary = Adversary.PUBLIC,
    accountant: Accountant = Accountant.DISCRETE_RDP,
) -> float:
    """ε at ``delta`` of a run composing ``releases`` releases of each config.

    E.g. ``[(observations, days), (gradients, epochs)]``: every release is one opened
    aggregate phase, and a device contributes to each.
    """
    # dp-accounting (scipy, absl, attrs) is imported here: importing this module stays cheap
    import dp_accounting as dpa
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    _check_schedule(schedule)
    check_delta(delta)
    _parties(adversary)
    # zero releases compose to nothing (and the PLD accountant divides by the count)
    used = [(cfg, k) for cfg, k in schedule if k > 0]
    events: list[dpa.DpEvent] = []
    if accountant is Accountant.DISCRETE_RDP:
        acc: dpa.PrivacyAccountant = RdpAccountant()
        for cfg, k in used:
            events.append(dpa.SelfComposedDpEvent(dpa.ZCDpEvent(zcdp_rho(cfg, adversary)), k))
    elif accountant is Accountant.GAUSSIAN_PLD:
        acc = PLDAccountant()
        for cfg, k in used:
            event = dpa.GaussianDpEvent(noise_multiplier(cfg, adversary))
            events.append(dpa.SelfComposedDpEvent(event, k))
    else:
        raise DPConfigError("accountant", f"must be an Accountant, got {accountant!r}")
    acc.compose(dpa.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def epsilon(
    config: DPConfig,
    releases: int,
    *,
    adversary: Adversary = Adversary.PUBLIC,
    accountant: Accountant = Accountant.DISCRETE_RDP,
) -> float:
    """ε at ``config.delta`` after ``releases`` releases under ``config``."""
    return epsilon_of(
        [(config, releases)], config.delta, adversary=adversary, accountant=accountant
    )


def sigma_for(
    target_epsilon: float,
    delta: float,
    releases: int,
    sensitivity: float,
    *,
    coordinates: int = 1,
    frac_bits: int = 24,
    split: NoiseSplit = NoiseSplit.HALF_VARIANCE,
    adversary: Adversary = Adversary.PUBLIC,
    accountant: Accountant = Accountant.DISCRETE_RDP,
    rel_tol: float = 1e-6,
) -> float:
    """The smallest ``DPConfig.sigma`` (real units) giving at most ``target_epsilon``.

    ``sensitivity`` is the L2 bound (real units); the other arguments are those of the
    :class:`DPConfig` and :func:`epsilon`. Brent's method on ``log σ``, then the returned σ is
    checked to meet the target (within ``rel_tol`` of the exact root, never below it).

    Raises:
        DPConfigError: a bad argument, or the target needs σ outside the supported range.
    """
    from scipy.optimize import brentq

    check_positive_finite("target_epsilon", target_epsilon)
    check_int("releases", releases, 1)
    check_positive_finite("rel_tol", rel_tol)
    check_delta(delta)
    check_positive_finite("sensitivity", sensitivity)
    check_int("coordinates", coordinates, 1)
    check_int("frac_bits", frac_bits, 0)
    if not isinstance(split, NoiseSplit):
        raise DPConfigError("split", f"must be a NoiseSplit, got {split!r}")

    def make(sigma: float) -> DPConfig:
        return DPConfig(
            sigma=sigma,
            delta=delta,
            coordinates=coordinates,
            frac_bits=frac_bits,
            l2_sensitivity=sensitivity,
            split=split,
        )

    def gap(log_sigma: float) -> float:
        cfg = make(math.exp(log_sigma))
        return epsilon(cfg, releases, adversary=adversary, accountant=accountant) - target_epsilon

    # the σ range DPConfig accepts (its per-server part in [1, 2^46] ring units)
    per_server = 1.0 if split is NoiseSplit.FULL_VARIANCE else math.sqrt(2.0)
    # (pulled in by 1e-9 so float rounding cannot push the per-server σ out of it)
    sigma_min = MIN_SIGMA_SERVER_RING * per_server / float(1 << frac_bits) * (1 + 1e-9)
    sigma_max = MAX_SIGMA_SERVER_RING * per_server / float(1 << frac_bits) * (1 - 1e-9)
    # the classic Gaussian bound is a good first guess; bracket by doubling from it
    guess = sensitivity * math.sqrt(2.0 * math.log(1.25 / delta) * releases) / target_epsilon
    lo = hi = min(max(guess, sigma_min), sigma_max)
    while gap(math.log(hi)) > 0:
        if hi >= sigma_max:
            raise DPConfigError(
                "target_epsilon", f"{target_epsilon!r} needs sigma above the supported maximum"
            )
        lo, hi = hi, min(2.0 * hi, sigma_max)
    while lo == hi or gap(math.log(lo)) <= 0:
        if lo <= sigma_min:
            return sigma_min  # even the least supported noise meets the target
        hi, lo = lo, max(0.5 * lo, sigma_min)
    root = math.exp(brentq(gap, math.log(lo), math.log(hi), xtol=rel_tol / 4))
    sigma = min(root * (1.0 + rel_tol / 2), hi)
    while gap(math.log(sigma)) > 0:  # brentq's answer may sit just below the root
        sigma = min(sigma * (1.0 + rel_tol / 2), hi)
    return sigma


def privacy_report(config: DPConfig, releases: int) -> dict[str, float | int | str]:
    """(ε, δ) of ``releases`` releases for both adversaries and both accountants, plus the
    noise and sensitivity figures an audit report states."""
    report: dict[str, float | int | str] = {
        "mechanism": "distributed discrete Gaussian (2 servers)",
        "split": config.split.value,
        "releases": releases,
        "delta": config.delta,
        "sigma_total": config.sigma_total,
        "sigma_server": config.sigma_server,
        "sigma_server_ring": config.sigma_server_ring,
        "sensitivity_ring": config.sensitivity_ring,
        "coordinates": config.coordinates,
    }
    for adv in Adversary:
        for acc in Accountant:
            key = f"epsilon_{adv.value}_{acc.value.replace('-', '_')}"
            report[key] = epsilon(config, releases, adversary=adv, accountant=acc)
    return report
