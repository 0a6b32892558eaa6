"""Soak: allocation churn leaves no sockets, ports or memory behind.

The short run here churns for `SOAK_CYCLES` allocation cycles (at most
`PYTURN_SOAK_SECONDS`, 25 by default) against a real server; `tools/soak.py` runs the
same churn for minutes (3 by default). Both compare the server's open file descriptors
and VmRSS after the run with a baseline taken after a warm-up round. A fixed number of
cycles, not of seconds, keeps the memory verdict independent of the machine's speed.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc

import pytest

from pyturn.core.allocation import RelaySocket
from pyturn.core.server import TurnServer
from tests.core.turn_client import PEER, T0, FakeRelay, TurnTestClient, make_config
from tests.hostile.churn import SoakReport, soak
from tests.hostile.client import EchoPeer
from tests.interop.server_process import ServerProcess

SOAK_SECONDS = float(os.environ.get("PYTURN_SOAK_SECONDS", "25"))
SOAK_CYCLES = int(os.environ.get("PYTURN_SOAK_CYCLES", "4000"))
RSS_TOLERANCE_KIB = 8 * 1024


@pytest.fixture(scope="module")
def soak_report(module_server: ServerProcess) -> SoakReport:
    """One churn run against the module's server, shared by the checks below."""
    echo = EchoPeer()
    try:
        return asyncio.run(
            asyncio.wait_for(
                soak(
                    module_server,
                    echo,
                    seconds=SOAK_SECONDS,
                    clients=8,
                    settle=1.0,
                    max_cycles=SOAK_CYCLES,
                ),
                SOAK_SECONDS + 60,
            )
        )
    finally:
        echo.close()


def test_allocation_churn_relays_every_message_and_leaves_no_descriptor_behind(
    soak_report: SoakReport, figures: dict[str, object]
) -> None:
    report = soak_report
    for number, line in enumerate(report.lines()):
        figures[f"line {number + 1}"] = line
    if report.cycles:
        figures["VmRSS growth per allocation cycle"] = (
            f"{report.rss_delta_kib * 1024 / report.cycles:.0f} bytes"
        )
    assert not report.failures
    assert report.cycles >= min(SOAK_CYCLES, SOAK_SECONDS)  # at least one cycle a second
    assert report.fd_delta == 0


def test_allocation_churn_returns_memory_to_baseline(soak_report: SoakReport) -> None:
    if soak_report.cycles < SOAK_CYCLES:
        pytest.skip(f"only {soak_report.cycles} cycles in {SOAK_SECONDS:g} s: too few to judge")
    assert soak_report.rss_delta_kib < RSS_TOLERANCE_KIB


class ForgetfulBinder:
    """A RelayBinder that keeps no record of what it bound (FakeBinder keeps lists)."""

    def bind(
        self, family: int, port: int, dont_fragment: bool, index: int = 0
    ) -> RelaySocket | None:
        return FakeRelay(port, family, dont_fragment, index)

    def bind_tcp(self, family: int, port: int, index: int = 0) -> RelaySocket | None:
        return FakeRelay(port, family, False, index)

    def release(self, relay: RelaySocket) -> None:
        pass


def test_deleted_allocations_do_not_stay_in_memory_until_their_old_deadline() -> None:
    """Pure core, no sockets: 1,000 allocate/permission/delete cycles on one 5-tuple's
    worth of quota must not grow the core's memory."""
    server = TurnServer(
        make_config({"relay": {"min_port": 50000, "max_port": 50009}}),
        ForgetfulBinder(),
        relay_ipv4="192.0.2.10",
    )

    def cycles(count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            now = T0 + i * 0.01
            client = TurnTestClient(server, client=("203.0.113.7", 1024 + i))
            client.nonce = server.auth.make_nonce("203.0.113.7", now)
            assert client.allocate(now=now, lifetime=3600).code == 0
            assert client.create_permission(PEER, now=now).code == 0
            assert client.refresh(0, now=now).code == 0
            server.expire(now)

    cycles(100, 0)  # warm-up
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cycles(1000, 100)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert not server.allocations
    assert growth < 256 * 1024, f"{growth} bytes kept after 1000 deleted allocations"
