"""The OAuth2 client-credentials token cache of one Creators API credential (v2.x and v3.x).

One :class:`CreatorsTokenCache` per credential keeps one bearer token, fetches a new one
ahead of expiry with a single request however many callers wait (single flight), and
forgets a token the API rejected. Expiry runs on the monotonic clock, so wall-clock jumps
change nothing. Neither the secret nor a token ever appears in a repr, a message or a log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus, urlencode

from broker.api.base import HttpRequest, RawResponse
from broker.api.errors_map import (
    header,
    load_object,
    number,
    request_id,
    retry_after_s,
    short,
    text,
)
from broker.api.marketplaces import BodyEncoding, CredentialVersion, credential_version
from broker.errors import AuthError, BrokerError, ResponseError, ServerError, ThrottledError
from broker.logs import scrub
from broker.models import Secret

if TYPE_CHECKING:
    from broker.clock import Clock

__all__ = ["DEFAULT_LIFETIME_S", "CreatorsTokenCache", "Sender", "bearer_token"]


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization`` value as :meth:`CreatorsTokenCache.authorization_header`
    writes it (``Bearer <t>``, or ``Bearer <t>, Version 2.1``); None for another scheme."""
    if not header.startswith("Bearer "):
        return None
    return header.removeprefix("Bearer ").split(",", 1)[0].strip()


#: What a token lives when the endpoint does not say (``expires_in`` absent), in seconds.
DEFAULT_LIFETIME_S = 3600.0

#: Sends one HTTP request and returns the whole response (the engine's transport).
Sender = Callable[[HttpRequest], Awaitable[RawResponse]]


class CreatorsTokenCache:
    """The cached bearer token of one Creators API credential.

    Args:
        credential_id: the OAuth2 client id ("Credential ID" in Associates Central).
        secret: the client secret.
        version: the credential version, ``2.1`` .. ``2.3`` (Cognito) or ``3.1`` .. ``3.3``
            (Login with Amazon).
        token_url: the token endpoint; by default Amazon's for the version (use
            :func:`broker.api.marketplaces.token_url` to point at a simulator).
        send: sends the token request (the transport, so timeouts and errors are shared).
        clock: expiry is measured on ``clock.monotonic()``.
        refresh_margin_s: :meth:`prepare` fetches a new token this long before the
            current one expires (at most half the token's lifetime, so a short-lived token
            is still used); :meth:`token` alone uses it until 5 s before (a quarter of a
            short lifetime), so a send never fetches in that margin.

    Raises:
        ValueError: unknown version, blank credential id, or a negative margin.
    """

    __slots__ = (
        "_attempts",
        "_began_at",
        "_came_due",
        "_clock",
        "_credential_id",
        "_dropped",
        "_drops",
        "_failure",
        "_fetched_at",
        "_held_at",
        "_held_failure",
        "_lock",
        "_margin_s",
        "_refresh_at",
        "_requests_sent",
        "_secret",
        "_send",
        "_token",
        "_token_url",
        "_usable_until",
        "_version",
    )

    def __init__(
        self,
        credential_id: str,
        secret: Secret,
        version: str,
        *,
        token_url: str | None = None,
        send: Sender,
        clock: Clock,
        refresh_margin_s: float = 30.0,
    ) -> None:
        if not credential_id.strip():
            raise ValueError("credential id must not be blank")
        if refresh_margin_s < 0:
            raise ValueError(f"refresh_margin_s must not be negative, got {refresh_margin_s}")
        self._version: CredentialVersion = credential_version(version)
        self._credential_id = credential_id
        self._secret = secret
        self._token_url = token_url or self._version.token_url
        self._send = send
        self._clock = clock
        self._margin_s = refresh_margin_s
        self._token: Secret | None = None
        # Refreshed ahead from refresh_at on (before a send is booked); a send still uses it
        # until usable_until, a few seconds before it expires.
        self._refresh_at = float("-inf")
        self._usable_until = float("-inf")
        # Refresh attempts finished (success or not); waiters compare it to learn whether a
        # refresh ran while they queued, so one failure answers them all.
        self._attempts = 0
        self._failure: Exception | None = None
        # A failed fetch made by prepare(), and when: raised by the next token() instead of
        # fetching again at once (one fetch per attempt to send), while it is fresh.
        self._held_failure: Exception | None = None
        self._held_at = float("-inf")
        # When the last fetch began and ended, however it ended.
        self._began_at = float("inf")
        self._fetched_at = float("-inf")
        # Whether the token the last fetch brought was already due for a refresh when it came.
        self._came_due = False
        self._requests_sent = 0
        # Tokens dropped by invalidate() so far, and whether the last one is still not
        # replaced by a fetched token (see dropped()).
        self._drops = 0
        self._dropped = False
        self._lock = asyncio.Lock()

    @property
    def version(self) -> str:
        """The credential version, for example ``3.1``."""
        return self._version.version

    @property
    def token_url(self) -> str:
        """The token endpoint this cache asks."""
        return self._token_url

    @property
    def requests_sent(self) -> int:
        """How many token requests this cache has sent."""
        return self._requests_sent

    def __repr__(self) -> str:
        state = "cached" if self._token is not None else "empty"
        return f"CreatorsTokenCache(version={self.version!r}, url={self._token_url!r}, {state})"

    async def token(self) -> str:
        """Return a bearer token, fetching one when there is none or it is about to expire.

        Concurrent callers during a fetch wait for that one fetch; if it fails, they all
        get its error (the engine's retry spaces the next attempt).

        Raises:
            AuthError: the endpoint rejected the credential (``code`` is the OAuth2
                ``error``: ``invalid_client``, ``invalid_scope``, ...).
            ThrottledError, ServerError: the endpoint is throttling or failing (retryable).
            TransportError: the request did not complete (retryable).
            ResponseError: the endpoint's answer cannot be read (retryable).
        """
        # A send uses the token up to shortly before it expires: refreshing it ahead (from
        # refresh_at on) is prepare()'s job, done before the pacer books a send.
        current = self._current(self._usable_until)
        if current is not None:
            return current
        held = self._held()
        self._held_failure = None
        if held is not None:
            raise held
        return await self._single_flight(for_send=True)

    async def _single_flight(self, *, for_send: bool) -> str:
        """The cached token if it is still good (for a send: until shortly before it
        expires; ahead of one: until its refresh instant), else one fetch shared by every
        caller waiting meanwhile (a failure of that fetch answers them all)."""
        seen = self._attempts
        async with self._lock:
            # Read after the wait: a fetch that ended meanwhile moved both instants.
            current = self._current(self._usable_until if for_send else self._refresh_at)
            if current is not None:
                return current  # another caller fetched it meanwhile
            if self._attempts != seen and self._failure is not None:
                raise self._failure
            return await self._refresh()

    def due(self) -> bool:
        """True when :meth:`prepare` would fetch: there is no usable token (none, or one about
        to expire), no failed fetch of the last few seconds stands for one, and the last
        fetch did not bring a token already due (one living shorter than its fetch took is
        used as it is for that long, not fetched again and again)."""
        if self._current(self._refresh_at) is not None or self._held() is not None:
            return False
        return not (
            self._came_due and self._clock.monotonic() - self._fetched_at <= _HELD_FAILURE_S
        )

    async def prepare(self) -> None:
        """Fetch a token now if one is due, so that the next :meth:`token` need not.

        The engine calls this before the pacer books a send: a fetch made after the booking
        would delay that send and bring it closer to the next than the key's interval. A
        failure is not raised here; the next :meth:`token` raises it without fetching again
        if it comes within a few seconds (later, it fetches: the failure is stale). While
        a failure is that fresh, this fetches nothing: the send raises it and is backed
        off, instead of a dispatcher asking a failing endpoint at every turn.
        """
        if not self.due():
            return
        self._held_failure = None
        try:
            await self._single_flight(for_send=False)
        except Exception as exc:
            self._held_failure = exc
            self._held_at = self._clock.monotonic()

    def _held(self) -> Exception | None:
        """The failure prepare() kept, if it is recent enough to stand for a fetch now."""
        if self._held_failure is None:
            return None
        if self._clock.monotonic() - self._held_at > _HELD_FAILURE_S:
            self._held_failure = None
            return None
        return self._held_failure

    def invalidate(self, token: str) -> None:
        """Forget ``token`` if it is still the cached one (the API said it expired or is bad).

        Many requests failing with the same token cause one refresh: the first call drops
        it, later calls name a token that is no longer cached and change nothing.
        """
        if self._token is not None and self._token.reveal() == token:
            self._token = None
            self._refresh_at = float("-inf")
            self._usable_until = float("-inf")
            self._drops += 1
            self._dropped = True

    @property
    def fetch_began(self) -> float:
        """When the last token fetch began (monotonic; +inf before the first): a failure
        :meth:`token` raises is that fetch's, which may have hung long before the send."""
        return self._began_at

    def dropped(self) -> int | None:
        """Which drop it is (1, 2, ...) while the token :meth:`invalidate` dropped is not
        replaced yet, else None: a send booked before the drop would fetch late."""
        return self._drops if self._dropped else None

    def authorization_header(self, token: str) -> str:
        """Return the ``Authorization`` value for ``token``.

        v2.x (Cognito) tokens need the version: ``Bearer <t>, Version 2.1``; v3.x (Login
        with Amazon) tokens go alone: ``Bearer <t>``.
        """
        if self._version.encoding is BodyEncoding.FORM:
            return f"Bearer {token}, Version {self._version.version}"
        return f"Bearer {token}"

    async def authorize(self, request: HttpRequest) -> tuple[HttpRequest, str]:
        """Return ``request`` with its ``authorization`` header, and the token used.

        Keep the token to :meth:`invalidate` it if the API answers ``TokenExpired``.
        """
        token = await self.token()
        return request.with_headers({"authorization": self.authorization_header(token)}), token

    def _current(self, until: float) -> str | None:
        """The cached token while the clock is before ``until`` (its refresh or its last
        usable instant)."""
        if self._token is None or self._clock.monotonic() >= until:
            return None
        return self._token.reveal()

    async def _refresh(self) -> str:
        self._failure = None
        self._came_due = False
        # Lifetime counts from before the request: the token was issued after this instant.
        started = self._began_at = self._clock.monotonic()
        try:
            self._requests_sent += 1
            response = await self._send(self._token_request())
            token, lifetime_s = self._grant(response)
        except Exception as exc:
            self._failure = exc
            raise
        finally:
            self._attempts += 1
            self._fetched_at = self._clock.monotonic()
        self._token = token
        self._dropped = False
        self._refresh_at = started + lifetime_s - min(self._margin_s, lifetime_s / 2)
        self._usable_until = max(
            self._refresh_at, started + lifetime_s - min(_SEND_MARGIN_S, lifetime_s / 4)
        )
        self._came_due = self._clock.monotonic() >= self._refresh_at
        return token.reveal()

    def _token_request(self) -> HttpRequest:
        fields = {
            "grant_type": "client_credentials",
            "client_id": self._credential_id,
            "client_secret": self._secret.reveal(),
            "scope": self._version.scope,
        }
        if self._version.encoding is BodyEncoding.FORM:
            body = urlencode(fields).encode()
            content_type = "application/x-www-form-urlencoded"
        else:
            body = json.dumps(fields, separators=(",", ":")).encode()
            content_type = "application/json"
        headers = {"content-type": content_type, "accept": "application/json"}
        return HttpRequest("POST", self._token_url, headers, body)

    def _grant(self, response: RawResponse) -> tuple[Secret, float]:
        if response.status != 200:
            raise self._error(response)
        data = self._body(response)
        if data is None:
            raise ResponseError("token endpoint: HTTP 200 body is not a JSON object", status=200)
        raw = data.get("access_token")
        if not isinstance(raw, str) or not raw:
            raise ResponseError("token endpoint: HTTP 200 without an access_token", status=200)
        if not (raw.isascii() and raw.isprintable()) or " " in raw or "," in raw:
            # Every send would fail to build its Authorization header, a crash of the
            # attempt that failed its rows for good; a bad answer is retried, then the key
            # paused or taken out, its rows pending. A comma ends the token where the
            # header is read back (bearer_token: a v2.x header goes on ", Version x.y").
            raise ResponseError(
                "token endpoint: HTTP 200 with an access_token no Authorization header can "
                "carry (a control character, a space, a comma or a non-ASCII character)",
                status=200,
            )
        return Secret(raw), _lifetime_s(data.get("expires_in"))

    def _body(self, response: RawResponse) -> Mapping[str, object] | None:
        try:
            return load_object(response.body, status=response.status, what="token endpoint")
        except ResponseError:
            # Dropped, not chained: the JSON decoder's error holds the whole document, which
            # for a truncated success is the token itself.
            return None

    def _error(self, response: RawResponse) -> BrokerError:
        status = response.status
        data = self._body(response)
        raw_error = text(data.get("error")) if data is not None else None
        error = self._scrub(raw_error) if raw_error else None
        description = text(data.get("error_description")) if data is not None else None
        message = self._scrub(description or error or f"HTTP {status}")
        # The server's Date (clock skew) and Amazon's id of the request, on every error.
        date = header(response.headers, "date")
        rid = request_id(response.headers)
        # Masked as the message is: a gateway may echo the secret in any header.
        rid = None if rid is None else self._scrub(rid)
        if status == 429 or error == _SLOW_DOWN:
            # Throttled, whatever the status carrying it: paused, then asked again.
            wait = retry_after_s(None, response.headers, self._clock)
            return ThrottledError(
                "TooManyRequests",
                message,
                status=status,
                retry_after=wait,
                server_date=date,
                request_id=rid,
            )
        if status >= 500 or error in _TRY_LATER:
            # An OAuth2 "try later" code means it with a 400 too (a gateway's choice of
            # status): an outage, waited out within its budget, not a rejected credential.
            return ServerError(
                error or "ServerError", message, status=status, server_date=date, request_id=rid
            )
        if status in (404, 405) and error is None:
            # Nothing takes token requests at that URL: waiting never fixes it, so it is not
            # an outage (the run would wait out the whole outage budget) but a wrong setting.
            return AuthError(
                "NoTokenEndpoint",
                f"HTTP {status} from {self._token_url}: no token endpoint answers there; "
                "check api.token_endpoint (or api.endpoint, which it follows)",
                status=status,
                server_date=date,
                request_id=rid,
            )
        if 400 <= status < 500:
            if data is None and status == 401:
                # RFC 6749 section 5.2: the client is rejected, whatever the body says; an
                # unreadable answer would be waited out as an outage, then blamed on the
                # network.
                return AuthError(
                    "invalid_client",
                    f"HTTP 401 from {self._token_url} (its body is not JSON)",
                    status=status,
                    server_date=date,
                    request_id=rid,
                )
            if data is None:
                return ResponseError(
                    f"token endpoint: HTTP {status} body is not JSON", status=status
                )
            if error is None and status != 401:
                # JSON, but no OAuth2 error member: not a token endpoint's answer (an API's
                # own error, when api.endpoint carries a path the token URL follows).
                return AuthError(
                    "NoTokenEndpoint",
                    f"HTTP {status} from {self._token_url}, which does not answer as an OAuth2 "
                    f"token endpoint ({message}); check api.token_endpoint and api.endpoint",
                    status=status,
                    server_date=date,
                    request_id=rid,
                )
            # RFC 6749 section 5.2: a 401 without an error code is a rejected client.
            code = error or "invalid_client"
            return AuthError(code, message, status=status, server_date=date, request_id=rid)
        return ResponseError(f"token endpoint: unexpected HTTP status {status}", status=status)

    def _scrub(self, message: str) -> str:
        # Amazon never echoes the secret, but a message must not carry it even if one did:
        # as written, or as the token request encoded it (form, URL or JSON escapes), nor
        # any other credential the text shows (a proxy URL's password).
        secret = self._secret.reveal()
        if secret:
            for form in _spellings(secret):
                message = message.replace(form, "***")
        return short(scrub(message))


#: OAuth2 error codes that say the token endpoint cannot answer now (RFC 6749 4.1.2.1,
#: which Login with Amazon sends from its token endpoint too), whatever the HTTP status.
_TRY_LATER = frozenset({"temporarily_unavailable", "server_error"})
#: The OAuth2 error code of a client asking too fast (RFC 8628 3.5; Login with Amazon).
_SLOW_DOWN = "slow_down"

#: A send still uses a token until this close to its expiry (seconds; a quarter of a short
#: lifetime): refreshing it earlier, from ``refresh_margin_s`` before, is prepare()'s job.
_SEND_MARGIN_S = 5.0
#: How long a failed early fetch stands for a fetch at send time (seconds): longer than the
#: dispatcher takes from the fetch to the send it books, shorter than any backoff after it.
_HELD_FAILURE_S = 5.0


def _spellings(secret: str) -> list[str]:
    """``secret`` as written and as a token request or an echo of one may encode it."""
    forms = {
        secret,
        quote_plus(secret, safe=""),
        quote(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    # The longest first: a shorter spelling inside a longer one must not break it up.
    return sorted(forms, key=len, reverse=True)


def _lifetime_s(value: object) -> float:
    seconds = number(value)
    if seconds is None and isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
    if seconds is None or not 0 < seconds < float("inf"):
        return DEFAULT_LIFETIME_S
    return seconds
