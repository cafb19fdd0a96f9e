"""Channels and listeners: TLS by default, and the guard rails of ``--insecure``.

``--insecure`` (DEBUGGING ONLY) runs gRPC without TLS: nothing authenticates a peer, so a
device names its credential in call metadata (:data:`CREDENTIAL_METADATA`) and the server
believes it. That is tolerable only where every caller is a process of the same operator on
the same host, so an insecure process refuses any listen or connect address that is not
loopback (:func:`require_loopback`) and says loudly that it runs without TLS
(:func:`warn_insecure`).
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any

import grpc

from proto.limits import Channel, channel_options

#: Call metadata naming the caller's credential in ``--insecure`` (debugging) mode only.
CREDENTIAL_METADATA = "decentsim-credential"
#: Host names that resolve to the loopback interface without asking a resolver.
_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


class InsecureAddressError(ValueError):
    """``--insecure`` was asked for an address that is not loopback (names it)."""


def split_host(address: str) -> str:
    """The host part of ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (empty: every interface)."""
    if address.startswith("["):
        host, sep, _ = address[1:].partition("]")
        if not sep:
            raise InsecureAddressError(f"{address!r}: unbalanced '[' in the address")
        return host
    host, sep, _ = address.rpartition(":")
    return host if sep else address


def is_loopback(address: str) -> bool:
    """Whether ``address`` (``HOST:PORT``) is on the loopback interface only."""
    host = split_host(address).lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a DNS name other than localhost, or "" / "0.0.0.0"-style wildcards
        return False


def require_loopback(address: str, what: str) -> None:
    """Refuse a non-loopback ``address`` for ``--insecure``.

    Raises:
        InsecureAddressError: names ``what`` (e.g. ``--listen``) and the address.
    """
    if not is_loopback(address):
        raise InsecureAddressError(
            f"{what} {address!r}: --insecure works on loopback addresses only (127.0.0.1, "
            "::1, localhost); anything else needs TLS"
        )


def warn_insecure(role: str) -> None:
    """Say loudly, on stderr and in the log, that this process runs without TLS."""
    text = (
        f"WARNING: decentsim {role} runs with --insecure: NO TLS, peers are not authenticated "
        "and everything on the wire is readable. Loopback only; use only for debugging."
    )
    sys.stderr.write(text + "\n")
    logging.getLogger(__name__).warning(text)


def device_channel(
    target: str, creds: grpc.ChannelCredentials, insecure: bool = False, what: str = "--coordinator"
) -> grpc.Channel:
    """A device's channel to the coordinator (``what`` names the address in errors): TLS, or
    (``--insecure``) plaintext to loopback."""
    opts = channel_options(Channel.DEVICE)
    if insecure:
        require_loopback(target, what)
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, creds, options=opts)


class CredentialMetadata(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """``--insecure`` only: name the credential in every call's metadata (nothing proves it)."""

    def __init__(self, credential: str) -> None:
        self._item = (CREDENTIAL_METADATA, credential)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._item]
        return continuation(details._replace(metadata=metadata), request)
