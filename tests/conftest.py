"""Shared helpers of the engine tests: config documents, a simulator + broker harness, fake time.

Tests import the plain helpers (``asins``, ``key_doc``, ``make_config``, ``CountingTransport``,
``drive``) from here and get resources through the ``harness`` fixture, whose exit stack
closes brokers before the simulators they talk to.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import hypothesis
import pytest
import structlog

from broker.client import Broker
from broker.config import BrokerConfig, parse_config
from broker.engine.transport import AiohttpTransport
from broker.errors import StateUnavailableError
from broker.jobs.signals import STOP_SIGNALS
from broker.simulator.accounts import Account
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import SimulatorSettings
from broker.state import Decision, MemoryStateStore
from broker.testing import FakeClock, settle

if TYPE_CHECKING:
    from broker.api.base import HttpRequest, RawResponse
    from broker.clock import Clock

# No per-example deadline for the property tests: with the suite on every core, a worker
# paused for another one's burst of work failed them as "too slow" (Flaky), proving nothing.
hypothesis.settings.register_profile("suite", deadline=None)
hypothesis.settings.load_profile("suite")

#: Secrets of the simulator's demo accounts, as the environment would hold them.
ENV: Mapping[str, str] = {
    "ASINB_DEMO_SECRET": "demo-secret",
    "ASINB_V2_SECRET": "demo-v2-secret",
    "ASINB_PAAPI_SECRET": "demo-secret-key",
}

US = "www.amazon.com"


@contextlib.contextmanager
def sqlite_db(path: Path | str, **options: Any) -> Iterator[sqlite3.Connection]:
    """A SQLite connection that commits on success, as ``with sqlite3.connect(...)`` does,
    and is closed after (Python 3.13 warns about a connection collected unclosed)."""
    conn = sqlite3.connect(path, **options)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


class FullAtCheckpoint:
    """A SQLite connection on a disk that fills up before it closes: its commits went into
    the write-ahead log, but copying the log into the file fails with SQLITE_FULL, as SQLite
    says it on a full tmpfs (the file cannot grow to take the pages). Everything else is the
    wrapped connection's."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        """Run ``sql``; a checkpoint, or a switch out of WAL mode (which checkpoints), fails."""
        if "wal_checkpoint" in sql or "journal_mode = DELETE" in sql:
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
            raise error
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def asins(count: int, prefix: str = "B0") -> list[str]:
    """``count`` distinct well-formed ASINs starting with ``prefix``."""
    width = 10 - len(prefix)
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def key_doc(
    name: str = "demo",
    *,
    credential_id: str = "demo-id",
    env: str = "ASINB_DEMO_SECRET",
    version: str | None = "3.1",
    tps: float = 100.0,
    tpd: int = 100_000,
    tags: Mapping[str, str] | None = None,
    **extra: object,
) -> dict[str, object]:
    """One ``[[keys]]`` table (the demo Creators key by default)."""
    doc: dict[str, object] = {
        "name": name,
        "credential_id": credential_id,
        "credential_secret_env": env,
        "partner_tags": dict(tags or {US: "demo-20"}),
        "tps": tps,
        "tpd": tpd,
        **extra,
    }
    if version is not None:
        doc["version"] = version
    return doc


def paapi_key_doc(name: str = "paapi", **overrides: Any) -> dict[str, object]:
    """The simulator's demo PA-API key (DEMOACCESSKEY)."""
    params: dict[str, Any] = {
        "credential_id": "DEMOACCESSKEY",
        "env": "ASINB_PAAPI_SECRET",
        "version": None,
    }
    params.update(overrides)
    return key_doc(name, **params)


def embedded_toml(
    *, tps: float = 50.0, api: str = "", engine: str = "", simulator: str = ""
) -> str:
    """A ``config.toml`` for the embedded simulator: its demo Creators key, tpd 0, JSON logs.

    ``api`` adds lines to ``[api]``; ``engine`` and ``simulator``, when given, are the bodies
    of an ``[engine]`` and a ``[simulator]`` table (TOML lines).
    """
    text = (
        f'[api]\nendpoint = "simulator"\n{api}\n'
        '[[keys]]\nname = "demo"\ncredential_id = "demo-id"\nversion = "3.1"\n'
        f'partner_tags = {{ "www.amazon.com" = "demo-20" }}\ntps = {tps}\ntpd = 0\n\n'
    )
    if engine:
        text += f"[engine]\n{engine}\n"
    text += '[log]\nformat = "json"\n'
    if simulator:
        text += f"\n[simulator]\n{simulator}\n"
    return text


def embedded_document(**tables: Mapping[str, object]) -> dict[str, object]:
    """A config document (parsed TOML) for the embedded simulator and its demo key; a
    ``keys`` table adds to the key's fields, the others are tables of their own."""
    key: dict[str, object] = {
        "name": "demo",
        "credential_id": "demo-id",
        "version": "3.1",
        "partner_tags": {"www.amazon.com": "demo-20"},
        **tables.pop("keys", {}),
    }
    return {"api": {"endpoint": "simulator"}, "keys": [key], **tables}


def make_config(
    endpoint: str,
    *,
    protocol: str = "creators",
    keys: list[dict[str, object]] | None = None,
    environ: Mapping[str, str] | None = None,
    **tables: Mapping[str, object],
) -> BrokerConfig:
    """A validated config for ``endpoint`` (fast retries and a short linger by default)."""
    document: dict[str, object] = {
        "api": {"protocol": protocol, "endpoint": endpoint},
        "keys": keys
        if keys is not None
        else [paapi_key_doc() if protocol == "paapi5" else key_doc()],
        "engine": {"linger_s": 0.005, **tables.pop("engine", {})},
        "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05, **tables.pop("retry", {})},
        **tables,
    }
    return parse_config(document, environ={**ENV, **(environ or {})})


def account(name: str, credential_id: str, secret: str, **fields: Any) -> Account:
    """A Creators simulator account tagged for www.amazon.com."""
    params: dict[str, Any] = {"version": "3.1", "partner_tags": {US: ("demo-20",)}}
    params.update(fields)
    protocol = params.pop("protocol", "creators")
    return Account(name, protocol, credential_id, secret, **params)


class CountingStore:
    """Wraps a key-state store in memory, standing in for a shared one (Redis, as the engine
    sees it: keep-alive beats go to it); counts the decisions asked of it."""

    backend = "redis"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def decide(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.inner.decide(*args, **kwargs)


class CountingTransport:
    """Wraps a transport; counts requests (by URL path) and those in flight right now."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.in_flight = 0
        self.requests: list[HttpRequest] = []
        self.responses: list[RawResponse] = []

    async def send(self, request: HttpRequest) -> RawResponse:
        """Send through the wrapped transport, counting."""
        self.in_flight += 1
        self.requests.append(request)
        try:
            response = await self.inner.send(request)
        finally:
            self.in_flight -= 1
        self.responses.append(response)
        return response

    def count(self, path_part: str) -> int:
        """Requests whose URL contains ``path_part``."""
        return sum(1 for request in self.requests if path_part in request.url)


async def drive(
    clock: FakeClock,
    task: asyncio.Future[Any],
    transport: CountingTransport,
    *,
    limit_s: float = 3 * 86_400.0,
    real_timeout_s: float = 30.0,
) -> None:
    """Run ``task`` on ``clock``, jumping fake time only while no request is in flight.

    ``FakeClock.run_until`` cannot wait for real sockets; this does: while a request is on
    the wire it lets real time pass, and when the loop is idle it jumps to the next sleeper.
    """
    end = clock.monotonic() + limit_s
    async with asyncio.timeout(real_timeout_s):
        while not task.done():
            if transport.in_flight:
                await asyncio.sleep(0.0005)
                continue
            await settle()
            if task.done() or transport.in_flight:
                continue
            deadline = clock.next_deadline()
            if deadline is None:
                await asyncio.sleep(0.0005)
                continue
            if deadline > end:
                raise TimeoutError(f"fake time limit of {limit_s} s reached")
            await clock.advance(max(0.0, deadline - clock.monotonic()))
    await task


class QuotaRig(NamedTuple):
    """A fake clock, a simulator on it, a counting transport, and a broker using both."""

    clock: FakeClock
    sim: SimulatorServer
    transport: CountingTransport
    config: BrokerConfig
    broker: Broker


class Harness:
    """Starts simulators and brokers inside one exit stack (closed in reverse order)."""

    async def quota_rig(
        self, *, tps: float, server_tpd: int, key_tpd: int, epoch: datetime | None = None
    ) -> QuotaRig:
        """A FakeClock at 12:00 UTC (or ``epoch``); the simulator's demo account at ``tps``
        and ``server_tpd`` a day; a broker whose demo key has ``tps`` and ``key_tpd``."""
        clock = FakeClock() if epoch is None else FakeClock(epoch=epoch)
        settings = SimulatorSettings(
            accounts=(account("demo", "demo-id", "demo-secret", tps=tps, tpd=server_tpd),)
        )
        sim = await self.simulator(settings, clock=clock)
        transport = await self.transport()
        config = make_config(sim.url, keys=[key_doc(tps=tps, tpd=key_tpd)])
        broker = await self.broker(config, clock=clock, transport=transport)
        return QuotaRig(clock, sim, transport, config, broker)

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack

    async def simulator(
        self, settings: SimulatorSettings | None = None, *, clock: Clock | None = None
    ) -> SimulatorServer:
        """A simulator on a free loopback port."""
        return await self._stack.enter_async_context(SimulatorServer(settings, clock=clock))

    async def transport(self, **kwargs: Any) -> CountingTransport:
        """An open aiohttp transport wrapped in a counter."""
        inner = await self._stack.enter_async_context(AiohttpTransport(**kwargs))
        return CountingTransport(inner)

    async def broker(self, config: BrokerConfig, **kwargs: Any) -> Broker:
        """An open broker (closed before anything started earlier)."""
        return await self._stack.enter_async_context(Broker(config, **kwargs))


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A harness whose simulators and brokers are closed after the test."""
    async with contextlib.AsyncExitStack() as stack:
        yield Harness(stack)


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Every test starts with structlog's defaults: CLI tests configure it process-wide."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every process it starts) gets its own state directory.

    The item cache and the shared key state live there by default; without this, one
    test's answers and request counts would leak into the next through ~/.local/state.
    """
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@contextlib.contextmanager
def sighup_at_default() -> Iterator[None]:
    """Start a child a test stops with SIGHUP with that signal at its default, whatever the
    suite inherited (``nohup pytest``: ignored, and a broker keeps a signal it was started
    ignoring, so the child would finish instead of stopping). Set in this process around
    the start, not in a ``preexec_fn``, which is unsafe while threads run."""
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, before)


def wait_for_stop_handlers(proc: subprocess.Popen[str], *, within_s: float = 60) -> None:
    """Wait until a ``run``, ``lookup`` or ``serve`` started in ``proc`` catches its stop
    signals, so a test's signal reaches the command instead of killing the interpreter as it
    starts (a fixed sleep was too short on a loaded machine, too long on an idle one).

    Read from Linux's ``/proc/PID/status``: every stop signal caught (SIGINT, SIGTERM and
    SIGHUP, installed one after another). Fails if the process ends first.
    """
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.monotonic() + within_s
    while True:
        assert proc.poll() is None, "the process ended before it caught its stop signals"
        masks = dict(line.split(":", 1) for line in status.read_text().splitlines())
        caught = int(masks["SigCgt"], 16)
        if all(caught >> (sig - 1) & 1 for sig in STOP_SIGNALS):
            return
        assert time.monotonic() < deadline, f"no stop handlers within {within_s} s"
        time.sleep(0.02)


def pytest_configure(config: pytest.Config) -> None:
    """Take Ctrl-C as Python does when the suite was started with SIGINT ignored (``pytest &``
    from a script or a subshell, where the shell ignores it for background commands):
    children inherit an ignored signal, and every test that stops one with SIGINT would see
    it ignored, as the broker keeps a signal it was started ignoring."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class OutageStore(MemoryStateStore):
    """A key-state store (not in memory: a Redis) that is out of reach while ``down`` is
    set, on ``clock``."""

    backend = "redis"  # type: ignore[assignment]

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(
            lambda: int(clock.monotonic() * 1e6), lambda: int(clock.utcnow().timestamp() * 1e6)
        )
        self.down = False

    async def decide(self, *args: Any, **kwargs: Any) -> Decision:
        if self.down:
            raise StateUnavailableError("redis", "redis://127.0.0.1:1/0: ConnectionError")
        return await super().decide(*args, **kwargs)
