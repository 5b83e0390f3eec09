"""SQLite files that several processes share: WAL without a spurious failure, short write
transactions, and a file deleted or mistaken for ours handled alike by every such store.

SQLite does not call the busy handler for ``PRAGMA journal_mode = WAL`` in every case: when
two processes open a new file at the same moment, the loser gets ``database is locked`` at
once, whatever the busy timeout. The item cache and the key state both open files every broker
process of a machine shares, so both switch through :func:`enable_wal`, which retries for as
long as the busy timeout allows.

Every such file also writes in short ``BEGIN IMMEDIATE`` transactions (:func:`immediate`:
the write lock is taken up front, so a transaction never fails half-way on a lock upgrade),
and reports a full or failing disk as the ``OSError`` it is (:func:`disk_error`). A file
that must be whole alone (moved into place, or left out of WAL mode) has its log copied in
explicitly (:func:`checkpoint`): SQLite's own copy at close fails silently on a full disk.

Such a file may be deleted while processes use it (the advice for a damaged one). A process
then looks at the path now and again and opens it again once the file there is another or
gone with its journal (:func:`replaced`), so every process meets in the new file instead of
each keeping its own unlinked copy; and no process makes a new file beside the deleted one's
``-wal`` and ``-shm`` (:func:`refuse_orphans`). A path naming another program's database by
mistake is refused before anything is written to it (:func:`refuse_foreign`).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from broker.errors import ConfigError

__all__ = [
    "OUR_TABLES",
    "RefusedFileError",
    "checkpoint",
    "checkpoint_unless_read",
    "disk_error",
    "enable_wal",
    "file_identity",
    "file_in_the_way",
    "held_error",
    "immediate",
    "journal_files",
    "real_path",
    "refuse_foreign",
    "refuse_orphans",
    "replaced",
    "rollback_journal",
    "self_contained",
    "state_dir",
    "still_at",
]

#: Free bytes below which a SQLite I/O error is taken for a full disk: less than the
#: 32-KiB shared-memory region a WAL file's new reader must create, with room for pages.
_NEARLY_FULL = 1 << 20
#: Pause between attempts while another process holds the lock.
_RETRY_S = 0.01


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/asin-broker`` if that is absolute, else ``~/.local/state/asin-broker``.

    Where the files every broker process of a machine shares live by default (the key
    state, the item cache): one reading of the variable, so they never part. Nothing is
    created here.

    Raises:
        ConfigError: XDG_STATE_HOME is not set and there is no home directory.
    """
    env = os.environ if environ is None else environ
    # Blanks around it (a line of an env file) are no part of the path.
    base = env.get("XDG_STATE_HOME", "").strip()
    # The XDG spec says a relative path is invalid and must be ignored.
    if base and os.path.isabs(base):
        return Path(base) / "asin-broker"
    return _home(env) / ".local" / "state" / "asin-broker"


def _home(env: Mapping[str, str]) -> Path:
    """The user's home directory: ``HOME``, else the account's entry (``/etc/passwd``).

    Without either (``env -i``, a container run as ``--user 4242``), Path.home() raised a
    RuntimeError that reached users as a traceback; an empty HOME made it ``/``, and the
    state went to ``/.local/state``. A relative HOME would move with the working directory.
    """
    home = env.get("HOME")
    if home is None:
        try:
            home = str(Path.home())
        except RuntimeError:
            home = ""
    if not os.path.isabs(home):
        raise ConfigError(
            "",
            "no home directory found (HOME is unset, empty or relative, and the user has no "
            "entry in /etc/passwd) to keep the key state and item cache in: set "
            "XDG_STATE_HOME (to an absolute path), or [state] path and [cache] path",
        )
    return Path(home)


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing folder of ``path`` when it is no directory (a file where one
    should be: nothing can be made under it), else None."""
    for folder in path.parents:
        try:
            mode = folder.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        return None if stat.S_ISDIR(mode) else folder
    return None


def real_path(path: str | os.PathLike[str]) -> Path:
    """The file ``path`` names once its symbolic links are followed (dangling or not).

    SQLite opens that file and keeps its ``-wal`` and ``-shm`` beside it, not beside a link:
    the checks of them (orphaned journals, a file replaced or deleted under a running
    process) must look there, or a link whose target was deleted hid a live journal and a
    fresh file was made beside it ("disk I/O error").
    """
    return Path(os.path.realpath(path))


def rollback_journal(path: Path) -> Path:
    """The journal SQLite keeps beside a database out of WAL mode, while it writes."""
    return path.with_name(path.name + "-journal")


def journal_files(path: Path) -> tuple[Path, Path]:
    """The write-ahead log and shared-memory index SQLite keeps beside a WAL database."""
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def file_identity(path: Path | int) -> tuple[int, int]:
    """The (device, inode) of the file at ``path`` now, or of the file open as ``path``
    (a file descriptor).

    Raises:
        OSError: there is none (FileNotFoundError), or it cannot be looked at.
    """
    info = os.stat(path)
    return info.st_dev, info.st_ino


def still_at(path: Path, identity: tuple[int, int]) -> bool:
    """True while the file of ``identity`` is the one at ``path`` (not moved, deleted or
    replaced since it was opened)."""
    try:
        return file_identity(path) == identity
    except FileNotFoundError:
        return False


def replaced(path: Path, identity: tuple[int, int]) -> bool:
    """True when the file of ``identity`` is no longer at ``path``: another file is there
    (made again by another process), or none is and neither are its ``-wal`` and ``-shm``
    (all three deleted: opening the path makes the file afresh, where the others meet).

    The file deleted alone is not: its ``-wal`` and ``-shm`` are still the open database's,
    and a new file beside them would be read with them, with which SQLite then fails every
    process. Its processes stay on it until the other two go too.
    """
    try:
        return file_identity(path) != identity
    except FileNotFoundError:
        return not any(journal.exists() for journal in journal_files(path))


def refuse_orphans(path: Path, what: str) -> None:
    """Raise when ``path`` is gone but its ``-wal`` or ``-shm`` is not (``what``: what the
    file holds, for the message).

    They are a deleted database's, still in use by any process that has it open: a new
    file beside them would be read with them, and SQLite would then fail every process on
    it with an I/O error. Removing them here could race with another process creating the
    new file, so the operator removes them (then the running processes move to the new
    file, as when all three are deleted).

    Raises:
        RefusedFileError: naming the files to delete.
    """
    left = [str(journal) for journal in journal_files(path) if journal.exists()]
    # Looked at again after them: another process may have made the file (and its -wal)
    # since this one found none, which is a first start, not a deleted file.
    if left and not path.exists():
        raise RefusedFileError(
            f"{path} was deleted without its {' and '.join(left)}, which belong to the "
            f"deleted file (processes still running may use it; SQLite leaves them behind "
            f"even when the last one stops): delete them to start {what} afresh (running "
            "processes then move to the new file)",
        )


class RefusedFileError(OSError):
    """A file refused as it stands at its path (another program's database, a deleted
    database's journal left beside it): its message says what to do, and it is never to be
    deleted on any generic advice of ours."""


def refuse_special(path: Path, remedy: str) -> None:
    """Raise when ``path`` is a device, a pipe or a socket (``remedy``: what to set instead).

    SQLite would open it as a database, fail with an I/O error, and leave a ``-journal``
    beside it (in ``/dev`` for ``/dev/null``); the advice for a damaged file would then
    say to delete a device. A directory is left to the caller's own advice.

    Raises:
        RefusedFileError: naming what the path is and what to do.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # absent, or out of reach: opening it says which
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise RefusedFileError(f"{path} is a device, a pipe or a socket, not a file: {remedy}")


#: The tables of the machine-wide files of ours: the key state's and the item cache's (one
#: file may hold both, when [state] path and [cache] path name it).
OUR_TABLES: Final = frozenset({"key_state", "item_cache"})


def refuse_foreign(conn: sqlite3.Connection, *, what: str) -> None:
    """Raise when the database holds tables but none of :data:`OUR_TABLES`: another
    program's file (a typo, a job's SQLite output), named by mistake. Called before anything
    is written, so such a file is left exactly as it was: no table added, its journal mode
    kept.

    Args:
        what: the file's role and the setting naming it, for the message (``"an item cache
            ([cache] path)"``).

    Raises:
        RefusedFileError: EIO, naming the tables found (not the file: the caller's message
            does).
        sqlite3.DatabaseError: the file is no SQLite database at all.
    """
    tables = sorted(
        name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
    )
    if tables and OUR_TABLES.isdisjoint(tables):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise RefusedFileError(
            errno.EIO,
            f"another program's SQLite database (tables {shown}), not {what}: it is left "
            "untouched; name another file",
        )


def enable_wal(conn: sqlite3.Connection, *, timeout_s: float) -> None:
    """Put ``conn``'s file in WAL mode, retrying "database is locked" for ``timeout_s``.

    Raises:
        sqlite3.OperationalError: still locked after ``timeout_s``, or any other error.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # Asked first: a file in WAL mode already needs no write lock, so a writer
            # elsewhere never holds up a process that opens it to read.
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
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


def checkpoint(conn: sqlite3.Connection, path: Path) -> None:
    """Copy every page of ``conn``'s write-ahead log into its file ``path`` and empty the
    log (``wal_checkpoint(TRUNCATE)``), so the file alone holds the database.

    Closing the last connection checkpoints too, but says nothing when it cannot: on a full
    disk the file cannot grow to take the pages, which stay in the ``-wal``, and the file
    moved or read without it (a promoted ``--refresh``, a closed SQLite output) is damaged
    or short. Called before such a close, so that failure is the error it is.

    Raises:
        OSError: the disk is full or failing (:func:`disk_error`), another program holds
            the file (:func:`held_error`), or a reader elsewhere kept pages in the log past
            the busy timeout (EBUSY). The log keeps the pages: the file is whole with it.
        sqlite3.Error: any other.
    """
    try:
        _busy, log, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error as exc:
        failure = disk_error(path, exc) or held_error(path, exc)
        if failure is not None:
            raise failure from exc
        raise
    # Out of WAL mode there is no log: (0, -1, -1). A reader on an older snapshot keeps the
    # pages after it from being copied; one on the latest only keeps the log from emptying,
    # which is busy too, but every page is in the file then.
    if log != copied:
        raise OSError(
            errno.EBUSY,
            f"{path}: another program reads it (a sqlite3 shell or a viewer in a "
            f"transaction), so {log - copied} of its {log} pages stayed in its -wal: close "
            "it and run the same command again",
            str(path),
        )


def checkpoint_unless_read(conn: sqlite3.Connection, path: Path) -> bool:
    """:func:`checkpoint` as a file is closed: False, and nothing raised, when a reader
    elsewhere (a sqlite3 shell, a viewer) keeps pages in the log, which is not waited for
    (100 ms): the file is whole with its log where it is, and one that must stand alone is
    refused where it would be moved (:func:`self_contained`).

    Raises:
        OSError: the disk is full or failing (:func:`disk_error`).
        sqlite3.Error: any other.
    """
    conn.execute("PRAGMA busy_timeout = 100")
    try:
        checkpoint(conn, path)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
    return True


def self_contained(path: Path) -> bool:
    """True when the file ``path`` alone holds its database: no ``-wal`` beside it holds
    pages (it is absent, or emptied by :func:`checkpoint`)."""
    wal, _ = journal_files(path)
    try:
        return wal.stat().st_size == 0
    except FileNotFoundError:
        return True


def held_error(path: Path, exc: sqlite3.Error) -> OSError | None:
    """``OSError(EBUSY)`` when another program holds the file (SQLITE_BUSY or
    SQLITE_LOCKED once the busy timeout ran out), else None.

    For a file the broker writes for the user (a job's SQLite output): a sqlite3 shell or a
    viewer in a transaction is the user's to close, like a full disk is theirs to free, so
    it is reported as one (exit 74), not as an internal error.
    """
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return OSError(
            errno.EBUSY,
            f"{path}: held by another program (a sqlite3 shell or a viewer in a "
            f"transaction): close it and run the same command again ({exc})",
        )
    return None


#: The longest full path SQLite opens: its 512 bytes, less its "-journal" suffix.
_LONGEST: Final = 512 - len("-journal")


def _out_of_space(path: Path) -> bool:
    """True when the file system holding ``path`` has less than :data:`_NEARLY_FULL` bytes
    left for unprivileged writes (a page and a -shm could not be written). Those, even for
    root: the blocks reserved beyond them are root's only with a capability or the file
    system's resuid, which a container's root seldom has."""
    try:
        info = os.statvfs(path.parent)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < _NEARLY_FULL


def _process_limit(path: Path) -> OSError | None:
    """The process limit behind a file SQLite could not open or write, if one is reached:
    out of open files (EMFILE: SQLite says only "unable to open database file", which read
    as a damaged file to move away), or the file size limit (``ulimit -f``: EFBIG, which
    read as a failing disk). sqlite3 hides the errno, so the limits are looked at here."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    out_of_files = OSError(errno.EMFILE, f"{path}: {os.strerror(errno.EMFILE)}", str(path))
    try:
        # A file in WAL mode takes three descriptors (the file, -wal, -shm): one that failed
        # to open them may have closed those it got, so a probe's one open could succeed.
        held = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError as probe:
        if probe.errno in (errno.EMFILE, errno.ENFILE):
            return out_of_files
    else:
        most = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if most != resource.RLIM_INFINITY and held + _WAL_FILES >= most:
            return out_of_files
    cap = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if cap == resource.RLIM_INFINITY:
        return None
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")):
        try:
            size = each.stat().st_size
        except OSError:
            continue
        if size + _PAGE_ROOM >= cap:
            return OSError(
                errno.EFBIG,
                f"{each}: the file size limit of {cap} bytes is reached (ulimit -f; LimitFSIZE= "
                "in a systemd unit)",
                str(each),
            )
    return None


#: The descriptors a SQLite file in WAL mode holds, and one for looking.
_WAL_FILES: Final = 4

#: How close (bytes) to the file size limit a SQLite file must be for its failed write to be
#: the limit's: SQLite writes a page (or a WAL frame) at a time, up to 64 KiB.
_PAGE_ROOM: Final = 65_536 + 24


def disk_error(path: Path, exc: sqlite3.Error) -> OSError | None:
    """The ``OSError`` a SQLite disk error means (full -> ENOSPC, I/O -> EIO, read-only ->
    EROFS), else None.

    Raised instead of the ``sqlite3`` error, so a full disk under a SQLite file is reported
    like one under any other output (exit 74), not as an internal error.
    """
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR):
        limit = _process_limit(path)
        if limit is not None:
            return limit
    # Each names its file (``filename``) too: an error naming none reads as stdout's.
    if primary == sqlite3.SQLITE_FULL:
        return OSError(errno.ENOSPC, f"{path}: disk full ({exc})", str(path))
    if primary == sqlite3.SQLITE_IOERR:
        if _out_of_space(path):
            # A full disk fails some writes as I/O errors, not SQLITE_FULL: growing the
            # shared-memory file (-shm) a new process needs is SQLITE_IOERR_SHMSIZE.
            return OSError(errno.ENOSPC, f"{path}: disk full ({exc})", str(path))
        return OSError(errno.EIO, f"{path}: I/O error ({exc})", str(path))
    if primary == sqlite3.SQLITE_READONLY:
        # A read-only file or file system: waiting never makes it writable.
        return OSError(errno.EROFS, f"{path}: read-only ({exc})", str(path))
    if primary == sqlite3.SQLITE_CANTOPEN and len(os.fsencode(os.path.abspath(path))) > _LONGEST:
        # SQLite names its files by their full path, at most 512 bytes with room for a
        # journal's suffix (the file system takes 4,096): "unable to open database file"
        # said nothing of why.
        return OSError(
            errno.ENAMETOOLONG,
            f"{path}: its full path is longer than the {_LONGEST} bytes SQLite can open; "
            "choose a shorter path",
            str(path),
        )
    return None
