"""Fixtures for the operations tests: real pyturn processes with their metrics endpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from tests.interop.test_turnutils import echo_peer  # noqa: F401 (a fixture for test_workers)
from tests.ops.helpers import OpsServer, ops_config

StartServer = Callable[..., OpsServer]


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """`start_server(overrides)` starts a server (metrics on); all stop after the test."""
    started: list[OpsServer] = []

    def start(overrides: Mapping[str, Any] | None = None) -> OpsServer:
        server = OpsServer(ops_config(overrides), tmp_path_factory.mktemp("pyturn-ops"))
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()
