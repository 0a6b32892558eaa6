"""ChannelData and Data indications of TCP and TLS clients, relayed natively
(`fastpath.relay_stream` one way, the stream writes of `fastpath.serve_relay` the other)
and in pure Python (PYTURN_NO_NATIVE=1): a real server must frame, pad, order and count
them the same way with either, with one worker and with two.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyturn.net import batch
from pyturn.wire.attributes import Data, Lifetime, Nonce, Realm, Username, XorPeerAddress
from pyturn.wire.channel_data import encode_channel_data
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, new_transaction_id
from tests.interop.server_process import (
    LOOPBACK,
    ServerProcess,
    base_config,
    merge_config,
    tls_config,
)
from tests.interop.turn_wire_client import WireClient, open_client

STEP = 2.0
# Sizes that need 0, 3, 1 and 2 bytes of padding on a stream, and an empty payload.
PAYLOADS = [b"", b"x", b"abc", b"p" * 100, b"q" * 1001, b"r" * 1400]


_NATIVE = pytest.mark.skipif(not batch.NATIVE, reason="the native module is not built")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("native", marks=_NATIVE),
        pytest.param("native-2-workers", marks=_NATIVE),
        "python",
    ],
)
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tls_files: tuple[Path, Path],
) -> Iterator[ServerProcess]:
    config = merge_config(base_config(), tls_config(*tls_files))
    if request.param == "native-2-workers":
        config["workers"] = 2
    env = {"PYTURN_NO_NATIVE": "1"} if request.param == "python" else {}
    with ServerProcess(config, tmp_path_factory.mktemp("stream-relay"), env) as process:
        which = "one system call" if request.param == "python" else "natively"
        assert which in process.log_text
        yield process


@pytest.fixture(params=["tcp", "tls"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Peer:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.address: tuple[str, int] = self.sock.getsockname()

    def receive(self, timeout: float = STEP) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(70000)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made = [Peer(), Peer()]
    yield made
    for peer in made:
        peer.close()


def _connect(server: ServerProcess, transport: str, tls_files: tuple[Path, Path]) -> WireClient:
    address = server.tls_address if transport == "tls" else server.tcp_address
    return open_client(transport, address, ca_file=tls_files[0])


def _channel_data(payload: bytes, channel: int = 0x4000) -> bytes:
    return encode_channel_data(channel, payload, pad=True)


def _send_indication(peer: tuple[str, int], payload: bytes) -> bytes:
    attrs = (XorPeerAddress(*peer), Data(payload))
    return encode(Message(Method.SEND, MessageClass.INDICATION, new_transaction_id(), attrs))


def _binding_request() -> tuple[bytes, bytes]:
    txid = new_transaction_id()
    return encode(Message(Method.BINDING, MessageClass.REQUEST, txid, ())), txid


def _next_stun(client: WireClient) -> Message:
    frame = client.link.recv(STEP)
    assert frame is not None, "no answer"
    return decode(frame)


def test_both_ways_in_order_padded_and_counted(
    server: ServerProcess, transport: str, tls_files: tuple[Path, Path], peers: list[Peer]
) -> None:
    """One write mixes ChannelData, a Binding request and ChannelData on an unbound
    channel; a frame arrives cut in two writes. Everything bound reaches the peer in
    order, the Binding is answered, the unbound channel is dropped; the peer's datagrams
    come back as padded ChannelData (and a Data indication from an unbound port), and
    the allocation's counters say so."""
    bound, unbound = peers
    client = _connect(server, transport, tls_files)
    mark = server.log_mark()
    try:
        relayed = client.allocate_ok()[0]
        client.channel_bind(0x4000, bound.address)
        request, txid = _binding_request()
        first, rest = PAYLOADS[:3], PAYLOADS[3:]
        client.link.send(
            b"".join(_channel_data(p) for p in first)
            + request
            + _channel_data(b"nobody bound this", 0x4001)
            + b"".join(_channel_data(p) for p in rest)
        )
        answer = _next_stun(client)
        assert (answer.method, answer.msg_class, answer.transaction_id) == (
            Method.BINDING,
            MessageClass.SUCCESS,
            txid,
        )
        cut = _channel_data(b"cut in two")
        client.link.send(cut[:7])
        time.sleep(0.1)
        client.link.send(cut[7:] + _channel_data(b"after the cut"))
        got = [bound.receive() for _ in range(len(PAYLOADS) + 2)]
        assert got == [*PAYLOADS, b"cut in two", b"after the cut"]
        assert bound.receive(0.3) is None
        # Send indications: to both peers (the channel's permission covers their IP),
        # around ChannelData, and none to an IP without a permission.
        client.link.send(
            _send_indication(unbound.address, b"sent to the other port")
            + _channel_data(b"between")
            + _send_indication(("127.0.0.2", unbound.address[1]), b"no permission")
            + _send_indication(bound.address, b"sent to the bound peer")
        )
        assert unbound.receive() == b"sent to the other port"
        assert [bound.receive(), bound.receive()] == [b"between", b"sent to the bound peer"]
        assert unbound.receive(0.3) is None

        for payload in PAYLOADS:
            bound.sock.sendto(payload, relayed)
        unbound.sock.sendto(b"as a data indication", relayed)
        back = [client.receive(STEP) for _ in range(len(PAYLOADS) + 1)]
        assert back == [
            *[(("channel", 0x4000), payload) for payload in PAYLOADS],
            (unbound.address, b"as a data indication"),
        ]
        client.refresh(0)
    finally:
        client.close()
    deleted = server.wait_for_event(
        "allocation deleted", since=mark, relayed=f"{relayed[0]}:{relayed[1]}"
    )
    to_peer = [
        *PAYLOADS,
        b"cut in two",
        b"after the cut",
        b"sent to the other port",
        b"between",
        b"sent to the bound peer",
    ]
    names = ("packets_to_peer", "bytes_to_peer", "packets_to_client", "bytes_to_client")
    assert {name: int(deleted[name]) for name in names} == {
        "packets_to_peer": len(to_peer),
        "bytes_to_peer": sum(map(len, to_peer)),
        "packets_to_client": len(PAYLOADS) + 1,
        "bytes_to_client": sum(map(len, PAYLOADS)) + len(b"as a data indication"),
    }


def test_a_burst_from_the_peer_arrives_whole_and_in_order(
    server: ServerProcess, transport: str, tls_files: tuple[Path, Path], peers: list[Peer]
) -> None:
    """Hundreds of datagrams at once: the server writes them to the stream in batches,
    and the client must read every frame, in order, with nothing torn between writes."""
    bound = peers[0]
    client = _connect(server, transport, tls_files)
    try:
        relayed = client.allocate_ok()[0]
        client.channel_bind(0x4000, bound.address)
        sizes = [1 + (i * 37) % 1200 for i in range(400)]
        payloads = [i.to_bytes(2, "big") + b"\x5a" * (size - 1) for i, size in enumerate(sizes)]
        for payload in payloads:
            bound.sock.sendto(payload, relayed)
        back = [client.receive(STEP) for _ in payloads]
        assert back == [(("channel", 0x4000), payload) for payload in payloads]
        client.refresh(0)
    finally:
        client.close()


def test_channel_data_after_the_allocation_ends_is_not_relayed(
    server: ServerProcess, transport: str, tls_files: tuple[Path, Path], peers: list[Peer]
) -> None:
    """A Refresh(0) and ChannelData in one write: the ChannelData after it has no
    channel any more, whichever path reads it."""
    bound = peers[0]
    client = _connect(server, transport, tls_files)
    try:
        client.allocate_ok()
        client.channel_bind(0x4000, bound.address)
        assert client.realm is not None and client.nonce is not None
        attrs = (Lifetime(0), Username(client.username), Realm(client.realm), Nonce(client.nonce))
        refresh = encode(
            Message(Method.REFRESH, MessageClass.REQUEST, new_transaction_id(), attrs),
            integrity_key=client.key,
        )
        client.link.send(_channel_data(b"before") + refresh + _channel_data(b"after"))
        assert bound.receive() == b"before"
        assert bound.receive(0.5) is None
    finally:
        client.close()
