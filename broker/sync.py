"""SyncBroker: the broker as blocking calls, for scripts, notebooks and WSGI apps.

Each SyncBroker runs one :class:`~broker.engine.broker.Broker` on an event loop in a
background thread of its own; every method hands a coroutine to that loop and waits for
its answer. Any number of threads may call one SyncBroker at once: their lookups share the
broker's keys, batches and rate limits, exactly as concurrent tasks of an async app do.

Example::

    from broker import SyncBroker

    with SyncBroker.from_config("config.toml") as broker:
        result = broker.get_item("B0C1234567")
        if result.product is not None:
            print(result.product.title, result.product.price)
        found = broker.search_items(keywords="kettle", item_count=3)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import math
import os
import selectors
import threading
import time
import weakref
from collections.abc import (
    AsyncGenerator,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from broker.api.resources import resolve_resources
from broker.asin import refuse_single_string
from broker.client import Broker
from broker.config import BrokerConfig, config_from_dict, load_config, require_config
from broker.engine.broker import NOT_PICKLED
from broker.errors import BrokerClosedError, WrongEventLoopError
from broker.models import ItemResult

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
    from broker.cache import CacheStats
    from broker.engine.broker import BrokerOptions
    from broker.engine.metrics import MetricsSnapshot
    from broker.models import Query, Secret

__all__ = ["SyncBroker"]

_T = TypeVar("_T")


class SyncBroker:
    """A :class:`~broker.engine.broker.Broker` with blocking methods; thread-safe.

    It starts at once (the background loop, the HTTP session, the embedded simulator when
    the config says so) and stops on :meth:`close` or at the end of a ``with`` block.
    Methods take the same arguments as the async ones and return the same values;
    ``resources`` may be spelled either way (``ItemInfo.Title`` or ``itemInfo.title``) and
    an unknown name raises ``ValueError`` before anything is sent.

    Args:
        config: the validated configuration (:func:`~broker.config.load_config`,
            :func:`~broker.config.config_from_dict`).
        **kwargs: passed to :class:`~broker.engine.broker.Broker` (clock, transport, rng,
            budget_store).

    Raises:
        ConfigError, NoUsableKeyError, OSError: the broker could not start.
    """

    def __init__(self, config: BrokerConfig, **kwargs: Unpack[BrokerOptions]) -> None:
        config = require_config(config, type(self).__name__)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=_serve, args=(self._loop,), name="asin-broker-loop", daemon=True
        )
        # Re-entrant: a signal handler of a thread inside a call may close() (SIGTERM).
        self._lock = threading.RLock()
        # The thread closing the broker: a close() it makes meanwhile (a signal handler's)
        # returns at once instead of waiting for itself.
        self._closer: int | None = None
        self._closed = False
        # Set once close() has closed the broker: the other callers of close() wait for it.
        self._shut = threading.Event()
        # The loop thread lives in this process only: a child forked from it has none.
        self._pid = os.getpid()
        self._finalizer: weakref.finalize[Any, SyncBroker] | None = None
        # Streams let go on the loop's own thread, held until done (the loop holds its tasks
        # only weakly).
        self._letting_go: set[asyncio.Task[None]] = set()
        try:
            # Inside: a Ctrl-C landing in start() (the thread already running) stops it too.
            self._thread.start()
            self._broker = self._open(config, kwargs)
        except BaseException:
            _stop_loop(self._loop, self._thread)
            raise
        # A broker nobody closes (a script that just ends) is closed when it is collected or
        # at interpreter exit, so no task, session or connector is left to warn about.
        self._finalizer = weakref.finalize(
            self, _shut_down, self._broker, self._loop, self._thread, self._pid
        )
        _LOOPS.add(self._loop)

    def _open(self, config: BrokerConfig, kwargs: Mapping[str, Any]) -> Broker:
        """Start the broker on the loop thread.

        A caller interrupted meanwhile (Ctrl-C) leaves nothing open: the cancelled start
        closes what it had opened as it unwinds, and the loop is stopped only after that (it
        was stopped at once, and the start's tasks, session and sockets were left behind); a
        start that had just finished is closed here.
        """
        began = threading.Event()
        ended = threading.Event()
        opened: list[Broker] = []

        async def start() -> Broker:
            began.set()
            try:
                # Built inside the loop's thread: the broker binds to the loop it is entered on.
                broker = Broker(config, **kwargs)
                await broker.__aenter__()
                opened.append(broker)
                return broker
            finally:
                ended.set()

        future = asyncio.run_coroutine_threadsafe(start(), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            # A start cancelled before its first step opened nothing and never ends here;
            # the loop thread, idle but for it, begins it at once otherwise. Bounded, as a
            # close is; a second Ctrl-C stops waiting.
            if began.wait(_BEGIN_S) and ended.wait(_CLOSE_TIMEOUT_S) and opened:
                closing = asyncio.run_coroutine_threadsafe(opened[0].aclose(), self._loop)
                with contextlib.suppress(Exception):
                    closing.result(_CLOSE_TIMEOUT_S)
            raise

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str] = "config.toml",
        *,
        environ: Mapping[str, str] | None = None,
        **kwargs: Unpack[BrokerOptions],
    ) -> Self:
        """Start a broker from a config file (secrets from ``environ``, default os.environ)."""
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
        """Start a broker from a configuration in code (see :func:`.config_from_dict`)."""
        return cls(config_from_dict(document, secrets=secrets, environ=environ), **kwargs)

    @property
    def config(self) -> BrokerConfig:
        """The configuration the broker runs with."""
        return self._broker.config

    # -- running coroutines on the loop thread -------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        try:
            _check_timeout(timeout)
        except (TypeError, ValueError):
            coro.close()
            raise
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncBroker methods block; call the async Broker from its loop")
        if os.getpid() != self._pid:
            coro.close()
            raise WrongEventLoopError(
                "this SyncBroker was started in another process and this one was forked from "
                "it: its event loop thread is not here. Start one per process (gunicorn: "
                "without --preload, or in a post_fork hook)"
            )
        with self._lock:
            if self._is_closed():
                coro.close()
                raise BrokerClosedError("this SyncBroker is closed")
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except RuntimeError:
                # The loop closed since the check: a signal handler of this very thread
                # closed the broker in between.
                coro.close()
                raise BrokerClosedError("this SyncBroker is closed") from None
        try:
            # Longer than a thread can wait (some 292 years) is as long as it takes.
            wait = None if timeout is None or timeout >= threading.TIMEOUT_MAX else timeout
            return future.result(wait)
        except TimeoutError:
            if future.done():
                # Answered just as time ran out, or the call's own TimeoutError.
                return future.result()
            # Cancelled on the loop: the call's lookups are let go, as the async API's
            # asyncio.timeout does, and the broker goes on serving.
            future.cancel()
            raise TimeoutError(f"no answer within timeout={timeout:g} s") from None
        except BaseException:
            # Ctrl-C (or any exception raised in this thread while waiting) cancels the
            # call on the loop, so nothing is left running for a caller that is gone.
            future.cancel()
            raise

    # -- lookups -------------------------------------------------------------------------------

    def _resources(self, resources: Sequence[str] | None) -> tuple[str, ...] | None:
        """Resource names in either spelling, checked and spelled for the protocol in use."""
        if resources is None:
            return None
        return resolve_resources(resources, self._broker.config.api.protocol)

    def get_items(
        self,
        asins: Iterable[str | Query],
        *,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[ItemResult]:
        """Look up any number of ASINs; one result per distinct input, in input order.

        ``timeout`` (seconds) bounds the wait, as ``asyncio.timeout`` does for the async
        API: past it, ``TimeoutError`` is raised and the call's lookups are let go (a
        lookup waiting for a daily quota's reset may otherwise wait hours).
        """
        # The iterable is read here, in the caller's thread, not on the loop.
        refuse_single_string(asins)
        items = list(asins)
        return self._call(
            self._broker.get_items(
                items, marketplace=marketplace, resources=self._resources(resources)
            ),
            timeout,
        )

    def get_item(
        self,
        asin: str | Query,
        *,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> ItemResult:
        """Look up one ASIN (a string or a :class:`Query`); ``timeout`` as for :meth:`get_items`."""
        wanted = self._resources(resources)
        return self._call(
            self._broker.get_item(asin, marketplace=marketplace, resources=wanted), timeout
        )

    def stream(
        self,
        asins: Iterable[str | Query],
        *,
        marketplace: str | None = None,
        resources: Sequence[str] | None = None,
        stop: threading.Event | None = None,
    ) -> Generator[ItemResult, None, None]:
        """Yield one result per input as results complete, holding at most ``queue_size``.

        The input is read lazily, in the thread iterating the stream (never on the loop's
        thread, where an event loop runs): a SQLite cursor or a Django QuerySet works, and a
        slow input holds up only this stream. It is read ahead in chunks of up to 256 items
        (up to about 384 beyond ``queue_size``, 100 more with the item cache on, which is
        read a chunk at a time) while the loop sends what it has; a chunk ends early once
        reading it has taken 50 ms, so a slow input's first items are sent while the rest
        comes. An input that waits for its items (stdin fed by ``tail -f``, a queue) has
        each one sent as it comes, and after a wait of half a second or more the answers of
        what it gave are yielded, for up to half that wait (at most a second), before it is
        read again: this thread yields nothing while it waits for input. Since that thread
        is also the one consuming results, an input that waits for this stream's own results
        (a queue its consumer refills, as a crawler does) blocks: feed such an input from
        another thread, or use the async ``stream``.
        An input that raises raises here, after the answers for every item it gave before
        (as the async ``stream`` does).

        ``stop`` is the async ``stop=`` as a :class:`threading.Event`, set from any thread
        (a signal handler, a shutdown hook): once set, nothing more is read or sent, and the
        stream ends when the answers already sent for have been yielded. A caller waiting
        for a result sees it within a quarter of a second.
        """
        refuse_single_string(asins)
        source = iter(asins)
        feed = _Feed()
        # Set on the loop's thread when ``stop`` is seen set in the caller's.
        wind_down = asyncio.Event() if stop is not None else None
        agen = self._broker.stream(
            feed, marketplace=marketplace, resources=self._resources(resources), stop=wind_down
        )
        pump = _Pump(agen, feed, patience_s=None if stop is None else _STOP_CHECK_S)
        # Items given to the loop and not answered yet; the input's longest wait for one
        # item in the last read (it waits between items: see _read), and until when the
        # answers of what it gave are waited for before reading on.
        outstanding = 0
        waited = 0.0
        linger_until = 0.0
        try:
            while True:
                if wind_down is not None and stop is not None and stop.is_set():
                    self._call(_set(wind_down))
                    wind_down = None
                linger_s = max(0.0, linger_until - time.monotonic()) if outstanding else 0.0
                step = self._call(pump.step(linger_s))
                if isinstance(step, ItemResult):
                    outstanding -= 1
                    yield step
                elif step is _Signal.MORE:
                    halted = stop is not None and stop.is_set()
                    chunk: list[str | Query] = []
                    ended, failure = True, None
                    if not halted:
                        chunk, ended, failure, waited = _read(
                            source, _CHUNK, one_by_one=waited >= _SLOW_INPUT_S
                        )
                    outstanding += len(chunk)
                    # An input that waits long for its items (stdin fed by `tail -f`): its
                    # next read waits again, and this thread yields nothing meanwhile, so
                    # the answers of what it gave are yielded first, for up to half that
                    # wait. Not for one that takes a moment per item (a cursor fetching row
                    # by row): waiting for answers between its items would slow its reading.
                    linger = min(waited / 2, _LINGER_S) if waited >= _LINGER_AFTER_S else 0.0
                    linger_until = time.monotonic() + linger
                    self._call(feed.give(chunk, ended=ended, failure=failure))
                elif step is _Signal.END:
                    return
        finally:
            if not self._is_closed():
                if threading.current_thread() is self._thread:
                    # Collected on the loop's own thread (the collector runs wherever memory
                    # is allocated, most often there), which cannot wait for itself.
                    task = self._loop.create_task(pump.aclose())
                    self._letting_go.add(task)
                    task.add_done_callback(self._letting_go.discard)
                    task.add_done_callback(_retrieved)
                else:
                    self._call(pump.aclose())

    def cache_stats(self) -> CacheStats | None:
        """The item cache's counts (see the async :meth:`Broker.cache_stats`, and what it
        raises while a failed store is left alone); None if off."""
        return self._call(self._broker.cache_stats())

    def search_items(
        self,
        keywords: str | None = None,
        /,
        *,
        marketplace: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SearchOptions],
    ) -> SearchResult:
        """SearchItems with snake_case options, the keywords first if you like (see the
        async :meth:`Broker.search_items`); ``timeout`` as for :meth:`get_items`."""
        return self._call(
            self._broker.search_items(keywords, marketplace=marketplace, **options), timeout
        )

    def get_variations(
        self,
        asin: str,
        *,
        marketplace: str | None = None,
        timeout: float | None = None,
        **options: Unpack[VariationsOptions],
    ) -> VariationsResult:
        """GetVariations of one ASIN (see the async :meth:`Broker.get_variations`);
        ``timeout`` as for :meth:`get_items`."""
        return self._call(
            self._broker.get_variations(asin, marketplace=marketplace, **options), timeout
        )

    def get_browse_nodes(
        self,
        browse_node_ids: Iterable[str | int],
        *,
        marketplace: str | None = None,
        timeout: float | None = None,
        **options: Unpack[BrowseNodesOptions],
    ) -> BrowseNodesResult:
        """GetBrowseNodes for 1 to 10 ids (see the async :meth:`Broker.get_browse_nodes`);
        ``timeout`` as for :meth:`get_items`."""
        return self._call(
            self._broker.get_browse_nodes(browse_node_ids, marketplace=marketplace, **options),
            timeout,
        )

    def metrics(self) -> MetricsSnapshot:
        """Counters and per-key state right now."""
        return self._call(_metrics(self._broker))

    def is_fresh(self, result: ItemResult) -> bool:
        """False for a cached answer held past its max age (see the async
        :meth:`Broker.is_fresh`): ask it again before handing it on."""
        return self._broker.is_fresh(result)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the broker and its loop thread; safe to call twice and from any thread.

        Every caller returns once the broker is closed, not only the one that closes it.
        """
        with self._lock:
            closing = not self._closed
            if closing:
                # Before _closed: a signal handler's close() run in between must find it.
                self._closer = threading.get_ident()
            self._closed = True
        if not closing:
            # Neither the loop's own thread nor the closing one (a signal handler run in
            # the middle of its close) can wait for the close to end.
            if threading.current_thread() is not self._thread and (
                self._closer != threading.get_ident()
            ):
                self._shut.wait()
            return
        try:
            if self._finalizer is not None:
                self._finalizer()
        finally:
            self._shut.set()
            self._closer = None

    def _is_closed(self) -> bool:
        # The finalizer may have run without close(): at interpreter exit.
        return self._closed or (self._finalizer is not None and not self._finalizer.alive)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError(NOT_PICKLED.format(name="SyncBroker"))

    def __repr__(self) -> str:
        state = "closed" if self._is_closed() else "open"
        return f"SyncBroker({state}, keys={[k.name for k in self._broker.config.keys]})"


#: How long a finalizer or close() waits for the broker to close before stopping its loop.
_CLOSE_TIMEOUT_S = 30.0
#: How long an interrupted start looks for its coroutine to have begun on the loop thread.
_BEGIN_S = 0.5
#: How long the loop thread lets unfinished streams end once the broker is closed.
_CLOSE_STREAMS_S = 5.0


def _check_timeout(timeout: float | None) -> None:
    """Refuse a ``timeout=`` that is not None or a positive, finite number of seconds."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive, finite number of seconds, not {timeout!r}")


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The loop thread: run until stopped, then close the loop (it is this thread's)."""
    loop.run_forever()
    # A stream the caller never finished (its SyncBroker closed from another thread while
    # the caller read its input) ends here, on its own loop, not at collection on a closed one;
    # bounded, so a close never hangs on it.
    closing = loop.create_task(loop.shutdown_asyncgens())
    # asyncio.wait, not wait_for: at the timeout it returns, where wait_for would wait on
    # for a generator that ignores its cancellation.
    loop.run_until_complete(asyncio.wait((closing,), timeout=_CLOSE_STREAMS_S))
    # Tasks still pending (an embedded simulator's handlers, which its short grace at close
    # leaves cancelled but not yet ended) end here, as asyncio.run ends them: closed with
    # them pending, the loop logged "Task was destroyed but it is pending!".
    left = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.wait(left, timeout=_CLOSE_STREAMS_S))
    loop.close()
    _LOOPS.discard(loop)


def _shut_down(
    broker: Broker, loop: asyncio.AbstractEventLoop, thread: threading.Thread, pid: int
) -> None:
    """Close ``broker`` on its loop, then stop the loop and its thread (close or finalizer).

    In a process forked from the one that started it there is no loop thread to ask: its
    exit must not wait for one, and the parent's broker is the parent's to close.
    """
    if os.getpid() != pid:
        # The parent's broker, inherited: nothing of it runs here, so its tasks, session and
        # connector, collected as this process exits, are not reported as left open (their
        # reports go through the loop's handler), and its loop is never run to close them.
        loop.set_exception_handler(_ignore)
        return
    if threading.current_thread() is thread:
        # Collected on the loop's own thread, which cannot wait for itself: close, then stop
        # (the thread closes its loop as it ends).
        loop.create_task(broker.aclose()).add_done_callback(lambda _: loop.stop())
        return
    try:
        # Bounded: a finalizer may run on any thread, perhaps one holding something the loop
        # needs to finish closing.
        asyncio.run_coroutine_threadsafe(broker.aclose(), loop).result(_CLOSE_TIMEOUT_S)
    finally:
        _stop_loop(loop, thread)


#: The loops of this process's SyncBrokers: a child forked from it detaches them.
_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _detach_in_child() -> None:
    """In a child just forked, give each inherited loop a poller of its own.

    The child shares the parent's epoll instance (an open file, like its sockets): as the
    child exits, aiohttp closes the inherited connections, and their removal from that
    poller took the parent's pooled sockets out of the parent's too, whose next calls then
    waited out their request timeout. With a new poller the child has nothing to remove;
    the sockets it closes are its own copies. Only asyncio's selector loops have one to
    swap (a loop the parent's policy made otherwise is left as it is).
    """
    for loop in list(_LOOPS):
        # A closed loop (a broker closed earlier, still referenced) has no poller: swapping
        # one in failed, and the failure ended the loop over the live ones, whose parent
        # then waited out its request timeout after the child's exit.
        if loop.is_closed() or not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            continue
        inherited = loop._selector  # type: ignore[attr-defined]  # no public handle
        loop._selector = selectors.DefaultSelector()  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, AttributeError):
            inherited.close()  # the child's copy of the epoll file only


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_detach_in_child)


def _ignore(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An exception handler that reports nothing (a forked child's inherited loop)."""


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    # Not joinable when interrupted before it said it started: the stop just scheduled ends
    # its loop as soon as it runs, and the thread with it.
    with contextlib.suppress(RuntimeError):
        thread.join()


#: Input items a SyncBroker stream reads ahead in the caller's thread at a time.
_CHUNK = 256


#: How often a waiting SyncBroker stream looks at its ``stop`` event, in seconds.
_STOP_CHECK_S = 0.25

#: An input that takes this long (s) for one item waits between items (a pipe fed by a
#: producer, a queue, a cursor fetching row by row): its items are handed over one at a time.
_SLOW_INPUT_S = 0.05

#: An input that took this long (s) for an item has the answers of what it gave yielded
#: before it is read again, for up to half that time and at most ``_LINGER_S``: a pull-driven
#: input (whose next item is fetched only when asked for) then reads at two thirds of its
#: own rate at worst, an input fed from elsewhere (a pipe) not slower at all.
_LINGER_AFTER_S = 0.5
_LINGER_S = 1.0


class _Signal(enum.Enum):
    """What a stream's step says instead of a result."""

    MORE = "more"  # the feed wants the caller's thread to read more input first
    END = "end"  # the stream is done
    IDLE = "idle"  # nothing yet within the step's patience: look at ``stop`` and step again


async def _set(event: asyncio.Event) -> None:
    event.set()


def _read(
    source: Iterator[str | Query], size: int, within_s: float = 0.05, *, one_by_one: bool = False
) -> tuple[list[str | Query], bool, Exception | None, float]:
    """Up to ``size`` items of ``source``, whether it ended, the error it raised after
    them, if any, and the longest it took for one item (s).

    Fewer items when reading them takes longer than ``within_s``: a slow input (a cursor
    over a network, a generator that waits) has its first items sent while the rest comes,
    instead of nothing sent until ``size`` items are in. ``one_by_one`` (the last read
    waited for an item): one item, so an item given after a wait is sent before the input
    is asked for the next, which may wait as long; a fast input is back to chunks at its
    next read. The items read before a failure are kept: the stream answers them before
    the error.
    """
    chunk: list[str | Query] = []
    last = time.monotonic()
    deadline = last + within_s
    longest = 0.0
    try:
        for item in source:
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now
            chunk.append(item)
            if one_by_one or len(chunk) >= size or now >= deadline:
                return chunk, False, None, longest
    except Exception as exc:
        return chunk, True, exc, max(longest, time.monotonic() - last)
    return chunk, True, None, max(longest, time.monotonic() - last)


class _Feed:
    """A stream's input on the loop: what the caller's thread read, handed over in chunks.

    It asks for the next chunk (through :class:`_Pump`) when fewer than half a chunk are
    left, so the loop rarely waits for the caller's thread.
    """

    def __init__(self) -> None:
        self._items: collections.deque[str | Query] = collections.deque()
        self._ended = False
        self._failure: Exception | None = None
        self._given = asyncio.Event()
        #: set while the feed wants the caller's thread to read more
        self.hungry = asyncio.Event()
        self.hungry.set()

    def __aiter__(self) -> _Feed:
        return self

    async def __anext__(self) -> str | Query:
        while not self._items:
            if self._failure is not None:
                raise self._failure
            if self._ended:
                raise StopAsyncIteration
            self.hungry.set()
            self._given.clear()
            await self._given.wait()
        item = self._items.popleft()
        if len(self._items) < _CHUNK // 2 and not self._ended:
            self.hungry.set()
        return item

    async def give(
        self, chunk: list[str | Query], *, ended: bool, failure: Exception | None = None
    ) -> None:
        """Take the next chunk read in the caller's thread (``ended``: the input is done;
        ``failure``: it raised that after ``chunk``, raised here once ``chunk`` is taken)."""
        self._items.extend(chunk)
        self._ended = ended
        self._failure = failure
        self.hungry.clear()
        self._given.set()


class _Pump:
    """Runs on the loop: the next result, or word that the feed wants more input first."""

    def __init__(
        self,
        agen: AsyncGenerator[ItemResult, None],
        feed: _Feed,
        *,
        patience_s: float | None = None,
    ) -> None:
        self._agen = agen
        self._feed = feed
        self._patience_s = patience_s
        self._pending: asyncio.Task[ItemResult] | None = None

    async def step(self, linger_s: float = 0.0) -> ItemResult | _Signal:
        """The next result; MORE when the feed is hungry first (after waiting up to
        ``linger_s`` for a result); END at the end; IDLE when neither came within the
        patience (None: wait as long as it takes)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._agen))
            # Its error is read by the next step, unless the SyncBroker was closed from
            # another thread meanwhile: then no step comes, and asyncio would report it.
            self._pending.add_done_callback(_retrieved)
        if not self._pending.done() and self._feed.hungry.is_set() and linger_s > 0:
            patience = self._patience_s
            await asyncio.wait(
                (self._pending,), timeout=linger_s if patience is None else min(patience, linger_s)
            )
            if not self._pending.done() and patience is not None and patience < linger_s:
                return _Signal.IDLE  # a look at ``stop``, then the rest of the wait
        if not self._pending.done() and not self._feed.hungry.is_set():
            hungry = asyncio.ensure_future(self._feed.hungry.wait())
            try:
                await asyncio.wait(
                    (self._pending, hungry),
                    timeout=self._patience_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                hungry.cancel()
        if not self._pending.done():
            return _Signal.MORE if self._feed.hungry.is_set() else _Signal.IDLE
        pending, self._pending = self._pending, None
        try:
            return pending.result()
        except StopAsyncIteration:
            return _Signal.END

    async def aclose(self) -> None:
        """Let go of the stream: its pending step and its lookups."""
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(BaseException):
                await self._pending
        await self._agen.aclose()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark ``task``'s exception as seen (whoever awaits it still gets it)."""
    if not task.cancelled():
        task.exception()


async def _metrics(broker: Broker) -> MetricsSnapshot:
    return broker.metrics()
