"""Tests for single-use enrolment tokens, device credentials and revocation."""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from identity.enrolment import (
    CredentialMismatch,
    DeviceRevoked,
    Enrolment,
    EnrolmentError,
    EnrolmentRegistry,
    InvalidKeyRequest,
    TokenCounts,
    TokenExpired,
    TokenReused,
    TokenUnknown,
    UnknownDevice,
    build_enrolment_csr,
    hash_token,
)
from identity.pki import CertificateRejected, LocalCA, verify_peer_certificate

UTC = dt.timezone.utc
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """A settable clock for expiry tests."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.load_or_create(tmp_path / "state", "test CA")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def registry(ca: LocalCA, clock: FakeClock) -> Iterator[EnrolmentRegistry]:
    with EnrolmentRegistry(ca.state_dir / "enrolment.sqlite3", ca, clock=clock) as reg:
        yield reg


def _device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _snapshot(path: Path) -> tuple[list[tuple], list[tuple]]:
    """Every row of both tables, read over a separate connection."""
    conn = sqlite3.connect(path)
    try:
        tokens = conn.execute("SELECT * FROM enrolment_tokens ORDER BY token_hash").fetchall()
        devices = conn.execute("SELECT * FROM devices ORDER BY device_id").fetchall()
    finally:
        conn.close()
    return tokens, devices


def test_mint_stores_only_hashes(registry: EnrolmentRegistry) -> None:
    tokens = registry.mint_tokens(5, dt.timedelta(hours=1))
    assert len(set(tokens)) == 5
    assert all(len(token) == 43 for token in tokens)  # token_urlsafe(32): 256 bits
    rows, devices = _snapshot(registry.db_path)
    assert devices == []
    assert sorted(row[0] for row in rows) == sorted(hash_token(token) for token in tokens)
    assert {(row[1], row[2], row[3]) for row in rows} == {
        (T0.timestamp(), (T0 + dt.timedelta(hours=1)).timestamp(), None)
    }
    raw = b"".join(p.read_bytes() for p in registry.db_path.parent.glob("enrolment.sqlite3*"))
    for token in tokens:
        assert token.encode() not in raw
    assert registry.token_counts() == TokenCounts(unused=5, used=0, expired=0)


def test_hash_is_domain_separated_sha256() -> None:
    import hashlib

    assert hash_token("abc") == hashlib.sha256(b"decentsim-enrolment-token-v1\x00abc").digest()
    assert hash_token("abc") != hashlib.sha256(b"abc").digest()


def test_database_is_private_wal_and_durable(registry: EnrolmentRegistry) -> None:
    assert stat.S_IMODE(registry.db_path.stat().st_mode) == 0o600
    conn = registry._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_redeem_with_csr_issues_a_device_certificate(
    registry: EnrolmentRegistry, ca: LocalCA
) -> None:
    (token,) = registry.mint_tokens(1, dt.timedelta(hours=1))
    key = _device_key()
    enrolment = registry.redeem(token, build_enrolment_csr(key))
    assert isinstance(enrolment, Enrolment)
    assert len(enrolment.device_id) == 32
    int(enrolment.device_id, 16)
    cert = verify_peer_certificate(enrolment.certificate_pem, ca, now=T0)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        enrolment.device_id
    )
    assert cert.public_key() == key.public_key()
    assert enrolment.ca_certificate_pem == ca.cert_pem
    assert enrolment.not_after == cert.not_valid_after_utc == T0 + dt.timedelta(days=365)
    assert registry.token_counts() == TokenCounts(unused=0, used=1, expired=0)
    assert registry.is_enrolled(enrolment.device_id)
    assert not registry.is_revoked(enrolment.device_id)
    assert registry.authenticate(enrolment.certificate_pem) == enrolment.device_id
    tokens, devices = _snapshot(registry.db_path)
    assert tokens[0][3] == T0.timestamp()  # used_at
    (device,) = devices
    assert device[0] == enrolment.device_id
    assert device[1] == format(cert.serial_number, "x")
    # The token row carries no device id: tokens cannot be joined to devices (an unlabelled
    # token has no label either; a labelled one names a role, which its device then holds).
    assert len(tokens[0]) == 5 and tokens[0][4] is None and device[-1] is None
    assert enrolment.device_id.encode() not in b"".join(str(value).encode() for value in tokens[0])


def test_redeem_with_public_key_pem(registry: EnrolmentRegistry, ca: LocalCA) -> None:
    (token,) = registry.mint_tokens(1, dt.timedelta(hours=1))
    key = _device_key()
    spki = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    enrolment = registry.redeem(token, spki.decode())
    cert = x509.load_pem_x509_certificate(enrolment.certificate_pem)
    assert cert.public_key() == key.public_key()


def test_device_ids_are_fresh(registry: EnrolmentRegistry) -> None:
    tokens = registry.mint_tokens(4, dt.timedelta(hours=1))
    csr = build_enrolment_csr(_device_key())
    ids = {registry.redeem(token, csr).device_id for token in tokens}
    assert len(ids) == 4


def test_reused_token_is_rejected_and_state_unchanged(registry: EnrolmentRegistry) -> None:
    (token,) = registry.mint_tokens(1, dt.timedelta(hours=1))
    registry.redeem(token, build_enrolment_csr(_device_key()))
    before = _snapshot(registry.db_path)
    with pytest.raises(TokenReused, match="already been used"):
        registry.redeem(token, build_enrolment_csr(_device_key()))
    assert _snapshot(registry.db_path) == before


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("A" * 43, "not known to this coordinator"),
        ("short", "malformed"),
        ("x" * 129, "malformed"),
        ("has space in it ....", "malformed"),
        (12345, "malformed"),
        (None, "malformed"),
    ],
)
def test_unknown_or_malformed_token_is_rejected(
    registry: EnrolmentRegistry, token: object, message: str
) -> None:
    registry.mint_tokens(2, dt.timedelta(hours=1))
    before = _snapshot(registry.db_path)
    with pytest.raises(TokenUnknown, match=message) as info:
        registry.redeem(token, build_enrolment_csr(_device_key()))  # type: ignore[arg-type]
    if isinstance(token, str):
        assert token not in str(info.value)
    assert _snapshot(registry.db_path) == before


def test_expired_token_is_rejected_and_state_unchanged(
    registry: EnrolmentRegistry, clock: FakeClock
) -> None:
    (token,) = registry.mint_tokens(1, dt.timedelta(minutes=10))
    before = _snapshot(registry.db_path)
    clock.now = T0 + dt.timedelta(minutes=10)  # the expiry instant itself is already too late
    with pytest.raises(TokenExpired, match="expired at 2030-01-01T12:10:00"):
        registry.redeem(token, build_enrolment_csr(_device_key()))
    assert _snapshot(registry.db_path) == before
    assert registry.token_counts() == TokenCounts(unused=0, used=0, expired=1)
    clock.now = T0 + dt.timedelta(minutes=9, seconds=59)
    assert registry.redeem(token, build_enrolment_csr(_device_key())).device_id


def _tampered_csr() -> bytes:
    pem = build_enrolment_csr(_device_key())
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("request_pem", "message"),
    [
        (b"not pem at all", "expected a PEM 'CERTIFICATE REQUEST' or 'PUBLIC KEY'"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "CSR"),
        (b"x" * 20_000, "at most 16384 accepted"),
        (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "must be ECDSA P-256, got Ed25519PublicKey",
        ),
        (
            build_enrolment_csr(ec.generate_private_key(ec.SECP384R1())),
            "must be ECDSA P-256, got .*secp384r1",
        ),
        (_tampered_csr(), "CSR signature does not verify"),
        (42, "must be PEM bytes or str, got int"),
    ],
)
def test_bad_key_request_is_rejected_without_burning_the_token(
    registry: EnrolmentRegistry, request_pem: object, message: str
) -> None:
    (token,) = registry.mint_tokens(1, dt.timedelta(hours=1))
    before = _snapshot(registry.db_path)
    with pytest.raises(InvalidKeyRequest, match=message):
        registry.redeem(token, request_pem)  # type: ignore[arg-type]
    assert _snapshot(registry.db_path) == before
    assert registry.redeem(token, build_enrolment_csr(_device_key())).device_id


def _race(registries: list[EnrolmentRegistry], token: str, csr: bytes) -> list[object]:
    """Redeem ``token`` from every registry at once (one thread each); collect the outcomes."""
    barrier = threading.Barrier(len(registries))
    outcomes: list[object] = []
    lock = threading.Lock()

    def attempt(reg: EnrolmentRegistry) -> None:
        barrier.wait()
        try:
            result: object = reg.redeem(token, csr)
        except TokenReused as exc:
            result = exc
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt, args=(reg,)) for reg in registries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_concurrent_redeems_of_one_token_yield_exactly_one_device(
    ca: LocalCA, clock: FakeClock
) -> None:
    db = ca.state_dir / "enrolment.sqlite3"
    # Separate registries: separate SQLite connections, serialised only by the database lock.
    registries = [EnrolmentRegistry(db, ca, clock=clock) for _ in range(4)]
    try:
        tokens = registries[0].mint_tokens(5, dt.timedelta(hours=1))
        csr = build_enrolment_csr(_device_key())
        for token in tokens:
            outcomes = _race(registries, token, csr)
            winners = [o for o in outcomes if isinstance(o, Enrolment)]
            losers = [o for o in outcomes if isinstance(o, TokenReused)]
            assert len(outcomes) == len(registries)
            assert len(winners) == 1 and len(losers) == len(registries) - 1
        _, devices = _snapshot(db)
        assert len(devices) == len(tokens)
        assert registries[1].token_counts() == TokenCounts(unused=0, used=5, expired=0)
    finally:
        for reg in registries:
            reg.close()


def test_revocation(registry: EnrolmentRegistry, ca: LocalCA, clock: FakeClock) -> None:
    a, b = registry.mint_tokens(2, dt.timedelta(hours=1))
    dev_a = registry.redeem(a, build_enrolment_csr(_device_key()))
    dev_b = registry.redeem(b, build_enrolment_csr(_device_key()))
    assert registry.revoked_devices() == []
    assert registry.revoke(dev_a.device_id) is True
    assert registry.revoke(dev_a.device_id) is False
    assert registry.is_revoked(dev_a.device_id)
    assert not registry.is_revoked(dev_b.device_id)
    assert registry.revoked_devices() == [dev_a.device_id]
    with pytest.raises(DeviceRevoked, match=f"device {dev_a.device_id} has been revoked"):
        registry.authenticate(dev_a.certificate_pem)
    assert registry.authenticate(dev_b.certificate_pem) == dev_b.device_id
    # Revocations are durable: a fresh registry on the same file sees them.
    with EnrolmentRegistry(registry.db_path, ca, clock=clock) as reopened:
        assert reopened.revoked_devices() == [dev_a.device_id]
        with pytest.raises(DeviceRevoked):
            reopened.authenticate(dev_a.certificate_pem)


def test_revoke_unknown_or_malformed_device(registry: EnrolmentRegistry) -> None:
    with pytest.raises(UnknownDevice, match="is not enrolled here"):
        registry.revoke("0" * 32)
    with pytest.raises(UnknownDevice, match="is not enrolled here"):
        registry.is_revoked("0" * 32)
    with pytest.raises(UnknownDevice, match="malformed device id 'ZZ'"):
        registry.revoke("ZZ")
    assert not registry.is_enrolled("not-an-id")


def test_authenticate_rejects_non_device_certificates(
    tmp_path: Path, registry: EnrolmentRegistry, ca: LocalCA, clock: FakeClock
) -> None:
    (token,) = registry.mint_tokens(1, dt.timedelta(hours=1))
    device = registry.redeem(token, build_enrolment_csr(_device_key()))
    aggregator = ca.issue_client_certificate("aggregator", now=T0)
    with pytest.raises(UnknownDevice, match="malformed device id 'aggregator'"):
        registry.authenticate(aggregator.cert_pem)
    never_enrolled = ca.issue_client_certificate("ab" * 16, now=T0)
    with pytest.raises(UnknownDevice, match="is not enrolled here"):
        registry.authenticate(never_enrolled.cert_pem)
    # Same CA, same device id, different key: not the credential that was issued.
    duplicate = ca.issue_client_certificate(device.device_id, now=T0)
    with pytest.raises(CredentialMismatch, match="not the one issued to it"):
        registry.authenticate(duplicate.cert_pem)
    server = ca.issue_server_certificate(now=T0)
    with pytest.raises(CertificateRejected, match="lacks the clientAuth"):
        registry.authenticate(server.cert_pem)
    impostor = LocalCA.load_or_create(tmp_path / "impostor", "test CA")
    forged = impostor.issue_client_certificate(device.device_id, now=T0)
    with pytest.raises(CertificateRejected, match="signature does not verify"):
        registry.authenticate(forged.cert_pem)
    clock.now = T0 + dt.timedelta(days=366)
    with pytest.raises(CertificateRejected, match="expired at"):
        registry.authenticate(device.certificate_pem)


def test_tokens_survive_reopening(ca: LocalCA, clock: FakeClock) -> None:
    db = ca.state_dir / "enrolment.sqlite3"
    with EnrolmentRegistry(db, ca, clock=clock) as first:
        token, spent = first.mint_tokens(2, dt.timedelta(hours=1))
        first.redeem(spent, build_enrolment_csr(_device_key()))
    with EnrolmentRegistry(db, ca, clock=clock) as second:
        assert second.token_counts() == TokenCounts(unused=1, used=1, expired=0)
        with pytest.raises(TokenReused):
            second.redeem(spent, build_enrolment_csr(_device_key()))
        assert second.redeem(token, build_enrolment_csr(_device_key())).device_id


@pytest.mark.parametrize(
    ("count", "ttl", "message"),
    [
        (0, dt.timedelta(hours=1), "count must be in 1..1000000, got 0"),
        (-3, dt.timedelta(hours=1), "count must be in 1..1000000, got -3"),
        (True, dt.timedelta(hours=1), "count must be an int, got bool"),
        (1.0, dt.timedelta(hours=1), "count must be an int, got float"),
        (1, dt.timedelta(0), "ttl must be a positive timedelta"),
        (1, 3600, "ttl must be a positive timedelta"),
    ],
)
def test_mint_rejects_bad_arguments(
    registry: EnrolmentRegistry, count: object, ttl: object, message: str
) -> None:
    with pytest.raises(EnrolmentError, match=message):
        registry.mint_tokens(count, ttl)  # type: ignore[arg-type]
    assert _snapshot(registry.db_path) == ([], [])


def test_naive_clock_is_rejected(ca: LocalCA) -> None:
    reg = EnrolmentRegistry(ca.state_dir / "e.sqlite3", ca, clock=lambda: dt.datetime(2030, 1, 1))
    with reg, pytest.raises(EnrolmentError, match="timezone-aware"):
        reg.mint_tokens(1, dt.timedelta(hours=1))


def test_logs_name_devices_but_never_tokens_or_keys(
    registry: EnrolmentRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    key = _device_key()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with caplog.at_level(logging.DEBUG):
        tokens = registry.mint_tokens(3, dt.timedelta(hours=1))
        enrolment = registry.redeem(tokens[0], build_enrolment_csr(key))
        with pytest.raises(TokenReused):
            registry.redeem(tokens[0], build_enrolment_csr(key))
        registry.revoke(enrolment.device_id)
    text = caplog.text
    assert "minted 3 enrolment tokens" in text
    assert f"enrolled device {enrolment.device_id}" in text
    assert f"revoked device {enrolment.device_id}" in text
    assert "enrolment refused: TokenReused: enrolment token has already been used" in text
    for token in tokens:
        assert token not in text
        assert hash_token(token).hex() not in text
    assert key_pem not in text
    assert "PRIVATE KEY" not in text


def test_error_classes_carry_grpc_status_names() -> None:
    assert TokenReused.grpc_status == TokenUnknown.grpc_status == "PERMISSION_DENIED"
    assert TokenExpired.grpc_status == "PERMISSION_DENIED"
    assert InvalidKeyRequest.grpc_status == "INVALID_ARGUMENT"
    assert UnknownDevice.grpc_status == CredentialMismatch.grpc_status == "UNAUTHENTICATED"
    assert DeviceRevoked.grpc_status == "PERMISSION_DENIED"


def test_a_labelled_token_gives_its_device_the_role(registry: EnrolmentRegistry) -> None:
    (pilot,) = registry.mint_tokens(1, dt.timedelta(hours=1), label="pilot:7")
    (plain,) = registry.mint_tokens(1, dt.timedelta(hours=1))
    csr = build_enrolment_csr(_device_key())
    assert registry.redeem(pilot, csr).label == "pilot:7"
    assert registry.redeem(plain, csr).label is None
    with pytest.raises(EnrolmentError, match="label"):
        registry.mint_tokens(1, dt.timedelta(hours=1), label="x" * 65)
