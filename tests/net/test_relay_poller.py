"""RelayPoller: relay sockets watched by the loop itself, or behind one epoll descriptor
once many are live, or all by the loop without epoll."""

from __future__ import annotations

import asyncio
import functools
import select
import socket

import pytest

from pyturn.core.forwarding import PACKETS_TO_CLIENT, ForwardingTable, new_counters
from pyturn.core.randomness import SystemRandom
from pyturn.net import relay
from pyturn.net.clients import Clients
from pyturn.net.relay import UdpRelayBinder
from pyturn.wire.attributes import FAMILY_IPV4

PEER_HOST = "127.0.0.1"


@pytest.mark.parametrize("mode", ["direct", "epoll", "no_epoll"])
def test_relay_sockets_deliver_until_closed(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "no_epoll":
        monkeypatch.delattr(select, "epoll", raising=False)
    elif not hasattr(select, "epoll"):
        pytest.skip("no epoll here")
    if mode == "epoll":
        monkeypatch.setattr(relay, "_DIRECT_SOCKETS", 1)  # the first direct, the rest not

    async def scenario() -> None:
        table, clients = ForwardingTable(SystemRandom()), Clients()
        binder = UdpRelayBinder(asyncio.get_running_loop(), table, clients, ["127.0.0.1"])
        endpoints = [binder.bind(FAMILY_IPV4, 0, dont_fragment=False) for _ in range(3)]
        received: list[tuple[int, bytes]] = []

        def sink(index: int, frame: bytes) -> None:
            received.append((index, frame))

        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind((PEER_HOST, 0))
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind(("127.0.0.2", 0))
        flows = []
        try:
            for index, endpoint in enumerate(endpoints):
                assert endpoint is not None
                # A TCP client's flow: the native path leaves it to RelayEndpoint.deliver.
                five_tuple = ("tcp", ("198.51.100.1", 40000 + index), ("192.0.2.1", 3478))
                flow = (*five_tuple, new_counters())
                flows.append(flow)
                table.bind(flow, endpoint, 0x4000 + index, peer.getsockname(), permitted=True)
                clients.streams[five_tuple] = functools.partial(sink, index)
            ports = [endpoint.sock.getsockname()[1] for endpoint in endpoints if endpoint]
            for index, port in enumerate(ports):
                peer.sendto(b"x%d" % index, ("127.0.0.1", port))
                stranger.sendto(b"drop", ("127.0.0.1", port))  # no route: dropped
            for _ in range(200):
                if len(received) == 3:
                    break
                await asyncio.sleep(0.01)
            assert sorted(received) == [(i, bytes([0x40, i, 0, 2]) + b"x%d" % i) for i in range(3)]
            first = endpoints[0]
            assert first is not None
            assert flows[0][3][PACKETS_TO_CLIENT] == 1
            binder.release(first)  # closed: its datagrams go nowhere, the others still flow
            received.clear()
            peer.sendto(b"late", ("127.0.0.1", ports[1]))
            for _ in range(200):
                if received:
                    break
                await asyncio.sleep(0.01)
            assert received == [(1, b"\x40\x01\x00\x04late")]
            poller = binder.poller
            watched = (len(poller._direct), len(poller._sockets))
            assert watched == {"direct": (2, 0), "epoll": (0, 2), "no_epoll": (2, 0)}[mode]
        finally:
            peer.close()
            stranger.close()
            for endpoint in endpoints:
                if endpoint is not None:
                    binder.release(endpoint)
            binder.close()

    asyncio.run(scenario())
