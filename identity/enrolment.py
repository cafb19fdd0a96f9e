"""Single-use enrolment tokens, device credentials and their revocation list.

Flow: an operator mints tokens on the coordinator (:meth:`EnrolmentRegistry.mint_tokens`) and
hands each to one device out of band. The device generates its own ECDSA P-256 key, sends the
token and a CSR (:func:`build_enrolment_csr`); :meth:`EnrolmentRegistry.redeem` burns the
token and returns a client certificate issued by the coordinator's :class:`~identity.pki.
LocalCA` for a fresh random device id (16 random bytes, hex). From then on the device
authenticates every connection with that certificate (mTLS), and servers map a connection to
a device with :meth:`EnrolmentRegistry.authenticate`, which also honours revocations.

Security decisions:

* **Tokens are stored only as a hash.** A token is ``secrets.token_urlsafe(32)``: 256 bits
  from the OS CSPRNG. The database keeps ``SHA-256("decentsim-enrolment-token-v1\\0" ||
  token)``. A plain (domain-separated) SHA-256 suffices because the input has full entropy:
  nobody can search 2^256 preimages, so a slow password hash (which only helps low-entropy
  secrets) buys nothing, and an HMAC key would be one more secret file to protect and lose
  without raising that bar. A deterministic hash also makes the lookup an indexed primary-key
  match rather than a scan. The raw token exists only in :meth:`mint_tokens`'s return value.
* **Redemption is atomic.** Check and burn happen in one ``BEGIN IMMEDIATE`` transaction,
  which holds SQLite's write lock, so of two concurrent redemptions of one token (any threads,
  connections or processes) exactly one succeeds and the other sees :class:`TokenReused`. A
  rejected redemption (unknown, reused or expired token, bad CSR) changes nothing; a bad CSR
  is rejected before the token is even looked at, so a typo does not burn it.
* **Unlinkability.** A token row records only that it was used and when, not which device
  redeemed it: an operator's note of who received which token cannot be joined to a device id.
* **Durability.** ``synchronous=FULL`` (see :mod:`storage.sqlite`): a burnt token or a
  revocation that was acknowledged survives power loss, so a token can never be redeemed
  twice across a crash.
* **What is stored** (``enrolment.sqlite3``, mode ``0600``, WAL): token hashes with creation,
  expiry and use times; per device its id, certificate serial, certificate SHA-256, validity
  end, enrolment time and revocation time. Never a raw token, never a private key (the
  device's key never leaves it; the CA key lives in ``ca.key``, see :mod:`identity.pki`).
* **What is logged**: at INFO, how many tokens were minted and until when, and a device id
  when it is enrolled or revoked; at WARNING, each refused redemption with its reason (error
  class and message, which never quote the token). Never tokens, token hashes or keys.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from identity.pki import (
    LocalCA,
    Purpose,
    certificate_common_name,
    certificate_fingerprint,
    verify_peer_certificate,
)
from storage.sqlite import open_db, transaction

__all__ = [
    "DB_FILE",
    "CredentialMismatch",
    "DeviceRevoked",
    "Enrolment",
    "EnrolmentError",
    "EnrolmentRegistry",
    "InvalidKeyRequest",
    "TokenCounts",
    "TokenError",
    "TokenExpired",
    "TokenReused",
    "TokenUnknown",
    "UnknownDevice",
    "build_enrolment_csr",
    "hash_token",
]

log = logging.getLogger(__name__)

#: Default database file name inside the coordinator's state dir.
DB_FILE = "enrolment.sqlite3"

#: Most tokens one mint call may create (a guard against a typo minting billions).
MAX_TOKENS_PER_MINT = 1_000_000
_TOKEN_BYTES = 32
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_TOKEN_HASH_DOMAIN = b"decentsim-enrolment-token-v1\x00"
_DEVICE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_MAX_REQUEST_BYTES = 16 * 1024

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE enrolment_tokens (
        token_hash BLOB PRIMARY KEY CHECK (length(token_hash) = 32),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL CHECK (expires_at > created_at),
        used_at REAL
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY CHECK (length(device_id) = 32),
        cert_serial TEXT NOT NULL UNIQUE,
        cert_sha256 BLOB NOT NULL UNIQUE CHECK (length(cert_sha256) = 32),
        enrolled_at REAL NOT NULL,
        not_after REAL NOT NULL,
        revoked_at REAL
    ) WITHOUT ROWID;
    CREATE INDEX devices_revoked ON devices (revoked_at) WHERE revoked_at IS NOT NULL;
    """,
    # a token may be minted for one role (e.g. "pilot:7", a pilot agent); the device that
    # redeems it holds that role
    """
    ALTER TABLE enrolment_tokens ADD COLUMN label TEXT;
    ALTER TABLE devices ADD COLUMN label TEXT;
    """,
)


class EnrolmentError(Exception):
    """Base class for enrolment and device-credential errors.

    ``grpc_status`` names the ``grpc.StatusCode`` a server should answer with (a string, so
    this module stays transport-independent).
    """

    grpc_status: ClassVar[str] = "FAILED_PRECONDITION"


class TokenError(EnrolmentError):
    """An enrolment token was refused; the registry is unchanged."""

    grpc_status: ClassVar[str] = "PERMISSION_DENIED"


class TokenUnknown(TokenError):
    """The token is malformed or was never minted here."""


class TokenReused(TokenError):
    """The token was already redeemed (tokens are single-use)."""


class TokenExpired(TokenError):
    """The token's expiry time has passed before it was redeemed."""


class InvalidKeyRequest(EnrolmentError):
    """The CSR or public key sent with a token is unusable; the token is not consumed."""

    grpc_status: ClassVar[str] = "INVALID_ARGUMENT"


class UnknownDevice(EnrolmentError):
    """No device with this id was enrolled here (or the id is malformed)."""

    grpc_status: ClassVar[str] = "UNAUTHENTICATED"


class DeviceRevoked(EnrolmentError):
    """The device's credential has been revoked."""

    grpc_status: ClassVar[str] = "PERMISSION_DENIED"


class CredentialMismatch(EnrolmentError):
    """A CA-signed certificate names an enrolled device but is not the one issued to it."""

    grpc_status: ClassVar[str] = "UNAUTHENTICATED"


@dataclass(frozen=True)
class Enrolment:
    """What a successful redemption returns to the device."""

    device_id: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    not_after: dt.datetime
    #: the role the token was minted for (``mint_tokens(label=…)``), or None
    label: str | None = None


@dataclass(frozen=True)
class TokenCounts:
    """How many minted tokens are unused (and unexpired), used, and expired unused."""

    unused: int
    used: int
    expired: int


def hash_token(token: str) -> bytes:
    """The 32-byte value stored for ``token`` (domain-separated SHA-256; see module doc)."""
    return hashlib.sha256(_TOKEN_HASH_DOMAIN + token.encode("ascii")).digest()


def build_enrolment_csr(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Device side: a PEM CSR proving possession of ``private_key``, for :meth:`redeem`.

    The subject is a placeholder: the coordinator ignores it and names the device itself.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "decentsim-device")]))
        .sign(private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _public_key_from_request(request: bytes | str) -> ec.EllipticCurvePublicKey:
    """The P-256 public key in a PEM CSR (signature checked) or PEM SubjectPublicKeyInfo."""
    if isinstance(request, str):
        request = request.encode("ascii", "replace")
    if not isinstance(request, bytes):
        raise InvalidKeyRequest(
            f"key request must be PEM bytes or str, got {type(request).__name__}"
        )
    if len(request) > _MAX_REQUEST_BYTES:
        raise InvalidKeyRequest(
            f"key request is {len(request)} bytes; at most {_MAX_REQUEST_BYTES} accepted"
        )
    public_key: object
    if b"-----BEGIN CERTIFICATE REQUEST-----" in request:
        try:
            csr = x509.load_pem_x509_csr(request)
        except ValueError as exc:
            raise InvalidKeyRequest(f"CSR is not valid PEM/DER ({exc})") from exc
        if not csr.is_signature_valid:
            raise InvalidKeyRequest("CSR signature does not verify (no proof of key possession)")
        public_key = csr.public_key()
    elif b"-----BEGIN PUBLIC KEY-----" in request:
        try:
            public_key = serialization.load_pem_public_key(request)
        except ValueError as exc:
            raise InvalidKeyRequest(f"public key is not valid PEM ({exc})") from exc
    else:
        raise InvalidKeyRequest("expected a PEM 'CERTIFICATE REQUEST' or 'PUBLIC KEY'")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or (
        public_key.curve.name != "secp256r1"
    ):
        curve = getattr(getattr(public_key, "curve", None), "name", "")
        raise InvalidKeyRequest(
            f"device key must be ECDSA P-256, got {type(public_key).__name__} {curve}".rstrip()
        )
    return public_key


def _check_token(token: object) -> str:
    if not isinstance(token, str) or not _TOKEN_RE.match(token):
        # Never echo the value: it may be a real token with a typo.
        raise TokenUnknown("enrolment token is malformed (expected 16-128 URL-safe characters)")
    return token


def _check_device_id(device_id: object) -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.match(device_id):
        raise UnknownDevice(f"malformed device id {device_id!r} (expected 32 lowercase hex)")
    return device_id


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class EnrolmentRegistry:
    """Tokens, enrolled devices and revocations in one SQLite (WAL) database.

    One instance owns one connection and serialises its own callers with a lock, so it may be
    shared between threads; several instances (or processes) on the same database file are
    serialised by SQLite's write lock.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        ca: LocalCA,
        *,
        certificate_validity: dt.timedelta = dt.timedelta(days=365),
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        """Open (creating and migrating if needed) the registry database at ``db_path``.

        Args:
            db_path: the SQLite file (conventionally ``<state_dir>/enrolment.sqlite3``).
            ca: the CA that signs device certificates and checks them in :meth:`authenticate`.
            certificate_validity: lifetime of issued device certificates.
            clock: returns the current timezone-aware time (injectable for tests).
        """
        if certificate_validity <= dt.timedelta(0):
            raise EnrolmentError(
                f"certificate_validity must be positive, got {certificate_validity}"
            )
        self.db_path = Path(db_path)
        self.ca = ca
        self._validity = certificate_validity
        self._clock = clock
        self._lock = threading.Lock()
        self._conn = open_db(self.db_path, migrations=_MIGRATIONS, check_same_thread=False)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EnrolmentRegistry:
        """Use as a context manager that closes the connection on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection."""
        self.close()

    def _now(self) -> dt.datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise EnrolmentError("clock must return timezone-aware datetimes")
        return now

    def mint_tokens(self, count: int, ttl: dt.timedelta, label: str | None = None) -> list[str]:
        """Create ``count`` fresh single-use tokens valid for ``ttl``; return them. With
        ``label`` (at most 64 characters), the device that redeems one holds that role.

        The returned strings are the only copy of the tokens: only their hashes are stored.

        Raises:
            EnrolmentError: ``count`` is not in ``1..MAX_TOKENS_PER_MINT`` or ``ttl`` is not
                positive.
        """
        if isinstance(count, bool) or not isinstance(count, int):
            raise EnrolmentError(f"count must be an int, got {type(count).__name__}")
        if not 1 <= count <= MAX_TOKENS_PER_MINT:
            raise EnrolmentError(f"count must be in 1..{MAX_TOKENS_PER_MINT}, got {count}")
        if not isinstance(ttl, dt.timedelta) or ttl <= dt.timedelta(0):
            raise EnrolmentError(f"ttl must be a positive timedelta, got {ttl!r}")
        if label is not None and not (isinstance(label, str) and 0 < len(label) <= 64):
            raise EnrolmentError(f"label must be a string of 1..64 characters, got {label!r}")
        now = self._now()
        created, expires = now.timestamp(), (now + ttl).timestamp()
        tokens = [secrets.token_urlsafe(_TOKEN_BYTES) for _ in range(count)]
        rows = [(hash_token(token), created, expires, label) for token in tokens]
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "INSERT INTO enrolment_tokens (token_hash, created_at, expires_at, label) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
        log.info("minted %d enrolment tokens valid until %s", count, (now + ttl).isoformat())
        return tokens

    def label_of(self, token: str) -> str | None:
        """The label of an unused ``token`` (None: unlabelled, or not a usable token, which
        :meth:`redeem` then refuses), so a caller can check the role before the token burns."""
        try:
            token_hash = hash_token(_check_token(token))
        except TokenError:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT label FROM enrolment_tokens WHERE token_hash = ? AND used_at IS NULL",
                (token_hash,),
            ).fetchone()
        return None if row is None else row[0]

    def redeem(self, token: str, key_request: bytes | str) -> Enrolment:
        """Burn ``token`` and enrol a new device holding the key in ``key_request``.

        Args:
            token: a token from :meth:`mint_tokens`.
            key_request: a PEM CSR (preferred: proves possession of the key; see
                :func:`build_enrolment_csr`) or a PEM P-256 public key.

        Returns:
            The new device id and its client certificate (CN = device id, clientAuth).

        Raises:
            InvalidKeyRequest: the CSR/key is unusable (checked first; token untouched).
            TokenUnknown: the token is malformed or unknown.
            TokenReused: the token was already redeemed.
            TokenExpired: the token expired.
        """
        try:
            return self._redeem(token, key_request)
        except EnrolmentError as exc:
            # Audit trail for refused enrolments; the messages never contain the token.
            log.warning("enrolment refused: %s: %s", type(exc).__name__, exc)
            raise

    def _redeem(self, token: str, key_request: bytes | str) -> Enrolment:
        public_key = _public_key_from_request(key_request)
        token_hash = hash_token(_check_token(token))
        with self._lock, transaction(self._conn):
            now = self._now()
            row = self._conn.execute(
                "SELECT expires_at, used_at, label FROM enrolment_tokens WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            if row is None:
                raise TokenUnknown("enrolment token is not known to this coordinator")
            expires_at, used_at, label = row
            if used_at is not None:
                raise TokenReused("enrolment token has already been used")
            if now.timestamp() >= expires_at:
                expired = dt.datetime.fromtimestamp(expires_at, dt.timezone.utc)
                raise TokenExpired(f"enrolment token expired at {expired.isoformat()}")
            device_id = secrets.token_hex(16)
            credential = self.ca.issue_client_certificate(
                device_id, public_key=public_key, validity=self._validity, now=now
            )
            certificate = credential.certificate
            self._conn.execute(
                "INSERT INTO devices (device_id, cert_serial, cert_sha256, enrolled_at, "
                "not_after, label) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    format(certificate.serial_number, "x"),
                    certificate_fingerprint(certificate),
                    now.timestamp(),
                    certificate.not_valid_after_utc.timestamp(),
                    label,
                ),
            )
            burnt = self._conn.execute(
                "UPDATE enrolment_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                (now.timestamp(), token_hash),
            ).rowcount
            if burnt != 1:
                # Unreachable under BEGIN IMMEDIATE; kept so a weakened lock fails closed.
                raise TokenReused("enrolment token has already been used")
        log.info("enrolled device %s", device_id)
        return Enrolment(
            device_id=device_id,
            certificate_pem=credential.cert_pem,
            ca_certificate_pem=credential.ca_pem,
            not_after=certificate.not_valid_after_utc,
            label=label,
        )

    def revoke(self, device_id: str) -> bool:
        """Revoke a device's credential; True if newly revoked, False if it already was.

        Raises:
            UnknownDevice: no such device.
        """
        _check_device_id(device_id)
        with self._lock, transaction(self._conn):
            row = self._conn.execute(
                "SELECT revoked_at FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None:
                raise UnknownDevice(f"device {device_id} is not enrolled here")
            if row[0] is not None:
                return False
            self._conn.execute(
                "UPDATE devices SET revoked_at = ? WHERE device_id = ?",
                (self._now().timestamp(), device_id),
            )
        log.info("revoked device %s", device_id)
        return True

    def is_revoked(self, device_id: str) -> bool:
        """Whether the enrolled device's credential is revoked.

        Raises:
            UnknownDevice: no such device.
        """
        _check_device_id(device_id)
        with self._lock:
            row = self._conn.execute(
                "SELECT revoked_at FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        if row is None:
            raise UnknownDevice(f"device {device_id} is not enrolled here")
        return row[0] is not None

    def revoked_devices(self) -> list[str]:
        """The revocation list: ids of every revoked device, sorted."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT device_id FROM devices WHERE revoked_at IS NOT NULL ORDER BY device_id"
            ).fetchall()
        return [row[0] for row in rows]

    def is_enrolled(self, device_id: str) -> bool:
        """Whether ``device_id`` was enrolled here (revoked or not)."""
        if not isinstance(device_id, str) or not _DEVICE_ID_RE.match(device_id):
            return False
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return row is not None

    def authenticate(self, certificate_pem: bytes | str) -> str:
        """Map the client certificate a connection presented to an enrolled, unrevoked device.

        Returns:
            The device id.

        Raises:
            identity.pki.CertificateRejected: not a valid clientAuth certificate of this CA
                (wrong issuer, bad signature, outside its validity window, ...).
            UnknownDevice: its CN is not an enrolled device id (e.g. ``"aggregator"``).
            CredentialMismatch: a CA-signed certificate for that id other than the issued one.
            DeviceRevoked: the device's credential has been revoked.
        """
        certificate = verify_peer_certificate(
            certificate_pem, self.ca, purpose=Purpose.CLIENT, now=self._now()
        )
        device_id = _check_device_id(certificate_common_name(certificate))
        with self._lock:
            row = self._conn.execute(
                "SELECT cert_sha256, revoked_at FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        if row is None:
            raise UnknownDevice(f"device {device_id} is not enrolled here")
        if not secrets.compare_digest(bytes(row[0]), certificate_fingerprint(certificate)):
            raise CredentialMismatch(
                f"certificate presented for device {device_id} is not the one issued to it"
            )
        if row[1] is not None:
            raise DeviceRevoked(f"device {device_id} has been revoked")
        return device_id

    def token_counts(self) -> TokenCounts:
        """Counts of unused, used, and expired-unused tokens (for status displays)."""
        now = self._now().timestamp()
        with self._lock:
            unused, used, expired = self._conn.execute(
                "SELECT "
                "coalesce(sum(used_at IS NULL AND expires_at > ?), 0), "
                "coalesce(sum(used_at IS NOT NULL), 0), "
                "coalesce(sum(used_at IS NULL AND expires_at <= ?), 0) "
                "FROM enrolment_tokens",
                (now, now),
            ).fetchone()
        return TokenCounts(unused=int(unused), used=int(used), expired=int(expired))
