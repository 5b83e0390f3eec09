"""Engine cost: client CPU per GetItems request and per ASIN, with the network taken out.

``overhead.py`` measures the whole client against the simulator in another process; its
figures move by a fifth or more from round to round with the machine (the kernel's and
aiohttp's work between two answers, the state of the caches, the simulator's pace). This
script answers every request inside the process instead: a
:class:`~broker.engine.transport.MockTransport` returns, at once, the body the simulator
renders for exactly the ASINs asked (``render.item_json``, made before the clock starts), so
the CPU left is the engine's, the dialect's parse and the event loop's. Three clients, the
Creators API, one key, alternating inside each round:

- ``engine-10``: ``Broker.stream`` over unique ASINs, ``batch_size`` 10, one key at
  ``tps = 1000`` (the config's ceiling) with ``max_in_flight = --concurrency``, the key's
  state in memory. Answers come back at once, so the pacer sets the pace here (1,000
  requests a second) and holds back nearly every send: the figures include its wake-ups,
  which the pipeline in ``overhead.py`` (held to about 500 requests a second by the
  simulator) pays less often;
- ``engine-1``: the same with ``batch_size`` 1: one ASIN per request;
- ``floor``: the same 10-ASIN bodies through the dialect's ``parse_get_items`` and one
  :class:`~broker.models.ItemResult` per ASIN with its query, in a plain loop: the least any
  client that keeps the result contract does.

A request of ``b`` ASINs costs ``R + b * A``, so the two engine runs split the engine's CPU
into a part per request ``R`` (dispatch, pacing, the send task, authorization, the event
loop's wake-ups) and a part per ASIN ``A`` (validation, deduplication, batching, parsing,
the result and its delivery)::

    A = (cost(10) - cost(1)) / 9        R = cost(1) - A

``A`` minus the floor's cost per ASIN is what the engine's own bookkeeping costs per ASIN.

Run: ``uv run python benchmarks/engine_cost.py [--quick] [--requests 2000] [--repeat 5]``.
Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/engine_cost.json`` (``engine_cost-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pickle
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from _harness import (
    MARKETPLACE,
    MAX_IN_FLIGHT,
    Sample,
    add_output_arguments,
    asin_stream,
    broker_config,
    creators_account,
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

from broker.api.base import HttpRequest, RawResponse
from broker.api.creators import CreatorsDialect
from broker.api.resources import resolve_resources
from broker.client import Broker
from broker.config import DEFAULT_RESOURCES
from broker.engine.transport import MockTransport
from broker.models import Protocol, Status
from broker.simulator.render import forget_rendered, item_json, resources_key
from broker.simulator.settings import SimulatorSettings

__all__ = ["main"]

#: Never dialled: the mock transport answers every request.
URL = "http://127.0.0.1:9"
#: The config's ceiling, as in overhead.py: the pacer holds each send back up to 1 ms.
TPS = 1000.0
ITEMS_PER_REQUEST = 10
TOKEN_BODY = b'{"access_token":"engine-cost-token","token_type":"bearer","expires_in":3600}'
HEADERS = {"content-type": "application/json"}


class Answers:
    """The simulator's GetItems bodies for known batches, rendered before the clock starts.

    The mock transport finds a body by the exact request body the engine sends, so a
    request the engine batched differently from what was prepared (it never should: one key,
    ASINs in input order) is counted in ``unprepared`` and answered by rendering on the spot.
    """

    def __init__(self) -> None:
        account = creators_account(0, tps=TPS)
        self.partner_tag = str(account["partner_tags"][MARKETPLACE])  # type: ignore[index]
        self.resources = resolve_resources(DEFAULT_RESOURCES, Protocol.CREATORS)
        self._dialect = CreatorsDialect(URL)
        self._settings = SimulatorSettings(seed=3, missing_share=0.0, inaccessible_share=0.0)
        self._key = resources_key(self.resources, "creators")
        self._bodies: dict[bytes, bytes] = {}
        self._by_asins: dict[tuple[str, ...], bytes] = {}
        self.items_url = self.request(["B000000000"]).url
        self.unprepared = 0
        self._loaded = False

    def request(self, asins: Sequence[str]) -> HttpRequest:
        """The GetItems request the engine builds for ``asins``."""
        return self._dialect.get_items_request(
            asins, marketplace=MARKETPLACE, partner_tag=self.partner_tag, resources=self.resources
        )

    def body(self, asins: Sequence[str]) -> bytes:
        """The simulator's answer to a GetItems request for ``asins``."""
        items = []
        for asin in asins:
            text = item_json(
                self._settings, MARKETPLACE, asin, self._key, self.partner_tag, "creators"
            )
            assert text is not None, "missing_share is 0: every item is served"
            items.append(text)
        return ('{"itemsResult":{"items":[' + ",".join(items) + "]}}").encode()

    def prepare(self, batches: Sequence[Sequence[str]]) -> None:
        """Render the answers of ``batches`` now, outside the measured time.

        Nothing is done for answers read by :meth:`load`: they were all prepared already.
        """
        if self._loaded:
            return
        for asins in batches:
            body = self.body(asins)
            self._bodies[self.request(asins).body] = body
            self._by_asins[tuple(asins)] = body
        # The simulator keeps the items it rendered, and their JSON (up to 16,384 of
        # each): in this process they would only grow the heap each collection of the
        # interpreter's cyclic garbage collector walks, and the rounds would grow dearer.
        forget_rendered()

    def clear(self) -> None:
        """Forget the prepared answers (a round's bodies are not needed again)."""
        if not self._loaded:
            self._bodies.clear()
            self._by_asins.clear()

    def save(self, path: Path) -> None:
        """Write the prepared answers to ``path``, for :meth:`load` in another process."""
        path.write_bytes(pickle.dumps((self._bodies, self._by_asins)))

    def load(self, path: Path) -> None:
        """Read answers :meth:`save` wrote; :meth:`prepare` and :meth:`clear` then do nothing."""
        # A pickle this script wrote itself, in a temporary directory of its own.
        bodies, by_asins = pickle.loads(path.read_bytes())
        self._bodies.update(bodies)
        self._by_asins.update(by_asins)
        self._loaded = True

    def answer(self, asins: Sequence[str]) -> bytes:
        """The prepared answer for ``asins`` (rendered now, and counted, if there is none).

        Found by the ASINs, not by a request built for them: the floor builds no request.
        """
        body = self._by_asins.get(tuple(asins))
        if body is None:
            self.unprepared += 1
            body = self.body(asins)
        return body

    async def handle(self, request: HttpRequest) -> RawResponse:
        """The mock transport's handler: a token, or the prepared GetItems answer."""
        if request.url != self.items_url:
            return RawResponse(200, HEADERS, TOKEN_BODY, 0.001)
        body = self._bodies.get(request.body)
        if body is None:
            self.unprepared += 1
            body = self.body(json.loads(request.body)["itemIds"])
        return RawResponse(200, HEADERS, body, 0.001)


def warm_count(requests: int) -> int:
    """How many 10-ASIN requests warm an engine client up before a run of ``requests``."""
    return max(20, requests // 20)


def _chunks(ids: Iterator[str], count: int, size: int) -> list[list[str]]:
    return [list(itertools.islice(ids, size)) for _ in range(count)]


def batches(prefix: str, requests: int, batch_size: int) -> tuple[list[list[str]], list[list[str]]]:
    """The ASINs a run asks: its warm-up requests (10 each) and its measured ones."""
    warm = _chunks(asin_stream(prefix + "W"), warm_count(requests), ITEMS_PER_REQUEST)
    return warm, _chunks(asin_stream(prefix + "M"), requests, batch_size)


async def _engine(
    answers: Answers, *, batch_size: int, requests: int, concurrency: int, prefix: str
) -> Sample:
    account = creators_account(0, tps=TPS)
    config = broker_config(
        URL,
        [account],
        tps=TPS,
        max_in_flight=concurrency,
        engine={"batch_size": batch_size},
    )
    config = replace(config, state=replace(config.state, backend="memory"))
    warm, timed = batches(prefix, requests, batch_size)
    answers.prepare([c[i : i + batch_size] for c in warm for i in range(0, len(c), batch_size)])
    answers.prepare(timed)
    async with Broker(config, transport=MockTransport(answers.handle)) as broker:
        # The token, first-call code paths: not what is measured.
        await broker.get_items([asin for chunk in warm for asin in chunk])
        sample = await measure_stream(broker, (asin for chunk in timed for asin in chunk))
    answers.clear()
    return sample


async def _floor(answers: Answers, *, requests: int, prefix: str) -> Sample:
    _, timed = batches(prefix, requests, ITEMS_PER_REQUEST)
    answers.prepare(timed)
    dialect = CreatorsDialect(URL)
    raws = [RawResponse(200, HEADERS, answers.answer(asins), 0.001) for asins in timed]
    answers.clear()
    failed = items = 0
    cpu0, wall0 = start_clock()
    for raw, asins in zip(raws, timed, strict=True):
        results = floor_results(
            dialect.parse_get_items(raw, asins), MARKETPLACE, answers.resources, "floor"
        )
        items += len(results)
        if len(results) != len(asins) or any(r.status is not Status.OK for r in results):
            failed += 1
    cpu1, wall1 = time.process_time(), time.perf_counter()
    return Sample(len(timed), items, cpu1 - cpu0, wall1 - wall0, failed)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 requests, 1 round (CI smoke)")
    parser.add_argument("--requests", type=positive(int), help="requests per sample (default 2000)")
    parser.add_argument(
        "--repeat", type=positive(int), help="rounds; figures are medians (default 5)"
    )
    parser.add_argument(
        "--concurrency",
        type=positive(int, most=MAX_IN_FLIGHT),
        default=16,
        help="in flight (default 16)",
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    requests = args.requests or (200 if args.quick else 2000)
    repeat = args.repeat or (1 if args.quick else 5)
    quiet_logging()
    warn_if_busy()

    answers = Answers()
    serial = itertools.count()
    clients: dict[str, Callable[..., Coroutine[Any, Any, Sample]]] = {
        f"engine-{size}": functools.partial(
            _engine, answers, batch_size=size, requests=requests, concurrency=args.concurrency
        )
        for size in (ITEMS_PER_REQUEST, 1)
    }
    clients["floor"] = functools.partial(_floor, answers, requests=requests)
    samples: dict[str, list[Sample]] = {name: [] for name in clients}
    started = time.perf_counter()
    for round_no in range(repeat):
        for name in rotated(list(clients), round_no):
            # A fresh ASIN prefix per sample: nothing is answered twice.
            prefix = "E" + format(next(serial), "03X")
            sample = run_sample(args.loop, functools.partial(clients[name], prefix=prefix))
            samples[name].append(sample)
            print(
                f"round {round_no + 1}/{repeat} {name:9} "
                f"{sample.cpu_us_per_request:8.1f} us/request",
                file=sys.stderr,
                flush=True,
            )

    results = {name: median_of(runs) for name, runs in samples.items()}
    ten = results["engine-10"]["cpu_us_per_request"]
    one = results["engine-1"]["cpu_us_per_request"]
    per_asin = (ten - one) / (ITEMS_PER_REQUEST - 1)
    floor_per_asin = results["floor"]["cpu_us_per_request"] / ITEMS_PER_REQUEST
    split = {
        "per_request_us": round(one - per_asin, 1),
        "per_asin_us": round(per_asin, 1),
        "floor_per_asin_us": round(floor_per_asin, 1),
        "engine_per_asin_over_floor_us": round(per_asin - floor_per_asin, 1),
        "engine_10_to_floor": round(ten / results["floor"]["cpu_us_per_request"], 2),
    }
    print_table(
        ["client", "us/request", "rounds", "failed"],
        [
            [
                name,
                f"{r['cpu_us_per_request']:.1f}",
                " ".join(map(str, r["cpu_us_per_request_samples"])),
                r["failed"],
            ]
            for name, r in results.items()
        ],
    )
    print(
        f"per request R = {split['per_request_us']} us, per ASIN A = {split['per_asin_us']} us "
        f"(floor {split['floor_per_asin_us']} us, engine's own "
        f"{split['engine_per_asin_over_floor_us']} us); engine-10 / floor "
        f"{split['engine_10_to_floor']}x; unprepared answers {answers.unprepared}",
        file=sys.stderr,
    )
    line = {
        "benchmark": "engine_cost",
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "requests": requests,
            "repeat": repeat,
            "concurrency": args.concurrency,
            "loop": args.loop,
            "tps": TPS,
            "state": "memory",
            "protocol": "creators",
            "resources": list(DEFAULT_RESOURCES),
        },
        "results": results,
        "split": split,
        "unprepared": answers.unprepared,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report(args, results_name("engine_cost", args.quick), line)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
