"""The Broker users import: the engine's broker, plus the embedded simulator when configured.

``api.endpoint = "simulator"`` (the default config) starts the local simulator of both
APIs in-process on a free loopback port, so a fresh clone runs with no credentials. That
composition lives here, above both the engine and the simulator: the engine never imports
the simulator that judges it (the import-layer test keeps it so).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from broker.engine.broker import Broker as EngineBroker
from broker.errors import ConfigError
from broker.models import Query, Secret

if TYPE_CHECKING:
    from broker.config import BrokerConfig, KeyConfig
    from broker.simulator.settings import SimulatorSettings

__all__ = [
    "Broker",
    "Query",
    "check_simulator_key",
    "embedded_secret",
    "simulator_account_hint",
    "simulator_account_secret",
    "simulator_settings",
]


def simulator_settings(config: BrokerConfig) -> SimulatorSettings:
    """The embedded simulator's settings from the config's ``[simulator]`` table.

    Raises:
        ConfigError: naming the key path of an unknown key or a bad value.
    """
    from broker.simulator.settings import SimulatorSettings

    return SimulatorSettings.from_mapping(config.simulator.data, path="simulator")


class Broker(EngineBroker):
    __doc__ = EngineBroker.__doc__

    def _check_composition(self, config: BrokerConfig) -> None:
        # A bad [simulator] table is refused when the broker is built, whatever the
        # endpoint, as check-config refuses it in the file (config never imports the
        # simulator, whose settings these are); read once, for the simulator it starts.
        self._simulator_settings = (
            simulator_settings(config)
            if config.simulator.data or config.api.uses_simulator
            else None
        )
        if config.api.uses_simulator:
            # A key the simulator has no account for is refused here too, not at open:
            # nothing about it changes between the two.
            for key in config.keys:
                check_simulator_key(config, key, self._simulator_settings)

    async def _open_endpoint(self, stack: contextlib.AsyncExitStack) -> str | None:
        if not self.config.api.uses_simulator:
            return await super()._open_endpoint(stack)
        from broker.simulator.server import SimulatorServer

        # On the broker's clock: a FakeClock in a test moves the simulator's time too, so
        # it judges the key's rate on the same timeline the broker paces it on.
        assert self._simulator_settings is not None  # read when the broker was built
        # No grace at close: this broker is its only client and has ended its requests by
        # then; a second Ctrl-C waited 2 s for handlers sleeping out simulated latency.
        server = await stack.enter_async_context(
            SimulatorServer(self._simulator_settings, clock=self._clock, shutdown_timeout_s=0.01)
        )
        return server.url

    def _missing_secret(self, key: KeyConfig) -> Secret:
        return embedded_secret(self.config, key)


def simulator_account_secret(
    config: BrokerConfig, key: KeyConfig, settings: SimulatorSettings | None = None
) -> str | None:
    """The embedded simulator's secret for the key's credential under the config's protocol,
    or None (the endpoint is not the simulator, or it has no such account). ``settings``:
    the config's ``[simulator]`` table already read (else it is read here)."""
    from broker.simulator.accounts import simulator_secret

    if not config.api.uses_simulator:
        return None
    return simulator_secret(
        config.api.protocol.value, key.credential_id, settings or simulator_settings(config)
    )


def simulator_account_hint(config: BrokerConfig, key: KeyConfig) -> str:
    """Which credentials the embedded simulator has for the config's protocol, for a key it
    has no account for (a Creators demo id left in a config switched to PA-API)."""
    from broker.simulator.accounts import simulator_credentials

    protocol = config.api.protocol.value
    settings = simulator_settings(config)
    other = "paapi5" if protocol == "creators" else "creators"
    known = simulator_credentials(protocol, settings)
    hint = (
        f"the simulator's {protocol} accounts are "
        + ", ".join(repr(credential) for credential in known[:4])
        + (", ..." if len(known) > 4 else "")
        if known
        else f"the simulator has no {protocol} account"
    )
    if key.credential_id in simulator_credentials(other, settings):
        hint = f"{key.credential_id!r} is its {other} account; {hint}"
    return hint


def embedded_secret(config: BrokerConfig, key: KeyConfig) -> Secret:
    """The embedded simulator's own secret for a key whose secret variable is unset.

    Raises:
        ConfigError: the endpoint is not the simulator, or the simulator has no account of
            the config's protocol for the key's credential (:func:`check_simulator_key`).
    """
    check_simulator_key(config, key)
    value = simulator_account_secret(config, key)
    if value is None:
        raise ConfigError(
            f"keys[{config.keys.index(key)}]",
            f"no secret for credential {key.credential_id!r}, and the endpoint is not the "
            "embedded simulator",
        )
    return Secret(value)


def check_simulator_key(
    config: BrokerConfig, key: KeyConfig, settings: SimulatorSettings | None = None
) -> None:
    """Refuse a key the embedded simulator has no account for, when it is the endpoint.

    ``api.endpoint = "simulator"`` (the default) sends every request to the in-process
    simulator, which knows its own accounts only. A credential it does not know is a typo,
    a Creators id left in a config switched to PA-API, or a real key in a config never
    pointed at Amazon: the simulator's refusal (``invalid_client``, ``UnrecognizedClient``)
    would then blame credentials that may well be right, so this is said before any request.

    ``settings``: the config's ``[simulator]`` table already read (else it is read here).

    Raises:
        ConfigError: naming the key, the simulator's accounts and the two ways out.
    """
    if not config.api.uses_simulator or simulator_account_secret(config, key, settings) is not None:
        return
    start = (
        f"no secret for credential {key.credential_id!r}, and the embedded simulator has "
        f"no {config.api.protocol.value} account for it"
        if key.secret is None
        else f"credential {key.credential_id!r} is no {config.api.protocol.value} account of "
        'the embedded simulator, where api.endpoint = "simulator" (the default) sends every '
        "request"
    )
    raise ConfigError(
        f"keys[{config.keys.index(key)}]",
        f"{start} ({simulator_account_hint(config, key)}): for Amazon's API set "
        'api.endpoint = "amazon"; for the simulator set credential_id to one of those, or '
        "add the account to [simulator]",
    )
