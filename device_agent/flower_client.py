"""Device pools as a Flower ``ClientApp``: the device-agent logic over Flower's Message API.

Each Flower node (a SuperNode, or a virtual node of Flower's simulation engine) hosts one
device pool. The ServerApp (``coordinator.flower_server``) sends one message type per step —
``query.enrol``, ``query.register``, ``query.messages``, ``query.fetch``,
``query.observations``, ``query.finished`` — each carrying the round schedule (a
``decentsim.v1.RoundSchedule``) and the answers to the pool's earlier requests; the pool runs
the same :class:`~device_agent.agent.PoolRunner` as the gRPC device agent, over a
:class:`~transport.flower.stub.TunnelStub`, and replies with its unanswered DeviceGateway
requests (protobuf bytes) or ``done`` (see ``transport.flower.tunnel``).

A node is configured by its ``node_config`` (``flower-supernode --node-config``), over the
defaults the app was made with (a simulation's); ``{partition-id}`` and ``{num-partitions}``
in a value are replaced by the node's own (Flower's simulation engine sets them):

    state-dir        the pool's private store (credential, secret, states, contact log)
    population       population spec (``synthetic:N`` or a data directory)
    population-seed  its seed (default 0)
    slice            ``I/P``: this pool's share of the agents (default
                     ``{partition-id}/{num-partitions}``)
    world-secret     file with the simulated world's beacon secret (simulated radios)

Everything a pool keeps lives in its store, so a node may be served by any worker process: a
worker that has not seen the node rebuilds it from the store (as a restarted agent does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.schedule import FINISHED, STEPS, parse_slice, units_of
from device_agent.agent import (
    AgentConfig,
    AgentError,
    PoolRunner,
    enrolment_request,
    load_slice,
)
from device_agent.store import PoolStore
from proto.decentsim.v1 import device_pb2 as pb
from transport.flower.stub import TunnelStub
from transport.flower.tunnel import ENROL, RECORD, TunnelMessage
from transport.grpc.client import AwaitingReply, RetryPolicy

log = logging.getLogger(__name__)

#: the steps the ClientApp answers (``query.<step>``)
MESSAGE_TYPES = (ENROL, *STEPS, FINISHED)


@dataclass
class _Node:
    config: AgentConfig
    store: PoolStore
    stub: TunnelStub
    runner: PoolRunner | None = None


#: pools this worker process has served, by state dir (a cache: the store is the truth)
_NODES: dict[Path, _Node] = {}


def node_settings(defaults: dict[str, str], node_config: dict[str, Any]) -> dict[str, str]:
    """The node's settings: ``node_config`` over ``defaults``, placeholders filled."""
    merged = {**defaults, **{k: str(v) for k, v in node_config.items()}}
    merged.setdefault("slice", "{partition-id}/{num-partitions}")
    fill = {k: merged[k] for k in ("partition-id", "num-partitions") if k in merged}
    out = {}
    for key, value in merged.items():
        for name, sub in fill.items():
            value = value.replace("{" + name + "}", sub)
        out[key] = value
    for key in ("state-dir", "population"):
        if key not in out:
            raise AgentError(f"node config: {key!r} is not set")
    return out


def _node(settings: dict[str, str]) -> _Node:
    state_dir = Path(settings["state-dir"])
    node = _NODES.get(state_dir)
    if node is None:
        secret_path = settings.get("world-secret")
        config = AgentConfig(
            coordinator="flower",
            state_dir=state_dir,
            ca_pem=Path(),
            population=settings["population"],
            population_seed=int(settings.get("population-seed", "0")),
            slice=parse_slice(settings["slice"]),
            world_secret=Path(secret_path).read_bytes() if secret_path else None,
            # a refusal is final; a missing answer is not an error but the next message's
            policy=RetryPolicy(attempts=1, timeout_s=60.0),
        )
        node = _NODES[state_dir] = _Node(config, PoolStore(state_dir), TunnelStub())
    return node


def handle(step: str, fields: Any, settings: dict[str, str]) -> dict[str, Any]:
    """One message of ``step`` for the node with ``settings``; returns the reply's fields."""
    node = _node(settings)
    message = TunnelMessage.from_fields(fields)
    node.stub.load(message)
    if step == FINISHED:
        return node.stub.reply(True).to_fields()
    try:
        if step == ENROL:
            done = _enrol(node, message.token)
        else:
            done = _follow(node, pb.RoundSchedule.FromString(message.schedule))
    except AwaitingReply:
        done = False
    return node.stub.reply(done).to_fields()


def _enrol(node: _Node, token: str) -> bool:
    if node.store.enrolment() is not None:
        return True
    _, ids = load_slice(node.config)
    key_pem, request = node.store.pending_enrolment(
        lambda: enrolment_request(token, units_of(ids.numel()))
    )
    reply = node.stub.Enrol(request)
    node.store.save_enrolment(key_pem, reply)
    return True


def _follow(node: _Node, sched: pb.RoundSchedule) -> bool:
    if node.runner is None:
        population, ids = load_slice(node.config)
        node.runner = PoolRunner(node.config, node.store, node.stub, population, ids)
    return node.runner.follow(sched)


#: ``handler(step, fields, settings) -> reply fields``: what a node does with a message
Handler = Callable[[str, Any, dict[str, str]], dict[str, Any]]


def make_client_app(defaults: dict[str, str] | None = None, handler: Handler | None = None) -> Any:
    """The ``ClientApp`` of a device pool.

    Args:
        defaults: node settings under each node's ``node_config`` (a simulation's).
        handler: what a node does with a message (default :func:`handle`; tests wrap it to
            make a node fail).
    """
    from transport.flower.env import import_flwr

    import_flwr()
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    base = dict(defaults or {})
    run = handler or handle

    def register(step: str) -> None:
        @app.query(step)
        def _query(msg: Message, context: Context) -> Message:
            settings = node_settings(base, dict(context.node_config))
            fields = run(step, msg.content[RECORD], settings)
            return Message(RecordDict({RECORD: ConfigRecord(fields)}), reply_to=msg)

    for step in MESSAGE_TYPES:
        register(step)
    return app
