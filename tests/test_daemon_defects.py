"""Job-file and output defects of daily use (N3; N4 for ``broker run``); CSV outputs end to end."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from broker import cli
from broker.api.base import HttpRequest, RawResponse
from broker.client import Broker
from broker.config import BrokerConfig, parse_config
from broker.engine.transport import MockTransport
from broker.jobs.runner import ExitCode, JobOptions, run_job

# An item title holding a lone UTF-16 surrogate escape (an emoji cut in half): valid JSON,
# but not text UTF-8 (or SQLite) can hold.
_SURROGATE_BODY = (
    b'{"ItemsResult": {"Items": [{"ASIN": "B000000001", "ItemInfo": {"Title": '
    b'{"DisplayValue": "Kettle \\ud83d"}}}, {"ASIN": "B000000002", "ItemInfo": '
    b'{"Title": {"DisplayValue": "fine"}}}]}}'
)


def _paapi_config() -> BrokerConfig:
    key = {
        "name": "paapi",
        "credential_id": "DEMOACCESSKEY",
        "credential_secret_env": "ASINB_TEST_PAAPI_SECRET",
        "partner_tags": {"www.amazon.com": "demo-20"},
        "tps": 100.0,
    }
    document = {
        "api": {"protocol": "paapi5", "endpoint": "http://127.0.0.1:9"},
        "keys": [key],
        "engine": {"linger_s": 0.005},
        "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05},
    }
    return parse_config(document, environ={"ASINB_TEST_PAAPI_SECRET": "demo-secret-key"})


async def _surrogate_reply(request: HttpRequest) -> RawResponse:
    return RawResponse(200, {}, _SURROGATE_BODY, 0.01)


class TestN3Surrogates:
    @pytest.mark.parametrize("fmt", ["jsonl", "csv", "sqlite"])
    async def test_lone_surrogate_title_is_written_and_the_job_finishes(
        self, tmp_path: Path, fmt: str
    ) -> None:
        """N3: a title with a lone surrogate is stored as U+FFFD; both rows ok, run and rerun."""
        config = _paapi_config()
        job = tmp_path / "job.txt"
        job.write_text("B000000001\nB000000002\n")
        out = tmp_path / f"out.{fmt}"
        for _ in range(2):
            async with Broker(config, transport=MockTransport(_surrogate_reply)) as broker:
                options = JobOptions(
                    job=job, out=out, format=fmt, progress="none", handle_signals=False
                )
                summary = await run_job(config, options, broker=broker)
            assert summary.by_status == {"ok": 2}
            assert summary.exit_code() == ExitCode.OK
        data = out.read_bytes()
        if fmt == "jsonl":
            titles = {
                row["asin"]: row["summary"]["title"]
                for row in map(json.loads, data.decode("utf-8").splitlines())
            }
            assert titles == {"B000000001": "Kettle \ufffd", "B000000002": "fine"}
        elif fmt == "csv":
            records = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
            assert {r["asin"]: r["title"] for r in records}["B000000001"] == "Kettle \ufffd"
        else:
            assert "Kettle \ufffd".encode() in data


class TestN4BrokerRun:
    def test_latin1_job_name_runs(self, tmp_path: Path) -> None:
        """N4: ``broker run`` on a job file whose name is Latin-1 bytes finishes (exit 0)."""
        config = tmp_path / "config.toml"
        config.write_text(
            '[api]\nendpoint = "simulator"\n\n[[keys]]\nname = "demo"\n'
            'credential_id = "demo-id"\nversion = "3.1"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\ntps = 100.0\n'
            '\n[log]\nformat = "json"\n'
        )
        job = tmp_path / os.fsdecode(b"lat\xe9.txt")
        job.write_text("B0LATIN001\nB0LATIN002\n")
        out = tmp_path / "out" / "o.jsonl"
        code = cli.main(
            ["run", str(job), "--config", str(config), "--out", str(out), "--progress", "none"]
        )
        assert code == ExitCode.OK
        assert len(out.read_text().splitlines()) == 2


class TestCsvJobToCsv:
    def test_pass_through_columns_and_image_url_end_to_end(self, tmp_path: Path) -> None:
        """A CSV job run to CSV keeps its other columns (and a malformed row's line) and has
        an image_url for found items."""
        config = tmp_path / "config.toml"
        config.write_text(
            '[api]\nendpoint = "simulator"\n\n[[keys]]\nname = "demo"\n'
            'credential_id = "demo-id"\nversion = "3.1"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\ntps = 100.0\n'
            '\n[log]\nformat = "json"\n'
        )
        job = tmp_path / "prices.csv"
        lines = ["asin,sku,note"]
        lines += [f"B0CSVJOB{i:02d},S{i},n{i}" for i in range(8)]
        lines.insert(4, 'B0CSVBAD01,S9,"unclosed')
        job.write_text("\n".join(lines) + "\n")
        out = tmp_path / "out.csv"
        args = ["run", str(job), "--config", str(config), "--out", str(out), "--format", "csv"]
        code = cli.main([*args, "--progress", "none"])
        assert code == ExitCode.OK
        records = list(csv.DictReader(io.StringIO(out.read_text(), newline="")))
        assert len(records) == 9
        by_line = {int(r["line"]): r for r in records}
        assert by_line[5]["status"] == "invalid"
        assert "never closed" in by_line[5]["error_message"]
        assert by_line[2]["sku"] == "S0"
        assert by_line[10]["note"] == "n7"
        found = [r for r in records if r["status"] == "ok"]
        assert found
        assert all(r["image_url"].startswith("https://") for r in found)
