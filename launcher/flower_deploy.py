"""Deployment material for a Flower deployment on this machine (``docs/flower.md``).

python -m launcher.flower_deploy tls DIR        # a CA and a SuperLink certificate
python -m launcher.flower_deploy node-key DIR   # a SuperNode's authentication key pair
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from identity.pki import LocalCA, generate_private_key
from identity.secret_files import write_secret

#: what ``tls`` writes into its directory
TLS_FILES = {"ca": "ca.pem", "cert": "superlink.pem", "key": "superlink.key"}
#: the names a loopback SuperLink's certificate covers
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


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
    write_secret(paths["key"], leaf.key_pem)
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
    write_secret(
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m launcher.flower_deploy {tls,node-key} DIR``: write deployment material."""
    parser = argparse.ArgumentParser(prog="python -m launcher.flower_deploy")
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
