"""The library API and the engine's composition root: ``async with Broker(...)``, then look up.

The broker builds the pipeline (intake, batcher, key pool, executor, transport) and runs
its tasks (the batcher, one dispatcher per key, every send) in one ``asyncio.TaskGroup``
inside a single engine task: closing the broker cancels that task and with it everything
it started, and a task that dies fails every waiting caller with its exception instead of
hanging them. Results reach callers through receivers (one per ``get_items`` call or
``stream``), each result carrying the query that asked for it.

The engine talks to a URL; starting the embedded simulator for ``endpoint = "simulator"``
belongs to the layer above (:class:`broker.client.Broker`), so the engine never imports
the simulator that judges it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import random
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypedDict

from broker.api.base import Dialect, Operation
from broker.api.creators import CreatorsDialect
from broker.api.marketplaces import marketplace as lookup_marketplace
from broker.api.marketplaces import token_url
from broker.api.oauth import CreatorsTokenCache
from broker.api.paapi5 import PaapiDialect
from broker.asin import check_asin, refuse_single_string
from broker.cache import CacheFront, cache_namespace, cache_policy, open_cache
from broker.clock import Clock, LoopClock
from broker.config import AMAZON, BrokerConfig, KeyConfig, load_config, require_config
from broker.engine.authorizer import Authorizer, BearerAuthorizer, SigV4Authorizer
from broker.engine.batcher import Batch, Batcher, BatchPlace, Lookup, Room, WorkQueue
from broker.engine.executor import Executor
from broker.engine.intake import Ident, Intake, ident_of
from broker.engine.keys import KeyState
from broker.engine.metrics import EngineMetrics, MetricsSnapshot
from broker.engine.retry import RetryPolicy
from broker.engine.scheduler import KeyPool
from broker.engine.shared_limiter import SharedKeyLimiter, SharedState
from broker.engine.transport import AiohttpTransport, Transport
from broker.errors import (
    BrokerClosedError,
    ConfigError,
    StateUnavailableError,
    WrongEventLoopError,
)
from broker.logs import get_logger, scrub
from broker.models import ItemResult, Protocol, Query, Secret
from broker.state import KeyStateStore, open_store, process_id

if TYPE_CHECKING:
    from typing import Unpack

    from broker.api.operations import (
        BrowseNodesOptions,
        BrowseNodesResult,
        SearchOptions,
        SearchResult,
        VariationsOptions,
        VariationsResult,
    )
    from broker.cache.policy import CacheStats
    from broker.engine.quota import BudgetStore

__all__ = ["Broker", "BrokerOptions", "Query"]

logger = get_logger("broker")

#: An OSError stopping the engine with one of these is the machine's (a full or read-only
#: disk under the key state, a file it may not write, a file held, no open files left): told
#: in one line, not as a crash.
_MACHINE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EIO,
        errno.EACCES,
        errno.EPERM,
        errno.EBUSY,
        errno.EMFILE,
        errno.ENFILE,
    }
)

_Input = str | Query
#: What makes [[keys]] entries one credential's, sharing one token: (token URL, credential
#: id, version, secret; a Secret compares and hashes by value, and shows as ***).
_Credential = tuple[str, str, str, Secret]

#: Inputs a stream reads ahead to look up in the item cache in one batch.
_CACHE_CHUNK = 100

#: How long closing waits for the streams' cancelled producers to end.
_PRODUCER_EXIT_S = 1.0


class BrokerOptions(TypedDict, total=False):
    """The keywords :class:`Broker` takes beside its config, for ``from_config`` and
    ``from_dict`` (typed, so a misspelt one is a type checker's error, not only a run's)."""

    clock: Clock | None
    transport: Transport | None
    rng: random.Random | None
    budget_store: BudgetStore | None
    state_store: KeyStateStore | None
    cache_default_max_age_s: float
    cache_max_age_s: float | None
    cache_refresh: bool


class Broker:
    """Looks up any number of ASINs as fast as the configured keys allow.

    Example::

        async with Broker.from_config("config.toml") as broker:
            results = await broker.get_items(["B0C1234567", "B0D7654321"])
            async for result in broker.stream(asin_iter):
                print(result.query.tag, result.status)

    Per-ASIN failures are results (``status`` + ``error``), including ids that are not
    ASINs, unknown marketplaces and marketplaces no key is configured for. Exceptions are
    for misuse, configuration (:class:`~broker.errors.ConfigError`), the case where every
    key that could serve a marketplace left rotation
    (:class:`~broker.errors.NoUsableKeyError`, naming each key's failure), and a broker
    closed while a caller waited (:class:`~broker.errors.BrokerClosedError`).

    Args:
        config: the validated configuration.
        clock: time source (tests pass a FakeClock); default the running loop's clock.
            With a clock of ``private_time`` (a FakeClock), or the embedded simulator (a new
            port, so new keys, each run), the keys' state stays in this process unless
            ``[state]`` names a path or Redis: the machine's shared file would keep a fake
            clock's pauses and days, and a later real run would obey them.
        transport: HTTP transport (tests pass a MockTransport); default aiohttp.
        rng: randomness for jitter (seed it for reproducible runs).
        budget_store: where daily request counters persist, for a caller that keeps its
            own counts (then, unless ``state_store`` is given too, the keys' state stays
            in this process).
        state_store: where keys' shared state lives (rate, daily count, pauses, circuit);
            default: the store ``config.state`` names, opened and closed by the broker.
        cache_default_max_age_s: the item cache's max age when ``[cache] max_age_s`` is
            unset: 0 (off) for the library; ``broker run`` passes 86,400.
        cache_max_age_s: a per-run override (``--max-age``; 0 turns the cache off).
        cache_refresh: serve nothing from the item cache but still write every answer to
            it, so later lookups get the fresh ones (``--refresh``).

    Raises:
        ValueError: ``cache_refresh`` with the item cache off (nothing to write to).
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        clock: Clock | None = None,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        budget_store: BudgetStore | None = None,
        state_store: KeyStateStore | None = None,
        cache_default_max_age_s: float = 0.0,
        cache_max_age_s: float | None = None,
        cache_refresh: bool = False,
    ) -> None:
        config = require_config(config, type(self).__name__)
        self._check_composition(config)
        if cache_refresh and not (
            cache_policy(
                config.cache, default_max_age_s=cache_default_max_age_s, max_age_s=cache_max_age_s
            ).enabled
        ):
            # It would write nothing: no cache, so the caller's "refresh" did nothing at all.
            raise ValueError(
                "cache_refresh=True writes the new answers to the item cache, which is off "
                "here: set [cache] max_age_s (the library's default is 0, off) or leave "
                "cache_refresh out"
            )
        self.config = config
        self._state_store = state_store
        self._cache_default_max_age_s = cache_default_max_age_s
        self._cache_max_age_s = cache_max_age_s
        self._cache_refresh = cache_refresh
        self._clock: Clock = clock or LoopClock()
        self._given_transport = transport
        self._rng = rng or random.Random()
        self._budget_store = budget_store
        self._stack: contextlib.AsyncExitStack | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: asyncio.Task[None] | None = None
        # Set while (and once) the broker is closed: every aclose() waits for the one close.
        self._closing: asyncio.Event | None = None
        # Done when an ``async with`` that began has opened or failed (None: none began): a
        # close while it opens waits for it.
        self._opening: asyncio.Future[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        #: pending SearchItems / GetVariations / GetBrowseNodes answers
        self._ops: set[asyncio.Future[Mapping[str, object]]] = set()
        # Open streams and the task reading each one's input: the engine's end must reach a
        # consumer with nothing in flight (its input has not given the next item yet).
        self._streams: dict[_StreamReceiver, asyncio.Task[None] | None] = {}
        # Each stream(stop=...)'s watch of its event: ended with the broker too, not only
        # when its consumer lets the generator go.
        self._stop_watches: set[asyncio.Task[object]] = set()
        self._metrics = EngineMetrics()
        self._keys: list[KeyState] = []
        self._pool: KeyPool | None = None
        self._executor: Executor | None = None
        self._batcher: Batcher | None = None
        self._intake: Intake | None = None
        self._work: WorkQueue | None = None
        #: the item cache ([cache]); None when it is off
        self._cache: CacheFront | None = None
        #: the base URL requests go to when it is not Amazon's (the embedded simulator's)
        self.simulator_url: str | None = None
        #: why the engine stopped: its crash (a bug, a failing budget store) or the close
        self._stopped: BaseException | None = None
        #: the type of the error that made ``async with`` fail, if it did (calls then say so)
        self._open_failed: str | None = None

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str] = "config.toml",
        *,
        environ: Mapping[str, str] | None = None,
        **kwargs: Unpack[BrokerOptions],
    ) -> Self:
        """Build a broker from a config file (secrets from ``environ``, default os.environ)."""
        return cls(load_config(path, environ=environ), **kwargs)

    @classmethod
    def from_dict(
        cls,
        document: Mapping[str, object],
        *,
        secrets: Mapping[str, str | Secret] | None = None,
        environ: Mapping[str, str] | None = None,
        **kwargs: Unpack[BrokerOptions],
    ) -> Self:
        """Build a broker from a configuration in code (see :func:`broker.config_from_dict`).

        ``document`` has the shape of config.toml; ``secrets`` maps key names to their
        secrets, for applications that keep credentials in their own settings.
        """
        from broker.config import config_from_dict

        return cls(config_from_dict(document, secrets=secrets, environ=environ), **kwargs)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._open_failed is not None:
            raise RuntimeError(self._failed_open_message())
        if self._stack is not None or self._loop is not None:
            raise RuntimeError("a Broker can be entered only once")
        if self._closing is not None:
            # aclose() before opening (a shutdown path run before startup): opened now, it
            # would refuse every call, and its own close would close nothing.
            raise RuntimeError("a closed broker cannot be opened again: make a new Broker")
        self._loop = loop = asyncio.get_running_loop()
        self._opening = opening = loop.create_future()
        try:
            stack = contextlib.AsyncExitStack()
            await stack.__aenter__()
            try:
                await self._start(stack)
            except BaseException as exc:
                # Said before the close, which may itself fail or be cancelled.
                self._open_failed = type(exc).__name__
                await stack.aclose()
                raise
            self._stack = stack
            if self._close_begun():
                # aclose() came while this opened (a shutdown hook racing a startup task)
                # and waits for it: what was opened is closed now, and the open fails
                # (opened, the broker would refuse every call, and no close reach it).
                await self._close()
                raise BrokerClosedError("the broker was closed while it opened")
        finally:
            opening.set_result(None)
        logger.info(
            "broker.started",
            keys=[k.name for k in self._keys],
            protocol=self.config.api.protocol.value,
            endpoint=self._endpoint_label(),
        )
        return self

    def _close_begun(self) -> bool:
        """True once :meth:`aclose` began (read anew after an await)."""
        return self._closing is not None

    async def _open_endpoint(self, stack: contextlib.AsyncExitStack) -> str | None:
        """The base URL to send to (None: Amazon's own hosts).

        The embedded simulator is started by :class:`broker.client.Broker`, which
        overrides this; the engine alone only talks to URLs.
        """
        api = self.config.api
        if api.uses_simulator:
            raise ConfigError(
                "api.endpoint",
                '"simulator" needs the embedded simulator: use broker.Broker '
                "(from broker import Broker), not broker.engine.broker.Broker",
            )
        return None if api.endpoint == AMAZON else api.endpoint

    def _missing_secret(self, key: KeyConfig) -> Secret:
        """The secret of a key whose secret is not configured (only the simulator has one)."""
        raise ConfigError(
            f"keys.{key.name}",
            f"no secret for credential {key.credential_id!r}: set "
            f"{key.secret_source or 'credential_secret_env'}",
        )

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        base_url = await self._open_endpoint(stack)
        if base_url is not None and config.api.uses_simulator:
            self.simulator_url = base_url
        transport = self._given_transport
        if transport is None:
            engine = config.engine
            transport = await stack.enter_async_context(
                AiohttpTransport(
                    timeout_s=engine.request_timeout_s,
                    connect_timeout_s=engine.connect_timeout_s,
                    max_body_bytes=engine.max_body_bytes,
                    max_connections=engine.max_connections,
                    trust_env=not config.api.uses_simulator,
                )
            )
        dialect: Dialect
        if config.api.protocol is Protocol.CREATORS:
            dialect = CreatorsDialect(base_url) if base_url else CreatorsDialect()
        else:
            dialect = PaapiDialect(base_url)
        token_base = config.api.token_endpoint or base_url
        # A caller that passes its own budget store and no state store keeps the keys'
        # state in this process (tests of the in-process limiter do).
        shared = (
            None
            if self._budget_store is not None and self._state_store is None
            else self._open_state(stack, base_url)
        )
        # One token cache per credential, shared by the [[keys]] entries that name it.
        caches: dict[_Credential, CreatorsTokenCache] = {}
        self._keys = [
            KeyState.from_config(
                key,
                self._authorizer(key, transport, token_base, caches),
                config=config,
                clock=self._clock,
                rng=self._rng,
                budget_store=self._budget_store,
                shared=shared,
            )
            for key in config.keys
        ]
        limiters = [key.limiter for key in self._keys if isinstance(key.limiter, SharedKeyLimiter)]

        async def close_limiters() -> None:
            # Together: each may wait up to a second for a slow store.
            await asyncio.gather(*(limiter.aclose() for limiter in limiters))

        stack.push_async_callback(close_limiters)
        if shared is not None and shared.store.backend != "memory" and limiters:
            # Asked once now, by one key (the keys share the store): a store this config
            # cannot use (Redis refusing the password, a damaged file) fails the open (exit
            # 78 or 74), not the first send, hours later for an idle daemon that said it
            # was ready meanwhile. One out of reach is waited for by the keys, as at any
            # other time (each key asking in turn held the open for a timeout each).
            with contextlib.suppress(StateUnavailableError):
                await limiters[0].refresh()
        retry = config.retry
        policy = RetryPolicy(
            max_attempts=retry.max_attempts,
            max_age_s=retry.max_age_s,
            base_delay_s=retry.base_delay_s,
            max_delay_s=retry.max_delay_s,
            retry_after_cap_s=config.rate.retry_after_cap_s,
            random=self._rng.random,
        )
        self._work = work = WorkQueue()
        self._batcher = batcher = Batcher(
            work,
            clock=self._clock,
            batch_size=config.engine.batch_size,
            linger_s=config.engine.linger_s,
        )
        self._pool = pool = KeyPool(
            self._keys,
            work,
            batcher,
            config_source=str(config.source),
            default_marketplace=config.api.marketplace,
            marketplace_hint=config.marketplace_hint(),
            clock=self._clock,
        )
        self._executor = Executor(
            dialect=dialect,
            transport=transport,
            pool=pool,
            policy=policy,
            clock=self._clock,
            metrics=self._metrics,
            spawn=self._spawn,
        )
        cache = open_cache(
            config.cache,
            namespace=cache_namespace(config),
            default_max_age_s=self._cache_default_max_age_s,
            max_age_s=self._cache_max_age_s,
            clock=self._clock,
            batch_size=config.engine.batch_size,
        )
        front = None
        if cache is not None:
            front = CacheFront(cache, read=not self._cache_refresh, clock=self._clock)
            stack.push_async_callback(front.aclose)
        self._cache = front
        self._intake = Intake(
            marketplace=config.api.marketplace,
            resources=config.api.resources,
            protocol=config.api.protocol,
            queue_size=config.engine.queue_size,
            pool=pool,
            batcher=batcher,
            metrics=self._metrics,
            closed=lambda: self._stopped,
            cache=front,
        )
        self._engine = asyncio.get_running_loop().create_task(self._run(), name="broker-engine")
        self._engine.add_done_callback(self._engine_done)

    def _open_state(self, stack: contextlib.AsyncExitStack, base_url: str | None) -> SharedState:
        """The keys' shared state: the given store, or the one ``[state]`` names."""
        store = self._state_store
        if store is None:
            clock = self._clock
            state = self.config.state
            private = getattr(clock, "private_time", False)
            # The embedded simulator listens on a new port each run, so its keys are new
            # each run too: a file (the machine's, or one [state] path names) would only
            # gather a row per run, forever, which nothing reads again.
            # A private clock (tests) keeps it in memory too, unless a file is named.
            unshared = self.config.api.uses_simulator or (private and state.path is None)
            if unshared and state.backend == "local":
                state = replace(state, backend="memory")
            store = open_store(
                state,
                now_us=lambda: int(clock.monotonic() * 1_000_000),
                wall=lambda: int(clock.utcnow().timestamp() * 1_000_000),
            )
            stack.push_async_callback(store.aclose)
        # Key identity includes the endpoint: embedded simulators (one port per process)
        # never share a key, while every process talking to Amazon does.
        endpoint = base_url or f"{AMAZON}:{self.config.api.protocol.value}"
        return SharedState(store, endpoint, process_id())

    async def _run(self) -> None:
        """The engine task: every other task of the broker lives in its TaskGroup."""
        assert self._batcher is not None
        assert self._pool is not None
        assert self._executor is not None
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._batcher.run(), name="broker-batcher")
            for key in self._keys:
                group.create_task(
                    self._pool.dispatch(key, self._executor.run, self._spawn),
                    name=f"broker-dispatch-{key.name}",
                )
                group.create_task(key.limiter.keep_alive(), name=f"broker-keep-alive-{key.name}")

    def _spawn(self, coro: Any) -> None:
        if self._group is None:
            coro.close()
            raise BrokerClosedError("the broker's engine is not running")
        self._group.create_task(coro)

    def _engine_done(self, task: asyncio.Task[None]) -> None:
        self._group = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        # The TaskGroup wraps what killed it; callers get the cause itself (an OSError
        # from a failing budget store stays an OSError).
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        if isinstance(exc, StateUnavailableError | ConfigError) or (
            isinstance(exc, OSError) and exc.errno in _MACHINE_ERRNOS
        ):
            # A key-state store the config cannot use (Redis refusing the password: exit
            # 78), not a bug; an outage past its budget takes the keys out instead, but one
            # reaching here stops the engine as documented (exit 69). So is the machine's
            # trouble (a full disk or a read-only file under the key state, no open files
            # left: exit 74), whose message says what; not any OSError (a TimeoutError or
            # a ConnectionError that escaped is a bug, whose traceback the report needs).
            logger.error("broker.engine_stopped", reason=str(exc))
        else:
            # A bug: its report needs where it happened (masked as the rest of the log).
            logger.error("broker.task_crashed", error=repr(exc), exc_info=exc)
        self._stop(exc)

    def _stop(self, exc: BaseException) -> None:
        """The engine stopped: fail every waiter with ``exc`` instead of hanging them."""
        if self._stopped is not None:
            return
        self._stopped = exc
        if self._intake is not None:
            self._intake.fail_all(exc)
        for future in list(self._ops):
            if not future.done():
                future.set_exception(exc)
        for watch in list(self._stop_watches):
            watch.cancel()
        for receiver, producer in self._streams.items():
            if producer is None or producer.done():
                # Its input is all in: what it still waits for fails through the intake
                # above, and one with nothing left ends as it would have.
                continue
            receiver.end(exc)
            producer.cancel()

    def _authorizer(
        self,
        key: KeyConfig,
        transport: Transport,
        token_base: str | None,
        caches: dict[_Credential, CreatorsTokenCache],
    ) -> Authorizer:
        """``key``'s authorizer; a Creators key's token cache is taken from ``caches`` when
        an entry before it named the same credential (its id, secret, version and token
        URL: one account, whose one token serves both), else made and put there."""
        secret = key.secret or self._missing_secret(key)
        if self.config.api.protocol is Protocol.PAAPI5:
            return SigV4Authorizer(key.credential_id, secret, clock=self._clock)
        assert key.version is not None  # checked by the config loader
        url = token_url(
            key.version, token_base, as_given=self.config.api.token_endpoint is not None
        )
        # The secret too: an entry with the same id and another secret is refused alone.
        credential = (url, key.credential_id, key.version, secret)
        tokens = caches.get(credential)
        if tokens is None:
            tokens = caches[credential] = CreatorsTokenCache(
                key.credential_id,
                secret,
                key.version,
                token_url=url,
                send=transport.send,
                clock=self._clock,
            )
        return BearerAuthorizer(tokens)

    def _endpoint_label(self) -> str:
        return self.simulator_url or self.config.api.endpoint

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every task, fail what is still pending, close the session and simulator.

        Callers still waiting get :class:`~broker.errors.BrokerClosedError` (N15).

        Raises:
            WrongEventLoopError: called from another event loop than the one the broker was
                opened on; nothing is closed (its tasks belong to that loop).
        """
        self._check_loop()
        if self._closing is not None:
            # Another caller closes it: done when that close is, not before.
            await self._closing.wait()
            return
        self._closing = closed = asyncio.Event()
        try:
            opening = self._opening
            if opening is not None and not opening.done():
                # An open under way closes what it opened when it sees this close: done
                # when that is (it returned before anything was closed).
                await asyncio.wait((opening,))
            await self._close()
        finally:
            closed.set()

    async def _close(self) -> None:
        self._stop(BrokerClosedError("the broker was closed while this call waited"))
        engine, self._engine = self._engine, None
        try:
            if engine is not None and not engine.done():
                engine.cancel()
                # Waited for, not awaited: a cancellation of the caller arriving now must go
                # on (a timeout, a server's shutdown), not be taken for the engine's and
                # swallowed with it.
                await asyncio.wait((engine,))
        finally:
            self._ops.clear()
            # The streams' producers, cancelled by _stop, end before the session and the
            # loop do (a SyncBroker closes its loop next); bounded, as an input may ignore it.
            producers = [task for task in self._streams.values() if task is not None]
            if producers:
                await asyncio.wait(producers, timeout=_PRODUCER_EXIT_S)
            stack, self._stack = self._stack, None
            if stack is not None:
                await stack.aclose()

    # -- lookups ------------------------------------------------------------------------------

    def _check_loop(self) -> None:
        if self._loop is None or asyncio.get_running_loop() is self._loop:
            return
        if self._loop.is_closed():
            # Opened in one asyncio.run() and used in the next: "use that loop" cannot be done.
            raise WrongEventLoopError(
                "the event loop this Broker was opened on has ended (an asyncio.run() that "
                "returned): it cannot be used or closed from another; open the Broker in the "
                "loop that uses it (async with Broker(...) inside the coroutine asyncio.run "
                "runs), or use broker.SyncBroker, which keeps a loop of its own"
            )
        raise WrongEventLoopError(
            "this Broker was opened on another event loop; use it from that loop "
            "(or open one Broker per loop, or use broker.SyncBroker from threads)"
        )

    def _require_open(self) -> Intake:
        self._check_not_failed()
        if self._stopped is not None:
            if isinstance(self._stopped, BrokerClosedError):
                raise BrokerClosedError("the broker is closed")
            # Without its old traceback: re-raising one object would grow it on every call.
            raise self._stopped.with_traceback(None)
        if self._stack is None or self._intake is None:
            raise RuntimeError("use 'async with Broker(...)' before looking anything up")
        return self._intake

    def _check_not_failed(self) -> None:
        """Raise for another event loop, or for a broker whose ``async with`` failed (said
        before the close's own word: a failed open is often closed by a ``finally``)."""
        self._check_loop()
        if self._open_failed is not None:
            raise RuntimeError(self._failed_open_message())

    def _failed_open_message(self) -> str:
        return (
            f"this Broker failed to open ('async with' raised {self._open_failed}): make a "
            "new Broker once that is mended"
        )

    async def get_items(
        self,
        asins: Iterable[_Input],
        *,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
    ) -> list[ItemResult]:
        """Look up any number of ASINs; return one result per distinct query, in input order.

        A cached answer is served only within its max age when the call returns: one read
        at the start of a call that then waited for its other lookups, and aged past its
        limit meanwhile, is looked up again.

        Raises:
            NoUsableKeyError: every key that could serve the marketplace left rotation.
            TypeError: ``asins`` is a single string (use :meth:`get_item`).
        """
        intake = self._require_open()
        refuse_single_string(asins)
        results = await self._collect(intake, asins, marketplace, resources)
        stale = [i for i, result in enumerate(results) if not self.is_fresh(result)]
        while stale:
            # Each one's query is complete and distinct, so one answer each, in order.
            asked: list[_Input] = []
            for i in stale:
                query = results[i].query
                assert query is not None  # a cached answer always carries its query
                asked.append(query)
            again = await self._collect(intake, asked, marketplace, resources)
            for i, result in zip(stale, again, strict=True):
                results[i] = result
            stale = [i for i in stale if not self.is_fresh(results[i])]
        return results

    async def _collect(
        self,
        intake: Intake,
        asins: Iterable[_Input],
        marketplace: str | None,
        resources: Sequence[str] | None,
    ) -> list[ItemResult]:
        """One pass of :meth:`get_items`: each distinct query answered once, in input order."""
        resources = intake.resources(resources)
        collector = _Collector(asyncio.get_running_loop())
        held: list[Lookup] = []
        queries = [intake.complete(item, marketplace, resources) for item in asins]
        # One batched read of the item cache for the whole input (no-op without one), of
        # each distinct query once: an ASIN spelled three ways is one answer, one hit.
        distinct = {_slot_of(q): q for q in queries if isinstance(q, Query)}
        await intake.prefetch(list(distinct.values()))
        try:
            for query in queries:
                if isinstance(query, ItemResult):
                    assert query.query is not None
                    collector.add(_slot_of(query.query), query)
                    continue
                if collector.expect(_slot_of(query)):
                    hit = await intake.cached(query)
                    if hit is not None:
                        collector.receive(None, query, hit)
                        continue
                    lookup = intake.admit_now(query, collector)
                    held.append(lookup or await _admit_unless_failed(intake, query, collector))
            self._flush()
            return await collector.results()
        except BaseException:
            for lookup in held:
                lookup.detach(collector)
            collector.abandon()
            raise
        finally:
            intake.discard(queries)

    async def get_item(
        self,
        asin: str | Query,
        *,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
    ) -> ItemResult:
        """Look up one ASIN (a string or a :class:`Query`)."""
        (result,) = await self.get_items([asin], marketplace=marketplace, resources=resources)
        return result

    async def stream(
        self,
        asins: Iterable[_Input] | AsyncIterable[_Input],
        *,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[ItemResult, None]:
        """Yield one result per input as results complete, holding at most ``queue_size``.

        Each result's ``query`` is the input that asked for it (a :class:`Query`'s ``tag``
        comes back unchanged), so results never need matching back. The input is consumed
        lazily: an item is admitted only when fewer than ``queue_size`` of this stream's
        items are in flight or waiting to be yielded, so memory stays bounded however long
        the input and however slow the consumer. Hence an input mixing marketplaces stalls
        once ``queue_size`` of its items wait for a marketplace whose keys all wait (a daily
        quota spent): give each marketplace its own stream, as ``broker run`` does; the
        broker's room for outstanding lookups is per marketplace.

        ``stop``, once set, winds the stream down without losing an answer already paid
        for: nothing more is read from the input, the lookups not sent yet are let go (never
        sent for this stream, never yielded), and the stream ends when the answers of those
        already sent have been yielded. ``broker run`` sets it at its first SIGINT/SIGTERM/SIGHUP.

        Cancelling one wait for the next result (``asyncio.wait_for(anext(stream), t)``)
        ends the stream, as it ends any async generator: its lookups not yielded are let go
        and the next ``anext`` raises ``StopAsyncIteration``; bound the whole loop instead.

        An input that raises (a database cursor that fails) ends the stream with its error,
        raised after the answers for everything it gave before: those were asked for, and
        their requests are paid for or about to be. An item of the wrong type (TypeError)
        and the broker's own failures (:class:`~broker.errors.NoUsableKeyError`,
        :class:`~broker.errors.BrokerClosedError`) are raised at once.
        """
        intake = self._require_open()
        refuse_single_string(asins)
        if stop is not None and not isinstance(stop, asyncio.Event):
            # A threading.Event (SyncBroker.stream's) would block the loop in its wait().
            raise TypeError(
                f"stop must be an asyncio.Event, not {type(stop).__name__} (a threading.Event "
                "is for SyncBroker.stream)"
            )
        resources = intake.resources(resources)
        loop = asyncio.get_running_loop()
        receiver = _StreamReceiver(loop)
        caching = self._cache is not None
        # Admitted but not yet yielded: the producer waits here, so a slow consumer bounds
        # the finished results buffered for it too, not only the lookups in flight.
        window = Room(self.config.engine.queue_size)

        # Checked before each admission: ``stop`` set by the consumer takes effect at once,
        # before the watcher below has run.
        halted = stop.is_set if stop is not None else _never

        async def offer(query: Query | ItemResult) -> None:
            if not window.try_take():
                await self._room_in(window, receiver)
            if halted():
                return
            if isinstance(query, ItemResult):
                receiver.push(query)
                return
            hit = await intake.cached(query) if caching else None
            if hit is not None:
                receiver.push(hit)
                return
            lookup = intake.admit_now(query, receiver)
            receiver.expect(lookup or await intake.admit(query, receiver))

        def place(item: _Input) -> Query | None:
            # The hot path without a cache: no coroutine per item. Returns the query when
            # the intake is full, for the caller to wait for room.
            query = intake.complete(item, marketplace, resources)
            if isinstance(query, ItemResult):
                receiver.push(query)
                return None
            lookup = intake.admit_now(query, receiver)
            if lookup is None:
                return query
            receiver.expect(lookup)
            return None

        async def produce() -> None:
            # True while the input itself is being read: an Exception raised then is the
            # input failing (a database cursor), not this loop's or the broker's.
            reading = True
            # Admissions without a wait, counted to yield to the loop once per batch's worth.
            batch_size = self.config.engine.batch_size
            taken = 0
            try:
                if caching:
                    # Read the cache a chunk at a time: one batched read per chunk.
                    chunks = (
                        _chunks(
                            asins,
                            _CACHE_CHUNK,
                            linger_s=self.config.engine.linger_s,
                            clock=self._clock,
                        )
                        if isinstance(asins, AsyncIterable)
                        else _each(_runs(asins, _CACHE_CHUNK))
                    )
                    # Closed here, not when collected: its reader task ends with the stream.
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            reading = False
                            queries = [intake.complete(i, marketplace, resources) for i in chunk]
                            await intake.prefetch(queries)
                            try:
                                for query in queries:
                                    if halted():
                                        break
                                    await offer(query)
                            finally:
                                intake.discard(queries)
                            if halted():
                                break
                            if len(chunk) < _CACHE_CHUNK:
                                # A chunk its linger handed on: the input trickles, so the
                                # batches would only linger again for more.
                                self._flush()
                            reading = True
                elif isinstance(asins, AsyncIterable):
                    async for item in asins:
                        reading = False
                        if not window.try_take():
                            await self._room_in(window, receiver)
                        elif (taken := taken + 1) % batch_size == 0:
                            # As below: an async input that never awaits (rows already in
                            # memory) would otherwise never let another stream read.
                            await asyncio.sleep(0)
                        # halted(), without a call when there is no stop: once per item.
                        if stop is not None and stop.is_set():
                            break
                        if (waiting := place(item)) is not None:
                            receiver.expect(await intake.admit(waiting, receiver))
                        reading = True
                else:
                    # A plain iterable is read here, not through an async generator.
                    for item in asins:
                        reading = False
                        if not window.try_take():
                            await self._room_in(window, receiver)
                        elif (taken := taken + 1) % batch_size == 0:
                            # A batch's worth read with room to spare: let other streams
                            # (broker run's, one per marketplace) read theirs, so that keys
                            # get their batches in turn rather than one stream's window first.
                            await asyncio.sleep(0)
                        # halted(), without a call when there is no stop: once per item.
                        if stop is not None and stop.is_set():
                            break
                        if (waiting := place(item)) is not None:
                            receiver.expect(await intake.admit(waiting, receiver))
                        reading = True
                self._flush()
            except Exception as exc:
                if reading:
                    # What the input gave before it failed is answered (it was asked for,
                    # and its requests are paid for or about to be), then its error.
                    self._flush()
                    receiver.end(exc, after_answers=True)
                else:
                    # A wrong item type or the broker's own failure: told at once.
                    receiver.end(exc)
                raise
            except BaseException as exc:
                receiver.end(exc)
                raise
            receiver.end(None)

        # Stopped before it began: nothing is read from the input at all.
        producer = None if halted() else loop.create_task(produce())
        if producer is None:
            receiver.end(None)
        self._streams[receiver] = producer
        stopper: asyncio.Task[object] | None = None
        if stop is not None:

            def wind_down(waited: asyncio.Task[object]) -> None:
                if waited.cancelled():
                    return  # the stream ended first
                # The producer is cancelled before its next admission (or before it starts:
                # hence end() here too); shedding leaves only the lookups already sent.
                if producer is not None:
                    producer.cancel()
                receiver.end(None)
                receiver.shed()

            stopper = loop.create_task(stop.wait())
            stopper.add_done_callback(wind_down)
            self._stop_watches.add(stopper)
            stopper.add_done_callback(self._stop_watches.discard)
        try:
            while True:
                result = receiver.take()
                if result is None:
                    if await receiver.wait():
                        continue
                    break
                window.give()
                yield result
        finally:
            if stopper is not None:
                stopper.cancel()
            if producer is not None:
                if not producer.done():
                    producer.cancel()
                    # Waited for, not awaited: a cancellation of the consumer arriving now
                    # must go on, not be taken for the producer's.
                    await asyncio.wait((producer,))
                if not producer.cancelled():
                    producer.exception()  # it reached the receiver already: seen
            receiver.leave()
            self._streams.pop(receiver, None)

    def _flush(self) -> None:
        """End of a caller's input: send its partial batches now instead of lingering."""
        if self._batcher is not None:
            self._batcher.flush()

    async def _room_in(self, window: Room, receiver: _StreamReceiver) -> None:
        """Wait for room in a stream's ``window`` (``queue_size``), sending the partial
        batches first when every lookup holding it lingers in one, with no answer waiting
        to be yielded: none could end, and make room, before its linger runs out (a
        ``queue_size`` below ``batch_size``, or a window of the same few ASINs), as
        :meth:`Intake.admit` finds for the broker's own room."""
        if self._batcher is not None and receiver.only_lingering():
            self._batcher.flush()
        await window.take()

    async def _operation(
        self, operation: Operation, params: Mapping[str, object], marketplace: str | None
    ) -> Mapping[str, object]:
        self._require_open()
        assert self._pool is not None
        # Named as a lookup may name it ("UK", "amazon.co.uk"); an unknown name is a
        # ValueError here, before anything is sent.
        market = (
            self.config.api.marketplace
            if marketplace is None
            else lookup_marketplace(marketplace).name  # "" too: unknown, not the default
        )
        self._pool.check_servable(market)
        future: asyncio.Future[Mapping[str, object]] = asyncio.get_running_loop().create_future()
        self._ops.add(future)
        future.add_done_callback(self._ops.discard)
        batch = Batch(market, operation=operation, params=dict(params), op_future=future)
        work = self._work

        def let_go(done: asyncio.Future[Mapping[str, object]]) -> None:
            # The caller gave up (a timeout, a cancellation): the batch leaves the queue at
            # once, as an abandoned lookup's does, rather than wait there (and be counted
            # as work) until a key could send it, a daily reset away.
            if done.cancelled() and work is not None:
                work.discard(batch)

        future.add_done_callback(let_go)
        # Ahead of GetItems work: a search must not wait out another caller's bulk job.
        self._pool.submit(batch, ahead=True)
        return await future

    async def search_items(
        self,
        keywords: str | None = None,
        /,
        *,
        marketplace: str | None = None,
        **options: Unpack[SearchOptions],
    ) -> SearchResult:
        """SearchItems with snake_case options (``keywords=``, ``search_index=``, ``item_count=``).

        The keywords may come first without their name, as python-amazon-paapi takes them
        (``search_items("kettle")``). Every option is checked before anything is sent;
        ``resources`` (either spelling) default to the config's. See
        :class:`~broker.api.operations.SearchOptions`.

        Raises:
            TypeError, ValueError: an unknown option or a bad value (the message names it),
                keywords given twice, or a marketplace that is not Amazon's.
            ApiError: Amazon refused the search (``NoResults`` included).
            NoUsableKeyError: no key can serve the marketplace.
            TransportError, ResponseError: the last failure, once the retries did not get
                past it (timeouts, resets, an unreadable answer each time).
        """
        from broker.api import operations

        protocol = self.config.api.protocol
        params = operations.search_params(
            operations.with_keywords(keywords, options),
            protocol=protocol,
            default_resources=self.config.api.resources,
        )
        raw = await self._operation(Operation.SEARCH_ITEMS, params, marketplace)
        return operations.read_search(raw, protocol)

    async def get_variations(
        self, asin: str, *, marketplace: str | None = None, **options: Unpack[VariationsOptions]
    ) -> VariationsResult:
        """GetVariations of one ASIN (``variation_count=``, ``variation_page=``...), typed.

        A product URL is asked in its own store unless ``marketplace`` names one.

        Raises:
            TypeError, ValueError: an invalid ASIN, an unknown option or a bad value, or a
                marketplace (or a link's store) that is not Amazon's.
            NoUsableKeyError: no key can serve the marketplace (none has a tag there).
            ApiError: Amazon refused the request.
            TransportError, ResponseError: the last failure, once the retries did not get
                past it (timeouts, resets, an unreadable answer each time).
        """
        from broker.api import operations

        protocol = self.config.api.protocol
        params = operations.variations_params(
            asin, options, protocol=protocol, default_resources=self.config.api.resources
        )
        if marketplace is None:
            # A product URL is asked in its own store (amazon.co.uk), as get_items does,
            # unless the call names one; a plain ASIN takes the config's.
            marketplace = check_asin(asin).store
        raw = await self._operation(Operation.GET_VARIATIONS, params, marketplace)
        return operations.read_variations(raw, protocol)

    async def get_browse_nodes(
        self,
        browse_node_ids: Iterable[str | int],
        *,
        marketplace: str | None = None,
        **options: Unpack[BrowseNodesOptions],
    ) -> BrowseNodesResult:
        """GetBrowseNodes for 1 to 10 ids, with ancestors and children unless told otherwise.

        Raises:
            TypeError, ValueError: bad ids, an unknown option or a bad value.
            NoUsableKeyError: no key can serve the marketplace.
            ApiError: Amazon refused the request.
            TransportError, ResponseError: the last failure, once the retries did not get
                past it (timeouts, resets, an unreadable answer each time).
        """
        from broker.api import operations

        protocol = self.config.api.protocol
        params = operations.browse_nodes_params(browse_node_ids, options, protocol=protocol)
        raw = await self._operation(Operation.GET_BROWSE_NODES, params, marketplace)
        return operations.read_browse_nodes(raw, protocol)

    # -- introspection ------------------------------------------------------------------------

    async def cache_stats(self) -> CacheStats | None:
        """The item cache's hits, misses, requests saved, entries, bytes and evictions.

        None when the cache is off (``[cache] max_age_s`` 0, the library's default).
        Asked of an open broker: the store is closed with it.

        Raises:
            BrokerClosedError: the broker is closed.
            BrokerError: the store failed a moment ago and is left alone meanwhile (a
                minute); the store's own error when asking it fails.
        """
        self._check_not_failed()
        if self._closing is not None:
            raise BrokerClosedError("the broker is closed")
        if self._stack is None:
            raise RuntimeError("use 'async with Broker(...)' before asking for cache_stats()")
        # Not the engine's stop (a lost key-state store): the cache may answer still, and
        # a caller reading figures must not take the engine's failure for the cache's.
        if self._cache is None:
            return None
        return await self._cache.stats()

    def is_fresh(self, result: ItemResult) -> bool:
        """False for an answer served from the item cache that has aged past its max age
        since it was read: a caller that holds answers before handing them on (prints them
        once all are in) asks such a one again, as :meth:`get_items` does by itself, or a
        long wait would stretch Amazon's 24-hour rule. True for every other answer, and
        when the cache is off."""
        return not (result.cached and self._cache is not None and not self._cache.fresh(result))

    @property
    def clock(self) -> Clock:
        """The clock the broker reads and sleeps on: its wall time is the one the keys'
        daily resets are told in."""
        return self._clock

    def metrics(self) -> MetricsSnapshot:
        """Counters and per-key state right now.

        Raises:
            WrongEventLoopError: read from another thread (or loop) while the broker's loop
                runs: its queues change under the read (a bare "deque mutated during
                iteration", now and then). ``SyncBroker.metrics()`` reads it from any
                thread. Once that loop has stopped, any thread may read it.
        """
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                raise WrongEventLoopError(
                    "metrics() read from another thread than the one running this Broker's "
                    "event loop: read it in that loop (loop.call_soon_threadsafe), or use "
                    "broker.SyncBroker, whose metrics() any thread may call"
                )
        work = self._work
        return self._metrics.snapshot(
            queued_batches=len(work) if work is not None else 0,
            outstanding_lookups=len(self._intake) if self._intake is not None else 0,
            keys=tuple(key.snapshot() for key in self._keys),
            waiting_markets=work.marketplaces() if work is not None else (),
            engine_stopped=None if (error := self.engine_error) is None else _stop_reason(error),
        )

    @property
    def engine_error(self) -> BaseException | None:
        """What stopped the engine: a crash of one of its tasks (a bug), a key-state store
        the config cannot use, the machine's trouble (a full disk under the key state, the
        process out of open files: an OSError), or a proxy variable that is no HTTP proxy
        URL (a ConfigError at the first request through it); None while it runs, and after a
        close that found it running (a close keeps what stopped it before).

        Every call raises it from then on: a long-lived process (a web app) makes a new
        broker once the cause is mended. A process that holds the broker between calls (a
        daemon, idle) reads it to stop at once, instead of at its next call.
        """
        stopped = self._stopped
        return None if isinstance(stopped, BrokerClosedError) else stopped

    def _check_composition(self, config: BrokerConfig) -> None:
        """Refuse, when the broker is built, what the layer composing it cannot use (the
        client's: a bad ``[simulator]`` table). The engine itself has nothing to add."""

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError(NOT_PICKLED.format(name="Broker"))

    def __repr__(self) -> str:
        if self._stack is not None:
            state = "open"
        elif self._open_failed is not None:
            state = "failed to open"
        else:
            state = "closed" if self._loop is not None else "not opened"
        return f"Broker({state}, keys={[k.name for k in self.config.keys]})"


#: Why a broker is not pickled (for a process pool): its loop, connections and key state
#: are this process's; a worker makes its own.
NOT_PICKLED: Final = (
    "a {name} cannot be pickled: start one in each process (a pool's initializer), from the "
    "same config file ({name}.from_config(path): a config holding a secret is not pickled "
    "either)"
)


def _stop_reason(exc: BaseException) -> str:
    """Why the engine stopped, in a line an HTTP answer (``/readyz``) may show: a store it
    cannot use says so itself; a crash names its exception. Credentials masked."""
    if isinstance(exc, StateUnavailableError | ConfigError):
        return scrub(str(exc))
    return scrub(f"{type(exc).__name__}: {exc}")


#: A ``get_items`` result slot: one per lookup identity, and one per tagged query (a tag
#: names the caller's row, so two rows asking one ASIN get a result each).
_Slot = Ident | tuple[Ident, int]


def _slot_of(query: Query) -> _Slot:
    ident = ident_of(query)
    return ident if query.tag is None else (ident, id(query))


async def _admit_unless_failed(intake: Intake, query: Query, collector: _Collector) -> Lookup:
    """Admit ``query`` for ``collector``'s call, waiting for room, unless the call fails
    first: a lookup it admitted already failing (its store's last key gone) raises that at
    once. The call fails anyway, and the room it waited for may be held for hours by
    another store's lookups waiting for their quota (or it would send them for nothing).
    """
    failed = collector.failed
    if failed.done():
        raise failed.exception() or asyncio.CancelledError()
    admitting = asyncio.ensure_future(intake.admit(query, collector))
    try:
        await asyncio.wait((admitting, failed), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # The caller was cancelled meanwhile: a lookup admitted at that very moment is let
        # go (it reached no ``held`` list), and an admission still waiting ends.
        _let_go(admitting, collector)
        raise
    if admitting.done():
        return admitting.result()
    _let_go(admitting, collector)
    raise failed.exception() or asyncio.CancelledError()


def _let_go(admitting: asyncio.Future[Lookup], collector: _Collector) -> None:
    """End an admission the call no longer waits for: cancelled if still waiting (its room
    handed on); a lookup it admitted anyway, now or later, detached from the call; its
    error read, so asyncio does not report it as never retrieved."""

    def settle(task: asyncio.Future[Lookup]) -> None:
        if not task.cancelled() and task.exception() is None:
            task.result().detach(collector)

    if admitting.done():
        settle(admitting)
    else:
        admitting.cancel()
        admitting.add_done_callback(settle)


class _Collector:
    """The receiver of one ``get_items`` call: one slot per distinct query, one future."""

    __slots__ = ("_done", "_future", "_input_done", "_remaining", "_slots", "_values")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._slots: dict[_Slot, int] = {}
        self._values: list[ItemResult | None] = []
        self._remaining = 0
        self._input_done = False
        self._future: asyncio.Future[None] = loop.create_future()
        self._done = False

    @property
    def failed(self) -> asyncio.Future[None]:
        """Done once a lookup of the call failed (while the input is admitted, only then)."""
        return self._future

    def add(self, slot: _Slot, result: ItemResult) -> None:
        """An answer known at once (invalid id, unknown marketplace)."""
        if slot not in self._slots:
            self._slots[slot] = len(self._values)
            self._values.append(result)

    def expect(self, slot: _Slot) -> bool:
        """Reserve the slot of a query; False if the same query was already asked."""
        if slot in self._slots:
            return False
        self._slots[slot] = len(self._values)
        self._values.append(None)
        self._remaining += 1
        return True

    def receive(
        self, lookup: Lookup | None, query: Query, outcome: ItemResult | BaseException
    ) -> None:
        """A lookup of this call ended (``lookup`` None: answered from the item cache)."""
        if self._future.done():
            return
        if isinstance(outcome, BaseException):
            self._future.set_exception(outcome.with_traceback(None))
            return
        self._values[self._slots[_slot_of(query)]] = outcome
        self._remaining -= 1
        if self._input_done and self._remaining == 0:
            self._future.set_result(None)

    def abandon(self) -> None:
        """The call ends without waiting for its results (it raised while admitting): an
        error a lookup set meanwhile is taken as seen, so asyncio does not log it as never
        retrieved."""
        if self._future.done():
            if not self._future.cancelled():
                self._future.exception()
        else:
            self._future.cancel()

    async def results(self) -> list[ItemResult]:
        """Wait for every slot (the input is complete) and return them in input order."""
        self._input_done = True
        if self._remaining == 0 and not self._future.done():
            self._future.set_result(None)
        await self._future
        return [value for value in self._values if value is not None]


class _StreamReceiver:
    """The receiver of one ``stream``: results queue up for the consumer as they arrive."""

    __slots__ = (
        "_error",
        "_held",
        "_input_done",
        "_input_error",
        "_loop",
        "_pending",
        "_ready",
        "_waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: collections.deque[ItemResult | BaseException] = collections.deque()
        # Lookups this stream waits for, with how many of its inputs asked each: detached
        # when the consumer stops early, so an abandoned stream holds nothing.
        # A plain dict, not a Counter: a Counter's miss is a Python-level __missing__ call,
        # once per admitted input.
        self._held: dict[Lookup, int] = {}
        self._pending = 0
        self._input_done = False
        self._error: BaseException | None = None
        # The input's own failure: raised once every lookup admitted before it has ended.
        self._input_error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def expect(self, lookup: Lookup) -> None:
        """The producer admitted one more input, answered by ``lookup``."""
        held = self._held
        held[lookup] = held.get(lookup, 0) + 1
        self._pending += 1

    def only_lingering(self) -> bool:
        """True when no answer waits to be yielded and every lookup this stream waits for
        lingers in a partial batch (the oldest, likely sent, are looked at first)."""
        if self._ready:
            return False
        return all(
            lookup.batch is not None and lookup.batch.place is BatchPlace.LINGERING
            for lookup in self._held
        )

    def push(self, result: ItemResult) -> None:
        """An answer known at once (invalid id, unknown marketplace)."""
        self._ready.append(result)
        self._wake()

    def receive(self, lookup: Lookup, query: Query, outcome: ItemResult | BaseException) -> None:
        """A lookup of this stream ended."""
        count = self._held.pop(lookup, 0)
        if count > 1:
            self._held[lookup] = count - 1
        self._pending -= 1
        self._ready.append(outcome)
        # _wake, written out: once per ASIN.
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def end(self, error: BaseException | None, *, after_answers: bool = False) -> None:
        """The producer is done (``error``: it failed; ``after_answers``: the input failed,
        and its error comes after the answers of everything admitted before)."""
        self._input_done = True
        if error is not None and not isinstance(error, asyncio.CancelledError):
            if after_answers:
                self._input_error = error
            else:
                self._error = error
        self._wake()

    def take(self) -> ItemResult | None:
        """The next result if one is ready (None: :meth:`wait`); raises a failure.

        Raises:
            the lookup's or the producer's error, as the stream's consumer must see it.
        """
        if self._ready:
            item = self._ready.popleft()
            if isinstance(item, BaseException):
                raise item.with_traceback(None)
            return item
        if self._error is not None:
            raise self._error
        if self._input_error is not None and self._pending <= 0:
            raise self._input_error
        return None

    async def wait(self) -> bool:
        """Wait until a result is ready (True), or the stream has ended (False); True too
        when only the input's error is left to raise."""
        while not self._ready and self._error is None:
            if self._input_done and self._pending <= 0:
                return self._input_error is not None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    def shed(self) -> None:
        """Let go of the lookups not sent yet (lingering, queued, taken by a key whose send
        is still being booked, or waiting out a retry delay); wait for those being sent only
        while they are: one whose batch comes back (a 429, a retry) is let go then."""
        for lookup in list(self._held):
            batch = lookup.batch
            if batch is not None and batch.place is not BatchPlace.ACTIVE:
                self.let_go(lookup)
            elif lookup.leaving is None:
                lookup.leaving = [self]
            else:
                lookup.leaving.append(self)
        self._wake()

    def let_go(self, lookup: Lookup) -> None:
        """Stop waiting for ``lookup``: it is never yielded by this stream."""
        count = self._held.pop(lookup, 0)
        if count:
            self._pending -= count
            lookup.detach(self)
            self._wake()

    def leave(self) -> None:
        """The consumer stopped: let go of every lookup still held."""
        held, self._held = self._held, {}
        for lookup in held:
            lookup.detach(self)


def _never() -> bool:
    return False


def _runs(items: Iterable[_Input], size: int) -> Iterator[list[_Input]]:
    """``items`` (read at once, a list or a generator) in lists of ``size``; an input that
    fails has what it gave before yielded first, then its error raised."""
    run: list[_Input] = []
    try:
        for item in items:
            run.append(item)
            if len(run) >= size:
                yield run
                run = []
    except Exception:
        if run:
            yield run
        raise
    if run:
        yield run


async def _chunks(
    items: AsyncIterable[_Input], size: int, *, linger_s: float, clock: Clock
) -> AsyncGenerator[list[_Input], None]:
    """``items`` in lists of up to ``size``, each handed on once full, once the input has
    ended, or ``linger_s`` after its first item came, whichever is first.

    An async input may trickle: a queue that the stream's own answers refill (a crawler)
    would wait forever for a full list, and a slow cursor would hold every answer back
    until a hundred rows came. One task reads the input, never more than ``size`` items
    ahead of what the caller has finished with (an input that gives its items without
    waiting is read in one go, with no task or wake-up per item). An input that fails has
    what it gave before yielded first, then its error raised.
    """
    buffer: collections.deque[_Input] = collections.deque()
    changed = asyncio.Event()  # an item came, the input ended, or the linger ran out
    room = asyncio.Event()
    room.set()
    ended = False
    lingered = False
    failure: Exception | None = None
    first_at = 0.0  # when the oldest item in the buffer came
    held = 0  # items of the list the caller is working on

    async def read() -> None:
        nonlocal ended, failure, first_at
        source = aiter(items)
        try:
            while True:
                # Room first, then the next item: nothing is taken from the input that
                # the caller may never ask for, and an item's arrival time is its own.
                while len(buffer) + held >= size:
                    room.clear()
                    await room.wait()
                item = await anext(source, _END)
                if isinstance(item, _End):
                    break
                if not buffer:
                    first_at = clock.monotonic()
                buffer.append(item)
                changed.set()
        except Exception as exc:
            failure = exc
        finally:
            ended = True
            changed.set()

    async def linger() -> None:
        nonlocal lingered
        await clock.sleep(first_at + linger_s - clock.monotonic())
        lingered = True
        changed.set()

    loop = asyncio.get_running_loop()
    reader = loop.create_task(read())
    try:
        while True:
            while not buffer and not ended:
                changed.clear()
                await changed.wait()
            if not buffer:
                break
            if len(buffer) < size and not ended:
                lingered = False
                timer = loop.create_task(linger())
                try:
                    while len(buffer) < size and not ended and not lingered:
                        changed.clear()
                        await changed.wait()
                finally:
                    # Waited for, not awaited: a cancellation of this task arriving now
                    # must go on, not be taken for the timer's own.
                    timer.cancel()
                    await asyncio.wait((timer,))
            chunk = list(buffer)
            buffer.clear()
            held = len(chunk)
            yield chunk
            held = 0
            room.set()
        if failure is not None:
            raise failure
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait((reader,))


class _End:
    """The end of an async input, as :func:`anext`'s default (a type of its own, so the
    check narrows what was read to an input item)."""


_END = _End()


async def _each(runs: Iterator[list[_Input]]) -> AsyncGenerator[list[_Input], None]:
    """``runs`` as an async generator: the shape the stream's cache path reads."""
    for run in runs:
        yield run
