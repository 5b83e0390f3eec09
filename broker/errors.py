"""The broker's one error tree, and the catalogue of every Amazon error code.

Exceptions are for misuse, bad configuration, and "no key can serve"; per-ASIN
failures are data (an ``ItemResult`` with ``status`` and ``error``), never raised.

::

    BrokerError
    ├── ConfigError            bad config.toml / config objects (names the key path)
    ├── JobFileError           a job file that cannot be read as a whole
    ├── TransportError         the network failed us (retryable)
    │   ├── ConnectError       (also a ConnectionError)
    │   │   └── EndpointUnreachable  no connection at all: DNS, refused, connect timeout
    │   ├── RequestTimeout     (also a TimeoutError)
    │   └── BodyTooLarge       the response body passed the read cap
    ├── ResponseError          unreadable response: truncated, not JSON, wrong shape (retryable)
    ├── ApiError               Amazon answered with an error code
    │   ├── ThrottledError     429 TooManyRequests / ThrottleException
    │   ├── AuthError          401/403 and signature codes (token, key or account problems)
    │   ├── BadRequestError    other 4xx
    │   └── ServerError        5xx
    ├── KeyUnusableError       a key was taken out of rotation (names the key, code and remedy)
    ├── NoUsableKeyError       every key that could serve a marketplace is out of rotation
    └── StateUnavailableError  the shared key-state store (SQLite file, Redis) cannot be reached

The catalogue (``CATALOGUE``) maps each code Amazon sends (PA-API ``Code``, or the
Creators API ``reason``, else its ``type``) to an :class:`ErrorInfo`: what it means, its
scope, whether the broker retries it, and a remedy a user can act on.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CATALOGUE",
    "ApiError",
    "AuthError",
    "BadRequestError",
    "BodyTooLarge",
    "BrokerClosedError",
    "BrokerError",
    "ConfigError",
    "ConnectError",
    "EndpointUnreachable",
    "ErrorInfo",
    "JobFileError",
    "KeyUnusableError",
    "NetworkRefused",
    "NoUsableKeyError",
    "RequestTimeout",
    "ResponseError",
    "Scope",
    "ServerError",
    "SimulatorStartError",
    "StateUnavailableError",
    "ThrottledError",
    "TransportError",
    "WrongEventLoopError",
    "describe",
]


class BrokerError(Exception):
    """Base of every exception the broker raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        # Most errors build their one message from fields their __init__ takes by name, so
        # the default (calling the class again with ``args``) cannot rebuild them: pickle
        # (process pools, task queues) and copy would raise TypeError. Rebuild without
        # __init__ instead, from the message and the fields as they are.
        return (_bare, (type(self), self.args), self.__dict__)


def _bare(cls: type[BrokerError], args: tuple[object, ...]) -> BrokerError:
    """An error of ``cls`` holding ``args``, made without its __init__ (for pickle and copy)."""
    return cls.__new__(cls, *args)


class ConfigError(BrokerError, ValueError):
    """The configuration is invalid; ``path`` names the offending key (``keys[0].tps``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class JobFileError(BrokerError, ValueError):
    """A job file cannot be processed as a whole (missing column, undecodable, truncated)."""


class JobChangedError(JobFileError):
    """The job file changed while it was being read (a producer still writing, an edit)."""


class TransportError(BrokerError):
    """The request did not complete at the network level; always retryable."""


class ConnectError(TransportError, ConnectionError):
    """Connecting, or keeping the connection, failed (refused, reset, DNS)."""


class EndpointUnreachable(ConnectError):
    """No connection could be made (DNS failure, connection refused, connect timeout).

    Nothing reached the server, so the request says nothing about its ASINs: the engine
    pauses the key and re-queues the batch without counting an attempt (reliability B15).
    """


class NetworkRefused(TransportError):
    """The way to the endpoint refused the request in a way no wait mends: its TLS
    certificate is not trusted (an intercepting proxy, a wrong host), or the HTTP proxy
    refused it (407, its credentials; 403, its policy). ``code`` is its catalogue entry
    (``UntrustedCertificate``, ``ProxyRefused``): every key is taken out at once, rows stay
    pending, instead of an outage waited out for 15 minutes or each row failing after its
    retries."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class RequestTimeout(TransportError, builtins.TimeoutError):
    """The request or the response body did not complete in time."""


class BodyTooLarge(TransportError):
    """The response body was larger than the configured read cap."""


class ResponseError(BrokerError):
    """A response arrived but cannot be used: truncated, not JSON, or the wrong shape."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ApiError(BrokerError):
    """Amazon answered a whole request with an error.

    Attributes:
        code: the catalogue code (PA-API ``Code``, Creators ``reason`` or ``type``).
        message: Amazon's message (the engine masks any credential a gateway in between
            echoes in it before it reaches a row or the log).
        status: the HTTP status.
        retry_after: seconds the server asked us to wait, if it said.
        server_date: the server's ``Date`` header, used to learn clock skew.
        request_id: Amazon's id of the request (its ``x-amzn-RequestId`` header), which
            its support asks for; shown at the end of the error's text.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int,
        retry_after: float | None = None,
        server_date: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.server_date = server_date
        self.request_id = request_id
        super().__init__(self.described())

    def described(self) -> str:
        """The error's text: code, status, message and, when Amazon gave one, request id."""
        told = f"{self.code} (HTTP {self.status}): {self.message}"
        return f"{told} [request id: {self.request_id}]" if self.request_id else told

    @property
    def info(self) -> ErrorInfo:
        """The catalogue entry for this error's code."""
        return describe(self.code, status=self.status)


class ThrottledError(ApiError):
    """HTTP 429: the key is over its rate, its daily quota, or no longer eligible."""


class AuthError(ApiError):
    """The credential, token, signature or account was rejected."""


class BadRequestError(ApiError):
    """Any other 4xx: the request itself (or the key's partner tag) is wrong."""


class ServerError(ApiError):
    """5xx: a server-side failure; retryable."""


class KeyUnusableError(BrokerError):
    """A key was taken out of rotation; carries which key, the code and the remedy."""

    def __init__(self, key: str, code: str, message: str, remedy: str) -> None:
        self.key = key
        self.code = code
        self.message = message
        self.remedy = remedy
        super().__init__(f"key {key!r} out of rotation: {code}: {message} -> {remedy}")


class NoUsableKeyError(BrokerError):
    """No key can serve the request: every candidate key is out of rotation.

    ``failures`` holds one :class:`KeyUnusableError` per key, saying why.
    """

    def __init__(self, marketplace: str, failures: Sequence[KeyUnusableError]) -> None:
        self.marketplace = marketplace
        self.failures = tuple(failures)
        # The message too: a code's remedy is general, and its message names the thing (the
        # URL no token endpoint answers at, the rejected tag).
        reasons = "; ".join(f"{f.key}: {f.code}: {f.message} ({f.remedy})" for f in self.failures)
        super().__init__(f"no key can serve {marketplace}: {reasons or 'no key configured'}")

    @classmethod
    def of_many(cls, errors: Sequence[NoUsableKeyError]) -> NoUsableKeyError:
        """One error for several marketplaces no key can serve, each told as its own: a job
        stopped so names them all, not the first alone (fixed, rerun, then told the next)."""
        if len(errors) == 1:
            return errors[0]
        combined = cls(
            ", ".join(error.marketplace for error in errors),
            [failure for error in errors for failure in error.failures],
        )
        combined.args = ("; ".join(str(error) for error in errors),)
        return combined


class BrokerClosedError(BrokerError, RuntimeError):
    """The broker was closed while this call waited, or before it was made."""


class WrongEventLoopError(BrokerError, RuntimeError):
    """The broker was opened on another event loop; it can only be used from that loop."""


class SimulatorStartError(BrokerError, RuntimeError):
    """A simulator child process (``broker bench``, the benchmarks) did not start; the
    message carries the tail of its stderr."""


class StateUnavailableError(BrokerError):
    """The shared key-state store cannot be reached or used (Redis down, SQLite file locked).

    A key whose state cannot be read must not send: the engine pauses it and ``/readyz``
    shows ``reason``. ``backend`` is ``"redis"``, ``"local"`` or ``"memory"``; the reason
    never holds a password or a URL's credentials.
    """

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"key-state store ({backend}) unavailable: {reason}")


class Scope(enum.Enum):
    """What an error condemns."""

    #: one ASIN in the request; the rest of the batch is fine
    ASIN = "asin"
    #: this request; another attempt may succeed
    REQUEST = "request"
    #: the key (credential) for every marketplace
    KEY = "key"
    #: the key for one marketplace (its partner tag there)
    KEY_MARKETPLACE = "key+marketplace"
    #: every key whose tokens come from the same token URL: that URL is wrong, not the key,
    #: and keys of another credential family ask another one (2.x Cognito, 3.x Login with
    #: Amazon)
    TOKEN_URL = "token-url"
    #: every key: the service is gone or the client is wrong
    GLOBAL = "global"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """One catalogue entry: what a code means and what the broker and the user should do."""

    code: str
    meaning: str
    scope: Scope
    retryable: bool
    remedy: str


def _entries(*infos: ErrorInfo) -> Mapping[str, ErrorInfo]:
    return {info.code: info for info in infos}


_RETRY = "None needed: the broker retries this by itself."

#: Every code of Amazon's error tables (protocol.md sections 2.8, 3.5 and 4), plus the broker's own.
CATALOGUE: Mapping[str, ErrorInfo] = _entries(
    # Throttling, both APIs.
    ErrorInfo(
        "TooManyRequests",
        "The key sent more requests than its per-second or daily quota allows, or the account "
        "is not (or no longer) eligible.",
        Scope.KEY,
        True,
        "Usually none: the broker slows the key down. If it persists for hours, the daily quota "
        "(TPD) is spent or the account lost eligibility (no referred sales in 30 days).",
    ),
    ErrorInfo(
        "ThrottleException",
        "Creators API: the key sent more requests per second than allowed.",
        Scope.KEY,
        True,
        "Usually none: the broker slows the key down. If it persists, check the key's TPS/TPD "
        "in the config against Associates Central.",
    ),
    # PA-API signature and credential codes.
    ErrorInfo(
        "RequestExpired",
        "The request's x-amz-date is more than 15 minutes away from Amazon's clock.",
        Scope.REQUEST,
        True,
        "The broker re-signs with the server's clock offset (learned from the answer's Date "
        "header; the current time when there is none) and resends; if it repeats, fix this "
        "machine's clock (enable NTP).",
    ),
    ErrorInfo(
        "InvalidSignature",
        "The request signature does not match: usually a wrong secret key.",
        Scope.KEY,
        False,
        "Check the key's secret (the variable or file the config names for it, or secrets= "
        "in code); regenerate it in Associates Central if unsure.",
    ),
    ErrorInfo(
        "IncompleteSignature",
        "The Authorization header is missing parts of the SigV4 signature.",
        Scope.GLOBAL,
        False,
        "A client bug: report it with the broker version.",
    ),
    ErrorInfo(
        "UnrecognizedClient",
        "The access key is unknown to Amazon.",
        Scope.KEY,
        False,
        "Check the access key (credential_id) in the config; it must be a PA-API key from "
        "Associates Central, not an AWS key.",
    ),
    ErrorInfo(
        "AccessDenied",
        "The key is not enabled for the API (or the API is retired).",
        Scope.KEY,
        False,
        "Enable the key for the API in Associates Central; after May 2026 PA-API is retired: "
        'migrate to the Creators API (protocol = "creators").',
    ),
    ErrorInfo(
        "AccessDeniedAwsUsers",
        "AWS credentials were used where Associates credentials are required.",
        Scope.KEY,
        False,
        "Use the credentials from Associates Central, not from the AWS console.",
    ),
    ErrorInfo(
        "InvalidAssociate",
        "The credential is not linked to an approved Associates store for this marketplace.",
        Scope.KEY_MARKETPLACE,
        False,
        "Check that the key belongs to the store whose partner tag you use, in Associates "
        "Central for this marketplace.",
    ),
    ErrorInfo(
        "InvalidPartnerTag",
        "The partner tag is missing or not a tracking ID of this key's store in this marketplace.",
        Scope.KEY_MARKETPLACE,
        False,
        "Check the tracking ID for this marketplace in Associates Central and set it under "
        "keys.partner_tags in the config.",
    ),
    ErrorInfo(
        "InvalidParameterValue",
        "A parameter (usually an item id) is invalid.",
        Scope.ASIN,
        False,
        "Check the ASIN: it must be 10 letters or digits and exist in this marketplace.",
    ),
    ErrorInfo(
        "MissingParameter",
        "A required parameter is missing from the request.",
        Scope.REQUEST,
        False,
        "A client bug: report it with the broker version.",
    ),
    ErrorInfo(
        "UnknownOperation",
        "The operation (path or X-Amz-Target) is unknown.",
        Scope.GLOBAL,
        False,
        "Check api.endpoint in the config: it must be the API host, without a path.",
    ),
    ErrorInfo(
        "ItemNotAccessible",
        "The item exists but is not available through the API.",
        Scope.ASIN,
        False,
        "None: Amazon does not serve this item through the API.",
    ),
    ErrorInfo(
        "ItemNotFound",
        "No item with this ASIN exists in this marketplace.",
        Scope.ASIN,
        False,
        "Check the ASIN and the marketplace.",
    ),
    ErrorInfo(
        "InvalidItemId",
        "The item id is not valid.",
        Scope.ASIN,
        False,
        "Check the ASIN: it must be 10 letters or digits.",
    ),
    ErrorInfo(
        "NoResults",
        "Nothing found: no search hits, no variations (or a page past the last), or no "
        "browse node of the ids asked.",
        Scope.REQUEST,
        False,
        "Broaden the search, or check the ASIN and the page (most items have no variations) "
        "or the browse node ids (each store has its own).",
    ),
    ErrorInfo(
        "InternalFailure",
        "Amazon failed to process the request.",
        Scope.REQUEST,
        True,
        _RETRY,
    ),
    ErrorInfo(
        "ServiceUnavailable",
        "The API is unavailable for now (HTTP 503).",
        Scope.REQUEST,
        True,
        _RETRY,
    ),
    # Creators API exception types and reasons.
    ErrorInfo(
        "ResourceNotFoundException",
        "None of the requested ids exist.",
        Scope.ASIN,
        False,
        "Check the ASINs and the marketplace.",
    ),
    ErrorInfo(
        "ValidationException",
        "The request failed validation.",
        Scope.REQUEST,
        False,
        "A client bug or an unsupported parameter: report it with the broker version.",
    ),
    ErrorInfo(
        "FieldValidationFailed",
        "A field of the request failed validation.",
        Scope.REQUEST,
        False,
        "Check the resources and marketplace in the config; otherwise report it.",
    ),
    ErrorInfo(
        "CannotParse",
        "The request body is not valid JSON.",
        Scope.GLOBAL,
        False,
        "A client bug: report it with the broker version.",
    ),
    ErrorInfo(
        "Other",
        "Amazon rejected the request for an unspecified reason.",
        Scope.REQUEST,
        False,
        "Read the message; contact Associates support if it persists.",
    ),
    ErrorInfo(
        "TokenExpired",
        "The bearer token has expired.",
        Scope.REQUEST,
        True,
        "None: the broker fetches a new token and re-sends.",
    ),
    ErrorInfo(
        "InvalidToken",
        "The bearer token is invalid or malformed.",
        Scope.REQUEST,
        True,
        "None: the broker fetches a new token once; if it repeats, check the credential version.",
    ),
    ErrorInfo(
        "InvalidIssuer",
        "The token was issued for another region or credential version.",
        Scope.KEY,
        False,
        "Set the key's version in the config to the one shown in Associates Central "
        "(2.1/2.2/2.3 or 3.1/3.2/3.3).",
    ),
    ErrorInfo(
        "MissingClaim",
        "The token lacks a required claim.",
        Scope.KEY,
        False,
        "Regenerate the credential in Associates Central.",
    ),
    ErrorInfo(
        "MissingKeyId",
        "The token lacks a key id.",
        Scope.KEY,
        False,
        "Regenerate the credential in Associates Central.",
    ),
    ErrorInfo(
        "UnsupportedClient",
        "The client (credential) is not supported by the Creators API.",
        Scope.KEY,
        False,
        "Use a Creators API credential from Associates Central.",
    ),
    ErrorInfo(
        "InvalidClient",
        "The credential id or secret was rejected.",
        Scope.KEY,
        False,
        "Check the credential id and the key's secret (the variable or file the config names "
        "for it, or secrets= in code).",
    ),
    ErrorInfo(
        "MissingCredential",
        "The request carried no credential.",
        Scope.KEY,
        False,
        "Check the key's version: 2.x credentials need ', Version x.y' (the broker adds it).",
    ),
    ErrorInfo(
        "AssociateNotEligible",
        "The account does not meet the eligibility requirements (10 qualified sales in the "
        "trailing 30 days).",
        Scope.KEY,
        False,
        "Refer qualifying sales; access returns about two days after they ship.",
    ),
    ErrorInfo(
        "AssociateEligibilityException",
        "PA-API: the account does not meet the eligibility requirements (10 qualified sales "
        "in the trailing 30 days).",
        Scope.KEY,
        False,
        "Refer qualifying sales; access returns about two days after they ship.",
    ),
    ErrorInfo(
        "AuthorizationFailed",
        "The account is not authorized for this operation.",
        Scope.KEY,
        False,
        "Check the account's status in Associates Central.",
    ),
    ErrorInfo(
        "UnauthorizedException",
        "The request was not authenticated.",
        Scope.KEY,
        False,
        "Check the credential id, secret and version of the key.",
    ),
    ErrorInfo(
        "AccessDeniedException",
        "Access was denied to the account.",
        Scope.KEY,
        False,
        "Check the account's status in Associates Central.",
    ),
    ErrorInfo(
        "InternalServerException",
        "Amazon failed to process the request.",
        Scope.REQUEST,
        True,
        _RETRY,
    ),
    # The OAuth2 token endpoint's errors.
    ErrorInfo(
        "invalid_client",
        "The token endpoint rejected the credential id or secret.",
        Scope.KEY,
        False,
        "Check the credential id and the key's secret (the variable or file the config names "
        "for it, or secrets= in code); check the version picks the right region.",
    ),
    ErrorInfo(
        "invalid_scope",
        "The token endpoint rejected the scope (wrong credential family for the version).",
        Scope.KEY,
        False,
        "Set the key's version to the one shown in Associates Central; an "
        "api.token_endpoint whose path ends in /token is used for every key, so it must be "
        "this version's family's server (2.x: Cognito, 3.x: Login with Amazon).",
    ),
    ErrorInfo(
        "invalid_request",
        "The token request was malformed.",
        Scope.KEY,
        False,
        "A client bug or a wrong version: check the key's version, else report it.",
    ),
    ErrorInfo(
        "unsupported_grant_type",
        "The token endpoint does not accept the client-credentials grant.",
        Scope.KEY,
        False,
        "Check the key's version.",
    ),
    ErrorInfo(
        "unauthorized_client",
        "The token endpoint knows the credential but does not let it use the "
        "client-credentials grant (a credential of another kind, or one disabled).",
        Scope.KEY,
        False,
        "Check in Associates Central that the credential is a Creators API one and enabled, "
        "and that the key's version is the one shown there.",
    ),
    ErrorInfo(
        "invalid_grant",
        "The token endpoint refused the grant (a credential revoked or expired).",
        Scope.KEY,
        False,
        "Check in Associates Central that the credential is still active; make a new one if "
        "it was revoked.",
    ),
    ErrorInfo(
        "temporarily_unavailable",
        "The token endpoint is unavailable for now (sent with any HTTP status, a 400 too).",
        Scope.REQUEST,
        True,
        "None needed: the key pauses and asks again; if it lasts past retry.outage_budget_s, "
        "the run stops with its rows pending.",
    ),
    ErrorInfo(
        "server_error",
        "The token endpoint failed to process the request (sent with any HTTP status, a 400 too).",
        Scope.REQUEST,
        True,
        "None needed: the key pauses and asks again; if it lasts past retry.outage_budget_s, "
        "the run stops with its rows pending.",
    ),
    # The broker's own codes for failures that carry no Amazon code.
    ErrorInfo(
        "NoTokenEndpoint",
        "Nothing at the token URL answers as an OAuth2 token endpoint (an HTTP 404 or 405, "
        "or another API's own error).",
        Scope.TOKEN_URL,
        False,
        "Check api.token_endpoint in the config (or api.endpoint, which it follows): the "
        "URL the error names takes no token requests.",
    ),
    ErrorInfo(
        "ServerError",
        "Amazon answered with a 5xx status.",
        Scope.REQUEST,
        True,
        _RETRY,
    ),
    ErrorInfo(
        "TransportError",
        "The connection failed, was reset, or timed out.",
        Scope.REQUEST,
        True,
        "None if it passes; if it persists, check the network and api.endpoint.",
    ),
    ErrorInfo(
        "BadResponse",
        "The response was truncated, not JSON, or not shaped as documented.",
        Scope.REQUEST,
        True,
        _RETRY,
    ),
    ErrorInfo(
        "MissingFromResponse",
        "Amazon's answers did not mention this ASIN, each time the broker asked again.",
        Scope.ASIN,
        True,
        # Only a final result carries this code: the broker re-asked it already.
        "Try it again later; if it stays missing, check the ASIN is sold in this marketplace.",
    ),
    ErrorInfo(
        "InvalidAsin",
        "The id is not a well-formed ASIN, so it was never sent.",
        Scope.ASIN,
        False,
        "Fix the id: an ASIN is 10 letters or digits (an ISBN-10 for books).",
    ),
    ErrorInfo(
        "InvalidRow",
        "A row of the job file is not a query (not valid JSON, too long, a malformed CSV "
        "record, a field missing, of the wrong type or given twice), so nothing was sent.",
        Scope.ASIN,
        False,
        "Fix that line of the job file as the message says; the changed file is a new job "
        "(broker run --new-job).",
    ),
    ErrorInfo(
        "UnknownMarketplace",
        "The marketplace named is not one of Amazon's, so nothing was sent.",
        Scope.ASIN,
        False,
        # broker.api.marketplaces.NAMING, which the row's message carries too (a CSV
        # output has no remedy column).
        "Name it by its code (UK), its domain (amazon.co.uk) or www.amazon.co.uk.",
    ),
    ErrorInfo(
        "InvalidResource",
        "A resource name the API does not know, so nothing was sent.",
        Scope.ASIN,
        False,
        "Use the API's resource names (either spelling: ItemInfo.Title or itemInfo.title); "
        "broker.api.resources.resource_names(protocol) lists them.",
    ),
    ErrorInfo(
        "NoKeyForMarketplace",
        "No configured key has a partner tag for this marketplace, so nothing was sent.",
        Scope.ASIN,
        False,
        "Add the marketplace to a key's partner_tags in the config "
        '(keys.partner_tags: "www.amazon.co.uk" = "yourtag-21").',
    ),
    ErrorInfo(
        "EndpointUnavailable",
        "The API or token endpoint could not be reached, or failed every request, for "
        "longer than the outage budget.",
        Scope.KEY,
        False,
        "Check the network, DNS and api.endpoint; run again (rows stay pending). "
        "retry.outage_budget_s sets how long an outage is waited out.",
    ),
    ErrorInfo(
        "StateUnavailable",
        "The shared key-state store (Redis, or the SQLite file) could not be used for longer "
        "than the outage budget, so the key sent nothing.",
        Scope.KEY,
        False,
        "Check the store [state] names (Redis up and reachable, the SQLite file's disk); run "
        "again (rows stay pending). retry.outage_budget_s sets how long an outage is waited "
        "out.",
    ),
    ErrorInfo(
        "UntrustedCertificate",
        "The endpoint's TLS certificate was not trusted (self-signed, issued for another "
        "host, or replaced by a TLS-inspecting proxy).",
        Scope.GLOBAL,
        False,
        "Check api.endpoint (and api.token_endpoint) name the right host; behind a "
        "TLS-inspecting proxy, trust its CA (SSL_CERT_FILE=/path/to/ca.pem); run again "
        "(rows stay pending).",
    ),
    ErrorInfo(
        "ProxyRefused",
        "The HTTP proxy (HTTPS_PROXY, HTTP_PROXY) refused the request: 407 asks for its "
        "credentials, 403 is its policy.",
        Scope.GLOBAL,
        False,
        "Fix the user and password in HTTPS_PROXY (they go before the proxy's host, then "
        "@), or ask for the endpoint to be allowed; NO_PROXY lists hosts to reach directly; "
        "run again (rows stay pending).",
    ),
    ErrorInfo(
        "AttemptsExhausted",
        "The remedy of a lookup that failed on every attempt the retry policy allows: the "
        "row keeps the last error's code, its message ends \"(gave up after N failed "
        'attempts)", and it gets this remedy (no row carries this code).',
        Scope.REQUEST,
        False,
        "Look it up again later (a finished job: broker run --new-job, which asks Amazon "
        "only for what the item cache cannot answer: soon after the run, the failed and "
        "not-found rows); the error says what failed each time.",
    ),
)

_UNKNOWN_REMEDY = "Read Amazon's message; report the code if the broker should know it."


def os_error_text(exc: OSError) -> str:
    """An ``OSError`` as a user reads it: what failed and on which file, without the
    ``[Errno N]`` that ``str()`` puts first (it says nothing the words do not).

    A failed move names both ends (``from -> to``): the folder that refused it is often
    the second (a spool's ``done/`` made read-only), and naming only the first sent an
    operator to a folder that was writable.
    """
    if not exc.strerror:
        return str(exc)
    if exc.filename is None or str(exc.filename) in exc.strerror:
        return exc.strerror
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {exc.strerror}"
    return f"{exc.filename}: {exc.strerror}"


def describe(code: str, *, status: int | None = None) -> ErrorInfo:
    """Return the catalogue entry for ``code``, or a sensible one for a code we do not know.

    Unknown codes are classed by HTTP status: 429 throttling, 5xx retryable, 401/403 per key,
    other 4xx per request. So is Creators' generic reason ``Other``, which protocol.md lists
    for 400, 401 and 403 alike: on a 401 or 403 it is the key that was refused.
    """
    info = CATALOGUE.get(code)
    if info is not None and not (code == "Other" and status in (401, 403)):
        return info
    if status == 429:
        return CATALOGUE["TooManyRequests"]
    if status is not None and status >= 500:
        return ErrorInfo(code, "Amazon failed to process the request.", Scope.REQUEST, True, _RETRY)
    if status in (401, 403):
        remedy = info.remedy if info is not None else _UNKNOWN_REMEDY
        return ErrorInfo(code, "The key was rejected.", Scope.KEY, False, remedy)
    return ErrorInfo(code, "Amazon rejected the request.", Scope.REQUEST, False, _UNKNOWN_REMEDY)
