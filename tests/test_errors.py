"""The error tree and the catalogue: every code has a remedy, unknown codes fall back by status."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

from broker.errors import (
    CATALOGUE,
    ApiError,
    AuthError,
    BadRequestError,
    BodyTooLarge,
    BrokerClosedError,
    BrokerError,
    ConfigError,
    ConnectError,
    EndpointUnreachable,
    ErrorInfo,
    KeyUnusableError,
    NoUsableKeyError,
    RequestTimeout,
    ResponseError,
    Scope,
    ServerError,
    StateUnavailableError,
    ThrottledError,
    TransportError,
    describe,
)

#: Codes of Amazon's tables (protocol.md 2.8, 3.5, 4) that must each have an entry.
AMAZON_CODES = [
    "TooManyRequests",
    "ThrottleException",
    "RequestExpired",
    "InvalidSignature",
    "IncompleteSignature",
    "UnrecognizedClient",
    "AccessDenied",
    "AccessDeniedAwsUsers",
    "InvalidAssociate",
    "InvalidPartnerTag",
    "InvalidParameterValue",
    "MissingParameter",
    "UnknownOperation",
    "ItemNotAccessible",
    "ResourceNotFoundException",
    "ValidationException",
    "TokenExpired",
    "InvalidToken",
    "AssociateNotEligible",
    "AssociateEligibilityException",
    "InternalFailure",
]

#: Codes that take a key (or key+marketplace) out of rotation (the engine issue's list).
KEY_FATAL = [
    "UnrecognizedClient",
    "InvalidSignature",
    "AccessDenied",
    "AccessDeniedAwsUsers",
    "InvalidAssociate",
    "InvalidPartnerTag",
    "AssociateNotEligible",
    "AssociateEligibilityException",
    "InvalidClient",
]


class TestCatalogue:
    """One entry per code, each actionable."""

    @pytest.mark.parametrize("code", sorted(CATALOGUE))
    def test_entry_complete(self, code: str) -> None:
        """Every entry is filed under its own code, with a meaning and a remedy in plain words."""
        info = CATALOGUE[code]
        assert info.code == code
        assert info.meaning.strip().endswith(".")
        assert len(info.remedy.strip()) > 10
        assert isinstance(info.scope, Scope)

    @pytest.mark.parametrize("code", AMAZON_CODES)
    def test_amazon_codes_present(self, code: str) -> None:
        """Every code of Amazon's tables is in the catalogue."""
        assert code in CATALOGUE

    @pytest.mark.parametrize("code", KEY_FATAL)
    def test_key_fatal_codes(self, code: str) -> None:
        """Key-fatal codes are scoped to the key (or key+marketplace) and never retried."""
        info = describe(code)
        assert info.scope in (Scope.KEY, Scope.KEY_MARKETPLACE)
        assert not info.retryable

    @pytest.mark.parametrize(
        "code",
        [
            "TokenExpired",
            "InvalidToken",
            "RequestExpired",
            "InternalFailure",
            "ServerError",
            "TransportError",
            "BadResponse",
            "TooManyRequests",
        ],
    )
    def test_transient_codes_retried(self, code: str) -> None:
        """Expired credentials, 5xx, network and throttling are retried."""
        assert describe(code).retryable


class TestDescribeFallbacks:
    """Codes we do not know are classed by HTTP status."""

    def test_429_is_throttling(self) -> None:
        """An unknown code on a 429 is throttling."""
        assert describe("SomethingNew", status=429) is CATALOGUE["TooManyRequests"]

    @pytest.mark.parametrize("status", [500, 502, 503, 504])
    def test_5xx_retried(self, status: int) -> None:
        """An unknown code on a 5xx is a retryable request error."""
        info = describe("Weird", status=status)
        assert (info.code, info.scope, info.retryable) == ("Weird", Scope.REQUEST, True)
        assert info.remedy

    @pytest.mark.parametrize("status", [401, 403])
    def test_auth_statuses_per_key(self, status: int) -> None:
        """An unknown code on a 401/403 condemns the key, not retried."""
        info = describe("Weird", status=status)
        assert (info.scope, info.retryable) == (Scope.KEY, False)
        assert info.remedy

    @pytest.mark.parametrize(
        ("status", "scope"), [(401, Scope.KEY), (403, Scope.KEY), (400, Scope.REQUEST)]
    )
    def test_generic_reason_other_follows_the_status(self, status: int, scope: Scope) -> None:
        """Creators' reason "Other" on a 401/403 refuses the key; on a 400, the request."""
        from broker.api.base import RawResponse
        from broker.api.creators import CreatorsDialect

        body = b'{"type":"AccessDeniedException","reason":"Other","message":"denied"}'
        response = RawResponse(status, {"content-type": "application/json"}, body, 0.01)
        with pytest.raises(ApiError) as caught:
            CreatorsDialect("https://creators.test").parse_get_items(response, ["B000000001"])
        assert caught.value.code == "Other"
        assert (caught.value.info.scope, caught.value.info.retryable) == (scope, False)

    @pytest.mark.parametrize("status", [400, 404, 418, None])
    def test_other_statuses_per_request(self, status: int | None) -> None:
        """Anything else is a request error, not retried, with a generic remedy."""
        info = describe("Weird", status=status)
        assert (info.scope, info.retryable) == (Scope.REQUEST, False)
        assert "report" in info.remedy

    def test_known_code_wins_over_status(self) -> None:
        """A known code keeps its entry whatever the status."""
        assert describe("InvalidSignature", status=500) is CATALOGUE["InvalidSignature"]


def _errors_defined_elsewhere() -> list[BrokerError]:
    """One of each error class with an ``__init__`` of its own outside broker.errors."""
    from broker.api.paapi5 import InvalidItemIdsError
    from broker.config import ServiceCredentialError
    from broker.jobs.lock import JobLockedError

    return [
        JobLockedError(Path("/jobs/out.jsonl.ledger.lock"), 4242),
        ServiceCredentialError("keys[0].credential_secret_file", "only the service reads it"),
        InvalidItemIdsError("InvalidParameterValue", "bad ids", status=400, invalid_ids=["B0BAD"]),
    ]


class TestTree:
    """The hierarchy and messages."""

    def test_builtin_bases(self) -> None:
        """Errors subclass the builtin whose meaning they share."""
        assert issubclass(ConfigError, ValueError)
        assert issubclass(ConnectError, ConnectionError)
        assert issubclass(RequestTimeout, TimeoutError)
        for cls in (ConnectError, RequestTimeout, BodyTooLarge):
            assert issubclass(cls, TransportError)
        for cls in (ThrottledError, AuthError, BadRequestError, ServerError):
            assert issubclass(cls, ApiError)
        for cls in (ConfigError, TransportError, ApiError, KeyUnusableError, NoUsableKeyError):
            assert issubclass(cls, BrokerError)

    def test_api_error_fields(self) -> None:
        """ApiError carries code, status, retry_after and its catalogue entry."""
        error = ThrottledError("TooManyRequests", "slow down", status=429, retry_after=2.0)
        assert str(error) == "TooManyRequests (HTTP 429): slow down"
        assert error.retry_after == 2.0
        assert error.info is CATALOGUE["TooManyRequests"]

    def test_no_usable_key_names_each_key(self) -> None:
        """NoUsableKeyError says which keys failed, with what code, what happened (the URL
        or tag a general remedy cannot name) and what to do."""
        failures = [
            KeyUnusableError("a", "InvalidSignature", "bad", describe("InvalidSignature").remedy),
            KeyUnusableError(
                "b", "AssociateNotEligible", "no sales", describe("AssociateNotEligible").remedy
            ),
        ]
        error = NoUsableKeyError("www.amazon.com", failures)
        text = str(error)
        assert "www.amazon.com" in text
        assert "a: InvalidSignature" in text
        assert "b: AssociateNotEligible: no sales" in text
        assert describe("InvalidSignature").remedy in text
        assert "no key configured" in str(NoUsableKeyError("www.amazon.de", []))

    def test_config_error_path(self) -> None:
        """ConfigError's message starts with the key path."""
        assert str(ConfigError("keys[0].tps", "must be > 0")) == "keys[0].tps: must be > 0"
        assert str(ConfigError("", "file not found")) == "file not found"

    @pytest.mark.parametrize(
        "error",
        [
            ConfigError("keys[0].tps", "must be > 0"),
            ThrottledError("TooManyRequests", "slow", status=429, retry_after=2.0, server_date="d"),
            AuthError("InvalidSignature", "bad", status=401),
            KeyUnusableError("a", "InvalidSignature", "bad", "check the secret"),
            NoUsableKeyError("www.amazon.com", [KeyUnusableError("a", "C", "m", "r")]),
            StateUnavailableError("redis", "connection refused"),
            ResponseError("truncated", status=200),
            EndpointUnreachable("refused"),
            RequestTimeout("slow body"),
            BrokerClosedError("closed"),
            *_errors_defined_elsewhere(),
        ],
        ids=lambda error: type(error).__name__,
    )
    def test_errors_pickle_and_copy(self, error: BrokerError) -> None:
        """Every error survives pickle and copy (process pools, task queues) with its fields."""
        for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
            assert type(clone) is type(error)
            assert str(clone) == str(error)
            assert _fields(clone) == _fields(error)


def _fields(value: object) -> object:
    """An error as comparable data (exceptions compare by identity): type, args and fields."""
    if isinstance(value, BaseException):
        return (type(value), value.args, {k: _fields(v) for k, v in vars(value).items()})
    if isinstance(value, tuple):
        return tuple(_fields(v) for v in value)
    return value


def _readme_row(info: ErrorInfo) -> str:
    retried = "yes" if info.retryable else "no"
    return f"| `{info.code}` | {info.meaning} | {info.scope.value} | {retried} | {info.remedy} |"


def test_readme_error_table_matches_the_catalogue() -> None:
    """README's error-code table lists every catalogue entry exactly as the code has it."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    table = [row for row in rows if any(row.startswith(f"| `{c}` |") for c in CATALOGUE)]
    assert table == [_readme_row(info) for info in CATALOGUE.values()]


def test_every_code_the_simulator_sends_is_in_the_catalogue() -> None:
    """A row failed by any error the simulator can send carries a code the README explains."""
    from broker.simulator import creators, paapi

    codes = set(paapi._ERRORS) | set(creators._MESSAGES)
    codes |= {str(body["type"]) for body in creators._SERVER_ERRORS.values() if "type" in body}
    assert sorted(codes - set(CATALOGUE)) == []


def test_a_failed_move_names_both_ends(tmp_path: Path) -> None:
    """A rename refused by its destination (a spool's done/ made read-only) names both
    paths; it named only the source, a folder that was writable."""
    from broker.errors import os_error_text

    source = tmp_path / "processing" / "x.out.jsonl"
    error = PermissionError(1, "Operation not permitted", str(source), None, "done/x.out.jsonl")
    assert os_error_text(error) == f"{source} -> done/x.out.jsonl: Operation not permitted"
    single = PermissionError(13, "Permission denied", str(source))
    assert os_error_text(single) == f"{source}: Permission denied"
