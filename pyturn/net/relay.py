"""Relay sockets: one UDP socket per allocation, facing the peers.

Each relay socket is a plain non-blocking socket, so a port can be bound synchronously
while the core handles an Allocate; `RelayPoller` watches them all through one epoll
descriptor, and one wake-up drains every datagram already queued (`batch.recv_batch`).
The peer-to-client path is the fast path: a datagram becomes ChannelData or a Data
indication in `Allocation.frame_for_client`, and the frames of one wake-up leave together
through the client's sink (one sendmmsg for a UDP client), with no awaits, logging or
clock reads. With the native module, relays of UDP clients are served in C by the same
rules (`batch.serve_relay`, `batch.serve_relays`); the rest come back to
`RelayEndpoint.readable`.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import select
import socket
from collections.abc import Callable

from pyturn.core.allocation import Allocation
from pyturn.net.batch import recv_batch, serve_relay, serve_relays
from pyturn.net.tcp_relay import TcpRelayListener, bind_tcp_listener
from pyturn.wire.attributes import FAMILY_IPV4, Address

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

ClientSink = Callable[[bytes], None]

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

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._direct: dict[int, RelayEndpoint] = {}  # watched by the loop itself
        self._sockets: dict[int, RelayEndpoint] = {}  # watched through self._epoll
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        if self._epoll is not None:
            loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, endpoint: RelayEndpoint) -> None:
        fd = endpoint.sock.fileno()
        if self._epoll is None or len(self._direct) < _DIRECT_SOCKETS:
            self._direct[fd] = endpoint
            # Native when the module is built: no Python runs for a UDP client's datagram.
            self._loop.add_reader(fd, serve_relay, endpoint, _READS_PER_WAKEUP)
            return
        self._sockets[fd] = endpoint
        self._epoll.register(fd, select.EPOLLIN)

    def forget(self, endpoint: RelayEndpoint) -> None:
        fd = endpoint.sock.fileno()
        if fd < 0:
            return
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
        left: list[RelayEndpoint] = serve_relays(
            self._epoll, self._sockets, _SOCKETS_PER_WAKEUP, _READS_PER_WAKEUP
        )
        for endpoint in left:
            endpoint.readable()

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
    """A bound relay port; `allocation` and `send_frames` are set once the Allocate
    succeeds."""

    __slots__ = ("_poller", "allocation", "port", "send_frames", "sock", "udp_target")

    def __init__(self, sock: _socket.socket, port: int, poller: RelayPoller) -> None:
        self.sock = sock
        self.port = port
        self._poller = poller
        self.allocation: Allocation | None = None
        self.send_frames: Callable[[list[bytes]], None] | None = None
        # (listener socket, client address) of a UDP client, for the native module.
        self.udp_target: tuple[socket.socket, Address] | None = None

    def attach(self, allocation: Allocation, sink: ClientSink) -> None:
        self.allocation = allocation
        self.udp_target = getattr(sink, "udp_target", None)
        # A UDP client's sink sends a list of frames in one call (udp.UdpClientSink.many);
        # looked up by name: an isinstance check on a Protocol costs several us here.
        many: Callable[[list[bytes]], None] | None = getattr(sink, "many", None)
        if many is not None:
            self.send_frames = many
        else:

            def send_frames(frames: list[bytes]) -> None:
                for frame in frames:
                    sink(frame)

            self.send_frames = send_frames
        self._poller.watch(self)

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

    def readable(self) -> None:
        allocation = self.allocation
        send_frames = self.send_frames
        if allocation is None or send_frames is None:
            return
        try:
            datagrams = recv_batch(self.sock, _READS_PER_WAKEUP)
        except OSError as exc:
            log.debug("relay port %d: %s", self.port, exc)
            return
        frame_for_client = allocation.frame_for_client
        frames: list[bytes] = []
        relayed_bytes = 0
        for data, peer in datagrams:
            frame = frame_for_client(peer, data)
            if frame is not None:
                frames.append(frame)
                relayed_bytes += len(data)
        if frames:
            allocation.packets_to_client += len(frames)
            allocation.bytes_to_client += relayed_bytes
            send_frames(frames)

    def close(self) -> None:
        self._poller.forget(self)
        self.sock.close()
        # The allocation points back at this endpoint: cutting the cycle frees both
        # at once instead of at some later full collection.
        self.allocation = None
        self.send_frames = None
        self.udp_target = None


class UdpRelayBinder:
    """Implements the core's RelayBinder with real sockets on the configured addresses."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address4: str,
        address6: str | None = None,
    ) -> None:
        self.loop = loop
        self.address4 = address4
        self.address6 = address6
        self.poller = RelayPoller(loop)

    def close(self) -> None:
        """At shutdown, once every allocation has been released."""
        self.poller.close()

    def bind(self, family: int, port: int, dont_fragment: bool) -> RelayEndpoint | None:
        if family == FAMILY_IPV4:
            af, host = socket.AF_INET, self.address4
        else:
            if self.address6 is None:
                return None
            af, host = socket.AF_INET6, self.address6
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

    def bind_tcp(self, family: int, port: int) -> TcpRelayListener | None:
        if family == FAMILY_IPV4:
            host = self.address4
        elif self.address6 is not None:
            host = self.address6
        else:
            return None
        return bind_tcp_listener(self.loop, host, port)

    def release(self, relay: object) -> None:
        if isinstance(relay, (RelayEndpoint, TcpRelayListener)):
            relay.close()
