"""Typed reads of one TOML table, with errors that name the key path; shared by every config.

config.toml's broker tables (:mod:`broker.config`) and its ``[simulator]`` table
(:mod:`broker.simulator.settings`) read through this one class, so both name a bad key the
same way (``keys[1].tps``, ``simulator.faults.error_503``), refuse unknown keys alike, and
never echo a value in an error (it may be a credential pasted in the wrong place). It sits in
the bottom layer: the simulator and the client both use it without importing each other.
"""

from __future__ import annotations

import datetime
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import cast

from broker.errors import ConfigError

__all__ = ["TomlTable", "did_you_mean"]


def _kind(value: object) -> str:
    """The TOML type of ``value`` in words (never the value itself)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return type(value).__name__


#: TOML values written bare that were meant as text (``version = 3.1``,
#: ``daily_reset_utc = 08:00``): the message says to quote them.
_BARE: tuple[type, ...] = (int, float, datetime.date, datetime.time)


class TomlTable:
    """One TOML table being read: getters that check types and ranges, and remember keys.

    Args:
        data: the table as :mod:`tomllib` parsed it.
        path: its key path, for messages (``""`` for the document root).

    Raises:
        ConfigError: ``data`` is not a table.
    """

    __slots__ = ("_data", "_path", "_seen")

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, "must be a table")
        for name in data:
            # TOML's keys are strings; a document given in code may hold any.
            if not isinstance(name, str):
                where = "has" if path else "the document has"
                raise ConfigError(path, f"{where} a key that is not a string: {name!r}")
        self._data = cast("Mapping[str, object]", data)
        self._path = path
        self._seen: set[str] = set()

    @property
    def path(self) -> str:
        """The table's key path."""
        return self._path

    @property
    def data(self) -> Mapping[str, object]:
        """The table as parsed (read-only use)."""
        return self._data

    def key(self, name: str) -> str:
        """The full key path of ``name`` in this table."""
        return f"{self._path}.{name}" if self._path else name

    def has(self, name: str) -> bool:
        """True when the table sets ``name`` (without marking it read)."""
        return name in self._data

    def raw(self, name: str) -> object | None:
        """The value of ``name`` as parsed, or None; marks it read."""
        self._seen.add(name)
        return self._data.get(name)

    def table(self, name: str) -> TomlTable:
        """The sub-table ``name`` (an empty one when absent)."""
        value = self.raw(name)
        return TomlTable({} if value is None else value, self.key(name))

    def array(self, name: str) -> list[TomlTable]:
        """The array of tables ``name`` (``[[name]]``), empty when absent."""
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            # The whole path: [[accounts]] under [simulator] is [[simulator.accounts]].
            raise ConfigError(self.key(name), f"must be an array of tables ([[{self.key(name)}]])")
        return [TomlTable(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def text(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        """A non-empty string (stripped); ``default`` when absent, unless required."""
        value = self.raw(name)
        if value is None:
            if required or default is None:
                raise ConfigError(self.key(name), "is required")
            return default
        if not isinstance(value, str):
            quote = (
                ": write it in quotes"
                if isinstance(value, _BARE) and not isinstance(value, bool)
                else ""
            )
            raise ConfigError(
                self.key(name), f"must be a non-empty string, not {_kind(value)}{quote}"
            )
        if not value.strip():
            raise ConfigError(self.key(name), "must not be empty")
        return value.strip()

    def opt_text(self, name: str) -> str | None:
        """A non-empty string, or None when absent."""
        if self._data.get(name) is None:
            self._seen.add(name)
            return None
        return self.text(name)

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        """One of ``choices``; ``default`` when absent."""
        value = self.text(name, default)
        if value not in choices:
            raise ConfigError(self.key(name), f"must be one of {', '.join(choices)}")
        return value

    def opt_number(
        self,
        name: str,
        *,
        minimum: float | None = None,
        exclusive: bool = False,
        maximum: float | None = None,
    ) -> float | None:
        """A finite number within bounds (``exclusive``: strictly above ``minimum``), or None."""
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), f"must be a number, not {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond a float's range: TOML's have no bound
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(self.key(name), "must be a finite number")
        if minimum is not None and (number < minimum or (exclusive and number == minimum)):
            op = ">" if exclusive else ">="
            raise ConfigError(self.key(name), f"must be {op} {minimum:g}, got {number:g}")
        if maximum is not None and number > maximum:
            raise ConfigError(self.key(name), f"must be <= {maximum:g}, got {number:g}")
        return number

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        exclusive: bool = False,
        maximum: float | None = None,
    ) -> float:
        """A finite number within bounds; ``default`` when absent."""
        value = self.opt_number(name, minimum=minimum, exclusive=exclusive, maximum=maximum)
        return default if value is None else value

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        """An integer within bounds; ``default`` when absent."""
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, float):
            # "not a number" of 8640.0 would contradict itself: say what it is and, for a
            # whole one, what to write.
            whole = value.is_integer() and abs(value) < 2**53
            hint = f": write {int(value)}" if whole else ""
            raise ConfigError(self.key(name), f"must be an integer, not a decimal number{hint}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be an integer, not {_kind(value)}")
        too_low = minimum is not None and value < minimum
        if too_low or (maximum is not None and value > maximum):
            if minimum is not None and maximum is not None:
                bound = f"between {minimum} and {maximum}"
            else:
                bound = f">= {minimum}" if minimum is not None else f"<= {maximum}"
            raise ConfigError(self.key(name), f"must be {bound}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        """true or false; ``default`` when absent."""
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, not {_kind(value)}")
        return value

    def str_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A list of non-empty strings (stripped); ``default`` when absent."""
        value = self.raw(name)
        if value is None:
            return default
        # A tuple only from a document built in code (resource_names() gives one).
        if not isinstance(value, list | tuple):
            raise ConfigError(
                self.key(name), f"must be a list of non-empty strings, not {_kind(value)}"
            )
        if not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(self.key(name), "must be a list of non-empty strings")
        return tuple(v.strip() for v in value)

    def str_map(self, name: str) -> dict[str, str]:
        """A table of non-empty strings (stripped); empty when absent."""
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(v, str) and v.strip() for v in value.values()
        ):
            raise ConfigError(self.key(name), "must be a table of non-empty strings")
        return {str(k): str(v).strip() for k, v in value.items()}

    def unread(self) -> list[str]:
        """The keys of the table no getter has read, in file order."""
        return [name for name in self._data if name not in self._seen]

    def read(self) -> list[str]:
        """The keys read so far, sorted (for "known keys" hints)."""
        return sorted(self._seen)

    def finish(self) -> None:
        """Raise for the first key no getter read: an unknown key is almost always a typo,
        so the known key closest to it is named (``tsp``: did you mean tps?)."""
        for name in self.unread():
            raise ConfigError(self.key(name), "unknown key" + did_you_mean(name, self.read()))


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """``"; did you mean X?"`` for the one of ``known`` closest to a misspelt ``name``,
    else ``""``."""
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


#: ``daily_reset_utc = 08:00``, a time without seconds, which TOML 1.0 does not have: the
#: likeliest way to write it, and a parse error, not a value a table can name.
_UNQUOTED_TIME = re.compile(r"\s*(daily_reset_utc)\s*=\s*(\d{1,2}):(\d{2})\s*(?:#.*)?")
_ERROR_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def unquoted_time_hint(text: str, error: str) -> str:
    """``: write it in quotes (daily_reset_utc = "08:00")`` when the line a TOML error of
    ``text`` names is that key with a bare HH:MM, else ``""``."""
    at = _ERROR_LINE.search(error)
    lines = text.splitlines()
    if at is None or not 1 <= int(at.group(1)) <= len(lines):
        return ""
    bare = _UNQUOTED_TIME.fullmatch(lines[int(at.group(1)) - 1])
    if bare is None:
        return ""
    key, hour, minute = bare.groups()
    # Two digits of hour, as the key takes it: "8:00" would be refused next.
    return f': write it in quotes ({key} = "{int(hour):02d}:{minute}")'
