"""Secret files: the one writer every part uses, and the key files built on it.

:func:`write_secret` is the only way decentsim writes a secret (private keys, CA keys, key
files, enrolment tokens, the simulated world's beacon secret, the auditors' keys): mode ``0600``
from the first byte (``O_EXCL`` on a fresh temporary name, so an attacker's pre-created file or
symlink is never written through), ``fsync`` of the data, an atomic ``rename`` over the target,
and an ``fsync`` of the directory so the rename itself survives a power loss. A crash leaves
the old file or the new one, never a torn or world-readable one.

Key files (``keys.json``, ``noise.json``) hold named 32-byte secrets from the OS CSPRNG,
created on first use and refused when group/other-readable or malformed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

#: a server's DP noise secret, in its state dir
NOISE_FILE = "noise.json"
#: bytes of every named secret in a key file
KEY_BYTES = 32


class SecretFileError(Exception):
    """A secret or key file is missing, corrupt or readable by others; names the file."""


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, readable by its owner only; atomic and durable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # persist the rename itself: fsync the directory entry
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_private(path: Path) -> None:
    """Refuse a secret file that group or others may read."""
    if path.stat().st_mode & 0o077:
        raise SecretFileError(f"{path}: secret file is readable by group/others; chmod 600 it")


def load_or_create_keys(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """32-byte secrets by name, created from the OS CSPRNG on first use and kept in ``path``.

    Raises:
        SecretFileError: the file is readable by others, corrupt, or lacks a name.
    """
    if path.exists():
        check_private(path)
        try:
            raw = json.loads(path.read_text())
            keys = {n: bytes.fromhex(raw[n]) for n in names}
        except (ValueError, KeyError, TypeError) as e:
            raise SecretFileError(f"{path}: corrupt key file ({type(e).__name__}: {e})") from None
        if any(len(k) != KEY_BYTES for k in keys.values()):
            raise SecretFileError(f"{path}: every key must be {KEY_BYTES} bytes")
        return keys
    keys = {n: os.urandom(KEY_BYTES) for n in names}
    write_secret(path, json.dumps({n: k.hex() for n, k in keys.items()}).encode())
    return keys


def load_noise_secret(state_dir: Path) -> bytes:
    """A server's DP noise secret (``noise.json``, 0600), created on first use; it never
    leaves the state dir."""
    return load_or_create_keys(state_dir / NOISE_FILE, ("aggregate_noise",))["aggregate_noise"]


def read_public_keys(path: Path, names: tuple[str, ...], what: str) -> dict[str, bytes]:
    """A peer's exported 32-byte public keys by name (``<peer>_public.json``).

    Raises:
        SecretFileError: missing, malformed, or a key of the wrong length (named).
    """
    try:
        raw = json.loads(path.read_text())
        keys = {n: bytes.fromhex(raw[n]) for n in names}
    except FileNotFoundError:
        raise SecretFileError(f"{path}: {what} public keys not found (run its init)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SecretFileError(f"{path}: not a public-key file ({type(e).__name__}: {e})") from None
    bad = [n for n, k in keys.items() if len(k) != KEY_BYTES]
    if bad:
        raise SecretFileError(f"{path}: public key(s) {bad} are not {KEY_BYTES} bytes")
    return keys
