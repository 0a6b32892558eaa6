# Types of the optional C module pyturn.net._batch, built from _udp_batch.c and
# _fastpath.c (see pyturn/net/batch.py and pyturn/net/fastpath.py).
import _socket
import array
import select
from collections.abc import Callable
from typing import Any, TypeVar

_Endpoint = TypeVar("_Endpoint")

BATCH: int

Datagram = tuple[bytes, tuple[str, int]]
_StreamWrites = dict[tuple[str, tuple[str, int], tuple[str, int]], Callable[[bytes], object]]

def recv_batch(sock: _socket.socket | int, limit: int, /) -> list[Datagram]: ...
def send_batch(sock: _socket.socket | int, items: list[Datagram], /) -> int: ...
def send_many_to(
    sock: _socket.socket | int, address: tuple[str, int], frames: list[bytes], /
) -> int: ...
def forward_channel_data(
    sock: _socket.socket | int,
    limit: int,
    to_peer_by_channel: dict[Any, Any],
    local: tuple[str, int],
    /,
) -> tuple[int, list[Datagram]]: ...
def serve_relays(
    epoll: select.epoll,
    endpoints: dict[int, _Endpoint],
    limit: int,
    reads: int,
    to_client_by_peer: dict[Any, Any],
    to_client_by_ip: dict[Any, Any],
    indication: Callable[[tuple[str, int], bytes], bytes],
    udp_listeners: dict[tuple[str, int], int],
    stream_writes: _StreamWrites,
    /,
) -> list[tuple[_Endpoint, list[Datagram]]]: ...
def serve_relay(
    sock: _socket.socket | int,
    reads: int,
    to_client_by_peer: dict[Any, Any],
    to_client_by_ip: dict[Any, Any],
    indication: Callable[[tuple[str, int], bytes], bytes],
    udp_listeners: dict[tuple[str, int], int],
    stream_writes: _StreamWrites,
    deliver: Callable[[list[Datagram]], None],
    /,
) -> None: ...
def relay_stream(
    data: bytes | bytearray,
    five_tuple: tuple[str, tuple[str, int], tuple[str, int]],
    to_peer_by_channel: dict[Any, Any],
    to_peer_by_ip: dict[Any, Any],
    /,
) -> int: ...
def listener_ready(
    sock: _socket.socket,
    limit: int,
    to_peer_by_channel: dict[Any, Any],
    local: tuple[str, int],
    handle: Callable[[int, list[Datagram]], None],
    failed: Callable[[OSError], None],
    /,
) -> None: ...
def route_client_datagram(
    to_peer_by_channel: dict[Any, Any],
    local: tuple[str, int],
    client: tuple[str, int],
    data: bytes,
    now: int,
    /,
) -> tuple[int, tuple[str, int], bytes] | None: ...
def route_peer_datagram(
    to_client_by_peer: dict[Any, Any],
    to_client_by_ip: dict[Any, Any],
    indication: Callable[[tuple[str, int], bytes], bytes],
    relay_key: int,
    peer: tuple[str, int],
    data: bytes,
    now: int,
    /,
) -> tuple[Any, bytes] | None: ...
def set_bandwidth(rates: array.array[int], buckets: memoryview, /) -> None: ...
def admit(
    counters: array.array[int],
    rates: array.array[int],
    buckets: memoryview,
    direction: int,
    size: int,
    now: int,
    /,
) -> int: ...
def gso() -> bool: ...
def forget_addresses() -> None: ...
