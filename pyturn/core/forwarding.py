"""The forwarding table: where relayed datagrams go, the data plane's one source of truth.

The core writes it (through `Allocation`, when a permission or channel is created,
refreshed, expires or is deleted) and the data plane only reads it and adds to its
traffic counters: the Python reference path below, and the native fast path in
pyturn/net/_fastpath.c, which reads the same four dictionaries and nothing else. Keys
and values are plain tuples, ints, strings and bytes, laid out as the type aliases below
say, so C reads them by position, never by attribute name.

Client -> peer:
    `to_peer_by_channel[(transport, client, server, channel)] = (relay, relay_key, peer,
    counters)` for ChannelData; `to_peer_by_ip[(transport, client, server, peer_ip)] =
    (relay, relay_key, counters)` for Send indications.
Peer -> client:
    `to_client_by_peer[(relay_key, peer)] = (header, flow)` while a channel is bound to
    the peer and its IP has a permission (ChannelData), and `to_client_by_ip[(relay_key,
    peer_ip)] = flow` while the IP has a permission (Data indications).

A `relay_key` is the I/O layer's number for a relay socket (its file descriptor),
unique among the sockets open in the process; a `flow` is `(transport, client, server,
counters)`, the client's 5-tuple and the allocation's counters. Presence is the
permission: expiry deletes entries, so no reader looks at a clock.

The bandwidth limits (pyturn/core/bandwidth.py) are checked here too, after the route:
the counters array holds the allocation's buckets, and the table the rates and the
node's buckets. Readers pass the time in ns on the monotonic clock (the native path's
CLOCK_MONOTONIC, `time.monotonic_ns()`), which only the limits read; the core turns its
own clock values into that one with `ns`.
"""

from __future__ import annotations

import array
from collections.abc import Callable
from typing import NamedTuple, Protocol

from pyturn.core import bandwidth
from pyturn.core.bandwidth import (
    COUNTERS_SIZE,
    TO_CLIENT,
    TO_PEER,
    Admit,
    Counters,
    Rates,
    Words,
)
from pyturn.core.randomness import RandomSource
from pyturn.wire.attributes import MAGIC_COOKIE, Address, xor_address_value
from pyturn.wire.message import Method, message_type

# (transport, client address, server address): the 5-tuple that names an allocation.
FiveTuple = tuple[str, Address, Address]

# Indices into an allocation's counters (an array of unsigned 64-bit integers; after
# these four come its bandwidth buckets and drop counts, see bandwidth.py).
PACKETS_TO_PEER, BYTES_TO_PEER, PACKETS_TO_CLIENT, BYTES_TO_CLIENT = range(4)


class RelaySocket(Protocol):
    """What the I/O layer gives the core for a bound relay port.

    The core never sends: it returns `SendToPeer(relay, ...)` and the I/O layer does the
    sending. `key` is the number the forwarding table knows the socket by.
    """

    @property
    def port(self) -> int: ...

    @property
    def key(self) -> int: ...

    def sendto(self, data: bytes, peer: Address, /) -> None: ...


class SendToPeer(NamedTuple):
    """Send `data` to `peer` from `relay`. A tuple: one is made for every relayed packet."""

    relay: RelaySocket
    peer: Address
    data: bytes


Flow = tuple[str, Address, Address, Counters]
ToPeerByChannel = tuple[RelaySocket, int, Address, Counters]
ToPeerByIp = tuple[RelaySocket, int, Counters]
ToClientByPeer = tuple[bytes, Flow]


def new_counters() -> Counters:
    return array.array("Q", bytes(8 * COUNTERS_SIZE))


# A stream over a limit waits at least this long (ns) before it asks again: other
# workers may charge the node's buckets meanwhile, and a wait of nothing would spin.
MIN_WAIT_NS = 1_000_000


class ForwardingTable:
    """The four dictionaries of the module docstring, and the only code that writes them.

    One table per process. Writers pass what the entries depend on (the allocation's
    relay sockets, the channels towards an IP), so the table keeps no second copy of
    an allocation's bindings.
    """

    __slots__ = (
        "admit",
        "buckets",
        "clock_offset",
        "limited",
        "random",
        "rates",
        "to_client_by_ip",
        "to_client_by_peer",
        "to_peer_by_channel",
        "to_peer_by_ip",
    )

    def __init__(self, random: RandomSource) -> None:
        # For the transaction IDs of Data indications.
        self.random = random
        self.to_peer_by_channel: dict[tuple[str, Address, Address, int], ToPeerByChannel] = {}
        self.to_peer_by_ip: dict[tuple[str, Address, Address, str], ToPeerByIp] = {}
        self.to_client_by_peer: dict[tuple[int, Address], ToClientByPeer] = {}
        self.to_client_by_ip: dict[tuple[int, str], Flow] = {}
        # Bandwidth: the limits in force, the node's buckets (the NodeState's, once the
        # server has one) and the rule, which the I/O layer may swap for the native one.
        self.rates: Rates = bandwidth.new_rates()
        self.buckets: Words = bandwidth.new_buckets()
        self.admit: Admit = bandwidth.admit
        self.limited = False
        # The core's clock minus the monotonic clock, in ns (the I/O layer's to set: its
        # core clock runs in Unix seconds, for REST expiry stamps).
        self.clock_offset = 0

    def ns(self, now: float) -> int:
        """A core clock value as the limits' time: ns on the monotonic clock."""
        return int(now * 1e9) - self.clock_offset

    def set_rates(self, per_allocation: int, per_user: int, total: int) -> None:
        """New limits (bytes/s, 0: none), in force at once for every allocation."""
        self.rates[:] = bandwidth.new_rates(per_allocation, per_user, total)
        self.limited = any(self.rates)

    def _admitted(self, counters: Counters, direction: int, size: int, now: int) -> bool:
        """Charge the buckets for `size` bytes, or count them dropped."""
        reason = self.admit(counters, self.rates, self.buckets, direction, size, now)
        if reason:
            bandwidth.count_drop(counters, self.buckets, direction, reason, size=size, now=now)
            return False
        return True

    # -- written by the core (pyturn.core.allocation) -----------------------------------

    def permit(self, flow: Flow, relay: RelaySocket, ip: str, channels: ChannelsOf) -> None:
        """A permission for `ip` is installed or refreshed (RFC 8656 §9)."""
        transport, client, server, counters = flow
        key = relay.key
        self.to_peer_by_ip[(transport, client, server, ip)] = (relay, key, counters)
        self.to_client_by_ip[(key, ip)] = flow
        for peer, number in channels(ip):
            self.to_client_by_peer[(key, peer)] = (channel_header(number), flow)

    def revoke(self, flow: Flow, relay: RelaySocket, ip: str, channels: ChannelsOf) -> None:
        """The permission for `ip` ended: nothing more to or from it, channels included."""
        transport, client, server, _ = flow
        key = relay.key
        self.to_peer_by_ip.pop((transport, client, server, ip), None)
        self.to_client_by_ip.pop((key, ip), None)
        for peer, _number in channels(ip):
            self.to_client_by_peer.pop((key, peer), None)

    def bind(
        self, flow: Flow, relay: RelaySocket, number: int, peer: Address, permitted: bool
    ) -> None:
        """Channel `number` is bound to `peer` (RFC 8656 §12); ChannelData from the peer
        needs the permission for its IP too."""
        transport, client, server, counters = flow
        key = relay.key
        self.to_peer_by_channel[(transport, client, server, number)] = (
            relay,
            key,
            peer,
            counters,
        )
        if permitted:
            self.to_client_by_peer[(key, peer)] = (channel_header(number), flow)

    def unbind(self, flow: Flow, relay: RelaySocket, number: int, peer: Address) -> None:
        transport, client, server, _ = flow
        self.to_peer_by_channel.pop((transport, client, server, number), None)
        self.to_client_by_peer.pop((relay.key, peer), None)

    def compact(self) -> None:
        """Dicts never shrink as entries go: refill each, in place, sized for what is
        left. In place because the event loop's native callbacks hold these very dicts."""
        for entries in (
            self.to_peer_by_channel,
            self.to_peer_by_ip,
            self.to_client_by_peer,
            self.to_client_by_ip,
        ):
            kept = dict(entries)
            entries.clear()
            entries.update(kept)  # type: ignore[arg-type]

    # -- read by the data plane: the reference path -------------------------------------

    def from_client(self, data: bytes, five_tuple: FiveTuple, now: int) -> SendToPeer | None:
        """RFC 8656 §12.5: relay ChannelData on a bound channel, silently drop the rest.

        `data` is ChannelData (`is_channel_data`). The channel number is only ever looked
        up, so reserved numbers simply miss; padding after the data is allowed, a length
        past the datagram is not; over a bandwidth limit the payload is dropped.
        route_from_client in _fastpath.c is the same rule.
        """
        if len(data) < 4:
            return None
        route = self.to_peer_by_channel.get((*five_tuple, (data[0] << 8) | data[1]))
        if route is None:
            return None
        end = 4 + ((data[2] << 8) | data[3])
        if end > len(data):
            return None
        relay, _, peer, counters = route
        if self.limited and not self._admitted(counters, TO_PEER, end - 4, now):
            return None
        counters[PACKETS_TO_PEER] += 1
        counters[BYTES_TO_PEER] += end - 4
        return SendToPeer(relay, peer, data[4:end])

    def stream_wait(self, data: bytes, five_tuple: FiveTuple, now: int) -> int:
        """For a client on a stream, before `from_client`: how long (ns) to wait before
        the ChannelData `data` is within the limits; 0 when it is (or has no route). A
        stream is not dropped from but waited for: its reader stops meanwhile."""
        if not self.limited or len(data) < 4:
            return 0
        route = self.to_peer_by_channel.get((*five_tuple, (data[0] << 8) | data[1]))
        if route is None:
            return 0
        counters = route[3]
        if not self.admit(counters, self.rates, self.buckets, TO_PEER, 0, now):
            return 0
        return max(bandwidth.wait(counters, self.rates, self.buckets, TO_PEER, now), MIN_WAIT_NS)

    def stream_take(
        self, counters: Counters, direction: int, size: int, now: int
    ) -> tuple[int, int]:
        """For `size` bytes read from a relayed TCP connection (RFC 6062): how many may go
        now (charged), and how long (ns) to wait before asking for the rest (0: none is
        left). Charged 50 ms worth at a time, so a large read cannot overdraw a bucket."""
        step = max(1024, min(rate for rate in self.rates if rate) // 20)
        taken = 0
        while taken < size:
            piece = min(step, size - taken)
            if self.admit(counters, self.rates, self.buckets, direction, piece, now):
                wait = bandwidth.wait(counters, self.rates, self.buckets, direction, now)
                return taken, max(wait, MIN_WAIT_NS)
            taken += piece
        return taken, 0

    def send_to(
        self, five_tuple: FiveTuple, peer: Address, payload: bytes, now: int
    ) -> SendToPeer | None:
        """RFC 8656 §11.2: a Send indication's payload goes out only with a permission
        (and within the bandwidth limits)."""
        route = self.to_peer_by_ip.get((*five_tuple, peer[0]))
        if route is None:
            return None
        relay, _, counters = route
        if self.limited and not self._admitted(counters, TO_PEER, len(payload), now):
            return None
        counters[PACKETS_TO_PEER] += 1
        counters[BYTES_TO_PEER] += len(payload)
        return SendToPeer(relay, peer, payload)

    def from_peer(
        self, relay_key: int, peer: Address, data: bytes, now: int
    ) -> tuple[Flow, bytes] | None:
        """RFC 8656 §11.3/§12.6: what to send whom for a datagram from `peer`, or None.

        Nothing without a permission for the peer's IP (a channel outlives its permission
        unless refreshed, and its entry goes with the permission), nor over a bandwidth
        limit; then ChannelData when a channel is bound to the peer, else a Data
        indication. flow_from_peer in _fastpath.c is the same rule, for the datagrams
        of UDP clients.
        """
        bound = self.to_client_by_peer.get((relay_key, peer))
        if bound is not None:
            header, flow = bound
            counters = flow[3]
            if self.limited and not self._admitted(counters, TO_CLIENT, len(data), now):
                return None
            frame = header + len(data).to_bytes(2, "big") + data
        else:
            found = self.to_client_by_ip.get((relay_key, peer[0]))
            if found is None:
                return None
            flow = found
            counters = flow[3]
            if self.limited and not self._admitted(counters, TO_CLIENT, len(data), now):
                return None
            frame = self.data_indication(peer, data)
        counters[PACKETS_TO_CLIENT] += 1
        counters[BYTES_TO_CLIENT] += len(data)
        return flow, frame

    def data_indication(self, peer: Address, data: bytes) -> bytes:
        """The Data indication carrying `data` from `peer`, with a fresh transaction ID;
        the native path asks this for the ones it sends."""
        return data_indication(peer, data, self.random.token(12))


# A channel number's 2-byte prefix, one bytes object per number for every entry that
# uses it (at most 16,384 of them; what an entry holds is what memory each one costs).
_CHANNEL_HEADERS: dict[int, bytes] = {}


def channel_header(number: int) -> bytes:
    header = _CHANNEL_HEADERS.get(number)
    if header is None:
        header = _CHANNEL_HEADERS[number] = number.to_bytes(2, "big")
    return header


# (peer IP) -> the (peer, channel number) pairs bound towards that IP.
ChannelsOf = Callable[[str], list[tuple[Address, int]]]

_DATA_INDICATION_HEAD = message_type(Method.DATA, 0b01).to_bytes(2, "big")
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")


def data_indication(peer: Address, data: bytes, txid: bytes) -> bytes:
    """A Data indication (RFC 8656 §11.4) built directly: it goes out for every datagram
    a peer sends without a channel, so no message objects are made."""
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
