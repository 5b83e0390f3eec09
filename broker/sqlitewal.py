"""Switching a SQLite file that several processes share to WAL, without a spurious failure.

SQLite does not call the busy handler for ``PRAGMA journal_mode = WAL`` in every case: when
two processes open a new file at the same moment, the loser gets ``database is locked`` at
once, whatever the busy timeout. The item cache and the key state both open files every broker
process of a machine shares, so both switch through :func:`enable_wal`, which retries for as
long as the busy timeout allows.

Every such file also writes in short ``BEGIN IMMEDIATE`` transactions (:func:`immediate`:
the write lock is taken up front, so a transaction never fails half-way on a lock upgrade),
and reports a full or failing disk as the ``OSError`` it is (:func:`disk_error`).
"""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["disk_error", "enable_wal", "immediate", "journal_files"]

#: Pause between attempts while another process holds the lock.
_RETRY_S = 0.01


def journal_files(path: Path) -> tuple[Path, Path]:
    """The write-ahead log and shared-memory index SQLite keeps beside a WAL database."""
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def enable_wal(conn: sqlite3.Connection, *, timeout_s: float) -> None:
    """Put ``conn``'s file in WAL mode, retrying "database is locked" for ``timeout_s``.

    Raises:
        sqlite3.OperationalError: still locked after ``timeout_s``, or any other error.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_S)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: committed if the block ends, else rolled back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # SQLite rolls back by itself after some errors (a full disk among them).
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def disk_error(path: Path, exc: sqlite3.Error) -> OSError | None:
    """The ``OSError`` a SQLite disk error means (full -> ENOSPC, I/O -> EIO, read-only ->
    EROFS), else None.

    Raised instead of the ``sqlite3`` error, so a full disk under a SQLite file is reported
    like one under any other output (exit 74), not as an internal error.
    """
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if primary == sqlite3.SQLITE_FULL:
        return OSError(errno.ENOSPC, f"{path}: disk full ({exc})")
    if primary == sqlite3.SQLITE_IOERR:
        return OSError(errno.EIO, f"{path}: I/O error ({exc})")
    if primary == sqlite3.SQLITE_READONLY:
        # A read-only file or file system: waiting never makes it writable.
        return OSError(errno.EROFS, f"{path}: read-only ({exc})")
    return None
