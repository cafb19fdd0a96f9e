"""A local certificate authority for the coordinator, aggregator and devices (TLS and mTLS).

The coordinator's state dir holds a private CA generated on first use; every TLS identity in
a deployment (the coordinator's server certificate, the aggregator's client certificate for
server-to-server mTLS, each enrolled device's client certificate) is issued by it, and every
peer trusts exactly that CA, never the system roots.

Algorithms: ECDSA on P-256 with SHA-256 everywhere. gRPC's TLS stack (BoringSSL) accepts it
for TLS 1.2 and 1.3 server and client certificates; Ed25519 certificates are not reliably
usable there, and RSA keys are larger and slower to generate.

Files in the state dir (created ``0700``; every file written ``0600`` via a temporary file,
``fsync`` and ``os.replace``, so a crash never leaves a half-written file under a real name):

* ``ca.pem``: the CA certificate (public, but kept ``0600`` like everything else here).
* ``ca.key``: the CA private key, PKCS#8 PEM, unencrypted: the file mode is its protection,
  and :meth:`LocalCA.load_or_create` refuses a ``ca.key`` that group or others can read.
* ``<stem>.pem`` / ``<stem>.key``: a leaf identity persisted by :meth:`LocalCA.ensure_credential`
  (e.g. ``server.pem``/``server.key`` for the coordinator's listening socket).
* ``.ca.lock``: an empty ``flock`` file so two processes creating the CA at once cannot race.

The CA is never regenerated silently: if exactly one of ``ca.pem``/``ca.key`` exists, or
either is corrupt, or the key does not match the certificate, or the certificate's name is
not the requested one, :meth:`LocalCA.load_or_create` raises :class:`CAFileError` naming the
file. (Regenerating would invalidate every issued credential without anybody noticing.) Leaf
identities, by contrast, are re-issued when missing, expiring, or not matching the CA,
because the CA is their only authority; that is logged at INFO.

Logging: certificate subjects, serial numbers and file paths only; never key material.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import ipaddress
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.secret_files import write_secret

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_SERVER_NAMES",
    "CAFileError",
    "CertificateRejected",
    "Credential",
    "GrpcPEM",
    "LocalCA",
    "PKIError",
    "Purpose",
    "certificate_common_name",
    "certificate_fingerprint",
    "generate_private_key",
    "verify_peer_certificate",
]

log = logging.getLogger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
_LOCK_FILE = ".ca.lock"

#: Names a loopback server certificate covers by default.
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

_CA_VALIDITY = dt.timedelta(days=3650)
_LEAF_VALIDITY = dt.timedelta(days=365)
#: Certificates start a little in the past so a peer whose clock lags still accepts them.
_BACKDATE = dt.timedelta(minutes=5)
#: X.509's upper bound on a commonName (RFC 5280, ub-common-name).
_MAX_CN_LEN = 64
#: A certificate a peer presents is tiny; refuse to parse megabytes of attacker input.
_MAX_PEM_BYTES = 64 * 1024
_STEM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PKIError(Exception):
    """Base class for errors raised by the local CA."""


class CAFileError(PKIError):
    """A CA file in the state dir is missing, corrupt, insecure or does not match its pair.

    Attributes:
        path: the offending file.
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


class CertificateRejected(PKIError):
    """A certificate presented by a peer failed verification against the local CA."""


class Purpose(str, enum.Enum):
    """What a leaf certificate is for: its extended key usage."""

    SERVER = "server"
    CLIENT = "client"

    @property
    def eku(self) -> x509.ObjectIdentifier:
        """The extended-key-usage OID a certificate for this purpose must carry."""
        return (
            ExtendedKeyUsageOID.SERVER_AUTH
            if self is Purpose.SERVER
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )


class GrpcPEM(NamedTuple):
    """The PEM triple ``grpc.ssl_server_credentials``/``ssl_channel_credentials`` take.

    Server: ``grpc.ssl_server_credentials([(p.private_key, p.certificate_chain)],
    root_certificates=p.root_certificates, require_client_auth=True)``.
    Client: ``grpc.ssl_channel_credentials(p.root_certificates, p.private_key,
    p.certificate_chain)``.
    """

    root_certificates: bytes
    private_key: bytes
    certificate_chain: bytes


@dataclass(frozen=True)
class Credential:
    """A leaf certificate issued by a :class:`LocalCA`, with its private key when known.

    ``private_key`` is ``None`` when the CA signed a public key it was given (a device's CSR):
    the private key then exists only on the device.
    """

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey | None
    ca_certificate: x509.Certificate

    @property
    def common_name(self) -> str:
        """The certificate's subject commonName (a device id, ``"aggregator"``, ...)."""
        return certificate_common_name(self.certificate)

    @property
    def cert_pem(self) -> bytes:
        """The leaf certificate in PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_pem(self) -> bytes:
        """The issuing CA's certificate in PEM (the trust anchor peers need)."""
        return self.ca_certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM.

        Raises:
            PKIError: the credential was issued for an external public key.
        """
        if self.private_key is None:
            raise PKIError(
                f"credential for {self.common_name!r} has no private key "
                "(it was issued for an external public key)"
            )
        return _key_pem(self.private_key)

    def grpc_pem(self) -> GrpcPEM:
        """The (root, key, chain) PEM triple for gRPC credentials (see :class:`GrpcPEM`)."""
        # The chain is the leaf alone: the CA is the root every peer already holds.
        return GrpcPEM(self.ca_pem, self.key_pem, self.cert_pem)


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key (the only key type this CA issues for)."""
    return ec.generate_private_key(ec.SECP256R1())


def certificate_common_name(certificate: x509.Certificate) -> str:
    """The subject's single commonName.

    Raises:
        CertificateRejected: the subject has no commonName, or more than one.
    """
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CertificateRejected(
            f"certificate subject must have exactly one commonName, has {len(names)}"
        )
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8")


def certificate_fingerprint(certificate: x509.Certificate) -> bytes:
    """SHA-256 over the certificate's DER encoding (32 bytes)."""
    return certificate.fingerprint(hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _as_utc(when: dt.datetime | None) -> dt.datetime:
    if when is None:
        return _utcnow()
    if when.tzinfo is None:
        raise PKIError(f"time must be timezone-aware, got naive {when.isoformat()}")
    return when.astimezone(dt.timezone.utc)


def _check_common_name(common_name: str) -> str:
    if not isinstance(common_name, str) or not common_name:
        raise PKIError(f"common name must be a non-empty string, got {common_name!r}")
    if len(common_name) > _MAX_CN_LEN:
        raise PKIError(
            f"common name is {len(common_name)} characters; X.509 allows at most {_MAX_CN_LEN}"
        )
    if not common_name.isprintable():
        raise PKIError(f"common name contains non-printable characters: {common_name!r}")
    return common_name


def _check_validity(validity: dt.timedelta) -> dt.timedelta:
    if not isinstance(validity, dt.timedelta) or validity <= dt.timedelta(0):
        raise PKIError(f"validity must be a positive timedelta, got {validity!r}")
    return validity


def _subject_alt_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for a server certificate's subjectAltName."""
    if isinstance(hostnames, str) or not hostnames:
        raise PKIError(f"hostnames must be a non-empty sequence of names, got {hostnames!r}")
    names: list[x509.GeneralName] = []
    for host in hostnames:
        if not isinstance(host, str) or not host:
            raise PKIError(f"hostname must be a non-empty string, got {host!r}")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass  # not an IP literal: validate it as a DNS name below
        labels = host.rstrip(".").split(".")
        if len(host) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
            raise PKIError(f"hostname {host!r} is neither an IP address nor a valid DNS name")
        names.append(x509.DNSName(host.rstrip(".").lower()))
    if len(set(names)) != len(names):
        raise PKIError(f"hostnames contain duplicates: {list(hostnames)!r}")
    return names


def _ensure_state_dir(state_dir: str | os.PathLike[str]) -> Path:
    path = Path(state_dir)
    if path.exists() and not path.is_dir():
        raise PKIError(f"{path}: state dir exists and is not a directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the state dir's lock file (processes and threads)."""
    fd = os.open(state_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _load_cert_file(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CAFileError(path, f"not a valid PEM certificate ({exc})") from exc


def _load_key_file(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CAFileError(path, f"not a valid unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CAFileError(path, f"expected an ECDSA P-256 private key, got {type(key).__name__}")
    return key


def _same_public_key(a: ec.EllipticCurvePublicKey, b: object) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return isinstance(b, ec.EllipticCurvePublicKey) and a.public_bytes(*fmt) == b.public_bytes(*fmt)


class LocalCA:
    """A private certificate authority whose certificate and key live in a state dir.

    Build one with :meth:`load_or_create`; issue identities with
    :meth:`issue_server_certificate`, :meth:`issue_client_certificate` and
    :meth:`ensure_credential`; check what a peer presents with :func:`verify_peer_certificate`.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey,
        state_dir: Path,
    ) -> None:
        """Wrap an already-validated CA certificate and key (use :meth:`load_or_create`)."""
        self.certificate = certificate
        self._private_key = private_key
        self.state_dir = state_dir

    @classmethod
    def load_or_create(
        cls,
        state_dir: str | os.PathLike[str],
        name: str = "decentsim local CA",
        *,
        validity: dt.timedelta = _CA_VALIDITY,
    ) -> LocalCA:
        """Load the CA kept in ``state_dir``, creating it (and the dir) on first use.

        Args:
            state_dir: directory for ``ca.pem``/``ca.key`` (created ``0700`` if missing).
            name: the CA's commonName; an existing CA must carry exactly this name.
            validity: lifetime of a newly created CA certificate.

        Raises:
            CAFileError: a CA file is missing while its pair exists, corrupt, readable by
                group/others, not a CA certificate, not self-signed, mismatched with its key,
                or named differently from ``name``.
        """
        _check_common_name(name)
        _check_validity(validity)
        directory = _ensure_state_dir(state_dir)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        with _locked(directory):
            if not cert_path.exists() and not key_path.exists():
                return cls._create(directory, name, validity)
            for present, missing in ((cert_path, key_path), (key_path, cert_path)):
                if not missing.exists():
                    raise CAFileError(
                        missing,
                        f"missing while {present.name} exists; refusing to regenerate the CA "
                        "(restore the file, or remove the state dir's CA files to start over "
                        "and re-enrol every device)",
                    )
            return cls._load(directory, name)

    @classmethod
    def _create(cls, directory: Path, name: str, validity: dt.timedelta) -> LocalCA:
        key = generate_private_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "decentsim"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        now = _utcnow()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + validity)
            # path_length=0: this CA signs leaves only, never a subordinate CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash between the two writes leaves "ca.pem missing", a clear error,
        # never a certificate whose key was lost.
        write_secret(directory / CA_KEY_FILE, _key_pem(key))
        write_secret(directory / CA_CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
        log.info(
            "created local CA %r (serial %x) in %s", name, certificate.serial_number, directory
        )
        return cls(certificate, key, directory)

    @classmethod
    def _load(cls, directory: Path, name: str) -> LocalCA:
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise CAFileError(
                key_path, f"private key is accessible to group/others (mode {mode:04o}); chmod 600"
            )
        certificate = _load_cert_file(cert_path)
        key = _load_key_file(key_path)
        if not _same_public_key(key.public_key(), certificate.public_key()):
            raise CAFileError(
                key_path, f"private key does not match the certificate in {cert_path}"
            )
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.value.ca:
            raise CAFileError(cert_path, "certificate is not a CA certificate")
        try:
            certificate.verify_directly_issued_by(certificate)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CAFileError(
                cert_path, f"CA certificate is not validly self-signed ({exc})"
            ) from exc
        if _utcnow() > certificate.not_valid_after_utc:
            raise CAFileError(
                cert_path,
                f"CA certificate expired at {certificate.not_valid_after_utc.isoformat()}; "
                "every credential it issued is invalid (remove the CA files and re-enrol)",
            )
        actual = certificate_common_name(certificate)
        if actual != name:
            raise CAFileError(cert_path, f"holds the CA {actual!r}, not the requested {name!r}")
        return cls(certificate, key, directory)

    @property
    def name(self) -> str:
        """The CA's commonName."""
        return certificate_common_name(self.certificate)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate in PEM: the trust anchor to hand to every peer."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue_server_certificate(
        self,
        hostnames: Sequence[str] = DEFAULT_SERVER_NAMES,
        *,
        common_name: str | None = None,
        validity: dt.timedelta = _LEAF_VALIDITY,
        public_key: ec.EllipticCurvePublicKey | None = None,
        now: dt.datetime | None = None,
    ) -> Credential:
        """Issue a TLS server certificate (serverAuth) covering ``hostnames``.

        Args:
            hostnames: DNS names and IP literals (``"127.0.0.1"``, ``"::1"``) for the SAN.
            common_name: subject CN; defaults to the first hostname.
            validity: certificate lifetime from ``now``.
            public_key: sign this key instead of generating one (then no private key returned).
            now: issuance time (timezone-aware; default: the current time).
        """
        sans = _subject_alt_names(hostnames)
        cn = _check_common_name(common_name if common_name is not None else hostnames[0])
        return self._issue(cn, Purpose.SERVER, sans, validity, public_key, now)

    def issue_client_certificate(
        self,
        common_name: str,
        *,
        validity: dt.timedelta = _LEAF_VALIDITY,
        public_key: ec.EllipticCurvePublicKey | None = None,
        now: dt.datetime | None = None,
    ) -> Credential:
        """Issue a TLS client certificate (clientAuth) whose CN is ``common_name``.

        ``common_name`` is a device id or ``"aggregator"``: servers authenticate a connection
        by it. Pass ``public_key`` to certify a key whose private half stays elsewhere.
        """
        return self._issue(
            _check_common_name(common_name), Purpose.CLIENT, [], validity, public_key, now
        )

    def _issue(
        self,
        common_name: str,
        purpose: Purpose,
        sans: list[x509.GeneralName],
        validity: dt.timedelta,
        public_key: ec.EllipticCurvePublicKey | None,
        now: dt.datetime | None,
    ) -> Credential:
        _check_validity(validity)
        start = _as_utc(now)
        private_key: ec.EllipticCurvePrivateKey | None = None
        if public_key is None:
            private_key = generate_private_key()
            public_key = private_key.public_key()
        elif not isinstance(public_key, ec.EllipticCurvePublicKey) or (
            public_key.curve.name != "secp256r1"
        ):
            raise PKIError(f"public key must be ECDSA P-256, got {type(public_key).__name__}")
        ca_end = self.certificate.not_valid_after_utc
        if start >= ca_end:
            raise PKIError(f"cannot issue: the CA certificate expired at {ca_end.isoformat()}")
        # A leaf must not outlive its issuer: peers would reject it after the CA expires anyway.
        end = min(start + validity, ca_end)
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "decentsim"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - _BACKDATE)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                # ECDHE key exchange: the key only ever signs (no keyEncipherment).
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([purpose.eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = builder.sign(self._private_key, hashes.SHA256())
        log.info(
            "issued %s certificate for %r (serial %x)",
            purpose.value,
            common_name,
            certificate.serial_number,
        )
        return Credential(certificate, private_key, self.certificate)

    def ensure_credential(
        self,
        stem: str,
        purpose: Purpose,
        *,
        common_name: str,
        hostnames: Sequence[str] = DEFAULT_SERVER_NAMES,
        validity: dt.timedelta = _LEAF_VALIDITY,
        renew_before: dt.timedelta = dt.timedelta(days=30),
        now: dt.datetime | None = None,
    ) -> Credential:
        """Load the identity ``<stem>.pem``/``<stem>.key`` from the state dir, issuing if needed.

        A persisted identity is reused when it verifies against this CA for ``purpose``, its
        key matches, its CN (and for servers, its SAN set) is the requested one, and it is
        valid for at least ``renew_before`` more. Otherwise a new one is issued and written
        atomically (the reason is logged).

        Raises:
            PKIError: ``stem`` is not a plain file-name stem, or the arguments are invalid.
        """
        if not isinstance(stem, str) or not _STEM_RE.match(stem) or stem.startswith("ca"):
            raise PKIError(f"stem {stem!r} must be a plain file-name stem not starting with 'ca'")
        _check_common_name(common_name)
        sans = _subject_alt_names(hostnames) if purpose is Purpose.SERVER else []
        when = _as_utc(now)
        cert_path = self.state_dir / f"{stem}.pem"
        key_path = self.state_dir / f"{stem}.key"
        with _locked(self.state_dir):
            reason = self._reusable(
                cert_path, key_path, purpose, common_name, sans, when, renew_before
            )
            if isinstance(reason, Credential):
                return reason
            log.info("issuing %s identity %s: %s", purpose.value, cert_path, reason)
            credential = self._issue(common_name, purpose, sans, validity, None, when)
            write_secret(key_path, credential.key_pem)
            write_secret(cert_path, credential.cert_pem)
            return credential

    def _reusable(
        self,
        cert_path: Path,
        key_path: Path,
        purpose: Purpose,
        common_name: str,
        sans: list[x509.GeneralName],
        when: dt.datetime,
        renew_before: dt.timedelta,
    ) -> Credential | str:
        """The persisted credential if it can be reused, else why not (for the log)."""
        if not cert_path.exists() or not key_path.exists():
            return "not present"
        try:
            certificate = verify_peer_certificate(
                cert_path.read_bytes(), self, purpose=purpose, now=when
            )
            key = _load_key_file(key_path)
        except (CertificateRejected, CAFileError) as exc:
            return f"existing files unusable ({exc})"
        if not _same_public_key(key.public_key(), certificate.public_key()):
            return "key does not match certificate"
        if certificate_common_name(certificate) != common_name:
            return "common name changed"
        if purpose is Purpose.SERVER:
            try:
                present = certificate.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value
            except x509.ExtensionNotFound:
                return "no subjectAltName"
            if set(present) != set(sans):
                return "host names changed"
        if certificate.not_valid_after_utc - when < renew_before:
            return "expires soon"
        return Credential(certificate, key, self.certificate)


def verify_peer_certificate(
    pem: bytes | str,
    ca: LocalCA,
    *,
    purpose: Purpose = Purpose.CLIENT,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Check a certificate a peer presented: issued by ``ca``, in its validity window, a leaf,
    and carrying the extended key usage for ``purpose``. Returns the parsed certificate.

    This is the application-level check behind a connection's TLS handshake (which already
    verified the chain): servers call it on the PEM from ``context.auth_context()`` before
    trusting the CN as a device id. It does not consult revocation; see
    :meth:`identity.enrolment.EnrolmentRegistry.authenticate`.

    Raises:
        CertificateRejected: with the specific reason (unparsable, wrong issuer, bad
            signature, expired, not yet valid, a CA certificate, missing EKU).
    """
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
    if len(data) > _MAX_PEM_BYTES:
        raise CertificateRejected(
            f"certificate PEM is {len(data)} bytes; at most {_MAX_PEM_BYTES} accepted"
        )
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateRejected(f"not a PEM X.509 certificate ({exc})") from exc
    if certificate.issuer != ca.certificate.subject:
        raise CertificateRejected(
            f"certificate issued by {certificate.issuer.rfc4514_string()!r}, "
            f"not by this CA {ca.certificate.subject.rfc4514_string()!r}"
        )
    try:
        certificate.verify_directly_issued_by(ca.certificate)
    except InvalidSignature as exc:
        raise CertificateRejected(
            "certificate signature does not verify with this CA's key"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise CertificateRejected(f"certificate not verifiable against this CA ({exc})") from exc
    when = _as_utc(now)
    if when < certificate.not_valid_before_utc:
        raise CertificateRejected(
            f"certificate not valid before {certificate.not_valid_before_utc.isoformat()}"
        )
    if when > certificate.not_valid_after_utc:
        raise CertificateRejected(
            f"certificate expired at {certificate.not_valid_after_utc.isoformat()}"
        )
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise CertificateRejected("certificate lacks basicConstraints") from exc
    if constraints.ca:
        raise CertificateRejected("a CA certificate cannot be used as a peer identity")
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CertificateRejected(
            f"certificate lacks extendedKeyUsage (needs {purpose.value}Auth)"
        ) from exc
    if purpose.eku not in usages:
        raise CertificateRejected(f"certificate lacks the {purpose.value}Auth extended key usage")
    return certificate
