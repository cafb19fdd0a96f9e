"""Real TLS over gRPC with the local CA: mutual authentication succeeds only for our peers.

An in-process ``grpc.server`` on ``127.0.0.1:0`` requires client certificates; a generic
bytes-in/bytes-out handler (no protobuf) reports what the TLS layer authenticated and maps the
client certificate to an enrolled device through :class:`EnrolmentRegistry`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity.enrolment import (
    EnrolmentError,
    EnrolmentRegistry,
    build_enrolment_csr,
)
from identity.pki import (
    DEFAULT_SERVER_NAMES,
    CertificateRejected,
    Credential,
    GrpcPEM,
    LocalCA,
    Purpose,
)

SERVICE = "decentsim.test.Probe"
WHO_AM_I = f"/{SERVICE}/WhoAmI"
DEVICE = f"/{SERVICE}/Device"
TIMEOUT_S = 5.0


@dataclass
class Deployment:
    """A running TLS server and the material clients need."""

    port: int
    ca: LocalCA
    registry: EnrolmentRegistry
    server: Credential


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Echo the commonName the TLS layer authenticated."""
    auth = context.auth_context()
    return auth["x509_common_name"][0] + b"|" + request


def _device_handler(registry: EnrolmentRegistry) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    """A handler that maps the connection's client certificate to an enrolled device."""

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        pem = context.auth_context()["x509_pem_cert"][0]
        try:
            return registry.authenticate(pem).encode()
        except (EnrolmentError, CertificateRejected) as exc:
            status = getattr(exc, "grpc_status", "UNAUTHENTICATED")
            context.abort(getattr(grpc.StatusCode, status), str(exc))
            raise AssertionError("context.abort returned") from exc

    return handler


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    state = tmp_path_factory.mktemp("coordinator")
    ca = LocalCA.load_or_create(state, "coordinator CA")
    server_cred = ca.ensure_credential(
        "server", Purpose.SERVER, common_name="localhost", hostnames=DEFAULT_SERVER_NAMES
    )
    registry = EnrolmentRegistry(state / "enrolment.sqlite3", ca)
    pem = server_cred.grpc_pem()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i),
                    "Device": grpc.unary_unary_rpc_method_handler(_device_handler(registry)),
                },
            ),
        )
    )
    credentials = grpc.ssl_server_credentials(
        [(pem.private_key, pem.certificate_chain)],
        root_certificates=pem.root_certificates,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    try:
        yield Deployment(port, ca, registry, server_cred)
    finally:
        server.stop(grace=None)
        registry.close()


def _call(
    deployment: Deployment,
    method: str,
    credentials: grpc.ChannelCredentials | None,
    payload: bytes = b"ping",
) -> bytes:
    target = f"127.0.0.1:{deployment.port}"
    channel = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        return channel.unary_unary(method)(payload, timeout=TIMEOUT_S)


def _client_credentials(root: bytes, cred: Credential | None) -> grpc.ChannelCredentials:
    if cred is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    pem: GrpcPEM = cred.grpc_pem()
    return grpc.ssl_channel_credentials(root, pem.private_key, pem.certificate_chain)


def _enrol_device(deployment: Deployment) -> tuple[str, grpc.ChannelCredentials]:
    """A device's view: own key, a token, a CSR, then mTLS credentials from the result."""
    (token,) = deployment.registry.mint_tokens(1, dt.timedelta(minutes=5))
    key = ec.generate_private_key(ec.SECP256R1())
    enrolment = deployment.registry.redeem(token, build_enrolment_csr(key))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    creds = grpc.ssl_channel_credentials(
        enrolment.ca_certificate_pem, key_pem, enrolment.certificate_pem
    )
    return enrolment.device_id, creds


def _assert_status(
    deployment: Deployment,
    method: str,
    creds: grpc.ChannelCredentials | None,
    code: grpc.StatusCode,
) -> str:
    """Call ``method`` expecting it to fail with ``code``; return the status details."""
    with pytest.raises(grpc.RpcError) as info:
        _call(deployment, method, creds)
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


def test_enrolled_device_is_authenticated_over_mtls(deployment: Deployment) -> None:
    device_id, creds = _enrol_device(deployment)
    assert _call(deployment, WHO_AM_I, creds, b"hello") == device_id.encode() + b"|hello"
    assert _call(deployment, DEVICE, creds) == device_id.encode()


def test_aggregator_identity_is_seen_by_its_common_name(deployment: Deployment) -> None:
    aggregator = deployment.ca.ensure_credential(
        "aggregator", Purpose.CLIENT, common_name="aggregator"
    )
    creds = _client_credentials(deployment.ca.cert_pem, aggregator)
    assert _call(deployment, WHO_AM_I, creds) == b"aggregator|ping"
    # The aggregator passes TLS but is not a device: the application layer says so.
    details = _assert_status(deployment, DEVICE, creds, grpc.StatusCode.UNAUTHENTICATED)
    assert "malformed device id 'aggregator'" in details


def test_revoked_device_passes_tls_but_is_refused(deployment: Deployment) -> None:
    device_id, creds = _enrol_device(deployment)
    assert _call(deployment, DEVICE, creds) == device_id.encode()
    deployment.registry.revoke(device_id)
    details = _assert_status(deployment, DEVICE, creds, grpc.StatusCode.PERMISSION_DENIED)
    assert details == f"device {device_id} has been revoked"


def test_client_without_certificate_fails(deployment: Deployment) -> None:
    creds = _client_credentials(deployment.ca.cert_pem, None)
    _assert_status(deployment, WHO_AM_I, creds, grpc.StatusCode.UNAVAILABLE)


def test_client_certificate_from_another_ca_fails(deployment: Deployment, tmp_path: Path) -> None:
    # Same CA *name* as the server's, different key: only the signature can tell them apart.
    impostor = LocalCA.load_or_create(tmp_path / "impostor", "coordinator CA")
    assert impostor.certificate.subject == deployment.ca.certificate.subject
    cred = impostor.issue_client_certificate("aggregator")
    creds = _client_credentials(deployment.ca.cert_pem, cred)
    _assert_status(deployment, WHO_AM_I, creds, grpc.StatusCode.UNAVAILABLE)


def test_plaintext_client_fails(deployment: Deployment) -> None:
    _assert_status(deployment, WHO_AM_I, None, grpc.StatusCode.UNAVAILABLE)


def test_client_that_does_not_trust_the_server_fails(
    deployment: Deployment, tmp_path: Path
) -> None:
    other = LocalCA.load_or_create(tmp_path / "other", "other CA")
    good = deployment.ca.issue_client_certificate("aggregator")
    pem = good.grpc_pem()
    creds = grpc.ssl_channel_credentials(other.cert_pem, pem.private_key, pem.certificate_chain)
    _assert_status(deployment, WHO_AM_I, creds, grpc.StatusCode.UNAVAILABLE)


def test_error_status_names_are_grpc_status_codes() -> None:
    from identity import enrolment

    names = {
        cls.grpc_status
        for cls in vars(enrolment).values()
        if isinstance(cls, type) and issubclass(cls, EnrolmentError)
    }
    assert names <= {code.name for code in grpc.StatusCode}
