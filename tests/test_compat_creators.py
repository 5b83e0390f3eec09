"""Clients nobody here wrote, pointed at the simulator: python-amazon-paapi 7.1.0, sync and async.

The sync ``AmazonCreatorsApi`` runs on Amazon's bundled Creators SDK (urllib3 + requests) in a
worker thread; the async ``AsyncAmazonCreatorsApi`` has its own httpx transport and runs in the
test's loop beside the simulator. Both must fetch items and raise their documented exceptions
for a throttled key, an expired token and an ineligible account.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import pytest
from amazon_creatorsapi import AmazonCreatorsApi
from amazon_creatorsapi.aio import AsyncAmazonCreatorsApi
from amazon_creatorsapi.errors import (
    AccessDeniedError,
    AuthenticationError,
    ItemsNotFoundError,
    TooManyRequestsError,
)

from broker.simulator.accounts import DEMO_ACCOUNTS, Account
from broker.simulator.catalog import lookup
from broker.simulator.server import SimulatorServer
from broker.simulator.settings import FaultRates, SimulatorSettings
from broker.testing import FakeClock

ITEMS = [f"B0{i:08d}" for i in range(12)]


@dataclass(frozen=True)
class Key:
    """One Creators credential as the client is configured with it."""

    account: Account
    path: str

    @property
    def version(self) -> str:
        return self.account.version


KEYS = [
    pytest.param(Key(DEMO_ACCOUNTS[0], "/auth/o2/token"), id="v3.1-lwa"),
    pytest.param(Key(DEMO_ACCOUNTS[1], "/oauth2/token"), id="v2.1-cognito"),
]


def _kwargs(server: SimulatorServer, key: Key) -> dict[str, object]:
    return {
        "credential_id": key.account.credential_id,
        "credential_secret": key.account.secret,
        "version": key.version,
        "tag": "demo-20",
        "marketplace": "www.amazon.com",
        "throttling": 0,
        "retries": 0,
        "host": server.url,
        "auth_endpoint": server.url + key.path,
    }


@asynccontextmanager
async def _simulator(
    settings: SimulatorSettings, clock: FakeClock | None = None
) -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(settings, clock=clock) as server:
        yield server


async def _sync_get(
    server: SimulatorServer, key: Key, items: list[str], **overrides: object
) -> list[str | None]:
    def call() -> list[str | None]:
        with AmazonCreatorsApi(**{**_kwargs(server, key), **overrides}) as api:  # type: ignore[arg-type]
            return [item.asin for item in api.get_items(items)]

    return await asyncio.to_thread(call)


async def _async_get(
    server: SimulatorServer, key: Key, items: list[str], **overrides: object
) -> list[str | None]:
    async with AsyncAmazonCreatorsApi(**{**_kwargs(server, key), **overrides}) as api:  # type: ignore[arg-type]
        return [item.asin for item in await api.get_items(items)]


CLIENTS = [pytest.param(_sync_get, id="sync"), pytest.param(_async_get, id="async")]


@pytest.mark.parametrize("get", CLIENTS)
@pytest.mark.parametrize("key", KEYS)
async def test_fetches_items(get, key: Key) -> None:  # type: ignore[no-untyped-def]
    """Both clients get a token, fetch 12 ASINs in two calls with every resource, in order."""
    settings = SimulatorSettings(limits=False, missing_share=0.1)
    async with _simulator(settings) as server:
        asins = await get(server, key, ITEMS)
        expected = [a for a in ITEMS if lookup(settings, "www.amazon.com", a).status == "ok"]
        assert asins == expected
        stats = server.stats.accounts[key.account.name]
        assert stats.accepted == 2
        assert stats.items_served == len(expected)


async def test_items_carry_prices_and_links() -> None:
    """The SDK models parse offersV2 prices, images and the tagged detail page URL."""
    async with _simulator(SimulatorSettings(limits=False)) as server:
        key = Key(DEMO_ACCOUNTS[0], "/auth/o2/token")

        def call() -> object:
            with AmazonCreatorsApi(**_kwargs(server, key)) as api:  # type: ignore[arg-type]
                return api.get_items(["B000TEST01"])[0]

        item = await asyncio.to_thread(call)
        listing = item.offers_v2.listings[0]  # type: ignore[attr-defined]
        assert listing.price.money.currency == "USD"
        assert item.images.primary.hi_res.url.startswith("https://")  # type: ignore[attr-defined]
        assert item.detail_page_url.endswith("?tag=demo-20&linkCode=ogi&th=1&psc=1")  # type: ignore[attr-defined]


@pytest.mark.parametrize("get", CLIENTS)
@pytest.mark.parametrize("key", KEYS)
async def test_throttled_key(get, key: Key) -> None:  # type: ignore[no-untyped-def]
    """Over the key's rate both clients raise TooManyRequestsError (after honouring Retry-After)."""
    clock = FakeClock()
    slow = replace(key.account, tps=1.0)
    settings = SimulatorSettings(accounts=(slow,), retry_after="both", retry_after_s=0)
    async with _simulator(settings, clock) as server:
        assert await get(server, key, ITEMS[:10]) == ITEMS[:10]
        with pytest.raises(TooManyRequestsError):
            await get(server, key, ITEMS[:10], retries=2)
        stats = server.stats.accounts[key.account.name]
        assert (stats.accepted, stats.throttled) == (1, 3)


@pytest.mark.parametrize("get", CLIENTS)
@pytest.mark.parametrize("key", KEYS)
async def test_expired_token_is_refreshed(get, key: Key) -> None:  # type: ignore[no-untyped-def]
    """A token that expired on the server's clock gets 401 TokenExpired; clients refresh once."""
    clock = FakeClock()
    settings = SimulatorSettings(limits=False)
    async with _simulator(settings, clock) as server:
        if get is _sync_get:

            def twice() -> tuple[list[str | None], list[str | None]]:
                with AmazonCreatorsApi(**_kwargs(server, key)) as api:  # type: ignore[arg-type]
                    first = [i.asin for i in api.get_items(ITEMS[:2])]
                    asyncio.run_coroutine_threadsafe(clock.advance(3601), loop).result()
                    return first, [i.asin for i in api.get_items(ITEMS[:2])]

            loop = asyncio.get_running_loop()
            first, second = await asyncio.to_thread(twice)
        else:
            async with AsyncAmazonCreatorsApi(**_kwargs(server, key)) as api:  # type: ignore[arg-type]
                first = [i.asin for i in await api.get_items(ITEMS[:2])]
                await clock.advance(3601)
                second = [i.asin for i in await api.get_items(ITEMS[:2])]
        assert first == second == ITEMS[:2]
        assert server.stats.accounts[key.account.name].errors["TokenExpired"] == 1


@pytest.mark.parametrize("get", CLIENTS)
@pytest.mark.parametrize("key", KEYS)
async def test_expired_token_keeps_failing(get, key: Key) -> None:  # type: ignore[no-untyped-def]
    """When even a fresh token is answered TokenExpired, both clients raise AuthenticationError."""
    settings = SimulatorSettings(limits=False, faults=FaultRates(expired_token=1.0))
    async with _simulator(settings) as server:
        with pytest.raises(AuthenticationError, match="TokenExpired"):
            await get(server, key, ITEMS[:1])
        assert server.stats.faults["expired_token"] == 2


@pytest.mark.parametrize("get", CLIENTS)
@pytest.mark.parametrize("key", KEYS)
async def test_ineligible_account(get, key: Key) -> None:  # type: ignore[no-untyped-def]
    """An account that is not eligible makes both clients raise AccessDeniedError."""
    poor = replace(key.account, not_eligible=True)
    async with _simulator(SimulatorSettings(accounts=(poor,))) as server:
        with pytest.raises(AccessDeniedError, match="AssociateNotEligible"):
            await get(server, key, ITEMS[:1])


@pytest.mark.parametrize("get", CLIENTS)
async def test_wrong_secret(get) -> None:  # type: ignore[no-untyped-def]
    """A wrong credential secret fails at the token endpoint with AuthenticationError."""
    async with _simulator(SimulatorSettings()) as server:
        key = Key(DEMO_ACCOUNTS[0], "/auth/o2/token")
        with pytest.raises(AuthenticationError, match="invalid_client"):
            await get(server, key, ITEMS[:1], credential_secret="nope")


@pytest.mark.parametrize("get", CLIENTS)
async def test_all_unknown_items(get) -> None:  # type: ignore[no-untyped-def]
    """When no requested item exists both clients raise ItemsNotFoundError (from the 404)."""
    async with _simulator(SimulatorSettings(missing_share=1.0)) as server:
        key = Key(DEMO_ACCOUNTS[0], "/auth/o2/token")
        with pytest.raises(ItemsNotFoundError):
            await get(server, key, ITEMS[:3])
