"""Enrolment URIs: what they carry, and what a device refuses."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from identity.enrolment_uri import EnrolmentURI, EnrolmentURIError
from identity.pki import LocalCA, Purpose


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.load_or_create(tmp_path / "pki", "test coordinator CA")


def test_a_uri_round_trips_with_its_pinned_ca(ca: LocalCA) -> None:
    uri = EnrolmentURI.make(
        "c.example:7000", "c.example:7002", 17, "t0ken" * 9, ca.cert_pem, -4, 6.5
    )
    text = uri.to_uri()
    assert text.startswith("decentsim://enrol?v=1&")
    parsed = EnrolmentURI.parse(text)
    assert parsed == uri and parsed.ca_pem() == ca.cert_pem
    assert parsed.ca_sha256 == hashlib.sha256(parsed.ca_der).hexdigest()
    assert (parsed.agent, parsed.tx_power_dbm, parsed.rssi_correction_db) == (17, -4, 6.5)
    plain = EnrolmentURI.make("c:1", "c:2", 3, "x" * 43, ca.cert_pem)
    assert "tx_power_dbm" not in plain.to_uri()
    assert EnrolmentURI.parse(plain.to_uri()).rssi_correction_db is None


def test_a_ca_that_does_not_match_its_fingerprint_is_refused(ca: LocalCA, tmp_path: Path) -> None:
    text = EnrolmentURI.make("c:1", "c:2", 3, "x" * 43, ca.cert_pem).to_uri()
    other = LocalCA.load_or_create(tmp_path / "other", "an attacker's CA")
    der = EnrolmentURI.make("c:1", "c:2", 3, "x" * 43, other.cert_pem).ca_der
    swapped = re.sub(r"ca=[^&]*", "ca=" + base64.urlsafe_b64encode(der).decode().rstrip("="), text)
    with pytest.raises(EnrolmentURIError, match="ca_sha256"):
        EnrolmentURI.parse(swapped)
    truncated = text[:-40]
    with pytest.raises(EnrolmentURIError, match="ca"):
        EnrolmentURI.parse(truncated)


def test_a_certificate_that_is_not_a_ca_is_refused(ca: LocalCA) -> None:
    leaf = ca.ensure_credential("gateway", Purpose.SERVER, common_name="coordinator")
    with pytest.raises(EnrolmentURIError, match="not a CA certificate"):
        EnrolmentURI.make("c:1", "c:2", 3, "x" * 43, leaf.cert_pem)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (lambda t: t.replace("decentsim://enrol", "https://enrol"), "decentsim://enrol"),
        (lambda t: t.replace("v=1", "v=2"), "field v"),
        (lambda t: re.sub(r"&agent=\d+", "", t), "lacks field(s) ['agent']"),
        (lambda t: t + "&colour=blue", "unknown field(s) ['colour']"),
        (lambda t: t + "&agent=4", "repeats field(s) ['agent']"),
        (lambda t: re.sub(r"agent=\d+", "agent=minus", t), "field agent"),
        (lambda t: re.sub(r"enrol=[^&]*", "enrol=" + quote("no port"), t), "field enrol"),
        (lambda t: t.replace("v=1&", "v=1&tx_power_dbm=99&"), "tx_power_dbm"),
        (lambda t: t.replace("v=1&", "v=1&rssi_correction_db=nan&"), "rssi_correction_db"),
    ],
)
def test_a_malformed_uri_names_its_field(ca: LocalCA, change: object, names: str) -> None:
    text = EnrolmentURI.make("c:1", "c:2", 3, "x" * 43, ca.cert_pem).to_uri()
    with pytest.raises(EnrolmentURIError) as err:
        EnrolmentURI.parse(change(text))  # type: ignore[operator]
    assert names in str(err.value)
    assert "x" * 43 not in str(err.value)  # never the token
