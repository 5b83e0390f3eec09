"""Output sinks: write the ledger's final rows to JSONL, CSV or SQLite so each lands exactly once.

Every sink is derived from the ledger (``reliability.md`` 2.3): the runner feeds it rows in
``done_order``, calls :meth:`ResultSink.flush` (which makes them durable and returns the new
:class:`~broker.jobs.ledger.SinkState`), then records that state in the ledger. After a crash
at any point the next run opens the sink with the recorded state and re-emits everything
after it.

Resume scheme of the file sinks (JSONL, CSV). ``SinkState`` is ``(offset, done_order)``: the
first ``offset`` bytes are complete, fsynced rows, and they are exactly the rows with
``done_order`` 1..``done_order`` (the ledger numbers final rows 1, 2, 3... without gaps, and
a sink refuses rows out of that sequence). On open:

- a file at least ``offset`` long is cut back to ``offset``, which drops a torn or
  unrecorded tail (A5), and writing resumes after ``done_order``;
- a file *shorter* than ``offset`` (cut by hand, or deleted) is cut back to its last
  complete record, and since record *k* of the file is ``done_order`` *k*, counting the
  complete records gives the ``done_order`` to resume after. ``open`` returns that state:
  the caller re-emits from it (and should record it);
- ``offset`` 0 means a fresh output: the file is emptied (CSV: the header is rewritten).

So the final file holds every row exactly once, in ``done_order``. A failed write or fsync
(disk full, A7) raises ``OSError``, and the sink then refuses further use; its state never
moves past what was fsynced, and the next run cuts the partial tail off.

The SQLite sink upserts by ``seq`` and keeps its own state in the same transaction as the
rows, so it needs no byte offsets (``offset`` is always 0).
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol

from broker.errors import JobFileError, describe
from broker.jobs.ledger import DoneRow, SinkState, crash_point
from broker.jsontext import dumps, loads
from broker.logs import get_logger
from broker.sqlitewal import (
    checkpoint_unless_read,
    disk_error,
    enable_wal,
    file_identity,
    held_error,
    still_at,
)
from broker.wholefile import give_attributes

if TYPE_CHECKING:
    from broker.jobs.ledger import Ledger

__all__ = [
    "CSV_COLUMNS",
    "SINK_FORMATS",
    "SQLITE_RESULTS",
    "CsvSink",
    "InvalidReport",
    "JsonlSink",
    "ResultSink",
    "SqliteSink",
    "create_like",
    "json_lines",
    "open_sink",
    "output_row",
]

logger = get_logger("broker")

#: The CSV output's own columns. The input's pass-through columns (``extra``) follow them
#: (see :class:`CsvSink`); the raw ``item`` is not in CSV (use JSONL or SQLite for it).
CSV_COLUMNS: Final = (
    "line",
    "input",
    "asin",
    "marketplace",
    "status",
    "title",
    "price",
    "currency",
    "availability",
    "detail_url",
    "image_url",
    "error_code",
    "error_message",
    "attempts",
    "key",
    "fetched_at",
    "cached",
)

#: The output formats :func:`open_sink` accepts.
SINK_FORMATS: Final = ("jsonl", "csv", "sqlite")
#: The SQLite output's table (the job ledger's schema version names it, as CSV_COLUMNS).
SQLITE_RESULTS: Final = (
    "CREATE TABLE IF NOT EXISTS results (seq INTEGER PRIMARY KEY, line INTEGER, "
    "input TEXT, asin TEXT, marketplace TEXT, status TEXT, title TEXT, price REAL, "
    "currency TEXT, availability TEXT, detail_url TEXT, image_url TEXT, "
    "error_code TEXT, error_message TEXT, attempts INTEGER, key TEXT, fetched_at TEXT, "
    "cached INTEGER, row_json TEXT)"
)

# Output is the user's product data, not a credential: the umask decides who may read it,
# as for any file a command writes (the systemd unit's UMask=0027 lets the spool's group, the
# producers, read their results). The ledger beside it stays owner-only.
_FILE_MODE: Final = 0o666
#: How long a SQLite output's switch back to WAL mode waits for readers before it writes
#: in rollback-journal mode instead.
_WAL_SWITCH_S: Final = 1.0
#: How long a SQLite output's writes wait for another program's lock (Python's default).
_BUSY_MS: Final = 5_000
# Bytes buffered before they go to the OS; a flush always writes everything.
_BUFFER_BYTES: Final = 1 << 20
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SQLITE_COLUMNS: Final = ("seq", *CSV_COLUMNS, "row_json")


class ResultSink(Protocol):
    """Protocol: one output of a job, written from the ledger in ``done_order``.

    - ``open(resume_from, last)`` opens (creating if needed) the output and returns the
      state it really resumes from: usually ``resume_from``, less when the output lost rows
      (cut by hand, deleted) or was changed before its recorded end (``last``, the row that
      state ends with, is not there). The caller emits every row after the returned
      ``done_order``.
    - ``write(rows)`` takes rows in ``done_order``; a file sink requires them to continue the
      sequence without a gap (``ValueError`` otherwise). Rows may be buffered.
    - ``flush()`` makes everything written so far durable (fsync / commit) and returns the new
      known-good state, which the caller then records in the ledger.
    - ``close()`` releases the output; rows not flushed are dropped (the ledger still has
      them, and the next open re-emits them).
    - ``write`` and ``flush`` raise ``OSError`` when the disk is full or failing; the sink
      is then unusable and the state it reported last stays the truth.
    """

    def open(self, resume_from: SinkState, last: DoneRow | None = None) -> SinkState: ...

    def write(self, rows: Sequence[DoneRow]) -> None: ...

    def flush(self) -> SinkState: ...

    def close(self) -> None: ...


def output_row(row: DoneRow) -> dict[str, object]:
    """Return the JSON object of one output row (the architecture doc's row format).

    Keys: line, input, asin, marketplace, status, item, summary, error, attempts, key,
    fetched_at, cached (the answer came from the item cache; ``fetched_at`` is then when
    Amazon sent it), and ``extra`` only when the input row had extra columns. A row invalid at
    ingestion has ``asin`` null, error code ``InvalidRow`` (the row is not a query) or
    ``InvalidAsin`` (its id is malformed) with the reason, 0 attempts.
    """
    result = row.result
    out: dict[str, object]
    if result is None:
        out = {
            "line": row.line,
            "input": row.raw,
            "asin": None,
            "marketplace": row.marketplace,
            "status": "invalid",
            "item": None,
            "summary": None,
            "error": {
                "code": row.error_code,
                "message": row.error_reason or "not an ASIN",
                "remedy": describe(row.error_code).remedy,
            },
            "attempts": 0,
            "key": None,
            "fetched_at": None,
            "cached": False,
        }
    else:
        out = {
            "line": row.line,
            "input": row.raw,
            "asin": row.asin,
            "marketplace": row.marketplace,
            "status": row.status,
            "item": result.get("item"),
            "summary": _summary_of(result),
            "error": result.get("error"),
            "attempts": result.get("attempts", 0),
            "key": result.get("key"),
            "fetched_at": result.get("fetched_at"),
            "cached": bool(result.get("cached", False)),
        }
    if row.extra:
        out["extra"] = dict(row.extra)
    return out


def _summary_of(result: Mapping[str, object]) -> object:
    """A stored result's summary, with the ``image_url`` a ledger written before it was
    part of the summary lacks worked out from the stored item: an output written again in
    full after an upgrade had it empty in every row the older broker fetched."""
    summary = result.get("summary")
    if isinstance(summary, dict) and "image_url" not in summary:
        item = result.get("item")
        if isinstance(item, dict):
            # Read as a fresh answer's summary is, in the item's own spelling.
            from broker.api import creators, paapi5
            from broker.api.errors_map import summarize
            from broker.models import Protocol as Api
            from broker.product import detect_protocol

            paapi = detect_protocol(item) is Api.PAAPI5
            fields = paapi5.SUMMARY_FIELDS if paapi else creators.SUMMARY_FIELDS
            summary = {**summary, "image_url": summarize(item, fields).image_url}
    return summary


def _csv_values(row: DoneRow) -> list[object]:
    """The row as CSV cells in :data:`CSV_COLUMNS` order (None as empty, cached as text)."""
    values = _column_values(output_row(row))
    values[-1] = "true" if values[-1] else "false"
    return values


def _column_values(out: Mapping[str, object]) -> list[object]:
    """An :func:`output_row`'s values in :data:`CSV_COLUMNS` order, typed (``cached`` a bool)."""
    summary = _mapping(out["summary"])
    error = _mapping(out["error"])
    return [
        out["line"],
        out["input"],
        out["asin"],
        out["marketplace"],
        out["status"],
        summary.get("title"),
        summary.get("price"),
        summary.get("currency"),
        summary.get("availability"),
        summary.get("detail_url"),
        summary.get("image_url"),
        error.get("code"),
        error.get("message"),
        out["attempts"],
        out["key"],
        out["fetched_at"],
        bool(out["cached"]),
    ]


def _cell(value: object) -> object:
    """A pass-through value as a CSV cell: text as it is, JSON null (or absent) empty, any
    other JSON value (a number, a list) as its compact JSON text."""
    if value is None or isinstance(value, str):
        return value or ""
    return dumps(value)


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else _EMPTY


_EMPTY: Final[Mapping[str, object]] = MappingProxyType({})


def _json_line(value: object) -> str:
    text = dumps(value)
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        # Line breaks to Python's str.splitlines, editors and log shippers, though not to
        # JSON: escaped, a row stays one line for every reader.
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        text = text.replace("\x85", "\\u0085")
    return text + "\n"


def _utf8(text: str) -> bytes:
    # A lone surrogate (undecodable input kept as is) cannot be UTF-8; inside a JSON string
    # its backslash form is a valid escape, and in CSV it stays readable.
    return text.encode("utf-8", "backslashreplace")


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """Write all of ``data`` at the descriptor's position (``os.write`` may write less).

    Raises:
        OSError: naming ``path`` (a full disk is then "No space left on device: 'out.csv'",
            not an error about no file in particular).
    """
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _fsync_dir(directory: Path) -> None:
    # A new file's directory entry is durable only once the directory is synced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_like(path: Path, held: os.stat_result | None) -> None:
    """Create the output ``path``, empty, with the mode and group ``held`` describes (of the
    output it is to replace), before any row is written to it; nothing when ``held`` is None
    or the file exists.

    A new output took the default mode until it replaced the old one: a ``chmod 600``
    output's refresh sat world-readable while it ran (and a stopped one until resumed), and
    a SQLite output's ``-wal`` took that mode for good (SQLite gives the journal its file's
    mode when it creates it). Every sink opens an existing empty file as a new output.
    """
    if held is None:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    give_attributes(path, held)
    _fsync_dir(path.absolute().parent)


class _FileSink:
    """The file mechanics shared by JSONL and CSV: buffering, truncation, resume, fsync."""

    _header: bytes = b""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._buffer = bytearray()
        self._written = 0  # bytes handed to the OS; the file's logical end
        self._done_order = 0  # the last row written or buffered
        self._failed: OSError | None = None
        self._identity: tuple[int, int] = (0, 0)  # the open file's (device, inode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _encode(self, rows: Sequence[DoneRow]) -> bytes:
        raise NotImplementedError

    def open(self, resume_from: SinkState, last: DoneRow | None = None) -> SinkState:
        """Open the file and cut it back to a known-good state; return that state.

        ``last``: the row ``resume_from`` ends with. A file that does not end it at the
        recorded offset was changed before that offset (a row edited by hand): cut there,
        a row would be cut in two, so it is written again from the ledger instead.

        Raises:
            OSError: the file cannot be opened, truncated or synced.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self!r} is already open")
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            state = self._resume(fd, resume_from, last)
            os.ftruncate(fd, state.offset)
            os.lseek(fd, state.offset, os.SEEK_SET)
            if state.offset == 0 and self._header:
                # Written at once, so even a job with no rows gets a file with its header.
                _write_all(fd, self._header, self.path)
                state = SinkState(len(self._header), 0)
            os.fsync(fd)
            if created:
                _fsync_dir(self.path.absolute().parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._identity = file_identity(fd)
        self._written = state.offset
        self._done_order = state.done_order
        self._failed = None
        self._buffer.clear()
        return state

    def _resume(self, fd: int, resume_from: SinkState, last: DoneRow | None) -> SinkState:
        if resume_from.offset == 0:
            return SinkState()
        size = os.fstat(fd).st_size
        if size >= resume_from.offset:
            if last is None or self._ends_with(fd, resume_from.offset, last):
                return resume_from  # whatever follows is a torn tail
            event = "broker.output_changed"
            note = (
                "the output no longer ends its last recorded row where it did (edited by "
                "hand?); it is written again from the ledger, every row once"
            )
        else:
            # Bytes the run had made durable are gone: cut, or records taken out anywhere in
            # the file. Which rows the rest holds cannot be told from its length, and keeping
            # it would repeat some rows and lose others; the ledger holds every row, so the
            # file is written again from it.
            event = "broker.output_shorter_than_recorded"
            note = "the output is written again from the ledger, every row once"
        logger.warning(
            event,
            path=str(self.path),
            recorded_bytes=resume_from.offset,
            recorded_rows=resume_from.done_order,
            size=size,
            note=note,
        )
        return SinkState()

    def _ends_with(self, fd: int, offset: int, last: DoneRow) -> bool:
        """True when the file's bytes just before ``offset`` are the row ``last``."""
        expected = self._encode([last])
        start = offset - len(expected)
        return start >= 0 and os.pread(fd, len(expected), start) == expected

    def write(self, rows: Sequence[DoneRow]) -> None:
        """Append rows (buffered); they must continue the ``done_order`` sequence.

        Raises:
            ValueError: a row does not follow the previous one in ``done_order``.
            OSError: the buffer could not be written out (the sink is then unusable).
        """
        fd = self._usable()
        expected = self._done_order
        for row in rows:
            expected += 1
            if row.done_order != expected:
                raise ValueError(
                    f"{self.path}: row done_order {row.done_order} written where "
                    f"{expected} was due; rows must come from Ledger.done_rows_after() "
                    "of the state open() returned"
                )
        if not rows:
            return
        self._buffer += self._encode(rows)
        self._done_order = expected
        if len(self._buffer) >= _BUFFER_BYTES:
            self._drain(fd)

    def flush(self) -> SinkState:
        """Write out the buffer, fsync, and return the new known-good state.

        Raises:
            OSError: the write or fsync failed; nothing after the last returned state is
                known good, and the sink is unusable.
        """
        fd = self._usable()
        self._drain(fd)
        try:
            os.fsync(fd)
            # Also with nothing to write: a cut after the last write must not be recorded
            # as an offset the file no longer has.
            self._check_whole(fd)
            _check_in_place(self.path, self._identity)
        except OSError as exc:
            self._failed = exc
            raise
        return SinkState(self._written, self._done_order)

    def _check_whole(self, fd: int) -> None:
        """Raise if the file is shorter than what this run wrote: cut under it, the next
        write would leave a hole of NUL bytes where rows were, and the rows lost."""
        size = os.fstat(fd).st_size
        if size < self._written:
            raise OSError(
                errno.EIO,
                f"{self.path} was cut to {size} bytes while this run wrote it "
                f"({self._written} written); run again: it is written again from the "
                "ledger, every row once",
            )

    def close(self) -> None:
        """Close the file; rows not flushed are dropped (re-emitted on the next open)."""
        fd, self._fd = self._fd, None
        self._buffer.clear()
        if fd is not None:
            os.close(fd)

    def _usable(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"{self!r} is not open")
        if self._failed is not None:
            failed = self._failed
            raise OSError(
                failed.errno,
                f"{self.path}: an earlier write failed ({failed.strerror or failed}); "
                "reopen the output to resume from its last flushed state",
            )
        return self._fd

    def _cut_back(self, fd: int) -> None:
        """Drop the part of a failed write that reached the disk, if it can (a full disk
        still lets a file shrink): the file then ends on a whole row for whoever reads it
        before the next run, such as a failed job the daemon files. The next open cuts it
        back in any case. A file already shorter than this run wrote is left alone: it was
        cut under the run, and growing it would write NUL bytes where rows were."""
        try:
            if os.fstat(fd).st_size > self._written:
                os.ftruncate(fd, self._written)
        except OSError:
            pass

    def _drain(self, fd: int) -> None:
        if not self._buffer:
            return
        data = bytes(self._buffer)
        try:
            self._check_whole(fd)
            crash_point("mid_write", before=lambda: _write_all(fd, _torn(data), self.path))
            _write_all(fd, data, self.path)
        except OSError as exc:
            self._failed = exc
            self._cut_back(fd)
            raise
        self._written += len(self._buffer)
        self._buffer.clear()


def _check_in_place(path: Path, identity: tuple[int, int] | None) -> None:
    """Raise if the output at ``path`` is no longer the file of ``identity`` (deleted, moved
    or replaced under the run): its rows would be reported written into a file nobody can
    find (the next open writes it again)."""
    if identity is None or not still_at(path, identity):
        raise OSError(
            errno.ENOENT,
            f"{path} was deleted or replaced while this run wrote it; run again: it is "
            "written again from the ledger, every row once",
        )


def _torn(data: bytes) -> bytes:
    """The first half of ``data``, never ending on a line break: what a kill mid-write leaves."""
    cut = len(data) // 2
    while cut > 1 and data[cut - 1 : cut] in (b"\n", b"\r"):
        cut -= 1
    return data[:cut]


class JsonlSink(_FileSink):
    """JSON Lines output: UTF-8 without BOM, one compact object per row, ``\\n``-terminated."""

    def open(self, resume_from: SinkState, last: DoneRow | None = None) -> SinkState:
        """Open the file (see :meth:`_FileSink.open`); one an older broker began, whose rows
        lack fields of this version's (``cached``, ``summary.image_url``), is written again
        in full from the ledger, so that every row has the same fields."""
        if last is not None and self.path.exists() and _an_older_row(self._first_line()):
            last = None  # said below: its rows never read as this version writes them
        state = super().open(resume_from, last)
        if state.done_order and _an_older_row(self._first_line()):
            _say_rewritten(self.path)
            self.close()
            state = super().open(SinkState())
        return state

    def _first_line(self) -> bytes:
        """The output's first row, whole (one row fits in memory, as every row is built)."""
        with self.path.open("rb") as handle:
            return handle.readline()

    def _encode(self, rows: Sequence[DoneRow]) -> bytes:
        return json_lines(output_row(row) for row in rows)


def _an_older_row(line: bytes) -> bool:
    """True when ``line``, an output's first row, is an older broker's: a row object
    without a field every row of this version has."""
    try:
        row = loads(line)  # as deep as any row this broker writes
    except ValueError:
        return False  # not a row (cut back to it at open, a first line is whole)
    if not isinstance(row, dict):
        return False
    summary = row.get("summary")
    return "cached" not in row or (isinstance(summary, dict) and "image_url" not in summary)


def json_lines(values: Iterable[object]) -> bytes:
    """``values`` as JSON Lines, UTF-8, as the JSONL output writes them (``broker lookup``
    prints its rows so too)."""
    return _utf8("".join(_json_line(value) for value in values))


class CsvSink(_FileSink):
    """CSV output (RFC 4180: ``,``, ``"`` quoting, CRLF): :data:`CSV_COLUMNS`, then the
    input's pass-through columns.

    Cells are UTF-8 without BOM; null values are empty cells; ``price`` is a plain decimal.
    A quoted cell may span lines (an input row with a line break), so records are found by
    quote parity, not by counting lines.

    The pass-through columns are the ``extra`` names the sink was given (the job's rows'
    names, :meth:`~broker.jobs.ledger.Ledger.extra_names`), then any other name of the
    first rows written, in their order; a name that is one of ours (or starts with
    ``input_``) gets an ``input_`` prefix. The header is written at open with our columns
    alone and rewritten with the pass-through ones at the first write; until a row is
    recorded, a reopened output starts over, so the header is always decided afresh from
    the rows. A resumed output reads its pass-through columns back from its header.
    """

    _header = _utf8(",".join(CSV_COLUMNS) + "\r\n")

    def __init__(self, path: Path, extra: Sequence[str] = ()) -> None:
        super().__init__(path)
        #: the pass-through names known before the first write
        self._known = tuple(extra)
        #: the pass-through columns (input names); None until the first write decides them
        self._extra: tuple[str, ...] | None = None

    def open(self, resume_from: SinkState, last: DoneRow | None = None) -> SinkState:
        """Open the file (see :meth:`_FileSink.open`); a state with no row starts over."""
        if resume_from.done_order == 0:
            resume_from = SinkState()
        state = super().open(resume_from, last)
        header = self._read_header() if state.done_order else list(CSV_COLUMNS)
        if header[: len(CSV_COLUMNS)] != list(CSV_COLUMNS):
            # Begun by an older broker under other columns: appended under its header, every
            # cell past the first difference would sit under the wrong name. Written again
            # from the ledger under ours.
            _say_rewritten(self.path)
            self.close()
            state = super().open(SinkState())
        elif state.done_order == 0 and state.offset != len(self._header):
            # Cut back to the header alone (a hand-cut file): decide the columns again.
            self.close()
            state = super().open(SinkState())
        self._extra = None if state.done_order == 0 else self._read_extra(header, self._known)
        return state

    def write(self, rows: Sequence[DoneRow]) -> None:
        """Append rows (see :meth:`_FileSink.write`); the first rows decide the columns."""
        if self._extra is None and rows:
            extra = tuple(dict.fromkeys((*self._known, *_extra_names(rows))))
            if extra:
                self._rewrite_header(extra)
            self._extra = extra
        super().write(rows)

    def _rewrite_header(self, extra: tuple[str, ...]) -> None:
        fd = self._usable()
        header = _csv_header(extra)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            _write_all(fd, header, self.path)
        except OSError as exc:
            self._failed = exc
            raise
        self._written = len(header)

    def _ends_with(self, fd: int, offset: int, last: DoneRow) -> bool:
        """See :meth:`_FileSink._ends_with`: the row as encoded under the file's header (one
        not of ours, an older broker's, is rewritten by :meth:`open` whatever it ends with)."""
        header = self._read_header()
        if header[: len(CSV_COLUMNS)] != list(CSV_COLUMNS):
            return True
        self._extra = self._read_extra(header, self._known)
        try:
            return super()._ends_with(fd, offset, last)
        finally:
            self._extra = None

    def _read_header(self) -> list[str]:
        """The file's header: its first CSV record, which spans lines when a name holds a
        line break (an Excel header wrapped with Alt+Enter)."""
        with open(self.path, encoding="utf-8", errors="replace", newline="") as stream:
            return next(csv.reader(stream), [])

    @staticmethod
    def _read_extra(header: Sequence[str], known: Sequence[str] = ()) -> tuple[str, ...]:
        """The pass-through columns a header of ours names after our columns.

        ``known``: the job's own names. A cell that is one of them as it stands, where the
        name it reads as is not, was written by an older broker, which wrote names as they
        came (a name ``'note`` read as ``note`` left its column empty on resume).
        """
        names = set(known)
        extra = []
        for cell in header[len(CSV_COLUMNS) :]:
            name = _input_name(cell)
            extra.append(cell if name not in names and cell in names else name)
        return tuple(extra)

    def _encode(self, rows: Sequence[DoneRow]) -> bytes:
        extra = self._extra or ()
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\r\n")
        for row in rows:
            values = _csv_values(row)
            if extra:
                cells = _mapping(row.extra)
                values.extend(_cell(cells.get(name)) for name in extra)
            writer.writerow([_inert(value) for value in values])
        return _utf8(text.getvalue())


#: What a spreadsheet takes a cell for a formula by, at its start (OWASP's CSV injection).
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


#: A number as a spreadsheet reads one: ASCII digits, a sign, a point, an exponent (not
#: what ``float`` also takes: ``-inf``, ``-nan``, ``-1_000``, other scripts' digits).
_PLAIN_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _inert(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: one starting like a formula (a seller's title
    ``=HYPERLINK(...)``, a job's own cell) gets a leading ``'``, which Excel and LibreOffice
    hide; a number (``-1.5``) is left as it is."""
    if (
        isinstance(value, str)
        and value.startswith(_FORMULA_START)
        and not _PLAIN_NUMBER.fullmatch(value)
    ):
        return "'" + value
    return value


_INPUT_PREFIX: Final = "input_"


def _extra_names(rows: Sequence[DoneRow]) -> tuple[str, ...]:
    """The pass-through names of ``rows``, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        if row.extra:
            names.update(dict.fromkeys(row.extra))
    return tuple(names)


def _column_name(name: str) -> str:
    """The CSV header cell of pass-through column ``name`` (prefixed if it would clash).

    Compared in any case: SQL, pandas' ``to_sql`` and Excel's tables take ``Title`` for our
    ``title`` (sqlite3's ``.import`` renamed both, ``to_sql`` refused the file). A header an
    older broker wrote with ``Title`` unprefixed still reads back (:func:`_input_name`).

    A name a spreadsheet would take for a formula gets a leading ``'``, as a cell does
    (:func:`_inert`), and so does one that starts with ``'`` itself, so that the inverse
    knows which to take off.
    """
    lowered = name.lower()
    if lowered in CSV_COLUMNS or lowered.startswith(_INPUT_PREFIX):
        return _INPUT_PREFIX + name
    if name.startswith("'"):
        return "'" + name
    return str(_inert(name))


def _input_name(column: str) -> str:
    """The inverse of :func:`_column_name`.

    A cell of one ``'`` before anything but a formula's first character or another ``'``
    is a name an older broker wrote as it came (this one writes such a name ``''x``).
    """
    if column[:1] == "'" and not column[1:].startswith(("'", *_FORMULA_START)):
        return column
    return column.removeprefix("'").removeprefix(_INPUT_PREFIX)


def _csv_header(extra: Sequence[str]) -> bytes:
    text = io.StringIO()
    csv.writer(text, lineterminator="\r\n").writerow(
        [*CSV_COLUMNS, *(_column_name(name) for name in extra)]
    )
    return _utf8(text.getvalue())


def _say_rewritten(path: Path) -> None:
    """Warn that an output an older broker began is written again in full from the ledger."""
    logger.warning(
        "broker.output_rewritten",
        path=str(path),
        note="begun by an older broker under other columns or fields; written again in full "
        "under this version's",
    )


def _an_older_brokers(conn: sqlite3.Connection, columns: Sequence[str]) -> bool:
    """True when the results table (of ``columns``) is one an older broker made: its own
    bookkeeping table is there, and its columns are some of ours (later versions only ever
    added some)."""
    ours = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'broker_sink'"
    ).fetchone()
    return ours is not None and set(columns) < set(_SQLITE_COLUMNS)


class SqliteSink:
    """SQLite output: table ``results`` with one row per input row, upserted by ``seq``.

    Columns: ``seq`` (primary key), the :data:`CSV_COLUMNS`, and ``row_json`` (the whole
    JSONL row, ``item`` and ``extra`` included). The sink's own progress lives in table
    ``broker_sink`` and is committed with the rows, so the file is always self-consistent.
    A fresh state (``done_order`` 0) empties ``results`` first.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._done_order = 0
        self._durable = 0
        self._failed: OSError | None = None
        self._identity: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"SqliteSink({str(self.path)!r})"

    def open(self, resume_from: SinkState, last: DoneRow | None = None) -> SinkState:
        """Open or create the database; return the state it holds (offset 0). ``last`` is
        not needed: the table's rows are counted, wherever one was changed.

        Raises:
            JobFileError: the file exists but is not SQLite, or has a different ``results``
                table (it is left untouched).
            OSError: the disk is full or failing.
        """
        if self._conn is not None:
            raise RuntimeError(f"{self!r} is already open")
        if self.path.exists():
            with open(self.path, "rb") as stream:
                head = stream.read(len(_SQLITE_MAGIC))
            if head and head != _SQLITE_MAGIC:
                raise JobFileError(
                    f"{self.path}: is not a SQLite database; it was left untouched. "
                    "Choose another output path."
                )
        else:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, _FILE_MODE))
        # Opened in a worker thread (its row count reads the whole table: seconds for a
        # million rows), then written from the event loop's: one thread at a time.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            with _disk_errors(self.path):
                own = self._prepare(conn, fresh=resume_from.done_order == 0)
            self._identity = file_identity(self.path)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._done_order = self._durable = own
        return SinkState(0, own)

    def _prepare(self, conn: sqlite3.Connection, *, fresh: bool) -> int:
        columns = [name for (_, name, *_) in conn.execute("PRAGMA table_info(results)")]
        differs = bool(columns) and columns != list(_SQLITE_COLUMNS)
        older = differs and _an_older_brokers(conn, columns)
        if differs and not older:
            raise JobFileError(
                f"{self.path}: has a results table with other columns ({', '.join(columns)}); "
                "it was left untouched. Choose another output path."
            )
        # Each try waits a tenth of a second for the lock, not the connection's 5 s.
        conn.execute("PRAGMA busy_timeout = 100")
        try:
            enable_wal(conn, timeout_s=_WAL_SWITCH_S)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            # A reader holds the file (a viewer's open read), which the switch must wait
            # for, and a finished output is out of WAL mode (see close): written in its
            # rollback-journal mode this time, each commit waiting for readers in between.
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if older:
                # Begun by an older broker with fewer columns: written again from the ledger
                # under this version's table (its rows hold nothing the ledger does not).
                _say_rewritten(self.path)
                conn.execute("DROP TABLE results")
                conn.execute("DELETE FROM broker_sink")
            conn.execute(SQLITE_RESULTS)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS broker_sink "
                "(id INTEGER PRIMARY KEY CHECK (id = 1), done_order INTEGER NOT NULL)"
            )
            if fresh:
                conn.execute("DELETE FROM results")
                conn.execute("DELETE FROM broker_sink")
            conn.execute("INSERT OR IGNORE INTO broker_sink (id, done_order) VALUES (1, 0)")
            (own,) = conn.execute("SELECT done_order FROM broker_sink").fetchone()
            # Every row written is one row of results (upserted by seq): fewer means rows
            # were deleted by hand (or the table dropped). Which ones cannot be told cheaply,
            # so every row is written again from the ledger, each once (by seq).
            (held,) = conn.execute("SELECT count(*) FROM results").fetchone()
            if held < own:
                logger.warning(
                    "broker.output_shorter_than_recorded",
                    path=str(self.path),
                    recorded_rows=own,
                    rows=held,
                    note="the output is written again from the ledger, every row once",
                )
                conn.execute("UPDATE broker_sink SET done_order = 0")
                own = 0
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return int(own)

    def write(self, rows: Sequence[DoneRow]) -> None:
        """Upsert rows by ``seq`` inside the open transaction (committed by :meth:`flush`)."""
        conn = self._usable()
        if not rows:
            return
        values = []
        for row in rows:
            out = output_row(row)
            # sqlite3 stores a bool as the integer 0 or 1 the column is declared as.
            values.append((row.seq, *_column_values(out), _json_line(out).rstrip("\n")))
        placeholders = ", ".join("?" for _ in _SQLITE_COLUMNS)
        updates = ", ".join(f"{name} = excluded.{name}" for name in _SQLITE_COLUMNS[1:])
        with self._failing(conn):
            if not conn.in_transaction:
                conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                f"INSERT INTO results ({', '.join(_SQLITE_COLUMNS)}) VALUES ({placeholders}) "
                f"ON CONFLICT (seq) DO UPDATE SET {updates}",
                values,
            )
        self._done_order = max(self._done_order, rows[-1].done_order)

    def flush(self) -> SinkState:
        """Commit the rows with the new state in one transaction and return it."""
        conn = self._usable()
        # Committed into a file moved or deleted meanwhile, the rows would be reported
        # written where nobody finds them (and its journal left under the old name). Looked
        # at after the commit too: moved in between, it is not recorded, so written again.
        self._still_in_place(conn)
        with self._failing(conn):
            if not conn.in_transaction:
                conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE broker_sink SET done_order = ?", (self._done_order,))
            conn.execute("COMMIT")
        self._still_in_place(conn)
        self._durable = self._done_order
        return SinkState(0, self._durable)

    def close(self) -> None:
        """Roll back what was not flushed, leave WAL mode and close the database.

        Out of WAL mode, the file alone is the database: a reader who may not write its
        folder (another user, a read-only volume) can open it, which in WAL mode needs a
        ``-shm`` file beside it. The next open of the job goes back to WAL.

        Raises:
            OSError: the disk is full or failing, so the rows in the ``-wal`` could not be
                copied into the file (it is whole only with its ``-wal`` then, and closed).
        """
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if self._failed is None:
                    self._leave_wal(conn)
            finally:
                # Closed even when the rollback fails (a failing disk): never leaked.
                conn.close()

    def _leave_wal(self, conn: sqlite3.Connection) -> None:
        """Copy the log into the file and leave WAL mode; a full or failing disk that keeps
        rows in the log raises (it was swallowed: the run exited 0 with them there)."""
        try:
            if checkpoint_unless_read(conn, self.path):
                conn.execute("PRAGMA journal_mode = DELETE")
        except OSError as exc:
            self._failed = exc
            raise
        except sqlite3.Error as exc:
            failure = disk_error(self.path, exc)
            if failure is not None:
                self._failed = failure
                raise failure from exc
        # Else a reader holds the file, which keeps it in WAL mode: harmless (it is whole
        # with its log, where it is), not waited for.

    def _still_in_place(self, conn: sqlite3.Connection) -> None:
        """Raise, and fail the sink, if the file is no longer at its path."""
        try:
            _check_in_place(self.path, self._identity)
        except OSError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._done_order = self._durable
            self._failed = exc
            raise

    def _usable(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self!r} is not open")
        if self._failed is not None:
            raise OSError(
                self._failed.errno,
                f"{self.path}: an earlier write failed ({self._failed.strerror}); "
                "reopen the output to resume from its last flushed state",
            )
        return self._conn

    @contextmanager
    def _failing(self, conn: sqlite3.Connection) -> Iterator[None]:
        """Roll back on a SQLite error; a disk error makes the sink unusable."""
        try:
            yield
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._done_order = self._durable
            failure = disk_error(self.path, exc) or held_error(self.path, exc)
            if failure is None:
                raise
            self._failed = failure
            raise failure from exc


@contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """Raise SQLite's disk errors, and a file another program holds, as ``OSError`` (so
    the CLI maps them to exit 74)."""
    try:
        yield
    except sqlite3.Error as exc:
        failure = disk_error(path, exc) or held_error(path, exc)
        if failure is not None:
            raise failure from exc
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (
            sqlite3.SQLITE_CORRUPT,
            sqlite3.SQLITE_NOTADB,
        ):
            raise JobFileError(
                f"{path}: is damaged ({exc}); it was left untouched. Move it away or delete "
                "it, and run again: every row is written again from the ledger."
            ) from exc
        raise


class InvalidReport:
    """``<out>.invalid.jsonl``: the job's invalid input rows, one ``{line, input, reason}`` each.

    Written from the ledger at the end of a run, to a temporary file renamed into place, so
    it is rewritten whole and never seen half-written. When the job has no invalid row,
    there is no report (a stale one is removed).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"InvalidReport({str(self.path)!r})"

    def write(self, ledger: Ledger) -> int:
        """Rewrite the report from ``ledger`` and return how many rows it lists.

        Raises:
            OSError: the report cannot be written.
        """
        temporary = self.path.with_name(self.path.name + ".tmp")
        count = 0
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
        try:
            try:
                with os.fdopen(fd, "wb", closefd=False) as stream:
                    for row in ledger.invalid_rows():
                        entry = {"line": row.line, "input": row.raw, "reason": _reason(row)}
                        stream.write(_utf8(_json_line(entry)))
                        count += 1
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            # A full disk: no half report left beside the output, and the error names the
            # file (a buffered write's names none).
            temporary.unlink(missing_ok=True)
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror, str(temporary)) from exc
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        if count:
            os.replace(temporary, self.path)
        else:
            temporary.unlink()
            self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.absolute().parent)
        return count


def _reason(row: DoneRow) -> str:
    if row.error_reason:
        return row.error_reason
    error = _mapping(row.result.get("error") if row.result else None)
    return str(error.get("message") or "Amazon rejected the id as invalid")


def open_sink(format: str, path: Path, *, extra: Sequence[str] = ()) -> ResultSink:
    """Return an unopened sink for ``format`` (``jsonl``, ``csv`` or ``sqlite``) at ``path``.

    ``extra``: the job's pass-through names, which a new CSV output makes its columns.

    Raises:
        ValueError: an unknown format.
    """
    if format == "jsonl":
        return JsonlSink(path)
    if format == "csv":
        return CsvSink(path, extra)
    if format == "sqlite":
        return SqliteSink(path)
    raise ValueError(f"unknown output format {format!r}; choose one of {', '.join(SINK_FORMATS)}")
