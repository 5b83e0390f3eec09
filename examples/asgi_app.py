"""A web handler in the FastAPI / Starlette style: a plain ASGI app on the async Broker.

    uv run python examples/asgi_app.py --demo     # answer a few requests in-process and exit
    uvicorn examples.asgi_app:app                 # if you have an ASGI server installed

The broker opens at the ASGI ``lifespan`` startup and closes at shutdown; every request
awaits it directly. With FastAPI the same is::

    @asynccontextmanager
    async def lifespan(app):
        async with Broker.from_config("config.toml") as app.state.broker:
            yield

    @app.get("/item/{asin}")
    async def item(asin: str):
        result = await app.state.broker.get_item(asin)
        ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from broker import Broker

ROOT = Path(__file__).resolve().parent.parent
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class App:
    """GET /item?asin=... answered from one Broker opened for the app's lifetime."""

    def __init__(self, config: str | os.PathLike[str]) -> None:
        self.config = config
        self.broker: Broker | None = None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.broker = Broker.from_config(self.config)
                await self.broker.__aenter__()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.broker is not None:
                    await self.broker.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: dict[str, Any], send: Send) -> None:
        assert self.broker is not None, "the lifespan startup opens the broker"
        query = parse_qs(scope.get("query_string", b"").decode())
        status = 404
        body: dict[str, Any] = {"error": "try /item?asin=B000000001"}
        if scope["path"] == "/item" and "asin" in query:
            result = await self.broker.get_item(query["asin"][0])
            product = result.product
            status = 200 if product is not None else 404
            body = {
                "asin": result.asin,
                "status": result.status.value,
                "title": product.title if product else None,
                "price": product.price.display if product and product.price else None,
            }
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


app = App(os.environ.get("ASINB_CONFIG", ROOT / "config.toml"))


async def demo() -> None:
    """Drive the app as an ASGI server would: startup, two requests, shutdown."""
    lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    running = asyncio.create_task(app({"type": "lifespan"}, lifespan_in.get, lifespan_out.put))
    await lifespan_in.put({"type": "lifespan.startup"})
    print((await lifespan_out.get())["type"])
    for asin in ("B000000001", "nope"):
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/item",
            "query_string": f"asin={asin}".encode(),
        }
        await app(scope, receive, send)
        print(sent[0]["status"], sent[1]["body"].decode())
    await lifespan_in.put({"type": "lifespan.shutdown"})
    print((await lifespan_out.get())["type"])
    await running


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="answer a few requests and exit")
    args = parser.parse_args()
    if not args.demo:
        parser.error("run it under an ASGI server (uvicorn examples.asgi_app:app) or with --demo")
    asyncio.run(demo())
