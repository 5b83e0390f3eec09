"""The HTTP transport: one aiohttp session, explicit timeouts, a capped body read.

It sends an already-authorized :class:`~broker.api.base.HttpRequest` and returns the
whole response as a :class:`~broker.api.base.RawResponse`; parsing happens elsewhere.
Every aiohttp, socket and timeout exception becomes a
:class:`~broker.errors.TransportError` in one place (:func:`_mapped_errors`); a failure to
connect at all (DNS, refused, connect timeout) is the subclass :class:`EndpointUnreachable`,
which the engine treats as an outage of the endpoint rather than a failure of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from broker.api.base import HttpRequest, RawResponse
from broker.config import is_loopback_host
from broker.errors import (
    BodyTooLarge,
    ConfigError,
    ConnectError,
    EndpointUnreachable,
    NetworkRefused,
    RequestTimeout,
    TransportError,
)
from broker.logs import scrub

__all__ = [
    "OUT_OF_FILES",
    "AiohttpTransport",
    "MockTransport",
    "Transport",
    "proxies_from_environment",
    "proxy_to",
    "proxy_url",
]

#: What to do about an answer over the read cap: Amazon sends the same answer again, so a
#: retry does not mend it (a search of 100 items with every resource is about 400 KB).
_CAP_HINT = " (engine.max_body_bytes: ask for fewer items or resources, or raise the cap)"


#: The errors of a process (or machine) out of open files: a socket cannot be made either.
OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE})

#: The proxy schemes aiohttp speaks; to any other (socks5://) it would send an HTTP CONNECT.
_PROXY_SCHEMES = ("http", "https")


def proxies_from_environment(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``urllib.request.getproxies_environment`` over ``environ``, keeping the variable that
    named each proxy: scheme -> (variable, value as given); ``no`` is NO_PROXY.

    As there, a lowercase variable wins over its capitalised twin (an empty one unsets it),
    and HTTP_PROXY is ignored under CGI, where a client's ``Proxy:`` header sets it
    (CVE-2016-1000110).
    """
    found: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy"):
            found[name.lower()[: -len("_proxy")]] = (name, value)
    if "REQUEST_METHOD" in environ:
        found.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy"):
            scheme = name.lower()[: -len("_proxy")]
            if value:
                found[scheme] = (name, value)
            else:
                found.pop(scheme, None)
    return found


def proxy_url(variable: str, value: str) -> str | None:
    """The proxy URL ``variable`` gives, read as curl and requests read it (None: only blanks).

    A value without a scheme (``proxy.corp:3128``, common) is ``http://``, and blanks around
    it are dropped: such a value failed every request with InvalidURL, retried as an outage
    of the network for the whole outage budget.

    Raises:
        ConfigError: it is no proxy URL, or one of a scheme aiohttp cannot speak (to a
            socks5:// proxy it would send an HTTP CONNECT); the error names ``variable``.
    """
    text = value.strip()
    if not text:
        return None
    if "://" not in text:
        text = f"http://{text}"
    # Quoted masked: a proxy URL may carry its user and password.
    shown = scrub(value.strip())
    scheme = text.partition("://")[0].lower()
    if scheme not in _PROXY_SCHEMES:
        raise ConfigError(
            f"{variable} (environment)",
            f"{shown!r} is a {scheme}:// proxy, which the broker cannot use: give an HTTP "
            "proxy (http://host:port), or unset it",
        )
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - it raises ValueError for a port that is no port
    except ValueError:
        parts = None
    if parts is None or not parts.hostname or any(c.isspace() for c in text):
        raise ConfigError(
            f"{variable} (environment)",
            f"{shown!r} is not a proxy URL: give http://host:port (user:password@ before "
            "the host if the proxy asks for them), or unset it",
        )
    return text


def proxy_to(scheme: str, host: str, named: Mapping[str, tuple[str, str]]) -> str | None:
    """The proxy a request to ``scheme://host`` takes under ``named``
    (:func:`proxies_from_environment`), checked; None: connect directly.

    Never for a loopback host, whatever NO_PROXY says: plain http:// is allowed only for
    one, and through a proxy its secret and tokens would cross the network in clear.

    Raises:
        ConfigError: the proxy it would take is no HTTP proxy URL (:func:`proxy_url`).
            Checked only here, for a proxy a request takes: a socks5:// one in a shell that
            runs the broker against the embedded simulator (or for a host NO_PROXY names)
            is none of the broker's business.
    """
    if scheme not in named:
        return None
    proxies = {each: value for each, (_, value) in named.items()}
    # proxy_bypass_environment reads NO_PROXY; typeshed does not list it.
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if is_loopback_host(host) or bypass(host, proxies):
        return None
    return proxy_url(*named[scheme])


class Transport(Protocol):
    """Protocol: sends one request and returns the whole response.

    ``send`` raises only :class:`~broker.errors.TransportError` subclasses; any HTTP
    status (including 4xx/5xx) is a normal response.
    """

    async def send(self, request: HttpRequest) -> RawResponse: ...


class _State(enum.Enum):
    #: created, session not opened yet
    UNOPENED = 1
    #: inside ``async with``: sending is allowed
    OPEN = 2
    #: closed; cannot be reopened
    CLOSED = 3


@contextlib.contextmanager
def _mapped_errors(request: HttpRequest) -> Iterator[None]:
    """Translate foreign exceptions into the broker's transport errors, without header values.

    A foreign message may quote a proxy's URL, password and all (aiohttp does, for a proxy
    that refuses): it is scrubbed, and a traceback then shows the foreign exception neither
    as cause nor as context, or it would print the password after all. The foreign
    exceptions keep no frames either (:func:`_forget_frames`).
    """
    where = f"{request.method} {request.url}"
    try:
        yield
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        _forget_frames(exc)
        if isinstance(exc, aiohttp.ClientConnectorError) and exc.errno in OUT_OF_FILES:
            # This process's (or the machine's) open-file limit, not the endpoint: no outage
            # to wait out, and no retry mends it. Raised as the OSError it is.
            raise OSError(exc.errno, f"{exc.strerror} (opening a connection for {where})") from None
        error, cause = _translated(where, exc)
        raise error from cause


def _translated(where: str, exc: BaseException) -> tuple[TransportError, BaseException | None]:
    """The broker's error for a foreign one, and the cause to chain (None: none shown)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        # Before ClientConnectorError, its base: a certificate no wait will make trusted.
        message, cause = _shown(f"{where}: TLS certificate not trusted ({exc})", exc)
        return NetworkRefused(message, code="UntrustedCertificate"), cause
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        if exc.status not in (403, 407):
            message, cause = _shown(f"{where}: the proxy answered {exc.status} ({exc})", exc)
            return ConnectError(message), cause
        message, cause = _shown(f"{where}: the proxy refused it ({exc})", exc)
        return NetworkRefused(message, code="ProxyRefused"), cause
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        # Before the generic cases: a connect timeout is also a TimeoutError, and a refused
        # connection also a ClientConnectionError.
        message, cause = _shown(
            f"{where}: connection failed, no connection made ({type(exc).__name__}: {exc})", exc
        )
        return EndpointUnreachable(message), cause
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return RequestTimeout(f"{where}: timed out"), exc
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ConnectError(f"{where}: response body incomplete ({type(exc).__name__})"), exc
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
        message, cause = _shown(f"{where}: connection failed ({type(exc).__name__}: {exc})", exc)
        return ConnectError(message), cause
    message, cause = _shown(f"{where}: {type(exc).__name__}: {exc}", exc)
    return TransportError(message), cause


def _forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and of every exception it chains.

    aiohttp's frames hold the request: its body (a token request's, with the client
    secret) and its headers (a bearer token, a SigV4 signature). An error reporter that
    records the locals of every frame of an exception's chain (Sentry, by default) uploaded
    them from the error a caller caught, several causes down.
    """
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        each = pending.pop()
        if id(each) in seen:
            continue
        seen.add(id(each))
        each.__traceback__ = None
        pending.extend(e for e in (each.__cause__, each.__context__) if e is not None)


def _shown(message: str, exc: BaseException) -> tuple[str, BaseException | None]:
    """``message`` fit to show, and the cause to chain: ``exc``, unless the message held a
    credential (then masked, and no cause: its own text holds the credential too)."""
    shown = scrub(message)
    return (message, exc) if shown == message else (shown, None)


class AiohttpTransport:
    """The real transport: one ``aiohttp.ClientSession`` for the transport's whole life.

    Create it, then ``async with transport:``; the session is created inside the running
    loop and closed on exit. Reuse after close raises ``RuntimeError``.
    """

    __slots__ = (
        "_connect_timeout_s",
        "_max_body_bytes",
        "_max_connections",
        "_proxies",
        "_proxy_cache",
        "_session",
        "_slots",
        "_state",
        "_timeout_s",
        "_trust_env",
    )

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        max_body_bytes: int = 8 * 1024 * 1024,
        max_connections: int = 64,
        trust_env: bool = True,
    ) -> None:
        self._timeout_s = timeout_s
        self._trust_env = trust_env
        # scheme -> (the variable that named it, its value), as proxies_from_environment
        self._proxies: dict[str, tuple[str, str]] = {}
        self._proxy_cache: dict[tuple[str, str], str | None] = {}
        self._connect_timeout_s = connect_timeout_s
        self._max_body_bytes = max_body_bytes
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # One per pooled connection: a send waits here, before its timeout starts, so the
        # pool never makes a request wait inside aiohttp (where ``total`` would count it).
        self._slots = asyncio.Semaphore(max_connections)
        self._state = _State.UNOPENED

    async def __aenter__(self) -> AiohttpTransport:
        if self._state is not _State.UNOPENED:
            raise RuntimeError("a transport can be opened only once")
        # HTTPS_PROXY / HTTP_PROXY / NO_PROXY apply, as users expect (not for the embedded
        # simulator on loopback, which no proxy should see). Read once here and resolved
        # once per host, not through aiohttp's trust_env, which looks them up (and .netrc)
        # in a thread for every request: most of a request's CPU when measured.
        if self._trust_env:
            self._proxies = proxies_from_environment(os.environ)
        # The same limit as the slots (a backstop: a send holding a slot always finds a
        # connection free here).
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=self._max_connections,
            ttl_dns_cache=300,
        )
        # sock_connect, not connect: aiohttp's ``connect`` also counts the wait for a free
        # pooled connection, and a busy pool is not an unreachable endpoint (K3). Nor is that
        # wait part of ``total``: a send takes one of ``_slots`` first, so a connection is
        # free by the time aiohttp is asked and the request has its whole time.
        timeout = aiohttp.ClientTimeout(
            total=self._timeout_s,
            sock_connect=self._connect_timeout_s,
            sock_read=self._timeout_s,
        )
        # auto_decompress stays on; skip_auto_headers keeps the bytes we sign as they are.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            raise_for_status=False,
            skip_auto_headers=("Content-Type",),
        )
        self._state = _State.OPEN
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._state = _State.CLOSED
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: HttpRequest) -> RawResponse:
        """Send ``request`` and read the whole body (at most ``max_body_bytes``), once one
        of the ``max_connections`` connections is free (the wait is outside the timeout and
        outside the response's ``elapsed_s``)."""
        if self._state is not _State.OPEN or self._session is None:
            raise RuntimeError("transport is not open (use 'async with')")
        async with self._slots:
            if self._state is not _State.OPEN or self._session is None:
                raise RuntimeError("transport is not open (closed while this send waited)")
            return await self._send(self._session, request)

    async def _send(self, session: aiohttp.ClientSession, request: HttpRequest) -> RawResponse:
        """Send ``request`` on a connection that is free (the caller holds a slot)."""
        started = time.perf_counter()
        with _mapped_errors(request):
            async with session.request(
                request.method,
                request.url,
                data=request.body,
                headers=request.headers,
                allow_redirects=False,
                proxy=self._proxy_for(request.url) if self._proxies else None,
            ) as response:
                declared = response.content_length
                if declared is not None and declared > self._max_body_bytes:
                    raise BodyTooLarge(
                        f"{request.method} {request.url}: body of {declared} bytes is over "
                        f"the {self._max_body_bytes}-byte cap{_CAP_HINT}"
                    )
                body = await self._read_capped(request, response.content)
                headers = {k.lower(): v for k, v in response.headers.items()}
                return RawResponse(response.status, headers, body, time.perf_counter() - started)

    def _proxy_for(self, url: str) -> str | None:
        """The proxy the environment names for ``url`` (None: connect directly), looked up
        once per (scheme, host)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "")
        try:
            return self._proxy_cache[key]
        except KeyError:
            pass
        proxy = self._proxy_cache[key] = proxy_to(key[0], key[1], self._proxies)
        return proxy

    async def _read_capped(self, request: HttpRequest, content: aiohttp.StreamReader) -> bytes:
        """Read the body to its end, refusing it as soon as it passes ``max_body_bytes``.

        A body without a Content-Length (chunked) can be any size, so the cap is checked per
        chunk; at most ``max_body_bytes`` plus one chunk is ever held. Chunks go into one
        bytearray, not ``bytes +=``, which would copy the whole body on every chunk.
        """
        cap = self._max_body_bytes
        buffer = bytearray()
        while True:
            chunk = await content.read(cap + 1 - len(buffer))
            if not chunk:
                # read() returns b"" only at the end of the body; a connection closed early
                # raised ClientPayloadError instead.
                return bytes(buffer)
            buffer += chunk
            if len(buffer) > cap:
                # Let go of the body first: a retry keeps the error, and its traceback would
                # hold this frame's buffer (up to the cap, per waiting batch) with it.
                buffer.clear()
                chunk = b""
                raise BodyTooLarge(
                    f"{request.method} {request.url}: body over the {cap}-byte cap{_CAP_HINT}"
                )

    def __repr__(self) -> str:
        return f"AiohttpTransport(state={self._state.name}, timeout_s={self._timeout_s})"


class MockTransport:
    """A transport that calls ``handler(request)`` instead of the network (for unit tests)."""

    __slots__ = ("_handler", "requests")

    def __init__(self, handler: Callable[[HttpRequest], Awaitable[RawResponse]]) -> None:
        self._handler = handler
        self.requests: list[HttpRequest] = []

    async def send(self, request: HttpRequest) -> RawResponse:
        """Record the request and return the handler's response."""
        self.requests.append(request)
        await asyncio.sleep(0)
        return await self._handler(request)
