"""The stop policy shared by ``broker run`` and ``broker serve`` (K2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import embedded_toml, sighup_at_default, wait_for_stop_handlers

from broker.jobs.signals import (
    ECHO_S,
    STOP_SIGNALS,
    UV_SIGINT_ECHO_S,
    StoppedReading,
    StoppedWriting,
    StopSignals,
    caught_early,
    installed,
    sigint_echo_window,
    stops_reading,
    writes_until_stopped,
)

REPO = Path(__file__).resolve().parent.parent


class _Recorder:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[str, str]] = []

    def policy(self, sigint_echo: tuple[float, float] | None = None) -> StopSignals:
        return StopSignals(
            lambda sig: self.calls.append(("graceful", sig.name)),
            lambda sig: self.calls.append(("now", sig.name)),
            monotonic=lambda: self.now,
            sigint_echo=sigint_echo,
        )


class TestStopSignals:
    def test_second_signal_stops_at_once_whatever_the_gap(self) -> None:
        """K2: a second signal 0.3 s after the first (under the old 1 s echo rule) stops now."""
        for gap in (0.1, 0.3, 0.9, 1.5, 60.0):
            rec = _Recorder()
            policy = rec.policy()
            policy(signal.SIGTERM)
            rec.now += gap
            policy(signal.SIGTERM)
            assert rec.calls == [("graceful", "SIGTERM"), ("now", "SIGTERM")], gap

    def test_simultaneous_copy_is_an_echo(self) -> None:
        """The same stop delivered twice at once (terminal + uv's forwarded copy) drains only."""
        rec = _Recorder()
        policy = rec.policy()
        policy(signal.SIGINT)
        rec.now += ECHO_S / 2
        policy(signal.SIGINT)
        assert rec.calls == [("graceful", "SIGINT")]
        rec.now += 0.5
        policy(signal.SIGTERM)
        assert rec.calls[-1] == ("now", "SIGTERM")


class TestUvForwardedSigint:
    """Under ``uv run`` without a terminal, uv passes on each SIGINT 200 ms later."""

    def test_uv_copy_200ms_later_only_drains(self) -> None:
        """One SIGINT to the process group (arriving again from uv 0.2 s later) drains."""
        rec = _Recorder()
        policy = rec.policy(UV_SIGINT_ECHO_S)
        policy(signal.SIGINT)
        rec.now += 0.2
        policy(signal.SIGINT)
        assert rec.calls == [("graceful", "SIGINT")]
        rec.now += 2.0
        policy(signal.SIGINT)
        assert rec.calls[-1] == ("now", "SIGINT")

    def test_one_copy_per_signal(self) -> None:
        """A deliberate second SIGINT inside the window, after uv's copy of the first, stops."""
        rec = _Recorder()
        policy = rec.policy(UV_SIGINT_ECHO_S)
        for at in (0.0, 0.2, 0.7, 0.9):  # the first, its copy, the second, its copy
            rec.now = at
            policy(signal.SIGINT)
        assert rec.calls == [("graceful", "SIGINT"), ("now", "SIGINT")]

    def test_window_covers_only_sigint_after_sigint(self) -> None:
        """A SIGTERM 0.2 s after a SIGINT is a second stop, window or not."""
        rec = _Recorder()
        policy = rec.policy(UV_SIGINT_ECHO_S)
        policy(signal.SIGINT)
        rec.now += 0.2
        policy(signal.SIGTERM)
        assert rec.calls == [("graceful", "SIGINT"), ("now", "SIGTERM")]

    def test_without_uv_a_second_sigint_200ms_later_stops(self) -> None:
        """Not under uv (or in a terminal's foreground), 0.2 s later is a deliberate second."""
        rec = _Recorder()
        policy = rec.policy(None)
        policy(signal.SIGINT)
        rec.now += 0.2
        policy(signal.SIGINT)
        assert rec.calls == [("graceful", "SIGINT"), ("now", "SIGINT")]

    @pytest.mark.parametrize(
        ("parent", "foreground", "window"),
        [
            ("uv", False, UV_SIGINT_ECHO_S),
            ("uv", True, None),
            ("bash", False, None),
            ("systemd", False, None),
        ],
    )
    def test_window_only_under_uv_without_a_terminal(
        self, parent: str, foreground: bool, window: tuple[float, float] | None
    ) -> None:
        """uv forwards only when its child is not the terminal's foreground process group."""
        assert sigint_echo_window(parent=parent, in_foreground=foreground) == window

    @pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv on the PATH")
    def test_broker_run_under_uv_drains_on_one_group_sigint(self, tmp_path: Path) -> None:
        """`uv run broker run` in its own session: one SIGINT to the group drains, exit 75."""
        (tmp_path / "config.toml").write_text(_SLOW_CONFIG, encoding="utf-8")
        (tmp_path / "job.txt").write_text(
            "".join(f"B0UV{i:06d}\n" for i in range(400)), encoding="utf-8"
        )
        uv = shutil.which("uv")
        assert uv is not None
        command = [uv, "run", "--no-sync", "--project", str(REPO), "broker", "run", "job.txt"]
        proc = subprocess.Popen(
            [*command, "--out", "out.jsonl", "--no-cache"],
            cwd=tmp_path,
            env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # no terminal: uv forwards each SIGINT it receives
        )
        try:
            out = tmp_path / "out.jsonl"
            deadline = time.monotonic() + 60
            while not (out.exists() and out.stat().st_size > 0):
                assert proc.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 75, err
        assert "broker.job_stopping" in err
        assert "broker.job_stop_forced" not in err, err[-3000:]

    def test_out_dash_stopped_by_signal_does_not_promise_a_resume(self, tmp_path: Path) -> None:
        """``--out -`` keeps no ledger: stopped by a signal it says start over, and names no
        invalid-row report (its temporary directory is gone)."""
        rows = "".join(f"B0SG{i:06d}\n" for i in range(400))
        (tmp_path / "job.txt").write_text("not-an-asin\n" + rows, encoding="utf-8")
        # Rows reach stdout only at the end: a second of sending (400 rows at 5 requests a
        # second are far from done) leaves some to write.
        code, out, err = _signalled_while_sending(
            tmp_path, _SLOW_CONFIG, ["run", "job.txt", "--out", "-"], signal.SIGTERM, 1
        )
        assert code == 75, err
        assert "stopped by signal: run it again to start over" in err
        assert "to resume" not in err
        assert "invalid rows:" not in err
        assert out.count("\n") > 1

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
    def test_lookup_stopped_by_a_signal_prints_its_answers_and_exits_75(
        self, tmp_path: Path, sig: signal.Signals
    ) -> None:
        """``timeout 3 broker lookup ...`` (SIGTERM) or a closed terminal (SIGHUP): the
        answers it has are printed and it exits 75, as for Ctrl-C; it was killed (143, 129)
        with nothing printed."""
        ids = [f"B0LK{i:06d}" for i in range(400)]
        # Answers printed only at the end: a second of sending (400 ids at 5 requests a
        # second are far from done) leaves some to print.
        code, out, err = _signalled_while_sending(
            tmp_path, _SLOW_CONFIG, ["lookup", "--json", *ids], sig, 1
        )
        assert code == 75, err[-2000:]
        assert f"stopped by {sig.name}" in err
        rows = out.splitlines()
        assert 0 < len(rows) < len(ids)

    def test_lookup_stopped_by_a_signal_prints_the_answers_on_the_wire(
        self, tmp_path: Path
    ) -> None:
        """Ctrl-C while a lookup's request is on the wire (3 s each way here) waits for its
        answer, paid for, and prints it; the lookup was cancelled at once and printed
        nothing. That answer was all it lacked: exit 0, as a run whose drain finished the
        job (it said 75, "rows remain", to a script that then retried complete output)."""
        config = embedded_toml(tps=5.0) + "\n[simulator.latency]\nfixed_ms = 3000\n"
        ids = ["B0LW000001", "B0LW000002"]
        # The one request left at once; 2 s on, its answer is 4 s away.
        code, out, err = _signalled_while_sending(
            tmp_path, config, ["lookup", "--json", *ids], signal.SIGINT, 2
        )
        assert code == 0, err[-2000:]
        assert "answers already on the wire" in err
        assert "stopped by SIGINT" in err
        assert [json.loads(row)["asin"] for row in out.splitlines()] == ids

    def test_sighup_drains_like_sigterm(self, tmp_path: Path) -> None:
        """SIGHUP (a closed terminal) drains the run and exits 75, resumable; not a silent 129."""
        code, err, _ = _signal_a_run(tmp_path, signal.SIGHUP, rows=400)
        assert code == 75, err
        assert "broker.job_stopping" in err
        assert "run the same command again to resume" in err

    def test_sighup_stays_ignored_under_nohup(self, tmp_path: Path) -> None:
        """Started with SIGHUP ignored (nohup), a run ignores it and finishes every row."""
        code, err, out = _signal_a_run(tmp_path, signal.SIGHUP, rows=100, nohup=True)
        assert code == 0, err
        assert len(out.read_text().splitlines()) == 100


class TestStalledStdoutReader:
    """A reader that stops reading stdout does not make the command deaf to signals, and
    one that is only slow still gets everything."""

    @pytest.mark.parametrize(
        ("command", "ids"),
        [("run", 400), ("lookup", 400), ("run", 41)],  # 41 rows: the pipe's 64 KiB and a bit
    )
    def test_a_second_signal_ends_a_write_the_reader_never_takes(
        self, tmp_path: Path, command: str, ids: int
    ) -> None:
        """``broker run JOB --out - | loader`` or ``broker lookup ... | loader`` with a loader
        that stalls: the write to the full pipe blocks; a first SIGTERM lets it go on (the
        drain's grace), a second ends it with 75 and the temporary output removed, stdout
        buffered or not. It stayed in its write for good, every signal restarted it (and
        once one ended it, the exit's own flush of what stdout buffered blocked again)."""
        with _writing_to_a_pipe(tmp_path, command, ids) as (proc, read, log, temp):
            _wait_for(lambda: _pipe_full(read), proc, log)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # the first signal drains: the copy may go on
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=20)
        assert code == 75, log.read_text()[-2000:]
        said = "while writing the output to stdout" if command == "run" else "while printing"
        assert said in log.read_text()
        assert list(temp.iterdir()) == []

    @pytest.mark.parametrize("command", ["run", "lookup"])
    def test_one_signal_while_a_slow_reader_reads_loses_nothing(
        self, tmp_path: Path, command: str
    ) -> None:
        """A reader that is slow but reading, and one stop signal while the output is being
        written: every row arrives whole and the command exits 0; the signal cut the output
        mid-row with 75 and "its reader took no more"."""
        received = bytearray()
        with _writing_to_a_pipe(tmp_path, command, 400) as (proc, read, log, _):
            _wait_for(lambda: _pipe_full(read), proc, log)
            proc.send_signal(signal.SIGTERM)
            while chunk := os.read(read, 4096):
                received += chunk
                time.sleep(0.002)
            code = proc.wait(timeout=20)
        assert code == 0, log.read_text()[-2000:]
        rows = [json.loads(line) for line in received.decode().splitlines()]
        assert len(rows) == 400


@contextlib.contextmanager
def _writing_to_a_pipe(
    tmp_path: Path, command: str, ids: int
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, Path]]:
    """``broker run --out -`` or ``broker lookup`` of ``ids`` ids writing to a pipe nobody
    reads yet, stdout buffered (no PYTHONUNBUFFERED): the process, the pipe's read end, its
    stderr file and its TMPDIR; killed if still running, and the pipe closed, after."""
    fast = embedded_toml(tps=500.0, simulator="limits = false")
    (tmp_path / "config.toml").write_text(fast, encoding="utf-8")
    asins = [f"B0ST{i:06d}" for i in range(ids)]
    if command == "run":
        (tmp_path / "job.txt").write_text("".join(f"{i}\n" for i in asins))
        argv = ["run", "job.txt", "--out", "-", "--progress", "none"]
    else:
        argv = ["lookup", "--json", *asins]
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    log = tmp_path / "stderr.txt"
    with sighup_at_default(), log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", *argv, "--no-cache"],
            cwd=tmp_path,
            stdout=write,
            stderr=stderr,
            env={**env, "TMPDIR": str(temp)},
        )
    os.close(write)
    try:
        yield proc, read, log, temp
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(read)


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.05)


def _pipe_full(read_end: int) -> bool:
    """True once the pipe holds its whole buffer (64 KiB on Linux) unread."""
    import fcntl
    import termios

    buffered = bytearray(4)
    fcntl.ioctl(read_end, termios.FIONREAD, buffered)
    return int.from_bytes(buffered, sys.byteorder) >= 65536


async def test_a_lookup_cancelled_once_every_answer_is_in_exits_as_answered() -> None:
    """A second signal while the lookup's broker closes, every answer already printed: exit
    0, not 75 ("rows remain", which sent a retrying script round again)."""
    from broker import cli

    wind_down = asyncio.Event()
    outcome: list[int] = []

    async def lookup() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        await wind_down.wait()
        outcome.append(0)  # every answer printed; now the broker closes
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(30)
        return 0

    assert await cli._until_stopped(lookup(), wind_down, outcome) == 0


class TestWritesUntilStopped:
    """The stop policy for a blocking write of finished output."""

    def test_the_first_signal_grants_a_grace_then_the_write_ends(self) -> None:
        """One signal, a write that never completes: it ends once the grace is over."""
        read, write = os.pipe()
        os.write(write, b"x" * 65536)  # full: the next write blocks
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
        started = time.monotonic()
        try:
            timer.start()
            with pytest.raises(StoppedWriting) as stopped, writes_until_stopped(0.3):
                os.write(write, b"y" * 4096)
        finally:
            timer.cancel()
            os.close(read)
            os.close(write)
        assert stopped.value.sig is None
        assert 0.35 <= time.monotonic() - started < 5.0

    def test_a_signal_after_one_before_the_write_ends_it_at_once(self) -> None:
        """Already stopped once (the command's drain): the next signal ends the write."""
        read, write = os.pipe()
        os.write(write, b"x" * 65536)
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            with (
                pytest.raises(StoppedWriting) as stopped,
                writes_until_stopped(60.0, signalled=True),
            ):
                os.write(write, b"y" * 4096)
        finally:
            timer.cancel()
            os.close(read)
            os.close(write)
        assert stopped.value.sig is signal.SIGINT
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


class TestJobOnStdin:
    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
    def test_a_signal_while_stdin_stays_open_stops_the_run(
        self, tmp_path: Path, sig: signal.Signals
    ) -> None:
        """``broker run -`` whose stdin stays open and silent (a terminal, a producer that
        hangs): one stop signal ends it with 75, nothing sent; it waited for the input's end,
        every Ctrl-C, SIGTERM and SIGHUP kept until then."""
        (tmp_path / "config.toml").write_text(_SLOW_CONFIG, encoding="utf-8")
        read, write = os.pipe()
        os.write(write, b"B0SG000001\n")
        command = [sys.executable, "-m", "broker", "run", "-", "--out", "out.jsonl", "--no-cache"]
        try:
            with sighup_at_default():
                proc = subprocess.Popen(
                    command, cwd=tmp_path, stdin=read, stderr=subprocess.PIPE, text=True
                )
            os.close(read)
            try:
                wait_for_stop_handlers(proc)  # reading its stdin, or about to
                proc.send_signal(sig)
                _, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
        finally:
            os.close(write)
        assert proc.returncode == 75, err[-2000:]
        assert f"stopped by {sig.name} while reading the job from stdin" in err
        assert not (tmp_path / "out.jsonl").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _signal_a_run(
    tmp_path: Path, sig: signal.Signals, *, rows: int, nohup: bool = False
) -> tuple[int, str, Path]:
    """``broker run`` of ``rows`` ASINs at 5 requests a second, sent ``sig`` once its first
    rows are written (``nohup``: started with SIGHUP ignored, as nohup does): the exit code,
    stderr and the output file."""
    (tmp_path / "config.toml").write_text(_SLOW_CONFIG, encoding="utf-8")
    job = "".join(f"B0SG{i:06d}\n" for i in range(rows))
    (tmp_path / "job.txt").write_text(job, encoding="utf-8")
    command = [sys.executable, "-m", "broker", "run", "job.txt", "--out", "out.jsonl"]
    proc = subprocess.Popen(
        [*command, "--no-cache"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        # Set either way: a test run that is itself under nohup must not pass its SIG_IGN on.
        preexec_fn=lambda: signal.signal(
            signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL
        ),
    )
    out = tmp_path / "out.jsonl"
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.stat().st_size > 0):
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, out


_SLOW_CONFIG = embedded_toml(tps=5.0, engine="queue_size = 20")


def _wait_until_sending(proc: subprocess.Popen[str], log: Path) -> None:
    """Wait until ``proc``, its stderr (JSON logs) going to ``log``, has caught its stop
    signals and logged ``broker.started``: it is sending."""
    wait_for_stop_handlers(proc)
    deadline = time.monotonic() + 60
    while '"broker.started"' not in log.read_text():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "no broker.started within 60 s"
        time.sleep(0.02)


def _signalled_while_sending(
    tmp_path: Path, config: str, argv: list[str], sig: signal.Signals, after_s: float
) -> tuple[int, str, str]:
    """``broker ARGV --no-cache`` in ``tmp_path`` with ``config`` (JSON logs), sent ``sig``
    ``after_s`` seconds after it began sending (SIGHUP at its default, whatever the suite
    inherited); its exit code, stdout and stderr."""
    (tmp_path / "config.toml").write_text(config, encoding="utf-8")
    command = [sys.executable, "-m", "broker", *argv, "--no-cache"]
    log = tmp_path / "stderr.txt"
    with sighup_at_default(), log.open("w") as stderr:
        proc = subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        _wait_until_sending(proc, log)
        time.sleep(after_s)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, log.read_text()


def _signalled_while_parsing(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``broker ARGV --no-cache`` in ``tmp_path`` (with the slow config), sent a SIGTERM while
    its parser is still being built."""
    (tmp_path / "config.toml").write_text(_SLOW_CONFIG, encoding="utf-8")
    code = (
        "import os, signal, sys\n"
        "import broker.cli as cli\n"
        "build = cli._build_parser\n"
        "def signalled():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return build()\n"
        "cli._build_parser = signalled\n"
        f"sys.exit(cli.main({[*argv, '--no-cache']!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


class TestCaughtEarly:
    async def test_signal_before_the_handler_is_replayed_and_after_is_dropped(self) -> None:
        """A SIGTERM before the run's handler reaches it; one after it is gone never kills."""
        calls: list[signal.Signals] = []
        with caught_early():
            os.kill(os.getpid(), signal.SIGTERM)  # still starting: kept, not fatal
            with installed(calls.append):
                await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)  # finishing: dropped
            await asyncio.sleep(0.01)
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def test_a_signal_kept_before_a_read_stops_it_and_a_second_is_kept(self) -> None:
        """A SIGTERM kept while starting stops the read of the job from stdin before it
        begins; during the read, the first signal stops it and a second (an echo of one
        Ctrl-C) is kept as before, not raised into the read's clean-up."""
        with caught_early():
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(StoppedReading) as early, stops_reading():
                pass
            assert early.value.sig is signal.SIGTERM
        cleaned: list[bool] = []

        def read_interrupted() -> None:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # interrupted by the handler's raise
            except StoppedReading:
                os.kill(os.getpid(), signal.SIGINT)  # the echo, during the clean-up
                cleaned.append(True)
                raise

        with caught_early():
            with pytest.raises(StoppedReading) as during, stops_reading():
                read_interrupted()
            assert during.value.sig is signal.SIGINT
            assert cleaned == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def test_a_command_that_ends_the_process_drops_late_signals(self) -> None:
        """For a command that ends its process (the console script), a stop signal after
        the command returned is dropped, not fatal: one in the ~30 ms the interpreter takes
        to exit made a stopped `broker run` exit 143 instead of 75."""
        # Every stop signal restored: a SIGHUP left ignored was inherited by every later
        # test's child, and the SIGHUP test of `broker lookup` saw it finish with 0.
        before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            with caught_early(process_ends=True):
                pass
            assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in STOP_SIGNALS)
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def test_signal_while_lookup_starts_stops_it_with_75(self, tmp_path: Path) -> None:
        """A SIGTERM while `broker lookup` still builds its parser stops it with 75, as one
        after its handler is in does, not 143."""
        done = _signalled_while_parsing(tmp_path, ["lookup", "--json", "B0UV000001"])
        assert done.returncode == 75, done.stderr
        assert "stopped by SIGTERM" in done.stderr

    def test_signal_while_the_parser_is_built_drains_the_run(self, tmp_path: Path) -> None:
        """A SIGTERM while `broker run` still builds its parser is acted on, not fatal (143)."""
        (tmp_path / "job.txt").write_text("B0UV000001\nB0UV000002\n", encoding="utf-8")
        done = _signalled_while_parsing(tmp_path, ["run", "job.txt", "--out", "out.jsonl"])
        assert done.returncode in (0, 75), done.stderr
        assert "broker.job_stopping" in done.stderr
