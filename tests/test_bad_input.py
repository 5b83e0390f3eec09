"""Bad input, cases C1-C11 of reliability.md section 3.3, through the whole job path.

Each case class runs a job file through ``run_job`` (against an in-process simulator, with a
transport that counts every (marketplace, ASIN) the broker asked for) or through the
``broker run`` command line where the exit code and message are the point. The reader-level
details of each case are pinned in tests/test_sources.py; here is what a user of
``broker run`` sees: exit code, output rows, the ``.invalid.jsonl`` report, API calls.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import gzip
import json
import random
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import structlog
from conftest import US, embedded_toml, key_doc

from broker import cli
from broker.client import Broker
from broker.config import BrokerConfig, parse_config
from broker.engine.transport import AiohttpTransport
from broker.errors import JobFileError, describe
from broker.jobs.ledger import Ledger
from broker.jobs.runner import ExitCode, JobOptions, JobSummary, describe_failure, run_job
from broker.jobs.sources import (
    DEFAULT_MAX_LINE_BYTES,
    JobRow,
    fingerprint,
    read_job,
)
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import SimulatorSettings

if TYPE_CHECKING:
    from broker.api.base import HttpRequest, RawResponse
    from broker.simulator.stats import SimulatorStats

UK = "www.amazon.co.uk"
# Lean items and no server-side limits: these tests are about input, not rate limiting,
# and the big ones must not spend their time rendering fields nobody reads.
_SETTINGS = SimulatorSettings(limits=False, explicit_nulls=False)
_RESOURCES = ["itemInfo.title"]


class _PairCounter:
    """Wraps a transport; counts each (marketplace, ASIN) that a GetItems request asked for.

    It keeps counts only, not requests or responses, so it can watch a million-row job.
    """

    def __init__(self, inner: AiohttpTransport) -> None:
        self.inner = inner
        self.pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        self.get_items = 0

    async def send(self, request: HttpRequest) -> RawResponse:
        """Count the ASINs of a GetItems request, then send it."""
        marketplace = request.headers.get("x-marketplace")
        if marketplace is not None and request.url.endswith("/getItems"):
            self.get_items += 1
            for asin in json.loads(request.body)["itemIds"]:
                self.pairs[(marketplace, asin)] += 1
        return await self.inner.send(request)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one run of a job did, as ``broker run`` would report it."""

    code: int
    summary: JobSummary | None
    message: str | None
    stats: SimulatorStats
    counter: _PairCounter
    out: Path

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The output rows, in line order."""
        return sorted(_jsonl(self.out), key=lambda row: int(row["line"]))

    @property
    def report(self) -> list[dict[str, Any]]:
        """The ``.invalid.jsonl`` report rows ([] when there is no report)."""
        path = self.out.with_name(self.out.name + ".invalid.jsonl")
        return _jsonl(path) if path.exists() else []

    @property
    def served(self) -> int:
        """Items the simulator served (each requested ASIN it found)."""
        return sum(account.items_served for account in self.stats.accounts.values())


def _config(url: str) -> BrokerConfig:
    document = {
        "api": {"protocol": "creators", "endpoint": url, "resources": _RESOURCES},
        "keys": [key_doc(tps=1000.0, tpd=10_000_000, tags={US: "demo-20", UK: "demo-21"})],
        "engine": {"linger_s": 0.005},
        "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05},
    }
    return parse_config(document, environ={"ASINB_DEMO_SECRET": "demo-secret"})


async def _run(tmp_path: Path, job: Path, **options: Any) -> _Outcome:
    """Run ``job`` to the end against a fresh simulator; map a failure to its exit code."""
    out = tmp_path / "out.jsonl"
    async with SimulatorServer(_SETTINGS) as sim, AiohttpTransport() as inner:
        counter = _PairCounter(inner)
        config = _config(sim.url)
        job_options = JobOptions(job=job, out=out, progress="none", handle_signals=False, **options)
        async with Broker(config, transport=counter) as broker:
            try:
                summary = await run_job(config, job_options, broker=broker)
            except Exception as exc:  # mapped exactly as `broker run` maps it
                code, message = describe_failure(exc)
                return _Outcome(code, None, message, sim.stats, counter, out)
    return _Outcome(summary.exit_code(), summary, None, sim.stats, counter, out)


_CLI_CONFIG = embedded_toml()


def _cli(tmp_path: Path, job: Path, *args: str) -> int:
    """``broker run JOB --out tmp/out.jsonl ARGS`` with the embedded simulator."""
    config = tmp_path / "config.toml"
    config.write_text(_CLI_CONFIG)
    out = tmp_path / "out.jsonl"
    argv = ["run", str(job), "--config", str(config), "--out", str(out), "--progress", "none"]
    return cli.main([*argv, *args])


@pytest.fixture(autouse=True)
def _no_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's embedded simulator supplies the demo key's secret when the env has none."""
    monkeypatch.delenv("ASINB_DEMO_SECRET", raising=False)


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _log_events(err: str) -> list[dict[str, Any]]:
    """The JSON log events among the lines of the CLI's stderr."""
    events = []
    for line in err.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def _ledger_rows(job: Path, out: Path) -> tuple[bool, int]:
    """(ingest complete, rows ingested) of the job's ledger."""
    path = out.with_name(out.name + ".ledger")
    with Ledger.open(path, fingerprint=fingerprint(job), default_marketplace=US) as ledger:
        return ledger.ingest_complete, ledger.total_rows


class TestC1EmptyFile:
    @pytest.mark.parametrize(
        ("name", "data"),
        [
            ("job.txt", b""),
            ("job.txt", b"# only comments\n\n   \n"),
            ("job.csv", b"asin,sku\r\n"),
            ("job.jsonl", b"\n\n"),
            ("job.txt.gz", b""),
        ],
    )
    def test_c1_cli_exits_0_with_zero_rows_and_a_warning(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes
    ) -> None:
        """C1: an empty job exits 0, reports 0 rows, warns that the file has no rows and
        writes an empty output."""
        job = _write(tmp_path, name, data)
        assert _cli(tmp_path, job) == ExitCode.OK
        err = capsys.readouterr().err
        assert "rows: 0 (none done); pending 0" in err
        warnings = [e for e in _log_events(err) if e["event"] == "broker.job_empty"]
        assert len(warnings) == 1
        assert warnings[0]["level"] == "warning"
        assert (tmp_path / "out.jsonl").read_bytes() == b""
        assert not (tmp_path / "out.jsonl.invalid.jsonl").exists()

    async def test_c1_empty_job_sends_no_request(self, tmp_path: Path) -> None:
        """C1: an empty job makes no API request at all and its summary counts 0 rows."""
        job = _write(tmp_path, "job.txt", b"")
        with structlog.testing.capture_logs() as logs:
            outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        assert outcome.summary is not None
        assert (outcome.summary.total, outcome.summary.requests) == (0, 0)
        assert outcome.stats.requests == 0
        assert outcome.counter.get_items == 0
        assert [e["log_level"] for e in logs if e["event"] == "broker.job_empty"] == ["warning"]


class TestC2MixedIds:
    async def test_c2_bad_ids_reported_with_line_numbers_valid_ones_processed(
        self, tmp_path: Path
    ) -> None:
        """C2: 9/11-char ids, symbols, full-width digits and inner spaces go to the invalid
        report with their line numbers; lowercase and padded ids are normalised and looked
        up; every input row has one output row."""
        lines = [
            "B0MIXMIX01",  # 1 valid
            "B0MIXMIX0",  # 2 nine characters
            "B0MIXMIX011",  # 3 eleven characters
            "B0MIX$MIX1",  # 4 a symbol
            "B0MIXMIX0\uff11",  # 5 a full-width digit
            "\uff22\uff10MIXMIX02",  # 6 full-width letters
            "B0MIX MIX1",  # 7 a space inside
            "b0mixmix02",  # 8 lowercase: valid
            "   B0MIXMIX03\t",  # 9 padded: valid
            "",  # 10 blank: no row
            "b0mixmix01",  # 11 lowercase duplicate of line 1
        ]
        job = _write(tmp_path, "job.txt", "\n".join(lines) + "\n")
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        report = outcome.report
        assert [r["line"] for r in report] == [2, 3, 4, 5, 6, 7]
        assert [r["input"] for r in report] == [lines[i - 1] for i in (2, 3, 4, 5, 6, 7)]
        reasons = [r["reason"] for r in report]
        assert "this has 9" in reasons[0]
        assert "this has 11" in reasons[1]
        assert "'$'" in reasons[2]
        assert "U+FF11" in reasons[3]
        assert "U+FF22" in reasons[4]
        assert "whitespace" in reasons[5]
        rows = outcome.rows
        assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
        by_line = {r["line"]: r for r in rows}
        assert {line: by_line[line]["status"] for line in (2, 3, 4, 5, 6, 7)} == dict.fromkeys(
            (2, 3, 4, 5, 6, 7), "invalid"
        )
        assert [by_line[line]["asin"] for line in (1, 8, 9, 11)] == [
            "B0MIXMIX01",
            "B0MIXMIX02",
            "B0MIXMIX03",
            "B0MIXMIX01",
        ]
        assert all(by_line[line]["status"] == "ok" for line in (1, 8, 9, 11))
        # Only the normalised valid ids reached the API, each once.
        assert outcome.counter.pairs == {
            (US, "B0MIXMIX01"): 1,
            (US, "B0MIXMIX02"): 1,
            (US, "B0MIXMIX03"): 1,
        }
        assert outcome.served == 3


class TestC3Isbn:
    _IDS = (
        "080442957X",  # 1 ISBN-10 ending in X: valid
        "080442957x",  # 2 the same, lower-case x
        "0306406153",  # 3 all digits, wrong check digit: invalid
        "9780306406157",  # 4 978 ISBN-13 of 0306406152
        "978-0-306-40615-7",  # 5 the same, hyphenated
        "0306406152",  # 6 the ISBN-10 itself
        "9790000000001",  # 7 979 ISBN-13: no ISBN-10 form
    )

    async def test_c3_default_isbn10_x_valid_bad_checksum_and_isbn13_invalid(
        self, tmp_path: Path
    ) -> None:
        """C3: by default an ISBN-10 ending in X is looked up, an all-digit id with a bad
        check digit and any ISBN-13 are invalid with a reason naming the remedy."""
        job = _write(tmp_path, "job.txt", "\n".join(self._IDS) + "\n")
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        by_line = {r["line"]: r for r in outcome.rows}
        assert [by_line[n]["asin"] for n in (1, 2, 6)] == ["080442957X", "080442957X", "0306406152"]
        assert all(by_line[n]["status"] == "ok" for n in (1, 2, 6))
        reasons = {r["line"]: r["reason"] for r in outcome.report}
        assert sorted(reasons) == [3, 4, 5, 7]
        assert reasons[3] == "all-digit id with a wrong ISBN-10 check digit"
        assert "--convert-isbn13" in reasons[4]
        assert "--convert-isbn13" in reasons[5]
        assert "979" in reasons[7]
        assert set(outcome.counter.pairs) == {(US, "080442957X"), (US, "0306406152")}

    async def test_c3_convert_isbn13_looks_up_the_isbn10_once(self, tmp_path: Path) -> None:
        """C3: with ISBN-13 conversion on, a 978 ISBN-13 (plain or hyphenated) is looked up
        as its ISBN-10, sharing one lookup with that ISBN-10; a 979 one stays invalid."""
        job = _write(tmp_path, "job.txt", "\n".join(self._IDS) + "\n")
        outcome = await _run(tmp_path, job, convert_isbn13=True)
        assert outcome.code == ExitCode.OK
        by_line = {r["line"]: r for r in outcome.rows}
        assert [(by_line[n]["input"], by_line[n]["asin"]) for n in (4, 5, 6)] == [
            ("9780306406157", "0306406152"),
            ("978-0-306-40615-7", "0306406152"),
            ("0306406152", "0306406152"),
        ]
        assert by_line[4]["item"] == by_line[6]["item"]
        assert all(by_line[n]["status"] == "ok" for n in (4, 5, 6))
        assert [r["line"] for r in outcome.report] == [3, 7]
        assert outcome.counter.pairs == {(US, "080442957X"): 1, (US, "0306406152"): 1}

    def test_c3_cli_flag_enables_conversion(self, tmp_path: Path) -> None:
        """C3: `broker run --convert-isbn13` converts a 978 ISBN-13 in the job."""
        job = _write(tmp_path, "job.txt", "9780306406157\n")
        assert _cli(tmp_path, job, "--convert-isbn13") == ExitCode.OK
        (row,) = _jsonl(tmp_path / "out.jsonl")
        assert (row["input"], row["asin"], row["status"]) == ("9780306406157", "0306406152", "ok")


class TestC4NoAsinColumn:
    def test_c4_cli_exits_65_listing_the_headers(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """C4: a CSV without an asin column exits 65 naming the headers it found, and
        writes no output."""
        job = _write(tmp_path, "job.csv", "sku,title,product id\r\nS1,x,B0NOCOL001\r\n")
        assert _cli(tmp_path, job) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert "no 'asin' column (found: 'sku', 'title', 'product id')" in err
        assert "Traceback" not in err
        assert not (tmp_path / "out.jsonl").exists()

    def test_c4_fixed_file_then_runs(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """C4: the refused file leaves no ledger, so the same command runs once it is fixed
        (it was refused as "changed since the job started")."""
        job = _write(tmp_path, "job.csv", "sku,title\r\nB0NOCOL001,x\r\n")
        assert _cli(tmp_path, job) == ExitCode.DATA_ERROR
        assert not (tmp_path / "out.jsonl.ledger").exists()  # its lock file stays (lock.py)
        job.write_text("asin,title\r\nB0NOCOL001,x\r\n")
        capsys.readouterr()
        assert _cli(tmp_path, job) == ExitCode.OK, capsys.readouterr().err

    async def test_c4_no_request_is_sent(self, tmp_path: Path) -> None:
        """C4: the missing column is found before any API request."""
        job = _write(tmp_path, "job.csv", "id;name\nB0NOCOL001;x\n")
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.DATA_ERROR
        assert "found, ';'-separated: 'id', 'name'" in (outcome.message or "")
        assert (outcome.stats.requests, outcome.counter.get_items) == (0, 0)


class TestC5CsvDialect:
    async def test_c5_bom_crlf_and_quoted_fields_parse_correctly(self, tmp_path: Path) -> None:
        """C5: a CSV with a BOM, CRLF endings and quoted fields (commas, doubled quotes, a
        line break) gives the right ids, line numbers, marketplaces and extra columns."""
        data = (
            "\ufeffsku,ASIN,Marketplace,title\r\n"
            f'"A,1",B0QUOTED01,{UK},"say ""hi"""\r\n'
            '"B2","b0quoted02",,"two\r\nlines"\r\n'
            "C3,B0QUOTED03, www.amazon.com ,plain"  # no final line ending
        )
        job = _write(tmp_path, "job.csv", data)
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        assert outcome.report == []
        rows = outcome.rows
        assert [(r["line"], r["asin"], r["marketplace"], r["status"]) for r in rows] == [
            (2, "B0QUOTED01", UK, "ok"),
            (3, "B0QUOTED02", US, "ok"),
            (5, "B0QUOTED03", US, "ok"),
        ]
        assert [r["extra"] for r in rows] == [
            {"sku": "A,1", "title": 'say "hi"'},
            {"sku": "B2", "title": "two\r\nlines"},
            {"sku": "C3", "title": "plain"},
        ]
        assert outcome.counter.pairs == {
            (UK, "B0QUOTED01"): 1,
            (US, "B0QUOTED02"): 1,
            (US, "B0QUOTED03"): 1,
        }


class TestC6MalformedJsonl:
    _DATA = (
        '{"asin": "B0JSONOK01", "sku": 1}\n'
        '{"asin": "B0JSONOK0\n'  # 2 cut short
        "\n"
        '{"asin": "B0JSONOK02"}\n'
    )

    async def test_c6_malformed_line_reported_and_rest_processed(self, tmp_path: Path) -> None:
        """C6: a malformed JSON line is reported invalid with its number; the other lines
        are looked up."""
        job = _write(tmp_path, "job.jsonl", self._DATA)
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        (bad,) = outcome.report
        assert bad["line"] == 2
        assert bad["input"] == '{"asin": "B0JSONOK0'
        assert bad["reason"].startswith("not valid JSON")
        rows = outcome.rows
        assert [(r["line"], r["status"]) for r in rows] == [(1, "ok"), (2, "invalid"), (4, "ok")]
        assert rows[0]["extra"] == {"sku": 1}  # the JSON value it was, not its text
        assert set(outcome.counter.pairs) == {(US, "B0JSONOK01"), (US, "B0JSONOK02")}

    async def test_c6_a_row_that_cannot_be_read_has_its_own_code(self, tmp_path: Path) -> None:
        """C6: a line that is not a query (bad JSON, a field of the wrong type, one given
        twice) is invalid with code InvalidRow and a remedy about the row; a malformed id
        keeps InvalidAsin and its remedy about the id."""
        data = (
            "not json\n"
            '{"asin": 12}\n'
            '{"asin": "B0CODE0001", "asin": "B0CODE0002"}\n'
            '{"asin": "B0BAD"}\n'
        )
        outcome = await _run(tmp_path, _write(tmp_path, "job.jsonl", data))
        errors = {row["line"]: row["error"] for row in outcome.rows}
        assert [errors[n]["code"] for n in (1, 2, 3, 4)] == [
            "InvalidRow",
            "InvalidRow",
            "InvalidRow",
            "InvalidAsin",
        ]
        assert errors[1]["remedy"] == describe("InvalidRow").remedy
        assert errors[4]["remedy"] == describe("InvalidAsin").remedy

    async def test_c6_a_field_given_twice_is_an_invalid_row(self, tmp_path: Path) -> None:
        """C6: a line giving "asin" (or "marketplace", "resources") twice is invalid, saying
        so, not looked up for whichever value the JSON reader kept (also when one spells it
        with an escape, "\\u0061sin"); the same name as a value or nested deeper is fine."""
        data = (
            '{"asin": "B0TWICE001", "asin": "B0TWICE002"}\n'
            '{"asin": "B0TWICE003", "marketplace": "www.amazon.de", '
            '"marketplace": "www.amazon.co.uk"}\n'
            '{"asin": "B0TWICE004", "note": "asin", "meta": {"asin": 1, "marketplace": 2}}\n'
            '{"asin": "B0TWICE005", "\\u0061sin": "B0TWICE006"}\n'
        )
        outcome = await _run(tmp_path, _write(tmp_path, "job.jsonl", data))
        assert [(r["line"], r["status"]) for r in outcome.rows] == [
            (1, "invalid"),
            (2, "invalid"),
            (3, "ok"),
            (4, "invalid"),
        ]
        reasons = [row["reason"] for row in outcome.report]
        twice = '"{}" is given twice'.format
        assert reasons == [twice("asin"), twice("marketplace"), twice("asin")]
        assert set(outcome.counter.pairs) == {(US, "B0TWICE004")}

    @pytest.mark.parametrize("bad_line", [1, 15])
    def test_c6_csv_output_keeps_every_pass_through_column(
        self, tmp_path: Path, bad_line: int
    ) -> None:
        """C6: a malformed line (first or anywhere) does not cost the CSV output the
        columns of the other rows: the header names every row's pass-through names."""
        lines = [json.dumps({"asin": f"B0JSONC{i:03d}", "sku": f"S{i}"}) for i in range(1, 31)]
        lines[bad_line - 1] = '{"asin": "B0BAD", "sku": "S14"'
        lines[20] = json.dumps({"asin": "B0JSONC021", "sku": "S21", "note": "late"})
        job = _write(tmp_path, "job.jsonl", "\n".join(lines) + "\n")
        out = tmp_path / "out.csv"
        assert _cli(tmp_path, job, "--out", str(out), "--no-cache") == ExitCode.OK
        with out.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        assert len(rows) == 30
        by_line = {int(row["line"]): row for row in rows}
        assert by_line[bad_line]["status"] == "invalid"
        assert by_line[bad_line]["sku"] == ""
        assert all(by_line[n]["sku"] == f"S{n}" for n in by_line if n != bad_line)
        assert by_line[21]["note"] == "late"
        assert by_line[2]["note"] == ""

    def test_csv_job_keeps_its_column_order_in_csv_output(self, tmp_path: Path) -> None:
        """A CSV job's other columns come out in the job's order (zeta, alpha, mid), not
        sorted by name."""
        rows = "".join(f"B0ORDER{i:03d},z{i},a{i},m{i}\r\n" for i in range(3))
        job = _write(tmp_path, "cols.csv", "asin,zeta,alpha,mid\r\n" + rows)
        out = tmp_path / "out.csv"
        assert _cli(tmp_path, job, "--out", str(out), "--no-cache") == ExitCode.OK
        with out.open(newline="", encoding="utf-8") as stream:
            header = next(csv.reader(stream))
        assert header[-3:] == ["zeta", "alpha", "mid"]

    async def test_c6_strict_refuses_before_any_api_call(self, tmp_path: Path) -> None:
        """C6: with strict the job stops with 65 naming the bad line, before any request,
        and writes no output."""
        job = _write(tmp_path, "job.jsonl", self._DATA)
        outcome = await _run(tmp_path, job, strict=True)
        assert outcome.code == ExitCode.DATA_ERROR
        assert "1 invalid rows; line 2: not valid JSON" in (outcome.message or "")
        assert (outcome.stats.requests, outcome.counter.get_items) == (0, 0)
        assert not outcome.out.exists()

    async def test_c6_strict_counts_every_bad_row_once(self, tmp_path: Path) -> None:
        """C6: many bad rows: the total, then the first five (not "N (and N-5 more)")."""
        job = _write(tmp_path, "job.txt", "".join(f"bad{i}\n" for i in range(12)))
        outcome = await _run(tmp_path, job, strict=True)
        assert outcome.code == ExitCode.DATA_ERROR
        message = outcome.message or ""
        assert "12 invalid rows; the first 5: line 1: " in message
        assert "more" not in message
        assert message.count("line ") == 5

    async def test_c6_strict_refuses_an_unknown_resource(self, tmp_path: Path) -> None:
        """C6: a row asking a resource the API does not know is invalid to --strict too."""
        job = _write(
            tmp_path,
            "job.jsonl",
            '{"asin": "B0ROGUBBB8"}\n{"asin": "B0ROGUBBB9", "resources": ["itemInfo.bogus"]}\n',
        )
        outcome = await _run(tmp_path, job, strict=True)
        assert outcome.code == ExitCode.DATA_ERROR
        assert "line 2" in (outcome.message or "")
        assert "itemInfo.bogus" in (outcome.message or "")
        assert (outcome.stats.requests, outcome.counter.get_items) == (0, 0)

    def test_c6_cli_strict_exits_65(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """C6: `broker run --strict` on the file exits 65 and says which line is bad."""
        job = _write(tmp_path, "job.jsonl", self._DATA)
        assert _cli(tmp_path, job, "--strict") == ExitCode.DATA_ERROR
        assert "line 2: not valid JSON" in capsys.readouterr().err
        assert not (tmp_path / "out.jsonl").exists()


def _duplicated_job(tmp_path: Path, unique: int) -> tuple[Path, list[tuple[str, str]]]:
    """A CSV job of ``2 * unique`` rows: each (marketplace, asin) twice, shuffled.

    A quarter of the pairs are UK twins of US ASINs, so the same ASIN in two marketplaces
    must be two lookups.
    """
    us = unique * 3 // 4
    pairs = [(US, f"B0{i:08d}") for i in range(us)]
    pairs += [(UK, f"B0{i:08d}") for i in range(unique - us)]
    rows = pairs * 2
    random.Random(7).shuffle(rows)
    path = tmp_path / "job.csv"
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("asin,marketplace\n")
        for i, (marketplace, asin) in enumerate(rows):
            # Every other row lower-case, so duplicates are found after normalising.
            out.write(f"{asin.lower() if i % 2 else asin},{marketplace}\n")
    return path, rows


class TestC7Duplicates:
    async def _check(self, tmp_path: Path, unique: int) -> None:
        job, rows = _duplicated_job(tmp_path, unique)
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        expected = collections.Counter(rows)
        assert len(expected) == unique
        assert set(expected.values()) == {2}
        # One API lookup per unique (marketplace, asin), on both sides of the wire.
        assert outcome.counter.pairs == dict.fromkeys(expected, 1)
        assert outcome.served == unique
        assert outcome.summary is not None
        assert outcome.summary.by_status == {"ok": 2 * unique}
        # Every input row has its own output row, duplicates sharing one item. Streamed,
        # keeping a digest per pair, so the million-row variant fits in memory.
        items: dict[tuple[str, str], str] = {}
        seen = bytearray(len(rows))
        with outcome.out.open(encoding="utf-8") as output:
            for text in output:
                row = json.loads(text)
                index = row["line"] - 2  # line 1 is the CSV header
                seen[index] += 1
                pair = (row["marketplace"], row["asin"])
                assert pair == rows[index]
                item = json.dumps(row["item"], sort_keys=True)
                assert items.setdefault(pair, item) == item
        assert seen == bytearray([1]) * len(rows)
        assert len(items) == unique

    async def test_c7_duplicates_one_lookup_per_unique_pair(self, tmp_path: Path) -> None:
        """C7 (quick, 30k rows): 50 % duplicates cost one lookup per unique (marketplace,
        asin), counted at the client and the simulator; every row gets an output row."""
        await self._check(tmp_path, 15_000)

    @pytest.mark.slow
    @pytest.mark.timeout(1800)
    async def test_c7_million_rows_half_duplicates(self, tmp_path: Path) -> None:
        """C7 (full size): 1M rows, 50 % duplicates, one lookup per unique pair."""
        await self._check(tmp_path, 500_000)


def _numbered_job(path: Path, lines: int) -> Path:
    """A txt job of ``lines`` distinct valid ids, written in blocks."""
    with path.open("w", encoding="ascii") as out:
        for start in range(0, lines, 10_000):
            out.write("".join(f"B{i:09d}\n" for i in range(start, min(start + 10_000, lines))))
    return path


def _reader_peak(path: Path) -> tuple[int, int]:
    """(rows, tracemalloc peak in bytes) of reading ``path`` to the end."""
    tracemalloc.start()
    try:
        count = sum(1 for row in read_job(path) if row.valid)
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _ingest_peak(tmp_path: Path, job: Path) -> tuple[int, int, float]:
    """(rows, tracemalloc peak, rows per second) of ingesting ``job`` into a new ledger."""
    ledger_path = tmp_path / f"{job.name}.ledger"
    with Ledger.open(
        ledger_path, fingerprint=fingerprint(job), default_marketplace=US, synchronous="NORMAL"
    ) as ledger:
        started = time.perf_counter()
        tracemalloc.start()
        try:
            count = ledger.ingest(read_job(job))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return count, peak, count / (time.perf_counter() - started)


class TestC8ConstantMemory:
    @pytest.mark.parametrize("suffix", ["txt", "txt.gz"])
    def test_c8_reader_memory_does_not_grow_with_the_file(
        self, tmp_path: Path, suffix: str
    ) -> None:
        """C8 (quick): reading 100k or 300k lines peaks at the same few hundred KiB under
        tracemalloc (both compressed files are past the gzip module's read buffers, which
        Python 3.13 made larger)."""
        sizes = (100_000, 300_000)
        peaks = []
        for size in sizes:
            plain = _numbered_job(tmp_path / f"{size}.txt", size)
            path = plain
            if suffix.endswith(".gz"):
                path = tmp_path / f"{size}.{suffix}"
                path.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
            count, peak = _reader_peak(path)
            assert count == size
            peaks.append(peak)
        assert peaks[1] < 512 * 1024, peaks
        assert peaks[1] - peaks[0] < 32 * 1024, peaks

    def test_c8_ingestion_memory_is_flat(self, tmp_path: Path) -> None:
        """C8 (quick): ingesting 12k or 60k rows into the ledger peaks at the same bound
        (one chunk of rows), not at a size that grows with the file."""
        small = _ingest_peak(tmp_path, _numbered_job(tmp_path / "small.txt", 12_000))
        big = _ingest_peak(tmp_path, _numbered_job(tmp_path / "big.txt", 60_000))
        assert (small[0], big[0]) == (12_000, 60_000)
        assert big[1] < 4_000_000, big
        assert big[1] < small[1] * 1.2, (small, big)

    async def test_c8_ingestion_rate_is_reported(self, tmp_path: Path) -> None:
        """C8: a run logs how many rows it ingested and at what rate."""
        job = tmp_path / "job.txt"
        job.write_text("B0RATERATE\n" * 20_000)
        with structlog.testing.capture_logs() as logs:
            outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        (event,) = [e for e in logs if e["event"] == "broker.job_ingested"]
        assert event["rows"] == 20_000
        assert event["rows_per_s"] > 0
        assert event["seconds"] >= 0
        assert outcome.counter.pairs == {(US, "B0RATERATE"): 1}

    @pytest.mark.slow
    @pytest.mark.timeout(1800)
    def test_c8_five_million_lines(self, tmp_path: Path) -> None:
        """C8 (full size): a 5M-line file is read and ingested in the same memory as a
        small one, and the ingestion rate is measured."""
        job = _numbered_job(tmp_path / "big.txt", 5_000_000)
        count, peak = _reader_peak(job)
        assert count == 5_000_000
        assert peak < 256 * 1024
        small = _ingest_peak(tmp_path, _numbered_job(tmp_path / "small.txt", 12_000))
        rows, ingest_peak, rate = _ingest_peak(tmp_path, job)
        assert rows == 5_000_000
        assert ingest_peak < small[1] * 1.2, (small, ingest_peak)
        assert rate > 0
        print(f"C8: ingested {rows} rows at {rate:,.0f} rows/s, peak {ingest_peak} bytes")


class TestC9LongLinesAndJunk:
    async def test_c9_ten_megabyte_line_and_nul_bytes_are_invalid_rows(
        self, tmp_path: Path
    ) -> None:
        """C9: a 10 MB line is one invalid row (line cap) and a NUL byte makes its row
        invalid; neither is copied whole into the outputs and the other rows are processed."""
        data = b"B0LONGOK01\n" + b"A" * 10_000_000 + b"\nB0ABC\x00DEFG\n\x00\x00\x00\nB0LONGOK02\n"
        job = _write(tmp_path, "job.txt", data)
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        report = outcome.report
        assert [r["line"] for r in report] == [2, 3, 4]
        assert report[0]["reason"] == f"line longer than {DEFAULT_MAX_LINE_BYTES} bytes"
        assert report[0]["input"].startswith("AAAA")
        assert len(report[0]["input"]) < 200
        assert "U+0000" in report[1]["reason"]
        assert "U+0000" in report[2]["reason"]
        assert [(r["line"], r["status"]) for r in outcome.rows] == [
            (1, "ok"),
            (2, "invalid"),
            (3, "invalid"),
            (4, "invalid"),
            (5, "ok"),
        ]
        assert outcome.out.stat().st_size < 100_000
        assert set(outcome.counter.pairs) == {(US, "B0LONGOK01"), (US, "B0LONGOK02")}

    @pytest.mark.parametrize("name", ["job.txt", "job.csv", "job.jsonl", "job.bin"])
    def test_c9_binary_junk_exits_65_cleanly(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
    ) -> None:
        """C9: a binary file exits 65 with a one-line reason naming where it is not
        text, never a traceback."""
        junk = bytes(random.Random(9).getrandbits(8) for _ in range(4096))
        job = _write(tmp_path, name, b"\x89PNG\r\n\x1a\n" + junk)
        assert _cli(tmp_path, job) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (message,) = [line for line in err.splitlines() if line.startswith("broker: ")]
        assert "line 1: byte 0x89 at byte offset 0 of the file is not valid utf-8" in message

    async def test_c9_control_bytes_in_jsonl_are_invalid_rows(self, tmp_path: Path) -> None:
        """C9: NUL and other control bytes in JSON Lines make invalid rows, not a crash."""
        data = (
            b'{"asin":\x00}\n\x00\x01\x02\x03\n{"asin":"B0CTRLOK01"}\n{"asin":"B0\\u0000CTRL01"}\n'
        )
        job = _write(tmp_path, "job.jsonl", data)
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.OK
        assert [r["line"] for r in outcome.report] == [1, 2, 4]
        assert "U+0000" in outcome.report[2]["reason"]
        assert [(r["line"], r["status"]) for r in outcome.rows][2] == (3, "ok")
        assert set(outcome.counter.pairs) == {(US, "B0CTRLOK01")}


class TestC10Latin1:
    _DATA = "asin,title\nB0LATIN001,plain\nB0LATIN002,Cr\u00e8me br\u00fbl\u00e9e\n"

    def test_c10_cli_names_the_byte_offset_then_encoding_option_works(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """C10: a Latin-1 file exits 65 naming the line, byte offset and --encoding remedy
        (cp1252, which reads Latin-1's letters alike); run again with --encoding latin-1 it
        completes, the accented text intact."""
        data = self._DATA.encode("latin-1")
        job = _write(tmp_path, "job.csv", data)
        assert _cli(tmp_path, job) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        offset = data.index(b"\xe8")
        assert f"line 3: byte 0xe8 at byte offset {offset} of the file" in err
        assert "--encoding cp1252" in err
        assert not (tmp_path / "out.jsonl").exists()
        assert _cli(tmp_path, job, "--encoding", "latin-1") == ExitCode.OK
        rows = sorted(_jsonl(tmp_path / "out.jsonl"), key=lambda r: int(r["line"]))
        assert [(r["line"], r["asin"], r["status"]) for r in rows] == [
            (2, "B0LATIN001", "ok"),
            (3, "B0LATIN002", "ok"),
        ]
        assert rows[1]["extra"] == {"title": "Cr\u00e8me br\u00fbl\u00e9e"}

    async def test_c10_undecodable_file_sends_no_request(self, tmp_path: Path) -> None:
        """C10: the decoding error stops the job during ingestion, before any request."""
        job = _write(tmp_path, "job.csv", self._DATA.encode("latin-1"))
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.DATA_ERROR
        assert "byte 0xe8" in (outcome.message or "")
        assert (outcome.stats.requests, outcome.counter.get_items) == (0, 0)


def _truncated_gz(tmp_path: Path, lines: int) -> tuple[Path, list[JobRow]]:
    """A .gz job cut in half, and the rows the reader yields before it fails."""
    body = "".join(f"B{i:09d}\n" for i in range(lines)).encode()
    whole = gzip.compress(body)
    path = tmp_path / "job.txt.gz"
    path.write_bytes(whole[: len(whole) // 2])
    seen: list[JobRow] = []
    with pytest.raises(JobFileError):
        seen.extend(read_job(path))  # extend keeps the rows it got before the error
    assert 0 < len(seen) < lines
    return path, seen


class TestC11TruncatedGz:
    def test_c11_cli_exits_65_and_keeps_the_rows_read(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """C11: a truncated .gz exits 65 with a clear message; the rows before the damage
        are kept in the ledger (none twice when run again) and nothing is looked up."""
        job, seen = _truncated_gz(tmp_path, 20_000)
        assert _cli(tmp_path, job) == ExitCode.DATA_ERROR
        err = capsys.readouterr().err
        assert f"the gzip data ends early after line {len(seen)}" in err
        assert f"gzip -dc {job} > part.txt" in err  # how to run the part that reads
        assert "Traceback" not in err
        out = tmp_path / "out.jsonl"
        assert _ledger_rows(job, out) == (False, len(seen))
        assert not out.exists()
        assert _cli(tmp_path, job) == ExitCode.DATA_ERROR
        assert _ledger_rows(job, out) == (False, len(seen))

    async def test_c11_no_request_for_a_partial_file(self, tmp_path: Path) -> None:
        """C11: no row of a truncated file is looked up, so a partial job never runs."""
        job, _ = _truncated_gz(tmp_path, 3_000)
        outcome = await _run(tmp_path, job)
        assert outcome.code == ExitCode.DATA_ERROR
        assert "gzip data ends early" in (outcome.message or "")
        assert (outcome.stats.requests, outcome.counter.get_items) == (0, 0)


def test_out_of_memory_is_told_as_the_process_s_limit() -> None:
    """A MemoryError (a tight ulimit -v, which several threads' malloc arenas reach with
    little memory used) is told as the memory limit, with what to change: it read
    "internal error: MemoryError: " with nothing after it."""
    code, message = describe_failure(MemoryError())
    assert code == ExitCode.INTERNAL
    assert message.startswith("out of memory")
    assert "MALLOC_ARENA_MAX" in message
    assert "run again" in message
    _, spooled = describe_failure(MemoryError(), spooled=True)
    assert "move it back into inbox/" in spooled


def test_an_internal_error_s_message_masks_credentials() -> None:
    """An unexpected exception's message, which run and serve print on stderr as it is,
    masks a credential it quotes, as the log line of it does."""
    token = "Atc|" + "y" * 40
    code, message = describe_failure(RuntimeError(f"refused Bearer {token} by proxy"))
    assert code == ExitCode.INTERNAL
    assert message == "internal error: RuntimeError: refused Bearer *** by proxy"


def test_a_finished_command_whose_loop_cannot_start_its_closing_thread_keeps_its_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing the event loop starts a thread to shut its executor down: a process at its
    thread (or memory) limit cannot, and a job that had finished ended with a traceback and
    exit 1 instead of its own code."""
    import threading

    from broker import cli

    async def command() -> int:
        await asyncio.get_running_loop().run_in_executor(None, lambda: None)

        def cannot(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", cannot)
        return 3

    assert cli._run_loop(command()) == 3
