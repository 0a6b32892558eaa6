"""RFC 6062 TCP relaying: listening relayed addresses and peer connections.

The core decides (permissions, CONNECTION-IDs, timeouts); this module owns the sockets.
A peer connection buffers what the peer sends until a client data connection binds to
it with ConnectionBind, then both become a plain byte pipe with back-pressure: when one
side's write buffer fills, the other side stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import cast

from pyturn.core.allocation import Allocation, PeerConnection
from pyturn.core.bandwidth import TO_CLIENT, TO_PEER
from pyturn.core.forwarding import PACKETS_TO_CLIENT, PACKETS_TO_PEER
from pyturn.core.server import Action, TurnServer
from pyturn.net.sockets import accept_ready, bound_socket
from pyturn.wire.attributes import Address

log = logging.getLogger(__name__)

# RFC 6062 §5.2: the server gives up on a peer that does not answer within 30 s.
CONNECT_TIMEOUT = 30.0
# What a peer may send before the client binds a data connection to it.
MAX_UNBOUND_BUFFER = 64 * 1024
_PIPE_HIGH_WATER = 256 * 1024

ActionSink = Callable[[list[Action], Allocation], None]


def _reuse(sock: socket.socket) -> None:
    # The relayed address both listens for peers and connects out to them (RFC 6062
    # §5.2: "from the relayed transport address"), so both sockets share the port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


class PipeEnd(asyncio.Protocol):
    """One TCP side of a relayed connection: the peer's, or the client's data connection."""

    def __init__(
        self,
        on_lost: Callable[[], None],
        allocation: Allocation | None = None,
        *,
        from_peer: bool = True,
    ) -> None:
        # Reads are counted on the allocation like datagrams, for metrics and logs.
        self.allocation = allocation
        self.from_peer = from_peer
        self.transport: asyncio.Transport | None = None
        self.partner: PipeEnd | None = None
        self.pending = bytearray()
        # Bytes over a bandwidth limit, waiting while reading is paused (None: none).
        self.held: bytearray | None = None
        self.on_lost: Callable[[], None] | None = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_PIPE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        allocation = self.allocation
        if allocation is not None:
            counters = allocation.counters
            table = allocation.table
            if self.held is not None:
                self.held += data  # what a paused transport still delivers waits too
                return
            if table.limited:
                direction = TO_CLIENT if self.from_peer else TO_PEER
                taken, wait = table.stream_take(counters, direction, len(data), time.monotonic_ns())
                if wait:
                    # Over a bandwidth limit: what is left waits, and reading stops a while.
                    self.held = bytearray(data[taken:])
                    if self.transport is not None:
                        self.transport.pause_reading()
                    asyncio.get_running_loop().call_later(wait / 1e9, self._release_held)
                    data = data[:taken]
                    if not data:
                        return
            packets = PACKETS_TO_CLIENT if self.from_peer else PACKETS_TO_PEER
            counters[packets] += 1
            counters[packets + 1] += len(data)  # the bytes follow the packets
        self.forward(data)

    def _release_held(self) -> None:
        held, self.held = self.held, None
        if held is None or self.transport is None or self.transport.is_closing():
            return
        self.data_received(bytes(held))
        if self.held is None and self.transport is not None:
            self.transport.resume_reading()

    def forward(self, data: bytes) -> None:
        partner = self.partner
        if partner is not None and partner.transport is not None:
            partner.transport.write(data)
            return
        self.pending += data
        if len(self.pending) > MAX_UNBOUND_BUFFER and self.transport is not None:
            self.transport.pause_reading()

    def join(self, partner: PipeEnd) -> None:
        self.partner = partner
        partner.partner = self
        for end in (self, partner):
            if end.pending and end.partner is not None and end.partner.transport is not None:
                end.partner.transport.write(bytes(end.pending))
                end.pending.clear()
            if end.transport is not None and not end.transport.is_closing():
                end.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        partner, self.partner = self.partner, None
        if partner is not None:
            partner.partner = None
            partner.close()
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()


class TcpRelayListener:
    """The RelaySocket of a TCP allocation: its relayed address, listening for peers."""

    __slots__ = ("_loop", "allocation", "host", "key", "on_peer", "port", "sock")

    def __init__(self, sock: socket.socket, host: str, port: int, loop: asyncio.AbstractEventLoop):
        self.sock = sock
        # A RelaySocket's table key; no route names a TCP relay (RFC 6062 uses connections).
        self.key = sock.fileno()
        self.host = host
        self.port = port
        self._loop = loop
        self.allocation: Allocation | None = None
        self.on_peer: Callable[[TcpRelayListener, socket.socket, Address], None] | None = None

    def sendto(self, data: bytes, peer: Address, /) -> None:
        """TCP allocations carry no datagrams; the core never routes any here."""

    def attach(
        self,
        allocation: Allocation,
        on_peer: Callable[[TcpRelayListener, socket.socket, Address], None],
    ) -> None:
        self.allocation = allocation
        self.on_peer = on_peer
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for conn, address in accept_ready(self.sock, 16, f"relay port {self.port}"):
            conn.setblocking(False)
            if self.on_peer is None:
                conn.close()
            else:
                self.on_peer(self, conn, address)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


def bind_tcp_listener(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> TcpRelayListener | None:
    try:
        # reuse_port: the outgoing connections to peers share this port (see _reuse).
        sock = bound_socket(socket.SOCK_STREAM, host, port, reuse_port=True, backlog=64)
    except OSError:
        return None
    return TcpRelayListener(sock, host, port, loop)


class TcpRelay:
    """Carries out the core's RFC 6062 actions for one worker."""

    def __init__(
        self,
        server: TurnServer,
        clock: Callable[[], float],
        deliver: ActionSink,
    ) -> None:
        self.server = server
        self.clock = clock
        self.deliver = deliver
        self.loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- allocations ---------------------------------------------------------------------

    def attach(self, allocation: Allocation) -> None:
        relay = allocation.relay
        if isinstance(relay, TcpRelayListener):
            relay.attach(allocation, self._peer_arrived)

    def close_allocation(self, allocation: Allocation) -> None:
        for connection in list((allocation.peer_connections or {}).values()):
            self.close(connection)

    def close(self, connection: PeerConnection) -> None:
        end = connection.handle
        if isinstance(end, PipeEnd):
            end.close()

    # -- outgoing: Connect (RFC 6062 §5.2) -----------------------------------------------

    def connect(self, connection: PeerConnection) -> None:
        self._spawn(self._connect(connection))

    async def _connect(self, connection: PeerConnection) -> None:
        relay = connection.allocation.relay
        ok = False
        if isinstance(relay, TcpRelayListener):
            family = socket.AF_INET6 if ":" in relay.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                _reuse(sock)
                sock.bind((relay.host, relay.port))
                sock.setblocking(False)
                await asyncio.wait_for(
                    self.loop.sock_connect(sock, connection.peer), CONNECT_TIMEOUT
                )
                _, end = await self.loop.create_connection(
                    lambda: PipeEnd(lambda: self._lost(connection), connection.allocation),
                    sock=sock,
                )
                connection.handle = end
                ok = True
            except (OSError, TimeoutError) as exc:
                log.debug("connect to peer %s failed: %s", connection.peer, exc)
                sock.close()
        actions = self.server.peer_connected(connection.connection_id, ok, self.clock())
        if not actions and isinstance(connection.handle, PipeEnd):
            connection.handle.close()  # the allocation went away meanwhile
        self.deliver(actions, connection.allocation)

    # -- incoming: a peer connects to the relayed address (RFC 6062 §5.3) ----------------

    def _peer_arrived(self, listener: TcpRelayListener, sock: socket.socket, peer: Address) -> None:
        allocation = listener.allocation
        if allocation is None:
            sock.close()
            return
        connection, actions = self.server.peer_connection_arrived(allocation, peer, self.clock())
        if connection is None:
            sock.close()
            return
        end = PipeEnd(lambda: self._lost(connection), allocation)
        connection.handle = end
        self._spawn(self._adopt(sock, end))
        self.deliver(actions, allocation)

    async def _adopt(self, sock: socket.socket, end: PipeEnd) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: end, sock)
        except OSError:
            sock.close()
            end.connection_lost(None)

    def _lost(self, connection: PeerConnection) -> None:
        actions = self.server.peer_connection_closed(connection.connection_id)
        for action in actions:
            self.deliver([action], connection.allocation)
