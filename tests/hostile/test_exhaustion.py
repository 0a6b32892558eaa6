"""Exhaustion: relay ports, quotas and per-allocation caps under concurrent clients.

RFC 8656 §7.2: an Allocate the server cannot satisfy gets 508 (no relay port) or 486
(quota); nothing else may break meanwhile: Binding is answered, existing allocations
keep relaying, and a freed port is handed out again. Permissions and channels per
allocation are capped by `quotas.permissions_per_allocation` and
`quotas.channels_per_allocation` (508).

Clients are many asyncio endpoints at once, each on its own source port of 127.0.0.1;
attackers use TURN REST credentials so each can be its own quota user.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from pyturn.wire.attributes import TRANSPORT_TCP, ConnectionId
from tests.hostile.client import (
    HONEST_IP,
    EchoPeer,
    TurnClient,
    code_of,
    open_fds,
    pid_of,
    relay_round_trip,
    rest_credentials,
    rss_kib,
    run,
)
from tests.interop.server_process import ServerFactory, next_relay_range

_sources = itertools.count()


async def open_as(server: tuple[str, int], user: str) -> TurnClient:
    """A client of its own REST user, each on a source address of its own (127.0.0.20 on),
    so that dozens of new sessions at once stay inside the per-IP 401 budget."""
    username, password = rest_credentials(user)
    source = f"127.0.0.{20 + next(_sources) % 200}"
    return await TurnClient.open(server, username=username, password=password, local_ip=source)


async def allocate_all(clients: list[TurnClient]) -> list[int | None]:
    """Every client sends its Allocate at once; the codes in client order."""
    responses = await asyncio.gather(*(client.allocate() for client in clients))
    return [code_of(response) for response in responses]


def small_range(ports: int) -> dict[str, int]:
    start, _ = next_relay_range()  # even, so EVEN-PORT pairs line up
    return {"min_port": start, "max_port": start + ports - 1}


def test_relay_ports_run_out_with_508_and_nothing_else_breaks(
    server_factory: ServerFactory, echo_peer: EchoPeer, figures: dict[str, object]
) -> None:
    ports, attackers = 12, 30
    server = server_factory({"relay": small_range(ports)})
    pid = pid_of(server)
    fds_before, rss_before = open_fds(pid), rss_kib(pid)

    async def scenario() -> None:
        honest = await TurnClient.open(server.udp_address, local_ip=HONEST_IP)
        assert code_of(await honest.allocate()) == 0
        await relay_round_trip(honest, echo_peer)
        clients = [await open_as(server.udp_address, f"m{i}") for i in range(attackers)]
        try:
            codes = Counter(await allocate_all(clients))
            figures["attackers' Allocate codes"] = dict(codes)
            assert codes == {0: ports - 1, 508: attackers - ports + 1}
            figures["server fds: idle / all ports taken"] = f"{fds_before} / {open_fds(pid)}"
            # Nothing else broke: Binding, relaying and refreshing on a live allocation.
            assert code_of(await honest.binding()) == 0
            await relay_round_trip(honest, echo_peer)
            assert code_of(await honest.refresh(600)) == 0
            late = await TurnClient.open(server.udp_address, local_ip=HONEST_IP)
            assert code_of(await late.allocate()) == 508
            # A freed port is handed out again.
            holder = next(c for c in clients if c.relayed is not None)
            assert code_of(await holder.refresh(0)) == 0
            late.codec.nonce = None
            late2 = await TurnClient.open(server.udp_address, local_ip=HONEST_IP)
            assert code_of(await late2.allocate()) == 0
            await relay_round_trip(late2, echo_peer)
            for client in (late, late2, honest, *clients):
                if client.relayed is not None and client is not holder:
                    assert code_of(await client.refresh(0)) == 0
                client.close()
        finally:
            for client in clients:
                client.close()

    run(scenario())
    fds_after, rss_after = open_fds(pid), rss_kib(pid)
    figures["server fds before / after"] = f"{fds_before} / {fds_after}"
    figures["server VmRSS before / after"] = f"{rss_before} / {rss_after} KiB"
    assert fds_after == fds_before


def test_quotas_per_user_and_in_total_hold_under_concurrency(
    server_factory: ServerFactory, figures: dict[str, object]
) -> None:
    per_user, total, users, each = 5, 12, 3, 8
    server = server_factory(
        {"quotas": {"allocations_per_user": per_user, "allocations_total": total}}
    )

    async def round_of_allocations() -> dict[str, Counter[int | None]]:
        clients = {
            f"user{u}-{i}": await open_as(server.udp_address, f"user{u}")
            for u in range(users)
            for i in range(each)
        }
        try:
            codes = await allocate_all(list(clients.values()))
            by_user: dict[str, Counter[int | None]] = {}
            for name, code in zip(clients, codes, strict=True):
                by_user.setdefault(name.split("-")[0], Counter())[code] += 1
            for client in clients.values():
                if client.relayed is not None:
                    assert code_of(await client.refresh(0)) == 0
            return by_user
        finally:
            for client in clients.values():
                client.close()

    first = run(round_of_allocations())
    second = run(round_of_allocations())
    figures["first round, codes per user"] = {u: dict(c) for u, c in first.items()}
    figures["second round, codes per user"] = {u: dict(c) for u, c in second.items()}
    for by_user in (first, second):
        assert sum(c[0] for c in by_user.values()) == total
        for counts in by_user.values():
            assert counts[0] <= per_user
            assert set(counts) <= {0, 486}


def test_reserved_ports_count_against_the_quota_of_the_user_who_reserved_them(
    server_factory: ServerFactory, figures: dict[str, object]
) -> None:
    ports = 10
    server = server_factory({"relay": small_range(ports), "quotas": {"allocations_per_user": 1}})

    async def scenario() -> Counter[int | None]:
        mallory = await open_as(server.udp_address, "mallory")
        cycles: Counter[int | None] = Counter()
        try:
            for _ in range(ports // 2):
                code = code_of(await mallory.allocate(even_port=True))
                cycles[code] += 1
                if code == 0:
                    assert code_of(await mallory.refresh(0)) == 0
        finally:
            mallory.close()
        figures["mallory's Allocate(EVEN-PORT R) codes"] = dict(cycles)
        others = [await open_as(server.udp_address, f"user{i}") for i in range(ports - 1)]
        try:
            codes = Counter(await allocate_all(others))
            figures["then 9 other users' Allocate codes"] = dict(codes)
            return codes
        finally:
            for client in others:
                client.close()

    # Mallory holds nothing but her quota's worth; everyone else fits in the rest.
    assert run(scenario()) == {0: ports - 1}


def test_permission_and_channel_caps_give_508_and_the_rest_keeps_relaying(
    server_factory: ServerFactory, echo_peer: EchoPeer
) -> None:
    server = server_factory(
        {"quotas": {"permissions_per_allocation": 3, "channels_per_allocation": 2}}
    )
    port = echo_peer.address[1]
    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]

    async def scenario() -> None:
        client = await TurnClient.open(server.udp_address)
        try:
            assert code_of(await client.allocate()) == 0
            # All or nothing: four at once are refused, three are installed.
            assert code_of(await client.create_permission(*((ip, port) for ip in ips))) == 508
            assert code_of(await client.create_permission(*((ip, port) for ip in ips[:3]))) == 0
            assert code_of(await client.create_permission((ips[3], port))) == 508
            assert code_of(await client.create_permission((ips[0], port))) == 0  # a refresh
            assert code_of(await client.channel_bind(0x4000, (ips[0], port))) == 0
            assert code_of(await client.channel_bind(0x4001, (ips[1], port))) == 0
            assert code_of(await client.channel_bind(0x4002, (ips[2], port))) == 508
            assert code_of(await client.channel_bind(0x4000, (ips[0], port))) == 0  # a refresh
            await relay_round_trip(client, echo_peer, channel=0x4000)
            assert code_of(await client.refresh(0)) == 0
        finally:
            client.close()

    run(scenario())


@pytest.fixture
def tcp_peers() -> Iterator[list[tuple[str, int]]]:
    """Eight loopback TCP listeners that accept and hold connections."""
    listeners = []
    for _ in range(8):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        listeners.append(sock)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_loop() -> None:
        for sock in listeners:
            sock.settimeout(0.05)
        while not stop.is_set():
            for sock in listeners:
                with contextlib.suppress(OSError):
                    accepted.append(sock.accept()[0])

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    yield [sock.getsockname() for sock in listeners]
    stop.set()
    thread.join(timeout=2.0)
    for sock in [*accepted, *listeners]:
        sock.close()


def test_peer_connections_per_allocation_are_capped(
    server_factory: ServerFactory, tcp_peers: list[tuple[str, int]]
) -> None:
    cap = 3
    server = server_factory({"quotas": {"permissions_per_allocation": cap}})

    async def scenario() -> Counter[int | None]:
        client = await TurnClient.open(server.tcp_address, transport="tcp")
        try:
            assert code_of(await client.allocate(transport=TRANSPORT_TCP)) == 0
            codes: Counter[int | None] = Counter()
            for peer in tcp_peers:
                response = await client.connect(peer)
                codes[code_of(response)] += 1
                if code_of(response) == 0:
                    assert response is not None and response.get(ConnectionId) is not None
            return codes
        finally:
            client.close()

    assert run(scenario()) == {0: cap, 508: len(tcp_peers) - cap}
