"""Real-socket TURN clients, floods and process gauges for the hostile-traffic tests.

`TurnClient` speaks TURN over UDP or TCP to a real `pyturn serve` process. It builds and
signs its requests with the sans-IO test client of the core tests
(`tests/core/turn_client.TurnTestClient`, used as a codec only), retransmits over UDP
(RFC 8489 §6.2.1, with a shorter first timeout), and keeps what the relay delivers
(Data indications, ChannelData) in a queue.

`flood_udp` sends a bounded number of datagrams for a bounded time from its own
thread, so an honest client on the event loop can try its luck meanwhile.

Everything here talks to loopback only: `LOOPBACK`, `HONEST_IP` (127.0.0.2, another
source address for the per-IP budgets) and `LOOPBACK6`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from pyturn.core.auth import rest_password, rest_username
from pyturn.core.server import TurnServer
from pyturn.wire.attributes import (
    TRANSPORT_UDP,
    Address,
    Attribute,
    ChannelNumber,
    Data,
    ErrorCode,
    EvenPort,
    Lifetime,
    Nonce,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    XorPeerAddress,
    XorRelayedAddress,
)
from pyturn.wire.channel_data import StreamFramer, channel_header, decode_channel_data
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, new_transaction_id
from tests.core.turn_client import TurnTestClient
from tests.interop.server_process import PASSWORD, REALM, REST_SECRET, USER, ServerProcess

LOOPBACK = "127.0.0.1"
HONEST_IP = "127.0.0.2"
LOOPBACK6 = "::1"

# RFC 8489 §6.2.1 says 500 ms then doubling, 7 tries; loopback needs less patience, a
# flooded server a little more.
FIRST_RTO = 0.25
MAX_TRIES = 7  # RFC 8489 Rc: 0.25 + 0.5 + 1 + 2 + 2 + 2 + 2 s at most
STREAM_TIMEOUT = 5.0

# TurnTestClient is used only to build and sign requests: it never calls the server.
_NO_SERVER = cast(TurnServer, None)


def rest_credentials(user: str, ttl: int = 3600) -> tuple[str, str]:
    """A TURN REST API username and password for `user` (quota counted per `user`)."""
    username = rest_username(int(time.time()) + ttl, user)
    return username, rest_password(REST_SECRET, username)


def code_of(message: Message | None) -> int | None:
    """0 for a success response, the ERROR-CODE for an error, None for no answer."""
    if message is None:
        return None
    if message.msg_class == MessageClass.SUCCESS:
        return 0
    error = message.get(ErrorCode)
    return error.code if error is not None else -1


T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 40.0) -> T:
    """Run a scenario on a fresh event loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# -- protocols -----------------------------------------------------------------------------


class _Inbox:
    """Responses by transaction id; relayed data in a queue; everything else counted."""

    def __init__(self) -> None:
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.relayed: asyncio.Queue[tuple[object, bytes]] = asyncio.Queue()
        self.indications: list[Message] = []
        self.received = 0

    def deliver(self, data: bytes) -> None:
        self.received += 1
        if data and 0x40 <= data[0] <= 0x7F:
            with contextlib.suppress(DecodeError):
                self.relayed.put_nowait(decode_channel_data(data))
            return
        try:
            message = decode(data)
        except DecodeError:
            return
        if message.msg_class in (MessageClass.SUCCESS, MessageClass.ERROR):
            future = self.waiting.get(message.transaction_id)
            if future is not None and not future.done():
                future.set_result(data)
        elif message.method == Method.DATA:
            peer = message.get(XorPeerAddress)
            payload = message.get(Data)
            if peer is not None and payload is not None:
                self.relayed.put_nowait((peer.address, payload.value))
        else:
            self.indications.append(message)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.inbox.deliver(data)

    def error_received(self, exc: Exception) -> None:
        pass


class _Stream(asyncio.Protocol):
    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox
        self.framer = StreamFramer()
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.framer.feed(data)
        try:
            for frame in self.framer.frames():
                self.inbox.deliver(frame)
        except DecodeError:
            self.framer.buffer.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


# -- the client ----------------------------------------------------------------------------


@dataclass
class TurnClient:
    """One TURN client on one 5-tuple of a real server."""

    server: Address
    codec: TurnTestClient
    transport: str = "udp"
    inbox: _Inbox = field(default_factory=_Inbox)
    relayed: Address | None = None
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Transport | None = None
    _stream: _Stream | None = None

    @classmethod
    async def open(
        cls,
        server: Address,
        *,
        transport: str = "udp",
        local_ip: str = LOOPBACK,
        username: str = USER,
        password: str = PASSWORD,
    ) -> TurnClient:
        codec = TurnTestClient(_NO_SERVER, username, password, realm=REALM)
        client = cls(server, codec, transport)
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        if transport == "udp":
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(client.inbox),
                local_addr=(local_ip, 0),
                remote_addr=server,
                family=family,
            )
            client._udp = udp
        else:
            tcp, stream = await loop.create_connection(
                lambda: _Stream(client.inbox), server[0], server[1], local_addr=(local_ip, 0)
            )
            client._tcp, client._stream = tcp, stream
        return client

    @property
    def local(self) -> Address:
        transport = self._udp or self._tcp
        assert transport is not None
        name = transport.get_extra_info("sockname")
        return (str(name[0]), int(name[1]))

    @property
    def closed(self) -> bool:
        if self._tcp is not None:
            return self._tcp.is_closing()
        return self._udp is None or self._udp.is_closing()

    async def wait_closed(self, timeout: float) -> bool:
        """For TCP: True when the server closes the connection within `timeout`."""
        assert self._stream is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._stream.closed), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()

    # -- bytes ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._udp is not None:
            self._udp.sendto(data)
        else:
            assert self._tcp is not None
            self._tcp.write(data)

    async def transact(self, data: bytes, *, tries: int | None = None) -> Message | None:
        """Send a request (retransmitting over UDP) and wait for its response."""
        txid = bytes(data[8:20])
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.inbox.waiting[txid] = future
        try:
            if self.transport != "udp":
                self.send(data)
                return decode(await asyncio.wait_for(future, STREAM_TIMEOUT))
            rto = FIRST_RTO
            for _ in range(tries or MAX_TRIES):
                self.send(data)
                try:
                    return decode(await asyncio.wait_for(asyncio.shield(future), rto))
                except TimeoutError:
                    rto = min(rto * 2, 2.0)
            return None
        except TimeoutError:
            return None
        finally:
            self.inbox.waiting.pop(txid, None)
            future.cancel()

    # -- TURN ----------------------------------------------------------------------------

    async def request(
        self,
        method: int,
        attributes: Iterable[Attribute] = (),
        *,
        fingerprint: bool = False,
        sha256: bool = False,
    ) -> Message | None:
        """An authenticated request; fetches a nonce first and retries once on 438."""
        attrs = list(attributes)
        codec = self.codec
        if codec.nonce is None:
            challenge = await self.transact(codec.encode_request(method, attrs, auth=False))
            if code_of(challenge) != 401:
                return challenge
            assert challenge is not None
            nonce = challenge.get(Nonce)
            assert nonce is not None, "401 without NONCE"
            codec.nonce = nonce.value
        data = codec.encode_request(method, attrs, fingerprint=fingerprint, sha256=sha256)
        response = await self.transact(data)
        if code_of(response) == 438:
            assert response is not None
            nonce = response.get(Nonce)
            assert nonce is not None
            codec.nonce = nonce.value
            data = codec.encode_request(method, attrs, fingerprint=fingerprint, sha256=sha256)
            response = await self.transact(data)
        return response

    async def allocate(
        self,
        *,
        transport: int = TRANSPORT_UDP,
        lifetime: int | None = None,
        family: int | None = None,
        even_port: bool | None = None,
        token: bytes | None = None,
        extra: Sequence[Attribute] = (),
    ) -> Message | None:
        attrs: list[Attribute] = [RequestedTransport(transport)]
        if lifetime is not None:
            attrs.append(Lifetime(lifetime))
        if family is not None:
            attrs.append(RequestedAddressFamily(family))
        if even_port is not None:
            attrs.append(EvenPort(even_port))
        if token is not None:
            attrs.append(ReservationToken(token))
        response = await self.request(Method.ALLOCATE, [*attrs, *extra])
        if code_of(response) == 0:
            assert response is not None
            relayed = response.get(XorRelayedAddress)
            assert relayed is not None
            self.relayed = relayed.address
        return response

    async def refresh(self, lifetime: int | None = None) -> Message | None:
        return await self.request(
            Method.REFRESH, [Lifetime(lifetime)] if lifetime is not None else []
        )

    async def create_permission(self, *peers: Address) -> Message | None:
        return await self.request(Method.CREATE_PERMISSION, [XorPeerAddress(*p) for p in peers])

    async def channel_bind(self, number: int, peer: Address) -> Message | None:
        return await self.request(
            Method.CHANNEL_BIND, [ChannelNumber(number), XorPeerAddress(*peer)]
        )

    async def connect(self, peer: Address) -> Message | None:
        """RFC 6062 §5.2 Connect, on a TCP allocation's control connection."""
        return await self.request(Method.CONNECT, [XorPeerAddress(*peer)])

    def send_indication(self, peer: Address, data: bytes) -> None:
        attrs = (XorPeerAddress(*peer), Data(data))
        self.send(
            encode(Message(Method.SEND, MessageClass.INDICATION, new_transaction_id(), attrs))
        )

    def channel_data(self, number: int, data: bytes) -> None:
        pad = b"\x00" * (-len(data) % 4) if self.transport != "udp" else b""
        self.send(channel_header(number, len(data)) + data + pad)

    async def binding(self, *, fingerprint: bool = False) -> Message | None:
        return await self.transact(
            self.codec.encode_request(Method.BINDING, auth=False, fingerprint=fingerprint)
        )

    async def receive(self, timeout: float = 2.0) -> tuple[object, bytes] | None:
        """The next relayed (peer or channel, data), or None after `timeout` seconds."""
        try:
            return await asyncio.wait_for(self.inbox.relayed.get(), timeout)
        except TimeoutError:
            return None


# -- a loopback peer -----------------------------------------------------------------------


class EchoPeer:
    """A UDP peer on loopback that sends every datagram back where it came from.

    It runs on its own thread, so it outlives the event loops of the tests that use it.
    """

    def __init__(self, host: str = LOOPBACK) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.address: Address = (host, self.sock.getsockname()[1])
        self.echoed = 0
        self.received: list[tuple[Address, bytes]] = []
        self.echo = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-peer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            source: Address = (str(addr[0]), int(addr[1]))
            if len(self.received) < 1000:
                self.received.append((source, data))
            if self.echo:
                # Counted before the send: a test that has seen the echo must also see
                # the count (this thread could otherwise lose the GIL in between).
                self.echoed += 1
                try:
                    self.sock.sendto(data, addr)
                except OSError:
                    self.echoed -= 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sock.close()


async def relay_round_trip(client: TurnClient, echo: EchoPeer, channel: int = 0x4001) -> None:
    """Permission, channel, ChannelData and a Send indication to the echo peer and back."""
    assert code_of(await client.create_permission(echo.address)) == 0
    assert code_of(await client.channel_bind(channel, echo.address)) == 0
    for attempt in range(3):
        client.channel_data(channel, b"ping %d" % attempt)
        got = await client.receive(1.0)
        if got is not None:
            assert got == (channel, b"ping %d" % attempt), got
            break
    else:
        raise AssertionError("no ChannelData came back from the echo peer")
    # With a channel bound, the echo comes back as ChannelData (RFC 8656 §12.6).
    for attempt in range(3):
        client.send_indication(echo.address, b"send %d" % attempt)
        got = await client.receive(1.0)
        if got is not None:
            assert got[1] == b"send %d" % attempt, got
            return
    raise AssertionError("no data came back for a Send indication")


async def honest_session(
    server: Address,
    echo: EchoPeer,
    *,
    local_ip: str = HONEST_IP,
    transport: str = "udp",
    username: str = USER,
    password: str = PASSWORD,
) -> float:
    """An honest client allocates, relays both ways and deletes; returns the seconds taken."""
    started = time.perf_counter()
    client = await TurnClient.open(
        server, transport=transport, local_ip=local_ip, username=username, password=password
    )
    try:
        response = await client.allocate()
        assert code_of(response) == 0, f"honest Allocate answered {code_of(response)}"
        await relay_round_trip(client, echo)
        assert code_of(await client.refresh(0)) == 0
    finally:
        client.close()
    return time.perf_counter() - started


# -- floods --------------------------------------------------------------------------------

MAX_FLOOD_PACKETS = 50_000
MAX_FLOOD_SECONDS = 5.0


@dataclass
class FloodResult:
    sent: int
    seconds: float
    replies: int = 0
    reply_bytes: int = 0
    codes: Counter[int | None] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def flood_udp(
    target: Address,
    packet: Callable[[int], bytes],
    *,
    count: int,
    seconds: float,
    source_ip: str = LOOPBACK,
    sockets: int = 1,
    pace: float | None = None,
) -> FloodResult:
    """Send `packet(i)` for i < count from `sockets` source ports, within `seconds`.

    Bounded twice: at most MAX_FLOOD_PACKETS datagrams and MAX_FLOOD_SECONDS, whatever
    the arguments say. `pace` spreads the packets evenly over that many seconds. Replies
    are read and counted by ERROR-CODE (0 for success responses).
    """
    count = min(count, MAX_FLOOD_PACKETS)
    seconds = min(seconds, MAX_FLOOD_SECONDS)
    socks = []
    for _ in range(max(1, sockets)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.bind((source_ip, 0))
        sock.setblocking(False)
        socks.append(sock)
    result = FloodResult(sent=0, seconds=0.0)

    def drain() -> None:
        for sock in socks:
            while True:
                try:
                    data = sock.recv(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                result.replies += 1
                result.reply_bytes += len(data)
                try:
                    result.codes[code_of(decode(data))] += 1
                except DecodeError:
                    result.codes[None] += 1

    started = time.perf_counter()
    deadline = started + seconds
    try:
        for i in range(count):
            now = time.perf_counter()
            if now >= deadline:
                break
            if pace is not None:
                due = started + pace * i / count
                if due > now:
                    time.sleep(due - now)
            try:
                socks[i % len(socks)].sendto(packet(i), target)
                result.sent += 1
            except (BlockingIOError, InterruptedError):
                time.sleep(0.0005)
            if i % 256 == 0:
                drain()
        result.seconds = time.perf_counter() - started
        time.sleep(0.3)
        drain()
    finally:
        for sock in socks:
            sock.close()
    return result


# -- process gauges ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_clean_log(server: ServerProcess) -> None:
    """Hostile input may be refused, never crash a handler: no traceback in the log."""
    for marker in ("Traceback", "Exception in callback", " ERROR "):
        assert marker not in server.log_text, f"{marker!r} in the server log:\n{server.log_text}"


def pid_of(server: ServerProcess) -> int:
    assert server.process is not None, "server not started"
    return server.process.pid
