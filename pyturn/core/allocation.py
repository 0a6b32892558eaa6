"""Allocations, permissions and channel bindings (RFC 8656 §5, §9, §12).

An `Allocation` is also what the relay fast path reads: `channel_peers` maps a channel
number to its peer, `channel_headers` a peer to its 2-byte channel prefix, and
`permissions` a peer IP to its expiry. Expiry deletes entries, so the fast path never
looks at a clock: presence in the dictionary is the permission. The native fast path
(pyturn/net/_batch.c) reads these fields, `relay`, `relay6` and the four traffic counters
by name: a rename here is a rename there.
"""

from __future__ import annotations

import array
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyturn.wire.attributes import FAMILY_IPV6, MAGIC_COOKIE, Address, xor_address_value
from pyturn.wire.message import Method, message_type

# RFC 8656 §9 and §12: fixed lifetimes, not negotiable.
PERMISSION_LIFETIME = 300.0
CHANNEL_LIFETIME = 600.0

# (transport, client address, server address): the 5-tuple that names an allocation.
FiveTuple = tuple[str, Address, Address]

_DATA_INDICATION = message_type(Method.DATA, 0b01)


class RelaySocket(Protocol):
    """What the I/O layer gives the core for a bound relay port.

    The core never calls `sendto`: it returns `SendToPeer(relay, ...)` and the I/O layer
    does the sending.
    """

    @property
    def port(self) -> int: ...

    def sendto(self, data: bytes, peer: Address, /) -> None: ...


class RelayBinder(Protocol):
    """Binds and releases relay ports for the core (the I/O layer implements it)."""

    def bind(self, family: int, port: int, dont_fragment: bool) -> RelaySocket | None:
        """A socket bound to `port`, or None when the port is taken by someone else."""

    def bind_tcp(self, family: int, port: int) -> RelaySocket | None:
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
    use_sha256: bool = False
    # RFC 8656 §7.2 ADDITIONAL-ADDRESS-FAMILY: the IPv6 relay of a dual-stack allocation.
    relay6: RelaySocket | None = None
    relayed_address6: Address | None = None
    permissions: dict[str, float] = field(default_factory=dict)
    channel_peers: dict[int, Address] = field(default_factory=dict)
    channel_headers: dict[Address, bytes] = field(default_factory=dict)
    channel_expiry: dict[int, float] = field(default_factory=dict)
    # Plain counters: the fast path adds to them, metrics and logs read them.
    packets_to_peer: int = 0
    bytes_to_peer: int = 0
    packets_to_client: int = 0
    bytes_to_client: int = 0
    # A handle the I/O layer keeps for sending to this client (its transport).
    client_sink: object = None
    # Earliest deadline queued for this allocation in the server's timer heap.
    scheduled_at: float = float("inf")
    closed: bool = False
    # RFC 6062: a TCP allocation's peer connections by CONNECTION-ID (None for UDP).
    peer_connections: dict[int, PeerConnection] | None = None

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

    def permit(self, peer_ip: str, now: float) -> None:
        self.permissions[peer_ip] = now + PERMISSION_LIFETIME

    def bind_channel(self, number: int, peer: Address, now: float) -> None:
        self.channel_peers[number] = peer
        self.channel_headers[peer] = number.to_bytes(2, "big")
        self.channel_expiry[number] = now + CHANNEL_LIFETIME
        self.permit(peer[0], now)

    def forget_peers(self, denied: Callable[[str], bool]) -> None:
        """Drop permissions and channels for peer IPs that `denied` refuses."""
        for ip in [ip for ip in self.permissions if denied(ip)]:
            del self.permissions[ip]
        for number in [n for n, peer in self.channel_peers.items() if denied(peer[0])]:
            peer = self.channel_peers.pop(number)
            self.channel_headers.pop(peer, None)
            self.channel_expiry.pop(number, None)

    def expire(self, now: float) -> None:
        """Drop permissions and channels past their lifetime (RFC 8656 §9, §12)."""
        for ip in [ip for ip, at in self.permissions.items() if at <= now]:
            del self.permissions[ip]
        for number in [n for n, at in self.channel_expiry.items() if at <= now]:
            del self.channel_expiry[number]
            peer = self.channel_peers.pop(number)
            self.channel_headers.pop(peer, None)

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

    def frame_for_client(self, peer: Address, data: bytes) -> bytes | None:
        """What to send the client for a datagram from `peer`, or None to drop it.

        RFC 8656 §11.3/§12.6: nothing without a permission for the peer's IP (a channel
        outlives its permission unless refreshed); then ChannelData when a channel is
        bound to the peer, else a Data indication. serve_endpoint in
        pyturn/net/_batch.c does the same for UDP clients (calling this method for Data
        indications): a change here is a change there.
        """
        if peer[0] not in self.permissions:
            return None
        header = self.channel_headers.get(peer)
        if header is not None:
            return header + len(data).to_bytes(2, "big") + data
        return data_indication(peer, data)


_DATA_INDICATION_HEAD = _DATA_INDICATION.to_bytes(2, "big")
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")

_random_pool = bytearray()


def _transaction_id() -> bytes:
    """12 random bytes, drawn from the OS 4 KB at a time instead of a syscall each."""
    if len(_random_pool) < 12:
        _random_pool.extend(os.urandom(4096))
    txid = bytes(_random_pool[-12:])
    del _random_pool[-12:]
    return txid


def _random_below(n: int) -> int:
    """A random index below n (at most 65,536 ports) from the pooled OS bytes: 48 bits
    reduced modulo n, so no index is favoured by more than n / 2**48."""
    if len(_random_pool) < 6:
        _random_pool.extend(os.urandom(4096))
    value = int.from_bytes(_random_pool[-6:], "big")
    del _random_pool[-6:]
    return value % n


def data_indication(peer: Address, data: bytes) -> bytes:
    """A Data indication (RFC 8656 §11.4) built directly: it goes out for every datagram
    a peer sends without a channel, so no message objects are made."""
    txid = _transaction_id()
    value = xor_address_value(peer[0], peer[1], txid)
    peer_attr = b"\x00\x12" + len(value).to_bytes(2, "big") + value
    size = len(data)
    padding = -size % 4
    length = len(peer_attr) + 4 + size + padding
    return b"".join(
        (
            _DATA_INDICATION_HEAD,
            length.to_bytes(2, "big"),
            _COOKIE_BYTES,
            txid,
            peer_attr,
            b"\x00\x13",
            size.to_bytes(2, "big"),
            data,
            b"\x00" * padding,
        )
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


class PortPool:
    """Relay ports of one address family, chosen with a CSPRNG (RFC 8656 §7.2).

    `free` holds every port not handed out; taking one is a swap-remove at a random
    index, so picking stays O(1) however full the range is.
    """

    def __init__(self, min_port: int, max_port: int) -> None:
        self.min_port = min_port
        self.max_port = max_port
        self.free: list[int] = list(range(min_port, max_port + 1))
        # Each port's position in `free`, -1 once taken, at index port - min_port. An
        # array, not a dict: putting a port back stores a C integer rather than a new
        # int object, and such objects, made while allocations come and go and kept for
        # good, would each pin a whole arena of freed memory.
        self._index = array.array("i", range(len(self.free)))

    def __len__(self) -> int:
        return len(self.free)

    def take_random(self) -> int | None:
        if not self.free:
            return None
        return self.take(self.free[_random_below(len(self.free))])

    def take(self, port: int) -> int | None:
        if not self.min_port <= port <= self.max_port:
            return None
        index = self._index
        i = index[port - self.min_port]
        if i < 0:
            return None
        index[port - self.min_port] = -1
        # The pool's own int: the caller's may be a fresh one (a reservation token's).
        port = self.free[i]
        last = self.free.pop()
        if last != port:
            self.free[i] = last
            index[last - self.min_port] = i
        return port

    def is_free(self, port: int) -> bool:
        return self.min_port <= port <= self.max_port and self._index[port - self.min_port] >= 0

    def put(self, port: int) -> None:
        if not self.min_port <= port <= self.max_port or self._index[port - self.min_port] >= 0:
            return
        self._index[port - self.min_port] = len(self.free)
        self.free.append(port)

    def random_even_pair(self, tries: int = 64) -> int | None:
        """An even port whose successor is also free (EVEN-PORT with R, RFC 8656 §14.6)."""
        for _ in range(tries):
            port = self.free[_random_below(len(self.free))] if self.free else None
            if port is None:
                return None
            even = port & ~1
            if self.is_free(even) and self.is_free(even + 1):
                return even
        for port in list(self.free):
            if port % 2 == 0 and self.is_free(port + 1):
                return port
        return None

    def random_even(self, tries: int = 64) -> int | None:
        for _ in range(tries):
            if not self.free:
                return None
            port = self.free[_random_below(len(self.free))]
            if port % 2 == 0:
                return port
        return next((p for p in self.free if p % 2 == 0), None)
