"""``decentsim bench vs-secaggplus``: arguments, parameters, and both protocols' sums."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from bench import secaggplus as bench
from bench.secaggplus import (
    AggregationFailed,
    BenchArgumentError,
    SecAggPlusParams,
    benchmark,
    client_vector,
    client_vectors,
    decentsim_error_bound,
    decentsim_rounds,
    run,
    secaggplus_rounds,
)
from contract.schedule import aggregates_codec
from protocols.secure_sum import Mode

REQUIRED_KEYS = {
    "clients",
    "dim",
    "secaggplus_s_per_round",
    "decentsim_s_per_round",
    "ratio",
    "secaggplus_max_abs_error",
    "decentsim_max_abs_error",
}


def parse(*argv: str) -> argparse.Namespace:
    """The bench's arguments as the CLI parses them."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_default_secaggplus_parameters_fit_the_modulus() -> None:
    p = SecAggPlusParams.for_clients(200)
    assert (p.num_shares, p.reconstruction_threshold) == (17, 12)
    # the finest power-of-two quantization whose N-fold sum stays below the 2^32 modulus
    assert p.quantization_range == 2**24
    assert 200 * p.quantization_range < 2**32 <= 200 * 2 * p.quantization_range
    assert p.sum_error_bound(200) == 200 * 2.0 / 2**24
    small = SecAggPlusParams.for_clients(3)
    assert (small.num_shares, small.reconstruction_threshold) == (3, 2)
    assert small.quantization_range == 2**30  # still below int32, which Flower quantizes into
    explicit = SecAggPlusParams.for_clients(50, 7, 5, 2**20)
    assert (explicit.num_shares, explicit.reconstruction_threshold) == (7, 5)
    assert explicit.quantization_range == 2**20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--clients", "2", "--dim", "16"), "--clients must be >= 3"),
        (("--clients", "5", "--dim", "0"), "--dim must be >= 1, got 0"),
        (("--clients", "5", "--dim", "4", "--rounds", "0"), "--rounds must be >= 1, got 0"),
        (("--clients", "5", "--dim", "4", "--warmup", "-1"), "--warmup must be >= 0, got -1"),
        (("--clients", "5", "--dim", "4", "--seed", "-3"), "--seed must be >= 0, got -3"),
        (
            ("--clients", "5", "--dim", "4", "--num-shares", "2"),
            r"--num-shares must be in \[3, --clients=5\]",
        ),
        (
            ("--clients", "5", "--dim", "4", "--num-shares", "6"),
            r"--num-shares must be in \[3, --clients=5\] .*, got 6$",
        ),
        (
            (
                "--clients",
                "5",
                "--dim",
                "4",
                "--num-shares",
                "5",
                "--reconstruction-threshold",
                "5",
            ),
            r"--reconstruction-threshold must be in \[2, num_shares=5\), got 5",
        ),
        (
            ("--clients", "200", "--dim", "4", "--quantization-range", str(2**25)),
            "--quantization-range must be >= 1, < 2\\^31 and keep clients × range below",
        ),
        (("--clients", "5", "--dim", "4", "--client-cpus", "0"), "--client-cpus must be > 0"),
    ],
)
def test_bad_arguments_are_refused_before_either_protocol_runs(
    argv: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a protocol ran despite a bad argument")

    monkeypatch.setattr(bench, "secaggplus_rounds", must_not_run)
    monkeypatch.setattr(bench, "decentsim_rounds", must_not_run)
    with pytest.raises(BenchArgumentError, match=message):
        run(parse(*argv))


def test_client_vectors_are_deterministic_per_seed_and_client() -> None:
    a = client_vectors(3, 6, 32)
    assert a.shape == (6, 32)
    assert np.array_equal(a, client_vectors(3, 6, 32))
    assert np.array_equal(a[4], client_vector(3, 4, 32))
    assert not np.array_equal(a, client_vectors(4, 6, 32))
    assert len({row.tobytes() for row in a}) == 6  # every client's vector differs
    assert ((a >= -1.0) & (a < 1.0)).all()


@pytest.mark.parametrize("mode", [Mode.MAILBOX, Mode.SHUFFLED])
def test_decentsim_rounds_release_the_exact_fixed_point_sum(mode: Mode) -> None:
    vectors = client_vectors(11, 4, 16)
    side = decentsim_rounds(vectors, rounds=2, warmup=1, mode=mode)
    assert len(side.sums) == 3 and len(side.seconds) == 2 and len(side.parts) == 2
    codec = aggregates_codec()
    ring_truth = codec.decode(codec.encode(vectors).sum(axis=0))
    exact = vectors.sum(axis=0)
    for s in side.sums:
        assert np.array_equal(s, ring_truth)  # the ring sum of the encoded vectors, bit for bit
        assert np.abs(s - exact).max() <= decentsim_error_bound(4)
    assert side.max_abs_error(exact) <= decentsim_error_bound(4)
    assert set(side.breakdown) == {"clients_building_posts", "servers"}


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_both_protocols_recover_the_sum_of_the_same_vectors(
    capfd: pytest.CaptureFixture[str],
) -> None:
    args = parse("--clients", "5", "--dim", "16", "--rounds", "1", "--warmup", "0", "--seed", "7")
    comparison = benchmark(args)
    out, _ = capfd.readouterr()
    assert out == ""  # Flower's and Ray's output went to stderr: stdout is the JSON line's

    exact = np.sum([client_vector(7, i, 16) for i in range(5)], axis=0)
    assert np.array_equal(comparison.exact, exact)
    sec_bound = comparison.params.sum_error_bound(5)
    dec_bound = decentsim_error_bound(5)
    # a mean instead of a sum, a missing client or a wrong vector is far outside the bounds
    assert np.abs(exact).max() > 1e4 * max(sec_bound, dec_bound)
    for side, bound in ((comparison.secaggplus, sec_bound), (comparison.decentsim, dec_bound)):
        assert len(side.sums) == 1 and len(side.seconds) == 1
        assert np.abs(side.sums[0] - exact).max() <= bound

    line = comparison.as_json()
    assert set(line) >= REQUIRED_KEYS
    assert json.loads(json.dumps(line)) == line
    assert (line["clients"], line["dim"], line["rounds"], line["warmup_rounds"]) == (5, 16, 1, 0)
    assert line["secaggplus_max_abs_error"] <= sec_bound
    assert line["decentsim_max_abs_error"] <= dec_bound
    assert line["ratio"] == round(
        comparison.secaggplus.seconds_per_round / comparison.decentsim.seconds_per_round, 2
    )
    assert line["secaggplus_params"]["num_shares"] == 5
    breakdown = line["secaggplus_breakdown_s_per_round"]
    assert breakdown["client_compute_total"] > 0  # every client reported through the timing mod
    assert breakdown["waiting_for_clients"] <= line["secaggplus_s_per_round"]


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_a_halted_secaggplus_round_is_an_error_not_a_zero_sum() -> None:
    # neighbourhoods of 5 among 3 clients can never reach a threshold of 4: the workflow halts
    # and leaves the initial (zero) parameters in place, which must not pass as a sum
    params = SecAggPlusParams(num_shares=5, reconstruction_threshold=4, quantization_range=2**20)
    with pytest.raises(AggregationFailed, match="round 1: SecAgg\\+ released no aggregate"):
        secaggplus_rounds(0, 3, 4, rounds=1, warmup=0, params=params, client_cpus=1.0)
