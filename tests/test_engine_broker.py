"""The broker end to end against the simulator: every healthy ASIN ok, none lost or twice."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

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

from broker.client import Broker
from broker.engine.shared_limiter import SharedKeyLimiter
from broker.errors import ApiError, BrokerClosedError, NoUsableKeyError, StateUnavailableError
from broker.models import ItemResult, Query, Status
from broker.simulator import oauth as sim_oauth
from broker.simulator.app import SIMULATOR_KEY
from broker.simulator.catalog import lookup
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import FaultRates, SimulatorSettings
from broker.testing import FakeClock

if TYPE_CHECKING:
    from broker.api.base import HttpRequest, RawResponse
    from broker.config import BrokerConfig

REPO = Path(__file__).resolve().parent.parent
FREE = SimulatorSettings(limits=False)


async def _not_found(request: web.Request) -> web.Response:
    """A path of a server that is no token endpoint."""
    return web.Response(status=404, text="404: Not Found")


def _two_families(url: str, token_path: str) -> BrokerConfig:
    """Two keys of the simulator at ``url``, a 3.x (Login with Amazon) and a 2.x (Cognito),
    whose tokens come from ``url + token_path``."""
    cognito = key_doc("cognito", credential_id="demo-v2-id", env="ASINB_V2_SECRET", version="2.1")
    return make_config(
        url,
        keys=[key_doc("lwa"), cognito],
        api={"protocol": "creators", "endpoint": url, "token_endpoint": url + token_path},
    )


def _statuses(results: list[ItemResult]) -> Counter[str]:
    return Counter(result.status.value for result in results)


def _assert_each_once(results: list[ItemResult], expected: list[str]) -> None:
    """One result per distinct input, in input order, none twice."""
    assert [result.asin for result in results] == expected
    assert len({result.asin for result in results}) == len(expected)


class TestHealthy:
    """A healthy key and simulator."""

    async def test_a_linger_of_zero_still_sends_ten_asins_a_request(self, harness: Harness) -> None:
        """engine.linger_s = 0 (send a partial batch at once) still batches a call's ASINs:
        it turned batching off, and one get_items of 10 ASINs spent 10 requests."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, engine={"linger_s": 0.0}))
        results = await broker.get_items(asins(25))
        assert _statuses(results) == {"ok": 25}
        assert sim.stats.accounts["demo"].accepted == 3
        assert broker.metrics().requests == 3

    async def test_all_ok_each_once(self, harness: Harness) -> None:
        """200 ASINs: all ok, each served once, in full batches of 10."""
        sim = await harness.simulator(FREE)
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), transport=transport)
        wanted = asins(200)
        results = await broker.get_items(wanted)
        _assert_each_once(results, wanted)
        assert _statuses(results) == {"ok": 200}
        stats = sim.stats.accounts["demo"]
        assert (stats.accepted, stats.items_served) == (20, 200)
        first = results[0]
        assert first.key == "demo"
        assert first.attempts == 1
        assert first.marketplace == US
        assert first.item is not None
        assert "itemInfo" in first.item
        assert first.summary is not None
        assert first.summary.title
        assert first.summary.detail_url
        assert "tag=demo-20" in first.summary.detail_url
        assert first.fetched_at is not None
        assert first.error is None
        metrics = broker.metrics()
        assert metrics.requests == 20
        assert metrics.responses_by_status == {200: 20}
        assert metrics.items_by_status == {"ok": 200}
        assert metrics.latency_count == 20
        assert metrics.outstanding_lookups == 0
        (key,) = metrics.keys
        assert (key.name, key.state, key.sent, key.throttled) == ("demo", "active", 20, 0)
        await asyncio.sleep(0)  # the last send's task finishes
        assert broker.metrics().keys[0].in_flight == 0
        assert key.daily_spent == 20

    async def test_from_config_starts_embedded_simulator(self) -> None:
        """The shipped config.toml works with no environment: it starts its own simulator."""
        async with Broker.from_config(REPO / "config.toml", environ={}) as broker:
            assert broker.simulator_url is not None
            assert broker.simulator_url.startswith("http://127.0.0.1:")
            results = await broker.get_items(asins(12))
        assert _statuses(results) == {"ok": 12}

    async def test_closing_waits_for_no_answer_the_embedded_simulator_still_owes(self) -> None:
        """Closed while its request sleeps out the simulator's 3-s latency (a second Ctrl-C),
        the broker closes at once: its embedded simulator waited 2 s for that handler, and
        more, for a grace of 0 is no limit at all to aiohttp."""
        from conftest import embedded_document

        from broker.config import parse_config

        document = embedded_document(simulator={"latency": {"fixed_ms": 3000}})
        async with Broker(parse_config(document, environ={})) as broker:
            asking = asyncio.ensure_future(broker.get_items(asins(1)))
            await asyncio.sleep(0.3)  # the request waits in the simulator
            asking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asking
            closing = asyncio.get_running_loop().time()
        assert asyncio.get_running_loop().time() - closing < 1.0

    def test_repr_of_a_broker_not_opened_yet_names_its_keys(self) -> None:
        """Before it is opened, a Broker says so and names its config's keys (not "closed",
        no keys)."""
        config = make_config("http://127.0.0.1:1", keys=[key_doc(tps=5.0)])
        assert repr(Broker(config)) == "Broker(not opened, keys=['demo'])"

    async def test_v2_credentials(self, harness: Harness) -> None:
        """A 2.x (Cognito) key uses its token endpoint and sends ', Version 2.1'."""
        sim = await harness.simulator(FREE)
        transport = await harness.transport()
        config = make_config(
            sim.url,
            keys=[key_doc("v2", credential_id="demo-v2-id", env="ASINB_V2_SECRET", version="2.1")],
        )
        broker = await harness.broker(config, transport=transport)
        assert _statuses(await broker.get_items(asins(15))) == {"ok": 15}
        assert transport.count("/oauth2/token") == 1
        api = [r for r in transport.requests if "/catalog/" in r.url]
        assert all(r.headers["Authorization"].endswith(", Version 2.1") for r in api)

    async def test_paapi_protocol(self, harness: Harness) -> None:
        """PA-API 5.0 with the demo access key (no version) works; items are PascalCase."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, protocol="paapi5"))
        wanted = asins(45)
        results = await broker.get_items(wanted)
        _assert_each_once(results, wanted)
        assert _statuses(results) == {"ok": 45}
        assert results[0].item is not None
        assert results[0].item["ASIN"] == wanted[0]
        assert "ItemInfo" in results[0].item
        assert sim.stats.accounts["demo-paapi"].accepted == 5


class TestFailedOpen:
    """A broker whose ``async with`` failed says so, wherever it is used next."""

    async def test_calls_and_a_second_open_say_the_open_failed(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """After a failed open, a call, a second ``async with`` and the repr all say the
        open failed: they said "use 'async with'", "entered only once" and "closed"."""
        sim = await harness.simulator(FREE)
        (tmp_path / "afile").write_text("")
        config = make_config(sim.url, state={"path": str(tmp_path / "afile" / "keys.sqlite3")})
        broker = Broker(config)
        with pytest.raises(OSError, match="not a directory"):
            async with broker:
                pass
        assert "failed to open" in repr(broker)
        with pytest.raises(RuntimeError, match=r"failed to open .* make a new Broker"):
            await broker.get_item("B000000001")
        with pytest.raises(RuntimeError, match=r"failed to open .* make a new Broker"):
            async with broker:
                pass
        await broker.aclose()  # a finally or a cleanup hook closes it
        with pytest.raises(RuntimeError, match=r"failed to open .* make a new Broker"):
            await broker.get_item("B000000001")

    def test_a_key_unknown_to_the_embedded_simulator_is_refused_when_built(self) -> None:
        """A key the embedded simulator has no account for is refused by Broker(...), as a
        bad [simulator] table is: it was refused only by ``async with``."""
        from broker.config import config_from_dict
        from broker.errors import ConfigError

        document = {
            "api": {"endpoint": "simulator"},
            "keys": [
                {
                    "name": "d",
                    "credential_id": "nobody",
                    "version": "3.1",
                    "partner_tags": {"US": "demo-20"},
                }
            ],
        }
        config = config_from_dict(document, secrets={"d": "x"})
        with pytest.raises(ConfigError, match="'nobody' is no creators account"):
            Broker(config)


class TestCallers:
    """Dedup across callers, streams, validation, cancellation."""

    async def test_dedup_across_concurrent_callers(self, harness: Harness) -> None:
        """Two callers with overlapping ASINs: one request slot per distinct ASIN."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        first, second = asins(60), asins(100)[30:]
        one, two = await asyncio.gather(broker.get_items(first), broker.get_items(second))
        _assert_each_once(one, first)
        _assert_each_once(two, second)
        assert _statuses(one + two) == {"ok": 130}
        assert sim.stats.accounts["demo"].items_served == 100
        assert broker.metrics().items_by_status == {"ok": 100}

    async def test_duplicates_in_one_call(self, harness: Harness) -> None:
        """Repeated and differently-cased ids in one call give one result each."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        results = await broker.get_items(
            ["B000000001", "b000000001", " B000000001 ", Query("B000000002"), "B000000002"]
        )
        assert [r.asin for r in results] == ["B000000001", "B000000002"]
        assert sim.stats.accounts["demo"].items_served == 2

    async def test_tagged_queries_each_get_their_result(self, harness: Harness) -> None:
        """Queries with tags are each answered with their own tag, duplicates or not; the
        lookup is still shared (one item served)."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        results = await broker.get_items(
            [Query("B000000001", tag=1), Query("b000000001", tag=2), "B000000001"]
        )
        assert [(r.asin, r.query.tag if r.query else None) for r in results] == [
            ("B000000001", 1),
            ("B000000001", 2),
            ("B000000001", None),
        ]
        assert sim.stats.accounts["demo"].items_served == 1

    async def test_cancelled_caller_keeps_shared_lookups(self, harness: Harness) -> None:
        """Cancelling one caller does not cancel lookups another caller still waits for."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, keys=[key_doc(tps=20.0)]))
        doomed = asyncio.get_running_loop().create_task(broker.get_items(asins(40)))
        survivor = asyncio.get_running_loop().create_task(broker.get_items(asins(40)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        results = await survivor
        assert _statuses(results) == {"ok": 40}
        with pytest.raises(asyncio.CancelledError):
            await doomed

    async def test_invalid_ids_never_sent(self, harness: Harness) -> None:
        """Malformed ids are answered invalid at once and never reach Amazon."""
        sim = await harness.simulator(FREE)
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), transport=transport)
        results = await broker.get_items(
            ["B000000001", "not-an-asin", "B00000001", "", "9791186701072", "B000000002"]
        )
        by_asin = {r.asin: r for r in results}
        assert by_asin["B000000001"].ok
        assert by_asin["B000000002"].ok
        for bad in ("not-an-asin", "B00000001", "", "9791186701072"):
            result = by_asin[bad]
            assert result.status is Status.INVALID
            assert result.error is not None
            assert result.error.code == "InvalidAsin"
            assert result.error.remedy
            assert result.attempts == 0
            assert result.key is None
        sent = b"".join(r.body for r in transport.requests)
        assert b"not-an-asin" not in sent
        assert b"9791186701072" not in sent
        assert sim.stats.accounts["demo"].items_served == 2

    async def test_misuse_raises(self, harness: Harness) -> None:
        """Looking up outside ``async with`` or with a non-string is misuse, not a result."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url)
        with pytest.raises(RuntimeError, match="async with"):
            await Broker(config).get_items(["B000000001"])
        broker = await harness.broker(config)
        with pytest.raises(TypeError):
            await broker.get_items([1234567890])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="single string"):
            await broker.get_items("B000000001")
        with pytest.raises(TypeError, match="single string"):
            async for _ in broker.stream("B000000001"):
                pass

    async def test_a_comma_separated_string_is_told_to_be_split(self, harness: Harness) -> None:
        """python-amazon-paapi's ``get_items("A,B")`` is told to split the string, in the
        async and sync APIs alike; it was told to use get_item, which fails the same text."""
        from broker.sync import SyncBroker

        sim = await harness.simulator(FREE)
        config = make_config(sim.url)
        broker = await harness.broker(config)
        advice = r'split it: get_items\(text.split\(","\)\)'
        with pytest.raises(TypeError, match=advice):
            await broker.get_items("B000000001,B000000002")
        with pytest.raises(TypeError, match=advice):
            async for _ in broker.stream("B000000001,B000000002"):
                pass
        with SyncBroker(config) as sync:
            with pytest.raises(TypeError, match=advice):
                sync.get_items("B000000001,B000000002")
            with pytest.raises(TypeError, match=advice):
                next(iter(sync.stream("B000000001,B000000002")))

    async def test_wrong_types_are_named(self, harness: Harness) -> None:
        """A non-string ASIN or marketplace is a TypeError naming it, not an internal error."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        calls = [
            ("marketplace must be", lambda: broker.get_items(["B000000001"], marketplace=5)),
            ("marketplace must be", lambda: broker.get_item(Query("B000000001", marketplace=3))),
            (
                "marketplace must be",
                lambda: broker.get_item(Query("B000000001", marketplace=["US"])),
            ),
            ("Query.asin must be", lambda: broker.get_item(Query(1234567890))),
            ("marketplace must be", lambda: broker.search_items(keywords="x", marketplace=5)),
        ]
        for message, call in calls:
            with pytest.raises(TypeError, match=message):
                await call()  # type: ignore[arg-type]
        assert sim.stats.accounts["demo"].accepted == 0

    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_stream_bounded(self, harness: Harness, kind: str) -> None:
        """stream() takes a sync or async iterable, yields each once, holds <= queue_size."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, engine={"queue_size": 5}))
        wanted = asins(60)
        pulled = 0

        def plain() -> Iterator[str]:
            nonlocal pulled
            for asin in wanted:
                pulled += 1
                yield asin

        async def agen() -> AsyncIterator[str]:
            for asin in plain():
                await asyncio.sleep(0)
                yield asin

        seen: list[str] = []
        most = 0
        async for result in broker.stream(plain() if kind == "sync" else agen()):
            # Lazy input: at most queue_size items admitted and not yet yielded (plus
            # one pulled and waiting for room), however slow this consumer is.
            assert pulled <= len(seen) + 5 + 1
            seen.append(result.asin)
            assert result.ok
            most = max(most, broker.metrics().outstanding_lookups)
            await asyncio.sleep(0.002)  # a slow consumer
        assert sorted(seen) == wanted
        assert most <= 5
        assert broker.metrics().outstanding_lookups == 0

    async def test_stream_early_exit_releases(self, harness: Harness) -> None:
        """A consumer that stops early leaves no lookup outstanding."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, keys=[key_doc(tps=5.0)]))
        stream = broker.stream(asins(50))
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0)  # let the cancelled lookups' callbacks run
        assert broker.metrics().outstanding_lookups == 0

    async def test_cancel_releases_everything(self) -> None:
        """Cancelling get_items frees its capacity; after aclose no task is left behind."""
        async with SimulatorServer(FREE) as sim:
            config = make_config(sim.url, keys=[key_doc(tps=5.0)], engine={"queue_size": 20})
            async with Broker(config) as broker:
                task = asyncio.get_running_loop().create_task(broker.get_items(asins(100)))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert broker.metrics().outstanding_lookups == 0
                # All 20 capacity slots are free again.
                again = await asyncio.wait_for(broker.get_items(asins(20, "B9")), 10)
                assert _statuses(again) == {"ok": 20}
            assert broker.metrics().queued_batches == 0
            assert repr(broker) == "Broker(closed, keys=['demo'])"
        await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    async def test_operation_cancelled_with_its_caller(self, harness: Harness) -> None:
        """Closing the broker ends a pending search with BrokerClosedError, not a hang (N15)."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, keys=[key_doc(tps=0.5)])
        broker = Broker(config)
        await broker.__aenter__()
        await broker.get_item("B000000001")  # spend the pacer slot
        search = asyncio.get_running_loop().create_task(broker.search_items(keywords="kettle"))
        await asyncio.sleep(0.01)
        await broker.aclose()
        with pytest.raises(BrokerClosedError):
            await asyncio.wait_for(search, 5)


class TestPartialResults:
    """Items Amazon does not have are not_found, item by item."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_missing_and_inaccessible(self, harness: Harness, protocol: str) -> None:
        """Unknown and inaccessible ASINs end not_found with Amazon's code; the rest ok."""
        settings = SimulatorSettings(
            limits=False, seed=7, missing_share=0.3, inaccessible_share=0.2
        )
        sim = await harness.simulator(settings)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        wanted = asins(100)
        results = await broker.get_items(wanted)
        _assert_each_once(results, wanted)
        expected = {
            "ok": Status.OK,
            "not_found": Status.NOT_FOUND,
            "not_accessible": Status.NOT_FOUND,
        }
        codes: Counter[str] = Counter()
        for result in results:
            truth = lookup(settings, US, result.asin).status
            assert result.status is expected[truth], (result.asin, truth, result.error)
            if truth != "ok":
                assert result.error is not None
                assert result.error.remedy
                codes[result.error.code] += 1
        assert codes["ItemNotAccessible"] > 0
        assert codes["InvalidParameterValue"] + codes["ResourceNotFoundException"] > 0
        assert 0 < _statuses(results)["not_found"] < 100


class TestAuthRecovery:
    """Expired tokens and a skewed server clock cost one refresh, never an ASIN."""

    async def test_token_expires_mid_run(self, harness: Harness) -> None:
        """A token the server expired is refreshed once for all its requests; all ok."""
        sim_clock = FakeClock()
        sim = await harness.simulator(FREE, clock=sim_clock)
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), transport=transport)
        assert _statuses(await broker.get_items(asins(10))) == {"ok": 10}
        assert transport.count("/auth/o2/token") == 1
        await sim_clock.advance(3700)  # past the server's 1-hour token lifetime
        with capture_logs() as logs:
            results = await broker.get_items(asins(40, "B1"))
        assert _statuses(results) == {"ok": 40}
        assert transport.count("/auth/o2/token") == 2
        expired = sim.stats.accounts["demo"].errors["TokenExpired"]
        assert 1 <= expired <= 4
        refreshed = [e for e in logs if e["event"] == "broker.credentials_refreshed"]
        assert len(refreshed) == expired
        assert {e["code"] for e in refreshed} == {"TokenExpired"}

    async def test_server_clock_20_minutes_off(self, harness: Harness) -> None:
        """PA-API RequestExpired teaches the broker the server's clock; then all ok."""
        sim = await harness.simulator(SimulatorSettings(limits=False, clock_skew_s=1200))
        broker = await harness.broker(make_config(sim.url, protocol="paapi5"))
        results = await broker.get_items(asins(100))
        assert _statuses(results) == {"ok": 100}
        expired = sim.stats.accounts["demo-paapi"].errors["RequestExpired"]
        assert 1 <= expired <= 4  # only requests signed before the first answer
        authorizer = broker._keys[0].authorizer
        assert abs(authorizer.clock_offset_s - 1200) < 5  # type: ignore[attr-defined]
        # Later requests are signed in the server's time at once.
        assert _statuses(await broker.get_items(asins(30, "B1"))) == {"ok": 30}
        assert sim.stats.accounts["demo-paapi"].errors["RequestExpired"] == expired

    async def test_request_expired_without_a_date_is_re_signed(self, harness: Harness) -> None:
        """A request held up 16 minutes on its way expires; answered without a Date header
        it is still re-signed with the current time and resent once (protocol.md 4): ok,
        and the key stays in rotation."""
        clock = FakeClock()
        sim = await harness.simulator(SimulatorSettings(limits=False), clock=clock)
        counting = await harness.transport()
        held = _HeldOnTheWay(counting, clock)
        broker = await harness.broker(
            make_config(sim.url, protocol="paapi5"), clock=clock, transport=held
        )
        task = asyncio.get_running_loop().create_task(broker.get_items(asins(3)))
        await drive(clock, task, counting)
        assert _statuses(task.result()) == {"ok": 3}
        assert sim.stats.accounts["demo-paapi"].errors["RequestExpired"] == 1
        assert counting.count("/paapi5/getitems") == 2


class _HeldOnTheWay:
    """Holds the first GetItems request 16 minutes (fake time) before sending it, and drops
    the Date header of every answer."""

    def __init__(self, inner: CountingTransport, clock: FakeClock) -> None:
        self._inner = inner
        self._clock = clock
        self._held = False

    async def send(self, request: HttpRequest) -> RawResponse:
        """Send through ``inner``; the first GetItems request after a 16-minute hold."""
        if "/paapi5/getitems" in request.url and not self._held:
            self._held = True
            await self._clock.advance(16 * 60)
        response = await self._inner.send(request)
        headers = {k: v for k, v in response.headers.items() if k.lower() != "date"}
        return dataclasses.replace(response, headers=headers)


class TestThrottling:
    """429s slow a key down and never fail an ASIN; a spent day waits for the reset."""

    async def test_429_storm(self, harness: Harness) -> None:
        """A key configured at twice its real rate (burst 1): all ok, 429s counted, rate cut."""
        clock = FakeClock()
        settings = SimulatorSettings(
            burst=1, accounts=(account("demo", "demo-id", "demo-secret", tps=10.0),)
        )
        sim = await harness.simulator(settings, clock=clock)
        transport = await harness.transport()
        config = make_config(sim.url, keys=[key_doc(tps=20.0)])
        broker = await harness.broker(config, clock=clock, transport=transport)
        task = asyncio.get_running_loop().create_task(broker.get_items(asins(400)))
        await drive(clock, task, transport)
        results = task.result()
        assert _statuses(results) == {"ok": 400}
        stats = sim.stats.accounts["demo"]
        assert stats.accepted == 40
        assert stats.items_served == 400
        metrics = broker.metrics()
        assert 0 < metrics.throttled == stats.throttled
        assert metrics.responses_by_status[429] == stats.throttled
        (key,) = metrics.keys
        assert key.throttled == stats.throttled
        assert key.rate < 20.0
        assert key.state == "active"
        assert all(r.attempts >= 1 for r in results)

    async def test_exhausted_tpd_waits_for_reset(self, harness: Harness) -> None:
        """With the day's quota spent the key waits for midnight UTC instead of failing."""
        # From 23:00 (from noon, 12 h of looks at the store took 7 s of real time).
        clock, sim, transport, _, broker = await harness.quota_rig(
            tps=5.0, server_tpd=3, key_tpd=3, epoch=datetime(2026, 5, 1, 23, 0, tzinfo=UTC)
        )
        start = clock.utcnow()
        task = asyncio.get_running_loop().create_task(broker.get_items(asins(30)))
        await drive(clock, task, transport)
        assert _statuses(task.result()) == {"ok": 30}
        waited = (clock.utcnow() - start).total_seconds()
        assert 3600 <= waited < 3600 + 60
        stats = sim.stats.accounts["demo"]
        assert (stats.accepted, stats.throttled) == (3, 0)  # never hammered the server
        (key,) = broker.metrics().keys
        assert key.daily_spent == 1
        assert key.daily_limit == 3


class TestFaults:
    """5xx, resets, truncated and HTML bodies are retried until every ASIN is ok."""

    async def test_faults_retried(self, harness: Harness) -> None:
        """Every injected fault costs one retry; all ASINs end ok."""
        faults = FaultRates(
            error_500=0.1,
            error_502=0.05,
            error_503=0.05,
            error_504=0.05,
            reset=0.1,
            truncated=0.1,
            html=0.05,
        )
        sim = await harness.simulator(SimulatorSettings(limits=False, seed=3, faults=faults))
        config = make_config(sim.url, retry={"max_attempts": 30})
        broker = await harness.broker(config)
        wanted = asins(300)
        results = await broker.get_items(wanted)
        _assert_each_once(results, wanted)
        assert _statuses(results) == {"ok": 300}
        injected = sim.stats.faults
        for kind in ("error_500", "reset", "truncated", "html"):
            assert injected[kind] > 0, kind
        metrics = broker.metrics()
        assert metrics.retries == sum(injected.values())
        assert metrics.transport_errors == injected["reset"]
        assert metrics.requests == 30 + sum(injected.values())
        assert max(r.attempts for r in results) > 1

    async def test_resends_after_expired_tokens_and_left_out_items_count_as_retries(
        self, harness: Harness
    ) -> None:
        """A request sent again with fresh credentials after TokenExpired, and an ASIN an
        answer left out asked again alone, each count one retry, as a 5xx's resend does
        (``broker bench`` showed "other retries 0" with a fifth of requests resent)."""
        faults = FaultRates(expired_token=0.1, drop_item=0.1)
        sim = await harness.simulator(SimulatorSettings(limits=False, seed=5, faults=faults))
        broker = await harness.broker(make_config(sim.url))
        wanted = asins(300)
        results = await broker.get_items(wanted)
        _assert_each_once(results, wanted)
        assert _statuses(results) == {"ok": 300}
        injected = sim.stats.faults
        assert injected["expired_token"] > 0
        assert injected["drop_item"] > 0
        metrics = broker.metrics()
        assert metrics.retries == injected["expired_token"] + injected["drop_item"]

    async def test_retries_exhausted(self, harness: Harness) -> None:
        """A server that always fails: each ASIN ends failed with the last error and its remedy."""
        sim = await harness.simulator(
            SimulatorSettings(limits=False, faults=FaultRates(error_503=1.0))
        )
        broker = await harness.broker(make_config(sim.url, retry={"max_attempts": 3}))
        results = await broker.get_items(asins(12))
        assert _statuses(results) == {"failed": 12}
        for result in results:
            assert result.attempts == 3
            assert result.error is not None
            assert result.error.remedy
        assert sim.stats.faults["error_503"] == 6


def _broken_cases() -> list[object]:
    paapi_bad = account("p2", "P2ACCESSKEY", "right-secret", protocol="paapi5", version="")
    not_eligible = account("ne", "ne-id", "ne-secret", not_eligible=True)
    return [
        pytest.param(
            "creators",
            (),
            key_doc("bad", credential_id="demo-v2-id", env="BAD", version="2.1"),
            "invalid_client",
            id="wrong-secret",
        ),
        pytest.param(
            "creators",
            (not_eligible,),
            key_doc("bad", credential_id="ne-id", env="BAD_NE"),
            "AssociateNotEligible",
            id="not-eligible",
        ),
        pytest.param(
            "paapi5",
            (paapi_bad,),
            paapi_key_doc("bad", credential_id="P2ACCESSKEY", env="BAD"),
            "InvalidSignature",
            id="paapi-wrong-secret",
        ),
    ]


BAD_ENV = {"BAD": "wrong-secret", "BAD_NE": "ne-secret"}


class TestBrokenKeys:
    """A broken key is taken out with one clear event; other keys go on."""

    @pytest.mark.parametrize(("protocol", "accounts", "bad", "code"), _broken_cases())
    async def test_healthy_and_broken_key(
        self,
        harness: Harness,
        protocol: str,
        accounts: tuple[object, ...],
        bad: dict[str, object],
        code: str,
    ) -> None:
        """The broken key is disabled once (one broker.key_disabled); all ASINs ok via the other."""
        sim = await harness.simulator(SimulatorSettings(limits=False, accounts=accounts))  # type: ignore[arg-type]
        good = paapi_key_doc("good") if protocol == "paapi5" else key_doc("good")
        config = make_config(sim.url, protocol=protocol, keys=[good, bad], environ=BAD_ENV)
        broker = await harness.broker(config)
        with capture_logs() as logs:
            results = await broker.get_items(asins(100))
        assert _statuses(results) == {"ok": 100}
        assert {r.key for r in results} == {"good"}
        disabled = [e for e in logs if e["event"] == "broker.key_disabled"]
        assert len(disabled) == 1
        assert disabled[0]["key"] == "bad"
        assert disabled[0]["code"] == code
        assert disabled[0]["remedy"]
        states = {k.name: k for k in broker.metrics().keys}
        assert states["good"].state == "active"
        assert states["bad"].state == "disabled"
        assert states["bad"].reason is not None
        assert states["bad"].reason.startswith(code)

    async def test_a_token_url_nothing_answers_at_takes_out_only_the_keys_that_ask_it(
        self,
    ) -> None:
        """A 404 from the 2.x keys' token URL (Cognito's path) takes those keys out, not a
        3.x key whose own token URL answers: it does every row. NoTokenEndpoint took every
        key out, the working one too, and the run stopped with its rows pending."""
        server = SimulatorServer(FREE)
        sim = server.app[SIMULATOR_KEY]

        async def lwa_only(request: web.Request) -> web.Response:
            return await sim_oauth.token_endpoint(request, sim, "v3")

        # A gateway in front of the token servers that serves Login with Amazon's path only.
        server.app.router.add_post("/gw/auth/o2/token", lwa_only)
        server.app.router.add_post("/gw/oauth2/token", _not_found)
        async with server, Broker(_two_families(server.url, "/gw")) as broker:
            with capture_logs() as logs:
                results = await broker.get_items(asins(30))
            states = {k.name: k for k in broker.metrics().keys}
        assert _statuses(results) == {"ok": 30}
        assert {r.key for r in results} == {"lwa"}
        disabled = [e for e in logs if e["event"] == "broker.key_disabled"]
        assert [(e["key"], e["code"]) for e in disabled] == [("cognito", "NoTokenEndpoint")]
        assert states["lwa"].state == "active"
        assert states["cognito"].state == "disabled"

    async def test_a_whole_token_url_nothing_answers_at_takes_out_every_key_asking_it(
        self,
    ) -> None:
        """A token_endpoint given as a whole URL (its path ends in /token) is every key's:
        a 404 there takes them all out at once, naming it, each key's own failure."""
        server = SimulatorServer(FREE)
        server.app.router.add_post("/gone/token", _not_found)
        async with server, Broker(_two_families(server.url, "/gone/token")) as broker:
            with pytest.raises(NoUsableKeyError) as caught:
                await broker.get_items(asins(3))
        failures = caught.value.failures
        assert sorted((f.key, f.code) for f in failures) == [
            ("cognito", "NoTokenEndpoint"),
            ("lwa", "NoTokenEndpoint"),
        ]
        assert all("/gone/token" in f.message for f in failures)

    async def test_every_key_broken(self, harness: Harness) -> None:
        """No usable key: NoUsableKeyError naming each key and why, now and on later calls."""
        not_eligible = account("ne", "ne-id", "ne-secret", not_eligible=True)
        sim = await harness.simulator(SimulatorSettings(limits=False, accounts=(not_eligible,)))
        keys = [
            key_doc("wrong", credential_id="demo-v2-id", env="BAD", version="2.1"),
            key_doc("ineligible", credential_id="ne-id", env="BAD_NE"),
        ]
        broker = await harness.broker(make_config(sim.url, keys=keys, environ=BAD_ENV))
        with pytest.raises(NoUsableKeyError) as info:
            await broker.get_items(asins(50))
        error = info.value
        assert error.marketplace == US
        assert {(f.key, f.code) for f in error.failures} == {
            ("wrong", "invalid_client"),
            ("ineligible", "AssociateNotEligible"),
        }
        message = str(error)
        assert "wrong: invalid_client" in message
        assert "ineligible: AssociateNotEligible" in message
        assert all(f.remedy in message for f in error.failures)
        with pytest.raises(NoUsableKeyError):
            await broker.get_item("B000000001")
        with pytest.raises(NoUsableKeyError):
            await broker.search_items(keywords="kettle")
        await asyncio.sleep(0)  # done-callbacks of the abandoned lookups run
        assert broker.metrics().outstanding_lookups == 0

    async def test_unserved_marketplace(self, harness: Harness) -> None:
        """A marketplace no key is configured for fails that query only, naming the fix."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        unserved, served = await broker.get_items([Query("B000000001", "DE"), Query("B000000002")])
        assert unserved.status is Status.FAILED
        assert unserved.error is not None
        assert unserved.error.code == "NoKeyForMarketplace"
        assert "partner_tags" in unserved.error.remedy
        assert unserved.query == Query("B000000001", "www.amazon.de", unserved.query.resources)
        assert served.ok
        assert broker.metrics().requests == 1

    async def test_product_url_asks_its_own_store(self, harness: Harness) -> None:
        """A product URL is looked up in its store's marketplace unless the query names one."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        german, named, american = await broker.get_items(
            [
                "https://www.amazon.de/dp/B000000001",
                Query("https://www.amazon.de/dp/B000000002", "US"),
                "https://www.amazon.com/dp/B000000003",
            ]
        )
        assert german.marketplace == "www.amazon.de"
        assert german.error is not None
        assert german.error.code == "NoKeyForMarketplace"  # the demo key tags .com only
        assert (named.marketplace, named.ok) == ("www.amazon.com", True)
        assert (american.marketplace, american.ok) == ("www.amazon.com", True)
        (refused,) = await broker.get_items(
            [Query("https://www.amazon.de/dp/B000000004", resources=("Bogus.Name",))]
        )
        assert refused.error is not None
        assert refused.error.code == "InvalidResource"
        assert refused.marketplace == "www.amazon.de"  # still the URL's store

    async def test_an_empty_resource_list_is_refused(self, harness: Harness) -> None:
        """No resource named (``Query(resources=())``, a job row's ``"resources": []``) is
        an invalid query, and ``resources=[]`` for a call a ValueError: the request named
        none and Amazon answered with its own default, the title alone."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        (refused,) = await broker.get_items([Query("B000000001", resources=())])
        assert refused.status is Status.INVALID
        assert refused.error is not None
        assert refused.error.code == "InvalidResource"
        assert "empty" in refused.error.message
        with pytest.raises(ValueError, match="empty"):
            await broker.get_items(["B000000001"], resources=[])

    async def test_a_url_of_no_amazon_store_says_the_store_is_the_urls(
        self, harness: Harness
    ) -> None:
        """A product URL on an Amazon-looking host that is no marketplace (amazon.xyz), the
        query naming none: the message says the store is the URL's, not "unknown
        marketplace", which the caller never named."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        (result,) = await broker.get_items(["https://www.amazon.xyz/dp/B000000001"])
        assert result.error is not None
        assert result.error.code == "UnknownMarketplace"
        assert "the product URL's store 'amazon.xyz'" in result.error.message

    async def test_unknown_marketplace(self, harness: Harness) -> None:
        """A marketplace that is not Amazon's is an invalid query, never sent."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        (result,) = await broker.get_items([Query("B000000001", "amazon.nowhere")])
        assert result.status is Status.INVALID
        assert result.error is not None
        assert result.error.code == "UnknownMarketplace"
        assert broker.metrics().requests == 0

    async def test_an_empty_marketplace_is_unknown_not_the_default(self, harness: Harness) -> None:
        """An empty marketplace (an unset variable) is an unknown one, as "XX" is, never the
        config's default store: a lookup's result is invalid, and an operation raises
        ValueError before anything is sent (both were quietly asked in the default store)."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        results = await broker.get_items(
            ["B000000001", Query("B000000002", marketplace="")], marketplace=""
        )
        for result in results:
            assert result.status is Status.INVALID
            assert result.error is not None
            assert result.error.code == "UnknownMarketplace"
        (own,) = await broker.get_items([Query("B000000003", marketplace=" ")])
        assert own.error is not None
        assert own.error.code == "UnknownMarketplace"
        with pytest.raises(ValueError, match="marketplace"):
            await broker.search_items(keywords="kettle", marketplace="")
        assert broker.metrics().requests == 0

    async def test_marketplace_aliases(self, harness: Harness) -> None:
        """US, amazon.com and www.amazon.com name one marketplace: one lookup, one request."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        results = await broker.get_items(
            [Query("B000000001", "US"), Query("B000000001", "amazon.com")]
        )
        assert [r.query.marketplace for r in results if r.query] == ["www.amazon.com"]
        assert broker.metrics().requests == 1


class TestOperations:
    """The other operations go through the same keys, limiter and retries."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_operations(self, harness: Harness, protocol: str) -> None:
        """get_item, search_items, get_variations and get_browse_nodes all answer."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        item = await broker.get_item("B000000001")
        assert item.ok
        assert item.asin == "B000000001"
        paapi = protocol == "paapi5"
        search = await broker.search_items(keywords="kettle")
        assert ("SearchResult" if paapi else "searchResult") in search.raw
        variations = await broker.get_variations("B000000001")
        assert ("VariationsResult" if paapi else "variationsResult") in variations.raw
        nodes = await broker.get_browse_nodes(["283155"])
        assert ("BrowseNodesResult" if paapi else "browseNodesResult") in nodes.raw
        account_name = "demo-paapi" if paapi else "demo"
        assert sim.stats.accounts[account_name].accepted == 4

    async def test_operation_error_raises(self, harness: Harness) -> None:
        """An operation Amazon refuses raises its ApiError (operations have no per-item rows)."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        with pytest.raises(ApiError) as info:
            await broker.search_items(keywords="noresults here")
        assert info.value.code
        assert json.dumps(info.value.code)


class _FullDisk:
    """A budget store whose saves fail as a full disk would."""

    def __init__(self) -> None:
        self.saves = 0

    def load(self, key_name: str, day: object) -> int:
        return 0

    def save(self, key_name: str, day: object, count: int) -> None:
        self.saves += 1
        raise OSError(28, "No space left on device")


async def _engine_stopped(broker: Broker) -> None:
    """Wait until ``broker``'s engine has stopped (within 10 s)."""
    async with asyncio.timeout(10):
        # A stop has no event to wait on from outside the broker: poll its error.
        while broker.engine_error is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


class TestEngineCrash:
    """A dead engine task fails its waiters instead of hanging them."""

    async def test_get_items_raises_the_crash_instead_of_hanging(self, harness: Harness) -> None:
        """A budget store failing inside the dispatcher surfaces as that OSError to callers."""
        sim = await harness.simulator(FREE)
        store = _FullDisk()
        broker = await harness.broker(make_config(sim.url), budget_store=store)
        with pytest.raises(OSError, match="No space left"):
            await asyncio.wait_for(broker.get_items(asins(30)), timeout=10)
        assert store.saves >= 1

    async def test_stream_and_later_calls_raise_it_too(self, harness: Harness) -> None:
        """After a crash the stream raises it, and so does every later call."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url), budget_store=_FullDisk())

        async def consume() -> None:
            async for _ in broker.stream(asins(30)):
                pass

        with pytest.raises(OSError, match="No space left"):
            await asyncio.wait_for(consume(), timeout=10)
        with pytest.raises(OSError, match="No space left"):
            await broker.get_item(asins(1)[0])

    async def test_the_cache_still_answers_after_the_engine_stopped(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """cache_stats() after the engine died answers with the cache's figures: it raised
        the engine's error, which a daemon's /metrics then blamed on the cache."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, cache={"max_age_s": 3600, "path": str(tmp_path / "c")})
        broker = await harness.broker(config, budget_store=_FullDisk())
        with pytest.raises(OSError, match="No space left"):
            await asyncio.wait_for(broker.get_items(asins(30)), timeout=10)
        stats = await broker.cache_stats()
        assert stats is not None

    async def test_a_crashed_task_is_logged_with_its_traceback(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An engine task dying of a bug is logged as broker.task_crashed with its
        traceback (the report needs it), and the broker says that its engine stopped and
        why (error, snapshot): an idle process holding it otherwise looked healthy."""

        async def crash(self: SharedKeyLimiter) -> None:
            await asyncio.sleep(0.05)
            raise RuntimeError("boom")

        monkeypatch.setattr(SharedKeyLimiter, "keep_alive", crash)
        sim = await harness.simulator(FREE)
        with capture_logs() as logs:
            broker = await harness.broker(make_config(sim.url))
            assert broker.engine_error is None
            assert broker.metrics().engine_stopped is None
            await _engine_stopped(broker)
        (crashed,) = [e for e in logs if e["event"] == "broker.task_crashed"]
        assert crashed["log_level"] == "error"
        assert crashed["exc_info"] is broker.engine_error
        assert isinstance(broker.engine_error, RuntimeError)
        assert broker.metrics().engine_stopped == "RuntimeError: boom"
        with pytest.raises(RuntimeError, match="boom"):
            await broker.get_item(asins(1)[0])

    async def test_an_engine_stopped_for_its_store_is_one_line(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An engine stopped by a key-state store it cannot use (no bug) is logged as
        broker.engine_stopped without a traceback."""

        async def refused(self: SharedKeyLimiter) -> None:
            await asyncio.sleep(0.05)
            raise StateUnavailableError("redis", "redis://127.0.0.1:1/0: ConnectionError")

        monkeypatch.setattr(SharedKeyLimiter, "keep_alive", refused)
        sim = await harness.simulator(FREE)
        with capture_logs() as logs:
            broker = await harness.broker(make_config(sim.url))
            await _engine_stopped(broker)
        (stopped,) = [e for e in logs if e["event"] == "broker.engine_stopped"]
        assert "exc_info" not in stopped
        assert broker.metrics().engine_stopped == (
            "key-state store (redis) unavailable: redis://127.0.0.1:1/0: ConnectionError"
        )

    async def test_an_engine_stopped_by_a_full_disk_is_one_line(self, harness: Harness) -> None:
        """A full disk under the key state (an OSError: the machine's trouble, no bug) is
        logged as broker.engine_stopped without a traceback; it was broker.task_crashed,
        which the README calls a bug to report."""
        sim = await harness.simulator(FREE)
        with capture_logs() as logs:
            broker = await harness.broker(make_config(sim.url), budget_store=_FullDisk())
            with pytest.raises(OSError, match="No space left"):
                await asyncio.wait_for(broker.get_items(asins(30)), timeout=10)
        assert [e for e in logs if e["event"] == "broker.task_crashed"] == []
        (stopped,) = [e for e in logs if e["event"] == "broker.engine_stopped"]
        assert "exc_info" not in stopped
        assert "No space left on device" in stopped["reason"]

    async def test_a_stray_timeout_error_is_still_a_crash(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A TimeoutError (an OSError) escaping an engine task is a bug, logged as
        broker.task_crashed with its traceback, not as the machine's trouble in one line."""

        async def stray(self: SharedKeyLimiter) -> None:
            await asyncio.sleep(0.05)
            raise TimeoutError

        monkeypatch.setattr(SharedKeyLimiter, "keep_alive", stray)
        sim = await harness.simulator(FREE)
        with capture_logs() as logs:
            broker = await harness.broker(make_config(sim.url))
            await _engine_stopped(broker)
        (crashed,) = [e for e in logs if e["event"] == "broker.task_crashed"]
        assert crashed["exc_info"] is broker.engine_error

    async def test_caller_waiting_for_room_gets_the_crash(self, harness: Harness) -> None:
        """A caller blocked on a full queue when the engine dies raises the crash too."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, engine={"queue_size": 1, "linger_s": 0.0})
        broker = await harness.broker(config, budget_store=_FullDisk())
        first = asyncio.ensure_future(broker.get_item(asins(2)[0]))
        second = asyncio.ensure_future(broker.get_item(asins(2)[1]))
        done = await asyncio.wait_for(
            asyncio.gather(first, second, return_exceptions=True), timeout=10
        )
        assert all(isinstance(outcome, OSError) for outcome in done)
