"""The coordinator as a Flower ``ServerApp``: the round logic drives device pools through
Flower's Message API instead of the gRPC gateway.

The ServerApp hosts the same :class:`~coordinator.service.CoordinatorService` as
``decentsim coordinator serve`` (SQLite state, round state machine, step deadlines, the mTLS
link to the aggregator, which stays a separate process) and pumps its schedule to the nodes:

    enrol:  query.enrol (a single-use token)  →  the node's Enrol request  →  its credential
    each step of each round (register, messages, fetch, observations):
            query.<step> (schedule + answers)  →  the node's requests, or done
    end:    query.finished

Requests run through the service's own ``DeviceGatewayServicer`` (``transport.flower.tunnel``), so
the Flower transport has no protocol logic: the same checks, refusals, idempotent replays and
views as gRPC. A node that fails (Flower error reply) or does not answer within the step's
deadline is not asked again in that step: the service's deadline drops it out exactly as it
drops a silent gRPC device, and it is asked again at the next step (a device coming back).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tqdm import tqdm

from contract.runspec import RunSpec
from contract.schedule import FAILED, FINISHED, STEPS
from coordinator.service import CoordinatorService
from proto.decentsim.v1 import device_pb2 as pb
from transport.flower.tunnel import ENROL, RECORD, TunnelReply, TunnelServer

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

#: exchanges per node and step before the pump gives up on it (a step takes 2–4)
MAX_EXCHANGES = 64


class FlowerRunError(RuntimeError):
    """The Flower transport cannot go on (names why)."""


@dataclass(frozen=True)
class FlowerServerConfig:
    """What the ServerApp needs to host the coordinator.

    Attributes:
        state_dir: the coordinator's state dir (``decentsim coordinator init``).
        spec: the run (``None``: resume the one stored in ``state_dir``).
        aggregator: ``HOST:PORT`` of the aggregator's link; ``aggregator_export`` its export.
        node_wait_s: how long to wait for ``spec.pools`` nodes to connect.
        progress: a progress bar of committed days on stderr.
        audit_key: the public key of the coordinator's own auditor: record the coordinator's
            transcript sealed to it (``views/coordinator.transcript``, see docs/audit.md), as
            ``--audit-key`` does.
    """

    state_dir: Path
    spec: RunSpec | None
    aggregator: str
    aggregator_export: Path
    node_wait_s: float = 300.0
    progress: bool = False
    audit_key: Path | None = None


class FlowerPump:
    """Moves the service's schedule to Flower nodes and their requests to the service."""

    def __init__(self, grid: Any, service: CoordinatorService, progress: bool = False) -> None:
        from transport.flower.env import import_flwr

        import_flwr()
        from flwr.app import ConfigRecord, Message, RecordDict

        self._message = Message
        self._record = lambda fields: RecordDict({RECORD: ConfigRecord(fields)})
        self.grid = grid
        self.service = service
        self.tunnel = TunnelServer(service.gateway, self._bind)
        self.nodes: list[int] = []
        self._bar = tqdm(
            total=service.spec.days * service.spec.epochs,
            unit="day",
            disable=not progress,
            file=sys.stderr,
        )

    def _bind(self, node: int, reply: pb.EnrolResponse) -> None:
        cert = x509.load_der_x509_certificate(reply.client_certificate_der)
        self.tunnel.bind(node, cert.public_bytes(serialization.Encoding.PEM))

    def run(self, node_wait_s: float) -> None:
        """Enrol the nodes, then follow the run to its end."""
        self.nodes = self._wait_for_nodes(node_wait_s)
        tokens = self.service.mint_tokens(len(self.nodes))
        self._exchange(
            ENROL, b"", dict(zip(self.nodes, tokens, strict=True)), time.time() + node_wait_s
        )
        missing = [n for n in self.nodes if not self.tunnel.bound(n)]
        if missing:
            raise FlowerRunError(f"node(s) {missing} did not enrol")
        self.service.start_driver()
        version = 0
        while True:
            sched = self.service.schedule(version, 1000)
            if sched.version == version:
                if not self.service.driving():
                    raise FlowerRunError(
                        f"the coordinator's round driver stopped: {self.service.failure}"
                    )
                continue
            version = sched.version
            done = sched.epoch * self.service.spec.days + sched.committed_days
            self._bar.update(done - self._bar.n)
            if sched.step in (FINISHED, FAILED):
                self._exchange(FINISHED, sched.SerializeToString(), {}, deadline=time.time() + 30)
                self._bar.close()
                if sched.step == FAILED:
                    raise FlowerRunError(f"the coordinator stopped the run: {sched.failure}")
                return
            if sched.step not in STEPS:
                continue
            self.tunnel.new_round(sched.round_id)
            self._exchange(
                sched.step, sched.SerializeToString(), {}, sched.step_deadline_unix_ms / 1000
            )

    def _wait_for_nodes(self, wait_s: float) -> list[int]:
        want = self.service.spec.pools
        deadline = time.time() + wait_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= want:
                return nodes[:want]
            if time.time() > deadline:
                raise FlowerRunError(f"{len(nodes)} of {want} Flower nodes after {wait_s:.0f} s")
            time.sleep(0.5)

    def _exchange(
        self, step: str, schedule: bytes, tokens: dict[int, str], deadline: float | None
    ) -> None:
        """Message every node until it is done with ``step``, fails, or stops answering."""
        waiting = set(self.nodes)
        for _ in range(MAX_EXCHANGES):
            if not waiting:
                return
            timeout = None if deadline is None else max(1.0, deadline - time.time())
            messages = [
                self._message(
                    self._record(self.tunnel.message(n, schedule, tokens.get(n, "")).to_fields()),
                    dst_node_id=n,
                    message_type=f"query.{step}",
                    group_id=step,
                )
                for n in sorted(waiting)
            ]
            answered: set[int] = set()
            for reply in self.grid.send_and_receive(messages, timeout=timeout):
                node = reply.metadata.src_node_id
                answered.add(node)
                if reply.has_error():
                    # the node is down for this step; the service's deadline decides the rest
                    log.warning("node %d failed step %s: %s", node, step, reply.error.reason)
                    waiting.discard(node)
                    continue
                answer = TunnelReply.from_fields(reply.content[RECORD])
                if answer.calls:
                    self.tunnel.run(node, answer.calls)
                elif answer.done:
                    waiting.discard(node)
            silent = waiting - answered
            if silent:
                log.warning("node(s) %s did not answer step %s in time", sorted(silent), step)
            waiting &= answered
        log.warning(
            "step %s: node(s) %s still busy after %d exchanges", step, waiting, MAX_EXCHANGES
        )


def make_server_app(config: FlowerServerConfig) -> Any:
    """The ``ServerApp`` hosting the coordinator of ``config``'s run."""
    from transport.flower.env import import_flwr

    import_flwr()
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        del context  # everything comes from `config` (a deployment: from the run config)
        serve_flower(grid, config)

    return app


def serve_flower(grid: Any, config: FlowerServerConfig) -> None:
    """Run the coordinator of ``config`` over ``grid`` until its run is finished."""
    service = CoordinatorService(
        config.state_dir,
        config.spec,
        config.aggregator,
        config.aggregator_export,
        audit_key=config.audit_key,
    )
    try:
        FlowerPump(grid, service, config.progress).run(config.node_wait_s)
    finally:
        service.stop()
