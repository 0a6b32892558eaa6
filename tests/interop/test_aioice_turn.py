"""aioice's TURN client (the one aiortc uses) against the real server.

aioice 0.13 only ever sends data over channels (`send_data` binds one first), so the
Send/Data indication path is driven with aioice's own pieces: its authenticated
`request_with_retry` for CreatePermission, a `stun.Message` Send indication, and its
parser for the Data indication that comes back. A small subclass records every raw
frame the client receives, to tell Data indications from ChannelData.

The peer is a UDP echo socket on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

import pytest
from aioice import stun
from aioice.turn import TurnClientTcpProtocol, TurnClientUdpProtocol, create_turn_endpoint

from pyturn.core.auth import rest_password, rest_username
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    REST_SECRET,
    USER,
    ServerFactory,
    ServerProcess,
    relayed_packets,
)

pytestmark = pytest.mark.interop

T = TypeVar("T")
Addr = tuple[str, int]

SCENARIO_TIMEOUT = 30.0
STEP_TIMEOUT = 5.0
CHANNEL_MESSAGES = 10


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, SCENARIO_TIMEOUT)

    return asyncio.run(bounded())


class EchoPeer(asyncio.DatagramProtocol):
    """A UDP peer that echoes every datagram and remembers where it came from."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[bytes, Addr]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.received.append((data, addr))
        assert self.transport is not None
        self.transport.sendto(data, addr)


class Collector(asyncio.DatagramProtocol):
    """What aioice hands to the application: (payload, peer) in arrival order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Addr]] = asyncio.Queue()
        self.closed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.queue.put_nowait((data, addr))

    def connection_lost(self, exc: Exception | None) -> None:
        # aioice calls this once the allocation is deleted and its socket closed.
        self.closed.set()


class RecordingUdp(TurnClientUdpProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames: list[bytes] = []
        self.frame_event = asyncio.Event()

    def datagram_received(self, data: bytes | str, addr: Addr) -> None:
        assert isinstance(data, bytes)
        self.frames.append(data)
        self.frame_event.set()
        super().datagram_received(data, addr)


class RecordingTcp(TurnClientTcpProtocol):
    # TurnStreamMixin.data_received de-frames the stream and calls datagram_received.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames: list[bytes] = []
        self.frame_event = asyncio.Event()

    def datagram_received(self, data: bytes | str, addr: Addr) -> None:
        assert isinstance(data, bytes)
        self.frames.append(data)
        self.frame_event.set()
        super().datagram_received(data, addr)


Recording = RecordingUdp | RecordingTcp


async def start_echo_peer() -> tuple[asyncio.DatagramTransport, EchoPeer, Addr]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(EchoPeer, local_addr=(LOOPBACK, 0))
    return transport, peer, transport.get_extra_info("sockname")[:2]


async def open_client(
    server: ServerProcess, transport: str, username: str, password: str
) -> Recording:
    loop = asyncio.get_running_loop()
    client: Recording
    if transport == "udp":
        _, client = await loop.create_datagram_endpoint(
            lambda: RecordingUdp(
                server.udp_address,
                username=username,
                password=password,
                lifetime=600,
                channel_refresh_time=500,
            ),
            remote_addr=server.udp_address,
        )
    else:
        _, client = await loop.create_connection(
            lambda: RecordingTcp(
                server.tcp_address,
                username=username,
                password=password,
                lifetime=600,
                channel_refresh_time=500,
            ),
            host=LOOPBACK,
            port=server.tcp_port,
        )
    return client


async def wait_for_frame(client: Recording, start: int, want: Any) -> bytes:
    """The first raw frame from index `start` on for which `want(frame)` is true."""
    deadline = time.monotonic() + STEP_TIMEOUT
    seen = start
    for _ in range(1000):  # each pass either finds a frame or waits for a new one
        for frame in client.frames[seen:]:
            if want(frame):
                return frame
        seen = len(client.frames)
        client.frame_event.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            await asyncio.wait_for(client.frame_event.wait(), remaining)
        except TimeoutError:
            break
    raise AssertionError(f"no matching frame within {STEP_TIMEOUT} s: {client.frames[start:]}")


def is_data_indication(payload: bytes, peer: Addr) -> Any:
    def check(frame: bytes) -> bool:
        if frame[0] & 0xC0 == 0x40:  # ChannelData
            return False
        message = stun.parse_message(frame)
        return (
            message.message_method == stun.Method.DATA
            and message.message_class == stun.Class.INDICATION
            and message.attributes.get("DATA") == payload
            and message.attributes.get("XOR-PEER-ADDRESS") == peer
        )

    return check


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_aioice_relays_via_send_and_data_indications_then_via_channel_data(
    turn_server: ServerProcess, transport: str
) -> None:
    """RFC 8656 §9-§12 with aioice: CreatePermission, then a Send indication reaches the
    peer from the relayed address and its echo returns as a Data indication; then aioice
    binds a channel and further data travels as ChannelData both ways (over TCP framed
    per §12.4). Refresh with LIFETIME 0 deletes the allocation, and the server's
    deletion log line counts every relayed datagram."""
    mark = turn_server.log_mark()

    async def scenario() -> Addr:
        peer_transport, peer, peer_addr = await start_echo_peer()
        client = await open_client(turn_server, transport, USER, PASSWORD)
        collector = Collector()
        client.receiver = collector
        try:
            relayed = await client.connect()
            assert relayed[0] == LOOPBACK
            low, high = (
                turn_server.config["relay"]["min_port"],
                turn_server.config["relay"]["max_port"],
            )
            assert low <= relayed[1] <= high

            # Send/Data indications (RFC 8656 §11) need a permission (§9, via §10).
            request = stun.Message(stun.Method.CREATE_PERMISSION, stun.Class.REQUEST)
            request.attributes["XOR-PEER-ADDRESS"] = peer_addr
            response, _ = await client.request_with_retry(request)
            assert response.message_class == stun.Class.RESPONSE
            payload = b"via-send-indication"
            start = len(client.frames)
            indication = stun.Message(stun.Method.SEND, stun.Class.INDICATION)
            indication.attributes["XOR-PEER-ADDRESS"] = peer_addr
            indication.attributes["DATA"] = payload
            client.send_stun(indication, client.server)
            await wait_for_frame(client, start, is_data_indication(payload, peer_addr))
            assert peer.received[0] == (payload, relayed)

            # ChannelBind + ChannelData (RFC 8656 §12): aioice binds on first send.
            start = len(client.frames)
            for i in range(CHANNEL_MESSAGES):
                await client.send_data(b"via-channel-%d" % i, peer_addr)
            channel = client.peer_to_channel[peer_addr]
            assert 0x4000 <= channel <= 0x4FFF
            for i in range(CHANNEL_MESSAGES):
                data, source = await asyncio.wait_for(collector.queue.get(), STEP_TIMEOUT)
                assert (data, source) == (b"via-channel-%d" % i, peer_addr)
            channel_frames = [f for f in client.frames[start:] if f[0] & 0xC0 == 0x40]
            assert len(channel_frames) == CHANNEL_MESSAGES
            assert {struct.unpack("!H", f[:2])[0] for f in channel_frames} == {channel}
            assert [src for _, src in peer.received] == [relayed] * (1 + CHANNEL_MESSAGES)
        finally:
            await client.delete()
            peer_transport.close()
        return relayed

    relayed = run(scenario())
    created = turn_server.wait_for_event(
        "allocation created", since=mark, relayed=f"{LOOPBACK}:{relayed[1]}"
    )
    assert (created["user"], created.get("transport", transport)) == (USER, transport)
    deleted = turn_server.wait_for_event(
        "allocation deleted", since=mark, relayed=f"{LOOPBACK}:{relayed[1]}"
    )
    assert deleted["reason"] == "refresh"
    total = 1 + CHANNEL_MESSAGES
    assert relayed_packets(deleted) == (total, total)


def test_closing_the_tcp_connection_deletes_the_allocation(turn_server: ServerProcess) -> None:
    """RFC 8656: with TCP between client and server, the allocation lives only as long as
    the connection; closing it without a Refresh makes the server delete it at once."""
    mark = turn_server.log_mark()

    async def scenario() -> Addr:
        client = await open_client(turn_server, "tcp", USER, PASSWORD)
        relayed = await client.connect()
        assert client.refresh_task is not None
        client.refresh_task.cancel()
        client.transport.close()  # no Refresh with LIFETIME 0
        return relayed

    relayed = run(scenario())
    deleted = turn_server.wait_for_event(
        "allocation deleted", since=mark, relayed=f"{LOOPBACK}:{relayed[1]}"
    )
    assert deleted["reason"].replace("_", " ") == "connection closed"


async def echo_through_endpoint(
    server: ServerProcess, transport: str, username: str, password: str, count: int
) -> Addr:
    """The public API: create_turn_endpoint, sendto a peer, receive the echoes."""
    peer_transport, _, peer_addr = await start_echo_peer()
    turn, collector = await create_turn_endpoint(
        Collector,
        server_addr=server.udp_address if transport == "udp" else server.tcp_address,
        username=username,
        password=password,
        lifetime=600,
        channel_refresh_time=500,
        transport=transport,
    )
    try:
        relayed: Addr = turn.get_extra_info("sockname")
        for i in range(count):
            turn.sendto(b"message %d" % i, peer_addr)
        for i in range(count):
            data, source = await asyncio.wait_for(collector.queue.get(), STEP_TIMEOUT)
            assert (data, source) == (b"message %d" % i, peer_addr)
    finally:
        turn.close()
        peer_transport.close()
        # close() deletes the allocation (Refresh, LIFETIME 0) in a task; wait for it.
        await asyncio.wait_for(collector.closed.wait(), STEP_TIMEOUT)
    return relayed


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_aioice_turn_endpoint_with_rest_credentials_echoes_in_order(
    turn_server: ServerProcess, transport: str
) -> None:
    """TURN REST API credentials (`<expiry>:<user>`, base64 HMAC-SHA1 password) work
    through aioice's public `create_turn_endpoint`, and the allocation is logged under
    that username."""
    username = rest_username(int(time.time()) + 600, "dave")
    password = rest_password(REST_SECRET, username)
    mark = turn_server.log_mark()
    relayed = run(echo_through_endpoint(turn_server, transport, username, password, 20))
    assert relayed[0] == LOOPBACK
    created = turn_server.wait_for_event(
        "allocation created", since=mark, relayed=f"{LOOPBACK}:{relayed[1]}"
    )
    assert created["user"] == username


def test_aioice_turn_endpoint_with_an_expired_rest_credential_is_refused(
    server_factory: ServerFactory,
) -> None:
    """An expired REST username gets 401 even with the right HMAC (RFC 8489 §9.2.4), the
    authenticated retry too, and the server logs why.

    A server of its own: auth-failure log lines are rate-limited per client address.
    """
    server = server_factory()
    username = rest_username(int(time.time()) - 60, "dave")
    password = rest_password(REST_SECRET, username)

    async def attempt() -> None:
        await create_turn_endpoint(
            Collector,
            server_addr=server.udp_address,
            username=username,
            password=password,
            transport="udp",
        )

    with pytest.raises(stun.TransactionFailed) as failure:
        run(attempt())
    assert failure.value.response.error_code == 401
    server.wait_for_event("auth failed", user=username, reason="expired_rest_credential")
    assert not server.events("allocation created"), server.log_text


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_aioice_clients_echo_with_several_workers(
    server_factory: ServerFactory, transport: str
) -> None:
    """`workers: 2`: aioice's TURN over TCP is plain TURN on one client connection (no
    RFC 6062), so each client's allocation lives on the worker that accepted it; four
    clients at once, spread over the workers, each get every echo in order."""
    server = server_factory({"workers": 2})
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)

    async def clients() -> list[Addr]:
        return list(
            await asyncio.gather(
                *(echo_through_endpoint(server, transport, USER, PASSWORD, 10) for _ in range(4))
            )
        )

    relayed = run(clients())
    assert len(set(relayed)) == 4
