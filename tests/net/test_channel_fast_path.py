"""The ChannelData fast path of UDP clients, native (`fastpath.forward_channel_data`,
`fastpath.serve_relays`) and pure Python (PYTURN_NO_NATIVE=1): a real server must relay,
drop and count the same way with either, and a client's datagrams must take effect in
the order they came even when the native path takes some of a batch and Python the rest.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator

import pytest

from pyturn.net import relay
from pyturn.wire.attributes import ChannelNumber, Lifetime, XorPeerAddress
from pyturn.wire.channel_data import channel_header
from pyturn.wire.message import Method
from tests.hostile.client import LOOPBACK, TurnClient, assert_clean_log, code_of, run
from tests.interop.server_process import ServerProcess, base_config

STEP = 2.0


def _native_built() -> bool:
    try:
        from pyturn.net import _batch  # noqa: F401
    except ImportError:
        return False
    return True


_NATIVE = pytest.mark.skipif(not _native_built(), reason="not built")


@pytest.fixture(
    params=[
        pytest.param("native", marks=_NATIVE),
        pytest.param("native-shared-epoll", marks=_NATIVE),
        "python",
    ]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server relaying natively or not; "native-shared-epoll" first fills the relay
    sockets that the event loop watches itself, so the test's own relay socket is served
    through the poller's epoll (`fastpath.serve_relays` rather than `fastpath.serve_relay`)."""
    env = {"PYTURN_NO_NATIVE": "1"} if request.param == "python" else {}
    with ServerProcess(base_config(), tmp_path_factory.mktemp("fast-path"), env) as process:
        which = "one system call" if request.param == "python" else "natively"
        assert which in process.log_text
        if request.param == "native-shared-epoll":
            run(_hold_allocations(process, relay._DIRECT_SOCKETS))
        yield process
    assert_clean_log(process)


async def _hold_allocations(server: ServerProcess, count: int) -> None:
    """Allocations that outlive their clients' sockets (until their lifetime ends). The
    sockets stay open until all are made: a port closed earlier could be handed to the
    next client, whose Allocate would meet the allocation still there (437)."""
    clients = []
    try:
        for _ in range(count):
            client = await TurnClient.open(server.udp_address)
            clients.append(client)
            assert code_of(await client.allocate()) == 0
    finally:
        for client in clients:
            client.close()


class Peer:
    """A plain UDP socket on loopback standing in for a WebRTC peer."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(STEP)
        self.address: tuple[str, int] = self.sock.getsockname()

    def receive(self, timeout: float = STEP) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(70000)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


def test_channel_data_and_data_indications_both_ways_with_their_counters(
    server: ServerProcess,
) -> None:
    bound, unbound, stranger = Peer(), Peer(), Peer("127.0.0.2")
    payloads = [b"", b"x", b"a" * 100, b"b" * 1000]
    mark = server.log_mark()

    async def scenario() -> tuple[str, int]:
        client = await TurnClient.open(server.udp_address)
        try:
            assert code_of(await client.allocate()) == 0
            assert client.relayed is not None
            assert code_of(await client.channel_bind(0x4000, bound.address)) == 0
            for payload in payloads:
                client.channel_data(0x4000, payload)
            # Dropped: a channel nobody bound, a length past the datagram's end.
            client.channel_data(0x4001, b"unbound")
            client.send(channel_header(0x4000, 50) + b"short")
            for payload in payloads:
                assert bound.receive() == payload
            assert bound.receive(0.3) is None
            # Back: ChannelData from the bound peer, a Data indication from another port
            # of the same IP (permitted, no channel), nothing from an IP without permission.
            for payload in payloads[:3]:
                bound.sock.sendto(payload, client.relayed)
            unbound.sock.sendto(b"as a data indication", client.relayed)
            stranger.sock.sendto(b"never", client.relayed)
            got = [await client.receive(STEP) for _ in range(4)]
            assert got == [
                *[(0x4000, payload) for payload in payloads[:3]],
                (unbound.address, b"as a data indication"),
            ]
            assert await client.receive(0.3) is None
            assert code_of(await client.refresh(0)) == 0
            return client.relayed
        finally:
            client.close()

    try:
        relayed = run(scenario())
    finally:
        for peer in (bound, unbound, stranger):
            peer.close()
    deleted = server.wait_for_event(
        "allocation deleted", since=mark, relayed=f"{relayed[0]}:{relayed[1]}"
    )
    names = ("packets_to_peer", "bytes_to_peer", "packets_to_client", "bytes_to_client")
    assert {name: int(deleted[name]) for name in names} == {
        "packets_to_peer": 4,
        "bytes_to_peer": 1101,
        "packets_to_client": 4,
        "bytes_to_client": 101 + len(b"as a data indication"),
    }


async def _send_while_stopped(server: ServerProcess, client: TurnClient, *datagrams: bytes) -> None:
    """Send with the server stopped (SIGSTOP), so that all of it waits at its socket and
    one wake-up reads it together."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        for datagram in datagrams:
            client.send(datagram)
        await asyncio.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)


def _channel_data(data: bytes) -> bytes:
    return channel_header(0x4000, len(data)) + data


def test_a_clients_datagrams_take_effect_in_the_order_they_came(server: ServerProcess) -> None:
    """Everything arrives in one batch: ChannelData right after the ChannelBind that makes
    its channel is relayed, and ChannelData right after the Refresh that ends the
    allocation is not."""
    peer = Peer()
    # 31 before the Refresh: the last one and the Refresh fill the native module's first
    # read of 32, and the ChannelData after them comes in a second.
    before = [b"before the end %d" % i for i in range(31)]

    async def scenario() -> list[bytes | None]:
        client = await TurnClient.open(server.udp_address)
        bind = [ChannelNumber(0x4000), XorPeerAddress(*peer.address)]
        try:
            assert code_of(await client.allocate()) == 0
            await _send_while_stopped(
                server,
                client,
                client.codec.encode_request(Method.CHANNEL_BIND, bind),
                _channel_data(b"after the bind"),
            )
            got = [peer.receive()]
            await _send_while_stopped(
                server,
                client,
                *[_channel_data(data) for data in before],
                client.codec.encode_request(Method.REFRESH, [Lifetime(0)]),
                _channel_data(b"after the end"),
            )
            got += [peer.receive() for _ in before]
            return [*got, peer.receive(0.5)]
        finally:
            client.close()

    try:
        assert run(scenario()) == [b"after the bind", *before, None]
    finally:
        peer.close()


def test_channel_data_keeps_its_order_when_python_relays_part_of_a_wake_up(
    server: ServerProcess,
) -> None:
    """A Binding request first leaves the client's ChannelData of that read to Python;
    the read after it (past 64 datagrams) is relayed natively, and must not overtake."""
    peer = Peer()
    payloads = [b"in order %d" % i for i in range(80)]

    async def scenario() -> list[bytes | None]:
        client = await TurnClient.open(server.udp_address)
        try:
            assert code_of(await client.allocate()) == 0
            assert code_of(await client.channel_bind(0x4000, peer.address)) == 0
            await _send_while_stopped(
                server,
                client,
                client.codec.encode_request(Method.BINDING, auth=False),
                *[_channel_data(payload) for payload in payloads],
            )
            return [peer.receive() for _ in payloads]
        finally:
            client.close()

    try:
        assert run(scenario()) == payloads
    finally:
        peer.close()
