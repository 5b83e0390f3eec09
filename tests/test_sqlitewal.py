"""Switching a shared SQLite file to WAL waits out another process's lock."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from broker.sqlitewal import enable_wal


def _locked(path: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_waits_for_the_lock_then_switches(tmp_path: Path) -> None:
    """A lock held for a moment delays the switch instead of failing it."""
    path = tmp_path / "shared.sqlite3"
    holder = _locked(path)
    threading.Timer(0.2, lambda: holder.execute("COMMIT")).start()
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.01)
    try:
        enable_wal(conn, timeout_s=5.0)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
        holder.close()


def test_gives_up_after_the_timeout(tmp_path: Path) -> None:
    """A lock held longer than the timeout raises 'database is locked'."""
    path = tmp_path / "shared.sqlite3"
    holder = _locked(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.01)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            enable_wal(conn, timeout_s=0.1)
    finally:
        conn.close()
        holder.execute("COMMIT")
        holder.close()
