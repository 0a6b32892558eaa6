"""Events for metrics and logs: one RequestHandled per reply with its code, AuthFailed with
the reason, PeerDenied, QuotaRejected, and the allocation lifecycle."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pyturn.core.auth import AuthFailure, rest_password, rest_username
from pyturn.core.server import (
    AllocationCreated,
    AllocationDeleted,
    AllocationRefreshed,
    AuthFailed,
    PeerDenied,
    QuotaRejected,
    RequestHandled,
    TurnServer,
)
from pyturn.wire.attributes import FAMILY_IPV6, TRANSPORT_TCP, RequestedTransport
from pyturn.wire.message import Method
from tests.core.turn_client import (
    CLIENT,
    PEER,
    PEER_V6,
    T0,
    MakeServer,
    Result,
    TurnTestClient,
)

Scenario = Callable[[TurnServer, TurnTestClient], Result]


def _allocated(client: TurnTestClient) -> TurnTestClient:
    assert client.allocate().code == 0
    return client


SCENARIOS: dict[str, tuple[int, int, Scenario]] = {
    "allocate ok": (Method.ALLOCATE, 0, lambda s, c: c.allocate()),
    "no credentials": (
        Method.ALLOCATE,
        401,
        lambda s, c: c.exchange(c.encode_request(Method.ALLOCATE, auth=False)),
    ),
    "no transport": (Method.ALLOCATE, 400, lambda s, c: c.allocate(transport=None)),
    "tcp over udp": (Method.ALLOCATE, 400, lambda s, c: c.allocate(transport=TRANSPORT_TCP)),
    "sctp transport": (Method.ALLOCATE, 442, lambda s, c: c.allocate(transport=132)),
    "ipv6 family": (Method.ALLOCATE, 440, lambda s, c: c.allocate(family=FAMILY_IPV6)),
    "bad token": (Method.ALLOCATE, 508, lambda s, c: c.allocate(reservation_token=bytes(8))),
    "second allocate": (Method.ALLOCATE, 437, lambda s, c: _allocated(c).allocate()),
    "refresh ok": (Method.REFRESH, 0, lambda s, c: _allocated(c).refresh()),
    "refresh nothing": (Method.REFRESH, 437, lambda s, c: c.refresh()),
    "permission ok": (
        Method.CREATE_PERMISSION,
        0,
        lambda s, c: _allocated(c).create_permission(PEER),
    ),
    "permission denied": (
        Method.CREATE_PERMISSION,
        403,
        lambda s, c: _allocated(c).create_permission(("10.0.0.1", 1)),
    ),
    "permission family": (
        Method.CREATE_PERMISSION,
        443,
        lambda s, c: _allocated(c).create_permission(PEER_V6),
    ),
    "channel ok": (Method.CHANNEL_BIND, 0, lambda s, c: _allocated(c).channel_bind(0x4000, PEER)),
    "channel number": (
        Method.CHANNEL_BIND,
        400,
        lambda s, c: _allocated(c).channel_bind(0x5000, PEER),
    ),
    "binding": (Method.BINDING, 0, lambda s, c: c.binding()),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_reply_is_reported_once_with_its_code(
    server: TurnServer, client: TurnTestClient, name: str
) -> None:
    """Metrics: exactly one RequestHandled per reply, with its method and ERROR-CODE."""
    method, code, scenario = SCENARIOS[name]
    result = scenario(server, client)
    assert result.code == code
    assert result.events_of(RequestHandled) == [RequestHandled(method, code, CLIENT)]


def test_auth_failed_for_missing_credentials(client: TurnTestClient) -> None:
    """RFC 8489 §9.2.4: the first, unauthenticated request is a NO_CREDENTIALS failure."""
    result = client.exchange(client.encode_request(Method.ALLOCATE, auth=False))
    assert result.events_of(AuthFailed) == [AuthFailed(CLIENT, None, AuthFailure.NO_CREDENTIALS)]


def test_auth_failed_for_a_bad_password(server: TurnServer) -> None:
    """RFC 8489 §9.2.4: an integrity mismatch is a BAD_PASSWORD failure, with the username."""
    result = TurnTestClient(server, "alice", "wrong").allocate()
    assert result.events_of(AuthFailed) == [AuthFailed(CLIENT, "alice", AuthFailure.BAD_PASSWORD)]


def test_auth_failed_for_a_stale_nonce(client: TurnTestClient) -> None:
    """RFC 8489 §9.2.4: an invalid NONCE is a STALE_NONCE failure."""
    client.nonce = "00-00"
    result = client.exchange(client.encode_request(Method.ALLOCATE, [RequestedTransport(17)]))
    assert result.events_of(AuthFailed) == [AuthFailed(CLIENT, "alice", AuthFailure.STALE_NONCE)]


def test_auth_failed_for_an_expired_rest_credential(server: TurnServer) -> None:
    """TURN REST API: an expired timestamp is an EXPIRED_REST_CREDENTIAL failure."""
    name = rest_username(int(T0) - 10, "carol")
    result = TurnTestClient(server, name, rest_password("s3cret", name)).allocate()
    assert result.events_of(AuthFailed) == [
        AuthFailed(CLIENT, name, AuthFailure.EXPIRED_REST_CREDENTIAL)
    ]


def test_auth_failed_for_an_unknown_user(server: TurnServer) -> None:
    """RFC 8489 §9.2.4: a USERNAME with no key is an UNKNOWN_USER failure."""
    result = TurnTestClient(server, "mallory", "x").allocate()
    assert result.events_of(AuthFailed) == [AuthFailed(CLIENT, "mallory", AuthFailure.UNKNOWN_USER)]


def test_successful_requests_report_no_auth_failure(client: TurnTestClient) -> None:
    """Only failures are reported: an authenticated Allocate emits no AuthFailed."""
    assert client.allocate().events_of(AuthFailed) == []


def test_peer_denied_names_client_user_and_peer(client: TurnTestClient) -> None:
    """RFC 8656 §21.2.1: a refused peer is reported for the operator's logs."""
    assert client.allocate().code == 0
    result = client.create_permission(("169.254.169.254", 80))
    assert result.events_of(PeerDenied) == [PeerDenied(CLIENT, "alice", ("169.254.169.254", 80))]


def test_quota_rejected_names_client_and_user(make_server: MakeServer) -> None:
    """RFC 8656 §7.2 step 10: a 486 is reported with the username."""
    server = make_server({"quotas": {"allocations_per_user": 1}})
    assert TurnTestClient(server, client=("203.0.113.9", 40009)).allocate().code == 0
    result = TurnTestClient(server).allocate()
    assert result.code == 486
    assert result.events_of(QuotaRejected) == [QuotaRejected(CLIENT, "alice")]


def test_allocation_lifecycle_events(server: TurnServer, client: TurnTestClient) -> None:
    """RFC 8656 §7-§8: created on Allocate, refreshed on Refresh, deleted on Refresh 0 or
    expiry, each naming the allocation."""
    created = client.allocate(now=T0)
    allocation = server.allocations[client.five_tuple]
    assert created.events_of(AllocationCreated) == [AllocationCreated(allocation)]
    refreshed = client.refresh(1200, now=T0 + 10)
    assert refreshed.events_of(AllocationRefreshed) == [AllocationRefreshed(allocation, 1200)]
    deleted = client.refresh(0, now=T0 + 20)
    assert deleted.events_of(AllocationDeleted) == [
        AllocationDeleted(allocation, "refresh", T0 + 20)
    ]
    assert deleted.events_of(AllocationRefreshed) == []
