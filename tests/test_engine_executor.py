"""The executor's outcome routing, on a fake clock with a MockTransport standing in for Amazon."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import random
import re
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from conftest import US, asins, key_doc, make_config, paapi_key_doc
from structlog.testing import capture_logs

from broker.api.base import HttpRequest, RawResponse
from broker.client import Broker
from broker.engine.executor import CRASH_REMEDY
from broker.engine.keys import OUTAGE_CODE, OUTAGE_RETRY_S
from broker.engine.metrics import EngineMetrics
from broker.engine.transport import MockTransport
from broker.errors import (
    BadRequestError,
    EndpointUnreachable,
    NetworkRefused,
    NoUsableKeyError,
    RequestTimeout,
    describe,
)
from broker.models import ItemResult, Query, Status
from broker.testing import FakeClock

PAAPI = "https://paapi.test"
CREATORS = "https://creators.test"
DE = "www.amazon.de"
JSON = {"content-type": "application/json"}

Handler = Callable[[HttpRequest], Awaitable[RawResponse]]


def _ids(request: HttpRequest) -> list[str]:
    body = json.loads(request.body)
    return list(body.get("ItemIds") or body.get("itemIds") or [])


def _reply(status: int, body: object, headers: dict[str, str] | None = None) -> RawResponse:
    return RawResponse(status, {**JSON, **(headers or {})}, json.dumps(body).encode())


def _paapi_ok(ids: list[str], skip: tuple[str, ...] = ()) -> RawResponse:
    items = [
        {"ASIN": a, "ItemInfo": {"Title": {"DisplayValue": f"Title {a}"}}}
        for a in ids
        if a not in skip
    ]
    return _reply(200, {"ItemsResult": {"Items": items}})


def _paapi_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> RawResponse:
    body = {"__type": "com.amazon.paapi5#Error", "Errors": [{"Code": code, "Message": message}]}
    return _reply(status, body, headers)


def _creators_ok(ids: list[str], errors: list[dict[str, str]] | None = None) -> RawResponse:
    bad = {e["message"].split()[2] for e in errors or []}
    items = [
        {"asin": a, "itemInfo": {"title": {"displayValue": f"Title {a}"}}}
        for a in ids
        if a not in bad
    ]
    body: dict[str, Any] = {"itemsResult": {"items": items}}
    if errors:
        body["errors"] = errors
    return _reply(200, body)


def _token(value: str) -> RawResponse:
    return _reply(200, {"access_token": value, "token_type": "bearer", "expires_in": 3600})


def _token_expired() -> RawResponse:
    """Creators' 401 for a token it no longer takes."""
    return _reply(
        401,
        {
            "type": "UnauthorizedException",
            "reason": "TokenExpired",
            "message": "The access token has expired.",
        },
    )


#: The demo key with partner tags for the US and DE stores.
_US_DE = [key_doc(tags={US: "demo-20", DE: "demo-22"})]


def _refusing_de(answer: RawResponse) -> Handler:
    """A Creators endpoint that gives a token to anyone, ``answer`` to every DE request and
    the items asked to every other."""

    async def handler(request: HttpRequest) -> RawResponse:
        if "/auth/" in request.url:
            return _token("tok")
        if request.headers.get("x-marketplace") == DE:
            return answer
        return _creators_ok(_ids(request))

    return handler


_DENIED_429 = _paapi_error(429, "TooManyRequests", "The request was denied.")


def _first_answers(answers: list[RawResponse]) -> Handler:
    """A PA-API handler giving ``answers`` to the first requests, in turn, then answering
    every ASIN asked."""
    left = list(answers)

    async def handler(request: HttpRequest) -> RawResponse:
        return left.pop(0) if left else _paapi_ok(_ids(request))

    return handler


async def _never() -> RawResponse:
    raise AssertionError("no request is sent")


async def _run(
    broker: Broker, clock: FakeClock, asins_: list[str], marketplace: str | None = None
) -> list[ItemResult]:
    task = asyncio.get_running_loop().create_task(broker.get_items(asins_, marketplace=marketplace))
    await clock.run_until(task)
    return task.result()


def _broker(
    endpoint: str, handler: Handler, clock: FakeClock, *, protocol: str = "paapi5", **tables: Any
) -> tuple[Broker, MockTransport]:
    transport = MockTransport(handler)
    config = make_config(endpoint, protocol=protocol, **tables)
    return Broker(config, clock=clock, transport=transport, rng=random.Random(0)), transport


def _answering(clock: FakeClock, tps: float, **tables: Any) -> tuple[Broker, MockTransport]:
    """A broker on a Creators endpoint that answers every ASIN asked, its key at ``tps``
    (``tables``: more of the config, ``engine={...}`` say)."""

    async def handler(request: HttpRequest) -> RawResponse:
        if "/auth/" in request.url:
            return _token("tok")
        return _creators_ok(_ids(request))

    return _broker(CREATORS, handler, clock, protocol="creators", keys=[key_doc(tps=tps)], **tables)


class TestConcurrentCallers:
    """Callers asking at once (a web app's request threads) share GetItems requests."""

    @pytest.mark.parametrize("tps", [1.0, 100.0])
    async def test_single_asin_callers_share_batches(self, tps: float) -> None:
        """40 get_item calls made together go out as 4 requests of 10, not 40 of 1: a
        batch still queued and never sent takes later callers' lookups of its group."""

        clock = FakeClock()
        broker, transport = _answering(clock, tps)
        wanted = asins(40)
        async with broker:
            calls = [asyncio.ensure_future(broker.get_item(a)) for a in wanted]
            await clock.run_until(asyncio.gather(*calls))
        assert [c.result().asin for c in calls] == wanted
        assert all(c.result().ok for c in calls)
        sizes = [len(_ids(r)) for r in transport.requests if "/auth/" not in r.url]
        assert sorted(sizes, reverse=True) == [10, 10, 10, 10]

    async def test_a_queue_smaller_than_a_batch_does_not_wait_out_the_linger(self) -> None:
        """engine.queue_size 2 with batches of 3 and a 1 s linger: once every admitted lookup
        lingers, nothing can make room before the linger ends, so the batch goes at once
        instead of each request waiting out the full second."""
        clock = FakeClock()
        broker, _ = _answering(
            clock, 100.0, engine={"queue_size": 2, "batch_size": 3, "linger_s": 1.0}
        )
        wanted = asins(12)
        async with broker:
            start = clock.monotonic()
            task = asyncio.ensure_future(broker.get_items(wanted))
            await clock.run_until(task)
            elapsed = clock.monotonic() - start
        assert [r.asin for r in task.result()] == wanted
        assert elapsed < 1.0

    @pytest.mark.parametrize(("queue_size", "repeats"), [(1, 1), (2, 1), (4, 4)])
    async def test_a_stream_window_smaller_than_a_batch_does_not_wait_out_the_linger(
        self, queue_size: int, repeats: int
    ) -> None:
        """The same for ``stream()``, whose own window (``queue_size``) filled first, also
        with each ASIN asked ``repeats`` times in a row (a window of one lookup): its
        producer waited for room with the batch lingering, so 12 ASINs took 12 / queue_size
        full lingers (20 s for 20 at queue_size 1 and a 0.5 s linger, a user measured)."""
        clock = FakeClock()
        engine = {"queue_size": queue_size, "batch_size": 3, "linger_s": 1.0}
        broker, _ = _answering(clock, 100.0, engine=engine)
        wanted = [asin for asin in asins(12) for _ in range(repeats)]

        async def consume() -> list[ItemResult]:
            return [result async for result in broker.stream(wanted)]

        async with broker:
            start = clock.monotonic()
            task = asyncio.ensure_future(consume())
            await clock.run_until(task)
            elapsed = clock.monotonic() - start
        assert sorted(r.asin for r in task.result()) == wanted
        assert elapsed < 1.0

    async def test_callers_trickling_in_fill_the_batch_waiting_for_the_key(self) -> None:
        """At 1 TPS, callers arriving 50 ms apart join the batch that waits for the key's
        next slot instead of each sending a request of its own."""

        clock = FakeClock()
        broker, transport = _answering(clock, 1.0)
        wanted = asins(20)

        async def trickle() -> list[ItemResult]:
            calls = []
            for asin in wanted:
                calls.append(asyncio.ensure_future(broker.get_item(asin)))
                await clock.sleep(0.05)
            return list(await asyncio.gather(*calls))

        async with broker:
            task = asyncio.ensure_future(trickle())
            await clock.run_until(task)
        assert all(r.ok for r in task.result())
        sizes = [len(_ids(r)) for r in transport.requests if "/auth/" not in r.url]
        assert len(sizes) <= 4  # not 20


class TestOperationsBesideBulkWork:
    """A search asked while another caller's bulk lookups queue goes out next."""

    async def test_a_search_goes_ahead_of_queued_get_items_batches(self) -> None:
        """With 20 GetItems batches of a bulk call queued on a 1 TPS key, a search goes out
        with the next send, not after them all (20 s here; 17 minutes behind the default
        queue_size); two searches keep their order."""
        clock = FakeClock()
        sent: list[str] = []

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            if request.url.endswith("/searchItems"):
                keywords = json.loads(request.body)["keywords"]
                sent.append(keywords)
                items = [{"asin": "B000000001", "itemInfo": {"title": {"displayValue": "K"}}}]
                return _reply(200, {"searchResult": {"items": items, "totalResultCount": 1}})
            sent.append("get")
            return _creators_ok(_ids(request))

        broker, _ = _broker(CREATORS, handler, clock, protocol="creators", keys=[key_doc(tps=1.0)])
        async with broker:
            bulk = asyncio.ensure_future(broker.get_items(asins(200)))
            await clock.advance(1.5)
            first = asyncio.ensure_future(broker.search_items("first"))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(broker.search_items("second"))
            await clock.run_until(second)
            await clock.run_until(first)
            await clock.run_until(bulk)
        assert [r.ok for r in bulk.result()] == [True] * 200
        assert sent.index("first") <= 3, sent
        assert sent.index("second") == sent.index("first") + 1, sent


class TestTokenFetchAndPacing:
    """A token fetched while sends are paced never squeezes two sends closer than the key's
    interval (a strict server answers that with a 429)."""

    async def test_a_slow_token_fetch_delays_the_slot_not_the_next_gap(self) -> None:
        """With tokens taking 0.3 s to fetch and living 4 s at 2 TPS, consecutive GetItems
        sends stay 0.5 s apart: at the start and after every refresh."""
        sends, tokens = await _paced_sends(expires_in=4.0, count=130)
        assert len(sends) == 13
        assert tokens >= 2  # the 4-s tokens were refreshed while the job ran
        gaps = [b - a for a, b in itertools.pairwise(sends)]
        assert min(gaps) >= 0.5 - 1e-6, gaps

    async def test_a_token_dropped_after_a_send_was_booked_is_fetched_before_it(
        self,
    ) -> None:
        """A TokenExpired answered while the next send waits for its booked slot: that send
        fetches no token after booking (it went out 0.9 s late, 0.1 s before the retry, a
        strict server's 429); it goes back, and every send stays an interval apart."""
        clock = FakeClock()
        sends: list[float] = []
        fetched = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal fetched
            if "/auth/" in request.url:
                fetched += 1
                if fetched > 1:
                    await clock.sleep(0.9)  # a slow token endpoint for the refetch
                return _token(f"tok{fetched}")
            sends.append(clock.monotonic())
            if len(sends) == 1:
                await clock.sleep(0.95)  # answered late, as the next send waits its slot
                return _token_expired()
            return _creators_ok(_ids(request))

        broker, _ = _broker(
            CREATORS,
            handler,
            clock,
            protocol="creators",
            keys=[key_doc(tps=1.0)],
            engine={"batch_size": 1, "linger_s": 0.0},
        )
        async with broker:
            call = asyncio.ensure_future(broker.get_items(asins(3)))
            await clock.run_until(call)
        assert all(r.ok for r in call.result())
        gaps = [b - a for a, b in itertools.pairwise(sends)]
        assert min(gaps) >= 1.0 - 0.05, gaps

    async def test_a_token_endpoint_with_its_own_path_is_asked_as_given(self) -> None:
        """api.token_endpoint with a path of its own (a mock's /lwa/token, as
        python-amazon-paapi's auth_endpoint took it) is where tokens are fetched; Amazon's
        path was glued onto it and every fetch met a 404."""
        clock = FakeClock()
        given = "https://auth.example/lwa/token"

        async def handler(request: HttpRequest) -> RawResponse:
            if request.url == given:
                return _token("tok")
            if request.url.startswith("https://auth.example"):
                return _reply(404, {"message": "no such path"})
            return _creators_ok(_ids(request))

        broker, transport = _broker(
            CREATORS,
            handler,
            clock,
            protocol="creators",
            api={"protocol": "creators", "endpoint": CREATORS, "token_endpoint": given},
        )
        async with broker:
            call = asyncio.ensure_future(broker.get_items(asins(3)))
            await clock.run_until(call)
        assert all(r.ok for r in call.result())
        assert [r.url for r in transport.requests if "auth.example" in r.url] == [given]

    async def test_a_failing_token_endpoint_behind_a_slow_booking_is_met(self) -> None:
        """The token endpoint down and each booking slow (a shared store's wait of a few
        seconds): the sends meet the failure, back off and take the key out within the
        outage budget; a send never goes back for want of a token it never had (it looped,
        fetching for ever and counting a send each turn)."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            raise EndpointUnreachable("token endpoint down")

        broker, transport = _broker(
            CREATORS,
            handler,
            clock,
            protocol="creators",
            keys=[key_doc(tps=1.0)],
            retry={"outage_budget_s": 60.0},
        )
        async with broker:
            key = broker._keys[0]
            commit = key.limiter.commit

            async def slow_commit(*args: Any, **kwargs: Any) -> float:
                sent_at = await commit(*args, **kwargs)
                await clock.sleep(6.0)  # past the few seconds a failed fetch is held
                return sent_at + 6.0

            key.limiter.commit = slow_commit  # type: ignore[method-assign]
            call = asyncio.ensure_future(broker.get_items(asins(3)))
            await clock.run_until(call, limit=3_600)
            with pytest.raises(NoUsableKeyError) as caught:
                call.result()
        assert caught.value.failures[0].code == OUTAGE_CODE
        assert len(transport.requests) < 100


async def _outage_refusal(broker: Broker, clock: FakeClock) -> Any:
    """The one failure a get_items call on ``broker`` is refused with once its only key's
    outage budget ran out (checked to be the outage's)."""
    async with broker:
        call = asyncio.ensure_future(broker.get_items(asins(3)))
        await clock.run_until(call)
        with pytest.raises(NoUsableKeyError) as caught:
            call.result()
    (failure,) = caught.value.failures
    assert failure.code == OUTAGE_CODE
    return failure


async def _seconds_until_refused(broker: Broker, clock: FakeClock) -> float:
    """How long (fake clock) a get_items call of 5 ASINs on ``broker`` took to be refused
    with NoUsableKeyError."""
    start = clock.monotonic()
    async with broker:
        call = asyncio.ensure_future(broker.get_items(asins(5)))
        await clock.run_until(call)
        with pytest.raises(NoUsableKeyError):
            call.result()
    return clock.monotonic() - start


async def _paced_sends(*, expires_in: float, count: int) -> tuple[list[float], int]:
    """``count`` ASINs through one key at 2 TPS whose tokens take 0.3 s to fetch and live
    ``expires_in`` s: when each GetItems went out, and how many tokens were fetched."""
    clock = FakeClock()
    sends: list[float] = []

    async def handler(request: HttpRequest) -> RawResponse:
        if "/auth/" in request.url:
            await clock.sleep(0.3)
            return _reply(200, {"access_token": f"t{clock.monotonic()}", "expires_in": expires_in})
        sends.append(clock.monotonic())
        return _creators_ok(_ids(request))

    broker, transport = _broker(
        CREATORS, handler, clock, protocol="creators", keys=[key_doc(tps=2.0)]
    )
    async with broker:
        call = asyncio.ensure_future(broker.get_items(asins(count)))
        await clock.run_until(call)
    assert all(r.ok for r in call.result())
    return sends, sum("/auth/" in r.url for r in transport.requests)


async def _us_then_uk_hours_later(
    clock: FakeClock, handler: Handler, *, a_tps: float, uk_asins: int
) -> list[ItemResult]:
    """Keys a (US and UK, credential a-id, ``a_tps``) and b (US, b-id): 10 US ASINs, two
    idle hours, then ``uk_asins`` UK ASINs only a serves; the UK results."""
    uk = "www.amazon.co.uk"
    keys = [
        key_doc("a", credential_id="a-id", tps=a_tps, tags={US: "a-20", uk: "a-21"}),
        key_doc("b", credential_id="b-id"),
    ]
    broker, _ = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
    async with broker:
        first = asyncio.ensure_future(broker.get_items(asins(10, "B1")))
        await clock.run_until(first)
        await clock.advance(7200)
        later = asyncio.ensure_future(broker.get_items(asins(uk_asins, "B2"), marketplace=uk))
        await clock.run_until(later)
    return later.result()


class TestHeldTokenFailure:
    """A token fetch that failed ahead of a send is not raised by a send hours later."""

    async def test_a_send_long_after_a_failed_early_fetch_fetches_again(self) -> None:
        """Key a's early fetch fails and key b takes the work; two hours later only a can
        serve new work: a fetches a token before it sends (the endpoint is fine by then),
        instead of its send raising the two-hour-old failure and waiting out a pause."""
        clock = FakeClock()
        a_fetches: list[float] = []

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                if b"a-id" in request.body:
                    a_fetches.append(clock.monotonic())
                    if len(a_fetches) == 1:
                        await clock.sleep(1.0)
                        return _reply(500, {"error": "server_error"})
                return _token("tok")
            return _creators_ok(_ids(request))

        start = clock.monotonic()
        with capture_logs() as logs:
            later = await _us_then_uk_hours_later(clock, handler, a_tps=100.0, uk_asins=10)
        assert all(r.ok for r in later)
        later_fetches = [t - start for t in a_fetches if t - start > 7000]
        assert later_fetches
        assert later_fetches[0] < 7200.5
        # The failure at t=1 was never a send's: nothing reports it two hours later.
        failed = [e for e in logs if e["event"] == "broker.token_fetch_failed"]
        assert [e for e in failed if e.get("key") == "a"] == []


class TestTokenAfterAnIdleTurn:
    """A dispatcher turn that booked nothing does not excuse the next one from fetching a
    due token before it books."""

    async def test_a_token_due_after_a_turn_lost_to_another_key_is_fetched_before_booking(
        self,
    ) -> None:
        """Key a's first turn finds the work taken by key b; two hours later (a's token long
        expired) only a serves new work: its token is fetched before its first send is
        booked, so its first two sends stay the key's interval apart (fetched after the
        booking, the slow fetch squeezed the gap to 0.2 s)."""
        uk = "www.amazon.co.uk"
        clock = FakeClock()
        a_sends: list[float] = []
        a_fetches = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal a_fetches
            if "/auth/" in request.url:
                if b"a-id" in request.body:
                    a_fetches += 1
                    await clock.sleep(0.3 if a_fetches > 1 else 1.0)
                return _reply(200, {"access_token": f"t{clock.monotonic()}", "expires_in": 3600})
            if request.headers.get("x-marketplace") == uk:
                a_sends.append(clock.monotonic())
            return _creators_ok(_ids(request))

        later = await _us_then_uk_hours_later(clock, handler, a_tps=2.0, uk_asins=20)
        assert all(r.ok for r in later)
        assert len(a_sends) == 2
        assert a_sends[1] - a_sends[0] >= 0.5 - 1e-6, a_sends


class TestGlobalErrors:
    """An error whose catalogue scope is global (the client or the endpoint is wrong, not a
    key) takes every key out at once: no other key spends a request to learn the same."""

    @pytest.mark.parametrize(
        ("status", "reason"), [(400, "CannotParse"), (400, "UnknownOperation")]
    )
    async def test_one_request_takes_every_key_out(self, status: int, reason: str) -> None:
        """Three keys, every GetItems answered with a global error: the one batch is sent
        once (not once per key), all three keys leave, and the caller gets NoUsableKeyError
        naming the code."""

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            return _reply(
                status, {"type": "ValidationException", "reason": reason, "message": "no"}
            )

        clock = FakeClock()
        keys = [key_doc(name, credential_id=f"{name}-id", max_in_flight=1) for name in "abc"]
        broker, transport = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        with capture_logs() as logs:
            async with broker:
                task = asyncio.ensure_future(broker.get_items(asins(10)))
                await clock.run_until(task)
        assert isinstance(task.exception(), NoUsableKeyError)
        assert reason in str(task.exception())
        assert len([r for r in transport.requests if "/auth/" not in r.url]) == 1
        disabled = [e["key"] for e in logs if e["event"] == "broker.key_disabled"]
        assert sorted(disabled) == ["a", "b", "c"]

    async def test_a_wrong_paths_html_404_stops_at_once(self) -> None:
        """api.endpoint with a path (every GetItems meets a server's HTML 404): no retry,
        the keys out with UnknownOperation and its remedy (check api.endpoint); each batch
        was retried six times as an unreadable answer and its rows failed."""

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            return RawResponse(404, {"content-type": "text/html"}, b"<html>Not Found</html>")

        clock = FakeClock()
        keys = [key_doc(name, credential_id=f"{name}-id", max_in_flight=1) for name in "ab"]
        broker, transport = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        async with broker:
            task = asyncio.ensure_future(broker.get_items(asins(30)))
            await clock.run_until(task)
        error = task.exception()
        assert isinstance(error, NoUsableKeyError)
        assert {f.code for f in error.failures} == {"UnknownOperation"}
        assert "api.endpoint" in str(error)
        # One per key at most (both may send before the first answer), never a retry.
        assert len([r for r in transport.requests if "/auth/" not in r.url]) <= len(keys)

    @pytest.mark.parametrize("reason", ["CannotParse", "UnknownOperation"])
    async def test_an_operation_raises_it_and_leaves_the_keys(self, reason: str) -> None:
        """The same answer to a search (protocol.md 4: per-request fatal, surface the
        error): the call raises it and the keys stay, so a later GetItems is answered; it
        took every key out for the broker's life, and the GetItems got NoUsableKeyError."""

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            if "searchItems" in request.url:
                return _reply(
                    400, {"type": "ValidationException", "reason": reason, "message": "no"}
                )
            return _creators_ok(_ids(request))

        clock = FakeClock()
        keys = [key_doc(name, credential_id=f"{name}-id") for name in "ab"]
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        async with broker:
            search = asyncio.ensure_future(broker.search_items(keywords="kettle"))
            await clock.run_until(search)
            assert isinstance(search.exception(), BadRequestError)
            assert reason in str(search.exception())
            items = asyncio.ensure_future(broker.get_items(asins(3)))
            await clock.run_until(items)
        assert [r.status for r in items.result()] == [Status.OK] * 3


class TestWhoCannotServe:
    async def test_only_keys_tagged_for_the_marketplace_are_blamed(self) -> None:
        """No key left for DE: the error names the key tagged for DE (its wrong tag), not
        a US-only key rejected earlier (its wrong secret), whose mending would not help."""

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                if json.loads(request.body)["client_id"] == "bad-id":
                    return _reply(401, {"error": "invalid_client"})
                return _token("tok")
            if request.headers.get("x-marketplace") == "www.amazon.de":
                return _reply(
                    400,
                    {"type": "ValidationException", "reason": "InvalidPartnerTag", "message": "x"},
                )
            return _creators_ok(_ids(request))

        clock = FakeClock()
        de = {"www.amazon.de": "wrong-21"}
        keys = [
            key_doc("us-bad", credential_id="bad-id"),
            key_doc("us-good", credential_id="good-id"),
            key_doc("de-wrong", credential_id="de-id", tags=de),
        ]
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        async with broker:
            us = asyncio.ensure_future(broker.get_items(asins(30)))
            await clock.run_until(us)
            assert all(result.ok for result in us.result())
            german = asyncio.ensure_future(broker.get_items(asins(3), marketplace="DE"))
            await clock.run_until(german)
        error = german.exception()
        assert isinstance(error, NoUsableKeyError)
        assert [(f.key, f.code) for f in error.failures] == [("de-wrong", "InvalidPartnerTag")]
        assert "us-bad" not in str(error)


class TestRefusedInOneMarketplace:
    @pytest.mark.parametrize("code", ["InvalidSignature", "UnrecognizedClient"])
    async def test_a_key_accepted_elsewhere_leaves_that_marketplace_only(self, code: str) -> None:
        """A PA-API key signing right for the US and refused for DE (a SigV4 region Amazon
        scopes otherwise) leaves DE only, with a remedy about DE: it was taken out of every
        marketplace, the US rows stopped too, and the remedy said to regenerate the secret."""

        async def handler(request: HttpRequest) -> RawResponse:
            if json.loads(request.body)["Marketplace"] == DE:
                return _paapi_error(401, code, "Credential should be scoped to a valid region")
            return _paapi_ok(_ids(request))

        clock = FakeClock()
        keys = [paapi_key_doc(tags={US: "demo-20", DE: "demo-22"})]
        broker, _ = _broker(PAAPI, handler, clock, keys=keys)
        async with broker:
            assert all(r.ok for r in await _run(broker, clock, asins(10)))
            german = asyncio.ensure_future(broker.get_items(asins(3), marketplace="DE"))
            await clock.run_until(german)
            assert all(r.ok for r in await _run(broker, clock, asins(20)[10:]))
        error = german.exception()
        assert isinstance(error, NoUsableKeyError)
        (failure,) = error.failures
        assert failure.code == code
        assert failure.remedy.startswith("The key works in other marketplaces")
        assert DE in failure.remedy


class TestOutsideTheCredentialRegion:
    async def test_a_refusal_outside_the_version_s_region_leaves_that_marketplace_only(
        self,
    ) -> None:
        """A 3.1 (North America) credential tagged for the UK too, whose first answer is the
        UK's InvalidIssuer: the key leaves the UK only and the US rows are answered. Whether
        the key left every marketplace depended on whether a US answer had come first."""
        uk = "www.amazon.co.uk"

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            if request.headers.get("x-marketplace") == uk:
                body = {"type": "UnauthorizedException", "reason": "InvalidIssuer", "message": "x"}
                return _reply(401, body)
            return _creators_ok(_ids(request))

        clock = FakeClock()
        keys = [key_doc(tags={US: "demo-20", uk: "demo-21"})]
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        async with broker:
            british = asyncio.ensure_future(broker.get_items(asins(3), marketplace="UK"))
            await clock.run_until(british)
            assert all(r.ok for r in await _run(broker, clock, asins(10)))
        error = british.exception()
        assert isinstance(error, NoUsableKeyError)
        (failure,) = error.failures
        assert failure.code == "InvalidIssuer"
        assert "outside the NA region of credential version 3.1" in failure.message
        assert uk in failure.remedy


class TestPaapiEligibility:
    """PA-API's AssociateEligibilityException (protocol.md 3.5: per key, its status not
    documented) is the key's, whatever the status it comes with."""

    @pytest.mark.parametrize("status", [400, 403])
    async def test_it_takes_the_key_out_with_the_eligibility_remedy(self, status: int) -> None:
        """The exception named only by __type: the key leaves after one request and the
        caller is told to refer sales; on a 400 it failed every row with "report the code"."""

        async def handler(request: HttpRequest) -> RawResponse:
            body = {
                "__type": "com.amazon.paapi5#AssociateEligibilityException",
                "Errors": [{"Message": "Your account is not eligible."}],
            }
            return _reply(status, body)

        clock = FakeClock()
        broker, transport = _broker(PAAPI, handler, clock)
        async with broker:
            task = asyncio.ensure_future(broker.get_items(asins(3)))
            await clock.run_until(task)
        error = task.exception()
        assert isinstance(error, NoUsableKeyError)
        (failure,) = error.failures
        assert failure.code == "AssociateEligibilityException"
        assert failure.remedy == describe("AssociateNotEligible").remedy
        assert len(transport.requests) == 1


class TestCredentialsInAnswers:
    """A credential an answer echoes never reaches a row, whatever sent it back."""

    @pytest.mark.parametrize("version", ["3.1", "2.1"])
    async def test_a_gateway_echoing_the_bearer_token_is_masked_in_the_rows(
        self, version: str
    ) -> None:
        """A 400 whose message quotes the token the request carried (a gateway between us and
        Amazon): the failed rows' messages show *** instead; a 2.x key's too, whose header
        ("Bearer <t>, Version 2.1") was taken whole for the token, so a bare echo stayed."""
        token = "tok-SEKRIT-0123456789"

        async def handler(request: HttpRequest) -> RawResponse:
            if "token" in request.url:
                return _token(token)
            return _reply(
                400,
                {
                    "type": "ValidationException",
                    "reason": "FieldValidationFailed",
                    "message": f"bad request with credential {token}",
                },
            )

        clock = FakeClock()
        keys = [key_doc(version=version)]
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        async with broker:
            call = asyncio.ensure_future(broker.get_items(asins(3)))
            await clock.run_until(call)
        results = call.result()
        assert {r.status for r in results} == {Status.FAILED}
        for result in results:
            assert result.error is not None
            assert "SEKRIT" not in result.error.message
            assert "***" in result.error.message

    @pytest.mark.parametrize("status", [400, 401])
    async def test_a_gateway_echoing_the_sigv4_signature_is_masked(self, status: int) -> None:
        """A PA-API answer whose message repeats the request's SigV4 signature bare (without
        ``Signature=``): rows and the log show *** instead. The mask looked for a bearer
        token only, and the signature reached rows, the ledger and stderr."""
        seen: list[str] = []

        async def handler(request: HttpRequest) -> RawResponse:
            signature = request.headers["Authorization"].rpartition("Signature=")[2]
            seen.append(signature)
            code = "InvalidParameterValue" if status == 400 else "InvalidSignature"
            message = f"the signature you provided ({signature}) does not match"
            return _reply(status, {"__type": f"com.amazon.paapi5#{code}", "Errors": [
                {"Code": code, "Message": message}
            ]})  # fmt: skip

        clock = FakeClock()
        broker, _ = _broker(PAAPI, handler, clock)
        with capture_logs() as logs:
            async with broker:
                call = asyncio.ensure_future(broker.get_items(asins(3)))
                await clock.run_until(call)
                with contextlib.suppress(Exception):
                    call.result()
        assert seen
        shown = repr(logs) + (
            repr(call.result()) if not call.exception() else repr(call.exception())
        )
        for signature in seen:
            assert signature not in shown


class TestTokenRefreshOnTheSendGrid:
    """A token whose refresh instant falls between the pacer's early wake-up and the slot it
    books is refreshed by the next turn, not by the send already booked."""

    async def test_a_refresh_due_inside_the_pacers_lead_does_not_squeeze_a_gap(self) -> None:
        """Tokens of 4.6 s fetched in 0.3 s at 2 TPS: the refresh instant (2.3 s) is a send
        slot, and the dispatcher looks at the token 0.1 s before it. The send booked there
        still uses the old token (usable until shortly before it expires), so every gap
        stays 0.5 s; it fetched after its booking and left a 0.2-s gap at each refresh."""
        sends, _ = await _paced_sends(expires_in=4.6, count=200)
        gaps = [b - a for a, b in itertools.pairwise(sends)]
        assert min(gaps) >= 0.5 - 1e-6, gaps


class TestStreamInputErrors:
    """An input that fails part way: what it gave before is answered, then its error."""

    @staticmethod
    def _failing(wanted: list[str], kind: str) -> AsyncIterator[str] | Iterator[str]:
        def plain() -> Iterator[str]:
            yield from wanted
            raise ValueError("the database went away")

        async def agen() -> AsyncIterator[str]:
            for asin in plain():
                yield asin

        return agen() if kind == "async" else plain()

    @pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
    @pytest.mark.parametrize("kind", ["async", "sync"])
    async def test_answers_for_what_was_read_come_before_the_error(
        self, kind: str, cached: bool
    ) -> None:
        """The 15 ASINs read before the input raised are yielded (their requests are paid
        for or about to be), then the input's own error, with or without an item cache."""
        clock = FakeClock()
        tables: dict[str, Any] = {"keys": [key_doc(tps=1.0)]}
        if cached:
            tables["cache"] = {"max_age_s": 3_600, "backend": "memory"}

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            return _creators_ok(_ids(request))

        broker, transport = _broker(CREATORS, handler, clock, protocol="creators", **tables)
        wanted = asins(15)
        got: list[ItemResult] = []

        async def consume() -> None:
            async for result in broker.stream(self._failing(wanted, kind)):
                got.append(result)

        async with broker:
            task = asyncio.ensure_future(consume())
            await clock.run_until(task)
            outstanding = broker.metrics().outstanding_lookups
        with pytest.raises(ValueError, match="database went away"):
            task.result()
        assert sorted(r.asin for r in got) == wanted
        assert all(r.ok for r in got)
        assert sorted(len(_ids(r)) for r in transport.requests if "/auth/" not in r.url) == [5, 10]
        assert outstanding == 0

    async def test_an_item_of_the_wrong_type_raises_at_once(self) -> None:
        """A wrong item type is the caller's bug, not the input failing: TypeError at once,
        nothing yielded and nothing more sent."""
        clock = FakeClock()
        broker, transport = _answering(clock, 1.0)
        items: list[object] = [*asins(15), 42]
        got: list[ItemResult] = []

        async def consume() -> None:
            async for result in broker.stream(items):  # type: ignore[arg-type]
                got.append(result)

        async with broker:
            task = asyncio.ensure_future(consume())
            await clock.run_until(task)
        with pytest.raises(TypeError, match="int"):
            task.result()
        assert got == []
        assert all("/auth/" in r.url for r in transport.requests)


class TestCachedStreamInput:
    """With the item cache on, an async input is read a chunk at a time, no further ahead."""

    @staticmethod
    def _cached(clock: FakeClock, **engine: Any) -> Broker:
        cache = {"max_age_s": 3_600, "backend": "memory"}
        broker, _ = _answering(clock, 100.0, cache=cache, engine={"linger_s": 0.2, **engine})
        return broker

    async def test_a_trickling_input_waits_out_one_linger_not_two(self) -> None:
        """An input that gives one ASIN and then nothing for a minute has it answered after
        one linger (the chunk's), not a second one in the batcher."""
        clock = FakeClock()
        broker = self._cached(clock)

        async def trickle() -> AsyncIterator[str]:
            yield "B000000001"
            await clock.sleep(60.0)

        async def first() -> float:
            async for _ in broker.stream(trickle()):
                return clock.monotonic()
            raise AssertionError("no answer")

        async with broker:
            start = clock.monotonic()
            task = asyncio.ensure_future(first())
            await clock.run_until(task)
        assert task.result() - start < 0.3

    async def test_the_input_is_read_no_further_ahead_than_a_chunk(self) -> None:
        """A consumer that stops after three answers has had at most one chunk (100) of its
        input read: what was read and never looked up is lost to a shared queue."""
        clock = FakeClock()
        broker = self._cached(clock, queue_size=5)
        reads = 0

        async def endless() -> AsyncIterator[str]:
            nonlocal reads
            for n in itertools.count():
                reads += 1
                yield f"B{n:09d}"

        async def three() -> None:
            got = 0
            async for _ in broker.stream(endless()):
                got += 1
                if got == 3:
                    break

        async with broker:
            task = asyncio.ensure_future(three())
            await clock.run_until(task)
            await clock.advance(1.0)
        assert reads <= 100


async def test_a_cancelled_chunk_reader_stays_cancelled() -> None:
    """A stream's consumer cancelled just as a chunk's linger timer is being put away is
    cancelled, not handed the chunk: a swallowed cancellation left closing the stream
    waiting for a producer that went on."""
    from broker.clock import LoopClock
    from broker.engine.broker import _chunks

    loop = asyncio.get_running_loop()
    more = asyncio.Event()
    taker: asyncio.Future[list[str | Query]] | None = None

    async def source() -> AsyncIterator[str]:
        yield "B000000000"
        await more.wait()
        for n in range(1, 99):
            yield f"B{n:09d}"
        assert taker is not None
        # The 100th item fills the chunk: the timer is cancelled and awaited, and the
        # consumer's cancellation lands in that very step.
        loop.call_soon(lambda: loop.call_soon(taker.cancel))
        yield "B000000099"

    chunks = _chunks(source(), 100, linger_s=5.0, clock=LoopClock())
    taker = asyncio.ensure_future(anext(chunks))
    await asyncio.sleep(0.05)
    more.set()
    with pytest.raises(asyncio.CancelledError):
        await taker
    await chunks.aclose()


class TestManyCallersUnderFaults:
    """Seeded stress: 150 callers over two resource groups with 429s, 5xx, unreachable
    endpoints, expired tokens, dropped ASINs, cancellations and stream(stop=)."""

    @pytest.mark.parametrize("seed", range(12))
    async def test_every_caller_gets_its_answers_and_nothing_is_left(self, seed: int) -> None:
        """Every batch sent holds at most 10 distinct ASINs of one group; every caller not
        cancelled gets one result per distinct ASIN it asked; nothing stays in flight."""
        rng = random.Random(seed)

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                if rng.random() < 0.05:
                    raise EndpointUnreachable("token endpoint down")
                return _token("tok")
            ids = _ids(request)
            assert len(ids) <= 10
            assert len(set(ids)) == len(ids)
            roll = rng.random()
            if roll < 0.15:
                return _reply(429, {"type": "ThrottleException", "message": "slow down"})
            if roll < 0.22:
                return _reply(500, {"message": "boom"})
            if roll < 0.27:
                raise EndpointUnreachable("down")
            if roll < 0.30:
                return _token_expired()
            return _creators_ok([a for a in ids if rng.random() > 0.1])

        clock = FakeClock()
        broker, _ = _broker(
            CREATORS,
            handler,
            clock,
            protocol="creators",
            keys=[key_doc(tps=rng.choice([1.0, 5.0, 50.0]))],
            engine={"queue_size": 30},
        )
        pool = [f"B0{i:08d}" for i in range(60)]
        groups = (["itemInfo.title"], ["itemInfo.title", "offersV2.listings.price"])

        async def caller() -> None:
            await clock.sleep(rng.random() * 5)
            want = rng.sample(pool, rng.choice([1, 1, 1, 3, 12]))
            resources = rng.choice(groups)
            roll = rng.random()
            if roll < 0.2:
                call = asyncio.ensure_future(broker.get_items(want, resources=resources))
                await clock.sleep(rng.random() * 2)
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                return
            if roll < 0.35:
                stop = asyncio.Event()
                clock_stop = asyncio.ensure_future(clock.sleep(rng.random() * 2))
                clock_stop.add_done_callback(lambda _: stop.set())
                async for result in broker.stream(want, resources=resources, stop=stop):
                    assert result.asin in want
                clock_stop.cancel()
                return
            got = await broker.get_items(want, resources=resources)
            assert sorted(r.asin for r in got) == sorted(set(want))
            assert all(r.query is not None and r.query.resources for r in got)

        async with broker:
            calls = [asyncio.ensure_future(caller()) for _ in range(150)]
            await clock.run_until(asyncio.gather(*calls))
            for call in calls:
                call.result()
            assert broker.metrics().outstanding_lookups == 0


class TestPaapiCallersUnderFaults:
    """Seeded stress on PA-API: malformed ids named in 400s (split out), ids named in none
    (each asked alone), dropped ASINs, 429s, 5xx and cancellations."""

    @pytest.mark.parametrize("seed", range(12))
    async def test_every_caller_gets_one_answer_per_id(self, seed: int) -> None:
        """Every caller not cancelled gets one result per distinct id, bad ids invalid and
        the rest answered; every request holds at most 10 distinct ids; nothing is left."""
        rng = random.Random(seed)
        bad = {f"B0BAD{i:05d}" for i in range(8)}

        async def handler(request: HttpRequest) -> RawResponse:
            ids = _ids(request)
            assert len(ids) <= 10
            assert len(set(ids)) == len(ids)
            named = sorted(set(ids) & bad)
            roll = rng.random()
            if named and roll < 0.7:
                return _paapi_error(
                    400,
                    "InvalidParameterValue",
                    f"The value [{named[0]}] provided in the request for ItemIds is invalid.",
                )
            if named:  # an id-level error that names no id: each is asked alone
                if len(ids) > 1:
                    return _paapi_error(400, "InvalidParameterValue", "")
                return _paapi_error(
                    400,
                    "InvalidParameterValue",
                    f"The value [{ids[0]}] provided in the request for ItemIds is invalid.",
                )
            if roll < 0.12:
                return _paapi_error(429, "TooManyRequests", "slow down")
            if roll < 0.18:
                return _paapi_error(500, "InternalFailure", "Internal failure.")
            return _paapi_ok(ids, skip=tuple(a for a in ids if rng.random() < 0.1))

        clock = FakeClock()
        broker, _ = _broker(PAAPI, handler, clock, engine={"queue_size": 40})
        pool = [f"B0{i:08d}" for i in range(50)] + sorted(bad)

        async def caller() -> None:
            await clock.sleep(rng.random() * 5)
            want = rng.sample(pool, rng.choice([1, 2, 5, 12]))
            if rng.random() < 0.2:
                call = asyncio.ensure_future(broker.get_items(want))
                await clock.sleep(rng.random() * 2)
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                return
            got = await broker.get_items(want)
            assert sorted(r.asin for r in got) == sorted(set(want))
            for result in got:
                if result.asin in bad:
                    assert result.status is Status.INVALID
                else:
                    assert result.status is not Status.INVALID

        async with broker:
            calls = [asyncio.ensure_future(caller()) for _ in range(120)]
            await clock.run_until(asyncio.gather(*calls, return_exceptions=True))
            for call in calls:
                call.result()
            assert broker.metrics().outstanding_lookups == 0


class TestInvalidIds:
    """PA-API fails a whole request for a bad id: mark it, re-send the rest."""

    @pytest.mark.parametrize("echo", ["", " (Signature=" + "ab12" * 16 + ")"])
    async def test_named_id_split_out(self, echo: str) -> None:
        """A 400 InvalidParameterValue naming an id marks it invalid and re-sends the other 9,
        also when the message quotes a signature (a gateway's echo): masked, the error keeps
        its ids (rebuilding it lost them, and every row failed with TypeError)."""
        bad = "B0BAD00001"

        async def handler(request: HttpRequest) -> RawResponse:
            ids = _ids(request)
            if bad in ids:
                return _paapi_error(
                    400,
                    "InvalidParameterValue",
                    f"The value [{bad}] provided in the request for ItemIds is invalid.{echo}",
                )
            return _paapi_ok(ids)

        clock = FakeClock()
        broker, transport = _broker(PAAPI, handler, clock)
        wanted = [*asins(9), bad]
        async with broker:
            results = await _run(broker, clock, wanted)
        by_asin = {r.asin: r for r in results}
        assert by_asin[bad].status is Status.INVALID
        assert by_asin[bad].error is not None
        assert by_asin[bad].error.code == "InvalidParameterValue"
        assert by_asin[bad].error.remedy
        assert "ab12ab12" not in by_asin[bad].error.message
        assert all(by_asin[a].ok and by_asin[a].attempts == 2 for a in asins(9))
        assert [_ids(r) for r in transport.requests] == [wanted, asins(9)]

    async def test_unnamed_id_isolates_each(self) -> None:
        """An id-level 400 naming none of the ids re-asks each id alone."""

        async def handler(request: HttpRequest) -> RawResponse:
            ids = _ids(request)
            if len(ids) > 1:
                return _paapi_error(
                    400,
                    "InvalidParameterValue",
                    "The value [B0ZZZZZZZZ] provided in the request for ItemIds is invalid.",
                )
            return _paapi_ok(ids)

        clock = FakeClock()
        broker, transport = _broker(PAAPI, handler, clock)
        async with broker:
            results = await _run(broker, clock, asins(5))
        assert all(r.ok for r in results)
        assert len(transport.requests) == 1 + 5

    async def test_parameter_not_an_id_fails_the_request(self) -> None:
        """An InvalidParameterValue naming another parameter (Marketplace) fails the rows
        once, as a request error: no id is blamed (invalid) and nothing is re-asked alone."""

        async def handler(request: HttpRequest) -> RawResponse:
            return _paapi_error(
                400,
                "InvalidParameterValue",
                "The value [www.amazon.com] provided in the request for Marketplace is invalid.",
            )

        clock = FakeClock()
        broker, transport = _broker(PAAPI, handler, clock)
        async with broker:
            results = await _run(broker, clock, asins(4))
        assert [r.status for r in results] == [Status.FAILED] * 4
        for result in results:
            assert result.error is not None
            assert result.error.code == "InvalidParameterValue"
            assert "Marketplace" in result.error.message
            assert "Check the ASIN" not in result.error.remedy
        assert len(transport.requests) == 1


class TestPartialAnswers:
    """Responses that leave ASINs out or name them as errors."""

    async def test_several_missing_asins_are_each_reasked(self) -> None:
        """A response leaving out several ASINs: each is re-asked alone and ends (it hung:
        every second one stayed in a batch nothing held)."""
        gone = ("B000000002", "B000000003", "B000000005")

        async def handler(request: HttpRequest) -> RawResponse:
            ids = _ids(request)
            return _paapi_ok(ids, skip=gone if len(ids) > 1 else ())

        clock = FakeClock()
        broker, transport = _broker(PAAPI, handler, clock)
        async with broker:
            task = asyncio.ensure_future(broker.get_items(asins(6)))
            await clock.run_until(task, limit=600)
        assert all(r.ok for r in task.result())
        assert sorted(_ids(r)[0] for r in transport.requests[1:]) == sorted(gone)

    async def test_missing_asin_reasked_then_not_found(self) -> None:
        """An ASIN a response never mentions is re-asked alone, then ends not_found."""
        gone = "B000000003"

        async def handler(request: HttpRequest) -> RawResponse:
            return _paapi_ok(_ids(request), skip=(gone,))

        clock = FakeClock()
        broker, transport = _broker(PAAPI, handler, clock)
        async with broker:
            results = await _run(broker, clock, asins(6))
        by_asin = {r.asin: r for r in results}
        assert by_asin[gone].status is Status.NOT_FOUND
        assert by_asin[gone].error is not None
        assert by_asin[gone].error.code == "MissingFromResponse"
        # A final result: its remedy must not say the broker will retry it by itself.
        error = by_asin[gone].error
        assert error is not None
        assert "retries this by itself" not in error.remedy
        assert sum(r.ok for r in results) == 5
        assert [_ids(r) for r in transport.requests][1:] == [[gone], [gone]]

    async def test_creators_item_errors_are_not_found(self) -> None:
        """A 200 with ``errors`` for some ids: those are not_found (they were well-formed)."""

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            return _creators_ok(
                _ids(request),
                [
                    {
                        "code": "InvalidParameterValue",
                        "message": "The ItemIds B000000002 provided in the request is invalid.",
                    },
                    {
                        "code": "ItemNotAccessible",
                        "message": "The ItemId B000000004 is not accessible through the API.",
                    },
                ],
            )

        clock = FakeClock()
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators")
        async with broker:
            results = await _run(broker, clock, asins(6))
        codes = {r.asin: (r.status, r.error.code if r.error else None) for r in results}
        assert codes["B000000002"] == (Status.NOT_FOUND, "InvalidParameterValue")
        assert codes["B000000004"] == (Status.NOT_FOUND, "ItemNotAccessible")
        assert sum(r.ok for r in results) == 4

    async def test_creators_404_all_not_found(self) -> None:
        """Creators' 404 ResourceNotFoundException: every ASIN of the batch not_found."""

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            return _reply(
                404,
                {
                    "type": "ResourceNotFoundException",
                    "message": "No items found for the requested item IDs.",
                },
            )

        clock = FakeClock()
        broker, transport = _broker(CREATORS, handler, clock, protocol="creators")
        async with broker:
            results = await _run(broker, clock, asins(4))
        assert {r.status for r in results} == {Status.NOT_FOUND}
        assert {r.error.code for r in results if r.error} == {"ResourceNotFoundException"}
        assert len(transport.requests) == 2  # token + one GetItems


class TestRetries:
    """Transient failures back off on the clock; 429s never fail an ASIN."""

    def test_a_batch_s_age_leaves_out_its_wait_for_the_key(self) -> None:
        """After a 429 the batch is due again at once, after a failure when its backoff
        ends: what it waits past that for its key (a park till the reset, its pace) is not
        retrying, and only the retry's own backoff ages it."""
        from broker.engine.attempt import Attempts

        attempts = Attempts()
        attempts.begin(100.0)
        attempts.throttled += 1
        attempts.requeued(100.5)  # the 429's answer
        assert attempts.age(3_700.0) == 0.5  # parked an hour meanwhile
        attempts.begin(3_700.0)
        attempts.requeued(3_700.5 + 2.0)  # a 503 at 3,700.5, and its 2-s backoff
        assert attempts.age(3_702.5) == 3.0  # two half-second requests and the backoff
        attempts.begin(9_000.0)  # the key's daily quota held it till then
        assert attempts.age(9_000.0) == 3.0

    @pytest.mark.parametrize("failures", [1, 2])
    async def test_a_wait_for_the_key_s_daily_quota_is_not_retrying(self, failures: int) -> None:
        """A 503, then the key's daily quota spent (one send a day) while the retry waited:
        the night's wait for the reset counted toward retry.max_age_s, and the next 503 (or
        the first retry) failed the lookup after two attempts of six."""
        sent = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal sent
            if "/auth/" in request.url:
                return _token("tok")
            sent += 1
            if sent <= failures:
                return _reply(503, {"message": "busy"})
            return _creators_ok(_ids(request))

        clock = FakeClock(epoch=dt.datetime(2026, 5, 1, 23, 40, tzinfo=dt.UTC))
        broker, _ = _broker(
            CREATORS,
            handler,
            clock,
            protocol="creators",
            keys=[key_doc(tps=5.0, tpd=2)],  # the guard leaves one send a day
            retry={"base_delay_s": 0.5, "max_delay_s": 2.0, "max_age_s": 600.0},
        )
        async with broker:
            results = await _run(broker, clock, asins(5))
        assert [r.status for r in results] == [Status.OK] * 5
        assert sent == failures + 1

    async def test_a_batch_that_gave_up_is_warned_of_once_a_minute(self) -> None:
        """A 500 every time: the first batch to fail for good is logged at warning level with
        its code and error, the next one of the same key and code within a minute at debug;
        a run said nothing at info level until its rows came out failed."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            return _paapi_error(500, "InternalFailure", "Internal failure.")

        broker, _ = _broker(
            PAAPI,
            handler,
            clock,
            retry={"max_attempts": 2, "base_delay_s": 1.0, "max_delay_s": 1.0},
        )
        with capture_logs() as logs:
            async with broker:
                results = await _run(broker, clock, asins(20))
        assert {r.status for r in results} == {Status.FAILED}
        # Two batches failed; the second, within the minute, is not at warning level.
        failed = [e for e in logs if e["event"] == "broker.batch_failed"]
        assert [e["log_level"] for e in failed if e["log_level"] != "debug"] == ["warning"]
        assert failed[0]["code"] == "InternalFailure"
        assert failed[0]["lookups"] == 10
        assert "Internal failure." in failed[0]["error"]

    async def test_server_errors_exhaust_attempts(self) -> None:
        """A 500 every time: failed after max_attempts, with the last error; budget counts sends."""
        sent_at: list[float] = []
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            sent_at.append(clock.monotonic())
            return _paapi_error(500, "InternalFailure", "Internal failure.")

        broker, transport = _broker(
            PAAPI,
            handler,
            clock,
            retry={"max_attempts": 3, "base_delay_s": 1.0, "max_delay_s": 4.0},
        )
        async with broker:
            results = await _run(broker, clock, asins(3))
            key = broker._keys[0]
            assert key.retry_budget.sends == 3
            metrics = broker.metrics()
        for result in results:
            assert result.status is Status.FAILED
            assert result.attempts == 3
            assert result.error is not None
            assert result.error.code == "InternalFailure"
            # A final answer: it says the broker gave up, and not that it will retry.
            assert "gave up after 3 failed attempts" in result.error.message
            assert "retries this by itself" not in result.error.remedy
            assert "--new-job" in result.error.remedy
        assert len(transport.requests) == 3
        assert sent_at[-1] > sent_at[0]  # jittered backoff slept on the fake clock
        assert metrics.retries == 2
        assert metrics.items_by_status == {"failed": 3}
        assert metrics.keys[0].errors == 3

    async def test_a_server_failing_every_request_is_waited_out(self) -> None:
        """5xx to every request for two minutes: after a streak the key waits between attempts
        as in an outage (B15), so a few batches fail and every other row is ok once it is
        back (without the wait, every row failed within seconds)."""
        clock = FakeClock()
        back_at = clock.monotonic() + 120.0

        async def handler(request: HttpRequest) -> RawResponse:
            if clock.monotonic() < back_at:
                return _paapi_error(503, "ServiceUnavailable", "Service unavailable.")
            return _paapi_ok(_ids(request))

        broker, transport = _broker(PAAPI, handler, clock)
        with capture_logs() as logs:
            async with broker:
                results = await _run(broker, clock, asins(200))
        failed = sum(r.status is Status.FAILED for r in results)
        # Each request still counts, so the batches at the front of the queue (which the
        # probes carry) fail; the other rows wait and are answered once it is back.
        assert failed <= 30
        assert sum(r.status is Status.OK for r in results) == 200 - failed
        assert any(e["event"] == "broker.endpoint_failing" for e in logs)
        # Paused, not hammered: the outage's rounds back off to a minute.
        assert len(transport.requests) < 60

    @pytest.mark.parametrize("where", ["token", "api"])
    @pytest.mark.parametrize("code", ["ProxyRefused", "UntrustedCertificate"])
    async def test_a_refusal_no_wait_mends_takes_every_key_out_at_once(
        self, where: str, code: str
    ) -> None:
        """A proxy refusing (407) or an untrusted certificate, on the token endpoint or the
        API: every key out at once with the code and its remedy, nothing failed; it was
        waited out as an outage (15 minutes for broker run), or failed each row after six
        attempts, told at debug level only."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            if ("/auth/" in request.url) == (where == "token"):
                raise NetworkRefused(f"POST {request.url}: refused", code=code)
            if "/auth/" in request.url:
                return _token("tok")
            return _creators_ok(_ids(request))

        keys = [key_doc("a"), key_doc("b")]
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        started = clock.monotonic()
        async with broker:
            call = asyncio.ensure_future(broker.get_items(asins(3)))
            await clock.run_until(call)
            with pytest.raises(NoUsableKeyError) as caught:
                call.result()
        assert clock.monotonic() - started < 5.0
        failures = caught.value.failures
        assert failures
        assert {failure.code for failure in failures} == {code}
        assert all(failure.remedy == describe(code).remedy for failure in failures)

    @pytest.mark.parametrize(
        ("status", "code"), [(500, "server_error"), (400, "temporarily_unavailable")]
    )
    async def test_a_token_endpoint_failing_past_the_budget_is_named_as_such(
        self, status: int, code: str
    ) -> None:
        """A token endpoint failing past retry.outage_budget_s (the API never asked), with a
        500, or a 400 whose OAuth code says to try later: an outage (rows pending, exit 69
        for a job), not a rejected key; the key's failure says the last error was the token
        endpoint's, and its remedy names api.token_endpoint (it read as the API's outage)."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _reply(status, {"error": code})
            return _creators_ok(_ids(request))

        broker, _ = _broker(
            CREATORS, handler, clock, protocol="creators", retry={"outage_budget_s": 60.0}
        )
        failure = await _outage_refusal(broker, clock)
        assert "the token endpoint's last error: " in failure.message
        assert code in failure.message
        assert "api.token_endpoint" in failure.remedy

    async def test_a_server_failing_past_the_outage_budget_stops_the_run(self) -> None:
        """5xx to every request for longer than retry.outage_budget_s: the run stops with the
        outage error (exit 69 for a job), most rows unanswered rather than failed."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            return _paapi_error(500, "InternalFailure", "Internal failure.")

        broker, _ = _broker(PAAPI, handler, clock, retry={"outage_budget_s": 60.0})
        got: list[ItemResult] = []

        async def consume() -> None:
            async for result in broker.stream(asins(200)):
                got.append(result)

        async with broker:
            task = asyncio.get_running_loop().create_task(consume())
            await clock.run_until(task)
            with pytest.raises(NoUsableKeyError) as caught:
                task.result()
        assert caught.value.failures[0].code == OUTAGE_CODE
        # Only the batches the probes carried spent their attempts; the rest stay unanswered.
        assert len(got) <= 30
        assert {r.status for r in got} <= {Status.FAILED}

    async def test_a_short_outage_is_told_in_tenths_of_a_second(self) -> None:
        """An outage budget under a second (broker lookup --outage-budget 0.4) is told as
        the time waited, "for 0.4 s"; it said "for 0 s" after "gave up after 0.4 s"."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            raise EndpointUnreachable("connection refused")

        broker, _ = _broker(PAAPI, handler, clock, retry={"outage_budget_s": 0.4})
        failure = await _outage_refusal(broker, clock)
        assert re.search(r"token endpoint for 0\.[4-9] s", failure.message), failure.message

    async def test_a_key_out_for_an_outage_comes_back_for_a_later_call(self) -> None:
        """A broker kept for the life of an app outlives an outage: once the budget took the
        key out, calls fail at once; a call made OUTAGE_RETRY_S later tries the endpoint
        again, once: still down, it fails after that one attempt; back, it is answered."""
        clock = FakeClock()
        down = True

        async def handler(request: HttpRequest) -> RawResponse:
            if down:
                raise EndpointUnreachable("connection refused")
            if "/auth/" in request.url:
                return _token("tok")
            return _creators_ok(_ids(request))

        broker, transport = _broker(
            CREATORS, handler, clock, protocol="creators", retry={"outage_budget_s": 60.0}
        )
        loop = asyncio.get_running_loop()
        async with broker:
            first = loop.create_task(broker.get_items(asins(3)))
            await clock.run_until(first)
            with pytest.raises(NoUsableKeyError) as caught:
                first.result()
            assert caught.value.failures[0].code == OUTAGE_CODE
            tried = len(transport.requests)
            # At once: no request, the same error.
            with pytest.raises(NoUsableKeyError):
                await broker.get_items(asins(3, "B1"))
            assert len(transport.requests) == tried
            # Later, still down: one attempt, then the error again, with no new budget.
            await clock.advance(OUTAGE_RETRY_S)
            started = clock.monotonic()
            with capture_logs() as logs:
                again = loop.create_task(broker.get_items(asins(3, "B2")))
                await clock.run_until(again)
            with pytest.raises(NoUsableKeyError):
                again.result()
            assert len(transport.requests) == tried + 1
            assert clock.monotonic() - started < 5
            assert "broker.key_revived" in [e["event"] for e in logs]
            # Later still, and the endpoint is back: answered.
            down = False
            await clock.advance(OUTAGE_RETRY_S)
            back = loop.create_task(broker.get_items(asins(3, "B3")))
            await clock.run_until(back)
            assert [r.status for r in back.result()] == [Status.OK] * 3
            assert broker.metrics().keys[0].state == "active"

    async def test_a_key_out_for_an_outage_comes_back_while_another_serves(self) -> None:
        """Two keys for one marketplace; an outage of key a's token endpoint takes a out while
        b serves on. Once it is over, a call made OUTAGE_RETRY_S later brings a back: it
        stayed out for the broker's life (a daemon's), as a revival was tried only for a
        marketplace no key served any more."""
        clock = FakeClock()
        down = True

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                if down and b"id-a" in request.body:
                    raise EndpointUnreachable("connection refused")
                return _token("tok")
            return _creators_ok(_ids(request))

        keys = [
            key_doc("a", credential_id="id-a", tps=5.0),
            key_doc("b", credential_id="id-b", tps=5.0),
        ]
        broker, _ = _broker(
            CREATORS, handler, clock, protocol="creators", keys=keys, retry={"outage_budget_s": 2}
        )
        loop = asyncio.get_running_loop()
        async with broker:
            first = loop.create_task(broker.get_items(asins(300)))  # b alone: 6 s
            await clock.run_until(first)
            assert all(r.ok for r in first.result())
            states = {k.name: k.state for k in broker.metrics().keys}
            assert states == {"a": "disabled", "b": "active"}
            down = False
            sent = {k.name: k.sent for k in broker.metrics().keys}["a"]
            await clock.advance(OUTAGE_RETRY_S)
            with capture_logs() as logs:
                again = loop.create_task(broker.get_items(asins(300, "B1")))
                await clock.run_until(again)
            assert all(r.ok for r in again.result())
            assert "broker.key_revived" in [e["event"] for e in logs]
            after = {k.name: k for k in broker.metrics().keys}["a"]
            assert after.state == "active"
            assert after.sent > sent  # and it sends again

    async def test_a_failing_key_sends_one_request_at_a_time(self) -> None:
        """Once its answers fail in a row, a key with four slots sends one request at a time,
        so each pause's end costs one batch one attempt, not four."""
        clock = FakeClock()
        back_at = clock.monotonic() + 90.0
        answered = 0
        in_flight = 0
        overlap_after_streak = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal answered, in_flight, overlap_after_streak
            # Counted among the requests begun once 14 had failed (10 make the streak, and
            # up to 4 were on their way then) and before the server is back.
            late = answered >= 14 and clock.monotonic() < back_at
            in_flight += late
            overlap_after_streak = max(overlap_after_streak, in_flight)
            await clock.sleep(0.2)
            in_flight -= late
            answered += 1
            if clock.monotonic() < back_at:
                return _paapi_error(503, "ServiceUnavailable", "Service unavailable.")
            return _paapi_ok(_ids(request))

        broker, _ = _broker(PAAPI, handler, clock, keys=[paapi_key_doc(max_in_flight=4)])
        async with broker:
            results = await _run(broker, clock, asins(100))
        assert overlap_after_streak == 1
        assert sum(r.status is Status.OK for r in results) >= 80

    async def test_the_failing_streak_is_the_apis_and_recent(self) -> None:
        """Only the API's failed answers make the streak: a refused token fetch leaves it,
        and a failure long after the last one starts it afresh (a storm that outlasted a
        daemon's last job does not make the next day's first 5xx an outage)."""
        clock = FakeClock()
        broker, _ = _broker(PAAPI, lambda request: _never(), clock)  # type: ignore[arg-type,return-value]
        async with broker:
            key = broker._keys[0]
            for _ in range(10):
                key.on_failed_answer()
            assert key.failing_systemically
            key.on_unreachable(EndpointUnreachable("refused"), clock.monotonic())
            assert key.failing_systemically
            await clock.advance(3600.0)
            key.on_failed_answer()
            assert not key.failing_systemically

    async def test_batches_that_always_fail_fail_and_keep_the_key(self) -> None:
        """A request that fails whatever the API's state (a poison batch) fails after its
        attempts, even when such batches make the whole streak: the key stays, and the
        other rows are answered (review: they once held the key until the outage budget)."""
        clock = FakeClock()
        poison = set(asins(30))

        async def handler(request: HttpRequest) -> RawResponse:
            if poison & set(_ids(request)):
                return _paapi_error(500, "InternalFailure", "Internal failure.")
            return _paapi_ok(_ids(request))

        broker, _ = _broker(PAAPI, handler, clock)
        async with broker:
            results = await _run(broker, clock, asins(40))
        assert {r.asin for r in results if r.status is Status.FAILED} == poison
        assert sum(r.status is Status.OK for r in results) == 10
        assert all(r.attempts == 6 for r in results if r.status is Status.FAILED)

    @pytest.mark.parametrize("where", ["api", "token endpoint"])
    async def test_the_outage_budget_is_kept_not_overshot(self, where: str) -> None:
        """Pauses that double (1, 2, 4 ... s) stop at the budget: the key is out within about
        retry.outage_budget_s, not at the end of a pause that began just before it ran out."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                if where == "api":
                    return _token("tok")
                return _reply(500, {"error": "server_error"})  # answers, but no token
            raise EndpointUnreachable("connection refused")

        broker, _ = _broker(
            CREATORS, handler, clock, protocol="creators", retry={"outage_budget_s": 20.0}
        )
        assert 20.0 <= await _seconds_until_refused(broker, clock) < 21.0

    async def test_a_hanging_token_endpoint_counts_toward_the_outage_budget_from_the_send(
        self,
    ) -> None:
        """Token fetches that hang until their 30-s timeout, under a 5-s budget: the key is
        out at the first timeout (the outage began at its send), not after a second hang
        that began once the first failure was told (a lookup's 5 s took 63)."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            await clock.sleep(30.0)
            raise RequestTimeout(f"POST {request.url}: timed out")

        broker, _ = _broker(
            CREATORS, handler, clock, protocol="creators", retry={"outage_budget_s": 5.0}
        )
        assert 30.0 <= await _seconds_until_refused(broker, clock) < 31.0

    async def test_keys_out_at_different_times_do_not_revive_each_other(self) -> None:
        """Two entries of one credential (one token cache) whose token endpoint hangs 30 s
        a fetch (the first 60 s), under a 100-s budget: the call ends once both are out,
        within about the budget and a hang or two. Taken out 30 s apart, each one's take-out
        brought the other back (its 30 s were up) to probe for another hang, and the call
        went on for two hours."""
        clock = FakeClock()
        fetches = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal fetches
            if "/auth/" in request.url:
                fetches += 1
                await clock.sleep(60.0 if fetches == 1 else 30.0)
                raise RequestTimeout(f"POST {request.url}: timed out")
            return _creators_ok(_ids(request))

        broker, _ = _broker(
            CREATORS,
            handler,
            clock,
            protocol="creators",
            keys=[key_doc("a", tps=5.0), key_doc("b", tps=5.0)],
            retry={"outage_budget_s": 100.0},
        )
        assert await _seconds_until_refused(broker, clock) < 300.0

    async def test_a_key_back_from_its_outage_rejoins_a_call_another_key_serves(self) -> None:
        """Two PA-API keys, one call of 3,000 ASINs: key a's endpoint is unreachable for its
        first 150 s (out after its 60-s budget), key b serves on, some of its sends
        throttled. Key a comes back within the call once its 30 s are up and sends again:
        a batch sent back to the queue while another key serves still revives it."""
        clock = FakeClock()
        start = clock.monotonic()
        sends = {"a": 0, "b": 0}

        async def handler(request: HttpRequest) -> RawResponse:
            name = "a" if "Credential=AKEYA/" in request.headers["Authorization"] else "b"
            if name == "a" and clock.monotonic() - start < 150.0:
                raise EndpointUnreachable("connection refused")
            sends[name] += 1
            if name == "b" and sends["b"] % 5 == 0:
                return _DENIED_429
            return _paapi_ok(_ids(request))

        keys = [
            paapi_key_doc("a", credential_id="AKEYA", tps=1.0),
            paapi_key_doc("b", credential_id="AKEYB", tps=1.0),
        ]
        broker, _ = _broker(PAAPI, handler, clock, keys=keys, retry={"outage_budget_s": 60.0})
        async with broker:
            task = asyncio.ensure_future(broker.get_items(asins(3000)))
            await clock.run_until(task)
            results = task.result()
        assert all(r.ok for r in results)
        assert sends["a"] > 0

    async def test_timeout_retried(self) -> None:
        """A transport timeout is retried and counted as a transport error."""
        calls = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RequestTimeout("POST https://paapi.test/paapi5/getitems: timed out")
            return _paapi_ok(_ids(request))

        clock = FakeClock()
        broker, _ = _broker(PAAPI, handler, clock)
        async with broker:
            results = await _run(broker, clock, asins(3))
            metrics = broker.metrics()
        assert all(r.ok and r.attempts == 2 for r in results)
        assert (metrics.transport_errors, metrics.retries) == (1, 1)

    async def test_a_retry_whose_caller_left_is_not_counted(self) -> None:
        """A retry scheduled for a batch whose caller leaves during its delay never goes,
        so the retries counter (a job's "retries", asinb_retries_total) leaves it out."""
        calls = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal calls
            calls += 1
            raise RequestTimeout("POST https://paapi.test/paapi5/getitems: timed out")

        clock = FakeClock()
        broker, _ = _broker(PAAPI, handler, clock, retry={"base_delay_s": 5.0, "max_delay_s": 30.0})
        async with broker:
            task = asyncio.get_running_loop().create_task(broker.get_items(asins(3)))
            await clock.advance(1.0)  # the first send failed; its retry waits out its delay
            assert calls == 1
            task.cancel()
            await clock.advance(60.0)
            metrics = broker.metrics()
        assert calls == 1
        assert (metrics.requests, metrics.transport_errors, metrics.retries) == (1, 1, 0)

    async def test_429s_never_fail_an_asin(self) -> None:
        """Ten 429s in a row with max_attempts 2: the ASINs still end ok; the rate is cut."""
        handler = _first_answers([_DENIED_429] * 10)
        clock = FakeClock()
        broker, _ = _broker(PAAPI, handler, clock, retry={"max_attempts": 2})
        async with broker:
            results = await _run(broker, clock, asins(5))
            metrics = broker.metrics()
        assert all(r.ok for r in results)
        assert results[0].attempts == 11
        assert metrics.throttled == 10
        assert metrics.keys[0].rate < 100.0
        assert metrics.retries == 0

    async def test_429s_do_not_spend_the_attempts_of_other_failures(self) -> None:
        """Four 429s, then a 503, with max_attempts 3: the 503 is the first failure that
        counts, so it is retried and the ASINs end ok (a busy Amazon fails no rows)."""
        unavailable = _reply(503, {"message": "Service Unavailable"})
        handler = _first_answers([*[_DENIED_429] * 4, unavailable])

        clock = FakeClock()
        broker, _ = _broker(PAAPI, handler, clock, retry={"max_attempts": 3})
        async with broker:
            results = await _run(broker, clock, asins(3))
        assert all(r.ok for r in results)
        assert results[0].attempts == 6

    async def test_a_new_lookup_does_not_join_a_batch_already_tried(self) -> None:
        """A lookup arriving while a partial batch waits to be retried (a 503, the key's
        next slot far off) starts a batch of its own: it inherits no attempts or age."""
        sent: list[list[str]] = []

        async def handler(request: HttpRequest) -> RawResponse:
            sent.append(_ids(request))
            if len(sent) == 1:
                return _reply(503, {"message": "Service Unavailable"})
            return _paapi_ok(_ids(request))

        clock = FakeClock()
        key = paapi_key_doc(tps=0.1)  # one send every 10 s: the retry waits queued
        broker, _ = _broker(PAAPI, handler, clock, keys=[key])
        first, second = asins(3)[:2], asins(3)[2:]
        async with broker:
            loop = asyncio.get_running_loop()
            early = loop.create_task(broker.get_items(first))
            await clock.advance(5.0)
            assert sent == [first]
            late = loop.create_task(broker.get_items(second))
            await clock.run_until(asyncio.gather(early, late))
        assert sent == [first, first, second]
        assert [r.attempts for r in late.result()] == [1]
        assert [r.attempts for r in early.result()] == [2, 2]

    async def test_a_throttled_batch_is_sent_again_before_queued_ones(self) -> None:
        """A 429'd batch goes back to the head of the queue: the next send is its retry."""
        sent: list[list[str]] = []

        async def handler(request: HttpRequest) -> RawResponse:
            ids = _ids(request)
            sent.append(ids)
            if len(sent) == 1:
                return _paapi_error(429, "TooManyRequests", "The request was denied.")
            return _paapi_ok(ids)

        clock = FakeClock()
        key = paapi_key_doc(max_in_flight=1)
        broker, _ = _broker(PAAPI, handler, clock, keys=[key])
        async with broker:
            results = await _run(broker, clock, asins(40))
        assert all(r.ok for r in results)
        assert len(sent) == 5
        assert sent[1] == sent[0]

    async def test_retry_after_pauses_the_key(self) -> None:
        """A 429 with Retry-After: 5 holds the key 5 s (on the fake clock)."""
        sent_at: list[float] = []
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            sent_at.append(clock.monotonic())
            if len(sent_at) == 1:
                return _paapi_error(429, "TooManyRequests", "Slow down.", {"retry-after": "5"})
            return _paapi_ok(_ids(request))

        broker, _ = _broker(PAAPI, handler, clock)
        async with broker:
            results = await _run(broker, clock, asins(2))
        assert all(r.ok for r in results)
        assert sent_at[1] - sent_at[0] >= 5.0

    async def test_unexpected_exception_fails_batch(self) -> None:
        """A bug below the executor fails the batch (logged) instead of hanging its callers;
        its rows' remedy says so (it was the catalogue's "Read Amazon's message")."""

        async def handler(request: HttpRequest) -> RawResponse:
            raise ValueError("boom")

        clock = FakeClock()
        broker, _ = _broker(PAAPI, handler, clock)
        with capture_logs() as logs:
            async with broker:
                results = await _run(broker, clock, asins(2))
        assert {r.status for r in results} == {Status.FAILED}
        assert {r.error.code for r in results if r.error} == {"ValueError"}
        # Nothing of Amazon's to read: the row says the fault is the broker's.
        assert {r.error.remedy for r in results if r.error} == {CRASH_REMEDY}
        assert [e["event"] for e in logs].count("broker.attempt_crashed") == 1


class TestCredentials:
    """Token endpoint trouble pauses a key; expired tokens cost one refresh."""

    async def test_token_endpoint_throttled_pauses_not_disables(self) -> None:
        """A 429 from the token endpoint pauses the key and tries again; the key stays usable."""
        token_calls = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal token_calls
            if "/auth/" in request.url:
                token_calls += 1
                if token_calls == 1:
                    return _reply(429, {"error": "slow_down"})
                return _token("tok")
            return _creators_ok(_ids(request))

        clock = FakeClock()
        start = clock.monotonic()
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators")
        with capture_logs() as logs:
            async with broker:
                results = await _run(broker, clock, asins(3))
                state = broker.metrics().keys[0].state
        assert all(r.ok and r.attempts == 1 for r in results)
        assert token_calls == 2
        assert state == "active"
        events = [e["event"] for e in logs]
        assert "broker.key_disabled" not in events
        assert events.count("broker.token_fetch_failed") == 1
        assert clock.monotonic() - start >= 1.0

    @pytest.mark.parametrize("code", ["temporarily_unavailable", "server_error", "slow_down"])
    async def test_an_oauth_try_later_code_sent_with_400_pauses_not_disables(
        self, code: str
    ) -> None:
        """An OAuth2 "try later" error (temporarily_unavailable, server_error, slow_down)
        sent with HTTP 400 pauses the key and tries again, as a 5xx: it rejected the key,
        exit 77, though nothing was wrong with it."""
        token_calls = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal token_calls
            if "/auth/" in request.url:
                token_calls += 1
                if token_calls == 1:
                    return _reply(400, {"error": code})
                return _token("tok")
            return _creators_ok(_ids(request))

        clock = FakeClock()
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators")
        with capture_logs() as logs:
            async with broker:
                results = await _run(broker, clock, asins(3))
                state = broker.metrics().keys[0].state
        assert all(r.ok for r in results)
        assert token_calls == 2
        assert state == "active"
        events = [e["event"] for e in logs]
        assert "broker.key_disabled" not in events
        assert events.count("broker.token_fetch_failed") == 1

    async def test_a_throttling_token_endpoint_is_asked_again_after_its_retry_after(
        self,
    ) -> None:
        """The token endpoint's 429 with Retry-After: 30 pauses the key 30 s, not the 2 s of
        a failure's first back-off (it was asked twice in 5 s, and throttled again)."""
        token_calls: list[float] = []
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                token_calls.append(clock.monotonic())
                if len(token_calls) == 1:
                    return _reply(429, {"error": "slow_down"}, {"Retry-After": "30"})
                return _token("tok")
            return _creators_ok(_ids(request))

        broker, _ = _broker(CREATORS, handler, clock, protocol="creators")
        async with broker:
            results = await _run(broker, clock, asins(3))
        assert all(r.ok for r in results)
        assert len(token_calls) == 2
        assert token_calls[1] - token_calls[0] >= 30.0

    async def test_keys_naming_one_credential_share_its_token(self) -> None:
        """Two [[keys]] entries naming one credential (one account, README) fetch one token
        between them, and a TokenExpired on either drops it for both (one fetch more): each
        entry fetched its own, though the docstrings said one cache per credential. Another
        credential, or the same id with another secret, keeps a token of its own."""
        fetched: Counter[tuple[str, str]] = Counter()
        expired: list[str] = []

        async def handler(request: HttpRequest) -> RawResponse:
            if request.url.endswith("/token"):
                body = json.loads(request.body) if request.body[:1] == b"{" else {}
                fields = body or dict(urllib.parse.parse_qsl(request.body.decode()))
                credential = (fields["client_id"], fields["client_secret"])
                fetched[credential] += 1
                return _token(f"{credential[1]}-{fetched[credential]}")
            if request.headers["Authorization"] == "Bearer demo-secret-1" and not expired:
                expired.append(request.headers["Authorization"])
                return _token_expired()
            return _creators_ok(_ids(request))

        keys = [
            key_doc("a", tps=5.0),
            key_doc("b", tps=5.0),
            key_doc("c", tps=5.0, env="ASINB_OTHER_SECRET"),
            key_doc(
                "v2", tps=5.0, credential_id="demo-v2-id", env="ASINB_V2_SECRET", version="2.1"
            ),
        ]
        clock = FakeClock()
        broker, _ = _broker(
            CREATORS,
            handler,
            clock,
            protocol="creators",
            keys=keys,
            environ={"ASINB_OTHER_SECRET": "another-secret"},
            engine={"batch_size": 1, "linger_s": 0.0},
        )
        async with broker:
            results = await _run(broker, clock, asins(40))
        assert all(r.ok for r in results)
        assert {r.key for r in results} == {"a", "b", "c", "v2"}
        assert expired
        assert fetched == {
            ("demo-id", "demo-secret"): 2,
            ("demo-id", "another-secret"): 1,
            ("demo-v2-id", "demo-v2-secret"): 1,
        }

    async def test_token_expired_single_refresh(self) -> None:
        """Three requests rejected with the same expired token cause one token refresh."""
        tokens = iter(["tok1", "tok2", "tok3"])
        token_calls = 0
        stale: list[HttpRequest] = []
        all_stale = asyncio.Event()

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal token_calls
            if "/auth/" in request.url:
                token_calls += 1
                return _token(next(tokens))
            if request.headers["Authorization"] == "Bearer tok1":
                stale.append(request)
                if len(stale) == 3:
                    all_stale.set()
                await all_stale.wait()
                return _token_expired()
            return _creators_ok(_ids(request))

        clock = FakeClock()
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators")
        with capture_logs() as logs:
            async with broker:
                results = await _run(broker, clock, asins(30))
        assert all(r.ok and r.attempts == 1 for r in results)
        assert token_calls == 2
        refreshed = [e for e in logs if e["event"] == "broker.credentials_refreshed"]
        assert len(refreshed) == 3

    async def test_refusals_of_one_batch_while_others_are_accepted_are_retried(self) -> None:
        """A batch refused after each fresh token, while the key's other requests are accepted
        with those tokens, is retried as a transient error: the key stays in rotation."""
        unlucky = asins(30)[0]
        refusals = 0
        accepted = 0
        progress = asyncio.Condition()
        tokens = itertools.count(1)

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal refusals, accepted
            if "/auth/" in request.url:
                return _token(f"tok{next(tokens)}")
            ids = _ids(request)
            if unlucky in ids and refusals < 3:
                refusals += 1
                # Answered only once another request, sent after this one, was accepted.
                async with progress:
                    await progress.wait_for(lambda: accepted >= refusals)
                return _token_expired()
            async with progress:
                accepted += 1
                progress.notify_all()
            return _creators_ok(ids)

        clock = FakeClock()
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators")
        with capture_logs() as logs:
            async with broker:
                results = await _run(broker, clock, asins(60))
        assert refusals == 3
        assert all(r.ok for r in results)
        assert {r.attempts for r in results if r.asin == unlucky} == {2}
        events = [e["event"] for e in logs]
        assert "broker.key_disabled" not in events
        assert events.count("broker.credentials_refreshed") == 2

    async def test_refused_batch_waits_for_the_next_one_to_judge_the_key(self) -> None:
        """One request at a time: a batch refused thrice goes behind the waiting work, whose
        acceptance shows the credentials work; the batch is answered, the key stays."""
        unlucky = asins(30)[0]
        refusals = 0
        tokens = itertools.count(1)

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal refusals
            if "/auth/" in request.url:
                return _token(f"tok{next(tokens)}")
            ids = _ids(request)
            if unlucky in ids and refusals < 3:
                refusals += 1
                return _token_expired()
            return _creators_ok(ids)

        clock = FakeClock()
        keys = [key_doc(max_in_flight=1)]
        broker, transport = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        with capture_logs() as logs:
            async with broker:
                results = await _run(broker, clock, asins(30))
        assert all(r.ok for r in results)
        events = [e["event"] for e in logs]
        assert "broker.key_disabled" not in events
        assert events.count("broker.auth_error_deferred") == 1
        sent = [_ids(r) for r in transport.requests if "/auth/" not in r.url]
        assert [unlucky in ids for ids in sent] == [True, True, True, False, False, True]

    async def test_every_fresh_token_refused_takes_the_key_out_after_six(self) -> None:
        """Every token refused, one request at a time, work waiting: the first batch defers
        to the next, whose three refusals make six in a row; the key is out, no loop."""

        async def handler(request: HttpRequest) -> RawResponse:
            if "/auth/" in request.url:
                return _token("tok")
            return _token_expired()

        clock = FakeClock()
        keys = [key_doc(max_in_flight=1)]
        broker, transport = _broker(CREATORS, handler, clock, protocol="creators", keys=keys)
        with capture_logs() as logs:
            async with broker:
                task = asyncio.get_running_loop().create_task(broker.get_items(asins(50)))
                await clock.run_until(task)
        assert isinstance(task.exception(), NoUsableKeyError)
        assert "credentials rejected" in str(task.exception())
        assert len([r for r in transport.requests if "/auth/" not in r.url]) == 6
        assert [e["event"] for e in logs].count("broker.key_disabled") == 1

    async def test_credentials_refused_in_one_marketplace_take_the_key_out_there(self) -> None:
        """Tokens refused for DE while accepted for US: not noise (the acceptances are in
        another marketplace), so the key leaves DE, saying why, and US goes on."""

        clock = FakeClock()
        handler = _refusing_de(_token_expired())
        broker, transport = _broker(CREATORS, handler, clock, protocol="creators", keys=_US_DE)
        with capture_logs() as logs:
            async with broker:
                loop = asyncio.get_running_loop()
                us = loop.create_task(broker.get_items(asins(200)))
                de = loop.create_task(broker.get_items(asins(50), marketplace=DE))
                await clock.run_until(asyncio.ensure_future(asyncio.wait([us, de])))
        assert all(r.ok for r in us.result())
        assert isinstance(de.exception(), NoUsableKeyError)
        assert "credentials rejected for www.amazon.de" in str(de.exception())
        (disabled,) = [e for e in logs if e["event"] == "broker.key_disabled"]
        assert disabled["marketplace"] == DE
        refused = [r for r in transport.requests if r.headers.get("x-marketplace") == DE]
        assert len(refused) <= 5 * 3 + 6  # no batch is sent on and on

    async def test_partner_tag_disables_key_in_one_marketplace(self) -> None:
        """InvalidPartnerTag takes the key out of that marketplace only."""

        bad_tag = {
            "type": "ValidationException",
            "reason": "InvalidPartnerTag",
            "message": "The partner tag is invalid.",
        }
        clock = FakeClock()
        handler = _refusing_de(_reply(400, bad_tag))
        broker, _ = _broker(CREATORS, handler, clock, protocol="creators", keys=_US_DE)
        with capture_logs() as logs:
            async with broker:
                task = asyncio.get_running_loop().create_task(
                    broker.get_items(asins(3), marketplace=DE)
                )
                await clock.run_until(task)
                error = task.exception()
                assert isinstance(error, NoUsableKeyError)
                assert [(f.key, f.code) for f in error.failures] == [("demo", "InvalidPartnerTag")]
                results = await _run(broker, clock, asins(3))
                state = broker.metrics().keys[0].state
        assert all(r.ok for r in results)
        assert state == "active"
        disabled = [e for e in logs if e["event"] == "broker.key_disabled"]
        assert len(disabled) == 1
        assert disabled[0]["marketplace"] == DE


class TestEngineMetrics:
    def test_items_counted_by_status_value(self) -> None:
        """Finished lookups are counted by status value, ok ones included, none shown as 0."""
        metrics = EngineMetrics()
        assert metrics.items_by_status == {}
        for status in (Status.OK, Status.NOT_FOUND, Status.OK, Status.FAILED, Status.INVALID):
            metrics.record_item(status)
        assert metrics.items_by_status == {"ok": 2, "not_found": 1, "failed": 1, "invalid": 1}
        snapshot = metrics.snapshot(queued_batches=0, outstanding_lookups=0, keys=())
        assert snapshot.items_by_status == metrics.items_by_status
