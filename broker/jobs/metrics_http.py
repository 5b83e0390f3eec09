"""The daemon's HTTP face: ``/healthz``, ``/readyz`` and Prometheus ``/metrics`` on loopback.

``/metrics`` is the Prometheus text exposition format (version 0.0.4), written by hand so
the daemon needs no ``prometheus_client``: each family gets ``# HELP`` and ``# TYPE`` lines,
label values are escaped, counters end in ``_total`` and the latency histogram has
cumulative ``_bucket{le=...}`` samples plus ``_sum`` and ``_count``. Counters restart at
zero with the daemon, as Prometheus expects of a process restart.

The endpoints read the daemon through :class:`StatusSource`, so they hold no state of their
own and can be tested with a stub.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol

from aiohttp import web

from broker import __version__
from broker.config import is_loopback_host
from broker.engine.adaptive import ThrottleVerdict
from broker.engine.metrics import LATENCY_BUCKETS_S, QUOTA_WAIT
from broker.errors import ConfigError
from broker.jobs.process_stats import ProcessStats, read_process_stats
from broker.listener import ConnectionLimits, Listener, start_listener
from broker.logs import get_logger

if TYPE_CHECKING:
    from broker.cache.policy import CacheStats
    from broker.engine.metrics import KeySnapshot, MetricsSnapshot

__all__ = [
    "CONTENT_TYPE",
    "JobRows",
    "MetricsServer",
    "Readiness",
    "SpoolSnapshot",
    "StatusSource",
    "check_host",
    "create_app",
    "readiness",
    "render_metrics",
]

#: The Content-Type of the Prometheus text format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# A key paused for a server's Retry-After is throttled for seconds, not out of service; a
# key paused for any other reason (the token endpoint failing) is not ready (reliability B13).
_TRANSIENT_PAUSE: Final = "Retry-After"
_SHUTDOWN_TIMEOUT_S: Final = 2.0
#: What the endpoint's clients may hold open: a scraper and a health check or two need a
#: few connections; a client that opens thousands and sends nothing must not use up the
#: daemon's open files (it exited 74 when its next look at inbox/ found none left).
LIMITS: Final = ConnectionLimits(max_open=64, idle_s=60.0)

logger = get_logger("broker")


@dataclass(frozen=True, slots=True)
class JobRows:
    """One job's rows by status (``pending`` included while the job runs)."""

    job: str
    by_status: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class SpoolSnapshot:
    """The daemon's own counters at a moment.

    Attributes:
        state: ``starting``, ``running`` or ``stopping``.
        jobs_done: jobs filed under ``done/`` since the daemon started.
        jobs_failed: jobs filed under ``failed/`` since the daemon started.
        inbox: job files waiting in ``inbox/`` (counted when the snapshot is taken), None
            when it cannot be read.
        deferred: jobs in ``processing/`` waiting for their keys' daily quota to reset
            (``[serve] no_wait``).
        deferred_keys: the keys those jobs wait for.
        rows_by_status: rows the daemon wrote since it started, by final status, counted
            as they are written (a counter: it never goes down).
        jobs: the current job first (if any), then the most recent finished jobs.
    """

    state: str = "starting"
    jobs_done: int = 0
    jobs_failed: int = 0
    inbox: int | None = 0
    deferred: int = 0
    deferred_keys: frozenset[str] = frozenset()
    rows_by_status: Mapping[str, int] = field(default_factory=dict)
    jobs: tuple[JobRows, ...] = ()


class StatusSource(Protocol):
    """Protocol: what the HTTP endpoints read from the daemon.

    - ``engine_metrics()`` is the broker's snapshot, or None while the broker is not open.
    - ``spool_snapshot()`` is the daemon's job counters.
    - ``cache_stats()`` is the item cache's figures, or None when the cache is off.
    All are called on the event loop for every request and must not block for long.
    """

    def engine_metrics(self) -> MetricsSnapshot | None: ...

    def spool_snapshot(self) -> SpoolSnapshot: ...

    async def cache_stats(self) -> CacheStats | None: ...


@dataclass(frozen=True, slots=True)
class Readiness:
    """The answer of ``/readyz``: ready, or why not (and until when, if known)."""

    ready: bool
    reason: str | None = None
    until: str | None = None

    def to_json(self) -> dict[str, object]:
        """The response body."""
        body: dict[str, object] = {"ready": self.ready}
        if self.reason is not None:
            body["reason"] = self.reason
        if self.until is not None:
            body["until"] = self.until
        return body


def check_host(host: str, *, allow_remote: bool) -> None:
    """Refuse a non-loopback ``host`` unless ``allow_remote``.

    Raises:
        ConfigError: (path ``--host``, ``broker serve``'s flag: no config key sets it) the
            address is not loopback.
    """
    if allow_remote or is_loopback_host(host):
        return
    raise ConfigError(
        "--host",
        f"refusing to serve /metrics on {host!r}: the endpoints have no authentication, so "
        "they bind loopback only (127.0.0.1, ::1, localhost); pass --allow-remote to bind "
        "another address",
    )


def readiness(metrics: MetricsSnapshot | None, *, state: str) -> Readiness:
    """Decide ``/readyz``: ready while at least one key the waiting work needs can send.

    The keys that count are those serving a marketplace batches wait for; with no work
    waiting, every key. So a job whose rows left are all for a marketplace whose keys wait
    for their daily quota is not ready (the daemon is held for hours), however fresh the
    keys of other marketplaces. Not ready either while starting or stopping, once the
    engine stopped (a crash: the daemon exits on it within a poll), or when every such key
    is out of rotation (disabled, parked, or paused by a failing token endpoint); a quota
    wait says until when (the earliest reset).
    """
    if state != "running":
        return Readiness(False, state)
    if metrics is None:
        return Readiness(False, "starting")
    if metrics.engine_stopped is not None:
        return Readiness(False, f"engine stopped: {metrics.engine_stopped}")
    keys = needed_keys(metrics)
    if not keys or any(_can_send(key) for key in keys):
        return Readiness(True)
    waits = sorted(key.until for key in keys if key.until is not None and key.reason == QUOTA_WAIT)
    if waits:
        return Readiness(False, f"{QUOTA_WAIT} until {waits[0]}", waits[0])
    out = "; ".join(f"{key.name}: {key.reason or key.state}" for key in keys)
    # A parked key's until is its probe: the earliest is when one may send again.
    probes = sorted(key.until for key in keys if key.until is not None)
    return Readiness(False, f"no key can send ({out})", probes[0] if probes else None)


def needed_keys(metrics: MetricsSnapshot) -> list[KeySnapshot]:
    """The keys whose state decides whether the work goes on: those serving a marketplace
    batches wait for; with no work waiting (or none of its marketplaces served), all."""
    return list(metrics.serving(metrics.waiting_markets) or metrics.keys)


def work_waits_for_quota(metrics: MetricsSnapshot, deferred_keys: Set[str] = frozenset()) -> bool:
    """True when every key the work needs that is not disabled waits for its daily quota
    (its own count spent, or parked because Amazon's answers say so): the work is held
    until a reset, and no progress is expected before it.

    With nothing queued but jobs ``no_wait`` deferred, the keys those jobs wait for
    (``deferred_keys``) are the ones the work needs: counting every key, an idle key of
    another marketplace said the work could go on, and the no-progress alert fired all
    day for a job held, as documented, until its keys' reset.
    """
    if metrics.waiting_markets or not deferred_keys:
        needed = needed_keys(metrics)
    else:
        needed = [key for key in metrics.keys if key.name in deferred_keys]
    keys = [key for key in needed if key.state != "disabled"]
    return bool(keys) and all(key.reason in _QUOTA_REASONS for key in keys)


def _can_send(key: KeySnapshot) -> bool:
    if key.state == "paused" and key.reason == _TRANSIENT_PAUSE:
        return True  # a Retry-After of seconds: its until is no long wait
    return key.until is None and key.state == "active"


def render_metrics(
    metrics: MetricsSnapshot | None,
    spool: SpoolSnapshot,
    cache: CacheStats | None = None,
    *,
    cache_unreadable: bool = False,
) -> str:
    """Return the Prometheus text exposition of the engine, spool and item-cache counters.

    ``cache_unreadable``: the cache is on but its store failed to answer (a damaged file,
    Redis down): ``asinb_cache_up`` says 0 and the cache's own families are left out,
    while everything else is served as usual.
    """
    out = _Exposition()
    out.family("asinb_jobs_total", "counter", "Jobs filed since the daemon started, by outcome.")
    out.sample("asinb_jobs_total", spool.jobs_done, outcome="done")
    out.sample("asinb_jobs_total", spool.jobs_failed, outcome="failed")
    if spool.inbox is not None:  # None: inbox/ cannot be read (the daemon logs why)
        out.family(
            "asinb_inbox_jobs", "gauge", "Job files waiting in inbox/ (counted at each scrape)."
        )
        out.sample("asinb_inbox_jobs", spool.inbox)
    out.family(
        "asinb_deferred_jobs",
        "gauge",
        "Jobs in processing/ waiting for their keys' daily quota to reset (no_wait).",
    )
    out.sample("asinb_deferred_jobs", spool.deferred)
    out.family(
        "asinb_rows_total", "counter", "Rows written since the daemon started, by final status."
    )
    for status, count in sorted(spool.rows_by_status.items()):
        out.sample("asinb_rows_total", count, status=status)
    out.family("asinb_job_rows", "gauge", "Rows of the current and recent jobs, by status.")
    labels: set[str] = set()
    for job in spool.jobs:
        # One series per label set: a repeated name (only the newest shows) never gives
        # Prometheus two samples it cannot tell apart.
        if job.job in labels:
            continue
        labels.add(job.job)
        for status, count in sorted(job.by_status.items()):
            out.sample("asinb_job_rows", count, job_file=job.job, status=status)
    if metrics is not None:
        _render_engine(out, metrics, spool.deferred_keys)
    if cache is not None or cache_unreadable:
        out.family("asinb_cache_up", "gauge", "1 if the item cache's store answered, else 0.")
        out.sample("asinb_cache_up", int(cache is not None))
    if cache is not None:
        for name, kind, help_text, value in cache.families():
            out.family(name, kind, help_text)
            out.sample(name, value)
    _render_build_info(out)
    _render_process(out, read_process_stats())
    return out.text()


def _render_engine(out: _Exposition, m: MetricsSnapshot, deferred_keys: Set[str]) -> None:
    out.family(
        "asinb_work_waiting_quota",
        "gauge",
        "1 while every key the waiting work needs waits for its daily quota.",
    )
    out.sample("asinb_work_waiting_quota", int(work_waits_for_quota(m, deferred_keys)))
    out.family("asinb_requests_total", "counter", "HTTP responses from the API, by status code.")
    for code, count in sorted(m.responses_by_status.items()):
        out.sample("asinb_requests_total", count, status=str(code))
    out.family("asinb_requests_sent_total", "counter", "Requests sent (every attempt).")
    out.sample("asinb_requests_sent_total", m.requests)
    out.family("asinb_throttled_total", "counter", "Responses 429 (throttled).")
    out.sample("asinb_throttled_total", m.throttled)
    out.family(
        "asinb_retries_total", "counter", "Requests sent again after a failure other than a 429."
    )
    out.sample("asinb_retries_total", m.retries)
    out.family("asinb_transport_errors_total", "counter", "Requests that failed on the network.")
    out.sample("asinb_transport_errors_total", m.transport_errors)
    out.family("asinb_items_total", "counter", "Finished lookups (distinct ASINs), by status.")
    for status, count in sorted(m.items_by_status.items()):
        out.sample("asinb_items_total", count, status=status)
    name = "asinb_request_duration_seconds"
    out.family(name, "histogram", "Request latency, send to full response body.")
    cumulative = 0
    for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), m.latency_buckets, strict=True):
        cumulative += count
        out.sample(f"{name}_bucket", cumulative, le=_number(bound))
    out.sample(f"{name}_sum", m.latency_sum_s)
    out.sample(f"{name}_count", m.latency_count)
    out.family("asinb_inflight_requests", "gauge", "Requests on the wire now, all keys.")
    out.sample("asinb_inflight_requests", sum(k.in_flight for k in m.keys))
    out.family("asinb_queued_batches", "gauge", "Batches waiting for a key.")
    out.sample("asinb_queued_batches", m.queued_batches)
    out.family("asinb_outstanding_lookups", "gauge", "Lookups admitted and not finished.")
    out.sample("asinb_outstanding_lookups", m.outstanding_lookups)
    keys = m.keys
    for name, kind, help_text, value in _KEY_SERIES:
        if keys:
            out.family(name, kind, help_text)
        for k in keys:
            number = value(k)
            if number is not None:
                out.sample(name, number, key=k.name)
    if keys:
        out.family("asinb_key_state", "gauge", "1 for the key's current state.")
    for k in keys:
        for state in ("active", "paused", "parked", "disabled"):
            out.sample("asinb_key_state", int(k.state == state), key=k.name, state=state)
    if any(k.markets_out for k in keys):
        out.family(
            "asinb_key_marketplace_disabled",
            "gauge",
            "1 for each marketplace Amazon rejected the key in (a wrong partner tag): the key "
            "sends nothing there, though it may serve its other marketplaces.",
        )
    for k in keys:
        for market, rejected in k.markets_out:
            out.sample(
                "asinb_key_marketplace_disabled", 1, code=rejected, key=k.name, marketplace=market
            )


def _render_build_info(out: _Exposition) -> None:
    # The info-metric convention: a constant 1 whose labels carry the facts, so a dashboard
    # can join on them and a deploy shows as a label change.
    out.family("asinb_build_info", "gauge", "The running asin-broker version and Python (1).")
    out.sample("asinb_build_info", 1, version=__version__, python=platform.python_version())


def _render_process(out: _Exposition, stats: ProcessStats) -> None:
    """The Prometheus client libraries' standard ``process_*`` families, where known."""
    out.family("process_cpu_seconds_total", "counter", "User and system CPU time, seconds.")
    out.sample("process_cpu_seconds_total", stats.cpu_seconds)
    out.family("process_start_time_seconds", "gauge", "Start of the process, Unix time.")
    out.sample("process_start_time_seconds", stats.start_time_s)
    optional = (
        ("process_resident_memory_bytes", "Resident memory size, bytes.", stats.resident_bytes),
        ("process_virtual_memory_bytes", "Virtual memory size, bytes.", stats.virtual_bytes),
        ("process_open_fds", "Open file descriptors.", stats.open_fds),
        ("process_max_fds", "Limit on open file descriptors.", stats.max_fds),
    )
    for name, help_text, value in optional:
        if value is not None:
            out.family(name, "gauge", help_text)
            out.sample(name, value)


#: The reasons of a key that waits for its daily quota to reset.
_QUOTA_REASONS: Final = frozenset({QUOTA_WAIT, ThrottleVerdict.QUOTA_EXHAUSTED.value})
#: One series per key: name, type, help, and the value of a key (None: no sample).
_KEY_SERIES: tuple[tuple[str, str, str, Callable[[KeySnapshot], float | None]], ...] = (
    ("asinb_key_rate_per_second", "gauge", "Current (adaptive) request rate.", lambda k: k.rate),
    (
        "asinb_key_configured_tps",
        "gauge",
        "Configured requests per second.",
        lambda k: k.configured_tps,
    ),
    ("asinb_key_inflight_requests", "gauge", "Requests on the wire now.", lambda k: k.in_flight),
    ("asinb_key_requests_total", "counter", "Requests sent by the key.", lambda k: k.sent),
    ("asinb_key_throttled_total", "counter", "429s the key received.", lambda k: k.throttled),
    (
        "asinb_key_daily_spent",
        "gauge",
        "Requests counted in today's window.",
        lambda k: k.daily_spent,
    ),
    (
        "asinb_key_daily_limit",
        "gauge",
        "Requests per day (TPD) of the key.",
        lambda k: k.daily_limit,
    ),
    (
        "asinb_key_waiting_quota",
        "gauge",
        "1 while waiting for daily quota.",
        # Spent by the key's own count, or parked because Amazon says so; not any park.
        lambda k: int(k.reason in _QUOTA_REASONS),
    ),
)


class _Exposition:
    """Accumulates lines of the text format."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines.append(f"# HELP {name} {escaped}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            pairs = ",".join(f'{key}="{_label(text)}"' for key, text in labels.items())
            name = f"{name}{{{pairs}}}"
        self._lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def create_app(source: StatusSource) -> web.Application:
    """The aiohttp application serving the three endpoints from ``source``."""

    async def healthz(_request: web.Request) -> web.Response:
        # Liveness only: answering at all proves the event loop turns.
        return web.json_response({"ok": True})

    async def readyz(_request: web.Request) -> web.Response:
        verdict = readiness(source.engine_metrics(), state=source.spool_snapshot().state)
        return web.json_response(verdict.to_json(), status=200 if verdict.ready else 503)

    cache_failing = False

    async def metrics(_request: web.Request) -> web.Response:
        nonlocal cache_failing
        # A store that cannot answer must not take the other metrics down with it: a failed
        # scrape marks the whole replica down.
        try:
            cache = await source.cache_stats()
        except Exception as exc:
            cache = None
            if not cache_failing:
                logger.warning("metrics.cache_unreadable", error=type(exc).__name__)
            cache_failing = True
        else:
            if cache_failing:
                logger.info("metrics.cache_readable")
            cache_failing = False
        body = render_metrics(
            source.engine_metrics(),
            source.spool_snapshot(),
            cache,
            cache_unreadable=cache_failing,
        )
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class MetricsServer:
    """Serves :func:`create_app` on ``host:port`` inside ``async with``.

    Args:
        source: what the endpoints report.
        host: address to bind; loopback unless ``allow_remote``.
        port: port to bind; 0 picks a free one (read :attr:`port` after entering).
        allow_remote: allow a non-loopback ``host``.

    Raises:
        ConfigError: ``host`` is not loopback and ``allow_remote`` is False.
    """

    def __init__(
        self, source: StatusSource, *, host: str, port: int, allow_remote: bool = False
    ) -> None:
        check_host(host, allow_remote=allow_remote)
        self._app = create_app(source)
        self._host = host
        self.port = port
        self._listener: Listener | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:9464``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> MetricsServer:
        listener = await start_listener(
            self._app,
            self._host,
            self.port,
            shutdown_timeout_s=_SHUTDOWN_TIMEOUT_S,
            limits=LIMITS,
        )
        port = listener.port
        if port is not None:
            self.port = port
        self._listener = listener
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.cleanup()
