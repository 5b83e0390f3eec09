"""The item cache in a SQLite file shared by every process of the machine.

One table of its own (``item_cache``) in WAL mode. Every ``put_many`` is one
``BEGIN IMMEDIATE`` transaction (insert, expire past the 24-hour ceiling, evict the oldest
beyond the bound), so a process killed mid-write leaves the previous state: SQLite's
journal rolls a torn transaction back, and each payload's checksum is checked on read as
a second guard. Triggers keep a one-row totals table, so the bound is checked in O(1).
All blocking calls run on one worker thread owned by the cache, so the event loop waits
only for a thread hop per batch of keys, never for the disk.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from broker.cache.base import StoreCache
from broker.cache.entry import Entry
from broker.cache.policy import FUTURE_S
from broker.logs import get_logger
from broker.sqlitewal import (
    RefusedFileError,
    disk_error,
    enable_wal,
    file_identity,
    file_in_the_way,
    immediate,
    journal_files,
    real_path,
    refuse_foreign,
    refuse_orphans,
    refuse_special,
    replaced,
)

if TYPE_CHECKING:
    from broker.cache.policy import CacheKey, CachePolicy
    from broker.clock import Clock

__all__ = ["SqliteCache"]

_T = TypeVar("_T")

_log = get_logger("broker.cache")

#: Lock waits longer than this (another process writing) raise instead of hanging.
_BUSY_TIMEOUT_MS: Final = 5_000
#: Run an incremental vacuum once this many pages are free, so the file shrinks back.
_VACUUM_FREE_PAGES: Final = 256
#: How often (seconds) the path is looked at for a file deleted and made again.
_FOLLOW_EVERY_S: Final = 1.0
#: The write-ahead log is cut back to this size after a checkpoint.
_WAL_LIMIT_BYTES: Final = 8 * 1024 * 1024

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS item_cache (
    ns          TEXT NOT NULL,
    marketplace TEXT NOT NULL,
    asin        TEXT NOT NULL,
    resources   TEXT NOT NULL,
    fetched_at  REAL NOT NULL,
    size        INTEGER NOT NULL,
    checksum    BLOB NOT NULL,
    payload     BLOB NOT NULL,
    UNIQUE (ns, marketplace, asin, resources)
);
CREATE INDEX IF NOT EXISTS item_cache_age ON item_cache (fetched_at);
CREATE INDEX IF NOT EXISTS item_cache_asin ON item_cache (asin);
CREATE INDEX IF NOT EXISTS item_cache_ns ON item_cache (ns, fetched_at, size);
CREATE TABLE IF NOT EXISTS item_cache_totals (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    entries INTEGER NOT NULL,
    bytes   INTEGER NOT NULL
);
INSERT OR IGNORE INTO item_cache_totals VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS item_cache_ins AFTER INSERT ON item_cache BEGIN
    UPDATE item_cache_totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS item_cache_del AFTER DELETE ON item_cache BEGIN
    UPDATE item_cache_totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS item_cache_upd AFTER UPDATE OF size ON item_cache BEGIN
    UPDATE item_cache_totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 1;
END;
"""

#: What :data:`_SCHEMA` creates, by name.
_SCHEMA_NAMES: Final = frozenset(re.findall(r"IF NOT EXISTS (\w+)", _SCHEMA))


def _has_schema(db: sqlite3.Connection) -> bool:
    """True when the file holds every table, index and trigger of the cache, and its totals."""
    names = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    if not names >= _SCHEMA_NAMES:
        return False
    return db.execute("SELECT 1 FROM item_cache_totals WHERE id = 1").fetchone() is not None


#: A namespace's entries, payload bytes and oldest answer (by the covering index); a
#: damaged row's time that is no number (text sorts after every number) is no oldest.
_MEASURE: Final = (
    "SELECT count(*), coalesce(sum(size), 0), "
    "min(CASE WHEN typeof(fetched_at) IN ('integer', 'real') THEN fetched_at END) "
    "FROM item_cache WHERE ns = ?"
)

# A late writer's older answer never replaces a newer one, but one stamped more than FUTURE_S
# ahead of now (the last parameter) is replaced: the clock was set back since (see _store).
_UPSERT: Final = """
INSERT INTO item_cache (ns, marketplace, asin, resources, fetched_at, size, checksum, payload)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (ns, marketplace, asin, resources) DO UPDATE SET
    fetched_at = excluded.fetched_at, size = excluded.size,
    checksum = excluded.checksum, payload = excluded.payload
WHERE excluded.fetched_at >= item_cache.fetched_at
    OR item_cache.fetched_at > ?
"""

#: Deletes a key's damaged entry only while the row holds the bytes that were read.
_DELETE_UNCHANGED: Final = """
DELETE FROM item_cache WHERE ns = ? AND marketplace = ? AND asin = ? AND resources = ?
AND checksum = ? AND payload = ?
"""

#: Deletes a key's row only while it is still unreadable (see ``_load``).
_DELETE_DAMAGED: Final = """
DELETE FROM item_cache WHERE ns = ? AND marketplace = ? AND asin = ? AND resources = ?
AND (typeof(fetched_at) NOT IN ('integer', 'real') OR typeof(payload) <> 'blob'
     OR typeof(checksum) <> 'blob')
"""


def _select_many(count: int) -> str:
    """The read of ``count`` keys: their ``(marketplace, asin, resources)`` triples, then
    the namespace, as parameters.

    A join from the list of keys, each one a search of the unique index on all four
    columns. Written as ``(marketplace, asin, resources) IN (VALUES ...)``, SQLite walked
    every row of the namespace for each read (tens of milliseconds with 100,000 cached
    answers, on the cache's one thread): a large job ran at a third of its speed once the
    cache filled.
    """
    values = ",".join(["(?,?,?)"] * count)
    # CROSS JOIN keeps the keys the outer loop: SQLite never reorders it.
    return (
        "SELECT c.marketplace, c.asin, c.resources, c.fetched_at, c.checksum, c.payload "
        f"FROM (VALUES {values}) AS k CROSS JOIN item_cache AS c "
        "WHERE c.ns = ? AND c.marketplace = k.column1 AND c.asin = k.column2 "
        "AND c.resources = k.column3"
    )


#: Keys per SELECT (3 parameters each, well under SQLite's 32,766).
_READ_CHUNK: Final = 300


class SqliteCache(StoreCache):
    """An :class:`~broker.cache.base.ItemCache` in a SQLite file.

    Args:
        path: the database file; its directory is created with mode 0700 when missing.
            Default of the broker: :func:`broker.cache.paths.default_cache_path`.
        policy, namespace, clock, batch_size: as for :class:`StoreCache`.
    The size bound counts every namespace in the file.
    """

    failures = (sqlite3.Error, OSError)

    def __init__(
        self,
        path: str | os.PathLike[str],
        policy: CachePolicy,
        *,
        namespace: str = "creators",
        clock: Clock | None = None,
        batch_size: int = 10,
    ) -> None:
        super().__init__(policy, namespace=namespace, clock=clock, batch_size=batch_size)
        # As configured, and the file it names once links are followed (looked at again
        # with the file: a link pointed elsewhere meanwhile leads there).
        self._given = Path(path)
        self.path = real_path(path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="item-cache")
        self._db: sqlite3.Connection | None = None
        # The open file's (device, inode), and when the path was last looked at.
        self._identity: tuple[int, int] | None = None
        self._checked = 0.0
        self._closed = False

    # -- plumbing -----------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise RuntimeError("the item cache is closed")
        return await self._on_thread(functools.partial(self._call, fn))

    async def _on_thread(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the cache's thread; in the calling one once the interpreter is
        exiting: concurrent.futures stops its workers before the atexit handlers (an
        unclosed SyncBroker's finalizer) run, and the connection is not tied to a thread,
        so the last writes and the close are done here."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self._thread, fn)
        except RuntimeError as exc:
            if not _executors_stopped(exc):
                raise
            return fn()
        return await future

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        db = self._db
        if db is not None and self._moved():
            # Deleted and made again (the advice for a damaged file): the other processes
            # meet in the new file, so this one does too instead of filling an unlinked one.
            db.close()
            self._db = db = None
            _log.warning(
                "cache.file_replaced",
                path=str(self.path),
                note="the item cache file was deleted or replaced while in use; opened again",
            )
        if db is None:
            self._db = db = self._open()
        return fn(db)

    def _moved(self) -> bool:
        """True when another file is at the path than the one open, or the path is a link
        pointed at another file since (then :attr:`path` is that one); looked at once a
        second at most."""
        now = self._clock.monotonic()
        if now - self._checked < _FOLLOW_EVERY_S:
            return False
        self._checked = now
        target = real_path(self._given)
        if target != self.path:
            self.path = target
            return True
        return self._identity is not None and replaced(self.path, self._identity)

    def _open(self) -> sqlite3.Connection:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        refuse_special(
            self.path,
            "set [cache] path to a file's path, or turn the cache off (--no-cache, or [cache] "
            "max_age_s = 0)",
        )
        new = not self.path.exists()
        if new:
            refuse_orphans(self.path, "the item cache")
        db = sqlite3.connect(
            self.path,
            isolation_level=None,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            refuse_foreign(db, what="an item cache ([cache] path)")
            if new:
                # Before the first table: lets deleted pages go back to the file system.
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)
            enable_wal(db, timeout_s=_BUSY_TIMEOUT_MS / 1000)
            # WAL + NORMAL: a crashed process never tears a commit; a power cut may lose
            # the last ones, which for a cache is only a miss.
            db.execute("PRAGMA synchronous = NORMAL")
            # The WAL is checkpointed every 1,000 pages; this truncates it back afterwards.
            db.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT_BYTES}")
            if not _has_schema(db):
                # One script, one transaction: two processes creating the file at once agree.
                # Only then: the write lock it takes would make every process starting
                # while another program writes wait, and fail, though WAL lets it read.
                db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            self._identity = file_identity(self.path)
        except BaseException:
            db.close()
            raise
        self._checked = self._clock.monotonic()
        return db

    def _key_params(self, key: CacheKey) -> tuple[str, str, str, str]:
        return (self.namespace, key.marketplace, key.asin, ",".join(key.resources))

    # -- the home -----------------------------------------------------------------------

    async def _load(self, keys: Sequence[CacheKey]) -> dict[CacheKey, Entry]:
        by_text = {(key.marketplace, key.asin, ",".join(key.resources)): key for key in keys}
        wanted = list(by_text)

        def load(db: sqlite3.Connection) -> tuple[dict[CacheKey, Entry], list[CacheKey]]:
            found: dict[CacheKey, Entry] = {}
            damaged: list[CacheKey] = []
            # One read transaction: a consistent snapshot, one lock acquisition; keys go
            # in chunks of row values, so 10,000 keys cost 34 statements, not 10,000.
            db.execute("BEGIN")
            try:
                for start in range(0, len(wanted), _READ_CHUNK):
                    chunk = wanted[start : start + _READ_CHUNK]
                    params = [*(part for row in chunk for part in row), self.namespace]
                    for marketplace, asin, resources, fetched_at, digest, payload in db.execute(
                        _select_many(len(chunk)), params
                    ):
                        key = by_text[(marketplace, asin, resources)]
                        try:
                            # A number is no payload (bytes(42) is 42 zero bytes), as
                            # _DELETE_DAMAGED, which deletes the row, sees it.
                            if not isinstance(payload, bytes) or not isinstance(digest, bytes):
                                raise TypeError("not bytes")
                            entry = Entry(key, float(fetched_at), payload, digest)
                        except (TypeError, ValueError):
                            # SQLite keeps any type in any column: a row damaged so is a
                            # miss of its own, not a failure of the whole read.
                            damaged.append(key)
                            continue
                        found[key] = entry
            finally:
                db.execute("COMMIT")
            return found, damaged

        found, damaged = await self._run(load)
        if damaged:
            for key in damaged:
                _log.warning("cache.corrupt_entry", marketplace=key.marketplace, asin=key.asin)
            await self._drop_damaged(damaged)
        return found

    async def _drop_damaged(self, keys: Sequence[CacheKey]) -> None:
        """Delete rows still damaged so; a good row another process wrote since stays.

        Deleted, not left to be skipped: an upsert never replaces a row whose time is not a
        number (SQLite orders text after every number). Best effort: the read it follows
        stands whatever happens here (a lock held too long, a read-only file).
        """

        def delete(db: sqlite3.Connection) -> None:
            with immediate(db):
                db.executemany(_DELETE_DAMAGED, [self._key_params(key) for key in keys])

        try:
            await self._run(delete)
        except self.failures as exc:
            _log.warning("cache.corrupt_entry_kept", entries=len(keys), error=str(exc))

    async def _delete_unchanged(self, entries: Sequence[Entry]) -> None:
        def delete(db: sqlite3.Connection) -> None:
            rows = [(*self._key_params(e.key), e.checksum, e.payload) for e in entries]
            with immediate(db):
                db.executemany(_DELETE_UNCHANGED, rows)

        await self._run(delete)

    async def _store(self, entries: Sequence[Entry], *, expire_before: float) -> int:
        policy = self.policy
        ahead = self._now() + FUTURE_S

        def store(db: sqlite3.Connection) -> int:
            rows = [
                (*self._key_params(e.key), e.fetched_at, e.size, e.checksum, e.payload, ahead)
                for e in entries
            ]
            with immediate(db):
                db.executemany(_UPSERT, rows)
                # A slice at most inside the write: the first write after a quiet day met a
                # million expired answers, deleted in one transaction (50 s, every other
                # process locked out); the rest go a slice at a time after it.
                expired = (expire_before, ahead)
                left = db.execute(_sliced(_EXPIRED), (*expired, _DELETE_SLICE)).rowcount
                evicted = _evict(db, policy.max_items, policy.max_bytes)
            _vacuum(db)
            if left >= _DELETE_SLICE:
                _delete_in_slices(db, _EXPIRED, expired)
            return evicted

        return await self._run(store)

    async def _delete(
        self,
        keys: Sequence[CacheKey] | None,
        *,
        fetched_before: float | None,
        asins: Sequence[str] | None,
        every_resource_set: bool = False,
    ) -> int:
        def delete(db: sqlite3.Connection) -> int:
            if keys is not None:
                removed = 0
                with immediate(db):
                    for key in keys:
                        if every_resource_set:
                            removed += db.execute(
                                "DELETE FROM item_cache WHERE ns = ? AND marketplace = ? "
                                "AND asin = ?",
                                self._key_params(key)[:3],
                            ).rowcount
                            continue
                        removed += db.execute(
                            "DELETE FROM item_cache WHERE ns = ? AND marketplace = ? AND asin = ?"
                            " AND resources = ?",
                            self._key_params(key),
                        ).rowcount
                _vacuum(db)
                return removed
            where: list[str] = ["ns = ?"]
            params: list[object] = [self.namespace]
            if fetched_before is not None:
                where.append("fetched_at < ?")
                params.append(fetched_before)
            if asins is not None:
                where.append(f"asin IN ({','.join('?' * len(asins))})")
                params.extend(asins)
            return _delete_in_slices(db, " AND ".join(where), params)

        return await self._run(delete)

    async def _measure(self) -> tuple[int, int, float | None]:
        def measure(db: sqlite3.Connection) -> tuple[int, int, float | None]:
            # This namespace's answers, as the other homes report them (the file-wide
            # totals are for the size bound, which counts every namespace); read from the
            # covering index item_cache_ns, never from the payloads (every /metrics scrape).
            entries, size, oldest = db.execute(_MEASURE, (self.namespace,)).fetchone()
            return int(entries), int(size), None if oldest is None else float(oldest)

        return await self._run(measure)

    async def aclose(self) -> None:
        """Close the connection and stop the worker thread; idempotent."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._on_thread(close)
        self._thread.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"SqliteCache({str(self.path)!r}, max_age_s={self.policy.max_age_s:g})"

    @property
    def where(self) -> str:
        """The file's path."""
        return str(self.path)

    def _failure_advice(self, error: BaseException) -> tuple[str, str]:
        """The file, and that deleting it is safe: it holds only copies of Amazon's answers
        (unless it is refused as it stands, or may not be the cache at all)."""
        if isinstance(error, RefusedFileError):
            return str(self.path), ""  # its message says what to do
        if isinstance(error, sqlite3.DatabaseError) and "not a database" in str(error):
            return str(self.path), (
                "check that [cache] path names the item cache, not another file; if it does, "
                "the file is damaged: delete it with its -wal and -shm to start afresh"
            )
        try:
            is_dir = self.path.is_dir()
        except OSError:  # a name too long: said below
            is_dir = False
        if is_dir:
            return str(self.path), "it is a directory: set [cache] path to a file in it"
        in_the_way = file_in_the_way(self.path)
        if in_the_way is not None:
            return str(self.path), (
                f"{in_the_way} is a file, not a directory: set [cache] path elsewhere"
            )
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM):
            return str(self.path), (
                "this user cannot create or enter its directory, or write the file: fix "
                "their permissions, or set [cache] path to a place it may write"
            )
        failed = disk_error(self.path, error) if isinstance(error, sqlite3.Error) else error
        if isinstance(failed, OSError) and failed.errno == errno.ENAMETOOLONG:
            return str(self.path), (
                "its path is too long (SQLite opens at most 504 bytes of full path, a file "
                "system takes names of at most 255): set [cache] path to a shorter one"
            )
        if _cannot_open(error) and not _writable(self.path):
            # Opening needs the -wal and -shm beside the file: a directory (or file system)
            # read-only fails so, not as SQLITE_READONLY, and deleting the file mends nothing.
            failed = OSError(errno.EROFS, str(error))
        if isinstance(failed, OSError) and failed.errno == errno.ENOSPC:
            return str(self.path), (
                "free space on its disk (the file holds only copies of Amazon's answers: "
                "deleting it with its -wal and -shm frees its own at once), or set [cache] "
                "max_bytes lower or path elsewhere"
            )
        if isinstance(failed, OSError) and failed.errno == errno.EROFS:
            # A -shm made while the file was read-only takes the file's mode, and no
            # connection can replace it: mending the file alone would mend nothing.
            companions = _read_only_companions(self.path)
            named = " and ".join(str(part) for part in companions)
            verb, them = ("is", "it") if len(companions) == 1 else ("are", "them")
            mend = f"make {them} writable, or delete {them} while no process uses the cache"
            if companions and os.access(self.path, os.W_OK):
                return str(self.path), f"{named} beside it {verb} read-only: {mend}"
            also = f"; so {verb} {named} beside it: {mend}" if companions else ""
            return str(self.path), (
                "it or its directory is read-only: make it writable, or set [cache] path to a "
                f"writable place{also}"
            )
        return str(self.path), (
            "if another process holds it locked, wait for it; if it is damaged, delete it "
            "with its -wal and -shm to start afresh (it holds only copies of Amazon's answers)"
        )


def _executors_stopped(exc: RuntimeError) -> bool:
    """True when ``exc`` is a thread pool refusing work because the interpreter is exiting
    (not a worker thread that failed to start: a thread limit)."""
    return "cannot schedule new futures after" in str(exc)


def _cannot_open(error: BaseException) -> bool:
    """True for SQLite's CANTOPEN (the file, its directory, or its -wal/-shm)."""
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return isinstance(error, sqlite3.Error) and code == sqlite3.SQLITE_CANTOPEN


def _writable(path: Path) -> bool:
    """True when this process may write ``path`` and make files beside it (its -wal and
    -shm), on a file system mounted writable."""
    folder = path.parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    if path.exists() and not os.access(path, os.W_OK):
        return False
    return os.access(folder, os.W_OK) and not _read_only_companions(path)


def _read_only_companions(path: Path) -> list[Path]:
    """The -wal and -shm beside ``path`` that exist and this process may not write."""
    parts = journal_files(path)
    return [part for part in parts if os.access(part, os.F_OK) and not os.access(part, os.W_OK)]


def _evict(db: sqlite3.Connection, max_items: int, max_bytes: int) -> int:
    """Delete the oldest entries until both bounds hold; return how many went."""
    evicted = 0
    while True:
        entries, size = db.execute("SELECT entries, bytes FROM item_cache_totals").fetchone()
        over_items = max(0, entries - max_items)
        over_bytes = max_bytes > 0 and size > max_bytes
        if not over_items and not over_bytes:
            return evicted
        # Over the byte bound only: drop a few at a time, re-checking the total.
        count = over_items or max(1, entries // 100)
        evicted += db.execute(
            "DELETE FROM item_cache WHERE rowid IN "
            "(SELECT rowid FROM item_cache ORDER BY fetched_at LIMIT ?)",
            (count,),
        ).rowcount


#: Rows a bulk delete (a day's expiry, a purge) removes per transaction.
_DELETE_SLICE: Final = 5_000
#: The answers past the ceiling (or stamped too far ahead), every namespace's.
_EXPIRED: Final = "fetched_at < ? OR fetched_at > ?"


def _sliced(where: str) -> str:
    """A DELETE of at most ``?`` (the last parameter) rows matching ``where``."""
    return (
        "DELETE FROM item_cache WHERE rowid IN "
        f"(SELECT rowid FROM item_cache WHERE {where} LIMIT ?)"
    )


def _delete_in_slices(db: sqlite3.Connection, where: str, params: Sequence[object]) -> int:
    """Delete the rows matching ``where``, :data:`_DELETE_SLICE` per transaction, each
    vacuumed: a day's expiry of a million answers in one held the file for 50 s, every
    other process locked out meanwhile. Returns how many went."""
    removed = 0
    while True:
        with immediate(db):
            count = db.execute(_sliced(where), (*params, _DELETE_SLICE)).rowcount
        removed += count
        _vacuum(db)
        if count < _DELETE_SLICE:
            return removed


def _vacuum(db: sqlite3.Connection) -> None:
    """Give free pages back to the file system once enough have piled up."""
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    if free >= _VACUUM_FREE_PAGES:
        # Stepped to its end by executescript: the pragma frees one page per step, and
        # execute() steps a statement that returns no columns once (one page a call).
        db.executescript("PRAGMA incremental_vacuum")
        # The file itself shrinks when the write-ahead log is checkpointed into it; a
        # passive checkpoint waits for no reader.
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
