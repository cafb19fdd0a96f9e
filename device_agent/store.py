"""A device pool's private store: SQLite (WAL, ``0600``) that never leaves the device.

It keeps everything that must survive a crash: the pool's credential and participant ids, the
run's deployments (with the secret pseudonym-slot key), its secret (from which every
participant derives the randomness of its requests, so a restarted agent resends
byte-identical requests: the servers see replays, never conflicts), the start-of-day state of
every day (the agent resumes or re-runs a day from it), its devices' contact log of the last
:data:`TRACE_RETENTION_DAYS` days (heard RPIs and weights), and its own daily observation
totals (a local diagnostic).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from proto.decentsim.v1 import device_pb2 as pb
from protocols.ble.scoring import Trace
from sim.model import State
from storage.sqlite import open_db, transaction

_MIGRATIONS = (
    """
    CREATE TABLE credential (id INTEGER PRIMARY KEY CHECK (id = 1), key_pem BLOB NOT NULL,
                             enrolment BLOB NOT NULL, secret BLOB NOT NULL);
    CREATE TABLE states (epoch INTEGER NOT NULL, day INTEGER NOT NULL, state BLOB NOT NULL,
                         PRIMARY KEY (epoch, day));
    CREATE TABLE observed (epoch INTEGER NOT NULL, day INTEGER NOT NULL, round_id INTEGER NOT NULL,
                           y BLOB NOT NULL, PRIMARY KEY (epoch, day));
    CREATE TABLE traces (epoch INTEGER NOT NULL, day INTEGER NOT NULL, entries INTEGER NOT NULL,
                         observer BLOB NOT NULL, rpi BLOB NOT NULL, weight BLOB NOT NULL,
                         PRIMARY KEY (epoch, day));
    """,
    # an Enrol request in flight over a transport that answers later (Flower): kept so the
    # redone request is byte-identical (a new key would make it a different request)
    """
    CREATE TABLE pending_enrolment (id INTEGER PRIMARY KEY CHECK (id = 1),
                                    key_pem BLOB NOT NULL, request BLOB NOT NULL);
    """,
)
#: Days of contact log a device keeps (Exposure Notification keeps 14).
TRACE_RETENTION_DAYS = 14


def state_to_bytes(state: State) -> bytes:
    """Serialize a pool's state (its devices' private state: stays in the pool's store)."""
    buf = io.BytesIO()
    torch.save({f.name: getattr(state, f.name) for f in fields(state)}, buf)
    return buf.getvalue()


def state_from_bytes(raw: bytes) -> State:
    """Inverse of :func:`state_to_bytes` (tensors only: ``weights_only``)."""
    return State(**torch.load(io.BytesIO(raw), weights_only=True))


class PoolStore:
    """The pool's private SQLite store (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = open_db(state_dir / "pool.sqlite3", migrations=_MIGRATIONS)

    def enrolment(self) -> tuple[bytes, pb.EnrolResponse, bytes] | None:
        """(private key PEM, Enrol reply, pool secret), once enrolled."""
        row = self.db.execute("SELECT key_pem, enrolment, secret FROM credential").fetchone()
        if row is None:
            return None
        return bytes(row[0]), pb.EnrolResponse.FromString(bytes(row[1])), bytes(row[2])

    def save_enrolment(self, key_pem: bytes, reply: pb.EnrolResponse) -> None:
        """Keep the credential and a fresh pool secret (atomically, before first use)."""
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO credential VALUES (1, ?, ?, ?)",
                (key_pem, reply.SerializeToString(), os.urandom(32)),
            )
            conn.execute("DELETE FROM pending_enrolment")

    def pending_enrolment(
        self, make: Callable[[], tuple[bytes, pb.EnrolRequest]]
    ) -> tuple[bytes, pb.EnrolRequest]:
        """The Enrol request in flight (key PEM, request), made by ``make`` and kept first."""
        row = self.db.execute("SELECT key_pem, request FROM pending_enrolment").fetchone()
        if row is not None:
            return bytes(row[0]), pb.EnrolRequest.FromString(bytes(row[1]))
        key_pem, request = make()
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO pending_enrolment VALUES (1, ?, ?)",
                (key_pem, request.SerializeToString()),
            )
        return key_pem, request

    def state(self, epoch: int, day: int) -> State | None:
        """The stored start-of-day state, if any."""
        row = self.db.execute(
            "SELECT state FROM states WHERE epoch = ? AND day = ?", (epoch, day)
        ).fetchone()
        return None if row is None else state_from_bytes(bytes(row[0]))

    def latest_state_day(self, epoch: int, before: int) -> int | None:
        """The newest day before ``before`` whose start-of-day state is stored, if any."""
        (row,) = self.db.execute(
            "SELECT MAX(day) FROM states WHERE epoch = ? AND day < ?", (epoch, before)
        ).fetchall()
        return None if row[0] is None else int(row[0])

    def save_state(self, epoch: int, day: int, state: State) -> None:
        """Keep the start-of-day state of (epoch, day)."""
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO states VALUES (?, ?, ?)",
                (epoch, day, state_to_bytes(state)),
            )

    def save_observed(self, epoch: int, day: int, round_id: int, y: torch.Tensor) -> None:
        """Keep the pool's own observation total of a day (a local diagnostic)."""
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO observed VALUES (?, ?, ?, ?)",
                (epoch, day, round_id, y.numpy().astype("<f8").tobytes()),
            )

    def save_trace(self, epoch: int, day: int, trace: Trace) -> None:
        """Keep the day's contact log (who heard which RPI, with what weight); days older
        than :data:`TRACE_RETENTION_DAYS` are deleted."""
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO traces VALUES (?, ?, ?, ?, ?, ?)",
                (
                    epoch,
                    day,
                    len(trace.observer),
                    trace.observer.astype("<i8").tobytes(),
                    np.ascontiguousarray(trace.rpi).tobytes(),
                    trace.weight.astype("<f8").tobytes(),
                ),
            )
            conn.execute(
                "DELETE FROM traces WHERE epoch < ? OR (epoch = ? AND day <= ?)",
                (epoch, epoch, day - TRACE_RETENTION_DAYS),
            )

    def trace_days(self) -> list[tuple[int, int, int]]:
        """(epoch, day, entries) of the contact log kept."""
        return [
            (int(e), int(d), int(n))
            for e, d, n in self.db.execute(
                "SELECT epoch, day, entries FROM traces ORDER BY epoch, day"
            ).fetchall()
        ]

    def last_round(self) -> int:
        """The newest round whose observations the pool posted (0: none yet)."""
        (row,) = self.db.execute("SELECT COALESCE(MAX(round_id), 0) FROM observed").fetchall()
        return int(row[0])

    def observed(self, epoch: int) -> dict[int, np.ndarray]:
        """The pool's own observation totals of an epoch, by day."""
        rows = self.db.execute(
            "SELECT day, y FROM observed WHERE epoch = ? ORDER BY day", (epoch,)
        ).fetchall()
        return {d: np.frombuffer(y, "<f8") for d, y in rows}
