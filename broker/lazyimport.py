"""Names a package imports only when first asked for (PEP 562's module ``__getattr__``).

``import broker`` and ``import broker.cache`` stay light (no aiohttp, engine, sqlite3 or
threads) for code that needs only the models, the errors or the cache policy, while the
heavier names still import from the package. The hook is for run time only: a package
defines it under ``if not TYPE_CHECKING``, and declares the names for type checkers with
imports under ``if TYPE_CHECKING`` (a hook they saw made every misspelt name an object).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping

__all__ = ["lazy_names"]


def lazy_names(
    package: str, homes: Mapping[str, str], namespace: MutableMapping[str, object]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    ``__getattr__`` imports each name of ``homes`` from its module (``homes[name]``) when
    first asked for, then keeps it in ``namespace`` (the package's globals), so later
    lookups never call the hook. ``__dir__`` lists the names not imported yet too, for an
    editor's or a REPL's completion.
    """

    def attribute(name: str) -> object:
        module = homes.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def names() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return attribute, names
