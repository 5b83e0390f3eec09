"""The broker with the item cache (prototype integration): only misses are sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Harness, asins, drive, key_doc, make_config

from broker.engine.broker import Broker
from broker.models import Query, Status
from broker.simulator.catalog import lookup
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import SimulatorSettings
from broker.testing import FakeClock

FREE = SimulatorSettings(limits=False)


def _cache(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {"max_age_s": 3_600, "path": str(tmp_path / "cache.sqlite3"), **extra}


class TestBrokerCache:
    async def test_second_run_sends_nothing(self, harness: Harness, tmp_path: Path) -> None:
        """A list looked up twice within the max age sends no GetItems the second time."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, cache=_cache(tmp_path))
        wanted = asins(50)
        first_transport = await harness.transport()
        async with Broker(config, transport=first_transport) as broker:
            first = await broker.get_items(wanted)
        assert first_transport.count("/catalog/") == 5
        assert not any(r.cached for r in first)
        second_transport = await harness.transport()
        async with Broker(config, transport=second_transport) as broker:
            second = await broker.get_items(wanted)
        assert second_transport.count("/catalog/") == 0
        assert all(r.cached for r in second)
        assert [r.fetched_at for r in first] == [r.fetched_at for r in second]
        assert [r.item for r in first] == [r.item for r in second]

    async def test_answers_of_one_endpoint_are_not_served_to_another(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """A simulator's cached answers never answer a broker pointed at another endpoint."""
        first_sim = await harness.simulator(FREE)
        other_sim = await harness.simulator(FREE)
        wanted = asins(20)
        async with Broker(make_config(first_sim.url, cache=_cache(tmp_path))) as broker:
            await broker.get_items(wanted)
        transport = await harness.transport()
        other = make_config(other_sim.url, cache=_cache(tmp_path))
        async with Broker(other, transport=transport) as broker:
            results = await broker.get_items(wanted)
        assert transport.count("/catalog/") == 2
        assert not any(r.cached for r in results)

    async def test_half_cached_half_the_requests(self, harness: Harness, tmp_path: Path) -> None:
        """With half the ASINs cached, a batch of ten cached-and-new sends only the new."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, cache=_cache(tmp_path))
        wanted = asins(100)
        async with Broker(config) as broker:
            await broker.get_items(wanted[::2])
        transport = await harness.transport()
        async with Broker(config, transport=transport) as broker:
            results = await broker.get_items(wanted)
        assert transport.count("/catalog/") == 5
        assert [i % 2 == 0 for i in range(100)] == [r.cached for r in results]

    async def test_a_cached_answer_held_while_the_call_waits_is_never_past_its_age(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """get_items returns no cached answer older than the max age: one read at the start
        of a call that then waits for its other lookups is looked up again."""
        clock = FakeClock()
        sim = await harness.simulator(FREE, clock=clock)
        config = make_config(
            sim.url,
            keys=[key_doc(tps=1.0)],
            engine={"batch_size": 1},
            cache=_cache(tmp_path, max_age_s=5),
        )
        first, *others = asins(4)
        transport = await harness.transport()
        broker = await harness.broker(config, clock=clock, transport=transport)
        task = asyncio.get_running_loop().create_task(broker.get_items([first]))
        await drive(clock, task, transport)
        await clock.advance(4.0)  # cached 4 s ago: fresh when the next call reads it
        task = asyncio.get_running_loop().create_task(broker.get_items([first, *others]))
        await drive(clock, task, transport)
        returned = clock.utcnow()
        results = task.result()
        assert [r.asin for r in results] == [first, *others]
        assert all(r.ok for r in results)
        ages = {r.asin: (returned - r.fetched_at).total_seconds() for r in results if r.cached}
        assert all(age <= 5 for age in ages.values()), ages
        assert not results[0].cached  # asked again: 1 + 3 + 1 requests
        assert transport.count("/catalog/") == 5

    async def test_not_found_is_not_cached(self, harness: Harness, tmp_path: Path) -> None:
        """not_found answers are asked again next time; ok ones are not."""
        settings = SimulatorSettings(limits=False, missing_share=0.5)
        sim = await harness.simulator(settings)
        config = make_config(sim.url, cache=_cache(tmp_path))
        wanted = asins(40)
        missing = [a for a in wanted if lookup(settings, "www.amazon.com", a).status != "ok"]
        assert missing
        async with Broker(config) as broker:
            await broker.get_items(wanted)
        transport = await harness.transport()
        async with Broker(config, transport=transport) as broker:
            results = await broker.get_items(wanted)
        sent = b"".join(r.body for r in transport.requests if "/catalog/" in r.url)
        assert all(a.encode() in sent for a in missing)
        assert all(r.cached == (r.status is Status.OK) for r in results)

    async def test_stream_serves_cached_answers(self, harness: Harness, tmp_path: Path) -> None:
        """stream() reads the cache per lookup too: a second stream sends nothing."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, cache=_cache(tmp_path))
        wanted = asins(30)
        async with Broker(config) as broker:
            first = [r async for r in broker.stream(wanted)]
        transport = await harness.transport()
        async with Broker(config, transport=transport) as broker:
            second = [r async for r in broker.stream(wanted)]
        assert transport.count("/catalog/") == 0
        assert sorted(r.asin for r in first) == sorted(r.asin for r in second)
        assert all(r.cached for r in second)
        assert not any(r.cached for r in first)

    async def test_stream_of_a_trickling_input_is_not_held_for_a_full_chunk(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """With the cache on, a stream fed from a queue that its own results refill (a
        crawler) is answered: a chunk of the cache's reads does not wait for 100 inputs."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, cache=_cache(tmp_path))
        feed: asyncio.Queue[str | None] = asyncio.Queue()
        wanted = asins(12)
        for asin in wanted[:3]:
            feed.put_nowait(asin)
        following = iter(wanted[3:])

        async def source() -> AsyncIterator[str]:
            while (asin := await feed.get()) is not None:
                yield asin

        async def crawl() -> list[str]:
            seen: list[str] = []
            async with Broker(config) as broker:
                async for result in broker.stream(source()):
                    seen.append(result.asin)
                    # Each answer leads to the next ASIN, until there are none.
                    feed.put_nowait(next(following, None))
                    if len(seen) == len(wanted):
                        break
            return seen

        seen = await asyncio.wait_for(crawl(), 10)
        assert sorted(seen) == sorted(wanted)

    async def test_an_item_asked_twice_in_one_call_counts_one_hit_each(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """One call holding a cached item twice (two tags) serves both from one read and
        counts two hits, for the two answers; the second went back to the store and the
        cache counted three."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, cache=_cache(tmp_path))
        async with Broker(config) as broker:
            await broker.get_item("B0HITS0001")
            before = await broker.cache_stats()
            assert before is not None
            out = await broker.get_items(
                [Query("B0HITS0001", tag="a"), Query("B0HITS0001", tag="b")]
            )
            after = await broker.cache_stats()
        assert after is not None
        assert [(r.cached, r.query and r.query.tag) for r in out] == [(True, "a"), (True, "b")]
        assert after.hits - before.hits == 2

    async def test_one_asin_spelled_three_ways_counts_once(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """An ASIN given three ways (upper, lower, a product link) in one call is one
        answer: one hit when cached, one miss when not, not three."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, cache=_cache(tmp_path))
        link = "https://www.amazon.com/dp/{}"
        async with Broker(config) as broker:
            await broker.get_item("B0HITS0002")
            before = await broker.cache_stats()
            hit = await broker.get_items(["B0HITS0002", "b0hits0002", link.format("B0HITS0002")])
            miss = await broker.get_items(["B0MISS0003", "b0miss0003", link.format("B0MISS0003")])
            after = await broker.cache_stats()
        assert before is not None
        assert after is not None
        assert [r.cached for r in hit] == [True]
        assert [r.cached for r in miss] == [False]
        assert (after.hits - before.hits, after.misses - before.misses) == (1, 1)

    async def test_not_found_after_an_ok_is_not_served_from_the_cache(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        """An item cached ok and then answered not_found (a refresh: the item is gone) is
        asked again next time, not served from its old ok answer."""
        async with SimulatorServer(FREE) as before:
            config = make_config(before.url, cache=_cache(tmp_path))
            async with Broker(config) as broker:
                assert (await broker.get_item("B0GONE0004")).ok
        # The same endpoint (the cache's namespace), where the item is gone now.
        gone = SimulatorSettings(limits=False, missing_share=1.0)
        async with SimulatorServer(gone, port=before.port):
            async with Broker(config, cache_refresh=True) as broker:
                assert (await broker.get_item("B0GONE0004")).status is Status.NOT_FOUND
            async with Broker(config) as broker:
                again = await broker.get_item("B0GONE0004")
        assert (again.status, again.cached) == (Status.NOT_FOUND, False)

    def test_cache_refresh_with_the_cache_off_is_refused(self, tmp_path: Path) -> None:
        """Broker(config, cache_refresh=True) with the cache off (the library's default):
        a ValueError saying so, where the refresh silently wrote nothing; on with a max age,
        or with cache_max_age_s given."""
        config = make_config("http://127.0.0.1:9", cache={"path": str(tmp_path / "c.sqlite3")})
        with pytest.raises(ValueError, match=r"max_age_s"):
            Broker(config, cache_refresh=True)
        with pytest.raises(ValueError, match=r"max_age_s"):
            Broker(config, cache_refresh=True, cache_default_max_age_s=3_600, cache_max_age_s=0)
        Broker(config, cache_refresh=True, cache_max_age_s=60)
        on = make_config("http://127.0.0.1:9", cache=_cache(tmp_path))
        Broker(on, cache_refresh=True)

    async def test_cache_off_by_default(self, harness: Harness, tmp_path: Path) -> None:
        """Without [cache] max_age_s the library caches nothing and writes no file."""
        sim = await harness.simulator(FREE)
        config = make_config(sim.url, cache={"path": str(tmp_path / "cache.sqlite3")})
        wanted = asins(10)
        async with Broker(config) as broker:
            await broker.get_items(wanted)
        transport = await harness.transport()
        async with Broker(config, transport=transport) as broker:
            results = await broker.get_items(wanted)
        assert transport.count("/catalog/") == 1
        assert not any(r.cached for r in results)
        assert not (tmp_path / "cache.sqlite3").exists()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_cache_stats_of_a_closed_broker_say_it_is_closed(
    harness: Harness, tmp_path: Path, backend: str
) -> None:
    """cache_stats() after the broker closed raises BrokerClosedError for every backend and
    logs nothing: the sqlite cache took its closed store for a failing one, warned that the
    file might be damaged (delete it) and raised a bare RuntimeError."""
    from structlog.testing import capture_logs

    from broker.errors import BrokerClosedError

    sim = await harness.simulator(FREE)
    config = make_config(sim.url, cache=_cache(tmp_path, backend=backend))
    async with Broker(config) as broker:
        await broker.get_item("B0CLOSED01")
        assert await broker.cache_stats() is not None
    with capture_logs() as logs, pytest.raises(BrokerClosedError):
        await broker.cache_stats()
    assert [entry for entry in logs if entry["log_level"] in ("warning", "error")] == []
