"""Enrolment URIs: everything a pilot device needs to join a run, in one string (and a QR code).

    decentsim://enrol?v=1&coordinator=HOST:PORT&enrol=HOST:PORT&agent=A&token=T
        &ca_sha256=HEX&ca=BASE64URL

* ``coordinator`` / ``enrol``: the coordinator's device gateway (mutual TLS) and its enrolment
  endpoint (server TLS);
* ``agent``: the pilot agent the device will be;
* ``token``: the single-use enrolment token, minted for that agent (its label ``pilot:A``);
* ``tx_power_dbm``, ``rssi_correction_db`` (optional): the device's calibration profile, the
  TX power it advertises and the correction it adds to every RSSI it measures;
* ``ca``: the coordinator's CA certificate (DER), and ``ca_sha256`` its SHA-256. The URI *is*
  the trust anchor: the device pins that CA for every TLS connection, so there is no separate CA
  file to copy, and nothing learnt from the network is trusted on first use. The fingerprint
  catches a truncated or mistyped URI.

The URI holds a secret (the token), so it is written ``0600`` and shown once; once redeemed it is
worthless. It holds nothing else secret: the CA certificate is public.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

SCHEME = "decentsim"
VERSION = "1"
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
_FIELDS = ("v", "coordinator", "enrol", "agent", "token", "ca_sha256", "ca")
_CALIBRATION = ("tx_power_dbm", "rssi_correction_db")


#: the label of an enrolment token minted for pilot agent A is ``pilot:A``: the device that
#: redeems it is that agent (``decentsim pilot enrol`` mints it, the coordinator reads it)
PILOT_LABEL = "pilot:"


def pilot_label(agent: int) -> str:
    """The token label of pilot agent ``agent``."""
    return f"{PILOT_LABEL}{agent}"


def pilot_of_label(label: str | None) -> int | None:
    """The pilot agent a token label names, or None (not a pilot's token)."""
    if label is None or not label.startswith(PILOT_LABEL):
        return None
    return int(label[len(PILOT_LABEL) :])


class EnrolmentURIError(ValueError):
    """An enrolment URI is malformed; the message names the field (never the token)."""


@dataclass(frozen=True)
class EnrolmentURI:
    """A parsed, checked enrolment URI (see the module docstring)."""

    coordinator: str
    enrol: str
    agent: int
    token: str
    ca_der: bytes
    #: the device's calibration profile (None: the nominal radio)
    tx_power_dbm: int | None = None
    rssi_correction_db: float | None = None

    @property
    def ca_sha256(self) -> str:
        """The pinned CA's SHA-256 fingerprint (hex)."""
        return hashlib.sha256(self.ca_der).hexdigest()

    def ca_pem(self) -> bytes:
        """The pinned CA certificate as PEM (what gRPC's TLS takes as its only root)."""
        return x509.load_der_x509_certificate(self.ca_der).public_bytes(serialization.Encoding.PEM)

    def to_uri(self) -> str:
        """The URI string."""
        fields = {
            "v": VERSION,
            "coordinator": self.coordinator,
            "enrol": self.enrol,
            "agent": str(self.agent),
            "token": self.token,
        }
        if self.tx_power_dbm is not None:
            fields["tx_power_dbm"] = str(self.tx_power_dbm)
        if self.rssi_correction_db is not None:
            fields["rssi_correction_db"] = repr(self.rssi_correction_db)
        fields["ca_sha256"] = self.ca_sha256
        fields["ca"] = base64.urlsafe_b64encode(self.ca_der).rstrip(b"=").decode()
        query = urlencode(fields)
        return f"{SCHEME}://enrol?{query}"

    @classmethod
    def make(
        cls,
        coordinator: str,
        enrol: str,
        agent: int,
        token: str,
        ca_pem: bytes,
        tx_power_dbm: int | None = None,
        rssi_correction_db: float | None = None,
    ) -> EnrolmentURI:
        """The URI of one pilot (the CA as PEM, as the coordinator exports it)."""
        der = x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)
        uri = cls(coordinator, enrol, agent, token, der, tx_power_dbm, rssi_correction_db)
        return cls.parse(uri.to_uri())  # the same checks as a device's

    @classmethod
    def parse(cls, text: str) -> EnrolmentURI:
        """Parse and check a URI; :class:`EnrolmentURIError` names what is wrong."""
        parts = urlsplit(text.strip())
        if parts.scheme != SCHEME or parts.netloc != "enrol":
            raise EnrolmentURIError(f"an enrolment URI starts with {SCHEME}://enrol?")
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        missing = [f for f in _FIELDS if f not in query]
        if missing:
            raise EnrolmentURIError(f"enrolment URI lacks field(s) {missing}")
        extra = sorted(set(query) - set(_FIELDS) - set(_CALIBRATION))
        if extra:
            raise EnrolmentURIError(f"enrolment URI has unknown field(s) {extra}")
        repeated = [f for f in query if len(query[f]) != 1]
        if repeated:
            raise EnrolmentURIError(f"enrolment URI repeats field(s) {repeated}")
        q = {f: query[f][0] for f in _FIELDS}
        if q["v"] != VERSION:
            raise EnrolmentURIError(f"enrolment URI field v: version {q['v']!r} is not {VERSION}")
        for field in ("coordinator", "enrol"):
            if not _ADDRESS.match(q[field]):
                raise EnrolmentURIError(f"enrolment URI field {field}: not HOST:PORT")
        if not q["agent"].isdigit():
            raise EnrolmentURIError("enrolment URI field agent: not an agent id")
        if not q["token"]:
            raise EnrolmentURIError("enrolment URI field token: empty")
        try:
            der = base64.urlsafe_b64decode(q["ca"] + "=" * (-len(q["ca"]) % 4))
        except ValueError:
            raise EnrolmentURIError("enrolment URI field ca: not base64url") from None
        if hashlib.sha256(der).hexdigest() != q["ca_sha256"].lower():
            raise EnrolmentURIError(
                "enrolment URI field ca_sha256: the CA certificate does not match its "
                "fingerprint (a truncated or altered URI)"
            )
        try:
            cert = x509.load_der_x509_certificate(der)
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (ValueError, x509.ExtensionNotFound):
            raise EnrolmentURIError("enrolment URI field ca: not a CA certificate") from None
        if not is_ca:
            raise EnrolmentURIError("enrolment URI field ca: not a CA certificate")
        tx, rssi = _calibration({f: query[f][0] for f in _CALIBRATION if f in query})
        return cls(q["coordinator"], q["enrol"], int(q["agent"]), q["token"], der, tx, rssi)


def _calibration(fields: dict[str, str]) -> tuple[int | None, float | None]:
    """The calibration profile's optional fields, checked."""
    tx: int | None = None
    rssi: float | None = None
    if "tx_power_dbm" in fields:
        try:
            tx = int(fields["tx_power_dbm"])
        except ValueError:
            raise EnrolmentURIError("enrolment URI field tx_power_dbm: not an integer") from None
        if not -127 <= tx <= 20:
            raise EnrolmentURIError("enrolment URI field tx_power_dbm: not in -127..20 dBm")
    if "rssi_correction_db" in fields:
        try:
            rssi = float(fields["rssi_correction_db"])
        except ValueError:
            raise EnrolmentURIError(
                "enrolment URI field rssi_correction_db: not a number"
            ) from None
        if not (math.isfinite(rssi) and abs(rssi) <= 40):
            raise EnrolmentURIError("enrolment URI field rssi_correction_db: not in -40..40 dB")
    return tx, rssi
