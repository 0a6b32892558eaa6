"""Several relay addresses of one family (relay.more_addresses; coturn: relay-ip given
twice, external-ip=PUB/PRIV for each): allocations take them in turn, a port number is
in use on one of them at a time, and a reservation stays on its pair's address."""

from __future__ import annotations

from pyturn.core.server import TurnServer
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    TRANSPORT_TCP,
    ReservationToken,
    XorRelayedAddress,
)
from tests.core.turn_client import (
    RELAY_IP,
    RELAY_PORTS,
    FakeBinder,
    FakeRelay,
    MakeServer,
    TurnTestClient,
)

THREE_ADDRESSES = {
    "relay": {
        "address": RELAY_IP,
        "more_addresses": [
            # Behind a 1:1 NAT: bound on the private one, clients are told the public one.
            {"address": "10.0.0.11", "external_address": "192.0.2.11"},
            {"address": "192.0.2.12"},
        ],
    }
}


def clients(server: TurnServer, count: int, transport: str = "udp") -> list[TurnTestClient]:
    return [
        TurnTestClient(server, client=("203.0.113.60", 42000 + i), transport=transport)
        for i in range(count)
    ]


def relayed(client: TurnTestClient, **allocate: object) -> tuple[str, int]:
    result = client.allocate(**allocate)  # type: ignore[arg-type]
    assert result.code == 0, result
    address = result.need(XorRelayedAddress)
    return address.host, address.port


def test_allocations_take_the_relay_addresses_in_turn(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    server = make_server(THREE_ADDRESSES)
    got = [relayed(c) for c in clients(server, 6)]
    assert [host for host, _ in got] == [
        RELAY_IP, "192.0.2.11", "192.0.2.12", RELAY_IP, "192.0.2.11", "192.0.2.12",
    ]  # fmt: skip
    assert [relay.index for relay in binder.bound if isinstance(relay, FakeRelay)] == [
        0, 1, 2, 0, 1, 2,
    ]  # fmt: skip
    # One pool for the family: a port number is on one address at a time.
    ports = [port for _, port in got]
    assert len(set(ports)) == 6
    assert all(port in RELAY_PORTS for port in ports)
    assert len(server.pools[FAMILY_IPV4]) == len(RELAY_PORTS) - 6


def test_the_range_bounds_the_allocations_whatever_the_address_count(
    make_server: MakeServer,
) -> None:
    server = make_server(THREE_ADDRESSES)
    many = clients(server, len(RELAY_PORTS) + 1)
    for client in many[:-1]:
        relayed(client)
    assert many[-1].allocate().code == 508
    assert len(server.pools[FAMILY_IPV4]) == 0


def test_a_reserved_port_is_on_the_address_of_its_pair(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    server = make_server(THREE_ADDRESSES)
    first, reserving, other, redeeming = clients(server, 4)
    assert relayed(first)[0] == RELAY_IP
    result = reserving.allocate(even_port=True)
    pair = result.need(XorRelayedAddress)
    assert pair.host == "192.0.2.11"
    token = result.need(ReservationToken).value
    assert relayed(other)[0] == "192.0.2.12"
    # The turn would give RELAY_IP next; the token keeps the reserved address.
    assert relayed(redeeming, reservation_token=token) == ("192.0.2.11", pair.port + 1)
    last = binder.bound[-1]
    assert isinstance(last, FakeRelay)
    assert (last.index, last.port) == (1, pair.port + 1)


def test_ipv6_relay_addresses_take_turns_of_their_own(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    server = make_server(
        {
            "relay": {
                "address": RELAY_IP,
                "address6": "2001:db8::10",
                "more_addresses": [{"address": "2001:db8::11"}, {"address": "192.0.2.12"}],
            }
        },
        relay_ipv6="2001:db8::10",
    )
    v6 = [relayed(c, family=FAMILY_IPV6)[0] for c in clients(server, 3)]
    assert v6 == ["2001:db8::10", "2001:db8::11", "2001:db8::10"]
    dual = clients(server, 8)[3]
    assert dual.allocate(additional_family=FAMILY_IPV6).code == 0
    allocation = server.allocations[dual.five_tuple]
    assert allocation.relayed_address[0] == RELAY_IP
    assert allocation.relayed_address6 is not None
    assert allocation.relayed_address6[0] == "2001:db8::11"
    v6_bound = [r for r in binder.bound if isinstance(r, FakeRelay) and r.family == FAMILY_IPV6]
    assert [r.index for r in v6_bound] == [0, 1, 0, 1]


def test_tcp_allocations_take_the_addresses_in_turn_too(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    server = make_server(THREE_ADDRESSES)
    hosts = [relayed(c, transport=TRANSPORT_TCP)[0] for c in clients(server, 4, "tcp")]
    assert hosts == [RELAY_IP, "192.0.2.11", "192.0.2.12", RELAY_IP]
    assert sorted(binder.tcp_ports) == sorted({r.port for r in binder.bound})
