"""What a server records of its own view: the event log and, for its auditor, the transcript.

``views/<role>.jsonl`` (:class:`ViewLog`): one JSON object per line, ``t`` (unix time),
``event`` and the event's fields — identifiers, sizes, timing and opened aggregates, never a
share, value or key. ``views/<role>.transcript`` (:func:`open_transcript`, only with the public
key of this server's own auditor): every protocol message in and out, each record sealed to that
auditor (:mod:`contract.transcript`); the other server's auditor cannot open it. The event
names are documented in ``docs/decentralized.md``.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from contract.transcript import TranscriptError, TranscriptWriter, load_auditor_public

#: Messages a server records only as their digest (``contract.transcript``, version 2 records),
#: because the rest of its own transcript determines them and the audit rebuilds them: the
#: coordinator's slot directory replies (its registrations, in order: 144 slots per device a
#: day, sent to every pool, often in pages) and its relays to the aggregator of a device's
#: registration or fetch (field copies of the request it recorded).
ELIDED: dict[str, frozenset[str]] = {
    "coordinator": frozenset({"DirectoryResponse", "RelayRegister", "RelayFetch"}),
    "aggregator": frozenset(),
}


class Observed(Protocol):
    """A secure-sum server whose messages can be observed (``server.observer``)."""

    observer: Any


class ViewLog:
    """A server's recorded view: one JSON object per line, events and sizes only."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        """Append one event (``t`` = unix time)."""
        line = json.dumps({"t": round(time.time(), 3), "event": event, **fields})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._file.close()


def open_transcript(
    audit_key: Path | None, state_dir: Path, role: str, servers: Mapping[str, Observed]
) -> TranscriptWriter | None:
    """With the public key of ``role``'s own auditor: ``views/<role>.transcript``, recording
    every message of ``servers`` (by deployment name), each record sealed to that auditor.
    Without: ``None``. Each server must get a different auditor's key: one key opening both
    transcripts would hold what the coordinator and the aggregator hold together.

    Raises:
        TranscriptError: the key file is unusable, or the transcript belongs to another key.
    """
    if audit_key is None:
        return None
    try:
        writer = TranscriptWriter(
            state_dir / "views" / f"{role}.transcript",
            role,
            load_auditor_public(audit_key),
            ELIDED.get(role, frozenset()),
        )
    except TranscriptError as e:
        raise TranscriptError(f"--audit-key: {e}") from None
    for name, server in servers.items():
        server.observer = functools.partial(_record, writer, name)
    return writer


def _record(
    writer: TranscriptWriter, deployment: str, direction: str, peer: str, raw: bytes
) -> None:
    writer.record(direction, deployment, peer, raw)
