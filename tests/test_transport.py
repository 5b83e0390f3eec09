"""The aiohttp transport: whole bodies under a cap, mapped errors, and a one-way lifecycle."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from broker.api.base import HttpRequest, RawResponse
from broker.engine.transport import (
    AiohttpTransport,
    MockTransport,
    proxies_from_environment,
    proxy_url,
)
from broker.errors import (
    BodyTooLarge,
    ConfigError,
    ConnectError,
    NetworkRefused,
    RequestTimeout,
    TransportError,
)
from broker.simulator.server import SimulatorServer

SECRET_HEADER = "Bearer tok-do-not-leak"


async def _ok(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(status=200, body=b"echo:" + body, headers={"X-Thing": "Yes"})


async def _error(request: web.Request) -> web.Response:
    return web.Response(status=503, text="down")


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * 5000)


async def _big_chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for _ in range(10):
        await response.write(b"y" * 1000)
    await response.write_eof()
    return response


async def _reset(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 1000
    await response.prepare(request)
    await response.write(b"z" * 500)
    assert request.transport is not None
    request.transport.abort()
    return response


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """A tiny aiohttp server with well-behaved and badly-behaved routes; yields its URL."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/ok", _ok)
    app.router.add_post("/error", _error)
    app.router.add_post("/big", _big)
    app.router.add_post("/chunked", _big_chunked)
    app.router.add_post("/reset", _reset)
    app.router.add_post("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    release.set()
    await runner.cleanup()


def _request(url: str) -> HttpRequest:
    return HttpRequest("POST", url, {"Authorization": SECRET_HEADER}, b"hello")


class TestProxies:
    """The environment's proxy is used for Amazon, never for a loopback endpoint."""

    @pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
    async def test_a_loopback_endpoint_is_never_proxied(
        self, server: str, monkeypatch: pytest.MonkeyPatch, variable: str
    ) -> None:
        """With HTTP_PROXY set and NO_PROXY not listing 127.0.0.1 (a common shell), a
        request to http://127.0.0.1 (the README's broker simulate, a local forwarder) goes
        straight there: through the proxy, its secret or token crossed the network in
        clear text, which is why plain http:// is allowed only for loopback."""
        seen: list[str] = []

        async def record(request: web.Request) -> web.Response:
            seen.append(str(request.url))
            return web.Response(text="proxied")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(variable, f"http://127.0.0.1:{runner.addresses[0][1]}")
        try:
            async with AiohttpTransport() as transport:
                response = await transport.send(_request(server + "/ok"))
        finally:
            await runner.cleanup()
        assert response.body == b"echo:hello"
        assert seen == []

    async def test_a_proxy_without_a_scheme_is_http(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """HTTPS_PROXY=host:port with a trailing blank is http://host:port, as curl and
        requests take it (every request failed with InvalidURL, waited out as an outage)."""
        seen: list[bytes] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.readuntil(b"\r\n"))
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 407 No\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        proxy = await asyncio.start_server(answer, "127.0.0.1", 0)
        for name in ("https_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy.sockets[0].getsockname()[1]} ")
        try:
            async with AiohttpTransport(timeout_s=5, connect_timeout_s=2) as transport:
                with pytest.raises(NetworkRefused):
                    await transport.send(HttpRequest("POST", "https://example.com/x", {}, b"{}"))
        finally:
            proxy.close()
            await proxy.wait_closed()
        assert seen == [b"CONNECT example.com:443 HTTP/1.1\r\n"]

    @pytest.mark.parametrize(
        "value",
        [
            "socks5://user:hunter2@127.0.0.1:1080",
            "http://:3128",
            "proxy.corp:99999",
            "http://pro xy.corp:3128",
            "user:hunter2@proxy.corp:port",
        ],
    )
    async def test_a_proxy_that_cannot_be_used_is_refused_at_its_first_send(
        self, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        """A proxy variable that is no http(s) proxy URL is a ConfigError naming it at the
        first send that would take it, before anything is sent, its password masked
        (socks5:// got an HTTP CONNECT; the rest failed every request with InvalidURL,
        retried as an outage)."""
        for name in ("HTTPS_PROXY", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("https_proxy", value)
        async with AiohttpTransport() as transport:
            with pytest.raises(ConfigError) as caught:
                await transport.send(HttpRequest("POST", "https://example.com/x", {}, b"{}"))
        assert caught.value.path == "https_proxy (environment)"
        assert "hunter2" not in str(caught.value)

    @pytest.mark.parametrize(
        "environ",
        [
            {"https_proxy": "socks5://u:hunter2@127.0.0.1:1080"},  # loopback: never proxied
            {"http_proxy": "socks5://127.0.0.1:1080", "ALL_PROXY": "socks5://127.0.0.1:1"},
            {"https_proxy": "socks5://127.0.0.1:1080", "no_proxy": "*"},
        ],
        ids=["loopback", "other-schemes", "no-proxy"],
    )
    async def test_a_proxy_no_request_takes_is_not_refused(
        self, server: str, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]
    ) -> None:
        """An unusable proxy that no request of the broker takes (its host is loopback or
        in NO_PROXY, or it is for another scheme) is none of the broker's business: it was
        refused at open, and `broker bench` in a shell with a socks5 proxy exited 2."""
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        async with AiohttpTransport() as transport:
            response = await transport.send(_request(server + "/ok"))
        assert response.body == b"echo:hello"

    def test_the_environment_is_read_as_urllib_reads_it(self) -> None:
        """A lowercase variable wins over its capitalised twin, an empty one unsets it, and
        NO_PROXY is kept for the bypass check; a value is read as curl reads it."""
        environ = {
            "HTTPS_PROXY": "http://upper:1",
            "https_proxy": " lower:3128 ",
            "HTTP_PROXY": "http://upper:2",
            "http_proxy": "",
            "NO_PROXY": "internal.example",
        }
        assert proxies_from_environment(environ) == {
            "https": ("https_proxy", " lower:3128 "),
            "no": ("NO_PROXY", "internal.example"),
        }
        assert proxy_url("https_proxy", " lower:3128 ") == "http://lower:3128"
        assert proxy_url("https_proxy", "   ") is None


class TestSend:
    """What send returns and raises."""

    async def test_whole_response(self, server: str) -> None:
        """Status, lower-cased headers, the whole body and the elapsed time come back."""
        async with AiohttpTransport() as transport:
            response = await transport.send(_request(server + "/ok"))
        assert response.status == 200
        assert response.body == b"echo:hello"
        assert response.headers["x-thing"] == "Yes"
        assert response.elapsed_s > 0

    async def test_error_status_is_a_response(self, server: str) -> None:
        """A 5xx is a normal response, not an exception (parsing decides)."""
        async with AiohttpTransport() as transport:
            response = await transport.send(_request(server + "/error"))
        assert (response.status, response.body) == (503, b"down")

    @pytest.mark.parametrize("path", ["/big", "/chunked"])
    async def test_body_cap(self, server: str, path: str) -> None:
        """A body over max_body_bytes is refused, declared (Content-Length) or streamed,
        naming the setting and what to do (the same answer comes again on a retry)."""
        async with AiohttpTransport(max_body_bytes=4096) as transport:
            with pytest.raises(BodyTooLarge, match="4096-byte cap") as info:
                await transport.send(_request(server + path))
        assert isinstance(info.value, TransportError)
        assert "engine.max_body_bytes: ask for fewer items or resources" in str(info.value)

    async def test_refused_body_is_not_kept_by_the_error(self, server: str) -> None:
        """The BodyTooLarge a retry keeps holds no part of the body in its traceback."""
        async with AiohttpTransport(max_body_bytes=4096) as transport:
            with pytest.raises(BodyTooLarge) as info:
                await transport.send(_request(server + "/chunked"))
        held = 0
        tb = info.value.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, bytes | bytearray):
                    held = max(held, len(value))
            tb = tb.tb_next
        assert held < 1024

    async def test_body_at_cap_is_fine(self, server: str) -> None:
        """A body of exactly the cap is read whole."""
        async with AiohttpTransport(max_body_bytes=5000) as transport:
            response = await transport.send(_request(server + "/big"))
        assert len(response.body) == 5000

    async def test_timeout(self, server: str) -> None:
        """A response slower than the timeout raises RequestTimeout (also a TimeoutError)."""
        async with AiohttpTransport(timeout_s=0.2) as transport:
            with pytest.raises(RequestTimeout) as info:
                await transport.send(_request(server + "/slow"))
        assert isinstance(info.value, TimeoutError)
        assert SECRET_HEADER not in str(info.value)

    async def test_reset_mid_body(self, server: str) -> None:
        """A connection reset half way through the body raises ConnectError."""
        async with AiohttpTransport() as transport:
            with pytest.raises(ConnectError) as info:
                await transport.send(_request(server + "/reset"))
        assert isinstance(info.value, ConnectionError)
        assert "tok-do-not-leak" not in str(info.value)

    async def test_connection_refused(self, server: str) -> None:
        """Nothing listening is a ConnectError naming the URL."""
        async with SimulatorServer() as sim:
            url = sim.url
        async with AiohttpTransport(connect_timeout_s=1.0) as transport:
            with pytest.raises(ConnectError, match="connection failed"):
                await transport.send(_request(url + "/ok"))


class TestLifecycle:
    """unopened -> open -> closed, never back."""

    async def test_send_before_open(self) -> None:
        """Sending before ``async with`` is misuse."""
        with pytest.raises(RuntimeError, match="not open"):
            await AiohttpTransport().send(_request("http://127.0.0.1:1/"))

    async def test_reuse_after_close_refused(self, server: str) -> None:
        """A closed transport cannot send or be reopened."""
        transport = AiohttpTransport()
        async with transport:
            await transport.send(_request(server + "/ok"))
        assert "CLOSED" in repr(transport)
        with pytest.raises(RuntimeError, match="not open"):
            await transport.send(_request(server + "/ok"))
        with pytest.raises(RuntimeError, match="only once"):
            await transport.__aenter__()

    async def test_enter_twice_refused(self) -> None:
        """An open transport cannot be entered again."""
        async with AiohttpTransport() as transport:
            with pytest.raises(RuntimeError, match="only once"):
                await transport.__aenter__()


async def test_mock_transport_records() -> None:
    """MockTransport records each request and returns its handler's answer."""

    async def handler(request: HttpRequest) -> RawResponse:
        return RawResponse(201, {}, request.body)

    transport = MockTransport(handler)
    response = await transport.send(_request("https://example.test/x"))
    assert response.status == 201
    assert [r.url for r in transport.requests] == ["https://example.test/x"]
    assert "tok-do-not-leak" not in repr(transport.requests[0])


class TestRefusedByTheWay:
    """A refusal no wait mends (an untrusted certificate, a proxy saying no) is told apart
    from an outage: NetworkRefused, with its catalogue code."""

    @pytest.mark.parametrize(("status", "refused"), [(407, True), (403, True), (502, False)])
    async def test_a_proxy_refusing_the_tunnel(
        self, monkeypatch: pytest.MonkeyPatch, status: int, refused: bool
    ) -> None:
        """CONNECT answered 407 or 403 is ProxyRefused (each row failed after six attempts,
        logged at debug only); a 502 stays a connection error, retried."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")  # the CONNECT request
            writer.write(f"HTTP/1.1 {status} No\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()

        proxy = await asyncio.start_server(answer, "127.0.0.1", 0)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        try:
            async with AiohttpTransport(timeout_s=5, connect_timeout_s=2) as transport:
                with pytest.raises(TransportError) as caught:
                    await transport.send(HttpRequest("POST", "https://example.com/x", {}, b"{}"))
        finally:
            proxy.close()
            await proxy.wait_closed()
        assert isinstance(caught.value, NetworkRefused) is refused
        if refused:
            assert caught.value.code == "ProxyRefused"  # type: ignore[attr-defined]

    @pytest.mark.skipif(
        shutil.which("openssl") is None, reason="makes its certificate with openssl"
    )
    async def test_an_untrusted_certificate(self, tmp_path: Path) -> None:
        """A self-signed certificate is UntrustedCertificate (it was waited out as an
        outage for the whole budget, 15 minutes for broker run)."""
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        made = await asyncio.create_subprocess_exec(
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await made.wait() == 0
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

        async def answer(request: web.Request) -> web.Response:
            return web.Response(text="hello")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}/x"
        try:
            async with AiohttpTransport(timeout_s=5, connect_timeout_s=2) as transport:
                with pytest.raises(NetworkRefused) as caught:
                    await transport.send(HttpRequest("POST", url, {}, b"{}"))
        finally:
            await runner.cleanup()
        assert caught.value.code == "UntrustedCertificate"
