"""The coordinator as the ServerApp of a Flower deployment: ``flwr run deploy/flower`` against
a ``flower-superlink`` that ``flower-supernode`` processes (device pools) connect to.

``server_app`` hosts the coordinator (:mod:`coordinator.flower_server`) and is configured by
the run config (``[tool.flwr.app.config]`` of ``deploy/flower/pyproject.toml``, overridden
with ``flwr run --run-config``):

    state-dir          the coordinator's state dir (``decentsim coordinator init``), absolute
    aggregator         ``HOST:PORT`` of the aggregator's mutual-TLS link
    aggregator-export  the aggregator's export dir (its CA and public keys), absolute
    run-json           a RunSpec JSON file, absolute; empty: resume the run stored in state-dir
    node-wait-s        seconds to wait for the run's ``pools`` SuperNodes to connect

It is loaded by Flower's own ``flwr-serverapp`` process, which must run where ``decentsim`` is
installed, with ``transport.flower.env.quiet_flower_env()``'s variables (telemetry and update
checks off). The device pools' ClientApp is ``device_agent.flower_app:client_app``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from contract.runspec import RunSpec
from coordinator.flower_server import FlowerServerConfig, serve_flower
from transport.flower.env import import_flwr

import_flwr()
from flwr.app import Context, Message  # noqa: E402 — after import_flwr() turned telemetry off
from flwr.serverapp import Grid, ServerApp  # noqa: E402

#: run-config keys the ServerApp reads
RUN_CONFIG_KEYS = ("state-dir", "aggregator", "aggregator-export", "run-json", "node-wait-s")
#: seconds between the ServerApp's pulls for replies (Flower's own grid waits 3 s)
REPLY_POLL_S = 0.25


class FlowerAppConfigError(ValueError):
    """The Flower App's run config is incomplete or wrong (names the key)."""


def _absolute(run_config: Mapping[str, Any], key: str) -> Path:
    value = run_config.get(key)
    if not isinstance(value, str) or not value:
        raise FlowerAppConfigError(f"run config: {key!r} is not set (flwr run --run-config)")
    path = Path(value)
    if not path.is_absolute():
        # the ServerApp runs in a process Flower starts, whose working directory is not ours
        raise FlowerAppConfigError(f"run config: {key!r} must be an absolute path, got {value!r}")
    return path


def server_config(run_config: Mapping[str, Any]) -> FlowerServerConfig:
    """The :class:`FlowerServerConfig` of a Flower run config (see the module docstring).

    Raises:
        FlowerAppConfigError: a key is missing, empty, of the wrong type, or a file is
            missing; unknown keys are refused (a misspelt key must not be ignored).
        RunSpecError: ``run-json`` is not a valid RunSpec.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise FlowerAppConfigError(f"run config: unknown key(s) {unknown}")
    state_dir = _absolute(run_config, "state-dir")
    if not state_dir.is_dir():
        raise FlowerAppConfigError(
            f"run config: state-dir {state_dir} does not exist (decentsim coordinator init)"
        )
    aggregator = run_config.get("aggregator")
    if not isinstance(aggregator, str) or aggregator.rpartition(":")[0] == "":
        raise FlowerAppConfigError(
            f"run config: 'aggregator' must be HOST:PORT, got {aggregator!r}"
        )
    export = _absolute(run_config, "aggregator-export")
    spec = None
    if run_config.get("run-json"):
        path = _absolute(run_config, "run-json")
        if not path.is_file():
            raise FlowerAppConfigError(f"run config: run-json {path} is not a file")
        spec = RunSpec.from_json(path.read_text(), source=str(path))
    wait = run_config.get("node-wait-s", 120.0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or wait <= 0:
        raise FlowerAppConfigError(f"run config: 'node-wait-s' must be > 0 seconds, got {wait!r}")
    return FlowerServerConfig(state_dir, spec, aggregator, export, node_wait_s=float(wait))


class PromptGrid:
    """The part of a :class:`~flwr.serverapp.Grid` the coordinator uses, answering sooner.

    A deployment's grid pulls for replies every 3 s; each step of a round takes several
    exchanges, so this one pulls every ``poll_s`` instead (a small request to the SuperLink
    on the same host, or the coordinator's own network).
    """

    def __init__(self, grid: Grid, poll_s: float = REPLY_POLL_S) -> None:
        self.grid = grid
        self.poll_s = poll_s

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes (as the wrapped grid)."""
        return self.grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push ``messages``; return the replies that arrive within ``timeout`` seconds
        (``None``: wait for all), as ``Grid.send_and_receive`` does."""
        pending = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_s)
        return replies


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    serve_flower(PromptGrid(grid), server_config(dict(context.run_config)))
