"""Fixtures for the pure core tests: a server on a fake binder, and clients for it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from pyturn.core.server import TurnServer
from tests.core.turn_client import (
    RELAY_IP,
    FakeBinder,
    MakeServer,
    TurnTestClient,
    make_config,
)


@pytest.fixture
def binder() -> FakeBinder:
    return FakeBinder()


@pytest.fixture
def make_server(binder: FakeBinder) -> MakeServer:
    """Build a server on the shared binder with config `overrides` merged in."""

    def build(
        overrides: Mapping[str, Any] | None = None,
        *,
        relay_ipv4: str | None = RELAY_IP,
        relay_ipv6: str | None = None,
    ) -> TurnServer:
        return TurnServer(
            make_config(overrides), binder, relay_ipv4=relay_ipv4, relay_ipv6=relay_ipv6
        )

    return build


@pytest.fixture
def server(make_server: MakeServer) -> TurnServer:
    return make_server()


@pytest.fixture
def client(server: TurnServer) -> TurnTestClient:
    """alice, on the default 5-tuple."""
    return TurnTestClient(server)
