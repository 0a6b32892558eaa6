"""How the I/O layer reaches a client, by the 5-tuple its allocation is known by.

The core names clients by 5-tuple only (in the forwarding table's flows, in
`SendToClient`); the listeners register here as they bind (UDP) or accept (TCP, TLS),
so nothing has to be attached to an allocation for its relayed data to find the client.
`udp_fds` and `stream_writes` are the same maps for the native fast path: a UDP
listener's local address to its descriptor, and a TCP/TLS client's 5-tuple to its
transport's write (only while the transport takes more: a client that does not read its
media then meets `streams`, which drops rather than queues).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pyturn.core.forwarding import FiveTuple, Flow
from pyturn.net.batch import send_many_to
from pyturn.net.fastpath import StreamWrites, UdpListeners
from pyturn.wire.attributes import Address


class UdpSender(Protocol):
    """A UDP client listener (pyturn.net.udp.UdpListener)."""

    @property
    def sock(self) -> object: ...

    def send(self, data: bytes, client: Address) -> None: ...


class Clients:
    def __init__(self) -> None:
        self.udp: dict[Address, UdpSender] = {}
        self.udp_fds: UdpListeners = {}
        # TCP and TLS connections: how to send one frame (padded for the stream).
        self.streams: dict[FiveTuple, Callable[[bytes], None]] = {}
        self.stream_writes: StreamWrites = {}

    def add_udp(self, local: Address, listener: UdpSender, fd: int) -> None:
        self.udp[local] = listener
        self.udp_fds[local] = fd

    def remove_udp(self, local: Address) -> None:
        self.udp.pop(local, None)
        self.udp_fds.pop(local, None)

    def send(self, five_tuple: FiveTuple, data: bytes) -> None:
        """One message to the client; dropped when the client has gone."""
        transport, client, local = five_tuple
        if transport == "udp":
            listener = self.udp.get(local)
            if listener is not None:
                listener.send(data, client)
            return
        stream = self.streams.get(five_tuple)
        if stream is not None:
            stream(data)

    def send_frames(self, flow: Flow, frames: list[bytes]) -> None:
        """Relayed frames for one client: one system call for a UDP client."""
        transport, client, local, _ = flow
        if transport == "udp":
            listener = self.udp.get(local)
            if listener is not None:
                send_many_to(listener.sock, client, frames)  # type: ignore[arg-type]
            return
        stream = self.streams.get((transport, client, local))
        if stream is not None:
            # One write: over TLS, one record for the lot.
            stream(b"".join(pad(frame) for frame in frames) if len(frames) > 1 else frames[0])


def pad(frame: bytes) -> bytes:
    """RFC 8656 §12.5: over a stream, ChannelData is padded to a multiple of 4 bytes (a
    STUN message already is)."""
    extra = -len(frame) % 4
    return frame + b"\x00" * extra if extra else frame
