"""The item cache in Redis, shared by several machines; entries expire on Amazon's 24-hour rule.

Layout under ``key_prefix`` + namespace (``asinb:cache:creators.amazon:``):

- ``item:<marketplace>|<ASIN>|<resources>``: one string per answer, ``fetched_at`` (8-byte
  double) + 16-byte checksum + payload, with a TTL that ends 86,400 s after ``fetched_at``;
- ``index``: a sorted set of those names scored by ``fetched_at``, to evict the oldest;
- ``sizes``: a hash of payload sizes, and ``bytes``: their sum, kept as they change and
  summed again when missing and hourly, so the bytes figure costs no scan of a million
  sizes per ``/metrics`` (an ACL user needs :data:`CACHE_REDIS_PERMISSIONS`).

A SET is atomic, so no reader sees half an entry; the checksum is checked on read anyway.
A write is one WATCH/MULTI transaction that leaves alone any entry holding a newer answer,
so a machine that writes late never replaces another's fresher answer with its older one.
The bound is ``max_items`` (``max_bytes`` is left to Redis's own ``maxmemory``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, cast

from redis.asyncio import Redis
from redis.exceptions import (
    AuthenticationWrongNumberOfArgsError,
    RedisError,
    ResponseError,
    WatchError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.cache.base import StoreCache
from broker.cache.entry import Entry
from broker.cache.policy import CEILING_S, FUTURE_S, CacheKey, CachePolicy
from broker.config import check_redis_options, redacted_url
from broker.errors import ConfigError
from broker.logs import get_logger
from broker.redisfaults import (
    barred,
    cluster_node,
    grant,
    no_database,
    read_only,
    reconnect_once,
    refused_credentials,
)

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from broker.clock import Clock

__all__ = ["CACHE_REDIS_PERMISSIONS", "RedisCache"]

_log = get_logger("broker.cache")

#: The ACL rights the item cache needs on its keys: reads and writes, the Lua that keeps
#: the bytes figure, and WATCH/MULTI/EXEC for writes and purges.
CACHE_REDIS_PERMISSIONS: Final = "+@scripting +@read +@write +@transaction"

_HEAD: Final = struct.Struct(">d16s")
#: How often a write reads again after another writer changed one of its keys meanwhile.
_WRITE_TRIES: Final = 5
#: Entries deleted per transaction (each a key, two index members and a size).
_DROP_SLICE: Final = 1_000
#: How long the kept bytes figure lives before it is summed again (ms).
_BYTES_LIFE_MS: Final = 3_600_000
#: A size as ``sizes`` holds it, counted only when it is a whole number (a value written by
#: something else counts as none).
_LUA_SIZE: Final = """
local function size(value)
  if value and string.match(value, '^%d+$') then return tonumber(value) end
  return 0
end
"""
#: KEYS sizes, bytes; ARGV member, size, the sum's life (ms): record one entry's size, the sum
#: following it (begun with a namespace's first entry; one begun without it is summed by
#: _TOTAL_SIZE). The sum lives an hour at most and is then summed again: sizes changed by
#: others (an older broker during a rolling upgrade, Redis evicting the hash) would leave
#: it wrong for good.
_SET_SIZE: Final = (
    _LUA_SIZE
    + """
local old = size(redis.call('HGET', KEYS[1], ARGV[1]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HLEN', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], size(ARGV[2]), 'PX', ARGV[3])
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBY', KEYS[2], size(ARGV[2]) - old)
end
return 0
"""
)
#: KEYS sizes, bytes; ARGV members: forget their sizes, the sum following them (each member
#: once; a sum gone below 0, whatever changed the sizes meanwhile, is dropped to be summed).
_DROP_SIZES: Final = (
    _LUA_SIZE
    + """
local gone, seen = 0, {}
for _, member in ipairs(ARGV) do
  if not seen[member] then
    seen[member] = true
    gone = gone + size(redis.call('HGET', KEYS[1], member))
  end
end
redis.call('HDEL', KEYS[1], unpack(ARGV))
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
elseif redis.call('EXISTS', KEYS[2]) == 1 and redis.call('DECRBY', KEYS[2], gone) < 0 then
  redis.call('DEL', KEYS[2])
end
return gone
"""
)
#: KEYS sizes, bytes; ARGV the sum's life (ms): the sum of the sizes; summed when it is
#: missing (a namespace an older broker wrote, or its sum ran out), kept that long at most.
_TOTAL_SIZE: Final = (
    _LUA_SIZE
    + """
local total = redis.call('GET', KEYS[2])
if total then return tonumber(total) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local sum = 0
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do sum = sum + size(value) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 or ttl > tonumber(ARGV[1]) then ttl = tonumber(ARGV[1]) end
redis.call('SET', KEYS[2], sum, 'PX', ttl)
return sum
"""
)


def _unpacked(value: bytes | str | None) -> tuple[float, bytes, bytes] | None:
    """A stored entry's ``fetched_at``, checksum and payload, or None when there is none
    (or it is too short to be one)."""
    if not isinstance(value, bytes) or len(value) < _HEAD.size:
        return None
    fetched_at, digest = _HEAD.unpack_from(value)
    return float(fetched_at), bytes(digest), bytes(value[_HEAD.size :])


class RedisCache(StoreCache):
    """An :class:`~broker.cache.base.ItemCache` in Redis (redis-py asyncio).

    Args:
        client: a ``redis.asyncio.Redis`` with ``decode_responses=False``; closed by
            :meth:`aclose` only when ``owns_client``.
        policy, namespace, clock, batch_size: as for :class:`StoreCache`.
        key_prefix: prepended to every key, so several brokers can share one database.
        owns_client: close the client on :meth:`aclose` (what :meth:`from_url` sets).
    """

    failures = (RedisError, OSError)
    expires_itself = True  # every entry carries a TTL ending at the ceiling

    def __init__(
        self,
        client: Redis,
        policy: CachePolicy,
        *,
        key_prefix: str = "asinb:cache:",
        namespace: str = "creators",
        clock: Clock | None = None,
        batch_size: int = 10,
        owns_client: bool = False,
        where: str = "redis",
        setting: str = "[cache] redis_url",
    ) -> None:
        super().__init__(policy, namespace=namespace, clock=clock, batch_size=batch_size)
        self._redis = client
        self._owns = owns_client
        self._where = where
        # What names the URL in the config, for the advice when Redis fails.
        self._setting = setting
        self._base = f"{key_prefix}{namespace}:"
        self._index = self._base + "index"
        self._sizes = self._base + "sizes"
        self._bytes = self._base + "bytes"
        # Sent by their digest (EVALSHA), loaded once: a script's text with every entry of
        # every write cost a few hundred bytes each.
        self._set_size = client.register_script(_SET_SIZE)
        self._drop_sizes = client.register_script(_DROP_SIZES)
        self._total_size = client.register_script(_TOTAL_SIZE)
        # The index's members again, all at score 0, so those of one item are one range in
        # their byte order (ZRANGEBYLEX "marketplace|ASIN|"): Amazon's not_found deletes an
        # item's answers of every resource set without a scan of the whole index.
        self._names = self._base + "names"
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        policy: CachePolicy,
        *,
        key_prefix: str = "asinb:cache:",
        namespace: str = "creators",
        clock: Clock | None = None,
        batch_size: int = 10,
        setting: str = "[cache] redis_url",
        timeout_s: float = 2.0,
    ) -> RedisCache:
        """Connect to ``url`` (``redis://host:port/db``); the cache owns the client.
        ``setting`` names what gave the URL, for the advice when Redis fails; ``timeout_s``
        bounds each connect and each reply (a Redis that does not answer within it has
        failed, and lookups go on without the cache: redis-py 5 waits for ever by default).

        Raises:
            ConfigError: ``url`` cannot be read as a Redis URL, or carries an option its
                scheme does not take (an ``ssl_*`` one on ``redis://``); the message never
                quotes it: the parser's own error quotes the password.
        """
        try:
            client = Redis.from_url(
                url,
                decode_responses=False,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                # A write whose reply was lost and is sent again stores the same answers.
                **reconnect_once(),
            )
        except ValueError:
            raise ConfigError(
                "cache.redis_url",
                "is not a valid Redis URL (redis://[:password@]host[:port][/db]); a password "
                "holding #, /, ?, @ or : must be percent-encoded (# is %23)",
            ) from None
        # An option the connection does not take fails here, as a config error, not at
        # the first command with a traceback.
        check_redis_options(url, "cache.redis_url")
        return cls(
            client,
            policy,
            key_prefix=key_prefix,
            namespace=namespace,
            clock=clock,
            batch_size=batch_size,
            owns_client=True,
            where=redacted_url(url),
            setting=setting,
        )

    def _name(self, key: CacheKey) -> str:
        return f"{self._base}item:{key.text()}"

    def _member_name(self, member: bytes | str) -> bytes:
        # As bytes, never decoded: a member something else wrote may be no UTF-8 at all.
        raw = member if isinstance(member, bytes) else member.encode()
        return self._base.encode() + b"item:" + raw

    # -- the home -----------------------------------------------------------------------

    async def _load(self, keys: Sequence[CacheKey]) -> dict[CacheKey, Entry]:
        values: list[bytes | str | None] = await self._redis.mget([self._name(key) for key in keys])
        found: dict[CacheKey, Entry] = {}
        for key, value in zip(keys, values, strict=True):
            stored = _unpacked(value)
            if stored is not None:
                fetched_at, digest, payload = stored
                found[key] = Entry(key, fetched_at, payload, digest)
        return found

    async def _store(self, entries: Sequence[Entry], *, expire_before: float) -> int:
        now = self._now()
        names = [self._name(entry.key) for entry in entries]
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_WRITE_TRIES):
                try:
                    # Another machine may have written a newer answer for the same key
                    # meanwhile: read what is held under WATCH, and write only where ours
                    # is not older; EXEC fails if any of them changed since, and we read
                    # again.
                    await pipe.watch(*names)
                    held: list[bytes | str | None] = await pipe.mget(names)
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py ships no types
                    for entry, name, value in zip(entries, names, held, strict=True):
                        stored = _unpacked(value)
                        held_at = None if stored is None else stored[0]
                        await self._queue_write(pipe, entry, name, held_at, now)
                    # The index and sizes outlive every entry they list (each expires
                    # within the ceiling of now) and then go too: a namespace no longer
                    # used (a partner tag changed) leaves nothing behind.
                    pipe.expire(self._index, math.ceil(CEILING_S))
                    pipe.expire(self._sizes, math.ceil(CEILING_S))
                    pipe.expire(self._names, math.ceil(CEILING_S))
                    await pipe.execute()
                    break
                except WatchError:
                    continue
            else:
                # Every try lost the race to other writers (or purges) of these keys: ours
                # are let go, said once per batch (a cache may miss; it never serves wrong).
                _log.warning("cache.writes_dropped", entries=len(entries), reason="contended")
        await self._forget_expired(expire_before)
        excess = await self._redis.zcard(self._index) - self.policy.max_items
        if excess <= 0:
            return 0
        # ZPOPMIN is atomic: two processes trimming at once pop different entries.
        popped = cast("list[tuple[bytes, float]]", await self._redis.zpopmin(self._index, excess))
        members = [member for member, _score in popped]
        await self._drop_members(members)
        return len(members)

    async def _queue_write(
        self, pipe: Pipeline, entry: Entry, name: str, held_at: float | None, now: float
    ) -> None:
        """Queue ``entry``'s write, unless the answer held is newer (a late writer's older
        answer never replaces it) and not stamped more than ``FUTURE_S`` ahead of now."""
        if held_at is not None and entry.fetched_at < held_at <= now + FUTURE_S:
            return
        ttl_s = math.ceil(entry.fetched_at + CEILING_S - now)
        if ttl_s <= 0:
            return
        member = entry.key.text()
        pipe.set(name, _HEAD.pack(entry.fetched_at, entry.checksum) + entry.payload, ex=ttl_s)
        pipe.zadd(self._index, {member: entry.fetched_at})
        pipe.zadd(self._names, {member: 0})
        await self._set_size(
            keys=[self._sizes, self._bytes], args=[member, entry.size, _BYTES_LIFE_MS], client=pipe
        )

    async def _forget_expired(self, expire_before: float) -> None:
        """Drop index and size records of entries whose TTL has run out."""
        stale = cast(
            "list[bytes]",
            await self._redis.zrangebyscore(self._index, "-inf", f"({expire_before}"),
        )
        if stale:
            await self._drop_members(stale)

    async def _drop_members(self, members: Sequence[bytes | str]) -> int:
        # A transaction per slice: a purge or a day's expiry of 100,000 entries in one would
        # outlast the reply timeout, and fail though Redis went on to finish it.
        deleted = 0
        for start in range(0, len(members), _DROP_SLICE):
            part = members[start : start + _DROP_SLICE]
            async with self._redis.pipeline(transaction=True) as pipe:
                await self._queue_drop(pipe, part)
                count, _, _, _ = await pipe.execute()
            deleted += int(count)
        return deleted

    async def _queue_drop(self, pipe: Pipeline, members: Sequence[bytes | str]) -> None:
        """Queue the deletion of ``members``' entries with their index and size records."""
        pipe.delete(*[self._member_name(m) for m in members])
        pipe.zrem(self._index, *members)
        pipe.zrem(self._names, *members)
        await self._drop_sizes(keys=[self._sizes, self._bytes], args=members, client=pipe)

    async def _delete_unchanged(self, entries: Sequence[Entry]) -> None:
        names = [self._name(entry.key) for entry in entries]
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_WRITE_TRIES):
                try:
                    # Under WATCH, as a write: an entry another process replaced since it
                    # was read (a good answer for the same key) stays.
                    await pipe.watch(*names)
                    held: list[bytes | str | None] = await pipe.mget(names)
                    members = [
                        entry.key.text()
                        for entry, value in zip(entries, held, strict=True)
                        if _unpacked(value) == (entry.fetched_at, entry.checksum, entry.payload)
                    ]
                    if not members:
                        return
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py ships no types
                    await self._queue_drop(pipe, members)
                    await pipe.execute()
                    return
                except WatchError:
                    continue
        # Every try met another writer of these keys: the damaged entries stay (misses
        # still; their TTLs end them).
        _log.warning("cache.corrupt_entry_kept", entries=len(entries), error="contended")

    async def _delete(
        self,
        keys: Sequence[CacheKey] | None,
        *,
        fetched_before: float | None,
        asins: Sequence[str] | None,
        every_resource_set: bool = False,
    ) -> int:
        if keys is not None and every_resource_set:
            # Members are "marketplace|ASIN|resources": an item's are the names from its
            # "marketplace|ASIN|" up to that and the byte 0xFF (resources are ASCII).
            found: list[bytes | str] = []
            for prefix in dict.fromkeys(f"{k.marketplace}|{k.asin}|".encode() for k in keys):
                found.extend(
                    await self._redis.zrangebylex(
                        self._names, b"[" + prefix, b"[" + prefix + b"\xff"
                    )
                )
            return await self._drop_members(found)
        if keys is not None:
            return await self._drop_members([key.text() for key in keys])
        top = "+inf" if fetched_before is None else f"({fetched_before}"
        members = cast("list[bytes]", await self._redis.zrangebyscore(self._index, "-inf", top))
        if asins is not None:
            wanted = {asin.encode() for asin in asins}
            # A member that is no key (written by something else) names no ASIN.
            members = [m for m in members if m.count(b"|") >= 2 and m.split(b"|", 2)[1] in wanted]
        deleted = await self._drop_members(members)
        if fetched_before is None:
            # An answer whose index entry an evicting Redis dropped (maxmemory with an
            # allkeys policy) is listed nowhere but still served: looked for by name too,
            # and dropped as a member (one written meanwhile leaves no index entry behind).
            items = f"{_glob(self._base)}item:"
            patterns = (
                [f"{items}*"]
                if asins is None
                else [f"{items}*|{_glob(asin)}|*" for asin in dict.fromkeys(asins)]
            )
            named = len(f"{self._base}item:")
            for pattern in patterns:
                found = [
                    (name.decode() if isinstance(name, bytes) else name)[named:]
                    async for name in self._redis.scan_iter(match=pattern, count=1000)
                ]
                deleted += await self._drop_members(found)
        return deleted

    async def _measure(self) -> tuple[int, int, float | None]:
        await self._forget_expired(self._now() - CEILING_S)
        entries = await self._redis.zcard(self._index)
        total = await self._total_size(keys=[self._sizes, self._bytes], args=[_BYTES_LIFE_MS])
        oldest = await self._redis.zrange(self._index, 0, 0, withscores=True)
        return int(entries), int(total), float(oldest[0][1]) if oldest else None

    async def aclose(self) -> None:
        """Close the client when this cache owns it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns:
            await self._redis.aclose()

    def __repr__(self) -> str:
        return f"RedisCache(prefix={self._base!r}, max_age_s={self.policy.max_age_s:g})"

    @property
    def where(self) -> str:
        """The Redis URL without credentials."""
        return self._where

    def wrong_config(self, error: BaseException) -> bool:
        """True when ``error`` is the config's to mend: Redis refusing its password or a
        command, a database it does not have, a Redis Cluster node."""
        return _refused_password(error) or no_database(error) or cluster_node(error)

    def _failure_advice(self, error: BaseException) -> tuple[str, str]:
        """Redis, and what to check: its password when it refused one or wants one (it
        read as "check that Redis is up"), the ACL user's rights when it barred a command,
        TLS when a rediss:// URL timed out."""
        if barred(error):
            # Not the password: the user is known, and lacks a right (an ACL granting the
            # read, write and scripting commands but not WATCH/MULTI lost every write).
            return self.where, (
                "the Redis user lacks a permission the item cache needs: "
                + grant(CACHE_REDIS_PERMISSIONS)
            )
        if _refused_password(error):
            where = (
                f"put the right one in {self._setting} (redis://:PASSWORD@host:port/db)"
                if "redis_url_env" in self._setting
                # A password is never written in the config file itself.
                else "name a variable with [cache] redis_url_env and put the URL there, with "
                "the password (redis://:PASSWORD@host:port/db)"
            )
            return self.where, (
                "Redis refused the connection's authentication (a password missing or wrong, "
                f"or an ACL user without the rights): {where}"
            )
        if isinstance(error, (TimeoutError, RedisTimeoutError)) and self.where.startswith(
            "rediss:"
        ):
            return self.where, (
                "a rediss:// URL that times out is often a Redis that does not speak TLS: "
                f"try redis://, else check that Redis is up and {self._setting} is right"
            )
        if no_database(error):
            return self.where, (
                f"Redis has no such database: name one it has in {self._setting}'s path "
                "(/0 by default)"
            )
        if cluster_node(error):
            # Its reads and writes take several keys at once, in one slot only by chance.
            return self.where, (
                "a Redis Cluster node, which the item cache cannot use: name a standalone "
                "Redis (or a primary of Sentinel's)"
            )
        refusal = read_only(error)
        if refusal == "replica":
            return self.where, (
                f"Redis is up but takes no writes (a read-only replica): point {self._setting} "
                "at its primary"
            )
        if refusal == "memory":
            # An evicting Redis says so too, when what it may evict does not free enough.
            return self.where, (
                "Redis is up but takes no writes (out of memory: under maxmemory-policy "
                "noeviction, or with nothing left it may evict): give it more maxmemory, and "
                "a policy that evicts the cache's keys (volatile-ttl; see the README's item "
                "cache)"
            )
        if isinstance(error, ResponseError) and "WRONGTYPE" in str(error):
            return self.where, (
                f"a key under the cache's prefix {self._base!r} holds data of another kind "
                "(something else writes there): delete the keys under that prefix, or set "
                "[cache] key_prefix to one of the cache's own"
            )
        return self.where, f"check that Redis is up and {self._setting} is right"


def _refused_password(error: BaseException) -> bool:
    """True for Redis refusing the connection's authentication or barring a command: a
    config error, not an outage (a password sent with a user name to a Redis before 6 is
    refused so too)."""
    return (
        refused_credentials(error)
        or barred(error)
        or isinstance(error, AuthenticationWrongNumberOfArgsError)
    )


def _glob(text: str) -> str:
    """``text`` matched literally in a Redis SCAN pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
