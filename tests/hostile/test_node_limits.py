"""Quotas and relay ports hold for the node, whatever the number of workers.

Real `pyturn serve` processes with several workers; each client is its own UDP 5-tuple,
so the kernel spreads them over the workers. Per-worker counting would let a user hold
a quota per worker, and per-worker port slices would leave ports unusable; these tests
count exactly.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.hostile.client import TurnClient, code_of, flood_udp, rest_credentials, run
from tests.hostile.test_floods import bare_allocate
from tests.interop.server_process import ServerFactory

LOOPBACK = "127.0.0.1"
# Every client comes from loopback: the per-IP budget of 401s must not get in the way.
OPEN_BUDGET = {"unauthenticated_burst": 1_000_000}
BATCH = 256
# Relay ranges below Linux's ephemeral ports (32768-60999), where no client socket of
# this or another test can be sitting on one of them (bench/run.py takes 20000-29999).
RANGES = {3: (30000, 30002), 21: (30100, 30120), 10_000: (10000, 19999)}


async def open_clients(server: tuple[str, int], users: list[str]) -> list[TurnClient]:
    clients = []
    for user in users:
        username, password = rest_credentials(user)
        clients.append(await TurnClient.open(server, username=username, password=password))
    return clients


async def allocate_in_batches(clients: list[TurnClient]) -> list[int | None]:
    """Every client allocates, BATCH at a time; the codes in client order."""
    codes: list[int | None] = []
    for start in range(0, len(clients), BATCH):
        batch = clients[start : start + BATCH]
        codes += [code_of(r) for r in await asyncio.gather(*(c.allocate() for c in batch))]
    return codes


def codes_of(server: tuple[str, int], users: list[str]) -> Counter[int | None]:
    async def scenario() -> Counter[int | None]:
        clients = await open_clients(server, users)
        try:
            return Counter(await allocate_in_batches(clients))
        finally:
            for client in clients:
                client.close()

    return run(scenario())


def test_a_users_quota_holds_for_the_node_with_four_workers(
    server_factory: ServerFactory, figures: dict[str, object]
) -> None:
    """RFC 8656 §7.2 step 7 with `workers: 4`: 12 Allocates of one user from 12 source
    ports (spread over the workers by the kernel) give exactly 3 allocations and 9 486s."""
    server = server_factory(
        {"workers": 4, "quotas": {"allocations_per_user": 3}, "limits": OPEN_BUDGET}
    )
    codes = codes_of(server.udp_address, ["alice"] * 12)
    figures["one user, 12 Allocates, quota 3, 4 workers"] = dict(codes)
    assert codes == Counter({0: 3, 486: 9})


def test_the_total_quota_holds_for_the_node_with_four_workers(
    server_factory: ServerFactory, figures: dict[str, object]
) -> None:
    server = server_factory(
        {"workers": 4, "quotas": {"allocations_total": 5}, "limits": OPEN_BUDGET}
    )
    codes = codes_of(server.udp_address, [f"user{i}" for i in range(12)])
    figures["12 users, allocations_total 5, 4 workers"] = dict(codes)
    assert codes == Counter({0: 5, 486: 7})


@pytest.mark.parametrize("ports", [3, 21, 10_000])
@pytest.mark.parametrize("workers", [1, 2, 8])
def test_every_relay_port_can_be_used_whatever_the_number_of_workers(
    server_factory: ServerFactory, figures: dict[str, object], ports: int, workers: int
) -> None:
    """One relay port pool for the node: as many allocations as ports, on every port of
    the range, then 508; with any number of workers, even more workers than ports."""
    low, high = RANGES[ports]
    server = server_factory(
        {
            "workers": workers,
            "relay": {"address": LOOPBACK, "min_port": low, "max_port": high},
            "quotas": {"allocations_per_user": 0},
            "limits": OPEN_BUDGET,
        }
    )

    async def scenario() -> tuple[list[int | None], set[int], int | None]:
        clients = await open_clients(server.udp_address, [f"u{i % 50}" for i in range(ports)])
        extra = await open_clients(server.udp_address, ["late"])
        try:
            codes = await allocate_in_batches(clients)
            used = {c.relayed[1] for c in clients if c.relayed is not None}
            return codes, used, code_of(await extra[0].allocate())
        finally:
            for client in clients + extra:
                client.close()

    codes, used, late = run(scenario(), timeout=120.0)
    figures[f"{ports} ports, {workers} workers"] = f"{dict(Counter(codes))}, then {late}"
    assert Counter(codes) == Counter({0: ports})
    assert used == set(range(low, high + 1))
    assert late == 508


def test_the_unsigned_answer_budget_of_a_source_ip_holds_for_the_node(
    server_factory: ServerFactory, figures: dict[str, object]
) -> None:
    """limits.unauthenticated_burst and _rate per source IP, with `workers: 4`: 4,000
    unsigned Allocates from 32 source ports of one IP (spread over the workers by the
    kernel) get at most burst + rate x time answers in all, not that much per worker."""
    burst, rate = 32, 8.0
    server = server_factory(
        {
            "workers": 4,
            "limits": {"unauthenticated_burst": burst, "unauthenticated_rate": rate},
        }
    )
    flood = flood_udp(
        server.udp_address, bare_allocate, count=4000, seconds=1.0, sockets=32, pace=1.0
    )
    window = flood.seconds + 0.3  # replies are read for 0.3 s after the last datagram
    allowed = burst + rate * window
    figures["4 workers, 32 source ports of one IP"] = (
        f"{flood.codes[401]} answered of {flood.sent} (burst {burst} + {rate:g}/s over "
        f"{window:.2f} s allows {allowed:.1f})"
    )
    assert set(flood.codes) <= {401}
    assert burst <= flood.codes[401] <= allowed + 1
