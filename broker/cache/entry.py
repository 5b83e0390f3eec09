"""One cached answer as stored bytes: the raw item JSON, its summary, when Amazon sent it.

Every home stores the same payload (orjson bytes) with a BLAKE2b checksum beside it, and
:func:`decode` refuses bytes whose checksum does not match, so a torn or corrupted value
is a miss, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import orjson

from broker.jsontext import deep_enough, loads
from broker.models import ItemResult, ItemSummary, Query, Status

if TYPE_CHECKING:
    from broker.cache.policy import CacheKey

__all__ = ["CorruptEntry", "Entry", "decode", "encode"]

_FORMAT: Final = 1


class CorruptEntry(Exception):
    """Stored bytes that fail their checksum or do not parse; the store drops them."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored answer: its key, when Amazon sent it (UTC epoch seconds) and its bytes."""

    key: CacheKey
    fetched_at: float
    payload: bytes
    checksum: bytes

    @property
    def size(self) -> int:
        """Payload size in bytes (what the byte bound counts)."""
        return len(self.payload)


def checksum(payload: bytes) -> bytes:
    """The 16-byte BLAKE2b digest stored beside a payload."""
    return hashlib.blake2b(payload, digest_size=16).digest()


def encode(key: CacheKey, result: ItemResult) -> Entry:
    """Turn an ``ok`` result into an entry.

    Raises:
        ValueError: the result is not ``ok`` or has no ``fetched_at`` (only answers Amazon
            gave are cached).
    """
    if result.status is not Status.OK or result.fetched_at is None:
        raise ValueError("only ok results with a fetched_at are cached")
    summary = result.summary
    document = {
        "v": _FORMAT,
        "asin": result.asin,
        "marketplace": result.marketplace,
        "item": result.item,
        "summary": summary.to_json() if summary is not None else None,
    }
    try:
        raw = orjson.dumps(document)
    except orjson.JSONEncodeError:
        # Half an emoji (a lone surrogate) in a title Amazon sent: orjson refuses it, and
        # the whole batch's write failed, the cache taken for out of use a minute. The
        # stdlib writes it escaped, and decode() reads it back as it came.
        # So is an answer nested deeper than orjson writes (255 levels; it reads 1,024).
        with deep_enough():
            raw = json.dumps(document, separators=(",", ":")).encode()
    # Copied to its exact size: orjson's bytes keep their over-allocated buffer (8 KB held
    # for 850 B of JSON), and the memory cache keeps each payload for a day.
    payload = memoryview(raw).tobytes()
    fetched_at = result.fetched_at
    if fetched_at.tzinfo is None:
        fetched_at = fetched_at.replace(tzinfo=UTC)
    return Entry(key, fetched_at.timestamp(), payload, checksum(payload))


def decode(entry: Entry, query: Query | None) -> ItemResult:
    """Rebuild the result a cached entry stands for, marked ``cached`` for ``query``.

    ``attempts`` is 0 and ``key`` None: no request carried it this time.

    Raises:
        CorruptEntry: the checksum does not match or the payload is not what we wrote.
    """
    if checksum(entry.payload) != entry.checksum:
        raise CorruptEntry(f"checksum mismatch for {entry.key.text()}")
    try:
        data = loads(entry.payload)
        if not isinstance(data, dict) or data.get("v") != _FORMAT:
            raise CorruptEntry(f"unknown payload format for {entry.key.text()}")
        item = data["item"]
        raw_summary = data["summary"]
        summary = ItemSummary.from_json(raw_summary) if isinstance(raw_summary, dict) else None
        return ItemResult(
            str(data["asin"]),
            str(data["marketplace"]),
            Status.OK,
            item=item if isinstance(item, dict) else None,
            summary=summary,
            attempts=0,
            key=None,
            fetched_at=datetime.fromtimestamp(entry.fetched_at, UTC),
            query=query,
            cached=True,
        )
    except (ValueError, KeyError, TypeError) as exc:  # a JSONDecodeError is a ValueError
        raise CorruptEntry(f"unreadable payload for {entry.key.text()}") from exc
