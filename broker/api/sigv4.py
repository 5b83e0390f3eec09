"""AWS Signature Version 4 for PA-API 5.0: the pure signing steps, and a signer that applies them.

The pure functions (canonical request, string to sign, key derivation, signature, the
Authorization header and its parser) let the simulator *verify* a request exactly as AWS
would; :class:`SigV4Signer` uses the same steps to *sign* each request at dispatch time.
Reference: AWS "Create a signed AWS API request" and its published test suite, which
``tests/test_sigv4.py`` replays step by step alongside botocore's ``SigV4Auth``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from hashlib import sha256
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, quote, unquote_to_bytes, urlsplit

from broker.api.base import HttpRequest

if TYPE_CHECKING:
    from broker.models import Secret

__all__ = [
    "ALGORITHM",
    "SERVICE",
    "ParsedAuthorization",
    "SigV4Signer",
    "authorization_header",
    "canonical_request",
    "credential_scope",
    "derive_signing_key",
    "parse_authorization",
    "signature",
    "string_to_sign",
]

#: The service name PA-API signs with (``ProductAdvertisingAPIv1`` is refused).
SERVICE = "ProductAdvertisingAPI"
#: The only algorithm SigV4 defines.
ALGORITHM = "AWS4-HMAC-SHA256"

_TERMINATOR = "aws4_request"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The signer owns these two headers: a stale copy (from a previous attempt) must be
# replaced, never signed, because a retry re-signs with a fresh timestamp.
_OWNED_HEADERS = frozenset({"authorization", "x-amz-date"})
# PA-API uses a handful of regions and the date changes daily, so a few dozen keys cover
# several days of every region; the bound only matters for a misconfigured caller.
_KEY_CACHE_SIZE = 32
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    payload_hash: str,
) -> str:
    """Build the SigV4 canonical request (step 1 of signing).

    Args:
        method: the HTTP method; upper-cased.
        path: the path as sent on the wire (already percent-encoded once). Dot segments
            and repeated slashes are removed and the result is URI-encoded once more, as
            AWS does for every service except S3.
        query: the raw query string without ``?``, percent-encoded or not; it is decoded,
            re-encoded per AWS (only ``A-Z a-z 0-9 - _ . ~`` left bare) and sorted by key,
            then value. Empty ``&&`` parts are ignored; ``+`` is a literal plus.
        headers: header name (any case) to value as sent. Values are trimmed and inner
            whitespace runs collapse to one space. Names that differ only in case are
            joined with ``,``, as AWS joins a repeated header (fold repeated headers the
            same way before calling).
        signed_headers: the names to sign, any case and order.
        payload_hash: lower-case hex SHA-256 of the exact body bytes.

    Returns:
        The canonical request, lines joined with ``\\n``.

    Raises:
        ValueError: ``signed_headers`` is empty or names a header that ``headers`` lacks.
    """
    lowered = _lower_headers(headers)
    names = _signed_names(signed_headers)
    if not names:
        raise ValueError("no signed headers given")
    missing = [name for name in names if name not in lowered]
    if missing:
        raise ValueError(f"signed headers missing from the request: {', '.join(missing)}")
    return _assemble(
        method.upper(),
        _canonical_path(path),
        _canonical_query(query),
        "".join([f"{name}:{lowered[name]}\n" for name in names]),
        ";".join(names),
        payload_hash,
    )


def credential_scope(date_stamp: str, region: str, service: str) -> str:
    """Return ``<yyyymmdd>/<region>/<service>/aws4_request``."""
    return f"{date_stamp}/{region}/{service}/{_TERMINATOR}"


def string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    """Build the string to sign (step 2) from ``x-amz-date``, scope and canonical request."""
    digest = sha256(canonical_request.encode()).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def derive_signing_key(secret: str, date_stamp: str, region: str, service: str) -> bytes:
    """Derive the signing key (step 3): four chained HMAC-SHA256s from ``"AWS4" + secret``.

    Raises:
        ValueError: the secret cannot be encoded as UTF-8 (the message never contains it).
    """
    seed = _secret_seed(secret)
    if seed is None:
        # Raised outside the ``except`` so no UnicodeEncodeError (whose ``object``
        # attribute holds the secret) is chained to this one.
        raise ValueError("the secret key cannot be encoded as UTF-8")
    key = hmac.digest(seed, date_stamp.encode(), "sha256")
    key = hmac.digest(key, region.encode(), "sha256")
    key = hmac.digest(key, service.encode(), "sha256")
    return hmac.digest(key, _TERMINATOR.encode(), "sha256")


def signature(signing_key: bytes, string_to_sign: str) -> str:
    """Return the signature (step 4): hex HMAC-SHA256 of the string to sign, lower case."""
    return hmac.digest(signing_key, string_to_sign.encode(), "sha256").hex()


def authorization_header(
    access_key: str, scope: str, signed_headers: Sequence[str], signature: str
) -> str:
    """Return the ``Authorization`` value; ``signed_headers`` are lower-cased and sorted first."""
    return _authorization(access_key, scope, ";".join(_signed_names(signed_headers)), signature)


@dataclass(frozen=True, slots=True)
class ParsedAuthorization:
    """The parts of a SigV4 ``Authorization`` header, as the client sent them.

    Nothing is checked against expectations here (algorithm, terminator, service, region):
    a verifier compares them, so it can answer with the matching Amazon error code.
    """

    algorithm: str
    access_key: str
    date_stamp: str
    region: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> ParsedAuthorization:
    """Split an ``Authorization`` header into its parts.

    Components may be separated by ``", "`` or ``","``; unknown components are ignored.

    Args:
        value: for example ``AWS4-HMAC-SHA256 Credential=AK/20260501/us-east-1/
            ProductAdvertisingAPI/aws4_request, SignedHeaders=host;x-amz-date, Signature=<hex>``.

    Returns:
        The parsed parts.

    Raises:
        ValueError: a part is missing or garbled; the message names the part but never
            echoes the header, which carries a signature.
    """
    algorithm, _, rest = value.strip().partition(" ")
    if not algorithm or "=" in algorithm:
        raise ValueError("Authorization header is missing the algorithm")
    fields: dict[str, str] = {}
    for component in rest.split(","):
        if not component.strip():
            continue
        name, eq, field_value = component.strip().partition("=")
        if not eq:
            raise ValueError("Authorization header has a component without '=' (want Name=value)")
        if name in fields:
            raise ValueError(f"Authorization header repeats {name}")
        fields[name] = field_value.strip()
    for required in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(required):
            raise ValueError(f"Authorization header is missing {required}")

    credential = fields["Credential"].rsplit("/", 4)
    if len(credential) != 5 or not all(credential):
        raise ValueError(
            "Credential is garbled: want <access key>/<yyyymmdd>/<region>/<service>/aws4_request"
        )
    access_key, date_stamp, region, service, terminator = credential
    if len(date_stamp) != 8 or not (date_stamp.isascii() and date_stamp.isdigit()):
        raise ValueError("Credential date is garbled: want yyyymmdd")
    signed_headers = tuple(fields["SignedHeaders"].split(";"))
    if not all(signed_headers):
        raise ValueError("SignedHeaders is garbled: it has an empty header name")
    sig = fields["Signature"]
    if len(sig) != 64 or not _HEX_DIGITS.issuperset(sig):
        raise ValueError("Signature is garbled: want 64 hex digits")
    return ParsedAuthorization(
        algorithm, access_key, date_stamp, region, service, terminator, signed_headers, sig
    )


class SigV4Signer:
    """Signs PA-API requests at dispatch time.

    Caches the derived signing key per (date_stamp, region), as a keyed HMAC ready to
    copy, so each request costs one HMAC and two SHA-256 hashes instead of five HMACs.
    The secret is revealed only to derive a key, and never appears in ``repr``, ``str``
    or an exception.
    """

    __slots__ = ("_access_key", "_hits", "_macs", "_misses", "_secret", "_service")

    def __init__(self, access_key: str, secret: Secret, *, service: str = SERVICE) -> None:
        """Create a signer.

        Args:
            access_key: the access key id (public: it is sent in every Authorization header).
            secret: the secret access key.
            service: the service name in the credential scope.

        Raises:
            ValueError: the access key is empty or the secret is not encodable as UTF-8
                (checked now, so a bad key fails at startup rather than on first use).
        """
        if not access_key:
            raise ValueError("access_key is empty")
        if _secret_seed(secret.reveal()) is None:
            raise ValueError("the secret key cannot be encoded as UTF-8")
        self._access_key = access_key
        self._secret = secret
        self._service = service
        # Insertion-ordered, so the first entry is the oldest: a new day's keys evict
        # the previous days' keys first.
        self._macs: dict[tuple[str, str], hmac.HMAC] = {}
        self._hits = 0
        self._misses = 0

    def __repr__(self) -> str:
        return f"SigV4Signer(access_key={self._access_key!r}, service={self._service!r})"

    @property
    def cache_hits(self) -> int:
        """How many signatures reused a cached signing key."""
        return self._hits

    @property
    def cache_misses(self) -> int:
        """How many signatures had to derive a signing key."""
        return self._misses

    def sign(self, request: HttpRequest, *, region: str, now: datetime) -> HttpRequest:
        """Return a copy of ``request`` with ``x-amz-date`` and ``Authorization`` set.

        Every header present is signed (lower-cased, sorted), plus ``host`` (the request's
        ``host`` header if present, else the URL's host and non-default port) and
        ``x-amz-date``. Any stale ``Authorization`` or ``x-amz-date`` is replaced. The
        payload hash covers ``request.body`` exactly.

        Args:
            request: the unsigned (or previously signed) request.
            region: the SigV4 region of the marketplace host, e.g. ``us-east-1``.
            now: the signing time; must be timezone-aware (converted to UTC).

        Raises:
            ValueError: ``now`` is naive, or there is neither a host header nor a URL host.
        """
        amz_date = _amz_date(now)
        date_stamp = amz_date[:8]
        url_host, path, query = _url_parts(request.url)
        plan = _header_plan(tuple(request.headers.items()), url_host)

        creq = _assemble(
            request.method.upper(),
            path,
            query,
            f"{plan.before}x-amz-date:{amz_date}\n{plan.after}",
            plan.signed,
            sha256(request.body).hexdigest(),
        )
        scope = f"{date_stamp}/{region}/{self._service}/{_TERMINATOR}"
        sts = string_to_sign(amz_date, scope, creq)
        mac = self._signing_mac(date_stamp, region).copy()
        mac.update(sts.encode())

        sent = dict(plan.kept)
        sent["x-amz-date"] = amz_date
        sent["Authorization"] = _authorization(
            self._access_key, scope, plan.signed, mac.hexdigest()
        )
        return HttpRequest(request.method, request.url, sent, request.body)

    def _signing_mac(self, date_stamp: str, region: str) -> hmac.HMAC:
        """An HMAC keyed with the day's signing key, to ``copy()`` per request."""
        cache_key = (date_stamp, region)
        mac = self._macs.get(cache_key)
        if mac is not None:
            self._hits += 1
            return mac
        self._misses += 1
        if len(self._macs) >= _KEY_CACHE_SIZE:
            del self._macs[next(iter(self._macs))]
        key = derive_signing_key(self._secret.reveal(), date_stamp, region, self._service)
        # Copying a keyed HMAC saves hashing the padded key twice on every request.
        mac = hmac.new(key, digestmod=sha256)
        self._macs[cache_key] = mac
        return mac


def _secret_seed(secret: str) -> bytes | None:
    """Return ``b"AWS4" + secret`` as UTF-8, or None when it cannot be encoded."""
    try:
        return ("AWS4" + secret).encode()
    except UnicodeEncodeError:
        return None


def _signed_names(signed_headers: Sequence[str]) -> list[str]:
    return sorted({name.lower() for name in signed_headers})


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Lower-case names; trim values and collapse whitespace runs (botocore's rule too)."""
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        trimmed = " ".join(value.split())
        lowered[key] = f"{lowered[key]},{trimmed}" if key in lowered else trimmed
    return lowered


def _assemble(
    method: str, path: str, query: str, header_lines: str, signed: str, payload_hash: str
) -> str:
    """Join already-canonical parts; ``header_lines`` ends with a newline."""
    return f"{method}\n{path}\n{query}\n{header_lines}\n{signed}\n{payload_hash}"


def _authorization(access_key: str, scope: str, signed: str, sig: str) -> str:
    return f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={sig}"


def _amz_date(now: datetime) -> str:
    """Format ``now`` as ``YYYYMMDDTHHMMSSZ`` in UTC."""
    offset = now.utcoffset()
    if offset is None:
        raise ValueError("now must be timezone-aware")
    if offset:
        now = now.astimezone(UTC)
    # %-formatting, not strftime: twice as fast, and it pads years below 1000 to four digits.
    return "%04d%02d%02dT%02d%02d%02dZ" % (  # noqa: UP031
        now.year,
        now.month,
        now.day,
        now.hour,
        now.minute,
        now.second,
    )


@dataclass(frozen=True, slots=True)
class _HeaderPlan:
    """What signing needs from one header set, apart from the date that changes each time.

    ``before`` and ``after`` are the canonical header lines that sort before and after
    ``x-amz-date``; ``signed`` is the SignedHeaders value; ``kept`` are the headers to send
    (stale ``Authorization``/``x-amz-date`` removed). Callers copy ``kept``, never mutate it.
    """

    kept: Mapping[str, str]
    before: str
    after: str
    signed: str


@lru_cache(maxsize=256)
def _header_plan(items: tuple[tuple[str, str], ...], url_host: str) -> _HeaderPlan:
    # A dialect sends the same few header sets (one per marketplace and operation), so
    # caching this turns a quarter of the signing cost into one lookup per request.
    kept = {name: value for name, value in items if name.lower() not in _OWNED_HEADERS}
    lowered = _lower_headers(kept)
    if "host" not in lowered:
        if not url_host:
            raise ValueError("request has neither a host header nor a host in its URL")
        lowered["host"] = url_host
    names = sorted([*lowered, "x-amz-date"])
    split = names.index("x-amz-date")
    lines = [f"{name}:{lowered[name]}\n" for name in names if name != "x-amz-date"]
    return _HeaderPlan(kept, "".join(lines[:split]), "".join(lines[split:]), ";".join(names))


# The caches below are pure functions of short strings. A broker sends to a few URLs
# only, so these turn URL parsing and encoding into one dict lookup per request; the
# bound keeps a simulator fed arbitrary paths from growing without limit.


@lru_cache(maxsize=256)
def _url_parts(url: str) -> tuple[str, str, str]:
    """Return (host for the host header, canonical path, canonical query) of a URL."""
    parts = urlsplit(url)
    return _url_host(parts), _canonical_path(parts.path), _canonical_query(parts.query)


def _url_host(parts: SplitResult) -> str:
    """The Host value an HTTP client sends: lower-case host, port only when not the default."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    return host


@lru_cache(maxsize=256)
def _canonical_path(path: str) -> str:
    if not path:
        return "/"
    # The wire path is encoded once already; AWS wants it encoded again ("double
    # encoding") for every service but S3, so "%20" is signed as "%2520".
    return quote(_remove_dot_segments(path), safe="/~")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, plus dropping empty segments, as AWS normalises paths."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and segments else ""
    return first + "/".join(segments) + last


@lru_cache(maxsize=256)
def _canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs: list[tuple[str, str]] = []
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        # Decoding to bytes first keeps already-encoded input (even invalid UTF-8 such
        # as %FF) byte-for-byte, and normalises lower-case escapes to upper case.
        pairs.append(
            (
                quote(unquote_to_bytes(key), safe="-_.~"),
                quote(unquote_to_bytes(value), safe="-_.~"),
            )
        )
    pairs.sort()
    return "&".join([f"{key}={value}" for key, value in pairs])
