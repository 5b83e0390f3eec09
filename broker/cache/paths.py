"""Where the item cache file lives by default: the user's state directory, private to them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from broker.sqlitewal import state_dir

__all__ = ["CACHE_FILE", "default_cache_path", "state_dir"]

#: File name of the SQLite item cache inside the state directory.
CACHE_FILE: Final = "item-cache.sqlite3"


def default_cache_path(environ: Mapping[str, str] | None = None) -> Path:
    """The default SQLite cache file: ``state_dir() / "item-cache.sqlite3"``."""
    return state_dir(environ) / CACHE_FILE
