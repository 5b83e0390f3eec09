"""The engine's seams under concurrency: each test is a defect reproduced in shared/repros.

N5 (admitted after the last key died), N7 (a pause set while idle), N8 (another caller's
cancellation), N9 (an abandoned probe), N11 (abandoned work held), N12 (a second event
loop), N15 (closing with callers waiting), K3 (a busy pool is not an outage), K6 (an
outage ages no lookup), and identity: every result carries the query that asked for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from conftest import Harness, OutageStore, key_doc, make_config, paapi_key_doc

from broker.api.base import HttpRequest, RawResponse
from broker.client import Broker
from broker.engine.adaptive import CircuitState, ThrottleVerdict
from broker.engine.transport import AiohttpTransport, MockTransport
from broker.errors import (
    BrokerClosedError,
    ConfigError,
    EndpointUnreachable,
    NoUsableKeyError,
    WrongEventLoopError,
)
from broker.models import ItemResult, Query, Status
from broker.simulator.settings import LatencyProfile, SimulatorSettings
from broker.state import Decision, MemoryStateStore
from broker.testing import FakeClock, settle

FREE = SimulatorSettings(limits=False)
UK = "www.amazon.co.uk"
US = "www.amazon.com"
PAAPI_ENDPOINT = "http://127.0.0.1:9"

DENIED = json.dumps(
    {
        "__type": "com.amazon.paapi5#AccessDeniedException",
        "Errors": [{"Code": "AccessDenied", "Message": "not enabled"}],
    }
).encode()
THROTTLED = json.dumps(
    {
        "__type": "com.amazon.paapi5#TooManyRequestsException",
        "Errors": [{"Code": "TooManyRequests", "Message": "slow down"}],
    }
).encode()


def _paapi_body(*asins: str) -> bytes:
    items = [{"ASIN": a, "ItemInfo": {"Title": {"DisplayValue": f"t {a}"}}} for a in asins]
    return json.dumps({"ItemsResult": {"Items": items}}).encode()


def _asked(request: HttpRequest) -> list[str]:
    return list(json.loads(request.body)["ItemIds"])


def _answering(sent: list[str]) -> Callable[[HttpRequest], Awaitable[RawResponse]]:
    """A handler answering every ASIN asked, noting each in ``sent``."""

    async def handler(request: HttpRequest) -> RawResponse:
        asked = _asked(request)
        sent.extend(asked)
        return RawResponse(200, {}, _paapi_body(*asked), 0.01)

    return handler


def _paapi(**tables: dict[str, object]) -> object:
    keys = tables.pop("keys", None)
    return make_config(
        PAAPI_ENDPOINT,
        protocol="paapi5",
        keys=keys if keys is not None else [paapi_key_doc()],  # type: ignore[arg-type]
        **tables,
    )


class TestDeadKeys:
    """N5: nobody waits for a key that will never come."""

    async def test_caller_admitted_after_last_key_died_fails_at_once(self) -> None:
        """A caller waiting for room when the last key dies gets NoUsableKeyError (N5)."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            await clock.sleep(0.5)
            return RawResponse(403, {}, DENIED, 0.5)

        config = _paapi(engine={"queue_size": 1})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            loop = asyncio.get_running_loop()
            a = loop.create_task(broker.get_item("B000000001"))
            await asyncio.sleep(0.01)
            b = loop.create_task(broker.get_item("B000000002"))
            await asyncio.sleep(0.01)
            await clock.run_until(a, limit=60)
            assert isinstance(a.exception(), NoUsableKeyError)
            await clock.run_until(b, limit=5)
            assert isinstance(b.exception(), NoUsableKeyError)
            metrics = broker.metrics()
            assert metrics.outstanding_lookups == 0
            assert metrics.queued_batches == 0

    async def test_a_call_larger_than_the_queue_fails_when_one_of_its_stores_dies(self) -> None:
        """get_items over more queries than queue_size, one store of which loses its last
        key: the call raises NoUsableKeyError at once, as stream() does, and waits for no
        more room. It went on admitting the rest, waiting for room that only the other store's
        slow (or quota-held) lookups could free, and raised once all was admitted: hours
        later, or after sending every remaining request for nothing."""
        clock = FakeClock()
        us_sent: list[str] = []

        async def handler(request: HttpRequest) -> RawResponse:
            if json.loads(request.body)["Marketplace"] == UK:
                return RawResponse(403, {}, DENIED, 0.01)
            us_sent.extend(_asked(request))
            await clock.sleep(3600.0)  # a key waiting for its daily reset, say
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 3600.0)

        keys = [
            paapi_key_doc("us", tags={US: "us-20"}),
            paapi_key_doc("uk", credential_id="UKACCESSKEY", tags={UK: "uk-21"}),
        ]
        config = _paapi(keys=keys, engine={"queue_size": 20})
        queries = [Query(f"B0000002{i:02d}", UK) for i in range(5)]
        queries += [Query(f"B00003{i:04d}", US) for i in range(300)]
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            call = asyncio.get_running_loop().create_task(broker.get_items(queries))
            await clock.run_until(call, limit=60)
            assert isinstance(call.exception(), NoUsableKeyError)
            assert len(us_sent) <= 20

    async def test_a_caller_cancelled_as_its_query_is_admitted_leaves_nothing_sent(
        self,
    ) -> None:
        """get_items cancelled at the moment a query waiting for room is admitted: the
        lookup admitted for it is let go, not sent for nobody while it holds the room (the
        admission runs as a task of its own since calls fail at once on a dead store)."""
        clock = FakeClock()
        sent: list[str] = []

        async def handler(request: HttpRequest) -> RawResponse:
            sent.extend(_asked(request))
            await clock.sleep(10.0)
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 10.0)

        config = _paapi(engine={"queue_size": 1})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            intake = broker._require_open()
            real_admit = intake.admit
            calls: list[asyncio.Task[list[ItemResult]]] = []

            async def admit(query: Query, receiver: Any) -> Any:
                lookup = await real_admit(query, receiver)
                calls[0].cancel()  # the caller is cancelled as the room is handed over
                return lookup

            intake.admit = admit  # type: ignore[method-assign]
            queries = [Query("B000000001", US), Query("B000000002", US)]
            calls.append(asyncio.get_running_loop().create_task(broker.get_items(queries)))
            await clock.run_until(calls[0], limit=600)
            assert calls[0].cancelled()
            await clock.advance(60.0)
            assert sent == ["B000000001"]
            assert broker.metrics().outstanding_lookups == 0

    async def test_lingering_lookups_fail_when_last_key_dies(self) -> None:
        """Lookups still lingering in the batcher fail when no key is left (N5)."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            return RawResponse(403, {}, DENIED, 0.01)

        config = _paapi(engine={"linger_s": 30.0})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            loop = asyncio.get_running_loop()
            first = loop.create_task(broker.get_item("B000000001"))
            await clock.run_until(first, limit=60)
            assert isinstance(first.exception(), NoUsableKeyError)
            with pytest.raises(NoUsableKeyError):
                await broker.get_item("B000000002")

    async def test_only_the_dead_marketplaces_lingering_lookups_fail(self) -> None:
        """When the US key is taken out, a US lookup lingering in an open stream fails at
        once, not after its 30 s linger, and a UK lookup lingering meanwhile is untouched
        and answered by the UK key once its stream ends (N5)."""
        clock = FakeClock()
        t0 = clock.monotonic()
        us_sent: list[list[str]] = []

        async def handler(request: HttpRequest) -> RawResponse:
            if json.loads(request.body)["Marketplace"] == UK:
                return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.01)
            us_sent.append(_asked(request))
            await clock.sleep(1.0)
            return RawResponse(403, {}, DENIED, 1.0)

        keys = [
            paapi_key_doc("us", tags={US: "us-20"}),
            paapi_key_doc("uk", credential_id="UKACCESSKEY", tags={UK: "uk-21"}),
        ]
        config = _paapi(keys=keys, engine={"linger_s": 30.0})
        release = asyncio.Event()

        async def held_open(*queries: Query) -> AsyncIterator[Query]:
            for query in queries:
                yield query
            await release.wait()  # the input goes on: nothing flushes the partial batch

        async def drain(stream: AsyncIterator[ItemResult]) -> list[ItemResult]:
            return [result async for result in stream]

        full = [Query(f"B0000001{i:02d}", US) for i in range(10)]
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            loop = asyncio.get_running_loop()
            title = Query("B000000011", US, ("ItemInfo.Title",))  # a group of its own
            us_lingering = loop.create_task(drain(broker.stream(held_open(title))))
            uk_lingering = loop.create_task(
                drain(broker.stream(held_open(Query("B000000021", UK))))
            )
            await settle()
            us_full = loop.create_task(drain(broker.stream(held_open(*full))))
            await clock.run_until(us_lingering, limit=5)
            assert isinstance(us_lingering.exception(), NoUsableKeyError)
            assert clock.monotonic() - t0 < 5
            assert us_sent == [[query.asin for query in full]]
            assert not uk_lingering.done()
            release.set()
            await clock.run_until(uk_lingering, limit=5)
            await clock.run_until(us_full, limit=5)
        assert [r.ok for r in uk_lingering.result()] == [True]
        assert isinstance(us_full.exception(), NoUsableKeyError)


class TestPauses:
    """N7: no send inside a pause, whatever the queue was doing."""

    @pytest.mark.parametrize("latency", [0.1, 0.5])
    async def test_retry_after_honoured_by_an_idle_dispatcher(self, latency: float) -> None:
        """A Retry-After that arrives after the pacer interval still holds the key (N7)."""
        clock = FakeClock()
        t0 = clock.monotonic()
        sent: list[float] = []

        async def handler(request: HttpRequest) -> RawResponse:
            sent.append(clock.monotonic() - t0)
            await clock.sleep(latency)
            if len(sent) == 1:
                return RawResponse(429, {"retry-after": "10"}, THROTTLED, latency)
            return RawResponse(200, {}, _paapi_body(*_asked(request)), latency)

        config = _paapi(keys=[paapi_key_doc(tps=5.0, max_in_flight=2)])
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(broker.get_items(["B000000001"]))
            await clock.run_until(task)
        assert task.result()[0].ok
        assert len(sent) == 2
        assert sent[1] >= sent[0] + latency + 10 - 1e-6


class TestFakeClockState:
    """A fake clock's times never reach the machine's shared key-state file."""

    async def _one_lookup(self, config: object) -> None:
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.0)

        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(broker.get_items(["B000000001"]))
            await clock.run_until(task)
        assert task.result()[0].ok

    async def test_default_state_file_is_left_alone(self) -> None:
        """With a fake clock and no [state] path, the keys' state stays in memory."""
        from broker.sqlitewal import state_dir
        from broker.state.sqlite import STATE_FILE

        await self._one_lookup(_paapi())
        # conftest points $XDG_STATE_HOME at this test's own directory.
        assert not (state_dir() / STATE_FILE).exists()

    async def test_a_real_clock_of_the_callers_own_shares_the_state(self) -> None:
        """A caller's own clock on real time (no private_time) keeps sharing key state."""
        from broker.clock import LoopClock
        from broker.sqlitewal import state_dir
        from broker.state.sqlite import STATE_FILE

        class OwnClock:
            def __init__(self) -> None:
                self._real = LoopClock()

            def monotonic(self) -> float:
                return self._real.monotonic()

            async def sleep(self, seconds: float) -> None:
                await self._real.sleep(seconds)

            def utcnow(self) -> Any:
                return self._real.utcnow()

        async def handler(request: HttpRequest) -> RawResponse:
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.0)

        async with Broker(_paapi(), clock=OwnClock(), transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            assert (await broker.get_items(["B000000001"]))[0].ok
        assert (state_dir() / STATE_FILE).exists()

    async def test_a_named_state_file_is_still_used(self, tmp_path: Path) -> None:
        """A [state] path named on purpose (a test of shared state) still gets the decisions."""
        path = tmp_path / "keys.sqlite3"
        await self._one_lookup(_paapi(state={"path": str(path)}))
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT count(*) FROM key_state").fetchone() == (1,)
        finally:
            conn.close()


class TestCancellation:
    """N8: a caller is never handed another caller's cancellation."""

    async def test_cancelled_lookup_is_not_reused(self, harness: Harness) -> None:
        """B, starting in the turn A was cancelled, gets its result, not CancelledError (N8)."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        loop = asyncio.get_running_loop()
        a = loop.create_task(broker.get_item("B0C1234567"))
        await asyncio.sleep(0)
        a.cancel()
        b = loop.create_task(broker.get_item("B0C1234567"))
        await asyncio.gather(a, b, return_exceptions=True)
        assert a.cancelled()
        assert b.result().ok
        assert (await broker.get_item("B0C1234567")).ok

    async def test_stress_no_spurious_cancellation(self, harness: Harness) -> None:
        """Callers timing out at random never cancel the others (N8, 30 rounds of 60)."""
        sim = await harness.simulator(FREE)
        config = make_config(
            sim.url,
            keys=[key_doc(tps=500.0, max_in_flight=8)],
            engine={"queue_size": 64, "linger_s": 0.01},
        )
        broker = await harness.broker(config)
        rng = random.Random(7)
        pool = [f"B0{i:08d}" for i in range(120)]
        spurious = 0

        async def caller() -> None:
            nonlocal spurious
            wanted = rng.sample(pool, 15)
            try:
                if rng.random() < 0.4:
                    await asyncio.wait_for(broker.get_items(wanted), rng.uniform(0.001, 0.05))
                else:
                    results = await broker.get_items(wanted)
                    assert [r.asin for r in results] == wanted
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                spurious += 1

        for _ in range(30):
            await asyncio.gather(*(caller() for _ in range(60)))
        assert spurious == 0
        await asyncio.sleep(0.1)
        assert broker.metrics().outstanding_lookups == 0


class TestParkedKeys:
    """N9 and N11: a parked key's abandoned probe and abandoned work."""

    async def test_abandoned_probe_frees_the_probe_slot(self) -> None:
        """A parked key whose probe caller left sends the next lookup (N9)."""
        clock = FakeClock()
        sent: list[str] = []

        handler = _answering(sent)

        async with Broker(_paapi(), clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            key = broker._keys[0]
            key.circuit.open(ThrottleVerdict.ACCESS_REVOKED)
            await settle()
            await clock.advance(4000)
            first = asyncio.get_running_loop().create_task(broker.get_item("B000000001"))
            await asyncio.sleep(0)
            first.cancel()
            await settle()
            assert key.circuit.state is not CircuitState.PROBING or sent
            later = asyncio.get_running_loop().create_task(broker.get_item("B000000002"))
            # The shared key state holds a probe for its lease (60 s) before another may go.
            await clock.run_until(later, limit=300)
            assert later.result().ok
            assert "B000000002" in sent

    async def test_abandoned_lookups_leave_the_queue(self) -> None:
        """Callers that give up while the key is parked leave nothing queued (N11)."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            return RawResponse(500, {}, b"{}", 0.01)

        config = _paapi(engine={"queue_size": 100})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            broker._keys[0].circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED)
            await settle()
            tracemalloc.start()
            try:
                base = tracemalloc.take_snapshot()
                n = 0
                for _ in range(20):
                    tasks = [
                        asyncio.ensure_future(broker.get_item(f"B{n + i:09d}")) for i in range(100)
                    ]
                    n += 100
                    await settle()
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                await settle()
                grown = sum(
                    s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename")
                )
            finally:
                tracemalloc.stop()
            metrics = broker.metrics()
            assert metrics.outstanding_lookups == 0
            assert metrics.queued_batches == 0
            assert grown < 500_000


class _HangingStore(MemoryStateStore):
    """A key-state store whose bookings hang once told to (Redis stopped mid-run)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(
            lambda: int(clock.monotonic() * 1e6), lambda: int(clock.utcnow().timestamp() * 1e6)
        )
        self.hang = False
        self.hung = 0

    async def decide(self, *args: Any, **kwargs: Any) -> Decision:
        if self.hang and kwargs.get("reserve"):
            self.hung += 1
            await asyncio.Event().wait()
        return await super().decide(*args, **kwargs)


class TestStateOutage:
    async def test_a_library_broker_comes_back_after_its_store_does(self) -> None:
        """The key-state store out of reach past the outage budget while a call waits: that
        call gets NoUsableKeyError naming the store, and once it is back a call 30 s or more
        later is answered, a refused connection on the way retried as usual. The engine
        ended instead, and every later call raised the old error, Redis long back."""
        clock = FakeClock()
        store = OutageStore(clock)
        sent: list[str] = []
        answer = _answering(sent)
        refusals = [EndpointUnreachable("refused")]

        async def handler(request: HttpRequest) -> RawResponse:
            if refusals and sent:
                raise refusals.pop()
            return await answer(request)

        config = _paapi(keys=[paapi_key_doc(tps=5.0)], retry={"outage_budget_s": 5.0})
        transport = MockTransport(handler)
        async with Broker(config, clock=clock, transport=transport, state_store=store) as broker:  # type: ignore[arg-type]
            first = asyncio.ensure_future(broker.get_items(["B000000001"]))
            await clock.run_until(first)
            assert first.result()[0].ok
            store.down = True
            during = asyncio.ensure_future(broker.get_items(["B000000002"]))
            await clock.run_until(during, limit=60.0)
            error = during.exception()
            assert isinstance(error, NoUsableKeyError)
            assert [f.code for f in error.failures] == ["StateUnavailable"]
            assert "ConnectionError" in str(error)
            store.down = False
            await clock.advance(31.0)
            # The revived key meets one refused connection: retried, as any key's is (the
            # store's outage spent no endpoint budget); it was taken out at once.
            after = asyncio.ensure_future(broker.get_items(["B000000003"]))
            await clock.run_until(after, limit=60.0)
            assert after.result()[0].ok
        assert not refusals
        assert sent == ["B000000001", "B000000003"]


async def _stop_at_first(broker: Broker, count: int, stop: asyncio.Event) -> list[str]:
    """Stream ``count`` ASINs, setting ``stop`` at the first result; the ASINs yielded."""
    got = []
    async for result in broker.stream([f"B{i:09d}" for i in range(count)], stop=stop):
        got.append(result.asin)
        stop.set()
    return got


class TestStreamStop:
    """stream(stop=...): wind down without sending more, keeping the answers already paid for."""

    async def test_stop_lets_go_of_unsent_lookups(self) -> None:
        """After stop, only batches already sent are answered; nothing else is ever sent."""
        clock = FakeClock()
        sent: list[str] = []

        async def handler(request: HttpRequest) -> RawResponse:
            asked = _asked(request)
            sent.extend(asked)
            await clock.sleep(0.5)
            return RawResponse(200, {}, _paapi_body(*asked), 0.5)

        config = _paapi(keys=[paapi_key_doc(tps=1.0, max_in_flight=1)])
        stop = asyncio.Event()
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(_stop_at_first(broker, 100, stop))
            await clock.run_until(task)
            got = task.result()
            await clock.advance(30.0)
            metrics = broker.metrics()
        assert len(got) < 100
        assert sorted(got) == sorted(sent)  # every answer paid for was yielded
        assert len(sent) == len(set(sent)) <= 20  # at most the batch in flight after the first
        assert (metrics.outstanding_lookups, metrics.queued_batches) == (0, 0)

    async def test_a_sent_batch_that_comes_back_is_let_go(self) -> None:
        """A batch on the wire at stop that is throttled is not sent again: the stream ends."""
        clock = FakeClock()
        sent: list[list[str]] = []

        async def handler(request: HttpRequest) -> RawResponse:
            asked = _asked(request)
            sent.append(asked)
            if len(sent) == 1:
                await clock.sleep(0.1)
                return RawResponse(200, {}, _paapi_body(*asked), 0.1)
            await clock.sleep(0.5)
            return RawResponse(429, {"retry-after": "10"}, THROTTLED, 0.5)

        config = _paapi(keys=[paapi_key_doc(tps=100.0, max_in_flight=2)])
        stop = asyncio.Event()
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(_stop_at_first(broker, 30, stop))
            await clock.run_until(task, limit=60.0)
            await clock.advance(60.0)
            metrics = broker.metrics()
        assert len(task.result()) == 10
        asked = [asin for batch in sent for asin in batch]
        assert len(asked) == len(set(asked))  # a throttled batch was never sent again
        assert (metrics.outstanding_lookups, metrics.queued_batches) == (0, 0)

    async def test_a_batch_waiting_out_a_retry_delay_is_let_go(self) -> None:
        """A stop while the batch waits out its retry delay (a 503 answered, nothing on the
        wire): the stream ends at once, not when the delay runs out (up to
        retry.max_delay_s; broker run's drain waited with it), and only the lookup another
        caller still waits for is sent again."""
        clock = FakeClock()
        sent: list[list[str]] = []

        async def handler(request: HttpRequest) -> RawResponse:
            sent.append(_asked(request))
            await clock.sleep(0.05)
            if len(sent) == 1:
                return RawResponse(503, {}, b"Service Unavailable", 0.05)
            return RawResponse(200, {}, _paapi_body(*sent[-1]), 0.05)

        class _Longest(random.Random):
            """The jitter's longest draw: the delay is the whole 20 s step, every run."""

            def random(self) -> float:
                return 0.999

        config = _paapi(
            keys=[paapi_key_doc(tps=10.0)], retry={"base_delay_s": 20.0, "max_delay_s": 30.0}
        )
        stop = asyncio.Event()
        transport = MockTransport(handler)
        async with Broker(config, clock=clock, transport=transport, rng=_Longest()) as broker:  # type: ignore[arg-type]
            start = clock.monotonic()

            async def consume(asins: list[str], stop: asyncio.Event | None) -> list[str]:
                return [r.asin async for r in broker.stream(asins, stop=stop)]

            loop = asyncio.get_running_loop()
            stopping = loop.create_task(consume(["B000000001", "B000000002"], stop))
            staying = loop.create_task(consume(["B000000002"], None))
            while not sent:
                await clock.advance(0.1)
            await clock.advance(1.0)  # the 503 answered: the batch waits out its delay
            stop.set()
            await clock.run_until(stopping, limit=2.0)
            assert stopping.result() == []
            assert clock.monotonic() - start < 5.0
            # The lookup another caller still waits for is asked again after the delay;
            # the one only the stopped stream wanted is not.
            await clock.run_until(staying, limit=60.0)
            assert staying.result() == ["B000000002"]
            metrics = broker.metrics()
        assert sent == [["B000000001", "B000000002"], ["B000000002"]]
        assert (metrics.outstanding_lookups, metrics.queued_batches) == (0, 0)

    async def test_a_batch_whose_send_is_not_booked_yet_is_let_go(self) -> None:
        """A stop while a taken batch waits for the key-state store to book its send (Redis
        hung): the batch is let go as a queued one is, and the stream ends with the answers
        of what was sent; it waited for the store, which broker run cut off only at the end
        of its 20-s drain grace."""
        clock = FakeClock()
        sent: list[str] = []
        store = _HangingStore(clock)
        config = _paapi(keys=[paapi_key_doc(tps=1.0, max_in_flight=1)])
        stop = asyncio.Event()
        transport = MockTransport(_answering(sent))
        async with Broker(config, clock=clock, transport=transport, state_store=store) as broker:  # type: ignore[arg-type]

            async def consume() -> list[str]:
                got = []
                async for result in broker.stream([f"B{i:09d}" for i in range(20)], stop=stop):
                    got.append(result.asin)
                    store.hang = True  # the next batch's booking never ends
                return got

            task = asyncio.get_running_loop().create_task(consume())
            while store.hung == 0:
                await clock.advance(0.1)
            stop.set()
            await clock.run_until(task, limit=5.0)
        assert sorted(task.result()) == sorted(sent)
        assert len(sent) == 10

    async def test_stop_set_before_the_stream_sends_nothing(self) -> None:
        """A stream whose stop is already set yields nothing, ends, and sends nothing."""
        clock = FakeClock()
        sent: list[str] = []

        async def handler(request: HttpRequest) -> RawResponse:
            sent.extend(_asked(request))
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.0)

        stop = asyncio.Event()
        stop.set()
        async with Broker(_paapi(), clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]

            async def consume() -> list[ItemResult]:
                return [r async for r in broker.stream(["B000000001"], stop=stop)]

            task = asyncio.get_running_loop().create_task(consume())
            await clock.run_until(task)
            await clock.advance(5.0)
        assert task.result() == []
        assert sent == []

    async def test_a_stop_that_is_no_asyncio_event_is_refused(self) -> None:
        """stream(stop=) given a threading.Event (what SyncBroker.stream takes) raises
        TypeError at once: its blocking wait() froze the whole event loop."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.0)

        async with Broker(_paapi(), clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            stream = broker.stream(["B000000001"], stop=threading.Event())  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"asyncio\.Event.*threading\.Event"):
                await asyncio.wait_for(anext(stream), 5.0)
            assert [r.asin async for r in broker.stream(["B000000001"])] == ["B000000001"]

    async def test_close_ends_the_watch_of_a_stream_held_open(self) -> None:
        """A consumer holding a stream(stop=...) at a yield while the broker closes: no task
        the broker started is left running after aclose() (the stop watch was, until the
        consumer let the generator go)."""
        clock = FakeClock()

        async def handler(request: HttpRequest) -> RawResponse:
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.0)

        before = asyncio.all_tasks()
        broker = Broker(_paapi(), clock=clock, transport=MockTransport(handler))  # type: ignore[arg-type]
        await broker.__aenter__()
        stream = broker.stream(["B000000001", "B000000002"], stop=asyncio.Event())
        first = asyncio.ensure_future(anext(stream))
        await clock.run_until(first)
        await broker.aclose()
        await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() - before if not t.done()]
        await stream.aclose()
        assert left == []


class TestLifecycle:
    """N12 and N15: the broker's loop, and closing with callers waiting."""

    async def test_close_fails_waiting_callers_clearly(self, harness: Harness) -> None:
        """Callers waiting when the broker closes get BrokerClosedError (N15)."""
        sim = await harness.simulator(FREE)
        broker = Broker(make_config(sim.url, keys=[key_doc(tps=1.0)]))
        await broker.__aenter__()
        waiter = asyncio.get_running_loop().create_task(
            broker.get_items([f"B0{i:08d}" for i in range(50)])
        )
        await asyncio.sleep(0.3)
        await broker.aclose()
        with pytest.raises(BrokerClosedError):
            await waiter
        assert not waiter.cancelled()
        with pytest.raises(BrokerClosedError, match="closed"):
            await broker.get_item("B0C1234567")

    async def test_a_cancelled_close_stays_cancelled(self, harness: Harness) -> None:
        """A task cancelled while it closes the broker ends cancelled, and a timeout that
        runs out during the close raises TimeoutError: aclose took the caller's
        cancellation for the engine's and swallowed it (an ASGI lifespan's cancel lost)."""
        sim = await harness.simulator(FREE)
        broker = Broker(make_config(sim.url))
        await broker.__aenter__()
        await broker.get_item("B0C1234567")
        closing = asyncio.get_running_loop().create_task(broker.aclose())
        await asyncio.sleep(0)  # inside aclose, waiting for the engine to stop
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await broker.aclose()  # finishes what the cancelled close left, if anything

        async def timed_out_while_closing() -> None:
            async with asyncio.timeout(None) as deadline:
                async with Broker(make_config(sim.url)) as other:
                    await other.get_item("B0C1234567")
                    deadline.reschedule(asyncio.get_running_loop().time())

        with pytest.raises(TimeoutError):
            await timed_out_while_closing()

    async def test_every_concurrent_close_waits_for_the_close(self, harness: Harness) -> None:
        """Three tasks closing at once each return only once the broker is closed (its
        session and embedded parts too): a later one returned at once, mid-close."""
        sim = await harness.simulator(FREE)
        broker = Broker(make_config(sim.url))
        await broker.__aenter__()
        await broker.get_item("B0C1234567")
        events: list[str] = []
        stack = broker._stack
        assert stack is not None
        close_stack = stack.aclose

        async def closing_the_stack() -> None:  # the last thing a close does
            await close_stack()
            events.append("closed")

        stack.aclose = closing_the_stack  # type: ignore[method-assign]

        async def close() -> None:
            await broker.aclose()
            events.append("returned")

        await asyncio.gather(close(), close(), close())
        assert events == ["closed", "returned", "returned", "returned"]

    async def test_close_wakes_a_stream_waiting_for_its_input(self, harness: Harness) -> None:
        """A stream whose answers are all in and whose input has nothing more yet (a queue)
        gets BrokerClosedError at once when the broker closes, not at the next input (N15)."""
        sim = await harness.simulator(FREE)
        broker = Broker(make_config(sim.url))
        await broker.__aenter__()
        feed: asyncio.Queue[str] = asyncio.Queue()
        for asin in ("B0C1234567", "B0C1234568"):
            feed.put_nowait(asin)
        reading = asyncio.Event()

        async def source() -> AsyncIterator[str]:
            while True:
                if feed.empty():
                    reading.set()
                yield await feed.get()

        got: list[ItemResult] = []
        answered = asyncio.Event()

        async def consume() -> None:
            async for result in broker.stream(source()):
                got.append(result)
                if len(got) == 2:
                    answered.set()

        consumer = asyncio.get_running_loop().create_task(consume())
        await asyncio.wait_for(asyncio.gather(reading.wait(), answered.wait()), 5)
        await broker.aclose()
        with pytest.raises(BrokerClosedError):
            await asyncio.wait_for(consumer, 2)
        assert [r.asin for r in got] == ["B0C1234567", "B0C1234568"]

    async def test_close_lets_a_finished_stream_end_as_it_would_have(
        self, harness: Harness
    ) -> None:
        """A stream whose input is all read and whose answers are all in, not yet taken,
        yields them after the broker closes and ends cleanly: nothing it waited for was cut
        short."""
        sim = await harness.simulator(FREE)
        broker = Broker(make_config(sim.url))
        await broker.__aenter__()
        wanted = ["B0C1234567", "B0C1234568", "B0C1234569"]
        stream = broker.stream(wanted)
        first = await anext(stream)
        for _ in range(500):
            if broker.metrics().outstanding_lookups == 0:
                break
            await asyncio.sleep(0.01)
        await broker.aclose()
        rest = [result async for result in stream]
        assert sorted(r.asin for r in [first, *rest]) == wanted

    async def test_close_while_waiting_for_room_leaves_no_unretrieved_error(
        self, harness: Harness, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A get_items waiting for room in the queue when the broker closes raises
        BrokerClosedError and nothing more: no "Future exception was never retrieved"
        logged at ERROR by asyncio."""
        import gc

        sim = await harness.simulator(FREE)
        config = make_config(sim.url, keys=[key_doc(tps=5.0)], engine={"queue_size": 20})
        broker = Broker(config)
        await broker.__aenter__()
        waiter = asyncio.get_running_loop().create_task(
            broker.get_items([f"B0{i:08d}" for i in range(100)])
        )
        await asyncio.sleep(0.3)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            await broker.aclose()
            with pytest.raises(BrokerClosedError):
                await waiter
            del waiter
            gc.collect()
            await asyncio.sleep(0)
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]

    async def test_a_broker_closed_before_it_opened_refuses_to_open(self, harness: Harness) -> None:
        """aclose() on a broker never opened (a shutdown path run before startup), then
        ``async with``: opening is refused, clearly, and nothing is started. It opened a
        broker that refused every call, and whose exit closed nothing (a leaked session
        and simulator socket)."""
        sim = await harness.simulator(FREE)
        broker = Broker(make_config(sim.url))
        await broker.aclose()
        with pytest.raises(RuntimeError, match="closed broker cannot be opened again"):
            async with broker:
                pass
        assert broker._stack is None
        assert broker._engine is None

    async def test_a_broker_closed_while_it_opens_closes_what_it_opened(
        self, harness: Harness
    ) -> None:
        """aclose() while ``async with`` is still opening (a shutdown hook racing a startup
        task): the open fails with BrokerClosedError and closes what it had opened, and the
        close returns once that is done. It finished opening after the close, said "open",
        refused every call, and nothing could close it: its engine tasks, session and
        simulator ran on."""
        sim = await harness.simulator(FREE)
        broker = Broker(make_config(sim.url))
        gate = asyncio.Event()
        start = broker._start

        async def held(stack: contextlib.AsyncExitStack) -> None:
            await gate.wait()  # the open is under way when the close comes
            await start(stack)

        broker._start = held  # type: ignore[method-assign]
        opening = asyncio.ensure_future(broker.__aenter__())
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(broker.aclose())
        await asyncio.sleep(0.01)
        assert not closing.done()  # done when what the open opened is closed, not before
        gate.set()
        with pytest.raises(BrokerClosedError, match="closed while it opened"):
            await opening
        await closing
        await broker.aclose()
        assert broker._stack is None
        assert broker._engine is None
        await asyncio.sleep(0)
        left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("broker-")]
        assert left == []

    async def test_metrics_from_another_thread_while_the_loop_runs_is_refused(
        self, harness: Harness
    ) -> None:
        """metrics() read from a thread while the broker's loop runs raises
        WrongEventLoopError naming SyncBroker (an exporter thread got a bare "deque mutated
        during iteration" now and then); in the loop, and once the loop is done, it reads."""
        sim = await harness.simulator(FREE)
        async with Broker(make_config(sim.url)) as broker:
            with pytest.raises(WrongEventLoopError, match="SyncBroker"):
                await asyncio.to_thread(broker.metrics)
            assert broker.metrics().requests == 0

    def test_second_event_loop_is_refused_at_once(self) -> None:
        """A broker opened on one loop raises WrongEventLoopError from another, for a call or
        for aclose(), and stays usable from its own (N12)."""
        loop1 = asyncio.new_event_loop()
        thread = threading.Thread(target=loop1.run_forever, daemon=True)
        thread.start()
        from broker.simulator.server import SimulatorServer

        sim = SimulatorServer(FREE)

        async def open_broker() -> Broker:
            await sim.__aenter__()
            broker = Broker(make_config(sim.url))
            await broker.__aenter__()
            return broker

        async def close_broker(broker: Broker) -> None:
            await broker.aclose()
            await sim.__aexit__(None, None, None)

        broker = asyncio.run_coroutine_threadsafe(open_broker(), loop1).result(10)
        try:

            async def from_loop2() -> None:
                await asyncio.wait_for(broker.get_items(["B0C1234567"]), 5)

            with pytest.raises(WrongEventLoopError, match="another event loop"):
                asyncio.run(from_loop2())
            # Closing from the wrong loop is refused the same way, before closing anything.
            with pytest.raises(WrongEventLoopError, match="another event loop"):
                asyncio.run(broker.aclose())
            results = asyncio.run_coroutine_threadsafe(
                broker.get_items(["B0C1234567"]), loop1
            ).result(10)
            assert results[0].ok
        finally:
            asyncio.run_coroutine_threadsafe(close_broker(broker), loop1).result(10)
            loop1.call_soon_threadsafe(loop1.stop)
            thread.join(5)
            loop1.close()

    def test_a_loop_that_ended_is_named_so(self) -> None:
        """A broker opened in one asyncio.run() and used in the next: the error says that
        loop has ended and to open the Broker in the loop that uses it; it said "use it from
        that loop", which cannot be done. (In a child process: the first loop's session is
        left open, as the mistake leaves it.)"""
        script = textwrap.dedent(
            """
            import asyncio
            from broker import Broker, WrongEventLoopError, config_from_dict
            doc = {"api": {"endpoint": "simulator"},
                   "keys": [{"name": "demo", "credential_id": "demo-id",
                             "credential_secret_env": "ASINB_DEMO_SECRET", "version": "3.1",
                             "partner_tags": {"www.amazon.com": "demo-20"}}]}
            holder = []
            async def first():
                broker = Broker(config_from_dict(doc))
                await broker.__aenter__()
                holder.append(broker)
            async def second():
                await holder[0].get_items(["B0C1234567"])
            asyncio.run(first())
            try:
                asyncio.run(second())
            except WrongEventLoopError as exc:
                print(exc)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "ASINB_DEMO_SECRET": "demo-secret"},
            check=False,
        )
        assert "has ended" in done.stdout, done.stderr
        assert "asyncio.run" in done.stdout
        assert "from that loop" not in done.stdout


@contextlib.asynccontextmanager
async def _slow_server(delay_s: float) -> AsyncIterator[str]:
    """A loopback server answering every POST ``{}`` after ``delay_s``; yields its URL."""

    async def slow(_request: web.Request) -> web.Response:
        await asyncio.sleep(delay_s)
        return web.Response(text="{}")

    app = web.Application()
    app.router.add_post("/", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


class TestOutages:
    """K3 and K6: what is and is not an outage."""

    async def test_waiting_for_a_pooled_connection_is_not_an_outage(self) -> None:
        """With one pooled connection, a second request waits for it and gets 200 (K3)."""
        async with (
            _slow_server(0.5) as url,
            AiohttpTransport(max_connections=1, connect_timeout_s=0.2) as transport,
        ):
            request = HttpRequest("POST", url, {}, b"{}")
            first, second = await asyncio.gather(transport.send(request), transport.send(request))
        assert (first.status, second.status) == (200, 200)

    async def test_waiting_for_a_pooled_connection_spends_no_request_timeout(self) -> None:
        """A request that waited for the one pooled connection still has its whole
        ``request_timeout_s`` once it has one: three 0.5-s answers under a 0.8-s timeout all
        get 200 (the wait used to count, so the second and third timed out unsent)."""
        async with (
            _slow_server(0.5) as url,
            AiohttpTransport(max_connections=1, timeout_s=0.8) as transport,
        ):
            request = HttpRequest("POST", url, {}, b"{}")
            answers = await asyncio.gather(*(transport.send(request) for _ in range(3)))
        assert [answer.status for answer in answers] == [200, 200, 200]

    async def test_a_process_out_of_open_files_makes_no_connection_and_no_outage(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A socket the process's open-file limit refuses is that OSError (EMFILE), not an
        unreachable endpoint: it was waited out as an outage (15 minutes, then exit 69)."""

        async def no_files(*args: object, **kwargs: object) -> object:
            raise OSError(errno.EMFILE, "Too many open files")

        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "sock_connect", no_files)
        async with AiohttpTransport() as transport:
            request = HttpRequest("POST", "http://127.0.0.1:9/", {}, b"{}")
            with pytest.raises(OSError, match="Too many open files") as caught:
                await transport.send(request)
        assert caught.value.errno == errno.EMFILE
        assert not isinstance(caught.value, EndpointUnreachable)
        assert "http://127.0.0.1:9/" in str(caught.value)

    @pytest.mark.parametrize(
        "error",
        [
            OSError(errno.EMFILE, "Too many open files"),
            ConfigError("https_proxy", "'socks5://x' is a socks5:// proxy"),
        ],
        ids=["out-of-files", "bad-proxy"],
    )
    async def test_an_error_no_retry_mends_stops_the_engine_not_the_rows(
        self, error: Exception
    ) -> None:
        """Out of open files, or a proxy variable no proxy URL: the engine stops with that
        error for every caller (one line, broker.engine_stopped), instead of failing batch
        after batch as a crash (every row of a job failed, exit 3)."""
        clock = FakeClock()
        sent: list[HttpRequest] = []

        async def handler(request: HttpRequest) -> RawResponse:
            sent.append(request)
            raise error

        with structlog.testing.capture_logs() as logs:
            async with Broker(_paapi(), clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
                task = asyncio.get_running_loop().create_task(
                    broker.get_items([f"B00000000{n}" for n in range(1, 4)])
                )
                await clock.run_until(task, limit=60)
                with pytest.raises(type(error)):
                    task.result()
                assert broker.engine_error is error
        assert len(sent) == 1
        events = [e["event"] for e in logs]
        assert "broker.engine_stopped" in events
        assert "broker.attempt_crashed" not in events
        assert "broker.task_crashed" not in events

    async def test_outage_time_does_not_age_a_lookup(self) -> None:
        """After a 700 s outage a lookup keeps retrying, not failed as too old (K6)."""
        clock = FakeClock()
        t0 = clock.monotonic()
        calls: list[float] = []

        async def handler(request: HttpRequest) -> RawResponse:
            elapsed = clock.monotonic() - t0
            calls.append(elapsed)
            if len(calls) == 1:
                return RawResponse(503, {}, b"Service Unavailable", 0.01)
            if elapsed < 700:
                raise EndpointUnreachable("refused")
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.01)

        config = _paapi(retry={"max_attempts": 20, "max_age_s": 600.0})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(broker.get_items(["B000000001"]))
            await clock.run_until(task, limit=3600)
        (result,) = task.result()
        assert result.ok
        assert result.attempts == 2
        assert calls[-1] >= 700

    @pytest.mark.parametrize("alone", [False, True], ids=["batch", "re-asked-alone"])
    async def test_outage_time_stays_out_of_the_age_after_it(self, alone: bool) -> None:
        """After a 700 s outage, a 5xx is retried (max_age_s 600 counts no outage time),
        also for an ASIN the answer left out and re-asked alone: K6 holds past the outage."""
        clock = FakeClock()
        t0 = clock.monotonic()
        after: list[list[str]] = []  # the requests that reached the API after the outage
        unavailable = RawResponse(503, {}, b"Service Unavailable", 0.01)

        async def handler(request: HttpRequest) -> RawResponse:
            asked = _asked(request)
            if clock.monotonic() - t0 < 700:
                if clock.monotonic() == t0:
                    return unavailable  # the first send, before the outage
                raise EndpointUnreachable("refused")
            after.append(asked)
            if alone and len(after) == 1:
                return RawResponse(200, {}, _paapi_body(asked[0]), 0.01)  # one left out
            if len(after) == (2 if alone else 1):
                return unavailable
            return RawResponse(200, {}, _paapi_body(*asked), 0.01)

        config = _paapi(retry={"max_attempts": 20, "max_age_s": 600.0})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(
                broker.get_items(["B000000001", "B000000002"])
            )
            await clock.run_until(task, limit=3600)
        results = task.result()
        assert [r.ok for r in results] == [True, True]
        assert results[1].attempts == (4 if alone else 3)


class TestIdentity:
    """Every result carries the query that asked for it."""

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    async def test_stream_pairs_results_with_their_queries(
        self, harness: Harness, protocol: str
    ) -> None:
        """One ASIN asked under two resource lists: each tag gets its own resources' item."""
        settings = SimulatorSettings(
            limits=False, latency=LatencyProfile(fixed_ms=2.0, exp_mean_ms=5.0)
        )
        sim = await harness.simulator(settings)
        broker = await harness.broker(make_config(sim.url, protocol=protocol))
        title = ("ItemInfo.Title",) if protocol == "paapi5" else ("itemInfo.title",)
        offers = (
            ("OffersV2.Listings.Price",) if protocol == "paapi5" else ("offersV2.listings.price",)
        )
        wanted = [f"B0{i:08d}" for i in range(40)]

        def queries() -> Iterator[Query]:
            for n, asin in enumerate(wanted):
                yield Query(asin, resources=title, tag=("title", n))
                yield Query(asin.lower(), resources=offers, tag=("offers", n))

        seen = {}
        async for result in broker.stream(queries()):
            assert result.query is not None
            kind, n = result.query.tag  # type: ignore[misc]
            seen[(kind, n)] = result
            assert result.asin == wanted[n]
            assert result.query.resources == (title if kind == "title" else offers)
            assert result.item is not None
            top = {k.lower() for k, v in result.item.items() if v is not None}
            assert ("iteminfo" in top) == (kind == "title")
            assert ("offersv2" in top) == (kind == "offers")
        assert len(seen) == 80

    async def test_get_items_results_carry_complete_queries(self, harness: Harness) -> None:
        """get_items fills in marketplace and resources (sorted) in each result's query."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url)
        broker = await harness.broker(config)
        (result,) = await broker.get_items(["b0c1234567"])
        resources = tuple(sorted(config.api.resources))
        assert result.query == Query("B0C1234567", "www.amazon.com", resources)


class TestResourceNames:
    """Resource names in either spelling; unknown ones never sent."""

    async def test_one_resource_set_in_two_orders_is_one_lookup(self, harness: Harness) -> None:
        """Two callers asking the same ASINs with the same resources in another order share
        one request (one lookup each), as they do in another spelling: they sent two."""
        sim = await harness.simulator(FREE)
        transport = await harness.transport()
        broker = await harness.broker(make_config(sim.url), transport=transport)
        wanted = [f"B0{i:08d}" for i in range(10)]
        first, second = await asyncio.gather(
            broker.get_items(wanted, resources=["itemInfo.title", "images.primary.medium"]),
            broker.get_items(wanted, resources=["Images.Primary.Medium", "itemInfo.title"]),
        )
        assert transport.count("/catalog/") == 1
        assert [r.ok for r in first + second] == [True] * 20
        assert {r.query.resources for r in first + second if r.query} == {
            ("images.primary.medium", "itemInfo.title")
        }

    async def test_pascal_case_names_work_on_creators(self, harness: Harness) -> None:
        """ItemInfo.Title (PA-API's spelling) asks the Creators API for itemInfo.title."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        (result,) = await broker.get_items(["B0C1234567"], resources=["ItemInfo.Title"])
        assert result.ok
        assert result.query is not None
        assert result.query.resources == ("itemInfo.title",)
        assert result.summary is not None
        assert result.summary.title

    async def test_unknown_name_in_a_call_raises_before_any_request(self, harness: Harness) -> None:
        """A call's unknown resource raises ValueError naming it; nothing is sent."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        with pytest.raises(ValueError, match=r"Nope\.Title"):
            await broker.get_items(["B0C1234567"], resources=["Nope.Title"])
        assert broker.metrics().requests == 0

    async def test_unknown_name_in_one_query_is_that_query_invalid(self, harness: Harness) -> None:
        """One query's unknown resource makes it invalid; the others are answered."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        bad, good = await broker.get_items(
            [Query("B0C1234567", resources=("Nope.Title",)), Query("B0C1234568")]
        )
        assert bad.status is Status.INVALID
        assert bad.error is not None
        assert bad.error.code == "InvalidResource"
        assert good.ok

    async def test_a_lone_string_of_resources_is_echoed_whole(self, harness: Harness) -> None:
        """Query(resources="ItemInfo.Title") is invalid, and its query echoes the one name."""
        sim = await harness.simulator(FREE)
        broker = await harness.broker(make_config(sim.url))
        [bad] = await broker.get_items([Query("B0C1234567", resources="ItemInfo.Title")])  # type: ignore[arg-type]
        assert bad.status is Status.INVALID
        assert bad.query is not None
        assert bad.query.resources == ("ItemInfo.Title",)


class TestDebugLog:
    """At debug level the engine says one line per request and per 429."""

    async def test_one_event_per_request_and_per_429(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Two requests, one of them a 429: two broker.request events, each naming its
        marketplace and the URL it went to (a PA-API store's host), and one
        broker.throttled."""
        clock = FakeClock()
        calls = 0

        async def handler(request: HttpRequest) -> RawResponse:
            nonlocal calls
            calls += 1
            if calls == 1:
                return RawResponse(429, {}, THROTTLED, 0.01)
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.01)

        caplog.set_level(logging.DEBUG, logger="broker")
        async with Broker(_paapi(), clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(broker.get_items(["B000000001"]))
            await clock.run_until(task)
        text = [record.getMessage() for record in caplog.records]
        assert sum("broker.request" in line for line in text) == 2
        assert sum("broker.throttled" in line for line in text) == 1
        sent = [line for line in text if "broker.request" in line]
        assert all("marketplace='www.amazon.com'" in line for line in sent)
        assert all("url='http://127.0.0.1:9/paapi5/getitems'" in line for line in sent)

    async def test_a_send_binds_its_key_and_batch_to_the_logs_of_that_send_only(self) -> None:
        """Log lines made during a send carry its key and batch id; none outlive the send."""
        seen: list[dict[str, object]] = []

        async def handler(request: HttpRequest) -> RawResponse:
            seen.append(structlog.contextvars.get_contextvars())
            return RawResponse(200, {}, _paapi_body(*_asked(request)), 0.01)

        async with Broker(_paapi(), transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            await broker.get_items(["B000000001"])
            await broker.get_items(["B000000002"])
            outside = structlog.contextvars.get_contextvars()
        assert [s["key"] for s in seen] == ["paapi", "paapi"]
        assert seen[0]["batch_id"] != seen[1]["batch_id"]
        assert "batch_id" not in outside


async def test_a_fake_clock_broker_and_its_embedded_simulator_share_the_clock() -> None:
    """With ``endpoint = "simulator"`` and a FakeClock, the embedded simulator judges the
    key's rate on that clock too: 100 ASINs at 5 TPS are answered in 2 s of fake time, with
    no 429; on real time the simulator saw every send at once and the key was parked."""
    from conftest import CountingTransport, drive

    clock = FakeClock()
    config = make_config("simulator", keys=[key_doc(tps=5.0)])
    async with AiohttpTransport() as inner:
        transport = CountingTransport(inner)
        async with Broker(config, clock=clock, transport=transport) as broker:
            started = clock.monotonic()
            task = asyncio.ensure_future(broker.get_items([f"B0FAKE{i:04d}" for i in range(100)]))
            await drive(clock, task, transport)
            results = task.result()
            assert [r.status for r in results] == [Status.OK] * 100
            assert broker.metrics().throttled == 0
            assert clock.monotonic() - started < 3.0


class TestMarketplaces:
    """One marketplace's backlog never holds up another's."""

    async def test_streams_of_two_marketplaces_interleave(self) -> None:
        """Two streams started together (as broker run starts one per marketplace) take
        turns a batch at a time, so a key serving both sends both from the start; the first
        admitted its whole window before the second began, and that key sent every UK batch
        before any US one while the UK-only key ran out of work (a job 40 % slower)."""
        clock = FakeClock()
        sent: list[str] = []

        async def handler(request: HttpRequest) -> RawResponse:
            asked = _asked(request)
            sent.append(asked[0][:4])
            return RawResponse(200, {}, _paapi_body(*asked), 0.01)

        keys = [
            paapi_key_doc("both", tags={US: "both-20", UK: "both-21"}, tps=5.0),
            paapi_key_doc("uk", credential_id="UKACCESSKEY", tags={UK: "uk-21"}, tps=5.0),
        ]
        config = _paapi(keys=keys, engine={"queue_size": 200})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]

            async def drain(prefix: str, market: str) -> int:
                queries = [Query(f"{prefix}{i:06d}", market) for i in range(200)]
                return sum([1 async for _ in broker.stream(queries)])

            both = asyncio.gather(drain("B0UK", UK), drain("B0US", US))
            await clock.run_until(both, limit=600)
            assert both.result() == [200, 200]
        assert "B0US" in sent[:4], sent[:12]

    async def test_streams_of_async_inputs_that_never_await_interleave(self) -> None:
        """The same with async generators that never await (rows already in memory): the
        streams take turns too; the first admitted its whole window before the second
        began, as plain inputs did before."""
        clock = FakeClock()
        sent: list[str] = []
        handler = _answering(sent)
        keys = [paapi_key_doc("both", tags={US: "both-20", UK: "both-21"}, tps=5.0)]
        config = _paapi(keys=keys, engine={"queue_size": 200})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]

            async def rows(prefix: str, market: str) -> AsyncIterator[Query]:
                for i in range(200):
                    yield Query(f"{prefix}{i:06d}", market)

            async def drain(prefix: str, market: str) -> int:
                return sum([1 async for _ in broker.stream(rows(prefix, market))])

            both = asyncio.gather(drain("B0UK", UK), drain("B0US", US))
            await clock.run_until(both, limit=600)
            assert both.result() == [200, 200]
        # sent lists ASINs: the first four batches are its first 40.
        assert any(asin.startswith("B0US") for asin in sent[:40]), sent[:40]

    async def test_a_stalled_marketplace_leaves_room_for_the_others(self) -> None:
        """With ``queue_size`` UK lookups admitted that the only UK key, waiting out its
        daily quota, cannot send, US callers are still admitted and answered by the fresh
        US key: admission is bounded per marketplace."""
        clock = FakeClock()
        sent: list[str] = []

        handler = _answering(sent)

        keys = [
            paapi_key_doc("us"),
            paapi_key_doc("uk", credential_id="UKACCESSKEY", tags={UK: "uk-21"}),
        ]
        config = _paapi(keys=keys, engine={"queue_size": 10})
        async with Broker(config, clock=clock, transport=MockTransport(handler)) as broker:  # type: ignore[arg-type]
            (uk_key,) = (key for key in broker._keys if key.name == "uk")
            uk_key.circuit.open(ThrottleVerdict.QUOTA_EXHAUSTED)
            await settle()
            loop = asyncio.get_running_loop()
            stalled = [
                loop.create_task(broker.get_item(f"B0UK{i:06d}", marketplace=UK)) for i in range(10)
            ]
            await settle()
            us = loop.create_task(broker.get_items([f"B0US{i:06d}" for i in range(25)]))
            await clock.run_until(us, limit=60)
            assert [r.status for r in us.result()] == [Status.OK] * 25
            assert not any(task.done() for task in stalled)
            assert not any(asin.startswith("B0UK") for asin in sent)
            for task in stalled:
                task.cancel()
            await asyncio.gather(*stalled, return_exceptions=True)
