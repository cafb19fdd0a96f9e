"""Tests for the SQLite (WAL) store helper: pragmas, migrations, transactions, kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from storage.sqlite import (
    MigrationError,
    StoreError,
    migrate,
    open_db,
    schema_version,
    split_sql,
    transaction,
)

ROOT = Path(__file__).resolve().parents[2]

V1 = "CREATE TABLE a (x INTEGER NOT NULL); CREATE INDEX a_x ON a (x);"
V2 = "ALTER TABLE a ADD COLUMN y TEXT; CREATE TABLE b (z INTEGER);"


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


@pytest.mark.parametrize(("sync", "level"), [("FULL", 2), ("NORMAL", 1)])
def test_open_sets_pragmas_and_private_mode(tmp_path: Path, sync: str, level: int) -> None:
    conn = open_db(tmp_path / "db.sqlite3", migrations=[V1], synchronous=sync)  # type: ignore[arg-type]
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == level
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
        assert conn.isolation_level is None
        assert schema_version(conn) == 1
        assert _tables(conn) == {"a"}
        with transaction(conn):
            conn.execute("INSERT INTO a (x) VALUES (1)")
        for suffix in ("", "-wal", "-shm"):
            path = tmp_path / f"db.sqlite3{suffix}"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, suffix
    finally:
        conn.close()


def test_bad_open_arguments(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="parent directory does not exist"):
        open_db(tmp_path / "missing" / "db.sqlite3")
    with pytest.raises(StoreError, match="synchronous must be 'FULL' or 'NORMAL', got 'OFF'"):
        open_db(tmp_path / "db.sqlite3", synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="busy_timeout_s must be >= 0"):
        open_db(tmp_path / "db.sqlite3", busy_timeout_s=-1)


def test_migrations_apply_incrementally(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    conn = open_db(path, migrations=[V1])
    with transaction(conn):
        conn.execute("INSERT INTO a (x) VALUES (7)")
    conn.close()
    # Re-running V1 would fail ("table a already exists"): only V2 may run now.
    conn = open_db(path, migrations=[V1, V2])
    try:
        assert schema_version(conn) == 2
        assert _tables(conn) == {"a", "b"}
        assert conn.execute("SELECT x, y FROM a").fetchall() == [(7, None)]
        assert migrate(conn, [V1, V2]) == 2
    finally:
        conn.close()


def test_failing_migration_rolls_back_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    bad = "CREATE TABLE c (x); CREATE TABLE a (x);"  # second statement fails: a exists
    with pytest.raises(MigrationError, match="migration 1 -> 2 failed: table a already exists"):
        open_db(path, migrations=[V1, bad])
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"a"}  # c was rolled back with the failed migration
    finally:
        conn.close()


def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    open_db(path, migrations=[V1, V2]).close()
    with pytest.raises(MigrationError, match="schema version 2 is newer than this code supports"):
        open_db(path, migrations=[V1])


def _open_at_once(path: Path, openers: int) -> tuple[list[Exception], list[int]]:
    """``openers`` threads open the new database ``path`` at the same instant."""
    barrier = threading.Barrier(openers)
    errors: list[Exception] = []
    versions: list[int] = []

    def opener() -> None:
        barrier.wait()
        try:
            conn = open_db(path, migrations=[V1, V2])
        except (StoreError, sqlite3.Error) as exc:
            errors.append(exc)
            return
        versions.append(schema_version(conn))
        conn.close()

    threads = [threading.Thread(target=opener) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors, versions


def test_concurrent_openers_migrate_once(tmp_path: Path) -> None:
    """Eight threads open a new database at once, many times over: each gets it at the latest
    version and none fails (switching to WAL can deadlock two openers, and SQLite then answers
    one at once with "database is locked", without its busy timeout: open_db retries it)."""
    for attempt in range(150):
        errors, versions = _open_at_once(tmp_path / f"db{attempt}.sqlite3", 8)
        assert errors == [], f"attempt {attempt}"
        assert versions == [2] * 8


def test_split_sql_respects_strings_and_triggers() -> None:
    script = """
        CREATE TABLE t (s TEXT);
        INSERT INTO t VALUES ('a;b');
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN
            INSERT INTO t VALUES ('x'); INSERT INTO t VALUES ('y');
        END;
    """
    statements = split_sql(script)
    assert len(statements) == 3
    assert statements[1] == "INSERT INTO t VALUES ('a;b');"
    assert statements[2].startswith("CREATE TRIGGER") and statements[2].endswith("END;")
    with pytest.raises(MigrationError, match="incomplete SQL statement"):
        split_sql("CREATE TABLE t (s TEXT); INSERT INTO t VALUES ('unterminated")


def test_transaction_commits_and_rolls_back(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "db.sqlite3", migrations=[V1])
    try:
        with transaction(conn):
            conn.execute("INSERT INTO a (x) VALUES (1)")
        with pytest.raises(ZeroDivisionError), transaction(conn):
            conn.execute("INSERT INTO a (x) VALUES (2)")
            _ = 1 / 0
        assert not conn.in_transaction
        assert conn.execute("SELECT x FROM a").fetchall() == [(1,)]
        with pytest.raises(sqlite3.IntegrityError), transaction(conn):
            conn.execute("INSERT INTO a (x) VALUES (3)")
            conn.execute("INSERT INTO a (x) VALUES (NULL)")
        assert conn.execute("SELECT x FROM a").fetchall() == [(1,)]
        with (
            transaction(conn),
            pytest.raises(StoreError, match="cannot be nested"),
            transaction(conn),
        ):
            pass
        with (
            pytest.raises(StoreError, match="transaction mode must be"),
            transaction(conn, "SOMETIMES"),  # type: ignore[arg-type]
        ):
            pass
    finally:
        conn.close()


def test_transaction_needs_autocommit_connection(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "plain.sqlite3")
    try:
        with pytest.raises(StoreError, match="isolation_level=None"), transaction(conn):
            pass
    finally:
        conn.close()


LEDGER = (
    "CREATE TABLE entries (i INTEGER PRIMARY KEY, amount INTEGER NOT NULL);"
    "CREATE TABLE ledger (id INTEGER PRIMARY KEY CHECK (id = 1), total INTEGER NOT NULL,"
    " n INTEGER NOT NULL);"
    "INSERT INTO ledger VALUES (1, 0, 0);"
)

# A writer that keeps an invariant in every transaction: ledger total == sum of entries.
# After each commit it prints the entry count, so the parent knows what was acknowledged.
_WRITER = """
import sys
from storage.sqlite import open_db, transaction
conn = open_db(sys.argv[1], migrations=[sys.argv[3]], synchronous=sys.argv[2])
n = conn.execute("SELECT n FROM ledger").fetchone()[0]
while True:
    n += 1
    with transaction(conn):
        conn.execute("INSERT INTO entries VALUES (?, ?)", (n, n * 7 % 13 + 1))
        conn.execute("UPDATE ledger SET total = total + ?, n = n + 1", (n * 7 % 13 + 1,))
    sys.stdout.write(f"{n}\\n")
    sys.stdout.flush()
"""


def _run_writer_and_kill(path: Path, sync: str, at_least: int) -> int:
    """Start the writer, SIGKILL it once it acknowledged ``at_least`` commits; return the
    last acknowledged commit number."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), sync, LEDGER],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    acknowledged = 0
    try:
        assert child.stdout is not None
        for line in child.stdout:
            acknowledged = int(line)
            if acknowledged >= at_least:
                break
        os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read().split()
        acknowledged = int(rest[-1]) if rest else acknowledged
    finally:
        child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert acknowledged >= at_least
    return acknowledged


@pytest.mark.parametrize("sync", ["FULL", "NORMAL"])
def test_sigkill_mid_write_leaves_a_consistent_reopenable_database(
    tmp_path: Path, sync: str
) -> None:
    path = tmp_path / "db.sqlite3"
    n = 0
    # Kill, restart (resuming from the stored count), kill again: three crash cycles.
    for _ in range(3):
        acknowledged = _run_writer_and_kill(path, sync, at_least=n + 100)
        # Reopen the way a restarted process would (WAL recovery happens here).
        conn = open_db(path, migrations=[LEDGER])
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            total, n = conn.execute("SELECT total, n FROM ledger").fetchone()
            count, amount, last = conn.execute(
                "SELECT count(*), coalesce(sum(amount), 0), max(i) FROM entries"
            ).fetchone()
            assert (count, amount, last) == (n, total, n)  # no torn transaction
            assert acknowledged <= n <= acknowledged + 1  # acknowledged commits all survived
        finally:
            conn.close()
    conn = open_db(path, migrations=[LEDGER])
    try:
        with transaction(conn):
            conn.execute("INSERT INTO entries VALUES (?, 1)", (n + 1,))
            conn.execute("UPDATE ledger SET total = total + 1, n = n + 1")
        assert conn.execute("SELECT n FROM ledger").fetchone()[0] == n + 1
    finally:
        conn.close()
