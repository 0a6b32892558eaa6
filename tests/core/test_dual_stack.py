"""RFC 8656 §7.2 ADDITIONAL-ADDRESS-FAMILY and RFC 6156 IPv6 relaying, in the core."""

from __future__ import annotations

from pyturn.core.server import SendToPeer, TurnServer
from pyturn.wire.attributes import FAMILY_IPV6, ReservationToken, XorRelayedAddress
from tests.core.turn_client import T0, FakeBinder, MakeServer, TurnTestClient

V4_PEER = ("8.8.8.8", 5000)
V6_PEER = ("2606:4700::1111", 6000)
RELAY6 = "2001:db8::10"


def _dual(make_server: MakeServer) -> tuple[TurnServer, TurnTestClient]:
    server = make_server({"relay": {"address6": "::"}}, relay_ipv6=RELAY6)
    client = TurnTestClient(server)
    assert client.allocate(additional_family=FAMILY_IPV6).code == 0
    return server, client


def test_a_dual_stack_allocation_permits_and_relays_to_peers_of_both_families(
    make_server: MakeServer,
) -> None:
    """RFC 8656 §7.2 step 9: one IPv4 and one IPv6 relayed address, each used for its family."""
    server, client = _dual(make_server)
    allocation = next(iter(server.allocations.values()))
    assert allocation.relay6 is not None
    assert client.create_permission(V4_PEER, V6_PEER).code == 0
    sends = [a for a in client.send_indication(V6_PEER, b"six") if isinstance(a, SendToPeer)]
    assert [(s.relay, s.peer, s.data) for s in sends] == [(allocation.relay6, V6_PEER, b"six")]
    sends = [a for a in client.send_indication(V4_PEER, b"four") if isinstance(a, SendToPeer)]
    assert [(s.relay, s.peer) for s in sends] == [(allocation.relay, V4_PEER)]
    assert client.channel_bind(0x4001, V6_PEER).code == 0
    route = server.table.from_client(b"\x40\x01\x00\x02hi", client.five_tuple, 0)
    assert route is not None and route.relay is allocation.relay6


def test_deleting_a_dual_stack_allocation_releases_both_relay_ports(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    server, client = _dual(make_server)
    # Compared by relay, not by port: both families draw from the same port range.
    assert len(binder.bound) == 2
    assert client.refresh(0).code == 0
    assert {id(r) for r in binder.released} == {id(r) for r in binder.bound}
    assert server.allocations == {}


def test_an_ipv6_only_allocation_refuses_ipv4_peers_with_443(make_server: MakeServer) -> None:
    """RFC 6156 §6.2 (RFC 8656 §9.1): a peer of another family than the relay is 443."""
    server = make_server({"relay": {"address6": "::"}}, relay_ipv6=RELAY6)
    client = TurnTestClient(server)
    result = client.allocate(family=FAMILY_IPV6)
    assert result.code == 0
    relayed = result.need(XorRelayedAddress)
    assert relayed.host == RELAY6
    assert client.create_permission(V4_PEER, now=T0).code == 443
    assert client.create_permission(V6_PEER, now=T0).code == 0


def test_an_ipv6_reservation_token_is_redeemed_for_the_reserved_ipv6_port(
    make_server: MakeServer,
) -> None:
    """RFC 8656 §7.2 step 5: the token names the port and so its family; no RAF with it."""
    server = make_server({"relay": {"address6": "::"}}, relay_ipv6=RELAY6)
    first = TurnTestClient(server)
    result = first.allocate(family=FAMILY_IPV6, even_port=True)
    assert result.code == 0
    token = result.need(ReservationToken).value
    reserved = result.need(XorRelayedAddress).port + 1
    second = TurnTestClient(server, client=("203.0.113.77", 6000))
    redeemed = second.allocate(reservation_token=token)
    assert redeemed.code == 0
    relayed = redeemed.need(XorRelayedAddress)
    assert (relayed.host, relayed.port) == (RELAY6, reserved)
