"""The one writer of secret files: 0600 from the first byte, atomic, never written through a
planted file or link; key files refuse to load when others may read them or they are corrupt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from identity.secret_files import (
    SecretFileError,
    load_or_create_keys,
    read_public_keys,
    write_secret,
)


def test_a_secret_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret(tmp_path / "s", b"secret")
    finally:
        os.umask(old)
    assert (tmp_path / "s").read_bytes() == b"secret"
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary left behind


def test_a_planted_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    (tmp_path / "s").symlink_to(elsewhere)
    write_secret(tmp_path / "s", b"secret")
    assert not (tmp_path / "s").is_symlink() and (tmp_path / "s").read_bytes() == b"secret"
    assert elsewhere.read_bytes() == b"untouched"


def test_key_files_are_created_once_and_refused_when_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = load_or_create_keys(path, ("a", "b"))
    assert load_or_create_keys(path, ("a", "b")) == keys and all(
        len(k) == 32 for k in keys.values()
    )
    path.chmod(0o640)
    with pytest.raises(SecretFileError, match="readable by group/others"):
        load_or_create_keys(path, ("a",))
    path.chmod(0o600)
    with pytest.raises(SecretFileError, match=r"corrupt key file \(KeyError"):
        load_or_create_keys(path, ("c",))
    write_secret(path, json.dumps({"a": "00" * 16}).encode())
    with pytest.raises(SecretFileError, match="every key must be 32 bytes"):
        load_or_create_keys(path, ("a",))


def test_public_key_files_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="aggregator public keys not found"):
        read_public_keys(tmp_path / "nope.json", ("x",), "aggregator")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": "ab"}))
    with pytest.raises(SecretFileError, match=r"public key\(s\) \['x'\] are not 32 bytes"):
        read_public_keys(bad, ("x",), "aggregator")
