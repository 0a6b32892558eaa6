"""CreatePermission and permissions (RFC 8656 §9, §10): keyed by IP, 300 s, all or nothing,
and only towards peers the policy allows (RFC 8656 §21.2.1)."""

from __future__ import annotations

import pytest

from pyturn.config import parse_config
from pyturn.core.server import PeerDenied, SendToPeer, TurnServer
from pyturn.wire.attributes import FAMILY_IPV6, Address
from pyturn.wire.message import Method
from tests.core.turn_client import (
    BASE_CONFIG,
    CLIENT,
    PEER,
    PEER2,
    PEER3,
    PEER_V6,
    T0,
    MakeServer,
    TurnTestClient,
    frame_for_client,
    make_config,
)


def permitted(server: TurnServer, client: TurnTestClient) -> dict[str, float]:
    return dict(server.allocations[client.five_tuple].permissions)


def test_create_permission_installs_a_permission_for_the_peer_ip(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §10.2 and §9: a permission for the IP address, lasting 300 s."""
    assert client.allocate().code == 0
    result = client.create_permission(PEER, now=T0 + 1)
    assert result.code == 0
    assert permitted(server, client) == {PEER[0]: T0 + 301}


def test_create_permission_with_several_peers_installs_them_all(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §10.2: one permission per XOR-PEER-ADDRESS."""
    assert client.allocate().code == 0
    assert client.create_permission(PEER, PEER2, PEER3).code == 0
    assert set(permitted(server, client)) == {PEER[0], PEER2[0], PEER3[0]}


def test_permission_ignores_the_peer_port(server: TurnServer, client: TurnTestClient) -> None:
    """RFC 8656 §9 and §10.2: only the IP address matters; the port may be anything."""
    assert client.allocate().code == 0
    assert client.create_permission((PEER[0], 1)).code == 0
    actions = client.send_indication((PEER[0], 9999), b"x")
    assert [a.peer for a in actions if isinstance(a, SendToPeer)] == [(PEER[0], 9999)]


def test_create_permission_without_xor_peer_address_gets_400(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §10.2: no XOR-PEER-ADDRESS -> 400."""
    assert client.allocate().code == 0
    assert client.request(Method.CREATE_PERMISSION).code == 400


def test_create_permission_without_an_allocation_gets_437(client: TurnTestClient) -> None:
    """RFC 8656 §5: no allocation on this 5-tuple -> 437."""
    assert client.create_permission(PEER).code == 437


@pytest.mark.parametrize(
    "denied",
    [
        ("127.0.0.1", 5000),  # loopback
        ("10.0.0.1", 5000),  # RFC 1918
        ("169.254.169.254", 80),  # cloud metadata
        ("0.0.0.0", 5000),  # "this host"
        ("192.168.1.1", 5000),
        ("100.64.0.1", 5000),  # carrier-grade NAT
        ("224.0.0.1", 5000),  # multicast
    ],
)
def test_create_permission_for_a_denied_peer_gets_403_and_installs_nothing(
    server: TurnServer, client: TurnTestClient, denied: Address
) -> None:
    """RFC 8656 §10.2 and §21.2.1: a peer the policy refuses -> 403, and no permission is
    installed for any peer in that request, not even the allowed ones."""
    assert client.allocate().code == 0
    result = client.create_permission(PEER, denied, PEER2)
    assert result.code == 403
    assert permitted(server, client) == {}
    assert result.events_of(PeerDenied) == [PeerDenied(CLIENT, "alice", denied)]
    assert client.send_indication(PEER, b"x") == []


def test_ipv4_mapped_loopback_on_an_ipv4_allocation_installs_nothing(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §10.2: ::ffff:127.0.0.1 is an IPv6 address on an IPv4 allocation -> 443,
    and the request installs no permission at all."""
    assert client.allocate().code == 0
    result = client.create_permission(PEER, ("::ffff:127.0.0.1", 5000))
    assert result.code == 443
    assert permitted(server, client) == {}


def test_ipv4_mapped_loopback_on_an_ipv6_allocation_gets_403(make_server: MakeServer) -> None:
    """RFC 8656 §21.2.1: the IPv4 address embedded in ::ffff:127.0.0.1 decides -> 403."""
    server = make_server({"relay": {"address6": "::"}}, relay_ipv6="2001:db8::10")
    client = TurnTestClient(server)
    assert client.allocate(family=FAMILY_IPV6).code == 0
    result = client.create_permission(PEER_V6, ("::ffff:127.0.0.1", 5000))
    assert result.code == 403
    assert server.allocations[client.five_tuple].permissions == {}
    assert client.create_permission(PEER_V6).code == 0


def test_loopback_peer_is_allowed_when_the_operator_allows_it(make_server: MakeServer) -> None:
    """RFC 8656 §21.2.1: the restriction is policy; peers.allow opens 127.0.0.0/8."""
    server = make_server({"peers": {"allow": ["127.0.0.0/8"]}})
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    assert client.create_permission(("127.0.0.5", 5000)).code == 0
    assert "127.0.0.5" in server.allocations[client.five_tuple].permissions


def test_operator_deny_list_blocks_public_peers(make_server: MakeServer) -> None:
    """RFC 8656 §10.2: the server MAY restrict peer addresses; peers.deny does that."""
    server = make_server({"peers": {"deny": ["8.8.0.0/16"]}})
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    assert client.create_permission(PEER).code == 403
    assert client.create_permission(PEER2).code == 0


def test_ipv6_peer_on_an_ipv4_allocation_gets_443(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §10.2: a peer of another address family than the relay -> 443."""
    assert client.allocate().code == 0
    result = client.create_permission(PEER, PEER_V6)
    assert result.code == 443
    assert permitted(server, client) == {}


def test_ipv4_peer_on_an_ipv6_allocation_gets_443(make_server: MakeServer) -> None:
    """RFC 8656 §10.2: the family check works both ways."""
    server = make_server({"relay": {"address6": "::"}}, relay_ipv6="2001:db8::10")
    client = TurnTestClient(server)
    assert client.allocate(family=FAMILY_IPV6).code == 0
    assert client.create_permission(PEER).code == 443


def test_permissions_per_allocation_cap_gets_508(make_server: MakeServer) -> None:
    """RFC 8656 §10.2: a request the server cannot satisfy for capacity -> 508; refreshing
    existing permissions does not count against the cap."""
    server = make_server({"quotas": {"permissions_per_allocation": 2}})
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    assert client.create_permission(PEER, PEER2).code == 0
    assert client.create_permission(PEER3).code == 508
    assert set(server.allocations[client.five_tuple].permissions) == {PEER[0], PEER2[0]}
    assert client.create_permission(PEER, PEER2).code == 0


def test_permission_expires_after_300_seconds(server: TurnServer, client: TurnTestClient) -> None:
    """RFC 8656 §9: a permission lasts 300 s unless refreshed."""
    assert client.allocate().code == 0
    assert client.create_permission(PEER, now=T0).code == 0
    server.expire(T0 + 299)
    assert len(client.send_indication(PEER, b"hi", now=T0 + 299)) == 1
    server.expire(T0 + 301)
    assert permitted(server, client) == {}
    assert client.send_indication(PEER, b"hi", now=T0 + 301) == []


def test_repeating_create_permission_refreshes_it(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §9: a permission that exists has its time-to-expiry reset to 300 s."""
    assert client.allocate().code == 0
    assert client.create_permission(PEER, now=T0).code == 0
    assert client.create_permission(PEER, now=T0 + 200).code == 0
    server.expire(T0 + 301)
    assert permitted(server, client) == {PEER[0]: T0 + 500}
    server.expire(T0 + 499)
    assert PEER[0] in permitted(server, client)
    server.expire(T0 + 500)
    assert permitted(server, client) == {}


def test_permissions_belong_to_one_allocation(server: TurnServer) -> None:
    """RFC 8656 §9: permissions of one allocation are unrelated to another's."""
    alice = TurnTestClient(server)
    bob = TurnTestClient(server, "bob", "bobpw", client=("203.0.113.9", 40009))
    assert alice.allocate().code == 0
    assert bob.allocate().code == 0
    assert alice.create_permission(PEER).code == 0
    assert bob.send_indication(PEER, b"x") == []
    assert len(alice.send_indication(PEER, b"x")) == 1


# -- reloading the policy ---------------------------------------------------------------------


def test_reloaded_deny_list_drops_existing_permissions_and_channels(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §21.2.1: a tightened policy applies at once; nothing more is relayed to a
    peer it now denies, while other peers keep their permissions."""
    assert client.allocate().code == 0
    assert client.create_permission(PEER, PEER2).code == 0
    assert client.channel_bind(0x4000, PEER).code == 0
    server.reconfigure(make_config({"peers": {"deny": ["8.8.8.0/24"]}}))
    allocation = server.allocations[client.five_tuple]
    assert set(allocation.permissions) == {PEER2[0]}
    assert allocation.channel_peers == {}
    assert client.send_indication(PEER, b"x") == []
    assert client.channel_data(0x4000, b"x") == []
    assert frame_for_client(allocation, PEER, b"x") is None
    assert len(client.send_indication(PEER2, b"x")) == 1


def test_reload_keeps_allocations_and_applies_new_users(
    server: TurnServer, client: TurnTestClient
) -> None:
    """Reload: allocations survive; removed users can no longer authenticate."""
    bob = TurnTestClient(server, "bob", "bobpw", client=("203.0.113.9", 40009))
    assert client.allocate().code == 0
    assert bob.allocate().code == 0
    without_bob = {**BASE_CONFIG, "auth": {"users": {"alice": "alicepw"}}}
    server.reconfigure(parse_config(without_bob))
    assert len(server.allocations) == 2
    assert client.refresh().code == 0
    assert bob.refresh().code == 401
