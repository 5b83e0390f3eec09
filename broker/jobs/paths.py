"""Where ``broker run`` reads and writes: the job, the output, stdin and stdout, checked first.

Every path is settled and checked before anything is written, so a command line that would
overwrite its own input (``--out`` naming the job file, or a JSON Lines job inside the output
directory) is a usage error that leaves every file as it was (N10).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import filecmp
import glob
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

from broker.errors import JobFileError
from broker.jobs.lock import JobLock
from broker.progname import prog

__all__ = [
    "STDIN_FORMATS",
    "STDIO",
    "RunPaths",
    "StdinUnreadable",
    "UsageError",
    "ledger_path",
    "ordering_path",
    "output_format",
    "plan_paths",
    "refresh_path",
    "report_path",
    "stdin_copies",
    "stdin_copy",
]

#: The name that means stdin (as the job) or stdout (as ``--out``).
STDIO = "-"
_SUFFIX = {"jsonl": ".jsonl", "csv": ".csv", "sqlite": ".sqlite"}
#: The formats a job read from stdin may have (``--input``).
STDIN_FORMATS: Final = ("txt", "csv", "jsonl")
#: The random part of a name ``tempfile.mkstemp`` makes (its stdin copies' names end so).
_TEMP_SUFFIX_LEN: Final = 8
#: A stdin copy's temporary file younger than this (seconds) is left alone even unlocked:
#: its run may not have locked it yet.
_YOUNG_COPY_S: Final = 2.0


#: Output formats told by the name ``--out`` gives, when ``--format`` does not say.
_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".sqlite": "sqlite",
    ".sqlite3": "sqlite",
    ".db": "sqlite",
}


#: Names of compressed files: an output is never written compressed.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")
#: Names of formats the broker does not write (a .tsv holding JSON lines, a .json file no
#: JSON reader can read): taken only with --format, which says the user means it.
_OTHER_FORMATS = (".tsv", ".tab", ".json", ".xlsx", ".xls", ".parquet")


def output_format(out: str | None, given: str | None, default: str) -> str:
    """The output format: ``--format``, else the one ``--out``'s name tells (``x.csv``),
    else the config's ``[output] format`` (for ``--out -``, JSON lines if that is sqlite,
    which needs a file: the config's format is the one for files).

    Raises:
        UsageError: ``--out`` names a compressed file (``x.csv.gz``), or without
            ``--format`` a format the broker does not write (``x.tsv``, ``x.json``): the
            output would be other than its name says.
    """
    if out and out != STDIO and Path(out).suffix.lower() in _COMPRESSED:
        plain = Path(out).stem
        raise UsageError(
            f"--out {out}: the output is written uncompressed (it is appended to, row by row, "
            f"and read back to resume); name it {plain} and compress it once the run is done"
        )
    if given:
        return given
    if out and out != STDIO:
        suffix = Path(out).suffix.lower()
        if suffix in _OTHER_FORMATS:
            raise UsageError(
                f"--out {out}: the broker does not write {suffix} files (it would write "
                f"{default} under that name); name it .jsonl, .csv or .sqlite, or give "
                "--format to write one of them under this name"
            )
        return _BY_SUFFIX.get(suffix, default)
    if out == STDIO and default == "sqlite":
        return "jsonl"
    return default


def ledger_path(out: Path) -> Path:
    """The job's ledger (what is done, to resume) beside its output."""
    return out.with_name(out.name + ".ledger")


def report_path(out: Path) -> Path:
    """The job's invalid-row report beside its output."""
    return out.with_name(out.name + ".invalid.jsonl")


def refresh_path(out: Path) -> Path:
    """Where ``--refresh`` writes until it completes: beside the output, with its own ledger."""
    return out.with_name(out.name + ".refresh")


def ordering_path(out: Path) -> Path:
    """Where ``--ordered`` writes the output in input order before it replaces it."""
    return out.with_name(out.name + ".ordering")


def stdin_copy(out: Path, fmt: str) -> Path:
    """Where a ``-`` job writing ``out`` keeps its stdin read as ``fmt`` (``--input``)."""
    return out.with_name(f"{out.name}.stdin.{fmt}")


def stdin_copies(out: Path) -> list[Path]:
    """Where the saved stdin of a ``-`` job writing ``out`` may be: one name per ``--input``."""
    return [stdin_copy(out, fmt) for fmt in STDIN_FORMATS]


class UsageError(ValueError):
    """The command line asks for something impossible or destructive (exit 2)."""


class StdinUnreadable(OSError):
    """``broker run -`` cannot read its job from stdin (open for writing only:
    ``0>/dev/null``, nohup on a terminal), which is unreadable input (exit 66). A failed
    read of stdin names no file, and was told as an output that could not be written. (A
    closed stdin is ``/dev/null`` by then: the CLI opens it so at start.)"""


def _copy_stdin(target: BinaryIO) -> None:
    """Copy stdin to ``target``, a failure to read it told from one to write the copy.

    Raises:
        StdinUnreadable: stdin is closed or cannot be read.
    """
    if sys.stdin is None:  # a caller that did not open the standard streams first
        raise StdinUnreadable(errno.EBADF, "stdin is closed")
    source = sys.stdin.buffer
    while True:
        try:
            chunk = source.read(_COPY_CHUNK)
        except OSError as exc:
            raise StdinUnreadable(exc.errno, exc.strerror) from exc
        if not chunk:
            return
        target.write(chunk)


#: Bytes of stdin read at a time (``shutil.copyfileobj``'s size).
_COPY_CHUNK: Final = 64 * 1024


@dataclass(slots=True)
class RunPaths:
    """The settled paths of one run, and the temporary directory behind ``-`` if any.

    Attributes:
        job: the job file to read (a copy of stdin for ``-``).
        out: the output file the runner writes (a temporary one for ``--out -``).
        format: the output format.
        stdin: the job comes from stdin.
        to_stdout: the output goes to stdout once the run ends.
    """

    job: Path
    out: Path
    format: str
    stdin: bool = False
    to_stdout: bool = False
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def shown_out(self) -> str:
        """The output as the user named it."""
        return "stdout" if self.to_stdout else str(self.out)

    def read_stdin(self, *, new_job: bool = False, refresh: bool = False) -> None:
        """Copy stdin to :attr:`job` (the same bytes give the same job, so a rerun resumes).

        Written beside it first. A saved copy with the same bytes is left as it is. One
        with other bytes is replaced, under the job's lock, only when no job was made from
        it (no ledger: a first run refused early) or for ``new_job``; otherwise it is kept,
        so the input it holds still runs its job. For ``refresh`` (the job over on its new
        input) other bytes go to the refresh's own copy, :attr:`job` then names it, and the
        refresh's completion makes it the job's copy: until then the previous output keeps
        the input it was made from. A job another process runs keeps its copy.

        Raises:
            JobFileError: stdin differs from the copy of an existing job and neither
                ``new_job`` nor ``refresh`` is set; or another process runs the job
                (:class:`JobLockedError`).
        """
        self.job.parent.mkdir(parents=True, exist_ok=True)
        self._sweep_killed_copies()
        fd, temporary = tempfile.mkstemp(dir=self.job.parent, prefix=f".{self.job.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                # Held while the copy is under its temporary name: a later run removes only
                # copies nobody holds, those of runs killed while they read stdin.
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                _copy_stdin(handle)
                handle.flush()
                same = self.job.exists() and filecmp.cmp(temporary, self.job, shallow=False)
                if same and not refresh:
                    Path(temporary).unlink()
                    return
                ledger = ledger_path(self.out)
                with JobLock(ledger):
                    if refresh:
                        # A copy a stopped refresh left for other input: this one's is kept.
                        for stale in stdin_copies(refresh_path(self.out)):
                            stale.unlink(missing_ok=True)
                    if same:
                        Path(temporary).unlink()
                        return
                    if refresh and ledger.exists():
                        # The refresh's copy under the same --input.
                        fmt = self.job.name.rsplit(".", 1)[1]
                        side = stdin_copy(refresh_path(self.out), fmt)
                        os.replace(temporary, side)
                        self.job = side
                        return
                    if ledger.exists() and not new_job:
                        raise JobFileError(
                            f"the input on stdin differs from the saved input of this job "
                            f"({self._saved_copy()}): pipe that same input (with the same "
                            "--input) to run it, add --refresh to run this one as the job's "
                            "new input (the output is replaced when it completes), or "
                            "--new-job to start over with it"
                        )
                    os.replace(temporary, self.job)
        except StdinUnreadable:
            Path(temporary).unlink(missing_ok=True)
            raise
        except OSError as exc:
            Path(temporary).unlink(missing_ok=True)
            # A full disk under the copy names no file by itself (and a small copy fails
            # again as its handle closes, with no name either): name the copy, so the
            # message says which disk to free.
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror, temporary) from exc
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _sweep_killed_copies(self) -> None:
        """Remove the partial copies of runs killed (kill -9) while they read stdin: the
        temporary names :meth:`read_stdin` writes, that no run holds locked. A live run
        locks its copy the moment it makes it, so one two seconds old is never taken for
        a killed run's."""
        pattern = f".{glob.escape(self.job.name)}." + "?" * _TEMP_SUFFIX_LEN
        now = time.time()
        for left in self.job.parent.glob(pattern):
            with contextlib.suppress(OSError):  # gone meanwhile, held, or not ours to remove
                if now - left.stat().st_mtime < _YOUNG_COPY_S:
                    continue
                fd = os.open(left, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    left.unlink()
                finally:
                    os.close(fd)

    def _saved_copy(self) -> str:
        """Where the job's saved stdin is, for a message: the copy for this run's
        ``--input``, else the one another ``--input`` made."""
        copies = [self.job, *stdin_copies(self.out)]
        saved = next((copy for copy in copies if copy.exists()), None)
        return "no copy is left" if saved is None else f"{saved}, kept as it is"

    def copy_out(self) -> None:
        """``--out -``: write the finished output to stdout."""
        if not self.to_stdout or not self.out.exists():
            return
        with self.out.open("rb") as handle:
            shutil.copyfileobj(handle, sys.stdout.buffer)
        sys.stdout.buffer.flush()

    def __enter__(self) -> RunPaths:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def plan_paths(
    *, job: str, out: str | None, fmt: str, directory: Path, stdin_format: str = "txt"
) -> RunPaths:
    """Settle the paths of ``broker run JOB [--out OUT]``.

    Raises:
        UsageError: ``--out -`` with the sqlite format, or an output (or its ledger or
            invalid-row report) that is the job file itself.
        OSError: a path that cannot even be looked at (a name too long, a loop of
            symbolic links, a working directory deleted under the shell), naming it.
    """
    to_stdout = out == STDIO
    stdin = job == STDIO
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if to_stdout:
        if fmt == "sqlite":
            raise UsageError("--out - writes JSON lines or CSV; sqlite needs a file")
        tmp = tempfile.TemporaryDirectory(prefix="broker-run-")
        out_path = Path(tmp.name) / f"out{_SUFFIX[fmt]}"
    elif out:
        out_path = Path(out)
        if out_path.is_dir() or out.endswith(("/", os.sep)):
            # A trailing slash names a directory even before it exists: a file called so
            # would be made in its place.
            raise UsageError(f"--out {out} is a directory; give the output file's path")
        _refuse_device_output(out_path, out)
    else:
        name = Path(job).name
        # .gz in any case, as the reader takes it (x.csv.GZ is read as gzip CSV too).
        unzipped = name[:-3] if name.lower().endswith(".gz") else name
        stem = "stdin" if stdin else unzipped.rsplit(".", 1)[0]
        out_path = directory / f"{stem or name}{_SUFFIX[fmt]}"
    if not to_stdout and out_path.is_symlink() and not ledger_path(out_path).exists():
        # The run writes through the link: its output, ledger and the files that replace
        # the output (--ordered, --refresh) go beside the file it names, and the link stays
        # (a "latest" link was replaced by a plain file, its target left with old rows).
        # A job begun through the link by an older broker keeps its ledger beside the link.
        out_path = Path(os.path.realpath(out_path))
    if stdin:
        job_path = stdin_copy(out_path, stdin_format)
    else:
        job_path = Path(job)
        _refuse_unreadable_kind(job_path)
        _refuse_clobber(job_path, out_path, given=out is not None)
    if not to_stdout:
        _refuse_foreign_output(out_path, given=out is not None)
        _refuse_long_name(out_path)
    paths = RunPaths(job_path, out_path, fmt, stdin=stdin, to_stdout=to_stdout)
    paths._tmp = tmp
    return paths


def _refuse_device_output(out_path: Path, given: str) -> None:
    """Raise when ``--out`` names a device or a pipe: the output is rewritten in place on a
    resume and has a ledger beside it, neither of which a device can have.

    A path under /dev (but /dev/shm, a plain file system) or /proc is one even when it
    leads to a regular file (``/dev/stdout`` with stdout redirected to one): the ledger
    would go beside it, in /dev.
    """
    top = out_path.absolute().parts[1:3]
    special = top[:1] == ("proc",) or (top[:1] == ("dev",) and top != ("dev", "shm"))
    try:
        mode = out_path.stat().st_mode
    except OSError:
        mode = None  # not there yet (the usual case), or unreadable: the sink says which
    if mode is not None and not stat.S_ISREG(mode):
        what = "a device or a pipe, not a file"
    elif special:
        what = "under /dev or /proc, where no output or ledger can be kept"
    else:
        return
    raise UsageError(
        f"--out {given} is {what}: give a file's path, or --out - to write the output to "
        "stdout when the run ends"
    )


def _refuse_unreadable_kind(job: Path) -> None:
    """Raise when the job is not a regular file: a directory, a pipe, a device.

    A pipe (``<(...)``, ``/dev/stdin``) can be read once only, and the runner reads the job
    twice (its fingerprint, then its rows): it would find nothing left and call the job done.
    """
    try:
        mode = job.stat().st_mode
    except OSError:
        return  # missing or unreadable: the runner says which, with its own exit code
    if stat.S_ISDIR(mode):
        raise UsageError(f"the job {job} is a directory; give a job file")
    if not stat.S_ISREG(mode):
        raise UsageError(
            f"the job {job} is a pipe or device, which can be read only once: pipe it to "
            f"`{prog()} run -` instead (stdin is copied, so the job can resume)"
        )


#: How the files a run keeps beside its output OUT are named: OUT plus one of these (the
#: ledger and its lock and journal, the invalid-row report, the --ordered and --refresh
#: copies with their own side files, a writer's temporary file, an SQLite output's journal).
_SIDE_SUFFIXES: Final = (
    ".ledger",
    ".invalid.jsonl",
    ".ordering",
    ".refresh",
    ".tmp",
    "-wal",
    "-shm",
    "-journal",
)


def _is_side_suffix(suffix: str) -> bool:
    """True for a side file's suffix: one of ``_SIDE_SUFFIXES``, whole, or followed by
    another part (``.ledger-wal``, ``.refresh.ledger``); ``.tmpl`` or ``-walk`` are not."""
    return any(
        suffix == side or suffix.startswith((f"{side}.", f"{side}-")) for side in _SIDE_SUFFIXES
    )


def _refuse_clobber(job: Path, out: Path, *, given: bool) -> None:
    """Raise when the output, its ledger or its report would be the job file."""
    written = {
        out: "the output",
        ledger_path(out): "the output's ledger",
        report_path(out): "the invalid-row report",
        ordering_path(out): "the --ordered copy of the output",
    }
    target = _same(job)
    for path, what in written.items():
        if _same(path) == target or (path.exists() and job.exists() and path.samefile(job)):
            how = "--out names" if given else f"the default output ({out}) is"
            raise UsageError(
                f"{how} the job file {job}: {what} would overwrite it; "
                "give --out another path (nothing was written)"
            )
    output = _same(out)
    suffix = target.name[len(output.name) :] if target.name.startswith(output.name) else ""
    if target.parent == output.parent and _is_side_suffix(suffix):
        # A job named as a file a run keeps beside its output would be overwritten or
        # deleted. Other names that merely start with the output's (job.txt.gz for --out
        # job.txt) are fine, and so is the copy of a stdin job, which is that job.
        how = "--out" if given else "the default output"
        raise UsageError(
            f"the job file {job} is named like a file the broker keeps beside the output "
            f"({how} {out}), which would overwrite or delete it; rename the job or give "
            "--out another path (nothing was written)"
        )
    if out.name.endswith(".ledger"):
        raise UsageError(f"--out {out} looks like a job ledger; give the output file instead")


def _refuse_foreign_output(out: Path, *, given: bool) -> None:
    """Raise when the output, or its invalid-row report, holds data no job wrote: a new
    job would truncate it.

    A job's output has its ledger beside it (kept for resuming and for ``--refresh``); a
    file with content and no ledger is someone else's (another tool's results, the item
    cache's database, a file typed by mistake), and is never overwritten. So is a file of
    the report's name that is no report: one a job left (its ledger deleted to start over)
    is rewritten as before.
    """
    if ledger_path(out).exists():
        return
    how = "--out names" if given else "the default output is"
    if _size(out):
        raise UsageError(
            f"{how} {out}, which exists and was not written by a broker job (it has no "
            f"ledger, {ledger_path(out).name}, beside it): a new job would overwrite it; move "
            "or delete it, or give --out another path (nothing was written)"
        )
    report = report_path(out)
    if _size(report) and not _is_report(report):
        # Another job's output of that name has its ledger beside it.
        whose = (
            "is another job's output"
            if ledger_path(report).exists()
            else "is a file no broker job wrote"
        )
        raise UsageError(
            f"{how} {out}, and {report.name} beside it, the name of its invalid-row report, "
            f"{whose}: a new job would overwrite it; move or delete it, or give --out "
            "another path (nothing was written)"
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # absent (the usual case) or unreadable: the sink says which


def _is_report(path: Path) -> bool:
    """True if ``path`` starts as an invalid-row report does: a {line, input, reason} line."""
    try:
        with path.open("rb") as stream:
            first = stream.readline(1 << 20)
        entry = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(entry, dict) and {"line", "input", "reason"} <= entry.keys()


#: The longest file name (one path component) Linux's file systems take, in bytes.
_NAME_MAX: Final = 255


#: The longest suffix of a file a run keeps beside its output (a --refresh's invalid-row
#: report being written): the output's name leaves room for it, or the run fails at its end.
_LONGEST_SIDE_SUFFIX: Final = ".refresh.invalid.jsonl.tmp"


def _refuse_long_name(out: Path) -> None:
    """Refuse a new output whose name leaves no room for the files kept beside it: the run
    fetched every row, then failed writing its report at the end, every time (exit 74
    after the quota was spent), or failed creating its ledger with advice to move that
    ledger away (65). A job already begun goes on as before."""
    if len(os.fsencode(out.name)) + len(_LONGEST_SIDE_SUFFIX) <= _NAME_MAX:
        return
    if ledger_path(out).exists():
        return
    side = out.with_name(out.name + _LONGEST_SIDE_SUFFIX)
    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(side))


def name_too_long_hint(exc: OSError) -> str:
    """What to do about a file name too long for the file system, else ``""``: the run
    names files after its output with a suffix, which the output's own name leaves no
    room for. Not for a folder's name, nor a whole path too long (SQLite's limit)."""
    if exc.errno != errno.ENAMETOOLONG or exc.filename is None:
        return ""
    if len(os.path.basename(os.fsencode(exc.filename))) <= _NAME_MAX:
        return ""
    room = _NAME_MAX - len(_LONGEST_SIDE_SUFFIX)
    return (
        "; the run keeps files beside its output named after it with a suffix "
        f"(.ledger.lock, .invalid.jsonl, {_LONGEST_SIDE_SUFFIX}): give --out a name of at "
        f"most {room} bytes"
    )


def _same(path: Path) -> Path:
    """``path`` resolved (as far as it exists: an output not made yet); a loop of symbolic
    links is an ``OSError`` (ELOOP) naming ``path`` as given, on every Python: 3.11 and 3.12
    raise ``RuntimeError`` for one, and 3.13's non-strict ``resolve()`` leaves it as it is,
    which let the run go on to fail on the job file with advice about its permissions.
    ``~`` is left as it is, as the run opens the path (a shell expands it, or nothing)."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        if not isinstance(exc, OSError) or exc.errno == errno.ELOOP:
            raise _loop(path) from exc
    try:
        # Not made yet, or a part of it may not be looked at: resolved as far as it goes.
        return path.resolve()
    except RuntimeError as exc:
        raise _loop(path) from exc


def _loop(path: Path) -> OSError:
    return OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
