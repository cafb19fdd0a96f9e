"""The audit's checks: each reads one server's :class:`~audit.views.AuditInput` and returns a
verdict.

Verdicts (:class:`Status`): ``pass`` — nothing beyond the mode's documented leakage;
``leak`` — leakage the mode's profile (``LEAKAGE.md``) documents, measured and reported;
``fail`` — the server learns more than its mode promises, or the audit's own control failed;
``skip`` — the input lacks what the check needs (said why). The CLI exits non-zero on a fail.

Every check reads the audited server's view alone (its transcript and its own keys) and the
ground truth. Nothing here combines the two servers' views: that is the coordinator +
aggregator collusion the threat model excludes, and the product never holds both (the test
suite, which holds both in-memory views, shows that boundary).

Statistics are sized so that an honest run fails a check with probability below
:data:`FALSE_FAILURE` (10⁻⁶): uniformity tests are Bonferroni-corrected at that level; the
linkage test and the sampled positive control need a z-score beyond :data:`Z_CRIT` (one-sided
normal tail ≈ 5·10⁻⁸); a reconstruction counts only exact recoveries (within
:data:`RING_TOLERANCE` ring units on every coordinate) of non-zero values, which a uniform share
hits with probability about 2⁻⁶⁰ per coordinate. Samples are drawn with fixed seeds, so an
audit is reproducible.
"""

from __future__ import annotations

import enum
import math
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from audit.behaviour import behaviour_verdict
from audit.views import (
    EDGE_BYTES,
    RP_BYTES,
    RS_BYTES,
    UNANSWERED_FETCH,
    AuditInput,
    Registrations,
    Rows,
    Shares,
    Truth,
    fetch_releases,
    registrations,
    server_shares,
    transcript_unused,
    verify_elided,
)
from contract.schedule import AGGREGATES, NEIGHBOURHOOD
from protocols.secure_sum import Mode
from protocols.secure_sum.messages import decode
from protocols.secure_sum.slots import DEVICE_ID_BYTES, SLOT_ID_BYTES

#: probability budget of a false failure of any statistical check on an honest run
FALSE_FAILURE = 1e-6
#: one-sided z above which an attack beats chance (normal tail ≈ 5e-8 < FALSE_FAILURE)
Z_CRIT = 5.33
#: ring units a recovered value may differ from the truth by (fixed-point rounding)
RING_TOLERANCE = 2
#: fewest ring words a uniformity series needs (256 bins × 5 expected, with margin)
MIN_WORDS = 2048
#: most words per uniformity series (a fixed-seed subsample beyond)
MAX_WORDS = 1_000_000
#: fraction of the expected units the positive control must recover (the harness's self-test)
CONTROL_MIN = 0.99

#: reasons a true contribution is not a reconstruction target (keys of ``CheckResult.unused``)
OUTSIDE_ROUNDS = "true contribution in a round of which the view holds no share"
NOT_ENCODABLE = "true contribution outside its codec's range (not a target)"
NOT_COMPARED = "committed day without every participant's total (not compared)"


class Status(str, enum.Enum):
    """A check's verdict."""

    PASS = "pass"
    LEAK = "leak"
    FAIL = "fail"
    SKIP = "skip"


@dataclass
class CheckResult:
    """One check's verdict, with the numbers behind it and what the report plots.

    Attributes:
        key: short machine name (``uniformity``, ``reconstruction``, …).
        title: human title.
        status: the verdict.
        summary: one or two sentences saying why.
        details: the numbers (JSON-serializable).
        table: rows for the report (first row = header), possibly empty.
        plot: data the report plots (JSON-serializable), possibly empty.
        unused: reason → records or truth rows this check could not use, possibly empty.
    """

    key: str
    title: str
    status: Status
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    table: list[list[str]] = field(default_factory=list)
    plot: dict[str, Any] = field(default_factory=dict)
    unused: dict[str, int] = field(default_factory=dict)


@dataclass
class AuditResult:
    """One server's audit: the checks' verdicts and every record it could not use.

    Attributes:
        role: the audited server.
        checks: the checks, in report order.
        unused: stage → reason → count of what was not used: ``transcript`` (records no check
            can use), ``shares`` (records and items not turned into share rows, e.g. items
            beyond ``--max-open``), ``truth`` (pool-store rows no contribution came from) and
            ``check: <key>`` (what that check left out). Only non-empty entries.
    """

    role: str
    checks: list[CheckResult]
    unused: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """``fail`` if any check failed, else ``pass``."""
        return "fail" if any(r.status is Status.FAIL for r in self.checks) else "pass"


def _dims(inp: AuditInput) -> dict[str, int]:
    """Each deployment's vector length: the run's public schedule, else the view's mailbox
    posts (first seen), else the truth."""
    dims = dict(inp.dims)
    for r in inp.view.records:
        if r.kind == "MailboxPost" and r.deployment not in dims:
            dims[r.deployment] = int(getattr(decode(r.payload), "dim", 0))
    if inp.truth is not None:
        for dep, table in inp.truth.tables.items():
            dims.setdefault(dep, int(table.value.shape[1]))
    return {k: v for k, v in dims.items() if v > 0}


def shares_of(inp: AuditInput, max_open: int = 200_000) -> Shares:
    """The audited server's share rows (see :func:`~audit.views.server_shares`)."""
    return server_shares(inp.view, inp.mode, _dims(inp), max_open)


# -- 1. uniformity ----------------------------------------------------------------------------
def _uniform_tests(words: npt.NDArray[np.int64]) -> dict[str, float]:
    """p-values of: bytes chi-square, top-byte chi-square (ring elements), KS on u = w / 2^64."""
    u = words.astype(np.int64).view(np.uint64)
    byte_counts = np.bincount(u.view(np.uint8), minlength=256)
    top_counts = np.bincount((u >> np.uint64(56)).astype(np.int64), minlength=256)
    x = (u >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return {
        "bytes_chi2_p": float(stats.chisquare(byte_counts).pvalue),
        "ring_top_byte_chi2_p": float(stats.chisquare(top_counts).pvalue),
        "ring_ks_p": float(stats.kstest(x, "uniform").pvalue),
    }


def _subsample(words: npt.NDArray[np.int64], salt: int) -> npt.NDArray[np.int64]:
    if words.size <= MAX_WORDS:
        return words
    rng = np.random.default_rng(0x5EED + salt)
    return words[rng.choice(words.size, size=MAX_WORDS, replace=False)]


def check_uniformity(inp: AuditInput, shares: Shares) -> CheckResult:
    """The server's received shares are indistinguishable from uniform ring elements.

    Series: every share word the server holds. Control: the same tests on the values a
    plaintext server would hold instead (each row's true value from the ground truth, 0 for a
    dummy). Fails if any series' p-value is below ``FALSE_FAILURE / #tests``.
    """
    role = inp.role
    series: dict[str, npt.NDArray[np.int64]] = {}
    n_words = sum(rows.share.size for rows in shares.rows.values())
    if n_words:
        series[role] = _sampled_words(shares, n_words)
    control = _plaintext_values(inp, shares, n_words)
    tested = {k: v for k, v in series.items() if n_words >= MIN_WORDS}
    if not tested:
        return CheckResult(
            "uniformity",
            "Share uniformity",
            Status.SKIP,
            f"fewer than {MIN_WORDS} share words at the {role}: nothing to test",
        )
    n_tests = 3 * len(tested)
    threshold = FALSE_FAILURE / n_tests
    results: dict[str, dict[str, float]] = {}
    hist: dict[str, list[int]] = {}
    for i, (name, held) in enumerate(sorted(tested.items())):
        sample = _subsample(held, i)
        results[name] = {
            **_uniform_tests(sample),
            "words": int(n_words),
            "tested": int(sample.size),
        }
        hist[name] = np.bincount(
            (sample.view(np.uint64) >> np.uint64(56)).astype(np.int64), minlength=256
        ).tolist()
    control_p: dict[str, float] = {}
    if control.size >= MIN_WORDS:
        sample = _subsample(control, 99)
        control_p = _uniform_tests(sample)
        hist["control (the values)"] = np.bincount(
            (sample.view(np.uint64) >> np.uint64(56)).astype(np.int64), minlength=256
        ).tolist()
    failed = sorted(
        name for name, r in results.items() if min(r[k] for k in r if k.endswith("_p")) < threshold
    )
    table = [["series", "words", "bytes χ² p", "ring top-byte χ² p", "ring KS p", "verdict"]]
    for name, r in sorted(results.items()):
        table.append(
            [
                name,
                str(r["words"]),
                f"{r['bytes_chi2_p']:.3g}",
                f"{r['ring_top_byte_chi2_p']:.3g}",
                f"{r['ring_ks_p']:.3g}",
                "non-uniform" if name in failed else "uniform",
            ]
        )
    status = Status.FAIL if failed else Status.PASS
    summary = (
        f"non-uniform shares at the {role} (p < {threshold:.1e})"
        if failed
        else f"the {role}'s shares are uniform (every p ≥ {threshold:.1e}); the values they "
        "stand for (the plaintext control) are not"
        if control_p and min(control_p.values()) < threshold
        else f"the {role}'s shares are uniform (every p ≥ {threshold:.1e})"
    )
    return CheckResult(
        "uniformity",
        "Share uniformity",
        status,
        summary,
        {"threshold": threshold, "series": results, "control": control_p},
        table,
        {"top_byte_histograms": hist},
    )


def _quota(words: npt.NDArray[np.int64], n_words: int, salt: int) -> npt.NDArray[np.int64]:
    """A fixed-seed share of ``words`` (part of ``n_words`` in all) proportional to its size,
    so the parts' samples together hold about ``MAX_WORDS`` words."""
    if n_words <= MAX_WORDS:
        return words.ravel()
    k = min(words.size, -(-words.size * MAX_WORDS // n_words))
    rng = np.random.default_rng(0x5EED + salt)
    # distinct positions without a permutation of all of them (hundreds of millions of words)
    return words.ravel()[np.unique(rng.integers(0, words.size, size=k))]


def _sampled_words(shares: Shares, n_words: int) -> npt.NDArray[np.int64]:
    """About ``MAX_WORDS`` of the server's share words (all when fewer), without concatenating
    its gigabytes of rows first."""
    parts = [
        _quota(rows.share, n_words, i) for i, rows in enumerate(shares.rows.values()) if len(rows)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _plaintext_values(inp: AuditInput, shares: Shares, n_words: int) -> npt.NDArray[np.int64]:
    """The ring words a server without secret sharing would hold in place of this server's
    shares: each share row completed from the ground truth (:func:`_completed`: the true value
    of the item, 0 for a dummy) — the uniformity control; about ``MAX_WORDS`` of them, computed
    a round at a time."""
    if inp.truth is None:
        return np.zeros(0, np.int64)
    words = []
    for d, (dep, codec) in enumerate(inp.codecs.items()):
        rows = shares.rows.get(dep)
        if rows is None or not len(rows):
            continue
        table = _truth_table(inp.truth, dep)
        for rows_r, at in _per_round(rows, table.round_id):
            if len(rows_r):
                every = _targets(table.take(at), codec, np.ones(len(at), dtype=bool))
                salt = 100 + d * 100_003 + int(rows_r.round_id[0])
                words.append(_quota(_completed(rows_r, every), n_words, salt))
    return np.concatenate(words) if words else np.zeros(0, np.int64)


# -- keys: fixed-width byte strings as numpy void scalars, so joins are sorts, not dict loops ---
def _void(*cols: npt.NDArray[np.uint8]) -> npt.NDArray[np.void]:
    """Rows of the concatenated uint8 columns as one void key per row."""
    # reshape(0, -1) is ambiguous: an empty column keeps its row width explicitly
    mat = np.ascontiguousarray(
        np.concatenate([c.reshape(len(c), int(np.prod(c.shape[1:]))) for c in cols], axis=1)
    )
    return mat.view(f"V{mat.shape[1]}").ravel()


def _be(x: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """int64s as big-endian bytes (n, 8): keys sort by value."""
    return np.ascontiguousarray(np.asarray(x, dtype=">i8")).view(np.uint8).reshape(-1, 8)


def _ids(raw: list[bytes] | set[bytes], width: int = DEVICE_ID_BYTES) -> npt.NDArray[np.uint8]:
    """Concatenated ids of ``width`` bytes (participants by default) as an ``(n, width)``
    matrix."""
    return np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(-1, width)


def _near_rows(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Per row: every coordinate within ``RING_TOLERANCE`` in the ring (wrapping difference)."""
    d = a - b  # int64 arrays wrap, as the protocol's arithmetic does
    return np.all((d >= -RING_TOLERANCE) & (d <= RING_TOLERANCE), axis=1)


def _group_sum(
    keys: npt.NDArray[np.void], vals: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.void], npt.NDArray[np.int64]]:
    """Unique keys and the ring sum of the rows of each."""
    uniq, inv = np.unique(keys, return_inverse=True)
    sums = np.zeros((len(uniq), vals.shape[1]), dtype=np.int64)
    np.add.at(sums, inv.reshape(-1), vals)
    return uniq, sums


# -- 2. reconstruction ------------------------------------------------------------------------
@dataclass
class _Table:
    """Contributions of one deployment as arrays (ground truth, or targets)."""

    round_id: npt.NDArray[np.int64]
    participant: npt.NDArray[np.uint8]
    slot: npt.NDArray[np.uint8]
    value: npt.NDArray[np.float64]
    devices: npt.NDArray[np.int64]

    @property
    def edge(self) -> npt.NDArray[np.void]:
        return _void(_be(self.round_id), self.participant, self.slot)

    @property
    def slot_key(self) -> npt.NDArray[np.void]:
        return _void(_be(self.round_id), self.slot)

    def take(self, idx: npt.NDArray[np.int64]) -> _Table:
        return _Table(
            self.round_id[idx],
            self.participant[idx],
            self.slot[idx],
            self.value[idx],
            self.devices[idx],
        )


def _per_round(
    rows: Rows, truth_rounds: npt.NDArray[np.int64]
) -> Iterator[tuple[Rows, npt.NDArray[np.int64]]]:
    """(the server's rows, the indices of the true contributions) of one round at a time, for
    every round of either. Every key of the attacks and the control starts with the round, so
    a run is scored round by round: memory holds one round's joins, not sixty."""
    # rows come in round order (one post after another): then each round's rows are a view
    in_order = bool(np.all(rows.round_id[1:] >= rows.round_id[:-1]))
    r_order = None if in_order else np.argsort(rows.round_id, kind="stable")
    r_sorted = rows.round_id if r_order is None else rows.round_id[r_order]
    t_order = np.argsort(truth_rounds, kind="stable")
    t_sorted = truth_rounds[t_order]
    for rnd in np.union1d(np.unique(r_sorted), t_sorted).tolist():
        lo, hi = np.searchsorted(r_sorted, rnd), np.searchsorted(r_sorted, rnd, "right")
        t_at = t_order[np.searchsorted(t_sorted, rnd) : np.searchsorted(t_sorted, rnd, "right")]
        yield rows.take(slice(lo, hi) if r_order is None else r_order[lo:hi]), t_at


def _truth_table(truth: Truth, dep: str) -> _Table:
    t = truth.table(dep)
    return _Table(t.round_id, t.participant, t.slot, t.value, t.devices)


@dataclass
class _Targets:
    """One deployment's targets: unique (round, participant, slot) with the true ring value."""

    edge: npt.NDArray[np.void]  # sorted unique
    slot_key: npt.NDArray[np.void]
    participant: npt.NDArray[np.uint8]
    value: npt.NDArray[np.int64]


def _encodable(table: _Table, codec: Any) -> npt.NDArray[np.bool_]:
    """Which true values the codec encodes (finite, within ``max_abs`` on every coordinate)."""
    finite = np.all(np.isfinite(table.value), axis=1)
    return finite & np.all(np.abs(table.value) <= codec.max_abs, axis=1)


def _targets(table: _Table, codec: Any, keep: npt.NDArray[np.bool_]) -> _Targets:
    """The encodable true contributions selected by ``keep``, summed per (round, participant,
    slot) in the ring."""
    ok = keep & _encodable(table, codec)
    t = _Table(
        *(getattr(table, f)[ok] for f in ("round_id", "participant", "slot", "value", "devices"))
    )
    ring = (
        codec.encode(t.value).astype(np.int64)
        if len(t.round_id)
        else np.zeros((0, t.value.shape[1]), np.int64)
    )
    edge, value = _group_sum(t.edge, ring)
    raw = edge.view(np.uint8).reshape(-1, EDGE_BYTES)
    return _Targets(
        edge,
        _void(raw[:, :8], raw[:, RP_BYTES:]),
        np.ascontiguousarray(raw[:, 8:RP_BYTES]),
        value,
    )


@dataclass
class _Guesses:
    """An attacker's guesses: attributed (edge key, value) and unattributed (slot key, value) —
    the value is known, its sender is not."""

    edge: list[npt.NDArray[np.void]] = field(default_factory=list)
    edge_val: list[npt.NDArray[np.int64]] = field(default_factory=list)
    slot: list[npt.NDArray[np.void]] = field(default_factory=list)
    slot_val: list[npt.NDArray[np.int64]] = field(default_factory=list)

    def add_rows(self, rows: Rows, values: npt.NDArray[np.int64]) -> None:
        """Each row's value as a guess (attributed where the row names its poster), plus the
        sum of each poster's rows per slot (a participant's items to one slot add up)."""
        k = rows.known
        if k.any():
            edge = _void(_be(rows.round_id[k]), rows.participant[k], rows.slot[k])
            self.edge.append(edge)
            self.edge_val.append(values[k])
            uniq, sums = _group_sum(edge, values[k])
            self.edge.append(uniq)
            self.edge_val.append(sums)
        if (~k).any():
            self.slot.append(_void(_be(rows.round_id[~k]), rows.slot[~k]))
            self.slot_val.append(values[~k])

    def extend(self, other: _Guesses) -> None:
        for f in ("edge", "edge_val", "slot", "slot_val"):
            getattr(self, f).extend(getattr(other, f))

    def hits(self, t: _Targets) -> npt.NDArray[np.bool_]:
        """Which targets some guess equals."""
        hit = np.zeros(len(t.edge), dtype=bool)
        if not len(t.edge):
            return hit
        # one batch of guesses at a time: a target is hit if any guess equals it, so nothing
        # needs the guesses concatenated (the aggregator's ± rows are millions of vectors)
        for keys, vals in zip(self.edge, self.edge_val, strict=True):
            idx = np.minimum(np.searchsorted(t.edge, keys), len(t.edge) - 1)
            ok = t.edge[idx] == keys
            near = _near_rows(vals[ok], t.value[idx[ok]])
            hit[idx[ok][near]] = True
        if self.slot:
            order = np.argsort(t.slot_key, kind="stable")
            sk = t.slot_key[order]
        for keys, vals in zip(self.slot, self.slot_val, strict=True):
            lo, hi = np.searchsorted(sk, keys, "left"), np.searchsorted(sk, keys, "right")
            counts = hi - lo
            guess = np.repeat(np.arange(len(keys)), counts)
            offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            tgt = order[np.repeat(lo, counts) + offs]
            near = _near_rows(vals[guess], t.value[tgt])
            hit[tgt[near]] = True
        return hit


@dataclass
class _Control:
    """The positive control's tally over deployments (see :func:`_control`).

    ``units`` are what the control scores — one per true contribution where the server sees
    posters, else one per (round, slot) holding true contributions; ``expected`` is the sum
    of each unit's probability of having an opened share row (1 unless its batch was sampled),
    ``variance`` that of a sum of such Bernoulli variables, ``recovered`` the units scored as
    recovered."""

    units: int = 0
    expected: float = 0.0
    variance: float = 0.0
    recovered: int = 0

    def add(self, p: npt.NDArray[np.float64], hit: npt.NDArray[np.bool_]) -> None:
        self.units += len(p)
        self.expected += float(p.sum())
        self.variance += float((p * (1 - p)).sum())
        self.recovered += int(hit.sum())

    @property
    def rate(self) -> float:
        """Recovered over expected units (above 1 when dummies lift a sampled slot's odds)."""
        return self.recovered / self.expected if self.expected else 0.0

    @property
    def z(self) -> float:
        """The recovery's distance from its expectation, in standard deviations (0 when
        nothing was sampled: the expectation is then exact)."""
        return (self.recovered - self.expected) / math.sqrt(self.variance) if self.variance else 0.0

    @property
    def failed(self) -> bool:
        """Below ``CONTROL_MIN`` of the expected units — and, on a sample, significantly so
        (``z < -Z_CRIT``): an honest sample falls that short with probability < 5·10⁻⁸."""
        short = self.recovered < CONTROL_MIN * self.expected
        return short and (self.variance == 0 or self.z < -Z_CRIT)


def _completed(rows: Rows, every: _Targets) -> npt.NDArray[np.int64]:
    """Each share row completed by the complement the ground truth gives it: the true value of
    the item it is a share of (0 for rows no true contribution matches: dummies).

    Rows that name their poster match a true contribution by (round, participant, slot); the
    first of a poster's rows at a slot takes the value (its items there add up). Rows without
    a poster (shuffled) match by (round, slot): the k-th row at a slot takes the k-th true
    value there — which row holds which contribution is what the shuffle hides, and the
    attack's unattributed guesses do not need it."""
    out = np.zeros_like(rows.share)
    if not len(rows) or not len(every.edge):
        return out
    if rows.known.all():
        uniq, first = np.unique(
            _void(_be(rows.round_id), rows.participant, rows.slot), return_index=True
        )
        idx = np.minimum(np.searchsorted(every.edge, uniq), len(every.edge) - 1)
        match = every.edge[idx] == uniq
        out[first[match]] = every.value[idx[match]]
        return out
    row_key = _ranked(_void(_be(rows.round_id), rows.slot))
    target_key = _ranked(every.slot_key)
    _, ri, ti = np.intersect1d(row_key, target_key, assume_unique=True, return_indices=True)
    out[ri] = every.value[ti]
    return out


def _ranked(keys: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
    """Each key with its rank among equal keys (0, 1, …) appended: unique keys."""
    order = np.argsort(keys, kind="stable")
    _, first, inverse = np.unique(keys[order], return_index=True, return_inverse=True)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - first[inverse.reshape(-1)]
    width = keys.dtype.itemsize
    return _void(keys.view(np.uint8).reshape(-1, width), _be(rank))


def _control(rows: Rows, every: _Targets, tally: _Control) -> None:
    """The positive control on one deployment: the server's own share rows, completed by the
    ground truth's complement (:func:`_completed`), scored by the attack's own code
    (``_Guesses``). It recovers a unit exactly when the server's rows carry the keys the truth
    says — rounds, slots, posters — and the scoring recognises a recovered value; it does not
    test a share's value (only the other server's share could: that is C + A, in the tests).

    Where only a fixed-seed sample of a batch was opened, a (round, slot) holding ``t`` true
    items has an opened row with probability at least ``1 − C(N − t, m) / C(N, m)`` (``m`` of
    the batch's ``N`` items opened; dummies at the slot only raise it): the expectation the
    tally compares against. A sampled dense batch opened the same fixed-seed fraction ``m / N``
    of slot positions in every post: a (round, slot) has rows with that probability."""
    if not len(every.edge):
        return
    guesses = _Guesses()
    guesses.add_rows(rows, _completed(rows, every))
    hit = guesses.hits(every)
    known = not len(rows) or bool(rows.known.all())
    if known and not rows.sampled:
        tally.add(np.ones(len(every.edge)), hit)
        return
    units, inverse, t = np.unique(every.slot_key, return_inverse=True, return_counts=True)
    unit_hit = np.zeros(len(units), dtype=bool)
    np.logical_or.at(unit_hit, inverse.reshape(-1), hit)
    sampled: dict[int, tuple[int, int]] = {}
    for (rnd, _), (opened, received) in rows.sampled.items():
        m, n = sampled.get(rnd, (0, 0))
        sampled[rnd] = (m + opened, n + received)
    rnd = units.view(np.uint8).reshape(-1, RS_BYTES)[:, :8].copy().view(">i8").ravel()
    m, n = (
        np.asarray([sampled.get(int(r), (0, 0))[i] for r in rnd], dtype=np.int64) for i in (0, 1)
    )
    # a round not sampled (n = 0) was opened whole: each of its units has a row
    if known:  # dense: every post has a row at each opened position (m / n of them)
        p = np.where(n > 0, m / np.maximum(n, 1), 1.0)
    else:
        p = np.where(n > 0, 1.0 - _chance_none(m, t.astype(np.int64), n), 1.0)
    tally.add(p, unit_hit)


def _view_rounds(rows: Rows) -> npt.NDArray[np.int64]:
    """The rounds of which the server holds share rows (or sampled a batch)."""
    sampled = np.asarray([rnd for rnd, _ in rows.sampled], dtype=np.int64)
    return np.unique(np.concatenate([rows.round_id, sampled]))


def check_reconstruction(inp: AuditInput, shares: Shares, colluders: int = 1) -> CheckResult:
    """Try to recover honest participants' contributions (messages and observations) from the
    audited server's view.

    Attackers: the server alone (C: its shares; A: ± its shares); the server with
    ``colluders`` colluding trust domains (pools: their own contributions and the sums their
    registrants fetched — what those devices hold). Chance is the data-free guess "zero" (many
    true messages are zero). Fails if the server alone, or with the colluders beyond the
    documented subtraction on small cohorts, recovers any non-zero value, or if the positive
    control (:func:`_control`: the server's rows completed from the ground truth, scored by the
    same attack) recovers fewer than ``CONTROL_MIN`` of the units it should — on the opened
    sample when a batch was sampled. The control combines the server's view with the ground
    truth only, never with the other server's view (that would be the C + A collusion).
    """
    if inp.truth is None or not len(inp.truth):
        return CheckResult(
            "reconstruction", "Reconstruction attacks", Status.SKIP, "no ground truth in the run"
        )
    role = inp.role
    colluding = {p for p, d in inp.truth.domains.items() if d < colluders}
    coll_ids = _ids(sorted(colluding)) if colluding else np.zeros((0, DEVICE_ID_BYTES), np.uint8)
    regs = registrations(inp.view, inp.group_slots)
    groups = regs if inp.group_slots > 1 else None
    coll_name = f"{role} + {colluders} colluding pool(s)"
    names = (role, coll_name)
    totals = {n: np.zeros(3, dtype=np.int64) for n in names}  # recovered, non-zero, undocumented
    n_targets = n_nonzero = n_documented = 0
    control = _Control()
    unused: Counter[str] = Counter()
    for dep, codec in inp.codecs.items():
        table = _truth_table(inp.truth, dep)
        rows = shares.rows.get(dep)
        in_run = (
            np.isin(table.round_id, _view_rounds(rows))
            if rows is not None
            else np.zeros(len(table.round_id), bool)
        )
        unused[OUTSIDE_ROUNDS] += int((~in_run).sum())
        unused[NOT_ENCODABLE] += int((in_run & ~_encodable(table, codec)).sum())
        if rows is None:
            continue
        is_coll = _rows_in(table.participant, coll_ids)
        for rows_r, at in _per_round(rows, table.round_id):
            truth_r, run_r = table.take(at), in_run[at]
            every = _targets(truth_r, codec, run_r)
            honest = _targets(truth_r, codec, run_r & ~is_coll[at])
            if not len(honest.edge):
                continue
            _control(rows_r, every, control)
            nonzero = np.any(np.abs(honest.value) > RING_TOLERANCE, axis=1)
            n_targets += len(honest.edge)
            n_nonzero += int(nonzero.sum())
            guesses = {n: _Guesses() for n in names}
            guesses[role].add_rows(rows_r, rows_r.share)
            if role == "aggregator":  # A holds r of x = (x − r) + r: it tries either sign
                guesses[role].add_rows(rows_r, -rows_r.share)
            guesses[coll_name].extend(guesses[role])
            documented = _subtraction_attack(
                dep, every, honest, coll_ids, regs, rows_r, guesses[coll_name], groups
            )
            n_documented += int((documented & nonzero).sum())
            for n in names:
                hit = guesses[n].hits(honest)
                totals[n] += [
                    int(hit.sum()),
                    int((hit & nonzero).sum()),
                    int((hit & nonzero & ~documented).sum()),
                ]
    unused_out = {k: v for k, v in unused.items() if v}
    if not n_targets:
        return CheckResult(
            "reconstruction",
            "Reconstruction attacks",
            Status.SKIP,
            f"no honest contribution in the rounds of the {role}'s view",
            unused=unused_out,
        )
    chance = (n_targets - n_nonzero) / n_targets
    results: dict[str, dict[str, Any]] = {
        n: {
            "recovered": int(v[0]),
            "recovered_nonzero": int(v[1]),
            "rate": float(v[0]) / n_targets,
            "chance": chance,
        }
        for n, v in totals.items()
    }
    undocumented = int(totals[coll_name][2])
    results[coll_name]["documented_small_cohort"] = int(totals[coll_name][1]) - undocumented
    results[coll_name]["undocumented"] = undocumented
    unopened = sum(r.unopened for r in shares.rows.values())
    control_text = (
        f"the control ({role}'s shares completed from the ground truth) recovers "
        f"{control.recovered} of {control.units} unit(s)"
        + (
            f", at least {control.expected:.1f} expected on the opened sample ({unopened} "
            "item(s) not opened)"
            if unopened
            else ""
        )
    )
    problems = []
    if results[role]["recovered_nonzero"]:
        problems.append(f"{role} alone recovered {results[role]['recovered_nonzero']} value(s)")
    if undocumented:
        problems.append(f"{coll_name} recovered {undocumented} value(s) beyond small cohorts")
    if control.failed:
        z = f", z = {control.z:.1f}" if control.variance else ""
        problems.append(
            f"{control_text} ({control.rate:.1%} of the expected{z}): the audit cannot vouch "
            "for its attacks"
        )
    table = [["attacker", "targets", "recovered", "rate", "chance (guess 0)", "non-zero recovered"]]
    for name, r in results.items():
        table.append(
            [
                name,
                str(n_targets),
                str(r["recovered"]),
                f"{r['rate']:.1%}",
                f"{r['chance']:.1%}",
                str(r["recovered_nonzero"]),
            ]
        )
    table.append(
        [
            f"control: {role} + truth-derived complement",
            f"{control.units} unit(s), {control.expected:.1f} expected",
            str(control.recovered),
            f"{control.rate:.1%} of expected",
            "—",
            "—",
        ]
    )
    if problems:
        status, summary = Status.FAIL, "; ".join(problems)
    elif results[coll_name]["documented_small_cohort"]:
        status = Status.LEAK
        summary = (
            f"the {role} alone recovers no value; {coll_name} recovers "
            f"{results[coll_name]['documented_small_cohort']} value(s), each the residual of a "
            "colluder's day total (slot group) or an aggregate after subtracting the "
            f"colluders' own (documented: LEAKAGE.md, server + t devices); {control_text}"
        )
    else:
        status = Status.PASS
        summary = f"no attacker within the threat model beats chance; {control_text}"
    return CheckResult(
        "reconstruction",
        "Reconstruction attacks",
        status,
        summary,
        {
            "targets": n_targets,
            "nonzero_targets": n_nonzero,
            "documented_by_subtraction": n_documented,
            "colluders": colluders,
            "attackers": results,
            "control": {
                "units": control.units,
                "expected": control.expected,
                "recovered": control.recovered,
                "rate": control.rate,
                "z": control.z,
                "failed": control.failed,
                "unopened_items": unopened,
            },
            "unopened_items": unopened,
        },
        table,
        {
            "rates": {
                k: (v["rate"], v["chance"], v["recovered_nonzero"] / max(n_nonzero, 1))
                for k, v in results.items()
            }
        },
        unused_out,
    )


def _rows_in(ids: npt.NDArray[np.uint8], members: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Which rows of ``ids`` (n, w) are among ``members`` (m, w)."""
    if not len(members) or not len(ids):
        return np.zeros(len(ids), dtype=bool)
    return np.isin(_void(ids), _void(members))


def _subtraction_attack(
    dep: str,
    every: _Targets,
    honest: _Targets,
    coll_ids: npt.NDArray[np.uint8],
    regs: Registrations,
    rows: Rows,
    guesses: _Guesses,
    groups: Registrations | None = None,
) -> npt.NDArray[np.bool_]:
    """The server + colluders: a colluding registrant's fetched total — one per slot group of
    ``groups`` (its device-day), or per slot without — minus the colluders' own items leaves
    the honest contributions to that group; aggregates are opened (and published) anyway. The
    residual is guessed as a lone honest contribution's value (at any slot of the group: as
    generous to the attacker as can be), attributed where the server's ``rows`` show a single
    honest poster to the group (mailbox mode; dummies usually hide it). Returns which honest
    targets this documented attack may recover (each honest contribution equal to its group's
    residual)."""

    def group_of(keys: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
        return keys if groups is None or dep != NEIGHBOURHOOD else groups.group_of(keys)

    every_g, honest_g = group_of(every.slot_key), group_of(honest.slot_key)
    slots, total = _group_sum(every_g, every.value)
    coll = _rows_in(every.participant, coll_ids)
    own_keys, own = _group_sum(every_g[coll], every.value[coll])
    residual = total.copy()
    if len(own_keys):
        residual[np.searchsorted(slots, own_keys)] -= own
    eligible = np.ones(len(slots), dtype=bool)
    if dep == NEIGHBOURHOOD:
        eligible = np.isin(slots, regs.owned_groups(coll_ids))
    slots, residual = slots[eligible], residual[eligible]
    documented = np.zeros(len(honest.edge), dtype=bool)
    if not len(slots):
        return documented
    idx = np.minimum(np.searchsorted(slots, honest_g), len(slots) - 1)
    at = slots[idx] == honest_g
    documented[at] = _near_rows(residual[idx[at]], honest.value[at])
    guesses.slot.append(honest.slot_key[at])
    guesses.slot_val.append(residual[idx[at]])
    if rows.known.any():
        k = rows.known & ~_rows_in(rows.participant, coll_ids)
        row_g = group_of(_void(_be(rows.round_id[k]), rows.slot[k]))
        # group key ‖ poster, so each group's distinct posters are counted
        pairs = np.unique(_void(row_g.view(np.uint8).reshape(-1, RS_BYTES), rows.participant[k]))
        raw = pairs.view(np.uint8).reshape(-1, RS_BYTES + DEVICE_ID_BYTES)
        uniq, first, counts = np.unique(
            _void(raw[:, :RS_BYTES]), return_index=True, return_counts=True
        )
        lone = uniq[counts == 1]
        poster = raw[first[counts == 1], RS_BYTES:]
        sel = at & np.isin(honest_g, lone)
        if sel.any():
            pos = np.searchsorted(lone, honest_g[sel])
            s_raw = honest.slot_key[sel].view(np.uint8).reshape(-1, RS_BYTES)
            guesses.edge.append(_void(s_raw[:, :8], poster[pos], s_raw[:, 8:]))
            guesses.edge_val.append(residual[idx[sel]])
    return documented


# -- 3. linkage -------------------------------------------------------------------------------
def _guess_senders(rows: Rows) -> npt.NDArray[np.uint8]:
    """Each row's sender: its poster where the server saw it, else the order attack — the item
    at position i of a batch came from the poster whose cumulative item range covers i (right
    if the relay kept arrival order)."""
    out = rows.participant.copy()
    for (rnd, phase), posters in rows.batch.items():
        sel = ~rows.known & (rows.round_id == rnd) & (rows.phase == phase)
        if not sel.any() or not posters:
            continue
        ends = np.cumsum([n for _, n in posters]).astype(np.int64)
        j = np.minimum(np.searchsorted(ends, rows.position[sel], side="right"), len(posters) - 1)
        out[sel] = _ids([p for p, _ in posters])[j]
    return out


def _chance_none(
    n_items: npt.NDArray[np.int64], n_p: npt.NDArray[np.int64], total: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """P(none of ``n_items`` items at random distinct positions of a batch of ``total`` falls in
    a poster's ``n_p`` positions) = C(total − n_p, n_items) / C(total, n_items), exact."""
    from scipy.special import gammaln

    free = total - n_p
    ok = n_items <= free
    f, n, t = (
        free[ok].astype(np.float64),
        n_items[ok].astype(np.float64),
        total[ok].astype(np.float64),
    )
    out = np.zeros(len(n_items))
    out[ok] = np.exp(gammaln(f + 1) - gammaln(f - n + 1) - gammaln(t + 1) + gammaln(t - n + 1))
    return out


def _linkage(rows: Rows | None, edges: npt.NDArray[np.void]) -> dict[str, Any] | None:
    """One server's linkage statistics over the true ``edges`` of the rounds its rows cover
    (``None`` when it holds no rows, or they cover none)."""
    if rows is None or not len(rows):
        return None
    guess = _guess_senders(rows)
    asserted = np.unique(_void(_be(rows.round_id), guess, rows.slot))
    raw = edges.view(np.uint8).reshape(-1, EDGE_BYTES)
    e_round = raw[:, :8].copy().view(">i8").ravel().astype(np.int64)
    covered = edges[np.isin(e_round, np.unique(rows.round_id))]
    if not len(covered):
        return None
    craw = covered.view(np.uint8).reshape(-1, EDGE_BYTES)
    c_round = craw[:, :8].copy().view(">i8").ravel().astype(np.int64)
    found = np.isin(covered, asserted)
    # items per (round, slot) at this server, and each poster's item count per round
    sk, sk_counts = np.unique(_void(_be(rows.round_id), rows.slot), return_counts=True)
    c_sk = _void(craw[:, :8], craw[:, RP_BYTES:])
    pos = np.minimum(np.searchsorted(sk, c_sk), len(sk) - 1)
    n_s = np.where(sk[pos] == c_sk, sk_counts[pos], 0)
    sk_round = sk.view(np.uint8).reshape(-1, RS_BYTES)[:, :8].copy().view(">i8").ravel()
    slots_per_round = dict(zip(*np.unique(sk_round, return_counts=True), strict=True))
    poster_keys, poster_n, totals = [], [], {}
    n_candidates = 0
    for (rnd, _), posters in rows.batch.items():
        totals[rnd] = sum(n for _, n in posters)
        poster_keys += [int(rnd).to_bytes(8, "big", signed=True) + p for p, _ in posters]
        poster_n += [n for _, n in posters]
        n_candidates += len(posters) * int(slots_per_round.get(rnd, 0))
    rp = f"V{RP_BYTES}"
    pk = np.frombuffer(b"".join(poster_keys), dtype=rp) if poster_keys else np.zeros(0, rp)
    order = np.argsort(pk)
    pk, pn = pk[order], np.asarray(poster_n, dtype=np.int64)[order]
    c_pk = _void(craw[:, :RP_BYTES])
    ppos = np.minimum(np.searchsorted(pk, c_pk), max(len(pk) - 1, 0))
    n_p = np.where((pk[ppos] == c_pk) if len(pk) else False, pn[ppos] if len(pk) else 0, 0)
    total = np.asarray([totals.get(int(r), 0) for r in c_round], dtype=np.int64)
    chance = 1.0 - _chance_none(n_s, n_p, total)
    hits = int(found.sum())
    mean, var = float(chance.sum()), float((chance * (1 - chance)).sum())
    z = (hits - mean) / math.sqrt(var) if var > 0 else 0.0
    return {
        "true_edges": len(covered),
        "asserted_edges": len(asserted),
        "recall": hits / len(covered),
        "chance_recall": mean / len(covered),
        "precision": int(np.isin(asserted, covered).sum()) / max(len(asserted), 1),
        "chance_precision": len(covered) / max(n_candidates, 1),
        "z": z,
        "linkable": bool(z > Z_CRIT),
    }


def _dense_linkage(rows: Rows | None, truth: _Table) -> dict[str, Any] | None:
    """Dense mode: every participant posts a share of every slot, so every (poster, slot) pair a
    server holds is a candidate edge and the pairs carry nothing by themselves. The attack
    asserts the pairs whose share is not all zeros — a post left unmasked, or masked by a broken
    PRG, shows zeros wherever its participant contributed nothing. The verdict is a one-sided
    z-test of the asserted pairs' precision against the true edges' share of the candidates
    (hypergeometric: asserted pairs drawn at random from the candidates). Counted a round at
    a time (every pair and edge names its round)."""
    if rows is None or not len(rows):
        return None
    big_n = n = k = hits = n_covered = 0
    for rows_r, at in _per_round(rows, truth.round_id):
        if not len(rows_r):
            continue  # a round this server holds no share of: its edges are not covered
        pairs = _void(_be(rows_r.round_id), rows_r.participant, rows_r.slot)
        candidates = np.unique(pairs)
        asserted = np.unique(pairs[np.any(rows_r.share != 0, axis=1)])
        covered = np.unique(truth.take(at).edge)
        big_n, n = big_n + len(candidates), n + len(asserted)
        n_covered += len(covered)
        k += int(np.isin(candidates, covered).sum())
        hits += int(np.isin(asserted, covered).sum())
    if not n_covered:
        return None
    p = k / big_n
    mean = n * p
    var = n * p * (1 - p) * (big_n - n) / max(big_n - 1, 1)
    z = (hits - mean) / math.sqrt(var) if var > 0 else 0.0
    return {
        "true_edges": n_covered,
        "asserted_edges": n,
        "recall": hits / n_covered,
        "chance_recall": mean / n_covered,
        "precision": hits / max(n, 1),
        "chance_precision": p,
        "z": z,
        "linkable": bool(z > Z_CRIT),
    }


def check_linkage(inp: AuditInput, shares: Shares) -> CheckResult:
    """The server's best sender ↔ slot edge recovery against the true contact graph.

    For every neighbourhood item the server holds it asserts a sender (the poster it saw, or by
    the order attack); the asserted edges are scored against the true (sender participant,
    slot) edges of each round. Recall of a true edge under chance — senders assigned to the
    server's items at random positions of the batch — is exact (hypergeometric); the verdict
    is a one-sided z-test of the recovered edges against it (``Z_CRIT``). Linkable is a failure
    in ``shuffled`` mode and documented leakage in ``mailbox``/``plaintext``. In ``dense`` mode
    every poster holds every slot, and the attack is on the shares (:func:`_dense_linkage`);
    linkable is a failure there too.
    """
    if inp.truth is None:
        return CheckResult(
            "linkage", "Linkage attack", Status.SKIP, "no ground truth (contact graph)"
        )
    table_t = _truth_table(inp.truth, NEIGHBOURHOOD)
    if not len(table_t.round_id):
        return CheckResult(
            "linkage", "Linkage attack", Status.SKIP, "no true contacts in the truth"
        )
    results: dict[str, dict[str, Any]] = {}
    rows = shares.rows.get(NEIGHBOURHOOD)
    if inp.mode is Mode.DENSE:
        measured = _dense_linkage(rows, table_t)
    else:
        measured = _linkage(rows, np.unique(table_t.edge))
    if measured is not None:
        results[inp.role] = measured
    if not results:
        return CheckResult("linkage", "Linkage attack", Status.SKIP, "no neighbourhood items seen")
    linkable = sorted(r for r, v in results.items() if v["linkable"])
    table = [
        [
            "server",
            "true edges",
            "recall",
            "chance recall",
            "precision",
            "chance precision",
            "z",
            "linkable",
        ]
    ]
    for role, r in results.items():
        table.append(
            [
                role,
                str(r["true_edges"]),
                f"{r['recall']:.3f}",
                f"{r['chance_recall']:.3f}",
                f"{r['precision']:.3f}",
                f"{r['chance_precision']:.3f}",
                f"{r['z']:.1f}",
                "yes" if r["linkable"] else "no",
            ]
        )
    if not linkable:
        status = Status.PASS
        summary = f"the {inp.role} does not link senders to slots better than chance"
    elif inp.mode in (Mode.SHUFFLED, Mode.DENSE):
        status = Status.FAIL
        summary = (
            f"{inp.mode.value} mode promises unlinkability, but {', '.join(linkable)} link(s) "
            "senders to slots"
        )
    else:
        best = max(linkable, key=lambda r: results[r]["recall"])
        status = Status.LEAK
        summary = (
            f"{', '.join(linkable)} recover(s) the sender↔slot graph (recall "
            f"{results[best]['recall']:.2f} vs chance {results[best]['chance_recall']:.2f}, "
            f"z = {results[best]['z']:.0f}): documented for {inp.mode.value} mode"
        )
    return CheckResult(
        "linkage",
        "Linkage attack",
        status,
        summary,
        {"servers": results},
        table,
        {"linkage": results},
    )


# -- 4. small cohorts -------------------------------------------------------------------------
def _cohort_sizes(
    t: _Table, groups: Registrations | None
) -> tuple[npt.NDArray[np.void], npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[Any]]:
    """Per released unit (slot, or slot group), sorted by key: the key, the contacts (devices)
    summed into it, its message mass and its contributing participants. A round at a time:
    every key names its round, so the rounds' sorted results concatenate in order."""
    out: list[tuple[Any, ...]] = []
    order = np.argsort(t.round_id, kind="stable")
    bounds = np.flatnonzero(np.diff(t.round_id[order])) + 1
    for at in np.split(order, bounds):
        r = t.take(at)
        target_keys = r.slot_key if groups is None else groups.group_of(r.slot_key)
        slot_keys, inv = np.unique(target_keys, return_inverse=True)
        inv = inv.reshape(-1)
        dev = np.bincount(inv, weights=r.devices, minlength=len(slot_keys)).astype(np.int64)
        mass = np.bincount(inv, weights=np.abs(r.value[:, 0]), minlength=len(slot_keys))
        pairs = _void(target_keys.view(np.uint8).reshape(-1, RS_BYTES), r.participant)
        first = np.unique(pairs, return_index=True)[1]
        out.append((slot_keys, dev, mass, np.bincount(inv[first], minlength=len(slot_keys))))
    keys, dev, mass, parts = (np.concatenate(col) for col in zip(*out, strict=True))
    return keys, dev, mass, parts


def check_cohorts(inp: AuditInput, shares: Shares, k: int = 2) -> CheckResult:
    """How many released slots summed fewer than ``k`` contributors (a slot summing one contact
    reveals that contact's message to its registrant), and whether a configured minimum cohort
    was enforced: every slot the coordinator counted below it must be released as zero in its
    fetch replies. The aggregator's replies are boxed to the registrant, so its view cannot show
    what it released; either server's zero withholds a slot's sum, so the coordinator's audit
    settles enforcement, and the aggregator's says so (``skip``)."""
    if inp.truth is None:
        return CheckResult("cohorts", "Small cohorts", Status.SKIP, "no ground truth")
    k = max(k, inp.min_cohort)
    t = _truth_table(inp.truth, NEIGHBOURHOOD)
    if not len(t.round_id):
        return CheckResult(
            "cohorts", "Small cohorts", Status.SKIP, "no neighbourhood contributions"
        )
    # What a registrant is released is one total per slot group (its device-day): the cohort
    # is what sums into a group, whichever of its slots each contact posted to.
    groups = registrations(inp.view, inp.group_slots) if inp.group_slots > 1 else None
    what = "slots" if groups is None else "device-days (slot groups)"
    slot_keys, dev, mass, parts = _cohort_sizes(t, groups)
    n_slots = len(slot_keys)
    small = dev < k
    hist = np.bincount(np.minimum(dev, 20), minlength=21).tolist()
    details: dict[str, Any] = {
        "k": k,
        "slots": n_slots,
        "below_k_devices": int(small.sum()),
        "below_k_participants": int((parts < k).sum()),
        "single_contact": int((dev == 1).sum()),
        "min_cohort": inp.min_cohort,
        "unit": what,
        "group_slots": inp.group_slots,
    }
    table = [["measure", "value"], [f"{what} with ≥ 1 contributor", str(n_slots)]]
    table.append(
        [f"{what} with < {k} contributed contacts", f"{int(small.sum())} ({small.mean():.1%})"]
    )
    table.append(
        [f"{what} with < {k} contributing participants", str(details["below_k_participants"])]
    )
    table.append([f"{what} summing exactly one contact", str(details["single_contact"])])
    status = Status.LEAK if small.any() else Status.PASS
    summary = (
        f"{int(small.sum())} of {n_slots} {what} ({small.mean():.1%}) summed fewer than {k} "
        f"contacts (documented: a registrant learns such a total); no minimum cohort was "
        "enforced"
        if small.any()
        else f"every one of {n_slots} {what} summed at least {k} contacts"
    )
    unused: dict[str, int] = {}
    if inp.min_cohort and inp.role != "coordinator":
        status = Status.SKIP
        summary = (
            f"minimum cohort {inp.min_cohort}: the {inp.role}'s replies are boxed to the "
            "registrant, so its view cannot show what it released (the coordinator's audit "
            f"checks its releases; either server's zero withholds a sum); {int(small.sum())} "
            f"of {n_slots} {what} summed fewer than {k} contacts"
        )
    elif inp.min_cohort:
        held_rows = shares.rows.get(NEIGHBOURHOOD)
        if held_rows is not None and len(held_rows):
            held_keys = _void(_be(held_rows.round_id), held_rows.slot)
            held, held_n = np.unique(
                held_keys if groups is None else groups.group_of(held_keys), return_counts=True
            )
        else:
            held, held_n = np.zeros(0, f"V{RS_BYTES}"), np.zeros(0, np.int64)
        rel_keys, rel_zero = [], []
        releases, unanswered = fetch_releases(inp.view, groups)
        if unanswered:
            unused[UNANSWERED_FETCH] = unanswered
        for rnd, _, slot_ids, rows in releases:
            n = rows.shape[0]
            rel_keys.append(
                _void(
                    _be(np.full(n, rnd)),
                    np.frombuffer(slot_ids, np.uint8).reshape(n, SLOT_ID_BYTES),
                )
            )
            rel_zero.append(~np.any(rows != 0, axis=1))
        keys = np.concatenate(rel_keys) if rel_keys else np.zeros(0, f"V{RS_BYTES}")
        zero = np.concatenate(rel_zero) if rel_zero else np.zeros(0, bool)
        pos = np.minimum(np.searchsorted(held, keys), max(len(held) - 1, 0))
        count = (
            np.where(held[pos] == keys, held_n[pos], 0)
            if len(held)
            else np.zeros(len(keys), np.int64)
        )
        below = count < inp.min_cohort
        released_bad = int((below & ~zero).sum())
        spos = np.minimum(np.searchsorted(slot_keys, keys), n_slots - 1)
        real = slot_keys[spos] == keys
        sup = below & zero & real
        suppressed = int(sup.sum())
        suppressed_mass = float(mass[spos[sup]].sum())
        total_mass = float(mass.sum()) or 1.0
        details.update(
            {
                "released_below_min_cohort": released_bad,
                "suppressed_slots": suppressed,
                "suppressed_message_mass": suppressed_mass / total_mass,
            }
        )
        table.append(
            [f"{what} suppressed (< {inp.min_cohort} items at the servers)", str(suppressed)]
        )
        table.append(
            ["message mass suppressed (fidelity cost)", f"{suppressed_mass / total_mass:.2%}"]
        )
        if released_bad:
            status = Status.FAIL
            summary = (
                f"{released_bad} of the {what} below the minimum cohort {inp.min_cohort} were "
                "released"
            )
        else:
            passed_small = int(small.sum()) - int((sup & small[spos]).sum())
            status = Status.LEAK if passed_small > 0 else Status.PASS
            summary = (
                f"minimum cohort {inp.min_cohort} enforced: {suppressed} of the {what} "
                f"suppressed, {suppressed_mass / total_mass:.2%} of the message mass lost"
                + (
                    f"; {passed_small} of the {what} with < {k} real contacts passed (dummies "
                    "count as items at the servers)"
                    if passed_small > 0
                    else ""
                )
            )
    return CheckResult(
        "cohorts",
        "Small cohorts",
        status,
        summary,
        details,
        table,
        {"cohort_histogram": hist},
        unused,
    )


def add_fidelity(result: CheckResult, run: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Add the fidelity effect of the run's protection (e.g. a minimum cohort) to ``result``:
    its opened daily series against a baseline run's (same population, seed and θ, without it),
    from the two runs' ``summary.json``."""
    diffs: dict[str, Any] = {}
    for name, series in run.get("daily", {}).items():
        base = baseline.get("daily", {}).get(name)
        if base is None or len(base) != len(series):
            continue
        a, b = np.asarray(series, dtype=np.float64), np.asarray(base, dtype=np.float64)
        diffs[name] = {
            "total": float(a.sum()),
            "baseline_total": float(b.sum()),
            "relative_change": float((a.sum() - b.sum()) / b.sum()) if b.sum() else 0.0,
            "max_daily_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0,
        }
        result.table.append(
            [
                f"{name}: total vs baseline",
                f"{a.sum():.0f} vs {b.sum():.0f} ({diffs[name]['relative_change']:+.1%})",
            ]
        )
    result.details["fidelity_vs_baseline"] = diffs


# -- 5. differential privacy ------------------------------------------------------------------
def dp_config_of(conf: dict[str, Any]) -> Any:
    """The ``DPConfig`` of a run config's ``dp`` entry: a run spec's ``{sigma, delta,
    l2_sensitivity}`` (the observations phase, ``contract.schedule.observations_dp``), or the
    full ``DPConfig`` fields of a crafted input.

    Raises:
        TypeError, ValueError, DPError: the entry is not a valid configuration.
    """
    from contract.runspec import DP_FIELDS
    from contract.schedule import observations_dp
    from protocols.secure_sum import dp

    fields = dict(conf)
    if set(fields) == set(DP_FIELDS):
        return observations_dp(**fields)
    if "split" in fields:
        fields["split"] = dp.NoiseSplit(fields["split"])
    return dp.DPConfig(**fields)


def _opened_days(source: str) -> dict[int, npt.NDArray[np.float64]]:
    """Round id → the aggregate vector C opened and committed (``days`` of C's database), or
    nothing when ``source`` is not a run dir."""
    import sqlite3
    from pathlib import Path

    db = Path(source) / "state" / "coordinator" / "coordinator.sqlite3"
    if not db.is_file():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT round_id, y FROM days").fetchall()
    finally:
        conn.close()
    return {int(r): np.frombuffer(bytes(y), "<f8").copy() for r, y in rows}


def _fidelity_vs_truth(inp: AuditInput, config: Any) -> dict[str, Any] | None:
    """The noise's cost measured against the ground truth: the opened daily aggregates versus
    the participants' own observation totals (``dp.fidelity_cost``), over the committed days
    whose every participant's total is known (``days`` 0: none was), with the number of opened
    days not compared. ``None`` without truth, or when the shapes disagree."""
    from protocols.secure_sum import dp

    if inp.truth is None:
        return None
    opened = _opened_days(inp.source)
    exact: dict[int, list[npt.NDArray[np.float64]]] = defaultdict(list)
    agg = inp.truth.table(AGGREGATES)
    for rid, value in zip(agg.round_id.tolist(), agg.value, strict=True):
        if rid in opened:
            exact[rid].append(value)
    domains = len(set(inp.truth.domains.values()))
    rounds = sorted(r for r, vals in exact.items() if len(vals) == domains)
    not_compared = len(opened) - len(rounds)
    if not rounds:
        return {"days": 0, "not_compared": not_compared}
    # the noise-free opened sum: the participants' totals as the codec encodes and sums them
    from contract.schedule import aggregates_codec

    codec = inp.codecs.get(AGGREGATES) or aggregates_codec()
    truth = np.stack([codec.decode(codec.encode(np.stack(exact[r])).sum(axis=0)) for r in rounds])
    noisy = np.stack([opened[r] for r in rounds])
    if truth.shape != noisy.shape:
        return None
    cost = dp.fidelity_cost(truth, noisy, config).as_dict()
    err = (noisy - truth).ravel()
    cost["days"] = len(rounds)
    cost["not_compared"] = not_compared
    cost["rms_over_sigma"] = cost["rms_error"] / config.sigma_total
    # the observed mean square against σ²: a chi-square bound (two-sided, 1e-6) says whether
    # the noise the servers added is consistent with the configured scale
    lo, hi = stats.chi2.ppf(5e-7, err.size), stats.chi2.isf(5e-7, err.size)
    ss = float(np.square(err / config.sigma_total).sum())
    cost["consistent_with_sigma"] = bool(lo <= ss <= hi)
    cost["errors"] = err.tolist()
    return cost


def check_dp(inp: AuditInput) -> CheckResult:
    """Report the run's (ε, δ), its noise and the noise's fidelity cost when it used DP.

    The run spec's ``dp`` entry (``{sigma, delta, l2_sensitivity}``, see :func:`dp_config_of`)
    configures the observations phase; one release = one opened ``global/day/<d>``. Releases
    are counted from the server's transcript (every ``AggregateRequest`` the coordinator sent,
    which the aggregator received; retries and aborted attempts included: an over-count only
    weakens the stated ε), or else as days × epochs. The guarantee comes from
    ``accountant.privacy_report`` (both adversaries, both accountants). The fidelity cost is the
    configured σ (the expected RMS error per coordinate) and, in the coordinator's audit (C
    opens the aggregates: they are in its database) with ground truth, the observed error of
    the opened aggregates against the participants' own totals (plus, with ``--baseline``,
    :func:`add_dp_fidelity`). Fails if
    the configuration is invalid (no guarantee can be stated) or the observed error is
    inconsistent with the configured σ (the servers did not add the noise the run claims).
    """
    dp_conf = inp.config.get("dp")
    if not dp_conf:
        return CheckResult(
            "dp",
            "Differential privacy",
            Status.SKIP,
            "the run did not add differential-privacy noise (aggregates are exact)",
        )
    from protocols.secure_sum import dp
    from protocols.secure_sum.accountant import privacy_report

    try:
        config = dp_config_of(dp_conf)
    except (TypeError, ValueError, dp.DPError) as e:
        return CheckResult(
            "dp", "Differential privacy", Status.FAIL, f"the run's DP configuration is invalid: {e}"
        )
    releases = sum(1 for e in inp.view.records if e.kind == "AggregateRequest") or int(
        inp.config.get("days", 1)
    ) * int(inp.config.get("epochs", 1))
    report = privacy_report(config, releases)
    table = [["quantity", "value"]] + [
        [k, f"{v:.6g}" if isinstance(v, float) else str(v)] for k, v in report.items()
    ]
    eps = {k: v for k, v in report.items() if k.startswith("epsilon_")}
    worst = max(eps.values()) if eps else float("nan")
    details: dict[str, Any] = {"privacy": report}
    plot: dict[str, Any] = {}
    status = Status.PASS
    summary = (
        f"{releases} noisy release(s): ε ≤ {worst:.3g} at δ = {config.delta:g} (worst adversary "
        f"and accountant); expected RMS error {config.sigma_total:.3g} per coordinate"
    )
    table.append(["fidelity: configured σ = expected RMS error", f"{config.sigma_total:.6g}"])
    unused: dict[str, int] = {}
    if inp.role != "coordinator":
        summary += " (the observed noise is measured by the coordinator's audit: C opens it)"
    cost = _fidelity_vs_truth(inp, config) if inp.role == "coordinator" else None
    if cost is not None and cost["not_compared"]:
        unused[NOT_COMPARED] = cost["not_compared"]
    if cost is not None and cost["days"]:
        plot["dp_errors"] = {"errors": cost.pop("errors"), "sigma": config.sigma_total}
        details["fidelity_vs_truth"] = cost
        table += [
            ["fidelity: observed RMS error vs truth", f"{cost['rms_error']:.6g}"],
            ["fidelity: observed max |error|", f"{cost['max_abs_error']:.6g}"],
            ["fidelity: relative L2 error", f"{cost['relative_l2_error']:.6g}"],
            ["fidelity: days × coordinates compared", f"{cost['days']} × {config.coordinates}"],
        ]
        summary += f", observed {cost['rms_error']:.3g} against the truth"
        if not cost["consistent_with_sigma"]:
            status = Status.FAIL
            summary += (
                f" — INCONSISTENT with the configured σ ({cost['rms_over_sigma']:.3g}·σ): the "
                "opened aggregates do not carry the claimed noise"
            )
    return CheckResult("dp", "Differential privacy", status, summary, details, table, plot, unused)


def add_dp_fidelity(result: CheckResult, run: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Add the DP noise's fidelity cost (``dp.fidelity_cost``) of the opened daily series
    against a noise-free baseline run's."""
    if result.status is Status.SKIP or "privacy" not in result.details:
        return
    from protocols.secure_sum import dp

    for name, series in run.get("daily", {}).items():
        base = baseline.get("daily", {}).get(name)
        if base is None or len(base) != len(series):
            continue
        cost = dp.fidelity_cost(np.asarray(base), np.asarray(series)).as_dict()
        result.details.setdefault("fidelity_vs_baseline", {})[name] = cost
        result.table.append(
            [f"{name}: RMS error vs the noise-free run", f"{cost['rms_error']:.4g}"]
        )


# -- 6. secrets at rest -----------------------------------------------------------------------
def check_secrets(inp: AuditInput) -> CheckResult:
    """Scan the audited server's files (databases, logs, views, keys) and the run's public
    outputs for planted plaintext — the ground truth's needles: pools' secrets and keys,
    devices' state values, messages, own totals, heard beacons, the world's beacon secret, and
    the key of this server's auditor — and check that key files are readable by their owner
    only. The other server's private keys are not needles: this audit does not hold them (only
    the two auditors together would; the test suite, holding both, plants them)."""
    if not inp.scan_files:
        return CheckResult(
            "secrets", "Secrets at rest and in logs", Status.SKIP, "no server files to scan"
        )
    needles = dict(inp.truth.needles) if inp.truth is not None else {}
    hits: list[tuple[str, str]] = []
    loose: list[str] = []
    for path in inp.scan_files:
        data = path.read_bytes()
        hits += [
            (label, str(path)) for label, ns in needles.items() if any(n and n in data for n in ns)
        ]
        if (path.name.endswith(".key") or path.name == "keys.json") and stat.S_IMODE(
            os.stat(path).st_mode
        ) & 0o077:
            loose.append(str(path))
    table = [["planted", "found in"]] + [[label, f] for label, f in hits[:50]]
    details = {
        "files": len(inp.scan_files),
        "needles": len(needles),
        "hits": [{"needle": label, "file": f} for label, f in hits],
        "loose_key_files": loose,
    }
    if hits or loose:
        parts = []
        if hits:
            parts.append(f"{len(hits)} planted value(s) found in the {inp.role}'s files")
        if loose:
            parts.append(f"{len(loose)} key file(s) readable by group/others")
        return CheckResult(
            "secrets", "Secrets at rest and in logs", Status.FAIL, "; ".join(parts), details, table
        )
    return CheckResult(
        "secrets",
        "Secrets at rest and in logs",
        Status.PASS,
        f"none of {details['needles']} planted values in the {inp.role}'s {len(inp.scan_files)} "
        "files; key files are 0600",
        details,
    )


# -- 7. leakage profile -----------------------------------------------------------------------
#: What each party learns, per mode (LEAKAGE.md, condensed).
PROFILE: dict[str, dict[str, str]] = {
    "mailbox": {
        "coordinator": (
            "uniform C-shares; which participant posted to which slot (pseudonymous contact "
            "graph, dummies included); per-slot counts; registrations and fetches; sizes and "
            "timing; opened aggregates"
        ),
        "aggregator": (
            "uniform A-shares (seeds); the sender→slot graph from the relay; per-slot counts; "
            "which registrant fetched"
        ),
        "a device": (
            "the total of each of its slot groups (its day's beacons: its day's neighbourhood "
            "sum), never one slot's sum, once per phase"
        ),
        "a server (C or A) + t devices": (
            "the colluders' own values and totals; a colluder's day total minus their items = "
            "the honest contributions to it (one honest contributor that day: its value, and "
            "the server knows who)"
        ),
        "coordinator + aggregator": "everything (they add their shares): outside the threat model",
    },
    "shuffled": {
        "coordinator": (
            "that each participant posted (fixed count and size); shuffled C-items (slot, uniform"
            " share) without senders; per-slot counts (padded); registrations and fetches; opened"
            " aggregates"
        ),
        "aggregator": (
            "that each participant posted; A-items (slot, seed) shuffled by C, without senders; "
            "per-slot counts (padded)"
        ),
        "a device": (
            "the total of each of its slot groups (its day's beacons: its day's neighbourhood "
            "sum), never one slot's sum, once per phase"
        ),
        "a server (C or A) + t devices": (
            "the same subtraction on values; the sender of a lone honest contribution stays "
            "hidden (no sender↔slot link)"
        ),
        "coordinator + aggregator": (
            "everything, including senders (contribution ids link the two shares): outside the "
            "threat model"
        ),
    },
    "dense": {
        "coordinator": (
            "that each participant posted (one uniform share of every slot: the same size for "
            "every participant, no slot choice); registrations and fetches; opened aggregates; "
            "no per-slot counts of contributions"
        ),
        "aggregator": (
            "that each participant posted (a sealed seed: uniform shares of every slot); "
            "registrations; no per-slot counts of contributions"
        ),
        "a device": (
            "the total of each of its slot groups (its day's beacons: its day's neighbourhood "
            "sum), never one slot's sum, once per phase"
        ),
        "a server (C or A) + t devices": (
            "the same subtraction on values; the sender of a lone honest contribution stays "
            "hidden (every participant posts to every slot)"
        ),
        "coordinator + aggregator": "everything (they add their shares): outside the threat model",
    },
    "plaintext": {
        "coordinator": "every raw value with its sender and slot (INSECURE baseline)",
        "aggregator": "nothing of value (zero shares); the sender→slot graph from the relay",
        "a device": "the total of each of its slot groups (its day's neighbourhood sum)",
        "a server (C or A) + t devices": "everything",
        "coordinator + aggregator": "everything",
    },
}

#: every mode: what the auditor of one server learns (LEAKAGE.md, "Auditors")
AUDITOR_ROW = (
    "a server's auditor",
    "exactly that server's view: its transcript and what its own keys open; never the other "
    "server's (the two auditors together would hold what C + A hold)",
)

#: message types each server may receive, per mode (from devices / from the other server)
_ALLOWED: dict[str, dict[str, set[str]]] = {
    "coordinator": {
        "device": {"RegisterRequest", "DirectoryRequest", "FetchRequest"},
        "server": {
            "Agreed",
            "RegisterResponse",
            "KeySetReply",
            "AggregateShares",
            "FetchReply",
            "ErrorReply",
        },
    },
    "aggregator": {
        "device": set(),
        "server": {
            "OpenRound",
            "RelayRegister",
            "CloseRegistration",
            "KeySetOffer",
            "SurvivingSet",
            "AggregateRequest",
            "RelayFetch",
        },
    },
}


def _allowed(role: str, mode: Mode) -> dict[str, set[str]]:
    allowed = {k: set(v) for k, v in _ALLOWED[role].items()}
    shuffled = mode is Mode.SHUFFLED
    if role == "coordinator":
        allowed["device"].add("ShuffledPost" if shuffled else "MailboxPost")
        allowed["server"].add("ShuffledForC" if shuffled else "RelayReceipt")
    else:
        allowed["server"].add("RelayShuffled" if shuffled else "RelayMailbox")
    return allowed


def check_profile(inp: AuditInput) -> CheckResult:
    """The leakage profile of the run's configuration, and a check that the server's transcript
    holds only the message types its mode allows (e.g. no mailbox post, with its sender↔slot
    pairs, reaches C in shuffled mode; A never hears from a device). Messages that do not decode
    are not protocol messages: they are counted as unused, not judged here."""
    mode = inp.mode.value
    role = inp.role
    allowed = _allowed(role, inp.mode)
    seen: dict[str, int] = defaultdict(int)
    violations: list[str] = []
    for r in inp.view.records:
        if r.direction != "in" or r.kind == "?":
            continue
        src = "server" if r.peer in ("coordinator", "aggregator") else "device"
        seen[r.kind] += 1
        if r.kind not in allowed[src]:
            violations.append(f"{role} received {r.kind} from a {src}")
    elided, mismatched = verify_elided(inp.view)
    violations = sorted(set(violations)) + mismatched
    counts = {role: dict(seen)}
    regs = registrations(inp.view, inp.group_slots)
    participants = regs.participants
    table = [["party", f"learns ({mode})"]] + [[p, t] for p, t in PROFILE[mode].items()]
    table.append(list(AUDITOR_ROW))
    config = {
        "mode": mode,
        "participants": len(participants),
        "rounds": len(regs.rounds()),
        "registered_slots": len(regs),
        "items_per_device": inp.config.get("items_per_device"),
        "pools": inp.config.get("pools"),
        "min_cohort": inp.min_cohort,
        "dp": inp.config.get("dp"),
    }
    if violations:
        return CheckResult(
            "profile",
            "Leakage profile",
            Status.FAIL,
            f"the {role}'s transcript holds messages outside the {mode} profile, or elided "
            "records that differ from what it determines: "
            f"{'; '.join(violations[:5])}",
            {"config": config, "messages": counts, "violations": violations, "elided": elided},
            table,
        )
    status = Status.LEAK if inp.mode is Mode.PLAINTEXT else Status.PASS
    return CheckResult(
        "profile",
        "Leakage profile",
        status,
        f"{mode} mode; every message the {role} received fits the profile"
        + (" (plaintext is the insecure baseline)" if status is Status.LEAK else ""),
        {"config": config, "messages": counts, "violations": [], "elided": elided},
        table,
    )


# -- 8. behaviour table ------------------------------------------------------------------------
#: What each party learns of a table/llm run's behaviour (behaviour/LEAKAGE.md, condensed).
BEHAVIOUR_PROFILE: dict[str, str] = {
    "everyone (public)": (
        "the archetype grid (cell attributes and levels), each period's row of the behaviour "
        "table, the stimulus policy, the opened daily aggregates (employment included)"
    ),
    "the language model's endpoint": (
        "one question per grid cell, behaviour and period (every cell, inhabited or not): a "
        "cell's attributes and the period's public numbers; when periods start"
    ),
    "the coordinator": "the rows it makes and the model's answers (no device's draw)",
    "a device": "its period's row; its own agent's draws, which never leave it",
}


def check_behaviour(inp: AuditInput) -> CheckResult:
    """A table/llm run's behaviour table came from public inputs only: the coordinator's rows
    equal the table file's, or a language model's answers to prompts that render only a grid
    cell and public numbers recomputed from the opened aggregates (:mod:`audit.behaviour`)."""
    status, message, details = behaviour_verdict(inp)
    table = [["party", "learns of the behaviour"]] + [[p, t] for p, t in BEHAVIOUR_PROFILE.items()]
    return CheckResult(
        "behaviour", "Behaviour table from public inputs", Status(status), message, details, table
    )


def run_checks(
    inp: AuditInput, colluders: int = 1, cohort_k: int = 2, max_open: int = 200_000
) -> AuditResult:
    """Every check of the audited server's view, in report order, with everything the audit
    could not use, by stage and reason (see :class:`AuditResult`)."""
    shares = shares_of(inp, max_open)
    checks = [
        check_uniformity(inp, shares),
        check_reconstruction(inp, shares, colluders),
        check_linkage(inp, shares),
        check_cohorts(inp, shares, cohort_k),
        check_dp(inp),
        check_secrets(inp),
        check_profile(inp),
        check_behaviour(inp),
    ]
    stages: dict[str, Counter[str] | dict[str, int]] = {
        "transcript": transcript_unused(inp.view, inp.codecs),
        "shares": shares.unused,
        "truth": inp.truth.unused if inp.truth is not None else Counter(),
        **{f"check: {c.key}": c.unused for c in checks},
    }
    unused = {
        stage: {k: v for k, v in sorted(reasons.items()) if v}
        for stage, reasons in stages.items()
        if any(reasons.values())
    }
    return AuditResult(inp.role, checks, unused)
