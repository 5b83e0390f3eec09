"""The local Amazon: a simulator of the Creators API and PA-API 5.0 for tests, demos and benchmarks.

It is an independent judge of the broker's client code (it never imports the engine): token
endpoints, SigV4 verification, per-key quotas, a deterministic catalogue, seeded faults and
counters. Start it in-process with :func:`create_app` or :class:`SimulatorServer`, or from the
command line with ``broker simulate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.lazyimport import lazy_names as _lazy_names

if TYPE_CHECKING:
    from broker.simulator.accounts import DEMO_ACCOUNTS, Account, simulator_secret
    from broker.simulator.app import SIMULATOR_KEY, STATS_KEY, create_app
    from broker.simulator.catalog import CatalogEntry, CatalogItem, lookup
    from broker.simulator.render import render_item
    from broker.simulator.server import SimulatorServer, serve_forever
    from broker.simulator.settings import FaultRates, LatencyProfile, SimulatorSettings
    from broker.simulator.stats import SimulatorStats

__all__ = [
    "DEMO_ACCOUNTS",
    "SIMULATOR_KEY",
    "STATS_KEY",
    "Account",
    "CatalogEntry",
    "CatalogItem",
    "FaultRates",
    "LatencyProfile",
    "SimulatorServer",
    "SimulatorSettings",
    "SimulatorStats",
    "create_app",
    "lookup",
    "render_item",
    "serve_forever",
    "simulator_secret",
]

# Each name imports its module when first asked for: ``broker.simulator.settings`` (which
# the CLI's parser and the config read) stays light, without aiohttp and the server.
_LAZY = {
    "DEMO_ACCOUNTS": "accounts",
    "Account": "accounts",
    "simulator_secret": "accounts",
    "SIMULATOR_KEY": "app",
    "STATS_KEY": "app",
    "create_app": "app",
    "CatalogEntry": "catalog",
    "CatalogItem": "catalog",
    "lookup": "catalog",
    "render_item": "render",
    "SimulatorServer": "server",
    "serve_forever": "server",
    "FaultRates": "settings",
    "LatencyProfile": "settings",
    "SimulatorSettings": "settings",
    "SimulatorStats": "stats",
}

if not TYPE_CHECKING:  # run time only (see broker.lazyimport)
    __getattr__, __dir__ = _lazy_names(
        "broker.simulator",
        {name: f"broker.simulator.{home}" for name, home in _LAZY.items()},
        globals(),
    )
