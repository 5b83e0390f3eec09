"""Overhead: client CPU per GetItems request of the whole pipeline, a bare aiohttp loop, the peer.

The simulator runs with limits off and no added latency, in its own process, so the only
CPU this process spends is the client's. Four clients send the same requests (10 unique
ASINs each, the config's default resources, one key, the same concurrency) in the same run:

- ``pipeline``: ``Broker.stream`` over a generator of unique ASINs, one key with
  ``tps = 1000`` and ``max_in_flight = --concurrency``: validation, deduplication, batching,
  pacing, dispatch, authorization at send time (a cached bearer token, or a fresh SigV4
  signature per request), parsing every item and building one result per ASIN;
- ``pipeline-mem``: the same pipeline with ``[state] backend = "memory"``: the key's
  shared state (slot, daily count, rate) kept in this process instead of a SQLite file
  (this process's own, in a temporary directory: see ``_harness.broker_config``), to show
  what the one SQLite transaction per send costs;
- ``bare``: the transport ceiling: N workers (N = the same concurrency) posting prebuilt
  bodies with prebuilt headers (a bearer token fetched once, or signatures taken before the
  clock starts) on one ``aiohttp.ClientSession`` and reading each body, nothing else;
- ``bare+json``: the same, plus ``json.loads`` of each body, to show how much of the gap is
  only parsing the JSON at all;
- ``bare+parse``: the same, plus the least any client that keeps the broker's result
  contract must do with each answer and nothing more: the dialect's own
  ``parse_get_items`` (orjson, assembly, per-item errors and summaries) and one
  :class:`~broker.models.ItemResult` per ASIN carrying the query that asked it. No
  validation, deduplication, pacing, key state, retries or streaming: the floor under the
  pipeline, so ``pipeline / bare+parse`` is what the engine itself costs;
- ``peer`` (Creators only): python-amazon-paapi 7.1.0's async client, the strongest one users
  have today, pointed at the simulator (``host=``, ``auth_endpoint=``), its throttling off and
  no retries, N tasks sharing one client and asking for the same resources (``_peer.py``).

CPU is ``time.process_time()`` of this process (user + system, every thread) around the
measured requests only, after a warm-up that fetches the token and opens the connections.
Each figure is the median of ``--repeat`` rounds; variants alternate inside a round so a
noisy neighbour hits them alike. Done on uvloop and on the default asyncio loop, for the
Creators API and PA-API 5.0 (SigV4).

Run: ``uv run python benchmarks/overhead.py [--quick] [--requests 2000] [--repeat 5]
[--no-peer]``.
Prints a table to stderr and one JSON line to stdout, and writes the JSON to
``benchmarks/results/overhead.json`` (``overhead-quick.json`` with ``--quick``, so a smoke
run never replaces the figures the README quotes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp
from _harness import (
    MARKETPLACE,
    MAX_IN_FLIGHT,
    Sample,
    SimulatorProcess,
    add_output_arguments,
    asin_stream,
    broker_config,
    floor_results,
    interruptible,
    machine_info,
    measure_stream,
    median_of,
    positive,
    print_table,
    quiet_logging,
    report,
    results_name,
    rotated,
    run_sample,
    start_clock,
    warn_if_busy,
)
from _peer import PEER, peer_client, peer_resources
from amazon_creatorsapi.errors import AmazonCreatorsApiError

from broker.api.base import RawResponse
from broker.api.creators import CreatorsDialect
from broker.api.marketplaces import token_url
from broker.api.oauth import CreatorsTokenCache
from broker.api.paapi5 import PaapiDialect
from broker.api.sigv4 import SigV4Signer
from broker.client import Broker
from broker.clock import LoopClock
from broker.config import DEFAULT_RESOURCES
from broker.engine.transport import AiohttpTransport
from broker.models import Secret, Status

if TYPE_CHECKING:
    from broker.api.base import Dialect, HttpRequest

__all__ = ["main"]

# The simulator's built-in demo keys (README): no secrets of ours involved.
ACCOUNTS: Mapping[str, Mapping[str, object]] = {
    "creators": {
        "name": "demo",
        "protocol": "creators",
        "credential_id": "demo-id",
        "secret": "demo-secret",
        "version": "3.1",
        "partner_tags": {MARKETPLACE: "demo-20"},
    },
    "paapi5": {
        "name": "demo-paapi",
        "protocol": "paapi5",
        "access_key": "DEMOACCESSKEY",
        "secret": "demo-secret-key",
        "partner_tags": {MARKETPLACE: "demo-20"},
    },
}
# Far above what one simulator process serves, so the pacer never holds a request back
# for long; the pipeline still pays for asking it.
PIPELINE_TPS = 1000.0
ITEMS_PER_REQUEST = 10
#: Issue 5: the full pipeline at most this many times the bare loop's CPU per request.
TARGET_RATIO = 1.5


def _chunks(ids: Iterator[str], count: int) -> list[list[str]]:
    return [list(itertools.islice(ids, ITEMS_PER_REQUEST)) for _ in range(count)]


# -- the pipeline ---------------------------------------------------------------------------------


async def _pipeline(
    url: str,
    protocol: str,
    *,
    requests: int,
    warmup: int,
    concurrency: int,
    prefix: str,
    state: str = "local",
) -> Sample:
    config = broker_config(
        url, [ACCOUNTS[protocol]], tps=PIPELINE_TPS, max_in_flight=concurrency, tpd=0
    )
    config = replace(config, state=replace(config.state, backend=state))
    async with Broker(config) as broker:
        # Token fetch, connection pool, first-call code paths: not what we measure.
        await broker.get_items(
            list(itertools.islice(asin_stream(prefix + "W"), warmup * ITEMS_PER_REQUEST))
        )
        ids = itertools.islice(asin_stream(prefix + "M"), requests * ITEMS_PER_REQUEST)
        return await measure_stream(broker, ids)


# -- the bare loop --------------------------------------------------------------------------------


async def _bearer(url: str) -> str:
    account = ACCOUNTS["creators"]
    async with AiohttpTransport() as transport:
        cache = CreatorsTokenCache(
            str(account["credential_id"]),
            Secret(str(account["secret"])),
            str(account["version"]),
            token_url=token_url(str(account["version"]), url),
            send=transport.send,
            clock=LoopClock(),
        )
        return cache.authorization_header(await cache.token())


async def _prebuilt(url: str, protocol: str, batches: list[list[str]]) -> list[HttpRequest]:
    """Authorized requests, identical to what the pipeline sends, built before the clock."""
    account = ACCOUNTS[protocol]
    tag = str(account["partner_tags"][MARKETPLACE])  # type: ignore[index]
    if protocol == "creators":
        dialect = CreatorsDialect(url)
        authorization = await _bearer(url)
        return [
            dialect.get_items_request(
                b, marketplace=MARKETPLACE, partner_tag=tag, resources=DEFAULT_RESOURCES
            ).with_headers({"Authorization": authorization})
            for b in batches
        ]
    paapi = PaapiDialect(url)
    signer = SigV4Signer(str(account["access_key"]), Secret(str(account["secret"])))
    now = dt.datetime.now(dt.UTC)
    region = paapi.signing_region(MARKETPLACE)
    return [
        signer.sign(
            paapi.get_items_request(
                b, marketplace=MARKETPLACE, partner_tag=tag, resources=DEFAULT_RESOURCES
            ),
            region=region,
            now=now,
        )
        for b in batches
    ]


async def _bare(
    url: str,
    protocol: str,
    *,
    requests: int,
    warmup: int,
    concurrency: int,
    prefix: str,
    after: str = "",
) -> Sample:
    """The bare loop; ``after`` is what it does with each body: nothing, "json" or "parse"."""
    ids = asin_stream(prefix)
    warm_ids, timed_ids = _chunks(ids, warmup), _chunks(ids, requests)
    warm = await _prebuilt(url, protocol, warm_ids)
    timed = await _prebuilt(url, protocol, timed_ids)
    dialect: Dialect = CreatorsDialect(url) if protocol == "creators" else PaapiDialect(url)
    # The same connector and timeouts as the broker's transport, so the ceiling is fair.
    connector = aiohttp.TCPConnector(limit=64, limit_per_host=64, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=30.0, connect=10.0, sock_read=30.0)
    failed = 0
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("Content-Type",)
    ) as session:

        async def worker(queue: Iterator[tuple[HttpRequest, list[str]]]) -> None:
            nonlocal failed
            for request, asins in queue:
                # Timed only where the floor needs it (RawResponse.elapsed_s, as the transport
                # does): the plain bare loop stays the ceiling, with nothing added.
                started = time.perf_counter() if after == "parse" else 0.0
                async with session.post(
                    request.url, data=request.body, headers=request.headers
                ) as response:
                    body = await response.read()
                    if response.status != 200:
                        failed += 1
                    if after == "json":
                        json.loads(body)
                    elif after == "parse":
                        raw = RawResponse(
                            response.status,
                            {k.lower(): v for k, v in response.headers.items()},
                            body,
                            time.perf_counter() - started,
                        )
                        results = floor_results(
                            dialect.parse_get_items(raw, asins),
                            MARKETPLACE,
                            DEFAULT_RESOURCES,
                            "bare",
                        )
                        if len(results) != len(asins) or any(
                            r.status is not Status.OK for r in results
                        ):
                            failed += 1

        async def run(batch: list[HttpRequest], asins: list[list[str]]) -> None:
            # One shared iterator: each worker takes the next request when it is free.
            shared = iter(zip(batch, asins, strict=True))
            await asyncio.gather(*(worker(shared) for _ in range(concurrency)))

        await run(warm, warm_ids)
        cpu0, wall0 = start_clock()
        await run(timed, timed_ids)
        cpu1, wall1 = time.process_time(), time.perf_counter()
    return Sample(len(timed), len(timed) * ITEMS_PER_REQUEST, cpu1 - cpu0, wall1 - wall0, failed)


# -- the peer -------------------------------------------------------------------------------------


async def _peer(url: str, *, requests: int, warmup: int, concurrency: int, prefix: str) -> Sample:
    """python-amazon-paapi's async client: one client, N tasks, the same 10-ASIN requests.

    Its throttling is off (0 s between calls) and it makes no retries, so every call is one
    request and a failure shows as one.
    """
    ids = asin_stream(prefix)
    warm, timed = _chunks(ids, warmup), _chunks(ids, requests)
    resources = peer_resources()
    items = failed = 0
    async with peer_client(url, ACCOUNTS["creators"], throttling=0.0, retries=0) as api:

        async def worker(queue: Iterator[list[str]]) -> None:
            nonlocal items, failed
            for chunk in queue:
                try:
                    found = await api.get_items(chunk, resources=resources)
                except AmazonCreatorsApiError:
                    failed += 1
                else:
                    # Not ``items += len(await ...)``: that reads ``items`` before the await.
                    items += len(found)

        async def run(batch: list[list[str]]) -> None:
            shared = iter(batch)
            await asyncio.gather(*(worker(shared) for _ in range(concurrency)))

        # The token, the connections and first-call paths (pydantic's model builds).
        await run(warm)
        items = failed = 0
        cpu0, wall0 = start_clock()
        await run(timed)
        cpu1, wall1 = time.process_time(), time.perf_counter()
    return Sample(len(timed), items, cpu1 - cpu0, wall1 - wall0, failed)


# -- orchestration --------------------------------------------------------------------------------

#: The variants each protocol measures; the peer only speaks the Creators API asynchronously.
VARIANTS: Mapping[str, tuple[str, ...]] = {
    "creators": ("pipeline", "pipeline-mem", "bare", "bare+json", "bare+parse", "peer"),
    "paapi5": ("pipeline", "pipeline-mem", "bare", "bare+json", "bare+parse"),
}


def _factory(
    url: str,
    protocol: str,
    variant: str,
    *,
    requests: int,
    warmup: int,
    concurrency: int,
    prefix: str,
) -> Callable[[], Coroutine[Any, Any, Sample]]:
    def make() -> Coroutine[Any, Any, Sample]:
        if variant in ("pipeline", "pipeline-mem"):
            return _pipeline(
                url,
                protocol,
                requests=requests,
                warmup=warmup,
                concurrency=concurrency,
                prefix=prefix,
                state="memory" if variant == "pipeline-mem" else "local",
            )
        if variant == "peer":
            return _peer(
                url, requests=requests, warmup=warmup, concurrency=concurrency, prefix=prefix
            )
        return _bare(
            url,
            protocol,
            requests=requests,
            warmup=warmup,
            concurrency=concurrency,
            prefix=prefix,
            after=variant.partition("+")[2],
        )

    return make


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 2) if denominator else float("nan")


def _summarise(
    samples: dict[tuple[str, str, str], list[Sample]],
    loops: list[str],
    protocols: list[str],
    variants: Mapping[str, tuple[str, ...]],
) -> tuple[dict[str, dict[str, Any]], list[list[object]]]:
    results: dict[str, dict[str, Any]] = {}
    rows: list[list[object]] = []
    for loop in loops:
        for protocol in protocols:
            entry: dict[str, Any] = {
                v: median_of(samples[(loop, protocol, v)]) for v in variants[protocol]
            }
            pipeline = entry["pipeline"]["cpu_us_per_request"]
            bare = entry["bare"]["cpu_us_per_request"]
            entry["ratio_pipeline_to_bare"] = _ratio(pipeline, bare)
            entry["ratio_pipeline_to_bare_json"] = _ratio(
                pipeline, entry["bare+json"]["cpu_us_per_request"]
            )
            memory = entry["pipeline-mem"]["cpu_us_per_request"]
            entry["ratio_pipeline_mem_to_bare"] = _ratio(memory, bare)
            floor = entry["bare+parse"]["cpu_us_per_request"]
            entry["ratio_bare_parse_to_bare"] = _ratio(floor, bare)
            entry["ratio_pipeline_to_bare_parse"] = _ratio(pipeline, floor)
            entry["met"] = entry["ratio_pipeline_to_bare"] <= TARGET_RATIO
            peer = entry.get("peer")
            if peer is not None:
                entry["ratio_peer_to_bare"] = _ratio(peer["cpu_us_per_request"], bare)
                entry["ratio_peer_to_pipeline"] = _ratio(peer["cpu_us_per_request"], pipeline)
            results[f"{loop}/{protocol}"] = entry
            rows.append(
                [
                    loop,
                    protocol,
                    pipeline,
                    memory,
                    bare,
                    entry["bare+json"]["cpu_us_per_request"],
                    floor,
                    peer["cpu_us_per_request"] if peer else "-",
                    f"{entry['ratio_pipeline_to_bare']:.2f}x",
                    f"{entry['ratio_pipeline_mem_to_bare']:.2f}x",
                    f"{entry['ratio_bare_parse_to_bare']:.2f}x",
                    f"{entry['ratio_pipeline_to_bare_parse']:.2f}x",
                    f"{entry['ratio_peer_to_bare']:.2f}x" if peer else "-",
                    entry["pipeline"]["requests_per_s"],
                    entry["bare"]["requests_per_s"],
                    peer["requests_per_s"] if peer else "-",
                    "met" if entry["met"] else "MISSED",
                ]
            )
    return results, rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 requests, 1 round (CI smoke)")
    parser.add_argument(
        "--requests", type=positive(int), help="measured requests per sample (2000)"
    )
    parser.add_argument("--repeat", type=positive(int), help="rounds; figures are medians (5)")
    parser.add_argument(
        "--concurrency",
        type=positive(int, most=MAX_IN_FLIGHT),
        default=16,
        help="requests in flight (the key's max_in_flight)",
    )
    parser.add_argument(
        "--loop",
        action="append",
        choices=("uvloop", "asyncio"),
        help="event loops to measure (default both)",
    )
    parser.add_argument(
        "--protocol",
        action="append",
        choices=tuple(ACCOUNTS),
        help="protocols to measure (default both)",
    )
    parser.add_argument("--no-peer", action="store_true", help="leave the peer out")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    requests = args.requests or (300 if args.quick else 2000)
    repeat = args.repeat or (1 if args.quick else 5)
    warmup = max(20, requests // 20)
    loops = args.loop or ["uvloop", "asyncio"]
    protocols = args.protocol or list(ACCOUNTS)
    variants = {
        p: tuple(v for v in VARIANTS[p] if not (args.no_peer and v == "peer")) for p in protocols
    }
    quiet_logging()
    warn_if_busy()

    samples: dict[tuple[str, str, str], list[Sample]] = {}
    settings = {"seed": 3, "limits": False}
    started = time.perf_counter()
    with SimulatorProcess(settings) as sim:
        serial = itertools.count()
        for round_no in range(repeat):
            for loop in loops:
                for protocol in protocols:
                    for variant in rotated(variants[protocol], round_no):
                        # A fresh ASIN prefix per sample: nothing is answered twice.
                        prefix = "B" + format(next(serial), "03X")
                        factory = _factory(
                            sim.url,
                            protocol,
                            variant,
                            requests=requests,
                            warmup=warmup,
                            concurrency=args.concurrency,
                            prefix=prefix,
                        )
                        sample = run_sample(loop, factory)
                        samples.setdefault((loop, protocol, variant), []).append(sample)
                        print(
                            f"round {round_no + 1}/{repeat} {loop:7} {protocol:8} "
                            f"{variant:12} {sample.cpu_us_per_request:8.1f} us/request "
                            f"{sample.requests_per_s:7.1f} req/s",
                            file=sys.stderr,
                            flush=True,
                        )

    results, rows = _summarise(samples, loops, protocols, variants)
    print_table(
        [
            "loop",
            "protocol",
            "pipeline us/req",
            "mem-state us/req",
            "bare us/req",
            "bare+json us/req",
            "bare+parse us/req",
            "peer us/req",
            "pipeline/bare",
            "mem-state/bare",
            "bare+parse/bare",
            "pipeline/bare+parse",
            "peer/bare",
            "pipeline req/s",
            "bare req/s",
            "peer req/s",
            f"<= {TARGET_RATIO}x",
        ],
        rows,
    )
    line = {
        "benchmark": "overhead",
        "machine": machine_info(),
        "wall_s": round(time.perf_counter() - started, 1),
        "settings": {
            "quick": args.quick,
            "requests": requests,
            "warmup_requests": warmup,
            "repeat": repeat,
            "concurrency": args.concurrency,
            "items_per_request": ITEMS_PER_REQUEST,
            "pipeline_tps": PIPELINE_TPS,
            "resources": list(DEFAULT_RESOURCES),
            "target_ratio": TARGET_RATIO,
            "peer": None if args.no_peer else PEER,
        },
        "results": results,
    }
    report(args, results_name("overhead", args.quick), line)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
