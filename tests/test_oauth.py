"""Tests for broker.api.oauth: the Creators API token cache (protocol.md 2.2)."""

from __future__ import annotations

import asyncio
import json
import traceback
from urllib.parse import parse_qsl

import pytest

from broker.api.base import HttpRequest, RawResponse
from broker.api.marketplaces import token_url
from broker.api.oauth import CreatorsTokenCache
from broker.errors import (
    CATALOGUE,
    AuthError,
    BrokerError,
    ConnectError,
    ResponseError,
    Scope,
    ServerError,
    ThrottledError,
)
from broker.models import Secret
from broker.testing import FakeClock, settle

CREDENTIAL_ID = "amzn1.application-oa2-client.0123"
SECRET = "s3cr3t+/=&VALUE"
TOKEN_PREFIX = "Atc|MQICIJvSKVTZ-"


def grant(n: int, expires_in: object = 3600) -> RawResponse:
    """A token response like the LWA docs example, with token number ``n``."""
    body: dict[str, object] = {
        "access_token": f"{TOKEN_PREFIX}{n}",
        "scope": "creatorsapi::default",
        "token_type": "bearer",
    }
    if expires_in is not None:
        body["expires_in"] = expires_in
    return RawResponse(200, {}, json.dumps(body).encode())


class Endpoint:
    """A fake token endpoint: records requests, answers from a script, optionally gated."""

    def __init__(self, *script: RawResponse | Exception, gated: bool = False) -> None:
        self.script = list(script)
        self.requests: list[HttpRequest] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def __call__(self, request: HttpRequest) -> RawResponse:
        self.requests.append(request)
        await self.gate.wait()
        answer = self.script.pop(0) if self.script else grant(len(self.requests))
        if isinstance(answer, Exception):
            raise answer
        return answer


def make(
    endpoint: Endpoint,
    clock: FakeClock | None = None,
    *,
    version: str = "3.1",
    margin: float = 30.0,
) -> CreatorsTokenCache:
    return CreatorsTokenCache(
        CREDENTIAL_ID,
        Secret(SECRET),
        version,
        send=endpoint,
        clock=clock or FakeClock(),
        refresh_margin_s=margin,
    )


class TestTokenRequest:
    @pytest.mark.parametrize(
        ("version", "url"),
        [
            ("2.1", "https://creatorsapi.auth.us-east-1.amazoncognito.com/oauth2/token"),
            ("2.2", "https://creatorsapi.auth.eu-south-2.amazoncognito.com/oauth2/token"),
            ("2.3", "https://creatorsapi.auth.us-west-2.amazoncognito.com/oauth2/token"),
        ],
    )
    async def test_v2_cognito_form_body(self, version: str, url: str) -> None:
        """v2.x posts a form body with scope creatorsapi/default to its Cognito URL."""
        endpoint = Endpoint()
        await make(endpoint, version=version).token()
        (request,) = endpoint.requests
        assert (request.method, request.url) == ("POST", url)
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert parse_qsl(request.body.decode(), strict_parsing=True) == [
            ("grant_type", "client_credentials"),
            ("client_id", CREDENTIAL_ID),
            ("client_secret", SECRET),
            ("scope", "creatorsapi/default"),
        ]

    async def test_v2_body_bytes(self) -> None:
        """The v2 body is the documented form, percent-encoded."""
        endpoint = Endpoint()
        cache = CreatorsTokenCache("cid", Secret("sec"), "2.1", send=endpoint, clock=FakeClock())
        await cache.token()
        assert endpoint.requests[0].body == (
            b"grant_type=client_credentials&client_id=cid&client_secret=sec"
            b"&scope=creatorsapi%2Fdefault"
        )

    @pytest.mark.parametrize(
        ("version", "url"),
        [
            ("3.1", "https://api.amazon.com/auth/o2/token"),
            ("3.2", "https://api.amazon.co.uk/auth/o2/token"),
            ("3.3", "https://api.amazon.co.jp/auth/o2/token"),
        ],
    )
    async def test_v3_lwa_json_body(self, version: str, url: str) -> None:
        """v3.x posts the documented JSON body with scope creatorsapi::default to LWA."""
        endpoint = Endpoint()
        await make(endpoint, version=version).token()
        (request,) = endpoint.requests
        assert (request.method, request.url) == ("POST", url)
        assert request.headers["content-type"] == "application/json"
        assert (
            request.body
            == json.dumps(
                {
                    "grant_type": "client_credentials",
                    "client_id": CREDENTIAL_ID,
                    "client_secret": SECRET,
                    "scope": "creatorsapi::default",
                },
                separators=(",", ":"),
            ).encode()
        )

    @pytest.mark.parametrize(
        ("version", "path"), [("2.2", "/oauth2/token"), ("3.2", "/auth/o2/token")]
    )
    async def test_token_url_override(self, version: str, path: str) -> None:
        """A simulator token URL from marketplaces.token_url is used as given."""
        endpoint = Endpoint()
        url = token_url(version, "http://127.0.0.1:8123")
        cache = CreatorsTokenCache(
            CREDENTIAL_ID, Secret(SECRET), version, token_url=url, send=endpoint, clock=FakeClock()
        )
        await cache.token()
        assert endpoint.requests[0].url == "http://127.0.0.1:8123" + path
        assert cache.token_url == url

    def test_bad_arguments(self) -> None:
        """An unknown version, a blank id or a negative margin raise ValueError."""
        endpoint = Endpoint()
        with pytest.raises(ValueError, match="version"):
            make(endpoint, version="4.1")
        with pytest.raises(ValueError, match="credential id"):
            CreatorsTokenCache(" ", Secret(SECRET), "3.1", send=endpoint, clock=FakeClock())
        with pytest.raises(ValueError, match="margin"):
            make(endpoint, margin=-1)


class TestAuthorizationHeader:
    @pytest.mark.parametrize("version", ["2.1", "2.2", "2.3"])
    def test_v2_carries_version(self, version: str) -> None:
        """v2.x: 'Bearer <t>, Version <v>' (protocol.md 2.2)."""
        cache = make(Endpoint(), version=version)
        assert cache.authorization_header("eyJ") == f"Bearer eyJ, Version {version}"

    @pytest.mark.parametrize("version", ["3.1", "3.2", "3.3"])
    def test_v3_is_bare_bearer(self, version: str) -> None:
        """v3.x: 'Bearer <t>' with no Version."""
        assert make(Endpoint(), version=version).authorization_header("Atc|x") == "Bearer Atc|x"

    async def test_authorize_adds_the_header(self) -> None:
        """authorize() returns the request with its authorization header, and the token."""
        cache = make(Endpoint(), version="2.1")
        request = HttpRequest("POST", "https://creatorsapi.amazon/x", {"accept": "*/*"}, b"{}")
        authorized, token = await cache.authorize(request)
        assert token == f"{TOKEN_PREFIX}1"
        assert authorized.headers["authorization"] == f"Bearer {token}, Version 2.1"
        assert authorized.headers["accept"] == "*/*"


class TestCaching:
    async def test_token_is_cached(self) -> None:
        """A second call within the lifetime sends no request."""
        endpoint = Endpoint()
        cache = make(endpoint)
        assert await cache.token() == await cache.token() == f"{TOKEN_PREFIX}1"
        assert len(endpoint.requests) == cache.requests_sent == 1

    async def test_refresh_ahead_of_expiry(self) -> None:
        """The token is due refresh_margin_s before expires_in runs out, not before, and
        prepare() replaces it then; a send's token() uses it until 5 s before it expires
        (a send booked just after the refresh instant must not fetch after its booking)."""
        clock = FakeClock()
        endpoint = Endpoint()
        cache = make(endpoint, clock)
        await cache.token()
        await clock.advance(3600 - 30 - 0.001)
        assert not cache.due()
        await clock.advance(0.001)
        assert cache.due()
        assert await cache.token() == f"{TOKEN_PREFIX}1"
        await cache.prepare()
        assert await cache.token() == f"{TOKEN_PREFIX}2"
        assert len(endpoint.requests) == 2

    async def test_a_send_refreshes_only_just_before_expiry(self) -> None:
        """Without prepare(), token() keeps the token until 5 s before it expires, then
        fetches (after an invalidate, or a key whose dispatcher did not get to it)."""
        clock = FakeClock()
        endpoint = Endpoint()
        cache = make(endpoint, clock)
        await cache.token()
        await clock.advance(3600 - 5 - 0.001)
        assert await cache.token() == f"{TOKEN_PREFIX}1"
        await clock.advance(0.001)
        assert await cache.token() == f"{TOKEN_PREFIX}2"
        assert len(endpoint.requests) == 2

    @pytest.mark.parametrize(
        ("expires_in", "lifetime"),
        [(None, 3600), ("120", 120), (0, 3600), (-5, 3600), ("soon", 3600), (True, 3600)],
    )
    async def test_expires_in_values(self, expires_in: object, lifetime: float) -> None:
        """expires_in is read as seconds; absent or unusable means 3600."""
        clock = FakeClock()
        endpoint = Endpoint(grant(1, expires_in))
        cache = make(endpoint, clock, margin=0)
        await cache.token()
        await clock.advance(lifetime - 0.5)
        await cache.token()
        assert len(endpoint.requests) == 1
        await clock.advance(0.5)
        await cache.token()
        assert len(endpoint.requests) == 2

    async def test_short_lifetime_is_still_used(self) -> None:
        """A lifetime shorter than the margin still serves for half its length."""
        clock = FakeClock()
        endpoint = Endpoint(grant(1, 10))
        cache = make(endpoint, clock, margin=30)
        await cache.token()
        await clock.advance(4.9)
        await cache.token()
        assert len(endpoint.requests) == 1

    async def test_a_lifetime_under_twice_the_margin_is_refreshed_at_half(self) -> None:
        """A token living 40 s (under twice the 30 s margin) serves sends 5 s apart, each
        prepared as the engine does, for half its life: one token request, not one per send
        from 10 s on (the whole margin taken off left a refresh instant 10 s after issue)."""
        clock = FakeClock()
        endpoint = Endpoint(grant(1, 40))
        cache = make(endpoint, clock, margin=30)
        for _ in range(4):  # sends at 0, 5, 10 and 15 s
            await cache.prepare()
            assert await cache.token() == f"{TOKEN_PREFIX}1"
            await clock.advance(5)
        assert len(endpoint.requests) == 1
        assert cache.due()  # 20 s: half its life

    @pytest.mark.parametrize("jump_s", [-7200.0, 86_400.0])
    async def test_wall_clock_jumps_do_not_matter(self, jump_s: float) -> None:
        """Expiry runs on the monotonic clock: a wall-clock jump neither expires nor extends."""
        clock = FakeClock()
        endpoint = Endpoint()
        cache = make(endpoint, clock)
        await cache.token()
        clock.wall_offset = jump_s
        await clock.advance(60)
        await cache.token()
        assert len(endpoint.requests) == 1
        await clock.advance(3600)
        await cache.token()
        assert len(endpoint.requests) == 2

    async def test_lifetime_counts_from_the_request(self) -> None:
        """A slow token response does not stretch the token's life past its issue time."""
        clock = FakeClock()
        endpoint = Endpoint(gated=True)
        cache = make(endpoint, clock, margin=0)
        task = asyncio.create_task(cache.token())
        await clock.advance(100)
        endpoint.gate.set()
        await task
        await clock.advance(3500)
        await cache.token()
        assert len(endpoint.requests) == 2


class TestSingleFlight:
    async def test_fifty_concurrent_callers_one_request(self) -> None:
        """50 callers during a fetch share one token request and get the same token."""
        endpoint = Endpoint(gated=True)
        cache = make(endpoint)
        tasks = [asyncio.create_task(cache.token()) for _ in range(50)]
        await settle()
        assert len(endpoint.requests) == 1
        endpoint.gate.set()
        assert set(await asyncio.gather(*tasks)) == {f"{TOKEN_PREFIX}1"}
        assert len(endpoint.requests) == 1

    async def test_refresh_under_load_is_single(self) -> None:
        """At expiry, 50 concurrent callers cause one refresh, not fifty."""
        clock = FakeClock()
        endpoint = Endpoint()
        cache = make(endpoint, clock)
        await cache.token()
        await clock.advance(3600)
        endpoint.gate.clear()
        tasks = [asyncio.create_task(cache.token()) for _ in range(50)]
        await settle()
        endpoint.gate.set()
        assert set(await asyncio.gather(*tasks)) == {f"{TOKEN_PREFIX}2"}
        assert len(endpoint.requests) == 2

    async def test_one_failure_answers_every_waiter(self) -> None:
        """A failed fetch fails all its waiters with one request; the next call tries again."""
        endpoint = Endpoint(RawResponse(503, {}, b"{}"), gated=True)
        cache = make(endpoint)
        tasks = [asyncio.create_task(cache.token()) for _ in range(50)]
        await settle()
        endpoint.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ServerError) for r in results)
        assert len(endpoint.requests) == 1
        assert await cache.token() == f"{TOKEN_PREFIX}2"
        assert len(endpoint.requests) == 2

    async def test_cancelled_fetch_lets_a_waiter_fetch(self) -> None:
        """If the fetching caller is cancelled, a waiter fetches instead of failing."""
        endpoint = Endpoint(gated=True)
        cache = make(endpoint)
        leader = asyncio.create_task(cache.token())
        await settle()
        waiter = asyncio.create_task(cache.token())
        await settle()
        leader.cancel()
        await settle()
        assert leader.cancelled()
        endpoint.gate.set()
        assert await waiter == f"{TOKEN_PREFIX}2"
        assert len(endpoint.requests) == 2

    async def test_transport_errors_propagate_to_all_waiters(self) -> None:
        """A transport error reaches every waiter unchanged (retryable)."""
        endpoint = Endpoint(ConnectError("connection refused"), gated=True)
        cache = make(endpoint)
        tasks = [asyncio.create_task(cache.token()) for _ in range(5)]
        await settle()
        endpoint.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ConnectError) for r in results)
        assert len(endpoint.requests) == 1


class TestPrepare:
    """prepare(): the token fetched ahead of a send, so the send itself need not wait."""

    async def test_prepare_fetches_only_when_due(self) -> None:
        """prepare() fetches when there is no token or it is about to expire, else nothing;
        due() says which."""
        clock = FakeClock()
        endpoint = Endpoint()
        cache = make(endpoint, clock, margin=30.0)
        assert cache.due()
        await cache.prepare()
        assert not cache.due()
        await cache.prepare()
        assert await cache.token() == f"{TOKEN_PREFIX}1"
        assert len(endpoint.requests) == 1
        await clock.advance(3600 - 30)
        assert cache.due()
        await cache.prepare()
        assert len(endpoint.requests) == 2
        assert await cache.token() == f"{TOKEN_PREFIX}2"

    async def test_a_failed_prepare_is_raised_by_the_next_token_once(self) -> None:
        """A fetch that failed in prepare() is not repeated by the send right after it: the
        next token() raises that failure; the one after fetches again."""
        endpoint = Endpoint(ServerError("ServerError", "down", status=503))
        cache = make(endpoint)
        await cache.prepare()
        assert len(endpoint.requests) == 1
        with pytest.raises(ServerError, match="down"):
            await cache.token()
        assert len(endpoint.requests) == 1
        assert await cache.token() == f"{TOKEN_PREFIX}2"
        assert len(endpoint.requests) == 2

    async def test_a_held_failure_stands_only_while_fresh(self) -> None:
        """While a failed early fetch is a few seconds old, prepare() asks the endpoint
        nothing more (the send raises the failure and is backed off); much later, token()
        fetches instead of raising the stale failure."""
        clock = FakeClock()
        endpoint = Endpoint(ServerError("ServerError", "down", status=503))
        cache = make(endpoint, clock)
        await cache.prepare()
        await cache.prepare()
        assert len(endpoint.requests) == 1
        await clock.advance(7200)
        assert await cache.token() == f"{TOKEN_PREFIX}2"
        assert len(endpoint.requests) == 2


class TestInvalidate:
    async def test_invalidate_current_token_forces_refresh(self) -> None:
        """Invalidating the cached token makes the next call fetch a new one."""
        endpoint = Endpoint()
        cache = make(endpoint)
        token = await cache.token()
        cache.invalidate(token)
        assert await cache.token() == f"{TOKEN_PREFIX}2"

    async def test_a_drop_is_told_until_a_new_token_comes(self) -> None:
        """dropped() names the drop while the invalidated token is not replaced, and is
        None once a new one is fetched (else every later send is bounced once)."""
        endpoint = Endpoint()
        cache = make(endpoint)
        assert cache.dropped() is None
        cache.invalidate(await cache.token())
        assert cache.dropped() == 1
        await cache.prepare()
        assert cache.dropped() is None
        cache.invalidate(await cache.token())
        assert cache.dropped() == 2
        await cache.token()
        assert cache.dropped() is None

    async def test_ten_failures_one_refresh(self) -> None:
        """Ten requests failing with TokenExpired on one token cause one refresh."""
        endpoint = Endpoint()
        cache = make(endpoint)
        old = await cache.token()

        async def retry_after_token_expired() -> str:
            cache.invalidate(old)
            return await cache.token()

        results = await asyncio.gather(*(retry_after_token_expired() for _ in range(10)))
        assert set(results) == {f"{TOKEN_PREFIX}2"}
        assert len(endpoint.requests) == 2

    async def test_stale_invalidate_keeps_the_new_token(self) -> None:
        """Invalidating an old token after a refresh leaves the new one cached."""
        endpoint = Endpoint()
        cache = make(endpoint)
        old = await cache.token()
        cache.invalidate(old)
        new = await cache.token()
        cache.invalidate(old)
        assert await cache.token() == new
        assert len(endpoint.requests) == 2

    async def test_invalidate_when_empty_is_harmless(self) -> None:
        """Invalidating before any token exists changes nothing."""
        endpoint = Endpoint()
        cache = make(endpoint)
        cache.invalidate("whatever")
        assert await cache.token() == f"{TOKEN_PREFIX}1"


class TestEndpointErrors:
    @pytest.mark.parametrize(
        "code",
        [
            "invalid_client",
            "invalid_scope",
            "invalid_request",
            "unsupported_grant_type",
            "unauthorized_client",
            "invalid_grant",
        ],
    )
    @pytest.mark.parametrize("status", [400, 401])
    async def test_oauth2_error_bodies(self, code: str, status: int) -> None:
        """Every RFC 6749 5.2 error body is AuthError with code = error and its description,
        and Amazon's request id (the token endpoint's errors dropped it), a code of the
        catalogue (unauthorized_client and invalid_grant got the catch-all remedy)."""
        body = {"error_description": "Client authentication failed", "error": code}
        headers = {"date": "d", "x-amzn-requestid": "rid-7"}
        cache = make(Endpoint(RawResponse(status, headers, json.dumps(body).encode())))
        with pytest.raises(AuthError) as info:
            await cache.token()
        error = info.value
        assert (error.code, error.message, error.status) == (
            code,
            "Client authentication failed",
            status,
        )
        assert error.code in CATALOGUE
        assert error.server_date == "d"
        assert error.request_id == "rid-7"

    @pytest.mark.parametrize(
        ("status", "code"), [(401, "invalid_client"), (400, "NoTokenEndpoint")]
    )
    async def test_json_without_error_field(self, status: int, code: str) -> None:
        """A JSON 4xx without an error field: a 401 is a rejected client (RFC 6749 5.2),
        another is no token endpoint's answer."""
        cache = make(Endpoint(RawResponse(status, {}, b"{}")))
        with pytest.raises(AuthError) as info:
            await cache.token()
        assert info.value.code == code

    @pytest.mark.parametrize("body", [b"Unauthorized", b"", b"<html>401</html>"])
    async def test_a_401_that_is_not_json_is_a_rejected_client(self, body: bytes) -> None:
        """A 401 from the token endpoint is the client rejected whatever its body (RFC 6749
        5.2): it was an unreadable answer, waited out as an outage for the whole budget
        (15 minutes by default) and then blamed on the network."""
        cache = make(Endpoint(RawResponse(401, {}, body)))
        with pytest.raises(AuthError) as info:
            await cache.token()
        assert info.value.code == "invalid_client"
        assert cache.token_url in info.value.message

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (404, b"404: Not Found"),
            (405, b"<html>Method Not Allowed</html>"),
            (404, b'{"message": "Not Found"}'),
            (400, b'{"type":"ValidationException","reason":"UnknownOperation","message":"no"}'),
        ],
    )
    async def test_an_url_that_is_no_token_endpoint_says_so(self, status: int, body: bytes) -> None:
        """A 404 or 405, or a JSON 4xx without an OAuth2 error (an API's own error, when the
        token URL follows an endpoint with a path), is a rejected setting naming the URL:
        not an outage waited out for the whole budget, not "a client bug"."""
        cache = make(Endpoint(RawResponse(status, {}, body)))
        with pytest.raises(AuthError) as info:
            await cache.token()
        assert cache.token_url in info.value.message
        assert "api.token_endpoint" in info.value.message
        # Its own code, whose remedy (the one the run's last line shows) names the setting:
        # it was invalid_request, whose remedy blamed the key's version.
        assert info.value.code == "NoTokenEndpoint"
        assert "api.token_endpoint" in info.value.info.remedy
        assert info.value.info.scope is Scope.TOKEN_URL

    @pytest.mark.parametrize(
        ("code", "kind"),
        [
            ("temporarily_unavailable", ServerError),
            ("server_error", ServerError),
            ("slow_down", ThrottledError),
        ],
    )
    @pytest.mark.parametrize("status", [400, 401, 403])
    async def test_an_oauth_try_later_code_is_transient_whatever_the_status(
        self, code: str, kind: type[Exception], status: int
    ) -> None:
        """RFC 6749's temporarily_unavailable and server_error, and slow_down, mean "ask
        again later" with any status: retryable (ServerError, ThrottledError with its
        Retry-After), never a rejected credential."""
        headers = {"retry-after": "7"}
        body = json.dumps({"error": code, "error_description": "later"}).encode()
        cache = make(Endpoint(RawResponse(status, headers, body)))
        with pytest.raises(kind) as info:
            await cache.token()
        assert not isinstance(info.value, AuthError)
        assert info.value.info.retryable
        if kind is ThrottledError:
            assert info.value.retry_after == 7.0

    async def test_429_is_throttled_with_retry_after(self) -> None:
        """A 429 from the token endpoint is ThrottledError with Retry-After."""
        cache = make(Endpoint(RawResponse(429, {"retry-after": "3"}, b"slow down")))
        with pytest.raises(ThrottledError) as info:
            await cache.token()
        assert info.value.retry_after == 3.0

    @pytest.mark.parametrize("body", [b"<html>502</html>", b"{}", b'{"error":"server_error"}'])
    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_5xx_is_server_error(self, status: int, body: bytes) -> None:
        """Any 5xx, readable or not, is a retryable ServerError."""
        cache = make(Endpoint(RawResponse(status, {}, body)))
        with pytest.raises(ServerError) as info:
            await cache.token()
        assert info.value.status == status
        assert info.value.info.retryable

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (200, b'{"access_token": "Atc|trunc'),
            (200, b"<html>ok</html>"),
            (200, b"[]"),
            (200, b'{"token_type":"bearer"}'),
            (200, b'{"access_token":""}'),
            (200, b'{"access_token":42}'),
            # No HTTP header carries these: every send of the token would fail.
            (200, b'{"access_token":"Atc|FAKE\\r\\nX-Injected: 1"}'),
            (200, b'{"access_token":"Atc|two words"}'),
            (200, b'{"access_token":"Atc|a,b"}'),
            (200, b'{"access_token":"Atc|\\u00e9t\\u00e9"}'),
            (400, b"<html>Bad Request</html>"),
            (302, b""),
        ],
    )
    async def test_unreadable_answers_are_response_errors(self, status: int, body: bytes) -> None:
        """Non-JSON or token-less answers, or a token no HTTP header can carry (a control
        character, a space, non-ASCII: each send of it failed as a crashed attempt, and
        every row was failed for good), raise ResponseError."""
        cache = make(Endpoint(RawResponse(status, {}, body)))
        with pytest.raises(ResponseError) as info:
            await cache.token()
        assert info.value.status == status


class TestNoLeaks:
    @staticmethod
    def assert_clean(text: str) -> None:
        assert SECRET not in text
        assert TOKEN_PREFIX not in text
        assert "Atc|trunc" not in text

    async def test_reprs_hide_secret_and_token(self) -> None:
        """repr/str of the cache and its token request show neither secret nor token."""
        endpoint = Endpoint()
        cache = make(endpoint, version="2.1")
        await cache.token()
        for text in (
            repr(cache),
            str(cache),
            repr(endpoint.requests[0]),
            str(endpoint.requests[0]),
        ):
            self.assert_clean(text)
        assert "cached" in repr(cache)

    @pytest.mark.parametrize(
        "answer",
        [
            RawResponse(400, {}, b'{"error":"invalid_client","error_description":"bad"}'),
            RawResponse(
                401,
                {},
                json.dumps(
                    {"error": "invalid_client", "error_description": f"secret {SECRET} wrong"}
                ).encode(),
            ),
            RawResponse(503, {}, json.dumps({"error": SECRET}).encode()),
            RawResponse(429, {}, SECRET.encode()),
            RawResponse(200, {}, b'{"access_token": "Atc|trunc'),
            RawResponse(200, {}, f'{{"access_token": "{TOKEN_PREFIX}9", "x": [}}'.encode()),
            RawResponse(400, {}, f"<p>{SECRET}</p>".encode()),
        ],
    )
    async def test_errors_hide_secret_and_token(self, answer: RawResponse) -> None:
        """No error from the token endpoint shows the secret or a token, even in tracebacks."""
        cache = make(Endpoint(answer))
        with pytest.raises(BrokerError) as info:
            await cache.token()
        error = info.value
        rendered = "".join(traceback.format_exception(error))
        for text in (str(error), repr(error), rendered, *map(str, error.args)):
            self.assert_clean(text)

    async def test_scrubs_echoed_secret(self) -> None:
        """An error description that echoes the secret has it replaced by ***."""
        body = json.dumps({"error": "invalid_client", "error_description": f"bad {SECRET}"})
        cache = make(Endpoint(RawResponse(401, {}, body.encode())))
        with pytest.raises(AuthError) as info:
            await cache.token()
        assert info.value.message == "bad ***"

    async def test_truncated_grant_is_not_chained(self) -> None:
        """The JSON decoder's error (which holds the document) is not kept as a cause."""
        cache = make(Endpoint(RawResponse(200, {}, f'{{"access_token":"{TOKEN_PREFIX}'.encode())))
        with pytest.raises(ResponseError) as info:
            await cache.token()
        assert info.value.__cause__ is None
        assert info.value.__context__ is None
