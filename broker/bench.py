"""``broker bench``: the broker against a rate-limited simulator in another process, measured.

The simulator runs as a child process (:class:`~broker.simulator.process.SimulatorProcess`)
with one account per key at the chosen true rate, server burst, latency and faults. The
broker streams an endless backlog of unique ASINs through those keys, so every key always
has work. After a warm-up (which also spends the server bucket's initial burst), a window
of ``duration`` seconds is measured:

- on the server side, from ``GET /_sim/stats`` timestamps: requests granted and throttled,
  so "granted / allowed" is what Amazon's quota would have let through, counted by the
  side that enforces it (``ratelimit.md`` 5.2);
- on the client side: requests, ASINs answered, retries after errors other than a 429 (a
  throttled request is sent again too, counted in the 429 share), per-request latency
  (timed around the transport, of the GetItems requests that ended), CPU time of this
  process per request, and peak RSS.

The same account builders serve the scripts in ``benchmarks/``, and the defaults set their
latency (40 ms plus an exponential draw of mean 10 ms, each way), so the CLI with its
defaults measures what the published figures do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from broker.config import MAX_IN_FLIGHT, MAX_TPS, BrokerConfig, RateConfig, parse_config
from broker.errors import ConfigError, NoUsableKeyError, SimulatorStartError
from broker.exitcode import ExitCode
from broker.progname import prog
from broker.simulator.settings import MIN_ACCOUNT_TPS, FaultRates
from broker.termwidth import columns, pad

if TYPE_CHECKING:
    from broker.api.base import HttpRequest, RawResponse
    from broker.client import Broker
    from broker.engine.transport import AiohttpTransport

__all__ = [
    "MARKETPLACE",
    "STOPPED_CODE",
    "BenchOptions",
    "BenchReport",
    "Stopped",
    "asin_stream",
    "backlog",
    "bench_command",
    "broker_config",
    "creators_account",
    "floor_rate",
    "format_table",
    "loop_factory",
    "paapi_account",
    "run_bench",
    "run_stoppable",
    "stop_signals",
]

_T = TypeVar("_T")

MARKETPLACE = "www.amazon.com"
#: The fault switches ``--fault`` accepts: every per-request rate of ``[simulator.faults]``.
# Faults of the Creators API's bearer tokens: a PA-API run would inject none of them.
_TOKEN_FAULTS = ("expired_token", *FaultRates.TOKEN_KINDS)
_FAULT_KINDS = (*FaultRates.RESPONSE_KINDS, *_TOKEN_FAULTS)
#: How many request latencies the bench keeps (the newest win); bounds its own memory.
_LATENCY_RING = 1_000_000


# -- accounts and configs ---------------------------------------------------------------------


def creators_account(index: int, *, tps: float, tpd: int = 10_000_000) -> dict[str, object]:
    """A Creators v3.1 simulator account ``k<index>`` with its own credential and tag."""
    return {
        "name": f"k{index}",
        "protocol": "creators",
        "credential_id": f"bench-{index}-id",
        "secret": f"bench-{index}-secret",
        "version": "3.1",
        "partner_tags": {MARKETPLACE: f"bench{index}-20"},
        "tps": tps,
        "tpd": tpd,
    }


def paapi_account(index: int, *, tps: float, tpd: int = 10_000_000) -> dict[str, object]:
    """A PA-API simulator account ``p<index>`` with its own access key and tag."""
    return {
        "name": f"p{index}",
        "protocol": "paapi5",
        "access_key": f"BENCHACCESSKEY{index}",
        "secret": f"bench-{index}-secret-key",
        "partner_tags": {MARKETPLACE: f"bench{index}-20"},
        "tps": tps,
        "tpd": tpd,
    }


# The config's own floor for a key's rate after 429s.
_MIN_RATE: Final = RateConfig().min_rate


def broker_config(
    url: str,
    accounts: Sequence[Mapping[str, object]],
    *,
    tps: float,
    max_in_flight: int = 4,
    tpd: int = 0,
    engine: Mapping[str, object] | None = None,
    rate: Mapping[str, object] | None = None,
    state_path: Path | None = None,
) -> BrokerConfig:
    """A broker config with one key per simulator account, pointed at ``url``.

    Secrets go through the environment mapping, as they must for a non-simulator endpoint.
    ``tpd = 0`` means no daily guard on the client (the simulator's TPD is set far away).
    The floor a 429 cuts a key to is :func:`floor_rate` unless ``rate`` names one: a slow
    run gets a lower floor than the config's default, not an error about a key it never
    wrote.
    ``state_path`` is the keys' SQLite state file; None leaves it to ``[state]``'s default,
    the machine's file, which keeps a row per key for ever (the simulator's port, and so
    its keys, are new each run): a run of its own gives a file of its own.
    """
    protocol = str(accounts[0]["protocol"])
    keys: list[dict[str, object]] = []
    environ: dict[str, str] = {}
    for index, account in enumerate(accounts):
        env_name = f"ASINB_BENCH_{index}_SECRET"
        environ[env_name] = str(account["secret"])
        tags = account["partner_tags"]
        assert isinstance(tags, Mapping)
        key: dict[str, object] = {
            "name": str(account["name"]),
            "credential_id": str(account.get("credential_id") or account["access_key"]),
            "credential_secret_env": env_name,
            "partner_tags": dict(tags),
            "tps": tps,
            "tpd": tpd,
            "max_in_flight": max_in_flight,
        }
        if protocol == "creators":
            key["version"] = str(account["version"])
        keys.append(key)
    document: dict[str, object] = {
        "api": {"protocol": protocol, "endpoint": url, "marketplace": MARKETPLACE},
        "keys": keys,
        "engine": dict(engine or {}),
        "rate": {"min_rate": floor_rate(tps), **(rate or {})},
    }
    if state_path is not None:
        document["state"] = {"path": str(state_path)}
    return parse_config(document, environ=environ, source="<benchmark>")


def floor_rate(tps: float) -> float:
    """The floor a 429 cuts a key of ``tps`` to: the config's default, or a tenth of a
    slower key's rate (the config refuses a floor at or above a key's rate)."""
    return min(_MIN_RATE, tps / 10)


def asin_stream(prefix: str = "B", start: int = 0) -> Iterator[str]:
    """Unique well-formed ASINs forever: ``prefix`` + a hex counter, 10 characters.

    The prefix is a letter, so no id is all digits (an ISBN-10 needs a check digit).
    """
    width = 10 - len(prefix)
    number = start
    while True:
        yield f"{prefix}{number:0{width}X}"
        number += 1


@contextlib.asynccontextmanager
async def backlog(broker: Broker) -> AsyncIterator[Counter[str]]:
    """Keep ``broker`` busy with unique ASINs for the block; yield the statuses so far.

    The stream admits lookups only as capacity frees up, so memory stays bounded however
    long the block runs. Leaving the block cancels the stream; a stream that failed on its
    own re-raises its error there.
    """
    statuses: Counter[str] = Counter()

    async def consume() -> None:
        async for result in broker.stream(asin_stream()):
            statuses[result.status.value] += 1

    consumer = asyncio.get_running_loop().create_task(consume())
    try:
        yield statuses
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory for ``"uvloop"`` or ``"asyncio"``."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown loop {name!r}")


# -- options and report -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What one bench run sets up."""

    keys: int = 1
    #: the simulator's true rate per key; 0 turns its limits off
    tps: float = 5.0
    #: the broker's configured rate per key (None: the true rate)
    broker_tps: float | None = None
    burst: int = 1
    protocol: str = "creators"
    loop: str = "uvloop"
    duration_s: float = 30.0
    warmup_s: float = 3.0
    latency_ms: float = 80.0
    jitter_ms: float = 20.0
    max_in_flight: int = 4
    faults: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        # Each message names the command-line flag: the options come from there.
        if self.keys < 1:
            raise ConfigError("--keys", f"must be at least 1, got {self.keys}")
        _number("--tps", self.tps, low=0.0, hint=" (0 turns the simulator's limits off)")
        if 0 < self.tps < MIN_ACCOUNT_TPS:
            raise ConfigError(
                "--tps", f"must be 0 (the simulator's limits off) or at least {MIN_ACCOUNT_TPS:g}"
            )
        if self.broker_tps is not None:
            _number("--broker-tps", self.broker_tps, low=0.0, strict=True, high=MAX_TPS)
        elif self.tps > MAX_TPS:
            raise ConfigError(
                "--tps",
                f"the broker's keys run at the server's rate, and a key's tps is at most "
                f"{MAX_TPS:g}: add --broker-tps (at most {MAX_TPS:g}) to try a faster server",
            )
        if self.burst < 1:
            raise ConfigError("--burst", f"must be at least 1, got {self.burst}")
        _number("--duration", self.duration_s, low=0.0, strict=True)
        _number("--warmup", self.warmup_s, low=0.0)
        _number("--latency-ms", self.latency_ms, low=0.0)
        _number("--jitter-ms", self.jitter_ms, low=0.0)
        if not 1 <= self.max_in_flight <= MAX_IN_FLIGHT:
            raise ConfigError(
                "--max-in-flight",
                f"must be between 1 and {MAX_IN_FLIGHT}, got {self.max_in_flight}",
            )
        if self.protocol not in ("creators", "paapi5"):
            raise ConfigError("--protocol", "must be 'creators' or 'paapi5'")
        unknown = sorted(set(self.faults) - set(_FAULT_KINDS))
        if unknown:
            known = ", ".join(_FAULT_KINDS)
            raise ConfigError("--fault", f"unknown fault {unknown[0]!r}; known: {known}")
        FaultRates.check_sums(self.faults, "--fault")
        tokens = sorted(set(self.faults) & set(_TOKEN_FAULTS))
        if tokens and self.protocol == "paapi5":
            raise ConfigError(
                "--fault",
                f"{tokens[0]} is a Creators API fault (its bearer tokens); PA-API signs each "
                "request and has no token to expire: use it with --protocol creators",
            )

    @property
    def client_tps(self) -> float:
        """The rate the broker is configured with per key."""
        if self.broker_tps is not None:
            return self.broker_tps
        # With the server unlimited: the highest rate a key may be configured with, more
        # than one simulator process serves.
        return self.tps if self.tps > 0 else MAX_TPS

    def simulator_settings(self) -> dict[str, object]:
        """The ``[simulator]`` table of this run."""
        true_tps = self.tps if self.tps > 0 else 1_000_000.0
        make = creators_account if self.protocol == "creators" else paapi_account
        return {
            "seed": self.seed,
            "burst": self.burst,
            "limits": self.tps > 0,
            "demo_accounts": False,
            "latency": {"fixed_ms": self.latency_ms / 2, "exp_mean_ms": self.jitter_ms / 2},
            "faults": dict(self.faults),
            "accounts": [make(i, tps=true_tps) for i in range(self.keys)],
        }


def _number(
    flag: str,
    value: float,
    *,
    low: float,
    strict: bool = False,
    hint: str = "",
    high: float = math.inf,
) -> None:
    """Refuse a value that is not finite, below ``low`` (``strict``: not above it), or
    above ``high``."""
    if math.isfinite(value) and value > high:
        raise ConfigError(flag, f"must be at most {high:g}, got {value:g}")
    below = value <= low if strict else value < low
    if not math.isfinite(value) or below:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ConfigError(flag, f"must be a finite number {bound}{hint}, got {value:g}")


@dataclass(frozen=True, slots=True)
class BenchReport:
    """The measured window of one run."""

    options: BenchOptions
    window_s: float
    requests: int
    asins: int
    items_by_status: Mapping[str, int]
    granted: int
    throttled_server: int
    allowed_per_s: float | None
    throttled_client: int
    retries: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    cpu_s: float
    peak_rss_mb: float
    faults_injected: Mapping[str, int]

    @property
    def requests_per_s(self) -> float:
        """Requests the client sent per second of the window."""
        return self.requests / self.window_s

    @property
    def asins_per_s(self) -> float:
        """ASINs answered (any status) per second of the window."""
        return self.asins / self.window_s

    @property
    def granted_per_s(self) -> float:
        """Requests the server accepted per second of the window."""
        return self.granted / self.window_s

    @property
    def utilisation_pct(self) -> float | None:
        """Granted over allowed, in percent (None with the server's limits off)."""
        if not self.allowed_per_s:
            return None
        return 100.0 * self.granted_per_s / self.allowed_per_s

    @property
    def share_429_pct(self) -> float:
        """Throttled over arrived, counted by the server, in percent."""
        arrived = self.granted + self.throttled_server
        return 100.0 * self.throttled_server / arrived if arrived else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        """Client CPU (user + system) per request sent."""
        return 1e6 * self.cpu_s / self.requests if self.requests else None

    def to_json(self) -> dict[str, object]:
        """Every figure, JSON-ready."""
        options = asdict(self.options)
        options["faults"] = dict(self.options.faults)
        return {
            "options": options,
            "window_s": round(self.window_s, 3),
            "requests": self.requests,
            "requests_per_s": round(self.requests_per_s, 2),
            "asins": self.asins,
            "asins_per_s": round(self.asins_per_s, 1),
            "items_by_status": dict(self.items_by_status),
            "granted": self.granted,
            "granted_per_s": round(self.granted_per_s, 2),
            "allowed_per_s": self.allowed_per_s,
            "utilisation_pct": _rounded(self.utilisation_pct, 2),
            "throttled_server": self.throttled_server,
            "share_429_pct": round(self.share_429_pct, 2),
            "throttled_client": self.throttled_client,
            "retries": self.retries,
            "latency_p50_ms": _rounded(self.latency_p50_ms, 1),
            "latency_p99_ms": _rounded(self.latency_p99_ms, 1),
            "cpu_us_per_request": _rounded(self.cpu_us_per_request, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "faults_injected": dict(self.faults_injected),
        }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


_COLUMNS = (
    "loop",
    "req/s",
    "ASINs/s",
    "granted/allowed req/s",
    "util",
    "429s",
    "other retries",
    "p50 ms",
    "p99 ms",
    "CPU us/req",
    "peak RSS MB",
)


def render_table(reports: Sequence[BenchReport]) -> str:
    """A plain aligned table, one row per report, with a heading line of the setup."""
    first = reports[0].options
    limits = (
        f"{first.keys} key(s) x {first.tps:g} TPS, server burst {first.burst}"
        if first.tps > 0
        else f"{first.keys} key(s), simulator limits off"
    )
    faults = ", ".join(f"{k}={v:g}" for k, v in sorted(first.faults.items())) or "none"
    head = (
        f"{prog()} bench: {limits}; broker at {first.client_tps:g} TPS/key; {first.protocol}; "
        f"latency {first.latency_ms / 2:g} ms + Exp({first.jitter_ms / 2:g} ms) each way; "
        f"faults {faults}; "
        f"{first.duration_s:g} s window after {first.warmup_s:g} s warm-up"
    )
    rows: list[list[str]] = []
    for report in reports:
        util = report.utilisation_pct
        allowed = f"{report.allowed_per_s:.1f}" if report.allowed_per_s else "-"
        rows.append(
            [
                report.options.loop,
                f"{report.requests_per_s:.1f}",
                f"{report.asins_per_s:.1f}",
                f"{report.granted_per_s:.1f}/{allowed}",
                "-" if util is None else f"{util:.1f}%",
                f"{report.share_429_pct:.2f}%",
                str(report.retries),
                _cell(report.latency_p50_ms),
                _cell(report.latency_p99_ms),
                _cell(report.cpu_us_per_request, "{:.0f}"),
                f"{report.peak_rss_mb:.0f}",
            ]
        )
    lines = [head, "", format_table(_COLUMNS, rows), ""]
    for report in reports:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(report.items_by_status.items()))
        injected = ", ".join(f"{k} x{n}" for k, n in sorted(report.faults_injected.items()))
        lines.append(
            f"{report.options.loop}: ASINs {statuses or 'none'}; "
            f"faults injected: {injected or 'none'}"
        )
    return "\n".join(lines)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain right-aligned text table: a header row, a rule, then the rows."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(columns(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(pad(c, w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


# -- the run ----------------------------------------------------------------------------------


class _TimedTransport:
    """Wraps the real transport and keeps (start, seconds) of every GetItems request that
    ended, answered or failed (a hang timed out shows in p99): a token call is no lookup,
    and a request cut off when the run ends has no latency to tell."""

    def __init__(self, inner: AiohttpTransport, clock: Callable[[], float]) -> None:
        self._inner = inner
        self._clock = clock
        self.samples: deque[tuple[float, float]] = deque(maxlen=_LATENCY_RING)

    async def send(self, request: HttpRequest) -> RawResponse:
        start: float | None = self._clock()
        try:
            return await self._inner.send(request)
        except asyncio.CancelledError:
            start = None  # the run ended under it
            raise
        finally:
            # Creators' .../getItems and PA-API's /paapi5/getitems.
            if start is not None and request.url.lower().endswith("/getitems"):
                self.samples.append((start, self._clock() - start))


def window_latencies_ms(
    samples: Iterable[tuple[float, float]], start: float, end: float
) -> list[float]:
    """The latencies (ms, sorted) of the requests, ``(began, seconds)``, that ended in
    ``[start, end)``: a hang of 30 s counts in the window it ends in (by when it began, none
    was ever counted in a 30-s window, and the p99 looked good while hangs choked it)."""
    return sorted(1000.0 * took for began, took in samples if start <= began + took < end)


def _percentile(values: Sequence[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes; we run on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _measure(url: str, options: BenchOptions) -> BenchReport:
    settings = options.simulator_settings()
    accounts = settings["accounts"]
    assert isinstance(accounts, list)
    # The keys' state as a run has it (SQLite), in a file that goes with the run.
    with tempfile.TemporaryDirectory(prefix="asinb-bench-") as tmp:
        config = broker_config(
            url,
            accounts,
            tps=options.client_tps,
            max_in_flight=options.max_in_flight,
            state_path=Path(tmp) / "keys.sqlite3",
        )
        return await _measure_with(url, options, config)


async def _measure_with(url: str, options: BenchOptions, config: BrokerConfig) -> BenchReport:
    import aiohttp

    from broker.client import Broker
    from broker.engine.transport import AiohttpTransport
    from broker.simulator.process import sim_stats

    engine = config.engine
    inner = AiohttpTransport(
        timeout_s=engine.request_timeout_s,
        connect_timeout_s=engine.connect_timeout_s,
        max_body_bytes=engine.max_body_bytes,
        max_connections=engine.max_connections,
    )
    transport = _TimedTransport(inner, time.perf_counter)
    async with (
        inner,
        Broker(config, transport=transport) as broker,
        aiohttp.ClientSession() as session,
        backlog(broker) as statuses,
    ):
        await asyncio.sleep(options.warmup_s)
        before = await sim_stats(session, url, timestamps=False)
        start = float(before["now"])
        metrics0, statuses0 = broker.metrics(), Counter(statuses)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(options.duration_s)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        metrics1, statuses1 = broker.metrics(), Counter(statuses)
        stats = await sim_stats(session, url, since=start)

    end = float(stats["now"])
    granted = throttled = 0
    for account in stats["accounts"].values():
        granted += sum(1 for t in account.get("accepted_at", ()) if start <= t < end)
        throttled += sum(1 for t in account.get("throttled_at", ()) if start <= t < end)
    latencies = window_latencies_ms(transport.samples, wall0, wall1)
    injected = {k: int(v) - int(before["faults"].get(k, 0)) for k, v in stats["faults"].items()}
    items = statuses1 - statuses0
    return BenchReport(
        options=options,
        window_s=wall1 - wall0,
        requests=metrics1.requests - metrics0.requests,
        asins=sum(items.values()),
        items_by_status=dict(items),
        granted=granted,
        throttled_server=throttled,
        allowed_per_s=options.tps * options.keys if options.tps > 0 else None,
        throttled_client=metrics1.throttled - metrics0.throttled,
        retries=metrics1.retries - metrics0.retries,
        latency_p50_ms=_percentile(latencies, 50),
        latency_p99_ms=_percentile(latencies, 99),
        cpu_s=cpu1 - cpu0,
        peak_rss_mb=_peak_rss_mb(),
        faults_injected={k: v for k, v in injected.items() if v},
    )


def run_bench(options: BenchOptions, *, stop_on_signals: bool = False) -> BenchReport:
    """Start the simulator in a child process, run the broker against it, return the figures.

    Args:
        options: the run.
        stop_on_signals: SIGTERM and SIGINT raise :class:`Stopped` out of the run (the
            command's choice; the main thread only), so the child is stopped on the way out.
    """
    from broker.simulator.process import SimulatorProcess

    with (
        SimulatorProcess(options.simulator_settings()) as sim,
        asyncio.Runner(loop_factory=loop_factory(options.loop)) as runner,
    ):
        measure = _measure(sim.url, options)
        if stop_on_signals:
            return run_stoppable(runner, measure)
        return runner.run(measure)


def run_stoppable(runner: asyncio.Runner, run: Coroutine[Any, Any, _T]) -> _T:
    """``runner.run(run)``, cancelled by SIGTERM, SIGINT or SIGHUP, which then raise
    :class:`Stopped` (inside :func:`stop_signals`; the benchmarks' scripts use it too).

    The loop's own signal handlers, in place before the loop runs and taken out after it
    stopped: a Python handler that raises inside a running loop is not propagated (uvloop
    prints the exception and runs on; asyncio does so for a signal that lands in a
    callback), so a stop arriving as the loop started or ended was lost, and the stop
    signals ignored from then on.
    """
    loop = runner.get_loop()
    caught: list[signal.Signals] = []
    tasks: list[asyncio.Task[Any]] = []

    def stop(sig: signal.Signals) -> None:
        if not caught:
            caught.append(sig)
            for task in tasks:
                task.cancel()

    async def main() -> _T:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        if _RAISED and not caught:
            # A stop whose Stopped was lost before the loop ran (see _stop_signal): the
            # stop signals are ignored since, so the loop would never hear of it.
            caught.append(_RAISED[0])
        if caught:
            run.close()
            raise asyncio.CancelledError
        return await run

    # A signal the process was started with ignored (SIGINT for a background job of a
    # script) stays ignored, as the shell meant.
    watched = tuple(s for s in _STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)
    for sig in watched:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return runner.run(main())
    except asyncio.CancelledError:
        if caught:
            raise Stopped(caught[0]) from None
        raise
    finally:
        # Held back while the handlers change: removing the loop's handler restores the
        # default action, which a signal arriving just then would take (no cleanup).
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        try:
            for sig in watched:
                loop.remove_signal_handler(sig)
                # Outside the loop (the simulator stopping), the plain handler; once
                # stopped, nothing may interrupt the cleanup.
                signal.signal(sig, signal.SIG_IGN if caught else _stop_signal)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)


# -- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``broker bench``."""
    parser.add_argument("--keys", type=int, default=1, help="keys (default: %(default)s)")
    parser.add_argument(
        "--tps",
        type=float,
        default=5.0,
        help="the simulator's true rate per key; 0 turns its limits off (default: %(default)s)",
    )
    parser.add_argument(
        "--broker-tps",
        type=float,
        help="the rate the broker is configured with per key (default: the true rate)",
    )
    parser.add_argument(
        "--burst", type=int, default=1, help="the simulator's bucket depth (default: %(default)s)"
    )
    parser.add_argument(
        "--protocol",
        choices=("creators", "paapi5"),
        default="creators",
        help="wire protocol (default: %(default)s)",
    )
    parser.add_argument(
        "--loop",
        action="append",
        choices=("uvloop", "asyncio"),
        help="event loop; repeat to compare (default: uvloop)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="measured seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds before measuring (default: %(default)s)"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=80.0,
        help="fixed round-trip latency the simulator adds, half each way (default: "
        "%(default)s, as the project's benchmark scripts use)",
    )
    parser.add_argument(
        "--jitter-ms",
        type=float,
        default=20.0,
        help="the exponential latency added on top of a round trip: a draw of mean half "
        "this each way (default: %(default)s, as the project's benchmark scripts use)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=4,
        help="requests in flight per key (default: %(default)s)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=P",
        help="inject a fault with probability P per request, e.g. error_503=0.02; kinds: "
        + ", ".join(_FAULT_KINDS)
        + " (the last "
        + str(len(_TOKEN_FAULTS))
        + " are the Creators API's tokens: creators only)",
    )
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per run")


def _faults(specs: Sequence[str]) -> dict[str, float]:
    faults: dict[str, float] = {}
    for spec in specs:
        kind, sep, value = spec.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if not sep or not 0 <= rate <= 1:
            raise ConfigError("--fault", f"{spec!r}: expected KIND=P with 0 <= P <= 1")
        faults[kind.strip()] = rate
    return faults


class Stopped(Exception):
    """A stop signal during a run: unwinds it, so the simulator child and its files go too."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(sig.name)
        self.sig = sig


def _stop_signal(signum: int, frame: object) -> None:
    # Once: a second signal must not interrupt the cleanup the first one started.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Kept too: raised where Python drops exceptions (a weakref callback: "Exception
    # ignored in ..."), the stop is still heard when the next loop starts or the run ends.
    _RAISED.append(signal.Signals(signum))
    raise Stopped(signal.Signals(signum))


#: The stop signals :func:`_stop_signal` raised for, in this process.
_RAISED: list[signal.Signals] = []


def _unraisable(hook: Callable[[Any], object], unraisable: Any) -> None:
    # A Stopped Python dropped (a weakref callback) is heard later, from _RAISED: not a
    # traceback among the bench's lines.
    if not isinstance(unraisable.exc_value, Stopped):
        hook(unraisable)


_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: The exit code of a run each stop signal ended: the shell's, 128 plus its number.
STOPPED_CODE: Final = {
    signal.SIGTERM: ExitCode.TERMINATED,
    signal.SIGINT: ExitCode.INTERRUPTED,
    signal.SIGHUP: ExitCode.HANGUP,
}


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While inside, SIGTERM, SIGINT or SIGHUP raises :class:`Stopped` in the main thread,
    once (a loop run through :func:`run_stoppable` is cancelled instead), so the ``finally``
    blocks on the way out stop children and remove temporary files.

    A stop Python dropped (raised in a weakref callback) is raised on leaving. Stopped, the
    signals stay ignored: the process is on its way out, and a second one must not kill it
    with the default action before its cleanup ends. A signal ignored when the process
    started (SIGINT for a script's background job) stays ignored.
    """
    previous = {
        sig: signal.signal(sig, _stop_signal)
        for sig in _STOP_SIGNALS
        if signal.getsignal(sig) is not signal.SIG_IGN  # ignored by who started it: kept so
    }
    hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unraisable, hook)
    stopped = False
    try:
        yield
        if _RAISED:
            raise Stopped(_RAISED[0])  # raised where it was lost, and heard of only now
    except Stopped:
        stopped = True
        raise
    finally:
        if not stopped:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        sys.unraisablehook = hook


def bench_command(args: argparse.Namespace) -> int:
    """Run ``broker bench`` with parsed ``args``; print the table (or JSON lines).

    SIGTERM, SIGINT or SIGHUP stops it (:func:`stop_signals`): the simulator child is
    stopped and its temporary files removed, and the exit code is 128 plus the signal's
    number, with no figures (the child stops by itself within a second if this process dies
    by SIGKILL).
    """
    try:
        with stop_signals():
            return _bench(args)
    except Stopped as stop:
        print(f"{prog()} bench: stopped by {stop.sig.name}; no figures", file=sys.stderr)
        return STOPPED_CODE[stop.sig]


def _bench(args: argparse.Namespace) -> int:
    from broker.logs import configure_logging

    # Only warnings and errors: the table is the output.
    configure_logging("warning", "console", stream=sys.stderr)
    try:
        base = BenchOptions(
            keys=args.keys,
            tps=args.tps,
            broker_tps=args.broker_tps,
            burst=args.burst,
            protocol=args.protocol,
            duration_s=args.duration,
            warmup_s=args.warmup,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            max_in_flight=args.max_in_flight,
            faults=_faults(args.fault),
            seed=args.seed,
        )
        reports: list[BenchReport] = []
        for loop in args.loop or ["uvloop"]:
            options = dataclasses.replace(base, loop=loop)
            seconds = options.warmup_s + options.duration_s
            print(f"running {loop} for {seconds:g} s ...", file=sys.stderr)
            # The broker's own config checks (e.g. --broker-tps above 1000) run inside.
            report = run_bench(options, stop_on_signals=True)
            reports.append(report)
            if args.json:
                print(json.dumps(report.to_json(), sort_keys=True), flush=True)
    except ConfigError as exc:
        print(f"{prog()} bench: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except SimulatorStartError as exc:
        print(f"{prog()} bench: {exc}; no figures", file=sys.stderr)
        return ExitCode.INTERNAL
    except NoUsableKeyError as exc:
        # The injected faults (an expired token on every call) took every key out.
        hint = "; the injected faults took every key out: lower --fault" if args.fault else ""
        print(f"{prog()} bench: {exc}{hint}; no figures", file=sys.stderr)
        return ExitCode.NO_PERMISSION
    if not args.json:
        print(render_table(reports))
    return ExitCode.OK
