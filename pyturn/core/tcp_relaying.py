"""TCP relaying (RFC 6062): Connect, ConnectionBind and peer connections.

A TCP allocation's relayed address listens for peers and connects out to them; each
such connection waits (at most 30 s) for the client to claim it with a ConnectionBind on
a new data connection, after which the I/O layer pipes its bytes. The core decides who
may connect and tracks the CONNECTION-IDs; the sockets are pyturn/net/tcp_relay.py's.

A CONNECTION-ID names the worker process that made it in its low 8 bits (the rest is
random): with several workers the kernel may hand the client's data connection to any of
them, and the one that accepts it passes it to the owner (pyturn/net/handover.py).
"""

from __future__ import annotations

from pyturn.core import errors
from pyturn.core.actions import (
    Action,
    ClosePeerConnection,
    ConnectToPeer,
    JoinPeerConnection,
    RequestHandled,
    SendToClient,
)
from pyturn.core.allocation import (
    BOUND,
    CONNECTING,
    CONNECTION_BIND_TIMEOUT,
    WAITING_FOR_BIND,
    Allocation,
    PeerConnection,
)
from pyturn.core.auth import Candidate
from pyturn.core.forwarding import FiveTuple
from pyturn.core.state import ServerState
from pyturn.wire.attributes import (
    Address,
    Attribute,
    ConnectionId,
    ErrorCode,
    XorPeerAddress,
)
from pyturn.wire.message import (
    Message,
    MessageClass,
    Method,
    encode,
)

# The low bits of a CONNECTION-ID that name its worker; so at most 256 workers.
WORKER_BITS = 8
MAX_WORKERS = 1 << WORKER_BITS


def connection_id_worker(connection_id: int) -> int:
    """The index of the worker whose TurnServer made `connection_id`."""
    return connection_id & (MAX_WORKERS - 1)


class TcpRelaying(ServerState):
    """The RFC 6062 handlers of TurnServer and the outcomes the I/O layer reports."""

    def _new_connection_id(self) -> int:
        """RFC 6062 §5.2: an ID unique within the server; 24 random bits, then the worker."""
        while True:
            high = int.from_bytes(self.random.token(3), "big")
            connection_id = (high << WORKER_BITS) | self.worker_index
            if connection_id and connection_id not in self.peer_connections:
                return connection_id

    def _connect(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute] | None:
        """RFC 6062 §5.2: open a TCP connection to a peer; the answer waits for it."""
        allocation = self._allocation(five_tuple)
        if not allocation.is_tcp:
            raise errors.BadRequest("Connect needs a TCP allocation")
        peer = msg.get(XorPeerAddress)
        if peer is None:
            raise errors.BadRequest("XOR-PEER-ADDRESS missing")
        self._check_peer(allocation, peer)
        connections = allocation.peer_connections
        assert connections is not None
        if any(c.peer == peer.address for c in connections.values()):
            raise errors.ConnectionAlreadyExists
        if len(connections) >= self.config.quotas.permissions_per_allocation:
            raise errors.InsufficientCapacity("too many peer connections")
        connection = PeerConnection(
            connection_id=self._new_connection_id(),
            allocation=allocation,
            peer=peer.address,
            state=CONNECTING,
            bind_deadline=float("inf"),
            transaction_id=msg.transaction_id,
            sha256=msg.integrity_sha256_offset is not None,
            fingerprint=msg.fingerprint_offset is not None,
        )
        connections[connection.connection_id] = connection
        self.peer_connections[connection.connection_id] = connection
        self._out.append(ConnectToPeer(connection))
        return None

    def peer_connected(self, connection_id: int, ok: bool, now: float) -> list[Action]:
        """The outcome of a `ConnectToPeer`: answer the Connect request (success or 447)."""
        connection = self.peer_connections.get(connection_id)
        if connection is None or connection.state != CONNECTING:
            return []
        allocation = connection.allocation
        attributes: list[Attribute]
        if ok:
            connection.state = WAITING_FOR_BIND
            connection.bind_deadline = now + CONNECTION_BIND_TIMEOUT
            self._schedule(allocation)
            msg_class, code = MessageClass.SUCCESS, 0
            attributes = [ConnectionId(connection_id)]
        else:
            self._forget_connection(connection)
            error = errors.ConnectionTimeoutOrFailure()
            msg_class, code = MessageClass.ERROR, error.code
            attributes = [ErrorCode(error.code, error.reason)]
        response = Message(
            Method.CONNECT, msg_class, connection.transaction_id, (*attributes, *self._software)
        )
        data = encode(
            response,
            integrity_key=allocation.key,
            integrity_sha256=connection.sha256,
            integrity_sha1=not connection.sha256,
            fingerprint=connection.fingerprint,
        )
        return [
            SendToClient(allocation, data),
            RequestHandled(Method.CONNECT, code, allocation.five_tuple[1]),
        ]

    def peer_connection_arrived(
        self, allocation: Allocation, peer: Address, now: float
    ) -> tuple[PeerConnection | None, list[Action]]:
        """RFC 6062 §5.3: a peer connected to a relayed address; None means refuse it."""
        connections = allocation.peer_connections
        if (
            allocation.closed
            or connections is None
            or peer[0] not in allocation.permissions
            or not self.policy.is_allowed(peer[0])
            or any(c.peer == peer for c in connections.values())
            or len(connections) >= self.config.quotas.permissions_per_allocation
        ):
            return None, []
        connection = PeerConnection(
            connection_id=self._new_connection_id(),
            allocation=allocation,
            peer=peer,
            state=WAITING_FOR_BIND,
            bind_deadline=now + CONNECTION_BIND_TIMEOUT,
        )
        connections[connection.connection_id] = connection
        self.peer_connections[connection.connection_id] = connection
        self._schedule(allocation)
        indication = Message(
            Method.CONNECTION_ATTEMPT,
            MessageClass.INDICATION,
            self.random.token(12),
            (XorPeerAddress(*peer), ConnectionId(connection.connection_id)),
        )
        return connection, [SendToClient(allocation, encode(indication))]

    def _connection_bind(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute] | None:
        """RFC 6062 §5.4: a new client data connection claims a peer connection."""
        if five_tuple[0] == "udp" or five_tuple in self.allocations:
            raise errors.BadRequest("ConnectionBind belongs on a new TCP data connection")
        connection_id = msg.get(ConnectionId)
        if connection_id is None:
            raise errors.BadRequest("CONNECTION-ID missing")
        connection = self.peer_connections.get(connection_id.value)
        if connection is None or connection.state != WAITING_FOR_BIND:
            raise errors.BadRequest("unknown CONNECTION-ID")
        if connection.allocation.username != candidate.username:
            raise errors.WrongCredentials
        connection.state = BOUND
        connection.bind_deadline = float("inf")
        self._out.append(JoinPeerConnection(connection))
        return []

    def peer_connection_closed(self, connection_id: int) -> list[Action]:
        """Either side of a peer connection went away: forget it, close the other side."""
        connection = self.peer_connections.get(connection_id)
        if connection is None:
            return []
        self._forget_connection(connection)
        return [ClosePeerConnection(connection)]

    def _forget_connection(self, connection: PeerConnection) -> None:
        self.peer_connections.pop(connection.connection_id, None)
        if connection.allocation.peer_connections is not None:
            connection.allocation.peer_connections.pop(connection.connection_id, None)

    def _expire_peer_connections(self, allocation: Allocation, now: float) -> list[Action]:
        """RFC 6062 §5.2/§5.3: no ConnectionBind within 30 s closes the peer connection."""
        if not allocation.peer_connections:
            return []
        late = [c for c in allocation.peer_connections.values() if c.bind_deadline <= now]
        for connection in late:
            self._forget_connection(connection)
        return [ClosePeerConnection(c) for c in late]
