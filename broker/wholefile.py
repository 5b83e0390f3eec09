"""Files replaced whole: a reader sees the old content or the new, never a part.

A config that ``broker init --force`` rewrites while a run starts, a spool job's status file
another daemon reads: each is written to a copy beside it, flushed to disk, and renamed over
the old one in one step. A crash or a full disk leaves the old file as it was. A failed
write removes its copy (its space would not come back when the user frees some); one killed
mid-write (``kill -9``) leaves it, for the file's only writer to remove
(:func:`copies_of`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

__all__ = ["copies_of", "copy_for", "original_of", "write_whole"]


def copy_for(path: Path) -> Path:
    """A new name for a copy of ``path`` beside it: hidden, and of its own, so two processes
    writing beside each other (daemons sharing a spool) never write into one copy."""
    return path.with_name(f".{path.name}.{secrets.token_hex(_TOKEN_BYTES)}.tmp")


def copies_of(path: Path) -> list[Path]:
    """The copies of ``path`` that writes killed mid-way left beside it (and any under way)."""
    try:
        with os.scandir(path.parent) as entries:
            names = [entry.name for entry in entries]
    except FileNotFoundError:  # no folder, no copies (a clean-up removed it)
        return []
    return sorted(path.parent / name for name in names if original_of(name) == path.name)


def original_of(name: str) -> str | None:
    """The name of the file a copy named ``name`` is for, None if it is no such copy."""
    found = _COPY.fullmatch(name)
    return found.group(1) if found else None


#: A copy's own part of its name, in random bytes (written in hex, twice as many digits).
_TOKEN_BYTES = 4
_COPY = re.compile(rf"\.(.+)\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp", re.DOTALL)


def write_whole(path: Path, text: str, *, through_links: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all.

    A symbolic link stays a link (the file it names is replaced), unless not
    ``through_links``: then the link itself is replaced, never its target, whenever it was
    put there (a program's own file in a folder others may write: a link made between a
    check and the write had it written through). An existing file keeps its mode. The copy
    has a name of its own (:func:`copy_for`).
    """
    follow = through_links and path.is_symlink()
    target = Path(os.path.realpath(path)) if follow else path
    temporary = copy_for(target)
    try:
        with temporary.open("w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(FileNotFoundError):
            held = os.stat(target, follow_symlinks=through_links)
            if stat.S_ISREG(held.st_mode):
                os.chmod(temporary, stat.S_IMODE(held.st_mode))
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
