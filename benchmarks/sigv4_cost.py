"""SigV4 cost: CPU per PA-API request of signing it, ours beside botocore's.

Both sign the same GetItems request (its headers, its 10-ASIN body) for the same key and
region: ``SigV4Signer.sign`` as the engine calls it at dispatch time (the day's signing key
derived once and kept), and botocore's ``SigV4Auth.add_auth`` on an ``AWSRequest`` built
for it, as a client built on botocore signs (the request's build is part of it there).
Each figure is the median of ``--repeat`` rounds of ``--requests`` signatures, CPU time.

Run: ``uv run python benchmarks/sigv4_cost.py [--quick] [--requests 5000] [--repeat 5]``.
Prints a table to stderr and one JSON line to stdout, and writes
``benchmarks/results/sigv4_cost.json`` (``sigv4_cost-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from datetime import UTC, datetime

from _harness import (
    MARKETPLACE,
    add_output_arguments,
    cpu_rounds_us,
    interruptible,
    machine_info,
    positive,
    print_table,
    report,
    results_name,
    warn_if_busy,
)
from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from broker.api.paapi5 import PaapiDialect
from broker.api.sigv4 import SigV4Signer
from broker.models import Secret

ACCESS_KEY = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret
REGION = "us-east-1"
SERVICE = "ProductAdvertisingAPI"


def _per_request_us(sign: Callable[[], object], requests: int, repeat: int) -> list[float]:
    """CPU microseconds per signature of each round."""
    sign()  # first-call paths (the day's signing key) are not what is measured

    def signing() -> None:
        for _ in range(requests):
            sign()

    return cpu_rounds_us(signing, requests, repeat)


def main(argv: list[str] | None = None) -> int:
    """Measure both signers and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 signatures, 2 rounds")
    parser.add_argument("--requests", type=positive(int), default=5000)
    parser.add_argument("--repeat", type=positive(int), default=5)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    warn_if_busy()
    requests, repeat = (
        (min(args.requests, 500), min(args.repeat, 2))
        if args.quick
        else (args.requests, args.repeat)
    )
    request = PaapiDialect().get_items_request(
        [f"B{i:09d}" for i in range(10)],
        marketplace=MARKETPLACE,
        partner_tag="demo-20",
        resources=("ItemInfo.Title", "OffersV2.Listings.Price"),
    )
    now = datetime.now(UTC)
    ours = SigV4Signer(ACCESS_KEY, Secret(SECRET))
    credentials = Credentials(ACCESS_KEY, SECRET)

    def sign_ours() -> object:
        return ours.sign(request, region=REGION, now=now)

    def sign_botocore() -> object:
        built = AWSRequest(
            method=request.method, url=request.url, data=request.body, headers=dict(request.headers)
        )
        SigV4Auth(credentials, SERVICE, REGION).add_auth(built)
        return built

    figures = {
        name: _per_request_us(sign, requests, repeat)
        for name, sign in (("asin-broker", sign_ours), ("botocore", sign_botocore))
    }
    medians = {name: round(statistics.median(rounds), 2) for name, rounds in figures.items()}
    print_table(
        ["signer", "us/request", "rounds"],
        [
            [name, medians[name], " ".join(f"{r:.2f}" for r in rounds)]
            for name, rounds in figures.items()
        ],
    )
    body: dict[str, object] = {
        "benchmark": "sigv4_cost",
        "unit": "CPU microseconds per signed request (median of rounds)",
        "quick": args.quick,
        "requests": requests,
        "repeat": repeat,
        "us_per_request": medians,
        "rounds": {name: [round(r, 3) for r in rounds] for name, rounds in figures.items()},
        "botocore_to_ours": round(medians["botocore"] / medians["asin-broker"], 2),
        "machine": machine_info(),
    }
    report(args, results_name("sigv4_cost", args.quick), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(interruptible(main))
