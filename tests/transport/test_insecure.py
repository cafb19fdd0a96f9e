"""``--insecure`` (debugging only: no TLS, a caller names its credential in metadata) is
refused on any address that is not loopback, for listening and for connecting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from aggregator.service import AggregatorService, aggregator_init
from coordinator.service import CoordinatorService, coordinator_init
from launcher.federation import make_spec
from protocols.secure_sum import Mode
from transport.grpc.channels import InsecureAddressError, device_channel, is_loopback

LOOPBACK = ["127.0.0.1:7000", "127.0.0.2:1", "[::1]:7000", "localhost:7000", "LOCALHOST:1"]
ELSEWHERE = [
    "0.0.0.0:7000",
    "[::]:7000",
    ":7000",
    "10.0.0.5:7000",
    "192.168.1.2:7000",
    "example.org:7000",
    "[2001:db8::1]:7000",
    "localhost.example.org:7000",
]


@pytest.mark.parametrize("address", LOOPBACK)
def test_loopback_addresses_are_recognised(address: str) -> None:
    assert is_loopback(address)


@pytest.mark.parametrize("address", ELSEWHERE)
def test_other_addresses_are_not_loopback(address: str) -> None:
    assert not is_loopback(address)


def test_an_insecure_device_refuses_a_remote_coordinator() -> None:
    creds = grpc.ssl_channel_credentials()
    with pytest.raises(InsecureAddressError, match=r"--coordinator '10\.0\.0\.5:7000'"):
        device_channel("10.0.0.5:7000", creds, insecure=True)
    device_channel("10.0.0.5:7000", creds).close()  # with TLS any address is fine
    device_channel("127.0.0.1:7000", creds, insecure=True).close()


def test_insecure_servers_listen_and_connect_on_loopback_only(tmp_path: Path) -> None:
    c_export = coordinator_init(tmp_path / "c", ("localhost",))
    a_export = aggregator_init(tmp_path / "a", ("localhost",))
    aggregator = AggregatorService(tmp_path / "a", Mode.MAILBOX, c_export, insecure=True)
    try:
        with pytest.raises(InsecureAddressError, match=r"--listen '0\.0\.0\.0:0'"):
            aggregator.serve("0.0.0.0:0")
        port = aggregator.serve("127.0.0.1:0")
    finally:
        aggregator.stop()
    spec = make_spec("synthetic:20", 1, pools=1)
    with pytest.raises(InsecureAddressError, match=r"--aggregator '10\.9\.8\.7:7001'"):
        CoordinatorService(tmp_path / "c", spec, "10.9.8.7:7001", a_export, insecure=True)
    service = CoordinatorService(tmp_path / "c", spec, f"127.0.0.1:{port}", a_export, insecure=True)
    try:
        with pytest.raises(InsecureAddressError, match="--enrol-listen"):
            service.serve("127.0.0.1:0", "0.0.0.0:0")
    finally:
        service.stop()


def test_the_command_refuses_a_public_insecure_listener_in_one_line(tmp_path: Path) -> None:
    c_export = coordinator_init(tmp_path / "c", ("localhost",))
    done = subprocess.run(
        [sys.executable, "-m", "decentsim", "aggregator", "serve", "--insecure",
         "--state-dir", str(tmp_path / "a"), "--coordinator-export", str(c_export),
         "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("decentsim aggregator") and "--listen '0.0.0.0:0'" in lines[-1]
