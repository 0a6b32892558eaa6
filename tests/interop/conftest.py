"""Fixtures for the interoperability tests: real pyturn processes on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.interop.server_process import (
    ServerFactory,
    ServerProcess,
    base_config,
    make_loopback_certificate,
    merge_config,
    running_server,
    tls_config,
)
from tests.interop.turn_wire_client import WireClient


@pytest.fixture(scope="session")
def turn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the session with the standard interop config (peers 127/8 allowed)."""
    yield from running_server(base_config(), tmp_path_factory.mktemp("pyturn-session"))


@pytest.fixture
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers with the standard config plus overrides; all stop after the test.

    `server_factory({"peers": None})` removes a key, `server_factory({"auth": {...}})`
    merges into it.
    """
    started: list[ServerProcess] = []

    def make(overrides: Mapping[str, Any] | None = None) -> ServerProcess:
        config = merge_config(base_config(), overrides or {})
        server = ServerProcess(config, tmp_path_factory.mktemp("pyturn"))
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, 127.0.0.1 and ::1, and its key (PEM)."""
    return make_loopback_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path]
) -> Iterator[ServerProcess]:
    """One server for the session listening on UDP, TCP and TLS (peers 127/8 allowed)."""
    config = merge_config(base_config(), tls_config(*tls_files))
    yield from running_server(config, tmp_path_factory.mktemp("pyturn-tls"))


@pytest.fixture
def clients() -> Iterator[list[WireClient]]:
    """Clients opened by a test; all closed afterwards."""
    opened: list[WireClient] = []
    yield opened
    for client in opened:
        client.close()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Plain sockets opened by a test (peers, listeners); all closed afterwards."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()
