"""The item cache across processes: shared SQLite, a real Redis, a writer killed mid-write."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import sqlite_db
from redis.asyncio import Redis
from redis.exceptions import RedisError
from structlog.testing import capture_logs

from broker.cache import CacheKey, CachePolicy, SqliteCache
from broker.cache.entry import Entry, decode
from broker.cache.front import CacheFront
from broker.cache.redis_store import RedisCache
from broker.models import ItemResult, Query, Status
from broker.sqlitewal import journal_files
from broker.state.redis_server import RedisServer, free_port, redis_server_binary
from broker.state.sqlite import SqliteStateStore
from broker.testing import FakeClock

US = "www.amazon.com"
TITLE = ("itemInfo.title",)

# The other process: puts ok answers, counts hits, or writes big batches until killed.
CHILD = r"""
import asyncio, sys
from datetime import UTC, datetime
from broker.cache import CachePolicy, SqliteCache
from broker.cache.redis_store import RedisCache
from broker.models import ItemResult, Query, Status
from broker.sqlitewal import journal_files
from broker.state.sqlite import SqliteStateStore
from broker.testing import FakeClock

backend, where, mode, arg = sys.argv[1:5]
policy = CachePolicy(max_age_s=3600, max_items=1_000_000, max_bytes=0)

def answer(asin, blob=""):
    query = Query(asin, "www.amazon.com", ("itemInfo.title",))
    item = {"ASIN": asin, "blob": blob}
    return ItemResult(asin, "www.amazon.com", Status.OK, item=item,
                      fetched_at=datetime.now(UTC), query=query)

async def main():
    if backend == "sqlite":
        cache = SqliteCache(where, policy)
    else:
        cache = RedisCache.from_url(where, policy, key_prefix="t:")
    async with cache:
        if mode == "put":
            print("stored", await cache.put_many([answer(a) for a in arg.split(",")]), flush=True)
        elif mode == "get":
            queries = [Query(a, "www.amazon.com", ("itemInfo.title",)) for a in arg.split(",")]
            got = await cache.get_many(queries)
            print("hits", sum(r is not None and r.item["ASIN"] == q.asin
                              for r, q in zip(got, queries)), flush=True)
        else:
            batch = 0
            while True:
                asins = [f"{arg}X{batch:04d}{i:03d}" for i in range(200)]
                await cache.put_many([answer(a, a * 2000) for a in asins])
                print("committed", batch, flush=True)
                batch += 1

asyncio.run(main())
"""


def child(*args: str, timeout: float = 60) -> str:
    """Run the child script to the end; return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return done.stdout


def answer(asin: str) -> ItemResult:
    """An ok answer fetched now (wall time: the other process reads real time too)."""
    return ItemResult(
        asin,
        US,
        Status.OK,
        item={"ASIN": asin, "blob": ""},
        fetched_at=datetime.now(UTC),
        query=Query(asin, US, TITLE),
    )


def queries(asins: list[str]) -> list[Query]:
    """Complete queries for ``asins``."""
    return [Query(a, US, TITLE) for a in asins]


ASINS_A = [f"B0000000{i:02d}" for i in range(30)]
ASINS_B = [f"B0000001{i:02d}" for i in range(30)]


class TestSqliteShared:
    async def test_two_processes_reuse_each_others_answers(self, tmp_path: Path) -> None:
        """What one process stores, another serves, both ways, through one SQLite file."""
        path = tmp_path / "state" / "cache.sqlite3"
        assert "stored 30" in child("sqlite", str(path), "put", ",".join(ASINS_A))
        async with SqliteCache(path, CachePolicy(3_600)) as cache:
            got = await cache.get_many(queries(ASINS_A + ASINS_B))
            assert [r is not None and r.cached for r in got] == [True] * 30 + [False] * 30
            await cache.put_many([answer(a) for a in ASINS_B])
        assert "hits 60" in child("sqlite", str(path), "get", ",".join(ASINS_A + ASINS_B))

    def test_writer_killed_mid_write_never_leaves_a_torn_entry(self, tmp_path: Path) -> None:
        """SIGKILL during 4 MB transactions: every batch is whole or absent, every entry reads."""
        path = tmp_path / "cache.sqlite3"
        rng = random.Random(13)
        for run in range(4):
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, "sqlite", str(path), "hammer", f"C{run}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert proc.stdout is not None
                for _ in range(2):
                    assert proc.stdout.readline().startswith("committed")
                # Somewhere inside the next transactions (each takes tens of milliseconds).
                time.sleep(rng.uniform(0.0, 0.15))
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait(timeout=30)
                if proc.stdout is not None:
                    proc.stdout.close()
        with sqlite_db(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            rows = db.execute(
                "SELECT marketplace, asin, resources, fetched_at, checksum, payload FROM item_cache"
            ).fetchall()
            totals = db.execute("SELECT entries, bytes FROM item_cache_totals").fetchone()
        assert len(rows) >= 4 * 2 * 200
        assert (len(rows), sum(len(r[5]) for r in rows)) == totals
        per_batch: dict[str, int] = {}
        for marketplace, asin, resources, fetched_at, digest, payload in rows:
            key = CacheKey(marketplace, asin, tuple(resources.split(",")))
            result = decode(Entry(key, fetched_at, payload, digest), None)
            assert result.item is not None
            assert asin * 2000 == result.item["blob"]
            per_batch[asin[:7]] = per_batch.get(asin[:7], 0) + 1
        assert {200} == set(per_batch.values())


class TestSqliteFileDeleted:
    """The cache file deleted while caches use it (the advice for a damaged one)."""

    async def test_a_deleted_file_is_followed(self, tmp_path: Path) -> None:
        """Deleted with its -wal and -shm, then made again by another process: a running
        cache writes to the new file within a second, where every other process reads; it
        wrote to the unlinked file until it restarted, and nobody else saw its answers."""
        # Wall time as the other process reads it; fake only for the once-a-second look.
        clock = FakeClock(epoch=datetime.now(UTC))
        path = tmp_path / "cache.sqlite3"
        running = SqliteCache(path, CachePolicy(3_600), clock=clock)
        await running.put_many([answer(a) for a in ASINS_A[:2]])
        for gone in (path, *journal_files(path)):
            gone.unlink()
        assert "stored 1" in child("sqlite", str(path), "put", ASINS_B[0])
        await clock.advance(1.0)
        with capture_logs() as logs:
            assert await running.put_many([answer(a) for a in ASINS_A[2:5]]) == 3
        assert "hits 3" in child("sqlite", str(path), "get", ",".join(ASINS_A[2:5]))
        assert [e["event"] for e in logs].count("cache.file_replaced") == 1
        await running.aclose()

    async def test_a_file_deleted_with_its_journal_is_made_again(self, tmp_path: Path) -> None:
        """Deleted with its -wal and -shm while one cache alone uses it: that cache makes
        the file again within a second, where later processes find its answers."""
        clock = FakeClock(epoch=datetime.now(UTC))
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(3_600), clock=clock) as running:
            await running.put_many([answer(ASINS_A[0])])
            for gone in (path, *journal_files(path)):
                gone.unlink()
            await clock.advance(1.0)
            assert await running.put_many([answer(ASINS_A[1])]) == 1
            assert path.exists()
        assert "hits 1" in child("sqlite", str(path), "get", ASINS_A[1])

    async def test_a_file_deleted_alone_is_not_made_again(self, tmp_path: Path) -> None:
        """Only the file deleted, its -wal and -shm left (still the running cache's): a new
        cache refuses (an OSError naming them) and makes no file beside them, which SQLite
        would read with the old journal; the running cache goes on."""
        path = tmp_path / "cache.sqlite3"
        async with SqliteCache(path, CachePolicy(3_600)) as running:
            await running.put_many([answer(ASINS_A[0])])
            path.unlink()
            async with SqliteCache(path, CachePolicy(3_600)) as late:
                with pytest.raises(OSError, match="-wal") as info:
                    await late.get_many(queries(ASINS_A[:1]))
                # Its own advice only: not the damaged file's "delete it", for a file gone.
                assert "if it is damaged" not in late.describe_failure(info.value)
            assert not path.exists()
            assert await running.put_many([answer(ASINS_A[1])]) == 1


async def test_another_programs_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    """[cache] path naming another program's SQLite database: an I/O error saying so (the
    cache is then off, with one warning), and the file keeps its tables and journal mode;
    even `broker cache stats` added the cache's tables and triggers and switched it to WAL."""
    path = tmp_path / "orders.db"
    with sqlite_db(path) as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
    async with SqliteCache(path, CachePolicy(3_600)) as cache:
        with pytest.raises(OSError, match="another program's") as info:
            await cache.get_many(queries(ASINS_A[:1]))
    assert "[cache] path" in str(info.value)
    with sqlite_db(path) as db:
        assert [name for (name,) in db.execute("SELECT name FROM sqlite_schema")] == ["orders"]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)


async def test_one_file_may_hold_the_cache_and_the_key_state(tmp_path: Path) -> None:
    """[cache] path and [state] path naming one file: each store finds the other's table
    there and works beside it (the first review of the foreign-file check refused it)."""
    path = tmp_path / "broker.sqlite3"
    SqliteStateStore(path)._conn.close()
    async with SqliteCache(path, CachePolicy(3_600)) as cache:
        await cache.put_many([answer(ASINS_A[0])])
        assert [r is not None for r in await cache.get_many(queries(ASINS_A[:1]))] == [True]
    SqliteStateStore(path)._conn.close()


@pytest.fixture(name="redis_url")
def _redis_url() -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server.url


class TestRealRedis:
    async def test_two_processes_reuse_each_others_answers(self, redis_url: str) -> None:
        """What one process stores in Redis, another serves, both ways."""
        assert "stored 30" in child("redis", redis_url, "put", ",".join(ASINS_A))
        async with RedisCache.from_url(redis_url, CachePolicy(3_600), key_prefix="t:") as cache:
            got = await cache.get_many(queries(ASINS_A + ASINS_B))
            assert [r is not None and r.cached for r in got] == [True] * 30 + [False] * 30
            await cache.put_many([answer(a) for a in ASINS_B])
        assert "hits 60" in child("redis", redis_url, "get", ",".join(ASINS_A + ASINS_B))

    async def test_entries_carry_ttl_to_the_ceiling(self, redis_url: str) -> None:
        """Each entry expires 86,400 s after Amazon sent it, the namespace's index and sizes
        with the last; the prefix keeps brokers apart."""
        client = Redis.from_url(redis_url)
        try:
            async with RedisCache(client, CachePolicy(3_600), key_prefix="p1:") as cache:
                await cache.put_many([answer("B000000001")])
            names = [name async for name in client.scan_iter("p1:creators:item:*")]
            assert names == [b"p1:creators:item:www.amazon.com|B000000001|iteminfo.title"]
            ttl = await client.ttl(names[0])
            assert 86_390 <= ttl <= 86_400
            # The namespace's index and sizes go with their last entry: a namespace no
            # longer used (a partner tag changed) left them forever.
            for name in ("index", "sizes", "names"):
                record = f"p1:creators:{name}".encode()
                assert 86_390 <= await client.ttl(record) <= 86_400, record
            # The bytes figure lives an hour, then is summed again (see below).
            assert 0 < await client.ttl(b"p1:creators:bytes") <= 3_600
            async with RedisCache(client, CachePolicy(3_600), key_prefix="p2:") as other:
                assert await other.get_many(queries(["B000000001"])) == [None]
        finally:
            await client.aclose()

    async def test_an_item_gone_deletes_every_resource_set(self, redis_url: str) -> None:
        """A not_found deletes the item's answers of every resource set on a real server
        (found by the index's members), and no other item's."""
        features = ("itemInfo.features",)
        kept = answer("B000000002")
        async with RedisCache.from_url(redis_url, CachePolicy(3_600), key_prefix="g:") as cache:
            other = dataclasses.replace(
                answer("B000000001"), query=Query("B000000001", US, features)
            )
            await cache.put_many([answer("B000000001"), other, kept])
            gone = dataclasses.replace(answer("B000000001"), status=Status.NOT_FOUND, item=None)
            await cache.put_many([gone])
            got = await cache.get_many(
                [Query("B000000001", US, TITLE), Query("B000000001", US, features)]
            )
            assert got == [None, None]
            assert (await cache.get_many(queries(["B000000002"])))[0] is not None
            assert (await cache.stats()).entries == 1

    async def test_eviction_and_purge(self, redis_url: str) -> None:
        """A small max_items evicts the oldest; purge by ASIN and all work on a real server."""
        async with RedisCache.from_url(redis_url, CachePolicy(3_600, max_items=5)) as cache:
            for asin in ASINS_A[:8]:
                await cache.put_many([answer(asin)])
            got = await cache.get_many(queries(ASINS_A[:8]))
            assert [r is not None for r in got] == [False] * 3 + [True] * 5
            stats = await cache.stats()
            assert (stats.entries, stats.evictions) == (5, 3)
            assert stats.bytes > 0
            assert await cache.purge(asins=[ASINS_A[7]]) == 1
            assert await cache.purge() == 4
            assert (await cache.stats()).entries == 0

    async def test_the_bytes_figure_is_kept_not_summed_per_stats(self, redis_url: str) -> None:
        """The bytes figure follows every write, rewrite, eviction and purge, and a stats
        call reads it instead of summing a million sizes (HVALS per /metrics scrape timed
        out past a few hundred thousand entries and turned the cache off for a minute); a
        namespace an older broker wrote, with no sum kept, is summed once."""
        client = Redis.from_url(redis_url)

        async def summed() -> int:
            return sum(int(size) for size in await client.hvals("s:creators:sizes"))

        try:
            policy = CachePolicy(3_600, max_items=20)
            async with RedisCache(client, policy, key_prefix="s:") as cache:
                await cache.put_many([answer(a) for a in ASINS_A[:25]])  # 5 evicted
                assert (await cache.stats()).bytes == await summed() > 0
                bigger = [
                    dataclasses.replace(answer(a), item={"ASIN": a, "blob": "x" * 500})
                    for a in ASINS_A[20:22]
                ]
                await cache.put_many(bigger)  # rewritten, larger
                assert (await cache.stats()).bytes == await summed()
                await cache.purge(asins=ASINS_A[20:23])
                assert (await cache.stats()).bytes == await summed()
                await client.delete("s:creators:bytes")  # as an older broker left it
                assert (await cache.stats()).bytes == await summed()
                await client.set("s:creators:bytes", 12_345)
                assert (await cache.stats()).bytes == 12_345  # read, not summed again
                # Sizes changed by another writer (an older broker during a rolling
                # upgrade): the figure drifts, and is summed again once it runs out or
                # would go below zero.
                await client.set("s:creators:bytes", 5, px=50)
                await asyncio.sleep(0.1)
                assert (await cache.stats()).bytes == await summed()
                await client.set("s:creators:bytes", 5)
                await cache.purge(asins=ASINS_A[10:12])
                assert (await cache.stats()).bytes == await summed()
        finally:
            await client.aclose()

    async def test_writers_racing_keep_the_newest_answer(self, redis_url: str) -> None:
        """Two machines writing the same ASINs at once: the newer answer stays, whichever
        write lands last (the older one's write reads again and stands back)."""
        newer = [answer(a) for a in ASINS_A]
        older = [
            dataclasses.replace(r, fetched_at=r.fetched_at - timedelta(minutes=5))
            for r in newer
            if r.fetched_at is not None
        ]
        async with (
            RedisCache.from_url(redis_url, CachePolicy(3_600), key_prefix="r:") as one,
            RedisCache.from_url(redis_url, CachePolicy(3_600), key_prefix="r:") as two,
        ):
            for _ in range(5):
                await asyncio.gather(one.put_many(older), two.put_many(newer))
                await asyncio.gather(one.put_many(newer), two.put_many(older))
            got = await one.get_many(queries(ASINS_A))
        assert [r.fetched_at if r else None for r in got] == [r.fetched_at for r in newer]


def test_two_writers_at_once_lose_nothing(tmp_path: Path) -> None:
    """Two processes writing the same file at the same time both land every answer."""
    path = tmp_path / "cache.sqlite3"
    groups = [[f"W{w}{i:08d}" for i in range(1_500)] for w in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, "sqlite", str(path), "put", ",".join(group)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for group in groups
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert all("stored 1500" in out for out in outputs)
    with sqlite_db(path) as db:
        assert db.execute(
            "SELECT count(*), (SELECT entries FROM item_cache_totals) FROM item_cache"
        ).fetchone() == (3_000, 3_000)


class TestRedisFaults:
    """A Redis that restarts, refuses writes or holds something else under the cache's keys."""

    @pytest.fixture(name="server")
    def _server(self) -> Iterator[RedisServer]:
        if redis_server_binary() is None:
            pytest.skip("redis-server is not installed")
        with RedisServer() as server:
            yield server

    async def test_the_documented_acl_rights_are_enough_and_a_missing_one_is_named(
        self, server: RedisServer
    ) -> None:
        """A user granted CACHE_REDIS_PERMISSIONS (what the README names) writes, reads,
        counts and purges; one without +@transaction (WATCH/MULTI) is told that right, as
        the config's to mend. The README named only +@scripting beside read and write: every
        write failed, and the warning blamed the password."""
        from broker.cache.redis_store import CACHE_REDIS_PERMISSIONS

        admin = Redis.from_url(server.url)
        granted = CACHE_REDIS_PERMISSIONS.split()
        users = {"full": granted, "notx": [p for p in granted if p != "+@transaction"]}
        try:
            for name, rights in users.items():
                await admin.execute_command("ACL", "SETUSER", name, "on", ">pw", "~*", *rights)
            full_url = server.url.replace("redis://", "redis://full:pw@", 1)
            async with RedisCache.from_url(full_url, CachePolicy(3_600), key_prefix="acl:") as c:
                assert await c.put_many([answer(a) for a in ASINS_A[:3]]) == 3
                assert all(r is not None for r in await c.get_many(queries(ASINS_A[:3])))
                assert (await c.stats()).entries == 3
                assert await c.purge(asins=ASINS_A[:1]) == 1
                assert await c.purge() == 2
            notx_url = server.url.replace("redis://", "redis://notx:pw@", 1)
            async with RedisCache.from_url(notx_url, CachePolicy(3_600), key_prefix="acl:") as c:
                with pytest.raises(RedisError) as caught:
                    await c.put_many([answer(ASINS_A[0])])
                assert c.wrong_config(caught.value)
                told = c.describe_failure(caught.value)
                assert "lacks a permission" in told
                assert "+@transaction" in told
                assert "password" not in told
            # Another database than /0: redis-py sends SELECT, which the rights must allow.
            other_db = full_url.rsplit("/", 1)[0] + "/2"
            async with RedisCache.from_url(other_db, CachePolicy(3_600), key_prefix="acl:") as c:
                with pytest.raises(RedisError) as caught:
                    await c.put_many([answer(ASINS_A[0])])
                assert "+select" in c.describe_failure(caught.value)
            await admin.execute_command("ACL", "SETUSER", "full", "+select")
            async with RedisCache.from_url(other_db, CachePolicy(3_600), key_prefix="acl:") as c:
                assert await c.put_many([answer(ASINS_A[0])]) == 1
        finally:
            for name in users:
                await admin.execute_command("ACL", "DELUSER", name)
            await admin.aclose()

    async def test_a_restarted_redis_is_used_at_once(self, server: RedisServer) -> None:
        """Redis restarted between two reads: the second is answered on a fresh connection.
        It failed on the pooled connection that died with the old server, and the cache was
        left alone for a minute (writes dropped, ``asinb_cache_up 0``) with Redis up."""
        cache = RedisCache.from_url(server.url, CachePolicy(3_600))
        front = CacheFront(cache)
        try:
            assert await front.get(queries(ASINS_A[:1])[0]) is None
            await asyncio.to_thread(server.restart)
            with capture_logs() as logs:
                assert await front.get(queries(ASINS_A[:1])[0]) is None
            assert front.failed_reads == 0
            assert [e["event"] for e in logs] == []
        finally:
            await front.aclose()

    async def test_an_outage_seen_by_stats_alone_ends_and_the_next_is_warned_of(
        self, server: RedisServer
    ) -> None:
        """An idle daemon's scrapes alone touch the cache: Redis down, back, down again
        makes a warning, ``cache.restored``, and a warning again. The second outage was told
        at debug level only, as the first had never been seen to end."""
        clock = FakeClock(epoch=datetime.now(UTC))
        front = CacheFront(RedisCache.from_url(server.url, CachePolicy(3_600)), clock=clock)
        try:
            with capture_logs() as logs:
                await front.stats()
                for _ in range(2):
                    await asyncio.to_thread(server.stop)
                    with pytest.raises(RedisError):
                        await front.stats()
                    await asyncio.to_thread(server.start)
                    await clock.advance(61.0)
                    await front.stats()
            said = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("cache.")]
            assert (
                said
                == [
                    ("cache.unavailable", "warning"),
                    ("cache.restored", "info"),
                ]
                * 2
            )
        finally:
            await front.aclose()

    @pytest.mark.parametrize("refusal", ["replica", "out of memory"])
    async def test_a_redis_that_takes_no_writes_is_named_so(
        self, server: RedisServer, refusal: str
    ) -> None:
        """A read-only replica, or a Redis out of memory under ``noeviction``, is up: the
        advice names what refuses the writes (it said to check that Redis is up)."""
        client = Redis.from_url(server.url)
        try:
            if refusal == "replica":
                await client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            else:
                await client.config_set("maxmemory-policy", "noeviction")
                await client.config_set("maxmemory", "1")
            async with RedisCache.from_url(server.url, CachePolicy(3_600)) as cache:
                with pytest.raises(RedisError) as info:
                    await cache.put_many([answer(ASINS_A[0])])
                said = cache.describe_failure(info.value)
            assert "check that Redis is up" not in said
            assert "takes no writes" in said
            assert ("primary" in said) == (refusal == "replica")
            assert ("maxmemory" in said) == (refusal == "out of memory")
        finally:
            with contextlib.suppress(RedisError):
                await client.execute_command("REPLICAOF", "NO", "ONE")
                await client.config_set("maxmemory", "0")
            await client.aclose()

    async def test_a_database_the_server_lacks_is_the_config_s_to_mend(
        self, server: RedisServer
    ) -> None:
        """A URL naming a database the server does not have (/99 of 16) is a config error
        naming the path (exit 78 for ``broker cache``), not "check that Redis is up", 74."""
        url = server.url.rsplit("/", 1)[0] + "/99"
        async with RedisCache.from_url(url, CachePolicy(3_600)) as cache:
            with pytest.raises(RedisError) as info:
                await cache.put_many([answer(ASINS_A[0])])
            assert cache.wrong_config(info.value)
            said = cache.describe_failure(info.value)
        assert "no such database" in said
        assert "check that Redis is up" not in said

    def test_a_redis_cluster_is_the_config_s_to_mend(self) -> None:
        """A Redis Cluster node's replies (keys in several slots, slots not served, a key
        redirected) are a config error naming the cluster: the cache's multi-key calls can
        never be served there (it said "check that Redis is up", exit 74)."""
        from redis.exceptions import ClusterCrossSlotError, ClusterDownError, MovedError

        cache = RedisCache.from_url("redis://127.0.0.1:1/0", CachePolicy(3_600))
        for error in (
            ClusterCrossSlotError("Keys in request don't hash to the same slot"),
            ClusterDownError("Hash slot not served"),
            MovedError("10661 127.0.0.1:37053"),
        ):
            assert cache.wrong_config(error)
            assert "Redis Cluster node" in cache.describe_failure(error)

    async def test_other_data_under_the_cache_s_keys(self, server: RedisServer) -> None:
        """Something else written under the cache's bookkeeping keys: a size that is no
        number counts as none in stats, an index member that is no key is skipped by a purge
        by ASIN, one that is no UTF-8 is dropped when it expires (a ValueError, an
        IndexError and a UnicodeDecodeError before: tracebacks of ``broker cache``), and a
        key of another type is named with what to do (it said to check Redis is up)."""
        client = Redis.from_url(server.url)
        try:
            async with RedisCache.from_url(
                server.url, CachePolicy(3_600), key_prefix="x:"
            ) as cache:
                await cache.put_many([answer(a) for a in ASINS_A[:2]])
                await client.hset("x:creators:sizes", "junk", "many")
                await client.zadd("x:creators:index", {"no-bars": time.time()})
                await client.zadd("x:creators:index", {b"\xff\xfe old": time.time() - 2 * 86_400})
                stats = await cache.stats()
                assert stats.entries == 3
                assert stats.bytes > 0
                assert await cache.purge(asins=[ASINS_A[0]]) == 1
                await client.delete("x:creators:index")
                await client.set("x:creators:index", "a string")
                with pytest.raises(RedisError) as info:
                    await cache.put_many([answer(ASINS_A[3])])
                said = cache.describe_failure(info.value)
            assert "check that Redis is up" not in said
            assert "x:" in said
            assert "key_prefix" in said
        finally:
            await client.aclose()
