"""Fault injection: seeded draws of latency and faults, and the writers of broken responses.

Draws come from RNGs seeded by ``settings.seed`` (one for faults, one for latency and one for
the token endpoints, so turning latency or token faults on does not change which requests
fail), so a run is reproducible for a given request order. The writers send what a flaky
network or server sends: a 5xx, an HTML error page, a body cut short, a connection reset
mid-body or before any byte, a body that never completes, or one far too large. The alterers
break a good answer subtly: a JSON body of the wrong shape, or a GetItems item list with an
item missing, added or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.simulator.settings import FaultRates, LatencyProfile

__all__ = [
    "ITEM_FAULTS",
    "WRITE_FAULTS",
    "FaultInjector",
    "Reply",
    "bad_shape_reply",
    "deliver",
    "html_page",
]

#: The faults that alter the item list of a successful GetItems answer (counted when applied).
ITEM_FAULTS = frozenset({"drop_item", "extra_item", "duplicate_item"})
#: The faults :func:`deliver` writes itself, whatever the answer would have been.
WRITE_FAULTS = frozenset({"disconnect", "oversized"})

# The streamed padding of an oversized body: one shared chunk, so the simulator itself does
# not allocate the size it sends.
_PAD_CHUNK = b" " * 65536


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete HTTP answer before it is written (so a fault can still break it)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


_HTML = {
    200: "Sign in to continue",
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
}


class FaultInjector:
    """Seeded draws of one-way latency and of the fault (if any) that hits a request."""

    __slots__ = (
        "_cumulative",
        "_fault_rng",
        "_faults",
        "_latency",
        "_latency_rng",
        "_token_rng",
    )

    def __init__(self, faults: FaultRates, latency: LatencyProfile, seed: int) -> None:
        self._faults = faults
        self._latency = latency
        self._fault_rng = random.Random(f"faults/{seed}")
        self._latency_rng = random.Random(f"latency/{seed}")
        self._token_rng = random.Random(f"token/{seed}")
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

    def token_fault(self) -> str | None:
        """The fault of one token request: ``token_error``, ``token_slow`` or None."""
        error, slow = self._faults.token_error, self._faults.token_slow
        if error <= 0 and slow <= 0:
            return None
        draw = self._token_rng.random()
        if draw < error:
            return "token_error"
        if draw < error + slow:
            return "token_slow"
        return None

    def bad_shape_variant(self) -> int:
        """Which wrong shape a ``bad_shape`` answer takes (see :func:`bad_shape_reply`)."""
        return self._fault_rng.randrange(3)

    def alter_items(
        self, payload: str, kind: str, *, items_key: str, asin_key: str, requested: set[str]
    ) -> str | None:
        """Apply an item fault to a GetItems container's JSON text; None if it has no items.

        ``drop_item`` removes one item, ``duplicate_item`` repeats one, and ``extra_item``
        adds a copy of one under an ASIN not in ``requested`` (upper-case ids).
        """
        container = json.loads(payload)
        items = container.get(items_key)
        if not isinstance(items, list) or not items:
            return None
        index = self._fault_rng.randrange(len(items))
        if kind == "drop_item":
            del items[index]
        elif kind == "duplicate_item":
            items.append(items[index])
        else:
            extra = dict(items[index])
            while True:
                asin = f"B0{self._fault_rng.randrange(10**8):08d}"
                if asin not in requested:
                    break
            extra[asin_key] = asin
            items.append(extra)
        return json.dumps(container, ensure_ascii=False, separators=(",", ":"))


def html_page(status: int) -> Reply:
    """The HTML page a load balancer sends instead of JSON (for 200: a proxy's sign-in page)."""
    title = _HTML.get(status, f"{status} Error")
    page = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n"
    )
    return Reply(status, page.encode(), "text/html")


def bad_shape_reply(variant: int, *, container: str, items: str, asin: str) -> Reply:
    """A 200 JSON answer of the wrong shape, spelled with the protocol's field names.

    Variants: 0, the result under an unknown name (no ``container``); 1, ``items`` an object
    instead of a list; 2, an item without its ``asin``.
    """
    body: dict[str, object]
    if variant == 0:
        body = {"unexpectedResult": {items: []}, "note": "not the documented shape"}
    elif variant == 1:
        body = {container: {items: {asin: "B000000000"}}}
    else:
        body = {container: {items: [{"title": "an item without its id"}]}}
    return Reply(200, json.dumps(body, separators=(",", ":")).encode())


async def deliver(
    request: web.Request,
    reply: Reply,
    fault: str | None,
    *,
    clock: Clock,
    hang_s: float,
    stopping: asyncio.Event,
    oversized_bytes: int = 50 * 1024 * 1024,
) -> web.StreamResponse:
    """Write ``reply``, broken as ``fault`` says (``reset``, ``truncated``, ``hang``,
    ``disconnect``, ``oversized``, or None).

    Args:
        request: the request being answered.
        reply: the answer as it would be without a fault.
        fault: the fault that hits the writing, if any.
        clock: the simulator's clock (a hang sleeps on it).
        hang_s: how long a hanging body stalls before the connection is dropped.
        stopping: set when the app shuts down, which ends a hang at once.
        oversized_bytes: the size of an ``oversized`` body.
    """
    if fault == "disconnect":
        # Closed before the status line: the client sees the server disconnect.
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=reply.status)
    if fault == "oversized":
        return await _oversized(request, oversized_bytes, stopping)
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


async def _oversized(
    request: web.Request, size: int, stopping: asyncio.Event
) -> web.StreamResponse:
    """Stream a 200 JSON body of ``size`` bytes in chunks, with no Content-Length."""
    head = b'{"itemsResult":{"items":[]},"padding":"'
    tail = b'"}'
    response = web.StreamResponse(status=200)
    response.content_type = "application/json"
    response.enable_chunked_encoding()
    await response.prepare(request)
    left = max(0, size - len(head) - len(tail))
    try:
        await response.write(head)
        while left > 0 and not stopping.is_set():
            chunk = _PAD_CHUNK if left >= len(_PAD_CHUNK) else _PAD_CHUNK[:left]
            await response.write(chunk)
            left -= len(chunk)
        await response.write(tail)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        # The client stopped reading at its cap and closed the connection: the point.
        if request.transport is not None:
            request.transport.abort()
    return response
