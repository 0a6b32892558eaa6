"""Relay ports (RFC 8656 §7.2): the port pools, EVEN-PORT reservations and their tokens.

A port is chosen at random from what is free in the node's pool of its family
(`PortPool`, pyturn/core/node.py: one pool for all workers), bound through the I/O
layer's `RelayBinder`, and put back when its allocation ends. EVEN-PORT with R reserves
the next port for a RESERVATION-TOKEN that any worker can redeem; a reserved port counts
against its user's allocation quota until it is used or its 30 s pass.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pyturn.core import errors
from pyturn.core.allocation import Allocation, RelayBinder
from pyturn.core.forwarding import RelaySocket
from pyturn.core.node import NodeState
from pyturn.core.randomness import RandomSource
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    EvenPort,
    ReservationToken,
)

RESERVATION_LIFETIME = 30.0  # RFC 8656 §7.2: a reserved port is held for about 30 s
# A token's expiry is kept modulo 4096 s, far beyond RESERVATION_LIFETIME; the three bits
# above it name the relay address (config.MAX_RELAY_ADDRESSES of a family).
_EXPIRY_MASK = 0x0FFF
_INDEX_SHIFT = 12
_BIND_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class Reserved:
    """What a RESERVATION-TOKEN names: a port on one relay address of a family."""

    port: int
    family: int
    # Which of the family's relay addresses (see RelayBinder.bind).
    index: int


@dataclass(slots=True)
class _Reservation:
    port: int
    family: int
    expires_at: float
    # A reserved port counts against its user's quota until used or expired.
    quota_user: str


class RelayPorts:
    """The relay ports this process holds, both families, and its reservations."""

    def __init__(
        self,
        min_port: int,
        max_port: int,
        binder: RelayBinder,
        *,
        random: RandomSource,
        secret: bytes,
        node: NodeState,
    ) -> None:
        self.binder = binder
        self._secret = secret
        self._node = node
        self.pools = node.port_pools(min_port, max_port, random)
        self.reservations: dict[bytes, _Reservation] = {}

    def bind_udp(
        self,
        family: int,
        index: int,
        token: ReservationToken | None,
        even_port: EvenPort | None,
        dont_fragment: bool,
        *,
        now: float,
        quota_user: str,
    ) -> tuple[RelaySocket, bytes | None]:
        pool = self.pools[family]
        if token is not None:
            reserved = self.read_token(token.value, now)
            if reserved is None or reserved.family != family or reserved.index != index:
                raise errors.InsufficientCapacity("unknown or expired RESERVATION-TOKEN")
            held = self.reservations.pop(token.value, None)
            if held is not None:
                self._node.release(held.quota_user)
            if not pool.claim_reserved(reserved.port):
                # No longer reserved, by this worker or another: it was used already.
                raise errors.InsufficientCapacity("RESERVATION-TOKEN already used")
            relay = self.binder.bind(family, reserved.port, dont_fragment, index)
            if relay is None:
                pool.put(reserved.port)
                raise errors.InsufficientCapacity("reserved port could not be bound")
            return relay, None
        busy: list[int] = []
        try:
            for _ in range(_BIND_ATTEMPTS):
                if even_port is None:
                    port = pool.take_random()
                else:
                    port = pool.random_even_pair() if even_port.reserve else pool.random_even()
                    if port is not None and pool.take(port) is None:
                        continue  # another worker took it in between
                if port is None:
                    break
                if even_port is not None and even_port.reserve and not pool.reserve(port + 1):
                    pool.put(port)
                    continue  # another worker took the successor in between
                relay = self.binder.bind(family, port, dont_fragment, index)
                if relay is None:
                    # Someone outside pyturn holds it: try another (this one is set aside, so
                    # the next pick cannot be it again), and give it back to the pool after,
                    # because that process may let it go.
                    busy.append(port)
                    if even_port is not None and even_port.reserve:
                        pool.unreserve(port + 1)
                    continue
                if even_port is not None and even_port.reserve:
                    reservation = self._make_token(port + 1, family, index, now)
                    self.reservations[reservation] = _Reservation(
                        port + 1, family, now + RESERVATION_LIFETIME, quota_user
                    )
                    self._node.add(quota_user)
                    return relay, reservation
                return relay, None
        finally:
            for port in busy:
                pool.put(port)
        raise errors.InsufficientCapacity("no relay port free")

    def _make_token(self, port: int, family: int, index: int, now: float) -> bytes:
        """A RESERVATION-TOKEN any worker process can redeem (they share the secret).

        Port, then a 16-bit word (the family bit, 3 bits of relay address index, 12 bits
        of the expiry time), then a 4-byte MAC: a client on another 5-tuple may land on
        another worker than the one that reserved.
        """
        word = (
            (int(now + RESERVATION_LIFETIME) & _EXPIRY_MASK)
            | (index << _INDEX_SHIFT)
            | (0x8000 if family == FAMILY_IPV6 else 0)
        )
        body = port.to_bytes(2, "big") + word.to_bytes(2, "big")
        return body + self._token_mac(body)

    def _token_mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, b"reservation" + body, hashlib.sha256).digest()[:4]

    def read_token(self, token: bytes, now: float) -> Reserved | None:
        """What a valid, unexpired token of ours reserves, else None."""
        body, mac = token[:4], token[4:]
        if not hmac.compare_digest(mac, self._token_mac(body)):
            return None
        word = int.from_bytes(body[2:4], "big")
        if ((word & _EXPIRY_MASK) - int(now)) & _EXPIRY_MASK > RESERVATION_LIFETIME:
            return None  # past its expiry (the difference wraps around)
        family = FAMILY_IPV6 if word & 0x8000 else FAMILY_IPV4
        index = (word >> _INDEX_SHIFT) & 0x7
        return Reserved(int.from_bytes(body[:2], "big"), family, index)

    def bind_tcp(self, family: int, index: int = 0) -> RelaySocket:
        pool = self.pools[family]
        for _ in range(_BIND_ATTEMPTS):
            port = pool.take_random()
            if port is None:
                break
            relay = self.binder.bind_tcp(family, port, index)
            if relay is not None:
                return relay
            pool.put(port)
        raise errors.InsufficientCapacity("no relay port free")

    def release(self, allocation: Allocation) -> None:
        """Close an ended allocation's relay sockets and free their ports."""
        self.binder.release(allocation.relay)
        self.pools[allocation.family].put(allocation.relay.port)
        if allocation.relay6 is not None:
            self.binder.release(allocation.relay6)
            self.pools[FAMILY_IPV6].put(allocation.relay6.port)

    def expire(self, now: float) -> None:
        """Free the reserved ports whose tokens were not redeemed in time."""
        for token in [t for t, r in self.reservations.items() if r.expires_at <= now]:
            reservation = self.reservations.pop(token)
            self.pools[reservation.family].unreserve(reservation.port)
            self._node.release(reservation.quota_user)

    def next_deadline(self) -> float | None:
        return min((r.expires_at for r in self.reservations.values()), default=None)
