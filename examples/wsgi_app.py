"""A web handler in the Django / Flask style: a plain WSGI app on one shared SyncBroker.

    uv run python examples/wsgi_app.py            # serve on http://127.0.0.1:8000
    curl 'http://127.0.0.1:8000/item?asin=B000000001'
    uv run python examples/wsgi_app.py --demo     # answer one request in-process and exit

One SyncBroker per process, created on first use and shared by every request thread: they
share its keys, rate limits and batches. In Django the view is the same few lines::

    def item(request, asin):
        result = get_broker().get_item(asin)
        return JsonResponse(item_json(result), status=200 if result.ok else 404)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from broker import BrokerError, ItemResult, Status, SyncBroker
from broker.errors import BadRequestError

ROOT = Path(__file__).resolve().parent.parent
#: How long a request thread waits for its answer (an outage is waited out for minutes).
_TIMEOUT_S = 20.0
#: The answer for an item's status: a failed lookup (Amazon or the way to it failing each
#: retry) is no missing item.
_ITEM_STATUS = {
    Status.OK: "200 OK",
    Status.NOT_FOUND: "404 Not Found",
    Status.INVALID: "404 Not Found",
    Status.FAILED: "503 Service Unavailable",
}
_broker: SyncBroker | None = None
_lock = threading.Lock()


def get_broker() -> SyncBroker:
    """The process's SyncBroker (config from $ASINB_CONFIG, default config.toml)."""
    global _broker
    with _lock:
        if _broker is None:
            _broker = SyncBroker.from_config(os.environ.get("ASINB_CONFIG", ROOT / "config.toml"))
            atexit.register(_broker.close)
        return _broker


def item_json(result: ItemResult) -> dict[str, Any]:
    """What the endpoint answers for one result."""
    product = result.product
    if product is None:
        return {
            "asin": result.asin,
            "status": result.status.value,
            "error": result.error and result.error.to_json(),
        }
    price = product.price
    return {
        "asin": result.asin,
        "status": result.status.value,
        "title": product.title,
        "brand": product.brand,
        "price": price.amount if price else None,
        "currency": price.currency if price else None,
        "image": product.image_url,
        "url": product.detail_page_url,
    }


def application(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    """WSGI entry point: GET /item?asin=... and GET /search?q=..."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    path = environ.get("PATH_INFO", "/")
    status = "404 Not Found"
    body: dict[str, Any] = {"error": "try /item?asin=B000000001 or /search?q=kettle"}
    try:
        if path == "/item" and "asin" in query:
            result = get_broker().get_item(query["asin"][0], timeout=_TIMEOUT_S)
            status = _ITEM_STATUS[result.status]
            body = item_json(result)
        elif path == "/search" and "q" in query:
            found = get_broker().search_items(
                keywords=query["q"][0], item_count=5, timeout=_TIMEOUT_S
            )
            status = "200 OK"
            body = {
                "total": found.total_result_count,
                "items": [{"asin": p.asin, "title": p.title} for p in found.items],
            }
    except ValueError as exc:  # a bad argument, named by the broker before any request
        status, body = "400 Bad Request", {"error": str(exc)}
    except BadRequestError as exc:  # Amazon's answer to the request: NoResults, say
        status = "404 Not Found" if exc.code == "NoResults" else "400 Bad Request"
        body = {"error": exc.code, "message": exc.message}
    except TimeoutError:  # the call's timeout, or requests that timed out each retry
        status, body = "504 Gateway Timeout", {"error": "timeout"}
    except BrokerError as exc:  # no usable key, or failures the retries did not get past
        status, body = "503 Service Unavailable", {"error": type(exc).__name__}
    payload = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    )
    return [payload]


def demo() -> None:
    """Answer a few requests in-process, as a server would, and print them."""
    for path, query in (
        ("/item", "asin=B000000001"),
        ("/search", "q=kettle"),
        ("/search", "q=noresults+please"),  # the simulator finds nothing for it
        ("/item", "asin=nope"),
    ):
        captured: list[str] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], seen: list[str] = captured
        ) -> None:
            seen.append(status)

        environ = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
        body = application(environ, start_response)
        print(captured[0], b"".join(body).decode())
    get_broker().close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="answer a few requests and exit")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.demo:
        demo()
    else:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIServer, make_server

        class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
            """A request thread each, as Django's runserver and gunicorn's threads give:
            wsgiref's own server answers one request at a time."""

            daemon_threads = True

        with make_server(
            "127.0.0.1", args.port, application, server_class=ThreadingWSGIServer
        ) as server:
            print(f"serving on http://127.0.0.1:{args.port}/item?asin=B000000001")
            server.serve_forever()
