"""Malformed and hostile input (RFC 8489 §6.3, RFC 7983): `receive()` answers a broken
request with 400 when it can, drops everything else, and never raises."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyturn.config import Config
from pyturn.core.server import (
    AllocationCreated,
    AllocationDeleted,
    AllocationRefreshed,
    AuthFailed,
    PeerDenied,
    QuotaRejected,
    Reply,
    RequestHandled,
    SendToPeer,
    TurnServer,
)
from pyturn.wire.attributes import (
    MAGIC_COOKIE,
    AdditionalAddressFamily,
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    ErrorCode,
    EvenPort,
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    UnknownAttribute,
    XorPeerAddress,
)
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, message_type
from tests.core.turn_client import (
    CLIENT,
    PEER,
    PEER2,
    T0,
    FakeBinder,
    TurnTestClient,
    make_config,
)

ACTION_TYPES = (
    Reply,
    SendToPeer,
    RequestHandled,
    AllocationCreated,
    AllocationRefreshed,
    AllocationDeleted,
    AuthFailed,
    PeerDenied,
    QuotaRejected,
)
NONCE_SECRET = b"n" * 32
TXID = bytes(range(1, 13))
COOKIE = MAGIC_COOKIE.to_bytes(4, "big")


def header(msg_type: int, length: int, txid: bytes = TXID) -> bytes:
    return struct.pack("!HH", msg_type, length) + COOKIE + txid


def overrunning(msg_type: int) -> bytes:
    """A message whose length field is right but whose one attribute claims 16 bytes of 4."""
    return header(msg_type, 8) + struct.pack("!HH", RequestedTransport.TYPE, 16) + b"\x11\0\0\0"


def check_actions(actions: object) -> None:
    """The invariant: a list of known actions, and every reply decodes as STUN."""
    assert isinstance(actions, list)
    for action in actions:
        assert isinstance(action, ACTION_TYPES)
        if isinstance(action, Reply):
            reply = decode(action.data)
            assert reply.msg_class in (MessageClass.SUCCESS, MessageClass.ERROR)


# -- not STUN at all -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"hello, this is not a STUN message",
        bytes(20),  # STUN-sized, but no magic cookie
        b"\x16\xfe\xfd" + bytes(30),  # a DTLS record
        b"\x80\x60" + bytes(30),  # RTP
        b"\x00\x01\x00\x00" + b"\x00\x00\x00\x00" + TXID,  # wrong cookie
    ],
)
def test_non_stun_bytes_are_dropped(server: TurnServer, data: bytes) -> None:
    """RFC 7983 / RFC 8489 §6.3: what is not STUN or ChannelData is silently discarded."""
    assert server.receive(data, ("udp", CLIENT, ("192.0.2.10", 3478)), T0) == []


# -- malformed STUN ------------------------------------------------------------------------


def test_request_with_an_attribute_running_past_the_end_gets_400_with_its_transaction_id(
    client: TurnTestClient,
) -> None:
    """RFC 8489 §6.3: a malformed request earns 400 with the same transaction id."""
    actions = client.send_bytes(overrunning(message_type(Method.ALLOCATE, MessageClass.REQUEST)))
    replies = [a for a in actions if isinstance(a, Reply)]
    assert len(replies) == 1
    reply = decode(replies[0].data)
    assert reply.transaction_id == TXID
    assert reply.method == Method.ALLOCATE
    assert reply.msg_class == MessageClass.ERROR
    error = reply.get(ErrorCode)
    assert error is not None
    assert error.code == 400
    assert RequestHandled(Method.ALLOCATE, 400, CLIENT) in actions


@pytest.mark.parametrize(
    "data",
    [
        header(0x0003, 8) + b"\x00\x19\x00\x04",  # length says 8, 4 bytes follow
        header(0x0003, 2) + b"\x00\x19",  # length not a multiple of 4
        header(0x0003, 8) + struct.pack("!HH", Lifetime.TYPE, 3) + b"\0\0\0\0",  # bad LIFETIME
        header(0x0001, 8) + struct.pack("!HH", XorPeerAddress.TYPE, 4) + b"\0\x09\0\0",
    ],
)
def test_other_malformed_requests_get_400(client: TurnTestClient, data: bytes) -> None:
    """RFC 8489 §6.3: wrong lengths or undecodable attributes in a request -> 400."""
    result = client.exchange(data)
    assert result.code == 400
    assert result.message is not None
    assert result.message.transaction_id == TXID


@pytest.mark.parametrize(
    "msg_class", [MessageClass.INDICATION, MessageClass.SUCCESS, MessageClass.ERROR]
)
def test_malformed_indications_and_responses_are_dropped(
    client: TurnTestClient, msg_class: MessageClass
) -> None:
    """RFC 8489 §6.3: only requests are answered; a broken indication or response is
    silently discarded."""
    assert client.send_bytes(overrunning(message_type(Method.SEND, msg_class))) == []
    assert client.send_bytes(overrunning(message_type(Method.ALLOCATE, msg_class))) == []


@pytest.mark.parametrize("msg_class", [MessageClass.SUCCESS, MessageClass.ERROR])
def test_well_formed_responses_from_a_client_are_ignored(
    server: TurnServer, client: TurnTestClient, msg_class: MessageClass
) -> None:
    """RFC 8489 §6.3: the server has no transaction these could answer -> discarded."""
    message = Message(Method.BINDING, msg_class, TXID, (ErrorCode(400, "x"),))
    assert client.send_bytes(encode(message)) == []
    assert server.allocations == {}


def test_indications_other_than_send_are_dropped(client: TurnTestClient) -> None:
    """RFC 8656 §11.4: a Data indication is for clients; the server ignores one."""
    assert client.allocate().code == 0
    assert client.create_permission(PEER).code == 0
    message = Message(
        Method.DATA, MessageClass.INDICATION, TXID, (XorPeerAddress(*PEER), Data(b"x"))
    )
    assert client.send_bytes(encode(message)) == []


def test_request_with_a_wrong_fingerprint_is_dropped(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8489 §6.3 and §14.7: when FINGERPRINT is used it must contain the correct value,
    otherwise the message is silently discarded (it may not be STUN at all)."""
    client.fetch_nonce()
    data = bytearray(
        client.encode_request(Method.ALLOCATE, [RequestedTransport(17)], fingerprint=True)
    )
    data[-1] ^= 0xFF
    assert client.send_bytes(bytes(data)) == []
    assert server.allocations == {}


def test_request_with_an_unknown_method_gets_400(client: TurnTestClient) -> None:
    """RFC 8489 §6.3: a request for a method the server does not support -> 400."""
    result = client.exchange(encode(Message(0x0FF, MessageClass.REQUEST, TXID)))
    assert result.code == 400


# -- fuzzing -------------------------------------------------------------------------------


def prepared_server(config: Config) -> tuple[TurnServer, TurnTestClient]:
    """A server where alice holds an allocation with a permission and a channel."""
    server = TurnServer(config, FakeBinder(), relay_ipv4="192.0.2.10", nonce_secret=NONCE_SECRET)
    alice = TurnTestClient(server)
    alice.nonce = server.auth.make_nonce(CLIENT[0], T0)
    assert alice.allocate().code == 0
    assert alice.create_permission(PEER).code == 0
    assert alice.channel_bind(0x4000, PEER2).code == 0
    return server, alice


CONFIG = make_config()
_template_server, _template = prepared_server(CONFIG)
VALID_FRAMES = [
    _template.encode_request(Method.ALLOCATE, [RequestedTransport(17), Lifetime(1200)]),
    _template.encode_request(Method.REFRESH, [Lifetime(0)]),
    _template.encode_request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)]),
    _template.encode_request(
        Method.CHANNEL_BIND, [ChannelNumber(0x4001), XorPeerAddress(*PEER)], fingerprint=True
    ),
    _template.encode_request(Method.REFRESH, [Lifetime(600)], sha256=True),
    encode(
        Message(Method.SEND, MessageClass.INDICATION, TXID, (XorPeerAddress(*PEER), Data(b"hi")))
    ),
    b"\x40\x00\x00\x05hello\x00\x00\x00",
]

FUZZ_SETTINGS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ_SETTINGS
@given(data=st.binary(max_size=128))
def test_random_bytes_never_raise(data: bytes) -> None:
    """Fuzz invariant (RFC 8489 §6.3): any datagram gives a list of actions, never an error."""
    server, alice = prepared_server(CONFIG)
    check_actions(server.receive(data, alice.five_tuple, T0 + 1))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "flip", "truncate", "insert", "delete"]))
        if not frame:
            break
        pos = draw(st.integers(0, len(frame) - 1))
        if kind == "set":
            frame[pos] = draw(st.integers(0, 255))
        elif kind == "flip":
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del frame[pos:]
        elif kind == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del frame[pos : pos + draw(st.integers(1, 8))]
    return bytes(frame)


@FUZZ_SETTINGS
@given(data=mutated_frames())
def test_mutated_valid_messages_never_raise(data: bytes) -> None:
    """Fuzz invariant: mutations of valid, signed TURN messages never make receive() raise."""
    server, alice = prepared_server(CONFIG)
    check_actions(server.receive(data, alice.five_tuple, T0 + 1))


_peers = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 0xFFFF)
)
_turn_attributes: st.SearchStrategy[Attribute] = st.one_of(
    st.builds(RequestedTransport, st.integers(0, 255)),
    st.builds(Lifetime, st.integers(0, 0xFFFF_FFFF)),
    st.builds(EvenPort, st.booleans()),
    st.builds(ReservationToken, st.binary(min_size=8, max_size=8)),
    st.builds(RequestedAddressFamily, st.integers(0, 3)),
    st.builds(AdditionalAddressFamily, st.integers(0, 3)),
    st.builds(DontFragment),
    st.builds(ChannelNumber, st.integers(0, 0xFFFF)),
    _peers.map(lambda p: XorPeerAddress(*p)),
    st.builds(Data, st.binary(max_size=16)),
    st.builds(UnknownAttribute, st.integers(0x7F00, 0x7FFF), st.binary(max_size=8)),
    st.builds(UnknownAttribute, st.integers(0xC000, 0xC0FF), st.binary(max_size=8)),
)


@FUZZ_SETTINGS
@given(
    method=st.sampled_from(
        [Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND, 0x0FF]
    ),
    attributes=st.lists(_turn_attributes, max_size=6),
    sha256=st.booleans(),
)
def test_signed_requests_with_arbitrary_turn_attributes_never_raise(
    method: int, attributes: list[Attribute], sha256: bool
) -> None:
    """Fuzz invariant: authenticated requests carrying any mix of TURN attributes reach the
    handlers and always produce exactly one decodable reply."""
    server, alice = prepared_server(CONFIG)
    data = alice.encode_request(method, attributes, sha256=sha256)
    actions = server.receive(data, alice.five_tuple, T0 + 1)
    check_actions(actions)
    assert len([a for a in actions if isinstance(a, Reply)]) == 1
