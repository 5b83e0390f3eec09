"""The import layers, read from the source: who may import whom.

Bottom: models, errors, clock, asin, listener, redisfaults, termwidth, lazyimport, wholefile,
jsontext (and logs, testing). ``api/`` holds Amazon's wire formats; ``state/`` and ``cache/``
the stores; ``engine/`` the pipeline; ``client``, ``jobs/``, ``bench`` and ``cli`` compose
them on top. ``simulator/`` stands beside the client: it may use the bottom layer and the
pure wire functions of ``api/`` (SigV4, marketplaces), never the engine or the broker's
config, so it judges the client independently.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "broker"

#: (module prefix, imports it must never make)
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("broker.models", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.errors", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.clock", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.asin", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.listener", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.redisfaults", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.termwidth", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.lazyimport", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.wholefile", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    ("broker.jsontext", ("broker.api", "broker.engine", "broker.jobs", "broker.simulator")),
    (
        "broker.api",
        ("broker.engine", "broker.jobs", "broker.cli", "broker.simulator", "broker.client"),
    ),
    ("broker.engine", ("broker.jobs", "broker.cli", "broker.simulator", "broker.client")),
    ("broker.state", ("broker.engine", "broker.jobs", "broker.cli", "broker.simulator")),
    ("broker.cache", ("broker.engine", "broker.jobs", "broker.cli", "broker.simulator")),
    ("broker.config", ("broker.simulator", "broker.engine", "broker.jobs")),
    (
        "broker.simulator",
        ("broker.engine", "broker.jobs", "broker.client", "broker.cli", "broker.config"),
    ),
]


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (type-checking blocks included)."""
    source = path.read_text(encoding="utf-8")
    # No garbage collection inside the parse: on Python 3.11 a finalizer it runs (an
    # earlier test's task whose error nobody read, logged with a traceback, which parses
    # source too) breaks the parser's depth count ("AST constructor recursion depth
    # mismatch"), and this test failed for another's leak.
    enabled = gc.isenabled()
    gc.disable()
    try:
        tree = ast.parse(source)
    finally:
        if enabled:
            gc.enable()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _violations(prefix: str, banned: tuple[str, ...]) -> list[str]:
    found = []
    for name, path in _modules():
        if name != prefix and not name.startswith(prefix + "."):
            continue
        for imported in sorted(_imports(name, path)):
            if any(imported == b or imported.startswith(b + ".") for b in banned):
                found.append(f"{name} imports {imported}")
    return found


@pytest.mark.parametrize(("prefix", "banned"), RULES, ids=[rule[0] for rule in RULES])
def test_layer_rule(prefix: str, banned: tuple[str, ...]) -> None:
    """Each layer imports only from the layers below it (and the simulator stays apart)."""
    assert _violations(prefix, banned) == []


def test_rules_cover_every_package() -> None:
    """Every subpackage of broker/ is named by a rule or is a top-layer composer."""
    top = {"broker.jobs", "broker.client", "broker.cli", "broker.bench", "broker.testing"}
    ruled = {prefix for prefix, _ in RULES}
    packages = {
        name for name, path in _modules() if path.name == "__init__.py" and name != "broker"
    }
    assert packages <= ruled | top, packages - ruled - top


def test_the_reader_sees_imports() -> None:
    """The import reader finds absolute, relative and type-checking imports."""
    engine = PACKAGE / "engine" / "broker.py"
    found = _imports("broker.engine.broker", engine)
    assert "broker.engine.intake" in found
    assert "broker.engine.quota" in found  # imported only under TYPE_CHECKING


def test_library_code_logs_through_broker_logs() -> None:
    """Library modules take their logger from broker.logs (stdlib logging), never stdout."""
    offenders = [
        name
        for name, path in _modules()
        if name != "broker.logs" and "structlog.get_logger(" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []
