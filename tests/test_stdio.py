"""Standard streams closed, full or failing: commands run as cron and service managers start
them (``>&-``, ``2>>log`` on a full disk, ``>/dev/full``)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_crash import child_env
from test_resume import embedded_config, text_job

from broker.stdio import ForgivingStream, write_stdout

_FULL = "/dev/full"


def _broker(
    *args: str, close: int | None = None, stdout: object = None, stderr: object = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m broker ARGS`` in a child, with descriptor ``close`` closed in it."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE if stderr is None else stderr,
        env=child_env(),
        preexec_fn=None if close is None else (lambda: os.close(close)),
        timeout=120,
        check=False,
    )


def _rows(out: Path) -> list[int]:
    return sorted(json.loads(line)["line"] for line in out.read_text().splitlines())


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_run_with_a_standard_descriptor_closed_completes(tmp_path: Path, closed: int) -> None:
    """``broker run`` with stdin, stdout or stderr closed writes every row and exits 0 (it
    aborted with 134: uvloop asserted on closing the descriptor its loop had taken)."""
    config = embedded_config(tmp_path / "c.toml")
    job = text_job(tmp_path / "job.txt", 30, "B0FD")
    out = tmp_path / "out.jsonl"
    args = ("run", str(job), "--config", str(config), "--out", str(out), "--progress", "none")
    done = _broker(*args, close=closed)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _rows(out) == list(range(1, 31))


def test_stdout_on_a_full_disk_exits_74_in_one_line(tmp_path: Path) -> None:
    """A stdout that cannot be written (a full disk) ends ``broker run --out -`` with 74 and
    one line saying so, not a traceback and 1."""
    config = embedded_config(tmp_path / "c.toml")
    job = text_job(tmp_path / "job.txt", 30, "B0FU")
    args = ("run", str(job), "--config", str(config), "--out", "-", "--progress", "none")
    with open(_FULL, "wb") as full:
        done = _broker(*args, stdout=full)
    err = done.stderr.decode()
    assert done.returncode == 74, err[-2000:]
    assert "cannot write to stdout: No space left on device" in err
    assert "Traceback" not in err


def test_stderr_on_a_full_disk_never_fails_a_job(tmp_path: Path) -> None:
    """A stderr that cannot be written (a log file on a full disk) loses the messages, not
    the job: with the live progress line forced on, every row is written and the exit is 0."""
    config = embedded_config(tmp_path / "c.toml")
    job = text_job(tmp_path / "job.txt", 30, "B0FE")
    out = tmp_path / "out.jsonl"
    args = ("run", str(job), "--config", str(config), "--out", str(out), "--progress", "bar")
    with open(_FULL, "wb") as full:
        done = _broker(*args, stderr=full)
    assert done.returncode == 0
    assert _rows(out) == list(range(1, 31))


class _Failing(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


class _HalfWrites:
    """A stdout whose binary stream takes half of what each write offers (a pipe's reader
    slow, a signal mid-write), as a raw stream may."""

    def __init__(self) -> None:
        self.buffer = self
        self.got = bytearray()

    def write(self, data: memoryview) -> int:
        taken = max(1, len(data) // 2)
        self.got += data[:taken]
        return taken

    def flush(self) -> None:
        pass


def test_a_short_write_to_stdout_is_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    """write_stdout delivers every byte when each write takes only part of them (a write
    cut short returns its count without an error: one write alone lost the rest)."""
    out = _HalfWrites()
    monkeypatch.setattr(sys, "stdout", out)
    data = bytes(range(256)) * 8
    write_stdout(data)
    assert bytes(out.got) == data


def test_a_forgiving_stream_drops_failed_writes_and_is_its_stream_otherwise() -> None:
    """ForgivingStream: a failed write or flush is dropped (the length is reported
    written), anything else is the wrapped stream's."""
    stream = ForgivingStream(_Failing())
    assert stream.write("lost\n") == 5
    stream.flush()
    assert stream.isatty() is False  # type: ignore[attr-defined]
    kept = io.StringIO()
    ForgivingStream(kept).write("kept\n")
    assert kept.getvalue() == "kept\n"


@pytest.mark.parametrize("args", [("--version",), ("--help",), ("run", "--help")])
def test_help_and_version_into_a_full_stdout_exit_74(args: tuple[str, ...]) -> None:
    """--help and --version are output too: a stdout that cannot take them exits 74 (argparse
    dropped the error and exited 0)."""
    with open(_FULL, "wb") as full:
        done = _broker(*args, stdout=full)
    assert done.returncode == 74
    assert b"cannot write to stdout" in done.stderr


def test_a_disk_error_of_another_file_is_not_said_to_be_stdouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full disk under a file whose error names no file is not reported as stdout's
    ("cannot write to stdout: .../keys.sqlite3: I/O error", stdout fine): only an error of
    the watched stdout's own writes is."""
    from broker import cli

    def fails(words: list[str], *, process_ends: bool) -> int:
        raise OSError(28, "somewhere: disk full")

    monkeypatch.setattr(cli, "_main", fails)
    with pytest.raises(OSError, match="somewhere: disk full"):
        cli.main(["status"])


def test_a_disk_error_of_a_sqlite_file_names_the_file() -> None:
    """disk_error's OSError names its file, as every other file's error does."""
    import sqlite3

    from broker.sqlitewal import disk_error

    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    found = disk_error(Path("/x/keys.sqlite3"), error)
    assert found is not None
    assert found.filename == "/x/keys.sqlite3"


def test_ctrl_c_with_output_stdout_cannot_take_exits_75() -> None:
    """Ctrl-C while output is buffered for a stdout that cannot take it (a full disk, a
    reader that got the Ctrl-C too): 75, the interruption, not the interpreter's exit 120
    from its own last flush."""
    code = (
        "import sys\n"
        "from broker import cli\n"
        "def interrupted(words, *, process_ends):\n"
        "    print('an answer already printed')\n"
        "    raise KeyboardInterrupt\n"
        "cli._main = interrupted\n"
        "raise SystemExit(cli.main())\n"
    )
    env = {k: v for k, v in child_env().items() if k != "PYTHONUNBUFFERED"}
    with open(_FULL, "wb") as full:
        done = subprocess.run(
            [sys.executable, "-c", code, "status"],
            stdout=full,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            check=False,
        )
    assert done.returncode == 75, done.stderr
    assert b"interrupted" in done.stderr


@pytest.mark.skipif(not os.path.exists(_FULL), reason="no /dev/full")
def test_lookup_into_a_full_stdout_exits_74_without_a_traceback(tmp_path: Path) -> None:
    """``broker lookup`` whose answer a full disk cannot take exits 74 in one line: stdout is
    dropped so the interpreter's last flush of the answer it still buffers does not fail again
    (a traceback, exit 120)."""
    config = embedded_config(tmp_path / "c.toml")
    args = ("lookup", "B000TEST01", "--no-cache", "--config", str(config))
    # Without PYTHONUNBUFFERED (which writes each print through at once), a stdout that is
    # a file is block-buffered, as in production: the answer is still held at the exit.
    env = {k: v for k, v in child_env().items() if k != "PYTHONUNBUFFERED"}
    with open(_FULL, "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "broker", *args],
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            env=env,
            timeout=120,
            check=False,
        )
    err = done.stderr.decode()
    assert done.returncode == 74, err[-2000:]
    assert "cannot write to stdout: No space left on device" in err
    assert "Traceback" not in err


@pytest.mark.skipif(not os.path.exists(_FULL), reason="no /dev/full")
def test_run_out_dash_into_a_full_stdout_logs_its_end(tmp_path: Path) -> None:
    """``broker run JOB --out -`` whose rows a full disk cannot take exits 74 with its
    ``broker.job_finished`` error event and its rows line, as every error exit of a run
    ends: it ended with the top level's line alone, the requests paid for untold."""
    config = embedded_config(tmp_path / "c.toml")  # its logs are JSON lines
    job = tmp_path / "job.txt"
    job.write_text("B000TEST01\nB000TEST02\n")
    args = ("run", str(job), "--out", "-", "--no-cache", "--config", str(config))
    with open(_FULL, "wb") as full:
        done = _broker(*args, stdout=full)
    err = done.stderr.decode()
    assert done.returncode == 74, err[-2000:]
    assert "cannot write to stdout: No space left on device" in err
    finished = [json.loads(line) for line in err.splitlines() if "broker.job_finished" in line]
    assert [(e["level"], e["exit_code"]) for e in finished] == [("error", 74)]
    assert finished[0]["requests"] >= 1  # the requests paid for are told
    assert "cannot write to stdout" in finished[0]["error"]
    assert "rows: 2" in err


@pytest.mark.skipif(not os.path.exists(_FULL), reason="no /dev/full")
def test_simulate_into_a_full_stdout_exits_74_not_a_port_error(tmp_path: Path) -> None:
    """``broker simulate`` whose ready line a full disk cannot take exits 74 saying so, as
    every command does; it blamed the port ("cannot listen on 127.0.0.1:0"), exit 78."""
    config = tmp_path / "sim.toml"
    config.write_text("[simulator]\nseed = 1\n")
    with open(_FULL, "wb") as full:
        done = _broker("simulate", "--port", "0", "--config", str(config), stdout=full)
    err = done.stderr.decode()
    assert done.returncode == 74, err[-2000:]
    assert "cannot write to stdout" in err
    assert "cannot listen" not in err


def test_simulate_whose_reader_left_exits_141_not_a_port_error(tmp_path: Path) -> None:
    """``broker simulate`` whose stdout reader has gone exits 141, quietly; it blamed the
    port ("cannot listen ... Broken pipe"), exit 78."""
    with subprocess.Popen(
        [sys.executable, "-m", "broker", "simulate", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=child_env(),
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, err[-2000:]
    assert "cannot listen" not in err
    assert "Traceback" not in err
