"""Fault injection: seeded draws of latency and faults, and the writers of broken responses.

Draws come from RNGs seeded by ``settings.seed`` (one for faults, one for latency, so turning
latency on does not change which requests fail), so a run is reproducible for a given request
order. The writers send what a flaky network or server sends: a 5xx, an HTML error page, a body
cut short, a connection reset mid-body, or a body that never completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.simulator.settings import FaultRates, LatencyProfile

__all__ = ["FaultInjector", "Reply", "deliver", "html_page"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete HTTP answer before it is written (so a fault can still break it)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


_HTML = {
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
}


class FaultInjector:
    """Seeded draws of one-way latency and of the fault (if any) that hits a request."""

    __slots__ = ("_cumulative", "_fault_rng", "_faults", "_latency", "_latency_rng")

    def __init__(self, faults: FaultRates, latency: LatencyProfile, seed: int) -> None:
        self._faults = faults
        self._latency = latency
        self._fault_rng = random.Random(f"faults/{seed}")
        self._latency_rng = random.Random(f"latency/{seed}")
        cumulative: list[tuple[float, str]] = []
        total = 0.0
        for kind, rate in faults.response_rates():
            total += rate
            cumulative.append((total, kind))
        self._cumulative = tuple(cumulative)

    def latency_s(self) -> float:
        """One one-way delay in seconds (0 when no latency is configured)."""
        profile = self._latency
        if not profile.enabled:
            return 0.0
        extra = (
            self._latency_rng.expovariate(1.0 / profile.exp_mean_ms)
            if profile.exp_mean_ms > 0
            else 0.0
        )
        return (profile.fixed_ms + extra) / 1000.0

    def response_fault(self) -> str | None:
        """The response-replacing fault for this request, or None."""
        if not self._cumulative:
            return None
        draw = self._fault_rng.random()
        for bound, kind in self._cumulative:
            if draw < bound:
                return kind
        return None

    def expired_token(self) -> bool:
        """True when this request's fresh token should be answered as expired."""
        rate = self._faults.expired_token
        return rate > 0 and self._fault_rng.random() < rate

    def html_status(self) -> int:
        """502 or 503 for an HTML error page."""
        return self._fault_rng.choice((502, 503))


def html_page(status: int) -> Reply:
    """The HTML error page a load balancer sends instead of JSON."""
    title = _HTML.get(status, f"{status} Error")
    page = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n"
    )
    return Reply(status, page.encode(), "text/html")


async def deliver(
    request: web.Request,
    reply: Reply,
    fault: str | None,
    *,
    clock: Clock,
    hang_s: float,
    stopping: asyncio.Event,
) -> web.StreamResponse:
    """Write ``reply``, broken as ``fault`` says (``reset``, ``truncated``, ``hang``, or None).

    Args:
        request: the request being answered.
        reply: the answer as it would be without a fault.
        fault: the fault that hits the writing, if any.
        clock: the simulator's clock (a hang sleeps on it).
        hang_s: how long a hanging body stalls before the connection is dropped.
        stopping: set when the app shuts down, which ends a hang at once.
    """
    if fault == "truncated":
        cut = reply.body[: max(1, len(reply.body) // 2)]
        return web.Response(
            status=reply.status, body=cut, headers=reply.headers, content_type=reply.content_type
        )
    if fault not in ("reset", "hang"):
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers=reply.headers,
            content_type=reply.content_type,
        )
    response = web.StreamResponse(status=reply.status, headers=reply.headers)
    response.content_type = reply.content_type
    response.content_length = len(reply.body)
    await response.prepare(request)
    await response.write(reply.body[: len(reply.body) // 2])
    if fault == "hang":
        sleeper = asyncio.ensure_future(clock.sleep(hang_s))
        waiter = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waiter):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    transport = request.transport
    if transport is not None:
        transport.abort()
    return response
