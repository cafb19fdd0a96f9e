"""Every check on crafted views: it passes on the real protocol and fails where it must."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from audit.checks import (
    Status,
    check_cohorts,
    check_dp,
    check_linkage,
    check_profile,
    check_reconstruction,
    check_secrets,
    check_uniformity,
    run_checks,
    shares_of,
)
from audit.report import write_report
from audit.truth import bytes_needles, float_needles
from audit.views import AuditInput, ServerView
from contract.transcript import decode_record, encode_record
from protocols.secure_sum import Mode
from protocols.secure_sum.messages import MailboxPost

from .conftest import crafted, identity, write_files


# -- 1. uniformity ------------------------------------------------------------------------------
def test_uniformity_passes_on_shares_and_fails_on_plaintext(
    mailbox: AuditInput, plaintext: AuditInput
) -> None:
    ok = check_uniformity(mailbox, shares_of(mailbox))
    assert ok.status is Status.PASS, ok.summary
    assert set(ok.details["series"]) == {"coordinator", "aggregator"}
    assert ok.details["series"]["coordinator"]["words"] >= 2048
    # the plaintext control (the values themselves) is far from uniform
    assert min(ok.details["control"].values()) < ok.details["threshold"]
    bad = check_uniformity(plaintext, shares_of(plaintext))
    assert bad.status is Status.FAIL
    assert bad.summary.startswith("non-uniform shares at aggregator, coordinator")


def test_uniformity_skips_without_enough_words() -> None:
    small = crafted(Mode.MAILBOX, n=4)
    r = check_uniformity(small, shares_of(small))
    assert r.status is Status.SKIP and "fewer than 2048" in r.summary


# -- 2. reconstruction -------------------------------------------------------------------------
def test_reconstruction_no_single_server_recovers_but_both_do(
    mailbox: AuditInput, shuffled: AuditInput
) -> None:
    for inp in (mailbox, shuffled):
        r = check_reconstruction(inp, shares_of(inp), colluders=1)
        att = r.details["attackers"]
        assert r.status is Status.PASS, r.summary
        assert att["coordinator"]["recovered"] == att["aggregator"]["recovered"] == 0
        # the boundary: C and A together add their shares and recover every contribution
        assert att["coordinator + aggregator"]["rate"] == 1.0
        assert r.details["targets"] == 3 * 39  # participant 0 colludes


def test_reconstruction_fails_on_plaintext(plaintext: AuditInput) -> None:
    r = check_reconstruction(plaintext, shares_of(plaintext))
    assert r.status is Status.FAIL
    assert r.details["attackers"]["coordinator"]["recovered_nonzero"] == 3 * 39
    assert "coordinator alone recovered 117 value(s)" in r.summary


def test_reconstruction_small_cohort_subtraction_is_reported_as_documented() -> None:
    # degree 1: the colluder's slot receives exactly one honest message, which it can subtract
    inp = crafted(Mode.MAILBOX, n=40, degree=1)
    r = check_reconstruction(inp, shares_of(inp), colluders=1)
    coll = r.details["attackers"]["coordinator + 1 colluding pool(s)"]
    assert r.status is Status.LEAK, r.summary
    assert coll["documented_small_cohort"] == 1 and coll["undocumented"] == 0


def test_reconstruction_control_failure_fails_the_check(mailbox: AuditInput) -> None:
    # a wrong ground truth: the C + A control cannot match it, so the audit refuses to vouch
    assert mailbox.truth is not None
    wrong = [dataclasses.replace(it, value=it.value + 1.0) for it in mailbox.truth.items]
    inp = dataclasses.replace(mailbox, truth=dataclasses.replace(mailbox.truth, items=wrong))
    r = check_reconstruction(inp, shares_of(inp))
    assert r.status is Status.FAIL and "control C + A recovered only 0.0%" in r.summary


# -- 3. linkage --------------------------------------------------------------------------------
def test_linkage_documented_in_mailbox_chance_in_shuffled(
    mailbox: AuditInput, shuffled: AuditInput
) -> None:
    mb = check_linkage(mailbox, shares_of(mailbox))
    assert mb.status is Status.LEAK
    assert mb.details["servers"]["coordinator"]["recall"] == 1.0
    assert mb.details["servers"]["coordinator"]["z"] > 5.33
    sh = check_linkage(shuffled, shares_of(shuffled))
    assert sh.status is Status.PASS, sh.summary
    for role in ("coordinator", "aggregator"):
        assert sh.details["servers"][role]["z"] < 5.33


def test_linkage_fails_in_shuffled_mode_when_servers_keep_arrival_order() -> None:
    inp = crafted(Mode.SHUFFLED, a_permutation=identity, c_permutation=identity)
    r = check_linkage(inp, shares_of(inp))
    assert r.status is Status.FAIL
    assert r.summary == (
        "shuffled mode promises unlinkability, but aggregator, coordinator link(s) senders to slots"
    )
    assert r.details["servers"]["coordinator"]["recall"] == 1.0


# -- 4. small cohorts --------------------------------------------------------------------------
def test_cohorts_counts_slots_below_k(mailbox: AuditInput) -> None:
    shares = shares_of(mailbox)
    assert check_cohorts(mailbox, shares, k=3).status is Status.PASS  # every slot sums 3
    r = check_cohorts(mailbox, shares, k=4)
    assert r.status is Status.LEAK
    assert r.details["below_k_devices"] == r.details["slots"] == 40


def test_cohorts_fail_when_a_minimum_cohort_is_not_enforced(mailbox: AuditInput) -> None:
    # the servers ran without suppression: a claimed minimum of 1000 is violated by every fetch
    inp = dataclasses.replace(mailbox, min_cohort=1000)
    r = check_cohorts(inp, shares_of(inp))
    assert r.status is Status.FAIL
    assert r.summary == "40 slot(s) below the minimum cohort 1000 were released"


# -- 6. secrets --------------------------------------------------------------------------------
def test_secrets_scan_finds_planted_values_and_loose_keys(
    mailbox: AuditInput, tmp_path: Path
) -> None:
    assert mailbox.truth is not None
    secret, value = b"\x13" * 32, 0.123456789012345
    truth = dataclasses.replace(
        mailbox.truth, needles={"pool secret": bytes_needles(secret), "state": float_needles(value)}
    )
    clean = write_files(
        tmp_path / "ok", {"coordinator/views/coordinator.jsonl": b'{"event": "x"}\n'}
    )
    inp = dataclasses.replace(mailbox, truth=truth, scan_files=clean)
    assert check_secrets(inp).status is Status.PASS
    for i, leak in enumerate([secret, secret.hex().encode(), repr(value).encode()]):
        files = write_files(
            tmp_path / f"leak{i}", {"aggregator/aggregator.log": b"x " + leak + b"\n"}
        )
        r = check_secrets(dataclasses.replace(inp, scan_files=files))
        assert r.status is Status.FAIL
        assert r.details["hits"][0]["file"] == str(files[0])
    # the other server's private key in a server's files is a finding too
    c_key = mailbox.servers["coordinator"].keys["neighbourhood"].private.private_bytes_raw()
    files = write_files(tmp_path / "cross", {"aggregator/notes.txt": c_key.hex().encode()})
    r = check_secrets(dataclasses.replace(inp, scan_files=files))
    assert r.status is Status.FAIL
    assert r.details["hits"] == [
        {"needle": "coordinator private key (neighbourhood)", "file": str(files[0])}
    ]
    files = write_files(tmp_path / "perm", {"coordinator/keys.json": b"{}"})
    files[0].chmod(0o644)
    r = check_secrets(dataclasses.replace(inp, scan_files=files))
    assert r.status is Status.FAIL and r.details["loose_key_files"] == [str(files[0])]


# -- 7. profile --------------------------------------------------------------------------------
def test_profile_flags_a_message_outside_the_mode(shuffled: AuditInput) -> None:
    assert check_profile(shuffled).status is Status.PASS
    post = MailboxPost(b"\x01" * 16, 7, "messages", 4, b"\x00" * 16, b"\x00" * 32, b"x")
    rec = decode_record(0, encode_record("in", 0.0, "neighbourhood", "01" * 16, post.to_bytes()))
    c = shuffled.servers["coordinator"]
    tampered = dataclasses.replace(
        shuffled,
        servers={**shuffled.servers, "coordinator": ServerView(c.role, [*c.records, rec], c.keys)},
    )
    r = check_profile(tampered)
    assert r.status is Status.FAIL
    assert r.details["violations"] == ["coordinator received MailboxPost from a device"]


# -- the whole report ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [Mode.MAILBOX, Mode.PLAINTEXT])
def test_report_files_and_verdict(
    mode: Mode, mailbox: AuditInput, plaintext: AuditInput, tmp_path: Path
) -> None:
    inp = mailbox if mode is Mode.MAILBOX else plaintext
    results = run_checks(inp)
    data = write_report(inp, results, tmp_path)
    assert data["verdict"] == ("pass" if mode is Mode.MAILBOX else "fail")
    for name in ("audit.json", "report.md", "report.html", "uniformity.png", "linkage.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert [c["key"] for c in data["checks"]] == [
        "uniformity",
        "reconstruction",
        "linkage",
        "cohorts",
        "dp",
        "secrets",
        "profile",
    ]
    assert np.isfinite(data["checks"][0]["details"]["threshold"])


# -- 5. differential privacy --------------------------------------------------------------------
def test_dp_reports_the_guarantee_of_the_configured_noise(mailbox: AuditInput) -> None:
    assert check_dp(mailbox).status is Status.SKIP
    conf = {"sigma": 2.0, "delta": 1e-6, "coordinates": 8, "frac_bits": 16, "l2_sensitivity": 1.0}
    r = check_dp(dataclasses.replace(mailbox, config={"dp": conf, "days": 3}))
    assert r.status is Status.PASS, r.summary
    eps = {k: v for k, v in r.details["privacy"].items() if k.startswith("epsilon_")}
    assert eps and all(0 < v < 100 for v in eps.values())
    assert r.details["privacy"]["releases"] == 3  # no aggregate phase in the views: days
    bad = check_dp(dataclasses.replace(mailbox, config={"dp": {**conf, "delta": 2.0}}))
    assert bad.status is Status.FAIL and "DP configuration is invalid" in bad.summary
