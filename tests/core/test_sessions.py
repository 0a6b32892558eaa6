"""Live sessions in the core: listing, kicking, revoking, and ending allocations whose
REST credential expired (`pyturn sessions|kick|revoke`, auth.end_expired_sessions)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyturn.core.auth import AuthFailure, rest_password, rest_username
from pyturn.core.server import AllocationDeleted, AuthFailed, SendToPeer, TurnServer
from pyturn.core.sessions import (
    FOREVER,
    SessionMatch,
    active_revocations,
    parse_duration,
    revocations_from_json,
    revocations_to_json,
)
from tests.core.turn_client import (
    CLIENT,
    OTHER_CLIENT,
    PEER,
    RELAY_IP,
    T0,
    MakeServer,
    TurnTestClient,
)
from tests.strategies import hosts, ports

THIRD_CLIENT = ("203.0.113.9", 40003)


def rest_client(server: TurnServer, name: str, client: tuple[str, int]) -> TurnTestClient:
    return TurnTestClient(server, name, rest_password("s3cret", name), client=client)


def deleted(actions: Sequence[object]) -> list[tuple[str, str]]:
    return [(a.allocation.username, a.reason) for a in actions if isinstance(a, AllocationDeleted)]


# -- listing ----------------------------------------------------------------------------


def test_a_session_row_says_what_the_allocation_holds(server: TurnServer) -> None:
    alice = TurnTestClient(server)
    assert alice.allocate(lifetime=1200).ok
    assert alice.channel_bind(0x4001, PEER, now=T0 + 5).ok
    alice.channel_data(0x4001, b"x" * 100, now=T0 + 6)
    (row,) = server.sessions(SessionMatch(), T0 + 10)
    relayed = server.allocations[alice.five_tuple].relayed_address
    assert row == {
        "user": "alice",
        "quota_user": "alice",
        "client": f"{CLIENT[0]}:{CLIENT[1]}",
        "transport": "udp",
        "relayed": [f"{RELAY_IP}:{relayed[1]}"],
        "tcp_relay": False,
        "age": 10.0,
        "lifetime_left": 1190.0,
        "permissions": [PEER[0]],
        "channels": {"0x4001": f"{PEER[0]}:{PEER[1]}"},
        "peer_connections": 0,
        "bytes_to_peer": 100,
        "packets_to_peer": 1,
        "bytes_to_client": 0,
        "packets_to_client": 0,
        "worker": 0,
    }


def test_sessions_can_be_listed_for_one_user_or_its_rest_user_part(server: TurnServer) -> None:
    assert TurnTestClient(server).allocate().ok
    name = rest_username(int(T0) + 3600, "carol")
    assert rest_client(server, name, OTHER_CLIENT).allocate().ok
    assert [r["user"] for r in server.sessions(SessionMatch(user="alice"), T0)] == ["alice"]
    assert [r["user"] for r in server.sessions(SessionMatch(user="carol"), T0)] == [name]
    assert [r["user"] for r in server.sessions(SessionMatch(user=name), T0)] == [name]
    assert server.sessions(SessionMatch(user="nobody"), T0) == []


# -- kick -------------------------------------------------------------------------------


def test_a_kicked_allocation_ends_at_once_and_its_refresh_gets_437(server: TurnServer) -> None:
    alice = TurnTestClient(server)
    assert alice.allocate().ok
    assert alice.create_permission(PEER).ok
    bob = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    assert bob.allocate().ok
    actions = server.kick(SessionMatch(user="alice"), T0 + 1)
    assert deleted(actions) == [("alice", "kicked")]
    assert alice.send_indication(PEER, b"hi", now=T0 + 2) == []
    assert alice.refresh(600, now=T0 + 2).code == 437
    assert bob.refresh(600, now=T0 + 2).ok


def test_kick_by_client_address_and_port(server: TurnServer) -> None:
    clients = [
        TurnTestClient(server, client=address) for address in (CLIENT, OTHER_CLIENT, THIRD_CLIENT)
    ]
    for client in clients:
        assert client.allocate().ok
    assert server.kick(SessionMatch.parse(client=f"{OTHER_CLIENT[0]}:1"), T0) == []
    found = server.kick(SessionMatch.parse(client=f"{OTHER_CLIENT[0]}:{OTHER_CLIENT[1]}"), T0)
    assert len(deleted(found)) == 1
    assert server.kick(SessionMatch.parse(client=THIRD_CLIENT[0]), T0) != []
    assert list(server.allocations) == [clients[0].five_tuple]


def test_kick_by_relayed_address(server: TurnServer) -> None:
    alice = TurnTestClient(server)
    bob = TurnTestClient(server, "bob", "bobpw", client=OTHER_CLIENT)
    assert alice.allocate().ok and bob.allocate().ok
    ip, port = server.allocations[bob.five_tuple].relayed_address
    assert deleted(server.kick(SessionMatch.parse(relayed=f"{ip}:{port}"), T0)) == [
        ("bob", "kicked")
    ]
    assert alice.five_tuple in server.allocations


# -- revoke -----------------------------------------------------------------------------


def test_a_revoked_user_is_kicked_and_refused_until_the_revocation_ends(
    server: TurnServer,
) -> None:
    alice = TurnTestClient(server)
    assert alice.allocate().ok
    actions = server.set_revocations({"alice": T0 + 600}, T0 + 1)
    assert deleted(actions) == [("alice", "revoked")]
    again = TurnTestClient(server, client=OTHER_CLIENT)
    result = again.allocate(now=T0 + 2)
    assert result.code == 401
    assert [e.reason for e in result.events_of(AuthFailed)] == [AuthFailure.REVOKED]
    assert TurnTestClient(server, "bob", "bobpw", client=THIRD_CLIENT).allocate(now=T0 + 2).ok
    assert TurnTestClient(server, client=("203.0.113.20", 1)).allocate(now=T0 + 601).ok


def test_revoking_a_user_part_refuses_every_rest_credential_of_it(server: TurnServer) -> None:
    first = rest_username(int(T0) + 3600, "carol")
    second = rest_username(int(T0) + 7200, "carol")
    assert rest_client(server, first, CLIENT).allocate().ok
    assert deleted(server.set_revocations({"carol": FOREVER}, T0)) == [(first, "revoked")]
    assert rest_client(server, second, OTHER_CLIENT).allocate(now=T0 + 1).code == 401


def test_revoking_one_leaked_rest_username_leaves_the_users_others(server: TurnServer) -> None:
    leaked = rest_username(int(T0) + 3600, "carol")
    fresh = rest_username(int(T0) + 3601, "carol")
    server.set_revocations({leaked: FOREVER}, T0)
    assert rest_client(server, leaked, CLIENT).allocate().code == 401
    assert rest_client(server, fresh, OTHER_CLIENT).allocate().ok


def test_a_wrong_password_for_a_revoked_user_is_a_plain_bad_password(server: TurnServer) -> None:
    """Revocations are only told to whoever proves the credential."""
    server.set_revocations({"alice": FOREVER}, T0)
    result = TurnTestClient(server, password="guess").allocate()
    assert result.code == 401
    assert [e.reason for e in result.events_of(AuthFailed)] == [AuthFailure.BAD_PASSWORD]


def test_lifting_a_revocation_lets_the_user_back_in(server: TurnServer) -> None:
    server.set_revocations({"alice": FOREVER}, T0)
    assert TurnTestClient(server).allocate().code == 401
    server.set_revocations({}, T0 + 1)
    assert TurnTestClient(server, client=OTHER_CLIENT).allocate(now=T0 + 2).ok


# -- auth.end_expired_sessions -----------------------------------------------------------


def test_an_allocation_ends_when_its_rest_credential_expires_if_asked(
    make_server: MakeServer,
) -> None:
    server = make_server({"auth": {"end_expired_sessions": True}})
    name = rest_username(int(T0) + 100, "carol")
    carol = rest_client(server, name, CLIENT)
    assert carol.allocate().ok
    assert server.next_deadline() == T0 + 100
    assert deleted(server.expire(T0 + 99)) == []
    assert deleted(server.expire(T0 + 100)) == [(name, "credential expired")]


def test_by_default_an_expired_credential_relays_until_the_allocation_ends(
    server: TurnServer,
) -> None:
    name = rest_username(int(T0) + 100, "carol")
    carol = rest_client(server, name, CLIENT)
    assert carol.allocate().ok
    assert carol.create_permission(PEER).ok
    assert deleted(server.expire(T0 + 101)) == []
    sent = carol.send_indication(PEER, b"hi", now=T0 + 101)
    assert [type(a) for a in sent] == [SendToPeer]


def test_turning_end_expired_sessions_on_by_reload_ends_the_expired_ones(
    server: TurnServer, make_server: MakeServer
) -> None:
    name = rest_username(int(T0) + 100, "carol")
    assert rest_client(server, name, CLIENT).allocate().ok
    static = TurnTestClient(server, client=OTHER_CLIENT)
    assert static.allocate().ok
    server.reconfigure(make_server({"auth": {"end_expired_sessions": True}}).config)
    assert deleted(server.expire(T0 + 200)) == [(name, "credential expired")]
    assert static.five_tuple in server.allocations


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("45", 45), ("1.5h", 5400)],
)
def test_durations_read_like_an_operator_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "10 minutes", "m", "1e9", "nan"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("client", "relayed", "expected"),
    [
        ("10.0.0.1", None, SessionMatch(client_ip="10.0.0.1")),
        ("10.0.0.1:5000", None, SessionMatch(client_ip="10.0.0.1", client_port=5000)),
        ("[2001:db8::1]:5000", None, SessionMatch(client_ip="2001:db8::1", client_port=5000)),
        ("2001:db8::1", None, SessionMatch(client_ip="2001:db8::1")),
        (None, "192.0.2.1:49152", SessionMatch(relayed=("192.0.2.1", 49152))),
    ],
)
def test_kick_targets_parse_and_round_trip(
    client: str | None, relayed: str | None, expected: SessionMatch
) -> None:
    match = SessionMatch.parse(client=client, relayed=relayed)
    assert match == expected
    assert SessionMatch.from_dict(match.to_dict()) == match


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"client": "host.example:1"}, "not an address"),
        ({"client": "10.0.0.1:70000"}, "port out of range"),
        ({"relayed": "192.0.2.1"}, "needs a port"),
        ({"relayed": "[::1"}, "not an address"),
        ({"user": ""}, "1 to 512"),
        ({"user": "x" * 600}, "1 to 512"),
        ({"user": 5}, "must be a string"),
    ],
)
def test_bad_kick_targets_are_refused(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        SessionMatch.from_dict(fields)


def test_revocations_travel_as_json_with_null_for_until_removed() -> None:
    revoked = {"alice": FOREVER, "bob": T0 + 60}
    text = revocations_to_json(revoked)
    assert text == {"alice": None, "bob": T0 + 60}
    assert revocations_from_json(text) == revoked
    assert active_revocations(revoked, T0 + 60) == {"alice": math.inf}


@pytest.mark.parametrize(
    "data",
    [[], {"alice": "soon"}, {"alice": True}, {"": None}, {"alice": float("nan")}, {"a": 10**400}],
)
def test_malformed_revocations_are_refused(data: object) -> None:
    with pytest.raises(ValueError):
        revocations_from_json(data)


# -- any JSON a control client sends ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
match_fields = st.dictionaries(
    st.sampled_from(["user", "client", "relayed", "other"]),
    json_values | hosts | st.tuples(hosts, ports).map(lambda hp: f"{hp[0]}:{hp[1]}"),
)


@given(match_fields)
def test_any_kick_target_parses_or_raises_value_error(fields: dict[str, object]) -> None:
    """What the control socket turns into an error answer: nothing else may escape."""
    try:
        match = SessionMatch.from_dict(fields)
    except ValueError:
        return
    assert SessionMatch.from_dict(match.to_dict()) == match


@given(json_values)
def test_any_revocation_list_parses_or_raises_value_error(data: object) -> None:
    try:
        revoked = revocations_from_json(data)
    except ValueError:
        return
    assert revocations_from_json(revocations_to_json(revoked)) == revoked
