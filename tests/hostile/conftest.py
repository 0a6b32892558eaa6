"""Fixtures for the hostile-traffic tests: real `pyturn serve` processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.hostile.client import EchoPeer, assert_clean_log
from tests.interop.server_process import (
    ServerFactory,
    ServerProcess,
    base_config,
    merge_config,
)


@pytest.fixture
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers with the interop test config plus overrides; all stop afterwards.

    The base config (tests/interop/server_process.py) listens on 127.0.0.1 only, relays
    from 127.0.0.1 and allows peers in 127.0.0.0/8; `{"peers": None}` drops the
    allow-list, leaving the built-in deny list.
    """
    started: list[ServerProcess] = []

    def make(overrides: Mapping[str, Any] | None = None) -> ServerProcess:
        config = merge_config(base_config(), overrides or {})
        server = ServerProcess(config, tmp_path_factory.mktemp("pyturn-hostile"))
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
    for server in started:
        assert_clean_log(server)


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by the tests of a module that leave it as they found it."""
    with ServerProcess(base_config(), tmp_path_factory.mktemp("pyturn-module")) as server:
        yield server
    assert_clean_log(server)


@pytest.fixture
def echo_peer() -> Iterator[EchoPeer]:
    peer = EchoPeer()
    yield peer
    peer.close()


# -- measured figures ------------------------------------------------------------------------

_FIGURES = pytest.StashKey[dict[str, dict[str, object]]]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, object]:
    """A dict for the numbers a test measured; printed at the end of the run and kept in
    the pytest cache under `pyturn/hostile-figures` (`pytest --cache-show`)."""
    store = request.config.stash.setdefault(_FIGURES, {})
    return store.setdefault(request.node.name, {})


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    store = config.stash.get(_FIGURES, {})
    measured = {name: values for name, values in store.items() if values}
    if not measured:
        return
    terminalreporter.section("hostile traffic: measured figures")
    for name, values in sorted(measured.items()):
        terminalreporter.write_line(name)
        for key, value in values.items():
            terminalreporter.write_line(f"    {key}: {value}")
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        cache.set("pyturn/hostile-figures", measured)
