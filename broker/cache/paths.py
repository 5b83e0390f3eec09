"""Where the item cache file lives by default: the user's state directory, private to them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = ["CACHE_FILE", "default_cache_path", "state_dir"]

#: File name of the SQLite item cache inside the state directory.
CACHE_FILE: Final = "item-cache.sqlite3"


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/asin-broker`` if that is absolute, else ``~/.local/state/asin-broker``.

    The same directory the shared key state uses; nothing is created here.
    """
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative path is invalid and must be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "asin-broker"


def default_cache_path(environ: Mapping[str, str] | None = None) -> Path:
    """The default SQLite cache file: ``state_dir() / "item-cache.sqlite3"``."""
    return state_dir(environ) / CACHE_FILE
