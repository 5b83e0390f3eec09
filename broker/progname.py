"""The command's name as the user runs it, for the prefix of its messages.

The package installs two equal scripts, ``broker`` and ``asin-broker`` (an unrelated PyPI
package also installs a ``broker``, so scripts, units and images use ``asin-broker``): a
message names the one typed. ``python -m broker`` (the README's way round the clash) is
named so; any other way in (a test runner) is ``broker``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["prog"]


def prog() -> str:
    """``asin-broker`` or ``python -m broker`` when run so, else ``broker``."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv else ""
    if invoked in ("broker", "asin-broker"):
        return invoked
    if invoked == "__main__.py":
        return "python -m broker"
    return "broker"
