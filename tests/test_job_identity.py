"""A job's rows get the answers to their own queries, whatever the completion order (K9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import embedded_toml

from broker import cli

_CONFIG = embedded_toml(
    tps=200.0,
    engine="linger_s = 0.005",
    simulator="""seed = 11

[simulator.latency]
fixed_ms = 5
exp_mean_ms = 10

[[simulator.accounts]]
name = "demo"
protocol = "creators"
credential_id = "demo-id"
secret = "demo-secret"
version = "3.1"
partner_tags = { "www.amazon.com" = "demo-20" }
tps = 1000.0
tpd = 10000000""",
)


@pytest.fixture(autouse=True)
def _no_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASINB_DEMO_SECRET", raising=False)


def test_every_row_carries_the_item_for_its_own_resources(tmp_path: Path) -> None:
    """Every ASIN asked under two resource lists, latency and jitter on: no row swapped."""
    config = tmp_path / "config.toml"
    config.write_text(_CONFIG)
    job = tmp_path / "job.jsonl"
    lines = []
    for i in range(80):
        asin = f"B0{i:08d}"
        lines.append(json.dumps({"asin": asin, "resources": ["itemInfo.title"]}))
        lines.append(json.dumps({"asin": asin, "resources": ["offersV2.listings.price"]}))
    job.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    code = cli.main(
        ["run", str(job), "--out", str(out), "--config", str(config), "--progress", "none"]
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 160
    for row in rows:
        asked = "itemInfo" if row["line"] % 2 == 1 else "offersV2"
        got = [k for k in ("itemInfo", "offersV2") if row["item"].get(k) is not None]
        assert got == [asked], row["line"]
