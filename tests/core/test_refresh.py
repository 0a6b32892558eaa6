"""Refresh requests (RFC 8656 §8): new lifetimes, deletion with LIFETIME 0, and 437."""

from __future__ import annotations

from pyturn.core.server import (
    AllocationDeleted,
    AllocationRefreshed,
    RequestHandled,
    TurnServer,
)
from pyturn.wire.attributes import FAMILY_IPV4, FAMILY_IPV6, Lifetime, XorRelayedAddress
from pyturn.wire.message import Method
from tests.core.turn_client import CLIENT, PEER, T0, FakeBinder, TurnTestClient


def test_refresh_grants_the_requested_lifetime(server: TurnServer, client: TurnTestClient) -> None:
    """RFC 8656 §8.2: a LIFETIME between default and maximum is granted from `now`."""
    assert client.allocate().code == 0
    result = client.refresh(1200, now=T0 + 100)
    assert result.code == 0
    assert result.need(Lifetime).value == 1200
    allocation = server.allocations[client.five_tuple]
    assert allocation.expires_at == T0 + 100 + 1200
    assert result.events_of(AllocationRefreshed) == [AllocationRefreshed(allocation, 1200)]


def test_refresh_lifetime_is_capped_at_the_maximum(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §8.2: the desired lifetime is min(requested, maximum allowed)."""
    assert client.allocate().code == 0
    result = client.refresh(99999, now=T0 + 10)
    assert result.need(Lifetime).value == 3600
    assert server.allocations[client.five_tuple].expires_at == T0 + 10 + 3600


def test_refresh_without_lifetime_resets_to_the_default(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §8.2: with no LIFETIME the desired lifetime is the default, 600 s."""
    assert client.allocate().code == 0
    result = client.refresh(now=T0 + 300)
    assert result.need(Lifetime).value == 600
    assert server.allocations[client.five_tuple].expires_at == T0 + 900


def test_refresh_with_a_lifetime_below_the_default_gets_the_default(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §8.2: if min(requested, maximum) is not greater than the default lifetime,
    the desired lifetime is the default."""
    assert client.allocate().code == 0
    result = client.refresh(30, now=T0 + 10)
    assert result.need(Lifetime).value == 600
    assert server.allocations[client.five_tuple].expires_at == T0 + 610


def test_refresh_with_lifetime_zero_deletes_the_allocation(
    server: TurnServer, client: TurnTestClient, binder: FakeBinder
) -> None:
    """RFC 8656 §8.2: a desired lifetime of zero deletes the allocation at once: the relay
    socket is released and its port returns to the pool."""
    allocated = client.allocate()
    port = allocated.need(XorRelayedAddress).port
    allocation = server.allocations[client.five_tuple]
    result = client.refresh(0, now=T0 + 5)
    assert result.code == 0
    assert result.need(Lifetime).value == 0
    assert server.allocations == {}
    assert binder.released == [allocation.relay]
    assert server.pools[FAMILY_IPV4].is_free(port)
    assert len(server.pools[FAMILY_IPV4]) == 10
    assert result.events_of(AllocationDeleted) == [AllocationDeleted(allocation, "refresh", T0 + 5)]
    assert allocation.closed


def test_deleted_allocation_relays_nothing_more(server: TurnServer, client: TurnTestClient) -> None:
    """RFC 8656 §5: once deleted, the 5-tuple names no allocation; indications are dropped."""
    assert client.allocate().code == 0
    assert client.create_permission(PEER).code == 0
    assert client.refresh(0).code == 0
    assert client.send_indication(PEER, b"late") == []


def test_refresh_without_an_allocation_gets_437(client: TurnTestClient) -> None:
    """RFC 8656 §5: a request other than Allocate on a 5-tuple with no allocation -> 437."""
    result = client.refresh()
    assert result.code == 437
    assert result.events_of(RequestHandled) == [RequestHandled(Method.REFRESH, 437, CLIENT)]


def test_repeated_delete_gets_437(client: TurnTestClient) -> None:
    """RFC 8656 §8.3: a retransmitted delete finds no allocation and gets 437, which the
    client treats as success."""
    assert client.allocate().code == 0
    assert client.refresh(0).code == 0
    assert client.refresh(0).code == 437


def test_refresh_with_mismatched_requested_address_family_gets_443(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §8.2: REQUESTED-ADDRESS-FAMILY not matching the allocation -> 443."""
    assert client.allocate().code == 0
    before = server.allocations[client.five_tuple].expires_at
    result = client.refresh(1200, family=FAMILY_IPV6, now=T0 + 10)
    assert result.code == 443
    assert server.allocations[client.five_tuple].expires_at == before


def test_refresh_with_matching_requested_address_family_succeeds(client: TurnTestClient) -> None:
    """RFC 8656 §8.2: a REQUESTED-ADDRESS-FAMILY equal to the allocation's is fine."""
    assert client.allocate().code == 0
    assert client.refresh(family=FAMILY_IPV4).code == 0


def test_refresh_after_the_nonce_went_stale_succeeds_with_the_new_nonce(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §8.3: on 438 the client retries with the new NONCE and the refresh works."""
    assert client.allocate(lifetime=3600).code == 0
    old = client.nonce
    result = client.refresh(1200, now=T0 + 1000)
    assert result.code == 0
    assert client.nonce != old
    assert [r.code for r in client.history[-2:]] == [438, 0]
    assert server.allocations[client.five_tuple].expires_at == T0 + 2200
