"""The ``local`` key-state home: one SQLite file (WAL) shared by every process of a machine.

Each decision is one short ``BEGIN IMMEDIATE`` transaction: read the key's row, run
:func:`broker.state.decision.decide`, write the row back (a row still holding the bytes this
process last wrote is not parsed again: the record it was written from is reused).
``IMMEDIATE`` takes SQLite's write lock at the start, so two processes' decisions on one
file never interleave; WAL lets ``broker status`` read while others write. The file lives
in the user's state directory (``$XDG_STATE_HOME/asin-broker/``, else
``~/.local/state/asin-broker/``, created with mode 0700), or where ``[state] path`` says.
Slots, pauses and parks run on the machine's monotonic clock (one for every process, deaf
to wall-clock steps), tagged with the boot id so a reboot drops them; the daily window
follows the wall clock.

The transaction runs on the event loop's thread: it takes tens of microseconds when the
file is not contended (``benchmarks/shared_key.py`` measures it), less than a thread hop.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import orjson

from broker.errors import StateUnavailableError
from broker.logs import get_logger
from broker.sqlitewal import (
    disk_error,
    enable_wal,
    file_identity,
    file_in_the_way,
    immediate,
    real_path,
    refuse_foreign,
    refuse_orphans,
    refuse_special,
    replaced,
)
from broker.state.decision import Record, decide
from broker.state.model import Decision, Feedback, KeyLimits, ProcessMark, StateKey
from broker.state.store import KeyView, boot_epoch, monotonic_us, wall_us

__all__ = ["STATE_FILE", "SqliteStateStore"]

logger = get_logger("broker")

#: How often (µs) a store checks that its file is still the one at its path.
_FOLLOW_EVERY_US = 1_000_000

#: The file name inside the state directory.
STATE_FILE = "keys.sqlite3"

#: The page size of a new state file (see SqliteStateStore.__init__).
_PAGE_SIZE = 1024

#: The columns of ``key_state``: a file whose table lacks one is not ours (a later version
#: may add more).
_COLUMNS = frozenset({"digest", "name", "data"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_state (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    data BLOB NOT NULL
)
"""


class SqliteStateStore:
    """A :class:`broker.state.store.KeyStateStore` in one SQLite file.

    Args:
        path: the database file; its directory is created with mode 0700 if missing.
        now_us: the clock of slots and pauses in µs (system-wide monotonic; tests pass a fake).
        wall_us: the wall clock in µs, for the daily window.
        busy_timeout_s: how long a decision waits for another process's transaction before
            the store is reported unavailable. Decisions run on the event loop's thread and
            take microseconds, so a lock held longer than this is a stuck process: the loop
            must not stall behind it (the key pauses and asks again, backing off).

    A file replaced while processes use it (someone deleted a damaged one and a new process
    made it again) is opened at a decision within a second, so every process meets in the
    new file instead of each keeping its own unlinked copy; the day's count is rebuilt
    there from the processes' own counts, as after a Redis restart. A path with no file
    leaves each process on the file it has.

    Raises:
        OSError: the file cannot be created or opened (exit 74).
        StateUnavailableError: it is busy beyond ``busy_timeout_s``.
    """

    __slots__ = (
        "_busy_timeout_s",
        "_checked_us",
        "_conn",
        "_epoch",
        "_given",
        "_identity",
        "_now_us",
        "_other_machine_said",
        "_path",
        "_wall_us",
        "_written",
    )

    def __init__(
        self,
        path: Path,
        *,
        now_us: Callable[[], int] = monotonic_us,
        wall_us: Callable[[], int] = wall_us,
        busy_timeout_s: float = 0.25,
    ) -> None:
        # As configured, and the file it names once links are followed (looked at again
        # with the file: a link pointed elsewhere meanwhile leads there).
        self._given = path
        self._path = real_path(path)
        self._now_us = now_us
        self._wall_us = wall_us
        self._epoch = boot_epoch()
        self._other_machine_said = False
        # The row this process last wrote for each key, with the record it came from: while
        # no other process has written since (the bytes match), the record is reused
        # instead of parsed again, which is most of a decision's Python work.
        self._written: dict[str, tuple[bytes, Record]] = {}
        self._busy_timeout_s = busy_timeout_s
        self._conn, self._identity = self._connect()
        self._checked_us = self._now_us()

    def _connect(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """Open (creating if need be) the file; the connection and the file's identity."""
        path = self._path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            new = not path.exists()
        except OSError as exc:
            # Its directory cannot be made (a read-only file system, no permission, a file
            # in the way): waiting never fixes that, so it ends the run (exit 74), not 69.
            # The file in the way, not the deepest folder mkdir tried (which does not exist).
            in_the_way = file_in_the_way(path)
            reason = (
                f"{in_the_way} is a file, not a directory"
                if in_the_way is not None
                else exc.strerror
            )
            raise OSError(
                exc.errno, f"{path}: cannot create or enter its directory: {reason}"
            ) from exc
        refuse_special(path, "set [state] path to a file's path")
        if new:
            refuse_orphans(path, "the key state")
        try:
            conn = sqlite3.connect(
                path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc
        try:
            if new:
                # Owner-only, like the item cache: which keys run, their rates and counts.
                os.chmod(path, 0o600)
            refuse_foreign(conn, what="a key-state file ([state] path)")
            # A new file gets 1 KiB pages: every decision writes its key's page to the WAL,
            # and a row is about 400 bytes (a bare read-and-update transaction measured
            # 21-22 µs against 29-35 with the default 4 KiB). An existing file keeps its own.
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            enable_wal(conn, timeout_s=self._busy_timeout_s)
            # NORMAL: a power cut may lose the last decisions, never corrupt the file; the
            # daily count's guard margin covers a few lost increments.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(key_state)")}
            identity = file_identity(path)
        except sqlite3.Error as exc:
            conn.close()
            raise self._failure(exc) from exc
        except OSError as exc:
            conn.close()
            raise OSError(exc.errno, f"{path}: {exc.strerror}") from exc
        if not columns.issuperset(_COLUMNS):
            # Waiting never changes a table's shape: not an outage, an I/O error now.
            conn.close()
            raise OSError(
                errno.EIO,
                f"{path}: its key_state table lacks columns this broker needs (it has "
                f"{', '.join(sorted(columns))}): another program's file, or another version's; "
                "name another file in [state] path (deleting this one loses only the keys' "
                "shared pacing and daily counts)",
            )
        return conn, identity

    def _follow_the_file(self) -> None:
        """Open the file again when the one open is no longer at the path (deleted or
        replaced, or the path is a link pointed at another file since): the other processes
        meet at the path, not in an unlinked or left file. Looked at
        once a second at most: a stat per decision cost a tenth of the decision."""
        now = self._now_us()
        if now - self._checked_us < _FOLLOW_EVERY_US:
            return
        self._checked_us = now
        target = real_path(self._given)
        if target != self._path:
            self._path = target  # a link pointed at another file: the processes meet there
        elif not replaced(self._path, self._identity):
            return
        conn, identity = self._connect()
        self._conn.close()
        self._conn, self._identity = conn, identity
        self._written.clear()
        logger.warning(
            "broker.state_file_replaced",
            path=str(self._path),
            note="the key-state file was deleted or replaced while in use; opened again",
        )

    @property
    def backend(self) -> str:
        """``"local"``."""
        return "local"

    @property
    def where(self) -> str:
        """The database file."""
        return str(self._path)

    def _load(self, digest: str, written: tuple[bytes, Record] | None = None) -> Record:
        """The key's record; ``written`` (bytes, record) is reused if the row still holds it."""
        row = self._conn.execute(
            "SELECT data FROM key_state WHERE digest = ?", (digest,)
        ).fetchone()
        if row is None:
            return Record()
        if written is not None and written[0] == row[0]:
            return written[1]
        try:
            return Record.from_json(orjson.loads(row[0]))
        except ValueError as exc:  # orjson's JSONDecodeError is one too
            raise self._damaged(f"a key's record cannot be read: {exc}") from None

    async def decide(
        self,
        key: StateKey,
        limits: KeyLimits,
        *,
        feedback: Feedback,
        reserve: bool,
        process: ProcessMark | None,
    ) -> Decision:
        """Apply feedback and optionally reserve a send, in one transaction."""
        self._follow_the_file()
        conn = self._conn
        # Taken out while the decision runs: a failed transaction leaves the record changed
        # in memory but not on disk, so it must not be reused.
        written = self._written.pop(key.digest, None)
        try:
            with immediate(conn):
                record = self._load(key.digest, written)
                # Only with a boot id of its own: a process that cannot read it (a
                # container hiding /proc's) would take its own machine's for another's.
                if written is not None and self._epoch and record.epoch not in ("", self._epoch):
                    self._say_other_machine()
                decision = decide(
                    record,
                    self._now_us(),
                    limits,
                    feedback=feedback,
                    reserve=reserve,
                    process=process,
                    wall=self._wall_us(),
                    epoch=self._epoch,
                )
                # An upsert rewrites the row in place (INSERT OR REPLACE deletes and
                # re-inserts it); orjson writes the record's fields as to_json() would.
                data = orjson.dumps(record)
                conn.execute(
                    "INSERT INTO key_state (digest, name, data) VALUES (?, ?, ?) "
                    "ON CONFLICT (digest) DO UPDATE SET name = excluded.name, "
                    "data = excluded.data",
                    (key.digest, key.name, data),
                )
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc
        self._written[key.digest] = (data, record)
        return decision

    def _say_other_machine(self) -> None:
        """Warn (once) that a process of another machine writes the file: a key this store
        wrote was rewritten since under another boot id, which no reboot can do while this
        process runs (a network or shared disk, a volume two hosts mount). Each machine's
        decisions drop the other's slots, pauses and parks as times of another boot."""
        if self._other_machine_said:
            return
        self._other_machine_said = True
        logger.warning(
            "broker.state_shared_across_machines",
            path=str(self._path),
            note="a process of another machine (another boot id) writes this key-state file "
            "too: the local backend paces the processes of one machine, and each machine "
            "drops the other's pacing and parks; give each machine its own [state] path, or "
            'share a key across machines with [state] backend = "redis"',
        )

    def _damaged(self, detail: str) -> OSError:
        """A damaged file: an I/O error (exit 74) saying what deleting it costs."""
        return OSError(
            errno.EIO,
            f"{self._path}: damaged ({detail}); it holds only the keys' shared pacing and "
            "daily counts: delete it, with its -wal and -shm files, to start afresh",
        )

    def _failure(self, exc: sqlite3.Error) -> Exception:
        """A busy or locked file is unavailable for now (the key waits and asks again); a
        disk that fails or is full, a read-only file and a damaged one are I/O errors that
        end the run (exit 74), as waiting would never end."""
        primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if primary == sqlite3.SQLITE_NOTADB:
            return OSError(
                errno.EIO,
                f"{self._path}: not a SQLite database: check that [state] path names the "
                "key-state file; if it does, the file is damaged: delete it, with its -wal "
                "and -shm files, to start afresh (it holds only the keys' shared pacing and "
                "daily counts)",
            )
        if primary == sqlite3.SQLITE_CORRUPT:
            return self._damaged(str(exc))
        failed = disk_error(self._path, exc)
        if primary == sqlite3.SQLITE_CANTOPEN and failed is None:
            # A directory at the path, no permission, a read-only file system (WAL needs
            # its -shm file beside the database): permanent, unlike a busy file.
            return OSError(
                errno.EACCES,
                f"{self._path}: cannot open it ({exc}): the path must be a file this user can "
                "write, in a writable directory ([state] path moves it)",
            )
        return failed or StateUnavailableError("local", f"{self._path}: {exc}")

    async def view(self, key: StateKey, limits: KeyLimits) -> KeyView:
        """Read the key's state without writing anything."""
        self._follow_the_file()
        try:
            stored = (
                self._conn.execute(
                    "SELECT 1 FROM key_state WHERE digest = ?", (key.digest,)
                ).fetchone()
                is not None
            )
            record = self._load(key.digest)
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc
        decision = decide(
            record,
            self._now_us(),
            limits,
            feedback=Feedback(),
            reserve=False,
            process=None,
            wall=self._wall_us(),
            view=True,
            epoch=self._epoch,
        )
        return KeyView(key, limits, decision, stored=stored)

    async def aclose(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteStateStore({str(self._path)!r})"
