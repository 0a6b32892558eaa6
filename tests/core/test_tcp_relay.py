"""RFC 6062 TCP allocations in the core: Connect, ConnectionAttempt, ConnectionBind."""

from __future__ import annotations

import pytest

from pyturn.core.allocation import PeerConnection
from pyturn.core.randomness import SeededRandom
from pyturn.core.server import (
    ClosePeerConnection,
    ConnectToPeer,
    JoinPeerConnection,
    SendToClient,
    TurnServer,
)
from pyturn.core.tcp_relaying import connection_id_worker
from pyturn.wire.attributes import (
    TRANSPORT_TCP,
    ChannelNumber,
    ConnectionId,
    ErrorCode,
    XorPeerAddress,
)
from pyturn.wire.integrity import verify_integrity
from pyturn.wire.message import MessageClass, Method, decode
from tests.core.turn_client import T0, FakeBinder, MakeServer, TurnTestClient, make_config

PEER = ("8.8.8.8", 443)
DATA_CLIENT = ("203.0.113.5", 40001)


def _tcp_client(server: TurnServer, **kwargs: object) -> TurnTestClient:
    client = TurnTestClient(server, transport="tcp", **kwargs)  # type: ignore[arg-type]
    assert client.allocate(transport=TRANSPORT_TCP).code == 0
    return client


def _connect(client: TurnTestClient, peer: tuple[str, int] = PEER) -> PeerConnection:
    result = client.request(Method.CONNECT, [XorPeerAddress(*peer)])
    assert result.message is None, "a Connect is answered once the peer answers"
    (action,) = result.events_of(ConnectToPeer)
    assert isinstance(action, ConnectToPeer)
    return action.connection


def test_a_tcp_allocation_binds_a_listening_relay_port(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    """RFC 6062 §5.1: REQUESTED-TRANSPORT TCP over a TCP control connection."""
    server = make_server()
    _tcp_client(server)
    (allocation,) = server.allocations.values()
    assert allocation.is_tcp
    assert binder.tcp_ports == {allocation.relay.port}


def test_connect_is_answered_with_a_connection_id_once_the_peer_accepts(
    make_server: MakeServer,
) -> None:
    """RFC 6062 §5.2: success carries CONNECTION-ID and is signed with the allocation key."""
    server = make_server()
    client = _tcp_client(server)
    connection = _connect(client)
    actions = server.peer_connected(connection.connection_id, True, T0 + 1)
    (send,) = [a for a in actions if isinstance(a, SendToClient)]
    reply = decode(send.data)
    assert reply.method == Method.CONNECT and reply.msg_class == MessageClass.SUCCESS
    connection_id = reply.get(ConnectionId)
    assert connection_id is not None and connection_id.value == connection.connection_id
    assert verify_integrity(reply, client.key)


def test_a_peer_that_does_not_answer_gives_447(make_server: MakeServer) -> None:
    server = make_server()
    client = _tcp_client(server)
    connection = _connect(client)
    (send, *_) = server.peer_connected(connection.connection_id, False, T0 + 30)
    assert isinstance(send, SendToClient)
    error = decode(send.data).get(ErrorCode)
    assert error is not None and error.code == 447
    assert server.peer_connections == {}


def test_connect_refuses_denied_peers_duplicates_and_udp_allocations(
    make_server: MakeServer,
) -> None:
    """403 for the peer policy (SSRF), 446 for a second connection to a peer (§5.2)."""
    server = make_server()
    client = _tcp_client(server)
    assert client.request(Method.CONNECT, [XorPeerAddress("127.0.0.1", 22)]).code == 403
    assert client.request(Method.CONNECT, [XorPeerAddress("169.254.169.254", 80)]).code == 403
    assert client.request(Method.CONNECT, []).code == 400
    _connect(client)
    assert client.request(Method.CONNECT, [XorPeerAddress(*PEER)]).code == 446
    udp = TurnTestClient(server, client=("203.0.113.9", 5000))
    assert udp.allocate().code == 0
    assert udp.request(Method.CONNECT, [XorPeerAddress(*PEER)]).code == 400


def test_connection_bind_on_a_new_data_connection_joins_it_to_the_peer(
    make_server: MakeServer,
) -> None:
    """RFC 6062 §5.4: same credentials, a known CONNECTION-ID, then a raw pipe."""
    server = make_server()
    client = _tcp_client(server)
    connection = _connect(client)
    server.peer_connected(connection.connection_id, True, T0 + 1)
    data = TurnTestClient(server, transport="tcp", client=DATA_CLIENT)
    result = data.request(Method.CONNECTION_BIND, [ConnectionId(connection.connection_id)])
    assert result.code == 0
    assert result.events_of(JoinPeerConnection) == [JoinPeerConnection(connection)]
    again = TurnTestClient(server, transport="tcp", client=("203.0.113.5", 40002))
    result = again.request(Method.CONNECTION_BIND, [ConnectionId(connection.connection_id)])
    assert result.code == 400


def test_connection_bind_with_other_credentials_or_an_unknown_id_is_refused(
    make_server: MakeServer,
) -> None:
    server = make_server()
    client = _tcp_client(server)
    connection = _connect(client)
    server.peer_connected(connection.connection_id, True, T0 + 1)
    bob = TurnTestClient(server, "bob", "bobpw", transport="tcp", client=DATA_CLIENT)
    assert bob.request(Method.CONNECTION_BIND, [ConnectionId(connection.connection_id)]).code == 441
    data = TurnTestClient(server, transport="tcp", client=("203.0.113.5", 40003))
    assert data.request(Method.CONNECTION_BIND, [ConnectionId(12345)]).code == 400
    udp = TurnTestClient(server, client=("203.0.113.5", 40004))
    assert udp.request(Method.CONNECTION_BIND, [ConnectionId(connection.connection_id)]).code == 400


def test_an_incoming_peer_needs_a_permission_and_is_announced_by_connection_attempt(
    make_server: MakeServer,
) -> None:
    """RFC 6062 §5.3: no permission, no connection; else a ConnectionAttempt indication."""
    server = make_server()
    client = _tcp_client(server)
    (allocation,) = server.allocations.values()
    refused, actions = server.peer_connection_arrived(allocation, PEER, T0)
    assert refused is None and actions == []
    assert client.create_permission(PEER).code == 0
    connection, actions = server.peer_connection_arrived(allocation, PEER, T0 + 1)
    assert connection is not None
    (send,) = actions
    assert isinstance(send, SendToClient)
    indication = decode(send.data)
    assert indication.method == Method.CONNECTION_ATTEMPT
    assert indication.msg_class == MessageClass.INDICATION
    peer = indication.get(XorPeerAddress)
    assert peer is not None and peer.address == PEER
    connection_id = indication.get(ConnectionId)
    assert connection_id is not None and connection_id.value == connection.connection_id


def test_a_peer_connection_not_bound_within_30_seconds_is_closed(make_server: MakeServer) -> None:
    server = make_server()
    client = _tcp_client(server)
    connection = _connect(client)
    server.peer_connected(connection.connection_id, True, T0)
    deadline = server.next_deadline()
    assert deadline is not None and deadline <= T0 + 30
    assert server.expire(T0 + 29) == []
    assert server.expire(T0 + 30) == [ClosePeerConnection(connection)]
    assert server.peer_connections == {}


def test_deleting_a_tcp_allocation_forgets_its_peer_connections(make_server: MakeServer) -> None:
    server = make_server()
    client = _tcp_client(server)
    connection = _connect(client)
    server.peer_connected(connection.connection_id, True, T0)
    assert client.refresh(0).code == 0
    assert server.peer_connections == {}
    assert server.peer_connection_closed(connection.connection_id) == []


def test_udp_only_requests_on_a_tcp_allocation_are_refused_or_dropped(
    make_server: MakeServer,
) -> None:
    server = make_server()
    client = _tcp_client(server)
    result = client.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(*PEER)])
    assert result.code == 400
    assert client.create_permission(PEER).code == 0
    assert client.send_indication(PEER, b"x") == []


def test_a_reload_that_denies_a_peer_closes_its_peer_connections(
    make_server: MakeServer,
) -> None:
    """RFC 8656 §21.2.1: a tightened policy applies at once, to RFC 6062 peer connections
    as to permissions: the connection to the now denied peer closes, the other stays."""
    server = make_server()
    client = _tcp_client(server)
    denied = _connect(client, PEER)
    kept = _connect(client, ("9.9.9.9", 443))
    server.peer_connected(denied.connection_id, True, T0)
    server.peer_connected(kept.connection_id, True, T0)
    closed = server.reconfigure(make_config({"peers": {"deny": ["8.8.8.0/24"]}}))
    assert closed == [ClosePeerConnection(denied)]
    assert set(server.peer_connections) == {kept.connection_id}
    (allocation,) = server.allocations.values()
    assert set(allocation.peer_connections or {}) == {kept.connection_id}


def test_connection_ids_name_the_worker_that_made_them(
    make_server: MakeServer, binder: FakeBinder
) -> None:
    """RFC 6062 §5.2 leaves CONNECTION-IDs to the server: pyturn puts the index of the
    worker process in the low 8 bits, so that a data connection the kernel gives to
    another worker can be passed to the one that holds the peer connection; the other
    24 bits come from the random source."""
    server = TurnServer(
        make_config({"quotas": {"permissions_per_allocation": 50}}),
        binder,
        relay_ipv4="192.0.2.10",
        random=SeededRandom(1),
        worker_index=7,
    )
    client = _tcp_client(server)
    made = [_connect(client, (f"8.8.8.{last}", 443)).connection_id for last in range(1, 21)]
    assert client.create_permission(("9.9.9.9", 0)).code == 0
    (allocation,) = server.allocations.values()
    arrived, _ = server.peer_connection_arrived(allocation, ("9.9.9.9", 5000), T0)
    assert arrived is not None
    made.append(arrived.connection_id)
    assert {connection_id_worker(connection_id) for connection_id in made} == {7}
    assert len(set(made)) == len(made)
    assert len({connection_id >> 8 for connection_id in made}) == len(made)
    # One process is worker 0; 256 workers are the most the 8 bits can name.
    single = _connect(_tcp_client(make_server()))
    assert connection_id_worker(single.connection_id) == 0
    with pytest.raises(ValueError, match="worker_index"):
        TurnServer(make_config(), binder, relay_ipv4="192.0.2.10", worker_index=256)
