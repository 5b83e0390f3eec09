"""The simulator as one aiohttp.web application: both APIs, their token endpoints, and controls.

Routes:

- ``POST /oauth2/token`` (Creators v2.x, Cognito-style) and ``POST /auth/o2/token`` (v3.x, LWA);
- ``POST /catalog/v1/{operation}`` (Creators API) and ``POST /paapi5/{operation}`` (PA-API 5.0);
- ``GET /_sim/stats`` (counters as JSON; ``?since=<monotonic>`` trims timestamps,
  ``?timestamps=0`` drops them) and ``POST /_sim/control`` (``{"account": name, "tps": x}``,
  ``{"account": name, "tpd": n}`` or ``{"limits": true|false}``).

Every response carries ``x-amzn-RequestId`` (PA-API's ``x-amz-rid`` too) and a ``Date``
from the simulator's skewed clock.
API calls get the configured latency once before the quota check and once after it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from broker.clock import Clock, LoopClock
from broker.simulator import creators, oauth, paapi
from broker.simulator.faults import Reply, deliver
from broker.simulator.settings import MIN_ACCOUNT_TPS, SimulatorSettings
from broker.simulator.state import Simulator
from broker.simulator.stats import SimulatorStats

__all__ = ["SIMULATOR_KEY", "STATS_KEY", "create_app"]

#: The app's live state (:class:`~broker.simulator.state.Simulator`), for in-process tests.
SIMULATOR_KEY = web.AppKey("simulator", Simulator)
#: The app's counters (:class:`~broker.simulator.stats.SimulatorStats`), for in-process tests.
STATS_KEY = web.AppKey("simulator_stats", SimulatorStats)

#: The largest request body taken (Amazon documents none; a GetItems body is under 2 KB).
_MAX_BODY: Final = 1 << 20

_Handler = Callable[[web.Request, Simulator], Awaitable[tuple[Reply, str | None]]]
_Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    settings: SimulatorSettings | None = None, *, clock: Clock | None = None
) -> web.Application:
    """Build the simulator app.

    Args:
        settings: accounts, limits and faults; None means the defaults (demo accounts).
        clock: the simulator's clock; None means the event loop's. Pass a
            ``broker.testing.FakeClock`` to drive token expiry, quotas and days by hand.

    Returns:
        An application serving both APIs; ``app[STATS_KEY]`` holds its counters.
    """
    sim = Simulator(
        settings if settings is not None else SimulatorSettings(),
        clock if clock is not None else LoopClock(),
    )
    # No middlewares: aiohttp keeps an app's middleware chain in a cache of its own, keyed by
    # the app, so every embedded simulator stayed in memory after it closed (up to 1,024 of
    # them). The routes that read a body are wrapped instead (_readable).
    app = web.Application(client_max_size=_MAX_BODY)
    app[SIMULATOR_KEY] = sim
    app[STATS_KEY] = sim.stats

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-amzn-RequestId"] = str(uuid.uuid4())
        if request.path.startswith("/paapi5/"):
            # PA-API's own request id beside the AWS one (protocol.md 3.4).
            response.headers["x-amz-rid"] = uuid.uuid4().hex[:20].upper()
        response.headers["Date"] = sim.http_date()

    async def stop(app: web.Application) -> None:
        sim.stopping.set()

    app.on_response_prepare.append(stamp)
    app.on_shutdown.append(stop)

    def api(handler: _Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            sim.stats.requests += 1
            delay = sim.faults.latency_s()
            if delay:
                await sim.clock.sleep(delay)
            reply, fault = await handler(request, sim)
            delay = sim.faults.latency_s()
            if delay:
                await sim.clock.sleep(delay)
            return await deliver(
                request,
                reply,
                fault,
                clock=sim.clock,
                hang_s=sim.settings.faults.hang_s,
                stopping=sim.stopping,
                oversized_bytes=sim.settings.faults.oversized_bytes,
            )

        return route

    async def cognito(request: web.Request) -> web.Response:
        return await oauth.token_endpoint(request, sim, "v2")

    async def lwa(request: web.Request) -> web.Response:
        return await oauth.token_endpoint(request, sim, "v3")

    async def stats(request: web.Request) -> web.Response:
        since_text = request.query.get("since")
        try:
            since = float(since_text) if since_text is not None else None
        except ValueError:
            return web.json_response({"error": "since must be a number"}, status=400)
        timestamps = request.query.get("timestamps", "1") not in ("0", "false", "no")
        body = sim.stats.snapshot(since, timestamps=timestamps)
        body["now"] = sim.clock.monotonic()
        body["limits"] = sim.limits
        body["quotas"] = {
            name: {"tps": q.tps, "tpd": q.tpd, "used_today": q.used_on(sim.wall())}
            for name, q in sim.quotas.items()
        }
        return web.json_response(body)

    async def control(request: web.Request) -> web.Response:
        return _control(sim, await request.read())

    app.router.add_post("/oauth2/token", _readable(cognito))
    app.router.add_post("/auth/o2/token", _readable(lwa))
    app.router.add_post("/catalog/v1/{operation}", _readable(api(creators.handle)))
    app.router.add_post("/paapi5/{operation}", _readable(api(paapi.handle)))

    async def unknown(request: web.Request, sim: Simulator) -> tuple[Reply, str | None]:
        # A path neither API has (an endpoint configured with a path of its own): the
        # API the request is written for answers UnknownOperation, as Amazon does.
        handler = paapi.handle if "X-Amz-Target" in request.headers else creators.handle
        return await handler(request, sim)

    app.router.add_get("/_sim/stats", stats)
    app.router.add_post("/_sim/control", _readable(control))
    # Before the API's catch-all: a control path never reaches the API (a POST to
    # /_sim/stats was answered as an unknown operation, and counted as a request).
    app.router.add_route("*", "/_sim/{rest:.*}", _sim_elsewhere)
    app.router.add_post("/{path:.*}", _readable(api(unknown)))
    return app


def _readable(route: _Route) -> _Route:
    """``route``, with a body that cannot be read (gzip that is not, a chunked body cut
    short) answered as the client's fault: 400 naming it, not a 500 with two tracebacks on
    the simulator's stderr. A client that left before its body came (a broker closed
    mid-request) has no one to answer and nothing to report: aiohttp drops the reply
    quietly."""

    async def readable(request: web.Request) -> web.StreamResponse:
        try:
            return await route(request)
        except ConnectionResetError:
            return web.Response(status=499)
        except web.HTTPRequestEntityTooLarge:
            # aiohttp's own answer is plain text; every other refusal here is JSON.
            return web.json_response(
                {"message": f"the request body is over the {_MAX_BODY:,} bytes taken"},
                status=413,
            )
        except web.RequestPayloadError as exc:
            cause: BaseException = exc
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
            return web.json_response(
                {"message": f"the request body cannot be read ({type(cause).__name__}: {cause})"},
                status=400,
            )

    return readable


_CONTROL_FIELDS: Final = frozenset({"account", "tps", "tpd", "limits"})
#: The simulator's own endpoints and the method each takes.
_SIM_ENDPOINTS: Final = {"/_sim/stats": "GET, HEAD", "/_sim/control": "POST"}


async def _sim_elsewhere(request: web.Request) -> web.Response:
    """A simulator path asked with the wrong method (405, saying which), or none (404)."""
    allowed = _SIM_ENDPOINTS.get(request.path)
    if allowed is not None:
        return web.json_response(
            {"error": f"{request.path} takes {allowed}"}, status=405, headers={"Allow": allowed}
        )
    known = ", ".join(f"{path} ({method})" for path, method in _SIM_ENDPOINTS.items())
    return web.json_response(
        {"error": f"no simulator endpoint {request.path}; there are {known}"}, status=404
    )


def _refused(error: str, status: int) -> web.Response:
    return web.json_response({"error": error}, status=status)


def _usable_tps(tps: object) -> bool:
    """A JSON number an account's tps can be: finite as a float (an integer of 400 digits
    is none) and at least the config's least."""
    if isinstance(tps, bool) or not isinstance(tps, int | float):
        return False
    try:
        return MIN_ACCOUNT_TPS <= float(tps) < math.inf
    except OverflowError:
        return False


def _control(sim: Simulator, raw: bytes) -> web.Response:
    """Apply a runtime change: an account's tps or tpd, or limits on/off.

    The whole body is checked before anything changes: a refused request changes nothing,
    and a field it does not know (``"key"`` for ``"account"``) is refused, never ignored.
    """
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        # json.loads decodes bytes itself: bytes that are no UTF-8 (nor UTF-16/32) fail so;
        # an integer of over 4,300 digits is a ValueError of its own, no JSONDecodeError.
        return _refused("body must be JSON", 400)
    if not isinstance(body, dict):
        return _refused("body must be a JSON object", 400)
    unknown = sorted(set(body) - _CONTROL_FIELDS)
    if unknown:
        return _refused(
            f"unknown field {unknown[0]!r}: give account with tps and/or tpd, or limits", 400
        )
    limits = body.get("limits")
    if "limits" in body and not isinstance(limits, bool):
        return _refused("limits must be true or false", 400)
    tps, tpd = body.get("tps"), body.get("tpd")
    if tps is not None and not _usable_tps(tps):
        return _refused(f"tps must be a finite number >= {MIN_ACCOUNT_TPS:g}", 400)
    if tpd is not None and (isinstance(tpd, bool) or not isinstance(tpd, int) or tpd < 1):
        return _refused("tpd must be a positive integer", 400)
    quota = None
    if "account" in body:
        quota = sim.quotas.get(str(body["account"]))
        if quota is None:
            return _refused(f"unknown account {body['account']!r}", 404)
        if tps is None and tpd is None:
            return _refused("give tps and/or tpd for the account", 400)
    elif tps is not None or tpd is not None:
        return _refused("tps and tpd are an account's: name it with account", 400)
    if isinstance(limits, bool):
        sim.limits = limits
    if quota is not None:
        if tps is not None:
            quota.tps = float(tps)
        if tpd is not None:
            quota.tpd = tpd
    return web.json_response(
        {
            "limits": sim.limits,
            "quotas": {name: {"tps": q.tps, "tpd": q.tpd} for name, q in sim.quotas.items()},
        }
    )
