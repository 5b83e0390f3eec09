"""The job ledger: one SQLite file (WAL) holding each input row, its result and output progress.

The ledger is the source of truth for resume (``reliability.md`` 2.3). Output files are derived
from it: each input row gets a ``done_order`` when it becomes final, and each sink records the
``done_order`` (and byte offset) up to which it is known good, so a rerun re-emits exactly what
is missing.

Layout:

- ``rows``: one row per input row, keyed by ``seq`` (the 0-based row index in file order),
  with its ``(marketplace, asin, resources)``. Invalid rows are final at ingestion.
- ``lookups``: one row per distinct ``(marketplace, asin, resources)``, in order of first
  appearance, holding the result once it arrives; duplicates in the input share it. It is
  built in one pass when ingestion completes, so work starts after ingestion.
- ``tally``: row counts per status, kept in the same transactions as the rows, so progress
  never scans a million rows.
- ``sinks``, ``budget``, ``meta``: sink progress, daily request counters (kept across
  ``new_job``; a :class:`~broker.engine.quota.BudgetStore` for callers that pass one: the
  runner counts a key's day in the shared key state since ``[state]``) and the schema
  version, job fingerprint and ingestion progress.

Invariants the sinks rely on: ``done_order`` starts at 1 and has no gaps, and a row's
``done_order`` is above every ``done_order`` committed before it. So "the first *k* rows of
an output file" is the same as "``done_order`` 1..*k*".

Memory stays flat whatever the job size: ingestion goes in chunks of ``executemany``, and
every read is paged with short statements (no cursor stays open across a commit, and no read
transaction is held open, so the WAL can always be checkpointed).

One process drives a job at a time (:class:`~broker.jobs.lock.JobLock`); inside it the
ledger may be used from several threads, one call at a time.

A SQLite disk error (full, I/O) is raised as ``OSError``. :func:`crash_point` is a test-only
hook that kills the process at named points of a job, inert unless ``ASINB_CRASH_AT`` is set.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import re
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from itertools import chain, islice
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, cast

from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.errors import JobFileError
from broker.jobs.sources import INVALID_ASIN
from broker.jsontext import dumps, loads
from broker.logs import get_logger
from broker.sqlitewal import (
    checkpoint_unless_read,
    disk_error,
    file_identity,
    held_error,
    immediate,
    still_at,
)

if TYPE_CHECKING:
    from broker.jobs.sources import JobFingerprint, JobRow
    from broker.models import ItemResult

__all__ = [
    "CRASH_ENV",
    "CRASH_POINTS",
    "SCHEMA_VERSION",
    "Counts",
    "DoneRow",
    "JobFileChangedError",
    "JobMismatchError",
    "JobSettingsChangedError",
    "Ledger",
    "Lookup",
    "OtherJobsOutputError",
    "SinkState",
    "canonical_marketplace",
    "crash_point",
    "disk_error",
    "read_tally",
]

logger = get_logger("broker")

#: The ledger schema this code writes (``meta.schema_version``). Raised whenever the tables
#: or the output's columns change, so that an older broker refuses a ledger a newer one
#: wrote instead of resuming it under its own columns (a test pins it to their digest).
#: Version 2 (2026-12-06): rows.code, the pinned answer settings, image_url and cached.
#: Version 3 (2026-12-07): CSV cells a spreadsheet would take for a formula start with ``'``.
SCHEMA_VERSION: Final = 3
#: Versions this code reads: an older one is migrated and marked ``SCHEMA_VERSION`` when
#: opened (version 1: a rows table without ``code``; before 3, a CSV output is written again
#: in full, see :attr:`Ledger.outputs_reset`).
_READABLE_VERSIONS: Final = (1, 2, 3)
#: The first version whose CSV outputs write cells as this code does.
_CSV_CELLS_SINCE: Final = 3

# Marks a SQLite file as ours, so a different database passed by mistake is refused, not reused.
_APPLICATION: Final = "asin-broker-ledger"
#: The meta key prefix of the settings a job's answers depend on (``setting:api.protocol``).
_SETTING: Final = "setting:"
#: The meta key prefix of an output's state as a ``--ordered`` export left it.
_ORDERED: Final = "ordered:"
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SYNCHRONOUS: Final = ("FULL", "NORMAL")
# Rows per page of the paged readers; small enough to keep memory flat, big enough that
# per-statement overhead does not matter.
_PAGE: Final = 1000

#: A page of pending lookups after an id, of all marketplaces or of one. Both walk the
#: partial index of pending ids: the unary + keeps SQLite from taking the (marketplace,
#: asin, resources) index instead, which read every lookup of the marketplace, done ones
#: too, and sorted them, once per page (53 s per marketplace for a job of 1M rows).
_PENDING_SQL: Final = (
    "SELECT id, marketplace, asin, resources FROM lookups "
    "WHERE status IS NULL AND id > ? ORDER BY id LIMIT ?"
)
_PENDING_IN_SQL: Final = (
    "SELECT id, marketplace, asin, resources FROM lookups "
    "WHERE status IS NULL AND id > ? AND +marketplace = ? ORDER BY id LIMIT ?"
)
# The pending lookups per marketplace. "+marketplace" keeps SQLite off the lookups_key index
# for the GROUP BY: walking that index reads the table in ASIN order, a random read per
# lookup (7.9 s for 3 million of them); the pending index reads it in file order (1 s).
_PENDING_BY_MARKET_SQL: Final = (
    "SELECT marketplace, COUNT(*) FROM lookups WHERE status IS NULL GROUP BY +marketplace"
)
# The job tables, dropped and recreated by ``new_job``; ``budget`` and ``meta`` survive.
_JOB_TABLES: Final = ("rows", "lookups", "tally", "sinks")

_SCHEMA_JOB: Final = """
CREATE TABLE rows (
    seq         INTEGER PRIMARY KEY,   -- 0-based row index in file order
    line        INTEGER NOT NULL,
    raw         TEXT NOT NULL,
    marketplace TEXT NOT NULL,         -- the job's default when the row names none
    asin        TEXT,                  -- NULL for a row that was invalid at ingestion
    resources   TEXT NOT NULL,         -- '' for the job's default, else a JSON array
    status      TEXT NOT NULL,         -- 'pending' until final
    reason      TEXT,                  -- why an invalid row is invalid
    extra       TEXT,                  -- pass-through columns as a JSON object
    done_order  INTEGER,               -- 1, 2, 3... in the order rows became final
    code        TEXT                   -- an invalid row's error code; NULL: InvalidAsin
);
CREATE UNIQUE INDEX rows_done ON rows (done_order) WHERE done_order IS NOT NULL;
CREATE TABLE lookups (
    id          INTEGER PRIMARY KEY,   -- order of first appearance in the file
    marketplace TEXT NOT NULL,
    asin        TEXT NOT NULL,
    resources   TEXT NOT NULL,
    status      TEXT,                  -- NULL while pending
    result      TEXT                   -- ItemResult.to_json() as JSON, NULL while pending
);
CREATE INDEX lookups_pending ON lookups (id) WHERE status IS NULL;
CREATE TABLE tally (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE sinks (
    name       TEXT PRIMARY KEY,
    offset     INTEGER NOT NULL,
    done_order INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Built once when ingestion ends, not row by row: inserting a million random ASINs into a
# B-tree a chunk at a time dirties most of its pages on every commit (tens of seconds of
# WAL writes for a 1M-row job), while one sorted build takes about a second.
_SCHEMA_LOOKUPS: Final = """
CREATE INDEX rows_waiting ON rows (marketplace, asin, resources) WHERE done_order IS NULL;
INSERT INTO lookups (marketplace, asin, resources)
    SELECT marketplace, asin, resources FROM rows WHERE done_order IS NULL
    GROUP BY marketplace, asin, resources ORDER BY MIN(seq);
CREATE UNIQUE INDEX lookups_key ON lookups (marketplace, asin, resources);
"""

_SCHEMA_KEEP: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE budget (
    key_name TEXT NOT NULL,
    day      TEXT NOT NULL,
    count    INTEGER NOT NULL,
    PRIMARY KEY (key_name, day)
) WITHOUT ROWID;
"""

_INSERT_ROW: Final = """
INSERT OR IGNORE INTO rows
    (seq, line, raw, marketplace, asin, resources, status, reason, extra, code)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# Invalid rows are final as soon as they are in: number them in file order.
_FINALISE_CHUNK: Final = """
UPDATE rows SET done_order = :base + t.rn
FROM (
    SELECT seq, row_number() OVER (ORDER BY seq) AS rn FROM rows
    WHERE seq >= :lo AND seq < :hi AND status = 'invalid' AND done_order IS NULL
) AS t
WHERE rows.seq = t.seq
"""
_FINISH_LOOKUP: Final = """
UPDATE rows SET status = :status, done_order = :base + t.rn
FROM (
    SELECT seq, row_number() OVER (ORDER BY seq) AS rn FROM rows
    WHERE marketplace = :marketplace AND asin = :asin AND resources = :resources
      AND done_order IS NULL
) AS t
WHERE rows.seq = t.seq
"""
_DONE_ROWS: Final = """
SELECT r.done_order, r.seq, r.line, r.raw, r.asin, r.marketplace, r.status, l.result,
       r.reason, r.extra, r.code
FROM rows AS r LEFT JOIN lookups AS l
    ON l.marketplace = r.marketplace AND l.asin = r.asin AND l.resources = r.resources
"""


class JobMismatchError(JobFileError):
    """The ledger belongs to another job: another job file, default marketplace or setting.

    Found when the ledger is opened, before anything is read or written. Resuming would mix
    two jobs' rows; start anew (``new_job=True``, ``--new-job``) or restore the original file.
    """


class OtherJobsOutputError(JobMismatchError):
    """The output (and its ledger) is another job file's: its rows are that job's, not
    this run's, and a message must not count them as this job's."""


class JobFileChangedError(JobMismatchError):
    """The job file is not the one the job started on: it changed since (grew, shrank, or
    was edited) while no run was reading it.

    Attributes:
        change: what changed, in words ("grew by 55 bytes (now 330 bytes)").
    """

    def __init__(self, message: str, *, change: str) -> None:
        super().__init__(message)
        self.change = change


class JobSettingsChangedError(JobMismatchError):
    """The job's file is the same, but the config's answer settings (default marketplace,
    protocol, resources, ...) are not those it started under: its rows would mix the two.

    Attributes:
        setting: the setting's name (``api.marketplace``, ``api.resources``, ...).
        then, now: its value when the job started, and in the config now.
    """

    def __init__(self, message: str, *, setting: str, then: str, now: str) -> None:
        super().__init__(message)
        self.setting, self.then, self.now = setting, then, now


@dataclass(frozen=True, slots=True)
class Lookup:
    """One unit of work: a distinct ``(marketplace, asin, resources)`` over the input rows.

    ``resources`` None means the job's default resources.
    """

    marketplace: str
    asin: str
    resources: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Counts:
    """How far a job is.

    Attributes:
        total: rows ingested so far (all rows once ingestion is complete).
        done: rows that are final (have an output row).
        pending: rows still waiting for their lookup.
        by_status: final rows per status (``ok``, ``not_found``, ``invalid``, ``failed``);
            only statuses with at least one row; sums to ``done``.
    """

    total: int
    done: int
    pending: int
    by_status: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SinkState:
    """How far one output is known good.

    Attributes:
        offset: bytes of the output file that are complete and fsynced (file sinks).
        done_order: every row with ``done_order`` up to this one is in the output.
    """

    offset: int = 0
    done_order: int = 0


@dataclass(frozen=True, slots=True)
class DoneRow:
    """A final input row with everything an output row needs.

    Attributes:
        done_order: the row's place in the order rows became final (1, 2, 3, ...).
        seq: the 0-based row index in the job file.
        line: the 1-based line number where the row starts.
        raw: the id as written in the file.
        asin: the normalised ASIN; None for a row that was invalid at ingestion.
        marketplace: the row's marketplace (the job's default when the row named none).
        status: ``ok``, ``not_found``, ``invalid`` or ``failed``.
        result: ``ItemResult.to_json()`` of the row's lookup; None for a row that was
            invalid at ingestion.
        error_reason: why the row was invalid at ingestion, else None.
        extra: pass-through columns of the input row, or None.
        error_code: the catalogue code of ``error_reason`` (``InvalidRow``, ``InvalidAsin``).
    """

    done_order: int
    seq: int
    line: int
    raw: str
    asin: str | None
    marketplace: str
    status: str
    result: Mapping[str, object] | None
    error_reason: str | None
    extra: Mapping[str, object] | None
    error_code: str = INVALID_ASIN


def read_tally(ledger: Path) -> dict[str, int] | None:
    """A job's rows by status (``pending`` among them), read-only from its ledger's
    ``tally`` table while another process may be writing it.

    Read from the side, it keeps the daemon's ``/metrics`` live without a callback into
    the runner, and gives the figures of a run that stopped on an error; a ledger not
    made yet (or busy) gives None.

    Read through a connection that may write (``query_only``: it writes nothing) where the
    file allows: closing the last connection of a WAL database then removes its ``-wal``
    and ``-shm`` files, which a read-only one makes and must leave (beside the output of a
    run that stopped on an error, in a spool's ``processing/``). A file this process may
    only read is read so.
    """
    rows = _read_aside(ledger, "SELECT status, n FROM tally")
    return None if rows is None else {str(status): int(n) for status, n in rows if n}


def _read_aside(ledger: Path, query: str) -> list[Any] | None:
    """The rows of ``query`` on ``ledger``, read without writing while another process may
    be writing it (see :func:`read_tally`); None when it cannot be read (not made yet,
    busy, not a ledger)."""
    uri = ledger.absolute().as_uri()
    for mode in ("rw", "ro"):
        try:
            conn = sqlite3.connect(f"{uri}?mode={mode}", uri=True, timeout=0.05)
            try:
                conn.execute("PRAGMA query_only = ON")
                return conn.execute(query).fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            continue
    return None


def check_not_other_jobs(
    ledger: Path, fingerprint: JobFingerprint, *, own: Sequence[Path] = ()
) -> None:
    """Refuse, as a plain run's opening of ``ledger`` does, a job file whose ``ledger`` (if
    there is one) was started for another job file still there: ``--refresh`` runs beside
    it and replaced that job's output unasked (two daily jobs of one name in different
    folders, sharing a default output, took turns). ``own``: job files that are this job's
    all the same (a ``-`` job's saved stdin, which new input on stdin replaces). Read-only;
    a ledger that cannot be read is left to the plain run's opening to judge.

    Raises:
        OtherJobsOutputError: the ledger is another job file's.
    """
    rows = _read_aside(
        ledger,
        "SELECT key, value FROM meta "
        "WHERE key IN ('job_path', 'job_size', 'job_sha256', 'job_content_sha256')",
    )
    if rows is None:
        return
    meta = dict(rows)
    stored = meta.get("job_path")
    if isinstance(stored, str) and os.path.abspath(stored) in {os.path.abspath(p) for p in own}:
        return
    if _recompressed(meta.get("job_content_sha256"), fingerprint):
        return
    if (meta.get("job_size"), meta.get("job_sha256")) != (fingerprint.size, fingerprint.sha256):
        _refuse_other_job(ledger, meta.get("job_path"), fingerprint)


def _recompressed(stored: object, fingerprint: JobFingerprint) -> bool:
    """True when the job's gzip file decompresses to the bytes the job started on
    (``stored``: their digest, kept since this version; None before)."""
    return fingerprint.content_sha256 is not None and stored == fingerprint.content_sha256


def _refuse_other_job(ledger: Path, stored: object, fingerprint: JobFingerprint) -> None:
    """Raise when ``stored``, the job file ``ledger`` was started for, is another file
    still there (two jobs of the same name in different folders share a default output)."""
    if not isinstance(stored, str):
        return
    with contextlib.suppress(OSError):
        if Path(stored).is_file() and not Path(stored).samefile(fingerprint.path):
            output = ledger.with_name(ledger.name.removesuffix(".ledger"))
            raise OtherJobsOutputError(
                f"{output} is the output of another job file, {stored}: give "
                f"{fingerprint.path} an output of its own with --out, or run with "
                "--new-job to replace that job's output."
            )


class Ledger:
    """The durable state of one job; see the module docstring.

    Use :meth:`open` to create or open one; close it (or use it as a context manager).
    """

    __slots__ = (
        "_closed",
        "_conn",
        "_default_marketplace",
        "_identity",
        "_lock",
        "_path",
        "_synchronous",
        "outputs_reset",
    )

    def __init__(
        self, conn: sqlite3.Connection, path: Path, default_marketplace: str, synchronous: str
    ) -> None:
        self._conn = conn
        self._closed = False
        self._path = path
        self._default_marketplace = default_marketplace
        self._synchronous = synchronous
        self._lock = _Guard(path)
        # The file it opened: a ledger deleted or replaced under the run is noticed at the
        # next commit instead of committing into an unlinked file (the job then could not
        # resume: its output has no ledger).
        self._identity: tuple[int, int] | None = None
        #: the outputs (sink names) whose recorded progress this open reset, begun by an
        #: older broker that wrote their cells otherwise: they are written again in full
        self.outputs_reset: tuple[str, ...] = ()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        fingerprint: JobFingerprint,
        default_marketplace: str,
        answer_settings: Mapping[str, str] | None = None,
        new_job: bool = False,
        synchronous: str = "FULL",
    ) -> Ledger:
        """Create the ledger at ``path``, or open the existing one for the same job.

        A new ledger file gets mode 0600 (its directory 0700 if we create it). An existing
        ledger is reused when the job file has the same content (size and SHA-256; the path
        and mtime may change, since a spool daemon renames files and a copy changes the
        mtime), the same default marketplace and the same ``answer_settings``.

        Args:
            path: the ledger file.
            fingerprint: the job file as it is now.
            default_marketplace: the marketplace of rows that name none.
            answer_settings: the other settings the rows depend on, by name: the
                config's (``api.protocol``, ``api.resources``), a job resumed under others
                would mix two kinds of item in one output; and the options the job file is
                read with, named as options (``--encoding``, ``--convert-isbn13``), fixed
                once the whole file is read with them (a run stopped while reading, say on
                a byte the encoding cannot decode, goes on with the new ones). A ledger
                started without them takes the ones given at its next opening, with a
                ``broker.job_settings_adopted`` warning when rows were answered already.
            new_job: start the job again: drop every row, result and sink state (the daily
                request counters are kept).
            synchronous: ``"FULL"`` (fsync every commit; the default) or ``"NORMAL"``
                (survives a crash of the process, not of the machine; for benchmarks).

        Raises:
            JobFileError: ``path`` exists but is not a ledger (it is left untouched), or its
                schema version is not ours.
            JobMismatchError: the ledger is for another job file, default marketplace or
                answer setting, and ``new_job`` is False.
            ValueError: ``synchronous`` is not FULL or NORMAL.
        """
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        path = Path(path)
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = False
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            created = True
        except FileExistsError:
            _check_sqlite_header(path)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            # A path SQLite cannot open (a full path over its 504 bytes): nothing was written.
            if created:
                path.unlink(missing_ok=True)
            failure = disk_error(path, exc)
            if failure is not None:
                raise failure from exc
            raise OSError(errno.EIO, f"{path}: cannot open the ledger ({exc})", str(path)) from exc
        try:
            ledger = cls(conn, path, default_marketplace, sync)
            ledger._identity = file_identity(path)
            ledger._setup(
                fingerprint, default_marketplace, dict(answer_settings or {}), new_job=new_job
            )
        except sqlite3.DatabaseError as exc:
            conn.close()
            damage = _file_failure(path, exc)
            if damage is not None:
                raise damage from exc
            raise _unusable(path, f"cannot be read as a job ledger ({exc})") from exc
        except BaseException:
            conn.close()
            raise
        return ledger

    def _setup(
        self,
        fingerprint: JobFingerprint,
        default_marketplace: str,
        settings: dict[str, str],
        *,
        new_job: bool,
    ) -> None:
        conn = self._conn
        # Read before writing anything: a SQLite file that is not a ledger must stay untouched.
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
        fresh = not tables
        if not fresh:
            self._check_ours(tables)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        # A bigger page cache than the 2 MB default keeps ingestion of big jobs fast.
        conn.execute("PRAGMA cache_size = -16384")
        if fresh:
            with immediate(self._conn):
                _run_script(conn, _SCHEMA_KEEP)
                _run_script(conn, _SCHEMA_JOB)
                self._set_meta("application", _APPLICATION)
                self._set_meta("schema_version", SCHEMA_VERSION)
                self._start_job(fingerprint, default_marketplace, settings)
            return
        columns = {row[1] for row in conn.execute("PRAGMA table_info(rows)")}
        if "code" not in columns:
            # A ledger of a broker before 2026-12-05: its invalid rows read as InvalidAsin.
            with immediate(self._conn):
                conn.execute("ALTER TABLE rows ADD COLUMN code TEXT")
        if new_job:
            with immediate(self._conn):
                for table in _JOB_TABLES:
                    conn.execute(f"DROP TABLE {table}")
                _run_script(conn, _SCHEMA_JOB)
                self._start_job(fingerprint, default_marketplace, settings)
                self._set_meta("schema_version", SCHEMA_VERSION)
            return
        self._check_same_job(fingerprint, default_marketplace, settings)
        # The content is the same; remember where and when it is now. Marked as this
        # version's (an older one's is migrated above) only now: a ledger opened for another
        # job by mistake stays readable by the broker that began it.
        adopted = {
            name: value
            for name, value in settings.items()
            if not name.startswith("--") and self._meta(_SETTING + name) is None
        }
        # Invalid rows are final at ingestion and asked nothing: only answered rows count.
        if adopted and any(status != "invalid" for status in self.counts().by_status):
            # A job begun before its settings were recorded: what its done rows were asked
            # under cannot be checked, so the user is told rather than left to find rows of
            # two kinds in one output.
            logger.warning(
                "broker.job_settings_adopted",
                ledger=str(self._path),
                settings=adopted,
                note="this job began under a broker that did not record these settings; its "
                "rows done so far were fetched under that run's, which this one cannot check: "
                "if they differed, --refresh fetches every row under these",
            )
        with immediate(self._conn):
            self._reset_older_outputs()
            self._set_meta("schema_version", SCHEMA_VERSION)
            self._set_meta("job_path", _text(str(fingerprint.path)))
            self._set_meta("job_mtime_ns", fingerprint.mtime_ns)
            reading = not self._meta_int("ingest_complete")
            for name, value in settings.items():
                # Settings a ledger started without (an older broker) are the ones now, and
                # so are the options of a file still being read.
                if self._meta(_SETTING + name) is None or (reading and name.startswith("--")):
                    self._set_meta(_SETTING + name, value)

    def _reset_older_outputs(self) -> None:
        """A CSV output an older broker began (schema before 3, formula-like cells written
        as they came) is written again in full: resumed, its rows would carry two encodings
        of one cell, the older ones live formulas. Reset in the transaction that marks the
        ledger as this version's, so a run stopped before the rewrite still does it."""
        version = self._meta("schema_version")
        if not isinstance(version, int) or version >= _CSV_CELLS_SINCE:
            return
        names = [
            name
            for (name,) in self._conn.execute(
                "SELECT name FROM sinks WHERE name LIKE '%.csv' AND done_order > 0"
            )
        ]
        for name in names:
            self._conn.execute("DELETE FROM sinks WHERE name = ?", (name,))
            self._conn.execute("DELETE FROM meta WHERE key = ?", (_ORDERED + name,))
        self.outputs_reset = tuple(names)

    def _check_ours(self, tables: set[str]) -> None:
        found = None
        if "meta" in tables:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'application'").fetchone()
            found = row[0] if row else None
        if found != _APPLICATION:
            raise JobFileError(
                f"{self._path}: is a SQLite database but not an asin-broker job ledger; "
                "it was left untouched. Choose another output path or move the file away."
            )
        version = self._meta("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise JobFileError(
                f"{self._path}: job ledger schema version {version}, written by a newer broker "
                f"(this one reads versions up to {SCHEMA_VERSION}); it was left untouched. "
                "Finish the job with that broker, or move the output and its ledger away "
                "to start the job over with this one."
            )
        if version not in _READABLE_VERSIONS:
            raise JobFileError(
                f"{self._path}: job ledger schema version {version}, which this broker does "
                f"not read (it reads {', '.join(map(str, _READABLE_VERSIONS))}); it was left "
                "untouched. Move the output and its ledger away to start the job over."
            )

    def _start_job(
        self, fingerprint: JobFingerprint, default_marketplace: str, settings: dict[str, str]
    ) -> None:
        self._set_meta("job_path", _text(str(fingerprint.path)))
        self._set_meta("job_size", fingerprint.size)
        self._set_meta("job_mtime_ns", fingerprint.mtime_ns)
        self._set_meta("job_sha256", fingerprint.sha256)
        self._set_meta("job_content_sha256", fingerprint.content_sha256)
        self._set_meta("default_marketplace", default_marketplace)
        self._conn.execute("DELETE FROM meta WHERE key LIKE ?", (_SETTING + "%",))
        self._conn.execute("DELETE FROM meta WHERE key LIKE ?", (_ORDERED + "%",))
        for name, value in settings.items():
            self._set_meta(_SETTING + name, value)
        self._set_meta("ingested_rows", 0)
        self._set_meta("ingest_complete", 0)
        self._set_meta("last_done_order", 0)

    def _check_same_job(
        self, fingerprint: JobFingerprint, default_marketplace: str, settings: dict[str, str]
    ) -> None:
        size, sha256 = self._meta("job_size"), self._meta("job_sha256")
        if (size, sha256) == (fingerprint.size, fingerprint.sha256):
            if fingerprint.content_sha256 is not None and self._meta("job_content_sha256") is None:
                # A job an older broker started: the same bytes, so their content is the
                # job's, and a gzip compressed again later is known for the same rows.
                self._set_meta("job_content_sha256", fingerprint.content_sha256)
        elif _recompressed(self._meta("job_content_sha256"), fingerprint):
            # The same rows compressed again (a producer's cron re-gzips its list, and
            # gzip's header holds a time): the job goes on, under the new file's bytes.
            self._set_meta("job_size", fingerprint.size)
            self._set_meta("job_mtime_ns", fingerprint.mtime_ns)
            self._set_meta("job_sha256", fingerprint.sha256)
        else:
            _refuse_other_job(self._path, self._meta("job_path"), fingerprint)
            change = _what_changed(self._meta_int("job_size"), fingerprint.size)
            raise JobFileChangedError(
                f"{fingerprint.path} {change} since this job started: run with --new-job to "
                "start over on the new file, --refresh to fetch it beside this output, or "
                "restore the original to resume.",
                change=change,
            )
        stored = self._meta("default_marketplace")
        if stored != default_marketplace:
            raise JobSettingsChangedError(
                f"{self._path}: this job started with default marketplace {stored}, and the "
                f"configuration now says {default_marketplace}; rows already resolved would "
                "mix marketplaces. Restore the setting to resume, run with --new-job to start "
                "over, or with --refresh to fetch the job again under the new setting.",
                setting="api.marketplace",
                then=str(stored),
                now=default_marketplace,
            )
        for name, value in settings.items():
            then = self._meta(_SETTING + name)
            if then is None or then == value:
                continue
            if name.startswith("--"):
                if not self._meta_int("ingest_complete"):
                    continue  # the rest of the file is read with the new one (see open)
                raise JobMismatchError(
                    f"{self._path}: this job's file was read with {name} {then}, and this run "
                    f"has {name} {value}; the rows would not be what the file reads as now. "
                    "Run with the options it was read with to resume, with --new-job to start "
                    "over, or with --refresh to read a finished job again."
                )
            raise JobSettingsChangedError(
                f"{self._path}: this job started with {name} = {then}, and the "
                f"configuration now says {value}; rows already resolved would mix the two "
                "in one output. Restore the setting to resume, run with --new-job to start "
                "over, or with --refresh to fetch a finished job again.",
                setting=name,
                then=str(then),
                now=value,
            )

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    def close(self) -> None:
        """Close the database, its write-ahead log copied into the file first (a second
        close does nothing).

        Committed state is already durable; the copy makes the file alone the ledger, as a
        completed ``--refresh`` is moved into place (without its ``-wal``). SQLite's own copy
        at close fails silently (a full disk), which left such a ledger damaged. A reader
        elsewhere (a sqlite3 shell, ``broker status``) that keeps pages in the log is no
        error here, and not waited for: the ledger is whole with its log where it is, and a
        refresh whose ledger is not so whole is refused where it would be moved.

        Raises:
            OSError: a full or failing disk kept the log from being copied: the ledger is
                closed all the same, and whole with its ``-wal``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                checkpoint_unless_read(self._conn, self._path)
            finally:
                self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # The error that ended the block is the one to tell: a log the close could not copy
        # stays beside the ledger, whole with it, where a rerun finds it.
        with contextlib.suppress(OSError, sqlite3.Error):
            self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self._path)!r})"

    # -- ingestion -------------------------------------------------------------------------

    @property
    def ingest_complete(self) -> bool:
        """True once every row of the job file is in the ledger."""
        with self._lock:
            return bool(self._meta_int("ingest_complete"))

    @property
    def total_rows(self) -> int:
        """Rows ingested so far (every row of the file once :attr:`ingest_complete`)."""
        with self._lock:
            return self._meta_int("ingested_rows")

    @property
    def stored_through_line(self) -> int:
        """The line of the last row ingestion stored (0: none): a resumed read goes on after
        it, reading the lines up to it only for the file's structure (see :meth:`ingest`)."""
        with self._lock:
            return self._stored_through_line(self._meta_int("ingested_rows"))

    def _stored_through_line(self, stored: int) -> int:
        if not stored:
            return 0
        row = self._conn.execute("SELECT line FROM rows WHERE seq = ?", (stored - 1,)).fetchone()
        if row is None:
            raise JobFileError(f"{self._path}: the ledger is damaged: row {stored - 1} is missing")
        return int(row[0])

    def ingest(
        self,
        rows: Iterable[JobRow],
        *,
        chunk: int = 5000,
        unchanged: Callable[[], None] | None = None,
    ) -> int:
        """Store the job file's rows; idempotent and resumable.

        Row ``seq`` is its index in the job. Each chunk is one transaction that also records
        how many rows are in, so after a crash mid-ingest the next call skips (reads past,
        without writing) the rows up to the last stored one's line (:attr:`stored_through_line`)
        and continues. By line, not by count: a run stopped by a byte its encoding could not
        decode goes on under another ``--encoding``, which may read a line before the stop
        as a row or as blank otherwise than the first did (a no-break space is blank in
        UTF-8, a character in cp1252), so counting rows re-stored or skipped some. Once
        complete, further calls return at once without reading ``rows``.

        Invalid rows (``row.error`` set or no ``asin``) are final at once: status
        ``invalid`` with the reason, and a ``done_order`` so the outputs carry them.

        Args:
            rows: the job file's rows in file order (:func:`broker.jobs.sources.read_job`).
            chunk: rows per transaction.
            unchanged: called after each chunk is read and before it is stored; raises
                (:class:`JobFileError`) when the file changed since the job started, so a
                row read after a change is never stored.

        Returns:
            The number of rows in the job.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, not {chunk}")
        with self._lock:
            if self._meta_int("ingest_complete"):
                return self._meta_int("ingested_rows")
            seq = self._meta_int("ingested_rows")
            through = self._stored_through_line(seq)
        stream: Iterator[JobRow] = iter(rows)
        if seq:
            # A file shorter than that line is refused by the reader (read_job's
            # stored_through_line), and one changed since by the job's fingerprint: the
            # line's own row may read as blank under another encoding, so none is required.
            for row in stream:
                if row.line > through:
                    stream = chain((row,), stream)
                    break
        # Chunks need not be durable one by one: each records how far ingestion got in the
        # same transaction, so losing the last few to a power cut only means re-reading
        # them. The final commit runs at the configured level and makes all of them durable.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        try:
            while True:
                batch: list[JobRow] = []
                failure: JobFileError | None = None
                try:
                    batch.extend(islice(stream, chunk))
                except JobFileError as exc:
                    # The rows read before a file error (a truncated .gz) are stored too,
                    # so they are kept and counted, and a rerun reads past them.
                    failure = exc
                if batch:
                    if unchanged is not None:
                        unchanged()
                    with self._lock:
                        self._ingest_chunk(seq, batch)
                    seq += len(batch)
                if failure is not None:
                    raise failure
                if len(batch) < chunk:
                    break
        finally:
            self._conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        with self._lock, immediate(self._conn):
            _run_script(self._conn, _SCHEMA_LOOKUPS)
            self._set_meta("ingest_complete", 1)
        return seq

    def _ingest_chunk(self, first: int, batch: list[JobRow]) -> None:
        default = self._default_marketplace
        values: list[tuple[object, ...]] = []
        for seq, row in enumerate(batch, first):
            extra = _dumps(dict(row.extra)) if row.extra else None
            marketplace = canonical_marketplace(row.marketplace) if row.marketplace else default
            resources = _encode_resources(row.resources)
            if row.error is None and row.asin is not None:
                asin, status, reason, code = row.asin, "pending", None, None
            else:
                asin, status, code = None, "invalid", row.code
                reason = row.error or "the row has no ASIN"
            values.append(
                (seq, row.line, row.raw, marketplace, asin, resources, status, reason, extra, code)
            )
        end = first + len(batch)
        with immediate(self._conn):
            conn = self._conn
            conn.executemany(_INSERT_ROW, values)
            base = self._meta_int("last_done_order")
            finished = conn.execute(_FINALISE_CHUNK, {"base": base, "lo": first, "hi": end})
            self._set_meta("last_done_order", base + finished.rowcount)
            for status, n in conn.execute(
                "SELECT status, COUNT(*) FROM rows WHERE seq >= ? AND seq < ? GROUP BY status",
                (first, end),
            ):
                self._add_tally(status, n)
            self._set_meta("ingested_rows", end)
            crash_point("mid_ingest")

    # -- work ------------------------------------------------------------------------------

    def pending_lookups(self, marketplace: str | None = None) -> Iterator[Lookup]:
        """Yield each distinct lookup (of ``marketplace``, if given) that has no result yet,
        in order of first appearance.

        Empty until :attr:`ingest_complete` (the lookups are built when ingestion ends).

        Paged with short statements, so results may be recorded while iterating: a lookup
        that got its result before the iteration reached it is skipped.
        """
        after = 0
        sql = _PENDING_SQL if marketplace is None else _PENDING_IN_SQL
        market = () if marketplace is None else (marketplace,)
        while True:
            with self._lock:
                page = self._conn.execute(sql, (after, *market, _PAGE)).fetchall()
            if not page:
                return
            for _ident, market_of, asin, resources in page:
                yield Lookup(market_of, asin, _decode_resources(resources))
            after = page[-1][0]

    def extra_names(self) -> tuple[str, ...]:
        """The pass-through names of every row ingested, in order of first appearance.

        A CSV output takes its columns from them before its first row is written, so a row
        without them (a malformed JSON line) written first costs no other row its cells.
        One scan of the rows (about half a second per million).
        """
        with self._lock:
            # With MIN() as the only aggregate, SQLite takes the bare column j.id (a name's
            # place within its object, in document order) from the row holding the minimum:
            # names order by the first row that has them, then by their place in it.
            names = self._conn.execute(
                "SELECT j.key, MIN(r.seq) AS first, j.id AS place "
                "FROM rows r, json_each(r.extra) j WHERE r.extra IS NOT NULL "
                "GROUP BY j.key ORDER BY first, place"
            ).fetchall()
        return tuple(str(name) for name, _, _ in names)

    def pending_by_marketplace(self) -> dict[str, int]:
        """How many lookups without a result yet each marketplace has (one scan of them:
        about a second for 3 million, so a caller on an event loop runs it in a thread)."""
        with self._lock:
            found = self._conn.execute(_PENDING_BY_MARKET_SQL).fetchall()
        return {str(market): int(count) for market, count in found}

    def pending_lookup_count(self) -> int:
        """How many distinct lookups have no result yet."""
        with self._lock:
            (count,) = self._conn.execute(
                "SELECT COUNT(*) FROM lookups WHERE status IS NULL"
            ).fetchone()
        return int(count)

    def _check_in_place(self) -> None:
        """Raise if the ledger's file is no longer at its path (deleted, moved, replaced)."""
        if self._identity is not None and not still_at(self._path, self._identity):
            raise OSError(
                errno.ENOENT,
                f"{self._path} (the job's ledger) was moved, deleted or replaced while this "
                "run used it: if it moved with the output, run again naming the output where "
                "it is now; if it is gone, the job cannot resume: move the output away and "
                "run again to start the job afresh",
                str(self._path),
            )

    def record_results(self, results: Sequence[tuple[Lookup, ItemResult]]) -> int:
        """Store results and make every row of their lookups final, in one transaction.

        Each lookup keeps the first result recorded for it; a later one (an at-least-once
        repeat) is ignored. Every row of the lookup gets the lookup's status and the next
        ``done_order`` numbers, in file order.

        Returns:
            How many rows became final.

        Raises:
            ValueError: a lookup is not in this ledger, or ingestion is not complete
                (nothing is recorded).
            OSError: the ledger's file was deleted or replaced since it was opened.
        """
        self._check_in_place()
        completed = 0
        with self._lock, immediate(self._conn):
            conn = self._conn
            base = self._meta_int("last_done_order")
            per_status: dict[str, int] = {}
            for lookup, result in results:
                resources = _encode_resources(lookup.resources)
                found = conn.execute(
                    "SELECT id, status FROM lookups "
                    "WHERE marketplace = ? AND asin = ? AND resources = ?",
                    (lookup.marketplace, lookup.asin, resources),
                ).fetchone()
                if found is None:
                    raise ValueError(
                        f"{lookup} is not a lookup of this job (lookups exist once ingestion "
                        "is complete)"
                    )
                ident, stored = found
                if stored is not None:
                    continue
                status = result.status.value
                conn.execute(
                    "UPDATE lookups SET status = ?, result = ? WHERE id = ?",
                    (status, _dumps(result.to_json()), ident),
                )
                n = conn.execute(
                    _FINISH_LOOKUP,
                    {
                        "status": status,
                        "base": base,
                        "marketplace": lookup.marketplace,
                        "asin": lookup.asin,
                        "resources": resources,
                    },
                ).rowcount
                base += n
                completed += n
                per_status[status] = per_status.get(status, 0) + n
            for status, n in per_status.items():
                self._add_tally(status, n)
                self._add_tally("pending", -n)
            self._set_meta("last_done_order", base)
            crash_point("mid_commit")
        return completed

    def counts(self) -> Counts:
        """Return the row counts (kept up to date in every transaction; no table scan)."""
        with self._lock:
            tally = dict(self._conn.execute("SELECT status, n FROM tally").fetchall())
        pending = int(tally.pop("pending", 0))
        by_status = {status: int(n) for status, n in sorted(tally.items()) if n}
        done = sum(by_status.values())
        return Counts(total=done + pending, done=done, pending=pending, by_status=by_status)

    # -- sinks -----------------------------------------------------------------------------

    def sink_state(self, name: str) -> SinkState:
        """Return how far the output ``name`` is known good; ``SinkState(0, 0)`` when new."""
        with self._lock:
            row = self._conn.execute(
                "SELECT offset, done_order FROM sinks WHERE name = ?", (name,)
            ).fetchone()
        return SinkState(int(row[0]), int(row[1])) if row else SinkState()

    def set_sink_state(self, name: str, state: SinkState, *, ordered: bool = False) -> None:
        """Record how far the output ``name`` is known good (after the sink has flushed);
        ``ordered``: its rows are in input order (a ``--ordered`` export wrote it).

        A state below the recorded one (the output cut or deleted, or started over in
        another format) forgets that the output was ordered: its rows are written again in
        the order they were done, and may well end at the very state the export left (the
        same rows, the same bytes), which read as still ordered, so --ordered never ordered
        it again.
        """
        with self._lock, immediate(self._conn):
            recorded = self.sink_state(name)
            if not ordered and (
                state.offset < recorded.offset or state.done_order < recorded.done_order
            ):
                self._conn.execute("DELETE FROM meta WHERE key = ?", (_ORDERED + name,))
            self._conn.execute(
                "INSERT INTO sinks (name, offset, done_order) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET offset = excluded.offset, "
                "done_order = excluded.done_order",
                (name, state.offset, state.done_order),
            )
            if ordered:
                self._set_meta(_ORDERED + name, _ordered_mark(state))

    def is_ordered(self, name: str) -> bool:
        """True when the output ``name`` is as a ``--ordered`` export left it: any row
        written since (a resumed run, rows re-emitted after a cut) moved its recorded state."""
        state = self.sink_state(name)
        with self._lock:
            ordered = self._meta(_ORDERED + name)
        return ordered == _ordered_mark(state)

    def last_output_row(self, name: str) -> DoneRow | None:
        """The row the output ``name`` ends with as recorded: the last in file order for an
        output a ``--ordered`` export left, else the one of its recorded ``done_order``
        (``None`` before any row)."""
        state = self.sink_state(name)
        if not state.done_order:
            return None
        if self.is_ordered(name):
            query = f"{_DONE_ROWS} WHERE r.done_order IS NOT NULL ORDER BY r.seq DESC LIMIT 1"
            with self._lock:
                found = self._conn.execute(query).fetchone()
            return None if found is None else _done_row(found)
        rows = self.done_rows_after(state.done_order - 1, limit=1)
        return rows[0] if rows and rows[0].done_order == state.done_order else None

    def done_rows_after(self, done_order: int, *, limit: int = 1000) -> list[DoneRow]:
        """Return up to ``limit`` final rows with ``done_order`` above ``done_order``, in order."""
        with self._lock:
            found = self._conn.execute(
                f"{_DONE_ROWS} WHERE r.done_order > ? ORDER BY r.done_order LIMIT ?",
                (done_order, limit),
            ).fetchall()
        return [_done_row(values) for values in found]

    def invalid_rows(self) -> Iterator[DoneRow]:
        """Yield every final row with status ``invalid``, in file order (paged).

        These are the rows invalid at ingestion (``error_reason`` set) and the ids Amazon
        rejected as invalid (the reason is in ``result["error"]``).
        """
        after = -1
        while True:
            with self._lock:
                page = self._conn.execute(
                    f"{_DONE_ROWS} WHERE r.seq > ? AND r.status = 'invalid' ORDER BY r.seq LIMIT ?",
                    (after, _PAGE),
                ).fetchall()
            if not page:
                return
            for values in page:
                yield _done_row(values)
            after = page[-1][1]

    def done_rows_in_file_order(self) -> Iterator[DoneRow]:
        """Yield every final row in file order (paged; for ``--ordered`` outputs)."""
        after = -1
        while True:
            with self._lock:
                page = self._conn.execute(
                    f"{_DONE_ROWS} WHERE r.seq > ? AND r.done_order IS NOT NULL "
                    "ORDER BY r.seq LIMIT ?",
                    (after, _PAGE),
                ).fetchall()
            if not page:
                return
            for values in page:
                yield _done_row(values)
            after = page[-1][1]

    def fetched_range(self) -> tuple[str, str] | None:
        """The earliest and latest ``fetched_at`` of the job's results (ISO UTC), if any."""
        with self._lock:
            row = self._conn.execute(
                "SELECT MIN(f), MAX(f) FROM (SELECT json_extract(result, '$.fetched_at') AS f "
                "FROM lookups WHERE result IS NOT NULL) WHERE f IS NOT NULL"
            ).fetchone()
        if row is None or row[0] is None:
            return None
        return str(row[0]), str(row[1])

    def failure_causes(self) -> list[tuple[str, str, int]]:
        """The failed rows by error code and marketplace, most first: ``(code, marketplace,
        rows)``. A table scan: asked only when a run ends with failed rows."""
        with self._lock:
            found = self._conn.execute(
                "SELECT coalesce(json_extract(l.result, '$.error.code'), '?'), r.marketplace, "
                "COUNT(*) FROM rows r JOIN lookups l ON l.marketplace = r.marketplace "
                "AND l.asin = r.asin AND l.resources = r.resources WHERE r.status = 'failed' "
                "GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2"
            ).fetchall()
        return [(str(code), str(market), int(n)) for code, market, n in found]

    # -- daily budget (the engine's BudgetStore) --------------------------------------------

    def load(self, key_name: str, day: date | str) -> int:
        """Return the request count saved for ``key_name`` on ``day`` (UTC), or 0."""
        with self._lock:
            row = self._conn.execute(
                "SELECT count FROM budget WHERE key_name = ? AND day = ?",
                (key_name, _day(day)),
            ).fetchone()
        return int(row[0]) if row else 0

    def save(self, key_name: str, day: date | str, count: int) -> None:
        """Record the request count for ``key_name`` on ``day``; the latest call wins."""
        with self._lock, immediate(self._conn):
            self._conn.execute(
                "INSERT INTO budget (key_name, day, count) VALUES (?, ?, ?) "
                "ON CONFLICT (key_name, day) DO UPDATE SET count = excluded.count",
                (key_name, _day(day), count),
            )

    # -- helpers ---------------------------------------------------------------------------

    def _meta(self, key: str) -> object:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _meta_int(self, key: str) -> int:
        value = self._meta(key)
        if not isinstance(value, int):
            raise JobFileError(f"{self._path}: the ledger is damaged: meta {key} is {value!r}")
        return value

    def _set_meta(self, key: str, value: object) -> None:
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _add_tally(self, status: str, n: int) -> None:
        self._conn.execute(
            "INSERT INTO tally (status, n) VALUES (?, ?) "
            "ON CONFLICT (status) DO UPDATE SET n = n + excluded.n",
            (status, n),
        )


#: The environment variable of the test-only crash hook (see :func:`crash_point`).
CRASH_ENV: Final = "ASINB_CRASH_AT"
#: The named points of the crash hook, in the order a job first reaches them.
CRASH_POINTS: Final = ("mid_ingest", "mid_write", "after_flush", "mid_commit", "after_commit")
_crash_hits: collections.Counter[str] = collections.Counter()


def _ordered_mark(state: SinkState) -> str:
    """How the meta table keeps the output state a ``--ordered`` export left."""
    return f"{state.offset}:{state.done_order}"


def _what_changed(before: int, now: int) -> str:
    """What happened to the job file, in a few words (never hashes or timestamps)."""
    if now > before:
        return f"grew by {_size(now - before)} (now {_size(now)})"
    if now < before:
        return f"shrank by {_size(before - now)} (now {_size(now)})"
    return f"was edited (same size, {_size(now)}, different content)"


def _size(n: int) -> str:
    if n == 1:
        return "1 byte"
    if n < 10_000:
        return f"{n} bytes"
    if n < 10_000_000:
        return f"{n / 1000:.0f} kB"
    return f"{n / 1_000_000:.0f} MB"


def canonical_marketplace(name: str) -> str:
    """``name`` as the canonical marketplace (``UK`` -> ``www.amazon.co.uk``), else unchanged.

    A row names its marketplace as config.toml does (name, domain or country code, any
    case); rows for one store then share their lookups. An unknown name is kept as written,
    so the run can report the row ``invalid`` quoting it.
    """
    try:
        return lookup_marketplace(name).name
    except ValueError:
        return name.strip()


def crash_point(name: str, before: Callable[[], object] | None = None) -> None:
    """Test-only fault hook: signal this process at a named point of a job (reliability.md A1).

    Inert unless the environment variable ``ASINB_CRASH_AT`` is ``<point>[:<n>[:<signal>]]``
    naming this point: then the ``n``-th time (default the first) the process reaches it,
    one line naming the point goes to stderr and the process sends itself ``<signal>``
    (default ``KILL``; ``TERM`` tests a stop at that moment). Before a ``KILL``, ``before``
    runs: it may leave a torn write behind, as a kill inside ``write()`` does (a process
    that lives on must not leave one). Crash tests use it to hit moments a timed
    ``kill -9`` rarely lands on: a transaction open in the ledger (``mid_ingest``,
    ``mid_commit``), results committed but not written out (``after_commit``), a record half
    written (``mid_write``), and output flushed but its progress not recorded
    (``after_flush``).
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    count, _, signame = rest.partition(":")
    _crash_hits[name] += 1
    hit = _crash_hits[name]
    if hit != int(count or 1):
        return
    sig = signal.Signals[f"SIG{signame or 'KILL'}"]
    if before is not None and sig is signal.SIGKILL:
        before()
    os.write(2, f"asin-broker: crash point {name} #{hit}: sending {sig.name}\n".encode())
    os.kill(os.getpid(), sig)


class _Guard:
    """The ledger's lock, held around its statements: whichever statement finds the file
    full, failing or damaged, the error says so and names it (exit 74 or 65), not a bare
    ``sqlite3`` error, which read as a bug (a page damaged inside is found only when a
    statement reads it, after the run sent its requests). The one place that maps them, but
    for the statements :meth:`Ledger.open` runs before, which it maps itself."""

    __slots__ = ("_lock", "_path")

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self._path = path

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._lock.release()
        if isinstance(exc, sqlite3.Error):
            failure = _file_failure(self._path, exc)
            if failure is not None:
                raise failure from exc


def _file_failure(path: Path, exc: sqlite3.Error) -> Exception | None:
    """What a SQLite error says about the ledger file itself: full, failing or read-only
    (:func:`~broker.sqlitewal.disk_error`), held by another program in a transaction (a
    sqlite3 shell: :func:`~broker.sqlitewal.held_error`, exit 74, as for a SQLite output;
    it was an internal error mid-run, and "cannot be read as a job ledger, move the file
    away" at the start), or damaged; None for any other."""
    failure = disk_error(path, exc) or held_error(path, exc)
    if failure is not None:
        return failure
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
    ):
        return _unusable(path, f"the job ledger is damaged ({exc})")
    return None


def _unusable(path: Path, what: str) -> JobFileError:
    return JobFileError(
        f"{path}: {what}; it was left untouched. Choose another output path or move the file away."
    )


def _check_sqlite_header(path: Path) -> None:
    """Refuse an existing file that is neither empty nor a SQLite database (A9)."""
    with open(path, "rb") as stream:
        head = stream.read(len(_SQLITE_MAGIC))
    # An empty file is what a crash between creating the file and the first commit leaves.
    if head and head != _SQLITE_MAGIC:
        raise JobFileError(
            f"{path}: is not a job ledger (not a SQLite database); it was left untouched. "
            "Choose another output path or move the file away."
        )


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits the open transaction first, and the schema must be
    # created in the same transaction as the metadata that says it exists.
    for statement in script.split(";\n"):
        if statement.strip():
            conn.execute(statement)


# The row tuple comes from sqlite3 untyped; the schema fixes each column's type.
def _done_row(values: tuple[Any, ...]) -> DoneRow:
    done_order, seq, line, raw, asin, marketplace, status, result, reason, extra, code = values
    return DoneRow(
        done_order=done_order,
        seq=seq,
        line=line,
        raw=raw,
        asin=asin,
        marketplace=marketplace,
        status=status,
        # The engine's answer, read back fast (it came from Amazon's JSON, read so too);
        # the input's extra columns are the user's own values, read exactly.
        result=None if result is None else cast("Mapping[str, object]", loads(result)),
        error_reason=reason,
        extra=None if extra is None else json.loads(extra),
        error_code=code or INVALID_ASIN,
    )


def _encode_resources(resources: tuple[str, ...] | None) -> str:
    # '' (not NULL) for "the default", so the UNIQUE index and plain '=' compare it.
    return "" if resources is None else _dumps(list(resources))


def _decode_resources(text: str) -> tuple[str, ...] | None:
    return None if text == "" else tuple(json.loads(text))


def _day(day: date | str) -> str:
    return day.isoformat() if isinstance(day, date) else day


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: object) -> str:
    return _text(dumps(value, default=_jsonable))


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(text: str) -> str:
    """``text`` with lone surrogates as U+FFFD: SQLite stores UTF-8, which cannot hold them.

    They come from Amazon's JSON (an emoji cut in half, ``"\\ud83d"``) and from file names
    that are not UTF-8 (``os.fsdecode`` keeps such bytes as surrogates).
    """
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)
