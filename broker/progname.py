"""The command's name as the user runs it, for the prefix of its messages.

The package installs two equal scripts, ``broker`` and ``asin-broker`` (an unrelated PyPI
package also installs a ``broker``, so scripts, units and images use ``asin-broker``): a
message names the one typed. Any other way in (``python -m broker``, a test runner) is
``broker``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["prog"]


def prog() -> str:
    """``asin-broker`` when run as that script, else ``broker``."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv else ""
    return invoked if invoked in ("broker", "asin-broker") else "broker"
