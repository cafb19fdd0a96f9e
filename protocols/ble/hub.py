"""The radio hub: the air between pilot devices, for tests without Bluetooth hardware.

``decentsim radio-hub`` holds one bumble ``LocalLink`` with one virtual ``Controller`` per pilot,
each serving HCI on its own loopback TCP port. A pilot process runs its real bumble host against
it (``--hci tcp-client:127.0.0.1:PORT``), exactly the code path it runs on a USB dongle
(``--hci usb:0``): HCI commands in, HCI events out.

What the hub adds to bumble's link is physics, from a scripted
:class:`~protocols.ble.proximity.ProximitySchedule`:

* every advertising PDU is delivered only to the pilots within range of its sender at that
  moment of protocol time (the run clock), with the RSSI of the schedule's distance through the
  ideal radio's path loss, optional Gaussian noise per packet, and optional packet loss;
* a receiver may read its RSSI off by a fixed offset (``rx_offset_db``), as real radios do by
  several dB: what a device's calibration corrects;
* bumble's virtual controller reports RSSI -50 dBm whatever happens and reports every extended
  advert twice (once as connectable advertising, once as a scan response that a
  non-scannable advert cannot have): the hub rewrites the RSSI and drops the fabricated scan
  response, so one packet on the air is one report;
* bumble's ``HCI_Reset`` leaves advertising on; the hub's stops it, as a real controller's does.

The hub also sniffs the air as a passive observer would: which advertiser address carried which
RPI (``--sniff FILE``), so a test can check that addresses rotate with RPIs. Everything it sees
is public broadcast; it learns nothing a scanner in the room would not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import socket
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from bumble import hci, ll
from bumble.controller import Controller
from bumble.link import LocalLink
from bumble.transport.common import Transport
from bumble.transport.tcp_server import open_tcp_server_transport_with_socket

from protocols.ble.advert import decode_advert
from protocols.ble.errors import AdvertError, BleError
from protocols.ble.proximity import ProximitySchedule
from protocols.ble.radio import NOMINAL_TX_POWER_DBM
from protocols.clock import RunClock

#: Below this RSSI a receiver hears nothing (the simulated radio's sensitivity).
SENSITIVITY_DBM = -100.0

_EXT_SCAN_RESPONSE = hci.HCI_LE_Extended_Advertising_Report_Event.EventType.SCAN_RESPONSE
_LEGACY_SCAN_RSP = hci.HCI_LE_Advertising_Report_Event.EventType.SCAN_RSP


class HubError(BleError):
    """The hub cannot start; the message says why."""


class HubController(Controller):
    """A virtual controller whose advertising reports carry the hub's RSSI, once per packet."""

    def __init__(self, name: str, agent: int, **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        self.agent = agent
        #: the RSSI of the packet being delivered (set by the hub around delivery)
        self.delivering_rssi: int | None = None

    def on_hci_reset_command(
        self, command: hci.HCI_Reset_Command
    ) -> hci.HCI_StatusReturnParameters:
        """Reset as a real controller does (Core spec Vol 4, Part E, 7.3.2): advertising and
        scanning stop. bumble's leaves them on, so a pilot restarted after ``kill -9`` would
        find its dead predecessor's advert (old address, old RPI) still on the air and reuse
        that advertising set: for a moment one address would carry two RPIs."""
        self.le_legacy_advertiser.stop()
        for advertising_set in self.advertising_sets.values():
            advertising_set.stop()
        self.advertising_sets.clear()
        self.le_scan_enable = False
        return super().on_hci_reset_command(command)

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        """Rewrite advertising reports (RSSI, no fabricated scan responses); pass the rest."""
        if isinstance(packet, hci.HCI_LE_Extended_Advertising_Report_Event):
            reports = [r for r in packet.reports if r.event_type != _EXT_SCAN_RESPONSE]
            if not reports or self.delivering_rssi is None:
                return
            packet = hci.HCI_LE_Extended_Advertising_Report_Event(
                [dataclasses.replace(r, rssi=self.delivering_rssi) for r in reports]
            )
        elif isinstance(packet, hci.HCI_LE_Advertising_Report_Event):
            reports = [r for r in packet.reports if r.event_type != _LEGACY_SCAN_RSP]
            if not reports or self.delivering_rssi is None:
                return
            packet = hci.HCI_LE_Advertising_Report_Event(
                [dataclasses.replace(r, rssi=self.delivering_rssi) for r in reports]
            )
        super().send_hci_packet(packet)


class HubLink(LocalLink):
    """bumble's ``LocalLink`` with range, RSSI, noise and loss from a proximity schedule."""

    def __init__(
        self,
        schedule: ProximitySchedule,
        clock: RunClock,
        *,
        noise_db: float = 0.0,
        loss: float = 0.0,
        seed: int = 0,
        tx_power_dbm: float = NOMINAL_TX_POWER_DBM,
        rx_offset_db: dict[int, float] | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(noise_db) and noise_db >= 0):
            raise HubError(f"noise_db must be >= 0, got {noise_db}")
        if not 0 <= loss < 1:
            raise HubError(f"loss must be in [0, 1), got {loss}")
        self.schedule = schedule
        self.clock = clock
        self.noise_db = noise_db
        self.loss = loss
        self.tx_power_dbm = tx_power_dbm
        #: receiver agent → dB its radio reads above (or below) the true RSSI
        self.rx_offset_db = dict(rx_offset_db or {})
        self._rng = np.random.default_rng(seed)
        self.delivered = 0
        #: sniffer: advertiser address → the RPIs it carried
        self.address_rpis: dict[str, set[str]] = {}

    def _sniff(self, packet: ll.AdvertisingPdu) -> None:
        data = getattr(packet, "data", b"")
        try:
            beacon = decode_advert(bytes(data))
        except AdvertError:
            return  # not an Exposure Notification advert (or a malformed one): not ours to log
        address = str(packet.advertiser_address).split("/")[0]
        self.address_rpis.setdefault(address, set()).add(beacon.rpi.hex())

    def send_advertising_pdu(
        self, sender_controller: Controller, packet: ll.AdvertisingPdu
    ) -> None:
        """Deliver ``packet`` to the pilots in range of its sender now, each with its RSSI."""
        self._sniff(packet)
        if not isinstance(sender_controller, HubController):
            return
        t = self.clock.now() - self.clock.sim_epoch
        loop = asyncio.get_running_loop()
        for receiver in self.controllers:
            if receiver is sender_controller or not isinstance(receiver, HubController):
                continue
            rssi = self.schedule.rssi(sender_controller.agent, receiver.agent, t, self.tx_power_dbm)
            if math.isnan(rssi):
                continue
            rssi += self.rx_offset_db.get(receiver.agent, 0.0)
            if self.noise_db:
                rssi += float(self._rng.normal(0.0, self.noise_db))
            if rssi < SENSITIVITY_DBM or (self.loss and self._rng.random() < self.loss):
                continue
            self.delivered += 1
            loop.call_soon(self._deliver, receiver, packet, max(-127, min(20, round(rssi))))

    @staticmethod
    def _deliver(receiver: HubController, packet: ll.AdvertisingPdu, rssi: int) -> None:
        receiver.delivering_rssi = rssi
        try:
            receiver.on_ll_advertising_pdu(packet)
        finally:
            receiver.delivering_rssi = None


class RadioHub:
    """One :class:`HubController` per pilot agent, each on a loopback TCP port."""

    def __init__(self, link: HubLink, agents: Sequence[int], host: str = "127.0.0.1") -> None:
        if not agents or len(set(agents)) != len(agents):
            raise HubError(f"need distinct pilot agent ids, got {list(agents)}")
        self.link = link
        self.agents = list(agents)
        self.host = host
        self.ports: dict[int, int] = {}
        self._transports: list[Transport] = []

    async def start(self, ports: Sequence[int] | None = None) -> dict[int, int]:
        """Listen for each pilot's host (port 0: any free port); returns agent → port."""
        wanted = list(ports) if ports is not None else [0] * len(self.agents)
        if len(wanted) != len(self.agents):
            raise HubError(f"{len(wanted)} ports for {len(self.agents)} pilots")
        for agent, port in zip(self.agents, wanted, strict=True):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
            except OSError as err:
                sock.close()
                raise HubError(
                    f"cannot listen on {self.host}:{port} for pilot {agent}: {err}"
                ) from err
            transport = await open_tcp_server_transport_with_socket(sock)
            self._transports.append(transport)
            HubController(
                f"pilot-{agent}",
                agent,
                host_source=transport.source,
                host_sink=transport.sink,
                link=self.link,
            )
            self.ports[agent] = sock.getsockname()[1]
        return dict(self.ports)

    async def close(self) -> None:
        """Stop listening."""
        for transport in self._transports:
            await transport.close()
            server = getattr(transport, "server", None)  # bumble's TCP server transport
            if server is not None:
                server.close()
        self._transports.clear()

    def write_sniff(self, path: Path) -> None:
        """The sniffer's record: address → RPIs, and how many packets were delivered."""
        record = {
            "delivered": self.link.delivered,
            "address_rpis": {a: sorted(r) for a, r in sorted(self.link.address_rpis.items())},
        }
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
