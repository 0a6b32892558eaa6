"""TCP (and later TLS) client connections: a framed byte stream into the core.

RFC 8656 §3.1: over a stream, STUN messages and ChannelData share the connection, and
ChannelData is padded to a multiple of 4 bytes. The allocation made on a connection
ends when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import cast

from pyturn.config import LimitsConfig, PeerNetwork
from pyturn.core.allocation import FiveTuple, PeerConnection
from pyturn.core.server import JoinPeerConnection, TurnServer
from pyturn.net.clients import Clients, pad
from pyturn.net.fastpath import relay_stream
from pyturn.net.sockets import accept_ready
from pyturn.net.tcp_relay import PipeEnd
from pyturn.net.udp import ActionHandler
from pyturn.wire.attributes import Address
from pyturn.wire.channel_data import StreamFramer, is_channel_data
from pyturn.wire.errors import DecodeError
from pyturn.wire.proxy_protocol import V2_MAX, ProxyHeader, ProxyHeaderError, parse_proxy_header

log = logging.getLogger(__name__)

# A slow reader may not make us queue without bound: past this, the client is dropped.
MAX_WRITE_BUFFER = 1 << 20
# The defaults of the `limits` config section, for connections made outside a worker.
_LIMITS = LimitsConfig()
# A connection that has not sent one whole frame by then is closed (slowloris).
FIRST_FRAME_TIMEOUT = _LIMITS.first_message_timeout
# Larger than any STUN message or ChannelData frame: a claim beyond it is a lie.
MAX_PENDING = 65536 + 8
# One address may not hold every descriptor of the process.
MAX_CONNECTIONS_PER_SOURCE = _LIMITS.connections_per_source

# With several workers, shown what a new connection has sent so far: True when it went
# to another worker, False when it stays, None when its first message is not whole yet.
HandOver = Callable[["StreamConnection", bytearray], "bool | None"]


class ConnectionCounter:
    """Open stream connections per client IP, shared by the listeners of one process;
    and in all, for handing memory back once a wave of them has closed
    (pyturn/net/memory.py)."""

    def __init__(self, limit: int = MAX_CONNECTIONS_PER_SOURCE) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self.total = 0
        # The most open at once since MemoryReturner last looked, and how many ever closed.
        self.peak = 0
        self.closed = 0

    def admit(self, ip: str) -> bool:
        count = self.open.get(ip, 0)
        if count >= self.limit:
            return False
        self.open[ip] = count + 1
        self.total += 1
        self.peak = max(self.peak, self.total)
        return True

    def release(self, ip: str) -> None:
        count = self.open.get(ip, 0)
        if count == 0:
            return
        self.total -= 1
        self.closed += 1
        if count > 1:
            self.open[ip] = count - 1
        else:
            del self.open[ip]


class StreamConnection(asyncio.Protocol):
    def __init__(
        self,
        server: TurnServer,
        clock: Callable[[], float],
        handle_actions: ActionHandler,
        transport_name: str = "tcp",
        *,
        counter: ConnectionCounter | None = None,
        first_frame_timeout: float = FIRST_FRAME_TIMEOUT,
        admitted: bool = False,
        clients: Clients | None = None,
        hand_over: HandOver | None = None,
        five_tuple: FiveTuple | None = None,
        initial: bytes = b"",
    ) -> None:
        """`hand_over` peeks at the first message (pyturn/net/handover.py); a connection
        handed over by another worker comes with its 5-tuple (a TLS one is a local pipe)
        and `initial`, the bytes that worker read, which are taken first."""
        self.server = server
        # Where relayed data for this connection's allocation finds it (by 5-tuple).
        self.clients = clients
        self.clock = clock
        self.handle_actions = handle_actions
        self.transport_name = transport_name
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self._write: Callable[[bytes], object] = lambda data: None
        self.five_tuple: FiveTuple | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0  # loop time; moved on by each read, looked at by the timer
        self.counter = counter if counter is not None else ConnectionCounter()
        self.first_frame_timeout = first_frame_timeout
        self._counted: str | None = None
        # RFC 6062 §5.4: after ConnectionBind this connection is a raw pipe to a peer.
        self.pipe: PipeEnd | None = None
        # TLS connections are counted by `TlsAcceptor` before their handshake.
        self.admitted = admitted
        self.hand_over = hand_over
        self._given_five_tuple = five_tuple
        self._initial = initial
        # Over a bandwidth limit: the frames read but not yet relayed, while reading stops.
        self._held: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        given = self._given_five_tuple
        if given is None:
            peer = transport.get_extra_info("peername")
            local = transport.get_extra_info("sockname")
            client: Address = (str(peer[0]), int(peer[1]))
            given = (self.transport_name, client, (str(local[0]), int(local[1])))
        client = given[1]
        if not self.admitted and not self.counter.admit(client[0]):
            log.debug("connection from %s refused: too many from that address", client[0])
            transport.abort()
            return
        self._counted = client[0]
        self.five_tuple = given
        self._write = transport.write
        if self.clients is not None:
            self.clients.streams[self.five_tuple] = self.send
            self.clients.stream_writes[self.five_tuple] = self._write
        transport.set_write_buffer_limits(high=MAX_WRITE_BUFFER)
        self._touch()  # the first frame is due within the timeout too
        if self._initial:
            initial, self._initial = self._initial, b""
            self.data_received(initial)

    def _idle_check(self) -> None:
        """A connection lives on its allocation (or as a data pipe); one that has neither
        must keep talking, or it would hold a descriptor for nothing. Reads only move the
        deadline on: one timer per connection instead of one per read. While an
        allocation holds the connection the timer looks again a timeout later, so that
        an allocation that expires while its client is silent lets the connection go."""
        self._idle_timer = None
        transport = self.transport
        if transport is None or self.pipe is not None:
            return
        loop = asyncio.get_running_loop()
        if self.five_tuple in self.server.allocations:
            self._idle_timer = loop.call_later(self.first_frame_timeout, self._idle_check)
            return
        left = self._idle_deadline - loop.time()
        if left > 0:
            self._idle_timer = loop.call_later(left, self._idle_check)
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.pipe is not None:
            self.pipe.data_received(data)
            return
        framer = self.framer
        if not framer.buffer and self._held is None and self.hand_over is None:
            # The native path relays the routed ChannelData at the head of the read; the
            # rest (STUN, a frame cut by the read) goes on to the framer.
            taken = self._relay_head(data)
            if taken == len(data):
                return
            if taken:
                data = data[taken:]
        framer.feed(data)
        if self._held is not None:
            return  # what a paused transport still delivers waits with the rest
        if self.hand_over is not None and self._handed_over():
            return
        self._read_frames()

    def _read_frames(self) -> None:
        framer = self.framer
        buffer = framer.buffer
        if self.hand_over is None:
            taken = self._relay_head(buffer)
            if taken:
                del buffer[:taken]
        try:
            while self.pipe is None and self._held is None and (frames := framer.frames()):
                self._handle_frames(frames)
        except DecodeError:
            self.close()
            return
        if framer.pending > MAX_PENDING:
            self.close()

    def _relay_head(self, data: bytes | bytearray) -> int:
        """How many bytes of routed ChannelData and Send indications at the head of `data`
        the native path relayed (none without it, or under bandwidth limits: then Python
        waits)."""
        assert self.five_tuple is not None
        table = self.server.table
        return relay_stream(data, self.five_tuple, table.to_peer_by_channel, table.to_peer_by_ip)

    def _handed_over(self) -> bool:
        """Asks `hand_over` until the first message is whole (pyturn/net/handover.py: a
        ConnectionBind for another worker's CONNECTION-ID goes there)."""
        assert self.hand_over is not None
        verdict = self.hand_over(self, self.framer.buffer)
        if verdict is None:
            return False
        self.hand_over = None
        if verdict:
            self.framer.buffer.clear()
        return verdict

    def become_pipe(self) -> PipeEnd | None:
        """Stop framing: what the client sends from now on goes, as it is, to the
        returned end's partner, once the caller joins one (a TLS connection proxied to
        another worker)."""
        if self.transport is None:
            return None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        end = PipeEnd(lambda: None, None, from_peer=False)
        end.transport = self.transport
        self._stop_writes()
        self.pipe = end
        self.framer.buffer.clear()
        return end

    def _handle_frames(self, frames: list[bytes]) -> None:
        five_tuple = self.five_tuple
        assert five_tuple is not None
        server = self.server
        table = server.table
        from_client = table.from_client
        now = time.monotonic_ns()
        for i, frame in enumerate(frames):
            if is_channel_data(frame):
                # Over a bandwidth limit a stream is not dropped from: it waits, and
                # stops reading meanwhile (TCP then slows the client down).
                wait = table.stream_wait(frame, five_tuple, now) if table.limited else 0
                if wait:
                    self._hold(frames[i:], wait)
                    return
                send = from_client(frame, five_tuple, now)
                if send is not None:
                    send.relay.sendto(send.data, send.peer)
                continue
            actions = server.receive(frame, five_tuple, self.clock())
            if actions:
                self.handle_actions(actions, five_tuple, self.send)
                for action in actions:
                    if isinstance(action, JoinPeerConnection):
                        self._join(action.connection)
                        break
        self._touch()

    def _hold(self, frames: list[bytes], wait_ns: int) -> None:
        self._held = frames
        if self.transport is not None:
            self.transport.pause_reading()
        asyncio.get_running_loop().call_later(wait_ns / 1e9, self._release_held)

    def _release_held(self) -> None:
        held, self._held = self._held, None
        transport = self.transport
        if held is None or transport is None or transport.is_closing() or self.pipe is not None:
            return
        self._handle_frames(held)
        if self._held is None:
            self._read_frames()
        if self._held is None and self.transport is not None:
            self.transport.resume_reading()

    def _touch(self) -> None:
        """A new connection, or frames came: the idle deadline moves on (see `_idle_check`)."""
        loop = asyncio.get_running_loop()
        self._idle_deadline = loop.time() + self.first_frame_timeout
        if self._idle_timer is None and self.pipe is None:
            self._idle_timer = loop.call_later(self.first_frame_timeout, self._idle_check)

    def _join(self, connection: PeerConnection) -> None:
        """Become the client side of a relayed TCP connection; later bytes are payload."""
        peer_end = connection.handle
        if not isinstance(peer_end, PipeEnd) or self.transport is None:
            self.close()
            return
        client_end = PipeEnd(lambda: None, connection.allocation, from_peer=False)
        client_end.transport = self.transport
        self._stop_writes()
        self.pipe = client_end
        leftover = bytes(self.framer.buffer)
        self.framer.buffer.clear()
        client_end.join(peer_end)
        if leftover:
            client_end.data_received(leftover)

    def _stop_writes(self) -> None:
        """The native path stops writing to this connection (see `Clients`)."""
        if self.clients is not None and self.five_tuple is not None:
            self.clients.stream_writes.pop(self.five_tuple, None)

    def pause_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.pause_writing()
            return
        self._stop_writes()

    def resume_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.resume_writing()
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.clients is not None and self.five_tuple is not None:
            self.clients.stream_writes[self.five_tuple] = self._write

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            # A client that does not read its relayed media loses it, not our memory.
            return
        transport.write(pad(data))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pipe is not None:
            self.pipe.connection_lost(exc)
            self.pipe = None
        if self._counted is not None:
            self.counter.release(self._counted)
            self._counted = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.five_tuple is not None:
            actions = self.server.connection_closed(self.five_tuple, self.clock())
            if actions:
                self.handle_actions(actions, self.five_tuple, self.send)
            if self.clients is not None:
                self.clients.streams.pop(self.five_tuple, None)
                self.clients.stream_writes.pop(self.five_tuple, None)
        self.transport = None


class StreamAcceptor:
    """Accepts stream connections itself, for what `create_server` cannot do:

    - count a TLS connection against its source at once (with `create_server(ssl=...)`
      a connection reaches the protocol only after its handshake, so connections that
      never start one would escape the per-source cap until the handshake timeout);
    - read a PROXY protocol header first (`trusted`: the proxies allowed to send one),
      whose client address then stands for the connection everywhere: 5-tuple,
      XOR-MAPPED-ADDRESS, nonces, per-source limits, logs, sessions;
    - tell TLS from plain TCP by the first byte (`detect_tls`, transport auto): a TLS
      record starts with 0x16, a STUN message with 0x00 or 0x01, ChannelData 0x40-0x7F.

    Nothing is read past the header: the socket goes on to the event loop's transport
    (and its TLS) with the client's bytes untouched. A header that is bad, missing or
    not whole within `timeout` closes the connection.
    """

    def __init__(
        self,
        sock: socket.socket,
        counter: ConnectionCounter,
        timeout: float,
        make_protocol: Callable[[str, FiveTuple], StreamConnection],
        *,
        tls: ssl.SSLContext | None = None,
        detect_tls: bool = False,
        trusted: Sequence[PeerNetwork] | None = None,
    ) -> None:
        self.sock = sock
        self.counter = counter
        self.timeout = timeout
        self.make_protocol = make_protocol
        self.tls = tls
        self.detect_tls = detect_tls
        self.trusted = tuple(trusted) if trusted is not None else None
        self.loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals = _LogGate()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for conn, peer in accept_ready(self.sock, 64, "a TCP or TLS listener"):
            ip = str(peer[0])
            if self.trusted is not None:
                if not _trusted(ip, self.trusted):
                    self._refusals.warn(
                        "connection from %s refused: not in the listener's trusted_proxies "
                        "(proxy_protocol is on)",
                        ip,
                    )
                    conn.close()
                    continue
            elif not self.counter.admit(ip):
                log.debug("connection from %s refused: too many from that address", ip)
                conn.close()
                continue
            conn.setblocking(False)
            task = self.loop.create_task(self._serve(conn, (ip, int(peer[1]))))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, peer: Address) -> None:
        counted = None if self.trusted is not None else peer[0]
        deadline = self.loop.time() + self.timeout
        try:
            client = peer
            if self.trusted is not None:
                header = await asyncio.wait_for(self._read_header(conn), self.timeout)
                if header.source is not None:
                    client = header.source
                if not self.counter.admit(client[0]):
                    log.debug("connection from %s refused: too many from that address", client)
                    conn.close()
                    return
                counted = client[0]
            context = self.tls
            if self.detect_tls:
                remaining = max(deadline - self.loop.time(), 0.001)
                first = await asyncio.wait_for(self._peek(conn), remaining)
                if first != b"\x16":
                    context = None
            name = "tls" if context is not None else "tcp"
            local = conn.getsockname()
            five_tuple: FiveTuple = (name, client, (str(local[0]), int(local[1])))

            def protocol() -> StreamConnection:
                made = self.make_protocol(name, five_tuple)
                made.admitted = True
                return made

            remaining = max(deadline - self.loop.time(), 0.001)
            await self.loop.connect_accepted_socket(
                protocol,
                conn,
                ssl=context,
                ssl_handshake_timeout=remaining if context is not None else None,
            )
        except ProxyHeaderError as exc:
            log.warning("connection from %s closed: %s", peer[0], exc)
            self._drop(conn, counted)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("connection from %s closed before it was served: %r", peer[0], exc)
            self._drop(conn, counted)
        except asyncio.CancelledError:
            self._drop(conn, counted)
            raise

    def _drop(self, conn: socket.socket, counted: str | None) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(conn.fileno())
        conn.close()
        if counted is not None:
            self.counter.release(counted)

    async def _readable(self, conn: socket.socket) -> None:
        ready: asyncio.Future[None] = self.loop.create_future()
        fd = conn.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            self.loop.remove_reader(fd)

    async def _read_header(self, conn: socket.socket) -> ProxyHeader:
        """The PROXY header, taken off the socket and not one byte more: it is peeked
        at until whole, then read by its exact length."""
        seen = -1
        while True:
            await self._readable(conn)
            data = conn.recv(V2_MAX, socket.MSG_PEEK)
            if not data:
                raise ConnectionError("closed before its PROXY header")
            header = parse_proxy_header(data)
            if header is not None:
                taken = conn.recv(header.length)
                if len(taken) != header.length:
                    raise ConnectionError("PROXY header could not be read whole")
                return header
            if len(data) == seen:
                # Peeking leaves the bytes in place, so the socket stays readable: wait
                # for the rest instead of spinning on what is already there.
                await asyncio.sleep(_HEADER_POLL)
            seen = len(data)

    async def _peek(self, conn: socket.socket) -> bytes:
        await self._readable(conn)
        first = conn.recv(1, socket.MSG_PEEK)
        if not first:
            raise ConnectionError("closed before its first byte")
        return first

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in self._tasks:
            task.cancel()


# How often a PROXY header cut in two is looked at again (within the first-message timeout).
_HEADER_POLL = 0.02


def _trusted(ip: str, networks: Sequence[PeerNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    candidates = (address, mapped) if mapped is not None else (address,)
    return any(
        a in network for a in candidates for network in networks if a.version == network.version
    )


class _LogGate:
    """One warning line per interval at most, saying how many it stood for: an untrusted
    source knocking at a PROXY listener must not flood the log."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.held = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.held += 1
            return
        if self.held:
            message += f" (and {self.held} more in the last {self.interval:.0f} s)"
        log.warning(message, *args)
        self.next_at = now + self.interval
        self.held = 0
