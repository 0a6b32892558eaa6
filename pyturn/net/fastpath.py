"""The relay fast path in C: ChannelData both ways, and Data indications.

The native functions (pyturn/net/_fastpath.c, in the module `pyturn.net._batch`) read
the forwarding table's dictionaries (pyturn/core/forwarding.py) and the I/O layer's maps
of UDP listeners and stream clients (pyturn/net/clients.py), and relay what they can
without running Python; what they leave goes to the reference path,
`ForwardingTable.from_client` and `from_peer`, called from pyturn/net/udp.py,
pyturn/net/stream.py and pyturn/net/relay.py. Without the native module the functions
below read and hand over everything, so Python routes it all: the same behaviour,
slower.

    listener_ready(sock, limit, to_peer_by_channel, local, handle, failed)
        the event loop's callback for a UDP client listener
    forward_channel_data(sock, limit, to_peer_by_channel, local) -> (read, left)
        the same read for the rest of a wake-up's budget
    relay_stream(data, five_tuple, to_peer_by_channel, to_peer_by_ip) -> taken
        the ChannelData and Send indications at the head of what a TCP/TLS connection
        read
    serve_relay(sock, reads, to_client_by_peer, to_client_by_ip, indication,
                udp_listeners, stream_writes, deliver)
        the event loop's callback for a relay socket it watches itself
    serve_relays(epoll, endpoints, limit, reads, to_client_by_peer, to_client_by_ip,
                 indication, udp_listeners, stream_writes)
        the relay sockets behind one epoll descriptor -> [(endpoint, left)]

`use_table(table)` hands the native path the table's bandwidth limits and node buckets,
and gives the table the native `admit` (atomic on buckets other workers share).
"""

from __future__ import annotations

import _socket
import select
from collections.abc import Callable
from typing import Any

from pyturn.core.forwarding import ForwardingTable
from pyturn.net import batch
from pyturn.net.batch import recv_batch
from pyturn.wire.attributes import Address

Datagram = tuple[bytes, Address]
# A UDP listener's local address -> its file descriptor (for sending to its clients).
UdpListeners = dict[Address, int]
# A TCP/TLS client's 5-tuple -> its transport's write, while that takes more.
StreamWrites = dict[tuple[str, Address, Address], Callable[[bytes], object]]


def _relay_stream(
    data: bytes | bytearray,
    five_tuple: tuple[str, Address, Address],
    to_peer_by_channel: dict[Any, Any],
    to_peer_by_ip: dict[Any, Any],
) -> int:
    """Takes nothing: every frame goes to Python."""
    return 0


def _forward_channel_data(
    sock: _socket.socket, limit: int, to_peer_by_channel: dict[Any, Any], local: Address
) -> tuple[int, list[Datagram]]:
    """Relays nothing itself: every datagram read is left for Python."""
    datagrams = recv_batch(sock, limit)
    return len(datagrams), datagrams


def _listener_ready(  # noqa: PLR0917 (add_reader passes its arguments positionally)
    sock: _socket.socket,
    limit: int,
    to_peer_by_channel: dict[Any, Any],
    local: Address,
    handle: Callable[[int, list[Datagram]], None],
    failed: Callable[[OSError], None],
) -> None:
    try:
        received, datagrams = forward_channel_data(sock, limit, to_peer_by_channel, local)
    except OSError as exc:
        failed(exc)
        return
    if datagrams or received == limit:
        handle(received, datagrams)


def _serve_relay(  # noqa: PLR0917 (add_reader passes its arguments positionally)
    sock: _socket.socket,
    reads: int,
    to_client_by_peer: dict[Any, Any],
    to_client_by_ip: dict[Any, Any],
    indication: Indication,
    udp_listeners: UdpListeners,
    stream_writes: StreamWrites,
    deliver: Deliver,
) -> None:
    """Serves nothing itself: what is queued goes to Python."""
    try:
        datagrams = recv_batch(sock, reads)
    except OSError:
        return  # the next wake-up meets the error again, as the native path does
    if datagrams:
        deliver(datagrams)


def _serve_relays(  # noqa: PLR0917 (the native signature)
    epoll: select.epoll,
    endpoints: dict[int, Any],
    limit: int,
    reads: int,
    to_client_by_peer: dict[Any, Any],
    to_client_by_ip: dict[Any, Any],
    indication: Indication,
    udp_listeners: UdpListeners,
    stream_writes: StreamWrites,
) -> list[tuple[Any, list[Datagram]]]:
    """Serves nothing itself: every ready socket's datagrams go to Python (an endpoint
    here is a RelayEndpoint, whose socket this reads)."""
    left = []
    for fd, _ in epoll.poll(0, limit):
        endpoint = endpoints.get(fd)
        if endpoint is None:
            continue
        try:
            datagrams = recv_batch(endpoint.sock, reads)
        except OSError:
            continue
        if datagrams:
            left.append((endpoint, datagrams))
    return left


Deliver = Callable[[list[Datagram]], None]
# ForwardingTable.data_indication: a Data indication's bytes for (peer, data).
Indication = Callable[[Address, bytes], bytes]
ListenerReady = Callable[
    [
        _socket.socket,
        int,
        dict[Any, Any],
        Address,
        Callable[[int, list[Datagram]], None],
        Callable[[OSError], None],
    ],
    None,
]
ForwardChannelData = Callable[
    [_socket.socket, int, dict[Any, Any], Address], tuple[int, list[Datagram]]
]
ServeRelay = Callable[
    [
        _socket.socket,
        int,
        dict[Any, Any],
        dict[Any, Any],
        Indication,
        UdpListeners,
        StreamWrites,
        Deliver,
    ],
    None,
]
RelayStream = Callable[
    [bytes | bytearray, tuple[str, Address, Address], dict[Any, Any], dict[Any, Any]], int
]
ServeRelays = Callable[
    [
        select.epoll,
        dict[int, Any],
        int,
        int,
        dict[Any, Any],
        dict[Any, Any],
        Indication,
        UdpListeners,
        StreamWrites,
    ],
    list[tuple[Any, list[Datagram]]],
]


def use_table(table: ForwardingTable) -> None:
    """Once the table has its node buckets (the server's), before relaying starts."""
    if batch.NATIVE:
        _batch.set_bandwidth(table.rates, table.buckets)
        table.admit = _batch.admit


listener_ready: ListenerReady = _listener_ready
forward_channel_data: ForwardChannelData = _forward_channel_data
serve_relay: ServeRelay = _serve_relay
serve_relays: ServeRelays = _serve_relays
relay_stream: RelayStream = _relay_stream

if batch.NATIVE:
    from pyturn.net import _batch

    listener_ready = _batch.listener_ready
    forward_channel_data = _batch.forward_channel_data
    serve_relay = _batch.serve_relay
    serve_relays = _batch.serve_relays
    relay_stream = _batch.relay_stream
