"""Seeded fault injection and latency: each fault really happens, is counted, and reproduces."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import aiohttp
import pytest

from broker.simulator.settings import FaultRates, LatencyProfile, SimulatorSettings
from broker.simulator.state import Simulator
from broker.simulator.testclient import SimResponse, SimulatorClient, running_simulator
from broker.testing import FakeClock, settle

Start = Callable[..., Awaitable[tuple[SimulatorClient, Simulator]]]
BODY = {"partnerTag": "demo-20", "itemIds": ["B000TEST01"]}


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start simulators with the given settings; each call returns a client and the state."""
    async with AsyncExitStack() as stack:

        async def factory(
            settings: SimulatorSettings, *, clock: FakeClock | None = None
        ) -> tuple[SimulatorClient, Simulator]:
            return await stack.enter_async_context(running_simulator(settings, clock=clock))

        yield factory


def _faulty(**rates: float) -> SimulatorSettings:
    return SimulatorSettings(limits=False, faults=FaultRates(**rates))


async def _creators(client: SimulatorClient) -> SimResponse:
    return await client.creators("getItems", BODY, token=await client.token())


@pytest.mark.parametrize(
    ("kind", "status", "creators_body"),
    [
        (
            "error_500",
            500,
            {
                "type": "InternalServerException",
                "message": "An unexpected error occurred while processing your request.",
            },
        ),
        ("error_502", 502, {"message": "Bad Gateway"}),
        ("error_503", 503, {"message": "Service Unavailable"}),
        ("error_504", 504, {"message": "Endpoint request timed out"}),
    ],
)
async def test_server_errors(
    start: Start, kind: str, status: int, creators_body: dict[str, str]
) -> None:
    """A 5xx fault answers with that status on both APIs and is counted."""
    client, sim = await start(_faulty(**{kind: 1.0}))
    response = await _creators(client)
    assert response.status == status
    assert response.json() == creators_body
    paapi = await client.paapi("GetItems", {"ItemIds": ["B000TEST01"], "PartnerTag": "demo-20"})
    assert paapi.status == status
    assert sim.stats.faults[kind] == 2
    assert sim.stats.accounts["demo"].accepted == 1


async def test_paapi_internal_failure_envelope(start: Start) -> None:
    """PA-API's 500 uses the error envelope with InternalFailure."""
    client, _ = await start(_faulty(error_500=1.0))
    paapi = await client.paapi("GetItems", {"ItemIds": ["B000TEST01"], "PartnerTag": "demo-20"})
    assert paapi.json()["Errors"][0]["Code"] == "InternalFailure"


async def test_html_error_page(start: Start) -> None:
    """The html fault answers a 502 or 503 text/html page instead of JSON."""
    client, sim = await start(_faulty(html=1.0))
    response = await _creators(client)
    assert response.status in (502, 503)
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.startswith("<html>")
    assert sim.stats.faults["html"] == 1


async def test_truncated_json(start: Start) -> None:
    """The truncated fault sends a complete 200 whose JSON body is cut short."""
    client, sim = await start(_faulty(truncated=1.0))
    response = await _creators(client)
    assert response.status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)
    assert sim.stats.faults["truncated"] == 1


async def test_connection_reset_mid_body(start: Start) -> None:
    """The reset fault sends the headers and part of the body, then drops the connection."""
    client, sim = await start(_faulty(reset=1.0))
    with pytest.raises(aiohttp.ClientPayloadError):
        await _creators(client)
    assert sim.stats.faults["reset"] == 1


async def test_hanging_response_ends_at_shutdown() -> None:
    """The hang fault never completes the body; shutting the server down ends it promptly."""
    clock = FakeClock()
    async with running_simulator(_faulty(hang=1.0), clock=clock) as (client, sim):
        token = await client.token()
        call = asyncio.ensure_future(client.creators("getItems", BODY, token=token))
        for _ in range(200):
            await asyncio.sleep(0.005)
            if clock.sleepers:
                break
        assert clock.sleepers == 1
        assert not call.done()
        assert sim.stats.faults["hang"] == 1
        sim.stopping.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(call, 2.0)


async def test_hang_is_bounded_by_hang_s() -> None:
    """A hanging body is dropped after hang_s on the simulator's clock."""
    clock = FakeClock()
    settings = SimulatorSettings(limits=False, faults=FaultRates(hang=1.0, hang_s=5.0))
    async with running_simulator(settings, clock=clock) as (client, _):
        token = await client.token()
        call = asyncio.ensure_future(client.creators("getItems", BODY, token=token))
        for _ in range(200):
            await asyncio.sleep(0.005)
            if clock.sleepers:
                break
        await clock.advance(5.0)
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(call, 2.0)


async def test_faults_are_reproducible(start: Start) -> None:
    """The same seed injects the same faults into the same request sequence."""
    runs = []
    for _ in range(2):
        client, _ = await start(_faulty(error_500=0.3, error_503=0.2))
        token = await client.token()
        statuses = [
            (await client.creators("getItems", BODY, token=token)).status for _ in range(30)
        ]
        runs.append(statuses)
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500, 503}
    client, _ = await start(
        SimulatorSettings(seed=99, limits=False, faults=FaultRates(error_500=0.3, error_503=0.2))
    )
    token = await client.token()
    other = [(await client.creators("getItems", BODY, token=token)).status for _ in range(30)]
    assert other != runs[0]


async def test_latency_before_and_after_the_quota_check(start: Start) -> None:
    """Latency is spent once before the quota check and once after it, on the sim clock."""
    clock = FakeClock()
    settings = SimulatorSettings(latency=LatencyProfile(fixed_ms=40.0))
    client, sim = await start(settings, clock=clock)
    token = await client.token()
    started = clock.monotonic()
    call = asyncio.ensure_future(client.creators("getItems", BODY, token=token))
    for _ in range(200):
        await asyncio.sleep(0.005)
        if clock.sleepers:
            break
    assert sim.stats.accounts["demo"].accepted == 0
    await clock.advance(0.04)
    await asyncio.sleep(0.02)
    await settle()
    assert list(sim.stats.accounts["demo"].accepted_at) == [pytest.approx(started + 0.04)]
    assert not call.done()
    await clock.advance(0.04)
    response = await asyncio.wait_for(call, 2.0)
    assert response.status == 200


def test_exponential_latency_has_the_configured_mean() -> None:
    """The latency draw is fixed_ms plus an exponential of mean exp_mean_ms."""
    from broker.simulator.faults import FaultInjector

    injector = FaultInjector(FaultRates(), LatencyProfile(fixed_ms=40, exp_mean_ms=10), seed=1)
    draws = [injector.latency_s() for _ in range(20_000)]
    assert min(draws) >= 0.040
    assert sum(draws) / len(draws) == pytest.approx(0.050, rel=0.03)
