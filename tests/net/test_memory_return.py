"""When a worker gives freed heap pages back (pyturn/net/memory.py): at the end of a wave
of allocations, and at the end of a wave of TCP/TLS connections, which a client closes
after its allocation has already ended."""

from __future__ import annotations

import pytest

from pyturn.core.server import TurnServer
from pyturn.net import memory
from pyturn.net.memory import MemoryReturner
from pyturn.net.stream import ConnectionCounter
from tests.core.turn_client import RELAY_IP, T0, FakeBinder, make_config


@pytest.fixture
def trims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The malloc_trim calls made, instead of making them."""
    made: list[int] = []

    def trim(pad: int) -> int:
        made.append(pad)
        return 1

    monkeypatch.setattr(memory, "_malloc_trim", lambda: trim)
    return made


def _server() -> TurnServer:
    return TurnServer(make_config(None), FakeBinder(), relay_ipv4=RELAY_IP)


def _open(counter: ConnectionCounter, count: int) -> list[str]:
    ips = [f"198.51.100.{i % 200 + 1}" for i in range(count)]
    for ip in ips:
        assert counter.admit(ip)
    return ips


def test_a_wave_of_closed_connections_is_given_back_once(
    trims: list[int],
) -> None:
    counter = ConnectionCounter(limit=64)
    returner = MemoryReturner(_server(), lambda: T0, counter)
    ips = _open(counter, 2000)
    returner.return_memory()
    assert trims == []  # all still open
    for ip in ips[:900]:
        counter.release(ip)
    returner.return_memory()
    assert trims == []  # 1,100 of a peak of 2,000 still open: not half yet
    for ip in ips[900:]:
        counter.release(ip)
    returner.return_memory()
    assert trims == [0]
    assert counter.total == 0 and counter.open == {}
    returner.return_memory()
    assert trims == [0]  # nothing new has closed


def test_connections_coming_and_going_are_churn_not_a_wave(
    trims: list[int],
) -> None:
    counter = ConnectionCounter(limit=64)
    returner = MemoryReturner(_server(), lambda: T0, counter)
    steady = _open(counter, 1000)
    for _ in range(3):  # 300 close and 300 others open, three times over
        for ip in _open(counter, 300):
            counter.release(ip)
        returner.return_memory()
    assert trims == []
    assert counter.total == len(steady)
    for ip in steady[:100]:
        counter.release(ip)
    returner.return_memory()
    assert trims == []  # 900 of a peak of 1,300 still open


def test_a_release_without_an_admission_counts_nothing() -> None:
    counter = ConnectionCounter(limit=2)
    counter.release("192.0.2.1")
    assert (counter.total, counter.closed, counter.open) == (0, 0, {})
    assert counter.admit("192.0.2.1") and counter.admit("192.0.2.1")
    assert not counter.admit("192.0.2.1")
    counter.release("192.0.2.1")
    assert (counter.total, counter.peak, counter.closed) == (1, 2, 1)
