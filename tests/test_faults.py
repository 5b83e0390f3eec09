"""The fault matrix of reliability.md 3.3, cases B1..B16: Amazon misbehaves, no row is lost.

One class per case, named after its ID. Every test injects its fault through the simulator
(seeded switches of ``[simulator.faults]``, ``omitted_asins``, runtime quota changes) or the
network itself (a closed port, a hand-written HTTP answer), asserts the documented outcome,
and asserts the fault really fired: the simulator's counters, or the test's own count, must
show it at least once, so a harness that silently stopped injecting fails (reliability 3.2).

Time is a shared :class:`~broker.testing.FakeClock` wherever the case is about waiting
(backoff, pauses, quota windows, outages); ``drive`` jumps it whenever nothing is on the
wire. Cases about real socket timeouts use the loop's clock with sub-second timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import socket
import sqlite3
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    US,
    CountingTransport,
    Harness,
    account,
    asins,
    drive,
    key_doc,
    make_config,
    paapi_key_doc,
)
from structlog.testing import capture_logs

from broker import cli
from broker.api.base import HttpRequest, RawResponse
from broker.api.creators import CreatorsDialect
from broker.engine.keys import OUTAGE_CODE
from broker.engine.retry import RetryBudget, RetryPolicy
from broker.engine.transport import AiohttpTransport
from broker.errors import (
    BodyTooLarge,
    ConnectError,
    EndpointUnreachable,
    NoUsableKeyError,
    RequestTimeout,
    ResponseError,
)
from broker.jobs.metrics_http import (
    MetricsServer,
    Readiness,
    SpoolSnapshot,
    readiness,
    render_metrics,
)
from broker.jobs.runner import ExitCode, JobOptions, describe_failure, run_job
from broker.models import ItemResult, Status
from broker.simulator.app import SIMULATOR_KEY
from broker.simulator.catalog import lookup
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import FaultRates, SimulatorSettings
from broker.simulator.tokens import TokenStore
from broker.testing import FakeClock

if TYPE_CHECKING:
    from broker.client import Broker
    from broker.simulator.state import Simulator

FREE = SimulatorSettings(limits=False)
#: 5xx codes a failed lookup may carry (Creators reason/type, PA-API code, or the fallback)
SERVER_CODES = {
    "InternalServerException",
    "InternalFailure",
    "ServiceUnavailable",
    "ServerError",
}


# -- helpers ----------------------------------------------------------------------------------


def _statuses(results: Iterable[ItemResult]) -> Counter[str]:
    return Counter(result.status.value for result in results)


def _state(sim: SimulatorServer) -> Simulator:
    return sim.app[SIMULATOR_KEY]


def _asks_for(request: HttpRequest, asin: str) -> bool:
    """True when a GetItems request body names ``asin``."""
    if "/auth/" in request.url:
        return False
    body = json.loads(request.body or b"{}")
    return asin in (body.get("itemIds") or body.get("ItemIds") or [])


def _api_requests(transport: CountingTransport) -> list[HttpRequest]:
    return [r for r in transport.requests if "/catalog/" in r.url or "/paapi5/" in r.url]


def _token_requests(transport: CountingTransport) -> list[HttpRequest]:
    return [r for r in transport.requests if "/auth/o2/token" in r.url]


async def _reference(
    harness: Harness, wanted: list[str], *, protocol: str = "creators", seed: int = 0
) -> dict[str, Mapping[str, object] | None]:
    """Items of ``wanted`` from a simulator without faults (same seed, same catalogue)."""
    sim = await harness.simulator(SimulatorSettings(limits=False, seed=seed))
    broker = await harness.broker(make_config(sim.url, protocol=protocol))
    return {r.asin: r.item for r in await broker.get_items(wanted)}


class _Source:
    """A StatusSource for /readyz over a live broker (the daemon's view of it)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def engine_metrics(self) -> Any:
        return self._broker.metrics()

    def spool_snapshot(self) -> SpoolSnapshot:
        return SpoolSnapshot(state="running")

    async def cache_stats(self) -> None:
        return None


async def _readyz(broker: Broker) -> tuple[int, dict[str, Any]]:
    """GET /readyz of a metrics server reading ``broker``: (status, body)."""
    async with (
        MetricsServer(_Source(broker), host="127.0.0.1", port=0) as server,
        aiohttp.ClientSession() as session,
        session.get(server.url + "/readyz") as response,
    ):
        return response.status, await response.json()


class _Sampler:
    """Records the broker's readiness and key rate every ``every_s`` of (fake) time."""

    def __init__(self, broker: Broker, clock: FakeClock, every_s: float = 1.0) -> None:
        self.readiness: list[Readiness] = []
        self.rates: list[tuple[float, float]] = []
        self._broker = broker
        self._clock = clock
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            metrics = self._broker.metrics()
            self.readiness.append(readiness(metrics, state="running"))
            self.rates.append((self._clock.monotonic(), metrics.keys[0].rate))
            await self._clock.sleep(self._every_s)

    def __enter__(self) -> _Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def _signed_get_items(transport: CountingTransport, base_url: str) -> HttpRequest:
    """A GetItems request of the demo Creators key, with a bearer token fetched for it."""
    token = await transport.send(
        HttpRequest(
            "POST",
            base_url + "/auth/o2/token",
            {"content-type": "application/json"},
            b'{"grant_type":"client_credentials","client_id":"demo-id",'
            b'"client_secret":"demo-secret"}',
        )
    )
    bearer = json.loads(token.body)["access_token"]
    request = CreatorsDialect(base_url).get_items_request(
        ["B000000001"], marketplace=US, partner_tag="demo-20", resources=()
    )
    return request.with_headers({"Authorization": f"Bearer {bearer}"})


def _closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _job(tmp_path: Path, count: int, prefix: str = "B0") -> Path:
    job = tmp_path / "job.txt"
    job.write_text("\n".join(asins(count, prefix)) + "\n")
    return job


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ledger_statuses(out: Path) -> Counter[str]:
    """Row statuses straight from the job's SQLite ledger (``pending`` until final)."""
    with contextlib.closing(sqlite3.connect(out.with_name(out.name + ".ledger"))) as conn:
        return Counter(dict(conn.execute("SELECT status, count(*) FROM rows GROUP BY status")))


def _options(job: Path, out: Path, **extra: Any) -> JobOptions:
    settings: dict[str, Any] = {"progress": "none", "handle_signals": False, **extra}
    return JobOptions(job=job, out=out, **settings)


# -- B1 -----------------------------------------------------------------------------------------


class TestB1ThrottleBursts:
    """B1: 429 bursts cut the rate, honour Retry-After, recover without a jump; no item fails."""

    async def test_burst_cuts_the_rate_and_it_recovers_gradually(self, harness: Harness) -> None:
        """A 20 s window at a fifth of the rate: 429s counted, rate cut, then regained in steps."""
        clock = FakeClock()
        settings = SimulatorSettings(
            accounts=(account("demo", "demo-id", "demo-secret", tps=10.0),)
        )
        sim = await harness.simulator(settings, clock=clock)
        transport = await harness.transport()
        config = make_config(sim.url, keys=[key_doc(tps=10.0, tpd=1_000_000)])
        broker = await harness.broker(config, clock=clock, transport=transport)
        quota = _state(sim).quotas["demo"]

        async def burst() -> None:
            quota.tps = 2.0
            await clock.sleep(20.0)
            quota.tps = 10.0

        wanted = asins(2500)
        window = asyncio.get_running_loop().create_task(burst())
        with _Sampler(broker, clock) as sampler:
            task = asyncio.get_running_loop().create_task(broker.get_items(wanted))
            await drive(clock, task, transport)
        await window
        results = task.result()
        assert _statuses(results) == {"ok": 2500}
        stats = sim.stats.accounts["demo"]
        assert stats.throttled > 0  # the burst really throttled
        metrics = broker.metrics()
        assert metrics.throttled == stats.throttled
        assert f"asinb_throttled_total {stats.throttled}\n" in render_metrics(
            metrics, SpoolSnapshot()
        )
        assert metrics.items_by_status == {"ok": 2500}
        rates = [rate for _, rate in sampler.rates]
        low = min(rates)
        assert low < 3.0  # the effective rate came down to about what the server allowed
        start = sampler.rates[0][0]
        after = [rate for at, rate in sampler.rates if at >= start + 20.0]
        assert after[0] < 5.0  # no jump back to the nominal rate when the burst ends
        assert after[-1] > 2 * low  # but it climbs back
        climbs = [b / a for a, b in itertools.pairwise(after) if b > a]
        assert climbs
        # In steps (a probe, then a cubic climb), never straight back in one second: the
        # recovery is fast (ratelimit.md's 60 s became seconds) but each second at most
        # doubles the rate.
        assert max(climbs) < 2.0

    async def test_retry_after_pauses_the_key(self, harness: Harness) -> None:
        """A 429 carrying Retry-After: 3 holds the key: its next request comes 3 s later."""
        clock = FakeClock()
        settings = SimulatorSettings(
            retry_after="header",
            retry_after_s=3.0,
            accounts=(account("demo", "demo-id", "demo-secret", tps=1.0),),
        )
        sim = await harness.simulator(settings, clock=clock)
        transport = await harness.transport()
        config = make_config(sim.url, keys=[key_doc(tps=4.0, tpd=1_000_000)])
        broker = await harness.broker(config, clock=clock, transport=transport)
        task = asyncio.get_running_loop().create_task(broker.get_items(asins(60)))
        await drive(clock, task, transport)
        assert _statuses(task.result()) == {"ok": 60}
        stats = sim.stats.accounts["demo"]
        assert stats.throttled > 0
        throttled = list(stats.throttled_at)
        arrivals = sorted([*stats.accepted_at, *throttled])
        headers = [r.headers.get("retry-after") for r in transport.responses if r.status == 429]
        assert headers == ["3"] * stats.throttled
        for at in throttled:
            later = [t for t in arrivals if t > at]
            if later:
                assert later[0] >= at + 3.0 - 1e-6


# -- B2 -----------------------------------------------------------------------------------------


class TestB2QuotaExhausted:
    """B2: a spent day shows "waiting for quota" (progress, /readyz) and resumes after it."""

    async def test_answers_are_committed_while_the_run_waits(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """The rows answered before a quota wait reach the ledger and the output during the
        wait (within a second), so a kill -9 then loses no answer already paid for."""
        clock, sim, transport, config, broker = await harness.quota_rig(
            tps=5.0, server_tpd=3, key_tpd=3
        )
        job, out = _job(tmp_path, 50), tmp_path / "out.jsonl"
        task = asyncio.get_running_loop().create_task(
            run_job(config, _options(job, out), broker=broker)
        )
        with pytest.raises(TimeoutError, match="fake time limit"):
            await drive(clock, task, transport, limit_s=3600.0)
        assert not task.done()  # waiting for the daily reset
        served = sim.stats.accounts["demo"].items_served
        assert served > 0
        # The runner commits on the real clock, once a second.
        deadline = time.monotonic() + 5
        while (statuses := _ledger_statuses(out)).get("ok") != served:
            assert time.monotonic() < deadline, statuses
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert statuses["ok"] == served  # every answer of the day so far is in the ledger
        assert len(_rows(out)) == served  # ... and in the output

    async def test_daily_budget_waits_for_the_reset(self, harness: Harness, tmp_path: Path) -> None:
        """broker run with TPD 3: rows pending, readyz 503 until midnight UTC, then all done.
        (30 rows from 23:55, 3 requests: a tpd of 3 less the 1 % guard sends 2 a day, so 50
        rows, 5 requests, ran into a third day, a look at the store every fake second or two:
        17 s of real time, and 31 s with the suite on both cores, past the drive's limit.)"""
        clock, sim, transport, config, broker = await harness.quota_rig(
            tps=5.0, server_tpd=3, key_tpd=3, epoch=datetime(2026, 5, 1, 23, 55, tzinfo=UTC)
        )
        job, out = _job(tmp_path, 30), tmp_path / "out.jsonl"
        options = _options(job, out, progress="auto", progress_every_s=0.02)
        with capture_logs() as logs:
            task = asyncio.get_running_loop().create_task(run_job(config, options, broker=broker))
            with pytest.raises(TimeoutError, match="fake time limit"):
                await drive(clock, task, transport, limit_s=150.0)
            # The key now sleeps until 00:00 UTC; the run is waiting, not failing.
            (key,) = broker.metrics().keys
            assert key.reason == "waiting for daily quota"
            assert key.until == "2026-05-02T00:00:00Z"
            status, body = await _readyz(broker)
            assert status == 503
            assert body["reason"] == "waiting for daily quota until 2026-05-02T00:00:00Z"
            await asyncio.sleep(0.1)  # a progress event or two, in real time
            assert not task.done()
            pending = _ledger_statuses(out)
            assert pending["pending"] > 0
            assert "failed" not in pending
            await drive(clock, task, transport)
        summary = task.result()
        assert summary.exit_code() == ExitCode.OK
        assert summary.pending == 0
        assert sum(summary.by_status.values()) == 30
        assert clock.utcnow() < datetime(2026, 5, 2, 0, 1, tzinfo=UTC)  # done at the reset
        assert sim.stats.accounts["demo"].throttled == 0  # never hammered the server
        assert sim.stats.accounts["demo"].accepted == 3  # 2 on day one, 1 after the reset
        progress = [e for e in logs if e["event"] == "broker.progress"]
        assert {e["job"] for e in progress} == {str(job)}  # each names its job
        waiting = [
            k for e in progress for k in e["keys"] if k["reason"] == "waiting for daily quota"
        ]
        assert waiting
        assert waiting[0]["until"] == "2026-05-02T00:00:00Z"

    async def test_server_quota_spent_parks_and_resumes(self, harness: Harness) -> None:
        """Sustained 429s (server TPD 10, ours 1000): parked, probed rarely, resumes next day."""
        clock, sim, transport, _, broker = await harness.quota_rig(
            tps=10.0, server_tpd=10, key_tpd=1000
        )
        start = clock.utcnow()
        with _Sampler(broker, clock, every_s=60.0) as sampler:
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(150)))
            await drive(clock, task, transport)
        assert _statuses(task.result()) == {"ok": 150}
        stats = sim.stats.accounts["demo"]
        assert stats.accepted == 15
        assert stats.throttled >= 10  # the quota really ran out
        assert (clock.utcnow() - start).total_seconds() >= 12 * 3600  # resumed after 00:00
        parked = [r for r in sampler.readiness if not r.ready]
        assert len(parked) > len(sampler.readiness) / 2
        # A 429 names no quota and our own count is far below TPD, but the key was answered
        # today: its access is fine, so the quota is spent (the account's is lower).
        assert {r.reason for r in parked} == {"no key can send (demo: daily quota exhausted)"}
        # Parked means probed rarely: far fewer 429s than one per second of waiting.
        assert stats.throttled < 200


# -- B3 -----------------------------------------------------------------------------------------


class TestB3ServerErrors:
    """B3: 5xx are retried with backoff; after max_attempts the item fails, others go on."""

    async def test_5xx_retried_then_failed_with_last_error(self, harness: Harness) -> None:
        """Seeded 500/502/503/504: most ASINs ok after retries, a few failed after 3 attempts."""
        clock = FakeClock()
        faults = FaultRates(error_500=0.15, error_502=0.15, error_503=0.15, error_504=0.15)
        sim = await harness.simulator(
            SimulatorSettings(limits=False, seed=11, faults=faults), clock=clock
        )
        transport = await harness.transport()
        config = make_config(
            sim.url,
            keys=[key_doc(max_in_flight=1)],
            retry={"max_attempts": 3, "base_delay_s": 0.5, "max_delay_s": 30.0},
        )
        broker = await harness.broker(
            config, clock=clock, transport=transport, rng=random.Random(5)
        )
        wanted = asins(300)
        with capture_logs() as logs:
            task = asyncio.get_running_loop().create_task(broker.get_items(wanted))
            await drive(clock, task, transport)
        results = task.result()
        counts = _statuses(results)
        assert counts["failed"] > 0
        assert counts["ok"] > 0
        assert counts["ok"] + counts["failed"] == 300
        injected = sum(
            sim.stats.faults[k] for k in ("error_500", "error_502", "error_503", "error_504")
        )
        assert injected > 0
        metrics = broker.metrics()
        assert sum(n for code, n in metrics.responses_by_status.items() if code >= 500) == injected
        assert metrics.retries == injected - counts["failed"] // 10
        # One request at a time, each answered: requests and responses pair up in order.
        answered = list(zip(transport.requests, transport.responses, strict=True))
        for result in results:
            if result.status is Status.FAILED:
                assert result.attempts == 3
                assert result.error is not None
                assert result.error.code in SERVER_CODES
                assert result.error.remedy
                sent = [(q, a) for q, a in answered if _asks_for(q, result.asin)]
                assert len(sent) == 3
                assert all(a.status >= 500 for _, a in sent)
                last = json.loads(sent[-1][1].body)["message"]
                # The last error, not the first, told as final.
                assert result.error.message == f"{last} (gave up after 3 failed attempts)"
        delays = [e["delay_s"] for e in logs if e["event"] == "broker.retry_scheduled"]
        assert len(delays) == metrics.retries
        assert all(0 < d <= 30.0 for d in delays)
        assert len(set(delays)) > 1  # jittered

    def test_refused_retry_waits_the_next_step_not_the_cap(self) -> None:
        """A retry the budget refuses waits U(c/2, c) of the next step, below max_delay early on."""
        draws = iter([0.0, 0.999, 0.5])
        policy = RetryPolicy(base_delay_s=0.5, max_delay_s=30.0, random=lambda: next(draws))
        assert policy.budget_delay(1) == pytest.approx(0.5)
        assert policy.budget_delay(1) == pytest.approx(0.9995)
        assert policy.budget_delay(10) == pytest.approx(22.5)

    async def test_heavy_faults_do_not_park_every_retry_for_30s(self, harness: Harness) -> None:
        """When 5xx outrun the retry budget, refused retries back off, not a flat 30 s each."""
        clock = FakeClock()
        sim = await harness.simulator(
            SimulatorSettings(limits=False, seed=2, faults=FaultRates(error_503=0.6)), clock=clock
        )
        transport = await harness.transport()
        config = make_config(
            sim.url, retry={"max_attempts": 20, "base_delay_s": 0.5, "max_delay_s": 30.0}
        )
        broker = await harness.broker(
            config, clock=clock, transport=transport, rng=random.Random(3)
        )
        started = clock.monotonic()
        with capture_logs() as logs:
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(200)))
            await drive(clock, task, transport)
        assert _statuses(task.result()) == {"ok": 200}
        assert sim.stats.faults["error_503"] > 0
        budget: RetryBudget = broker._keys[0].retry_budget
        scheduled = [e for e in logs if e["event"] == "broker.retry_scheduled"]
        delays = [e["delay_s"] for e in scheduled]
        assert len(delays) > budget.retries > 0  # the budget granted some and refused others
        assert max(delays) < 29.0
        # A refused retry waits at least half the next step's ceiling (U(c/2, c)): only those
        # the budget granted may come back sooner (all of them did when it was ignored).
        sooner = [e for e in scheduled if e["delay_s"] < 0.5 * min(30.0, 0.5 * 2 ** e["attempt"])]
        assert len(sooner) <= budget.retries
        # A flat max_delay per refused retry would have taken at least 30 s.
        assert clock.monotonic() - started < 30.0


# -- B4 -----------------------------------------------------------------------------------------


class TestB4ConnectionReset:
    """B4: a reset mid-body or a dropped connection is transient; never written as success."""

    async def test_resets_are_retried_and_never_success(self, harness: Harness) -> None:
        """Resets mid-body and disconnects: retried as transport errors; every item is intact."""
        wanted = asins(200)
        reference = await _reference(harness, wanted, seed=4)
        faults = FaultRates(reset=0.2, disconnect=0.2)
        sim = await harness.simulator(SimulatorSettings(limits=False, seed=4, faults=faults))
        config = make_config(sim.url, retry={"max_attempts": 30})
        broker = await harness.broker(config)
        results = await broker.get_items(wanted)
        assert _statuses(results) == {"ok": 200}
        injected = sim.stats.faults
        assert injected["reset"] > 0
        assert injected["disconnect"] > 0
        metrics = broker.metrics()
        assert metrics.transport_errors == injected["reset"] + injected["disconnect"]
        assert metrics.retries == metrics.transport_errors
        assert any(r.attempts > 1 for r in results)
        for result in results:
            assert result.item == reference[result.asin]

    async def test_reset_is_a_connect_error_not_an_outage(self, harness: Harness) -> None:
        """A reset mid-body is a ConnectError, not EndpointUnreachable: it spends an attempt."""
        sim = await harness.simulator(SimulatorSettings(limits=False, faults=FaultRates(reset=1.0)))
        transport = await harness.transport()
        with pytest.raises(ConnectError, match="incomplete") as info:
            await transport.send(await _signed_get_items(transport, sim.url))
        assert not isinstance(info.value, EndpointUnreachable)
        assert sim.stats.faults["reset"] == 1


# -- B5 -----------------------------------------------------------------------------------------


class TestB5HungResponse:
    """B5: a hung body hits the explicit timeout, frees its slot, and the batch is retried."""

    async def test_hung_bodies_time_out_and_are_retried(self, harness: Harness) -> None:
        """Bodies that stall for 30 s end at the 0.3 s timeout; one slot, every ASIN ok."""
        faults = FaultRates(hang=0.3, hang_s=30.0)
        sim = await harness.simulator(SimulatorSettings(limits=False, seed=1, faults=faults))
        config = make_config(
            sim.url,
            keys=[key_doc(max_in_flight=1)],
            engine={"request_timeout_s": 0.3},
            retry={"max_attempts": 10},
        )
        broker = await harness.broker(config)
        started = time.monotonic()
        results = await broker.get_items(asins(60))
        elapsed = time.monotonic() - started
        assert _statuses(results) == {"ok": 60}
        hangs = sim.stats.faults["hang"]
        assert hangs > 0
        metrics = broker.metrics()
        assert metrics.transport_errors == hangs
        assert metrics.retries == hangs
        # Each hang cost the timeout, not hang_s (or aiohttp's default total of 300 s).
        assert elapsed < hangs * 0.3 + 3.0
        # With one slot, a hang that kept it would have stalled the rest for good.
        assert sum(1 for r in results if r.attempts > 1) >= 10
        await asyncio.sleep(0)
        assert broker.metrics().keys[0].in_flight == 0

    async def test_the_timeout_is_explicit(self, harness: Harness) -> None:
        """A hung body raises RequestTimeout after request_timeout_s (here 0.2 s), not 300 s."""
        sim = await harness.simulator(
            SimulatorSettings(limits=False, faults=FaultRates(hang=1.0, hang_s=30.0))
        )
        transport = await harness.transport(timeout_s=0.2)
        request = await _signed_get_items(transport, sim.url)
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await transport.send(request)
        assert time.monotonic() - started < 2.0
        assert sim.stats.faults["hang"] == 1
        assert transport.in_flight == 0


# -- B6 -----------------------------------------------------------------------------------------


async def _raw_paapi_server(kinds: list[str]) -> tuple[asyncio.Server, str, list[str]]:
    """A hand-written HTTP/1.1 PA-API stand-in whose n-th answer lies as ``kinds[n]`` says.

    ``short``: Content-Length half the JSON (the rest trails it); ``long``: twice the JSON,
    then the connection closes; anything after the list: the truthful answer. Every answer
    says ``Connection: close``, so each request gets its own connection and its own lie.
    """
    served: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            ids = json.loads(await reader.readexactly(length))["ItemIds"]
            body = json.dumps({"ItemsResult": {"Items": [{"ASIN": i} for i in ids]}}).encode()
            kind = kinds[len(served)] if len(served) < len(kinds) else "good"
            served.append(kind)
            declared = {"short": len(body) // 2, "long": len(body) * 2}.get(kind, len(body))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (declared, body)
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", served


class TestB6TruncatedBody:
    """B6: a truncated JSON body or a wrong Content-Length is a transient parse error."""

    async def test_truncated_bodies_are_retried(
        self, harness: Harness, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Bodies cut in half (valid length, broken JSON): BadResponse, retried, all intact;
        each logged, at warning level once a minute (the rest at debug)."""
        caplog.set_level(logging.DEBUG, logger="broker")
        wanted = asins(150)
        reference = await _reference(harness, wanted, seed=6)
        sim = await harness.simulator(
            SimulatorSettings(limits=False, seed=6, faults=FaultRates(truncated=0.3))
        )
        broker = await harness.broker(make_config(sim.url, retry={"max_attempts": 20}))
        with capture_logs() as logs:
            results = await broker.get_items(wanted)
        assert _statuses(results) == {"ok": 150}
        truncated = sim.stats.faults["truncated"]
        assert truncated > 0
        assert broker.metrics().retries == truncated
        bad = [e for e in logs if e["event"] == "broker.bad_response"]
        assert len(bad) == truncated
        assert [e["log_level"] for e in bad].count("warning") == 1
        assert all("not JSON" in e["error"] for e in bad)
        for result in results:
            assert result.item == reference[result.asin]

    async def test_wrong_content_length_is_retried(self, harness: Harness) -> None:
        """A Content-Length shorter, then longer, than the body: both transient, then ok."""
        server, url, served = await _raw_paapi_server(["short", "long"])
        async with server:
            config = make_config(url, protocol="paapi5", keys=[paapi_key_doc(max_in_flight=1)])
            broker = await harness.broker(config)
            results = await broker.get_items(asins(3))
            metrics = broker.metrics()
        assert _statuses(results) == {"ok": 3}
        assert all(r.attempts == 3 for r in results)
        assert served == ["short", "long", "good"]
        assert (metrics.transport_errors, metrics.retries) == (2, 2)


# -- B7 -----------------------------------------------------------------------------------------


class TestB7WrongShape:
    """B7: valid JSON of the wrong shape is a bad response: retried, bounded, then failed."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_wrong_shapes_fail_after_bounded_retries(
        self, harness: Harness, protocol: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Every answer misshapen: each ASIN failed as BadResponse after 3 attempts, no crash;
        each answer logged, at warning level once a minute (thousands a day, else)."""
        caplog.set_level(logging.DEBUG, logger="broker")
        sim = await harness.simulator(
            SimulatorSettings(limits=False, faults=FaultRates(bad_shape=1.0))
        )
        transport = await harness.transport()
        config = make_config(sim.url, protocol=protocol, retry={"max_attempts": 3})
        broker = await harness.broker(config, transport=transport)
        with capture_logs() as logs:
            results = await broker.get_items(asins(30))
        assert _statuses(results) == {"failed": 30}
        for result in results:
            assert result.attempts == 3
            assert result.error is not None
            assert result.error.code == "BadResponse"
        assert sim.stats.faults["bad_shape"] == 9  # 3 batches x 3 attempts
        events = [e["event"] for e in logs]
        assert "broker.attempt_crashed" not in events
        bad = [e for e in logs if e["event"] == "broker.bad_response"]
        assert len(bad) == 9
        assert [e["log_level"] for e in bad].count("warning") == 1
        request_ids = {
            r.headers["x-amzn-requestid"] for r in transport.responses if r.status == 200
        }
        assert {e["request_id"] for e in bad} <= request_ids
        assert all(e["request_id"] for e in bad)
        bodies = [r.body.decode() for r in transport.responses]
        tokens = [b for b in bodies if "access_token" in b]
        for event in bad:
            text = json.dumps(event, default=str)
            assert "unexpectedResult" not in text
            assert "an item without its id" not in text
            assert all(json.loads(t)["access_token"] not in text for t in tokens)

    async def test_sporadic_wrong_shapes_are_retried_to_success(self, harness: Harness) -> None:
        """A third of answers misshapen: retried, and every ASIN ends ok."""
        sim = await harness.simulator(
            SimulatorSettings(limits=False, seed=7, faults=FaultRates(bad_shape=0.3))
        )
        broker = await harness.broker(make_config(sim.url, retry={"max_attempts": 20}))
        results = await broker.get_items(asins(100))
        assert _statuses(results) == {"ok": 100}
        assert sim.stats.faults["bad_shape"] > 0
        assert broker.metrics().retries == sim.stats.faults["bad_shape"]

    def test_unknown_fields_next_to_the_documented_ones_are_ignored(self) -> None:
        """An extra field beside itemsResult is forward-compatible; an answer of only it is not."""
        dialect = CreatorsDialect("http://127.0.0.1:1")
        item = {"asin": "B000000001", "itemInfo": {"title": {"displayValue": "Kettle"}}}
        extra = {"itemsResult": {"items": [item], "nextToken": "x"}, "diagnostics": {"ms": 3}}
        parsed = dialect.parse_get_items(
            RawResponse(200, {}, json.dumps(extra).encode()), ["B000000001"]
        )
        assert parsed.outcomes["B000000001"].status is Status.OK
        only_unknown = {"diagnostics": {"ms": 3}}
        with pytest.raises(ResponseError, match="no result and no error list"):
            dialect.parse_get_items(
                RawResponse(200, {}, json.dumps(only_unknown).encode()), ["B000000001"]
            )


# -- B8 -----------------------------------------------------------------------------------------


class TestB8HtmlPage:
    """B8: an HTML page (5xx from a load balancer, or a 200 from a proxy) is transient."""

    async def test_html_pages_are_retried(self, harness: Harness) -> None:
        """502/503 HTML pages and 200 text/html portals: retried; every ASIN ok and intact."""
        wanted = asins(150)
        reference = await _reference(harness, wanted, seed=8)
        faults = FaultRates(html=0.2, html_ok=0.2)
        sim = await harness.simulator(SimulatorSettings(limits=False, seed=8, faults=faults))
        broker = await harness.broker(make_config(sim.url, retry={"max_attempts": 20}))
        results = await broker.get_items(wanted)
        assert _statuses(results) == {"ok": 150}
        injected = sim.stats.faults
        assert injected["html"] > 0
        assert injected["html_ok"] > 0
        assert broker.metrics().retries == injected["html"] + injected["html_ok"]
        for result in results:
            assert result.item == reference[result.asin]

    async def test_persistent_html_fails_as_bad_response(self, harness: Harness) -> None:
        """Only ever a 200 HTML page: each ASIN failed as BadResponse after max_attempts."""
        sim = await harness.simulator(
            SimulatorSettings(limits=False, faults=FaultRates(html_ok=1.0))
        )
        broker = await harness.broker(make_config(sim.url, retry={"max_attempts": 2}))
        results = await broker.get_items(asins(10))
        assert _statuses(results) == {"failed": 10}
        assert {r.error.code for r in results if r.error} == {"BadResponse"}
        assert sim.stats.faults["html_ok"] == 2


# -- B9 -----------------------------------------------------------------------------------------


class TestB9PartialSuccess:
    """B9: some items plus per-item errors: good ones ok, bad ones final, nothing retried."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_partial_answers_are_final(self, harness: Harness, protocol: str) -> None:
        """20 % unknown, 10 % inaccessible: verdicts match the catalogue; one request per batch."""
        settings = SimulatorSettings(
            limits=False, seed=9, missing_share=0.2, inaccessible_share=0.1
        )
        sim = await harness.simulator(settings)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        wanted = asins(200)
        results = await broker.get_items(wanted)
        name = "demo-paapi" if protocol == "paapi5" else "demo"
        stats = sim.stats.accounts[name]
        assert stats.errors["ItemNotAccessible"] > 0
        assert stats.errors["InvalidParameterValue"] + stats.errors["ResourceNotFoundException"] > 0
        for result in results:
            expected = lookup(settings, US, result.asin).status
            if expected == "ok":
                assert result.status is Status.OK
            else:
                assert result.status is Status.NOT_FOUND
                assert result.error is not None
            assert result.attempts == 1
        assert 0 < _statuses(results)["not_found"] < 200
        assert stats.accepted == 20
        metrics = broker.metrics()
        assert (metrics.requests, metrics.retries) == (20, 0)


# -- B10 ----------------------------------------------------------------------------------------


class TestB10MissingOrExtraAsins:
    """B10: missing ASINs re-asked singly then not_found; extras and repeats ignored, logged."""

    async def test_missing_extra_and_duplicate_items(
        self, harness: Harness, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Items dropped, added and repeated at random, three never answered: one row each;
        the odd answers logged, at warning level once a minute."""
        caplog.set_level(logging.DEBUG, logger="broker")
        wanted = asins(150)
        never = set(wanted[3::50])  # three ASINs Amazon silently leaves out every time
        reference = await _reference(harness, wanted, seed=10)
        faults = FaultRates(drop_item=0.15, extra_item=0.15, duplicate_item=0.15)
        settings = SimulatorSettings(
            limits=False, seed=10, omitted_asins=frozenset(never), faults=faults
        )
        sim = await harness.simulator(settings)
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), transport=transport)
        with capture_logs() as logs:
            results = await broker.get_items(wanted)
        assert [r.asin for r in results] == wanted  # no extra rows, no duplicate rows
        injected = sim.stats.faults
        for kind in ("drop_item", "extra_item", "duplicate_item"):
            assert injected[kind] > 0, kind
        assert injected["omitted"] >= 9
        for result in results:
            if result.asin in never:
                assert result.status is Status.NOT_FOUND
                assert result.error is not None
                assert result.error.code == "MissingFromResponse"
                asked = [r for r in _api_requests(transport) if _asks_for(r, result.asin)]
                assert len(asked) == 3
                assert all(len(json.loads(r.body)["itemIds"]) == 1 for r in asked[1:])
            else:
                assert result.status is Status.OK
                assert result.item == reference[result.asin]
        unexpected = [e for e in logs if e["event"] == "broker.unexpected_items"]
        unrequested = [a for e in unexpected for a in e["unrequested"]]
        repeated = [a for e in unexpected for a in e["duplicated"]]
        assert len(unrequested) == injected["extra_item"]
        assert not set(unrequested) & set(wanted)
        assert len(repeated) == injected["duplicate_item"]
        assert set(repeated) <= set(wanted)
        assert all(e["request_id"] for e in unexpected)
        assert [e["log_level"] for e in unexpected].count("warning") == 1


# -- B11 ----------------------------------------------------------------------------------------


class TestB11TokenExpired:
    """B11: a 401 costs one single-flight refresh and one retry; repeated 401s stop with 77."""

    async def test_expired_tokens_cost_one_refresh_each(self, harness: Harness) -> None:
        """A quarter of fresh tokens answered TokenExpired: refreshed, retried once, all ok."""
        sim = await harness.simulator(
            SimulatorSettings(limits=False, seed=12, faults=FaultRates(expired_token=0.25))
        )
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), transport=transport)
        with capture_logs() as logs:
            results = await broker.get_items(asins(200))
        assert _statuses(results) == {"ok": 200}
        expired = sim.stats.faults["expired_token"]
        assert expired > 0
        refreshed = [e for e in logs if e["event"] == "broker.credentials_refreshed"]
        assert len(refreshed) == expired  # one retry per 401
        assert len(_api_requests(transport)) == 20 + expired
        # Single flight: requests failing with the same token share one new token.
        assert 2 <= len(_token_requests(transport)) <= 1 + expired
        assert "broker.key_disabled" not in [e["event"] for e in logs]

    async def test_a_token_the_server_forgot_costs_one_refresh(self, harness: Harness) -> None:
        """InvalidToken (a token revoked, or a server restarted since it was issued) is
        refreshed once and retried, as TokenExpired is: every ASIN ok, one new token."""
        sim = await harness.simulator(SimulatorSettings(limits=False))
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), transport=transport)
        assert _statuses(await broker.get_items(asins(10))) == {"ok": 10}
        sim.app[SIMULATOR_KEY].tokens = TokenStore()  # every token issued so far unknown
        with capture_logs() as logs:
            assert _statuses(await broker.get_items(asins(10, "B1"))) == {"ok": 10}
        assert len(_token_requests(transport)) == 2
        events = [e["event"] for e in logs]
        assert events.count("broker.credentials_refreshed") == 1
        assert "broker.key_disabled" not in [e["event"] for e in logs]

    async def test_repeated_401_stops_the_job_with_77(self, tmp_path: Path) -> None:
        """Every fresh token refused: broker run stops (77, "credentials rejected"), no loop."""
        settings = SimulatorSettings(limits=False, faults=FaultRates(expired_token=1.0))
        async with SimulatorServer(settings) as sim:
            config = make_config(sim.url)
            job, out = _job(tmp_path, 100), tmp_path / "out.jsonl"
            started = time.monotonic()
            with pytest.raises(NoUsableKeyError) as info:
                await run_job(config, _options(job, out))
            elapsed = time.monotonic() - started
            expired = sim.stats.faults["expired_token"]
        code, message = describe_failure(info.value)
        assert code == ExitCode.NO_PERMISSION == 77
        assert "credentials rejected" in message
        assert "TokenExpired" in message
        assert "demo-secret" not in message
        # No tight loop: each of the (at most 4) batches in flight got its refresh and gave up.
        assert 3 <= expired <= 4 * 3
        assert elapsed < 5.0
        assert _ledger_statuses(out) == {"pending": 100}


# -- B12 ----------------------------------------------------------------------------------------


def _b12_cases() -> list[Any]:
    no_store = account("store", "store-id", "store-secret", no_store=True)
    paapi_no_store = account(
        "pstore", "PSTOREKEY", "pstore-secret", protocol="paapi5", version="", no_store=True
    )
    return [
        pytest.param(
            "creators",
            no_store,
            key_doc("store", credential_id="store-id", env="STORE_SECRET"),
            "InvalidAssociate",
            id="creators-InvalidAssociate",
        ),
        pytest.param(
            "paapi5",
            paapi_no_store,
            paapi_key_doc("pstore", credential_id="PSTOREKEY", env="STORE_SECRET"),
            "InvalidAssociate",
            id="paapi-InvalidAssociate",
        ),
        pytest.param(
            "creators",
            None,
            key_doc(tags={US: "someone-elses-20"}),
            "InvalidPartnerTag",
            id="creators-InvalidPartnerTag",
        ),
    ]


class TestB12InvalidAssociate:
    """B12: InvalidAssociate / InvalidPartnerTag stop the job (77); rows stay pending."""

    @pytest.mark.parametrize(("protocol", "extra", "key", "code"), _b12_cases())
    async def test_fatal_config_error_leaves_rows_pending(
        self,
        tmp_path: Path,
        protocol: str,
        extra: Any,
        key: dict[str, object],
        code: str,
    ) -> None:
        """The key is refused for its store: exit 77 naming the code; a fixed config finishes."""
        secret = {"STORE_SECRET": "store-secret" if protocol == "creators" else "pstore-secret"}
        accounts = (extra,) if extra is not None else ()
        async with SimulatorServer(SimulatorSettings(limits=False, accounts=accounts)) as sim:
            config = make_config(sim.url, protocol=protocol, keys=[key], environ=secret)
            job, out = _job(tmp_path, 40), tmp_path / "out.jsonl"
            with pytest.raises(NoUsableKeyError) as info:
                await run_job(config, _options(job, out))
            refused = sum(stats.errors[code] for stats in sim.stats.accounts.values())
            assert 1 <= refused <= 4  # the first answers took the key out; no more were sent
            assert sim.stats.requests == refused
            exit_code, message = describe_failure(info.value)
            assert exit_code == ExitCode.NO_PERMISSION
            assert code in message
            assert _ledger_statuses(out) == {"pending": 40}
            fixed = make_config(sim.url, protocol=protocol)
            summary = await run_job(fixed, _options(job, out))
        assert summary.exit_code() == ExitCode.OK
        rows = _rows(out)
        assert sorted(r["line"] for r in rows) == list(range(1, 41))
        assert {r["status"] for r in rows} == {"ok"}


# -- B13 ----------------------------------------------------------------------------------------


class TestB13TokenEndpointDown:
    """B13: a failing or slow token endpoint pauses the key with backoff; nothing fails."""

    async def test_token_endpoint_errors_back_off(self, harness: Harness) -> None:
        """Seeded 503s from the token endpoint: growing pauses, readyz 503 meanwhile, all ok."""
        clock = FakeClock()
        settings = SimulatorSettings(limits=False, seed=5, faults=FaultRates(token_error=0.8))
        sim = await harness.simulator(settings)
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), clock=clock, transport=transport)
        started = clock.monotonic()
        with capture_logs() as logs, _Sampler(broker, clock, every_s=0.5) as sampler:
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(50)))
            await drive(clock, task, transport)
        assert _statuses(task.result()) == {"ok": 50}
        assert all(r.attempts == 1 for r in task.result())  # token trouble spends no attempt
        errors = sim.stats.faults["token_error"]
        assert errors >= 3
        failed = [e for e in logs if e["event"] == "broker.token_fetch_failed"]
        assert len(failed) == errors
        pauses = [e["pause_s"] for e in failed]
        assert pauses == [2.0 * 2**i for i in range(errors)]  # doubling while it keeps failing
        assert clock.monotonic() - started >= sum(pauses)
        assert len(_token_requests(transport)) == errors + 1
        down = [r for r in sampler.readiness if not r.ready]
        assert down
        assert all("token endpoint" in (r.reason or "") for r in down)
        assert "broker.key_disabled" not in [e["event"] for e in logs]

    async def test_slow_token_endpoint_times_out_and_recovers(self, harness: Harness) -> None:
        """A token endpoint stalling 30 s: the 0.3 s timeout ends each try; then all ok."""
        clock = FakeClock()
        faults = FaultRates(token_slow=0.6, hang_s=30.0)
        sim = await harness.simulator(SimulatorSettings(limits=False, seed=14, faults=faults))
        transport = await harness.transport(timeout_s=0.3)
        broker = await harness.broker(make_config(sim.url), clock=clock, transport=transport)
        started = time.monotonic()
        with capture_logs() as logs:
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(30)))
            await drive(clock, task, transport)
        assert _statuses(task.result()) == {"ok": 30}
        slow = sim.stats.faults["token_slow"]
        assert slow > 0
        timeouts = [
            e
            for e in logs
            if e["event"] == "broker.token_fetch_failed" and e["error"] == "RequestTimeout"
        ]
        assert len(timeouts) == slow
        assert time.monotonic() - started < slow * 0.3 + 3.0

    async def test_readyz_is_503_while_the_token_endpoint_is_down(self, harness: Harness) -> None:
        """With the token endpoint answering 503 only, /readyz says 503 and why; nothing fails."""
        clock = FakeClock()
        sim = await harness.simulator(
            SimulatorSettings(limits=False, faults=FaultRates(token_error=1.0))
        )
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), clock=clock, transport=transport)
        task = asyncio.get_running_loop().create_task(broker.get_items(asins(20)))
        with pytest.raises(TimeoutError, match="fake time limit"):
            await drive(clock, task, transport, limit_s=30.0)
        status, body = await _readyz(broker)
        assert status == 503
        assert "token endpoint: ServerError" in body["reason"]
        assert not task.done()
        assert broker.metrics().items_by_status == {}
        assert sim.stats.faults["token_error"] >= 3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- B14 ----------------------------------------------------------------------------------------


class TestB14ClockSkew:
    """B14: a wall clock jumping an hour changes neither pacing nor token expiry nor the day."""

    async def test_wall_jumps_change_neither_pacing_nor_tokens(self, harness: Harness) -> None:
        """Wall clock -1 h then +1 h mid-run: no 429, one token, sends still 1/TPS apart."""
        clock = FakeClock()
        settings = SimulatorSettings(accounts=(account("demo", "demo-id", "demo-secret", tps=5.0),))
        sim = await harness.simulator(settings, clock=clock)
        transport = await harness.transport()
        config = make_config(sim.url, keys=[key_doc(tps=5.0, tpd=1_000_000)])
        broker = await harness.broker(config, clock=clock, transport=transport)
        jumps = 0
        for offset in (0.0, -3600.0, 3600.0):
            clock.wall_offset = offset
            jumps += offset != 0.0
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(100, f"B{jumps}")))
            await drive(clock, task, transport)
            assert _statuses(task.result()) == {"ok": 100}
        assert jumps == 2
        stats = sim.stats.accounts["demo"]
        assert (stats.accepted, stats.throttled) == (30, 0)
        assert len(_token_requests(transport)) == 1
        accepted = list(stats.accepted_at)
        gaps = [b - a for a, b in itertools.pairwise(accepted)]
        assert min(gaps) >= 0.2 - 1e-6

    async def test_backward_jump_does_not_reopen_a_spent_day(self, harness: Harness) -> None:
        """Day spent at 23:30 UTC, wall back 1 h: still waiting; the next day starts at 00:00.
        (Two requests' worth of ASINs, one a day: 40 took four days of fake time, 65,000
        looks at the store, past the drive's 30 s of real time on a slow machine.)"""
        clock = FakeClock(epoch=datetime(2026, 5, 1, 23, 30, tzinfo=UTC))
        settings = SimulatorSettings(
            accounts=(account("demo", "demo-id", "demo-secret", tps=5.0, tpd=2),)
        )
        sim = await harness.simulator(settings, clock=clock)
        transport = await harness.transport()
        config = make_config(sim.url, keys=[key_doc(tps=5.0, tpd=2)])
        broker = await harness.broker(config, clock=clock, transport=transport)
        task = asyncio.get_running_loop().create_task(broker.get_items(asins(20)))
        with pytest.raises(TimeoutError, match="fake time limit"):
            await drive(clock, task, transport, limit_s=60.0)
        day_one = sim.stats.accounts["demo"].accepted
        assert day_one == 1  # TPD 2 less the 1 % guard
        clock.wall_offset = -3600.0  # 22:3x: "yesterday" again, as far as the wall knows
        with pytest.raises(TimeoutError, match="fake time limit"):
            await drive(clock, task, transport, limit_s=150.0)
        assert sim.stats.accounts["demo"].accepted == day_one  # the day was not handed out again
        (key,) = broker.metrics().keys
        assert key.until == "2026-05-02T00:00:00Z"
        await drive(clock, task, transport)
        assert _statuses(task.result()) == {"ok": 20}
        assert clock.utcnow() >= datetime(2026, 5, 2, tzinfo=UTC)

    async def test_paapi_signature_follows_the_server_clock(self, harness: Harness) -> None:
        """PA-API signs with the wall clock: after a +1 h jump, RequestExpired teaches the skew."""
        clock = FakeClock()
        # The server keeps its own (right) clock; only ours jumps.
        sim = await harness.simulator(FREE, clock=FakeClock())
        transport = await harness.transport()
        broker = await harness.broker(
            make_config(sim.url, protocol="paapi5"), clock=clock, transport=transport
        )
        results: list[ItemResult] = []
        for offset, prefix in ((0.0, "B0"), (3600.0, "B1")):
            clock.wall_offset = offset
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(20, prefix)))
            await drive(clock, task, transport)
            results += task.result()
        assert _statuses(results) == {"ok": 40}
        expired = sim.stats.accounts["demo-paapi"].errors["RequestExpired"]
        assert 1 <= expired <= 4
        authorizer = broker._keys[0].authorizer
        assert authorizer.clock_offset_s == pytest.approx(-3600.0, abs=2.0)  # type: ignore[attr-defined]


# -- B15 ----------------------------------------------------------------------------------------


class TestB15Outage:
    """B15: an unreachable endpoint pauses the work instead of failing it; exit 69 at the end."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_outage_budget_then_no_usable_key(self, harness: Harness, protocol: str) -> None:
        """Connection refused for 15 min: growing pauses, no attempt spent, then NoUsableKey."""
        clock = FakeClock()
        url = f"http://127.0.0.1:{_closed_port()}"
        transport = await harness.transport()
        broker = await harness.broker(
            make_config(url, protocol=protocol), clock=clock, transport=transport
        )
        started = clock.monotonic()
        with capture_logs() as logs, _Sampler(broker, clock, every_s=10.0) as sampler:
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(30)))
            with pytest.raises(NoUsableKeyError) as info:
                await drive(clock, task, transport)
        waited = clock.monotonic() - started
        assert 900.0 <= waited < 1000.0
        assert [f.code for f in info.value.failures] == [OUTAGE_CODE]
        code, message = describe_failure(info.value)
        assert code == ExitCode.UNAVAILABLE == 69
        assert "run again" in message
        unreachable = [e for e in logs if e["event"] == "broker.endpoint_unreachable"]
        tries = len(transport.requests)
        assert tries >= 10  # the outage was real and probed throughout
        assert tries <= 4 * (len(unreachable) + 1)  # at most one round per pause: no tight loop
        pauses = [e["pause_s"] for e in unreachable]
        assert max(pauses) >= 30.0  # grew towards the 60 s cap
        assert sum(pauses) <= 900.0 + 1.0  # and stopped at the budget
        assert broker.metrics().items_by_status == {}  # no lookup was failed
        down = [r for r in sampler.readiness if not r.ready]
        assert len(down) >= len(sampler.readiness) - 2
        assert any("endpoint unreachable" in (r.reason or "") for r in down)

    async def test_endpoint_back_within_budget_loses_nothing(self, harness: Harness) -> None:
        """Refused for 11 min, then the simulator returns on that port: nothing lost or aged."""
        clock = FakeClock()
        port = _closed_port()
        transport = await harness.transport()
        config = make_config(
            f"http://127.0.0.1:{port}",
            keys=[key_doc(max_in_flight=1)],
            retry={"max_attempts": 20, "max_age_s": 600.0},
        )
        broker = await harness.broker(config, clock=clock, transport=transport)
        task = asyncio.get_running_loop().create_task(broker.get_items(asins(50)))
        with pytest.raises(TimeoutError, match="fake time limit"):
            await drive(clock, task, transport, limit_s=660.0)
        refused = len(transport.requests)
        assert refused >= 10
        status, body = await _readyz(broker)
        assert status == 503
        assert "endpoint unreachable" in body["reason"]
        # Back, but flaky: a batch's first 5xx after the outage must not find it "too old"
        # (max_age_s is 10 min, the outage 11) nor out of attempts.
        settings = SimulatorSettings(limits=False, seed=16, faults=FaultRates(error_503=0.3))
        async with SimulatorServer(settings, port=port) as sim:
            await drive(clock, task, transport)
            results = task.result()
            assert _statuses(results) == {"ok": 50}
            assert sim.stats.faults["error_503"] > 0
            retried = [r for r in results if r.attempts > 1]
            assert retried
            # Attempts count what reached Amazon: 1 + its 503s, none of the refused tries.
            assert sum(r.attempts for r in results) == 50 + 10 * sim.stats.faults["error_503"]
        status, _ = await _readyz(broker)
        assert status == 200

    def test_broker_run_exits_69_and_resumes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """broker run against a dead endpoint exits 69 with rows pending; a rerun completes."""
        monkeypatch.setenv("ASINB_DEMO_SECRET", "demo-secret")
        port = _closed_port()
        config = tmp_path / "config.toml"
        key = (
            '[[keys]]\nname = "demo"\ncredential_id = "demo-id"\nversion = "3.1"\n'
            'credential_secret_env = "ASINB_DEMO_SECRET"\n'
            'partner_tags = { "www.amazon.com" = "demo-20" }\ntps = 50.0\ntpd = 0\n'
        )
        body = key + '\n[retry]\noutage_budget_s = 0.5\n\n[log]\nformat = "json"\n'
        config.write_text(f'[api]\nendpoint = "http://127.0.0.1:{port}"\n' + body)
        job, out = _job(tmp_path, 30), tmp_path / "out.jsonl"
        argv = ["run", str(job), "--config", str(config), "--out", str(out), "--progress", "none"]
        started = time.monotonic()
        assert cli.main(argv) == ExitCode.UNAVAILABLE
        assert time.monotonic() - started < 10.0
        assert _ledger_statuses(out) == {"pending": 30}
        assert _rows(out) == []
        config.write_text('[api]\nendpoint = "simulator"\n' + body)  # the network is back
        assert cli.main(argv) == ExitCode.OK
        rows = _rows(out)
        assert sorted(r["line"] for r in rows) == list(range(1, 31))
        assert {r["status"] for r in rows} == {"ok"}


# -- B16 ----------------------------------------------------------------------------------------


class TestB16OversizedBody:
    """B16: a 50 MB body is refused at the read cap, without holding it in memory."""

    @pytest.mark.parametrize("cap", [1 << 20, 8 << 20])
    async def test_fifty_megabytes_are_capped(self, harness: Harness, cap: int) -> None:
        """A streamed 50 MiB answer: BodyTooLarge at the cap, retried, failed; memory flat."""
        faults = FaultRates(oversized=1.0, oversized_bytes=50 << 20)
        sim = await harness.simulator(SimulatorSettings(limits=False, faults=faults))
        config = make_config(sim.url, engine={"max_body_bytes": cap}, retry={"max_attempts": 2})
        broker = await harness.broker(config)
        tracemalloc.start()
        try:
            results = await broker.get_items(asins(10))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert _statuses(results) == {"failed": 10}
        for result in results:
            assert result.error is not None
            assert result.error.code == "TransportError"
            assert f"over the {cap}-byte cap" in result.error.message
        assert sim.stats.faults["oversized"] == 2
        assert broker.metrics().transport_errors == 2
        assert peak < 3 * cap + (4 << 20)  # about the cap, never the 50 MiB on offer

    async def test_declared_length_over_the_cap_is_refused_unread(self) -> None:
        """A Content-Length of 50 MiB is refused on the headers, before any body is read."""
        served = 0

        async def huge(request: web.Request) -> web.StreamResponse:
            nonlocal served
            served += 1
            response = web.StreamResponse()
            response.content_length = 50 << 20
            await response.prepare(request)
            await response.write(b"{" + b" " * 1024)
            await asyncio.sleep(5.0)  # never sends the rest: the client must not wait for it
            return response

        app = web.Application()
        app.router.add_post("/paapi5/getitems", huge)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            async with AiohttpTransport(max_body_bytes=1 << 20, timeout_s=2.0) as transport:
                started = time.monotonic()
                with pytest.raises(BodyTooLarge, match="52428800 bytes"):
                    await transport.send(
                        HttpRequest("POST", f"http://127.0.0.1:{port}/paapi5/getitems", {}, b"{}")
                    )
                assert time.monotonic() - started < 1.0
        finally:
            await runner.cleanup()
        assert served == 1
