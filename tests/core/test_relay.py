"""Relaying data (RFC 8656 §11, §12.4-§12.7): Send indications and ChannelData towards
peers, and `ForwardingTable.from_peer` for datagrams coming back from them."""

from __future__ import annotations

import pytest

from pyturn.core.allocation import Allocation
from pyturn.core.server import SendToPeer, TurnServer
from pyturn.wire.attributes import Data, XorPeerAddress
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, new_transaction_id
from tests.core.turn_client import (
    OTHER_CLIENT,
    PEER,
    PEER2,
    T0,
    TurnTestClient,
    frame_for_client,
)


@pytest.fixture
def allocation(server: TurnServer, client: TurnTestClient) -> Allocation:
    """alice's one-hour allocation."""
    assert client.allocate(lifetime=3600).code == 0
    return server.allocations[client.five_tuple]


# -- client -> peer: Send indications ------------------------------------------------------


def test_send_indication_with_a_permission_is_relayed_to_the_peer(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §11.2: with a permission for the peer IP, DATA goes from the relayed
    address to XOR-PEER-ADDRESS."""
    assert client.create_permission(PEER).code == 0
    actions = client.send_indication(PEER, b"hello peer")
    assert actions == [SendToPeer(allocation.relay, PEER, b"hello peer")]
    assert allocation.packets_to_peer == 1
    assert allocation.bytes_to_peer == len(b"hello peer")


def test_send_indication_without_a_permission_is_dropped(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §11.2: no permission for the peer IP -> silently discarded."""
    assert client.send_indication(PEER, b"x") == []
    assert client.create_permission(PEER2).code == 0
    assert client.send_indication(PEER, b"x") == []
    assert allocation.packets_to_peer == 0


def test_send_indication_without_an_allocation_is_dropped(
    server: TurnServer, client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §5: an indication on a 5-tuple with no allocation is silently ignored."""
    assert client.create_permission(PEER).code == 0
    stranger = TurnTestClient(server, client=OTHER_CLIENT)
    assert stranger.send_indication(PEER, b"x") == []


@pytest.mark.parametrize("which", ["no peer", "no data"])
def test_send_indication_missing_an_attribute_is_dropped(
    client: TurnTestClient, allocation: Allocation, which: str
) -> None:
    """RFC 8656 §11.2: a Send indication needs XOR-PEER-ADDRESS and DATA; else discarded."""
    assert client.create_permission(PEER).code == 0
    attrs = (Data(b"x"),) if which == "no peer" else (XorPeerAddress(*PEER),)
    message = Message(Method.SEND, MessageClass.INDICATION, new_transaction_id(), attrs)
    assert client.send_bytes(encode(message)) == []


def test_send_indication_gets_no_response(client: TurnTestClient, allocation: Allocation) -> None:
    """RFC 8656 §5: indications are never answered, even when dropped."""
    actions = client.send_indication(PEER, b"x")
    assert actions == []


# -- client -> peer: ChannelData -----------------------------------------------------------


def test_channel_data_on_a_bound_channel_is_relayed_with_the_exact_payload(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §12.6: the application data of the ChannelData goes to the bound peer."""
    assert client.channel_bind(0x4001, PEER).code == 0
    payload = bytes(range(256)) * 3
    assert client.channel_data(0x4001, payload) == [SendToPeer(allocation.relay, PEER, payload)]
    assert allocation.bytes_to_peer == len(payload)


@pytest.mark.parametrize("payload", [b"a", b"abc", b"abcde", b"abcdefg"])
def test_channel_data_padding_in_a_udp_datagram_is_not_relayed(
    client: TurnTestClient, allocation: Allocation, payload: bytes
) -> None:
    """RFC 8656 §12.5: over UDP padding MAY be included; the Length field excludes it."""
    assert client.channel_bind(0x4001, PEER).code == 0
    padding = b"\x00" * (-len(payload) % 4)
    actions = client.channel_data(0x4001, payload, padding=padding)
    assert actions == [SendToPeer(allocation.relay, PEER, payload)]


def test_empty_channel_data_is_still_relayed(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §12.6: a Length of 0 still forms and sends an empty UDP datagram."""
    assert client.channel_bind(0x4001, PEER).code == 0
    assert client.channel_data(0x4001, b"") == [SendToPeer(allocation.relay, PEER, b"")]


def test_channel_data_on_an_unbound_channel_is_dropped(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §12.6: a channel not bound to any peer -> silently discarded."""
    assert client.channel_bind(0x4001, PEER).code == 0
    assert client.channel_data(0x4002, b"x") == []


def test_channel_data_without_an_allocation_is_dropped(
    server: TurnServer, client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §5: ChannelData on a 5-tuple without an allocation is silently ignored."""
    assert client.channel_bind(0x4001, PEER).code == 0
    stranger = TurnTestClient(server, client=OTHER_CLIENT)
    assert stranger.channel_data(0x4001, b"x") == []


def test_channel_data_shorter_than_its_length_is_dropped(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §12.6: a datagram too short for the claimed length -> silently discarded."""
    assert client.channel_bind(0x4001, PEER).code == 0
    assert client.send_bytes(b"\x40\x01\x00\x08abcd") == []
    assert client.send_bytes(b"\x40\x01\x00") == []


@pytest.mark.parametrize("first", [0x50, 0x7F, 0x80, 0xFF])
def test_datagrams_in_the_reserved_channel_range_are_dropped(
    client: TurnTestClient, allocation: Allocation, first: int
) -> None:
    """RFC 8656 §12.6: a first byte outside 0x40-0x4F is not ChannelData -> discarded."""
    assert client.channel_bind(0x4001, PEER).code == 0
    assert client.send_bytes(bytes([first, 0x01, 0x00, 0x01, 0x41])) == []


def test_channel_data_does_not_refresh_binding_or_permission(
    server: TurnServer, client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §12.6: receiving ChannelData MUST NOT refresh the channel or permission."""
    assert client.channel_bind(0x4001, PEER, now=T0).code == 0
    assert len(client.channel_data(0x4001, b"x", now=T0 + 250)) == 1
    assert allocation.channel_expiry == {0x4001: T0 + 600}
    assert allocation.permissions == {PEER[0]: T0 + 300}


def test_route_channel_data_is_the_fast_path_of_receive(
    server: TurnServer, client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §12.6: `route_channel_data` relays exactly what `receive` would."""
    assert client.channel_bind(0x4001, PEER).code == 0
    frame = b"\x40\x01\x00\x02hi\x00\x00"
    assert server.table.from_client(frame, client.five_tuple, 0) == SendToPeer(
        allocation.relay, PEER, b"hi"
    )
    assert server.table.from_client(b"\x40\x02\x00\x00", client.five_tuple, 0) is None


# -- peer -> client: frame_for_client ------------------------------------------------------


def test_frame_for_client_uses_channel_data_when_a_channel_is_bound(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §12.5 and §12.7: with a channel bound to the peer the server MUST use
    ChannelData: channel number, length, data."""
    assert client.channel_bind(0x4001, PEER).code == 0
    assert frame_for_client(allocation, PEER, b"abcde") == b"\x40\x01\x00\x05abcde"


def test_frame_for_client_uses_a_data_indication_with_only_a_permission(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §11.3: permission but no channel -> a Data indication with XOR-PEER-ADDRESS
    and DATA."""
    assert client.create_permission(PEER).code == 0
    frame = frame_for_client(allocation, PEER, b"from the peer")
    assert frame is not None
    message = decode(frame)
    assert message.method == Method.DATA
    assert message.msg_class == MessageClass.INDICATION
    peer = message.get(XorPeerAddress)
    data = message.get(Data)
    assert peer is not None
    assert data is not None
    assert peer.address == PEER
    assert data.value == b"from the peer"


def test_frame_for_client_data_indication_for_another_port_of_a_channel_peer(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §11.3/§12: the channel is bound to one transport address; another port on
    that IP (allowed by the IP permission) comes as a Data indication."""
    assert client.channel_bind(0x4001, PEER).code == 0
    other_port = (PEER[0], PEER[1] + 1)
    frame = frame_for_client(allocation, other_port, b"x")
    assert frame is not None
    peer = decode(frame).get(XorPeerAddress)
    assert peer is not None
    assert peer.address == other_port


def test_frame_for_client_drops_datagrams_without_a_permission(
    client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §9: no permission for the peer's IP -> the datagram is silently discarded."""
    assert frame_for_client(allocation, PEER, b"x") is None
    assert client.create_permission(PEER2).code == 0
    assert frame_for_client(allocation, PEER, b"x") is None


def test_frame_for_client_drops_datagrams_after_the_permission_expired(
    server: TurnServer, client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §9: once the permission expires, datagrams from the peer are dropped."""
    assert client.create_permission(PEER, now=T0).code == 0
    server.expire(T0 + 301)
    assert frame_for_client(allocation, PEER, b"x") is None


def test_frame_for_client_checks_the_permission_before_the_channel(
    server: TurnServer, client: TurnTestClient, allocation: Allocation
) -> None:
    """RFC 8656 §11.3: the permission check comes first ("If relaying is permitted, then the
    server checks if there is a channel bound"); a channel does not outlive the permission
    for data from the peer (§12.1: permissions need refreshing more often than channels)."""
    assert client.channel_bind(0x4001, PEER, now=T0).code == 0
    server.expire(T0 + 301)
    assert allocation.channel_peers == {0x4001: PEER}  # the binding itself is still alive
    assert allocation.permissions == {}
    assert frame_for_client(allocation, PEER, b"x") is None
