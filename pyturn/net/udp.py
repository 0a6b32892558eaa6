"""UDP client listener: every datagram from a client goes to the core, ChannelData first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from pyturn.core.allocation import FiveTuple
from pyturn.core.server import Action, TurnServer
from pyturn.wire.attributes import Address

ActionHandler = Callable[[list[Action], FiveTuple, Callable[[bytes], None]], None]


class UdpListener(asyncio.DatagramProtocol):
    """One bound client-facing UDP socket (`transport: udp` in `listen`)."""

    def __init__(
        self,
        server: TurnServer,
        clock: Callable[[], float],
        handle_actions: ActionHandler,
    ) -> None:
        self.server = server
        self.route_channel_data = server.route_channel_data
        self.clock = clock
        self.handle_actions = handle_actions
        self.transport: asyncio.DatagramTransport | None = None
        self.local: Address = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.DatagramTransport, transport)
        sockname = transport.get_extra_info("sockname")
        self.local = (sockname[0], sockname[1])

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        # IPv4 addresses already are (host, port); IPv6 ones carry flow info and scope.
        client = cast(Address, addr if len(addr) == 2 else addr[:2])
        five_tuple: FiveTuple = ("udp", client, self.local)
        # Fast path: ChannelData (top bits 01) skips the STUN machinery.
        if data and 0x40 <= data[0] <= 0x7F:
            send = self.route_channel_data(data, five_tuple)
            if send is not None:
                send.relay.sendto(send.data, send.peer)
            return
        actions = self.server.receive(data, five_tuple, self.clock())
        if actions:
            self.handle_actions(actions, five_tuple, self.sink_for(client))

    def sink_for(self, client: Address) -> Callable[[bytes], None]:
        transport = self.transport
        assert transport is not None

        def send(data: bytes) -> None:
            transport.sendto(data, client)

        return send

    def error_received(self, exc: Exception) -> None:
        # ICMP port-unreachable from a client that went away: nothing to do.
        pass
