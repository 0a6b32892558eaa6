"""CreatePermission, ChannelBind and Send (RFC 8656 §9, §11.2, §12): the paths from an
allocation to its peers, and the indication that uses them.

Permissions and channels are installed through the allocation (which writes the
forwarding table); Send indications are routed by the table, the common shape of them
without a decode.
"""

from __future__ import annotations

from pyturn.core import errors
from pyturn.core.auth import Candidate
from pyturn.core.forwarding import FiveTuple, SendToPeer
from pyturn.core.state import ServerState
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    MAGIC_COOKIE,
    Address,
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    XorPeerAddress,
)
from pyturn.wire.channel_data import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    LEGACY_CHANNEL_MAX,
)
from pyturn.wire.message import (
    Message,
)

_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
# Returned by a fast path that leaves the datagram to the full codec.
SLOW_PATH = object()


class RelayingRequests(ServerState):
    """The CreatePermission, ChannelBind and Send handlers of TurnServer."""

    def _create_permission(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        allocation = self._allocation(five_tuple)
        peers = msg.get_all(XorPeerAddress)
        if not peers:
            raise errors.BadRequest("XOR-PEER-ADDRESS missing")
        for peer in peers:  # all or nothing: check every peer before installing any
            self._check_peer(allocation, peer)
        new = {p.host for p in peers} - allocation.permissions.keys()
        if len(allocation.permissions) + len(new) > self.config.quotas.permissions_per_allocation:
            raise errors.InsufficientCapacity("too many permissions")
        for peer in peers:
            allocation.permit(peer.host, now)
        self._schedule(allocation)
        return []

    def _channel_bind(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        allocation = self._udp_allocation(five_tuple)
        channel = msg.get(ChannelNumber)
        peer = msg.get(XorPeerAddress)
        if channel is None or peer is None:
            raise errors.BadRequest("CHANNEL-NUMBER and XOR-PEER-ADDRESS are required")
        number = channel.number
        highest = (
            LEGACY_CHANNEL_MAX if self.config.allocations.legacy_channel_numbers else CHANNEL_MAX
        )
        if not CHANNEL_MIN <= number <= highest:
            raise errors.BadRequest(f"channel number outside 0x4000-0x{highest:04X}")
        bound_peer = allocation.channel_peers.get(number)
        if bound_peer is not None and bound_peer != peer.address:
            raise errors.BadRequest("channel already bound to another peer")
        bound_number = allocation.channel_to(peer.address)
        if bound_number is not None and bound_number != number:
            raise errors.BadRequest("peer already bound to another channel")
        self._check_peer(allocation, peer)
        if (
            bound_peer is None
            and len(allocation.channel_peers) >= self.config.quotas.channels_per_allocation
        ):
            raise errors.InsufficientCapacity("too many channels")
        if (
            peer.host not in allocation.permissions
            and len(allocation.permissions) >= self.config.quotas.permissions_per_allocation
        ):
            raise errors.InsufficientCapacity("too many permissions")
        allocation.bind_channel(number, peer.address, now)
        self._schedule(allocation)
        return []

    def _send_indication(
        self, msg: Message, five_tuple: FiveTuple, now: float
    ) -> SendToPeer | None:
        allocation = self.allocations.get(five_tuple)
        if allocation is None or allocation.is_tcp:
            return None
        peer = msg.get(XorPeerAddress)
        data = msg.get(Data)
        if peer is None or data is None:
            return None
        return self.table.send_to(five_tuple, peer.address, data.value, self.table.ns(now))

    def _route_send_indication(
        self, data: bytes, five_tuple: FiveTuple, now: float
    ) -> SendToPeer | object | None:
        """RFC 8656 §11.2 for the common shape of a Send indication, without a decode.

        Handles XOR-PEER-ADDRESS (IPv4), DATA and DONT-FRAGMENT; anything else (IPv6,
        FINGERPRINT, unknown attributes, odd lengths) returns `SLOW_PATH` so the full
        codec decides. The rules are those of `_send_indication`; the table holds no
        route for a 5-tuple without a UDP allocation, so that needs no lookup here.
        """
        end = len(data)
        if end < 20 or data[4:8] != _COOKIE_BYTES or 20 + ((data[2] << 8) | data[3]) != end:
            return SLOW_PATH
        pos = 20
        peer: Address | None = None
        payload = None
        while pos < end:
            if pos + 4 > end:
                return SLOW_PATH
            attr_type = (data[pos] << 8) | data[pos + 1]
            size = (data[pos + 2] << 8) | data[pos + 3]
            value_end = pos + 4 + size
            if value_end > end:
                return SLOW_PATH
            if attr_type == XorPeerAddress.TYPE:
                if peer is None:
                    if size != 8 or data[pos + 4] != 0 or data[pos + 5] != FAMILY_IPV4:
                        return SLOW_PATH
                    port = ((data[pos + 6] << 8) | data[pos + 7]) ^ 0x2112
                    ip = int.from_bytes(data[pos + 8 : pos + 12], "big") ^ 0x2112A442
                    host = f"{ip >> 24}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}"
                    peer = (host, port)
            elif attr_type == Data.TYPE:
                if payload is None:
                    payload = data[pos + 4 : value_end]
            elif attr_type != DontFragment.TYPE:
                return SLOW_PATH
            pos = value_end + (-size % 4)
        if peer is None or payload is None:
            return None
        return self.table.send_to(five_tuple, peer, payload, self.table.ns(now))
