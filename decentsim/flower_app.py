"""The Flower App of a deployment: ``flwr run deploy/flower`` against a ``flower-superlink``
that ``flower-supernode`` processes (device pools) connect to.

``server_app`` hosts the coordinator (``coordinator.flower_server``) and is configured by the
run config (``[tool.flwr.app.config]`` of ``deploy/flower/pyproject.toml``, overridden with
``flwr run --run-config``):

    state-dir          the coordinator's state dir (``decentsim coordinator init``), absolute
    aggregator         ``HOST:PORT`` of the aggregator's mutual-TLS link
    aggregator-export  the aggregator's export dir (its CA and public keys), absolute
    run-json           a RunSpec JSON file, absolute; empty: resume the run stored in state-dir
    node-wait-s        seconds to wait for the run's ``pools`` SuperNodes to connect

``client_app`` is a device pool; each SuperNode configures its pool with ``--node-config``
(``state-dir``, ``population``, ``population-seed``, ``slice``, ``world-secret``: see
``device_agent.flower_client``).

Both are loaded by Flower's own processes (``flwr-serverapp``, ``flwr-clientapp``), which
must run in an environment where ``decentsim`` is installed, with ``quiet_flower_env()``'s
variables (telemetry and update checks off).

``python -m decentsim.flower_app tls DIR`` writes what a loopback SuperLink needs for TLS (a
CA and a server certificate for ``127.0.0.1``/``localhost``); ``python -m
decentsim.flower_app node-key DIR`` writes a SuperNode's authentication key pair.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from coordinator.flower_server import FlowerServerConfig, serve_flower
from coordinator.pki import LocalCA, generate_private_key
from coordinator.runspec import RunSpec
from decentsim.flower_env import import_flwr
from device_agent.flower_client import make_client_app

import_flwr()
from flwr.app import Context, Message  # noqa: E402 — after import_flwr() turned telemetry off
from flwr.serverapp import Grid, ServerApp  # noqa: E402

#: run-config keys the ServerApp reads
RUN_CONFIG_KEYS = ("state-dir", "aggregator", "aggregator-export", "run-json", "node-wait-s")
#: what ``tls`` writes into its directory
TLS_FILES = {"ca": "ca.pem", "cert": "superlink.pem", "key": "superlink.key"}
#: the names a loopback SuperLink's certificate covers
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
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


#: a device pool; every setting comes from its SuperNode's ``--node-config``
client_app = make_client_app()


# -- deployment material ----------------------------------------------------------------------
def write_loopback_tls(directory: Path, names: Sequence[str] = LOOPBACK_NAMES) -> dict[str, Path]:
    """A CA and a SuperLink server certificate for ``names`` in ``directory``.

    Returns the paths by :data:`TLS_FILES` key: ``ca`` (every SuperNode's and the CLI's
    ``root-certificates``), ``cert`` and ``key`` (the SuperLink's ``--ssl-certfile`` and
    ``--ssl-keyfile``; ``--ssl-ca-certfile`` is ``ca``). The CA's key stays in
    ``directory/ca`` (0600) to issue more certificates.
    """
    ca = LocalCA.load_or_create(directory / "ca", name="decentsim Flower SuperLink CA")
    leaf = ca.issue_server_certificate(list(names), common_name="flower-superlink")
    paths = {k: directory / name for k, name in TLS_FILES.items()}
    paths["ca"].write_bytes(ca.cert_pem)
    paths["cert"].write_bytes(leaf.cert_pem)
    _write_private(paths["key"], leaf.key_pem)
    return paths


def write_node_key(directory: Path, name: str = "supernode") -> tuple[Path, Path]:
    """A SuperNode authentication key pair (ECDSA P-256, OpenSSH format) in ``directory``.

    Returns ``(private, public)``: ``flower-supernode --auth-supernode-private-key PRIVATE``;
    ``flwr supernode register PUBLIC`` on a SuperLink started with ``--enable-supernode-auth``.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generate_private_key()
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m decentsim.flower_app {tls,node-key} DIR``: write deployment material."""
    parser = argparse.ArgumentParser(prog="python -m decentsim.flower_app")
    sub = parser.add_subparsers(dest="what", required=True)
    tls = sub.add_parser("tls", help="a CA and a SuperLink certificate for loopback")
    tls.add_argument("dir", type=Path)
    tls.add_argument(
        "--name", action="append", help="a DNS name or IP the certificate covers (repeatable)"
    )
    node = sub.add_parser("node-key", help="a SuperNode authentication key pair")
    node.add_argument("dir", type=Path)
    node.add_argument("--name", default="supernode", help="file stem (NAME.key, NAME.pub)")
    args = parser.parse_args(argv)
    if args.what == "tls":
        paths = write_loopback_tls(args.dir, args.name or LOOPBACK_NAMES)
        print(" ".join(f"{k}={p}" for k, p in paths.items()))
    else:
        private, public = write_node_key(args.dir, args.name)
        print(f"private={private} public={public}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
