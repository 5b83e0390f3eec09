"""Switching a SQLite file that several processes share to WAL, without a spurious failure.

SQLite does not call the busy handler for ``PRAGMA journal_mode = WAL`` in every case: when
two processes open a new file at the same moment, the loser gets ``database is locked`` at
once, whatever the busy timeout. The item cache and the key state both open files every broker
process of a machine shares, so both switch through :func:`enable_wal`, which retries for as
long as the busy timeout allows.
"""

from __future__ import annotations

import sqlite3
import time

__all__ = ["enable_wal"]

#: Pause between attempts while another process holds the lock.
_RETRY_S = 0.01


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
