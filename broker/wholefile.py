"""Files replaced whole: a reader sees the old content or the new, never a part.

A config that ``broker init --force`` rewrites while a run starts, a spool job's status file
another daemon reads: each is written to a copy beside it, flushed to disk, and renamed over
the old one in one step. A crash or a full disk leaves the old file as it was, and no copy
behind (its space would not come back when the user frees some).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

__all__ = ["write_whole"]


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all.

    A symbolic link stays a link (the file it names is replaced); an existing file keeps
    its mode. The copy has a name of its own, so two processes writing beside each other
    (daemons sharing a spool) never write into one copy.
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
