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

__all__ = [
    "copies_of",
    "copy_for",
    "give_attributes",
    "held_attributes",
    "keep_attributes",
    "original_of",
    "write_whole",
]


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
    check and the write had it written through). An existing file keeps its mode and group
    (:func:`keep_attributes`). The copy has a name of its own (:func:`copy_for`).
    """
    follow = through_links and path.is_symlink()
    target = Path(os.path.realpath(path)) if follow else path
    temporary = copy_for(target)
    try:
        with temporary.open("w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        keep_attributes(temporary, target, follow_symlinks=through_links)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def keep_attributes(copy: Path, original: Path, *, follow_symlinks: bool = True) -> None:
    """Give ``copy``, about to replace ``original``, the mode and group ``original`` has.

    A file replaced by a new one takes the new one's mode and group, those a new file gets:
    a user's ``chmod 600`` or ``chgrp`` of it was undone by the next rewrite. Nothing is
    done when ``original`` is no regular file (or none).
    """
    give_attributes(copy, held_attributes(original, follow_symlinks=follow_symlinks))


def held_attributes(path: Path, *, follow_symlinks: bool = True) -> os.stat_result | None:
    """What :func:`give_attributes` keeps of ``path``, read before it is removed (None: no
    regular file there)."""
    try:
        held = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return None
    return held if stat.S_ISREG(held.st_mode) else None


def give_attributes(path: Path, held: os.stat_result | None) -> None:
    """Give ``path`` the mode and group of the file ``held`` describes (None: none).

    The group only where this user may set it (a group it belongs to; root, any): else the
    file keeps its own, as ``cp -p`` does for a user who may not. The group goes first, as
    changing it clears the set-group-ID bit.
    """
    if held is None:
        return
    now = os.stat(path)
    if now.st_gid != held.st_gid:
        with contextlib.suppress(PermissionError):
            os.chown(path, -1, held.st_gid)
            now = os.stat(path)
    # Not when it is right already (and the group kept the set-group-ID bit): a file
    # system that refuses chmod (vfat, CIFS) made every rewrite fail.
    if stat.S_IMODE(now.st_mode) != stat.S_IMODE(held.st_mode):
        os.chmod(path, stat.S_IMODE(held.st_mode))
