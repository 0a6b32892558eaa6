"""ChannelBind (RFC 8656 §12.1-§12.2): channel numbers, uniqueness both ways, refresh,
the permission it installs, its 600 s lifetime, policy and caps."""

from __future__ import annotations

import pytest

from pyturn.core.server import PeerDenied, SendToPeer, TurnServer
from pyturn.wire.attributes import ChannelNumber, XorPeerAddress
from pyturn.wire.message import Method
from tests.core.turn_client import (
    CLIENT,
    PEER,
    PEER2,
    PEER3,
    PEER_V6,
    T0,
    MakeServer,
    TurnTestClient,
    frame_for_client,
)


@pytest.fixture
def allocated(server: TurnServer, client: TurnTestClient) -> TurnTestClient:
    """alice with a one-hour allocation, so channel lifetimes can be watched."""
    assert client.allocate(lifetime=3600).code == 0
    return client


def channels(server: TurnServer, client: TurnTestClient) -> dict[int, tuple[str, int]]:
    return dict(server.allocations[client.five_tuple].channel_peers)


def test_channel_bind_binds_the_channel_and_installs_a_permission(
    server: TurnServer, allocated: TurnTestClient
) -> None:
    """RFC 8656 §12.2: the binding is created and a permission for the peer IP installed
    or refreshed (§9)."""
    result = allocated.channel_bind(0x4000, PEER, now=T0 + 1)
    assert result.code == 0
    allocation = server.allocations[allocated.five_tuple]
    assert allocation.channel_peers == {0x4000: PEER}
    assert allocation.channel_headers == {PEER: b"\x40\x00"}
    assert allocation.channel_expiry == {0x4000: T0 + 601}
    assert allocation.permissions == {PEER[0]: T0 + 301}


@pytest.mark.parametrize("number", [0x4000, 0x4001, 0x4ABC, 0x4FFF])
def test_channel_numbers_from_0x4000_to_0x4fff_are_accepted(
    allocated: TurnTestClient, number: int
) -> None:
    """RFC 8656 §12.2: the channel number is in 0x4000 through 0x4FFF."""
    assert allocated.channel_bind(number, PEER).code == 0


@pytest.mark.parametrize("number", [0x0000, 0x3FFF, 0x5000, 0x7FFF, 0x8000, 0xFFFF])
def test_channel_numbers_outside_0x4000_to_0x4fff_get_400(
    server: TurnServer, allocated: TurnTestClient, number: int
) -> None:
    """RFC 8656 §12.2: a channel number outside 0x4000-0x4FFF -> 400 (0x5000-0x7FFF were
    valid in RFC 5766 but are reserved now)."""
    assert allocated.channel_bind(number, PEER).code == 400
    assert channels(server, allocated) == {}
    assert server.allocations[allocated.five_tuple].permissions == {}


def test_channel_bind_without_channel_number_gets_400(allocated: TurnTestClient) -> None:
    """RFC 8656 §12.2: the request contains both CHANNEL-NUMBER and XOR-PEER-ADDRESS."""
    assert allocated.request(Method.CHANNEL_BIND, [XorPeerAddress(*PEER)]).code == 400


def test_channel_bind_without_xor_peer_address_gets_400(allocated: TurnTestClient) -> None:
    """RFC 8656 §12.2: the request contains both CHANNEL-NUMBER and XOR-PEER-ADDRESS."""
    assert allocated.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000)]).code == 400


def test_channel_bind_without_an_allocation_gets_437(client: TurnTestClient) -> None:
    """RFC 8656 §5: no allocation on this 5-tuple -> 437."""
    assert client.channel_bind(0x4000, PEER).code == 437


def test_binding_a_bound_channel_to_another_peer_gets_400(
    server: TurnServer, allocated: TurnTestClient
) -> None:
    """RFC 8656 §12.2: the channel number is not bound to a different transport address."""
    assert allocated.channel_bind(0x4000, PEER).code == 0
    assert allocated.channel_bind(0x4000, PEER2).code == 400
    # Another port on the same IP is another transport address, too.
    assert allocated.channel_bind(0x4000, (PEER[0], PEER[1] + 1)).code == 400
    assert channels(server, allocated) == {0x4000: PEER}


def test_binding_a_bound_peer_to_another_channel_gets_400(
    server: TurnServer, allocated: TurnTestClient
) -> None:
    """RFC 8656 §12.2: the transport address is not bound to a different channel number."""
    assert allocated.channel_bind(0x4000, PEER).code == 0
    assert allocated.channel_bind(0x4001, PEER).code == 400
    assert channels(server, allocated) == {0x4000: PEER}


def test_same_ip_with_another_port_may_have_its_own_channel(
    server: TurnServer, allocated: TurnTestClient
) -> None:
    """RFC 8656 §12: a binding is per transport address (IP and port)."""
    other_port = (PEER[0], PEER[1] + 1)
    assert allocated.channel_bind(0x4000, PEER).code == 0
    assert allocated.channel_bind(0x4001, other_port).code == 0
    assert channels(server, allocated) == {0x4000: PEER, 0x4001: other_port}


def test_rebinding_the_same_channel_and_peer_refreshes_the_binding(
    server: TurnServer, allocated: TurnTestClient
) -> None:
    """RFC 8656 §12: rebinding a channel to the same peer resets its 10 minutes, and
    (§12.1) refreshes the permission too."""
    assert allocated.channel_bind(0x4000, PEER, now=T0).code == 0
    assert allocated.channel_bind(0x4000, PEER, now=T0 + 500).code == 0
    allocation = server.allocations[allocated.five_tuple]
    assert allocation.channel_expiry == {0x4000: T0 + 1100}
    assert allocation.permissions == {PEER[0]: T0 + 800}
    server.expire(T0 + 601)
    assert channels(server, allocated) == {0x4000: PEER}
    server.expire(T0 + 1100)
    assert channels(server, allocated) == {}


def test_channel_binding_lasts_600_seconds(server: TurnServer, allocated: TurnTestClient) -> None:
    """RFC 8656 §12: a channel binding lasts 10 minutes unless refreshed."""
    assert allocated.channel_bind(0x4000, PEER, now=T0).code == 0
    server.expire(T0 + 599)
    assert channels(server, allocated) == {0x4000: PEER}
    server.expire(T0 + 600)
    allocation = server.allocations[allocated.five_tuple]
    assert allocation.channel_peers == {}
    assert allocation.channel_headers == {}
    assert allocation.channel_expiry == {}
    assert allocated.channel_data(0x4000, b"late", now=T0 + 600) == []


def test_expired_channel_can_be_bound_to_another_peer(
    server: TurnServer, allocated: TurnTestClient
) -> None:
    """RFC 8656 §12: once unbound, the channel number can be bound to another address."""
    assert allocated.channel_bind(0x4000, PEER, now=T0).code == 0
    server.expire(T0 + 600)
    assert allocated.channel_bind(0x4000, PEER2, now=T0 + 900).code == 0
    assert channels(server, allocated) == {0x4000: PEER2}


def test_channel_bind_to_a_denied_peer_gets_403(
    server: TurnServer, allocated: TurnTestClient
) -> None:
    """RFC 8656 §12.2 and §21.2.1: the server MAY restrict peer addresses -> 403."""
    denied = ("127.0.0.1", 5000)
    result = allocated.channel_bind(0x4000, denied)
    assert result.code == 403
    assert result.events_of(PeerDenied) == [PeerDenied(CLIENT, "alice", denied)]
    allocation = server.allocations[allocated.five_tuple]
    assert allocation.channel_peers == {}
    assert allocation.permissions == {}


def test_channel_bind_to_an_ipv6_peer_on_an_ipv4_allocation_gets_443(
    allocated: TurnTestClient,
) -> None:
    """RFC 8656 §12.2: a peer of another address family than the relay -> 443."""
    assert allocated.channel_bind(0x4000, PEER_V6).code == 443


def test_channels_per_allocation_cap_gets_508(make_server: MakeServer) -> None:
    """RFC 8656 §12.2: valid, but over a capacity limit -> 508; refreshing is still fine."""
    server = make_server({"quotas": {"channels_per_allocation": 2}})
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    assert client.channel_bind(0x4000, PEER).code == 0
    assert client.channel_bind(0x4001, PEER2).code == 0
    assert client.channel_bind(0x4002, PEER3).code == 508
    assert client.channel_bind(0x4001, PEER2).code == 0
    assert set(server.allocations[client.five_tuple].channel_peers) == {0x4000, 0x4001}


def test_channel_bind_needing_a_new_permission_over_the_cap_gets_508(
    make_server: MakeServer,
) -> None:
    """RFC 8656 §12.2: the permission a ChannelBind installs counts against the cap."""
    server = make_server({"quotas": {"permissions_per_allocation": 1}})
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    assert client.create_permission(PEER).code == 0
    assert client.channel_bind(0x4000, PEER2).code == 508
    assert client.channel_bind(0x4000, PEER).code == 0


@pytest.mark.parametrize("number", [0x5000, 0x6ABC, 0x7FFF])
def test_legacy_channel_numbers_are_accepted_when_configured(
    make_server: MakeServer, number: int
) -> None:
    """RFC 5766 §11 allowed 0x4000-0x7FFF; allocations.legacy_channel_numbers opts back in,
    and ChannelData on such a channel is relayed."""
    server = make_server({"allocations": {"legacy_channel_numbers": True}})
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    assert client.channel_bind(number, PEER).code == 0
    sends = client.channel_data(number, b"old client")
    assert [(s.peer, s.data) for s in sends if isinstance(s, SendToPeer)] == [(PEER, b"old client")]
    allocation = server.allocations[client.five_tuple]
    assert frame_for_client(allocation, PEER, b"x") == number.to_bytes(2, "big") + b"\x00\x01x"


@pytest.mark.parametrize("number", [0x3FFF, 0x8000, 0xFFFF])
def test_legacy_channel_numbers_still_stop_at_0x7fff(make_server: MakeServer, number: int) -> None:
    """RFC 5766 §11: even the old range is 0x4000-0x7FFF."""
    server = make_server({"allocations": {"legacy_channel_numbers": True}})
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    assert client.channel_bind(number, PEER).code == 400
