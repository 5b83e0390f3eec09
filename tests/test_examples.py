"""The scripts in examples/ run against the embedded simulator and print what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def _run(script: str, *args: str) -> list[str]:
    """Run ``examples/<script>`` from the project root; return its output lines (logs aside)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if "broker.started" not in line]


def test_every_example_is_tested() -> None:
    """Each script in examples/ has a test here."""
    tested = {"async_bulk.py", "sync_lookup.py", "search.py", "wsgi_app.py", "asgi_app.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_async_bulk() -> None:
    """The example job: one result per input, typed products printed for the first ones."""
    inputs = [
        line
        for line in (EXAMPLES / "asins.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    lines = _run("async_bulk.py")
    summary = lines[-1]
    assert summary.startswith(f"{len(inputs)} inputs: ")
    counts = {part.split()[1]: int(part.split()[0]) for part in summary.split(": ")[1].split(", ")}
    assert sum(counts.values()) == len(inputs)
    assert counts["ok"] > 0
    assert counts["invalid"] == sum(1 for line in inputs if line == "not-an-asin")
    assert len(lines) == 4
    assert all("$" in line for line in lines[:3])


def test_sync_lookup() -> None:
    """Blocking lookups print typed fields; an invalid id prints its status and code."""
    lines = _run("sync_lookup.py", "B000000001", "nope")
    assert lines[0].startswith("B000000001: ")
    assert any(line.strip().startswith("price:") and "$" in line for line in lines)
    assert any("https://m.media-amazon.com/" in line for line in lines)
    assert lines[-1] == "nope: invalid (InvalidAsin)"


def test_search() -> None:
    """Search, variations and browse nodes print typed answers; a bad option is refused."""
    lines = _run("search.py", "kettle")
    assert "results for 'kettle'" in lines[0]
    assert sum(1 for line in lines if line.startswith("  B")) >= 5
    assert any(line.startswith("browse node 283155") for line in lines)
    assert lines[-1].startswith("refused before sending: item_count")


@pytest.mark.parametrize("script", ["wsgi_app.py", "asgi_app.py"])
def test_web_handlers(script: str) -> None:
    """The WSGI and ASGI handlers answer a good ASIN with 200 JSON and a bad one with 404."""
    lines = [line for line in _run(script, "--demo") if not line.startswith("lifespan.")]
    answers = [(line.split(" ", 1)[0], line.split(" {", 1)[1]) for line in lines]
    bodies = [json.loads("{" + body) for _, body in answers]
    assert answers[0][0] == "200"
    assert bodies[0]["asin"] == "B000000001"
    assert bodies[0]["title"]
    assert answers[-1][0] == "404"
    assert bodies[-1]["status"] == "invalid"


def test_wsgi_search_that_finds_nothing_is_a_404() -> None:
    """A search that finds nothing is answered 404 NoResults, not a crash (a 500)."""
    lines = _run("wsgi_app.py", "--demo")
    answers = [(line.split(" ", 1)[0], json.loads("{" + line.split(" {", 1)[1])) for line in lines]
    assert [status for status, body in answers if body.get("error") == "NoResults"] == ["404"]


def test_wsgi_search_the_retries_do_not_get_past_is_a_503(tmp_path: Path) -> None:
    """A search whose every answer is a gateway's HTML page (the retries run out) is
    answered 503 naming the error, not a crash of the handler (a 500 with a traceback); an
    item lookup failed so is 503 too, not 404 as if the item were missing."""
    text = (REPO / "config.toml").read_text()
    text = text.replace("max_attempts = 6", "max_attempts = 2")
    config = tmp_path / "config.toml"
    config.write_text(text + "\n[simulator.faults]\nhtml = 1.0\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import wsgi_app\n"
        "for path, query in (('/search', 'q=kettle'), ('/item', 'asin=B000000001')):\n"
        "    seen = []\n"
        "    env = {'PATH_INFO': path, 'QUERY_STRING': query, 'REQUEST_METHOD': 'GET'}\n"
        "    body = wsgi_app.application(env, lambda status, headers: seen.append(status))\n"
        "    print(seen[0], b''.join(body).decode())\n"
        "wsgi_app.get_broker().close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "ASINB_CONFIG": str(config)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    search, item = done.stdout.strip().splitlines()[-2:]
    status, _, body = search.partition(" {")
    assert status == "503 Service Unavailable"
    assert json.loads("{" + body) == {"error": "ResponseError"}
    status, _, body = item.partition(" {")
    assert status == "503 Service Unavailable"  # a failed lookup, not a missing item (404)
    assert json.loads("{" + body)["status"] == "failed"
