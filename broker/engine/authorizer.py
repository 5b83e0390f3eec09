"""Authorization at dispatch time, after the pacer: a bearer token or a fresh SigV4 signature.

Signing late matters: a PA-API signature carries a timestamp valid for 15 minutes, and a
Creators token expires after an hour, so a request that waited in a queue must never
carry credentials taken when it was queued. Each authorizer also knows how to recover
from its own auth errors: a Creators ``TokenExpired`` / ``InvalidToken`` drops the token
(one refresh for many failed requests), a PA-API ``RequestExpired`` learns the offset
between our clock and the server's ``Date`` header so the re-signed request is in time.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from broker.api.errors_map import http_date
from broker.api.oauth import CreatorsTokenCache, bearer_token
from broker.api.sigv4 import SigV4Signer
from broker.logs import get_logger

if TYPE_CHECKING:
    from broker.api.base import HttpRequest
    from broker.clock import Clock
    from broker.errors import ApiError
    from broker.models import Secret

__all__ = ["Authorizer", "BearerAuthorizer", "SigV4Authorizer"]

logger = get_logger("broker")

#: A clock offset learned from Amazon's Date header worth a warning (and a change of it).
_CLOCK_TOLD = timedelta(seconds=60)

#: Creators codes that a new token fixes.
_TOKEN_CODES = frozenset({"TokenExpired", "InvalidToken"})


class Authorizer(Protocol):
    """Protocol: adds credentials to a request just before it is sent.

    - ``authorize(request, region=...)`` returns the request with its Authorization
      (and, for SigV4, x-amz-date) headers; it may await a token refresh.
    - ``recover(error, request)`` is called with an auth error the server returned for
      ``request``; it returns True when it changed something so a retry can succeed.
    - ``due()`` says whether ``authorize`` would have to await a fetch first, and
      ``prepare()`` does that fetch ahead (a failure is kept for ``authorize`` to raise):
      the dispatcher calls it before the pacer books a send, so a slow token endpoint
      delays the booking rather than squeezing the gap between two sends.
    - ``dropped()`` names the drop of a credential ``recover`` made that is not replaced
      yet (None when there is none): a send booked before it would fetch after booking.
    - ``fetch_began()`` is when the last fetch began (+inf if none): a failure ``authorize``
      raises is that fetch's, and an outage counts from it, not from the send.
    - ``token_url`` is where its tokens come from (None when it needs none): the keys a
      wrong token URL takes out of rotation are the keys that ask it.
    """

    @property
    def token_url(self) -> str | None: ...

    async def authorize(self, request: HttpRequest, *, region: str) -> HttpRequest: ...

    def due(self) -> bool: ...

    def dropped(self) -> int | None: ...

    def fetch_began(self) -> float: ...

    async def prepare(self) -> None: ...

    def recover(self, error: ApiError, request: HttpRequest) -> bool: ...


class BearerAuthorizer:
    """Creators API: the cached OAuth2 bearer token of the key's credential, refreshed
    single-flight.

    ``tokens`` is the credential's one cache: keys that name one credential (one account)
    share it, so they fetch one token between them, and a token the API called stale is
    dropped for all of them at once.
    """

    __slots__ = ("_tokens",)

    def __init__(self, tokens: CreatorsTokenCache) -> None:
        self._tokens = tokens

    @property
    def token_url(self) -> str:
        """The token endpoint its tokens come from."""
        return self._tokens.token_url

    async def authorize(self, request: HttpRequest, *, region: str) -> HttpRequest:
        """Add ``Authorization: Bearer ...`` (with ``, Version x.y`` for 2.x credentials)."""
        token = await self._tokens.token()
        return request.with_headers({"Authorization": self._tokens.authorization_header(token)})

    def due(self) -> bool:
        """True when no token is cached or it is about to expire."""
        return self._tokens.due()

    def dropped(self) -> int | None:
        """Which drop of a stale token it is, while no new token replaced it (else None)."""
        return self._tokens.dropped()

    def fetch_began(self) -> float:
        """When the last token fetch began (+inf before the first)."""
        return self._tokens.fetch_began

    async def prepare(self) -> None:
        """Fetch the token now if it is due (a failure is raised by the next authorize)."""
        await self._tokens.prepare()

    def recover(self, error: ApiError, request: HttpRequest) -> bool:
        """Drop the token the failed request carried, if the error says it is stale."""
        if error.code not in _TOKEN_CODES:
            return False
        token = bearer_token(request.headers.get("Authorization", ""))
        if token is not None:
            self._tokens.invalidate(token)
        return True

    def __repr__(self) -> str:
        return "BearerAuthorizer()"


class SigV4Authorizer:
    """PA-API 5.0: SigV4 at send time, with the server's clock offset once learned."""

    __slots__ = ("_clock", "_offset", "_signer")

    def __init__(self, access_key: str, secret: Secret, *, clock: Clock) -> None:
        self._signer = SigV4Signer(access_key, secret)
        self._clock = clock
        self._offset = timedelta(0)

    @property
    def clock_offset_s(self) -> float:
        """Seconds to add to our wall clock to match the server's (learned from RequestExpired)."""
        return self._offset.total_seconds()

    @property
    def token_url(self) -> None:
        """None: a signature needs no token."""
        return None

    async def authorize(self, request: HttpRequest, *, region: str) -> HttpRequest:
        """Sign with the current (offset-corrected) time."""
        return self._signer.sign(request, region=region, now=self._clock.utcnow() + self._offset)

    def due(self) -> bool:
        """Never: signing needs nothing fetched."""
        return False

    def dropped(self) -> int | None:
        """Never: a signature is made at send time, from nothing that can go stale."""
        return None

    def fetch_began(self) -> float:
        """Never: nothing is fetched (+inf)."""
        return math.inf

    async def prepare(self) -> None:
        """Nothing to fetch ahead: a signature is made at send time."""

    def recover(self, error: ApiError, request: HttpRequest) -> bool:
        """On RequestExpired, re-sign: learn the offset from the server's Date header.

        Without a usable Date the offset stays as it is and the request is still re-signed
        with the current time (protocol.md: "re-sign with the current time and resend
        once"): a request held up on its way expires too, and if our clock is what is
        wrong, the refusals that follow take the key out.
        """
        if error.code != "RequestExpired":
            return False
        server_now = http_date(error.server_date or "")
        if server_now is not None:
            offset = server_now - self._clock.utcnow()
            if abs(offset) >= _CLOCK_TOLD and abs(offset - self._offset) >= _CLOCK_TOLD:
                # The machine's clock is off, told by each key's authorizer that learns it
                # (one line per PA-API key): signatures now carry Amazon's time, but every
                # other process (and this one's next start) learns it again.
                logger.warning(
                    "broker.clock_offset",
                    offset_s=round(offset.total_seconds()),
                    note="this machine's clock is that far behind Amazon's (ahead, if "
                    "negative), by its Date header; requests are signed with Amazon's time "
                    "now: set the clock right (NTP)",
                )
            self._offset = offset
        return True

    def __repr__(self) -> str:
        return f"SigV4Authorizer(clock_offset_s={self.clock_offset_s:.0f})"
