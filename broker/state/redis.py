"""The ``redis`` key-state home: one hash per key, one Lua script per decision.

The script (``decide.lua``) reads Redis's ``TIME``, so every machine's decisions share one
clock and no client clock is trusted; it applies the caller's feedback, reserves the slot
and counts the day, and answers in one round trip (redis-py's ``AsyncScript``: ``EVALSHA``,
re-loading the script after a restart). The script runs the same rate controller as the
local homes (``broker/ratecontrol.py``, ported step for step). Both keys of a StateKey carry
the same hash tag. Redis Cluster is not supported: a node that redirects a key (``MOVED``)
is a config error, as is a user whose ACL bars the script. Keys expire after ``ttl_s``
idle (two days: longer than a daily window, so an idle key's count survives until its day
is over).

Redis down or unreachable: every call raises :class:`broker.errors.StateUnavailableError`
(never a fallback to uncoordinated sending). A Redis that may evict keys (a memory limit
and a policy other than ``noeviction``) is named once: each eviction loses a key's record.
Redis restarted empty: each caller's :class:`broker.state.model.ProcessMark` carries the
highest daily count it saw and the sends of the record's generation it saw, and the script
rebuilds the day's count from them (as ``decision.py`` does), not zeroed (see the README,
"Several processes or machines on one key").
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from broker.config import redacted_url
from broker.errors import ConfigError, StateUnavailableError
from broker.logs import get_logger
from broker.ratecontrol import DROP_WINDOW_S, RecoveryTuning
from broker.redisfaults import (
    barred,
    cluster_node,
    grant,
    no_database,
    read_only,
    reconnect_once,
    refused_credentials,
)
from broker.state.model import (
    PROCESS_RECENT_S,
    Decision,
    Feedback,
    KeyLimits,
    ProcessMark,
    StateKey,
)
from broker.state.store import KeyView

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["DEFAULT_KEY_PREFIX", "REDIS_PERMISSIONS", "RedisStateStore"]

logger = get_logger("broker")

#: What a Redis ACL user must be allowed: the script, and the commands it runs.
REDIS_PERMISSIONS = "+@scripting +@read +@write +time"

#: Prepended to every Redis key the broker writes.
DEFAULT_KEY_PREFIX = "asin-broker:"
_US = 1_000_000
_SCRIPT = resources.files("broker.state").joinpath("decide.lua").read_text(encoding="utf-8")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStateStore:
    """A :class:`broker.state.store.KeyStateStore` on Redis (redis-py's asyncio client).

    Args:
        url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``).
        password: the password (from the env var ``[state] redis_password_env`` names).
        key_prefix: prepended to every key, so several deployments can share one Redis.
        ttl_s: an idle key's state expires after this long.
        timeout_s: connect and read timeout; a Redis that does not answer within it is down.

    Raises:
        StateUnavailableError: redis-py is not installed (the ``redis`` extra).
    """

    __slots__ = (
        "_client",
        "_eviction_checked",
        "_has_password",
        "_prefix",
        "_script",
        "_tls",
        "_ttl_ms",
        "_url",
        "_writable",
    )

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_s: float = 2 * 86_400.0,
        timeout_s: float = 2.0,
    ) -> None:
        try:
            from redis.asyncio import Redis
        except ImportError as exc:
            raise StateUnavailableError(
                "redis", "redis-py is not installed: pip install 'asin-broker[redis]'"
            ) from exc
        self._url = redacted_url(url)
        self._has_password = password is not None
        self._prefix = key_prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._writable = False
        self._eviction_checked = False
        self._tls = url.lower().startswith("rediss:")
        self._client: Redis = Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # If the lost reply's script had run, the retry wastes one slot and counts one
            # request too many: the safe side. Never on a timeout: one that was only slow
            # ran the script twice (a slot and a count lost).
            **reconnect_once(),
        )
        self._script: AsyncScript = self._client.register_script(_SCRIPT)

    @property
    def backend(self) -> str:
        """``"redis"``."""
        return "redis"

    @property
    def where(self) -> str:
        """The Redis URL without credentials."""
        return self._url

    def _keys(self, key: StateKey) -> list[str]:
        base = f"{self._prefix}{{{key.digest}}}"
        return [base, f"{base}:procs"]

    def _args(
        self,
        limits: KeyLimits,
        feedback: Feedback,
        reserve: bool,
        process: ProcessMark | None,
        *,
        view: bool = False,
    ) -> list[str]:
        args: list[object] = [
            repr(limits.nominal_rate),
            repr(limits.min_rate),
            repr(limits.max_rate),
            -1 if limits.day_limit is None else limits.day_limit,
            limits.reset_offset_s,
            repr(limits.beta),
            repr(limits.increase),
            limits.boost_every,
            repr(limits.max_boost),
            int(limits.horizon_s * _US),
            int(limits.probe_lease_s * _US),
            "view" if view else 1 if reserve else 0,
            "" if process is None else process.process_id,
            -1 if process is None else process.hwm_day,
            0 if process is None else process.hwm_count,
            feedback.successes,
            int(feedback.pause_s * _US),
            feedback.pause_reason,
            int(feedback.park_s * _US),
            feedback.park_reason,
            1 if feedback.unpark else 0,
            -1 if feedback.set_rate is None else repr(feedback.set_rate),
            self._ttl_ms,
            int(PROCESS_RECENT_S * _US),
            *_tuning_args(limits.tuning),
            feedback.release_probe_us,
            int(feedback.probe_again_s * _US),
            1 if feedback.leaving else 0,
            1 if feedback.answered else 0,
            feedback.run_429s,
            repr(0.0 if process is None else process.rate),
            0 if process is None else process.parked_until_us,
            "" if process is None else process.park_reason,
            "" if process is None else process.gen,
            0 if process is None else process.gen_sends,
            0 if process is None else process.own_sends,
            *feedback.throttled,
        ]
        return [str(a) for a in args]

    async def decide(
        self,
        key: StateKey,
        limits: KeyLimits,
        *,
        feedback: Feedback,
        reserve: bool,
        process: ProcessMark | None,
    ) -> Decision:
        """Apply feedback and optionally reserve a send: one script call, one round trip."""
        return await self._decide(key, limits, self._args(limits, feedback, reserve, process))

    def _failure(self, exc: Exception) -> ConfigError | StateUnavailableError:
        """What a Redis error means to the caller: a config error, or the store unavailable."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if refused_credentials(exc):
            # A wrong or missing password never mends by waiting: a config error (exit 78).
            if not self._has_password:
                return ConfigError(
                    "state.redis_password_env",
                    f"Redis at {self._url} requires a password and none is configured "
                    f"({type(exc).__name__}: {exc}); set [state] redis_password_env to the "
                    "name of an environment variable holding it",
                )
            return ConfigError(
                "state.redis_password_env",
                f"Redis at {self._url} refused the credentials ({type(exc).__name__}: {exc}); "
                "set the password's environment variable to the right value",
            )
        if no_database(exc):
            # The URL's /N names a database the server does not have: no wait mends it.
            return ConfigError(
                "state.redis_url",
                f"Redis at {self._url} has no such database ({exc}); name one the server "
                "has in the URL's path (/0 by default)",
            )
        if barred(exc):
            # An ACL that bars a command (the script's own ones too) never mends by waiting.
            return ConfigError(
                "state.redis_url",
                f"the Redis user of {self._url} lacks a permission the broker needs ({exc}); "
                + grant(REDIS_PERMISSIONS),
            )
        if cluster_node(exc):
            return ConfigError(
                "state.redis_url",
                f"{self._url} is a Redis Cluster node ({type(exc).__name__}: {exc}); Redis "
                "Cluster is not supported: name a standalone Redis (or a primary of "
                "Sentinel's), or use another backend",
            )
        message = f"{self._url}: {type(exc).__name__}: {exc}"
        refusal = read_only(exc)
        if refusal == "replica":
            message += " (a read-only replica: name its primary in [state] redis_url)"
        elif refusal == "memory":
            message += " (out of memory: raise its maxmemory, and keep maxmemory-policy noeviction)"
        if self._tls and isinstance(exc, RedisTimeoutError | RedisConnectionError | OSError):
            message += " (a rediss:// URL: if this server does not speak TLS, its URL is redis://)"
        return StateUnavailableError("redis", message)

    async def _check_eviction(self) -> None:
        """Name, once, a Redis that may evict the broker's keys: with a memory limit and an
        evicting policy, each eviction loses a key's record, its slot and its day's count
        with it (the count is rebuilt from what processes saw, the slot is not). A Redis
        that keeps ``CONFIG`` to itself (managed ones) is not asked twice."""
        from redis.exceptions import RedisError

        self._eviction_checked = True
        try:
            found = await self._client.config_get("maxmemory*")
        except (RedisError, OSError):
            return
        policy = _text(found.get("maxmemory-policy", "noeviction"))
        limit = _text(found.get("maxmemory", "0"))
        if policy != "noeviction" and limit not in ("", "0"):
            logger.warning(
                "broker.state_evictable",
                where=self._url,
                policy=policy,
                maxmemory=limit,
                remedy="give the key state a Redis instance set to maxmemory-policy "
                "noeviction, or without maxmemory: an evicted key's state is "
                "lost, and its processes send over its rate until they agree again",
            )

    async def _decide(self, key: StateKey, limits: KeyLimits, args: list[str]) -> Decision:
        from redis.exceptions import RedisError

        try:
            reply: Any = await self._script(keys=self._keys(key), args=args)
        except (RedisError, OSError) as exc:
            raise self._failure(exc) from exc
        if not self._eviction_checked:
            await self._check_eviction()
        return Decision(
            granted=int(reply[0]) == 1,
            wait_s=int(reply[1]) / _US,
            refusal=_text(reply[2]) or None,
            probe=int(reply[3]) == 1,
            now_us=int(reply[4]),
            slot_us=int(reply[5]),
            next_slot_us=int(reply[6]),
            rate=float(_text(reply[7])),
            day=int(reply[8]),
            count=int(reply[9]),
            paused_until_us=int(reply[10]),
            pause_reason=_text(reply[11]),
            parked_until_us=int(reply[12]),
            park_reason=_text(reply[13]),
            last_429_us=int(reply[14]),
            cut=int(reply[15]) == 1,
            processes=int(reply[16]),
            wall_us=int(reply[4]),  # Redis's TIME judges both the slots and the day
            day_limit=None if int(reply[17]) < 0 else int(reply[17]),
            run_429s=int(reply[18]),
            gen=_text(reply[19]),
            window_end_us=int(reply[20]),
            gen_sends=int(reply[21]),
            day_taken_over_s=int(reply[22]),
            # An older script (a rolling upgrade) answers without it.
            answered_today=len(reply) > 23 and int(reply[23]) == 1,
        )

    async def view(self, key: StateKey, limits: KeyLimits) -> KeyView:
        """Read the key's state without writing anything: the script's decision with nothing
        to apply, reserved or stored (a key no broker used yet is not created, and a config
        whose ``tps`` differs does not reset the shared rate)."""
        from redis.exceptions import RedisError

        args = self._args(limits, Feedback(), False, None, view=True)
        decision = await self._decide(key, limits, args)
        try:
            stored = bool(await self._client.exists(self._keys(key)[0]))
        except (RedisError, OSError) as exc:
            raise self._failure(exc) from exc
        await self._check_writable()
        return KeyView(key, limits, decision, stored=stored)

    async def _check_writable(self) -> None:
        """Raise :class:`StateUnavailableError` when Redis takes no writes (a read-only
        replica, out of memory under ``noeviction``, too few replicas): every broker on it
        is paused then, and a view must not show its keys as active. Checked once per store,
        with a key of its own that lives a second."""
        from redis.exceptions import RedisError

        if self._writable:
            return
        try:
            await self._client.set(f"{self._prefix}write-check", "1", px=1000)
        except (RedisError, OSError) as exc:
            raise self._failure(exc) from exc
        self._writable = True

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisStateStore({self._url!r}, prefix={self._prefix!r})"


def _tuning_args(tuning: RecoveryTuning | None) -> list[object]:
    """ARGV[25..37] of the script: the ceiling-aware controller's parameters (or "off")."""
    t = tuning if tuning is not None else RecoveryTuning()
    return [
        1 if tuning is not None else 0,
        1 if t.recovery else 0,
        repr(t.cap_beta),
        repr(t.cap_zone),
        repr(t.cap_gain),
        repr(t.drop_beta),
        repr(t.regrow_s),
        repr(t.plateau),
        repr(t.probe_after_s),
        t.probe_after_sends,
        repr(t.max_probe_after_s),
        repr(t.probe_gain),
        int(DROP_WINDOW_S * _US),
    ]
