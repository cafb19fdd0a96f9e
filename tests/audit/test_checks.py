"""Every check on crafted views: it passes on the real protocol and fails where it must."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from audit.checks import (
    NOT_ENCODABLE,
    OUTSIDE_ROUNDS,
    Status,
    _per_round,
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
from audit.views import (
    ITEM_NOT_OPENED,
    MALFORMED_POST,
    NOT_SAMPLED,
    OUTER_NOT_OPENED,
    REPLAYED,
    AuditInput,
    Rows,
    Truth,
)
from contract.transcript import TranscriptRecord, decode_record, encode_record
from protocols.secure_sum import Mode
from protocols.secure_sum.messages import DirectoryRequest, MailboxPost, RelayShuffled

from .conftest import DIM, ROUND, colluding_recovery, crafted, identity, write_files


# -- 1. uniformity ------------------------------------------------------------------------------
def test_uniformity_passes_on_shares_and_fails_on_plaintext(
    mailbox: dict[str, AuditInput], plaintext: dict[str, AuditInput]
) -> None:
    for role, inp in mailbox.items():
        ok = check_uniformity(inp, shares_of(inp))
        assert ok.status is Status.PASS, ok.summary
        assert set(ok.details["series"]) == {role}
        assert ok.details["series"][role]["words"] >= 2048
        # the plaintext control (the true values, from the ground truth) is far from uniform
        assert min(ok.details["control"].values()) < ok.details["threshold"]
    for role, inp in plaintext.items():
        bad = check_uniformity(inp, shares_of(inp))
        assert bad.status is Status.FAIL
        assert bad.summary.startswith(f"non-uniform shares at the {role}")


def test_uniformity_skips_without_enough_words() -> None:
    small = crafted(Mode.MAILBOX, n=4)["coordinator"]
    r = check_uniformity(small, shares_of(small))
    assert r.status is Status.SKIP and "fewer than 2048" in r.summary


# -- 2. reconstruction -------------------------------------------------------------------------
def test_reconstruction_no_single_server_recovers_but_both_do(
    mailbox: dict[str, AuditInput], shuffled: dict[str, AuditInput]
) -> None:
    for views in (mailbox, shuffled):
        for role, inp in views.items():
            r = check_reconstruction(inp, shares_of(inp), colluders=1)
            assert r.status is Status.PASS, r.summary
            assert r.details["attackers"][role]["recovered"] == 0
            assert r.details["targets"] == 3 * 39  # participant 0 colludes
            # the positive control: every true contribution is paired with the server's rows
            control = r.details["control"]
            assert control["recovered"] == control["expected"] == control["units"] > 0
            assert not control["failed"] and control["unopened_items"] == 0
        # the boundary, outside the product (no single audit holds both views): C and A add
        # their shares and recover every contribution
        assert colluding_recovery(views["coordinator"], views["aggregator"]) == 1.0


def test_reconstruction_fails_on_plaintext(plaintext: dict[str, AuditInput]) -> None:
    inp = plaintext["coordinator"]
    r = check_reconstruction(inp, shares_of(inp))
    assert r.status is Status.FAIL
    assert r.details["attackers"]["coordinator"]["recovered_nonzero"] == 3 * 39
    assert "coordinator alone recovered 117 value(s)" in r.summary


def test_reconstruction_small_cohort_subtraction_is_reported_as_documented() -> None:
    # degree 1: the colluder's slot receives exactly one honest message, which it can subtract
    for role, inp in crafted(Mode.MAILBOX, n=40, degree=1).items():
        r = check_reconstruction(inp, shares_of(inp), colluders=1)
        coll = r.details["attackers"][f"{role} + 1 colluding pool(s)"]
        assert r.status is Status.LEAK, r.summary
        assert coll["documented_small_cohort"] == 1 and coll["undocumented"] == 0


def _wrong_slots(inp: AuditInput) -> AuditInput:
    """``inp`` with a ground truth whose slots are not the ones the devices posted to (e.g. a
    truth recomputed with the wrong deployment key): the control cannot pair it."""
    assert inp.truth is not None
    wrong = {
        dep: dataclasses.replace(t, slot=t.slot ^ np.uint8(0x5A))
        for dep, t in inp.truth.tables.items()
    }
    return dataclasses.replace(inp, truth=dataclasses.replace(inp.truth, tables=wrong))


def test_reconstruction_control_failure_fails_the_check(mailbox: dict[str, AuditInput]) -> None:
    for role, inp in mailbox.items():
        r = check_reconstruction(_wrong_slots(inp), shares_of(inp))
        assert r.status is Status.FAIL, r.summary
        assert r.details["control"]["recovered"] == 0 and r.details["control"]["failed"]
        assert f"the control ({role}'s shares completed from the ground truth)" in r.summary
        assert "the audit cannot vouch for its attacks" in r.summary


def test_reconstruction_control_runs_on_the_opened_sample(
    shuffled: dict[str, AuditInput],
) -> None:
    # 640 items per batch, 200 opened: before, the control was skipped whenever an item was
    # left unopened — on every large run
    for inp in shuffled.values():
        sample = shares_of(inp, max_open=200)
        ok = check_reconstruction(inp, sample)
        control = ok.details["control"]
        assert ok.details["unopened_items"] == control["unopened_items"] == 440
        assert ok.status is Status.PASS, ok.summary
        # a (round, slot) with t true items has an opened row with probability ≥ the
        # hypergeometric bound; dummies at the slot only raise it
        assert control["expected"] < control["units"] == 40
        assert control["recovered"] >= control["expected"] and not control["failed"]
        bad = check_reconstruction(_wrong_slots(inp), sample)
        assert bad.status is Status.FAIL, bad.summary
        assert bad.details["control"]["failed"] and bad.details["control"]["z"] < -5.33
        assert "expected on the opened sample (440 item(s) not opened)" in bad.summary


# -- 3. linkage --------------------------------------------------------------------------------
def test_linkage_documented_in_mailbox_chance_in_shuffled(
    mailbox: dict[str, AuditInput], shuffled: dict[str, AuditInput]
) -> None:
    for role, inp in mailbox.items():  # both servers see the sender→slot graph in mailbox mode
        mb = check_linkage(inp, shares_of(inp))
        assert mb.status is Status.LEAK
        assert set(mb.details["servers"]) == {role}
        assert mb.details["servers"][role]["recall"] == 1.0
        assert mb.details["servers"][role]["z"] > 5.33
    for role, inp in shuffled.items():
        sh = check_linkage(inp, shares_of(inp))
        assert sh.status is Status.PASS, sh.summary
        assert sh.details["servers"][role]["z"] < 5.33


def test_linkage_fails_in_shuffled_mode_when_servers_keep_arrival_order() -> None:
    for role, inp in crafted(Mode.SHUFFLED, a_permutation=identity, c_permutation=identity).items():
        r = check_linkage(inp, shares_of(inp))
        assert r.status is Status.FAIL
        assert r.summary == (
            f"shuffled mode promises unlinkability, but {role} link(s) senders to slots"
        )
        assert r.details["servers"][role]["recall"] == 1.0


def test_dense_mode_audits_clean_at_both_servers() -> None:
    """Every participant posts a uniform share of every slot: linkage at chance (the complete
    poster↔slot graph carries nothing), uniform shares, no message outside the profile, and no
    single server recovers a value."""
    for role, inp in crafted(Mode.DENSE).items():
        shares = shares_of(inp)
        rows = shares.rows["neighbourhood"]
        # 40 posts, each a share of all 40 registered slots
        assert len(rows) == 40 * 40
        link = check_linkage(inp, shares)
        assert link.status is Status.PASS, link.summary
        stats = link.details["servers"][role]
        assert stats["asserted_edges"] == 40 * 40 and stats["z"] == 0.0
        assert stats["precision"] == stats["chance_precision"]
        for check in (check_uniformity(inp, shares), check_profile(inp)):
            assert check.status is Status.PASS, check.summary
        rec = check_reconstruction(inp, shares)
        assert rec.status is Status.PASS, rec.summary
        result = run_checks(inp)
        assert result.verdict == "pass", [(r.key, r.summary) for r in result.checks]
        # past --max-open every post keeps the same sampled slot positions
        sampled = shares_of(inp, max_open=80)
        small = sampled.rows["neighbourhood"]
        assert len(small) == 40 * 2 and sampled.unused[NOT_SAMPLED] == 40 * 38
        assert len({bytes(s) for s in small.slot}) == 2
        assert check_linkage(inp, sampled).status is Status.PASS
        # the control expects only the contributions at the opened positions (2 of 40 slots)
        rec = check_reconstruction(inp, sampled)
        assert rec.status is Status.PASS, rec.summary
        control = rec.details["control"]
        assert control["expected"] == pytest.approx(control["units"] * 2 / 40)
        assert 0 < control["recovered"] < control["units"]


def test_dense_mode_audit_fails_when_posts_are_not_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken PRG (an all-zero mask) makes every dense post its raw sums: the zeros where a
    participant contributed nothing name its slots (linkage fails) and its shares are not
    uniform."""
    import protocols.secure_sum.sharing as sharing

    monkeypatch.setattr(sharing, "_keystream", lambda seed, n_bytes: bytes(n_bytes))
    c = crafted(Mode.DENSE)["coordinator"]
    shares = shares_of(c)
    link = check_linkage(c, shares)
    assert link.status is Status.FAIL
    assert (
        link.summary
        == "dense mode promises unlinkability, but coordinator link(s) senders to slots"
    )
    assert link.details["servers"]["coordinator"]["precision"] == 1.0
    assert check_uniformity(c, shares).status is Status.FAIL


# -- 4. small cohorts --------------------------------------------------------------------------
def test_cohorts_counts_slots_below_k(mailbox: dict[str, AuditInput]) -> None:
    inp = mailbox["coordinator"]
    shares = shares_of(inp)
    assert check_cohorts(inp, shares, k=3).status is Status.PASS  # every slot sums 3
    r = check_cohorts(inp, shares, k=4)
    assert r.status is Status.LEAK
    assert r.details["below_k_devices"] == r.details["slots"] == 40


def test_cohorts_fail_when_a_minimum_cohort_is_not_enforced(
    mailbox: dict[str, AuditInput],
) -> None:
    # the servers ran without suppression: a claimed minimum of 1000 is violated by every fetch
    inp = dataclasses.replace(mailbox["coordinator"], min_cohort=1000)
    r = check_cohorts(inp, shares_of(inp))
    assert r.status is Status.FAIL
    assert r.summary == "40 of the slots below the minimum cohort 1000 were released"
    # the aggregator's replies are boxed to the registrant: its audit says it cannot tell
    a = dataclasses.replace(mailbox["aggregator"], min_cohort=1000)
    r = check_cohorts(a, shares_of(a))
    assert r.status is Status.SKIP and "cannot show what it released" in r.summary


def test_cohorts_count_a_device_day_not_a_beacon() -> None:
    """With the day's beacons as one slot group, a registrant learns only the group's total:
    the cohort is the group's. Read per beacon, the same run has slots of one contact."""
    inp = crafted(Mode.MAILBOX, group=3)["coordinator"]
    shares = shares_of(inp)
    r = check_cohorts(inp, shares, k=3)
    assert r.status is Status.PASS, r.summary  # every device-day sums its 3 contacts
    assert r.details["slots"] == 40 and r.details["unit"] == "device-days (slot groups)"
    per_beacon = check_cohorts(dataclasses.replace(inp, group_slots=1), shares, k=3)
    assert per_beacon.status is Status.LEAK and per_beacon.details["slots"] > 40
    assert per_beacon.details["single_contact"] > 0


def test_subtraction_on_a_group_total_recovers_only_a_lone_honest_contact() -> None:
    """Degree 1 with groups of 3: the colluder's day total holds exactly one honest message
    (documented, as for one slot); degree 3: three honest messages sum in each day total, so
    subtracting recovers none of them, though per beacon some slots hold one."""
    for role, inp in crafted(Mode.MAILBOX, degree=1, group=3).items():
        r = check_reconstruction(inp, shares_of(inp), colluders=1)
        coll = r.details["attackers"][f"{role} + 1 colluding pool(s)"]
        assert r.status is Status.LEAK, r.summary
        assert coll["documented_small_cohort"] == 1 and coll["undocumented"] == 0
    for role, inp in crafted(Mode.MAILBOX, degree=3, group=3).items():
        r = check_reconstruction(inp, shares_of(inp), colluders=1)
        coll = r.details["attackers"][f"{role} + 1 colluding pool(s)"]
        assert r.status is Status.PASS, r.summary
        assert coll["recovered_nonzero"] == 0


# -- 6. secrets --------------------------------------------------------------------------------
def test_secrets_scan_finds_planted_values_and_loose_keys(
    mailbox: dict[str, AuditInput], tmp_path: Path
) -> None:
    c = mailbox["coordinator"]
    assert c.truth is not None
    secret, value = b"\x13" * 32, 0.123456789012345
    truth = dataclasses.replace(
        c.truth, needles={"pool secret": bytes_needles(secret), "state": float_needles(value)}
    )
    clean = write_files(
        tmp_path / "ok", {"coordinator/views/coordinator.jsonl": b'{"event": "x"}\n'}
    )
    inp = dataclasses.replace(c, truth=truth, scan_files=clean)
    assert check_secrets(inp).status is Status.PASS
    for i, leak in enumerate([secret, secret.hex().encode(), repr(value).encode()]):
        files = write_files(
            tmp_path / f"leak{i}", {"coordinator/coordinator.log": b"x " + leak + b"\n"}
        )
        r = check_secrets(dataclasses.replace(inp, scan_files=files))
        assert r.status is Status.FAIL
        assert r.details["hits"][0]["file"] == str(files[0])
    # the other server's private key in a server's files is a finding too; the product's audit
    # of one server does not hold it (only both auditors together would), so this test — which
    # holds both views — plants it as a needle
    a_key = mailbox["aggregator"].view.keys["neighbourhood"].private.private_bytes_raw()
    files = write_files(tmp_path / "cross", {"coordinator/notes.txt": a_key.hex().encode()})
    crossed = dataclasses.replace(truth, needles={"aggregator private key": bytes_needles(a_key)})
    r = check_secrets(dataclasses.replace(inp, truth=crossed, scan_files=files))
    assert r.status is Status.FAIL
    assert r.details["hits"] == [{"needle": "aggregator private key", "file": str(files[0])}]
    files = write_files(tmp_path / "perm", {"coordinator/keys.json": b"{}"})
    files[0].chmod(0o644)
    r = check_secrets(dataclasses.replace(inp, scan_files=files))
    assert r.status is Status.FAIL and r.details["loose_key_files"] == [str(files[0])]


# -- 7. profile --------------------------------------------------------------------------------
def _record(
    direction: str, peer: str, payload: bytes, deployment: str = "neighbourhood"
) -> TranscriptRecord:
    return decode_record(0, encode_record(direction, 0.0, deployment, peer, payload))


def test_profile_flags_a_message_outside_the_mode(shuffled: dict[str, AuditInput]) -> None:
    c = shuffled["coordinator"]
    assert check_profile(c).status is Status.PASS
    post = MailboxPost(b"\x01" * 16, 7, "messages", 4, b"\x00" * 8, b"\x00" * 32, b"x")
    view = dataclasses.replace(
        c.view, records=[*c.view.records, _record("in", "01" * 16, post.to_bytes())]
    )
    r = check_profile(dataclasses.replace(c, view=view))
    assert r.status is Status.FAIL
    assert r.details["violations"] == ["coordinator received MailboxPost from a device"]


@pytest.mark.parametrize("kind", ["DirectoryResponse", "RelayRegister", "RelayFetch"])
def test_profile_rebuilds_every_elided_record_and_fails_a_forged_one(
    mailbox: dict[str, AuditInput], kind: str
) -> None:
    """C records its directory replies and its relays of device requests only as digests (the
    rest of its transcript determines them); the audit rebuilds each one. A record whose digest
    is not the rebuilt message's — here, one byte of one digest flipped — fails the check."""
    c = mailbox["coordinator"]
    ok = check_profile(c)
    assert ok.status is Status.PASS and ok.details["elided"] == 81  # 40 + 40 relays, 1 directory
    records = list(c.view.records)
    i = next(i for i, r in enumerate(records) if r.elided and r.kind == kind)
    forged = bytearray(records[i].payload)
    forged[0] ^= 1
    records[i] = dataclasses.replace(records[i], stored=bytes(forged))
    r = check_profile(dataclasses.replace(c, view=dataclasses.replace(c.view, records=records)))
    assert r.status is Status.FAIL
    assert r.details["violations"] == [
        f"record {records[i].seq} (out {kind}) is not what the transcript determines"
    ]


# -- records the audit could not use -----------------------------------------------------------
def test_records_the_audit_cannot_use_are_counted_and_reported(
    mailbox: dict[str, AuditInput], shuffled: dict[str, AuditInput], tmp_path: Path
) -> None:
    c = mailbox["coordinator"]
    assert c.truth is not None
    # planted: an undecodable message, a message of an unknown deployment, a replayed post and
    # a post whose share is cut short; a truth item of a round the servers never ran and one
    # whose value the codec cannot encode
    replay = next(r for r in c.view.records if r.kind == "MailboxPost")
    short = MailboxPost(b"\xee" * 16, ROUND, "messages", DIM, b"\x07" * 8, b"\x00" * 8, b"x")
    planted = [
        _record("in", "ee" * 16, b"not a protocol message"),
        _record("in", "ee" * 16, DirectoryRequest(ROUND).to_bytes(), deployment="elsewhere"),
        replay,
        _record("in", "ee" * 16, short.to_bytes()),
    ]
    items = list(c.truth.items())
    first = items[0]
    planted_truth = Truth.from_items(
        [
            *items,
            dataclasses.replace(first, round_id=ROUND + 5),
            dataclasses.replace(first, value=np.full(DIM, np.nan)),
        ],
        c.truth.domains,
    )
    truth = dataclasses.replace(c.truth, tables=planted_truth.tables)
    inp = dataclasses.replace(
        c, view=dataclasses.replace(c.view, records=[*c.view.records, *planted]), truth=truth
    )
    audit = run_checks(inp)
    assert audit.unused == {
        "transcript": {
            "message of a deployment the audit has no codec for ('elsewhere')": 1,
            "undecodable protocol message (in)": 1,
        },
        "shares": {REPLAYED: 1, MALFORMED_POST: 1},
        "check: reconstruction": {OUTSIDE_ROUNDS: 1, NOT_ENCODABLE: 1},
    }
    data = write_report(inp, audit, tmp_path / "mailbox")
    assert data["unused"] == audit.unused
    reconstruction = next(ch for ch in data["checks"] if ch["key"] == "reconstruction")
    assert reconstruction["unused"] == {OUTSIDE_ROUNDS: 1, NOT_ENCODABLE: 1}
    for name in ("report.md", "report.html"):
        text = (tmp_path / "mailbox" / name).read_text()
        assert "undecodable protocol message (in)" in text and MALFORMED_POST in text
    # shuffled: items beyond --max-open, a relay replayed, and items that do not open (a
    # batch moved to another round: the round is bound into every item's envelope)
    a = shuffled["aggregator"]
    relay = next(r for r in a.view.records if r.kind == "RelayShuffled")
    msg = RelayShuffled.from_bytes(relay.payload)
    moved = dataclasses.replace(msg, round_id=ROUND + 1)
    view = dataclasses.replace(
        a.view,
        records=[*a.view.records, relay, _record("in", "coordinator", moved.to_bytes())],
    )
    audit = run_checks(dataclasses.replace(a, view=view), max_open=600)
    assert audit.unused["shares"] == {
        REPLAYED: 1,
        NOT_SAMPLED: 2 * 40,  # 640 items per batch, 600 opened, in both rounds
        OUTER_NOT_OPENED: 40,
        ITEM_NOT_OPENED: 600,
    }
    reconstruction = next(ch for ch in audit.checks if ch.key == "reconstruction")
    assert reconstruction.details["control"]["unopened_items"] == 80
    assert reconstruction.status is Status.PASS, reconstruction.summary


# -- the whole report ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [Mode.MAILBOX, Mode.PLAINTEXT])
@pytest.mark.parametrize("role", ["coordinator", "aggregator"])
def test_report_files_and_verdict(
    mode: Mode,
    role: str,
    mailbox: dict[str, AuditInput],
    plaintext: dict[str, AuditInput],
    tmp_path: Path,
) -> None:
    inp = (mailbox if mode is Mode.MAILBOX else plaintext)[role]
    audit = run_checks(inp)
    data = write_report(inp, audit, tmp_path)
    assert data["role"] == role and data["unused"] == {}
    assert data["verdict"] == ("pass" if mode is Mode.MAILBOX else "fail")
    for name in ("audit.json", "report.md", "report.html", "uniformity.png", "linkage.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert f"Privacy audit of the {role}" in (tmp_path / "report.md").read_text()
    assert [c["key"] for c in data["checks"]] == [
        "uniformity",
        "reconstruction",
        "linkage",
        "cohorts",
        "dp",
        "secrets",
        "profile",
        "behaviour",
    ]
    # a heuristic run has no table to check
    assert data["checks"][-1]["status"] == "skip"
    assert np.isfinite(data["checks"][0]["details"]["threshold"])


# -- 5. differential privacy --------------------------------------------------------------------
def test_dp_reports_the_guarantee_of_the_configured_noise(mailbox: dict[str, AuditInput]) -> None:
    inp = mailbox["coordinator"]
    assert check_dp(inp).status is Status.SKIP
    conf = {"sigma": 2.0, "delta": 1e-6, "coordinates": 8, "frac_bits": 16, "l2_sensitivity": 1.0}
    r = check_dp(dataclasses.replace(inp, config={"dp": conf, "days": 3}))
    assert r.status is Status.PASS, r.summary
    eps = {k: v for k, v in r.details["privacy"].items() if k.startswith("epsilon_")}
    assert eps and all(0 < v < 100 for v in eps.values())
    assert r.details["privacy"]["releases"] == 3  # no aggregate phase in the views: days
    bad = check_dp(dataclasses.replace(inp, config={"dp": {**conf, "delta": 2.0}}))
    assert bad.status is Status.FAIL and "DP configuration is invalid" in bad.summary


def _rows_of_rounds(rounds: list[int]) -> Rows:
    n = len(rounds)
    return Rows(
        np.asarray(rounds, dtype=np.int64),
        np.array(["messages"], dtype=object).repeat(n),
        np.zeros((n, 16), np.uint8),
        np.ones(n, bool),
        np.arange(n, dtype=np.uint8).repeat(8).reshape(n, 8),
        np.arange(n * DIM, dtype=np.int64).reshape(n, DIM),
        np.zeros((n, 16), np.uint8),
        np.arange(n, dtype=np.int64),
    )


def test_checks_score_a_run_one_round_at_a_time() -> None:
    """The attacks join on keys that start with the round, so the audit walks the rounds one at
    a time (memory for one round's joins): each round's rows in their order, and the indices of
    that round's true contributions, for every round either side has."""
    truth_rounds = np.asarray([3, 1, 1, 4], dtype=np.int64)
    unsorted = list(_per_round(_rows_of_rounds([2, 1, 2, 3, 1]), truth_rounds))
    assert [r.round_id.tolist() for r, _ in unsorted] == [[1, 1], [2, 2], [3], []]
    assert [r.position.tolist() for r, _ in unsorted] == [[1, 4], [0, 2], [3], []]
    assert [at.tolist() for _, at in unsorted] == [[1, 2], [], [0], [3]]
    # rows in round order (as posts arrive) are walked as views, not copies
    rows = _rows_of_rounds([1, 1, 2, 5])
    chunks = list(_per_round(rows, truth_rounds))
    assert [r.position.tolist() for r, _ in chunks] == [[0, 1], [2], [], [], [3]]
    assert all(np.shares_memory(r.share, rows.share) for r, _ in chunks if len(r))
