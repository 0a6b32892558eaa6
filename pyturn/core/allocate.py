"""Allocate and Refresh (RFC 8656 §7.2, §7.3): how an allocation begins and ends.

Each handler follows the RFC's numbered steps: one allocation per 5-tuple, the requested
transport and address families, quotas, then a relay port (pyturn/core/relay_ports.py)
and the allocation itself, whose methods write the forwarding table from then on.
"""

from __future__ import annotations

from pyturn.config import split_host_port
from pyturn.core import bandwidth, errors
from pyturn.core.actions import (
    AllocationCreated,
    AllocationRefreshed,
    QuotaRejected,
    StartRelaying,
)
from pyturn.core.allocation import (
    Allocation,
)
from pyturn.core.auth import Candidate
from pyturn.core.bandwidth import TOTAL_RATE
from pyturn.core.forwarding import FiveTuple, RelaySocket
from pyturn.core.state import ServerState
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    AdditionalAddressFamily,
    Address,
    AddressErrorCode,
    AlternateServer,
    Attribute,
    DontFragment,
    EvenPort,
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    XorMappedAddress,
    XorRelayedAddress,
)
from pyturn.wire.message import (
    Message,
)


class AllocateRequests(ServerState):
    """The Allocate and Refresh handlers of TurnServer."""

    def _lifetime(self, msg: Message, *, zero_deletes: bool) -> int:
        """RFC 8656 §7.2/§7.3: at least the default, at most the maximum; 0 on Refresh."""
        limits = self.config.allocations
        requested = msg.get(Lifetime)
        if requested is None:
            return limits.default_lifetime
        if requested.value == 0 and zero_deletes:
            return 0
        return max(min(requested.value, limits.max_lifetime), limits.default_lifetime)

    def _allocate(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        client = five_tuple[1]
        # Step 2: one allocation per 5-tuple (retransmissions were answered earlier).
        if five_tuple in self.allocations:
            raise errors.AllocationMismatch
        # Step 3: UDP relaying, or TCP relaying (RFC 6062) for clients on TCP/TLS.
        transport = msg.get(RequestedTransport)
        if transport is None:
            raise errors.BadRequest("REQUESTED-TRANSPORT missing")
        if transport.protocol not in (TRANSPORT_UDP, TRANSPORT_TCP):
            raise errors.UnsupportedTransport
        token = msg.get(ReservationToken)
        even_port = msg.get(EvenPort)
        requested_family = msg.get(RequestedAddressFamily)
        additional_family = msg.get(AdditionalAddressFamily)
        tcp = transport.protocol == TRANSPORT_TCP
        if tcp and not self.config.allocations.tcp_relay:
            raise errors.UnsupportedTransport("TCP relaying is off (allocations.tcp_relay)")
        if tcp:
            # RFC 6062 §5.1: TCP relaying needs a TCP control connection, and the
            # UDP-only options make no sense for it.
            if five_tuple[0] == "udp":
                raise errors.BadRequest("TCP relaying needs a TCP or TLS connection")
            if (
                token is not None
                or even_port is not None
                or additional_family is not None
                or msg.get(DontFragment) is not None
            ):
                raise errors.BadRequest("option not allowed with REQUESTED-TRANSPORT TCP")
        # Step 5/6: a reservation token excludes EVEN-PORT and address family choices.
        if token is not None and (even_port is not None or requested_family is not None):
            raise errors.BadRequest("RESERVATION-TOKEN with EVEN-PORT or family")
        if additional_family is not None and (
            requested_family is not None
            or token is not None
            or (even_port is not None and even_port.reserve)
        ):
            # RFC 8656 §7.2 steps 5 and 8: a dual-stack allocation cannot reserve a port.
            raise errors.BadRequest(
                "ADDITIONAL-ADDRESS-FAMILY with REQUESTED-ADDRESS-FAMILY or a reservation"
            )
        family = FAMILY_IPV4
        if self.config.allocations.default_family == "keep" and ":" in client[0]:
            # coturn's keep-address-family: an IPv6 client gets an IPv6 relay if there is one.
            family = FAMILY_IPV6 if FAMILY_IPV6 in self.relay_ips else FAMILY_IPV4
        if token is not None:
            # RFC 8656 §7.2 step 5: the token alone names the reserved port, so its
            # family too (REQUESTED-ADDRESS-FAMILY may not come with it).
            reserved = self.ports.read_token(token.value, now)
            if reserved is None:
                raise errors.InsufficientCapacity("unknown or expired RESERVATION-TOKEN")
            family = reserved.family
        if requested_family is not None:
            family = requested_family.family
            if family not in (FAMILY_IPV4, FAMILY_IPV6) or family not in self.relay_ips:
                raise errors.AddressFamilyNotSupported
        extra: list[Attribute] = []
        dual_stack = False
        if additional_family is not None:
            if additional_family.family != FAMILY_IPV6:
                raise errors.BadRequest("ADDITIONAL-ADDRESS-FAMILY must ask for IPv6")
            dual_stack = FAMILY_IPV6 in self.relay_ips
            if not dual_stack:
                # RFC 8656 §7.2: without an IPv6 relay, allocate IPv4 alone and say why.
                extra.append(AddressErrorCode(FAMILY_IPV6, 440, "Address Family not Supported"))
        if family not in self.relay_ips:
            raise errors.AddressFamilyNotSupported
        # A node that only spreads clients over others (RFC 8489 §10 ALTERNATE-SERVER).
        if self.redirects:
            raise errors.TryAlternate(attributes=[self._next_redirect(client)])
        # Step 7: quotas, for the whole node (pyturn/core/node.py). Held from here: the
        # steps below give the place back if they refuse.
        quotas = self.config.quotas
        user = candidate.quota_user
        if self.table.rates[TOTAL_RATE] and bandwidth.at_capacity(
            self.table.buckets, self.table.ns(now)
        ):
            # Measured use, not promised rates: what running calls actually send.
            raise errors.InsufficientCapacity("bandwidth at capacity (bandwidth.total)")
        if not self.node.hold(user, quotas.allocations_per_user, quotas.allocations_total):
            self._out.append(QuotaRejected(client, candidate.username))
            raise errors.AllocationQuotaReached
        try:
            relayed, relay, reservation, relay6, relayed6 = self._bind_relays(
                family=family,
                tcp=tcp,
                token=token,
                even_port=even_port,
                dual_stack=dual_stack,
                msg=msg,
                extra=extra,
                user=user,
                now=now,
            )
        except BaseException:
            self.node.release(user)
            raise
        lifetime = self._lifetime(msg, zero_deletes=False)
        allocation = Allocation(
            five_tuple=five_tuple,
            username=candidate.username,
            quota_user=candidate.quota_user,
            key=candidate.key,
            relay=relay,
            relayed_address=relayed,
            family=family,
            created_at=now,
            expires_at=now + lifetime,
            allocate_transaction=msg.transaction_id,
            allocate_response=b"",
            table=self.table,
            use_sha256=msg.integrity_sha256_offset is not None,
            relay6=relay6,
            relayed_address6=relayed6,
            peer_connections={} if tcp else None,
            credential_expires_at=candidate.expires_at,
        )
        allocation.counters[bandwidth.USER_BUCKET] = self.node.user_bucket(user)
        self.allocations[five_tuple] = allocation
        self._schedule(allocation)
        self._out.append(AllocationCreated(allocation))
        self._out.append(StartRelaying(allocation))
        attributes: list[Attribute] = [XorRelayedAddress(*relayed)]
        if relayed6 is not None:
            attributes.append(XorRelayedAddress(*relayed6))
        attributes += [
            Lifetime(lifetime),
            XorMappedAddress(*client),
        ]
        if reservation is not None:
            attributes.append(ReservationToken(reservation))
        return attributes + extra

    def _next_redirect(self, client: Address) -> AlternateServer:
        """The next of `redirect_allocations` in turn, among those of the client's family
        (coturn's rule: a client is sent where it can go)."""
        usable = [r for r in self.redirects if (":" in r[0]) == (":" in client[0])]
        choices = usable or self.redirects
        self.redirect_turn += 1
        host, port = choices[self.redirect_turn % len(choices)]
        return AlternateServer(host, port)

    def _bind_relays(
        self,
        *,
        family: int,
        tcp: bool,
        token: ReservationToken | None,
        even_port: EvenPort | None,
        dual_stack: bool,
        msg: Message,
        extra: list[Attribute],
        user: str,
        now: float,
    ) -> tuple[Address, RelaySocket, bytes | None, RelaySocket | None, Address | None]:
        """Steps 8-9: the relay socket(s) of a new allocation with the relayed addresses
        clients are told, and its reservation token."""
        # Step 8: a node taken out of rotation sends new clients elsewhere.
        if self.draining:
            alternate = self.config.alternate_server
            if alternate:
                host, port = split_host_port(alternate)
                raise errors.TryAlternate(attributes=[AlternateServer(host, port)])
            raise errors.InsufficientCapacity("server is draining")
        dont_fragment = msg.get(DontFragment) is not None
        if token is not None:
            # The reserved port is on the address its pair was given.
            reserved = self.ports.read_token(token.value, now)
            index = reserved.index if reserved is not None else 0
        else:
            index = self._next_relay_index(family)
        if tcp:
            relay, reservation = self.ports.bind_tcp(family, index), None
        else:
            relay, reservation = self.ports.bind_udp(
                family, index, token, even_port, dont_fragment, now=now, quota_user=user
            )
        relayed = (self.relay_choices[family][index], relay.port)
        relay6: RelaySocket | None = None
        relayed6: Address | None = None
        if dual_stack:
            index6 = self._next_relay_index(FAMILY_IPV6)
            try:
                relay6, _ = self.ports.bind_udp(
                    FAMILY_IPV6, index6, None, None, dont_fragment, now=now, quota_user=user
                )
            except errors.InsufficientCapacity:
                extra.append(AddressErrorCode(FAMILY_IPV6, 508, "Insufficient Capacity"))
            else:
                relayed6 = (self.relay_choices[FAMILY_IPV6][index6], relay6.port)
        return relayed, relay, reservation, relay6, relayed6

    def _next_relay_index(self, family: int) -> int:
        """Which of the family's relay addresses the next allocation gets: each in turn."""
        count = len(self.relay_choices[family])
        if count == 1:
            return 0
        turn = self.relay_turns.get(family, -1) + 1
        self.relay_turns[family] = turn
        return turn % count

    def _refresh(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        allocation = self._allocation(five_tuple)
        requested_family = msg.get(RequestedAddressFamily)
        if requested_family is not None and requested_family.family != allocation.family:
            raise errors.PeerAddressFamilyMismatch
        lifetime = self._lifetime(msg, zero_deletes=True)
        if lifetime == 0:
            self._out += self._delete(allocation, "refresh", now)
            return [Lifetime(0)]
        allocation.expires_at = now + lifetime
        self._schedule(allocation)
        self._out.append(AllocationRefreshed(allocation, lifetime))
        return [Lifetime(lifetime)]
