"""RelayPoller: relay sockets watched by the loop itself, or behind one epoll descriptor
once many are live, or all by the loop without epoll."""

from __future__ import annotations

import asyncio
import functools
import select
import socket
from typing import cast

import pytest

from pyturn.core.allocation import Allocation
from pyturn.net import relay
from pyturn.net.relay import UdpRelayBinder
from pyturn.wire.attributes import FAMILY_IPV4, Address


class EchoAllocation:
    """What RelayEndpoint.readable needs of an allocation: frames and counters."""

    def __init__(self) -> None:
        self.packets_to_client = 0
        self.bytes_to_client = 0

    def frame_for_client(self, peer: Address, data: bytes) -> bytes | None:
        return b"F" + data if data != b"drop" else None


@pytest.mark.parametrize("mode", ["direct", "epoll", "no_epoll"])
def test_relay_sockets_deliver_until_closed(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "no_epoll":
        monkeypatch.delattr(select, "epoll", raising=False)
    elif not hasattr(select, "epoll"):
        pytest.skip("no epoll here")
    if mode == "epoll":
        monkeypatch.setattr(relay, "_DIRECT_SOCKETS", 1)  # the first direct, the rest not

    async def scenario() -> None:
        binder = UdpRelayBinder(asyncio.get_running_loop(), "127.0.0.1")
        endpoints = [binder.bind(FAMILY_IPV4, 0, dont_fragment=False) for _ in range(3)]
        received: list[tuple[int, bytes]] = []

        def sink(index: int, frame: bytes) -> None:
            received.append((index, frame))

        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        try:
            for index, endpoint in enumerate(endpoints):
                assert endpoint is not None
                allocation = cast(Allocation, EchoAllocation())
                endpoint.attach(allocation, functools.partial(sink, index))
            ports = [endpoint.sock.getsockname()[1] for endpoint in endpoints if endpoint]
            for index, port in enumerate(ports):
                peer.sendto(b"x%d" % index, ("127.0.0.1", port))
                peer.sendto(b"drop", ("127.0.0.1", port))
            for _ in range(200):
                if len(received) == 3:
                    break
                await asyncio.sleep(0.01)
            assert sorted(received) == [(i, b"Fx%d" % i) for i in range(3)]
            first = endpoints[0]
            assert first is not None
            assert cast(EchoAllocation, first.allocation).packets_to_client == 1
            binder.release(first)  # closed: its datagrams go nowhere, the others still flow
            received.clear()
            peer.sendto(b"late", ("127.0.0.1", ports[1]))
            for _ in range(200):
                if received:
                    break
                await asyncio.sleep(0.01)
            assert received == [(1, b"Flate")]
            poller = binder.poller
            watched = (len(poller._direct), len(poller._sockets))
            assert watched == {"direct": (2, 0), "epoll": (0, 2), "no_epoll": (2, 0)}[mode]
        finally:
            peer.close()
            for endpoint in endpoints:
                if endpoint is not None:
                    binder.release(endpoint)
            binder.close()

    asyncio.run(scenario())
