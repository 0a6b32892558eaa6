"""What TurnServer's request handlers share: its state, and the checks every handler
makes (the 5-tuple's allocation, the peer policy).

TurnServer (pyturn/core/server.py) is assembled from one mixin per feature, each
a subclass of `ServerState`: AllocateRequests (allocate.py), RelayingRequests
(relaying.py) and TcpRelaying (tcp_relaying.py). The attributes below are set by
TurnServer.__init__; the methods under TYPE_CHECKING are TurnServer's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyturn.config import Config
from pyturn.core import errors
from pyturn.core.actions import Action, PeerDenied
from pyturn.core.allocation import Allocation, PeerConnection
from pyturn.core.forwarding import FiveTuple, ForwardingTable
from pyturn.core.node import NodeState
from pyturn.core.policy import PeerPolicy
from pyturn.core.randomness import RandomSource
from pyturn.core.relay_ports import RelayPorts
from pyturn.wire.attributes import FAMILY_IPV4, FAMILY_IPV6, Software, XorPeerAddress


class ServerState:
    allocations: dict[FiveTuple, Allocation]
    peer_connections: dict[int, PeerConnection]
    config: Config
    policy: PeerPolicy
    random: RandomSource
    # Which worker process this is (0 for a single process): CONNECTION-IDs carry it.
    worker_index: int
    draining: bool
    # redirect_allocations, parsed; and how many Allocates were sent on so far.
    redirects: list[tuple[str, int]]
    redirect_turn: int
    ports: RelayPorts
    # The address clients are told, by family: relay.address's (or its external one).
    relay_ips: dict[int, str]
    # Every relay address clients may be told, by family, index 0 first (relay_ips');
    # allocations take them in turn, counted in relay_turns.
    relay_choices: dict[int, tuple[str, ...]]
    relay_turns: dict[int, int]
    table: ForwardingTable
    node: NodeState
    # The output of the request being handled (see TurnServer.receive).
    _out: list[Action]
    _software: tuple[Software, ...]

    if TYPE_CHECKING:

        def _schedule(self, allocation: Allocation) -> None:
            raise NotImplementedError

        def _delete(self, allocation: Allocation, reason: str, now: float) -> list[Action]:
            raise NotImplementedError

    def _allocation(self, five_tuple: FiveTuple) -> Allocation:
        allocation = self.allocations.get(five_tuple)
        if allocation is None:
            raise errors.AllocationMismatch
        return allocation

    def _udp_allocation(self, five_tuple: FiveTuple) -> Allocation:
        allocation = self._allocation(five_tuple)
        if allocation.is_tcp:
            raise errors.BadRequest("not for a TCP allocation")
        return allocation

    def _check_peer(self, allocation: Allocation, peer: XorPeerAddress) -> None:
        family = FAMILY_IPV6 if ":" in peer.host else FAMILY_IPV4
        if not allocation.serves_family(family):
            raise errors.PeerAddressFamilyMismatch
        if not self.policy.is_allowed(peer.host):
            self._out.append(
                PeerDenied(allocation.five_tuple[1], allocation.username, peer.address)
            )
            raise errors.Forbidden("peer address not allowed")
