"""Crash and resume cases A2-A9 of reliability.md section 3.3, end to end through ``broker run``.

Cases that need a real process (a kill, a signal, a second process, a file size limit) run
``python -m broker run`` against a simulator served from this test's loop (helpers shared
with ``test_crash.py``, which holds A1); the rest call ``cli.main`` in-process against the
embedded simulator. Every test checks that its fault really happened.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import embedded_toml, sqlite_db
from test_crash import (
    US,
    Upstream,
    check_output,
    child_env,
    events,
    finish,
    make_job,
    read_jsonl,
    run_once,
    sim_settings,
    spawn,
    write_config,
)

from broker import cli
from broker.jobs import runner, sinks
from broker.jobs.ledger import Counts, Ledger, SinkState
from broker.jobs.runner import ExitCode
from broker.jobs.sources import fingerprint

_SIMULATOR = """seed = 3
missing_share = 0.1

[[simulator.accounts]]
name = "demo"
protocol = "creators"
credential_id = "demo-id"
secret = "demo-secret"
version = "3.1"
partner_tags = { "www.amazon.com" = "demo-20" }
tps = 100.0
tpd = 1000000"""


@pytest.fixture(autouse=True)
def _no_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASINB_DEMO_SECRET", raising=False)


def embedded_config(path: Path, *, tps: float = 50.0, queue_size: int | None = None) -> Path:
    """A config whose runs use the embedded simulator (demo key)."""
    engine = f"queue_size = {queue_size}" if queue_size else ""
    path.write_text(embedded_toml(tps=tps, engine=engine, simulator=_SIMULATOR))
    return path


def main(config: Path, job: Path, out: Path, *args: str) -> int:
    """``broker run`` in this process; returns the exit code."""
    argv = ["run", str(job), "--out", str(out), "--config", str(config), "--progress", "none"]
    return cli.main([*argv, *args])


def ledger_of(out: Path) -> Path:
    """The ledger the runner keeps beside ``out``."""
    return out.with_name(out.name + ".ledger")


def inspect_ledger(out: Path, job: Path, fmt: str = "jsonl") -> tuple[bool, Counts, SinkState]:
    """(ingestion complete, row counts, the output's recorded state) of a stopped job."""
    with Ledger.open(ledger_of(out), fingerprint=fingerprint(job), default_marketplace=US) as led:
        return led.ingest_complete, led.counts(), led.sink_state(f"out.{fmt}")


def text_job(path: Path, count: int, prefix: str, *, bad: int = 0) -> Path:
    """A text job of ``count`` distinct ASINs ``<prefix><n>``, then ``bad`` invalid lines."""
    width = 10 - len(prefix)
    lines = [f"{prefix}{i:0{width}d}" for i in range(count)] + [f"bad-{i}" for i in range(bad)]
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_records(out: Path) -> list[list[str]]:
    """The data records of a CSV output (header checked and dropped)."""
    data = out.read_bytes()
    assert data.endswith(b"\r\n"), "the CSV output ends in a torn record"
    table = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert table[0][:2] == ["line", "input"]
    return table[1:]


async def wait_for(condition: Callable[[], bool], proc: asyncio.subprocess.Process) -> None:
    """Poll ``condition`` until true; fail if the run ends first."""
    async with asyncio.timeout(30):
        while not condition():
            assert proc.returncode is None, "the run ended before the moment of the test"
            await asyncio.sleep(0.002)


class TestA2KillDuringIngestion:
    async def test_a2_kill_nine_mid_ingest_reingests_idempotently(self, tmp_path: Path) -> None:
        """A2: SIGKILL inside the second ingest chunk; the rerun stores each row once."""
        job = tmp_path / "job.txt"
        lines = make_job(job, 300, seed=2, copies=40)  # 12,032 rows: three 5,000-row chunks
        out = tmp_path / "out.jsonl"
        async with Upstream(sim_settings(missing_share=0)) as upstream:
            config = write_config(tmp_path / "c.toml", upstream.url)
            code, err = await run_once(config, job, out, crash_at="mid_ingest:2")
            assert code == -signal.SIGKILL, err[-2000:]
            assert "crash point mid_ingest #2: sending SIGKILL" in err
            complete, counts, _ = inspect_ledger(out, job)
            assert (complete, counts.total) == (False, 5000)  # chunk 1 kept, chunk 2 undone
            assert upstream.server.stats.requests == 0
            code, err = await run_once(config, job, out)
            assert code == 0, err[-2000:]
            # One lookup per distinct ASIN: no row was stored (or fetched) twice.
            assert upstream.items_served() == 300
        complete, counts, _ = inspect_ledger(out, job)
        assert (complete, counts.total, counts.pending) == (True, len(lines), 0)
        check_output(out, lines, upstream.settings)


class TestA3SigtermOnce:
    async def test_a3_sigterm_mid_fetch_drains_then_exits_75(self, tmp_path: Path) -> None:
        """A3: SIGTERM mid-fetch: admitted lookups finish and are written, exit 75; rerun ends."""
        job = tmp_path / "job.txt"
        lines = make_job(job, 300, seed=3)
        out = tmp_path / "out.jsonl"
        async with Upstream(sim_settings(latency={"fixed_ms": 100.0}, missing_share=0)) as up:
            config = write_config(
                tmp_path / "c.toml", up.url, tps=20.0, max_in_flight=2, queue_size=20
            )
            proc = await spawn(config, job, out)
            await wait_for(lambda: up.items_served() >= 20 and up.in_flight > 0, proc)
            proc.send_signal(signal.SIGTERM)
            code, err = await finish(proc)
            served = up.items_served()
            assert code == ExitCode.RESUMABLE, err[-2000:]
            [stopping] = events(err, "broker.job_stopping")
            assert stopping["mode"] == "drain"
            assert not events(err, "broker.job_stop_forced")
            rows = read_jsonl(out)
            fetched = {row["asin"] for row in rows if row["status"] != "invalid"}
            # Drained, not dropped: every item the simulator served reached the output.
            assert len(fetched) == served
            assert 0 < len(rows) < len(lines)
            complete, counts, state = inspect_ledger(out, job)
            assert complete
            assert (counts.total, counts.done) == (len(lines), len(rows))
            assert counts.pending == len(lines) - len(rows)
            assert state == SinkState(out.stat().st_size, len(rows))
            write_config(tmp_path / "c.toml", up.url, tps=100.0)
            code, err = await run_once(config, job, out)
            assert code == 0, err[-2000:]
        check_output(out, lines, up.settings)

    async def test_a3_sigterm_with_all_work_admitted_sends_no_more(self, tmp_path: Path) -> None:
        """A3: SIGTERM with every lookup admitted: the request on the wire is answered and
        written, the batches not sent yet stay pending (exit 75), and the rerun ends the job."""
        job = tmp_path / "job.txt"
        lines = make_job(job, 40, seed=4)
        out = tmp_path / "out.jsonl"
        async with Upstream(sim_settings(latency={"fixed_ms": 300.0}, missing_share=0)) as up:
            config = write_config(tmp_path / "c.toml", up.url, max_in_flight=1, queue_size=100)
            proc = await spawn(config, job, out)
            await wait_for(lambda: up.in_flight > 0, proc)
            proc.send_signal(signal.SIGTERM)
            code, err = await finish(proc)
            served = up.items_served()
            assert code == ExitCode.RESUMABLE, err[-2000:]
            assert [e["mode"] for e in events(err, "broker.job_stopping")] == ["drain"]
            assert not events(err, "broker.job_stop_forced")
            fetched = {row["asin"] for row in read_jsonl(out) if row["status"] != "invalid"}
            # The one request in flight was answered and written; nothing more was sent.
            assert len(fetched) == served == 10
            code, err = await run_once(config, job, out)
            assert code == 0, err[-2000:]
        check_output(out, lines, up.settings)

    async def test_a3_sigterm_during_ingestion_exits_75_and_resumes(self, tmp_path: Path) -> None:
        """A3: SIGTERM during ingestion stops after the chunk, exit 75; the rerun ends the job."""
        job = tmp_path / "job.txt"
        lines = make_job(job, 300, seed=6, copies=40)
        out = tmp_path / "out.jsonl"
        async with Upstream(sim_settings(missing_share=0)) as upstream:
            config = write_config(tmp_path / "c.toml", upstream.url)
            code, err = await run_once(config, job, out, crash_at="mid_ingest:1:TERM")
            assert code == ExitCode.RESUMABLE, err[-2000:]
            assert "crash point mid_ingest #1: sending SIGTERM" in err
            assert events(err, "broker.job_stopping")
            complete, counts, _ = inspect_ledger(out, job)
            assert not complete
            assert 5000 <= counts.total < len(lines)
            # Not logged as read to its end and started: the rows read are not the job's.
            (stopped,) = events(err, "broker.job_ingest_stopped")
            assert stopped["rows"] == counts.total
            assert not events(err, "broker.job_ingested")
            assert not events(err, "broker.job_started")
            assert f"rows: {counts.total} read so far, the job file not read to its end" in err
            assert upstream.server.stats.requests == 0
            code, err = await run_once(config, job, out)
            assert code == 0, err[-2000:]
            assert upstream.items_served() == 300
        check_output(out, lines, upstream.settings)

    async def test_a3_csv_stopped_during_ingestion_keeps_every_column(self, tmp_path: Path) -> None:
        """A3: a JSON Lines job written as CSV, stopped during ingestion (its output not begun
        yet, as the summary says): the rerun's header and rows carry the pass-through field
        that first appears after the stop."""
        job = tmp_path / "job.jsonl"
        rows = [
            f'{{"asin": "bad-{i}", "a": {i}' + (', "b": "late"' if i >= 10_000 else "") + "}"
            for i in range(12_000)
        ]
        job.write_text("\n".join(rows) + "\n")
        out = tmp_path / "out.csv"
        config = embedded_config(tmp_path / "c.toml")
        code, err = await run_once(config, job, out, crash_at="mid_ingest:1:TERM", fmt="csv")
        assert code == ExitCode.RESUMABLE, err[-2000:]
        assert not inspect_ledger(out, job, "csv")[0]
        assert f"output: {out} (not begun yet)" in err
        code, err = await run_once(config, job, out, fmt="csv")
        assert code == ExitCode.OK, err[-2000:]
        header = out.read_bytes().split(b"\r\n", 1)[0].decode().split(",")
        assert header[-2:] == ["a", "b"]
        records = csv_records(out)
        assert len(records) == 12_000
        assert sum(record[-1] == "late" for record in records) == 2_000


class TestA4SigtermTwice:
    async def test_a4_second_sigterm_forces_stop_and_loses_nothing(self, tmp_path: Path) -> None:
        """A4: a second SIGTERM (not its echo) stops at once, exit 75; the rerun loses nothing."""
        job = tmp_path / "job.txt"
        lines = make_job(job, 200, seed=7)
        out = tmp_path / "out.jsonl"
        # A request takes a second and one is sent at a time, so draining the 80 admitted
        # lookups would take about 8 s.
        slow = sim_settings(latency={"fixed_ms": 500.0}, missing_share=0)
        async with Upstream(slow) as up:
            config = write_config(tmp_path / "c.toml", up.url, max_in_flight=1, queue_size=80)
            proc = await spawn(config, job, out)
            await wait_for(lambda: up.items_served() >= 10 and up.in_flight > 0, proc)
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)  # the same stop delivered twice: not a second one
            await asyncio.sleep(0.3)
            assert proc.returncode is None, "the run stopped before the second signal"
            forced_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code, err = await finish(proc)
            took = time.monotonic() - forced_at
        assert code == ExitCode.RESUMABLE, err[-2000:]
        assert [e["mode"] for e in events(err, "broker.job_stopping")] == ["drain"]
        [forced] = events(err, "broker.job_stop_forced")
        assert forced["reason"] == "second SIGTERM"
        assert took < 4.0, f"the forced stop took {took:.1f} s, as long as a drain"
        rows = read_jsonl(out)
        assert len({row["line"] for row in rows}) == len(rows) < len(lines)
        async with Upstream(sim_settings(missing_share=0)) as fast:
            write_config(tmp_path / "c.toml", fast.url)
            code, err = await run_once(config, job, out)
            assert code == 0, err[-2000:]
        check_output(out, lines, fast.settings)


class TestA5TruncatedOutput:
    @pytest.mark.parametrize("fmt", ["jsonl", "csv"])
    @pytest.mark.parametrize("damage", ["cut_mid_record", "torn_tail_appended", "rows_deleted"])
    def test_a5_damaged_output_is_repaired_from_the_ledger(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, damage: str
    ) -> None:
        """A5: an output cut mid-record, or with half a record appended, is repaired exactly."""
        config = embedded_config(tmp_path / "c.toml")
        job = text_job(tmp_path / "job.txt", 40, "B0A5A5", bad=2)
        out = tmp_path / f"out.{fmt}"
        assert main(config, job, out, "--format", fmt) == 0
        original = out.read_bytes()
        end = b"\r\n" if fmt == "csv" else b"\n"
        if damage == "cut_mid_record":
            cut = len(original) * 3 // 5
            while original[cut - len(end) : cut] == end:
                cut += 1
            out.write_bytes(original[:cut])
        elif damage == "rows_deleted":
            # Whole records taken out of the middle: the file still ends with a full one.
            records = original.splitlines(keepends=True)
            out.write_bytes(b"".join(records[:10] + records[15:]))
        else:
            last = original.splitlines(keepends=True)[-1]
            with out.open("ab") as stream:
                stream.write(last[: len(last) // 2])
        damaged = out.read_bytes()
        assert damaged != original
        assert damaged.endswith(end) == (damage == "rows_deleted")
        capsys.readouterr()
        assert main(config, job, out, "--format", fmt) == 0
        err = capsys.readouterr().err
        # Cut back and refilled from the ledger alone: same bytes, nothing fetched again.
        assert out.read_bytes() == original
        assert "requests 0," in err
        noticed = events(err, "broker.output_shorter_than_recorded")
        assert bool(noticed) == (damage != "torn_tail_appended")
        if fmt == "csv":
            assert len({r[0] for r in csv_records(out)}) == 42
        else:
            assert len({r["line"] for r in read_jsonl(out)}) == 42


class TestA6ChangedInput:
    @pytest.mark.parametrize("edit", ["same_size", "line_added"])
    def test_a6_edited_input_is_refused_unless_new_job(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: str
    ) -> None:
        """A6: an input edited between runs exits 65 with a clear message; --new-job restarts."""
        config = embedded_config(tmp_path / "c.toml")
        job = text_job(tmp_path / "job.txt", 5, "B0A6A6")
        out = tmp_path / "out.jsonl"
        assert main(config, job, out) == 0
        before = out.read_bytes()
        text = job.read_text()
        edited = text.replace("B0A6A60003", "B0A6A60009") if edit == "same_size" else text
        job.write_text(edited + ("B0A6A60005\n" if edit == "line_added" else ""))
        assert job.read_bytes() != text.encode()
        capsys.readouterr()
        assert main(config, job, out) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert "since this job started: run with --new-job" in err
        assert "grew by 11 bytes" in err if edit == "line_added" else "was edited" in err
        assert "sha256" not in err
        assert "mtime" not in err
        [message] = [line for line in err.splitlines() if line.startswith("broker:")]
        assert len(message) < 300, message
        assert out.read_bytes() == before
        assert main(config, job, out, "--new-job") == 0
        rows = read_jsonl(out)
        assert [row["input"] for row in sorted(rows, key=lambda r: r["line"])] == (  # type: ignore[arg-type, return-value]
            job.read_text().split()
        )


class _SmallDisk:
    """A nearly full disk under the output: a write past ``room`` bytes puts what fits on
    disk (a short write, as a real full disk does), then fails with ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.refused = 0
        self._write_all = sinks._write_all

    def __call__(self, fd: int, data: bytes, path: Path) -> None:
        if len(data) <= self.room:
            self._write_all(fd, data, path)
            self.room -= len(data)
            return
        self._write_all(fd, data[: self.room], path)
        self.room = 0
        self.refused += 1
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _open_fds_on(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(path):
            found.append(fd)
    return found


class TestA7DiskFull:
    @pytest.mark.parametrize("fmt", ["jsonl", "csv"])
    def test_a7_full_disk_under_output_exits_74_and_resume_completes(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        fmt: str,
    ) -> None:
        """A7: ENOSPC on the output exits 74, unwritten rows stay unrecorded, resume completes."""
        config = embedded_config(tmp_path / "c.toml")
        job = text_job(tmp_path / "job.txt", 60, "B0A7A7", bad=3)
        out = tmp_path / f"out.{fmt}"
        # Room for the three invalid rows (written before any fetch), not for the rest.
        disk = _SmallDisk(room=1500)
        monkeypatch.setattr(sinks, "_write_all", disk)
        assert main(config, job, out, "--format", fmt) == ExitCode.IO_ERROR
        err = capsys.readouterr().err
        assert disk.refused == 1
        assert "cannot write" in err
        assert "No space left on device" in err
        # The disk's own error, not a later write's refusal of the failed output.
        assert "an earlier write failed" not in err
        # The failed run closed its output (no descriptor left behind).
        assert _open_fds_on(out) == []
        complete, counts, state = inspect_ledger(out, job, fmt)
        assert complete
        assert counts.done == 63
        assert state.done_order == 3  # ...but only the rows on disk are marked written
        data = out.read_bytes()
        # The short write's partial tail is cut off: the file ends on a whole row.
        assert len(data) == state.offset
        kept = data
        if fmt == "csv":
            assert kept.count(b"\r\n") == 4
            assert kept.endswith(b"\r\n")
        else:
            assert kept.count(b"\n") == 3
            assert kept.endswith(b"\n")
        disk.room = 1 << 40  # space freed
        assert main(config, job, out, "--format", fmt) == 0
        assert "requests 0," in capsys.readouterr().err
        if fmt == "csv":
            lines = [record[0] for record in csv_records(out)]
        else:
            lines = [str(row["line"]) for row in read_jsonl(out)]
        assert sorted(lines, key=int) == [str(n) for n in range(1, 64)]

    def test_a7_full_disk_under_the_ledger_after_an_output_flush_exits_74(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A7: the ledger's disk fills just after the output flushed rows, before their
        progress is recorded: exit 74 with the disk's error (not an internal error from
        writing those rows again), and the resumed run writes every row once."""
        config = embedded_config(tmp_path / "c.toml")
        job = text_job(tmp_path / "job.txt", 60, "B0A7L7")
        out = tmp_path / "out.jsonl"
        monkeypatch.setattr(runner, "_COMMIT_ROWS", 10)
        record = Ledger.set_sink_state
        calls = 0

        def filling(self: Ledger, *args: object, **kwargs: object) -> None:
            nonlocal calls
            calls += 1
            if calls >= 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            record(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Ledger, "set_sink_state", filling)
        assert main(config, job, out) == ExitCode.IO_ERROR
        err = capsys.readouterr().err
        assert "No space left on device" in err
        assert "internal error" not in err
        assert "broker.job_last_write_failed" in err  # the last write's own failure, said
        monkeypatch.setattr(Ledger, "set_sink_state", record)
        assert main(config, job, out) == 0
        assert sorted(row["line"] for row in read_jsonl(out)) == list(range(1, 61))  # type: ignore[type-var]

    def test_a7_full_disk_under_the_ordered_copy_leaves_no_copy(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A7: --ordered on a full disk exits 74 and removes its partial copy (as large as
        the output), which kept the space being freed until the next run."""
        config = embedded_config(tmp_path / "c.toml")
        job = text_job(tmp_path / "job.txt", 30, "B0A7OR")
        out = tmp_path / "out.jsonl"
        assert main(config, job, out) == 0
        monkeypatch.setattr(sinks, "_write_all", _SmallDisk(room=500))
        assert main(config, job, out, "--ordered") == ExitCode.IO_ERROR
        assert not (tmp_path / "out.jsonl.ordering").exists()

    def test_a7_file_size_limit_on_ledger_and_output_exits_74(self, tmp_path: Path) -> None:
        """A7: a real write limit (RLIMIT_FSIZE) under ledger and output: exit 74, then resume."""
        config = embedded_config(tmp_path / "c.toml")
        job = text_job(tmp_path / "job.txt", 600, "B0FSFS")
        out = tmp_path / "out.jsonl"
        argv = ["-m", "broker", "run", str(job), "--config", str(config), "--out", str(out)]
        limited = (
            "import os, resource, sys; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18)); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        failed = subprocess.run(
            [sys.executable, "-c", limited, *argv, "--progress", "none"],
            capture_output=True,
            env=child_env(),
            timeout=60,
            check=False,
        )
        err = failed.stderr.decode()
        assert failed.returncode == ExitCode.IO_ERROR, err[-2000:]
        assert "cannot write" in err
        complete, counts, state = inspect_ledger(out, job)
        assert complete
        assert counts.total == 600
        assert state.offset <= out.stat().st_size
        assert len(out.read_bytes()[: state.offset].splitlines()) == state.done_order
        assert main(config, job, out) == 0
        rows = read_jsonl(out)
        assert sorted(row["line"] for row in rows) == list(range(1, 601))  # type: ignore[type-var]


class TestA8SecondProcess:
    def test_a8_second_run_is_refused_naming_the_holder_pid(self, tmp_path: Path) -> None:
        """A8: a second ``broker run`` of a running job exits 65 naming the first one's PID."""
        slow = embedded_config(tmp_path / "slow.toml", tps=1.0, queue_size=10)
        # 30 requests at 1/s: the holder is still running however slowly the second starts.
        job = text_job(tmp_path / "job.txt", 300, "B0A8A8")
        out = tmp_path / "out.jsonl"
        lock = tmp_path / "out.jsonl.ledger.lock"
        argv = [sys.executable, "-m", "broker", "run", str(job), "--out", str(out)]
        with subprocess.Popen(
            [*argv, "--config", str(slow), "--progress", "none"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=child_env(),
        ) as holder:
            try:
                deadline = time.monotonic() + 20
                while not (lock.exists() and lock.read_text().strip() == str(holder.pid)):
                    assert holder.poll() is None
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                second = subprocess.run(
                    [*argv, "--config", str(slow), "--progress", "none"],
                    capture_output=True,
                    env=child_env(),
                    timeout=60,
                    check=False,
                )
                assert holder.poll() is None, "the first run ended before the second tried"
            finally:
                holder.send_signal(signal.SIGTERM)
                holder.wait(timeout=30)
        err = second.stderr.decode()
        assert second.returncode == ExitCode.DATA_ERROR, err
        assert f"the job writing this output is being run by process {holder.pid}" in err
        assert holder.returncode in (ExitCode.OK, ExitCode.RESUMABLE)
        fast = embedded_config(tmp_path / "fast.toml")
        assert main(fast, job, out) == 0
        rows = read_jsonl(out)
        assert sorted(row["line"] for row in rows) == list(range(1, 301))  # type: ignore[type-var]


class TestA9NotALedger:
    @pytest.mark.parametrize(
        "content",
        [
            pytest.param(b"some notes\nnot a database\n", id="text"),
            pytest.param(b"\x00" * 4096, id="zeros"),
            pytest.param(b"SQLite format 3\x00" + b"\xff" * 4080, id="corrupt-sqlite"),
            pytest.param(None, id="other-sqlite-database"),
        ],
    )
    def test_a9_foreign_ledger_file_is_refused_and_never_written(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None
    ) -> None:
        """A9: a ledger path holding something else: exit 65, clear error, file byte-identical."""
        config = embedded_config(tmp_path / "c.toml")
        job = text_job(tmp_path / "job.txt", 3, "B0A9A9")
        out = tmp_path / "out.jsonl"
        ledger = ledger_of(out)
        if content is None:
            with sqlite_db(ledger) as conn:
                conn.execute("CREATE TABLE notes (body TEXT)")
                conn.execute("INSERT INTO notes VALUES ('keep me')")
            conn.close()
        else:
            ledger.write_bytes(content)
        before = ledger.read_bytes()
        assert main(config, job, out) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert f"broker: {ledger}: " in err
        assert "job ledger" in err
        assert ledger.read_bytes() == before
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "c.toml",
            "job.txt",
            "out.jsonl.ledger",
            "out.jsonl.ledger.lock",
        ]
