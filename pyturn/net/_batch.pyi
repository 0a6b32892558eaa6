# Types of the optional C module pyturn/net/_batch.c (see pyturn/net/batch.py).
import _socket
import select
from collections.abc import Callable
from typing import Any, TypeVar

_Endpoint = TypeVar("_Endpoint")

BATCH: int

Datagram = tuple[bytes, tuple[str, int]]

def recv_batch(sock: _socket.socket | int, limit: int, /) -> list[Datagram]: ...
def send_batch(sock: _socket.socket | int, items: list[Datagram], /) -> int: ...
def send_many_to(
    sock: _socket.socket | int, address: tuple[str, int], frames: list[bytes], /
) -> int: ...
def forward_channel_data(
    sock: _socket.socket | int,
    limit: int,
    allocations: dict[Any, Any],
    local: tuple[str, int],
    /,
) -> tuple[int, list[Datagram]]: ...
def serve_relays(
    epoll: select.epoll, endpoints: dict[int, _Endpoint], limit: int, reads: int, /
) -> list[_Endpoint]: ...
def serve_relay(endpoint: Any, reads: int, /) -> None: ...
def listener_ready(
    sock: _socket.socket,
    limit: int,
    server: Any,
    local: tuple[str, int],
    handle: Callable[[int, list[Datagram]], None],
    failed: Callable[[OSError], None],
    /,
) -> None: ...
def gso() -> bool: ...
def forget_addresses() -> None: ...
