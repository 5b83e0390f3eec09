"""The public surface: a sorted, complete ``broker.__all__``; modules that import alone."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import broker
import broker.cache
import broker.simulator
import broker.testing

if TYPE_CHECKING:
    from broker.config import BrokerConfig

MODULES = sorted(
    ["broker"]
    + [
        info.name
        for info in pkgutil.walk_packages(broker.__path__, "broker.")
        if not info.name.endswith("__main__")
    ]  # __main__ runs the CLI when imported
)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_all_sorted_and_complete() -> None:
    """broker.__all__ is sorted and names every public object the package defines."""
    assert list(broker.__all__) == sorted(broker.__all__)
    assert len(set(broker.__all__)) == len(broker.__all__)
    for name in broker.__all__:
        assert hasattr(broker, name), name
    public = {
        name
        for name, value in vars(broker).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", "").startswith("broker")
    }
    assert public <= set(broker.__all__)
    assert isinstance(broker.__version__, str)
    assert broker.__version__


def test_testing_helpers_public() -> None:
    """The test helpers users need are exported from broker.testing."""
    assert {"FakeClock", "settle"} <= set(broker.testing.__all__)


def test_declared_names_exist() -> None:
    """Every name a module lists in __all__ exists in it."""
    for name in MODULES:
        module = importlib.import_module(name)
        for exported in getattr(module, "__all__", ()):
            assert hasattr(module, exported), f"{name}.{exported}"


def test_dir_lists_the_lazy_names() -> None:
    """dir(broker) offers every public name, the lazily imported Broker, SyncBroker and
    config_from_dict too (an editor's completion reads it; they were missing)."""
    assert set(broker.__all__) <= set(dir(broker))
    assert set(broker.cache.__all__) <= set(dir(broker.cache))
    assert set(broker.simulator.__all__) <= set(dir(broker.simulator))


def test_stream_return_types_have_close() -> None:
    """The streams are typed as generators, so ``contextlib.aclosing(broker.stream(...))``
    (the README's advice) and ``closing(sync.stream(...))`` type-check under strict mypy:
    typed as plain iterators, they had no aclose()/close()."""
    from broker.client import Broker
    from broker.sync import SyncBroker

    # The modules postpone annotations: these are the texts mypy reads.
    assert Broker.stream.__annotations__["return"] == "AsyncGenerator[ItemResult, None]"
    assert SyncBroker.stream.__annotations__["return"] == "Generator[ItemResult, None, None]"


#: One interpreter that imports the third-party packages once (their weight: a fresh
#: interpreter per module took 23 s), then forks a child per module, which imports it with
#: no module of ``broker`` loaded yet: an import cycle or order dependence still shows.
_IMPORT_EACH = """
import importlib, json, os, sys, traceback
for heavy in ("aiohttp", "aiolimiter", "structlog", "uvloop", "orjson", "redis.asyncio"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
assert not [m for m in sys.modules if m == "broker" or m.startswith("broker.")]
failed = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
        except BaseException:
            os.write(write, traceback.format_exc().strip().splitlines()[-1].encode())
            os._exit(1)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as said:
        error = said.read().decode()
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        failed[name] = error or "exited non-zero"
print(json.dumps(failed))
"""


def test_every_module_imports_alone() -> None:
    """Each module imports with no other module of the package loaded (no import cycles,
    no order dependence)."""
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *MODULES],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {}


def test_simulator_independent_of_engine() -> None:
    """The simulator, an independent judge, never imports the engine or the job runner."""
    run = _python(
        "import importlib, pkgutil, sys, broker.simulator as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'broker.simulator.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('broker.engine', 'broker.jobs'))))"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert "broker.simulator.server" in MODULES


def test_the_command_line_parser_leaves_aiohttp_and_the_simulator_server_unimported() -> None:
    """``broker --version``, ``--help`` and the commands that send nothing start without
    aiohttp or the simulator's server (importing them took 0.33 s to print the version,
    0.2 s without)."""
    run = _python(
        "import sys, broker.cli\n"
        "broker.cli._build_parser()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('aiohttp', 'broker.simulator.app',"
        " 'broker.simulator.server'))))"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_library_never_configures_logging() -> None:
    """Importing the library leaves structlog's configuration alone."""
    run = _python(
        "import structlog\n"
        "before = structlog.get_config()\n"
        "import broker.engine.broker, broker.config, broker.simulator\n"
        "print(structlog.get_config() == before)"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"


def test_documented_errors_import_from_the_package() -> None:
    """The errors the README names for callers import from ``broker`` itself."""
    from broker import BrokerClosedError, NoUsableKeyError, WrongEventLoopError

    assert issubclass(BrokerClosedError, broker.BrokerError)
    assert issubclass(WrongEventLoopError, broker.BrokerError)
    assert issubclass(NoUsableKeyError, broker.BrokerError)


def _config_with_secret(secret: str) -> BrokerConfig:
    """A config of one Creators key whose secret is ``secret``."""
    key = {"name": "k", "credential_id": "id", "version": "3.1", "partner_tags": {"US": "t-20"}}
    return broker.config_from_dict({"keys": [key]}, secrets={"k": secret})


def test_a_config_holding_a_secret_says_what_a_worker_process_needs_instead() -> None:
    """Pickling a config with a secret (a ``spawn`` pool's initargs) is refused with what to
    hand the worker instead, and the secret stays out of the message."""
    import pickle

    config = _config_with_secret("s3cr3t-value")
    with pytest.raises(TypeError) as refused:
        pickle.dumps(config)
    assert "from_config(path)" in str(refused.value)
    assert "s3cr3t-value" not in str(refused.value)


def test_a_query_given_a_list_of_resources_is_a_hashable_value() -> None:
    """``Query(resources=[...])`` keeps the tuple (the README shows lists): it hashes and
    equals the query written with a tuple."""
    listed = broker.Query("B0C1234567", resources=["itemInfo.title"])  # type: ignore[arg-type]
    assert listed.resources == ("itemInfo.title",)
    assert hash(listed) == hash(broker.Query("B0C1234567", resources=("itemInfo.title",)))


def test_a_config_deep_copies() -> None:
    """copy.deepcopy of a config works (its secrets are shared, never pickled)."""
    import copy

    config = _config_with_secret("s3cr3t")
    clone = copy.deepcopy(config)
    assert clone == config
    assert clone.keys[0].secret is config.keys[0].secret


def test_missing_secret_names_every_way_to_give_it() -> None:
    """A key with no secret source says how to give one, in code (secrets=) as in a file."""
    document = {
        "api": {"endpoint": "amazon"},
        "keys": [
            {"name": "k", "credential_id": "id", "version": "3.1", "partner_tags": {"US": "t"}}
        ],
    }
    with pytest.raises(broker.ConfigError) as caught:
        broker.config_from_dict(document, environ={})
    message = str(caught.value)
    assert "credential_secret_env" in message
    assert "credential_secret_file" in message
    assert "secrets={'k': ...}" in message


def test_a_document_in_code_takes_tuples_where_toml_has_arrays() -> None:
    """config_from_dict takes tuples for arrays: resource_names() (the README's remedy for the
    smaller default resources) as api.resources, and keys as a tuple; both were refused as
    "must be a list"."""
    from broker.api.resources import resource_names

    config = broker.config_from_dict(
        {
            "api": {"endpoint": "simulator", "resources": resource_names("creators")},
            "keys": (
                {"name": "k", "credential_id": "id", "version": "3.1", "partner_tags": {"US": "t"}},
            ),
        },
        secrets={"k": "s3cr3t"},
    )
    assert config.api.resources == resource_names("creators")
    assert config.keys[0].secret is not None


def test_a_string_for_a_list_names_what_was_given() -> None:
    """A lone string where a list of names goes says it got a string."""
    document = {
        "api": {"endpoint": "simulator", "resources": "itemInfo.title"},
        "keys": [
            {"name": "k", "credential_id": "id", "version": "3.1", "partner_tags": {"US": "t"}}
        ],
    }
    with pytest.raises(broker.ConfigError) as caught:
        broker.config_from_dict(document, secrets={"k": "s"})
    assert caught.value.path == "api.resources"
    assert "not a string" in caught.value.message


@pytest.mark.parametrize("owner", ["Broker", "SyncBroker"])
@pytest.mark.parametrize("given", ["config.toml", {"api": {}}])
def test_a_path_or_a_dict_given_for_a_config_is_a_clear_type_error(
    owner: str, given: object
) -> None:
    """Broker("config.toml") and Broker({...}) (SyncBroker too) raise a TypeError naming
    from_config and from_dict at once; they failed later with "'str' object has no
    attribute 'api'" from deep inside the client."""
    cls = getattr(broker, owner)
    with pytest.raises(TypeError, match=rf"{owner}\.from_config.*{owner}\.from_dict"):
        cls(given)


def test_a_misspelt_name_fails_the_type_check(tmp_path: Path) -> None:
    """``from broker import SyncBrokr`` is an error to mypy, as for any typed package;
    the module's lazy-import hook, seen by type checkers, made every unknown name an object
    (it passed, then failed at run time). The types the methods return import from broker,
    an option may be None, as it may at run time (item_page: int | None was refused), and
    from_config's keywords are checked."""
    program = tmp_path / "user.py"
    program.write_text(
        "from broker import MetricsSnapshot, SearchResult, SyncBrokr\n"
        "from broker.cache import MemoryCach\n"
        "from broker import Broker\n"
        "async def search(b: Broker, q: str, page: int | None) -> SearchResult:\n"
        "    # None is 'not given' for every option: a wrapper passes its own on.\n"
        "    return await b.search_items(q, item_page=page, search_index=None)\n"
        "from broker import SyncBroker\n"
        "class AppBroker(SyncBroker):\n"
        "    def titles(self) -> list[str]:\n"
        "        return []\n"
        "def use() -> list[str]:\n"
        "    with AppBroker.from_config('config.toml') as app:\n"
        "        return app.titles()  # a subclass keeps its type (it was SyncBroker)\n"
        "def misspelt() -> None:\n"
        "    Broker.from_config('config.toml', cache_refesh=True)\n"
        "    SyncBroker.from_dict({}, cache_refresh=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stdout
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 3, done.stdout
    assert '"SyncBrokr"' in errors[0]
    assert '"MemoryCach"' in errors[1]
    # A misspelt keyword of from_config is the checker's error too (**kwargs were Any).
    assert '"cache_refesh"' in errors[2]


def test_a_result_s_fields_can_be_introspected() -> None:
    """typing.get_type_hints reads ItemResult's fields, as pydantic and FastAPI do to
    serialise a result; its typed-item slot named a class models.py cannot import at run
    time, and it failed (NameError: Product)."""
    import typing

    hints = typing.get_type_hints(broker.ItemResult)
    assert hints["status"] is broker.Status
    assert hints["query"] == broker.Query | None


def test_a_result_s_fields_stay_the_same_once_its_product_is_read() -> None:
    """dataclasses.asdict (and pydantic, which reads the same fields) gives a result alone,
    the same before and after its typed item was read: the cache slot was a field, None
    before and the whole typed product again after."""
    import dataclasses

    item = {"asin": "B0ABCDEFGH", "itemInfo": {"title": {"displayValue": "Kettle"}}}
    result = broker.ItemResult("B0ABCDEFGH", "www.amazon.com", broker.Status.OK, item)
    before = dataclasses.asdict(result)
    assert result.product is not None
    assert result.product.title == "Kettle"
    assert dataclasses.asdict(result) == before
    assert "_product" not in before
    assert "_product" not in {f.name for f in dataclasses.fields(result)}
