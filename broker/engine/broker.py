"""The library API: ``async with Broker(...)``, then get_items / stream / get_item and friends.

The broker owns every task of a run (batcher, one dispatcher per key, in-flight sends) in
one TaskGroup, one HTTP session, and, when the config's endpoint is ``simulator``, an
in-process simulator on a free loopback port. Lookups are validated before anything is
sent, deduplicated per (marketplace, ASIN, resources) across every caller, batched, and
dispatched to the key that can send soonest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import random
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog

from broker.api.base import Dialect, Operation
from broker.api.creators import CreatorsDialect
from broker.api.marketplaces import token_url
from broker.api.paapi5 import PaapiDialect
from broker.asin import check_asin
from broker.clock import Clock, LoopClock
from broker.config import AMAZON, BrokerConfig, KeyConfig, load_config
from broker.engine.authorizer import Authorizer, BearerAuthorizer, SigV4Authorizer
from broker.engine.batcher import Batch, Batcher, Lookup, WorkQueue
from broker.engine.executor import Executor
from broker.engine.keys import KeyState
from broker.engine.metrics import EngineMetrics, MetricsSnapshot
from broker.engine.retry import RetryPolicy
from broker.engine.shared_limiter import SharedKeyLimiter, SharedState
from broker.engine.transport import AiohttpTransport, Transport
from broker.errors import ConfigError, describe
from broker.models import ErrorDetail, ItemResult, Protocol, Query, Secret, Status
from broker.state import KeyStateStore, open_store, process_id

if TYPE_CHECKING:
    from broker.engine.quota import BudgetStore

__all__ = ["Broker", "Query"]

logger = structlog.get_logger("broker")


_Input = str | Query


class Broker:
    """Looks up any number of ASINs as fast as the configured keys allow.

    Example::

        async with Broker.from_config("config.toml") as broker:
            results = await broker.get_items(["B0C1234567", "B0D7654321"])
            async for result in broker.stream(asin_iter):
                ...

    Per-ASIN failures are results (``status`` + ``error``). Exceptions are for misuse,
    configuration (:class:`~broker.errors.ConfigError`) and the case where no key can
    serve a marketplace (:class:`~broker.errors.NoUsableKeyError`, naming each key's
    failure).

    Args:
        config: the validated configuration.
        clock: time source (tests pass a FakeClock); default the running loop's clock.
        transport: HTTP transport (tests pass a MockTransport); default aiohttp.
        rng: randomness for jitter (seed it for reproducible runs).
        budget_store: where daily request counters persist, for a caller that keeps its
            own counts (then, unless ``state_store`` is given too, the keys' state stays
            in this process: the job runner and daemon, until they move to the state store).
        state_store: where keys' shared state lives (rate, daily count, pauses, circuit);
            default: the store ``config.state`` names, opened and closed by the broker.
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
    ) -> None:
        self.config = config
        self._state_store = state_store
        self._clock: Clock = clock or LoopClock()
        self._given_transport = transport
        self._rng = rng or random.Random()
        self._budget_store = budget_store
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight: dict[tuple[str, str, tuple[str, ...]], Lookup] = {}
        #: pending SearchItems / GetVariations / GetBrowseNodes answers
        self._ops: set[asyncio.Future[Mapping[str, object]]] = set()
        self._capacity: asyncio.Semaphore | None = None
        self._metrics = EngineMetrics()
        self._keys: list[KeyState] = []
        self._executor: Executor | None = None
        self._batcher: Batcher | None = None
        self._work: WorkQueue | None = None
        self.simulator_url: str | None = None
        #: why an engine task died (a bug, or e.g. the budget store's disk failing)
        self._crash: BaseException | None = None

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str] = "config.toml",
        *,
        environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Broker:
        """Build a broker from a config file (secrets from ``environ``, default os.environ)."""
        return cls(load_config(path, environ=environ), **kwargs)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Broker:
        if self._stack is not None:
            raise RuntimeError("a Broker can be entered only once")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        logger.info(
            "broker.started",
            keys=[k.name for k in self._keys],
            protocol=self.config.api.protocol.value,
            endpoint=self._endpoint_label(),
        )
        return self

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        base_url: str | None = None
        if config.api.uses_simulator:
            from broker.simulator.server import SimulatorServer

            server = await stack.enter_async_context(SimulatorServer(config.simulator))
            base_url = server.url
            self.simulator_url = server.url
        elif config.api.endpoint != AMAZON:
            base_url = config.api.endpoint
        transport = self._given_transport
        if transport is None:
            engine = config.engine
            transport = await stack.enter_async_context(
                AiohttpTransport(
                    timeout_s=engine.request_timeout_s,
                    connect_timeout_s=engine.connect_timeout_s,
                    max_body_bytes=engine.max_body_bytes,
                    max_connections=engine.max_connections,
                )
            )
        dialect: Dialect
        if config.api.protocol is Protocol.CREATORS:
            dialect = CreatorsDialect(base_url) if base_url else CreatorsDialect()
        else:
            dialect = PaapiDialect(base_url)
        token_base = config.api.token_endpoint or base_url
        # A caller that passes its own budget store (the job runner and daemon, until they
        # move their daily counts to the state store) keeps the in-process limiter.
        shared = (
            None
            if self._budget_store is not None and self._state_store is None
            else self._open_state(stack, base_url)
        )
        self._work = WorkQueue()
        self._keys = [
            KeyState.from_config(
                key,
                self._authorizer(key, transport, token_base),
                config=config,
                clock=self._clock,
                rng=self._rng,
                budget_store=self._budget_store,
                shared=shared,
            )
            for key in config.keys
        ]
        for key in self._keys:
            if isinstance(key.limiter, SharedKeyLimiter):
                stack.push_async_callback(key.limiter.aclose)
        retry = config.retry
        policy = RetryPolicy(
            max_attempts=retry.max_attempts,
            max_age_s=retry.max_age_s,
            base_delay_s=retry.base_delay_s,
            max_delay_s=retry.max_delay_s,
            retry_after_cap_s=config.rate.retry_after_cap_s,
            random=self._rng.random,
        )
        self._executor = Executor(
            dialect=dialect,
            transport=transport,
            work=self._work,
            keys=self._keys,
            policy=policy,
            clock=self._clock,
            metrics=self._metrics,
            spawn=self._spawn,
        )
        self._batcher = Batcher(
            self._work,
            clock=self._clock,
            batch_size=config.engine.batch_size,
            linger_s=config.engine.linger_s,
        )
        self._capacity = asyncio.Semaphore(config.engine.queue_size)
        self._spawn(self._batcher.run())
        for key in self._keys:
            self._spawn(self._dispatch(key))

    def _authorizer(
        self, key: KeyConfig, transport: Transport, token_base: str | None
    ) -> Authorizer:
        secret = key.secret or self._simulator_secret(key)
        if self.config.api.protocol is Protocol.PAAPI5:
            return SigV4Authorizer(key.credential_id, secret, clock=self._clock)
        assert key.version is not None  # checked by the config loader
        url = token_url(key.version, token_base)
        return BearerAuthorizer(
            key.credential_id,
            secret,
            key.version,
            token_url=url,
            send=transport.send,
            clock=self._clock,
        )

    def _simulator_secret(self, key: KeyConfig) -> Secret:
        """The embedded simulator's own secret for a key whose secret env var is unset."""
        from broker.simulator.accounts import simulator_secret

        value = simulator_secret(
            self.config.api.protocol.value, key.credential_id, self.config.simulator
        )
        if value is None:
            raise ConfigError(
                f"keys.{key.name}",
                f"no secret for credential {key.credential_id!r}: set "
                f"{key.secret_source or 'credential_secret_env'} or add the account to [simulator]",
            )
        return Secret(value)

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
        """Stop every task, fail what is still pending, close the session and simulator."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for lookup in list(self._inflight.values()):
            if not lookup.future.done():
                lookup.future.cancel()
        self._inflight.clear()
        for future in list(self._ops):
            future.cancel()
        self._ops.clear()
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        logger.error("broker.task_crashed", error=repr(exc))
        self._crashed(exc)

    def _crashed(self, exc: BaseException) -> None:
        """An engine task died: fail every waiter with its exception instead of hanging them.

        A dead dispatcher or batcher would otherwise leave every caller waiting forever.
        The exception is re-raised to callers as it is (an ``OSError`` from a failing
        budget store stays an ``OSError``), and every later call raises it too.
        """
        if self._crash is not None:
            return
        self._crash = exc
        for lookup in list(self._inflight.values()):
            if not lookup.future.done():
                lookup.future.set_exception(exc)
        for future in list(self._ops):
            if not future.done():
                future.set_exception(exc)

    def _open_state(self, stack: contextlib.AsyncExitStack, base_url: str | None) -> SharedState:
        """The keys' shared state: the given store, or the one ``[state]`` names."""
        store = self._state_store
        if store is None:
            clock = self._clock
            store = open_store(
                self.config.state,
                now_us=lambda: int(clock.monotonic() * 1_000_000),
                wall=lambda: int(clock.utcnow().timestamp() * 1_000_000),
            )
            stack.push_async_callback(store.aclose)
        # Key identity includes the endpoint: embedded simulators (one port per process)
        # never share a key, while every process talking to Amazon does.
        endpoint = base_url or f"{AMAZON}:{self.config.api.protocol.value}"
        return SharedState(store, endpoint, process_id())

    # -- dispatch -----------------------------------------------------------------------------

    async def _dispatch(self, key: KeyState) -> None:
        """One key's loop: wait for a slot, take the oldest batch it can serve, send it."""
        assert self._work is not None
        assert self._executor is not None
        work = self._work
        executor = self._executor
        while True:
            await key.acquire_slot()
            try:
                await key.wait_ready()
                batch = await work.get(key.active_marketplaces)
                if not key.serves(batch.marketplace):
                    executor.requeue(batch)
                    key.release_slot()
                    continue
                demand_limited = work.has_work_for(key.active_marketplaces())
                sent_at = await key.try_send()
                if sent_at is None:
                    # The daily budget is spent: the key waits for its window to reset.
                    executor.requeue(batch)
                    key.release_slot()
                    continue
            except BaseException:
                key.release_slot()
                raise
            self._spawn(self._send(key, batch, sent_at, demand_limited))

    async def _send(
        self, key: KeyState, batch: Batch, sent_at: float, demand_limited: bool
    ) -> None:
        assert self._executor is not None
        try:
            with structlog.contextvars.bound_contextvars(key=key.name, batch_id=batch.batch_id):
                await self._executor.run(key, batch, sent_at, demand_limited)
        finally:
            key.release_slot(sent=True)

    # -- lookups ------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._crash is not None:
            # Without its old traceback: re-raising one object would grow it on every call.
            raise self._crash.with_traceback(None)
        if self._stack is None or self._batcher is None or self._executor is None:
            raise RuntimeError("use 'async with Broker(...)' before looking anything up")

    def _query(
        self, item: _Input, marketplace: str | None, resources: Sequence[str] | None
    ) -> Query:
        if isinstance(item, Query):
            return Query(
                item.asin,
                item.marketplace or marketplace,
                item.resources
                if item.resources is not None
                else (tuple(resources) if resources is not None else None),
            )
        if not isinstance(item, str):
            raise TypeError(f"expected an ASIN string or a Query, got {type(item).__name__}")
        return Query(item, marketplace, tuple(resources) if resources is not None else None)

    async def _submit(self, query: Query) -> tuple[asyncio.Future[ItemResult], Lookup | None]:
        """Admit one query (waiting for capacity); return its result's future and lookup.

        The lookup (None for an id that is invalid and never sent) is shared by every
        caller who asks for it; each caller that gives up early must :meth:`_abandon` it.
        """
        self._require_open()
        assert self._capacity is not None
        assert self._batcher is not None
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        marketplace = query.marketplace or self.config.api.marketplace
        resources = query.resources if query.resources is not None else self.config.api.resources
        verdict = check_asin(query.asin)
        if verdict.asin is None:
            info = describe("InvalidAsin")
            future: asyncio.Future[ItemResult] = loop.create_future()
            result = ItemResult(
                query.asin,
                marketplace,
                Status.INVALID,
                error=ErrorDetail(info.code, verdict.reason or "invalid ASIN", info.remedy),
            )
            self._metrics.record_item(result.status.value)
            future.set_result(result)
            return future, None
        self._executor.check_servable(marketplace)
        key = (marketplace, verdict.asin, tuple(resources))
        existing = self._inflight.get(key)
        if existing is not None:
            existing.waiters += 1
            return existing.future, existing
        await self._capacity.acquire()
        if self._crash is not None:
            # The engine died while this caller waited for room: nothing would answer.
            self._capacity.release()
            raise self._crash.with_traceback(None)
        existing = self._inflight.get(key)
        if existing is not None:
            self._capacity.release()
            existing.waiters += 1
            return existing.future, existing
        lookup = Lookup(marketplace, verdict.asin, tuple(resources), loop.create_future())
        self._inflight[key] = lookup
        lookup.future.add_done_callback(lambda _f: self._finished(key))
        self._batcher.add(lookup)
        return lookup.future, lookup

    @staticmethod
    def _abandon(lookup: Lookup | None, count: int = 1) -> None:
        """A caller stops waiting for ``lookup``; the last one to leave cancels it.

        Cancelling a caller must not cancel a lookup another caller still waits for.
        """
        if lookup is None:
            return
        lookup.waiters -= count
        if lookup.waiters <= 0 and not lookup.future.done():
            lookup.future.cancel()

    def _finished(self, key: tuple[str, str, tuple[str, ...]]) -> None:
        self._inflight.pop(key, None)
        if self._capacity is not None:
            self._capacity.release()

    async def get_items(
        self,
        asins: Iterable[_Input],
        *,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
    ) -> list[ItemResult]:
        """Look up any number of ASINs; return one result per distinct input, in input order.

        Raises:
            NoUsableKeyError: no key can serve the marketplace (every key disabled).
            TypeError: ``asins`` is a single string (use :meth:`get_item`).
        """
        _check_not_str(asins)
        held: dict[
            tuple[str, str | None, tuple[str, ...] | None],
            tuple[asyncio.Future[ItemResult], Lookup | None],
        ] = {}
        try:
            for item in asins:
                query = self._query(item, marketplace, resources)
                ident = (query.asin.strip().upper(), query.marketplace, query.resources)
                if ident not in held:
                    held[ident] = await self._submit(query)
            self._flush()
            futures = [future for future, _ in held.values()]
            if futures:
                # Not gather(): cancelling this caller must not cancel shared lookups.
                await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            for future in futures:
                if future.done() and not future.cancelled():
                    error = future.exception()
                    if error is not None:
                        # Shared by every caller of the lookup: do not stack their tracebacks.
                        raise error.with_traceback(None)
            return [future.result() for future in futures]
        except BaseException:
            for future, lookup in held.values():
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: asyncio must not log it as forgotten
                self._abandon(lookup)
            raise

    async def get_item(
        self, asin: str, *, marketplace: str | None = None, resources: Sequence[str] | None = None
    ) -> ItemResult:
        """Look up one ASIN."""
        (result,) = await self.get_items([asin], marketplace=marketplace, resources=resources)
        return result

    async def stream(
        self,
        asins: Iterable[_Input] | AsyncIterable[_Input],
        *,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
    ) -> AsyncIterator[ItemResult]:
        """Yield one result per input as results complete, holding at most ``queue_size``.

        The input is consumed lazily: a producer admits an item only when fewer than
        ``queue_size`` of this stream's items are in flight or waiting to be yielded, so
        memory stays bounded however long the input and however slow the consumer.
        """
        self._require_open()
        _check_not_str(asins)
        done: asyncio.Queue[ItemResult | BaseException | _Wake] = asyncio.Queue()
        # Lookups submitted and not yet delivered, with how many inputs asked for each:
        # released when the consumer stops early, so an abandoned stream holds nothing.
        held: collections.Counter[Lookup] = collections.Counter()
        # Admitted but not yet yielded: the producer waits here, so a slow consumer bounds
        # the finished results buffered for it too, not only the lookups in flight.
        window = asyncio.Semaphore(self.config.engine.queue_size)
        submitted = 0
        finished = False

        def deliver(lookup: Lookup | None, future: asyncio.Future[ItemResult]) -> None:
            if lookup is not None:
                held[lookup] -= 1
                if held[lookup] <= 0:
                    del held[lookup]
            if future.cancelled():
                done.put_nowait(asyncio.CancelledError())
            elif future.exception() is not None:
                done.put_nowait(future.exception())  # type: ignore[arg-type]
            else:
                done.put_nowait(future.result())

        async def produce() -> None:
            nonlocal submitted, finished
            try:
                async for item in _aiter(asins):
                    await window.acquire()
                    future, lookup = await self._submit(self._query(item, marketplace, resources))
                    submitted += 1
                    if lookup is not None:
                        held[lookup] += 1
                    future.add_done_callback(functools.partial(deliver, lookup))
                self._flush()
            except BaseException as exc:
                done.put_nowait(exc)
                raise
            finally:
                finished = True
                done.put_nowait(_WAKE)

        producer = asyncio.get_running_loop().create_task(produce())
        yielded = 0
        try:
            while not (finished and yielded >= submitted):
                item = await done.get()
                if isinstance(item, _Wake):
                    continue
                if isinstance(item, BaseException):
                    raise item
                yielded += 1
                window.release()
                yield item
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
            for lookup, count in list(held.items()):
                self._abandon(lookup, count)
            held.clear()

    def _flush(self) -> None:
        """End of a caller's input: send its partial batches now instead of lingering."""
        if self._batcher is not None:
            self._batcher.flush()

    async def _operation(
        self, operation: Operation, params: Mapping[str, object], marketplace: str | None
    ) -> Mapping[str, object]:
        self._require_open()
        assert self._work is not None
        assert self._executor is not None
        market = marketplace or self.config.api.marketplace
        self._executor.check_servable(market)
        future: asyncio.Future[Mapping[str, object]] = asyncio.get_running_loop().create_future()
        self._ops.add(future)
        future.add_done_callback(self._ops.discard)
        self._work.put(Batch(market, operation=operation, params=dict(params), op_future=future))
        return await future

    async def search_items(
        self, *, marketplace: str | None = None, **params: object
    ) -> Mapping[str, object]:
        """SearchItems with camelCase parameters (``keywords=...``, ``searchIndex=...``)."""
        return await self._operation(Operation.SEARCH_ITEMS, params, marketplace)

    async def get_variations(
        self, asin: str, *, marketplace: str | None = None, **params: object
    ) -> Mapping[str, object]:
        """GetVariations of one ASIN."""
        return await self._operation(
            Operation.GET_VARIATIONS, {"asin": asin, **params}, marketplace
        )

    async def get_browse_nodes(
        self, browse_node_ids: Sequence[str], *, marketplace: str | None = None, **params: object
    ) -> Mapping[str, object]:
        """GetBrowseNodes for up to 10 ids."""
        return await self._operation(
            Operation.GET_BROWSE_NODES,
            {"browseNodeIds": list(browse_node_ids), **params},
            marketplace,
        )

    # -- introspection ------------------------------------------------------------------------

    def metrics(self) -> MetricsSnapshot:
        """Counters and per-key state right now."""
        return self._metrics.snapshot(
            queued_batches=len(self._work) if self._work is not None else 0,
            outstanding_lookups=len(self._inflight),
            keys=tuple(key.snapshot() for key in self._keys),
        )

    def __repr__(self) -> str:
        state = "open" if self._stack is not None else "closed"
        return f"Broker({state}, keys={[k.name for k in self._keys]})"


class _Wake:
    """Sentinel that wakes the stream's consumer to re-check the end condition."""


_WAKE = _Wake()


def _check_not_str(asins: object) -> None:
    # A lone string is an iterable of characters: ten one-letter "ASINs", all invalid.
    if isinstance(asins, str | bytes):
        raise TypeError("expected an iterable of ASINs, got a single string (use get_item)")


async def _aiter(items: Iterable[_Input] | AsyncIterable[_Input]) -> AsyncIterator[_Input]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
