"""The item cache through ``broker run`` and ``broker lookup``: reuse, opting out, the ceiling."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import embedded_toml

from broker import cli

_CONFIG = embedded_toml(
    tps=200.0,
    api='resources = ["itemInfo.title", "images.primary.medium"]',
    engine="linger_s = 0.005",
    simulator="limits = false",
)


@pytest.fixture(autouse=True)
def _no_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASINB_DEMO_SECRET", raising=False)


def _run(tmp_path: Path, job: Path, out: Path, *flags: str) -> int:
    config = tmp_path / "config.toml"
    config.write_text(_CONFIG)
    return cli.main(
        ["run", str(job), "--out", str(out), "--config", str(config), "--progress", "none", *flags]
    )


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _job(tmp_path: Path, count: int) -> Path:
    """A job file of ``count`` distinct ASINs, B000000000 on."""
    job = tmp_path / "job.txt"
    job.write_text("".join(f"B0{i:08d}\n" for i in range(count)))
    return job


def _ran_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, dict[str, object]]:
    """Run a job of B000000001 (so the cache holds it); its config and its output row."""
    job = tmp_path / "job.txt"
    job.write_text("B000000001\n")
    assert _run(tmp_path, job, tmp_path / "a.jsonl") == 0
    (row,) = _rows(tmp_path / "a.jsonl")
    capsys.readouterr()
    return tmp_path / "config.toml", row


def _requests(err: str) -> int:
    match = re.search(r"requests (\d+)", err)
    assert match is not None, err
    return int(match.group(1))


def test_second_run_is_served_from_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new job over the same ASINs sends no GetItems; its rows say cached with the old time."""
    job = _job(tmp_path, 40)
    assert _run(tmp_path, job, tmp_path / "a.jsonl") == 0
    assert _requests(capsys.readouterr().err) == 4
    assert _run(tmp_path, job, tmp_path / "b.jsonl") == 0
    assert _requests(capsys.readouterr().err) == 0
    first = {r["asin"]: r for r in _rows(tmp_path / "a.jsonl")}
    second = _rows(tmp_path / "b.jsonl")
    assert len(second) == 40
    for row in second:
        assert row["cached"] is True
        assert row["status"] == "ok"
        assert row["fetched_at"] == first[row["asin"]]["fetched_at"]
        assert row["item"] == first[row["asin"]]["item"]
    assert all(r["cached"] is False for r in first.values())


def test_summary_counts_the_answers_from_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's summary says how many lookups the cache answered (none: not mentioned)."""
    job = _job(tmp_path, 30)
    assert _run(tmp_path, job, tmp_path / "a.jsonl") == 0
    assert "from the item cache" not in capsys.readouterr().err
    assert _run(tmp_path, job, tmp_path / "b.jsonl") == 0
    assert "requests 0, 429s 0, retries 0, from the item cache 30, " in capsys.readouterr().err


def test_lookup_on_a_terminal_says_the_answer_is_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The readable lookup output marks a cached answer and says when Amazon sent it."""
    config, ran = _ran_one(tmp_path, capsys)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert cli.main(["lookup", "B000000001", "--config", str(config)]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    fetched = str(ran["fetched_at"])[:16].replace("T", " ")
    assert head == f"B000000001  www.amazon.com  ok  (from the item cache, fetched {fetched} UTC)"


def test_half_cached_sends_half(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With half the ASINs cached, a job sends requests only for the other half."""
    half = tmp_path / "half.txt"
    half.write_text("".join(f"B0{i:08d}\n" for i in range(0, 100, 2)))
    assert _run(tmp_path, half, tmp_path / "a.jsonl") == 0
    assert _requests(capsys.readouterr().err) == 5
    full = tmp_path / "full.txt"
    full.write_text("".join(f"B0{i:08d}\n" for i in range(100)))
    assert _run(tmp_path, full, tmp_path / "b.jsonl") == 0
    assert _requests(capsys.readouterr().err) == 5


def test_no_cache_and_max_age_zero_fetch_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--no-cache neither reads nor fills; --max-age 0 likewise."""
    job = _job(tmp_path, 20)
    assert _run(tmp_path, job, tmp_path / "a.jsonl") == 0
    capsys.readouterr()
    assert _run(tmp_path, job, tmp_path / "b.jsonl", "--no-cache") == 0
    assert _requests(capsys.readouterr().err) == 2
    assert _run(tmp_path, job, tmp_path / "c.jsonl", "--max-age", "0") == 0
    assert _requests(capsys.readouterr().err) == 2


def test_max_age_above_the_rule_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-age above 86,400 s is a usage error naming the flag and Amazon's 24-hour rule."""
    job = tmp_path / "job.txt"
    job.write_text("B000000001\n")
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, job, tmp_path / "a.jsonl", "--max-age", "90000")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--max-age" in err
    assert "24 hours" in err


def test_lookup_serves_cached_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """broker lookup after a run of the same ASIN answers from the cache (cached: true)."""
    config, _ = _ran_one(tmp_path, capsys)
    assert cli.main(["lookup", "B000000001", "--config", str(config), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["cached"] is True


def test_refresh_fetches_from_amazon_and_refills_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run --refresh asks Amazon for every row and writes the new answers to the cache, so a
    later lookup gets the refreshed answer, not the one it replaced."""
    config = tmp_path / "config.toml"
    job = _job(tmp_path, 20)
    out = tmp_path / "a.jsonl"
    assert _run(tmp_path, job, out) == 0
    first = {r["asin"]: r["fetched_at"] for r in _rows(out)}
    capsys.readouterr()
    assert _run(tmp_path, job, out, "--refresh") == 0
    assert _requests(capsys.readouterr().err) == 2
    refreshed = {r["asin"]: r for r in _rows(out)}
    assert all(r["cached"] is False for r in refreshed.values())
    assert cli.main(["lookup", "B000000003", "--config", str(config), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["cached"] is True
    assert row["fetched_at"] == refreshed["B000000003"]["fetched_at"] != first["B000000003"]


def test_lookup_refresh_asks_amazon_and_keeps_the_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lookup --refresh skips a fresh cached answer, and the next lookup gets the new one."""
    config, ran = _ran_one(tmp_path, capsys)
    lookup = ["lookup", "B000000001", "--config", str(config), "--json"]
    assert cli.main([*lookup, "--refresh"]) == 0
    (fresh,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert fresh["cached"] is False
    assert fresh["fetched_at"] != ran["fetched_at"]
    assert cli.main(lookup) == 0
    (again,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert again["cached"] is True
    assert again["fetched_at"] == fresh["fetched_at"]


def test_new_job_after_failures_asks_amazon_only_for_the_failed_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """AttemptsExhausted's remedy holds: --new-job soon after a run with failed rows sends
    requests only for those; the ok rows come from the item cache."""
    config = tmp_path / "config.toml"
    config.write_text(
        embedded_toml(
            tps=200.0,
            api='resources = ["itemInfo.title"]',
            engine="linger_s = 0.005",
            simulator="limits = false\nseed = 3\n[simulator.faults]\nerror_503 = 0.3",
        )
        + "\n[retry]\nmax_attempts = 1\n"
    )
    job = _job(tmp_path, 200)
    out = tmp_path / "out.jsonl"
    args = ["run", str(job), "--out", str(out), "--config", str(config), "--progress", "none"]
    assert cli.main(args) == 3
    first = _rows(out)
    failed = sum(row["status"] == "failed" for row in first)
    ok = sum(row["status"] == "ok" for row in first)
    assert failed >= 10
    capsys.readouterr()
    cli.main(args)  # a rerun of the finished job points at the same remedy
    complete = capsys.readouterr().err
    assert "already complete" in complete
    assert f"{failed} rows failed" in complete
    assert "--new-job" in complete
    cli.main([*args, "--new-job"])
    err = capsys.readouterr().err
    assert _requests(err) <= -(-failed // 10)
    assert f"from the item cache {ok}, " in err


def test_no_wait_serves_the_cached_rows_before_it_stops_for_the_daily_quota(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-wait with the key's daily quota spent: every row the item cache answers is
    written before the run stops (75) for the rows that need a request; it stopped at the
    first look after the quota ran out, the cached rows not yet read left pending (89 of
    30,000 written, in a hunt; here the look comes sooner and each chunk of cache reads
    takes longer, as a big job's take longer than the look's half second)."""
    from broker.cache.front import CacheFront

    job = _job(tmp_path, 600)
    assert _run(tmp_path, job, tmp_path / "a.jsonl") == 0
    capsys.readouterr()
    more = tmp_path / "more.txt"
    # The rows that need a request first: the key spends its quota on them at once.
    more.write_text("".join(f"B1{i:08d}\n" for i in range(40)) + job.read_text())
    config = tmp_path / "config.toml"
    config.write_text(_CONFIG.replace("tpd = 0", "tpd = 2"))
    monkeypatch.setattr("broker.jobs.runner.QUOTA_POLL_S", 0.05)
    monkeypatch.setattr("broker.jobs.runner.QUOTA_QUIET_S", 0.05)
    prefetch = CacheFront.prefetch

    async def slow_prefetch(self: CacheFront, queries: Any) -> None:
        await asyncio.sleep(0.02)
        await prefetch(self, queries)

    monkeypatch.setattr(CacheFront, "prefetch", slow_prefetch)
    out = tmp_path / "b.jsonl"
    args = ["run", str(more), "--out", str(out), "--config", str(config), "--no-wait"]
    code = cli.main([*args, "--progress", "none"])
    assert code == 75
    rows = _rows(tmp_path / "b.jsonl")
    assert sum(row["cached"] is True for row in rows) == 600
    assert all(row["status"] == "ok" for row in rows)
