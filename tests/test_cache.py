"""The item cache: 24-hour ceiling, offers TTL, size bound, purge, stats, in every home."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import structlog
from conftest import sqlite_db
from structlog.testing import capture_logs

from broker.cache import (
    CEILING_S,
    CacheKey,
    CachePolicy,
    CacheStats,
    MemoryCache,
    SqliteCache,
    StoreCache,
    has_offer_resources,
    normalise_resources,
    open_cache,
)
from broker.cache.base import key_of
from broker.cache.front import COOL_OFF_S, CacheFront
from broker.cache.redis_store import RedisCache
from broker.config import (
    ApiConfig,
    BrokerConfig,
    CacheConfig,
    KeyConfig,
    SimulatorTable,
    load_config,
    parse_config,
)
from broker.errors import BrokerError, ConfigError
from broker.models import ErrorDetail, ItemResult, ItemSummary, Protocol, Query, Secret, Status
from broker.sqlitewal import RefusedFileError
from broker.testing import FakeClock, settle

US = "www.amazon.com"
DE = "www.amazon.de"
TITLE = ("itemInfo.title",)
OFFERS = ("itemInfo.title", "offersV2.listings.price")

MakeCache = Callable[..., StoreCache]


def ok(asin: str, clock: FakeClock, resources: tuple[str, ...] = TITLE, **kw: object) -> ItemResult:
    """An ok answer for ``asin`` fetched now, carrying its complete query."""
    return ItemResult(
        asin,
        str(kw.get("marketplace", US)),
        Status.OK,
        item=kw.get("item")
        or {"ASIN": asin, "ItemInfo": {"Title": {"DisplayValue": f"title {asin}"}}},  # type: ignore[arg-type]
        summary=ItemSummary(title=f"title {asin}", price=9.99, currency="EUR"),
        attempts=1,
        key="main",
        fetched_at=clock.utcnow(),
        query=Query(asin, str(kw.get("marketplace", US)), resources),
    )


def not_found(asin: str, clock: FakeClock) -> ItemResult:
    """Amazon's answer that ``asin`` is gone (ItemNotAccessible), fetched now."""
    return ItemResult(
        asin,
        US,
        Status.NOT_FOUND,
        error=ErrorDetail("ItemNotAccessible", "gone", "none"),
        fetched_at=clock.utcnow(),
        query=q(asin),
    )


def q(asin: str, resources: tuple[str, ...] = TITLE, marketplace: str = US) -> Query:
    """A complete query."""
    return Query(asin, marketplace, resources)


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="make", params=["memory", "sqlite", "fakeredis"])
async def _make(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[MakeCache]:
    made: list[StoreCache] = []
    server = fakeredis.FakeServer()

    def make(policy: CachePolicy | None = None) -> StoreCache:
        policy = policy or CachePolicy(max_age_s=3_600)
        cache: StoreCache
        if request.param == "memory":
            cache = MemoryCache(policy, clock=clock)
        elif request.param == "sqlite":
            cache = SqliteCache(tmp_path / "state" / "cache.sqlite3", policy, clock=clock)
        else:
            client = fakeredis.FakeAsyncRedis(server=server)
            cache = RedisCache(client, policy, clock=clock, owns_client=True)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


def _tear_payload(path: Path, asin: str) -> None:
    """Cut ``asin``'s stored payload short in the SQLite cache file: it fails its checksum."""
    with sqlite_db(path) as db:
        db.execute("UPDATE item_cache SET payload = substr(payload, 1, 20) WHERE asin = ?", (asin,))


def _file_sizes(path: Path) -> tuple[int, int]:
    """Sizes of a SQLite file and of its write-ahead log."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


class TestPolicy:
    def test_ceiling_refused_quoting_rule(self) -> None:
        """A max age above 86,400 s is a ConfigError that quotes Amazon's 24-hour rule."""
        with pytest.raises(ConfigError, match="24 hours") as info:
            CachePolicy(max_age_s=86_401)
        assert info.value.path == "cache.max_age_s"
        with pytest.raises(ConfigError, match="24 hours"):
            CachePolicy(max_age_s=3_600, offers_max_age_s=100_000)
        assert CachePolicy(max_age_s=CEILING_S).enabled

    def test_ceiling_message_shows_the_value_as_given(self) -> None:
        """86400.0000001 is refused as itself, not as "86400 s is above the 86,400 s
        ceiling" (a message contradicting itself)."""
        with pytest.raises(ConfigError, match=r"^.*86400\.0000001 s is above"):
            CachePolicy(max_age_s=86_400.0000001)

    def test_offers_are_kept_an_hour_by_default(self) -> None:
        """Unset, answers with prices are served up to 3,600 s old (the README's default),
        whether the policy comes from config.toml, a CacheConfig or a CachePolicy, even
        under the 86,400 s ceiling for everything else."""
        doc = {
            "api": {"protocol": "paapi5"},
            "keys": [{"name": "k", "credential_id": "id", "partner_tags": {US: "t-20"}}],
        }
        assert parse_config(doc, environ={}).cache.offers_max_age_s == 3_600
        assert CacheConfig().offers_max_age_s == 3_600
        assert CachePolicy().offers_max_age_s == 3_600
        day = CachePolicy(max_age_s=CEILING_S)
        assert day.limit_s(CacheKey.of(US, "B000000001", OFFERS)) == 3_600
        assert day.limit_s(CacheKey.of(US, "B000000001", TITLE)) == CEILING_S

    def test_a_negative_byte_bound_is_refused(self) -> None:
        """max_bytes = -1 is a ConfigError naming cache.max_bytes (0 is "no byte bound")."""
        with pytest.raises(ConfigError) as info:
            CachePolicy(max_bytes=-1)
        assert (info.value.path, info.value.message) == ("cache.max_bytes", "must be >= 0, got -1")
        assert CachePolicy(max_bytes=0).max_bytes == 0

    def test_config_table_refuses_ceiling(self) -> None:
        """``[cache] max_age_s = 90000`` in config.toml is refused at load with the rule."""
        doc = {
            "api": {"protocol": "paapi5"},
            "keys": [{"name": "k", "credential_id": "id", "partner_tags": {US: "t-20"}}],
            "cache": {"max_age_s": 90_000},
        }
        with pytest.raises(ConfigError, match=r"cache\.max_age_s.*24 hours"):
            parse_config(doc, environ={})

    def test_config_table_parsed(self, tmp_path: Path) -> None:
        """The [cache] table fills CacheConfig; a relative path is relative to the config."""
        doc = {
            "api": {"protocol": "paapi5"},
            "keys": [{"name": "k", "credential_id": "id", "partner_tags": {US: "t-20"}}],
            "cache": {"max_age_s": 7_200, "max_items": 50, "path": "c.db", "offers_max_age_s": 60},
        }
        config = parse_config(doc, environ={}, base_dir=tmp_path).cache
        assert config.path == str(tmp_path / "c.db")
        assert CachePolicy(7_200, 60, 50, 256 * 1024 * 1024) == config.policy()
        unset = parse_config({**doc, "cache": {}}, environ={}).cache
        assert unset.max_age_s is None
        assert unset.policy().max_age_s == 0
        assert unset.policy(CEILING_S).max_age_s == CEILING_S

    def test_config_redis_password_refused(self) -> None:
        """A Redis URL with a password in config.toml is refused without echoing it."""
        doc = {
            "api": {"protocol": "paapi5"},
            "keys": [{"name": "k", "credential_id": "id", "partner_tags": {US: "t-20"}}],
            "cache": {"backend": "redis", "redis_url": "redis://:hunter2@localhost:6379/0"},
        }
        with pytest.raises(ConfigError, match="redis_url_env") as info:
            parse_config(doc, environ={})
        assert "hunter2" not in str(info.value)
        doc["cache"] = {"backend": "redis", "redis_url": "redis://localhost:6379/0?password=h2"}
        with pytest.raises(ConfigError, match="redis_url_env") as info:
            parse_config(doc, environ={})
        assert "h2" not in str(info.value)
        doc["cache"] = {"backend": "redis", "redis_url": "rediss://h:1/0?ssl_password=k3y"}
        with pytest.raises(ConfigError, match="redis_url_env") as info:
            parse_config(doc, environ={})
        assert "k3y" not in str(info.value)
        doc["cache"] = {"backend": "redis", "redis_url_env": "ASINB_REDIS_URL"}
        parsed = parse_config(doc, environ={"ASINB_REDIS_URL": "redis://:pw@h:1/0"})
        assert parsed.cache.redis_url is not None
        assert parsed.cache.redis_url.reveal() == "redis://:pw@h:1/0"
        assert "pw" not in repr(parsed.cache)
        # Nor in the dataclass's fields as a dict (a config dumped for a debug page).
        assert "pw@" not in repr(dataclasses.asdict(parsed.cache))

    def test_a_redis_cache_says_where_it_is_and_which_setting_names_it(self) -> None:
        """A Redis cache's where is its URL without the password (cache stats showed only
        "redis"), and its advice names redis_url_env's variable when the URL came from
        there (it said to check [cache] redis_url, which was not set)."""
        from redis.exceptions import ConnectionError as RedisConnectionError

        from broker.cache.open import open_store

        doc: dict[str, object] = {
            "api": {"protocol": "paapi5"},
            "keys": [{"name": "k", "credential_id": "id", "partner_tags": {US: "t-20"}}],
            "cache": {"backend": "redis", "redis_url_env": "ASINB_REDIS_URL"},
        }
        config = parse_config(doc, environ={"ASINB_REDIS_URL": "redis://:Pw9x@h:1/2"}).cache
        store = open_store(config, CachePolicy(60), namespace="n")
        assert store.where == "redis://h:1/2"
        described = store.describe_failure(RedisConnectionError("refused"))
        assert "redis://h:1/2" in described
        assert "ASINB_REDIS_URL" in described
        assert "Pw9x" not in described

    async def test_a_redis_that_never_answers_fails_within_the_timeout(self) -> None:
        """A Redis that accepts the connection and never replies is a cache failure within
        ``timeout_s`` (2 s by default), not a lookup waiting for ever (redis-py 5 has no
        timeout of its own)."""
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cache = RedisCache.from_url(f"redis://127.0.0.1:{port}/0", CachePolicy(60), timeout_s=0.2)
        try:
            assert cache._redis.connection_pool.connection_kwargs["socket_timeout"] == 0.2
            with pytest.raises(cache.failures):
                await asyncio.wait_for(cache.get_many([q("B000000001")]), 10)
        finally:
            await cache.aclose()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()
        default = RedisCache.from_url("redis://127.0.0.1:1/0", CachePolicy(60))
        try:
            assert default._redis.connection_pool.connection_kwargs["socket_timeout"] == 2.0
        finally:
            await default.aclose()

    def test_a_redis_url_option_its_scheme_does_not_take_is_a_config_error(self) -> None:
        """``?ssl_password=`` on a ``redis://`` URL (from redis_url_env) is a config error
        naming the option, at once: ``broker cache stats`` ended in a TypeError traceback
        at its first command. The value is never quoted."""
        with pytest.raises(ConfigError, match=r"ssl_password.*rediss://") as info:
            RedisCache.from_url("redis://127.0.0.1:1/0?ssl_password=Zq9KeyPass", CachePolicy(60))
        assert "Zq9KeyPass" not in str(info.value)

    def test_redis_url_env_is_read_only_for_the_redis_backend(self) -> None:
        """``redis_url_env`` beside ``backend = "sqlite"`` (the starter's [cache] block
        uncommented) needs no variable, as [state]'s Redis settings need none for "local";
        an empty variable for Redis says it is empty, not that it is not set."""
        doc: dict[str, object] = {
            "api": {"protocol": "paapi5"},
            "keys": [{"name": "k", "credential_id": "id", "partner_tags": {US: "t-20"}}],
            "cache": {"backend": "sqlite", "redis_url_env": "ASINB_REDIS_URL"},
        }
        assert parse_config(doc, environ={}).cache.redis_url is None
        doc["cache"] = {"backend": "redis", "redis_url_env": "ASINB_REDIS_URL"}
        with pytest.raises(ConfigError, match="ASINB_REDIS_URL is empty"):
            parse_config(doc, environ={"ASINB_REDIS_URL": " "})
        with pytest.raises(ConfigError, match="ASINB_REDIS_URL is not set"):
            parse_config(doc, environ={})

    def test_resources_normalised(self) -> None:
        """Order, case, blanks and duplicates of resources do not change the key."""
        a = CacheKey.of(US, "b00000000a ", ["offersV2.listings.price", "itemInfo.title"])
        b = CacheKey.of(US, "B00000000A", ["ItemInfo.Title", "OffersV2.Listings.Price", " "])
        assert a == b
        assert normalise_resources(a.resources) == ("iteminfo.title", "offersv2.listings.price")

    def test_offer_resources(self) -> None:
        """offersV2.*, OffersV2.*, Offers.* and the trade-in info (its answer holds a trade-in
        price) are price resources; others are not."""
        assert has_offer_resources(["offersV2.listings.price"])
        assert has_offer_resources(["itemInfo.title", "itemInfo.tradeInInfo"])
        assert has_offer_resources(["ItemInfo.TradeInInfo"])
        assert has_offer_resources(["OffersV2.Listings.Availability"])
        assert has_offer_resources(["Offers.Listings.Price"])
        assert has_offer_resources(["RentalOffers.Listings.BasePrice"])  # PA-API's rentals
        assert not has_offer_resources(["itemInfo.title", "images.primary.medium"])
        assert not has_offer_resources(["offersummary"])

    async def test_open_cache_defaults(self, tmp_path: Path) -> None:
        """Unset max age: off for the library, 24 h SQLite in the state dir for broker run."""
        environ = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
        assert open_cache(CacheConfig(), namespace="creators", environ=environ) is None
        cache = open_cache(
            CacheConfig(), namespace="creators", default_max_age_s=CEILING_S, environ=environ
        )
        assert isinstance(cache, SqliteCache)
        assert cache.path == tmp_path / "xdg" / "asin-broker" / "item-cache.sqlite3"
        assert cache.policy.max_age_s == CEILING_S
        await cache.aclose()
        assert open_cache(CacheConfig(max_age_s=600), namespace="x", max_age_s=0) is None
        with pytest.raises(ConfigError, match="24 hours"):
            open_cache(CacheConfig(), namespace="x", max_age_s=100_000)


class TestServe:
    async def test_hit_is_marked_cached(self, make: MakeCache, clock: FakeClock) -> None:
        """A stored answer comes back cached, with its original fetched_at and the new tag."""
        cache = make()
        answer = ok("B000000001", clock)
        assert await cache.get_many([q("B000000001")]) == [None]
        assert await cache.put_many([answer]) == 1
        await clock.advance(600)
        asked = Query("b000000001", US, ("ITEMINFO.TITLE",), tag=42)
        [hit] = await cache.get_many([asked])
        assert hit is not None
        assert hit.cached
        assert answer.fetched_at == hit.fetched_at
        assert hit.attempts == 0
        assert hit.key is None
        assert answer.item == hit.item
        assert answer.summary == hit.summary
        assert hit.query is asked
        assert hit.to_json()["cached"] is True

    async def test_only_ok_answers_are_stored(self, make: MakeCache, clock: FakeClock) -> None:
        """not_found, failed and already-cached results never enter the cache."""
        cache = make()
        error = ErrorDetail("ItemNotAccessible", "gone", "none")
        results = [
            not_found("B000000002", clock),
            ItemResult("B000000003", US, Status.FAILED, error=error, query=q("B000000003")),
            ItemResult(
                "B000000004",
                US,
                Status.OK,
                item={},
                fetched_at=clock.utcnow(),
                query=q("B000000004"),
                cached=True,
            ),
        ]
        assert await cache.put_many(results) == 0
        assert (await cache.stats()).entries == 0

    async def test_not_found_forgets_the_cached_answer(
        self, make: MakeCache, clock: FakeClock
    ) -> None:
        """Amazon saying an item is gone (a refresh, a shorter max age, another process)
        deletes its cached ok answers, whatever resources each was asked with (the one of
        another resource set was still served as ok); another marketplace's item keeps its
        own, and a failure (nothing said of the item) deletes nothing."""
        cache = make()
        await cache.put_many(
            [
                ok("B000000001", clock),
                ok("B000000001", clock, resources=("itemInfo.features",)),
                ok("B000000001", clock, marketplace=DE),
            ]
        )
        await cache.put_many(
            [
                ItemResult(
                    "B000000001",
                    US,
                    Status.FAILED,
                    error=ErrorDetail("InternalFailure", "x", "none"),
                    query=q("B000000001"),
                )
            ]
        )
        assert (await cache.get_many([q("B000000001")]))[0] is not None
        await clock.advance(10)
        gone = not_found("B000000001", clock)
        assert await cache.put_many([gone]) == 0
        assert await cache.get_many([q("B000000001")]) == [None]
        assert await cache.get_many([q("B000000001", ("itemInfo.features",))]) == [None]
        [elsewhere] = await cache.get_many([q("B000000001", marketplace=DE)])
        assert elsewhere is not None
        # In one batch the later answer wins too: an ok (of any resource set), then the
        # item gone; the item gone, then an ok: it is back.
        features = ok("B000000001", clock, resources=("itemInfo.features",))
        await cache.put_many([ok("B000000001", clock), features, gone])
        assert await cache.get_many([q("B000000001")]) == [None]
        assert await cache.get_many([q("B000000001", ("itemInfo.features",))]) == [None]
        await cache.put_many([gone, ok("B000000001", clock)])
        assert (await cache.get_many([q("B000000001")]))[0] is not None

    async def test_an_item_gone_then_back_in_one_batch_keeps_its_other_answers(
        self, make: MakeCache, clock: FakeClock
    ) -> None:
        """Amazon's not_found then ok for an item in one put_many: the later answer wins, the
        item is there, so the answer cached for another resource set of it is still served."""
        cache = make()
        features = ("itemInfo.features",)
        await cache.put_many([ok("B000000001", clock, resources=features)])
        await clock.advance(10)
        gone = not_found("B000000001", clock)
        assert await cache.put_many([gone, ok("B000000001", clock)]) == 1
        title, other = await cache.get_many([q("B000000001"), q("B000000001", features)])
        assert title is not None
        assert other is not None

    async def test_marketplace_and_resources_are_part_of_key(
        self, make: MakeCache, clock: FakeClock
    ) -> None:
        """An answer for one marketplace or resource set does not serve another."""
        cache = make()
        await cache.put_many([ok("B000000001", clock)])
        got = await cache.get_many(
            [q("B000000001", marketplace=DE), q("B000000001", OFFERS), q("B000000001")]
        )
        assert [r is not None for r in got] == [False, False, True]

    async def test_max_age(self, make: MakeCache, clock: FakeClock) -> None:
        """Past max_age_s an answer is a miss; a --max-age override shortens or lengthens it."""
        cache = make(CachePolicy(max_age_s=3_600, offers_max_age_s=3_600))
        await cache.put_many([ok("B000000001", clock)])
        await clock.advance(3_000)
        assert await cache.get_many([q("B000000001")], max_age_s=2_000) == [None]
        await clock.advance(1_000)
        assert await cache.get_many([q("B000000001")]) == [None]
        [hit] = await cache.get_many([q("B000000001")], max_age_s=86_400)
        assert hit is not None
        with pytest.raises(ConfigError, match="24 hours"):
            await cache.get_many([q("B000000001")], max_age_s=86_401)

    async def test_answers_past_the_ceiling_a_read_only_file_keeps_are_counted_not_served(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file this process may only read, holding an answer past 24 h: stats count it
        (its age shows it) and reads miss it, with one warning; both failed with "attempt to
        write a readonly database", `broker cache stats` with exit 74."""
        cache = SqliteCache(tmp_path / "c.sqlite3", CachePolicy(3_600), clock=clock)
        await cache.put_many([ok("B000000001", clock)])
        await clock.advance(90_000)

        async def read_only(*args: object, **kwargs: object) -> int:
            error = sqlite3.OperationalError("attempt to write a readonly database")
            error.sqlite_errorcode = sqlite3.SQLITE_READONLY
            raise error

        monkeypatch.setattr(cache, "_delete", read_only)
        with capture_logs() as logs:
            stats = await cache.stats()
            assert await cache.get_many([q("B000000001")]) == [None]
        assert stats.entries == 1
        assert stats.oldest_age_s is not None
        assert stats.oldest_age_s > 86_400
        assert "cache.expired_kept" in [e["event"] for e in logs]
        await cache.aclose()

    async def test_an_answer_from_the_future_is_replaced(
        self, make: MakeCache, clock: FakeClock
    ) -> None:
        """An answer stamped an hour ahead (the clock was set back since) is a miss, and the
        answer fetched again replaces it: the cache serves again at once, not after an hour."""
        cache = make()
        ahead = dataclasses.replace(
            ok("B000000001", clock), fetched_at=clock.utcnow() + timedelta(hours=1)
        )
        await cache.put_many([ahead])
        assert await cache.get_many([q("B000000001")]) == [None]
        again = ok("B000000001", clock)
        await cache.put_many([again])
        [hit] = await cache.get_many([q("B000000001")])
        assert hit is not None
        assert hit.fetched_at == again.fetched_at

    async def test_old_fetched_at_never_overwrites_newer(
        self, make: MakeCache, clock: FakeClock
    ) -> None:
        """A late writer (another machine) with an older answer does not replace a fresher one."""
        cache = make()
        older = ok("B000000001", clock)
        await clock.advance(100)
        newer = ok("B000000001", clock)
        await cache.put_many([newer])
        await cache.put_many([older])
        [hit] = await cache.get_many([q("B000000001")])
        assert hit is not None
        assert hit.fetched_at == newer.fetched_at

    async def test_a_clock_set_back_never_stretches_the_ceiling(
        self, make: MakeCache, clock: FakeClock
    ) -> None:
        """An answer stored while the clock ran 2 h ahead is dropped at the next store after
        the clock is set back, so it is never served 25 h after Amazon sent it."""
        cache = make(CachePolicy(max_age_s=CEILING_S))
        if isinstance(cache, RedisCache):
            pytest.skip("Redis's own TTL, counted in real seconds from the write, ends it")
        clock.wall_offset = 2 * 3_600
        await cache.put_many([ok("B000000001", clock)])
        clock.wall_offset = 0
        await cache.put_many([ok("B000000002", clock)])
        assert (await cache.stats()).entries == 1
        await clock.advance(25 * 3_600)
        assert await cache.get_many([q("B000000001")]) == [None]

    async def test_ceiling_even_with_override(self, make: MakeCache, clock: FakeClock) -> None:
        """Nothing older than 86,400 s is ever served, and a later put deletes it."""
        cache = make(CachePolicy(max_age_s=CEILING_S))
        await cache.put_many([ok("B000000001", clock)])
        await clock.advance(CEILING_S + 1)
        assert await cache.get_many([q("B000000001")], max_age_s=CEILING_S) == [None]
        await cache.put_many([ok("B000000002", clock)])
        assert (await cache.stats()).entries == 1

    async def test_offers_ttl(self, make: MakeCache, clock: FakeClock) -> None:
        """Past offers_max_age_s, answers with price resources miss while others still hit."""
        cache = make(CachePolicy(max_age_s=CEILING_S, offers_max_age_s=3_600))
        await cache.put_many([ok("B000000001", clock, OFFERS), ok("B000000001", clock, TITLE)])
        await clock.advance(3_599)
        assert all(await cache.get_many([q("B000000001", OFFERS), q("B000000001")]))
        await clock.advance(2)
        offers, title = await cache.get_many([q("B000000001", OFFERS), q("B000000001")])
        assert offers is None
        assert title is not None

    async def test_eviction_under_small_bound(self, make: MakeCache, clock: FakeClock) -> None:
        """Beyond max_items the oldest answers go first, and the evictions are counted."""
        cache = make(CachePolicy(max_age_s=3_600, max_items=3))
        for i in range(5):
            await cache.put_many([ok(f"B00000000{i}", clock)])
            await clock.advance(10)
        got = await cache.get_many([q(f"B00000000{i}") for i in range(5)])
        assert [r is not None for r in got] == [False, False, True, True, True]
        stats = await cache.stats()
        assert (stats.entries, stats.evictions) == (3, 2)

    async def test_purge(self, make: MakeCache, clock: FakeClock) -> None:
        """purge by ASIN list, by age, and all."""
        cache = make()
        await cache.put_many([ok("B000000001", clock), ok("B000000002", clock, OFFERS)])
        await clock.advance(100)
        await cache.put_many([ok("B000000003", clock), ok("B000000004", clock)])
        assert await cache.purge(asins=["b000000002", "B000000003"]) == 2
        assert await cache.purge(older_than_s=50) == 1
        got = await cache.get_many([q(f"B00000000{i}") for i in range(1, 5)])
        assert [r is not None for r in got] == [False, False, False, True]
        assert await cache.purge() == 1
        assert (await cache.stats()).entries == 0

    async def test_a_redis_entry_expires_24_hours_after_it_was_fetched(
        self, clock: FakeClock
    ) -> None:
        """An answer written 23 h after Amazon sent it gets a TTL of at most an hour: the
        TTL ends 86,400 s after fetched_at, not after the write (Amazon's 24-hour rule)."""
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        async with RedisCache(client, CachePolicy(86_400), clock=clock, owns_client=True) as cache:
            answer = ok("B000000001", clock)
            await clock.advance(23 * 3600)
            await cache.put_many([answer])
            assert 0 < await client.ttl(cache._name(key_of(q("B000000001")))) <= 3600

    async def test_a_redis_purge_goes_a_slice_at_a_time(
        self, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Redis deletes in transactions of a bounded size (one of 100,000 entries outlasted
        the reply timeout), every entry and its index records all the same."""
        monkeypatch.setattr("broker.cache.redis_store._DROP_SLICE", 4)
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        transactions = 0
        pipeline = client.pipeline

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal transactions
            transactions += 1
            return pipeline(*args, **kwargs)

        async with RedisCache(client, CachePolicy(3_600), clock=clock, owns_client=True) as cache:
            await cache.put_many([ok(f"B0000000{i:02d}", clock) for i in range(10)])
            monkeypatch.setattr(client, "pipeline", counting)
            assert await cache.purge() == 10
            assert transactions == 3
            stats = await cache.stats()
            assert (stats.entries, stats.bytes) == (0, 0)
            assert await client.keys("*") == []

    @pytest.mark.parametrize("by", ["stats", "a write"])
    async def test_a_sqlite_expiry_goes_a_slice_at_a_time(
        self, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by: str
    ) -> None:
        """A day's expiry, swept by a stats call or by the first write after a quiet day,
        deletes in transactions of a bounded size (one of a million rows held the file 50 s,
        every other process locked out and running without the cache), every answer past
        the ceiling all the same, the totals with them."""
        from broker.cache import sqlite as sqlite_module

        monkeypatch.setattr(sqlite_module, "_DELETE_SLICE", 4)
        transactions = 0
        real = sqlite_module.immediate

        def counting(db: Any) -> Any:
            nonlocal transactions
            transactions += 1
            return real(db)

        async with SqliteCache(tmp_path / "c.sqlite3", CachePolicy(3_600), clock=clock) as cache:
            await cache.put_many([ok(f"B0000000{i:02d}", clock) for i in range(10)])
            await clock.advance(86_401)
            monkeypatch.setattr(sqlite_module, "immediate", counting)
            if by == "a write":
                await cache.put_many([ok("B000000099", clock)])
                monkeypatch.undo()
            stats = await cache.stats()
        assert transactions == 3  # 4 expired, 4, the last 2 (the write's own among them)
        expected = (1, True) if by == "a write" else (0, False)
        assert (stats.entries, stats.bytes > 0) == expected

    async def test_stats(self, make: MakeCache, clock: FakeClock) -> None:
        """Stats count hits, misses, requests saved (per 10 hits), entries and bytes."""
        cache = make()
        await cache.put_many([ok(f"B0000000{i:02d}", clock) for i in range(12)])
        await clock.advance(5)
        await cache.get_many([q(f"B0000000{i:02d}") for i in range(15)])
        stats = await cache.stats()
        assert (stats.hits, stats.misses, stats.requests_saved, stats.entries) == (12, 3, 1, 12)
        assert stats.bytes > 12 * 100
        assert stats.oldest_age_s == pytest.approx(5)

    async def test_an_answer_stamped_ahead_has_age_zero(
        self, make: MakeCache, clock: FakeClock
    ) -> None:
        """An answer stamped ahead of the clock, by less than the minute a store still keeps
        (another machine's clock a little ahead), shows an oldest age of 0 in stats, never a
        negative one."""
        cache = make()
        ahead = dataclasses.replace(
            ok("B000000001", clock), fetched_at=clock.utcnow() + timedelta(seconds=30)
        )
        await cache.put_many([ahead])
        stats = await cache.stats()
        assert (stats.entries, stats.oldest_age_s) == (1, 0.0)

    async def test_sqlite_stats_read_an_index_not_the_payloads(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """A namespace's stats come from a covering index: a scrape never reads the payloads."""
        from broker.cache import sqlite as home

        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(max_age_s=3_600), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock)])
        with sqlite_db(path) as db:
            plan = db.execute("EXPLAIN QUERY PLAN " + home._MEASURE, ("creators",)).fetchall()
        db.close()
        assert "COVERING INDEX" in " ".join(str(step[-1]) for step in plan)

    async def test_sqlite_reads_search_the_key_index(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """A read of many keys searches the unique index on all four key columns, once per
        key; it walked every row of the namespace per read, so a large job ran at a third
        of its speed once the cache held its 100,000 answers."""
        from broker.cache import sqlite as home

        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(max_age_s=3_600), clock=clock) as cache:
            await cache.put_many([ok(f"B{i:09d}", clock) for i in range(50)])
            found = await cache.get_many([q(f"B{i:09d}") for i in range(45, 60)])
        assert sorted(r.asin for r in found if r is not None) == [
            f"B{i:09d}" for i in range(45, 50)
        ]
        keys = [("www.amazon.com", f"B{i:09d}", "x") for i in range(3)]
        params = [*(part for key in keys for part in key), "creators"]
        with sqlite_db(path) as db:
            plan = db.execute("EXPLAIN QUERY PLAN " + home._select_many(3), params).fetchall()
        db.close()
        steps = " ".join(str(step[-1]) for step in plan)
        assert "(ns=? AND marketplace=? AND asin=? AND resources=?)" in steps
        assert "SCAN c" not in steps

    async def test_sqlite_opens_for_reading_while_another_program_writes(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """A process starting while another program holds the file's write lock (a sqlite3
        shell, a backup) reads its fresh answers at once: every open took the write lock to
        create the schema, waited 5 s, failed, and the answer was fetched again."""
        path = tmp_path / "cache.sqlite3"
        policy = CachePolicy(max_age_s=3_600)
        async with SqliteCache(path, policy, clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock)])
        with sqlite_db(path) as writer:
            writer.execute("BEGIN IMMEDIATE")
            async with SqliteCache(path, policy, clock=clock) as starting:
                found = await asyncio.wait_for(starting.get_many([q("B000000001")]), 2)
            writer.execute("ROLLBACK")
        assert [r.asin if r is not None else None for r in found] == ["B000000001"]

    async def test_a_linked_path_whose_target_is_deleted_alone_keeps_working(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """[cache] path a symbolic link, its target deleted alone (its -wal and -shm kept):
        the running cache stays on the file it has, as for a plain path (its journals were
        looked for beside the link: the file was taken for replaced, reopened beside the
        live -wal, and SQLite failed with "disk I/O error")."""
        (tmp_path / "real").mkdir()
        target = tmp_path / "real" / "items.sqlite3"
        link = tmp_path / "items.sqlite3"
        link.symlink_to(target)
        async with SqliteCache(link, CachePolicy(max_age_s=3_600), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock)])
            target.unlink()
            await clock.advance(5.0)
            with capture_logs() as logs:
                await cache.put_many([ok("B000000002", clock)])
                found = await cache.get_many([q("B000000001"), q("B000000002")])
        assert [r.asin if r is not None else None for r in found] == ["B000000001", "B000000002"]
        assert [e["event"] for e in logs] == []

    async def test_a_link_pointed_at_another_file_is_followed(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """[cache] path a link, pointed at another cache file while a cache runs: its next
        writes go to the file the link names now, where processes opened since meet."""
        (tmp_path / "one").mkdir()
        (tmp_path / "two").mkdir()
        link = tmp_path / "items.sqlite3"
        link.symlink_to(tmp_path / "one" / "items.sqlite3")
        policy = CachePolicy(max_age_s=3_600)
        async with SqliteCache(link, policy, clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock)])
            link.unlink()
            link.symlink_to(tmp_path / "two" / "items.sqlite3")
            await clock.advance(5.0)
            await cache.put_many([ok("B000000002", clock)])
        async with SqliteCache(tmp_path / "two" / "items.sqlite3", policy, clock=clock) as two:
            found = await two.get_many([q("B000000001"), q("B000000002")])
        assert [r.asin if r is not None else None for r in found] == [None, "B000000002"]

    async def test_sqlite_purge_gives_the_space_back(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """A purge of every answer leaves no free pages in the file and shrinks it (the
        incremental vacuum freed one page a purge: 2.35 MB stayed 2.35 MB)."""
        path = tmp_path / "cache.sqlite3"
        padding = "x" * 2_000
        async with SqliteCache(path, CachePolicy(max_age_s=3_600), clock=clock) as cache:
            answers = [
                ok(f"B{i:09d}", clock, item={"ASIN": f"B{i:09d}", "pad": padding})
                for i in range(1_000)
            ]
            await cache.put_many(answers)
            full = path.stat().st_size
            assert await cache.purge() == 1_000
            with sqlite_db(path) as db:
                assert db.execute("PRAGMA freelist_count").fetchone()[0] < 64
        assert path.stat().st_size < full / 4

    @pytest.mark.parametrize("home", ["sqlite", "fakeredis"])
    async def test_stats_count_only_their_namespace(
        self, home: str, tmp_path: Path, clock: FakeClock
    ) -> None:
        """Two namespaces in one home: each one's stats count its own answers only."""
        server = fakeredis.FakeServer()

        def open_as(namespace: str) -> StoreCache:
            policy = CachePolicy(max_age_s=3_600)
            if home == "sqlite":
                path = tmp_path / "cache.sqlite3"
                return SqliteCache(path, policy, namespace=namespace, clock=clock)
            client = fakeredis.FakeAsyncRedis(server=server)
            return RedisCache(client, policy, namespace=namespace, clock=clock, owns_client=True)

        async with open_as("creators.a") as first, open_as("creators.b") as second:
            await first.put_many([ok(f"B0000000{i:02d}", clock) for i in range(3)])
            await clock.advance(60)
            await second.put_many([ok("B000000099", clock)])
            mine, theirs = await first.stats(), await second.stats()
        assert (mine.entries, theirs.entries) == (3, 1)
        assert mine.bytes > 2 * theirs.bytes
        assert (mine.oldest_age_s, theirs.oldest_age_s) == (pytest.approx(60), pytest.approx(0))

    async def test_off_serves_nothing(self, make: MakeCache, clock: FakeClock) -> None:
        """With max_age_s 0 nothing is served (unless a call passes its own max age)."""
        cache = make(CachePolicy(max_age_s=0))
        await cache.put_many([ok("B000000001", clock)])
        assert await cache.get_many([q("B000000001")]) == [None]
        assert [r is not None for r in await cache.get_many([q("B000000001")], max_age_s=60)] == [
            True
        ]

    async def test_incomplete_query_refused(self, make: MakeCache) -> None:
        """A query without marketplace or resources is a ValueError (the broker fills them)."""
        with pytest.raises(ValueError, match="complete query"):
            await make().get_many([Query("B000000001")])


class TestSqlite:
    async def test_file_private_wal(self, tmp_path: Path, clock: FakeClock) -> None:
        """The state directory is created 0700, the file 0600, in WAL mode."""
        path = tmp_path / "state" / "asin-broker" / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(60), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock)])
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with sqlite_db(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    async def test_answers_past_24_hours_go_without_a_write(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """Answers left past the 24-hour ceiling (a machine idle over a weekend) are deleted at
        the first read of the next process, and stats never counts them, with no write."""
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(3_600), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock), ok("B000000002", clock)])
        await clock.advance(3 * 86_400)
        async with SqliteCache(path, CachePolicy(3_600), clock=clock) as cache:
            stats = await cache.stats()
            assert (stats.entries, stats.oldest_age_s) == (0, None)
        with sqlite_db(path) as db:
            assert db.execute("SELECT count(*) FROM item_cache").fetchone() == (0,)
        async with SqliteCache(path, CachePolicy(3_600), clock=clock) as cache:
            await cache.put_many([ok("B000000003", clock)])
        await clock.advance(86_401)
        async with SqliteCache(path, CachePolicy(3_600), clock=clock) as cache:
            assert await cache.get_many([q("B000000004")]) == [None]
            with sqlite_db(path) as db:
                assert db.execute("SELECT count(*) FROM item_cache").fetchone() == (0,)

    async def test_first_read_with_nothing_expired_takes_no_write_lock(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """With nothing past 24 hours, a process's first read only reads: another process
        holding the write lock does not make it wait (and fail)."""
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(3_600), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock)])
        async with SqliteCache(path, CachePolicy(3_600), clock=clock) as cache:
            assert (await cache.stats()).entries == 1  # opened (its schema needs the lock)
            writer = sqlite3.connect(path, isolation_level=None)
            writer.execute("BEGIN IMMEDIATE")
            try:
                (hit,) = await cache.get_many([q("B000000001")])
                assert hit is not None
            finally:
                writer.execute("ROLLBACK")
                writer.close()

    async def test_corrupt_payload_is_a_miss(self, tmp_path: Path, clock: FakeClock) -> None:
        """A payload that fails its checksum is never served, and is deleted."""
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(60), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock), ok("B000000002", clock)])
            _tear_payload(path, "B000000001")
            torn, whole = await cache.get_many([q("B000000001"), q("B000000002")])
            assert torn is None
            assert whole is not None
            assert (await cache.stats()).entries == 1

    async def test_a_path_naming_a_pipe_is_refused_and_nothing_is_left_beside_it(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """A [cache] path naming a FIFO (or a device: /dev/null) is refused before SQLite
        opens it: it left a -journal beside it (in /dev for /dev/null) and its advice said
        to delete the damaged "file"."""
        path = tmp_path / "cache.fifo"
        os.mkfifo(path)
        cache = SqliteCache(path, CachePolicy(60), clock=clock)
        try:
            with pytest.raises(RefusedFileError, match="a pipe or a socket, not a file") as info:
                await cache.get_many([q("B000000001")])
            assert "delete" not in cache.describe_failure(info.value)
            assert "--no-cache" in str(info.value)
        finally:
            await cache.aclose()
        assert sorted(os.listdir(tmp_path)) == ["cache.fifo"]

    async def test_a_corrupt_payload_with_the_file_locked_costs_only_itself(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The damaged entry's delete waiting out another process's write lock fails the
        delete alone: the read's other answers are served (the whole read raised, and the
        engine left the cache off for a minute)."""
        monkeypatch.setattr("broker.cache.sqlite._BUSY_TIMEOUT_MS", 100)
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(60), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock), ok("B000000002", clock)])
        _tear_payload(path, "B000000001")
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        try:
            async with SqliteCache(path, CachePolicy(60), clock=clock) as cache:
                with capture_logs() as logs:
                    torn, whole = await cache.get_many([q("B000000001"), q("B000000002")])
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        assert torn is None
        assert whole is not None
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "cache.corrupt_entry",
            "cache.corrupt_entry_kept",
        ]

    @pytest.mark.parametrize("home", ["sqlite", "fakeredis"])
    async def test_a_good_answer_stored_after_a_damaged_one_was_read_is_kept(
        self, tmp_path: Path, clock: FakeClock, home: str
    ) -> None:
        """Another process's good answer for the key, stored between the read that found
        the damaged entry and its delete, stays (it was deleted by key)."""
        server = fakeredis.FakeServer()

        def open_home() -> StoreCache:
            if home == "sqlite":
                return SqliteCache(tmp_path / "cache.sqlite3", CachePolicy(60), clock=clock)
            client = fakeredis.FakeAsyncRedis(server=server)
            return RedisCache(client, CachePolicy(60), clock=clock, owns_client=True)

        async with open_home() as reader, open_home() as writer:
            await writer.put_many([ok("B000000001", clock)])
            if home == "sqlite":
                _tear_payload(tmp_path / "cache.sqlite3", "B000000001")
            else:
                raw = fakeredis.FakeAsyncRedis(server=server)
                (name,) = await raw.keys("*B000000001*")
                await raw.set(name, (await raw.get(name))[:-3], keepttl=True)
                await raw.aclose()
            await clock.advance(1)
            load = reader._load

            async def load_then_the_other_process_stores(keys: Any) -> Any:
                found = await load(keys)
                await writer.put_many([ok("B000000001", clock)])
                return found

            reader._load = load_then_the_other_process_stores  # type: ignore[method-assign]
            (damaged,) = await reader.get_many([q("B000000001")])
            (kept,) = await writer.get_many([q("B000000001")])
        assert damaged is None
        assert kept is not None

    @pytest.mark.parametrize(
        "damage",
        [
            "fetched_at = 'abc'",
            "checksum = 'text, not bytes'",
            "payload = 42",
        ],
    )
    async def test_a_damaged_row_costs_only_itself(
        self, tmp_path: Path, clock: FakeClock, damage: str
    ) -> None:
        """A row whose fields cannot be read (a time that is no number, text for bytes) is a
        miss and deleted; the other entries are still served, the cache stays on."""
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(60), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock), ok("B000000002", clock)])
            with sqlite_db(path) as db:
                db.execute(f"UPDATE item_cache SET {damage} WHERE asin = ?", ("B000000001",))
            bad, good = await cache.get_many([q("B000000001"), q("B000000002")])
            assert bad is None
            assert good is not None
            assert (await cache.stats()).entries == 1
            (again,) = await cache.get_many([q("B000000002")])
            assert again is not None

    async def test_every_row_damaged_is_still_only_misses(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """Every row of the namespace with a time that is no number: stats counts no oldest
        answer (it raised ValueError, and the first read with it, turning the cache off),
        reads are misses, and the damaged rows go."""
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(60), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock), ok("B000000002", clock)])
        with sqlite_db(path) as db:
            db.execute("UPDATE item_cache SET fetched_at = 'abc'")
        async with SqliteCache(path, CachePolicy(60), clock=clock) as cache:
            assert (await cache.stats()).oldest_age_s is None
            assert await cache.get_many([q("B000000001"), q("B000000002")]) == [None, None]
            assert (await cache.stats()).entries == 0

    async def test_a_row_mended_meanwhile_is_not_dropped(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """Dropping a damaged row deletes it only while it is still damaged: a good answer
        another process wrote since the read stays."""
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(60), clock=clock) as cache:
            await cache.put_many([ok("B000000001", clock)])
            key = key_of(q("B000000001"))
            await cache._drop_damaged([key])
            (hit,) = await cache.get_many([q("B000000001")])
            assert hit is not None

    async def test_byte_bound_keeps_file_small(self, tmp_path: Path, clock: FakeClock) -> None:
        """Writing 30x the byte bound leaves a file of a few times the bound, WAL included."""
        path = tmp_path / "cache.sqlite3"
        policy = CachePolicy(CEILING_S, max_items=1_000_000, max_bytes=200_000)
        async with SqliteCache(path, policy, clock=clock) as cache:
            big = {"blob": "x" * 4_000}
            for round_ in range(60):
                results = [
                    ItemResult(
                        f"B{round_:03d}{i:06d}",
                        US,
                        Status.OK,
                        item=big,
                        fetched_at=clock.utcnow(),
                        query=q(f"B{round_:03d}{i:06d}"),
                    )
                    for i in range(25)
                ]
                await cache.put_many(results)
                await clock.advance(1)
                assert _file_sizes(path)[1] <= 8 * 1024 * 1024 + 64 * 1024
            stats = await cache.stats()
        assert stats.bytes <= 200_000
        assert stats.evictions >= 60 * 25 - 50
        with sqlite_db(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert _file_sizes(path)[0] <= 4 * 200_000


async def test_a_redis_write_that_keeps_losing_the_race_is_said(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write whose keys other writers keep changing (every EXEC aborted) gives up after
    a few tries with one warning, cache.writes_dropped; it was let go without a word."""
    from redis.asyncio.client import Pipeline
    from redis.exceptions import WatchError

    async def aborted(self: Pipeline, raise_on_error: bool = True) -> list[object]:
        await self.reset()  # as redis-py's own execute() does, whatever happens
        raise WatchError("watched key changed")

    cache = RedisCache(fakeredis.FakeAsyncRedis(), CachePolicy(3_600), clock=clock)
    monkeypatch.setattr(Pipeline, "execute", aborted)
    with capture_logs() as logs:
        await cache.put_many([ok("B000000001", clock)])
    monkeypatch.undo()
    assert [e["entries"] for e in logs if e["event"] == "cache.writes_dropped"] == [1]
    assert await cache.get_many([q("B000000001")]) == [None]
    await cache.aclose()


async def test_half_an_emoji_in_an_item_is_cached_with_the_rest(
    make: MakeCache, clock: FakeClock
) -> None:
    """An item whose title holds a lone surrogate (half an emoji Amazon sent, read by the
    stdlib) is cached and served back as it came, beside the batch's other answers: orjson
    refused it, the whole batch's write failed, and the cache went out of use a minute."""
    cache = make()
    odd = {"ASIN": "B000000001", "ItemInfo": {"Title": {"DisplayValue": "Kettle \ud83d"}}}
    answers = [ok("B000000001", clock, item=odd), ok("B000000002", clock)]
    assert await cache.put_many(answers) == 2
    back = await cache.get_many([q("B000000001"), q("B000000002")])
    assert back[0] is not None
    assert back[0].item == odd
    assert back[1] is not None


@pytest.mark.parametrize("by_asin", [False, True])
async def test_purge_deletes_redis_answers_whose_index_was_evicted(
    clock: FakeClock, by_asin: bool
) -> None:
    """On a Redis that evicts keys (maxmemory with an allkeys policy), an answer whose index
    entries went is still purged (all of them, or by ASIN), not served on: purge found
    answers through the index only."""
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    cache = RedisCache(client, CachePolicy(max_age_s=3_600), clock=clock, owns_client=True)
    await cache.put_many([ok("B000000001", clock), ok("B000000002", clock)])
    # What an evicting Redis may drop: the bookkeeping, the answers left.
    bookkeeping = [k async for k in client.scan_iter() if b":item:" not in k]
    assert bookkeeping
    await client.delete(*bookkeeping)
    removed = await cache.purge(asins=["B000000001"] if by_asin else None)
    assert removed == (1 if by_asin else 2)
    served = await cache.get_many([q("B000000001"), q("B000000002")])
    assert served[0] is None
    assert (served[1] is None) is not by_asin
    await cache.aclose()


async def test_a_redis_purge_keeps_to_its_own_prefix_and_leaves_no_phantom(
    clock: FakeClock,
) -> None:
    """Purge's look-up by name reads the key prefix literally (``prod[1]:`` is no pattern
    matching ``prod1:``'s answers), and drops what it finds with its index entries: an
    answer written while it ran left an index entry with nothing behind it, counted on."""
    server = fakeredis.FakeServer()

    def cache(prefix: str) -> RedisCache:
        client = fakeredis.FakeAsyncRedis(server=server)
        return RedisCache(
            client, CachePolicy(max_age_s=3_600), key_prefix=prefix, clock=clock, owns_client=True
        )

    mine, other = cache("prod[1]:"), cache("prod1:")
    await other.put_many([ok("B000000002", clock)])
    await mine.put_many([ok("B000000001", clock)])
    late = cache("prod[1]:")
    listed = mine._drop_members
    writes = [ok("B000000003", clock)]

    async def a_write_lands_meanwhile(members: Sequence[bytes | str]) -> int:
        dropped = await listed(members)
        if writes:  # once: right after the listed answers went, before the look-up by name
            await late.put_many([writes.pop()])
        return dropped

    mine._drop_members = a_write_lands_meanwhile  # type: ignore[method-assign]
    assert await mine.purge() == 2
    assert (await other.get_many([q("B000000002")]))[0] is not None
    assert (await mine.stats()).entries == 0
    for each in (mine, other, late):
        await each.aclose()


def test_fetched_at_kept_to_the_microsecond(clock: FakeClock) -> None:
    """Encoding keeps fetched_at exactly enough for output rows (milliseconds)."""
    from broker.cache.entry import decode, encode

    answer = ok("B000000001", clock)
    assert answer.fetched_at is not None
    answer = dataclasses.replace(
        answer, fetched_at=answer.fetched_at + timedelta(microseconds=123_456)
    )
    key = CacheKey.of(US, "B000000001", TITLE)
    back = decode(encode(key, answer), None)
    assert answer.to_json()["fetched_at"] == back.to_json()["fetched_at"]


def test_every_summary_field_survives_the_cache(clock: FakeClock) -> None:
    """A cached answer's summary has every field the fetched one had (image_url included)."""
    from broker.cache.entry import decode, encode

    values: dict[str, object] = {
        f.name: 12.5 if f.name == "price" else f"{f.name} value"
        for f in dataclasses.fields(ItemSummary)
    }
    answer = dataclasses.replace(ok("B000000001", clock), summary=ItemSummary(**values))
    back = decode(encode(CacheKey.of(US, "B000000001", TITLE), answer), None)
    assert back.summary == answer.summary


@pytest.fixture
def local_time_five_hours_west() -> Iterator[None]:
    """The process's local time zone is UTC-5 (TZ and tzset) for the test, then restored."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "EST+05")
        time.tzset()
        yield
    time.tzset()


@pytest.mark.usefixtures("local_time_five_hours_west")
def test_a_naive_fetched_at_is_taken_as_utc(clock: FakeClock) -> None:
    """A fetched_at without a time zone is read as UTC, as every time the broker keeps is,
    not as local time: on a machine five hours west it would age five hours wrong."""
    from broker.cache.entry import decode, encode

    answer = ok("B000000001", clock)
    assert answer.fetched_at is not None
    naive = dataclasses.replace(answer, fetched_at=answer.fetched_at.replace(tzinfo=None))
    key = CacheKey.of(US, "B000000001", TITLE)
    assert encode(key, naive).fetched_at == answer.fetched_at.timestamp()
    assert decode(encode(key, naive), None).fetched_at == answer.fetched_at


class TestCommandLine:
    def _config(self, tmp_path: Path) -> Path:
        config = tmp_path / "config.toml"
        config.write_text(
            '[api]\nprotocol = "paapi5"\n'
            '[[keys]]\nname = "k"\ncredential_id = "id"\n'
            'partner_tags = { "www.amazon.com" = "t-20" }\n'
            '[cache]\npath = "cache.sqlite3"\n'
        )
        return config

    @staticmethod
    def _namespace(config: Path) -> str:
        """The config's namespace: PA-API through the embedded simulator, with its tag."""
        from broker.cache import cache_namespace

        return cache_namespace(load_config(config, environ={}))

    async def _fill(self, path: Path) -> None:
        # Answers of now: the command line reads the real clock, and older ones are gone.
        clock = FakeClock(epoch=datetime.now(UTC))
        namespace = self._namespace(path.parent / "config.toml")
        async with SqliteCache(path, CachePolicy(60), namespace=namespace, clock=clock) as cache:
            await cache.put_many([ok(f"B00000000{i}", clock) for i in range(4)])

    def test_stats_and_purge(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``broker cache stats --json`` counts entries; ``purge --asin`` and ``purge`` delete."""
        from broker.cli import main

        config = self._config(tmp_path)
        asyncio.run(self._fill(tmp_path / "cache.sqlite3"))
        assert main(["cache", "stats", "--config", str(config), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (
            report["entries"],
            report["namespace"],
            report["max_age_s"],
        ) == (4, self._namespace(config), 86_400)
        assert main(["cache", "purge", "--config", str(config), "--asin", "b000000001"]) == 0
        assert "purged 1 " in capsys.readouterr().out
        assert main(["cache", "purge", "--config", str(config), "--older-than", "1e9"]) == 0
        assert "purged 0 " in capsys.readouterr().out
        assert main(["cache", "purge", "--config", str(config)]) == 0
        assert "purged 3 " in capsys.readouterr().out

    @pytest.mark.parametrize("command", ["stats", "purge"])
    def test_a_memory_cache_is_out_of_reach_and_says_so(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
    ) -> None:
        """With backend = "memory" stats and purge refuse (exit 2) saying each process keeps
        that cache to itself: they showed an empty cache and "purged 0" while a daemon
        served on from its own."""
        from broker.cli import main

        config = self._config(tmp_path)
        config.write_text(config.read_text() + 'backend = "memory"\n')
        assert main(["cache", command, "--config", str(config)]) == 2  # usage
        captured = capsys.readouterr()
        assert "keeps the cache inside each running process" in captured.err
        assert captured.out == ""

    def test_purge_takes_ids_as_run_does(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``purge --asin`` reads a product URL or spaced id as run and lookup do; an id
        that is no ASIN is a usage error naming it, not "purged 0"."""
        from broker.cli import main

        config = self._config(tmp_path)
        asyncio.run(self._fill(tmp_path / "cache.sqlite3"))
        url = "https://www.amazon.com/dp/B000000001"
        assert main(["cache", "purge", "--config", str(config), "--asin", url, " b000000002 "]) == 0
        assert "purged 2 " in capsys.readouterr().out
        assert main(["cache", "purge", "--config", str(config), "--asin", "not an asin"]) == 2
        err = capsys.readouterr().err
        assert "--asin" in err
        assert "not an asin" in err
        assert main(["cache", "stats", "--config", str(config), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["entries"] == 2

    @pytest.mark.parametrize("action", ["stats", "purge"])
    def test_damaged_cache_file_is_one_line_and_exit_74(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
    ) -> None:
        """A cache file that is not a database: a message naming it and its remedy, exit 74."""
        from broker.cli import main

        config = self._config(tmp_path)
        (tmp_path / "cache.sqlite3").write_bytes(os.urandom(20_000))
        assert main(["cache", action, "--config", str(config)]) == 74
        err = capsys.readouterr().err
        assert str(tmp_path / "cache.sqlite3") in err
        assert "DatabaseError" in err
        assert "delete" in err
        assert "Traceback" not in err

    @pytest.mark.parametrize("age", ["-5", "nan", "inf"])
    def test_bad_older_than_is_a_usage_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], age: str
    ) -> None:
        """A negative or non-finite --older-than exits 2 (usage) and deletes nothing."""
        from broker.cli import main

        config = self._config(tmp_path)
        asyncio.run(self._fill(tmp_path / "cache.sqlite3"))
        assert main(["cache", "purge", "--config", str(config), "--older-than", age]) == 2
        assert "--older-than" in capsys.readouterr().err
        assert main(["cache", "stats", "--config", str(config), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["entries"] == 4


def test_cache_sits_below_the_engine() -> None:
    """Importing every cache module loads no engine, jobs, cli or simulator module."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, broker.cache as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'broker.cache.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(\n"
        "    ('broker.engine', 'broker.jobs', 'broker.cli', 'broker.simulator'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


class _CountingCache(MemoryCache):
    """A memory cache that counts its batch calls and can be made to fail."""

    def __init__(self, policy: CachePolicy, clock: FakeClock) -> None:
        super().__init__(policy, clock=clock)
        self.get_calls: list[int] = []
        self.put_calls: list[int] = []
        self.broken = False
        #: only writes fail (a full disk: reads still work)
        self.full = False

    async def get_many(
        self, queries: Sequence[Query], *, max_age_s: float | None = None, count: bool = True
    ) -> list[ItemResult | None]:
        self.get_calls.append(len(queries))
        if self.broken:
            raise OSError("disk gone")
        return await super().get_many(queries, max_age_s=max_age_s, count=count)

    async def put_many(self, results: Iterable[ItemResult]) -> int:
        batch = list(results)
        self.put_calls.append(len(batch))
        if self.broken or self.full:
            raise OSError("disk gone")
        return await super().put_many(batch)


class TestFront:
    async def test_gets_of_one_tick_share_one_batch(self, clock: FakeClock) -> None:
        """Fifty lookups admitted together cost one get_many; puts are written behind."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache)
        for i in range(20):
            front.put(ok(f"B0000000{i:02d}", clock))
        front.put(dataclasses.replace(ok("B000000099", clock), status=Status.NOT_FOUND))
        await front.flush()
        assert sum(cache.put_calls) == 21  # the not_found one deletes its key there
        assert (await cache.stats()).entries == 20
        assert len(cache.put_calls) <= 2
        got = await asyncio.gather(*(front.get(q(f"B0000000{i:02d}")) for i in range(50)))
        assert cache.get_calls == [50]
        assert [r is not None and r.cached for r in got] == [True] * 20 + [False] * 30
        await front.aclose()

    async def test_an_answer_served_from_the_cache_is_not_written_back(
        self, clock: FakeClock
    ) -> None:
        """A cached answer handed to the front (as every lookup's end is) writes nothing:
        each hit would be a store write, doubling a shared cache's traffic."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache)
        front.put(ok("B000000001", clock))
        await front.flush()
        hit = await front.get(q("B000000001"))
        assert hit is not None
        assert hit.cached
        front.put(hit)
        await front.flush()
        assert cache.put_calls == [1]
        await front.aclose()

    async def test_the_store_is_not_asked_for_stats_while_left_alone(
        self, clock: FakeClock
    ) -> None:
        """stats() during the cool-off raises at once without asking the store: a hung
        Redis held every /metrics scrape for its 5-s timeout. Asked again after it."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache, clock=clock)
        cache.broken = True
        assert await front.get(q("B000000001")) is None
        asked: list[int] = []
        real_stats = cache.stats

        async def stats() -> CacheStats:
            asked.append(1)
            return await real_stats()

        cache.stats = stats  # type: ignore[method-assign]
        with pytest.raises(BrokerError, match=r"left alone after a failure: .*disk gone"):
            await front.stats()
        assert asked == []
        cache.broken = False
        await clock.advance(COOL_OFF_S)
        assert (await front.stats()).misses == 1
        assert asked == [1]
        await front.aclose()

    async def test_a_failing_stats_starts_the_cool_off_and_writes_alone_do_not(
        self, clock: FakeClock
    ) -> None:
        """Stats that fail leave the store alone too (an idle daemon's every scrape asked a
        hung Redis); a store whose writes alone fail (a full disk) still gives its stats."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache, clock=clock)
        asked: list[int] = []

        async def hung() -> CacheStats:
            asked.append(1)
            raise OSError("timed out")

        real_stats = cache.stats
        cache.stats = hung  # type: ignore[method-assign]
        with pytest.raises(OSError, match="timed out"):
            await front.stats()
        with pytest.raises(BrokerError, match="left alone"):
            await front.stats()
        assert asked == [1]
        cache.stats = real_stats  # type: ignore[method-assign]
        await clock.advance(COOL_OFF_S)
        cache.full = True
        front.put(ok("B000000001", clock))
        await front.flush()
        assert front.dropped_writes == 1
        assert (await front.stats()).entries == 0
        await front.aclose()

    async def test_its_tasks_carry_no_context_of_the_caller(self, clock: FakeClock) -> None:
        """The reads and the write-behind run in a context of their own: started from a
        send, they logged cache.unavailable with that send's key and batch_id bound."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache, clock=clock)
        seen: list[dict[str, object]] = []
        real_get, real_put = cache.get_many, cache.put_many

        async def get_many(*args: Any, **kwargs: Any) -> list[ItemResult | None]:
            seen.append(dict(structlog.contextvars.get_contextvars()))
            return await real_get(*args, **kwargs)

        async def put_many(*args: Any, **kwargs: Any) -> int:
            seen.append(dict(structlog.contextvars.get_contextvars()))
            return await real_put(*args, **kwargs)

        cache.get_many = get_many  # type: ignore[method-assign]
        cache.put_many = put_many  # type: ignore[method-assign]

        async def a_send() -> None:
            structlog.contextvars.bind_contextvars(key="demo", batch_id=7)
            front.put(ok("B000000001", clock))
            assert await front.get(q("B000000002")) is None

        await asyncio.get_running_loop().create_task(a_send())
        await front.flush()
        assert len(seen) == 2
        assert all("key" not in bound and "batch_id" not in bound for bound in seen)
        await front.aclose()

    async def test_a_failing_store_never_fails_a_lookup(self, clock: FakeClock) -> None:
        """Reads become misses and writes are dropped, counted, when the store fails."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache)
        cache.broken = True
        assert await front.get(q("B000000001")) is None
        front.put(ok("B000000001", clock))
        await front.flush()
        assert (front.failed_reads, front.dropped_writes) == (1, 1)
        await front.aclose()
        assert await front.get(q("B000000001")) is None

    async def test_a_failed_store_is_left_alone_a_minute_with_one_warning(
        self, clock: FakeClock
    ) -> None:
        """After a failure the store is not asked for a minute (no wait on a locked file per
        batch, no warning per batch); one warning says so; then it is tried again."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache, clock=clock)
        cache.broken = True
        with capture_logs() as logs:
            assert await front.get(q("B000000001")) is None
            for i in range(5):
                assert await front.get(q(f"B00000001{i}")) is None
                front.put(ok(f"B00000001{i}", clock))
            await front.flush()
        assert cache.get_calls == [1]
        assert cache.put_calls == []
        assert (front.failed_reads, front.dropped_writes) == (6, 5)
        (warning,) = [e for e in logs if e["event"] == "cache.unavailable"]
        assert warning["retry_in_s"] == COOL_OFF_S
        assert "disk gone" in warning["message"]
        cache.broken = False
        await clock.advance(COOL_OFF_S)
        front.put(ok("B000000020", clock))
        await front.flush()
        assert (await front.get(q("B000000020"))) is not None
        await front.aclose()

    async def test_a_long_outage_warns_once_and_says_when_it_is_over(
        self, clock: FakeClock
    ) -> None:
        """A store down for an hour: one warning, the same failure after each cool-off at
        debug level (it warned once a minute: 1,440 warnings a day), and cache.restored once
        it answers again; a new failure after that warns again."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache, clock=clock)
        cache.broken = True
        with capture_logs() as logs:
            for _ in range(60):
                assert await front.get(q("B000000001")) is None
                await clock.advance(COOL_OFF_S)
            cache.broken = False
            await front.get(q("B000000001"))
            cache.broken = True
            await clock.advance(COOL_OFF_S)
            await front.get(q("B000000001"))
        told = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("cache.")]
        assert told.count(("cache.unavailable", "warning")) == 2
        assert told.count(("cache.unavailable", "debug")) == 59
        assert told.count(("cache.restored", "info")) == 1
        await front.aclose()

    async def test_a_store_whose_writes_alone_fail_warns_once(self, clock: FakeClock) -> None:
        """A full disk (reads work, writes fail) for an hour: one warning, and no
        cache.restored after each read that works (it flapped warning and restored every
        minute)."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache, clock=clock)
        cache.full = True
        with capture_logs() as logs:
            for i in range(60):
                front.put(ok(f"B0000001{i:02d}", clock))
                await front.flush()
                await clock.advance(COOL_OFF_S)
                await front.get(q("B000000001"))
        told = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("cache.")]
        assert told.count(("cache.unavailable", "warning")) == 1
        assert ("cache.restored", "info") not in told
        await front.aclose()

    async def test_reads_a_failing_store_could_not_answer_are_misses(
        self, clock: FakeClock
    ) -> None:
        """Lookups answered as misses because the store failed count among the misses of
        cache_stats() and /metrics ("absent, too old, unreadable"); they counted nowhere."""
        cache = _CountingCache(CachePolicy(3_600), clock)
        front = CacheFront(cache, clock=clock)
        cache.broken = True
        for i in range(5):
            assert await front.get(q(f"B00000001{i}")) is None
        # Read ahead (get_items) while the store fails: each lookup one miss, not two.
        ahead = [q(f"B00000002{i}") for i in range(3)]
        await clock.advance(COOL_OFF_S)
        await front.prefetch(ahead)
        for query in ahead:
            assert await front.get(query) is None
        front.discard(ahead)
        cache.broken = False
        await clock.advance(COOL_OFF_S)  # the store is not asked for stats while left alone
        stats = await front.stats()
        assert (stats.hits, stats.misses) == (0, 8)
        await front.aclose()

    @pytest.mark.parametrize(
        ("code", "message", "remedy"),
        [
            (sqlite3.SQLITE_FULL, "database or disk is full", "deleting it with its -wal"),
            (sqlite3.SQLITE_READONLY, "attempt to write a readonly database", "read-only"),
        ],
    )
    def test_a_full_or_read_only_disk_is_named_so(
        self, tmp_path: Path, clock: FakeClock, code: int, message: str, remedy: str
    ) -> None:
        """A full disk or a read-only file system gets its own remedy, not "wait for the
        process holding it locked" (it does not help); a full disk is told that deleting
        the file frees its space. What `broker cache` prints says nothing of lookups."""
        cache = SqliteCache(tmp_path / "item-cache.sqlite3", CachePolicy(3_600), clock=clock)
        error = sqlite3.OperationalError(message)
        error.sqlite_errorcode = code  # as SQLite sets it
        described = cache.describe_failure(error)
        assert remedy in described
        assert "locked" not in described
        assert "lookups" not in described

    def test_a_read_only_shm_beside_a_writable_file_is_named(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A -shm left read-only (made while the file was) is named, with its remedy: the
        advice named only the file and its directory, both writable, so the cache stayed
        read-only after the user did as told."""
        path = tmp_path / "item-cache.sqlite3"
        path.write_bytes(b"")
        shm = tmp_path / "item-cache.sqlite3-shm"
        shm.write_bytes(b"")
        access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: access(p, mode) and not (p == shm and mode == os.W_OK)
        )
        cache = SqliteCache(path, CachePolicy(3_600), clock=clock)
        error = sqlite3.OperationalError("attempt to write a readonly database")
        error.sqlite_errorcode = sqlite3.SQLITE_READONLY
        described = cache.describe_failure(error)
        assert f"{shm} beside it is read-only" in described
        assert "make it writable" in described

    async def test_a_directory_as_the_path_is_named_so(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """[cache] path naming a directory: the warning says so and to name a file in it;
        it said "if it is damaged, delete it" of the directory."""
        folder = tmp_path / "sub"
        folder.mkdir()
        front = CacheFront(SqliteCache(folder, CachePolicy(3_600), clock=clock), clock=clock)
        with capture_logs() as logs:
            assert await front.get(q("B000000001")) is None
        (warning,) = [e for e in logs if e["event"] == "cache.unavailable"]
        assert "it is a directory: set [cache] path to a file in it" in warning["message"]
        assert "delete" not in warning["message"]
        assert warning["message"].endswith("; lookups go on without it meanwhile")
        await front.aclose()

    async def test_a_file_where_its_directory_should_be_is_named_so(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """[cache] path under a regular file (regf/c.sqlite3): the warning names the file in
        the way, as the key state's does; it said "if it is damaged, delete it"."""
        (tmp_path / "regf").write_text("x")
        path = tmp_path / "regf" / "sub" / "c.sqlite3"
        front = CacheFront(SqliteCache(path, CachePolicy(3_600), clock=clock), clock=clock)
        with capture_logs() as logs:
            assert await front.get(q("B000000001")) is None
        (warning,) = [e for e in logs if e["event"] == "cache.unavailable"]
        assert f"{tmp_path / 'regf'} is a file, not a directory" in warning["message"]
        assert "delete" not in warning["message"]
        await front.aclose()

    def test_a_directory_that_cannot_be_made_or_entered_is_named_so(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """Permission denied making or entering the cache's directory (another user's
        /srv/cachez) says so and to set the path elsewhere, not "locked or damaged"."""
        cache = SqliteCache(tmp_path / "srv" / "c.sqlite3", CachePolicy(3_600), clock=clock)
        error = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "srv"))
        described = cache.describe_failure(error)
        assert "cannot create or enter its directory" in described
        assert "delete" not in described

    def test_a_file_that_cannot_be_opened_in_a_read_only_place_is_named_so(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SQLite's CANTOPEN where the directory may not be written (a read-only directory
        or mount: the -wal and -shm cannot be made) gets the read-only remedy, not "locked
        or damaged, delete it"; elsewhere CANTOPEN keeps the general advice."""
        cache = SqliteCache(tmp_path / "item-cache.sqlite3", CachePolicy(3_600), clock=clock)
        error = sqlite3.OperationalError("unable to open database file")
        error.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN  # as SQLite sets it
        assert "locked" in cache.describe_failure(error)
        monkeypatch.setattr(os, "access", lambda path, mode: False)
        described = cache.describe_failure(error)
        assert "read-only: make it writable, or set [cache] path" in described
        assert "delete" not in described

    async def test_a_worker_thread_that_cannot_start_is_a_cache_failure(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A cache whose worker thread cannot start (a thread limit) fails the call, for
        the front to warn and pause the cache, instead of running SQLite on the event loop
        (a fallback meant only for an exiting interpreter)."""
        import threading

        cache = SqliteCache(tmp_path / "c.sqlite3", CachePolicy(3_600), clock=clock)
        start = threading.Thread.start

        def refuse(thread: threading.Thread) -> None:
            monkeypatch.setattr(threading.Thread, "start", start)
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            await cache.stats()
        await cache.aclose()

    def test_a_path_longer_than_sqlite_opens_is_named_so(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """SQLite's CANTOPEN on a full path over its 504 bytes names that limit, not
        "locked or damaged, delete it"."""
        folder = tmp_path
        while len(os.fsencode(folder)) < 520:
            folder = folder / ("e" * 50)
        cache = SqliteCache(folder / "item-cache.sqlite3", CachePolicy(3_600), clock=clock)
        error = sqlite3.OperationalError("unable to open database file")
        error.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN  # as SQLite sets it
        described = cache.describe_failure(error)
        assert "at most 504 bytes of full path" in described
        assert "set [cache] path to a shorter one" in described
        assert "delete" not in described
        # A folder name over 255 bytes (a cache given in code): advice, not an exception.
        long_name = tmp_path / ("k" * 300) / "item-cache.sqlite3"
        cache = SqliteCache(long_name, CachePolicy(3_600), clock=clock)
        error = OSError(errno.ENAMETOOLONG, "File name too long", str(long_name))
        assert "set [cache] path to a shorter one" in cache.describe_failure(error)

    async def test_a_damaged_file_is_named_with_its_remedy(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """A SQLite cache file that is not a database: the warning names the file, says to
        check that [cache] path names the cache (a job's output named by mistake must not be
        deleted on our word), and that deleting a damaged cache with its journal is safe."""
        path = tmp_path / "item-cache.sqlite3"
        path.write_bytes(os.urandom(8192))
        front = CacheFront(SqliteCache(path, CachePolicy(3_600), clock=clock), clock=clock)
        with capture_logs() as logs:
            assert await front.get(q("B000000001")) is None
        (warning,) = [e for e in logs if e["event"] == "cache.unavailable"]
        assert str(path) in warning["message"]
        assert "check that [cache] path names the item cache" in warning["message"]
        assert "delete it with its -wal and -shm to start afresh" in warning["message"]
        await front.aclose()


def test_stats_families_for_prometheus() -> None:
    """Stats export as counters and gauges with stable names."""
    stats = CacheStats(hits=25, misses=5, requests_saved=2, entries=7, bytes=900, evictions=1)
    families = {name: (kind, value) for name, kind, _help, value in stats.families()}
    assert families == {
        "asinb_cache_hits_total": ("counter", 25),
        "asinb_cache_misses_total": ("counter", 5),
        "asinb_cache_requests_saved_total": ("counter", 2),
        "asinb_cache_evictions_total": ("counter", 1),
        "asinb_cache_entries": ("gauge", 7),
        "asinb_cache_bytes": ("gauge", 900),
    }


class _CancelLosingCache(MemoryCache):
    """A cache (a Redis, as redis-py reaches it on Python 3.11) whose read, cancelled as it
    completes, returns all the same: 3.11's asyncio.wait_for, which redis-py sends each
    command under, loses a cancel that lands as the send completes."""

    async def get_many(self, *args: Any, **kwargs: Any) -> list[ItemResult | None]:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return await super().get_many(*args, **kwargs)


async def test_a_caller_cancelled_while_the_cache_loses_the_cancel_is_cancelled(
    clock: FakeClock,
) -> None:
    """A caller (get_items under the user's timeout) cancelled while its answers are read
    ahead from a Redis that loses the cancel ends cancelled: it went on as if none came,
    and the timeout never fired."""
    front = CacheFront(_CancelLosingCache(CachePolicy(3_600), clock=clock))
    reading = asyncio.create_task(front.prefetch([q("B000000001")]))
    await settle()
    reading.cancel()
    await settle()
    assert reading.cancelled()


async def test_prefetched_answer_is_checked_again(clock: FakeClock) -> None:
    """An answer read ahead and taken after it aged past max_age_s is a miss, not served,
    and counted as one (it counted as a hit: cache_stats and /metrics said requests saved)."""
    cache = MemoryCache(CachePolicy(3_600), clock=clock)
    front = CacheFront(cache)
    await cache.put_many([ok("B000000001", clock), ok("B000000002", clock)])
    await clock.advance(3_000)
    await front.prefetch([q("B000000001"), q("B000000002"), q("B000000003")])
    hit = await front.get(Query("B000000001", US, TITLE, tag="row 1"))
    assert hit is not None
    assert hit.query is not None
    assert hit.query.tag == "row 1"
    await clock.advance(700)
    assert await front.get(q("B000000002")) is None
    assert await front.get(Query("B000000002", US, TITLE, tag="row 2")) is None
    # Counted as what it was: one hit served, two misses (the aged answer is no hit, and
    # no request was saved by it), however many rows asked it.
    stats = await front.stats()
    assert (stats.hits, stats.misses) == (1, 2)
    front.discard([q("B000000001"), q("B000000002"), q("B000000003")])
    assert not front._ahead
    await front.aclose()


@pytest.mark.parametrize(
    ("protocol", "endpoint", "expected"),
    [
        (Protocol.CREATORS, "simulator", "creators.simulator."),
        (Protocol.PAAPI5, "simulator", "paapi5.simulator."),
        (Protocol.CREATORS, "amazon", "creators.amazon."),
        (Protocol.PAAPI5, "amazon", "paapi5.amazon."),
    ],
)
def test_namespace_names_protocol_and_endpoint(
    protocol: Protocol, endpoint: str, expected: str
) -> None:
    """The simulator and Amazon are one source each, whatever port or host serves them."""
    from broker.cache import cache_namespace

    assert cache_namespace(BrokerConfig(api=ApiConfig(protocol, endpoint))).startswith(expected)


def _tagged(*tags: dict[str, str], simulator: dict[str, object] | None = None) -> BrokerConfig:
    keys = tuple(
        KeyConfig(f"k{n}", "id", Secret("secret"), partner_tags=t) for n, t in enumerate(tags)
    )
    return BrokerConfig(keys=keys, simulator=SimulatorTable(simulator))


def test_namespace_follows_the_partner_tags() -> None:
    """Answers asked with another partner tag (its links carry it) are another namespace."""
    from broker.cache import cache_namespace

    us, uk = "www.amazon.com", "www.amazon.co.uk"
    first = cache_namespace(_tagged({us: "teama-20"}))
    assert cache_namespace(_tagged({us: "teamb-20"})) != first
    assert cache_namespace(_tagged({us: "teama-20"})) == first
    both = cache_namespace(_tagged({us: "teama-20"}, {uk: "teama-21"}))
    assert cache_namespace(_tagged({uk: "teama-21"}, {us: "teama-20"})) == both != first


def test_namespace_of_the_embedded_simulator_follows_its_seed() -> None:
    """Another simulator seed is another catalogue; the simulator's accounts are left out."""
    from broker.cache import cache_namespace

    us = {"www.amazon.com": "demo-20"}
    seed7 = cache_namespace(_tagged(us, simulator={"seed": 7}))
    assert cache_namespace(_tagged(us, simulator={"seed": 42})) != seed7
    accounts = {"seed": 7, "accounts": [{"name": "x", "secret": "s"}]}
    assert cache_namespace(_tagged(us, simulator=accounts)) == seed7


def test_namespace_of_a_url_endpoint_is_its_own() -> None:
    """Two endpoint URLs get two namespaces, short and free of the URL's ':' and '/'."""
    from broker.cache import cache_namespace

    urls = ("http://127.0.0.1:8787", "http://127.0.0.1:8788")
    names = {cache_namespace(BrokerConfig(api=ApiConfig(endpoint=url))) for url in urls}
    assert len(names) == 2
    assert all(n.startswith("creators.url-") and ":" not in n and "/" not in n for n in names)


class TestMemoryHomeAtScale:
    """The memory home stays cheap when full: what a long-lived library broker keeps."""

    async def test_a_store_does_not_scan_every_entry(self, clock: FakeClock) -> None:
        """Stores within a minute of the last full sweep look only at the front of the
        cache (the oldest answers): a scan of every entry at each store, 16 ms at 100,000,
        cut the broker's rate to a quarter once the cache filled. A not_found still drops
        every resource set of its item, through the item's index."""
        cache = MemoryCache(CachePolicy(max_age_s=3_600), clock=clock)
        await cache.put_many([ok(f"B{i:09d}", clock) for i in range(500)])
        scans = 0

        class Counting(dict):  # type: ignore[type-arg]
            def items(self):  # type: ignore[no-untyped-def]
                nonlocal scans
                scans += 1
                return super().items()

            def __iter__(self):  # type: ignore[no-untyped-def]
                nonlocal scans
                scans += 1
                return super().__iter__()

        cache._entries = Counting(cache._entries)
        await clock.advance(1.0)
        await cache.put_many([ok("B100000000", clock), ok("B100000001", clock, OFFERS)])
        assert scans == 0
        gone = dataclasses.replace(ok("B100000001", clock), status=Status.NOT_FOUND, item=None)
        await cache.put_many([gone])
        assert scans == 0
        offers, title = await cache.get_many([q("B100000001", OFFERS), q("B100000000")])
        assert offers is None
        assert title is not None

    def test_a_payload_holds_no_more_memory_than_its_bytes(self) -> None:
        """An entry's payload holds about its own size: orjson's bytes kept an 8 KB buffer
        for 850 B of JSON, so 100,000 cached answers took 500 MB while max_bytes counted 86."""
        import tracemalloc

        from broker.cache.entry import encode
        from broker.cache.policy import CacheKey

        clock = FakeClock()
        answers = [ok(f"B{i:09d}", clock) for i in range(200)]
        keys = [CacheKey(US, a.asin, TITLE) for a in answers]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            entries = [encode(key, answer) for key, answer in zip(keys, answers, strict=True)]
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        payload = sum(entry.size for entry in entries)
        assert held < 3 * payload
