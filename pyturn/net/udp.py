"""UDP client listener: every datagram from a client goes to the core, ChannelData first.

The socket is read with `loop.add_reader` and `fastpath.listener_ready`, so one wake-up
takes the whole queue in a few system calls (recvmmsg when the native module is built,
which also relays the ChannelData of bound channels itself, from the forwarding table,
and hands the rest to `_handle`, where `ForwardingTable.from_client` routes it).
Replies made while a batch is handled are collected and leave together at its end
(sendmmsg); anything sent outside a batch goes at once. Payloads for peers (ChannelData
and Send indications) are grouped by (relay, peer) flow and leave at the end of the
batch too, one send_many_to per flow, so equal-sized runs can use UDP GSO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from pyturn.core.forwarding import FiveTuple, RelaySocket, SendToPeer
from pyturn.core.server import Action, TurnServer
from pyturn.net.batch import send_batch, send_many_to
from pyturn.net.clients import Clients
from pyturn.net.fastpath import forward_channel_data, listener_ready
from pyturn.net.relay import LISTENER_BUFFER, RelayEndpoint, grow_buffers
from pyturn.wire.attributes import Address
from pyturn.wire.channel_data import is_channel_data
from pyturn.wire.message import MessageClass, Method, message_type

log = logging.getLogger(__name__)

ActionHandler = Callable[[list[Action], FiveTuple, Callable[[bytes], None]], None]

# A wake-up reads at most this many datagrams, so that relay sockets and timers get
# their turn under a flood; the rest stays queued for the next turn of the loop.
_DATAGRAMS_PER_WAKEUP = 256
_BATCH = 64
# The type of a Send indication: it never ends an allocation (see _handle).
_SEND_INDICATION = message_type(Method.SEND, MessageClass.INDICATION).to_bytes(2, "big")


class UdpClientSink:
    """Sends to one client through the listener it came in on; see `UdpListener.send`."""

    __slots__ = ("client", "listener")

    def __init__(self, listener: UdpListener, client: Address) -> None:
        self.listener = listener
        self.client = client

    def __call__(self, data: bytes) -> None:
        self.listener.send(data, self.client)


class UdpListener:
    """One bound client-facing UDP socket (`transport: udp` in `listen`)."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        server: TurnServer,
        clock: Callable[[], float],
        handle_actions: ActionHandler,
        *,
        clients: Clients,
    ) -> None:
        self.sock = sock
        self.loop = loop
        self.server = server
        self.clock = clock
        self.handle_actions = handle_actions
        self.clients = clients
        sockname = sock.getsockname()
        self.local: Address = (sockname[0], sockname[1])
        clients.add_udp(self.local, self, sock.fileno())
        # Replies made during a batch; None outside one, when sends go out at once.
        self._pending: list[tuple[bytes, Address]] | None = None
        # The callback is native when the module is built: a wake-up whose datagrams are
        # all relayed ChannelData runs no Python (see fastpath.listener_ready).
        loop.add_reader(
            sock.fileno(),
            listener_ready,
            sock,
            _BATCH,
            server.table.to_peer_by_channel,
            self.local,
            self._handle,
            self._read_failed,
        )

    @classmethod
    def open(
        cls,
        loop: asyncio.AbstractEventLoop,
        server: TurnServer,
        clock: Callable[[], float],
        handle_actions: ActionHandler,
        sock: socket.socket,
        *,
        clients: Clients,
    ) -> UdpListener:
        """Serve on `sock`, a bound UDP socket (see sockets.listener_sockets), with the
        large buffers a listener needs; the socket is closed if that fails."""
        try:
            grow_buffers(sock, LISTENER_BUFFER)
            return cls(sock, loop, server, clock, handle_actions, clients=clients)
        except OSError:
            sock.close()
            raise

    def _read_failed(self, exc: OSError) -> None:
        log.debug("udp listener %s: %s", self.local, exc)

    def _handle(self, received: int, datagrams: list[tuple[bytes, Address]]) -> None:
        """The datagrams that listener_ready left (all of them without the native
        module), then the rest of the queue up to the wake-up's budget."""
        sock = self.sock
        local = self.local
        server = self.server
        table = server.table
        from_client = table.from_client
        receive = server.receive
        pending: list[tuple[bytes, Address]] = []
        self._pending = pending
        # Payloads for peers (ChannelData, Send indications) by (relay, peer): one
        # send_many_to per flow at the end of the batch.
        to_peers: dict[tuple[RelaySocket, Address], list[bytes]] = {}
        want = _BATCH
        budget = _DATAGRAMS_PER_WAKEUP - received
        try:
            while True:
                now = self.clock() if datagrams else 0.0  # only STUN needs the time
                now_ns = time.monotonic_ns()  # the bandwidth limits' clock
                for data, client in datagrams:
                    five_tuple: FiveTuple = ("udp", client, local)
                    send: SendToPeer | Action | None
                    # Fast path: ChannelData skips the STUN machinery.
                    if is_channel_data(data):
                        send = from_client(data, five_tuple, now_ns)
                        if send is None:
                            continue
                    else:
                        if to_peers and data[:2] != _SEND_INDICATION:
                            # This message may end an allocation and close its relay
                            # socket: what was queued for peers before it goes now.
                            self._send_to_peers(to_peers)
                        actions = receive(data, five_tuple, now)
                        if not actions:
                            continue
                        # A lone SendToPeer (a Send indication) joins its flow below;
                        # everything else is the worker's business.
                        send = actions[0]
                        if len(actions) > 1 or not isinstance(send, SendToPeer):
                            self.handle_actions(actions, five_tuple, UdpClientSink(self, client))
                            continue
                    flow = (send.relay, send.peer)
                    queued = to_peers.get(flow)
                    if queued is None:
                        to_peers[flow] = [send.data]
                    else:
                        queued.append(send.data)
                if received < want or budget <= 0:
                    break
                if to_peers:
                    # Before the native path relays what the clients sent next.
                    self._send_to_peers(to_peers)
                want = min(_BATCH, budget)
                try:
                    received, datagrams = forward_channel_data(
                        sock, want, table.to_peer_by_channel, local
                    )
                except OSError as exc:
                    self._read_failed(exc)
                    return
                budget -= received
        finally:
            self._pending = None
            if to_peers:
                self._send_to_peers(to_peers)
            if pending:
                send_batch(sock, pending)
        # Datagrams left past the budget keep the socket readable (epoll is level-
        # triggered): the next turn of the loop reads on.

    @staticmethod
    def _send_to_peers(to_peers: dict[tuple[RelaySocket, Address], list[bytes]]) -> None:
        for (relay, peer), payloads in to_peers.items():
            if isinstance(relay, RelayEndpoint):
                send_many_to(relay.sock, peer, payloads)
            else:
                for payload in payloads:
                    relay.sendto(payload, peer)
        to_peers.clear()

    def send(self, data: bytes, client: Address) -> None:
        pending = self._pending
        if pending is not None:
            pending.append((data, client))
        else:
            send_batch(self.sock, [(data, client)])

    def close(self) -> None:
        self.clients.remove_udp(self.local)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
