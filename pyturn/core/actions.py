"""What the core returns: actions for the I/O layer to carry out, and events.

Every entry point of `TurnServer` returns one list of these. Actions say what to do
(reply, send to a peer, open or close an RFC 6062 connection, start or stop serving an
allocation's sockets); events say what happened, for metrics and logs only: an I/O
layer that ignores every event still relays correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pyturn.core.allocation import (
    Allocation,
    PeerConnection,
)
from pyturn.core.auth import AuthFailure
from pyturn.core.forwarding import SendToPeer
from pyturn.wire.attributes import (
    Address,
)


class Reply(NamedTuple):
    """Send `data` back to the client on the 5-tuple the request came from."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send `data` to the client of `allocation` on its control connection (RFC 6062)."""

    allocation: Allocation
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectToPeer:
    """Open a TCP connection from the relayed address to the peer, then call
    `TurnServer.peer_connected` with the outcome (RFC 6062 §5.2)."""

    connection: PeerConnection


@dataclass(frozen=True, slots=True)
class JoinPeerConnection:
    """The client data connection this frame came on now carries `connection`'s bytes."""

    connection: PeerConnection


@dataclass(frozen=True, slots=True)
class ClosePeerConnection:
    connection: PeerConnection


@dataclass(frozen=True, slots=True)
class StartRelaying:
    """Wiring for a new allocation: serve its relay sockets (an RFC 6062 relay starts
    accepting peers) and arm the timer for its first deadline."""

    allocation: Allocation


@dataclass(frozen=True, slots=True)
class StopRelaying:
    """A TCP allocation (RFC 6062) ended: close its peer connections. Its table entries
    are gone and its relay sockets released already; a UDP allocation needs no more."""

    allocation: Allocation


class RequestHandled(NamedTuple):
    """A request was answered (for metrics); a tuple, as there is one per request."""

    method: int
    code: int  # 0 for a success response
    client: Address


@dataclass(frozen=True, slots=True)
class AllocationCreated:
    allocation: Allocation


@dataclass(frozen=True, slots=True)
class AllocationRefreshed:
    allocation: Allocation
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationDeleted:
    allocation: Allocation
    # "refresh", "expired", "connection closed", "shutdown", "kicked", "revoked",
    # "credential expired"
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class AuthFailed:
    client: Address
    username: str | None
    reason: AuthFailure


@dataclass(frozen=True, slots=True)
class PeerDenied:
    client: Address
    username: str
    peer: Address


@dataclass(frozen=True, slots=True)
class QuotaRejected:
    client: Address
    username: str


@dataclass(frozen=True, slots=True)
class ReplySuppressed:
    """An unsigned answer (401/438) was dropped: its source used up its budget."""

    client: Address
    code: int


Event = (
    RequestHandled
    | AllocationCreated
    | AllocationRefreshed
    | AllocationDeleted
    | AuthFailed
    | PeerDenied
    | QuotaRejected
    | ReplySuppressed
)
Action = (
    Reply
    | SendToPeer
    | SendToClient
    | ConnectToPeer
    | JoinPeerConnection
    | ClosePeerConnection
    | StartRelaying
    | StopRelaying
    | Event
)
