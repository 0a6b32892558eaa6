"""Lifetimes and the timer interface (RFC 8656 §6, §8, §9, §12): `expire(now)` ages state,
`next_deadline()` says when to call it, and closing a stream connection ends its allocation.
Time only moves when a test moves it."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyturn.core.server import AllocationDeleted, TurnServer
from pyturn.wire.attributes import FAMILY_IPV4, XorRelayedAddress
from tests.core.turn_client import (
    PEER,
    PEER2,
    T0,
    FakeBinder,
    MakeServer,
    TurnTestClient,
    make_config,
)


def earliest_real_deadline(server: TurnServer) -> float | None:
    """The soonest moment at which some state must change, from the state itself."""
    deadlines: list[float] = []
    for allocation in server.allocations.values():
        deadlines.append(allocation.expires_at)
        deadlines.extend(allocation.permissions.values())
        deadlines.extend(allocation.channel_expiry.values())
    deadlines.extend(r.expires_at for r in server._reservations.values())
    return min(deadlines, default=None)


def test_allocation_expires_at_the_end_of_its_lifetime(
    server: TurnServer, client: TurnTestClient, binder: FakeBinder
) -> None:
    """RFC 8656 §6: when the time-to-expiry reaches zero the allocation is deleted, its
    relay socket released and its port free again."""
    port = client.allocate(now=T0).need(XorRelayedAddress).port
    allocation = server.allocations[client.five_tuple]
    assert server.expire(T0 + 599) == []
    assert client.five_tuple in server.allocations
    assert server.expire(T0 + 600) == [AllocationDeleted(allocation, "expired", T0 + 600)]
    assert server.allocations == {}
    assert binder.released == [allocation.relay]
    assert server.pools[FAMILY_IPV4].is_free(port)
    assert client.refresh(now=T0 + 601).code == 437


def test_expired_allocation_is_deleted_only_once(
    server: TurnServer, client: TurnTestClient, binder: FakeBinder
) -> None:
    """RFC 8656 §6: a deleted allocation leaves no timers that delete it again."""
    assert client.allocate(now=T0).code == 0
    assert client.create_permission(PEER, now=T0).code == 0
    assert len(server.expire(T0 + 600)) == 1
    assert server.expire(T0 + 10_000) == []
    assert len(binder.released) == 1


def test_next_deadline_follows_the_earliest_lifetime(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §6, §9, §12: the next deadline is the soonest of allocation, permission and
    channel expiry."""
    assert server.next_deadline() is None
    assert client.allocate(now=T0, lifetime=3600).code == 0
    assert server.next_deadline() == T0 + 3600
    assert client.create_permission(PEER, now=T0 + 10).code == 0
    assert server.next_deadline() == T0 + 310
    assert client.channel_bind(0x4000, PEER2, now=T0 + 5).code == 0
    assert server.next_deadline() == T0 + 305
    server.expire(T0 + 305)
    assert server.next_deadline() == T0 + 310
    server.expire(T0 + 310)
    assert server.next_deadline() == T0 + 605  # the channel
    server.expire(T0 + 605)
    assert server.next_deadline() == T0 + 3600


def test_refresh_extends_the_allocation(server: TurnServer, client: TurnTestClient) -> None:
    """RFC 8656 §8.2: a Refresh sets a new time-to-expiry; the old deadline passes harmlessly."""
    assert client.allocate(now=T0).code == 0
    assert client.refresh(now=T0 + 500).code == 0
    assert server.expire(T0 + 600) == []
    assert client.five_tuple in server.allocations
    assert server.next_deadline() == T0 + 1100
    deleted = server.expire(T0 + 1100)
    assert [d.reason for d in deleted if isinstance(d, AllocationDeleted)] == ["expired"]


def test_refresh_that_shortens_the_lifetime_expires_at_the_new_time(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §8.2: the time-to-expiry is set to the desired lifetime, shorter or not
    (here 3600 s, then a Refresh without LIFETIME: 600 s from T0 + 100)."""
    assert client.allocate(now=T0, lifetime=3600).code == 0
    assert client.refresh(now=T0 + 100).code == 0
    assert server.allocations[client.five_tuple].expires_at == T0 + 700
    deadline = server.next_deadline()
    assert deadline is not None
    assert deadline <= T0 + 700
    deleted = server.expire(T0 + 700)
    assert len(deleted) == 1
    assert server.allocations == {}


def test_connection_closed_deletes_the_allocation(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    """RFC 8656 §3.1 (and §2.1 of RFC 6062): over TCP/TLS the allocation ends with the
    connection."""
    server = make_server()
    client = TurnTestClient(server, transport="tcp")
    port = client.allocate(now=T0).need(XorRelayedAddress).port
    allocation = server.allocations[client.five_tuple]
    events = server.connection_closed(client.five_tuple, T0 + 5)
    assert events == [AllocationDeleted(allocation, "connection closed", T0 + 5)]
    assert server.allocations == {}
    assert binder.released == [allocation.relay]
    assert server.pools[FAMILY_IPV4].is_free(port)
    assert server.connection_closed(client.five_tuple, T0 + 6) == []
    assert server.expire(T0 + 10_000) == []


def test_close_all_deletes_every_allocation(server: TurnServer, binder: FakeBinder) -> None:
    """Shutdown: every allocation is deleted and every relay port released."""
    a = TurnTestClient(server)
    b = TurnTestClient(server, "bob", "bobpw", client=("203.0.113.9", 40009))
    assert a.allocate().code == 0
    assert b.allocate().code == 0
    deleted = server.close_all(T0 + 1)
    assert sorted(d.reason for d in deleted if isinstance(d, AllocationDeleted)) == [
        "shutdown",
        "shutdown",
    ]
    assert server.allocations == {}
    assert len(binder.released) == 2
    assert len(server.pools[FAMILY_IPV4]) == 10


def test_allocation_expiry_ends_its_permissions_and_channels(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8656 §9 and §12: if an allocation expires, its permissions and channels go too."""
    assert client.allocate(now=T0).code == 0
    assert client.channel_bind(0x4000, PEER, now=T0 + 500).code == 0
    server.expire(T0 + 600)
    assert client.channel_data(0x4000, b"x", now=T0 + 600) == []
    assert client.send_indication(PEER, b"x", now=T0 + 600) == []


# -- a property: expire() and next_deadline() agree with the state -------------------------

_Op = tuple[str, int, int]

_ops = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "even", "permission", "channel", "expire", "close"]),
        st.integers(0, 3),  # which client
        st.integers(0, 700),  # seconds to advance first
    ),
    max_size=25,
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=_ops)
def test_next_deadline_is_never_later_than_the_earliest_real_deadline(ops: list[_Op]) -> None:
    """Timer contract: after any sequence of Allocate (lifetime >= default), EVEN-PORT,
    CreatePermission, ChannelBind, expire() and connection close, next_deadline() is not
    after the soonest real deadline, and expire(now) leaves nothing that is due."""
    server = TurnServer(make_config(), FakeBinder(), relay_ipv4="192.0.2.10")
    users = [
        TurnTestClient(server, client=("203.0.113.60", 42000 + i), transport="tcp")
        for i in range(4)
    ]
    now = T0
    for op, who, advance in ops:
        now += advance
        client = users[who]
        if op == "allocate":
            client.allocate(now=now, lifetime=600 + advance * 4)
        elif op == "even":
            client.allocate(now=now, even_port=True)
        elif op == "permission":
            client.create_permission(PEER, now=now)
        elif op == "channel":
            client.channel_bind(0x4000 + who, PEER2, now=now)
        elif op == "close":
            server.connection_closed(client.five_tuple, now)
        else:
            server.expire(now)
            for allocation in server.allocations.values():
                assert allocation.expires_at > now
                assert all(at > now for at in allocation.permissions.values())
                assert all(at > now for at in allocation.channel_expiry.values())
            assert all(r.expires_at > now for r in server._reservations.values())
        real = earliest_real_deadline(server)
        if real is not None:
            deadline = server.next_deadline()
            assert deadline is not None
            assert deadline <= real
