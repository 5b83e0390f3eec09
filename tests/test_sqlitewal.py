"""The shared SQLite helpers: the WAL switch waits out a lock; transactions; disk errors."""

from __future__ import annotations

import errno
import sqlite3
import threading
from pathlib import Path

import pytest

from broker.sqlitewal import checkpoint, disk_error, enable_wal, immediate, self_contained


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


def test_immediate_commits_a_block_and_rolls_back_a_failed_one(tmp_path: Path) -> None:
    """A block that ends is committed; one that raises leaves nothing behind."""
    conn = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE t (x INTEGER)")
    with immediate(conn):
        conn.execute("INSERT INTO t VALUES (1)")

    def failing() -> None:
        with immediate(conn):
            conn.execute("INSERT INTO t VALUES (2)")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing()
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    assert not conn.in_transaction
    conn.close()


def test_disk_errors_become_os_errors(tmp_path: Path) -> None:
    """SQLITE_FULL is ENOSPC, SQLITE_IOERR is EIO, anything else stays a SQLite error."""
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    ioerr = sqlite3.OperationalError("disk I/O error")
    ioerr.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY
    path = tmp_path / "t.sqlite3"
    assert [getattr(disk_error(path, e), "errno", None) for e in (full, ioerr, busy)] == [
        errno.ENOSPC,
        errno.EIO,
        None,
    ]


def test_an_io_error_on_a_full_disk_is_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite I/O error (SQLITE_IOERR_SHMSIZE: a new reader's -shm could not grow) on a
    file system with no room left is ENOSPC, not EIO: it was reported as a failing disk
    (state) or a damaged file to delete (cache), never "free space"."""
    import os

    import broker.sqlitewal as sqlitewal

    shm = sqlite3.OperationalError("disk I/O error")
    shm.sqlite_errorcode = sqlite3.SQLITE_IOERR_SHMSIZE
    path = tmp_path / "t.sqlite3"
    real = os.statvfs(tmp_path)

    class Full:
        f_bfree = 10_000  # root's reserve, which a container's root may not write
        f_bavail = 3
        f_frsize = real.f_frsize

    monkeypatch.setattr(sqlitewal.os, "statvfs", lambda _: Full())
    failed = disk_error(path, shm)
    assert failed is not None
    assert failed.errno == errno.ENOSPC
    assert "disk full" in str(failed)


def _sqlite_error(code: int, text: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(text)
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    return exc


def test_a_file_sqlite_cannot_open_for_want_of_descriptors_is_told_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "unable to open database file" with the process out of open files is EMFILE (told
    as the open-file limit, exit 74), not a damaged ledger to move away (65)."""
    import broker.sqlitewal as sqlitewal

    def no_descriptors(path: str) -> list[str]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(sqlitewal.os, "listdir", no_descriptors)
    path = tmp_path / "x.ledger"
    failure = disk_error(path, _sqlite_error(sqlite3.SQLITE_CANTOPEN, "unable to open"))
    assert failure is not None
    assert failure.errno == errno.EMFILE


@pytest.mark.parametrize(("open_files", "out"), [(1020, True), (1019, False)])
def test_a_process_within_a_wal_file_s_descriptors_of_its_limit_is_out_of_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_files: int, out: bool
) -> None:
    """Failing to open a file with fewer free descriptors than a WAL file takes (the file,
    -wal, -shm, and one for looking) is the open-file limit; with one more free, it is not
    (the listing's own descriptor is not counted)."""
    import resource

    import broker.sqlitewal as sqlitewal

    monkeypatch.setattr(sqlitewal.os, "listdir", lambda path: ["fd"] * (open_files + 1))
    real = resource.getrlimit
    monkeypatch.setattr(
        resource,
        "getrlimit",
        lambda which: (1024, 4096) if which == resource.RLIMIT_NOFILE else real(which),
    )
    failure = disk_error(
        tmp_path / "x.ledger", _sqlite_error(sqlite3.SQLITE_CANTOPEN, "unable to open")
    )
    assert (failure is not None and failure.errno == errno.EMFILE) is out


def test_a_write_past_the_file_size_limit_is_told_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite file at the process's file size limit (ulimit -f) fails its writes with
    SQLITE_IOERR: told as that limit (EFBIG), not as a failing disk; a file far below it,
    or no limit, still reads as an I/O error."""
    import resource

    path = tmp_path / "x.ledger"
    path.write_bytes(b"\0" * 100_000)
    real = resource.getrlimit

    def capped(which: int) -> tuple[int, int]:
        if which == resource.RLIMIT_FSIZE:
            return (120_000, resource.RLIM_INFINITY)
        return real(which)

    monkeypatch.setattr(resource, "getrlimit", capped)
    failure = disk_error(path, _sqlite_error(sqlite3.SQLITE_IOERR, "disk I/O error"))
    assert failure is not None
    assert failure.errno == errno.EFBIG
    assert "ulimit -f" in str(failure)
    monkeypatch.undo()
    failure = disk_error(path, _sqlite_error(sqlite3.SQLITE_IOERR, "disk I/O error"))
    assert failure is not None
    assert failure.errno == errno.EIO


def test_a_checkpoint_a_reader_holds_back_is_an_error_and_one_done_empties_the_log(
    tmp_path: Path,
) -> None:
    """checkpoint() raises EBUSY naming the file while a reader on an older snapshot keeps
    pages in the -wal (the file alone is not the database then); once it lets go, the log
    is copied and emptied, and the file is self-contained."""
    path = tmp_path / "db.sqlite"
    writer = sqlite3.connect(path, isolation_level=None)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("PRAGMA busy_timeout = 50")
        writer.execute("CREATE TABLE t (x)")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()
        writer.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(OSError, match="another program reads it") as caught:
            checkpoint(writer, path)
        assert caught.value.errno == errno.EBUSY
        assert caught.value.filename == str(path)
        assert not self_contained(path)
        reader.execute("COMMIT")
        checkpoint(writer, path)
        assert self_contained(path)
    finally:
        reader.close()
        writer.close()
