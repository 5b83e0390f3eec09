"""``broker run`` end to end through ``cli.main`` against the embedded simulator."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import errno
import gzip
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import embedded_document, sqlite_db
from structlog.testing import capture_logs

from broker import cli
from broker.client import Broker
from broker.config import BrokerConfig, load_config, parse_config
from broker.engine.adaptive import ThrottleVerdict
from broker.engine.metrics import KeySnapshot
from broker.errors import NoUsableKeyError
from broker.jobs import runner, sources
from broker.jobs.ledger import Counts
from broker.jobs.runner import ExitCode, JobOptions, run_job
from broker.testing import FakeClock

_KEY = """
[[keys]]
name = "demo"
credential_id = "demo-id"
version = "3.1"
partner_tags = { "www.amazon.com" = "demo-20" }
tps = 50.0
tpd = 0
"""

_SIM = """
[simulator]
seed = 3
missing_share = 0.1

[[simulator.accounts]]
name = "demo"
protocol = "creators"
credential_id = "demo-id"
secret = "demo-secret"
version = "3.1"
partner_tags = { "www.amazon.com" = "demo-20" }
tps = 100.0
tpd = 1000000
"""


def _tpd2_config() -> BrokerConfig:
    """The embedded simulator's demo key with a daily budget of 2 requests."""
    return parse_config(embedded_document(keys={"tps": 50.0, "tpd": 2}), environ={})


def _us_uk_config(
    *, uk_tag_on_us_key: str | None = None, queue_size: int = 10_000, uk_secret: str = ""
) -> BrokerConfig:
    """The embedded simulator with a fresh US key and a UK key of 2 requests a day
    (``uk_tag_on_us_key``: a UK tag, one Amazon rejects, on the US key too; ``uk_secret``:
    a secret for the UK key, a wrong one)."""
    uk = {"www.amazon.co.uk": "uk-21"}
    us_tags = {"www.amazon.com": "demo-20"}
    if uk_tag_on_us_key is not None:
        us_tags["www.amazon.co.uk"] = uk_tag_on_us_key
    document = {
        "api": {"endpoint": "simulator"},
        "engine": {"queue_size": queue_size},
        "keys": [
            {
                "name": "us",
                "credential_id": "demo-id",
                "version": "3.1",
                "tps": 50.0,
                "partner_tags": us_tags,
            },
            {
                "name": "uk",
                "credential_id": "uk-id",
                "version": "3.2",  # Europe's: the simulator's own accounts serve no other
                "tps": 50.0,
                "tpd": 2,
                "partner_tags": uk,
                **({"credential_secret_env": "ASINB_UK"} if uk_secret else {}),
            },
        ],
        "simulator": {
            "accounts": [
                {
                    "name": "uk",
                    "protocol": "creators",
                    "credential_id": "uk-id",
                    "secret": "uk-secret",
                    "version": "3.2",
                    "partner_tags": uk,
                },
            ]
        },
    }
    return parse_config(document, environ={"ASINB_UK": uk_secret} if uk_secret else {})


def _us_uk_job(tmp_path: Path, count: int, markets: tuple[str, str]) -> JobOptions:
    """A --no-wait JSON Lines job of ``count`` ASINs, each asked in both ``markets`` in turn."""
    job = tmp_path / "job.jsonl"
    rows = [
        json.dumps({"asin": f"B0MK{i:06d}", "marketplace": market})
        for i in range(count)
        for market in markets
    ]
    job.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    return JobOptions(job=job, out=out, progress="none", handle_signals=False, no_wait=True)


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[api]\nendpoint = "simulator"\n' + _KEY + extra + '\n[log]\nformat = "json"\n' + _SIM
    )
    return path


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _main(tmp_path: Path, *args: str) -> int:
    return cli.main(["run", *args, "--config", str(_config(tmp_path)), "--progress", "none"])


@pytest.fixture(autouse=True)
def _no_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASINB_DEMO_SECRET", raising=False)


class TestFormats:
    def test_text_job_gives_one_row_per_input_row(self, tmp_path: Path) -> None:
        """Comments, a URL, a duplicate and a bad id: one output row per input row."""
        job = tmp_path / "job.txt"
        job.write_text(
            "# header\nB0AAAAAAA1\nhttps://www.amazon.com/dp/B0AAAAAAA2\n"
            "B0AAAAAAA1\nnot-an-asin\n\nb0aaaaaaa3  # lower case\n"
        )
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.OK
        rows = sorted(_rows(out), key=lambda r: r["line"])  # type: ignore[arg-type, return-value]
        assert [r["line"] for r in rows] == [2, 3, 4, 5, 7]
        assert rows[3]["status"] == "invalid"
        assert rows[0]["asin"] == rows[2]["asin"] == "B0AAAAAAA1"
        assert rows[0]["item"] == rows[2]["item"]
        assert rows[4]["asin"] == "B0AAAAAAA3"
        assert all(r["status"] in ("ok", "not_found") for r in rows if r["line"] != 5)
        report = _rows(tmp_path / "out.jsonl.invalid.jsonl")
        assert [r["line"] for r in report] == [5]

    def test_csv_job_passes_other_columns_through(self, tmp_path: Path) -> None:
        """A CSV job with a BOM, CRLF and extra columns keeps the columns in the output."""
        job = tmp_path / "job.csv"
        job.write_bytes("\ufeffsku,ASIN\r\nx1,B0CCCCCCC1\r\nx2,B0CCCCCCC2\r\n".encode())
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.OK
        rows = sorted(_rows(out), key=lambda r: r["line"])  # type: ignore[arg-type, return-value]
        assert [r["extra"] for r in rows] == [{"sku": "x1"}, {"sku": "x2"}]

    def test_gzipped_jsonl_job_to_csv_output(self, tmp_path: Path) -> None:
        """A gzipped JSON Lines job written as CSV has the documented header and one row each."""
        job = tmp_path / "job.jsonl.gz"
        with gzip.open(job, "wt") as handle:
            handle.write('{"asin": "B0JJJJJJJ1"}\n{"asin": "B0JJJJJJJ2"}\n{broken\n')
        out = tmp_path / "out.csv"
        assert _main(tmp_path, str(job), "--out", str(out), "--format", "csv") == ExitCode.OK
        with out.open(newline="") as handle:
            table = list(csv.reader(handle))
        assert table[0][:5] == ["line", "input", "asin", "marketplace", "status"]
        assert sorted(row[0] for row in table[1:]) == ["1", "2", "3"]

    def test_csv_output_written_again_keeps_a_column_first_seen_late(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A finished CSV output deleted by hand is written again from the ledger with every
        pass-through column, one that first appears after the first page of rows included."""
        import broker.jobs.runner

        monkeypatch.setattr(broker.jobs.runner, "_EMIT_ROWS", 5)
        job = tmp_path / "job.jsonl"
        lines = [json.dumps({"asin": f"B0LATE{i:04d}", "id": i}) for i in range(12)]
        lines[9] = json.dumps({"asin": "B0LATE0009", "id": 9, "late": "x"})
        job.write_text("\n".join(lines) + "\n")
        out = tmp_path / "out.csv"
        args = (str(job), "--out", str(out), "--format", "csv")
        assert _main(tmp_path, *args) == ExitCode.OK
        out.unlink()
        assert _main(tmp_path, *args) == ExitCode.OK
        with out.open(newline="") as handle:
            table = list(csv.DictReader(handle))
        assert len(table) == 12
        assert [row["late"] for row in table if row["line"] == "10"] == ["x"]

    def test_sqlite_output(self, tmp_path: Path) -> None:
        """The SQLite output has one results row per input row."""

        job = tmp_path / "job.txt"
        job.write_text("B0SSSSSSS1\nB0SSSSSSS2\n")
        out = tmp_path / "out.sqlite"
        assert _main(tmp_path, str(job), "--out", str(out), "--format", "sqlite") == 0
        with sqlite_db(out) as conn:
            assert conn.execute("SELECT count(*) FROM results").fetchone() == (2,)

    @pytest.mark.parametrize("order", [("jsonl", "csv", "jsonl"), ("csv", "jsonl", "csv")])
    def test_switching_format_on_one_output_rewrites_it_whole(
        self, tmp_path: Path, order: tuple[str, str, str]
    ) -> None:
        """Each format keeps its own progress: a switch rewrites the file in the new format."""
        job = tmp_path / "job.txt"
        job.write_text("\n".join(f"B0FMFMFM{i:02d}" for i in range(12)) + "\nnope\n")
        out = tmp_path / "out.data"
        for fmt in order:
            assert _main(tmp_path, str(job), "--out", str(out), "--format", fmt) == 0
            if fmt == "csv":
                with out.open(newline="") as handle:
                    table = list(csv.reader(handle))
                assert table[0][0] == "line"
                lines = sorted(int(row[0]) for row in table[1:])
            else:
                lines = sorted(int(row["line"]) for row in _rows(out))  # type: ignore[call-overload]
            assert lines == list(range(1, 14))


class TestResume:
    def test_second_run_fetches_nothing(self, tmp_path: Path) -> None:
        """Running the same job again resumes: no row is fetched or written twice."""
        job = tmp_path / "job.txt"
        job.write_text("\n".join(f"B0RRRRRR{i:02d}" for i in range(30)) + "\n")
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out)) == 0
        before = out.read_bytes()
        assert _main(tmp_path, str(job), "--out", str(out)) == 0
        assert out.read_bytes() == before

    def test_reading_options_changed_on_a_rerun_are_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A job read without --convert-isbn13 (or with another --encoding) run again with it
        is refused with 65 naming the option, not answered "already complete" as if it had
        been read so; the same options resume, and --refresh reads the job again with them."""
        job = tmp_path / "job.txt"
        job.write_text("9780306406157\nB0ISBNISB1\n")
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.OK
        assert [row["status"] for row in _rows(out)] == ["invalid", "ok"]
        capsys.readouterr()
        again = (str(job), "--out", str(out))
        assert _main(tmp_path, *again, "--convert-isbn13") == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert "--convert-isbn13" in err
        assert "--refresh" in err
        assert _main(tmp_path, *again, "--encoding", "latin-1") == ExitCode.DATA_ERROR
        assert "--encoding" in capsys.readouterr().err
        assert _main(tmp_path, *again, "--encoding", "UTF8") == ExitCode.OK
        assert _main(tmp_path, *again, "--encoding", "utf-8-sig") == ExitCode.OK
        assert _main(tmp_path, *again, "--convert-isbn13", "--refresh") == ExitCode.OK
        rows = _rows(out)
        assert [row["status"] for row in sorted(rows, key=lambda r: r["line"])] == ["ok", "ok"]
        assert _main(tmp_path, *again, "--convert-isbn13") == ExitCode.OK

    @pytest.mark.parametrize(
        ("data", "first", "then", "expected"),
        [
            # A UTF-8 list with a line of only a no-break space (blank in UTF-8, the row "Â"
            # in cp1252) stopped at a cp1252 byte, then resumed as the message advises: line
            # 4 was written twice (and a stored line holding a byte cp1252 leaves undefined,
            # 0x81, failed the resume).
            (
                b"B00005N5PF\n\xc2\xa0\nB0000000XX # \xc3\x81rv\nB000000001\nB000000002 # caf\xe9\n"
                b"B000000003\n",
                (),
                ("--encoding", "cp1252"),
                [1, 3, 4, 5, 6],
            ),
            # A wrong guess first (cp1252: the NBSP line a row), then UTF-8: line 5 was lost.
            (
                b"B00005N5PF\n\xc2\xa0\nB0000000XX\nB000000001\nB000000002 # \xc3\x81rv\n",
                ("--encoding", "cp1252"),
                (),
                [1, 2, 3, 4, 5],  # line 2 as the first run read it: the row "Â", invalid
            ),
            # A UTF-8 export (its byte-order mark read) with a cp1252 row further on: the
            # resume as cp1252 was refused for the mark, and without it for the byte.
            (
                b"\xef\xbb\xbfasin,t\r\nB00005N5PF,caf\xc3\xa9\r\nB0000000XX,ok\r\n"
                b"B000000001,caf\xe9\r\n",
                (),
                ("--encoding", "cp1252"),
                [2, 3, 4],
            ),
        ],
        ids=["nbsp-then-cp1252", "cp1252-then-utf8", "bom-then-cp1252"],
    )
    def test_a_read_resumed_under_another_encoding_goes_on_after_the_stored_rows(
        self,
        tmp_path: Path,
        data: bytes,
        first: tuple[str, ...],
        then: tuple[str, ...],
        expected: list[int],
    ) -> None:
        """A read stopped on a byte its encoding cannot decode, resumed with another
        --encoding: every row once, none lost, as the README says; it went on after as many
        rows as were stored, which the other encoding counts otherwise."""
        job = tmp_path / ("job.csv" if data.startswith(b"\xef") else "job.txt")
        job.write_bytes(data)
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out), *first) == ExitCode.DATA_ERROR
        assert _main(tmp_path, str(job), "--out", str(out), *then) == ExitCode.OK
        lines = sorted(int(row["line"]) for row in _rows(out))  # type: ignore[call-overload]
        assert lines == expected

    def test_strict_on_a_resumed_read_refuses_an_invalid_row_already_stored(
        self, tmp_path: Path
    ) -> None:
        """--strict given to the run that resumes a stopped read judges the whole file, the
        rows the first run stored too, as it did before reads resumed by line."""
        job = tmp_path / "job.txt"
        job.write_bytes(b"B00005N5PF\nnot-an-asin\nB0000000XX # caf\xe9\n")
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.DATA_ERROR
        again = (str(job), "--out", str(out), "--encoding", "cp1252", "--strict")
        assert _main(tmp_path, *again) == ExitCode.DATA_ERROR

    def test_a_resume_whose_last_stored_line_reads_blank_now_finishes(self, tmp_path: Path) -> None:
        """The last row the first run stored (the row "Â" of a no-break space read as
        cp1252) reads as a blank line under UTF-8, and nothing after it is a row: the resume
        finishes, not refused as a file changed since."""
        job = tmp_path / "job.txt"
        job.write_bytes(b"B00005N5PF\n\xc2\xa0\n# \xc3\x81rv\n")
        out = tmp_path / "out.jsonl"
        first = (str(job), "--out", str(out), "--encoding", "cp1252")
        assert _main(tmp_path, *first) == ExitCode.DATA_ERROR
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.OK
        assert sorted(int(row["line"]) for row in _rows(out)) == [1, 2]  # type: ignore[call-overload]

    def test_an_output_name_with_no_room_for_its_side_files_is_refused_first(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An output whose name leaves no room for the files kept beside it (a --refresh's
        report, 26 bytes more) is refused before any request with 74 and the longest name
        that fits; it fetched every row and then failed at the end, every run (or failed
        its ledger with 65 "move the file away"). One byte shorter runs."""
        job = tmp_path / "job.txt"
        job.write_text("B000000001\nB000000002\n")
        fits = tmp_path / ("o" * 223 + ".jsonl")  # 229 bytes
        too_long = tmp_path / ("o" * 224 + ".jsonl")
        assert _main(tmp_path, str(job), "--out", str(too_long)) == ExitCode.IO_ERROR
        assert "give --out a name of at most 229 bytes" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "job.txt"]
        assert _main(tmp_path, str(job), "--out", str(fits)) == ExitCode.OK
        assert _main(tmp_path, str(job), "--out", str(fits), "--refresh") == ExitCode.OK

    def test_strict_refuses_before_any_call(self, tmp_path: Path) -> None:
        """--strict refuses a file with an invalid row and writes nothing, not even a ledger."""
        job = tmp_path / "job.txt"
        job.write_text("B0STSTST01\nnope\n")
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out), "--strict") == ExitCode.DATA_ERROR
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "job.txt"]

    async def test_unpinned_reading_options_let_the_job_go_on(self, tmp_path: Path) -> None:
        """The daemon's jobs (``pin_reading=False``) go on as they were read when its
        convert_isbn13 setting changes, instead of being refused with advice for the
        command line."""
        job = tmp_path / "job.txt"
        job.write_text("9780306406157\nB0ISBNISB1\n")
        out = tmp_path / "out.jsonl"
        config = load_config(_config(tmp_path))
        for convert in (False, True):
            options = JobOptions(
                job=job,
                out=out,
                progress="none",
                handle_signals=False,
                convert_isbn13=convert,
                pin_reading=False,
            )
            summary = await run_job(config, options)
            assert summary.exit_code() == ExitCode.OK
        assert summary.already_complete is not None

    async def test_the_job_file_is_hashed_off_the_event_loop(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The job file's fingerprint (a hash of all of it, a gzip one unpacked too) is
        taken in a worker thread: a daemon's /healthz went unanswered for 13 s while a 3 MiB
        gzip that unpacks to 4 GiB was hashed on the loop."""
        import threading

        seen: list[str] = []
        real = runner.fingerprint

        def recorded(path: Any) -> Any:
            seen.append(threading.current_thread().name)
            return real(path)

        monkeypatch.setattr(runner, "fingerprint", recorded)
        job = tmp_path / "job.txt.gz"
        job.write_bytes(gzip.compress(b"B0GZIPJOB1\n"))
        options = JobOptions(
            job=job, out=tmp_path / "out.jsonl", progress="none", handle_signals=False
        )
        summary = await run_job(load_config(_config(tmp_path)), options)
        assert summary.exit_code() == ExitCode.OK
        assert seen
        assert threading.main_thread().name not in seen

    def test_strict_new_job_refused_leaves_the_finished_job_as_it_was(self, tmp_path: Path) -> None:
        """--strict --new-job on a file with an invalid row is refused before the old job is
        dropped: with the original restored, the finished job is still complete."""
        job = tmp_path / "job.txt"
        job.write_text("B0STRICT01\nB0STRICT02\n")
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.OK
        before = out.read_bytes()
        original = job.read_bytes()
        job.write_bytes(original + b"not-an-asin\n")
        args = (str(job), "--out", str(out), "--strict", "--new-job")
        assert _main(tmp_path, *args) == ExitCode.DATA_ERROR
        job.write_bytes(original)
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.OK
        assert out.read_bytes() == before
        with sqlite_db(tmp_path / "out.jsonl.ledger") as db:
            assert db.execute("SELECT count(*) FROM rows").fetchone() == (2,)

    def test_a_job_file_edited_while_it_is_read_is_refused_and_stores_no_edited_row(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A job file edited in place while it is being ingested (same size): the run stops
        with 65 "changed while it was being read" before storing a row read after the edit;
        with the original restored, the job resumes and every row answers its own line."""
        from broker.jobs import runner

        monkeypatch.setattr(runner, "_INGEST_CHUNK", 100)
        lines = [f"B0{i:08d}" for i in range(1_000)]
        original = "".join(f"{line}\n" for line in lines)
        job = tmp_path / "job.txt"
        job.write_text(original)
        out = tmp_path / "out.jsonl"
        read = runner._read

        def edited_midway(
            options: runner.JobOptions, stored_through_line: int = 0
        ) -> Iterator[sources.JobRow]:
            for count, row in enumerate(read(options, stored_through_line)):
                if count == 300:  # overwrite line 901 in place, as an editor would
                    with job.open("r+b") as handle:
                        handle.seek(900 * 11)
                        handle.write(b"B9EDITEDXX")
                    os.utime(job, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
                yield row

        monkeypatch.setattr(runner, "_read", edited_midway)
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.DATA_ERROR
        assert "changed while it was being read" in capsys.readouterr().err
        monkeypatch.setattr(runner, "_read", read)
        job.write_text(original)
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.OK
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 1_000
        assert all(row["input"] == lines[row["line"] - 1] for row in rows)

    def test_a_partial_ordered_export_left_by_a_kill_is_removed(self, tmp_path: Path) -> None:
        """A --ordered export cut short by kill -9 leaves <out>.ordering (as large as the
        output); the next run, ordered or not, removes it."""
        job = tmp_path / "job.txt"
        job.write_text("B0RRRRRR01\nB0RRRRRR02\n")
        out = tmp_path / "out.jsonl"
        stale = tmp_path / "out.jsonl.ordering"
        stale.write_text('{"partial": true}\n')
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.OK
        assert not stale.exists()

    def test_a_job_named_like_the_ordered_copy_of_its_output_is_refused(
        self, tmp_path: Path
    ) -> None:
        """A job file that is <out>.ordering (which a run removes, and --ordered writes) is a
        usage error, and the job file stays."""
        job = tmp_path / "list.ordering"
        job.write_text("B0RRRRRR01\n")
        assert _main(tmp_path, str(job), "--out", str(tmp_path / "list")) == ExitCode.USAGE
        assert job.read_text() == "B0RRRRRR01\n"

    def test_missing_input(self, tmp_path: Path) -> None:
        """A missing job file exits 66."""
        assert _main(tmp_path, str(tmp_path / "nope.txt")) == ExitCode.NO_INPUT

    def test_an_output_directory_gone_is_a_write_error_not_missing_input(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An output file that cannot be created (its directory removed mid-run) exits 74
        "cannot write", not 66 "input not found"."""
        from broker.jobs import ledger as ledger_module

        job = tmp_path / "job.txt"
        job.write_text("B0RRRRRR01\n")

        def gone(self: object, *args: object, **kwargs: object) -> None:
            raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "o.tmp"))

        monkeypatch.setattr(ledger_module.Ledger, "record_results", gone)
        out = tmp_path / "out.jsonl"
        assert _main(tmp_path, str(job), "--out", str(out)) == ExitCode.IO_ERROR
        err = capsys.readouterr().err
        assert "cannot write" in err
        assert "input not found" not in err

    def test_unreadable_input_is_bad_input_not_a_write_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A job file this user may not read exits 66 saying it cannot be read (not 74
        "cannot write"), and creates nothing; as the daemon files such a job (K1)."""
        job = tmp_path / "job.txt"
        job.write_text("B0RRRRRR01\n")

        def denied(path: object, *args: object, **kwargs: object) -> object:
            if Path(str(path)).name == "job.txt":
                raise PermissionError(13, "Permission denied", str(path))
            return open(path, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(sources, "open", denied, raising=False)  # as root, chmod 0 reads
        assert _main(tmp_path, str(job)) == ExitCode.NO_INPUT
        err = capsys.readouterr().err
        assert "cannot read" in err
        assert "Permission denied" in err
        assert "cannot write" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "job.txt"]


class TestSummary:
    async def test_shared_broker_reports_each_jobs_own_requests(self, tmp_path: Path) -> None:
        """With a broker passed in (the daemon's), a summary counts that job's requests only."""
        config = parse_config(
            {
                "api": {"endpoint": "simulator"},
                "keys": [
                    {
                        "name": "demo",
                        "credential_id": "demo-id",
                        "version": "3.1",
                        "partner_tags": {"www.amazon.com": "demo-20"},
                        "tps": 50.0,
                        "tpd": 0,
                    }
                ],
            },
            environ={},
        )
        summaries = []
        async with Broker(config) as broker:
            for n, count in enumerate((30, 20)):
                job = tmp_path / f"job{n}.txt"
                job.write_text("\n".join(f"B0SUMM{n}{i:03d}" for i in range(count)) + "\n")
                options = JobOptions(
                    job=job, out=tmp_path / f"out{n}.jsonl", progress="none", handle_signals=False
                )
                summaries.append(await run_job(config, options, broker=broker))
            total = broker.metrics().requests
        first, second = summaries
        assert first.requests >= 3
        assert second.requests >= 2
        assert first.requests + second.requests == total


class TestKeysAndSignals:
    def test_bad_credentials_stop_with_77_and_leave_rows_pending(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A key with a wrong secret stops the job (77) naming the key; rows stay pending."""
        monkeypatch.setenv("ASINB_BAD", "wrong-secret")
        config = tmp_path / "bad.toml"
        config.write_text(
            '[api]\nendpoint = "simulator"\n'
            + _KEY.replace(
                'version = "3.1"', 'version = "3.1"\ncredential_secret_env = "ASINB_BAD"'
            )
            + _SIM
        )
        job = tmp_path / "job.txt"
        job.write_text("B0BCBCBC01\nB0BCBCBC02\n")
        out = tmp_path / "out.jsonl"
        code = cli.main(
            ["run", str(job), "--config", str(config), "--out", str(out), "--progress", "none"]
        )
        assert code == ExitCode.NO_PERMISSION
        err = capsys.readouterr().err
        assert "demo" in err
        assert "invalid_client" in err
        assert "wrong-secret" not in err

    async def test_no_wait_stops_resumable_when_tpd_is_spent(self, tmp_path: Path) -> None:
        """--no-wait: with every key's daily budget spent the run stops with 75, rows pending."""
        config = _tpd2_config()
        job = tmp_path / "job.txt"
        job.write_text("\n".join(f"B0NWNWNW{i:02d}" for i in range(40)) + "\n")
        options = JobOptions(
            job=job,
            out=tmp_path / "out.jsonl",
            progress="none",
            handle_signals=False,
            no_wait=True,
        )
        summary = await asyncio.wait_for(run_job(config, options), timeout=20)
        assert summary.exit_code() == ExitCode.RESUMABLE == 75
        assert summary.quota_wait_until is not None
        assert summary.quota_wait_until.endswith("T00:00:00Z")
        assert not summary.stopped_by_signal
        assert 1 <= summary.requests <= 2
        assert summary.pending == 40 - len(_rows(tmp_path / "out.jsonl")) > 0

    @pytest.mark.parametrize("us_key_uk_tag", [None, "bogus-21"])
    async def test_no_wait_stops_when_the_keys_the_rows_left_need_are_spent(
        self, tmp_path: Path, us_key_uk_tag: str | None
    ) -> None:
        """--no-wait: the US rows done and the UK rows left needing only a UK key whose daily
        budget is spent, the run stops with 75 though the US key is idle and fresh (also when
        it has a UK tag Amazon rejects); it sat until the reset (hours), as --no-wait
        promises it will not."""
        config = _us_uk_config(uk_tag_on_us_key=us_key_uk_tag)
        options = _us_uk_job(tmp_path, 40, ("www.amazon.com", "www.amazon.co.uk"))
        out = options.out
        summary = await asyncio.wait_for(run_job(config, options), timeout=20)
        assert summary.exit_code() == ExitCode.RESUMABLE
        assert summary.quota_wait_until is not None
        done = {(row["marketplace"], row["status"]) for row in _rows(out)}
        assert ("www.amazon.com", "ok") in done
        assert sum(row["marketplace"] == "www.amazon.com" for row in _rows(out)) == 40
        assert summary.pending > 0

    async def test_a_rejected_marketplace_does_not_stop_the_others(self, tmp_path: Path) -> None:
        """The UK's only key rejected (a wrong secret): every US row is still answered, then
        the run stops with the UK's NoUsableKeyError (77) and the UK rows pending; the first
        refusal cancelled every marketplace's stream and the output had no row at all."""
        config = _us_uk_config(uk_secret="wrong-secret")
        options = dataclasses.replace(
            _us_uk_job(tmp_path, 40, ("www.amazon.co.uk", "www.amazon.com")), no_wait=False
        )
        with pytest.raises(NoUsableKeyError) as info:
            await asyncio.wait_for(run_job(config, options), timeout=20)
        assert info.value.marketplace == "www.amazon.co.uk"
        done = _rows(options.out)
        assert {(row["marketplace"], row["status"]) for row in done} == {("www.amazon.com", "ok")}
        assert len(done) == 40

    async def test_every_marketplace_no_key_serves_is_named(self) -> None:
        """Two marketplaces whose keys were all rejected (wrong tags for JP and UK): the run's
        error names both, each with its failure and its exit code's kind; it named the
        first, so the user fixed JP and learnt of UK only on the rerun."""
        from broker.errors import KeyUnusableError
        from broker.jobs.runner import describe_failure, each_marketplace

        def refused(market: str) -> NoUsableKeyError:
            failure = KeyUnusableError("demo", "InvalidPartnerTag", f"tag for {market}", "fix")
            return NoUsableKeyError(market, [failure])

        async def fails(market: str) -> None:
            raise refused(market)

        async def fine() -> None:
            await asyncio.sleep(0)

        streams = [fails("www.amazon.co.jp"), fine(), fails("www.amazon.co.uk")]
        with pytest.raises(NoUsableKeyError) as info:
            await each_marketplace(streams)
        text = str(info.value)
        assert "no key can serve www.amazon.co.jp: demo: InvalidPartnerTag" in text
        assert "no key can serve www.amazon.co.uk: demo: InvalidPartnerTag" in text
        assert describe_failure(info.value)[0] == ExitCode.NO_PERMISSION

    async def test_a_spent_marketplace_does_not_hold_up_the_others(self, tmp_path: Path) -> None:
        """Rows alternating US and UK, the UK key's daily budget spent after 2 requests, and
        room for only 10 lookups: every US row is still answered (the fresh US key idled
        once UK lookups it cannot send filled the room), then --no-wait stops with 75."""
        config = _us_uk_config(queue_size=10)
        options = _us_uk_job(tmp_path, 60, ("www.amazon.co.uk", "www.amazon.com"))
        out = options.out
        summary = await asyncio.wait_for(run_job(config, options), timeout=20)
        assert summary.exit_code() == ExitCode.RESUMABLE
        done = _rows(out)
        assert sum(row["marketplace"] == "www.amazon.com" for row in done) == 60
        assert summary.pending == 120 - len(done) > 0

    def test_no_wait_also_stops_for_keys_parked_after_sustained_429s(self) -> None:
        """A key parked after sustained 429s with its own count low (the server's daily
        quota is smaller than tpd says, or the account is not eligible) waits for hours
        too: --no-wait stops for it as for a spent tpd."""
        from types import SimpleNamespace

        from broker.jobs.runner import quota_wait

        now = datetime(2026, 5, 1, 12, tzinfo=UTC)
        probe = "2026-05-01T12:15:00Z"

        def broker(*reasons: str) -> Any:
            keys = [
                SimpleNamespace(state="parked", reason=r, until=probe, daily_resets_at="Z")
                for r in reasons
            ]
            return SimpleNamespace(metrics=lambda: SimpleNamespace(keys=keys))

        revoked = ThrottleVerdict.ACCESS_REVOKED.value
        assert quota_wait(broker(revoked).metrics(), now=now) == probe
        assert quota_wait(broker(revoked, "waiting for daily quota").metrics(), now=now) == probe
        assert quota_wait(broker(revoked, "Retry-After").metrics(), now=now) is None

    def test_a_parked_key_whose_probe_is_due_no_longer_waits(self) -> None:
        """A key parked after 429s whose probe is due (no until, or one past) does not wait:
        work must go to it to carry the probe. A daemon's job deferred on such a park
        stayed deferred for ever, the key waiting for work to probe with; a spent tpd still
        waits for its reset."""
        from types import SimpleNamespace

        from broker.jobs.runner import quota_wait

        now = datetime(2026, 5, 1, 12, tzinfo=UTC)

        def metrics(reason: str, until: str | None) -> Any:
            key = SimpleNamespace(
                name="k", state="parked", reason=reason, until=until, daily_resets_at="Z"
            )
            return SimpleNamespace(keys=[key])

        revoked = ThrottleVerdict.ACCESS_REVOKED.value
        assert quota_wait(metrics(revoked, "2026-05-01T12:15:00Z"), now=now) is not None
        assert quota_wait(metrics(revoked, "2026-05-01T11:59:00Z"), now=now) is None
        assert quota_wait(metrics(revoked, None), now=now) is None
        assert quota_wait(metrics("waiting for daily quota", None), now=now) == "Z"

    async def test_tpd_spent_waits_instead_of_failing(self, tmp_path: Path) -> None:
        """With the daily budget spent the job waits (rows stay pending), it does not fail rows."""
        config = _tpd2_config()
        job = tmp_path / "job.txt"
        job.write_text("\n".join(f"B0TPTPTP{i:02d}" for i in range(40)) + "\n")
        options = JobOptions(
            job=job, out=tmp_path / "out.jsonl", progress="none", handle_signals=False
        )
        task = asyncio.get_running_loop().create_task(run_job(config, options))
        await asyncio.sleep(3.0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rows = _rows(tmp_path / "out.jsonl")
        assert 0 < len(rows) <= 20
        assert all(r["status"] in ("ok", "not_found") for r in rows)


def test_config_error_at_run_time_maps_to_78() -> None:
    """A ConfigError raised during a run (e.g. a key with no secret) exits 78, not 1."""
    from broker.errors import ConfigError
    from broker.jobs.runner import describe_failure

    code, message = describe_failure(ConfigError("keys.x", "no secret"))
    assert code == ExitCode.CONFIG == 78
    assert "keys.x" in message


class _Metrics:
    """What ``_Progress`` reads of a broker's metrics."""

    def __init__(self, throttled: int) -> None:
        self.throttled = throttled
        self.keys: list[object] = []


class _SharedBroker:
    """A daemon's broker, shared by its jobs: its 429 count covers every earlier job."""

    def __init__(self) -> None:
        self.throttled = 40
        self.clock = FakeClock()

    def metrics(self) -> _Metrics:
        return _Metrics(self.throttled)


class _Tally:
    def counts(self) -> Counts:
        return Counts(total=10, done=4, pending=6)


def test_progress_counts_the_jobs_own_429s(tmp_path: Path) -> None:
    """A progress event's 429 count is the job's own, not the shared broker's total (a
    daemon's broker counts every job it ran before)."""
    broker = _SharedBroker()
    options = JobOptions(job=tmp_path / "j.txt", out=tmp_path / "o.jsonl", progress="log")
    progress = runner._Progress(_Tally(), broker, options)  # type: ignore[arg-type]
    broker.throttled += 3
    with capture_logs() as logs:
        progress._show()
    (event,) = [e for e in logs if e["event"] == "broker.progress"]
    assert event["throttled"] == 3


def test_progress_says_the_job_waits_for_the_quota_its_rows_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rows left are all for FR, whose keys wait for their daily quota while the US
    key idles: the progress says the job waits until the reset, not an ETA from the
    average rate ("ETA 0m01s" for a job held for hours)."""
    from broker.engine.metrics import KeySnapshot

    until = "2026-12-06T00:00:00Z"
    us = KeySnapshot("us", "active", 1, 1, 0, 1, 0, 0, 1, 8640, None)
    fr = KeySnapshot("fr", "paused", 1, 1, 0, 1, 0, 0, 1, 8640, None, runner.QUOTA_WAIT, until)
    broker = _SharedBroker()
    monkeypatch.setattr(
        broker, "metrics", lambda: type("M", (), {"throttled": 0, "keys": [us, fr]})
    )
    for mode in ("log", "bar"):
        options = JobOptions(job=tmp_path / "j.txt", out=tmp_path / "o.jsonl", progress=mode)
        progress = runner._Progress(
            _Tally(),
            broker,
            options,
            needed=lambda: {"fr"},  # type: ignore[arg-type]
        )
        progress._start_done = 0  # four rows done since the start: a rate, and an ETA
        with capture_logs() as logs:
            try:
                progress._show()
            finally:
                progress.done()  # a live line left up would prefix later tests' stderr
        if mode == "log":
            (event,) = [e for e in logs if e["event"] == "broker.progress"]
            assert event["held_until"] == until
            assert event["eta_s"] is None
    line = capsys.readouterr().err
    assert f"held until {until} (keys wait)" in line
    assert "ETA" not in line


def test_progress_eta_counts_the_days_the_daily_quota_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests' worth of US lookups left, one request left of the US key's day: the
    ETA runs to the reset and past it, not the seconds the rate alone tells; a UK key with
    quota to spare does not lend the US rows its quota."""
    clock = FakeClock()  # 2026-05-01T12:00:00Z: the reset is 12 hours away
    us_market, uk_market = "www.amazon.com", "www.amazon.co.uk"
    us = _key_today(1, 1, resets_at="2026-05-02T00:00:00Z", markets=(us_market,))
    uk = _key_today(100_000, 0, resets_at="2026-05-02T00:00:00Z", markets=(uk_market,), name="uk")
    broker = _SharedBroker()
    broker.clock = clock  # type: ignore[attr-defined]
    monkeypatch.setattr(
        broker, "metrics", lambda: type("M", (), {"throttled": 0, "keys": [us, uk]})
    )
    options = JobOptions(job=tmp_path / "j.txt", out=tmp_path / "o.jsonl", progress="log")
    left = {us_market: 30, uk_market: 30}
    progress = runner._Progress(
        _Tally(),
        broker,  # type: ignore[arg-type]
        options,
        needed=lambda: {"demo", "uk"},
        left=left,
    )
    progress._start_done = 0  # four rows done since the start: a rate
    clock._now += 2.0  # type: ignore[attr-defined]
    with capture_logs() as logs:
        progress._show()
    (event,) = [e for e in logs if e["event"] == "broker.progress"]
    assert event["eta_s"] >= 12 * 3600


def _progress_of(
    tmp_path: Path, keys: list[KeySnapshot], **options: Any
) -> tuple[runner._Progress, _SharedBroker]:
    """A progress in log mode over ``_Tally`` (4 of 10 rows done) and ``keys``."""
    broker = _SharedBroker()
    broker.clock = FakeClock()  # 2026-05-01T12:00:00Z
    monkeypatch_keys: dict[str, list[KeySnapshot]] = {"keys": keys}
    broker.metrics = lambda: type(  # type: ignore[method-assign]
        "M", (), {"throttled": 0, "keys": monkeypatch_keys["keys"]}
    )
    job = JobOptions(job=tmp_path / "j.txt", out=tmp_path / "o.jsonl", progress="log")
    progress = runner._Progress(_Tally(), broker, job, **options)  # type: ignore[arg-type]
    return progress, broker


def _eta(progress: runner._Progress) -> Any:
    with capture_logs() as logs:
        progress._show()
    (event,) = [e for e in logs if e["event"] == "broker.progress"]
    return event["eta_s"], event["rows_per_s"]


@pytest.mark.parametrize(("batch", "days"), [(10, False), (1, True)])
def test_progress_eta_counts_requests_of_the_configured_batch_size(
    tmp_path: Path, batch: int, days: bool
) -> None:
    """30 lookups left and 5 requests left of the key's day: in batches of 10 they fit
    today, one by one (engine.batch_size = 1) they wait for the reset. Full batches were
    assumed: an ETA of minutes for a job that takes days."""
    us = _key_today(5, 0, resets_at="2026-05-02T00:00:00Z")
    progress, broker = _progress_of(
        tmp_path, [us], needed=lambda: {"demo"}, left={"www.amazon.com": 30}, batch_size=batch
    )
    progress._start_done = 0
    broker.clock._now += 2.0  # type: ignore[attr-defined]
    eta, _ = _eta(progress)
    assert (eta >= 12 * 3600) is days


def test_progress_eta_counts_the_requests_on_the_wire_as_the_rows_own(tmp_path: Path) -> None:
    """Three requests' rows left, one request left of the key's day and two on the wire
    (counted spent when booked): the job fits today. It was told to wait for the reset, a
    job sized to the quota shown an ETA of 14 hours 5 s before it ended."""
    us = dataclasses.replace(_key_today(1, 29, resets_at="2026-05-02T00:00:00Z"), in_flight=2)
    progress, broker = _progress_of(
        tmp_path, [us], needed=lambda: {"demo"}, left={"www.amazon.com": 30}
    )
    progress._start_done = 0
    broker.clock._now += 2.0  # type: ignore[attr-defined]
    eta, _ = _eta(progress)
    assert eta < 60


class _Done:
    """A ledger's counts with ``done`` of 100 rows done (settable)."""

    def __init__(self, done: int) -> None:
        self.done = done

    def counts(self) -> Counts:
        return Counts(total=100, done=self.done, pending=100 - self.done)


def test_progress_rate_after_a_hold_counts_from_its_end(tmp_path: Path) -> None:
    """Held an hour for the keys' daily reset, then 20 rows in 10 s: 2 rows/s and an ETA
    of seconds from the first look after the hold, not the rate over the hour waited (0.04
    rows/s, an ETA of minutes for a job ending in seconds)."""
    until = "2026-05-02T00:00:00Z"
    held = KeySnapshot("demo", "paused", 1, 1, 0, 1, 0, 0, 1, 8640, None, runner.QUOTA_WAIT, until)
    ledger = _Done(4)
    progress, broker = _progress_of(tmp_path, [held], needed=lambda: {"demo"})
    progress._ledger = ledger  # type: ignore[assignment]
    clock = broker.clock
    clock._now += 3600.0  # type: ignore[attr-defined]
    assert _eta(progress) == (None, 0.0)
    broker.metrics = lambda: type(  # type: ignore[method-assign]
        "M", (), {"throttled": 0, "keys": [_key_today(None, 0)]}
    )
    clock._now += 10.0  # type: ignore[attr-defined]
    ledger.done = 24
    eta, rate = _eta(progress)
    assert rate == 2.0
    assert eta == 38  # 76 rows left at 2 a second


def test_progress_rate_counts_up_to_the_last_commit(tmp_path: Path) -> None:
    """Rows are committed about once a second: a look 0.9 s after a commit of 10 rows in
    the run's first second says 10 rows/s (over the 1.9 s to the look, 5.3: every other
    look showed about half the rate)."""
    ledger = _Done(0)
    committed = [0.0]
    progress, broker = _progress_of(
        tmp_path, [_key_today(None, 0)], committed_at=lambda: committed[0]
    )
    progress._ledger = ledger  # type: ignore[assignment]
    progress._start_done = 0
    start = broker.clock.monotonic()
    ledger.done, committed[0] = 10, start + 1.0
    broker.clock._now = start + 1.9  # type: ignore[attr-defined]
    _, rate = _eta(progress)
    assert rate == 10.0


def test_a_write_error_on_a_relative_path_says_where_that_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A default output under a working directory the user cannot write (a container's
    /etc/asin-broker) names that directory: "cannot write: out: Permission denied" did not
    say where out was."""
    monkeypatch.chdir(tmp_path)
    code, message = runner.describe_failure(PermissionError(13, "Permission denied", "out"))
    assert code == ExitCode.IO_ERROR
    assert message == f"cannot write: out: Permission denied (in {tmp_path})"
    _, absolute = runner.describe_failure(PermissionError(13, "Permission denied", "/x/out"))
    assert absolute == "cannot write: /x/out: Permission denied"


@pytest.mark.parametrize("number", [errno.EMFILE, errno.ENFILE])
def test_running_out_of_open_files_is_said_so(number: int) -> None:
    """A process out of open files (a daemon scanning inbox/) is told as that, with the
    limit to raise; it said "cannot write: inbox: Too many open files", read as a disk or
    permission fault, though nothing was being written."""
    code, message = runner.describe_failure(OSError(number, os.strerror(number), "/s/inbox"))
    assert code == ExitCode.IO_ERROR
    assert message.startswith("out of open files: /s/inbox: ")
    assert "cannot write" not in message
    assert "ulimit -n" in message
    # Also when it names the job file: not "cannot read the job file ... make it readable".
    job = Path("/s/processing/j.txt")
    code, message = runner.describe_failure(OSError(number, os.strerror(number), str(job)), job=job)
    assert code == ExitCode.IO_ERROR
    assert message.startswith("out of open files: ")


@pytest.mark.parametrize(
    ("code", "at_fault"),
    [("NoTokenEndpoint", "fix what it names (the config"), ("InvalidPartnerTag", "fix the key")],
)
def test_a_stop_for_no_usable_key_says_what_to_fix(code: str, at_fault: str) -> None:
    """A run stopped because no key can serve says to fix what the code names (the config,
    or a bug) when a global code took the keys out, the key otherwise; it always said the
    key."""
    from broker.errors import KeyUnusableError, NoUsableKeyError, describe

    failure = KeyUnusableError("main", code, "what happened", describe(code).remedy)
    exit_code, message = runner.describe_failure(NoUsableKeyError("www.amazon.com", [failure]))
    assert exit_code == ExitCode.NO_PERMISSION
    assert at_fault in message


def test_a_stop_for_no_usable_key_with_one_global_code_among_others_says_the_config() -> None:
    """Keys taken out by a global code and by a key's own code at once: the stop says to fix
    what the codes name (the config, or a bug), not the key alone."""
    from broker.errors import KeyUnusableError, NoUsableKeyError, describe

    failures = [
        KeyUnusableError(name, code, "what happened", describe(code).remedy)
        for name, code in (("main", "InvalidPartnerTag"), ("spare", "NoTokenEndpoint"))
    ]
    exit_code, message = runner.describe_failure(NoUsableKeyError("www.amazon.com", failures))
    assert exit_code == ExitCode.NO_PERMISSION
    assert "Unfinished rows stay pending; fix what it names (the config, or a bug" in message


def test_a_key_state_store_outage_stops_with_69_and_rows_pending() -> None:
    """The key-state store unreachable (Redis down) is an outage that ends by itself: exit
    69, and the message says unfinished rows stay pending for the next run."""
    from broker.errors import StateUnavailableError

    code, message = runner.describe_failure(StateUnavailableError("redis", "connection refused"))
    assert code == ExitCode.UNAVAILABLE == 69
    assert message == (
        "stopped: key-state store (redis) unavailable: connection refused. "
        "Unfinished rows stay pending for the next run."
    )


async def test_a_long_read_of_the_job_file_is_said_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job file that takes a while to read (millions of rows) says how many rows it has
    read, first after first_progress_s: nothing is sent before it all is, and a 2-million-row
    job was silent for 26 s, a hang to anyone watching its log."""
    job = tmp_path / "job.txt"
    job.write_text("".join(f"B0RD{i:06d}\n" for i in range(40)))
    real = runner._read

    def slow(options: JobOptions, stored_through_line: int = 0) -> Iterator[Any]:
        for row in real(options, stored_through_line):
            time.sleep(0.01)  # 0.4 s for the file
            yield row

    monkeypatch.setattr(runner, "_read", slow)
    options = JobOptions(
        job=job,
        out=tmp_path / "out.jsonl",
        progress="log",
        first_progress_s=0.1,
        progress_every_s=0.1,
        handle_signals=False,
    )
    with capture_logs() as logs:
        summary = await run_job(load_config(_config(tmp_path)), options)
    assert summary.total == 40
    reading = [e["rows_read"] for e in logs if e["event"] == "broker.job_reading"]
    assert len(reading) >= 2
    assert reading == sorted(reading)
    assert 0 < reading[0] < 40


async def test_a_stop_forced_between_pages_of_a_write_leaves_no_row_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second SIGTERM that lands between two pages of a commit's write (8,000 rows of one
    ASIN, one lookup): the write stops soon after (a million rows so held the run half a
    minute, deaf to signals), and the run, whose output lacks rows, is not called complete
    (2,000 rows were once missing from an output the run called complete): it is stopped,
    and the rerun writes every row once."""
    from broker.jobs.signals import ECHO_S

    job = tmp_path / "job.txt"
    job.write_text("B0DUPDUP01\n" * 8000)
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(runner, "_COMMIT_ROWS", 1)
    flushed: list[str] = []

    def signal_mid_write(point: str) -> None:
        if point != "after_flush":
            return
        flushed.append(point)
        if len(flushed) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if len(flushed) == 4:
            time.sleep(ECHO_S + 0.1)  # a second signal, not the first one's echo
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runner, "crash_point", signal_mid_write)
    config = load_config(_config(tmp_path))
    options = JobOptions(job=job, out=out, progress="none", handle_signals=True)
    summary = await run_job(config, options)
    assert summary.by_status == {"ok": 8000}
    assert len(_rows(out)) < 8000
    assert summary.stopped_by_signal
    assert summary.exit_code() == ExitCode.RESUMABLE
    monkeypatch.undo()
    again = await run_job(config, options)
    assert again.exit_code() == ExitCode.OK
    assert [row["line"] for row in _rows(out)] == list(range(1, 8001))


async def test_a_drain_timer_firing_after_the_fetch_ended_forces_nothing() -> None:
    """The drain's grace period running out after the fetch ended (during the --ordered
    export or the report) logs no broker.job_stop_forced: nothing was in flight to stop,
    and it said lookups in flight stay pending."""
    stop = runner._Stop(grace_s=0.01)
    fetch = asyncio.ensure_future(asyncio.sleep(0))
    stop.watch(fetch)
    await fetch
    with capture_logs() as logs:
        stop.on_first_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
    assert not [e for e in logs if e["event"] == "broker.job_stop_forced"]
    stop.close()


def _key_today(
    left: int | None,
    spent: int,
    resets_at: str | None = "2026-12-07T00:00:00Z",
    *,
    markets: tuple[str, ...] = ("www.amazon.com",),
    name: str = "demo",
) -> KeySnapshot:
    """A key serving ``markets`` with ``left`` sends today (None: unlimited) after ``spent``."""
    return KeySnapshot(
        name=name,
        state="active",
        rate=1.0,
        configured_tps=1.0,
        in_flight=0,
        sent=spent,
        throttled=0,
        errors=0,
        daily_spent=spent,
        daily_limit=None if left is None else left + spent,
        daily_resets_at=resets_at,
        daily_left=left,
        marketplaces=markets,
    )


class TestQuotaEta:
    NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)  # 12 h before the reset

    def test_requests_the_day_can_take_add_no_wait(self) -> None:
        """Requests that fit in what the marketplace's keys have left today: no wait (the
        rows per second tell the time)."""
        keys = [_key_today(20, 0)]
        assert runner.quota_eta({"www.amazon.com": 10}, keys, now=self.NOW) == 0.0

    def test_requests_past_the_daily_quota_wait_for_the_resets(self) -> None:
        """A million ASINs (100,000 requests) at 8,640 requests a day, 8,000 left today: the
        reset in 12 h, then ten full days, then the rest at the key's rate."""
        key = _key_today(8_000, 640)
        eta = runner.quota_eta({"www.amazon.com": 100_000}, [key], now=self.NOW)
        days, rest = divmod(100_000 - 8_000, 8_640)
        assert eta == 12 * 3600 + days * 86_400 + rest / 1.0
        assert runner._fmt_eta(eta) == "10d13h"

    def test_each_marketplace_keeps_to_its_own_keys(self) -> None:
        """A spent US key is not helped by a UK key's spare quota: the US requests wait."""
        us = _key_today(0, 3)
        uk = _key_today(100_000, 0, markets=("www.amazon.co.uk",), name="uk")
        requests = {"www.amazon.com": 28, "www.amazon.co.uk": 28}
        assert runner.quota_eta(requests, [us, uk], now=self.NOW) >= 12 * 3600

    def test_marketplaces_sharing_a_key_share_its_quota(self) -> None:
        """One key with 10 requests left, serving US and UK, 8 needed in each: 16 do not
        fit in today's 10 (each marketplace was weighed against all 10)."""
        key = _key_today(10, 0, markets=("www.amazon.com", "www.amazon.co.uk"))
        requests = {"www.amazon.com": 8, "www.amazon.co.uk": 8}
        assert runner.quota_eta(requests, [key], now=self.NOW) >= 12 * 3600

    def test_a_marketplace_keeps_to_its_own_keys_within_a_group(self) -> None:
        """A US+UK key with 10 left and a UK-only key with 1,000 (or unlimited): the 100 US
        requests can use only the shared key's 10, whatever the group holds."""
        both = _key_today(10, 0, markets=("www.amazon.com", "www.amazon.co.uk"))
        requests = {"www.amazon.com": 100, "www.amazon.co.uk": 1}
        for uk_left in (1_000, None):
            uk = _key_today(uk_left, 0, markets=("www.amazon.co.uk",), name="uk")
            assert runner.quota_eta(requests, [both, uk], now=self.NOW) >= 12 * 3600

    def test_unlimited_keys_add_no_wait(self) -> None:
        """A key without a daily limit (tpd 0) does not hold the rows to a day's quota."""
        keys = [_key_today(None, 5)]
        assert runner.quota_eta({"www.amazon.com": 100_000}, keys, now=self.NOW) == 0.0


def test_a_key_out_of_every_marketplace_is_told_once_per_marketplace() -> None:
    """A key rejected in each of its marketplaces (wrong tags) is listed once per
    marketplace, not also as a whole key whose reason repeats them; a key rejected as a
    whole keeps its own entry beside any marketplace it left before."""
    from broker.engine.metrics import MetricsSnapshot
    from broker.jobs.runner import _keys_out

    tags = (("www.amazon.co.uk", "InvalidPartnerTag"), ("www.amazon.com", "InvalidPartnerTag"))
    wrong_tags = KeySnapshot(
        "wrongtags", "disabled", 1, 1, 0, 1, 0, 0, 1, 8640, None,
        "out of rotation for www.amazon.co.uk (InvalidPartnerTag), www.amazon.com "
        "(InvalidPartnerTag)",
        markets_out=tags,
    )  # fmt: skip
    rejected = KeySnapshot(
        "bad", "disabled", 1, 1, 0, 1, 0, 0, 1, 8640, None, "invalid_client: check the secret",
        markets_out=tags[:1],
    )  # fmt: skip
    snapshot = MetricsSnapshot(
        0, {}, 0, 0, 0, {}, (0,) * 11, 0.0, 0, 0, 0, keys=(wrong_tags, rejected)
    )
    assert _keys_out(snapshot) == (
        "wrongtags in www.amazon.co.uk: InvalidPartnerTag",
        "wrongtags in www.amazon.com: InvalidPartnerTag",
        "bad: invalid_client: check the secret",
        "bad in www.amazon.co.uk: InvalidPartnerTag",
    )


@pytest.mark.parametrize(
    ("rate", "shown"),
    [(0.05, "0.05"), (4.7, "4.7"), (12.5, "12"), (99.7, "100"), (150.0, "150"), (1000.0, "1000")],
)
def test_a_keys_rate_is_shown_without_an_exponent(rate: float, shown: str) -> None:
    """The progress line shows a key's rate as a plain number: 1000 TPS read "1e+03/s"."""
    assert runner._rate_shown(rate) == shown
