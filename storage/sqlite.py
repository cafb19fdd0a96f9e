"""A small SQLite (WAL) helper for the state that must survive a crash.

Every server process (coordinator, aggregator) and every device keeps its durable state in a
SQLite database opened through :func:`open_db`, which fixes the pragmas in one place:

* ``journal_mode=WAL``: readers never block the single writer, and a process killed at any
  instant (``kill -9``) leaves a database that SQLite recovers on the next open: a transaction
  is either wholly in the write-ahead log with its commit frame, or ignored.
* ``synchronous=FULL`` by default: each commit fsyncs the WAL, so a commit that returned
  survives power loss as well as a process crash. ``NORMAL`` (an option for high-rate,
  re-derivable data) is still crash-safe against a killed *process* (the WAL lives in the OS
  page cache), but may lose the last commits on power loss; security-relevant state (a token
  marked used, a revocation) must not, so it keeps ``FULL``.
* ``foreign_keys=ON`` and a ``busy_timeout`` so concurrent writers (several connections, even
  several processes) wait for the write lock instead of failing at once.

Schema migrations are numbered by ``PRAGMA user_version``: migration ``i`` takes the schema
from version ``i`` to ``i + 1`` and runs, together with the version bump, in one ``BEGIN
IMMEDIATE`` transaction, so a crash mid-migration leaves the previous version intact and two
processes opening the same new database do not both apply it.

Files on disk: the database file is created with mode ``0600`` before SQLite opens it, and
SQLite creates its ``-wal`` and ``-shm`` companions with the same mode. Nothing is logged here.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

__all__ = [
    "MigrationError",
    "StoreError",
    "migrate",
    "open_db",
    "schema_version",
    "split_sql",
    "transaction",
]

Synchronous = Literal["FULL", "NORMAL"]
TransactionMode = Literal["IMMEDIATE", "EXCLUSIVE", "DEFERRED"]


class StoreError(Exception):
    """Base class for errors raised by the SQLite store helpers."""


class MigrationError(StoreError):
    """A schema migration cannot be applied (bad SQL, or a database newer than this code)."""


def open_db(
    path: str | os.PathLike[str],
    *,
    migrations: Sequence[str] = (),
    synchronous: Synchronous = "FULL",
    busy_timeout_s: float = 10.0,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite database at ``path`` in WAL mode and migrate it.

    Args:
        path: database file; its parent directory must exist.
        migrations: SQL scripts; script ``i`` upgrades schema version ``i`` to ``i + 1``.
        synchronous: ``"FULL"`` (durable commits, the default) or ``"NORMAL"`` (see module doc).
        busy_timeout_s: how long a connection waits for another writer's lock.
        check_same_thread: passed to :func:`sqlite3.connect`; set False only when the caller
            serialises access to the connection itself (e.g. with a lock).

    Returns:
        A connection in autocommit mode (``isolation_level=None``): open transactions
        explicitly with :func:`transaction`.

    Raises:
        StoreError: the parent directory is missing, or WAL mode could not be enabled.
        MigrationError: see :func:`migrate`.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise StoreError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
    if busy_timeout_s < 0:
        raise StoreError(f"busy_timeout_s must be >= 0, got {busy_timeout_s}")
    db_path = Path(path)
    if not db_path.parent.is_dir():
        raise StoreError(f"{db_path}: parent directory does not exist")
    # Create the file ourselves so it is 0600 from its first byte (sqlite would use the umask).
    fd = os.open(db_path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    conn = sqlite3.connect(
        db_path,
        timeout=busy_timeout_s,
        isolation_level=None,
        check_same_thread=check_same_thread,
    )
    try:
        mode = _enable_wal(conn, busy_timeout_s)
        if str(mode).lower() != "wal":
            raise StoreError(f"{db_path}: could not enable WAL journal mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        migrate(conn, migrations, name=str(db_path))
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> str:
    """Switch to WAL, retrying while another opener holds the database: two connections that
    both read a new database and then need its exclusive lock to switch modes deadlock, and
    SQLite answers one of them SQLITE_BUSY at once, without waiting for the busy timeout."""
    deadline = time.monotonic() + busy_timeout_s
    pause = 0.005
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version (``PRAGMA user_version``)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def split_sql(script: str) -> list[str]:
    """Split an SQL script into complete statements (semicolons in strings/triggers kept).

    Raises:
        MigrationError: the script ends with an incomplete statement.
    """
    statements: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        # complete_statement understands quoting and CREATE TRIGGER ... END bodies.
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip(" \t\r\n;"):
        raise MigrationError(f"incomplete SQL statement at end of script: {buffer.strip()!r}")
    return statements


def migrate(conn: sqlite3.Connection, migrations: Sequence[str], *, name: str = "database") -> int:
    """Apply the migrations the database has not seen yet; return the resulting version.

    Each migration runs with its ``user_version`` bump in one ``BEGIN IMMEDIATE`` transaction;
    the version is re-read under the write lock so concurrent openers apply it exactly once.

    Raises:
        MigrationError: the database's version is newer than ``len(migrations)``, or a
            migration's SQL fails (that migration is rolled back, earlier ones stay).
    """
    target = len(migrations)
    for script in migrations:
        split_sql(script)  # fail on a malformed script before touching the database
    while True:
        with transaction(conn):
            version = schema_version(conn)
            if version > target:
                raise MigrationError(
                    f"{name}: schema version {version} is newer than this code supports "
                    f"({target}); refusing to open it"
                )
            if version == target:
                return version
            try:
                for statement in split_sql(migrations[version]):
                    conn.execute(statement)
            except sqlite3.Error as exc:
                raise MigrationError(
                    f"{name}: migration {version} -> {version + 1} failed: {exc}"
                ) from exc
            # user_version lives in the database header, so it commits atomically with the DDL.
            conn.execute(f"PRAGMA user_version={version + 1}")


@contextmanager
def transaction(
    conn: sqlite3.Connection, mode: TransactionMode = "IMMEDIATE"
) -> Iterator[sqlite3.Connection]:
    """Run the body in one transaction: commit on success, roll back on any exception.

    ``IMMEDIATE`` (the default) takes the write lock at ``BEGIN``, so a read-check-write body
    (e.g. "is this token unused? then mark it used") cannot interleave with another writer.

    Raises:
        StoreError: the connection is already inside a transaction (no silent nesting), or the
            connection is not in autocommit mode.
    """
    if mode not in ("IMMEDIATE", "EXCLUSIVE", "DEFERRED"):
        raise StoreError(f"transaction mode must be IMMEDIATE, EXCLUSIVE or DEFERRED, got {mode!r}")
    if conn.isolation_level is not None:
        raise StoreError("transaction() needs a connection opened with isolation_level=None")
    if conn.in_transaction:
        raise StoreError("transaction() cannot be nested: the connection is already in one")
    conn.execute(f"BEGIN {mode}")
    try:
        yield conn
    except BaseException:
        # Also on KeyboardInterrupt/GeneratorExit: never leave a half-done transaction open.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
