"""SyncBroker (blocking calls on a loop thread of its own) and configuration given in code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import asins, sqlite_db

from broker import Broker, SyncBroker, config_from_dict
from broker import sync as sync_module
from broker.config import parse_config
from broker.errors import BrokerClosedError, ConfigError, NoUsableKeyError
from broker.models import Secret, Status


def _document(protocol: str = "creators", **key: Any) -> dict[str, Any]:
    """A config in code for the embedded simulator (no rate limits, fast linger)."""
    if protocol == "paapi5":
        table = {"name": "demo", "credential_id": "DEMOACCESSKEY"}
    else:
        table = {"name": "demo", "credential_id": "demo-id", "version": "3.1"}
    table.update({"partner_tags": {"www.amazon.com": "demo-20"}, "tps": 200.0, **key})
    return {
        "api": {"protocol": protocol, "endpoint": "simulator"},
        "keys": [table],
        "engine": {"linger_s": 0.005},
        "simulator": {"limits": False},
    }


def _script(tmp_path: Path, body: str, *, before: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``before``, then ``b = SyncBroker(...)`` on the simulator's demo key, then
    ``body``, in a fresh ``python -X dev`` that never closes ``b``; it must exit 0."""
    script = (
        f"{before}from broker import SyncBroker\n"
        "b = SyncBroker.from_dict({'api': {'endpoint': 'simulator'}, 'keys': [{'name': 'k',"
        " 'credential_id': 'demo-id', 'version': '3.1',"
        " 'partner_tags': {'www.amazon.com': 'demo-20'}}]})\n"
        f"{body}"
    )
    return _python(tmp_path, script)


#: A script's body: a pooled keep-alive connection to inherit, a child forked that exits at
#: once, then the parent's next call, and whether it came back quickly and first time.
_FORK_THEN_CALL = (
    "import os, time\n"
    "b.get_item('B000000003')\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    raise SystemExit(0)\n"
    "os.waitpid(pid, 0)\n"
    "started = time.monotonic()\n"
    "result = b.get_item('B000000004')\n"
    "quick = time.monotonic() - started < 5\n"
    "print('parent', result.status.value, result.attempts, quick)\n"
)


def _python(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh ``python -X dev`` with its own state directory; it must
    exit 0."""
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_no_home_directory_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker whose key state goes to the default file, with no home directory and no
    XDG_STATE_HOME, raises ConfigError saying so (it was a RuntimeError)."""

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(Path, "home", no_home)
    document = {
        "api": {"endpoint": "http://127.0.0.1:9"},
        "keys": [
            {
                "name": "k",
                "credential_id": "k-id",
                "credential_secret_env": "K_SECRET",
                "version": "3.1",
                "partner_tags": {"www.amazon.com": "k-20"},
            }
        ],
    }
    with pytest.raises(ConfigError, match="no home directory"):
        SyncBroker.from_dict(document, environ={"K_SECRET": "not-a-real-secret"})


@pytest.fixture(name="sync_broker")
def _sync_broker() -> Any:
    with SyncBroker.from_dict(_document()) as broker:
        yield broker


def _waiting_as(wait: Callable[[Callable[[float | None], Any], float | None], Any]) -> Any:
    """``asyncio.run_coroutine_threadsafe`` whose futures' ``result(timeout)`` is
    ``wait(the real result, timeout)``: how a SyncBroker's caller waits, staged."""
    real = asyncio.run_coroutine_threadsafe

    def submit(coro: Any, loop: asyncio.AbstractEventLoop) -> Any:
        future = real(coro, loop)
        real_result = future.result
        future.result = lambda timeout=None: wait(real_result, timeout)  # type: ignore[method-assign]
        return future

    return submit


def _lookups_left(broker: SyncBroker, *, within_s: float) -> int:
    """The broker's lookups still outstanding once none are, or ``within_s`` has passed
    (the loop thread lets go of a caller's lookups a moment after the caller left)."""
    deadline = time.monotonic() + within_s
    while broker.metrics().outstanding_lookups and time.monotonic() < deadline:
        time.sleep(0.01)
    return broker.metrics().outstanding_lookups


class TestSyncBroker:
    """Blocking calls give what the async ones give."""

    def test_a_broker_refuses_to_be_pickled_saying_why(self, sync_broker: SyncBroker) -> None:
        """Handing a broker to a process pool says to start one in each process; it said
        "Can't pickle local object 'WeakSet.__init__.<locals>._remove'" or named a Future."""
        import pickle

        from broker.engine.broker import Broker

        config = sync_broker._broker.config
        for broker in (sync_broker, Broker(config)):
            with pytest.raises(TypeError, match="start one in each process"):
                pickle.dumps(broker)

    def test_lookup_and_product(self, sync_broker: SyncBroker) -> None:
        """get_item and get_items block and return results with a typed product."""
        result = sync_broker.get_item("B000000001")
        assert result.status is Status.OK
        assert result.product is not None
        assert result.product.title
        assert result.product.price is not None
        results = sync_broker.get_items(asins(25))
        assert [r.asin for r in results] == asins(25)

    def test_resources_either_spelling(self, sync_broker: SyncBroker) -> None:
        """PA-API spelling works on the Creators API; an unknown name raises before sending."""
        result = sync_broker.get_item("B000000002", resources=["ItemInfo.Features"])
        assert result.ok
        assert result.product is not None
        assert result.product.features
        assert result.product.title is None
        sent = sync_broker.metrics().requests
        with pytest.raises(ValueError, match=r"unknown resource 'ItemInfo\.Feature'"):
            sync_broker.get_items(["B000000003"], resources=["ItemInfo.Feature"])
        assert sync_broker.metrics().requests == sent

    def test_operations(self, sync_broker: SyncBroker) -> None:
        """search_items, get_variations and get_browse_nodes block and come back typed."""
        found = sync_broker.search_items(keywords="kettle", item_count=2)
        assert len(found.items) == 2
        assert sync_broker.get_variations("B000000001").items
        assert sync_broker.get_browse_nodes(["283155"]).browse_nodes[0].id == "283155"
        with pytest.raises(ValueError, match="item_count"):
            sync_broker.search_items(keywords="kettle", item_count=500)

    def test_search_takes_its_keywords_first_unnamed(self, sync_broker: SyncBroker) -> None:
        """search_items("kettle"), python-amazon-paapi's common form, searches as
        keywords="kettle" does (it raised TypeError); the keywords given both ways are
        refused before anything is sent."""
        named = sync_broker.search_items(keywords="kettle", item_count=3)
        assert sync_broker.search_items("kettle", item_count=3) == named
        sent = sync_broker.metrics().requests
        with pytest.raises(TypeError, match="keywords both"):
            sync_broker.search_items("kettle", keywords="kettle")
        assert sync_broker.metrics().requests == sent
        # keywords=None is "not given", as None is for every other option (a form's
        # missing field passed on): it raised "keywords both".
        assert sync_broker.search_items("kettle", keywords=None, item_count=3) == named

    def test_timeout_bounds_a_blocking_call(self) -> None:
        """timeout= bounds a blocking call (the async API's asyncio.timeout): a lookup that
        waits for the daily quota's reset raises TimeoutError in time, lets go of its
        lookup, and the broker serves the next call."""
        with SyncBroker.from_dict(_document(tpd=1)) as broker:
            assert broker.get_item("B000000001", timeout=10).ok
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=r"timeout=0\.2 s"):
                broker.get_item("B000000002", timeout=0.2)
            assert time.monotonic() - started < 5
            assert broker.metrics().outstanding_lookups == 0
            with pytest.raises(TimeoutError):
                broker.get_items(["B000000003", "B000000004"], timeout=0.2)
            with pytest.raises(TimeoutError):
                broker.search_items(keywords="kettle", timeout=0.2)
            # Still serving: what needs no request is answered at once.
            assert broker.get_item("not-an-asin", timeout=10).status is Status.INVALID

    @pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), "5", True])
    def test_timeout_must_be_a_positive_number(
        self, sync_broker: SyncBroker, timeout: object
    ) -> None:
        """A timeout that is not a positive, finite number of seconds raises before sending."""
        with pytest.raises((TypeError, ValueError), match="timeout"):
            sync_broker.get_item("B000000001", timeout=timeout)  # type: ignore[arg-type]

    @pytest.mark.parametrize("timeout", [1e10, 10**12, sys.float_info.max])
    def test_a_timeout_longer_than_threads_can_wait_waits_as_long_as_it_takes(
        self, sync_broker: SyncBroker, timeout: float
    ) -> None:
        """A finite timeout= past what a thread can wait (``threading.TIMEOUT_MAX``, some
        292 years) is no timeout: the call is answered. It raised OverflowError."""
        assert sync_broker.get_item("B000000001", timeout=timeout).ok

    def test_stream(self, sync_broker: SyncBroker) -> None:
        """stream yields every input once; leaving early releases the rest."""
        wanted = asins(30)
        assert sorted(r.asin for r in sync_broker.stream(iter(wanted))) == wanted
        for result in sync_broker.stream(asins(30, "B1")):
            assert result.asin.startswith("B1")
            break
        assert sync_broker.metrics().outstanding_lookups == 0

    def test_a_stream_closed_on_the_loop_thread_lets_go_quietly(
        self, sync_broker: SyncBroker
    ) -> None:
        """A stream collected on the broker's own loop thread (the garbage collector runs
        wherever memory is allocated, most often there) closes without an error and lets its
        lookups go; it raised "SyncBroker methods block", printed as "Exception ignored"."""
        stream = sync_broker.stream(asins(30, "B2"))
        next(stream)
        closed: concurrent.futures.Future[None] = concurrent.futures.Future()

        def close_here() -> None:
            try:
                stream.close()
            except BaseException as exc:
                closed.set_exception(exc)
            else:
                closed.set_result(None)

        sync_broker._loop.call_soon_threadsafe(close_here)
        assert closed.result(timeout=5) is None
        assert _lookups_left(sync_broker, within_s=5) == 0

    def test_a_call_from_the_loop_thread_raises_instead_of_hanging(
        self, sync_broker: SyncBroker
    ) -> None:
        """A blocking method called on the broker's own loop thread (a callback of the
        loop) raises RuntimeError at once: waiting there for the loop would hang it."""
        outcome: concurrent.futures.Future[BaseException | None] = concurrent.futures.Future()

        def call_here() -> None:
            try:
                # timeout=: were the call waited for, the loop is freed again after it.
                sync_broker.get_item("B000000001", timeout=1)
            except BaseException as exc:  # the outcome is what this test looks at
                outcome.set_result(exc)
            else:
                outcome.set_result(None)

        sync_broker._loop.call_soon_threadsafe(call_here)
        raised = outcome.result(timeout=10)
        assert isinstance(raised, RuntimeError)
        assert "SyncBroker methods block" in str(raised)

    def test_ctrl_c_while_waiting_lets_the_call_go(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Ctrl-C in the calling thread while it waits for an answer (here, for the daily
        quota's reset) cancels the call on the loop: no lookup is left in flight for a
        caller that is gone."""

        def interrupted(real_result: Callable[[float | None], Any], timeout: float | None) -> Any:
            with contextlib.suppress(TimeoutError):
                real_result(0.2)  # waiting, as the user presses Ctrl-C
            raise KeyboardInterrupt

        with SyncBroker.from_dict(_document(tpd=1)) as broker:
            assert broker.get_item("B000000001", timeout=10).ok
            monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", _waiting_as(interrupted))
            with pytest.raises(KeyboardInterrupt):
                broker.get_item("B000000002")
            monkeypatch.undo()
            assert _lookups_left(broker, within_s=2) == 0

    def test_an_answer_landing_as_the_timeout_expires_is_returned(
        self, sync_broker: SyncBroker
    ) -> None:
        """An answer that lands just as timeout= runs out is returned, not thrown away for a
        TimeoutError: the request was made (and counted against the quota) already."""

        def answered(real_result: Callable[[float | None], Any], timeout: float | None) -> Any:
            if timeout is None:
                return real_result(None)
            real_result(30)  # the answer lands...
            raise TimeoutError  # ...as the wait for it runs out

        # Undone before the fixture closes the broker, whatever the call raises.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(asyncio, "run_coroutine_threadsafe", _waiting_as(answered))
            answer = sync_broker.get_item("B000000001", timeout=10)
        assert answer.ok

    def test_stream_stop_set_from_another_thread(self) -> None:
        """stop= winds the stream down while its caller waits: nothing more is sent, and the
        answers already paid for are yielded."""
        stop = threading.Event()
        with SyncBroker.from_dict(_document(tps=0.5, max_in_flight=1)) as broker:
            timer = threading.Timer(0.2, stop.set)
            timer.start()
            got = [r.asin for r in broker.stream(asins(100), stop=stop)]
            timer.join()
            sent = broker.metrics().requests
        assert sent == 1
        assert got == asins(10)

    def test_same_methods_as_the_async_broker(self) -> None:
        """Every public method of Broker has a blocking twin with the same parameters; the
        calls that wait for Amazon take timeout= too (asyncio.timeout's stand-in)."""
        waiting = {"get_items", "get_item", "search_items", "get_variations", "get_browse_nodes"}
        for name, method in inspect.getmembers(Broker, callable):
            if name.startswith("_") or name == "aclose":
                continue
            twin = getattr(SyncBroker, name, None)
            assert twin is not None, name
            params = list(inspect.signature(twin).parameters)
            assert ("timeout" in params) == (name in waiting), name
            assert [p for p in params if p != "timeout"] == list(
                inspect.signature(method).parameters
            ), name

    def test_cache_stats(self, tmp_path: Path) -> None:
        """cache_stats() is the async one's: None without a cache, counts with one."""
        with SyncBroker.from_dict(_document()) as broker:
            assert broker.cache_stats() is None
        document = {**_document(), "cache": {"max_age_s": 3600, "path": str(tmp_path / "c.db")}}
        with SyncBroker.from_dict(document) as broker:
            broker.get_items(asins(3))
            broker.get_items(asins(3))
            stats = broker.cache_stats()
        assert stats is not None
        assert stats.hits == 3

    def test_stream_reads_its_input_in_the_callers_thread(self, sync_broker: SyncBroker) -> None:
        """The input is read in the thread that iterates the stream, where no event loop runs
        (a SQLite cursor or a Django QuerySet works only there), however long it is."""
        wanted = asins(700, "B2")
        readers: set[tuple[threading.Thread, bool]] = set()

        def rows() -> Iterator[str]:
            for asin in wanted:
                try:
                    asyncio.get_running_loop()
                    in_loop = True
                except RuntimeError:
                    in_loop = False
                readers.add((threading.current_thread(), in_loop))
                yield asin

        assert sorted(r.asin for r in sync_broker.stream(rows())) == wanted
        assert readers == {(threading.current_thread(), False)}

    def test_stream_input_errors_reach_the_caller(self, sync_broker: SyncBroker) -> None:
        """An input that raises raises in the caller, after the answers for every row it
        gave before (in the middle of a chunk too), and the stream holds nothing after."""

        def rows() -> Iterator[str]:
            yield from asins(15, "B3")
            raise ValueError("bad row 16")

        got: list[str] = []

        def consume() -> None:
            for result in sync_broker.stream(rows()):
                got.append(result.asin)

        with pytest.raises(ValueError, match="bad row 16"):
            consume()
        assert sorted(got) == asins(15, "B3")
        assert sync_broker.metrics().outstanding_lookups == 0

    def test_a_slow_input_is_sent_while_it_is_read(self, sync_broker: SyncBroker) -> None:
        """A trickling input (a row every 0.1 s) has its first rows sent while the rest are
        still coming, not once 256 rows have been read."""
        wanted = asins(10, "B4")
        sent_before: list[int] = []

        def rows() -> Iterator[str]:
            for asin in wanted:
                time.sleep(0.1)
                sent_before.append(sync_broker.metrics().requests)
                yield asin

        assert sorted(r.asin for r in sync_broker.stream(rows())) == wanted
        assert sent_before[-1] > 0, sent_before

    @pytest.mark.parametrize("waits", ["before each item", "after each item"])
    def test_an_input_that_waits_has_each_item_answered_before_the_next_comes(
        self, sync_broker: SyncBroker, waits: str
    ) -> None:
        """An input that waits between items (stdin fed by ``tail -f``, a generator that
        blocks on a queue): each item is sent as it comes and its answer yielded before the
        stream waits for the next one. Each waited for the next item before it was even
        sent, and the answers came out only when the input ended. (An item a generator
        gives just before its first wait can only be seen slow once that wait is over.)"""
        wanted = asins(3, "B7")
        given: dict[str, float] = {}

        def rows() -> Iterator[str]:
            for asin in wanted:
                if waits == "before each item":
                    time.sleep(1.2)
                given[asin] = time.monotonic()
                yield asin
                if waits == "after each item":
                    time.sleep(1.2)

        late = {
            result.asin: round(time.monotonic() - given[result.asin], 2)
            for result in sync_broker.stream(rows())
        }
        assert sorted(late) == wanted
        answered_late = wanted[:1] if waits == "after each item" else []
        assert [a for a in wanted if late[a] > 0.6] == answered_late, late

    def test_an_input_that_takes_a_moment_per_item_is_read_at_its_own_pace(
        self, sync_broker: SyncBroker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An input that takes 100 ms per item (a cursor fetching row by row) is handed
        over item by item but never waited on for answers between its items: that halved
        its reading where answers took longer than its items."""
        lingers: list[float] = []
        real_step = sync_module._Pump.step

        def step(self: Any, linger_s: float = 0.0) -> Any:
            lingers.append(linger_s)
            return real_step(self, linger_s)

        monkeypatch.setattr(sync_module._Pump, "step", step)
        wanted = asins(6, "B8")

        def rows() -> Iterator[str]:
            for asin in wanted:
                time.sleep(0.1)
                yield asin

        assert sorted(r.asin for r in sync_broker.stream(rows())) == wanted
        assert not any(lingers), lingers

    def test_close_from_another_thread_mid_stream_is_quiet(self, tmp_path: Path) -> None:
        """close() from another thread while a stream reads its input ends the stream with
        BrokerClosedError and leaves no pending task or unretrieved error behind."""
        done = _script(
            tmp_path,
            "import threading, time\n"
            "def rows():\n"
            "    for i in range(10_000):\n"
            "        time.sleep(0.01)\n"
            "        yield f'B0{i:08d}'\n"
            "out = []\n"
            "def consume():\n"
            "    try:\n"
            "        for _ in b.stream(rows()):\n"
            "            pass\n"
            "    except Exception as exc:\n"
            "        out.append(type(exc).__name__)\n"
            "t = threading.Thread(target=consume)\n"
            "t.start()\n"
            "time.sleep(1.0)\n"
            "b.close()\n"
            "t.join(10)\n"
            "import gc; gc.collect()\n"
            "print(out, t.is_alive())\n",
        )
        assert done.stdout.strip() == "['BrokerClosedError'] False"
        assert "never retrieved" not in done.stderr
        assert "destroyed but it is pending" not in done.stderr
        assert "Event loop is closed" not in done.stderr

    def test_an_unserved_marketplace_says_where_to_add_the_tag(
        self, sync_broker: SyncBroker
    ) -> None:
        """A config given in code has no file: the remedy names the config in code, not a
        file called <dict>."""
        result = sync_broker.get_item("B000000001", marketplace="www.amazon.de")
        assert result.error is not None
        assert result.error.code == "NoKeyForMarketplace"
        assert "<dict>" not in result.error.remedy
        assert "config given in code" in result.error.remedy

    def test_keys_tagged_for_another_store_only_name_the_default_marketplace(self) -> None:
        """Keys tagged for amazon.de only, api.marketplace unset (python-amazon-paapi's
        ``country="DE"`` carried over as a tag): the remedy also says to make amazon.de the
        default; it only said to add a tag for www.amazon.com."""
        document = _document(partner_tags={"DE": "demo-22"})
        with SyncBroker.from_dict(document) as broker:
            result = broker.get_item("B000000001")
            with pytest.raises(NoUsableKeyError) as caught:
                broker.search_items(keywords="kettle")
        assert result.error is not None
        assert result.error.code == "NoKeyForMarketplace"
        advice = '"api": {"marketplace": "www.amazon.de"}'
        assert advice in result.error.remedy
        assert advice in str(caught.value)

    def test_an_unserved_marketplace_in_a_search_says_where_to_add_the_tag(
        self, sync_broker: SyncBroker
    ) -> None:
        """A search there says the same (it named config.toml, whatever the source)."""
        with pytest.raises(NoUsableKeyError) as caught:
            sync_broker.search_items(keywords="kettle", marketplace="www.amazon.de")
        assert "config.toml" not in str(caught.value)
        assert "config given in code" in str(caught.value)

    def test_many_threads(self, sync_broker: SyncBroker) -> None:
        """Threads calling at once share one broker, each getting its own complete answer."""
        wanted = asins(40)

        def work(offset: int) -> list[str]:
            chunk = wanted[offset : offset + 20]
            return [r.asin for r in sync_broker.get_items(chunk) if r.ok]

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(work, [0, 10, 20, 0, 10, 20, 5, 15]))
        assert all(
            len(answer) == len(wanted[o : o + 20])
            for answer, o in zip(answers, [0, 10, 20, 0, 10, 20, 5, 15], strict=True)
        )
        # 8 calls of 20 ASINs: 16 full batches at most, fewer when calls overlap in time.
        assert sync_broker.metrics().requests <= 16

    def test_close(self) -> None:
        """close() stops the loop thread, is idempotent, and later calls raise."""
        before = {t.name for t in threading.enumerate()}
        broker = SyncBroker.from_dict(_document())
        assert "asin-broker-loop" in {t.name for t in threading.enumerate()}
        assert "open" in repr(broker)
        broker.close()
        broker.close()
        assert "closed" in repr(broker)
        assert not broker._thread.is_alive()
        with pytest.raises(BrokerClosedError, match="closed"):
            broker.get_item("B000000001")
        assert {t.name for t in threading.enumerate()} == before

    def test_every_concurrent_close_returns_closed(self) -> None:
        """close() from three threads at once: each returns once the broker is closed and
        its loop thread stopped; a later one returned at once, mid-close."""
        broker = SyncBroker.from_dict(_document())
        broker.get_item("B000000001")
        start = threading.Barrier(3)

        def close() -> bool:
            start.wait()
            broker.close()
            return not broker._thread.is_alive()

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda _: close(), range(3))) == [True, True, True]

    def test_never_closed_broker_closes_quietly_at_exit(self, tmp_path: Path) -> None:
        """A script that never closes its SyncBroker exits without pending-task warnings."""
        done = _script(tmp_path, "print(b.get_item('B000000001').status.value)\n")
        assert done.stdout.strip() == "ok"
        assert "destroyed but it is pending" not in done.stderr
        assert "Unclosed" not in done.stderr

    def test_never_closed_broker_with_a_sqlite_cache_closes_it_at_exit(
        self, tmp_path: Path
    ) -> None:
        """An unclosed SyncBroker with the SQLite item cache exits quietly and keeps its
        answers: the cache's worker thread was already stopped at exit, so its close raised
        a traceback ("cannot schedule new futures") and left the connection open."""
        cache = tmp_path / "items.sqlite3"
        script = (
            "from broker import SyncBroker\n"
            "b = SyncBroker.from_dict({'api': {'endpoint': 'simulator'}, 'keys': [{'name': 'k',"
            " 'credential_id': 'demo-id', 'version': '3.1',"
            " 'partner_tags': {'www.amazon.com': 'demo-20'}}],"
            f" 'cache': {{'max_age_s': 3600, 'path': {str(cache)!r}}}}})\n"
            "print(b.get_item('B000000001').status.value)\n"
        )
        done = _python(tmp_path, script)
        assert done.stdout.strip() == "ok"
        assert "Traceback" not in done.stderr
        assert "unclosed database" not in done.stderr
        with sqlite_db(cache) as db:
            assert db.execute("SELECT count(*) FROM item_cache").fetchone() == (1,)

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
    def test_a_forked_child_is_refused_and_exits(self, tmp_path: Path) -> None:
        """A SyncBroker started before fork() (gunicorn --preload): the child's call raises
        WrongEventLoopError at once instead of hanging, and the child exits (its exit does
        not wait for the parent's loop) without reporting the parent's broker as left open."""
        done = _script(
            tmp_path,
            "import os\n"
            "from broker import WrongEventLoopError\n"
            "b.get_item('B000000003')\n"  # a pooled connection and running tasks to inherit
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    try:\n"
            "        b.get_item('B000000001')\n"
            "    except WrongEventLoopError as exc:\n"
            "        print('child refused:', 'fork' in str(exc), flush=True)\n"
            "    raise SystemExit(0)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "print('child exit', os.waitstatus_to_exitcode(status))\n",
        )
        assert "child refused: True" in done.stdout
        assert "child exit 0" in done.stdout
        # The child's exit reports nothing about the parent's broker it inherited.
        assert "Task was destroyed" not in done.stderr
        assert "Unclosed client session\nclient_session" not in done.stderr

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
    def test_a_forked_childs_exit_leaves_the_parent_unharmed(self, tmp_path: Path) -> None:
        """A child forked from a process with a SyncBroker (multiprocessing's fork) that
        exits normally leaves the parent's connections alone: the parent's next call is
        answered at once, first time (the child's exit took the parent's pooled sockets
        out of the poller both share, and the parent's next call waited out its 30 s
        request timeout)."""
        done = _script(
            tmp_path,
            _FORK_THEN_CALL,
        )
        assert "parent ok 1 True" in done.stdout, done.stdout + done.stderr

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
    def test_a_closed_broker_still_referenced_leaves_the_fork_hook_whole(
        self, tmp_path: Path
    ) -> None:
        """Brokers opened and closed before the fork (a warm-up ``with`` block), still
        referenced: the child detaches the live one's poller all the same, says nothing,
        and the parent's next call is answered at once. The closed loop's missing poller
        raised in the hook (a traceback in every child) and left the live one shared, so the
        parent waited out its 30 s request timeout."""
        done = _script(
            tmp_path,
            _FORK_THEN_CALL,
            before=(
                "from broker import SyncBroker as _Warm\n"
                "warm = []\n"
                "for _ in range(4):\n"
                "    with _Warm.from_dict({'api': {'endpoint': 'simulator'}, 'keys': [{'name': "
                "'k', 'credential_id': 'demo-id', 'version': '3.1', 'partner_tags': "
                "{'www.amazon.com': 'demo-20'}}]}) as w:\n"
                "        w.get_item('B000000001')\n"
                "    warm.append(w)\n"
            ),
        )
        assert "parent ok 1 True" in done.stdout, done.stdout + done.stderr
        assert "_detach_in_child" not in done.stderr

    def test_closing_with_a_call_on_the_embedded_simulator_leaves_no_task(
        self, tmp_path: Path
    ) -> None:
        """A call given up on (its timeout) while the embedded simulator still answers it,
        then the broker closed: no task is left pending as the loop closes ("Task was
        destroyed but it is pending!" twice, since the simulator closes in 10 ms)."""
        script = (
            "from broker import SyncBroker\n"
            "doc = {'api': {'endpoint': 'simulator'}, 'keys': [{'name': 'k', 'credential_id':"
            " 'demo-id', 'version': '3.1', 'partner_tags': {'www.amazon.com': 'demo-20'}}],"
            " 'simulator': {'latency': {'fixed_ms': 300}}}\n"
            "with SyncBroker.from_dict(doc) as b:\n"
            "    try:\n"
            "        b.get_item('B000000001', timeout=0.05)\n"
            "    except TimeoutError:\n"
            "        print('timed out')\n"
            "print('closed')\n"
        )
        done = _python(tmp_path, script)
        assert done.stdout.splitlines() == ["timed out", "closed"]
        assert "Task was destroyed" not in done.stderr, done.stderr

    def test_after_the_exit_close_calls_say_closed(self, tmp_path: Path) -> None:
        """Closed at exit, the broker answers a later call (an atexit handler) with
        BrokerClosedError, and a stream left suspended ends without noise."""
        done = _script(
            tmp_path,
            "s = b.stream(['B000000001', 'B000000002'])\nprint(next(s).status.value)\n",
            before=(
                "import atexit\n"
                "from broker import BrokerClosedError\n"
                "def late():\n"
                "    try:\n"
                "        b.get_item('B000000001')\n"
                "    except BrokerClosedError:\n"
                "        print('closed')\n"
                "atexit.register(late)\n"
            ),
        )
        assert done.stdout.split() == ["ok", "closed"]
        assert "Exception ignored" not in done.stderr
        assert "never awaited" not in done.stderr

    def test_ctrl_c_as_the_loop_thread_starts_leaves_no_thread(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Ctrl-C landing in the loop thread's start (after the thread began) raises and
        leaves no loop thread running for the rest of the process."""
        real_start = threading.Thread.start

        def interrupted(self: threading.Thread) -> None:
            real_start(self)
            raise KeyboardInterrupt

        monkeypatch.setattr(threading.Thread, "start", interrupted)
        with pytest.raises(KeyboardInterrupt):
            SyncBroker.from_dict(_document(), environ={})
        monkeypatch.undo()
        deadline = time.monotonic() + 5
        while _loop_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _loop_threads() == []

    @pytest.mark.parametrize("where", ["scheduling", "closing"])
    def test_close_from_a_signal_handler_never_deadlocks(
        self, monkeypatch: pytest.MonkeyPatch, where: str
    ) -> None:
        """close() run by a signal handler of the thread that is inside a call (SIGTERM as
        a call is being scheduled) or inside close() itself returns, and the call raises
        BrokerClosedError: it waited forever for a lock its own thread held."""
        from broker import sync

        broker = SyncBroker.from_dict(_document(), environ={})
        real = sync.asyncio.run_coroutine_threadsafe
        landed: list[str] = []

        def handler_lands(coro: Any, loop: asyncio.AbstractEventLoop) -> Any:
            if not landed:
                landed.append(where)
                broker.close()  # as a signal handler of this thread would
            return real(coro, loop)

        outcome: list[object] = []

        def call() -> None:
            try:
                if where == "scheduling":
                    outcome.append(broker.get_item("B000000001"))
                else:
                    broker.close()
                    outcome.append("closed")
            except BaseException as exc:  # the outcome is what this test looks at
                outcome.append(exc)

        monkeypatch.setattr(sync.asyncio, "run_coroutine_threadsafe", handler_lands)
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(20)
        assert not caller.is_alive(), "deadlocked"
        monkeypatch.undo()
        broker.close()
        if where == "scheduling":
            assert len(outcome) == 1
            assert isinstance(outcome[0], BrokerClosedError)
        else:
            assert outcome == ["closed"]

    def test_close_from_a_signal_handler_as_close_begins_never_deadlocks(self) -> None:
        """A signal handler's close() that lands just as the first close() marks the broker
        closed returns: it found the broker closed by nobody it knew of, and waited for the
        close to end, which waited for the handler."""

        class Interrupted(SyncBroker):
            """Runs a nested close() (a signal handler's) the moment it is marked closed."""

            landed = False

            @property  # type: ignore[override]
            def _closed(self) -> bool:
                return bool(self.__dict__.get("closed_", False))

            @_closed.setter
            def _closed(self, value: bool) -> None:
                self.__dict__["closed_"] = value
                if value and not Interrupted.landed:
                    Interrupted.landed = True
                    self.close()

        broker = Interrupted.from_dict(_document(), environ={})
        closer = threading.Thread(target=broker.close, daemon=True)
        closer.start()
        closer.join(20)
        assert not closer.is_alive(), "deadlocked"
        assert Interrupted.landed

    def test_start_failure_leaves_no_thread(self) -> None:
        """A broker that fails while starting raises and leaves no thread behind."""
        before = threading.active_count()
        # The embedded simulator has no account for this credential: __aenter__ refuses it.
        with pytest.raises(ConfigError, match="no secret for credential 'nobody'"):
            SyncBroker.from_dict(_document(credential_id="nobody"), environ={})
        assert threading.active_count() == before

    @pytest.mark.parametrize("protocol", ["creators", "paapi5"])
    def test_a_real_key_left_on_the_default_endpoint_is_refused_at_start(
        self, protocol: str
    ) -> None:
        """A key given with its secret in code, but with api.endpoint left at its default
        (the simulator), is refused as it starts, saying where the requests would go: it was
        sent to the simulator, whose refusal blamed the credentials (check the secret)."""
        document = _document(protocol, credential_id="AKIAREALKEY12345678")
        del document["api"]["endpoint"]
        with pytest.raises(ConfigError) as caught:
            SyncBroker.from_dict(document, secrets={"demo": "real-secret"}, environ={})
        message = str(caught.value)
        assert "'AKIAREALKEY12345678' is no " + protocol + " account of the embedded" in message
        assert 'api.endpoint = "simulator" (the default)' in message
        assert 'set api.endpoint = "amazon"' in message
        assert "real-secret" not in message

    @pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
    def test_ctrl_c_while_starting_leaves_nothing_open(self, tmp_path: Path) -> None:
        """Ctrl-C as the SyncBroker's start ends raises KeyboardInterrupt and leaves no task,
        session or socket behind: the broker the start had just opened was never closed
        ("Task was destroyed but it is pending", an unclosed session)."""
        script = (
            "import os, signal, threading, time\n"
            "import broker.client\n"
            "from broker import SyncBroker\n"
            "real_enter = broker.client.Broker.__aenter__\n"
            "async def late_enter(self):\n"
            "    entered = await real_enter(self)\n"
            # Ctrl-C lands as the start ends, before it is handed over: sent from here, not
            # from a timer thread a loaded machine may wake after the start was handed over.
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(0.5)\n"
            "    return entered\n"
            "broker.client.Broker.__aenter__ = late_enter\n"
            "try:\n"
            "    SyncBroker.from_dict({'api': {'endpoint': 'simulator'}, 'keys': [{'name': 'k',"
            " 'credential_id': 'demo-id', 'version': '3.1',"
            " 'partner_tags': {'www.amazon.com': 'demo-20'}}]})\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted', flush=True)\n"
            "print('threads', threading.active_count())\n"
            "def link(fd):\n"
            "    try:\n"
            "        return os.readlink(f'/proc/self/fd/{fd}')\n"
            "    except OSError:\n"
            "        return ''\n"  # the directory's own fd, closed once listed
            "fds = os.listdir('/proc/self/fd')\n"
            "print('sockets', sum(link(fd).startswith('socket:') for fd in fds))\n"
        )
        done = _python(tmp_path, script)
        assert done.stdout.split() == ["interrupted", "threads", "1", "sockets", "0"], done.stderr
        assert "destroyed but it is pending" not in done.stderr
        assert "Unclosed" not in done.stderr
        assert "Exception ignored" not in done.stderr

    def test_paapi(self) -> None:
        """The PA-API protocol works the same, its items typed the same way."""
        with SyncBroker.from_dict(_document("paapi5")) as broker:
            result = broker.get_item("B000000001", resources=["ItemInfo.Title"])
            assert result.product is not None
            assert result.product.title


class TestConfigFromDict:
    """A configuration in code is checked like config.toml, with the same messages."""

    def test_same_messages_as_toml(self) -> None:
        """An invalid value gives exactly the TOML path's ConfigError."""
        document = _document(tps=-1)
        with pytest.raises(ConfigError) as from_code:
            config_from_dict(document, environ={})
        with pytest.raises(ConfigError) as from_toml:
            parse_config(document, environ={})
        assert str(from_code.value) == str(from_toml.value)
        assert "keys[0].tps" in str(from_code.value)

    def test_secrets_in_code(self) -> None:
        """Secrets from the application's settings: never in the document, never shown."""
        document = _document()
        document["api"]["endpoint"] = "amazon"
        with pytest.raises(ConfigError, match="credential_secret_env"):
            config_from_dict(document, environ={})
        config = config_from_dict(document, secrets={"demo": "s3cr3t-value"}, environ={})
        (key,) = config.keys
        assert key.secret == Secret("s3cr3t-value")
        assert key.secret_source == "secrets['demo']"
        assert "s3cr3t-value" not in repr(config)
        assert config_from_dict(document, secrets={"demo": Secret("x")}).keys[0].secret == Secret(
            "x"
        )

    @pytest.mark.parametrize("field", ["credential_secret", "secret"])
    def test_a_secret_in_the_document_points_at_secrets(self, field: str) -> None:
        """A secret written into the document in code (as the peer's constructor takes it)
        is refused naming secrets=, the way in code, not only an environment variable; the
        value is never shown."""
        document = _document()
        document["keys"][0][field] = "s3cr3t-value"
        with pytest.raises(ConfigError) as refused:
            config_from_dict(document, environ={})
        assert "secrets={'demo': ...}" in str(refused.value)
        assert "credential_secret_env" in str(refused.value)
        assert "s3cr3t-value" not in str(refused.value)
        with pytest.raises(ConfigError) as from_toml:
            parse_config(document, environ={})
        assert "secrets=" not in str(from_toml.value)

    @pytest.mark.parametrize(
        ("secrets", "key", "message"),
        [
            ({"other": "x"}, {}, "no key named 'other'"),
            ({"demo": ""}, {}, "is empty"),
            ({"demo": 42}, {}, "must be a str or a Secret, not int"),
            ({"demo": None}, {}, "must be a str or a Secret, not NoneType"),
            ({"demo": b"x"}, {}, "must be a str or a Secret, not bytes"),
            ({"demo": "x"}, {"credential_secret_env": "ASINB_X"}, "give one"),
        ],
    )
    def test_bad_secrets(self, secrets: dict[str, Any], key: dict[str, str], message: str) -> None:
        """secrets= naming no key, an empty secret or one not a string, or two sources are
        refused, each saying which."""
        with pytest.raises(ConfigError, match=message):
            config_from_dict(_document(**key), secrets=secrets, environ={})

    def test_secret_in_document_refused(self) -> None:
        """A secret written into the document itself is refused, as in the file."""
        with pytest.raises(ConfigError, match="secrets are never read"):
            config_from_dict(_document(credential_secret="oops"), environ={})


async def test_async_broker_from_dict() -> None:
    """Broker.from_dict builds the async broker from a document and secrets in code."""
    from broker import Broker

    document = {
        "api": {"endpoint": "simulator"},
        "keys": [
            {
                "name": "main",
                "credential_id": "demo-id",
                "version": "3.1",
                "partner_tags": {"US": "demo-20"},
            }
        ],
    }
    async with Broker.from_dict(document, secrets={"main": "demo-secret"}) as broker:
        result = await broker.get_item("B0C1234567")
    assert result.ok
    assert broker.config.keys[0].secret_source == "secrets['main']"


def _loop_threads() -> list[threading.Thread]:
    """The SyncBroker loop threads alive in this process."""
    return [t for t in threading.enumerate() if t.name == "asin-broker-loop" and t.is_alive()]


@pytest.mark.parametrize("endpoint", ["simulator", "amazon"])
def test_a_bad_simulator_table_is_refused_when_the_broker_is_built(endpoint: str) -> None:
    """A broker built in code refuses a bad [simulator] table at once, naming its key, as
    check-config does for the file, whatever the endpoint; it was refused only when the
    broker opened, and never against Amazon."""
    from broker import Broker

    document = _document()
    document["api"]["endpoint"] = endpoint
    document["simulator"] = {"seed": "x"}
    secrets = {"demo": "s"} if endpoint == "amazon" else None
    for build in (Broker.from_dict, SyncBroker.from_dict):
        with pytest.raises(ConfigError) as info:
            build(document, secrets=secrets)
        assert info.value.path == "simulator.seed"
