"""Job-file readers: stream a txt, CSV or JSON Lines job file (optionally gzipped) into rows.

Each input row becomes one :class:`JobRow` carrying its 1-based physical line number, the id
as written, the normalised ASIN or the reason it is invalid. Memory stays constant whatever
the file size: lines are read with a length cap, and a line over the cap is skipped in
bounded chunks and reported as an invalid row.

Formats (``detect_format`` picks one by extension, else by sniffing the first lines):

- **txt**: one ASIN, ISBN-10 or Amazon product URL per line. Blank lines, ``#`` comment lines
  and trailing ``  # comments`` (a ``#`` after whitespace; a URL's ``#fragment`` is kept)
  produce no row.
- **csv**: a header row with an ``asin`` column (case-insensitive), optional
  ``marketplace`` and ``resources`` columns (a cell of resource names apart by commas,
  semicolons, bars or blanks), and any other columns, which travel in ``extra`` so the
  output can carry them. The delimiter is ``,`` unless the header only has an ``asin``
  column when split on ``;``, tab or ``|``. Quoted fields (also across lines), CRLF and a
  BOM are handled. Blank lines, rows whose cells are all blank, and the header again (with
  its ``sep=`` line: ``cat`` of two exports) produce no row. A short row is padded with
  empty cells; a row with surplus non-empty cells is invalid, because its columns cannot be
  trusted to line up.
- **jsonl**: one JSON object per line with a string ``asin``, optional string
  ``marketplace`` and optional ``resources`` (a list of strings). Every other top-level field
  goes to ``extra`` as the JSON value it is (a number stays a number in JSON Lines output; a
  CSV output cell holds a non-string value as its compact JSON text). A line
  that is not valid JSON, not an object or has wrongly typed fields is an invalid row; it
  never stops the file. Blank lines produce no row.

A problem with one row is data (``JobRow.error``); a problem with the file as a whole
(undecodable bytes, a truncated ``.gz``, a CSV without an ``asin`` column) raises
:class:`~broker.errors.JobFileError` after the rows before it were yielded. A file that
cannot be opened raises the ``OSError`` itself, so the CLI can tell "no input" (exit 66)
from "bad input" (exit 65).
"""

from __future__ import annotations

import codecs
import collections
import csv
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Literal, TypeAlias

from broker.asin import AsinCheck, check_asin
from broker.errors import JobChangedError, JobFileError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "FORMATS",
    "INVALID_ASIN",
    "INVALID_ROW",
    "JobFingerprint",
    "JobFormat",
    "JobRow",
    "check_encoding",
    "count_rows",
    "detect_format",
    "fingerprint",
    "read_job",
]

JobFormat = Literal["txt", "csv", "jsonl"]

#: The job-file formats, as accepted by ``format=``.
FORMATS: Final[tuple[JobFormat, ...]] = ("txt", "csv", "jsonl")

#: The default cap on one line, in bytes without its line ending.
DEFAULT_MAX_LINE_BYTES: Final = 65536

_EXTENSIONS: Final[Mapping[str, JobFormat]] = {
    ".txt": "txt",
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonlines": "jsonl",
}
_GZIP_MAGIC: Final = b"\x1f\x8b"
#: How much of a job file's head decides whether its lines end in CR alone: a longest line
#: (64 KiB) and its ending, so a first line the reader accepts always shows its ending.
_CR_SNIFF_BYTES: Final = DEFAULT_MAX_LINE_BYTES + 2
_UTF8_BOM: Final = b"\xef\xbb\xbf"
#: Byte-order marks of the wide encodings, UTF-32's before UTF-16's (which they start with).
_WIDE_BOMS: Final = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
_ZIP_MAGIC: Final = b"PK\x03\x04"
#: Compressed files other than gzip, by their first bytes: xz, zstd, and bzip2 ("BZh", the
#: block size, then a block's or the end's magic number).
_OTHER_COMPRESSION: Final = ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_BZIP2: Final = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")
#: An OLE2 compound document: an Excel 97-2003 workbook (.xls), or a Word or Outlook file.
_OLE2_MAGIC: Final = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
#: Excel's first line naming a CSV's delimiter ("sep=;").
_SEP_LINE: Final = re.compile(r"sep=([^\"\r\n])", re.IGNORECASE)
# How much of an over-long line we read at a time while skipping it.
_SKIP_CHUNK: Final = 1 << 16
# How many characters of a bad line we keep in ``raw``, so the invalid-rows report shows
# what the line was without copying up to 64 KiB into every report row.
_PREVIEW_CHARS: Final = 120
# How much the format sniffer reads before it decides.
_SNIFF_BYTES: Final = 1 << 16
_SNIFF_LINES: Final = 50
_CSV_DELIMITERS: Final = (",", ";", "\t", "|")
_JSONL_KEYS: Final = frozenset({"asin", "marketplace", "resources"})
#: A \u escape in what looks like an object's field name (an escape, then the closing
#: quote and a colon): "\u0061sin" is "asin". One in a value (an accented title written
#: by json.dumps) does not match.
_ESCAPED_NAME: Final = re.compile(r'\\u[0-9A-Fa-f]{4}[^"\\]*"\s*:')
_TRAILING_COMMENT: Final = re.compile(r"\s#")


#: The error codes of an invalid row (the catalogue's): its id is malformed, or the row is
#: not a query at all (bad JSON, too long, a field of the wrong type).
INVALID_ASIN: Final = "InvalidAsin"
INVALID_ROW: Final = "InvalidRow"


@dataclass(frozen=True, slots=True)
class JobRow:
    """One input row of a job file: where it was, what it said, and whether it is usable.

    ``asin`` is None exactly when ``error`` is set, so ``row.error is not None`` (or
    ``not row.valid``) is all a strict pre-pass needs.

    Attributes:
        line: 1-based physical line number where the row starts in the (decompressed) file.
        raw: the id as written; for a line that could not be parsed, its first characters.
        asin: the normalised ASIN, None when the row is invalid.
        marketplace: from the CSV ``marketplace`` column or the JSONL field, else the store
            of a product URL (``amazon.co.uk``); None means the job's default applies.
        resources: the JSONL ``resources`` list; None means the job's default resources.
        extra: the other CSV columns or JSONL fields (see the module docstring), None when
            there are none.
        error: why the row is invalid, a sentence a user can act on; None when valid.
        code: the catalogue code of ``error``: ``InvalidAsin`` for a row whose id is
            malformed, ``InvalidRow`` for one that is not a query at all (bad JSON, too
            long, a field of the wrong type); no meaning for a valid row.
    """

    line: int
    raw: str
    asin: str | None
    marketplace: str | None = None
    resources: tuple[str, ...] | None = None
    extra: Mapping[str, object] | None = None
    error: str | None = None
    code: str = INVALID_ASIN

    @property
    def valid(self) -> bool:
        """True when the row holds a well-formed ASIN."""
        return self.error is None


def _slot_setter(name: str) -> Callable[[JobRow, object], None]:
    setter: Callable[[JobRow, object], None] = getattr(JobRow, name).__set__
    return setter


# A frozen dataclass's __init__ sets every field through object.__setattr__, which costs
# about a third of reading a plain-text row; the per-row paths below fill the slots through
# their descriptors instead (the same values, without the per-field indirection).
_set_line = _slot_setter("line")
_set_raw = _slot_setter("raw")
_set_asin = _slot_setter("asin")
_set_marketplace = _slot_setter("marketplace")
_set_resources = _slot_setter("resources")
_set_extra = _slot_setter("extra")
_set_error = _slot_setter("error")
_set_code = _slot_setter("code")


def _row(
    line: int,
    raw: str,
    asin: str | None,
    marketplace: str | None,
    resources: tuple[str, ...] | None,
    extra: Mapping[str, object] | None,
    error: str | None,
) -> JobRow:
    """Build a JobRow quickly; equal to ``JobRow(line, raw, ...)``, every field given.

    Its ``error``, if any, is the id's: the row was read, and its id checked.
    """
    row: JobRow = object.__new__(JobRow)
    _set_line(row, line)
    _set_raw(row, raw)
    _set_asin(row, asin)
    _set_marketplace(row, marketplace)
    _set_resources(row, resources)
    _set_extra(row, extra)
    _set_error(row, error)
    _set_code(row, INVALID_ASIN)
    return row


@dataclass(frozen=True, slots=True)
class JobFingerprint:
    """What a job file was when the job started, to refuse a resume against a changed file.

    ``sha256`` is the hex digest of the file's bytes as stored (compressed, for a ``.gz``);
    ``content_sha256`` that of a gzip file's decompressed bytes (None for a plain file, or
    gzip data that does not decompress): the same rows compressed again (gzip's header
    holds a time) are the same job.
    """

    path: Path
    size: int
    mtime_ns: int
    sha256: str
    content_sha256: str | None = None

    def same_content(self, other: JobFingerprint) -> bool:
        """True when ``other`` has the same bytes; the path and mtime may differ (a spool
        daemon renames the file, ``touch`` changes the mtime)."""
        return self.size == other.size and self.sha256 == other.sha256


def detect_format(path: str | os.PathLike[str]) -> JobFormat:
    """Return the job file's format: by extension, else by sniffing the first lines.

    Extensions: ``.txt``; ``.csv`` and ``.tsv``; ``.jsonl``, ``.ndjson`` and ``.jsonlines``;
    each optionally followed by ``.gz``. For any other name the first non-blank,
    non-comment line decides: ``{`` starts JSON Lines; an ``asin`` header cell, or a
    delimiter in a line that is not a URL, means CSV; anything else (or an empty file) is
    plain text.

    Raises:
        OSError: the file cannot be opened (only when sniffing is needed).
        JobFileError: the file is gzip-named but not gzip, or its gzip data is corrupt.
    """
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    by_extension = _EXTENSIONS.get(os.path.splitext(name)[1])
    if by_extension is not None:
        return by_extension
    return _sniff(Path(path))


def read_job(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    encoding: str = "utf-8",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    convert_isbn13: bool = False,
    stored_through_line: int = 0,
) -> Iterator[JobRow]:
    """Stream a job file as one :class:`JobRow` per input row, in file order.

    The arguments are checked at once; the file is opened when iteration starts and closed
    when it ends or the iterator is closed.

    Args:
        path: the job file; gzip-compressed data is detected by its magic bytes.
        format: ``"txt"``, ``"csv"`` or ``"jsonl"``; None detects it (:func:`detect_format`).
        encoding: the text encoding; any ASCII-compatible codec (``latin-1``, ``cp1252``
            ...). A UTF-8 byte-order mark at the start is always skipped.
        max_line_bytes: longer lines (not counting the line ending) become invalid rows.
        convert_isbn13: turn 978 ISBN-13s into ISBN-10s instead of reporting them invalid.
        stored_through_line: a resumed read: the rows up to this line are stored already
            (:attr:`broker.jobs.ledger.Ledger.stored_through_line`), and the caller skips
            them. Their lines are read for the file's structure only (a CSV header, quoted
            records), their bytes decoded leniently: an encoding given for the rest of the
            file (a run stopped on a byte UTF-8 cannot decode) does not fail on them, nor
            on a UTF-8 byte-order mark the first run read past.

    Returns:
        An iterator of rows, valid and invalid.

    Raises:
        ValueError: an unknown format or encoding, or a non-positive ``max_line_bytes``
            (raised by this call, before any reading).
        OSError: the file cannot be opened or read.
        JobFileError: the file cannot be read as a whole: undecodable bytes (the message
            names the line and byte offset), truncated or corrupt gzip data, a CSV without
            an ``asin`` column. Rows before the problem have been yielded by then.
    """
    fmt, codec = _check_arguments(format, encoding, max_line_bytes)

    def check(raw: str) -> AsinCheck:
        return check_asin(raw, convert_isbn13=convert_isbn13)

    return _rows(Path(path), fmt, codec, encoding, max_line_bytes, check, stored_through_line)


def count_rows(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    encoding: str = "utf-8",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> int:
    """Count the rows :func:`read_job` would yield, for a progress total.

    It reads the file once, keeping nothing and validating no ASIN. In txt and JSON Lines
    every non-blank (txt: non-comment) line is exactly one row, so it counts lines without
    parsing them; CSV records can span lines, so they go through the CSV parser.

    Raises:
        The same errors as :func:`read_job`.
    """
    fmt, codec = _check_arguments(format, encoding, max_line_bytes)
    source = Path(path)
    detected = fmt is None
    if fmt is None:
        fmt = detect_format(source)
    count = 0
    seen = False  # a first row (or an oversize line) met: txt's header test is behind
    if fmt == "csv":
        for _ in _rows(source, fmt, codec, encoding, max_line_bytes, _no_check):
            count += 1
        return count
    with ExitStack() as stack:
        stream, gzipped = _open(stack, source)
        for lineno, text in _lines(stream, source, codec, encoding, max_line_bytes, gzipped):
            if isinstance(text, _Oversize):
                count += 1
                seen = True
                continue
            # The same tests as _txt_rows and _jsonl_rows make before they yield a row.
            text = text.strip()
            if text and (fmt == "jsonl" or text[0] != "#"):
                if not seen:
                    seen = True
                    if fmt == "jsonl":
                        _refuse_json_document(source, lineno, text)
                    elif _is_asin_header(text):
                        continue
                    elif detected:
                        _refuse_a_table(source, lineno, text)
                count += 1
    return count


def fingerprint(path: str | os.PathLike[str]) -> JobFingerprint:
    """Hash a job file in a streaming pass and note its size and mtime.

    Raises:
        OSError: the file cannot be opened or read.
        JobFileError: the file changed while it was being hashed (a producer still writing).
    """
    absolute = Path(path).absolute()
    content: str | None = None
    with open(absolute, "rb") as stream, _reading(absolute):
        before = os.fstat(stream.fileno())
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
        stream.seek(0)
        if stream.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC:
            stream.seek(0)
            content = _content_digest(stream)
        after = os.fstat(stream.fileno())
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise JobFileError(
            f"{absolute}: the file changed while it was being read; is it still being "
            "written? Producers should write to a temporary name and rename it into place."
        )
    return JobFingerprint(absolute, before.st_size, before.st_mtime_ns, digest, content)


def _content_digest(stream: BinaryIO) -> str | None:
    """The SHA-256 of gzip data's decompressed bytes, or None when it does not decompress
    (reading the job says what is wrong with it)."""
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as data:
            return hashlib.file_digest(data, "sha256").hexdigest()
    except (OSError, EOFError, zlib.error):
        return None


def check_unchanged(started: JobFingerprint) -> None:
    """Refuse a job file that changed since ``started`` was taken (its size or mtime).

    Called while the file is being read: rows read after an edit in place must never be
    stored under the fingerprint of the file as it was.

    Raises:
        JobChangedError: the file's size or modification time differ, or it is gone.
    """
    try:
        now = os.stat(started.path)
    except OSError as exc:
        raise JobChangedError(
            f"{started.path}: the file changed while it was being read ({exc.strerror})"
        ) from None
    if (now.st_size, now.st_mtime_ns) != (started.size, started.mtime_ns):
        raise JobChangedError(
            f"{started.path}: the file changed while it was being read ({started.size} bytes "
            f"when the run started, {now.st_size} now); the rows read before the change are "
            "kept. Put the file back as it was to resume, or run with --new-job; producers "
            "should write to a temporary name and rename it into place."
        )


# -- argument checks -----------------------------------------------------------------------


def _check_arguments(
    format: str | None, encoding: str, max_line_bytes: int
) -> tuple[JobFormat | None, str]:
    """Validate the reader options; return the format (None: detect) and the codec name."""
    fmt: JobFormat | None = None
    if format is not None:
        for known in FORMATS:
            if format.lower() == known:
                fmt = known
        if fmt is None:
            raise ValueError(f"unknown job-file format {format!r}; use one of {FORMATS}")
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
    return fmt, check_encoding(encoding)


def check_encoding(encoding: str) -> str:
    """Return the codec job files are read with for ``encoding`` (each line decoded alone).

    We split lines on the byte ``\\n`` before decoding, which is only right when the
    encoding writes ``\\n``, ``#``, ``,`` and ASCII letters as themselves (UTF-16 does not).

    Raises:
        ValueError: an unknown encoding, or one that does not write ASCII as itself
            (UTF-16, UTF-32), which a line reader cannot split.
    """
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None
    if name == "utf-8-sig":
        # We strip the BOM ourselves at the start of the file; decoding every line with
        # utf-8-sig would also eat a U+FEFF at the start of any later line.
        name = "utf-8"
    probe = '\n\r #,;{}"asinASIN09'
    try:
        compatible = probe.encode(name) == probe.encode("ascii")
    except (UnicodeError, LookupError):
        compatible = False
    if not compatible:
        raise ValueError(
            f"encoding {encoding!r} is not supported for job files; convert the file to UTF-8"
        )
    return name


def _no_check(raw: str) -> AsinCheck:
    """Stand-in for ``check_asin`` when only counting rows."""
    return _COUNTED


_COUNTED: Final = AsinCheck("", "", None)


# -- bytes to lines ------------------------------------------------------------------------


class _Oversize:
    """A line over the length cap, standing in for its text; ``preview`` is its start."""

    __slots__ = ("preview",)

    def __init__(self, preview: str) -> None:
        self.preview = preview


_Line: TypeAlias = tuple[int, str | _Oversize]


def _open(stack: ExitStack, path: Path) -> tuple[io.BufferedIOBase, bool]:
    """Open ``path`` for binary reading, decompressing gzip data; return (stream, gzipped).

    A file whose lines end in CR alone (classic Mac, Excel's "CSV (Macintosh)") is read
    with LF endings, so it is not taken for one long line.
    """
    raw = stack.enter_context(open(path, "rb"))  # noqa: SIM115 - the caller's stack closes it
    with _reading(path):
        head = raw.peek(2)[:2]
    stream: io.BufferedIOBase = raw
    gzipped = head == _GZIP_MAGIC
    if gzipped:
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        stack.callback(stream.close)
    elif path.name.lower().endswith(".gz") and head:
        raise JobFileError(f"{path}: the name ends in .gz but the file is not gzip-compressed")
    if _cr_only(path, gzipped):
        stream = io.BufferedReader(_CrAsLf(stream))
    return stream, gzipped


def _cr_only(path: Path, gzipped: bool) -> bool:
    """True when the file's lines end in CR alone: its first line ending is a CR not
    followed by LF.

    The first line (a header, a comment, an id) is where the file's own ending shows: a
    cell's line breaks come later and may be of another kind (Excel's "CSV (Macintosh)" ends
    records in CR and breaks lines inside cells with LF; an LF file's cells may hold CRs).
    Read through a handle of its own (a buffer's peek may stop between a CRLF's two bytes),
    one byte further when the head ends in CR, to see what follows it.
    """
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as handle:
            head = handle.read(_CR_SNIFF_BYTES)
            if head.endswith(b"\r"):
                head += handle.read(1)
    except (OSError, EOFError, zlib.error):
        return False  # a damaged .gz: the line reader reports it where it happens
    ending = _LINE_END.search(head)
    return ending is not None and ending.group() == b"\r"


# The first line ending of a file: CRLF, LF or a lone CR.
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")


class _CrAsLf(io.RawIOBase):
    """A byte stream with every CR read as LF, and a CRLF as one LF (for files whose lines
    end in CR alone; joined with a Windows file, its CRLFs are one line break each)."""

    def __init__(self, inner: io.BufferedIOBase) -> None:
        self._inner = inner
        # The last chunk ended in a CR: an LF starting the next one is that CR's.
        self._after_cr = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            data = self._inner.read(len(view))
            if not data:
                return 0
            if self._after_cr and data.startswith(b"\n"):
                data = data[1:]
            self._after_cr = data.endswith(b"\r")
            if data:
                break
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        view[: len(data)] = data
        return len(data)


def _lines(
    stream: io.BufferedIOBase,
    path: Path,
    codec: str,
    encoding: str,
    max_line_bytes: int,
    gzipped: bool,
    lenient_through: int = 0,
) -> Iterator[_Line]:
    """Yield ``(line_number, text)`` per physical line, the text with its line ending.

    The ending stays on because every consumer wants it: the txt and JSONL readers strip
    whitespace anyway, and ``csv`` needs it to keep newlines inside quoted fields; so no
    line is copied just to cut it off. A line longer than ``max_line_bytes`` (not counting
    its ending) is skipped in bounded reads and yielded as an :class:`_Oversize`, so memory
    is bounded by the cap, not by the longest line. Lines up to ``lenient_through`` hold
    rows stored already (see :func:`read_job`): their bytes are decoded leniently.
    """
    readline = stream.readline
    # Room for a line of exactly the cap plus "\r\n"; anything that fills it is too long.
    limit = max_line_bytes + 2
    lineno = 0
    # Two UTF-8 exports joined with cat: the second one's BOM starts a line mid-file.
    utf8 = codecs.lookup(codec).name == "utf-8"
    try:
        while True:
            data = readline(limit)
            if not data:
                if lineno < lenient_through:
                    raise JobFileError(
                        f"{path}: the file ends at line {lineno}, before line "
                        f"{lenient_through}, where the rows already stored for this job end; "
                        "was it changed? Run with --new-job to start again."
                    )
                return
            lineno += 1
            if lineno == 1:
                if not utf8 and data.startswith(_UTF8_BOM) and not lenient_through:
                    # The mark says UTF-8: read as the encoding given, every accented letter
                    # came out as two wrong ones (café as cafÃ©) and the run went on.
                    raise JobFileError(
                        f"{path}: the file starts with a UTF-8 byte-order mark, so it is "
                        f"UTF-8, not {encoding}; run again without --encoding"
                    )
                data = _strip_file_head(data, path)
            elif utf8 and data.startswith(_UTF8_BOM):
                data = data[len(_UTF8_BOM) :]
            if len(data) > max_line_bytes:
                if len(data) == limit and not data.endswith(b"\n"):
                    while True:
                        more = readline(_SKIP_CHUNK)
                        if not more or more.endswith(b"\n"):
                            break
                    yield lineno, _oversize(data, codec)
                    continue
                ending = 2 if data.endswith(b"\r\n") else 1 if data.endswith(b"\n") else 0
                if len(data) - ending > max_line_bytes:
                    yield lineno, _oversize(data, codec)
                    continue
            try:
                text = data.decode(codec, "replace" if lineno <= lenient_through else "strict")
            except UnicodeDecodeError as exc:
                # We ask the stream where we are only here, on the way out, rather than
                # keep a running offset for every line. The line starts len(data) before
                # that (after the BOM, on line 1, as the BOM is cut from data).
                try:
                    start: int | None = stream.tell() - len(data)
                except (OSError, ValueError):  # a pipe cannot tell; the line number must do
                    start = None
                raise _undecodable(path, encoding, lineno, start, data, exc, gzipped) from None
            yield lineno, text
    except EOFError as exc:
        raise JobFileError(
            f"{path}: the gzip data ends early {_after(lineno)} (a truncated file, or one "
            f"still being written); {_gzip_remedy(path)}"
        ) from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise JobFileError(
            f"{path}: the gzip data is corrupt {_after(lineno)} ({exc}); {_gzip_remedy(path)}"
        ) from exc
    except OSError:
        with _reading(path):  # a read that failed names no file: the job's, then
            raise


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Make a read error in the block name ``path``: a read that fails (EIO from a failing
    disk, or a network mount that dropped) names no file, and was then taken for a failure
    to write the output."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


def _after(lineno: int) -> str:
    """Where in the file a read failed: after a line, or before the first one."""
    return f"after line {lineno}" if lineno else "before its first line"


def _gzip_remedy(path: Path) -> str:
    # A job runs only from a file that reads whole (a partial job must not spend quota);
    # the readable part can still be had, as a file of its own.
    return (
        "the rest is missing: re-create the file, or save the part that reads with "
        f"`gzip -dc {path} > part.txt` (gzip stops with an error at the damage) and use that"
    )


def _strip_file_head(content: bytes, path: Path) -> bytes:
    """Drop a UTF-8 BOM from the first line; refuse files that are clearly not text we read."""
    if content.startswith(_UTF8_BOM):
        return content[len(_UTF8_BOM) :]
    # UTF-32's marks first: the little-endian one starts with UTF-16's.
    wide = next((name for bom, name in _WIDE_BOMS if content.startswith(bom)), None)
    if wide is not None:
        raise JobFileError(
            f"{path}: the file is {wide} (it starts with a {wide} byte-order mark); save it "
            "as UTF-8 (in Excel: 'CSV UTF-8')"
        )
    if _wide_text(content):
        raise JobFileError(
            f"{path}: the file looks like UTF-16 (or UTF-32) without a byte-order mark: every "
            "other byte of its first line is zero; save it as UTF-8 (in Excel: 'CSV UTF-8'), "
            "or convert it (iconv -f utf-16le -t utf-8 FILE > FILE.utf8)"
        )
    if content.startswith(_ZIP_MAGIC):
        raise JobFileError(
            f"{path}: this is a ZIP archive (an Excel .xlsx workbook?), not a text job file; "
            "export the sheet as CSV"
        )
    kind = next((name for magic, name in _OTHER_COMPRESSION if content.startswith(magic)), None)
    if kind is None and _BZIP2.match(content):
        kind = "bzip2"
    if kind is not None:
        raise JobFileError(
            f"{path}: the file is {kind}-compressed; only gzip-compressed job files are read: "
            f"decompress it, or gzip it instead"
        )
    if content.startswith(_OLE2_MAGIC):
        raise JobFileError(
            f"{path}: this is an Excel 97-2003 workbook (.xls) or another Office document, "
            "not a text job file; export the sheet as CSV UTF-8"
        )
    return content


def _wide_text(line: bytes) -> bool:
    """Whether a first line reads as UTF-16 or UTF-32 text without a byte-order mark: ASCII
    written in either puts a zero beside every character, so one half of its bytes (the odd
    ones little-endian, the even ones big-endian) are all zero. One stray NUL is a row's
    problem, not the file's."""
    head = line[:64].rstrip(b"\r\n")
    if len(head) < 4 or head.count(0) * 2 < len(head) - 1:
        return False
    return not any(head[1::2]) or not any(head[0::2])


def _undecodable(
    path: Path,
    encoding: str,
    lineno: int,
    line_offset: int | None,
    content: bytes,
    exc: UnicodeDecodeError,
    gzipped: bool,
) -> JobFileError:
    """Build the error for a line that does not decode, naming line and byte offset."""
    bad = content[exc.start : exc.start + 1]
    if line_offset is None:
        position = f"byte 0x{bad.hex()} at byte {exc.start + 1} of the line"
    else:
        where = "of the decompressed data" if gzipped else "of the file"
        position = f"byte 0x{bad.hex()} at byte offset {line_offset + exc.start} {where}"
    if codecs.lookup(encoding).name not in ("utf-8", "utf-8-sig"):
        hint = "run again with the file's real encoding (--encoding), or convert it to UTF-8"
    else:
        # Windows-1252 reads every letter Latin-1 does, and also the curly quotes, dashes
        # and euro sign (bytes 0x80-0x9F) Latin-1 makes control characters: a file whose
        # first odd byte is an umlaut may hold a euro sign further on, and the run would
        # succeed with control characters in its pass-through columns.
        hint = (
            "if the file is Windows-1252 or Latin-1 (older Excel exports), convert it "
            "(iconv -f cp1252 -t utf-8 FILE > FILE.utf8) or, with broker run, give "
            "--encoding cp1252"
        )
    return JobFileError(f"{path}: line {lineno}: {position} is not valid {encoding}; {hint}")


def _oversize(data: bytes, codec: str) -> _Oversize:
    # Four bytes per character is the most any codec we accept needs.
    start = data[: 4 * _PREVIEW_CHARS + 4].decode(codec, "replace")
    return _Oversize(_preview(start.rstrip("\r\n")))


def _preview(text: str) -> str:
    """The first characters of a bad line, for ``JobRow.raw``."""
    if len(text) <= _PREVIEW_CHARS:
        return text
    return text[:_PREVIEW_CHARS] + "..."


def _too_long(max_line_bytes: int) -> str:
    return f"line longer than {max_line_bytes} bytes"


# -- lines to rows -------------------------------------------------------------------------


def _rows(
    path: Path,
    fmt: JobFormat | None,
    codec: str,
    encoding: str,
    max_line_bytes: int,
    check: Callable[[str], AsinCheck],
    stored_through_line: int = 0,
) -> Iterator[JobRow]:
    """Open the file, pick the format and yield its rows."""
    # A table is refused as a list only when its name made it one: a caller who names the
    # format gets what it asked for.
    detected = fmt is None
    if fmt is None:
        fmt = detect_format(path)
    with ExitStack() as stack:
        stream, gzipped = _open(stack, path)
        lines = _lines(stream, path, codec, encoding, max_line_bytes, gzipped, stored_through_line)
        if fmt == "txt":
            yield from _txt_rows(lines, path if detected else None, max_line_bytes, check)
        elif fmt == "csv":
            yield from _csv_rows(lines, path, max_line_bytes, check)
        else:
            yield from _jsonl_rows(lines, path, max_line_bytes, check)


def _is_asin_header(text: str) -> bool:
    """True for a plain list's first line that is only the column's name, ``asin``."""
    return text.strip().strip("\"'").strip().lower() == "asin"


def _is_json_row(text: str) -> bool:
    """True for a line that is a JSON object with an ``asin`` field (any case): a JSON
    Lines job's row."""
    if not text.startswith("{"):
        return False
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return False
    return isinstance(value, dict) and any(
        isinstance(name, str) and name.strip().lower() == "asin" for name in value
    )


def _refuse_a_table(path: Path, lineno: int, text: str) -> None:
    """Refuse a plain list whose first line is a table's header with an ``asin`` column
    (Excel's "Text (Tab delimited)", a Seller Central report named .txt) or a JSON Lines
    row (``jq -c`` piped in without ``--input jsonl``): read as a list of ids, every row
    was invalid and the run ended 0.

    Raises:
        JobFileError: naming the delimiter and how to have the file read as a table.
    """
    if _is_json_row(text):
        raise JobFileError(
            f"{path}: line {lineno} is a JSON object with an asin field (JSON Lines), but the "
            "file is read as a list of ids, one per line: rename it to .jsonl (a job read "
            "from stdin: give --input jsonl)"
        )
    delimiter = _csv_delimiter(text)
    cells = _split_header(text, delimiter)
    if len(cells) > 1 and any(_is_asin_header(cell) for cell in cells):
        name = "tab" if delimiter == "\t" else repr(delimiter)
        raise JobFileError(
            f"{path}: line {lineno} is a table's header ({name}-separated, with an asin "
            "column), but the file is read as a list of ids, one per line: rename it to "
            ".tsv or .csv (a job read from stdin: give --input csv)"
        )


def _txt_rows(
    lines: Iterable[_Line],
    path: Path | None,
    max_line_bytes: int,
    check: Callable[[str], AsinCheck],
) -> Iterator[JobRow]:
    """A plain list's rows; with ``path``, a first line that is a table's header is
    refused (:func:`_refuse_a_table`)."""
    first = True
    for lineno, text in lines:
        if isinstance(text, _Oversize):
            yield JobRow(
                lineno, text.preview, None, error=_too_long(max_line_bytes), code=INVALID_ROW
            )
            first = False
            continue
        text = text.strip()
        if not text or text[0] == "#":
            continue
        if first:
            first = False
            if _is_asin_header(text):
                # A one-column sheet saved as text keeps its header. The first line only, for
                # good: which lines are rows must not change between releases, as the rows
                # a stopped job stored are its rows (by their lines) when it resumes.
                continue
            if path is not None:
                _refuse_a_table(path, lineno, text)
        if "#" in text:
            comment = _TRAILING_COMMENT.search(text)
            if comment is not None:
                text = text[: comment.start()].rstrip()
        verdict = check(text)
        yield _row(lineno, text, verdict.asin, verdict.store, None, None, verdict.reason)


class _CsvFeed:
    """Lines for ``csv.reader``, remembering where we are, which lines were too long, and
    which lines the current record took.

    ``csv.reader`` pulls lines itself and never reads past the end of a record, so
    ``lineno`` after a record is that record's last physical line, and ``taken`` holds the
    record's lines (kept so a record that turns out malformed can be read again from its
    second line). An over-long line is fed as an empty line and noted in ``oversize_line``,
    so the record holding it can be reported invalid without the reader ever holding the
    line.
    """

    __slots__ = ("_lines", "_replay", "lineno", "oversize_line", "taken")

    def __init__(self, lines: Iterator[_Line]) -> None:
        self._lines = lines
        self._replay: collections.deque[_Line] = collections.deque()
        self.lineno = 0
        self.oversize_line: int | None = None
        self.taken: list[_Line] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def take_oversize(self) -> int | None:
        """Return the first over-long line since the last call (None if none) and forget it."""
        lineno, self.oversize_line = self.oversize_line, None
        return lineno

    def replay(self, lines: Iterable[_Line]) -> None:
        """Feed ``lines`` again, before any line not read yet."""
        self._replay.extendleft(reversed(list(lines)))

    def __next__(self) -> str:
        line = self._replay.popleft() if self._replay else next(self._lines)
        self.taken.append(line)
        lineno, text = line
        self.lineno = lineno
        if isinstance(text, _Oversize):
            if self.oversize_line is None:
                self.oversize_line = lineno
            return "\n"
        return text


@dataclass(frozen=True, slots=True)
class _CsvLayout:
    """Where the columns are, decided from the header."""

    delimiter: str
    width: int
    asin: int
    marketplace: int | None
    resources: int | None
    extra: tuple[tuple[int, str], ...]


def _csv_rows(
    lines: Iterator[_Line], path: Path, max_line_bytes: int, check: Callable[[str], AsinCheck]
) -> Iterator[JobRow]:
    feed = _CsvFeed(lines)
    first = next((text for text in feed if not _blank_record(text)), None)
    if first is None:
        return  # an empty file (or only blank lines): no header, no rows
    if feed.take_oversize() is not None:
        raise JobFileError(f"{path}: the CSV header line is longer than {max_line_bytes} bytes")
    # Only the line end stripped: "sep=\t" names the tab.
    declared = _SEP_LINE.fullmatch(first.rstrip("\r\n").lstrip("\ufeff"))
    if declared is not None:
        # Excel's "sep=;" line names the delimiter; the header comes after it.
        first = next((text for text in feed if not _blank_record(text)), None)
        if first is None:
            return
        if feed.take_oversize() is not None:
            raise JobFileError(f"{path}: the CSV header line is longer than {max_line_bytes} bytes")
    header_line = feed.lineno
    delimiter = declared.group(1) if declared is not None else _csv_delimiter(first)
    reader = csv.reader(itertools.chain((first,), feed), delimiter=delimiter)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise JobFileError(f"{path}: line {header_line}: malformed CSV header: {exc}") from None
    layout = _csv_layout(header, delimiter, path, header_line)
    again = _header_cells(header)
    # Malformed rows still carry the other columns (empty), so every row of the job has the
    # same pass-through columns and a CSV output's header can be taken from any row.
    blank = {name: "" for _, name in layout.extra} or None
    while True:
        feed.taken = []
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if str(exc).startswith(_LONE_CR):
                error = _LONE_CR_SAID
            elif not str(exc).startswith(_FIELD_LIMIT):
                error = f"malformed CSV: {exc}"
            else:
                # A quoted cell over csv's limit, its lines each within the cap: read on to
                # the record's end. Well quoted, it is one invalid row (the lines inside the
                # cell are no rows, whatever they look like); a quote left open is what the
                # branch below makes of it.
                start, raw = _record_start(feed.taken, feed.lineno)
                verdict = _read_long_record(feed, delimiter)
                if verdict is not None:
                    feed.take_oversize()
                    yield JobRow(start, raw, None, extra=blank, error=verdict, code=INVALID_ROW)
                    reader = csv.reader(feed, delimiter=delimiter)
                    continue
                error = _NEVER_CLOSED
        else:
            if len(feed.taken) < 2 or _quotes_closed(feed.taken, delimiter):
                start, raw = _record_start(feed.taken, feed.lineno)
                if feed.take_oversize() is not None:
                    yield JobRow(
                        start,
                        raw,
                        None,
                        extra=blank,
                        error=_too_long(max_line_bytes),
                        code=INVALID_ROW,
                    )
                    continue
                if not any(cell.strip() for cell in record) or _header_again(
                    record, feed.taken, again, layout.asin
                ):
                    continue
                yield _csv_row(start, record, layout, check)
                continue
            error = _NEVER_CLOSED
        # One bad record costs one invalid row, not the file: report its first line and
        # read the lines after it again with a fresh reader (a quote left open would
        # otherwise swallow the rest of the file into one cell).
        taken = feed.taken
        feed.take_oversize()
        start, raw = _record_start(taken, feed.lineno)
        yield JobRow(start, raw, None, extra=blank, error=error, code=INVALID_ROW)
        feed.replay(taken[1:])
        reader = csv.reader(feed, delimiter=delimiter)


#: How csv's error about a field over its size limit starts.
_FIELD_LIMIT: Final = "field larger than field limit"
#: csv's words for a lone CR inside an unquoted cell (a file whose lines end in LF or CRLF
#: keeps its cells' lone CRs: an old-Mac export joined after it is not split there)...
_LONE_CR: Final = "new-line character seen in unquoted field"
#: ... and ours, which say what it is and how to mend it
_LONE_CR_SAID: Final = (
    "malformed CSV: a lone carriage return (an old-Mac line end) inside an unquoted cell; "
    "the file's lines end otherwise: give it one kind of line end (dos2unix -c mac, or save "
    "it again as CSV UTF-8), or quote the cell"
)


def _record_start(taken: list[_Line], lineno: int) -> tuple[int, str]:
    """A record's first line number and the start of its text (for ``JobRow.raw``)."""
    if not taken:
        return lineno, ""
    start, text = taken[0]
    return start, text.preview if isinstance(text, _Oversize) else _preview(text.rstrip("\r\n"))


#: How much of a record past csv's field limit is read, and kept to be read again as rows
#: should its quote turn out to be left open (characters): a well-quoted field longer than
#: this is taken for a quote left open.
_LONG_RECORD_KEPT: Final = 16 * 1024 * 1024

_NEVER_CLOSED: Final = (
    "malformed CSV: a quoted field starts on this line and is never closed "
    '(a stray " ?); the following lines were read as rows of their own'
)


def _read_long_record(feed: _CsvFeed, delimiter: str) -> str | None:
    """Read a record csv gave up on (a field over its limit) to its end, judging its quotes.

    Returns the invalid row's reason when the record is well quoted; None when a quote was
    left open (or closed mid-field), or the record runs on past :data:`_LONG_RECORD_KEPT`:
    ``feed.taken`` then holds the lines read, to be read again as rows (a stray quote
    never costs more than its own row, however much of the file follows it).
    """
    scan = _RecordScan(delimiter)
    ended = False
    for _, text in feed.taken:
        ended = scan.read(text if isinstance(text, str) else "\n")
        if ended:
            break
    kept = sum(len(text) for _, text in feed.taken if isinstance(text, str))
    while not ended and kept <= _LONG_RECORD_KEPT:
        line = next(feed, None)
        if line is None:
            break
        ended = scan.read(line)
        kept += len(line)
    if ended and scan.well_quoted:
        return (
            f"malformed CSV: a field longer than {csv.field_size_limit()} characters "
            f"(the record runs to line {feed.lineno})"
        )
    return None


class _RecordScan:
    """Follows one CSV record's quotes, a line at a time, as a strict reader would: where
    the record ends, and whether each quoted field closed at the end of a field."""

    __slots__ = ("_delimiter", "_state", "well_quoted")

    def __init__(self, delimiter: str) -> None:
        self._delimiter = delimiter
        self._state = "start"  # of a field; or "plain", "quoted", "closed"
        self.well_quoted = True

    def read(self, text: str) -> bool:
        """Follow one more line of the record; True when the record ends with it."""
        i, n = 0, len(text)
        while i < n:
            if self._state == "quoted":
                j = text.find('"', i)
                if j < 0:
                    return False  # the line break is the cell's
                if text.startswith('"', j + 1):
                    i = j + 2  # a doubled quote: one quote in the cell
                    continue
                self._state, i = "closed", j + 1
                continue
            ch = text[i]
            if ch == "\n" or (ch == "\r" and text.startswith("\n", i + 1)):
                return True
            if ch == self._delimiter:
                self._state = "start"
            elif self._state == "start":
                self._state = "quoted" if ch == '"' else "plain"
            elif self._state == "closed":
                self.well_quoted = False  # a quote closed mid-field
                self._state = "plain"
            i += 1
        return self._state != "quoted"


def _header_names(header: list[str]) -> list[str]:
    """A header's column names as written, without the blanks and a BOM around them."""
    return [cell.strip().lstrip("\ufeff").strip() for cell in header]


def _header_cells(header: list[str]) -> list[str]:
    """A header's column names in lower case: what tells it again (any case)."""
    return [name.lower() for name in _header_names(header)]


def _header_again(record: list[str], taken: list[_Line], header: list[str], asin: int) -> bool:
    """Whether a record is no row but a second export's head, as ``cat`` of two CSV exports
    leaves it: the header again (any case), or an Excel ``sep=`` line. ``asin``: the asin
    column's place, looked at first (a row's id is never "asin": most rows stop there)."""
    if len(record) == len(header) and record[asin].strip().lower() == "asin":
        return _header_cells(record) == header
    if len(taken) != 1 or not isinstance(taken[0][1], str):
        return False
    line = taken[0][1].lstrip("\ufeff")
    return line[:4].lower() == "sep=" and _SEP_LINE.fullmatch(line.rstrip("\r\n")) is not None


def _quotes_closed(lines: list[_Line], delimiter: str) -> bool:
    """True when a record read over several lines is well quoted: read again strictly, each
    quoted field opens at a field's start and its closing quote ends the field.

    A quote left open (a stray ") makes the reader take the following lines into its field
    until the next quote, which then stands mid-field (``12" vinyl`` on a later row) or is
    never found: a strict reading refuses both. A literal quote inside an unquoted field
    (``12" vinyl,"two lines"``) is data, as csv, Excel and LibreOffice read it. A line
    too long to keep is judged by its quotes' count (its text is gone): even is closed.
    """
    if any(isinstance(text, _Oversize) for _, text in lines):
        return sum(text.count('"') for _, text in lines if isinstance(text, str)) % 2 == 0
    try:
        for _ in csv.reader(
            io.StringIO("".join(text for _, text in lines if isinstance(text, str))),
            delimiter=delimiter,
            strict=True,
        ):
            pass
    except csv.Error:
        return False
    return True


#: What separates the resource names of a CSV ``resources`` cell.
_RESOURCE_SPLIT: Final = re.compile(r"[\s,;|]+")


def _csv_row(
    lineno: int, record: list[str], layout: _CsvLayout, check: Callable[[str], AsinCheck]
) -> JobRow:
    size = len(record)
    raw = record[layout.asin] if layout.asin < size else ""
    marketplace = None
    if layout.marketplace is not None and layout.marketplace < size:
        marketplace = record[layout.marketplace].strip() or None
    resources = None
    if layout.resources is not None and layout.resources < size:
        # A JSON Lines row's list, in a cell: names apart by commas, semicolons, bars or
        # blanks; an empty cell asks the configured ones.
        names = _RESOURCE_SPLIT.split(record[layout.resources])
        resources = tuple(name for name in names if name) or None
    extra = {name: record[i] if i < size else "" for i, name in layout.extra} or None
    error = None
    if size > layout.width and any(cell.strip() for cell in record[layout.width :]):
        error = (
            f"row has {size} fields but the header has {layout.width} (an unquoted "
            f"{layout.delimiter!r} inside a field?)"
        )
    elif layout.asin >= size:
        error = f"row has {size} fields but the header has {layout.width}: no asin value"
    if error is not None:
        return JobRow(lineno, raw, None, marketplace, resources, extra, error, code=INVALID_ROW)
    verdict = check(raw)
    market = marketplace or verdict.store
    return _row(lineno, raw, verdict.asin, market, resources, extra, verdict.reason)


def _csv_delimiter(header_line: str) -> str:
    """Pick the delimiter: ``,`` unless only another one splits out an ``asin`` header."""
    for delimiter in _CSV_DELIMITERS:
        if delimiter in header_line and any(
            cell.strip().lower() == "asin" for cell in _split_header(header_line, delimiter)
        ):
            return delimiter
    return ","


def _split_header(line: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return []


#: How many of a header's names a refusal quotes.
_FOUND_NAMES: Final = 8


def _blank_record(text: str) -> bool:
    """True for a line before the header that holds no cell: blank, or only delimiters
    and empty quotes (``,,,``: a sheet whose used range starts with an empty row)."""
    return not text.strip().strip(",;\t|\"' ")


def _no_asin_column(names: list[str], delimiter: str) -> str:
    """What a header without an ``asin`` column is told: its names as its own delimiter
    splits them, the ones that look like the id column first, and what to rename.

    Without an ``asin`` the delimiter is taken to be ``,``, so a tab- or semicolon-separated
    header is one long name: shown so, cut short, it hid its ``asin1`` (a Seller Central
    report) and told to add the header it has.
    """
    separated = ""
    if len(names) == 1 or (delimiter == "," and any("\t" in name for name in names)):
        # One name, or names holding tabs (a tab-separated header with a comma in a name):
        # split again by the delimiter that gives the most. Names as parsed otherwise: a
        # quoted cell of a comma-separated header may hold semicolons.
        line = delimiter.join(names)
        others = [d for d in _CSV_DELIMITERS if d != delimiter]
        best = max(others, key=lambda d: len(_split_header(line, d)))
        split = _split_header(line, best)
        if len(split) > len(names):
            separated = f", {'tab' if best == chr(9) else repr(best)}-separated"
            names = [name.strip() for name in split]
    likely = [name for name in names if "asin" in name.lower()]
    shown = likely + [name for name in names if name not in likely]
    # A few names, each cut short: a binary file read as text has thousands of bytes.
    found = ", ".join(repr(_preview(name)) for name in shown[:_FOUND_NAMES]) or "none"
    if len(names) > _FOUND_NAMES:
        found += f", ... ({len(names)} columns)"
    if likely:
        fix = f"rename the id column ({_preview(likely[0])!r}?) to asin"
    else:
        fix = "the first line that is not blank must be the header, its id column named asin"
    return f"the CSV header has no 'asin' column (found{separated}: {found}); {fix}"


def _csv_layout(header: list[str], delimiter: str, path: Path, lineno: int) -> _CsvLayout:
    """Find the asin, marketplace and resources columns and name the others; refuse a header
    without asin."""
    names = _header_names(header)
    lowered = [name.lower() for name in names]
    asin = [i for i, name in enumerate(lowered) if name == "asin"]
    if not asin:
        raise JobFileError(f"{path}: line {lineno}: {_no_asin_column(header, delimiter)}")
    marketplace = [i for i, name in enumerate(lowered) if name == "marketplace"]
    resources = [i for i, name in enumerate(lowered) if name == "resources"]
    for column, where in (("asin", asin), ("marketplace", marketplace), ("resources", resources)):
        if len(where) > 1:
            raise JobFileError(
                f"{path}: line {lineno}: the CSV header has {len(where)} {column!r} columns "
                f"(columns {', '.join(str(i + 1) for i in where)}); keep one"
            )
    special = {asin[0], *marketplace, *resources}
    given = [(i, name) for i, name in enumerate(names) if i not in special and name]
    # A column with no name is named by its place, after the named ones: a header's own
    # "column2" keeps its name (and its data) whatever blank column stands before it.
    blank = [(i, f"column{i + 1}") for i, name in enumerate(names) if i not in special and not name]
    # Duplicate names get a pandas-style ".1", ".2" suffix so no column is lost: the first
    # suffix no column has, since the header may itself name one "note.1".
    taken = {name for _, name in given + blank}
    extra: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i, key in given + blank:
        name, count = key, 0
        while name in seen or (count and name in taken):
            count += 1
            name = f"{key}.{count}"
        seen.add(name)
        extra.append((i, name))
    return _CsvLayout(
        delimiter,
        len(header),
        asin[0],
        marketplace[0] if marketplace else None,
        resources[0] if resources else None,
        tuple(sorted(extra)),
    )


def _jsonl_rows(
    lines: Iterable[_Line], path: Path, max_line_bytes: int, check: Callable[[str], AsinCheck]
) -> Iterator[JobRow]:
    first = True
    for lineno, text in lines:
        if isinstance(text, _Oversize):
            yield JobRow(
                lineno, text.preview, None, error=_too_long(max_line_bytes), code=INVALID_ROW
            )
            first = False
            continue
        if not text.strip():
            continue
        if first:
            _refuse_json_document(path, lineno, text.strip())
            first = False
        yield _jsonl_row(lineno, text, check)


def _refuse_json_document(path: Path, lineno: int, text: str) -> None:
    """Refuse a JSON document where JSON Lines is expected (what json.dump and jq write):
    read line by line, an array's or a pretty-printed object's lines are each an invalid
    row, the run ends with exit 0 and nothing looked up.

    A whole array of objects on the first line (what json.dump writes by default) is such
    a document too; any other first line that is a JSON value of its own (``[1, 2]``) stays
    one row, as every line of JSON Lines is, and so does an array on a later line.

    Raises:
        JobFileError: the first line opens an array of objects (closed on it or not), or is
            an object's lone ``{``.
    """
    if _opens_object_array(text):
        raise JobFileError(
            f"{path}: line {lineno}: a JSON array, not JSON Lines (one object per line): "
            f"convert it with jq -c '.[]' {path} > job.jsonl"
        )
    if text == "{":
        raise JobFileError(
            f"{path}: line {lineno}: an object spread over lines (pretty-printed JSON), not "
            f"JSON Lines (one object per line): convert it with jq -c . {path} > job.jsonl"
        )


def _jsonl_row(lineno: int, text: str, check: Callable[[str], AsinCheck]) -> JobRow:
    try:
        # Without its line end: an error at the end of the line is then reported where it
        # is, not at column 1 of a second line.
        value = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        return _bad_line(lineno, text, f"not valid JSON: {exc.msg} at column {exc.colno}")
    except (ValueError, RecursionError) as exc:
        # json raises plain ValueError for an integer past the int-digit limit, and
        # RecursionError for very deep nesting; both are bad lines, not bad files.
        kind = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return _bad_line(lineno, text, f"not valid JSON: {kind}")
    if "\\u" in text and _has_lone_surrogate(value):
        # "\ud800" is valid JSON but not encodable text; it would break the UTF-8 output.
        return _bad_line(lineno, text, "contains an unpaired surrogate escape")
    if not isinstance(value, dict):
        hint = ""
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            hint = " (an array of objects: JSON Lines holds one per line; jq -c '.[]' splits it)"
        return _bad_line(
            lineno, text, f"a JSON Lines row must be an object, got {_json_kind(value)}{hint}"
        )
    twice = _given_twice(text)
    if twice is not None:
        # The JSON reader keeps the last; another tool may keep the first: which one the
        # writer meant is unknown, so the row is not looked up at all.
        return _bad_line(lineno, text, f'"{twice}" is given twice')
    asin = value.get("asin")
    raw = asin if isinstance(asin, str) else _preview(text.strip())
    error = None
    marketplace = value.get("marketplace")
    if marketplace is not None and not isinstance(marketplace, str):
        error = f'"marketplace" must be a string, got {_json_kind(marketplace)}'
        marketplace = None
    elif isinstance(marketplace, str):
        marketplace = marketplace.strip() or None
    resources_value = value.get("resources")
    resources: tuple[str, ...] | None = None
    if resources_value is not None:
        if isinstance(resources_value, list) and all(
            isinstance(item, str) for item in resources_value
        ):
            resources = tuple(resources_value)
        else:
            error = '"resources" must be a list of strings'
    extra = {
        # A NaN or an infinity (Python's json reads them) would make the output invalid
        # JSON: such a value travels as its text, as every value once did.
        key: item if _finite(item) else _compact_json(item)
        for key, item in value.items()
        if key not in _JSONL_KEYS
    } or None
    if extra is not None and error is None:
        # "Marketplace" or " resources" would travel as pass-through data, the row looked
        # up in the default store or with the default resources, and nothing said.
        near = next((key for key in extra if key.strip().lower() in _JSONL_KEYS), None)
        if near is not None:
            error = (
                f"{json.dumps(near)} is not a field: field names are case-sensitive "
                f'(write "{near.strip().lower()}")'
            )
    if asin is None:
        error = _missing_asin(value)
    elif not isinstance(asin, str):
        error = f'"asin" must be a string, got {_json_kind(asin)}'
    if error is not None:
        return JobRow(lineno, raw, None, marketplace, resources, extra, error, code=INVALID_ROW)
    verdict = check(raw)
    market = marketplace or verdict.store
    return _row(lineno, raw, verdict.asin, market, resources, extra, verdict.reason)


def _bad_line(lineno: int, text: str, error: str) -> JobRow:
    """A JSON Lines line that is not a query, shown by its first characters."""
    return JobRow(lineno, _preview(text.strip()), None, error=error, code=INVALID_ROW)


def _given_twice(text: str) -> str | None:
    """The field of ``_JSONL_KEYS`` an object line names twice at its top level, or None.

    Read again keeping every pair only when a name occurs twice in the text at all, or when
    a field name has a ``\\u`` escape (``"\\u0061sin"`` is ``"asin"`` too), so the usual
    line costs three substring counts (and a search, when it has an escape).
    """
    if all(text.count(f'"{key}"') < 2 for key in _JSONL_KEYS) and (
        "\\u" not in text or _ESCAPED_NAME.search(text) is None
    ):
        return None
    pairs = json.loads(text, object_pairs_hook=list)
    names = [name for name, _ in pairs]
    return next((key for key in sorted(_JSONL_KEYS) if names.count(key) > 1), None)


def _has_lone_surrogate(value: object) -> bool:
    try:
        _compact_json(value).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _missing_asin(value: Mapping[str, object]) -> str:
    if "asin" in value:
        return '"asin" is null: give the ASIN as a string'
    near = [key for key in value if key.strip().lower() == "asin"]
    if near:
        return f'no "asin" field (found {near[0]!r}; field names are case-sensitive)'
    return 'no "asin" field'


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _finite(value: object) -> bool:
    """True when ``value`` holds no NaN or infinity, however deep."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    if isinstance(value, list):
        return all(_finite(item) for item in value)
    return True


def _compact_json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# -- sniffing ------------------------------------------------------------------------------


def _sniff(path: Path) -> JobFormat:
    """Guess the format of a file with an unknown extension from its first lines."""
    with ExitStack() as stack:
        stream, _ = _open(stack, path)
        budget = _SNIFF_BYTES
        try:
            for _ in range(_SNIFF_LINES):
                data = stream.readline(budget)
                if not data:
                    break
                budget -= len(data)
                text = data.decode("utf-8", "replace").lstrip("\ufeff").strip()
                if text and not text.startswith("#"):
                    return _guess(text)
                if budget <= 0:
                    break
        except (EOFError, gzip.BadGzipFile, zlib.error):
            # Let the real read report the damage, with line numbers.
            return "txt"
        except OSError:
            with _reading(path):  # a read that failed names no file: the job's, then
                raise
    return "txt"


def _opens_object_array(text: str) -> bool:
    """True when a stripped first line opens a JSON array of objects (``[``, ``[{...``):
    what json.dump and jq write, never an id in brackets (``[B00TEST001]``)."""
    return text.startswith("[") and text[1:].lstrip()[:1] in ("", "{")


def _guess(line: str) -> JobFormat:
    if line.startswith("{") or _opens_object_array(line):
        # An array of objects is JSON too: the JSON Lines reader refuses it, saying how to
        # convert it. "[B00TEST001]" is an id in brackets, and read as one.
        return "jsonl"
    if line.strip('"').strip().lower() == "asin":
        return "csv"
    if "://" in line:
        return "txt"
    comment = _TRAILING_COMMENT.search(line)
    if comment is not None:
        # A plain list's note ("B00TEST001  # for Anna, Bob"): its comma is no delimiter.
        line = line[: comment.start()]
    for delimiter in _CSV_DELIMITERS:
        if delimiter in line:
            return "csv"
    return "txt"
