"""The relay fast paths give the same answers as the full codec (RFC 8656 §11.2, §12.5)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyturn.core.server import SendToPeer, TurnServer
from pyturn.wire.attributes import Attribute, Data, DontFragment, Software, XorPeerAddress
from pyturn.wire.message import Message, MessageClass, Method, encode, new_transaction_id
from tests.core.turn_client import MakeServer, TurnTestClient

PEER = ("8.8.8.8", 5000)


def _ready(make_server: MakeServer) -> tuple[TurnServer, TurnTestClient]:
    server = make_server()
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    assert client.create_permission(PEER).code == 0
    return server, client


def _indication(attributes: list[Attribute], *, fingerprint: bool = False) -> bytes:
    message = Message(Method.SEND, MessageClass.INDICATION, new_transaction_id(), tuple(attributes))
    return encode(message, fingerprint=fingerprint)


def _slow(server: TurnServer, client: TurnTestClient, data: bytes) -> list[SendToPeer]:
    """What the full codec decides, bypassing the fast path."""
    from pyturn.wire.message import decode

    send = server._send_indication(decode(data), client.five_tuple, 0.0)
    return [send] if send is not None else []


def test_the_fast_path_relays_a_plain_send_indication(make_server: MakeServer) -> None:
    server, client = _ready(make_server)
    data = _indication([XorPeerAddress(*PEER), Data(b"hello"), DontFragment()])
    (send,) = server.receive(data, client.five_tuple, 0)
    assert isinstance(send, SendToPeer)
    assert (send.peer, send.data) == (PEER, b"hello")
    assert server.receive(data, client.five_tuple, 0) == _slow(server, client, data)


def test_unusual_send_indications_go_to_the_full_codec(make_server: MakeServer) -> None:
    """FINGERPRINT, SOFTWARE or a second DATA: the answer is the full codec's."""
    server, client = _ready(make_server)
    for data in (
        _indication([XorPeerAddress(*PEER), Data(b"x")], fingerprint=True),
        _indication([Software("x"), XorPeerAddress(*PEER), Data(b"y")]),
        _indication([XorPeerAddress(*PEER), Data(b"1"), Data(b"2")]),
        _indication([XorPeerAddress("1.1.1.1", 9), Data(b"no permission")]),
        _indication([Data(b"no peer")]),
    ):
        assert server.receive(data, client.five_tuple, 0) == _slow(server, client, data)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=64),
    port=st.integers(0, 65535),
    permitted=st.booleans(),
    fingerprint=st.booleans(),
)
def test_fast_and_full_paths_agree_on_any_send_indication(
    payload: bytes, port: int, permitted: bool, fingerprint: bool
) -> None:
    from tests.core.turn_client import FakeBinder, make_config

    server = TurnServer(make_config(), FakeBinder(), relay_ipv4="192.0.2.10")
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    host = PEER[0] if permitted else "1.1.1.1"
    assert client.create_permission(PEER).code == 0
    data = _indication([XorPeerAddress(host, port), Data(payload)], fingerprint=fingerprint)
    assert server.receive(data, client.five_tuple, 0) == _slow(server, client, data)


@settings(max_examples=100, deadline=None)
@given(
    host=st.ip_addresses().map(str),
    port=st.integers(0, 65535),
    fingerprint=st.booleans(),
)
def test_the_binding_fast_path_answers_byte_for_byte_like_the_codec(
    host: str, port: int, fingerprint: bool
) -> None:
    """RFC 8489 §7.3: XOR-MAPPED-ADDRESS, and FINGERPRINT only when the request had one."""
    from pyturn.core.server import Reply
    from pyturn.wire.message import decode
    from tests.core.turn_client import FakeBinder, make_config

    server = TurnServer(make_config(), FakeBinder(), relay_ipv4="192.0.2.10")
    five_tuple = ("udp", (host, port), ("192.0.2.10", 3478))
    request = encode(
        Message(Method.BINDING, MessageClass.REQUEST, new_transaction_id()),
        fingerprint=fingerprint,
    )
    fast = server.receive(request, five_tuple, 0)
    slow = server._request(decode(request), five_tuple, 0)
    assert isinstance(fast[0], Reply) and isinstance(slow, Reply)
    assert fast[0].data == slow.data
