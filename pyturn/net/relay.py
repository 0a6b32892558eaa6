"""Relay sockets: one UDP socket per allocation, facing the peers.

Each relay socket is a plain non-blocking socket, bound synchronously while the core
handles an Allocate and watched from then on (`RelayPoller`); one wake-up drains every
datagram already queued. Where a datagram goes is the forwarding table's business
(pyturn/core/forwarding.py): the native fast path (`fastpath.serve_relay`,
`fastpath.serve_relays`) sends ChannelData and Data indications itself, and what it
leaves (a stream client whose transport is full, everything without the native
module) comes to
`RelayEndpoint.deliver`, which asks `ForwardingTable.from_peer` and sends the frames of
one wake-up together through `Clients`, with no awaits, logging or clock reads.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import select
import socket
import time
from collections.abc import Sequence

from pyturn.core.forwarding import Flow, ForwardingTable
from pyturn.net.clients import Clients
from pyturn.net.fastpath import Datagram, serve_relay, serve_relays
from pyturn.net.tcp_relay import TcpRelayListener, bind_tcp_listener
from pyturn.wire.attributes import FAMILY_IPV4, FAMILY_IPV6, Address

log = logging.getLogger(__name__)

_READS_PER_WAKEUP = 64
# Relay sockets served per wake-up of the poller; the rest wait for the next loop turn.
_SOCKETS_PER_WAKEUP = 256
# Relay sockets the event loop watches itself before the poller's epoll takes the rest.
_DIRECT_SOCKETS = 32
# Linux: IP_MTU_DISCOVER with IP_PMTUDISC_DO sets DF on every datagram (RFC 8656 §14.8).
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)

# Bursts of media arrive faster than one event-loop turn drains them; the kernel's
# default 208 KB buffers drop packets under load. The FORCE options pass the
# net.core.rmem_max/wmem_max caps when the process may (CAP_NET_ADMIN); otherwise the
# kernel clamps the request to those caps.
LISTENER_BUFFER = 4 * 1024 * 1024
RELAY_BUFFER = 1024 * 1024


_RCVBUFFORCE: int | None = getattr(socket, "SO_RCVBUFFORCE", None)
_SNDBUFFORCE: int | None = getattr(socket, "SO_SNDBUFFORCE", None)
_force_allowed = True  # cleared on the first refusal: the process's rights do not change


def grow_buffers(sock: _socket.socket, size: int) -> None:
    global _force_allowed  # noqa: PLW0603 (a one-way switch, see above)
    if _force_allowed and _RCVBUFFORCE is not None and _SNDBUFFORCE is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _RCVBUFFORCE, size)
            sock.setsockopt(socket.SOL_SOCKET, _SNDBUFFORCE, size)
        except PermissionError:
            _force_allowed = False
        except OSError:
            pass
        else:
            return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class RelayPoller:
    """Watches every relay socket of a worker.

    While few relay sockets are live, the event loop watches each one itself, so that a
    peer's datagram wakes the process once. Past `_DIRECT_SOCKETS`, new sockets join one
    epoll instance of the poller's own, which the loop watches as a single descriptor:
    registering a socket there is one epoll_ctl, where the loop's add_reader costs
    several times that per Allocate, and a busy relay costs one loop callback per turn
    rather than one per socket; the price is a second wake-up (the loop's, then this
    epoll's) per datagram, about 5 us of round-trip time. Without epoll (not Linux) every
    socket goes to the loop.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, table: ForwardingTable, clients: Clients
    ) -> None:
        self._loop = loop
        self.table = table
        self.clients = clients
        self._direct: dict[int, RelayEndpoint] = {}  # watched by the loop itself
        self._sockets: dict[int, RelayEndpoint] = {}  # watched through self._epoll
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        if self._epoll is not None:
            loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, endpoint: RelayEndpoint) -> None:
        fd = endpoint.key
        if self._epoll is None or len(self._direct) < _DIRECT_SOCKETS:
            self._direct[fd] = endpoint
            # Native when the module is built: no Python runs for a UDP client's datagram.
            self._loop.add_reader(
                fd,
                serve_relay,
                endpoint.sock,
                _READS_PER_WAKEUP,
                self.table.to_client_by_peer,
                self.table.to_client_by_ip,
                self.table.data_indication,
                self.clients.udp_fds,
                self.clients.stream_writes,
                endpoint.deliver,
            )
            return
        self._sockets[fd] = endpoint
        self._epoll.register(fd, select.EPOLLIN)

    def forget(self, endpoint: RelayEndpoint) -> None:
        fd = endpoint.key
        if self._direct.get(fd) is endpoint:
            del self._direct[fd]
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
        elif self._sockets.get(fd) is endpoint:
            del self._sockets[fd]
            if self._epoll is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    def _ready(self) -> None:
        assert self._epoll is not None
        left: list[tuple[RelayEndpoint, list[Datagram]]] = serve_relays(
            self._epoll,
            self._sockets,
            _SOCKETS_PER_WAKEUP,
            _READS_PER_WAKEUP,
            self.table.to_client_by_peer,
            self.table.to_client_by_ip,
            self.table.data_indication,
            self.clients.udp_fds,
            self.clients.stream_writes,
        )
        for endpoint, datagrams in left:
            endpoint.deliver(datagrams)

    def close(self) -> None:
        if self._epoll is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
        for fd in self._direct:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
        self._direct.clear()
        self._sockets.clear()


class RelayEndpoint:
    """A bound relay port, watched from the moment it is bound: until the core writes
    routes for it into the table, what arrives is dropped."""

    __slots__ = ("_poller", "key", "port", "sock")

    def __init__(self, sock: _socket.socket, port: int, poller: RelayPoller) -> None:
        self.sock = sock
        self.port = port
        # The forwarding table's name for this socket: its descriptor, fixed while open.
        self.key = sock.fileno()
        self._poller = poller
        poller.watch(self)

    def sendto(self, data: bytes, peer: Address) -> None:
        try:
            self.sock.sendto(data, peer)
        except (BlockingIOError, InterruptedError):
            pass  # a full socket buffer drops the datagram, as UDP would anyway
        except OSError as exc:
            # ICMP errors surface here (e.g. ECONNREFUSED from an earlier datagram);
            # they concern one peer and must not disturb the allocation.
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                log.debug("relay send to %s failed: %s", peer, exc)

    def deliver(self, datagrams: list[Datagram]) -> None:
        """The reference path for what the native path left (or everything without it):
        each datagram framed by the table, the frames of one client sent together."""
        from_peer = self._poller.table.from_peer
        send_frames = self._poller.clients.send_frames
        key = self.key
        flow: Flow | None = None
        frames: list[bytes] = []
        now = time.monotonic_ns()
        for data, peer in datagrams:
            routed = from_peer(key, peer, data, now)
            if routed is None:
                continue
            if routed[0] is not flow:
                if flow is not None:
                    send_frames(flow, frames)
                flow, frames = routed[0], []
            frames.append(routed[1])
        if flow is not None:
            send_frames(flow, frames)

    def close(self) -> None:
        self._poller.forget(self)
        self.sock.close()


class UdpRelayBinder:
    """Implements the core's RelayBinder with real sockets on the configured addresses."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        table: ForwardingTable,
        clients: Clients,
        addresses4: Sequence[str],
        addresses6: Sequence[str] = (),
    ) -> None:
        """`addresses4` and `addresses6`: where each family's sockets bind, by the index
        the core passes (relay.address or address6 first, then relay.more_addresses)."""
        self.loop = loop
        self.addresses = {FAMILY_IPV4: tuple(addresses4), FAMILY_IPV6: tuple(addresses6)}
        self.poller = RelayPoller(loop, table, clients)

    def close(self) -> None:
        """At shutdown, once every allocation has been released."""
        self.poller.close()

    def _host(self, family: int, index: int) -> str | None:
        hosts = self.addresses.get(family, ())
        return hosts[index] if index < len(hosts) else None

    def bind(
        self, family: int, port: int, dont_fragment: bool, index: int = 0
    ) -> RelayEndpoint | None:
        host = self._host(family, index)
        if host is None:
            return None
        af = socket.AF_INET if family == FAMILY_IPV4 else socket.AF_INET6
        # The C socket type itself: socket.socket adds a Python __init__ and close that
        # cost more than a microsecond per Allocate, for features a relay port never uses.
        sock = _socket.socket(af, socket.SOCK_DGRAM)
        try:
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.setblocking(False)
            grow_buffers(sock, RELAY_BUFFER)
            if dont_fragment:
                if af == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IP_PMTUDISC_DO)
        except OSError:
            sock.close()
            return None
        return RelayEndpoint(sock, port, self.poller)

    def bind_tcp(self, family: int, port: int, index: int = 0) -> TcpRelayListener | None:
        host = self._host(family, index)
        if host is None:
            return None
        return bind_tcp_listener(self.loop, host, port)

    def release(self, relay: object) -> None:
        if isinstance(relay, (RelayEndpoint, TcpRelayListener)):
            relay.close()
