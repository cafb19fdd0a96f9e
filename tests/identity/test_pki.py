"""Tests for the local CA: creation, reload, refusal of bad files, issuance and verification."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from identity.pki import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CAFileError,
    CertificateRejected,
    LocalCA,
    PKIError,
    Purpose,
    certificate_common_name,
    verify_peer_certificate,
)

UTC = dt.timezone.utc
#: A fixed, second-aligned issuance time (X.509 times have one-second resolution).
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.load_or_create(tmp_path / "state", "test CA")


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


def test_create_writes_private_files_and_a_proper_ca_certificate(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    ca = LocalCA.load_or_create(state, "test CA")
    assert _mode(state) == 0o700
    assert _mode(state / CA_CERT_FILE) == 0o600
    assert _mode(state / CA_KEY_FILE) == 0o600
    assert not [p.name for p in state.iterdir() if p.name.endswith(".tmp")]
    cert = x509.load_pem_x509_certificate((state / CA_CERT_FILE).read_bytes())
    assert cert == ca.certificate
    assert ca.name == "test CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.key_encipherment
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    key = serialization.load_pem_private_key((state / CA_KEY_FILE).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=3000)


def test_second_call_loads_the_same_ca_without_rewriting(tmp_path: Path) -> None:
    first = LocalCA.load_or_create(tmp_path, "test CA")
    before = {name: (tmp_path / name).read_bytes() for name in (CA_CERT_FILE, CA_KEY_FILE)}
    mtimes = {name: (tmp_path / name).stat().st_mtime_ns for name in before}
    second = LocalCA.load_or_create(tmp_path, "test CA")
    assert second.certificate == first.certificate
    assert second.certificate.serial_number == first.certificate.serial_number
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data
        assert (tmp_path / name).stat().st_mtime_ns == mtimes[name]
    # A certificate issued by the first instance verifies against the reloaded one.
    leaf = first.issue_client_certificate("dev")
    assert verify_peer_certificate(leaf.cert_pem, second) == leaf.certificate


def test_concurrent_first_use_creates_exactly_one_ca(tmp_path: Path) -> None:
    barrier = threading.Barrier(4)
    results: list[LocalCA] = []

    def create() -> None:
        barrier.wait()
        results.append(LocalCA.load_or_create(tmp_path / "s", "test CA"))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    on_disk = x509.load_pem_x509_certificate((tmp_path / "s" / CA_CERT_FILE).read_bytes())
    assert len(results) == 4
    assert {ca.certificate.serial_number for ca in results} == {on_disk.serial_number}


@pytest.mark.parametrize(
    ("removed", "kept"), [(CA_KEY_FILE, CA_CERT_FILE), (CA_CERT_FILE, CA_KEY_FILE)]
)
def test_half_missing_ca_is_an_error_not_a_regeneration(
    tmp_path: Path, removed: str, kept: str
) -> None:
    LocalCA.load_or_create(tmp_path, "test CA")
    (tmp_path / removed).unlink()
    kept_bytes = (tmp_path / kept).read_bytes()
    with pytest.raises(CAFileError, match=f"missing while {kept} exists") as info:
        LocalCA.load_or_create(tmp_path, "test CA")
    assert info.value.path == tmp_path / removed
    assert str(tmp_path / removed) in str(info.value)
    assert not (tmp_path / removed).exists()
    assert (tmp_path / kept).read_bytes() == kept_bytes


def test_corrupt_certificate_file_is_named(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path, "test CA")
    (tmp_path / CA_CERT_FILE).write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n")
    with pytest.raises(CAFileError, match="not a valid PEM certificate") as info:
        LocalCA.load_or_create(tmp_path, "test CA")
    assert info.value.path == tmp_path / CA_CERT_FILE


def test_corrupt_key_file_is_named(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path, "test CA")
    (tmp_path / CA_KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(CAFileError, match="not a valid unencrypted PEM private key") as info:
        LocalCA.load_or_create(tmp_path, "test CA")
    assert info.value.path == tmp_path / CA_KEY_FILE


def test_key_from_another_ca_is_a_mismatch(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path / "a", "test CA")
    LocalCA.load_or_create(tmp_path / "b", "test CA")
    (tmp_path / "a" / CA_KEY_FILE).write_bytes((tmp_path / "b" / CA_KEY_FILE).read_bytes())
    with pytest.raises(CAFileError, match="private key does not match the certificate") as info:
        LocalCA.load_or_create(tmp_path / "a", "test CA")
    assert info.value.path == tmp_path / "a" / CA_KEY_FILE


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path, "test CA")
    os.chmod(tmp_path / CA_KEY_FILE, 0o640)
    with pytest.raises(CAFileError, match=r"accessible to group/others \(mode 0640\)"):
        LocalCA.load_or_create(tmp_path, "test CA")


def test_other_ca_name_is_refused(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path, "coordinator CA")
    with pytest.raises(CAFileError, match="holds the CA 'coordinator CA', not the requested 'x'"):
        LocalCA.load_or_create(tmp_path, "x")


def test_leaf_certificate_in_place_of_the_ca_is_refused(tmp_path: Path, ca: LocalCA) -> None:
    leaf = ca.issue_client_certificate("dev")
    (tmp_path / "fake").mkdir(mode=0o700)
    for name, data in ((CA_CERT_FILE, leaf.cert_pem), (CA_KEY_FILE, leaf.key_pem)):
        path = tmp_path / "fake" / name
        path.write_bytes(data)
        path.chmod(0o600)
    with pytest.raises(CAFileError, match="is not a CA certificate"):
        LocalCA.load_or_create(tmp_path / "fake", "dev")


def test_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(PKIError, match="not a directory"):
        LocalCA.load_or_create(tmp_path / "f", "test CA")


def test_server_certificate_extensions_and_validity(ca: LocalCA) -> None:
    cred = ca.issue_server_certificate(
        ["coord.example", "127.0.0.1", "::1"], validity=dt.timedelta(days=10), now=T0
    )
    cert = cred.certificate
    assert cred.common_name == "coord.example"
    sans = _ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = _ext(cert, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.key_encipherment
    ca_ski = _ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski
    assert _ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        cert.public_key()
    )
    assert cert.not_valid_before_utc == T0 - dt.timedelta(minutes=5)
    assert cert.not_valid_after_utc == T0 + dt.timedelta(days=10)
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)


def test_client_certificate_and_serials(ca: LocalCA) -> None:
    creds = [ca.issue_client_certificate("aggregator") for _ in range(5)]
    for cred in creds:
        assert certificate_common_name(cred.certificate) == "aggregator"
        eku = list(_ext(cred.certificate, x509.ExtendedKeyUsage).value)
        assert eku == [ExtendedKeyUsageOID.CLIENT_AUTH]
        with pytest.raises(x509.ExtensionNotFound):
            _ext(cred.certificate, x509.SubjectAlternativeName)
        assert cred.certificate.serial_number > 0
    assert len({cred.certificate.serial_number for cred in creds}) == 5
    assert len({cred.key_pem for cred in creds}) == 5


def test_external_public_key_is_certified_without_returning_a_key(ca: LocalCA) -> None:
    device_key = ec.generate_private_key(ec.SECP256R1())
    cred = ca.issue_client_certificate("dev", public_key=device_key.public_key())
    assert cred.private_key is None
    assert cred.certificate.public_key() == device_key.public_key()
    with pytest.raises(PKIError, match="has no private key"):
        _ = cred.key_pem


def test_leaf_never_outlives_the_ca(ca: LocalCA) -> None:
    cred = ca.issue_client_certificate("dev", validity=dt.timedelta(days=100_000))
    assert cred.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_grpc_pem_triple(ca: LocalCA) -> None:
    cred = ca.issue_server_certificate()
    pem = cred.grpc_pem()
    assert pem.root_certificates == ca.cert_pem
    assert pem.certificate_chain == cred.cert_pem
    key = serialization.load_pem_private_key(pem.private_key, None)
    assert key.public_key() == cred.certificate.public_key()
    assert pem.private_key.startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hostnames": []}, "non-empty sequence"),
        ({"hostnames": "localhost"}, "non-empty sequence"),
        ({"hostnames": ["bad_host!"]}, "'bad_host!' is neither an IP address nor a valid DNS"),
        ({"hostnames": ["-x.example"]}, "neither an IP address nor a valid DNS name"),
        ({"hostnames": ["a", "a"]}, "duplicates"),
        ({"common_name": "x" * 65}, "65 characters; X.509 allows at most 64"),
        ({"common_name": ""}, "non-empty string"),
        ({"common_name": "a\nb"}, "non-printable"),
        ({"validity": dt.timedelta(0)}, "positive timedelta"),
        ({"now": dt.datetime(2030, 1, 1)}, "timezone-aware"),
        (
            {"public_key": ec.generate_private_key(ec.SECP384R1()).public_key()},
            "must be ECDSA P-256",
        ),
        (
            {"public_key": ed25519.Ed25519PrivateKey.generate().public_key()},
            "must be ECDSA P-256, got Ed25519PublicKey",
        ),
    ],
)
def test_bad_issuance_arguments_are_rejected(ca: LocalCA, kwargs: dict, message: str) -> None:
    with pytest.raises(PKIError, match=message):
        ca.issue_server_certificate(**kwargs)


def test_verify_accepts_own_client_certificate(ca: LocalCA) -> None:
    cred = ca.issue_client_certificate("dev", now=T0)
    cert = verify_peer_certificate(cred.cert_pem.decode(), ca, now=T0 + dt.timedelta(days=1))
    assert cert == cred.certificate
    server = ca.issue_server_certificate(now=T0)
    assert verify_peer_certificate(server.cert_pem, ca, purpose=Purpose.SERVER, now=T0) == (
        server.certificate
    )


def test_verify_rejects_wrong_purpose(ca: LocalCA) -> None:
    server = ca.issue_server_certificate()
    with pytest.raises(CertificateRejected, match="lacks the clientAuth extended key usage"):
        verify_peer_certificate(server.cert_pem, ca)
    client = ca.issue_client_certificate("dev")
    with pytest.raises(CertificateRejected, match="lacks the serverAuth extended key usage"):
        verify_peer_certificate(client.cert_pem, ca, purpose=Purpose.SERVER)


def test_verify_rejects_other_ca_even_with_the_same_name(tmp_path: Path, ca: LocalCA) -> None:
    impostor = LocalCA.load_or_create(tmp_path / "impostor", "test CA")
    forged = impostor.issue_client_certificate("dev")
    assert forged.certificate.issuer == ca.certificate.subject
    with pytest.raises(CertificateRejected, match="signature does not verify with this CA's key"):
        verify_peer_certificate(forged.cert_pem, ca)
    other = LocalCA.load_or_create(tmp_path / "other", "other CA")
    with pytest.raises(CertificateRejected, match="not by this CA"):
        verify_peer_certificate(other.issue_client_certificate("dev").cert_pem, ca)


def test_verify_enforces_the_validity_window(ca: LocalCA) -> None:
    cred = ca.issue_client_certificate("dev", validity=dt.timedelta(days=1), now=T0)
    after = T0 + dt.timedelta(days=1, seconds=1)
    with pytest.raises(CertificateRejected, match="expired at 2030-01-02T12:00:00"):
        verify_peer_certificate(cred.cert_pem, ca, now=after)
    before = T0 - dt.timedelta(minutes=6)
    with pytest.raises(CertificateRejected, match="not valid before 2030-01-01T11:55:00"):
        verify_peer_certificate(cred.cert_pem, ca, now=before)


def test_verify_rejects_the_ca_certificate_and_garbage(ca: LocalCA) -> None:
    with pytest.raises(CertificateRejected, match="CA certificate cannot be used"):
        verify_peer_certificate(ca.cert_pem, ca)
    with pytest.raises(CertificateRejected, match=r"not a PEM X\.509 certificate"):
        verify_peer_certificate(b"hello", ca)
    with pytest.raises(CertificateRejected, match="at most 65536 accepted"):
        verify_peer_certificate(b"A" * 70_000, ca)


def _credential_files(state: Path, stem: str) -> tuple[bytes, bytes]:
    return (state / f"{stem}.pem").read_bytes(), (state / f"{stem}.key").read_bytes()


def test_ensure_credential_persists_and_reuses(ca: LocalCA) -> None:
    first = ca.ensure_credential("server", Purpose.SERVER, common_name="localhost")
    assert _mode(ca.state_dir / "server.pem") == 0o600
    assert _mode(ca.state_dir / "server.key") == 0o600
    files = _credential_files(ca.state_dir, "server")
    again = ca.ensure_credential("server", Purpose.SERVER, common_name="localhost")
    assert again.certificate == first.certificate
    assert again.key_pem == first.key_pem
    assert _credential_files(ca.state_dir, "server") == files


def test_ensure_credential_reissues_when_stale_or_broken(ca: LocalCA) -> None:
    base = ca.ensure_credential("agg", Purpose.CLIENT, common_name="aggregator", now=T0)
    serials = {base.certificate.serial_number}

    def serial(**kwargs: object) -> int:
        cred = ca.ensure_credential("agg", Purpose.CLIENT, **kwargs)  # type: ignore[arg-type]
        assert verify_peer_certificate(cred.cert_pem, ca, now=kwargs.get("now", T0)) is not None
        return cred.certificate.serial_number

    assert serial(common_name="aggregator", now=T0) in serials
    # Inside the renewal margin (default 30 days before expiry): a new certificate.
    late = T0 + dt.timedelta(days=340)
    renewed = serial(common_name="aggregator", now=late)
    assert renewed not in serials
    serials.add(renewed)
    # A changed common name: a new certificate.
    renamed = serial(common_name="aggregator-2", now=late)
    assert renamed not in serials
    serials.add(renamed)
    # A corrupt file: a new certificate, not an exception.
    (ca.state_dir / "agg.pem").write_bytes(b"junk")
    repaired = serial(common_name="aggregator-2", now=late)
    assert repaired not in serials


def test_ensure_credential_reissues_when_hostnames_change(ca: LocalCA) -> None:
    a = ca.ensure_credential("server", Purpose.SERVER, common_name="h", hostnames=["localhost"])
    b = ca.ensure_credential("server", Purpose.SERVER, common_name="h", hostnames=["localhost"])
    c = ca.ensure_credential("server", Purpose.SERVER, common_name="h", hostnames=["10.0.0.1"])
    assert a.certificate == b.certificate
    assert c.certificate != a.certificate
    sans = _ext(c.certificate, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]


def test_ensure_credential_reissues_for_a_foreign_certificate(tmp_path: Path, ca: LocalCA) -> None:
    foreign = LocalCA.load_or_create(tmp_path / "foreign", "test CA")
    planted = foreign.issue_client_certificate("aggregator")
    (ca.state_dir / "agg.pem").write_bytes(planted.cert_pem)
    (ca.state_dir / "agg.key").write_bytes(planted.key_pem)
    cred = ca.ensure_credential("agg", Purpose.CLIENT, common_name="aggregator")
    assert cred.certificate != planted.certificate
    verify_peer_certificate(cred.cert_pem, ca)


@pytest.mark.parametrize("stem", ["../escape", "ca", "ca-extra", "", "a/b"])
def test_ensure_credential_rejects_unsafe_stems(ca: LocalCA, stem: str) -> None:
    with pytest.raises(PKIError, match="plain file-name stem"):
        ca.ensure_credential(stem, Purpose.CLIENT, common_name="aggregator")


def test_expired_ca_is_refused_on_load_and_for_issuance(tmp_path: Path, ca: LocalCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old CA")])
    expired = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(dt.datetime(2021, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    state = tmp_path / "old"
    state.mkdir(mode=0o700)
    for file, data in (
        (CA_CERT_FILE, expired.public_bytes(serialization.Encoding.PEM)),
        (
            CA_KEY_FILE,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    ):
        (state / file).write_bytes(data)
        (state / file).chmod(0o600)
    with pytest.raises(CAFileError, match="CA certificate expired at 2021-01-01T00:00:00"):
        LocalCA.load_or_create(state, "old CA")
    after_ca = ca.certificate.not_valid_after_utc + dt.timedelta(seconds=1)
    with pytest.raises(PKIError, match="cannot issue: the CA certificate expired at"):
        ca.issue_client_certificate("dev", now=after_ca)
