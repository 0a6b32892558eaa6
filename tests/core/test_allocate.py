"""Allocate requests (RFC 8656 §7.2): checks in the RFC's order, relay ports, lifetimes,
EVEN-PORT and RESERVATION-TOKEN, address families, unknown attributes and quotas."""

from __future__ import annotations

import pytest

from pyturn.core.auth import rest_password, rest_username
from pyturn.core.server import (
    AllocationCreated,
    QuotaRejected,
    RequestHandled,
    TurnServer,
)
from pyturn.wire import integrity
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    TRANSPORT_TCP,
    AddressErrorCode,
    AlternateServer,
    Lifetime,
    MessageIntegrity,
    ReservationToken,
    Software,
    UnknownAttribute,
    UnknownAttributes,
    XorMappedAddress,
    XorRelayedAddress,
)
from pyturn.wire.message import Method
from tests.core.turn_client import (
    CLIENT,
    OTHER_CLIENT,
    RELAY_IP,
    RELAY_PORTS,
    T0,
    FakeBinder,
    MakeServer,
    TurnTestClient,
)

FUTURE = int(T0) + 3600


def clients(server: TurnServer, count: int, user: str = "alice") -> list[TurnTestClient]:
    """`count` clients of `user`, each on its own 5-tuple."""
    password = {"alice": "alicepw", "bob": "bobpw"}[user]
    return [
        TurnTestClient(server, user, password, client=("203.0.113.50", 41000 + i))
        for i in range(count)
    ]


# -- the success response ------------------------------------------------------------------


def test_allocate_success_has_relayed_address_lifetime_and_mapped_address(
    server: TurnServer, client: TurnTestClient, binder: FakeBinder
) -> None:
    """RFC 8656 §7.2: the success response has XOR-RELAYED-ADDRESS, LIFETIME and
    XOR-MAPPED-ADDRESS, and is signed with the user's key."""
    result = client.allocate()
    assert result.code == 0
    relayed = result.need(XorRelayedAddress)
    assert relayed.host == RELAY_IP
    assert relayed.port in RELAY_PORTS
    assert result.need(Lifetime).value == 600
    assert result.need(XorMappedAddress).address == CLIENT
    assert result.has(MessageIntegrity)
    assert result.message is not None
    assert integrity.verify_integrity(result.message, client.key)
    assert [r.port for r in binder.bound] == [relayed.port]
    allocation = server.allocations[client.five_tuple]
    assert allocation.relayed_address == relayed.address
    assert allocation.family == FAMILY_IPV4
    assert allocation.username == "alice"
    assert allocation.expires_at == T0 + 600


def test_allocate_success_emits_allocation_created_and_request_handled(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §7.2: one allocation created, one success reply."""
    result = client.allocate()
    created = result.events_of(AllocationCreated)
    assert [c.allocation for c in created] == [server.allocations[client.five_tuple]]
    assert result.events_of(RequestHandled) == [RequestHandled(Method.ALLOCATE, 0, CLIENT)]


def test_relayed_address_is_the_configured_external_address(make_server: MakeServer) -> None:
    """RFC 8656 §7.2: behind a NAT the advertised relayed address is relay.external_address."""
    server = make_server({"relay": {"external_address": "192.0.2.99"}})
    result = TurnTestClient(server).allocate()
    assert result.need(XorRelayedAddress).host == "192.0.2.99"


def test_dont_fragment_is_passed_to_the_relay_binder(
    client: TurnTestClient, binder: FakeBinder
) -> None:
    """RFC 8656 §7.2 step 4: DONT-FRAGMENT asks for a relay socket that sets DF."""
    assert client.allocate(dont_fragment=True).code == 0
    assert binder.bound[-1].dont_fragment


def test_software_attribute_is_sent_when_configured(make_server: MakeServer) -> None:
    """RFC 8656 §5: the server SHOULD include SOFTWARE in Allocate responses."""
    server = make_server({"software": "pyturn-test"})
    client = TurnTestClient(server)
    assert client.allocate().need(Software).value == "pyturn-test"
    assert client.refresh().need(Software).value == "pyturn-test"


# -- REQUESTED-TRANSPORT (step 3) ----------------------------------------------------------


def test_allocate_without_requested_transport_gets_400(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §7.2 step 3: REQUESTED-TRANSPORT missing -> 400."""
    result = client.allocate(transport=None)
    assert result.code == 400
    assert server.allocations == {}


def test_allocate_for_tcp_relaying_over_udp_gets_400(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 6062 §5.1: a TCP allocation needs a TCP or TLS control connection."""
    result = client.allocate(transport=TRANSPORT_TCP)
    assert result.code == 400
    assert server.allocations == {}
    assert result.events_of(RequestHandled) == [RequestHandled(Method.ALLOCATE, 400, CLIENT)]


def test_allocate_for_an_unknown_transport_protocol_gets_442(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §7.2 step 3: an unsupported protocol in REQUESTED-TRANSPORT -> 442."""
    result = client.allocate(transport=132)  # SCTP
    assert result.code == 442
    assert server.allocations == {}


# -- lifetimes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "granted"),
    [(None, 600), (0, 600), (30, 600), (600, 600), (1200, 1200), (3600, 3600), (99999, 3600)],
)
def test_allocate_lifetime_is_clamped_between_default_and_maximum(
    server: TurnServer, client: TurnTestClient, requested: int | None, granted: int
) -> None:
    """RFC 8656 §7.2: min(requested, max); if that is not above the default, the default."""
    result = client.allocate(lifetime=requested)
    assert result.need(Lifetime).value == granted
    assert server.allocations[client.five_tuple].expires_at == T0 + granted


def test_allocate_lifetime_follows_configured_limits(make_server: MakeServer) -> None:
    """RFC 8656 §7.2: the default and maximum lifetimes are server policy."""
    server = make_server({"allocations": {"default_lifetime": 300, "max_lifetime": 900}})
    a, b, c = clients(server, 3)
    assert a.allocate().need(Lifetime).value == 300
    assert b.allocate(lifetime=450).need(Lifetime).value == 450
    assert c.allocate(lifetime=5000).need(Lifetime).value == 900


# -- one allocation per 5-tuple (step 2) ---------------------------------------------------


def test_second_allocate_on_the_same_5_tuple_gets_437(
    server: TurnServer, client: TurnTestClient, binder: FakeBinder
) -> None:
    """RFC 8656 §7.2 step 2: a 5-tuple already in use -> 437."""
    assert client.allocate().code == 0
    second = client.allocate()
    assert second.code == 437
    assert len(server.allocations) == 1
    assert len(binder.bound) == 1


def test_retransmitted_allocate_gets_the_identical_success_response(
    server: TurnServer, client: TurnTestClient, binder: FakeBinder
) -> None:
    """RFC 8656 §5 and §7.2 step 2: a retransmission (same 5-tuple, same transaction id)
    is idempotent: the same response again, byte for byte, and no second allocation."""
    first = client.allocate()
    assert first.code == 0
    again = client.exchange(client.last_sent, now=T0 + 1)
    assert again.raw == first.raw
    assert len(server.allocations) == 1
    assert len(binder.bound) == 1
    assert again.events_of(RequestHandled) == [RequestHandled(Method.ALLOCATE, 0, CLIENT)]
    assert again.events_of(AllocationCreated) == []


def test_retransmitted_sha256_allocate_gets_the_identical_response(
    client: TurnTestClient,
) -> None:
    """RFC 8656 §5: idempotency holds for MESSAGE-INTEGRITY-SHA256 requests too."""
    first = client.allocate(sha256=True)
    assert first.code == 0
    assert client.exchange(client.last_sent).raw == first.raw


# -- relay ports ---------------------------------------------------------------------------


def test_relay_ports_are_within_the_range_and_all_different(server: TurnServer) -> None:
    """RFC 8656 §7.2: each allocation gets its own relayed transport address from the range."""
    ports = []
    for c in clients(server, 10):
        result = c.allocate()
        assert result.code == 0
        ports.append(result.need(XorRelayedAddress).port)
    assert sorted(ports) == list(RELAY_PORTS)


def test_allocate_gets_508_when_every_port_is_in_use(server: TurnServer) -> None:
    """RFC 8656 §7.2: no relayed transport address available -> 508."""
    for c in clients(server, 10):
        assert c.allocate().code == 0
    extra = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    result = extra.allocate()
    assert result.code == 508
    assert extra.five_tuple not in server.allocations


def test_allocate_gets_508_when_every_port_is_taken_by_another_process(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    """RFC 8656 §7.2: if no port can be bound -> 508, and nothing is allocated."""
    binder.taken = set(RELAY_PORTS)
    server = make_server()
    result = TurnTestClient(server).allocate()
    assert result.code == 508
    assert server.allocations == {}
    assert binder.bound == []


def test_allocate_skips_ports_taken_by_another_process(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    """RFC 8656 §7.2: a port some other program holds is skipped, not handed out."""
    binder.taken = {50000, 50001, 50002}
    server = make_server()
    for c in clients(server, 5):
        result = c.allocate()
        assert result.code == 0
        assert result.need(XorRelayedAddress).port not in binder.taken


def test_port_busy_once_is_offered_again_later(make_server: MakeServer, binder: FakeBinder) -> None:
    """RFC 8656 §7.2: the server allocates "any available relayed transport address"; a
    port another program held for a moment is available again once it lets go."""
    binder.taken = {50000}
    server = make_server()
    first = clients(server, 10)
    assert [c.allocate().code for c in first] == [0] * 9 + [508]
    binder.taken.clear()
    for c in first[:9]:
        assert c.refresh(0).code == 0
    second = [TurnTestClient(server, client=("203.0.113.51", 41000 + i)) for i in range(10)]
    assert [c.allocate(now=T0 + 60).code for c in second] == [0] * 10


# -- EVEN-PORT and RESERVATION-TOKEN -------------------------------------------------------


def test_even_port_gives_an_even_port(server: TurnServer) -> None:
    """RFC 8656 §7.2: EVEN-PORT with R=0 -> an even port, no RESERVATION-TOKEN."""
    for c in clients(server, 5):
        result = c.allocate(even_port=False)
        assert result.code == 0
        assert result.need(XorRelayedAddress).port % 2 == 0
        assert not result.has(ReservationToken)


def test_even_port_with_r_bit_reserves_the_next_port_for_a_token(server: TurnServer) -> None:
    """RFC 8656 §7.2: EVEN-PORT with R=1 -> port N even, N+1 reserved under a
    RESERVATION-TOKEN, which a later Allocate (on any 5-tuple) redeems for N+1."""
    first = TurnTestClient(server, client=CLIENT)
    result = first.allocate(even_port=True)
    assert result.code == 0
    port = result.need(XorRelayedAddress).port
    assert port % 2 == 0
    token = result.need(ReservationToken).value
    assert len(token) == 8
    assert not server.pools[FAMILY_IPV4].is_free(port + 1)
    second = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    redeemed = second.allocate(reservation_token=token, now=T0 + 10)
    assert redeemed.code == 0
    assert redeemed.need(XorRelayedAddress).port == port + 1
    assert not redeemed.has(ReservationToken)


def test_reserved_port_is_not_given_to_other_allocations(server: TurnServer) -> None:
    """RFC 8656 §7.2: the server MUST hold the reservation for at least 30 seconds."""
    holder = TurnTestClient(server, client=CLIENT)
    reserved = holder.allocate(even_port=True).need(XorRelayedAddress).port + 1
    ports = [c.allocate(now=T0 + 29).need(XorRelayedAddress).port for c in clients(server, 8)]
    assert reserved not in ports
    assert len(server.pools[FAMILY_IPV4]) == 0


def test_reservation_token_is_good_for_one_allocation_only(server: TurnServer) -> None:
    """RFC 8656 §7.2 step 5: a token already used is not valid -> 508."""
    token = TurnTestClient(server).allocate(even_port=True).need(ReservationToken).value
    second, third = clients(server, 2, "bob")
    assert second.allocate(reservation_token=token).code == 0
    assert third.allocate(reservation_token=token).code == 508


def test_reservation_token_with_even_port_gets_400(server: TurnServer) -> None:
    """RFC 8656 §7.2 step 5: RESERVATION-TOKEN together with EVEN-PORT -> 400."""
    token = TurnTestClient(server).allocate(even_port=True).need(ReservationToken).value
    other = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    assert other.allocate(reservation_token=token, even_port=False).code == 400
    # The token survives a refused request.
    assert other.allocate(reservation_token=token).code == 0


def test_reservation_token_with_requested_address_family_gets_400(server: TurnServer) -> None:
    """RFC 8656 §7.2 step 5: RESERVATION-TOKEN with REQUESTED-ADDRESS-FAMILY -> 400."""
    token = TurnTestClient(server).allocate(even_port=True).need(ReservationToken).value
    other = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    assert other.allocate(reservation_token=token, family=FAMILY_IPV4).code == 400


def test_reservation_token_with_additional_address_family_gets_400(server: TurnServer) -> None:
    """RFC 8656 §7.2 step 5: RESERVATION-TOKEN with ADDITIONAL-ADDRESS-FAMILY -> 400."""
    token = TurnTestClient(server).allocate(even_port=True).need(ReservationToken).value
    other = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    assert other.allocate(reservation_token=token, additional_family=FAMILY_IPV6).code == 400


def test_even_port_reservation_with_additional_address_family_gets_400(
    client: TurnTestClient,
) -> None:
    """RFC 8656 §7.2 step 8: EVEN-PORT with R=1 and ADDITIONAL-ADDRESS-FAMILY -> 400."""
    assert client.allocate(even_port=True, additional_family=FAMILY_IPV6).code == 400


def test_unknown_reservation_token_gets_508(client: TurnTestClient) -> None:
    """RFC 8656 §7.2 step 5: a token that is not valid -> 508."""
    assert client.allocate(reservation_token=b"\x01" * 8).code == 508


def test_expired_reservation_token_gets_508_and_frees_the_port(server: TurnServer) -> None:
    """RFC 8656 §7.2: a reservation is held ~30 s; once expired the token is refused with
    508 and the reserved port goes back to the pool."""
    result = TurnTestClient(server).allocate(even_port=True)
    reserved = result.need(XorRelayedAddress).port + 1
    token = result.need(ReservationToken).value
    assert server.next_deadline() == T0 + 30
    server.expire(T0 + 30)
    assert server.pools[FAMILY_IPV4].is_free(reserved)
    late = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    assert late.allocate(reservation_token=token, now=T0 + 31).code == 508


def test_even_port_gets_508_when_no_even_pair_is_free(server: TurnServer) -> None:
    """RFC 8656 §7.2 step 8: EVEN-PORT with R=1 that cannot be satisfied -> 508."""
    for c in clients(server, 5):
        assert c.allocate(even_port=True).code == 0  # 5 pairs: the whole range
    extra = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    assert extra.allocate(even_port=True).code == 508


# -- address families (steps 6, 7, 9) ------------------------------------------------------


def test_requested_address_family_ipv4_is_granted(client: TurnTestClient) -> None:
    """RFC 8656 §7.2 step 7: REQUESTED-ADDRESS-FAMILY IPv4 on an IPv4 server succeeds."""
    result = client.allocate(family=FAMILY_IPV4)
    assert result.code == 0
    assert result.need(XorRelayedAddress).host == RELAY_IP


def test_requested_address_family_ipv6_without_ipv6_relay_gets_440(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §7.2 step 7: an unsupported REQUESTED-ADDRESS-FAMILY -> 440."""
    result = client.allocate(family=FAMILY_IPV6)
    assert result.code == 440
    assert server.allocations == {}


def test_requested_address_family_with_an_invalid_value_gets_440(client: TurnTestClient) -> None:
    """RFC 8656 §7.2 step 7 and §18.8: a family that is neither 0x01 nor 0x02 -> 440."""
    assert client.allocate(family=0x03).code == 440


def test_requested_address_family_ipv6_with_ipv6_relay_gets_an_ipv6_address(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    """RFC 8656 §7.2 step 7: with IPv6 relaying configured, IPv6 is allocated."""
    server = make_server({"relay": {"address6": "::"}}, relay_ipv6="2001:db8::10")
    client = TurnTestClient(server)
    result = client.allocate(family=FAMILY_IPV6)
    assert result.code == 0
    relayed = result.need(XorRelayedAddress)
    assert relayed.host == "2001:db8::10"
    assert relayed.port in RELAY_PORTS
    assert binder.bound[-1].family == FAMILY_IPV6
    assert server.allocations[client.five_tuple].family == FAMILY_IPV6


def test_additional_address_family_ipv6_without_ipv6_relay_gives_ipv4_and_address_error(
    client: TurnTestClient,
) -> None:
    """RFC 8656 §7.2 step 9: a partial dual allocation succeeds with the IPv4 address and an
    ADDRESS-ERROR-CODE 440 for IPv6."""
    result = client.allocate(additional_family=FAMILY_IPV6)
    assert result.code == 0
    assert result.need(XorRelayedAddress).host == RELAY_IP
    error = result.need(AddressErrorCode)
    assert (error.family, error.code) == (FAMILY_IPV6, 440)


def test_additional_address_family_ipv4_gets_400(client: TurnTestClient) -> None:
    """RFC 8656 §7.2 step 9: ADDITIONAL-ADDRESS-FAMILY with value 0x01 -> 400."""
    assert client.allocate(additional_family=FAMILY_IPV4).code == 400


def test_requested_and_additional_address_family_together_get_400(
    client: TurnTestClient,
) -> None:
    """RFC 8656 §7.2 step 6: both REQUESTED- and ADDITIONAL-ADDRESS-FAMILY -> 400."""
    result = client.allocate(family=FAMILY_IPV4, additional_family=FAMILY_IPV6)
    assert result.code == 400


def test_additional_address_family_with_ipv6_relay_gives_two_relayed_addresses(
    make_server: MakeServer,
) -> None:
    """RFC 8656 §7.2 step 9: if the server can fully meet the request it allocates one IPv4
    and one IPv6 address, in two XOR-RELAYED-ADDRESS attributes."""
    server = make_server({"relay": {"address6": "::"}}, relay_ipv6="2001:db8::10")
    result = TurnTestClient(server).allocate(additional_family=FAMILY_IPV6)
    assert result.code == 0
    assert result.message is not None
    hosts = {a.host for a in result.message.get_all(XorRelayedAddress)}
    assert hosts == {RELAY_IP, "2001:db8::10"}
    assert not result.has(AddressErrorCode)


# -- unknown attributes --------------------------------------------------------------------


def test_unknown_comprehension_required_attribute_gets_420_listing_it(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8489 §6.3.1: unknown comprehension-required attributes -> 420 with
    UNKNOWN-ATTRIBUTES naming each of them once."""
    extra = [
        UnknownAttribute(0x7F01, b"abcd"),
        UnknownAttribute(0x7F02, b""),
        UnknownAttribute(0x7F01, b"again"),
    ]
    result = client.allocate(extra=extra)
    assert result.code == 420
    assert result.need(UnknownAttributes).types == (0x7F01, 0x7F02)
    assert server.allocations == {}


def test_unknown_comprehension_optional_attribute_is_ignored(client: TurnTestClient) -> None:
    """RFC 8489 §6.3: unknown comprehension-optional attributes (0x8000-0xFFFF) are ignored."""
    result = client.allocate(extra=[UnknownAttribute(0xC0DE, b"whatever")])
    assert result.code == 0


def test_420_to_an_authenticated_request_is_signed(client: TurnTestClient) -> None:
    """RFC 8489 §6.3: unknown attributes are checked once authentication is done, and
    (§9.2.4) responses to an authenticated request are signed; a client over UDP drops
    unsigned ones (§9.2.5)."""
    result = client.allocate(extra=[UnknownAttribute(0x7F01, b"")])
    assert result.code == 420
    assert result.message is not None
    assert integrity.verify_integrity(result.message, client.key)


# -- quotas (step 10) and redirection (step 11) --------------------------------------------


def test_allocations_per_user_quota_gets_486(make_server: MakeServer) -> None:
    """RFC 8656 §7.2 step 10: past the per-username quota -> 486 and QuotaRejected."""
    server = make_server({"quotas": {"allocations_per_user": 2}})
    a, b, c = clients(server, 3)
    assert a.allocate().code == 0
    assert b.allocate().code == 0
    result = c.allocate()
    assert result.code == 486
    assert result.events_of(QuotaRejected) == [QuotaRejected(c.address, "alice")]
    # Another user is not affected.
    assert TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT).allocate().code == 0


def test_freeing_an_allocation_lets_the_user_allocate_again(make_server: MakeServer) -> None:
    """RFC 8656 §7.2 step 10: the quota counts live allocations only."""
    server = make_server({"quotas": {"allocations_per_user": 2}})
    a, b, c = clients(server, 3)
    assert a.allocate().code == 0
    assert b.allocate().code == 0
    assert c.allocate().code == 486
    assert a.refresh(0).code == 0
    assert c.allocate().code == 0


def test_allocations_total_quota_gets_486(make_server: MakeServer) -> None:
    """RFC 8656 §7.2 step 10: a server-wide limit -> 486, whoever asks."""
    server = make_server({"quotas": {"allocations_total": 2}})
    alice = TurnTestClient(server, client=("203.0.113.50", 41000))
    bob = TurnTestClient(server, "bob", "bobpw", client=("203.0.113.50", 41001))
    name = rest_username(FUTURE, "carol")
    carol = TurnTestClient(
        server, name, rest_password("s3cret", name), client=("203.0.113.50", 41002)
    )
    assert alice.allocate().code == 0
    assert bob.allocate().code == 0
    result = carol.allocate()
    assert result.code == 486
    assert result.events_of(QuotaRejected) == [QuotaRejected(carol.address, name)]
    assert bob.refresh(0).code == 0
    assert carol.allocate().code == 0


def test_per_user_quota_counts_rest_usernames_by_their_user_part(
    make_server: MakeServer,
) -> None:
    """RFC 8656 §7.2 step 10: the quota SHOULD follow the user; REST names with different
    timestamps but the same user part share it."""
    server = make_server({"quotas": {"allocations_per_user": 1}})
    first = rest_username(FUTURE, "carol")
    second = rest_username(FUTURE + 60, "carol")
    other = rest_username(FUTURE, "dave")
    c1 = TurnTestClient(server, first, rest_password("s3cret", first), client=CLIENT)
    c2 = TurnTestClient(server, second, rest_password("s3cret", second), client=OTHER_CLIENT)
    d = TurnTestClient(server, other, rest_password("s3cret", other), client=("203.0.113.9", 40009))
    assert c1.allocate().code == 0
    assert c2.allocate().code == 486
    assert d.allocate().code == 0


def test_draining_server_redirects_with_300_and_alternate_server(make_server: MakeServer) -> None:
    """RFC 8656 §7.2 step 11: the server MAY redirect with 300 and ALTERNATE-SERVER."""
    server = make_server({"alternate_server": "192.0.2.20:3478"})
    server.draining = True
    result = TurnTestClient(server).allocate()
    assert result.code == 300
    assert result.need(AlternateServer).address == ("192.0.2.20", 3478)
    assert server.allocations == {}


def test_draining_server_without_alternate_gets_508(server: TurnServer) -> None:
    """RFC 8656 §7.2: a server taking no new allocations answers 508."""
    server.draining = True
    assert TurnTestClient(server).allocate().code == 508


# -- options that coturn deployments set --------------------------------------------------


def test_tcp_relaying_can_be_switched_off(make_server: MakeServer) -> None:
    """coturn's no-tcp-relay: RFC 6062 allocations get 442, UDP ones go on."""
    server = make_server({"allocations": {"tcp_relay": False}})
    tcp = TurnTestClient(server, transport="tcp")
    assert tcp.allocate(transport=TRANSPORT_TCP).code == 442
    assert TurnTestClient(server, transport="tcp", client=OTHER_CLIENT).allocate().ok


def test_keep_gives_an_ipv6_client_an_ipv6_relay(make_server: MakeServer) -> None:
    """coturn's keep-address-family; RFC 8656's default (IPv4) otherwise."""
    v6_client = ("2001:db8::7", 40001)
    keep = make_server(
        {"relay": {"address6": "::"}, "allocations": {"default_family": "keep"}},
        relay_ipv6="2001:db8::10",
    )
    result = TurnTestClient(keep, client=v6_client).allocate()
    assert result.need(XorRelayedAddress).address[0] == "2001:db8::10"
    result = TurnTestClient(keep, client=OTHER_CLIENT).allocate()
    assert result.need(XorRelayedAddress).address[0] == RELAY_IP
    plain = make_server({"relay": {"address6": "::"}}, relay_ipv6="2001:db8::10")
    result = TurnTestClient(plain, client=v6_client).allocate()
    assert result.need(XorRelayedAddress).address[0] == RELAY_IP
    # Without an IPv6 relay, keep falls back to IPv4.
    only_v4 = make_server({"allocations": {"default_family": "keep"}})
    assert TurnTestClient(only_v4, client=v6_client).allocate().ok


def test_redirect_allocations_sends_every_allocate_elsewhere_in_turn(
    make_server: MakeServer,
) -> None:
    """coturn's alternate-server (load sharing): 300, round robin, the client's family."""
    server = make_server(
        {"redirect_allocations": ["192.0.2.21:3478", "[2001:db8::3]:3478", "192.0.2.22:5000"]}
    )
    sent_to = []
    for number in range(4):
        client = TurnTestClient(server, client=("203.0.113.50", 41000 + number))
        result = client.allocate()
        assert result.code == 300
        assert result.has(MessageIntegrity)  # only after the client proved its key
        sent_to.append(result.need(AlternateServer).address)
    assert sent_to == [("192.0.2.22", 5000), ("192.0.2.21", 3478)] * 2
    assert server.allocations == {}
    v6 = TurnTestClient(server, client=("2001:db8::9", 41000)).allocate()
    assert v6.need(AlternateServer).address == ("2001:db8::3", 3478)
    assert TurnTestClient(server).binding().code == 0
