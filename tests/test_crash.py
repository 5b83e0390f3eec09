"""Crash and resume (reliability.md A1): SIGKILL ``broker run`` at chosen moments, check the rows.

Each cycle starts ``python -m broker run`` against a simulator served from this test's event
loop (faults and latency on) and kills it at one moment of a seeded schedule:

- ``http``: from outside, while the simulator holds one of the run's requests open;
- ``timed``: from outside, at a random time (start-up included);
- ``mid_ingest``, ``mid_commit``, ``after_commit``, ``mid_write``, ``after_flush``: the run
  kills itself at that point through the crash hook (:func:`broker.jobs.ledger.crash_point`),
  which a timed kill rarely hits.

Every cycle checks that its kill really happened there. One last run finishes the job: it
must exit 0, and the output must have every input row exactly once, every line parsing,
``attempts`` within ``max_attempts``, and every ok row equal to the simulator's item.

The helpers here are shared with ``test_resume.py`` (the other crash cases).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import string
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import pytest
from aiohttp import web
from conftest import sqlite_db

from broker.jobs.ledger import CRASH_ENV
from broker.simulator.render import render_item
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import SimulatorSettings

US = "www.amazon.com"
TAG = "crash-20"
RESOURCES = ("itemInfo.title", "offersV2.listings.price")
SECRET_ENV = "ASINB_CRASH_SECRET"
MAX_ATTEMPTS = 30
FAULTS: Mapping[str, float] = {"error_503": 0.02, "reset": 0.02, "truncated": 0.02}
#: One-way latency of each simulator leg: keeps requests open long enough to kill during one.
LATENCY: Mapping[str, float] = {"fixed_ms": 10.0}
#: Where a cycle kills the run (``mid_ingest`` is the first cycle's, while ingestion runs).
MOMENTS = ("http", "timed", "mid_commit", "after_commit", "mid_write", "after_flush")


def sim_settings(
    *,
    faults: Mapping[str, float] | None = None,
    latency: Mapping[str, float] | None = None,
    missing_share: float = 0.02,
    tps: float = 1000.0,
) -> SimulatorSettings:
    """The simulator: one Creators account for the ``crash`` key, seeded catalogue."""
    return SimulatorSettings.from_mapping(
        {
            "seed": 11,
            "missing_share": missing_share,
            "faults": dict(faults or {}),
            "latency": dict(latency or {}),
            "accounts": [
                {
                    "name": "crash",
                    "protocol": "creators",
                    "credential_id": "crash-id",
                    "secret": "crash-secret",
                    "version": "3.1",
                    "partner_tags": {US: TAG},
                    "tps": tps,
                    "tpd": 10_000_000,
                }
            ],
        }
    )


class Upstream:
    """The simulator on a loopback port of this test's loop, counting requests it holds open."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.server = SimulatorServer(settings)
        #: requests received and not yet answered, right now
        self.in_flight = 0

        @web.middleware
        async def track(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            self.in_flight += 1
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        self.server.app.middlewares.append(track)

    async def __aenter__(self) -> Upstream:
        await self.server.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.server.__aexit__(exc_type, exc, tb)

    @property
    def url(self) -> str:
        """The base URL the runs are configured with."""
        return self.server.url

    def faults(self) -> int:
        """Faults injected so far (5xx, resets, truncated bodies...)."""
        return sum(self.server.stats.faults.values())

    def items_served(self) -> int:
        """Items the simulator put into responses so far."""
        return self.server.stats.account("crash").items_served


def write_config(
    path: Path,
    url: str,
    *,
    tps: float = 150.0,
    max_in_flight: int = 8,
    queue_size: int | None = None,
) -> Path:
    """A config for ``broker run`` against the simulator at ``url``."""
    engine = f"\n[engine]\nqueue_size = {queue_size}\n" if queue_size else ""
    path.write_text(
        f'[api]\nendpoint = "{url}"\nresources = {json.dumps(list(RESOURCES))}\n'
        "\n[[keys]]\n"
        'name = "crash"\n'
        'credential_id = "crash-id"\n'
        f'credential_secret_env = "{SECRET_ENV}"\n'
        'version = "3.1"\n'
        f'partner_tags = {{ "{US}" = "{TAG}" }}\n'
        f"tps = {tps}\n"
        "tpd = 0\n"
        f"max_in_flight = {max_in_flight}\n"
        f"{engine}"
        f"\n[retry]\nmax_attempts = {MAX_ATTEMPTS}\n"
        '\n[log]\nformat = "json"\n'
    )
    return path


def make_job(path: Path, unique: int, *, seed: int, copies: int = 1) -> list[str]:
    """Write a text job of ``unique`` ASINs (``copies`` times each, plus 10% more repeats and
    two bad lines), shuffled; return its lines (line ``n`` is ``lines[n - 1]``)."""
    rng = random.Random(seed)
    alphabet = string.ascii_uppercase + string.digits
    asins = ["B0" + "".join(rng.choice(alphabet) for _ in range(8)) for _ in range(unique)]
    lines = asins * copies + asins[: unique // 10] + ["bad-id", "B0SHORT"]
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return lines


def child_env(crash_at: str | None = None) -> dict[str, str]:
    """The environment of a run: no inherited ASINB_* variables, the key's secret, the hook."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASINB_")}
    env[SECRET_ENV] = "crash-secret"
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return env


async def spawn(
    config: Path,
    job: Path,
    out: Path,
    *,
    crash_at: str | None = None,
    fmt: str = "jsonl",
    extra: Sequence[str] = (),
) -> asyncio.subprocess.Process:
    """Start ``python -m broker run`` (stderr piped; read it with :func:`finish`)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "run",
        str(job),
        "--config",
        str(config),
        "--out",
        str(out),
        "--format",
        fmt,
        "--progress",
        "none",
        *extra,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(crash_at),
        cwd=out.parent,
    )


async def finish(proc: asyncio.subprocess.Process, timeout_s: float = 60.0) -> tuple[int, str]:
    """Wait for a run to end; return its exit code (negative: killed by that signal), stderr."""
    async with asyncio.timeout(timeout_s):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


async def run_once(
    config: Path,
    job: Path,
    out: Path,
    *,
    crash_at: str | None = None,
    fmt: str = "jsonl",
    extra: Sequence[str] = (),
) -> tuple[int, str]:
    """Run ``broker run`` to its end (``extra``: more flags)."""
    return await finish(await spawn(config, job, out, crash_at=crash_at, fmt=fmt, extra=extra))


def events(stderr: str, name: str) -> list[dict[str, object]]:
    """The JSON log events called ``name`` in a run's stderr."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def read_jsonl(out: Path) -> list[dict[str, object]]:
    """Parse an output file strictly: complete lines only, each one a JSON object."""
    data = out.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the output ends in a torn line"
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert all(isinstance(row, dict) for row in rows)
    return rows


def check_output(out: Path, lines: Sequence[str], settings: SimulatorSettings) -> None:
    """Every input line has exactly one row, equal to what the simulator serves for it."""
    rows = read_jsonl(out)
    numbers = [row["line"] for row in rows]
    assert len(numbers) == len(set(numbers)), "a row was written twice"
    assert sorted(numbers) == list(range(1, len(lines) + 1)), "a row is missing"  # type: ignore[type-var]
    for row in rows:
        raw = lines[int(row["line"]) - 1]  # type: ignore[call-overload]
        assert row["input"] == raw
        if row["status"] == "invalid":
            assert len(raw) != 10
            assert row["attempts"] == 0
            continue
        if row["cached"]:
            # Fetched before a kill but not yet written: the rerun takes it from the item
            # cache (no request, so no attempt), with the time Amazon sent it.
            assert row["attempts"] == 0, row
        else:
            assert 1 <= row["attempts"] <= MAX_ATTEMPTS, row  # type: ignore[operator]
        expected = render_item(settings, US, raw, resources=RESOURCES, partner_tag=TAG)
        if expected is None:
            assert row["status"] == "not_found", row
        else:
            assert row["status"] == "ok", row
            assert row["item"] == expected


async def _kill_at(
    moment: str,
    upstream: Upstream,
    config: Path,
    job: Path,
    out: Path,
    rng: random.Random,
) -> None:
    """One cycle: start a run and kill it at ``moment``; assert the kill landed there."""
    if moment in ("http", "timed"):
        proc = await spawn(config, job, out)
        await asyncio.sleep(rng.uniform(0.0, 0.8) if moment == "http" else rng.uniform(0.2, 1.5))
        if moment == "http":
            while upstream.in_flight == 0:
                assert proc.returncode is None, "the run ended before it sent a request"
                await asyncio.sleep(0.001)
            # No await between the check and the kill: the request is still open.
            proc.kill()
        else:
            assert proc.returncode is None, "the run had ended: no work was left to interrupt"
            proc.kill()
        code, err = await finish(proc)
        assert code == -signal.SIGKILL, err[-2000:]
        return
    # Commits come every 500 rows, so a second one still leaves work for later cycles.
    nth = rng.choice((1, 2)) if moment == "mid_commit" else 1
    code, err = await run_once(config, job, out, crash_at=f"{moment}:{nth}")
    assert code == -signal.SIGKILL, err[-2000:]
    assert f"crash point {moment} #{nth}: sending SIGKILL" in err
    if moment == "mid_write":
        assert _ends_torn(out), "the kill left no torn record"


def _ends_torn(out: Path) -> bool:
    return not out.read_bytes().endswith(b"\n")


async def _crash_cycles(tmp_path: Path, cycles: int, seed: int) -> None:
    rng = random.Random(seed)
    job = tmp_path / "job.txt"
    # A cycle gets through about 600 rows at most before its kill, 200 on average.
    lines = make_job(job, 300 * cycles, seed=seed)
    out = tmp_path / "out.jsonl"
    schedule = ["mid_ingest", *rng.sample(MOMENTS, len(MOMENTS))]
    schedule += [rng.choice(MOMENTS) for _ in range(cycles - len(schedule))]
    async with Upstream(sim_settings(faults=FAULTS, latency=LATENCY)) as upstream:
        config = write_config(tmp_path / "c.toml", upstream.url)
        for moment in schedule:
            await _kill_at(moment, upstream, config, job, out, rng)
        code, err = await run_once(config, job, out)
        assert code == 0, err[-2000:]
        assert upstream.faults() > 0, "the simulator injected no fault"
    assert len(set(schedule)) == len(MOMENTS) + 1
    assert "pending 0" in err
    check_output(out, lines, upstream.settings)


class TestA1KillNine:
    async def test_a1_kill_nine_at_every_moment_keeps_every_row_exactly_once(
        self, tmp_path: Path
    ) -> None:
        """A1: ten SIGKILLs (HTTP, commit, write, flush, ingest, random) lose and repeat nothing."""
        await _crash_cycles(tmp_path, cycles=10, seed=5)

    @pytest.mark.slow
    async def test_a1_kill_nine_many_cycles(self, tmp_path: Path) -> None:
        """A1, full variant: forty seeded SIGKILLs over a bigger job (run with -m slow)."""
        await _crash_cycles(tmp_path, cycles=40, seed=9)


async def test_a_refresh_after_a_kill_keeps_every_row_of_a_sqlite_output(tmp_path: Path) -> None:
    """A SQLite output killed mid-run leaves its -wal; a --refresh that completes replaces
    the file but left that -wal beside the new one, and SQLite replayed the old run's pages
    over it: rows lost, exit 0, and the next run called the job complete."""
    job = tmp_path / "job.txt"
    lines = make_job(job, 300, seed=3)
    out = tmp_path / "out.sqlite"
    async with Upstream(sim_settings()) as upstream:
        config = write_config(tmp_path / "c.toml", upstream.url, tps=200.0)
        code, err = await run_once(config, job, out, crash_at="after_commit:1", fmt="sqlite")
        assert code == -signal.SIGKILL, err[-2000:]
        assert await asyncio.to_thread(os.path.exists, f"{out}-wal")
        code, err = await run_once(config, job, out, fmt="sqlite", extra=["--refresh"])
        assert code == 0, err[-2000:]
    with sqlite_db(out) as db:
        numbers = [line for (line,) in db.execute("SELECT line FROM results")]
    assert sorted(numbers) == list(range(1, len(lines) + 1))


def test_every_crash_point_is_scheduled() -> None:
    """The A1 schedule covers every named point of the crash hook."""
    from broker.jobs.ledger import CRASH_POINTS

    assert set(CRASH_POINTS) == (set(MOMENTS) | {"mid_ingest"}) - {"http", "timed"}
