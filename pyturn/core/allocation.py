"""Allocations, permissions and channel bindings (RFC 8656 §5, §9, §12).

An `Allocation` holds what the RFC's rules need: its permissions and channels with the
time each one ends. What the data plane forwards is not read from here but from the
`ForwardingTable` (pyturn/core/forwarding.py), and the methods below are what write it:
`permit`, `bind_channel`, `expire`, `forget_peers` and `close`, each next to the
lifetime it keeps, so the table always says what these dictionaries say. The traffic
counters live in the table too (`counters`); the properties below read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyturn.core.bandwidth import Counters
from pyturn.core.forwarding import (
    BYTES_TO_CLIENT,
    BYTES_TO_PEER,
    PACKETS_TO_CLIENT,
    PACKETS_TO_PEER,
    FiveTuple,
    Flow,
    ForwardingTable,
    RelaySocket,
    new_counters,
)
from pyturn.wire.attributes import FAMILY_IPV6, Address

# RFC 8656 §9 and §12: fixed lifetimes, not negotiable.
PERMISSION_LIFETIME = 300.0
CHANNEL_LIFETIME = 600.0

__all__ = ["FiveTuple", "RelaySocket"]


class RelayBinder(Protocol):
    """Binds and releases relay ports for the core (the I/O layer implements it)."""

    def bind(
        self, family: int, port: int, dont_fragment: bool, index: int = 0
    ) -> RelaySocket | None:
        """A socket bound to `port` on the family's relay address `index` (0:
        relay.address or address6, then relay.more_addresses of that family), or None
        when the port is taken by someone else."""

    def bind_tcp(self, family: int, port: int, index: int = 0) -> RelaySocket | None:
        """A TCP socket listening on `port` for an RFC 6062 allocation, or None."""

    def release(self, relay: RelaySocket) -> None: ...


@dataclass(slots=True, eq=False)
class Allocation:
    five_tuple: FiveTuple
    username: str
    quota_user: str
    key: bytes
    relay: RelaySocket
    relayed_address: Address
    family: int
    created_at: float
    expires_at: float
    allocate_transaction: bytes
    allocate_response: bytes
    # The process's forwarding table, which this allocation's methods keep in step.
    table: ForwardingTable
    use_sha256: bool = False
    # RFC 8656 §7.2 ADDITIONAL-ADDRESS-FAMILY: the IPv6 relay of a dual-stack allocation.
    relay6: RelaySocket | None = None
    relayed_address6: Address | None = None
    permissions: dict[str, float] = field(default_factory=dict)
    channel_peers: dict[int, Address] = field(default_factory=dict)
    channel_expiry: dict[int, float] = field(default_factory=dict)
    # Packets and bytes each way (PACKETS_TO_PEER, ...): the data plane adds to them.
    counters: Counters = field(default_factory=new_counters)
    # When its REST credential expires (inf for a static user): with
    # auth.end_expired_sessions the allocation ends then.
    credential_expires_at: float = float("inf")
    # Earliest deadline queued for this allocation in the server's timer heap.
    scheduled_at: float = float("inf")
    closed: bool = False
    # RFC 6062: a TCP allocation's peer connections by CONNECTION-ID (None for UDP).
    peer_connections: dict[int, PeerConnection] | None = None

    # The allocation as the forwarding table's entries name it: one tuple, shared by all.
    flow: Flow = field(init=False)

    def __post_init__(self) -> None:
        transport, client, server = self.five_tuple
        self.flow = (transport, client, server, self.counters)

    @property
    def packets_to_peer(self) -> int:
        return self.counters[PACKETS_TO_PEER]

    @property
    def bytes_to_peer(self) -> int:
        return self.counters[BYTES_TO_PEER]

    @property
    def packets_to_client(self) -> int:
        return self.counters[PACKETS_TO_CLIENT]

    @property
    def bytes_to_client(self) -> int:
        return self.counters[BYTES_TO_CLIENT]

    def channel_to(self, peer: Address) -> int | None:
        """The channel bound to `peer`, if any (a scan: ChannelBind is rare, and a second
        dictionary per allocation would cost memory for every one held)."""
        return next((n for n, bound in self.channel_peers.items() if bound == peer), None)

    @property
    def channel_headers(self) -> dict[Address, bytes]:
        """Each bound peer's 2-byte ChannelData prefix (for tests and invariants)."""
        return {peer: n.to_bytes(2, "big") for n, peer in self.channel_peers.items()}

    @property
    def is_tcp(self) -> bool:
        return self.peer_connections is not None

    @property
    def relays(self) -> tuple[RelaySocket, ...]:
        return (self.relay,) if self.relay6 is None else (self.relay, self.relay6)

    def relay_for(self, peer_host: str) -> RelaySocket:
        """The relay socket whose family matches the peer's (dual-stack allocations)."""
        if self.relay6 is not None and ":" in peer_host:
            return self.relay6
        return self.relay

    def serves_family(self, family: int) -> bool:
        return family == self.family or (self.relay6 is not None and family == FAMILY_IPV6)

    def _channels_towards(self, ip: str) -> list[tuple[Address, int]]:
        return [(peer, n) for n, peer in self.channel_peers.items() if peer[0] == ip]

    def permit(self, peer_ip: str, now: float) -> None:
        if not self.is_tcp:  # RFC 6062 peers are reached over connections, not routes
            self.table.permit(self.flow, self.relay_for(peer_ip), peer_ip, self._channels_towards)
        self.permissions[peer_ip] = now + PERMISSION_LIFETIME

    def bind_channel(self, number: int, peer: Address, now: float) -> None:
        self.channel_peers[number] = peer
        self.channel_expiry[number] = now + CHANNEL_LIFETIME
        self.table.bind(self.flow, self.relay_for(peer[0]), number, peer, permitted=False)
        self.permit(peer[0], now)

    def _drop_permission(self, ip: str) -> None:
        del self.permissions[ip]
        if not self.is_tcp:
            self.table.revoke(self.flow, self.relay_for(ip), ip, self._channels_towards)

    def _drop_channel(self, number: int) -> None:
        peer = self.channel_peers.pop(number)
        self.channel_expiry.pop(number, None)
        self.table.unbind(self.flow, self.relay_for(peer[0]), number, peer)

    def forget_peers(self, denied: Callable[[str], bool]) -> None:
        """Drop permissions and channels for peer IPs that `denied` refuses."""
        for ip in [ip for ip in self.permissions if denied(ip)]:
            self._drop_permission(ip)
        for number in [n for n, peer in self.channel_peers.items() if denied(peer[0])]:
            self._drop_channel(number)

    def expire(self, now: float) -> None:
        """Drop permissions and channels past their lifetime (RFC 8656 §9, §12)."""
        for ip in [ip for ip, at in self.permissions.items() if at <= now]:
            self._drop_permission(ip)
        for number in [n for n, at in self.channel_expiry.items() if at <= now]:
            self._drop_channel(number)

    def close(self) -> None:
        """The allocation ends: its entries leave the table before its sockets close."""
        self.closed = True
        for ip in list(self.permissions):
            self._drop_permission(ip)
        for number in list(self.channel_peers):
            self._drop_channel(number)

    def next_deadline(self) -> float:
        waiting = (
            [c.bind_deadline for c in self.peer_connections.values() if c.state != BOUND]
            if self.peer_connections
            else []
        )
        return min(
            (
                self.expires_at,
                *self.permissions.values(),
                *self.channel_expiry.values(),
                *waiting,
            ),
        )


CONNECTING = "connecting"
WAITING_FOR_BIND = "waiting for ConnectionBind"
BOUND = "bound"
# RFC 6062 §5.2-§5.3: a peer connection waits at most 30 s for its ConnectionBind.
CONNECTION_BIND_TIMEOUT = 30.0


@dataclass(slots=True, eq=False)
class PeerConnection:
    """RFC 6062: one TCP connection between a relayed address and a peer.

    It is made by a Connect request (the answer waits for the TCP handshake) or by a
    peer connecting to the relayed address (announced with a ConnectionAttempt
    indication), and becomes a plain byte pipe once a client data connection sends
    ConnectionBind with its CONNECTION-ID.
    """

    connection_id: int
    allocation: Allocation
    peer: Address
    state: str
    bind_deadline: float
    # The Connect request to answer once the TCP handshake with the peer ends.
    transaction_id: bytes = b""
    sha256: bool = False
    fingerprint: bool = False
    # The I/O layer's object for the peer side of the connection.
    handle: object = None
