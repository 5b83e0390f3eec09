"""Seeded fault injection and latency: each fault really happens, is counted, and reproduces."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import aiohttp
import pytest

from broker.errors import ConfigError
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


#: The partner fields every PA-API GetItems carries.
PAAPI_TAG = {"PartnerTag": "demo-20", "PartnerType": "Associates"}


def _faulty(**rates: float) -> SimulatorSettings:
    return SimulatorSettings(limits=False, faults=FaultRates(**rates))


async def _creators(client: SimulatorClient) -> SimResponse:
    return await client.creators("getItems", BODY, token=await client.token())


async def _asleep_or_done(clock: FakeClock, call: asyncio.Future[SimResponse]) -> None:
    """Wait (real time, up to 10 s: a loaded machine is slow) until the server's handler
    sleeps on the fake clock or the call has its answer."""
    for _ in range(2000):
        if call.done() or clock.sleepers:
            return
        await asyncio.sleep(0.005)


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
    paapi = await client.paapi("GetItems", {"ItemIds": ["B000TEST01"], **PAAPI_TAG})
    assert paapi.status == status
    assert sim.stats.faults[kind] == 2
    assert sim.stats.accounts["demo"].accepted == 1


async def test_paapi_internal_failure_envelope(start: Start) -> None:
    """PA-API's 500 uses the error envelope with InternalFailure."""
    client, _ = await start(_faulty(error_500=1.0))
    paapi = await client.paapi("GetItems", {"ItemIds": ["B000TEST01"], **PAAPI_TAG})
    assert paapi.json()["Errors"][0]["Code"] == "InternalFailure"


async def test_paapi_service_unavailable_envelope(start: Start) -> None:
    """PA-API's 503 uses the error envelope with ServiceUnavailable, as Amazon's does, so a
    client reading the envelope (the SDK) sees a retryable error, not an unreadable body."""
    client, _ = await start(_faulty(error_503=1.0))
    paapi = await client.paapi("GetItems", {"ItemIds": ["B000TEST01"], **PAAPI_TAG})
    assert paapi.status == 503
    assert paapi.json() == {
        "__type": "com.amazon.paapi5#ServiceUnavailableException",
        "Errors": [
            {
                "Code": "ServiceUnavailable",
                "Message": "The service is currently unavailable. Please try again later.",
            }
        ],
    }


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


async def test_a_client_gone_before_its_body_came_is_not_an_error(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes before sending the whole body (a broker closed mid-request)
    leaves the simulator nothing to report: no "Error handling request" traceback."""
    client, _ = await start(SimulatorSettings(limits=False))
    token = await client.token()
    host, port = client._base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            "POST /catalog/v1/getItems HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {token}, Version 3.1\r\n"
            "x-marketplace: www.amazon.com\r\n"
            "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
        ).encode()
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await writer.wait_closed()
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        await asyncio.sleep(0.3)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    del reader


async def test_hanging_response_ends_at_shutdown() -> None:
    """The hang fault never completes the body; shutting the server down ends it promptly."""
    clock = FakeClock()
    async with running_simulator(_faulty(hang=1.0), clock=clock) as (client, sim):
        token = await client.token()
        call = asyncio.ensure_future(client.creators("getItems", BODY, token=token))
        await _asleep_or_done(clock, call)
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
        await _asleep_or_done(clock, call)
        assert clock.sleepers == 1
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
    await _asleep_or_done(clock, call)
    assert clock.sleepers == 1
    assert sim.stats.accounts["demo"].accepted == 0
    await clock.advance(0.04)
    await asyncio.sleep(0.02)
    await settle()
    assert [t - started for t in sim.stats.accounts["demo"].accepted_at] == [pytest.approx(0.04)]
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


# -- switches for the fault matrix (reliability.md 3.3 B4, B7, B8, B10, B13, B16) -----------

BATCH = {"partnerTag": "demo-20", "itemIds": ["B000TEST01", "B000TEST02", "B000TEST03"]}
PAAPI_BATCH = {**PAAPI_TAG, "ItemIds": ["B000TEST01", "B000TEST02", "B000TEST03"]}


async def test_disconnect_before_any_byte(start: Start) -> None:
    """The disconnect fault closes the connection before the status line, on both APIs."""
    client, sim = await start(_faulty(disconnect=1.0))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await _creators(client)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.paapi("GetItems", PAAPI_BATCH)
    assert sim.stats.faults["disconnect"] == 2


async def test_html_ok_is_a_200_html_page(start: Start) -> None:
    """The html_ok fault answers 200 with a text/html page instead of JSON, on both APIs."""
    client, sim = await start(_faulty(html_ok=1.0))
    for response in (await _creators(client), await client.paapi("GetItems", PAAPI_BATCH)):
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/html")
        assert response.text.startswith("<html>")
    assert sim.stats.faults["html_ok"] == 2


def _shape(body: dict[str, object], container: str, items: str, asin: str) -> str:
    """Which wrong shape ``body`` has (asserting it has one)."""
    result = body.get(container)
    if result is None:
        return "no container"
    assert isinstance(result, dict)
    if isinstance(result[items], dict):
        return "items not a list"
    assert asin not in result[items][0]
    return "item without asin"


async def test_bad_shape_variants(start: Start) -> None:
    """bad_shape answers 200 JSON in three wrong shapes, drawn from the seed, on both APIs."""
    client, sim = await start(_faulty(bad_shape=1.0))
    token = await client.token()
    creators, paapi = set(), set()
    for _ in range(12):
        response = await client.creators("getItems", BATCH, token=token)
        assert response.status == 200
        creators.add(_shape(response.json(), "itemsResult", "items", "asin"))
        response = await client.paapi("GetItems", PAAPI_BATCH)
        assert response.status == 200
        paapi.add(_shape(response.json(), "ItemsResult", "Items", "ASIN"))
    assert creators == paapi == {"no container", "items not a list", "item without asin"}
    assert sim.stats.faults["bad_shape"] == 24


async def test_oversized_body_is_streamed_without_length(start: Start) -> None:
    """oversized streams a chunked 200 JSON body of oversized_bytes, with no Content-Length."""
    settings = SimulatorSettings(
        limits=False, faults=FaultRates(oversized=1.0, oversized_bytes=300_000)
    )
    client, sim = await start(settings)
    response = await _creators(client)
    assert response.status == 200
    assert "content-length" not in response.headers
    assert response.headers["transfer-encoding"] == "chunked"
    assert len(response.text) == 300_000
    assert json.loads(response.text)["itemsResult"] == {"items": []}
    assert sim.stats.faults["oversized"] == 1


@pytest.mark.parametrize("protocol", ["creators", "paapi5"])
async def test_item_faults_alter_the_item_list(start: Start, protocol: str) -> None:
    """drop_item, extra_item and duplicate_item remove, add or repeat one item of GetItems."""
    seen: dict[str, list[str]] = {}
    for kind in ("drop_item", "extra_item", "duplicate_item"):
        client, sim = await start(_faulty(**{kind: 1.0}))
        if protocol == "creators":
            body = (await client.creators("getItems", BATCH, token=await client.token())).json()
            seen[kind] = [item["asin"] for item in body["itemsResult"]["items"]]
        else:
            body = (await client.paapi("GetItems", PAAPI_BATCH)).json()
            seen[kind] = [item["ASIN"] for item in body["ItemsResult"]["Items"]]
        assert sim.stats.faults[kind] == 1
    asked = set(BATCH["itemIds"])
    assert len(seen["drop_item"]) == 2
    assert set(seen["drop_item"]) < asked
    assert len(seen["extra_item"]) == 4
    assert set(seen["extra_item"]) > asked
    assert len(seen["duplicate_item"]) == 4
    assert set(seen["duplicate_item"]) == asked


async def test_item_faults_count_only_when_applied(start: Start) -> None:
    """An item fault drawn for an answer with no items changes nothing and is not counted."""
    settings = SimulatorSettings(limits=False, missing_share=1.0, faults=FaultRates(drop_item=1.0))
    client, sim = await start(settings)
    response = await client.paapi("GetItems", PAAPI_BATCH)
    assert response.status == 200
    assert "ItemsResult" not in response.json()
    assert sim.stats.faults["drop_item"] == 0


async def test_omitted_asins_are_left_out_silently(start: Start) -> None:
    """omitted_asins never appear in an answer and get no error entry; each is counted."""
    settings = SimulatorSettings.from_mapping({"limits": False, "omitted_asins": ["b000test02"]})
    assert settings.omitted_asins == frozenset({"B000TEST02"})
    client, sim = await start(settings)
    token = await client.token()
    body = (await client.creators("getItems", BATCH, token=token)).json()
    assert sorted(i["asin"] for i in body["itemsResult"]["items"]) == ["B000TEST01", "B000TEST03"]
    assert "errors" not in body
    alone = await client.creators(
        "getItems", {"partnerTag": "demo-20", "itemIds": ["B000TEST02"]}, token=token
    )
    assert (alone.status, alone.json()) == (200, {"itemsResult": {"items": []}})
    paapi = await client.paapi("GetItems", {**PAAPI_TAG, "ItemIds": ["B000TEST02"]})
    assert (paapi.status, paapi.json()) == (200, {"ItemsResult": {"Items": []}})
    assert sim.stats.faults["omitted"] == 3


async def test_token_error_and_slow_token_endpoint() -> None:
    """token_error answers 503 temporarily_unavailable; token_slow answers after hang_s."""
    clock = FakeClock()
    settings = SimulatorSettings(
        limits=False, faults=FaultRates(token_error=0.5, token_slow=0.5, hang_s=7.0)
    )
    async with running_simulator(settings, clock=clock) as (client, sim):
        outcomes = []
        for _ in range(8):
            call = asyncio.ensure_future(client.token_response("demo-id", "demo-secret"))
            await _asleep_or_done(clock, call)
            if not call.done():
                assert clock.sleepers == 1
                await clock.advance(6.9)
                await asyncio.sleep(0.01)
                assert not call.done()
                await clock.advance(0.1)
            response = await asyncio.wait_for(call, 2.0)
            outcomes.append(response.status)
            if response.status == 503:
                assert response.json()["error"] == "temporarily_unavailable"
        assert set(outcomes) == {200, 503}
        assert sim.stats.faults["token_error"] == outcomes.count(503)
        assert sim.stats.faults["token_slow"] == outcomes.count(200)


async def test_slow_token_left_by_its_client_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client giving up on a token_slow answer (its timeout) is no server error: nothing
    is logged at ERROR, so a broker run that handled the fault shows no traceback."""
    clock = FakeClock()
    settings = SimulatorSettings(limits=False, faults=FaultRates(token_slow=1.0, hang_s=7.0))
    with caplog.at_level("ERROR"):
        async with running_simulator(settings, clock=clock) as (client, sim):
            call = asyncio.ensure_future(client.token_response("demo-id", "demo-secret"))
            await _asleep_or_done(clock, call)
            assert clock.sleepers == 1
            call.cancel()  # the client's timeout: its connection closes mid-request
            await asyncio.gather(call, return_exceptions=True)
            await asyncio.sleep(0.05)
            await clock.advance(7.0)
            for _ in range(20):
                await asyncio.sleep(0.005)
            assert sim.stats.faults["token_slow"] == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_new_fault_settings_parse_and_validate() -> None:
    """The new switches parse from [simulator.faults]; rates are bounded like the others."""
    settings = SimulatorSettings.from_mapping(
        {
            "faults": {
                "disconnect": 0.1,
                "html_ok": 0.1,
                "bad_shape": 0.1,
                "oversized": 0.1,
                "drop_item": 0.1,
                "extra_item": 0.1,
                "duplicate_item": 0.1,
                "token_error": 0.2,
                "token_slow": 0.3,
                "oversized_bytes": 1024,
            }
        }
    )
    assert settings.faults.oversized_bytes == 1024
    assert settings.faults.token_slow == 0.3
    with pytest.raises(ConfigError, match=r"simulator\.faults.*more than 1"):
        SimulatorSettings.from_mapping({"faults": {"error_500": 0.5, "bad_shape": 0.6}})
    with pytest.raises(ConfigError, match=r"token_error \+ token_slow"):
        SimulatorSettings.from_mapping({"faults": {"token_error": 0.6, "token_slow": 0.6}})
    with pytest.raises(ConfigError, match=r"simulator\.faults\.oversized_bytes"):
        SimulatorSettings.from_mapping({"faults": {"oversized_bytes": 0}})
    with pytest.raises(ConfigError, match=r"simulator\.omitted_asins"):
        SimulatorSettings.from_mapping({"omitted_asins": "B000TEST01"})
